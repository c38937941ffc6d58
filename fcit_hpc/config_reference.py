"""The config reference, generated from the config dataclasses: names, types and defaults come
from `fcit_hpc.config`, the meaning of each field from `FIELD_DOCS` below (one line per field).
`python -m fcit_hpc.config_reference --write` rewrites docs/config.md; a test fails when the file,
the dataclasses or this table disagree."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

from fcit_hpc.config import Config

FIELD_DOCS: dict[str, str] = {
    "seed": "root of every random stream (>= 0)",
    "out_dir": "run directory (`--out` overrides)",
    "compare": "several runs in one job (zero_shot, finetune, disco, ewc, lwf, olora, mlora, moelora, multitask, disco-softmax/cosine/argmax/concat), then one table (`comparison.md`, with DISCO's per-seed paired difference to the best baseline on Last)",
    "compare_seeds": "the seeds of `compare`'s runs (empty: `seed` alone)",
    "sweep": "a grid of such jobs: a list of axes, each a list of cells, a cell being space-separated `key=value` overrides; one job per combination in `RUN_DIR/<cell>/`, then `sweep.md` (e.g. `configs/paper_cells.yaml`: the paper's 12 cells; `configs/tau_sweep.yaml`)",
    "benchmark.suite": "`synthetic` (8 text tasks in memory), `fcit-mini` (12 image tasks, cached), `released`",
    "benchmark.data_root": "the `FCIT_data` folder (released) / cache folder (fcit-mini)",
    "benchmark.image_root": "image folder (default `DATA_ROOT/datasets`)",
    "benchmark.setting": "`task` (8 stages), `capability` (4 stages), `joint` / `joint-capability` (one stage of all their datasets: the multi-task upper bound; `compare`'s `multitask` picks the one of the setting)",
    "benchmark.capability_order": "`paper` (General, Chart, Math, Other) or `eval_scripts` (General, Other, Math, Chart)",
    "benchmark.scenario": "`hom` (Hom-FCIT) or `het` (Het-FCIT)",
    "benchmark.num_tasks": "tasks of the embedded suite",
    "benchmark.train_per_task": "training samples per task (embedded suites)",
    "benchmark.test_per_task": "test samples per task (embedded suites)",
    "benchmark.dirichlet_beta": "Dirichlet β of the quantity skew over clients (> 0)",
    "benchmark.min_client_samples": "minimum samples of every client",
    "benchmark.het_assignment": "Het-FCIT's dataset-to-client assignment: `table` (the published one) or `random`",
    "federation.num_clients": "clients",
    "federation.client_selection_frac": "fraction sampled per round, in (0, 1]",
    "federation.num_rounds": "rounds per stage",
    "federation.fed_alg": "fedavg, fedavgm, fedadam, fedadagrad, fedyogi, fedprox",
    "federation.prox_mu": "FedProx μ",
    "federation.fedopt_eta": "server optimizer step size η (FedAdam, FedAdagrad, FedYogi)",
    "federation.fedopt_tau": "server optimizer adaptivity τ (the FedOpt paper's ε-like term)",
    "federation.fedopt_beta1": "server optimizer first-moment decay β1",
    "federation.fedopt_beta2": "server optimizer second-moment decay β2",
    "federation.server_momentum": "FedAvgM momentum",
    "federation.server_hosts_clients": "rank 0 trains clients too",
    "federation.dropout": "share of a round's training clients that train but fail to upload, in [0, 1) (chosen per round from the seed; the server averages over the uploaded ones, with or without secure aggregation; logged as `dropped`)",
    "model.name": "`embedded`, `tiny-llava`, `tiny-llama` (random init from the fields below), `hf`, or `hf-shape` (random init of the architecture in `model.path`/config.json; `fcit bench train` only)",
    "model.path": "`hf`: local directory or `pkg:NAME`; `hf-shape`: folder holding `config.json`",
    "model.gguf_file": "`hf`: the GGUF file in `model.path` to load (dequantized to fp32)",
    "model.hidden_size": "tiny Llama: hidden width",
    "model.intermediate_size": "tiny Llama: FFN width",
    "model.num_layers": "tiny Llama: layers",
    "model.num_heads": "tiny Llama: attention heads",
    "model.max_seq_len": "longest sample in tokens (prompt + answer; longer ones are cut)",
    "model.init_seed": "seed of the random models' weights (tiny-*, hf-shape)",
    "model.image_size": "`tiny-llava` vision tower: image side in pixels",
    "model.patch_size": "`tiny-llava` vision tower: patch side in pixels",
    "model.vision_hidden_size": "`tiny-llava` vision tower: width",
    "lora.lora_r": "rank r of one subspace",
    "lora.lora_alpha": "LoRA alpha: scaling = alpha / r",
    "lora.lora_dropout": "LoRA dropout on the adapter input",
    "lora.target_modules": "FFN linears of the language model",
    "lora.max_subspaces": "capacity of DKO (S_max)",
    "lora.single_rank": "rank of the one LoRA of Finetune, EWC and the multi-task bound: `budget` = `max_subspaces`·`lora_r` (DISCO's total, the paper's parity: rank 64) or `r` (one subspace's); the scaling stays alpha / r",
    "method.name": "disco, finetune, ewc, lwf, olora, mlora, moelora, zero_shot",
    "method.tau": "DKO matching threshold τ, in (0, 1]",
    "method.epsilon": "SSA temperature ε (> 0)",
    "method.ssa": "softmax, cosine, argmax, concat (ablations)",
    "method.identity_encoder": "minilm (packaged sentence encoder, offline), hashing (dependency-free), clip (HF CLIP text tower), open_clip",
    "method.identity_dim": "width of the hashing encoder's token (≥ 2; the others have their own width)",
    "method.identity_source": "what the identity token encodes: `text` (the instruction), `image`, `text+image` (the identity ablation)",
    "method.encoder_path": "clip: local Hugging Face directory; open_clip: local checkpoint file (required by both)",
    "method.open_clip_model": "open_clip architecture name",
    "method.full_policy": "when S_max is reached: assign the nearest subspace, or stop (`error`)",
    "method.min_cluster_frac": "DKO's small-cluster guard (the reference code's), in [0, 1): a new subspace that a single client of the round would create with under this share of the round's samples is not created; the client joins its nearest subspace (DKO action `small->nearest`, code 4); 0 turns it off",
    "method.olora_lambda": "O-LoRA orthogonality weight λ (needs `lora.max_subspaces` ≥ stages)",
    "method.ewc_lambda": "EWC penalty weight λ",
    "method.lwf_lambda": "LwF distillation weight λ: λ·T²·KL(softmax(z_old/T) ‖ softmax(z/T)) "
    "per answer token, z_old the previous stage's model (Li & Hoiem's λ_o = 1)",
    "method.lwf_temperature": "LwF distillation temperature T (Li & Hoiem: 2)",
    "method.experts": "MoELoRA experts / M-LoRA modules E, each of rank `max_subspaces`·`lora_r`/E (must divide it)",
    "method.mlora_scaling": "M-LoRA's learnable scaling: `scalar` (one per module) or `vector` (per module and output feature)",
    "train.backend": "torch or deepspeed",
    "train.zero_stage": "DeepSpeed ZeRO stage 0–3 (bf16/fp16 need 1–3; 3 also partitions the frozen base model over the client group while a client trains)",
    "train.offload": "DeepSpeed CPU offload of the optimizer",
    "train.batch_size": "local batch size (samples per step of one client)",
    "train.lr": "local AdamW learning rate (warm-up + cosine, fresh per client per round)",
    "train.weight_decay": "local AdamW weight decay",
    "train.warmup_ratio": "share of a client's steps spent in linear warm-up",
    "train.local_epochs": "local epochs over a client's data per round",
    "train.num_threads": "torch threads per rank",
    "train.device": "`auto` (the rank's GPU when CUDA is present, else the CPU), `cpu`, `cuda`; `cuda` without a GPU is an error (exit 2, nothing written)",
    "train.precision": "`fp32`, `bf16`, `fp16`: dtype of the base weights and of compute (LoRA masters stay float32)",
    "train.gradient_checkpointing": "recompute activations in the backward pass (HF, non-reentrant)",
    "train.gpus_per_client": "G: ranks (one GPU each) that train one client together, data-parallel; must divide the ranks hosting clients",
    "train.ranks_per_gpu": "ranks of a node allowed on one GPU (each training alone); more ranks than the node's GPUs times this stop the job before any work (docs/slurm.md, GPU placement)",
    "train.deterministic": "torch deterministic algorithms (and cuBLAS's workspace setting on CUDA)",
    "train.sync_timers": "synchronize the GPU at phase boundaries so the phase timers measure device time (off: no syncs in the hot path)",
    "train.projector_lr": "LLaVA's multimodal projector: trained beside LoRA with this lr, averaged by the server; 0 freezes it",
    "train.liger": "Liger kernels on the language model (docs/fast.md): `auto` (on with CUDA when liger-kernel is installed, the `[fast]` extra), `on` (refused with the reason where they cannot run: no library, no GPU, ZeRO-3 with the fused loss), `off`",
    "train.liger_ops": "which Liger kernels: `fused_linear_cross_entropy` (no [tokens x vocab] logits in training), `rms_norm`, `swiglu`, `rope`",
    "train.packing": "a batch's samples in one row without padding, attention within each sample (position ids restart per sample); not with gpus_per_client > 1",
    "eval.enabled": "evaluation after every stage (greedy decoding)",
    "eval.max_new_tokens": "the cap on new tokens: each task generates at most its longest test answer's tokens + 1 (its end token)",
    "eval.decoder": "`static`: greedy decoding with a static KV cache kept for the run, the decode step replayed from a CUDA graph on CUDA (docs/gpu.md); `hf`: Hugging Face `generate`; the same predictions",
    "eval.cuda_graphs": "capture the static decoder's step in a CUDA graph on CUDA (false: the static cache without the graph)",
    "eval.caption_meteor": "caption scoring (Flickr30k): `java` = the paper's metric (BLEU-1..4, METEOR (Java), ROUGE-L, CIDEr averaged); `skip` = the same without METEOR (no Java needed; the report says so)",
    "privacy.dp": "client-level DP (docs/privacy.md): `off`, `central` (clients clip, the server adds N(0, (z·C/m)²) to each subspace's and the side vectors' mean of equal weights) or `local` (each client adds N(0, (z·C)²) to its clipped update)",
    "privacy.dp_clip": "C: L2 bound of a client's whole update (adaptive: its first value)",
    "privacy.dp_noise": "z: noise multiplier",
    "privacy.dp_delta": "δ at which ε is reported (per stage, in the log, metrics.jsonl and `/privacy/epsilon`)",
    "privacy.dp_adaptive": "adaptive clipping (Andrew et al. 2021): C follows the `dp_quantile` of the update norms",
    "privacy.dp_quantile": "γ: target share of updates left unclipped",
    "privacy.dp_clip_lr": "η_C: C ← C·exp(−η_C (b̄ − γ))",
    "privacy.dp_count_std": "σ_b of the noise on the count of unclipped updates (0: clients per round / 20, Andrew et al.'s choice); must exceed z/2",
    "privacy.token_noise": "σ_t: each identity token is clipped to norm 1 and gets N(0, σ_t²) per coordinate once per client and data unit (0: sent as it is)",
    "privacy.secagg": "secure aggregation (SecAgg+, Bell et al. 2020): X25519 + HKDF pairwise masks, Shamir-shared seeds; the server learns each subspace group's sum only",
    "privacy.secagg_neighbours": "k of the k-regular neighbour graph within a group (even; 0: every other member, i.e. SecAgg)",
    "privacy.secagg_threshold": "Shamir threshold: t = floor(share·(k+1)) + 1 of a member's k+1 holders rebuild its secrets",
    "privacy.secagg_frac_bits": "fixed-point fraction bits of the uploads in the ring Z_2^64 (resolution 2^-bits on sample-weighted deltas)",
    "eval.batch_size": "test samples of a rank generated together (left-padded, SSA gate α per sample)",
    "compress.subspace": "codec of the subspace deltas (and a method's mixer) on the wire: `none` (float32), `fp16`, `bf16`, `int8`, `int4` (per-block scales), `topk` (docs/compress.md)",
    "compress.projector": "codec of the LLaVA projector's delta (as `compress.subspace`)",
    "compress.token": "codec of the identity tokens (as `compress.subspace`; no error feedback: a token is not summed)",
    "compress.download": "codec of the global adapter broadcast to the clients in training rounds (`none`, `fp16`, `bf16`, `int8`, `int4`; each subspace coded on its own); clients start from the decoded adapter, the server's state stays exact",
    "compress.block_size": "`int8` / `int4`: values per float32 scale (even)",
    "compress.topk_fraction": "`topk`: the share of a part's values sent (the largest in magnitude)",
    "compress.error_feedback": "each client keeps the residual of a lossy delta codec and adds it to its next upload of that part (kept in `state.h5`, `/compress`)",
    "log.tensorboard": "write every number of `metrics.jsonl` as a TensorBoard scalar under `RUN_DIR/tensorboard` (rank 0; needs `tensorboard`, extra `log`)",
    "log.mlflow": "log the same to MLflow (needs `mlflow`): a local store in `RUN_DIR/mlruns` unless `MLFLOW_TRACKING_URI` is set",
    "log.wandb": "log the same to Weights & Biases (needs `wandb`): offline in `RUN_DIR/wandb` unless `WANDB_MODE` says otherwise",
    "debug.kill_rank": "fault injection: the rank that dies or is signalled mid-round (-1: none)",
    "debug.kill_stage": "fault injection: the stage of the kill",
    "debug.kill_round": "fault injection: the round of the kill",
    "debug.kill_signal": "fault injection: KILL (the rank dies), TERM or USR1 (a stop request)",
    "debug.hold_file": "rank 0 waits while this file exists, before (hold_stage, hold_round)",
    "debug.hold_stage": "the stage of the hold",
    "debug.hold_round": "the round of the hold",
    "debug.nan_clients": "clients whose update is corrupted with NaN (the server rejects it)",
    "debug.bad_shape_clients": "clients whose update has the wrong length (the server rejects it)",
    "debug.nan_token_clients": "clients whose identity token is NaN (rejected)",
    "debug.bad_token_clients": "clients whose identity token has the wrong width (rejected)",
}

_HEADER = """# Config reference

