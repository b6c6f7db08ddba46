"""deploy/ agrees with the code: every TIERPROXY_* name is a real setting, every set of
settings loads, probes and ports match the listeners, selectors match the pods.

The linters (deploy/check, run by .ci/run) check syntax and schemas; this checks meaning.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml

from tierproxy.cli import _parser
from tierproxy.config import ENV_DEFAULTS, load_settings

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
SETTINGS = {*ENV_DEFAULTS, "TIERPROXY_ORIGIN"}
DEPLOY_FILES = sorted(
    path
    for path in DEPLOY.rglob("*")
    if path.is_file() and path.suffix in {"", ".yml", ".yaml", ".service", ".env"}
)


def documents(name: str) -> list[dict[str, Any]]:
    with open(DEPLOY / name) as file:
        return [doc for doc in yaml.safe_load_all(file) if doc]


def manifests() -> dict[tuple[str, str], dict[str, Any]]:
    """Every Kubernetes object in deploy/kubernetes, by (kind, name)."""
    found = {}
    for path in sorted((DEPLOY / "kubernetes").glob("*.yaml")):
        for doc in documents(str(path.relative_to(DEPLOY))):
            found[doc["kind"], doc["metadata"]["name"]] = doc
    return found


def env_file(path: Path) -> dict[str, str]:
    pairs = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            name, _, value = line.partition("=")
            pairs[name.strip()] = value.strip()
    return pairs


def test_the_deploy_files_are_all_looked_at() -> None:
    names = {path.relative_to(DEPLOY).as_posix() for path in DEPLOY_FILES}
    assert {"Dockerfile", "docker-compose.yml", "systemd/tierproxy.service"} <= names, names
    assert any(name.startswith("kubernetes/") for name in names), names


@pytest.mark.parametrize("path", DEPLOY_FILES, ids=lambda p: p.relative_to(DEPLOY).as_posix())
def test_every_tierproxy_name_in_deploy_is_a_real_setting(path: Path) -> None:
    names = set(re.findall(r"\bTIERPROXY_[A-Z0-9_]+", path.read_text()))

    assert names <= SETTINGS, f"not settings (tierproxy/config.py): {sorted(names - SETTINGS)}"


def _compose_env(service: dict[str, Any]) -> dict[str, str]:
    # ${NAME:-default} as Compose substitutes it with NAME unset.
    env = service.get("environment", {})
    return {k: re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", str(v)) for k, v in env.items()}


def _dockerfile_env() -> dict[str, str]:
    final_stage = (DEPLOY / "Dockerfile").read_text().split("\nFROM ")[-1]
    block = re.search(r"^ENV (.*?)(?<!\\)\n", final_stage, re.DOTALL | re.MULTILINE)
    assert block is not None
    words = shlex.split(block.group(1).replace("\\\n", " "))
    return dict(word.split("=", 1) for word in words if word.startswith("TIERPROXY_"))


def _settings_sets() -> list[Any]:
    compose = documents("docker-compose.yml")[0]
    configmap = manifests()["ConfigMap", "tierproxy"]["data"]
    unit = (DEPLOY / "systemd/tierproxy.service").read_text()
    unit_env = dict(re.findall(r"^Environment=(TIERPROXY_\w+)=(.*)$", unit, re.MULTILINE))
    sets = [
        pytest.param({**_dockerfile_env(), **_compose_env(svc)}, id=f"compose-{name}")
        for name, svc in compose["services"].items()
        if name.startswith("tierproxy")
    ]
    sets.append(pytest.param({**_dockerfile_env(), **configmap}, id="kubernetes-configmap"))
    sets.append(
        pytest.param({**unit_env, **env_file(DEPLOY / "systemd/tierproxy.env")}, id="systemd")
    )
    return sets


@pytest.mark.parametrize("env", _settings_sets())
def test_every_set_of_settings_in_deploy_loads(env: dict[str, str]) -> None:
    # The same validation `tierproxy serve` runs at start: a bad value would exit 2 there.
    settings = load_settings({k: str(v) for k, v in env.items()})

    assert settings.origin.startswith("http"), settings.origin


def test_compose_runs_two_tierproxy_replicas_sharing_redis_before_the_demo_origin() -> None:
    services = documents("docker-compose.yml")[0]["services"]
    replicas = {name: svc for name, svc in services.items() if name.startswith("tierproxy")}

    assert len(replicas) == 2, sorted(services)
    for svc in replicas.values():
        env = _compose_env(svc)
        assert env["TIERPROXY_REDIS_URL"] == "redis://redis:6379/0"
        assert env["TIERPROXY_ORIGIN"] == "http://origin:9000"
        assert set(svc["depends_on"]) == {"redis", "origin"}
        # Docker's SIGKILL comes after both drains: requests in flight, then backfills.
        grace = float(str(svc["stop_grace_period"]).removesuffix("s"))
        assert grace > 2 * float(env["TIERPROXY_SHUTDOWN_TIMEOUT"]), svc
    published = [p for svc in replicas.values() for p in svc["ports"]]
    assert len(set(published)) == len(published) == 4, published
    assert all(p.startswith("127.0.0.1:") for p in published), published
    # The origin's command is a real `tierproxy demo-origin` command line.
    args = _parser().parse_args(services["origin"]["command"])
    assert (args.command, args.host, args.port) == ("demo-origin", "0.0.0.0", 9000)


def test_kubernetes_probes_are_on_the_admin_listener_and_selectors_match_the_pods() -> None:
    objects = manifests()
    deployment = objects["Deployment", "tierproxy"]
    configmap = objects["ConfigMap", "tierproxy"]["data"]
    pod = deployment["spec"]["template"]
    container = pod["spec"]["containers"][0]
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}

    assert ports == {
        "http": int(configmap["TIERPROXY_PORT"]),
        "admin": int(configmap["TIERPROXY_ADMIN_PORT"]),
    }
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "admin"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "admin"}
    assert container["envFrom"] == [{"configMapRef": {"name": "tierproxy"}}]
    resources = container["resources"]
    assert resources["requests"]["memory"] and resources["limits"]["memory"], resources
    # Room for preStop and the drain before the kubelet's SIGKILL: the shutdown timeout for
    # the requests in flight, then as long again for background writes.
    pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    drain = float(configmap["TIERPROXY_SHUTDOWN_TIMEOUT"])
    assert pod["spec"]["terminationGracePeriodSeconds"] > pre_stop + 2 * drain

    labels = pod["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"] == labels
    assert objects["Service", "tierproxy"]["spec"]["selector"] == labels
    assert objects["PodDisruptionBudget", "tierproxy"]["spec"]["selector"]["matchLabels"] == labels
    target = objects["HorizontalPodAutoscaler", "tierproxy"]["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", "tierproxy")
    redis_service = objects["Service", "tierproxy-redis"]["spec"]["ports"][0]["port"]
    assert configmap["TIERPROXY_REDIS_URL"] == f"redis://tierproxy-redis:{redis_service}/0"


def test_the_image_is_multi_stage_non_root_with_a_healthcheck_on_healthz() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    stages = re.findall(r"^FROM (\S+)", text, re.MULTILINE)
    final = text.split("\nFROM ")[-1]

    assert len(stages) >= 2, stages
    assert stages[-1].endswith("slim-bookworm"), stages
    assert "COPY --from=build" in final
    assert not re.search(r"apt-get|gcc|build-essential|pip install", final), final
    user = re.findall(r"^USER (\S+)", final, re.MULTILINE)
    assert user and user[-1].split(":")[0] not in {"0", "root"}, user
    assert re.search(r"^HEALTHCHECK .*/healthz", final, re.MULTILINE | re.DOTALL), final
    assert "TIERPROXY_ADMIN_PORT" in final.split("HEALTHCHECK")[1]


def test_the_systemd_unit_runs_serve_and_waits_for_the_drain() -> None:
    unit = (DEPLOY / "systemd/tierproxy.service").read_text()
    settings = dict(re.findall(r"^(\w+)=(.*)$", unit, re.MULTILINE))

    assert settings["ExecStart"].endswith("tierproxy serve"), settings
    assert settings["KillSignal"] == "SIGTERM"
    assert float(settings["TimeoutStopSec"]) > 2 * float(ENV_DEFAULTS["TIERPROXY_SHUTDOWN_TIMEOUT"])
    assert settings["RestartPreventExitStatus"] == "2"  # configuration errors exit 2
    assert settings["DynamicUser"] == "yes" or settings.get("User") not in (None, "root")
