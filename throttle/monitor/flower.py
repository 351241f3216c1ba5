"""`throttle flower`: Flower on loopback, behind basic auth unless told otherwise.

Credentials come from the environment, never from the command line (where `ps` shows
them): FLOWER_BASIC_AUTH=user:password (Flower's own variable; several pairs may be
comma-separated), or THROTTLE_FLOWER_USER and THROTTLE_FLOWER_PASSWORD. The password is
handed to Flower through its environment and never printed.
"""

from __future__ import annotations

import os
import shlex
import sys
from importlib.resources import files
from typing import Any

import click

from throttle.errors import MissingExtra
from throttle.extras import require_extra

AUTH_ENV = "FLOWER_BASIC_AUTH"
USER_ENV, PASSWORD_ENV = "THROTTLE_FLOWER_USER", "THROTTLE_FLOWER_PASSWORD"
# Fields of throttle's task-delayed / task-fallback events that Flower should show.
CALL_FIELDS = ("decision", "reason", "wait_s", "delays", "first_sent")

HOW_TO = (
    "Flower needs credentials: set FLOWER_BASIC_AUTH=user:password, or "
    f"{USER_ENV} and {PASSWORD_ENV}, in the environment (not on the command line), e.g.\n"
    f"  export {USER_ENV}=admin {PASSWORD_ENV}=\"$(openssl rand -hex 16)\"\n"
    "or pass --insecure-no-auth to serve it without a login (anyone who reaches the port "
    "can then see every call's arguments and revoke tasks)."
)


def show_call_fields(task_class: Any = None) -> None:
    """Make Flower list throttle's call fields for each task (in its page and API).

    Flower shows (and copies tasks by) the fields of Celery's event-state `Task`; events
    keep the others but they never show. Adds: the last decision as the worker logs it
    ("delayed 42.0 s (pool api/standard)"), its reason and wait, how often the call was
    delayed, and when it was first sent (re-publishing keeps that time). Run in Flower's
    process only (flower_conf.py).
    """
    if task_class is None:
        from celery.events.state import Task

        task_class = Task
    for name in CALL_FIELDS:
        if not hasattr(task_class, name):
            setattr(task_class, name, None)
    missing = tuple(name for name in CALL_FIELDS if name not in task_class._fields)
    task_class._fields = (*task_class._fields, *missing)


def basic_auth_from_env(env: dict[str, str]) -> str | None:
    """The `user:password[,user:password]` Flower should require, or None when unset."""
    if env.get(AUTH_ENV):
        return env[AUTH_ENV]
    user, password = env.get(USER_ENV), env.get(PASSWORD_ENV)
    if user and password:
        return f"{user}:{password}"
    return None


def check_basic_auth(value: str) -> list[str]:
    """The user names of a basic-auth setting; raises ValueError when a pair is malformed."""
    users = []
    for pair in value.split(","):
        user, sep, password = pair.partition(":")
        if not (user and sep and password):
            raise ValueError("each credential must read user:password, both non-empty "
                             "(and no comma inside a password)")
        users.append(user)
    return users


@click.command(
    context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
    short_help="Run Flower for the workers' app, with basic auth.",
)
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to bind (0.0.0.0 inside a container).")
@click.option("--port", default=5555, show_default=True, type=click.IntRange(0, 65535))
@click.option("--app", "app_name", default="workers", show_default=True,
              help="The Celery app module (celery -A).")
@click.option("--insecure-no-auth", is_flag=True,
              help="Serve Flower without a login (not recommended).")
@click.argument("flower_args", nargs=-1, type=click.UNPROCESSED, metavar="[FLOWER OPTIONS]")
def flower(host: str, port: int, app_name: str, insecure_no_auth: bool,
           flower_args: tuple[str, ...]) -> None:
    """Run `celery -A workers flower` on --host:--port with basic auth from the environment.

    Workers must send task events for Flower to show calls: the deployable app
    (workers/celery.py) turns them on; other apps need `celery worker -E`. Task pages show
    each call's decision, reason, wait, delays and first-sent time
    (throttle/monitor/flower_conf.py as Flower's --conf; a --conf of your own replaces it:
    call `throttle.monitor.flower.show_call_fields()` in it to keep them).
    """
    try:
        require_extra("flower", "throttle flower")
    except MissingExtra as exc:
        raise click.ClickException(str(exc)) from None
    env = dict(os.environ)
    auth = basic_auth_from_env(env)
    if any(arg.startswith("--basic-auth") or arg.startswith("--basic_auth") for arg in flower_args):
        raise click.UsageError(f"pass credentials in the environment, not on the command "
                               f"line (other users can read it); {HOW_TO}")
    if auth is None and not insecure_no_auth:
        click.echo(HOW_TO, err=True)
        sys.exit(2)
    note = "without authentication"
    if auth is not None:
        try:
            users = check_basic_auth(auth)
        except ValueError as exc:
            raise click.UsageError(f"bad Flower credentials: {exc}") from None
        env[AUTH_ENV] = auth
        note = f"basic auth for {', '.join(users)}"
    argv = [sys.executable, "-m", "celery", "-A", app_name, "flower", f"--address={host}",
            f"--port={port}", *flower_args]
    if not any(arg.startswith("--conf") for arg in flower_args):
        argv.append(f"--conf={files('throttle.monitor') / 'flower_conf.py'}")
    click.echo(f"exec {shlex.join(['celery', *argv[3:]])} ({note})", err=True)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, argv, env)
