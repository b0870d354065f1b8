"""Every limit in cellcloud, named with its unit (TigerBeetle style). Over a limit is an error."""

from __future__ import annotations

from dataclasses import dataclass

MiB = 1024 * 1024


@dataclass(frozen=True)
class Limits:
    # Lambda's documented quotas.
    invoke_payload_bytes_max: int = 6 * MiB
    response_payload_bytes_max: int = 6 * MiB
    zip_bytes_max: int = 50 * MiB  # direct upload (Lambda: 50 MB zipped)
    unzipped_bytes_max: int = 250 * MiB
    zip_members_max: int = 20_000
    env_vars_bytes_max: int = 4 * 1024
    memory_mb_min: int = 128
    memory_mb_max: int = 10_240
    timeout_s_min: int = 1
    timeout_s_max: int = 900
    timeout_s_default: int = 3
    memory_mb_default: int = 128
    ephemeral_mb_default: int = 512
    log_tail_bytes: int = 4 * 1024  # LogType=Tail returns the last 4 KB
    # Ours.
    invocation_log_bytes_max: int = 256 * 1024  # kept per invocation, the tail wins
    function_log_bytes_max: int = 1 * MiB  # kept per function at the frontend
    function_concurrency_default: int = 100  # per-function environments, then 429
    envs_per_agent_max: int = 1000
    env_idle_timeout_ms: int = 300_000
    env_create_timeout_ms: int = 10_000
    agent_call_timeout_ms: int = 5_000
    # An invoke answered EnvGone (the environment died while idle: no handler code ran) is
    # placed again, on a fresh environment, at most this many times (the frontend's one retry
    # layer); the agent remembers at most this many gone environment ids to answer EnvGone.
    env_gone_retries_max: int = 3
    gone_env_ids_remembered_max: int = 1024
    list_functions_page_max: int = 50
    request_body_bytes_max: int = 70 * MiB  # the router reads no more than this (bundle + b64)
    functions_per_tenant_max: int = 10_000


DEFAULT_LIMITS = Limits()
