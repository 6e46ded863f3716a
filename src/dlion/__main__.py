"""`python -m dlion ...`: the `dlion` command."""

import sys

from dlion.cli import main

sys.exit(main())
