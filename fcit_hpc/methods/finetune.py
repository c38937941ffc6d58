"""Finetune: one shared LoRA trained by every client and averaged (the Finetune baseline)."""

from fcit_hpc.methods.base import Method


class Finetune(Method):
    name = "finetune"
