"""Fused multi-subspace LoRA + SSA gating kernels (Triton on CUDA, torch on CPU)."""

from fcit_kernels.ssa_lora import ssa_gate, ssa_lora_linear

__all__ = ["ssa_gate", "ssa_lora_linear"]
