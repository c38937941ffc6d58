"""Typed run configuration: YAML + ``a.b=c`` overrides, validated once; errors name the field.

Field names follow the conventions of federated instruction-tuning code bases (``num_clients``,
``client_selection_frac``, ``fed_alg``, ``prox_mu``, ``fedopt_eta`` ...). Unknown keys are errors.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import KW_ONLY, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from fcit_hpc.errors import ConfigError
from fcit_hpc.registry import CODECS, COMPARE_ENTRIES, FED_ALGS, LIGER_OPS, SSA_MODES
from fcit_hpc.registry import METHODS as _REGISTRY_METHODS

METHODS = tuple(_REGISTRY_METHODS)


@dataclass
class BenchmarkConfig:
    suite: str = "synthetic"  # synthetic (embedded text) | fcit-mini (embedded images) | released
    data_root: str = ""  # released: the FCIT_data folder; fcit-mini: cache folder (or ~/.cache)
    image_root: str = ""  # where image paths are relative to (default: DATA_ROOT/datasets)
    setting: str = "task"  # task | capability | joint | joint-capability (multi-task bounds)
    _: KW_ONLY
    capability_order: str = "paper"  # paper (General, Chart, Math, Other) | eval_scripts
    scenario: str = "hom"  # hom | het
    num_tasks: int = 8  # tasks of the suite used (task setting: one per stage)
    train_per_task: int = 400
    test_per_task: int = 24
    dirichlet_beta: float = 1.0
    min_client_samples: int = 2
    het_assignment: str = "table"  # table (published) | random


@dataclass
class FederationConfig:
    num_clients: int = 50
    client_selection_frac: float = 0.1
    num_rounds: int = 10  # communication rounds per stage
    fed_alg: str = "fedavg"
    _: KW_ONLY
    prox_mu: float = 0.01
    fedopt_eta: float = 1e-3
    fedopt_tau: float = 1e-3
    fedopt_beta1: float = 0.9
    fedopt_beta2: float = 0.99
    server_momentum: float = 0.9  # FedAvgM
    server_hosts_clients: bool = True  # rank 0 trains clients too
    # share of a round's training clients that train but fail to upload (seeded per round)
    dropout: float = 0.0

    @property
    def clients_per_round(self) -> int:
        return max(1, round(self.client_selection_frac * self.num_clients))


@dataclass
class ModelConfig:
    # tiny-llama / tiny-llava (random init from the fields below) | embedded | hf (local path) |
    # hf-shape (random init of the architecture in `path`/config.json; `fcit bench train` only)
    name: str = "tiny-llama"
    path: str = ""  # hf: local directory, or pkg:NAME; hf-shape: folder holding config.json
    gguf_file: str = ""  # hf: load this GGUF file of `path` (dequantized to fp32)
    hidden_size: int = 64
    _: KW_ONLY
    intermediate_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    max_seq_len: int = 64
    init_seed: int = 1234
    image_size: int = 32  # tiny-llava vision tower
    patch_size: int = 8
    vision_hidden_size: int = 32


@dataclass
class LoraConfig:
    lora_r: int = 8  # rank of one subspace
    lora_alpha: float = 16.0
    lora_dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: ["gate_proj", "up_proj", "down_proj"])
    _: KW_ONLY
    max_subspaces: int = 8
    # rank of the single LoRA of Finetune, EWC and the multi-task bound: budget = max_subspaces x
    # lora_r (DISCO's total, the paper's parity: rank 64 = 8 x 8), r = lora_r (one subspace's)
    single_rank: str = "budget"


@dataclass
class MethodConfig:
    name: str = "disco"
    tau: float = 0.9  # DKO matching threshold
    epsilon: float = 0.05  # SSA softmax temperature
    ssa: str = "softmax"
    _: KW_ONLY
    identity_encoder: str = "minilm"  # minilm (packaged) | hashing | clip | open_clip
    identity_dim: int = 256  # hashing encoder only; the others have their own width
    identity_source: str = "text"  # text | image | text+image (identity-token ablation)
    encoder_path: str = ""  # clip: local HF directory; open_clip: local checkpoint file
    open_clip_model: str = "ViT-L-14-336"
    full_policy: str = "nearest"  # when max_subspaces is reached: nearest | error
    # DKO's small-cluster guard (the reference code's): a new subspace that one client alone would
    # create with under this share of the round's samples is not created; the client joins the
    # nearest one. 0 turns the guard off.
    min_cluster_frac: float = 1e-3
    olora_lambda: float = 0.5  # O-LoRA orthogonality weight λ1 (the O-LoRA paper's default)
    ewc_lambda: float = 5000.0  # EWC penalty weight λ
    lwf_lambda: float = 1.0  # LwF distillation weight λ (Li & Hoiem's λ_o)
    lwf_temperature: float = 2.0  # LwF distillation temperature T (Li & Hoiem's T = 2)
    # MoELoRA experts / M-LoRA parallel modules E, each of rank max_subspaces·lora_r / E
    experts: int = 8
    mlora_scaling: str = "scalar"  # M-LoRA's learnable scaling: scalar (per module) | vector


@dataclass
class TrainConfig:
    backend: str = "torch"  # torch | deepspeed
    zero_stage: int = 0
    offload: bool = False
    batch_size: int = 4
    _: KW_ONLY
    lr: float = 2e-4
    weight_decay: float = 0.0
    warmup_ratio: float = 0.03
    local_epochs: int = 1
    num_threads: int = 1
    device: str = "auto"  # auto (the rank's GPU when CUDA is present, else cpu) | cpu | cuda
    precision: str = "fp32"  # fp32 | bf16 | fp16: dtype of the base weights and of compute
    gradient_checkpointing: bool = False
    gpus_per_client: int = 1  # G: ranks (one device each) that train one client together
    # ranks of a node that may share one GPU (1: a GPU per rank; more, when each trains alone)
    ranks_per_gpu: int = 1
    deterministic: bool = False  # torch deterministic algorithms (cuBLAS workspace on CUDA)
    projector_lr: float = 2e-5  # LLaVA's multimodal projector, trained beside LoRA; 0 freezes it
    # phase timers (docs/phases.md): torch.cuda.synchronize() at every phase start and end, for
    # exact GPU phase times (off: no sync is added; the CPU's times are exact either way)
    sync_timers: bool = False
    # Liger kernels on the language model (fcit_hpc.model.liger): auto (on with CUDA when
    # liger-kernel is installed) | on (refused with the reason where it cannot run) | off
    liger: str = "auto"
    liger_ops: list[str] = field(default_factory=lambda: list(LIGER_OPS))
    # a batch's samples in one row, no padding, attention within each sample (data.batches)
    packing: bool = False


@dataclass
class EvalConfig:
    enabled: bool = True
    # cap on generated tokens (the paper's 128); each task generates at most its longest test
    # answer's tokens + 1 (eval.generate.answer_budgets)
    max_new_tokens: int = 128
    batch_size: int = 1  # test samples generated together (left-padded); 1 = one at a time
    # static: static KV cache, decode step in a CUDA graph on CUDA (eval.decode); hf: Hugging
    # Face generate (dynamic cache, eager). The same predictions.
    decoder: str = "static"
    _: KW_ONLY
    cuda_graphs: bool = True  # static decoder on CUDA: replay the decode step from a CUDA graph
    # caption scoring (Flickr30k): java = the paper's metric, BLEU-1..4, METEOR (Java), ROUGE-L
    # and CIDEr averaged; skip = the same without METEOR (no Java needed; said in the report)
    caption_meteor: str = "java"


@dataclass
class PrivacyConfig:
    """Client-level DP and secure aggregation (docs/privacy.md)."""

    dp: str = "off"  # off | central (noise at the server) | local (noise at each client)
    dp_clip: float = 1.0  # C: L2 bound of a client's update (adaptive: its start)
    dp_noise: float = 1.0  # z: noise multiplier (std z·C per released sum)
    dp_delta: float = 1e-5  # δ of the reported ε
    _: KW_ONLY
    dp_adaptive: bool = False  # adaptive clipping (Andrew et al. 2021)
    dp_quantile: float = 0.5  # γ: target share of unclipped updates
    dp_clip_lr: float = 0.2  # η_C: the clip bound's geometric step
    dp_count_std: float = 0.0  # σ_b of the clipped-count noise; 0: clients per round / 20
    token_noise: float = 0.0  # σ_t: Gaussian noise on each identity token (clipped to norm 1)
    secagg: bool = False  # SecAgg+ masking of every upload, per subspace group
    secagg_neighbours: int = 0  # k of the k-regular neighbour graph (even); 0: all (SecAgg)
    secagg_threshold: float = 0.5  # Shamir threshold t: more than this share of the holders
    secagg_frac_bits: int = 32  # fixed-point fraction bits in the ring Z_2^64


@dataclass
class CompressConfig:
    """Codecs of the uploads (fcit_hpc.fed.codec): none | fp16 | bf16 | int8 | int4 | topk."""

    subspace: str = "none"  # the subspace deltas (and a method's mixer)
    projector: str = "none"  # the LLaVA projector's delta
    token: str = "none"  # the identity tokens
    download: str = "none"  # the global adapter broadcast to the clients (training rounds)
    _: KW_ONLY
    block_size: int = 64  # int8 / int4: values per float32 scale
    topk_fraction: float = 0.1  # topk: the share of values sent
    error_feedback: bool = True  # clients keep the residual of a lossy delta codec


@dataclass
class LogConfig:
    """Experiment logging beside metrics.jsonl (rank 0, under the run directory)."""

    tensorboard: bool = False  # RUN_DIR/tensorboard/: every number of metrics.jsonl as a scalar
    mlflow: bool = False  # RUN_DIR/mlruns (a local file store) unless MLFLOW_TRACKING_URI is set
    wandb: bool = False  # offline in RUN_DIR/wandb unless WANDB_MODE says otherwise


@dataclass
class DebugConfig:
    """Fault injection for tests: kill or signal a rank, corrupt a client's update, hold rank 0 at
    a safe point."""

    kill_rank: int = -1
    kill_stage: int = 0
    kill_round: int = 0
    kill_signal: str = "KILL"  # KILL (the rank dies) | TERM | USR1 (a stop request)
    _: KW_ONLY
    hold_file: str = ""  # rank 0 waits while this file exists, before (hold_stage, hold_round)
    hold_stage: int = 0
    hold_round: int = 0
    nan_clients: list[int] = field(default_factory=list)
    bad_shape_clients: list[int] = field(default_factory=list)
    nan_token_clients: list[int] = field(default_factory=list)
    bad_token_clients: list[int] = field(default_factory=list)


@dataclass
class Config:
    seed: int = 0
    out_dir: str = "runs/default"
    # several runs in one job: one sub-run per entry and seed, then one comparison table
    compare: list[str] = field(default_factory=list)
    compare_seeds: list[int] = field(default_factory=list)
    # a grid of such jobs: a list of axes, each a list of cells, each cell space-separated
    # key=value overrides; one compare job per combination (fcit_hpc.compare.run_sweep)
    _: KW_ONLY
    sweep: list[list[str]] = field(default_factory=list)
    benchmark: BenchmarkConfig = field(default_factory=BenchmarkConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    compress: CompressConfig = field(default_factory=CompressConfig)
    log: LogConfig = field(default_factory=LogConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)

    @property
    def clients_per_round(self) -> int:
        return self.federation.clients_per_round


# ----------------------------------------------------------------------------- validation rules
def _in(choices: tuple[str, ...]):
    return lambda v: v in choices, f"one of {', '.join(choices)}"


_RULES: dict[str, tuple[Any, str]] = {
    "seed": (lambda v: v >= 0, ">= 0"),
    "compare_seeds": (lambda v: all(x >= 0 for x in v), "a list of seeds >= 0"),
    "benchmark.setting": _in(("task", "capability", "joint", "joint-capability")),
    "benchmark.scenario": _in(("hom", "het")),
    "benchmark.suite": _in(("synthetic", "fcit-mini", "released")),
    "benchmark.capability_order": _in(("paper", "eval_scripts")),
    "benchmark.num_tasks": (lambda v: 1 <= v <= 8, "in [1, 8]"),
    "benchmark.train_per_task": (lambda v: v >= 1, ">= 1"),
    "benchmark.test_per_task": (lambda v: v >= 0, ">= 0"),
    "benchmark.dirichlet_beta": (lambda v: v > 0, "> 0"),
    "benchmark.min_client_samples": (lambda v: v >= 1, ">= 1"),
    "benchmark.het_assignment": _in(("table", "random")),
    "federation.num_clients": (lambda v: v >= 1, ">= 1"),
    "federation.client_selection_frac": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "federation.num_rounds": (lambda v: v >= 1, ">= 1"),
    "federation.fed_alg": _in(FED_ALGS),
    "federation.prox_mu": (lambda v: v >= 0, ">= 0"),
    "federation.fedopt_eta": (lambda v: v > 0, "> 0"),
    "federation.fedopt_tau": (lambda v: v > 0, "> 0"),
    "federation.fedopt_beta1": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "federation.fedopt_beta2": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "federation.server_momentum": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "model.name": _in(("tiny-llama", "tiny-llava", "embedded", "hf", "hf-shape")),
    "model.image_size": (lambda v: v >= 8, ">= 8"),
    "model.patch_size": (lambda v: v >= 2, ">= 2"),
    "model.vision_hidden_size": (lambda v: v >= 8 and v % 2 == 0, "even and >= 8"),
    "model.hidden_size": (lambda v: v >= 8, ">= 8"),
    "model.intermediate_size": (lambda v: v >= 8, ">= 8"),
    "model.num_layers": (lambda v: v >= 1, ">= 1"),
    "model.num_heads": (lambda v: v >= 1, ">= 1"),
    "model.max_seq_len": (lambda v: v >= 8, ">= 8"),
    "lora.lora_r": (lambda v: v >= 1, ">= 1"),
    "lora.lora_alpha": (lambda v: v > 0, "> 0"),
    "lora.lora_dropout": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "lora.target_modules": (lambda v: len(v) >= 1, "a non-empty list"),
    "lora.max_subspaces": (lambda v: 1 <= v <= 64, "in [1, 64]"),
    "lora.single_rank": _in(("budget", "r")),
    "method.name": _in(METHODS),
    "method.tau": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "method.epsilon": (lambda v: v > 0, "> 0"),
    "method.ssa": _in(SSA_MODES),
    "method.identity_encoder": _in(("hashing", "minilm", "clip", "open_clip")),
    "method.identity_dim": (lambda v: v >= 2, ">= 2"),
    "method.identity_source": _in(("text", "image", "text+image")),
    "method.full_policy": _in(("nearest", "error")),
    "method.min_cluster_frac": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "method.olora_lambda": (lambda v: v >= 0, ">= 0"),
    "method.ewc_lambda": (lambda v: v >= 0, ">= 0"),
    "method.lwf_lambda": (lambda v: v >= 0, ">= 0"),
    "method.lwf_temperature": (lambda v: v > 0, "> 0"),
    "method.experts": (lambda v: v >= 1, ">= 1"),
    "method.mlora_scaling": _in(("scalar", "vector")),
    "train.backend": _in(("torch", "deepspeed")),
    "train.zero_stage": (lambda v: v in (0, 1, 2, 3), "one of 0, 1, 2, 3"),
    "train.batch_size": (lambda v: v >= 1, ">= 1"),
    "train.lr": (lambda v: v > 0, "> 0"),
    "train.weight_decay": (lambda v: v >= 0, ">= 0"),
    "train.warmup_ratio": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "train.local_epochs": (lambda v: v >= 1, ">= 1"),
    "train.num_threads": (lambda v: v >= 1, ">= 1"),
    "train.device": _in(("auto", "cpu", "cuda")),
    "train.precision": _in(("fp32", "bf16", "fp16")),
    "train.gpus_per_client": (lambda v: v >= 1, ">= 1"),
    "train.ranks_per_gpu": (lambda v: v >= 1, ">= 1"),
    "train.projector_lr": (lambda v: v >= 0, ">= 0"),
    "train.liger": _in(("auto", "on", "off")),
    "train.liger_ops": (
        lambda v: all(o in LIGER_OPS for o in v),
        f"a list of {', '.join(LIGER_OPS)}",
    ),
    "eval.max_new_tokens": (lambda v: v >= 1, ">= 1"),
    "eval.batch_size": (lambda v: v >= 1, ">= 1"),
    "eval.decoder": _in(("static", "hf")),
    "eval.caption_meteor": _in(("java", "skip")),
    "federation.dropout": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "privacy.dp": _in(("off", "central", "local")),
    "privacy.dp_clip": (lambda v: v > 0, "> 0"),
    "privacy.dp_noise": (lambda v: v >= 0, ">= 0"),
    "privacy.dp_delta": (lambda v: 0 < v < 1, "in (0, 1)"),
    "privacy.dp_quantile": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "privacy.dp_clip_lr": (lambda v: v >= 0, ">= 0"),
    "privacy.dp_count_std": (lambda v: v >= 0, ">= 0"),
    "privacy.token_noise": (lambda v: v >= 0, ">= 0"),
    "privacy.secagg_neighbours": (lambda v: v >= 0 and v % 2 == 0, "even and >= 0"),
    "privacy.secagg_threshold": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "privacy.secagg_frac_bits": (lambda v: 8 <= v <= 48, "in [8, 48]"),
    "compress.subspace": _in(CODECS),
    "compress.projector": _in(CODECS),
    "compress.token": _in(CODECS),
    "compress.download": _in(tuple(c for c in CODECS if c != "topk")),
    "compress.block_size": (lambda v: 2 <= v <= 1 << 20 and v % 2 == 0, "even, in [2, 2^20]"),
    "compress.topk_fraction": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "debug.kill_signal": _in(("KILL", "TERM", "USR1")),
}


def _check_type(path: str, value: Any, tp: Any) -> Any:
    """Coerce ``value`` to the annotated type ``tp`` or raise naming ``path``."""
    origin = typing.get_origin(tp)
    if origin in (list,):
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{path}: expected a list, got {_show(value)}")
        return [_check_type(f"{path}[{i}]", v, item_tp) for i, v in enumerate(value)]
    if origin in (typing.Union, types.UnionType):
        raise AssertionError("unions are not used in the config")
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true/false, got {_show(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer, got {_show(value)}")
        if not -(2**63) <= value < 2**63:
            raise ConfigError(f"{path}: {_show(value)} does not fit a 64-bit integer")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads `2e-4` (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected a number, got {_show(value)}")
        try:
            value = float(value)
        except OverflowError:  # an integer beyond the float range
            value = math.inf
        if not math.isfinite(value):
            raise ConfigError(f"{path}: expected a finite number, got {_show(value)}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {_show(value)}")
        return value
    raise AssertionError(f"unsupported config type {tp}")


# string fields with the values on and off (besides others), which YAML writes as booleans
_ON_OFF = ("train.liger",)


def _build(cls: type, data: Any, prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {_show(data)}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            where = _key(prefix, key)
            raise ConfigError(f"{where}: unknown key (known: {', '.join(sorted(names))})")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        path = f"{prefix}.{f.name}" if prefix else f.name
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            kwargs[f.name] = _build(tp, data[f.name], path)
        else:
            value = data[f.name]
            if path in _ON_OFF and isinstance(value, bool):  # YAML 1.1 reads on/off as booleans
                value = "on" if value else "off"
            kwargs[f.name] = _check_type(path, value, tp)
    return cls(**kwargs)


def validate(cfg: Config) -> Config:
    """Range checks; raises ConfigError naming the field and value."""
    for path, (ok, want) in _RULES.items():
        value = get_field(cfg, path)
        if not ok(value):
            raise ConfigError(f"{path}: {_show(value)} is out of range (must be {want})")
    for path in (
        "debug.nan_clients",
        "debug.bad_shape_clients",
        "debug.nan_token_clients",
        "debug.bad_token_clients",
    ):
        for cid in get_field(cfg, path):
            if not 0 <= cid < cfg.federation.num_clients:
                raise ConfigError(f"{path}: client id {cid} not in [0, num_clients)")
    for i, axis in enumerate(cfg.sweep):
        if not axis:
            raise ConfigError(f"sweep[{i}]: an axis needs at least one cell")
        for j, cell in enumerate(axis):
            for item in cell.split():
                key = item.partition("=")[0]
                if "=" not in item or key.split(".")[0] in ("sweep", "compare", "out_dir", "seed"):
                    raise ConfigError(
                        f"sweep[{i}][{j}]: {_show(item)} is not a key=value override of a "
                        "run's setting"
                    )
    for entry in cfg.compare:
        if entry not in COMPARE_ENTRIES:
            raise ConfigError(
                f"compare: unknown entry {_show(entry)} (one of {', '.join(COMPARE_ENTRIES)})"
            )
    if cfg.model.hidden_size % cfg.model.num_heads:
        raise ConfigError(
            f"model.num_heads: {cfg.model.num_heads} does not divide hidden_size "
            f"{cfg.model.hidden_size}"
        )
    if cfg.method.identity_encoder in ("clip", "open_clip") and not cfg.method.encoder_path:
        raise ConfigError(
            f"method.encoder_path: required when method.identity_encoder is "
            f"{cfg.method.identity_encoder!r}"
        )
    if cfg.model.image_size % cfg.model.patch_size:
        raise ConfigError(
            f"model.patch_size: {cfg.model.patch_size} does not divide image_size "
            f"{cfg.model.image_size}"
        )
    if cfg.benchmark.suite == "released" and not cfg.benchmark.data_root:
        raise ConfigError("benchmark.data_root: required when benchmark.suite is 'released'")
    t = cfg.train
    if t.backend == "deepspeed" and t.zero_stage == 0 and t.precision != "fp32":
        raise ConfigError(
            f"train.zero_stage: 0 with train.precision {t.precision} would run DeepSpeed's "
            "unfused low-precision optimizer, whose updates measurably differ from the plain "
            "torch reference (tests/test_runtime.py); use zero_stage 1, 2 or 3 (the reference "
            "code's setting is ZeRO-2, bf16)"
        )
    if t.packing and t.gpus_per_client > 1:
        raise ConfigError(
            "train.packing: a packed batch is one row, which a client group of "
            f"train.gpus_per_client {t.gpus_per_client} cannot split by rows; use 1"
        )
    _validate_privacy(cfg)
    if cfg.model.name in ("hf", "hf-shape") and not cfg.model.path:
        raise ConfigError(f"model.path: required when model.name is {cfg.model.name!r}")
    return cfg


def count_std(p: PrivacyConfig, clients_per_round: int) -> float:
    """σ_b of adaptive clipping's clipped-count noise: the setting, or Andrew et al.'s
    recommendation (expected clients per round / 20)."""
    return p.dp_count_std or clients_per_round / 20


def _validate_privacy(cfg: Config) -> None:
    p = cfg.privacy
    if p.dp == "local" and p.dp_adaptive:
        raise ConfigError(
            "privacy.dp_adaptive: adaptive clipping needs central DP (the server noises the count "
            "of unclipped updates; under local DP it would see each client's bit in the clear)"
        )
    sigma_b = count_std(p, cfg.clients_per_round)
    if p.dp != "off" and p.dp_adaptive and p.dp_noise > 0 and 2 * sigma_b <= p.dp_noise:
        raise ConfigError(
            f"privacy.dp_count_std: {sigma_b:g} must exceed dp_noise / 2 = "
            f"{p.dp_noise / 2:g} for adaptive clipping (Andrew et al.: the update keeps noise "
            "multiplier (z^-2 - (2 sigma_b)^-2)^-1/2)"
        )
    if p.secagg:
        for part in ("subspace", "projector"):
            if getattr(cfg.compress, part) != "none":
                raise ConfigError(
                    f"compress.{part}: {getattr(cfg.compress, part)} with privacy.secagg; secure "
                    "aggregation masks the float deltas in a fixed-point ring of its own, where a "
                    "codec's bytes cannot be summed: use none (compress.token may stay coded)"
                )


def get_field(cfg: Any, path: str) -> Any:
    obj = cfg
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def _show(value: Any, limit: int = 60) -> str:
    """``repr`` of a value for a one-line message, cut to ``limit`` characters."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _key(prefix: str, key: Any) -> str:
    """Dotted path of ``key`` under ``prefix``; a key that is not a plain name is quoted."""
    plain = isinstance(key, str) and key != "" and key.isprintable() and key.strip() == key
    name = key if plain else _show(key)
    return f"{prefix}.{name}" if prefix else name


