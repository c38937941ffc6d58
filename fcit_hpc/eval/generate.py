"""Evaluation after a stage: greedy generation per test sample (batch size 1, so SSA gates are per
sample), samples dealt over the ranks, predictions gathered to rank 0 as UTF-8 bytes (no pickle)
and scored there with each dataset's scorer; the server keeps the predictions beside the state.
Same numbers at any world size."""

from __future__ import annotations

import numpy as np
import torch

from fcit_hpc.benchmark.scorers import score
from fcit_hpc.fed.server.predictions import StageEval
from fcit_hpc.fed.wire import pack_predictions, unpack_predictions
from fcit_hpc.seeds import EVAL_DEAL_STRIDE


@torch.no_grad()
def greedy(model, tok, instruction: str, max_new_tokens: int, image: str | None = None) -> str:
    ids = torch.tensor([tok.prompt(instruction)])
    extra = {}
    if tok.num_image_tokens:
        from fcit_hpc.data.images import load_image

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


def predict_local(ctx, state) -> list[tuple[int, int, str]]:
    """This rank's share of the test samples: list of (task, index, prediction)."""
    comm, data, encoder, adapter = ctx.comm, ctx.data, ctx.encoder, ctx.adapter
    out = []
    ctx.model.eval()
    for t in range(data.num_tasks):
        for i, s in enumerate(data.test[t]):
            if (t * EVAL_DEAL_STRIDE + i) % comm.size != comm.rank:
                continue
            feature = encoder.encode_samples([s])[0] if encoder is not None else None
            ctx.method.set_inference(adapter, state, feature)
            text = greedy(ctx.model, ctx.tok, s.instruction, ctx.cfg.eval.max_new_tokens, s.image)
            out.append((t, i, text))
    adapter.set_activation(None)
    return out


def gather_predictions(comm, local) -> dict[tuple[int, int], str] | None:
    """(task, index) → prediction on rank 0, moved as prediction messages (no pickle)."""
    head, body = pack_predictions(local)
    heads, bodies = comm.gatherv(head), comm.gatherv(body)
    if heads is None:
        return None
    return unpack_predictions(heads, bodies)


def evaluate(ctx, state) -> StageEval | None:
    """Score (0–100) per task and the predictions it comes from, on rank 0; None elsewhere."""
    preds = gather_predictions(ctx.comm, predict_local(ctx, state))
    if preds is None:
        return None
    data = ctx.data
    acc = np.zeros(data.num_tasks)
    per_task = []
    for t in range(data.num_tasks):
        tests = data.test[t]
        p = [preds[(t, i)] for i in range(len(tests))]
        per_task.append(p)
        acc[t] = score(data.scorers[t], p, [s.answer for s in tests]) if tests else np.nan
    return StageEval(acc, per_task)
