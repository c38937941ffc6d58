"""Greedy decoding built for a GPU: a static KV cache (Hugging Face ``StaticCache``) kept for the
run, the prompt prefilled in one eager forward, and each decode step — one token per row — replayed
from a CUDA graph on CUDA (the same eager step on the CPU: one code path, the graph only replaces
the launches).

The graph is captured once per (batch size B, cache length L, dtype, SSA subspaces) and replayed
for every later batch of that shape: the inputs it reads live in static buffers (the token and
position of each row [B, 1], the attention mask [B, L], the SSA gate α [B, S], the KV cache
[B, heads, L, head_dim] per layer, whose write position is a device counter that the replay
advances), refilled in place before each step. Cache lengths are rounded up to ``BUCKET`` tokens
so that batches of similar prompts share a graph. The first decode step of a new shape runs eager
(it autotunes the SSA kernels for M = B before capture, which must not synchronize). A capture that
fails (a model whose forward synchronizes) is logged once and the decoder stays eager.

The predictions are the same as Hugging Face ``generate``'s (dynamic cache; tests compare them
token for token): left-padded prompts, positions ``cumsum(mask) - 1``, greedy argmax."""

from __future__ import annotations

import inspect
import logging
import math
from dataclasses import KW_ONLY, dataclass, field

import torch

from fcit_hpc.model.lora import SsaGate

log = logging.getLogger("fcit")

BUCKET = 64  # cache lengths are multiples of this (graphs shared by batches of similar prompts)


@dataclass
class DecodeStats:
    """Counts of one decoder's work, for tests and the phase report."""

    batches: int = 0
    prefill_tokens: int = 0  # prompt tokens (padding included) through the prefill
    decode_steps: int = 0  # forward passes of one token per row
    graph_steps: int = 0  # of which replayed from a CUDA graph
    _: KW_ONLY
    captures: int = 0  # CUDA graphs captured
    caches: int = 0  # static caches allocated
    keys: list = field(default_factory=list)  # (B, L) of every capture


