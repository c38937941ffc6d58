"""Version-1 state files (written before a method owned its state, ``/ewc`` for every run) and
version-2 files (DISCO's DKO diagnostics in ``/dko``) load through the migration of
fcit_hpc.state.schema; other versions are refused naming the version.
tests/data/state_v1_*/state.h5: the smoke config's EWC and DISCO runs written by fcit at f3ecf5d;
tests/data/state_v2_disco/state.h5: the DISCO one rewritten by fcit at 86945c1 (version 2)."""

import shutil

import h5py
import numpy as np
import pytest

from fcit_hpc.config import config_from_yaml_text
from fcit_hpc.errors import StateError
from fcit_hpc.fed.server.run_state import check_state, init_method_state
from fcit_hpc.methods import make_method
from fcit_hpc.state.schema import (
    SCHEMA_VERSION,
    comparable_content,
    read_state,
    same_content,
    write_state,
)

from .conftest import ROOT, fcit

DATA = ROOT / "tests" / "data"


def _v1_content(run_dir, method: str) -> dict:
    """An old file's content as a current file must hold it: /ewc moved under /method/ewc (EWC)
    or dropped (other methods: it was empty), /dko under /method/disco, the version number and
    the checksums (version 1 has none) aside."""
    out = {}
    for k, v in comparable_content(run_dir).items():
        if k == "/@schema_version":
            continue
        if k.startswith("ewc"):
            if method != "ewc":
                continue
            k = "method/" + k
        if k.startswith("dko"):
            k = "method/disco" + k[3:]
        out[k] = v
    return out


def _check_and_rewrite(st, src, out) -> None:
    """What the server does with a loaded state (the method's state made or checked, the state
    checked against the model), then the state written into ``out``."""
    stored = config_from_yaml_text(st.config_yaml)
    m = make_method(stored.method, stored.lora)
    numel = st.adapter.shape[1]
    init_method_state(st, m, numel)
    check_state(st, m, numel, src / "state.h5", mixer_numel=st.mixer.size)
    write_state(out, st)


@pytest.mark.parametrize("method", ["ewc", "disco"])
def test_v1_file_loads_and_rewrites_as_v2(tmp_path, method):
    src = DATA / f"state_v1_{method}"
    with h5py.File(src / "state.h5", "r") as f:  # the stored file is what it claims to be
        assert f.attrs["schema_version"] == 1 and "ewc" in f and "method" not in f
        raw_fisher = f["ewc/fisher"][()]
    st = read_state(src)
    if method == "ewc":
        assert st.method.name == "ewc" and st.method.counters == {"stages": 2}
        assert st.method.arrays["fisher"].tobytes() == raw_fisher.tobytes() and raw_fisher.size
    else:
        assert st.method.name == "disco" and raw_fisher.size == 0  # /dko moved
    _check_and_rewrite(st, src, tmp_path)
    with h5py.File(tmp_path / "state.h5", "r") as f:
        assert f.attrs["schema_version"] == SCHEMA_VERSION == 3 and "ewc" not in f
        assert "dko" not in f and ("method/disco" in f) == (method == "disco")
    assert same_content(_v1_content(src, method), _v1_content(tmp_path, method)) == []


def test_v1_ewc_run_resumes_to_the_same_content(tmp_path):
    """A v1 EWC run stopped before its last evaluation (the stored file with stage 1's accuracy
    and the summary taken out) resumes under the current fcit: the migrated state is checked,
    the stage end is not repeated (stages = 2), the evaluation and summary are redone, and the
    v2 file written holds exactly the v1 run's content."""
    run = tmp_path / "run"
    shutil.copytree(DATA / "state_v1_ewc", run)
    before = _v1_content(run, "ewc")
    with h5py.File(run / "state.h5", "a") as f:
        f["cursor"].attrs.update({"stage": 1, "round": 1, "done": 0})
        f["eval/accuracy"][1] = np.nan
        for k in [k for k in f["eval"].attrs if k != "task_names"]:
            del f["eval"].attrs[k]
    p = fcit("run", "--resume", str(run))
    assert p.returncode == 0, p.stderr[-3000:]
    with h5py.File(run / "state.h5", "r") as f:
        assert f.attrs["schema_version"] == 3
    assert same_content(before, _v1_content(run, "ewc")) == []


def test_v2_disco_file_moves_its_dko_diagnostics_and_rewrites_as_v3(tmp_path):
    src = DATA / "state_v2_disco"
    with h5py.File(src / "state.h5", "r") as f:  # the stored file is what it claims to be
        assert f.attrs["schema_version"] == 2 and "dko" in f and "method" not in f
        raw = {k: f[f"dko/{k}"][()] for k in ("samples", "task_unit", "gate_mass")}
    st = read_state(src)  # its checksums verified, /dko included
    assert st.method.name == "disco" and set(st.method.arrays) == set(raw)
    for k, v in raw.items():
        assert st.method.arrays[k].dtype == v.dtype and st.method.arrays[k].tobytes() == v.tobytes()
    _check_and_rewrite(st, src, tmp_path)
    with h5py.File(tmp_path / "state.h5", "r") as f:
        assert f.attrs["schema_version"] == 3 and "dko" not in f and "method/disco" in f
    assert same_content(_v1_content(src, "disco"), _v1_content(tmp_path, "disco")) == []
    # a damaged /dko of a version-2 file is still refused on load, naming the dataset
    broken = tmp_path / "broken"
    shutil.copytree(src, broken)
    with h5py.File(broken / "state.h5", "a") as f:
        f["dko/samples"][0, 0] += 1
    with pytest.raises(StateError, match=r"/dko/samples: checksum mismatch"):
        read_state(broken)


@pytest.mark.parametrize("version", [0, 4, 99])
def test_other_versions_are_refused_naming_the_version(tmp_path, version):
    shutil.copy(DATA / "state_v1_ewc" / "state.h5", tmp_path / "state.h5")
    with h5py.File(tmp_path / "state.h5", "a") as f:
        f.attrs["schema_version"] = version
    with pytest.raises(StateError, match=rf"state.h5: schema_version {version}: this fcit reads "):
        read_state(tmp_path)


def test_v2_method_group_must_be_one_method(tmp_path):
    st = read_state(DATA / "state_v1_ewc")
    write_state(tmp_path, st)
    with h5py.File(tmp_path / "state.h5", "a") as f:
        f["method/other/x"] = np.zeros(2, np.float32)
    with pytest.raises(StateError, match=r"/method holds \['ewc', 'other'\]"):
        read_state(tmp_path)
