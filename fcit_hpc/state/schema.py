"""The HDF5 schema of ``RUN_DIR/state.h5`` — the one place it is defined — and atomic write/read.

Layout::

    /                        attrs: schema_version, config_yaml
    /cursor                  attrs: stage, round (last completed round; -1 before any), done
    /global/adapter          float32 [S_max, P]   every subspace's A/B as flat vectors
    /global/tokens           float32 [S_max, D]   global identity tokens G_i
    /global/token_counts     float64 [S_max]      samples merged into each token
    /global/projector        float32 [Q]          LLaVA projector weights (empty: not trained)
    /global/mixer            float32 [M]          the method's mixers: MoELoRA's routers, M-LoRA's
                                                  scales (only written when the method has them)
    /global                  attrs: num_subspaces (live S)
    /server_opt/<name>       float32 [S_max, P]   server-optimizer state (m, v)
    /rng/torch               uint8   [*]          torch CPU generator state of rank 0
    /metrics/rounds          compound [n_rounds]  ROUND_DTYPE
    /metrics/clients         compound [n_updates] CLIENT_DTYPE (incl. DKO decisions, bytes)
    /eval/accuracy           float64 [stages, tasks] R[t][i] (NaN until evaluated)
    /eval/first_stage        int64   [tasks]        first stage a client trained task i (T: never)
    /eval/activation         float64 [tasks, S]     mean SSA α per test task (DISCO)
    /eval                    attrs: task_names (JSON list), last, avg, forgetting, bwt, fwt
    /method/<name>/<array>   numeric [*]          the method's own state (absent for methods
                                                  without one), written, read and validated by
                                                  the method (``Method.init_state`` /
                                                  ``validate_state``); e.g. EWC's fisher, anchor,
                                                  DISCO's DKO diagnostics
    /method/<name>           attrs: the method's integer counters (EWC: stages)
    /privacy/norms           compound [n_uploads] NORM_DTYPE: each DP upload's L2 norm before
                                                  clipping and the bound C it was clipped to
    /privacy/epsilon         float64 [stages]     ε at privacy.dp_delta after each stage (NaN:
                                                  not reached); /privacy attrs: clip (the
                                                  adaptive bound C of the next round). Written
                                                  only with privacy.dp on; absent otherwise
    /compress/keys           int64   [n, 3]       error feedback: (client, part, size) per residual,
                                                  sorted (part: k >= 0 a subspace, -1 - i the i-th
                                                  side vector; absent when no client keeps one)
    /compress/residuals      float32 [sum sizes]  the residuals, concatenated in key order

No pickle: every value is a typed numeric array or a UTF-8 string attribute.

Versions: 3 (current) keeps DISCO's DKO diagnostics under ``/method/disco`` (samples, task_unit,
gate_mass), where 2 had them in ``/dko``. 2 put a method's own state under ``/method/<name>`` and
gave every dataset an attribute ``sha256``, the hex SHA-256 of its values' bytes (C order, as
stored: records packed field by field), verified on every load: a changed byte inside any
dataset's values is refused naming the dataset. 1 held EWC's state in ``/ewc`` (fisher, anchor,
attrs stages; empty for other methods) and had no checksums. Versions 1 and 2 load through
:func:`_migrate` (version 1 unverified); other versions are refused, naming the version.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from dataclasses import KW_ONLY, dataclass, field
from enum import IntEnum
from pathlib import Path

import h5py
import numpy as np

from fcit_hpc.errors import StateError, StorageError, one_line

SCHEMA_VERSION = 3  # 3: DKO diagnostics in /method/disco; 2: /method/<name>, checksums
READABLE_VERSIONS = (1, 2, 3)  # 1 and 2 migrated on read (module doc)
CHECKSUM = "sha256"
STATE_FILE = "state.h5"

ROUND_DTYPE = np.dtype(
    [
        ("stage", "i4"),
        ("round", "i4"),
        ("loss", "f8"),
        ("samples", "i8"),
        ("seconds", "f8"),
        ("bytes_sent", "i8"),
        ("bytes_recv", "i8"),
        ("accepted", "i4"),
        ("rejected", "i4"),
        ("num_subspaces", "i4"),
    ]
)
# status: a ClientStatus
CLIENT_DTYPE = np.dtype(
    [
        ("stage", "i4"),
        ("round", "i4"),
        ("client", "i4"),
        ("rank", "i4"),
        ("unit", "i4"),
        ("subspace", "i4"),
        ("samples", "i8"),
        ("loss", "f8"),
        ("seconds", "f8"),
        ("bytes_sent", "i8"),
        ("bytes_recv", "i8"),
        ("status", "i4"),
        ("similarity", "f8"),
        ("dko_action", "i4"),
    ]
)


# one record per client update under DP (fcit_hpc.fed.privacy): its L2 norm before clipping, and
# the bound C it was clipped to
NORM_DTYPE = np.dtype(
    [("stage", "i4"), ("round", "i4"), ("client", "i4"), ("norm", "f8"), ("clip", "f8")]
)


class ClientStatus(IntEnum):
    """What the server did with a client's round (stored as ``/clients.status``)."""

    ACCEPTED = 0
    NON_FINITE = 1  # update rejected: contains NaN/Inf
    WRONG_SHAPE = 2  # update rejected: not the subspace's size
    BAD_TOKEN = 3  # identity token rejected, the client trained nothing
    OUT_OF_RANGE = 4  # update rejected: a value beyond MAX_ABS_UPDATE
    DROPPED = 5  # trained, but its upload never arrived (federation.dropout)


