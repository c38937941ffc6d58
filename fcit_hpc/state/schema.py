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
    /ewc/fisher              float32 [P]          EWC: summed diagonal Fisher of the stages so far
    /ewc/anchor              float32 [P]          EWC: the adapter at the end of the last stage
    /ewc                     attrs: stages (stages consolidated); empty datasets for other methods

No pickle: every value is a typed numeric array or a UTF-8 string attribute.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from enum import IntEnum
from pathlib import Path

import h5py
import numpy as np

from fcit_hpc.errors import StateError

SCHEMA_VERSION = 1
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


class ClientStatus(IntEnum):
    """What the server did with a client's round (stored as ``/clients.status``)."""

    ACCEPTED = 0
    NON_FINITE = 1  # update rejected: contains NaN/Inf
    WRONG_SHAPE = 2  # update rejected: not the subspace's size
    BAD_TOKEN = 3  # identity token rejected, the client trained nothing


STATUS = {
    ClientStatus.ACCEPTED: "accepted",
    ClientStatus.NON_FINITE: "rejected: non-finite update",
    ClientStatus.WRONG_SHAPE: "rejected: wrong shape",
    ClientStatus.BAD_TOKEN: "rejected: bad identity token",
}
# Fields that measure time or placement, not the federated computation.
VOLATILE_FIELDS = {"seconds", "rank"}


@dataclass
class RunState:
    config_yaml: str
    adapter: np.ndarray  # float32 [S_max, P]
    tokens: np.ndarray  # float32 [S_max, D]
    token_counts: np.ndarray  # float64 [S_max]
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
    ewc_fisher: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    ewc_anchor: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    ewc_stages: int = 0
    projector: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    mixer: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))

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
    """Write ``st`` to RUN_DIR/state.h5 atomically: temp file, fsync, os.replace, fsync dir."""
    run_dir = Path(run_dir)
    final = run_dir / STATE_FILE
    tmp = run_dir / f".{STATE_FILE}.tmp"
    with h5py.File(tmp, "w") as f:
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
        ew = f.create_group("ewc")
        ew.attrs["stages"] = st.ewc_stages
        ew.create_dataset("fisher", data=np.asarray(st.ewc_fisher, np.float32))
        ew.create_dataset("anchor", data=np.asarray(st.ewc_anchor, np.float32))
    with open(tmp, "rb+") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, final)
    _fsync_dir(run_dir)
    return final


def _need(f: h5py.File, path: str, path_file: Path):
    if path not in f:
        raise StateError(f"{path_file}: missing dataset {path} (not a complete fcit state file)")
    return f[path]


def read_state(run_dir: str | Path) -> RunState:
    """Read and check RUN_DIR/state.h5; StateError naming the file on anything malformed."""
    path = Path(run_dir) / STATE_FILE
    if not path.is_file():
        raise StateError(f"{path}: state file not found")
    try:
        with h5py.File(path, "r") as f:
            if f.attrs.get("schema_version") != SCHEMA_VERSION:
                raise StateError(
                    f"{path}: schema_version {f.attrs.get('schema_version')!r}, "
                    f"expected {SCHEMA_VERSION}"
                )
            adapter = np.asarray(_need(f, "global/adapter", path)[()], np.float32)
            tokens = np.asarray(_need(f, "global/tokens", path)[()], np.float32)
            counts = np.asarray(_need(f, "global/token_counts", path)[()], np.float64)
            if adapter.ndim != 2 or tokens.ndim != 2 or counts.shape != (adapter.shape[0],):
                raise StateError(f"{path}: /global datasets have inconsistent shapes")
            so = {k: np.asarray(v[()], np.float32) for k, v in _need(f, "server_opt", path).items()}
            for k, v in so.items():
                if v.shape != adapter.shape:
                    raise StateError(f"{path}: /server_opt/{k} shape {v.shape} != {adapter.shape}")
            proj = f["global"].get("projector")
            projector = np.asarray(proj[()] if proj is not None else [], np.float32)
            if projector.ndim != 1:
                raise StateError(f"{path}: /global/projector must be a flat vector")
            mix = f["global"].get("mixer")
            mixer = np.asarray(mix[()] if mix is not None else [], np.float32)
            if mixer.ndim != 1:
                raise StateError(f"{path}: /global/mixer must be a flat vector")
            cur = _need(f, "cursor", path).attrs
            ewc = f.get("ewc")
            fisher = np.asarray(ewc["fisher"][()] if ewc else [], np.float32)
            anchor = np.asarray(ewc["anchor"][()] if ewc else [], np.float32)
            if fisher.shape != anchor.shape or fisher.size not in (0, adapter.shape[1]):
                raise StateError(f"{path}: /ewc datasets do not fit /global/adapter")
            st = RunState(
                config_yaml=str(f.attrs["config_yaml"]),
                adapter=adapter,
                tokens=tokens,
                token_counts=counts,
                accuracy=np.asarray(_need(f, "eval/accuracy", path)[()], np.float64),
                num_subspaces=int(f["global"].attrs["num_subspaces"]),
                stage=int(cur["stage"]),
                round=int(cur["round"]),
                done=bool(cur["done"]),
                server_opt=so,
                rng_torch=np.asarray(_need(f, "rng/torch", path)[()], np.uint8),
                rounds=np.asarray(_need(f, "metrics/rounds", path)[()]).astype(ROUND_DTYPE),
                clients=np.asarray(_need(f, "metrics/clients", path)[()]).astype(CLIENT_DTYPE),
                task_names=json.loads(str(f["eval"].attrs.get("task_names", "[]"))),
                first_stage=np.asarray(_need(f, "eval/first_stage", path)[()], np.int64),
                activation=np.asarray(_need(f, "eval/activation", path)[()], np.float64),
                summary={k: float(v) for k, v in f["eval"].attrs.items() if k != "task_names"},
                ewc_fisher=fisher,
                ewc_anchor=anchor,
                ewc_stages=int(ewc.attrs["stages"]) if ewc else 0,
                projector=projector,
                mixer=mixer,
            )
    except StateError:
        raise
    except (OSError, KeyError, ValueError, TypeError) as e:
        raise StateError(f"{path}: unreadable state file ({' '.join(str(e).split())})") from None
    return st


def comparable_content(run_dir: str | Path) -> dict[str, np.ndarray]:
    """Every dataset and attribute of a state file, with time/placement fields dropped — what must
    be bitwise equal between two runs of the same config (any world size, resumed or not)."""
    out: dict[str, np.ndarray] = {}
    with h5py.File(Path(run_dir) / STATE_FILE, "r") as f:

        def visit(name, obj):
            for k, v in obj.attrs.items():
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
