"""Property-based fuzzing of every reader of outside input (hypothesis).

Readers: the YAML config file (``load_config``), its ``key=value`` overrides, the config stored in a
state file (``config_from_yaml_text``), LLaVA training conversations and test questions
(``load_conversations``, ``load_test``), the release tree (``LayoutData`` and every client file it
reads) and ``state.h5`` (``read_state``: valid files corrupted, truncated, given wrong shapes,
dtypes and attributes, groups removed). The property, for every generated input: the reader returns,
or raises an ``FcitError`` whose message starts with what it is about (a file, folder or field);
no other exception, no hang (an alarm per input), no file of the input changed by reading it.

    python -m tests.fuzz --examples 10000     # the full run: the table of docs/reliability.md
    tests/test_fuzz.py                        # a short profile in `make test`
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import hashlib
import io
import json
import logging
import math
import shutil
import signal
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import seed as hypothesis_seed
from hypothesis import strategies as st

from fcit_hpc import config as config_mod
from fcit_hpc.benchmark.layout import (
    SETTING_DIRS,
    LayoutData,
    partition_dir,
    test_file,
    unit_dir,
)
from fcit_hpc.benchmark.llava_json import load_conversations, load_test
from fcit_hpc.benchmark.registry import stage_datasets
from fcit_hpc.errors import FcitError
from fcit_hpc.state.schema import (
    CLIENT_DTYPE,
    ROUND_DTYPE,
    STATE_FILE,
    MethodState,
    RunState,
    read_state,
    write_state,
)

from . import fuzz_wire

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs" / "smoke.yaml"
HANG_SECONDS = 20.0  # one input that takes longer counts as a hang


class Uncaught(AssertionError):
    """The property failed: another exception, a hang, a changed file or an unnamed error."""


class _Hang(BaseException):
    """Raised by the alarm inside a reader that runs too long (no reader catches it)."""


# --------------------------------------------------------------------------- generic values
def _scalars():
    return st.one_of(
        st.none(),
        st.booleans(),
        st.integers(min_value=-5, max_value=100),
        st.integers(min_value=-(2**80), max_value=2**80),
        st.floats(allow_nan=True, allow_infinity=True),
        st.text(max_size=12),
        st.sampled_from(["", "~", "nan", ".inf", "1e-3", "2e-4", "yes", "0x1F", "1_000", "é"]),
    )


def _values():
    return st.recursive(
        _scalars(),
        lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=6), c, max_size=4),
        max_leaves=8,
    )


# YAML and JSON that break parsers in their own ways: tags, aliases, duplicate keys, deep nesting,
# huge numbers, control characters, byte-order marks, invalid UTF-8.
_YAML_SPECIALS = [
    "!!python/object/apply:os.system ['true']",
    "a: &x [*x]",
    "seed: &a 1\nfederation: *a",
    "[" * 3000,
    "{a: " * 3000,
    "- " * 3000 + "1",
    "seed: !!binary AAAA",
    "? [1, 2]\n: 3",
    "? {a: 1}\n: 2",
    "%YAML 1.2\n---\nseed: 1",
    "seed: 1\nseed: 2",
    "--- 1\n--- 2",
    "\t",
    "\x00",
    "\ufeffseed: 1",
    "seed: " + "9" * 5000,
    "train: {lr: .nan}",
    "train: {lr: -.inf}",
    "lora: {target_modules: [[1]]}",
    "benchmark: [1, 2]",
    "debug: {kill_signal: 3}",
]
_JSON_SPECIALS = [
    "[" * 100_000,
    '[{"a": ' * 5000,
    "[" + "1" * 5000 + "]",
    "[1e99999]",
    '["\\ud800"]',
    "[NaN, Infinity]",
    "\ufeff[]",
    "",
    "null",
    "{}",
    '{"conversations": []}',
]


def _raw_bytes():
    """Text or bytes that are usually not even well-formed."""
    return st.one_of(
        st.text(max_size=200).map(lambda s: s.encode("utf-8", "surrogatepass")),
        st.binary(max_size=200),
        st.sampled_from(_YAML_SPECIALS + _JSON_SPECIALS).map(lambda s: s.encode()),
    )


# ------------------------------------------------------------------------------------ configs
def _config_fields() -> dict[str, list[str]]:
    """Top-level key → its fields (empty for a plain value such as ``seed``)."""
    out = {}
    for f in dataclasses.fields(config_mod.Config):
        has = f.default_factory is not dataclasses.MISSING
        default = f.default_factory() if has else None
        sub = dataclasses.is_dataclass(default)
        out[f.name] = [g.name for g in dataclasses.fields(default)] if sub else []
    return out


FIELDS = _config_fields()
PATHS = [f"{s}.{k}" if k else s for s, ks in FIELDS.items() for k in (ks or [""])]
# the values of every choice field (their rules read "one of a, b, c")
CHOICES = sorted(
    {
        c
        for _, want in config_mod._RULES.values()
        if want.startswith("one of ")
        for c in want.removeprefix("one of ").split(", ")
    }
)


def _config_dicts():
    """Mostly-valid configs: known sections and fields (plus a stranger) with any value."""
    value = st.one_of(_values(), st.sampled_from(CHOICES))
    section = st.dictionaries(
        st.one_of(st.sampled_from(sum(FIELDS.values(), [])), st.text(max_size=5)),
        value,
        max_size=5,
    )
    top = st.one_of(st.sampled_from(list(FIELDS)), st.text(max_size=5))
    return st.dictionaries(top, st.one_of(section, value), max_size=6)


def _typed(path: str):
    """A value of the field's own type, mostly in a plausible range (so that many configs load);
    for a plain value such as ``seed``, any integer."""
    default = config_mod.get_field(config_mod.Config(), path)
    if isinstance(default, bool):
        return st.booleans()
    if isinstance(default, int):
        return st.one_of(st.integers(0, 8), st.integers(-(2**70), 2**70))
    if isinstance(default, float):
        return st.one_of(st.floats(0.001, 1.0), st.floats(allow_nan=True, allow_infinity=True))
    if isinstance(default, str):
        return st.one_of(st.sampled_from(CHOICES), st.text(max_size=8))
    return st.lists(st.one_of(st.integers(0, 3), st.sampled_from(CHOICES)), max_size=3)


def _field_edit():
    """(field path, value): mostly a value of the field's type, sometimes anything."""
    return st.sampled_from(PATHS).flatmap(
        lambda p: st.tuples(st.just(p), st.one_of(_typed(p), _typed(p), _values()))
    )