STATUS = {
    ClientStatus.ACCEPTED: "accepted",
    ClientStatus.NON_FINITE: "rejected: non-finite update",
    ClientStatus.WRONG_SHAPE: "rejected: wrong shape",
    ClientStatus.BAD_TOKEN: "rejected: bad identity token",
    ClientStatus.OUT_OF_RANGE: "rejected: values out of range",
    ClientStatus.DROPPED: "dropped: no upload",
}
# Fields that measure time or placement, not the federated computation (metrics.jsonl's
# ``phases``, the phase timers, too: fcit_hpc.timers).
VOLATILE_FIELDS = {"seconds", "rank", "phases"}


@dataclass
class MethodState:
    """A method's own part of the state (``/method/<name>``): named numeric arrays and integer
    counters. Only the method gives them meaning (:class:`fcit_hpc.methods.base.Method`); the
    generic layers store, read and broadcast them by name. ``name`` empty: no method state."""

    name: str = ""
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    counters: dict[str, int] = field(default_factory=dict)


@dataclass
class RunState:
    config_yaml: str
    adapter: np.ndarray  # float32 [S_max, P]
    tokens: np.ndarray  # float32 [S_max, D]
    token_counts: np.ndarray  # float64 [S_max]
    _: KW_ONLY
    accuracy: np.ndarray  # float64 [stages, tasks]
    num_subspaces: int = 0
    stage: int = 0
    round: int = -1
    done: bool = False
    server_opt: dict[str, np.ndarray] = field(default_factory=dict)
    rng_torch: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint8))
    rounds: np.ndarray = field(default_factory=lambda: np.zeros(0, ROUND_DTYPE))
    clients: np.ndarray = field(default_factory=lambda: np.zeros(0, CLIENT_DTYPE))
    task_names: list[str] = field(default_factory=list)
    first_stage: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    activation: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))
    summary: dict[str, float] = field(default_factory=dict)
    projector: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    mixer: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    method: MethodState = field(default_factory=MethodState)
    privacy_norms: np.ndarray = field(default_factory=lambda: np.zeros(0, NORM_DTYPE))
    privacy_epsilon: np.ndarray = field(default_factory=lambda: np.zeros(0))  # [stages]
    privacy_clip: float = float("nan")
    # error feedback (fcit_hpc.fed.compress): (client, part key) -> float32 residual
    residuals: dict[tuple[int, int], np.ndarray] = field(default_factory=dict)

    def sides(self) -> dict[str, np.ndarray]:
        """The side vectors clients train beside their subspaces and the server averages
        (sample-weighted FedAvg), the non-empty ones in upload order."""
        return {n: v for n, v in (("projector", self.projector), ("mixer", self.mixer)) if v.size}

    def append_metrics(self, round_row: np.ndarray, client_rows: np.ndarray) -> None:
        self.rounds = np.concatenate([self.rounds, round_row.astype(ROUND_DTYPE)])
        self.clients = np.concatenate([self.clients, client_rows.astype(CLIENT_DTYPE)])


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_state(run_dir: str | Path, st: RunState) -> Path:
    """Write ``st`` to RUN_DIR/state.h5 atomically: temp file, fsync, os.replace, fsync dir.

    A failure before the replace (disk full, read-only directory, I/O error) removes the temp
    file and raises StorageError naming the file: the previous state file stays as it was."""
    run_dir = Path(run_dir)
    final = run_dir / STATE_FILE
    tmp = run_dir / f".{STATE_FILE}.tmp"
    try:
        _write_h5(tmp, st)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, final)
    except OSError as e:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise StorageError(
            f"{final}: cannot write the state file ({one_line(e)}); the previous state is unchanged"
        ) from None
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise
    try:
        _fsync_dir(run_dir)
    except OSError as e:
        raise StorageError(
            f"{final}: written, but its directory could not be synced ({one_line(e)})"
        ) from None
    return final


