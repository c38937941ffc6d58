"""Files of the repo's ``configs/`` folder that the code reads at run time, found both in a
source checkout and in an installed wheel (setup.py ships ``configs/*.yaml`` and
``configs/hf/*/config.json`` as the package data ``fcit_hpc/_configs/``)."""

from __future__ import annotations

from pathlib import Path

_PKG = Path(__file__).resolve().parent


def config_file(rel: str) -> Path:
    """The path of ``configs/<rel>``: the checkout's file when the code runs from one, else the copy
    the wheel ships. Raises FileNotFoundError naming both places when neither holds it."""
    candidates = (_PKG.parent / "configs" / rel, _PKG / "_configs" / rel)
    for path in candidates:
        if path.is_file():
            return path
    raise FileNotFoundError(f"configs/{rel}: in neither {candidates[0]} nor {candidates[1]}")
