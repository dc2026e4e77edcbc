"""`promptlab data prepare`: from nothing to CoOp's DATASETS.md layout, one command per dataset.

Each dataset has a `Plan`: the files it needs (`Source`) and the steps that turn them into the
layout (`Unpack` an archive, `Place` a file, `Build` a folder: ImageNet's tars). Files are fetched into ``$DATA/downloads/`` with
resume and checksum (`promptlab.data.download`), archives are extracted as hostile input
(`promptlab.data.extract`), and every dataset ends with `promptlab data check`.

Where the URLs come from:

- the official archives of eight datasets (and the MD5s of ImageNet's): torchvision's dataset
  classes, which keep their URLs and MD5s up to date (Caltech101 moved to data.caltech.edu,
  EuroSAT to Hugging Face). Their source is *read* (`ast`), not imported, so fetching and
  extracting data does not load torch (the final `data check` decodes images with it);
- CoOp's split files and ImageNet's classnames.txt: the Google Drive files of CoOp's DATASETS.md.
  Nobody publishes their checksums; each split file is validated against the split-file schema,
  and `data check` then compares its sizes with the dataset YAML;
- the rest (ImageNet-A/-R/-Sketch/V2, UCF101's middle frames) from their authors' pages, with the
  MD5 where the authors' loaders publish one.

Mirrors: ``--url NAME=URL`` on the command line, or ``urls: {NAME: URL}`` in the dataset YAML,
replaces a file's URL (NAME is the file's name in ``downloads/``); the published checksum still
applies, so a mirror must serve the same bytes.

Guided datasets: ImageNet needs an account and Stanford Cars' host is gone. For them (and for any
file whose download fails) the command says which file to get, from where, and the exact path to
put it at; the next run picks it up, verifies it and goes on (for ImageNet: unpacks the train tar's
per-class tars and sorts the validation images into class folders by the devkit's labels).
"""

from __future__ import annotations

import ast
import importlib.util
import json
import re
import shutil
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from promptlab.data.download import DownloadError, download, gdrive, verify
from promptlab.data.extract import (
    ArchiveError,
    extract,
    merge_into,
    scratch_dir,
    unpack_all,
    unpack_class_tars,
)
from promptlab.data.readers import is_split_row

DOWNLOADS = "downloads"
_MD5 = re.compile(r"^[0-9a-f]{32}$")


@dataclass(frozen=True)
class Source:
    """One file a dataset needs, as fetched into ``$DATA/downloads/<name>``.

    Attributes:
        name: File name; also the key of URL overrides (``--url NAME=URL``, the YAML's ``urls``).
        url: Where to fetch it; None for a file that is either read from torchvision (below) or
            only obtainable by hand (`manual`).
        md5: Published MD5, when there is one.
        torchvision: ``(module, class)`` of the torchvision dataset whose source holds the URL and
            MD5 of `name`.
        manual: For a file fetched by hand: where a person gets it.
        page: A page a person can open when the download fails (Google Drive's viewer).
        local: A path under the data root holding the same file (ImageNet's classnames.txt for
            its variants); used instead of a download when present.
        optional: A failure is a warning (files of the layout that no reader needs).
    """

    name: str
    url: str | None = None
    md5: str | None = None
    torchvision: tuple[str, str] | None = None
    manual: str = ""
    page: str = ""
    local: str = ""
    optional: bool = False


@dataclass(frozen=True)
class Unpack:
    """Extract ``downloads/<archive>`` and move parts of it: path in the archive -> path under the
    dataset folder ("." for the folder itself), or under ``downloads/`` with `to_downloads`
    (an archive inside an archive)."""

    archive: str
    moves: Mapping[str, str]
    to_downloads: bool = False


@dataclass(frozen=True)
class Place:
    """Copy ``downloads/<source>`` to `dest` under the dataset folder."""

    source: str
    dest: str


