"""toolbox/allocator.py: use_huge_pages (train.py's) gives large CPU tensors transparent huge pages; the experiment
keep_freed_memory sets glibc's mallopt (no mmap, trim threshold 2 GiB) where it can, and says why not elsewhere."""

import os
import platform
import subprocess
import sys

import pytest

from conftest import ROOT
from toolbox import allocator

SET = """
import sys
sys.path.insert(0, {root!r})
from toolbox import allocator
print(allocator.keep_freed_memory())
"""


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_keep_freed_memory_is_set_by_glibcs_mallopt():
    # (in a subprocess: the setting is process-wide). Whether a freed tensor's pages are then reused was measured
    # as page faults, and it varies from process to process on the same machine (0 or all 16,384 pages of a 64 MB
    # tensor): it is a speed device whose effect bench.py measures, not a fact a test can state.
    done = subprocess.run([sys.executable, "-c", SET.format(root=str(ROOT))], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "None", done.stderr


def test_keep_freed_memory_says_why_not_elsewhere(monkeypatch):
    from toolbox import allocator
    monkeypatch.setattr(allocator.sys, "platform", "darwin")
    assert allocator.keep_freed_memory() == "allocator tuning: glibc's mallopt only, not on darwin"


# ----------------------------------------------------------------------------------------------------
# Huge pages for large CPU tensors: what train.py sets, before torch is imported

HUGE = """
import sys
sys.path.insert(0, {root!r})
import torch
x = torch.empty(64 * 2**20 // 4).fill_(1.0)  # 64 MB, written: its pages are faulted in
rollup = open("/proc/self/smaps_rollup").read()
print(int(next(line.split()[1] for line in rollup.splitlines() if line.startswith("AnonHugePages:"))))
"""


def thp_mode():
    try:
        text = open("/sys/kernel/mm/transparent_hugepage/enabled").read()
    except OSError:
        return None
    return text[text.index("[") + 1:text.index("]")]


@pytest.mark.skipif(thp_mode() not in ("madvise", "always"), reason="the kernel's transparent huge pages are off")
def test_the_huge_pages_switch_gives_a_large_tensor_huge_pages():
    # torch reads THP_MEM_ALLOC_ENABLE; with it a 64 MB tensor lies in 2 MB pages (kB of them in smaps_rollup)
    def huge_kb(value):
        env = {**os.environ, allocator.HUGE_PAGES: value}
        done = subprocess.run([sys.executable, "-c", HUGE.format(root=str(ROOT))], capture_output=True, text=True,
                              timeout=120, env=env)
        assert done.returncode == 0, done.stderr
        return int(done.stdout)

    assert huge_kb("1") >= 32 * 1024  # at least half of the 64 MB (the ends need not be 2 MB aligned)
    if thp_mode() == "madvise":  # otherwise the kernel gives huge pages to every large mapping anyway
        assert huge_kb("0") == 0


def test_train_asks_for_huge_pages_before_torch_is_imported():
    code = f"""
import os, sys
sys.path.insert(0, {str(ROOT)!r})
os.environ.pop({allocator.HUGE_PAGES!r}, None)
from toolbox import allocator
seen = []
real = allocator.use_huge_pages
allocator.use_huge_pages = lambda *a: (seen.append("torch" in sys.modules), real(*a))
import train
print(seen, os.environ[{allocator.HUGE_PAGES!r}])
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.split() == ["[False]", "1"], done.stderr


def test_use_huge_pages_keeps_what_the_environment_says():
    env = {}
    allocator.use_huge_pages(env)
    assert env == {allocator.HUGE_PAGES: "1"}
    env = {allocator.HUGE_PAGES: "0"}  # the user turned it off
    allocator.use_huge_pages(env)
    assert env == {allocator.HUGE_PAGES: "0"}