def _write_h5(path: Path, st: RunState) -> None:
    """Every field of ``st`` into a new HDF5 file at ``path`` (the layout in the module doc)."""
    with h5py.File(path, "w") as f:
        f.attrs["schema_version"] = SCHEMA_VERSION
        f.attrs["config_yaml"] = st.config_yaml
        c = f.create_group("cursor")
        c.attrs["stage"] = st.stage
        c.attrs["round"] = st.round
        c.attrs["done"] = int(st.done)
        g = f.create_group("global")
        g.attrs["num_subspaces"] = st.num_subspaces
        g.create_dataset("adapter", data=st.adapter)
        g.create_dataset("tokens", data=st.tokens)
        g.create_dataset("token_counts", data=st.token_counts)
        g.create_dataset("projector", data=np.asarray(st.projector, np.float32))
        if st.mixer.size:  # absent for methods without mixers: their files stay as they were
            g.create_dataset("mixer", data=np.asarray(st.mixer, np.float32))
        so = f.create_group("server_opt")
        for k, v in st.server_opt.items():
            so.create_dataset(k, data=v)
        f.create_group("rng").create_dataset("torch", data=st.rng_torch)
        m = f.create_group("metrics")
        m.create_dataset("rounds", data=st.rounds)
        m.create_dataset("clients", data=st.clients)
        ev = f.create_group("eval")
        ev.create_dataset("accuracy", data=st.accuracy)
        ev.create_dataset("first_stage", data=np.asarray(st.first_stage, np.int64))
        ev.create_dataset("activation", data=np.asarray(st.activation, np.float64))
        ev.attrs["task_names"] = json.dumps(st.task_names)
        for k, v in st.summary.items():
            ev.attrs[k] = float(v)
        if st.method.name:  # methods without a state of their own write no group
            _write_method(f, st.method)
        if st.privacy_epsilon.size:  # privacy.dp on only: other runs' files stay as they were
            pv = f.create_group("privacy")
            pv.attrs["clip"] = float(st.privacy_clip)
            pv.create_dataset("norms", data=np.asarray(st.privacy_norms, NORM_DTYPE))
            pv.create_dataset("epsilon", data=np.asarray(st.privacy_epsilon, np.float64))
        if st.residuals:  # error feedback only: other runs' files stay as they were
            _write_residuals(f, st.residuals)
        _add_checksums(f)


def _values_digest(obj: h5py.Dataset) -> str:
    """SHA-256 (hex) of a dataset's values as stored."""
    return hashlib.sha256(np.ascontiguousarray(obj[()]).tobytes()).hexdigest()


