"""Resumable, verified downloads over HTTP(S): the bytes go to a `.part` file, renamed into place only once the
checksum matches. Used for OpenAI's checkpoints (clip_min.load) and the datasets' archives (data.py --download).

Nothing is trusted before the checksum: a `.part` name that is a link or not a regular file is refused, the
partial file is opened without following links, and a server never writes more than the known size.
"""

import errno
import http.client
import os
import stat
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from toolbox.files import checksum_ok, format_duration, format_size, fsync_dir, make_dirs, remove_empty_dirs


def download(url, path, sha256=None, md5=None, what=None, size=None, retries=3, chunk=1 << 20):
    """Fetch `url` to `path`, verifying the checksum; return `path`.

    The bytes go to `<path>.part`, which is renamed onto `path` only once the checksum matches: a failure never
    leaves a file under the final name. A transfer broken mid-way resumes from the `.part` file with an HTTP Range
    request (up to `retries` times in this call; the next call resumes too); a server that ignores Range restarts
    from 0. A wrong checksum deletes the `.part` file. An existing file with the right checksum is reused, one with
    the wrong checksum is fetched again. `what` names the download in messages. `size` (bytes), when known, caps
    the download: a server that announces or sends more is stopped there (without it, the cap is the server's
    Content-Length). Files get the usual mode (0o666 less the umask); folders this call created go if it fails.
    """
    path = Path(path).expanduser()
    part = path.with_name(path.name + ".part")  # a stable name, so that the next call can resume from it
    if path.exists() and not path.is_file():  # a link to a file is read (and verified), and replaced, never written
        raise RuntimeError(f"{path} exists and is not a regular file")
    if problem := not_regular(part):  # a link here would make the download write, or append to, a file anywhere
        raise RuntimeError(f"{problem}; remove it and rerun")
    if path.is_file():
        if checksum_ok(path, sha256, md5):
            return path
        print(f"{path}: checksum mismatch, downloading {url} again", file=sys.stderr)
    created = make_dirs(path.parent)
    resumable = False
    try:
        for attempt in range(retries + 1):
            try:
                resumable |= _transfer(url, part, what or path.name, size, chunk, path)
                break
            except (OSError, http.client.HTTPException) as e:
                resumable |= getattr(e, "resumable", False)
                if isinstance(e, (_WriteFailed, _Refused, urllib.error.HTTPError)) or attempt == retries:
                    raise  # the disk or the server said no (retrying cannot help), or the retries are spent
                done = part.lstat().st_size if part.exists() else 0
                print(f"\n{what or path.name}: interrupted at {done / 2**20:.1f} MiB ({e}); "
                      f"{'resuming' if resumable else 'restarting'}", file=sys.stderr)
        if not checksum_ok(part, sha256, md5):
            part.unlink()
            raise RuntimeError("checksum mismatch (expected " + (f"sha256 {sha256})" if sha256 else f"md5 {md5})"))
        os.replace(part, path)
        fsync_dir(path.parent)
        return path
    except Exception as e:
        kept = (part.exists() and part.lstat().st_size > 0 and resumable
                and not isinstance(e, (_WriteFailed, _Refused)))
        if not kept:
            part.unlink(missing_ok=True)
        remove_empty_dirs(created)
        hint = f"; rerun to resume from {part} ({part.lstat().st_size / 2**20:.1f} MiB kept)" if kept else ""
        raise RuntimeError(f"download of {url} to {path} failed: {_download_failure(e, part)}{hint}") from e