def _smoke_variants():
    """configs/smoke.yaml with a few fields changed: configs that often load."""
    base = yaml.safe_load(SMOKE.read_text())
    edits = st.lists(_field_edit(), max_size=3)

    def apply(changes) -> dict:
        d = json.loads(json.dumps(base))
        for path, v in changes:
            *sec, key = path.split(".")
            node = d.setdefault(sec[0], {}) if sec else d
            if isinstance(node, dict):  # an earlier edit may have made the section a value
                node[key] = v
        return d

    return edits.map(apply)


def _config_texts():
    def dump(d) -> bytes:
        return yaml.safe_dump(d, allow_unicode=True).encode("utf-8", "surrogatepass")

    return st.one_of(
        _smoke_variants().map(dump),
        _config_dicts().map(dump),
        _raw_bytes(),
        st.tuples(_config_dicts(), st.sampled_from(_YAML_SPECIALS)).map(
            lambda t: dump(t[0]) + b"\n" + t[1].encode()
        ),
    )


def _overrides():
    typed = _field_edit().map(
        lambda e: f"{e[0]}={yaml.safe_dump(e[1], default_flow_style=True).strip()}"
    )
    key = st.one_of(st.sampled_from(PATHS), st.text(max_size=10))
    raw = st.one_of(
        st.sampled_from(CHOICES),
        _scalars().map(lambda v: yaml.safe_dump(v, default_flow_style=True).strip()),
        st.text(max_size=20),
        st.sampled_from(["[1, 2", "{a: 1}", "!!python/name:os.system", "&a [*a]"]),
    )
    odd = st.one_of(st.builds(lambda k, v: f"{k}={v}", key, raw), st.text(max_size=12))
    return st.lists(st.one_of(typed, typed, odd), max_size=4)


