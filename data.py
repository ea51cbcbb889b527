"""CoOp's few-shot benchmarks, read in CoOp's folder layout, without torchvision or Dassl.

`build_dataset(name, root, shots, seed)` reads `<root>/<dataset folder>` exactly as CoOp does, picks the same
few-shot images CoOp picks for the same seed (Dassl's `generate_fewshot_dataset`), caches them as JSON in
`split_fewshot/`, optionally keeps only the base or new half of the classes, and checks every image it will
train on before returning. `batches(...)` turns a list of items into deterministic tensor batches.
"""

import hashlib
import json
import math
import os
import random
import shutil
import tempfile
import warnings
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import NamedTuple

import torch
from PIL import Image

import clip_min

COOP_GUIDE = "https://github.com/KaiyangZhou/CoOp/blob/main/DATASETS.md"
SPLITS_DIR = Path(__file__).resolve().parent / "splits"  # CoOp's split files shipped with this repo

# EuroSAT RGB (Helber et al.): the only benchmark that can be fetched without registration
EUROSAT_URL = ("https://huggingface.co/datasets/torchgeo/eurosat/resolve/"
               "c877bcd43f099cd0196738f714544e355477f3fd/EuroSAT.zip")
EUROSAT_MD5 = "c8fa014336c82ac7804f0398fcb19387"
EUROSAT_SPLIT_SHA256 = "541503a77d0b26b735d85ec7a3e672804fe0aa466c2e5f07da772cc6c0af8ad2"

# CoOp's class names where they differ from the folder names (used when a split is generated from folders)
EUROSAT_CNAMES = {
    "AnnualCrop": "Annual Crop Land", "Forest": "Forest", "HerbaceousVegetation": "Herbaceous Vegetation Land",
    "Highway": "Highway or Road", "Industrial": "Industrial Buildings", "Pasture": "Pasture Land",
    "PermanentCrop": "Permanent Crop Land", "Residential": "Residential Buildings", "River": "River",
    "SeaLake": "Sea or Lake",
}
CALTECH_CNAMES = {"airplanes": "airplane", "Faces": "face", "Leopards": "leopard", "Motorbikes": "motorbike"}

SPLIT_SEED = 1  # seed of a generated split: fixed, so every run seed sees the same split


class DataError(RuntimeError):
    """Bad or missing data on disk; the message names the path and what was expected."""


class Spec(NamedTuple):
    folder: str  # under the data root
    image_dir: str  # under `folder`, where image paths start ("" = the folder itself)
    split_file: str  # CoOp's split_zhou_*.json under `folder`, "" for datasets read from their own files
    template: str  # CoOp's prompt template
    kind: str  # reader: "split", "aircraft", "imagenet", "imagenet_v2", "imagenet_folders"
    source: str  # where the files come from, in one line
    generate: bool = False  # a missing split file can be generated from one folder per class, as CoOp does
    cnames: tuple = ()  # (folder, class name) renames applied when generating
    ignored: tuple = ()  # folders that are not classes


