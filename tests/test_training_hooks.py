"""The engine's method hooks, each on its own: the gradient hook (``PromptModule.backward``), the per-epoch
hook (``end_epoch``) and the per-epoch state it carries through checkpoints (``training_state_dict``)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from promptlab.backbones import load_clip
from promptlab.clip import FrozenCLIP
from promptlab.engine import FeatureBatches, lr_at, per_epoch, train
from promptlab.methods import CoOp

CLASSES = ["red circle", "blue square", "green star"]


@pytest.fixture(scope="module")
def clip() -> FrozenCLIP:
    return load_clip("tiny")


class _Interrupting:
    """Batches that raise KeyboardInterrupt when epoch ``stop_after`` starts (a killed run)."""

    def __init__(self, inner, stop_after: int):
        self.inner, self.stop_after, self.epoch = inner, stop_after, 0

    def __len__(self) -> int:
        return len(self.inner)

    def __iter__(self):
        if self.epoch == self.stop_after:
            raise KeyboardInterrupt
        self.epoch += 1
        yield from self.inner


def _train(module, tmp_path: Path, epochs: int = 3, resume: bool = False, stop_after: int | None = None):
    g = torch.Generator().manual_seed(1)
    feats = torch.randn(2, 24, 32, generator=torch.Generator().manual_seed(0))
    batches = FeatureBatches(feats, torch.arange(24) % 3, 8, g)
    if stop_after is not None:
        batches = _Interrupting(batches, stop_after)
    opt = torch.optim.SGD(module.trainable_parameters(), lr=0.1, momentum=0.9)
    train(
        module,
        batches,
        opt,
        epochs=epochs,
        lr_schedule=per_epoch(lambda e: lr_at(e, 0.1, epochs, 0), len(batches)),
        generator=g,
        run_dir=tmp_path,
        device=torch.device("cpu"),
        resume=resume,
    )
    return module, len(batches)


class _FrozenByHook(CoOp):
    """A gradient hook that counts its calls and keeps nothing of the gradient."""

    calls = 0

    def backward(self, loss: torch.Tensor) -> None:
        type(self).calls += 1
        loss.backward()
        for p in self.trainable_parameters():
            p.grad.zero_()


def test_engine_steps_with_the_methods_gradient_hook(clip: FrozenCLIP, tmp_path: Path) -> None:
    _FrozenByHook.calls = 0  # a class counter: the test must also pass when run twice in one process
    torch.manual_seed(0)
    m = _FrozenByHook(clip, CLASSES, n_ctx=2)
    before = m.ctx.detach().clone()
    _, n = _train(m, tmp_path / "hooked")
    assert _FrozenByHook.calls == 3 * n
    torch.testing.assert_close(m.ctx, before, atol=0, rtol=0)  # the zeroed gradient is what was stepped
    torch.manual_seed(0)
    plain, _ = _train(CoOp(clip, CLASSES, n_ctx=2), tmp_path / "plain")  # the default hook: loss.backward()
    assert (plain.ctx - before).abs().max() > 1e-3


class _Averaging(CoOp):
    """Keeps an epoch-weighted sum of its context (state across epochs) and ends on it, as GPA does."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.calls: list[tuple[int, int]] = []
        self.acc: torch.Tensor | None = None

    def end_epoch(self, epoch: int, epochs: int) -> None:
        self.calls.append((epoch, epochs))
        w = self.ctx.detach() * epoch
        self.acc = w if self.acc is None else self.acc + w
        if epoch == epochs:
            with torch.no_grad():
                self.ctx.copy_(self.acc / sum(range(1, epochs + 1)))

    def training_state_dict(self) -> dict[str, torch.Tensor]:
        return {} if self.acc is None else {"acc": self.acc}

    def load_training_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.acc = state.get("acc")


def test_end_epoch_runs_after_each_epoch_and_its_state_survives_a_resume(
    clip: FrozenCLIP, tmp_path: Path
) -> None:
    torch.manual_seed(0)
    full, _ = _train(_Averaging(clip, CLASSES, n_ctx=2), tmp_path / "full", epochs=4)
    assert full.calls == [(1, 4), (2, 4), (3, 4), (4, 4)]
    torch.manual_seed(0)
    with pytest.raises(KeyboardInterrupt):
        _train(_Averaging(clip, CLASSES, n_ctx=2), tmp_path / "cut", epochs=4, stop_after=2)
    ckpt = torch.load(tmp_path / "cut" / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["epoch"] == 2 and set(ckpt["method_state"]) == {"acc"}  # end_epoch ran before the save
    torch.manual_seed(0)
    resumed, _ = _train(_Averaging(clip, CLASSES, n_ctx=2), tmp_path / "cut", epochs=4, resume=True)
    assert resumed.calls == [(3, 4), (4, 4)]
    torch.testing.assert_close(resumed.ctx, full.ctx, atol=0, rtol=0)
