"""Running the gate's Lua scripts on an asyncio client, pipelined on one connection.

`Batcher` gathers the calls made in one event-loop tick, of any script, into one write on
the connection it keeps while calls are in flight, and writes the next tick's calls behind
them without waiting for their answers: Redis works on one batch while the caller builds the
next. Each call is answered (or failed) on its own. Arguments must already be bytes
(`scripts.encode`); errors are the client's own, for the caller's `StoreErrors` to wrap.
"""

from __future__ import annotations

import asyncio
import math
from collections import deque
from collections.abc import Awaitable, Coroutine, Sequence
from typing import Any

import hiredis
import redis
import redis.asyncio
from redis._parsers.hiredis import NOT_ENOUGH_DATA
from redis.exceptions import NoScriptError

from throttle.scripts import (
    FCALL,
    LOADS,
    Command,
    LuaScript,
    as_evalsha,
    function_missing,
    functions_refused,
    functions_refused_warning,
)

# A tick's calls are written as soon as this many are made (the rest at the end of the
# tick): the server starts on them while the caller makes the others.
BATCH_MAX = 16


async def load_library_async(client: Any, script: LuaScript) -> None:
    """`load_library` on an asyncio client."""
    await client.function_load(script.library, replace=True)


async def fcall_async(
    client: Any, script: LuaScript, keys: Sequence[bytes], args: Sequence[bytes]
) -> Any:
    """A library's FCALL on an asyncio client; loads the library once if the server answers
    "Function not found" (refusals of FCALL or FUNCTION LOAD are raised)."""
    command = script.fcall(keys, args)
    for _ in range(LOADS - 1):
        try:
            return await client.execute_command(*command)
        except redis.ResponseError as exc:
            if not function_missing(exc):
                raise
        await load_library_async(client, script)
    return await client.execute_command(*command)


async def evalsha_async(
    client: Any, script: LuaScript, keys: Sequence[bytes], args: Sequence[bytes]
) -> Any:
    """`evalsha` on an asyncio client."""
    command = script.command(keys, args)
    try:
        return await client.execute_command(*command)
    except NoScriptError:
        await client.script_load(script.source)
        return await client.execute_command(*command)


# A call in flight: its script, keys, args, whether it is a FCALL, its packed command
# (RESP), and the future its caller awaits.
Call = tuple[LuaScript, Sequence[bytes], Sequence[bytes], bool, bytes, "asyncio.Future[Any]"]


def _refused(answer: Any) -> bool:
    """Whether `answer` refuses a call for want of its script or library (sent again)."""
    return isinstance(answer, redis.ResponseError) and (
        isinstance(answer, NoScriptError) or function_missing(answer)
        or functions_refused(answer))


def _reader_of(conn: Any) -> hiredis.Reader | None:
    """The hiredis reader redis-py parses `conn`'s answers with (None: another parser)."""
    reader = getattr(conn._parser, "_reader", None)
    return reader if isinstance(reader, hiredis.Reader) else None


def _answer(future: asyncio.Future[Any], answer: Any) -> None:
    """Give a call its answer (an exception raises in its caller); a cancelled one has none."""
    if future.done():
        return
    if isinstance(answer, Exception):
        future.set_exception(answer)
    else:
        future.set_result(answer)


def _answer_all(futures: Sequence[asyncio.Future[Any]], error: BaseException) -> None:
    """Fail every call with `error` (cancel them, when it is no Exception: the loop closes)."""
    for future in futures:
        if not isinstance(error, Exception):
            future.cancel()  # (a no-op once done)
        elif not future.done():
            future.set_exception(error)