def _datasets(f: h5py.File) -> list[tuple[str, h5py.Dataset]]:
    found: list[tuple[str, h5py.Dataset]] = []
    f.visititems(
        lambda name, obj: found.append((name, obj)) if isinstance(obj, h5py.Dataset) else None
    )
    return found


def _add_checksums(f: h5py.File) -> None:
    for _, obj in _datasets(f):
        obj.attrs[CHECKSUM] = _values_digest(obj)


def _verify_checksums(r: _Reader) -> None:
    """Every dataset's values against its stored checksum (schema version 2)."""
    for name, obj in _datasets(r.f):
        want = obj.attrs.get(CHECKSUM)
        if isinstance(want, bytes | np.bytes_):
            want = bytes(want).decode("utf-8", "replace")
        if not isinstance(want, str):
            raise r.fail(f"/{name} carries no {CHECKSUM} checksum (schema version 2 on has one)")
        if _values_digest(obj) != want:
            raise r.fail(
                f"/{name}: checksum mismatch: its values changed after they were written (a "
                "damaged or edited file)"
            )


def _write_method(f: h5py.File, ms: MethodState) -> None:
    """``/method/<name>``: the method's arrays as datasets (their own dtype), counters as attrs."""
    g = f.create_group(f"method/{ms.name}")
    for k, v in ms.arrays.items():
        g.create_dataset(k, data=np.asarray(v))
    for k, v in ms.counters.items():
        g.attrs[k] = int(v)


def _write_residuals(f: h5py.File, residuals: dict[tuple[int, int], np.ndarray]) -> None:
    keys = sorted(residuals)
    g = f.create_group("compress")
    rows = [[c, k, residuals[(c, k)].size] for c, k in keys]
    g.create_dataset("keys", data=np.asarray(rows, np.int64).reshape(-1, 3))
    values = [np.asarray(residuals[key], np.float32) for key in keys]
    g.create_dataset("residuals", data=np.concatenate(values))


def _read_residuals(r: _Reader) -> dict[tuple[int, int], np.ndarray]:
    """/compress (keys, residuals); empty when absent. Sizes against the model: on resume."""
    if r.group("compress", optional=True) is None:
        return {}
    keys = r.array("compress/keys", np.int64, 2)
    values = r.array("compress/residuals", np.float32, 1)
    if keys.shape[1:] != (3,) or (keys[:, 2] < 0).any() or keys[:, 2].sum() != values.size:
        raise r.fail(
            f"/compress/keys (shape {keys.shape}) does not describe /compress/residuals "
            f"({values.size} values) as (client, part, size) rows"
        )
    pairs = [(int(c), int(k)) for c, k, _ in keys]
    if pairs != sorted(set(pairs)):
        raise r.fail("/compress/keys: (client, part) pairs not unique and sorted")
    offsets = np.concatenate([[0], np.cumsum(keys[:, 2])])
    return {key: values[offsets[i] : offsets[i + 1]].copy() for i, key in enumerate(pairs)}


