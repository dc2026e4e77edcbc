"""The registered methods: a new method is one file and one line here."""

from promptlab.methods.clip_adapter import CLIPAdapter
from promptlab.methods.clip_lora import CLIPLoRA
from promptlab.methods.cocoop import CoCoOp
from promptlab.methods.coop import CoOp
from promptlab.methods.gda import GDA
from promptlab.methods.ivlp import IVLP
from promptlab.methods.kgcoop import KgCoOp
from promptlab.methods.linear_probe import LinearProbe
from promptlab.methods.maple import MaPLe
from promptlab.methods.mocoop import MoCoOp
from promptlab.methods.prograd import ProGrad
from promptlab.methods.promptsrc import PromptSRC
from promptlab.methods.tcp import TCP
from promptlab.methods.tip_adapter import TipAdapter
from promptlab.methods.vificlip import ViFiCLIP
from promptlab.methods.zeroshot import ZeroShotCLIP
from promptlab.prompts import PromptModule

METHODS: dict[str, type[PromptModule]] = {
    "zeroshot": ZeroShotCLIP,
    "coop": CoOp,
    "cocoop": CoCoOp,
    "kgcoop": KgCoOp,
    "ivlp": IVLP,
    "maple": MaPLe,
    "mocoop": MoCoOp,
    "prograd": ProGrad,
    "promptsrc": PromptSRC,
    "tcp": TCP,
    "vificlip": ViFiCLIP,
    "linear_probe": LinearProbe,
    "tip_adapter": TipAdapter,
    "clip_adapter": CLIPAdapter,
    "gda": GDA,
    "clip_lora": CLIPLoRA,
}

__all__ = [
    "METHODS",
    "CLIPAdapter",
    "CLIPLoRA",
    "CoCoOp",
    "CoOp",
    "GDA",
    "IVLP",
    "KgCoOp",
    "LinearProbe",
    "MaPLe",
    "MoCoOp",
    "ProGrad",
    "PromptSRC",
    "TCP",
    "TipAdapter",
    "ViFiCLIP",
    "ZeroShotCLIP",
    "method_name",
]


def method_name(module: PromptModule | type[PromptModule]) -> str:
    """Registry key of a method (its class name lower-cased when it is not registered)."""
    cls = module if isinstance(module, type) else type(module)
    return next((k for k, v in METHODS.items() if v is cls), cls.__name__.lower())
