"""The ``cellcloud`` command line."""

from __future__ import annotations

import asyncio
import json
import os
import select
import signal
import subprocess
import sys
import tarfile
import time
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from . import cli_progress, sdk
from .core import logtail as tail
from .core.limits import DEFAULT_LIMITS
from .microvm_cli import status_field as microvm_status_field
from .region import tenants as tenant_table
from .region.supervisor import Supervisor, default_state_dir, lock_holder, run_foreground

app = typer.Typer(
    help="cellcloud: unmodified AWS Lambda functions, in cells, on your machines.",
    no_args_is_help=True,
    add_completion=False,
)
console = Console()
err = Console(stderr=True)

StateDir = Annotated[
    str | None,
    typer.Option(
        "--state-dir", help="Region state directory (default $CELLCLOUD_HOME or ~/.cellcloud)"
    ),
]


def _client(state_dir: str | None) -> sdk.Client:
    try:
        return sdk.Client.from_region(state_dir)
    except sdk.CellcloudError as e:
        err.print(f"[red]{e.message}[/red]")
        raise typer.Exit(2) from None


def _fail(e: sdk.CellcloudError) -> None:
    err.print(f"[red]{e.type}[/red]: {e.message}")
    raise typer.Exit(1)


@app.command()
def up(
    state_dir: StateDir = None,
    cells: Annotated[int, typer.Option(help="Independent cells")] = 1,
    agents_per_cell: Annotated[int, typer.Option(help="Host agents per cell")] = 2,
    host: Annotated[str, typer.Option(help="Address the router listens on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Router port (0: any free port)")] = 9009,
    envs_per_agent_max: Annotated[int, typer.Option(help="Environments per agent")] = 1000,
    detach: Annotated[bool, typer.Option("--detach", "-d", help="Run in the background")] = False,
    insecure: Annotated[bool, typer.Option(
        "--insecure", help="Development only: plain-text internal links (default: mTLS)")] = False,
    allow_unlimited: Annotated[bool, typer.Option(
        "--allow-unlimited", help="Let agents start on a host without cgroups: environments "
        "then run without memory, pids or CPU limits (default: agents refuse)")] = False,
    network: Annotated[str, typer.Option(
        help="Environments' outbound network: egress (an interface under the region's policy: "
        "no host, region or east-west traffic; docs/design.md) or none (loopback only); "
        "default: egress, none with --backend microvm (where egress gives each guest a "
        "network device, and such environments boot cold: docs/microvm.md)")
    ] = "",
    net_pool: Annotated[str, typer.Option(
        help="Environments' address pool (at most a /16, outside RFC 1918); each agent takes "
        "a /22 of it")] = "100.64.0.0/16",
    metrics_functions_per_account_max: Annotated[int | None, typer.Option(
        min=0, help="Functions of one account with series of their own in /metrics (default "
        "250, core/limits.py); the rest count under function=\"__other__\"")] = None,
    otlp_endpoint: Annotated[str | None, typer.Option(
        help="Export tracing spans over OTLP/HTTP to this base URL (default: "
        "$OTEL_EXPORTER_OTLP_ENDPOINT; neither: off)")] = None,
    backend: Annotated[str, typer.Option(
        help="Execution environments: jail (namespaces, cgroups, seccomp) or microvm (each in "
        "a QEMU guest with its own kernel, KVM where a probe VM boots, TCG otherwise; built-in "
        "Python runtime only; --network none by default, egress gives guests a network "
        "device; docs/microvm.md)")
    ] = "jail",
    microvm_snapshots: Annotated[bool, typer.Option(
        "--microvm-snapshots", help="With --backend microvm: each agent snapshots its guest "
        "at its waiting point at start (cached by content) and starts environments of the "
        "snapshotted memory sizes from it, with a fresh seed and clock each; a snapshot that "
        "fails its digest or QEMU's load boots cold (docs/microvm.md)")] = False,
    microvm_snapshot_memory_mib: Annotated[list[int] | None, typer.Option(
        "--microvm-snapshot-memory-mib", help="With --microvm-snapshots: a guest memory size "
        f"(MiB) to snapshot (repeatable, at most {DEFAULT_LIMITS.microvm_snapshot_sizes_max}; "
        f"default: the smallest guest, {DEFAULT_LIMITS.microvm_guest_memory_mib_min}); other "
        "sizes boot cold")] = None,
    ready_fd: Annotated[int | None, typer.Option(hidden=True)] = None,
    store_colony: Annotated[str, typer.Option(
        help="A Physalia store colony file (cellcloud store up): the web console shows its "
        "nodes' and cells' health")] = "",
    storage_servers: Annotated[int, typer.Option(
        min=0, help="Storage servers of replicated volumes (docs/volumes.md): CreateVolume "
        "replicates new volumes on them, each volume's configuration in a cell of "
        "--store-colony (required with them); 0: volumes are local files. At least "
        "volume_replicas + 1 (4) for a lost server's replicas to be rebuilt elsewhere")] = 0,
) -> None:
    """Start a region: router, cell frontends and host agents, supervised."""
    if insecure:
        err.print("[bold red]WARNING[/bold red]: --insecure: internal links are plain text; "
                  "never run a region like this outside development.")
    sd = os.path.abspath(state_dir or default_state_dir())
    os.makedirs(sd, exist_ok=True)
    existing = _running_region(sd, starting=True)
    if existing:
        err.print(
            f"A region is already running from {sd} at {existing['endpoint']} "
            f"(pid {existing['supervisor_pid']}); stop it with `cellcloud down`."
        )
        raise typer.Exit(1)
    if backend not in ("jail", "microvm"):
        err.print(f"--backend {backend!r}: jail or microvm")
        raise typer.Exit(2)
    network = network or ("none" if backend == "microvm" else "egress")
    if network not in ("egress", "none"):
        err.print(f"--network {network!r}: egress or none")
        raise typer.Exit(2)
    if (microvm_snapshots or microvm_snapshot_memory_mib) and backend != "microvm":
        err.print("--microvm-snapshots: only with --backend microvm")
        raise typer.Exit(2)
    if microvm_snapshot_memory_mib and not microvm_snapshots:
        err.print("--microvm-snapshot-memory-mib: only with --microvm-snapshots")
        raise typer.Exit(2)
    if len(microvm_snapshot_memory_mib or ()) > DEFAULT_LIMITS.microvm_snapshot_sizes_max:
        err.print("--microvm-snapshot-memory-mib: at most "
                  f"{DEFAULT_LIMITS.microvm_snapshot_sizes_max} sizes")
        raise typer.Exit(2)
    snap_args = [*(["--microvm-snapshots"] if microvm_snapshots else []),
                 *[a for m in microvm_snapshot_memory_mib or ()
                   for a in ("--microvm-snapshot-memory-mib", str(m))]]
    if storage_servers and not store_colony:
        err.print("--storage-servers: replicated volumes keep their configuration in a store "
                  "colony; give --store-colony (cellcloud store up)")
        raise typer.Exit(2)
    if detach:
        _detach(sd, cells, agents_per_cell, host, port, envs_per_agent_max, insecure,
                allow_unlimited, network, net_pool, metrics_functions_per_account_max,
                otlp_endpoint, store_colony=store_colony, backend=backend,
                storage_servers=storage_servers, snap_args=snap_args)
        return
    agent_args = ["--network", network, "--net-pool", net_pool, "--backend", backend,
                  *snap_args]
    # Spans go out from the router and the frontends (the agents carry theirs back).
    otlp = ["--otlp-endpoint", otlp_endpoint] if otlp_endpoint else []
    if allow_unlimited:
        agent_args.append("--allow-unlimited")
    sup = Supervisor(
        sd,
        cells=cells,
        agents_per_cell=agents_per_cell,
        host=host,
        port=port,
        envs_per_agent_max=envs_per_agent_max,
        insecure=insecure,
        extra_args={"agent": agent_args,
                    # no function's allow-list may name the pool (core/vpc.py)
                    "frontend": ["--net-internal", net_pool, *otlp,
                                 *(["--env-create-timeout-ms",
                                    str(DEFAULT_LIMITS.microvm_create_timeout_ms)]
                                   if backend == "microvm" else []),
                                 *(["--metrics-functions-per-account-max",
                                    str(metrics_functions_per_account_max)]
                                   if metrics_functions_per_account_max is not None else [])],
                    "router": [*otlp, *(["--store-colony", os.path.abspath(store_colony)]
                                        if store_colony else [])]},
        storage_servers=storage_servers, store_colony=store_colony,
    )

    def ready(doc: dict[str, Any]) -> None:
        if ready_fd is not None:
            os.write(ready_fd, (json.dumps(doc) + "\n").encode())
            os.close(ready_fd)
        else:
            console.print(
                f"cellcloud region [bold]{doc['region']}[/bold] is up at "
                f"[bold]{doc['endpoint']}[/bold] ({cells} cell(s), "
                f"{cells * agents_per_cell} agents); Ctrl-C stops it."
            )

    try:
        asyncio.run(run_foreground(sup, ready))
    except RuntimeError as e:
        err.print(f"[red]region failed to start[/red]: {e}")
        raise typer.Exit(1) from None


