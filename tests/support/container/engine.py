"""Podman with runc, as ``../shared/notes/containers.md`` found it works on the test machines.

The image is the repo's own Dockerfile, with only its base replaced (``--from``) by a local Debian
bookworm with Python (``tests/support/container/base.sh``: Docker Hub cannot be reached here).  Every other
step runs as written.  Podman keeps the base and the layers in its storage, so a second build reuses
them.  The run options are read from ``deploy/README.md`` (between its ``container-run`` markers): the
test runs the container exactly as the documentation says.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shlex
import shutil
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import yaml

from tests.support import paths

ROOT = paths.ROOT
PODMAN = ("podman", "--runtime", "/usr/sbin/runc")
# The machine has no CAP_SYS_RESOURCE: podman's own default limits (above the current ones) are refused.
ULIMITS = ("--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1000:1000")
IMAGE = "localhost/agentd-test:latest"
COMPOSE_IMAGE = "localhost/agentd:local"  # deploy/compose.yaml's `image:` (its build step is this image)
REDIS_IMAGE = "docker.io/library/redis:7.4-bookworm"
CONTAINERS_CONF = ROOT / "tests/support/container/containers.conf"
# The same limits for what takes no --ulimit (kube play), and for podman-compose's own podman calls.
PODMAN_ENV = {**os.environ, "CONTAINERS_CONF": str(CONTAINERS_CONF)}
HOST_CA = Path("/etc/ssl/certs/ca-certificates.crt")
_RUN_BLOCK = re.compile(r"<!-- container-run -->\s*```sh\n(.*?)```", re.DOTALL)


class EngineError(RuntimeError):
    pass


def podman(*args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [*PODMAN, *args], capture_output=True, text=True, timeout=timeout, check=False, cwd=ROOT, env=PODMAN_ENV
    )
    if check and done.returncode != 0:
        raise EngineError(f"podman {' '.join(args[:3])}: exit {done.returncode}\n{done.stderr[-3000:]}")
    return done


def missing_tools() -> list[str]:
    tools = ("podman", "/usr/sbin/runc", "debootstrap", "podman-compose")
    return [tool for tool in tools if shutil.which(tool) is None]


def base_image() -> str:
    done = subprocess.run(
        ["bash", str(ROOT / "tests/support/container/base.sh")],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    if done.returncode != 0:
        raise EngineError(f"base image: {done.stderr[-3000:]}")
    return done.stdout.strip().splitlines()[-1]


def build_image(base: str) -> float:
    """Build the repo's Dockerfile on ``base``; the seconds it took."""
    started = time.monotonic()
    podman(
        "build",
        "--from",
        base,
        "--format",
        "docker",  # keeps HEALTHCHECK (the OCI format has no field for it)
        *ULIMITS,
        "--network",
        "host",
        # The package index is reached through a TLS-intercepting proxy whose CA only the host trusts.
        "--secret",
        f"id=extra_ca,src={HOST_CA}",
        "-t",
        IMAGE,
        str(ROOT),
        timeout=1200,
    )
    return time.monotonic() - started


def redis_image(base: str) -> None:
    """The Compose file's Redis image: the real one if podman has it, else a stand-in built on ``base``."""
    if podman("image", "exists", REDIS_IMAGE, check=False).returncode == 0:
        return
    containerfile = ROOT / "tests/support/container/redis.Containerfile"
    podman(
        "build",
        *ULIMITS,
        "--network",
        "host",
        "--build-arg",
        f"BASE={base}",
        "-f",
        str(containerfile),
        "-t",
        REDIS_IMAGE,
        str(containerfile.parent),
        timeout=600,
    )


