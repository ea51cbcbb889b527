"""A folder of one's own images in torchvision's ImageFolder layout (`<class>/<image>`): its class folders, its
images, a fingerprint of them and what changed since a split was made from them; its classnames.txt; the split
generated for it, saved with that fingerprint.

data.py reads such a folder in the protocol's terms (`read_folder`: the split, CoOp's recipe, the class names);
this module lists, compares, warns and saves. Nothing here reads an image's pixels: the image checks are
toolbox/images.py.
"""

import hashlib
import os
import warnings
from pathlib import Path

import clip_min
import data  # DataError and the protocol's names (data.py imports this module too: no names at import)
from toolbox import files, splitfiles

# torchvision's IMG_EXTENSIONS (torchvision/datasets/folder.py): what ImageFolder takes as an image, in any case
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def is_image_name(name):
    return name.lower().endswith(IMAGE_EXTENSIONS)


def class_folders(folder, skip=()):
    """Sorted class folders of `folder` (ImageFolder's label order), less dot-folders and the names in `skip`;
    symlinked folders are not followed (a link loop cannot recurse), with a warning naming them."""
    found, links = [], []
    with os.scandir(folder) as entries:
        for e in entries:
            if e.name.startswith(".") or e.name in skip or not e.is_dir():
                continue
            (links if e.is_symlink() else found).append(e.name)
    if links:
        warnings.warn(f"{folder}: not following symlinked folder(s) {', '.join(sorted(links)[:5])}")
    return sorted(found)


def list_images(folder, classes):
    """({"<class>/<path>": size in bytes} sorted by path, number of other files skipped) for the class folders
    `classes` of `folder`. An image is a file with one of ImageFolder's extensions, at any depth under its class
    folder (ImageFolder walks it); dot-files and dot-folders are skipped, symlinked folders not followed. A file
    that cannot be stat'ed (a dangling link) has size -1: the image checks name it."""
    found, skipped = {}, 0
    for category in classes:
        for dirpath, dirnames, filenames in os.walk(os.path.join(folder, category)):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            for name in filenames:
                if name.startswith("."):
                    continue
                if not is_image_name(name):
                    skipped += 1
                    continue
                path = os.path.join(dirpath, name)
                try:
                    size = os.stat(path).st_size
                except OSError:
                    size = -1
                found[os.path.relpath(path, folder).replace(os.sep, "/")] = size
    return dict(sorted(found.items())), skipped


def loose_images(folder):
    """Sorted names of the images directly in `folder`, which belong to no class."""
    with os.scandir(folder) as entries:
        return sorted(e.name for e in entries if not e.name.startswith(".") and is_image_name(e.name) and e.is_file())


def fingerprint(listing):
    """sha256 (hex) over the lines "<path>\\t<size in bytes>\\n" of a list_images listing, in path order: it changes
    when an image is added, removed, renamed or replaced by one of another size."""
    h = hashlib.sha256()
    for path, size in sorted(listing.items()):
        h.update(f"{path}\t{size}\n".encode("utf-8", "surrogateescape"))
    return h.hexdigest()


def describe_change(old, listing):
    """What changed from the image paths `old` (those a split lists) to `listing` (list_images now), as a phrase:
    "2 images added (e.g. rose/new.jpg), 1 removed (e.g. tulip/x.jpg)"."""
    old = set(old)
    added, removed = sorted(set(listing) - old), sorted(old - set(listing))
    parts = [f"{len(added)} image{'s' * (len(added) != 1)} added (e.g. {added[0]})"] if added else []
    if removed:
        parts.append(f"{len(removed)} {'image' + 's' * (len(removed) != 1) + ' ' if not added else ''}removed "
                     f"(e.g. {removed[0]})")
    return ", ".join(parts) or "no image added or removed, but some were replaced or edited (their sizes differ)"


# ---------------------------------------------------------------------------------------------- the folder as data

