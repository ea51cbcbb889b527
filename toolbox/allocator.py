"""The C allocator's handling of the large tensors of a training step (a speed device, process-wide).

PyTorch's CPU tensors come from malloc. glibc serves allocations over 32 MB (and, by its default thresholds, many
smaller ones) with fresh mmap pages and hands them back to the kernel on free, so every step faults in and zeroes
its activations again: a (6304, 3072) fp32 activation of a ViT-B/16 step at 32 images is 77 MB, 19,000 page
faults, each time it is allocated. In torch.profiler that cost lands on whichever op first writes the new
buffer, mostly the `copy_` with which `addmm` fills its output with the broadcast bias (issue #22's "628
copies"). Keeping freed memory in the process removes it: the next step reuses the same pages.
"""

import ctypes
import ctypes.util
import sys

_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # mallopt parameters, from glibc's malloc.h
_KEEP_BYTES = 2**31 - 1  # M_TRIM_THRESHOLD is an int: the heap's free top is returned only above 2 GiB


def keep_freed_memory():
    """Serve every allocation from malloc's heap and keep freed memory for reuse (glibc's mallopt: no mmap,
    trim threshold 2 GiB). Returns None when set, else one line saying why not (not Linux, not glibc).

    Peak memory stays as it was (the heap reuses what a step freed); memory freed after the peak is not given
    back to the system until the process ends."""
    if not sys.platform.startswith("linux"):
        return f"allocator tuning: glibc's mallopt only, not on {sys.platform}"
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return "allocator tuning: no glibc mallopt in this C library (musl?)"
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    if not (mallopt(_M_MMAP_MAX, 0) and mallopt(_M_TRIM_THRESHOLD, _KEEP_BYTES)):
        return "allocator tuning: mallopt refused the settings"
    return None
