"""Seam: expert storage, one module per Megatron expert class (``sequential.py``: ``SequentialMLP``).

:mod:`.base` defines :class:`ExpertStorage` (build ``S`` slots, a slot's parameters and keys, a slot's
dist-checkpoint entries) and the registry that :func:`storage_class` looks a layer's experts up in.

A new expert class is one new module here: a subclass of :class:`ExpertStorage` decorated with
:func:`register`.  Every module of this package is imported below, so nothing else changes.
"""

from __future__ import annotations

import importlib
import pkgutil

from .base import ExpertStorage, register, storage_class, storage_for, supported_expert_classes

__all__ = ["ExpertStorage", "register", "storage_class", "storage_for", "supported_expert_classes"]

for _module in pkgutil.iter_modules(__path__):
    if _module.name != "base":
        importlib.import_module(f"{__name__}.{_module.name}")
