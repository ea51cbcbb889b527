"""data.py: CoOp's layouts on synthetic miniatures, Dassl's few-shot sampling, transforms, batches, faults."""

import functools
import hashlib
import http.server
import io
import json
import random
import shutil
import threading
import warnings
import zipfile
from collections import Counter

import pytest
import torch
from PIL import Image

import data
from conftest import ROOT

SPLIT_NAMES = [n for n, s in data.DATASETS.items() if s.kind == "split"]
EUROSAT_CLASSES = ["Annual Crop Land", "Forest", "Herbaceous Vegetation Land", "Highway or Road",
                   "Industrial Buildings", "Pasture Land", "Permanent Crop Land", "Residential Buildings",
                   "River", "Sea or Lake"]


# ---------------------------------------------------------------------------------------------- builders

def jpeg(path, seed=0, size=(8, 8)):
    """A tiny JPEG of random noise (noise, so that crops and flips change pixels)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (size[1], size[0], 3), generator=g, dtype=torch.uint8).numpy()
    Image.fromarray(pixels).save(path, "JPEG")


def make_split_dataset(root, name, n_classes=3, counts=(6, 3, 2), classname="class_{}"):
    """CoOp's layout for a split-file dataset: images under its image dir and a shuffled split_zhou JSON."""
    spec = data.DATASETS[name]
    image_dir = root / spec.folder / spec.image_dir
    entries = {"train": [], "val": [], "test": []}
    for y in range(n_classes):
        for s, (split, n) in enumerate(zip(entries, counts)):
            for i in range(n):
                rel = f"c{y}/{split}_{i}.jpg"
                jpeg(image_dir / rel, seed=1000 * y + 100 * s + i)
                entries[split].append([rel, y, classname.format(y)])
    rng = random.Random(0)
    for split in entries:  # interleave labels, so that first appearance is not label order
        rng.shuffle(entries[split])
    (root / spec.folder / spec.split_file).write_text(json.dumps(entries))
    return entries


def make_class_folders(parent, names, per_class, ignored_file=None):
    for k, name in enumerate(names):
        for i in range(per_class):
            jpeg(parent / name / f"{i:03d}.jpg", seed=100 * k + i)
    if ignored_file:
        (parent / ignored_file).write_text("not a class")


def write_classnames(path, pairs):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{wnid} {name}\n" for wnid, name in pairs))


def dassl_reference(train, val, shots, seed):
    """Dassl's procedure as described: global random seeded, per label in first-appearance order, train then val."""
    state = random.getstate()
    random.seed(seed)
    try:
        picked = []
        for pool, k in ((train, shots), (val, min(shots, 4))):
            out = []
            for label in list(dict.fromkeys(it.label for it in pool)):
                members = [it for it in pool if it.label == label]
                out += random.sample(members, k) if len(members) >= k else members
            picked.append(out)
        return picked
    finally:
        random.setstate(state)


