"""The FCIT release tree, read as published, and ``fcit data prepare``, which writes the same tree.

Root = the release's ``FCIT_data`` folder (``benchmark.data_root``)::

    partitioned_data/Task-related/seq/<β>/Task<N>/client_<id>.json         task-related stages
    partitioned_data/Capability-related/cap/<β>/Task<N>/client_<id>.json   capability stages
    partitioned_data/Task-related/multask/<β>/Task1/client_<id>.json       multi-task upper bound
    instructions/<Dataset>/test.json                                       test questions
    datasets/...                                                           images

N is the 1-based stage (data unit), β the folder name as released (``0.5``, ``1.0``, ``5.0``);
image paths in records are relative to ``datasets/``. Hom- and Het-FCIT read the same ``seq`` /
``cap`` files: Het only changes which unit a selected client reads (the assignment table). The
datasets of each stage come from the registry, so a release loads without any file of ours;
``fcit_layout.json`` is prepare's record of how it partitioned (it lets fcit-mini's cache tell a
stale partition), never read to load data.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from functools import lru_cache
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
from fcit_hpc.data.sample import Sample
from fcit_hpc.errors import DataError
from fcit_hpc.seeds import SALT_UNIT_SHUFFLE

# Version of the tree prepare writes; part of fcit-mini's cache key, so a cache written with other
# folder names is never read. Bump it whenever the written tree changes.
TREE_VERSION = 2
LAYOUT_META = "fcit_layout.json"
# benchmark.setting → (folder under partitioned_data, folder of its stage units), as released
SETTING_DIRS = {
    "task": ("Task-related", "seq"),
    "capability": ("Capability-related", "cap"),
    "joint": ("Task-related", "multask"),
    # The reference scripts publish the multi-task bound of the task-related setting only; the
    # capability-related bound reads the folder of the same name beside ``cap``, by analogy.
    "joint-capability": ("Capability-related", "multask"),
}
_CLIENT = re.compile(r"client_(\d+)\.json")
# clients whose samples a process keeps in memory (a round's on a rank; more are read again)
CLIENT_CACHE = 256


def beta_dir(beta: float) -> str:
    """β folder name as released: ``str`` of the float (1 → ``1.0``)."""
    return f"{float(beta)}"


def partition_dir(root: str | Path, setting: str, beta: float) -> Path:
    group, kind = SETTING_DIRS[setting]
    return Path(root) / "partitioned_data" / group / kind / beta_dir(beta)


def unit_dir(root: str | Path, setting: str, beta: float, unit: int) -> Path:
    return partition_dir(root, setting, beta) / f"Task{unit + 1}"


def client_file(root: str | Path, setting: str, beta: float, unit: int, *, client: int) -> Path:
    return unit_dir(root, setting, beta, unit) / f"client_{client}.json"


def test_file(root: str | Path, name: str) -> Path:
    return Path(root) / "instructions" / name / "test.json"


def image_dir(root: str | Path) -> Path:
    """The folder image paths of records are relative to."""
    return Path(root) / "datasets"


# ------------------------------------------------------------------------------------- prepare
def _place_image(path: str | None, raw: Path, images: Path) -> str | None:
    """Put the raw image ``path`` into the tree's image folder, at its path relative to RAW, and
    return that relative path (what the written records name).

    Hard links, not copies or symlinks: no extra space on the same file system, and the tree
    stays whole when RAW is moved or deleted (a symlinked tree would dangle). Across file systems
    (no hard links) the file is copied."""
    if path is None:
        return None
    rel = Path(os.path.relpath(path, raw))
    if rel.parts[0] == "..":
        raise DataError(f"{path}: image outside RAW ({raw}); prepare takes images from under RAW")
    dst = images / rel
    if dst.exists() and os.path.samefile(path, dst):
        return rel.as_posix()
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(dst.name + ".tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(path, tmp)
    except OSError:
        shutil.copyfile(path, tmp)
    os.replace(tmp, dst)
    return rel.as_posix()


def partition_record(
    stages: list[list[str]], num_clients: int, min_samples: int, seed: int
) -> dict:
    """What decides a partition's content (stored in ``fcit_layout.json`` per partition)."""
    return {
        "stages": stages,
        "num_clients": num_clients,
        "min_samples": min_samples,
        "seed": seed,
        "tree_version": TREE_VERSION,
    }