class _Reader:
    """Typed access to an open state file: every object and attribute checked for its kind,
    dtype and shape before use; StateError naming the file and the object otherwise."""

    def __init__(self, f: h5py.File, path: Path):
        self.f, self.path = f, path

    def fail(self, what: str) -> StateError:
        return StateError(f"{self.path}: {what}")

    def group(self, name: str, optional: bool = False) -> h5py.Group | None:
        obj = self.f.get(name)
        if obj is None and optional:
            return None
        if not isinstance(obj, h5py.Group):
            raise self.fail(f"missing group {name} (not a complete fcit state file)")
        return obj

    def array(self, name: str, dtype, ndim: int, optional: bool = False) -> np.ndarray:
        """A numeric dataset of ``ndim`` dimensions, as ``dtype``."""
        obj = self.f.get(name)
        if obj is None and optional:
            return np.zeros((0,) * ndim, dtype)
        if not isinstance(obj, h5py.Dataset):
            raise self.fail(f"missing dataset {name} (not a complete fcit state file)")
        if obj.dtype.kind not in "iuf" or obj.dtype.names is not None:
            raise self.fail(f"/{name} holds {obj.dtype}, not numbers")
        if obj.ndim != ndim:
            raise self.fail(f"/{name} has shape {obj.shape}, expected {ndim} dimension(s)")
        return np.asarray(obj[()], dtype)

    def records(self, name: str, dtype: np.dtype) -> np.ndarray:
        """A 1-D dataset of records with the fields of ``dtype``."""
        obj = self.f.get(name)
        if not isinstance(obj, h5py.Dataset):
            raise self.fail(f"missing dataset {name} (not a complete fcit state file)")
        if obj.dtype.names != dtype.names or obj.ndim != 1:
            raise self.fail(f"/{name} is not a list of {', '.join(dtype.names)} records")
        return np.asarray(obj[()]).astype(dtype)

    def integer(self, obj, key: str, where: str, default: int | None = None) -> int:
        """A scalar integer attribute."""
        v = obj.attrs.get(key, default)
        if isinstance(v, bool | np.bool_) or not isinstance(v, int | np.integer):
            raise self.fail(f"attribute {key} of {where} is {v!r}, not an integer")
        return int(v)

    def text(self, obj, key: str, where: str, default: str | None = None) -> str:
        """A string attribute (UTF-8)."""
        v = obj.attrs.get(key, default)
        if isinstance(v, bytes | np.bytes_):
            v = bytes(v).decode("utf-8")
        if not isinstance(v, str):
            raise self.fail(f"attribute {key} of {where} is {type(v).__name__}, not a string")
        return v


def read_state(run_dir: str | Path) -> RunState:
    """Read and check RUN_DIR/state.h5; StateError naming the file on anything malformed."""
    path = Path(run_dir) / STATE_FILE
    if not path.is_file():
        raise StateError(f"{path}: state file not found")
    try:
        with h5py.File(path, "r") as f:
            st = _read(_Reader(f, path))
    except StateError:
        raise
    except (OSError, KeyError, ValueError, TypeError, RuntimeError) as e:
        # h5py's own errors on a damaged file (OSError, RuntimeError), numpy's on odd data
        raise StateError(f"{path}: unreadable state file ({' '.join(str(e).split())})") from None
    return st


def _plain(v) -> str:
    """An attribute's value as written in a message (numpy scalars as plain numbers)."""
    return repr(v.item() if isinstance(v, np.generic) else v)


