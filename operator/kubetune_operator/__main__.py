"""`python -m kubetune_operator`: run the operator (kopf) with the settings from the environment."""

from __future__ import annotations

import logging
import os

import kopf

from . import handlers  # noqa: F401  (registers the handlers)
from .handlers import SETTINGS


def main() -> None:
    logging.basicConfig(level=os.environ.get("KUBETUNE_OPERATOR_LOG_LEVEL", "INFO"))
    health = os.environ.get("KUBETUNE_OPERATOR_HEALTH_PORT", "8081")
    kopf.run(
        standalone=True,
        clusterwide=not SETTINGS.namespaces,
        namespaces=SETTINGS.namespaces,
        liveness_endpoint=f"http://0.0.0.0:{health}/healthz" if health != "0" else None,
    )


if __name__ == "__main__":
    main()
