"""A TCP proxy in front of PostgreSQL that loses one reply: the network failing between the
server's commit and the client hearing of it, the one failure a retry cannot tell apart
from a transaction that never ran."""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator

import sqlalchemy as sa


class ReplyCutter:
    """Forwards connections to `url`'s server; once `cut_after(marker)` is called, the
    first connection whose client sends `marker` is closed as soon as the server answers,
    without the answer reaching the client."""

    def __init__(self, url: str) -> None:
        target = sa.make_url(url)
        query = dict(target.query)
        host = target.host or str(query.pop("host", "") or "/var/run/postgresql")
        port = target.port or int(str(query.pop("port", "") or 5432))
        # A server reached through its Unix socket (a DSN given in TASKOMATIC_TEST_DSN) is
        # proxied over TCP all the same.
        self._server = f"{host}/.s.PGSQL.{port}" if host.startswith("/") else (host, port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.url = target.set(host="127.0.0.1", port=self._listener.getsockname()[1], query=query)
        self._marker: bytes | None = None
        self._lock = threading.Lock()
        self.cuts = 0
        self._sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def cut_after(self, marker: bytes) -> None:
        with self._lock:
            self._marker = marker

    def close(self) -> None:
        self._listener.close()
        for sock in list(self._sockets):
            with contextlib.suppress(OSError):
                sock.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # closed
            if isinstance(self._server, str):
                server = socket.socket(socket.AF_UNIX)
                server.connect(self._server)
            else:
                server = socket.create_connection(self._server)
            self._sockets += [client, server]
            doomed = threading.Event()
            threading.Thread(target=self._up, args=(client, server, doomed), daemon=True).start()
            threading.Thread(target=self._down, args=(server, client, doomed), daemon=True).start()

    def _up(self, client: socket.socket, server: socket.socket, doomed: threading.Event) -> None:
        """Client to server; marks the connection whose client sends the marker."""
        with contextlib.suppress(OSError):
            while data := client.recv(65536):
                with self._lock:
                    if self._marker is not None and self._marker in data:
                        self._marker = None
                        doomed.set()
                server.sendall(data)
        _close(client, server)

    def _down(self, server: socket.socket, client: socket.socket, doomed: threading.Event) -> None:
        """Server to client, until a doomed connection's server answers: then cut both."""
        with contextlib.suppress(OSError):
            while data := server.recv(65536):
                if doomed.is_set():
                    with self._lock:
                        self.cuts += 1
                    break
                client.sendall(data)
        _close(client, server)


def _close(*sockets: socket.socket) -> None:
    for sock in sockets:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(OSError):
            sock.close()


@contextlib.contextmanager
def reply_cutter(url: str) -> Iterator[ReplyCutter]:
    cutter = ReplyCutter(url)
    try:
        yield cutter
    finally:
        cutter.close()
