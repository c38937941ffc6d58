"""``fcit plan CONFIG [overrides] [--gpus N] [--figures FILE|RUN_DIR ...]``: a run's predicted wall
time, per-rank memory and bytes on the wire, before it runs (docs/phases.md, "fcit plan").

The model of a run (one sub-run per ``compare`` entry, each alone after the other):

    wall  = startup + Σ_stages [ R · round + eval ]                       (seconds)
    round = ceil(C / W) · (setup + n · E · train_s · teacher + n · identity_s) + round_fixed
    eval  = ceil(T / P) · (prompt · prefill_s + decode · decode_s + other_s + ident_s) + eval_fixed

R rounds per stage (0 for a method that trains nothing), C clients per round dealt round-robin over
W worker groups (P ranks, ``gpus_per_client`` each), n the mean samples of a client (a stage's
training samples / num_clients), E local epochs, T the test samples of all tasks (every task is
evaluated after every stage), ``prompt`` and ``decode`` the prompt positions and decoded tokens
per test sample; identity costs only for a method with identity tokens (DISCO); ``teacher`` is
1 + f · (stages − 1) / stages, f the method's ``extra_forward`` (LwF: its previous-stage model's
forward on every batch from stage 1 on, measured on the main job; 0 for the others); the
round's communication is taken as free beside the compute on one host (``round_fixed``: the
server's aggregation and state write). The per-unit costs are *figures*: measured (a run
directory's phase timers, ``fcit bench train --json``, ``fcit bench kernels --json``) or the
stated defaults below.

Bytes on the wire per client and round: down = the broadcast global state (S_max subspaces of
``numel`` float32, S_max identity tokens of D float32, the round plan); up = the trained subspaces'
deltas and the identity token (float32). Memory per rank: base weights at the run's precision,
the global adapter (float32), the trained subspaces with gradients and Adam moments, activations.
"""

from __future__ import annotations

import json
import math
from dataclasses import KW_ONLY, dataclass, field
from pathlib import Path

from fcit_hpc.config import Config, load_config
from fcit_hpc.errors import ConfigError
from fcit_hpc.fed.codec import Codec, UplinkCodec

# Stated defaults (seconds per unit on one CPU core of the development machine, the embedded
# model; override with --figures): every one is printed with its source when used.
DEFAULTS: dict[str, float] = {
    "startup_s": 8.0,  # model, data, encoder, trainer per run
    "setup_s_per_client": 0.02,  # a client's batches and trainer session
    "train_s_per_sample": 0.012,  # one sample, one epoch, forward + backward + step
    "identity_s_per_sample": 0.0005,  # identity-token encoding of a client's sample
    "round_fixed_s": 0.05,  # comm, aggregation, state write per round
    "prefill_s_per_position": 2.5e-5,  # evaluation: one prompt position (batched)
    "decode_s_per_token": 1.2e-3,  # evaluation: one generated token of one row (batched)
    "eval_identity_s_per_sample": 0.005,  # the SSA gate's feature of a test sample (DISCO)
    "eval_other_s_per_sample": 0.01,  # gate, gather per test sample
    "eval_fixed_s": 0.5,  # per evaluation on rank 0: scoring, predictions file
    "prompt_positions_per_sample": 60.0,  # padded prompt length of a test sample
    "decode_tokens_per_sample": 8.0,  # generated tokens of a test sample
    "train_samples_per_task": 10000.0,  # released data only (the config does not say)
    "test_samples_per_task": 500.0,  # released data only
    "activation_gb": 0.0,  # per rank, beside weights and adapters (0: estimated)
}
# A Hugging Face model on GPUs (LLaVA-1.5-7B class): what was measured on one H200 (GPU-NOTES.md,
# `fcit bench train configs/llava15_7b_shape.yaml`, bf16, ZeRO-2, 4 x 704 tokens a step; the 7B
# decode of `fcit bench kernels`), turned into the same units. Assumed: data-parallel scaling over a
# client group's GPUs, a LLaVA sample of 704 positions (576 image tokens), eager decode costing
# the same per step for the whole batch, prefill at 3x the training token rate (forward only).
H200_7B_TOKENS_PER_S = 11452.0
H200_7B = {
    "setup_s_per_client": (0.26, "GPU-NOTES.md: H200 engine set-up, next client"),
    "decode_s_per_token": (52.5e-3, "GPU-NOTES.md: H200 7B eager decode, batch 1, per step"),
    "prefill_s_per_position": (1 / (3 * H200_7B_TOKENS_PER_S), "GPU-NOTES.md: 3 x train tok/s"),
    "prompt_positions_per_sample": (640.0, "assumed: 576 image tokens + a 64-token prompt"),
}
SAMPLE_POSITIONS = 704  # a LLaVA training sample: 576 image tokens + text
BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
IDENTITY_DIMS = {"minilm": 384, "clip": 768, "open_clip": 768}
ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Figures:
    """The per-unit costs and where each came from."""

    values: dict[str, float] = field(default_factory=lambda: dict(DEFAULTS))
    source: dict[str, str] = field(default_factory=lambda: dict.fromkeys(DEFAULTS, "default"))

    def set(self, key: str, value: float, where: str) -> None:
        if value is None or not math.isfinite(value) or value < 0:
            return
        self.values[key] = float(value)
        self.source[key] = where

    def __getitem__(self, key: str) -> float:
        return self.values[key]


