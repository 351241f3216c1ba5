"""The gateway's HTTP server: uvicorn with the C parser and event loop the gateway extra ships."""

from __future__ import annotations

import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from throttle.extras import EXTRAS
from throttle.gateway.command import server_config

ROOT = Path(__file__).resolve().parents[2]


async def _app(scope: Any, receive: Any, send: Any) -> None:
    """An ASGI app that is never called: the test only loads the server's settings."""


def test_the_gateway_parses_http_with_httptools() -> None:
    config = server_config(_app, log_level="warning", access_log=False)
    config.load()
    assert config.http_protocol_class is HttpToolsProtocol


@pytest.mark.skipif(sys.platform == "win32", reason="uvloop does not run on Windows")
def test_the_gateway_runs_on_uvloop_where_the_platform_has_it() -> None:
    import uvloop

    factory = server_config(_app, log_level="warning", access_log=False).get_loop_factory()
    assert factory is not None
    loop = factory()
    try:
        assert isinstance(loop, uvloop.Loop)
    finally:
        loop.close()


def test_the_gateway_extra_installs_what_the_server_uses() -> None:
    document = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    extra = " ".join(document["project"]["optional-dependencies"]["gateway"])
    for package in ("fastapi", "uvicorn", "httptools", "uvloop"):
        assert package in extra
    assert "httptools" in EXTRAS["gateway"]
