"""`Throttle(app, config)` sets what throttle needs wherever the user kept Celery's default
value, and keeps every value the user changed."""

from __future__ import annotations

from typing import Any

import pytest
from celery import Celery

from throttle import ConfigError, Throttle, load_config

TOOLS: dict[str, Any] = {"tools": {"search": {"limits": ["5/1s"], "max_delay": "30s"}}}


def app_with(**settings: Any) -> Celery:
    app = Celery("defaults", broker="redis://127.0.0.1:6379/15", set_as_current=False)
    app.conf.update(settings)
    return app


def test_an_untouched_app_gets_every_safe_default() -> None:
    app = app_with()
    Throttle(app, load_config(TOOLS))
    conf = app.conf
    assert (conf.task_serializer, conf.result_serializer) == ("json", "json")
    assert conf.accept_content == ["json"] and conf.result_accept_content == ["json"]
    assert conf.task_acks_late and conf.task_reject_on_worker_lost
    assert conf.worker_prefetch_multiplier == 1
    assert conf.worker_consumer == "throttle.consumer:Consumer"
    assert conf.broker_transport_options["visibility_timeout"] > 30
    assert conf.task_routes  # one route per tool
    assert "tool.search" in {queue.name for queue in conf.task_queues}
    assert conf.worker_eta_task_limit == 50_000  # held delays bounded (Celery: unbounded)
    assert conf.task_publish_retry_policy == {
        "max_retries": 5, "interval_start": 0, "interval_step": 0.5, "interval_max": 2,
    }
    assert "confirm_publish" not in conf.broker_transport_options  # Redis has none


def test_a_rabbitmq_app_confirms_its_publishes() -> None:
    app = Celery("defaults", broker="amqp://guest:guest@127.0.0.1:5672//", set_as_current=False)
    Throttle(app, load_config(TOOLS))
    assert app.conf.broker_transport_options["confirm_publish"] is True
    assert "unacked_restore_interval" not in app.conf.broker_transport_options


def test_a_rabbitmq_app_that_turned_confirms_off_keeps_its_choice() -> None:
    app = Celery("defaults", broker="amqp://guest:guest@127.0.0.1:5672//", set_as_current=False)
    app.conf.broker_transport_options = {"confirm_publish": False}
    Throttle(app, load_config(TOOLS))
    assert app.conf.broker_transport_options["confirm_publish"] is False


def test_a_setting_the_user_chose_is_kept() -> None:
    retry = {"max_retries": 1, "interval_start": 1, "interval_step": 1, "interval_max": 1}
    app = app_with(worker_prefetch_multiplier=2, worker_consumer="myapp.consumer:Consumer",
                   broker_transport_options={"visibility_timeout": 120},
                   worker_eta_task_limit=10, task_publish_retry_policy=retry)
    Throttle(app, load_config(TOOLS))
    assert app.conf.worker_eta_task_limit == 10
    assert app.conf.task_publish_retry_policy == retry
    assert app.conf.worker_prefetch_multiplier == 2
    assert app.conf.worker_consumer == "myapp.consumer:Consumer"
    assert app.conf.broker_transport_options["visibility_timeout"] == 120


def test_a_visibility_timeout_below_a_max_delay_is_refused_with_the_fix() -> None:
    app = app_with(broker_transport_options={"visibility_timeout": 10})
    with pytest.raises(ConfigError, match=r"not above the longest max_delay \(30.0s\).*raise it"):
        Throttle(app, load_config(TOOLS))


def test_pickle_in_accept_content_is_removed_with_a_warning_that_says_so(
    caplog: pytest.LogCaptureFixture,
) -> None:
    app = app_with(accept_content=["json", "pickle", "application/x-python-serialize"],
                   task_serializer="pickle")
    with caplog.at_level("WARNING", logger="throttle"):
        throttle = Throttle(app, load_config(TOOLS))
    assert app.conf.accept_content == ["json"]
    assert "accept_content listed ['pickle', 'application/x-python-serialize']; removed it" in (
        caplog.text
    )
    def search(query: str) -> dict[str, Any]:
        return {}

    task = throttle.tool(search)
    app.finalize()
    # The app's pickle task_serializer does not reach tools.
    assert app.tasks[task.name].serializer == "json"
