"""The `dlion` command (commands.py), its suites (suites.py), shared options."""
