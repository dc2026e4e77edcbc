"""Shared fixtures: tiny CLIP models built in milliseconds, and no network for any test.

Every model here is randomly initialised from a fixed seed; nothing is downloaded. The Hugging Face
libraries are put offline before they are imported, and an autouse guard refuses any socket
connection that leaves the machine (loopback stays allowed for DDP tests).
"""

from __future__ import annotations

import copy
import os

# Before transformers / huggingface_hub are imported anywhere: they read these at import time.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import socket  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

# The architecture STYLE.md recommends for a tiny open_clip model (one block per tower).
TINY_OPENCLIP_CFG = dict(
    embed_dim=32,
    vision_cfg=dict(layers=1, width=32, head_width=16, patch_size=8, image_size=32),
    text_cfg=dict(layers=1, width=32, heads=2),
)


def _is_local(address: object) -> bool:
    if not isinstance(address, tuple) or not address:
        return True  # AF_UNIX paths and the like
    host = str(address[0])
    return host in ("localhost", "::1", "0.0.0.0", "") or host.startswith("127.")


@pytest.fixture(autouse=True)
def _no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail loudly if a test tries to reach the outside world (a download would be a bug)."""
    real_connect = socket.socket.connect

    def guarded(self: socket.socket, address: object) -> None:
        if not _is_local(address):
            raise RuntimeError(f"tests must not use the network (tried to connect to {address!r})")
        return real_connect(self, address)

    monkeypatch.setattr(socket.socket, "connect", guarded)


@pytest.fixture
def one_thread():
    """Tiny tensors: with several threads, OpenMP hand-offs cost more than the maths on a busy CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_clip():
    """promptlab's own tiny FrozenCLIP (open_clip backend, 2 blocks per tower, seed 0). Frozen, so shared."""
    from promptlab.backbones import load_clip

    return load_clip("tiny")


def make_tiny_openclip_model(seed: int = 0, **overrides) -> torch.nn.Module:
    """A fresh open_clip ``CLIP`` with STYLE.md's tiny configuration."""
    import open_clip

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return open_clip.model.CLIP(**{**TINY_OPENCLIP_CFG, **overrides})


@pytest.fixture
def tiny_openclip_model() -> torch.nn.Module:
    """A fresh (function-scoped: load_clip freezes it in place) tiny open_clip ``CLIP``."""
    return make_tiny_openclip_model()


# Test modules get the factories through fixtures, not `from conftest import ...`: several conftest.py
# files live under tests/, and the module name `conftest` is ambiguous.
@pytest.fixture
def ref_openclip(tiny_clip) -> torch.nn.Module:
    """The reference side's own backbone: a fresh open_clip ``CLIP`` holding a copy of ``tiny_clip``'s weights.

    Parity tests run the reference computation on this copy, never on the module promptlab wraps, so a
    change FrozenCLIP makes to its model (a patched block, a swapped layer) cannot leak into the
    reference. The architecture is written out here (promptlab's "tiny": 2 blocks per tower), and the
    weights load with ``strict=True``: a structural difference fails loudly.
    """
    import open_clip

    cfg = copy.deepcopy(TINY_OPENCLIP_CFG)
    cfg["vision_cfg"]["layers"] = cfg["text_cfg"]["layers"] = 2
    model = open_clip.model.CLIP(**cfg)
    model.load_state_dict(
        {k: v.detach().clone() for k, v in tiny_clip.model.state_dict().items()}, strict=True
    )
    return model.eval().requires_grad_(False)


@pytest.fixture(scope="session")
def tiny_openclip_cfg() -> Callable[[], dict]:
    """``tiny_openclip_cfg()`` -> a fresh copy of STYLE.md's tiny open_clip configuration."""
    return lambda: copy.deepcopy(TINY_OPENCLIP_CFG)


@pytest.fixture(scope="session")
def make_openclip() -> Callable[..., torch.nn.Module]:
    """``make_openclip(seed=0, **overrides)`` -> a fresh tiny open_clip ``CLIP``."""
    return make_tiny_openclip_model


def make_tiny_hf_clip(seed: int = 0):
    """A tiny transformers ``CLIPModel`` using CLIP's real vocabulary ids (49408 tokens, EOT 49407)."""
    from transformers import CLIPConfig, CLIPModel

    config = CLIPConfig(
        text_config=dict(
            vocab_size=49408,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=77,
            bos_token_id=49406,
            eos_token_id=49407,
            pad_token_id=0,
            hidden_act="quick_gelu",
        ),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
            hidden_act="quick_gelu",
        ),
        projection_dim=32,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = CLIPModel(config)
    return model.eval()


@pytest.fixture(scope="session")
def make_hf_clip() -> Callable[..., torch.nn.Module]:
    """``make_hf_clip(seed=0)`` -> a fresh tiny transformers ``CLIPModel``."""
    return make_tiny_hf_clip


@pytest.fixture(scope="session")
def make_hf_clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Callable[[int], Path]:
    """``make_hf_clip_dir(seed)`` -> a directory written by ``CLIPModel.save_pretrained`` (cached per seed)."""
    made: dict[int, Path] = {}

    def make(seed: int = 0) -> Path:
        if seed not in made:
            path = tmp_path_factory.mktemp(f"hf_clip_{seed}")
            make_tiny_hf_clip(seed).save_pretrained(path)
            made[seed] = path
        return made[seed]

    return make


@pytest.fixture(scope="session")
def hf_clip_dir(make_hf_clip_dir: Callable[[int], Path]) -> Path:
    return make_hf_clip_dir(0)


@pytest.fixture
def images() -> torch.Tensor:
    """[3, 3, 32, 32] normalised-looking pixels for the tiny towers."""
    return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
