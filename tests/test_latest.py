"""What `make test-latest` adds to its subset (also part of `make test`): every module of the
project imports, and the smoke config runs end to end as a user runs it."""

import importlib
import pkgutil

import fcit_hpc
import fcit_kernels


def _modules(pkg) -> list[str]:
    return sorted(m.name for m in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + "."))


def test_every_module_imports():
    names = _modules(fcit_hpc) + _modules(fcit_kernels)
    assert len(names) > 40  # the walk found the package, not an empty namespace
    for name in names:
        if name.endswith("__main__"):
            continue
        importlib.import_module(name)


def test_the_smoke_config_runs_to_its_last_round(serial_run):
    """configs/smoke.yaml: 2 stages x 2 rounds, each round 3 of 10 clients; the run is marked
    done, the accuracy matrix is filled for the seen tasks, the report is written."""
    import numpy as np

    from fcit_hpc.state.schema import read_state

    st = read_state(serial_run)
    assert st.done and st.stage == 2  # the cursor stands past the last stage
    assert len(st.rounds) == 2 * 2 and len(st.clients) == 2 * 2 * 3
    assert np.isfinite(st.accuracy[0, 0]) and np.isfinite(st.accuracy[1, :2]).all()
    assert 1 <= st.num_subspaces <= 4
    assert (serial_run / "report.md").is_file()
