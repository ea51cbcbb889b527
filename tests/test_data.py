"""data.py: CoOp's layouts on synthetic miniatures, Dassl's few-shot sampling, checks before training, loaders.

Downloads and archives are in test_downloads.py.
"""

import gzip
import hashlib
import io
import json
import os
import random
import shutil
import stat
import threading
import warnings
from collections import Counter

import pytest
import torch
from PIL import Image

import data
from conftest import ROOT
from toolbox import files, images

SPLIT_NAMES = [n for n, s in data.DATASETS.items() if s.kind == "split"]
EUROSAT_FOLDERS = ["AnnualCrop", "Forest", "HerbaceousVegetation", "Highway", "Industrial", "Pasture",
                   "PermanentCrop", "Residential", "River", "SeaLake"]
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
    write_split(root, name, entries)
    return entries


def write_split(root, name, entries):
    spec = data.DATASETS[name]
    (root / spec.folder / spec.split_file).write_text(json.dumps(entries))


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


@pytest.fixture
def umask():
    """Run with umask 0o027 (so a file is 0o640, neither mkstemp's 0o600 nor the usual 0o644)."""
    old = os.umask(0o027)
    yield 0o640
    os.umask(old)


# ---------------------------------------------------------------------------------------------- layouts

@pytest.mark.parametrize("name", SPLIT_NAMES)
def test_split_layouts_read_sample_and_prompt(tmp_path, name):
    entries = make_split_dataset(tmp_path, name, classname="big_class_{}")
    ds = data.build_dataset(name, tmp_path, shots=2, seed=1, download=False)
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


def make_aircraft(folder, variants=("707-320", "Cessna 172", "A300B4"), counts=(("train", 4), ("val", 2),
                                                                                 ("test", 2))):
    (folder / "images").mkdir(parents=True)
    (folder / "variants.txt").write_text("\n".join(variants) + "\n")
    image_id = 1000
    for split, n in counts:
        lines = []
        for v in variants:
            for _ in range(n):
                jpeg(folder / "images" / f"{image_id}.jpg", seed=image_id)
                lines.append(f"{image_id} {v}")
                image_id += 1
        (folder / f"images_variant_{split}.txt").write_text("\n".join(lines) + "\n")


def test_fgvc_aircraft_text_files(tmp_path):
    folder = tmp_path / "fgvc_aircraft"
    make_aircraft(folder)
    ds = data.build_dataset("fgvc_aircraft", tmp_path, shots=0)
    assert ds.classnames == ["707-320", "Cessna 172", "A300B4"]
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


def test_imagenet_without_classnames_uses_the_shipped_copy(tmp_path, umask):
    folder = tmp_path / "imagenet"
    make_class_folders(folder / "images" / "train", ["n01440764", "n01443537"], 2)
    make_class_folders(folder / "images" / "val", ["n01440764", "n01443537"], 1)
    ds = data.build_dataset("imagenet", tmp_path, shots=0)
    assert ds.classnames == ["tench", "goldfish"]
    copied = (folder / "classnames.txt").read_bytes()
    assert copied == (ROOT / "splits" / "imagenet_classnames.txt").read_bytes()
    assert hashlib.sha256(copied).hexdigest() == data.SHIPPED["classnames.txt"][1]
    assert stat.S_IMODE((folder / "classnames.txt").stat().st_mode) == umask


def test_shipped_imagenet_classnames_are_clips_names_in_wnid_order():
    lines = (ROOT / "splits" / "imagenet_classnames.txt").read_text().splitlines()
    wnids = [ln.split(" ", 1)[0] for ln in lines]
    assert len(lines) == 1000 and wnids == sorted(set(wnids)) and all(w.startswith("n") for w in wnids)
    names = data.read_imagenet_classnames(ROOT / "splits" / "imagenet_classnames.txt")
    assert names["n01440764"] == "tench" and names["n01514668"] == "rooster"
    assert names["n02012849"] == "crane bird" and names["n03126707"] == "construction crane"
    assert names["n15075141"] == "toilet paper"


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


def test_imagenet_variant_falls_back_to_imagenet_classnames_then_the_shipped_copy(tmp_path):
    write_classnames(tmp_path / "imagenet" / "classnames.txt", [("n01", "goldfish"), ("n02", "tench")])
    make_class_folders(tmp_path / "imagenet-rendition" / "imagenet-r", ["n02"], 2)
    assert data.build_dataset("imagenet_r", tmp_path).classnames == ["tench"]
    assert not (tmp_path / "imagenet-rendition" / "classnames.txt").exists()
    make_class_folders(tmp_path / "other" / "imagenet-adversarial" / "imagenet-a", ["n01443537"], 2)
    assert data.build_dataset("imagenet_a", tmp_path / "other").classnames == ["goldfish"]  # CLIP's name
    assert (tmp_path / "other" / "imagenet-adversarial" / "classnames.txt").is_file()