@dataclass(frozen=True)
class Build:
    """Make the folder `dest` (under the dataset folder) from ``downloads/<inputs>`` with
    ``fn(input paths, out)``, where `out` is a scratch folder renamed to `dest` only when `fn`
    returns: what torchvision-free code must do beyond unpacking (ImageNet's tars)."""

    inputs: tuple[str, ...]
    dest: str
    fn: Callable[[list[Path], Path], None]


Step = Unpack | Place | Build


@dataclass(frozen=True)
class Plan:
    """How one dataset is prepared. `guide` (format fields `root`, `folder`): what a person must
    do that no step can (ImageNet's images), shown while the image folder is missing."""

    sources: tuple[Source, ...]
    steps: tuple[Step, ...]
    guide: str = ""


def _gdrive(name: str, file_id: str, **kw) -> Source:
    return Source(name, gdrive(file_id), page=f"https://drive.google.com/file/d/{file_id}/view", **kw)


def _with_split(
    sources: tuple[Source, ...], steps: tuple[Unpack | Place, ...], split: str, file_id: str
) -> Plan:
    """A split-file dataset: `sources` and `steps`, plus CoOp's split file (Google Drive id from its
    DATASETS.md) placed in the dataset folder."""
    return Plan((*sources, _gdrive(split, file_id)), (*steps, Place(split, split)))


def _one_archive(archive: Source, moves: Mapping[str, str], split: str, file_id: str) -> Plan:
    return _with_split((archive,), (Unpack(archive.name, moves),), split, file_id)


def _tv(name: str, module: str, cls: str) -> Source:
    return Source(name, torchvision=(module, cls))


IMAGENET_CLASSNAMES = _gdrive(
    "imagenet_classnames.txt", "1-61f_ol79pViBFDG_IDlUQSwoLcn2XXF", local="imagenet/classnames.txt"
)
CARS_HOST_GONE = (
    "Stanford Cars: the official host (ai.stanford.edu/~jkrause/cars) is gone; get the original "
    "file from a copy you trust (a colleague, an institutional mirror; pass its URL with --url)"
)
IMAGENET_BY_HAND = (
    "ImageNet needs an account: sign in at https://image-net.org and download it from the ILSVRC 2012 "
    "page (https://image-net.org/challenges/LSVRC/2012/2012-downloads.php)"
)
IMAGENET_GUIDE = """\
Alternatively, if ImageNet is already extracted elsewhere as train/<wnid>/*.JPEG and val/<wnid>/*.JPEG,
link it instead of downloading: ln -s /path/to/train {root}/{folder}/images/train (and the same for
val), then rerun `promptlab data prepare imagenet --root {root}`."""


def _imagenet_val_wnids(devkit: Path) -> list[str]:
    """The wnid of each validation image, in file-name order, from ILSVRC-2012's devkit:
    ``data/ILSVRC2012_validation_ground_truth.txt`` (one ILSVRC2012_ID per image) mapped through the
    leaf synsets of ``data/meta.mat`` (read by scipy's MATLAB reader: no pickle, no torch)."""
    import scipy.io

    with scratch_dir(devkit.parent, devkit.name) as tmp:
        unpack_all(devkit, tmp)
        found = {p.name: p for p in tmp.rglob("*") if p.parent.name == "data"}
        missing = {"meta.mat", "ILSVRC2012_validation_ground_truth.txt"} - set(found)
        if missing:
            raise ArchiveError(f"{devkit.name}: no data/{sorted(missing)} inside (not ILSVRC-2012's devkit?)")
        try:
            synsets = scipy.io.loadmat(found["meta.mat"], squeeze_me=True)["synsets"]
        except Exception as e:  # scipy's MatReadError and friends: a damaged or foreign file
            raise ArchiveError(f"{devkit.name}: cannot read data/meta.mat ({e})") from e
        truth = found["ILSVRC2012_validation_ground_truth.txt"].read_text().split()
    wnid_of = {
        int(i): str(w)
        for i, w, c in zip(synsets["ILSVRC2012_ID"], synsets["WNID"], synsets["num_children"])
        if c == 0
    }
    try:
        return [wnid_of[int(t)] for t in truth]
    except (KeyError, ValueError) as e:
        raise ArchiveError(f"{devkit.name}: validation ground truth names an unknown class ({e})") from e


