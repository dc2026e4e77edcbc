"""PromptSRC against its reference computation, muzairkhattak/PromptSRC.

The reference side re-states ``trainers/promptsrc.py`` (VLPromptLearner L72-170, CustomCLIP.forward
L185-211, forward_backward L297-316, the GPA of L264-270 and L320-360) and the IVLP blocks of
``clip/model.py`` (ResidualAttentionBlock_IVLP L229-256: deep text tokens replace the n tokens after [SOS],
deep visual tokens replace the last n; VisionTransformer.forward L394-425: visual tokens appended before
``ln_pre``), on a fresh open_clip model holding a copy of the tiny CLIP's weights (``ref_openclip``), with
its own prompt tensors loaded from copies of promptlab's. Nothing of promptlab runs on the reference side;
the comparison covers logits, every loss term and the gradients of every learned tensor, and GPA.
"""

from __future__ import annotations

import copy
import warnings

import numpy as np
import open_clip
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from promptlab.clip import FrozenCLIP
from promptlab.methods import PromptSRC
from promptlab.templates import resolve_templates

CLASSNAMES = ["cat", "sea_lion", "a very long class name with many words"]
TEMPLATES = ["a photo of a {}.", "a bad photo of a {}.", "a sculpture of a {}."]
pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: threads cost more than they save


class RefPromptSRC(nn.Module):
    def __init__(self, model: nn.Module, classnames: list[str], n_ctx: int, n_vis: int, templates: list[str]):
        super().__init__()
        self.model = model
        # VLPromptLearner L88-101 (CTX_INIT, n_ctx <= 4): the first n_ctx tokens of the words are learned,
        # the rest of them ("of a" for n_ctx 2) stay fixed words in front of the class name
        ctx_init = "a photo of a"
        with torch.no_grad():
            embedding = model.token_embedding(open_clip.tokenize(ctx_init))
        self.ctx = nn.Parameter(embedding[0, 1 : 1 + n_ctx, :].clone())
        names = [name.replace("_", " ") for name in classnames]
        self.tokenized_prompts = torch.cat([open_clip.tokenize(ctx_init + " " + n + ".") for n in names])
        with torch.no_grad():
            embedding = model.token_embedding(self.tokenized_prompts)
            all_teacher_features = []  # L120-128: raw features per template, mean over templates
            for single_template in templates:
                x = [single_template.replace("{}", name) for name in names]
                text_features = model.encode_text(torch.cat([open_clip.tokenize(p) for p in x]))
                all_teacher_features.append(text_features.unsqueeze(1))
        self.fixed_embeddings = torch.cat(all_teacher_features, dim=1).mean(dim=1)
        self.token_prefix, self.token_suffix = embedding[:, :1, :], embedding[:, 1 + n_ctx :, :]
        W, Wv = model.ln_final.weight.shape[0], model.visual.conv1.out_channels
        self.text_vpt = nn.Parameter(torch.empty(n_ctx, W))  # block 1's VPT_shallow (depth 2)
        self.vpt = nn.Parameter(torch.empty(n_vis, Wv))  # VisionTransformer.VPT
        self.vision_vpt = nn.Parameter(torch.empty(n_vis, Wv))  # block 1's VPT_shallow

    def text(self) -> torch.Tensor:
        ctx = self.ctx.unsqueeze(0).expand(len(self.token_prefix), -1, -1)
        x = torch.cat([self.token_prefix, ctx, self.token_suffix], dim=1) + self.model.positional_embedding
        for i, blk in enumerate(self.model.transformer.resblocks):
            if i == 1:  # ResidualAttentionBlock_IVLP L242-252
                n = self.text_vpt.shape[0]
                x = torch.cat([x[:, :1], self.text_vpt.expand(x.shape[0], -1, -1), x[:, 1 + n :]], dim=1)
            x = blk(x, attn_mask=self.model.attn_mask)
        x = self.model.ln_final(x)
        return x[torch.arange(x.shape[0]), self.tokenized_prompts.argmax(dim=-1)] @ self.model.text_projection

    def image(self, images: torch.Tensor) -> torch.Tensor:
        v = self.model.visual
        x = v.conv1(images).reshape(images.shape[0], v.conv1.out_channels, -1).permute(0, 2, 1)
        x = torch.cat([v.class_embedding + torch.zeros(x.shape[0], 1, x.shape[-1]), x], dim=1)
        x = x + v.positional_embedding
        x = torch.cat([x, self.vpt.expand(x.shape[0], -1, -1)], dim=1)  # L406-408, before ln_pre
        x = v.ln_pre(x)
        for i, blk in enumerate(v.transformer.resblocks):
            if i == 1:  # ResidualAttentionBlock_IVLP L234-241
                n = self.vision_vpt.shape[0]
                x = torch.cat([x[:, : x.shape[1] - n], self.vision_vpt.expand(x.shape[0], -1, -1)], dim=1)
            x = blk(x)
        return v.ln_post(x[:, 0]) @ v.proj

    def forward(self, image: torch.Tensor, label: torch.Tensor):
        """CustomCLIP.forward in training (L185-209)."""
        logit_scale = self.model.logit_scale.exp()
        text_features = self.text()
        image_features = self.image(image)
        image_features = image_features / image_features.norm(dim=-1, keepdim=True)
        text_features = text_features / text_features.norm(dim=-1, keepdim=True)
        logits = logit_scale * image_features @ text_features.t()
        fixed_embeddings = self.fixed_embeddings
        fixed_embeddings = fixed_embeddings / fixed_embeddings.norm(dim=-1, keepdim=True)
        with torch.no_grad():
            zero_shot_features = self.model.encode_image(image)  # ZS_image_encoder: unprompted CLIP
            zero_shot_features = zero_shot_features / zero_shot_features.norm(dim=-1, keepdim=True)
            zero_shot_logits = logit_scale * zero_shot_features @ fixed_embeddings.t()
        return (
            F.cross_entropy(logits, label),
            text_features,
            fixed_embeddings,
            zero_shot_features,
            image_features,
            zero_shot_logits,
            logits,
        )


