"""``load_clip`` / ``save_clip`` and the built-in backbone loaders.

Each way of building a CLIP model is a :class:`promptlab.clip.BackboneLoader` registered with
FrozenCLIP's registry: an open_clip tag, a local file (OpenAI ``.pt`` JIT archive or state dict, an
open_clip checkpoint), a Hugging Face CLIP directory or an open_clip ``local-dir`` folder, the tiny
random configurations, and the shipped sandbox CLIP. A user's own loader registers the same way and
is asked first. :func:`load_clip` asks the loaders, the most recently registered first, and wraps the
model in a FrozenCLIP; :mod:`promptlab.clip` imports none of this.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import torch
import torch.nn as nn

from promptlab import sandbox
from promptlab.clip import (
    PRECISIONS,
    BackboneLoader,
    FrozenCLIP,
    backbone_loaders,
    register_backbone,
    wrap_model,
)
from promptlab.suggest import did_you_mean

# Tiny open_clip configurations, randomly initialised, for tests and the offline demo: one per backbone
# family, each the family's real configuration (tower classes, activations, masks, pooling) at toy
# width and depth. The timm image towers are timm's own model classes at toy size (registered with
# timm as ``promptlab_tiny_*`` when first built).
_TINY_TEXT = dict(layers=2, width=32, heads=2)
TINY_CONFIGS: dict[str, dict] = {
    # open_clip ViT (LAION / DataComp / DFN weights): GELU
    "tiny": dict(
        embed_dim=32,
        vision_cfg=dict(layers=2, width=32, head_width=16, patch_size=8, image_size=32),
        text_cfg=_TINY_TEXT,
    ),
    # OpenAI's ViT and the open_clip ``-quickgelu`` variants: QuickGELU activations
    "tiny-quickgelu": dict(
        embed_dim=32,
        quick_gelu=True,
        vision_cfg=dict(layers=2, width=32, head_width=16, patch_size=8, image_size=32),
        text_cfg=_TINY_TEXT,
    ),
    # OpenAI's ResNet (ModifiedResNet with attention pooling)
    "tiny-rn": dict(
        embed_dim=32,
        quick_gelu=True,
        vision_cfg=dict(layers=[1, 1, 1, 1], width=8, image_size=64),
        text_cfg=_TINY_TEXT,
    ),
    # EVA02-B-16: timm Eva image tower (RoPE, SwiGLU), causal CLIP text tower
    "tiny-eva02": dict(
        embed_dim=32,
        custom_text=True,
        vision_cfg=dict(
            image_size=32, timm_model_name="promptlab_tiny_eva02", timm_pool="token", timm_proj=None
        ),
        text_cfg=_TINY_TEXT,
    ),
    # ViT-B-16-SigLIP: timm ViT with attention-pool head; bidirectional text tower pooled at its last
    # position (context 64), a SentencePiece-style tokenizer without start token, sigmoid logits with bias
    "tiny-siglip": dict(
        embed_dim=32,
        init_logit_bias=-10,
        custom_text=True,
        vision_cfg=dict(
            image_size=32, timm_model_name="promptlab_tiny_siglip", timm_pool="map", timm_proj="none"
        ),
        text_cfg=dict(
            _TINY_TEXT,
            context_length=64,
            vocab_size=128,
            no_causal_mask=True,
            proj_bias=True,
            pool_type="last",
            norm_kwargs={"eps": 1e-6},
        ),
    ),
    # PE-Core-B-16: timm Eva image tower (RoPE, attention pool), causal text tower of context 32
    "tiny-pe": dict(
        embed_dim=32,
        custom_text=True,
        vision_cfg=dict(image_size=32, timm_model_name="promptlab_tiny_pe", timm_pool="map", timm_proj=None),
        text_cfg=dict(_TINY_TEXT, context_length=32),
    ),
    # MobileCLIP-S1: timm FastViT (convolutional) image tower, bidirectional text tower pooled at EOT
    "tiny-mobileclip": dict(
        embed_dim=32,
        custom_text=True,
        vision_cfg=dict(
            image_size=64, timm_model_name="promptlab_tiny_mobileclip", timm_pool="avg", timm_proj=None
        ),
        text_cfg=dict(_TINY_TEXT, no_causal_mask=True),
    ),
}

# timm image towers of the tiny configurations: the real family's timm model at toy size.
_TINY_TIMM = {
    "promptlab_tiny_eva02": (
        "eva02_base_patch16_clip_224",
        dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, ref_feat_shape=(4, 4)),
    ),
    "promptlab_tiny_siglip": (
        "vit_base_patch16_siglip_224",
        dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2),
    ),
    "promptlab_tiny_pe": (
        "vit_pe_core_base_patch16_224",
        dict(
            img_size=32,
            patch_size=8,
            embed_dim=32,
            depth=2,
            num_heads=2,
            ref_feat_shape=(4, 4),
            attn_pool_num_heads=2,
        ),
    ),
    "promptlab_tiny_mobileclip": ("fastvit_mci1", dict(layers=(1, 1, 1, 1), embed_dims=(8, 16, 32, 64))),
}


def _register_tiny_timm() -> None:
    """Register the toy-size timm towers under their ``promptlab_tiny_*`` names (idempotent)."""
    import timm
    from timm.models import register_model

    for name, (base, kwargs) in _TINY_TIMM.items():
        if name in timm.list_models(name):
            continue

        def entry(pretrained: bool = False, _base: str = base, _kw: dict = kwargs, **kw) -> nn.Module:
            return timm.create_model(_base, pretrained=False, **{**_kw, **kw})

        entry.__name__ = name
        register_model(entry)


# The tiny SigLIP tokenizer's vocabulary: special tokens, a few whole words, and every lowercase letter
# and digit alone and as a word-piece continuation, so that any (canonicalized) text tokenizes offline.
_TINY_WORDS = ("a", "photo", "of", "the", "x", "an", "image")
_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789"


def tiny_hf_tokenizer():
    """A Hugging Face fast tokenizer built in memory, shaped like SigLIP's: no start token, ``</s>`` ends
    the text and pads it. For ``tiny-siglip``; ``save_pretrained`` writes it as a local tokenizer folder."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab: dict[str, int] = {}
    for t in ("<pad>", "</s>", "<unk>", *_TINY_WORDS, *_CHARS, *(f"##{c}" for c in _CHARS)):
        vocab.setdefault(t, len(vocab))
    tok = Tokenizer(models.WordPiece(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", special_tokens=[("</s>", vocab["</s>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="</s>", pad_token="</s>", unk_token="<unk>"
    )


class HFTextTokenizer:
    """A Hugging Face tokenizer called the way open_clip's are: ``(texts, context_length) -> [N, L]`` ids.

    Same cleaning, padding and truncation as ``open_clip.tokenizer.HFTokenizer`` (whose constructor
    insists on a Hub name or folder); built from an in-memory tokenizer or a local folder, it needs no
    network.
    """

    def __init__(self, tokenizer, clean: str = "whitespace", context_length: int | None = None) -> None:
        from open_clip.tokenizer import get_clean_fn

        self.tokenizer, self.clean_fn, self.context_length = tokenizer, get_clean_fn(clean), context_length

    @property
    def eot_token_id(self) -> int:
        return int(self.tokenizer.eos_token_id)

    def __call__(self, texts: str | list[str], context_length: int | None = None) -> torch.Tensor:
        texts = [texts] if isinstance(texts, str) else list(texts)
        return self.tokenizer(
            [self.clean_fn(t) for t in texts],
            return_tensors="pt",
            max_length=context_length or self.context_length,
            padding="max_length",
            truncation=True,
        ).input_ids


def load_tokenizer(path: str | Path, arch: str | None = None) -> HFTextTokenizer:
    """A tokenizer from a local Hugging Face tokenizer folder (``tokenizer.json`` and its config).

    For models whose tokenizer open_clip fetches from the Hub (SigLIP): save it once with
    ``save_pretrained`` and pass the folder as ``model.tokenizer``. The text cleaning is the one the
    architecture's open_clip config names (``tokenizer_kwargs.clean``), else whitespace only.
    """
    from transformers import AutoTokenizer

    p = Path(path).expanduser()
    if not p.is_dir():
        raise FileNotFoundError(f"model.tokenizer={str(path)!r}: no such tokenizer folder")
    cfg = TINY_CONFIGS.get(arch or "")
    if cfg is None and arch:
        import open_clip

        cfg = open_clip.get_model_config(arch) if arch in open_clip.list_models() else None
    text_cfg = (cfg or {}).get("text_cfg", {})
    clean = text_cfg.get("tokenizer_kwargs", {}).get(
        "clean", "canonicalize" if arch == "tiny-siglip" else "whitespace"
    )
    return HFTextTokenizer(AutoTokenizer.from_pretrained(str(p), local_files_only=True), clean=clean)


# The offline sandbox CLIP: pretrained on promptlab's procedural world, its weights ship in the
# package (promptlab/sandbox/sandbox_clip.safetensors; architecture in the .json beside it).
SANDBOX_ARCH = "sandbox"


class UnknownBackbone(ValueError):
    """``model.arch`` or ``model.pretrained`` names nothing :func:`load_clip` can build; ``key`` says which."""

    def __init__(self, key: str, value: str | None, reason: str) -> None:
        self.key, self.reason = key, f"{value!r} {reason}"
        super().__init__(f"{key}={self.reason}")


# ---------------------------------------------------------------------- local files and folders
def _is_jit_archive(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(n.endswith("constants.pkl") or "/code/" in n for n in z.namelist())


def _load_file(arch: str | None, path: Path) -> tuple[nn.Module, str]:
    """A local checkpoint: OpenAI format (JIT archive, or a plain ``.pt``/``.pth`` state dict) or open_clip."""
    import open_clip

    if _is_jit_archive(path):
        return open_clip.load_openai_model(str(path), precision="fp32", device="cpu"), arch or "openai-jit"
    sd = torch.load(path, map_location="cpu", weights_only=True) if path.suffix != ".safetensors" else None
    wrapped = isinstance(sd, dict) and "state_dict" in sd
    if sd is not None and not wrapped and path.suffix in (".pt", ".pth"):
        # OpenAI format as the `clip` package saves it: shapes define the model, QuickGELU activations.
        from open_clip.model import build_model_from_openai_state_dict

        model = build_model_from_openai_state_dict(dict(sd), quick_gelu=True, cast_dtype=torch.float32)
        return model.float(), arch or "openai-state-dict"
    if not arch:
        raise ValueError(f"{path}: an open_clip checkpoint needs the architecture name (model.arch)")
    return open_clip.create_model(arch, pretrained=str(path), device="cpu"), arch


def _load_hf_dir(path: Path) -> nn.Module:
    from transformers import CLIPModel

    return CLIPModel.from_pretrained(str(path), local_files_only=True).float()


def _is_hf_clip_dir(path: Path) -> bool:
    cfg = path / "config.json"
    if not cfg.is_file():
        return False
    try:
        return json.loads(cfg.read_text()).get("model_type") == "clip"
    except json.JSONDecodeError:
        return False


def _names_a_file(pretrained: str) -> bool:
    """Does ``pretrained`` name a local file or folder rather than an open_clip tag?"""
    return (
        Path(pretrained).expanduser().exists()
        or "/" in pretrained
        or pretrained.endswith((".pt", ".pth", ".bin", ".safetensors"))
    )


def _load_local(arch: str, pretrained: str | None) -> tuple[nn.Module, str, object]:
    import open_clip

    p = Path(str(pretrained)).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"pretrained={pretrained!r}: no such file or directory")
    if not p.is_dir():
        return (*_load_file(arch, p), None)
    if _is_hf_clip_dir(p):
        return _load_hf_dir(p), arch or f"hf:{p.name}", None
    if (p / "open_clip_config.json").is_file():
        return open_clip.create_model(f"local-dir:{p}", device="cpu"), arch or p.name, None
    raise ValueError(
        f"pretrained={pretrained!r}: directory is neither a Hugging Face CLIP model "
        "(config.json with model_type 'clip') nor an open_clip model folder (open_clip_config.json)"
    )


# ---------------------------------------------------------------------- open_clip by name
def _open_clip_archs() -> list[str]:
    import open_clip

    return list(open_clip.list_models())


def _check_open_clip(arch: str, pretrained: str | None) -> None:
    import open_clip

    if arch not in open_clip.list_models():
        raise UnknownBackbone(
            "model.arch",
            arch,
            f"is not a known architecture{did_you_mean(arch, backbone_names())}; promptlab's own: "
            f"{SANDBOX_ARCH}, {', '.join(TINY_CONFIGS)}; open_clip's: "
            "python -c 'import open_clip; print(open_clip.list_models())'",
        )
    tags = open_clip.list_pretrained_tags_by_model(arch)
    if pretrained is not None and pretrained not in tags:
        raise UnknownBackbone(
            "model.pretrained",
            pretrained,
            f"is neither an open_clip tag of {arch}{did_you_mean(pretrained, tags)} nor an existing path; "
            f"tags of {arch}: {', '.join(tags) or '(none)'}",
        )


class _LazyTokenizer:
    """open_clip's tokenizer of ``arch``, built on first use: SigLIP's comes from the Hub, so it is not
    fetched when ``load_clip(tokenizer=folder)`` replaces it."""

    def __init__(self, arch: str) -> None:
        self._arch, self._tok = arch, None

    def _get(self):
        if self._tok is None:
            import open_clip

            self._tok = open_clip.get_tokenizer(self._arch)
        return self._tok

    def __call__(self, *args, **kwargs) -> torch.Tensor:
        return self._get()(*args, **kwargs)

    def __getattr__(self, name: str):
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self._get(), name)


