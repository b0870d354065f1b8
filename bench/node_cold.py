"""Cold start of a Node.js function in the jail, against ``node -e 0`` on the host.

Run from the repository root, as root::

    python -m bench.node_cold [--n 40] [--warmup 5] [--memory-mb 128] [--majors 20,22,24]

Per installed Node major (runtimes.find_node(): the venv's nodejs/ folder, then PATH):

cold      agent level, as bench/sandbox.py's ``cold`` (1): an in-process ``Agent`` +
          ``JailBackend`` (the real zygote and jail); per sample ``create_env`` then ``invoke``
          of ``exports.handler = async () => Date.now() / 1000``; cold = handler entry - wall
          time just before create_env. The environment forks from the Python zygote and
          executes node (``runtime.cjs``): there is no pre-initialised Node process to fork
          from, so every cold start pays Node's own start-up.
baseline  in the same run, interleaved sample by sample, on the host, no jail: ``node -e 0``
          (spawn to exit) and ``node -e 'console.log(Date.now() / 1000)'`` (spawn to script
          running), with the same node binary.
python    the same agent-level cold start of the built-in python3.11 runtime, for scale.

Samples are spaced by 50 ms (the zygote's /tmp device pool stays in steady state). Prints a
table and writes JSON under bench/results/. Benchmarks are not tests: nothing here asserts.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import subprocess
import sys
import time
from typing import Any

from bench.common.results import run_recorded
from bench.sandbox import (
    COLD_HANDLER,
    SAMPLE_GAP_S,
    InProcAgent,
    machine,
    make_zip,
    summary_ms,
)
from cellcloud.sandbox import runtimes

NODE_HANDLER = "exports.handler = async () => Date.now() / 1000;\n"
UID_BASE = 650_000  # away from bench/sandbox.py's 600,000 and the regions' 200,000+


async def cold_env(a: InProcAgent, runtime: str, files: dict[str, str], handler: str,
                   n: int, warmup: int, memory_mb: int, node: str | None = None) -> dict[str, Any]:
    """Agent-level cold starts; with ``node``, each sample is followed by the host baseline's
    samples (interleaved, so both see the same background load)."""
    data = make_zip(files)
    sha = hashlib.sha256(data).hexdigest()
    a.agent._bundle(sha, data)
    cold, create, exit_s, entry_s = [], [], [], []
    for i in range(warmup + n):
        env_id = f"{runtime.replace('.', '-')}-{i}"
        body = {"env_id": env_id, "bundle_sha256": sha, "function_key": runtime,
                "function": {"name": "bench", "arn": "arn:aws:lambda:cc-local-1:1:function:bench",
                             "handler": handler, "runtime": runtime, "memory_mb": memory_mb,
                             "timeout_s": 10}}
        t0 = time.time()
        await a.agent.create_env(body)
        t1 = time.time()
        entered = await a.invoke(env_id, timeout_ms=10_000)
        await a.agent.destroy({"env_id": env_id})
        if i >= warmup:
            cold.append(float(entered) - t0)
            create.append(t1 - t0)
        await asyncio.sleep(SAMPLE_GAP_S)
        if node is not None:
            e0, en = host_sample(node)
            if i >= warmup:
                exit_s.append(e0)
                entry_s.append(en)
    out: dict[str, Any] = {"cold": summary_ms(cold), "create_env": summary_ms(create),
                           "samples_ms": [round(v * 1000, 3) for v in cold]}
    if node is not None:
        out["host"] = {"node_e_0": summary_ms(exit_s), "node_entry": summary_ms(entry_s)}
    return out


def host_sample(exe: str) -> tuple[float, float]:
    """``node -e 0`` spawn to exit; then spawn to a script running (its Date.now())."""
    t0 = time.time()
    subprocess.run([exe, "-e", "0"], check=True, timeout=30)
    t1 = time.time()
    time.sleep(SAMPLE_GAP_S)
    t2 = time.time()
    out = subprocess.run([exe, "-e", "console.log(Date.now() / 1000)"], check=True,
                         timeout=30, capture_output=True, text=True).stdout
    time.sleep(SAMPLE_GAP_S)
    return t1 - t0, float(out) - t2


async def run(args: argparse.Namespace, work: str, res: dict[str, Any]) -> None:
    found = runtimes.find_node()
    majors = [m for m in (int(x) for x in args.majors.split(",")) if m in found]
    res["node"] = {str(m): found[m] for m in majors}
    a = InProcAgent(work, "node", UID_BASE)
    try:
        res["python3.11"] = await cold_env(a, "python3.11", {"app.py": COLD_HANDLER},
                                           "app.handler", args.n, args.warmup, args.memory_mb)
        for m in majors:
            res[f"nodejs{m}.x"] = await cold_env(
                a, f"nodejs{m}.x", {"index.js": NODE_HANDLER}, "index.handler", args.n,
                args.warmup, args.memory_mb, node=found[m])
    finally:
        a.close()  # kills every environment and the zygote, and removes the cgroups


def report(res: dict[str, Any]) -> list[str]:
    lines = [f"{'runtime':<12} {'cold p50':>9} {'p99':>8} {'create p50':>11} "
             f"{'node -e 0 p50':>14} {'node entry p50':>15}"]
    for name, r in res.items():
        if not isinstance(r, dict) or "cold" not in r:
            continue
        host = r.get("host", {})
        e0 = f"{host['node_e_0']['p50_ms']:.1f} ms" if host else "-"
        en = f"{host['node_entry']['p50_ms']:.1f} ms" if host else "-"
        lines.append(f"{name:<12} {r['cold']['p50_ms']:>6.1f} ms {r['cold']['p99_ms']:>5.1f} ms "
                     f"{r['create_env']['p50_ms']:>8.1f} ms {e0:>14} {en:>15}")
    return lines


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.node_cold")
    p.add_argument("--n", type=int, default=40)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--memory-mb", type=int, default=128,
                   help="the functions' memory size (CPU shares follow it, as on Lambda)")
    p.add_argument("--majors", default=",".join(str(m) for m in runtimes.NODE_MAJORS))
    args = p.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench.node_cold needs root (namespaces, cgroups, mounts)")
    res: dict[str, Any] = {"machine": machine(), "argv": sys.argv[1:],
                           "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    path = run_recorded("node-cold", res, lambda work: run(args, work, res))
    m = res["machine"]
    print(f"machine: {m['nproc']} x {m['cpu_model']}, {m['mem_total_gib']:.1f} GiB, kernel "
          f"{m['kernel']}, load at start {' '.join(m['loadavg_at_start'])}")
    for line in report(res):
        print(line)
    print(f"wall {res['wall_s']:.1f} s; JSON: {path}")


if __name__ == "__main__":
    main()