def _imagenet_train(paths: list[Path], out: Path) -> None:
    unpack_class_tars(paths[0], out)


def _imagenet_val(paths: list[Path], out: Path) -> None:
    """Extract the 50,000 flat validation images, then sort them into wnid folders (as Dassl reads them)."""
    val_tar, devkit = paths
    wnids = _imagenet_val_wnids(devkit)
    unpack_all(val_tar, out)
    images = sorted(p for p in out.iterdir() if p.is_file())
    if len(images) != len(wnids):
        raise ArchiveError(f"{val_tar.name}: {len(images)} images but the devkit labels {len(wnids)}")
    for image, wnid in zip(images, wnids):
        (out / wnid).mkdir(exist_ok=True)
        image.rename(out / wnid / image.name)


def _imagenet_tar(name: str) -> Source:
    return Source(name, torchvision=("imagenet", ""), manual=IMAGENET_BY_HAND)


IMAGENET = Plan(
    (
        IMAGENET_CLASSNAMES,
        _imagenet_tar("ILSVRC2012_img_train.tar"),
        _imagenet_tar("ILSVRC2012_img_val.tar"),
        _imagenet_tar("ILSVRC2012_devkit_t12.tar.gz"),
    ),
    (
        Place(IMAGENET_CLASSNAMES.name, "classnames.txt"),
        Build(("ILSVRC2012_img_train.tar",), "images/train", _imagenet_train),
        Build(("ILSVRC2012_img_val.tar", "ILSVRC2012_devkit_t12.tar.gz"), "images/val", _imagenet_val),
    ),
    IMAGENET_GUIDE,
)


def _variant(folder_in_archive: str, archive: Source, to: str) -> Plan:
    """An ImageNet shift: its archive's class folders, plus ImageNet's classnames.txt."""
    return Plan(
        (archive, IMAGENET_CLASSNAMES),
        (Unpack(archive.name, {folder_in_archive: to}), Place(IMAGENET_CLASSNAMES.name, "classnames.txt")),
    )


