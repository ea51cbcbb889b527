"""CoOp's few-shot benchmarks, read in CoOp's folder layout, without torchvision or Dassl.

The benchmarks (`DATASETS`): 11 classification datasets for few-shot and base-to-new training and 4 ImageNet
variants for domain generalisation, each in its own folder under one data root, exactly as CoOp's DATASETS.md lays
them out. A split file `split_zhou_*.json` is CoOp's fixed list of (image path, label, class name) for train, val
and test; seven of them ship in `splits/`, two are generated as CoOp generated them.

    --data           images, under the data root                          labels and class names               obtained
    eurosat          eurosat/2750/<Class>/                                split_zhou_EuroSAT.json              download
    caltech101       caltech-101/101_ObjectCategories/<class>/            split_zhou_Caltech101.json           download
    oxford_pets      oxford_pets/images/                                  split_zhou_OxfordPets.json           download
    oxford_flowers   oxford_flowers/jpg/                                  split_zhou_OxfordFlowers.json        download
    dtd              dtd/images/<class>/                                  split_zhou_DescribableTextures.json  download
    food101          food-101/images/<class>/                             split_zhou_Food101.json *            download
    sun397           sun397/SUN397/<letter>/<class>/                      split_zhou_SUN397.json *             download
    fgvc_aircraft    fgvc_aircraft/images/                                variants.txt, images_variant_*.txt   download
    stanford_cars    stanford_cars/cars_train/, cars_test/                split_zhou_StanfordCars.json         by hand
    ucf101           ucf101/UCF-101-midframes/<Action>/                   split_zhou_UCF101.json               by hand
    imagenet         imagenet/images/{train,val}/<wnid>/                  sorted folders, classnames.txt       by hand
    imagenet_v2      imagenetv2/imagenetv2-matched-frequency-format-val/  folders 0..999, classnames.txt       download
    imagenet_sketch  imagenet-sketch/images/<wnid>/                       sorted folders, classnames.txt       by hand
    imagenet_a       imagenet-adversarial/imagenet-a/<wnid>/              sorted folders (200)                 download
    imagenet_r       imagenet-rendition/imagenet-r/<wnid>/                sorted folders (200)                 download

* generated as CoOp generates it (CoOp's own file, on Google Drive, is not shipped); the other split files and
ImageNet's classnames.txt (CLIP's class names) ship in splits/.

**Your own images**: `--data PATH` is a folder in torchvision's ImageFolder layout, `<class>/<image>` (`is_folder`
tells a path from a benchmark's name; the run is filed under `folder_name`). Labels follow the sorted class
folders; class names come from the folder's `classnames.txt` ("<folder> <class name>" per line), else from the
folder names with "_" and "-" read as spaces; the prompt is CoOp's generic "a photo of a {}." unless a template is
given. The split is the folder's `split.json` (CoOp's format): yours is used as it is; without one, CoOp's 50/20/30
per-class split is generated once (seed SPLIT_SEED), saved there with a fingerprint of the images, and a later run
on a changed folder stops with one line saying what changed. Few-shot and base-to-new work as on a benchmark.

The protocol, as CoOp runs it (`build_dataset(name, root, shots, seed, subsample)`):
- **Few-shot sampling** is Dassl's `generate_fewshot_dataset`: Python's `random` seeded with the run's seed, the
  items grouped by label in order of first appearance, `random.sample(group, K)` per label (all of them if fewer),
  train with K shots then val with min(K, 4); ImageNet samples train only. The subset is cached as JSON in
  `split_fewshot/shot_{K}-seed_{S}.json` beside the data, so every later run of that seed trains on the same images.
- **Base-to-new**: the sorted labels of the train set; the first ceil(n/2) are the base classes (trained on), the
  rest the new classes (only evaluated); each half is relabeled from 0.
- **Checked before the model loads**: the split, the labels, the cache and every image that will be read; a fault
  is one `DataError` line naming the file and what was expected.

`train_batches` and `eval_batches` turn item lists into tensor batches through one DataLoader each, with every
image's augmentation seeded from (seed, epoch, position): a resumed run, or any number of workers, sees the same
batches. The file ends with the sources: `ARCHIVES` (each public archive's URL, checksum and layout) and `SHIPPED`
(the files in splits/ and their SHA-256). The machinery that makes a dataset folder from them (download, verify,
unpack; `python data.py --check all`, `python data.py --download dtd`) is toolbox/datasets.py; reading and
checking split files and few-shot caches, toolbox/splitfiles.py; listing your own folder, toolbox/imagefolder.py;
the image file checks, toolbox/images.py.
"""

import hashlib
import math
import os
import random
import re
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import NamedTuple

import torch
from PIL import Image

import clip_min
from toolbox import datasets, imagefolder, images, splitfiles

COOP_GUIDE = "https://github.com/KaiyangZhou/CoOp/blob/main/DATASETS.md"
SPLITS_DIR = Path(__file__).resolve().parent / "splits"  # CoOp's files shipped with this repository
SPLIT_SEED = 1  # seed of a generated split: fixed, so that every run seed sees the same split
FEWSHOT_DIR = "split_fewshot"  # the few-shot cache beside the data, as CoOp names it (never a class folder)


class DataError(RuntimeError):
    """Bad or missing data on disk; the message (one line) names the path and what was expected."""


class Spec(NamedTuple):
    folder: str  # under the data root
    image_dir: str  # under `folder`, where image paths start ("" = the folder itself)
    split_file: str  # CoOp's split_zhou_*.json under `folder`, "" for datasets read from their own files
    template: str  # CoOp's prompt template
    kind: str  # reader: "split", "aircraft", "imagenet", "imagenet_v2", "imagenet_folders"
    source: str  # where the images come from, in one line (for a manual dataset: what to do)
    generate: str = ""  # without a split file nor a shipped one: "folders" (50/20/30 per class) or "sun397"
    parts: tuple = ()  # for messages: the folders the split's paths start with, when image_dir is the folder