def _running_region(state_dir: str, starting: bool = False) -> dict[str, Any] | None:
    """The running region's ``region.json``, or None. The supervisor's lock on the state
    directory is the truth (the kernel drops it when the supervisor dies, however it dies);
    ``region.json`` only says where the region listens. A region still starting holds the lock
    before it writes ``region.json``: with ``starting``, the document then has only the
    supervisor's pid; without, a starting region is not running yet."""
    pid = lock_holder(state_dir)
    if pid is None:
        return None
    try:
        with open(os.path.join(state_dir, "region.json")) as f:
            doc: dict[str, Any] = json.load(f)
    except (FileNotFoundError, ValueError):
        doc = {}
    if doc.get("supervisor_pid") != pid:
        if not starting:
            return None
        doc = {"supervisor_pid": pid, "endpoint": "(starting)", "starting": True}
    return doc


def _detach(
    sd: str, cells: int, agents_per_cell: int, host: str, port: int, envs_per_agent_max: int,
    insecure: bool = False, allow_unlimited: bool = False, network: str = "egress",
    net_pool: str = "100.64.0.0/16", metrics_functions_per_account_max: int | None = None,
    otlp_endpoint: str | None = None, store_colony: str = "", backend: str = "jail",
    storage_servers: int = 0, snap_args: list[str] | None = None,
) -> None:
    r, w = os.pipe()
    logs = os.path.join(sd, "logs")
    os.makedirs(logs, exist_ok=True)
    with open(os.path.join(logs, "supervisor.log"), "ab") as logf:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "cellcloud",
                "up",
                "--state-dir",
                sd,
                "--cells",
                str(cells),
                "--agents-per-cell",
                str(agents_per_cell),
                "--host",
                host,
                "--port",
                str(port),
                "--envs-per-agent-max",
                str(envs_per_agent_max),
                "--ready-fd",
                str(w),
                *(["--insecure"] if insecure else []),
                *(["--allow-unlimited"] if allow_unlimited else []),
                "--network", network, "--net-pool", net_pool, "--backend", backend,
                *(snap_args or []),
                *(["--metrics-functions-per-account-max", str(metrics_functions_per_account_max)]
                  if metrics_functions_per_account_max is not None else []),
                *(["--store-colony", os.path.abspath(store_colony)] if store_colony else []),
                *(["--otlp-endpoint", otlp_endpoint] if otlp_endpoint else []),
                *(["--storage-servers", str(storage_servers)] if storage_servers else []),
            ],
            pass_fds=(w,),
            stdin=subprocess.DEVNULL,
            stdout=logf,
            stderr=logf,
            start_new_session=True,
        )
    os.close(w)
    with os.fdopen(r, "rb") as pipe, cli_progress.waiting("starting the region"):
        line = pipe.readline()  # EOF if the supervisor dies first: a real wait, not a guess
    if not line:
        proc.wait()
        err.print(f"[red]region failed to start[/red]; see {logs}/supervisor.log")
        raise typer.Exit(1)
    doc = json.loads(line)
    console.print(
        f"cellcloud region [bold]{doc['region']}[/bold] is up at "
        f"[bold]{doc['endpoint']}[/bold] (pid {doc['supervisor_pid']}, state {sd})."
    )
    console.print("Stop it with: [bold]cellcloud down[/bold]")


