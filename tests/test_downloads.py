"""toolbox/datasets.py, archives.py and downloads.py, against a local HTTP server on 127.0.0.1 started by each test.

Each public dataset is served as a miniature of its real archive (same top folders, file names and annotation
files, a few tiny images), then downloaded, verified, unpacked into CoOp's layout and read by build_dataset.
Faults: a wrong checksum, a connection dropped half-way (resumed with Range), a server without Range, a full disk,
unsafe archive members; and toolbox.downloads.download / toolbox.files.write_atomic underneath (modes, fsync, ENOSPC).
Untrusted inputs: a `.part` that is a link or not a file, a body past the known size, archive bombs, encrypted or
unknown zip members, an image folder that is a file, a redirect loop, Ctrl-C during `python data.py --download`.
"""

import contextlib
import errno
import gzip
import hashlib
import http.client
import http.server
import io
import json
import os
import stat
import tarfile
import threading
import zipfile

import pytest
from PIL import Image

import clip_min
from toolbox import archives, datasets, downloads
from toolbox import files as toolbox_files
import data
from conftest import ROOT, full_disk, sha256


# ---------------------------------------------------------------------------------------------- the server

class Handler(http.server.BaseHTTPRequestHandler):
    """GET /<name> of state["files"], with Range support unless the name is in state["no_ranges"]; a name in
    state["drops"] sends only up to the next listed byte offset, then closes the connection; a name in
    state["no_length"] is sent without Content-Length; state["redirects"] maps a name to the path it redirects to."""

    def do_GET(self):
        state = self.server.state
        name = self.path.lstrip("/")
        state["requests"].append((name, self.headers.get("Range")))
        if name in state["redirects"]:
            self.send_response(302)
            self.send_header("Location", state["redirects"][name])
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if name not in state["files"]:
            self.send_error(404)
            return
        body, ranges = state["files"][name], name not in state["no_ranges"]
        start = int(self.headers["Range"].removeprefix("bytes=").split("-")[0]) if ranges and self.headers.get(
            "Range") else 0
        if start >= len(body) and start:
            self.send_response(416)
            self.end_headers()
            return
        self.send_response(206 if start else 200)
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        if ranges:
            self.send_header("Accept-Ranges", "bytes")
        if name not in state["no_length"]:
            self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        stop = state["drops"][name].pop(0) if state["drops"].get(name) else len(body)
        self.wfile.write(body[start:stop])
        self.wfile.flush()
        self.close_connection = True

    def log_message(self, *args):
        pass


@pytest.fixture
def www():
    """A local HTTP server (stopped at the end of the test): {"url", "files", "requests", "no_ranges", "drops",
    "no_length", "redirects"}."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.state = dict(files={}, requests=[], no_ranges=set(), drops={}, no_length=set(), redirects={})
    thread = threading.Thread(target=server.serve_forever, kwargs=dict(poll_interval=0.05), daemon=True)
    thread.start()
    yield dict(server.state, url=f"http://127.0.0.1:{server.server_address[1]}")
    server.shutdown()
    server.server_close()


@pytest.fixture
def umask():
    old = os.umask(0o027)
    yield 0o027
    os.umask(old)


# ---------------------------------------------------------------------------------------------- archives

def jpeg_bytes(k=0):
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (40 * k % 256, 90, 30)).save(buf, "JPEG")
    return buf.getvalue()


def tar_bytes(files, mode="w:gz", extra=()):
    """A tar of {name: bytes} (folders implied by the names), plus `extra` TarInfo members (links, devices...)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as tar:
        for folder in sorted({str(os.path.dirname(n)) for n in files} - {""}):
            info = tarfile.TarInfo(folder)
            info.type, info.mode = tarfile.DIRTYPE, 0o755
            tar.addfile(info)
        for name, blob in files.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(blob), 0o600  # a private mode in the archive: the umask must win
            tar.addfile(info, io.BytesIO(blob))
        for info in extra:
            tar.addfile(info, io.BytesIO(b"x" * info.size) if info.size else None)
    return buf.getvalue()


def zip_bytes(files, links=()):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, blob in files.items():
            z.writestr(name, blob)
        for name, target in links:
            info = zipfile.ZipInfo(name)
            info.create_system, info.external_attr = 3, (stat.S_IFLNK | 0o777) << 16
            z.writestr(info, target)
    return buf.getvalue()


def split_of(entries):
    """CoOp's split JSON for {split: [(path, label, name)]} and its gzip, as splits/ ships them."""
    raw = json.dumps({k: [list(e) for e in v] for k, v in entries.items()}).encode()
    return raw, gzip.compress(raw, mtime=0)


def per_class(classes, path, n=4):
    """{train: 2, val: 1, test: 1} images per class: entries [(path(c, i), label, name)]."""
    out = {"train": [], "val": [], "test": []}
    for label, (folder, name) in enumerate(classes):
        for i in range(1, n + 1):
            out["train" if i <= n - 2 else "val" if i == n - 1 else "test"].append((path(folder, i), label, name))
    return out


def eurosat():
    classes = [("AnnualCrop", "Annual Crop Land"), ("Forest", "Forest"), ("River", "River")]
    split = per_class(classes, lambda c, i: f"{c}/{c}_{i}.jpg")
    files = {f"2750/{e[0]}": jpeg_bytes(e[1]) for v in split.values() for e in v}
    return {"EuroSAT.zip": zip_bytes(files)}, split, ["Annual Crop Land", "Forest", "River"]


