"""Pre-flight checks of ``fcit run``, on rank 0 before anything is created: the run directory can
be made and written and has room for the state, and the model, its adapters and a batch fit in
the device's memory. Each failure names the path or the config fields (exit 2 or 74).

The memory and size figures are lower bounds from the config alone (float32 words):

* LoRA numel of one subspace ``P = L * |targets| * r * (h + i)`` (every target of a layer taken as
  an h x i linear, the FFN's shape; L layers, hidden h, intermediate i, rank r);
* state.h5 ``>= 4 B * P * (3 * S_max + 2)`` (the adapter, the server optimizer's two moments, EWC's
  Fisher and anchor), and the atomic write holds two copies at once;
* memory, for the randomly initialised models whose sizes the config gives (tiny-llama,
  tiny-llava): base weights ``4 B * L * (4 h^2 + 3 h i)``, adapters with gradient and Adam moments
  ``4 B * 4 * S_max * P``, activations ``4 B * batch * seq * L * (h + i)``; for the generated data
  ``num_tasks * (train_per_task + test_per_task) * 256 B`` (a sample's text and record).

A bound over the machine's memory cannot be allocated, so refusing it up front loses nothing.
"""

from __future__ import annotations

import os
from pathlib import Path

from fcit_hpc.config import Config
from fcit_hpc.errors import ConfigError, RunDirError

WORD = 4  # bytes of a float32
SAMPLE_BYTES = 256  # lower bound of one generated sample in memory (text, record)
VIRTUAL_FS = ("/proc", "/sys", "/dev")


def lora_numel(cfg: Config) -> int:
    """Lower bound of one subspace's LoRA numel P (see the module doc)."""
    m, lc = cfg.model, cfg.lora
    return m.num_layers * len(lc.target_modules) * lc.lora_r * (m.hidden_size + m.intermediate_size)


def state_bytes(cfg: Config) -> int:
    """Lower bound of state.h5's size in bytes."""
    return WORD * lora_numel(cfg) * (3 * cfg.lora.max_subspaces + 2)


def memory_terms(cfg: Config) -> list[tuple[int, str]]:
    """Lower bounds of a rank's memory in bytes, one per part, with the fields each grows with."""
    m, p, b = cfg.model, lora_numel(cfg), cfg.benchmark
    terms = [
        (
            WORD * 4 * cfg.lora.max_subspaces * p,
            "lora.lora_r, lora.max_subspaces, lora.target_modules (adapters with gradients and "
            "optimizer moments)",
        ),
        (
            b.num_tasks * (b.train_per_task + b.test_per_task) * SAMPLE_BYTES,
            "benchmark.train_per_task, benchmark.test_per_task, benchmark.num_tasks (the data)",
        ),
    ]
    if m.name in ("tiny-llama", "tiny-llava"):
        h, i, layers = m.hidden_size, m.intermediate_size, m.num_layers
        terms.append(
            (
                WORD * layers * (4 * h * h + 3 * h * i),
                "model.hidden_size, model.intermediate_size, model.num_layers (base weights)",
            )
        )
        terms.append(
            (
                WORD * cfg.train.batch_size * m.max_seq_len * layers * (h + i),
                "train.batch_size, model.max_seq_len, model.hidden_size (activations)",
            )
        )
    return terms


def device_memory(cfg: Config) -> tuple[int, str]:
    """Bytes of the memory a rank trains in, and its name: the first GPU's when the run uses CUDA,
    else the machine's physical memory."""
    device = cfg.train.device
    if device != "cpu":
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_properties(0).total_memory, "GPU memory"
    return host_memory(), "physical memory"


def _gib(n: float) -> str:
    return f"{n / 2**30:.3g} GiB"


def host_memory() -> int:
    """Bytes of the machine's physical memory."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_memory(cfg: Config) -> None:
    """ConfigError naming the size fields when a lower bound exceeds the memory it lives in: the
    data in the host's memory, the model, adapters and a batch in the device's (the host's too on
    CPU)."""
    terms = memory_terms(cfg)
    data = [t for t in terms if "(the data)" in t[1]]
    model = [t for t in terms if t not in data]
    have, what = device_memory(cfg)
    host = host_memory()
    if what == "physical memory":  # one memory holds everything
        model, data = model + data, []
    for part, room, name in ((model, have, what), (data, host, "physical memory")):
        need = sum(n for n, _ in part)
        if part and need > room:
            most, fields = max(part)
            raise ConfigError(
                f"{fields}: needs at least {_gib(most)} ({_gib(need)} in all in {name}), more "
                f"than the {_gib(room)} of {name}"
            )


def check_run_dir(run_dir: Path, resuming: bool, need: int) -> None:
    """The run directory can be created and written and has ``2 * need`` bytes free (the state
    and its temporary copy); nothing is created. ConfigError (2) for a path that cannot be a run
    directory, RunDirError (74) for one that cannot be written now."""
    path = Path(os.path.abspath(run_dir))
    if any(path == Path(v) or Path(v) in path.parents for v in VIRTUAL_FS):
        raise ConfigError(
            f"{run_dir}: under the virtual file system /{path.parts[1]}; give another --out/out_dir"
        )
    probe = path
    while not probe.exists():
        if probe.is_symlink():
            raise ConfigError(f"{run_dir}: {probe} is a dangling link; --out/out_dir")
        probe = probe.parent
    if not probe.is_dir():
        what = "is a file" if probe == path else f"lies under the file {probe}"
        raise ConfigError(f"{run_dir}: {what}, not a directory; give another --out/out_dir")
    if not os.access(probe, os.W_OK | os.X_OK):
        try:
            read_only = bool(os.statvfs(probe).f_flag & os.ST_RDONLY)
        except OSError:
            read_only = False
        why = "a read-only file system" if read_only else "no write permission"
        raise RunDirError(f"{probe}: cannot write the run directory here ({why})")
    try:
        st = os.statvfs(probe)
    except OSError as e:
        raise RunDirError(f"{probe}: cannot stat its file system ({e.strerror})") from None
    free = st.f_bavail * st.f_frsize
    if free < 2 * need:
        raise RunDirError(
            f"{probe}: {_gib(free)} free, the state needs at least {_gib(2 * need)} (state.h5 "
            "and its temporary copy while it is replaced; sized by model.hidden_size, "
            "model.intermediate_size, model.num_layers, lora.lora_r, lora.max_subspaces)"
        )


def preflight(cfg: Config, run_dir: Path, resuming: bool) -> None:
    """Every check above (rank 0, before anything is written)."""
    from fcit_hpc.fed.server.tracking import check_trackers

    check_memory(cfg)  # a config that cannot run anywhere (2) before the place it runs in (74)
    check_trackers(cfg.log)  # a tracker switched on and not installed (2)
    check_run_dir(run_dir, resuming, state_bytes(cfg))
