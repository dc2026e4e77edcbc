"""``model.precision=reference_fp16`` against the CoOp family's PREC=fp16 arithmetic, re-stated here.

The reference side builds its own fp16 CLIP from a *copy* of the fp32 weights with a re-statement of
``convert_weights`` and CLIP's fp16 LayerNorm (openai/CLIP ``clip/model.py``, copied verbatim into
KaiyangZhou/CoOp, htyao89/KgCoOp and muzairkhattak/multimodal-prompt-learning), runs CoOp's
PromptLearner / TextEncoder / CustomCLIP (CoOp ``trainers/coop.py`` L60-130, L184-207) in that dtype,
and steps the fp16 context as Dassl does: ``build_optimizer`` makes a plain ``torch.optim.SGD`` over
the prompt learner (``dassl/optim/optimizer.py``) and ``model_backward_and_update`` calls
``zero_grad(); loss.backward(); step()`` with no loss scaling for PREC=fp16.
"""

from __future__ import annotations

import copy
from pathlib import Path

import open_clip
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from promptlab.backbones import load_clip
from promptlab.config import ConfigError, load_recipe
from promptlab.engine import FeatureBatches, train
from promptlab.methods import CoOp

CLASSNAMES = ["cat", "sea_lion", "Yorkshire_terrier", "golden retriever"]
MOMENTUM, WD = 0.9, 5e-4  # Dassl OPTIM defaults in every CoOp-family config


# ---------------------------------------------------------------------- the reference, re-stated
class RefLayerNorm(nn.LayerNorm):
    """clip/model.py ``class LayerNorm``: "Subclass torch's LayerNorm to handle fp16"."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        orig_type = x.dtype
        ret = super().forward(x.type(torch.float32))
        return ret.type(orig_type)


def ref_convert_weights(model: nn.Module) -> nn.Module:
    """clip/model.py ``convert_weights``: linear, conv and attention weights and the projections to fp16."""

    def _convert_weights_to_fp16(layer: nn.Module) -> None:
        if isinstance(layer, (nn.Conv1d, nn.Conv2d, nn.Linear)):
            layer.weight.data = layer.weight.data.half()
            if layer.bias is not None:
                layer.bias.data = layer.bias.data.half()
        if isinstance(layer, nn.MultiheadAttention):
            for attr in [
                *[f"{s}_proj_weight" for s in ["in", "q", "k", "v"]],
                "in_proj_bias",
                "bias_k",
                "bias_v",
            ]:
                tensor = getattr(layer, attr)
                if tensor is not None:
                    tensor.data = tensor.data.half()
        for name in ["text_projection", "proj"]:
            attr = getattr(layer, name, None)
            if isinstance(attr, torch.Tensor):
                attr.data = attr.data.half()

    model.apply(_convert_weights_to_fp16)
    for m in model.modules():  # the CLIP model is built with its own LayerNorm class
        if isinstance(m, nn.LayerNorm):
            m.__class__ = RefLayerNorm
    return model


class RefCoOpFp16:
    """CoOp with CTX_INIT "a photo of a" on the reference's fp16 CLIP (a deep copy of the weights)."""

    def __init__(self, fp32_model: nn.Module):
        self.model = ref_convert_weights(copy.deepcopy(fp32_model).requires_grad_(False))
        self.dtype = self.model.visual.conv1.weight.dtype  # CLIP.dtype
        prompt = open_clip.tokenize("a photo of a")
        with torch.no_grad():
            embedding = self.model.token_embedding(prompt).type(self.dtype)
        self.ctx = embedding[0, 1:5, :].clone()  # nn.Parameter(ctx_vectors): fp16
        names = [c.replace("_", " ") for c in CLASSNAMES]
        self.tokenized = torch.cat([open_clip.tokenize("a photo of a " + n + ".") for n in names])
        with torch.no_grad():
            embedding = self.model.token_embedding(self.tokenized).type(self.dtype)
        self.prefix, self.suffix = embedding[:, :1, :], embedding[:, 5:, :]
        self.buf: torch.Tensor | None = None

    def loss(self, ctx: torch.Tensor, image_features: torch.Tensor, labels: torch.Tensor):
        m = self.model
        prompts = torch.cat(
            [self.prefix, ctx.unsqueeze(0).expand(len(CLASSNAMES), -1, -1), self.suffix], dim=1
        )
        x = prompts + m.positional_embedding.type(self.dtype)  # TextEncoder.forward
        x = m.transformer(x, attn_mask=m.attn_mask.to(self.dtype))  # open_clip blocks are batch-first
        x = m.ln_final(x).type(self.dtype)
        text = x[torch.arange(x.shape[0]), self.tokenized.argmax(dim=-1)] @ m.text_projection
        image = image_features / image_features.norm(dim=-1, keepdim=True)  # CustomCLIP.forward
        text = text / text.norm(dim=-1, keepdim=True)
        logits = m.logit_scale.exp() * image @ text.t()
        return logits, F.cross_entropy(logits, labels)

    def sgd_step(self, grad: torch.Tensor, lr: float) -> None:
        """torch.optim.SGD(momentum=0.9, weight_decay=5e-4, dampening=0) on the fp16 parameter."""
        d_p = grad.add(self.ctx, alpha=WD)
        self.buf = d_p.clone() if self.buf is None else self.buf.mul(MOMENTUM).add(d_p)
        self.ctx = self.ctx.add(self.buf, alpha=-lr)