@app.command()
def down(
    state_dir: StateDir = None,
    timeout_s: Annotated[float, typer.Option(help="Seconds to wait")] = 30.0,
) -> None:
    """Stop the region started from this state directory."""
    sd = os.path.abspath(state_dir or default_state_dir())
    doc = _running_region(sd, starting=True)
    if doc is None:
        console.print("No region is running.")
        return
    pid = int(doc["supervisor_pid"])
    pidfd = os.pidfd_open(pid)
    try:
        os.kill(pid, signal.SIGTERM)
        with cli_progress.waiting("stopping the region"):
            ready, _, _ = select.select([pidfd], [], [], timeout_s)
    finally:
        os.close(pidfd)
    if not ready:
        err.print(f"[red]the region (pid {pid}) did not stop within {timeout_s}s[/red]")
        raise typer.Exit(1)
    console.print("Region stopped.")


@app.command()
def deploy(
    name: Annotated[str, typer.Argument(help="Function name")],
    path: Annotated[str, typer.Argument(help="A directory or a .zip file")],
    handler: Annotated[str, typer.Option(help="module.function")] = "app.handler",
    runtime: Annotated[str, typer.Option()] = "python3.11",
    memory: Annotated[int, typer.Option(help="MB, 128-10240")] = 128,
    timeout: Annotated[int, typer.Option(help="seconds, 1-900")] = 3,
    env: Annotated[list[str] | None, typer.Option(help="KEY=VALUE, repeatable")] = None,
    state_dir: StateDir = None,
) -> None:
    """Create a function, or update its code and configuration if it exists."""
    if os.path.isdir(path):
        data = sdk.zip_directory(path)
    else:
        with open(path, "rb") as f:
            data = f.read()
    variables = dict(e.split("=", 1) for e in (env or []))
    client = _client(state_dir)
    try:
        try:
            client.get_function(name)
            exists = True
        except sdk.CellcloudError as e:
            if e.type != "ResourceNotFoundException":
                raise
            exists = False
        # A bar of the bundle's upload, then a spinner while the cell stores and checks it
        # (on a terminal only: cli_progress.py).
        with cli_progress.transfer(f"uploading {name}", None) as sent:
            if exists:
                client.update_function_code(name, data, progress=sent)
            else:
                cfg = client.create_function(name, data, handler, runtime=runtime,
                                             memory_mb=memory, timeout_s=timeout,
                                             environment=variables, progress=sent)
        if exists:
            cfg = client.update_function_configuration(
                name,
                Handler=handler,
                Runtime=runtime,
                MemorySize=memory,
                Timeout=timeout,
                Environment={"Variables": variables},
            )
            verb = "updated"
        else:
            verb = "created"
    except sdk.CellcloudError as e:
        _fail(e)
        return
    console.print(
        f"{verb} [bold]{cfg['FunctionName']}[/bold] ({cfg['FunctionArn']}, "
        f"{cfg['CodeSize']} bytes, sha256 {cfg['CodeSha256']})"
    )