PHOTO = "a photo of a {}."
DATASETS = {
    "eurosat": Spec("eurosat", "2750", "split_zhou_EuroSAT.json", "a centered satellite photo of {}.", "split",
                    "downloaded automatically (EuroSAT RGB zip, extracts to 2750/); split file shipped in splits/",
                    True, tuple(EUROSAT_CNAMES.items())),
    "imagenet": Spec("imagenet", "images", "", PHOTO, "imagenet",
                     "ILSVRC2012 train/ and val/ (val in class folders) from image-net.org into imagenet/images/, "
                     "classnames.txt from CoOp's DATASETS.md into imagenet/"),
    "caltech101": Spec("caltech-101", "101_ObjectCategories", "split_zhou_Caltech101.json", PHOTO, "split",
                       "101_ObjectCategories.tar.gz from vision.caltech.edu extracted into caltech-101/, "
                       "split_zhou_Caltech101.json from CoOp's DATASETS.md",
                       True, tuple(CALTECH_CNAMES.items()), ("BACKGROUND_Google", "Faces_easy")),
    "oxford_pets": Spec("oxford_pets", "images", "split_zhou_OxfordPets.json", "a photo of a {}, a type of pet.",
                        "split", "images.tar.gz and annotations.tar.gz from robots.ox.ac.uk/~vgg/data/pets into "
                        "oxford_pets/, split_zhou_OxfordPets.json from CoOp's DATASETS.md"),
    "stanford_cars": Spec("stanford_cars", "", "split_zhou_StanfordCars.json", PHOTO, "split",
                          "cars_train/, cars_test/ (ai.stanford.edu/~jkrause/cars) in stanford_cars/, "
                          "split_zhou_StanfordCars.json from CoOp's DATASETS.md"),
    "oxford_flowers": Spec("oxford_flowers", "jpg", "split_zhou_OxfordFlowers.json",
                           "a photo of a {}, a type of flower.", "split",
                           "102flowers.tgz from robots.ox.ac.uk/~vgg/data/flowers/102 extracted into "
                           "oxford_flowers/, split_zhou_OxfordFlowers.json from CoOp's DATASETS.md"),
    "food101": Spec("food-101", "images", "split_zhou_Food101.json", "a photo of {}, a type of food.", "split",
                    "food-101.tar.gz from data.vision.ee.ethz.ch/cvl/datasets_extra/food-101 extracted to food-101/, "
                    "split_zhou_Food101.json from CoOp's DATASETS.md", True),
    "fgvc_aircraft": Spec("fgvc_aircraft", "images", "", "a photo of a {}, a type of aircraft.", "aircraft",
                          "the data/ folder of fgvc-aircraft-2013b.tar.gz (robots.ox.ac.uk/~vgg/data/fgvc-aircraft) "
                          "renamed to fgvc_aircraft/"),
    "sun397": Spec("sun397", "SUN397", "split_zhou_SUN397.json", PHOTO, "split",
                   "SUN397.tar.gz from vision.princeton.edu/projects/2010/SUN extracted into sun397/, "
                   "split_zhou_SUN397.json from CoOp's DATASETS.md"),
    "dtd": Spec("dtd", "images", "split_zhou_DescribableTextures.json", "{} texture.", "split",
                "dtd-r1.0.1.tar.gz from robots.ox.ac.uk/~vgg/data/dtd extracted to dtd/, "
                "split_zhou_DescribableTextures.json from CoOp's DATASETS.md", True),
    "ucf101": Spec("ucf101", "UCF-101-midframes", "split_zhou_UCF101.json", "a photo of a person doing {}.", "split",
                   "UCF-101-midframes.zip and split_zhou_UCF101.json from CoOp's DATASETS.md into ucf101/"),
    "imagenet_v2": Spec("imagenetv2", "imagenetv2-matched-frequency-format-val", "", PHOTO, "imagenet_v2",
                        "imagenetv2-matched-frequency.tar.gz (github.com/modestyachts/ImageNetV2) extracted into "
                        "imagenetv2/, plus imagenet/classnames.txt copied there"),
    "imagenet_sketch": Spec("imagenet-sketch", "images", "", PHOTO, "imagenet_folders",
                            "github.com/HaohanWang/ImageNet-Sketch extracted to imagenet-sketch/, "
                            "plus imagenet/classnames.txt copied there"),
    "imagenet_a": Spec("imagenet-adversarial", "imagenet-a", "", PHOTO, "imagenet_folders",
                       "github.com/hendrycks/natural-adv-examples extracted into imagenet-adversarial/, "
                       "plus imagenet/classnames.txt copied there"),
    "imagenet_r": Spec("imagenet-rendition", "imagenet-r", "", PHOTO, "imagenet_folders",
                       "github.com/hendrycks/imagenet-r extracted into imagenet-rendition/, "
                       "plus imagenet/classnames.txt copied there"),
}
TEST_ONLY = ("imagenet_v2", "imagenet_folders")  # kinds with no train/val: evaluated with ImageNet's classifier


class Item(NamedTuple):
    impath: str
    label: int
    classname: str  # as the split file spells it; Dataset.classnames holds the prompt-ready names


@dataclass
class Dataset:
    name: str
    classnames: list  # indexed by label, "_" replaced by a space as CoOp does before prompting
    template: str
    train: list = field(default_factory=list)
    val: list = field(default_factory=list)
    test: list = field(default_factory=list)

    def prompts(self):
        return [self.template.format(c) for c in self.classnames]


# ---------------------------------------------------------------------------------------------- files on disk

def load_image(path):
    """Decode `path` fully into an RGB PIL image; a missing or truncated file raises DataError naming it."""
    try:
        with Image.open(path) as im:
            return im.convert("RGB")  # convert decodes every pixel, so truncation surfaces here, not mid-epoch
    except FileNotFoundError:
        raise DataError(f"image {path} does not exist") from None
    except (OSError, SyntaxError, ValueError) as e:  # PIL's errors for unreadable or truncated files
        raise DataError(f"image {path} cannot be decoded: {e}") from None


