"""`promptlab data prepare` against a local HTTP server: no test reaches a real host.

The server (a thread on 127.0.0.1, `http.server` with HTTP Range support written here) serves small
fake archives with the structure of the real ones (stated below from the datasets' own archives,
independently of promptlab's plans) and split files in CoOp's schema; checksums are computed here.
An autouse fixture makes any connection to a host other than 127.0.0.1 fail the test.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import socket
import subprocess
import sys
import tarfile
import threading
import urllib.request
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml
from PIL import Image

from promptlab.cli_data import main_data
from promptlab.data import prepare
from promptlab.data.download import ChecksumError, DownloadError, direct_url, download
from promptlab.data.extract import ArchiveError, extract

REPO = Path(__file__).resolve().parents[2]
LOOPBACK = ("127.0.0.1", "localhost")


# ------------------------------------------------------------------------------------------------
# No network: any connection to a host other than 127.0.0.1 fails the test.


class NetworkRefused(AssertionError):
    pass


@pytest.fixture(autouse=True)
def loopback_only(monkeypatch, request):
    """Refuse (and record) any connection or name lookup for a host other than 127.0.0.1; the test
    fails even where promptlab's code would have caught the error."""
    attempts: list[str] = []
    real_connect, real_create, real_getaddrinfo = (
        socket.socket.connect,
        socket.create_connection,
        socket.getaddrinfo,
    )

    def host_of(address):
        return address[0] if isinstance(address, tuple) else address

    def guard(host):
        if host not in LOOPBACK:
            attempts.append(str(host))
            raise NetworkRefused(f"test tried to reach {host!r}: only 127.0.0.1 is allowed")

    def connect(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6):
            guard(host_of(address))
        return real_connect(self, address)

    def create_connection(address, *a, **kw):
        guard(host_of(address))
        return real_create(address, *a, **kw)

    def getaddrinfo(host, *a, **kw):
        guard(host)
        return real_getaddrinfo(host, *a, **kw)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket, "create_connection", create_connection)
    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    yield attempts
    if request.node.name != "test_the_guard_refuses_real_hosts":
        assert attempts == [], f"the test tried to reach {attempts}"


def test_the_guard_refuses_real_hosts():
    with pytest.raises(NetworkRefused):
        urllib.request.urlopen("http://example.com/", timeout=1)
    with pytest.raises(NetworkRefused):
        socket.create_connection(("203.0.113.1", 80), timeout=1)


# ------------------------------------------------------------------------------------------------
# The server


