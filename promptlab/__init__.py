"""promptlab: prompt learning on frozen CLIP-family models.

import promptlab
clip = promptlab.load_clip("ViT-B-16", "openai")
module = promptlab.methods.CoOp(clip, ["cat", "dog"], n_ctx=16)
module = promptlab.load_prompts("runs/.../prompts", clip)
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# Public names -> the module that defines them. Imported on first use, so that `import promptlab`
# (and every CLI command that needs no model: --help, ls, cp) does not pay for torch and open_clip.
_LAZY = {
    "FrozenCLIP": "promptlab.clip",
    "load_clip": "promptlab.backbones",
    "PromptModule": "promptlab.prompts",
    "load_prompts": "promptlab.export",
}


def __getattr__(name: str) -> Any:
    """``promptlab.load_clip``, ``promptlab.methods`` ... on first use (PEP 562)."""
    if name == "methods":
        return importlib.import_module("promptlab.methods")
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value  # later look-ups skip this function
        return value
    raise AttributeError(f"module 'promptlab' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY, "methods"])


__all__ = ["FrozenCLIP", "PromptModule", "__version__", "load_clip", "load_prompts"]
