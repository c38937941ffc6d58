"""The stage-end phase on the server (EWC's Fisher): validate the uploads, let the method merge."""

from __future__ import annotations

import logging

import numpy as np

from fcit_hpc.fed.wire import TokenUpload

log = logging.getLogger("fcit.server")


def accepted_stage_end(uploads: list[TokenUpload], numel: int) -> list[tuple[np.ndarray, int]]:
    """(values, samples) of the uploads that are ``numel`` finite non-negative values, client-id
    order; the others are logged and dropped."""
    out = []
    for u in uploads:
        f = u.values
        if f.size != numel or not np.isfinite(f).all() or (f < 0).any():
            log.warning(
                "client %d: Fisher rejected (size %d, expected %d, or not finite >= 0)",
                u.client,
                f.size,
                numel,
            )
            continue
        out.append((f, u.samples))
    return out


def merge_stage_end(st, method, uploads: list[TokenUpload], stage: int) -> None:
    method.merge_stage_end(st, accepted_stage_end(uploads, st.adapter.shape[1]), stage)
