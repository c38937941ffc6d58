import h5py
import numpy as np
import pytest

from fcit_hpc.errors import StateError
from fcit_hpc.state.schema import (
    CLIENT_DTYPE,
    ROUND_DTYPE,
    MethodState,
    RunState,
    comparable_content,
    read_state,
    same_content,
    write_state,
)


def _state():
    st = RunState(
        config_yaml="seed: 0\nout_dir: a\n",
        adapter=np.arange(12, dtype=np.float32).reshape(2, 6),
        tokens=np.ones((2, 4), np.float32),
        token_counts=np.array([3.0, 0.0]),
        accuracy=np.full((2, 3), np.nan),
        num_subspaces=1,
        stage=1,
        round=0,
        server_opt={"m": np.zeros((2, 6), np.float32)},
        rng_torch=np.arange(5, dtype=np.uint8),
    )
    st.append_metrics(np.zeros(1, ROUND_DTYPE), np.zeros(2, CLIENT_DTYPE))
    return st


def test_roundtrip(tmp_path):
    st = _state()
    write_state(tmp_path, st)
    back = read_state(tmp_path)
    assert np.array_equal(back.adapter, st.adapter)
    assert (back.stage, back.round, back.done, back.num_subspaces) == (1, 0, False, 1)
    assert np.array_equal(back.server_opt["m"], st.server_opt["m"])
    assert len(back.clients) == 2 and back.clients.dtype == CLIENT_DTYPE
    assert not list(tmp_path.glob(".*tmp"))  # temp file replaced


def _plain_dtype(dt: np.dtype) -> bool:
    """A number, a fixed- or variable-length string, or a compound of numbers: nothing that h5py
    would store as an opaque blob, a Python object, a reference or a vlen of non-strings."""
    if h5py.check_string_dtype(dt) is not None:  # fixed ('S') or vlen str/bytes
        return True
    if h5py.check_vlen_dtype(dt) is not None or h5py.check_ref_dtype(dt) is not None:
        return False
    if dt.fields is not None:
        return all(sub.kind in "iuf" and sub.fields is None for sub, *_ in dt.fields.values())
    return dt.kind in "iuf"


def _state_file_dtypes(path) -> dict[str, np.dtype]:
    """Every dataset, committed type and attribute (of the file, groups, datasets) -> dtype."""
    out = {}
    with h5py.File(path, "r") as f:

        def visit(name, obj):
            for k in obj.attrs:
                out[f"{name}@{k}"] = obj.attrs.get_id(k).dtype
            if isinstance(obj, h5py.Dataset | h5py.Datatype):
                out[name] = obj.dtype

        visit("/", f)
        f.visititems(visit)
    return out


def test_state_file_holds_only_numbers_strings_and_numeric_records(tmp_path):
    st = _state()
    st.task_names, st.summary = ["a", "b", "c"], {"avg_acc": 0.5}
    st.method = MethodState("ewc", {"fisher": np.ones(6, np.float32)}, {"stages": 1})
    write_state(tmp_path, st)
    dtypes = _state_file_dtypes(tmp_path / "state.h5")
    # the walk sees attributes of the file, of groups and every dataset, records included
    for key in ("/@config_yaml", "cursor@stage", "eval@task_names", "eval@avg_acc"):
        assert key in dtypes
    assert dtypes["metrics/clients"] == CLIENT_DTYPE and dtypes["metrics/rounds"] == ROUND_DTYPE
    assert {"global/adapter", "server_opt/m", "rng/torch", "method/ewc/fisher"} <= dtypes.keys()
    bad = {k: str(dt) for k, dt in dtypes.items() if not _plain_dtype(dt)}
    assert bad == {}