def check_folder(path):
    """A folder of your own images as a Path; DataError if it is missing or is a file."""
    folder = Path(path).expanduser()
    if not folder.exists():
        raise data.DataError(f"{folder} does not exist: --data takes a benchmark name ({', '.join(data.DATASETS)}) "
                             "or a folder of class folders (<class>/<image>)")
    if not folder.is_dir():
        raise data.DataError(f"{folder} is a file: --data takes a folder of class folders (<class>/<image>)")
    if not os.access(folder, os.R_OK | os.X_OK):
        raise data.DataError(f"{folder} is not readable")
    return folder


def warn_if_ambiguous(name, benchmark_folder):
    """`--data eurosat` in a directory holding a folder eurosat/ (not the benchmark's own): say which is meant."""
    here = Path(name)
    if here.is_dir() and here.resolve() != Path(benchmark_folder).expanduser().resolve():
        warnings.warn(f"--data {name} is the benchmark {name}, not the folder {here.resolve()}: to train on that "
                      f"folder, give it as a path: --data ./{name}")


def class_groups(folder):
    """([(class folder, its image paths)] in label order, the list_images listing) of a folder that has no split
    yet; images outside class folders and files that are not images are left out, with a warning."""
    classes = class_folders(folder, skip=(data.FEWSHOT_DIR,))
    loose = loose_images(folder)
    if loose:
        warnings.warn(f"{len(loose)} image(s) directly in {folder} belong to no class folder and are left out "
                      f"(e.g. {loose[0]}): put each class's images in a folder of its own, <class>/<image>")
    if not classes:
        raise data.DataError(f"{folder} has no class folders: put each class's images in a folder of its own, "
                             "<class>/<image>")
    listing, skipped = list_images(folder, classes)
    if skipped:
        warnings.warn(f"{skipped} file(s) in the class folders of {folder} are left out: an image ends in "
                      f"{', '.join(IMAGE_EXTENSIONS)} (ImageFolder's)")
    groups = {c: [] for c in classes}
    for rel in listing:
        groups[rel.split("/", 1)[0]].append(str(Path(folder) / rel))
    return list(groups.items()), listing


def save_generated_split(splits, path, folder, listing):
    """Save the split generated for `folder` as CoOp's split file `path`, with a "generated" record: recipe,
    seed, image count and the listing's fingerprint (check_unchanged compares it). A read-only folder still
    works: the same listing gives the same split every run."""
    record = dict(recipe="CoOp's: per class in label order, random.Random(seed).shuffle, 50% train, 20% val, "
                         "the rest test", seed=data.SPLIT_SEED, images=len(listing), sha256=fingerprint(listing))
    try:
        splitfiles.save_split(splits, path, folder, generated=record)
    except OSError as e:
        warnings.warn(f"could not save the generated split at {path} ({e}): it is generated anew each run, and "
                      "changes if the folder does")
    else:
        warnings.warn(f"generated the split {path} of {len({it.label for it in splits[0]})} classes (CoOp's "
                      f"50/20/30 per class, seed {data.SPLIT_SEED}): {len(splits[0])} train, {len(splits[1])} val, "
                      f"{len(splits[2])} test images; every later run uses it")


def check_unchanged(folder, path, raw):
    """DataError, in one line saying what changed, if the folder's images are not those its generated split
    file `path` (JSON `raw`) was made from."""
    record = raw["generated"]
    if not isinstance(record, dict) or not isinstance(record.get("sha256"), str):
        raise data.DataError(f"split file {path}: 'generated' should be a record with a 'sha256' fingerprint; "
                             "delete the file to generate the split again")
    listing, _ = list_images(folder, class_folders(folder, skip=(data.FEWSHOT_DIR,)))
    if fingerprint(listing) != record["sha256"]:
        listed = [e[0] for k in data.SPLITS if isinstance(raw.get(k), list) for e in raw[k]
                  if isinstance(e, list) and e and isinstance(e[0], str)]
        raise data.DataError(f"{folder} changed since its split {path} was generated: "
                             f"{describe_change(listed, listing)}; to train on the folder as it is now, delete "
                             f"{path} and {Path(folder) / data.FEWSHOT_DIR} (a new split is generated: results are "
                             "not comparable with runs on the old one)")