def _load_open_clip(arch: str, pretrained: str | None) -> tuple[nn.Module, str, object]:
    import open_clip

    _check_open_clip(arch, pretrained)
    quick = pretrained == "openai"  # OpenAI weights were trained with QuickGELU
    model = open_clip.create_model(arch, pretrained=pretrained, device="cpu", force_quick_gelu=quick)
    return model, arch, _LazyTokenizer(arch)


def _open_clip_config(clip: FrozenCLIP) -> dict | None:
    import open_clip

    return dict(open_clip.get_model_config(clip.arch)) if clip.arch in open_clip.list_models() else None


# ---------------------------------------------------------------------- tiny random CLIPs
def _check_tiny(arch: str, pretrained: str | None) -> None:
    if pretrained is not None:
        raise UnknownBackbone(
            "model.pretrained",
            pretrained,
            f"is given, but {arch!r} is a random tiny CLIP without weights (use null)",
        )


def build_open_clip(cfg: dict) -> nn.Module:
    """An open_clip model from a configuration dict given in memory (random weights), like open_clip's
    JSON model configs: ``custom_text`` selects ``CustomTextCLIP``; timm tower names are timm's."""
    import open_clip

    cfg = dict(cfg)
    if str(cfg.get("vision_cfg", {}).get("timm_model_name", "")).startswith("promptlab_tiny_"):
        _register_tiny_timm()
    cls = open_clip.model.CustomTextCLIP if cfg.pop("custom_text", False) else open_clip.model.CLIP
    return cls(**cfg)


