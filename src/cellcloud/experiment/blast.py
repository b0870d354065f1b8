"""``cellcloud experiment blast-radius``: measure what one failure takes down, on this machine.

A region of C cells × n agents (agents started with ``--experiment-faults``, the supervisor told
not to restart anything), T tenants with one function each, every tenant invoked in rounds
(steady load). Phases, each measured per tenant:

1. baseline: every tenant succeeds;
2. control plane stopped (SIGSTOP) for a set time: routers keep serving from their last map;
3. one cell killed (every process of it): only that cell's tenants fail;
4. poison: in each remaining cell one tenant sends the crash marker, retried until its shard is
   exhausted (the cell's poison detector is set to allow k kills, so the worst case is measured;
   with the default k-1 the shard keeps one worker). Measured lost tenants (every invoke fails
   afterwards) vs the set predicted from outside, and vs the combinatorial expectation, for
   shuffle (signature) and plain sharding, k = 2 and 3.

The prediction leans on nothing the cell reports about itself: the experiment recomputes each
tenant's shard with core/sharding.py from the sharder's inputs (the sharding and k it gave the
cell, the cell's agents as region.json lists them, the cell id as seed, the function's key
``account/name``), and takes the dead agents from the process exits it observes itself (the
supervisor's child processes: a reaped exit status, or a zombie in /proc). The cell's published
shard map is only checked against the recomputation (reported as a mismatch count). With
``plant_bug`` the frontends run a sharder that ignores the shard size (every function may run
anywhere in its cell): the prediction must disagree with what is measured.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import signal
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

from .. import sdk
from ..core.blast import expected_lost_others, lost_tenants, p_lost_plain, p_lost_shuffle
from ..core.protocols import PROTOCOLS
from ..core.sharding import PlainSharder, SignatureSharder, Worker
from ..region.supervisor import Supervisor
from ..region.tenants import create_tenant
from ..transport import Client, disable_mtls, enable_mtls

CRASH_MARKER = "cellcloud-experiment-crash-agent"
HANDLER = "def handler(event, context):\n    return {'ok': True}\n"
wait_deadline_s = 60.0
poll_interval_s = 0.1  # re-check of a remote condition, always under wait_deadline_s
poison_attempts_max = 8
threads = 8

# (cell, sharding, k): the poison cells; the last cell is the one killed.
PLAN = [("signature", 2), ("signature", 3), ("plain", 2), ("plain", 3)]


def recompute_shards(cell: str, sharding: str, k: int, agents: list[str],
                     keys: list[str]) -> dict[str, tuple[str, ...]]:
    """Each key's shard, as the cell's frontend must draw it (frontend/cell.py: workers in
    sorted order, the cell id as seed, no zones)."""
    workers = [Worker(a) for a in sorted(agents)]
    kk = max(1, min(k, len(workers)))
    sharder = (PlainSharder(workers, kk) if sharding == "plain" else
               SignatureSharder(workers, kk, seed=cell.encode(), one_per_zone=False))
    return {key: tuple(sharder.shard(key)) for key in keys}


def exited(pid: int, returncode: int | None) -> bool:
    """The process is gone: its exit status was reaped, or it is a zombie, or /proc has no
    entry for it."""
    if returncode is not None:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except (OSError, IndexError):
        return True


@dataclass
class Tenant:
    name: str
    account: str
    client: sdk.Client
    cell: str = ""
    ok: dict[str, int] = field(default_factory=dict)
    failed: dict[str, int] = field(default_factory=dict)


def _zip() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("app.py", HANDLER)
    return buf.getvalue()


class Experiment:
    def __init__(self, state_dir: str, *, agents: int, tenants: int, control_down_s: float,
                 out: Any = print, plan: list[tuple[str, int]] | None = None,
                 plant_bug: bool = False) -> None:
        self.state_dir = state_dir
        self.plan = list(plan or PLAN)
        self.plant_bug = plant_bug
        self.cells = len(self.plan) + 1
        self.agents = agents
        self.tenant_count = tenants
        self.control_down_s = control_down_s
        self.out = out
        self.pool = ThreadPoolExecutor(threads)
        self.tenants: list[Tenant] = []
        self.sup: Supervisor | None = None
        self.results: dict[str, Any] = {}

    # -- helpers -------------------------------------------------------------------------------
    def comp(self, name: str) -> Any:
        assert self.sup is not None
        return next(c for c in self.sup.components if c.name == name)

    async def call(self, name: str, op: str, body: Any = None) -> Any:
        c = self.comp(name)
        host, port = ((c.info["control_host"], c.info["control_port"]) if c.kind == "router"
                      else (c.info["host"], c.info["port"]))
        client = Client(host, port, protocol=c.kind if c.kind in PROTOCOLS else None)
        try:
            return await client.call(op, body, timeout_s=10)
        finally:
            await client.close()

    async def wait_for(self, what: str, cond: Any) -> None:
        deadline = time.monotonic() + wait_deadline_s
        while not await cond():
            if time.monotonic() > deadline:
                raise RuntimeError(f"timed out waiting for {what}")
            await asyncio.sleep(poll_interval_s)

    def _invoke(self, t: Tenant, phase: str, payload: Any = None) -> bool:
        try:
            t.client.invoke("f", payload if payload is not None else {"t": t.name})
        except (sdk.CellcloudError, OSError):
            t.failed[phase] = t.failed.get(phase, 0) + 1
            t.client.close()
            return False
        t.ok[phase] = t.ok.get(phase, 0) + 1
        return True

    async def round(self, phase: str, tenants: list[Tenant] | None = None) -> None:
        loop = asyncio.get_running_loop()
        await asyncio.gather(*(loop.run_in_executor(self.pool, self._invoke, t, phase)
                               for t in (tenants or self.tenants)))

    def rate(self, phase: str, tenants: list[Tenant]) -> Fraction:
        ok = sum(t.ok.get(phase, 0) for t in tenants)
        total = ok + sum(t.failed.get(phase, 0) for t in tenants)
        return Fraction(ok, total) if total else Fraction(1)

    # -- phases --------------------------------------------------------------------------------
    async def setup(self) -> None:
        extra: dict[str, list[str]] = {"agent": ["--experiment-faults"]}
        for i, (sharding, k) in enumerate(self.plan, start=1):
            extra[f"cell-{i}-frontend"] = ["--sharding", sharding, "--shard-size", str(k),
                                           "--poison-killed-workers-max", str(k)]
            if self.plant_bug:
                extra[f"cell-{i}-frontend"] += ["--plant-bug", "sharder-ignores-shard"]
        self.sup = Supervisor(self.state_dir, cells=self.cells, agents_per_cell=self.agents,
                              port=0, extra_args=extra, restart=False, zones_per_cell=0)
        # The harness inspects every component directly, as the control plane would: it speaks
        # mTLS with a control certificate of the region's CA.
        from ..security import pki

        enable_mtls(pki.tls_config(self.state_dir, "cc-local-1", "control", "region",
                                   "experiment"), "control")
        t0 = time.monotonic()
        doc = await self.sup.start()
        self.out(f"region up: {self.cells} cells × {self.agents} agents in "
                 f"{time.monotonic() - t0:.1f} s")
        for i in range(self.tenant_count):
            rec = create_tenant(self.state_dir, f"t{i:04d}")
            self.tenants.append(Tenant(rec["name"], rec["account_id"], sdk.Client(
                doc["endpoint"], (rec["access_key_id"], rec["secret_access_key"]), timeout_s=60)))

        async def assigned() -> bool:
            st = await self.call("control", "status")
            rst = await self.call("router", "map_status") if st["tenants"] > self.tenant_count \
                else {"version": -1}
            return bool(rst["version"] >= st["version"])

        await self.wait_for("the control plane to assign every tenant", assigned)
        cells: dict[str, str] = {}
        for t in self.tenants:
            cells[t.account] = (await self.call("control", "cell_of", {"tenant": t.account}))["cell"]
            t.cell = cells[t.account]
        loop = asyncio.get_running_loop()
        code = _zip()
        def deploy(t: Tenant) -> None:
            t.client.create_function("f", code, "app.handler", runtime="python3.11")

        await asyncio.gather(*(loop.run_in_executor(self.pool, deploy, t) for t in self.tenants))
        t0 = time.monotonic()
        await self.round("baseline")
        self.out(f"{len(self.tenants)} tenants deployed; first round (cold starts) "
                 f"{time.monotonic() - t0:.1f} s")
        await self.round("baseline")

    async def control_down(self) -> None:
        pid = self.comp("control").proc.pid
        os.kill(pid, signal.SIGSTOP)
        try:
            async def stale() -> bool:
                return bool((await self.call("router", "map_status"))["stale"])

            await self.wait_for("the router to see its map go stale", stale)
            end = time.monotonic() + self.control_down_s
            rounds = 0
            while time.monotonic() < end or rounds == 0:
                await self.round("control_down")
                rounds += 1
            rst = await self.call("router", "map_status")
        finally:
            os.kill(pid, signal.SIGCONT)
        self.results["control_down"] = {
            "seconds": self.control_down_s, "rounds": rounds,
            "success": float(self.rate("control_down", self.tenants)),
            "router_map": rst}

    async def kill_cell(self) -> None:
        assert self.sup is not None
        victim = f"cell-{self.cells}"
        for c in self.sup.components:
            if c.name.startswith(victim + "-") and c.proc is not None:
                try:
                    os.killpg(c.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for c in self.sup.components:
            if c.name.startswith(victim + "-") and c.proc is not None:
                await c.proc.wait()
        await self.round("cell_killed")
        await self.round("cell_killed")
        inside = [t for t in self.tenants if t.cell == victim]
        outside = [t for t in self.tenants if t.cell != victim]
        self.results["cell_killed"] = {
            "cell": victim, "tenants_in_cell": len(inside),
            "success_in_cell": float(self.rate("cell_killed", inside)),
            "success_other_cells": float(self.rate("cell_killed", outside)),
            "other_tenants_below_100": sorted(t.name for t in outside
                                              if t.failed.get("cell_killed"))}

    async def poison(self, index: int, sharding: str, k: int) -> dict[str, Any]:
        cell = f"cell-{index}"
        members = [t for t in self.tenants if t.cell == cell]
        poison = members[0]
        loop = asyncio.get_running_loop()
        attempts, crashes = 0, 0
        while attempts < poison_attempts_max:
            attempts += 1
            try:
                await loop.run_in_executor(self.pool, lambda: poison.client.invoke(
                    "f", {"marker": CRASH_MARKER}))
            except sdk.CellcloudError as e:
                if e.status == 429:  # no capacity left on its shard (or the detector said no)
                    break
                crashes += 1
        # The dead agents: the exits this process observed among the cell's agent processes
        # (at least one per crash the client saw; waited for, bounded).
        assert self.sup is not None
        agent_comps = [c for c in self.sup.components
                       if c.kind == "agent" and c.name.startswith(f"{cell}-agent-")]

        def dead_now() -> list[str]:
            return sorted(c.name for c in agent_comps if c.proc is not None
                          and exited(c.proc.pid, c.proc.returncode))

        async def crashes_seen() -> bool:
            return len(dead_now()) >= min(crashes, len(agent_comps))

        await self.wait_for("the crashed agents' exits", crashes_seen)
        dead = dead_now()
        # The shards, recomputed from the sharder's inputs (the agents from region.json).
        with open(os.path.join(self.state_dir, "region.json")) as f:
            comps = json.load(f)["components"]
        agent_ids = sorted(n for n, c in comps.items()
                           if c["kind"] == "agent" and n.startswith(f"{cell}-agent-"))
        recomputed = recompute_shards(cell, sharding, k, agent_ids,
                                      [f"{t.account}/f" for t in members])
        st = await self.call(f"{cell}-frontend", "status")
        published = {key: tuple(v) for key, v in st["shards"]["functions"].items()}
        mismatched = sum(1 for key, v in recomputed.items()
                         if key in published and published[key] != v)
        shards = {key.split("/")[0]: v for key, v in recomputed.items()}
        others = [t for t in members if t is not poison]
        phase = f"poison-{cell}"
        await self.round(phase, others)
        await self.round(phase, others)
        measured = {t.account for t in others if not t.ok.get(phase)}
        degraded_failures = {t.account for t in others if t.ok.get(phase) and t.failed.get(phase)}
        predicted = set(lost_tenants({a: s for a, s in shards.items() if a != poison.account},
                                     dead))
        n = self.agents
        p = p_lost_plain(n, k) if sharding == "plain" else p_lost_shuffle(n, k)
        return {"cell": cell, "sharding": sharding, "k": k, "tenants": len(members),
                "poison_attempts": attempts, "agents_killed": len(dead),
                "agents_dead": dead,
                "measured_lost": len(measured), "predicted_lost": len(predicted),
                "sets_equal": measured == predicted,
                # a poison can only kill agents of its own shard
                "dead_within_poison_shard": set(dead) <= set(
                    recomputed[f"{poison.account}/f"]),
                "prediction_holds": measured == predicted and set(dead) <= set(
                    recomputed[f"{poison.account}/f"]),
                "shards_checked": sum(1 for key in recomputed if key in published),
                "published_shards_differing_from_recomputation": mismatched,
                "expected_lost": float(expected_lost_others(len(members), p)),
                "p_lost": str(p), "failures_after_retry_reached_live": len(degraded_failures)}

    async def run(self) -> dict[str, Any]:
        t0 = time.monotonic()
        try:
            await self.setup()
            await self.control_down()
            await self.kill_cell()
            self.results["poison"] = [await self.poison(i, s, k)
                                      for i, (s, k) in enumerate(self.plan, start=1)]
        finally:
            if self.sup is not None:
                await self.sup.stop()
            for t in self.tenants:
                t.client.close()
            self.pool.shutdown()
            disable_mtls()  # the harness's mTLS ends with the experiment, not with the process
        self.results["seconds"] = round(time.monotonic() - t0, 1)
        self.results["planted_bug"] = "sharder-ignores-shard" if self.plant_bug else None
        self.results["baseline_success"] = float(self.rate("baseline", self.tenants))
        return self.results


def table(r: dict[str, Any]) -> str:
    lines = ["| phase | measured | predicted / required |", "|---|---|---|"]
    lines.append(f"| baseline | {r['baseline_success']:.2%} success | 100 % |")
    cd = r["control_down"]
    lines.append(f"| control plane stopped {cd['seconds']:.0f} s ({cd['rounds']} rounds; router "
                 f"map stale={cd['router_map']['stale']}) | {cd['success']:.2%} success | 100 % |")
    ck = r["cell_killed"]
    lines.append(f"| {ck['cell']} killed: its {ck['tenants_in_cell']} tenants | "
                 f"{ck['success_in_cell']:.2%} success | may fail |")
    lines.append(f"| {ck['cell']} killed: every other tenant | {ck['success_other_cells']:.2%} "
                 f"success | 100 % |")
    lines += ["", "| poison cell | sharding | k | tenants | agents seen exiting | "
              "lost (measured) | lost (predicted: recomputed shards, observed exits) | "
              "same set | dead within the poison's shard | published shards ≠ recomputed | "
              "expected (C(n,k) / plain) | failures once a retry reached a live agent |",
              "|---" * 12 + "|"]
    plain = {p["k"]: p for p in r["poison"] if p["sharding"] == "plain"}
    for p in r["poison"]:
        lines.append(f"| {p['cell']} | {p['sharding']} | {p['k']} | {p['tenants']} | "
                     f"{p['agents_killed']} | {p['measured_lost']} | {p['predicted_lost']} | "
                     f"{'yes' if p['sets_equal'] else 'NO'} | "
                     f"{'yes' if p['dead_within_poison_shard'] else 'NO'} | "
                     f"{p['published_shards_differing_from_recomputation']} of "
                     f"{p['shards_checked']} | {p['expected_lost']:.2f} "
                     f"(p={p['p_lost']}) | {p['failures_after_retry_reached_live']} |")
    lines.append("")
    for p in r["poison"]:
        if p["sharding"] == "signature" and p["k"] in plain:
            pl = plain[p["k"]]
            ratio = (p["measured_lost"] / pl["measured_lost"]) if pl["measured_lost"] else 0.0
            lines.append(f"k={p['k']}: shuffle/plain lost tenants, measured "
                         f"{p['measured_lost']}/{pl['measured_lost']} = {ratio:.2f}; expected "
                         f"{p['expected_lost']:.2f}/{pl['expected_lost']:.2f} = "
                         f"{p['expected_lost'] / pl['expected_lost']:.2f}")
    lines.append(f"\nwhole experiment: {r['seconds']} s")
    return "\n".join(lines)


def main(state_dir: str, *, agents: int = 8, tenants: int = 250, control_down_s: float = 5.0,
         json_out: str | None = None, plan: list[tuple[str, int]] | None = None,
         plant_bug: bool = False) -> dict[str, Any]:
    os.makedirs(state_dir, exist_ok=True)
    exp = Experiment(state_dir, agents=agents, tenants=tenants, control_down_s=control_down_s,
                     plan=plan, plant_bug=plant_bug)
    results = asyncio.run(exp.run())
    print(table(results))
    if json_out:
        with open(json_out, "w") as f:
            json.dump(results, f, indent=2)
    return results
