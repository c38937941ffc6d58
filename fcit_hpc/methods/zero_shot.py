"""Zero-shot: the base model, no training; evaluated after every stage like the others."""

from fcit_hpc.methods.base import Method


class ZeroShot(Method):
    name = "zero_shot"
    trains = False

    def set_inference(self, adapter, state, features):
        adapter.train_subspace(None)