# ------------------------------------------------------------------------------ LLaVA records
_IMAGES = ["img.png", "missing.png", "", "sub/../img.png", "/no/such/file.png", "a\x00b.png"]


def _records(test: bool):
    """A list of records: well-formed ones (with odd images and ids) or anything at all."""
    image = st.one_of(st.sampled_from(_IMAGES + ["x" * 5000, "\ud800.png", "a\nb"]), _values())
    text = st.text(max_size=30)
    pair = st.tuples(text, text).map(
        lambda qa: [{"from": "human", "value": qa[0]}, {"from": "gpt", "value": qa[1]}]
    )
    turn = st.one_of(
        st.fixed_dictionaries(
            {"from": st.sampled_from(["human", "gpt", "system"]), "value": _values()}
        ),
        st.dictionaries(st.sampled_from(["from", "value", "x"]), _values(), max_size=3),
        _values(),
    )
    if test:
        good = st.fixed_dictionaries(
            {"text": text, "answer": st.one_of(text, st.lists(text), _scalars())},
            optional={"question_id": st.one_of(st.integers(), text), "image": image},
        )
        bad = st.fixed_dictionaries(
            {"text": _values(), "answer": _values()},
            optional={"question_id": _values(), "id": _values(), "image": image},
        )
    else:
        good = st.fixed_dictionaries(
            {"conversations": st.lists(pair, min_size=1, max_size=3).map(lambda p: sum(p, []))},
            optional={"id": _values(), "image": image},
        )
        bad = st.fixed_dictionaries(
            {"conversations": st.one_of(st.lists(turn, max_size=5), _values())},
            optional={"id": _values(), "image": image},
        )
    return st.lists(st.one_of(good, good, bad, _values()), max_size=5)


def _json_bytes(test: bool):
    """A JSON document: records (mostly well-formed), or broken text."""

    def dump(x) -> bytes:
        return json.dumps(x, ensure_ascii=False).encode("utf-8", "surrogatepass")

    return st.one_of(
        _records(test).map(dump),
        _records(test).map(dump).flatmap(lambda b: st.integers(0, len(b)).map(lambda n: b[:n])),
        _raw_bytes(),
    )


def _png(path: Path) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 4), (1, 2, 3)).save(path)


# ------------------------------------------------------------------------------- release tree
@dataclass
class Tree:
    """A release tree: every file well-formed, then up to two faults (kind, which, content)."""

    setting: str
    beta: float
    num_clients: int
    faults: list[tuple[str, int, bytes]]


FAULTS = [
    "no beta folder",
    "stage missing",
    "stage is a file",
    "client missing",
    "client is a folder",
    "client content",
    "extra files",
    "test missing",
    "test is a folder",
    "test content",
    "image missing",
]


def _trees():
    fault = st.tuples(
        st.sampled_from(FAULTS), st.integers(0, 100), st.one_of(_json_bytes(False), _raw_bytes())
    )
    return st.builds(
        Tree,
        st.sampled_from(sorted(SETTING_DIRS)),
        st.sampled_from([0.5, 1.0, 5.0]),
        st.integers(1, 3),
        st.lists(fault, max_size=2),
    )