@app.command()
def invoke(
    name: Annotated[str, typer.Argument()],
    payload: Annotated[str, typer.Option("--payload", "-p", help="JSON event")] = "{}",
    log: Annotated[bool, typer.Option("--log", help="Show the log tail")] = False,
    state_dir: StateDir = None,
) -> None:
    """Invoke a function synchronously and print its result."""
    client = _client(state_dir)
    try:
        res = client.invoke(name, raw=payload.encode(), log_tail=log)
    except sdk.CellcloudError as e:
        _fail(e)
        return
    if log and res.log_tail:
        err.print(res.log_tail.rstrip())
    sys.stdout.write(res.payload.decode(errors="replace") + "\n")
    if res.function_error:
        raise typer.Exit(1)


@app.command("ls")
def ls(state_dir: StateDir = None) -> None:
    """List functions."""
    client = _client(state_dir)
    try:
        fns = client.list_functions()
    except sdk.CellcloudError as e:
        _fail(e)
        return
    table = Table("name", "runtime", "handler", "memory", "timeout", "size", "modified")
    for f in fns:
        table.add_row(
            f["FunctionName"],
            f["Runtime"],
            f["Handler"],
            f"{f['MemorySize']} MB",
            f"{f['Timeout']} s",
            str(f["CodeSize"]),
            f["LastModified"],
        )
    console.print(table)


@app.command()
def rm(name: Annotated[str, typer.Argument()], state_dir: StateDir = None) -> None:
    """Delete a function."""
    try:
        _client(state_dir).delete_function(name)
    except sdk.CellcloudError as e:
        _fail(e)
    console.print(f"deleted {name}")


@app.command()
def logs(
    name: Annotated[str, typer.Argument()],
    follow: Annotated[bool, typer.Option("--follow", "-f",
                                         help="Keep polling for new events")] = False,
    since: Annotated[str, typer.Option(help="How far back to start: 30s, 10m, 2h, 1d")] = "10m",
    filter_pattern: Annotated[str, typer.Option("--filter",
                                                help="A CloudWatch Logs filter pattern")] = "",
    interval: Annotated[float, typer.Option(help="Seconds between polls with --follow")] = 5.0,
    limit: Annotated[int, typer.Option(help="Without --follow: only the newest N events "
                                            "(0: all)")] = 0,
    state_dir: StateDir = None,
) -> None:
    """Tail a function's log group, as `aws logs tail` does: FilterLogEvents from --since,
    and with --follow, again every --interval seconds from the newest event seen, each event
    printed once (de-duplicated by eventId)."""
    try:
        since_ms = tail.parse_since(since)
    except ValueError as e:
        err.print(f"[red]{e}[/red]")
        raise typer.Exit(2) from None
    client = _client(state_dir)
    try:
        group = client.get_function(name)["Configuration"]["LoggingConfig"]["LogGroup"]
        follower = tail.Follower(int(time.time() * 1000) - since_ms)
        while True:
            try:
                events = client.filter_log_events(
                    group, startTime=follower.start_ms, interleaved=True,
                    **({"filterPattern": filter_pattern} if filter_pattern else {}))
            except sdk.CellcloudError as e:
                if e.type != "ResourceNotFoundException" or not follow:
                    raise
                events = []  # no line yet: the group appears with the first one
            fresh = follower.new(events)
            if limit > 0 and not follow:
                fresh = fresh[-limit:]
            for ev in fresh:
                ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ev["timestamp"] / 1000))
                sys.stdout.write(f"{ts}.{ev['timestamp'] % 1000:03d} {ev['logStreamName']} "
                                 f"{ev['message'].rstrip(chr(10))}\n")
            sys.stdout.flush()
            if not follow:
                return
            time.sleep(interval)  # the poll period (aws logs tail --follow: 5 s)
    except sdk.CellcloudError as e:
        _fail(e)
    except KeyboardInterrupt:
        return


