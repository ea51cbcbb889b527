"""CoOp's list files, read and written so that a fault is one line: split files (split_zhou_*.json, a folder's
split.json), the few-shot caches in split_fewshot/, and the text lists some layouts are read from (`read_lines`).

Both hold lists of [image path relative to the dataset, label, class name]. data.py reads a split file's lists
through `to_items` (its `read_split` is the format), and the few-shot cache through `read_fewshot_cache`, which
checks that the cache is still a few-shot subset of the split. Errors are data.py's DataError.
"""

import json
import os
import re
import warnings
from collections import Counter
from pathlib import Path, PurePosixPath

import data  # Item, DataError and the protocol's names (data.py imports this module too: no names at import)
from toolbox import files


JSON_LIMIT = 256 * 2**20  # CoOp's largest split file (ImageNet-scale) is a few tens of MB


def read_json(path, what):
    """The JSON of `path`; DataError naming it (as `what`: "split file", "few-shot cache") if it cannot be."""
    try:
        blob = files.read_bounded(path, JSON_LIMIT, what)
    except FileNotFoundError:
        raise data.DataError(f"{what} {path} does not exist") from None
    except ValueError as e:  # not a regular file, or too large to be one
        raise data.DataError(str(e)) from None
    except OSError as e:
        raise data.DataError(f"{what} {path} cannot be read: {e}") from None
    try:
        return json.loads(blob)
    except (ValueError, RecursionError) as e:  # JSONDecodeError, bad UTF-8, a 5,000-digit number, deep nesting
        raise data.DataError(f"{what} {path} is not valid JSON: {str(e).splitlines()[0][:200]}") from None
    except OSError as e:
        raise data.DataError(f"{what} {path} cannot be read: {e}") from None


