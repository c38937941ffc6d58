"""PEFT export: adapters load with PeftModel.from_pretrained and reproduce the layer's output."""

import numpy as np
import pytest
import torch

from fcit_hpc.config import load_config
from fcit_hpc.fed.server import init_state
from fcit_hpc.fed.strategies import strategy_from_config
from fcit_hpc.methods import make_method
from fcit_hpc.model.build import build_model
from fcit_hpc.model.export import export_adapters


def _state(cfg, adapter):
    """A fresh global state of the run's method (S_max subspaces, 8-dim tokens, 8 x 8 accuracy)."""
    return init_state(
        adapter,
        make_method(cfg.method, cfg.lora),
        seed=cfg.seed,
        config_yaml="",
        dim=8,
        shape=(8, 8),
        strategy=strategy_from_config(cfg.federation),
    )


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    cfg = load_config(
        None,
        [
            "method.name=disco",
            "lora.max_subspaces=3",
            "lora.lora_r=4",
            "lora.lora_alpha=8",
            "lora.lora_dropout=0.0",
        ],
    )
    method = make_method(cfg.method, cfg.lora)
    model, adapter, tok = build_model(cfg.model, cfg.lora, method.num_slots())
    st = _state(cfg, adapter)
    g = torch.Generator().manual_seed(5)
    st.adapter = (torch.randn(st.adapter.shape, generator=g) * 0.05).numpy()  # non-trivial A, B
    st.num_subspaces = 3
    out = tmp_path_factory.mktemp("export")
    alpha = np.array([0.2, 0.5, 0.3], np.float32)
    export_adapters(cfg.model, cfg.lora, st, out, alpha=alpha)
    for k in range(3):
        adapter.set(k, st.adapter[k])
    return cfg, model, adapter, tok, out, alpha


def _ids(tok):
    return torch.tensor(
        [tok.prompt("Add the two numbers: 3 + 4 ="), tok.prompt("Is 17 an odd or an even no?!")]
    )


@pytest.mark.parametrize("k", [0, 1, 2])
def test_subspace_adapter_matches_one_hot_alpha(trained, k):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    cfg, model, adapter, tok, out, _ = trained
    ids = _ids(tok)
    onehot = torch.zeros(2, 3)
    onehot[:, k] = 1
    adapter.set_activation(onehot)
    with torch.no_grad():
        ours = model(ids).logits
    adapter.set_activation(None)
    base = AutoModelForCausalLM.from_pretrained(out / "base", local_files_only=True)
    with torch.no_grad():
        plain = base(ids).logits
        peft = PeftModel.from_pretrained(base, out / f"subspace_{k}").eval()(ids).logits
    assert (ours - plain).abs().max() > 1e-4  # the adapter does change the output
    torch.testing.assert_close(peft, ours, atol=1e-5, rtol=1e-5)


def test_merged_adapter_matches_fixed_alpha(trained):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    cfg, model, adapter, tok, out, alpha = trained
    ids = _ids(tok)
    adapter.set_activation(torch.from_numpy(alpha).repeat(2, 1))
    with torch.no_grad():
        ours = model(ids).logits
    adapter.set_activation(None)
    base = AutoModelForCausalLM.from_pretrained(out / "base", local_files_only=True)
    with torch.no_grad():
        peft = PeftModel.from_pretrained(base, out / "merged").eval()(ids).logits
    torch.testing.assert_close(peft, ours, atol=1e-5, rtol=1e-5)


def test_bad_alpha(trained, tmp_path):
    cfg, model, adapter, tok, out, _ = trained
    st = _state(cfg, adapter)
    st.num_subspaces = 2
    out = tmp_path / "adapters"
    for bad in ([1.0, np.nan], [1.0, 2.0, 3.0]):
        with pytest.raises(ValueError, match="--alpha: expected 2 finite"):
            export_adapters(cfg.model, cfg.lora, st, out, alpha=np.array(bad, np.float32))
        assert not out.exists()  # refused before anything is written