def _read(r: _Reader) -> RunState:
    f = r.f
    version = f.attrs.get("schema_version")
    if not isinstance(version, int | np.integer) or version not in READABLE_VERSIONS:
        raise r.fail(
            f"schema_version {_plain(version)}: this fcit reads versions "
            f"{', '.join(map(str, READABLE_VERSIONS))} (a file of another fcit)"
        )
    glob, cur, ev = r.group("global"), r.group("cursor"), r.group("eval")
    adapter = r.array("global/adapter", np.float32, 2)
    tokens = r.array("global/tokens", np.float32, 2)
    counts = r.array("global/token_counts", np.float64, 1)
    s_max = adapter.shape[0]
    if tokens.shape[0] != s_max or counts.shape != (s_max,):
        raise r.fail("/global datasets have inconsistent shapes")
    so = {}
    for k in r.group("server_opt"):
        so[k] = r.array(f"server_opt/{k}", np.float32, 2)
        if so[k].shape != adapter.shape:
            raise r.fail(f"/server_opt/{k} shape {so[k].shape} != {adapter.shape}")
    projector = r.array("global/projector", np.float32, 1, optional=True)
    mixer = r.array("global/mixer", np.float32, 1, optional=True)
    method = _migrate(r, version) if version < SCHEMA_VERSION else _read_method(r)
    accuracy = r.array("eval/accuracy", np.float64, 2)
    stages, tasks = accuracy.shape
    first_stage = r.array("eval/first_stage", np.int64, 1)
    activation = r.array("eval/activation", np.float64, 2)
    if first_stage.size not in (0, tasks):
        raise r.fail(f"/eval/first_stage has {first_stage.size} tasks, /eval/accuracy {tasks}")
    try:
        names = json.loads(r.text(ev, "task_names", "eval", "[]"))
    except (ValueError, RecursionError):
        names = None
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise r.fail("attribute task_names of eval is not a JSON list of strings")
    summary = {}
    for k, v in ev.attrs.items():
        if k == "task_names":
            continue
        if isinstance(v, bool | np.bool_) or not isinstance(v, int | float | np.number):
            raise r.fail(f"attribute {k} of eval is {v!r}, not a number")
        summary[k] = float(v)
    privacy = _read_privacy(r, stages)
    residuals = _read_residuals(r)
    stage, rnd = r.integer(cur, "stage", "cursor"), r.integer(cur, "round", "cursor")
    done, live = r.integer(cur, "done", "cursor"), r.integer(glob, "num_subspaces", "global")
    if not (0 <= stage <= stages and rnd >= -1 and done in (0, 1) and 0 <= live <= s_max):
        raise r.fail(
            f"cursor (stage {stage}, round {rnd}, done {done}) or num_subspaces {live} out of "
            f"range ({stages} stages, {s_max} subspaces)"
        )
    st = RunState(
        config_yaml=r.text(f, "config_yaml", "the file"),
        adapter=adapter,
        tokens=tokens,
        token_counts=counts,
        accuracy=accuracy,
        num_subspaces=live,
        stage=stage,
        round=rnd,
        done=bool(done),
        server_opt=so,
        rng_torch=r.array("rng/torch", np.uint8, 1),
        rounds=r.records("metrics/rounds", ROUND_DTYPE),
        clients=r.records("metrics/clients", CLIENT_DTYPE),
        task_names=names,
        first_stage=first_stage,
        activation=activation,
        summary=summary,
        projector=projector,
        mixer=mixer,
        method=method,
        privacy_norms=privacy[0],
        privacy_epsilon=privacy[1],
        privacy_clip=privacy[2],
        residuals=residuals,
    )
    if version >= 2:  # after the structure's checks, whose messages say more about an edit
        _verify_checksums(r)
    return st


def _read_method(r: _Reader) -> MethodState:
    """``/method/<name>`` (at most one method): its numeric arrays and integer counters, as
    stored; the method validates them (``Method.validate_state``)."""
    top = r.group("method", optional=True)
    if top is None:
        return MethodState()
    names = list(top)
    if len(names) != 1 or not isinstance(top[names[0]], h5py.Group):
        raise r.fail(f"/method holds {names}, expected one group named after the method")
    name = names[0]
    g = top[name]
    arrays = {}
    for k, obj in g.items():
        if not isinstance(obj, h5py.Dataset):
            raise r.fail(f"/method/{name}/{k} is not a dataset")
        arrays[k] = r.array(f"method/{name}/{k}", obj.dtype, obj.ndim)
    counters = {k: r.integer(g, k, f"method/{name}") for k in g.attrs}
    return MethodState(name, arrays, counters)


def _migrate(r: _Reader, version: int) -> MethodState:
    """The method state of a version-1 or -2 file. Version 1 held EWC's state in ``/ewc``
    (fisher, anchor float32 [P]; attrs stages) for every method, empty unless EWC consolidated a
    stage: moved to ``/method/ewc`` when not empty (an empty one is what ``EWC.init_state`` makes
    anew). Versions 1 and 2 held DISCO's DKO diagnostics in ``/dko`` (samples, task_unit,
    gate_mass): moved to ``/method/disco`` (DISCO had no other state; a file without ``/dko``,
    written before the diagnostics, gets them rebuilt from its client records)."""
    ms = _read_method(r) if version == 2 else _ewc_v1(r)
    if r.group("dko", optional=True) is None:
        return ms
    if ms.name:
        raise r.fail(f"/dko beside the state of method {ms.name!r}")
    for name in ("samples", "task_unit"):
        obj = r.f.get(f"dko/{name}")
        if isinstance(obj, h5py.Dataset) and obj.dtype.kind not in "iu":
            raise r.fail(f"/dko/{name} holds {obj.dtype}, not integers")
    arrays = {
        "samples": r.array("dko/samples", np.int64, 2),
        "task_unit": r.array("dko/task_unit", np.int64, 1),
        "gate_mass": r.array("dko/gate_mass", np.float64, 2),
    }
    return MethodState("disco", arrays)


