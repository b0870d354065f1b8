"""Cold start of an image function against a zip function, agent level, in the same run.

Run from the repository root, as root::

    python -m bench.images [--n 20] [--warmup 3] [--first 5] [--memory-mb 256]

zip          an in-process ``Agent`` + ``JailBackend``; per sample ``create_env`` then
             ``invoke`` of a handler returning ``time.time()``; cold = handler entry - wall
             time just before create_env (as bench/node_cold.py). python3.11, the built-in
             runtime (the environment forks from the zygote and runs the handler in-process).
zip_ric      the same handler as a provided.al2023 zip whose bootstrap runs awslambdaric with
             the host's Python: the same runtime process an image runs, without the image.
image        the image of tests/oci_images.py (the host's Python libraries + awslambdaric +
             the handler; 3 layers), layers already in the agent's cache: overlay root,
             ENTRYPOINT python -m awslambdaric (a runtime process that talks to
             AWS_LAMBDA_RUNTIME_API).
image_first  first start on an agent that lacks the layers: each sample drops them from the
             cache, streams them in 4 MiB ``image_blob`` calls (as the frontend does after
             ``LayerMissing``), lets the agent verify and unpack them, then create + invoke;
             cold = handler entry - time before the first chunk.

Samples interleave (zip, zip_ric, image, ...), so all see the same background load. Prints a
table and writes JSON under bench/results/. Benchmarks are not tests: nothing here asserts.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import sys
import time
from typing import Any

from bench.common.results import run_recorded
from bench.sandbox import COLD_HANDLER, SAMPLE_GAP_S, InProcAgent, machine, make_zip, summary_ms
from cellcloud.core.limits import DEFAULT_LIMITS

UID_BASE = 660_000  # away from the other benches' ranges and the regions' 200,000+
ARN = "arn:aws:lambda:cc-local-1:1:function:bench"


def _fn(runtime: str, handler: str, memory_mb: int) -> dict[str, Any]:
    return {"name": "bench", "arn": ARN, "handler": handler, "runtime": runtime,
            "memory_mb": memory_mb, "timeout_s": 30}


async def _sample(a: InProcAgent, body: dict[str, Any], t0: float) -> tuple[float, float]:
    await a.agent.create_env(body)
    t1 = time.time()
    entered = await a.invoke(body["env_id"], timeout_ms=30_000)
    await a.agent.destroy({"env_id": body["env_id"]})
    await asyncio.sleep(SAMPLE_GAP_S)
    return float(entered) - t0, t1 - t0


async def _push(a: InProcAgent, layout: str, layers: list[str]) -> int:
    sent = 0
    chunk = DEFAULT_LIMITS.registry_chunk_bytes_max
    for digest in layers:
        path = os.path.join(layout, "blobs", "sha256", digest.split(":")[1])
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            offset = 0
            while True:
                data = f.read(chunk)
                last = offset + len(data) >= size
                await a.agent.image_blob({"digest": digest, "offset": offset, "data": data,
                                          "last": last})
                offset += len(data)
                sent += len(data)
                if last:
                    break
    return sent


async def run(args: argparse.Namespace, work: str, res: dict[str, Any]) -> None:
    sys.path.insert(0, os.getcwd())
    import json

    from tests.oci_images import lambda_image

    layout = os.path.join(work, "image")
    img = lambda_image(layout, COLD_HANDLER)
    with open(os.path.join(layout, "blobs", "sha256", img["config"].split(":")[1])) as f:
        config = json.load(f)["config"]
    res["image_info"] = {"layers": len(img["layers"]),
                    "compressed_bytes": sum(os.path.getsize(os.path.join(
                        layout, "blobs", "sha256", d.split(":")[1])) for d in img["layers"])}
    image_body = {"digest": img["manifest"], "layers": img["layers"],
                  "entrypoint": config["Entrypoint"], "cmd": config["Cmd"],
                  "workdir": config["WorkingDir"],
                  "env": dict(e.split("=", 1) for e in config["Env"])}
    a = InProcAgent(work, "images", UID_BASE)
    try:
        zip_data = make_zip({"app.py": COLD_HANDLER})
        zip_sha = hashlib.sha256(zip_data).hexdigest()
        a.agent._bundle(zip_sha, zip_data)
        ric = _ric_zip(f"#!/bin/sh\nexport PYTHONPATH=/var/task:{_site()}\n"
                       f"exec {sys.executable} -m awslambdaric app.handler\n")
        ric_sha = hashlib.sha256(ric).hexdigest()
        a.agent._bundle(ric_sha, ric)
        await _push(a, layout, img["layers"])
        kinds: dict[str, tuple[list[float], list[float]]] = {
            k: ([], []) for k in ("zip", "zip_ric", "image")}
        for i in range(args.warmup + args.n):
            for kind in kinds:
                body: dict[str, Any] = {"env_id": f"{kind}-{i}", "function_key": kind,
                                        "create_timeout_ms": 60_000}
                if kind == "zip":
                    body.update(bundle_sha256=zip_sha,
                                function=_fn("python3.11", "app.handler", args.memory_mb))
                elif kind == "zip_ric":
                    body.update(bundle_sha256=ric_sha,
                                function=_fn("provided.al2023", "app.handler", args.memory_mb))
                else:
                    body.update(bundle_sha256="", image=image_body,
                                function=_fn("", "", args.memory_mb))
                cold, create = await _sample(a, body, time.time())
                if i >= args.warmup:
                    kinds[kind][0].append(cold)
                    kinds[kind][1].append(create)
        for kind, (cold_s, create_s) in kinds.items():
            res[kind] = {"cold": summary_ms(cold_s), "create_env": summary_ms(create_s)}
        first, pushed = [], []
        for i in range(args.first):
            for d in img["layers"]:
                a.agent.images.drop(d)
            t0 = time.time()
            sent = await _push(a, layout, img["layers"])
            t_pushed = time.time()
            body = {"env_id": f"first-{i}", "function_key": "first", "bundle_sha256": "",
                    "image": image_body, "function": _fn("", "", args.memory_mb),
                    "create_timeout_ms": 60_000}
            cold, _ = await _sample(a, body, t0)
            first.append(cold)
            pushed.append(t_pushed - t0)
        res["image_first"] = {"cold": summary_ms(first), "push_and_unpack": summary_ms(pushed),
                              "bytes_streamed": sent}
    finally:
        a.close()


def _ric_zip(bootstrap: str) -> bytes:
    import io
    import zipfile

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("app.py", COLD_HANDLER)
        info = zipfile.ZipInfo("bootstrap")
        info.external_attr = 0o100755 << 16
        zf.writestr(info, bootstrap)
    return buf.getvalue()


def _site() -> str:
    import awslambdaric

    return os.path.dirname(os.path.dirname(os.path.abspath(awslambdaric.__file__)))


def report(res: dict[str, Any]) -> list[str]:
    lines = [f"{'kind':<12} {'cold p50':>9} {'p99':>9} {'create p50':>11}"]
    for name in ("zip", "zip_ric", "image", "image_first"):
        r = res.get(name)
        if not r:
            continue
        create = r.get("create_env") or r.get("push_and_unpack")
        lines.append(f"{name:<12} {r['cold']['p50_ms']:>6.1f} ms {r['cold']['p99_ms']:>6.1f} ms "
                     f"{create['p50_ms']:>8.1f} ms")
    return lines


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.images")
    p.add_argument("--n", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--first", type=int, default=5, help="first-start samples (layers dropped)")
    p.add_argument("--memory-mb", type=int, default=256)
    args = p.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench.images needs root (namespaces, cgroups, mounts)")
    res: dict[str, Any] = {"machine": machine(), "argv": sys.argv[1:],
                           "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    path = run_recorded("images", res, lambda work: run(args, work, res))
    m = res["machine"]
    print(f"machine: {m['nproc']} x {m['cpu_model']}, {m['mem_total_gib']:.1f} GiB, kernel "
          f"{m['kernel']}, load at start {' '.join(m['loadavg_at_start'])}")
    print(f"image: {res['image_info']['layers']} layers, "
          f"{res['image_info']['compressed_bytes'] / 2**20:.1f} MiB compressed")
    for line in report(res):
        print(line)
    print(f"wall {res['wall_s']:.1f} s; JSON: {path}")


if __name__ == "__main__":
    main()