def _write_tree(root: Path, t: Tree) -> None:
    stages = stage_datasets(t.setting)
    names = [n for s in stages for n in s]
    rec = {"image": "img.png"}
    conv = [
        dict(rec, conversations=[{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}])
    ]
    test = [dict(rec, question_id=0, text="q", answer="a")]
    _png(root / "datasets" / "img.png")
    clients = {}
    for u in range(len(stages)):
        for c in range(t.num_clients):
            f = unit_dir(root, t.setting, t.beta, u) / f"client_{c}.json"
            f.parent.mkdir(parents=True, exist_ok=True)
            f.write_text(json.dumps(conv))
            clients[u, c] = f
    for n in names:
        f = test_file(root, n)
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(json.dumps(test))
    cl, units = sorted(clients), len(stages)
    for kind, i, content in t.faults:
        client, unit, tfile = (
            clients[cl[i % len(cl)]],
            i % units,
            test_file(root, names[i % len(names)]),
        )
        udir = unit_dir(root, t.setting, t.beta, unit)
        if kind == "no beta folder":
            part = partition_dir(root, t.setting, t.beta)
            if part.is_dir():
                part.rename(part.with_name("9.0"))
        elif kind in ("stage missing", "stage is a file") and udir.is_dir():
            shutil.rmtree(udir)
            if kind == "stage is a file":
                udir.write_bytes(content)
        elif kind.startswith("client") and client.parent.is_dir():
            shutil.rmtree(client) if client.is_dir() else client.unlink(missing_ok=True)
            if kind == "client is a folder":
                client.mkdir()
            elif kind == "client content":
                client.write_bytes(content)
        elif kind == "extra files" and udir.is_dir():
            for name in ("client_01.json", f"client_{t.num_clients + 5}.json", "client_x.json"):
                (udir / name).write_bytes(content)
        elif kind.startswith("test"):
            shutil.rmtree(tfile) if tfile.is_dir() else tfile.unlink(missing_ok=True)
            if kind == "test is a folder":
                tfile.mkdir()
            elif kind == "test content":
                tfile.write_bytes(content)
        elif kind == "image missing":
            (root / "datasets" / "img.png").unlink(missing_ok=True)


# ---------------------------------------------------------------------------------- state.h5
def _states():
    def make(s, p, d, stages, tasks, n_rounds, opt, ewc, proj, cursor, dko):
        rng = np.random.default_rng(s * 1000 + p)
        st_ = RunState(
            config_yaml=SMOKE.read_text(),
            adapter=rng.standard_normal((s, p)).astype(np.float32),
            tokens=rng.standard_normal((s, d)).astype(np.float32),
            token_counts=rng.random(s),
            accuracy=np.full((stages, tasks), np.nan),
            num_subspaces=min(s, cursor[0] + 1),
            stage=min(cursor[0], stages),
            round=cursor[1],
            server_opt={k: np.zeros((s, p), np.float32) for k in opt},
            rng_torch=rng.integers(0, 255, 16).astype(np.uint8),
            task_names=[f"t{i}" for i in range(tasks)],
            first_stage=np.zeros(tasks, np.int64),
            activation=np.zeros((tasks, s)),
            summary={"last": 1.0},
            method=MethodState("ewc", {"fisher": np.ones(p, np.float32)}, {"stages": 1})
            if ewc
            else MethodState(),
            projector=np.ones(proj, np.float32),
        )
        st_.append_metrics(np.zeros(n_rounds, ROUND_DTYPE), np.zeros(2 * n_rounds, CLIENT_DTYPE))
        if dko and not ewc:  # DISCO's DKO diagnostics, its own state
            arrays = {
                "samples": rng.integers(0, 9, (s, stages)).astype(np.int64),
                "task_unit": np.arange(tasks, dtype=np.int64) % stages,
                "gate_mass": np.full((stages, tasks), np.nan),
            }
            st_.method = MethodState("disco", arrays)
        return st_

    return st.builds(
        make,
        st.integers(1, 3),
        st.integers(1, 6),
        st.integers(1, 3),
        st.integers(1, 3),
        st.integers(1, 3),
        st.integers(0, 3),
        st.sampled_from([(), ("m",), ("m", "v")]),
        st.booleans(),
        st.sampled_from([0, 3]),
        st.tuples(st.integers(0, 3), st.integers(-1, 2)),
        st.booleans(),
    )


STATE_PATHS = [
    "cursor",
    "global",
    "global/adapter",
    "global/tokens",
    "global/token_counts",
    "global/projector",
    "server_opt",
    "server_opt/m",
    "rng",
    "rng/torch",
    "metrics",
    "metrics/rounds",
    "metrics/clients",
    "eval",
    "eval/accuracy",
    "eval/first_stage",
    "eval/activation",
    "method",
    "method/ewc",
    "method/ewc/fisher",
    "method/disco",
    "method/disco/samples",
    "method/disco/task_unit",
    "method/disco/gate_mass",
]
STATE_ATTRS = [
    ("/", "schema_version"),
    ("/", "config_yaml"),
    ("cursor", "stage"),
    ("cursor", "round"),
    ("cursor", "done"),
    ("global", "num_subspaces"),
    ("eval", "task_names"),
    ("eval", "last"),
    ("method/ewc", "stages"),
]