# ---------------------------------------------------------------------- helpers
@pytest.fixture(scope="module")
def fp32_model() -> nn.Module:
    return load_clip("tiny").model


def _features() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return torch.randn(16, 32, generator=g).half(), torch.arange(16) % 4  # [N, D] fp16 image features


def _train(tmp_path: Path, precision: str, amp: str, lr: float, epochs: int, hook=None) -> CoOp:
    """promptlab's CoOp through the engine, one full batch of fixed image features per epoch."""
    clip = load_clip("tiny", precision=precision)
    module = CoOp(clip, CLASSNAMES, ctx_init="a photo of a")
    module.match_backbone_precision()  # what runner.run does after building the method
    if hook is not None:
        module.ctx.register_hook(lambda grad: hook(module, grad))
    feats, labels = _features()
    g = torch.Generator().manual_seed(0)
    opt = torch.optim.SGD(module.trainable_parameters(), lr=lr, momentum=MOMENTUM, weight_decay=WD)
    batches = FeatureBatches(feats.float()[None], labels, len(labels), g)
    train(
        module,
        batches,
        opt,
        epochs=epochs,
        lr_schedule=lambda k: lr,
        generator=g,
        run_dir=tmp_path,
        device=torch.device("cpu"),
        amp=amp,
    )
    return module


# ---------------------------------------------------------------------- tests
def test_backbone_is_the_references_fp16_clip(fp32_model: nn.Module) -> None:
    """Same dtypes and values as convert_weights (embeddings excepted: stored fp16 here, cast to fp16
    before every use there, so the numbers agree); LayerNorms compute in fp32 like CLIP's."""
    ours = load_clip("tiny", precision="reference_fp16")
    assert ours.dtype == torch.float16 and ours.prompt_dtype == torch.float16
    ref = ref_convert_weights(copy.deepcopy(fp32_model))
    ref_params = dict(ref.named_parameters())
    cast_at_use = (
        "token_embedding.weight",
        "positional_embedding",
        "visual.class_embedding",
        "visual.positional_embedding",
    )
    for name, p in ours.model.named_parameters():
        expected = ref_params[name].detach()
        if name in cast_at_use:
            assert expected.dtype == torch.float32
            expected = expected.half()
        assert p.dtype == expected.dtype, name
        assert torch.equal(p.detach(), expected), name
    assert ours.model.logit_scale.dtype == torch.float32 and ours.model.ln_final.weight.dtype == torch.float32
    x = torch.randn(2, 5, ours.width, generator=torch.Generator().manual_seed(0)).half() * 30
    out = ours.model.ln_final(x)
    assert out.dtype == torch.float16 and torch.equal(out, ref.ln_final(x))


