"""The busiest-window check every test, benchmark and the demo use."""

from __future__ import annotations

from throttle.windows import most_in_window


def test_entries_exactly_one_window_apart_never_share_a_window() -> None:
    assert most_in_window([0.0, 1.0, 2.0], 1.0) == 1
    assert most_in_window([0.0, 0.999999, 1.5], 1.0) == 2


def test_units_are_summed_within_the_busiest_window() -> None:
    assert most_in_window([0.0, 0.5, 0.9, 2.0], 1.0, [10, 20, 30, 100]) == 100
    assert most_in_window([0.0, 0.5, 0.9, 2.0], 1.0, [10, 20, 30, 5]) == 60


def test_order_does_not_matter_and_no_entries_is_zero() -> None:
    assert most_in_window([3.0, 0.1, 0.2, 3.05], 0.5) == 2
    assert most_in_window([], 1.0) == 0