# ------------------------------------------------------------------------------ the shape of a run
@dataclass
class ModelDims:
    hidden: int
    inter: int
    layers: int
    vocab: int
    _: KW_ONLY
    heads: int
    kv_heads: int

    def params(self) -> int:
        """Parameters of the language model (embeddings, attention, FFN, head; norms aside)."""
        h, head = self.hidden, self.hidden // max(1, self.heads)
        attn = h * h * 2 + 2 * h * head * self.kv_heads
        return self.layers * (attn + 3 * h * self.inter) + 2 * self.vocab * h


def _text_config(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"{path}: model config.json not found (model.path)")
    d = json.loads(path.read_text())
    return d.get("text_config", d)


def model_dims(cfg: Config) -> ModelDims:
    """The language model's sizes from the config (tiny-*), the embedded model's config.json, or
    ``model.path``/config.json (hf; an empty path: the LLaVA-1.5-7B shape in configs/hf)."""
    m = cfg.model
    if m.name in ("tiny-llama", "tiny-llava"):
        return ModelDims(
            m.hidden_size,
            m.intermediate_size,
            m.num_layers,
            256,
            heads=m.num_heads,
            kv_heads=m.num_heads,
        )
    if m.name == "embedded":
        d = _text_config(ROOT / "fcit_hpc/model/embedded_model/config.json")
    else:
        path = Path(m.path) if m.path else ROOT / "configs/hf/llava-1.5-7b"
        d = _text_config(path / "config.json" if path.is_dir() or not m.path else path)
    heads = d.get("num_attention_heads", 1)
    return ModelDims(
        d["hidden_size"],
        d["intermediate_size"],
        d["num_hidden_layers"],
        d.get("vocab_size", 32000),
        heads=heads,
        kv_heads=d.get("num_key_value_heads", heads),
    )


def lora_numel(cfg: Config, dims: ModelDims) -> int:
    """float32 values of one subspace: per layer and targeted FFN linear r · (in + out)."""
    io = {"gate_proj": dims.hidden + dims.inter, "up_proj": dims.hidden + dims.inter}
    io["down_proj"] = dims.inter + dims.hidden
    per_layer = sum(io.get(t, 2 * dims.hidden) for t in cfg.lora.target_modules)
    return cfg.lora.lora_r * per_layer * dims.layers


@dataclass
class Shape:
    """What the run does: stages, rounds, clients and samples (means), test samples."""

    stages: int
    tasks: int
    rounds: int  # per stage (0: no training)
    clients: int  # per round
    _: KW_ONLY
    samples_per_client: float  # mean over the stage's clients
    epochs: int
    test_samples: int  # of all tasks: one evaluation


def run_shape(cfg: Config, fig: Figures) -> Shape:
    from fcit_hpc.benchmark.registry import stage_datasets
    from fcit_hpc.benchmark.schedule import Schedule

    b = cfg.benchmark
    if b.suite == "synthetic":
        stages = Schedule(
            b.setting, b.scenario, b.num_tasks, b.het_assignment, seed=cfg.seed
        ).stages
        tasks, train, test = b.num_tasks, b.train_per_task, b.test_per_task
    else:
        names = stage_datasets(b.setting, b.capability_order)
        stages = names
        tasks = len({n for st in names for n in st})
        if b.suite == "fcit-mini":
            train, test = b.train_per_task, b.test_per_task
        else:
            train, test = fig["train_samples_per_task"], fig["test_samples_per_task"]
    per_stage = sum(len(s) for s in stages) / len(stages)  # tasks of a stage, mean
    trains = method_of(cfg).trains
    return Shape(
        stages=len(stages),
        tasks=tasks,
        rounds=cfg.federation.num_rounds if trains else 0,
        clients=cfg.clients_per_round,
        samples_per_client=train * per_stage / cfg.federation.num_clients,
        epochs=cfg.train.local_epochs,
        test_samples=int(test * tasks) if cfg.eval.enabled else 0,
    )