def _load_tiny(arch: str, pretrained: str | None) -> tuple[nn.Module, str, object]:
    _check_tiny(arch, pretrained)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = build_open_clip(TINY_CONFIGS[arch])
    tokenizer = HFTextTokenizer(tiny_hf_tokenizer(), clean="canonicalize") if arch == "tiny-siglip" else None
    return model, arch, tokenizer


# ---------------------------------------------------------------------- the shipped sandbox CLIP
def _sandbox_claims(arch: str, pretrained: str | None) -> bool:
    # a folder is save_clip's output (e.g. a bridged sandbox CLIP): the local loader reads it
    return arch == SANDBOX_ARCH and not (pretrained and Path(pretrained).expanduser().is_dir())


def _load_sandbox(arch: str, pretrained: str | None) -> tuple[nn.Module, str, object]:
    weights = Path(pretrained).expanduser() if pretrained else sandbox.WEIGHTS
    return sandbox.load_sandbox_model(weights), arch, None


def _sandbox_config(clip: FrozenCLIP) -> dict | None:
    if clip.arch != SANDBOX_ARCH:
        return None
    src = Path(clip.pretrained).expanduser() if clip.pretrained else sandbox.WEIGHTS
    if src.is_dir():
        return json.loads((src / "open_clip_config.json").read_text())["model_cfg"]
    return sandbox.sandbox_metadata(src)["model_config"]


