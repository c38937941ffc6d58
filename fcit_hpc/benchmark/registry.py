"""The 12 FCIT datasets: capability group, answer form, scorer; stage schedules of both settings."""

from __future__ import annotations

from dataclasses import KW_ONLY, dataclass

from fcit_hpc.errors import DataError


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    group: str  # capability group: General | Chart | Math | Other
    answer_form: str
    scorer: str  # exact | substring | iou | caption
    _: KW_ONLY
    image_root: str = "images"  # relative to the data root unless absolute


DATASETS: dict[str, DatasetInfo] = {
    d.name: d
    for d in [
        DatasetInfo("AOKVQA", "General", "short answer / option", "exact"),
        DatasetInfo("IconQA", "General", "short answer / option", "exact"),
        DatasetInfo("Grounding", "General", "box [x1, y1, x2, y2] in [0, 1]", "iou"),
        DatasetInfo("ImageNet-R", "General", "class name", "exact"),
        DatasetInfo("ArxivQA", "Chart", "option letter", "exact"),
        DatasetInfo("FigureQA", "Chart", "yes / no", "substring"),
        DatasetInfo("DVQA", "Chart", "word / number", "substring"),
        DatasetInfo("CLEVR-Math", "Math", "integer", "exact"),
        DatasetInfo("super-CLEVR", "Math", "word / number", "exact"),
        DatasetInfo("TabMWP", "Math", "number / word", "exact"),
        DatasetInfo("Flickr30k", "Other", "brief caption", "caption"),
        DatasetInfo("OCRVQA", "Other", "text", "exact"),
    ]
}

CAPABILITY_GROUPS = {
    "General": ["AOKVQA", "IconQA", "Grounding", "ImageNet-R"],
    "Chart": ["ArxivQA", "FigureQA", "DVQA"],
    "Math": ["CLEVR-Math", "super-CLEVR", "TabMWP"],
    "Other": ["Flickr30k", "OCRVQA"],
}
# Two published orders: the data lists (paper, default) and the evaluation scripts.
CAPABILITY_ORDERS = {
    "paper": ["General", "Chart", "Math", "Other"],
    "eval_scripts": ["General", "Other", "Math", "Chart"],
}
TASK_ORDER = [
    "ImageNet-R",
    "ArxivQA",
    "IconQA",
    "CLEVR-Math",
    "OCRVQA",
    "Flickr30k",
    "FigureQA",
    "super-CLEVR",
]


def dataset(name: str) -> DatasetInfo:
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r} (known: {', '.join(DATASETS)})")
    return DATASETS[name]


def stage_datasets(setting: str, order: str = "paper") -> list[list[str]]:
    """Datasets of each stage: task-related = 8 stages of one dataset; capability-related = 4;
    the multi-task upper bounds (``joint``: task-related, ``joint-capability``) = one stage of
    every dataset of their setting."""
    if setting == "task":
        return [[d] for d in TASK_ORDER]
    if setting == "joint":
        return [list(TASK_ORDER)]
    stages = [list(CAPABILITY_GROUPS[g]) for g in CAPABILITY_ORDERS[order]]
    if setting == "joint-capability":
        return [[d for st in stages for d in st]]
    return stages
