"""Errors that end a command with a one-line message and exit code 2."""


class FcitError(Exception):
    """Bad user input (config, data file, state file). The CLI prints it on one line, exits 2."""

    exit_code = 2


class ConfigError(FcitError):
    """A config field is malformed; the message names the field path and the bad value."""


class StateError(FcitError):
    """A state file is missing, truncated or does not match the schema."""


class DataError(FcitError):
    """A data file is malformed; the message names the file and the record index."""
