"""Liger kernels (``liger-kernel``, the ``[fast]`` extra) on the language model of a training run:
fused linear + cross-entropy (the loss from the last hidden states and the LM head in chunks,
never the [tokens × vocab] float32 logits), RMSNorm, SwiGLU and RoPE as Triton kernels.

They are applied the library's way, by its function for the model type
(``apply_liger_kernel_to_llama`` ... with ``model=``: the instance's norms and MLPs get Liger's
forward, the model's forward Liger's ``lce_forward``). One thing is process-wide in the library:
RoPE replaces ``apply_rotary_pos_emb`` in the architecture's ``modeling_*`` module;
:meth:`Applied.restore` puts the module's names back (``fcit bench train`` runs variants with and
without Liger in one process).

``train.liger``: ``off``; ``on`` (refused with the reason where an op cannot run: no library, no
GPU, ZeRO-3 with the fused loss, a model type Liger does not cover); ``auto`` = on with CUDA when
installed, else off. On the CPU the kernels run only under ``TRITON_INTERPRET=1`` (tests); there
each requested op is first tried on a tiny input, and one the interpreter cannot run is refused
with its error (liger-kernel 0.8.5: RMSNorm and SwiGLU pass a Python float to a kernel, which the
interpreter does not wrap).
"""

from __future__ import annotations

import importlib
import os
import types
from dataclasses import dataclass, field

import torch

from fcit_hpc.errors import ConfigError
from fcit_hpc.registry import LIGER_OPS

INSTALL_HINT = "pip install 'fcit_hpc[fast]' (liger-kernel)"


def installed() -> bool:
    return importlib.util.find_spec("liger_kernel") is not None