class Server:
    """Files by URL path; records (path, Range header); can drop or corrupt responses on demand."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.types: dict[str, str] = {}
        self.log: list[tuple[str, str | None]] = []
        self.served = 0
        self.drop_once: set[str] = set()  # first GET: half the bytes, then the connection closes
        self.ignore_range: set[str] = set()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                path = self.path.split("?")[0]
                rng = self.headers.get("Range")
                server.log.append((path, rng))
                if path not in server.files:
                    self.send_error(404)
                    return
                data = server.files[path]
                start = 0
                if rng and path not in server.ignore_range:
                    start = int(rng.removeprefix("bytes=").split("-")[0])
                    if start >= len(data):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(data)}")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                body = data[start:]
                self.send_header("Content-Type", server.types.get(path, "application/octet-stream"))
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if path in server.drop_once:
                    server.drop_once.discard(path)
                    body = body[: len(body) // 2]
                    self.close_connection = True
                server.served += len(body)  # before the write: the client may finish reading first
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.02,), daemon=True)

    def url(self, name: str) -> str:
        return f"{self.base}/{name}"

    def requests_for(self, name: str) -> list[str | None]:
        return [rng for path, rng in self.log if path == f"/{name}"]


@pytest.fixture
def server():
    s = Server()
    s.thread.start()
    yield s
    s.httpd.shutdown()
    s.httpd.server_close()


# ------------------------------------------------------------------------------------------------
# Fake archives with the real archives' structure


def jpeg(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (seed * 37 % 256, seed * 91 % 256, 120)).save(buf, format="JPEG")
    return buf.getvalue()


def tar_bytes(members: dict[str, bytes], mode: str = "w:gz") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def zip_bytes(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)
    return buf.getvalue()


def split_json(rels_by_class: list[tuple[str, list[str]]]) -> bytes:
    """CoOp's split schema: {"train"|"val"|"test": [[relpath, label, classname], ...]}; per class
    the first images go to train, then one to val, one to test."""
    split = {"train": [], "val": [], "test": []}
    for label, (cname, rels) in enumerate(rels_by_class):
        for i, rel in enumerate(rels):
            which = "train" if i < len(rels) - 2 else ("val" if i == len(rels) - 2 else "test")
            split[which].append([rel, label, cname])
    return json.dumps(split).encode()


def image_tree(prefix: str, classes: list[str], rel) -> tuple[dict[str, bytes], list[tuple[str, list[str]]]]:
    """4 images per class at ``prefix + rel(cls, i)``; returns (members, [(class, [rel, ...])])."""
    members, rows = {}, []
    for c, cls in enumerate(classes):
        rels = [rel(cls, i) for i in range(4)]
        for i, r in enumerate(rels):
            members[prefix + r] = jpeg(c * 10 + i)
        rows.append((cls.replace("_", " "), rels))
    return members, rows


WNIDS = ["n01440764", "n01443537", "n01484850", "n01491361"]
CLASSNAMES = "".join(f"{w} class {i}\n" for i, w in enumerate(WNIDS)).encode()


def fake_caltech101():
    # caltech-101.zip (data.caltech.edu) holds caltech-101/101_ObjectCategories.tar.gz (and Annotations.tar)
    inner, rows = image_tree(
        "101_ObjectCategories/", ["accordion", "airplanes"], lambda c, i: f"{c}/image_{i + 1:04d}.jpg"
    )
    inner["101_ObjectCategories/BACKGROUND_Google/image_0001.jpg"] = jpeg(99)  # not in CoOp's split
    outer = {
        "caltech-101/101_ObjectCategories.tar.gz": tar_bytes(inner),
        "caltech-101/Annotations.tar": tar_bytes({"Annotations/accordion/annotation_0001.mat": b"x"}, "w"),
        "caltech-101/show_annotation.m": b"% matlab",
    }
    files = {"caltech-101.zip": zip_bytes(outer), "split_zhou_Caltech101.json": split_json(rows)}
    return files, len(rows), ["caltech-101/101_ObjectCategories/accordion/image_0001.jpg"]


def fake_oxford_pets():
    members, rows = image_tree("images/", ["Abyssinian", "beagle"], lambda c, i: f"{c}_{i + 1}.jpg")
    annotations = {"annotations/list.txt": b"#\n", "annotations/trainval.txt": b"Abyssinian_1 1 1 1\n"}
    files = {
        "images.tar.gz": tar_bytes(members),
        "annotations.tar.gz": tar_bytes(annotations),
        "split_zhou_OxfordPets.json": split_json(rows),
    }
    return files, 2, ["oxford_pets/images/beagle_1.jpg", "oxford_pets/annotations/list.txt"]


def fake_oxford_flowers():
    members, rows = image_tree(
        "jpg/", ["pink primrose", "globe thistle"], lambda c, i: f"image_{c[0]}{i:04d}.jpg"
    )
    files = {
        "102flowers.tgz": tar_bytes(members),
        "imagelabels.mat": b"MATLAB 5.0 MAT-file",
        "cat_to_name.json": json.dumps({"1": "pink primrose", "2": "globe thistle"}).encode(),
        "split_zhou_OxfordFlowers.json": split_json(rows),
    }
    return (
        files,
        2,
        [
            "oxford_flowers/jpg/image_p0000.jpg",
            "oxford_flowers/imagelabels.mat",
            "oxford_flowers/cat_to_name.json",
        ],
    )


def fake_food101():
    members, rows = image_tree(
        "food-101/images/", ["apple_pie", "baby_back_ribs"], lambda c, i: f"{c}/{100 + i}.jpg"
    )
    members["food-101/meta/classes.txt"] = b"apple_pie\nbaby_back_ribs\n"
    members["food-101/README.txt"] = b"Food-101"
    files = {"food-101.tar.gz": tar_bytes(members), "split_zhou_Food101.json": split_json(rows)}
    return files, 2, ["food-101/images/apple_pie/100.jpg", "food-101/meta/classes.txt"]


def fake_fgvc_aircraft():
    variants = ["707-320", "A300B4", "F/A-18"]
    data = "fgvc-aircraft-2013b/data/"
    members = {data + "variants.txt": "\n".join(variants).encode() + b"\n"}
    n = 0
    for split in ("train", "val", "test"):
        lines = []
        for v in variants:
            n += 1
            image_id = f"{1000000 + n}"
            members[f"{data}images/{image_id}.jpg"] = jpeg(n)
            lines.append(f"{image_id} {v}")
        members[f"{data}images_variant_{split}.txt"] = ("\n".join(lines) + "\n").encode()
    members["fgvc-aircraft-2013b/README.html"] = b"<html></html>"
    return (
        {"fgvc-aircraft-2013b.tar.gz": tar_bytes(members)},
        3,
        ["fgvc_aircraft/variants.txt", "fgvc_aircraft/images/1000001.jpg"],
    )


def fake_sun397():
    members, rows = image_tree("SUN397/", ["a/abbey", "b/bakery/shop"], lambda c, i: f"{c}/sun_{i:04d}.jpg")
    members["SUN397/ClassName.txt"] = b"/a/abbey\n/b/bakery/shop\n"
    files = {"SUN397.tar.gz": tar_bytes(members), "split_zhou_SUN397.json": split_json(rows)}
    return files, 2, ["sun397/SUN397/a/abbey/sun_0000.jpg"]


def fake_dtd():
    members, rows = image_tree("dtd/images/", ["banded", "blotchy"], lambda c, i: f"{c}/{c}_{i:04d}.jpg")
    members["dtd/labels/train1.txt"] = b"banded/banded_0000.jpg\n"
    members["dtd/imdb/imdb.mat"] = b"MATLAB"
    files = {"dtd-r1.0.1.tar.gz": tar_bytes(members), "split_zhou_DescribableTextures.json": split_json(rows)}
    return files, 2, ["dtd/images/banded/banded_0000.jpg", "dtd/labels/train1.txt"]


def fake_eurosat():
    members, rows = image_tree("2750/", ["AnnualCrop", "Forest"], lambda c, i: f"{c}/{c}_{i + 1}.jpg")
    files = {"EuroSAT.zip": zip_bytes(members), "split_zhou_EuroSAT.json": split_json(rows)}
    return files, 2, ["eurosat/2750/Forest/Forest_1.jpg"]


def fake_ucf101():
    members, rows = image_tree(
        "UCF-101-midframes/", ["Apply_Eye_Makeup", "Archery"], lambda c, i: f"{c}/v_{c}_g0{i + 1}_c01.jpg"
    )
    files = {"UCF-101-midframes.zip": zip_bytes(members), "split_zhou_UCF101.json": split_json(rows)}
    return files, 2, ["ucf101/UCF-101-midframes/Archery/v_Archery_g01_c01.jpg"]


def fake_imagenetv2():
    members = {
        f"imagenetv2-matched-frequency-format-val/{c}/{i:02x}ab.jpeg": jpeg(c * 5 + i)
        for c in range(4)
        for i in range(2)
    }
    files = {"imagenetv2-matched-frequency.tar.gz": tar_bytes(members), "imagenet_classnames.txt": CLASSNAMES}
    return (
        files,
        4,
        ["imagenetv2/imagenetv2-matched-frequency-format-val/3/01ab.jpeg", "imagenetv2/classnames.txt"],
    )


def fake_imagenet_sketch():
    members = {f"sketch/{w}/sketch_{i}.JPEG": jpeg(i) for w in WNIDS for i in range(2)}
    files = {"ImageNet-Sketch.zip": zip_bytes(members), "imagenet_classnames.txt": CLASSNAMES}
    return files, 4, [f"imagenet-sketch/images/{WNIDS[0]}/sketch_0.JPEG", "imagenet-sketch/classnames.txt"]


def fake_imagenet_a():
    members = {f"imagenet-a/{w}/0.00{i}_x.jpg": jpeg(i) for w in WNIDS[1:3] for i in range(2)}
    members["imagenet-a/README.txt"] = b"ImageNet-A"
    files = {"imagenet-a.tar": tar_bytes(members, "w"), "imagenet_classnames.txt": CLASSNAMES}
    return files, 2, [f"imagenet-adversarial/imagenet-a/{WNIDS[1]}/0.000_x.jpg"]


def fake_imagenet_r():
    members = {f"imagenet-r/{w}/art_{i}.jpg": jpeg(i) for w in WNIDS[:3] for i in range(2)}
    members["imagenet-r/README.txt"] = b"ImageNet-R"
    files = {"imagenet-r.tar": tar_bytes(members, "w"), "imagenet_classnames.txt": CLASSNAMES}
    return files, 3, [f"imagenet-rendition/imagenet-r/{WNIDS[2]}/art_1.jpg"]


def fake_stanford_cars():
    # Split paths start at stanford_cars/ (cars_train/00001.jpg)
    train, rows_train = image_tree("", ["x"], lambda c, i: f"cars_train/{i + 1:05d}.jpg")
    test, rows_test = image_tree("", ["y"], lambda c, i: f"cars_test/{i + 1:05d}.jpg")
    rows = [("AM General Hummer SUV 2000", rows_train[0][1]), ("Acura RL Sedan 2012", rows_test[0][1])]
    files = {
        "cars_train.tgz": tar_bytes(train),
        "cars_test.tgz": tar_bytes(test),
        "car_devkit.tgz": tar_bytes({"devkit/cars_meta.mat": b"MATLAB", "devkit/README.txt": b"devkit"}),
        "cars_test_annos_withlabels.mat": b"MATLAB 5.0",
        "split_zhou_StanfordCars.json": split_json(rows),
    }
    return files, 2, ["stanford_cars/cars_train/00001.jpg", "stanford_cars/devkit/cars_meta.mat"]


FAKES = {
    "caltech101": fake_caltech101,
    "oxford_pets": fake_oxford_pets,
    "oxford_flowers": fake_oxford_flowers,
    "food101": fake_food101,
    "fgvc_aircraft": fake_fgvc_aircraft,
    "sun397": fake_sun397,
    "dtd": fake_dtd,
    "eurosat": fake_eurosat,
    "ucf101": fake_ucf101,
    "imagenetv2": fake_imagenetv2,
    "imagenet_sketch": fake_imagenet_sketch,
    "imagenet_a": fake_imagenet_a,
    "imagenet_r": fake_imagenet_r,
    "stanford_cars": fake_stanford_cars,
}
AUTOMATIC = [n for n in FAKES if n != "stanford_cars"]


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def serve_dataset(
    monkeypatch, server: Server, name: str, files: dict[str, bytes], *, hosted: bool = True, md5s=None
):
    """Point `name`'s plan at the server (same file names and steps), with checksums of `files`;
    `hosted=False` keeps the plan's missing URLs (guided files)."""
    plan = prepare.PLANS[name]
    sources = []
    for src in plan.sources:
        data = files[src.name]
        server.files[f"/{src.name}"] = data
        url = server.url(src.name) if (hosted or src.url) else None
        digest = (md5s or {}).get(src.name, md5(data))
        sources.append(dataclasses.replace(src, url=url, md5=digest, torchvision=None, local=""))
    monkeypatch.setitem(prepare.PLANS, name, dataclasses.replace(plan, sources=tuple(sources)))