# The 11 benchmarks and the 4 ImageNet shifts, in CoOp's DATASETS.md order; `all` prepares these.
PLANS: dict[str, Plan] = {
    "imagenet": IMAGENET,
    "caltech101": _with_split(
        (_tv("caltech-101.zip", "caltech", "Caltech101"),),
        (  # the zip holds caltech-101/101_ObjectCategories.tar.gz
            Unpack(
                "caltech-101.zip",
                {"caltech-101/101_ObjectCategories.tar.gz": "101_ObjectCategories.tar.gz"},
                True,
            ),
            Unpack("101_ObjectCategories.tar.gz", {"101_ObjectCategories": "101_ObjectCategories"}),
        ),
        "split_zhou_Caltech101.json",
        "1hyarUivQE36mY6jSomru6Fjd-JzwcCzN",
    ),
    "oxford_pets": _with_split(
        (
            _tv("images.tar.gz", "oxford_iiit_pet", "OxfordIIITPet"),
            _tv("annotations.tar.gz", "oxford_iiit_pet", "OxfordIIITPet"),
        ),
        (
            Unpack("images.tar.gz", {"images": "images"}),
            Unpack("annotations.tar.gz", {"annotations": "annotations"}),
        ),
        "split_zhou_OxfordPets.json",
        "1501r8Ber4nNKvmlFVQZ8SeUHTcdTTEqs",
    ),
    "stanford_cars": _with_split(
        (
            Source("cars_train.tgz", md5="065e5b463ae28d29e77c1b4b166cfe61", manual=CARS_HOST_GONE),
            Source("cars_test.tgz", md5="4ce7ebf6a94d07f1952d94dd34c4d501", manual=CARS_HOST_GONE),
            Source(
                "car_devkit.tgz", md5="c3b158d763b6e2245038c8ad08e45376", manual=CARS_HOST_GONE, optional=True
            ),
            Source(
                "cars_test_annos_withlabels.mat",
                md5="b0a2b23655a3edd16d84508592a98d10",
                manual=CARS_HOST_GONE,
                optional=True,
            ),
        ),
        (
            Unpack("cars_train.tgz", {"cars_train": "cars_train"}),
            Unpack("cars_test.tgz", {"cars_test": "cars_test"}),
            Unpack("car_devkit.tgz", {"devkit": "devkit"}),
            Place("cars_test_annos_withlabels.mat", "cars_test_annos_withlabels.mat"),
        ),
        "split_zhou_StanfordCars.json",
        "1ObCFbaAgVu0I-k_Au-gIUcefirdAuizT",
    ),
    "oxford_flowers": _with_split(
        (
            _tv("102flowers.tgz", "flowers102", "Flowers102"),
            _tv("imagelabels.mat", "flowers102", "Flowers102"),
            _gdrive("cat_to_name.json", "1AkcxCXeK_RCGCEC_GvmWxjcjaNhu-at0", optional=True),
        ),
        (
            Unpack("102flowers.tgz", {"jpg": "jpg"}),
            Place("imagelabels.mat", "imagelabels.mat"),
            Place("cat_to_name.json", "cat_to_name.json"),
        ),
        "split_zhou_OxfordFlowers.json",
        "1Pp0sRXzZFZq15zVOzKjKBu4A9i01nozT",
    ),
    "food101": _one_archive(
        _tv("food-101.tar.gz", "food101", "Food101"),
        {"food-101": "."},
        "split_zhou_Food101.json",
        "1QK0tGi096I0Ba6kggatX1ee6dJFIcEJl",
    ),
    "fgvc_aircraft": Plan(  # the official list files are the split
        (_tv("fgvc-aircraft-2013b.tar.gz", "fgvc_aircraft", "FGVCAircraft"),),
        (Unpack("fgvc-aircraft-2013b.tar.gz", {"fgvc-aircraft-2013b/data": "."}),),
    ),
    "sun397": _one_archive(
        _tv("SUN397.tar.gz", "sun397", "SUN397"),
        {"SUN397": "SUN397"},
        "split_zhou_SUN397.json",
        "1y2RD81BYuiyvebdN-JymPfyWYcd8_MUq",
    ),
    "dtd": _one_archive(
        _tv("dtd-r1.0.1.tar.gz", "dtd", "DTD"),
        {"dtd": "."},
        "split_zhou_DescribableTextures.json",
        "1u3_QfB467jqHgNXC00UIzbLZRQCg2S7x",
    ),
    "eurosat": _one_archive(
        _tv("EuroSAT.zip", "eurosat", "EuroSAT"),
        {"2750": "2750"},
        "split_zhou_EuroSAT.json",
        "1Ip7yaCWFi0eaOFUGga0lUdVi_DDQth1o",
    ),
    "ucf101": _one_archive(
        _gdrive("UCF-101-midframes.zip", "10Jqome3vtUA2keJkNanAiFpgbyC9Hc2O"),
        {"UCF-101-midframes": "UCF-101-midframes"},
        "split_zhou_UCF101.json",
        "1I0S0q91hJfsV9Gf4xDIjgDq4AqBNJb1y",
    ),
    "imagenetv2": _variant(
        "imagenetv2-matched-frequency-format-val",
        Source(
            "imagenetv2-matched-frequency.tar.gz",
            "https://huggingface.co/datasets/vaishaal/ImageNetV2/resolve/main/imagenetv2-matched-frequency.tar.gz",
        ),
        "imagenetv2-matched-frequency-format-val",
    ),
    "imagenet_sketch": _variant(
        "sketch", _gdrive("ImageNet-Sketch.zip", "1Mj0i5HBthqH1p_yeXzsg22gZduvgoNeA"), "images"
    ),
    "imagenet_a": _variant(
        "imagenet-a",
        Source(
            "imagenet-a.tar",
            "https://people.eecs.berkeley.edu/~hendrycks/imagenet-a.tar",
            md5="c3e55429088dc681f30d81f4726b6595",
        ),
        "imagenet-a",
    ),
    "imagenet_r": _variant(
        "imagenet-r",
        Source(
            "imagenet-r.tar",
            "https://people.eecs.berkeley.edu/~hendrycks/imagenet-r.tar",
            md5="a61312130a589d0ca1a8fca1f2bd3337",
        ),
        "imagenet-r",
    ),
}


