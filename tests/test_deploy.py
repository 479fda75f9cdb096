"""The packaging, checked without a container engine (issue 9).

Parses the Dockerfile, every YAML file under deploy/ and the example
configuration, and asserts the security properties an operator relies on:
non-root, read-only, no capabilities, metrics not published to the world, a
grace period longer than the drain, egress only to the pool. Then runs the
image's own command line (ENTRYPOINT + CMD, with /etc/edge pointed at a
generated example) outside any container: it must start, answer the image's
HEALTHCHECK, and exit 0 on SIGTERM.

deploy/ci/container-test.sh builds and runs the real image; this file is the
fast check that runs everywhere.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
import tomllib
import urllib.request
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

from edge.cli import main as edge_main

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
EXAMPLE = DEPLOY / "example"
K8S = DEPLOY / "kubernetes"
IMAGE_UID = 10001


# --- helpers ---------------------------------------------------------------------------


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order; continuations joined, comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in (REPO / "Dockerfile").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        word, _, rest = line.partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def stages() -> list[list[tuple[str, str]]]:
    result: list[list[tuple[str, str]]] = []
    for instr in dockerfile():
        if instr[0] == "FROM":
            result.append([])
        if result:
            result[-1].append(instr)
    return result


def args_of(stage: list[tuple[str, str]], word: str) -> list[str]:
    return [rest for instr, rest in stage if instr == word]


def load_yaml(path: Path) -> list[Any]:
    with path.open() as f:
        return [doc for doc in yaml.safe_load_all(f) if doc is not None]


def k8s(kind: str, name: str | None = None) -> dict[str, Any]:
    found = [
        doc
        for path in sorted(K8S.rglob("*.yaml"))
        for doc in load_yaml(path)
        if doc.get("kind") == kind and (name is None or doc["metadata"]["name"] == name)
    ]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def load_script(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(path.stem.replace("-", "_"), path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def drain_timeout(toml_text: str) -> float:
    return float(tomllib.loads(toml_text)["limits"]["drain_timeout_s"])


def seconds(text: str) -> float:
    match = re.fullmatch(r"(\d+(?:\.\d+)?)(s|m)", text)
    assert match, text
    return float(match.group(1)) * (60 if match.group(2) == "m" else 1)


# --- Dockerfile ------------------------------------------------------------------------


def test_dockerfile_base_is_a_build_argument_and_stages_are_two() -> None:
    instructions = dockerfile()
    assert instructions[0] == ("ARG", "BASE=debian:bookworm-slim")
    build, runtime = stages()
    assert build[0] == ("FROM", "${BASE} AS build")
    assert runtime[0][1].split()[0] == "${BASE}"
    assert {"PIP_CERT=", "PIP_INDEX_URL="} <= set(args_of(build, "ARG"))


def test_dockerfile_builds_a_wheel_from_debian_python() -> None:
    build, _ = stages()
    runs = " ".join(args_of(build, "RUN"))
    assert "python3-venv" in runs and "apt-get install" in runs
    assert "pip wheel" in runs and "/wheels/*.whl" in runs
    assert runs.count("--no-cache-dir") >= 2
    # Only the package sources enter the build, never tests or benchmarks.
    copied = " ".join(args_of(build, "COPY"))
    assert "tests" not in copied and "bench" not in copied and not re.search(r"COPY \. ", copied)


def test_dockerfile_runtime_stage_is_lean_and_unprivileged() -> None:
    _, runtime = stages()
    runs = " ".join(args_of(runtime, "RUN"))
    installed = re.findall(r"apt-get install [^&]*", runs)
    assert installed, "the runtime installs python3 from Debian"
    packages = set(installed[0].split()) - {"apt-get", "install", "-y", "--no-install-recommends"}
    assert packages == {"python3"}, f"runtime packages: {packages}"
    assert "rm -rf /var/lib/apt/lists/*" in runs and "apt-get clean" in runs
    assert f"--uid {IMAGE_UID}" in runs and f"--gid {IMAGE_UID}" in runs
    # Only the venv (and nothing of the build context) reaches the runtime.
    copies = args_of(runtime, "COPY")
    assert copies == ["--from=build /opt/edge /opt/edge"]
    assert args_of(runtime, "USER") == [f"{IMAGE_UID}:{IMAGE_UID}"]


def test_dockerfile_contract() -> None:
    _, runtime = stages()
    assert args_of(runtime, "EXPOSE") == ["5061 9464"]
    assert args_of(runtime, "STOPSIGNAL") == ["SIGTERM"]
    assert [json.loads(x) for x in args_of(runtime, "ENTRYPOINT")] == [["edge"]]
    assert [json.loads(x) for x in args_of(runtime, "CMD")] == [
        ["run", "--config", "/etc/edge/edge.toml"]
    ]
    (health,) = args_of(runtime, "HEALTHCHECK")
    options, _, command = health.partition(" CMD ")
    assert "--interval=" in options and "--timeout=" in options
    assert json.loads(command)[-1] == "/opt/edge/libexec/healthcheck.py"
    env = " ".join(args_of(runtime, "ENV"))
    assert "EDGE_CONFIG=/etc/edge/edge.toml" in env and "PYTHONDONTWRITEBYTECODE=1" in env


def test_dockerignore_is_an_allow_list_without_tests() -> None:
    lines = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert lines[0] == "*"
    allowed = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    assert allowed == {"pyproject.toml", "README.md", "edge", "deploy/image"}


# --- every YAML file -------------------------------------------------------------------


def test_every_yaml_file_under_deploy_parses() -> None:
    files = sorted([*DEPLOY.rglob("*.yaml"), *DEPLOY.rglob("*.yml")])
    assert len(files) >= 12
    for path in files:
        assert load_yaml(path), f"{path} is empty"


# --- compose ---------------------------------------------------------------------------


def compose() -> dict[str, Any]:
    (doc,) = load_yaml(DEPLOY / "compose" / "compose.yaml")
    assert isinstance(doc, dict)
    return doc


def test_compose_edge_service_is_hardened() -> None:
    edge = compose()["services"]["edge"]
    assert edge["read_only"] is True
    assert edge["cap_drop"] == ["ALL"]
    assert "no-new-privileges:true" in edge["security_opt"]
    assert "tmpfs" not in edge  # the gateway writes nothing
    # The image's user unless the operator names their own (never root).
    assert edge["user"] == "${EDGE_UID:-10001}:${EDGE_GID:-10001}"
    assert edge["build"]["context"] == "../.." and edge["build"]["dockerfile"] == "Dockerfile"
    for volume in edge["volumes"]:
        assert volume.endswith(":ro"), f"edge mounts {volume} writable"
        assert volume.split(":")[1].startswith("/etc/edge/")
    assert edge["stop_grace_period"]
    drain = drain_timeout((EXAMPLE / "edge.toml").read_text())
    assert seconds(edge["stop_grace_period"]) > drain
    assert edge["ulimits"]["nofile"]["soft"] >= 20000


def test_compose_publishes_only_federation_to_the_world() -> None:
    services = compose()["services"]
    for name, service in services.items():
        for port in service.get("ports", []):
            if port == "5061:5061":
                assert name == "edge"
            else:
                assert port.startswith("127.0.0.1:"), f"{name} publishes {port} beyond loopback"


def test_compose_pool_is_internal_and_answers_to_the_topology_names() -> None:
    doc = compose()
    assert doc["networks"]["internal"]["internal"] is True
    config = tomllib.loads((EXAMPLE / "edge.toml").read_text())
    hosts = {m["host"] for pool in config["pools"] for m in pool["members"]}
    aliases = set()
    for name in ("fe1", "fe2"):
        service = doc["services"][name]
        assert list(service["networks"]) == ["internal"], f"{name} must not reach out"
        aliases |= set(service["networks"]["internal"]["aliases"])
        assert service["read_only"] is True and service["cap_drop"] == ["ALL"]
        assert all(v.endswith(":ro") for v in service["volumes"])
    assert aliases == hosts


def test_compose_mounts_exist_or_are_made_by_make_certs() -> None:
    make_certs = load_script(EXAMPLE / "make-certs.py")
    base = DEPLOY / "compose"
    for name, service in compose()["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if not source.startswith("."):
                continue  # a named volume
            path = (base / source).resolve()
            generated = path.parent == EXAMPLE and path.name in make_certs.GENERATED
            assert path.exists() or generated, f"{name}: {source} does not exist"
    prometheus = compose()["services"]["prometheus"]
    assert "../prometheus:/etc/prometheus:ro" in prometheus["volumes"]
    grafana = compose()["services"]["grafana"]
    assert "../grafana/provisioning:/etc/grafana/provisioning:ro" in grafana["volumes"]


# --- Kubernetes ------------------------------------------------------------------------


def edge_toml_in_configmap() -> dict[str, Any]:
    return tomllib.loads(k8s("ConfigMap", "edge-config")["data"]["edge.toml"])


def test_kustomization_lists_every_manifest() -> None:
    (kustomization,) = load_yaml(K8S / "kustomization.yaml")
    listed = set(kustomization["resources"])
    present = {str(p.relative_to(K8S)) for p in K8S.rglob("*.yaml")} - {"kustomization.yaml"}
    assert listed == present
    namespace = k8s("Namespace")
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"


def test_deployment_is_least_privilege() -> None:
    deployment = k8s("Deployment", "edge")
    assert deployment["spec"]["replicas"] == 2
    pod = deployment["spec"]["template"]["spec"]
    assert pod["automountServiceAccountToken"] is False
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == IMAGE_UID
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    (container,) = pod["containers"]
    sc = container["securityContext"]
    assert sc["runAsNonRoot"] is True and sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False and sc["privileged"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(container["resources"][kind])
    assert all(mount["readOnly"] is True for mount in container["volumeMounts"])
    assert not any("hostPath" in v or "emptyDir" in v for v in pod["volumes"])


def test_deployment_spreads_probes_and_outlasts_the_drain() -> None:
    deployment = k8s("Deployment", "edge")
    pod = deployment["spec"]["template"]["spec"]
    anti = pod["affinity"]["podAntiAffinity"]
    terms = [t["podAffinityTerm"] for t in anti["preferredDuringSchedulingIgnoredDuringExecution"]]
    assert any(t["topologyKey"] == "kubernetes.io/hostname" for t in terms)
    (container,) = pod["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"federation": 5061, "metrics": 9464}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    config = edge_toml_in_configmap()
    assert config["metrics"]["address"].endswith(":9464")
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    drain = float(config["limits"]["drain_timeout_s"])
    assert pod["terminationGracePeriodSeconds"] > drain + float(pre_stop[1])
    assert container["args"] == ["run", "--config", "/etc/edge/config/edge.toml"]


def test_partners_are_one_configmap_of_single_file_partners(tmp_path: Path) -> None:
    """Adding a partner on Kubernetes is one `kubectl apply` of a ConfigMap, live."""
    from edge.core.policies import load_policies

    pod = k8s("Deployment", "edge")["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    (container,) = pod["containers"]
    policies = edge_toml_in_configmap()["listeners"][0]["policies"]
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"].startswith(policies)]
    # The whole directory, no subPath: only then does the kubelet's atomic
    # ..data swap reach the running gateway.
    assert mount["mountPath"] == policies and "subPath" not in mount
    configmap = k8s("ConfigMap", volumes[mount["name"]]["configMap"]["name"])
    data = configmap["data"]
    assert data and all(key.endswith(".toml") for key in data)
    # Loaded by the gateway's own loader, it is the repository's example partner.
    for key, text in data.items():
        (tmp_path / key).write_text(text)
    from_configmap = load_policies(tmp_path)
    assert from_configmap.problems == ()
    example = load_policies(REPO / "federation_policies").partners["fabrikam.com"]
    partner = from_configmap.partners["fabrikam.com"]
    for attribute in ("domains", "enabled", "max_connections", "revocation", "roots", "crls"):
        assert getattr(partner, attribute) == getattr(example, attribute), attribute
    identity = volumes["identity"]["secret"]
    assert identity["defaultMode"] == 0o440


def test_services_pdb_and_servicemonitor() -> None:
    federation = k8s("Service", "edge-federation")["spec"]
    assert federation["type"] == "LoadBalancer"
    assert [p["port"] for p in federation["ports"]] == [5061]
    metrics = k8s("Service", "edge-metrics")
    assert metrics["spec"]["type"] == "ClusterIP"
    assert [p["port"] for p in metrics["spec"]["ports"]] == [9464]
    pod_labels = k8s("Deployment", "edge")["spec"]["template"]["metadata"]["labels"]
    pdb = k8s("PodDisruptionBudget", "edge")["spec"]
    assert 1 <= pdb["minAvailable"] < 2
    assert pdb["selector"]["matchLabels"].items() <= pod_labels.items()
    monitor = k8s("ServiceMonitor", "edge")["spec"]
    assert monitor["selector"]["matchLabels"].items() <= metrics["metadata"]["labels"].items()
    assert [e["port"] for e in monitor["endpoints"]] == ["metrics"]


def test_networkpolicy_ingress_and_egress() -> None:
    policy = k8s("NetworkPolicy", "edge")["spec"]
    assert set(policy["policyTypes"]) == {"Ingress", "Egress"}
    by_port = {rule["ports"][0]["port"]: rule for rule in policy["ingress"]}
    assert set(by_port) == {5061, 9464}
    assert "from" not in by_port[5061]  # partners come from anywhere
    (source,) = by_port[9464]["from"]
    assert source == {
        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}
    }
    # Egress: exactly the pool members of edge.toml, on their ports.
    members = {
        (m["address"], m["port"])
        for pool in edge_toml_in_configmap()["pools"]
        for m in pool["members"]
    }
    allowed = set()
    for rule in policy["egress"]:
        assert rule.get("to"), "an egress rule without `to` allows everywhere"
        for peer in rule["to"]:
            assert set(peer) == {"ipBlock"} and "except" not in peer["ipBlock"]
            cidr = peer["ipBlock"]["cidr"]
            assert cidr.endswith("/32")
            allowed |= {(cidr.removesuffix("/32"), p["port"]) for p in rule["ports"]}
    assert allowed == members


# --- the example configuration and the image's command line --------------------------


def test_make_certs_writes_a_federation_that_edge_check_accepts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    make_certs = load_script(EXAMPLE / "make-certs.py")
    assert make_certs.main([str(tmp_path), "--member", "fe1.corp.example=127.0.0.1:15062"]) == 0
    config = tomllib.loads((tmp_path / "edge.toml").read_text())
    assert config["pools"][0]["members"] == [
        {"host": "fe1.corp.example", "address": "127.0.0.1", "port": 15062}
    ]
    assert config["listeners"][0]["address"] == "0.0.0.0:5061"  # untouched
    assert edge_main(["check", "--config", str(tmp_path / "edge.toml")]) == 0
    assert "ok: everything loads cleanly" in capsys.readouterr().out
    for key in [*tmp_path.glob("certs/*.key"), *tmp_path.glob("pool/*.key")]:
        assert key.stat().st_mode & 0o777 == 0o600
    # The committed template itself, unmodified, loads too.
    unchanged = make_certs.render_config((EXAMPLE / "edge.toml").read_text(), None, None, [])
    assert unchanged == (EXAMPLE / "edge.toml").read_text()


def image_command(config: Path) -> list[str]:
    """ENTRYPOINT + CMD of the Dockerfile, /etc/edge/edge.toml replaced by `config`."""
    _, runtime = stages()
    (entrypoint,) = args_of(runtime, "ENTRYPOINT")
    (cmd,) = args_of(runtime, "CMD")
    argv = [*json.loads(entrypoint), *json.loads(cmd)]
    argv = [str(config) if a == "/etc/edge/edge.toml" else a for a in argv]
    assert argv[0] == "edge"
    # The console script of this environment, else the same entry point via -m.
    script = Path(sys.executable).parent / "edge"
    head = [str(script)] if script.exists() else [sys.executable, "-m", "edge.cli"]
    return head + argv[1:]


def test_the_image_command_starts_answers_its_healthcheck_and_stops_on_sigterm(
    tmp_path: Path,
) -> None:
    metrics_port = free_port()
    make_certs = load_script(EXAMPLE / "make-certs.py")
    assert (
        make_certs.main(
            [
                str(tmp_path),
                "--listen",
                "127.0.0.1:0",
                "--metrics",
                f"127.0.0.1:{metrics_port}",
                "--member",
                f"fe1.corp.example=127.0.0.1:{free_port()}",
            ]
        )
        == 0
    )
    config = tmp_path / "edge.toml"
    command = image_command(config)
    env = dict(os.environ, PYTHONUNBUFFERED="1", EDGE_CONFIG=str(config))
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=tmp_path
    )
    try:
        assert process.stdout is not None
        started = None
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            line = process.stdout.readline()
            if not line:
                break
            event = json.loads(line)
            if event["event"] in ("gateway_started", "startup_failed"):
                started = event
                break
        assert started is not None and started["event"] == "gateway_started", (
            f"{shlex.join(command)}: {started} {process.stderr.read() if process.stderr else ''}"
        )
        assert started["listeners"]["metrics"] == [f"127.0.0.1:{metrics_port}"]
        url = f"http://127.0.0.1:{metrics_port}/healthz"
        with urllib.request.urlopen(url, timeout=5) as response:
            assert response.status == 200
        # The image's HEALTHCHECK script, finding the port through $EDGE_CONFIG.
        check = subprocess.run(
            [sys.executable, str(DEPLOY / "image" / "healthcheck.py")],
            env=env,
            capture_output=True,
            text=True,
            timeout=10,
        )
        assert check.returncode == 0, check.stdout + check.stderr
        assert check.stdout.startswith(f"healthy: {url}")
        process.send_signal(signal.SIGTERM)
        rest, _ = process.communicate(timeout=15)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 0
    events = [json.loads(line)["event"] for line in rest.splitlines() if line.strip()]
    assert "shutdown_started" in events and events[-1] == "gateway_stopped"
    # And with the gateway gone, the health check says so.
    down = subprocess.run(
        [sys.executable, str(DEPLOY / "image" / "healthcheck.py")],
        env=env,
        capture_output=True,
        text=True,
        timeout=10,
    )
    assert down.returncode == 1 and down.stdout.startswith("unhealthy:")


def test_the_kubernetes_edge_toml_loads(tmp_path: Path) -> None:
    """The ConfigMap's edge.toml, with its mount points moved into tmp_path,
    passes the gateway's own loader (no unknown key, no wrong type)."""
    make_certs = load_script(EXAMPLE / "make-certs.py")
    assert make_certs.main([str(tmp_path)]) == 0
    text = k8s("ConfigMap", "edge-config")["data"]["edge.toml"]
    text = text.replace("/etc/edge/certs/", f"{tmp_path}/certs/")
    text = text.replace("/etc/edge/federation_policies", f"{tmp_path}/federation_policies")
    assert not [line for line in text.splitlines() if "/etc/edge" in line.split("#")[0]]
    config = tmp_path / "k8s-edge.toml"
    config.write_text(text)
    assert edge_main(["check", "--config", str(config)]) == 0
