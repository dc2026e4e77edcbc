"""Video data: real tiny videos written with PyAV's encoder and frame folders, frame sampling,
per-clip augmentation, multi-view averaging, bad-file skipping and the dataset layouts."""

from __future__ import annotations

import json
import logging
import random
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from promptlab.data import load_dataset
from promptlab.data.check import check_dataset
from promptlab.video import decode as video_decode
from promptlab.video.data import (
    ClipTransform,
    VideoBatches,
    VideoDataset,
    VideoReadError,
    count_frames,
    read_frames,
    sample_frame_indices,
)

av = pytest.importorskip("av")
N_FRAMES, SIZE = 16, 32


def frame_value(i: int) -> int:
    return 8 + 15 * i  # frame i is a flat grey of this level: decoding shows which frame came back


def write_video(path: Path, n: int = N_FRAMES, size: int = SIZE) -> Path:
    """A real video file (MPEG-4 part 2 in AVI or MP4) whose frame i is a flat grey ``frame_value(i)``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as out:
        stream = out.add_stream("mpeg4", rate=8)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        stream.options = {"qscale": "1"}
        for i in range(n):
            img = np.full((size, size, 3), frame_value(i), dtype=np.uint8)
            out.mux(stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")))
        out.mux(stream.encode())
    return path


def write_frames(folder: Path, n: int = N_FRAMES, size: int = SIZE) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(np.full((size, size, 3), frame_value(i), dtype=np.uint8)).save(
            folder / f"img_{i + 1:05d}.png"
        )
    return folder


# ---------------------------------------------------------------------- sampling
def test_train_sampling_one_frame_per_segment_and_seeded() -> None:
    g = torch.Generator().manual_seed(3)
    for n, T in [(16, 4), (300, 8), (33, 32)]:
        idx = sample_frame_indices(n, T, train=True, generator=g)
        seg = n // T
        assert len(idx) == T
        assert all(i * seg <= f < (i + 1) * seg for i, f in enumerate(idx)), (n, T, idx)
    a = sample_frame_indices(300, 8, train=True, generator=torch.Generator().manual_seed(5))
    b = sample_frame_indices(300, 8, train=True, generator=torch.Generator().manual_seed(5))
    c = sample_frame_indices(300, 8, train=True, generator=torch.Generator().manual_seed(6))
    assert a == b and a != c
    # a video shorter than T repeats frames evenly, in order
    short = sample_frame_indices(5, 8, train=True, generator=g)
    assert len(short) == 8 and short == sorted(short) and set(short) == set(range(5))


def test_test_sampling_middle_frames_and_views() -> None:
    assert sample_frame_indices(16, 4, train=False) == [2, 6, 10, 14]  # middle of each 4-frame segment
    views = [sample_frame_indices(16, 4, train=False, view=v, views=2) for v in range(2)]
    assert views == [[1, 5, 9, 13], [3, 7, 11, 15]]
    assert sample_frame_indices(3, 4, train=False) == [0, 1, 1, 2]


# ---------------------------------------------------------------------- decoding
@pytest.mark.parametrize("suffix", [".avi", ".mp4"])
def test_read_video_file(tmp_path: Path, suffix: str) -> None:
    path = write_video(tmp_path / f"v{suffix}")
    assert count_frames(str(path)) == N_FRAMES
    frames = read_frames(str(path), [0, 5, 15, 5])
    assert frames.shape == (4, 3, SIZE, SIZE) and frames.dtype == torch.uint8
    levels = frames.float().mean(dim=(1, 2, 3))
    expected = torch.tensor([frame_value(i) for i in (0, 5, 15, 5)], dtype=torch.float)
    torch.testing.assert_close(levels, expected, atol=3.0, rtol=0)  # lossy codec: close, not exact


def test_read_frame_folder_exact(tmp_path: Path) -> None:
    folder = write_frames(tmp_path / "clip")
    assert count_frames(str(folder)) == N_FRAMES
    frames = read_frames(str(folder), [3, 9])
    assert frames[0].unique().tolist() == [frame_value(3)] and frames[1].unique().tolist() == [frame_value(9)]


def test_unreadable_inputs_raise_naming_the_path(tmp_path: Path) -> None:
    bad = tmp_path / "broken.avi"
    bad.write_bytes(b"not a video at all" * 10)
    empty = tmp_path / "empty_frames"
    empty.mkdir()
    for p in (bad, empty, tmp_path / "missing.mp4"):
        with pytest.raises(VideoReadError, match=p.name):
            read_frames(str(p), [0])
    with pytest.raises(VideoReadError, match=bad.name):
        count_frames(str(bad))


# ---------------------------------------------------------------------- keyframe seeking
def write_textured(path: Path, n: int = 120, gop: int = 12, bframes: int = 0, vfr: bool = False) -> Path:
    """MPEG-4 part 2 with keyframes exactly every ``gop`` frames (no scene-cut keyframes) and textured,
    moving frames that all differ, so a frame decoded from the wrong reference would show."""
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
    gaps = random.Random(1).choices([20, 40, 40, 100], k=n)  # ms between frames when vfr
    with av.open(str(path), "w") as out:
        stream = out.add_stream("mpeg4", rate=25)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        stream.gop_size = gop
        stream.codec_context.max_b_frames = bframes
        stream.options = {"sc_threshold": "1000000000"}
        if vfr:
            stream.codec_context.time_base = Fraction(1, 1000)
        for i in range(n):
            img = np.roll(base, (i, 2 * i), axis=(0, 1))
            frame = av.VideoFrame.from_ndarray(img, format="rgb24")
            if vfr:
                frame.pts, frame.time_base = sum(gaps[:i]), Fraction(1, 1000)
            out.mux(stream.encode(frame))
        out.mux(stream.encode())
    return path


def keyframes(path: Path) -> list[int]:
    """Frame indices (presentation order) of the keyframe packets."""
    with av.open(str(path)) as c:
        packets = sorted((p.pts, p.is_keyframe) for p in c.demux(c.streams.video[0]) if p.size)
    return [i for i, (_, key) in enumerate(packets) if key]


@pytest.fixture
def decode_spy(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Counts decoding runs (one per seek, or per pass from the start) and the frames they gave."""
    counts = {"runs": 0, "frames": 0}
    real = video_decode._decode_from

    def spy(container, stream):
        counts["runs"] += 1
        for frame in real(container, stream):
            counts["frames"] += 1
            yield frame

    monkeypatch.setattr(video_decode, "_decode_from", spy)
    return counts


