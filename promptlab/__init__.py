"""promptlab: prompt learning on frozen CLIP-family models.

import promptlab
clip = promptlab.load_clip("ViT-B-16", "openai")
module = promptlab.methods.CoOp(clip, ["cat", "dog"], n_ctx=16)
module = promptlab.load_prompts("runs/.../prompts", clip)
"""

__version__ = "0.1.0"

from promptlab.clip import FrozenCLIP, load_clip  # noqa: E402
from promptlab.prompts import PromptModule  # noqa: E402


def load_prompts(*args, **kwargs):
    """See :func:`promptlab.export.load_prompts` (imported lazily: it pulls in every method)."""
    from promptlab.export import load_prompts as _load

    return _load(*args, **kwargs)


def __getattr__(name: str):
    """``promptlab.methods`` on first use, as the docstring shows, without importing every method up front."""
    if name == "methods":
        import importlib

        return importlib.import_module("promptlab.methods")
    raise AttributeError(f"module 'promptlab' has no attribute {name!r}")


__all__ = ["FrozenCLIP", "PromptModule", "__version__", "load_clip", "load_prompts"]