@pytest.fixture
def small_yamls(tmp_path, monkeypatch):
    """The real dataset YAMLs with the class counts and sizes of the fake archives."""
    folder = tmp_path / "datasets"
    folder.mkdir()
    for path in (REPO / "datasets").glob("*.yaml"):
        (folder / path.name).write_text(path.read_text())
    monkeypatch.setenv("PROMPTLAB_DATASETS_DIR", str(folder))

    def shrink(name: str, num_classes: int) -> None:
        p = folder / f"{name}.yaml"
        raw = yaml.safe_load(p.read_text())
        raw["num_classes"] = num_classes
        raw.pop("expected", None)
        p.write_text(yaml.safe_dump(raw))

    return shrink


def tree(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*")} if root.exists() else set()


# ------------------------------------------------------------------------------------------------
# A good download, for every automatic dataset


@pytest.mark.parametrize("name", AUTOMATIC)
def test_prepare_lays_out_the_coop_layout_and_checks_it(
    name, tmp_path, server, monkeypatch, small_yamls, capsys
):
    files, n_classes, expect = FAKES[name]()
    serve_dataset(monkeypatch, server, name, files)
    small_yamls(name, n_classes)
    root = tmp_path / "data"
    assert main_data(["prepare", name, "--root", str(root)]) == 0
    out = capsys.readouterr().out
    assert f"{name}: ready (data check passed)" in out
    for rel in expect:
        assert (root / rel).is_file(), (rel, sorted(tree(root)))
    left = tree(root)
    assert not [p for p in left if p.endswith(".part") or ".extracting" in p], left
    # A second run finds everything in place and downloads nothing.
    before = len(server.log)
    assert main_data(["prepare", name, "--root", str(root)]) == 0
    assert len(server.log) == before


def test_nested_archive_is_unpacked_and_not_kept(tmp_path, server, monkeypatch, small_yamls):
    files, n, _ = fake_caltech101()
    serve_dataset(monkeypatch, server, "caltech101", files)
    small_yamls("caltech101", n)
    out = prepare.prepare_dataset("caltech101", tmp_path)
    assert out.ready, out.problems
    assert (tmp_path / "downloads" / "caltech-101.zip").is_file()
    assert not (tmp_path / "downloads" / "101_ObjectCategories.tar.gz").exists()
    assert not (tmp_path / "caltech-101" / "Annotations").exists()  # only what CoOp's layout has


def test_delete_archives(tmp_path, server, monkeypatch, small_yamls):
    files, n, _ = fake_dtd()
    serve_dataset(monkeypatch, server, "dtd", files)
    small_yamls("dtd", n)
    assert prepare.prepare_dataset("dtd", tmp_path, delete_archives=True).ready
    assert sorted(p.name for p in (tmp_path / "downloads").iterdir()) == [
        "split_zhou_DescribableTextures.json"
    ]


# ------------------------------------------------------------------------------------------------
# Interrupted downloads resume


def test_dropped_connection_resumes_with_a_range_request(tmp_path, server, monkeypatch, small_yamls):
    files, n, _ = fake_food101()
    serve_dataset(monkeypatch, server, "food101", files)
    small_yamls("food101", n)
    server.drop_once.add("/food-101.tar.gz")
    out = prepare.prepare_dataset("food101", tmp_path)
    assert out.ready, out.problems
    size = len(files["food-101.tar.gz"])
    ranges = server.requests_for("food-101.tar.gz")
    assert ranges[0] is None and ranges[1] == f"bytes={size // 2}-", ranges
    assert (tmp_path / "downloads" / "food-101.tar.gz").read_bytes() == files["food-101.tar.gz"]


def test_a_part_file_left_by_a_killed_run_is_resumed(tmp_path, server):
    data = bytes(range(256)) * 400
    server.files["/a.tar.gz"] = data
    dest = tmp_path / "a.tar.gz"
    cut = len(data) // 3
    (tmp_path / "a.tar.gz.part").write_bytes(data[:cut])
    download(server.url("a.tar.gz"), dest, md5=md5(data))
    assert server.requests_for("a.tar.gz") == [f"bytes={cut}-"]
    assert server.served == len(data) - cut  # only the missing bytes travelled
    assert dest.read_bytes() == data and not (tmp_path / "a.tar.gz.part").exists()


def test_a_server_ignoring_range_restarts_from_zero(tmp_path, server):
    data = b"0123456789" * 1000
    server.files["/f.zip"] = data
    server.ignore_range.add("/f.zip")
    (tmp_path / "f.zip.part").write_bytes(b"garbage")
    download(server.url("f.zip"), tmp_path / "f.zip", md5=md5(data))
    assert (tmp_path / "f.zip").read_bytes() == data


def test_a_complete_part_file_answered_416_is_verified_and_kept(tmp_path, server):
    data = b"abc" * 100
    server.files["/g.tar"] = data
    (tmp_path / "g.tar.part").write_bytes(data)
    download(server.url("g.tar"), tmp_path / "g.tar", md5=md5(data))
    assert (tmp_path / "g.tar").read_bytes() == data and server.served == 0


def test_gives_up_after_retries_and_keeps_the_part(tmp_path, server, monkeypatch):
    data = b"x" * 10000
    server.files["/h.tgz"] = data
    monkeypatch.setattr("promptlab.data.download.time.sleep", lambda s: None)

    class Always(set):  # drop every response
        def discard(self, item):
            pass

    server.drop_once = Always({"/h.tgz"})
    with pytest.raises(DownloadError, match="rerun to resume"):
        download(server.url("h.tgz"), tmp_path / "h.tgz", md5=md5(data), retries=2)
    assert len(server.requests_for("h.tgz")) == 3
    assert (tmp_path / "h.tgz.part").is_file() and not (tmp_path / "h.tgz").exists()


# ------------------------------------------------------------------------------------------------
# Corrupt archives


def test_checksum_mismatch_is_a_clear_error_and_nothing_is_extracted(
    tmp_path, server, monkeypatch, small_yamls, capsys
):
    files, n, _ = fake_oxford_pets()
    good = files["images.tar.gz"]
    serve_dataset(monkeypatch, server, "oxford_pets", files)
    small_yamls("oxford_pets", n)
    server.files["/images.tar.gz"] = good[:100] + bytes([good[100] ^ 0xFF]) + good[101:]  # one byte flipped
    root = tmp_path / "data"
    assert main_data(["prepare", "oxford_pets", "--root", str(root)]) == 1
    out = capsys.readouterr().out
    assert "oxford_pets: NOT READY" in out
    assert f"images.tar.gz from {server.url('images.tar.gz')}: MD5" in out and md5(good) in out
    assert not (root / "oxford_pets" / "images").exists()
    assert not (root / "downloads" / "images.tar.gz").exists()
    assert not (root / "downloads" / "images.tar.gz.part").exists()  # a corrupt file is not resumed


def test_a_checksum_error_never_leaves_a_final_file(tmp_path, server):
    server.files["/k.zip"] = b"not what was published"
    with pytest.raises(ChecksumError, match="does not match the published"):
        download(server.url("k.zip"), tmp_path / "k.zip", md5="0" * 32)
    assert list(tmp_path.iterdir()) == []


def test_a_truncated_archive_without_checksum_leaves_nothing_half_extracted(
    tmp_path, server, monkeypatch, small_yamls
):
    """FGVCAircraft has no published MD5: a truncated archive is caught by the extraction."""
    files, n, _ = fake_fgvc_aircraft()
    serve_dataset(monkeypatch, server, "fgvc_aircraft", files, md5s={"fgvc-aircraft-2013b.tar.gz": None})
    small_yamls("fgvc_aircraft", n)
    whole = files["fgvc-aircraft-2013b.tar.gz"]
    server.files["/fgvc-aircraft-2013b.tar.gz"] = whole[: len(whole) * 2 // 3]
    out = prepare.prepare_dataset("fgvc_aircraft", tmp_path)
    assert not out.ready
    assert "fgvc-aircraft-2013b.tar.gz: corrupt or truncated archive" in out.problems[0]
    assert "Delete" in out.problems[0]
    assert tree(tmp_path / "fgvc_aircraft") == set()
    assert not [p for p in tree(tmp_path) if ".extracting" in p]


@pytest.mark.parametrize("cut", [0.5, 0.98])
def test_a_truncated_zip_is_a_clear_error(cut, tmp_path):
    archive = tmp_path / "EuroSAT.zip"
    whole = zip_bytes(image_tree("2750/", ["Forest"], lambda c, i: f"{c}/{c}_{i}.jpg")[0])
    archive.write_bytes(whole[: int(len(whole) * cut)])
    with pytest.raises(ArchiveError, match="EuroSAT.zip: corrupt or truncated archive"):
        extract(archive, tmp_path / "eurosat", {"2750": "2750"})
    assert sorted(tree(tmp_path)) == ["EuroSAT.zip"]


def test_an_archive_of_another_layout_is_refused_by_name(tmp_path):
    archive = tmp_path / "x.tar.gz"
    archive.write_bytes(tar_bytes({"other/readme.txt": b"x"}))
    with pytest.raises(
        ArchiveError, match=r"expected \['food-101'\] inside the archive, found .*\['other'\]"
    ):
        extract(archive, tmp_path / "out", {"food-101": "."})
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------------
# Hostile archives


def hostile_tar(kind: str) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        ok = tarfile.TarInfo("dtd/images/a/ok.jpg")
        ok.size = 2
        tf.addfile(ok, io.BytesIO(b"ok"))
        evil = tarfile.TarInfo(
            {"dotdot": "dtd/../../evil.txt", "absolute": "/tmp/promptlab-evil.txt"}.get(kind, "dtd/link")
        )
        if kind == "symlink":
            evil.type, evil.linkname = tarfile.SYMTYPE, "/etc/passwd"
        elif kind == "hardlink":
            evil.type, evil.linkname = tarfile.LNKTYPE, "/etc/passwd"
        elif kind == "device":
            evil.type = tarfile.CHRTYPE
        else:
            evil.size = 4
        tf.addfile(evil, io.BytesIO(b"evil") if evil.isfile() else None)
    return buf.getvalue()


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "symlink", "hardlink", "device"])
def test_hostile_tar_members_are_refused_before_anything_is_written(kind, tmp_path):
    archive = tmp_path / "downloads" / "dtd-r1.0.1.tar.gz"
    archive.parent.mkdir()
    archive.write_bytes(hostile_tar(kind))
    dest = tmp_path / "data" / "dtd"
    with pytest.raises(ArchiveError, match="refusing"):
        extract(archive, dest, {"dtd": "."})
    assert not dest.exists() and not (tmp_path / "evil.txt").exists()
    assert sorted(tree(tmp_path)) == ["downloads", "downloads/dtd-r1.0.1.tar.gz"]


