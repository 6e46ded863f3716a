"""Exception types. Bad input (exit code 2 at the CLI) is always a subclass of BadInput."""


class DlionError(Exception):
    """Base of every error dlion raises on purpose."""


class BadInput(DlionError):
    """The user gave something wrong: a config, a data file, a CLI argument, a checkpoint."""


class ConfigError(BadInput):
    """A config file or override is invalid; the message names the field."""


class DataError(BadInput):
    """A dataset name, path or file content is invalid; the message names the file."""


class SimulationError(DlionError):
    """The simulated run cannot continue (for example every worker waits on nothing)."""