def test_comparable_content_ignores_time_and_placement(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    s1, s2 = _state(), _state()
    s2.config_yaml = "seed: 0\nout_dir: b\n"
    s2.clients["seconds"] = 9.0
    s2.clients["rank"] = 1
    write_state(a, s1)
    write_state(b, s2)
    assert same_content(comparable_content(a), comparable_content(b)) == []
    s2.adapter[0, 0] = np.nextafter(s2.adapter[0, 0], 1)
    write_state(b, s2)
    assert same_content(comparable_content(a), comparable_content(b)) == ["global/adapter"]


def test_missing_dataset_and_wrong_shape(tmp_path):
    write_state(tmp_path, _state())
    with h5py.File(tmp_path / "state.h5", "a") as f:
        del f["global/tokens"]
    with pytest.raises(StateError, match="missing dataset global/tokens"):
        read_state(tmp_path)
    write_state(tmp_path, _state())
    with h5py.File(tmp_path / "state.h5", "a") as f:
        del f["server_opt/m"]
        f["server_opt/m"] = np.zeros((3, 3), np.float32)
    with pytest.raises(StateError, match="server_opt/m shape"):
        read_state(tmp_path)


def test_method_state_roundtrip_and_mismatch(tmp_path):
    """/method/<name>: arrays keep their dtype and shape, counters their value; the method's
    validate_state refuses one that does not fit the model, naming the file and the dataset."""
    from fcit_hpc.config import load_config
    from fcit_hpc.methods import make_method

    from .conftest import ROOT

    st = _state()
    arrays = {"fisher": np.ones(6, np.float32), "anchor": st.adapter[0].copy()}
    st.method = MethodState("ewc", arrays, {"stages": 1})
    write_state(tmp_path, st)
    back = read_state(tmp_path).method
    assert back.name == "ewc" and back.counters == {"stages": 1}
    assert back.arrays["anchor"].tobytes() == st.adapter[0].tobytes()
    assert back.arrays["fisher"].dtype == np.float32
    ewc_cfg = load_config(ROOT / "configs/smoke.yaml", ["method.name=ewc"])
    ewc = make_method(ewc_cfg.method, ewc_cfg.lora)
    ewc.validate_state(back, 6, tmp_path / "state.h5")
    with h5py.File(tmp_path / "state.h5", "a") as f:
        del f["method/ewc/anchor"]
        f["method/ewc/anchor"] = np.zeros(5, np.float32)
        # a well-formed file whose checksums hold: the method's own validation must refuse it
        digest = __import__("hashlib").sha256(np.zeros(5, np.float32).tobytes()).hexdigest()
        f["method/ewc/anchor"].attrs["sha256"] = digest
    bad = (tmp_path / "state.h5").read_bytes()
    with pytest.raises(StateError, match="state.h5: /method/ewc fisher .* do not fit"):
        ewc.validate_state(read_state(tmp_path).method, 6, tmp_path / "state.h5")
    assert (tmp_path / "state.h5").read_bytes() == bad  # reading leaves the file as it was
    disco_cfg = load_config(ROOT / "configs/smoke.yaml")
    disco = make_method(disco_cfg.method, disco_cfg.lora)
    with pytest.raises(StateError, match="state of method 'ewc', the run's method 'disco'"):
        disco.validate_state(back, 6, tmp_path / "state.h5")


def test_not_hdf5(tmp_path):
    (tmp_path / "state.h5").write_text("hello")
    with pytest.raises(StateError, match="unreadable state file"):
        read_state(tmp_path)


def _fail_open(path, *a, **k):
    raise OSError(30, "Read-only file system", str(path))


# half-written: disk full half way through the temporary file (after /global, before
# /metrics/clients); read-only: the temporary file cannot be created; then an I/O error at the
# fsync, and at the rename over the old file
@pytest.mark.parametrize("where", ["half-written", "read-only", "fsync", "replace"])
def test_failed_write_leaves_previous_state(tmp_path, monkeypatch, where):
    """Any failure before the new file replaces the old: StorageError naming the file (exit 74),
    the previous state.h5 unchanged byte for byte and readable, no temporary file left."""
    import errno

    from fcit_hpc.errors import StorageError
    from fcit_hpc.state import schema

    write_state(tmp_path, _state())
    before = (tmp_path / "state.h5").read_bytes()
    nxt = _state()
    nxt.round, nxt.adapter = 1, nxt.adapter + 1
    if where == "half-written":
        real = h5py.Group.create_dataset

        def create(self, name, *a, **k):
            if name == "clients":
                raise OSError(errno.ENOSPC, "No space left on device")
            return real(self, name, *a, **k)

        monkeypatch.setattr(h5py.Group, "create_dataset", create)
    elif where == "read-only":
        monkeypatch.setattr(schema.h5py, "File", _fail_open)
    else:

        def io_error(*args):
            raise OSError(errno.EIO, "Input/output error")

        monkeypatch.setattr(schema.os, where, io_error)
    with pytest.raises(StorageError, match=r"state.h5: cannot write the state file") as e:
        write_state(tmp_path, nxt)
    assert e.value.exit_code == 74 and e.value.rank_local
    monkeypatch.undo()
    assert (tmp_path / "state.h5").read_bytes() == before
    assert read_state(tmp_path).round == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.h5"]
