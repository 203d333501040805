"""The deployment files in config/ are consistent with the code: every variable they set is a
setting, the probes hit the real health endpoints, and replicas share what they must share."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from watcher.settings import ENV_PREFIX, Settings

CONFIG = Path(__file__).resolve().parents[2] / "config"
SETTINGS = {f"{ENV_PREFIX}{name.upper()}" for name in Settings.model_fields}


def load(path: Path) -> Any:
    return yaml.safe_load(path.read_text("utf-8"))


def test_compose_runs_three_replicas_on_postgres_with_a_shared_volume() -> None:
    """compose.yaml: PostgreSQL, three watcher replicas, one shared downloads volume, secrets."""
    compose = load(CONFIG / "compose.yaml")
    watcher = compose["services"]["watcher"]
    assert watcher["deploy"]["replicas"] == 3
    assert "postgres" in compose["services"]
    assert watcher["depends_on"]["postgres"]["condition"] == "service_healthy"
    env = watcher["environment"]
    assert set(env) <= SETTINGS, set(env) - SETTINGS
    assert "WATCHER_DATABASE_URL_FILE" in env
    assert "downloads:/data/downloads" in watcher["volumes"]
    assert env["WATCHER_DOWNLOAD_DIR"] == "/data/downloads"
    for secret in watcher["secrets"]:
        assert secret in compose["secrets"]
    grace = float(env["WATCHER_SHUTDOWN_GRACE"])
    assert float(watcher["stop_grace_period"].removesuffix("s")) > grace


def test_kubernetes_deployment_probes_secrets_and_volume() -> None:
    """The Deployment wires /healthz and /readyz, reads the Secret, mounts a shared (RWX) volume."""
    deployment = load(CONFIG / "kubernetes" / "deployment.yaml")
    secret = load(CONFIG / "kubernetes" / "secret.yaml")
    pvc = load(CONFIG / "kubernetes" / "pvc.yaml")
    spec = deployment["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    env = {e["name"]: e for e in container["env"]}
    assert set(env) <= SETTINGS, set(env) - SETTINGS
    assert env["WATCHER_DATABASE_URL"]["valueFrom"]["secretKeyRef"]["key"] in secret["stringData"]
    items = spec["volumes"][0]["secret"]["items"]
    assert {i["key"] for i in items} <= set(secret["stringData"])
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    grace = float(env["WATCHER_SHUTDOWN_GRACE"]["value"])
    assert spec["terminationGracePeriodSeconds"] > grace
    assert spec["securityContext"]["runAsUser"] == 10001
    assert deployment["spec"]["replicas"] >= 2
