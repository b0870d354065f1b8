"""Issue #12's benchmark: cold start with an outbound network vs without, in the same run.

Run from the repository root, as root::

    python -m bench.net_cold [--n 60] [--warmup 5]

Two in-process agents (bench/sandbox.py's ``InProcAgent``: the real ``Agent``, zygote and jail),
one with the network helper (``--network egress``: a pre-wired namespace joined with setns) and
one without (an empty namespace unshared per environment, loopback only), and a third with the
network but an empty pool. Samples interleave (one of each per round, the order rotating per
round) so all see the same machine load. Per
sample: ``create_env`` then ``invoke`` of ``def handler(e, c): return time.time()``;
cold = handler entry - wall time just before ``create_env``.

Steady state: between samples the bench waits until the helper's pool of ready namespaces is
full again (and released ones destroyed), as bench/sandbox.py spaces samples so the zygote's
/tmp pool is refilled; a burst of cold starts beyond the pool pays ``make_slot`` on demand,
measured separately here (``on_demand``: the pool drained, pool_ready = 0).

burst: ``--burst N`` cold starts at once (create_env + invoke each, gathered), with a network
and without, on the same two agents after the sequential samples; time from the first request
to the last handler entry. Beyond the pool of 4, every namespace is built on demand.

Prints the p50/p99 of both and the difference; writes JSON under bench/results/. Benchmarks are
not tests: nothing here asserts.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from typing import Any

from bench.sandbox import COLD_HANDLER, InProcAgent, machine, summary_ms
from cellcloud.network import policy
from cellcloud.network.client import NetConfig, NetHelperClient

GOAL_OVERHEAD_P50_MS = 3.0
SAMPLE_GAP_S = 0.05


def _with_network(a: InProcAgent, pool_ready: int) -> NetHelperClient:
    net = NetHelperClient(policy.prefix_for(a.group), NetConfig(pool_ready=pool_ready,
                                                                dns_upstreams=["127.0.0.1"]))
    net.start()
    a.agent.network = net
    return net


async def _settled(net: NetHelperClient, pool_ready: int, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        h = (await asyncio.to_thread(net.counters))["helper"]
        if h["ready"] >= pool_ready and h["to_destroy"] == 0:
            return
        await asyncio.sleep(0.01)  # polling the helper's pool, bounded by the deadline


async def _sample(a: InProcAgent, sha: str, env_id: str) -> tuple[float, float]:
    t0 = time.time()
    await a.agent.create_env(a.body(sha, env_id))
    t1 = time.time()
    entered = await a.invoke(env_id)
    await a.agent.destroy({"env_id": env_id})
    return entered - t0, t1 - t0


async def _burst(a: InProcAgent, sha: str, n: int, tag: str) -> float:
    t0 = time.time()

    async def one(i: int) -> float:
        await a.agent.create_env(a.body(sha, f"{tag}{i}", create_timeout_ms=120_000))
        entered: float = await a.invoke(f"{tag}{i}")
        return entered

    ends = await asyncio.gather(*(one(i) for i in range(n)))
    for i in range(n):
        await a.agent.destroy({"env_id": f"{tag}{i}"})
    return max(ends) - t0


async def run(work: str, n: int, warmup: int, burst: int = 100) -> dict[str, Any]:
    with_net = InProcAgent(work, "net", 600_000)
    without = InProcAgent(work, "none", 610_000)
    on_demand = InProcAgent(work, "ondemand", 620_000)
    nets = [_with_network(with_net, 4), _with_network(on_demand, 0)]
    try:
        sha_a, sha_b, sha_c = (x.bundle(COLD_HANDLER) for x in (with_net, without, on_demand))
        cold: dict[str, list[float]] = {"network": [], "none": [], "on_demand": []}
        create: dict[str, list[float]] = {"network": [], "none": [], "on_demand": []}
        for i in range(warmup + n):
            await _settled(nets[0], 4)
            await _settled(nets[1], 0)
            kinds = [("network", with_net, sha_a), ("none", without, sha_b),
                     ("on_demand", on_demand, sha_c)]
            # The order rotates per round: no kind always runs right after another's teardown.
            for key, agent, sha in kinds[i % 3:] + kinds[:i % 3]:
                c, k = await _sample(agent, sha, f"{key}-{i}")
                if i >= warmup:
                    cold[key].append(c)
                    create[key].append(k)
                await asyncio.sleep(SAMPLE_GAP_S)
        out = {k: {"cold": summary_ms(v), "create_env": summary_ms(create[k])}
               for k, v in cold.items()}
        out["overhead_p50_ms"] = out["network"]["cold"]["p50_ms"] - out["none"]["cold"]["p50_ms"]
        out["on_demand_overhead_p50_ms"] = (out["on_demand"]["cold"]["p50_ms"]
                                            - out["none"]["cold"]["p50_ms"])
        if burst:
            await _settled(nets[0], 4)
            out["burst"] = {"n": burst, "none_s": await _burst(without, sha_b, burst, "bn")}
            await _settled(nets[0], 4)
            out["burst"]["network_s"] = await _burst(with_net, sha_a, burst, "bw")
        return out
    finally:
        for a in (with_net, without, on_demand):
            a.close()
        for net in nets:
            net.close()


def main() -> None:
    p = argparse.ArgumentParser(prog="bench.net_cold")
    p.add_argument("--n", type=int, default=60)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--burst", type=int, default=100, help="cold starts at once (0: skip)")
    args = p.parse_args()
    import tempfile

    work = tempfile.mkdtemp(prefix="cellcloud-bench-net-")
    os.chmod(work, 0o755)
    doc = {"machine": machine(), "n": args.n, "warmup": args.warmup,
           "results": asyncio.run(run(work, args.n, args.warmup, args.burst))}
    r = doc["results"]
    print(f"{'':12} {'cold p50':>9} {'cold p99':>9} {'create p50':>11}")
    for k in ("none", "network", "on_demand"):
        print(f"{k:12} {r[k]['cold']['p50_ms']:9.2f} {r[k]['cold']['p99_ms']:9.2f} "
              f"{r[k]['create_env']['p50_ms']:11.2f}")
    print(f"network - none, p50: {r['overhead_p50_ms']:+.2f} ms "
          f"(goal <= {GOAL_OVERHEAD_P50_MS} ms); pool empty: {r['on_demand_overhead_p50_ms']:+.2f} ms")
    if "burst" in r:
        b = r["burst"]
        print(f"{b['n']} cold starts at once: none {b['none_s']:.2f} s, "
              f"network {b['network_s']:.2f} s")
    os.makedirs("bench/results", exist_ok=True)
    path = f"bench/results/net_cold-{time.strftime('%Y%m%dT%H%M%S')}.json"
    with open(path, "w") as f:
        json.dump(doc, f, indent=2)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
