"""A SnapStart version's identity (agent/server.py ``snapstart_id``): what its snapshot is keyed
by changes with everything the version's init depends on (code, layers, configuration,
environment variables), never with the environment's own log stream or id, and names the
version's ARN."""

from __future__ import annotations

import dataclasses

from cellcloud.agent.server import snapstart_id
from cellcloud.core import messages as m

FN = m.FunctionSpec(name="f", arn="arn:aws:lambda:cc-local-1:000000000000:function:f",
                    handler="app.handler", runtime="python3.11", memory_mb=128, timeout_s=3,
                    environment={"A": "1"}, version="3", log_stream="2026/11/27/[3]env-1",
                    snapstart="PublishedVersions")
REQ = m.CreateEnvRequest(env_id="env-1", bundle_sha256="ab" * 32, function=FN)


def _with(**kw: object) -> m.CreateEnvRequest:
    return dataclasses.replace(REQ, function=dataclasses.replace(FN, **kw))  # type: ignore[arg-type]


def test_the_id_names_the_version_and_ignores_the_environments_own_names() -> None:
    ident = snapstart_id(REQ)
    assert ident.startswith(f"{FN.arn}:3 ")
    assert snapstart_id(dataclasses.replace(REQ, env_id="env-2")) == ident
    assert snapstart_id(_with(log_stream="2026/11/27/[3]env-2", log_group="/g")) == ident


def test_anything_the_init_depends_on_changes_the_id() -> None:
    ident = snapstart_id(REQ)
    others = [snapstart_id(dataclasses.replace(REQ, bundle_sha256="cd" * 32)),
              snapstart_id(_with(environment={"A": "2"})),
              snapstart_id(_with(handler="app.other")),
              snapstart_id(_with(memory_mb=256)),
              snapstart_id(_with(layers=("ef" * 32,))),
              snapstart_id(_with(version="4"))]
    assert ident not in others and len(set(others)) == len(others)
