"""`promptlab data check`: is a dataset on disk complete, and if not, what exactly to fix."""

from __future__ import annotations

import glob
import os
import random
from dataclasses import dataclass, field
from pathlib import Path

from promptlab.data.images import ImageReadError, read_image
from promptlab.data.items import SPLITS
from promptlab.data.readers import fix_hint
from promptlab.data.registry import fill_list_names, get_spec, load_dataset

# Placeholder values `data check` reads video list names with (fold 1, seed 1, 16 shots).
CHECK_LIST_PARAMS = {"fold": 1, "seed": 1, "shots": 16}


def _probe(path: str, video: bool) -> None:
    """Decode an image, or the first frame of a video (file or frame folder)."""
    if not video:
        read_image(path)
        return
    from promptlab.video.decode import VideoReadError, count_frames, read_frames

    try:
        if count_frames(path) < 1:
            raise VideoReadError(f"video {path} has no frames")
        read_frames(path, [0])
    except VideoReadError as e:
        raise ImageReadError(str(e)) from e


@dataclass
class CheckReport:
    """What `check_dataset` found for one dataset.

    Attributes:
        name: Dataset name.
        found: Whether the dataset's folder exists under the root.
        problems: One line per problem, each naming the file and the fix.
        counts: Items per split as read.
        num_classes: Classes as read (None when the dataset could not be read).
        expected_classes: The YAML's `num_classes`.
    """

    name: str
    found: bool = True
    problems: list[str] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)
    num_classes: int | None = None
    expected_classes: int | None = None

    @property
    def ok(self) -> bool:
        """True when the dataset is present and has no problems."""
        return self.found and not self.problems


def check_dataset(name: str | Path, root: str | Path, *, full: bool = False, sample: int = 16) -> CheckReport:
    """Check one dataset under `root`: files, class count, split sizes, readable images.

    Args:
        name: Dataset name or YAML path.
        root: The data root.
        full: Decode every image instead of a sample (slow on the large datasets).
        sample: Images decoded per split when not `full` (a fixed-seed sample, so reruns agree).
    """
    spec = fill_list_names(get_spec(name), CHECK_LIST_PARAMS)
    video = spec.modality == "video"
    report = CheckReport(spec.name, expected_classes=spec.num_classes)
    root = Path(os.path.abspath(os.path.expanduser(str(root))))
    dataset_dir = root / spec.folder
    if not dataset_dir.is_dir():
        report.found = False
        report.problems.append(f"folder {dataset_dir} not found.{fix_hint(spec, '*')}")
        return report
    for rel, what in spec.required_paths():
        if not (dataset_dir / rel).exists() and not (video and glob.glob(str(dataset_dir / rel))):
            report.problems.append(f"{what} missing: {dataset_dir / rel}.{fix_hint(spec, rel)}")
    if report.problems:
        return report
    try:
        ds = load_dataset(spec.yaml_path, root, check_files=False, params=CHECK_LIST_PARAMS)
    except (OSError, ValueError) as e:
        report.problems.append(str(e))
        return report

    report.counts = {s: len(ds.split(s)) for s in SPLITS}
    report.num_classes = ds.num_classes
    if spec.num_classes is not None and ds.num_classes != spec.num_classes:
        report.problems.append(
            f"{ds.num_classes} classes found, {spec.num_classes} expected: the split or class files are "
            f"incomplete.{fix_hint(spec, spec.split_file or spec.classnames_file or '*')}"
        )
    for split, n in spec.expected.items():
        if report.counts[split] != n:
            report.problems.append(
                f"{split} has {report.counts[split]} items, {n} expected.{fix_hint(spec, '*')}"
            )

    rng = random.Random(0)
    for split in SPLITS:
        items = ds.split(split)
        exists = os.path.exists if video else os.path.isfile  # a video may be a frame folder
        missing = [it.path for it in items if not exists(it.path)]
        if missing:
            report.problems.append(
                f"{split}: {len(missing)} of {len(items)} images missing, e.g. {missing[:3]}."
                f"{fix_hint(spec, spec.image_dir)}"
            )
        gone = set(missing)
        present = [it for it in items if it.path not in gone]
        chosen = present if full else rng.sample(present, min(sample, len(present)))
        bad = []
        for it in chosen:
            try:
                _probe(it.path, video)
            except ImageReadError as e:
                bad.append(str(e))
        if bad:
            scope = "all" if full else f"a sample of {len(chosen)}"
            report.problems.append(
                f"{split}: {len(bad)} unreadable image(s) in {scope}: {bad[:3]}. "
                "Re-download or re-extract these files."
            )
    return report