def caltech101():
    classes = [("accordion", "accordion"), ("airplanes", "airplane")]
    split = per_class(classes, lambda c, i: f"{c}/image_{i:04d}.jpg")
    inner = {f"101_ObjectCategories/{e[0]}": jpeg_bytes(e[1]) for v in split.values() for e in v}
    inner["101_ObjectCategories/BACKGROUND_Google/image_0001.jpg"] = jpeg_bytes()
    outer = {"caltech-101/101_ObjectCategories.tar.gz": tar_bytes(inner), "caltech-101/Annotations.tar": b"tar",
             "caltech-101/show_annotation.m": b"% matlab", "__MACOSX/caltech-101/._Annotations.tar": b"mac"}
    return {"caltech-101.zip": zip_bytes(outer)}, split, ["accordion", "airplane"]


def oxford_pets():
    classes = [("Abyssinian", "abyssinian"), ("american_bulldog", "american_bulldog")]
    split = per_class(classes, lambda c, i: f"{c}_{i}.jpg")
    files = {f"images/{e[0]}": jpeg_bytes(e[1]) for v in split.values() for e in v}
    files["images/Abyssinian_100.mat"] = b"matlab"  # the real archive holds a few of those
    return {"images.tar.gz": tar_bytes(files)}, split, ["abyssinian", "american bulldog"]


def oxford_flowers():
    classes = [(0, "pink primrose"), (1, "hard-leaved pocket orchid")]
    split = per_class(classes, lambda c, i: f"image_{4 * c + i:05d}.jpg")
    files = {f"jpg/{e[0]}": jpeg_bytes(e[1]) for v in split.values() for e in v}
    return {"102flowers.tgz": tar_bytes(files)}, split, ["pink primrose", "hard-leaved pocket orchid"]


def dtd():
    classes = [("banded", "banded"), ("blotchy", "blotchy")]
    split = per_class(classes, lambda c, i: f"{c}/{c}_{i:04d}.jpg")
    files = {f"dtd/images/{e[0]}": jpeg_bytes(e[1]) for v in split.values() for e in v}
    files.update({"dtd/labels/labels_joint_anno.txt": b"banded/banded_0001.jpg banded\n",
                  "dtd/labels/train1.txt": b"banded/banded_0001.jpg\n", "dtd/imdb/imdb.mat": b"matlab"})
    return {"dtd-r1.0.1.tar.gz": tar_bytes(files)}, split, ["banded", "blotchy"]


def food101():
    files = {f"food-101/images/{c}/{100 + i}.jpg": jpeg_bytes(i) for c in ("apple_pie", "bagel") for i in range(10)}
    files.update({"food-101/meta/classes.txt": b"apple_pie\nbagel\n", "food-101/meta/train.txt": b"apple_pie/100\n",
                  "food-101/README.txt": b"Food-101", "food-101/license_agreement.txt": b"license"})
    return {"food-101.tar.gz": tar_bytes(files)}, None, ["apple pie", "bagel"]


def fgvc_aircraft():
    data_dir = "fgvc-aircraft-2013b/data"
    files = {"fgvc-aircraft-2013b/README.html": b"<html>", "fgvc-aircraft-2013b/evaluation.m": b"% matlab",
             f"{data_dir}/variants.txt": b"707-320\nA300B4\n", f"{data_dir}/families.txt": b"Boeing 707\nA300\n",
             f"{data_dir}/images_box.txt": b"1000001 1 1 2 2\n"}
    image_id = 1000001
    for split, n in (("train", 2), ("val", 1), ("test", 1)):
        lines = []
        for variant in ("707-320", "A300B4"):
            for _ in range(n):
                files[f"{data_dir}/images/{image_id}.jpg"] = jpeg_bytes(image_id)
                lines.append(f"{image_id} {variant}\n")
                image_id += 1
        files[f"{data_dir}/images_variant_{split}.txt"] = "".join(lines).encode()
    return {"fgvc-aircraft-2013b.tar.gz": tar_bytes(files)}, None, ["707-320", "A300B4"]


def sun397():
    classes = ["/a/abbey", "/a/apartment_building/outdoor"]
    images, lists = {}, {"Training_01.txt": "", "Testing_01.txt": "", "Training_02.txt": ""}
    for k, c in enumerate(classes):
        for i in range(7):
            rel = f"{c}/sun_{k}{i}.jpg"
            images[f"SUN397{rel}"] = jpeg_bytes(i)
            lists["Training_01.txt" if i < 5 else "Testing_01.txt"] += rel + "\n"
    images.update({"SUN397/ClassName.txt": "\n".join(classes).encode(), "SUN397/README.txt": b"SUN"})
    partitions = {"ClassName.txt": "\n".join(classes).encode(), **{k: v.encode() for k, v in lists.items()}}
    return ({"Partitions.zip": zip_bytes(partitions), "SUN397.tar.gz": tar_bytes(images)}, None,
            ["abbey", "outdoor apartment building"])


def imagenet_v2():
    top = "imagenetv2-matched-frequency-format-val"
    files = {f"{top}/{label}/{label}abc{i}.jpeg": jpeg_bytes(i) for label in (0, 1, 999) for i in range(2)}
    return {"imagenetv2-matched-frequency.tar.gz": tar_bytes(files, mode="w")}, None, None  # a plain tar


def imagenet_a():
    files = {"imagenet-a/README.txt": b"ImageNet-A",
             "imagenet-a/n01498041/0.000116_digital clock _ digital clock_0.865662.jpg": jpeg_bytes(1),
             "imagenet-a/n01531178/0.000279_goldfinch _ goldfinch_0.9.jpg": jpeg_bytes(2)}
    return {"imagenet-a.tar": tar_bytes(files, mode="w")}, None, ["stingray", "goldfinch"]


