"""Reading frames of a video file (PyAV) or a frame folder, exactly and without decoding what is not needed.

Segment sampling wants T frames spread over the whole video. Decoding from frame 0 to the last
wanted frame is exact for every codec but decodes the whole video for every clip; instead the
packets are indexed once (without decoding) and the decoder seeks to the keyframe before each far
wanted frame, checking every decoded frame against the index and falling back to sequential
decoding whenever the timestamps cannot be trusted.
"""

from __future__ import annotations

import logging
import os
from bisect import bisect_right
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image

if TYPE_CHECKING:  # PyAV is imported where a file is read
    from av.container import InputContainer
    from av.video.frame import VideoFrame
    from av.video.stream import VideoStream

log = logging.getLogger(__name__)

FRAME_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


class VideoReadError(OSError):
    """A video file or frame folder is missing, empty or undecodable; the message names the path."""


# ---------------------------------------------------------------------- decoding
def _frame_files(folder: str) -> list[str]:
    return sorted(
        f for f in os.listdir(folder) if f.lower().endswith(FRAME_EXTENSIONS) and not f.startswith(".")
    )


def count_frames(path: str) -> int:
    """Number of frames of a video file or frame folder (decodes nothing when the container says)."""
    if os.path.isdir(path):
        return len(_frame_files(path))
    import av

    try:
        with av.open(path) as container:
            if not container.streams.video:
                raise VideoReadError(f"no video stream in {path}")
            stream = container.streams.video[0]
            if stream.frames:
                return int(stream.frames)
            return sum(1 for p in container.demux(stream) if p.size)  # count packets, no decoding
    except (av.FFmpegError, UnicodeDecodeError) as e:
        raise VideoReadError(f"cannot read video {path}: {e}") from e


def read_frames(path: str, indices: Sequence[int], *, seek: bool = True) -> torch.Tensor:
    """Frames ``indices`` of a video file or frame folder as uint8 [len(indices), 3, H, W].

    Frame i of a file is the i-th frame the decoder gives from the start. With ``seek`` (the
    default), a wanted frame far past the decoder's position is reached by seeking to the keyframe
    at or before it instead of decoding everything in between: segment-sampled clips (T frames
    spread over the video) then decode about T GOPs, not the whole video. The frames are the ones
    sequential decoding gives: frames are named by their timestamps, and anything that makes the
    timestamps untrustworthy falls back to decoding from the start (see ``_read_seeking``).
    ``seek=False`` always decodes sequentially. When the container over-reports its length,
    indices past the end take the last frame.
    """
    if not os.path.exists(path):
        raise VideoReadError(f"video not found: {path}")
    if os.path.isdir(path):
        files = _frame_files(path)
        if not files:
            raise VideoReadError(f"frame folder {path} holds no images")
        try:
            frames = [
                np.asarray(Image.open(os.path.join(path, files[min(i, len(files) - 1)])).convert("RGB"))
                for i in indices
            ]
        except (OSError, ValueError, SyntaxError) as e:
            raise VideoReadError(f"cannot read a frame of {path}: {e}") from e
        return _to_tensor(frames)
    import av

    wanted = sorted(set(indices))
    if not wanted or wanted[0] < 0:
        raise ValueError(f"frame indices must be a non-empty list of indices >= 0, got {list(indices)}")
    got: dict[int, np.ndarray] | None = None
    try:
        if seek and wanted[-1] > SEEK_MIN_SKIP:  # else no seek could pay for the table's demux pass
            with av.open(path) as container:
                try:
                    got = _read_seeking(container, _video_stream(container, path), wanted)
                except _Unseekable as e:
                    log.debug("decoding %s from the start: %s", path, e)
        if got is None:
            with av.open(path) as container:
                got = _read_sequential(container, _video_stream(container, path), wanted, path)
    except (av.FFmpegError, UnicodeDecodeError) as e:
        raise VideoReadError(f"cannot decode video {path}: {e}") from e
    return _to_tensor([got[i] for i in indices])


def _to_tensor(frames: list[np.ndarray]) -> torch.Tensor:
    """[H, W, 3] frames -> uint8 [T, 3, H, W]; numpy's transposing copy is ~10x torch's permute().contiguous() here."""
    return torch.from_numpy(np.ascontiguousarray(np.stack(frames).transpose(0, 3, 1, 2)))


# Seek only when it skips more than this many frames. A seek flushes the decoder (and its frame
# threads) and re-decodes a keyframe the forward path would decode anyway, so skipping even a few
# frames pays; thresholds 0 to 16 timed within noise of each other on GOP-12 MPEG-4 and GOP-30 H.264.
SEEK_MIN_SKIP = 4


class _Unseekable(Exception):
    """The timestamps cannot be trusted to name frames; the message says why."""


def _video_stream(container: InputContainer, path: str) -> VideoStream:
    if not container.streams.video:
        raise VideoReadError(f"no video stream in {path}")
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"
    return stream


def _decode_from(container: InputContainer, stream: VideoStream) -> Iterator[VideoFrame]:
    """Frames from the container's current position (one place for tests to count decoded frames)."""
    return container.decode(stream)