def workers(cfg: Config, ranks: int) -> int:
    """Client groups doing local work at once (rank 0 included when it hosts clients)."""
    from fcit_hpc.runtime import worker_ranks

    w = len(worker_ranks(ranks, cfg.federation.server_hosts_clients))
    return max(1, w // cfg.train.gpus_per_client)


# ------------------------------------------------------------------------------------ the model
def predict_seconds(cfg: Config, ranks: int, fig: Figures) -> dict[str, float]:
    """Predicted seconds of one run by part (startup, train, eval) and in all (``wall``)."""
    s = run_shape(cfg, fig)
    ident = 1.0 if identity_dim(cfg) else 0.0  # identity features: DISCO's
    teacher = 1.0
    if s.stages:
        teacher += method_of(cfg).extra_forward * (s.stages - 1) / s.stages
    per_client = (
        fig["setup_s_per_client"]
        + s.samples_per_client * s.epochs * fig["train_s_per_sample"] * teacher
        + ident * s.samples_per_client * fig["identity_s_per_sample"]
    )
    busiest = math.ceil(s.clients / workers(cfg, ranks))
    round_s = busiest * per_client + fig["round_fixed_s"]
    per_test = (
        fig["prompt_positions_per_sample"] * fig["prefill_s_per_position"]
        + fig["decode_tokens_per_sample"] * fig["decode_s_per_token"]
        + fig["eval_other_s_per_sample"]
        + ident * fig["eval_identity_s_per_sample"]
    )
    eval_s = math.ceil(s.test_samples / ranks) * per_test + (
        fig["eval_fixed_s"] if s.test_samples else 0
    )
    out = {
        "startup": fig["startup_s"],
        "train": s.stages * s.rounds * round_s,
        "eval": s.stages * eval_s,
    }
    out["wall"] = sum(out.values())
    return out


def method_of(cfg: Config):
    """The run's method (fcit_hpc.methods), whose own attributes say what it costs: whether it
    trains, uploads identity tokens, which subspaces a client trains, extra forward passes."""
    from fcit_hpc.methods import make_method

    return make_method(cfg.method, cfg.lora)


def identity_dim(cfg: Config) -> int:
    """D of the identity tokens (0: the method uploads none)."""
    m = cfg.method
    if not method_of(cfg).uses_identity:
        return 0
    return m.identity_dim if m.identity_encoder == "hashing" else IDENTITY_DIMS[m.identity_encoder]


def trained_subspaces(cfg: Config) -> int:
    """Subspaces a client trains and uploads (MoELoRA / M-LoRA: every one of the S_max)."""
    return len(method_of(cfg).trained_subspaces(0))


def predict_bytes(cfg: Config, fig: Figures) -> dict[str, float]:
    """Bytes on the wire of one run: ``down`` (received by the clients), ``up`` (sent)."""
    s = run_shape(cfg, fig)
    numel = lora_numel(cfg, model_dims(cfg))
    d, smax = identity_dim(cfg), cfg.lora.max_subspaces
    c = cfg.compress  # the payload formulas of the wire (fcit_hpc.fed.codec)
    down = smax * (Codec(c.download, c.block_size).nbytes(numel) + 4 * d)
    codec = UplinkCodec.from_config(c)
    up = trained_subspaces(cfg) * codec.subspace.nbytes(numel) + codec.token.nbytes(d)
    n = s.stages * s.rounds * s.clients
    return {"down": n * down, "up": n * up, "per_client_round": down + up}


def predict_memory_gb(cfg: Config, fig: Figures) -> float:
    """Per-rank memory (GB): base weights at the run's precision, the global adapter (float32),
    the trained subspaces with their gradient and Adam moments, activations (measured, or
    batch · seq · hidden · layers · 34 bytes, 2 with gradient checkpointing)."""
    dims = model_dims(cfg)
    numel = lora_numel(cfg, dims)
    weights = dims.params() * BYTES[cfg.train.precision]
    adapters = 4 * cfg.lora.max_subspaces * numel + 16 * trained_subspaces(cfg) * numel
    act = fig["activation_gb"] * 1e9
    if act == 0:
        per = 2 if cfg.train.gradient_checkpointing else 34
        tokens = cfg.train.batch_size * cfg.model.max_seq_len / cfg.train.gpus_per_client
        act = tokens * dims.hidden * dims.layers * per
    return (weights + adapters + act) / 1e9


# ---------------------------------------------------------------------------------- the figures
def figures_from_run(run_dir: Path, fig: Figures) -> None:
    """Per-unit costs from a finished run's phase timers (metrics.jsonl) and its config."""
    from fcit_hpc.timers import run_records, totals

    cfg = load_config(run_dir / "config.yaml")
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x]
    rounds = [r for r in rows if r.get("kind") == "round"]
    evals = [r for r in rows if r.get("kind") == "eval"]
    path = run_dir / "metrics.jsonl"
    recs = run_records(path)
    if not recs:
        raise ConfigError(f"{path}: no phase timers (a run before them?)")
    tot_round, tot_eval = totals(run_records(path, "round")), totals(run_records(path, "eval"))
    where = f"{run_dir} (phase timers)"

    def t(name, key="sum"):  # training phases: of the round records
        return tot_round.get(name, {}).get(key, 0.0)

    def e(name, key="sum"):  # evaluation phases: of the evaluation records
        return tot_eval.get(name, {}).get(key, 0.0)

    samples = sum(r["samples"] for r in rounds)  # accepted samples, one epoch each
    clients = sum(r["accepted"] for r in rounds)
    if samples:
        fig.set("train_s_per_sample", t("train") / (samples * cfg.train.local_epochs), where)
        fig.set("identity_s_per_sample", t("identity") / samples, where)
    if clients:
        fig.set("setup_s_per_client", t("setup") / clients, where)
    if rounds:  # comm aside: on the slowest rank it is short, elsewhere it is waiting for it
        fixed = sum(t(n, "max") for n in ("aggregate", "dko", "state_write"))
        fig.set("round_fixed_s", fixed / len(rounds), where)
    fig.set("startup_s", t("startup", "max"), where)
    counts = {c: sum(int(r.get(c, 0)) for r in recs) for c in ("prefill_tokens", "decode_tokens")}
    ident = identity_dim(cfg) > 0
    if evals and counts["prefill_tokens"]:
        b = cfg.benchmark
        tasks = len(evals[0]["accuracy"])
        tests = len(evals) * tasks * b.test_per_task
        fig.set("prefill_s_per_position", e("eval_prefill") / counts["prefill_tokens"], where)
        if counts["decode_tokens"]:
            fig.set("decode_s_per_token", e("eval_decode") / counts["decode_tokens"], where)
        fig.set("eval_other_s_per_sample", e("eval") / tests, where)
        if ident:
            fig.set("eval_identity_s_per_sample", e("identity") / tests, where)
        fixed = e("score", "max") + e("state_write", "max")  # rank 0's alone, per evaluation
        fig.set("eval_fixed_s", fixed / len(evals), where)
        fig.set("prompt_positions_per_sample", counts["prefill_tokens"] / tests, where)
        fig.set("decode_tokens_per_sample", counts["decode_tokens"] / tests, where)


