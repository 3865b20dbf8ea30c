"""The two errors a user can cause: the command line prints their message and exits with 2."""


class ConfigError(ValueError):
    """A configuration file or override is invalid; the message names the key."""


class InputError(ValueError):
    """Input that cannot be used at all; the message names the file and what is wrong."""
