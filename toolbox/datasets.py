"""Dataset folders made from data.py's tables: what each benchmark needs on disk (`requirements`), how the
missing parts are obtained (`prepare`: download, verify, unpack, copy CoOp's shipped files, generate a split),
what is there (`status`), the data root's check (`check_root`, data.check_root), and the command line
`python data.py --check NAME|all` / `--download NAME|all`.

This module reads data.py's tables (DATASETS, ARCHIVES, SHIPPED) and raises its DataError; data.py calls
`prepare` before reading a dataset. Each step either completes or leaves nothing a later step would take for
done: archives are verified before they are unpacked, unpacked into a scratch folder beside the dataset, and
renamed into place part by part, the image folder last.
"""

import argparse
import gzip
import hashlib
import os
import shlex
import shutil
import sys
import tempfile
import urllib.parse
import warnings
from pathlib import Path, PurePosixPath
from typing import NamedTuple

import data  # the tables this module prepares folders from (data.py imports this module too: no names at import)
from toolbox import archives, downloads, files, splitfiles

UNPACK_RATIO = 8  # an archive may unpack to 8x its size: JPEG archives unpack to ~1x, text lists to a few x
UNPACK_FLOOR = 2**20  # ...and a tiny one to 1 MiB (a tar's headers and padding outweigh a few small files)


class Need(NamedTuple):
    path: Path  # a file or folder a reader needs
    how: str  # "download" (from `archive`), "shipped" (copied from splits/), "generated" or "manual"
    archive: "data.Archive" = None
    folder: bool = False  # a folder (of images), not a file


def check_root(path):
    """The data root as a Path (it need not exist yet); DataError if it is empty, a file or a symlink loop."""
    if path is None or str(path) == "":
        raise data.DataError("the data root is an empty string: set ORTHCR_DATA or --root to a folder")
    root = Path(path).expanduser()
    try:
        root.stat()
    except FileNotFoundError:
        if root.is_symlink():
            raise data.DataError(f"data root {root} is a symlink to {os.readlink(root)}, which does not exist") \
                from None
        return root
    except OSError as e:  # ELOOP for a symlink loop, ENOTDIR when a parent is a file
        raise data.DataError(f"data root {root} cannot be used: {e.strerror}") from None
    if not root.is_dir():
        raise data.DataError(f"data root {root} is a file, not a folder")
    if not os.access(root, os.R_OK | os.X_OK):
        raise data.DataError(f"data root {root} is not readable")
    return root


def requirements(name, root):
    """What dataset `name` needs under `root` to be read, and how each part is obtained if missing."""
    spec, root = data.DATASETS[name], Path(root)
    folder = root / spec.folder
    images = next((a for a in data.ARCHIVES.get(name, ()) if a.needed == "images"), None)
    how = "download" if images else "manual"
    if spec.kind == "imagenet":
        needs = [Need(folder / spec.image_dir / part, how, folder=True) for part in ("train", "val")]
    else:
        needs = [Need(folder / spec.image_dir, how, images, folder=True)]
    if spec.kind == "aircraft":
        needs += [Need(folder / f, how, images) for f in ("variants.txt", "images_variant_train.txt",
                                                         "images_variant_val.txt", "images_variant_test.txt")]
    if spec.kind in ("imagenet",) + data.TEST_ONLY:
        needs.append(Need(data.variant_classnames(spec, root) if spec.kind in data.TEST_ONLY
                          else folder / "classnames.txt", "shipped"))
    if spec.kind == "split":
        split = folder / spec.split_file
        if spec.split_file in data.SHIPPED or split.is_file():
            needs.append(Need(split, "shipped"))
        elif not spec.generate:
            needs.append(Need(split, "manual"))
        else:
            needs.append(Need(split, "generated"))
            if spec.generate == "sun397":
                partitions = next(a for a in data.ARCHIVES[name] if a.needed == "split")
                needs += [Need(folder / f, "download", partitions)
                          for f in ("ClassName.txt", "Training_01.txt", "Testing_01.txt")]
    return needs


def present(need):
    """The need is on disk as the right kind: a folder for a folder, a regular file (or a link to one) for a file."""
    return need.path.is_dir() if need.folder else need.path.is_file()


def _wrong_kind(need):
    if need.path.exists() and not present(need):
        return f"{need.path} is a {'file' if need.folder else 'folder'}, not a {'folder' if need.folder else 'file'}"
    return None


