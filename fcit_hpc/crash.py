"""The last line of defence of the ``fcit`` command: an exception no part of fcit turned into a
:class:`~fcit_hpc.errors.FcitError` becomes one short line and an exit code; its traceback goes
to a log file the line names.

* an ``OSError`` naming a file (a write the code does not guard itself): exit 74 with the path;
* memory that cannot be allocated (``MemoryError``, a CUDA or CPU allocator's error): exit 2
  naming the size fields of the config;
* Ctrl-C outside ``fcit run`` (whose handler stops it itself): exit 75;
* anything else is a bug in fcit: exit 1 and a line asking for a bug report with the log file.
"""

from __future__ import annotations

import os
import tempfile
import time
import traceback
from pathlib import Path

from fcit_hpc.errors import EXIT_INPUT, EXIT_IO, EXIT_PREEMPTED, one_line

EXIT_BUG = 1
SIZE_FIELDS = (
    "model.hidden_size, model.intermediate_size, model.num_layers, model.max_seq_len, "
    "lora.lora_r, lora.max_subspaces, train.batch_size, benchmark.train_per_task"
)


def log_traceback(e: BaseException, args=None) -> Path | None:
    """Write ``e``'s traceback to ``fcit-error-<time>-<pid>.log`` in the run directory when there
    is one that can be written, else in the temporary directory; the path (None: nowhere)."""
    from fcit_hpc.fed import preempt

    name = f"fcit-error-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    text = "".join(traceback.format_exception(type(e), e, e.__traceback__))
    import sys

    command = " ".join(sys.argv)
    places = [preempt.resume_dir(), tempfile.gettempdir()]
    for d in places:
        if not d or not os.path.isdir(d):
            continue
        path = Path(d) / name
        try:
            path.write_text(f"{command}\n{text}")
            return path
        except OSError:
            continue
    return None


def _out_of_memory(e: BaseException) -> bool:
    if isinstance(e, MemoryError):
        return True
    text = str(e).lower()
    return isinstance(e, RuntimeError) and (
        "out of memory" in text
        or "can't allocate" in text
        or "cannot allocate" in text
        or "not enough memory" in text
    )


def classify(e: BaseException, args=None) -> tuple[int, str]:
    """(exit code, one-line message) for an exception that reached the command's top level; the
    traceback is logged (the message names the file)."""
    if isinstance(e, KeyboardInterrupt):
        return EXIT_PREEMPTED, "stopped on SIGINT (Ctrl-C)"
    if isinstance(e, SystemExit):
        return int(e.code) if isinstance(e.code, int) else EXIT_BUG, str(e.code or "")
    log = log_traceback(e, args)
    where = f"traceback in {log}" if log else "no log file could be written"
    first = one_line(e)[:300]
    if isinstance(e, OSError) and e.filename is not None:
        return EXIT_IO, f"error: {e.filename}: {e.strerror or first} ({where})"
    if _out_of_memory(e):
        return EXIT_INPUT, (
            f"error: out of memory ({first}); lower the size fields ({SIZE_FIELDS}) ({where})"
        )
    return EXIT_BUG, (
        f"internal error (a bug in fcit): {type(e).__name__}: {first}; please report it with "
        f"{log or 'the command line'} ({where})"
    )
