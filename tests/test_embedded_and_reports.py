"""Embedded base model (deterministic, cached, recipe-keyed), reports and compare runs."""

import hashlib
import json

import pytest
import torch

from fcit_hpc.model.embedded import RECIPE, cache_dir, ensure_embedded
from fcit_hpc.state.schema import read_state

from .conftest import fcit, smoke_serial

SMALL = {
    **RECIPE,
    "steps": 6,
    "corpus": 40,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_layers": 1,
    "vision_hidden_size": 16,
}


def test_embedded_model_is_deterministic_cached_and_keyed_by_recipe(tmp_path, monkeypatch):
    from transformers import LlavaForConditionalGeneration

    monkeypatch.setenv("FCIT_CACHE", str(tmp_path / "a"))
    a = ensure_embedded(lambda *_: None, SMALL)
    stamp = (a / "config.json").stat().st_mtime_ns
    assert ensure_embedded(lambda *_: None, SMALL) == a  # cached: not rebuilt
    assert (a / "config.json").stat().st_mtime_ns == stamp
    monkeypatch.setenv("FCIT_CACHE", str(tmp_path / "b"))
    b = ensure_embedded(lambda *_: None, SMALL)
    ma = LlavaForConditionalGeneration.from_pretrained(a).state_dict()
    mb = LlavaForConditionalGeneration.from_pretrained(b).state_dict()
    assert all(torch.equal(ma[k], mb[k]) for k in ma)  # same recipe, same weights
    fresh = LlavaForConditionalGeneration(
        __import__("fcit_hpc.model.embedded", fromlist=["x"]).model_config(SMALL)
    ).state_dict()
    assert any(not torch.equal(ma[k], fresh[k]) for k in ma)  # it was trained
    assert cache_dir({**SMALL, "steps": 7}) != cache_dir(SMALL)  # a new recipe, a new model
    meta = json.loads((a / "recipe.json").read_text())
    assert meta["recipe"]["steps"] == 6
    assert meta["sha256"] == hashlib.sha256((a / "model.safetensors").read_bytes()).hexdigest()


def test_shipped_model_is_the_recipe_s_and_is_checked(tmp_path, monkeypatch):
    """`model.name: embedded` loads the model shipped with the package (no pre-training on a new
    machine); its recipe.json names RECIPE and the weights' sha256, and a corrupted or foreign
    copy is refused with an error naming the file."""
    import shutil

    from transformers import LlavaForConditionalGeneration

    from fcit_hpc.errors import StateError
    from fcit_hpc.model import embedded

    monkeypatch.setenv("FCIT_CACHE", str(tmp_path / "cache"))
    d = ensure_embedded(lambda *_: None)
    assert d == embedded.SHIPPED and not (tmp_path / "cache").exists()  # nothing built
    model = LlavaForConditionalGeneration.from_pretrained(d, local_files_only=True)
    want = embedded.model_config(RECIPE)
    got = model.config
    assert got.text_config.hidden_size == want.text_config.hidden_size == RECIPE["hidden_size"]
    assert got.text_config.num_hidden_layers == RECIPE["num_layers"]
    assert got.vision_config.image_size == RECIPE["image_size"]
    # pre-trained, not an initialisation: far below the loss of the untrained model
    fresh = tmp_path / "fresh"
    LlavaForConditionalGeneration(want).save_pretrained(fresh)
    assert embedded.heldout_loss(d) < 0.25 * embedded.heldout_loss(fresh)

    bad = tmp_path / "bad"
    shutil.copytree(d, bad)
    monkeypatch.setattr(embedded, "SHIPPED", bad)
    w = bytearray((bad / "model.safetensors").read_bytes())
    w[-5] ^= 0xFF
    (bad / "model.safetensors").write_bytes(bytes(w))
    with pytest.raises(StateError, match="model.safetensors"):
        ensure_embedded(lambda *_: None)
    shutil.copy(d / "model.safetensors", bad / "model.safetensors")
    meta = json.loads((bad / "recipe.json").read_text())
    meta["recipe"]["steps"] += 1
    (bad / "recipe.json").write_text(json.dumps(meta))
    with pytest.raises(StateError, match="recipe.json: built from another recipe"):
        ensure_embedded(lambda *_: None)
    (bad / "recipe.json").write_text("{not json")
    with pytest.raises(StateError, match="recipe.json: unreadable"):
        ensure_embedded(lambda *_: None)


@pytest.mark.slow
@pytest.mark.heavy
def test_rebuilt_model_matches_the_shipped_one(tmp_path):
    """`fcit data embedded --check` pre-trains RECIPE again (about 2 minutes on one thread) and
    compares it with the shipped weights: bitwise on the CPU it was built on; elsewhere (another
    vector unit rounds differently, and 1,500 steps amplify it) the held-out loss must agree
    within max(5%, 0.01 nats) — an untrained model's is about 5.5."""
    p = fcit("data", "embedded", "--check", timeout=900)
    assert p.returncode == 0, p.stdout + p.stderr[-2000:]
    assert "held-out loss shipped" in p.stdout


def test_report_and_compare_on_a_small_run(tmp_path):
    out = smoke_serial(
        tmp_path / "cmp", "compare=[zero_shot,finetune,disco,multitask]", "compare_seeds=[0,1]"
    )
    table = (out / "comparison.md").read_text()
    for label in ("Zero-shot", "Finetune", "DISCO", "Multi-task"):
        assert label in table
    d = read_state(out / "disco" / "seed1")
    assert d.done and d.summary and set(d.summary) >= {"last", "avg", "forgetting", "bwt"}
    assert d.num_subspaces == 2 and d.activation.shape == (2, 2)
    mt = read_state(out / "multitask" / "seed0")
    assert mt.accuracy.shape == (1, 2) and int(mt.clients["client"].max()) == 0
    zs = read_state(out / "zero_shot" / "seed0")
    assert len(zs.rounds) == 0 and zs.accuracy.shape == (2, 2)
    rep = (out / "disco" / "seed1" / "report.md").read_text()
    assert "## Accuracy matrix" in rep and "SSA activation" in rep
    for png in ("accuracy_matrix", "task_curves", "ssa_activation"):
        assert (out / "disco" / "seed1" / "plots" / f"{png}.png").stat().st_size > 1000
    p = fcit("report", str(out / "finetune" / "seed0"), str(out / "disco" / "seed0"))
    assert p.returncode == 0 and "| finetune |" in p.stdout and "| disco |" in p.stdout


def test_embedded_model_does_not_depend_on_the_callers_thread_count(tmp_path, monkeypatch):
    """Rank 0 may build the model with any torch thread setting (1 under a core binding, all
    cores when the other ranks sleep): the weights must not change with it."""
    small = {**SMALL, "steps": 4, "batch_size": 16, "hidden_size": 96, "intermediate_size": 192}
    before = torch.get_num_threads()
    built = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            monkeypatch.setenv("FCIT_CACHE", str(tmp_path / f"t{n}"))
            path = ensure_embedded(lambda *_: None, small) / "model.safetensors"
            built.append(path.read_bytes())
            assert torch.get_num_threads() == n  # the caller's setting is restored
    finally:
        torch.set_num_threads(before)
    assert built[0] == built[1]
