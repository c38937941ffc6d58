"""The Hugging Face configs of the byte-vocabulary Llama and LLaVA models (tiny and embedded)."""

from __future__ import annotations

from fcit_hpc.model.tokenizer import IMAGE, VOCAB_SIZE


def llama_config(hidden: int, intermediate: int, layers: int, heads: int, *, max_positions: int):
    """LlamaConfig over the byte vocabulary (pad 0, bos 1, eos 2), untied embeddings."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=max_positions,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )


def llava_config(text, vision_hidden: int, image_size: int, patch_size: int):
    """LlavaConfig: ``text`` (a LlamaConfig) behind a one-layer CLIP vision tower."""
    from transformers import CLIPVisionConfig, LlavaConfig

    vision = CLIPVisionConfig(
        hidden_size=vision_hidden,
        intermediate_size=2 * vision_hidden,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=image_size,
        patch_size=patch_size,
    )
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=IMAGE,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
    )
