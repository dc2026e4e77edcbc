"""Training checkpoints: what save_training_state writes, restore_training_state gives back, stream by stream.

test_engine checks the end result of a resumed CoOp run on cached features, which draws only from the
run's generator; a method or task that draws from python's ``random``, numpy (a cached second Gaussian
included) or torch's global stream resumes exactly only if each of them continues where it stopped.
Mutation testing (issue 24) found each of these restorations pinned by nothing.
"""

from __future__ import annotations

import random
import re

import numpy as np
import pytest
import torch

from promptlab.engine import load_checkpoint, restore_training_state, save_training_state
from promptlab.methods import CoOp

CLASSES = ["red circle", "blue square", "green star"]


class _RecordingCoOp(CoOp):
    """CoOp that carries ``carried`` across epochs (as PromptSRC its averages) and keeps what the
    checkpoint handed back to load_training_state_dict."""

    carried: dict[str, torch.Tensor] = {}

    def training_state_dict(self):
        return dict(self.carried)

    def load_training_state_dict(self, state):
        self.loaded_training_state = state


def _draws(g: torch.Generator) -> list:
    """One value from every random stream a training step may use."""
    return [
        random.random(),
        random.getrandbits(64),
        np.random.standard_normal(3).tolist(),  # the first one is numpy's cached Gaussian, if any
        np.random.randint(0, 2**31, 4).tolist(),
        torch.rand(3),
        torch.rand(3, generator=g),
    ]


def _same(a: list, b: list) -> bool:
    return all(
        torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y for x, y in zip(a, b, strict=True)
    )


@pytest.fixture
def coop(tiny_clip):
    torch.manual_seed(0)
    return _RecordingCoOp(tiny_clip, CLASSES, n_ctx=2)


