"""Evaluation after a stage: greedy generation per test sample (batch size 1, so SSA gates are per
sample), samples dealt over the ranks, predictions gathered to rank 0 as UTF-8 bytes (no pickle)
and scored there with each dataset's scorer. Same numbers at any world size."""

from __future__ import annotations

import numpy as np
import torch

from fcit_hpc.benchmark.scorers import score


@torch.no_grad()
def greedy(model, tok, instruction: str, max_new_tokens: int, image: str | None = None) -> str:
    ids = torch.tensor([tok.prompt(instruction)])
    extra = {}
    if tok.num_image_tokens:
        from fcit_hpc.model.vision import load_image

        extra["pixel_values"] = load_image(image, tok.image_size)[None]
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        **extra,
    )
    return tok.decode(out[0, ids.shape[1] :].tolist())


def predict_local(cfg, comm, model, adapter, tok, method, state, data, encoder):
    """This rank's share of the test samples: list of (task, index, prediction)."""
    out = []
    model.eval()
    for t in range(data.num_tasks):
        for i, s in enumerate(data.test[t]):
            if (t * 100003 + i) % comm.size != comm.rank:
                continue
            feature = encoder.encode_samples([s])[0] if encoder is not None else None
            method.set_inference(adapter, state, feature)
            out.append((t, i, greedy(model, tok, s.instruction, cfg.eval.max_new_tokens, s.image)))
    adapter.set_activation(None)
    return out


def gather_predictions(comm, local) -> dict[tuple[int, int], str] | None:
    """(task, index) → prediction on rank 0, moved as int64 headers + UTF-8 bytes."""
    blobs = [p.encode("utf-8") for _, _, p in local]
    head = np.array(
        [[t, i, len(b)] for (t, i, _), b in zip(local, blobs, strict=True)], np.int64
    ).reshape(-1)
    body = np.frombuffer(b"".join(blobs), np.uint8) if blobs else np.zeros(0, np.uint8)
    heads, bodies = comm.gatherv(head), comm.gatherv(body)
    if heads is None:
        return None
    preds = {}
    for h, b in zip(heads, bodies, strict=True):
        off = 0
        for t, i, n in h.reshape(-1, 3):
            preds[(int(t), int(i))] = bytes(b[off : off + n]).decode("utf-8")
            off += int(n)
    return preds


def evaluate(cfg, comm, model, adapter, tok, method, state, data, encoder) -> np.ndarray | None:
    """Score (0–100) per task on rank 0, None elsewhere."""
    local = predict_local(cfg, comm, model, adapter, tok, method, state, data, encoder)
    preds = gather_predictions(comm, local)
    if preds is None:
        return None
    acc = np.zeros(data.num_tasks)
    for t in range(data.num_tasks):
        tests = data.test[t]
        if not tests:
            acc[t] = np.nan
            continue
        p = [preds[(t, i)] for i in range(len(tests))]
        acc[t] = score(data.scorers[t], p, [s.answer for s in tests])
    return acc
