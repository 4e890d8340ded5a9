"""deploy/ and the Dockerfile against the Kubernetes API and compose schemas, and against
the service itself: its options, its listen port, its probes and its drain timeout.

Kubernetes objects are validated with kubernetes-validate (the API's JSON schemas, bundled:
no cluster, no network), compose.yaml with the compose spec's JSON schema (bundled in
check-jsonschema). The rest is what a schema cannot know: that the pieces fit each other
and the service.
"""

from __future__ import annotations

import importlib.resources
import ipaddress
import json
import re
import shlex
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import kubernetes_validate
import pytest
import yaml
from twisted.python import usage

from curlfetch.options import TOKENS_ENV, Config, listens_on_loopback_only

from .support import (
    COMPOSE,
    DEPLOY,
    DOCKERFILE,
    K8S,
    ROOT,
    VALID_DATABASE_URL,
    VALID_TOKEN,
    Manifest,
    dockerfile_env,
    dockerfile_instructions,
    exec_form,
    final_stage,
    k8s_manifests,
    listen_port,
    load_yaml_documents,
    one,
    option_variables,
    parse_config,
    quantity,
    read_env_file,
)

BASE_IMAGE = "python:3.11-slim-bookworm"
ENTRYPOINT = ["twistd", "--nodaemon", "--pidfile=", "curlfetch"]
K8S_VERSIONS = ["1.28.0", kubernetes_validate.latest_version()]
"""The oldest Kubernetes the manifests claim to support, and the newest schema bundled."""

FORBIDDEN_EGRESS = [
    ipaddress.ip_network(net)
    for net in (
        "10.0.0.0/8",
        "172.16.0.0/12",
        "192.168.0.0/16",
        "169.254.0.0/16",  # link-local: the cloud metadata endpoint 169.254.169.254
        "100.64.0.0/10",
        "127.0.0.0/8",
        "0.0.0.0/8",
        "fc00::/7",  # unique-local: fd00:ec2::254 (metadata) too
        "fe80::/10",
        "::1/128",
        "::ffff:0:0/96",  # IPv4-mapped: any IPv4 address, private ones included
    )
]

CURLFETCH_VARIABLE = re.compile(r"\bCURLFETCH_[A-Z][A-Z0-9_]*")


# -- shared facts --------------------------------------------------------------------------


def deployment() -> dict[str, Any]:
    return one("Deployment")


def pod_spec() -> dict[str, Any]:
    spec: dict[str, Any] = deployment()["spec"]["template"]["spec"]
    return spec


def container() -> dict[str, Any]:
    containers = pod_spec()["containers"]
    assert len(containers) == 1, "one curlfetch container per pod"
    found: dict[str, Any] = containers[0]
    return found


def k8s_environment() -> dict[str, str]:
    """What the container's environment holds: the ConfigMap, the Secret (placeholders
    replaced by valid values) and the literal env entries."""
    env: dict[str, str] = {}
    for source in container().get("envFrom", []):
        if "configMapRef" in source:
            env.update(k8s_object("ConfigMap", source["configMapRef"]["name"])["data"])
        if "secretRef" in source:
            secret = k8s_object("Secret", source["secretRef"]["name"])
            env.update({key: "<placeholder>" for key in secret.get("stringData", {})})
    env[TOKENS_ENV] = VALID_TOKEN
    env["CURLFETCH_DATABASE_URL"] = VALID_DATABASE_URL
    for item in container().get("env", []):
        env[item["name"]] = item.get("value", "pod-name-from-the-downward-api")
    return env


def k8s_object(kind: str, name: str) -> dict[str, Any]:
    for manifest in k8s_manifests():
        if manifest.kind == kind and manifest.name == name:
            return manifest.doc
    raise AssertionError(f"no {kind} named {name!r} in deploy/k8s")


def k8s_config() -> Config:
    return parse_config(k8s_environment())


def container_port(port: int | str) -> int:
    """A probe's or Service's port (a number, or a name of the container's ports)."""
    for item in container()["ports"]:
        if port in (item["containerPort"], item.get("name")):
            return int(item["containerPort"])
    raise AssertionError(f"port {port!r} is not one of the container's ports")