def write_json(path, obj):
    """Write JSON to a temporary file beside `path`, then rename: a crash never leaves half a file."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    clip_min.write_atomic(path, lambda tmp: tmp.write_text(json.dumps(obj)))


def read_json(path, what):
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise DataError(f"{what} {path} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{what} {path} is not valid JSON: {e}") from None


def listdir_nohidden(path):
    """Sorted names in `path` without dot-files (CoOp leaves image order to the filesystem; we sort)."""
    return sorted(f for f in os.listdir(path) if not f.startswith("."))


def to_items(entries, prefix, path, key):
    """[[relative path, label, classname], ...] of split/cache file `path` -> Items under `prefix`."""
    if not isinstance(entries, list):
        raise DataError(f"{path}: '{key}' should be a list of [image path, label, class name]")
    items = []
    for e in entries:
        if not (isinstance(e, list) and len(e) == 3 and isinstance(e[0], str) and isinstance(e[1], int)
                and isinstance(e[2], str)):
            raise DataError(f"{path}: '{key}' entry {e!r} is not [image path, label, class name]")
        items.append(Item(os.path.join(prefix, e[0]), e[1], e[2]))
    return items


def from_items(items, prefix):
    return [[os.path.relpath(it.impath, prefix).replace(os.sep, "/"), it.label, it.classname] for it in items]


# ---------------------------------------------------------------------------------------------- readers

def read_split(path, image_dir):
    """CoOp's split_zhou_*.json: {"train","val","test"} lists of [path relative to image_dir, label, name]."""
    raw = read_json(path, "split file")
    if not isinstance(raw, dict) or not all(k in raw for k in ("train", "val", "test")):
        raise DataError(f"split file {path} should be a JSON object with 'train', 'val' and 'test' lists")
    return tuple(to_items(raw[k], str(image_dir), path, k) for k in ("train", "val", "test"))


def save_split(train, val, test, path, image_dir):
    write_json(path, {k: from_items(v, image_dir) for k, v in (("train", train), ("val", val), ("test", test))})


def generate_split(image_dir, seed, cnames=(), ignored=(), p_train=0.5, p_val=0.2):
    """CoOp's split of one-folder-per-class data: per class, shuffle, 50% train, 20% val, the rest test."""
    rng = random.Random(seed)
    cnames = dict(cnames)
    categories = [c for c in listdir_nohidden(image_dir) if c not in ignored and (image_dir / c).is_dir()]
    train, val, test = [], [], []
    for label, category in enumerate(categories):
        images = [str(image_dir / category / f) for f in listdir_nohidden(image_dir / category)]
        rng.shuffle(images)
        n_train, n_val = round(len(images) * p_train), round(len(images) * p_val)
        if not (n_train > 0 and n_val > 0 and len(images) - n_train - n_val > 0):
            raise DataError(f"class folder {image_dir / category} has {len(images)} images; "
                            "a train/val/test split needs at least 4")
        name = cnames.get(category, category)
        train += [Item(p, label, name) for p in images[:n_train]]
        val += [Item(p, label, name) for p in images[n_train:n_train + n_val]]
        test += [Item(p, label, name) for p in images[n_train + n_val:]]
    return train, val, test


def read_aircraft(folder, image_dir):
    """FGVC-Aircraft's own files: variants.txt (class per line), images_variant_<split>.txt ("id variant")."""
    def lines(name):
        path = folder / name
        if not path.is_file():
            raise DataError(f"{path} does not exist; expected {DATASETS['fgvc_aircraft'].source}")
        return [ln.strip() for ln in path.read_text().splitlines() if ln.strip()]

    classnames = lines("variants.txt")
    label_of = {c: i for i, c in enumerate(classnames)}

    def read(split):
        items = []
        for ln in lines(f"images_variant_{split}.txt"):
            image_id, _, variant = ln.partition(" ")
            if variant not in label_of:
                raise DataError(f"{folder / f'images_variant_{split}.txt'}: variant {variant!r} of image "
                                f"{image_id} is not in {folder / 'variants.txt'}")
            items.append(Item(str(image_dir / f"{image_id}.jpg"), label_of[variant], variant))
        return items

    return read("train"), read("val"), read("test"), classnames


def read_imagenet_classnames(path):
    """classnames.txt: "<wnid> <class name>" per line, in ImageNet's label order."""
    if not path.is_file():
        raise DataError(f"{path} does not exist; it is CoOp's ImageNet classnames.txt (see {COOP_GUIDE})")
    names = {}
    for ln in path.read_text().splitlines():
        if ln.strip():
            wnid, _, name = ln.strip().partition(" ")
            names[wnid] = name
    return names


