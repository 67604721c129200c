"""A TCP forwarder from the host's loopback into the real node's network namespace.

The parent binds the listening sockets on the host's 127.0.0.1 and hands them over as inherited
file descriptors; this process runs inside the node's network namespace (`nsenter --net`), so each
accepted connection is relayed to the same port on the namespace's own 127.0.0.1. Tests, kubectl
and `make images` (pushing to the registry) therefore use the same `127.0.0.1:PORT` addresses as
on the process-kubelet tier, and no address outside loopback and the namespace is ever used.

    python -m devcluster.forward FD:PORT [FD:PORT ...]
"""

from __future__ import annotations

import contextlib
import socket
import sys
import threading

BUFFER = 1 << 20


def pump(src: socket.socket, dst: socket.socket) -> None:
    try:
        while data := src.recv(BUFFER):
            dst.sendall(data)
    except OSError:
        pass
    finally:
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)


def relay(client: socket.socket, port: int) -> None:
    try:
        upstream = socket.create_connection(("127.0.0.1", port), timeout=10)
    except OSError:
        client.close()
        return
    upstream.settimeout(None)
    back = threading.Thread(target=pump, args=(upstream, client), daemon=True)
    back.start()
    pump(client, upstream)
    back.join()
    client.close()
    upstream.close()


def serve(listener: socket.socket, port: int) -> None:
    while True:
        client, _ = listener.accept()
        threading.Thread(target=relay, args=(client, port), daemon=True).start()


def main(argv: list[str]) -> int:
    threads = []
    for spec in argv:
        fd, port = (int(x) for x in spec.split(":"))
        listener = socket.socket(fileno=fd)
        threads.append(threading.Thread(target=serve, args=(listener, port), daemon=True))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
