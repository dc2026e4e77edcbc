"""Video clips for CLIP: sample T frames, decode them (:mod:`promptlab.video.decode`), augment every
frame alike, batch, skip bad files.

A video item is an ``Item`` whose path is a video file (decoded with PyAV) or a folder of frames
(images sorted by name, as extracted by ffmpeg). Frame sampling follows ViFi-CLIP / mmaction2's
``SampleFrames(clip_len=1, num_clips=T)`` (muzairkhattak/ViFi-CLIP ``datasets/pipeline.py``):

- training: the video is cut into T equal segments and one frame is drawn at a random offset in
  each (TSN sampling); a video shorter than T frames repeats frames evenly;
- testing: the middle frame of each segment. With ``clips`` temporal views, view v takes the
  frame at (v + 0.5) / clips of each segment. ViFi-CLIP's multi-view test draws its 4 clips with the
  *training* sampler (random offsets); ours are deterministic, so a test score does not depend on RNG.

Training augmentation follows ViFi-CLIP's pipeline: crop and flip are drawn once per clip; colour
jitter is switched on once per clip but each frame draws its own factors and order (torchvision
ColorJitter applied frame by frame, on PIL images as the reference does), and grayscale, once per clip,
turns every frame grey. A file that cannot be decoded
is logged by path and dropped from its batch; the batches count what they skipped. An epoch never
stops on a bad video.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset
from torchvision import transforms as T1
from torchvision.transforms import functional as F1
from torchvision.transforms.v2 import functional as TF

from promptlab import distributed
from promptlab.data.items import Item
from promptlab.video.decode import VideoReadError, count_frames, read_frames

log = logging.getLogger(__name__)

# ViFi-CLIP normalises with ImageNet statistics (its img_norm_cfg), not CLIP's.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TRAIN_SCALES = (1.0, 0.875, 0.75, 0.66)  # MultiScaleCrop scales of ViFi-CLIP's train pipeline
# ViFi-CLIP datasets/pipeline.py ColorJitter (L1695-1712): p 0.8 (AUG.COLOR_JITTER) per clip, then
# torchvision ColorJitter(brightness 0.4, contrast 0.4, saturation 0.2, hue 0.1) on each frame;
# GrayScale (L1716-1730): p 0.2 (AUG.GRAY_SCALE) per clip. Ranges as torchvision derives them.
_JITTER = T1.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)
JITTER_P, GRAY_P = 0.8, 0.2


# ---------------------------------------------------------------------- sampling
def sample_frame_indices(
    n_frames: int,
    num: int,
    *,
    train: bool,
    generator: torch.Generator | None = None,
    view: int = 0,
    views: int = 1,
) -> list[int]:
    """Indices of ``num`` frames out of ``n_frames`` (segment sampling; see the module docstring).

    Args:
        n_frames: frames in the video (>= 1).
        num: T, frames to sample.
        train: random offset per segment (else the fixed offset of ``view``).
        generator: RNG of the training offsets.
        view: which temporal test clip (0..views-1).
        views: number of temporal test clips.
    """
    if n_frames < 1:
        raise ValueError("a video needs at least one frame")
    seg = n_frames // num
    if train and seg > 0:
        jitter = torch.randint(seg, (num,), generator=generator)
        return [i * seg + int(j) for i, j in enumerate(jitter)]
    if train:  # fewer frames than T: repeat frames evenly (mmaction2's avg_interval == 0 branch)
        return [min(n_frames - 1, round(i * n_frames / num)) for i in range(num)]
    step = n_frames / num
    return [min(n_frames - 1, int(i * step + step * (view + 0.5) / views)) for i in range(num)]


# ---------------------------------------------------------------------- transforms
def _jitter_params(g: torch.Generator | None) -> tuple[list[int], float, float, float, float]:
    """torchvision ``ColorJitter.get_params`` drawn from ``g``: the order of the four adjustments, then
    brightness, contrast, saturation and hue factors (the same draws, in the same order)."""

    def uniform(lo_hi: list[float]) -> float:
        return float(torch.empty(1).uniform_(lo_hi[0], lo_hi[1], generator=g))

    order = torch.randperm(4, generator=g).tolist()
    return (
        order,
        uniform(_JITTER.brightness),
        uniform(_JITTER.contrast),
        uniform(_JITTER.saturation),
        uniform(_JITTER.hue),
    )


def _pil(frame: torch.Tensor) -> Image.Image:
    return Image.fromarray(np.ascontiguousarray(frame.permute(1, 2, 0).numpy()))  # uint8 [3, H, W] -> RGB


def _tensor(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(img)).permute(2, 0, 1)  # RGB -> uint8 [3, H, W]


def jitter_frames(frames: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """torchvision ColorJitter(0.4, 0.4, 0.2, 0.1) on every frame of uint8 [T, 3, H, W], each frame with
    its own factors and order drawn from ``generator``; through PIL, as ViFi-CLIP applies it."""
    adjust = (F1.adjust_brightness, F1.adjust_contrast, F1.adjust_saturation, F1.adjust_hue)
    out = []
    for frame in frames:
        order, *factors = _jitter_params(generator)
        img = _pil(frame)
        for i in order:
            img = adjust[i](img, factors[i])
        out.append(_tensor(img))
    return torch.stack(out)


def gray_frames(frames: torch.Tensor) -> torch.Tensor:
    """torchvision Grayscale(num_output_channels=3) on every frame (PIL's luma), uint8 [T, 3, H, W]."""
    return torch.stack([_tensor(F1.rgb_to_grayscale(_pil(f), num_output_channels=3)) for f in frames])


def color_augment(
    frames: torch.Tensor,
    generator: torch.Generator | None,
    jitter_p: float = JITTER_P,
    gray_p: float = GRAY_P,
) -> torch.Tensor:
    """ViFi-CLIP's colour augmentation of one clip, uint8 [T, 3, H, W] -> uint8 [T, 3, H, W]: with
    probability ``jitter_p`` (one draw per clip) :func:`jitter_frames`, then with probability
    ``gray_p`` (one draw per clip) :func:`gray_frames`."""
    if float(torch.rand((), generator=generator)) < jitter_p:
        frames = jitter_frames(frames, generator)
    if float(torch.rand((), generator=generator)) < gray_p:
        frames = gray_frames(frames)
    return frames


@dataclass
class ClipTransform:
    """Clip augmentation, uint8 [T, 3, H, W] -> float clips.

    Training (ViFi-CLIP's pipeline): short side to 256/224 of ``size``, multi-scale crop from fixed
    positions, resize to ``size`` x ``size``, horizontal flip (p 0.5) (these once per clip), colour
    jitter (p 0.8 per clip; brightness 0.4, contrast 0.4, saturation 0.2, hue 0.1 drawn per frame),
    grayscale (p 0.2 per clip), normalise (:func:`color_augment`).
    Returns [T, 3, S, S]. Evaluation: short side to 256/224 of ``size`` and a centre crop, or with
    ``crops=3`` short side to ``size`` and three crops along the long side; returns [crops, T, 3, S, S].
    """

    size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    train: bool
    crops: int = 1
    jitter_p: float = JITTER_P  # probability of colour jitter per clip (ViFi-CLIP AUG.COLOR_JITTER)
    gray_p: float = GRAY_P  # probability of grayscale per clip (AUG.GRAY_SCALE)

    def __call__(self, frames: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        if self.train:
            return self._normalize(self._augment(frames, generator))
        if self.crops == 1:
            x = TF.resize(frames, [int(256 / 224 * self.size)], antialias=True)
            return self._normalize(TF.center_crop(x, [self.size, self.size])).unsqueeze(0)
        if self.crops != 3:
            raise ValueError(f"test crops must be 1 or 3, got {self.crops}")
        x = TF.resize(frames, [self.size], antialias=True)
        H, W = x.shape[-2:]
        step_h, step_w = (H - self.size) // 2, (W - self.size) // 2
        tops_lefts = [(0, 0), (2 * step_h, 2 * step_w), (step_h, step_w)]  # ThreeCrop: start, end, middle
        return torch.stack(
            [self._normalize(TF.crop(x, t, left, self.size, self.size)) for t, left in tops_lefts]
        )

    def _augment(self, x: torch.Tensor, g: torch.Generator | None) -> torch.Tensor:
        def rand() -> float:
            return float(torch.rand((), generator=g))

        x = TF.resize(x, [int(256 / 224 * self.size)], antialias=True)
        H, W = x.shape[-2:]
        sizes = [int(min(H, W) * s) for s in TRAIN_SCALES]
        pairs = [(w, h) for i, w in enumerate(sizes) for j, h in enumerate(sizes) if abs(i - j) <= 1]
        cw, ch = pairs[int(torch.randint(len(pairs), (), generator=g))]
        sw, sh = (W - cw) // 4, (H - ch) // 4
        left, top = [(0, 0), (4 * sw, 0), (0, 4 * sh), (4 * sw, 4 * sh), (2 * sw, 2 * sh)][
            int(torch.randint(5, (), generator=g))
        ]
        x = TF.resize(TF.crop(x, top, left, ch, cw), [self.size, self.size], antialias=True)
        if rand() < 0.5:
            x = TF.horizontal_flip(x)
        return color_augment(x, g, self.jitter_p, self.gray_p)

    def _normalize(self, x: torch.Tensor) -> torch.Tensor:
        return TF.normalize(x.float() / 255.0, list(self.mean), list(self.std))


# ---------------------------------------------------------------------- dataset and batches
class VideoDataset(Dataset):
    """Items as ``(clip, label, index, bad_path)``; a bad video gives ``clip=None`` and its path.

    Training clips are [T, 3, S, S]; test clips are [clips * crops, T, 3, S, S] (all views of one
    video). Offsets and augmentation come from a per-sample generator seeded from torch's global RNG,
    which the DataLoader seeds per worker from the run's generator: runs are reproducible.
    """

    def __init__(self, items: Sequence[Item], num_frames: int, transform: ClipTransform, *, clips: int = 1):
        self.items, self.num_frames, self.transform, self.clips = list(items), num_frames, transform, clips

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[torch.Tensor | None, int, int, str | None]:
        item = self.items[index]
        g = torch.Generator().manual_seed(int(torch.randint(2**62, ())))
        try:
            n = count_frames(item.path)
            if n < 1:
                raise VideoReadError(f"video {item.path} has no frames")
            if self.transform.train:
                idx = sample_frame_indices(n, self.num_frames, train=True, generator=g)
                return self.transform(read_frames(item.path, idx), g), item.label, index, None
            views = []
            for v in range(self.clips):
                idx = sample_frame_indices(n, self.num_frames, train=False, view=v, views=self.clips)
                views.append(self.transform(read_frames(item.path, idx)))  # [crops, T, 3, S, S]
            return torch.cat(views), item.label, index, None
        except VideoReadError as e:
            log.warning("skipping unreadable video: %s", e)
            return None, item.label, index, item.path


def collate_clips(samples: list) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[str]]:
    """Stack the readable clips; return the paths of the unreadable ones beside them."""
    good = [s for s in samples if s[0] is not None]
    bad = [s[3] for s in samples if s[0] is None]
    if not good:
        return torch.empty(0), torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long), bad
    clips = torch.stack([s[0] for s in good])
    return clips, torch.tensor([s[1] for s in good]), torch.tensor([s[2] for s in good]), bad


