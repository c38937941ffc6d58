"""A LLaVA checkpoint in the Hugging Face `llava` layout, written by the test itself (tiny
LlavaConfig, random weights, a BPE tokenizer trained with the `tokenizers` library, a
CLIPImageProcessor, a chat template), loaded through `model.name: hf`."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fcit_hpc.config import load_config
from fcit_hpc.data.sample import Sample

from .conftest import ROOT, fcit, mpiexec

CHAT = (
    "{% for message in messages %}{% if message['role'] == 'user' %}USER: "
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}<image>\n"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}"
    "{% else %}ASSISTANT: {{ message['content'][0]['text'] }}{% endif %} {% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
MEAN, STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]


def write_checkpoint(path, with_processor=True):
    """A tiny LLaVA-1.5-like checkpoint: model, tokenizer, image processor, chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
        PreTrainedTokenizerFast,
    )

    specials = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    corpus = [
        "What is shown in the image? Answer with one word.",
        "How many objects are there? 3 4 5 answer the question using a single number",
        "USER: ASSISTANT: chart figure plot bar line value color red blue green yes no",
        "Describe the scene. A cube and a sphere on the table; caption: ünïcödé façade",
    ] * 20
    bpe.train_from_iterator(
        corpus,
        trainers.BpeTrainer(
            vocab_size=400,
            special_tokens=specials,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    bpe.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", bpe.token_to_id("<s>"))]
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"},
    )
    image_id = tok.convert_tokens_to_ids("<image>")
    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=32,
        patch_size=16,
    )
    text = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    cfg = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=image_id,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
    )
    torch.manual_seed(0)
    LlavaForConditionalGeneration(cfg).save_pretrained(path)
    ip = CLIPImageProcessor(
        size={"shortest_edge": 32},
        crop_size={"height": 32, "width": 32},
        image_mean=MEAN,
        image_std=STD,
    )
    proc = LlavaProcessor(
        image_processor=ip,
        tokenizer=tok,
        patch_size=16,
        vision_feature_select_strategy="default",
        chat_template=CHAT,
        num_additional_image_tokens=1,  # CLIP's CLS feature, as llava-hf's processors say
    )
    if with_processor:
        proc.save_pretrained(path)
    else:
        tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("llava") / "ckpt")


def _cfg(ckpt, *more):
    return load_config(None, ["model.name=hf", f"model.path={ckpt}", *more])


def test_processor_prompt_image_tokens_and_padding(ckpt, tmp_path):
    from PIL import Image

    from fcit_hpc.model.build import make_tokenizer
    from fcit_hpc.model.tokenizer import HFLlavaTokenizer

    tok = make_tokenizer(_cfg(ckpt).model)
    assert isinstance(tok, HFLlavaTokenizer)
    assert tok.num_image_tokens == (32 // 16) ** 2  # "default" strategy drops the CLS feature
    ids = tok.prompt("How many objects are there?")
    # the chat template around the expanded image placeholder, as the processor writes it
    text = tok.tok.decode(ids, skip_special_tokens=False)
    assert text.startswith("<s>USER: " + "<image>" * 4 + "\nHow many objects are there?")
    assert text.endswith("ASSISTANT:")
    # a wide image is padded to a square with the mean colour (LLaVA-1.5's expand2square): the
    # padded rows normalise to (mean - mean) / std = 0
    wide = tmp_path / "wide.png"
    Image.new("RGB", (64, 16), (255, 0, 0)).save(wide)
    pix = tok.pixels(str(wide))
    assert tuple(pix.shape) == (3, 32, 32)
    assert pix[:, 0, :].abs().max() < 0.02 and pix[:, -1, :].abs().max() < 0.02
    red = (1.0 - MEAN[0]) / STD[0]
    assert abs(float(pix[0, 16, 16]) - red) < 0.02


def test_training_batch_and_generation_run(ckpt):
    from fcit_hpc.data.batches import make_batches
    from fcit_hpc.model.build import build_model

    cfg = _cfg(ckpt, "lora.max_subspaces=2")
    model, adapter, tok = build_model(cfg.model, cfg.lora, 2)
    samples = [Sample("What is shown in the image?", "a red cube", 0, None)] * 3
    (batch,) = make_batches(
        tok, samples, 3, 64, epochs=1, generator=torch.Generator().manual_seed(0)
    )
    assert tuple(batch["pixel_values"].shape) == (3, 3, 32, 32)
    assert (batch["input_ids"] == tok.image_token_id).sum(1).tolist() == [4, 4, 4]
    loss = model(**batch).loss
    assert torch.isfinite(loss)
    # the answer tokens (and only they) carry the loss
    n_answer = len(tok.encode("a red cube")) + 1
    assert int((batch["labels"][0] != -100).sum()) == n_answer


def test_bad_checkpoints_name_the_file(tmp_path):
    no_proc = write_checkpoint(tmp_path / "noproc", with_processor=False)
    p = fcit(
        "run",
        "configs/smoke.yaml",
        "--out",
        str(tmp_path / "r1"),
        "model.name=hf",
        f"model.path={no_proc}",
    )
    assert p.returncode == 2 and "preprocessor_config.json" in p.stderr, p.stderr[-2000:]
    bert = tmp_path / "vit"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"model_type": "vit", "image_size": 32}))
    p = fcit(
        "run",
        "configs/smoke.yaml",
        "--out",
        str(tmp_path / "r2"),
        "model.name=hf",
        f"model.path={bert}",
    )
    assert p.returncode == 2 and "neither llava nor a causal language model" in p.stderr, p.stderr[
        -2000:
    ]
    assert (
        not (tmp_path / "r1" / "state.h5").exists() and not (tmp_path / "r2" / "state.h5").exists()
    )


@pytest.mark.mpi
@pytest.mark.slow
def test_release_end_to_end_under_mpiexec(ckpt, tmp_path):
    """The checkpoint's own processor through training, DKO, evaluation, predictions, report and
    PEFT export (with the trained projector), on a miniature release tree in the published layout
    (multi-turn records, <image> at the end of a prompt, PNG and JPEG, unicode answers,
    one-sample clients); Hom under mpiexec -n 2, Het serially."""
    from .test_release import _overrides, _rescored, write_release

    root = write_release(tmp_path / "FCIT_data")
    hf = ["model.name=hf", f"model.path={ckpt}", "model.max_seq_len=96"]
    out = tmp_path / "hom"
    fcit_bin = str(ROOT / ".venv/bin/fcit")
    p = mpiexec(
        2,
        fcit_bin,
        "run",
        str(ROOT / "configs/smoke_mini.yaml"),
        "--out",
        str(out),
        *_overrides(root, *hf),
    )
    assert p.returncode == 0, p.stderr[-3000:]
    from fcit_hpc.state.schema import read_state

    st = read_state(out)
    assert st.done and st.num_subspaces >= 2 and st.projector.size > 0
    assert np.isfinite(st.accuracy).all()
    _rescored(out, root)
    assert (out / "report.md").is_file()
    e = fcit("export", str(out))
    assert e.returncode == 0, e.stderr[-2000:]
    first = Path(e.stdout.split()[0])
    first = first if first.is_absolute() else ROOT / first
    assert json.loads((first / "adapter_config.json").read_text())["r"] == 4
    assert json.loads((first / "adapter_config.json").read_text())["modules_to_save"]
    het = tmp_path / "het"
    p = fcit(
        "run",
        str(ROOT / "configs/smoke_mini.yaml"),
        "--out",
        str(het),
        *_overrides(root, *hf, "benchmark.scenario=het"),
    )
    assert p.returncode == 0, p.stderr[-3000:]
    assert read_state(het).done