def _arrays():
    """Replacement datasets: numbers of any shape and dtype, strings, records, scalars."""
    shapes = st.lists(st.integers(0, 4), min_size=0, max_size=3).map(tuple)
    num = st.builds(
        lambda shape, dt: np.ones(shape, dt),
        shapes,
        st.sampled_from(["f4", "f8", "i4", "i8", "u1", "f2", "b1", "c8"]),
    )
    return st.one_of(
        num,
        st.just(np.array([b"abc", b"d"])),
        st.just(np.zeros(2, [("x", "f8")])),
        st.just(np.zeros(3, ROUND_DTYPE)),
        st.just(np.zeros(1, CLIENT_DTYPE)),
        st.just(np.float64(3.5)),
        st.just("group"),
    )


def _attr_values():
    """Attribute values of other types (HDF5 strings hold no NUL)."""
    return st.one_of(
        st.integers(-(2**62), 2**62),
        st.floats(allow_nan=True, allow_infinity=True),
        st.text(st.characters(exclude_characters="\x00"), max_size=30),
        st.sampled_from(["[1, 2]", '["a", 1]', "{", "[[[", "null", '"x"', "seed: [", "2"]),
        st.just(np.arange(3)),
        st.just(np.bytes_(b"\xff\xfe")),
        st.binary(min_size=1, max_size=8).map(np.void),
    )


def _mutations():
    return st.lists(
        st.one_of(
            st.tuples(st.just("truncate"), st.floats(0, 1)),
            st.tuples(st.just("flip"), st.lists(st.tuples(st.floats(0, 1), st.integers(0, 255)))),
            st.tuples(st.just("delete"), st.sampled_from(STATE_PATHS)),
            st.tuples(st.just("replace"), st.sampled_from(STATE_PATHS), _arrays()),
            st.tuples(st.just("attr"), st.sampled_from(STATE_ATTRS), _attr_values()),
            st.tuples(st.just("drop_attr"), st.sampled_from(STATE_ATTRS)),
            st.tuples(st.just("garbage"), st.binary(max_size=300)),
            # one byte inside a dataset's values (the checksums' case; issue 26)
            st.tuples(st.just("value"), st.sampled_from(STATE_PATHS), st.floats(0, 1)),
        ),
        max_size=3,
    )


def _mutate(path: Path, muts) -> None:
    for m in muts:
        kind = m[0]
        data = path.read_bytes()
        if kind == "truncate":
            path.write_bytes(data[: int(m[1] * len(data))])
        elif kind == "flip":
            buf = bytearray(data)
            for frac, byte in m[1]:
                if buf:
                    buf[min(int(frac * len(buf)), len(buf) - 1)] = byte
            path.write_bytes(bytes(buf))
        elif kind == "garbage":
            path.write_bytes(m[1])
        elif kind == "value":
            _flip_value(path, m[1], m[2])
        else:
            try:  # an earlier mutation may have left no HDF5 file to edit, or one too damaged
                with h5py.File(path, "a") as f:
                    _edit(f, m)
            except (OSError, KeyError, ValueError, RuntimeError):
                continue


def _flip_value(path: Path, name: str, frac: float) -> None:
    """Invert one byte inside the values of dataset ``name`` (contiguous, non-empty), in place."""
    try:
        with h5py.File(path, "r") as f:
            obj = f.get(name)
            if not isinstance(obj, h5py.Dataset) or obj.id.get_offset() is None or not obj.nbytes:
                return
            at = obj.id.get_offset() + min(int(frac * obj.nbytes), obj.nbytes - 1)
    except (OSError, KeyError, ValueError, RuntimeError):
        return
    with open(path, "r+b") as fh:
        fh.seek(at)
        b = fh.read(1)
        if b:
            fh.seek(at)
            fh.write(bytes([b[0] ^ 0xFF]))


