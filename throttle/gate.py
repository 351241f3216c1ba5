"""The Redis gate: one atomic Lua call per decision (`Gate`; `AsyncGate` in async_gate.py).

`Gate.acquire` answers ADMIT (run now), DELAY (a slot is reserved `wait_s` from now; come
back then with the same member) or FALLBACK (the slot would miss the deadline; nothing is
reserved). The algorithm lives only in `throttle/lua/*.lua`; `throttle/gate_args.py` builds
the scripts' arguments (the fixed ones encoded once per tool), and this module runs them with
EVALSHA (`throttle/scripts.py`: straight through a connection, NOSCRIPT handled once; the
async gate's concurrent decisions share one pipeline per event-loop tick).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from throttle.adaptive import Adapter
from throttle.config import Config
from throttle.decision import Decision, text
from throttle.errors import StoreUnavailable
from throttle.gate_args import GateBase
from throttle.keys import (
    DEFAULT_PREFIX,
    cooldown_left_s,
    decided_key,
    overrides_version_key,
    redelivery_key,
    tool_defaults_key,
)
from throttle.registrar import Pending, Registrar
from throttle.scripts import Lane, Sent, encode, evalsha, evalsha_many
from throttle.store import (
    DEFAULT_SOCKET_TIMEOUT_S,
    STORE_ERRORS,
    StoreClient,
    StoreErrors,
    client_options,
    connect,
    describe_client,
    mask_url,
    unreachable,
)

REGISTRY_TTL_MS = 3_600_000  # a registry outlives its latest check time by an hour


class Registration:
    """A registration sent by `Gate.start_register_call`; `wait()` (required, once) confirms
    it or raises StoreUnavailable."""

    __slots__ = ("_errors", "_sent")

    def __init__(self, sent: Sent, errors: StoreErrors) -> None:
        self._sent, self._errors = sent, errors

    def wait(self) -> None:
        """Wait for the server's answer."""
        with self._errors:
            self._sent.answer()


