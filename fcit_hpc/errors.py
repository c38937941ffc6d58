"""Errors that end a command with a one-line message and exit code 2."""


class FcitError(Exception):
    """Bad user input (config, data file, state file). The CLI prints it on one line, exits 2."""

    exit_code = 2
    # Raised by data only this rank reads (a client file, an image, during local work): the other
    # ranks do not fail alike, so the CLI reports it from this rank and aborts the whole job.
    rank_local = False


class ConfigError(FcitError):
    """A config field is malformed; the message names the field path and the bad value."""


class StateError(FcitError):
    """A state file is missing, truncated or does not match the schema."""


class DataError(FcitError):
    """A data file is malformed; the message names the file and the record index."""
