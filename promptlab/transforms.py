"""Image transforms of the CoOp / Dassl protocol.

Train: RandomResizedCrop (scale 0.08-1, bicubic) + horizontal flip + CLIP normalisation.
Test: Resize shorter side (bicubic) + CenterCrop. These are the transforms the published tables
used; open_clip's own training transform (scale 0.9-1, no flip) is deliberately not used.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torchvision is imported when a transform is built, not with promptlab.clip
    from torchvision import transforms as T

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


class _ToRGB:
    """PIL image to RGB (grey-scale and palette images occur in every benchmark). Stable repr for cache keys."""

    def __call__(self, img):
        return img.convert("RGB")

    def __repr__(self) -> str:
        return "ToRGB()"


def train_transform(
    size: int,
    mean: Sequence[float] = OPENAI_MEAN,
    std: Sequence[float] = OPENAI_STD,
    scale: Sequence[float] = (0.08, 1.0),
) -> T.Compose:
    """Dassl's ``random_resized_crop, random_flip, normalize`` at the model's input size."""
    from torchvision import transforms as T

    return T.Compose(
        [
            _ToRGB(),
            T.RandomResizedCrop(size, scale=tuple(scale), interpolation=T.InterpolationMode.BICUBIC),
            T.RandomHorizontalFlip(),
            T.ToTensor(),
            T.Normalize(mean, std),
        ]
    )


def eval_transform(
    size: int, mean: Sequence[float] = OPENAI_MEAN, std: Sequence[float] = OPENAI_STD
) -> T.Compose:
    """Resize the shorter side to ``size`` (bicubic), centre crop, normalise."""
    from torchvision import transforms as T

    return T.Compose(
        [
            _ToRGB(),
            T.Resize(size, interpolation=T.InterpolationMode.BICUBIC),
            T.CenterCrop(size),
            T.ToTensor(),
            T.Normalize(mean, std),
        ]
    )
