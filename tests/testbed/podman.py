"""The project's two images, built with podman, and the runtime calls the test kubelet makes on them.

Build (``make images``, or ``python -m tests.testbed.podman build``): no base image can be pulled
here, so the Dockerfile's ``FROM`` (the pinned official Python image) is stood in for by a local
image of the same name, made from Debian packages (``mmdebstrap``: python3.11 with a venv at
/usr/local, so ``python`` and ``pip`` are where the official image has them). Then both Dockerfile
targets are built unchanged. Each built image is tagged with a digest of its inputs (the Dockerfile,
.dockerignore and the files it copies), so an unchanged tree is never rebuilt, and ``:dev`` names the
newest build. The package registries are reached through a TLS-inspecting proxy whose CA is in the
host's bundle only: the bundle is mounted read-only into the build steps, never copied into a layer.

Runtime: :func:`create`, :func:`start`, :func:`kill`, :func:`oom_killed`, :func:`remove`. A container
is created, then started (attached, so its output goes to the pod's log) from its static
directory: podman 4.3's conmon writes the OOM marker into its working directory, and only there
does ``inspect`` find it.

Settings podman needs on these machines are in ``podman/containers.conf`` (runc: crun fails on
hybrid cgroups; explicit ulimits: the defaults ask for limits root may not raise here).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CONF = Path(__file__).resolve().parent / "podman" / "containers.conf"
HOST_CA = Path("/etc/ssl/certs/ca-certificates.crt")
TARGETS = ("operator", "job")
REPOSITORY = "localhost/kubetune-{target}"
#: The stand-in base: Debian's Python with a venv at /usr/local (python, pip), pip trusting the
#: system CA bundle (the host's, mounted at build time), no apt lists.
BASE_PACKAGES = ("python3.11", "python3-venv", "ca-certificates")
BASE_HOOKS = (
    'chroot "$1" python3 -m venv /usr/local',
    'printf "[global]\\ncert = /etc/ssl/certs/ca-certificates.crt\\n" > "$1/etc/pip.conf"',
    'rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*',
)
BASE_CHANGES = (
    "ENV=LANG=C.UTF-8",
    "ENV=PATH=/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin",
    'CMD=["python3"]',
)
DEBIAN_MIRROR = "http://deb.debian.org/debian"


class PodmanError(Exception):
    """A podman command failed; the message holds its output."""


def env() -> dict[str, str]:
    return {**os.environ, "CONTAINERS_CONF": str(CONF)}


def available() -> bool:
    """podman is installed and can run containers here."""
    if shutil.which("podman") is None:
        return False
    return subprocess.run(["podman", "info"], env=env(), capture_output=True).returncode == 0


def podman(*args: str, check: bool = True, timeout: float | None = 120) -> str:
    done = subprocess.run(["podman", *args], env=env(), capture_output=True, text=True, timeout=timeout)
    if check and done.returncode != 0:
        raise PodmanError(f"podman {' '.join(args[:3])}...: {done.stderr.strip() or done.stdout.strip()}")
    return done.stdout.strip()


def image_exists(ref: str) -> bool:
    return subprocess.run(["podman", "image", "exists", ref], env=env(), capture_output=True).returncode == 0


def image_user(ref: str) -> str:
    """The image's USER ('' when none is set: root)."""
    return podman("image", "inspect", "--format", "{{.Config.User}}", ref)


# --- build


def _context_files() -> Iterator[Path]:
    """The files the Dockerfile's build context holds: what .dockerignore lets in."""
    allowed = [
        line[1:].rstrip("/")
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.startswith("!") and not line.startswith("!*")
    ]
    for name in allowed:
        path = REPO / name
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
        for file in files:
            if "__pycache__" not in file.parts and file.suffix not in (".pyc", ".pyo"):
                yield file


def inputs_digest() -> str:
    """A digest of everything an image is built from: the Dockerfile, .dockerignore, the context, the base recipe."""
    digest = hashlib.sha256()
    for file in [REPO / "Dockerfile", REPO / ".dockerignore", *_context_files()]:
        digest.update(file.relative_to(REPO).as_posix().encode() + b"\0" + file.read_bytes() + b"\0")
    digest.update(json.dumps([BASE_PACKAGES, BASE_HOOKS, BASE_CHANGES]).encode())
    return digest.hexdigest()[:12]


def tag(target: str) -> str:
    """The image built from this tree for ``target`` (operator or job)."""
    return f"{REPOSITORY.format(target=target)}:{inputs_digest()}"