def _meta_key(root: Path, setting: str, beta: float) -> str:
    return partition_dir(root, setting, beta).relative_to(root / "partitioned_data").as_posix()


def _read_meta(root: Path) -> dict:
    """``fcit_layout.json``, or {} when it is missing or unreadable (prepare then rewrites it)."""
    try:
        meta = json.loads((root / LAYOUT_META).read_text())
    except (OSError, ValueError):
        return {}
    return meta if isinstance(meta, dict) else {}


def prepared_as(root: str | Path, setting: str, beta: float) -> dict | None:
    """The partition record prepare stored for (setting, β) under ``root``, or None."""
    return _read_meta(Path(root)).get("partitions", {}).get(_meta_key(Path(root), setting, beta))


def prepare(
    raw: str | Path,
    out: str | Path,
    stages: list[list[str]],
    setting: str,
    *,
    beta: float,
    num_clients: int,
    min_samples: int,
    seed: int,
) -> Path:
    """Partition raw per-dataset files ``RAW/<Dataset>/{train,test}.json`` (images under RAW) into
    the release tree at ``out``; returns the β folder written.

    Unit u = the datasets of stage u concatenated and shuffled, split over the clients with a
    Dirichlet quantity skew (stages without datasets are skipped, so a subset keeps the stage
    numbers of the release). Test sets go to ``instructions/``, images to ``datasets/``."""
    raw, out = Path(raw).resolve(), Path(out)
    names = [n for st in stages for n in st]
    for n in names:
        dataset(n)
    task_of = {n: i for i, n in enumerate(dict.fromkeys(names))}
    images = image_dir(out)
    for u, stage_names in enumerate(stages):
        if not stage_names:  # a subset (``--datasets``): the other stages keep their numbers
            continue
        samples: list[Sample] = []
        for n in stage_names:
            samples += load_conversations(raw / n / "train.json", task_of[n], raw)
        perm = np.random.default_rng([seed, u, SALT_UNIT_SHUFFLE]).permutation(len(samples))
        samples = [samples[i] for i in perm]  # the stage's datasets concatenated and shuffled
        shards = dirichlet_partition(len(samples), num_clients, beta, min_samples, seed=[seed, u])
        d = unit_dir(out, setting, beta, u)
        if d.is_dir():  # no client file of an earlier partition stays behind
            for f in d.iterdir():
                if _CLIENT.fullmatch(f.name):
                    f.unlink()
        for c, idx in enumerate(shards):
            recs = [
                to_conversation(samples[i], _place_image(samples[i].image, raw, images))
                for i in idx
            ]
            write_json(d / f"client_{c}.json", recs)
    for n in dict.fromkeys(names):
        tests = load_test(raw / n / "test.json", task_of[n], raw)
        write_json(
            test_file(out, n), [to_test(s, _place_image(s.image, raw, images)) for s in tests]
        )
    meta = _read_meta(out)
    meta.setdefault("partitions", {})[_meta_key(out, setting, beta)] = partition_record(
        stages, num_clients, min_samples, seed
    )
    write_json(out / LAYOUT_META, meta)
    return partition_dir(out, setting, beta)


# ---------------------------------------------------------------------------------------- read
def _client_ids(d: Path) -> list[int]:
    return sorted(int(m.group(1)) for f in d.iterdir() if (m := _CLIENT.fullmatch(f.name)))


