"""The C allocator's handling of the large tensors of a training step (a speed device, process-wide).

PyTorch's CPU tensors come from malloc. glibc serves allocations over 32 MB (and, by its default thresholds, many
smaller ones) with fresh mmap pages and hands them back to the kernel on free, so every step faults in and zeroes
its activations again: a (6304, 3072) fp32 activation of a ViT-B/16 step at 32 images is 77 MB, 19,000 page
faults of 4 KB, each time it is allocated. In torch.profiler that cost lands on whichever op first writes the new
buffer, mostly the `copy_` with which `addmm` fills its output with the broadcast bias (issue #22's "628
copies").

`use_huge_pages` is what train.py does: PyTorch's own switch, the environment variable THP_MEM_ALLOC_ENABLE=1,
aligns each CPU allocation of 2 MB or more to 2 MB and asks the kernel for transparent huge pages there
(madvise), so that 77 MB takes ~40 faults instead of 19,000 (a fresh 77 MB tensor filled: ~28 ms -> ~9 ms on
this project's CPU machine). Memory is still returned on free; the values computed are the same. torch reads the
variable once, at its first allocation, so it must be set before `import torch`. It does nothing where the kernel
has transparent huge pages off (/sys/kernel/mm/transparent_hugepage/enabled: never).

`keep_freed_memory` is an experiment, bench.py --allocator keep only: no mmap at all, freed memory kept for the
next step. Its page reuse varied from process to process, so train.py does not set it.
"""

import ctypes
import ctypes.util
import os
import sys

HUGE_PAGES = "THP_MEM_ALLOC_ENABLE"  # read by PyTorch's CPU allocator (c10/core/impl/alloc_cpu.cpp)


def use_huge_pages(environ=os.environ):
    """Ask PyTorch's CPU allocator for transparent huge pages (THP_MEM_ALLOC_ENABLE=1), unless the environment
    already says (0 turns it off). Call it before `import torch`; afterwards it changes nothing."""
    environ.setdefault(HUGE_PAGES, "1")

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
