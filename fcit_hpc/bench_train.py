"""``fcit bench train CONFIG``: one client's local training with fcit's trainer, side by side
with a plain Hugging Face + PEFT loop on the same model, batches and device.

Both sides start from a fresh model of the config (same ``model.init_seed``), the same LoRA start
(fcit's subspace init, A ~ N(0, 0.01), B = 0, loaded into PEFT's ``lora_A``/``lora_B``), the same
synthetic batches and the same AdamW with the same warm-up + cosine learning rate, so they do the
same work (``tests/test_bench_train.py`` checks equal loss and equal update after one step). PEFT
keeps the adapter in float32 as fcit does; it computes the LoRA branch in float32, fcit in the
compute dtype. Per side:

- **s/step, tokens/s**: mean over the steps after ``warmup`` (the device is synchronised after
  every step; the median too, for a shared machine); tokens = what the device processed (batch
  × the batch's longest sample, image tokens included), real tokens = the samples' own tokens
  (no padding; ``--lengths`` draws their text lengths, :mod:`fcit_hpc.bench_lengths`).
- **variants** (``--variants``): fcit with ``train.liger`` on, ``train.packing`` on, or both, each
  on the same samples from the same start, one row each beside plain and fcit (no Liger, padded);
  a variant that cannot run here is listed as refused with the reason.
- **peak memory**: CUDA ``max_memory_allocated`` (reset between the sides); on the CPU the
  process's peak resident set (``VmHWM``, reset through ``/proc/self/clear_refs``), "n/a" where
  that cannot be reset. Each side's peak includes its model.
- **set-up**: from the trainer's call to its session being ready (the DeepSpeed engine build);
  fcit's is measured for a first and a next client (fresh engine each, as in a run). Plain: PEFT
  wrapping and AdamW. The set-up share of a client's local training is
  setup / (setup + client_steps · s/step), with the steps from which it is at most 5%.
- **MFU**: model FLOPs per step (of the real tokens; mean over the timed steps) / step time /
  the device's dense peak (:data:`PEAKS`). Per sample of T tokens (L layers, width d), with N_lm
  the language model's matmul weights (embedding tables excluded), N_lora the trained LoRA
  weights, N_vis and N_proj the vision tower and projector (frozen, nothing before them needs a
  gradient: forward only)::

      T · (4·N_lm + 6·N_lora + 12·L·T·d) + I · (2·N_vis·P + 2·N_proj·Q)

  4·N_lm: forward 2·N and backward through the activations 2·N (frozen weights need no weight
  gradient); 6·N_lora: forward, activation and weight gradients; 12·L·T·d: attention scores and
  their use, forward (4·L·T·d) and backward (twice that), counted without the causal mask as in
  PaLM's MFU; I images of P patches (+ CLS) each, Q image tokens each. Recomputation under
  gradient checkpointing is not counted (model FLOPs, not hardware FLOPs).
"""

from __future__ import annotations

import gc
import json
import re
import statistics
import time
from dataclasses import KW_ONLY, asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from peft import LoraConfig, get_peft_model  # imported here: not part of the timed set-up

from fcit_hpc.bench_lengths import Lengths, batches_of, parse_lengths, synthetic_rows
from fcit_hpc.config import Config, load_config
from fcit_hpc.data.batches import real_tokens
from fcit_hpc.errors import ConfigError
from fcit_hpc.fed.comm import LocalComm
from fcit_hpc.fed.context import init_group_worlds
from fcit_hpc.model.build import build_base_model, enable_gradient_checkpointing
from fcit_hpc.model.steps import lr_at
from fcit_hpc.run import make_trainer, run_model
from fcit_hpc.runtime import LaunchInfo, Runtime, apply_runtime, make_runtime
from fcit_hpc.train.base import LocalOpt

