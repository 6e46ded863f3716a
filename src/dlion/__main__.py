"""`python -m dlion ...`: the `dlion` command."""

import sys

from dlion.cli.commands import main

sys.exit(main())
