"""Running the gate's Lua scripts on an asyncio client, one pipeline per event-loop tick.

`Batcher` gathers the calls made in one tick, of any script, into one pipelined write on one
connection: one round trip for many decisions (and the settles made with them), each
answered (or failed) on its own. Arguments must already be bytes (`scripts.encode`); errors
are the client's own, for the caller's `StoreErrors` to wrap.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Sequence
from typing import Any

import hiredis
import redis
import redis.asyncio
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


# A call waiting for its tick's round trip: its script, command, packed FCALL (or None), future.
Pending = tuple[LuaScript, Command, bytes | None, "asyncio.Future[Any]"]


class Batcher:
    """Runs the script calls made in the same event-loop tick as one pipeline, whichever
    scripts they call (a tick's acquires and settles share one round trip).

    Each `run` gets its own answer or its own exception, as if it had been sent alone: a
    failed round trip fails every call in it, a script error only its call, and NOSCRIPT
    loads the scripts it names and repeats just the calls it refused (as "Function not
    found" loads the library, and a server or ACL without functions turns to EVALSHA from
    then on). A call may wait up to its `wait_s` for later calls to share its round trip
    (a settle: no one waits for it). Cluster clients are not batched (a pipeline there
    spans nodes).
    """

    def __init__(self, client: Any) -> None:
        self.client = client
        self.batched = type(client) is redis.asyncio.Redis
        self.functions = True  # (False once the server or the user's ACL refuses FCALL)
        self._pending: list[Pending] = []
        self._soon = False  # a flush is due this tick
        self._later: asyncio.TimerHandle | None = None  # a flush is due by a deadline
        self._tasks: set[asyncio.Task[None]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None  # the one loop it runs on

    async def run(self, script: LuaScript, keys: Sequence[bytes], args: Sequence[bytes],
                  *, wait_s: float = 0.0, packed_fcall: bytes | None = None) -> Any:
        """`script`'s answer to one call, sent with this tick's calls, or with those of
        the next `wait_s` seconds. `packed_fcall`: its FCALL already packed (RESP)."""
        if not self.batched:
            if self.functions and script.function is not None:
                try:
                    return await fcall_async(self.client, script, keys, args)
                except redis.ResponseError as exc:
                    if not functions_refused(exc):
                        raise
                    self._no_functions(exc)
            return await evalsha_async(self.client, script, keys, args)
        loop = asyncio.get_running_loop()
        if loop is not self._loop:
            if self._loop is not None:
                raise RuntimeError(
                    "this AsyncGate was first used on another event loop, and its Redis "
                    "connections (redis.asyncio's) belong to that loop; make one AsyncGate per "
                    "event loop, e.g. in the app's lifespan, or use Gate outside asyncio")
            self._loop = loop
        future: asyncio.Future[Any] = loop.create_future()
        fcall = self.functions and script.function is not None
        command = script.fcall(keys, args) if fcall else script.command(keys, args)
        self._pending.append((script, command, packed_fcall if fcall else None, future))
        if self._soon:
            return await future
        if wait_s <= 0:
            self._soon = True
            loop.call_soon(self._flush)
        elif self._later is None or loop.time() + wait_s < self._later.when():
            if self._later is not None:
                self._later.cancel()
            self._later = loop.call_at(loop.time() + wait_s, self._flush)
        return await future

    def _flush(self) -> None:
        self._soon = False
        if self._later is not None:
            self._later.cancel()
            self._later = None
        batch, self._pending = self._pending, []
        if not batch:
            return
        task = asyncio.ensure_future(self._send(batch))
        self._tasks.add(task)  # held until done, so it is not collected mid-flight
        task.add_done_callback(self._tasks.discard)

    async def _send(self, batch: list[Pending]) -> None:
        try:
            answers = await self._answers([call[:3] for call in batch])
        except asyncio.CancelledError:  # the loop is closing: so are the calls
            for *_, future in batch:
                future.cancel()
            raise
        except Exception as exc:  # the round trip failed: every call in it fails
            for *_, future in batch:
                if not future.done():
                    future.set_exception(exc)
            return
        for (*_, future), answer in zip(batch, answers, strict=True):
            if future.done():  # its caller was cancelled
                continue
            if isinstance(answer, Exception):
                future.set_exception(answer)
            else:
                future.set_result(answer)

    async def _answers(self, sent: list[tuple[LuaScript, Command, bytes | None]]) -> list[Any]:
        answers = await self._pipeline([packed or command for _, command, packed in sent])
        calls = [(script, command) for script, command, _ in sent]
        for _ in range(LOADS - 1):
            if not await self._again(calls, answers):
                break
        return answers

    async def _again(self, calls: list[tuple[LuaScript, Command]], answers: list[Any]) -> bool:
        """Send again, in place, the calls the server refused for want of their script or
        library, once those are loaded (or as EVALSHA); False when there were none."""
        redo = [i for i, answer in enumerate(answers) if isinstance(answer, NoScriptError)
                or function_missing(answer) or functions_refused(answer)]
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

    async def _pipeline(self, commands: Sequence[Command | bytes]) -> list[Any]:
        """Send `commands` (or their packed bytes) in one write on one pooled connection and
        read every answer (a server error is that command's answer); a dropped connection
        is retried as the client's `Retry` says, like redis-py's own pipelines."""
        packed = [command if isinstance(command, bytes)
                  else hiredis.pack_command(command)  # type: ignore[arg-type]
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
