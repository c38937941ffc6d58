"""The LoRA layer's modes are objects chosen once when the mode is set (SubspaceAdapter.select,
set_activation, attach_mixer), each computing what the layer's docstring says against a plain
torch reference; and no module of fcit_hpc reaches into another object's private attributes."""

import ast

import torch

from fcit_hpc.model.lora import (
    FrozenSum,
    Mixture,
    OneSubspace,
    SsaGate,
    SubspaceAdapter,
    inject_subspace_lora,
)

from .conftest import ROOT


def _adapter(s_max=3):
    torch.manual_seed(0)
    model = torch.nn.Sequential()
    model.add_module("up", torch.nn.Linear(6, 5))
    ad = SubspaceAdapter(inject_subspace_lora(model, ["up"], 2, 4.0, dropout=0.0, s_max=s_max))
    with torch.no_grad():
        for i in range(s_max):
            ad.layers[0].lora_A[i].normal_()
            ad.layers[0].lora_B[i].normal_()
    return model, ad, ad.layers[0]


def _delta(layer, i, x):
    return (x @ layer.lora_A[i].t() @ layer.lora_B[i].t()) * layer.scaling


def test_each_mode_is_chosen_once_and_computes_its_sum():
    model, ad, layer = _adapter()
    x = torch.randn(2, 4, 6)
    ad.select((1,), (0,))
    assert isinstance(layer.mode, OneSubspace) and (layer.active, layer.context) == ((1,), (0,))
    torch.testing.assert_close(model(x), layer.base(x) + _delta(layer, 0, x) + _delta(layer, 1, x))
    assert layer.lora_A[1].requires_grad and not layer.lora_A[0].requires_grad
    ad.select((), (0, 2))
    assert isinstance(layer.mode, FrozenSum)
    torch.testing.assert_close(model(x), layer.base(x) + _delta(layer, 0, x) + _delta(layer, 2, x))
    alpha = torch.tensor([[0.2, 0.8], [1.0, 0.0]])
    ad.set_activation(alpha)
    assert isinstance(layer.mode, SsaGate) and layer.alpha.dtype == torch.float32
    ref = layer.base(x) + sum(alpha[:, i].view(2, 1, 1) * _delta(layer, i, x) for i in range(2))
    torch.testing.assert_close(model(x), ref, atol=1e-5, rtol=1e-5)
    ad.set_activation(None)  # leaving SSA: the subspaces that acted before it (none), no context
    assert isinstance(layer.mode, FrozenSum) and layer.context == () and layer.alpha is None
    torch.testing.assert_close(model(x), layer.base(x))


def test_a_mixer_makes_the_mixture_mode():
    model, ad, layer = _adapter(s_max=2)

    class Scales(torch.nn.Module):
        experts = 2

        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.tensor([[0.5], [2.0]]))

        def gate(self, x):
            return self.w.to(x.dtype)  # [E, 1]: one scale per expert

    layer.attach_mixer(Scales())
    assert not layer.mixer.w.requires_grad
    ad.select((0, 1), trainable=False)
    assert isinstance(layer.mode, Mixture)
    x = torch.randn(3, 6)
    ref = layer.base(x) + 0.5 * _delta(layer, 0, x) + 2.0 * _delta(layer, 1, x)
    torch.testing.assert_close(model(x), ref, atol=1e-5, rtol=1e-5)  # with gradients
    with torch.no_grad():  # the fused inference path of a scalar gate
        torch.testing.assert_close(model(x), ref, atol=1e-5, rtol=1e-5)


# torch's own Module internals, read and written by the ZeRO-3 restore of the DeepSpeed trainer
ALLOWED_PRIVATE = {"_parameters"}


def test_no_private_attribute_of_another_object_is_touched():
    """``x._name`` (read or written) only on ``self``/``cls``: a class's private fields and
    methods are its own (the layer's cache, the metrics log's line builders)."""
    bad = []
    for f in sorted((ROOT / "fcit_hpc").rglob("*.py")):
        for node in ast.walk(ast.parse(f.read_text())):
            if not isinstance(node, ast.Attribute) or not node.attr.startswith("_"):
                continue
            if node.attr.startswith("__") or node.attr in ALLOWED_PRIVATE:
                continue
            base = node.value
            if isinstance(base, ast.Name) and base.id in ("self", "cls"):
                continue
            if isinstance(base, ast.Name) and base.id in ("sys", "os", "torch", "np"):
                continue
            bad.append(f"{f.relative_to(ROOT)}:{node.lineno}: {ast.unparse(node)}")
    assert bad == []