def _edit(f: h5py.File, m) -> None:
    kind = m[0]
    if kind in ("delete", "replace"):
        if m[1] in f:
            del f[m[1]]
        if kind == "replace":
            parent = f.require_group(m[1].rsplit("/", 1)[0]) if "/" in m[1] else f
            name = m[1].rsplit("/", 1)[-1]
            if isinstance(parent, h5py.Group) and name not in parent:
                if isinstance(m[2], str):
                    parent.create_group(name)
                else:
                    parent.create_dataset(name, data=m[2])
    else:
        (obj, key) = m[1]
        if obj != "/" and obj not in f:
            return
        attrs = f[obj].attrs
        if kind == "drop_attr":
            if key in attrs:
                del attrs[key]
        else:
            attrs[key] = m[2]


# ----------------------------------------------------------------------------------- targets
def _snapshot(root: Path) -> dict[str, str]:
    """Every file under ``root`` (a symlink or folder by its kind) → sha256 of its bytes."""
    out = {}
    for p in sorted(root.rglob("*")):
        out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
    return out


def _names_path(msg: str, root: Path) -> bool:
    """The message names a path under the input's folder."""
    return str(root) in msg


def _names_field(msg: str, root: Path) -> bool:
    """The message starts with a field, an override or the config file."""
    return bool(msg.split(": ", 1)[0].strip()) and ": " in msg


@dataclass
class Target:
    """A reader and its inputs: ``lay`` writes one input into a fresh folder (what an existing run
    or data set would hold), ``read`` reads it with the project's reader."""

    name: str
    strategy: Callable[[], st.SearchStrategy]
    lay: Callable[[Path, object], object]
    read: Callable[[Path, object], object]
    names: Callable[[str, Path], bool] = _names_path  # does an error's message name the input?
    weight: float = 1.0  # its share of the inputs, relative to the others
    setup: Callable[[], object] | None = None  # one-off work before the first input (untimed)


def _lay_nothing(d: Path, x) -> None:
    pass


def _lay_config(d: Path, text: bytes) -> None:
    (d / "config.yaml").write_bytes(text)


def _lay_llava(d: Path, x) -> None:
    _png(d / "img.png")
    (d / "records.json").write_bytes(x[0])


def _lay_state(d: Path, x) -> None:
    state, muts = x
    write_state(d, state)
    _mutate(d / STATE_FILE, muts)


def _run_dir_configs():
    """config.yaml beside a state: absent, empty, the run's own, edited, or any config text."""
    smoke = SMOKE.read_bytes()
    return st.one_of(
        st.none(),
        st.just(b""),
        st.just(smoke),
        st.just(smoke.replace(b"seed: 0", b"seed: 7")),
        _config_texts(),
    )


def _lay_run_dir(d: Path, x) -> None:
    state, muts, config = x
    if state is not None:
        _lay_state(d, (state, muts))
    if config is not None:
        (d / "config.yaml").write_bytes(config)


def _resume(d: Path, x):
    """What ``fcit run --resume D`` resolves (no run started: resolving writes nothing)."""
    from argparse import Namespace

    from fcit_hpc.cli import resolve_run

    args = Namespace(resume=str(d), config=None, overrides=[], cont=False, out=None)
    args.accept_config = False
    return resolve_run(args)


def _read_tree(d: Path, t: Tree):
    stages = stage_datasets(t.setting)
    data = LayoutData(d, stages, t.setting, t.beta, num_clients=t.num_clients)
    for u in range(len(stages)):
        for c in range(data.num_clients):
            data.client_samples(u, c)


def _stored_config(d: Path, text: bytes):
    return config_mod.config_from_yaml_text(text.decode("utf-8", "surrogateescape"))


def _read_state(d: Path, x):
    """``read_state``, then the run's method validates its own state (as the server does)."""
    from fcit_hpc.cli import stored_config
    from fcit_hpc.fed.server.run_state import init_method_state
    from fcit_hpc.methods import make_method

    state = read_state(d)
    stored = stored_config(state, d / STATE_FILE)
    method = make_method(stored.method, stored.lora)
    numel = state.adapter.shape[1]
    init_method_state(state, method, numel)
    method.validate_state(state.method, numel, d / STATE_FILE)
    return state


_CHECKPOINT: list[RunState] = []  # a smoke run's state as the server makes it, made once


