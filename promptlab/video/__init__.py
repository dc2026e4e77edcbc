"""Video: clips decoded with PyAV or read from frame folders, segment sampling, multi-view testing,
and the readers of UCF101, HMDB51, Kinetics and ViFi-CLIP's split lists. The method is
``promptlab.methods.ViFiCLIP``."""

from promptlab.video.data import ClipTransform, VideoBatches, VideoDataset, mix_batch, sample_frame_indices
from promptlab.video.decode import VideoReadError, count_frames, read_frames

__all__ = [
    "ClipTransform",
    "VideoBatches",
    "VideoDataset",
    "VideoReadError",
    "count_frames",
    "mix_batch",
    "read_frames",
    "sample_frame_indices",
]
