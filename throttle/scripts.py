"""Running the gate's Lua scripts: EVALSHA straight through a connection, NOSCRIPT handled here.

`evalsha` sends one packed EVALSHA through a `Lane`: on a plain `redis.Redis` the lane hands
out a connection of its client's pool (and, for a client the gate made itself, keeps one at
hand between calls), any other client goes through its `execute_command`; a dropped
connection is retried as the client's own `Retry` says. A server that lost its scripts
(restart, SCRIPT FLUSH) answers NOSCRIPT once, the script is loaded and the call repeated.
A script written as a library (`LIBRARIES`: acquire.lua) goes as FCALL to a Redis function
library instead (Redis 7+), which builds its functions once, when it loads, not on every
call; a server without functions (Redis 6) or a user whose ACL forbids FCALL or FUNCTION
LOAD gets EVALSHA (one warning in the log), and a server that lost the library (restart,
FUNCTION FLUSH) answers "Function not found", and the library is loaded again (up to
LOADS times in a row, for a server flushed again meanwhile).
(The asyncio side, one pipeline per event-loop tick, is `throttle/batcher.py`.)
Arguments must already be bytes (see `encode`); errors are the client's own, for the
caller's `StoreErrors` to wrap.
"""

from __future__ import annotations

import hashlib
import logging
import os
import weakref
from collections.abc import Sequence
from importlib import resources
from typing import Any

import hiredis
import redis
from redis.exceptions import NoScriptError

EVALSHA = "EVALSHA"  # text: redis-py's cluster client routes by the command's name
FCALL = "FCALL"
LOADS = 3  # "Function not found" answered this often in a row (FUNCTION FLUSH again): raised
Command = tuple[str | bytes, ...]


# The scripts that read or write a tool's log: units.lua (what its entries weigh) goes first.
READ_UNITS = frozenset({"acquire", "release", "cooldown", "settle", "adapt"})


def _source(name: str) -> str:
    return resources.files("throttle").joinpath("lua", f"{name}.lua").read_text("utf-8")


# Scripts written as a library: they define `local function <name>(keys, args)`, which a
# script runs on every call and a Redis function library registers once (see LuaScript).
LIBRARIES = frozenset({"acquire"})


def _body(name: str) -> str:
    source = _source(name)
    return _source("units") + source if name in READ_UNITS else source


def load_script(name: str) -> str:
    """The source of `throttle/lua/<name>.lua` (shipped as package data), as Redis runs it."""
    body = _body(name)
    return body + f"\nreturn {name}(KEYS, ARGV)\n" if name in LIBRARIES else body


def encode(value: str | bytes | float) -> bytes:
    """One script argument: text as UTF-8, numbers by `repr`, whole ones without '.0'.

    (Lua's `tonumber` reads a whole number on strtod's fast path, in half the time.)
    """
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode()
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return b"%d" % value
    return repr(value).encode()


class LuaScript:
    """One script's source and SHA1; `sha` is what EVALSHA names. A library's (LIBRARIES)
    also has the function library's source, `library`, and the name FCALL calls, `function`
    (named after the SHA: versions of the package side by side load libraries of their own)."""

    __slots__ = ("function", "library", "sha", "source")

    def __init__(self, name: str) -> None:
        self.source = load_script(name)
        self.sha = hashlib.sha1(self.source.encode()).hexdigest().encode()
        self.function: bytes | None = None
        self.library = ""
        if name in LIBRARIES:
            function = f"throttle_{name}_{self.sha[:16].decode()}"
            self.function = function.encode()
            self.library = (f"#!lua name={function}\n{_body(name)}\nredis.register_function("
                            f"'{function}', function(keys, args) return {name}(keys, args) end)\n")

    def command(self, keys: Sequence[bytes], args: Sequence[bytes]) -> Command:
        """The EVALSHA command's arguments."""
        return (EVALSHA, self.sha, b"%d" % len(keys), *keys, *args)

    def fcall(self, keys: Sequence[bytes], args: Sequence[bytes]) -> Command:
        """The FCALL command's arguments (a library's only)."""
        assert self.function is not None
        return (FCALL, self.function, b"%d" % len(keys), *keys, *args)


def resp(args: Sequence[bytes]) -> bytes:
    """`args` as RESP bulk strings: a packed command's items, without its array header."""
    return b"".join([b"$%d\r\n%s\r\n" % (len(arg), arg) for arg in args])


def _direct(client: Any) -> bool:
    """Whether `client` is a plain pooled client whose connections can be used directly."""
    return type(client) is redis.Redis and client.connection is None


