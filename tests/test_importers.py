"""Importing checkpoints of the Dassl-based references: written as their trainers write them, read safely.

The checkpoints are produced here the way the references produce them, without importing Dassl:
- the model is the reference's (its parameter and buffer names, dtypes and shapes), transcribed below;
- the optimizer and scheduler are Dassl's (``dassl/optim/optimizer.py``: torch's SGD over the registered
  model; ``dassl/optim/lr_scheduler.py``: CosineAnnealingLR wrapped in ConstantWarmupScheduler, whose
  state_dict pickles the successor *object* and, through it, the SGD object), stepped per epoch;
- the file is written by a transcription of ``dassl/utils/torchtools.py`` save_checkpoint, called as
  ``dassl/engine/trainer.py`` save_model calls it (run layout ``<run>/<model name>/model.pth.tar-N``,
  ``checkpoint``, ``model-best.pth.tar``).
The expected logits come from transcriptions of the references' forward passes (trainers/*.py and the
multimodal-prompt-learning ``clip/model.py``), run on the tiny CLIP's open_clip modules with the weights
copied from the trained reference model, never through promptlab's method classes.
"""

from __future__ import annotations

import copy
import os
import os.path as osp
import pickle
import shutil
import zipfile
from collections import OrderedDict
from pathlib import Path

import open_clip
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from test_deep_prompts import ref_image, ref_text  # transcriptions of the multimodal reference's encoders

from promptlab.cli import main
from promptlab.clip import FrozenCLIP
from promptlab.dassl_checkpoint import UnsafeCheckpointError, read_dassl_checkpoint
from promptlab.export import import_coop_checkpoint, load_prompts
from promptlab.importers import find_checkpoint, import_checkpoint
from promptlab.methods import IVLP, CoCoOp, CoOp, KgCoOp, MaPLe, PromptSRC

CLASSES = ["cat", "golden_retriever", "sports car", "tree"]
_tokenizer = open_clip.tokenizer.SimpleTokenizer()


# ---------------------------------------------------------------------- Dassl, transcribed
class ConstantWarmupScheduler(torch.optim.lr_scheduler.LRScheduler):
    """dassl/optim/lr_scheduler.py _BaseWarmupScheduler + ConstantWarmupScheduler (L8-55)."""

    def __init__(self, optimizer, successor, warmup_epoch, cons_lr, last_epoch=-1):
        self.cons_lr = cons_lr
        self.successor = successor
        self.warmup_epoch = warmup_epoch
        self.verbose = False  # Dassl passes verbose=False; torch < 2.7 kept it in __dict__
        super().__init__(optimizer, last_epoch)

    def get_lr(self):
        if self.last_epoch >= self.warmup_epoch:
            return self.successor.get_last_lr()
        return [self.cons_lr for _ in self.base_lrs]

    def step(self, epoch=None):
        if self.last_epoch >= self.warmup_epoch:
            self.successor.step()
            self._last_lr = self.successor.get_last_lr()
        else:
            super().step()


def build_optim_and_sched(model: nn.Module, max_epoch: int = 5, warmup: bool = True):
    """build_optimizer (sgd branch) + build_lr_scheduler (cosine, constant warm-up) with the configs' values."""
    optim = torch.optim.SGD(
        model.parameters(), lr=0.002, momentum=0.9, weight_decay=5e-4, dampening=0, nesterov=False
    )
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(optim, float(max_epoch))
    if warmup:
        sched = ConstantWarmupScheduler(optim, sched, 1, 1e-5)
    return optim, sched


def save_checkpoint(state: dict, save_dir: str, is_best: bool = False, model_name: str = "") -> None:
    """dassl/utils/torchtools.py save_checkpoint (L28-71)."""
    os.makedirs(save_dir, exist_ok=True)
    new_state_dict = OrderedDict()
    for k, v in state["state_dict"].items():
        if k.startswith("module."):
            k = k[7:]
        new_state_dict[k] = v
    state["state_dict"] = new_state_dict
    epoch = state["epoch"]
    if not model_name:
        model_name = "model.pth.tar-" + str(epoch)
    fpath = osp.join(save_dir, model_name)
    torch.save(state, fpath)
    with open(osp.join(save_dir, "checkpoint"), "w+") as checkpoint:
        checkpoint.write(f"{osp.basename(fpath)}\n")
    if is_best:
        shutil.copy(fpath, osp.join(osp.dirname(fpath), "model-best.pth.tar"))


def train_and_save(model: nn.Module, run: Path, name: str, epochs: int = 3, warmup: bool = True) -> None:
    """A few epochs of SGD on the trainable tensors, saved as dassl/engine/trainer.py save_model does (L118-145)."""
    optim, sched = build_optim_and_sched(model, warmup=warmup)
    g = torch.Generator().manual_seed(3)
    for epoch in range(epochs):
        for _ in range(2):
            optim.zero_grad()
            loss = sum(
                (p.float() * torch.randn(p.shape, generator=g)).sum()
                for p in model.parameters()
                if p.requires_grad
            )
            loss.backward()
            optim.step()
        sched.step()
        save_checkpoint(
            {
                "state_dict": model.state_dict(),
                "epoch": epoch + 1,
                "optimizer": optim.state_dict(),
                "scheduler": sched.state_dict(),
                "val_result": None,
            },
            osp.join(run, name),
            is_best=epoch == 1,
        )


# ---------------------------------------------------------------------- the references' models, transcribed
def _fp16_exact(t: torch.Tensor) -> torch.Tensor:
    return t.half().float()