# Dense tensor-core peaks, FLOP/s, by precision ("tf32": float32 matmuls with TF32 allowed; "fp32"
# without). First row whose every key is in torch's device name wins. NVIDIA data sheets.
PEAKS: list[tuple[tuple[str, ...], dict[str, float]]] = [
    (("H100", "NVL"), {"bf16": 835e12, "fp16": 835e12, "tf32": 417.5e12, "fp32": 60e12}),
    (("H100", "PCIe"), {"bf16": 756e12, "fp16": 756e12, "tf32": 378e12, "fp32": 51e12}),
    (("H100",), {"bf16": 989e12, "fp16": 989e12, "tf32": 494.7e12, "fp32": 67e12}),  # SXM
    (("H200", "NVL"), {"bf16": 835e12, "fp16": 835e12, "tf32": 417.5e12, "fp32": 60e12}),
    (("H200",), {"bf16": 989e12, "fp16": 989e12, "tf32": 494.7e12, "fp32": 67e12}),
    (("A100",), {"bf16": 312e12, "fp16": 312e12, "tf32": 156e12, "fp32": 19.5e12}),
]
# Steps per client for the set-up share. PROTOCOL.md states no per-client sample counts, so this
# is an assumption (400 samples at batch 4), printed as such; --client-steps sets the real one.
DEFAULT_CLIENT_STEPS = 100
SETUP_SHARE_TARGET = 0.05
FIXED = Lengths("fixed")


@dataclass(frozen=True)
class BatchShape:
    """What one synthetic sample looks like."""

    seq_len: int  # tokens per sample, image tokens included
    image_tokens: int  # 0: a text-only model
    image_size: int
    image_token_id: int  # -1: none
    _: KW_ONLY
    vocab: int
    answer_len: int  # the last tokens carry the loss