def imagenet_r():
    files = {"imagenet-r/README.txt": b"ImageNet-R", "imagenet-r/n01443537/art_0.jpg": jpeg_bytes(1),
             "imagenet-r/n01484850/cartoon_1.jpg": jpeg_bytes(2)}
    return {"imagenet-r.tar": tar_bytes(files, mode="w")}, None, ["goldfish", "great white shark"]


MINIATURES = {"eurosat": eurosat, "caltech101": caltech101, "oxford_pets": oxford_pets,
              "oxford_flowers": oxford_flowers, "dtd": dtd, "food101": food101, "fgvc_aircraft": fgvc_aircraft,
              "sun397": sun397, "imagenet_v2": imagenet_v2, "imagenet_a": imagenet_a, "imagenet_r": imagenet_r}
LAYOUTS = {  # what each dataset folder holds afterwards (besides split_fewshot/): CoOp's layout, nothing else
    "eurosat": {"2750", "split_zhou_EuroSAT.json"},
    "caltech101": {"101_ObjectCategories", "split_zhou_Caltech101.json"},
    "oxford_pets": {"images", "split_zhou_OxfordPets.json"},
    "oxford_flowers": {"jpg", "split_zhou_OxfordFlowers.json"},
    "dtd": {"images", "imdb", "labels", "split_zhou_DescribableTextures.json"},
    "food101": {"images", "meta", "README.txt", "license_agreement.txt", "split_zhou_Food101.json"},
    "fgvc_aircraft": {"images", "variants.txt", "families.txt", "images_box.txt", "images_variant_train.txt",
                      "images_variant_val.txt", "images_variant_test.txt"},
    "sun397": {"SUN397", "ClassName.txt", "Training_01.txt", "Testing_01.txt", "split_zhou_SUN397.json"},
    "imagenet_v2": {"imagenetv2-matched-frequency-format-val", "classnames.txt"},
    "imagenet_a": {"imagenet-a", "classnames.txt"},
    "imagenet_r": {"imagenet-r", "classnames.txt"},
}


def serve(www, monkeypatch, tmp_path, name, archives=None):
    """Serve `name`'s miniature and point DATASETS (and the shipped split) at it; returns (split, classnames)."""
    built, split, classnames = MINIATURES[name]()
    archives = archives or built
    moved = []
    for a in data.ARCHIVES[name]:
        file = datasets.archive_name(a)
        blob = archives[file]
        www["files"][file] = blob
        algorithm = a.checksum.split(":")[0]  # md5 where the real one is md5: that path is exercised too
        moved.append(a._replace(url=f"{www['url']}/{file}", size=len(blob),
                                checksum=f"{algorithm}:{hashlib.new(algorithm, blob).hexdigest()}"))
    monkeypatch.setitem(data.ARCHIVES, name, tuple(moved))
    if split:
        raw, packed = split_of(split)
        (tmp_path / "shipped.json.gz").write_bytes(packed)
        shipped = (str(tmp_path / "shipped.json.gz"), sha256(raw))
        monkeypatch.setitem(data.SHIPPED, data.DATASETS[name].split_file, shipped)
    return split, classnames


# ---------------------------------------------------------------------------------------------- datasets

@pytest.mark.parametrize("name", sorted(MINIATURES))
def test_public_datasets_download_verify_unpack_and_read(www, monkeypatch, tmp_path, umask, name):
    split, classnames = serve(www, monkeypatch, tmp_path, name)
    root = tmp_path / "data"
    assert not datasets.status(name, root)[0]
    with pytest.warns(UserWarning, match="generating it as CoOp does") if name in ("food101", "sun397") else \
            contextlib.nullcontext():
        ds = data.build_dataset(name, root, shots=1, seed=1)
    folder = root / data.DATASETS[name].folder
    assert {p.name for p in folder.iterdir()} - {"split_fewshot"} == LAYOUTS[name]  # no archive, temp or .part
    assert datasets.status(name, root)[0]
    if split:
        assert json.loads((folder / data.DATASETS[name].split_file).read_text()) == {
            k: [list(e) for e in v] for k, v in split.items()}
        assert [it.impath for it in ds.test] == [str(folder / data.DATASETS[name].image_dir / e[0])
                                                 for e in split["test"]]
    if classnames:
        assert ds.classnames == classnames
    else:  # ImageNet-V2: the whole 1000-way classifier, labels are folder numbers
        assert len(ds.classnames) == 1000 and {it.label for it in ds.test} == {0, 1, 999}
        assert (ds.classnames[0], ds.classnames[999]) == ("tench", "toilet paper")
    image = ds.test[0].impath
    assert stat.S_IMODE(os.stat(image).st_mode) == 0o666 & ~umask  # not the archive's 0600
    assert stat.S_IMODE(os.stat(os.path.dirname(image)).st_mode) == 0o777 & ~umask
    requests = len(www["requests"])
    data.build_dataset(name, root, shots=1, seed=1)
    assert len(www["requests"]) == requests  # present now: nothing fetched again


def test_without_download_the_error_names_the_archive_size_and_url(www, monkeypatch, tmp_path):
    serve(www, monkeypatch, tmp_path, "dtd")
    with pytest.raises(data.DataError, match=r"dtd/images does not exist and download=False \(--no-download\); "
                                             r"dtd-r1\.0\.1\.tar\.gz \(0\.0 MiB\) from http://127\.0\.0\.1"):
        data.build_dataset("dtd", tmp_path / "data", download=False)
    assert www["requests"] == [] and not (tmp_path / "data").exists()


