"""Optional parts of throttle and the extra that installs each.

`pip install throttle` is the library a web app needs (Celery, Redis, the gate, the
`throttle` command's check / worker / status / top / exporter). The rest are extras:

    gateway   fastapi, uvicorn, httptools, uvloop (not on Windows),  throttle gateway
              aiohttp, jsonschema-rs (optional: a faster schema check)
    demo      fakeredis[lua], matplotlib, tomli-w, tornado   throttle demo, stub-llm
    flower    flower                     throttle flower
    testing   fakeredis[lua], pytest, pytest-celery    throttle.testing (tests of your tools)
    gevent    gevent                     throttle worker TOOL -P gevent
    eventlet  eventlet                   throttle worker TOOL -P eventlet
    all       every extra above but eventlet
"""

from __future__ import annotations

from importlib.util import find_spec

from throttle.errors import MissingExtra

EXTRAS: dict[str, tuple[str, ...]] = {
    "gateway": ("fastapi", "uvicorn", "httptools", "aiohttp"),
    "demo": ("fakeredis", "lupa", "matplotlib", "tomli_w", "tornado"),
    "flower": ("flower",),
    "gevent": ("gevent",),
    "eventlet": ("eventlet",),
    "testing": ("fakeredis", "lupa", "pytest", "pytest_celery"),
}


def require_extra(extra: str, what: str, modules: tuple[str, ...] | None = None) -> None:
    """Raise `MissingExtra` naming `extra` when one of `modules` (default: every module the
    extra installs) is not importable."""
    missing = [module for module in modules or EXTRAS[extra] if find_spec(module) is None]
    if missing:
        raise MissingExtra(
            f"{what} needs {', '.join(missing)}, which the {extra!r} extra installs: "
            f"pip install 'throttle[{extra}]'"
        )
