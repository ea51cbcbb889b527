"""The Makefile's torch choice: the CPU build where no NVIDIA driver is found, a CUDA build where one is, the
tested version pinned, and the override; the bench's venv makes the same choice (dry runs: `make -n`)."""

import platform
import shutil
import subprocess

import pytest

from conftest import ROOT

pytestmark = pytest.mark.skipif(shutil.which("make") is None or platform.system() != "Linux", reason="needs make, Linux")


def planned(target, *overrides):
    done = subprocess.run(["make", "-n", target, *overrides], cwd=ROOT, capture_output=True, text=True, check=True)
    return [line for line in done.stdout.splitlines() if "pip install torch" in line]


@pytest.mark.parametrize("target, venv", [("install", ".venv"), ("bench-install", ".bench-venv")])
def test_make_installs_the_cpu_build_without_a_driver_and_a_cuda_build_with_one(target, venv):
    assert planned(target, "NVIDIA_DRIVER=") == [
        f"{venv}/bin/pip install torch==2.13.0+cpu --extra-index-url https://download.pytorch.org/whl/cpu"]
    assert planned(target, "NVIDIA_DRIVER=yes") == [f"{venv}/bin/pip install torch==2.13.0"]
    assert planned(target, "TORCH=torch==2.13.0 --index-url X") == [f"{venv}/bin/pip install torch==2.13.0 --index-url X"]
