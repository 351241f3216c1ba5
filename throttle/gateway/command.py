"""`throttle gateway`: serve the OpenAI-compatible gateway with uvicorn.

FastAPI and uvicorn are imported when the command runs, not when `throttle` starts.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import sys
from importlib.util import find_spec
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from throttle.errors import ThrottleError
from throttle.extras import require_extra
from throttle.gateway.callers import KEYS_FILE_VARIABLE, KEYS_VARIABLE, callers_from_env
from throttle.gateway.settings import (
    DEFAULT_BODY_THREADS,
    DEFAULT_MAX_BODY_BYTES,
    DEFAULT_PUBLISH_THREADS,
    DEFAULT_RUN_TIMEOUT_S,
    DEFAULT_TOOL,
    GatewaySettings,
)
from throttle.monitor.sources import resolve_sources, source_options
from throttle.store import STORE_ERRORS, connect, mask_url

if TYPE_CHECKING:
    import uvicorn

logger = logging.getLogger("throttle.gateway")


@click.command("gateway", short_help="Serve an OpenAI-compatible API over the throttled tools.")
@source_options
@click.option("--result-backend", envvar="THROTTLE_RESULT_BACKEND", metavar="URL",
              help="Where the workers store results (default: the Redis URL) "
              "[env THROTTLE_RESULT_BACKEND].")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to bind; other than loopback, THROTTLE_GATEWAY_KEYS must be set.")
@click.option("--port", default=8080, show_default=True, type=click.IntRange(0, 65535),
              help="Port to bind; 0 picks a free one (printed at start).")
@click.option("--default-tool", default=DEFAULT_TOOL, show_default=True,
              help="The tool that gates requests forcing no configured chat tool.")
@click.option("--max-body-bytes", default=DEFAULT_MAX_BODY_BYTES, show_default=True,
              type=click.IntRange(min=1024), help="Larger request bodies get a 413.")
@click.option("--run-timeout", "run_timeout_s", default=DEFAULT_RUN_TIMEOUT_S,
              show_default=True, type=click.FloatRange(min=0.1),
              help="Seconds a call may take after its deadline (the body's own run) before "
              "the gateway answers 504.")
@click.option("--publish-threads", default=DEFAULT_PUBLISH_THREADS, show_default=True,
              type=click.IntRange(1, 256), help="Threads that publish calls to the broker.")
@click.option("--direct", metavar="MODULE:FUNCTION", envvar="THROTTLE_GATEWAY_DIRECT",
              help="Direct mode: gate each call here and run this tool body in the gateway "
              "(e.g. workers.tools.llm:chat_completion), with no broker or worker in between "
              "[env THROTTLE_GATEWAY_DIRECT].")
@click.option("--body-threads", default=DEFAULT_BODY_THREADS, show_default=True,
              type=click.IntRange(1, 1024),
              help="Direct mode: threads that run bodies (the most calls at the upstream at once).")
@click.option("--log-level", default="info", show_default=True,
              type=click.Choice(["critical", "error", "warning", "info", "debug"]))
@click.option("--access-log/--no-access-log", default=True, show_default=True,
              help="Log one line per request (method, path, status; never headers).")
def gateway(
    config_path: Path | None, prefix: str, broker_url: str | None, redis_url: str,
    result_backend: str | None, host: str, port: int, log_level: str, access_log: bool,
    **options: Any,
) -> None:
    """An OpenAI-compatible POST /v1/chat/completions on HOST:PORT, throttled per tool.

    Each request becomes a call of a throttle tool (the forced function's, when it is a
    configured chat tool, else --default-tool) and is answered once a worker ran it: the
    completion, or a 429 with Retry-After and the tool's fallback (a 400 for a call costing
    more than a limit allows). Callers' keys are checked
    against THROTTLE_GATEWAY_KEYS (tenant:key,...; none set: any caller, on loopback only),
    and the key's tenant keys the limits; the workers call the upstream with their own
    THROTTLE_LLM_API_KEY. See docs/gateway.md.
    """
    try:
        require_extra("gateway", "throttle gateway")
        sources = resolve_sources(redis_url, broker_url, prefix, config_path)
        settings = GatewaySettings(
            config=sources.config, redis_url=sources.redis_url, broker_url=sources.broker_url,
            result_backend=result_backend or sources.redis_url, prefix=sources.prefix,
            callers=callers_from_env(), **options,
        )
    except ThrottleError as exc:
        raise click.ClickException(str(exc)) from None
    if settings.callers.open and not _is_loopback(host):
        raise click.ClickException(
            f"--host {host} is reachable from other hosts, and no caller key is set: any "
            f"caller could spend the upstream's budget as anyone. Set {KEYS_VARIABLE}="
            f"tenant:key,... (or {KEYS_FILE_VARIABLE}=<file>), or bind --host 127.0.0.1")
    _check_reachable(settings)
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(name)s: %(message)s")
    try:
        sock = _bind(host, port)
    except OSError as exc:
        raise click.ClickException(f"cannot listen on {host}:{port} ({exc.strerror}); pick "
                                   "another --port or stop what uses it") from None
    _serve(settings, sock, host, log_level=log_level, access_log=access_log)


def _serve(settings: GatewaySettings, sock: socket.socket, host: str, *, log_level: str,
           access_log: bool) -> None:
    """Run uvicorn on the bound socket; say where it listens once it accepts requests."""
    import uvicorn

    from throttle.gateway.app import make_app

    where = f"[{host}]" if ":" in host else host

    class Server(uvicorn.Server):
        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            await super().startup(sockets)
            if self.started and sockets:
                port = sockets[0].getsockname()[1]
                click.echo(f"gateway listening on http://{where}:{port}/v1 "
                           "(POST /v1/chat/completions, GET /metrics, GET /healthz)")
                sys.stdout.flush()

    Server(server_config(make_app(settings), log_level=log_level,
                         access_log=access_log)).run(sockets=[sock])


def server_config(app: Any, *, log_level: str, access_log: bool) -> uvicorn.Config:
    """uvicorn's settings for the gateway: httptools parses HTTP and uvloop runs the event
    loop (where the platform has it), which about halves the HTTP server's own CPU per
    request against h11 and asyncio's loop (docs/gateway.md, "Cost")."""
    import uvicorn

    return uvicorn.Config(app, log_level=log_level, access_log=access_log, lifespan="on",
                          timeout_graceful_shutdown=10, http="httptools",
                          loop="uvloop" if find_spec("uvloop") else "asyncio")


def _check_reachable(settings: GatewaySettings) -> None:
    """Fail at start, with what to fix, when Redis or the result backend does not answer."""
    for name, url, variable in (("gate's Redis", settings.redis_url, "THROTTLE_REDIS_URL"),
                                ("result backend", settings.result_backend,
                                 "THROTTLE_RESULT_BACKEND")):
        try:
            client = connect(url, socket_timeout=3, socket_connect_timeout=3)
            try:
                client.ping()
            finally:
                client.close()
        except STORE_ERRORS as exc:
            raise click.ClickException(f"the {name} at {mask_url(url)} does not answer ({exc}); "
                                       f"start it or set {variable}") from None


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP, not 0: asyncio turns Nagle off (TCP_NODELAY) only on sockets that say
    # so, and with Nagle on, every answer waited ~40 ms for the client's delayed ACK.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"
