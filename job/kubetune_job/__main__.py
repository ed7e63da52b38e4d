"""`python -m kubetune_job`: the training program a FineTuneJob's pods run.

With several processes per pod (KUBETUNE_NPROC_PER_NODE > 1) the first one launches the others
under torchrun (launch.py), and each of those runs the job as one rank.
"""

from __future__ import annotations

import logging
import os
import sys

from kubetune_api.settings import JobSettings

from . import launch
from .orchestrate import execute


def main() -> int:
    settings = JobSettings()
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if launch.needed(settings, os.environ):
        return launch.launch(settings)
    return execute(settings)


if __name__ == "__main__":
    sys.exit(main())