def read_class_folders(split_dir, names, ignored=("README.txt",)):
    """One folder per wnid; labels index the sorted folders, class names come from `names` (wnid -> name)."""
    folders = [f for f in listdir_nohidden(split_dir) if f not in ignored and (split_dir / f).is_dir()]
    items = []
    for label, wnid in enumerate(folders):
        if wnid not in names:
            raise DataError(f"class folder {split_dir / wnid} is not listed in classnames.txt")
        images = listdir_nohidden(split_dir / wnid)
        if not images:
            raise DataError(f"class folder {split_dir / wnid} is empty")
        items += [Item(str(split_dir / wnid / f), label, names[wnid]) for f in images]
    return items, [names[w] for w in folders]


def read_imagenet_v2(image_dir, names):
    """ImageNet-V2: folders named by ImageNet label 0..999, so labels index all of classnames.txt."""
    classnames = list(names.values())
    items = []
    for folder in sorted((f for f in listdir_nohidden(image_dir) if f.isdigit()), key=int):
        label = int(folder)
        if label >= len(classnames):
            raise DataError(f"folder {image_dir / folder} has no class in classnames.txt ({len(classnames)} lines)")
        images = listdir_nohidden(image_dir / folder)
        if not images:
            raise DataError(f"class folder {image_dir / folder} is empty")
        items += [Item(str(image_dir / folder / f), label, classnames[label]) for f in images]
    return items, classnames


def classnames_of(*splits):
    """Label -> class name over all splits, as a list; labels must be 0..n-1 with one name each."""
    names = {}
    for items in splits:
        for it in items:
            if names.setdefault(it.label, it.classname) != it.classname:
                raise DataError(f"label {it.label} is named both {names[it.label]!r} and {it.classname!r}")
    if sorted(names) != list(range(len(names))):
        raise DataError(f"labels should be 0..{len(names) - 1}, got {sorted(names)[:5]}...")
    return [names[y] for y in range(len(names))]


def expected(spec):
    files = [f"{spec.folder}/{spec.image_dir}/" if spec.image_dir else f"{spec.folder}/"]
    if spec.split_file:
        files.append(f"{spec.folder}/{spec.split_file}")
    return f"expected {' and '.join(files)} ({spec.source}; see {COOP_GUIDE})"


def read_dataset(spec, root):
    """(train, val, test, classnames) of dataset `name` in CoOp's layout under `root`."""
    folder = root / spec.folder
    image_dir = folder / spec.image_dir
    if not image_dir.is_dir():
        raise DataError(f"{image_dir} does not exist: {expected(spec)}")
    if spec.kind == "split":
        split_path = folder / spec.split_file
        if not split_path.is_file():
            if not spec.generate:
                raise DataError(f"split file {split_path} does not exist: {expected(spec)}")
            warnings.warn(f"{split_path} is missing: generating a 50/20/30 split per class (seed {SPLIT_SEED}); "
                          f"numbers are comparable with published ones only on CoOp's official split")
            save_split(*generate_split(image_dir, SPLIT_SEED, spec.cnames, spec.ignored), split_path, image_dir)
        train, val, test = read_split(split_path, image_dir)
        return train, val, test, classnames_of(train, val, test)
    if spec.kind == "aircraft":
        return read_aircraft(folder, image_dir)
    if spec.kind == "imagenet":
        names = read_imagenet_classnames(folder / "classnames.txt")
        for split in ("train", "val"):
            if not (image_dir / split).is_dir():
                raise DataError(f"{image_dir / split} does not exist: {expected(spec)}")
        train, classnames = read_class_folders(image_dir / "train", names)
        test, test_names = read_class_folders(image_dir / "val", names)  # ImageNet's val set is the test set
        if test_names != classnames:  # labels index the sorted folders, so both must hold the same classes
            raise DataError(f"{image_dir / 'val'} and {image_dir / 'train'} should hold the same class folders")
        return train, [], test, classnames
    # the ImageNet variants read classnames.txt in their own folder as CoOp does, else ImageNet's
    names_path = folder / "classnames.txt"
    if not names_path.is_file() and (root / "imagenet" / "classnames.txt").is_file():
        names_path = root / "imagenet" / "classnames.txt"
    names = read_imagenet_classnames(names_path)
    read = read_imagenet_v2 if spec.kind == "imagenet_v2" else read_class_folders
    test, classnames = read(image_dir, names)
    return [], [], test, classnames


