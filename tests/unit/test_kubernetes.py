"""deploy/k8s: rendered by `kubectl kustomize`, valid for Kubernetes and KEDA, one scaled
worker Deployment per tool, and no credential written into a manifest."""

from __future__ import annotations

import copy
import functools
import json
import re
import subprocess
from typing import Any

import jsonschema
import pytest
import yaml

from tests.support.programs import require
from tests.support.servers import ROOT
from throttle.config_file import load_config
from throttle.monitor.exporter import counters, gauges
from throttle.monitor.snapshot import Snapshot

kubernetes_validate = pytest.importorskip(
    "kubernetes_validate", reason="kubernetes-validate is missing: pip install -e '.[dev]'")

BASE = ROOT / "deploy" / "k8s" / "base"
KUBERNETES_VERSION = "1.30"
KEDA_SCHEMA = json.loads((ROOT / "tests" / "support" / "keda-scaledobject.schema.json")
                         .read_text(encoding="utf-8"))
SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|API_KEY|KEYS|AUTH", re.IGNORECASE)


@functools.cache
def rendered() -> tuple[dict[str, Any], ...]:
    done = subprocess.run([require("kubectl"), "kustomize", str(BASE)], capture_output=True,
                          text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    return tuple(doc for doc in yaml.safe_load_all(done.stdout) if doc)


def of_kind(kind: str) -> dict[str, dict[str, Any]]:
    return {doc["metadata"]["name"]: doc for doc in rendered() if doc["kind"] == kind}


def containers(doc: dict[str, Any]) -> list[dict[str, Any]]:
    return list(doc["spec"]["template"]["spec"]["containers"])


def test_every_manifest_is_valid_for_kubernetes_and_keda() -> None:
    kinds = [doc["kind"] for doc in rendered()]
    assert {"Namespace", "ConfigMap", "Service", "Deployment", "StatefulSet",
            "ScaledObject"} == set(kinds)
    for doc in rendered():
        assert doc["metadata"].get("namespace", "throttle") == "throttle"
        if doc["kind"] == "ScaledObject":  # a custom resource: checked against KEDA's schema
            jsonschema.validate(doc, KEDA_SCHEMA)
        else:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def test_the_validators_reject_a_mistake() -> None:
    deployment = copy.deepcopy(of_kind("Deployment")["exporter"])
    containers(deployment)[0]["imagePullPolicyy"] = "Always"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)
    scaled = copy.deepcopy(next(iter(of_kind("ScaledObject").values())))
    scaled["spec"]["maxReplicas"] = 3  # KEDA's field is maxReplicaCount
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(scaled, KEDA_SCHEMA)


def test_each_tool_has_its_own_worker_deployment_scaled_on_its_backlog() -> None:
    tools = load_config(ROOT / "config" / "tools.toml").tools
    deployments, scaled = of_kind("Deployment"), of_kind("ScaledObject")
    snapshot = Snapshot(at_s=0.0, tools=())
    exported = {family.name for family in [*counters(snapshot), *gauges(snapshot)]}
    workers = {name: doc for name, doc in deployments.items() if name.startswith("worker-")}
    assert len(workers) == len(tools) == len(scaled)
    for tool in tools:
        name = "worker-" + tool.replace("_", "-")
        [container] = containers(workers[name])
        assert container["args"][:3] == ["throttle", "worker", tool], name
        spec = scaled[name]["spec"]
        assert spec["scaleTargetRef"]["name"] == name
        assert 1 <= spec["minReplicaCount"] < spec["maxReplicaCount"]
        [trigger] = spec["triggers"]
        query = trigger["metadata"]["query"]
        assert trigger["type"] == "prometheus" and float(trigger["metadata"]["threshold"]) > 0
        for metric in ("throttle_queue_depth", "throttle_waiting_calls"):
            assert metric in exported
            assert f'{metric}{{tool="{tool}"}}' in query, f"{name} does not scale on {metric}"


def test_the_services_the_settings_name_exist() -> None:
    services = of_kind("Service")
    assert {"redis", "broker", "exporter", "flower", "gateway"} <= set(services)
    [settings] = of_kind("ConfigMap").values()
    for variable in ("THROTTLE_REDIS_URL", "THROTTLE_BROKER_URL", "THROTTLE_RESULT_BACKEND"):
        host = settings["data"][variable].removeprefix("redis://").split(":")[0]
        assert host in services, variable
    for name, deployment in of_kind("Deployment").items():
        for container in containers(deployment):
            refs = [source["configMapRef"]["name"] for source in container.get("envFrom", [])]
            assert refs == [settings["metadata"]["name"]], name


def test_no_credential_is_written_into_a_manifest() -> None:
    assert not of_kind("Secret"), "secrets are created by the operator, not shipped"
    for name, deployment in [*of_kind("Deployment").items(), *of_kind("StatefulSet").items()]:
        for container in containers(deployment):
            for variable in container.get("env", []):
                if SECRET_NAME.search(variable["name"]):
                    assert "value" not in variable, f"{name}: {variable['name']} is literal"
                    assert "secretKeyRef" in variable["valueFrom"], name
    flower = {v["name"]: v for v in containers(of_kind("Deployment")["flower"])[0]["env"]}
    for variable in ("THROTTLE_FLOWER_USER", "THROTTLE_FLOWER_PASSWORD"):
        ref = flower[variable]["valueFrom"]["secretKeyRef"]
        assert ref["name"] == "throttle-flower" and not ref.get("optional"), variable
    [settings] = of_kind("ConfigMap").values()
    for variable, value in settings["data"].items():
        assert not SECRET_NAME.search(variable), variable
        assert "@" not in value, f"{variable} carries credentials in its URL"


def test_promtool_parses_every_scaling_query(tmp_path: Any) -> None:
    promtool = require("promtool")
    rules = [{"record": f"keda:{name.replace('-', '_')}",
              "expr": doc["spec"]["triggers"][0]["metadata"]["query"]}
             for name, doc in of_kind("ScaledObject").items()]
    path = tmp_path / "keda-rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "keda", "rules": rules}]}))
    checked = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True,
                             text=True, timeout=60, check=False)
    assert checked.returncode == 0, checked.stdout + checked.stderr
