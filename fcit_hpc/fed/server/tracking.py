"""Experiment trackers beside ``metrics.jsonl`` (config ``log``), on rank 0: every number of every
line as a scalar in TensorBoard (``RUN_DIR/tensorboard``), MLflow or Weights & Biases.

A line's scalars: its numbers, nested dicts flattened with ``/`` under its ``kind`` (``round/
loss``, ``round/bytes_sent``, ``round/phases/train/sum``, ``eval/accuracy/<task>``,
``summary/last``, ``dko/purity``, and whatever a line gains, such as a privacy budget);
``stage`` and ``round`` give the step instead: round lines at the global round index
stage · rounds + round, the others at their stage. Lists (the per-client records) stay in
``metrics.jsonl`` and the state.

The trackers are a view of ``metrics.jsonl``: at every start (a resume too, after the log is
rewritten from the state) TensorBoard's folder is written afresh from the whole log, so the event
files hold exactly the log's values (as float64). MLflow and W&B receive the lines of this
process only; both stay on this machine unless the user's own settings
(``MLFLOW_TRACKING_URI``, ``WANDB_MODE``) say otherwise.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from pathlib import Path

from fcit_hpc.errors import ConfigError

TENSORBOARD_DIR = "tensorboard"
_PACKAGES = {"tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb"}


def check_trackers(log_cfg) -> None:
    """ConfigError naming the field when a tracker switched on is not installed (pre-flight)."""
    for field, package in _PACKAGES.items():
        if getattr(log_cfg, field) and importlib.util.find_spec(package) is None:
            extra = " (pip install 'fcit_hpc[log]')" if field == "tensorboard" else ""
            raise ConfigError(
                f"log.{field}: true, but the package {package!r} is not installed{extra}"
            )


def scalars(record: dict, rounds_per_stage: int) -> tuple[int, dict[str, float]]:
    """(step, tag → value) of one metrics.jsonl record (module docstring)."""
    kind = record.get("kind", "line")
    stage = int(record.get("stage", 0))
    step = stage * rounds_per_stage + int(record["round"]) if kind == "round" else stage
    out: dict[str, float] = {}

    def walk(prefix: str, obj: dict) -> None:
        for k, v in obj.items():
            if k in ("kind", "stage", "round"):
                continue
            if isinstance(v, dict):
                walk(f"{prefix}/{k}", v)
            elif isinstance(v, int | float) and not isinstance(v, bool):
                out[f"{prefix}/{k}"] = float(v)

    walk(kind, record)
    return step, out


class TensorBoardSink:
    """Scalars into ``RUN_DIR/tensorboard`` (torch's ``SummaryWriter``, float64 tensors)."""

    def __init__(self, run_dir: Path):
        self.dir = Path(run_dir) / TENSORBOARD_DIR
        self.writer = None

    def restart(self, records: list[tuple[int, dict[str, float]]]) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.close()
        shutil.rmtree(self.dir, ignore_errors=True)
        self.writer = SummaryWriter(str(self.dir))
        for step, values in records:
            self.log(step, values)

    def log(self, step: int, values: dict[str, float]) -> None:
        for tag, v in values.items():
            self.writer.add_scalar(tag, v, step, new_style=True, double_precision=True)
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


class MlflowSink:
    """An MLflow run (a local file store in ``RUN_DIR/mlruns`` unless MLFLOW_TRACKING_URI)."""

    def __init__(self, run_dir: Path):
        import mlflow

        self.mlflow = mlflow
        if not os.environ.get("MLFLOW_TRACKING_URI"):
            mlflow.set_tracking_uri((Path(run_dir) / "mlruns").resolve().as_uri())
        mlflow.start_run(run_name=Path(run_dir).name)

    def restart(self, records) -> None:
        pass  # a continued run's earlier lines are in its earlier MLflow run

    def log(self, step: int, values: dict[str, float]) -> None:
        self.mlflow.log_metrics(values, step=step)

    def close(self) -> None:
        self.mlflow.end_run()


class WandbSink:
    """A W&B run, offline in ``RUN_DIR/wandb`` unless WANDB_MODE says otherwise."""

    def __init__(self, run_dir: Path):
        import wandb

        mode = os.environ.get("WANDB_MODE", "offline")
        self.run = wandb.init(dir=str(run_dir), mode=mode, name=Path(run_dir).name)

    def restart(self, records) -> None:
        pass

    def log(self, step: int, values: dict[str, float]) -> None:
        self.run.log({**values, "fcit/step": step})  # W&B's own step only increases

    def close(self) -> None:
        self.run.finish()


class Trackers:
    """The trackers switched on in ``log``; :meth:`restart` with the whole log, :meth:`line`
    for every new line (:class:`~fcit_hpc.fed.server.metrics_log.MetricsLog` calls both)."""

    def __init__(self, log_cfg, run_dir: Path, rounds_per_stage: int):
        check_trackers(log_cfg)
        self.rounds = max(rounds_per_stage, 1)
        self.sinks = []
        if log_cfg.tensorboard:
            self.sinks.append(TensorBoardSink(run_dir))
        if log_cfg.mlflow:
            self.sinks.append(MlflowSink(run_dir))
        if log_cfg.wandb:
            self.sinks.append(WandbSink(run_dir))

    def restart(self, lines: list[str]) -> None:
        records = [scalars(json.loads(x), self.rounds) for x in lines]
        for s in self.sinks:
            s.restart(records)

    def line(self, line: str) -> None:
        step, values = scalars(json.loads(line), self.rounds)
        for s in self.sinks:
            s.log(step, values)

    def close(self) -> None:
        for s in self.sinks:
            s.close()