class LayoutData:
    """Federated data read from the release tree. The structure (β folder, stage folders, client
    files, test sets) is checked up front, alike on every rank; client files load on first use.

    Client c reads ``client_<c>.json`` of the unit, except for the centralized multi-task bound
    (a joint setting with one client, ``multitask`` of ``compare``): its one client holds the
    whole unit, every client file of ``multask/<β>/Task1`` in client-id order."""

    def __init__(
        self,
        root: str | Path,
        stages: list[list[str]],
        setting: str,
        beta: float,
        *,
        num_clients: int,
        image_root: str | Path | None = None,
    ):
        self.root = Path(root)
        self.image_root = Path(image_root) if image_root else image_dir(self.root)
        self.stage_names = stages
        self.task_names = list(dict.fromkeys(n for st in stages for n in st))
        self.task_of = {n: i for i, n in enumerate(self.task_names)}
        self.setting, self.beta, self.num_clients = setting, beta, num_clients
        self._check_beta()
        whole = setting.startswith("joint") and num_clients == 1
        # per unit: the whole unit's files (the multi-task bound's one client), or None: client
        # c reads client_<c>.json of the unit's folder (a path made on use, none held per client)
        self._whole = [self._unit_files(u, whole) for u in range(len(stages))]
        self.test: dict[int, list[Sample]] = {}
        for n in self.task_names:
            f = test_file(self.root, n)
            if not f.is_file():
                raise DataError(f"{f}: missing test file of dataset {n}")
            self.test[self.task_of[n]] = load_test(f, self.task_of[n], self.image_root)
        # the samples of the last clients read (a round's: tokens, then training), not of every
        # client ever read: memory stays flat with 10,000 clients (``CLIENT_CACHE`` entries)
        self._read = lru_cache(maxsize=CLIENT_CACHE)(self._read_client)

    def _check_beta(self) -> None:
        part = partition_dir(self.root, self.setting, self.beta)
        if part.is_dir():
            return
        if not part.parent.is_dir():
            raise DataError(
                f"{part.parent}: missing folder of the partitioned data "
                f"(benchmark.setting {self.setting}; is benchmark.data_root the FCIT_data folder?)"
            )
        have = sorted(p.name for p in part.parent.iterdir() if p.is_dir())
        raise DataError(
            f"{part}: missing β folder (benchmark.dirichlet_beta = {self.beta}); "
            f"β folders there: {', '.join(have) or 'none'}"
        )

    def _unit_files(self, unit: int, whole: bool) -> list[Path] | None:
        """Check the unit's client files are there; returns the whole unit's files when one
        client reads them all, else None (client c reads ``client_<c>.json``)."""
        d = unit_dir(self.root, self.setting, self.beta, unit)
        if not d.is_dir():
            raise DataError(
                f"{d}: missing stage folder (stage {unit + 1} of {len(self.stage_names)}, "
                f"datasets {', '.join(self.stage_names[unit])})"
            )
        ids = _client_ids(d)
        if whole:
            if not ids:
                raise DataError(f"{d}: no client files (client_<id>.json)")
            return [d / f"client_{i}.json" for i in ids]
        missing = np.setdiff1d(np.arange(self.num_clients), ids)
        if missing.size:
            raise DataError(
                f"{d / f'client_{missing[0]}.json'}: missing client file (federation.num_clients "
                f"= {self.num_clients}; the folder has {len(ids)} client files)"
            )
        return None

    def client_files(self, unit: int, client: int) -> list[Path]:
        """The files client ``client`` reads in data unit ``unit``."""
        whole = self._whole[unit]
        if whole is not None:
            return whole
        return [unit_dir(self.root, self.setting, self.beta, unit) / f"client_{client}.json"]

    def check_client_files(self) -> None:
        """Parse every client file of every stage (records, conversations; images are checked
        when a client reads them): a broken file of a late stage is found before the first
        round, not hours later. DataError naming the file and the record."""
        for unit, whole in enumerate(self._whole):
            clients = [0] if whole is not None else range(self.num_clients)
            for c in clients:
                for f in self.client_files(unit, c):
                    load_conversations(f, unit, self.image_root, check_images=False)

    def client_samples(self, unit: int, client: int) -> list[Sample]:
        """The samples of ``client`` in data unit ``unit`` (read on first use; the last
        ``CLIENT_CACHE`` clients kept). A fresh list: callers may change it."""
        return list(self._read(unit, client))

    def _read_client(self, unit: int, client: int) -> tuple[Sample, ...]:
        return tuple(
            s
            for f in self.client_files(unit, client)
            for s in load_conversations(f, unit, self.image_root)
        )