@pytest.mark.parametrize("name", ["../evil.txt", "/abs/evil.txt", "C:/evil.txt"])
def test_hostile_zip_members_are_refused(name, tmp_path):
    archive = tmp_path / "EuroSAT.zip"
    archive.write_bytes(zip_bytes({"2750/A/ok.jpg": b"ok", name: b"evil"}))
    with pytest.raises(ArchiveError, match="leaves the extraction folder"):
        extract(archive, tmp_path / "eurosat", {"2750": "2750"})
    assert sorted(tree(tmp_path)) == ["EuroSAT.zip"]


def test_zip_symlink_member_is_refused(tmp_path):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        info = zipfile.ZipInfo("2750/link")
        info.external_attr = 0o120777 << 16  # S_IFLNK
        z.writestr(info, "/etc/passwd")
    archive = tmp_path / "EuroSAT.zip"
    archive.write_bytes(buf.getvalue())
    with pytest.raises(ArchiveError, match="refusing link member"):
        extract(archive, tmp_path / "eurosat", {"2750": "2750"})
    assert not (tmp_path / "eurosat").exists()


def test_prepare_reports_a_hostile_archive_and_leaves_the_dataset_folder_alone(
    tmp_path, server, monkeypatch, small_yamls
):
    files, n, _ = fake_dtd()
    files["dtd-r1.0.1.tar.gz"] = hostile_tar("symlink")
    serve_dataset(monkeypatch, server, "dtd", files)
    small_yamls("dtd", n)
    out = prepare.prepare_dataset("dtd", tmp_path)
    assert not out.ready and "refusing member 'dtd/link'" in out.problems[0]
    assert not (tmp_path / "dtd" / "images").exists()


