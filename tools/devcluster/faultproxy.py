"""A TCP proxy in front of the S3 server that can hold one request: how the fault tests stop a
writer at an exact step (the PUT of one key) instead of racing it with a poll.

`hold(b"PUT /bucket/key")` arms it: the first request whose bytes contain that marker is not
forwarded; `held` is set and the connection stays open, so the writer waits for an answer, until
`release()` closes it (the writer sees a dropped connection, as on an outage, and its retry goes
through). Everything else is relayed byte for byte.
"""

from __future__ import annotations

import contextlib
import socket
import threading

from devcluster.forward import BUFFER
from devcluster.net import free_port


class FaultProxy:
    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.port = free_port()
        self.held = threading.Event()
        self._release = threading.Event()
        self._marker: bytes | None = None
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", self.port))
        threading.Thread(target=self._serve, daemon=True).start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def hold(self, marker: bytes) -> None:
        """Hold the next request containing `marker` (e.g. b"PUT /bucket/runs/a/manifest.json")."""
        with self._lock:
            self._marker = marker
            self.held.clear()
            self._release.clear()

    def release(self) -> None:
        """Drop the held connection (its writer sees a connection error)."""
        self._release.set()

    def close(self) -> None:
        self._release.set()
        self._listener.close()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._relay, args=(conn,), daemon=True).start()

    def _relay(self, conn: socket.socket) -> None:
        try:
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port), timeout=10)
        except OSError:
            conn.close()  # upstream down: the client sees a dropped connection, as without us
            return
        upstream.settimeout(None)
        back = threading.Thread(target=self._pump_back, args=(upstream, conn), daemon=True)
        back.start()
        tail = b""
        try:
            while data := conn.recv(BUFFER):
                if self._hit(tail + data):
                    self.held.set()
                    self._release.wait()
                    break
                tail = data[-256:]
                upstream.sendall(data)
        except OSError:
            pass
        finally:
            for s in (upstream, conn):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                s.close()

    def _hit(self, data: bytes) -> bool:
        with self._lock:
            if self._marker is None or self._marker not in data:
                return False
            self._marker = None  # once: the writer's retry goes through
            return True

    @staticmethod
    def _pump_back(upstream: socket.socket, conn: socket.socket) -> None:
        try:
            while data := upstream.recv(BUFFER):
                conn.sendall(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_WR)
