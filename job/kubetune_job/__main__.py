"""`python -m kubetune_job`: the training program a FineTuneJob's pods run."""

from __future__ import annotations

import logging
import sys

from .settings import JobSettings
from .train import execute


def main() -> int:
    settings = JobSettings()
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return execute(settings)


if __name__ == "__main__":
    sys.exit(main())
