"""`throttle stub-llm`: run the OpenAI-compatible stub upstream."""

from __future__ import annotations

import logging
import sys

import click

from throttle.errors import MissingExtra
from throttle.extras import require_extra
from throttle.stub.behaviour import StubSettings


@click.command("stub-llm")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to bind (0.0.0.0 inside a container).")
@click.option("--port", default=8089, show_default=True, type=click.IntRange(0, 65535),
              help="Port to bind; 0 picks a free one (printed at start).")
@click.option("--model", default="stub-1", show_default=True, help="Model name it reports.")
@click.option("--latency", "latency_s", default=0.0, show_default=True,
              type=click.FloatRange(0, 600), help="Seconds before each answer.")
@click.option("--api-key", default="", envvar="THROTTLE_STUB_API_KEY",
              help="Require this bearer key (default: accept any). Env: THROTTLE_STUB_API_KEY.")
@click.option("--busy-every", default=0, type=click.IntRange(min=0),
              help="Answer every Nth request with 429.")
@click.option("--retry-after", "retry_after_s", default=1.0, show_default=True,
              type=click.FloatRange(0, 86_400), help="Seconds the 429s ask to wait.")
@click.option("--retry-style", default="seconds", show_default=True,
              type=click.Choice(["seconds", "ms", "date", "reset"]),
              help="How 429s say it: Retry-After seconds, retry-after-ms, Retry-After as an "
                   "HTTP date, or x-ratelimit-reset-* durations.")
@click.option("--fail-every", default=0, type=click.IntRange(min=0),
              help="Answer every Nth request with --fail-status.")
@click.option("--fail-status", default=500, show_default=True, type=click.IntRange(400, 599))
@click.option("--hidden-requests", default=0, type=click.IntRange(min=0),
              help="Serve at most this many requests per --hidden-window; 429 past it.")
@click.option("--hidden-tokens", default=0, type=click.IntRange(min=0),
              help="Serve at most this many tokens per --hidden-window; 429 past it.")
@click.option("--hidden-window", "hidden_window_s", default=60.0, show_default=True,
              type=click.FloatRange(0.001, 86_400), help="Seconds of the hidden limits' window.")
@click.option("--limit-headers", default="none", show_default=True,
              type=click.Choice(["openai", "anthropic", "none"]),
              help="How answers report the hidden limits: x-ratelimit-* (OpenAI), "
                   "anthropic-ratelimit-* (Anthropic), or not at all.")
def stub_llm(host: str, port: int, **options: object) -> None:
    """An OpenAI-compatible POST /v1/chat/completions stub on HOST:PORT.

    Answers with a call of the forced tool (arguments valid against its schema) and real
    `usage` numbers. Change its behaviour at run time with POST /_stub/config (e.g.
    {"busy_for_s": 3, "retry_after_s": 3}); read GET /_stub/stats; POST /_stub/reset.
    """
    try:
        require_extra("demo", "throttle stub-llm", ("tornado",))
    except MissingExtra as exc:
        raise click.ClickException(str(exc)) from None
    from throttle.stub.server import serve

    settings = StubSettings.model_validate(options)
    # tornado logs every 4xx and 5xx it answers (method, path, client, time; no headers).
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")

    def ready(bound: int) -> None:
        click.echo(f"stub-llm listening on http://{host}:{bound}/v1 "
                   "(admin: /_stub/config, /_stub/stats, /_stub/reset)")
        sys.stdout.flush()

    try:
        serve(settings, host, port, ready)
    except OSError as exc:
        raise click.ClickException(
            f"cannot listen on {host}:{port} ({exc.strerror}); pick another --port or stop "
            "what uses it") from None