# ------------------------------------------------------------------------------------------------
# Split files


def test_missing_split_file_names_the_file_the_page_and_the_place(
    tmp_path, server, monkeypatch, small_yamls, capsys
):
    files, n, _ = fake_eurosat()
    serve_dataset(monkeypatch, server, "eurosat", files)
    small_yamls("eurosat", n)
    del server.files["/split_zhou_EuroSAT.json"]  # the host lost it: 404
    root = tmp_path / "data"
    assert main_data(["prepare", "eurosat", "--root", str(root)]) == 1
    out = capsys.readouterr().out
    dest = root / "downloads" / "split_zhou_EuroSAT.json"
    assert "HTTP 404" in out and f"save it as {dest}" in out
    assert "https://drive.google.com/file/d/1Ip7yaCWFi0eaOFUGga0lUdVi_DDQth1o/view" in out
    assert "--url split_zhou_EuroSAT.json=MIRROR_URL" in out
    assert (root / "eurosat" / "2750" / "Forest").is_dir()  # the images are in place already
    assert not (root / "eurosat" / "split_zhou_EuroSAT.json").exists()
    # The user puts the file where the message said; the next run finishes without refetching images.
    dest.write_bytes(files["split_zhou_EuroSAT.json"])
    before = len(server.requests_for("EuroSAT.zip"))
    assert main_data(["prepare", "eurosat", "--root", str(root)]) == 0
    assert len(server.requests_for("EuroSAT.zip")) == before
    assert (root / "eurosat" / "split_zhou_EuroSAT.json").is_file()


def test_a_web_page_instead_of_the_split_file_is_refused(tmp_path, server, monkeypatch, small_yamls):
    files, n, _ = fake_dtd()
    files["split_zhou_DescribableTextures.json"] = b"<html>Google Drive - Quota exceeded</html>"
    serve_dataset(monkeypatch, server, "dtd", files)
    server.types["/split_zhou_DescribableTextures.json"] = "text/html; charset=utf-8"
    small_yamls("dtd", n)
    out = prepare.prepare_dataset("dtd", tmp_path)
    assert not out.ready and "returned a web page, not split_zhou_DescribableTextures.json" in out.problems[0]
    assert not (tmp_path / "downloads" / "split_zhou_DescribableTextures.json").exists()