CLIPS = {  # name -> (writer kwargs, expected keyframes)
    "gop12.avi": ({"gop": 12}, list(range(0, 120, 12))),
    "one_keyframe.avi": ({"gop": 300}, [0]),
    "bframes.mp4": ({"gop": 12, "bframes": 2}, None),  # B-frames: pts != dts; MP4 seeks by pts
    "vfr_bframes.mkv": ({"gop": 12, "bframes": 2, "vfr": True}, None),  # irregular frame durations
}


@pytest.mark.parametrize("name", list(CLIPS))
def test_seeking_gives_the_frames_of_sequential_decoding(
    tmp_path: Path, name: str, caplog: pytest.LogCaptureFixture, decode_spy: dict[str, int]
) -> None:
    kwargs, expected_keys = CLIPS[name]
    path = write_textured(tmp_path / name, **kwargs)
    keys = keyframes(path)
    assert keys == expected_keys if expected_keys else len(keys) >= 10, keys
    n = 120
    rng = random.Random(name)
    index_sets = [[0, n - 1], [n - 1, 0, 60, 60], list(range(n))[::-1]]  # ends, duplicates, unsorted
    index_sets += [[rng.randrange(n) for _ in range(8)] + [0, n - 1] for _ in range(3)]
    index_sets += [sorted(rng.sample(range(n), 8)) for _ in range(3)]  # segment-sampling-like
    with caplog.at_level(logging.DEBUG, logger="promptlab.video.decode"):
        for idx in index_sets:
            seeking, sequential = read_frames(str(path), idx), read_frames(str(path), idx, seek=False)
            assert seeking.shape == (len(idx), 3, 48, 64)
            assert torch.equal(seeking, sequential), (name, idx)
    assert "from the start" not in caplog.text  # the seeking path answered every time
    decode_spy.update(runs=0, frames=0)
    read_frames(str(path), [75, 5, 110, 40])
    # seeks land on the keyframe at or before each target (by pts in MP4 / Matroska, by dts in AVI):
    # frames 0-5, 36-40, 72-75 and 108-110; with one keyframe, frames 0-110 in one run
    assert decode_spy == ({"runs": 1, "frames": 111} if len(keys) == 1 else {"runs": 4, "frames": 18})
    frames = read_frames(str(path), list(range(n)), seek=False)
    assert all(not torch.equal(frames[i], frames[i + 1]) for i in range(n - 1))  # a wrong frame would show