def base_image() -> str:
    """The Dockerfile's default base image, fully qualified as podman stores it."""
    match = re.search(r"^ARG PYTHON_IMAGE=(\S+)", (REPO / "Dockerfile").read_text(), re.M)
    if match is None:
        raise PodmanError("Dockerfile: no ARG PYTHON_IMAGE line")
    name = match.group(1)
    return name if "/" in name else f"docker.io/library/{name}"


def build_base(ref: str) -> None:
    with tempfile.TemporaryDirectory(prefix="kubetune-base-") as work:
        tar = Path(work) / "base.tar"
        hooks = [f"--customize-hook={hook}" for hook in BASE_HOOKS]
        subprocess.run(
            ["mmdebstrap", "--variant=minbase", f"--include={','.join(BASE_PACKAGES)}",
             "--hook-dir=/usr/share/mmdebstrap/hooks/merged-usr", *hooks, "bookworm", str(tar), DEBIAN_MIRROR],
            check=True,
        )  # fmt: skip
        podman("import", *[x for c in BASE_CHANGES for x in ("--change", c)], str(tar), ref, timeout=600)


def build(targets: Sequence[str] = TARGETS) -> dict[str, str]:
    """Build what is missing (the base, then each target); return target -> image reference."""
    base = base_image()
    if not image_exists(base):
        _say(f"base image {base} from Debian packages")
        build_base(base)
    built = {}
    for target in targets:
        ref = tag(target)
        if image_exists(ref):
            _say(f"{target}: {ref} is up to date")
        else:
            started = time.monotonic()
            # --layers=false: podman 4.3's layer cache breaks RUN --mount=from=builder when the
            # builder stage comes from the cache (it mounts nothing).
            args = [
                "build",
                "--layers=false",
                "--force-rm",
                "--target",
                target,
                "--tag",
                ref,
                "--file",
                str(REPO / "Dockerfile"),
            ]
            args += ["--volume", f"{HOST_CA}:{HOST_CA}:ro"] if HOST_CA.is_file() else []
            subprocess.run(["podman", *args, str(REPO)], env=env(), check=True)
            _say(f"{target}: built {ref} in {time.monotonic() - started:.0f} s, {size(ref)} bytes")
        podman("tag", ref, f"{REPOSITORY.format(target=target)}:dev")
        remove_stale(target, ref)
        built[target] = ref
    return built


def remove_stale(target: str, keep: str) -> None:
    """Remove the target's images of other digests: every change to the tree makes a new one (the job's
    is 7 GB), and a machine that runs the tests often would fill its disk. One a container still uses stays."""
    repository = REPOSITORY.format(target=target)

    def held() -> set[str]:
        return set(podman("images", "--format", "{{.Repository}}:{{.Tag}}", repository).splitlines())

    stale = held() - {keep, f"{repository}:dev"}
    if stale:
        podman("rmi", *sorted(stale), check=False)
        if removed := stale - held():
            _say(f"{target}: removed {', '.join(sorted(removed))}")


def size(ref: str) -> int:
    return int(podman("image", "inspect", "--format", "{{.Size}}", ref))


def _say(message: str) -> None:
    print(f"[images {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# --- runtime


def create(args: Sequence[str]) -> str:
    """``podman create`` with these arguments; the container's id."""
    return podman("create", *args)


def start(container: str, log: Path) -> subprocess.Popen[bytes]:
    """Start a created container attached, its output appended to ``log``, from its static directory."""
    static = podman("inspect", "--format", "{{.StaticDir}}", container)
    with log.open("ab") as out:
        return subprocess.Popen(
            ["podman", "start", "--attach", container],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env(),
            cwd=static,
            start_new_session=True,
        )


def kill(container: str, signal_name: str) -> None:
    podman("kill", "--signal", signal_name, container, check=False)


def oom_killed(container: str) -> bool:
    return podman("inspect", "--format", "{{.State.OOMKilled}}", container, check=False) == "true"


def remove(container: str) -> None:
    podman("rm", "--force", "--time", "0", container, check=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("build", help="build the base image and both targets where missing; print their references")
    sub.add_parser("tags", help="print the references this tree's images have (built or not)")
    args = parser.parse_args()
    refs = build() if args.command == "build" else {t: tag(t) for t in TARGETS}
    for target, ref in refs.items():
        print(f"{target}\t{ref}")


if __name__ == "__main__":
    main()
