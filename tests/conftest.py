"""Shared test helpers: devices, the tiny random CLIP, OpenAI's reference code, ../shared, a local HTTP server,
miniature datasets and the training CLI."""

import errno
import hashlib
import http.server
import importlib.util
import io
import json
import os
import sys
import threading
import zipfile
from pathlib import Path

import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import clip_min  # noqa: E402 (the repository is importable from here on)
import train  # noqa: E402

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
    return clip_min.random_model("tiny", seed=0)


@pytest.fixture
def shared():
    if not SHARED.is_dir():
        pytest.skip(f"needs {SHARED} beside the checkout (the real EuroSAT sample and CoOp's split files, as in "
                    "this project's CI); see the README's Tests section")
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


# ----------------------------------------------------------------------------------------------------
# Training end to end: miniature datasets in CoOp's layout, the tiny CLIP as a checkpoint file, the CLI

# one solid colour per class (plus noise): a task the tiny model can learn
COLOURS = [(220, 30, 30), (30, 200, 40), (40, 60, 220), (230, 220, 40), (200, 40, 210), (40, 210, 210)]


def toy_image(path, colour, seed, size=40):
    g = torch.Generator().manual_seed(seed)
    pixels = (torch.tensor(colour).view(1, 1, 3) + torch.randint(-25, 26, (size, size, 3), generator=g)).clamp(0, 255)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels.to(torch.uint8).numpy()).save(path, quality=95)


def make_eurosat_like(root, classes=4, per_split=(8, 2, 6)):
    """root/eurosat/2750/<Class>/*.jpg + a split_zhou_EuroSAT.json in CoOp's format."""
    folder = root / "eurosat"
    split = {"train": [], "val": [], "test": []}
    seed = 0
    for label in range(classes):
        name = f"Class{label}"
        for part, count in zip(split, per_split):
            for _ in range(count):
                rel = f"{name}/{name}_{seed}.jpg"
                toy_image(folder / "2750" / rel, COLOURS[label], seed)
                split[part].append([rel, label, f"class {label}"])
                seed += 1
    (folder / "split_zhou_EuroSAT.json").write_text(json.dumps(split))
    return root


def make_imagenet_like(root, classes=4, train_n=6, test_n=4):
    """ImageNet and its four variants in CoOp's layout, with `classes` wnids."""
    wnids = [f"n{i:08d}" for i in range(classes)]
    lines = [f"{w} thing {i}" for i, w in enumerate(wnids)]
    seed = 1000
    for split, n in (("train", train_n), ("val", test_n)):
        for i, w in enumerate(wnids):
            for _ in range(n):
                toy_image(root / "imagenet" / "images" / split / w / f"{w}_{seed}.JPEG", COLOURS[i], seed)
                seed += 1
    (root / "imagenet" / "classnames.txt").write_text("\n".join(lines) + "\n")
    for i, w in enumerate(wnids):
        for _ in range(2):
            toy_image(root / "imagenetv2" / "imagenetv2-matched-frequency-format-val" / str(i) / f"{seed}.jpeg",
                      COLOURS[i], seed)
            toy_image(root / "imagenet-sketch" / "images" / w / f"{seed}.JPEG", COLOURS[i], seed + 1)
            seed += 2
    for folder, sub in (("imagenet-adversarial", "imagenet-a"), ("imagenet-rendition", "imagenet-r")):
        for i, w in enumerate(wnids[:2]):  # a subset of the classes, as the 200 of -A and -R
            toy_image(root / folder / sub / w / f"{seed}.jpg", COLOURS[i], seed)
            seed += 1
    return root


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "tiny.pt"
    torch.save(clip_min.random_model("tiny", seed=0).state_dict(), path)
    return path


@pytest.fixture
def root(tmp_path):
    return make_eurosat_like(tmp_path / "data")


def run_main(*argv):
    return train.main([str(a) for a in argv])


def base_args(root, weights, out, *extra):
    training = [] if "--zero-shot" in extra else ["--batch-size", 8]  # zero-shot refuses a training flag
    return ["--data", "eurosat", "--root", root, "--weights", weights, "--out", out, "--shots", 8, *training,
            "--log-every", 100, *extra]


def read_log(out):
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def saved_adapters(out):
    return torch.load(out / "adapters.pt", weights_only=True)


def full_disk(monkeypatch):
    """Every write through os.fdopen fails with ENOSPC (clip_min.download writes through it); returns the real
    os.fdopen, to give the disk room again."""
    real_fdopen = os.fdopen

    class FullDisk(io.RawIOBase):
        def __init__(self, fd, *args, **kwargs):
            self.file = real_fdopen(fd, *args, **kwargs)

        def write(self, block):
            raise OSError(errno.ENOSPC, "No space left on device")

        def close(self):
            self.file.close()

    monkeypatch.setattr(os, "fdopen", FullDisk)
    return real_fdopen


def rewrite_zip(src, dst, rename=lambda name: name, replace=None, drop=(), deflate=()):
    """Copy a zip archive, renaming / replacing / dropping / compressing entries (stored, as PyTorch writes them,
    unless in `deflate`)."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for item in zin.infolist():
            if item.filename in drop:
                continue
            data = (replace or {}).get(item.filename, zin.read(item.filename))
            compression = zipfile.ZIP_DEFLATED if item.filename in deflate else zipfile.ZIP_STORED
            zout.writestr(rename(item.filename), data, compress_type=compression)
    return dst
