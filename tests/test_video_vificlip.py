"""ViFi-CLIP: temporal pooling, multi-view averaging, what each stage trains, the bridged checkpoint,
gradient accumulation, and both stages end to end through ``promptlab run`` on the tiny CLIP."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from promptlab.backbones import load_clip
from promptlab.cli import main
from promptlab.methods import CoOp, ViFiCLIP
from promptlab.methods.vificlip import average_views

CLASSES = ["ApplyEyeMakeup", "Archery", "Basketball"]
RECIPES = Path(__file__).resolve().parents[1] / "recipes" / "video"


def clips(B: int = 2, T: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.randn(B, T, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def test_temporal_mean_and_multiview_average(tiny_clip) -> None:
    m = ViFiCLIP(tiny_clip, CLASSES, prompt_depth_text=2, prompt_depth_vision=2)
    x = clips()
    with torch.no_grad():
        per_frame = m.encode_frames(x.flatten(0, 1)).reshape(2, 3, -1)
        torch.testing.assert_close(m.encode_image(x), per_frame.mean(1))
        views = torch.stack([x, clips(seed=1), clips(seed=2)], dim=1)  # [B, V=3, T, 3, H, W]
        per_view = torch.stack([m(views[:, v]) for v in range(3)], dim=1)  # [B, V, C]
        got = m(views)
    expected = per_view.softmax(-1).mean(1)
    torch.testing.assert_close(got.exp(), expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(
        average_views(per_view[:, :1]).exp(), per_view[:, 0].softmax(-1), atol=1e-6, rtol=0
    )


def test_label_smoothing_and_soft_targets(tiny_clip) -> None:
    m = ViFiCLIP(tiny_clip, CLASSES, prompt_depth_text=2, prompt_depth_vision=2, label_smoothing=0.1)
    logits, labels = torch.randn(4, 3), torch.tensor([0, 1, 2, 1])
    torch.testing.assert_close(m.loss(logits, labels), F.cross_entropy(logits, labels, label_smoothing=0.1))
    onehot = F.one_hot(labels, 3).float()
    torch.testing.assert_close(
        m.loss(logits, labels, targets=onehot), m.loss(logits, labels)
    )  # hard targets agree
    # mixup / CutMix targets as timm builds them for ViFi-CLIP (timm.data.mixup.mixup_target: one-hot at
    # on = 1 - 0.1 + 0.1 / C, off = 0.1 / C, mixed with the flipped batch by lam), scored by timm's
    # SoftTargetCrossEntropy: sum(-y * log_softmax(x)) averaged over the batch
    lam, off = 0.7, 0.1 / 3
    on = 1 - 0.1 + off

    def smooth(y: torch.Tensor) -> torch.Tensor:
        return torch.full((4, 3), off).scatter_(1, y[:, None], on)

    y = lam * smooth(labels) + (1 - lam) * smooth(labels.flip(0))
    expected = torch.sum(-y * F.log_softmax(logits, dim=-1), dim=-1).mean()
    mixed = lam * onehot + (1 - lam) * onehot.flip(0)  # what the batch mixing hands to loss()
    torch.testing.assert_close(m.loss(logits, labels, targets=mixed), expected, atol=1e-6, rtol=0)


def _step(m, x, labels) -> None:
    opt = torch.optim.SGD(m.trainable_parameters(), lr=0.5)
    m.train()
    m.loss(m(x), labels).backward()
    opt.step()


def test_bridge_tunes_towers_prompt_tunes_prompts_only() -> None:
    x, labels = clips(), torch.tensor([0, 2])
    clip = load_clip("tiny")
    pretrained_fp = clip.fingerprint()
    before = {k: v.clone() for k, v in clip.model.state_dict().items()}
    bridge = ViFiCLIP(clip, CLASSES, stage="bridge", tune="both")
    assert bridge.trainable_backbone_parts and all(
        p.startswith("model.") for p in bridge.trainable_backbone_parts
    )
    _step(bridge, x, labels)
    after = clip.model.state_dict()
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert any(k.startswith("visual.") for k in moved) and any(k.startswith("transformer.") for k in moved)
    assert "logit_scale" in moved and "token_embedding.weight" not in moved
    assert clip.fingerprint() == pretrained_fp  # pinned identity
    state = bridge.prompt_state_dict()
    assert state and all(k.startswith("clip.model.") for k in state) and "clip.model.logit_scale" in state
    # the learned tensors rebuild the bridged model on a fresh pretrained backbone
    fresh = ViFiCLIP(load_clip("tiny"), CLASSES, stage="bridge")
    with torch.no_grad():
        assert (fresh(x) - bridge(x)).abs().max() > 1e-6
        fresh.load_prompt_state_dict(state)
        torch.testing.assert_close(fresh(x), bridge(x), atol=0, rtol=0)

    image_only = ViFiCLIP(load_clip("tiny"), CLASSES, stage="bridge", tune="image")
    names = {n for n, p in image_only.clip.model.named_parameters() if p.requires_grad}
    assert names and all(n.startswith("visual.") for n in names)

    clip2 = load_clip("tiny")
    ref = {k: v.clone() for k, v in clip2.model.state_dict().items()}
    prompt = ViFiCLIP(clip2, CLASSES, stage="prompt", prompt_depth_text=2, prompt_depth_vision=2)
    learned = {k: v.clone() for k, v in prompt.prompt_state_dict().items()}
    assert set(learned) == {"ctx", "text_deep", "vis_ctx", "vis_deep"}
    _step(prompt, x, labels)
    assert all(torch.equal(v, clip2.model.state_dict()[k]) for k, v in ref.items())  # backbone untouched
    assert all(
        not torch.equal(v, prompt.prompt_state_dict()[k]) for k, v in learned.items()
    )  # every prompt moved


def _reference_trainable(model: torch.nn.Module, use: str) -> set[str]:
    """What muzairkhattak/ViFi-CLIP trains in the bridge stage, by CLIP (OpenAI layout) parameter name.

    trainers/vificlip.py: ViFiCLIP holds image_encoder = clip_model.visual, text_encoder =
    TextEncoder(transformer, positional_embedding, ln_final, text_projection) and logit_scale (L175-181);
    the text enters as complete_text_embeddings, a buffer computed from token_embedding at build time
    (L107-114), so token_embedding is no parameter of it. returnCLIP (L228-249): USE="both" sets
    requires_grad on every named parameter, "image" on names containing "image_encoder", "text" on
    names containing "text_encoder".
    """
    text = ("transformer.", "positional_embedding", "ln_final.", "text_projection")
    names = {n for n, _ in model.named_parameters() if n != "token_embedding.weight"}
    if use == "both":
        return names
    if use == "image":
        return {n for n in names if n.startswith("visual.")}
    return {n for n in names if n.startswith(text)}


@pytest.mark.parametrize("use", ["both", "image", "text"])
def test_bridge_trains_what_the_reference_trains(use: str) -> None:
    clip = load_clip("tiny")
    bridge = ViFiCLIP(clip, CLASSES, stage="bridge", tune=use)
    ours = {n for n, p in clip.model.named_parameters() if p.requires_grad}
    assert ours == _reference_trainable(clip.model, use)
    assert ("logit_scale" in ours) == (use == "both") and "token_embedding.weight" not in ours
    if use == "both":  # the temperature learns: it has a gradient and moves
        before = float(clip.model.logit_scale.detach())
        _step(bridge, clips(), torch.tensor([0, 2]))
        assert clip.model.logit_scale.grad is not None and float(clip.model.logit_scale.detach()) != before


def test_bridge_text_parts_without_word_embeddings_on_hf(hf_clip_dir: Path) -> None:
    clip = load_clip("hf-tiny", str(hf_clip_dir))
    ViFiCLIP(clip, CLASSES, stage="bridge", tune="text")
    names = {n for n, p in clip.model.named_parameters() if p.requires_grad}
    every_text = {
        n for n, _ in clip.model.named_parameters() if n.startswith(("text_model.", "text_projection"))
    }
    assert names == every_text - {"text_model.embeddings.token_embedding.weight"}


def test_grad_accumulation_equals_the_big_batch(tiny_clip, tmp_path: Path) -> None:
    from promptlab.engine import FeatureBatches, train

    feats = torch.randn(1, 4, tiny_clip.embed_dim, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 1, 2, 0])
    results = []
    for batch, accum in ((4, 1), (2, 2), (2, 1)):
        torch.manual_seed(0)
        m = CoOp(tiny_clip, CLASSES, n_ctx=2)
        opt = torch.optim.SGD(m.trainable_parameters(), lr=1.0)
        g = torch.Generator().manual_seed(0)
        train(
            m,
            FeatureBatches(feats, labels, batch, g, shuffle=False),
            opt,
            epochs=1,
            lr_schedule=lambda k: 1.0,
            generator=g,
            run_dir=tmp_path / f"r{batch}",
            device=torch.device("cpu"),
            grad_accum_steps=accum,
        )
        results.append(m.ctx.detach().clone())
    torch.testing.assert_close(results[0], results[1], atol=5e-5, rtol=0)  # one step on the mean gradient
    assert (
        results[2] - results[0]
    ).abs().max() > 1e-3  # two plain steps of 2 differ: the check is not vacuous


def test_bridge_then_prompt_end_to_end(tmp_path: Path) -> None:
    """Both stages through the CLI on tiny videos: the bridged backbone is a checkpoint the prompt stage loads."""
    root = _make_ucf_root(tmp_path / "data")
    common = [
        f"data.root={root}",
        "data.name=ucf101_video",
        "data.num_workers=0",
        "model.arch=tiny",
        "video.num_frames=4",
        "train.batch_size=2",
        "train.grad_accum_steps=2",
        "train.amp=fp32",
        "train.grad_checkpointing=false",
        "eval.batch_size=2",
        "device=cpu",
        f"cache_dir={tmp_path / 'cache'}",
        "train.epochs=1",
        "train.warmup_epochs=0",
    ]
    bridge_dir = tmp_path / "bridge"
    assert (
        main(
            [
                "run",
                str(RECIPES / "vificlip_bridge_k400.yaml"),
                *common,
                "model.pretrained=null",
                f"output_dir={bridge_dir}",
                "optimizer.lr=1e-3",
            ]
        )
        == 0
    )
    metrics = json.loads((bridge_dir / "metrics.json").read_text())
    assert metrics["method"] == "ViFiCLIP" and metrics["n"] == 3
    backbone = bridge_dir / "backbone"
    bridged = load_clip("tiny", str(backbone))
    assert bridged.fingerprint() != load_clip("tiny").fingerprint()  # the towers moved and were saved
    prompt_dir = tmp_path / "prompt"
    assert (
        main(
            [
                "run",
                str(RECIPES / "vificlip_prompt_base2novel.yaml"),
                *common,
                f"model.pretrained={backbone}",
                f"output_dir={prompt_dir}",
                "method.n_ctx_text=2",
                "method.n_ctx_vision=2",
                "method.prompt_depth_text=2",
                "method.prompt_depth_vision=2",
                "shots=0",
                "video.test_clips=2",
                "video.test_crops=3",
            ]
        )
        == 0
    )
    out = json.loads((prompt_dir / "metrics.json").read_text())
    assert out["weights_fingerprint"] == bridged.fingerprint()  # prompts learned on the frozen bridged CLIP
    assert load_clip("tiny", str(backbone)).fingerprint() == bridged.fingerprint()
    assert not (prompt_dir / "backbone").exists()  # the prompt stage tunes no backbone weight
    assert (prompt_dir / "prompts").is_dir() and out["n"] == 3


def _make_ucf_root(root: Path) -> Path:
    import numpy as np

    av = pytest.importorskip("av")
    ucf = root / "ucf101"
    (ucf / "ucfTrainTestlist").mkdir(parents=True)
    (ucf / "ucfTrainTestlist" / "classInd.txt").write_text(
        "".join(f"{i + 1} {c}\n" for i, c in enumerate(CLASSES))
    )
    train, test = [], []
    for y, c in enumerate(CLASSES):
        for g in (1, 2, 3):
            rel = f"{c}/v_{c}_g0{g}_c01.avi"
            path = ucf / "UCF-101" / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            with av.open(str(path), "w") as out:
                s = out.add_stream("mpeg4", rate=8)
                s.width = s.height = 32
                s.pix_fmt = "yuv420p"
                for i in range(8):
                    img = np.full((32, 32, 3), (40 * y + 10 * i) % 255, dtype=np.uint8)
                    out.mux(s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")))
                out.mux(s.encode())
            (test if g == 3 else train).append((rel, y))
    (ucf / "ucfTrainTestlist" / "trainlist01.txt").write_text("".join(f"{r} {y + 1}\n" for r, y in train))
    (ucf / "ucfTrainTestlist" / "testlist01.txt").write_text("".join(f"{r}\n" for r, _ in test))
    return root


def test_training_step_hands_the_mixed_targets_to_the_loss(tiny_clip) -> None:
    """The engine trains through PromptModule.training_step: a mixup / CutMix batch's soft ``targets`` must
    reach the loss (without them the step would score the hard labels)."""
    m = ViFiCLIP(tiny_clip, CLASSES, prompt_depth_text=2, prompt_depth_vision=2, label_smoothing=0.1)
    x, labels = clips(), torch.tensor([0, 2])
    onehot = F.one_hot(labels, 3).float()
    mixed = 0.6 * onehot + 0.4 * onehot.flip(0)
    with torch.no_grad():
        logits, loss = m.training_step({"images": x, "targets": mixed}, labels)
        torch.testing.assert_close(loss, m.loss(logits, labels, targets=mixed))
        assert (loss - m.loss(logits, labels)).abs() > 1e-4


def test_prompt_stage_context_from_words(tiny_clip, one_thread) -> None:
    """muzairkhattak/ViFi-CLIP trainers/vificlip.py L83-91, L104, L113-114: with CTX_INIT (n_ctx <= 4) the
    context is the first n_ctx token embeddings of the words and the prompt is "<words> <name>.", the
    words past n_ctx staying fixed; at prompt depth 1 the text features are then the hand-crafted ones."""
    m = ViFiCLIP(
        tiny_clip,
        CLASSES,
        n_ctx_text=2,
        ctx_init="a photo of a",
        prompt_depth_text=1,
        prompt_depth_vision=0,
    )
    ids = tiny_clip.tokenize([f"a photo of a {c}." for c in CLASSES])
    with torch.no_grad():
        torch.testing.assert_close(m.ctx, tiny_clip.embed_tokens(ids)[0, 1:3].float(), atol=0, rtol=0)
        want = F.normalize(tiny_clip.encode_text(ids).float(), dim=-1)
        torch.testing.assert_close(F.normalize(m.text_features().float(), dim=-1), want, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match=r"^stage='video': expected one of \('bridge', 'prompt'\)$"):
        ViFiCLIP(tiny_clip, CLASSES, stage="video")
    with pytest.raises(ValueError, match=r"^the prompt stage needs prompt_depth_text >= 1 "):
        ViFiCLIP(tiny_clip, CLASSES, prompt_depth_text=0)


def test_bridge_state_errors_name_the_keys_and_shapes(one_thread) -> None:
    """The bridge stage's learned tensors are the tower weights under the backbone's names: a state that
    lacks some or brings others is refused listing (the first five of) each, one of another shape is
    refused naming it and both shapes; the class-derived token ids are no part of any saved state.
    The prompt stage hands the source's name to the generic check."""
    bridge = ViFiCLIP(load_clip("tiny"), CLASSES, stage="bridge")
    state = bridge.prompt_state_dict()
    assert "_ids" not in bridge.state_dict()  # rebuilt by set_classnames, never saved
    ViFiCLIP(load_clip("tiny"), CLASSES[:2], stage="bridge").load_state_dict(bridge.state_dict())
    keys = sorted(state)
    assert len(keys) > 7
    cut = {k: v for k, v in state.items() if k not in keys[:7]}
    extra = {f"clip.model.extra{i}": torch.zeros(1) for i in range(7)}
    for given, kw, missing, unexpected in (
        (cut, {}, keys[:5], []),  # no source given: "state dict"
        ({**state, **extra}, {"source": "ckpt.pt"}, [], sorted(extra)[:5]),
        ({**cut, **extra}, {"source": "ckpt.pt"}, keys[:5], sorted(extra)[:5]),
    ):
        with pytest.raises(KeyError) as err:
            bridge.load_prompt_state_dict(given, **kw)
        assert err.value.args[0] == (
            f"{kw.get('source', 'state dict')} does not match ViFiCLIP (bridge): "
            f"missing {missing}, unexpected {unexpected}"
        )
    k = keys[0]
    wrong = {**state, k: state[k].reshape(-1)[:-1].clone()}
    with pytest.raises(ValueError) as err:
        bridge.load_prompt_state_dict(wrong, source="ckpt.pt")
    assert err.value.args[0] == (
        f"ckpt.pt: '{k}' has shape {list(wrong[k].shape)}, the backbone's is {list(state[k].shape)}"
    )
    prompt = ViFiCLIP(load_clip("tiny"), CLASSES, prompt_depth_text=2, prompt_depth_vision=2)
    with pytest.raises(KeyError) as err:
        prompt.load_prompt_state_dict({}, source="ckpt.pt")
    assert err.value.args[0].startswith("ckpt.pt does not match ViFiCLIP: missing ['ctx'")