def mix_batch(
    clips: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    *,
    mixup: float,
    cutmix: float,
    switch_prob: float,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixup or CutMix over a batch of clips [B, T, 3, H, W] (ViFi-CLIP's CutmixMixupBlending).

    One of the two is chosen per batch (CutMix with probability ``switch_prob`` when both are on);
    the same box / weight applies to every frame of a clip. Returns the mixed clips and soft
    targets [B, C]; label smoothing is the method's loss's business.
    """
    rng = np.random.default_rng(int(torch.randint(2**62, (), generator=generator)))
    perm = torch.randperm(clips.shape[0], generator=generator)
    onehot = F.one_hot(labels, num_classes).float()
    use_cutmix = cutmix > 0 and (mixup <= 0 or rng.random() < switch_prob)
    if use_cutmix:
        lam = float(rng.beta(cutmix, cutmix))
        H, W = clips.shape[-2:]
        cut = math.sqrt(1 - lam)
        cy, cx = int(rng.integers(H)), int(rng.integers(W))
        y1, y2 = max(cy - int(H * cut) // 2, 0), min(cy + int(H * cut) // 2, H)
        x1, x2 = max(cx - int(W * cut) // 2, 0), min(cx + int(W * cut) // 2, W)
        clips = clips.clone()
        clips[..., y1:y2, x1:x2] = clips[perm][..., y1:y2, x1:x2]
        lam = 1 - (y2 - y1) * (x2 - x1) / (H * W)
    else:
        lam = float(rng.beta(mixup, mixup))
        clips = lam * clips + (1 - lam) * clips[perm]
    return clips, lam * onehot + (1 - lam) * onehot[perm]


class VideoBatches:
    """Mini-batches of clips, like ``engine.ImageBatches``; counts and logs skipped videos.

    Training batches may be mixed (``mixup`` / ``cutmix`` > 0), adding soft ``targets`` [B, C] to the
    forward inputs. ``skipped`` lists every unreadable path met so far (all epochs).
    """

    def __init__(
        self,
        dataset: VideoDataset,
        batch_size: int,
        generator: torch.Generator,
        *,
        shuffle: bool = True,
        num_workers: int = 0,
        shard: tuple[int, int] = (0, 1),
        num_classes: int = 0,
        mixup: float = 0.0,
        cutmix: float = 0.0,
        switch_prob: float = 0.5,
    ):
        self.loader = distributed.sharded_loader(
            dataset,
            batch_size,
            generator,
            shuffle=shuffle,
            num_workers=num_workers,
            shard=shard,
            collate_fn=collate_clips,
            pin_memory=torch.cuda.is_available(),
        )
        self.g, self.num_classes = generator, num_classes
        self.mixup, self.cutmix, self.switch_prob = (
            (mixup, cutmix, switch_prob) if shuffle else (0.0, 0.0, 0.0)
        )
        self.skipped: list[str] = []

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple[dict[str, torch.Tensor], torch.Tensor]]:
        for clips, labels, _, bad in self.loader:
            if bad:
                self.skipped.extend(bad)
                log.warning("%d unreadable video(s) skipped so far (latest: %s)", len(self.skipped), bad[-1])
            if labels.numel() == 0:
                continue
            if (self.mixup > 0 or self.cutmix > 0) and labels.numel() > 1:
                clips, targets = mix_batch(
                    clips,
                    labels,
                    self.num_classes,
                    mixup=self.mixup,
                    cutmix=self.cutmix,
                    switch_prob=self.switch_prob,
                    generator=self.g,
                )
                yield {"images": clips, "targets": targets}, labels
            else:
                yield {"images": clips}, labels
