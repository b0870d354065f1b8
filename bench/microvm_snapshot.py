"""Issue 18's restore figure: a guest restored from a snapshot against the same guest booted
cold, to the same ready point (the guest's answer to the host's fresh-identity line), in the
same run, under the acceleration the probe chose (TCG on the development machine).

Run from the repository root, as root::

    python -m bench.microvm_snapshot [--runs 5] [--state-dir DIR] [--accel probe|tcg|kvm]
                                     [--jailed]

Prints the snapshot's size and save time, then median/min/max wall ms of cold boots and of
restores (of which: hashing and checking the snapshot), their ratio, and the load average
before and after. Nothing here asserts.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile

from cellcloud.microvm import boot, core, jailcore, jailer, snapshot


async def _ready_ms(path: str | None, img: object, spec: core.VmSpec,
                    spawn: snapshot.Spawn) -> tuple[int, int, str]:
    st = await snapshot.start_guest(path, img, spec, spawn=spawn)  # type: ignore[arg-type]
    await st.guest.close()
    return st.ready_ms, st.verify_ms, st.how


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--state-dir", default="")
    ap.add_argument("--accel", choices=["probe", "tcg", "kvm"], default="probe")
    ap.add_argument("--machine", choices=["microvm", "pc"], default="microvm")
    ap.add_argument("--jailed", action="store_true", help="every QEMU under the VMM jailer")
    a = ap.parse_args()
    sd = a.state_dir or tempfile.mkdtemp(prefix="cellcloud-microvm-snap-bench-")
    img = snapshot.snapshot_image(sd)
    accel = a.accel
    if accel == "probe":
        record, _ = boot.probe(sd, img)
        accel = str(record["accel"])
        print(f"probe: {accel} ({record['reason']})")
    spec = core.VmSpec(accel=accel, machine=a.machine)  # type: ignore[arg-type]
    spawn = snapshot.spawn_plain
    if a.jailed:
        js = jailcore.JailSpec.for_guest(f"bench{os.getpid()}", uid=290_099, gid=290_099,
                                         spec=spec, kernel=img.kernel, initrd=img.initrd)
        spawn = jailer.spawner(js)
    load0 = os.getloadavg()
    snap = asyncio.run(snapshot.create(sd, img, spec, force=True, spawn=spawn))
    cold, warm, verify = [], [], []
    for _ in range(a.runs):  # interleaved, so load changes hit both alike
        ms, _, how = asyncio.run(_ready_ms(None, img, spec, spawn))
        assert how == "booted"
        cold.append(ms)
        ms, vms, how = asyncio.run(_ready_ms(snap.path, img, spec, spawn))
        assert how == "restored"
        warm.append(ms)
        verify.append(vms)
    load1 = os.getloadavg()
    print(f"image {img.digest[:19]} kernel {img.kernel_release}, host {os.uname().release}, "
          f"accel {accel}, machine {a.machine}, {spec.memory_mib} MiB, "
          f"{'jailed' if a.jailed else 'not jailed'}, "
          f"load {load0[0]:.2f} -> {load1[0]:.2f}")
    print(f"snapshot: {snap.state_bytes / 2**20:.1f} MiB state, saved in {snap.save_ms} ms")
    print(f"{'':14} {'median ms':>10} {'min':>7} {'max':>7}")
    for name, ms in (("cold boot", cold), ("restore", warm), ("  of it verify", verify)):
        print(f"{name:14} {statistics.median(ms):10.0f} {min(ms):7.0f} {max(ms):7.0f}")
    print(f"restore / cold boot: {statistics.median(warm) / statistics.median(cold):.2f} "
          f"(cold boot is {statistics.median(cold) / statistics.median(warm):.1f}x slower)")


if __name__ == "__main__":
    main()
