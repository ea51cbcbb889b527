"""Benchmark of one OrthCR training step and of eval throughput, side by side with the code a user would
pick instead: OpenAI's `clip/model.py` (eval) and HF `transformers` CLIP + PEFT OFT (training step).

The reference step: CLIP ViT-B/16 with random weights in the official format; 16 training images at
224x224 plus their 16 Cutout copies; 10 class prompts; adapters on c_fc and c_proj of every block of both
towers (r = 4 blocks, exact Cayley); loss CE + CE + 1.5 KL + 1 KL against the frozen zero-shot model; one
AdamW step. fp32 on the CPU (bf16 autocast with --device cuda).

Every training step runs in its own subprocess (`bench.py --worker NAME`), so each one's peak memory is its
own; eval throughput of ours and OpenAI's runs in one subprocess, alternating rounds so that machine load
hits both alike. The HF/PEFT workers run under this Python when it can import them, else under
.bench-venv/bin/python (see requirements-bench.txt); a peer that is not installed is skipped with a note.
FLOPs are counted by torch's FlopCounterMode on each warm-up step (matmuls, convolutions and attention; the
Cayley solves are not counted), and the floor is our step's FLOPs at the best measured fp32 torch.mm rate.

    python bench.py                 # the full run (minutes on a 2-core CPU)
    python bench.py --quick         # the tiny config: a smoke test of every path
    python bench.py --steps 5 --json --device cuda
    python bench.py --only ours_step eval   # a subset of: matmul ours_step eval peft_exact peft_neumann
"""

import argparse
import importlib.util
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

import clip_min  # noqa: E402
import orthcr  # noqa: E402

BENCH_PYTHON = ROOT / ".bench-venv" / "bin" / "python"
BATCH = 16  # training images per step (plus as many Cutout copies) and eval batch
BLOCKS = 4  # r: Cayley blocks per adapted weight
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


# ----------------------------------------------------------------------------------------------------
# Helpers shared by the workers


def peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def autocast(device):
    """bf16 autocast on CUDA; plain fp32 on the CPU (the reference step)."""
    return torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda")


def timed(fn, repeats, device):
    """Seconds of each of `repeats` calls of fn()."""
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return times


def count_flops(fn):
    """Floating-point operations of fn() as torch's FlopCounterMode counts them (matmuls, convs, attention)."""
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def reference_batch(config, device):
    """Images in [0, 1], labels and class-prompt tokens of the reference step (seeded)."""
    g = torch.Generator().manual_seed(0)
    size = clip_min.CONFIGS[config]["image_resolution"]
    images = torch.rand(BATCH, 3, size, size, generator=g).to(device)
    labels = torch.randint(len(CLASSES), (BATCH,), generator=g).to(device)
    tokens = clip_min.tokenize([f"a photo of a {c}." for c in CLASSES]).to(device)
    return images, labels, tokens


