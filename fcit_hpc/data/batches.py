"""Collation: samples → (input_ids, labels) with the prompt masked, → shuffled batches, padded or
packed.

Packed (``train.packing``): a batch's samples follow one another in one row, with no padding and
no attention mask; ``position_ids`` restart at 0 for every sample, from which Hugging Face builds
attention that stays within each sample (``masking_utils.find_packed_sequence_indices``: a
block-diagonal causal mask with sdpa/eager; flash-attention's varlen path on CUDA). The first
token of every sample carries no label, so no sample learns to predict the next one's start: the
targets, and so the batch's mean token loss, are those of the padded batch."""

from __future__ import annotations

import torch

from fcit_hpc.data.sample import Sample


def prompt_head(tok, prompt: list[int]) -> int:
    """Tokens at the start of a prompt that truncation keeps: up to the last image token (the
    model needs all of them), else the first (<bos>)."""
    img = tok.image_token_id if tok.num_image_tokens else None
    if img is not None and img in prompt:
        return len(prompt) - prompt[::-1].index(img)
    return 1


def encode_sample(tok, s: Sample, max_len: int) -> tuple[list[int], list[int]]:
    """(input_ids, labels) with the prompt masked out of the loss (-100).

    Too long: the answer is kept (up to max_len // 2 tokens) and the instruction loses its
    beginning, so the question itself (usually at the end) stays in view.
    """
    answer = [*tok.encode(s.answer), tok.eos_token_id][: max(1, max_len // 2)]
    prompt = tok.prompt(s.instruction)
    room = max_len - len(answer)
    if len(prompt) > room:
        head = prompt_head(tok, prompt)  # <bos>, the template's start and image tokens stay
        prompt = prompt[:head] + prompt[len(prompt) - (room - head) :]
    return prompt + answer, [-100] * len(prompt) + answer


def pad_batch(rows: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """(input_ids, labels) rows right-padded to the longest: [B, T] each, with the attention
    mask."""
    T = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    lab = torch.full((len(rows), T), -100, dtype=torch.long)
    att = torch.zeros((len(rows), T), dtype=torch.long)
    for b, (x, y) in enumerate(rows):
        ids[b, : len(x)] = torch.as_tensor(x)
        lab[b, : len(y)] = torch.as_tensor(y)
        att[b, : len(x)] = 1
    return {"input_ids": ids, "attention_mask": att, "labels": lab}


def pack_batch(rows: list[tuple[list[int], list[int]]]) -> dict[str, torch.Tensor]:
    """(input_ids, labels) rows one after another in one row: input_ids, labels and
    position_ids [1, Σ T_i] (module docstring); no attention mask."""
    ids = torch.cat([torch.as_tensor(x, dtype=torch.long) for x, _ in rows])
    lab = torch.cat([torch.as_tensor(y, dtype=torch.long) for _, y in rows])
    pos = torch.cat([torch.arange(len(x)) for x, _ in rows])
    lab[pos == 0] = -100  # a sample's first token is no target of the one before
    return {"input_ids": ids[None], "labels": lab[None], "position_ids": pos[None]}


def packed_kwargs(batch: dict) -> dict:
    """What a model's forward on ``batch`` needs beside it: no KV cache for a packed batch (Hugging
    Face reads the packing from the position ids only without a cache; with one, samples would
    attend to each other)."""
    return {"use_cache": False} if "position_ids" in batch else {}


def collate(rows, pad_id: int, pack: bool) -> dict[str, torch.Tensor]:
    return pack_batch(rows) if pack else pad_batch(rows, pad_id)


def real_tokens(batch: dict) -> int:
    """Tokens of a batch that are samples' tokens (not padding)."""
    if "attention_mask" in batch:
        return int(batch["attention_mask"].sum())
    return int(batch["input_ids"].numel())


def make_batches(
    tok,
    samples: list[Sample],
    batch_size: int,
    max_len: int,
    *,
    epochs: int,
    generator: torch.Generator,
    pack: bool = False,
) -> list[dict[str, torch.Tensor]]:
    """Shuffled batches for ``epochs`` passes over ``samples`` (with ``pixel_values`` [B, 3, H,
    W] for a multimodal model): right-padded, or packed into one row (``pack``)."""
    max_len = max_len + tok.num_image_tokens
    enc = [encode_sample(tok, s, max_len) for s in samples]
    images = None
    if tok.num_image_tokens:
        images = [tok.pixels(s.image) for s in samples]
    batches = []
    for _ in range(epochs):
        order = torch.randperm(len(enc), generator=generator).tolist()
        for i in range(0, len(order), batch_size):
            chunk = [enc[j] for j in order[i : i + batch_size]]
            batch = collate(chunk, tok.pad_token_id, pack)
            if images is not None:
                batch["pixel_values"] = torch.stack([images[j] for j in order[i : i + batch_size]])
            batches.append(batch)
    return batches