def read_lines(path):
    """The non-empty lines of a text file, stripped; DataError naming it if it cannot be read."""
    try:
        return [ln.strip() for ln in Path(path).read_text().splitlines() if ln.strip()]
    except FileNotFoundError:
        raise data.DataError(f"{path} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise data.DataError(f"{path} cannot be read: {e}") from None


def to_items(entries, prefix, path, key):
    """[[relative path, label, classname], ...] of split/cache file `path` -> Items under `prefix`."""
    if not isinstance(entries, list):
        raise data.DataError(f"{path}: '{key}' should be a list of [image path, label, class name]")
    items, prefix, item = [], str(prefix), data.Item
    for e in entries:
        if not (isinstance(e, list) and len(e) == 3 and isinstance(e[0], str) and type(e[1]) is int
                and isinstance(e[2], str)):
            raise data.DataError(f"{path}: '{key}' entry {e!r} is not [image path, label, class name]")
        items.append(item(os.path.join(prefix, _relative(e[0], path, key)), e[1], e[2]))
    return items


def _relative(name, path, key):
    """A split entry's image path as the cache writes it ("./a\\b.jpg" -> "a/b.jpg"); absolute paths and ".."
    are refused: a split file names images inside its dataset, nothing else."""
    if "\0" in name:
        raise data.DataError(f"{path}: '{key}' image path {name[:80]!r} holds a NUL character")
    if "\\" not in name and ":" not in name and not {"", ".", ".."} & set(name.split("/")):
        return name  # already in the cache's form (the common case, and 10x faster than PurePosixPath)
    parts = PurePosixPath(name.replace("\\", "/")).parts
    if not parts or name.startswith(("/", "\\")) or re.match(r"[A-Za-z]:", name) or ".." in parts:
        raise data.DataError(f"{path}: '{key}' image path {name!r} should be relative to the dataset, without '..'")
    return PurePosixPath(*parts).as_posix()


def check_split(path, train, val, test):
    """DataError unless the split file `path`'s lists name no image twice, hold training and test images, and its
    labels are 0..n-1 with one name each (data.classnames_of) and every test class has training images."""
    seen = Counter(it.impath for it in train + val + test)
    twice = next((p for p, n in seen.items() if n > 1), None)
    if twice:
        raise data.DataError(f"split file {path} lists image {twice} twice")
    for items, key in ((train, "training"), (test, "test")):
        if not items:
            raise data.DataError(f"split file {path} has no {key} images")
    names = data.classnames_of(train, val, test, source=path)
    lacking = sorted({it.label for it in test} - {it.label for it in train})
    if lacking:
        raise data.DataError(f"split file {path}: test label {lacking[0]} ({names[lacking[0]]!r}) has no training "
                             f"images" + (f" (nor do {len(lacking) - 1} more)" if len(lacking) > 1 else ""))


def check_tested(path, train, test, names):
    """DataError naming the classes of split file `path` (labels named by `names`) that have no test images."""
    lacking = sorted({it.label for it in train} - {it.label for it in test})
    if lacking:
        raise data.DataError(f"split file {path}: {len(lacking)} class(es) have no test images: "
                             f"{', '.join(repr(names[y]) for y in lacking[:5])}{', ...' if len(lacking) > 5 else ''}")


def from_items(items, prefix):
    """Items -> [[path relative to `prefix`, label, classname], ...], as split files and caches list them."""
    return [[os.path.relpath(it.impath, prefix).replace(os.sep, "/"), it.label, it.classname] for it in items]


def save_split(splits, path, image_dir, **extra):
    """(train, val, test) item lists as CoOp's split file `path`, image paths relative to `image_dir`; `extra`
    keys follow (CoOp's reader, and ours, ignore them)."""
    files.write_json(path, {**{k: from_items(v, image_dir) for k, v in zip(data.SPLITS, splits)}, **extra},
                     indent=None)


# ---------------------------------------------------------------------------------------------- few-shot caches

def read_fewshot_cache(path, folder, pools, shots):
    """(train, val) of the few-shot cache `path`, checked against the split it was drawn from: `pools` (its
    train and val items) with `shots` (per class: train's K, val's min(K, 4) or 0). DataError if it is not such
    a subset: the message says to delete it."""
    raw = read_json(path, "few-shot cache")
    if not isinstance(raw, dict) or "train" not in raw:
        raise data.DataError(f"few-shot cache {path} should be a JSON object with a 'train' list; delete it")
    cached = tuple(to_items(raw.get(key, []), folder, path, key) for key in data.SPLITS[:2])
    for key, items, pool, k in zip(data.SPLITS, cached, pools, shots):
        _check_cache(path, key, items, pool, k)
    return cached


def write_fewshot_cache(path, folder, train, val):
    """Save a few-shot subset as `path`; a read-only (or full) data folder still works, with a warning: the
    subset is drawn again, the same, next time."""
    created = files.make_dirs(path.parent)
    try:
        files.write_json(path, dict(zip(data.SPLITS, (from_items(train, folder), from_items(val, folder)))),
                         indent=None)
    except OSError as e:
        files.remove_empty_dirs(created)
        warnings.warn(f"could not cache the few-shot subset at {path}: {e}")


def _check_cache(path, key, items, pool, shots):
    """A few-shot cache must hold, per class of the split, min(shots, class size) distinct images of that class."""
    stray = set(items) - set(pool)
    if stray:
        raise data.DataError(f"few-shot cache {path} lists {key} items not in the split (e.g. "
                             f"{next(iter(stray)).impath}); it is stale: delete it")
    twice = [it for it, n in Counter(items).items() if n > 1]
    if twice:
        raise data.DataError(f"few-shot cache {path} lists {key} image {twice[0].impath} twice; delete it")
    have, size = Counter(it.label for it in items), Counter(it.label for it in pool)
    names = {it.label: it.classname for it in pool}
    for label in data.split_dataset_by_label(pool):
        want = min(shots, size[label])
        if have[label] != want:
            why = "more than" if have[label] > want else "fewer than"
            raise data.DataError(f"few-shot cache {path} has {have[label]} {key} images of class {names[label]!r} "
                                 f"(label {label}), {why} the {want} that {shots} shots take; delete it")