def memory_figures(device):
    figures = {"peak_rss_mb": peak_rss_mb()}
    if device == "cuda":
        figures["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return figures


def log(*args):
    print(*args, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------------
# Workers: each prints one JSON line on stdout


def worker_matmul(args):
    """The machine's fp32 matmul rate: the fastest of 10 runs of a large square torch.mm and of the MLP's shape
    (the fastest, not the median: the floor is what the hardware can do, not what a loaded machine did)."""
    rates = {}
    n = 4096 if not args.quick else 1024
    tokens = 2 * BATCH * 197  # clean + cutout images x (1 + 14 x 14) tokens of ViT-B/16
    for name, (m, k, n_) in {"square": (n, n, n), "mlp": (tokens, 768, 3072)}.items():
        a = torch.randn(m, k, device=args.device)
        b = torch.randn(k, n_, device=args.device)
        torch.mm(a, b)  # warm-up
        rates[name] = 2 * m * k * n_ / min(timed(lambda: torch.mm(a, b), 10, args.device))
    return {"matmul_flops_per_s": max(rates.values()), "matmul_rates": rates}


def worker_ours_step(args):
    torch.manual_seed(0)
    model = clip_min.random_model(args.config, seed=0).to(args.device)
    for p in model.parameters():
        p.requires_grad_(False)
    params = dict(model.state_dict())
    adapters = orthcr.init_adapters(params, blocks=BLOCKS)
    opt = torch.optim.AdamW(adapters.values(), lr=1e-5)
    images, labels, tokens = reference_batch(args.config, args.device)
    with autocast(args.device):
        zs_text = orthcr.zero_shot_text_features(model, params, orthcr.trim_tokens(tokens))  # once per class set
    generator = torch.Generator().manual_seed(0)

    def step():
        with autocast(args.device):
            loss, _ = orthcr.objective(model, params, adapters, images, labels, orthcr.trim_tokens(tokens), zs_text,
                                       generator, transform=orthcr.cayley_fast)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    log("ours: warm-up step (counting FLOPs)")
    flops = count_flops(step)  # also the warm-up: AdamW's state, allocator and kernel caches
    times = timed(step, args.steps, args.device)
    memory = memory_figures(args.device)  # before the merge timing below, which allocates more

    # the Cayley transform and merge alone, forward and backward, as they run inside the step
    grads = {k: torch.randn_like(params[k]) for k in adapters}

    def cayley_and_merge():
        with autocast(args.device):
            merged = orthcr.merge(params, adapters)
        torch.autograd.backward([merged[k] for k in adapters], [grads[k] for k in adapters])
        for P in adapters.values():
            P.grad = None

    cayley_and_merge()
    merge_s = statistics.median(timed(cayley_and_merge, args.steps, args.device))
    step_s = statistics.median(times)
    return {"step_s": step_s, "step_times": times, "step_flops": flops, "cayley_merge_s": merge_s,
            "cayley_merge_share": merge_s / step_s, "trainable": orthcr.count_parameters(adapters), **memory}


def merged_state_dict(config):
    """The official-format state dict of a finetuned model: random CLIP, adapters at a small random P."""
    params = dict(clip_min.random_model(config, seed=0).state_dict())
    adapters = orthcr.init_adapters(params, blocks=BLOCKS)
    g = torch.Generator().manual_seed(1)
    for P in adapters.values():
        P.data.copy_(torch.randn(P.shape, generator=g) * 1e-3)
    return orthcr.export_state_dict(params, adapters)


def openai_module():
    """OpenAI's `clip/model.py`, imported by path (its package __init__ needs torchvision), or None."""
    for d in (os.environ.get("ORTHCR_OPENAI_CLIP"), ROOT / ".cache" / "openai-clip-1.0.1" / "clip"):
        if d and (Path(d) / "model.py").is_file():
            spec = importlib.util.spec_from_file_location("openai_clip_model", Path(d) / "model.py")
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            return module
    return None


def worker_eval(args):
    """encode_image images/s at batch 16 of the merged model in clip_min and, from the same state dict, in
    OpenAI's model.py; rounds alternate between the two so that machine load affects both alike."""
    state_dict = merged_state_dict(args.config)
    models = {"ours": clip_min.build_model(state_dict).to(args.device)}
    openai = openai_module()
    if openai is not None:
        # our export loads in OpenAI's code as is; its build_model stores fp16, so cast back to fp32
        models["openai"] = openai.build_model(dict(state_dict)).float().to(args.device).eval()
    images = clip_min.normalize(reference_batch(args.config, args.device)[0])
    times = {name: [] for name in models}
    with torch.inference_mode(), autocast(args.device):
        for model in models.values():
            model.encode_image(images)  # warm-up
        for _ in range(args.steps):
            for name, model in models.items():
                times[name] += timed(lambda: model.encode_image(images), 1, args.device)
    result = {f"{name}_eval_img_s": BATCH / statistics.median(t) for name, t in times.items()}
    if openai is None:
        result["openai_skipped"] = "OpenAI's clip/model.py not found (set ORTHCR_OPENAI_CLIP to its clip/ folder)"
    return result


def hf_clip_config(config):
    """A transformers CLIPConfig with the architecture of clip_min.CONFIGS[config] (heads = width / 64)."""
    from transformers import CLIPConfig
    c = clip_min.CONFIGS[config]
    text = dict(hidden_size=c["transformer_width"], intermediate_size=4 * c["transformer_width"],
                num_hidden_layers=c["transformer_layers"], num_attention_heads=c["transformer_width"] // 64,
                max_position_embeddings=c["context_length"], vocab_size=c["vocab_size"], hidden_act="quick_gelu")
    vision = dict(hidden_size=c["vision_width"], intermediate_size=4 * c["vision_width"],
                  num_hidden_layers=c["vision_layers"], num_attention_heads=c["vision_width"] // 64,
                  image_size=c["image_resolution"], patch_size=c["vision_patch_size"], hidden_act="quick_gelu")
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=c["embed_dim"])


def worker_peft_step(args, neumann):
    from peft import OFTConfig, get_peft_model
    from transformers import CLIPModel

    torch.manual_seed(0)
    clip = CLIPModel(hf_clip_config(args.config)).to(args.device).eval()  # random init
    model = get_peft_model(clip, OFTConfig(r=BLOCKS, oft_block_size=0, target_modules=["fc1", "fc2"],
                                           use_cayley_neumann=neumann))
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-5)
    images, labels, tokens = reference_batch(args.config, args.device)
    tokens = orthcr.trim_tokens(tokens)  # the same work as ours: no padding past the longest prompt
    with torch.no_grad(), model.disable_adapter(), autocast(args.device):
        zs_text = clip.get_text_features(input_ids=tokens).pooler_output  # once per class set
    generator = torch.Generator().manual_seed(0)

    def step():
        with autocast(args.device):
            x = clip_min.normalize(torch.cat([images, orthcr.cutout(images, generator)]))  # clean, cutout
            with torch.no_grad(), model.disable_adapter():
                zs = orthcr.clip_logits(clip.get_image_features(pixel_values=x).pooler_output, zs_text,
                                        clip.logit_scale)
            text = clip.get_text_features(input_ids=tokens).pooler_output
            logits = orthcr.clip_logits(clip.get_image_features(pixel_values=x).pooler_output, text,
                                        clip.logit_scale)
            loss, _ = orthcr.orthcr_loss(logits[:BATCH], logits[BATCH:], zs[:BATCH], zs[BATCH:], labels)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    log(f"peft {'neumann' if neumann else 'exact'}: warm-up step (counting FLOPs)")
    flops = count_flops(step)
    times = timed(step, args.steps, args.device)
    return {"step_s": statistics.median(times), "step_times": times, "step_flops": flops,
            "trainable": sum(p.numel() for p in trainable), **memory_figures(args.device)}


