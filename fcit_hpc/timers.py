"""Phase timers: where a run's wall time goes, per rank, without a profiler (docs/phases.md).

Every rank (an MPI process, or a thread of an in-process ``ThreadComm`` world) has its own
:class:`PhaseTimer`. Code marks its work with ``with phase("train"): ...``; the time is
*exclusive*: a phase nested in another (``autotune`` inside ``eval_decode``) is taken out of its
parent, so the phases of a rank add up to the time they cover. The federated loop takes the
accumulated seconds at every round and evaluation (:func:`take`), gathers them to rank 0 and
writes their sum and maximum over the ranks to ``metrics.jsonl``.

This module imports nothing of fcit_hpc (level 0 of the layout) and torch only when asked to
synchronise, so the kernels (``fcit_kernels``) can use it: ``from fcit_hpc.timers import phase``
and ``with phase("autotune"): ...`` around a compile-and-time step.

Timing is ``time.perf_counter`` (exact on the CPU). On a GPU, kernels run asynchronously: a phase
ends when its launches are queued unless :func:`set_sync` turned on ``torch.cuda.synchronize()``
at every phase end (config ``train.sync_timers``; off by default, no sync is added to the hot
path). Overhead: two ``perf_counter`` calls and a dict update per phase (< 1 µs).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np

# The phases, in report order (each a rank's exclusive seconds):
PHASES: tuple[str, ...] = (
    "startup",  # build the run: model, data, encoder, trainer, state (once per process)
    "setup",  # a client's set-up: its batches, the trainer session (DeepSpeed engine)
    "train",  # local training steps of the clients
    "identity",  # identity features: the clients' tokens (DKO), the test samples' (SSA gate)
    "comm",  # broadcasts and gathers of the round (waiting for the slowest rank included)
    "aggregate",  # the server: validation, aggregation, the strategy's update
    "dko",  # the server: DKO's matching of the identity tokens (identity methods)
    "stage_end",  # the method's stage-end upload (EWC's Fisher) and merge
    "eval_prefill",  # evaluation: generation up to each batch's first new token
    "eval_decode",  # evaluation: the remaining generated tokens
    "score",  # evaluation: each dataset's scorer on rank 0 (METEOR's Java start included)
    "eval",  # evaluation's rest: the SSA gate, predictions' gather, diagnostics
    "autotune",  # kernel compilation and autotuning (the kernels add it)
    "state_write",  # state.h5 (atomic write) and the predictions file
    "report",  # the end of the run: summary metrics, report.md, plots
)
INDEX = {name: i for i, name in enumerate(PHASES)}
# counters beside the seconds (not times): generated tokens, split as prefill/decode positions
COUNTERS: tuple[str, ...] = ("prefill_tokens", "decode_tokens")
# gauges beside them (per rank, not summed): the process's peak resident memory so far and its
# resident memory now, MiB
GAUGES: tuple[str, ...] = ("peak_rss_mib", "rss_mib")


def memory_mib() -> tuple[float, float]:
    """(peak, current) resident set size of this process, MiB: ``VmHWM`` and ``VmRSS`` of
    /proc/self/status on Linux (the process's own; ``getrusage``'s ru_maxrss also carries the
    peak of the process it was forked from, e.g. a test runner); elsewhere ru_maxrss for both.
    The ranks of an in-process world share one process."""
    import re
    import resource
    import sys

    try:
        with open("/proc/self/status") as f:
            text = f.read()
        got = [re.search(rf"{k}:\s+(\d+) kB", text) for k in ("VmHWM", "VmRSS")]
        if all(got):
            return int(got[0].group(1)) / 1024, int(got[1].group(1)) / 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB (bytes on macOS)
    peak = peak / (1 << 20) if sys.platform == "darwin" else peak / 1024
    return peak, peak


class PhaseTimer:
    """One rank's phase seconds since the last :meth:`take` (float64 [len(PHASES)]) and counters."""

    def __init__(self) -> None:
        self.seconds = np.zeros(len(PHASES))
        self.counts = np.zeros(len(COUNTERS))
        self._stack: list[list[float]] = []  # per open phase: [start, seconds of its children]
        self.sync = False
        self.mark = time.perf_counter()  # the last take (or reset): the wall clock of a record

    def reset(self) -> None:
        """Start afresh (a new run in this process): zero everything, wall clock from now."""
        self.seconds[:] = 0.0
        self.counts[:] = 0.0
        self.mark = time.perf_counter()

    def _now(self) -> float:
        if self.sync:
            import torch

            if torch.cuda.is_available() and torch.cuda.is_initialized():
                torch.cuda.synchronize()
        return time.perf_counter()

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Time the block as ``name`` (exclusive of phases nested in it)."""
        i = INDEX[name]
        frame = [self._now(), 0.0]
        self._stack.append(frame)
        try:
            yield
        finally:
            self._stack.pop()
            spent = self._now() - frame[0]
            self.seconds[i] += spent - frame[1]
            if self._stack:
                self._stack[-1][1] += spent

    def carve(self, name: str, seconds: float) -> None:
        """Attribute ``seconds`` of the innermost open phase to ``name`` instead (a split measured
        inside it: a client's set-up within its training, prefill within evaluation)."""
        self.seconds[INDEX[name]] += seconds
        if self._stack:
            self._stack[-1][1] += seconds

    def count(self, name: str, n: float) -> None:
        self.counts[COUNTERS.index(name)] += n

    def take(self) -> np.ndarray:
        """float64 [len(PHASES) + len(COUNTERS) + len(GAUGES) + 1]: the seconds and counters
        since the last take, the gauges now, then the wall time since the last take; then
        zeroed (open phases count at their end)."""
        now = time.perf_counter()
        out = np.concatenate([self.seconds, self.counts, memory_mib(), [now - self.mark]])
        self.seconds[:] = 0.0
        self.counts[:] = 0.0
        self.mark = now
        return out


_LOCAL = threading.local()


def timer() -> PhaseTimer:
    """This rank's (this thread's) timer."""
    t = getattr(_LOCAL, "timer", None)
    if t is None:
        t = _LOCAL.timer = PhaseTimer()
    return t


def phase(name: str):
    """``with phase("autotune"): ...``: time a block on this rank's timer."""
    return timer().phase(name)


def set_sync(on: bool) -> None:
    """Synchronise the GPU at every phase start and end (exact device times; slower)."""
    timer().sync = bool(on)


def take() -> np.ndarray:
    return timer().take()


def reset(sync: bool = False) -> None:
    """A new run starts on this rank: zero the timer; ``sync``: see :func:`set_sync`."""
    t = timer()
    t.reset()
    t.sync = bool(sync)


def combine(earlier: np.ndarray, later: np.ndarray) -> np.ndarray:
    """Two successive :func:`take` vectors of one rank as one: seconds, counters and wall added,
    the gauges of the later one (memory is a level, not an amount)."""
    out = np.asarray(earlier, np.float64) + np.asarray(later, np.float64)
    g = len(PHASES) + len(COUNTERS)
    out[g : g + len(GAUGES)] = np.asarray(later, np.float64)[g : g + len(GAUGES)]
    return out


def reduce_ranks(per_rank: list[np.ndarray]) -> dict:
    """The ``phases`` entry of a metrics line from every rank's :func:`take` vector (rank order):
    per phase with time, ``{"sum": s, "max": m}`` over the ranks (seconds, 4 decimals); counters
    summed; gauges (``peak_rss_mib``, ``rss_mib``) as a list, one value per rank; ``wall``:
    rank 0's wall time since its previous record."""
    m = np.stack([np.asarray(v, np.float64) for v in per_rank])  # [ranks, take()]
    out: dict = {"wall": round(float(m[0, -1]), 4)}
    for i, name in enumerate(PHASES):
        col = m[:, i]
        if col.any():
            out[name] = {"sum": round(float(col.sum()), 4), "max": round(float(col.max()), 4)}
    for j, name in enumerate(COUNTERS):
        n = float(m[:, len(PHASES) + j].sum())
        if n:
            out[name] = int(n)
    for j, name in enumerate(GAUGES):  # one value per rank, rank order
        out[name] = [round(float(x), 1) for x in m[:, len(PHASES) + len(COUNTERS) + j]]
    return out


def totals(records: list[dict]) -> dict[str, dict[str, float]]:
    """Per phase, ``sum`` and ``max`` added up over metrics-line ``phases`` entries (``max``: the
    sum of the per-record maxima, the time the slowest rank spent, record by record)."""
    out: dict[str, dict[str, float]] = {}
    for rec in records:
        if not rec:
            continue
        for name, v in rec.items():
            if isinstance(v, dict):
                t = out.setdefault(name, {"sum": 0.0, "max": 0.0})
                t["sum"] += v["sum"]
                t["max"] += v["max"]
    return {n: out[n] for n in PHASES if n in out}


def table(records: list[dict]) -> list[str]:
    """Markdown lines: per phase the seconds summed over ranks, the slowest rank's (summed record
    by record) and its share of the wall time (rank 0's, the sum of the records' ``wall``); then
    the generated token counts."""
    tot = totals(records)
    wall = sum(float(r.get("wall", 0.0)) for r in records if r)
    counts = {c: sum(int(r.get(c, 0)) for r in records if r) for c in COUNTERS}
    lines = [
        "| phase | seconds, all ranks | seconds, slowest rank | share of wall |",
        "|---|---|---|---|",
    ]
    for name, t in tot.items():
        share = f"{100 * t['max'] / wall:.1f}%" if wall > 0 else "–"
        lines.append(f"| {name} | {t['sum']:.2f} | {t['max']:.2f} | {share} |")
    covered = sum(t["max"] for t in tot.values())
    lines.append(f"| **wall (rank 0)** | | {wall:.2f} | untimed {max(0.0, wall - covered):.2f} s |")
    if any(counts.values()):
        lines += [
            "",
            f"generation: {counts['prefill_tokens']:,} prompt positions (prefill), "
            f"{counts['decode_tokens']:,} decoded tokens (rows x steps)",
        ]
    return lines


def run_records(metrics_path, kind: str | None = None) -> list[dict]:
    """The ``phases`` entries of a metrics.jsonl's lines (of ``kind`` only: round, eval, summary),
    in order."""
    import json
    from pathlib import Path

    out = []
    p = Path(metrics_path)
    if p.is_file():
        for text in p.read_text().splitlines():
            try:
                rec = json.loads(text)
            except ValueError:
                continue
            if isinstance(rec, dict) and isinstance(rec.get("phases"), dict):
                if kind is None or rec.get("kind") == kind:
                    out.append(rec["phases"])
    return out


def eval_share(metrics_path) -> float:
    """The evaluation's share (0–1) of the run's wall time: the wall of the evaluation records
    (what follows a stage's last round: the stage-end phase taken out) over all records'."""
    every, evals = run_records(metrics_path), run_records(metrics_path, "eval")
    wall = sum(float(r.get("wall", 0.0)) for r in every)
    ev = sum(float(r.get("wall", 0.0)) - r.get("stage_end", {}).get("max", 0.0) for r in evals)
    return ev / wall if wall > 0 else float("nan")


class GenerationClock:
    """A Hugging Face ``generate`` streamer that splits one call's time into prefill and decode.

    ``generate`` hands the prompt to :meth:`put` before its first forward pass, then each step's
    new tokens [B] after it is chosen, and calls :meth:`end` when it stops. Prefill: from this
    object's creation (just before ``generate``) to the first new tokens; decode: from there to
    :meth:`end`. Both are carved out of the enclosing phase (``eval``). On a GPU the tokens are
    already copied to the host by ``generate`` for the streamer (its stop check syncs every step
    anyway), so the split is device-exact."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.first: float | None = None
        self.puts = 0

    def put(self, value) -> None:
        self.puts += 1
        if self.puts == 1:  # the prompt ids [B, T]
            self.prompt = int(np.prod(tuple(value.shape)))
        elif self.puts == 2:
            self.first = time.perf_counter()
            self.rows = int(np.prod(tuple(value.shape)))

    def end(self) -> None:
        t, now = timer(), time.perf_counter()
        if self.first is None:  # nothing generated
            t.carve("eval_prefill", now - self.t0)
            return
        t.carve("eval_prefill", self.first - self.t0)
        t.carve("eval_decode", now - self.first)
        t.count("prefill_tokens", getattr(self, "prompt", 0))
        t.count("decode_tokens", self.rows * max(0, self.puts - 2))