def batch_shape(model, text_len: int) -> BatchShape:
    """The sample of a model: ``text_len`` text tokens (``model.max_seq_len``) behind the image
    tokens of its vision tower (LLaVA: (image/patch)², +1 with the "full" strategy)."""
    c = model.config
    vocab = c.get_text_config().vocab_size
    if c.model_type != "llava":
        return BatchShape(text_len, 0, 0, -1, vocab=vocab, answer_len=text_len // 2)
    v = c.vision_config
    img = (v.image_size // v.patch_size) ** 2 + (c.vision_feature_select_strategy == "full")
    return BatchShape(
        img + text_len, img, v.image_size, c.image_token_id, vocab=vocab, answer_len=text_len // 2
    )


def synthetic_batches(
    shape: BatchShape,
    batch_size: int,
    n: int,
    seed: int,
    *,
    device,
    text_lens: list[int] | None = None,
    pack: bool = False,
) -> list:
    """``n`` batches of random token ids (any id but the image token's, which fills the places
    after the first position where the image goes; the loss on the last half of each sample's
    text) and random images, on ``device``. ``text_lens``: each sample's text tokens (default
    all ``shape.seq_len - shape.image_tokens``: no padding); padded, or packed (``pack``)."""
    gen = torch.Generator().manual_seed(seed)
    if text_lens is None:
        text_lens = [shape.seq_len - shape.image_tokens] * (batch_size * n)
    rows = synthetic_rows(shape, text_lens, gen)
    images = _images(shape, len(rows), gen)
    return batches_of(rows, images, batch_size, pack, device=device)


def _images(shape: BatchShape, n: int, gen: torch.Generator):
    if not shape.image_tokens:
        return None
    s = shape.image_size
    return torch.randn(n, 3, s, s, generator=gen)


def sample_flops(model, lora_numel: int, shape: BatchShape, seq_len: int) -> float:
    """Model FLOPs of training on one sample of ``seq_len`` tokens (module docstring)."""
    n = {"lm": 0, "vis": 0, "proj": 0}
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Embedding):
            continue
        part = (
            "vis" if "vision_tower" in name else "proj" if "multi_modal_projector" in name else "lm"
        )
        n[part] += sum(
            p.numel() for k, p in mod.named_parameters(recurse=False) if "lora_" not in k
        )
    tc = model.config.get_text_config()
    T, L, d = seq_len, tc.num_hidden_layers, tc.hidden_size
    per_sample = T * (4 * n["lm"] + 6 * lora_numel + 12 * L * T * d)
    if shape.image_tokens:
        v = model.config.vision_config
        patches = (v.image_size // v.patch_size) ** 2 + 1
        per_sample += 2 * n["vis"] * patches + 2 * n["proj"] * shape.image_tokens
    return float(per_sample)


def train_flops(model, lora_numel: int, shape: BatchShape, batch_size: int) -> float:
    """Model FLOPs of one training step on ``batch_size`` samples of ``shape.seq_len`` tokens."""
    return batch_size * sample_flops(model, lora_numel, shape, shape.seq_len)


def device_peak(name: str, precision: str) -> float | None:
    """Dense peak FLOP/s of the device called ``name`` (torch's name) in ``precision`` (fp32,
    tf32, bf16, fp16); None when it is not in :data:`PEAKS`."""
    for keys, peaks in PEAKS:
        if all(k in name for k in keys):
            return peaks[precision]
    return None


def peak_flops(rt: Runtime) -> float | None:
    """The runtime device's dense peak in its precision (float32 matmuls count as TF32 when torch
    allows TF32); None on the CPU or an unknown device."""
    if not rt.is_cuda:
        return None
    prec = rt.precision
    if prec == "fp32" and torch.get_float32_matmul_precision() != "highest":
        prec = "tf32"
    return device_peak(torch.cuda.get_device_name(rt.device), prec)


class PeakMemory:
    """Peak device memory of a phase: CUDA's allocator, else the process's peak resident set
    (Linux: ``VmHWM``, reset by writing 5 to ``/proc/self/clear_refs``)."""

    def __init__(self, rt: Runtime):
        self.rt = rt
        self.ok = False  # the last reset took effect

    def reset(self) -> None:
        """Start a phase."""
        gc.collect()
        if self.rt.is_cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.rt.device)
            self.ok = True
            return
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:  # not Linux, or not allowed
            self.ok = False
            return
        hwm, rss = _proc_status("VmHWM"), _proc_status("VmRSS")
        # a kernel that ignores the write leaves the old, higher peak
        self.ok = hwm is not None and rss is not None and hwm <= rss + (64 << 20)

    def read(self) -> int | None:
        """Bytes at the peak since :meth:`reset`; None where it could not be reset."""
        if not self.ok:
            return None
        if self.rt.is_cuda:
            return int(torch.cuda.max_memory_allocated(self.rt.device))
        return _proc_status("VmHWM")


def _proc_status(key: str) -> int | None:
    """A ``kB`` field of ``/proc/self/status`` in bytes."""
    try:
        m = re.search(rf"{key}:\s+(\d+) kB", Path("/proc/self/status").read_text())
    except OSError:
        return None
    return int(m.group(1)) * 1024 if m else None


def memory_kind(rt: Runtime, measured: bool) -> str:
    """What the peak-memory row reports."""
    if not measured:
        return "n/a (the peak could not be reset)"
    return "torch.cuda.max_memory_allocated" if rt.is_cuda else "peak RSS of the process (VmHWM)"


class Clock:
    """Wall-clock marks after the device has finished its queued work."""

    def __init__(self, rt: Runtime):
        self.rt = rt
        self.marks: list[float] = []

    def now(self) -> float:
        if self.rt.is_cuda:
            torch.cuda.synchronize(self.rt.device)
        return time.perf_counter()

    def tick(self) -> None:
        self.marks.append(self.now())


@dataclass
class Side:
    """What one side measured (seconds, bytes)."""

    name: str
    step_s: float  # mean over the timed steps
    setup_s: float
    loss: float  # mean training loss over every step, warm-up included
    _: KW_ONLY
    peak_bytes: int | None
    setup_next_s: float | None = None  # fcit: a second client's set-up
    steps: list[float] = field(default_factory=list)
    tokens: tuple[float, float] = (0.0, 0.0)  # per timed step: processed, real (no padding)


@dataclass
class Workload:
    """What every side trains on: the samples (rows of input ids and labels, images) in their
    padded batches, their shape, fcit's LoRA start (flat float32) and wrapped layer names, the
    model FLOPs of a timed step (mean over the timed batches; real tokens only)."""

    batches: list
    shape: BatchShape
    start: np.ndarray
    names: list[str]
    _: KW_ONLY
    flops: float
    rows: list = field(default_factory=list)
    images: torch.Tensor | None = None
    batch_size: int = 1

    def for_side(self, pack: bool, device) -> list:
        """The batches of a side: the padded ones, or the same samples packed."""
        if not pack:
            return self.batches
        return batches_of(self.rows, self.images, self.batch_size, True, device=device)


def _steps(marks: list[float], warmup: int) -> list[float]:
    """Step durations after the warm-up, from the marks (session ready, then every step)."""
    return [b - a for a, b in zip(marks, marks[1:], strict=False)][warmup:]


def make_workload(cfg: Config, rt: Runtime, model, adapter, *, n: int, warmup: int, lengths):
    """The samples of ``n`` batches of ``train.batch_size`` with text lengths drawn from
    ``lengths`` (:class:`fcit_hpc.bench_lengths.Lengths`), padded, and fcit's LoRA start."""
    shape = batch_shape(model, cfg.model.max_seq_len)
    B = cfg.train.batch_size
    gen = torch.Generator().manual_seed(cfg.seed)
    text_lens = lengths.draw(B * n, cfg.model.max_seq_len, cfg.seed)
    rows = synthetic_rows(shape, text_lens, gen)
    images = _images(shape, len(rows), gen)
    timed = [len(ids) for ids, _ in rows[B * warmup :]]
    flops = sum(sample_flops(model, adapter.numel, shape, T) for T in timed) / max(1, n - warmup)
    return Workload(
        batches_of(rows, images, B, False, device=rt.device),
        shape,
        adapter.init_vector(torch.Generator().manual_seed(cfg.seed)).numpy(),
        list(adapter.names),
        flops=flops,
        rows=rows,
        images=images,
        batch_size=B,
    )


def run_fcit(
    cfg: Config,
    rt: Runtime,
    n: int,
    warmup: int,
    *,
    mem: PeakMemory,
    work: Workload | None = None,
    lengths=FIXED,
    name: str = "",
):
    """fcit's model and trainer of ``train.backend`` on subspace 0 (one subspace: what a client
    trains) over ``n`` synthetic batches (``work``'s; made here when None, with ``lengths``),
    padded or packed as ``train.packing`` says, then a second client's set-up. Returns (side,
    workload); the model's Liger patches are undone at the end."""
    mem.reset()
    model, adapter, _ = run_model(cfg, 1, rt)
    try:
        if work is None:
            work = make_workload(cfg, rt, model, adapter, n=n, warmup=warmup, lengths=lengths)
        batches = work.for_side(cfg.train.packing, rt.device)
        trainer = make_trainer(cfg, rt)
        opt = LocalOpt(cfg.train.lr, cfg.train.weight_decay, cfg.train.warmup_ratio)
        first, nxt = Clock(rt), Clock(rt)
        t0 = first.now()
        res = trainer.train(
            model, adapter, 0, work.start, batches=batches, opt=opt, tick=first.tick
        )
        peak = mem.read()
        t1 = nxt.now()  # the next client: a fresh session (engine) again
        trainer.train(model, adapter, 0, work.start, batches=batches[:1], opt=opt, tick=nxt.tick)
    finally:
        applied = getattr(model, "fcit_liger", None)
        if applied is not None:
            applied.restore()
    t = cfg.train
    backend = f"deepspeed ZeRO-{t.zero_stage}" if t.backend == "deepspeed" else t.backend
    steps = _steps(first.marks, warmup)
    side = Side(
        name or f"fcit ({backend})",
        sum(steps) / len(steps),
        first.marks[0] - t0,
        res.loss,
        peak_bytes=peak,
        setup_next_s=nxt.marks[0] - t1,
        steps=steps,
        tokens=_tokens(batches[warmup:]),
    )
    return side, work


def _tokens(batches: list) -> tuple[float, float]:
    """(tokens, real tokens) per batch, mean over ``batches``: what the device processed,
    padding included, and the samples' own tokens."""
    n = max(1, len(batches))
    return (
        sum(b["input_ids"].numel() for b in batches) / n,
        sum(real_tokens(b) for b in batches) / n,
    )


def plain_base(cfg: Config, rt: Runtime):
    """A fresh base model of the config on the runtime's device (same seed as fcit's)."""
    model = build_base_model(cfg.model, rt.dtype, rt.device).to(rt.device)
    if rt.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    return model


def add_peft(model, cfg: Config):
    """PEFT LoRA of ``lora.*`` on the target modules (alpha / r scaling, as fcit's)."""
    lc = cfg.lora
    peft_cfg = LoraConfig(
        r=lc.lora_r,
        lora_alpha=lc.lora_alpha,
        target_modules=list(lc.target_modules),
        lora_dropout=lc.lora_dropout,
    )
    return get_peft_model(model, peft_cfg)


def peft_lora(model, names: list[str]) -> list[torch.nn.Parameter]:
    """PEFT's LoRA weights in fcit's flat order: per wrapped layer (``names``, fcit's adapter
    order) A [r, in] then B [out, r]."""
    base = model.base_model.model
    out = []
    for n in names:
        m = base.get_submodule(n)
        out += [m.lora_A["default"].weight, m.lora_B["default"].weight]
    return out


@torch.no_grad()
def load_peft_lora(params: list[torch.nn.Parameter], vec) -> None:
    """Write fcit's flat subspace vector into PEFT's LoRA weights (:func:`peft_lora` order)."""
    vec = torch.as_tensor(vec, dtype=torch.float32)
    off = 0
    for p in params:
        p.copy_(vec[off : off + p.numel()].view_as(p))
        off += p.numel()


class PlainLoop:
    """forward, backward, AdamW step: the loop of a plain PEFT script (fp16 with a gradient
    scaler), with fcit's learning-rate schedule."""

    def __init__(self, model, params: list, cfg: Config, rt: Runtime):
        self.model = model
        t = cfg.train
        self.opt = torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay)
        self.scaler = torch.amp.GradScaler(rt.device.type) if rt.precision == "fp16" else None
        self.lr, self.warmup_ratio = t.lr, t.warmup_ratio
        model.train()

    def step(self, i: int, total: int, batch: dict) -> torch.Tensor:
        """Step ``i`` of ``total``; returns the loss (on the device)."""
        for g in self.opt.param_groups:
            g["lr"] = lr_at(i, total, self.lr, self.warmup_ratio)
        loss = self.model(**batch).loss
        if self.scaler is None:
            loss.backward()
            self.opt.step()
        else:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.opt)
            self.scaler.update()
        self.opt.zero_grad(set_to_none=True)
        return loss.detach()


