"""FrozenCLIP: identity with the libraries' own encoders, causal truncation, loading paths, hooks.

Every checkpoint used here is written by the test itself from a tiny random model; nothing is
downloaded (see conftest.py).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import open_clip
import pytest
import torch
import torch.nn as nn
from open_clip.transformer import QuickGELU

import promptlab.backbones as backbones
import promptlab.clip as pclip
from promptlab.backbones import load_clip
from promptlab.clip import FrozenCLIP

ATOL = 1e-5
TEXTS = [
    "a photo of a dog.",
    "x",
    "",
    "a considerably longer sentence, with punctuation and many more words than the other prompts here",
    "itap of a sea lion.",
]


def _features(out) -> torch.Tensor:
    """transformers 5 returns an output object from get_*_features, transformers 4 a tensor."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def _library_copy(clip: FrozenCLIP) -> nn.Module:
    """A fresh library model holding a copy of the wrapped model's weights: the reference side runs the
    library's own code on it, never on the object promptlab wraps (a patch FrozenCLIP made there would
    show on both sides)."""
    if clip.backend == "hf":
        from transformers import CLIPModel

        fresh = CLIPModel(clip.model.config)
    else:
        fresh = open_clip.model.CLIP(**backbones.TINY_CONFIGS["tiny"])
    fresh.load_state_dict(copy.deepcopy(clip.model.state_dict()), strict=True)
    return fresh.eval()


def _library_text(clip: FrozenCLIP, ids: torch.Tensor) -> torch.Tensor:
    """The library's own text encoder (on a copy of the weights), always over the full 77 tokens."""
    model = _library_copy(clip)
    if clip.backend == "hf":
        return _features(model.get_text_features(input_ids=ids))
    return model.encode_text(ids)


def _library_image(clip: FrozenCLIP, images: torch.Tensor) -> torch.Tensor:
    model = _library_copy(clip)
    if clip.backend == "hf":
        return _features(model.get_image_features(pixel_values=images))
    return model.encode_image(images)


@pytest.fixture(scope="module", params=["open_clip", "hf"])
def any_clip(request: pytest.FixtureRequest, hf_clip_dir: Path) -> FrozenCLIP:
    """The tiny model on each backend: open_clip (promptlab's 'tiny', 2 blocks) and a HF directory."""
    if request.param == "hf":
        clip = load_clip("hf-tiny", str(hf_clip_dir))
        assert clip.backend == "hf"
        return clip
    return load_clip("tiny")


# ---------------------------------------------------------------------- identity
@torch.no_grad()
def test_text_identity_with_library(any_clip: FrozenCLIP) -> None:
    ids = open_clip.tokenize(TEXTS)  # the library's tokenizer: both backends use CLIP's BPE ids
    assert torch.equal(any_clip.tokenize(TEXTS).cpu(), ids)
    assert ids.shape == (len(TEXTS), 77)
    eot = any_clip.eot_index(ids)
    assert torch.equal(eot, ids.argmax(dim=-1))  # EOT is the largest id
    ref = _library_text(any_clip, ids)
    via_embeddings = any_clip.encode_text_embeddings(any_clip.embed_tokens(ids), eot)
    via_ids = any_clip.encode_text(ids)
    assert via_ids.shape == (len(TEXTS), any_clip.embed_dim)
    torch.testing.assert_close(via_embeddings, ref, atol=ATOL, rtol=0)
    torch.testing.assert_close(via_ids, ref, atol=ATOL, rtol=0)
    # different texts give different features (the comparison is not vacuous)
    assert (ref[0] - ref[1]).abs().max() > 1e-3
    normed = any_clip.encode_text(ids, normalize=True)
    torch.testing.assert_close(normed.norm(dim=-1), torch.ones(len(TEXTS)), atol=1e-6, rtol=0)


@torch.no_grad()
def test_image_identity_with_library(any_clip: FrozenCLIP, images: torch.Tensor) -> None:
    ref = _library_image(any_clip, images)
    ours = any_clip.encode_image(images)
    assert ours.shape == (images.shape[0], any_clip.embed_dim)
    torch.testing.assert_close(ours, ref, atol=ATOL, rtol=0)
    assert (ref[0] - ref[1]).abs().max() > 1e-4


