"""Where the test bed's programs are: the testbin directory that ``tests/testbed/build`` fills, then PATH.

The build script installs the Kubernetes control plane, kubectl, etcd, helm and weed (SeaweedFS)
under ``$KUBETUNE_TESTBIN/bin`` (default ``~/.cache/kubetune/testbin/bin``); Prometheus and the
Pushgateway come from the distribution's packages and are found on PATH. A name is looked up in
testbin first, so an unrelated program of the same name on PATH never shadows ours.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

KUBERNETES = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubectl")
S3 = ("weed",)
PROMETHEUS = ("prometheus", "prometheus-pushgateway")
KUEUE = ("kueue",)


def testbin_dir() -> Path:
    """The directory holding the built binaries (``$KUBETUNE_TESTBIN/bin``)."""
    root = os.environ.get("KUBETUNE_TESTBIN") or str(Path.home() / ".cache" / "kubetune" / "testbin")
    return Path(root) / "bin"


def find(name: str) -> Path | None:
    """The program ``name`` from testbin, else from PATH, else None."""
    built = testbin_dir() / name
    if built.is_file() and os.access(built, os.X_OK):
        return built
    found = shutil.which(name)
    return Path(found) if found else None


def require(name: str) -> Path:
    """Like :func:`find`, but raise with a hint on how to get the program."""
    path = find(name)
    if path is None:
        raise FileNotFoundError(f"{name} not found in {testbin_dir()} or on PATH; run tests/testbed/build")
    return path


def missing(names: tuple[str, ...]) -> list[str]:
    """The names in ``names`` that :func:`find` cannot locate."""
    return [n for n in names if find(n) is None]