# ---------------------------------------------------------------------------------------------- shipped splits

SHIPPED_SPLITS = [f for f in data.SHIPPED if f.startswith("split_zhou_")]


def test_seven_coop_splits_are_shipped_gzipped_and_match_their_sha256():
    assert sorted(SHIPPED_SPLITS) == sorted(f"split_zhou_{n}.json" for n in (
        "Caltech101", "DescribableTextures", "EuroSAT", "OxfordFlowers", "OxfordPets", "StanfordCars", "UCF101"))
    for name in SHIPPED_SPLITS:
        file, sha256 = data.SHIPPED[name]
        blob = (ROOT / "splits" / file).read_bytes()
        assert blob[4:10] == b"\0\0\0\0\2\xff"  # deterministic gzip: mtime 0, level 9, no OS
        assert hashlib.sha256(gzip.decompress(blob)).hexdigest() == sha256
    assert {s.split_file for s in data.DATASETS.values() if s.kind == "split"} - set(data.SHIPPED) == {
        "split_zhou_Food101.json", "split_zhou_SUN397.json"}  # the only ones still generated


@pytest.mark.parametrize("name", SHIPPED_SPLITS)
def test_shipped_splits_decompress_to_coops_files(shared, name):
    file, _ = data.SHIPPED[name]
    assert gzip.decompress((ROOT / "splits" / file).read_bytes()) == (shared / "data" / "splits" / name).read_bytes()


def real_names_dataset(root, name, reference):
    """Every image of CoOp's split `reference` as a tiny JPEG under its real name, and no split file."""
    spec = data.DATASETS[name]
    image_dir = root / spec.folder / spec.image_dir
    buf = io.BytesIO()
    Image.new("RGB", (4, 4), (90, 40, 10)).save(buf, "JPEG")
    raw = json.loads(reference.read_text())
    for split in ("train", "val", "test"):
        for rel, _, _ in raw[split]:
            (image_dir / rel).parent.mkdir(parents=True, exist_ok=True)
            (image_dir / rel).write_bytes(buf.getvalue())


@pytest.mark.parametrize("name,file,seeds", [("dtd", "split_zhou_DescribableTextures.json", (1, 2, 3)),
                                             ("oxford_flowers", "split_zhou_OxfordFlowers.json", (1,)),
                                             ("caltech101", "split_zhou_Caltech101.json", (1,)),
                                             ("oxford_pets", "split_zhou_OxfordPets.json", (1,)),
                                             ("stanford_cars", "split_zhou_StanfordCars.json", (1,)),
                                             ("ucf101", "split_zhou_UCF101.json", (1,)),
                                             ("eurosat", "split_zhou_EuroSAT.json", (1,))])
def test_real_file_names_without_a_split_sample_exactly_coops_few_shots(shared, tmp_path, umask, name, file, seeds):
    reference = shared / "data" / "splits" / file
    real_names_dataset(tmp_path, name, reference)
    folder = tmp_path / data.DATASETS[name].folder
    image_dir = folder / data.DATASETS[name].image_dir
    train, val, _ = data.read_split(reference, image_dir)
    for seed in seeds:
        ds = data.build_dataset(name, tmp_path, shots=4, seed=seed)
        ref_train, ref_val = dassl_reference(train, val, 4, seed)
        assert ds.train == ref_train and ds.val == ref_val
    assert (folder / file).read_bytes() == reference.read_bytes()  # CoOp's file, byte for byte
    assert stat.S_IMODE((folder / file).stat().st_mode) == umask
    assert stat.S_IMODE((folder / "split_fewshot" / "shot_4-seed_1.json").stat().st_mode) == umask


def test_a_tampered_shipped_split_is_refused(tmp_path, monkeypatch):
    make_class_folders(tmp_path / "dtd" / "images", ["banded"], 3)
    fake = tmp_path / "fake.json.gz"
    fake.write_bytes(gzip.compress(b'{"train": [], "val": [], "test": []}'))
    monkeypatch.setitem(data.SHIPPED, "split_zhou_DescribableTextures.json", (str(fake), "0" * 64))
    with pytest.raises(data.DataError, match=r"fake\.json\.gz does not hold CoOp's split_zhou_Describable"):
        data.build_dataset("dtd", tmp_path)
    assert not (tmp_path / "dtd" / "split_zhou_DescribableTextures.json").exists()


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