def _smoke_checkpoint() -> RunState:
    """A state of the smoke config that fits its model (what `fcit export` can export)."""
    if not _CHECKPOINT:
        import torch

        from fcit_hpc.fed.server import init_state
        from fcit_hpc.fed.strategies import strategy_from_config
        from fcit_hpc.methods import make_method
        from fcit_hpc.model.build import build_model

        cfg = config_mod.load_config(SMOKE)
        method = make_method(cfg.method, cfg.lora)
        _, adapter, _ = build_model(cfg.model, cfg.lora, method.num_slots())
        strategy = strategy_from_config(cfg.federation)
        st_ = init_state(
            adapter,
            method,
            seed=cfg.seed,
            config_yaml=config_mod.to_yaml(cfg),
            dim=8,
            shape=(2, 4),
            strategy=strategy,
        )
        g = torch.Generator().manual_seed(0)
        st_.adapter = (0.05 * torch.randn(st_.adapter.shape, generator=g)).numpy()
        st_.num_subspaces = 2
        _CHECKPOINT.append(st_)
    return copy.deepcopy(_CHECKPOINT[0])


def _checkpoints():
    """(a state: the smoke run's or a generated one, its file's mutations, ``--alpha``)."""
    alpha = st.one_of(
        st.none(),
        st.sampled_from(["1,0", "0.5,0.5", "nan,1", "1,2,3", "1e39,0", "", ",", "1;2", "-0,1"]),
        st.lists(st.floats(allow_nan=True, allow_infinity=True), max_size=4).map(
            lambda v: ",".join(map(str, v))
        ),
        st.text(max_size=10),
    )
    state = st.one_of(st.none(), st.none(), _states())
    return st.tuples(state, _mutations(), alpha)


def _lay_checkpoint(d: Path, x) -> None:
    _lay_state(d, (x[0] if x[0] is not None else _smoke_checkpoint(), x[1]))


def _export(d: Path, x):
    """``fcit export D --out D-export [--alpha A]`` (the output beside the input's folder)."""
    from argparse import Namespace

    from fcit_hpc.cli import cmd_export

    out = d.with_name(f"{d.name}-export")
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # the folders it wrote
            return cmd_export(Namespace(run_dir=str(d), out=str(out), alpha=x[2]))
    finally:
        shutil.rmtree(out, ignore_errors=True)


def _checkpoint_setup() -> None:
    """The smoke state, and the imports of the first export (peft, transformers' writers)."""
    import peft  # noqa: F401

    import fcit_hpc.cli  # noqa: F401
    import fcit_hpc.model.export  # noqa: F401

    _smoke_checkpoint()


def _names_path_or_option(msg: str, root: Path) -> bool:
    return _names_path(msg, root) or msg.startswith(("--alpha: ", "--out: "))


TARGETS = [
    Target(
        "config file",
        _config_texts,
        _lay_config,
        lambda d, x: config_mod.load_config(d / "config.yaml"),
        names=_names_field,
    ),
    Target(
        "config overrides",
        _overrides,
        _lay_nothing,
        lambda d, items: config_mod.load_config(SMOKE, items),
        names=_names_field,
    ),
    Target("stored config", _config_texts, _lay_nothing, _stored_config, names=_names_field),
    Target(
        "LLaVA conversations",
        lambda: st.tuples(_json_bytes(False), st.booleans()),
        _lay_llava,
        lambda d, x: load_conversations(d / "records.json", 0, d, check_images=x[1]),
    ),
    Target(
        "LLaVA test file",
        lambda: st.tuples(_json_bytes(True), st.booleans()),
        _lay_llava,
        lambda d, x: load_test(d / "records.json", 0, d, check_images=x[1]),
    ),
    Target("release tree", _trees, _write_tree, _read_tree),
    Target("state.h5", lambda: st.tuples(_states(), _mutations()), _lay_state, _read_state),
    Target(
        "run directory (--resume)",
        lambda: st.tuples(st.one_of(st.none(), _states()), _mutations(), _run_dir_configs()),
        _lay_run_dir,
        _resume,
    ),
    Target(
        "checkpoint (fcit export)",
        _checkpoints,
        _lay_checkpoint,
        _export,
        names=_names_path_or_option,
        weight=0.5,
        setup=_checkpoint_setup,
    ),
    Target(
        "messages on the wire",
        fuzz_wire.messages,
        _lay_nothing,
        fuzz_wire.read,
        names=fuzz_wire.names_sender,
        weight=2.0,
    ),
]