@app.command()
def status(
    state_dir: StateDir = None, as_json: Annotated[bool, typer.Option("--json")] = False
) -> None:
    """Show the region's processes, cells, agents and environments."""
    sd = os.path.abspath(state_dir or default_state_dir())
    region = _running_region(sd)
    if region is None:
        console.print("No region is running.")
        raise typer.Exit(1)
    try:
        st = _client(sd).status()
    except sdk.CellcloudError as e:
        _fail(e)
        return
    if as_json:
        # metrics_url: GET it signed by a tenant (its series) or with the operator token (all).
        metrics_url = str(region["endpoint"]).rstrip("/") + "/metrics"
        # microvm: this host's acceleration probe as cached (None: `cellcloud microvm probe`
        # has not run); the backend itself is not wired in yet (docs/microvm.md).
        sys.stdout.write(json.dumps({"region": region, "status": st, "metrics_url": metrics_url,
                                     "microvm": microvm_status_field(sd)}, indent=2) + "\n")
        return
    console.print(
        f"region [bold]{region['region']}[/bold] at {region['endpoint']}, "
        f"supervisor pid {region['supervisor_pid']}"
    )
    procs = Table("process", "pid", "address", "restarts", title="processes")
    for name, c in sorted(region.get("components", {}).items()):
        procs.add_row(name, str(c["pid"]), f"{c['host']}:{c['port']}", str(c["restarts"]))
    console.print(procs)
    agents = Table(
        "cell",
        "agent",
        "backend",
        "seccomp",
        "envs",
        "busy",
        "invocations",
        "memory",
        title="cells and agents",
    )
    envs = Table(
        "agent",
        "env",
        "function",
        "pid",
        "uid",
        "busy",
        "invocations",
        "memory",
        "USS",
        "cpu",
        title="environments",
    )
    for cell_id, cell in sorted(st["cells"].items()):
        if "error" in cell:
            agents.add_row(cell_id, "-", "-", "-", "-", "-", "-", f"[red]{cell['error']}[/red]")
            continue
        for agent_id, a in sorted(cell["agents"].items()):
            if "error" in a:
                agents.add_row(
                    cell_id, agent_id, "-", "-", "-", "-", "-", f"[red]{a['error']}[/red]"
                )
                continue
            mem = sum(env["memory_bytes"] for env in a["envs"])
            backend_label = a["backend"]
            snaps = a.get("microvm_snapshots")
            if isinstance(snaps, dict):
                # which guest memory sizes restore from a snapshot; the rest boot cold
                sizes = ", ".join(map(str, snaps.get("memory_mib") or [])) or "no"
                backend_label += (f" ({a.get('accel', '?')}; restores {sizes} MiB guests, "
                                  f"{snaps.get('version_snapshots', 0)} SnapStart versions)")
            agents.add_row(
                cell_id,
                agent_id,
                backend_label,
                "on" if a["seccomp"] == 2 else "OFF",
                str(len(a["envs"])),
                str(sum(env["busy"] for env in a["envs"])),
                str(a["counters"]["invocations"]),
                f"{mem / 2**20:.1f} MiB",
            )
            for env in a["envs"]:
                envs.add_row(
                    agent_id,
                    env["env_id"],
                    env["function"],
                    str(env["pid"]),
                    str(env["uid"]),
                    "yes" if env["busy"] else "",
                    str(env["invocations"]),
                    f"{env['memory_bytes'] / 2**20:.1f} MiB",
                    f"{env.get('uss_bytes', 0) / 2**20:.1f} MiB",
                    f"{env['cpu_ns'] / 1e6:.0f} ms",
                )
    console.print(agents)
    console.print(envs)
    console.print(_disks_table(st))
    console.print(_protocols_line(st))
    mv = microvm_status_field(sd)
    console.print("microVM acceleration: " + (f"{mv['accel']} ({mv['reason']})" if mv else
                                              "not probed (cellcloud microvm probe)"))


def _protocols_line(st: dict[str, Any]) -> str:
    """Internal peers refused for a protocol version outside the window (docs/design.md
    #protocol-versions), by process, with the last refusal's message."""
    procs: list[tuple[str, Any]] = [("router", (st.get("router") or {}).get("protocols"))]
    for cell_id, cell in sorted(st.get("cells", {}).items()):
        procs.append((f"{cell_id} frontend", cell.get("protocols")))
        procs += [(agent_id, a.get("protocols"))
                  for agent_id, a in sorted((cell.get("agents") or {}).items())]
    refused: list[str] = []
    for who, doc in procs:
        for name, p in sorted((doc or {}).items()):
            n = sum((p.get("refused") or {}).values()) if isinstance(p, dict) else 0
            if n:
                refused.append(escape(f"{who}: {n} {name} peer(s) refused "
                                      f"({p.get('last_refusal')})"))
    if not refused:
        return "internal protocol versions: no peer refused"
    return "[red]internal protocol versions[/red]: " + "; ".join(refused)