WORKERS = {
    "matmul": worker_matmul,
    "ours_step": worker_ours_step,
    "eval": worker_eval,
    "peft_exact": lambda args: worker_peft_step(args, neumann=False),
    "peft_neumann": lambda args: worker_peft_step(args, neumann=True),
}


# ----------------------------------------------------------------------------------------------------
# The driver: one subprocess per measurement, then the table, the ratios and the floor


def has_modules(python, *modules):
    code = "import importlib.util, sys; sys.exit(not all(importlib.util.find_spec(m) for m in sys.argv[1:]))"
    return subprocess.run([str(python), "-c", code, *modules]).returncode == 0


def interpreter(name):
    """(python, None) to run worker `name` with, or (None, why it is skipped)."""
    if name.startswith("peft"):
        for python in (sys.executable, BENCH_PYTHON):
            if Path(python).exists() and has_modules(python, "transformers", "peft"):
                return python, None
        return None, "transformers + peft not installed (see requirements-bench.txt)"
    return sys.executable, None


def run_worker(name, args):
    python, why = interpreter(name)
    if python is None:
        log(f"skipping {name}: {why}")
        return {"skipped": why}
    command = [str(python), str(Path(__file__).resolve()), "--worker", name, "--device", args.device,
               "--steps", str(args.steps)] + (["--quick"] if args.quick else [])
    log(f"running {name} ({python})")
    done = subprocess.run(command, stdout=subprocess.PIPE, text=True)  # stderr (progress) passes through
    if done.returncode != 0:
        raise SystemExit(f"worker {name} failed with exit code {done.returncode}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def ratio(a, b):
    return a / b if a and b else None


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=5, help="timed steps (and eval batches) after the warm-up")
    parser.add_argument("--device", default="cpu", help="cpu (fp32) or cuda (bf16 autocast)")
    parser.add_argument("--json", action="store_true", help="end with one JSON line of every figure")
    parser.add_argument("--quick", action="store_true", help="the tiny config: a smoke test of every path")
    parser.add_argument("--only", nargs="+", choices=list(WORKERS), help="run only these measurements")
    parser.add_argument("--worker", choices=list(WORKERS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.config = "tiny" if args.quick else "ViT-B/16"

    if args.worker:
        print(json.dumps(WORKERS[args.worker](args)))
        return

    r = {name: run_worker(name, args) for name in (args.only or WORKERS)}
    ours, exact, neumann = r.get("ours_step", {}), r.get("peft_exact", {}), r.get("peft_neumann", {})
    ev = r.get("eval", {})
    ours_eval = {"eval_img_s": ev["ours_eval_img_s"]} if "ours_eval_img_s" in ev else {}
    openai_eval = {"eval_img_s": ev["openai_eval_img_s"]} if "openai_eval_img_s" in ev else \
        {"skipped": ev.get("openai_skipped", "not run")}
    rate = r.get("matmul", {}).get("matmul_flops_per_s")
    floor_s = ours["step_flops"] / rate if rate and "step_flops" in ours else None
    summary = {
        "config": args.config, "device": args.device, "torch": torch.__version__, "threads": torch.get_num_threads(),
        "step_s": ours.get("step_s"), "eval_img_s": ours_eval.get("eval_img_s"), "peak_rss_mb": ours.get("peak_rss_mb"),
        "cayley_merge_share": ours.get("cayley_merge_share"), "step_flops": ours.get("step_flops"),
        "matmul_flops_per_s": rate, "floor_s": floor_s,
        "ratios": {
            "step_vs_peft_exact": ratio(ours.get("step_s"), exact.get("step_s")),
            "step_vs_peft_neumann": ratio(ours.get("step_s"), neumann.get("step_s")),
            "eval_vs_openai": ratio(ours_eval.get("eval_img_s"), openai_eval.get("eval_img_s")),
            "peak_rss_vs_peft_exact": ratio(ours.get("peak_rss_mb"), exact.get("peak_rss_mb")),
            "peak_rss_vs_peft_neumann": ratio(ours.get("peak_rss_mb"), neumann.get("peak_rss_mb")),
            "step_vs_floor": ratio(ours.get("step_s"), floor_s),
        },
        "runs": r,
    }

    print(f"\nOrthCR reference step: {args.config}, batch {BATCH} + {BATCH} Cutout, {len(CLASSES)} classes, "
          f"r = {BLOCKS}, {args.device} ({'bf16 autocast' if args.device == 'cuda' else 'fp32'}), "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, median of {args.steps} after a warm-up")
    rows = [("ours (orthcr)", ours, ours_eval), ("OpenAI clip/model.py", {}, openai_eval),
            ("HF + PEFT OFT exact", exact, {}), ("HF + PEFT OFT Neumann", neumann, {})]
    print(f"{'':24}{'step s':>9}{'GFLOP/step':>12}{'peak MB':>10}{'eval img/s':>12}")
    for label, step, ev in rows:
        if step.get("skipped") or ev.get("skipped"):
            print(f"{label:24}skipped: {step.get('skipped') or ev.get('skipped')}")
            continue
        cells = [f"{step['step_s']:9.3f}" if "step_s" in step else f"{'':9}",
                 f"{step['step_flops'] / 1e9:12.0f}" if "step_flops" in step else f"{'':12}",
                 f"{step['peak_rss_mb']:10.0f}" if "peak_rss_mb" in step else f"{'':10}",
                 f"{ev['eval_img_s']:12.2f}" if "eval_img_s" in ev else ""]
        print(f"{label:24}" + "".join(cells))
    if "cayley_merge_share" in ours:
        print(f"\nCayley transform + merge (forward and backward, timed alone): {ours['cayley_merge_s']:.3f} s "
              f"= {100 * ours['cayley_merge_share']:.1f}% of our step")
    print("\nRatios (targets in brackets)")
    targets = {"step_vs_peft_exact": "<= 0.7", "step_vs_peft_neumann": "<= 0.7", "eval_vs_openai": ">= 1.0",
               "peak_rss_vs_peft_exact": "<= 0.8", "peak_rss_vs_peft_neumann": "<= 0.8", "step_vs_floor": "<= 1.3"}
    for name, value in summary["ratios"].items():
        print(f"  {name:26}{'n/a' if value is None else f'{value:.2f}':>8}  [{targets[name]}]")
    if floor_s:
        print(f"\nFloor: {ours['step_flops'] / 1e12:.2f} TFLOP per step (FlopCounterMode on the warm-up step) / "
              f"{rate / 1e9:.0f} GFLOP/s (best measured fp32 torch.mm) = {floor_s:.2f} s; "
              f"our step is {ours['step_s'] / floor_s:.2f} x the floor")
    if args.json:
        print(json.dumps(summary))


if __name__ == "__main__":
    main()
