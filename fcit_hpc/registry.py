"""The one list of methods: name → (class, report label). Config validation, ``compare`` entries,
report labels and :func:`fcit_hpc.methods.make_method` read it. Adding a method is one file in
``methods/`` and one line here. (Names only: importing this module imports no method.)"""

from __future__ import annotations

from typing import NamedTuple


class MethodEntry(NamedTuple):
    cls: str  # "module:Class" under fcit_hpc.methods
    label: str  # how tables name it
    # the proposed method: compared seed by seed with the best baseline (``compare``), its
    # SSA gates are compare entries ``<name>-<ssa>``, reports name its SSA gate
    proposed: bool = False


METHODS: dict[str, MethodEntry] = {
    "zero_shot": MethodEntry("zero_shot:ZeroShot", "Zero-shot"),
    "finetune": MethodEntry("finetune:Finetune", "Finetune"),
    "disco": MethodEntry("disco:Disco", "DISCO", proposed=True),
    "ewc": MethodEntry("ewc:EWC", "EWC"),
    "lwf": MethodEntry("lwf:LwF", "LwF"),
    "olora": MethodEntry("olora:OLoRA", "O-LoRA"),
    "mlora": MethodEntry("mlora:MLoRA", "M-LoRA"),
    "moelora": MethodEntry("moelora:MoELoRA", "MoELoRA"),
}
# federated optimizers (``federation.fed_alg``): one strategy class each in fcit_hpc.fed.strategies
FED_ALGS = ("fedavg", "fedavgm", "fedadam", "fedadagrad", "fedyogi", "fedprox")
# upload codecs (``compress.*``): fcit_hpc.fed.codec
CODECS = ("none", "fp16", "bf16", "int8", "int4", "topk")
SSA_MODES = ("softmax", "cosine", "argmax", "concat")
MULTITASK = "multitask"  # the centralized upper bound: Finetune on all data, one client
PROPOSED = next(name for name, e in METHODS.items() if e.proposed)  # "disco"
# compare entries: every method, the upper bound, and the proposed method with each SSA gate
COMPARE_LABELS: dict[str, str] = {
    **{name: e.label for name, e in METHODS.items()},
    MULTITASK: "Multi-task (centralized upper bound)",
    **{f"{PROPOSED}-{m}": f"{METHODS[PROPOSED].label}, SSA {m}" for m in SSA_MODES},
}
COMPARE_ENTRIES = tuple(COMPARE_LABELS)

# train.liger_ops: Liger kernels by the keyword arguments of liger-kernel's apply functions
LIGER_OPS = ("fused_linear_cross_entropy", "rms_norm", "swiglu", "rope")
