"""encode_image speed of clip_min vs OpenAI's clip/model.py, side by side in one run (a script, not a test).

    python bench_clip.py [--batch 16] [--rounds 5]

Both models hold the same random ViT-B/16 weights (OpenAI-style init) in fp32 on the CPU. Rounds alternate
between the two so that machine load affects both alike; the median round of each is reported.
"""

import argparse
import importlib.util
import os
import statistics
import time
from pathlib import Path

import torch

import clip_min


def openai_model_module():
    """OpenAI's clip/model.py (PyPI openai-clip==1.0.1), imported as a file."""
    root = Path(__file__).resolve().parent
    for d in (os.environ.get("ORTHCR_OPENAI_CLIP"), root / ".cache" / "openai-clip-1.0.1" / "clip"):
        if d and (Path(d) / "model.py").is_file():
            spec = importlib.util.spec_from_file_location("openai_clip_model", Path(d) / "model.py")
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            return module
    raise SystemExit("OpenAI's clip/model.py not found: set ORTHCR_OPENAI_CLIP to its clip/ folder")


def seconds(fn, x):
    start = time.perf_counter()
    fn(x)
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    # OpenAI's build_model stores weights in fp16 (then .float()), so ours is built from its rounded weights
    theirs = openai_model_module().build_model(dict(clip_min.random_model("ViT-B/16", seed=0).state_dict()))
    theirs = theirs.float().eval()
    ours = clip_min.build_model(theirs.state_dict(), source="OpenAI's model")
    images = torch.randn(args.batch, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        # a warm-up pass that also checks both compute the same (L2-normalized) features
        unit = [f / f.norm(dim=-1, keepdim=True) for f in (ours.encode_image(images), theirs.encode_image(images))]
        difference = (unit[0] - unit[1]).abs().max().item()
        times = {"clip_min": [], "openai": []}
        for _ in range(args.rounds):
            times["clip_min"].append(seconds(ours.encode_image, images))
            times["openai"].append(seconds(theirs.encode_image, images))
    rate = {name: args.batch / statistics.median(t) for name, t in times.items()}
    print(f"ViT-B/16 encode_image, fp32, CPU, {torch.get_num_threads()} threads, batch {args.batch}, "
          f"median of {args.rounds} rounds (torch {torch.__version__})")
    print(f"  clip_min      {rate['clip_min']:7.2f} images/s")
    print(f"  openai model  {rate['openai']:7.2f} images/s")
    print(f"  ratio clip_min / openai = {rate['clip_min'] / rate['openai']:.3f}   (max |normalized feature difference| "
          f"{difference:.2e})")


if __name__ == "__main__":
    main()