def test_checkpoint_restores_every_random_stream(coop, tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    g = torch.Generator().manual_seed(4)
    np.random.standard_normal()  # numpy now holds the pair's second Gaussian (has_gauss = 1)
    opt = torch.optim.SGD(coop.trainable_parameters(), lr=0.1)
    save_training_state(tmp_path / "last.pt", coop, opt, 3, g, step=7)
    expected = _draws(g)
    random.seed(10)  # what a fresh process holds
    np.random.seed(20)
    torch.manual_seed(30)
    g.manual_seed(40)
    assert not _same(_draws(g), expected)
    assert restore_training_state(tmp_path / "last.pt", coop, opt, g) == (3, 7)
    got = _draws(g)
    for name, x, y in zip(
        ["random", "getrandbits", "numpy normal", "numpy int", "torch", "generator"], got, expected
    ):
        assert _same([x], [y]), name


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: the CUDA generators' state")
def test_checkpoint_restores_the_cuda_random_stream(coop, tmp_path):
    """Dropout and random augmentations on the GPU draw from CUDA's own generators."""
    g = torch.Generator().manual_seed(0)
    opt = torch.optim.SGD(coop.trainable_parameters(), lr=0.1)
    torch.cuda.manual_seed_all(5)
    save_training_state(tmp_path / "last.pt", coop, opt, 1, g)
    expected = torch.rand(4, device="cuda")
    torch.cuda.manual_seed_all(6)
    restore_training_state(tmp_path / "last.pt", coop, opt, g)
    assert torch.equal(torch.rand(4, device="cuda"), expected)


def test_checkpoint_restores_the_learned_tensors_and_the_optimizer(coop, tmp_path):
    opt = torch.optim.SGD(coop.trainable_parameters(), lr=0.1, momentum=0.9)
    coop.carried = {"ctx_sum": torch.arange(3.0)}
    coop.ctx.grad = torch.ones_like(coop.ctx)
    opt.step()  # a momentum buffer to save
    saved_ctx, saved_buf = coop.ctx.detach().clone(), opt.state[coop.ctx]["momentum_buffer"].clone()
    save_training_state(tmp_path / "last.pt", coop, opt, 1, torch.Generator(), step=1)
    for _ in range(2):  # the run goes on past the checkpoint
        coop.ctx.grad = torch.randn_like(coop.ctx)
        opt.step()
    assert not torch.equal(coop.ctx, saved_ctx)
    restore_training_state(tmp_path / "last.pt", coop, opt, torch.Generator())
    assert torch.equal(coop.ctx, saved_ctx)
    assert torch.equal(opt.state[coop.ctx]["momentum_buffer"], saved_buf)
    assert list(coop.loaded_training_state) == ["ctx_sum"]
    assert torch.equal(coop.loaded_training_state["ctx_sum"], torch.arange(3.0))


def test_checkpoint_of_another_module_names_the_file(coop, tmp_path):
    path = tmp_path / "last.pt"
    save_training_state(
        path, coop, torch.optim.SGD(coop.trainable_parameters(), lr=0.1), 1, torch.Generator()
    )
    ckpt = torch.load(path, weights_only=True)
    ckpt["prompt_state"]["meta_net.weight"] = torch.zeros(2, 2)  # a CoCoOp-like checkpoint
    torch.save(ckpt, path)
    opt = torch.optim.SGD(coop.trainable_parameters(), lr=0.1)
    with pytest.raises(KeyError, match=re.escape(f"{path} does not match _RecordingCoOp: ") + ".*meta_net"):
        restore_training_state(path, coop, opt, torch.Generator())


def test_checkpoint_from_before_the_step_clock_and_method_state(coop, tmp_path):
    """Checkpoints written before ``step`` and ``method_state`` were recorded still resume: no step count
    (the loop derives it from the epoch) and an empty method state (start afresh)."""
    path = tmp_path / "last.pt"
    save_training_state(
        path, coop, torch.optim.SGD(coop.trainable_parameters(), lr=0.1), 2, torch.Generator()
    )
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["step"] == 0  # the default: a caller that counts no steps
    del ckpt["step"], ckpt["method_state"]
    torch.save(ckpt, path)
    opt = torch.optim.SGD(coop.trainable_parameters(), lr=0.1)
    assert restore_training_state(path, coop, opt, torch.Generator()) == (2, None)
    assert coop.loaded_training_state == {}


def test_unreadable_checkpoint_names_the_file_and_the_way_out(coop, tmp_path):
    path = tmp_path / "last.pt"
    save_training_state(
        path, coop, torch.optim.SGD(coop.trainable_parameters(), lr=0.1), 1, torch.Generator()
    )
    path.write_bytes(path.read_bytes()[:200])  # a truncated file
    with pytest.raises(RuntimeError) as err:
        load_checkpoint(path)
    assert re.fullmatch(
        re.escape(f"cannot read checkpoint {path}: ") + r".+; delete it to restart the run from scratch",
        str(err.value),
        flags=re.S,
    )
    torch.save({"epoch": 1, "rng": np.zeros(3)}, path)  # an older promptlab kept numpy arrays
    with pytest.raises(RuntimeError) as err:
        load_checkpoint(path)
    assert re.fullmatch(
        re.escape(f"cannot read checkpoint {path}: it holds objects other than tensors and plain data (")
        + r"Weights only load failed[^\n]*"  # the first line of torch's own reason
        + re.escape(
            "); it is not unpickled in full because that can run code. If it is an older promptlab "
            "checkpoint, delete it to restart the run from scratch"
        ),
        str(err.value),
    )


def test_unpickling_error_without_a_message_is_named_by_its_type(tmp_path, monkeypatch):
    import pickle

    def refuse(*args, **kwargs):
        raise pickle.UnpicklingError()

    monkeypatch.setattr(torch, "load", refuse)
    with pytest.raises(RuntimeError, match=r"plain data \(UnpicklingError\); it is not unpickled"):
        load_checkpoint(tmp_path / "last.pt")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: a checkpoint of GPU tensors")
def test_checkpoint_of_gpu_tensors_loads_on_the_cpu(tmp_path):
    """A run trained on a GPU resumes or exports on any machine: every tensor comes back on the CPU."""
    torch.save(
        {"epoch": 1, "optimizer": {"state": {0: {"momentum_buffer": torch.ones(2, device="cuda")}}}},
        tmp_path / "last.pt",
    )
    assert (
        load_checkpoint(tmp_path / "last.pt")["optimizer"]["state"][0]["momentum_buffer"].device.type == "cpu"
    )


def _steps_asked(tiny_clip, run_dir, *, epochs, resume=False):
    """The schedule indices a CoOp run asks for (3 batches, accumulation 2: 2 optimizer steps an epoch)."""
    from promptlab.engine import FeatureBatches, train

    torch.manual_seed(0)
    module = CoOp(tiny_clip, CLASSES, n_ctx=2)
    g = torch.Generator().manual_seed(1)
    feats = torch.randn(1, 6, tiny_clip.embed_dim, generator=torch.Generator().manual_seed(2))
    asked = []
    train(
        module,
        FeatureBatches(feats, torch.arange(6) % 3, 2, g),
        torch.optim.SGD(module.trainable_parameters(), lr=0.1),
        epochs=epochs,
        lr_schedule=lambda k: asked.append(k) or 0.1 / (1 + k),
        generator=g,
        run_dir=run_dir,
        device=torch.device("cpu"),
        grad_accum_steps=2,
        resume=resume,
    )
    return sorted(set(asked))


def test_resume_from_a_checkpoint_without_the_step_clock(tiny_clip, tmp_path):
    """A checkpoint from before the step count was saved resumes at epochs done x steps per epoch."""
    assert _steps_asked(tiny_clip, tmp_path, epochs=1) == [0, 1]
    path = tmp_path / "checkpoints" / "last.pt"
    ckpt = torch.load(path, weights_only=True)
    assert (ckpt["epoch"], ckpt["step"]) == (1, 2)
    del ckpt["step"]
    torch.save(ckpt, path)
    assert _steps_asked(tiny_clip, tmp_path, epochs=2, resume=True) == [2, 3]
