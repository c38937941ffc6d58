"""The one place where tensors leave their device: on their way to the wire or the state file."""

from __future__ import annotations

import numpy as np
import torch


def to_host(t: torch.Tensor, dtype: np.dtype = np.float32) -> np.ndarray:
    """A detached host copy of ``t`` (any device, any float dtype incl. bf16) as a contiguous
    numpy array of ``dtype`` that shares no memory with the tensor."""
    t = t.detach()
    if t.is_floating_point() and np.dtype(dtype).kind == "f":
        t = t.float()  # numpy has no bf16
    return np.array(t.cpu().numpy(), dtype=dtype, copy=True, order="C")
