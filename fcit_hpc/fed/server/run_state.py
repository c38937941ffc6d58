"""The global state's start: a fresh one from the config, or a stored one checked against the
model."""

from __future__ import annotations

import numpy as np
import torch

from fcit_hpc.errors import StateError
from fcit_hpc.seeds import SALT_ADAPTER_INIT, derive_seed
from fcit_hpc.state.schema import RunState


def init_state(
    adapter,
    method,
    *,
    seed: int,
    config_yaml: str,
    dim: int,
    shape: tuple[int, int],
    strategy,
    projector=None,
):
    """Fresh global state: the method's initial subspaces (A ~ N(0, 0.01), B = 0 unless it says
    otherwise) and mixer, seeded by the run's ``seed``; no tokens yet; ``config_yaml``: the
    run's resolved config, stored with it.
    ``dim``: identity-token dimension D; ``shape``: (stages, tasks) of the accuracy matrix;
    ``strategy``: the run's federated optimizer (its server state starts here); ``projector``:
    the model's projector weights when clients train it (flat float32), else None."""
    s_max = method.num_slots()
    gen = torch.Generator().manual_seed(derive_seed(seed, SALT_ADAPTER_INIT))
    vecs, mixer = method.initial_weights(adapter, gen)  # [S_max, P], [M]
    st = RunState(
        config_yaml=config_yaml,
        adapter=vecs,
        tokens=np.zeros((s_max, dim), np.float32),
        token_counts=np.zeros(s_max, np.float64),
        accuracy=np.full(shape, np.nan),  # [stages, tasks]
        server_opt=strategy.init_state(vecs.shape),
        mixer=np.asarray(mixer, np.float32),
    )
    st.method = method.init_state(adapter.numel)
    if projector is not None:
        st.projector = np.asarray(projector, np.float32).copy()
    if not method.uses_identity:
        st.num_subspaces = 1
    return st


def init_method_state(st: RunState, method, numel: int) -> None:
    """A stored state without a method state (a version-1 file whose EWC had not consolidated a
    stage yet) gets the method's fresh one; :func:`check_state` then validates it."""
    if not st.method.name:
        st.method = method.init_state(numel)


def check_state(
    st: RunState,
    method,
    numel: int,
    where,
    *,
    projector_numel: int = 0,
    mixer_numel: int = 0,
    shape: tuple[int, int] | None = None,
    dim: int | None = None,
) -> None:
    """A stored state must fit the model (S_max subspaces of ``numel`` values, the projector
    when clients train it, the method's mixer), the benchmark (``shape``: stages x tasks of the
    accuracy matrix), the identity encoder (``dim``), torch's generator (its saved state's
    size) and the method (its own state, :meth:`~fcit_hpc.methods.base.Method.validate_state`)."""
    method.validate_state(st.method, numel, where)
    if st.adapter.shape != (method.num_slots(), numel):
        raise StateError(
            f"{where}: /global/adapter shape {st.adapter.shape} does not fit the model "
            f"({method.num_slots()}, {numel})"
        )
    if st.projector.size != projector_numel:
        raise StateError(
            f"{where}: /global/projector has {st.projector.size} values, the model's trained "
            f"projector {projector_numel}"
        )
    if st.mixer.size != mixer_numel:
        raise StateError(
            f"{where}: /global/mixer has {st.mixer.size} values, the method's mixers {mixer_numel}"
        )
    if shape is not None and st.accuracy.shape != shape:
        raise StateError(
            f"{where}: /eval/accuracy shape {st.accuracy.shape} does not fit the benchmark's "
            f"{shape} (stages x tasks)"
        )
    if dim is not None and st.tokens.shape[1] != dim:
        raise StateError(
            f"{where}: /global/tokens dimension {st.tokens.shape[1]}, the identity encoder's {dim}"
        )
    check_residuals(st, numel, where)
    if st.rng_torch.size not in (0, torch.get_rng_state().numel()):
        raise StateError(f"{where}: /rng/torch holds {st.rng_torch.size} bytes, not a torch state")


def check_residuals(st: RunState, numel: int, where) -> None:
    """Error-feedback residuals (``/compress``) must fit the parts of an update: a subspace k <
    S_max of ``numel`` values, or one of the state's side vectors of its size."""
    sides = [v.size for v in st.sides().values()]
    for (client, k), v in st.residuals.items():
        ok = v.size == numel and k < st.adapter.shape[0] if k >= 0 else -1 - k < len(sides)
        if not ok or (k < 0 and v.size != sides[-1 - k]):
            raise StateError(
                f"{where}: /compress residual of client {client}, part {k} ({v.size} values) "
                "does not fit the model's subspaces and side vectors"
            )
