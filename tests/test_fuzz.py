"""The short profile of the reader fuzzing (tests/fuzz.py; the full run is
`python -m tests.fuzz --examples 10000`): 30 generated inputs per reader times its weight (15
exports, 60 messages), a fixed seed, a deadline per input."""

from collections import Counter
from pathlib import Path

import pytest

from .fuzz import TARGETS, Target, Uncaught, check, run_target

EXAMPLES = 30


@pytest.mark.parametrize("target", TARGETS, ids=[t.name for t in TARGETS])
def test_reader_loads_or_raises_a_named_error(target):
    examples = round(EXAMPLES * target.weight)
    counts = run_target(target, examples, seed=0, deadline_ms=5000)
    assert counts["inputs"] >= examples
    kinds = set(counts) - {"inputs", "loaded"}
    assert counts["loaded"] + sum(counts[k] for k in kinds) == counts["inputs"]
    assert kinds <= {"ConfigError", "DataError", "StateError", "WireError"}


def test_the_property_catches_a_reader_that_misbehaves(tmp_path: Path):
    """Another exception, an unnamed error and a changed input each fail the property."""

    def lay(d, x):
        (d / "f").write_text("x")

    def key_error(d, x):
        raise KeyError("k")

    def writes(d, x):
        (d / "f").write_text("y")

    def unnamed(d, x):
        from fcit_hpc.errors import DataError

        raise DataError("something is wrong")

    for read, why in [(key_error, "uncaught KeyError"), (writes, "changed"), (unnamed, "name")]:
        with pytest.raises(Uncaught, match=why):
            check(Target("t", lambda: None, lay, read), tmp_path, None, Counter())