def _disks_table(st: dict[str, Any]) -> Table:
    """Free space where each cell keeps its functions and bundles, and each agent its
    unpacked bundles (``disk`` in status --json: free_bytes, total_bytes)."""
    disks = Table("cell", "process", "free", "total", "used", "reserve", title="state disks")
    for cell_id, cell in sorted(st["cells"].items()):
        rows = [("frontend", cell.get("disk"))]
        rows += [(agent_id, a.get("disk")) for agent_id, a in sorted(cell.get("agents", {}).items())]
        for who, d in rows:
            if not d:
                disks.add_row(cell_id, who, "-", "-", "-", "-")
                continue
            free, total = int(d["free_bytes"]), int(d["total_bytes"])
            used = f"{100 * (total - free) / total:.0f} %" if total else "-"
            full = free < 2 * int(d.get("reserve_bytes", 0) or 2**20)
            disks.add_row(cell_id, who, f"[red]{free / 2**20:.1f} MiB[/red]" if full
                          else f"{free / 2**20:.1f} MiB", f"{total / 2**20:.1f} MiB", used,
                          f"{int(d['reserve_bytes']) / 2**20:.1f} MiB" if "reserve_bytes" in d
                          else "-")
    return disks


tenant_app = typer.Typer(
    help="Tenants: an account id and a SigV4 access key pair each.", no_args_is_help=True
)
app.add_typer(tenant_app, name="tenant")


@tenant_app.command("create")
def tenant_create(
    name: Annotated[str, typer.Argument(help="Tenant name")], state_dir: StateDir = None
) -> None:
    """Create a tenant; prints its account id, access key id and secret (shown only here)."""
    sd = os.path.abspath(state_dir or default_state_dir())
    try:
        t = tenant_table.create_tenant(sd, name)
    except ValueError as e:
        err.print(f"[red]{e}[/red]")
        raise typer.Exit(1) from None
    sys.stdout.write(
        f"name                  {t['name']}\n"
        f"account_id            {t['account_id']}\n"
        f"aws_access_key_id     {t['access_key_id']}\n"
        f"aws_secret_access_key {t['secret_access_key']}\n"
    )


@tenant_app.command("ls")
def tenant_ls(state_dir: StateDir = None) -> None:
    """List tenants (never their secrets)."""
    sd = os.path.abspath(state_dir or default_state_dir())
    table = Table("name", "account id", "access key id")
    for t in tenant_table.list_tenants(sd):
        table.add_row(t["name"], t["account_id"], t.get("access_key_id", "-"))
    console.print(table)


image_app = typer.Typer(
    help="Container images in the region's registry (ECR-compatible), without docker.",
    no_args_is_help=True)
app.add_typer(image_app, name="image")


def _registry_client(state_dir: str | None) -> Any:
    from .registry.client import RegistryClient

    c = _client(state_dir)
    return RegistryClient(c.endpoint, c.access_key_id, c.secret_access_key, region=c.region)


@image_app.command("push")
def image_push(
    source: Annotated[str, typer.Argument(help="An OCI image layout directory or OCI archive")],
    ref: Annotated[str, typer.Argument(help="NAME:TAG (the repository is created if needed)")],
    state_dir: StateDir = None,
) -> None:
    """Push an image; prints its repository URI and digest."""
    from .registry.client import RegistryClientError
    from .registry.core import RegistryError

    name, sep, tag = ref.rpartition(":")
    if not sep or "/" in tag:
        name, tag = ref, "latest"
    rc = _registry_client(state_dir)
    try:
        with cli_progress.blobs("pushing") as rc.progress:
            out = rc.push(source, name, tag)
    except (RegistryClientError, RegistryError, OSError, ValueError, tarfile.TarError) as e:
        err.print(f"[red]{e}[/red]")
        raise typer.Exit(1) from None
    finally:
        rc.close()
    sys.stdout.write(f"{out['repositoryUri']}:{out['tag']} {out['digest']} "
                     f"({out['blobs_sent']} blobs sent)\n")


@image_app.command("ls")
def image_ls(state_dir: StateDir = None,
             as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """List the tenant's images: repository URI, tags, digest, size, pushed."""
    from .registry.client import RegistryClientError

    rc = _registry_client(state_dir)
    try:
        images = rc.images()
    except RegistryClientError as e:
        err.print(f"[red]{e}[/red]")
        raise typer.Exit(1) from None
    finally:
        rc.close()
    if as_json:
        sys.stdout.write(json.dumps(images, indent=2) + "\n")
        return
    table = Table("repository", "tags", "digest", "size", "pushed")
    for d in images:
        table.add_row(d["repositoryUri"], ",".join(d.get("imageTags", [])) or "-",
                      d["imageDigest"][:19], str(d["imageSizeInBytes"]),
                      time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(d["imagePushedAt"])))
    console.print(table)