def quietly(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


# ---------------------------------------------------------------------------------------------- layouts

@pytest.mark.parametrize("name", SPLIT_NAMES)
def test_split_layouts_read_sample_and_prompt(tmp_path, name):
    entries = make_split_dataset(tmp_path, name, classname="big_class_{}")
    ds = data.build_dataset(name, tmp_path, shots=2, seed=1)
    spec = data.DATASETS[name]
    assert (len(ds.train), len(ds.val), len(ds.test)) == (3 * 2, 3 * 2, len(entries["test"]))
    assert Counter(it.label for it in ds.train) == {0: 2, 1: 2, 2: 2}
    assert ds.classnames == ["big class 0", "big class 1", "big class 2"]
    assert ds.prompts() == [spec.template.format(c) for c in ds.classnames]
    image_dir = tmp_path / spec.folder / spec.image_dir
    assert [it.impath for it in ds.test] == [str(image_dir / e[0]) for e in entries["test"]]
    assert all(it.classname == f"big_class_{it.label}" for it in ds.train + ds.val + ds.test)


def test_templates_are_coops():
    t = {n: s.template for n, s in data.DATASETS.items()}
    assert t["eurosat"] == "a centered satellite photo of {}."
    assert t["oxford_pets"] == "a photo of a {}, a type of pet."
    assert t["dtd"] == "{} texture."
    assert t["food101"] == "a photo of {}, a type of food."
    assert t["ucf101"] == "a photo of a person doing {}."
    assert t["imagenet_r"] == t["caltech101"] == t["stanford_cars"] == "a photo of a {}."
    assert sorted(data.DATASETS) == sorted(
        ["eurosat", "imagenet", "caltech101", "oxford_pets", "stanford_cars", "oxford_flowers", "food101",
         "fgvc_aircraft", "sun397", "dtd", "ucf101", "imagenet_v2", "imagenet_sketch", "imagenet_a", "imagenet_r"])


def test_fgvc_aircraft_text_files(tmp_path):
    folder = tmp_path / "fgvc_aircraft"
    variants = ["707-320", "Cessna 172", "A300B4"]
    (folder / "images").mkdir(parents=True)
    (folder / "variants.txt").write_text("\n".join(variants) + "\n")
    image_id = 1000
    for split, n in (("train", 4), ("val", 2), ("test", 2)):
        lines = []
        for v in variants:
            for _ in range(n):
                jpeg(folder / "images" / f"{image_id}.jpg", seed=image_id)
                lines.append(f"{image_id} {v}")
                image_id += 1
        (folder / f"images_variant_{split}.txt").write_text("\n".join(lines) + "\n")
    ds = data.build_dataset("fgvc_aircraft", tmp_path, shots=0)
    assert ds.classnames == variants
    assert (len(ds.train), len(ds.val), len(ds.test)) == (12, 6, 6)
    assert ds.train[4] == data.Item(str(folder / "images" / "1004.jpg"), 1, "Cessna 172")
    assert ds.prompts()[1] == "a photo of a Cessna 172, a type of aircraft."


def test_imagenet_labels_follow_sorted_folders_and_only_train_is_sampled(tmp_path):
    folder = tmp_path / "imagenet"
    # classnames.txt out of folder order: labels must still index the sorted folders
    write_classnames(folder / "classnames.txt", [("n03", "tench"), ("n01", "goldfish"), ("n02", "great white shark")])
    make_class_folders(folder / "images" / "train", ["n01", "n02", "n03"], 5)
    make_class_folders(folder / "images" / "val", ["n01", "n02", "n03"], 2)
    ds = data.build_dataset("imagenet", tmp_path, shots=2, seed=3)
    assert ds.classnames == ["goldfish", "great white shark", "tench"]
    assert Counter(it.label for it in ds.train) == {0: 2, 1: 2, 2: 2}
    assert ds.val == [] and len(ds.test) == 6
    assert all(f"/n0{it.label + 1}/" in it.impath for it in ds.train + ds.test)
    assert json.loads((folder / "split_fewshot" / "shot_2-seed_3.json").read_text())["val"] == []


def test_imagenet_v2_labels_are_folder_numbers(tmp_path):
    names = [("n01", "goldfish"), ("n02", "great white shark"), ("n03", "tench"), ("n04", "hammerhead")]
    write_classnames(tmp_path / "imagenetv2" / "classnames.txt", names)
    image_dir = tmp_path / "imagenetv2" / "imagenetv2-matched-frequency-format-val"
    make_class_folders(image_dir, ["0", "2", "3"], 2)  # folders 0, 2, 3: label 1 absent
    ds = data.build_dataset("imagenet_v2", tmp_path, shots=16)
    assert ds.classnames == [n for _, n in names]  # the full 1000-way (here 4-way) ImageNet classifier
    assert ds.train == [] and ds.val == []
    assert sorted({(it.label, it.classname) for it in ds.test}) == [(0, "goldfish"), (2, "tench"), (3, "hammerhead")]


@pytest.mark.parametrize("name,sub", [("imagenet_sketch", "images"), ("imagenet_a", "imagenet-a"),
                                      ("imagenet_r", "imagenet-r")])
def test_imagenet_variant_folders_make_their_own_classifier(tmp_path, name, sub):
    folder = tmp_path / data.DATASETS[name].folder
    write_classnames(folder / "classnames.txt", [("n01", "goldfish"), ("n02", "great_white shark"),
                                                 ("n03", "tench"), ("n04", "hammerhead")])
    make_class_folders(folder / sub, ["n04", "n02"], 3, ignored_file="README.txt")
    ds = data.build_dataset(name, tmp_path)
    assert ds.classnames == ["great white shark", "hammerhead"]  # sorted folders, only those classes
    assert [it.label for it in ds.test] == [0, 0, 0, 1, 1, 1]
    assert ds.train == [] and ds.val == []


def test_imagenet_variant_falls_back_to_imagenet_classnames(tmp_path):
    write_classnames(tmp_path / "imagenet" / "classnames.txt", [("n01", "goldfish"), ("n02", "tench")])
    make_class_folders(tmp_path / "imagenet-rendition" / "imagenet-r", ["n02"], 2)
    assert data.build_dataset("imagenet_r", tmp_path).classnames == ["tench"]


# ---------------------------------------------------------------------------------------------- protocol

@pytest.mark.parametrize("shots,seed", [(1, 1), (3, 2), (4, 7)])
def test_fewshot_equals_dassl_procedure(tmp_path, shots, seed):
    make_split_dataset(tmp_path, "dtd", n_classes=4, counts=(9, 5, 2))
    full = data.build_dataset("dtd", tmp_path, shots=0)
    first_seen = list(dict.fromkeys(it.label for it in full.train))
    assert first_seen != sorted(first_seen)  # the data exercises "order of first appearance"
    ds = data.build_dataset("dtd", tmp_path, shots=shots, seed=seed)
    ref_train, ref_val = dassl_reference(full.train, full.val, shots, seed)
    assert ds.train == ref_train and ds.val == ref_val
    assert ds.test == full.test


def test_fewshot_cache_is_json_and_reused(tmp_path):
    make_split_dataset(tmp_path, "dtd")
    first = data.build_dataset("dtd", tmp_path, shots=2, seed=5)
    cache = tmp_path / "dtd" / "split_fewshot" / "shot_2-seed_5.json"
    raw = json.loads(cache.read_text())
    assert [e[0] for e in raw["train"]] == [it.impath.split("dtd/", 1)[1] for it in first.train]
    raw["train"] = raw["train"][:1]  # a cache edited by hand is what comes back: it is read, not resampled
    cache.write_text(json.dumps(raw))
    again = data.build_dataset("dtd", tmp_path, shots=2, seed=5)
    assert again.train == first.train[:1] and again.val == first.val


def test_unwritable_cache_warns_and_still_samples(tmp_path, monkeypatch):
    make_split_dataset(tmp_path, "dtd")
    expected = data.build_dataset("dtd", tmp_path, shots=2, seed=9).train
    shutil.rmtree(tmp_path / "dtd" / "split_fewshot")

    def read_only(path, obj):
        raise OSError(30, "Read-only file system", str(path))

    monkeypatch.setattr(data, "write_json", read_only)
    with pytest.warns(UserWarning, match="could not cache .*shot_2-seed_9.json"):
        assert data.build_dataset("dtd", tmp_path, shots=2, seed=9).train == expected
    assert not (tmp_path / "dtd" / "split_fewshot").exists()


def test_stale_fewshot_cache_is_an_error(tmp_path):
    make_split_dataset(tmp_path, "dtd")
    cache = tmp_path / "dtd" / "split_fewshot" / "shot_2-seed_1.json"
    cache.parent.mkdir()
    cache.write_text(json.dumps({"train": [["images/elsewhere.jpg", 0, "class_0"]], "val": []}))
    with pytest.raises(data.DataError, match="stale"):
        data.build_dataset("dtd", tmp_path, shots=2, seed=1)


def test_base_new_split_relabels_every_split(tmp_path):
    make_split_dataset(tmp_path, "caltech101", n_classes=5, counts=(3, 2, 2))
    full = data.build_dataset("caltech101", tmp_path, shots=0)
    base = data.build_dataset("caltech101", tmp_path, shots=0, subsample="base")
    new = data.build_dataset("caltech101", tmp_path, shots=0, subsample="new")
    assert base.classnames == full.classnames[:3] and new.classnames == full.classnames[3:]
    for split in ("train", "val", "test"):
        orig = getattr(full, split)
        assert getattr(base, split) == [it._replace(label=it.label) for it in orig if it.label < 3]
        assert getattr(new, split) == [it._replace(label=it.label - 3) for it in orig if it.label >= 3]


def test_generated_split_is_coops_50_20_30_and_stable(tmp_path):
    image_dir = tmp_path / "caltech-101" / "101_ObjectCategories"
    make_class_folders(image_dir, ["Faces", "BACKGROUND_Google", "ant", "Faces_easy"], 10)
    with pytest.warns(UserWarning, match="official split"):
        ds = data.build_dataset("caltech101", tmp_path, shots=0)
    assert ds.classnames == ["face", "ant"]  # ignored folders dropped, CoOp's renames applied
    for y in (0, 1):
        assert [sum(it.label == y for it in s) for s in (ds.train, ds.val, ds.test)] == [5, 2, 3]
    split_file = tmp_path / "caltech-101" / "split_zhou_Caltech101.json"
    assert split_file.is_file() and not list(split_file.parent.glob(".*tmp"))
    other = tmp_path / "copy"
    shutil.copytree(image_dir, other / "caltech-101" / "101_ObjectCategories")
    regenerated = quietly(data.build_dataset, "caltech101", other, shots=0)
    assert json.loads((other / "caltech-101" / "split_zhou_Caltech101.json").read_text()) == json.loads(
        split_file.read_text())
    assert [it.impath.replace(str(other), str(tmp_path)) for it in regenerated.train] == [
        it.impath for it in ds.train]


def test_class_balanced_subset():
    items = [data.Item(f"{i}.jpg", y, str(y)) for i, y in enumerate([0] * 10 + [1] * 3 + [2] * 5)]
    sub = data.class_balanced_subset(items, 10, seed=0)
    assert Counter(it.label for it in sub) == {0: 4, 1: 3, 2: 3}
    assert sub == sorted(sub, key=items.index)  # original order kept
    assert sub == data.class_balanced_subset(items, 10, seed=0)
    assert sub != data.class_balanced_subset(items, 10, seed=1)
    assert Counter(it.label for it in data.class_balanced_subset(items, 6, seed=3)) == {0: 2, 1: 2, 2: 2}
    assert data.class_balanced_subset(items, 50, seed=0) == items


# ---------------------------------------------------------------------------------------------- transforms

def test_random_resized_crop_box_within_ranges():
    for s in range(200):
        left, top, w, h = data.random_resized_crop_box(100, 80, torch.Generator().manual_seed(s))
        assert 0 <= left and left + w <= 100 and 0 <= top and top + h <= 80
        assert 0.08 * 8000 * 0.9 <= w * h  # scale >= 0.08 up to rounding
        assert 3 / 4 * 0.9 <= w / h <= 4 / 3 * 1.1


@pytest.mark.parametrize("size,box", [((1000, 10), (493, 0, 13, 10)), ((10, 1000), (0, 493, 10, 13))])
def test_random_resized_crop_falls_back_to_center_clamped_to_ratio(size, box):
    # no crop of a 100:1 image has scale >= 0.08 and ratio <= 4/3, so all 10 tries fail
    assert data.random_resized_crop_box(*size, torch.Generator().manual_seed(0)) == box


def test_train_transform_shape_range_determinism_and_flip():
    pytest.importorskip("clip_min").to_tensor  # noqa: B018 (AttributeError until clip_min exports it)
    w = 64
    gradient = Image.fromarray(torch.arange(w, dtype=torch.uint8).mul(4).repeat(48, 1)[..., None]
                               .expand(48, w, 3).contiguous().numpy())
    flips = 0
    for s in range(40):
        x = data.train_transform(gradient, torch.Generator().manual_seed(s), n_px=32)
        assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
        assert torch.equal(x, data.train_transform(gradient, torch.Generator().manual_seed(s), n_px=32))
        flips += bool(x[0, 16, 0] > x[0, 16, -1])  # brightness falls left to right only when flipped
    assert 8 <= flips <= 32
    a = data.train_transform(gradient, torch.Generator().manual_seed(0), n_px=32)
    assert not torch.equal(a, data.train_transform(gradient, torch.Generator().manual_seed(1), n_px=32))


# ---------------------------------------------------------------------------------------------- batches

@pytest.fixture
def small_items(tmp_path):
    make_split_dataset(tmp_path, "dtd", n_classes=2, counts=(5, 1, 0))
    return data.build_dataset("dtd", tmp_path, shots=0).train  # 10 items


def test_train_batches_deterministic_and_resumable(small_items):
    def run(**kw):
        return list(data.batches(small_items, 3, train=True, seed=4, epoch=1, n_px=16, **kw))

    full = run()
    assert [tuple(x.shape) for x, _ in full] == [(3, 3, 16, 16)] * 3 + [(1, 3, 16, 16)]
    assert all(y.dtype == torch.long for _, y in full)
    assert sorted(torch.cat([y for _, y in full]).tolist()) == sorted(it.label for it in small_items)
    resumed = run(start=2)
    assert len(resumed) == 2
    for (xa, ya), (xb, yb) in zip(full[2:], resumed):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    for (xa, ya), (xb, yb) in zip(full, run()):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    other_epoch = list(data.batches(small_items, 3, train=True, seed=4, epoch=2, n_px=16))
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(full, other_epoch))
    assert len(run(drop_last=True)) == 3