def test_a_split_file_of_the_wrong_schema_is_refused(tmp_path, server, monkeypatch, small_yamls):
    files, n, _ = fake_dtd()
    files["split_zhou_DescribableTextures.json"] = json.dumps(
        {"train": [["a.jpg", "0", "a"]], "val": [], "test": []}
    ).encode()
    serve_dataset(monkeypatch, server, "dtd", files)
    small_yamls("dtd", n)
    out = prepare.prepare_dataset("dtd", tmp_path)
    assert not out.ready and "is not a CoOp split file (entry ['a.jpg', '0', 'a'])" in out.problems[0]
    assert not (tmp_path / "dtd" / "split_zhou_DescribableTextures.json").exists()


# ------------------------------------------------------------------------------------------------
# Guided datasets


def test_stanford_cars_is_guided_then_validated(tmp_path, server, monkeypatch, small_yamls, capsys):
    files, n, expect = fake_stanford_cars()
    serve_dataset(monkeypatch, server, "stanford_cars", files, hosted=False)  # only the split is hosted
    small_yamls("stanford_cars", n)
    root = tmp_path / "data"
    assert main_data(["prepare", "stanford_cars", "--root", str(root)]) == 1
    out = capsys.readouterr().out
    for name in ("cars_train.tgz", "cars_test.tgz"):
        assert f"save it as {root / 'downloads' / name}" in out
    assert "official host (ai.stanford.edu/~jkrause/cars) is gone" in out
    assert "note: car_devkit.tgz" in out  # not needed by the reader: a note, not a failure
    assert server.requests_for("cars_train.tgz") == []
    # The user copies the files where the message said; a wrong file is caught by its checksum.
    (root / "downloads" / "cars_train.tgz").write_bytes(files["cars_test.tgz"])
    assert main_data(["prepare", "stanford_cars", "--root", str(root)]) == 1
    out = capsys.readouterr().out
    assert f"cars_train.tgz from {root / 'downloads' / 'cars_train.tgz'}: MD5" in out
    assert "does not match the published" in out
    for name in ("cars_train.tgz", "cars_test.tgz", "car_devkit.tgz", "cars_test_annos_withlabels.mat"):
        (root / "downloads" / name).write_bytes(files[name])
    assert main_data(["prepare", "stanford_cars", "--root", str(root)]) == 0
    for rel in expect:
        assert (root / rel).is_file()


def fake_imagenet():
    """ILSVRC-2012 as image-net.org ships it: the train tar holds one tar per class; the val tar holds
    flat ILSVRC2012_val_<n>.JPEG; the devkit's data/ holds the val ground truth (ILSVRC2012_IDs, one
    per image in file order) and meta.mat (synsets: IDs 1..1000 are the leaves, not in wnid order)."""
    import numpy as np
    import scipy.io

    ids = {WNIDS[2]: 1, WNIDS[0]: 2, WNIDS[3]: 3, WNIDS[1]: 4}  # ILSVRC2012_ID per wnid, not sorted
    train = {f"{w}.tar": tar_bytes({f"{w}_{i}.JPEG": jpeg(i) for i in range(3)}, "w") for w in WNIDS}
    val_wnids = [WNIDS[i % 4] for i in (3, 1, 0, 2, 2, 1, 0, 3)]
    val = {f"ILSVRC2012_val_{n + 1:08d}.JPEG": jpeg(n) for n in range(len(val_wnids))}
    fields = [("ILSVRC2012_ID", "O"), ("WNID", "O"), ("words", "O"), ("gloss", "O"), ("num_children", "O")]
    rows = [(ids[w], w, f"class {w}", "", 0) for w in WNIDS] + [(1001, "n00001740", "entity", "", 4)]
    buf = io.BytesIO()
    scipy.io.savemat(buf, {"synsets": np.array(rows, dtype=fields)})
    devkit = {
        "ILSVRC2012_devkit_t12/data/meta.mat": buf.getvalue(),
        "ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt": "".join(
            f"{ids[w]}\n" for w in val_wnids
        ).encode(),
        "ILSVRC2012_devkit_t12/readme.txt": b"devkit",
    }
    files = {
        "imagenet_classnames.txt": CLASSNAMES,
        "ILSVRC2012_img_train.tar": tar_bytes(train, "w"),
        "ILSVRC2012_img_val.tar": tar_bytes(val, "w"),
        "ILSVRC2012_devkit_t12.tar.gz": tar_bytes(devkit),
    }
    return files, val_wnids


def test_imagenet_is_guided_then_built_from_the_official_tars(
    tmp_path, server, monkeypatch, small_yamls, capsys
):
    files, val_wnids = fake_imagenet()
    serve_dataset(monkeypatch, server, "imagenet", files, hosted=False)  # only classnames.txt is hosted
    small_yamls("imagenet", len(WNIDS))
    root = tmp_path / "data"
    assert main_data(["prepare", "imagenet", "--root", str(root)]) == 1
    out = capsys.readouterr().out
    for name in ("ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar", "ILSVRC2012_devkit_t12.tar.gz"):
        assert f"{name}: ImageNet needs an account: sign in at https://image-net.org" in out
        assert f"save it as {root / 'downloads' / name}" in out
    assert (
        f"ln -s /path/to/train {root}/imagenet/images/train" in out
    )  # the alternative: link existing folders
    assert (root / "imagenet" / "classnames.txt").read_bytes() == CLASSNAMES  # fetched already
    for name in ("ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar", "ILSVRC2012_devkit_t12.tar.gz"):
        (root / "downloads" / name).write_bytes(files[name])
    assert main_data(["prepare", "imagenet", "--root", str(root)]) == 0
    images = root / "imagenet" / "images"
    assert sorted(p.name for p in (images / "train").iterdir()) == sorted(WNIDS)
    assert (images / "train" / WNIDS[1] / f"{WNIDS[1]}_2.JPEG").read_bytes() == jpeg(2)
    for n, wnid in enumerate(val_wnids):  # each val image in the folder of its ground-truth class
        assert (images / "val" / wnid / f"ILSVRC2012_val_{n + 1:08d}.JPEG").read_bytes() == jpeg(n)
    assert not [p for p in tree(root) if ".extracting" in p]