def _ewc_v1(r: _Reader) -> MethodState:
    ewc = r.group("ewc", optional=True)
    if ewc is None:
        return MethodState()
    fisher = r.array("ewc/fisher", np.float32, 1)
    anchor = r.array("ewc/anchor", np.float32, 1)
    stages = r.integer(ewc, "stages", "ewc", 0)
    if not (fisher.size or anchor.size or stages):
        return MethodState()
    return MethodState("ewc", {"fisher": fisher, "anchor": anchor}, {"stages": stages})


def _read_privacy(r: _Reader, stages: int) -> tuple[np.ndarray, np.ndarray, float]:
    """/privacy (norms, epsilon, clip); empty when the group is absent (DP off)."""
    g = r.group("privacy", optional=True)
    if g is None:
        return np.zeros(0, NORM_DTYPE), np.zeros(0), float("nan")
    norms = r.records("privacy/norms", NORM_DTYPE)
    eps = r.array("privacy/epsilon", np.float64, 1)
    if eps.shape != (stages,):
        raise r.fail(f"/privacy/epsilon has shape {eps.shape}, expected ({stages},) (stages)")
    clip = g.attrs.get("clip")
    if isinstance(clip, bool | np.bool_) or not isinstance(clip, float | np.floating):
        raise r.fail(f"attribute clip of privacy is {clip!r}, not a number")
    if not float(clip) > 0:
        raise r.fail(f"attribute clip of privacy is {float(clip)!r}, not a bound > 0")
    return norms, eps, float(clip)


def comparable_content(run_dir: str | Path) -> dict[str, np.ndarray]:
    """Every dataset and attribute of a state file, with time/placement fields dropped — what must
    be bitwise equal between two runs of the same config (any world size, resumed or not)."""
    out: dict[str, np.ndarray] = {}
    with h5py.File(Path(run_dir) / STATE_FILE, "r") as f:

        def visit(name, obj):
            for k, v in obj.attrs.items():
                if k == CHECKSUM:  # of records holding time fields; the values are compared
                    continue
                if k == "config_yaml":  # where the run lives is not part of its content
                    v = "\n".join(x for x in str(v).splitlines() if not x.startswith("out_dir:"))
                out[f"{name}@{k}"] = np.asarray(v)
            if isinstance(obj, h5py.Dataset):
                data = obj[()]
                if data.dtype.names:
                    for fld in data.dtype.names:
                        if fld not in VOLATILE_FIELDS:
                            out[f"{name}.{fld}"] = np.asarray(data[fld])
                else:
                    out[name] = np.asarray(data)

        visit("/", f)
        f.visititems(visit)
    return out


def same_content(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> list[str]:
    """Keys whose values differ bitwise (NaN equals NaN) between two comparable_content dicts."""
    bad = sorted(set(a) ^ set(b))
    for k in set(a) & set(b):
        x, y = a[k], b[k]
        if x.dtype.kind == "f" and y.dtype.kind == "f" and x.shape == y.shape:
            xb = np.where(np.isnan(x), np.nan, x).tobytes()
            yb = np.where(np.isnan(y), np.nan, y).tobytes()
            if xb != yb or x.dtype != y.dtype:
                bad.append(k)
        elif x.shape != y.shape or x.dtype != y.dtype or x.tobytes() != y.tobytes():
            bad.append(k)
    return sorted(bad)
