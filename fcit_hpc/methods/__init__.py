"""Methods by ``method.name``: adding a method means adding one file and one line here."""

from fcit_hpc.methods.disco import Disco
from fcit_hpc.methods.ewc import EWC
from fcit_hpc.methods.finetune import Finetune
from fcit_hpc.methods.olora import OLoRA
from fcit_hpc.methods.zero_shot import ZeroShot

REGISTRY = {"disco": Disco, "ewc": EWC, "finetune": Finetune, "olora": OLoRA, "zero_shot": ZeroShot}


def make_method(cfg):
    return REGISTRY[cfg.method.name](cfg)