def run_plain(cfg: Config, rt: Runtime, work: Workload, warmup: int, *, mem: PeakMemory) -> Side:
    """The plain PEFT loop from fcit's start on the same batches; set-up = PEFT wrapping, loading
    the start and AdamW."""
    mem.reset()
    base = plain_base(cfg, rt)
    clock = Clock(rt)
    t0 = clock.now()
    model = add_peft(base, cfg)
    params = peft_lora(model, work.names)
    load_peft_lora(params, work.start)
    loop = PlainLoop(model, params, cfg, rt)
    clock.tick()
    losses = []
    for i, batch in enumerate(work.batches):
        losses.append(loop.step(i, len(work.batches), batch))
        clock.tick()
    peak = mem.read()
    steps = _steps(clock.marks, warmup)
    loss = float(torch.stack(losses).float().mean())
    mean = sum(steps) / len(steps)
    tokens = _tokens(work.batches[warmup:])
    return Side(
        "plain HF + PEFT",
        mean,
        clock.marks[0] - t0,
        loss,
        peak_bytes=peak,
        setup_next_s=None,
        steps=steps,
        tokens=tokens,
    )


def summarise(
    sides: dict[str, Side],
    flops: float,
    peak: float | None,
    client_steps: int,
) -> dict:
    """Derived figures: tokens/s (processed, padding included), real tokens/s, MFU and peak GB
    per side and their ratios to the plain side, the fcit / plain ratios, and fcit's set-up
    share of a client's local training at ``client_steps`` steps."""
    out: dict = {}
    for key, s in sides.items():
        out[key] = {
            "tokens_per_s": s.tokens[0] / s.step_s,
            "real_tokens_per_s": s.tokens[1] / s.step_s,
            "mfu": None if peak is None else flops / s.step_s / peak,
            "peak_gb": None if s.peak_bytes is None else s.peak_bytes / 1e9,
        }
    p = out["plain"]
    for key in sides:
        d = out[key]
        d["x_plain_tokens_per_s"] = d["tokens_per_s"] / p["tokens_per_s"]
        d["x_plain_real_tokens_per_s"] = d["real_tokens_per_s"] / p["real_tokens_per_s"]
        both = d["peak_gb"] is not None and p["peak_gb"] is not None
        d["x_plain_memory"] = d["peak_gb"] / p["peak_gb"] if both else None
    out["ratio_tokens_per_s"] = out["fcit"]["x_plain_tokens_per_s"]
    out["ratio_memory"] = out["fcit"]["x_plain_memory"]
    fs = sides["fcit"]
    for label, setup in (("next", fs.setup_next_s), ("first", fs.setup_s)):
        out[f"setup_share_{label}"] = setup / (setup + client_steps * fs.step_s)
    # steps per client from which the next client's set-up is at most the target share
    t = SETUP_SHARE_TARGET
    out["setup_breakeven_steps"] = fs.setup_next_s * (1 - t) / (t * fs.step_s)
    return out


