"""The run-and-record frame the sandbox benchmarks share: a work directory environments can
traverse, the run timed, the result written as JSON under bench/results/."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Coroutine
from typing import Any

RESULTS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "results")


def run_recorded(name: str, res: dict[str, Any],
                 body: Callable[[str], Coroutine[Any, Any, None]]) -> str:
    """Run ``body(work_dir)`` (filling ``res``), always record ``res`` (with ``wall_s``) as
    ``bench/results/<name>-<UTC time>.json``, and return that path. The work directory is
    removed afterwards."""
    work = tempfile.mkdtemp(prefix=f"cellcloud-bench-{name}-")
    os.chmod(work, 0o755)  # environments (other uids) traverse to their bundles
    t = time.monotonic()
    try:
        asyncio.run(body(work))
    finally:
        res["wall_s"] = time.monotonic() - t
        shutil.rmtree(work, ignore_errors=True)
        os.makedirs(RESULTS_DIR, exist_ok=True)
        path = os.path.join(RESULTS_DIR, f"{name}-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}.json")
        with open(path, "w") as f:
            json.dump(res, f, indent=1, default=str)
    return path
