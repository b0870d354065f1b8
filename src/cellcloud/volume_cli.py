"""``cellcloud volume ...``: volumes of a running region attached on this host (issue #19,
docs/volumes.md). The attachment's record is the control plane's (op ``volume_attachment``);
the bytes are served by ``volumes/attach.py``'s FUSE process."""

from __future__ import annotations

import asyncio
import sys
from typing import Annotated, Any

import typer

volume_app = typer.Typer(help="Volumes of a running region, attached on this host "
                              "(docs/volumes.md).")


@volume_app.callback()
def _volume_group() -> None:
    """Volumes of a running region, attached on this host."""


@volume_app.command("attach")
def attach_cmd(
    volume_id: Annotated[str, typer.Argument(help="the volume (vol-...)")],
    at: Annotated[str, typer.Option("--at", help="mount the volume's ext4 here")],
    tenant: Annotated[str, typer.Option(help="tenant name or account id (default: the "
                                              "region's first tenant)")] = "",
    state_dir: Annotated[str, typer.Option(help="the region's state directory")] = "",
) -> None:
    """Attach a volume on this host (root): take its attachment in the control plane (one
    writer: ``VolumeInUse`` while another holds it), then a FUSE file served from its
    replicas (or its local file) → loop device → ext4 at ``--at``. Prints one JSON line once
    mounted and holds the attachment until SIGTERM or Ctrl-C, then unmounts and detaches."""
    import json
    import os
    import signal
    import socket

    from cellcloud.control import operate
    from cellcloud.region.supervisor import default_state_dir
    from cellcloud.transport import RemoteError
    from cellcloud.volumes.attach import AttachError, StorageLinks, attach_volume, detach_volume

    sd = os.path.abspath(state_dir or default_state_dir())
    try:
        with open(os.path.join(sd, "region.json")) as f:
            doc = json.load(f)
    except (OSError, ValueError):
        print(f"no region is running from {sd}", file=sys.stderr)
        raise typer.Exit(1) from None
    account = operate.account_of(sd, tenant) if tenant else str(doc["account_id"])
    st = doc.get("storage")
    storage = StorageLinks(st["store_colony"], st["servers_file"],
                           "" if doc.get("insecure") else sd, str(doc["region"])) if st else None

    class Records:  # the volume's record, in the control plane (op volume_attachment)
        async def attach(self, account: str, volume_id: str, target: str,
                         device: str = "/dev/sdf") -> dict[str, Any]:
            out: dict[str, Any] = await operate.control_call(sd, "volume_attachment", {
                "account": account, "volume_id": volume_id, "action": "attach",
                "target": target}, 60)
            return out

        async def detach(self, account: str, volume_id: str, attach_epoch: int
                         ) -> dict[str, Any]:
            out: dict[str, Any] = await operate.control_call(sd, "volume_attachment", {
                "account": account, "volume_id": volume_id, "action": "detach",
                "attach_epoch": attach_epoch}, 60)
            return out

    async def run() -> None:
        records = Records()
        va = await attach_volume(records, account, volume_id, f"host/{socket.gethostname()}",
                                 os.path.join(sd, "volumes"), os.path.abspath(at),
                                 os.path.join(sd, "attachments"), storage)
        try:
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, stop.set)
            print(json.dumps({"volume_id": volume_id, "mounted_at": va.attached.mount_at,
                              "loop_device": va.attached.loop_device,
                              "attach_epoch": va.attach_epoch}), flush=True)
            await stop.wait()
        finally:
            await detach_volume(records, va)

    try:
        asyncio.run(run())
    except (RemoteError, AttachError) as e:
        print(f"attach failed: {e}", file=sys.stderr)
        raise typer.Exit(1) from None