@torch.no_grad()
def test_identity_on_style_guide_model(tiny_openclip_model: nn.Module, images: torch.Tensor) -> None:
    """The STYLE.md one-block model passed in memory, against its own encode_text / encode_image."""
    ref_text = tiny_openclip_model.eval().encode_text(open_clip.tokenize(TEXTS))
    ref_image = tiny_openclip_model.encode_image(images)
    clip = load_clip(tiny_openclip_model)
    assert clip.backend == "open_clip" and clip.width == 32 and clip.embed_dim == 32
    torch.testing.assert_close(clip.encode_text(clip.tokenize(TEXTS)), ref_text, atol=ATOL, rtol=0)
    torch.testing.assert_close(clip.encode_image(images), ref_image, atol=ATOL, rtol=0)


# ---------------------------------------------------------------------- causal truncation
@torch.no_grad()
def test_causal_truncation(any_clip: FrozenCLIP, monkeypatch: pytest.MonkeyPatch) -> None:
    texts = ["a dog.", "a photo of a rather small brown dog on a sofa.", "x"]
    ids = any_clip.tokenize(texts)
    eot = any_clip.eot_index(ids)
    full = _library_text(any_clip, ids)  # the library runs all 77 positions

    lengths: list[int] = []
    real = pclip._block_forward

    def spy(b, x, **kw):
        lengths.append(x.shape[1])
        return real(b, x, **kw)

    monkeypatch.setattr(pclip, "_block_forward", spy)
    x = any_clip.embed_tokens(ids)  # [N, 77, W]: full-length input, cut inside
    assert x.shape[1] == 77
    feats = any_clip.encode_text_embeddings(x, eot)

    expected_len = int(eot.max()) + 1
    assert expected_len < 20  # the cut is real: far below 77
    assert lengths == [expected_len] * len(any_clip._text_blocks)
    torch.testing.assert_close(feats, full, atol=ATOL, rtol=0)

    # a batch with only short prompts runs shorter still, and still matches
    lengths.clear()
    short = any_clip.encode_text(ids[[0, 2]])
    assert lengths == [int(eot[[0, 2]].max()) + 1] * len(any_clip._text_blocks)
    torch.testing.assert_close(short, full[[0, 2]], atol=ATOL, rtol=0)


# ---------------------------------------------------------------------- loading paths
def _openai_style_model(seed: int = 0, quick_gelu: bool = True) -> nn.Module:
    """A model whose state dict has OpenAI's key names and shapes that build_model_from_openai_state_dict
    can read back (it infers heads = width // 64, hence width 64). Weights rounded to fp16, as OpenAI
    files store them, so the fp16 round trip inside the loader is lossless."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = open_clip.model.CLIP(
            embed_dim=32,
            vision_cfg=dict(layers=1, width=64, patch_size=8, image_size=32),  # head_width 64: 1 head
            text_cfg=dict(layers=1, width=64, heads=1),
            quick_gelu=quick_gelu,
        )
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.half().float())
    return model.eval()


def _openai_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    sd = {k: (v.half() if v.is_floating_point() else v) for k, v in model.state_dict().items()}
    # OpenAI checkpoints carry these metadata entries; the loader must drop them.
    sd.update(
        input_resolution=torch.tensor(32), context_length=torch.tensor(77), vocab_size=torch.tensor(49408)
    )
    return sd


def _assert_quick_gelu_and_equal(clip: FrozenCLIP, src: nn.Module, images: torch.Tensor) -> None:
    acts = [m for m in clip.model.modules() if isinstance(m, QuickGELU | nn.GELU)]
    assert acts and all(isinstance(m, QuickGELU) for m in acts), "OpenAI weights must run with QuickGELU"
    assert clip.dtype == torch.float32
    ids = clip.tokenize(TEXTS)
    with torch.no_grad():
        ref_text, ref_image = src.encode_text(ids), src.encode_image(images)
        torch.testing.assert_close(clip.encode_text(ids), ref_text, atol=ATOL, rtol=0)
        torch.testing.assert_close(clip.encode_image(images), ref_image, atol=ATOL, rtol=0)
        # the activation matters: the same weights with plain GELU give other features
        gelu = _openai_style_model(quick_gelu=False)
        gelu.load_state_dict(src.state_dict())
        assert (gelu.encode_text(ids) - ref_text).abs().max() > 1e-4


def test_load_openai_state_dict(tmp_path: Path, images: torch.Tensor) -> None:
    src = _openai_style_model(seed=5)
    path = tmp_path / "ViT-tiny.pt"
    torch.save(_openai_state_dict(src), path)
    assert not backbones._is_jit_archive(path)  # torch.save's zip is not mistaken for TorchScript
    clip = load_clip("ViT-tiny", str(path))
    assert clip.backend == "open_clip" and clip.width == 64 and clip.image_size == 32
    _assert_quick_gelu_and_equal(clip, src, images)


def _jit_archive(sd: dict[str, torch.Tensor], path: Path) -> None:
    """A TorchScript archive holding ``sd`` under OpenAI's key names, like the `clip` package's downloads."""

    class Node(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x

    root = Node()
    for key, value in sd.items():
        *parents, leaf = key.split(".")
        mod = root
        for name in parents:
            if name not in mod._modules:
                mod.add_module(name, Node())
            mod = mod._modules[name]
        mod.register_parameter(leaf, nn.Parameter(value.clone(), requires_grad=False))
    torch.jit.script(root).save(str(path))


def test_load_openai_jit_archive(tmp_path: Path, images: torch.Tensor) -> None:
    src = _openai_style_model(seed=6)
    sd = {k: v for k, v in _openai_state_dict(src).items() if v.is_floating_point()}
    path = tmp_path / "ViT-tiny-jit.pt"
    _jit_archive(sd, path)
    assert backbones._is_jit_archive(path)
    assert set(torch.jit.load(str(path)).state_dict()) == set(sd)
    clip = load_clip("ViT-tiny", str(path))
    _assert_quick_gelu_and_equal(clip, src, images)


@pytest.fixture
def registered_tiny_arch(monkeypatch: pytest.MonkeyPatch, tiny_openclip_cfg) -> str:
    """Register STYLE.md's tiny config as an open_clip architecture name, for this test only."""
    name = "promptlab-test-tiny"
    monkeypatch.setitem(open_clip.factory._MODEL_CONFIGS, name, tiny_openclip_cfg())
    return name


