"""Image loading: a torch Dataset over `Item`s and the DataLoader settings used everywhere."""

from __future__ import annotations

from collections.abc import Callable

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms.functional import to_tensor

from promptlab.data.items import Item


class ImageReadError(OSError):
    """An image file is missing, truncated or not an image; the message names the file."""


def read_image(path: str) -> Image.Image:
    """Decode `path` to an RGB PIL image, raising `ImageReadError` naming the path on failure.

    The image is fully decoded here (`convert` forces it), so a truncated file fails at this
    point, with its name, rather than later inside a transform.
    """
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except (OSError, ValueError, SyntaxError) as e:  # PIL raises all three for bad files
        raise ImageReadError(f"cannot read image {path}: {e}") from e
    except Image.DecompressionBombError as e:  # a file claiming more pixels than PIL will decode
        raise ImageReadError(
            f"cannot read image {path}: {e} (raise PIL.Image.MAX_IMAGE_PIXELS only for images you trust)"
        ) from e


class ImageDataset(Dataset):
    """Items as `(image_tensor, label, index)` samples.

    The index lets feature caches and per-sample logging map a batch row back to its item.

    Args:
        items: The items to load.
        transform: Applied to the RGB PIL image (e.g. FrozenCLIP's train/eval transform); when
            None the image becomes a float tensor in [0, 1], shape [3, H, W].
    """

    def __init__(self, items: list[Item], transform: Callable | None = None):
        self.items = list(items)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int]:
        item = self.items[index]
        img = read_image(item.path)
        x = self.transform(img) if self.transform is not None else to_tensor(img)
        return x, item.label, index


def make_loader(
    dataset: Dataset,
    batch_size: int,
    *,
    train: bool,
    num_workers: int = 4,
    generator: torch.Generator | None = None,
) -> DataLoader:
    """A DataLoader with Dassl's choices: shuffle and drop the last partial batch when training.

    Dassl drops the last batch only when the training set has at least one full batch, so a
    1-shot run on a small dataset still trains. Workers decode in parallel, stay alive across
    epochs, and memory is pinned when a GPU will receive the batches.
    """
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=train,
        drop_last=train and len(dataset) >= batch_size,
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=num_workers > 0,
        generator=generator,
    )