class PromptLearner(nn.Module):
    """KaiyangZhou/CoOp trainers/coop.py PromptLearner (L62-185), with CoCoOp's meta-net (trainers/cocoop.py
    L94-102) and KgCoOp's unused bias_vectors / meta_net (htyao89/KgCoOp trainers/kgcoop.py) as options."""

    def __init__(
        self,
        clip_model,
        classnames,
        n_ctx=16,
        ctx_init="",
        csc=False,
        position="end",
        dtype=torch.float32,
        extra="",
    ):
        super().__init__()
        n_cls = len(classnames)
        ctx_dim = clip_model.ln_final.weight.shape[0]
        if ctx_init:
            n_ctx = len(ctx_init.split(" "))
            with torch.no_grad():
                embedding = clip_model.token_embedding(open_clip.tokenize(ctx_init)).type(dtype)
            ctx_vectors = embedding[0, 1 : 1 + n_ctx, :]
            prompt_prefix = ctx_init
        else:
            ctx_vectors = (
                torch.empty(n_cls, n_ctx, ctx_dim, dtype=dtype)
                if csc
                else torch.empty(n_ctx, ctx_dim, dtype=dtype)
            )
            nn.init.normal_(ctx_vectors, std=0.02)
            prompt_prefix = " ".join(["X"] * n_ctx)
        self.ctx = nn.Parameter(ctx_vectors)
        if extra == "cocoop":
            vis_dim = clip_model.text_projection.shape[1]  # visual.output_dim
            self.meta_net = nn.Sequential(
                OrderedDict(
                    [
                        ("linear1", nn.Linear(vis_dim, vis_dim // 16)),
                        ("relu", nn.ReLU(inplace=True)),
                        ("linear2", nn.Linear(vis_dim // 16, ctx_dim)),
                    ]
                )
            ).to(dtype)
        if extra == "kgcoop":
            self.bias_vectors = nn.Parameter(nn.init.normal_(torch.empty(1, 512, dtype=dtype), std=0.02))
            self.meta_net = nn.Sequential(
                OrderedDict([("linear1", nn.Linear(512, 512)), ("relu", nn.ReLU(inplace=True))])
            ).to(dtype)
        classnames = [name.replace("_", " ") for name in classnames]
        self.name_lens = [len(_tokenizer.encode(name)) for name in classnames]
        self.tokenized_prompts = torch.cat(
            [open_clip.tokenize(prompt_prefix + " " + name + ".") for name in classnames]
        )
        with torch.no_grad():
            embedding = clip_model.token_embedding(self.tokenized_prompts).type(dtype)
        self.register_buffer("token_prefix", embedding[:, :1, :])
        self.register_buffer("token_suffix", embedding[:, 1 + n_ctx :, :])
        self.n_cls, self.n_ctx, self.class_token_position = n_cls, n_ctx, position

    def forward(self, ctx=None):
        ctx = self.ctx if ctx is None else ctx
        if ctx.dim() == 2:
            ctx = ctx.unsqueeze(0).expand(self.n_cls, -1, -1)
        prefix, suffix = self.token_prefix, self.token_suffix
        if self.class_token_position == "end":
            return torch.cat([prefix, ctx, suffix], dim=1)
        prompts = []
        for i in range(self.n_cls):
            name_len = self.name_lens[i]
            prefix_i, class_i, suffix_i = (
                prefix[i : i + 1],
                suffix[i : i + 1, :name_len],
                suffix[i : i + 1, name_len:],
            )
            if self.class_token_position == "middle":
                half = self.n_ctx // 2
                prompts.append(
                    torch.cat(
                        [prefix_i, ctx[i : i + 1, :half], class_i, ctx[i : i + 1, half:], suffix_i], dim=1
                    )
                )
            else:
                prompts.append(torch.cat([prefix_i, class_i, ctx[i : i + 1], suffix_i], dim=1))
        return torch.cat(prompts, dim=0)


def text_encoder(clip_model, prompts, tokenized, deep=()):
    """TextEncoder.forward (trainers/coop.py L40-52); ``deep`` as ResidualAttentionBlock_MaPLe / _IVLP:
    replacing the tokens after [SOS] before blocks 1..len(deep), cast .half() there (clip/model.py
    L236-247, L292-303), which in an fp32 tower is a rounding to fp16."""
    return ref_text(clip_model, prompts, tokenized, [d.half().float() for d in deep])


def image_encoder(clip_model, images, shallow=None, deep=()):
    """VisionTransformer(_MaPLe).forward (clip/model.py L380-410): prompts appended before ln_pre and
    replaced before blocks 1..len(deep), each cast .half() where it enters."""
    shallow = None if shallow is None else shallow.half().float()
    return ref_image(clip_model, images, shallow, [d.half().float() for d in deep])


def clip_logits(clip_model, image_features, text_features):
    """CustomCLIP.forward's last lines (trainers/coop.py L206-212)."""
    image_features = image_features / image_features.norm(dim=-1, keepdim=True)
    text_features = text_features / text_features.norm(dim=-1, keepdim=True)
    return clip_model.logit_scale.exp() * image_features @ text_features.t()


def load_model(ref: nn.Module, trained: nn.Module) -> None:
    """The trainers' load_model: the saved state without token_prefix / token_suffix, strict=False."""
    sd = {k: v for k, v in trained.state_dict().items() if not k.endswith(("token_prefix", "token_suffix"))}
    ref.load_state_dict(sd, strict=False)


def _perturb(model: nn.Module) -> None:
    """Move every trainable tensor well away from its initial value, as a real training run does."""
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(_fp16_exact(p.float() + 0.1 * torch.randn(p.shape, generator=g)))


# ---------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def clip_model(tiny_clip: FrozenCLIP) -> nn.Module:
    return tiny_clip.model  # open_clip CLIP; the reference side uses its modules and weights


@pytest.fixture(scope="module")
def feats(tiny_clip: FrozenCLIP) -> torch.Tensor:
    return torch.randn(5, tiny_clip.embed_dim, generator=torch.Generator().manual_seed(0))  # [B, D]


def _frozen_copy(clip_model: nn.Module, dtype: torch.dtype) -> nn.Module:
    m = copy.deepcopy(clip_model).to(dtype)
    m.requires_grad_(False)
    return m


# ---------------------------------------------------------------------- CoOp
COOP_CASES = {  # the five CoOp configurations of issue 26
    "random16": dict(n_ctx=16),
    "a_photo_of_a": dict(ctx_init="a photo of a"),
    "a_photo_of_a_csc": dict(ctx_init="a photo of a", csc=True),  # CoOp ignores CSC with words: unified
    "csc16": dict(n_ctx=16, csc=True),
    "middle8": dict(n_ctx=8, position="middle"),
}


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
@pytest.mark.parametrize("case", sorted(COOP_CASES))
def test_coop_checkpoint_reproduces_reference_logits(
    case, dtype, tiny_clip, clip_model, feats, tmp_path
) -> None:
    kw = COOP_CASES[case]
    torch.manual_seed(0)
    learner = PromptLearner(_frozen_copy(clip_model, dtype), CLASSES, dtype=dtype, **kw)
    _perturb(learner)
    run = tmp_path / "output" / "seed1"
    train_and_save(learner, run, "prompt_learner")
    assert sorted(os.listdir(run / "prompt_learner")) == [
        "checkpoint",
        "model-best.pth.tar",
        "model.pth.tar-1",
        "model.pth.tar-2",
        "model.pth.tar-3",
    ]
    ck = torch.load(run / "prompt_learner" / "model.pth.tar-3", weights_only=False)  # the test's own file
    assert (
        type(ck["scheduler"]["successor"]).__name__ == "CosineAnnealingLR"
        and ck["state_dict"]["ctx"].dtype == dtype
    )

    position = kw.get("position", "end")
    for where in (run, run / "prompt_learner", run / "prompt_learner" / "model.pth.tar-3"):
        m = import_checkpoint(where, tiny_clip, CLASSES, source="coop", class_token_position=position)
        assert isinstance(m, CoOp) and m.csc == (learner.ctx.dim() == 3)
        torch.testing.assert_close(m.ctx, learner.ctx.detach().float(), rtol=0, atol=0)  # the last epoch

    ref = PromptLearner(
        clip_model, CLASSES, **kw
    )  # evaluation: rebuilt on the fp32 model, learned tensors loaded
    load_model(ref, learner)
    with torch.no_grad():
        want = clip_logits(clip_model, feats, text_encoder(clip_model, ref(), ref.tokenized_prompts))
        got = m(image_features=feats)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    if case == "middle8":  # the position matters and is honoured
        end = import_checkpoint(run, tiny_clip, CLASSES, source="coop")
        with torch.no_grad():
            assert (end(image_features=feats) - want).abs().max() > 1e-3


def test_coop_epoch_choice_and_errors(tiny_clip, clip_model, tmp_path) -> None:
    learner = PromptLearner(_frozen_copy(clip_model, torch.float16), CLASSES, n_ctx=4, dtype=torch.float16)
    _perturb(learner)
    run = tmp_path / "run"
    snapshots = {}
    optim, sched = build_optim_and_sched(learner)
    for epoch in range(3):
        with torch.no_grad():
            learner.ctx.add_(0.01)
        snapshots[epoch + 1] = learner.ctx.detach().float().clone()
        save_checkpoint(
            {
                "state_dict": learner.state_dict(),
                "epoch": epoch + 1,
                "optimizer": optim.state_dict(),
                "scheduler": sched.state_dict(),
                "val_result": 0.5,
            },
            str(run / "prompt_learner"),
            is_best=epoch == 0,
        )
    d = run / "prompt_learner"
    assert find_checkpoint(run) == d / "model.pth.tar-3"
    assert find_checkpoint(run, epoch=2) == d / "model.pth.tar-2"
    assert find_checkpoint(run, epoch="best") == d / "model-best.pth.tar"
    assert torch.equal(import_checkpoint(run, tiny_clip, CLASSES, epoch="best").ctx, snapshots[1])
    (d / "checkpoint").write_text("model.pth.tar-2\n")  # Dassl's pointer to the last saved file wins
    assert torch.equal(import_checkpoint(run, tiny_clip, CLASSES).ctx, snapshots[2])
    with pytest.raises(FileNotFoundError, match=r"no model\.pth\.tar-9 \(epochs saved: \[1, 2, 3\]\)"):
        find_checkpoint(run, epoch=9)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no Dassl checkpoint \(prompt_learner/model\.pth\.tar-N"):
        find_checkpoint(tmp_path / "empty")
    # the old API name is kept
    assert torch.equal(
        import_coop_checkpoint(run / "prompt_learner" / "model.pth.tar-3", tiny_clip, CLASSES).ctx,
        snapshots[3],
    )


def test_coop_refusals_name_the_file(tiny_clip, clip_model, tmp_path) -> None:
    csc = PromptLearner(_frozen_copy(clip_model, torch.float32), CLASSES, n_ctx=4, csc=True)
    train_and_save(csc, tmp_path / "csc", "prompt_learner", epochs=1)
    with pytest.raises(ValueError, match=r"model\.pth\.tar-1.*4 classes.*2 class names"):
        import_checkpoint(tmp_path / "csc", tiny_clip, CLASSES[:2])
    wide = copy.deepcopy(clip_model)
    wide.ln_final = nn.LayerNorm(48)
    wide.token_embedding = nn.Embedding(49408, 48)
    train_and_save(PromptLearner(wide, CLASSES, n_ctx=4), tmp_path / "wide", "prompt_learner", epochs=1)
    with pytest.raises(ValueError, match=r"model\.pth\.tar-1.*width 48.*width 32"):
        import_checkpoint(tmp_path / "wide", tiny_clip, CLASSES)
    with pytest.raises(
        ValueError, match=r"model\.pth\.tar-1: no 'prompt_learner\.ctx'.*keys: ctx, token_prefix"
    ):
        import_checkpoint(
            tmp_path / "csc" / "prompt_learner" / "model.pth.tar-1", tiny_clip, CLASSES, source="ivlp"
        )
    with pytest.raises(ValueError, match="unknown source 'prograd'"):
        import_checkpoint(tmp_path / "csc", tiny_clip, CLASSES, source="prograd")


def test_checkpoint_without_warmup_and_single_file(tiny_clip, clip_model, feats, tmp_path) -> None:
    """WARMUP_EPOCH 0: the scheduler state is a plain dict; and a lone file outside any run layout."""
    learner = PromptLearner(_frozen_copy(clip_model, torch.float32), CLASSES, n_ctx=4)
    _perturb(learner)
    train_and_save(learner, tmp_path / "run", "prompt_learner", epochs=2, warmup=False)
    lone = tmp_path / "downloaded.pth"
    shutil.copy(tmp_path / "run" / "prompt_learner" / "model.pth.tar-2", lone)
    m = import_checkpoint(lone, tiny_clip, CLASSES)
    assert torch.equal(m.ctx, learner.ctx.detach())


# ---------------------------------------------------------------------- CoCoOp, KgCoOp
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
def test_cocoop_checkpoint_reproduces_reference_logits(dtype, tiny_clip, clip_model, feats, tmp_path) -> None:
    torch.manual_seed(1)
    learner = PromptLearner(
        _frozen_copy(clip_model, dtype), CLASSES, ctx_init="a photo of a", dtype=dtype, extra="cocoop"
    )
    _perturb(learner)
    train_and_save(learner, tmp_path, "prompt_learner")
    m = import_checkpoint(tmp_path, tiny_clip, CLASSES, source="cocoop")
    assert isinstance(m, CoCoOp) and m.n_ctx == 4

    ref = PromptLearner(clip_model, CLASSES, ctx_init="a photo of a", extra="cocoop")
    load_model(ref, learner)
    # trainers/cocoop.py PromptLearner.forward (L143-159) + CustomCLIP.forward (L172-194), per image
    with torch.no_grad():
        imf = feats / feats.norm(dim=-1, keepdim=True)
        bias = ref.meta_net(imf).unsqueeze(1)  # [B, 1, W]
        ctx_shifted = ref.ctx.unsqueeze(0) + bias  # [B, n_ctx, W]
        rows = []
        for ctx_i, imf_i in zip(ctx_shifted, imf):
            pts_i = torch.cat(
                [ref.token_prefix, ctx_i.unsqueeze(0).expand(ref.n_cls, -1, -1), ref.token_suffix], dim=1
            )
            txt = text_encoder(clip_model, pts_i, ref.tokenized_prompts)
            txt = txt / txt.norm(dim=-1, keepdim=True)
            rows.append(clip_model.logit_scale.exp() * imf_i @ txt.t())
        want = torch.stack(rows)
        torch.testing.assert_close(m(image_features=feats), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
def test_kgcoop_checkpoint_reproduces_reference_logits(dtype, tiny_clip, clip_model, feats, tmp_path) -> None:
    torch.manual_seed(2)
    # CTX_INIT: True -> always "a photo of a" (htyao89/KgCoOp trainers/kgcoop.py PromptLearner)
    learner = PromptLearner(
        _frozen_copy(clip_model, dtype), CLASSES, ctx_init="a photo of a", dtype=dtype, extra="kgcoop"
    )
    for name, p in learner.named_parameters():
        p.requires_grad_("ctx" in name)  # KgCoOp.build_model: only names containing "ctx" train
    _perturb(learner)
    train_and_save(learner, tmp_path, "prompt_learner")
    assert {"bias_vectors", "meta_net.linear1.weight"} <= set(
        torch.load(tmp_path / "prompt_learner" / "model.pth.tar-3", weights_only=False)["state_dict"]
    )
    m = import_checkpoint(tmp_path, tiny_clip, CLASSES, source="kgcoop", template="a photo of a {}.")
    assert isinstance(m, KgCoOp) and m.n_ctx == 4
    ref = PromptLearner(clip_model, CLASSES, ctx_init="a photo of a", extra="kgcoop")
    load_model(ref, learner)
    with torch.no_grad():  # CustomCLIP.forward's logits (the meta-net and bias vectors are not used)
        want = clip_logits(clip_model, feats, text_encoder(clip_model, ref(), ref.tokenized_prompts))
        torch.testing.assert_close(m(image_features=feats), want, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------- MaPLe, IVLP
class _TextEncoder(nn.Module):
    """The parameters trainers/maple.py TextEncoder holds (its state-dict names under text_encoder.)."""

    def __init__(self, clip_model):
        super().__init__()
        self.transformer = clip_model.transformer
        self.positional_embedding = clip_model.positional_embedding
        self.ln_final = clip_model.ln_final
        self.text_projection = clip_model.text_projection


class MultiModalPromptLearner(PromptLearner):
    """muzairkhattak/multimodal-prompt-learning trainers/maple.py MultiModalPromptLearner (L70-131)."""

    def __init__(
        self, clip_model, classnames, n_ctx=2, ctx_init="a photo of a", depth=2, dtype=torch.float32
    ):
        super().__init__(clip_model, classnames, n_ctx=16, dtype=dtype)  # buffers rebuilt below
        ctx_dim = clip_model.ln_final.weight.shape[0]
        vis_width = clip_model.visual.conv1.out_channels  # the reference's hard-coded 768 (ViT-B/16)
        with torch.no_grad():
            embedding = clip_model.token_embedding(open_clip.tokenize(ctx_init)).type(dtype)
        self.proj = nn.Linear(ctx_dim, vis_width).half()  # always .half() in the reference
        self.ctx = nn.Parameter(embedding[0, 1 : 1 + n_ctx, :])
        self.compound_prompts_text = nn.ParameterList(
            [
                nn.Parameter(nn.init.normal_(torch.empty(n_ctx, ctx_dim), std=0.02)) for _ in range(depth - 1)
            ]  # 512 in the reference
        )
        single_layer = nn.Linear(ctx_dim, vis_width)
        self.compound_prompt_projections = nn.ModuleList(
            [copy.deepcopy(single_layer) for _ in range(depth - 1)]
        )
        names = [name.replace("_", " ") for name in classnames]
        self.tokenized_prompts = torch.cat(
            [open_clip.tokenize(ctx_init + " " + name + ".") for name in names]
        )
        with torch.no_grad():
            embedding = clip_model.token_embedding(self.tokenized_prompts).type(dtype)
        self.token_prefix = embedding[:, :1, :]
        self.token_suffix = embedding[:, 1 + n_ctx :, :]
        self.n_ctx = n_ctx


class MapleCLIP(nn.Module):
    """trainers/maple.py CustomCLIP (L134-160): the whole model is what MaPLe registers and saves."""

    def __init__(self, clip_model, dtype, **kw):
        super().__init__()
        clip_model = _frozen_copy(clip_model, dtype)
        self.prompt_learner = MultiModalPromptLearner(clip_model, CLASSES, dtype=dtype, **kw)
        self.image_encoder = clip_model.visual
        self.text_encoder = _TextEncoder(clip_model)
        self.logit_scale = clip_model.logit_scale


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "amp"])
def test_maple_checkpoint_reproduces_reference_logits(dtype, tiny_clip, clip_model, images, tmp_path) -> None:
    torch.manual_seed(3)
    model = MapleCLIP(clip_model, dtype, depth=2)
    _perturb(model)
    train_and_save(model, tmp_path, "MultiModalPromptLearner")
    sd = torch.load(tmp_path / "MultiModalPromptLearner" / "model.pth.tar-3", weights_only=False)[
        "state_dict"
    ]
    assert "image_encoder.conv1.weight" in sd and "prompt_learner.compound_prompt_projections.0.weight" in sd
    m = import_checkpoint(tmp_path, tiny_clip, CLASSES, source="maple")
    assert isinstance(m, MaPLe) and m.hparams["prompt_depth"] == 2 and m.hparams["ctx_init"] == "a photo of a"

    pl = MultiModalPromptLearner(clip_model, CLASSES, depth=2)  # evaluation on the fp32 model
    load_model(nn.ModuleDict({"prompt_learner": pl}), model)
    with torch.no_grad():
        # MultiModalPromptLearner.forward (L118-131); proj is computed in fp32 here from its fp16 weights
        shared_ctx = F.linear(pl.ctx, pl.proj.weight.float(), pl.proj.bias.float())
        visual_deep = [layer(p) for layer, p in zip(pl.compound_prompt_projections, pl.compound_prompts_text)]
        txt = text_encoder(clip_model, pl(), pl.tokenized_prompts, list(pl.compound_prompts_text))
        img = image_encoder(clip_model, images, shared_ctx, visual_deep)
        want = clip_logits(clip_model, img, txt)
        got = m(images)
        # The reference rounds its deep prompts to fp16 at use (.half()), promptlab keeps fp32: a difference
        # of ~5e-5 here; a wrong or missing tensor moves the logits by far more (checked next).
        torch.testing.assert_close(got, want, rtol=0, atol=5e-4)
        m.deep_proj[0].weight.add_(
            0.05 * torch.randn(m.deep_proj[0].weight.shape, generator=torch.Generator().manual_seed(0))
        )
        assert (m(images) - want).abs().max() > 5e-3


def _add_vpt(module: nn.Module, name: str, n: int, width: int) -> None:
    module.register_parameter(name, nn.Parameter(nn.init.normal_(torch.empty(n, width), std=0.02)))


class IVLPCLIP(nn.Module):
    """trainers/independentVL.py CustomCLIP (L143-167) over clip/model.py with design_details for IVLP:
    VisionTransformer.VPT [n_v, Wv] and ResidualAttentionBlock_IVLP.VPT_shallow in blocks 1..depth-1 (fp32)."""

    def __init__(self, clip_model, dtype, n_text=2, n_vis=3, depth_text=2, depth_vis=2):
        super().__init__()
        clip_model = _frozen_copy(clip_model, dtype)
        self.prompt_learner = PromptLearner(clip_model, CLASSES, dtype=dtype, n_ctx=16)
        with torch.no_grad():  # VLPromptLearner (L62-120): "a photo of a" prefix, first n_text tokens learned
            emb = clip_model.token_embedding(open_clip.tokenize("a photo of a")).type(dtype)
            names = [c.replace("_", " ") for c in CLASSES]
            self.prompt_learner.tokenized_prompts = torch.cat(
                [open_clip.tokenize(f"a photo of a {c}.") for c in names]
            )
            full = clip_model.token_embedding(self.prompt_learner.tokenized_prompts).type(dtype)
        self.prompt_learner.ctx = nn.Parameter(emb[0, 1 : 1 + n_text])
        self.prompt_learner.token_prefix, self.prompt_learner.token_suffix = (
            full[:, :1],
            full[:, 1 + n_text :],
        )
        self.image_encoder = clip_model.visual
        self.text_encoder = _TextEncoder(clip_model)
        self.logit_scale = clip_model.logit_scale
        if depth_vis > 0:
            _add_vpt(self.image_encoder, "VPT", n_vis, self.image_encoder.conv1.out_channels)
        for i in range(1, depth_vis):
            _add_vpt(
                self.image_encoder.transformer.resblocks[i],
                "VPT_shallow",
                n_vis,
                self.image_encoder.conv1.out_channels,
            )
        for i in range(1, depth_text):
            _add_vpt(
                self.text_encoder.transformer.resblocks[i],
                "VPT_shallow",
                n_text,
                clip_model.ln_final.weight.shape[0],
            )


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
@pytest.mark.parametrize("depth_vis", [2, 0], ids=["vl", "language_only"])
def test_ivlp_checkpoint_reproduces_reference_logits(
    dtype, depth_vis, tiny_clip, clip_model, images, tmp_path
) -> None:
    torch.manual_seed(4)
    model = IVLPCLIP(clip_model, dtype, depth_vis=depth_vis)
    for name, p in model.named_parameters():  # IVLP.build_model: prompt_learner and VPT train
        p.requires_grad_("prompt_learner" in name or "VPT" in name)
    _perturb(model)
    with torch.no_grad():  # fp32 parameters are not fp16-exact after real training: keep a remainder
        for name, p in model.named_parameters():
            if "VPT" in name:
                p.add_(1e-4 * torch.randn(p.shape))
    train_and_save(model, tmp_path, "VLPromptLearner")
    m = import_checkpoint(tmp_path, tiny_clip, CLASSES, source="ivlp")
    assert isinstance(m, IVLP)
    assert (m.hparams["prompt_depth_text"], m.hparams["prompt_depth_vision"]) == (2, depth_vis)

    trained = dict(model.named_parameters())
    with torch.no_grad():
        ctx = trained["prompt_learner.ctx"].float()
        ref_pl = PromptLearner(clip_model, CLASSES, n_ctx=2)
        ref_pl.tokenized_prompts = torch.cat(
            [open_clip.tokenize(f"a photo of a {c.replace('_', ' ')}.") for c in CLASSES]
        )
        full = clip_model.token_embedding(ref_pl.tokenized_prompts)
        prompts = torch.cat([full[:, :1], ctx.expand(len(CLASSES), -1, -1), full[:, 3:]], dim=1)
        txt = text_encoder(
            clip_model,
            prompts,
            ref_pl.tokenized_prompts,
            [trained["text_encoder.transformer.resblocks.1.VPT_shallow"]],
        )
        if depth_vis:
            img = image_encoder(
                clip_model,
                images,
                trained["image_encoder.VPT"],
                [trained["image_encoder.transformer.resblocks.1.VPT_shallow"]],
            )
        else:
            img = image_encoder(clip_model, images)
        want = clip_logits(clip_model, img, txt)
        torch.testing.assert_close(m(images), want, rtol=1e-5, atol=1e-5)


def test_promptsrc_checkpoint_imports_as_its_ivlp_model(tiny_clip, clip_model, images, tmp_path) -> None:
    """muzairkhattak/PromptSRC saves the same CustomCLIP names as IVLP (trainers/promptsrc.py L173-183,
    register_model "VLPromptLearner" L261): the prompts import into PromptSRC with IVLP's logits."""
    torch.manual_seed(4)
    model = IVLPCLIP(clip_model, torch.float16, depth_vis=2)
    for name, p in model.named_parameters():
        p.requires_grad_("prompt_learner" in name or "VPT" in name)
    _perturb(model)
    train_and_save(model, tmp_path, "VLPromptLearner")
    m = import_checkpoint(tmp_path, tiny_clip, CLASSES, source="promptsrc")
    assert isinstance(m, PromptSRC)
    assert (m.hparams["prompt_depth_text"], m.hparams["prompt_depth_vision"]) == (2, 2)
    ivlp = import_checkpoint(tmp_path, tiny_clip, CLASSES, source="ivlp")
    with torch.no_grad():
        torch.testing.assert_close(m(images), ivlp(images), rtol=0, atol=0)


# ---------------------------------------------------------------------- what the reader accepts and refuses
def _coop_file(tmp_path: Path, clip_model: nn.Module, **state) -> Path:
    learner = PromptLearner(_frozen_copy(clip_model, torch.float16), CLASSES, n_ctx=4, dtype=torch.float16)
    optim, sched = build_optim_and_sched(learner)
    full = {
        "state_dict": learner.state_dict(),
        "epoch": 1,
        "optimizer": optim.state_dict(),
        "scheduler": sched.state_dict(),
        "val_result": None,
    }
    save_checkpoint({**full, **state}, str(tmp_path / "prompt_learner"))
    return tmp_path / "prompt_learner" / "model.pth.tar-1"


def test_reader_globals_are_what_dassl_writes(clip_model, tmp_path) -> None:
    import pickletools

    path = _coop_file(tmp_path, clip_model)
    with zipfile.ZipFile(path) as z:
        data = z.read(next(n for n in z.namelist() if n.endswith("data.pkl")))
    names = {arg for op, arg, _ in pickletools.genops(data) if op.name == "GLOBAL"}
    assert names == {
        "collections OrderedDict",
        "collections defaultdict",
        "__builtin__ dict",
        "torch HalfStorage",
        "torch._utils _rebuild_tensor_v2",
        "torch._utils _rebuild_parameter",
        "torch.optim.sgd SGD",
        "torch.optim.lr_scheduler CosineAnnealingLR",
    }
    with pytest.raises(Exception):  # noqa: B017 - torch's own weights-only reader refuses a real one
        torch.load(path, weights_only=True)
    ck = read_dassl_checkpoint(path)
    assert (
        repr(ck.content["scheduler"]["successor"])
        == "<torch.optim.lr_scheduler.CosineAnnealingLR (not loaded)>"
    )
    assert ck.content["scheduler"]["warmup_epoch"] == 1 and ck.epoch == 1


class _Sentinel:
    ran = False

    def __setstate__(self, state):
        _Sentinel.ran = True


class _System:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _Eval:
    def __reduce__(self):
        return (eval, ("__import__('os').getcwd()",))


def test_hostile_pickles_are_refused_naming_file_and_class(tiny_clip, clip_model, tmp_path) -> None:
    marker = tmp_path / "pwned"
    cases = {
        "system": (
            {"scheduler": {"successor": _System(marker)}},
            r"refusing to load.*names posix\.system|names nt\.system",
        ),
        "eval": ({"val_result": _Eval()}, r"refusing to load.*builtins\.eval"),
        "unknown class": ({"optimizer": _Sentinel()}, r"refusing to load.*_Sentinel"),
        "getcwd": (
            {"scheduler": {"x": type("G", (), {"__reduce__": lambda self: (os.getcwd, ())})()}},
            r"posix\.getcwd|nt\.getcwd",
        ),
    }
    for name, (state, pattern) in cases.items():
        d = tmp_path / name.replace(" ", "_")
        path = _coop_file(d, clip_model, **state)
        _Sentinel.ran = False
        with pytest.raises(UnsafeCheckpointError, match=pattern) as err:
            import_checkpoint(d, tiny_clip, CLASSES)
        assert str(path) in str(err.value), name
        assert not marker.exists() and not _Sentinel.ran, name


def _raw_checkpoint(path: Path, pickle_bytes: bytes, records: dict[str, bytes] | None = None) -> Path:
    """A torch zip archive around a hand-written pickle stream."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", pickle_bytes)
        for name, data in (records or {}).items():
            z.writestr(f"archive/data/{name}", data)
        z.writestr("archive/byteorder", "little")
        z.writestr("archive/version", "3\n")
    return path


def test_allowed_names_cannot_be_turned_into_calls(tmp_path) -> None:
    # builtins.dict resolves to an inert marker: calling it is refused
    p = _raw_checkpoint(tmp_path / "a.pth", b"\x80\x02c__builtin__\ndict\n)R.")
    with pytest.raises(
        UnsafeCheckpointError, match=r"a\.pth: cannot read this checkpoint safely.*not callable"
    ):
        read_dassl_checkpoint(p)
    # defaultdict with any factory but dict
    p = _raw_checkpoint(
        tmp_path / "b.pth", b"\x80\x02ccollections\ndefaultdict\nccollections\nOrderedDict\n\x85R."
    )
    with pytest.raises(UnsafeCheckpointError, match=r"b\.pth.*default factory"):
        read_dassl_checkpoint(p)
    # a storage class is not a constructor; a tensor layout must be integers and lie inside its storage
    p = _raw_checkpoint(tmp_path / "c.pth", b"\x80\x02ctorch\nFloatStorage\n)R.")
    with pytest.raises(UnsafeCheckpointError, match=r"c\.pth"):
        read_dassl_checkpoint(p)
    p = _raw_checkpoint(
        tmp_path / "d.pth",
        b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\n(X\x01\x00\x00\x00xK\x00K\x01\x85K\x01\x85tR.",
    )
    with pytest.raises(UnsafeCheckpointError, match=r"d\.pth.*not from a storage record"):
        read_dassl_checkpoint(p)

    # {"state_dict": {"t": _rebuild_tensor_v2(<4 floats>, 0, (n,), (1,))}}: a view must lie inside its storage
    def tensor_pickle(n: int) -> bytes:
        pid = b"((X\x07\x00\x00\x00storagectorch\nFloatStorage\nX\x01\x00\x00\x000X\x03\x00\x00\x00cpuK\x04tQ"
        rebuild = (
            b"ctorch._utils\n_rebuild_tensor_v2\n" + pid + b"K\x00" + bytes([75, n]) + b"\x85K\x01\x85tR"
        )
        return b"\x80\x02}X\x0a\x00\x00\x00state_dict}X\x01\x00\x00\x00t" + rebuild + b"ss."

    four = torch.arange(4, dtype=torch.float32)
    p = _raw_checkpoint(tmp_path / "f.pth", tensor_pickle(4), {"0": four.numpy().tobytes()})
    assert torch.equal(read_dassl_checkpoint(p).tensor("t"), four)
    p = _raw_checkpoint(tmp_path / "g.pth", tensor_pickle(8), {"0": four.numpy().tobytes()})
    with pytest.raises(ValueError, match=r"g\.pth: 't' \[8\] does not fit its storage of 4"):
        read_dassl_checkpoint(p).tensor("t")
    # not a zip at all (torch < 1.6's legacy format, or anything else)
    (tmp_path / "e.pth").write_bytes(pickle.dumps({"state_dict": {}}))
    with pytest.raises(ValueError, match=r"e\.pth: not a torch zip checkpoint"):
        read_dassl_checkpoint(tmp_path / "e.pth")


def test_only_the_needed_tensors_are_read(tiny_clip, clip_model, tmp_path, monkeypatch) -> None:
    """MaPLe saves the whole CLIP; the import reads the prompt learner's tensors and nothing else."""
    model = MapleCLIP(clip_model, torch.float16, depth=2)
    train_and_save(model, tmp_path, "MultiModalPromptLearner", epochs=1)
    from promptlab import dassl_checkpoint

    read: list[str] = []
    real = dassl_checkpoint.DasslCheckpoint.tensor
    monkeypatch.setattr(
        dassl_checkpoint.DasslCheckpoint, "tensor", lambda self, key: read.append(key) or real(self, key)
    )
    import_checkpoint(tmp_path, tiny_clip, CLASSES, source="maple")
    assert read and all(k.startswith("prompt_learner.") for k in read)
    assert not any(k.endswith(("token_prefix", "token_suffix")) for k in read)


# ---------------------------------------------------------------------- the CLI
def test_cli_import_and_alias(tiny_clip, clip_model, feats, tmp_path, capsys) -> None:
    learner = PromptLearner(
        _frozen_copy(clip_model, torch.float16), CLASSES, n_ctx=8, position="middle", dtype=torch.float16
    )
    _perturb(learner)
    train_and_save(learner, tmp_path / "run", "prompt_learner", epochs=2)
    names = tmp_path / "classes.txt"
    names.write_text("\n".join(CLASSES) + "\n")
    common = ["--arch", "tiny", "--pretrained", "none", "--class-token-position", "middle"]
    assert (
        main(
            [
                "import",
                str(tmp_path / "run"),
                "--from",
                "coop",
                "--classnames",
                str(names),
                "--out",
                str(tmp_path / "a"),
                *common,
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "import-coop",
                str(tmp_path / "run"),
                "--classnames",
                ",".join(CLASSES),
                "--out",
                str(tmp_path / "b"),
                "--epoch",
                "1",
                *common,
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert (
        str(tmp_path / "a" / "prompt_config.json") in out
        and str(tmp_path / "b" / "prompt_config.json") in out
    )
    a, b = load_prompts(tmp_path / "a", tiny_clip), load_prompts(tmp_path / "b", tiny_clip)
    assert a.class_token_position == "middle" and torch.equal(a.ctx, learner.ctx.detach().float())
    assert not torch.equal(b.ctx, a.ctx)  # --epoch 1
    ref = PromptLearner(clip_model, CLASSES, n_ctx=8, position="middle")
    load_model(ref, learner)
    with torch.no_grad():
        want = clip_logits(clip_model, feats, text_encoder(clip_model, ref(), ref.tokenized_prompts))
        torch.testing.assert_close(a(image_features=feats), want, rtol=1e-5, atol=1e-5)


def test_cli_import_errors(clip_model, tmp_path, capsys) -> None:
    run = tmp_path / "run"
    path = _coop_file(run, clip_model, val_result=_Eval())
    args = ["--arch", "tiny", "--pretrained", "none", "--classnames", "a,b", "--out", str(tmp_path / "out")]
    assert main(["import", str(run), "--from", "coop", *args]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and "builtins.eval" in err
    assert main(["import", str(run), "--from", "maple", *args]) == 2
    assert "no Dassl checkpoint (MultiModalPromptLearner/model.pth.tar-N" in capsys.readouterr().err
    assert (
        main(
            [
                "import",
                str(run),
                "--from",
                "coop",
                "--arch",
                "tiny",
                "--pretrained",
                "none",
                "--out",
                str(tmp_path / "o"),
            ]
        )
        == 2
    )
    assert "--classnames" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_cli_import_with_a_dataset(tiny_clip, clip_model, tmp_path, capsys) -> None:
    """The README's form: the dataset gives the class names and KgCoOp's template; the export records it."""
    from promptlab.data import load_dataset, make_synthetic_dataset

    make_synthetic_dataset(
        tmp_path / "data", n_classes=3, train_per_class=1, val_per_class=1, test_per_class=1
    )
    classes = load_dataset("synthetic", tmp_path / "data").classnames
    learner = PromptLearner(
        _frozen_copy(clip_model, torch.float16),
        classes,
        ctx_init="a photo of a",
        dtype=torch.float16,
        extra="kgcoop",
    )
    _perturb(learner)
    train_and_save(learner, tmp_path / "run", "prompt_learner", epochs=1)
    args = [
        "import",
        str(tmp_path / "run"),
        "--from",
        "kgcoop",
        "--dataset",
        "synthetic",
        "--root",
        str(tmp_path / "data"),
    ]
    assert main([*args, "--arch", "tiny", "--pretrained", "none", "--out", str(tmp_path / "p")]) == 0
    m = load_prompts(tmp_path / "p", tiny_clip)
    assert (
        isinstance(m, KgCoOp)
        and m.classnames == list(classes)
        and torch.equal(m.ctx, learner.ctx.detach().float())
    )
    cfg = (tmp_path / "p" / "prompt_config.json").read_text()
    assert (
        '"dataset": "synthetic"' in cfg
        and '"template": "a photo of a {}."' in cfg
        and '"imported_source": "kgcoop"' in cfg
    )
    assert (
        main(
            [*args, "--arch", "tiny", "--pretrained", "none", "--epoch", "two", "--out", str(tmp_path / "q")]
        )
        == 2
    )
    assert "--epoch 'two'" in capsys.readouterr().err