def compose(project_dir: Path, *args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    """podman-compose on ``project_dir/compose.yaml``, as project ``agentd-test``."""
    done = subprocess.run(
        ["podman-compose", "-p", "agentd-test", "-f", str(project_dir / "compose.yaml"), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        cwd=project_dir,
        env=PODMAN_ENV,
    )
    if done.returncode != 0:
        raise EngineError(
            f"podman-compose {' '.join(args)}: exit {done.returncode}\n{done.stdout[-3000:]}{done.stderr[-3000:]}"
        )
    return done


def documented_run_options() -> list[str]:
    """The options of the ``podman run`` documented in deploy/README.md, minus image, env and volumes."""
    found = _RUN_BLOCK.search((ROOT / "deploy/README.md").read_text())
    if found is None:
        raise EngineError("deploy/README.md has no <!-- container-run --> block")
    words = shlex.split(found.group(1).replace("\\\n", " "))
    options: list[str] = []
    skip_value = {"-e", "--env", "-v", "--volume", "-p", "--publish", "--name"}
    index = words.index("run") + 1
    while index < len(words) and words[index].startswith("-"):
        word = words[index]
        takes_value = "=" not in word and word not in {"--read-only", "--rm", "-d", "--detach"}
        if word not in skip_value:
            options.append(word)
            if takes_value:
                options.append(words[index + 1])
        index += 2 if takes_value else 1
    return options


@dataclass
class Container:
    name: str
    volume: str
    config: Path
    env: dict[str, str]
    options: Sequence[str]
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def run(self) -> None:
        env_args = [arg for key, value in self.env.items() for arg in ("-e", f"{key}={value}")]
        podman(
            "run",
            "--detach",
            "--name",
            self.name,
            *ULIMITS,
            "--network",
            "host",  # the fake model listens on the host's loopback
            *self.options,
            *env_args,
            "-v",
            f"{self.config}:/etc/agentd/agentd.toml:ro",
            "-v",
            f"{self.volume}:/var/lib/agentd",
            IMAGE,
        )

    def stop(self, grace_s: int) -> tuple[int, float]:
        """``podman stop`` (SIGTERM, then SIGKILL after ``grace_s``): the exit code and the seconds taken."""
        started = time.monotonic()
        podman("stop", "--time", str(grace_s), self.name, timeout=grace_s + 30)
        taken = time.monotonic() - started
        state = json.loads(podman("inspect", self.name).stdout)[0]["State"]
        return int(state["ExitCode"]), taken

    def remove(self) -> None:
        podman("rm", "--force", "--time", "0", self.name, check=False)

    def logs(self) -> str:
        done = podman("logs", self.name, check=False)
        return (done.stdout + done.stderr)[-4000:]

    def daemon_rss_bytes(self) -> int:
        """The daemon's RSS, read from the host: PID 1 in the container is tini, agentd is its child."""
        tini = psutil.Process(int(json.loads(podman("inspect", self.name).stdout)[0]["State"]["Pid"]))
        daemon = next(p for p in tini.children() if "run" in p.cmdline())
        return int(daemon.memory_info().rss)


def image_size_bytes() -> int:
    return int(json.loads(podman("image", "inspect", IMAGE).stdout)[0]["Size"])


def remove_volume(name: str) -> None:
    podman("volume", "rm", "--force", name, check=False)


def kube_pod(statefulset: dict[str, Any], configmap: dict[str, Any], env: dict[str, str], name: str) -> str:
    """deploy/k8s's StatefulSet as the Pod ``podman kube play`` (4.3) can run, and its ConfigMap.

    What is changed, and why (each is a field podman cannot run as Kubernetes does):
    - the StatefulSet becomes a Pod of its template (kube play runs Pods and Deployments, not StatefulSets),
      and its volumeClaimTemplate a claim (podman makes a named volume of it);
    - ``envFrom: secretRef`` becomes plain env values: podman 4.3 cannot read a kube Secret it made
      ("secret ... is not valid JSON");
    - the image is the test's build.
    Everything else is played as written: hostUsers false, the pod and container securityContext (seccomp
    profile, user, capabilities, procMount), the config volume, the ports and the memory limit.
    """
    spec = copy.deepcopy(statefulset["spec"]["template"]["spec"])
    container = spec["containers"][0]
    container["image"] = COMPOSE_IMAGE.replace(":local", ":0.1.0")
    container.pop("envFrom")
    container["env"] = [e for e in container["env"] if e["name"] != "REDIS_URL"]
    container["env"] += [{"name": key, "value": value} for key, value in env.items()]
    spec["volumes"].append({"name": "data", "persistentVolumeClaim": {"claimName": f"{name}-data"}})
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name}, "spec": spec}
    return yaml.safe_dump_all([configmap, pod])


def kube_play(manifest: Path, seccomp_root: Path) -> None:
    # hostUsers: false is run as --userns=auto, whose default size (1024) does not map the image's uid 10001.
    podman("kube", "play", "--userns", "auto:size=65536", "--seccomp-profile-root", str(seccomp_root), str(manifest))


def kube_down(manifest: Path, name: str) -> None:
    """Remove the pod, its claim's volume and the volumes podman made of the manifest's ConfigMaps.

    ``kube down`` leaves those volumes; a ConfigMap's would be reused, stale, by the next play.
    """
    podman("kube", "down", str(manifest), check=False)
    configmaps = [d["metadata"]["name"] for d in yaml.safe_load_all(manifest.read_text()) if d["kind"] == "ConfigMap"]
    for volume in (f"{name}-data", *configmaps):
        podman("volume", "rm", "--force", volume, check=False)


def pod_ip(name: str) -> str:
    infra = podman("pod", "inspect", name, "--format", "{{.InfraContainerID}}").stdout.strip()
    networks = json.loads(podman("inspect", infra).stdout)[0]["NetworkSettings"]["Networks"]
    return str(next(iter(networks.values()))["IPAddress"])


def read_only_root(container: str) -> bool:
    return bool(json.loads(podman("inspect", container).stdout)[0]["HostConfig"]["ReadonlyRootfs"])
