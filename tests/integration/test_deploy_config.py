"""The deployment files in config/ are consistent with the code: every variable they set is a
setting, the probes hit the real health endpoints, and replicas share what they must share."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from watcher.settings import ENV_PREFIX, Settings, load_settings

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


def dockerfile_env() -> dict[str, str]:
    """The ``ENV`` of the Dockerfile's runtime stage, as the container starts with it."""
    text = (CONFIG.parent / "Dockerfile").read_text("utf-8").replace("\\\n", " ")
    runtime = text.split(" AS runtime", 1)[1]
    env: dict[str, str] = {}
    for line in runtime.splitlines():
        if line.startswith("ENV "):
            for pair in line.removeprefix("ENV ").split():
                key, _, value = pair.partition("=")
                env[key] = value
    return env


def test_the_image_env_and_compose_env_make_valid_settings(tmp_path: Path) -> None:
    """The image's own ENV plus compose.yaml's environment load without a conflict."""
    watcher = load(CONFIG / "compose.yaml")["services"]["watcher"]
    env = {**dockerfile_env(), **{k: str(v) for k, v in watcher["environment"].items()}}
    for name in [k for k in env if k.endswith("_FILE")]:  # the secrets compose mounts
        secret = tmp_path / name
        url = "postgresql://watcher:pw@postgres:5432/watcher"
        secret.write_text(url if "DATABASE" in name else "a-secret-value\n")
        env[name] = str(secret)
    settings = load_settings(env)
    assert settings.database_url.startswith("postgresql://")
    assert str(settings.download_dir) == "/data/downloads"


def test_the_image_env_and_the_kubernetes_env_make_valid_settings(tmp_path: Path) -> None:
    """The image's own ENV plus the Deployment's env load without a conflict."""
    deployment = load(CONFIG / "kubernetes" / "deployment.yaml")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    env = dockerfile_env()
    for item in container["env"]:
        if item["name"].endswith("_FILE"):
            secret = tmp_path / item["name"]
            secret.write_text("a-secret-value\n")
            env[item["name"]] = str(secret)
        elif "value" in item:
            env[item["name"]] = str(item["value"])
        else:  # from a Secret key or the pod's name
            url = "postgresql://watcher:pw@postgres:5432/watcher"
            env[item["name"]] = url if "DATABASE" in item["name"] else "watcher-0"
    settings = load_settings(env)
    assert settings.database_url.startswith("postgresql://")


def test_compose_on_object_storage_shares_no_volume(tmp_path: Path) -> None:
    """compose.objects.yaml: three replicas on PostgreSQL writing to MinIO through the standard
    AWS variables, with no volume of their own, and settings that load."""
    compose = load(CONFIG / "compose.objects.yaml")
    watcher = compose["services"]["watcher"]
    assert watcher["deploy"]["replicas"] == 3
    assert "volumes" not in watcher
    assert watcher["depends_on"]["minio-setup"]["condition"] == "service_completed_successfully"
    env = {k: str(v) for k, v in watcher["environment"].items()}
    assert {k for k in env if k.startswith(ENV_PREFIX)} <= SETTINGS
    assert env["AWS_ENDPOINT_URL"] == "http://minio:9000"
    bucket = env["WATCHER_STORAGE_URL"].removeprefix("s3://").split("/")[0]
    assert f"media/{bucket}" in " ".join(compose["services"]["minio-setup"]["entrypoint"])
    for name in [k for k in env if k.endswith("_FILE")]:
        secret = tmp_path / name
        secret.write_text("postgresql://w:pw@postgres/w" if "DATABASE" in name else "a-secret\n")
        env[name] = str(secret)
    settings = load_settings({**dockerfile_env(), **env})
    assert settings.storage is not None
    assert settings.storage.url() == env["WATCHER_STORAGE_URL"]


def test_kubernetes_on_object_storage_uses_irsa_and_no_claim() -> None:
    """The object storage Deployment runs as the IRSA service account, mounts no claim, and
    names a bucket; the rest is the RWX Deployment's (probes, secrets, grace)."""
    folder = CONFIG / "kubernetes" / "object-storage"
    deployment = load(folder / "deployment.yaml")
    account = load(folder / "serviceaccount.yaml")
    spec = deployment["spec"]["template"]["spec"]
    assert spec["serviceAccountName"] == account["metadata"]["name"]
    assert "eks.amazonaws.com/role-arn" in account["metadata"]["annotations"]
    assert not any("persistentVolumeClaim" in v for v in spec["volumes"])
    (container,) = spec["containers"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert {k for k in env if k.startswith(ENV_PREFIX)} <= SETTINGS
    assert str(env["WATCHER_STORAGE_URL"]).startswith("s3://")
    assert "WATCHER_DOWNLOAD_DIR" not in env
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert spec["terminationGracePeriodSeconds"] > float(env["WATCHER_SHUTDOWN_GRACE"] or 0)