@app.command()
def env(
    state_dir: StateDir = None,
    tenant: Annotated[str | None, typer.Option(help="Tenant name (default: the first)")] = None,
) -> None:
    """Print `export` lines that point `aws` and boto3 at this region:
    eval "$(cellcloud env)"."""
    import shlex

    sd = os.path.abspath(state_dir or default_state_dir())
    region = _running_region(sd)
    if region is None:
        err.print("No region is running; start one with `cellcloud up`.")
        raise typer.Exit(1)
    rows = tenant_table.list_tenants(sd)
    chosen = [t for t in rows if tenant is None or t["name"] == tenant][:1]
    if not chosen:
        err.print(f"[red]no tenant named {tenant!r}[/red]")
        raise typer.Exit(1)
    t = chosen[0]
    values = {
        "AWS_ENDPOINT_URL": region["endpoint"],
        "AWS_REGION": region["region"],
        "AWS_DEFAULT_REGION": region["region"],
        "AWS_ACCESS_KEY_ID": t["access_key_id"],
        "AWS_SECRET_ACCESS_KEY": t["secret_access_key"],
    }
    for k, v in values.items():
        sys.stdout.write(f"export {k}={shlex.quote(str(v))}\n")
    sys.stdout.write("unset AWS_SESSION_TOKEN AWS_PROFILE\n")


@app.command()
def migrate(
    tenant: Annotated[str, typer.Argument(help="Tenant name or account id")],
    to: Annotated[str, typer.Option("--to", help="Target cell id")],
    state_dir: StateDir = None,
) -> None:
    """Move a tenant to another cell: clone, flip the map, drain, forget."""
    from .control import operate

    with cli_progress.waiting(f"migrating {tenant} to {to}"):
        done = operate.migrate(state_dir or default_state_dir(), tenant, to)
    console.print_json(data=done)


experiment_app = typer.Typer(help="Experiments that run a region on this machine.")
app.add_typer(experiment_app, name="experiment")


@experiment_app.command("blast-radius")
def blast_radius(
    state_dir: Annotated[str, typer.Option(help="A fresh directory for the region")] = "",
    agents_per_cell: Annotated[int, typer.Option(help="n")] = 8,
    tenants: Annotated[int, typer.Option()] = 250,
    control_down_s: Annotated[float, typer.Option(
        help="Seconds the control plane is stopped (static stability; 600 for the long run)")] = 5,
    json_out: Annotated[str | None, typer.Option(help="Write the results here")] = None,
    plant_bug: Annotated[bool, typer.Option(
        "--plant-bug", help="Frontends ignore the shard size (the prediction must fail)")]
    = False,
) -> None:
    """Kill a cell, poison a shard, stop the control plane; print measured vs predicted (the
    prediction recomputed from outside). Exits 1 when a prediction does not hold."""
    import tempfile

    from .experiment import blast

    r = blast.main(state_dir or tempfile.mkdtemp(prefix="cellcloud-blast-"),
                   agents=agents_per_cell, tenants=tenants, control_down_s=control_down_s,
                   json_out=json_out, plant_bug=plant_bug)
    if not all(p["prediction_holds"] for p in r["poison"]):
        raise typer.Exit(1)


def _mount_subcommands() -> None:
    from .store.cli import app as store_app

    app.add_typer(store_app, name="store", help="The configuration store (Physalia-style colony).")
    from .attest_cli import app as attest_app

    app.add_typer(attest_app, name="attest", help="Attestation: get and verify documents.")
    from .region import serve_cli

    serve_cli.mount(app)
    from .region.rollout_cli import rollout

    app.command("rollout")(rollout)
    from .top_cli import top

    app.command("top")(top)
    from .microvm_cli import app as microvm_app

    app.add_typer(microvm_app, name="microvm")
    from .pod_api import api_cmd
    from .pod_cli import app as pod_app

    pod_app.command("api")(api_cmd)
    app.add_typer(pod_app, name="pod")
    from .volume_cli import volume_app
    from .volumes.cli import app as storage_app

    app.add_typer(storage_app, name="storage", help="Storage servers of replicated volumes.")
    app.add_typer(volume_app, name="volume", help="Volumes attached on this host.")


_mount_subcommands()


# -- async: the cell's queues (dead-letter and destination queues) and the chaos experiment ----
queue_app = typer.Typer(help="The cell's queues (SQS API): dead-letter and destination queues.")
app.add_typer(queue_app, name="queue")


def _sqs(state_dir: str | None) -> tuple[Any, dict[str, Any]]:
    import boto3
    from botocore.config import Config

    doc = _running_region(state_dir or default_state_dir())
    if doc is None:
        console.print("[red]No region is running[/red] (start one with: cellcloud up)")
        raise typer.Exit(1)
    kw = dict(endpoint_url=doc["endpoint"], region_name=doc["region"],
              aws_access_key_id=doc["access_key_id"],
              aws_secret_access_key=doc["secret_access_key"],
              config=Config(retries={"mode": "standard", "total_max_attempts": 3},
                            read_timeout=30, connect_timeout=5))
    return boto3.client("sqs", **kw), {**doc, "lambda": boto3.client("lambda", **kw)}