def ref_loss(
    ref: RefPromptSRC, image: torch.Tensor, label: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """forward_backward L297-313 with TEXT_LOSS_WEIGHT 25, IMAGE_LOSS_WEIGHT 10; returns (loss, logits)."""
    (
        loss_ce,
        normalized_text_features,
        zs_clip_text_embeddings,
        zs_image_embedd,
        image_ft,
        zero_shot_logits,
        logits,
    ) = ref(image, label)
    loss_scl_text = F.l1_loss(normalized_text_features, zs_clip_text_embeddings, reduction="mean") * 25
    loss_scl_image = F.l1_loss(image_ft, zs_image_embedd, reduction="mean") * 10
    L_SCL_logits = (
        F.kl_div(
            F.log_softmax(logits / 1, dim=1),
            F.log_softmax(zero_shot_logits / 1, dim=1),
            reduction="sum",
            log_target=True,
        )
        * (1 * 1)
        / logits.numel()
    )
    L_SCL = L_SCL_logits + loss_scl_text + loss_scl_image
    return loss_ce + L_SCL, logits


def _ours(clip: FrozenCLIP, n_ctx_text: int = 4, **kw) -> PromptSRC:
    return PromptSRC(
        clip,
        CLASSNAMES,
        n_ctx_text=n_ctx_text,
        n_ctx_vision=3,
        prompt_depth_text=2,
        prompt_depth_vision=2,
        **kw,
    )


@pytest.mark.parametrize("n_ctx", [4, 2])
def test_promptsrc_equals_reference(
    tiny_clip: FrozenCLIP, ref_openclip: nn.Module, images: torch.Tensor, n_ctx: int
) -> None:
    torch.manual_seed(0)
    m = _ours(tiny_clip, n_ctx_text=n_ctx, templates=TEMPLATES)
    ref = RefPromptSRC(ref_openclip, CLASSNAMES, n_ctx=n_ctx, n_vis=3, templates=TEMPLATES)
    torch.testing.assert_close(m.ctx.detach(), ref.ctx.detach(), atol=0, rtol=0)  # the same initial words
    with torch.no_grad():
        g = torch.Generator().manual_seed(6)
        for p in m.trainable_parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g))
        s = m.prompt_state_dict()
        for mine, theirs in (("ctx", ref.ctx), ("vis_ctx", ref.vpt)):
            theirs.copy_(s[mine])
        ref.text_vpt.copy_(s["text_deep"][0])
        ref.vision_vpt.copy_(s["vis_deep"][0])
    labels = torch.tensor([2, 0, 1])
    m.train()
    logits = m(images)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. torch's "implicit dimension choice for log_softmax"
        loss = m.loss(logits, labels, images=images)
    want, ref_logits = ref_loss(ref, images, labels)
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(loss, want, atol=1e-5, rtol=1e-5)
    assert loss - F.cross_entropy(logits, labels) > 1e-3  # the regularisers are there
    loss.backward()
    want.backward()
    pairs = {"ctx": ref.ctx, "vis_ctx": ref.vpt}
    for mine, theirs in pairs.items():
        b = theirs.grad
        assert b.abs().max() > 1e-7, mine
        torch.testing.assert_close(m.get_parameter(mine).grad, b, atol=1e-5 * float(b.abs().max()), rtol=1e-4)
    for mine, theirs in ((m.text_deep, ref.text_vpt), (m.vis_deep, ref.vision_vpt)):
        b = theirs.grad
        assert b.abs().max() > 1e-7
        torch.testing.assert_close(mine.grad[0], b, atol=1e-5 * float(b.abs().max()), rtol=1e-4)


