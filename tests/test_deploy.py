"""The deploy files, checked offline against their schemas and against the app they deploy.

Kubernetes manifests, rendered by kubectl's built-in kustomize, against the Kubernetes OpenAPI schemas
(kubernetes-validate), compose.yaml against the Compose
specification (the copy check-jsonschema vendors), app.json against Heroku's documented app.json keys; then every
name, port, path and time in them against the settings, routes and Dockerfile of this repository.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from check_jsonschema.builtin_schemas import get_builtin_schema

from llm_service import create_app
from llm_service.config import Settings
from tests.fake_openai import FakeOpenAI
from tests.servers import ROOT, Service, procfile_command

K8S = ROOT / "deploy" / "k8s"
# The oldest Kubernetes minor still commonly run, and the newest the pinned kubernetes-validate knows.
K8S_VERSIONS = ("1.29.0", "1.37.0")
GUNICORN_GRACE_MARGIN_S = 5  # gunicorn.conf.py: graceful_timeout = DEADLINE + 5


def settings_names() -> set[str]:
    """Return every setting .env.example lists (a test elsewhere keeps it equal to the README's table)."""
    return set(re.findall(r"^([A-Z][A-Z0-9_]*)=", (ROOT / ".env.example").read_text(), re.MULTILINE))


def readme_settings() -> set[str]:
    return set(re.findall(r"^\| `([A-Z][A-Z0-9_]*)` \|", (ROOT / "README.md").read_text(), re.MULTILINE))


def routes() -> set[str]:
    app = create_app(Settings(openai_api_key="sk-x", openai_base_url="http://127.0.0.1:9/v1"))
    return {rule.rule for rule in app.url_map.iter_rules()}


def kustomization_files() -> list[Path]:
    return [K8S / name for name in yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"]]


def kustomize_build() -> list[dict[str, Any]]:
    """Render the base as `kubectl apply -k` would (kubectl's built-in kustomize)."""
    kubectl = shutil.which("kubectl")
    assert kubectl
    result = subprocess.run([kubectl, "kustomize", str(K8S)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def k8s_documents() -> dict[str, dict[str, Any]]:
    """Return the rendered base (the files themselves without kubectl) and the Secret template, by kind."""
    if shutil.which("kubectl"):
        documents = kustomize_build()
    else:
        documents = [doc for path in kustomization_files() for doc in yaml.safe_load_all(path.read_text()) if doc]
    documents += [yaml.safe_load((K8S / "secret.example.yaml").read_text())]
    by_kind = {doc["kind"]: doc for doc in documents}
    assert len(by_kind) == len(documents), "one resource of each kind"
    return by_kind


def dockerfile_instructions() -> list[tuple[str, str]]:
    """Return the Dockerfile's instructions, continuation lines joined, as (KEYWORD, arguments)."""
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


def makefile_value(name: str) -> str:
    match = re.search(rf"^{name} := (.+)$", (ROOT / "Makefile").read_text(), re.MULTILINE)
    assert match, name
    return match.group(1).strip()


# ---- /health and /ready: the contract, and the README's examples, through the Procfile's gunicorn ----


def readme_json_after(command: str) -> dict[str, Any]:
    """Return the JSON example that follows a command in the README."""
    text = (ROOT / "README.md").read_text()
    start = text.index(command)
    block = re.search(r"```json\n(.*?)\n```", text[start:], re.DOTALL)
    assert block, f"no JSON example after {command!r}"
    return json.loads(block.group(1))  # type: ignore[no-any-return]


@pytest.mark.e2e
def test_health_and_ready_answer_as_the_readme_shows(upstream: FakeOpenAI, tmp_path: Path) -> None:
    env = {"OPENAI_API_KEY": "sk-health-0000", "OPENAI_BASE_URL": upstream.url, "WEB_CONCURRENCY": "1"}
    with Service(env, tmp_path / "service.log") as service:
        before_s = int(time.time())
        status, _, raw = service.request("GET", "/health")
        health = json.loads(raw)
        status_ready, _, raw_ready = service.request("GET", "/ready")
    assert status == 200
    assert health == {**readme_json_after("curl -s localhost:8000/health"), "timestamp": health["timestamp"]}
    assert (health["status"], health["service"]) == ("healthy", "llm-service")  # the original specification
    assert isinstance(health["timestamp"], int) and before_s <= health["timestamp"] <= time.time() + 1
    assert (status_ready, json.loads(raw_ready)) == (200, readme_json_after("curl -s localhost:8000/ready"))
    assert upstream.calls == 0


# ---- Kubernetes ----


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_k8s_manifests_are_valid_kubernetes(version: str) -> None:
    for kind, document in k8s_documents().items():
        try:
            kubernetes_validate.validate(document, version, strict=True)
        except jsonschema.ValidationError as error:  # kubernetes-validate raises jsonschema's own
            pytest.fail(f"{kind} is not valid Kubernetes {version}: {error.message} at {list(error.path)}")


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (with its built-in kustomize) is not installed")
def test_kustomize_renders_every_file_with_the_image_tag() -> None:
    rendered = kustomize_build()
    from_files = [doc for path in kustomization_files() for doc in yaml.safe_load_all(path.read_text()) if doc]
    assert sorted(doc["kind"] for doc in rendered) == sorted(doc["kind"] for doc in from_files)
    (deployment,) = [doc for doc in rendered if doc["kind"] == "Deployment"]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert container["image"] == "llm-service:0.1.0"


def test_every_file_in_deploy_k8s_is_a_resource_or_the_secret_template() -> None:
    listed = set(yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"])
    on_disk = {path.name for path in K8S.glob("*.yaml")} - {"kustomization.yaml", "secret.example.yaml"}
    assert listed == on_disk
    assert "secret.example.yaml" not in listed  # applying -k must never overwrite real secrets with blanks


def container_spec() -> dict[str, Any]:
    (container,) = k8s_documents()["Deployment"]["spec"]["template"]["spec"]["containers"]
    return container  # type: ignore[no-any-return]


def test_k8s_probes_port_and_image_match_the_app() -> None:
    container = container_spec()
    app_routes = routes()
    for probe in ("startupProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["path"] == "/health"
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"]["path"] in app_routes
        assert container[probe]["httpGet"]["port"] == "http"
    (port,) = container["ports"]
    env = {item["name"]: item["value"] for item in container["env"]}
    assert port == {"name": "http", "containerPort": int(env["PORT"]), "protocol": "TCP"}
    exposed = [args for keyword, args in dockerfile_instructions() if keyword == "EXPOSE"]
    assert exposed == [env["PORT"]]
    template = k8s_documents()["Deployment"]["spec"]["template"]
    assert template["metadata"]["annotations"]["prometheus.io/port"] == env["PORT"]
    assert template["metadata"]["annotations"]["prometheus.io/path"] in app_routes


def test_k8s_settings_are_real_settings_and_secrets_come_from_the_secret() -> None:
    documents = k8s_documents()
    known = settings_names()
    configmap = documents["ConfigMap"]["data"]
    assert set(configmap) <= known, f"not settings: {set(configmap) - known}"
    assert set(readme_settings()) >= set(configmap)
    container = container_spec()
    assert {item["name"] for item in container["env"]} <= known
    secret = documents["Secret"]
    assert set(secret["stringData"]) <= known
    assert "REDIS_URL" in secret["stringData"] and "OPENAI_API_KEY" in secret["stringData"]
    assert set(secret["stringData"].values()) == {""}, "the template holds no real value"
    assert not set(secret["stringData"]) & set(configmap), "no secret in the ConfigMap"
    sources = {next(iter(source)): next(iter(source.values()))["name"] for source in container["envFrom"]}
    assert sources == {"configMapRef": documents["ConfigMap"]["metadata"]["name"], "secretRef": "llm-service"}
    assert secret["metadata"]["name"] == "llm-service"


def test_k8s_grace_period_outlasts_the_drain() -> None:
    pod = k8s_documents()["Deployment"]["spec"]["template"]["spec"]
    deadline_s = float(k8s_documents()["ConfigMap"]["data"]["DEADLINE"])
    container = container_spec()
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    pre_stop_s = float(command[1])
    assert pod["terminationGracePeriodSeconds"] > pre_stop_s + deadline_s + GUNICORN_GRACE_MARGIN_S


def test_k8s_pod_runs_unprivileged_on_a_read_only_root() -> None:
    pod = k8s_documents()["Deployment"]["spec"]["template"]["spec"]
    container = container_spec()
    (user,) = [args for keyword, args in dockerfile_instructions() if keyword == "USER"][-1:]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert f"{pod['securityContext']['runAsUser']}:{pod['securityContext']['runAsGroup']}" == user
    assert container["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
    }
    mounts = {mount["mountPath"]: mount["name"] for mount in container["volumeMounts"]}
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    assert "emptyDir" in volumes[mounts["/tmp"]]  # gunicorn's heartbeat files
    metrics_dir = {item["name"]: item["value"] for item in container["env"]}["PROMETHEUS_MULTIPROC_DIR"]
    (metrics_mount,) = [path for path in mounts if metrics_dir.startswith(path + "/")]
    assert "emptyDir" in volumes[mounts[metrics_mount]]


def test_k8s_autoscaler_budget_and_service_point_at_the_deployment() -> None:
    documents = k8s_documents()
    deployment = documents["Deployment"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert documents["Service"]["spec"]["selector"].items() <= labels.items()
    assert documents["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert documents["NetworkPolicy"]["spec"]["podSelector"]["matchLabels"].items() <= labels.items()
    hpa = documents["HorizontalPodAutoscaler"]["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "llm-service"}
    assert hpa["minReplicas"] == deployment["spec"]["replicas"] >= 2
    resources = container_spec()["resources"]
    assert set(resources) == {"requests", "limits"}


# ---- Compose ----


def compose() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "compose.yaml").read_text())  # type: ignore[no-any-return]


def test_compose_file_follows_the_compose_specification() -> None:
    schema = get_builtin_schema("vendor.compose-spec")
    validator = jsonschema.validators.validator_for(schema)(schema)
    errors = [f"{list(error.path)}: {error.message}" for error in validator.iter_errors(compose())]
    assert not errors


def test_compose_wires_the_service_redis_prometheus_and_grafana() -> None:
    services = compose()["services"]
    assert set(services) == {"llm-service", "redis", "prometheus", "grafana"}
    app = services["llm-service"]
    assert app["deploy"]["replicas"] == 2
    assert app["env_file"] == ".env"  # secrets from an env file, never from compose.yaml
    assert set(app["environment"]) <= settings_names()
    assert not {"OPENAI_API_KEY", "API_KEYS", "METRICS_TOKEN"} & set(app["environment"])
    assert app["environment"]["REDIS_URL"].startswith("redis://redis:")
    # SIGTERM drain: DEADLINE (default 25 s) + gunicorn's margin must fit before Compose kills the container.
    assert int(app["stop_grace_period"].removesuffix("s")) > Settings().deadline_s + GUNICORN_GRACE_MARGIN_S
    for service in services.values():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (ROOT / source).exists(), source
    prometheus = yaml.safe_load((ROOT / "deploy" / "observability" / "prometheus.yml").read_text())
    (job,) = prometheus["scrape_configs"]
    (target,) = job["dns_sd_configs"]
    assert target["names"] == ["llm-service"] and str(target["port"]) == app["environment"]["PORT"]
    assert job["metrics_path"] in routes()


def test_grafana_provisioning_loads_the_dashboard_from_prometheus() -> None:
    grafana = compose()["services"]["grafana"]
    mounts = dict(volume.rsplit(":", 1)[0].split(":", 1) for volume in grafana["volumes"])
    by_target = {target: source for source, target in mounts.items()}
    (provider_file,) = (ROOT / by_target["/etc/grafana/provisioning/dashboards"]).glob("*.yml")
    (provider,) = yaml.safe_load(provider_file.read_text())["providers"]
    dashboard_path = provider["options"]["path"]
    dashboard_mounts = [target for target in by_target if target.startswith(dashboard_path + "/")]
    assert [Path(by_target[target]).name for target in dashboard_mounts] == ["grafana-dashboard.json"]
    (datasource_file,) = (ROOT / by_target["/etc/grafana/provisioning/datasources"]).glob("*.yml")
    (datasource,) = yaml.safe_load(datasource_file.read_text())["datasources"]
    assert datasource["type"] == "prometheus" and datasource["isDefault"] is True
    assert datasource["url"].startswith("http://prometheus:")


# ---- Heroku ----

# Heroku's app.json schema as its reference documents it (top-level keys, env entries, formation, add-ons).
APP_JSON_SCHEMA: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "name": {"type": "string", "minLength": 3, "maxLength": 30},
        "description": {"type": "string", "maxLength": 140},
        "keywords": {"type": "array", "items": {"type": "string"}},
        "website": {"type": "string"},
        "repository": {"type": "string"},
        "logo": {"type": "string"},
        "success_url": {"type": "string"},
        "scripts": {"type": "object", "additionalProperties": {"type": "string"}},
        "env": {
            "type": "object",
            "additionalProperties": {
                "anyOf": [
                    {"type": "string"},
                    {
                        "type": "object",
                        "additionalProperties": False,
                        "required": ["description"],
                        "properties": {
                            "description": {"type": "string"},
                            "value": {"type": "string"},
                            "required": {"type": "boolean"},
                            "generator": {"enum": ["secret"]},
                        },
                    },
                ]
            },
        },
        "formation": {
            "type": "object",
            "additionalProperties": {
                "type": "object",
                "additionalProperties": False,
                "required": ["quantity"],
                "properties": {"quantity": {"type": "integer", "minimum": 0}, "size": {"type": "string"}},
            },
        },
        "image": {"type": "string"},
        "addons": {
            "type": "array",
            "items": {
                "anyOf": [
                    {"type": "string"},
                    {
                        "type": "object",
                        "additionalProperties": False,
                        "required": ["plan"],
                        "properties": {"plan": {"type": "string"}, "as": {"type": "string"}, "options": {}},
                    },
                ]
            },
        },
        "buildpacks": {
            "type": "array",
            "items": {"type": "object", "required": ["url"], "properties": {"url": {"type": "string"}}},
        },
        "environments": {"type": "object"},
        "stack": {"type": "string"},
    },
}


def app_json() -> dict[str, Any]:
    return json.loads((ROOT / "app.json").read_text())  # type: ignore[no-any-return]


def test_app_json_follows_herokus_schema() -> None:
    jsonschema.validate(app_json(), APP_JSON_SCHEMA)


def test_app_json_matches_the_app() -> None:
    manifest = app_json()
    assert set(manifest["env"]) <= settings_names()
    assert manifest["env"]["METRICS_TOKEN"]["generator"] == "secret"
    assert manifest["env"]["OPENAI_API_KEY"]["required"] is True and "value" not in manifest["env"]["OPENAI_API_KEY"]
    assert float(manifest["env"]["DEADLINE"]["value"]) + GUNICORN_GRACE_MARGIN_S <= 30  # Heroku's SIGKILL
    assert [addon["plan"].split(":")[0] for addon in manifest["addons"]] == ["heroku-redis"]
    assert manifest["addons"][0]["as"] == "REDIS"  # so the add-on sets REDIS_URL, the setting the app reads
    assert manifest["formation"]["web"]["quantity"] >= 1
    procfile_types = {line.split(":")[0] for line in (ROOT / "Procfile").read_text().splitlines() if line}
    assert set(manifest["formation"]) <= procfile_types
    assert manifest["success_url"] in routes()


# ---- Dockerfile ----


def test_dockerfile_runs_the_procfile_command_and_the_makefiles_portable_build() -> None:
    instructions = dockerfile_instructions()
    commands = [json.loads(args) for keyword, args in instructions if keyword == "CMD"]
    assert commands == [procfile_command()]
    assert instructions[0] == ("FROM", "python:3.11-slim AS build")
    args = dict(
        shlex.split(value)[0].split("=", 1)
        for keyword, value in instructions
        if keyword == "ARG" and "=" in value and value.split("=", 1)[0] in ("LLAMA_CMAKE_ARGS", "SMOLLM2")
    )
    assert args == {"LLAMA_CMAKE_ARGS": makefile_value("LLAMA_CMAKE_ARGS"), "SMOLLM2": makefile_value("SMOLLM2")}
    healthchecks = [args for keyword, args in instructions if keyword == "HEALTHCHECK"]
    assert len(healthchecks) == 1 and "/health" in healthchecks[0]
    assert instructions[-1] == ("USER", "10001:10001")  # the default target ends unprivileged


def test_dockerignore_lets_only_the_apps_files_into_the_build() -> None:
    lines = [line for line in (ROOT / ".dockerignore").read_text().splitlines() if line and line[0] != "#"]
    assert lines[0] == "*"  # everything out, then the app's own files back in: .env can never slip through
    assert not [line for line in lines if ".env" in line or line in ("!.", "!*")]