def prepare(name, root, download=True):
    """Make `<root>/<folder>` hold dataset `name` in CoOp's layout: download and unpack what is public and
    missing, copy CoOp's files shipped in splits/, generate a split where CoOp would; DataError naming the exact
    folder, files and source for what must be fetched by hand (or with download=False)."""
    spec, root = data.DATASETS[name], Path(root)
    folder = root / spec.folder
    needs = requirements(name, root)
    wrong = next(filter(None, map(_wrong_kind, needs)), None)
    if wrong:
        raise data.DataError(f"{wrong}: {_expected(spec)}; remove it and rerun")
    missing = [n for n in needs if not n.path.exists()]
    manual = [n for n in missing if n.how == "manual"]
    if manual:
        raise data.DataError(f"{manual[0].path} does not exist: {_expected(spec)}")
    wanted = list(dict.fromkeys(n.archive for n in missing if n.how == "download"))
    if wanted and not download:
        a = wanted[0]
        raise data.DataError(f"{next(n.path for n in missing if n.archive == a)} does not exist and download=False "
                             f"(--no-download); {archive_name(a)} ({files.format_size(a.size)}) from {a.url} "
                             "provides it")
    for a in wanted:
        _fetch(name, folder, a)
    for n in missing:
        if n.how == "shipped":
            copy_shipped(n.path.name, n.path)
        elif n.how == "generated":
            _generate_split(spec, folder, n.path)


def copy_shipped(name, dst):
    """Copy CoOp's file `name` from splits/ to `dst`, byte for byte, after checking its SHA-256."""
    file, sha256 = data.SHIPPED[name]
    src = data.SPLITS_DIR / file
    try:
        blob = gzip.decompress(src.read_bytes()) if file.endswith(".gz") else src.read_bytes()
    except (OSError, EOFError) as e:
        raise data.DataError(f"{src} cannot be read ({e}); restore it from the repository") from None
    if hashlib.sha256(blob).hexdigest() != sha256:
        raise data.DataError(f"{src} does not hold CoOp's {name} (sha256 {sha256}); restore it from the repository")
    try:
        files.write_atomic(dst, lambda tmp: tmp.write_bytes(blob))
    except OSError as e:
        raise data.DataError(f"could not copy CoOp's {name} to {dst}: {e}") from None


def _generate_split(spec, folder, path):
    warnings.warn(f"{path} is missing and CoOp's is not shipped: generating it as CoOp does (seed {data.SPLIT_SEED}); "
                  "numbers are comparable with published ones only on CoOp's official split")
    image_dir = folder / spec.image_dir
    if spec.generate == "sun397":
        splits = data.generate_sun397_split(folder, image_dir, data.SPLIT_SEED)
    else:
        splits = data.generate_split(image_dir, data.SPLIT_SEED)
    try:
        splitfiles.save_split(splits, path, image_dir)
    except OSError as e:
        raise data.DataError(f"could not write the generated split {path}: {e}") from None


def _expected(spec):
    parts = ("train/<wnid>", "val/<wnid>") if spec.kind == "imagenet" else spec.parts or ("",)
    paths = [str(PurePosixPath(spec.folder, spec.image_dir, part)) + "/" for part in parts]
    if spec.kind == "split" and spec.split_file not in data.SHIPPED and not spec.generate:
        paths.append(f"{spec.folder}/{spec.split_file}")
    return f"expected {' and '.join(paths)} ({spec.source}; see {data.COOP_GUIDE})"


# ---------------------------------------------------------------------------------------------- archives

def archive_name(archive):
    """The archive's file name, from its URL: "dtd-r1.0.1.tar.gz"."""
    return PurePosixPath(urllib.parse.urlparse(archive.url).path).name


def unpack_limit(archive):
    """The most bytes `archive` may unpack to, derived from its size in ARCHIVES (a bomb stops there)."""
    return max(UNPACK_RATIO * archive.size, UNPACK_FLOOR)