def test_images_present_but_not_downloaded_by_us_get_the_shipped_split(www, monkeypatch, tmp_path):
    split, _ = serve(www, monkeypatch, tmp_path, "oxford_pets")
    root = tmp_path / "data"
    with tarfile.open(fileobj=io.BytesIO(www["files"]["images.tar.gz"])) as tar:
        tar.extractall(root / "oxford_pets", filter="data")
    ds = data.build_dataset("oxford_pets", root, shots=1)
    assert www["requests"] == [] and len(ds.test) == len(split["test"])
    assert (root / "oxford_pets" / "split_zhou_OxfordPets.json").is_file()


# ---------------------------------------------------------------------------------------------- faults

def one_line(error):
    message = str(error.value)
    assert "\n" not in message and "Traceback" not in message
    return message


def test_wrong_checksum_leaves_nothing_and_says_what_to_do_offline(www, monkeypatch, tmp_path):
    serve(www, monkeypatch, tmp_path, "dtd")
    monkeypatch.setitem(data.ARCHIVES, "dtd", (data.ARCHIVES["dtd"][0]._replace(checksum="sha256:" + "0" * 64),))
    root = tmp_path / "data"
    with pytest.raises(data.DataError) as e:
        data.build_dataset("dtd", root)
    assert one_line(e) == (
        f"download of {www['url']}/dtd-r1.0.1.tar.gz to {root}/dtd/dtd-r1.0.1.tar.gz failed: checksum mismatch "
        f"(expected sha256 {'0' * 64}); offline: put the contents of the dtd/ folder of dtd-r1.0.1.tar.gz in "
        f"{root}/dtd/ (from {www['url']}/dtd-r1.0.1.tar.gz)")
    assert not root.exists()  # not even the empty folders this call made


