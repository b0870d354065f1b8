"""``cellcloud microvm``: guest images and the acceleration probe (docs/microvm.md)."""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from .region.supervisor import default_state_dir

app = typer.Typer(help="microVMs: guest images and the host's acceleration (KVM or TCG).",
                  no_args_is_help=True)
image_app = typer.Typer(help="Guest images (Debian cloud kernel + busybox initramfs), "
                        "content-addressed under the state directory.", no_args_is_help=True)
app.add_typer(image_app, name="image")
console = Console()
err = Console(stderr=True)

StateDir = Annotated[
    str | None,
    typer.Option("--state-dir", help="State directory (default $CELLCLOUD_HOME or ~/.cellcloud)"),
]
AsJson = Annotated[bool, typer.Option("--json")]


def _sd(state_dir: str | None) -> str:
    return os.path.abspath(state_dir or default_state_dir())


def _ensure(sd: str) -> Any:
    from .microvm import image

    try:
        return image.build(sd)
    except (image.ImageError, OSError) as e:
        err.print(f"[red]{e}[/red]")
        raise typer.Exit(1) from None


@image_app.command("build")
def image_build(state_dir: StateDir = None, as_json: AsJson = False) -> None:
    """Build the guest image from this host's packages (once: it is cached by the digest of its
    inputs); prints its digest and folder."""
    img, built = _ensure(_sd(state_dir))
    if as_json:
        sys.stdout.write(json.dumps({"digest": img.digest, "path": img.path, "built": built,
                                     "kernel_release": img.kernel_release,
                                     "size_bytes": img.size_bytes}, indent=2) + "\n")
        return
    sys.stdout.write(f"{img.digest} {img.path} ({'built' if built else 'cached'})\n")


@image_app.command("ls")
def image_ls(state_dir: StateDir = None, as_json: AsJson = False) -> None:
    """List the guest images built under the state directory."""
    from .microvm import image

    imgs = image.list_images(_sd(state_dir))
    if as_json:
        sys.stdout.write(json.dumps([{"digest": i.digest, "path": i.path,
                                      "kernel_release": i.kernel_release,
                                      "size_bytes": i.size_bytes} for i in imgs], indent=2) + "\n")
        return
    table = Table("digest", "kernel", "size", "path")
    for i in imgs:
        table.add_row(i.digest[:19], i.kernel_release, f"{i.size_bytes / 2**20:.1f} MiB", i.path)
    console.print(table)


@app.command("probe")
def probe(state_dir: StateDir = None, as_json: AsJson = False,
          force: Annotated[bool, typer.Option("--force", help="Probe again, ignoring the cache")]
          = False) -> None:
    """Which acceleration microVMs get on this host: KVM only if a probe guest really boots
    under it in time, else TCG (builds the guest image first if needed)."""
    from .microvm import boot

    sd = _sd(state_dir)
    img, _ = _ensure(sd)
    record, cached = boot.probe(sd, img, force=force)
    if as_json:
        sys.stdout.write(json.dumps({**record, "cached": cached}, indent=2) + "\n")
        return
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(int(str(record["probed_at"]))))
    sys.stdout.write(f"{record['accel']}: {record['reason']} "
                     f"({'cached, ' if cached else ''}probed {when})\n")


def status_field(state_dir: str) -> dict[str, Any] | None:
    """``microvm`` in ``cellcloud status``: the host's last probe (None: never probed)."""
    from .microvm import boot

    rec = boot.cached_probe(state_dir)
    if rec is None:
        return None
    return {k: rec.get(k) for k in ("accel", "reason", "probe_result", "image", "probed_at")}