# Registered from the catch-all to the most specific: the last registered is asked first.
register_backbone(
    BackboneLoader(
        "open_clip",
        claims=lambda arch, pretrained: True,
        load=_load_open_clip,
        check=_check_open_clip,
        model_config=_open_clip_config,
        archs=_open_clip_archs,
    )
)
register_backbone(
    BackboneLoader(
        "tiny",
        claims=lambda arch, pretrained: (
            arch in TINY_CONFIGS and (pretrained is None or not _names_a_file(pretrained))
        ),
        load=_load_tiny,
        check=_check_tiny,
        model_config=lambda clip: (
            json.loads(json.dumps(TINY_CONFIGS[clip.arch])) if clip.arch in TINY_CONFIGS else None
        ),
        archs=lambda: list(TINY_CONFIGS),
    )
)
register_backbone(
    BackboneLoader(
        "local",
        claims=lambda arch, pretrained: pretrained is not None and _names_a_file(pretrained),
        load=_load_local,
    )
)
register_backbone(
    BackboneLoader(
        "sandbox",
        claims=_sandbox_claims,
        load=_load_sandbox,
        model_config=_sandbox_config,
        archs=lambda: [SANDBOX_ARCH],
    )
)


# ---------------------------------------------------------------------- public API
def _loader_for(arch: str, pretrained: str | None) -> BackboneLoader:
    for loader in backbone_loaders():
        if loader.claims(arch, pretrained):
            return loader
    raise UnknownBackbone("model.arch", arch, "is built by no registered backbone loader")