def _cache_kwarg(model) -> str:
    """The forward's name for the KV cache: ``cache`` since transformers 5.2x, before it
    ``past_key_values`` (still accepted, deprecated, by the newer ones)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _new_static_cache(model, length: int):
    from transformers import StaticCache

    return StaticCache(config=model.config, max_cache_len=length)


class StaticGreedyDecoder:
    """Greedy generation with a static KV cache, the decode step in a CUDA graph on CUDA.

    ``adapter`` (a :class:`~fcit_hpc.model.lora.SubspaceAdapter` or None): its layers' SSA gate
    α [B, S] is moved into a static buffer before each batch so that a captured graph reads the
    current batch's gates (each row keeps its own α). ``graphs``: capture on CUDA (None: whenever
    the model is on a CUDA device)."""

    def __init__(self, model, adapter=None, graphs: bool | None = None, bucket: int = BUCKET):
        self.model = model
        self.adapter = adapter
        self.device = next(model.parameters()).device
        self.graphs = self.device.type == "cuda" if graphs is None else graphs
        if self.graphs and self.device.type != "cuda":
            raise ValueError("eval: CUDA graphs need the model on a CUDA device")
        self.bucket = bucket
        self.stats = DecodeStats()
        self._kw = _cache_kwarg(model)
        self._shape: tuple | None = None  # (B, L, dtype) of the cache and buffers
        self._cache = None
        self._mask = self._tok = self._pos = None  # static inputs [B, L], [B, 1], [B, 1]
        self._alpha: torch.Tensor | None = None  # static α [B, S] the layers read
        self._graph = None  # (torch.cuda.CUDAGraph, logits [B, V], key)

    def release(self) -> None:
        """Drop the cache, the buffers and the graph (kept: the decoder and its counts). Called
        after each stage's evaluation: the next stage changes the subspaces (a new capture
        anyway), and training should not share the device with a KV cache of B × L tokens."""
        self._shape = self._cache = self._graph = self._alpha = None
        self._mask = self._tok = self._pos = None

    # ------------------------------------------------------------------ static state
    def _prepare(self, batch: int, length: int) -> None:
        """Cache and input buffers for ``batch`` rows of ``length`` cache tokens (reused,
        zeroed in place, when the shape is the current one)."""
        dtype = next(self.model.parameters()).dtype
        shape = (batch, length, dtype)
        if shape != self._shape:
            self._graph = None  # its buffers go
            self._cache = _new_static_cache(self.model, length)
            dev = self.device
            self._mask = torch.zeros(batch, length, dtype=torch.long, device=dev)
            self._tok = torch.zeros(batch, 1, dtype=torch.long, device=dev)
            self._pos = torch.zeros(batch, 1, dtype=torch.long, device=dev)
            self._shape = shape
            self.stats.caches += 1
        else:
            self._cache.reset()
            self._mask.zero_()

    def _bind_alpha(self) -> tuple:
        """Point every SSA layer at one static α buffer holding this batch's gates; returns
        what a captured graph depends on besides the buffers (α's shape, the concatenated
        subspace weights' identity), so a change forces a new capture."""
        if self.adapter is None:
            return ()
        layers = self.adapter.layers
        alpha = layers[0].alpha
        if alpha is None:
            return ("no-ssa",)
        if self._alpha is None or self._alpha.shape != alpha.shape:
            self._alpha = torch.empty_like(alpha)
            self._graph = None
        self._alpha.copy_(alpha)
        for m in layers:
            if m.alpha is not None and m.alpha.device == self._alpha.device:
                m.set_mode(SsaGate(self._alpha), keep_cache=True)
        return (tuple(alpha.shape), id(self._alpha))

    def _weights_key(self) -> tuple:
        """Identity of the SSA layers' concatenated weights (built at the prefill)."""
        if self.adapter is None:
            return ()
        return tuple(m.cache_id() for m in self.adapter.layers)

    # ------------------------------------------------------------------ forward passes
    def _forward(self, **kw) -> torch.Tensor:
        """Logits of each row's last position [B, V]."""
        out = self.model(
            attention_mask=self._mask,
            use_cache=True,
            logits_to_keep=1,
            **{self._kw: self._cache},
            **kw,
        )
        return out.logits[:, -1]

    def _step(self) -> torch.Tensor:
        return self._forward(input_ids=self._tok, position_ids=self._pos)

    def _capture(self, key) -> bool:
        """Capture the decode step (the shape's first eager step ran before); False when the
        model cannot be captured (then decoding stays eager for the run)."""
        try:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                logits = self._step()
        except RuntimeError as e:  # a synchronizing op in the forward
            log.warning("eval: decode step not capturable in a CUDA graph (%s): eager decode", e)
            self.graphs = False
            self._graph = None
            return False
        self._graph = (graph, logits, key)
        self.stats.captures += 1
        self.stats.keys.append(key[:2])
        return True

    # ------------------------------------------------------------------ generation
    @torch.no_grad()
    def generate(
        self, ids: torch.Tensor, mask: torch.Tensor, max_new_tokens: int, streamer=None, **extra
    ) -> torch.Tensor:
        """New tokens [B, max_new_tokens] (int64, on the model's device) after the left-padded
        prompts ``ids`` [B, T] with attention ``mask`` [B, T]; ``extra``: prefill-only inputs
        (``pixel_values``). Rows go on past their end token (the caller cuts them there).

        ``streamer``: an object with Hugging Face's streamer interface (``put``, ``end``), told
        the prompt, the first new tokens (after the prefill; on the host, so its clock splits
        prefill from decode exactly) and the end (after the last step has run)."""
        if streamer is not None:
            streamer.put(ids)
        batch, width = ids.shape
        length = self.bucket * math.ceil((width + max_new_tokens) / self.bucket)
        self._prepare(batch, length)
        alpha_key = self._bind_alpha()
        self._mask[:, :width] = mask
        positions = (mask.cumsum(-1) - 1).clamp_(min=0)  # [B, T]; padding's are never attended
        logits = self._forward(input_ids=ids, position_ids=positions, **extra)
        out = torch.empty(batch, max_new_tokens, dtype=torch.long, device=self.device)
        out[:, 0] = logits.argmax(-1)
        if streamer is not None:
            streamer.put(out[:, 0].cpu())  # waits for the prefill
        self._pos.copy_(mask.sum(-1, keepdim=True))  # each row's first new position
        st = self.stats
        st.batches += 1
        st.prefill_tokens += batch * width
        key = (batch, length, alpha_key, self._weights_key())
        for i in range(1, max_new_tokens):
            self._tok.copy_(out[:, i - 1 : i])
            self._mask[:, width + i - 1] = 1
            g = self._graph
            eager = g is None or g[2] != key
            if eager:
                logits = self._step()  # on CUDA: the shape's warm-up (autotuning), then capture
            else:
                g[0].replay()
                logits = g[1]
                st.graph_steps += 1
            out[:, i] = logits.argmax(-1)
            self._pos.add_(1)
            st.decode_steps += 1
            if eager and self.graphs and i + 1 < max_new_tokens:
                self._capture(key)
        if streamer is not None:
            streamer.put(out[:, -1].cpu())  # waits for the last step
            streamer.end()
        return out
