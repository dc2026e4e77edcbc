"""Image-feature cache: encode each image once per augmented view, reuse it across epochs, runs and seeds.

When a method declares its image side frozen, the image tower's output for a given (image,
transform draw) never changes, so evaluation encodes the test set once per backbone.

Training from cached views (``train.feature_cache: true``) is a *speed option*, not the reference
protocol: each image is encoded under ``views`` augmentation draws once, and each epoch picks one of
those views per image, where Dassl's loader draws a fresh RandomResizedCrop + flip every epoch
(``train.feature_cache: false``). The draws depend on the run's seed, so seeds 1, 2, 3 train on
different views, as they would see different crops in the reference.

Cache files live under ``<cache_dir>/features/`` (never in the data folder), keyed by backbone
fingerprint, transform, views, the augmentation seed and the exact item list *with each file's size
and modification time*, so a rewritten image is re-encoded; a stale or corrupted file is detected
(key or shape mismatch, unreadable file) and rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch.utils.data import DataLoader

from promptlab.data import ImageDataset, Item
from promptlab.io import atomic_save_safetensors
from promptlab.runlog import progress

log = logging.getLogger(__name__)


def feature_key(
    fingerprint: str,
    transform: Callable,
    views: int,
    items: Sequence[Item],
    tag: str = "",
    seed: int = 0,
) -> str:
    """Content key of a cache entry: anything that changes the features changes the key.

    Each image enters with its size and modification time (one ``stat`` per file, cheap even for
    ImageNet's test set), so an image rewritten in place gets new features instead of its old ones.
    """
    h = hashlib.sha256()
    h.update(json.dumps([fingerprint, repr(transform), views, tag, seed]).encode())
    for it in items:
        st = os.stat(it.path)
        h.update(f"{it.path}\t{it.label}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:24]


def view_seed(seed: int, view: int) -> int:
    """The RNG seed of augmented view ``view`` for a run seeded ``seed``: distinct for every pair."""
    digest = hashlib.sha256(f"promptlab-view:{seed}:{view}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def encode_items(
    encode: Callable[[torch.Tensor], torch.Tensor],
    items: Sequence[Item],
    transform: Callable,
    *,
    views: int = 1,
    batch_size: int = 64,
    num_workers: int = 0,
    device: str | torch.device = "cpu",
    seed: int = 0,
    desc: str = "encode",
    decoded_mb: float = 0,
) -> torch.Tensor:
    """Encode every item ``views`` times: [V, N, D] float32.

    View ``v`` draws its augmentations from :func:`view_seed` ``(seed, v)``: the same (seed, key)
    gives the same features, and another run seed gives other views. ``decoded_mb`` > 0 keeps that
    many MB of decoded images in memory, so that V views decode each file once (same features).
    """
    out = []
    ds = ImageDataset(list(items), transform, decoded_mb=decoded_mb, threads=max(1, num_workers))
    # no_grad as a with block, not a decorator: mutmut skips decorated functions (tools/mutate.py);
    # a cache miss must not change the run's RNG stream (fork_rng)
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        for v in range(views):
            # transforms draw from the global RNG (workers: from the loader's generator)
            torch.manual_seed(view_seed(seed, v))
            g = torch.Generator().manual_seed(view_seed(seed, v))
            loader = DataLoader(
                ds, batch_size=batch_size, shuffle=False, num_workers=num_workers, generator=g
            )
            feats = [
                encode(x.to(device)).float().cpu()
                for x, _, _ in progress(loader, f"{desc} view {v + 1}/{views}", leave=False)
            ]
            out.append(torch.cat(feats) if feats else torch.empty(0))
    return torch.stack(out)


def cached_features(
    encode: Callable[[torch.Tensor], torch.Tensor],
    items: Sequence[Item],
    transform: Callable,
    *,
    fingerprint: str,
    cache_dir: str | Path | None,
    views: int = 1,
    tag: str = "",
    seed: int = 0,
    **kw,
) -> torch.Tensor:
    """:func:`encode_items` through a file cache. Returns [V, N, D].

    ``seed`` seeds the augmentation draws (pass the run's seed for training views; a deterministic
    evaluation transform gives the same features whatever it is, so evaluation passes 0 and shares
    one entry across seeds).
    """
    if cache_dir is None:
        return encode_items(encode, items, transform, views=views, seed=seed, **kw)
    key = feature_key(fingerprint, transform, views, items, tag, seed)
    path = Path(cache_dir).expanduser() / "features" / f"{key}.safetensors"
    if path.exists():
        try:
            feats = load_file(str(path))["features"]
            if feats.shape[:2] == (views, len(items)):
                log.info("feature cache hit: %s", path)
                return feats
            log.warning(
                "feature cache %s has shape %s, expected (%d, %d, D): rebuilding",
                path,
                tuple(feats.shape),
                views,
                len(items),
            )
        except (SafetensorError, KeyError, OSError, RuntimeError) as e:
            log.warning("feature cache %s is unreadable (%s): rebuilding", path, e)
    feats = encode_items(encode, items, transform, views=views, seed=seed, **kw)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_save_safetensors(
        {"features": feats.contiguous()}, path, metadata={"key": key, "n": str(len(items))}
    )
    return feats