def test_a_connection_dropped_half_way_resumes_with_range(www, monkeypatch, tmp_path):
    serve(www, monkeypatch, tmp_path, "dtd")
    size = len(www["files"]["dtd-r1.0.1.tar.gz"])
    www["drops"]["dtd-r1.0.1.tar.gz"] = [size // 2]
    ds = data.build_dataset("dtd", tmp_path / "data", shots=1)
    assert www["requests"] == [("dtd-r1.0.1.tar.gz", None), ("dtd-r1.0.1.tar.gz", f"bytes={size // 2}-")]
    assert len(ds.test) == 2


def test_a_broken_download_is_kept_and_resumed_by_the_next_call(www, tmp_path):
    blob = os.urandom(300_000)
    www["files"]["f.bin"] = blob
    www["drops"]["f.bin"] = [100_000]
    url, path = f"{www['url']}/f.bin", tmp_path / "cache" / "f.bin"
    with pytest.raises(RuntimeError, match=r"connection closed after 100000 of 300000 bytes; rerun to resume "
                                           r"from .*f\.bin\.part \(0\.1 MiB kept\)"):
        downloads.download(url, path, sha256=sha256(blob), retries=0)
    assert (tmp_path / "cache" / "f.bin.part").read_bytes() == blob[:100_000]
    assert downloads.download(url, path, sha256=sha256(blob), retries=0).read_bytes() == blob
    assert www["requests"][-1] == ("f.bin", "bytes=100000-") and os.listdir(tmp_path / "cache") == ["f.bin"]


def test_a_server_without_range_restarts_cleanly_from_zero(www, monkeypatch, tmp_path, capsys):
    serve(www, monkeypatch, tmp_path, "dtd")
    www["no_ranges"].add("dtd-r1.0.1.tar.gz")
    folder = tmp_path / "data" / "dtd"
    folder.mkdir(parents=True)
    (folder / "dtd-r1.0.1.tar.gz.part").write_bytes(b"left by an interrupted run, and not even the right bytes")
    assert len(data.build_dataset("dtd", tmp_path / "data", shots=1).test) == 2
    assert www["requests"] == [("dtd-r1.0.1.tar.gz", "bytes=56-")]  # asked to resume, got the whole file
    assert "the server ignores Range requests, restarting from 0" in capsys.readouterr().err


def test_a_dropped_download_from_a_server_without_range_keeps_nothing(www, tmp_path):
    www["files"]["f.bin"] = b"x" * 2000
    www["no_ranges"].add("f.bin")
    www["drops"]["f.bin"] = [1000, 1000]
    with pytest.raises(RuntimeError, match="connection closed after 1000 of 2000 bytes$"):
        downloads.download(f"{www['url']}/f.bin", tmp_path / "f.bin", sha256=sha256(b"x" * 2000), retries=1)
    assert os.listdir(tmp_path) == [] and len(www["requests"]) == 2  # retried from 0, then nothing kept


def test_a_full_disk_is_one_line_and_leaves_nothing(www, monkeypatch, tmp_path):
    serve(www, monkeypatch, tmp_path, "eurosat")
    real_fdopen = full_disk(monkeypatch)
    root = tmp_path / "data"
    with pytest.raises(data.DataError) as e:
        data.build_dataset("eurosat", root)
    message = one_line(e)
    assert f"{root}/eurosat/EuroSAT.zip failed: no space left on device (ENOSPC) writing " in message
    assert message.endswith(f"offline: put the 2750/ folder of EuroSAT.zip in {root}/eurosat/ "
                            f"(from {www['url']}/EuroSAT.zip)")
    assert not root.exists()
    monkeypatch.setattr(os, "fdopen", real_fdopen)  # the disk has room again: the rerun works
    assert len(data.build_dataset("eurosat", root, shots=1).test) == 3


def evil(kind):
    """A tar member that must never be unpacked."""
    info = tarfile.TarInfo({"traversal": "dtd/../../evil.txt", "absolute": "/tmp/orthcr-evil.txt"}.get(
        kind, "dtd/images/banded/evil"))
    if kind in ("traversal", "absolute"):
        info.size = 4
    elif kind == "symlink":
        info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
    elif kind == "hardlink":
        info.type, info.linkname = tarfile.LNKTYPE, "dtd/labels/train1.txt"
    else:
        info.type, info.devmajor, info.devminor = tarfile.CHRTYPE, 1, 3
    return info


@pytest.mark.parametrize("kind,reason", [("traversal", "'..' in its path"), ("absolute", "an absolute path"),
                                         ("symlink", "a link"), ("hardlink", "a link"),
                                         ("device", "a device or special file")])
def test_unsafe_tar_members_are_refused_and_leave_nothing(www, monkeypatch, tmp_path, kind, reason):
    archives, _, _ = dtd()
    with tarfile.open(fileobj=io.BytesIO(archives["dtd-r1.0.1.tar.gz"])) as tar:
        files = {m.name: tar.extractfile(m).read() for m in tar if m.isfile()}
    serve(www, monkeypatch, tmp_path, "dtd", {"dtd-r1.0.1.tar.gz": tar_bytes(files, extra=[evil(kind)])})
    root = tmp_path / "data"
    with pytest.raises(data.DataError, match=rf"refusing unsafe member '.*evil.*' \({reason}\); offline: ") as e:
        data.build_dataset("dtd", root)
    one_line(e)
    assert not root.exists() and not os.path.exists("/tmp/orthcr-evil.txt")
    assert not [p for p in tmp_path.rglob("*evil*")]


@pytest.mark.parametrize("extra", [{"2750/../../evil.txt": b"x"}, {"/evil.txt": b"x"}])
def test_unsafe_zip_members_are_refused_and_leave_nothing(www, monkeypatch, tmp_path, extra):
    archives, _, _ = eurosat()
    with zipfile.ZipFile(io.BytesIO(archives["EuroSAT.zip"])) as z:
        files = {n: z.read(n) for n in z.namelist()}
    serve(www, monkeypatch, tmp_path, "eurosat", {"EuroSAT.zip": zip_bytes({**files, **extra})})
    with pytest.raises(data.DataError, match=r"refusing unsafe member '.*evil\.txt'"):
        data.build_dataset("eurosat", tmp_path / "data")
    assert not (tmp_path / "data").exists() and not list(tmp_path.rglob("evil.txt"))


def test_a_zip_symlink_member_is_refused(www, monkeypatch, tmp_path):
    archives, _, _ = eurosat()
    with zipfile.ZipFile(io.BytesIO(archives["EuroSAT.zip"])) as z:
        files = {n: z.read(n) for n in z.namelist()}
    serve(www, monkeypatch, tmp_path, "eurosat", {"EuroSAT.zip": zip_bytes(files, links=[("2750/x", "/etc")])})
    with pytest.raises(data.DataError, match=r"refusing unsafe member '2750/x' \(a link\)"):
        data.build_dataset("eurosat", tmp_path / "data")
    assert not (tmp_path / "data").exists()


def test_a_corrupt_archive_with_the_right_checksum_is_one_line(www, monkeypatch, tmp_path):
    serve(www, monkeypatch, tmp_path, "dtd", {"dtd-r1.0.1.tar.gz": b"\x1f\x8b\x08 not really a gzip stream"})
    with pytest.raises(data.DataError, match=r"dtd-r1\.0\.1\.tar\.gz is not a readable tar archive") as e:
        data.build_dataset("dtd", tmp_path / "data")
    one_line(e)
    assert not (tmp_path / "data").exists()


# ---------------------------------------------------------------------------------------------- the command line

def test_cli_check_then_download(www, monkeypatch, tmp_path, capsys):
    serve(www, monkeypatch, tmp_path, "food101")
    root = str(tmp_path / "data")
    assert data.main(["--check", "food101", "--root", root]) == 1
    out = capsys.readouterr().out
    assert out.startswith("food101: not ready\n") and "automatic: python data.py --download food101 fetches " \
        "food-101.tar.gz" in out
    assert data.main(["--download", "food101", "--root", root]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("food101: ready\n  present  ")
    assert "warning: " in captured.err and "generating it as CoOp does" in captured.err  # one line, no source
    assert data.main(["--download", "stanford_cars", "--root", root]) == 1
    assert "by hand: expected stanford_cars/" in capsys.readouterr().out
    monkeypatch.setenv("ORTHCR_DATA", root)
    assert data.main(["--check", "food101"]) == 0


def test_cli_bad_root_and_name(tmp_path, capsys, monkeypatch):
    (tmp_path / "file").write_text("x")
    assert data.main(["--check", "all", "--root", str(tmp_path / "file")]) == 2
    assert capsys.readouterr().err == f"error: data root {tmp_path / 'file'} is a file, not a folder\n"
    monkeypatch.setenv("ORTHCR_DATA", "")
    assert data.main(["--check", "dtd"]) == 2
    assert data.main(["--check", "cifar", "--root", str(tmp_path)]) == 2
    assert "unknown dataset 'cifar'" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- files on disk

def test_download_writes_with_the_umask_and_removes_folders_it_made_on_failure(www, tmp_path, umask):
    blob = b"model bytes" * 1000
    www["files"]["m.pt"] = blob
    path = downloads.download(f"{www['url']}/m.pt", tmp_path / "cache" / "clip" / "m.pt", sha256=sha256(blob))
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    with pytest.raises(RuntimeError, match="404"):
        downloads.download(f"{www['url']}/missing.pt", tmp_path / "other" / "clip" / "m.pt", sha256=sha256(blob))
    assert not (tmp_path / "other").exists()


def test_a_failed_model_download_suggests_weights(www, tmp_path, monkeypatch):
    monkeypatch.setitem(clip_min.MODELS, "ViT-B/16", f"{www['url']}/clip/models/{'a' * 64}/ViT-B-16.pt")
    with pytest.raises(RuntimeError, match=r"HTTP Error 404.* \(or pass --weights PATH to use a checkpoint"):
        clip_min.checkpoint_path("ViT-B/16", download_root=tmp_path / "cache" / "clip")
    assert not (tmp_path / "cache").exists()


def test_write_atomic_mode_fsync_then_rename(tmp_path, monkeypatch, umask):
    events, real_fsync, real_replace = [], os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append("rename"), real_replace(a, b))[1])
    toolbox_files.write_atomic(tmp_path / "a.json", lambda tmp: tmp.write_text("{}"))
    assert events == ["fsync", "rename", "fsync"]  # the file, the rename, the folder
    assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == 0o640