PHOTO = "a photo of a {}."

DATASETS = {
    "eurosat": Spec(
        "eurosat", "2750", "split_zhou_EuroSAT.json", "a centered satellite photo of {}.", "split",
        "EuroSAT RGB (Helber et al.), public"),
    "imagenet": Spec(
        "imagenet", "images", "", PHOTO, "imagenet",
        "ILSVRC2012 from https://image-net.org (registration needed): its train/ and val/ folders, val sorted into "
        "one folder per wnid, in imagenet/images/"),
    "caltech101": Spec(
        "caltech-101", "101_ObjectCategories", "split_zhou_Caltech101.json", PHOTO, "split",
        "Caltech101 from CaltechDATA, public"),
    "oxford_pets": Spec(
        "oxford_pets", "images", "split_zhou_OxfordPets.json", "a photo of a {}, a type of pet.", "split",
        "Oxford-IIIT Pets (VGG), public"),
    "stanford_cars": Spec(
        "stanford_cars", "", "split_zhou_StanfordCars.json", PHOTO, "split",
        "Stanford Cars: the official ai.stanford.edu/~jkrause/cars files are gone; copies circulate (e.g. "
        "kaggle.com/datasets/jessicali9530/stanford-cars-dataset, login needed); put their cars_train/ and "
        "cars_test/ folders (00001.jpg, ...) in stanford_cars/", parts=("cars_train", "cars_test")),
    "oxford_flowers": Spec(
        "oxford_flowers", "jpg", "split_zhou_OxfordFlowers.json", "a photo of a {}, a type of flower.", "split",
        "Oxford Flowers 102 (VGG), public"),
    "food101": Spec(
        "food-101", "images", "split_zhou_Food101.json", "a photo of {}, a type of food.", "split",
        "Food-101 (ETH Zurich), public",
        generate="folders"),
    "fgvc_aircraft": Spec(
        "fgvc_aircraft", "images", "", "a photo of a {}, a type of aircraft.", "aircraft",
        "FGVC-Aircraft 2013b (VGG), public: the data/ folder of fgvc-aircraft-2013b.tar.gz renamed fgvc_aircraft/"),
    "sun397": Spec(
        "sun397", "SUN397", "split_zhou_SUN397.json", PHOTO, "split",
        "SUN397 (Princeton), public",
        generate="sun397"),
    "dtd": Spec(
        "dtd", "images", "split_zhou_DescribableTextures.json", "{} texture.", "split",
        "DTD (VGG), public"),
    "ucf101": Spec(
        "ucf101", "UCF-101-midframes", "split_zhou_UCF101.json", "a photo of a person doing {}.", "split",
        "UCF-101-midframes.zip, CoOp's middle frames of UCF101, on Google Drive "
        "(https://drive.google.com/file/d/10Jqome3vtUA2keJkNanAiFpgbyC9Hc2O), extracted into ucf101/"),
    "imagenet_v2": Spec(
        "imagenetv2", "imagenetv2-matched-frequency-format-val", "", PHOTO, "imagenet_v2",
        "ImageNetV2 matched-frequency (Recht et al.), public"),
    "imagenet_sketch": Spec(
        "imagenet-sketch", "images", "", PHOTO, "imagenet_folders",
        "ImageNet-Sketch (https://github.com/HaohanWang/ImageNet-Sketch, Google Drive or Kaggle): its one folder "
        "per wnid in imagenet-sketch/images/"),
    "imagenet_a": Spec(
        "imagenet-adversarial", "imagenet-a", "", PHOTO, "imagenet_folders",
        "ImageNet-A (Hendrycks et al.), public"),
    "imagenet_r": Spec(
        "imagenet-rendition", "imagenet-r", "", PHOTO, "imagenet_folders",
        "ImageNet-R (Hendrycks et al.), public"),
}
TEST_ONLY = ("imagenet_v2", "imagenet_folders")  # kinds with no train/val: evaluated with ImageNet's classifier
SPLITS = ("train", "val", "test")  # CoOp's split names, in a split file's order


class Item(NamedTuple):
    impath: str
    label: int
    classname: str  # as the split file spells it; Dataset.classnames holds the prompt-ready names


@dataclass
class Dataset:
    name: str  # the benchmark's name, or a folder's short name (folder_name), as run folders are named
    classnames: list  # indexed by label, prompt-ready: "_" replaced by a space as CoOp does, or classnames.txt's
    template: str  # the benchmark's, CoOp's generic one for a folder, or the one given to build_dataset
    train: list = field(default_factory=list)
    val: list = field(default_factory=list)
    test: list = field(default_factory=list)
    folder: str = ""  # a folder of your own images: its absolute path; "" for a benchmark

    def prompts(self):
        return [self.template.format(c) for c in self.classnames]


# ---------------------------------------------------------------------------------------------- CoOp's protocol

