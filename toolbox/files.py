"""Files written so that a crash never leaves half of one, folders undone when a call fails, and file hashes."""

import errno
import hashlib
import json
import os
import stat
import sys
import warnings
from contextlib import contextmanager
from pathlib import Path


def write_atomic(path, write):
    """write(tmp) to a fresh temporary file beside `path`, fsync it, then rename it onto `path` (used by data.py,
    train.py): readers see the old file or the new one, never half of one. The file gets the usual mode (0o666
    less the umask, as open() gives); a failed write leaves the previous file intact and no temporary behind."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.urandom(4).hex()}.tmp")
    try:
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))  # the umask applies, unlike mkstemp's 0600
        write(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)  # the bytes are on disk before the rename makes them visible
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise OSError(errno.ENOSPC, f"no space left on device (ENOSPC) writing {path}; "
                                        "the previous file is unchanged") from None
        raise
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)


def fsync_dir(folder):
    """Make a rename in `folder` durable, where the platform allows fsync on a folder."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def make_dirs(folder):
    """mkdir -p `folder`; returns the folders it created, deepest first (for remove_empty_dirs)."""
    folder, created = Path(folder), []
    while not folder.exists() and folder != folder.parent:
        created.append(folder)
        folder = folder.parent
    if created:
        created[0].mkdir(parents=True, exist_ok=True)
    return created


def remove_empty_dirs(folders):
    """Undo make_dirs where nothing was left inside: a failed call leaves no empty ~/data/eurosat behind."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            return


def checksum_ok(path, sha256=None, md5=None):
    """True when the file's sha256 (or md5) matches; with no expected checksum, True."""
    if not (sha256 or md5):
        return True
    return _file_hash(path, "sha256" if sha256 else "md5") == (sha256 or md5)


def file_sha256(path):
    return _file_hash(path, "sha256")


def _file_hash(path, algorithm="sha256"):
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def write_json(path, obj, indent=2):
    """JSON through write_atomic (a temporary name, fsync, then the rename): a crash never leaves half a file."""
    write_atomic(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=indent) + "\n"))


# ----------------------------------------------------------------------------------------------------
# One of each: the data root, sizes, durations, warnings as one line

DATA_ROOT_ENV = "ORTHCR_DATA"


def default_data_root():
    """$ORTHCR_DATA (even if empty: the data root check says so), else ~/data."""
    return os.environ.get(DATA_ROOT_ENV, "~/data")


def format_size(n):
    """Bytes as `1.2 GiB` or `3.4 MiB`."""
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def format_duration(seconds):
    """H:MM:SS, with as many hours as it takes (never wraps at 24 h)."""
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def one_line_warnings(say=lambda line: print(line, file=sys.stderr)):
    """Warnings as one `warning: ...` line each, without Python's category and source line (the command lines')."""
    warnings.showwarning = lambda message, *args, **kwargs: say(f"warning: {message}")


# ----------------------------------------------------------------------------------------------------
# Output streams that cannot change what a command does

_LOST = (errno.EPIPE, errno.EBADF, errno.ECONNRESET)  # the reader is gone, or the descriptor closed


class _Unbreakable:
    """A text stream whose writes never fail because nobody reads them: once its reader has gone (`| head -1`:
    EPIPE) or its descriptor is closed, the descriptor is pointed at os.devnull, so that the rest of the output,
    the stream's buffer and the interpreter's last flush go nowhere without an error. Other faults (a full disk
    behind a redirect) are raised as before."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text):
        try:
            return self.stream.write(text)
        except (OSError, ValueError) as e:
            self._lost(e)
            return len(text)

    def flush(self):
        try:
            self.stream.flush()
        except (OSError, ValueError) as e:
            self._lost(e)

    def _lost(self, error):
        if isinstance(error, OSError) and error.errno not in _LOST:
            raise error
        try:
            null = os.open(os.devnull, os.O_WRONLY)
            try:
                os.dup2(null, self.stream.fileno())
            finally:
                os.close(null)
            self.stream.flush()  # what the buffer held goes to os.devnull
        except (OSError, ValueError, AttributeError):  # no descriptor (closed, or an in-memory stream)
            self.stream = open(os.devnull, "w")

    def __getattr__(self, name):
        return getattr(self.stream, name)


def _open_standard_descriptors():
    """Descriptors 0, 1 and 2, when the command was started without them (`2>&-`), open on os.devnull: else the
    next file opened would take the number, and whatever writes to "stderr" would write into it."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            null = os.open(os.devnull, os.O_RDWR)
            if null != fd:  # the lowest free number is taken first: this one, unless an earlier one was missing
                os.dup2(null, fd)
                os.close(null)


@contextmanager
def unbreakable_streams():
    """sys.stdout and sys.stderr, for the block, such that a closed or vanished reader changes nothing a command
    does or writes: its files are written in full and its exit status is its own (0 for a finished run), the
    output nobody reads is dropped without a traceback."""
    _open_standard_descriptors()
    saved = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = (_Unbreakable(s if s is not None else open(os.devnull, "w")) for s in saved)
    try:
        yield
    finally:
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        sys.stdout, sys.stderr = saved


def read_bounded(path, limit, what="file"):
    """The bytes of a small file we read whole (a class list, a split, a config), refusing with one OSError-free
    ValueError anything that is not a regular file or is larger than `limit` bytes: a sparse 20 GB file or a link to
    /dev/zero must not exhaust memory. Reads at most limit + 1 bytes."""
    path = Path(path)
    st = os.stat(path)  # FileNotFoundError and friends pass through to the caller's own message
    if not stat.S_ISREG(st.st_mode):
        raise ValueError(f"{what} {path} is not a regular file")
    if st.st_size > limit:
        raise ValueError(f"{what} {path} is {format_size(st.st_size)}, more than the {format_size(limit)} such a "
                         f"file can hold")
    with open(path, "rb") as f:
        blob = f.read(limit + 1)
    if len(blob) > limit:  # it grew while being read
        raise ValueError(f"{what} {path} is larger than the {format_size(limit)} such a file can hold")
    return blob