def _fetch(name, folder, archive):
    """Download `archive` into `folder`, verify it, unpack it beside the target and rename its parts into place;
    a failure is one DataError line saying how to do it offline, and leaves no folder this call created."""
    created = files.make_dirs(folder)
    path = folder / archive_name(archive)
    algorithm, _, digest = archive.checksum.partition(":")
    try:
        _check_space(folder, archive, path)
        downloads.download(archive.url, path, what=f"{name} {path.name}", size=archive.size, **{algorithm: digest})
    except (RuntimeError, OSError) as e:
        files.remove_empty_dirs(created)
        raise data.DataError(f"{e}; offline: {_offline(folder, archive)}") from None
    image_dir = folder / data.DATASETS[name].image_dir if archive.needed == "images" else None
    try:
        _unpack(path, folder, archive, image_dir)
    except (data.DataError, archives.BadArchive) as e:  # refused or unreadable: the archive is of no use
        path.unlink(missing_ok=True)
        files.remove_empty_dirs(created)
        raise data.DataError(f"{e}; offline: {_offline(folder, archive)}") from None
    except OSError as e:  # a full disk, say: the verified archive stays, so that a rerun need not download it
        raise data.DataError(f"could not unpack {path} into {folder}: {e}; the verified archive is kept for a "
                             "rerun") from None
    path.unlink()


def _unpack(path, folder, archive, image_dir):
    """Extract `path` into a temporary folder beside the dataset, then rename each part into place, the image
    folder last: whatever exists under its final name is complete."""
    tmp = Path(tempfile.mkdtemp(dir=folder, prefix=f".{path.name}.unpack-"))
    limit = unpack_limit(archive)
    try:
        archives.extract(path, tmp, limit)
        if archive.nested:
            inner = tmp / archive.nested
            if not inner.is_file():
                raise data.DataError(f"{path} has no {archive.nested}")
            archives.extract(inner, tmp, limit)
            inner.unlink()
        for src, dst in _resolve_moves(tmp, folder, archive.moves, path, image_dir):
            if not dst.exists():  # an annotation file kept from an earlier try stays as it is
                dst.parent.mkdir(parents=True, exist_ok=True)
                os.replace(src, dst)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _resolve_moves(tmp, folder, moves, path, image_dir):
    """[(source, destination)] for the archive's moves, all found and checked before anything moves; the image
    folder last, and a folder (an archive whose `images` entry is a file would otherwise count as a dataset)."""
    pairs = []
    for pattern, dst in moves:
        if pattern.endswith("/*"):
            parent = tmp / pattern[:-2]
            if not parent.is_dir():
                raise data.DataError(f"{path} has no {pattern[:-2]}/ folder")
            pairs += [(src, folder / dst / src.name) for src in sorted(parent.iterdir())]
        else:
            found = sorted(tmp.glob(pattern))
            if len(found) != 1:
                raise data.DataError(f"{path} should hold one {pattern}, found {len(found)}")
            pairs.append((found[0], folder / dst))
    for src, dst in pairs:
        if dst == image_dir and not src.is_dir():
            raise data.DataError(f"{path}: {src.relative_to(tmp).as_posix()} is a file, where the image folder "
                                 f"{image_dir.name}/ should be")
    if image_dir and image_dir not in [dst for _, dst in pairs]:
        raise data.DataError(f"{path} holds no {image_dir.name}/ folder")
    return sorted(pairs, key=lambda pair: pair[1] == image_dir)


def _check_space(folder, archive, path):
    """Refuse before downloading when the disk cannot hold the rest of the archive plus its unpacked copy."""
    part = path.with_name(path.name + ".part")
    have = path.lstat().st_size if path.is_file() else part.lstat().st_size if part.is_file() else 0
    need = max(0, archive.size - have) + archive.size
    free = shutil.disk_usage(folder).free
    if free < need:
        raise data.DataError(f"{folder} has {files.format_size(free)} free; downloading and unpacking {path.name} "
                             f"needs about {files.format_size(need)}")


def _offline(folder, archive):
    """How to do by hand what _fetch does: "put the 2750/ folder of EuroSAT.zip in <root>/eurosat/ (from URL)"."""
    parts = []
    for src, _ in archive.moves:
        name = src.removeprefix("**/")
        parts.append(f"contents of the {name[:-2]}/ folder" if name.endswith("/*") else
                     name if "." in name else f"{name}/ folder")
    inside = archive_name(archive)
    if archive.nested:
        inside = f"{PurePosixPath(archive.nested).name} (inside {inside})"
    return f"put the {', '.join(parts)} of {inside} in {folder}/ (from {archive.url})"


