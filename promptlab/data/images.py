"""Image loading: a torch Dataset over `Item`s and the DataLoader settings used everywhere."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms.functional import to_tensor

from promptlab.data.items import Item

log = logging.getLogger(__name__)


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


class DecodedImages:
    """The decoded RGB pixels of images read many times (every epoch, every augmented view), kept in memory.

    Decoding a JPEG costs more than cropping it; the exact protocol draws a fresh crop of every training
    image every epoch, so without this each image is decoded once per epoch. Exact: what is kept is the
    decoded image byte for byte, and every crop is still taken from those original pixels (the same
    ``read_image`` result, rebuilt as a PIL image without a copy).

    Memory is capped: images are decoded in order while their pixels (width x height x 3 bytes, read
    from the file header) fit in ``budget_mb``; the others are decoded from their files on every read,
    and a log line says how many. Decoding runs in ``threads`` threads (PIL releases the GIL) in the
    main process, before any DataLoader worker starts: forked workers share the pages instead of
    holding a copy each.
    """

    def __init__(self, paths: Sequence[str], budget_mb: float, threads: int = 1):
        budget, used, keep = int(budget_mb * 2**20), 0, []
        for path in paths:
            try:
                with Image.open(path) as img:
                    size = img.width * img.height * 3
            except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
                size = (
                    None  # unreadable or too large: left to read_image, which names the file when it is read
                )
            if size is not None and used + size <= budget:
                keep.append(path)
                used += size
        with ThreadPoolExecutor(max(1, threads)) as pool:
            arrays = list(pool.map(lambda p: np.asarray(read_image(p)), keep))
        self._pixels: dict[str, np.ndarray] = dict(zip(keep, arrays))
        self.bytes = sum(a.nbytes for a in arrays)
        self.missed = len(paths) - len(keep)
        if self.missed:
            log.info(
                "decoded images in memory: %d of %d (%.1f MB; budget data.decoded_cache_mb=%g); the other %d "
                "are decoded from their files on every read",
                len(keep),
                len(paths),
                self.bytes / 2**20,
                budget_mb,
                self.missed,
            )
        else:
            log.info("decoded images in memory: all %d (%.1f MB)", len(keep), self.bytes / 2**20)

    def __len__(self) -> int:
        return len(self._pixels)

    def read(self, path: str) -> Image.Image:
        """The RGB image at ``path``: from memory when it is held, else decoded from the file."""
        pixels = self._pixels.get(path)
        return read_image(path) if pixels is None else Image.fromarray(pixels)


class ImageDataset(Dataset):
    """Items as `(image_tensor, label, index)` samples.

    The index lets feature caches and per-sample logging map a batch row back to its item.

    Args:
        items: The items to load.
        transform: Applied to the RGB PIL image (e.g. FrozenCLIP's train/eval transform); when
            None the image becomes a float tensor in [0, 1], shape [3, H, W].
        decoded_mb: keep up to this many MB of decoded pixels in memory (:class:`DecodedImages`), for a
            dataset read more than once; 0: decode from the file on every read.
        threads: threads that decode the images kept in memory.
    """

    def __init__(
        self,
        items: list[Item],
        transform: Callable | None = None,
        *,
        decoded_mb: float = 0,
        threads: int = 1,
    ):
        self.items = list(items)
        self.transform = transform
        self.decoded = (
            DecodedImages([it.path for it in self.items], decoded_mb, threads) if decoded_mb > 0 else None
        )

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int]:
        item = self.items[index]
        img = read_image(item.path) if self.decoded is None else self.decoded.read(item.path)
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
