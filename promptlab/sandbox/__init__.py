"""The offline sandbox: a procedural image world and a tiny CLIP pretrained on it, shipped in the package.

Real CLIP weights and benchmarks are gigabytes and want a GPU; the sandbox lets every recipe run
meaningfully on a laptop CPU in minutes, with no network. ``load_clip("sandbox")`` loads the shipped
weights; ``datasets/sandbox_*.yaml`` are generated on first use (``promptlab.sandbox.datasets``).

This module stays import-light (no torch at import time); :mod:`promptlab.backbones` registers its
loader with FrozenCLIP.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

WEIGHTS = Path(__file__).resolve().parent / "sandbox_clip.safetensors"
METADATA = WEIGHTS.with_suffix(".json")
VOCAB_SIZE = 49408  # open_clip's SimpleTokenizer
TOKEN_IDS_KEY = "token_embedding.token_ids"  # int32 [n]: the tokenizer id of each compact table row


def sandbox_metadata(weights: str | Path = WEIGHTS) -> dict[str, Any]:
    """The JSON written beside the weights: model config, sha256, recorded accuracies, recipe."""
    path = Path(weights).with_suffix(".json")
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: sandbox CLIP metadata missing (run python -m promptlab.sandbox.pretrain)"
        )
    return json.loads(path.read_text())


def load_sandbox_model(weights: str | Path = WEIGHTS):
    """Build the open_clip ``CLIP`` of the sandbox and load its fp16 weights (returned in fp32).

    The file's sha256 is checked against the metadata first: a truncated download, a Git LFS
    pointer or a stale file would otherwise load as a silently different model.

    Raises:
        FileNotFoundError: the weights or their metadata are missing.
        ValueError: the file's checksum does not match the metadata.
    """
    import open_clip
    import torch
    from safetensors.torch import load_file

    weights = Path(weights)
    meta = sandbox_metadata(weights)
    if not weights.is_file():
        raise FileNotFoundError(
            f"{weights}: sandbox CLIP weights missing (run python -m promptlab.sandbox.pretrain)"
        )
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()
    if digest != meta["sha256"]:
        raise ValueError(
            f"{weights}: sha256 {digest[:16]}... does not match its metadata ({meta['sha256'][:16]}...)"
        )
    sd = load_file(str(weights))
    ids = sd.pop(TOKEN_IDS_KEY).long()  # [n]
    compact = sd.pop("token_embedding.weight").float()  # [n, W]
    table = torch.zeros(VOCAB_SIZE, compact.shape[1])
    table[ids] = compact  # tokens the world never uses keep a zero embedding
    sd["token_embedding.weight"] = table
    model = open_clip.model.CLIP(**meta["model_config"])
    model.load_state_dict({k: v.float() for k, v in sd.items()})
    return model.eval()
