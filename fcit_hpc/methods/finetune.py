"""Finetune: one shared LoRA trained by every client and averaged (the Finetune baseline); of
rank S_max x r by default (``lora.single_rank``)."""

from fcit_hpc.methods.base import SingleLoRA


class Finetune(SingleLoRA):
    name = "finetune"
