"""How the test kubelet maps a pod's container to podman's flags (tests/testbed/containers.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client as k8s

from tests.testbed.containers import ConfigError, limit_args, mount_args, podman_args, run_as, security_args

API = k8s.ApiClient()


def pod(container: dict[str, Any], **spec: Any) -> tuple[k8s.V1Pod, k8s.V1Container]:
    body = {"metadata": {"name": "p", "namespace": "ns", "uid": "u-1"}, "spec": {"containers": [container], **spec}}
    parsed = API._ApiClient__deserialize(body, "V1Pod")  # the client's own conversion from API JSON
    return parsed, parsed.spec.containers[0]


def test_container_security_context_wins_over_the_pods() -> None:
    p, c = pod(
        {"name": "c", "image": "i", "securityContext": {"runAsUser": 7, "runAsGroup": 8}},
        securityContext={"runAsUser": 5, "runAsGroup": 6, "fsGroup": 9, "supplementalGroups": [3]},
    )
    assert run_as(p, c, "1000:1000") == ("7:8", ["3", "9"])


def test_run_as_user_keeps_the_images_user_when_the_pod_names_none() -> None:
    p, c = pod({"name": "c", "image": "i"}, securityContext={"runAsGroup": 0})
    assert run_as(p, c, "1000:1000") == ("1000:0", [])
    assert run_as(*pod({"name": "c", "image": "i"}), "") == ("0", [])


@pytest.mark.parametrize(
    ("context", "image_user", "message"),
    [
        ({"runAsNonRoot": True}, "", "image will run as root"),
        ({"runAsNonRoot": True}, "0:0", "image will run as root"),
        ({"runAsNonRoot": True}, "kubetune", "non-numeric user (kubetune)"),
        ({"runAsNonRoot": True, "runAsUser": 0}, "1000", "runAsUser breaks non-root policy"),
    ],
)
def test_run_as_non_root_is_checked_as_a_kubelet_does(context: dict[str, Any], image_user: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        run_as(*pod({"name": "c", "image": "i"}, securityContext=context), image_user)
    allowed = {**context, "runAsUser": 1000}
    assert run_as(*pod({"name": "c", "image": "i"}, securityContext=allowed), image_user)[0] == "1000"


def test_restricted_security_context_becomes_podman_flags() -> None:
    restricted = {
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"], "add": ["NET_BIND_SERVICE"]},
        "readOnlyRootFilesystem": True,
    }
    args = security_args(*pod({"name": "c", "image": "i", "securityContext": restricted}))
    assert args == [
        "--read-only",
        "--read-only-tmpfs=false",
        "--cap-drop=all",
        "--cap-add=net_bind_service",
        "--security-opt",
        "no-new-privileges",
    ]
    unconfined = pod({"name": "c", "image": "i"}, securityContext={"seccompProfile": {"type": "Unconfined"}})
    assert security_args(*unconfined) == ["--security-opt", "seccomp=unconfined"]
    assert security_args(*pod({"name": "c", "image": "i"})) == []


def test_limits_become_cgroup_limits_without_extra_swap() -> None:
    limited = pod({"name": "c", "image": "i", "resources": {"limits": {"memory": "1Gi", "cpu": "500m"}}})
    assert limit_args(limited[1]) == ["--memory=1073741824b", "--memory-swap=1073741824b", "--cpus=0.5"]
    assert limit_args(pod({"name": "c", "image": "i", "resources": {"requests": {"memory": "1Gi"}}})[1]) == []


def test_mounts_bind_host_directories_and_memory_empty_dirs_are_tmpfs(tmp_path: Path) -> None:
    container = {
        "name": "c",
        "image": "i",
        "volumeMounts": [
            {"name": "data", "mountPath": "/data", "readOnly": True},
            {"name": "scratch", "mountPath": "/tmp", "subPath": "sub"},
            {"name": "shm", "mountPath": "/dev/shm"},
        ],
    }
    volumes = [
        {"name": "data", "configMap": {"name": "x"}},
        {"name": "scratch", "emptyDir": {}},
        {"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": "64Mi"}},
    ]
    p, c = pod(container, volumes=volumes)
    hosts = {"data": tmp_path / "data", "scratch": tmp_path / "scratch", "shm": tmp_path / "shm"}
    assert mount_args(p, c, hosts) == [
        "--volume",
        f"{tmp_path / 'data'}:/data:ro",
        "--volume",
        f"{tmp_path / 'scratch' / 'sub'}:/tmp:rw",
        "--mount",
        f"type=tmpfs,destination=/dev/shm,tmpfs-mode=1777,tmpfs-size={64 * 1024**2}",
    ]


def test_command_replaces_the_entrypoint_and_args_follow_the_image(tmp_path: Path) -> None:
    message = tmp_path / "message"
    common = {"env": {"N": "3"}, "volumes": {}, "message_path": message, "image_user": "1000"}
    p, c = pod({"name": "c", "image": "img:1", "command": ["python", "-c"], "args": ["print($(N))"]})
    args = podman_args(p, c, **common)
    assert args[args.index("--entrypoint") + 1] == json.dumps(["python", "-c"])
    assert args[-2:] == ["img:1", "print(3)"]
    assert f"{message}:/dev/termination-log:rw" in args and args[args.index("--env") :][:2] == ["--env", "N=3"]
    p, c = pod({"name": "c", "image": "img:1", "args": ["--flag"]})
    args = podman_args(p, c, **common)
    assert "--entrypoint" not in args and args[-2:] == ["img:1", "--flag"]
    assert args[:4] == ["--network", "host", "--label", "kubetune.testbed.pod=u-1"]
