"""Evaluation after a stage: greedy generation per test sample (batch size 1, so SSA gates are per
sample), exact-match scoring, samples dealt over the ranks and counts summed on rank 0."""

from __future__ import annotations

import numpy as np
import torch

from fcit_hpc.model.tokenizer import EOS, PAD


@torch.no_grad()
def greedy(model, tok, instruction: str, max_new_tokens: int) -> str:
    ids = torch.tensor([tok.prompt(instruction)])
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=EOS,
        pad_token_id=PAD,
    )
    return tok.decode(out[0, ids.shape[1] :].tolist())


def exact_match(pred: str, answer: str) -> bool:
    return pred.strip().lower() == answer.strip().lower()


def evaluate(cfg, comm, model, adapter, tok, method, state, data, encoder) -> np.ndarray | None:
    """Accuracy (%) per task on rank 0 (None elsewhere). Same numbers at any world size."""
    counts = np.zeros((data.num_tasks, 2), dtype=np.int64)  # (correct, total)
    model.eval()
    for t in range(data.num_tasks):
        for i, s in enumerate(data.test[t]):
            if i % comm.size != comm.rank:
                continue
            feature = encoder.encode([s.instruction])[0] if encoder is not None else None
            method.set_inference(adapter, state, feature)
            pred = greedy(model, tok, s.instruction, cfg.eval.max_new_tokens)
            counts[t, 0] += exact_match(pred, s.answer)
            counts[t, 1] += 1
    adapter.set_activation(None)
    parts = comm.gatherv(counts.reshape(-1))
    if parts is None:
        return None
    total = np.sum([p.reshape(-1, 2) for p in parts], axis=0)
    return 100.0 * total[:, 0] / np.maximum(total[:, 1], 1)
