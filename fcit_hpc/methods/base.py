"""What a method decides: how many subspaces, which one each client trains, how inference gates."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fcit_hpc.config import LoraConfig, MethodConfig, ModelConfig
from fcit_hpc.errors import ConfigError, StateError
from fcit_hpc.host import to_host
from fcit_hpc.state.schema import MethodState

# server decisions on a client's subspace (DKO); SMALL: the client would have made a new subspace
# alone with under ``method.min_cluster_frac`` of the round's samples, so it joins the nearest
MATCHED, NEW, FULL, SMALL = 1, 2, 3, 4
ACTIONS = {
    0: "none",
    MATCHED: "matched",
    NEW: "new",
    FULL: "full->nearest",
    SMALL: "small->nearest",
}


@dataclass(frozen=True)
class Settings:
    """A method's own settings: the fields of the config's ``method`` section that it reads
    (a subclass per method, in the method's file, with the section's field names); the base
    reads none. :meth:`of` takes them from the section."""

    @classmethod
    def of(cls, section: MethodConfig) -> Settings:
        return cls(**{f.name: getattr(section, f.name) for f in dataclasses.fields(cls)})


@dataclass(frozen=True)
class IdentitySettings(Settings):
    """The identity encoder of a method whose clients upload identity tokens
    (``uses_identity``; fcit_hpc.model.identity.make_encoder)."""

    identity_encoder: str
    identity_dim: int
    identity_source: str
    encoder_path: str
    open_clip_model: str


@dataclass
class DkoDecision:
    client: int
    subspace: int
    similarity: float  # best cosine similarity before the decision (nan when no token existed)
    action: int


class Method:
    """A federated continual method's behaviour, as hooks the server, the clients and evaluation
    call. A method is one file in ``methods/`` plus one line in :data:`fcit_hpc.registry.METHODS`.

    - slots: :meth:`num_slots` subspaces allocated, :meth:`initial_weights` their start (and the
      mixer's); :meth:`assign` (server, with identity tokens) or :meth:`stage_subspace` (without)
      says which one a client is assigned, :meth:`trained_subspaces` which ones it then trains;
    - model: :meth:`install` attaches a mixer to every LoRA layer (MoELoRA's router, M-LoRA's
      scales), trained beside the subspaces and averaged by the server;
    - client: :meth:`training_context` (frozen subspaces beside it), :meth:`client_terms` (extra
      loss terms), :meth:`batch_terms` (loss terms of each batch and the model's outputs);
    - stage end: :meth:`stage_end_upload` (clients) and :meth:`merge_stage_end` (server), when
      ``has_stage_end``; :meth:`stage_end_done` says whether a stage's is merged already;
      :meth:`after_stage` (server) updates the method's state at the end of every stage;
    - its own state (``/method/<name>`` in state.h5): :meth:`init_state` makes it,
      :meth:`validate_state` checks a stored one, :attr:`client_arrays` names the arrays the
      loop broadcasts to every rank each round (the clients' :meth:`client_terms` read them);
    - its diagnostics (DISCO's DKO diagnostics; none by default): :meth:`prepare_state` fits
      them to the benchmark on every start, :meth:`after_round` and :meth:`after_eval` update
      them, :meth:`eval_records` (metrics.jsonl), :meth:`summary` and :meth:`report_lines` show
      them;
    - inference: :meth:`set_inference` gates the subspaces for a batch of test samples;
    - export: :meth:`export` writes PEFT adapters where the method's adapter is one.

    A method gets its own settings (:attr:`settings_class`, the ``method`` section's fields it
    reads) and the ``lora`` section, nothing else of the run's config; :meth:`check_trainer`
    refuses a trainer it cannot work with.
    """

    name = "base"
    trains = True  # False: no federated training at all (zero-shot)
    uses_identity = False  # clients upload identity tokens (DKO)
    has_stage_end = False  # a stage-end phase after the last round of every stage (EWC's Fisher)
    stage_end_label = "stage-end upload"  # how logs name a client's stage-end statistic
    client_arrays: tuple[str, ...] = ()  # arrays of its state every rank gets each round
    # a forward pass it adds to every training batch from the second stage on, as a share of a
    # training step (LwF's teacher), for fcit plan's prediction
    extra_forward = 0.0
    settings_class: type[Settings] = Settings

    def __init__(self, settings: Settings, lora: LoraConfig):
        self.settings, self.lora = settings, lora

    @classmethod
    def from_sections(cls, method: MethodConfig, lora: LoraConfig) -> Method:
        """This method with its settings taken from the config's ``method`` section."""
        return cls(cls.settings_class.of(method), lora)

    def check_trainer(self, backend: str, zero_stage: int) -> None:
        """Raise a ConfigError when the method cannot train with this trainer
        (``train.backend``, ``train.zero_stage``)."""

    def num_slots(self) -> int:
        """S_max: subspaces allocated in the global adapter."""
        return 1

    def init_state(self, numel: int) -> MethodState:
        """The method's own state at the start of a run (``numel``: P, one subspace's values);
        an empty MethodState (no ``/method`` group) for a method without one."""
        return MethodState()

    def validate_state(self, ms: MethodState, numel: int, where) -> None:
        """Raise a StateError naming ``where`` when a stored method state does not fit this
        method and model. The base checks the name and the array/counter names of
        :meth:`init_state`; a method with state adds its shapes and dtypes."""
        fresh = self.init_state(numel)
        if ms.name != fresh.name:
            raise StateError(
                f"{where}: /method holds the state of method {ms.name or '(none)'!r}, the run's "
                f"method {self.name!r} keeps {fresh.name or 'none'!r}"
            )
        for kind, got, want in (
            ("arrays", ms.arrays, fresh.arrays),
            ("counters", ms.counters, fresh.counters),
        ):
            if set(got) != set(want):
                raise StateError(
                    f"{where}: /method/{ms.name} {kind} {sorted(got)}, expected {sorted(want)}"
                )
        for k, v in ms.arrays.items():
            if v.dtype != fresh.arrays[k].dtype or v.ndim != fresh.arrays[k].ndim:
                raise StateError(
                    f"{where}: /method/{ms.name}/{k} is {v.dtype} of {v.ndim} dimension(s), "
                    f"expected {fresh.arrays[k].dtype} of {fresh.arrays[k].ndim}"
                )

    def prepare_state(self, st, where, stages: list[list[int]], num_tasks: int) -> None:
        """Server, on every start and resume after the state's checks: make (a fresh state, an
        older file) or check what the method keeps of the benchmark's ``stages`` (data units,
        their tasks); a StateError names ``where`` when it does not fit."""

    def after_round(self, st, client_rows: np.ndarray) -> None:
        """Server, after a round's aggregation: its client records (CLIENT_DTYPE)."""

    def after_eval(self, st, stage: int, features) -> None:
        """Server, after a stage's evaluation; ``features()`` gives each task's test samples'
        identity features [M_t, D] (None without an identity encoder)."""

    def eval_records(self, st, stage: int, task_names: list[str]) -> list[str]:
        """metrics.jsonl lines (JSON) that follow the ``eval`` line of ``stage``, from the state
        alone (the log is rewritten from it on resume)."""
        return []

    def summary(self, st) -> dict[str, float]:
        """Entries the method adds to the run's summary."""
        return {}

    def report_lines(self, st, fmt) -> list[str]:
        """The method's section of report.md (``fmt``: the report's number format)."""
        return []

    def stage_end_done(self, ms: MethodState, stage: int) -> bool:
        """Whether the stage-end phase of ``stage`` is merged into ``ms`` already (a resumed
        run does not repeat it)."""
        return False

    def slot_rank(self) -> int:
        """The rank of each slot (lora.lora_r; the single LoRA of :class:`SingleLoRA` methods
        has DISCO's whole budget). The scaling stays lora_alpha / lora_r at any rank."""
        return self.lora.lora_r

    def check_stages(self, num_stages: int) -> None:
        """Raise a ConfigError when the method cannot run this many stages."""

    def assign(
        self, state, clients: list[int], tokens: list[np.ndarray], samples: list[int]
    ) -> list[DkoDecision]:
        """Server: the subspace each client trains this round (client-id order)."""
        return [DkoDecision(c, 0, float("nan"), MATCHED) for c in clients]

    def stage_subspace(self, stage: int) -> int:
        """Methods without identity tokens: the subspace every client trains in this stage."""
        return 0

    def trained_subspaces(self, k: int) -> tuple[int, ...]:
        """The subspaces a client assigned subspace k trains and uploads, in upload order."""
        return (k,)

    def install(self, adapter) -> None:
        """Attach the method's mixer to every LoRA layer of ``adapter`` (none by default)."""

    def initial_weights(self, adapter, generator) -> tuple[np.ndarray, np.ndarray]:
        """The global state's start, drawn from ``generator``: every slot's subspace (float32
        [S_max, P]; A ~ N(0, 0.01), B = 0) and the mixer (float32 [M]; empty without one)."""
        vecs = np.stack([to_host(adapter.init_vector(generator)) for _ in range(self.num_slots())])
        return vecs, np.zeros(0, np.float32)

    def training_context(self, k: int) -> tuple[int, ...]:
        """Subspaces that act (frozen) beside subspace k while it is trained."""
        return ()

    def client_terms(self, adapter, k: int, context: dict, params: list, *, view) -> list:
        """Zero-argument loss terms a client adds while training subspace k (``params``, loaded
        at the global values; ``context``: the frozen subspaces; ``view``: the global state)."""
        return []

    def batch_terms(self, model, adapter, k: int, view) -> list:
        """Loss terms of each batch and the model's outputs a client adds while training
        subspace k (:class:`fcit_hpc.train.base.BatchTerm`; ``view``: the global state)."""
        return []

    def after_stage(self, st, stage: int) -> None:
        """Server, at the end of ``stage`` (after its evaluation, before the state is stored):
        update the method's own state ``st.method`` (nothing by default)."""

    def stage_end_upload(self, model, adapter, view, batches) -> np.ndarray:
        """Client, at the end of a stage: the statistic it uploads (float32, flat)."""
        raise NotImplementedError

    def merge_stage_end(self, st, uploads: list[tuple[np.ndarray, int]], stage: int) -> None:
        """Server: merge the accepted (values, samples) uploads of the stage into ``st``."""
        raise NotImplementedError

    def activation(self, features: np.ndarray, tokens: np.ndarray) -> np.ndarray:
        """An identity method's gate α [M, S] of instruction features [M, D] over the live
        identity tokens [S, D] (DISCO: SSA's), for the run's activation map."""
        raise NotImplementedError(f"{self.name} has no identity gate")

    def set_inference(self, adapter, state, features: np.ndarray | None) -> None:
        """Configure the adapter for a batch of B test samples (features: their identity
        features [B, D], None without an identity encoder); a per-sample gate is α [B, S_live]."""
        adapter.train_subspace(0)

    def export(self, model: ModelConfig, st, out_dir: Path, alpha: np.ndarray | None) -> list[Path]:
        """Write the run's adapters as PEFT LoRA adapters (``fcit export``) on the base model of
        ``model``; returns their folders. A ValueError says why a method's adapter cannot be
        written so."""
        from fcit_hpc.model.export import export_adapters

        return export_adapters(model, self.lora, st, out_dir, alpha=alpha, rank=self.slot_rank())


class SingleLoRA(Method):
    """One LoRA shared by every client and stage (Finetune, EWC, the multi-task bound). At
    parity with DISCO (``lora.single_rank: budget``, the default) its rank is DISCO's whole
    budget S_max x r, as every method of the paper has rank 64; ``r`` gives it one subspace's."""

    def slot_rank(self) -> int:
        lc = self.lora
        return lc.max_subspaces * lc.lora_r if lc.single_rank == "budget" else lc.lora_r


@dataclass(frozen=True)
class MixtureSettings(Settings):
    experts: int


class Mixture(Method):
    """A method whose clients train every subspace at once, mixed in each layer by a trained
    mixer (MoELoRA's router, M-LoRA's scales), all averaged by the server (FedAvg). The LoRA
    budget is DISCO's, S_max subspaces of rank r; its R = S_max·r rows form E =
    ``method.experts`` experts of rank R/E each."""

    settings_class = MixtureSettings

    def __init__(self, settings: MixtureSettings, lora: LoraConfig):
        super().__init__(settings, lora)
        lc, e = lora, settings.experts
        budget = lc.max_subspaces * lc.lora_r
        if budget % e:
            raise ConfigError(
                f"method.experts: {e} experts do not divide the LoRA budget lora.max_subspaces x "
                f"lora.lora_r = {lc.max_subspaces} x {lc.lora_r} = {budget} (each expert has "
                "rank budget / experts)"
            )
        self.experts = e
        self.expert_rank = budget // e

    def num_slots(self) -> int:
        return self.lora.max_subspaces

    def trained_subspaces(self, k: int) -> tuple[int, ...]:
        return tuple(range(self.num_slots()))

    def make_mixer(self, layer):
        """The mixer of one SubspaceLoRALinear (float32, on its device, frozen until trained)."""
        raise NotImplementedError

    def install(self, adapter) -> None:
        for m in adapter.layers:
            m.attach_mixer(self.make_mixer(m))

    def set_inference(self, adapter, state, features) -> None:
        """Every expert, mixed by the trained mixer (no identity tokens)."""
        adapter.select(tuple(range(self.num_slots())), trainable=False)
