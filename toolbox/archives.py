"""Safe extraction of the datasets' zip and tar archives: every member is checked before it is written.

Refused, as one `BadArchive` line naming the archive and the member: absolute paths and '..' (a write outside the
folder), links and devices, encrypted zip entries and compressions Python cannot read, and an archive that unpacks
to more than `limit` bytes (a few MB of zeros can inflate to GBs: the caller derives the limit from the archive's
known size, see toolbox.datasets.unpack_limit).
"""

import re
import stat
import tarfile
import zipfile
import zlib
from pathlib import Path, PurePosixPath

from toolbox.files import format_size

_CHUNK = 1 << 20
_ZIP_METHODS = {zipfile.ZIP_STORED: "stored", zipfile.ZIP_DEFLATED: "deflate", zipfile.ZIP_BZIP2: "bzip2",
                zipfile.ZIP_LZMA: "lzma"}  # what Python's zipfile decompresses


class BadArchive(ValueError):
    """An archive that is unreadable or unsafe to unpack; the message (one line) names it and why."""


def extract(path, dest, limit):
    """Unpack a zip or tar (any compression) at `path` into the folder `dest`, writing at most `limit` bytes."""
    path = Path(path)
    if path.name.endswith(".zip"):
        _extract_zip(path, Path(dest), limit)
    else:
        _extract_tar(path, Path(dest), limit)


def unsafe_name(name):
    """Why an archive member name could write outside the folder it is unpacked in, or None."""
    if name.startswith(("/", "\\")) or re.match(r"[A-Za-z]:", name):
        return "an absolute path"
    if ".." in PurePosixPath(name.replace("\\", "/")).parts:
        return "'..' in its path"
    return None


def _too_big(path, limit):
    return BadArchive(f"{path} unpacks to more than {format_size(limit)}, far more than its size allows: refusing "
                      "it as a possible archive bomb; delete it and retry")


def _extract_tar(path, dest, limit):
    safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}  # Python's own checks, where it has them
    written = 0
    try:
        with tarfile.open(path, "r|*") as tar:  # one streaming pass: each member is checked, then written
            for member in tar:
                reason = unsafe_name(member.name)
                if not reason and not (member.isfile() or member.isdir()):
                    reason = "a link" if member.issym() or member.islnk() else "a device or special file"
                if reason:
                    raise BadArchive(f"{path}: refusing unsafe member {member.name!r} ({reason})")
                written += member.size  # a tar header states the exact size tarfile will write
                if written > limit:
                    raise _too_big(path, limit)
                tar.extract(member, dest, set_attrs=False, **safe)  # modes from the umask, as zip gets them
    except (tarfile.TarError, EOFError, zlib.error) as e:
        raise BadArchive(f"{path} is not a readable tar archive ({e}); delete it and retry") from None


def _extract_zip(path, dest, limit):
    try:
        with zipfile.ZipFile(path) as archive:
            members = archive.infolist()
            for info in members:  # a zip lists its members up front: all are checked before any is written
                reason = _zip_member_problem(info)
                if reason:
                    raise BadArchive(f"{path}: refusing {reason}")
            written = 0
            for info in members:
                target = dest.joinpath(*PurePosixPath(info.filename).parts)  # as extractall names it
                if info.is_dir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                # copied by hand, counting the bytes that come out: a header's sizes may lie
                with archive.open(info) as src, open(target, "wb") as out:
                    while block := src.read(_CHUNK):
                        written += len(block)
                        if written > limit:
                            raise _too_big(path, limit)
                        out.write(block)
    except (zipfile.BadZipFile, EOFError, zlib.error, NotImplementedError, RuntimeError) as e:
        # RuntimeError/NotImplementedError: zipfile's words for a password or a method it lacks (checked above)
        raise BadArchive(f"{path} is not a readable zip file ({e}); delete it and retry") from None


def _zip_member_problem(info):
    """Why a zip member is not unpacked, or None: an unsafe name, a link or device, encryption, a method Python
    cannot decompress."""
    mode = info.external_attr >> 16
    reason = unsafe_name(info.filename)
    if not reason and not info.is_dir() and not PurePosixPath(info.filename).parts:
        reason = "a file without a name"
    elif not reason and stat.S_ISLNK(mode):
        reason = "a link"
    elif not reason and stat.S_IFMT(mode) and not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        reason = "a device or special file"
    if reason:
        return f"unsafe member {info.filename!r} ({reason})"
    if info.flag_bits & 0x1:
        return f"member {info.filename!r}: it is encrypted (unpack it by hand with its password)"
    if info.compress_type not in _ZIP_METHODS:
        return (f"member {info.filename!r}: it uses compression method {info.compress_type}, which Python's "
                f"zipfile cannot read ({', '.join(_ZIP_METHODS.values())})")
    return None
