"""Subspace LoRA: S_max rank-r LoRA blocks per wrapped linear, one trained at a time, gated at
inference (Subspace Selective Activation).

Shapes: A_i [r, in], B_i [out, r]; init A ~ N(0, 0.01) (std), B = 0; scaling = alpha / r.

The LoRA weights are float32 whatever the base model's dtype (fp32 master weights, as PEFT keeps
adapters by default): a bf16 or fp16 model computes with them cast to its dtype, while the
optimizer updates them in float32 — an Adam step of lr 2e-4 on a bf16 weight of magnitude 1e-2 is
below bf16's resolution and would be lost. The global subspaces are float32 in the state and on the
wire, so a client starts from them exactly.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn

from fcit_hpc.errors import ConfigError
from fcit_kernels import ssa_lora_linear


class Mixer(Protocol):
    """What a method attaches to a layer to mix several subspaces (MoELoRA's router, M-LoRA's
    scales): trainable float32 parameters and the weights of its E experts."""

    experts: int

    def gate(self, x: torch.Tensor) -> torch.Tensor:
        """Expert weights for the layer input x [..., in], in x's dtype: [..., E, 1] (per token),
        [E, 1] (per expert) or [E, out] (per expert and output feature)."""
        ...


class LayerMode:
    """How a :class:`SubspaceLoRALinear` adds its LoRA part, chosen once when the mode is set
    (:meth:`SubspaceLoRALinear.set_mode`, from :class:`SubspaceAdapter`'s ``select`` and
    ``set_activation``), not per forward: :class:`OneSubspace` (train one subspace, frozen
    context beside it), :class:`FrozenSum` (frozen context only), :class:`Mixture` (several
    subspaces mixed by the layer's mixer), :class:`SsaGate` (every live subspace, gated per
    sample)."""

    active: tuple[int, ...] = ()  # subspaces that act (and are trained, when trainable)
    context: tuple[int, ...] = ()  # frozen subspaces that act beside them
    alpha: torch.Tensor | None = None  # SSA gate [B, S_live] (SsaGate only)

    def forward(self, layer: SubspaceLoRALinear, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


def _with_context(layer: SubspaceLoRALinear, x: torch.Tensor, context) -> torch.Tensor:
    """base(x) + scaling · Σ_{i in context} B_i A_i x (frozen, without dropout)."""
    y = layer.base(x)
    dt = x.dtype
    for i in context:
        y = y + (x @ layer.lora_A[i].to(dt).t() @ layer.lora_B[i].to(dt).t()) * layer.scaling
    return y


class FrozenSum(LayerMode):
    """base(x) + the frozen ``context`` subspaces (none: the base model alone)."""

    def __init__(self, context: tuple[int, ...] = ()):
        self.context = tuple(context)

    def forward(self, layer, x):
        return _with_context(layer, x, self.context)


class OneSubspace(LayerMode):
    """Subspace k (trained) adds B_k A_k dropout(x), beside the frozen ``context``."""

    def __init__(self, k: int, context: tuple[int, ...] = ()):
        self.k, self.active, self.context = int(k), (int(k),), tuple(context)

    def forward(self, layer, x):
        y = _with_context(layer, x, self.context)
        dt = x.dtype
        a, b = layer.lora_A[self.k].to(dt), layer.lora_B[self.k].to(dt)
        return y + (layer.dropout(x) @ a.t() @ b.t()) * layer.scaling


class Mixture(LayerMode):
    """The ``active`` subspaces' rows (A_cat [R, in], R = |active|·r) form the E experts of the
    layer's mixer, R/E rows each; expert j adds g_j ⊙ B_j A_j dropout_j(x) with g =
    mixer.gate(x) and its own dropout mask (as CoIN's MoELoRA applies the dropout module once
    per expert). Without gradients a scalar gate is an SSA gate: the fused kernel."""

    def __init__(self, active: tuple[int, ...], context: tuple[int, ...] = ()):
        self.active, self.context = tuple(active), tuple(context)

    def forward(self, layer, x):
        if not torch.is_grad_enabled():
            fast = self._inference(layer, x)
            if fast is not None:
                return fast
        y = _with_context(layer, x, self.context)
        dt = x.dtype
        g = layer.mixer.gate(x)  # [..., E, K]
        experts = g.shape[-2]
        A = torch.cat([layer.lora_A[i] for i in self.active], 0).to(dt)  # [R, in]
        B = torch.cat([layer.lora_B[i] for i in self.active], 1).to(dt)  # [out, R]
        n = A.shape[0] // experts  # rank of one expert
        for j in range(experts):
            h = layer.dropout(x) @ A[j * n : (j + 1) * n].t()  # [..., n], its own dropout mask
            y = y + (h @ B[:, j * n : (j + 1) * n].t()) * (g[..., j, :] * layer.scaling)
        return y

    def _inference(self, layer, x: torch.Tensor) -> torch.Tensor | None:
        """Without gradients and dropout, a per-token or per-expert scalar gate is an SSA gate
        over the subspaces (each expert a whole number of subspaces): the fused kernel; None when
        the mixture does not fit that form."""
        s = len(self.active)
        if layer.training and not isinstance(layer.dropout, nn.Identity):
            return None
        if self.active != tuple(range(s)):
            return None
        g = layer.mixer.gate(x)  # [..., E, K]
        experts = g.shape[-2]
        if g.shape[-1] != 1 or s % experts:
            return None
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])  # [N, in]
        a = g[..., 0].reshape(-1, experts).repeat_interleave(s // experts, dim=1)  # [N | 1, S]
        a = a.expand(x2.shape[0], s)
        A_cat, B_cat = layer.concatenated(s, x.dtype)
        w, bias = layer.base.weight, layer.base.bias
        y = ssa_lora_linear(x2, w, bias, A_cat, B_cat, a, layer.scaling)
        return y.view(*lead, -1)


class SsaGate(LayerMode):
    """Inference: all live subspaces, weighted per sample by α [B, S_live] (float32, on the
    layer's device): the fused SSA-LoRA op over the cached concatenation."""

    def __init__(self, alpha: torch.Tensor):
        self.alpha = alpha

    def forward(self, layer, x):
        s = self.alpha.shape[1]
        lead = x.shape[:-1]  # (B, T)
        x2 = x.reshape(-1, x.shape[-1])  # [B·T, in]; row b·T + t is gated by α[b]
        a = self.alpha if self.alpha.device == x.device else self.alpha.to(x.device)
        A_cat, B_cat = layer.concatenated(s, x.dtype)
        y = ssa_lora_linear(x2, layer.base.weight, layer.base.bias, A_cat, B_cat, a, layer.scaling)
        return y.view(*lead, -1)


def subspace_mode(active: tuple[int, ...], context: tuple[int, ...], mixed: bool) -> LayerMode:
    """The training-side mode of subspaces ``active`` beside ``context``: none active →
    :class:`FrozenSum`; a layer with a mixer (``mixed``) → :class:`Mixture`; one →
    :class:`OneSubspace`."""
    if not active:
        return FrozenSum(context)
    if mixed:
        return Mixture(active, context)
    (k,) = active
    return OneSubspace(k, context)


class SubspaceLoRALinear(nn.Module):
    """``y = base(x) + scaling · Σ_i α_i B_i A_i dropout(x)``, as its :class:`LayerMode` says.

    Training: the ``active`` subspaces contribute (one alone, or several mixed by ``mixer``);
    the ``context`` subspaces (O-LoRA: earlier tasks) contribute too, frozen, without dropout.
    Inference (SSA): all live subspaces, weighted per sample by ``alpha`` [B, S_live].
    """

    def __init__(self, base: nn.Linear, r: int, lora_alpha: float, dropout: float, *, s_max: int):
        super().__init__()
        self.base = base
        for p in base.parameters():  # the base model is never trained
            p.requires_grad_(False)
        self.r = r
        self.scaling = lora_alpha / r
        self.s_max = s_max
        dev, dt = base.weight.device, torch.float32  # fp32 master weights (module docstring)
        self.lora_A = nn.ParameterList(
            [
                nn.Parameter(torch.zeros(r, base.in_features, device=dev, dtype=dt))
                for _ in range(s_max)
            ]
        )
        self.lora_B = nn.ParameterList(
            [
                nn.Parameter(torch.zeros(base.out_features, r, device=dev, dtype=dt))
                for _ in range(s_max)
            ]
        )
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.mixer: Mixer | None = None  # a registered module once a method attaches one
        self.mode: LayerMode = OneSubspace(0)
        # the live subspaces concatenated in the compute dtype (SSA gate, mixture inference),
        # built on first use, dropped when the mode or the weights change (:meth:`clear_cache`)
        self._cat: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def active(self) -> tuple[int, ...]:
        return self.mode.active

    @property
    def context(self) -> tuple[int, ...]:
        return self.mode.context

    @property
    def alpha(self) -> torch.Tensor | None:
        return self.mode.alpha

    def set_mode(self, mode: LayerMode, keep_cache: bool = False) -> None:
        """Use ``mode`` from the next forward on. The cached concatenation is dropped unless
        ``keep_cache`` (a new SSA gate over the same weights reuses it)."""
        self.mode = mode
        if not keep_cache:
            self._cat = None

    def attach_mixer(self, mixer: nn.Module) -> None:
        """A method's mixer (registered, frozen until trained); the layer's subspaces are then
        mixed by it whenever several act."""
        self.mixer = mixer
        mixer.requires_grad_(False)
        self.set_mode(subspace_mode(self.active, self.context, True))

    def clear_cache(self) -> None:
        """The weights changed: the next forward rebuilds the concatenation it needs."""
        self._cat = None

    def cache_id(self) -> int:
        """Identity of the cached concatenation (0: none): a CUDA graph that read it must be
        captured again once it changes."""
        return id(self._cat[0]) if self._cat is not None else 0

    def concatenated(self, s: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(A_cat [S·r, in], B_cat [out, S·r]) of the first s subspaces in ``dtype``, cached."""
        c = self._cat
        if c is None or c[0].shape[0] != s * self.r or c[0].dtype != dtype:
            with torch.no_grad():
                a_cat = torch.cat([a.to(dtype) for a in self.lora_A[:s]], 0).contiguous()
                b_cat = torch.cat([b.to(dtype) for b in self.lora_B[:s]], 1).contiguous()
            self._cat = c = (a_cat, b_cat)
        return c

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mode.forward(self, x)


def inject_subspace_lora(model: nn.Module, targets, r, lora_alpha, *, dropout, s_max):
    """Replace every nn.Linear whose name ends with one of ``targets`` by a SubspaceLoRALinear.

    Only the language model's FFN linears are targeted by default (gate/up/down). Base weights are
    frozen. Returns the wrapped layers in module order (the order of every flat vector).
    """
    for p in model.parameters():
        p.requires_grad_(False)
    found = []
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if isinstance(child, nn.Linear) and child_name in targets:
                layer = SubspaceLoRALinear(child, r, lora_alpha, dropout, s_max=s_max)
                setattr(module, child_name, layer)
                found.append((full, layer))
    missing = sorted(set(targets) - {full.rsplit(".", 1)[-1] for full, _ in found})
    if missing:
        linears = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if _linear(m)})
        raise ConfigError(
            f"lora.target_modules: {missing} name no linear layer of the model (its linears: "
            f"{', '.join(linears)})"
        )
    return found


def _linear(m: nn.Module) -> bool:
    return isinstance(m, nn.Linear | SubspaceLoRALinear)


class SubspaceAdapter:
    """The set of SubspaceLoRALinear layers of a model, and flat vectors of one subspace.

    A subspace's flat vector concatenates, layer by layer in module order, A_k then B_k
    (float32, ``numel`` elements).
    """

    def __init__(self, layers: list[tuple[str, SubspaceLoRALinear]]):
        self.names = [n for n, _ in layers]
        self.layers = [m for _, m in layers]
        self.s_max = self.layers[0].s_max
        self.r = self.layers[0].r
        self.numel = sum(m.lora_A[0].numel() + m.lora_B[0].numel() for m in self.layers)

    def params(self, k: int) -> list[nn.Parameter]:
        out = []
        for m in self.layers:
            out += [m.lora_A[k], m.lora_B[k]]
        return out

    def train_subspace(self, k: int | None, context: tuple[int, ...] = ()) -> None:
        """Make subspace k the only one trained (None: none); besides it only the frozen
        subspaces in ``context`` are used."""
        self.select(() if k is None else (k,), context)

    def select(
        self, ks: tuple[int, ...], context: tuple[int, ...] = (), trainable: bool = True
    ) -> None:
        """Subspaces ``ks`` act (several: mixed by the layers' mixers) and, when ``trainable``,
        are the only ones with gradients; the frozen ``context`` subspaces act beside them."""
        ks = tuple(ks)
        if set(ks) & set(context):
            raise ValueError(f"subspaces {ks} cannot be trained and frozen context at once")
        if len(ks) > 1 and any(m.mixer is None for m in self.layers):
            raise ValueError(f"subspaces {ks} act together only through a mixer (MoELoRA, M-LoRA)")
        for m in self.layers:
            m.set_mode(subspace_mode(ks, tuple(context), m.mixer is not None))
            for i in range(m.s_max):
                m.lora_A[i].requires_grad_(trainable and i in ks)
                m.lora_B[i].requires_grad_(trainable and i in ks)

    def set_activation(self, alpha: torch.Tensor | None) -> None:
        """SSA mode: α [B, S_live] for the next forward passes (None leaves SSA mode).

        α is checked for NaN/Inf here, once per activation, and copied to each layer's device as
        float32 once: the forward passes (and the SSA-LoRA op) then never read α's values on
        the host, so nothing synchronizes per layer.
        """
        on_device: dict[torch.device, torch.Tensor] = {}
        if alpha is not None:
            alpha = alpha.detach().to(torch.float32)
            if not torch.isfinite(alpha).all():
                raise ValueError("set_activation: alpha has NaN/Inf")
        for m in self.layers:
            if alpha is not None:
                dev = m.lora_A[0].device
                if dev not in on_device:
                    on_device[dev] = alpha.to(dev).contiguous()
                m.set_mode(SsaGate(on_device[dev]), keep_cache=True)
            else:  # leaving SSA mode: the subspaces that acted before it, without context
                m.set_mode(subspace_mode(m.active, (), m.mixer is not None))
            for i in range(m.s_max):
                m.lora_A[i].requires_grad_(False)
                m.lora_B[i].requires_grad_(False)

    @torch.no_grad()
    def get(self, k: int) -> torch.Tensor:
        return torch.cat([p.detach().float().reshape(-1) for p in self.params(k)])

    def unflatten(self, vec) -> list[torch.Tensor]:
        """A flat subspace vector as tensors shaped (and typed) like ``params(k)``."""
        return unflatten_like(self.params(0), vec, "subspace")

    @torch.no_grad()
    def set(self, k: int, vec) -> None:
        for p, v in zip(self.params(k), self.unflatten(vec), strict=True):
            p.copy_(v)
        for m in self.layers:
            m.clear_cache()

    def mixer_params(self) -> list[nn.Parameter]:
        """The layers' mixer parameters, layer by layer in module order (none without mixers)."""
        return [p for m in self.layers if m.mixer is not None for p in m.mixer.parameters()]

    @property
    def mixer_numel(self) -> int:
        return sum(p.numel() for p in self.mixer_params())

    @torch.no_grad()
    def set_mixer(self, vec) -> None:
        """Load a flat float32 vector (``mixer_params`` order) into the layers' mixers."""
        ps = self.mixer_params()
        for p, v in zip(ps, unflatten_like(ps, vec, "mixer"), strict=True):
            p.copy_(v)
        for m in self.layers:
            m.clear_cache()

    def init_vector(self, generator: torch.Generator) -> torch.Tensor:
        """Fresh subspace: A ~ N(0, 0.01), B = 0, as flat vector."""
        parts = []
        for m in self.layers:
            parts.append(torch.randn(m.lora_A[0].numel(), generator=generator) * 0.01)
            parts.append(torch.zeros(m.lora_B[0].numel()))
        return torch.cat(parts)


def unflatten_like(params, vec, what: str = "flat") -> list[torch.Tensor]:
    """A flat vector as tensors shaped (and typed) like ``params``; its size must match."""
    vec = torch.as_tensor(vec, dtype=torch.float32)
    n = sum(p.numel() for p in params)
    if vec.numel() != n:
        raise ValueError(f"{what} vector has {vec.numel()} values, expected {n}")
    out, off = [], 0
    for p in params:
        out.append(vec[off : off + p.numel()].view_as(p).to(p.dtype))
        off += p.numel()
    return out
