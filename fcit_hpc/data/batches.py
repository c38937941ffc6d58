"""Collation: samples → (input_ids, labels) with the prompt masked, → shuffled padded batches."""

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


def make_batches(
    tok,
    samples: list[Sample],
    batch_size: int,
    max_len: int,
    epochs: int,
    generator: torch.Generator,
) -> list[dict[str, torch.Tensor]]:
    """Shuffled, right-padded batches for ``epochs`` passes over ``samples`` (with
    ``pixel_values`` [B, 3, H, W] for a multimodal model)."""
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
            T = max(len(ids) for ids, _ in chunk)
            ids = torch.full((len(chunk), T), tok.pad_token_id, dtype=torch.long)
            lab = torch.full((len(chunk), T), -100, dtype=torch.long)
            att = torch.zeros((len(chunk), T), dtype=torch.long)
            for b, (x, y) in enumerate(chunk):
                ids[b, : len(x)] = torch.tensor(x)
                lab[b, : len(y)] = torch.tensor(y)
                att[b, : len(x)] = 1
            batch = {"input_ids": ids, "attention_mask": att, "labels": lab}
            if images is not None:
                batch["pixel_values"] = torch.stack([images[j] for j in order[i : i + batch_size]])
            batches.append(batch)
    return batches