def test_seeking_skips_gops_it_does_not_need(tmp_path: Path, decode_spy: dict[str, int]) -> None:
    gop12 = str(write_textured(tmp_path / "gop12.avi", gop=12))
    one_key = str(write_textured(tmp_path / "one_keyframe.avi", gop=300))
    idx = [75, 5, 110, 40]  # one frame in each of four GOPs, unsorted
    expected = read_frames(gop12, idx, seek=False)
    assert decode_spy == {"runs": 1, "frames": 111}  # sequential: frames 0..110
    decode_spy.update(runs=0, frames=0)
    assert torch.equal(read_frames(gop12, idx), expected)
    # keyframes 0, 36, 72, 108: one run per target, decoding frames 0-5, 36-40, 72-75 and 108-110
    assert decode_spy == {"runs": 4, "frames": 6 + 5 + 4 + 3}
    decode_spy.update(runs=0, frames=0)
    read_frames(gop12, [5, 7])  # 7 is 2 frames past 5: decoding on beats a seek
    assert decode_spy == {"runs": 1, "frames": 8}
    decode_spy.update(runs=0, frames=0)
    assert torch.equal(read_frames(one_key, idx), read_frames(one_key, idx, seek=False))
    assert decode_spy == {"runs": 2, "frames": 2 * 111}  # one keyframe: nothing to skip, no extra work


def test_first_frames_need_no_frame_table(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = str(write_textured(tmp_path / "gop12.avi", gop=12))
    expected = read_frames(path, [0, 3, 3])

    def no_table(container, stream):
        raise AssertionError("no seek can pay off before frame SEEK_MIN_SKIP: the file is not demuxed first")

    monkeypatch.setattr(video_decode, "_frame_table", no_table)
    assert torch.equal(read_frames(path, [0, 3, 3]), expected)  # e.g. `data check` reading frame 0
    with pytest.raises(AssertionError, match="not demuxed"):
        read_frames(path, [60])


def test_indices_past_the_end_take_the_last_frame(tmp_path: Path) -> None:
    path = str(write_textured(tmp_path / "gop12.avi", gop=12))
    last = read_frames(path, [119], seek=False)[0]
    for seek in (True, False):
        frames = read_frames(path, [3, 130, 119, 125], seek=seek)  # an over-reported length asks for 130
        assert torch.equal(frames[1], last) and torch.equal(frames[2], last) and torch.equal(frames[3], last)
        assert not torch.equal(frames[0], last)
    assert torch.equal(read_frames(path, [200])[0], last) and torch.equal(
        read_frames(path, [200], seek=False)[0], last
    )


def test_seeking_falls_back_when_timestamps_cannot_be_trusted(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    decode_spy: dict[str, int],
) -> None:
    path = str(write_textured(tmp_path / "gop12.avi", gop=12))
    idx = [5, 40, 75, 110]
    expected = read_frames(path, idx, seek=False)
    real_table = video_decode._frame_table

    def seeks_land_late(container, stream):
        table = real_table(container, stream)
        table.seek_to = table.seek_to[1:] + table.seek_to[-1:]  # every seek lands on the next keyframe
        return table

    def unknown_pts(container, stream):
        table = real_table(container, stream)
        del table.index[next(pts for pts, i in table.index.items() if i == 3)]  # frame 3's pts: in no packet
        return table

    for fake, reason in [
        (seeks_land_late, "expected frame 0, decoded frame 12"),
        (unknown_pts, "which no packet has"),
    ]:
        monkeypatch.setattr(video_decode, "_frame_table", fake)
        decode_spy.update(runs=0, frames=0)
        caplog.clear()
        with caplog.at_level(logging.DEBUG, logger="promptlab.video.decode"):
            assert torch.equal(read_frames(path, idx), expected)
        assert "from the start" in caplog.text and reason in caplog.text
        assert (
            decode_spy["runs"] == 2 and decode_spy["frames"] > 111
        )  # a failed try, then 0..110 from the start


@pytest.mark.skipif("libx264" not in av.codecs_available, reason="this PyAV build has no H.264 encoder")
def test_stream_without_timestamps_decodes_from_the_start(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    raw = tmp_path / "clip.h264"  # a raw H.264 stream: its packets have no pts
    with av.open(str(raw), "w", format="h264") as out:
        stream = out.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        stream.gop_size = 12
        for i in range(48):
            out.mux(
                stream.encode(
                    av.VideoFrame.from_ndarray(np.full((48, 64, 3), 5 * i, np.uint8), format="rgb24")
                )
            )
        out.mux(stream.encode())
    with caplog.at_level(logging.DEBUG, logger="promptlab.video.decode"):
        frames = read_frames(str(raw), [40, 10])
    assert torch.equal(frames, read_frames(str(raw), [40, 10], seek=False))
    assert abs(frames[0].float().mean().item() - 200) < 4 and abs(frames[1].float().mean().item() - 50) < 4
    assert "a packet has no pts" in caplog.text


# ---------------------------------------------------------------------- transforms and batches
def test_one_geometry_per_clip_colour_jitter_per_frame() -> None:
    g = torch.Generator().manual_seed(0)
    frame = torch.randint(0, 255, (1, 3, 40, 48), generator=g, dtype=torch.uint8)
    clip = frame.expand(6, -1, -1, -1).contiguous()  # six identical frames
    plain = ClipTransform(32, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), train=True, jitter_p=0.0, gray_p=0.0)
    outs = [plain(clip, torch.Generator().manual_seed(s)) for s in range(6)]
    for out in outs:
        assert out.shape == (6, 3, 32, 32)
        assert torch.equal(out, out[:1].expand_as(out))  # every frame got the same crop and flip
    assert any(not torch.equal(outs[0], o) for o in outs[1:])  # but clips differ
    t = ClipTransform(32, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), train=True)  # ViFi-CLIP's p 0.8 / 0.2
    jittered = [t(clip, torch.Generator().manual_seed(s)) for s in range(6)]
    assert sum(not torch.equal(o, o[:1].expand_as(o)) for o in jittered) >= 3  # colour drawn per frame
    three = ClipTransform(32, (0.5,) * 3, (0.25,) * 3, train=False, crops=3)(clip)
    assert three.shape == (3, 6, 3, 32, 32)
    assert not torch.equal(three[0], three[1])  # left and right crops of a 48-wide frame differ


