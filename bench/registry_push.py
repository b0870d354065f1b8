"""Push throughput of a ~200 MB image to the region's registry vs a local copy (issue #14).

    python -m bench.registry_push [--mb 200] [--rounds 3]

Starts a region (its own state dir), builds an OCI image layout of ``--mb`` MB of random
(incompressible) layers in four layers, then, interleaved in the same run on the same disk:
``skopeo copy oci:<layout> oci:<fresh dir>`` (the local baseline: read, hash, write) and
``skopeo copy oci:<layout> docker://<endpoint>/<fresh repo>:v1`` (through the router, in
bounded 4 MiB internal calls, into the cell's blob store). Prints seconds and MB/s per round,
the medians and the router's and frontend's peak RSS as JSON.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

import boto3

from bench.common.region import detached_region

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from tests.oci_images import image_layout  # noqa: E402


def _du(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def _hwm_mib(pid: int) -> float:
    """A process's peak resident set (VmHWM): bounded chunks keep it far below a layer."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    return -1.0


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--mb", type=int, default=200)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--json-out", default=None)
    args = p.parse_args()
    with detached_region("cc-bench-registry-") as (state, doc):
        work = os.path.dirname(state)  # removed with the region
        ecr = boto3.client("ecr", endpoint_url=doc["endpoint"], region_name=doc["region"],
                           aws_access_key_id=doc["access_key_id"],
                           aws_secret_access_key=doc["secret_access_key"])
        tok = ecr.get_authorization_token()["authorizationData"][0]["authorizationToken"]
        password = base64.b64decode(tok).decode().partition(":")[2]
        host = doc["endpoint"].split("//", 1)[1]
        layout = os.path.join(work, "layout")
        per = args.mb * 1024 * 1024 // 4
        image_layout(layout, [{f"layer{i}.bin": os.urandom(per)} for i in range(4)], tag="v1")
        size = _du(os.path.join(layout, "blobs"))
        rows: dict[str, list[float]] = {"local": [], "cellcloud": []}
        for r in range(args.rounds):
            dest = os.path.join(work, f"copy{r}")
            t0 = time.perf_counter()
            subprocess.run(["skopeo", "copy", "-q", f"oci:{layout}:v1", f"oci:{dest}:v1"],
                           check=True, timeout=600)
            rows["local"].append(time.perf_counter() - t0)
            shutil.rmtree(dest)
            repo = f"bench/push{r}"
            ecr.create_repository(repositoryName=repo)
            t0 = time.perf_counter()
            subprocess.run(["skopeo", "copy", "-q", "--dest-tls-verify=false", "--dest-creds",
                            f"AWS:{password}", f"oci:{layout}:v1",
                            f"docker://{host}/{repo}:v1"], check=True, timeout=600)
            rows["cellcloud"].append(time.perf_counter() - t0)
            ecr.delete_repository(repositoryName=repo, force=True)
            print(f"round {r}: local {rows['local'][-1]:.2f} s, "
                  f"cellcloud {rows['cellcloud'][-1]:.2f} s", flush=True)
        with open(os.path.join(state, "region.json")) as f:
            comps = json.load(f)["components"]
        out = {"image_bytes": size, "rounds": args.rounds,
               "peak_rss_mib": {n: _hwm_mib(comps[n]["pid"])
                                for n in ("router", "cell-1-frontend")},
               **{f"{k}_s": [round(x, 3) for x in v] for k, v in rows.items()},
               **{f"{k}_median_mb_per_s": round(size / 1e6 / statistics.median(v), 1)
                  for k, v in rows.items()}}
        print(json.dumps(out, indent=2))
        if args.json_out:
            with open(args.json_out, "w") as f:
                json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