def not_regular(path):
    """Why `path` cannot be written or resumed (a link, not followed; a folder, FIFO or device), or None when it is
    absent or a regular file."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    if stat.S_ISLNK(st.st_mode):
        return f"{path} is a symbolic link (to {os.readlink(path)}), not a regular file"
    if not stat.S_ISREG(st.st_mode):
        return f"{path} exists and is not a regular file"
    return None


class _WriteFailed(OSError):
    """Writing the downloaded bytes failed (a full disk, a read-only folder): retrying the network cannot help."""


class _Refused(OSError):
    """The server sends more than the known size, or the partial file is not ours to write: no retry, nothing kept."""


def _transfer(url, part, what, size, chunk, path):
    """One HTTP request appending to `part` from its current size (a Range request); returns whether the server
    takes Range requests, i.e. whether a broken transfer can resume. A server that answers 200 to a Range request
    sends the whole file, which then overwrites `part` from 0.

    Raises OSError (with `.resumable`) when the connection breaks, _WriteFailed when the disk does.
    """
    offset = part.lstat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={offset}-"} if offset else {})
    try:
        response = urllib.request.urlopen(request, timeout=60)
    except urllib.error.HTTPError as e:
        if e.code == 416 and offset:  # nothing left to send: the .part file is complete (the checksum will tell)
            return True
        raise
    with response:
        ranged = response.status == 206 and _range_start(response) == offset
        resumable = ranged or response.headers.get("Accept-Ranges", "").lower() == "bytes"
        if offset and not ranged:
            print(f"{what}: the server ignores Range requests, restarting from 0", file=sys.stderr)
            offset = 0
        length = int(response.headers.get("Content-Length") or 0)
        total = offset + length if length else size or 0
        if size and total > size:
            raise _Refused(f"the server announces {total} bytes, more than the {size} expected")
        limit = size or total  # 0: neither the caller nor the server knows the size
        verb = f"resuming at {offset / 2**20:.1f} MiB" if offset else "downloading"
        print(f"{verb} {what} ({format_size(total) if total else 'size unknown'}) from {url} to {path}",
              file=sys.stderr)
        with os.fdopen(_open_part(part, offset), "ab" if offset else "wb") as out:
            done, start, last = offset, time.monotonic(), 0.0
            try:
                while block := response.read(chunk):
                    if limit and done + len(block) > limit:
                        raise _Refused(f"the server sent more than the {limit} bytes expected; stopped there")
                    _write(out, block)
                    done += len(block)
                    if time.monotonic() - last > 0.5 or done == total:
                        last = time.monotonic()
                        _progress(what, done, total, last - start, offset)
            except (OSError, http.client.HTTPException) as e:
                if not isinstance(e, (_WriteFailed, _Refused)):
                    e.resumable = resumable
                raise
            finally:
                print(file=sys.stderr)
            _write(out, sync=True)
        if total and done < total:
            error = OSError(f"connection closed after {done} of {total} bytes")
            error.resumable = resumable
            raise error
        return resumable


def _open_part(part, offset):
    """The partial file's descriptor, for appending from `offset` (else truncated): never through a link
    (O_NOFOLLOW), never blocking on a FIFO (O_NONBLOCK), and only if it is a regular file."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | (os.O_APPEND if offset else os.O_TRUNC)
    try:
        fd = os.open(part, flags, 0o666)
    except OSError as e:
        if why := not_regular(part):
            raise _Refused(f"{why}; remove it and rerun") from None
        raise _WriteFailed(e.errno, f"cannot write {part} ({e.strerror})") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise _Refused(f"{part} exists and is not a regular file; remove it and rerun")
    return fd


def _write(out, block=b"", sync=False):
    """out.write(block) (then fsync, with `sync`), turning a failure into _WriteFailed."""
    try:
        if block:
            out.write(block)
        if sync:
            out.flush()
            os.fsync(out.fileno())
    except OSError as e:
        raise _WriteFailed(e.errno, e.strerror or str(e)) from e


def _range_start(response):
    """The first byte a 206 response carries, from "Content-Range: bytes START-END/TOTAL"."""
    value = response.headers.get("Content-Range", "")
    try:
        return int(value.split()[1].split("-")[0])
    except (IndexError, ValueError):
        return None


def _download_failure(error, part):
    """The failure in one line (urllib's redirect-loop message has three)."""
    if isinstance(error, _WriteFailed) and error.errno == errno.ENOSPC:
        return f"no space left on device (ENOSPC) writing {part}: {error}"
    if isinstance(error, urllib.error.HTTPError) and 300 <= error.code < 400:
        return (f"HTTP Error {error.code}: the server redirects in a loop (or more than "
                f"{urllib.request.HTTPRedirectHandler.max_redirections} times)")
    return " ".join(str(error).split())


def _progress(what, done, total, seconds, start=0):
    """One `\r` line on stderr: share done, rate and time left (over the bytes of this call)."""
    rate = (done - start) / max(seconds, 1e-9)
    if total:
        left = (total - done) / rate if rate > 0 else float("inf")
        eta = f", ETA {format_duration(left)}" if left < 1e7 else ""
        share = f"{100 * done / total:5.1f}% of {format_size(total)}"
    else:
        share, eta = format_size(done), ""
    print(f"\r{what}: {share}, {rate / 2**20:.1f} MiB/s{eta}", end="", file=sys.stderr, flush=True)