def interpreted() -> bool:
    """Triton kernels run by the interpreter (on the CPU)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def resolve_ops(train, device: torch.device) -> tuple[str, ...]:
    """The Liger ops a run applies (``train.liger``, ``train.liger_ops``, ``train.zero_stage``,
    the device): () for off; a ConfigError naming the field and the reason for an ``on`` that
    cannot run."""
    mode = train.liger
    if mode == "off":
        return ()
    ops = tuple(o for o in LIGER_OPS if o in train.liger_ops)
    on = mode == "on"
    if not installed():
        if on:
            raise ConfigError(
                f"train.liger: on, but liger-kernel is not installed ({INSTALL_HINT})"
            )
        return ()
    cuda = device.type == "cuda"
    if not cuda and not (on and interpreted()):
        if on:
            raise ConfigError(
                "train.liger: on needs a CUDA device: Liger's ops are Triton kernels, which "
                "run on the CPU only under TRITON_INTERPRET=1 (for tests); use train.liger=auto "
                "or off on the CPU"
            )
        return ()
    if (
        train.backend == "deepspeed"
        and train.zero_stage == 3
        and "fused_linear_cross_entropy" in ops
    ):
        # lce_forward reads lm_head.weight outside lm_head's forward: under ZeRO-3 it is
        # partitioned (empty) there. Liger redirects this for FSDP only.
        if on:
            raise ConfigError(
                "train.liger_ops: fused_linear_cross_entropy reads the LM head's weight outside "
                "its module, which ZeRO-3 has partitioned; leave it out with train.zero_stage 3"
            )
        ops = tuple(o for o in ops if o != "fused_linear_cross_entropy")
    if not cuda:
        for op in ops:
            err = _probe(op)
            if err:
                raise ConfigError(
                    f"train.liger_ops: {op} does not run under the Triton interpreter here "
                    f"({err}); leave it out of train.liger_ops on the CPU"
                )
    return ops


def _probe(op: str) -> str:
    """'' when Liger's ``op`` runs forward and backward on a tiny float32 CPU input, else the
    error."""
    from liger_kernel.transformers import functional as F

    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 8, generator=g, requires_grad=True)
    try:
        if op == "fused_linear_cross_entropy":
            w = torch.randn(16, 8, generator=g)
            out = F.liger_fused_linear_cross_entropy(x, w, torch.arange(4))
        elif op == "rms_norm":
            out = F.liger_rms_norm(x, torch.ones(8), 1e-6, in_place=False)
        elif op == "swiglu":
            out = F.liger_swiglu(x, x.detach() + 1)
        else:  # rope: q, k [batch, heads, T, head_dim], cos/sin [batch, T, head_dim]
            q = x.view(1, 1, 4, 8)
            cos, sin = torch.ones(1, 4, 8), torch.zeros(1, 4, 8)
            out = F.liger_rope(q, q.detach().clone(), cos, sin)[0]
        out.sum().backward()
    except Exception as e:  # the interpreter's errors are of many kinds
        return f"{type(e).__name__}: {str(e)[:160]}"
    return ""


@dataclass
class Applied:
    """What :func:`apply_liger` did: the ops, and the module names it replaced process-wide."""

    ops: tuple[str, ...] = ()
    saved: dict = field(default_factory=dict)  # {module: {name: old value}}

    def restore(self) -> None:
        """Put back the names the library replaced in ``transformers.models.*`` modules (the
        instance keeps its patches; it is not to be used after this)."""
        for mod, names in self.saved.items():
            for k, v in names.items():
                setattr(mod, k, v)
        self.saved = {}


def text_model_type(model) -> str:
    c = model.config
    return c.get_text_config().model_type


def _modeling_modules(model) -> list:
    """The ``transformers.models.<type>.modeling_<type>`` modules of a model's architecture (and
    of its text model)."""
    out = []
    for t in {model.config.model_type, text_model_type(model)}:
        try:
            out.append(importlib.import_module(f"transformers.models.{t}.modeling_{t}"))
        except ImportError:
            pass
    return out


def apply_liger(model, ops: tuple[str, ...]) -> Applied:
    """Liger's ``ops`` on ``model`` (a Hugging Face causal LM or LLaVA, after the LoRA layers are
    injected: Liger's SwiGLU calls the MLP's own gate/up/down modules). The result is also
    ``model.fcit_liger``: a trainer that needs the logits asks for them (:func:`logits_kwargs`)."""
    if not ops:
        return Applied()
    import inspect

    from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN

    for t in {model.config.model_type, text_model_type(model)}:
        if t not in MODEL_TYPE_TO_APPLY_LIGER_FN:
            raise ConfigError(f"train.liger: liger-kernel has no kernels for model type {t!r}")
    saved = {m: dict(vars(m)) for m in _modeling_modules(model)}
    kw = {"cross_entropy": False, **{op: op in ops for op in LIGER_OPS}}
    target = model
    if model.config.model_type == "llava":
        # liger-kernel 0.8.5's LLaVA forward builds an output with a field transformers 5.x
        # dropped (image_hidden_states): its text model gets the library's kernels, the LLaVA
        # model the fused loss through :func:`_llava_fused_forward`
        target = model.model.language_model
        if kw.pop("fused_linear_cross_entropy"):
            model.forward = types.MethodType(_llava_fused_forward, model)
        kw["fused_linear_cross_entropy"] = False
    fn = MODEL_TYPE_TO_APPLY_LIGER_FN[target.config.model_type]
    params = inspect.signature(fn).parameters
    fn(model=target, **{k: v for k, v in kw.items() if k in params})
    changed = {
        m: {k: v for k, v in before.items() if vars(m).get(k) is not v}
        for m, before in saved.items()
    }
    model.fcit_liger = Applied(ops, {m: c for m, c in changed.items() if c})
    return model.fcit_liger


def logits_kwargs(model) -> dict:
    """Keyword arguments for a training forward whose caller needs the logits (a client group's
    share of the loss, LwF's distillation): Liger's fused loss skips them in training."""
    applied = getattr(model, "fcit_liger", None)
    if applied is not None and "fused_linear_cross_entropy" in applied.ops:
        return {"skip_logits": False}
    return {}


def _llava_fused_forward(self, *args, labels=None, skip_logits=None, **kwargs):
    """LLaVA's forward with Liger's fused linear cross-entropy in training, as Liger's own
    ``lce_forward`` (the loss from the language model's last hidden states and the LM head's
    weight, by ``LigerForCausalLMLoss``); the model's own forward where the logits are wanted
    (evaluation, ``skip_logits=False``, no labels)."""
    from liger_kernel.transformers.model.loss_utils import (
        LigerForCausalLMLoss,
        unpack_cross_entropy_result,
    )
    from transformers.modeling_outputs import CausalLMOutputWithPast

    if skip_logits is None:
        skip_logits = self.training and labels is not None
    if not skip_logits:
        return type(self).forward(self, *args, labels=labels, **kwargs)
    kwargs.pop("logits_to_keep", None)
    out = self.model(*args, return_dict=True, **kwargs)
    result = LigerForCausalLMLoss(
        hidden_states=out.last_hidden_state,
        lm_head_weight=self.lm_head.weight,
        labels=labels,
        hidden_size=self.config.text_config.hidden_size,
    )
    loss = unpack_cross_entropy_result(result)[0]
    return CausalLMOutputWithPast(loss=loss, logits=None, past_key_values=out.past_key_values)
