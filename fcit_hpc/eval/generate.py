"""Evaluation after a stage: greedy generation over batches of ``eval.batch_size`` test samples
(left-padded, each sample with its own SSA gate α), samples dealt over the ranks, predictions
gathered to rank 0 as UTF-8 bytes (no pickle) and scored there with each dataset's scorer; the
server keeps the predictions beside the state. Same numbers at any world size; batch size 1
generates one sample at a time without padding.

Generation runs on the run's :class:`~fcit_hpc.eval.decode.StaticGreedyDecoder` (static KV cache,
decode step from a CUDA graph on CUDA; made once per run and kept on the context), or with
``eval.decoder: hf`` through Hugging Face ``generate``: the same predictions."""

from __future__ import annotations

import numpy as np
import torch

from fcit_hpc.benchmark.scorers import score
from fcit_hpc.data.sample import Sample
from fcit_hpc.fed.server.predictions import StageEval
from fcit_hpc.fed.wire import pack_predictions, unpack_predictions
from fcit_hpc.host import to_host
from fcit_hpc.seeds import EVAL_DEAL_STRIDE
from fcit_hpc.timers import GenerationClock, phase


def left_pad(
    prompts: list[list[int]], pad_id: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts as int64 ids [B, T] padded on the left with ``pad_id``, and their attention mask
    [B, T] (1 on the prompt, 0 on the padding), both on ``device``.

    Left padding puts every prompt's last token in the last column, where generation continues;
    Hugging Face ``generate`` derives the position ids from the mask (cumsum - 1), so a padded
    prompt sees the positions it has alone."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, width - len(p) :] = torch.tensor(p, dtype=torch.long)
        mask[b, width - len(p) :] = 1
    return ids.to(device), mask.to(device)


def answer_budgets(tok, tests: dict[int, list[Sample]], cap: int) -> dict[int, int]:
    """Per task, the new tokens generation may take: the longest test answer's tokens plus its
    end token (the form the model is trained on), at most ``cap`` (``eval.max_new_tokens``);
    ``cap`` for a task without test samples."""
    out = {}
    for t, samples in tests.items():
        longest = max((len(tok.encode(s.answer)) for s in samples), default=cap - 1)
        out[t] = max(1, min(cap, longest + 1))
    return out


def until_eos(ids: list[int], eos_id: int) -> list[int]:
    """A row's new tokens up to its first ``eos`` (excluded): a row that finished before the
    others goes on with padding until the whole batch stops."""
    return ids[: ids.index(eos_id)] if eos_id in ids else ids


@torch.no_grad()
def greedy_batch(
    model,
    tok,
    instructions: list[str],
    max_new_tokens: int | list[int],
    *,
    images: list[str | None] | None = None,
    decoder=None,
) -> list[str]:
    """Greedy answers to ``instructions`` generated together (KV cache), one string per
    instruction; ``images`` (one path or None per instruction) feed a multimodal model.
    ``max_new_tokens``: one budget for all, or one per instruction (the batch generates up to
    the largest and each row is cut to its own, so a row's answer is the one it gets alone).

    The SSA gate, when used, is set on the adapter before (α [B, S_live], row b for prompt b).
    Inputs go to the model's device; the model is never moved here. ``decoder``: a
    :class:`~fcit_hpc.eval.decode.StaticGreedyDecoder` of ``model`` (None: Hugging Face
    ``generate``)."""
    device = next(model.parameters()).device
    ids, mask = left_pad([tok.prompt(x) for x in instructions], tok.pad_token_id, device)
    extra = {}
    if tok.num_image_tokens:
        paths = images if images is not None else [None] * len(instructions)
        pix = torch.stack([tok.pixels(p) for p in paths])  # [B, 3, H, W]
        extra["pixel_values"] = pix.to(device)
    budgets = (
        [max_new_tokens] * len(instructions) if isinstance(max_new_tokens, int) else max_new_tokens
    )
    if len(budgets) != len(instructions):
        raise ValueError(f"{len(budgets)} budgets for {len(instructions)} instructions")
    clock = GenerationClock()  # prefill / decode phase split (fcit_hpc.timers)
    if decoder is not None:
        new = decoder.generate(ids, mask, max(budgets), streamer=clock, **extra)
    else:
        out = model.generate(
            ids,
            attention_mask=mask,
            max_new_tokens=max(budgets),
            do_sample=False,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
            streamer=clock,
            **extra,
        )
        new = out[:, ids.shape[1] :]
    new = to_host(new, np.int64)  # [B, ≤ max(budgets)]
    return [
        tok.decode(until_eos(row.tolist()[:n], tok.eos_token_id))
        for row, n in zip(new, budgets, strict=True)
    ]


def run_decoder(ctx):
    """The run's decoder (made at the first evaluation, kept on ``ctx`` for the run: its static
    cache and CUDA graph serve every later batch and stage); None for ``eval.decoder: hf``."""
    ev = ctx.eval
    if ev.decoder == "hf":
        return None
    dec = getattr(ctx, "decoder", None)
    if dec is None or dec.model is not ctx.model:
        from fcit_hpc.eval.decode import StaticGreedyDecoder

        on_cuda = next(ctx.model.parameters()).device.type == "cuda"
        dec = StaticGreedyDecoder(ctx.model, ctx.adapter, graphs=ev.cuda_graphs and on_cuda)
        ctx.decoder = dec
    return dec


def local_samples(ctx) -> list[tuple[int, int, Sample]]:
    """This rank's (task, index, sample) in task then index order: sample i of task t belongs to
    rank (t·EVAL_DEAL_STRIDE + i) mod world size."""
    data, comm = ctx.data, ctx.comm
    return [
        (t, i, s)
        for t in range(data.num_tasks)
        for i, s in enumerate(data.test[t])
        if (t * EVAL_DEAL_STRIDE + i) % comm.size == comm.rank
    ]


def predict_local(ctx, state) -> list[tuple[int, int, str]]:
    """This rank's share of the test samples: list of (task, index, prediction), generated in
    batches of ``eval.batch_size`` consecutive samples of the share."""
    encoder, adapter = ctx.encoder, ctx.adapter
    mine = local_samples(ctx)
    budgets = answer_budgets(ctx.tok, ctx.data.test, ctx.eval.max_new_tokens)
    size = ctx.eval.batch_size
    decoder = run_decoder(ctx)
    out = []
    ctx.model.eval()
    for start in range(0, len(mine), size):
        batch = mine[start : start + size]
        samples = [s for _, _, s in batch]
        with phase("identity"):  # the SSA gate's features of the batch
            features = encoder.encode_samples(samples) if encoder is not None else None  # [B, D]
        ctx.method.set_inference(adapter, state, features)
        texts = greedy_batch(
            ctx.model,
            ctx.tok,
            [s.instruction for s in samples],
            [budgets[t] for t, _, _ in batch],
            images=[s.image for s in samples],
            decoder=decoder,
        )
        out += [(t, i, text) for (t, i, _), text in zip(batch, texts, strict=True)]
    adapter.set_activation(None)
    if decoder is not None:
        decoder.release()  # the device's memory goes back to training until the next stage
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
        answers, meteor = [s.answer for s in tests], ctx.eval.caption_meteor
        with phase("score"):
            acc[t] = score(data.scorers[t], p, answers, meteor=meteor) if tests else np.nan
    return StageEval(acc, per_task)