def classnames(folder, names):
    """Prompt-ready class names for the classes `names` of a folder (by label; folder names for a generated
    split): each one's line in the folder's classnames.txt if it has one, else the name with "_" and "-" read as
    spaces ("sea_lake" -> "sea lake")."""
    path = Path(folder) / data.CLASSNAMES_FILE
    if not path.exists():
        derived = [" ".join(n.replace("_", " ").replace("-", " ").split()) or n for n in names]
        pair = same_names(derived)
        if pair:
            (a, b), name = (names[k] for k in pair), derived[pair[0]]
            raise data.DataError(f"{folder}: class folders {a!r} and {b!r} give one class name to CLIP ({name!r}): "
                                 f"their prompts would be identical, two classes no model can tell apart; name them "
                                 f"apart in {path.name} ('<folder> <class name>' lines)")
        return derived
    table = read_classnames(path)
    missing = [n for n in names if n not in table]
    if missing:
        raise data.DataError(f"{path} has no line for class(es) {', '.join(map(repr, missing[:5]))}"
                             f"{', ...' if len(missing) > 5 else ''}: it needs one '<folder> <class name>' line "
                             "per class")
    unknown = sorted(set(table) - set(names))
    if unknown:
        raise data.DataError(f"{path} names {unknown[0]!r}, which is not a class folder of {folder}"
                             + (f" (nor are {len(unknown) - 1} more)" if len(unknown) > 1 else ""))
    pair = same_names([table[n] for n in names])
    if pair:
        a, b = (names[k] for k in pair)
        raise data.DataError(f"{path}: the class names {table[a]!r} (folder {a!r}) and {table[b]!r} (folder {b!r}) "
                             f"are one name to CLIP's tokenizer, which ignores case and spacing: their prompts would "
                             f"be identical, two classes no model can tell apart; give each class its own name")
    return [table[n] for n in names]


def same_names(names):
    """(i, j), i < j, of the first two class names that CLIP reads as one (the same BPE tokens, clip_min.encode:
    equal after its cleaning, clip_min.clean, of case, runs of whitespace and HTML entities, and with the spaces it
    drops between letters, digits and punctuation, as in "type 12" and "type 1 2", "sea-lake" and "sea - lake"), or
    None: their prompts would be identical."""
    seen = {}
    for j, name in enumerate(names):
        i = seen.setdefault(tuple(clip_min.encode(name)), j)
        if i != j:
            return i, j
    return None


CLASSNAMES_LIMIT = 16 * 2**20  # ImageNet-21k's names are ~1 MB
NAME_LIMIT = 1000  # characters of one class name: 77 tokens of CLIP's BPE never span more


def read_classnames(path):
    """classnames.txt of a folder: {folder name: class name}, one line per class as CoOp's ImageNet file is
    written: the folder's name, whitespace, then the class name ("n01440764 tench", "sea_lake Sea or Lake"). A
    line holding a tab splits at its first tab instead, for folder names with spaces ("sea lake<TAB>Sea or
    Lake"). Blank lines are skipped; UTF-8, with or without a byte-order mark."""
    try:
        text = files.read_bounded(path, CLASSNAMES_LIMIT, "class names file").decode("utf-8-sig")
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise data.DataError(f"{path} cannot be read: {e}") from None
    table = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        key, _, name = line.strip().partition("\t") if "\t" in line.strip() else line.strip().partition(" ")
        key, name = key.strip(), " ".join(name.split())
        if not name:
            raise data.DataError(f"{path} line {number} ({line.strip()[:60]!r}) should be '<folder> <class name>'")
        if key in table:
            raise data.DataError(f"{path} line {number} names folder {key!r} a second time")
        if len(name) > NAME_LIMIT:  # a prompt holds 77 tokens: a longer name could never fit, and BPE on it is slow
            raise data.DataError(f"{path} line {number}: a class name of {len(name):,} characters; CLIP's prompt holds "
                                 f"77 tokens (a name of at most {NAME_LIMIT} characters, far fewer in practice)")
        table[key] = name
    return table