def test_write_atomic_on_a_full_disk_keeps_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "cache.json"
    path.write_text("old")

    def fill_up(tmp):
        tmp.write_text("half")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError, match=rf"no space left on device \(ENOSPC\) writing {path}; the previous file is "
                                      r"unchanged") as e:
        toolbox_files.write_atomic(path, fill_up)
    assert e.value.errno == errno.ENOSPC
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["cache.json"]


def test_a_full_disk_while_copying_the_split_is_a_data_error(tmp_path, monkeypatch):
    (tmp_path / "dtd" / "images" / "banded").mkdir(parents=True)

    def no_space(path, write):
        raise OSError(errno.ENOSPC, f"no space left on device (ENOSPC) writing {path}")

    monkeypatch.setattr(toolbox_files, "write_atomic", no_space)
    with pytest.raises(data.DataError, match=r"could not copy CoOp's split_zhou_DescribableTextures\.json to .*"
                                             r"ENOSPC"):
        data.build_dataset("dtd", tmp_path)


def test_shipped_classnames_file_is_what_splits_holds():
    file, digest = data.SHIPPED["classnames.txt"]
    assert sha256((ROOT / "splits" / file).read_bytes()) == digest


def test_a_full_disk_while_unpacking_keeps_the_verified_archive_for_the_rerun(www, monkeypatch, tmp_path):
    serve(www, monkeypatch, tmp_path, "dtd")
    real_extract = archives.extract

    def no_room(path, dest, limit):
        real_extract(path, dest, limit)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(archives, "extract", no_room)
    root = tmp_path / "data"
    with pytest.raises(data.DataError, match=r"could not unpack .*dtd-r1\.0\.1\.tar\.gz into .*No space left on "
                                             r"device; the verified archive is kept for a rerun") as e:
        data.build_dataset("dtd", root)
    one_line(e)
    assert sorted(p.name for p in (root / "dtd").iterdir()) == ["dtd-r1.0.1.tar.gz"]  # no half-unpacked images/
    monkeypatch.setattr(archives, "extract", real_extract)
    assert len(data.build_dataset("dtd", root, shots=1).test) == 2
    assert len(www["requests"]) == 1  # the archive was verified again, not fetched again


# ---------------------------------------------------------------------------------------------- untrusted inputs

@pytest.mark.parametrize("target", ["dangling", "outside file"])
def test_a_part_file_that_is_a_symlink_is_refused_and_nothing_outside_is_written(www, tmp_path, target):
    blob = os.urandom(5000)
    www["files"]["f.bin"] = blob
    outside = tmp_path / "outside" / "victim.bin"
    outside.parent.mkdir()
    if target == "outside file":
        outside.write_bytes(b"precious")
    folder = tmp_path / "cache"
    folder.mkdir()
    (folder / "f.bin.part").symlink_to(outside)
    with pytest.raises(RuntimeError) as e:
        downloads.download(f"{www['url']}/f.bin", folder / "f.bin", sha256=sha256(blob), size=len(blob))
    assert one_line(e) == f"{folder / 'f.bin.part'} is a symbolic link (to {outside}), not a regular file; " \
                          "remove it and rerun"
    assert www["requests"] == []  # refused before anything is fetched
    assert (outside.read_bytes() == b"precious") if target == "outside file" else not outside.exists()


@pytest.mark.parametrize("kind", ["fifo", "folder"])
def test_a_part_file_that_is_not_a_regular_file_is_refused(www, tmp_path, kind):
    www["files"]["f.bin"] = b"x" * 100
    part = tmp_path / "f.bin.part"
    os.mkfifo(part) if kind == "fifo" else part.mkdir()
    with pytest.raises(RuntimeError, match=r"f\.bin\.part exists and is not a regular file; remove it and rerun$"):
        downloads.download(f"{www['url']}/f.bin", tmp_path / "f.bin", sha256=sha256(b"x" * 100))
    assert www["requests"] == []


