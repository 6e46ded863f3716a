"""The thermal package's bad-input error (one line at the CLI, exit code 2)."""

from dlion.core.errors import BadInput


class ThermalError(BadInput):
    """A thermal profile, workload, config, table file or sysfs tree is unusable; names which."""
