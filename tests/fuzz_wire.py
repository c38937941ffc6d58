"""Fuzzing of the messages rank 0 reads from the other ranks (``fcit_hpc.fed.wire``), as the server
reads them: client updates into ``aggregate_round``, identity tokens into ``run_dko`` (DISCO's
DKO), stage-end uploads into ``merge_stage_end`` (EWC's Fisher), predictions into
``unpack_predictions``. Every input is a well-formed round of 5 clients over 1-3 ranks, then up to
four edits of what arrives at rank 0 (a rank's message is a 1-D array of the dtype rank 0
receives: MPI moves bytes, so a sender's other dtype arrives as other values): a header field set
to any value, a header or body cut or lengthened, a body value changed, a rank's message doubled,
dropped or swapped with another's. The property (tests/fuzz.py): the server's state stays finite,
or a ``WireError`` names the rank or client and the field."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from hypothesis import strategies as st

from fcit_hpc.config import load_config
from fcit_hpc.fed.server.aggregate import RoundInfo, aggregate_round
from fcit_hpc.fed.server.dko import run_dko
from fcit_hpc.fed.server.stage_end import merge_stage_end
from fcit_hpc.fed.strategies import STRATEGIES, ServerOptConfig
from fcit_hpc.fed.wire import (
    TOKEN_WIDTH,
    UPDATE_WIDTH,
    pack_predictions,
    pack_tokens,
    pack_updates,
    unpack_predictions,
    unpack_tokens,
    unpack_updates,
)
from fcit_hpc.methods.base import MATCHED, DkoDecision
from fcit_hpc.methods.disco import Disco
from fcit_hpc.methods.ewc import EWC
from fcit_hpc.state.schema import RunState

from .conftest import method_of

CLIENTS = (0, 3, 4, 7, 9)  # the round's plan
S_MAX, NUMEL, DIM = 3, 4, 2
ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Message:
    """What rank 0 received: per rank a header and a body; ``dko``: DKO decided the subspaces
    (updates), ``fed_alg``: the server optimizer (updates)."""

    kind: str
    heads: list[np.ndarray]
    bodies: list[np.ndarray]
    dko: bool = False
    fed_alg: str = "fedavg"


def _f32():
    return st.floats(width=32, allow_nan=True, allow_infinity=True)


def _header_value(float_header: bool):
    ints = st.one_of(st.integers(-3, 12), st.integers(-(2**63), 2**63 - 1))
    if not float_header:
        return ints
    odd = st.sampled_from([2.0**53, 2.0**63, -0.0, 0.5, 1e300, float("nan"), float("inf")])
    return st.one_of(ints.map(float), st.floats(allow_nan=True, allow_infinity=True), odd)


def _edits(float_header: bool, body_value):
    rank, item = st.integers(0, 5), st.integers(0, 5)
    return st.lists(
        st.one_of(
            st.tuples(st.just("field"), rank, item, st.integers(0, 6), _header_value(float_header)),
            st.tuples(st.just("header_len"), rank, st.integers(-8, 8)),
            st.tuples(st.just("body_len"), rank, st.integers(-8, 8)),
            st.tuples(st.just("body_value"), rank, st.floats(0, 1), body_value),
            st.tuples(st.just("double"), rank),
            st.tuples(st.just("drop"), rank),
            st.tuples(st.just("swap_bodies"), rank),
        ),
        max_size=4,
    )


def _resize(a: np.ndarray, n: int) -> np.ndarray:
    """Cut ``n`` < 0 values off the end, or append ``n`` copies of the last value (or ones)."""
    if n < 0:
        return a[: max(0, a.size + n)]
    fill = a[-1:] if a.size else np.ones(1, a.dtype)
    return np.concatenate([a, np.repeat(fill, n)]).astype(a.dtype)


def _apply(heads: list, bodies: list, edits, width: int) -> None:
    for e in edits:
        if not heads:
            return
        r = e[1] % len(heads)
        if e[0] == "field":
            h = heads[r]
            at = (e[2] % max(1, h.size // width)) * width + e[3] % width
            if at < h.size:
                h[at] = e[4]
        elif e[0] == "header_len":
            heads[r] = _resize(heads[r], e[2])
        elif e[0] == "body_len":
            bodies[r] = _resize(bodies[r], e[2])
        elif e[0] == "body_value" and bodies[r].size:
            b = bodies[r]
            if b.dtype == np.uint8 and isinstance(e[3], float):  # a coded payload: its float32s
                if b.size < 4:
                    continue
                b = b[: b.size // 4 * 4].view(np.float32)
            b[min(int(e[2] * b.size), b.size - 1)] = e[3]
        elif e[0] == "double":
            heads.append(heads[r].copy())
            bodies.append(bodies[r].copy())
        elif e[0] == "drop":
            del heads[r], bodies[r]
        elif e[0] == "swap_bodies":
            j = (r + 1) % len(heads)
            bodies[r], bodies[j] = bodies[j], bodies[r]


def _split(ranks: int, items: list, pack) -> tuple[list, list]:
    """Each rank's packed message: the i-th client on rank i % ranks; ``items``: (header row,
    values) per client (``pack`` takes the two lists), or what ``pack`` takes per client."""
    heads, bodies = [], []
    for r in range(ranks):
        mine = items[r::ranks]
        h, b = pack(mine) if pack is pack_predictions else pack(*_columns(mine))
        heads.append(np.array(h, copy=True))
        bodies.append(np.array(b, copy=True))
    return heads, bodies


def _columns(items: list) -> tuple[list, list]:
    return [row for row, _ in items], [v for _, v in items]


def _updates():
    def make(ranks, deltas, edits, dko, fed_alg):
        rows = [(c, c % S_MAX, 1 + c, 0.5, 0.1, 2) for c in CLIENTS]
        items = list(zip(rows, [np.asarray(d, np.float32) for d in deltas], strict=True))
        heads, bodies = _split(ranks, items, pack_updates)
        _apply(heads, bodies, edits, UPDATE_WIDTH)
        return Message("update", heads, bodies, dko, fed_alg)

    delta = st.lists(st.one_of(st.floats(-1, 1, width=32), _f32()), min_size=NUMEL, max_size=NUMEL)
    return st.builds(
        make,
        st.integers(1, 3),
        st.lists(delta, min_size=len(CLIENTS), max_size=len(CLIENTS)),
        _edits(True, _f32()),
        st.booleans(),
        st.sampled_from(sorted(STRATEGIES)),
    )


def _tokens(kind: str, size: int):
    """Identity tokens (``size`` = D) or stage-end uploads (``size`` = P values, EWC's Fisher)."""

    def make(ranks, values, edits):
        rows = [(c, 1 + c) for c in CLIENTS]
        items = list(zip(rows, [np.asarray(v, np.float32) for v in values], strict=True))
        heads, bodies = _split(ranks, items, pack_tokens)
        _apply(heads, bodies, edits, TOKEN_WIDTH)
        return Message(kind, heads, bodies)

    value = st.one_of(st.floats(0, 1, width=32), _f32())
    return st.builds(
        make,
        st.integers(1, 3),
        st.lists(
            st.lists(value, min_size=size, max_size=size),
            min_size=len(CLIENTS),
            max_size=len(CLIENTS),
        ),
        _edits(False, _f32()),
    )


def _predictions():
    text = st.text(st.characters(exclude_categories=["Cs"]), max_size=12)

    def make(ranks, texts, edits):
        items = [(c % 2, c, t) for c, t in zip(CLIENTS, texts, strict=True)]
        heads, bodies = _split(ranks, items, pack_predictions)
        _apply(heads, bodies, edits, 3)
        return Message("prediction", heads, bodies)

    texts = st.lists(text, min_size=len(CLIENTS), max_size=len(CLIENTS))
    return st.builds(make, st.integers(1, 3), texts, _edits(False, st.integers(0, 255)))


def messages():
    return st.one_of(_updates(), _tokens("token", DIM), _tokens("fisher", NUMEL), _predictions())


# --------------------------------------------------------------------------------- the server
def _cfg():
    return load_config(ROOT / "configs" / "smoke.yaml", ["method.tau=0.9"])


def _state() -> RunState:
    rng = np.random.default_rng(0)
    return RunState(
        "",
        (0.01 * rng.standard_normal((S_MAX, NUMEL))).astype(np.float32),
        np.zeros((S_MAX, DIM), np.float32),
        np.zeros(S_MAX),
        accuracy=np.zeros((1, 1)),
    )


def _finite(what: str, a: np.ndarray) -> None:
    if not np.isfinite(a).all():
        raise AssertionError(f"{what} is not finite after the message: {a}")


def read(d: Path, m: Message):
    """Rank 0 reads ``m`` as the server does; the state it changes must stay finite."""
    planned = set(CLIENTS)
    st_ = _state()
    if m.kind == "update":
        plan = np.array([[c, c, c % 3] for c in CLIENTS], np.int64)
        decisions = {c: DkoDecision(c, c % S_MAX, 0.9, MATCHED) for c in CLIENTS} if m.dko else {}
        strategy = STRATEGIES[m.fed_alg](ServerOptConfig(fed_alg=m.fed_alg))
        st_.server_opt = strategy.init_state(st_.adapter.shape)
        info = RoundInfo(0, 0, plan, decisions, token_bytes={}, bytes_down=0)
        aggregate_round(st_, unpack_updates(m.heads, m.bodies, planned=planned), strategy, info)
        _finite("the adapter", st_.adapter)
        for name, v in st_.server_opt.items():
            _finite(f"server_opt/{name}", v)
    elif m.kind == "token":
        res = run_dko(
            st_, method_of(Disco, _cfg()), unpack_tokens(m.heads, m.bodies, planned=planned)
        )
        _finite("the identity tokens", st_.tokens)
        _finite("the token counts", st_.token_counts)
        if any(not -1 <= x.subspace < S_MAX for x in res.decisions.values()):
            raise AssertionError(f"a subspace out of range: {res.decisions}")
    elif m.kind == "fisher":
        method = method_of(EWC, _cfg())
        st_.method = method.init_state(NUMEL)
        merge_stage_end(st_, method, unpack_tokens(m.heads, m.bodies, planned=planned), 0)
        _finite("the Fisher", st_.method.arrays["fisher"])
    else:
        out = unpack_predictions(m.heads, m.bodies)
        assert all(isinstance(t, str) for t in out.values())


def names_sender(msg: str, root: Path) -> bool:
    """A wire error starts with the rank or the client it is about."""
    head = msg.split(": ", 1)[0]
    return head.startswith("rank ") or " of client " in head or head.endswith(" messages")
