"""toolbox/allocator.py: with keep_freed_memory, a freed large tensor's pages are reused by the next one (no page
faults), which is what made addmm's bias fills look like 628 copies in issue #22's profile. Runs in subprocesses:
the setting is process-wide."""

import platform
import subprocess
import sys

import pytest

from conftest import ROOT

FAULTS = """
import resource, sys, torch
sys.path.insert(0, {root!r})
from toolbox import allocator
if sys.argv[1] == "keep":
    assert allocator.keep_freed_memory() is None
x = torch.empty(16 * 2**20).fill_(1.0)  # 64 MB, written: its pages are faulted in
del x
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
x = torch.empty(16 * 2**20).fill_(1.0)  # the same size again
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def page_faults(mode):
    done = subprocess.run([sys.executable, "-c", FAULTS.format(root=str(ROOT)), mode], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return int(done.stdout)


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_keep_freed_memory_reuses_the_pages_of_a_freed_tensor():
    pages = 64 * 2**20 // 4096  # 16,384 pages of 4 KiB
    assert page_faults("default") > pages // 2  # glibc mmaps the second tensor afresh: every page faults again
    assert page_faults("keep") < pages // 20  # the heap hands back the freed pages


def test_keep_freed_memory_says_why_not_elsewhere(monkeypatch):
    from toolbox import allocator
    monkeypatch.setattr(allocator.sys, "platform", "darwin")
    assert allocator.keep_freed_memory() == "allocator tuning: glibc's mallopt only, not on darwin"
