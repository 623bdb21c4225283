"""servebench: a research workbench for LLM serving.

The card's folders `engine/`, `sim/`, `kernels/` and `workbench/` are the subpackages `servebench.engine`,
`servebench.sim`, `servebench.kernels` and `servebench.workbench`. They carry no top-level import name of
their own, so none of them can shadow a package of the dependency tree (Hugging Face's `kernels` is one).
The public API loads lazily: `import servebench` needs neither torch nor simpy.

    from servebench import LLM, SamplingParams
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

# From a source checkout (an editable install) the subpackages are the folders beside this one; a wheel
# installs them inside this folder, where the package's own __path__ already finds them.
_CHECKOUT = Path(__file__).resolve().parent.parent
if (_CHECKOUT / "engine" / "core").is_dir() and (_CHECKOUT / "pyproject.toml").is_file():
    __path__.append(str(_CHECKOUT))  # noqa: F821 (a package's __path__ is set by the import system)

_LAZY = {
    "LLM": "servebench.engine.llm",
    "LLMEngine": "servebench.engine.llm_engine",
    "EngineArgs": "servebench.engine.config",
    "RequestOutput": "servebench.engine.outputs",
    "CompletionOutput": "servebench.engine.outputs",
    "SamplingParams": "servebench.engine.core.sampling_params",
    "Simulation": "servebench.sim.simulator",
    "load_run": "servebench.workbench.runs",
    "load_sweep": "servebench.workbench.runs",
}

__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'servebench' has no attribute {name!r}")
