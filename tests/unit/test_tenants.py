"""Per-tenant counts of fair tools: bounded per bucket, top-k plus "other" when read."""

from __future__ import annotations

from throttle.keys import tenants_key
from throttle.monitor.stats import StatsBuffer
from throttle.monitor.tenants import OTHER, TENANTS_PER_BUCKET, tenant_label, tenant_uses


def test_a_flood_of_distinct_tenants_counts_past_the_cap_as_other() -> None:
    buffer = StatsBuffer("p")
    for i in range(TENANTS_PER_BUCKET + 50):
        buffer.add_tenant_admission("t", f"tenant-{i}", 0.5, at_s=1000.0)
    fields = {name for key, name in buffer._counts if key == tenants_key("p", "t", 1000)}
    assert len(fields) == TENANTS_PER_BUCKET + 1
    assert f"{OTHER}|admitted" in fields
    assert buffer._counts[tenants_key("p", "t", 1000), f"{OTHER}|admitted"] == 50


def test_the_top_tenants_come_first_and_the_rest_is_other() -> None:
    buckets = [{b"a|admitted": b"30", b"a|waited": b"3.0", b"b|admitted": b"5",
                b"b|waited": b"10.0"},
               {"c|admitted": "1", "c|waited": "0.1", "other|admitted": "2",
                "other|waited": "1.0", "a|admitted": "10", "a|waited": "1.0"}]
    uses = tenant_uses(buckets, top_k=2)
    assert [(use.tenant, use.admitted) for use in uses] == [("a", 40), ("b", 5), (OTHER, 3)]
    assert uses[0].mean_wait_s == 0.1
    assert uses[1].mean_wait_s == 2.0


def test_a_tenant_label_is_text_of_bounded_length() -> None:
    assert tenant_label("acme") == "acme"
    assert tenant_label(42) == "42"
    assert len(tenant_label("x" * 500)) == 64
