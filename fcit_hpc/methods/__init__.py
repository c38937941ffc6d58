"""Methods by ``method.name`` (listed in :data:`fcit_hpc.registry.METHODS`)."""

from __future__ import annotations

import importlib

from fcit_hpc.registry import METHODS


def method_class(name: str):
    module, cls = METHODS[name].cls.split(":")
    return getattr(importlib.import_module(f"fcit_hpc.methods.{module}"), cls)


def make_method(cfg):
    return method_class(cfg.method.name)(cfg)
