"""The ECS service benchmarks' frame (bench/ecs_service.py, bench/ecs_autoscale.py): a region
with the web image pushed (:func:`web_image_archive`) and a cluster ``bench``; its services
described, and reached through the router by Host header."""

from __future__ import annotations

import contextlib
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any

from bench.common.region import client, detached_region, push_image, web_image_archive


class EcsBench:
    """The region's ECS and application-autoscaling clients, with the cluster ``bench``."""

    def __init__(self, doc: dict[str, Any], image: str) -> None:
        self.doc, self.image = doc, image
        self.endpoint: str = doc["endpoint"]
        self.port = self.endpoint.rsplit(":", 1)[1]
        self.ecs = client(doc, "ecs")
        self.aas = client(doc, "application-autoscaling")
        self.ecs.create_cluster(clusterName="bench")

    def service(self, name: str) -> dict[str, Any]:
        out: dict[str, Any] = self.ecs.describe_services(cluster="bench",
                                                         services=[name])["services"][0]
        return out

    def host(self, name: str) -> str:
        """The Host header that routes to service ``name`` of the cluster."""
        return (f"{name}.bench.{self.doc['account_id']}.{self.doc['region']}"
                f".localhost:{self.port}")


@contextlib.contextmanager
def ecs_bench(prefix: str) -> Iterator[EcsBench]:
    """A fresh region (:func:`detached_region`) with the web image as ``bench/web:v1``."""
    work = tempfile.mkdtemp(prefix=prefix)
    archive = web_image_archive(work)
    with detached_region(prefix) as (state, doc):
        yield EcsBench(doc, push_image(state, doc, archive, "bench/web:v1"))


def wait_until(what: str, cond: Callable[[], Any], timeout_s: float = 600.0,
               poll_s: float = 0.2) -> float:
    """Until ``cond()`` holds (``TimeoutError`` after ``timeout_s``): the time it did."""
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(poll_s)  # polling the region's API, bounded above
    return time.monotonic()
