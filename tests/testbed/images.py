"""How the test kubelet turns a container image into a local command: one table, :data:`IMAGES`.

There is no container runtime on the test machines, so an image is never pulled; it names a
program that is already here. Each row stands for an image's ENTRYPOINT and CMD, and the kubelet
combines them with the container's ``command`` and ``args`` the way a container runtime does:

- ``command`` set: it replaces the ENTRYPOINT, and ``args`` (or nothing) follow it;
- only ``args`` set: ENTRYPOINT + ``args`` (the image's CMD is dropped);
- neither: ENTRYPOINT + CMD.

Then, for any image, a first word naming a Python interpreter (``python``, ``python3``,
``python3.11``, ``/usr/local/bin/python``...) becomes this test run's interpreter
(``sys.executable``), so pods run with the project's own environment.

An image that matches no row is "not found in the registry": the kubelet reports ``ErrImagePull``
and then ``ImagePullBackOff`` and the pod stays Pending, as a real node does for a bad image.
"""

from __future__ import annotations

import fnmatch
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass

PYTHON = sys.executable


@dataclass(frozen=True)
class Image:
    """One row: repositories matching ``repository`` (an fnmatch pattern, no tag) run this."""

    repository: str
    entrypoint: tuple[str, ...]
    cmd: tuple[str, ...]
    why: str


IMAGES: tuple[Image, ...] = (
    Image("*kubetune-job", (PYTHON, "-m", "kubetune_job"), (), "the project's training image"),
    Image("*kubetune-operator", (PYTHON, "-m", "kubetune_operator"), (), "the project's operator image"),
    Image("*/job", (PYTHON, "-m", "kubetune_job"), (), "the training image under a short name (registry/kubetune/job)"),
    Image("python", (), ("python3",), "the official Python image"),
    Image("*/python", (), ("python3",), "the official Python image with a registry prefix"),
    Image("busybox", (), ("sh",), "a shell image: its commands (sh, sleep, echo) exist on the host"),
    Image("*/busybox", (), ("sh",), "the shell image with a registry prefix"),
    Image("debian", (), ("bash",), "a distribution image: commands run on the host as they are"),
    Image("*/debian", (), ("bash",), "the distribution image with a registry prefix"),
)

_PYTHON_NAME = re.compile(r"^(?:.*/)?python(?:3(?:\.\d+)?)?$")


class ImageNotFound(Exception):
    """The image maps to nothing here: the kubelet reports it as a failed pull."""


def repository(image: str) -> str:
    """The image reference without digest and tag: ``ghcr.io/x/y:1.0`` -> ``ghcr.io/x/y``."""
    name = image.split("@", 1)[0]
    slash = name.rfind("/")
    colon = name.rfind(":")
    return name[:colon] if colon > slash else name


def lookup(image: str, table: Sequence[Image] = IMAGES) -> Image:
    """The first row whose pattern matches the image's repository."""
    repo = repository(image)
    for row in table:
        if fnmatch.fnmatchcase(repo, row.repository):
            return row
    raise ImageNotFound(f'failed to pull image "{image}": not found (the test kubelet maps no command to it)')


def command_line(
    image: str, command: Sequence[str] | None, args: Sequence[str] | None, table: Sequence[Image] = IMAGES
) -> list[str]:
    """The argv a container runtime would exec for this image, command and args (see the module doc)."""
    row = lookup(image, table)
    argv = [*command, *(args or ())] if command else [*row.entrypoint, *(args or row.cmd)]
    if not argv:
        raise ImageNotFound(f'image "{image}" has no entrypoint and the container gives no command')
    if _PYTHON_NAME.match(argv[0]):
        argv[0] = PYTHON
    return argv
