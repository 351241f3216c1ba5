"""Who is calling the gateway: each API key is bound to a tenant (docs/gateway.md, "Callers").

THROTTLE_GATEWAY_KEYS (or the file named by THROTTLE_GATEWAY_KEYS_FILE) lists the keys,
separated by commas or newlines, each as `tenant:key`; several keys may share a tenant (key
rotation). A plain `key` (the older form) is a tenant of its own, named `key-<8 hex digits of
the key's SHA-256>`. Limits apply to what the key proves, never to what the body claims: the
tenant becomes the call's `tenant` argument, and `session_id` is `tenant/user`, so the
request's `user` only narrows within its tenant. Only SHA-256 digests of the keys are kept.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from throttle.errors import ConfigError

KEYS_VARIABLE = "THROTTLE_GATEWAY_KEYS"
KEYS_FILE_VARIABLE = "THROTTLE_GATEWAY_KEYS_FILE"
LOCAL_TENANT = "local"  # every caller, when no key is configured (a loopback bind only)
TENANT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_SEPARATORS = re.compile(r"[,\n]")


@dataclass(frozen=True)
class Callers:
    """The configured keys, as SHA-256 digest -> tenant (empty: every caller is `local`)."""

    tenants_by_digest: Mapping[str, str] = field(default_factory=dict, repr=False)

    @property
    def open(self) -> bool:
        """True when no key is configured: the gateway then takes any caller."""
        return not self.tenants_by_digest

    @property
    def tenants(self) -> tuple[str, ...]:
        """The configured tenants' names, sorted."""
        return tuple(sorted(set(self.tenants_by_digest.values())))

    def tenant_of(self, token: str) -> str | None:
        """The tenant `token` belongs to, or None; every digest is compared in constant time."""
        digest = _digest(token)
        found = None
        for known, tenant in self.tenants_by_digest.items():
            if hmac.compare_digest(digest, known):
                found = tenant
        return found


def parse_keys(text: str, where: str = KEYS_VARIABLE) -> Callers:
    """`tenant:key` (or plain `key`) entries separated by commas or newlines; `#` starts a
    comment line. A ConfigError (never showing a key) says what to fix."""
    tenants: dict[str, str] = {}
    lines = (line for line in text.splitlines() if not line.lstrip().startswith("#"))
    for number, entry in enumerate(_SEPARATORS.split("\n".join(lines)), start=1):
        entry = entry.strip()
        if not entry:
            continue
        tenant, colon, key = entry.partition(":")
        tenant, key = tenant.strip(), key.strip()
        if not colon:
            tenant, key = f"key-{_digest(entry)[:8]}", entry
        elif not TENANT_NAME.fullmatch(tenant):
            raise ConfigError(f"{where}: entry {number}: the text before its first ':' is not a "
                              "tenant name (1-64 letters, digits, '_', '.', '-'; not shown, in "
                              "case it is part of a key); write each entry as tenant:key, "
                              "e.g. acme:sk-...")
        if not key:
            raise ConfigError(f"{where}: tenant {tenant!r} has an empty key; write each entry "
                              "as tenant:key")
        digest = _digest(key)
        if tenants.get(digest, tenant) != tenant:
            raise ConfigError(f"{where}: one key is listed for tenants {tenants[digest]!r} and "
                              f"{tenant!r}; a key proves one tenant: give each its own key")
        tenants[digest] = tenant
    return Callers(tenants)


def callers_from_env(environ: Mapping[str, str] | None = None) -> Callers:
    """The keys of THROTTLE_GATEWAY_KEYS, or of the file THROTTLE_GATEWAY_KEYS_FILE names."""
    env = os.environ if environ is None else environ
    inline, path = env.get(KEYS_VARIABLE, ""), env.get(KEYS_FILE_VARIABLE, "")
    if inline.strip() and path.strip():
        raise ConfigError(f"both {KEYS_VARIABLE} and {KEYS_FILE_VARIABLE} are set; set one")
    if not path.strip():
        return parse_keys(inline)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{KEYS_FILE_VARIABLE}: cannot read {path} ({type(exc).__name__}); "
                          "name a UTF-8 file with one tenant:key per line") from None
    return parse_keys(text, f"{KEYS_FILE_VARIABLE} ({path})")


def session_of(tenant: str, user: str | None) -> str:
    """The call's `session_id`: the tenant, narrowed by the request's `user` when it sends one."""
    return f"{tenant}/{user}" if user else tenant


def _digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()