def test_colour_augmentation_matches_the_reference() -> None:
    """muzairkhattak/ViFi-CLIP datasets/pipeline.py ColorJitter (L1695-1712): when it fires (p 0.8 per
    clip) each frame goes through torchvision.transforms.ColorJitter(brightness=0.4, contrast=0.4,
    saturation=0.2, hue=0.1) as a PIL image, i.e. a fresh get_params draw (random order, factors) per
    frame; GrayScale (L1716-1730): torchvision Grayscale(num_output_channels=3) on every frame."""
    import numpy as np
    import torchvision
    from PIL import Image

    from promptlab.video.data import color_augment, gray_frames, jitter_frames

    frames = torch.randint(
        0, 256, (5, 3, 20, 24), generator=torch.Generator().manual_seed(3), dtype=torch.uint8
    )
    imgs = [f.permute(1, 2, 0).numpy().copy() for f in frames]  # the pipeline's HWC uint8 RGB frames
    worker = torchvision.transforms.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)
    torch.manual_seed(7)  # the reference draws from torch's global RNG; ours from a generator in the same way
    ref = [np.asarray(worker(Image.fromarray(img))) for img in imgs]
    ours = jitter_frames(frames, torch.Generator().manual_seed(7))
    assert torch.equal(ours, torch.from_numpy(np.stack(ref)).permute(0, 3, 1, 2))
    assert len({tuple(f.flatten()[:50].tolist()) for f in ours}) == 5  # five different draws
    gray = torchvision.transforms.Grayscale(num_output_channels=3)
    ref_gray = np.stack([np.asarray(gray(Image.fromarray(img))) for img in imgs])
    assert torch.equal(gray_frames(frames), torch.from_numpy(ref_gray).permute(0, 3, 1, 2))
    # the switches: p 1 / 0 is jitter only, p 0 / 1 grey only, 0 / 0 untouched
    g = torch.Generator().manual_seed(7)
    assert torch.equal(color_augment(frames, torch.Generator().manual_seed(7), 0.0, 0.0), frames)
    assert torch.equal(color_augment(frames, torch.Generator().manual_seed(7), 0.0, 1.0), gray_frames(frames))
    torch.rand((), generator=g)  # color_augment's first draw is the jitter switch
    assert torch.equal(
        color_augment(frames, torch.Generator().manual_seed(7), 1.0, 0.0), jitter_frames(frames, g)
    )