def test_promptsrc_templates_are_the_references() -> None:
    """trainers/imagenet_templates.py IMAGENET_TEMPLATES: 60 of CLIP's 80, "a photo of a {}." first."""
    t = resolve_templates("promptsrc60", None)
    assert len(t) == len(set(t)) == 60
    assert t[:5] == [
        "a photo of a {}.",
        "a bad photo of a {}.",
        "a photo of many {}.",
        "a sculpture of a {}.",
        "a photo of the hard to see {}.",
    ]
    assert "a plushie {}." not in t and "a tattoo of the {}." not in t  # two of the 20 left out


def ref_gpa(snapshots: list[dict[str, torch.Tensor]], mean: float, std: float) -> dict[str, torch.Tensor]:
    """build_model L263-270 + forward_backward L320-335 + state_dict_weighting / _add / get_gauss L338-360."""
    N = len(snapshots)
    gauss = lambda x: (1 / (std * np.sqrt(2 * np.pi))) * np.exp(-0.5 * ((x - mean) / std) ** 2)  # noqa: E731
    weights = np.array([gauss(a) for a in range(1, N + 1)])
    weights = weights / sum(weights)
    previous_model_gpa, step_counter = None, 1
    for state in snapshots:
        step_counter = step_counter + 1
        current_epoch_weight = weights[step_counter - 2]
        current_model_weights = copy.deepcopy(state)
        weighted = copy.deepcopy(current_model_weights)
        for key in current_model_weights:
            weighted[key] = current_model_weights[key] * current_epoch_weight
        if previous_model_gpa is None:
            previous_model_gpa = weighted
        else:
            for key in weighted:
                previous_model_gpa[key] = previous_model_gpa[key] + weighted[key]
    return previous_model_gpa


@pytest.mark.parametrize("epochs,mean,std", [(20, 15, 1), (6, 3, 2), (50, 30, 30)])
def test_gpa_equals_reference(tiny_clip: FrozenCLIP, epochs: int, mean: float, std: float) -> None:
    m = _ours(tiny_clip, gpa_mean=mean, gpa_std=std, templates=TEMPLATES)
    g = torch.Generator().manual_seed(2)
    snapshots = []
    for e in range(1, epochs + 1):  # each epoch "trains" the prompts somewhere else
        with torch.no_grad():
            for p in m.trainable_parameters():
                p.copy_(torch.randn(p.shape, generator=g))
        snapshots.append({k: v.clone() for k, v in m.prompt_state_dict().items()})
        if e == epochs // 2:  # a resumed run continues from the running sum in the checkpoint
            state = {k: v.clone() for k, v in m.training_state_dict().items()}
            m._gpa_sum = {}
            m.load_training_state_dict(state)
        m.end_epoch(e, epochs)
    want = ref_gpa(snapshots, mean, std)
    got = m.prompt_state_dict()
    assert set(got) == set(want)
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=1e-6, rtol=1e-6, msg=k)
    assert not torch.allclose(got["ctx"], snapshots[-1]["ctx"])  # not simply the last epoch's
    assert m.training_state_dict() == {}