def build_dataset(name, root, shots=16, seed=1, subsample="all", download=True, template=None):
    """Dataset `name` in CoOp's layout under `root`, or a folder of your own images (`is_folder`): `shots` per
    class (0/None: all), base/new/all classes; `template` (e.g. "a satellite photo of {}.") replaces the dataset's.

    Downloads what is public and missing (unless `download=False`), then checks everything a run will read: a
    fault is a DataError, raised before any model is loaded.
    """
    if subsample not in ("all", "base", "new"):
        raise DataError(f"subsample should be 'all', 'base' or 'new', got {subsample!r}")
    shots = shots or 0
    if not isinstance(shots, int) or isinstance(shots, bool) or shots < 0:
        raise DataError(f"shots should be a non-negative integer, got {shots!r}")
    if template is not None:
        check_template(template)
    if is_folder(name):  # your own images: root plays no part
        folder = imagefolder.check_folder(name)
        name, kind, default_template, where = folder_name(folder), "folder", PHOTO, folder
        train, val, test, classnames = read_folder(folder)
    else:
        if name not in DATASETS:
            raise DataError(f"unknown dataset {name!r}; valid names: {', '.join(DATASETS)} (or a folder of your "
                            "own images, <class>/<image>, given as a path)")
        spec, root = DATASETS[name], check_root(root)
        imagefolder.warn_if_ambiguous(name, root / spec.folder)  # a folder ./eurosat is given as a path
        datasets.prepare(name, root, download)  # download what is public and missing (toolbox/datasets.py)
        train, val, test, classnames = read_dataset(spec, root)
        classnames = [c.replace("_", " ") for c in classnames]  # as CoOp does before prompting
        kind, default_template, where, folder = spec.kind, spec.template, root / spec.folder, None
    if shots and kind not in TEST_ONLY:
        train, val = fewshot_subset(where, train, val, shots, seed, sample_val=kind != "imagenet")
    train, val, test, classnames = subsample_classes(train, val, test, classnames, subsample, name)
    if kind not in TEST_ONLY and not train:
        raise DataError(f"{name} has no training images under {where}")
    if not test:
        raise DataError(f"{name} has no test images under {where}")
    # every image a run reads is checked now; the few-shot subset (small) is decoded in full
    check_images(train + val, name, "train/val", decode=bool(shots))
    check_images(test, name, "test")
    return Dataset(name, classnames, template or default_template, train, val, test,
                   folder=str(folder.resolve()) if folder else "")


def check_template(template):
    """A prompt template holds `{}` once, where the class name goes ("a satellite photo of {}."); DataError if not."""
    try:
        ok = isinstance(template, str) and template.format("\0").count("\0") == 1 and template.count("{}") == 1
    except (IndexError, KeyError, ValueError):  # "{0", "{name}", "{1}": str.format cannot fill it with one name
        ok = False
    if not ok:
        raise DataError(f"template {template!r} should hold {{}} once, where the class name goes, e.g. "
                        "'a satellite photo of {}.'")
    return template


def split_dataset_by_label(items):
    """label -> items, labels in order of first appearance (the order Dassl samples them in)."""
    groups = {}
    for it in items:
        groups.setdefault(it.label, []).append(it)
    return groups


def generate_fewshot_dataset(items, num_shots, rng, what="train"):
    """Dassl's sampler: `num_shots` items per label drawn with `rng.sample`, or all of them if fewer."""
    out, short = [], []
    for label, group in split_dataset_by_label(items).items():
        if len(group) < num_shots:
            short.append(f"{group[0].classname} has {len(group)} images")
            out += group
        else:
            out += rng.sample(group, num_shots)
    if short:
        warnings.warn(f"{what}: {len(short)} classes have fewer than {num_shots} shots, using all of their "
                      f"images ({'; '.join(short[:5])}{'; ...' if len(short) > 5 else ''})")
    return out


def fewshot_subset(folder, train, val, shots, seed, sample_val=True):
    """CoOp's few-shot train (and val, min(shots, 4)) for `seed`, cached in split_fewshot/ and reused."""
    path = Path(folder) / FEWSHOT_DIR / f"shot_{shots}-seed_{seed}.json"
    val_shots = min(shots, 4) if sample_val else 0
    if path.is_file():  # reused, once checked to be such a subset of this split
        return splitfiles.read_fewshot_cache(path, folder, (train, val), (shots, val_shots))
    rng = random.Random(seed)  # the same stream as Dassl's random.seed(seed): train drawn first, then val
    train = generate_fewshot_dataset(train, shots, rng, "train")
    val = generate_fewshot_dataset(val, val_shots, rng, "val") if sample_val else []
    splitfiles.write_fewshot_cache(path, folder, train, val)  # toolbox/splitfiles.py
    return train, val


def subsample_classes(train, val, test, classnames, subsample="all", name="dataset"):
    """Base-to-new: sorted train labels, first ceil(n/2) are base, the rest new; kept ones relabeled from 0."""
    if subsample == "all":
        return train, val, test, classnames
    labels = sorted({it.label for it in (train or test)})
    m = math.ceil(len(labels) / 2)
    selected = labels[:m] if subsample == "base" else labels[m:]
    if not selected:
        raise DataError(f"{name} has {len(labels)} class(es): its {subsample} half is empty, so base-to-new "
                        "needs at least 2 classes")
    relabel = {y: i for i, y in enumerate(selected)}

    def keep(items):
        return [it._replace(label=relabel[it.label]) for it in items if it.label in relabel]

    return keep(train), keep(val), keep(test), [classnames[y] for y in selected]


def class_balanced_subset(items, n, seed):
    """`n` items, as even across labels as possible, seeded; in their original order (for --eval-limit)."""
    if n >= len(items):
        return list(items)
    rng = random.Random(seed)
    groups = {}
    for i, it in enumerate(items):
        groups.setdefault(it.label, []).append(i)
    queues = [rng.sample(groups[y], len(groups[y])) for y in sorted(groups)]
    chosen = []
    for rank in range(max(len(q) for q in queues)):  # deal one item per class per round
        chosen += [q[rank] for q in queues if rank < len(q)]
        if len(chosen) >= n:
            break
    return [items[i] for i in sorted(chosen[:n])]


# ---------------------------------------------------------------------------------------------- CoOp's layouts

def read_dataset(spec, root):
    """(train, val, test, classnames) of a prepared dataset folder (toolbox.datasets.prepare) under `root`."""
    folder = root / spec.folder
    image_dir = folder / spec.image_dir
    if spec.kind == "split":
        train, val, test = read_split(folder / spec.split_file, image_dir)
        return train, val, test, classnames_of(train, val, test, source=folder / spec.split_file)
    if spec.kind == "aircraft":
        return read_aircraft(folder, image_dir)
    if spec.kind == "imagenet":
        names = read_imagenet_classnames(folder / "classnames.txt")
        train, classnames = read_class_folders(image_dir / "train", names)
        test, test_names = read_class_folders(image_dir / "val", names)  # ImageNet's val set is the test set
        if test_names != classnames:  # labels index the sorted folders, so both must hold the same classes
            raise DataError(f"{image_dir / 'val'} and {image_dir / 'train'} should hold the same class folders")
        return train, [], test, classnames
    names = read_imagenet_classnames(variant_classnames(spec, root))
    read = read_imagenet_v2 if spec.kind == "imagenet_v2" else read_class_folders
    test, classnames = read(image_dir, names)
    return [], [], test, classnames


