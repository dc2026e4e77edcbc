"""Image-feature cache: encode each image once per augmented view, reuse it across epochs, runs and seeds.

When a method declares its image side frozen, the image tower's output for a given (image,
transform draw) never changes, so re-encoding every image every step (as the incumbents do) is
pure waste. Training draws one of ``views`` cached augmented views per image per epoch;
evaluation encodes the test set once per backbone.

Cache files live under ``<cache_dir>/features/`` (never in the data folder), keyed by backbone
fingerprint, transform, views and the exact item list; a stale or corrupted file is detected
(key or shape mismatch, unreadable file) and rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from promptlab.data import ImageDataset, Item
from promptlab.io import atomic_save_safetensors

log = logging.getLogger(__name__)


def feature_key(
    fingerprint: str, transform: Callable, views: int, items: Sequence[Item], tag: str = ""
) -> str:
    """Content key of a cache entry: anything that changes the features changes the key."""
    h = hashlib.sha256()
    h.update(json.dumps([fingerprint, repr(transform), views, tag]).encode())
    for it in items:
        h.update(f"{it.path}\t{it.label}\n".encode())
    return h.hexdigest()[:24]


@torch.no_grad()
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
) -> torch.Tensor:
    """Encode every item ``views`` times: [V, N, D] float32.

    Augmentation randomness comes from a fixed seed, so the same key gives the same features.
    """
    out = []
    ds = ImageDataset(list(items), transform)
    with torch.random.fork_rng(devices=[]):  # a cache miss must not change the run's RNG stream
        for v in range(views):
            torch.manual_seed(
                seed + v
            )  # transforms draw from the global RNG (workers: from the loader's generator)
            g = torch.Generator().manual_seed(seed + v)
            loader = DataLoader(
                ds, batch_size=batch_size, shuffle=False, num_workers=num_workers, generator=g
            )
            feats = [
                encode(x.to(device)).float().cpu()
                for x, _, _ in tqdm(loader, desc=f"{desc} view {v + 1}/{views}", leave=False)
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
    **kw,
) -> torch.Tensor:
    """:func:`encode_items` through a file cache. Returns [V, N, D]."""
    if cache_dir is None:
        return encode_items(encode, items, transform, views=views, **kw)
    key = feature_key(fingerprint, transform, views, items, tag)
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
    feats = encode_items(encode, items, transform, views=views, **kw)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_save_safetensors(
        {"features": feats.contiguous()}, path, metadata={"key": key, "n": str(len(items))}
    )
    return feats