def backbone_names() -> list[str]:
    """Every ``arch`` :func:`load_clip` builds by name: promptlab's own (``sandbox``, ``tiny``) and open_clip's."""
    return sorted({name for loader in backbone_loaders() for name in loader.archs()})


def check_backbone(arch: str, pretrained: str | None = None) -> None:
    """Fail now if :func:`load_clip` would refuse ``arch`` / ``pretrained`` by name (no file is opened).

    The recipe check calls this, so a typo in ``model.arch`` or in an open_clip tag fails before any
    data is read. A ``pretrained`` that names a file is checked for existence elsewhere (the recipe's
    path check, then loading); open_clip is imported only for an architecture that is not promptlab's.

    Raises:
        UnknownBackbone: naming the key, the closest known names and where the full list is.
    """
    loader = _loader_for(arch, pretrained)
    if loader.check is not None:
        loader.check(arch, pretrained)


def load_clip(
    arch: str | nn.Module,
    pretrained: str | None = None,
    *,
    device: str | torch.device = "cpu",
    precision: str = "fp32",
    tokenizer: str | Path | None = None,
) -> FrozenCLIP:
    """Build a :class:`FrozenCLIP`.

    Args:
        arch: an open_clip model name (``"ViT-B-16"``, ``"RN50"``), a promptlab tiny config
            (``"tiny"``, random weights), ``"sandbox"`` (the shipped offline CLIP; ``pretrained``
            may name another sandbox ``.safetensors``), an architecture a registered
            :class:`~promptlab.clip.BackboneLoader` builds, or an in-memory open_clip ``CLIP`` / HF
            ``CLIPModel``.
        pretrained: ``None`` (random init), an open_clip tag (``"openai"``, ``"laion2b_s34b_b88k"``),
            a local OpenAI ``.pt`` (JIT archive or state dict; QuickGELU), a local open_clip checkpoint,
            a Hugging Face CLIP directory, or an open_clip ``local-dir:`` model folder.
        device: where to put the model.
        precision: ``fp32``; ``fp16`` or ``bf16`` (every frozen weight stored in that dtype; learned
            tensors stay fp32); or ``reference_fp16``, the CoOp-family references' PREC=fp16
            (:func:`promptlab.clip.to_reference_fp16`; learned tensors in fp16 too, see
            ``FrozenCLIP.prompt_dtype``).
        tokenizer: a local Hugging Face tokenizer folder (:func:`load_tokenizer`) used instead of the
            loader's: SigLIP's tokenizer is otherwise fetched from the Hub.
    """
    if precision not in PRECISIONS:  # before anything is loaded
        raise ValueError(f"precision={precision!r}: expected one of {', '.join(PRECISIONS)}")
    if tokenizer is not None and not Path(tokenizer).expanduser().is_dir():  # before any download
        raise FileNotFoundError(f"model.tokenizer={str(tokenizer)!r}: no such tokenizer folder")
    if isinstance(arch, nn.Module):
        model, name, tok = arch, type(arch).__name__, None
    else:
        model, name, tok = _loader_for(arch, pretrained).load(arch, pretrained)
    if tokenizer is not None:  # replaces the loader's, which is then never built (it may need the Hub)
        tok = load_tokenizer(tokenizer, name)
    return wrap_model(
        model, arch=name, pretrained=pretrained, tokenizer=tok, device=device, precision=precision
    )


