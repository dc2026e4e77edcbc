"""``DatasetSpec``: the parsed contents of one dataset YAML.

Its own module, below both the readers (which read a spec) and the registry (which parses and finds
specs), so that neither imports the other for it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class DatasetSpec:
    """The parsed contents of one dataset YAML (keys are exactly these field names).

    Attributes:
        name: Dataset name used by recipes (`data.name`).
        reader: Layout: "split_file", "fgvc_aircraft", "imagenet_folders" or "custom".
        folder: The dataset's folder under the data root.
        template: Hand-crafted prompt with one `{}` for the class name.
        image_dir: Image folder relative to `folder`; split-file paths are relative to it.
        split_file: CoOp split file relative to `folder` (split_file; optional for custom).
        classnames_file: Class list relative to `folder` (classnames.txt, variants.txt).
        splits: Split name -> list file (fgvc_aircraft) or sub-folder of `image_dir`
            (imagenet_folders).
        folder_names: imagenet_folders only: "wnid" (folders named n01440764...) or "index"
            (folders named 0..N-1, ImageNetV2).
        image_ext: Suffix added to the image ids of list files (".jpg" for FGVCAircraft).
        csv: custom only: CSV of `path,label[,split]` relative to `folder`.
        split_ratio: custom only, without a split: (train, val) fractions per class.
        split_seed: custom only: seed of that per-class split.
        num_classes: Expected class count; labels at or above it are errors.
        test_only: The dataset is only evaluated on (ImageNet shifts).
        expected: Expected item count per split, checked by `promptlab data check`.
        download: File or folder (relative to `folder`, or "*") -> how to obtain it.
        urls: File name -> URL: mirrors for the files `promptlab data prepare` fetches (the names
            `promptlab data prepare --list` shows); the published checksums still apply.
        generator: Procedural datasets only: `{_component_: dotted.path, **kwargs}`, called as
            `fn(data_root, **kwargs)` to write the dataset on first use (`runner.ensure_data`).
        modality: "image", or "video" (items are video files or frame folders, read by
            `promptlab.video`); `reader` may then be a dotted path to a reader function.
        yaml_path: Where this spec was read from (for error messages).
    """

    name: str
    reader: str
    folder: str
    template: str
    image_dir: str = "."
    split_file: str | None = None
    classnames_file: str | None = None
    splits: dict[str, str] = field(default_factory=dict)
    folder_names: str = "wnid"
    image_ext: str = ""
    csv: str | None = None
    split_ratio: tuple[float, float] = (0.5, 0.2)
    split_seed: int = 1
    num_classes: int | None = None
    test_only: bool = False
    expected: dict[str, int] = field(default_factory=dict)
    download: dict[str, str] = field(default_factory=dict)
    urls: dict[str, str] = field(default_factory=dict)
    generator: dict | None = None
    modality: str = "image"
    yaml_path: Path | None = None

    def required_paths(self) -> list[tuple[str, str]]:
        """(relative path under `folder`, what it is) for every file or folder the reader needs."""
        out = [(self.image_dir, "image folder")]
        if self.split_file:
            out.append((self.split_file, "split file"))
        if self.classnames_file:
            out.append((self.classnames_file, "class list"))
        if self.csv:
            out.append((self.csv, "CSV file"))
        for split, rel in self.splits.items():
            if self.reader == "imagenet_folders":
                out.append((Path(self.image_dir, rel).as_posix(), f"{split} image folder"))
            else:
                out.append((rel, f"{split} list"))
        seen: set[str] = set()
        return [(p, w) for p, w in out if not (p in seen or seen.add(p))]