@queue_app.command("ls")
def queue_ls(state_dir: StateDir = None) -> None:
    """List the queues with their message counts."""
    sqs, _ = _sqs(state_dir)
    table = Table("queue", "visible", "in flight", "arn")
    for url in sqs.list_queues().get("QueueUrls", []):
        a = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["All"])["Attributes"]
        table.add_row(url.rsplit("/", 1)[1], a["ApproximateNumberOfMessages"],
                      a["ApproximateNumberOfMessagesNotVisible"], a["QueueArn"])
    console.print(table)


@queue_app.command("inspect")
def queue_inspect(
    name: Annotated[str, typer.Argument(help="Queue name")],
    limit: Annotated[int, typer.Option(help="Messages to show (1-10)")] = 10,
    state_dir: StateDir = None,
) -> None:
    """Show a queue's attributes and peek at its messages (they stay in the queue)."""
    sqs, _ = _sqs(state_dir)
    url = sqs.get_queue_url(QueueName=name)["QueueUrl"]
    attrs = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["All"])["Attributes"]
    msgs = sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=max(1, min(10, limit)),
                               VisibilityTimeout=0).get("Messages", [])
    console.print_json(data={"attributes": attrs, "messages": [
        {"MessageId": m["MessageId"], "Body": _maybe_json(m["Body"])} for m in msgs]})


def _maybe_json(raw: str) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        return raw


@queue_app.command("replay")
def queue_replay(
    name: Annotated[str, typer.Argument(help="A dead-letter queue of destination records")],
    limit: Annotated[int, typer.Option(help="Most messages to replay")] = 1000,
    state_dir: StateDir = None,
) -> None:
    """Invoke each record's function again (async) with its original payload, then delete the
    record: a dead-letter queue drained back into its functions."""
    sqs, doc = _sqs(state_dir)
    lam = doc["lambda"]
    url = sqs.get_queue_url(QueueName=name)["QueueUrl"]
    replayed = skipped = 0
    while replayed + skipped < limit:
        msgs = sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10,
                                   VisibilityTimeout=60).get("Messages", [])
        if not msgs:
            break
        for m in msgs:
            rec = _maybe_json(m["Body"])
            ctx = rec.get("requestContext", {}) if isinstance(rec, dict) else {}
            if "functionArn" not in ctx:
                skipped += 1  # not a destination record: left in the queue
                continue
            fn = ctx["functionArn"]
            if fn.endswith(":$LATEST"):
                fn = fn.rsplit(":", 1)[0]
            lam.invoke(FunctionName=fn, InvocationType="Event",
                       Payload=json.dumps(rec.get("requestPayload")).encode())
            sqs.delete_message(QueueUrl=url, ReceiptHandle=m["ReceiptHandle"])
            replayed += 1
    console.print(f"replayed {replayed} events from {name}; {skipped} messages skipped")


@queue_app.command("purge")
def queue_purge(name: Annotated[str, typer.Argument(help="Queue name")],
                state_dir: StateDir = None) -> None:
    """Delete every message in a queue."""
    sqs, _ = _sqs(state_dir)
    sqs.purge_queue(QueueUrl=sqs.get_queue_url(QueueName=name)["QueueUrl"])
    console.print(f"purged {name}")


def _experiment_group() -> typer.Typer:
    for group in app.registered_groups:
        if group.name == "experiment" and group.typer_instance is not None:
            return group.typer_instance
    group_app = typer.Typer(help="Experiments that run a region on this machine.")
    app.add_typer(group_app, name="experiment")
    return group_app


@_experiment_group().command("chaos")
def chaos(
    duration: Annotated[float, typer.Option(help="Seconds of load and faults")] = 60,
    fault_interval: Annotated[float, typer.Option(help="Mean seconds between kills")] = 3,
    seed: Annotated[int, typer.Option(help="Seeds the faults and the load")] = 1,
    targets: Annotated[str, typer.Option(help="Comma-separated: router,frontend,dispatcher,"
                                              "agent,zygote,control,environment")] =
    "router,frontend,dispatcher,agent,zygote,control,environment",
    plant_bug: Annotated[bool, typer.Option(
        "--plant-bug", help="Acknowledge async events before the durable write (must lose)")]
    = False,
    state_dir: Annotated[str, typer.Option(help="A fresh directory for the region")] = "",
    json_out: Annotated[str | None, typer.Option(help="Write the results here")] = None,
) -> None:
    """Mixed sync/async load while components are SIGKILLed; counts lost and hung work."""
    from .experiment import chaos as chaos_mod

    result = chaos_mod.main(state_dir or chaos_mod.new_state_dir(), duration_s=duration,
                            fault_interval_s=fault_interval, seed=seed,
                            targets=tuple(t for t in targets.split(",") if t),
                            plant_bug=plant_bug, json_out=json_out)
    console.print_json(data=result)
    if result["async"]["lost"] or result["sync"]["hung"]:
        raise typer.Exit(1)


def main() -> None:
    app()
