"""Small TCP relays on loopback that break a link for real: `Relay` cuts every connection on
demand, `DroppingRelay` loses a fraction of the server's replies."""

from __future__ import annotations

import contextlib
import random
import socket
import threading
from types import TracebackType
from typing import Self


class Relay:
    """Forwards 127.0.0.1:<port> to `target`; `cut()` drops every open connection."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self.listener.getsockname()[1]
        self.refusing = threading.Event()
        self._lock = threading.Lock()
        self._sockets: set[socket.socket] = set()
        self._closed = False
        self.cuts = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if self.refusing.is_set():
                client.close()
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._sockets |= {client, upstream}
            for src, dst, replies in ((client, upstream, False), (upstream, client, True)):
                threading.Thread(
                    target=self._pipe, args=(src, dst, replies), daemon=True
                ).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, replies: bool) -> None:
        try:
            while data := src.recv(65536):
                if not self._forward(data, replies):
                    break
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                self._close(sock)

    def _forward(self, data: bytes, replies: bool) -> bool:
        """Whether to pass `data` on (`replies`: it comes from the server); False cuts the link."""
        return True

    def _close(self, sock: socket.socket) -> None:
        with self._lock:
            self._sockets.discard(sock)
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        sock.close()

    def cut(self) -> int:
        """Drop every open connection; returns how many sockets were cut."""
        with self._lock:
            sockets = list(self._sockets)
        for sock in sockets:
            self._close(sock)
        self.cuts += 1
        return len(sockets)

    def close(self) -> None:
        self._closed = True
        self.listener.close()
        self.cut()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class DroppingRelay(Relay):
    """A Relay that loses `fraction` of the server's replies: the request has reached the
    server (and taken effect), then the connection is closed instead of the reply returned."""

    def __init__(
        self, target_host: str, target_port: int, *, fraction: float, seed: int = 0
    ) -> None:
        self.fraction = fraction
        self.replies = 0
        self.dropped = 0
        self._random = random.Random(seed)
        self._count_lock = threading.Lock()
        super().__init__(target_host, target_port)

    def _forward(self, data: bytes, replies: bool) -> bool:
        if not replies:
            return True
        with self._count_lock:
            self.replies += 1
            drop = self._random.random() < self.fraction
            if drop:
                self.dropped += 1
        return not drop