@pytest.mark.parametrize("fmt", ["wrapped_pt", "safetensors"])
def test_load_open_clip_checkpoint(
    tmp_path: Path, registered_tiny_arch: str, images: torch.Tensor, fmt: str, make_openclip
) -> None:
    src = make_openclip(seed=3).eval()
    if fmt == "wrapped_pt":
        path = tmp_path / "epoch_10.pt"
        torch.save({"epoch": 10, "state_dict": {f"module.{k}": v for k, v in src.state_dict().items()}}, path)
    else:
        from safetensors.torch import save_file

        path = tmp_path / "open_clip_model.safetensors"
        save_file(src.state_dict(), str(path))
    clip = load_clip(registered_tiny_arch, str(path))
    assert clip.arch == registered_tiny_arch
    for k, v in src.state_dict().items():
        assert torch.equal(clip.model.state_dict()[k], v), k
    ids = clip.tokenize(TEXTS)
    with torch.no_grad():
        torch.testing.assert_close(clip.encode_text(ids), src.encode_text(ids), atol=ATOL, rtol=0)
        torch.testing.assert_close(clip.encode_image(images), src.encode_image(images), atol=ATOL, rtol=0)
    # a checkpoint from another random model gives another backbone
    other = load_clip(make_openclip(seed=4))
    assert other.fingerprint() != clip.fingerprint()


def test_load_open_clip_local_dir(tmp_path: Path, make_openclip, tiny_openclip_cfg) -> None:
    from safetensors.torch import save_file

    src = make_openclip(seed=7).eval()
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": tiny_openclip_cfg()}))
    save_file(src.state_dict(), str(tmp_path / "open_clip_model.safetensors"))
    clip = load_clip("tiny-dir", str(tmp_path))
    ids = clip.tokenize(TEXTS)
    with torch.no_grad():
        torch.testing.assert_close(clip.encode_text(ids), src.encode_text(ids), atol=ATOL, rtol=0)


@torch.no_grad()
def test_load_hf_directory(hf_clip_dir: Path, images: torch.Tensor) -> None:
    from transformers import CLIPModel

    clip = load_clip("hf-tiny", str(hf_clip_dir))
    ref = CLIPModel.from_pretrained(str(hf_clip_dir), local_files_only=True).eval()
    assert clip.backend == "hf" and clip.width == 32 and clip.embed_dim == 32 and clip.image_size == 32
    assert clip.eot_token_id == ref.config.text_config.eos_token_id == 49407
    ids = clip.tokenize(TEXTS)
    torch.testing.assert_close(
        clip.encode_text(ids), _features(ref.get_text_features(input_ids=ids)), atol=ATOL, rtol=0
    )
    torch.testing.assert_close(
        clip.encode_image(images), _features(ref.get_image_features(pixel_values=images)), atol=ATOL, rtol=0
    )
    torch.testing.assert_close(clip.logit_scale, ref.logit_scale.exp().detach(), atol=0, rtol=0)