def _items(paths, labels):
    from promptlab.data import Item

    return [Item(str(p), y, f"c{y}") for p, y in zip(paths, labels)]


def test_video_dataset_views_and_skip_bad_files(tmp_path: Path) -> None:
    good = [write_video(tmp_path / f"g{i}.avi") for i in range(3)] + [write_frames(tmp_path / "frames")]
    bad = tmp_path / "bad.avi"
    bad.write_bytes(b"\x00" * 100)
    items = _items(good[:2] + [bad] + good[2:], [0, 1, 0, 1, 0])
    tr = ClipTransform(SIZE, (0.5,) * 3, (0.25,) * 3, train=True)
    batches = VideoBatches(VideoDataset(items, 4, tr), 2, torch.Generator().manual_seed(0), shuffle=True)
    seen = 0
    for _ in range(2):  # two epochs: the bad file never stops one
        for inputs, labels in batches:
            assert inputs["images"].shape[1:] == (4, 3, SIZE, SIZE)
            seen += labels.numel()
    # drop_last: 2 batches of 2 per epoch; the bad file's batch goes on without it
    assert set(batches.skipped) == {str(bad)} and 1 <= len(batches.skipped) <= 2
    assert seen == 2 * 4 - len(batches.skipped)
    ev = ClipTransform(SIZE, (0.5,) * 3, (0.25,) * 3, train=False, crops=3)
    test = VideoBatches(VideoDataset(items, 4, ev, clips=2), 2, torch.Generator(), shuffle=False)
    shapes = [(inputs["images"].shape, labels.tolist()) for inputs, labels in test]
    assert [s[0][1:] for s in shapes] == [(6, 4, 3, SIZE, SIZE)] * 3  # 2 clips x 3 crops per video
    assert sum(len(lab) for _, lab in shapes) == 4 and test.skipped == [str(bad)]


def test_training_clips_deterministic_under_seed(tmp_path: Path) -> None:
    items = _items([write_video(tmp_path / f"v{i}.avi") for i in range(2)], [0, 1])
    tr = ClipTransform(SIZE, (0.5,) * 3, (0.25,) * 3, train=True)

    def epoch(seed: int) -> list[torch.Tensor]:
        torch.manual_seed(seed)
        b = VideoBatches(VideoDataset(items, 4, tr), 1, torch.Generator().manual_seed(seed), shuffle=True)
        return [inputs["images"] for inputs, _ in b]

    a, b, c = epoch(1), epoch(1), epoch(2)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert any(not torch.equal(x, y) for x, y in zip(a, c))


