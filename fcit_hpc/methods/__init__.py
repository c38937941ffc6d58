"""Methods by ``method.name`` (listed in :data:`fcit_hpc.registry.METHODS`)."""

from __future__ import annotations

import importlib

from fcit_hpc.config import LoraConfig, MethodConfig
from fcit_hpc.registry import METHODS


def method_class(name: str):
    module, cls = METHODS[name].cls.split(":")
    return getattr(importlib.import_module(f"fcit_hpc.methods.{module}"), cls)


def make_method(method: MethodConfig, lora: LoraConfig):
    """The method of ``method.name`` with its own settings (taken from the ``method`` section)
    and the ``lora`` section."""
    return method_class(method.name).from_sections(method, lora)
