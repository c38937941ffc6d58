"""The predictions of every evaluation, kept beside ``state.h5`` in the reference evaluation's
format: ``RUN_DIR/predictions/stage<s>/<Dataset>.jsonl`` (s = 0-based stage, as in the report's
accuracy matrix), one ``{"question_id", "text"}`` line per test question in test-set order, to be
joined on ``question_id`` with the dataset's test file."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fcit_hpc.data.sample import Sample

PREDICTIONS_DIR = "predictions"


@dataclass
class StageEval:
    """One evaluation on rank 0: score (0–100) per task and the predictions it was scored from."""

    accuracy: np.ndarray  # float64 [tasks]
    predictions: list[list[str]]  # [tasks][test samples], in test-set order


def predictions_file(run_dir: str | Path, stage: int, task_name: str) -> Path:
    return Path(run_dir) / PREDICTIONS_DIR / f"stage{stage}" / f"{task_name}.jsonl"


def question_id(s: Sample, index: int) -> str | int:
    """The test record's ``question_id`` (or ``id``) as released; its index when it has none."""
    return index if s.id == "" else s.id


def write_predictions(
    run_dir: str | Path,
    stage: int,
    task_names: list[str],
    tests: dict[int, list[Sample]],
    *,
    predictions: list[list[str]],
) -> None:
    """One JSONL file per task, each written atomically (temp file + ``os.replace``): a crash
    leaves the previous file or the new one, never half of one."""
    for t, name in enumerate(task_names):
        path = predictions_file(run_dir, stage, name)
        path.parent.mkdir(parents=True, exist_ok=True)
        lines = [
            json.dumps({"question_id": question_id(s, i), "text": p}, ensure_ascii=False) + "\n"
            for i, (s, p) in enumerate(zip(tests[t], predictions[t], strict=True))
        ]
        tmp = path.with_name(f".{path.name}.tmp")
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write("".join(lines))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