def read_split(path, image_dir, raw=None):
    """CoOp's split_zhou_*.json: {"train","val","test"} lists of [path relative to image_dir, label, name]; other
    keys are ignored, as CoOp's reader ignores them. `raw`: the file's JSON, when already read."""
    raw = splitfiles.read_json(path, "split file") if raw is None else raw
    if not isinstance(raw, dict) or not all(k in raw for k in SPLITS):
        raise DataError(f"split file {path} should be a JSON object with 'train', 'val' and 'test' lists")
    train, val, test = (splitfiles.to_items(raw[k], image_dir, path, k) for k in SPLITS)  # Items under image_dir
    splitfiles.check_split(path, train, val, test)  # no image twice, train and test images, test classes trained
    return train, val, test


def classnames_of(*splits, source=None):
    """Label -> class name over all splits, as a list; labels must be 0..n-1, one name per label and vice versa."""
    where = f"{source}: " if source else ""
    names, labels = {}, {}
    for items in splits:
        for it in items:
            if it.label < 0:
                raise DataError(f"{where}label {it.label} of {it.impath} is negative")
            if names.setdefault(it.label, it.classname) != it.classname:
                raise DataError(f"{where}label {it.label} is named both {names[it.label]!r} and {it.classname!r}")
            if labels.setdefault(it.classname, it.label) != it.label:
                raise DataError(f"{where}class {it.classname!r} has labels {labels[it.classname]} and {it.label}")
    out_of_range = [y for y in names if y >= len(names)]
    if out_of_range:
        raise DataError(f"{where}label {max(out_of_range)} is out of range: {len(names)} classes take labels "
                        f"0..{len(names) - 1}")
    return [names[y] for y in range(len(names))]


def generate_split(image_dir, seed, p_train=0.5, p_val=0.2):
    """CoOp's split of one-folder-per-class data (its `read_and_split_data`): see split_classes."""
    classes = imagefolder.class_folders(image_dir)
    if not classes:
        raise DataError(f"{image_dir} has no class folders to generate a split from")
    groups = [(c, [str(image_dir / c / f) for f in _image_files(image_dir / c)]) for c in classes]
    return split_classes(groups, seed, image_dir, p_train, p_val)


def split_classes(groups, seed, where, p_train=0.5, p_val=0.2):
    """CoOp's per-class recipe over [(class name, image paths)] in label order: one random.Random(seed) shuffles
    each class's images in turn; round(50%) are train, round(20%) val, the rest test. Every class needs all
    three (CoOp asserts it): at least 4 images. DataError naming every class of `where` that has fewer."""
    rng = random.Random(seed)
    train, val, test, too_few = [], [], [], []
    for label, (category, images) in enumerate(groups):
        images = list(images)
        rng.shuffle(images)
        n_train, n_val = round(len(images) * p_train), round(len(images) * p_val)
        if not (n_train > 0 and n_val > 0 and len(images) - n_train - n_val > 0):
            too_few.append(f"{category} ({len(images)})")
        train += [Item(p, label, category) for p in images[:n_train]]
        val += [Item(p, label, category) for p in images[n_train:n_train + n_val]]
        test += [Item(p, label, category) for p in images[n_train + n_val:]]
    if too_few:
        folders = "1 class folder holds" if len(too_few) == 1 else f"{len(too_few)} class folders hold"
        raise DataError(f"{where}: {folders} too few images for CoOp's 50/20/30 split, which needs at least 4 "
                        f"per class: {', '.join(too_few[:10])}{', ...' if len(too_few) > 10 else ''}")
    return train, val, test


def generate_sun397_split(folder, image_dir, seed, p_val=0.2):
    """CoOp's SUN397 split: labels in ClassName.txt's order, Training_01.txt split per class into 80% train and
    20% val (seeded), Testing_01.txt the test set; class "/a/apartment_building/outdoor" is named
    "outdoor apartment_building", as CoOp names it."""
    classes = [ln.strip()[1:] for ln in splitfiles.read_lines(folder / "ClassName.txt")]  # "/a/abbey" -> "a/abbey"
    label_of = {c: i for i, c in enumerate(classes)}

    def read(name):
        items = []
        for ln in splitfiles.read_lines(folder / name):
            rel = ln.strip()[1:]  # "/a/abbey/sun_x.jpg" -> "a/abbey/sun_x.jpg"
            category = str(PurePosixPath(rel).parent)
            if category not in label_of:
                raise DataError(f"{folder / name}: {rel} is in no class of {folder / 'ClassName.txt'}")
            words = category.split("/")[1:][::-1]  # drop the initial letter, put indoor/outdoor first
            items.append(Item(str(image_dir / rel), label_of[category], " ".join(words)))
        return items

    trainval, test = read("Training_01.txt"), read("Testing_01.txt")
    rng, train, val = random.Random(seed), [], []
    for label, group in split_dataset_by_label(trainval).items():  # CoOp's OxfordPets.split_trainval
        n_val = round(len(group) * p_val)
        if n_val == 0:
            raise DataError(f"{folder / 'Training_01.txt'}: class {group[0].classname!r} has {len(group)} images, "
                            "too few for a val split")
        order = list(range(len(group)))
        rng.shuffle(order)
        val += [group[i] for i in order[:n_val]]
        train += [group[i] for i in order[n_val:]]
    return train, val, test


