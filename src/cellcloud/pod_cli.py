"""``cellcloud pod``: Kubernetes Pod manifests run as Fargate-style tasks (issue #17,
docs/fargate.md "Pods").

The mapping is ``core/pod.py``'s; this is the shell, a client of the region's **public** ECS
and CloudWatch Logs APIs (botocore, SigV4 with the tenant's keys), as any user's program could
be: ``apply`` registers the Pod's task definition (family ``pod_<namespace>_<name>``) and runs
it in cluster ``default`` (created if missing); ``get`` reads the family's newest task of its
current revision (DescribeTasks) as the Pod's status; ``logs`` reads the container's awslogs
stream; ``delete`` stops the Pod's tasks and deregisters its revisions. A Pod is the family's
ACTIVE revision: deleting it deregisters them, so the name is free again.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .core import pod as pods
from .core.limits import DEFAULT_LIMITS
from .region import tenants as tenant_table
from .region.supervisor import default_state_dir, lock_holder

app = typer.Typer(help="Pods: Kubernetes Pod manifests run as Fargate-style tasks "
                       "(apply, get, logs, delete).", no_args_is_help=True)
console = Console()
err = Console(stderr=True)

StateDir = Annotated[
    str | None,
    typer.Option("--state-dir", help="Region state directory (default $CELLCLOUD_HOME or "
                                     "~/.cellcloud)"),
]
Tenant = Annotated[str | None, typer.Option(help="Tenant name (default: the region's first)")]
Namespace = Annotated[str, typer.Option("--namespace", "-n", help="The Pod's namespace")]

log_pages_max = 10_000  # GetLogEvents pages one `pod logs` reads (each up to 1 MB)
list_pages_max = 1_000  # pages of one List* call followed
get_tasks_batch = 100  # DescribeTasks takes at most 100 tasks
follow_poll_s = 1.0  # `pod logs --follow`: a caught-up reader asks again this often


class PodCliError(Exception):
    """What went wrong, said once; ``reason`` is Kubernetes' word for it (the API gateway
    answers with it): BadRequest, NotFound, AlreadyExists, ServiceUnavailable."""

    def __init__(self, message: str, reason: str = "BadRequest") -> None:
        super().__init__(message)
        self.reason = reason


def _code(e: Exception) -> str:
    return str(getattr(e, "response", {}).get("Error", {}).get("Code", ""))


def _unsupported(op: str, e: Exception) -> PodCliError:
    message = getattr(e, "response", {}).get("Error", {}).get("Message", "")
    return PodCliError(f"this region does not run tasks yet: its ECS API answered {op} with "
                       f"UnsupportedFeatureException ({message})", "ServiceUnavailable")


def _failed(op: str, e: Exception) -> PodCliError:
    error = getattr(e, "response", {}).get("Error", {})
    return PodCliError(f"{op}: {error.get('Code', type(e).__name__)}: "
                       f"{error.get('Message', str(e))}")


class PodClient:
    """Pods over one tenant's ECS and Logs clients (botocore's; tests hand in stubbed ones)."""

    def __init__(self, ecs: Any, logs: Any, region: str) -> None:
        self.ecs, self.logs, self.region = ecs, logs, region

    # -- one Pod's records ---------------------------------------------------------------------
    def _taskdef(self, family: str) -> dict[str, Any] | None:
        """The family's latest ACTIVE revision with its tags, or None."""
        try:
            out = self.ecs.describe_task_definition(taskDefinition=family, include=["TAGS"])
        except Exception as e:
            if _code(e) == "ClientException":
                return None
            raise _failed("DescribeTaskDefinition", e) from None
        return {**out["taskDefinition"], "tags": out.get("tags") or []}

    def _task_arns(self, family: str, desired: str) -> list[str]:
        arns: list[str] = []
        token = ""
        for _ in range(list_pages_max):
            kw: dict[str, Any] = {"cluster": pods.CLUSTER, "family": family,
                                  "desiredStatus": desired}
            if token:
                kw["nextToken"] = token
            out = self.ecs.list_tasks(**kw)
            arns += out.get("taskArns") or []
            token = out.get("nextToken") or ""
            if not token:
                break
        return arns

    def _tasks(self, family: str) -> list[dict[str, Any]]:
        """Every task of the family the cluster still describes (running and stopped)."""
        try:
            arns = self._task_arns(family, "RUNNING") + self._task_arns(family, "STOPPED")
        except Exception as e:
            if _code(e) == "ClusterNotFoundException":
                return []
            if _code(e) == "UnsupportedFeatureException":
                raise _unsupported("ListTasks", e) from None
            raise _failed("ListTasks", e) from None
        found: list[dict[str, Any]] = []
        for i in range(0, len(arns), get_tasks_batch):
            try:
                out = self.ecs.describe_tasks(cluster=pods.CLUSTER,
                                              tasks=arns[i:i + get_tasks_batch],
                                              include=["TAGS"])
            except Exception as e:
                raise _failed("DescribeTasks", e) from None
            found += out.get("tasks") or []
        return found

    def _view(self, taskdef: dict[str, Any]) -> pods.PodView:
        tags = {t["key"]: t.get("value", "") for t in taskdef.get("tags") or []}
        name, namespace = tags.get(pods.NAME_TAG, ""), tags.get(pods.NAMESPACE_TAG, "")
        mine = [t for t in self._tasks(taskdef["family"])
                if t.get("taskDefinitionArn") == taskdef.get("taskDefinitionArn")]
        newest = max(mine, key=lambda t: pods.timestamp_ms(t.get("createdAt")) or 0, default=None)
        return pods.pod_view(newest, taskdef, name=name, namespace=namespace)

    # -- the verbs -----------------------------------------------------------------------------
    def exists(self, plan: pods.Plan) -> bool:
        """Whether the Pod's name is taken (its family has an ACTIVE revision)."""
        return self._taskdef(plan.family) is not None

    def apply(self, plan: pods.Plan) -> str:
        current = self._taskdef(plan.family)
        if current is not None:
            tags = {t["key"]: t.get("value", "") for t in current.get("tags") or []}
            if tags.get(pods.SPEC_TAG) == plan.spec_sha256:
                return f"pod/{plan.name} unchanged"
            raise PodCliError(f"pod/{plan.name} exists in namespace {plan.namespace} with a "
                              "different spec; a Pod's spec cannot change in place: delete it "
                              f"first (cellcloud pod delete {plan.name} -n {plan.namespace})",
                              "AlreadyExists")
        try:
            self.ecs.create_cluster(clusterName=pods.CLUSTER)  # as ECS: returns an existing one
            arn = self.ecs.register_task_definition(
                **plan.register)["taskDefinition"]["taskDefinitionArn"]
        except Exception as e:
            raise _failed("RegisterTaskDefinition", e) from None
        try:
            out = self.ecs.run_task(**{**plan.run, "taskDefinition": arn})
        except Exception as e:
            self._forget(arn)
            if _code(e) == "UnsupportedFeatureException":
                raise _unsupported("RunTask", e) from None
            raise _failed("RunTask", e) from None
        if not out.get("tasks"):
            self._forget(arn)
            reasons = "; ".join(f"{f.get('reason', '?')}" + (f" ({f['detail']})"
                                                            if f.get("detail") else "")
                                for f in out.get("failures") or []) or "no task was started"
            raise PodCliError(f"RunTask: {reasons}", "ServiceUnavailable")
        return f"pod/{plan.name} created"

    def _forget(self, arn: str) -> None:
        """A registration whose task did not start: not a Pod (best effort)."""
        try:
            self.ecs.deregister_task_definition(taskDefinition=arn)
        except Exception as e:
            err.print(f"[yellow]warning[/yellow]: could not deregister {escape(arn)}: "
                      f"{escape(str(e))}", soft_wrap=True)

    def get(self, name: str | None, namespace: str, all_namespaces: bool = False
            ) -> list[pods.PodView]:
        if name is not None:
            taskdef = self._taskdef(pods.family_for(namespace, name))
            if taskdef is None:
                raise PodCliError(f'pods "{name}" not found',
                                  "NotFound")
            return [self._view(taskdef)]
        prefix = pods.FAMILY_PREFIX if all_namespaces else pods.family_for(namespace, "")
        families: list[str] = []
        token = ""
        for _ in range(list_pages_max):
            kw: dict[str, Any] = {"familyPrefix": prefix, "status": "ACTIVE"}
            if token:
                kw["nextToken"] = token
            try:
                out = self.ecs.list_task_definition_families(**kw)
            except Exception as e:
                raise _failed("ListTaskDefinitionFamilies", e) from None
            families += out.get("families") or []
            token = out.get("nextToken") or ""
            if not token:
                break
        views = []
        for family in sorted(families):
            taskdef = self._taskdef(family)
            if taskdef is not None and any(t.get("key") == pods.NAME_TAG
                                           for t in taskdef.get("tags") or []):
                views.append(self._view(taskdef))
        return views

    def delete(self, name: str, namespace: str) -> str:
        family = pods.family_for(namespace, name)
        if self._taskdef(family) is None:
            raise PodCliError(f'pods "{name}" not found',
                                  "NotFound")
        try:
            running = self._task_arns(family, "RUNNING")
        except Exception as e:
            if _code(e) not in ("ClusterNotFoundException", "UnsupportedFeatureException"):
                raise _failed("ListTasks", e) from None
            running = []  # no cluster, or a region that runs no tasks: nothing to stop
        for arn in running:
            try:
                self.ecs.stop_task(cluster=pods.CLUSTER, task=arn,
                                   reason=f"pod/{name} deleted (cellcloud pod delete)")
            except Exception as e:
                raise _failed("StopTask", e) from None
        revisions: list[str] = []
        token = ""
        for _ in range(list_pages_max):
            kw: dict[str, Any] = {"familyPrefix": family, "status": "ACTIVE"}
            if token:
                kw["nextToken"] = token
            out = self.ecs.list_task_definitions(**kw)
            revisions += out.get("taskDefinitionArns") or []
            token = out.get("nextToken") or ""
            if not token:
                break
        for arn in revisions:
            try:
                self.ecs.deregister_task_definition(taskDefinition=arn)
            except Exception as e:
                raise _failed("DeregisterTaskDefinition", e) from None
        return f"pod/{name} deleted"

    def log_lines(self, name: str, namespace: str, container: str | None) -> Iterator[str]:
        for _, line in self.log_events(name, namespace, container):
            yield line

    def log_events(self, name: str, namespace: str, container: str | None,
                   start_ms: int | None = None, follow: bool = False,
                   wait: Callable[[float], None] = time.sleep) -> Iterator[tuple[int, str]]:
        """(timestamp ms, line) of the container's awslogs stream, oldest first, from
        ``start_ms`` if given; with ``follow``, new lines as they are filed until the Pod's
        task has stopped (polled every ``follow_poll_s``)."""
        view = self.get(name, namespace)[0]
        mains = [c.name for c in view.containers if not c.init]
        names = [c.name for c in view.containers]
        if container is None:
            if len(mains) != 1:
                raise PodCliError(f"a container name must be given with -c for pod {name}: one "
                                  f"of {', '.join(names)}")
            container = mains[0]
        elif container not in names:
            raise PodCliError(f"container {container!r} is not in pod {name}: one of "
                              f"{', '.join(names)}")
        if not view.task_id:
            raise PodCliError(f"pod {name} has no task yet, so no logs")
        stream = pods.log_stream_for(name, container, view.task_id)
        token = None
        stopped = False
        pages = 0
        while True:
            kw: dict[str, Any] = {"logGroupName": pods.log_group_for(namespace),
                                  "logStreamName": stream, "startFromHead": True}
            if start_ms is not None:
                kw["startTime"] = max(0, start_ms)
            if token:
                kw["nextToken"] = token
            try:
                out = self.logs.get_log_events(**kw)
            except Exception as e:
                if _code(e) != "ResourceNotFoundException":
                    raise _failed("GetLogEvents", e) from None
                out = {}  # nothing written yet
            for event in out.get("events") or []:
                yield int(event.get("timestamp") or 0), str(event.get("message", "")).rstrip("\n")
            nxt = out.get("nextForwardToken")
            if out.get("events") and nxt != token:
                pages += 1
                if pages >= log_pages_max:
                    raise PodCliError(f"more than {log_pages_max} pages of logs; stopped "
                                      "reading")
                token = nxt
                continue
            if not follow or stopped:
                return
            # Caught up: a stopped task's last lines are read once more, then it ends.
            stopped = self._task_status(view.task_arn) == "STOPPED"
            if not stopped:
                wait(follow_poll_s)

    def _task_status(self, arn: str) -> str:
        try:
            out = self.ecs.describe_tasks(cluster=pods.CLUSTER, tasks=[arn])
        except Exception as e:
            raise _failed("DescribeTasks", e) from None
        tasks = out.get("tasks") or []
        return str(tasks[0].get("lastStatus")) if tasks else "STOPPED"  # forgotten: over