# ---------------------------------------------------------------------------------------------
# torchvision's URLs and MD5s, read from its source without importing it (importing loads torch)


def _torchvision_datasets_dir() -> Path:
    spec = importlib.util.find_spec("torchvision")  # locates the package without executing it
    if spec is None or not spec.origin:
        raise LookupError("torchvision is not installed")
    return Path(spec.origin).parent / "datasets"


def _literal(node: ast.AST):
    try:
        return ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return None


def torchvision_source(module: str, cls: str, name: str) -> tuple[str | None, str | None]:
    """The URL and MD5 (each None where torchvision has none) of the file `name` in torchvision.

    Reads ``torchvision/datasets/<module>.py``: the constants of class `cls` (of the module itself
    when `cls` is "": ImageNet's ``ARCHIVE_META``, MD5s of files fetched by hand) such as
    ``_URL``/``_MD5``, tables of ``(url or file name, md5)`` and URL prefixes, and the literal
    arguments of the class's ``download_url`` / ``download_and_extract_archive`` calls.

    Raises:
        LookupError: torchvision is missing, or its source no longer names `name`.
    """
    path = _torchvision_datasets_dir() / f"{module}.py"
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise LookupError(f"cannot read {path}: {e}") from e
    node = (
        tree
        if not cls
        else next((n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == cls), None)
    )
    if node is None:
        raise LookupError(f"{path} has no class {cls}")
    consts: dict[str, object] = {}
    for stmt in node.body:
        if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1:
            target = stmt.targets[0]
        elif isinstance(stmt, ast.AnnAssign) and stmt.value is not None:
            target = stmt.target
        else:
            continue
        if isinstance(target, ast.Name):
            consts[target.id] = _literal(stmt.value)
    for call in (n for n in ast.walk(node) if isinstance(n, ast.Call)):
        fn = getattr(call.func, "id", getattr(call.func, "attr", ""))
        if fn not in ("download_url", "download_and_extract_archive"):
            continue
        kw = {k.arg: _literal(k.value) for k in call.keywords}
        url = _literal(call.args[0]) if call.args else kw.get("url")
        if isinstance(url, str) and url.endswith("/" + name):
            md5 = kw.get("md5")
            return url, md5 if isinstance(md5, str) else None

    def pairs(value):  # (str, md5) tuples anywhere in a constant
        if isinstance(value, (tuple, list)) and len(value) == 2 and all(isinstance(v, str) for v in value):
            if _MD5.match(value[1]):
                yield value
                return
        if isinstance(value, dict):
            value = list(value.values())
        if isinstance(value, (tuple, list)):
            for v in value:
                yield from pairs(v)

    prefixes = [v for v in consts.values() if isinstance(v, str) and v.startswith("http") and v.endswith("/")]
    for value in consts.values():
        for first, md5 in pairs(value):
            if first.startswith("http") and first.endswith("/" + name):
                return first, md5
            if first == name:
                return (prefixes[0] + name if prefixes else None), md5
    for attr, value in consts.items():
        if isinstance(value, str) and value.startswith("http") and value.endswith("/" + name):
            md5 = consts.get(attr.replace("URL", "MD5"))
            return value, md5 if isinstance(md5, str) else None
    raise LookupError(f"{path} ({cls}) no longer names {name}")


# ---------------------------------------------------------------------------------------------


@dataclass
class Outcome:
    """What `prepare_dataset` did for one dataset."""

    name: str
    ready: bool = False
    problems: list[str] = field(default_factory=list)  # what stops it, each with what to do
    notes: list[str] = field(default_factory=list)  # warnings that do not


def get_plan(name: str) -> Plan:
    if name not in PLANS:
        from promptlab.suggest import did_you_mean

        raise KeyError(
            f"no prepare plan for dataset {name!r}{did_you_mean(name, list(PLANS))}; plans exist for: {', '.join(PLANS)}"
        )
    return PLANS[name]