def read_aircraft(folder, image_dir):
    """FGVC-Aircraft's own files: variants.txt (class per line), images_variant_<split>.txt ("id variant")."""
    classnames = splitfiles.read_lines(folder / "variants.txt")
    label_of = {c: i for i, c in enumerate(classnames)}

    def read(split):
        items = []
        for ln in splitfiles.read_lines(folder / f"images_variant_{split}.txt"):
            image_id, _, variant = ln.partition(" ")
            if variant not in label_of:
                raise DataError(f"{folder / f'images_variant_{split}.txt'}: variant {variant!r} of image "
                                f"{image_id} is not in {folder / 'variants.txt'}")
            items.append(Item(str(image_dir / f"{image_id}.jpg"), label_of[variant], variant))
        return items

    train, val, test = map(read, SPLITS)  # FGVC's files use CoOp's split names
    lacking = sorted({it.label for it in test} - {it.label for it in train})
    if lacking:
        raise DataError(f"{folder / 'images_variant_test.txt'}: variant {classnames[lacking[0]]!r} has no "
                        f"training images in {folder / 'images_variant_train.txt'}")
    return train, val, test, classnames


def read_imagenet_classnames(path):
    """classnames.txt: "<wnid> <class name>" per line, in ImageNet's label order."""
    names = {}
    for ln in splitfiles.read_lines(path):
        wnid, _, name = ln.partition(" ")
        names[wnid] = name
    return names


def read_class_folders(split_dir, names, ignored=("README.txt",)):
    """One folder per wnid; labels index the sorted folders, class names come from `names` (wnid -> name)."""
    if not split_dir.is_dir():
        raise DataError(f"{split_dir} does not exist or is not a folder")
    folders = [f for f in _listdir(split_dir) if f not in ignored and (split_dir / f).is_dir()]
    items = []
    for label, wnid in enumerate(folders):
        if wnid not in names:
            raise DataError(f"class folder {split_dir / wnid} is not listed in classnames.txt")
        images = _image_files(split_dir / wnid)
        if not images:
            raise DataError(f"class folder {split_dir / wnid} is empty")
        items += [Item(str(split_dir / wnid / f), label, names[wnid]) for f in images]
    return items, [names[w] for w in folders]


def read_imagenet_v2(image_dir, names):
    """ImageNet-V2: folders named by ImageNet label 0..999, so labels index all of classnames.txt."""
    classnames = list(names.values())
    items = []
    for folder in sorted((f for f in _listdir(image_dir) if f.isdigit()), key=int):
        label = int(folder)
        if label >= len(classnames):
            raise DataError(f"folder {image_dir / folder} has no class in classnames.txt ({len(classnames)} lines)")
        images = _image_files(image_dir / folder)
        if not images:
            raise DataError(f"class folder {image_dir / folder} is empty")
        items += [Item(str(image_dir / folder / f), label, classnames[label]) for f in images]
    return items, classnames


def variant_classnames(spec, root):
    """An ImageNet variant reads classnames.txt in its own folder, as CoOp does, else ImageNet's."""
    own = root / spec.folder / "classnames.txt"
    imagenet = root / "imagenet" / "classnames.txt"
    return imagenet if not own.is_file() and imagenet.is_file() else own


def _image_files(folder):
    """Sorted names of the files in `folder` (no dot-files, no folders; CoOp leaves the order to the filesystem)."""
    with os.scandir(folder) as entries:
        return sorted(e.name for e in entries if not e.name.startswith(".") and e.is_file())


def _listdir(path):
    return sorted(f for f in os.listdir(path) if not f.startswith("."))


# ---------------------------------------------------------------------------------------------- your own images

SPLIT_FILE = "split.json"  # CoOp's format, beside the class folders: yours, or generated once and reused
CLASSNAMES_FILE = "classnames.txt"  # optional: one "<folder> <class name>" line per class


def is_folder(data):
    """True when `data` (--data's value) names a folder of your own images rather than a benchmark: it is not a
    benchmark's name, and it holds a path separator ("photos/flowers", "./eurosat", "~/x") or names an existing
    folder ("my_flowers", relative to the working directory, not to the data root). A benchmark's name always
    means the benchmark: a folder of that name is given as "./eurosat"."""
    data = str(data)
    if data in DATASETS:
        return False
    return os.sep in data or "/" in data or data.startswith("~") or Path(data).expanduser().is_dir()


def dataset_name(data):
    """The name a run is filed under (runs/<name>_base2new_...): a benchmark's own, a folder's `folder_name`."""
    return folder_name(data) if is_folder(data) else str(data)


def folder_name(folder):
    """A folder's short name, safe in a run folder's name: its basename ("." and "flowers/" have one too), every
    run of characters other than letters, digits, ".", "-" and "_" made one "_" ("My Flowers" -> "My_Flowers");
    a benchmark's name gets "_folder" appended, so that runs on the folder and on the benchmark never meet."""
    base = Path(folder).expanduser().resolve().name
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", base).strip("._-")[:64] or "images"
    return f"{name}_folder" if name in DATASETS else name


def read_folder(folder):
    """(train, val, test, prompt-ready class names) of a folder in ImageFolder's layout, `<class>/<image>`.

    Labels index the sorted class folders (ImageFolder's order). The split is the folder's split.json: your own
    (CoOp's format) is used as it is; one generated here must still describe the folder (its fingerprint), else
    DataError saying what changed. Without split.json one is generated with CoOp's recipe (split_classes, seed
    SPLIT_SEED) and saved there for every later run. (toolbox/imagefolder.py lists, fingerprints and saves.)
    """
    path = folder / SPLIT_FILE
    if not path.exists():
        groups, listing = imagefolder.class_groups(folder)  # [(class folder, image paths)], sorted by folder
        train, val, test = split_classes(groups, SPLIT_SEED, folder)
        imagefolder.save_generated_split((train, val, test), path, folder, listing)
        return train, val, test, imagefolder.classnames(folder, [c for c, _ in groups])
    raw = splitfiles.read_json(path, "split file")
    if isinstance(raw, dict) and "generated" in raw:
        imagefolder.check_unchanged(folder, path, raw)
    train, val, test = read_split(path, folder, raw)
    names = classnames_of(train, val, test, source=path)
    splitfiles.check_tested(path, train, test, names)  # yours: a class never tested would go unmeasured
    return train, val, test, imagefolder.classnames(folder, names)