# -- the shell ------------------------------------------------------------------------------------

def connect(state_dir: str | None, tenant: str | None) -> PodClient:
    """botocore clients for the running region's endpoint with the tenant's keys."""
    from botocore.config import Config
    from botocore.session import get_session

    sd = os.path.abspath(state_dir or default_state_dir())
    try:
        if lock_holder(sd) is None:
            raise FileNotFoundError
        with open(os.path.join(sd, "region.json")) as f:
            region = json.load(f)
        endpoint = str(region["endpoint"])  # a starting region has none yet
    except (FileNotFoundError, ValueError, KeyError, TypeError):
        raise PodCliError("No region is running; start one with `cellcloud up`.") from None
    keys = (region["access_key_id"], region["secret_access_key"])
    if tenant is not None:
        rows = [t for t in tenant_table.list_tenants(sd) if t["name"] == tenant]
        if not rows:
            raise PodCliError(f"no tenant named {tenant!r}")
        keys = (rows[0]["access_key_id"], rows[0]["secret_access_key"])
    session = get_session()
    name = str(region.get("region", "cc-local-1"))
    kw = dict(endpoint_url=endpoint, region_name=name,
              aws_access_key_id=keys[0], aws_secret_access_key=keys[1],
              config=Config(retries={"mode": "standard", "total_max_attempts": 3},
                            read_timeout=60, connect_timeout=5))
    return PodClient(session.create_client("ecs", **kw), session.create_client("logs", **kw),
                     name)


