"""Comparisons at parity (issue 15): the single LoRA of Finetune, EWC and the multi-task bound has
DISCO's whole budget S_max x r with the same scaling alpha / r, and generation gets a per-task
budget from the longest test answer (capped by ``eval.max_new_tokens``)."""

from pathlib import Path

import numpy as np
import pytest
import torch

from fcit_hpc.compare import sub_config
from fcit_hpc.config import load_config
from fcit_hpc.data.sample import Sample
from fcit_hpc.errors import ConfigError
from fcit_hpc.eval.generate import answer_budgets, greedy_batch
from fcit_hpc.methods import make_method
from fcit_hpc.model.build import build_model
from fcit_hpc.state.schema import read_state

from .conftest import smoke_serial

LORA = ["lora.max_subspaces=3", "lora.lora_r=4", "lora.lora_alpha=8", "lora.lora_dropout=0.0"]


@pytest.mark.parametrize(
    ("entry", "switch", "slots", "rank"),
    [
        ("finetune", "budget", 1, 12),
        ("ewc", "budget", 1, 12),
        ("multitask", "budget", 1, 12),
        ("finetune", "r", 1, 4),
        ("ewc", "r", 1, 4),
        ("multitask", "r", 1, 4),
        ("disco", "budget", 3, 4),
        ("olora", "budget", 3, 4),
        ("disco", "r", 3, 4),
    ],
)
def test_slot_rank_at_parity_and_the_rank_r_switch(entry, switch, slots, rank, tmp_path):
    cfg = load_config(None, [*LORA, f"lora.single_rank={switch}"])
    sub = sub_config(cfg, entry, 0, tmp_path)
    m = make_method(sub.method, sub.lora)
    assert (m.num_slots(), m.slot_rank()) == (slots, rank)
    # the budget: slots x rank is DISCO's S_max x r for every method at parity
    if switch == "budget":
        assert m.num_slots() * m.slot_rank() == 3 * 4


def test_bad_single_rank_names_the_field():
    with pytest.raises(ConfigError, match="lora.single_rank"):
        load_config(None, ["lora.single_rank=64"])


def test_budget_lora_is_the_plain_torch_lora_of_rank_s_max_r():
    """One layer of Finetune's adapter at parity against y = W x + (alpha / r) B A x in float64,
    with the configured alpha / r = 8 / 4 (not alpha / 12), and against DISCO's three rank-4
    subspaces all active (α = 1), whose concatenation it is."""
    cfg = load_config(None, [*LORA, "method.name=finetune"])
    m = make_method(cfg.method, cfg.lora)
    model, adapter, _ = build_model(cfg.model, cfg.lora, m.num_slots(), rank=m.slot_rank())
    g = torch.Generator().manual_seed(3)
    vec = torch.randn(adapter.numel, generator=g) * 0.1
    adapter.set(0, vec)
    adapter.train_subspace(0)
    layer = adapter.layers[0]
    assert layer.lora_A[0].shape[0] == 12 and layer.scaling == pytest.approx(2.0)
    x = torch.randn(5, layer.base.in_features, generator=g)
    A, B = layer.lora_A[0].detach().double(), layer.lora_B[0].detach().double()
    W, b = layer.base.weight.detach().double(), layer.base.bias
    ref = x.double() @ W.T + (8 / 4) * (x.double() @ A.T) @ B.T
    if b is not None:
        ref = ref + b.detach().double()
    with torch.no_grad():
        got = layer(x).double()
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)

    dcfg = load_config(None, [*LORA, "method.name=disco"])
    dmodel, dadapter, _ = build_model(dcfg.model, dcfg.lora, 3)
    for dl, fl in zip(dadapter.layers, adapter.layers, strict=True):
        with torch.no_grad():
            for k in range(3):
                dl.lora_A[k].copy_(fl.lora_A[0][4 * k : 4 * (k + 1)])
                dl.lora_B[k].copy_(fl.lora_B[0][:, 4 * k : 4 * (k + 1)])
    dadapter.set_activation(torch.ones(1, 3))
    ids = torch.randint(3, 60, (2, 9), generator=g)
    with torch.no_grad():
        torch.testing.assert_close(dmodel(ids).logits, model(ids).logits, atol=1e-5, rtol=1e-5)


def test_finetune_run_trains_and_exports_a_budget_rank_lora(tmp_path):
    """A whole smoke run of Finetune: the state's one adapter has the layout of rank S_max·r = 16,
    and its PEFT export has r = 16 with lora_alpha = 32 and reproduces the model's output."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = smoke_serial(tmp_path / "ft", "method.name=finetune")
    st = read_state(out)
    cfg = load_config(Path(out) / "config.yaml")
    m = make_method(cfg.method, cfg.lora)
    assert m.slot_rank() == 16
    model, adapter, tok = build_model(cfg.model, cfg.lora, 1, rank=16)
    assert st.adapter.shape == (1, adapter.numel)
    _, small, _ = build_model(cfg.model, cfg.lora, 1)
    assert adapter.numel == 4 * small.numel  # rank 16 against one subspace's rank 4
    adapter.set(0, st.adapter[0])
    adapter.train_subspace(0)
    assert np.abs(st.adapter[0]).max() > 0
    (path,) = m.export(cfg.model, st, tmp_path / "export", None)
    peft_cfg = (path / "adapter_config.json").read_text()
    assert '"r": 16' in peft_cfg and '"lora_alpha": 32' in peft_cfg
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "export" / "base", local_files_only=True)
    ids = torch.tensor([tok.prompt("what is 2 + 3?")])
    model.eval()
    with torch.no_grad():
        ours = model(ids).logits
        peft = PeftModel.from_pretrained(base, path).eval()(ids).logits
    torch.testing.assert_close(peft, ours, atol=1e-5, rtol=1e-5)


class _Bytes:
    def encode(self, text):
        return list(text.encode())


def test_answer_budgets_formula():
    tests = {
        0: [Sample("q", "abc", 0), Sample("q", "a", 0)],
        1: [Sample("q", "x" * 40, 1)],
        2: [],
        3: [Sample("q", "", 3)],
    }
    # longest answer + its end token, capped; the cap for a task without tests; at least 1
    assert answer_budgets(_Bytes(), tests, 30) == {0: 4, 1: 30, 2: 30, 3: 1}
    assert answer_budgets(_Bytes(), tests, 3) == {0: 3, 1: 3, 2: 3, 3: 1}


def test_per_row_budgets_give_each_row_its_answer_alone():
    """A batch with budgets [2, 7, 4] equals each prompt generated alone with its budget, and a
    budget cuts the answer generated with a larger one."""
    cfg = load_config(None, ["method.name=finetune", "lora.lora_dropout=0.0"])
    model, adapter, tok = build_model(cfg.model, cfg.lora, 1)
    g = torch.Generator().manual_seed(7)
    adapter.set(0, torch.randn(adapter.numel, generator=g) * 0.3)
    adapter.train_subspace(0)
    model.eval()
    prompts = ["add 1 2", "reverse abc", "upper xy"]
    budgets = [2, 7, 4]
    together = greedy_batch(model, tok, prompts, budgets)
    alone = [greedy_batch(model, tok, [p], n)[0] for p, n in zip(prompts, budgets, strict=True)]
    assert together == alone
    long = greedy_batch(model, tok, prompts, 7)
    assert together[1] == long[1]  # its budget is the batch's largest
    assert together != long  # the smaller budgets cut the other rows