# ---------------------------------------------------------------------------------------------- EuroSAT setup

def extract_zip(zip_path, dest, top):
    """Extract folder `top` of `zip_path` into `dest/top`: members checked first, unpacked aside, renamed in."""
    try:
        archive = zipfile.ZipFile(zip_path)
    except zipfile.BadZipFile as e:
        raise DataError(f"{zip_path} is not a zip file ({e}); delete it and retry") from None
    with archive:
        for info in archive.infolist():
            parts = PurePosixPath(info.filename.replace("\\", "/")).parts
            is_link = (info.external_attr >> 16) & 0o170000 == 0o120000
            if info.filename.startswith(("/", "\\")) or ".." in parts or ":" in info.filename or is_link:
                raise DataError(f"{zip_path}: refusing unsafe member {info.filename!r}")
        tmp = Path(tempfile.mkdtemp(dir=dest, prefix=f".{top}."))
        try:
            archive.extractall(tmp)
            if not (tmp / top).is_dir():
                raise DataError(f"{zip_path} has no {top}/ folder")
            os.replace(tmp / top, dest / top)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def copy_verified(src, dst, sha256):
    data = Path(src).read_bytes()
    if hashlib.sha256(data).hexdigest() != sha256:
        raise DataError(f"{src} does not have sha256 {sha256}; restore it from the repository")
    clip_min.write_atomic(dst, lambda tmp: tmp.write_bytes(data))


def setup_eurosat(folder, download=True):
    """Make `folder` hold EuroSAT in CoOp's layout: 2750/ from the public zip, CoOp's split from splits/."""
    folder = Path(folder)
    if not (folder / "2750").is_dir():
        if not download:
            raise DataError(f"{folder / '2750'} does not exist and download=False; "
                            f"{EUROSAT_URL} (md5 {EUROSAT_MD5}) extracts to it")
        folder.mkdir(parents=True, exist_ok=True)
        zip_path = clip_min.download(EUROSAT_URL, folder / "EuroSAT.zip", md5=EUROSAT_MD5)
        extract_zip(zip_path, folder, "2750")
        os.remove(zip_path)
    if not (folder / DATASETS["eurosat"].split_file).is_file():
        copy_verified(SPLITS_DIR / DATASETS["eurosat"].split_file, folder / DATASETS["eurosat"].split_file,
                      EUROSAT_SPLIT_SHA256)


# ---------------------------------------------------------------------------------------------- protocol

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
    path = Path(folder) / "split_fewshot" / f"shot_{shots}-seed_{seed}.json"
    if path.is_file():
        raw = read_json(path, "few-shot cache")
        if not isinstance(raw, dict) or "train" not in raw:
            raise DataError(f"few-shot cache {path} should be a JSON object with a 'train' list; delete it")
        cached = tuple(to_items(raw.get(key, []), str(folder), path, key) for key in ("train", "val"))
        for items, pool, key in ((cached[0], train, "train"), (cached[1], val, "val")):
            stray = set(items) - set(pool)
            if stray:
                raise DataError(f"few-shot cache {path} lists {key} items not in the split "
                                f"(e.g. {next(iter(stray)).impath}); it is stale: delete it")
        return cached
    rng = random.Random(seed)  # the same stream as Dassl's random.seed(seed): train drawn first, then val
    train = generate_fewshot_dataset(train, shots, rng, "train")
    val = generate_fewshot_dataset(val, min(shots, 4), rng, "val") if sample_val else []
    try:
        write_json(path, {"train": from_items(train, folder), "val": from_items(val, folder)})
    except OSError as e:  # a read-only data folder still works, it just resamples next time
        warnings.warn(f"could not cache the few-shot subset at {path}: {e}")
    return train, val


def subsample_classes(train, val, test, classnames, subsample="all"):
    """Base-to-new: sorted train labels, first ceil(n/2) are base, the rest new; kept ones relabeled from 0."""
    if subsample == "all":
        return train, val, test, classnames
    labels = sorted({it.label for it in (train or test)})
    m = math.ceil(len(labels) / 2)
    selected = labels[:m] if subsample == "base" else labels[m:]
    relabel = {y: i for i, y in enumerate(selected)}

    def keep(items):
        return [it._replace(label=relabel[it.label]) for it in items if it.label in relabel]

    return keep(train), keep(val), keep(test), [classnames[y] for y in selected]