def test_fewshot_cache_is_json_and_reused(tmp_path, umask):
    make_split_dataset(tmp_path, "dtd")
    first = data.build_dataset("dtd", tmp_path, shots=2, seed=5)
    cache = tmp_path / "dtd" / "split_fewshot" / "shot_2-seed_5.json"
    assert stat.S_IMODE(cache.stat().st_mode) == umask
    raw = json.loads(cache.read_text())
    assert [e[0] for e in raw["train"]] == [it.impath.split("dtd/", 1)[1] for it in first.train]
    # a cache edited by hand that still holds 2 images per class is what comes back: read, not resampled
    unused = [it for it in data.build_dataset("dtd", tmp_path, shots=0).train if it not in first.train]
    swap = next(it for it in unused if it.label == first.train[0].label)
    raw["train"][0] = [swap.impath.split("dtd/", 1)[1], swap.label, swap.classname]
    cache.write_text(json.dumps(raw))
    again = data.build_dataset("dtd", tmp_path, shots=2, seed=5)
    assert again.train == [swap] + first.train[1:] and again.val == first.val


def cache_with(tmp_path, edit):
    """A dtd dataset whose shot_2-seed_1 cache was edited by `edit(raw, all_train_entries)`."""
    make_split_dataset(tmp_path, "dtd")
    data.build_dataset("dtd", tmp_path, shots=2, seed=1)
    cache = tmp_path / "dtd" / "split_fewshot" / "shot_2-seed_1.json"
    raw = json.loads(cache.read_text())
    split = json.loads((tmp_path / "dtd" / "split_zhou_DescribableTextures.json").read_text())
    edit(raw, [[f"images/{e[0]}", e[1], e[2]] for e in split["train"]])
    cache.write_text(json.dumps(raw))
    return cache


@pytest.mark.parametrize("edit,message", [
    (lambda raw, pool: raw["train"].append(next(e for e in pool if e not in raw["train"] and e[1] == 0)),
     r"has 3 train images of class 'class_0' \(label 0\), more than the 2 that 2 shots take"),
    (lambda raw, pool: raw["train"].remove(next(e for e in raw["train"] if e[1] == 1)),
     r"has 1 train images of class 'class_1' \(label 1\), fewer than the 2"),
    (lambda raw, pool: raw.update(train=[e for e in raw["train"] if e[1] != 2]),
     r"has 0 train images of class 'class_2'"),
    (lambda raw, pool: raw["train"].__setitem__(1, raw["train"][0]),
     r"lists train image .* twice"),
    (lambda raw, pool: raw["val"].pop(),
     r"val images of class .* fewer than the 2"),
    (lambda raw, pool: raw["train"].__setitem__(0, ["images/elsewhere.jpg", 0, "class_0"]),
     r"not in the split .*elsewhere\.jpg.*stale: delete it"),
])
def test_a_fewshot_cache_that_disagrees_with_the_shots_is_refused(tmp_path, edit, message):
    cache = cache_with(tmp_path, edit)
    with pytest.raises(data.DataError, match=message) as e:
        data.build_dataset("dtd", tmp_path, shots=2, seed=1)
    assert str(cache) in str(e.value) and "\n" not in str(e.value)


def test_unwritable_cache_warns_and_still_samples(tmp_path, monkeypatch):
    make_split_dataset(tmp_path, "dtd")
    expected = data.build_dataset("dtd", tmp_path, shots=2, seed=9).train
    shutil.rmtree(tmp_path / "dtd" / "split_fewshot")

    def read_only(path, obj, indent=2):
        raise OSError(30, "Read-only file system", str(path))

    monkeypatch.setattr(files, "write_json", read_only)
    with pytest.warns(UserWarning, match="could not cache .*shot_2-seed_9.json"):
        assert data.build_dataset("dtd", tmp_path, shots=2, seed=9).train == expected
    assert not (tmp_path / "dtd" / "split_fewshot").exists()


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


def test_base_to_new_on_one_class_is_refused_before_training(tmp_path):
    make_split_dataset(tmp_path, "dtd", n_classes=1)
    assert len(data.build_dataset("dtd", tmp_path, shots=1, subsample="base").classnames) == 1
    with pytest.raises(data.DataError, match="dtd has 1 class.*new half is empty"):
        data.build_dataset("dtd", tmp_path, shots=1, subsample="new")


def test_generated_split_is_coops_50_20_30_and_stable(tmp_path):
    image_dir = tmp_path / "food-101" / "images"
    make_class_folders(image_dir, ["apple_pie", "baby_back_ribs"], 10)
    with pytest.warns(UserWarning, match="official split"):
        ds = data.build_dataset("food101", tmp_path, shots=0)
    assert ds.classnames == ["apple pie", "baby back ribs"]
    for y in (0, 1):
        assert [sum(it.label == y for it in s) for s in (ds.train, ds.val, ds.test)] == [5, 2, 3]
    split_file = tmp_path / "food-101" / "split_zhou_Food101.json"
    assert split_file.is_file() and not list(split_file.parent.glob(".*tmp"))
    other = tmp_path / "copy"
    shutil.copytree(image_dir, other / "food-101" / "images")
    regenerated = quietly(data.build_dataset, "food101", other, shots=0)
    assert json.loads((other / "food-101" / "split_zhou_Food101.json").read_text()) == json.loads(
        split_file.read_text())
    assert [it.impath.replace(str(other), str(tmp_path)) for it in regenerated.train] == [
        it.impath for it in ds.train]