@torch.no_grad()
def test_load_in_memory_models(images: torch.Tensor, make_openclip, make_hf_clip) -> None:
    hf = make_hf_clip(seed=2)
    ids = open_clip.tokenize(TEXTS)
    ref = _features(hf.get_text_features(input_ids=ids))
    clip = load_clip(hf)
    assert clip.backend == "hf" and clip.model is hf
    torch.testing.assert_close(clip.encode_text(ids), ref, atol=ATOL, rtol=0)

    oc = make_openclip(seed=2).eval()
    ref = oc.encode_text(ids)
    clip = load_clip(oc)
    assert clip.backend == "open_clip" and clip.model is oc
    torch.testing.assert_close(clip.encode_text(ids), ref, atol=ATOL, rtol=0)


def test_bad_inputs_give_clear_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Anything that would build or download a real model fails the test instead.
    def no_download(*args, **kwargs):
        raise AssertionError(f"load_clip tried to build/download a model: {args} {kwargs}")

    monkeypatch.setattr(open_clip, "create_model", no_download)
    monkeypatch.setattr(open_clip.factory, "create_model", no_download)
    monkeypatch.setattr(open_clip.pretrained, "download_pretrained", no_download)
    monkeypatch.setattr(open_clip.pretrained, "download_pretrained_from_url", no_download)

    missing = tmp_path / "nowhere" / "model.pt"
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_clip("ViT-B-32", str(missing))
    with pytest.raises(FileNotFoundError, match="weights.pt"):
        load_clip("ViT-B-32", "weights.pt")
    with pytest.raises(ValueError, match="ViT-Nope-99.*not a known architecture"):
        load_clip("ViT-Nope-99")
    with pytest.raises(ValueError, match=r"no_such_tag.*(?s:.*)openai"):  # names the valid tags
        load_clip("ViT-B-32", "no_such_tag")
    with pytest.raises(ValueError, match="precision"):
        load_clip("tiny", precision="fp8")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="neither a Hugging Face CLIP"):
        load_clip("ViT-B-32", str(tmp_path / "empty"))


def test_open_clip_checkpoint_needs_arch(tmp_path: Path, make_openclip) -> None:
    path = tmp_path / "ckpt.pt"
    torch.save({"state_dict": make_openclip().state_dict()}, path)
    with pytest.raises(ValueError, match="architecture name"):
        load_clip("", str(path))