def run_cli(fn: Any) -> Any:
    try:
        return fn()
    except PodCliError as e:
        err.print(f"[red]error[/red]: {escape(str(e))}", highlight=False, soft_wrap=True)
        raise typer.Exit(1) from None


def _age(created_ms: int | None, now_ms: int) -> str:
    if created_ms is None:
        return "-"
    s = max(0, (now_ms - created_ms) // 1000)
    for unit, size in (("d", 86_400), ("h", 3_600), ("m", 60)):
        if s >= size * 2 or (unit == "m" and s >= 60):
            return f"{s // size}{unit}"
    return f"{s}s"


@app.command("apply")
def apply_cmd(
    filename: Annotated[str, typer.Option("--filename", "-f", help="A Pod manifest (YAML or "
                                                                    "JSON); - for stdin")],
    ignore_unknown: Annotated[bool, typer.Option(
        "--ignore-unknown", help="Run the Pod without the fields cellcloud does not understand "
        "(each is printed as a warning); without it they are refused")] = False,
    state_dir: StateDir = None, tenant: Tenant = None,
) -> None:
    """Run a Pod: one Fargate-style task sized as EKS on Fargate sizes it."""
    def go() -> None:
        try:
            if filename == "-":
                text = sys.stdin.buffer.read(DEFAULT_LIMITS.pod_manifest_bytes_max + 1)
            else:
                with open(filename, "rb") as f:
                    text = f.read(DEFAULT_LIMITS.pod_manifest_bytes_max + 1)
        except OSError as e:
            raise PodCliError(f"{filename}: {e.strerror or e}") from None
        client = connect(state_dir, tenant)
        try:
            plan = pods.load(text, region=client.region, ignore_unknown=ignore_unknown)
        except pods.PodError as e:
            hint = " (remove them, or give --ignore-unknown to run without them)" \
                if e.unknown else ""
            raise PodCliError(f"{filename}: {e}{hint}") from None
        for path in plan.unknown:
            err.print(f"[yellow]warning[/yellow]: {escape(path)}: not understood; ignored "
                      "(--ignore-unknown)", highlight=False, soft_wrap=True)
        for note in plan.notes:
            err.print(f"[yellow]note[/yellow]: {escape(note)}", highlight=False, soft_wrap=True)
        sys.stdout.write(client.apply(plan) + "\n")
    run_cli(go)


@app.command("get")
def get_cmd(
    name: Annotated[str | None, typer.Argument(help="A Pod (default: every Pod)")] = None,
    namespace: Namespace = "default",
    all_namespaces: Annotated[bool, typer.Option("--all-namespaces", "-A")] = False,
    output: Annotated[str, typer.Option("--output", "-o", help="wide, json or yaml")] = "",
    state_dir: StateDir = None, tenant: Tenant = None,
) -> None:
    """Pods with their phase: NAME READY STATUS AGE (-o wide: IP and task too)."""
    if output not in ("", "wide", "json", "yaml"):
        err.print(f"[red]error[/red]: -o {escape(output)}: wide, json or yaml")
        raise typer.Exit(2)

    def go() -> None:
        views = connect(state_dir, tenant).get(name, namespace, all_namespaces)
        if output in ("json", "yaml"):
            objs = [pods.pod_object(v) for v in views]
            doc = objs[0] if name is not None else {"apiVersion": "v1", "kind": "List",
                                                    "items": objs}
            if output == "json":
                sys.stdout.write(json.dumps(doc, indent=2) + "\n")
            else:
                import yaml
                sys.stdout.write(yaml.safe_dump(doc, sort_keys=False))
            return
        if not views:
            err.print(f"No pods found in namespace {namespace}." if not all_namespaces
                      else "No pods found.")
            return
        now = int(time.time() * 1000)
        cols = (["NAMESPACE"] if all_namespaces else []) + ["NAME", "READY", "STATUS", "AGE"]
        if output == "wide":
            cols += ["IP", "TASK"]
        table = Table(*cols, box=None, pad_edge=False, show_edge=False)
        for v in views:
            row = ([v.namespace] if all_namespaces else []) + [
                v.name, v.ready, v.status, _age(v.created_ms, now)]
            if output == "wide":
                row += [v.ip or "<none>", v.task_id or "<none>"]
            table.add_row(*row)
        console.print(table)
    run_cli(go)


@app.command("logs")
def logs_cmd(
    name: Annotated[str, typer.Argument(help="The Pod")],
    container: Annotated[str | None, typer.Option("--container", "-c",
                                                  help="Its container (needed with several)")]
    = None,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Then print new lines until "
                                         "the Pod's task stops (Ctrl-C ends it sooner)")] = False,
    namespace: Namespace = "default",
    state_dir: StateDir = None, tenant: Tenant = None,
) -> None:
    """A container's log lines (its awslogs stream), oldest first."""
    def go() -> None:
        client = connect(state_dir, tenant)
        try:
            for _, line in client.log_events(name, namespace, container, follow=follow):
                sys.stdout.write(line + "\n")
                sys.stdout.flush()
        except KeyboardInterrupt:
            pass
    run_cli(go)


@app.command("delete")
def delete_cmd(
    name: Annotated[str, typer.Argument(help="The Pod")],
    namespace: Namespace = "default",
    state_dir: StateDir = None, tenant: Tenant = None,
) -> None:
    """Stop the Pod's task and forget the Pod (its task definitions are deregistered)."""
    def go() -> None:
        sys.stdout.write(connect(state_dir, tenant).delete(name, namespace) + "\n")
    run_cli(go)