def test_forward_is_fp16_like_the_reference(fp32_model: nn.Module) -> None:
    """Context, logits, loss and gradient are fp16, and agree with the reference's fp16 forward to fp16
    rounding: the two attention kernels round differently (on the tiny CLIP each fp16 gradient is about
    0.3 % of its largest entry away from the fp32 one, so they may differ by twice that)."""
    ref = RefCoOpFp16(fp32_model)
    feats, labels = _features()
    ctx = ref.ctx.clone().requires_grad_(True)
    ref_logits, ref_loss = ref.loss(ctx, feats, labels)
    (ref_grad,) = torch.autograd.grad(ref_loss, ctx)
    module = CoOp(load_clip("tiny", precision="reference_fp16"), CLASSNAMES, ctx_init="a photo of a")
    module.match_backbone_precision()
    assert module.ctx.dtype == torch.float16 and torch.equal(module.ctx.detach(), ref.ctx)
    logits = module(image_features=feats.float())
    loss = module.loss(logits, labels)
    loss.backward()
    assert (logits.dtype, loss.dtype, module.ctx.grad.dtype) == (
        ref_logits.dtype,
        ref_loss.dtype,
        ref_grad.dtype,
    )
    assert ref_logits.dtype == torch.float16
    torch.testing.assert_close(logits, ref_logits, atol=0.05, rtol=0)  # |logits| <= 100: fp16 steps of 0.06
    torch.testing.assert_close(loss, ref_loss, atol=5e-3, rtol=0)
    torch.testing.assert_close(
        module.ctx.grad.float(), ref_grad.float(), atol=1e-2 * ref_grad.abs().max().item(), rtol=0
    )


def test_zero_shot_head_is_fp16_with_its_fp32_classifier() -> None:
    """The zero-shot classifier is kept in fp32 (a buffer, averaged over templates); under reference_fp16
    the head still scores in fp16, as CoOp's ZeroshotCLIP does with its fp16 model: both sides are cast
    to the head's dtype before the cosine, whatever dtype each arrives in."""
    from promptlab.methods import ZeroShotCLIP

    clip = load_clip("tiny", precision="reference_fp16")
    module = ZeroShotCLIP(clip, CLASSNAMES)
    txt = module.text_features()
    assert txt.dtype == torch.float32
    feats = torch.randn(3, txt.shape[1], generator=torch.Generator().manual_seed(0))
    logits = module(image_features=feats)
    assert logits.dtype == torch.float16
    img16, txt16 = feats.half(), txt.half()
    img16, txt16 = img16 / img16.norm(dim=-1, keepdim=True), txt16 / txt16.norm(dim=-1, keepdim=True)
    torch.testing.assert_close(logits, clip.logit_scale * img16 @ txt16.t(), atol=0.1, rtol=0)


def test_unfrozen_backbone_weights_keep_their_dtype_under_reference_fp16() -> None:
    """match_backbone_precision casts the method's own learned tensors to fp16, never an unfrozen backbone
    weight (MoCoOp's LayerNorms, ViFi-CLIP's towers): those keep the dtype convert_weights left them in
    (fp32 LayerNorms beside fp16 linear weights), as in the reference's fp16 CLIP, and are learned state."""
    clip = load_clip("tiny", precision="reference_fp16")  # its own: unfreezing must not touch the shared one
    clip.unfreeze(clip.tower_parts("image"))
    module = CoOp(clip, CLASSNAMES, n_ctx=2)

    def backbone() -> dict[str, torch.dtype]:
        return {n: p.dtype for n, p in module.named_parameters() if n.startswith("clip.") and p.requires_grad}

    before = backbone()
    assert {torch.float16, torch.float32} <= set(before.values())
    module.match_backbone_precision()
    assert module.ctx.dtype == torch.float16 and backbone() == before
    state = module.prompt_state_dict()  # what an export holds: the context and every unfrozen weight
    assert set(state) == {"ctx", *before} and {k: v.dtype for k, v in state.items() if k != "ctx"} == before


