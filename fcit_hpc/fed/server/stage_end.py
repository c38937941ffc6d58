"""The stage-end phase on the server (e.g. EWC's Fisher): validate the uploads, let the method
merge."""

from __future__ import annotations

import logging

import numpy as np

from fcit_hpc.fed.wire import TokenUpload

log = logging.getLogger("fcit.server")


def accepted_stage_end(
    uploads: list[TokenUpload], numel: int, label: str = "stage-end upload"
) -> list[tuple[np.ndarray, int]]:
    """(values, samples) of the uploads that are ``numel`` finite non-negative values, client-id
    order; the others are logged (as the method's ``label``) and dropped."""
    out = []
    for u in uploads:
        f = u.values
        if f.size != numel or not np.isfinite(f).all() or (f < 0).any():
            log.warning(
                "client %d: %s rejected (size %d, expected %d, or not finite >= 0)",
                u.client,
                label,
                f.size,
                numel,
            )
            continue
        out.append((f, u.samples))
    return out


def merge_stage_end(st, method, uploads: list[TokenUpload], stage: int) -> None:
    accepted = accepted_stage_end(uploads, st.adapter.shape[1], method.stage_end_label)
    method.merge_stage_end(st, accepted, stage)
