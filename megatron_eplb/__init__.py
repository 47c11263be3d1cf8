"""megatron-eplb: expert-parallel load balancing for Megatron-core MoE models under DeepSpeed.

The core (this package) imports neither Megatron-core nor DeepSpeed; ``megatron_eplb.patches`` holds the
only code that knows their internals.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

__version__ = "0.1.0"


def _register_checkout_patches() -> None:
    """From a source checkout, expose the top-level ``patches/`` folder as ``megatron_eplb.patches``.

    Installed, setuptools maps ``patches/`` into the package (setup.py ``package_dir``); a checkout on
    ``sys.path`` would otherwise shadow the installed package and lose the subpackage.
    """
    here = Path(__file__).resolve().parent
    if (here / "patches" / "__init__.py").is_file() or "megatron_eplb.patches" in sys.modules:
        return
    checkout = here.parent / "patches" / "__init__.py"
    if not checkout.is_file():
        return
    spec = importlib.util.spec_from_file_location(
        "megatron_eplb.patches", checkout, submodule_search_locations=[str(checkout.parent)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["megatron_eplb.patches"] = module
    spec.loader.exec_module(module)
    globals()["patches"] = module


_register_checkout_patches()

from .config import EPLBConfig, add_eplb_args  # noqa: E402
from .errors import EPLBConfigError, EPLBError, ExpertMapError  # noqa: E402
from .placement import ExpertPlacement  # noqa: E402

__all__ = [
    "EPLBConfig",
    "EPLBConfigError",
    "EPLBError",
    "EPLBManager",
    "ExpertMapError",
    "ExpertPlacement",
    "add_eplb_args",
    "__version__",
]

# Imported on first use: ``megatron_eplb.manager`` brings in torch.distributed and the transfer machinery,
# which ``import megatron_eplb`` (config, maps, policies, the CLI) does not need.
_LAZY = {"EPLBManager": "megatron_eplb.manager"}


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