def _load_yaml(text: str, where: str) -> Any:
    """YAML text → Python data; ConfigError naming ``where`` when it does not parse."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{where}: malformed YAML: {' '.join(str(e).split())}") from None
    except RecursionError:
        raise ConfigError(f"{where}: malformed YAML: nested too deeply") from None
    except ValueError as e:  # e.g. an integer of more digits than Python converts
        raise ConfigError(f"{where}: malformed YAML: {' '.join(str(e).split())}") from None


def _parse_override(item: str) -> tuple[list[str], Any]:
    key, eq, raw = item.partition("=")
    if not eq or not key.strip():
        raise ConfigError(f"override {_show(item)}: expected key.sub=value")
    value = _load_yaml(raw, f"{key.strip()}: value {_show(raw)}") if raw != "" else ""
    return key.strip().split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    for item in overrides:
        keys, value = _parse_override(item)
        node = data
        for i, k in enumerate(keys[:-1]):
            nxt = node.get(k)
            if nxt is None:
                nxt = node[k] = {}
            if not isinstance(nxt, dict):
                raise ConfigError(f"{'.'.join(keys[: i + 1])}: is not a section")
            node = nxt
        node[keys[-1]] = value
    return data


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    """Load YAML at ``path`` (or defaults when None), apply overrides, validate."""
    data: Any = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"{p}: config file not found")
        try:
            text = p.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"{p}: cannot read the config ({' '.join(str(e).split())})") from None
        data = _mapping(_load_yaml(text, str(p)), str(p))
    data = apply_overrides(data, overrides or [])
    return validate(_build(Config, data, ""))


def config_from_yaml_text(text: str, where: str = "stored config") -> Config:
    """A config from YAML text (the one a state file stores); errors name ``where``."""
    return validate(_build(Config, _mapping(_load_yaml(text, where), where), ""))


def _mapping(data: Any, where: str) -> dict:
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: top level must be a mapping, got {type(data).__name__}")
    return data


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def to_yaml(cfg: Config) -> str:
    """Resolved config as YAML. The ``debug`` section (one-shot fault injection for tests) is left
    out, so a resumed run does not repeat the fault and its content equals an uninterrupted run."""
    data = to_dict(cfg)
    data.pop("debug")
    return yaml.safe_dump(data, sort_keys=False)