def check_images(items, what, decode):
    """Raise DataError listing the first bad paths if any image is missing (or, with `decode`, unreadable)."""
    def problem(path):
        if not decode:
            return None if os.path.isfile(path) else "does not exist"
        try:
            load_image(path)
        except DataError as e:
            return str(e)
        return None

    paths = list(dict.fromkeys(it.impath for it in items))
    with ThreadPoolExecutor(8) as pool:  # PIL releases the GIL while decoding
        problems = list(pool.map(problem, paths))
    bad = [(p, msg) for p, msg in zip(paths, problems) if msg]
    if bad:
        listing = "\n".join(f"  {p}: {msg}" for p, msg in bad[:5])
        raise DataError(f"{len(bad)} of {len(paths)} {what} images are missing or unreadable, first:\n{listing}")


def build_dataset(name, root, shots=16, seed=1, subsample="all", download=True):
    """Dataset `name` from CoOp's layout under `root`: `shots` per class (0/None: all), base/new/all classes."""
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; valid names: {', '.join(DATASETS)}")
    if subsample not in ("all", "base", "new"):
        raise DataError(f"subsample should be 'all', 'base' or 'new', got {subsample!r}")
    shots = shots or 0
    if not isinstance(shots, int) or shots < 0:
        raise DataError(f"shots should be a non-negative integer, got {shots!r}")
    spec, root = DATASETS[name], Path(root).expanduser()
    if name == "eurosat":
        setup_eurosat(root / spec.folder, download)
    elif not (root / spec.folder).is_dir():
        raise DataError(f"{root / spec.folder} does not exist: {expected(spec)}")
    train, val, test, classnames = read_dataset(spec, root)
    if shots and spec.kind not in TEST_ONLY:
        train, val = fewshot_subset(root / spec.folder, train, val, shots, seed, sample_val=spec.kind != "imagenet")
    train, val, test, classnames = subsample_classes(train, val, test, classnames, subsample)
    # decode what we train on (a few-shot subset is small); the full train set and test only have to exist
    check_images(train + val, f"{name} train/val", decode=bool(shots))
    check_images(test, f"{name} test", decode=False)
    return Dataset(name, [c.replace("_", " ") for c in classnames], spec.template, train, val, test)


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


def test_transform(pil, n_px=224):
    """CLIP's preprocessing: resize, center crop, normalize."""
    return clip_min.preprocess(pil, n_px)


# ---------------------------------------------------------------------------------------------- batches

def derive_seed(*ints):
    """A 63-bit seed from a tuple of ints, stable across runs and platforms."""
    digest = hashlib.blake2b(repr(tuple(ints)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def epoch_order(n, seed, epoch):
    return torch.randperm(n, generator=torch.Generator().manual_seed(derive_seed(seed, epoch))).tolist()


class EpochView(torch.utils.data.Dataset):
    """Position k of one epoch: its item, transformed with a generator seeded from (seed, epoch, k).

    Each position owns its randomness, so which worker (or which resumed run) computes it changes nothing.
    """

    def __init__(self, items, order, train, seed, epoch, n_px):
        self.items, self.order, self.train = items, order, train
        self.seed, self.epoch, self.n_px = seed, epoch, n_px

    def __len__(self):
        return len(self.order)

    def __getitem__(self, k):
        item = self.items[self.order[k]]
        img = load_image(item.impath)
        if self.train:
            g = torch.Generator().manual_seed(derive_seed(self.seed, self.epoch, k))
            return train_transform(img, g, self.n_px), item.label
        return test_transform(img, self.n_px), item.label


def num_batches(n, batch_size, drop_last=False):
    return n // batch_size if drop_last else math.ceil(n / batch_size)


def batches(items, batch_size, train, seed=0, epoch=0, start=0, drop_last=False, num_workers=0, n_px=224):
    """Yield (images (B, 3, n_px, n_px) float, labels (B,) long) from batch `start` on.

    train=True: shuffled by (seed, epoch), random crop + flip, images in [0, 1] (normalize after Cutout);
    train=False: in order, CLIP-normalized. The same arguments give the same batches with any num_workers.
    """
    order = epoch_order(len(items), seed, epoch) if train else list(range(len(items)))
    positions = [list(range(b * batch_size, min((b + 1) * batch_size, len(order))))
                 for b in range(num_batches(len(order), batch_size, drop_last))]
    loader = torch.utils.data.DataLoader(EpochView(items, order, train, seed, epoch, n_px),
                                         batch_sampler=positions[start:], num_workers=num_workers)
    yield from loader