def figures_from_json(path: Path, fig: Figures) -> None:
    """Per-unit costs from ``fcit bench train --json`` (training step, set-up, peak memory) or
    ``fcit bench kernels --json`` (decode ms per token, batch 1: per row of a batch)."""
    try:
        d = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"--figures {path}: not a readable JSON file ({e})") from None
    where = str(path)
    if isinstance(d, dict) and "fcit" in d and "tokens_per_step" in d:  # bench train
        f = d["fcit"]
        fig.set("train_s_per_sample", f["step_s"] / max(1, d["batch_size"]), where)
        if f.get("setup_next_s") is not None:
            fig.set("setup_s_per_client", f["setup_next_s"], where)
        if f.get("peak_bytes"):
            fig.set("activation_gb", f["peak_bytes"] / 1e9, where + " (peak, all of training)")
    elif isinstance(d, dict) and isinstance(d.get("decode"), dict):  # bench kernels
        dec = d["decode"]
        ms = dec.get("ssa_graph_ms", dec.get("ssa_eager_ms"))
        if ms is not None:
            fig.set("decode_s_per_token", ms / 1e3, where)
    else:
        raise ConfigError(
            f"--figures {path}: neither `fcit bench train --json` nor `fcit bench kernels --json`"
        )


def gpu_defaults(cfg: Config, fig: Figures) -> None:
    """The defaults of a Hugging Face model on GPUs: the H200 figures above (1 client group of
    ``gpus_per_client`` GPUs trains a client; the decode step serves the whole eval batch)."""
    g = cfg.train.gpus_per_client
    per_sample = SAMPLE_POSITIONS / (H200_7B_TOKENS_PER_S * g)
    fig.set("train_s_per_sample", per_sample, f"GPU-NOTES.md: 704 positions / (11,452 tok/s x {g})")
    for key, (value, where) in H200_7B.items():
        if key == "decode_s_per_token":
            value /= cfg.eval.batch_size
            where += f" / eval.batch_size {cfg.eval.batch_size}"
        fig.set(key, value, where)