class Lane:
    """Where a client's script calls get their connection.

    A plain pooled client's connections are taken from its pool and given back after each
    call. With `keep`, one connection stays at hand between calls instead, while the pool
    has room for others: a process that makes one call at a time (a prefork pool process, a
    request thread) then skips the pool's lock and checks, about 20 µs of the caller's CPU a
    call, as much as the rest of a decision. Only for a client the gate made itself, so
    nothing but the gate uses its pool. A connection a call may have left out of step (a
    timeout, an exception raised into the call) is closed before it is kept or given back;
    a forked child starts with none at hand.
    """

    __slots__ = ("__weakref__", "_idle", "client", "direct", "functions", "keep", "pool")

    def __init__(self, client: Any, *, keep: bool = False) -> None:
        self.client = client
        self.functions = True  # (False once the server or the user's ACL refuses FCALL)
        self.direct = _direct(client)
        self.pool = client.connection_pool if self.direct else None
        self.keep = keep and self.direct
        self._idle: list[Any] = []
        _LANES.add(self)

    def take(self) -> Any:
        """A connection for one exchange; give it back with `give`."""
        try:
            return self._idle.pop()
        except IndexError:
            assert self.pool is not None
            return self.pool.get_connection()

    def give(self, conn: Any, *, in_step: bool = True) -> None:
        """Back after an exchange; `in_step` False: it may hold an unread answer."""
        if not in_step:
            conn.disconnect()  # (connects again when next used)
        assert self.pool is not None
        if self.keep and not self._idle and _room_left(self.pool):
            self._idle.append(conn)
        else:
            self.pool.release(conn)

    def close(self) -> None:
        """Give the connection kept at hand back to the pool (before the pool closes)."""
        while self._idle:
            assert self.pool is not None
            self.pool.release(self._idle.pop())

    def _forget(self) -> None:
        self._idle = []  # the parent's socket: never used or closed here


def _room_left(pool: Any) -> bool:
    """Whether `pool` can hand out another connection at once, so keeping one back makes no
    caller wait (a `BlockingConnectionPool` queues its free slots; no one waits while one is
    left, and a caller that waits gets the next connection given back)."""
    slots = getattr(pool, "pool", None)
    return slots is None or slots.qsize() > 0


_LANES: weakref.WeakSet[Lane] = weakref.WeakSet()


def _after_fork() -> None:
    for lane in list(_LANES):
        lane._forget()


os.register_at_fork(after_in_child=_after_fork)


def _send(conn: Any, packed: list[bytes]) -> Any:
    conn.send_packed_command(packed)
    return conn.read_response()


def _exchange(lane: Lane, do: Any) -> Any:
    """`do(conn)` on a connection of `lane`, retried as its client's `Retry` says."""
    conn = lane.take()
    in_step = False
    try:
        answer = conn.retry.call_with_retry(lambda: do(conn), lambda _error: conn.disconnect())
        in_step = True
    except redis.ResponseError:  # the server's answer, read in full
        in_step = True
        raise
    finally:
        lane.give(conn, in_step=in_step)
    return answer


def _run(lane: Lane, command: Command, packed: bytes | None = None) -> Any:
    if not lane.direct:
        return lane.client.execute_command(*command)
    sent = [packed or hiredis.pack_command(command)]  # type: ignore[arg-type]  # stub: 1-tuple
    return _exchange(lane, lambda conn: _send(conn, sent))


def evalsha(lane: Lane, script: LuaScript, keys: Sequence[bytes], args: Sequence[bytes],
            packed_fcall: bytes | None = None) -> Any:
    """Run `script` on a sync client; load it once if the server answers NOSCRIPT (or, for
    a library, "Function not found"). `packed_fcall`: its FCALL already packed (RESP)."""
    if script.function is not None and lane.functions:
        # (not built when it goes packed)
        command = () if packed_fcall and lane.direct else script.fcall(keys, args)
        try:
            for _ in range(LOADS - 1):
                try:
                    return _run(lane, command, packed_fcall)
                except redis.ResponseError as exc:
                    if not function_missing(exc):
                        raise
                load_library(lane.client, script)
            return _run(lane, command, packed_fcall)
        except redis.ResponseError as exc:
            if not functions_refused(exc):
                raise
            lane.functions = False
            functions_refused_warning(exc)
    command = script.command(keys, args)
    try:
        return _run(lane, command)
    except NoScriptError:
        lane.client.script_load(script.source)
        return _run(lane, command)


def function_missing(error: Exception) -> bool:
    """Whether `error` is FCALL's answer for a library the server does not hold."""
    return isinstance(error, redis.ResponseError) and str(error).startswith("Function not found")


