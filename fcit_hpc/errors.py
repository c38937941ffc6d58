"""Errors that end a command with a one-line message, and the exit codes they end it with."""

# sysexits.h codes: bad input ends with 2 (argparse's usage code, kept from the start), a failed
# write of the run's files with EX_IOERR, a stop on request (preemption) with EX_TEMPFAIL, which
# the SLURM script reads as "requeue me" (slurm/fcit.sbatch), a malformed message between ranks
# with EX_PROTOCOL.
EXIT_INPUT = 2
EXIT_IO = 74
EXIT_PREEMPTED = 75
EXIT_PROTOCOL = 76


def one_line(e: BaseException) -> str:
    """An exception's message on one line (its type's name when it has none): what a one-line
    error message quotes of the error underneath."""
    return " ".join(str(e).split()) or type(e).__name__


class FcitError(Exception):
    """Bad user input (config, data file, state file). The CLI prints it on one line, exits 2."""

    exit_code = EXIT_INPUT
    # Raised by data only this rank reads (a client file, an image, during local work): the other
    # ranks do not fail alike, so the CLI reports it from this rank and aborts the whole job.
    rank_local = False


class ConfigError(FcitError):
    """A config field is malformed; the message names the field path and the bad value."""


class StateError(FcitError):
    """A state file is missing, truncated or does not match the schema."""


class DataError(FcitError):
    """A data file is malformed; the message names the file and the record index."""


class DependencyError(FcitError):
    """A package or program the run needs (a dataset's scorer: pycocoevalcap, Java) is missing;
    found at start-up, before anything is written. Exit 2."""


class StorageError(FcitError):
    """A run's file could not be written (disk full, read-only, I/O error): the message names the
    file; the previous state file is left as it was. Only rank 0 writes, so the job is aborted."""

    exit_code = EXIT_IO
    rank_local = True


class Preempted(Exception):
    """Every rank agreed to stop at a safe point after SIGTERM/SIGUSR1 (a preempted, requeued or
    timed-out SLURM job); the stored state is the last completed round. Exit code 75."""

    exit_code = EXIT_PREEMPTED
    collective = True  # every rank raised it at the same safe point


class Interrupted(Preempted):
    """A stop signal arrived outside the round loop (set-up, data generation, evaluation) or a
    second one arrived: this rank stops at once, without the other ranks' agreement (a multi-rank
    job is aborted with 75). Every file is written atomically, so nothing is half-written; the
    stored state is the last completed round. Exit code 75."""

    collective = False


class RunDirError(FcitError):
    """The run directory cannot be used (not a directory, not writable, no room): exit 74."""

    exit_code = EXIT_IO


class WireError(FcitError):
    """A message a rank sent does not follow its layout (``fcit_hpc.fed.wire``): a header that is
    not whole rows, a count that is not one, a body of another length than its header announces,
    a client the round did not plan. The message names the rank or client and the field; exit 76.
    Only rank 0 reads the messages, so the job is aborted."""

    exit_code = EXIT_PROTOCOL
    rank_local = True
