"""Subspace LoRA inside a Hugging Face LLaVA model: language-model FFN only, with images."""

import torch

from fcit_hpc.model.lora import SubspaceAdapter, inject_subspace_lora


def _tiny_llava():
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
    )

    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=32,
        patch_size=16,
    )
    text = LlamaConfig(
        vocab_size=120,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
    )
    cfg = LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=100, vision_feature_layer=-1
    )
    torch.manual_seed(0)
    return LlavaForConditionalGeneration(cfg).eval()


def test_llava_language_model_ffn_only_and_images_flow():
    model = _tiny_llava()
    layers = inject_subspace_lora(
        model, {"gate_proj", "up_proj", "down_proj"}, 4, 8.0, dropout=0.0, s_max=2
    )
    names = [n for n, _ in layers]
    assert len(names) == 6
    assert all("language_model" in n and "vision" not in n for n in names)
    ad = SubspaceAdapter(layers)
    g = torch.Generator().manual_seed(1)
    for k in range(2):
        ad.set(k, torch.randn(ad.numel, generator=g) * 0.1)
    ids = torch.tensor([[1, 100, 100, 100, 100, 5, 6, 7]])  # 4 image tokens = 2x2 patches
    pix = torch.randn(1, 3, 32, 32)
    ad.train_subspace(None)
    with torch.no_grad():
        base = model(input_ids=ids, pixel_values=pix).logits
    ad.set_activation(torch.tensor([[0.0, 1.0]]))
    with torch.no_grad():
        gated = model(input_ids=ids, pixel_values=pix).logits
        other_image = model(input_ids=ids, pixel_values=torch.randn(1, 3, 32, 32)).logits
    assert (gated - base).abs().max() > 1e-4
    assert (gated - other_image).abs().max() > 1e-5  # the image reaches the language model
    ad.train_subspace(1)  # α one-hot(1) in SSA equals training mode on subspace 1
    with torch.no_grad():
        trained_mode = model(input_ids=ids, pixel_values=pix).logits
    torch.testing.assert_close(trained_mode, gated, atol=1e-5, rtol=1e-5)
    # gradients reach only subspace 1 and no base or vision weight
    model.train()
    model(input_ids=ids, pixel_values=pix).logits.sum().backward()
    got = {n for n, p in model.named_parameters() if p.grad is not None}
    # a LoRA parameter is named "<layer>.lora_A.<k>" / "<layer>.lora_B.<k>" (ParameterList index)
    want = {f"{n}.{ab}.1" for n in names for ab in ("lora_A", "lora_B")}
    params = dict(model.named_parameters())
    assert want <= params.keys()  # the naming above really is the module's structure
    for n, m in layers:  # and each names subspace 1 of its own layer
        assert params[f"{n}.lora_A.1"] is m.lora_A[1] and params[f"{n}.lora_B.1"] is m.lora_B[1]
    assert got == want, (sorted(got - want), sorted(want - got))
    assert all(params[n].grad.abs().sum() > 0 for n in want)
    # text-only input works too
    ad.set_activation(torch.tensor([[0.5, 0.5]]))
    with torch.no_grad():
        assert model(input_ids=torch.tensor([[1, 5, 6]])).logits.shape == (1, 3, 120)


def test_run_models_feed_images_through_the_vision_tower(tmp_path, monkeypatch):
    """The tiny-LLaVA run path: prompts carry image tokens, batches carry pixel_values, and the
    loss depends on the image."""
    from fcit_hpc.config import load_config
    from fcit_hpc.data.batches import make_batches
    from fcit_hpc.data.sample import Sample
    from fcit_hpc.model.build import build_model, make_tokenizer

    monkeypatch.setenv("FCIT_CACHE", str(tmp_path))
    cfg = load_config("configs/smoke_mini.yaml")
    assert make_tokenizer(cfg.model).num_image_tokens == 16
    assert make_tokenizer(load_config("configs/default.yaml").model).num_image_tokens == 16
    model, adapter, tok = build_model(cfg.model, cfg.lora, cfg.lora.max_subspaces)
    from PIL import Image

    a, b = tmp_path / "a.png", tmp_path / "b.png"
    Image.new("RGB", (32, 32), (255, 0, 0)).save(a)
    Image.new("RGB", (32, 32), (0, 0, 255)).save(b)
    losses = []
    for img in (a, b):
        batch = make_batches(
            tok,
            [Sample("What colour?", "red", 0, str(img))],
            1,
            64,
            epochs=1,
            generator=torch.Generator().manual_seed(0),
        )[0]
        assert batch["pixel_values"].shape == (1, 3, 32, 32)
        assert int((batch["input_ids"] == tok.image_token_id).sum()) == 16
        with torch.no_grad():
            losses.append(float(model(**batch).loss))
    assert abs(losses[0] - losses[1]) > 1e-6


def test_identity_from_image_and_text_plus_image(tmp_path, monkeypatch):
    import numpy as np
    from PIL import Image

    from fcit_hpc.data.sample import Sample
    from fcit_hpc.model.identity import HashingEncoder, SampleEncoder

    model = _tiny_llava()
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    Image.new("RGB", (32, 32), (255, 0, 0)).save(a)
    Image.new("RGB", (32, 32), (0, 0, 255)).save(b)
    s = [Sample("Same question?", "x", 0, str(a)), Sample("Same question?", "x", 0, str(b))]
    text = SampleEncoder(HashingEncoder(16), "text")
    img = SampleEncoder(HashingEncoder(16), "image", model, 32)
    both = SampleEncoder(HashingEncoder(16), "text+image", model, 32)
    ft, fi, fb = text.encode_samples(s), img.encode_samples(s), both.encode_samples(s)
    assert ft.shape == (2, 16) and fi.shape == (2, 32) and fb.shape == (2, 48) == (2, both.dim)
    assert np.array_equal(ft[0], ft[1]) and not np.allclose(fi[0], fi[1])  # only images differ
    from fcit_hpc.model.identity import _vision_tower

    ref = (
        _vision_tower(model)(
            pixel_values=torch.stack(
                [__import__("fcit_hpc.data.images", fromlist=["x"]).load_image(str(a), 32)]
            )
        )
        .pooler_output[0]
        .detach()
        .numpy()
    )
    np.testing.assert_allclose(fi[0], ref, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(fb, axis=1), 1.0, rtol=1e-5)
    # the vision tower in chunks of 2 images equals all 5 at once
    five = [s[0], s[1], s[0], Sample("q", "x", 0, None), s[1]]
    chunked = SampleEncoder(
        HashingEncoder(16), "image", model, 32, device=torch.device("cpu"), batch_size=2
    )
    np.testing.assert_allclose(chunked.encode_samples(five), img.encode_samples(five), atol=1e-5)


def test_run_with_text_plus_image_identity(tmp_path):
    from fcit_hpc.state.schema import read_state

    from .conftest import run_ok

    out = run_ok(
        "smoke_mini.yaml",
        tmp_path / "ti",
        "method.identity_source=text+image",
        "benchmark.num_tasks=2",
    )
    st = read_state(out)
    assert st.tokens.shape[1] == 256 + 32 and st.num_subspaces >= 2