def test_imagenet_from_folders_linked_by_hand(tmp_path, server, monkeypatch, small_yamls):
    files, _ = fake_imagenet()
    serve_dataset(monkeypatch, server, "imagenet", files, hosted=False)
    small_yamls("imagenet", len(WNIDS))
    for split in ("train", "val"):
        for i, w in enumerate(WNIDS):
            path = tmp_path / "elsewhere" / split / w / f"{w}_{i}.JPEG"
            path.parent.mkdir(parents=True)
            path.write_bytes(jpeg(i))
        (tmp_path / "imagenet" / "images").mkdir(parents=True, exist_ok=True)
        (tmp_path / "imagenet" / "images" / split).symlink_to(tmp_path / "elsewhere" / split)
    out = prepare.prepare_dataset("imagenet", tmp_path)
    assert out.ready, out.problems
    assert server.requests_for("ILSVRC2012_img_train.tar") == []


def test_a_val_tar_that_disagrees_with_the_devkit_leaves_no_val_folder(
    tmp_path, server, monkeypatch, small_yamls
):
    files, _ = fake_imagenet()
    files["ILSVRC2012_img_val.tar"] = tar_bytes({"ILSVRC2012_val_00000001.JPEG": jpeg(0)}, "w")
    serve_dataset(monkeypatch, server, "imagenet", files)
    small_yamls("imagenet", len(WNIDS))
    out = prepare.prepare_dataset("imagenet", tmp_path)
    assert "ILSVRC2012_img_val.tar: 1 images but the devkit labels 8" in out.problems[0]
    assert (tmp_path / "imagenet" / "images" / "train").is_dir()
    assert not (tmp_path / "imagenet" / "images" / "val").exists()


def test_class_tars_refuse_hostile_inner_members(tmp_path):
    from promptlab.data.extract import unpack_class_tars

    inner = hostile_tar("dotdot")
    archive = tmp_path / "ILSVRC2012_img_train.tar"
    archive.write_bytes(tar_bytes({"n01440764.tar": inner}, "w"))
    with pytest.raises(ArchiveError, match=r"ILSVRC2012_img_train.tar:n01440764.tar: refusing member"):
        unpack_class_tars(archive, tmp_path / "out")


def test_variants_copy_imagenets_classnames_instead_of_downloading(
    tmp_path, server, monkeypatch, small_yamls
):
    files, n, _ = fake_imagenet_r()
    serve_dataset(monkeypatch, server, "imagenet_r", files)
    plan = prepare.PLANS["imagenet_r"]
    srcs = tuple(
        dataclasses.replace(s, local="imagenet/classnames.txt") if s.name == "imagenet_classnames.txt" else s
        for s in plan.sources
    )
    monkeypatch.setitem(prepare.PLANS, "imagenet_r", dataclasses.replace(plan, sources=srcs))
    small_yamls("imagenet_r", n)
    (tmp_path / "imagenet").mkdir()
    (tmp_path / "imagenet" / "classnames.txt").write_bytes(CLASSNAMES)
    assert prepare.prepare_dataset("imagenet_r", tmp_path).ready
    assert server.requests_for("imagenet_classnames.txt") == []


# ------------------------------------------------------------------------------------------------
# Mirrors


def test_url_override_on_the_command_line(tmp_path, server, monkeypatch, small_yamls):
    files, n, _ = fake_eurosat()
    serve_dataset(monkeypatch, server, "eurosat", files)
    plan = prepare.PLANS["eurosat"]
    dead = tuple(dataclasses.replace(s, url="http://203.0.113.9/gone/" + s.name) for s in plan.sources)
    monkeypatch.setitem(
        prepare.PLANS, "eurosat", dataclasses.replace(plan, sources=dead)
    )  # the guard refuses it
    server.files["/mirror/EuroSAT.zip"] = files["EuroSAT.zip"]
    server.files["/mirror/split.json"] = files["split_zhou_EuroSAT.json"]
    small_yamls("eurosat", n)
    argv = ["prepare", "eurosat", "--root", str(tmp_path)]
    argv += ["--url", f"EuroSAT.zip={server.base}/mirror/EuroSAT.zip"]
    argv += ["--url", f"split_zhou_EuroSAT.json={server.base}/mirror/split.json"]
    assert main_data(argv) == 0


def test_url_override_in_the_dataset_yaml_still_checks_the_checksum(
    tmp_path, server, monkeypatch, small_yamls
):
    files, n, _ = fake_sun397()
    serve_dataset(monkeypatch, server, "sun397", files)
    small_yamls("sun397", n)
    yaml_path = tmp_path / "datasets" / "sun397.yaml"
    raw = yaml.safe_load(yaml_path.read_text())
    raw["urls"] = {"SUN397.tar.gz": f"{server.base}/mirror/SUN397.tar.gz"}
    yaml_path.write_text(yaml.safe_dump(raw))
    server.files["/mirror/SUN397.tar.gz"] = b"a mirror serving something else"
    out = prepare.prepare_dataset("sun397", tmp_path / "data")
    assert server.requests_for("mirror/SUN397.tar.gz") and not server.requests_for("SUN397.tar.gz")
    assert not out.ready and "does not match the published" in out.problems[0]
    server.files["/mirror/SUN397.tar.gz"] = files["SUN397.tar.gz"]
    assert prepare.prepare_dataset("sun397", tmp_path / "data").ready