@pytest.mark.parametrize("precision,dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
@torch.no_grad()
def test_precision(precision: str, dtype: torch.dtype, tiny_clip: FrozenCLIP, images: torch.Tensor) -> None:
    clip = load_clip("tiny", precision=precision)
    assert clip.dtype == dtype
    assert all(p.dtype == dtype for p in clip.parameters() if p.is_floating_point())
    ids = clip.tokenize(TEXTS)
    text, image = clip.encode_text(ids), clip.encode_image(images)
    assert text.dtype == dtype and image.dtype == dtype
    # same weights, rounded: close to the fp32 model, not garbage
    ref = tiny_clip.encode_text(ids, normalize=True)
    cos = (nn.functional.normalize(text.float(), dim=-1) * ref).sum(-1)
    assert cos.min() > 0.99
    assert clip.fingerprint() != tiny_clip.fingerprint()


# ---------------------------------------------------------------------- frozen-ness, fingerprint
def test_fingerprint(make_openclip) -> None:
    a, b = load_clip("tiny"), load_clip("tiny")
    assert a.model is not b.model
    assert a.fingerprint() == b.fingerprint()
    assert len(a.fingerprint()) == 16
    m = make_openclip(seed=0)
    m2 = copy.deepcopy(m)
    with torch.no_grad():
        m2.ln_final.bias[0] += 1e-3  # one number differs
    assert load_clip(m).fingerprint() != load_clip(m2).fingerprint()
    assert load_clip(make_openclip(seed=1)).fingerprint() != load_clip(m).fingerprint()


def test_frozen_and_stays_in_eval(tiny_openclip_model: nn.Module) -> None:
    tiny_openclip_model.train()
    clip = load_clip(tiny_openclip_model)
    assert all(not p.requires_grad for p in clip.parameters())
    assert not any(m.training for m in clip.modules())
    out = clip.train()
    assert out is clip
    assert not any(m.training for m in clip.modules())
    holder = nn.ModuleDict({"clip": clip, "head": nn.Linear(2, 2)})
    holder.train()  # a parent module switching to training mode must not reach the backbone
    assert holder["head"].training
    assert not any(m.training for m in clip.modules())


# ---------------------------------------------------------------------- hooks: deep prompts, visual prompts
@torch.no_grad()
def test_text_deep_prompts(any_clip: FrozenCLIP) -> None:
    ids = any_clip.tokenize(["a photo of a small dog.", "a photo of a big cat on a mat."])
    x, eot = any_clip.embed_tokens(ids), any_clip.eot_index(ids)
    base = any_clip.encode_text_embeddings(x, eot)
    n_layers = len(any_clip._text_blocks)
    assert n_layers >= 2

    seen: list[int] = []

    def identity(layer: int, h: torch.Tensor) -> torch.Tensor:
        seen.append(layer)
        return h

    same = any_clip.encode_text_embeddings(x, eot, deep_prompts=identity)
    assert torch.equal(same, base)
    assert seen == list(range(1, n_layers))

    g = torch.Generator().manual_seed(0)
    shared = torch.randn(2, any_clip.width, generator=g)  # [n, W]
    changed = any_clip.encode_text_embeddings(x, eot, deep_prompts={1: shared})
    assert changed.shape == base.shape
    assert (changed - base).abs().max() > 1e-4
    per_prompt = shared.expand(2, -1, -1).clone()  # [N, n, W] form gives the same result
    torch.testing.assert_close(any_clip.encode_text_embeddings(x, eot, deep_prompts={1: per_prompt}), changed)
    # a mapping without the layer leaves the result untouched
    assert torch.equal(any_clip.encode_text_embeddings(x, eot, deep_prompts={n_layers + 5: shared}), base)


@torch.no_grad()
def test_visual_prompts_and_tokens(any_clip: FrozenCLIP, images: torch.Tensor) -> None:
    B = images.shape[0]
    base = any_clip.encode_image(images)
    g = torch.Generator().manual_seed(0)
    p = torch.randn(3, any_clip.vision_width, generator=g)  # [n, Wv]
    prompted = any_clip.encode_image(images, prompts=p)
    assert prompted.shape == (B, any_clip.embed_dim)
    assert (prompted - base).abs().max() > 1e-4
    torch.testing.assert_close(any_clip.encode_image(images, prompts=p.expand(B, -1, -1)), prompted)

    deep = any_clip.encode_image(
        images, prompts=p, deep_prompts={1: torch.randn(3, any_clip.vision_width, generator=g)}
    )
    assert deep.shape == (B, any_clip.embed_dim)
    assert (deep - prompted).abs().max() > 1e-4

    pooled, tokens = any_clip.encode_image(images, return_tokens=True)
    n_patches = (any_clip.image_size // 8) ** 2
    assert tokens.shape == (B, n_patches, any_clip.embed_dim)
    torch.testing.assert_close(pooled, base, atol=0, rtol=0)
    assert torch.isfinite(tokens).all()
    # the tokens are patch tokens, not copies of the pooled class token
    assert (tokens - pooled[:, None]).abs().max() > 1e-4


def test_a_registered_backbone_loader_is_asked_before_the_built_in_ones(monkeypatch):
    """FrozenCLIP imports no loader: a user's loader registers and load_clip / check_backbone /
    save_clip ask it first (issue 22: backbone loaders registered with FrozenCLIP)."""
    monkeypatch.setattr(pclip, "_LOADERS", list(pclip._LOADERS))  # leave the registry as it was
    built = []

    def load(arch, pretrained):
        built.append((arch, pretrained))
        with torch.random.fork_rng():
            torch.manual_seed(0)
            return open_clip.model.CLIP(**backbones.TINY_CONFIGS["tiny"]), "mine", None

    pclip.register_backbone(
        pclip.BackboneLoader(
            "mine",
            claims=lambda arch, pretrained: arch == "tiny" and pretrained == "mine-weights",
            load=load,
            model_config=lambda clip: dict(backbones.TINY_CONFIGS["tiny"]) if clip.arch == "mine" else None,
            archs=lambda: ["mine"],
        )
    )
    backbones.check_backbone("tiny", "mine-weights")  # the tiny loader would refuse weights
    clip = load_clip("tiny", "mine-weights", precision="fp16")
    assert built == [("tiny", "mine-weights")]
    assert clip.arch == "mine" and clip.dtype == torch.float16 and clip.precision == "fp16"
    assert "mine" in backbones.backbone_names()
    with pytest.raises(backbones.UnknownBackbone, match="random tiny CLIP"):
        backbones.check_backbone("tiny", "openai")  # the built-in loaders still answer the rest