def test_sgd_steps_fp16_parameters_as_the_reference(tmp_path: Path) -> None:
    """The engine's update under reference_fp16 is exactly the reference's: fp16 parameter, fp16
    gradient, fp16 momentum, no loss scaling, no fp32 master copy (three steps, momentum in play)."""
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    module = _train(
        tmp_path,
        "reference_fp16",
        "fp32",
        0.002,
        3,
        hook=lambda m, g: seen.append((m.ctx.detach().clone(), g.clone())),
    )
    assert len(seen) == 3 and all(g.dtype == torch.float16 for _, g in seen)
    replay = RefCoOpFp16.__new__(RefCoOpFp16)  # the update rule alone, from the first step's context
    replay.ctx, replay.buf = seen[0][0], None
    for i, (ctx, grad) in enumerate(seen):
        assert torch.equal(replay.ctx, ctx), f"step {i}"
        replay.sgd_step(grad, 0.002)
    assert module.ctx.dtype == torch.float16 and torch.equal(module.ctx.detach(), replay.ctx)


def test_fp16_updates_stall_where_fp32_and_amp_move(fp32_model: nn.Module, tmp_path: Path) -> None:
    """The warm-up step (lr 1e-5) is below half an fp16 ulp for many context entries: the reference leaves
    them where they were, and so does reference_fp16; fp32 and bf16 autocast (fp32 master weights) move
    every entry. The arithmetic modes really differ."""
    lr = 1e-5
    ref = RefCoOpFp16(fp32_model)
    start = ref.ctx.clone()
    feats, labels = _features()
    ctx = ref.ctx.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(ref.loss(ctx, feats, labels)[1], ctx)
    ref.sgd_step(grad, lr)
    ref_stalled = ref.ctx == start  # [n_ctx, W]
    assert 0.1 < ref_stalled.float().mean() < 0.9
    ours = _train(tmp_path / "ref", "reference_fp16", "fp32", lr, 1).ctx.detach()
    assert (ours == start).eq(ref_stalled).float().mean() > 0.9  # the same entries stall
    for precision, amp in (("fp32", "fp32"), ("fp32", "bf16")):
        moved = _train(tmp_path / amp, precision, amp, lr, 1).ctx.detach()
        assert moved.dtype == torch.float32 and (moved != start.float()).all(), (precision, amp)


def test_reference_fp16_runs_without_autocast(tmp_path: Path) -> None:
    recipe = Path(__file__).resolve().parent.parent / "recipes" / "demo" / "coop_tiny.yaml"
    cfg = load_recipe(recipe, ["model.precision=reference_fp16"], check_paths=False)
    assert cfg.model.precision == "reference_fp16"
    with pytest.raises(ConfigError, match="train.amp"):
        load_recipe(recipe, ["model.precision=reference_fp16", "train.amp=bf16"], check_paths=False)


# ---------------------------------------------------------------------- evaluation arithmetic
@pytest.mark.parametrize(("eval_amp", "expected"), [(None, "bf16"), ("fp32", "fp32")])
def test_a_runs_evaluations_use_eval_amp_else_train_amp(tmp_path, monkeypatch, eval_amp, expected):
    """The run's own evaluation and a later `promptlab eval` of its directory (the New classes of a
    base-to-new run) use one arithmetic: ``eval.amp``, else ``train.amp``. MoCoOp trains under fp16
    autocast but its reference evaluates without autocast, so its recipes set ``eval.amp: fp32``."""
    import promptlab.runner as runner
    from promptlab.cli import main

    seen: list[str] = []
    real = runner.evaluate

    def spy(*args, **kwargs):
        seen.append(kwargs.get("amp", "fp32"))
        return real(*args, **kwargs)

    monkeypatch.setattr(runner, "evaluate", spy)
    out = tmp_path / "run"
    args = ["run", f"output_dir={out}", f"cache_dir={tmp_path / 'cache'}", "train.epochs=1", "train.amp=bf16"]
    if eval_amp is not None:
        args.append(f"eval.amp={eval_amp}")
    assert main(args) == 0
    assert main(["eval", str(out)]) == 0
    assert seen == [expected, expected]


def test_mocoop_recipes_evaluate_without_autocast_as_the_reference():
    from promptlab.config import eval_amp, load_recipe
    from promptlab.resources import find_recipe

    for name in ("base2new/mocoop_vit_b16", "fewshot/mocoop_vit_b16"):
        cfg = load_recipe(find_recipe(name), check_paths=False, check_components=False)
        assert cfg.train.amp == "fp16" and eval_amp(cfg) == "fp32", name
