"""Progress bars of the CLI's waiting commands (cli_progress.py) and the byte counts they are
fed (sdk.Client.request's ``progress``)."""

from __future__ import annotations

import io
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from rich.console import Console

from cellcloud import cli_progress, sdk


def test_nothing_is_drawn_off_a_terminal() -> None:
    out = io.StringIO()
    con = Console(file=out)
    assert not con.is_terminal
    with cli_progress.transfer("uploading f", 10, con) as sent:
        sent(10, 10)
    with cli_progress.waiting("migrating", con):
        pass
    with cli_progress.blobs("pushing", con) as blob:
        blob("sha256:" + "a" * 64, 5, 5)
    assert out.getvalue() == ""


def test_a_terminal_gets_the_bars() -> None:
    out = io.StringIO()
    con = Console(file=out, force_terminal=True, width=120)
    with cli_progress.transfer("uploading fn-big", None, con) as sent:
        for _ in range(4):
            sent(256 * 1024, 1024 * 1024)
    with cli_progress.blobs("pushing", con) as blob:
        blob("sha256:" + "ab" * 32, 1024, 2048)
    text = out.getvalue()
    assert "uploading fn-big" in text and "1.0/1.0 MB" in text
    assert "pushing abababababab" in text


def test_request_reports_every_byte_sent_and_sends_them_all() -> None:
    got: list[bytes] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            got.append(self.rfile.read(int(self.headers["content-length"])))
            self.send_response(200)
            self.send_header("content-length", "2")
            self.end_headers()
            self.wfile.write(b"{}")

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        client = sdk.Client(f"http://127.0.0.1:{server.server_address[1]}", ("AKID", "secret"))
        body = bytes(range(256)) * 4000  # ~1 MB: several chunks
        seen: list[tuple[int, int]] = []
        status, _, _ = client.request("POST", "/x", body, progress=lambda n, t: seen.append((n, t)))
        client.close()
    finally:
        server.shutdown()
    assert status == 200 and got == [body]
    assert sum(n for n, _ in seen) == len(body) and {t for _, t in seen} == {len(body)}
    assert len(seen) > 1