def _inputs(step: Step) -> tuple[str, ...]:
    """The ``downloads/`` files a step reads."""
    if isinstance(step, Place):
        return (step.source,)
    return step.inputs if isinstance(step, Build) else (step.archive,)


def _needed(plan: Plan, dataset_dir: Path, downloads: Path) -> tuple[list[Step], set[str]]:
    """The steps still to run and the downloads they need (walking the steps backwards, so an
    archive inside an archive is only fetched while what it unpacks to is missing)."""
    steps: list[Step] = []
    wanted: set[str] = set()
    for step in reversed(plan.steps):
        if isinstance(step, (Place, Build)):
            run = not (dataset_dir / step.dest).exists()
        elif step.to_downloads:
            run = any(out in wanted and not (downloads / out).exists() for out in step.moves.values())
        else:
            run = not all((dataset_dir / out).exists() for out in step.moves.values())
        if run:
            steps.append(step)
            wanted.update(_inputs(step))
    return steps[::-1], wanted


def _run(step: Step, paths: list[Path], dataset_dir: Path, downloads: Path, remove: bool) -> None:
    """Run one step on its (present) inputs; `remove`: delete the archive once extracted."""
    if isinstance(step, Place):
        if step.source.startswith("split_zhou_"):
            check_split_schema(paths[0])
        dest = dataset_dir / step.dest
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(paths[0], dest)
    elif isinstance(step, Build):
        dest = dataset_dir / step.dest
        print(f"  building {dest} from {', '.join(step.inputs)}", file=sys.stderr)
        with scratch_dir(dest.parent, dest.name) as tmp:
            step.fn(paths, tmp)
            merge_into(tmp, dest)
    else:
        print(f"  extracting {step.archive}", file=sys.stderr)
        extract(paths[0], downloads if step.to_downloads else dataset_dir, step.moves)
        if remove:
            paths[0].unlink()


