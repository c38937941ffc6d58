"""The embedded base model: a small LLaVA (Hugging Face classes, so images take the real path),
pre-trained on a general corpus that is disjoint from the FCIT-mini tasks.

The model of ``RECIPE`` is built once by the project (``fcit data embedded``) and shipped with the
package in ``embedded_model/`` (config.json, model.safetensors, recipe.json with the recipe and the
weights' sha256): no machine pre-trains it again, so every machine starts from the same bytes. A
recipe other than ``RECIPE`` (tests, experiments) is pre-trained at first use into
``$FCIT_CACHE/embedded-<recipe hash>``. The general corpus teaches the model to follow a prompt,
copy text and read coarse image content (colour, brightness, position); none of its instructions or
answer forms is an FCIT-mini task.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from fcit_hpc.cache import cache_root
from fcit_hpc.cache import recipe_hash as _recipe_hash
from fcit_hpc.data.sample import Sample
from fcit_hpc.model.hf_configs import llama_config, llava_config
from fcit_hpc.seeds import SALT_PRETRAIN_DATA

RECIPE = {
    "version": 1,
    "hidden_size": 96,
    "intermediate_size": 192,
    "num_layers": 3,
    "num_heads": 4,
    "vision_hidden_size": 48,
    "image_size": 32,
    "patch_size": 8,
    "max_seq_len": 160,
    "steps": 1500,
    "batch_size": 16,
    "lr": 2e-3,
    "seed": 7,
    # CPU float reductions are split differently with more threads, so the weights depend on the
    # thread count: it is part of the recipe (one thread: the same model on any machine).
    "threads": 1,
}
_TONES = {
    "crimson": (200, 20, 60),
    "teal": (0, 128, 128),
    "navy": (20, 20, 120),
    "olive": (128, 128, 0),
    "pink": (250, 150, 200),
    "gray": (128, 128, 128),
    "black": (10, 10, 10),
    "white": (245, 245, 245),
}
_WORDS = (
    "harbor",
    "velvet",
    "quartz",
    "saddle",
    "timber",
    "nectar",
    "orbit",
    "pepper",
    "basil",
    "cobalt",
    "meadow",
    "kettle",
    "jungle",
    "ivory",
    "falcon",
    "willow",
)


def _general_sample(r: np.random.Generator, path: Path, i: int) -> Sample:
    """One sample of the general corpus (an image is written to ``path``)."""
    kind = int(r.integers(6))
    tone = list(_TONES)[int(r.integers(len(_TONES)))]
    img = Image.new("RGB", (32, 32), _TONES[tone])
    d = ImageDraw.Draw(img)
    if kind == 0:
        w = _WORDS[int(r.integers(len(_WORDS)))]
        q, a = f"Repeat after me: {w}", w
    elif kind == 1:
        n = int(r.integers(0, 1000))
        q, a = f"Copy this number exactly: {n}", str(n)
    elif kind == 2:
        q, a = "Which tone fills the background of this picture?", tone
    elif kind == 3:
        bright = sum(_TONES[tone]) > 380
        q, a = "Is this picture light or dark overall?", "light" if bright else "dark"
    elif kind == 4:
        side = ["left", "right"][int(r.integers(2))]
        x = 2 if side == "left" else 18
        d.rectangle((x, 10, x + 11, 21), fill=(255, 255, 0) if tone != "white" else (0, 0, 0))
        q, a = "On which side of the picture is the patch, left or right?", side
    else:
        a_ = int(r.integers(0, 10))
        q, a = (
            f"Write the digit {a_} as a word.",
            ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"][a_],
        )
    f = path / f"g{i:05d}.png"
    img.save(f)
    return Sample(q, a, 0, str(f))


def recipe_hash(recipe: dict | None = None) -> str:
    return _recipe_hash(json.dumps(recipe or RECIPE, sort_keys=True).encode(), __file__)


def cache_dir(recipe: dict | None = None) -> Path:
    return cache_root() / f"embedded-{recipe_hash(recipe)}"


def model_config(overrides: dict | None = None):
    """The Hugging Face LlavaConfig of the embedded model."""
    r = {**RECIPE, **(overrides or {})}
    text = llama_config(
        r["hidden_size"], r["intermediate_size"], r["num_layers"], r["num_heads"], max_positions=256
    )
    return llava_config(text, r["vision_hidden_size"], r["image_size"], r["patch_size"])


SHIPPED = Path(__file__).with_name("embedded_model")  # the model of RECIPE, kept with the project
WEIGHTS = "model.safetensors"
REBUILD = "fcit data embedded --out fcit_hpc/model/embedded_model"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def shipped_model() -> Path:
    """The shipped model of ``RECIPE``, checked: its recipe.json names ``RECIPE`` and the sha256
    of its weights. Raises :class:`StateError` naming the file otherwise."""
    from fcit_hpc.errors import StateError

    meta_file = SHIPPED / "recipe.json"
    try:
        meta = json.loads(meta_file.read_text())
        recipe, digest = meta["recipe"], meta["sha256"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise StateError(f"{meta_file}: unreadable ({e}); rebuild: {REBUILD}") from None
    if recipe != RECIPE:
        raise StateError(f"{meta_file}: built from another recipe than RECIPE; rebuild: {REBUILD}")
    weights = SHIPPED / WEIGHTS
    if not weights.is_file() or _sha256(weights) != digest:
        raise StateError(f"{weights}: missing or not the weights recipe.json names (sha256)")
    return SHIPPED


def ensure_embedded(log=print, recipe: dict | None = None) -> Path:
    """Directory of the embedded model: the shipped one for ``RECIPE``; for another recipe,
    pre-trained at first use into the cache."""
    r = recipe or RECIPE
    if r == RECIPE:
        return shipped_model()
    out = cache_dir(r)
    if (out / "config.json").is_file():
        return out
    return build_embedded(r, out, log)


def build_embedded(recipe: dict, out: Path, log=print) -> Path:
    """Pre-train the model of ``recipe`` into ``out`` (on the recipe's thread count: float
    reductions split over more threads round differently); returns ``out``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(recipe.get("threads", 1))
    try:
        return _pretrain(recipe, Path(out), log)
    finally:
        torch.set_num_threads(threads)