def _read_sequential(
    container: InputContainer, stream: VideoStream, wanted: list[int], path: str
) -> dict[int, np.ndarray]:
    """Decode from frame 0 up to the last wanted frame: exact for every codec and container."""
    keep, stop = set(wanted), wanted[-1]
    got: dict[int, np.ndarray] = {}
    last = None  # (index, frame) of the last decoded frame
    for i, frame in enumerate(_decode_from(container, stream)):
        if i in keep:
            got[i] = frame.to_ndarray(format="rgb24")
        last = (i, frame)
        if i >= stop:
            break
    if last is None:
        raise VideoReadError(f"video {path} has no decodable frames")
    end, frame = last
    if stop > end:  # the container over-reported its length: later indices repeat the last frame
        tail = got.get(end)
        tail = frame.to_ndarray(format="rgb24") if tail is None else tail
        got.update((i, tail) for i in wanted if i > end)
    return got


@dataclass
class _FrameTable:
    """Frame i of the video is the one with the i-th smallest pts; keyframes and where to seek for them."""

    index: dict[int, int]  # pts -> frame index
    keyframes: list[int]  # frame indices of the keyframes, ascending; keyframes[0] == 0
    seek_to: list[int]  # per keyframe, the timestamp to seek to (see _frame_table)


def _frame_table(container: InputContainer, stream: VideoStream) -> _FrameTable:
    """Read every packet's timestamps and keyframe flag (demuxing only: no decoding).

    Sorting packet pts gives presentation order even with B-frames and names frames exactly at a
    variable frame rate or with a non-zero start time: no frame-rate arithmetic.

    Demuxers seek by pts (MP4, Matroska) or by dts (AVI), and with B-frames a keyframe's dts is
    before its pts. Keyframe j is sought at max(dts_j, min(pts_j, dts_j+1 - 1)): at or past its own
    timestamp and before the next keyframe's under either convention, so the seek lands on it
    (or, when keyframes are closer than the reorder delay, on an earlier one), never after it.
    """
    packets = []  # (pts, dts, keyframe)
    for p in container.demux(stream):
        if not p.size or p.is_discard:  # end-of-stream flush; samples an edit list cuts (never shown)
            continue
        if p.pts is None:
            raise _Unseekable("a packet has no pts")
        packets.append((p.pts, p.pts if p.dts is None else p.dts, p.is_keyframe))
    packets.sort()
    if not packets:
        raise _Unseekable("no packets")
    if not packets[0][2]:
        raise _Unseekable("the first frame is not a keyframe")
    index = {pts: i for i, (pts, _, _) in enumerate(packets)}
    if len(index) != len(packets):
        raise _Unseekable("two packets share a pts")
    keys = [(i, pts, dts) for i, (pts, dts, key) in enumerate(packets) if key]
    next_dts = [dts for _, _, dts in keys[1:]] + [None]
    seek_to = [
        max(dts, pts if nxt is None else min(pts, nxt - 1)) for (_, pts, dts), nxt in zip(keys, next_dts)
    ]
    return _FrameTable(index, [i for i, _, _ in keys], seek_to)


def _read_seeking(container: InputContainer, stream: VideoStream, wanted: list[int]) -> dict[int, np.ndarray]:
    """Wanted frames via keyframe seeks; raises ``_Unseekable`` where that might differ from decoding
    from the start.

    After a seek to keyframe k, frames before k are skipped (decoded from an earlier keyframe, or
    the leading B-frames of an open GOP, which reference frames before the seek); from k on every
    decoded frame must carry the pts of exactly the next frame in the table. A missing, unknown or
    out-of-order pts, a seek that lands after its keyframe, or a stream that ends early raise.
    """
    import av

    table = _frame_table(container, stream)
    last = len(table.index) - 1
    targets = sorted({min(i, last) for i in wanted})  # indices past the end: the last frame
    keep = set(targets)
    got: dict[int, np.ndarray] = {}
    frames: Iterator[VideoFrame] | None = None
    expect, started = 0, False  # the next frame index the decoder must give; past the skipped frames?
    try:
        for t in targets:
            k = bisect_right(table.keyframes, t) - 1
            key = table.keyframes[k]
            if (
                frames is None or key - expect > SEEK_MIN_SKIP
            ):  # the table's demux pass left the file at its end
                container.seek(table.seek_to[k], backward=True, stream=stream)
                frames, expect, started = _decode_from(container, stream), key, False
            for frame in frames:
                i = None if frame.pts is None else table.index.get(frame.pts)
                if i is None:
                    raise _Unseekable(f"decoded a frame with pts {frame.pts}, which no packet has")
                if not started and i < expect:
                    continue
                if i != expect:
                    raise _Unseekable(f"expected frame {expect}, decoded frame {i}")
                started, expect = True, expect + 1
                if i in keep:
                    got[i] = frame.to_ndarray(format="rgb24")
                if i == t:
                    break
            else:
                raise _Unseekable(f"the stream ended before frame {t}")
    except av.FFmpegError as e:  # decoding from the start decides whether the file is broken
        raise _Unseekable(f"decoder error: {e}") from e
    return {i: got[min(i, last)] for i in wanted}
