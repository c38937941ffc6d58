"""Export of a run's adapters as PEFT LoRA adapters (``PeftModel.from_pretrained`` loads them).

- ``subspace_<k>/``: subspace k alone (rank r — S_max·r for Finetune/EWC's single LoRA at
  parity — with lora_alpha keeping the configured scaling): SSA with α = one-hot(k).
- the trained LLaVA projector, when the run trained it, in every adapter as PEFT's
  ``modules_to_save``.
- ``merged/``: one adapter for a fixed α: Σ_i α_i B_i A_i = (B_cat · diag(expand_r(α))) A_cat,
  an exact LoRA of rank S·r whose lora_alpha keeps the scaling alpha / r.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from fcit_hpc.config import LoraConfig, ModelConfig
from fcit_hpc.model.build import build_base_model, build_model
from fcit_hpc.model.projector import projector_name
from fcit_hpc.state.schema import RunState


def _peft_model(
    model: ModelConfig,
    lora: LoraConfig,
    *,
    r: int,
    lora_alpha: float,
    projector: np.ndarray | None = None,
):
    """A PEFT LoRA model of the base; with ``projector`` (the run's trained LLaVA projector) the
    projector is a ``modules_to_save`` module holding those weights."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    base = build_base_model(model)
    name = projector_name(base) if projector is not None and projector.size else None
    lc = PeftLoraConfig(
        r=r,
        lora_alpha=lora_alpha,
        lora_dropout=0.0,
        target_modules=list(lora.target_modules),
        modules_to_save=[name.split(".")[-1]] if name else None,
    )
    pm = get_peft_model(base, lc)
    if name:
        wrapper = pm.base_model.model.get_submodule(name)
        set_projector_module(wrapper.modules_to_save["default"], projector)
    return pm


def set_projector_module(module, vec) -> None:
    """Load a flat float32 vector into a projector module's parameters."""
    vec = torch.as_tensor(np.asarray(vec, np.float32))
    off = 0
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(vec[off : off + p.numel()].view_as(p))
            off += p.numel()
    if off != vec.numel():
        raise ValueError(f"projector vector has {vec.numel()} values, the module {off}")


def _fill(peft_model, names, weights) -> None:
    """weights: per wrapped layer name, (A [r', in], B [out, r'])."""
    root = peft_model.base_model.model
    with torch.no_grad():
        for name in names:
            layer = root.get_submodule(name)
            A, B = weights[name]
            layer.lora_A["default"].weight.copy_(A)
            layer.lora_B["default"].weight.copy_(B)


def export_lora(
    model: ModelConfig,
    lora: LoraConfig,
    st: RunState,
    out_dir: str | Path,
    *,
    name: str,
    weights: dict,
    rank: int,
) -> Path:
    """Write the base model (``base/``) and one PEFT LoRA adapter ``name/`` of rank ``rank`` from
    per-layer (A [rank, in], B [out, rank]), keeping the run's scaling alpha / r (and carrying
    its trained projector). Returns the adapter's folder."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    build_base_model(model).save_pretrained(out / "base")
    r, la = lora.lora_r, lora.lora_alpha
    pm = _peft_model(model, lora, r=rank, lora_alpha=la / r * rank, projector=st.projector)
    _fill(pm, list(weights), weights)
    pm.save_pretrained(out / name)
    return out / name


def export_adapters(
    model: ModelConfig,
    lora: LoraConfig,
    st: RunState,
    out_dir: str | Path,
    *,
    alpha: np.ndarray | None = None,
    rank: int | None = None,
) -> list[Path]:
    """Write the base model (``base/``), one PEFT adapter per live subspace (of rank ``rank``,
    lora.lora_r by default) and, if ``alpha`` [S] is given, the merged adapter. Returns the
    adapter directories."""
    live = max(st.num_subspaces, 1)
    if alpha is not None:  # checked before anything is written
        alpha = np.asarray(alpha, dtype=np.float32)
        if alpha.shape != (live,) or not np.isfinite(alpha).all():
            raise ValueError(f"--alpha: expected {live} finite weights, got {alpha.tolist()}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _, adapter, _ = build_model(model, lora, st.adapter.shape[0], rank=rank)
    for k in range(st.adapter.shape[0]):
        adapter.set(k, st.adapter[k])
    build_base_model(model).save_pretrained(out / "base")
    r = adapter.r
    la = lora.lora_alpha * r / lora.lora_r  # the run's scaling alpha / r
    written = []
    pm = _peft_model(model, lora, r=r, lora_alpha=la, projector=st.projector)
    for k in range(live):
        _fill(
            pm,
            adapter.names,
            {
                n: (m.lora_A[k], m.lora_B[k])
                for n, m in zip(adapter.names, adapter.layers, strict=True)
            },
        )
        pm.save_pretrained(out / f"subspace_{k}")
        written.append(out / f"subspace_{k}")
    if alpha is not None:
        a = torch.from_numpy(alpha).repeat_interleave(r)  # [S·r]
        pm = _peft_model(
            model, lora, r=r * live, lora_alpha=la / r * (r * live), projector=st.projector
        )
        weights = {}
        for n, m in zip(adapter.names, adapter.layers, strict=True):
            A_cat = torch.cat(list(m.lora_A[:live]), 0)  # [S·r, in]
            B_cat = torch.cat(list(m.lora_B[:live]), 1) * a  # [out, S·r]
            weights[n] = (A_cat, B_cat)
        _fill(pm, adapter.names, weights)
        pm.save_pretrained(out / "merged")
        written.append(out / "merged")
    return written