def heldout_loss(model_dir: Path, recipe: dict | None = None, n: int = 256) -> float:
    """Mean loss of a built model on ``n`` general-corpus samples drawn with another seed than
    its training corpus (a check that weights are a product of the recipe)."""
    import tempfile

    from transformers import LlavaForConditionalGeneration

    from fcit_hpc.data.batches import make_batches
    from fcit_hpc.model.tokenizer import ByteTokenizer

    r = recipe or RECIPE
    model = LlavaForConditionalGeneration.from_pretrained(model_dir, local_files_only=True).eval()
    tok = ByteTokenizer((r["image_size"] // r["patch_size"]) ** 2, r["image_size"])
    rng = np.random.default_rng(r["seed"] + SALT_PRETRAIN_DATA)
    with tempfile.TemporaryDirectory() as tmp:
        samples = [_general_sample(rng, Path(tmp), i) for i in range(n)]
        gen = torch.Generator().manual_seed(0)
        batches = make_batches(tok, samples, 32, r["max_seq_len"], epochs=1, generator=gen)
        with torch.no_grad():
            losses = [float(model(**b).loss) * len(b["input_ids"]) for b in batches]
    return sum(losses) / n


def _pretrain(r: dict, out: Path, log) -> Path:
    from transformers import LlavaForConditionalGeneration

    from fcit_hpc.data.batches import make_batches
    from fcit_hpc.model.steps import run_steps
    from fcit_hpc.model.tokenizer import ByteTokenizer

    t0 = time.time()
    torch.manual_seed(r["seed"])
    model = LlavaForConditionalGeneration(model_config(r))
    tok = ByteTokenizer((r["image_size"] // r["patch_size"]) ** 2, r["image_size"])
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    (tmp / "corpus").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(r["seed"])
    corpus = [_general_sample(rng, tmp / "corpus", i) for i in range(r.get("corpus", 2000))]
    opt = torch.optim.AdamW(model.parameters(), lr=r["lr"], weight_decay=0.0)
    gen = torch.Generator().manual_seed(r["seed"])
    batches = []
    while len(batches) < r["steps"]:
        batches += make_batches(
            tok, corpus, r["batch_size"], r["max_seq_len"], epochs=1, generator=gen
        )
    model.train()

    def step(i, loss):
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i % 250 == 0 or i == r["steps"] - 1:
            log(f"embedded model pre-training: step {i}/{r['steps']} loss {loss.item():.3f}")

    run_steps(
        batches[: r["steps"]],
        opt.param_groups,
        r["lr"],
        0.05,
        forward=lambda b: model(**b).loss,
        step=step,
    )
    model.eval().save_pretrained(tmp)
    shutil.rmtree(tmp / "corpus")
    meta = {
        "recipe": r,
        "sha256": _sha256(tmp / WEIGHTS),
        "built": {
            "seconds": round(time.time() - t0, 1),
            "torch": torch.__version__,
            "machine": platform.machine(),
            "processor": platform.processor(),
        },
    }
    (tmp / "recipe.json").write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")
    if out.is_dir() and not (out / "config.json").is_file():
        shutil.rmtree(out)  # an empty or half-written folder of an earlier attempt
    try:
        tmp.rename(out)
    except OSError:  # another process (e.g. on a node sharing the cache) finished first
        if not (out / "config.json").is_file():
            raise
        shutil.rmtree(tmp, ignore_errors=True)
    return out
