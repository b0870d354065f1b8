"""Issue 18's first figure: a guest's boot to /init's marker (the Debian cloud kernel + the
busybox initramfs of ``cellcloud microvm image build``), per machine type, under the
acceleration the probe chose (TCG on the development machine). Baseline in the same run: QEMU
started with ``-version`` (the process start alone).

Run from the repository root, as root::

    python -m bench.microvm_boot [--boots 5] [--state-dir DIR]

Prints median/min/max wall ms from QEMU's start to the marker line on the serial console, and
the load average before and after. Nothing here asserts.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import tempfile
import time

from cellcloud.core.limits import DEFAULT_LIMITS
from cellcloud.microvm import boot, core, image


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--boots", type=int, default=5)
    ap.add_argument("--state-dir", default="")
    ap.add_argument("--accel", choices=["probe", "tcg", "kvm"], default="probe")
    a = ap.parse_args()
    sd = a.state_dir or tempfile.mkdtemp(prefix="cellcloud-microvm-bench-")
    img = image.ensure(sd)
    accel = a.accel
    if accel == "probe":
        record, _ = boot.probe(sd, img)
        accel = str(record["accel"])
        print(f"probe: {accel} ({record['reason']})")
    qemu = boot.qemu_binary()
    assert qemu
    load0 = os.getloadavg()
    base = []
    for _ in range(a.boots):
        t = time.monotonic()
        subprocess.run([qemu, "-version"], capture_output=True, check=True)
        base.append((time.monotonic() - t) * 1000)
    rows = []
    for machine in ("microvm", "pc"):
        spec = core.VmSpec(accel=accel, machine=machine)  # type: ignore[arg-type]
        ms = []
        for _ in range(a.boots):
            r = asyncio.run(boot.boot(img, spec, timeout_ms=DEFAULT_LIMITS.microvm_boot_timeout_ms))
            assert r.guest_release, (r.console_tail, r.stderr_tail)
            ms.append(r.elapsed_ms)
        rows.append((machine, ms))
    load1 = os.getloadavg()
    print(f"image {img.digest[:19]} kernel {img.kernel_release}, host {os.uname().release}, "
          f"accel {accel}, load {load0[0]:.2f} -> {load1[0]:.2f}")
    print(f"{'':10} {'median ms':>10} {'min':>7} {'max':>7}  vs qemu -version")
    b = statistics.median(base)
    print(f"{'baseline':10} {b:10.0f} {min(base):7.0f} {max(base):7.0f}")
    for machine, ms in rows:
        med = statistics.median(ms)
        print(f"{machine:10} {med:10.0f} {min(ms):7.0f} {max(ms):7.0f}  {med / b:.1f}x")


if __name__ == "__main__":
    main()
