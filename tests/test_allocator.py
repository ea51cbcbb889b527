"""toolbox/allocator.py: keep_freed_memory sets glibc's mallopt (no mmap, trim threshold 2 GiB) where it can, and
says why not elsewhere."""

import platform
import subprocess
import sys

import pytest

from conftest import ROOT

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