def load_figures(paths: list[str], cfg: Config | None = None) -> Figures:
    """The stated defaults (the H200 ones for a Hugging Face model on GPUs), then each of
    ``paths`` in order."""
    fig = Figures()
    on_gpu = cfg is not None and (cfg.train.device == "cuda" or cfg.train.backend == "deepspeed")
    if on_gpu and cfg.model.name in ("hf", "hf-shape"):
        gpu_defaults(cfg, fig)
    for p in paths:
        path = Path(p)
        if path.is_dir():
            if not (path / "metrics.jsonl").is_file():
                raise ConfigError(f"--figures {path}: no metrics.jsonl (not a run directory)")
            figures_from_run(path, fig)
        elif path.is_file():
            figures_from_json(path, fig)
        else:
            raise ConfigError(f"--figures {path}: no such file or run directory")
    return fig


# ------------------------------------------------------------------------------------- command
def sub_runs(cfg: Config) -> list[tuple[str, Config]]:
    """(name, config) of every run the job makes: its compare entries (× seeds), or itself."""
    if not cfg.compare:
        return [(cfg.method.name, cfg)]
    from fcit_hpc.compare import sub_config

    seeds = cfg.compare_seeds or [cfg.seed]
    return [(e, sub_config(cfg, e, s, Path(cfg.out_dir))) for e in cfg.compare for s in seeds]


def plan(cfg: Config, ranks: int, fig: Figures) -> dict:
    """The prediction of the whole job on ``ranks`` ranks (JSON-ready)."""
    runs = []
    for name, c in sub_runs(cfg):
        sec, by, mem = (
            predict_seconds(c, ranks, fig),
            predict_bytes(c, fig),
            predict_memory_gb(c, fig),
        )
        runs.append({"run": name, "seconds": sec, "bytes": by, "memory_gb_per_rank": mem})
    return {
        "ranks": ranks,
        "runs": runs,
        "wall_s": sum(r["seconds"]["wall"] for r in runs),
        "bytes": sum(r["bytes"]["down"] + r["bytes"]["up"] for r in runs),
        "memory_gb_per_rank": max(r["memory_gb_per_rank"] for r in runs),
        "figures": {k: {"value": fig.values[k], "source": fig.source[k]} for k in fig.values},
    }


def render(p: dict, device: str) -> str:
    lines = [f"fcit plan: {len(p['runs'])} run(s) on {p['ranks']} {device}(s)", ""]
    lines.append(
        f"{'run':<12} {'startup s':>10} {'train s':>10} {'eval s':>10} {'wall s':>10} "
        f"{'wire MB':>10} {'GB/rank':>8}"
    )
    for r in p["runs"]:
        s, b = r["seconds"], r["bytes"]
        lines.append(
            f"{r['run']:<12} {s['startup']:10.1f} {s['train']:10.1f} {s['eval']:10.1f} "
            f"{s['wall']:10.1f} {(b['down'] + b['up']) / 1e6:10.2f} {r['memory_gb_per_rank']:8.2f}"
        )
    m, sec = divmod(round(p["wall_s"]), 60)
    lines += [
        "",
        f"predicted wall time {p['wall_s']:.0f} s ({m} min {sec} s); bytes on the wire "
        f"{p['bytes'] / 1e6:,.2f} MB; memory per rank {p['memory_gb_per_rank']:.2f} GB",
        "",
        "figures used:",
    ]
    for k, v in p["figures"].items():
        lines.append(f"  {k:<30} {v['value']:<12.4g} {v['source']}")
    return "\n".join(lines)


def cmd_plan(args) -> int:
    if not args.items or "=" in args.items[0]:
        raise ConfigError("fcit plan: give CONFIG, then overrides")
    if args.gpus is not None and args.gpus < 1:
        raise ConfigError(f"--gpus: {args.gpus} is out of range (must be >= 1)")
    cfg = load_config(args.items[0], args.items[1:])
    ranks = args.gpus or 1
    p = plan(cfg, ranks, load_figures(args.figures or [], cfg))
    print(
        render(
            p, "GPU" if cfg.train.device == "cuda" or cfg.train.backend == "deepspeed" else "rank"
        )
    )
    if args.json:
        Path(args.json).write_text(json.dumps(p, indent=1))
    return 0


__all__ = ["DEFAULTS", "Figures", "cmd_plan", "plan"]