class Batcher:
    """Runs the script calls made in the same event-loop tick as one write, whichever scripts
    they call (a tick's acquires and settles share one round trip), on one connection kept
    while calls are in flight: a tick's calls go out behind the last tick's, unanswered.

    Each `run` gets its own answer or its own exception, as if it had been sent alone: a
    dropped connection sends the unanswered calls again (as the client's `Retry` says), a
    server that does not answer within the socket timeout fails every call in flight, a
    script error fails only its call, and NOSCRIPT loads the scripts it names and repeats
    just the calls it refused (as "Function not found" loads the library, and a server or
    ACL without functions turns to EVALSHA from then on). A call may wait up to its `wait_s`
    for later calls to share its round trip (a settle: no one waits for it). Cluster clients
    are not batched (a pipeline there spans nodes).
    """

    def __init__(self, client: Any) -> None:
        self.client = client
        self.batched = type(client) is redis.asyncio.Redis
        self.functions = True  # (False once the server or the user's ACL refuses FCALL)
        self._pending: list[Call] = []  # made this tick, not written yet
        self._soon = False  # a flush is due this tick
        self._later: asyncio.TimerHandle | None = None  # a flush is due by a deadline
        self._tasks: set[asyncio.Task[None]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None  # the one loop it runs on
        # The line: a connection and the task reading its answers, while calls are in flight.
        self._line: asyncio.Task[None] | None = None
        self._conn: Any = None  # the line's connection, while calls can be written on it
        self._sent: deque[deque[Call]] = deque()  # written, unanswered, batch by batch
        self._unsent: list[Call] = []  # to write when the connection is (again) writable

    def run(self, script: LuaScript, keys: Sequence[bytes], args: Sequence[bytes],
            *, wait_s: float = 0.0, packed_fcall: bytes | None = None) -> Awaitable[Any]:
        """`script`'s answer to one call (to await), sent with this tick's calls, or with
        those of the next `wait_s` seconds. `packed_fcall`: its FCALL already packed (RESP).
        (A future, not a coroutine: its caller resumes one frame less deep.)"""
        if not self.batched:
            return self._alone(script, keys, args)
        loop = asyncio.get_running_loop()
        if loop is not self._loop:
            self._bind(loop)
        future: asyncio.Future[Any] = loop.create_future()
        if self.functions and script.function is not None:
            packed = packed_fcall or hiredis.pack_command(
                script.fcall(keys, args))  # type: ignore[arg-type]
            self._pending.append((script, keys, args, True, packed, future))
        else:
            packed = hiredis.pack_command(script.command(keys, args))  # type: ignore[arg-type]
            self._pending.append((script, keys, args, False, packed, future))
        if self._soon:
            if len(self._pending) >= BATCH_MAX and self._conn is not None:
                batch, self._pending = self._pending, []
                self._write(batch)
        elif wait_s <= 0:
            self._soon = True
            loop.call_soon(self._flush)
        elif self._later is None or loop.time() + wait_s < self._later.when():
            if self._later is not None:
                self._later.cancel()
            self._later = loop.call_at(loop.time() + wait_s, self._flush)
        return future

    async def _alone(self, script: LuaScript, keys: Sequence[bytes],
                     args: Sequence[bytes]) -> Any:
        """One call on a client that is not batched (a cluster's)."""
        if self.functions and script.function is not None:
            try:
                return await fcall_async(self.client, script, keys, args)
            except redis.ResponseError as exc:
                if not functions_refused(exc):
                    raise
                self._no_functions(exc)
        return await evalsha_async(self.client, script, keys, args)

    def _bind(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._loop is not None:
            raise RuntimeError(
                "this AsyncGate was first used on another event loop, and its Redis "
                "connections (redis.asyncio's) belong to that loop; make one AsyncGate per "
                "event loop, e.g. in the app's lifespan, or use Gate outside asyncio")
        self._loop = loop

    def _flush(self) -> None:
        self._soon = False
        if self._later is not None:
            self._later.cancel()
            self._later = None
        batch, self._pending = self._pending, []
        if not batch:
            return
        if self._conn is not None:
            self._write(batch)
            return
        self._unsent += batch
        if self._line is None:
            self._line = self._spawn(self._serve())

    def _write(self, batch: list[Call]) -> None:
        """Write `batch` behind the calls in flight, without waiting (on redis-py's stream
        writer: its `send_packed_command` waits). A connection dropped meanwhile fails the
        line's reads, and the line sends every unanswered call again."""
        writer = self._conn._writer
        if writer is None:  # closed: the line sends it (and those in flight) again
            self._unsent += batch
            return
        writer.write(b"".join([call[4] for call in batch]))
        self._sent.append(deque(batch))

    def _spawn(self, work: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)  # held until done, so it is not collected mid-flight
        task.add_done_callback(self._tasks.discard)
        return task

    async def _serve(self) -> None:
        """The line: take a connection, read the answers of every call written on it (and
        write those made meanwhile), give it back once none is in flight."""
        refused: list[tuple[Call, Exception]] = []
        pool = self.client.connection_pool
        conn = None
        try:
            conn = await pool.get_connection()
            while True:
                if self._sent or self._unsent:
                    await conn.retry.call_with_retry(lambda: self._read_batch(conn, refused),
                                                     lambda _error: self._drop(conn))
                    if refused and (self._sent or self._unsent):
                        self._spawn(self._redo(refused[:]))
                        refused.clear()
                    continue
                # The callers just answered may call again in this tick: keep the line.
                await asyncio.sleep(0)
                if not (self._sent or self._unsent or self._soon):
                    break
        except BaseException as exc:  # (every call in flight has failed with it)
            self._conn = None
            self._fail(exc, refused)
            refused.clear()
            if not isinstance(exc, Exception):
                raise
        finally:
            self._conn = None
            self._line = None
            if conn is not None:
                await pool.release(conn)
        if refused:  # after the connection is back: the loads can use it
            self._spawn(self._redo(refused))

    async def _read_batch(self, conn: Any, refused: list[tuple[Call, Exception]]) -> None:
        """Read the answers of the first batch in flight, (re)sending every unanswered call
        first on a new or dropped connection. One socket timeout for the batch."""
        if self._conn is None or self._unsent:  # (a new connection, or one that closed)
            self._conn = None
            calls = [call for batch in self._sent for call in batch] + self._unsent
            self._sent.clear()
            self._unsent = []
            self._sent.append(deque(calls))
            await conn.send_packed_command([call[4] for call in calls])  # (connects)
            self._conn = conn
            made, self._unsent = self._unsent, []  # made while those were sent
            if made:
                self._write(made)
        batch = self._sent[0]
        # The answers already read, straight from the connection's hiredis reader (redis-py
        # keeps it as its parser's `_reader`); the connection reads the socket for the rest.
        reader = _reader_of(conn)
        try:
            async with asyncio.timeout(conn.socket_timeout):
                while batch:
                    answer = reader.gets() if reader is not None else NOT_ENOUGH_DATA
                    if answer is NOT_ENOUGH_DATA:
                        try:
                            answer = await conn.read_response(timeout=math.inf)
                        except redis.ResponseError as exc:  # read in full: still in step
                            answer = exc
                        reader = _reader_of(conn)
                    elif isinstance(answer, redis.ConnectionError):  # (e.g. LOADING)
                        await conn.disconnect(nowait=True)
                        raise answer
                    future = (call := batch.popleft())[5]
                    if isinstance(answer, redis.ResponseError):
                        if _refused(answer):
                            refused.append((call, answer))
                        elif not future.done():
                            future.set_exception(answer)
                    elif not future.done():  # (done: its caller was cancelled)
                        future.set_result(answer)
        except TimeoutError as exc:  # asyncio's: the connection is out of step
            await conn.disconnect(nowait=True)
            raise redis.TimeoutError(f"Timeout reading from {conn.host}:{conn.port}") from exc
        self._sent.popleft()

    async def _drop(self, conn: Any) -> None:
        """A dropped connection: every unanswered call goes again on the next one."""
        self._conn = None
        self._unsent = [call for batch in self._sent for call in batch] + self._unsent
        self._sent.clear()
        await conn.disconnect()

    def _fail(self, error: BaseException, refused: list[tuple[Call, Exception]]) -> None:
        """Every call in flight fails with `error` (is cancelled, when it is no Exception)."""
        calls = [call for batch in self._sent for call in batch] + self._unsent
        calls += [call for call, _ in refused]
        self._sent.clear()
        self._unsent = []
        _answer_all([call[5] for call in calls], error)

    async def _redo(self, refused: list[tuple[Call, Exception]]) -> None:
        """Answer the calls refused for want of their script or library, once loaded."""
        calls = [(script, script.fcall(keys, args) if fcall else script.command(keys, args))
                 for (script, keys, args, fcall, _, _), _ in refused]
        answers: list[Any] = [answer for _, answer in refused]
        futures = [call[5] for call, _ in refused]
        try:
            for _ in range(LOADS - 1):
                if not await self._again(calls, answers):
                    break
        except BaseException as exc:
            _answer_all(futures, exc)
            if not isinstance(exc, Exception):
                raise
            return
        for future, answer in zip(futures, answers, strict=True):
            _answer(future, answer)

    async def _again(self, calls: list[tuple[LuaScript, Command]], answers: list[Any]) -> bool:
        """Send again, in place, the calls the server refused for want of their script or
        library, once those are loaded (or as EVALSHA); False when there were none."""
        redo = [i for i, answer in enumerate(answers) if _refused(answer)]
        if not redo:
            return False
        for i in redo:
            if functions_refused(answers[i]):
                self._no_functions(answers[i])
        for script in {calls[i][0] for i in redo if function_missing(answers[i])}:
            try:
                await load_library_async(self.client, script)
            except redis.ResponseError as exc:
                if not functions_refused(exc):
                    raise
                self._no_functions(exc)
        for i in redo:  # without functions: the same calls as EVALSHA
            script, command = calls[i]
            if not self.functions and command[0] == FCALL:
                calls[i] = (script, as_evalsha(script, command))
        for source in {calls[i][0].source for i in redo if calls[i][1][0] != FCALL}:
            await self.client.script_load(source)
        again = await self._pipeline([calls[i][1] for i in redo])
        for i, answer in zip(redo, again, strict=True):
            answers[i] = answer
        return True

    def _no_functions(self, error: Exception) -> None:
        if self.functions:
            self.functions = False
            functions_refused_warning(error)

    async def _pipeline(self, commands: Sequence[Command]) -> list[Any]:
        """Send `commands` in one write on one pooled connection and read every answer (a
        server error is that command's answer); a dropped connection is retried as the
        client's `Retry` says, like redis-py's own pipelines."""
        packed = [hiredis.pack_command(command)  # type: ignore[arg-type]
                  for command in commands]
        pool = self.client.connection_pool
        conn = await pool.get_connection()

        async def exchange() -> list[Any]:
            await conn.send_packed_command(packed)
            answers: list[Any] = []
            try:  # one socket timeout for the whole batch, not one timer per answer
                async with asyncio.timeout(conn.socket_timeout):
                    for _ in commands:
                        try:
                            answers.append(await conn.read_response(timeout=math.inf))
                        except redis.ResponseError as exc:  # read in full: still in step
                            answers.append(exc)
            except TimeoutError as exc:  # asyncio's: the connection is out of step
                await conn.disconnect(nowait=True)
                raise redis.TimeoutError(
                    f"Timeout reading from {conn.host}:{conn.port}"
                ) from exc
            return answers

        async def drop(_error: Exception) -> None:
            await conn.disconnect()

        try:
            return list(await conn.retry.call_with_retry(exchange, drop))
        finally:
            await pool.release(conn)
