"""docker-compose.yml: valid for docker-compose, every service there, every file it names exists."""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.needs import program
from throttle.config_file import load_config

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
WORKERS = {
    "worker-search": "search_products", "worker-inventory": "get_inventory",
    "worker-orders": "lookup_order", "worker-refunds": "process_refund",
    "worker-llm": "chat_completion",
}


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return dict(yaml.safe_load(COMPOSE.read_text(encoding="utf-8")))


def services(compose: dict[str, Any]) -> dict[str, Any]:
    return dict(compose["services"])


SECRETS = {"FLOWER_PASSWORD": "x", "GRAFANA_PASSWORD": "y", "THROTTLE_GATEWAY_KEYS": "t:k"}


def compose_config(**secrets: str) -> subprocess.CompletedProcess[str]:
    """`docker-compose config -q` with only these of the secrets set (none from .env)."""
    binary = program("docker-compose", "docker-compose")
    env = {name: value for name, value in os.environ.items() if name not in SECRETS}
    with tempfile.NamedTemporaryFile(suffix=".env") as empty:  # not the checkout's .env
        return subprocess.run(
            [binary, "-f", str(COMPOSE), "--env-file", empty.name, "config", "-q"], cwd=ROOT,
            env={**env, **secrets}, capture_output=True, text=True, timeout=60)


def test_docker_compose_accepts_the_file() -> None:
    done = compose_config(**SECRETS)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("missing", sorted(SECRETS))
def test_the_stack_refuses_to_start_until_each_secret_is_set(missing: str) -> None:
    for value in (None, ""):
        secrets = {name: given for name, given in SECRETS.items() if name != missing}
        if value is not None:
            secrets[missing] = value
        done = compose_config(**secrets)
        assert done.returncode != 0, (missing, value)
        assert f"set {missing}" in done.stderr, done.stderr


def test_every_part_of_the_system_has_a_service(compose: dict[str, Any]) -> None:
    expected = {"redis", "broker", "flower", "exporter", "prometheus", "grafana", "llm-stub",
                "gateway", "demo", *WORKERS}
    assert expected <= set(services(compose))
    redis_command = services(compose)["redis"]["command"]
    assert redis_command[redis_command.index("--maxmemory-policy") + 1] == "noeviction"


def test_each_tool_of_the_config_has_a_worker_service_on_its_own_queue(
    compose: dict[str, Any],
) -> None:
    config = load_config(ROOT / "config" / "tools.toml")
    assert sorted(WORKERS.values()) == sorted(config.tools)
    for name, tool in WORKERS.items():
        command = services(compose)[name]["command"]
        assert command[:3] == ["throttle", "worker", tool], name
        assert "ports" not in services(compose)[name]
    llm_env = services(compose)["worker-llm"]["environment"]
    assert llm_env["THROTTLE_LLM_BASE_URL"] == "http://llm-stub:8089/v1"
    stub = services(compose)["llm-stub"]["command"]
    assert stub == ["throttle", "stub-llm", "--host", "0.0.0.0", "--port", "8089"]


def test_uis_listen_on_loopback_and_flower_needs_a_password(compose: dict[str, Any]) -> None:
    published = {name: service.get("ports", []) for name, service in services(compose).items()}
    assert published["flower"] == ["127.0.0.1:5555:5555"]
    assert published["prometheus"] == ["127.0.0.1:9090:9090"]
    assert published["grafana"] == ["127.0.0.1:3000:3000"]
    assert published["exporter"] == ["127.0.0.1:9808:9808"]
    for ports in published.values():
        assert all(port.startswith("127.0.0.1:") for port in ports)
    flower = services(compose)["flower"]
    assert flower["command"][:2] == ["throttle", "flower"]
    assert "--insecure-no-auth" not in flower["command"]
    assert "THROTTLE_FLOWER_PASSWORD" in flower["environment"]
    assert services(compose)["exporter"]["command"][:2] == ["throttle", "exporter"]
    assert services(compose)["gateway"]["command"][:2] == ["throttle", "gateway"]
    assert "THROTTLE_GATEWAY_KEYS" in services(compose)["gateway"]["environment"]
    grafana = services(compose)["grafana"]["environment"]
    for variable in (flower["environment"]["THROTTLE_FLOWER_PASSWORD"],
                     grafana["GF_SECURITY_ADMIN_PASSWORD"],
                     services(compose)["gateway"]["environment"]["THROTTLE_GATEWAY_KEYS"]):
        assert variable.startswith("${") and ":?" in variable, variable  # no default
    assert services(compose)["demo"]["command"][:3] == ["python", "-m", "workers.produce"]


def test_every_file_the_compose_file_names_exists(compose: dict[str, Any]) -> None:
    named = []
    for service in services(compose).values():
        build = service.get("build")
        if build is not None:
            context = ROOT / (build if isinstance(build, str) else build.get("context", "."))
            named.append(context / "Dockerfile")
        for volume in service.get("volumes", []):
            source = volume.split(":", 1)[0]
            if source.startswith("."):
                named.append(ROOT / source)
    assert named, "no file found to check"
    missing = [str(path.relative_to(ROOT)) for path in named if not path.exists()]
    assert missing == []
    dashboards = ROOT / "config" / "grafana" / "dashboards"
    assert list(dashboards.glob("*.json"))


def test_prometheus_scrapes_the_exporter_and_flower() -> None:
    config = yaml.safe_load((ROOT / "config" / "prometheus.yml").read_text(encoding="utf-8"))
    targets = {job["job_name"]: job["static_configs"][0]["targets"]
               for job in config["scrape_configs"]}
    assert targets == {"throttle": ["exporter:9808"], "flower": ["flower:5555"]}


def test_grafana_is_provisioned_with_prometheus_and_the_dashboard() -> None:
    base = ROOT / "config" / "grafana"
    sources = yaml.safe_load((base / "provisioning" / "datasources" / "prometheus.yml")
                             .read_text(encoding="utf-8"))
    assert sources["datasources"][0]["url"] == "http://prometheus:9090"
    providers = yaml.safe_load((base / "provisioning" / "dashboards" / "throttle.yml")
                               .read_text(encoding="utf-8"))
    assert providers["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"
    dashboard = json.loads((base / "dashboards" / "throttle.json").read_text(encoding="utf-8"))
    exprs = " ".join(target["expr"] for panel in dashboard["panels"]
                     for target in panel["targets"])
    for metric in ("throttle_decisions_total", "throttle_limit_per_second",
                   "throttle_delay_seconds_bucket", "throttle_queue_depth", "throttle_pool_usage",
                   "throttle_store_errors_total"):
        assert metric in exprs, metric
