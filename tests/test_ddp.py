"""DDP: N processes with a global batch B take the steps of 1 process with batch B.

The fast tests check the sharding arithmetic in one process; ``test_two_gloo_processes_match_one``
trains the tiny CLIP's CoOp in 2 CPU processes (gloo) and compares with 1 process. The slow test
launches the whole ``promptlab run`` under ``torchrun``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file
from torch.utils.data import DataLoader, TensorDataset

from promptlab import distributed
from promptlab.engine import (
    FeatureBatches,
    ImageBatches,
    evaluate,
    load_checkpoint,
    lr_at,
    per_epoch,
    train,
)

N_CLASSES, N_ITEMS, VIEWS, BATCH, EPOCHS = 6, 30, 2, 8, 3


@pytest.mark.parametrize("n", [0, 1, 5, 8, 9, 100])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_shards_cover_a_batch_exactly_once(n, world):
    parts = [list(range(n))[distributed.shard_slice(n, (r, world))] for r in range(world)]
    assert sum(parts, []) == list(range(n))
    assert max(map(len, parts)) - min(map(len, parts)) <= 1


def _features():
    g = torch.Generator().manual_seed(0)
    return torch.randn(VIEWS, N_ITEMS, 32, generator=g), torch.arange(N_ITEMS) % N_CLASSES


def test_feature_batch_shards_reassemble_the_global_batch():
    feats, labels = _features()
    whole = list(FeatureBatches(feats, labels, BATCH, torch.Generator().manual_seed(3)))
    parts = [
        list(FeatureBatches(feats, labels, BATCH, torch.Generator().manual_seed(3), shard=(r, 2)))
        for r in range(2)
    ]
    assert len(whole) == len(parts[0]) == len(parts[1]) == N_ITEMS // BATCH
    for (x, y), (x0, y0), (x1, y1) in zip(whole, *parts):
        assert torch.equal(torch.cat([x0["image_features"], x1["image_features"]]), x["image_features"])
        assert torch.equal(torch.cat([y0, y1]), y)


def test_image_batches_are_the_dataloaders_and_shard_the_same_way():
    """One process: exactly the batches of DataLoader(shuffle=True, drop_last) (no change in behaviour)."""
    data = TensorDataset(
        torch.arange(N_ITEMS).float().view(-1, 1), torch.arange(N_ITEMS) % N_CLASSES, torch.arange(N_ITEMS)
    )
    ref = DataLoader(
        data, batch_size=BATCH, shuffle=True, drop_last=True, generator=torch.Generator().manual_seed(5)
    )
    ours = ImageBatches(data, BATCH, torch.Generator().manual_seed(5))
    ref_batches = [y for _, y, _ in ref]
    our_batches = [y for _, y in ours]
    assert len(our_batches) == len(ref_batches) == len(ours) == N_ITEMS // BATCH
    assert all(torch.equal(a, b) for a, b in zip(our_batches, ref_batches))
    parts = [
        list(ImageBatches(data, BATCH, torch.Generator().manual_seed(5), shard=(r, 2))) for r in range(2)
    ]
    for y, (_, y0), (_, y1) in zip(ref_batches, *parts):
        assert torch.equal(torch.cat([y0, y1]), y)


def test_helpers_are_no_ops_in_one_process():
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.full((3,), 2.0)
    distributed.average_gradients([p], n_local=5)
    assert torch.equal(p.grad, torch.full((3,), 2.0))
    assert distributed.current_shard() == (0, 1) and distributed.is_main()
    assert distributed.all_finite(torch.tensor(1.0)) and not distributed.all_finite(
        torch.tensor(float("nan"))
    )
    assert distributed.init_from_env() == distributed.DistInfo()  # no WORLD_SIZE: nothing to join


def _tiny_coop():
    from promptlab.backbones import load_clip
    from promptlab.methods import CoOp

    torch.manual_seed(1)
    return CoOp(load_clip("tiny"), [f"class {i}" for i in range(N_CLASSES)], n_ctx=4, ctx_init="")


def _initial_ctx() -> torch.Tensor:
    return _tiny_coop().ctx.detach().clone()


def _train_tiny_coop(run_dir: Path, shard: tuple[int, int], batch: int = BATCH) -> tuple[torch.Tensor, dict]:
    """CoOp on the tiny CLIP over fixed random features: 3 epochs of (global) batch 8, then evaluation."""
    module = _tiny_coop()
    feats, labels = _features()
    g = torch.Generator().manual_seed(1)
    opt = torch.optim.SGD(module.trainable_parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    batches = FeatureBatches(feats, labels, batch, g, shard=shard)
    train(
        module,
        batches,
        opt,
        epochs=EPOCHS,
        lr_schedule=per_epoch(lambda e: lr_at(e, 0.05, EPOCHS, 1, 1e-5), len(batches)),
        generator=g,
        run_dir=run_dir,
        device=torch.device("cpu"),
    )
    metrics = evaluate(
        module,
        FeatureBatches(feats[:1], labels, 7, g, shuffle=False, shard=shard),
        device=torch.device("cpu"),
    )
    return module.ctx.detach().clone(), metrics


def _ddp_worker(rank: int, world: int, tmp: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)  # two processes share the CPU
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=world)
    try:
        ctx, metrics = _train_tiny_coop(Path(tmp) / f"rank{rank}", distributed.current_shard())
        torch.save({"ctx": ctx, "metrics": metrics}, Path(tmp) / f"result{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_gloo_processes_match_one(tmp_path):
    ctx1, metrics1 = _train_tiny_coop(tmp_path / "single", (0, 1))
    # fork: the children inherit the imported modules (spawn would spend seconds re-importing torch)
    mp.start_processes(_ddp_worker, args=(2, str(tmp_path)), nprocs=2, join=True, start_method="fork")
    r0, r1 = (torch.load(tmp_path / f"result{r}.pt", weights_only=True) for r in range(2))
    init = _initial_ctx()
    assert (ctx1 - init).abs().max() > 1e-2  # training moved the context far beyond the tolerance below
    torch.testing.assert_close(r0["ctx"], ctx1, rtol=1e-4, atol=1e-5)  # float summation order differs
    local_batch, _ = _train_tiny_coop(tmp_path / "local", (0, 1), batch=BATCH // 2)
    assert (local_batch - ctx1).abs().max() > 1e-3  # what a wrong (per-process) batch would have given
    torch.testing.assert_close(r1["ctx"], r0["ctx"], rtol=0, atol=0)  # every process holds the same weights
    assert torch.equal(
        load_checkpoint(tmp_path / "single" / "checkpoints" / "last.pt")["prompt_state"]["ctx"], ctx1
    )
    assert r0["metrics"]["n"] == r1["metrics"]["n"] == N_ITEMS  # evaluation counted every test item once
    assert r0["metrics"]["accuracy"] == pytest.approx(metrics1["accuracy"])
    assert (tmp_path / "rank0" / "checkpoints" / "last.pt").is_file()
    assert not (tmp_path / "rank1" / "checkpoints").exists()  # only rank 0 writes


@pytest.mark.slow
def test_torchrun_promptlab_run_matches_one_process(tmp_path):
    """The whole `promptlab run` under torchrun (2 CPU processes, gloo) against a plain run."""
    common = [f"cache_dir={tmp_path / 'cache'}", "train.epochs=3", "train.batch_size=8", "device=cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run(
        [sys.executable, "-m", "promptlab.cli", "run", f"output_dir={tmp_path / 'one'}", *common],
        env=env,
        capture_output=True,
        text=True,
    )
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            "-m",
            "promptlab.cli",
            "run",
            f"output_dir={tmp_path / 'two'}",
            *common,
        ],
        env=env,
        capture_output=True,
        text=True,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    a = load_file(tmp_path / "one" / "prompts" / "prompts.safetensors")["ctx"]
    b = load_file(tmp_path / "two" / "prompts" / "prompts.safetensors")["ctx"]
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    m1, m2 = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("one", "two"))
    assert m2["world_size"] == 2 and m1["world_size"] == 1
    assert m2["accuracy"] == pytest.approx(m1["accuracy"]) and m2["n"] == m1["n"]