class Gate(GateBase):
    """The synchronous gate over redis-py: `acquire`, `release`.

    One client serves every thread or greenlet of a process: each command takes a
    connection of its own from the client's pool (`max_connections` bounds it, see `connect`);
    a gate that made its client from a URL keeps one at hand between decisions
    (`scripts.Lane`).
    `registers_calls`: calls are registered in the background (`register_later`), so a
    decision notes a call it finds unregistered (see throttle/registrar.py).
    """

    def __init__(
        self,
        redis_url_or_client: str | StoreClient,
        config: Config,
        *,
        prefix: str = DEFAULT_PREFIX,
        socket_timeout_s: float = DEFAULT_SOCKET_TIMEOUT_S,
        max_connections: int | None = None,
        registers_calls: bool = False,
    ) -> None:
        own = isinstance(redis_url_or_client, str)
        if isinstance(redis_url_or_client, str):
            url = mask_url(redis_url_or_client)
            with StoreErrors(url):
                self.client: StoreClient = connect(
                    redis_url_or_client, max_connections=max_connections,
                    **client_options(socket_timeout_s),
                )
        else:
            self.client = redis_url_or_client
            url = describe_client(redis_url_or_client)
        super().__init__(config, prefix, url, registers_calls=registers_calls)
        self._load_scripts(self.client)
        # Decisions keep a connection at hand (not on a caller's own client); registrations,
        # sent in the background, take pooled ones.
        self._decide_lane = Lane(self.client, keep=own)
        self._register_lane = Lane(self.client)
        self.registrar = Registrar(self._send_registrations)
        self._registry_keys: dict[tuple[str, bool], list[bytes]] = {}
        self.adapter = Adapter(self.client, config, self.prefix, self._errors)  # adaptive

    def acquire(
        self,
        tool: str,
        member: str,
        *,
        key: Any = None,
        cost: float = 1,
        deadline_s: float | None = None,
        now_s: float | None = None,
        receipt: str | None = None,
        fair_key: Any = None,
    ) -> Decision:
        """Decide one call of `tool` identified by `member` (the task id).

        `deadline_s` tightens the tool's max_delay; `now_s` pins the clock (tests only).
        `receipt` ('<message tag>|<delivery nonce>') names this delivery of the call: an
        admitted member asking again with another receipt is answered 'rerun' (same message
        tag) or 'reused' instead of 'readmitted'. `fair_key` is the call's tenant, required
        for a tool (or pool) with `fair_by`: a DELAY with reason 'parked' is an estimate,
        not a reservation; the call comes back then and keeps its place.
        """
        if self._defaults.due(tool):
            self.refresh_defaults()
        keys, args = self._acquire_call(tool, member, key, cost, deadline_s, now_s, receipt,
                                        fair_key)
        packed = self._packed_fcall(tool, args, receipt)
        with self._errors:
            raw = evalsha(self._decide_lane, self._acquire_script, keys, args, packed)
        return self._decision(raw)

    def refresh_defaults(self) -> None:
        """Read the live defaults of per-key tools again if their version moved (done by
        `acquire` at most every `live_defaults.REFRESH_S`)."""
        with self._errors:
            version = self.client.get(overrides_version_key(self.prefix))
            if self._defaults.checked(version):
                fields = self._defaults.fields
                self._defaults.load(self.client.hmget(tool_defaults_key(self.prefix), fields),
                                    version)

    def release(self, tool: str, member: str, *, key: Any = None) -> bool:
        """Free `member`'s unused reservation; True if it held one."""
        keys = self._keys(self.config.tool(tool), key)
        with self._errors:
            return bool(self._release(keys=self._release_keys(keys), args=[member]))

    def settle(self, tool: str, member: str, actual_units: float, *, key: Any = None) -> bool:
        """Correct `member`'s charge to what it really cost; False if it left the windows."""
        keys = self._settle_keys(tool, key, actual_units)
        with self._errors:
            return bool(self._settle(keys=keys, args=[member, actual_units]))

    def cool_down(
        self,
        tool: str,
        seconds: float,
        *,
        key: Any = None,
        member: str | None = None,
        now_s: float | None = None,
    ) -> float:
        """Admit no call of `tool` (or of its pool) for `seconds`, on every worker.

        `member`, the call the upstream refused, leaves the windows. Returns when the
        cooldown ends (epoch seconds); a cooldown is only ever extended.
        """
        keys, args = self._cooldown_call(tool, seconds, key, member, now_s)
        with self._errors:
            return float(self._cooldown(keys=keys, args=args)) / 1000

    def cooldown_left(self, tool: str, *, key: Any = None) -> float:
        """Seconds left in `tool`'s cooldown (its pool's, for a pooled tool); 0 if none."""
        name = self._keys(self.config.tool(tool), key).cooldown
        with self._errors:
            return cooldown_left_s(self.client.pttl(name))

    def register_call(self, tool: str, member: str, message: str, check_at_s: float) -> None:
        """Note an enqueued call of `tool`, to be counted lost if still undecided at
        `check_at_s` (epoch seconds); `message` is what re-publishes it."""
        self.start_register_call(tool, member, message, check_at_s).wait()

    def start_register_call(
        self, tool: str, member: str, message: str, check_at_s: float
    ) -> Registration:
        """`register_call`, sent now and confirmed by `.wait()`: the caller publishes the
        call in between, so the two round trips overlap."""
        keys, args = self._registration(tool, member, message, check_at_s, time.time(),
                                        late=False)
        with self._errors:
            return Registration(Sent(self._register_lane, self._register_script, keys, args),
                                self._errors)

    def _registration(self, tool: str, member: str, message: str, check_at_s: float,
                      now_s: float, *, late: bool) -> tuple[list[bytes], list[bytes]]:
        """register.lua's keys and arguments; `late` (sent after the publish) adds the key
        of the calls decided first, whose late registrations it drops."""
        keys = self._registry_keys.get((tool, late))
        if keys is None:
            names = list(self.registry(tool))
            if late:
                names.append(decided_key(self.prefix, tool, self.config.tool(tool).pool))
            keys = self._registry_keys[tool, late] = [name.encode() for name in names]
        ttl_ms = int((check_at_s - now_s) * 1000) + REGISTRY_TTL_MS
        return keys, [encode(member), encode(check_at_s * 1000), encode(message), encode(ttl_ms)]

    def register_later(self, tool: str, member: str, message: str, check_at_s: float) -> bool:
        """`register_call` in the background (throttle/registrar.py); False when its queue
        is full (then register the call yourself)."""
        return self.registrar.submit(tool, member, message, check_at_s)

    def _send_registrations(self, batch: Sequence[Pending]) -> list[Exception | None]:
        """Send queued registrations in one round trip: each one's error, or None."""
        now_s = time.time()
        commands = [self._register_script.command(*self._registration(
            item.tool, item.member, item.message, item.check_at_s, now_s, late=True))
            for item in batch]
        try:
            with self._errors:
                answers = evalsha_many(self._register_lane, self._register_script, commands)
        except StoreUnavailable as exc:
            return [exc] * len(batch)
        return [(unreachable(self.url, answer) if isinstance(answer, STORE_ERRORS) else answer)
                if isinstance(answer, Exception) else None for answer in answers]

    def flush_registrations(self) -> None:
        """Send the registrations still queued and wait for them (tests, shutdown)."""
        self.registrar.flush()

    def forget_call(self, tool: str, member: str) -> None:
        """Take a call out of `tool`'s registry (decided without the gate, or given up);
        a registration of it still queued here is dropped, or sent first."""
        self.registrar.withdraw(tool, member)
        calls, messages = self.registry(tool)
        with self._errors:
            pipe = self.client.pipeline(transaction=False)
            pipe.zrem(calls, member)
            pipe.hdel(messages, member)
            pipe.execute()

    def claim_lost(
        self, tool: str, *, retry_s: float, limit: int = 100, now_s: float | None = None
    ) -> list[tuple[str, str]]:
        """Claim `tool`'s registered calls whose check time has come: (id, message) pairs."""
        now_ms = (time.time() if now_s is None else now_s) * 1000
        with self._errors:
            raw = self._claim(keys=self.registry(tool), args=[now_ms, retry_s * 1000, limit])
        return [(text(raw[i]), text(raw[i + 1])) for i in range(0, len(raw), 2)]

    def finish(self, tool: str, member: str, *, key: Any = None) -> None:
        """Give back `member`'s concurrency lease (the call ended: result, error or fallback)."""
        leases = self._keys(self.config.tool(tool), key).leases
        if leases is None:
            return
        with self._errors:
            self.client.zrem(leases, member)

    def note_redelivery(self, tool: str, member: str, *, key: Any = None) -> int:
        """Count one more delivery of an already admitted `member`; returns the count."""
        name = redelivery_key(self._keys(self.config.tool(tool), key), member)
        ttl_ms = self.config.visibility_timeout_ms * 10
        with self._errors:
            pipe = self.client.pipeline(transaction=False)
            pipe.incr(name)
            pipe.pexpire(name, ttl_ms)
            count, _ = pipe.execute()
        return int(count)

    def close(self) -> None:
        """Send the registrations still queued, then close the connection pool."""
        self.registrar.flush()
        self._decide_lane.close()
        self.client.close()