def functions_refused(error: Exception) -> bool:
    """Whether `error` says this server has no functions (Redis 6) or this user may not call
    or load them (ACL): EVALSHA then."""
    text = str(error).lower()
    return isinstance(error, redis.ResponseError) and (
        text.startswith("unknown command")
        or (isinstance(error, redis.exceptions.NoPermissionError)
            and ("'fcall'" in text or "'function|load'" in text))
    )


def functions_refused_warning(error: Exception) -> None:
    """Say once per process that decisions fall back to EVALSHA, and why."""
    if not _WARNED:
        _WARNED.append(True)
        _log.warning(
            "throttle: the Redis server refused FCALL or FUNCTION LOAD (%s); decisions run as "
            "EVALSHA instead, which costs the server more per call. Use Redis 7 or later, and "
            "allow the gate's user +fcall and +function|load (docs/gate.md, ACL).", error)


_WARNED: list[bool] = []
_log = logging.getLogger("throttle.scripts")


def load_library(client: Any, script: LuaScript) -> None:
    """FUNCTION LOAD `script`'s library. With REPLACE: another process may be loading the
    same library (named after its source) at the same time, and on a cluster, where the load
    goes to every primary in turn, "already exists" on one would stop it before the rest."""
    client.function_load(script.library, replace=True)


def as_evalsha(script: LuaScript, command: Command) -> Command:
    """The EVALSHA of the same call as `command` (an FCALL of `script`)."""
    return (EVALSHA, script.sha, *command[2:])


def evalsha_many(lane: Lane, script: LuaScript, commands: Sequence[Command]) -> list[Any]:
    """Run many calls of `script` (its `command`s) in one round trip on a sync client.

    Each call's answer, or the server's error for that call; NOSCRIPT loads the script and
    repeats the calls it refused. A failed round trip raises. The calls must be safe to run
    twice (a dropped connection sends them again, as the client's `Retry` says).
    """
    answers = _pipeline(lane, commands)
    refused = [i for i, answer in enumerate(answers) if isinstance(answer, NoScriptError)]
    if refused:
        lane.client.script_load(script.source)
        again = _pipeline(lane, [commands[i] for i in refused])
        for i, answer in zip(refused, again, strict=True):
            answers[i] = answer
    return answers


def _pipeline(lane: Lane, commands: Sequence[Command]) -> list[Any]:
    if not lane.direct:  # a cluster or other client: its own pipeline
        pipe = lane.client.pipeline(transaction=False)
        for command in commands:
            pipe.execute_command(*command)
        return list(pipe.execute(raise_on_error=False))
    packed = [b"".join(hiredis.pack_command(command)  # type: ignore[arg-type]
                       for command in commands)]

    def exchange(conn: Any) -> list[Any]:
        conn.send_packed_command(packed)
        answers: list[Any] = []
        for _ in commands:
            try:
                answers.append(conn.read_response())
            except redis.ResponseError as exc:  # read in full: still in step
                answers.append(exc)
        return answers

    return list(_exchange(lane, exchange))


class Sent:
    """An EVALSHA already sent, whose answer `answer()` reads later: the caller overlaps its
    round trip with other work (`.delay()` publishes meanwhile).

    On a plain pooled client the command goes out on a connection held until `answer()`;
    any other client runs it at once. The script must be safe to run twice: a connection
    dropped before the answer runs it again, as NOSCRIPT does.
    """

    __slots__ = ("_answer", "_args", "_conn", "_keys", "_lane", "_script")

    def __init__(
        self, lane: Lane, script: LuaScript, keys: Sequence[bytes], args: Sequence[bytes]
    ) -> None:
        self._lane, self._script, self._keys, self._args = lane, script, keys, args
        self._conn: Any = None
        self._answer: Any = None
        if not lane.direct:
            self._answer = evalsha(lane, script, keys, args)
            return
        packed = [hiredis.pack_command(script.command(keys, args))]  # type: ignore[arg-type]
        conn = lane.take()
        try:
            conn.retry.call_with_retry(
                lambda: conn.send_packed_command(packed), lambda _error: conn.disconnect()
            )
        except BaseException:
            lane.give(conn, in_step=False)
            raise
        self._conn = conn

    def answer(self) -> Any:
        """The script's answer (waits for it); call once."""
        conn, self._conn = self._conn, None
        if conn is None:
            return self._answer
        in_step = False
        try:
            answer = conn.read_response()
            in_step = True
            return answer
        except (NoScriptError, redis.ConnectionError):  # loaded, or sent again, by evalsha
            in_step = True  # (a dropped connection is already closed)
        except redis.ResponseError:
            in_step = True
            raise
        finally:
            self._lane.give(conn, in_step=in_step)
        return evalsha(self._lane, self._script, self._keys, self._args)