# ---------------------------------------------------------------------------------------------- command line

def status(name, root):
    """(ready, lines) for dataset `name` under `root`: ready means a run can start without fetching anything by
    hand or over the network (CoOp's shipped files and generated splits are made on first use); lines say what is
    present, what comes on first use and what is missing, and how to get it."""
    spec, root = data.DATASETS[name], Path(root)
    groups = {}  # (label, how to get it) -> paths, in order
    for n in requirements(name, root):
        if present(n):
            key = ("present", "")
        elif _wrong_kind(n):
            key = ("missing", f"{_wrong_kind(n)}: remove it; {_expected(spec)}")
        elif n.how == "shipped":
            key = ("on use", f"CoOp's, copied from {data.SPLITS_DIR / data.SHIPPED[n.path.name][0]}")
        elif n.how == "generated":
            key = ("on use", "generated as CoOp does (CoOp's own is not shipped)")
        elif n.how == "download":
            key = ("missing", f"automatic: python data.py --download {name} fetches {archive_name(n.archive)} "
                              f"({files.format_size(n.archive.size)}) from {n.archive.url}")
        else:
            key = ("missing", f"by hand: {_expected(spec)}")
        groups.setdefault(key, []).append(str(n.path))
    lines = [f"{label:8s} {', '.join(paths)}{': ' + how if how else ''}" for (label, how), paths in groups.items()]
    return not any(label == "missing" for label, _ in groups), lines


def main(argv=None):
    """`python data.py --check NAME|all` or `--download NAME|all`: 0 when every named dataset is ready."""
    p = argparse.ArgumentParser(prog="data.py", description="Check or fetch CoOp's benchmarks in CoOp's layout.")
    action = p.add_mutually_exclusive_group(required=True)
    action.add_argument("--check", metavar="NAME|all|FOLDER",
                        help="report what is present and missing, and how to get it; for a folder of your own "
                             "images, read and check it as a run would")
    action.add_argument("--download", metavar="NAME|all",
                        help="fetch the public datasets now (for the others: what to do)")
    p.add_argument("--root", default=None, help="data root (default: $ORTHCR_DATA, else ~/data)")
    args = p.parse_args(argv)
    with warnings.catch_warnings():
        files.one_line_warnings()  # the library warns; the command line says "warning: ..." once
        try:
            return _run(args)
        except OSError as e:  # a folder it may not read or write (permissions), named by the error
            print(f"error: {e}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:  # Ctrl-C: a partial download stays as NAME.part, and the rerun resumes it
            again = shlex.join(["python", "data.py", "--download", args.download]
                               + (["--root", args.root] if args.root else []))
            print("\ninterrupted" + (f"; rerun {again} to resume (what was downloaded is kept)"
                                     if args.download else ""), file=sys.stderr)
            return 130


def _run(args):
    target = args.check or args.download
    if args.check and args.check != "all" and data.is_folder(args.check):
        return _check_folder(args.check)
    names = list(data.DATASETS) if target == "all" else [target]
    try:
        root = check_root(files.default_data_root() if args.root is None else args.root)
        if target not in data.DATASETS and target != "all":
            raise data.DataError(f"unknown dataset {target!r}; valid names: all, {', '.join(data.DATASETS)}")
    except data.DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    all_ready = True
    for name in names:
        if args.download and name in data.ARCHIVES:
            try:
                prepare(name, root, download=True)
            except data.DataError as e:
                print(f"error: {e}", file=sys.stderr)
        ready, lines = status(name, root)
        all_ready &= ready
        print(f"{name}: {'ready' if ready else 'not ready'}" + "".join(f"\n  {line}" for line in lines))
    return 0 if all_ready else 1


def _check_folder(path):
    """`python data.py --check FOLDER`: a folder of your own images read as a run reads it (its split generated
    if it has none), every image checked; 0 when a run can start."""
    try:
        ds = data.build_dataset(path, None, shots=0)
    except data.DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    names = ", ".join(ds.classnames[:5]) + (", ..." if len(ds.classnames) > 5 else "")
    print(f"{ds.name}: ready, {len(ds.classnames)} classes ({names}); {len(ds.train)} train, {len(ds.val)} val, "
          f"{len(ds.test)} test images in {Path(ds.folder) / data.SPLIT_FILE}; prompts like {ds.prompts()[0]!r}")
    return 0