def test_bad_url_overrides_and_names_fail_before_any_download(capsys):
    with pytest.raises(ValueError, match="expected FILE=URL"):
        main_data(["prepare", "dtd", "--root", "/tmp/x", "--url", "dtd-r1.0.1.tar.gz"])
    with pytest.raises(ValueError, match=r"no dataset downloads a file named \['nope.zip'\]"):
        main_data(["prepare", "dtd", "--root", "/tmp/x", "--url", "nope.zip=http://127.0.0.1/x"])
    with pytest.raises(KeyError, match="did you mean 'oxford_pets'"):
        main_data(["prepare", "oxford_pet", "--root", "/tmp/x"])


def test_data_check_hints_point_to_prepare():
    from promptlab.data import get_spec

    for name in prepare.PLANS:
        hints = get_spec(name).download
        assert hints and all(f"`promptlab data prepare {name} --root $DATA`" in h for h in hints.values()), (
            name
        )


def test_only_http_urls_are_fetched(tmp_path):
    """A shared dataset YAML's `urls` must not copy local files (file://) into the data root."""
    secret = tmp_path / "secret.txt"
    secret.write_text("private")
    with pytest.raises(DownloadError, match="only http"):
        download(secret.as_uri(), tmp_path / "split_zhou_DescribableTextures.json")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["secret.txt"]


def test_google_drive_share_links_become_direct_downloads():
    direct = "https://drive.usercontent.google.com/download?id=1Ip7yaCWFi0eaOFUGga0lUdVi_DDQth1o&export=download&confirm=t"
    assert (
        direct_url("https://drive.google.com/file/d/1Ip7yaCWFi0eaOFUGga0lUdVi_DDQth1o/view?usp=sharing")
        == direct
    )
    assert direct_url("https://drive.google.com/open?id=1Ip7yaCWFi0eaOFUGga0lUdVi_DDQth1o") == direct
    assert direct_url("https://example.org/x.zip") == "https://example.org/x.zip"


# ------------------------------------------------------------------------------------------------
# The plans themselves


def test_every_benchmark_and_imagenet_shift_has_a_plan():
    from promptlab.sweep import BENCHMARK_DATASETS

    shifts = ["imagenetv2", "imagenet_sketch", "imagenet_a", "imagenet_r"]
    assert set(prepare.PLANS) == set(BENCHMARK_DATASETS) | set(shifts)
    assert set(FAKES) | {"imagenet"} == set(prepare.PLANS)


def test_torchvision_sources_resolve_from_its_source_without_importing_torch():
    """Read from the installed torchvision's files (no network, no torch import): every archive the
    plans take from torchvision has a URL, and an MD5 except FGVCAircraft (torchvision has none)."""
    code = (
        "import sys\n"
        "from promptlab.data.prepare import PLANS, torchvision_source\n"
        "out = {s.name: torchvision_source(*s.torchvision, s.name) for p in PLANS.values() for s in p.sources if s.torchvision}\n"
        "assert 'torch' not in sys.modules and 'torchvision' not in sys.modules\n"
        "import json; print(json.dumps(out))\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert res.returncode == 0, res.stderr
    found = json.loads(res.stdout)
    by_hand = {"ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar", "ILSVRC2012_devkit_t12.tar.gz"}
    assert len(found) == 13 and by_hand <= set(found)
    for name, (url, digest) in found.items():
        if name in by_hand:  # an account is needed: torchvision has their MD5s only
            assert url is None and len(digest) == 32
            continue
        assert url.startswith(("https://", "http://")) and url.endswith("/" + name), (name, url)
        assert (digest is None) == (name == "fgvc-aircraft-2013b.tar.gz"), (name, digest)
        assert digest is None or len(digest) == 32


def test_prepare_without_the_final_check_never_imports_torch(tmp_path):
    """Fetching, verifying and extracting need no torch: `data prepare --no-check` in a fresh
    interpreter, against a plain `http.server` on 127.0.0.1 in that interpreter."""
    files, _, expect = fake_dtd()
    (tmp_path / "www").mkdir()
    for name, data in files.items():
        (tmp_path / "www" / name).write_bytes(data)
    md5s = {name: md5(data) for name, data in files.items()}
    code = f"""
import dataclasses, functools, sys, threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from promptlab.cli import main
from promptlab.data import prepare
handler = functools.partial(SimpleHTTPRequestHandler, directory={str(tmp_path / "www")!r})
httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
threading.Thread(target=httpd.serve_forever, daemon=True).start()
base = f"http://127.0.0.1:{{httpd.server_address[1]}}/"
plan = prepare.PLANS["dtd"]
md5s = {md5s!r}
sources = tuple(dataclasses.replace(s, url=base + s.name, md5=md5s[s.name], torchvision=None) for s in plan.sources)
prepare.PLANS["dtd"] = dataclasses.replace(plan, sources=sources)
assert main(["data", "prepare", "--list"]) == 0
assert main(["data", "prepare", "dtd", "--root", {str(tmp_path / "data")!r}, "--no-check"]) == 0
httpd.shutdown()
assert "torch" not in sys.modules and "torchvision" not in sys.modules, "torch was imported"
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "dtd: ready" in res.stdout
    for rel in expect:
        assert (tmp_path / "data" / rel).is_file()


def test_torchvision_lookup_failure_asks_for_a_url(tmp_path, server, monkeypatch, small_yamls):
    def gone(*a):
        raise LookupError("torchvision/datasets/dtd.py (DTD) no longer names dtd-r1.0.1.tar.gz")

    files, n, _ = fake_dtd()
    serve_dataset(monkeypatch, server, "dtd", files)
    plan = prepare.PLANS["dtd"]
    archive = dataclasses.replace(plan.sources[0], url=None, md5=None, torchvision=("dtd", "DTD"))
    monkeypatch.setitem(prepare.PLANS, "dtd", dataclasses.replace(plan, sources=(archive, plan.sources[1])))
    monkeypatch.setattr(prepare, "torchvision_source", gone)
    small_yamls("dtd", n)
    out = prepare.prepare_dataset("dtd", tmp_path)
    assert out.problems == [
        "dtd-r1.0.1.tar.gz: torchvision does not give its URL (torchvision/datasets/dtd.py (DTD) no longer "
        "names dtd-r1.0.1.tar.gz); pass --url dtd-r1.0.1.tar.gz=URL"
    ]
