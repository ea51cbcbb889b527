"""Shared test helpers: devices, the tiny random CLIP, OpenAI's reference code, ../shared."""

import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# every test that takes `device` runs on the CPU and, where present, on CUDA
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])

# real data beside the checkout (see ../shared/README.md); tests that need it skip without it
SHARED = ROOT.parent / "shared"


def openai_clip_dir():
    """Folder holding OpenAI's `clip/model.py` (PyPI openai-clip==1.0.1), or None."""
    for d in (os.environ.get("ORTHCR_OPENAI_CLIP"), ROOT / ".cache" / "openai-clip-1.0.1" / "clip"):
        if d and (Path(d) / "model.py").is_file():
            return Path(d)
    return None


def load_openai(module):
    """Import OpenAI's `clip/<module>.py` directly (the package __init__ needs torchvision), or skip."""
    d = openai_clip_dir()
    if d is None:
        pytest.skip("OpenAI's clip code not found (set ORTHCR_OPENAI_CLIP to its clip/ folder)")
    if module == "simple_tokenizer":
        pytest.importorskip("ftfy")
        pytest.importorskip("regex")
    spec = importlib.util.spec_from_file_location(f"openai_clip_{module}", d / f"{module}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


@pytest.fixture(scope="session")
def tiny_model():
    import clip_min
    return clip_min.random_model("tiny", seed=0)


@pytest.fixture
def shared():
    if not SHARED.is_dir():
        pytest.skip("../shared is not present")
    return SHARED
