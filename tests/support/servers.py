"""Servers a test starts on 127.0.0.1 (exporter, Flower, Prometheus): free ports, readiness, stop.

Private `redis-server` processes too, for tests that break the server: `private_redis(dir)`
starts one (no persistence unless asked) and kills it afterwards; `RedisServer.kill()`,
`stop()` and `restart()` break it on purpose; `redis_cluster(dir)` starts a Redis Cluster of
primaries; `make_tls_files(dir)` makes a self-signed CA and a certificate for 127.0.0.1.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import redis
import tomli_w

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def write_config(config: Mapping[str, Any], path: Path) -> Path:
    """Write a tools config (a mapping) as the TOML file the commands take with --config."""
    path.write_text(tomli_w.dumps(config), encoding="utf-8")
    return path


def wait_http(url: str, proc: subprocess.Popen[bytes], log: Path, timeout_s: float = 30,
              **kwargs: Any) -> None:
    """Wait until `url` answers (any status), or fail with the server's log."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log.read_text()[-3000:]
            raise RuntimeError(f"{url}: server exited {proc.returncode}:\n{tail}")
        try:
            httpx.get(url, timeout=2, **kwargs)
            return
        except httpx.TransportError:
            time.sleep(0.2)
    raise RuntimeError(f"{url} did not answer in {timeout_s}s:\n{log.read_text()[-3000:]}")


def stop(proc: subprocess.Popen[bytes], timeout_s: float = 15) -> None:
    """SIGTERM the process (and its process group), then SIGKILL if it lingers."""
    if proc.poll() is None:
        with suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            with suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@contextmanager
