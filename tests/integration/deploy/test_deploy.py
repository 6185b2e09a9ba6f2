"""The deployment files: one lock for every install, a clean Dockerfile, the seccomp profile, and Compose and
Kubernetes files that validate and agree with what bot/config.py derives (deploy/README.md, "Sizing").

No container engine runs here: these check the files, not a running container (deploy/README.md says what
was never tried on a real engine).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from bot.app import shutdown
from bot.config import HttpConfig, PoolConfig, load_settings
from tests.support import paths

ROOT = paths.ROOT
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
DATA = paths.TESTS / "deploy_data"
BIN = Path(sys.executable).parent

# deploy/README.md, "Sizing": the daemon's own memory on top of its CLI processes (its RSS is ~95 MiB
# after start-up; the rest is room for the Python heap, the gateway's buffers and the store client).
DAEMON_OVERHEAD_MB = 256
# What a pod or container gets on top of the daemon's shutdown budget: signal delivery and process exit.
RUNTIME_SLACK_S = 5
# The oldest Kubernetes the manifests are for: the first with securityContext.appArmorProfile.
OLDEST_KUBERNETES = "1.30"
NEWUSER, NEWPID, NEWNS = 0x10000000, 0x20000000, 0x00020000  # CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNS
# Exactly what deploy/seccomp-agentd.json adds to Docker's default profile: (syscalls, argument filters).
SECCOMP_ADDITIONS = [
    (["clone"], [{"index": 0, "value": NEWUSER, "valueTwo": NEWUSER, "op": "SCMP_CMP_MASKED_EQ"}]),
    (["clone"], [{"index": 1, "value": NEWUSER, "valueTwo": NEWUSER, "op": "SCMP_CMP_MASKED_EQ"}]),  # s390
    (["unshare"], [{"index": 0, "value": NEWUSER, "valueTwo": NEWUSER, "op": "SCMP_CMP_MASKED_EQ"}]),
    (["unshare"], [{"index": 0, "value": NEWPID | NEWNS, "valueTwo": 0, "op": "SCMP_CMP_EQ"}]),  # apply-seccomp
    (["mount", "umount2", "pivot_root"], []),
]
# The namespace flags Claude Code's CLI (2.1.x) gives bubblewrap, seen on its command line; run as the image's user.
SANDBOX = [
    *["bwrap", "--new-session", "--die-with-parent", "--unshare-net", "--ro-bind", "/", "/", "--dev", "/dev"],
    *["--unshare-pid", "--unshare-user", "--cap-drop", "ALL", "--cap-add", "CAP_SETFCAP", "--proc", "/proc"],
    *["--tmpfs", "/tmp", "--", "/bin/true"],
]
AS_IMAGE_USER = ["setpriv", "--reuid=10001", "--regid=10001", "--clear-groups", "--inh-caps=-all"]
AS_IMAGE_USER += ["--bounding-set=-all"]
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)", re.M)


def memory_request_mb(pool: PoolConfig) -> int:
    """What the pool aims to stay under: its budget for the CLI processes, plus the daemon."""
    return pool.memory_budget_mb + DAEMON_OVERHEAD_MB


def memory_limit_mb(pool: PoolConfig) -> int:
    """Room for one turn that grows to the hard ceiling before the pool kills it."""
    return memory_request_mb(pool) + pool.hard_ceiling_mb


def grace_s(http: HttpConfig) -> int:
    return int(shutdown.shutdown_budget_s(http)) + RUNTIME_SLACK_S


def pins(lock: Path) -> dict[str, str]:
    return {name.lower(): version for name, version in PIN.findall(lock.read_text())}


def requirement_names(requirements: list[str]) -> set[str]:
    return {re.split(r"[<>=!~\[; ]", requirement, maxsplit=1)[0].lower() for requirement in requirements}


def yaml_documents(path: Path) -> list[dict[str, Any]]:
    return [document for document in yaml.safe_load_all(path.read_text()) if document]


def k8s_resource(kind: str, name: str) -> dict[str, Any]:
    for path in K8S.glob("*.yaml"):
        for document in yaml_documents(path):
            if document.get("kind") == kind and document["metadata"]["name"] == name:
                return document
    raise AssertionError(f"no {kind} {name} in {K8S}")


def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    return loaded


def mebibytes(quantity: str) -> int:
    """A memory quantity as Compose (``10496m``) or Kubernetes (``10496Mi``, ``10Gi``) writes it."""
    number, unit = re.fullmatch(r"(\d+)([A-Za-z]*)", quantity).groups()  # type: ignore[union-attr]
    return int(number) * {"m": 1, "Mi": 1, "g": 1024, "Gi": 1024}[unit]


# The lock


def test_locks_pin_every_dependency_with_hashes_and_the_sdk_exactly() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    runtime, test = pins(DEPLOY / "requirements.lock"), pins(DEPLOY / "requirements-test.lock")
    assert requirement_names(project["dependencies"]) <= runtime.keys()
    assert requirement_names(project["optional-dependencies"]["test"]) <= test.keys()
    assert {name: test[name] for name in runtime} == runtime, "the test lock must pin the runtime the same way"
    assert re.fullmatch(r"\d+\.\d+\.\d+", runtime["claude-agent-sdk"])
    for lock in ("requirements.lock", "requirements-test.lock"):
        entries = re.findall(r"^[A-Za-z0-9][^\n\\]*(?:\\\n[^\n\\]*)*", (DEPLOY / lock).read_text(), re.M)
        assert len(entries) == len(pins(DEPLOY / lock))
        assert all("\\\n    --hash=sha256:" in entry for entry in entries)


def test_dockerfile_and_the_readme_install_path_use_the_same_lock() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "COPY deploy/requirements.lock deploy/pip-with-ca ./" in dockerfile
    assert "sh pip-with-ca install --no-cache-dir --require-hashes -r requirements.lock" in dockerfile
    assert "sh pip-with-ca install --no-cache-dir --no-deps ." in dockerfile
    assert "!deploy/requirements.lock" in (ROOT / ".dockerignore").read_text().splitlines()
    bootstrap = (DEPLOY / "bootstrap.sh").read_text()
    assert 'pip install -q --disable-pip-version-check --require-hashes -r "$lock"' in bootstrap
    assert "pip install -q --disable-pip-version-check --no-deps -e ." in bootstrap
    assert "ensure_venv deploy/requirements.lock\n" in (DEPLOY / "run-local").read_text()
    assert "ensure_venv deploy/requirements-test.lock\n" in (ROOT / "tests" / "run").read_text()


FAKE_PYTHON = """#!/bin/sh
# Stands in for the venv's Python: pip calls are logged, not run; the version is a real one.
case "$1" in -m) echo "$*" >>"$(dirname "$0")/../pip.log" ;; *) exec python3 "$@" ;; esac
"""


def run_ensure_venv(project: Path) -> list[str]:
    """Source deploy/bootstrap.sh in ``project`` and run ensure_venv; the pip calls it made."""
    log = project / ".venv" / "pip.log"
    log.unlink(missing_ok=True)
    script = f"source {DEPLOY / 'bootstrap.sh'} && ensure_venv deploy/requirements.lock"
    subprocess.run(["bash", "-c", script], cwd=project, check=True, timeout=60)
    return log.read_text().splitlines() if log.exists() else []


def test_run_local_installs_only_when_the_lock_or_pyproject_changed(tmp_path: Path) -> None:
    (tmp_path / "deploy").mkdir()
    (tmp_path / "deploy" / "requirements.lock").write_text("six==1.0 --hash=sha256:00\n")
    (tmp_path / "pyproject.toml").write_text("[project]\nname = 'x'\n")
    python = tmp_path / ".venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text(FAKE_PYTHON)
    python.chmod(0o755)
    assert len(run_ensure_venv(tmp_path)) == 3  # pip, the lock, agentd itself
    assert run_ensure_venv(tmp_path) == []
    (tmp_path / "deploy" / "requirements.lock").write_text("six==1.1 --hash=sha256:01\n")
    assert len(run_ensure_venv(tmp_path)) == 3
    assert run_ensure_venv(tmp_path) == []
    (tmp_path / "pyproject.toml").write_text("[project]\nname = 'y'\n")
    assert len(run_ensure_venv(tmp_path)) == 3


def stale_copy(tmp_path: Path) -> Path:
    """A copy of the project whose lock pins the SDK outside pyproject.toml's range."""
    (tmp_path / "deploy").mkdir()
    for name in ("pyproject.toml", "deploy/lock", "deploy/requirements.lock", "deploy/requirements-test.lock"):
        shutil.copy(ROOT / name, tmp_path / name)
    lock = tmp_path / "deploy" / "requirements.lock"
    lock.write_text(re.sub(r"^claude-agent-sdk==\S+", "claude-agent-sdk==0.1.0", lock.read_text(), flags=re.M))
    return tmp_path