Back to the [README](../README.md). Generated from the config dataclasses
(`python -m fcit_hpc.config_reference --write`; `tests/test_config.py` checks it is current).

YAML, one section per table below; any field can be overridden on the command line as
`section.field=value` (top-level fields as `field=value`). Unknown keys, wrong types and
out-of-range values are errors naming the field (exit 2).
"""


def _fields() -> list[tuple[str, str, object]]:
    """(dotted name, type, default) of every config field, in declaration order."""
    out = []
    cfg = Config()
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            for g in dataclasses.fields(value):
                out.append((f"{f.name}.{g.name}", str(g.type), getattr(value, g.name)))
        else:
            out.append((f.name, str(f.type), value))
    return out


def _show(value: object) -> str:
    if isinstance(value, str):
        return f'"{value}"' if value == "" else value
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def render() -> str:
    """docs/config.md's text. Raises KeyError naming a field without a line in FIELD_DOCS."""
    fields = _fields()
    missing = [name for name, _, _ in fields if name not in FIELD_DOCS]
    stale = sorted(set(FIELD_DOCS) - {name for name, _, _ in fields})
    if missing or stale:
        raise KeyError(f"FIELD_DOCS: no line for {missing}; lines for no field {stale}")
    parts, section = [_HEADER], None
    for name, tp, default in fields:
        sec = name.split(".")[0] if "." in name else "(top level)"
        if sec != section:
            section = sec
            parts.append(f"\n## `{sec}`\n\n| field | type | default | meaning |\n|---|---|---|---|")
        parts.append(f"| `{name}` | `{tp}` | {_show(default)} | {FIELD_DOCS[name]} |")
    return "\n".join(parts) + "\n"


DOC_PATH = Path(__file__).resolve().parents[1] / "docs" / "config.md"

if __name__ == "__main__":
    text = render()
    if "--write" in sys.argv[1:]:
        DOC_PATH.write_text(text, encoding="utf-8")
        print(f"wrote {DOC_PATH}")
    else:
        sys.stdout.write(text)