def server(cmd: Sequence[str], log: Path, ready_url: str, *, env: Mapping[str, str] | None = None,
           timeout_s: float = 30, **http: Any) -> Iterator[subprocess.Popen[bytes]]:
    """Run `cmd` in its own process group until the block ends; ready once `ready_url` answers."""
    with open(log, "wb") as out:
        proc = subprocess.Popen(list(cmd), cwd=ROOT, env=dict(env or os.environ), stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_http(ready_url, proc, log, timeout_s, **http)
        yield proc
    finally:
        stop(proc)


def throttle_cmd(*args: str) -> list[str]:
    """The `throttle` command line, run with this interpreter."""
    return [sys.executable, "-m", "throttle.cli", *args]


# -- private redis-server processes ---------------------------------------------------------

READY = b"Ready to accept connections"


@dataclass
class RedisServer:
    """One `redis-server` on 127.0.0.1:`port`, its data and log in `workdir`.

    `appendonly` keeps an append-only file in `workdir` (so `restart()` keeps the data);
    `args` are extra server options, e.g. `["--cluster-enabled", "yes"]`; `tls_port` adds a
    TLS listener (with the certificate options of `TlsFiles.server_args()` in `args`).
    """

    workdir: Path
    port: int = field(default_factory=free_port)
    appendonly: bool = False
    args: Sequence[str] = ()
    tls_port: int | None = None
    proc: subprocess.Popen[bytes] | None = None

    @property
    def log_path(self) -> Path:
        return self.workdir / "redis.log"

    def url(self, db: int = 0, *, user: str | None = None, password: str | None = None) -> str:
        """The server's `redis://` URL (with credentials when given)."""
        auth = f"{user or ''}:{password}@" if password is not None else ""
        return f"redis://{auth}127.0.0.1:{self.port}/{db}"

    def client(self, db: int = 0, **options: Any) -> redis.Redis:
        """A redis-py client of the default user, on the plain port."""
        return redis.Redis(host="127.0.0.1", port=self.port, db=db, **options)

    def command(self) -> list[str]:
        cmd = [
            shutil.which("redis-server") or "redis-server",
            "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
            "--appendonly", "yes" if self.appendonly else "no",
            "--dir", str(self.workdir), "--daemonize", "no", "--protected-mode", "no",
        ]
        if self.tls_port is not None:
            cmd += ["--tls-port", str(self.tls_port)]
        return [*cmd, *self.args]

    def start(self, timeout_s: float = 15.0) -> RedisServer:
        """Start the server and wait until it accepts connections."""
        if self.running:
            raise RuntimeError(f"redis-server on port {self.port} is already running")
        self.workdir.mkdir(parents=True, exist_ok=True)
        seen = self.log_path.stat().st_size if self.log_path.exists() else 0
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.command(), stdout=log, stderr=subprocess.STDOUT, cwd=self.workdir
            )
        deadline = time.monotonic() + timeout_s
        while READY not in self.log_path.read_bytes()[seen:]:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.kill()
                tail = self.log_path.read_text(errors="replace")[-2000:]
                raise RuntimeError(f"redis-server on port {self.port} did not start:\n{tail}")
            time.sleep(0.02)
        return self

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM (the server writes its append-only file first), wait; SIGKILL if stuck."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.kill()
        self.proc = None

    def kill(self) -> None:
        """SIGKILL the server: it dies at once, as in a crash."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self.proc = None

    def restart(self, *, hard: bool = False, down_s: float = 0.0) -> None:
        """Stop (SIGKILL when `hard`), stay down `down_s`, start again on the same port."""
        if hard:
            self.kill()
        else:
            self.stop()
        time.sleep(down_s)
        self.start()


@contextmanager
def private_redis(
    workdir: Path, *, appendonly: bool = False, args: Sequence[str] = (), **options: Any
) -> Iterator[RedisServer]:
    """A started RedisServer in `workdir`; killed when the block ends."""
    redis_server = RedisServer(workdir, appendonly=appendonly, args=args, **options)
    redis_server.start()
    try:
        yield redis_server
    finally:
        redis_server.kill()


@contextmanager
def redis_cluster(workdir: Path, primaries: int = 3) -> Iterator[list[RedisServer]]:
    """A Redis Cluster of `primaries` nodes (no replicas) on loopback, slots spread evenly."""
    with ExitStack() as stack:
        nodes = [
            stack.enter_context(
                private_redis(
                    workdir / f"node{index}",
                    args=[
                        "--cluster-enabled", "yes", "--cluster-node-timeout", "5000",
                        "--cluster-port", str(free_port()),  # not port + 10000: may be > 65535
                    ],
                )
            )
            for index in range(primaries)
        ]
        subprocess.run(
            [
                shutil.which("redis-cli") or "redis-cli", "--cluster", "create",
                *(f"127.0.0.1:{node.port}" for node in nodes),
                "--cluster-replicas", "0", "--cluster-yes",
            ],
            check=True, capture_output=True, timeout=30,
        )
        deadline = time.monotonic() + 20
        for node in nodes:
            client = node.client()
            while b"cluster_state:ok" not in client.execute_command("CLUSTER", "INFO"):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"cluster node {node.port} never reached cluster_state:ok")
                time.sleep(0.05)
            client.close()
        yield nodes


@dataclass(frozen=True)
class TlsFiles:
    """A self-signed CA and a server certificate (and key) for 127.0.0.1 signed by it."""

    ca: Path
    cert: Path
    key: Path

    def server_args(self) -> list[str]:
        return [
            "--tls-cert-file", str(self.cert), "--tls-key-file", str(self.key),
            "--tls-ca-cert-file", str(self.ca), "--tls-auth-clients", "no",
        ]


def make_tls_files(directory: Path) -> TlsFiles:
    """Make a CA and a server certificate valid for IP 127.0.0.1 with the openssl CLI."""
    openssl = shutil.which("openssl")
    if openssl is None:
        raise FileNotFoundError("the openssl command is not installed")
    directory.mkdir(parents=True, exist_ok=True)
    files = TlsFiles(directory / "ca.crt", directory / "server.crt", directory / "server.key")
    ca_key, csr, ext = directory / "ca.key", directory / "server.csr", directory / "san.ext"
    ext.write_text("subjectAltName = IP:127.0.0.1\n")

    def run(*args: str | Path) -> None:
        subprocess.run([openssl, *map(str, args)], check=True, capture_output=True, timeout=30)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", ca_key, "-out", files.ca,
        "-days", "2", "-subj", "/CN=throttle test CA")
    run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", files.key, "-out", csr,
        "-subj", "/CN=127.0.0.1")
    run("x509", "-req", "-in", csr, "-CA", files.ca, "-CAkey", ca_key, "-CAcreateserial",
        "-out", files.cert, "-days", "2", "-extfile", ext)
    return files


def tls_supported() -> bool:
    """Whether this redis-server was built with TLS (it accepts the tls-port option)."""
    binary = shutil.which("redis-server")
    if binary is None:
        return False
    probe = subprocess.run(
        [binary, "--port", "0", "--tls-port", "0"], capture_output=True, timeout=10
    )
    return b"FATAL" not in probe.stdout + probe.stderr