def test_generated_split_does_not_follow_symlinked_folders(tmp_path):
    image_dir = tmp_path / "food-101" / "images"
    make_class_folders(image_dir, ["apple_pie", "bagel"], 4)
    (image_dir / "loop").symlink_to(image_dir, target_is_directory=True)  # a folder that contains itself
    (image_dir / "bagel" / "again").symlink_to(image_dir, target_is_directory=True)
    with pytest.warns(UserWarning) as record:
        ds = data.build_dataset("food101", tmp_path, shots=0)
    assert any("not following symlinked folder(s) loop" in str(w.message) for w in record)
    assert ds.classnames == ["apple pie", "bagel"] and len(ds.train + ds.val + ds.test) == 8


def sun397_files(folder, classes=("/a/abbey", "/a/apartment_building/outdoor", "/b/bakery/shop"), train=5, test=2):
    (folder).mkdir(parents=True, exist_ok=True)
    (folder / "ClassName.txt").write_text("".join(c + "\n" for c in classes))
    lines = {"Training_01.txt": [], "Testing_01.txt": []}
    for k, c in enumerate(classes):
        for part, n in (("Training_01.txt", train), ("Testing_01.txt", test)):
            for i in range(n):
                rel = f"{c}/sun_{part[:4]}{i}.jpg"
                jpeg(folder / "SUN397" / rel[1:], seed=100 * k + i)
                lines[part].append(rel)
    for part, rels in lines.items():
        (folder / part).write_text("".join(r + "\n" for r in rels))
    return lines


