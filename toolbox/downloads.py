"""Resumable, verified downloads over HTTP(S): the bytes go to a `.part` file, renamed into place only once the
checksum matches. Used for OpenAI's checkpoints (clip_min.load) and the datasets' archives (data.py --download).
"""

import errno
import http.client
import os
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
    the wrong checksum is fetched again. `what` names the download in messages, `size` (bytes) is shown until the
    server says. Files get the usual mode (0o666 less the umask); folders this call created go if it fails.
    """
    path = Path(path).expanduser()
    if path.exists() and not path.is_file():
        raise RuntimeError(f"{path} exists and is not a regular file")
    if path.is_file():
        if checksum_ok(path, sha256, md5):
            return path
        print(f"{path}: checksum mismatch, downloading {url} again", file=sys.stderr)
    part = path.with_name(path.name + ".part")  # a stable name, so that the next call can resume from it
    created = make_dirs(path.parent)
    resumable = False
    try:
        for attempt in range(retries + 1):
            try:
                resumable |= _transfer(url, part, what or path.name, size, chunk, path)
                break
            except (OSError, http.client.HTTPException) as e:
                resumable |= getattr(e, "resumable", False)
                if isinstance(e, (_WriteFailed, urllib.error.HTTPError)) or attempt == retries:
                    raise  # the disk or the server said no (retrying cannot help), or the retries are spent
                done = part.stat().st_size if part.exists() else 0
                print(f"\n{what or path.name}: interrupted at {done / 2**20:.1f} MiB ({e}); "
                      f"{'resuming' if resumable else 'restarting'}", file=sys.stderr)
        if not checksum_ok(part, sha256, md5):
            part.unlink()
            raise RuntimeError("checksum mismatch (expected " + (f"sha256 {sha256})" if sha256 else f"md5 {md5})"))
        os.replace(part, path)
        fsync_dir(path.parent)
        return path
    except Exception as e:
        kept = part.exists() and part.stat().st_size > 0 and resumable and not isinstance(e, _WriteFailed)
        if not kept:
            part.unlink(missing_ok=True)
        remove_empty_dirs(created)
        hint = f"; rerun to resume from {part} ({part.stat().st_size / 2**20:.1f} MiB kept)" if kept else ""
        raise RuntimeError(f"download of {url} to {path} failed: {_download_failure(e, part)}{hint}") from e


class _WriteFailed(OSError):
    """Writing the downloaded bytes failed (a full disk, a read-only folder): retrying the network cannot help."""


def _transfer(url, part, what, size, chunk, path):
    """One HTTP request appending to `part` from its current size (a Range request); returns whether the server
    takes Range requests, i.e. whether a broken transfer can resume. A server that answers 200 to a Range request
    sends the whole file, which then overwrites `part` from 0.

    Raises OSError (with `.resumable`) when the connection breaks, _WriteFailed when the disk does.
    """
    offset = part.stat().st_size if part.exists() else 0
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
        verb = f"resuming at {offset / 2**20:.1f} MiB" if offset else "downloading"
        print(f"{verb} {what} ({format_size(total) if total else 'size unknown'}) from {url} to {path}",
              file=sys.stderr)
        fd = os.open(part, os.O_WRONLY | os.O_CREAT | (os.O_APPEND if offset else os.O_TRUNC), 0o666)
        with os.fdopen(fd, "ab" if offset else "wb") as out:
            done, start, last = offset, time.monotonic(), 0.0
            try:
                while block := response.read(chunk):
                    _write(out, block)
                    done += len(block)
                    if time.monotonic() - last > 0.5 or done == total:
                        last = time.monotonic()
                        _progress(what, done, total, last - start, offset)
            except (OSError, http.client.HTTPException) as e:
                if not isinstance(e, _WriteFailed):
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
    if isinstance(error, _WriteFailed) and error.errno == errno.ENOSPC:
        return f"no space left on device (ENOSPC) writing {part}: {error}"
    return str(error)


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