def _on_alarm(signum, frame):
    raise _Hang()


def check(target: Target, base: Path, x, counts: Counter) -> None:
    """One input: lay it down in a fresh folder, read it, classify the outcome into ``counts``;
    raises Uncaught when the property does not hold."""
    counts["inputs"] += 1
    d = base / f"in{counts['inputs']}"
    d.mkdir()
    try:
        target.lay(d, x)
        before = _snapshot(d)
        old = signal.signal(signal.SIGALRM, _on_alarm)
        signal.setitimer(signal.ITIMER_REAL, HANG_SECONDS)
        try:
            target.read(d, x)
            counts["loaded"] += 1
        except FcitError as e:
            msg = str(e)
            if not target.names(msg, d):
                raise Uncaught(f"{type(e).__name__} does not name its input: {msg!r}") from e
            counts[type(e).__name__] += 1
        except _Hang:
            raise Uncaught(f"no answer within {HANG_SECONDS} s (a hang)") from None
        except Exception as e:
            raise Uncaught(f"uncaught {type(e).__name__}: {e}") from e
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, old)
        if _snapshot(d) != before:
            raise Uncaught("reading changed a file of the input")
    finally:
        shutil.rmtree(d, ignore_errors=True)


def run_target(
    target: Target, examples: int, seed: int | None = None, deadline_ms: float | None = None
) -> Counter:
    """Fuzz one reader with ``examples`` generated inputs; returns the outcome counts. Raises
    (hypothesis's shrunk counterexample) when the property fails."""
    counts: Counter = Counter()
    logging.getLogger("fcit").setLevel(logging.ERROR)  # rejected updates are logged as warnings
    if target.setup is not None:
        target.setup()
    with tempfile.TemporaryDirectory(prefix="fcit-fuzz-") as tmp:
        base = Path(tmp)

        @settings(
            max_examples=examples,
            deadline=deadline_ms,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        @given(target.strategy())
        def prop(x):
            check(target, base, x, counts)

        if seed is not None:
            prop = hypothesis_seed(seed)(prop)
        prop()
    return counts


KINDS = ["loaded", "ConfigError", "DataError", "StateError", "WireError"]


def table(rows: list[tuple[str, Counter, float]]) -> str:
    """Markdown table: inputs tried, loaded, errors by kind, uncaught, seconds per reader."""
    head = "| reader | inputs | " + " | ".join(KINDS) + " | uncaught | seconds |"
    lines = [head, "|" + "---|" * (len(KINDS) + 4)]
    total: Counter = Counter()
    for name, c, sec in rows:
        total.update(c)
        cells = " | ".join(str(c[k]) for k in KINDS)
        lines.append(f"| {name} | {c['inputs']} | {cells} | 0 | {sec:.1f} |")
    cells = " | ".join(str(total[k]) for k in KINDS)
    secs = sum(r[2] for r in rows)
    lines.append(f"| **all** | {total['inputs']} | {cells} | 0 | {secs:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.fuzz", description=__doc__.split("\n")[0])
    ap.add_argument("--examples", type=int, default=10_000, help="inputs in all (split evenly)")
    ap.add_argument("--seed", type=int, default=0, help="hypothesis seed (reproducible run)")
    ap.add_argument("--only", help="fuzz only the readers whose name contains this")
    args = ap.parse_args(argv)
    targets = [t for t in TARGETS if not args.only or args.only in t.name]
    weights = sum(t.weight for t in targets)
    rows = []
    for i, t in enumerate(targets):
        t0 = time.perf_counter()
        try:
            counts = run_target(t, math.ceil(args.examples * t.weight / weights), args.seed + i)
        except Exception as e:  # the property failed: each failure with its (shrunk) input
            for err in getattr(e, "exceptions", [e]):
                print(f"{t.name}: FAILED: {err}", file=sys.stderr)
                for note in getattr(err, "__notes__", []):
                    print(f"    {note}", file=sys.stderr)
            return 1
        rows.append((t.name, counts, time.perf_counter() - t0))
        print(f"{t.name}: {counts['inputs']} inputs, 0 uncaught", file=sys.stderr, flush=True)
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