def variants_table(r: dict) -> str:
    """One row per variant (markdown): tokens/s, real tokens/s, their ratios to plain PEFT, peak
    memory and its ratio, MFU, mean loss; a refused variant with its reason."""
    d = r["derived"]
    head = [
        "| variant | tokens/s | real tokens/s | × plain (real tokens/s) | peak GB | × plain "
        "(memory) | MFU % | mean loss |",
        "|---|---|---|---|---|---|---|---|",
    ]
    rows = []
    for key in r["variants"]:
        if key in r["refused"]:
            name = r["fcit"]["name"] + VARIANTS[key][0]
            rows.append(f"| {name} | refused: {r['refused'][key]} | | | | | | |")
            continue
        s, x = r["sides"][key], d[key]
        cells = [
            s["name"],
            _num(x["tokens_per_s"], ".1f"),
            _num(x["real_tokens_per_s"], ".1f"),
            _num(x["x_plain_real_tokens_per_s"], ".3f"),
            _num(x["peak_gb"], ".3f"),
            _num(x["x_plain_memory"], ".3f"),
            _num(x["mfu"], ".1f", 100),
            _num(s["loss"], ".4f"),
        ]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(head + rows)


def _num(x: float | None, spec: str, scale: float = 1.0) -> str:
    return "n/a" if x is None else format(x * scale, spec)


