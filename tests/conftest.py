"""Shared test helpers: devices, the tiny random CLIP, OpenAI's reference code, ../shared, a local HTTP server."""

import hashlib
import http.server
import importlib.util
import os
import sys
import threading
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


@pytest.fixture
def server():
    """A local HTTP server: `files` maps a path to bytes; /404, /500 fail; /drop/<n> promises 2n bytes, sends n."""
    state = dict(files={}, requests=[])

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            state["requests"].append(self.path)
            if self.path in state["files"]:
                body = state["files"][self.path]
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
            elif self.path.startswith("/drop/"):
                n = int(self.path.split("/")[2])
                self.send_response(200)
                self.send_header("Content-Length", str(2 * n))
                self.end_headers()
                self.wfile.write(b"x" * n)
                self.wfile.flush()
                self.close_connection = True
            else:
                self.send_error(500 if self.path == "/500" else 404)

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, kwargs=dict(poll_interval=0.05), daemon=True)
    thread.start()
    state["url"] = f"http://127.0.0.1:{httpd.server_address[1]}"
    yield state
    httpd.shutdown()
    httpd.server_close()


def sha256(data):
    return hashlib.sha256(data).hexdigest()