def test_lock_check_names_the_command_that_fixes_a_stale_lock(tmp_path: Path) -> None:
    project = stale_copy(tmp_path)
    env = {**os.environ, "UV": str(BIN / "uv")}
    checked = subprocess.run(
        ["bash", "deploy/lock", "--check"], cwd=project, env=env, capture_output=True, text=True, timeout=100
    )
    assert checked.returncode == 1
    assert "deploy/requirements.lock is not current with pyproject.toml: run 'bash deploy/lock'" in checked.stderr
    wrong = subprocess.run(["bash", "deploy/lock", "--bogus"], cwd=project, env=env, capture_output=True, text=True)
    assert wrong.returncode == 2
    assert "usage: bash deploy/lock [--check|--upgrade]" in wrong.stderr


# The Dockerfile


def test_dockerfile_is_hadolint_clean() -> None:
    linted = subprocess.run([BIN / "hadolint", "Dockerfile"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert linted.returncode == 0, linted.stdout + linted.stderr


def test_dockerfile_pins_its_base_runs_unprivileged_and_bakes_in_no_secret() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11\.\d+-slim-bookworm@sha256:[0-9a-f]{64}$", dockerfile, re.M)
    assert re.search(r"^USER 10001:10001$", dockerfile, re.M)
    assert re.search(r"^HEALTHCHECK .*\n.*/healthz", dockerfile, re.M)
    assert 'ENTRYPOINT ["tini", "--", "agentd"]' in dockerfile
    assigned = re.findall(r"^(?:ENV|ARG)\s+(.*(?:\\\n.*)*)", dockerfile, re.M)
    assert assigned
    for names in assigned:
        assert not re.search(r"KEY|TOKEN|SECRET|PASSWORD", names, re.I), names


# Seccomp


def test_seccomp_profile_is_dockers_default_plus_user_namespaces_only() -> None:
    default = json.loads((DATA / "docker-seccomp-default.json").read_text())
    agentd = json.loads((DEPLOY / "seccomp-agentd.json").read_text())
    assert {key: value for key, value in agentd.items() if key != "syscalls"} == {
        key: value for key, value in default.items() if key != "syscalls"
    }
    kept, added = agentd["syscalls"][: len(default["syscalls"])], agentd["syscalls"][len(default["syscalls"]) :]
    assert kept == default["syscalls"]
    assert [(rule["names"], rule.get("args", [])) for rule in added] == SECCOMP_ADDITIONS
    assert all(rule["action"] == "SCMP_ACT_ALLOW" and rule["comment"].startswith("agentd: ") for rule in added)
    assert all("caps" not in rule.get("includes", {}) for rule in added), "no rule may depend on a capability"


def sandbox_under(profile: Path) -> subprocess.CompletedProcess[str]:
    """bubblewrap under PROFILE, loaded by libseccomp through Debian's python3-seccomp (support/seccomp_run.py)."""
    user = AS_IMAGE_USER if os.geteuid() == 0 else []
    loader = ["/usr/bin/python3", str(paths.SUPPORT / "seccomp_run.py")]
    return subprocess.run(
        [*user, *loader, *SANDBOX], input=profile.read_text(), capture_output=True, text=True, timeout=30
    )


def test_bubblewrap_needs_the_agentd_profile_and_runs_under_it() -> None:
    refused = sandbox_under(DATA / "docker-seccomp-default.json")
    assert refused.returncode == 1
    assert "bwrap: No permissions to create new namespace" in refused.stderr
    started = sandbox_under(DEPLOY / "seccomp-agentd.json")
    assert started.returncode == 0, started.stderr


def test_every_syscall_the_profile_adds_is_needed(tmp_path: Path) -> None:
    profile = json.loads((DEPLOY / "seccomp-agentd.json").read_text())
    added = len(profile["syscalls"]) - len(json.loads((DATA / "docker-seccomp-default.json").read_text())["syscalls"])
    for rule in profile["syscalls"][-added:]:
        if "s390" in rule.get("includes", {}).get("arches", []):
            continue  # the same clone rule for s390's argument order
        if "apply-seccomp" in rule["comment"]:
            continue  # a step of Claude Code's own, after bubblewrap: test_container.py shows it is needed
        for name in list(rule["names"]):
            rule["names"].remove(name)
            without = tmp_path / f"without-{name}.json"
            without.write_text(json.dumps(profile))
            rule["names"].append(name)
            ran = sandbox_under(without)
            assert ran.returncode == 1 and "bwrap: " in ran.stderr, f"bubblewrap starts without {name}"


def test_no_deployment_file_turns_seccomp_off() -> None:
    for path in [DEPLOY / "compose.yaml", *K8S.glob("*.yaml")]:
        assert not re.search(r"seccomp[=:]\s*unconfined|seccompProfile: \{type: Unconfined", path.read_text()), path
    assert "seccomp=./seccomp-agentd.json" in compose()["services"]["agentd"]["security_opt"]
    profile = k8s_resource("StatefulSet", "agentd")["spec"]["template"]["spec"]["securityContext"]["seccompProfile"]
    assert profile == {"type": "Localhost", "localhostProfile": "agentd/seccomp-agentd.json"}


# Compose


def test_compose_file_follows_the_compose_specification() -> None:
    schema = json.loads((DATA / "compose-spec.json").read_text())
    validator = jsonschema.Draft7Validator(schema)  # its $schema names draft 7 without the "#"
    errors = [f"{list(error.absolute_path)}: {error.message}" for error in validator.iter_errors(compose())]
    assert errors == []


def test_compose_schema_check_refuses_a_broken_file() -> None:
    schema = json.loads((DATA / "compose-spec.json").read_text())
    broken = compose()
    broken["services"]["agentd"]["depends_on"]["redis"]["condition"] = "service_ready"
    broken["services"]["redis"]["helthcheck"] = {}
    validator = jsonschema.Draft7Validator(schema)  # its $schema names draft 7 without the "#"
    assert len(list(validator.iter_errors(broken))) == 2


def test_compose_runs_a_durable_redis_that_agentd_waits_for() -> None:
    services = compose()["services"]
    redis = services["redis"]
    assert re.fullmatch(r"redis:7\.\d+-\w+", redis["image"])
    command = " ".join(redis["command"])
    assert "--appendonly yes" in command
    assert "--maxmemory-policy noeviction" in command
    assert redis["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]
    agentd = services["agentd"]
    assert "/healthz" in " ".join(agentd["healthcheck"]["test"])
    assert agentd["depends_on"] == {"redis": {"condition": "service_healthy"}}
    assert agentd["environment"]["REDIS_URL"] == "redis://redis:6379/0"
    assert agentd["env_file"] == ["agentd.env"]
    assert "./agentd.toml:/etc/agentd/agentd.toml:ro" in agentd["volumes"]


def test_env_example_holds_placeholders_only() -> None:
    assigned = re.findall(r"^\s*#?\s*([A-Z_]+)=(.*)$", (DEPLOY / "agentd.env.example").read_text(), re.M)
    assert {"ANTHROPIC_API_KEY", "AGENTD_API_TOKEN"} <= {name for name, _ in assigned}
    assert all("REPLACE-ME" in value for _, value in assigned), assigned


def test_compose_sizing_follows_the_default_config() -> None:
    settings = load_settings(DEPLOY / "agentd.example.toml", {})
    agentd = compose()["services"]["agentd"]
    assert agentd["stop_grace_period"] == f"{grace_s(settings.http)}s"
    assert mebibytes(agentd["mem_reservation"]) == memory_request_mb(settings.pool)
    assert mebibytes(agentd["mem_limit"]) == memory_limit_mb(settings.pool)


# Kubernetes


def k8s_files() -> list[Path]:
    return sorted(path for path in K8S.glob("*.yaml") if path.name != "kustomization.yaml")


@pytest.mark.parametrize("version", [OLDEST_KUBERNETES, kubernetes_validate.utils.latest_version()])
def test_kubernetes_manifests_validate(version: str) -> None:
    for path in k8s_files():
        for document in yaml_documents(path):
            kubernetes_validate.validate(document, version, strict=True)


def test_kubernetes_validation_refuses_a_broken_manifest() -> None:
    statefulset = k8s_resource("StatefulSet", "agentd")
    statefulset["spec"]["template"]["spec"]["terminationGracePeriod"] = 45
    with pytest.raises(kubernetes_validate.ValidationError, match="terminationGracePeriod"):
        kubernetes_validate.validate(statefulset, OLDEST_KUBERNETES, strict=True)


def test_kustomization_lists_every_manifest_but_the_secret_example() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert sorted(kustomization["resources"]) == sorted(
        path.name for path in k8s_files() if path.name != "secret.example.yaml"
    )


def test_kubernetes_sizing_follows_the_configmap() -> None:
    config = tomllib.loads(k8s_resource("ConfigMap", "agentd-config")["data"]["agentd.toml"])
    pool, http = PoolConfig(**config["pool"]), HttpConfig(**config["http"])
    pod = k8s_resource("StatefulSet", "agentd")["spec"]["template"]["spec"]
    resources = pod["containers"][0]["resources"]
    assert pod["terminationGracePeriodSeconds"] == grace_s(http)
    assert mebibytes(resources["requests"]["memory"]) == memory_request_mb(pool)
    assert mebibytes(resources["limits"]["memory"]) == memory_limit_mb(pool)


def test_configmap_is_a_valid_agentd_config(tmp_path: Path) -> None:
    config = tmp_path / "agentd.toml"
    config.write_text(k8s_resource("ConfigMap", "agentd-config")["data"]["agentd.toml"])
    load_settings(config, {})


def test_kubernetes_probes_and_redis_durability() -> None:
    container = k8s_resource("StatefulSet", "agentd")["spec"]["template"]["spec"]["containers"][0]
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    redis = k8s_resource("StatefulSet", "agentd-redis")
    args = " ".join(redis["spec"]["template"]["spec"]["containers"][0]["args"])
    assert "--appendonly yes" in args
    assert "--maxmemory-policy noeviction" in args
    assert redis["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "data"
    assert k8s_resource("PodDisruptionBudget", "agentd")["spec"]["minAvailable"] == 1
    assert k8s_resource("Service", "agentd")["spec"]["ports"][0]["targetPort"] == "http"


def test_network_policy_opens_only_the_ports_agentd_uses() -> None:
    policy = k8s_resource("NetworkPolicy", "agentd")["spec"]
    assert policy["policyTypes"] == ["Ingress", "Egress"]
    assert [port for rule in policy["ingress"] for port in rule["ports"]] == [{"port": "http", "protocol": "TCP"}]
    egress = {(port["port"], port["protocol"]) for rule in policy["egress"] for port in rule["ports"]}
    # DNS; Redis; the model API or proxy and Slack; IMAP; SMTP.
    assert egress == {(53, "UDP"), (53, "TCP"), (6379, "TCP"), (443, "TCP"), (993, "TCP"), (465, "TCP"), (587, "TCP")}
    public = policy["egress"][-1]["to"][0]["ipBlock"]
    assert public["cidr"] == "0.0.0.0/0"
    assert "169.254.0.0/16" in public["except"], "the cloud metadata service stays out of reach"