def pre_stop_sleep() -> float:
    command = container()["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep", f"preStop should sleep, not {command}"
    return float(command[1])


def compose() -> dict[str, Any]:
    [doc] = load_yaml_documents(COMPOSE)
    return doc


def compose_environment() -> dict[str, str]:
    """The curlfetch service's environment in compose: the image's, the env file (as its
    example, placeholders replaced) and ``environment:``."""
    service = compose()["services"]["curlfetch"]
    env = dockerfile_env(final_stage(dockerfile_instructions()))
    for name in env_files(service):
        env.update(read_env_file(DEPLOY / f"{name}.example"))
    env[TOKENS_ENV] = VALID_TOKEN
    env["CURLFETCH_DATABASE_URL"] = VALID_DATABASE_URL
    env.update({k: str(v) for k, v in (service.get("environment") or {}).items()})
    return env


def env_files(service: dict[str, Any]) -> list[str]:
    value = service.get("env_file", [])
    items = [value] if isinstance(value, str | dict) else value
    return [item if isinstance(item, str) else item["path"] for item in items]


def compose_duration(text: str) -> float:
    """A compose duration (``30s``, ``1m30s``) in seconds."""
    units = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
    parts = re.findall(r"(\d+(?:\.\d+)?)(us|ms|s|m|h)", text)
    assert parts, f"bad duration {text!r}"
    assert "".join(n + u for n, u in parts) == text, f"bad duration {text!r}"
    return sum(float(n) * units[u] for n, u in parts)


# -- every CURLFETCH_* is an option of the service ------------------------------------------


def deploy_files() -> list[Path]:
    files = [DOCKERFILE, *sorted(p for p in DEPLOY.rglob("*") if p.is_file())]
    return [p for p in files if "__pycache__" not in p.parts]


def test_every_curlfetch_variable_is_an_option_of_the_service() -> None:
    known = option_variables()
    assert {"CURLFETCH_LISTEN", "CURLFETCH_ALLOW_CIDR", "CURLFETCH_TOKENS"} <= known
    unknown = {
        (str(path.relative_to(ROOT)), name)
        for path in deploy_files()
        for name in CURLFETCH_VARIABLE.findall(path.read_text(errors="replace"))
        if name not in known
    }
    assert not unknown, f"not options of twistd curlfetch: {sorted(unknown)}"


# -- the Dockerfile ----------------------------------------------------------------------


def test_dockerfile_builds_on_the_slim_python_image_in_every_stage() -> None:
    froms = [i.args.split()[0] for i in dockerfile_instructions() if i.keyword == "FROM"]
    assert froms, "no FROM"
    assert set(froms) == {BASE_IMAGE}, froms


def test_dockerfile_runs_twistd_as_a_non_root_user() -> None:
    stage = final_stage(dockerfile_instructions())
    by_keyword = {i.keyword: i.args for i in stage}
    user = by_keyword["USER"].split(":")
    assert user[0].isdigit(), "a numeric USER, which runAsNonRoot can check"
    assert int(user[0]) != 0
    security = pod_spec()["securityContext"]
    assert security["runAsNonRoot"] is True
    assert security["runAsUser"] == int(user[0])
    assert exec_form(by_keyword["ENTRYPOINT"]) == ENTRYPOINT
    assert by_keyword["STOPSIGNAL"] == "SIGTERM"
    assert "CMD" not in by_keyword, "configuration comes from the environment only"


def test_dockerfile_healthcheck_volume_and_port_fit_the_service() -> None:
    stage = final_stage(dockerfile_instructions())
    env = dockerfile_env(stage)
    config = parse_config({**env, TOKENS_ENV: VALID_TOKEN})
    assert config.log_format == "json"
    assert config.data_dir == "/data"
    assert not listens_on_loopback_only(config.listen), "reachable from outside"

    [volume] = [i.args for i in stage if i.keyword == "VOLUME"]
    assert config.data_dir in exec_form(volume)
    [expose] = [i.args for i in stage if i.keyword == "EXPOSE"]
    assert int(expose.split("/")[0]) == listen_port(config.listen)

    [healthcheck] = [i.args for i in stage if i.keyword == "HEALTHCHECK"]
    command = exec_form(healthcheck.split(" CMD ", 1)[1])
    assert command == ["curlfetch-healthcheck"]
    copies = [i.args for i in stage if i.keyword == "COPY"]
    assert any(
        c.endswith("deploy/container/healthcheck.py /usr/local/bin/curlfetch-healthcheck")
        for c in copies
    ), copies

    # Without tokens the image's own settings must refuse to start (reachable port).
    with pytest.raises(usage.UsageError, match="no tokens"):
        parse_config(env)


def test_dockerfile_keeps_build_secrets_out_of_the_image() -> None:
    instructions = dockerfile_instructions()
    stage = final_stage(instructions)
    assert not [i for i in stage if i.keyword == "ARG"], "no build arguments in the final stage"
    env = dockerfile_env(stage)
    assert not [k for k in env if k.startswith("PIP_") and k != "PIP_DISABLE_PIP_VERSION_CHECK"]
    for instruction in instructions:
        text = instruction.args
        if "/run/secrets/" in text:
            assert instruction.keyword == "RUN", instruction
            assert "--mount=type=secret" in text, instruction
        assert "PIP_CERT=" not in text or "/run/secrets/" in text, instruction
        if instruction.keyword in ("ENV", "COPY", "ADD"):
            assert "secret" not in text.lower(), instruction
            assert ".crt" not in text, instruction


def test_dockerignore_admits_exactly_what_the_dockerfile_copies() -> None:
    lines = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert lines[0] == "*", "everything is left out unless named"
    admitted = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    for instruction in dockerfile_instructions():
        if instruction.keyword != "COPY" or "--from=" in instruction.args:
            continue
        words = [w for w in shlex.split(instruction.args) if not w.startswith("--")]
        for word in words[:-1]:
            source = word.rstrip("/")
            assert (ROOT / source).exists(), source
            assert any(source == a or source.startswith(a + "/") for a in admitted), source


def test_the_wheel_carries_every_package_and_the_twistd_plugin() -> None:
    setuptools = pytest.importorskip("setuptools")
    import tomllib

    find = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    include = find["packages"]["find"]["include"]
    src = ROOT / "service"
    assert find["package-dir"] == {"": "service"}
    found = set(setuptools.find_namespace_packages(where=str(src), include=include))
    packages = {".".join(p.parent.relative_to(src).parts) for p in src.rglob("__init__.py")}
    assert packages <= found, f"left out of the wheel: {sorted(packages - found)}"
    assert "twisted.plugins" in found
    assert (src / "twisted" / "plugins" / "curlfetch_plugin.py").exists()
    # An __init__.py there would replace Twisted's own twisted/plugins/__init__.py.
    assert not (src / "twisted" / "plugins" / "__init__.py").exists()
    assert not (src / "twisted" / "__init__.py").exists()


# -- Kubernetes ----------------------------------------------------------------------------


@pytest.mark.parametrize("manifest", k8s_manifests(), ids=str)
@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_manifest_matches_the_kubernetes_api_schema(manifest: Manifest, version: str) -> None:
    try:
        kubernetes_validate.validate(manifest.doc, version, strict=True)
    except kubernetes_validate.ValidationError as e:
        path = ".".join(str(p) for p in e.path)
        pytest.fail(f"{manifest} against Kubernetes {version}: {path}: {e.message}")


def test_manifests_name_themselves_in_one_namespace() -> None:
    manifests = k8s_manifests()
    kinds = {m.kind for m in manifests}
    required = {"Deployment", "Service", "ConfigMap", "Secret", "NetworkPolicy"}
    assert required | {"PersistentVolumeClaim"} <= kinds
    [namespace] = [m.name for m in manifests if m.kind == "Namespace"]
    dns_label = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?\Z")
    for m in manifests:
        assert m.doc.get("apiVersion"), m
        assert m.kind, m
        assert dns_label.match(m.name), m
        assert len(m.name) <= 63, m
        if m.kind != "Namespace":
            assert m.doc["metadata"].get("namespace") == namespace, m

    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert kustomization["namespace"] == namespace
    listed = set(kustomization["resources"])
    on_disk = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == on_disk


def test_selectors_match_the_pods() -> None:
    spec = deployment()["spec"]
    labels = spec["template"]["metadata"]["labels"]
    selectors = {
        "Deployment": spec["selector"]["matchLabels"],
        "Service": one("Service")["spec"]["selector"],
        "NetworkPolicy": one("NetworkPolicy")["spec"]["podSelector"]["matchLabels"],
        "PodDisruptionBudget": one("PodDisruptionBudget")["spec"]["selector"]["matchLabels"],
    }
    for kind, selector in selectors.items():
        assert selector, kind
        assert selector.items() <= labels.items(), f"{kind} selects {selector}"


def test_configuration_is_what_the_service_accepts() -> None:
    config = k8s_config()
    assert not listens_on_loopback_only(config.listen), "the kubelet and Service reach it"
    assert config.log_format == "json"
    assert config.tokens, "tokens are required"
    assert config.database, "replicas share a PostgreSQL queue"
    names = {item["name"] for item in container().get("env", [])}
    assert "CURLFETCH_INSTANCE_ID" in names
    secret = one("Secret")
    assert {TOKENS_ENV, "CURLFETCH_DATABASE_URL"} <= set(secret["stringData"])
    configmap = one("ConfigMap")["data"]
    assert not {TOKENS_ENV, "CURLFETCH_DATABASE_URL"} & set(configmap), "secrets in a Secret"


def test_the_example_secrets_fail_closed() -> None:
    """The placeholders are not tokens: a pod started with them refuses to run."""
    secret = one("Secret")["stringData"]
    with pytest.raises(usage.UsageError, match=TOKENS_ENV):
        parse_config({**k8s_environment(), TOKENS_ENV: secret[TOKENS_ENV]})
    example = read_env_file(DEPLOY / "curlfetch.env.example")
    with pytest.raises(usage.UsageError, match=TOKENS_ENV):
        parse_config({**compose_environment(), TOKENS_ENV: example[TOKENS_ENV]})


def test_ports_and_probes_hit_the_service() -> None:
    port = listen_port(k8s_config().listen)
    assert [p["containerPort"] for p in container()["ports"]] == [port]
    c = container()
    readiness = c["readinessProbe"]["httpGet"]
    liveness = c["livenessProbe"]["httpGet"]
    assert readiness["path"] == "/readyz"
    assert liveness["path"] == "/healthz"
    assert container_port(readiness["port"]) == port
    assert container_port(liveness["port"]) == port
    if "startupProbe" in c:
        startup = c["startupProbe"]["httpGet"]
        assert startup["path"] == "/healthz"
        assert container_port(startup["port"]) == port
    for probe in ("readinessProbe", "livenessProbe"):
        assert c[probe].get("scheme", "HTTP") == "HTTP"
    [service_port] = one("Service")["spec"]["ports"]
    assert container_port(service_port["targetPort"]) == port


def test_termination_grace_covers_the_pre_stop_sleep_and_the_drain() -> None:
    drain = k8s_config().drain_timeout
    sleep = pre_stop_sleep()
    assert sleep >= 1, "time for the endpoints to drop the pod before SIGTERM"
    grace = pod_spec()["terminationGracePeriodSeconds"]
    assert grace >= drain + sleep + 5, f"{grace} s < drain {drain} s + preStop {sleep} s + 5 s"


def test_resources_security_and_volumes() -> None:
    c = container()
    resources = c["resources"]
    for resource in ("cpu", "memory"):
        request = quantity(resources["requests"][resource])
        limit = quantity(resources["limits"][resource])
        assert 0 < request <= limit, resource
    security = c["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]

    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    assert k8s_config().data_dir in mounts, "the data directory is a volume"
    assert "/tmp" in mounts, "large request bodies are spooled in /tmp (read-only root)"
    volumes = {v["name"]: v for v in pod_spec()["volumes"]}
    claim = volumes[mounts[k8s_config().data_dir]]["persistentVolumeClaim"]["claimName"]
    pvc = k8s_object("PersistentVolumeClaim", claim)
    if deployment()["spec"]["replicas"] > 1:
        assert "ReadWriteMany" in pvc["spec"]["accessModes"], "replicas share the bodies"


def test_network_policy_blocks_private_and_metadata_egress() -> None:
    policy = one("NetworkPolicy")["spec"]
    assert "Egress" in policy["policyTypes"]
    rules = policy["egress"]
    for rule in rules:
        peers = rule.get("to")
        assert peers, f"an egress rule without 'to' allows every address: {rule}"
        assert rule.get("ports"), f"an egress rule without ports allows every port: {rule}"
        for peer in peers:
            block = peer.get("ipBlock")
            if block is None:
                assert peer.get("podSelector") is not None, f"only pods or ipBlocks: {peer}"
                continue
            cidr = ipaddress.ip_network(block["cidr"])
            excepted = [ipaddress.ip_network(e) for e in block.get("except", [])]
            for net in excepted:
                assert net.version == cidr.version, net
                assert net.subnet_of(cidr), net  # type: ignore[arg-type]
            for forbidden in FORBIDDEN_EGRESS:
                if forbidden.version != cidr.version or not forbidden.overlaps(cidr):
                    continue
                assert any(
                    forbidden.subnet_of(e)  # type: ignore[arg-type]
                    for e in excepted
                    if e.version == forbidden.version
                ), f"{cidr} lets pods reach {forbidden}"
    metadata = ipaddress.ip_address("169.254.169.254")
    assert not any(
        metadata in ipaddress.ip_network(p["ipBlock"]["cidr"])
        and not any(metadata in ipaddress.ip_network(e) for e in p["ipBlock"].get("except", []))
        for rule in rules
        for p in rule["to"]
        if "ipBlock" in p
    )

    dns = [r for r in rules if {p.get("port") for p in r["ports"]} == {53}]
    assert dns, "DNS (port 53) to the cluster's resolver"
    for rule in dns:
        assert all("ipBlock" not in p for p in rule["to"]), "DNS only to kube-dns pods"
    database = urlsplit(VALID_DATABASE_URL).port or 5432
    assert any(
        {p.get("port") for p in r["ports"]} == {database}
        and all("podSelector" in p for p in r["to"])
        for r in rules
    ), "PostgreSQL's port to its pods"

    port = listen_port(k8s_config().listen)
    for rule in policy.get("ingress", []):
        assert {container_port(p["port"]) for p in rule["ports"]} == {port}


# -- compose -------------------------------------------------------------------------------


def test_compose_matches_the_compose_spec() -> None:
    schema_file = importlib.resources.files("check_jsonschema.builtin_schemas.vendor").joinpath(
        "compose-spec.json"
    )
    schema = json.loads(schema_file.read_text())
    validator = jsonschema.Draft202012Validator(schema)
    errors = sorted(validator.iter_errors(compose()), key=lambda e: list(e.path))
    assert not errors, [f"{'.'.join(map(str, e.path))}: {e.message}" for e in errors]


def test_compose_runs_postgres_and_replicas_sharing_the_bodies() -> None:
    doc = compose()
    services = doc["services"]
    assert services["postgres"]["image"].startswith("postgres:16")
    curlfetch = services["curlfetch"]
    assert curlfetch["deploy"]["replicas"] >= 2
    assert curlfetch["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert "healthcheck" in services["postgres"]

    volumes = set(doc.get("volumes") or {})
    for name, service in services.items():
        for mount in service.get("volumes", []):
            source = mount.split(":")[0] if isinstance(mount, str) else mount["source"]
            if not source.startswith((".", "/")):
                assert source in volumes, f"{name}: volume {source} is not declared"

    config = parse_config(compose_environment())
    mounts = {m.split(":")[1]: m.split(":")[0] for m in curlfetch["volumes"]}
    assert config.data_dir in mounts, "the bodies volume is the data directory"
    assert config.database, "the replicas share the PostgreSQL queue"
    for port in curlfetch["ports"]:
        assert int(str(port).rsplit(":", 1)[1]) == listen_port(config.listen)

    grace = compose_duration(curlfetch["stop_grace_period"])
    assert grace > config.drain_timeout, "a stop drains before the SIGKILL"
    assert curlfetch.get("read_only") is True
    assert "/tmp" in curlfetch.get("tmpfs", [])


def test_compose_env_files_have_examples_and_stay_out_of_git() -> None:
    gitignore = (ROOT / ".gitignore").read_text().split()
    for name, service in compose()["services"].items():
        for env_file in env_files(service):
            example = DEPLOY / f"{env_file}.example"
            assert example.is_file(), f"{name}: {env_file} has no {example.name}"
            assert f"/deploy/{env_file}" in gitignore or "/deploy/*.env" in gitignore
    curlfetch_env = read_env_file(DEPLOY / "curlfetch.env.example")
    postgres_env = read_env_file(DEPLOY / "postgres.env.example")
    url = urlsplit(curlfetch_env["CURLFETCH_DATABASE_URL"])
    assert url.hostname == "postgres", "the compose service's name"
    assert url.username == postgres_env["POSTGRES_USER"]
    assert url.path.lstrip("/") == postgres_env["POSTGRES_DB"]
    assert set(curlfetch_env) == {TOKENS_ENV, "CURLFETCH_DATABASE_URL"}


def test_no_secret_values_are_committed() -> None:
    """Only placeholders where tokens and passwords go."""
    texts = [
        *one("Secret")["stringData"].values(),
        *read_env_file(DEPLOY / "curlfetch.env.example").values(),
        *read_env_file(DEPLOY / "postgres.env.example").values(),
    ]
    secrets = [t for t in texts if re.search(r"[A-Za-z0-9_-]{20,}", t) and "<" not in t]
    assert not secrets, secrets
