"""`python -m kubetune_cli` is the `kubetune` command."""

import sys

from kubetune_cli.commands import main

sys.exit(main())
