"""Image file checks: before a run starts, every image it will read is shown to be a regular file that PIL can
decode, that is not cut short, and that CLIP's transforms can take in bounded memory.

A problem is a short phrase that follows the file's name ("is empty", "cannot be decoded (...)"); data.py turns
the phrases into one DataError line.
"""

import os
import stat
import sys
import time
import warnings
from concurrent.futures import ThreadPoolExecutor

from PIL import Image

import clip_min

PROGRESS_MIN = 1000  # checks of this many images or more say so on stderr
TAIL = 4096  # bytes read from the end of an image to find its end marker
_END_MARKERS = {"JPEG": b"\xff\xd9", "MPO": b"\xff\xd9", "PNG": b"IEND"}


class BadImage(ValueError):
    """An image file that cannot be used; the message is the problem phrase."""


def open_rgb(path):
    """Decode `path` fully into an RGB PIL image; BadImage if it is missing, not a regular file, too large or too
    elongated for the transforms, or cut short."""
    problem, _ = file_problem(path)
    if problem:
        raise BadImage(problem)
    try:
        with Image.open(path) as im:
            problem = pixels_problem(im)
            if not problem:
                return im.convert("RGB")  # convert decodes every pixel, so truncation surfaces here, not mid-epoch
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        problem = f"is a possible decompression bomb ({e})"
    except (OSError, SyntaxError, ValueError) as e:  # PIL's errors for unreadable or truncated files
        problem = f"cannot be decoded ({e})"
    raise BadImage(problem)


def find_problems(paths, what, decode=False):
    """[(path, problem)] for the images in `paths` that cannot be read; with `decode`, every pixel is decoded too.

    Without `decode` the check reads each file's header and its last 4 KiB (an intact JPEG or PNG ends with its
    end marker, which truncation cuts off): 0.15-0.3 ms per image, in one thread (threads only add contention
    here), whatever the image size; decoding costs more, and far more for a photo than for a 64x64 tile. A file
    without the marker (trailing bytes are legal) is decoded in full to be sure. `what` ("test images of dtd")
    names the check on stderr when it is long.
    """
    paths = list(paths)
    loud = len(paths) >= PROGRESS_MIN
    if loud:
        print(f"checking {len(paths):,} {what}", end="", file=sys.stderr, flush=True)
    start = time.monotonic()
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)  # a warning is not enough: refuse
        problems = [image_problem(p) for p in paths]
    if decode and not any(problems):
        with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:  # PIL releases the GIL while decoding
            problems = list(pool.map(decode_problem, paths))
    if loud:
        print(f" ({time.monotonic() - start:.1f} s)", file=sys.stderr)
    return [(p, msg) for p, msg in zip(paths, problems) if msg]


def image_problem(path):
    """Why `path` cannot be read as an image (None if it can), from its type, header and last bytes."""
    problem, st = file_problem(path)
    if problem:
        return problem
    try:
        with open(path, "rb") as f:
            with Image.open(f) as im:
                problem = pixels_problem(im)
                image_format = im.format
            f.seek(max(0, st.st_size - TAIL))
            tail = f.read()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        return f"is a possible decompression bomb ({e})"
    except (OSError, SyntaxError, ValueError) as e:  # PIL's errors for files it cannot identify
        return f"is not a readable image ({e})"
    if problem:
        return problem
    marker = _END_MARKERS.get(image_format)
    return None if marker and marker in tail else decode_problem(path)


def decode_problem(path):
    try:
        open_rgb(path)
    except BadImage as e:
        return str(e)
    return None


def file_problem(path):
    """(why `path` is not a non-empty regular file or None, its stat); checked before opening: a FIFO would hang."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return "does not exist", None
    except OSError as e:
        return f"cannot be read ({e.strerror})", None
    if not stat.S_ISREG(st.st_mode):
        kind = "a folder" if stat.S_ISDIR(st.st_mode) else "a FIFO" if stat.S_ISFIFO(st.st_mode) else "a device"
        return f"is {kind}, not a regular file", st
    if st.st_size == 0:
        return "is empty", st
    return None, st


def pixels_problem(im):
    """What the header's size says against decoding or transforming the image, or None.

    The pixel count bounds what decoding allocates: PIL warns above Image.MAX_IMAGE_PIXELS, and the count is
    checked here too, whatever the warning filters say. The aspect ratio bounds what the transforms allocate: a
    476-byte 1 x 100,000 PNG decodes in 300 KB, but CLIP's resize (short side to n_px) would make it 15 GB; it is
    refused here, naming the file, for the reason given at clip_min.MAX_ASPECT_RATIO.
    """
    limit = Image.MAX_IMAGE_PIXELS
    if limit and im.width * im.height > limit:
        return f"is a possible decompression bomb ({im.width}x{im.height} pixels, more than {limit})"
    short, long = min(im.size), max(im.size)
    if not short or long > clip_min.MAX_ASPECT_RATIO * short:
        return (f"is {im.width}x{im.height} pixels, longer than {clip_min.MAX_ASPECT_RATIO}:1: too elongated for "
                "CLIP's resize (short side to n_px), whose memory grows with the ratio")
    return None