def report(r: dict) -> str:
    """The side-by-side table (markdown) and the set-up share, as printed."""
    f, p, d = r["fcit"], r["plain"], r["derived"]
    df, dp = d["fcit"], d["plain"]
    rows = [
        (
            "tokens/s",
            _num(df["tokens_per_s"], ".1f"),
            _num(dp["tokens_per_s"], ".1f"),
            _num(d["ratio_tokens_per_s"], ".3f"),
        ),
        ("s/step", _num(f["step_s"], ".4f"), _num(p["step_s"], ".4f"), ""),
        (
            "s/step, median",
            _num(statistics.median(f["steps"]), ".4f"),
            _num(statistics.median(p["steps"]), ".4f"),
            "",
        ),
        (
            "peak memory GB",
            _num(df["peak_gb"], ".3f"),
            _num(dp["peak_gb"], ".3f"),
            _num(d["ratio_memory"], ".3f"),
        ),
        ("set-up s, first client", _num(f["setup_s"], ".3f"), _num(p["setup_s"], ".3f"), ""),
        ("set-up s, next client", _num(f["setup_next_s"], ".3f"), "–", ""),
        ("MFU %", _num(df["mfu"], ".1f", 100), _num(dp["mfu"], ".1f", 100), ""),
        ("mean loss", _num(f["loss"], ".4f"), _num(p["loss"], ".4f"), ""),
    ]
    peak = "n/a (CPU or a device not in the table)"
    if r["peak_flops"] is not None:
        peak = f"{r['peak_flops'] / 1e12:.1f} TFLOP/s"
    n = r["client_steps"]
    t = 100 * SETUP_SHARE_TARGET
    return "\n".join(
        [
            f"config {r['config']}: {r['device']}, {r['precision']}, batch {r['batch_size']} x "
            f"{r['seq_len']} tokens ({r['image_tokens']} image), gradient checkpointing "
            f"{'on' if r['gradient_checkpointing'] else 'off'}, {r['steps']} steps timed after "
            f"{r['warmup']} warm-up",
            f"model FLOPs per step {r['flops_per_step']:.4g}, device peak {peak}; "
            f"memory: {r['memory_kind']}",
            "",
            f"| | {f['name']} | {p['name']} | fcit / plain |",
            "|---|---|---|---|",
            *(f"| {a} | {b} | {c} | {e} |" for a, b, c, e in rows),
            "",
            f"set-up share of a client's local training at {n} steps per client "
            f"({r['client_steps_source']}): next client "
            f"{100 * d['setup_share_next']:.2f}%, first client {100 * d['setup_share_first']:.2f}%",
            f"the next client's set-up is <= {t:.0f}% from "
            f"{d['setup_breakeven_steps']:.1f} steps per client on",
        ]
    )


# --variants: label and the overrides after the user's (fcit's reference row: no Liger, padded)
# (what fcit's row name gets appended, overrides); plain's row is run_plain's
VARIANTS: dict[str, tuple[str, tuple[str, ...]]] = {
    "plain": ("", ()),
    "fcit": ("", ("train.liger=off", "train.packing=false")),
    "liger": (" + liger", ("train.liger=on", "train.packing=false")),
    "packing": (" + packing", ("train.liger=off", "train.packing=true")),
    "liger+packing": (" + liger + packing", ("train.liger=on", "train.packing=true")),
}


