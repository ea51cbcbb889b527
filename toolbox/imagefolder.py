"""A folder of one's own images in torchvision's ImageFolder layout (`<class>/<image>`): its class folders, its
images, a fingerprint of them, and what changed since a split was made from them.

data.py reads such a folder (class names, split, protocol); this module only lists and compares. Nothing here
reads an image's pixels: the image checks are toolbox/images.py.
"""

import hashlib
import os
import warnings

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