def test_a_symlinked_part_in_a_dataset_folder_is_one_data_error(www, monkeypatch, tmp_path):
    serve(www, monkeypatch, tmp_path, "dtd")
    folder = tmp_path / "data" / "dtd"
    folder.mkdir(parents=True)
    (folder / "dtd-r1.0.1.tar.gz.part").symlink_to(tmp_path / "elsewhere.tar.gz")
    with pytest.raises(data.DataError, match=r"dtd-r1\.0\.1\.tar\.gz\.part is a symbolic link .*; offline: ") as e:
        data.build_dataset("dtd", tmp_path / "data")
    one_line(e)
    assert not (tmp_path / "elsewhere.tar.gz").exists() and www["requests"] == []


def test_a_body_without_length_past_the_known_size_is_stopped_there(www, tmp_path):
    www["files"]["f.bin"] = b"x" * 1000 + b"y" * 50_000  # the first 1000 bytes are what the table describes
    www["no_length"].add("f.bin")
    with pytest.raises(RuntimeError) as e:
        downloads.download(f"{www['url']}/f.bin", tmp_path / "f.bin", sha256=sha256(b"x" * 1000), size=1000)
    assert one_line(e).endswith("failed: the server sent more than the 1000 bytes expected; stopped there")
    assert os.listdir(tmp_path) == []  # no .part kept either


def test_a_server_announcing_more_than_the_known_size_is_refused_before_writing(www, tmp_path):
    www["files"]["f.bin"] = b"x" * 5000
    with pytest.raises(RuntimeError, match=r"failed: the server announces 5000 bytes, more than the 1000 expected$"):
        downloads.download(f"{www['url']}/f.bin", tmp_path / "f.bin", sha256=sha256(b"x" * 1000), size=1000)
    assert os.listdir(tmp_path) == [] and len(www["requests"]) == 1  # not retried


def test_an_oversized_dataset_archive_is_one_data_error(www, monkeypatch, tmp_path):
    serve(www, monkeypatch, tmp_path, "dtd")
    www["files"]["dtd-r1.0.1.tar.gz"] += b"\0" * 100_000  # past the size in ARCHIVES, and no length to warn
    www["no_length"].add("dtd-r1.0.1.tar.gz")
    with pytest.raises(data.DataError, match=r"sent more than the \d+ bytes expected; stopped there; offline: ") as e:
        data.build_dataset("dtd", tmp_path / "data")
    one_line(e)
    assert not (tmp_path / "data").exists()


def test_a_redirect_loop_is_one_line(www, tmp_path):
    www["redirects"]["loop.bin"] = "/loop.bin"
    with pytest.raises(RuntimeError) as e:
        downloads.download(f"{www['url']}/loop.bin", tmp_path / "loop.bin", sha256="0" * 64)
    assert one_line(e) == (f"download of {www['url']}/loop.bin to {tmp_path / 'loop.bin'} failed: HTTP Error 302: "
                           "the server redirects in a loop (or more than 10 times)")
    assert os.listdir(tmp_path) == []


