"""Per-tenant use of a fair tool (`fair_by`): admitted calls and their waits, top tenants first.

Workers count, per 10 s bucket, each admitted call of a fair tool under its tenant (the
`fair_by` argument's value, as text, at most 64 characters) with the time it waited since it
was first enqueued: `<prefix>:stats:{t}:tenants:<epoch s>`, fields `<tenant>|admitted` and
`<tenant>|waited`. A process counts at most `TENANTS_PER_BUCKET` tenants per bucket, the rest
under "other", so a flood of distinct values cannot grow a bucket; buckets expire after a
minute or so. `throttle status` and the exporter show the top `TOP_K` of the last minute and
"other" for the rest (a bounded set of labels).
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from throttle.keys import tenants_key
from throttle.monitor.stats import OTHER_TENANT as OTHER
from throttle.monitor.stats import TENANTS_PER_BUCKET

__all__ = ["OTHER", "TENANTS_PER_BUCKET", "TOP_K", "TenantUse", "bucket_keys", "tenant_label",
           "tenant_uses"]
TOP_K = 5
LABEL_CHARS = 64


def tenant_label(value: Any) -> str:
    """A tenant as counted: the value as text (JSON for non-strings), cut to 64 characters."""
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
    return text[:LABEL_CHARS]


@dataclass(frozen=True, slots=True)
class TenantUse:
    """One tenant's calls admitted in the last minute and the mean wait before admission."""

    tenant: str
    admitted: int
    waited_s: float  # total

    @property
    def mean_wait_s(self) -> float:
        return self.waited_s / self.admitted if self.admitted else 0.0


def bucket_keys(prefix: str, tool: str, now_s: float, bucket_s: int, count: int) -> list[str]:
    """The tenants' hashes of the last `count` buckets of `bucket_s` seconds."""
    newest = int(now_s) // bucket_s * bucket_s
    return [tenants_key(prefix, tool, newest - i * bucket_s) for i in range(count)]


def tenant_uses(buckets: Iterable[Mapping[Any, Any]], top_k: int = TOP_K) -> list[TenantUse]:
    """The `top_k` tenants by calls admitted (ties by name), then "other" for the rest."""
    admitted: dict[str, int] = defaultdict(int)
    waited: dict[str, float] = defaultdict(float)
    for fields in buckets:
        for raw, value in fields.items():
            name = raw.decode() if isinstance(raw, bytes) else str(raw)
            tenant, _, kind = name.rpartition("|")
            if kind == "admitted":
                admitted[tenant] += int(float(value))
            elif kind == "waited":
                waited[tenant] += float(value)
    ranked = sorted(admitted, key=lambda t: (t == OTHER, -admitted[t], t))
    top = [TenantUse(t, admitted[t], waited[t]) for t in ranked[:top_k] if t != OTHER]
    rest = [t for t in admitted if t not in {use.tenant for use in top}]
    if rest:
        top.append(TenantUse(OTHER, sum(admitted[t] for t in rest),
                             sum(waited[t] for t in rest)))
    return top
