"""The peers a user would pick instead, driven by the same load generator.

PySyncObj: each member process runs a SyncObj with a replicated dict and serves the same
HMAC'd msgpack frames as a store node (a thread per connection calling ``set(sync=True)``).
etcd: Debian's ``etcd-server``, driven through its gRPC API (``bench/store/etcd_grpc.py``) or,
as ``etcd-http``, through its HTTP/JSON gateway (``/v3/kv/put``) on one member.
"""

from __future__ import annotations

import socketserver
import sys
import threading

from cellcloud.store.wire import seal, unseal

KEY = b"b" * 32


def run_pysyncobj(self_addr: str, partners: list[str], port: int, journal: str) -> None:
    from pysyncobj import SyncObj, SyncObjConf
    from pysyncobj.batteries import ReplDict

    d = ReplDict()
    conf = SyncObjConf(journalFile=journal, dynamicMembershipChange=False)
    obj = SyncObj(self_addr, partners, consumers=[d], conf=conf)

    class Handler(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            f = self.request.makefile("rb")
            while True:
                head = f.read(4)
                if len(head) < 4:
                    return
                body = unseal(KEY, f.read(int.from_bytes(head, "big")))
                try:
                    if body["op"] == "put":
                        d.set(body["key"], body["value"], sync=True, timeout=5)
                        result = True
                    else:
                        result = d.get(body["key"])
                    reply = {"request_id": body["request_id"], "status": "ok", "result": result}
                except Exception as exc:  # not leader yet, timeout
                    reply = {
                        "request_id": body["request_id"],
                        "status": "error",
                        "result": str(exc),
                    }
                self.request.sendall(seal(KEY, reply))

    class Server(socketserver.ThreadingTCPServer):
        allow_reuse_address = True
        daemon_threads = True

    srv = Server(("127.0.0.1", port), Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    obj.waitReady()
    print("READY", flush=True)
    threading.Event().wait()


if __name__ == "__main__":
    me, port, journal, *others = sys.argv[1:]
    run_pysyncobj(me, others, int(port), journal)
