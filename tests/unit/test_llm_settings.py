"""The LLM tool's upstream settings: read from the environment, the key kept out of sight."""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from workers.tools.llm_http import LLMError, Settings, upstream


def test_defaults_point_at_the_local_stub_with_bounded_timeouts_and_retries(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in list(os.environ):
        if name.startswith("THROTTLE_LLM_"):
            monkeypatch.delenv(name)
    settings = Settings.from_env()
    assert settings.base_url == "http://127.0.0.1:8089/v1" and settings.api_key == ""
    assert (settings.connect_timeout_s, settings.read_timeout_s) == (5.0, 60.0)
    assert (settings.max_retries, settings.backoff_s) == (2, 0.5)


def test_the_key_is_trimmed_and_never_in_the_repr_or_a_message(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("THROTTLE_LLM_API_KEY", "  sk-secret-123 \n")
    monkeypatch.setenv("THROTTLE_LLM_BASE_URL", "https://user:pw@llm.example/v1")
    settings = Settings.from_env()
    assert settings.api_key == "sk-secret-123"
    assert "sk-secret" not in repr(settings)
    assert settings.redact("Incorrect API key provided: sk-secret-123.") == (
        "Incorrect API key provided: ***.")
    assert settings.where == "https://user:***@llm.example/v1"
    assert len(settings.redact("x" * 2000)) < 600


def test_a_key_a_header_cannot_carry_is_refused_without_showing_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("THROTTLE_LLM_API_KEY", "sk-with space")
    with pytest.raises(LLMError, match=r"THROTTLE_LLM_API_KEY .*\(not shown\)") as info:
        Settings.from_env()
    assert "sk-with" not in str(info.value)


@pytest.mark.parametrize(("name", "value"), [
    ("THROTTLE_LLM_READ_TIMEOUT_S", "soon"), ("THROTTLE_LLM_MAX_RETRIES", "-1"),
])
def test_a_bad_number_names_the_variable_and_an_example(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(LLMError, match=name):
        Settings.from_env()


def test_settings_are_parsed_once_per_environment_and_a_bad_value_refused_at_every_call(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("THROTTLE_LLM_READ_TIMEOUT_S", "7")
    first = Settings.from_env()
    assert Settings.from_env() is first
    monkeypatch.setenv("THROTTLE_LLM_READ_TIMEOUT_S", "8")
    assert Settings.from_env().read_timeout_s == 8.0
    monkeypatch.setenv("THROTTLE_LLM_READ_TIMEOUT_S", "soon")
    for _ in range(2):
        with pytest.raises(LLMError, match="THROTTLE_LLM_READ_TIMEOUT_S"):
            Settings.from_env()
    monkeypatch.setenv("THROTTLE_LLM_READ_TIMEOUT_S", "7")
    assert Settings.from_env() == first


def test_the_client_is_made_once_per_process_and_again_when_the_settings_change(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("THROTTLE_LLM_BASE_URL", "http://127.0.0.1:9/v1")
    first = upstream()
    assert upstream() is first
    assert str(first.client.base_url) == "http://127.0.0.1:9/v1/"
    monkeypatch.setenv("THROTTLE_LLM_READ_TIMEOUT_S", "3")
    second = upstream()
    assert second is not first and second.client.timeout.read == 3.0


def test_threads_asking_for_the_client_together_get_one_client(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("THROTTLE_LLM_BASE_URL", "http://127.0.0.1:9/v2")  # new settings
    start = threading.Barrier(16)

    def ask() -> int:
        start.wait()
        return id(upstream())

    with ThreadPoolExecutor(16) as pool:
        clients = set(pool.map(lambda _: ask(), range(16)))
    assert len(clients) == 1