def parse_variants(spec: str) -> list[str]:
    """``--variants`` → variant keys in :data:`VARIANTS` order; plain and fcit always run (the
    reference rows)."""
    keys = [k.strip() for k in spec.split(",") if k.strip()]
    for k in keys:
        if k not in VARIANTS:
            raise ConfigError(f"--variants: unknown {k!r} (one of {', '.join(VARIANTS)})")
    return [k for k in VARIANTS if k in keys or k in ("plain", "fcit")]


def bench_train(args) -> int:
    """``fcit bench train CONFIG [overrides]``: plain PEFT, fcit and fcit's variants on the same
    samples, the tables, optionally JSON."""
    if not args.items or "=" in args.items[0]:
        raise ConfigError("fcit bench train: give CONFIG, then overrides")
    for flag, value, low in (
        ("--steps", args.steps, 1),
        ("--warmup", args.warmup, 0),
        ("--client-steps", args.client_steps, 1),
    ):
        if value is not None and value < low:
            raise ConfigError(f"{flag}: {value} is out of range (must be >= {low})")
    lengths = parse_lengths(args.lengths)
    variants = parse_variants(args.variants)
    cfg = load_config(args.items[0], args.items[1:])
    # one client, one process
    rt = make_runtime(cfg.train, cfg.federation, 0, 1, launch=LaunchInfo())
    apply_runtime(rt)
    torch.set_num_threads(cfg.train.num_threads)
    init_group_worlds(cfg.train.backend, LocalComm(), rt)  # DeepSpeed's world of one
    mem = PeakMemory(rt)
    n = args.warmup + args.steps

    def variant_cfg(key: str) -> Config:
        return load_config(args.items[0], [*args.items[1:], *VARIANTS[key][1]])

    fcit, work = run_fcit(variant_cfg("fcit"), rt, n, args.warmup, mem=mem, lengths=lengths)
    sides = {"fcit": fcit, "plain": run_plain(cfg, rt, work, args.warmup, mem=mem)}
    refused: dict[str, str] = {}
    for key in variants:
        if key in sides:
            continue
        try:
            vcfg = variant_cfg(key)
            name = fcit.name + VARIANTS[key][0]
            sides[key], _ = run_fcit(vcfg, rt, n, args.warmup, mem=mem, work=work, name=name)
        except ConfigError as e:  # a switch that cannot run here, with its reason
            refused[key] = str(e)
    client_steps, source = args.client_steps, "--client-steps"
    if client_steps is None:
        client_steps = DEFAULT_CLIENT_STEPS
        source = "assumed: PROTOCOL.md states no per-client sample counts; set --client-steps"
    shape = work.shape
    r = {
        "config": args.items[0],
        "overrides": args.items[1:],
        "device": torch.cuda.get_device_name(rt.device) if rt.is_cuda else "cpu",
        "precision": rt.precision,
        "batch_size": cfg.train.batch_size,
        "seq_len": shape.seq_len,
        "image_tokens": shape.image_tokens,
        "lengths": lengths.describe(cfg.model.max_seq_len),
        "gradient_checkpointing": rt.gradient_checkpointing,
        "steps": args.steps,
        "warmup": args.warmup,
        "tokens_per_step": fcit.tokens[0],
        "real_tokens_per_step": fcit.tokens[1],
        "flops_per_step": work.flops,
        "peak_flops": peak_flops(rt),
        "memory_kind": memory_kind(rt, fcit.peak_bytes is not None),
        "client_steps": client_steps,
        "client_steps_source": source,
        "fcit": asdict(fcit),
        "plain": asdict(sides["plain"]),
        "variants": variants,
        "sides": {k: asdict(v) for k, v in sides.items()},
        "refused": refused,
    }
    r["derived"] = summarise(sides, work.flops, r["peak_flops"], client_steps)
    print(report(r))
    print()
    print(
        f"lengths: {r['lengths']} (+{shape.image_tokens} image); padded batches are "
        f"{100 * (1 - fcit.tokens[1] / fcit.tokens[0]):.1f}% padding; MFU counts the real "
        "tokens' model FLOPs"
    )
    print(variants_table(r))
    if args.json:
        Path(args.json).write_text(json.dumps(r, indent=1))
    return 0