# ---------------------------------------------------------------------- dataset layouts
@pytest.fixture
def video_root(tmp_path: Path) -> Path:
    """UCF101, HMDB51, Kinetics-400 and ViFi-CLIP list layouts with tiny videos and frame folders."""
    root = tmp_path / "data"
    ucf = root / "ucf101"
    classes = ["ApplyEyeMakeup", "Archery", "Basketball"]
    (ucf / "ucfTrainTestlist").mkdir(parents=True)
    (ucf / "ucfTrainTestlist" / "classInd.txt").write_text(
        "".join(f"{i + 1} {c}\n" for i, c in enumerate(classes))
    )
    train, test = [], []
    for i, c in enumerate(classes):
        for g in (1, 2):
            rel = f"{c}/v_{c}_g0{g}_c01.avi"
            if (i, g) == (1, 2):
                write_frames(
                    ucf / "UCF-101" / c / f"v_{c}_g0{g}_c01", n=8
                )  # a frame folder instead of a file
            else:
                write_video(ucf / "UCF-101" / rel, n=8)
            (train if g == 1 else test).append(rel)
        train_lines = "".join(f"{r} {classes.index(r.split('/')[0]) + 1}\n" for r in train)
    for fold in (1, 2):
        (ucf / "ucfTrainTestlist" / f"trainlist0{fold}.txt").write_text(
            train_lines if fold == 1 else "".join(f"{r} 1\n" for r in test)
        )
        (ucf / "ucfTrainTestlist" / f"testlist0{fold}.txt").write_text(
            "".join(f"{r}\n" for r in (test if fold == 1 else train))
        )
    hmdb = root / "hmdb51"
    (hmdb / "testTrainMulti_7030_splits").mkdir(parents=True)
    for c in ("brush_hair", "cartwheel"):
        lines = []
        for k, tag in enumerate("120"):
            write_video(hmdb / "hmdb51_org" / c / f"{c}_clip{k}.avi", n=6)
            lines.append(f"{c}_clip{k}.avi {tag}\n")
        (hmdb / "testTrainMulti_7030_splits" / f"{c}_test_split1.txt").write_text("".join(lines))
    k4 = root / "k400"
    (k4 / "annotations").mkdir(parents=True)
    rows = {
        "train": [("abseiling", "aaa", 0, 10), ("air drumming", "bbb", 5, 15), ("abseiling", "gone", 0, 10)],
        "val": [("air drumming", "ccc", 1, 11)],
    }
    for split, rs in rows.items():
        lines = ["label,youtube_id,time_start,time_end,split"]
        for lab, yid, s, e in rs:
            lines.append(f"{lab},{yid},{s},{e},{split}")
            if yid != "gone":
                write_video(k4 / split / f"{yid}_{s:06d}_{e:06d}.mp4", n=6)
        (k4 / "annotations" / f"{split}.csv").write_text("\n".join(lines) + "\n")
    vifi = root / "vificlip"
    (vifi / "labels").mkdir(parents=True)
    (vifi / "labels" / "ucf_101_labels.csv").write_text(
        "id,name\n" + "".join(f"{i},{c}\n" for i, c in enumerate(classes))
    )
    (vifi / "datasets_splits" / "ucf_splits").mkdir(parents=True)
    (vifi / "datasets_splits" / "ucf_splits" / "train1_few_shot_2.txt").write_text(
        "".join(f"{Path(r).name} {classes.index(r.split('/')[0])}\n" for r in train + test)
    )  # bare names, as ViFi-CLIP's
    (vifi / "datasets_splits" / "ucf_splits" / "train1_few_shot_16.txt").write_text(
        ""
    )  # `data check` reads K=16
    (vifi / "datasets_splits" / "ucf_splits" / "val1.txt").write_text(
        "".join(f"{Path(r).name} {classes.index(r.split('/')[0])}\n" for r in test)
    )
    return root


def test_ucf101_official_splits(video_root: Path) -> None:
    ds = load_dataset("ucf101_video", video_root, params={"fold": 1})
    assert ds.classnames == ["ApplyEyeMakeup", "Archery", "Basketball"]
    assert [it.label for it in ds.train] == [0, 1, 2] and [it.label for it in ds.test] == [0, 1, 2]
    assert ds.test[1].path.endswith("v_Archery_g02_c01") and Path(ds.test[1].path).is_dir()  # frame folder
    ds2 = load_dataset("ucf101_video", video_root, params={"fold": 2})
    assert [Path(it.path).name for it in ds2.test] == [Path(it.path).name for it in ds.train]


def test_hmdb51_kinetics_and_vifi_lists(video_root: Path) -> None:
    hm = load_dataset("hmdb51", video_root, params={"fold": 1})
    assert hm.classnames == ["brush hair", "cartwheel"]
    assert (len(hm.train), len(hm.test)) == (2, 2) and all(
        "clip0" in it.path for it in hm.train
    )  # 1 = train, 0 unused
    k4 = load_dataset("kinetics400", video_root)
    assert k4.classnames == ["abseiling", "air drumming"]
    assert (len(k4.train), len(k4.test)) == (2, 1)  # the clip gone from YouTube is left out, not an error
    fs = load_dataset("ucf101_vifi_fewshot", video_root, params={"shots": 2, "fold": 1, "seed": 1})
    assert len(fs.train) == 6 and len(fs.test) == 3 and all(Path(it.path).exists() for it in fs.train)
    assert Path(fs.test[1].path).is_dir()  # a bare list name found as a frame folder under a class folder


def test_data_check_covers_video(video_root: Path) -> None:
    for name in ("ucf101_video", "hmdb51", "ucf101_vifi_fewshot"):
        report = check_dataset(name, video_root, full=True)
        assert report.found and report.counts["test"] >= 2, name
        # the tiny layout has 3 of the 101 classes: the only complaint is the class count
        assert all("classes found" in p for p in report.problems), (name, report.problems)
    broken = video_root / "hmdb51" / "hmdb51_org" / "cartwheel" / "cartwheel_clip1.avi"
    broken.write_bytes(b"garbage")
    report = check_dataset("hmdb51", video_root, full=True)
    assert (
        not report.ok
        and "unreadable" in " ".join(report.problems)
        and "cartwheel_clip1.avi" in " ".join(report.problems)
    )
    assert json.dumps(report.counts)  # plain data