def zeros_tar_gz(name, n, real=None):
    """A tar.gz holding the files of `real` ({name: bytes}) and `name`: n zero bytes (gzip shrinks them ~1000x)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for member, blob in (real or {}).items():
            info = tarfile.TarInfo(member)
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
        info = tarfile.TarInfo(name)
        info.size = n
        tar.addfile(info, io.BytesIO(bytes(n)))
    return buf.getvalue()


def test_archive_extraction_stops_at_its_limit(tmp_path):
    bomb = tmp_path / "bomb.tar.gz"
    bomb.write_bytes(zeros_tar_gz("zeros.bin", 64 * 2**20))
    assert bomb.stat().st_size < 2**20  # 64 MiB of zeros in under 1 MiB
    with pytest.raises(archives.BadArchive, match=r"bomb\.tar\.gz unpacks to more than 1\.0 MiB.*archive bomb"):
        archives.extract(bomb, tmp_path / "out", limit=2**20)
    assert not (tmp_path / "out" / "zeros.bin").exists()  # a tar header states the size: refused before writing
    header = tarfile.TarInfo("zeros.bin")
    header.size = 2**31  # a header that claims 2 GiB, with no data behind it at all
    (tmp_path / "claims.tar.gz").write_bytes(gzip.compress(header.tobuf()))
    with pytest.raises(archives.BadArchive, match="unpacks to more than"):
        archives.extract(tmp_path / "claims.tar.gz", tmp_path / "out", limit=2**20)
    zip_bomb = tmp_path / "bomb.zip"
    with zipfile.ZipFile(zip_bomb, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("zeros.bin", bytes(64 * 2**20))
    with pytest.raises(archives.BadArchive, match=r"bomb\.zip unpacks to more than 1\.0 MiB"):
        archives.extract(zip_bomb, tmp_path / "zout", limit=2**20)
    assert (tmp_path / "zout" / "zeros.bin").stat().st_size <= 2**20  # stopped at the limit, not at 64 MiB


def test_the_unpack_limit_follows_from_the_table():
    dtd_archive = data.ARCHIVES["dtd"][0]
    assert datasets.unpack_limit(dtd_archive) == 8 * dtd_archive.size
    # the bombs: a 2 MB tar.gz or a 1 MB zip may unpack to 16 MB or 8 MB, not to the GBs they hold
    assert datasets.unpack_limit(dtd_archive._replace(size=2_000_000)) == 16_000_000
    assert datasets.unpack_limit(dtd_archive._replace(size=1_000)) == 2**20


@pytest.mark.parametrize("name,kind", [("dtd", "tar.gz"), ("eurosat", "zip")])
def test_a_dataset_archive_bomb_is_one_data_error_and_leaves_nothing(www, monkeypatch, tmp_path, name, kind):
    if kind == "zip":
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
            z.writestr("2750/Forest/Forest_1.jpg", bytes(64 * 2**20))
        bomb = {"EuroSAT.zip": buf.getvalue()}
    else:
        bomb = {"dtd-r1.0.1.tar.gz": zeros_tar_gz("dtd/images/banded/banded_0001.jpg", 64 * 2**20)}
    serve(www, monkeypatch, tmp_path, name, bomb)
    with pytest.raises(data.DataError, match=r"unpacks to more than 1\.0 MiB, far more than its size allows") as e:
        data.build_dataset(name, tmp_path / "data")
    one_line(e)
    assert not (tmp_path / "data").exists()


def patched_zip(files, name, offset, value):
    """A zip of `files` whose central-directory entry for `name` has the 2 bytes at `offset` set to `value`
    (8: the flags, bit 0 = encrypted; 10: the compression method)."""
    blob = bytearray(zip_bytes(files))
    start = 0
    while True:
        at = blob.index(b"PK\x01\x02", start)
        length = int.from_bytes(blob[at + 28:at + 30], "little")
        if blob[at + 46:at + 46 + length] == name.encode():
            break
        start = at + 4
    blob[at + offset:at + offset + 2] = value.to_bytes(2, "little")
    return bytes(blob)


@pytest.mark.parametrize("offset,value,reason", [
    (8, 1, r"member '2750/Forest/x\.jpg': it is encrypted"),
    (10, 99, r"member '2750/Forest/x\.jpg': it uses compression method 99, which Python's zipfile cannot read"),
])
def test_an_encrypted_or_unknown_compression_zip_member_is_one_line(www, monkeypatch, tmp_path, offset, value,
                                                                      reason):
    archives_, _, _ = eurosat()
    with zipfile.ZipFile(io.BytesIO(archives_["EuroSAT.zip"])) as z:
        files = {n: z.read(n) for n in z.namelist()}
    files["2750/Forest/x.jpg"] = jpeg_bytes()
    bad = patched_zip(files, "2750/Forest/x.jpg", offset, value)
    serve(www, monkeypatch, tmp_path, "eurosat", {"EuroSAT.zip": bad})
    with pytest.raises(data.DataError, match=r"EuroSAT\.zip: refusing " + reason) as e:
        data.build_dataset("eurosat", tmp_path / "data")
    one_line(e)
    assert not (tmp_path / "data").exists()


@pytest.mark.parametrize("name", ["eurosat", "dtd"])
def test_an_archive_whose_image_folder_is_a_file_is_not_a_dataset(www, monkeypatch, tmp_path, name):
    if name == "eurosat":
        bad = {"EuroSAT.zip": zip_bytes({"2750": b"a file where the image folder should be"})}
        expected = r"EuroSAT\.zip: 2750 is a file, where the image folder 2750/ should be"
    else:
        bad = {"dtd-r1.0.1.tar.gz": tar_bytes({"dtd/images": b"a file", "dtd/labels/train1.txt": b"x"})}
        expected = r"dtd-r1\.0\.1\.tar\.gz: dtd/images is a file, where the image folder images/ should be"
    serve(www, monkeypatch, tmp_path, name, bad)
    root = tmp_path / "data"
    with pytest.raises(data.DataError, match=expected + "; offline: ") as e:
        data.build_dataset(name, root)
    one_line(e)
    assert not root.exists() and not datasets.status(name, root)[0]


def test_an_image_folder_that_is_a_file_on_disk_is_not_ready_and_is_named(tmp_path):
    (tmp_path / "eurosat").mkdir()
    (tmp_path / "eurosat" / "2750").write_text("not a folder")
    ready, lines = datasets.status("eurosat", tmp_path)
    assert not ready and any(f"{tmp_path / 'eurosat' / '2750'} is a file, not a folder" in line for line in lines)
    with pytest.raises(data.DataError, match=r"eurosat/2750 is a file, not a folder: expected eurosat/2750/ .*; "
                                             r"remove it and rerun$") as e:
        data.build_dataset("eurosat", tmp_path)
    one_line(e)


def test_ctrl_c_during_download_is_one_line_and_the_rerun_resumes(www, monkeypatch, tmp_path, capsys):
    serve(www, monkeypatch, tmp_path, "dtd")
    blob = www["files"]["dtd-r1.0.1.tar.gz"]
    half, real_read, calls = len(blob) // 2, http.client.HTTPResponse.read, []

    def read_then_ctrl_c(self, amt=None):  # the first read gets half the body, the second is "interrupted"
        calls.append(amt)
        if len(calls) > 1:
            raise KeyboardInterrupt
        return real_read(self, half)

    monkeypatch.setattr(http.client.HTTPResponse, "read", read_then_ctrl_c)
    root = str(tmp_path / "data")
    assert data.main(["--download", "dtd", "--root", root]) == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.strip().splitlines()[-1] == (
        f"interrupted; rerun python data.py --download dtd --root {root} to resume (what was downloaded is kept)")
    assert (tmp_path / "data" / "dtd" / "dtd-r1.0.1.tar.gz.part").read_bytes() == blob[:half]
    monkeypatch.setattr(http.client.HTTPResponse, "read", real_read)
    assert data.main(["--download", "dtd", "--root", root]) == 0
    assert www["requests"][-1] == ("dtd-r1.0.1.tar.gz", f"bytes={half}-")  # resumed, not restarted
    assert sorted(p.name for p in (tmp_path / "data" / "dtd").iterdir()) == sorted(LAYOUTS["dtd"])