def test_generated_sun397_split_follows_coops_partition_procedure(tmp_path):
    lines = sun397_files(tmp_path / "sun397")
    with pytest.warns(UserWarning, match="official split"):
        ds = data.build_dataset("sun397", tmp_path, shots=0)
    assert ds.classnames == ["abbey", "outdoor apartment building", "shop bakery"]
    assert [it.impath for it in ds.test] == [str(tmp_path / "sun397" / "SUN397" / r[1:]) for r in
                                             lines["Testing_01.txt"]]
    assert Counter(it.label for it in ds.val) == {0: 1, 1: 1, 2: 1}  # round(5 * 0.2) per class
    assert sorted(ds.train + ds.val) == sorted(
        data.Item(str(tmp_path / "sun397" / "SUN397" / r[1:]), k // 5, ds.test[2 * (k // 5)].classname)
        for k, r in enumerate(lines["Training_01.txt"]))


def test_real_eurosat_sample_shipped_split_used_when_missing(shared, tmp_path):
    shutil.copytree(shared / "data" / "eurosat-sample" / "2750", tmp_path / "eurosat" / "2750")
    with pytest.raises(data.DataError, match=r"^20 of 20 train/val images of eurosat are missing"):
        data.build_dataset("eurosat", tmp_path, shots=1, download=False)  # CoOp's full split, a 360-image sample
    assert hashlib.sha256((tmp_path / "eurosat" / "split_zhou_EuroSAT.json").read_bytes()).hexdigest() == \
        data.SHIPPED["split_zhou_EuroSAT.json"][1]


def test_class_balanced_subset():
    items = [data.Item(f"{i}.jpg", y, str(y)) for i, y in enumerate([0] * 10 + [1] * 3 + [2] * 5)]
    sub = data.class_balanced_subset(items, 10, seed=0)
    assert Counter(it.label for it in sub) == {0: 4, 1: 3, 2: 3}
    assert sub == sorted(sub, key=items.index)  # original order kept
    assert sub == data.class_balanced_subset(items, 10, seed=0)
    assert sub != data.class_balanced_subset(items, 10, seed=1)
    assert Counter(it.label for it in data.class_balanced_subset(items, 6, seed=3)) == {0: 2, 1: 2, 2: 2}
    assert data.class_balanced_subset(items, 50, seed=0) == items


# ---------------------------------------------------------------------------------------------- split files

def test_unknown_name_lists_valid_names(tmp_path):
    with pytest.raises(data.DataError, match="valid names: eurosat, imagenet, caltech101"):
        data.build_dataset("cifar10", tmp_path)


@pytest.mark.parametrize("name,missing,expected", [
    ("stanford_cars", "stanford_cars",
     r"expected stanford_cars/cars_train/ and stanford_cars/cars_test/ \(Stanford Cars: .*kaggle"),
    ("ucf101", "ucf101/UCF-101-midframes", r"expected ucf101/UCF-101-midframes/ \(UCF-101-midframes\.zip.*drive"),
    ("imagenet", "imagenet/images/train", r"expected imagenet/images/train/<wnid>/ and imagenet/images/val/<wnid>/ "
                                          r"\(ILSVRC2012 from https://image-net\.org \(registration"),
    ("imagenet_sketch", "imagenet-sketch/images", r"expected imagenet-sketch/images/ \(ImageNet-Sketch"),
])
def test_a_missing_manual_dataset_names_the_folder_files_and_source(tmp_path, name, missing, expected):
    with pytest.raises(data.DataError, match=expected + r".*DATASETS\.md") as e:
        data.build_dataset(name, tmp_path / "nowhere")
    assert str(e.value).startswith(f"{tmp_path / 'nowhere' / missing} does not exist: ")
    assert not (tmp_path / "nowhere").exists()


def test_split_file_not_json_names_it(tmp_path):
    make_split_dataset(tmp_path, "ucf101")
    (tmp_path / "ucf101" / "split_zhou_UCF101.json").write_text('{"train": [')
    with pytest.raises(data.DataError, match=r"split_zhou_UCF101\.json is not valid JSON"):
        data.build_dataset("ucf101", tmp_path)


@pytest.mark.parametrize("path", ["../../../etc/hostname", "/etc/hostname", "c0/../../x.jpg", "C:\\x.jpg", ""])
def test_split_paths_outside_the_dataset_are_refused(tmp_path, path):
    entries = make_split_dataset(tmp_path, "dtd")
    entries["test"][0][0] = path
    write_split(tmp_path, "dtd", entries)
    with pytest.raises(data.DataError, match=r"split_zhou_DescribableTextures\.json: 'test' image path .* should "
                                             r"be relative to the dataset, without '\.\.'"):
        data.build_dataset("dtd", tmp_path)


@pytest.mark.parametrize("edit,message", [
    (lambda e: e["train"][0].__setitem__(1, -1), r"label -1 of .* is negative"),
    (lambda e: [x.__setitem__(1, 7) for x in e["train"] + e["val"] + e["test"] if x[1] == 2],
     r"label 7 is out of range: 3 classes take labels 0\.\.2"),
    (lambda e: e["val"][0].__setitem__(2, "other"), r"label \d is named both 'class_\d' and 'other'"),
    (lambda e: [x.__setitem__(2, "class_0") for x in e["train"] + e["val"] + e["test"] if x[1] == 1],
     r"class 'class_0' has labels \d and \d"),
    (lambda e: e.update(train=[x for x in e["train"] if x[1] != 1]),
     r"test label 1 \('class_1'\) has no training images"),
    (lambda e: e.update(test=[]), r"has no test images"),
    (lambda e: e.update(train=[]), r"has no training images"),
    (lambda e: e["test"].append(list(e["train"][0])), r"lists image .* twice"),
    (lambda e: e["train"][0].__setitem__(1, True), r"'train' entry .* is not \[image path, label, class name\]"),
])
def test_bad_labels_and_splits_name_the_label_and_the_file(tmp_path, edit, message):
    entries = make_split_dataset(tmp_path, "dtd")
    edit(entries)
    write_split(tmp_path, "dtd", entries)
    with pytest.raises(data.DataError, match=message) as e:
        data.build_dataset("dtd", tmp_path, shots=1)
    assert "split_zhou_DescribableTextures.json" in str(e.value) and "\n" not in str(e.value)


def test_split_paths_are_normalised_like_the_cache_so_a_rerun_accepts_it(tmp_path):
    entries = make_split_dataset(tmp_path, "dtd")
    for split in entries.values():
        for k, e in enumerate(split):
            e[0] = ("./" + e[0]) if k % 2 else e[0].replace("/", "\\")
    write_split(tmp_path, "dtd", entries)
    first = data.build_dataset("dtd", tmp_path, shots=2, seed=3)
    assert all("\\" not in it.impath and "/./" not in it.impath for it in first.train + first.test)
    assert data.build_dataset("dtd", tmp_path, shots=2, seed=3).train == first.train  # the cache is accepted


def test_aircraft_test_variant_without_training_images_is_refused(tmp_path):
    folder = tmp_path / "fgvc_aircraft"
    make_aircraft(folder)
    lines = (folder / "images_variant_train.txt").read_text().splitlines()
    (folder / "images_variant_train.txt").write_text("\n".join(ln for ln in lines if "Cessna" not in ln) + "\n")
    with pytest.raises(data.DataError, match=r"variant 'Cessna 172' has no training images"):
        data.build_dataset("fgvc_aircraft", tmp_path)


def test_bad_arguments(tmp_path):
    with pytest.raises(data.DataError, match="subsample"):
        data.build_dataset("dtd", tmp_path, subsample="half")
    with pytest.raises(data.DataError, match="shots"):
        data.build_dataset("dtd", tmp_path, shots=-1)


# ---------------------------------------------------------------------------------------------- the data root

def test_check_root(tmp_path):
    assert data.check_root(tmp_path / "not yet") == tmp_path / "not yet"  # created on the first download
    with pytest.raises(data.DataError, match="empty string"):
        data.check_root("")
    (tmp_path / "file").write_text("x")
    with pytest.raises(data.DataError, match=r"data root .*file is a file, not a folder"):
        data.check_root(tmp_path / "file")
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    with pytest.raises(data.DataError, match=r"data root .*a cannot be used: .*[Ll]evels of symbolic links"):
        data.check_root(tmp_path / "a")
    with pytest.raises(data.DataError, match="empty string"):
        data.build_dataset("eurosat", "")


# ---------------------------------------------------------------------------------------------- images

def half(path, keep=0.5):
    whole = path.read_bytes()
    path.write_bytes(whole[: int(len(whole) * keep)])


def test_missing_and_truncated_images_listed_before_returning(tmp_path):
    make_split_dataset(tmp_path, "dtd", counts=(2, 1, 1))
    image_dir = tmp_path / "dtd" / "images"
    (image_dir / "c1" / "train_0.jpg").unlink()
    jpeg(image_dir / "c2" / "train_1.jpg", size=(64, 64))
    half(image_dir / "c2" / "train_1.jpg")
    with pytest.raises(data.DataError) as e:
        quietly(data.build_dataset, "dtd", tmp_path, shots=2)
    msg = str(e.value)
    assert msg.startswith("2 of 9 train/val images of dtd are missing or unreadable: ") and "\n" not in msg
    assert f"{image_dir / 'c1' / 'train_0.jpg'} does not exist" in msg
    assert f"{image_dir / 'c2' / 'train_1.jpg'} cannot be decoded (image file is truncated" in msg


def fifo(path):
    path.unlink()
    os.mkfifo(path)


def bomb(path):
    jpeg(path, size=(64, 64))  # 4,096 pixels, above the limit the test sets


@pytest.mark.parametrize("fault,expected", [
    (lambda p: p.unlink(), "does not exist"),
    (lambda p: p.write_bytes(b""), "is empty"),
    (lambda p: p.write_bytes(b"not an image at all"), "is not a readable image (cannot identify image file"),
    (lambda p: (jpeg(p, size=(30, 30)), half(p, 0.9)), "cannot be decoded (image file is truncated"),
    (lambda p: (jpeg(p, size=(30, 30)), half(p, 0.1)), "is not a readable image (Truncated File Read)"),
    (fifo, "is a FIFO, not a regular file"),
    (lambda p: (p.unlink(), p.mkdir()), "is a folder, not a regular file"),
    (bomb, "is a possible decompression bomb"),
])
def test_every_test_image_is_checked_before_training(tmp_path, monkeypatch, fault, expected):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 64x64 is a "bomb", 8x8 is not
    make_split_dataset(tmp_path, "dtd", counts=(2, 1, 2))
    bad = tmp_path / "dtd" / "images" / "c1" / "test_1.jpg"
    fault(bad)
    errors = []
    worker = threading.Thread(target=lambda: errors.append(pytest.raises(
        data.DataError, data.build_dataset, "dtd", tmp_path, shots=1)), daemon=True)
    worker.start()
    worker.join(60)  # a FIFO opened for reading would block here forever
    assert not worker.is_alive(), "the check hung"
    msg = str(errors[0].value)
    assert msg == f"1 of 6 test images of dtd are missing or unreadable: {bad} {msg.split(str(bad) + ' ')[1]}"
    assert msg.split(str(bad) + " ")[1].startswith(expected)


def strip(path, size):
    """A PNG of `size` pixels: a few hundred bytes on disk, tiny to decode."""
    path.unlink(missing_ok=True)
    Image.new("L", size).save(path, "PNG")


@pytest.mark.parametrize("split,size", [("test", (1, 100_000)), ("train", (100_000, 10))])
def test_an_image_too_elongated_for_the_transforms_is_refused_by_the_check(tmp_path, split, size):
    # decoding it is cheap, but CLIP's resize (short side to 224) would make 1 x 100,000 pixels 15 GB
    make_split_dataset(tmp_path, "dtd", counts=(2, 2, 2))
    bad = tmp_path / "dtd" / "images" / "c1" / f"{split}_1.jpg"
    strip(bad, size)
    assert bad.stat().st_size < 4000
    with pytest.raises(data.DataError) as e:
        data.build_dataset("dtd", tmp_path, shots=2)  # shots: the train images are decoded in full too
    what = "test" if split == "test" else "train/val"
    assert str(e.value) == (f"1 of {6 if split == 'test' else 12} {what} images of dtd are missing or unreadable: "
                            f"{bad} is {size[0]}x{size[1]} pixels, longer than 100:1: too elongated for CLIP's resize "
                            "(short side to n_px), whose memory grows with the ratio")
    with pytest.raises(data.DataError, match=rf"image {bad} is {size[0]}x{size[1]} pixels, longer than 100:1"):
        data.load_image(bad)  # every loader, train and eval, reads through load_image


def test_clip_resize_refuses_what_it_cannot_do_in_bounded_memory():
    clip_min = pytest.importorskip("clip_min")
    with pytest.raises(ValueError, match=r"resize: a 1x100000 image is longer than 100:1"):
        clip_min.preprocess(Image.new("RGB", (1, 100_000)))
    assert clip_min.MAX_ASPECT_RATIO == 100
    assert clip_min.resize(Image.new("RGB", (100, 1)), 16).size == (1600, 16)  # 100:1 itself is fine
    assert clip_min.preprocess(Image.new("RGB", (100, 1)), 16).shape == (3, 16, 16)


def test_a_jpeg_with_bytes_after_its_end_marker_passes(tmp_path):
    make_split_dataset(tmp_path, "dtd", counts=(2, 1, 2))
    path = tmp_path / "dtd" / "images" / "c0" / "test_0.jpg"
    path.write_bytes(path.read_bytes() + b"\0" * 5000)  # padding after EOI: legal, and decoded to be sure
    assert len(data.build_dataset("dtd", tmp_path, shots=1).test) == 6


def test_long_checks_say_so_on_stderr(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(images, "PROGRESS_MIN", 5)
    make_split_dataset(tmp_path, "dtd", counts=(2, 1, 2))
    data.build_dataset("dtd", tmp_path, shots=1)
    assert "checking 6 test images of dtd (" in capsys.readouterr().err


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
    make_class_folders(tmp_path / "food-101" / "images", ["bagel"], 10)
    (tmp_path / "food-101" / "images" / "cake").mkdir()
    with pytest.raises(data.DataError, match=r"food-101/images: 1 class folder holds too few images for CoOp's "
                                             r"50/20/30 split, which needs at least 4 per class: cake \(0\)"):
        quietly(data.build_dataset, "food101", tmp_path)


def test_shots_above_class_size_warn_and_take_all(tmp_path):
    make_split_dataset(tmp_path, "food101", counts=(3, 2, 1))
    with pytest.warns(UserWarning) as record:
        ds = data.build_dataset("food101", tmp_path, shots=5)
    assert [str(w.message).split(" (")[0] for w in record] == [
        "train: 3 classes have fewer than 5 shots, using all of their images",
        "val: 3 classes have fewer than 4 shots, using all of their images"]
    assert len(ds.train) == 9 and len(ds.val) == 6


# ---------------------------------------------------------------------------------------------- transforms

@pytest.mark.parametrize("size,box", [((1000, 10), (493, 0, 13, 10)), ((10, 1000), (0, 493, 10, 13))])
def test_random_resized_crop_falls_back_to_center_clamped_to_ratio(size, box):
    # no crop of a 100:1 image has scale >= 0.08 and ratio <= 4/3, so all 10 tries fail
    assert data.random_resized_crop_box(*size, torch.Generator().manual_seed(0)) == box


def test_train_transform_shape_range_determinism_and_flip():
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


# ---------------------------------------------------------------------------------------------- loaders

@pytest.fixture
def small_items(tmp_path):
    make_split_dataset(tmp_path, "dtd", n_classes=2, counts=(5, 1, 1))
    return data.build_dataset("dtd", tmp_path, shots=0).train  # 10 items


def same(a, b):
    return len(a) == len(b) and all(x[0] == y[0] and torch.equal(x[1], y[1]) and torch.equal(x[2], y[2])
                                    for x, y in zip(a, b))


def test_steps_per_epoch_is_dassls_drop_last_rule():
    assert data.steps_per_epoch(80, 32) == 2  # EuroSAT 16-shot base: the 16 leftover images wait for next epoch
    assert data.steps_per_epoch(64, 32) == 2 and data.steps_per_epoch(95, 32) == 2
    assert data.steps_per_epoch(10, 32) == 1  # smaller than one batch: the partial batch is kept
    assert data.steps_per_epoch(0, 32) == 0


def test_train_batches_cover_every_step_once_deterministically(small_items):
    run = list(data.train_batches(small_items, 3, seed=4, epochs=3, n_px=16))
    assert [e for e, *_ in run] == [0] * 3 + [1] * 3 + [2] * 3  # 10 // 3 steps per epoch, last partial dropped
    assert all(tuple(x.shape) == (3, 3, 16, 16) and y.dtype == torch.long for _, x, y, _ in run)
    for epoch in range(3):
        labels = torch.cat([y for e, _, y, _ in run if e == epoch]).tolist()
        order = data.epoch_order(10, 4, epoch)[:9]  # the epoch's permutation, first 3 full batches
        assert labels == [small_items[i].label for i in order]
    assert not torch.equal(run[0][1], run[3][1])  # epochs differ
    # position 4 of epoch 0 (step 1, row 1) is augmented with the generator of (seed, epoch, position)
    item = small_items[data.epoch_order(10, 4, 0)[4]]
    g = torch.Generator().manual_seed(data.derive_seed(4, 0, 4))
    assert torch.equal(run[1][1][1], data.train_transform(data.load_image(item.impath), g, 16))
    assert same(run, list(data.train_batches(small_items, 3, seed=4, epochs=3, n_px=16)))
    other_seed = list(data.train_batches(small_items, 3, seed=5, epochs=3, n_px=16))
    assert not all(torch.equal(a[1], b[1]) for a, b in zip(run, other_seed))


@pytest.mark.parametrize("start_step", [1, 3, 4, 8])
def test_train_batches_resume_at_any_step(small_items, start_step):
    full = list(data.train_batches(small_items, 3, seed=4, epochs=3, n_px=16))
    assert same(full[start_step:], list(data.train_batches(small_items, 3, seed=4, epochs=3, n_px=16,
                                                           start_step=start_step)))


def test_train_batches_same_with_workers(small_items):
    plain = list(data.train_batches(small_items, 4, seed=1, epochs=2, n_px=16))
    workers = list(data.train_batches(small_items, 4, seed=1, epochs=2, n_px=16, num_workers=2, start_step=1))
    assert same(plain[1:], workers)


def test_a_train_set_smaller_than_a_batch_is_one_batch_per_epoch(small_items):
    run = list(data.train_batches(small_items, 32, seed=0, epochs=2, n_px=8))
    assert [(e, len(y)) for e, _, y, _ in run] == [(0, 10), (1, 10)]


def test_eval_batches_walk_every_list_in_order_through_one_loader(small_items):
    clip_min = pytest.importorskip("clip_min")
    lists = [small_items[:5], [], small_items[5:]]
    run = list(data.eval_batches(lists, 4, n_px=16))
    assert [(i, len(y)) for i, _, y in run] == [(0, 4), (0, 1), (2, 4), (2, 1)]
    assert torch.cat([y for _, _, y in run]).tolist() == [it.label for it in small_items]
    assert torch.equal(run[2][1][1], clip_min.preprocess(data.load_image(small_items[6].impath), 16))
    with_workers = list(data.eval_batches(lists, 4, num_workers=2, n_px=16))
    assert same(run, with_workers)


def test_default_workers():
    assert data.default_workers("cpu") == 0
    assert 1 <= data.default_workers("cuda") <= 8
    assert data.default_workers(torch.device("cuda", 0)) == data.default_workers("cuda")


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
    assert all(f"/2750/{EUROSAT_FOLDERS[it.label]}/" in it.impath for it in ds.train)
    assert ds.prompts()[3] == "a centered satellite photo of Highway or Road."
    epoch, x, y, _ = next(iter(data.train_batches(ds.train, 8, seed=1, epochs=1)))
    assert epoch == 0 and x.shape == (8, 3, 224, 224) and y.shape == (8,)


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
    assert data.steps_per_epoch(len(data.build_dataset("eurosat", eurosat_sample, shots=16,
                                                       subsample="base").train), 32) == 2  # 80 images


@pytest.mark.parametrize("fault, match", [
    ("a 5,000-digit label", "is not valid JSON"),
    ("100,000 nested lists", "is not valid JSON"),
    ("a NUL in an image path", "holds a NUL character"),
])
def test_hostile_split_files_are_one_data_error(tmp_path, fault, match):
    make_split_dataset(tmp_path, "dtd")
    path = tmp_path / data.DATASETS["dtd"].folder / data.DATASETS["dtd"].split_file
    text = path.read_text()
    if fault == "a 5,000-digit label":
        path.write_text(text.replace(', 0, "class_0"]', ', ' + "9" * 5000 + ', "class_0"]', 1))
    elif fault == "100,000 nested lists":
        path.write_text("[" * 100_000 + "]" * 100_000)
    else:
        entries = json.loads(text)
        entries["test"][0][0] = "c0/te\u0000st.jpg"
        path.write_text(json.dumps(entries))
    with pytest.raises(data.DataError, match=match) as error:
        data.build_dataset("dtd", tmp_path, shots=1)
    assert str(path) in str(error.value) and "\n" not in str(error.value)
