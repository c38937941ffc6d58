"""The released FCIT data layout and ``fcit data prepare``.

``ROOT/partitioned_data/<setting>/<scenario>/<beta>/Task<N>/client_<id>.json`` (N = 1-based data
unit, i.e. stage), ``ROOT/test/<Dataset>.json``, and ``ROOT/fcit_layout.json`` (image root and
datasets per stage, written by prepare; optional for the released data).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from fcit_hpc.benchmark.llava_json import (
    load_conversations,
    load_test,
    to_conversation,
    to_test,
    write_json,
)
from fcit_hpc.benchmark.partition import dirichlet_partition
from fcit_hpc.benchmark.registry import dataset
from fcit_hpc.errors import DataError
from fcit_hpc.seeds import SALT_UNIT_SHUFFLE

LAYOUT_META = "fcit_layout.json"


def beta_dir(beta: float) -> str:
    return f"{float(beta)}"


def unit_dir(root: Path, setting: str, scenario: str, beta: float, unit: int) -> Path:
    return Path(root) / "partitioned_data" / setting / scenario / beta_dir(beta) / f"Task{unit + 1}"


def client_file(root, setting, scenario, beta, unit, client) -> Path:
    return unit_dir(root, setting, scenario, beta, unit) / f"client_{client}.json"


def _rel(path: str | None, base: Path) -> str | None:
    return None if path is None else os.path.relpath(path, base)


def prepare(
    raw: str | Path,
    out: str | Path,
    stages: list[list[str]],
    setting: str,
    scenario: str,
    beta: float,
    num_clients: int,
    min_samples: int,
    seed: int,
) -> Path:
    """Partition raw per-dataset files ``RAW/<Dataset>/{train,test}.json`` into the layout."""
    raw, out = Path(raw).resolve(), Path(out)
    names = [n for st in stages for n in st]
    for n in names:
        dataset(n)
    task_of = {n: i for i, n in enumerate(dict.fromkeys(names))}
    for u, stage_names in enumerate(stages):
        samples = []
        for n in stage_names:
            samples += load_conversations(raw / n / "train.json", task_of[n], raw)
        perm = np.random.default_rng([seed, u, SALT_UNIT_SHUFFLE]).permutation(len(samples))
        samples = [samples[i] for i in perm]  # the stage's datasets concatenated and shuffled
        shards = dirichlet_partition(len(samples), num_clients, beta, min_samples, [seed, u])
        for c, idx in enumerate(shards):
            recs = [to_conversation(samples[i], _rel(samples[i].image, raw)) for i in idx]
            write_json(client_file(out, setting, scenario, beta, u, c), recs)
    for n in dict.fromkeys(names):
        tests = load_test(raw / n / "test.json", task_of[n], raw)
        write_json(out / "test" / f"{n}.json", [to_test(s, _rel(s.image, raw)) for s in tests])
    meta = {"image_root": str(raw), "stages": stages, "num_clients": num_clients}
    (out / LAYOUT_META).write_text(json.dumps(meta, indent=1))
    return out


class LayoutData:
    """Federated data read from the released layout, client files loaded on first use."""

    def __init__(
        self,
        root: str | Path,
        stages: list[list[str]],
        setting: str,
        scenario: str,
        beta: float,
        num_clients: int,
        image_root: str | None = None,
    ):
        self.root = Path(root)
        meta_path = self.root / LAYOUT_META
        meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
        self.image_root = Path(image_root or meta.get("image_root") or self.root)
        self.stage_names = stages
        self.task_names = list(dict.fromkeys(n for st in stages for n in st))
        self.task_of = {n: i for i, n in enumerate(self.task_names)}
        self.setting, self.scenario, self.beta = setting, scenario, beta
        self.num_clients = num_clients
        for u in range(len(stages)):
            d = unit_dir(self.root, setting, scenario, beta, u)
            if not d.is_dir():
                raise DataError(f"{d}: missing stage folder of the partitioned data")
        self.test = {
            self.task_of[n]: load_test(
                self.root / "test" / f"{n}.json", self.task_of[n], self.image_root
            )
            for n in self.task_names
        }
        self._cache: dict[tuple[int, int], list] = {}

    def client_samples(self, unit: int, client: int):
        key = (unit, client)
        if key not in self._cache:
            f = client_file(self.root, self.setting, self.scenario, self.beta, unit, client)
            self._cache[key] = load_conversations(f, unit, self.image_root)
        return self._cache[key]