# ---------------------------------------------------------------------------------------------- checks

def check_root(path):
    """The data root as a Path (it need not exist yet); DataError if it is empty, a file or a symlink loop."""
    return datasets.check_root(path)


def check_images(items, name, split, decode=False):
    """DataError listing the first bad paths if an image that will be read is missing, not a regular file, not an
    image, a possible decompression bomb, too elongated for the transforms or cut short (toolbox/images.py); with
    `decode`, every pixel is decoded too."""
    paths = list(dict.fromkeys(it.impath for it in items))
    bad = images.find_problems(paths, f"{split} images of {name}", decode)
    if bad:
        listing = "; ".join(f"{p} {msg}" for p, msg in bad[:5])
        raise DataError(f"{len(bad)} of {len(paths):,} {split} images of {name} are missing or unreadable: "
                        f"{listing}{'; ...' if len(bad) > 5 else ''}")


def load_image(path):
    """Decode `path` fully into an RGB PIL image; a missing, non-regular, unusable or truncated file raises
    DataError (every loader reads through here, so no transform sees an image the checks would refuse)."""
    try:
        return images.open_rgb(path)
    except images.BadImage as e:
        raise DataError(f"image {path} {e}") from None


# ---------------------------------------------------------------------------------------------- transforms

def random_resized_crop_box(width, height, generator, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
    """torchvision's RandomResizedCrop.get_params: (left, top, w, h), 10 tries then a centered fallback."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * torch.empty(1).uniform_(scale[0], scale[1], generator=generator).item()
        aspect = math.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1], generator=generator).item())
        w = round(math.sqrt(target_area * aspect))
        h = round(math.sqrt(target_area / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = torch.randint(0, height - h + 1, (1,), generator=generator).item()
            left = torch.randint(0, width - w + 1, (1,), generator=generator).item()
            return left, top, w, h
    # fallback: the whole image, cropped to the nearest allowed aspect ratio, centered
    if width / height < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif width / height > ratio[1]:
        w, h = round(height * ratio[1]), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def train_transform(pil, generator, n_px=224):
    """Random resized crop (bicubic) + horizontal flip -> float (3, n_px, n_px) in [0, 1], not normalized."""
    left, top, w, h = random_resized_crop_box(*pil.size, generator)
    img = pil.crop((left, top, left + w, top + h)).resize((n_px, n_px), Image.BICUBIC)
    if torch.rand(1, generator=generator).item() < 0.5:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    return clip_min.to_tensor(img)


def test_transform(pil, n_px=224, mean=clip_min.MEAN, std=clip_min.STD):
    """CLIP's preprocessing: resize, center crop, normalize (with the checkpoint's mean and std)."""
    return clip_min.preprocess(pil, n_px, mean, std)


# ---------------------------------------------------------------------------------------------- loaders

def steps_per_epoch(n_items, batch_size):
    """Dassl's train loader drops the last partial batch when the train set holds at least one full batch
    (EuroSAT 16-shot base, 80 images at batch 32: 2 steps, not 3); a smaller set is one partial batch."""
    return n_items // batch_size if n_items >= batch_size else int(n_items > 0)


def train_batches(items, batch_size, seed, epochs, start_step=0, num_workers=0, n_px=224, shard=(0, 1)):
    """Yield (epoch, images (B, 3, n_px, n_px) in [0, 1], labels (B,), positions (B,)) for every step from
    `start_step` to the end of the last epoch, through one DataLoader (its workers start once per run, not once per
    epoch). `positions` are the images' places in their epoch's order: what their randomness is seeded from.

    Epoch e visits the items in a permutation seeded from (seed, e); the image at position k of epoch e is cropped
    and flipped with a generator seeded from (seed, e, k): a resumed run (any `start_step`) and any `num_workers`
    see the same batches. Images are not normalized (Cutout comes first, then clip_min.normalize). With `shard`
    (rank, processes), this process takes its contiguous slice of each global batch of `batch_size`: the slices of
    all processes, in rank order, are the single process's batch.
    """
    per_epoch = steps_per_epoch(len(items), batch_size)
    if not per_epoch:
        raise ValueError("train_batches needs at least one item")
    steps = _TrainSteps(len(items), batch_size, seed, epochs, start_step, shard)
    loader = torch.utils.data.DataLoader(_TrainImages(items, seed, n_px), batch_sampler=steps,
                                         num_workers=num_workers)
    for step, (images, labels, positions) in enumerate(loader, start_step):
        yield step // per_epoch, images, labels, positions


def eval_batches(item_lists, batch_size, num_workers=0, n_px=224, mean=clip_min.MEAN, std=clip_min.STD, shard=(0, 1)):
    """Yield (index into item_lists, images (B, 3, n_px, n_px) CLIP-normalized (`mean`, `std`: the checkpoint's),
    labels (B,)) for every list in order, through one DataLoader for all of them. With `shard` (rank, processes),
    this process takes every processes-th batch from the rank-th: each image is encoded in the same batch as on one
    process."""
    rank, processes = shard
    keys = [[(i, k) for k in range(s, min(s + batch_size, len(items)))]
            for i, items in enumerate(item_lists) for s in range(0, len(items), batch_size)]
    keys = keys[rank::processes]  # this process's share of the batches
    loader = torch.utils.data.DataLoader(_EvalImages(item_lists, n_px, mean, std), batch_sampler=keys,
                                         num_workers=num_workers)
    for batch_keys, (images, labels) in zip(keys, loader):
        yield batch_keys[0][0], images, labels


def default_workers(device):
    """Loader processes for `device`: 0 on the CPU (decoding would take cores from the model), on an accelerator
    up to 8, so that image decoding never keeps it waiting."""
    if torch.device(device).type == "cpu":
        return 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return min(8, cores)


def derive_seed(*ints):
    """A 63-bit seed from a tuple of ints, stable across runs and platforms."""
    digest = hashlib.blake2b(repr(tuple(ints)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


CUTOUT_STREAM = 1  # an image's crop and flip are seeded from (seed, epoch, position), its Cutout from (..., 1)


def image_generators(seed, epoch, positions, stream):
    """One CPU generator per image, seeded from (seed, epoch, position, stream): an image's randomness after
    loading (its Cutout holes) is its own, whichever batch, or process, the image is in."""
    return [torch.Generator().manual_seed(derive_seed(seed, epoch, int(k), stream)) for k in positions]


def epoch_order(n, seed, epoch):
    return torch.randperm(n, generator=torch.Generator().manual_seed(derive_seed(seed, epoch))).tolist()


class _TrainSteps(torch.utils.data.Sampler):
    """The batches of steps start_step.. of a run, each a list of (epoch, position, item index) keys: this
    process's slice of the global batch when `shard` (rank, processes) says so."""

    def __init__(self, n, batch_size, seed, epochs, start_step, shard=(0, 1)):
        self.n, self.batch_size, self.seed, self.epochs, self.start_step = n, batch_size, seed, epochs, start_step
        self.per_epoch = steps_per_epoch(n, batch_size)
        self.rank, self.processes = shard

    def __len__(self):
        return max(0, self.per_epoch * self.epochs - self.start_step)

    def __iter__(self):
        first_epoch, skip = divmod(self.start_step, self.per_epoch)
        for epoch in range(first_epoch, self.epochs):
            order = epoch_order(self.n, self.seed, epoch)
            for step in range(skip if epoch == first_epoch else 0, self.per_epoch):
                positions = range(step * self.batch_size, min((step + 1) * self.batch_size, self.n))
                b, r, p = len(positions), self.rank, self.processes
                positions = positions[r * b // p:(r + 1) * b // p]  # this process's slice of the global batch
                yield [(epoch, k, order[k]) for k in positions]


class _TrainImages(torch.utils.data.Dataset):
    """Key (epoch, position, item index) -> (augmented image, label, position); each position owns its randomness,
    so which worker, process (or which resumed run) computes it changes nothing."""

    def __init__(self, items, seed, n_px):
        self.items, self.seed, self.n_px = items, seed, n_px

    def __len__(self):
        return len(self.items)

    def __getitem__(self, key):
        epoch, position, index = key
        item = self.items[index]
        g = torch.Generator().manual_seed(derive_seed(self.seed, epoch, position))
        return train_transform(load_image(item.impath), g, self.n_px), item.label, position


class _EvalImages(torch.utils.data.Dataset):
    """Key (list index, position) -> (CLIP-preprocessed image, label)."""

    def __init__(self, item_lists, n_px, mean=clip_min.MEAN, std=clip_min.STD):
        self.item_lists, self.n_px, self.mean, self.std = item_lists, n_px, mean, std

    def __len__(self):
        return sum(len(items) for items in self.item_lists)

    def __getitem__(self, key):
        item = self.item_lists[key[0]][key[1]]
        return test_transform(load_image(item.impath), self.n_px, self.mean, self.std), item.label


# ---------------------------------------------------------------------------------------------- sources

class Archive(NamedTuple):
    """A public archive that builds (part of) a dataset folder in CoOp's layout."""
    url: str
    checksum: str  # "sha256:<hex>" or "md5:<hex>", verified before anything is unpacked
    size: int  # bytes, for the message before the download starts and the free-space check
    moves: tuple  # (path in the archive, path in the dataset folder); "dir/*" moves every entry of dir
    nested: str = ""  # an archive inside this one that is unpacked before the moves (Caltech101's zip)
    needed: str = "images"  # "images": fetched when the images are missing; "split": only to generate a split


# The public archives that build a dataset folder in CoOp's layout (the datasets not listed are fetched by
# hand: `Spec.source` says how).
# Sources. sha256 and sizes from TensorFlow Datasets' url_checksums (tensorflow/datasets), md5s from torchvision's
# dataset classes (pytorch/vision torchvision/datasets/*.py); where both exist they describe the same file.
EUROSAT_URL = ("https://huggingface.co/datasets/torchgeo/eurosat/resolve/"
               "c877bcd43f099cd0196738f714544e355477f3fd/EuroSAT.zip")  # torchvision's EuroSAT URL
EUROSAT_MD5 = "c8fa014336c82ac7804f0398fcb19387"  # torchvision eurosat.py; 94,280,567 bytes (TFDS, madm.dfki.de copy)
ROBOTS = "https://www.robots.ox.ac.uk/~vgg/data"
ARCHIVES = {
    "eurosat": (
        Archive(EUROSAT_URL, "md5:" + EUROSAT_MD5, 94_280_567, (("2750", "2750"),)),),
    # caltech-101.zip wraps 101_ObjectCategories.tar.gz; md5 from torchvision caltech.py, size 137,414,764
    "caltech101": (
        Archive("https://data.caltech.edu/records/mzrjq-6wc02/files/caltech-101.zip",
                "md5:3138e1922a9193bfa496528edbbc45d0", 137_414_764,
                (("101_ObjectCategories", "101_ObjectCategories"),),
                nested="caltech-101/101_ObjectCategories.tar.gz"),),
    # torchvision md5 5c4f3ee8e5d25df40f4fd59a7f44e54c
    "oxford_pets": (
        Archive(f"{ROBOTS}/pets/data/images.tar.gz",
                "sha256:67195c5e1c01f1ab5f9b6a5d22b8c27a580d896ece458917e61d459337fa318d", 791_918_971,
                (("images", "images"),)),),
    # torchvision md5 52808999861908f626f3c1f4e79d11fa
    "oxford_flowers": (
        Archive(f"{ROBOTS}/flowers/102/102flowers.tgz",
                "sha256:2d01ecc807db462958cfe3d92f57a8c252b4abd240eb955770201e45f783b246", 344_862_509,
                (("jpg", "jpg"),)),),
    # torchvision md5 85eeb15f3717b99a5da872d97d918f87
    "food101": (
        Archive("http://data.vision.ee.ethz.ch/cvl/food-101.tar.gz",
                "sha256:d97d15e438b7f4498f96086a4f7e2fa42a32f2712e87d3295441b2b6314053a4", 4_996_278_331,
                (("food-101/*", ""),)),),
    "fgvc_aircraft": (
        Archive(f"{ROBOTS}/fgvc-aircraft/archives/fgvc-aircraft-2013b.tar.gz",
                "sha256:d5f68b1b81d6d7831eb9d5c5517074176b5dfbce6bcb43dc14ed1c66a87b8d75", 2_770_575_360,
                (("fgvc-aircraft-2013b/data/*", ""),)),),
    # torchvision md5 8ca2778205c41d23104230ba66911c7a for SUN397.tar.gz
    "sun397": (
        Archive("https://vision.princeton.edu/projects/2010/SUN/download/Partitions.zip",
                "sha256:e3311ea5f812d4cc6faef194688343d1111f6cd6f70f2c62f393c2b8d6ba1ec9", 18_293_705,
                (("**/ClassName.txt", "ClassName.txt"), ("**/Training_01.txt", "Training_01.txt"),
                 ("**/Testing_01.txt", "Testing_01.txt")), needed="split"),
        Archive("https://vision.princeton.edu/projects/2010/SUN/SUN397.tar.gz",
                "sha256:f404130965a7ad77bed5ececc71e720ab50f3cc1e1bb257257610d38f3b928ec", 39_077_296_924,
                (("SUN397", "SUN397"),))),
    # torchvision md5 fff73e5086ae6bdbea199a49dfb8a4c1
    "dtd": (
        Archive(f"{ROBOTS}/dtd/download/dtd-r1.0.1.tar.gz",
                "sha256:e42855a52a4950a3b59612834602aa253914755c95b0cff9ead6d07395f8e205", 625_239_812,
                (("dtd/*", ""),)),),
    # an uncompressed tar despite its name
    "imagenet_v2": (
        Archive("https://huggingface.co/datasets/vaishaal/ImageNetV2/resolve/main/imagenetv2-matched-frequency.tar.gz",
                "sha256:f0c37fdf925916b19ea1323cd9a2208cdb6959ba2c32eef2a7fc393835c9ca7c", 1_264_079_360,
                (("imagenetv2-matched-frequency-format-val", "imagenetv2-matched-frequency-format-val"),)),),
    "imagenet_a": (
        Archive("https://people.eecs.berkeley.edu/~hendrycks/imagenet-a.tar",
                "sha256:3bb3632277e6ba6392ea64c02ddbf4dd2266c9caffd6bc09c9656d28f012589e", 687_552_512,
                (("imagenet-a", "imagenet-a"),)),),
    "imagenet_r": (
        Archive("https://people.eecs.berkeley.edu/~hendrycks/imagenet-r.tar",
                "sha256:18c6bf493b39a0d975d48e587437f562caab9c52ae6327dcfa9dd8eb54aa1b52", 2_191_079_936,
                (("imagenet-r", "imagenet-r"),)),),
}

# CoOp's files shipped in splits/: (file there, sha256 of the file as CoOp distributes it). The seven split files are
# CoOp's (MIT); imagenet_classnames.txt is CoOp's recipe (DATASETS.md: "copied from CLIP"): the sorted ILSVRC2012
# wnids (tmlr-group/SCT classnames.txt, same order as Keras' imagenet_class_index.json) paired with the class names of
# CLIP's notebooks/Prompt_Engineering_for_ImageNet.ipynb (openai/CLIP fcab8b6; azshue/TPT's list is identical).
SHIPPED = {
    "split_zhou_Caltech101.json": (
        "split_zhou_Caltech101.json.gz", "52ce83205ff8ff8a1a18119aad6376120ae35c36e783a984bc560cbf10e73fa5"),
    "split_zhou_DescribableTextures.json": (
        "split_zhou_DescribableTextures.json.gz", "f26ebeccd2b58e68d70f07a0dc39fe49bf7b69024bac34396b954dfd87969c38"),
    "split_zhou_EuroSAT.json": (
        "split_zhou_EuroSAT.json.gz", "541503a77d0b26b735d85ec7a3e672804fe0aa466c2e5f07da772cc6c0af8ad2"),
    "split_zhou_OxfordFlowers.json": (
        "split_zhou_OxfordFlowers.json.gz", "2f50c42fc1a17ca13c271cb4269b1347bdb43d2be672e34f74a4e4cbfbcca794"),
    "split_zhou_OxfordPets.json": (
        "split_zhou_OxfordPets.json.gz", "d7f3ffe65b3919f95132e51422894ae18686b83c331fd8c0adcdc3dc2de6301e"),
    "split_zhou_StanfordCars.json": (
        "split_zhou_StanfordCars.json.gz", "40acee7aa65c8e4727a32d90e884b7c3f8960b523422317e163f7af65432959d"),
    "split_zhou_UCF101.json": (
        "split_zhou_UCF101.json.gz", "d78cb834f7c5792ceaff2c5ee2d7c76a9e4086e48a3a6b01232989d29cbefdd8"),
    "classnames.txt": (
        "imagenet_classnames.txt", "89e0b642c6697a3a43a06a2bb65f9fefb3ca295ccc5f4ba9ce385f1a3a58c629"),
}


# ---------------------------------------------------------------------------------------------- command line

def main(argv=None):
    """`python data.py --check NAME|all` / `--download NAME|all`: see toolbox/datasets.py."""
    return datasets.main(argv)


if __name__ == "__main__":
    sys.exit(main())