def test_promptsrc_loss_needs_a_training_forward_pass(tiny_clip: FrozenCLIP, images: torch.Tensor) -> None:
    """loss() regularises a training forward pass: it takes the step's images from the batch (``images``
    in aux, what the engine passes) or else from the step's own encode_image, and refuses, saying why,
    when there was no training forward (nothing yet, one without gradient, one on the evaluation's
    cached text features) or no images (features given, none passed). Images seen without gradient
    are never used by a later step."""
    labels = torch.tensor([2, 0, 1])
    msg = r"^PromptSRC\.loss\(\) follows a training forward pass on images$"
    m = _ours(tiny_clip, templates=TEMPLATES)
    with pytest.raises(RuntimeError, match=msg):
        m.loss(torch.zeros(3, 3), labels, images=images)  # nothing run yet
    with torch.no_grad():
        feats = m.encode_image(images)
    fresh = _ours(tiny_clip, templates=TEMPLATES)
    logits = fresh(image_features=feats)  # a training forward from features (the text side has gradient)
    with pytest.raises(RuntimeError, match=msg):  # ... and no images anywhere
        fresh.loss(logits, labels)
    with torch.no_grad():
        m(images)  # an evaluation pass on these images
    logits = m(image_features=feats)
    with pytest.raises(RuntimeError, match=msg):  # the evaluation's images are not the step's
        m.loss(logits, labels)
    with torch.no_grad():
        logits = m(images)
    with pytest.raises(RuntimeError, match=msg):  # no training forward
        m.loss(logits, labels, images=images)
    with m.cached_text_features():  # gradient on, text features of the evaluation cache
        logits = m(images)
    with pytest.raises(RuntimeError, match=msg):
        m.loss(logits, labels, images=images)
    from_batch = m.loss(m(image_features=feats), labels, images=images)
    from_step = m.loss(m(images), labels)
    torch.testing.assert_close(from_batch, from_step, atol=0, rtol=0)


def test_promptsrc_head_takes_the_backbone_output_in_any_dtype(
    tiny_clip: FrozenCLIP, images: torch.Tensor, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under bf16 autocast (``train.amp=bf16``) the towers return bf16 features; the head normalises the
    prompted image, prompted text and frozen image features in its own dtype (fp32), so logits and loss
    are exactly those of the same features handed over in fp32."""
    m = _ours(tiny_clip, templates=TEMPLATES)
    labels = torch.tensor([2, 0, 1])

    def step() -> tuple[torch.Tensor, torch.Tensor]:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = m(images)
            return logits, m.loss(logits, labels)

    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert m.encode_image(images).dtype == torch.bfloat16  # what the head is given
    logits, loss = step()
    for name in ("encode_image", "text_features", "frozen_image_features"):
        method = getattr(m, name)
        monkeypatch.setattr(m, name, lambda *a, _f=method: _f(*a).float())
    fp32_logits, fp32_loss = step()
    assert loss.dtype == fp32_loss.dtype == torch.float32
    torch.testing.assert_close(logits, fp32_logits, atol=0, rtol=0)
    torch.testing.assert_close(loss, fp32_loss, atol=0, rtol=0)


def test_promptsrc_arguments_checked(tiny_clip: FrozenCLIP) -> None:
    """Errors name the method and the value at fault; ``templates="dataset"`` takes the dataset's template."""
    with pytest.raises(ValueError, match=r"^PromptSRC needs prompt_depth_text >= 1"):
        PromptSRC(tiny_clip, CLASSNAMES, prompt_depth_text=0)
    for std in (0.0, -1.0):
        with pytest.raises(
            ValueError, match=rf"^PromptSRC gpa_std={std}: the Gaussian needs a positive width$"
        ):
            _ours(tiny_clip, gpa_std=std)
    assert not _ours(tiny_clip, gpa=False, gpa_std=0.0).gpa
    pets = "a photo of a {}, a type of pet."
    m = _ours(tiny_clip, templates="dataset", template=pets)
    assert m.templates == [pets]
    torch.testing.assert_close(m._fixed, _ours(tiny_clip, templates=[pets])._fixed, atol=0, rtol=0)


def test_gpa_averages_the_trainable_prompts_only(tiny_clip: FrozenCLIP) -> None:
    """GPA sums the trainable prompt tensors: not a prompt tensor someone froze, not a backbone part made
    trainable (the backbone stays exact), and the running sum restored from a checkpoint lives on the
    prompts' device (the ``meta`` device stands in for an accelerator)."""
    clip = copy.deepcopy(tiny_clip)
    clip.unfreeze(["model.ln_final"])
    m = _ours(clip, gpa_mean=2, gpa_std=1, templates=TEMPLATES)
    m.vis_deep.requires_grad_(False)
    frozen = {k: v.clone() for k, v in m.state_dict().items() if k.startswith("clip.") or k == "vis_deep"}
    m.end_epoch(1, 2)
    assert set(m.training_state_dict()) == {"ctx", "text_deep", "vis_ctx"}
    state = {k: v.clone() for k, v in m.training_state_dict().items()}
    with torch.no_grad():
        for p in m.parameters():
            p.add_(1.0)
    m.end_epoch(2, 2)
    after = m.state_dict()
    for k, v in frozen.items():
        torch.testing.assert_close(after[k], v + 1.0, atol=0, rtol=0, msg=k)
    m.to("meta")
    m.load_training_state_dict(state)
    assert {v.device.type for v in m.training_state_dict().values()} == {"meta"}