def test_train_batches_same_with_workers(small_items):
    plain = list(data.batches(small_items, 4, train=True, seed=1, n_px=16))
    workers = list(data.batches(small_items, 4, train=True, seed=1, n_px=16, num_workers=2))
    for (xa, ya), (xb, yb) in zip(plain, workers, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_eval_batches_keep_order_and_use_test_transform(small_items):
    clip_min = pytest.importorskip("clip_min")
    x, y = next(iter(data.batches(small_items, 4, train=False, n_px=16)))
    assert y.tolist() == [it.label for it in small_items[:4]]
    assert torch.equal(x[2], clip_min.preprocess(data.load_image(small_items[2].impath), 16))


# ---------------------------------------------------------------------------------------------- EuroSAT download

@pytest.fixture
def http_dir(tmp_path):
    """A local HTTP server on 127.0.0.1 serving tmp_path/www; yields (folder, base URL)."""
    www = tmp_path / "www"
    www.mkdir()

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(www)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield www, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def eurosat_zip(path, extra=()):
    """A miniature EuroSAT.zip: 2750/<Class>/<Class>_<i>.jpg, 4 per class; returns its md5."""
    with zipfile.ZipFile(path, "w") as z:
        for k, cls in enumerate(data.EUROSAT_CNAMES):
            for i in range(4):
                buf = io.BytesIO()
                Image.new("RGB", (8, 8), (k * 20, i * 40, 0)).save(buf, "JPEG")
                z.writestr(f"2750/{cls}/{cls}_{i}.jpg", buf.getvalue())
        for name in extra:
            z.writestr(name, b"payload")
    return hashlib.md5(path.read_bytes()).hexdigest()


def test_shipped_eurosat_split_is_coops():
    path = ROOT / "splits" / "split_zhou_EuroSAT.json"
    assert hashlib.sha256(path.read_bytes()).hexdigest() == data.EUROSAT_SPLIT_SHA256
    train, _, _ = data.read_split(path, "2750")
    assert data.classnames_of(train) == EUROSAT_CLASSES


def test_eurosat_downloads_extracts_and_copies_split(tmp_path, http_dir, monkeypatch):
    www, url = http_dir
    monkeypatch.setattr(data, "EUROSAT_URL", f"{url}/EuroSAT.zip")
    monkeypatch.setattr(data, "EUROSAT_MD5", eurosat_zip(www / "EuroSAT.zip"))
    folder = tmp_path / "data" / "eurosat"
    data.setup_eurosat(folder)
    assert sorted(p.name for p in folder.iterdir()) == ["2750", "split_zhou_EuroSAT.json"]  # no zip, no temp
    assert len(list((folder / "2750").glob("*/*.jpg"))) == 40
    split = (folder / "split_zhou_EuroSAT.json").read_bytes()
    assert hashlib.sha256(split).hexdigest() == data.EUROSAT_SPLIT_SHA256


def test_eurosat_build_from_nothing_but_a_split(tmp_path, http_dir, monkeypatch):
    www, url = http_dir
    monkeypatch.setattr(data, "EUROSAT_URL", f"{url}/EuroSAT.zip")
    monkeypatch.setattr(data, "EUROSAT_MD5", eurosat_zip(www / "EuroSAT.zip"))
    folder = tmp_path / "eurosat"
    folder.mkdir()
    entries = {s: [[f"{c}/{c}_{i}.jpg", k, EUROSAT_CLASSES[k]] for k, c in enumerate(data.EUROSAT_CNAMES)
                   for i in idx] for s, idx in (("train", (0, 1)), ("val", (2,)), ("test", (3,)))}
    (folder / "split_zhou_EuroSAT.json").write_text(json.dumps(entries))
    ds = data.build_dataset("eurosat", tmp_path, shots=1, seed=1)
    assert ds.classnames == EUROSAT_CLASSES and len(ds.train) == 10 and len(ds.test) == 10


def test_eurosat_zip_with_path_traversal_is_refused(tmp_path, http_dir, monkeypatch):
    www, url = http_dir
    monkeypatch.setattr(data, "EUROSAT_URL", f"{url}/EuroSAT.zip")
    monkeypatch.setattr(data, "EUROSAT_MD5", eurosat_zip(www / "EuroSAT.zip", extra=["2750/../../evil.txt"]))
    with pytest.raises(data.DataError, match="unsafe member"):
        data.setup_eurosat(tmp_path / "data" / "eurosat")
    assert not list(tmp_path.rglob("evil.txt")) and not (tmp_path / "data" / "eurosat" / "2750").exists()


def test_eurosat_bad_checksum_leaves_nothing(tmp_path, http_dir, monkeypatch):
    www, url = http_dir
    eurosat_zip(www / "EuroSAT.zip")
    monkeypatch.setattr(data, "EUROSAT_URL", f"{url}/EuroSAT.zip")
    monkeypatch.setattr(data, "EUROSAT_MD5", "0" * 32)
    with pytest.raises(RuntimeError, match="EuroSAT.zip"):
        data.setup_eurosat(tmp_path / "eurosat")
    assert [p.name for p in (tmp_path / "eurosat").iterdir()] == []
    monkeypatch.setattr(data, "EUROSAT_MD5", hashlib.md5((www / "EuroSAT.zip").read_bytes()).hexdigest())
    data.setup_eurosat(tmp_path / "eurosat")  # the fault gone, a rerun succeeds
    assert len(list((tmp_path / "eurosat" / "2750").glob("*/*.jpg"))) == 40


def test_eurosat_without_download_names_path_and_url(tmp_path):
    with pytest.raises(data.DataError, match="2750.*download=False.*huggingface"):
        data.build_dataset("eurosat", tmp_path, download=False)


# ---------------------------------------------------------------------------------------------- bad input

def test_unknown_name_lists_valid_names(tmp_path):
    with pytest.raises(data.DataError, match="valid names: eurosat, imagenet, caltech101"):
        data.build_dataset("cifar10", tmp_path)


def test_missing_root_names_expected_folder_and_source(tmp_path):
    with pytest.raises(data.DataError, match=r"oxford_pets does not exist: expected oxford_pets/images/ and "
                                             r"oxford_pets/split_zhou_OxfordPets\.json .*DATASETS\.md"):
        data.build_dataset("oxford_pets", tmp_path / "nowhere")


def test_missing_split_file_names_it(tmp_path):
    make_split_dataset(tmp_path, "oxford_pets")
    (tmp_path / "oxford_pets" / "split_zhou_OxfordPets.json").unlink()
    with pytest.raises(data.DataError, match=r"split file .*oxford_pets/split_zhou_OxfordPets\.json does not exist"):
        data.build_dataset("oxford_pets", tmp_path)


def test_split_file_not_json_names_it(tmp_path):
    make_split_dataset(tmp_path, "ucf101")
    (tmp_path / "ucf101" / "split_zhou_UCF101.json").write_text('{"train": [')
    with pytest.raises(data.DataError, match=r"split_zhou_UCF101\.json is not valid JSON"):
        data.build_dataset("ucf101", tmp_path)


def test_missing_and_truncated_images_listed_before_returning(tmp_path):
    make_split_dataset(tmp_path, "dtd", counts=(2, 1, 1))
    image_dir = tmp_path / "dtd" / "images"
    (image_dir / "c1" / "train_0.jpg").unlink()
    jpeg(image_dir / "c2" / "train_1.jpg", size=(64, 64))
    whole = (image_dir / "c2" / "train_1.jpg").read_bytes()
    (image_dir / "c2" / "train_1.jpg").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(data.DataError) as e:
        quietly(data.build_dataset, "dtd", tmp_path, shots=2)
    msg = str(e.value)
    assert "2 of 9 dtd train/val images" in msg
    assert f"{image_dir / 'c1' / 'train_0.jpg'}: image" in msg and "does not exist" in msg
    assert f"{image_dir / 'c2' / 'train_1.jpg'}: image" in msg and "truncated" in msg


def test_missing_test_image_listed(tmp_path):
    make_split_dataset(tmp_path, "dtd", counts=(2, 1, 1))
    (tmp_path / "dtd" / "images" / "c0" / "test_0.jpg").unlink()
    with pytest.raises(data.DataError, match=r"1 of 3 dtd test images .*\n.*c0/test_0\.jpg: does not exist"):
        data.build_dataset("dtd", tmp_path, shots=1)


def test_load_image_names_the_path(tmp_path):
    (tmp_path / "x.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(data.DataError, match="x.jpg cannot be decoded"):
        data.load_image(tmp_path / "x.jpg")
    with pytest.raises(data.DataError, match="y.jpg does not exist"):
        data.load_image(tmp_path / "y.jpg")


def test_empty_class_folder_is_named(tmp_path):
    folder = tmp_path / "imagenet-sketch"
    write_classnames(folder / "classnames.txt", [("n01", "goldfish"), ("n02", "tench")])
    make_class_folders(folder / "images", ["n01"], 2)
    (folder / "images" / "n02").mkdir()
    with pytest.raises(data.DataError, match=r"class folder .*images/n02 is empty"):
        data.build_dataset("imagenet_sketch", tmp_path)
    make_class_folders(tmp_path / "dtd" / "images", ["banded"], 10)
    (tmp_path / "dtd" / "images" / "bubbly").mkdir()
    with pytest.raises(data.DataError, match=r"class folder .*images/bubbly has 0 images"):
        quietly(data.build_dataset, "dtd", tmp_path)


def test_shots_above_class_size_warn_and_take_all(tmp_path):
    make_split_dataset(tmp_path, "food101", counts=(3, 2, 1))
    with pytest.warns(UserWarning) as record:
        ds = data.build_dataset("food101", tmp_path, shots=5)
    assert [str(w.message).split(" (")[0] for w in record] == [
        "train: 3 classes have fewer than 5 shots, using all of their images",
        "val: 3 classes have fewer than 4 shots, using all of their images"]
    assert len(ds.train) == 9 and len(ds.val) == 6


def test_bad_arguments(tmp_path):
    with pytest.raises(data.DataError, match="subsample"):
        data.build_dataset("dtd", tmp_path, subsample="half")
    with pytest.raises(data.DataError, match="shots"):
        data.build_dataset("dtd", tmp_path, shots=-1)


# ---------------------------------------------------------------------------------------------- real data

REAL_SPLITS = {  # file: (train, val, test, classes, label 0's name)
    "Caltech101": (4128, 1649, 2465, 100, "face"),
    "DescribableTextures": (2820, 1128, 1692, 47, "banded"),
    "EuroSAT": (13500, 5400, 8100, 10, "Annual Crop Land"),
    "OxfordFlowers": (4093, 1633, 2463, 102, "pink primrose"),
    "OxfordPets": (2944, 736, 3669, 37, "abyssinian"),
    "StanfordCars": (6509, 1635, 8041, 196, "2000 AM General Hummer SUV"),
    "UCF101": (7639, 1898, 3783, 101, "Apply_Eye_Makeup"),
}


@pytest.mark.parametrize("name", REAL_SPLITS)
def test_real_split_files(shared, name):
    train, val, test = data.read_split(shared / "data" / "splits" / f"split_zhou_{name}.json", "/img")
    n_train, n_val, n_test, n_classes, first = REAL_SPLITS[name]
    assert (len(train), len(val), len(test)) == (n_train, n_val, n_test)
    names = data.classnames_of(train, val, test)
    assert len(names) == n_classes and names[0] == first
    assert data.classnames_of(train) == names  # every class has training images


@pytest.fixture
def eurosat_sample(shared, tmp_path):
    """The real EuroSAT sample copied out of read-only ../shared, so the few-shot cache can be written."""
    shutil.copytree(shared / "data" / "eurosat-sample", tmp_path / "eurosat")
    return tmp_path


def test_real_eurosat_sample_end_to_end(eurosat_sample):
    ds = data.build_dataset("eurosat", eurosat_sample, shots=16, seed=1, download=False)
    assert ds.classnames == EUROSAT_CLASSES
    assert (len(ds.train), len(ds.val), len(ds.test)) == (160, 40, 100)
    assert all(it.classname == EUROSAT_CLASSES[it.label] for it in ds.train + ds.val + ds.test)
    assert all(f"/2750/{list(data.EUROSAT_CNAMES)[it.label]}/" in it.impath for it in ds.train)
    assert ds.prompts()[3] == "a centered satellite photo of Highway or Road."
    if hasattr(data.clip_min, "to_tensor"):
        x, y = next(iter(data.batches(ds.train, 8, train=True, seed=1)))
        assert x.shape == (8, 3, 224, 224) and y.shape == (8,)


def test_real_eurosat_fewshot_stable_per_seed_and_differs_across_seeds(eurosat_sample):
    def picks(seed):
        return [it.impath for it in data.build_dataset("eurosat", eurosat_sample, shots=4, seed=seed).train]

    assert picks(1) == picks(1)
    assert len({tuple(picks(s)) for s in (1, 2, 3)}) == 3
    full = data.build_dataset("eurosat", eurosat_sample, shots=0)
    ref_train, _ = dassl_reference(full.train, full.val, 4, 2)
    assert picks(2) == [it.impath for it in ref_train]


def test_real_eurosat_base_new(eurosat_sample):
    base = data.build_dataset("eurosat", eurosat_sample, shots=4, subsample="base")
    new = data.build_dataset("eurosat", eurosat_sample, shots=4, subsample="new")
    assert base.classnames == EUROSAT_CLASSES[:5] and new.classnames == EUROSAT_CLASSES[5:]
    assert all(it.classname == EUROSAT_CLASSES[it.label] for it in base.train + base.test)
    assert all(it.classname == EUROSAT_CLASSES[it.label + 5] for it in new.train + new.test)
    assert {it.label for it in new.test} == set(range(5))