def load_backbone(model_cfg, *, device: str | torch.device = "cpu") -> FrozenCLIP:
    """:func:`load_clip` from a recipe's ``model`` section (arch, pretrained, precision, tokenizer)."""
    return load_clip(
        model_cfg.arch,
        model_cfg.pretrained,
        device=device,
        precision=model_cfg.precision,
        tokenizer=model_cfg.get("tokenizer"),
    )


def save_clip(clip: FrozenCLIP, path: str | Path) -> Path:
    """Write the backbone's current weights as a checkpoint folder :func:`load_clip` reads back.

    An open_clip model becomes an open_clip ``local-dir`` folder (``open_clip_config.json`` +
    ``open_clip_model.safetensors``; load with ``model.pretrained=<folder>``), a Hugging Face model a
    ``save_pretrained`` folder. This is how a fine-tuned backbone (ViFi-CLIP's bridge stage) becomes
    the frozen backbone of any method.
    """
    import open_clip
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    if clip.backend == "hf":
        clip.model.save_pretrained(str(path))
        return path
    cfg = next(
        (c for ld in backbone_loaders() if ld.model_config and (c := ld.model_config(clip)) is not None),
        None,
    )
    if cfg is None:
        raise ValueError(
            f"save_clip: no open_clip configuration known for arch {clip.arch!r}; pass model.arch by name"
        )
    if any(isinstance(m, open_clip.transformer.QuickGELU) for m in clip.model.modules()):
        cfg["quick_gelu"] = True  # OpenAI weights: the activation is part of the model
    meta = {"model_cfg": cfg, "preprocess_cfg": {"mean": list(clip.image_mean), "std": list(clip.image_std)}}
    (path / "open_clip_config.json").write_text(json.dumps(meta, indent=2))
    state = {k: v.detach().contiguous().cpu() for k, v in clip.model.state_dict().items()}
    save_file(state, str(path / "open_clip_model.safetensors"))
    return path