def check_split_schema(path: Path) -> None:
    """Raise ValueError unless `path` is a CoOp split file: train/val/test lists of
    ``[relpath, label, classname]`` (a saved web page or a truncated file fails here)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not a CoOp split file (not JSON: {e}); delete it and rerun") from e
    ok = isinstance(data, dict) and all(isinstance(data.get(s), list) for s in ("train", "val", "test"))
    rows = [r for s in ("train", "val", "test") for r in (data.get(s) or [])] if ok else []
    bad = next((r for r in rows if not is_split_row(r)), None)
    if not ok or not rows or bad is not None:
        what = (
            f"entry {bad!r}" if bad is not None else "no train/val/test lists of [relpath, label, classname]"
        )
        raise ValueError(f"{path} is not a CoOp split file ({what}); delete it and rerun")


def _by_hand(src: Source, path: Path, name: str) -> str:
    where = src.manual or (f"open {src.page}" if src.page else f"download {src.url}")
    return f"{src.name}: {where}, and save it as {path} (or pass --url {src.name}=MIRROR_URL); then rerun `promptlab data prepare {name}`"


def _obtain(src: Source, root: Path, downloads: Path, urls: Mapping[str, str], name: str) -> str | None:
    """Make ``downloads/<name>`` present and verified; a problem line (what to do) if not."""
    path = downloads / src.name
    local = root / src.local if src.local else None
    if local is not None and local.is_file() and not path.exists():
        downloads.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(local, path)
    url, md5 = src.url, src.md5
    if src.torchvision:
        try:
            url, md5 = torchvision_source(*src.torchvision, src.name)
        except LookupError as e:
            if not urls.get(src.name) and not path.exists():
                return f"{src.name}: torchvision does not give its URL ({e}); pass --url {src.name}=URL"
    url = urls.get(src.name) or url
    try:
        if path.exists():
            verify(path, md5, str(path))
            return None
        if url is None:
            return _by_hand(src, path, name)
        if md5 is None:
            print(f"  {src.name}: no published checksum; `data check` validates the result", file=sys.stderr)
        print(f"  {src.name} <- {url}", file=sys.stderr)
        download(url, path, md5=md5)
    except DownloadError as e:
        return f"{e}. By hand: {_by_hand(src, path, name)}"
    return None


def prepare_dataset(
    name: str,
    root: str | Path,
    *,
    urls: Mapping[str, str] | None = None,
    check: bool = True,
    delete_archives: bool = False,
) -> Outcome:
    """Fetch, verify, extract and lay out one dataset under `root`, then run `data check` on it.

    Args:
        name: A dataset with a plan (`PLANS`).
        root: The data root ($DATA).
        urls: File name -> URL overrides (they win over the dataset YAML's `urls`).
        check: Finish with `check_dataset` (decodes a sample of images: imports torch).
        delete_archives: Remove each archive from ``downloads/`` once it is extracted.
    """
    from promptlab.data.registry import get_spec

    spec = get_spec(name)
    plan = get_plan(spec.name)
    root = Path(root).expanduser().absolute()
    dataset_dir, downloads = root / spec.folder, root / DOWNLOADS
    merged = {**spec.urls, **(urls or {})}
    out = Outcome(spec.name)
    steps, wanted = _needed(plan, dataset_dir, downloads)
    by_name = {s.name: s for s in plan.sources}
    for src in plan.sources:
        if src.name not in wanted:
            continue
        problem = _obtain(src, root, downloads, merged, spec.name)
        if problem:
            (out.notes if src.optional else out.problems).append(problem)
    for step in steps:
        paths = [downloads / n for n in _inputs(step)]
        if not all(p.exists() for p in paths):
            continue  # reported above, or made by an earlier step that could not run
        # an archive taken out of another archive is not worth keeping once extracted
        remove = (
            isinstance(step, Unpack)
            and not step.to_downloads
            and (delete_archives or step.archive not in by_name)
        )
        try:
            _run(step, paths, dataset_dir, downloads, remove)
        except (ArchiveError, ValueError) as e:
            out.problems.append(f"{e}. Delete {', '.join(map(str, paths))} and rerun to fetch it again")
    absent = [
        rel for rel, what in spec.required_paths() if "folder" in what and not (dataset_dir / rel).exists()
    ]
    if plan.guide and absent:
        out.problems.append(plan.guide.format(root=root, folder=spec.folder))
    if out.problems:
        return out
    if check:
        from promptlab.data.check import check_dataset

        report = check_dataset(spec.name, root)
        out.problems.extend(report.problems)
    out.ready = not out.problems
    return out


def parse_url_overrides(pairs: list[str]) -> dict[str, str]:
    """``NAME=URL`` words of ``--url`` as a dict; ValueError naming a malformed one."""
    out = {}
    for pair in pairs:
        key, sep, url = pair.partition("=")
        if not sep or not key or "://" not in url:
            raise ValueError(
                f"--url {pair!r}: expected FILE=URL, e.g. --url food-101.tar.gz=https://mirror/food-101.tar.gz"
            )
        out[key] = url
    known = {s.name for p in PLANS.values() for s in p.sources}
    unknown = sorted(set(out) - known)
    if unknown:
        raise ValueError(
            f"--url: no dataset downloads a file named {unknown}; the names are the files of `promptlab data prepare --list`"
        )
    return out


def describe_plans() -> str:
    """One block per dataset: automatic or guided, then each file and where it comes from."""
    lines = []
    for name, plan in PLANS.items():
        guided = plan.guide or any(
            s.url is None and not s.torchvision for s in plan.sources if not s.optional
        )
        lines.append(f"{name}: {'guided (files by hand)' if guided else 'automatic'}")
        for s in plan.sources:
            origin = s.page or s.url or "by hand"
            if s.torchvision:
                try:
                    origin = f"{torchvision_source(*s.torchvision, s.name)[0]} (torchvision)"
                except LookupError as e:
                    origin = f"torchvision: {e}"
            lines.append(f"  {s.name:36} {origin}")
    return "\n".join(lines)
