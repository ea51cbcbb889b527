"""Benchmark of one OrthCR training step and of eval throughput, side by side with the code a user would
pick instead: OpenAI's `clip/model.py` (eval) and HF `transformers` CLIP + PEFT OFT (training step); the
precision measurement behind train.py's `--precision auto`; and `--gpu-check`, the one-command check of a
CUDA machine.

The reference step: CLIP ViT-B/16 with random weights in the official format; 16 training images at
224x224 plus their 16 Cutout copies (`--cutout`: random, attentive or none); 10 class prompts; adapters on
c_fc and c_proj of every block of both towers (r = 4 blocks, exact Cayley); loss CE + CE + 1.5 KL + 1 KL
against the frozen zero-shot model; one AdamW step. fp32 on the CPU; on CUDA in `--precision` (autocast
dtype for ours and PEFT's alike, fp16 with a GradScaler for both; default: AUTO_CUDA, what train.py's auto
should pick). `--precision bf16|fp16` on the CPU runs CPU autocast, a slow stand-in (its half-precision
matmuls are ~140x slower than fp32 here). Eval: encode_image at batch 16, fp32 on the CPU (OpenAI's fp16
model runs only on CUDA); on CUDA both models in fp16 (OpenAI's own dtype: its build_model converts the
weights to fp16, and ours gets the same weights by `.half()`; no autocast).

Every training step runs in its own subprocess (`bench.py --worker NAME`), so each one's peak memory is its
own; eval throughput of ours and OpenAI's runs in one subprocess, alternating rounds so that machine load
hits both alike, and so do the random and attentive Cutout steps (`cutout`). The HF/PEFT workers run under
this Python when it can import them, else under .bench-venv/bin/python (see requirements-bench.txt); a peer
that is not installed is skipped with a note. FLOPs are counted by torch's FlopCounterMode on each warm-up
step (matmuls, convolutions and attention; the Cayley solves are not counted), and the floor is our step's
FLOPs at the best measured torch.mm rate in the step's precision.

    python bench.py                 # the full run (tens of minutes on a 2-core CPU)
    python bench.py --quick         # the tiny config: a smoke test of every path
    python bench.py --steps 5 --json --device cuda --precision bf16
    python bench.py --only ours_step eval   # a subset of: matmul ours_step cutout eval peft_exact peft_neumann
    python bench.py --only precision        # bf16 and fp16 autocast against fp32 (see worker_precision)
    python bench.py --rounds 5 --only matmul ours_step peft_exact   # ours against PEFT in alternating rounds
    python bench.py --rounds 5 --compile --only ours_step peft_exact   # the same, both torch.compiled

`--rounds N` is the comparison to trust on a shared machine: ours and the peers each build and warm up once in
their own process (so each keeps its own peak memory), then take one step each per round, in ABBA order; the
ratio is the median of the per-round ratios. Ours runs with huge pages for its large tensors, as train.py does
(toolbox/allocator.py; `--allocator default`: without); the peers with the environment bench.py was given, as their
users run them (`THP_MEM_ALLOC_ENABLE=1 python bench.py ...` gives them huge pages too). `--allocator keep` tries
toolbox/allocator.py's experiment for ours.

`--gpu-check` runs, each part guarded so that a failure is reported and the rest still run: the CUDA
property tests (`pytest tests/test_orthcr.py -k cuda`), one ViT-B/16 step in fp32, bf16 and fp16 + scaler
on one batch (the precision worker), the bench in train.py's auto precision, the headline command
`train.py --data eurosat --shots 16` on the EuroSAT sample with a random ViT-B/16 checkpoint, timed by
phase, the data-parallel figures on several GPUs, and our step against PEFT's, both torch.compiled, in 3
alternating rounds (the compile time is in each warm-up). It ends with one JSON line, also written to --out. With `--device cpu` it is a dry run on the tiny
config (a minute or two) that exercises every part. On a device machine, which receives only the repo's
working tree (`../shared` stays behind), the headline command reads the EuroSAT sample shipped in `sample/`
(the same 360 images). Run `make gpu-check GPU_CHECK_OUT=$OUT/gpu-check.json` there, carrying OpenAI's
code `.cache/openai-clip-1.0.1` (its model.py is the eval peer and the parity tests' reference). The image
there has transformers and PEFT; to use requirements-bench.txt's versions instead, download their wheels
into `.cache/whl` here (`pip download --no-deps --only-binary=:all: --python-version 3.12 -d .cache/whl
transformers==5.24.0 peft==0.21.2`), carry it too and begin the command with
`python3 -m pip install -q --no-index --no-deps --target /tmp/site .cache/whl/*.whl && export PYTHONPATH=/tmp/site;`.
"""

import argparse
import contextlib
import importlib.util
import json
import math
import os
import re
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

import clip_min  # noqa: E402
import data  # noqa: E402
import orthcr  # noqa: E402
import train  # noqa: E402
from toolbox import distributed  # noqa: E402
from toolbox import allocator, compiled  # noqa: E402

BENCH_PYTHON = ROOT / ".bench-venv" / "bin" / "python"
BATCH = 16  # training images per step (plus as many Cutout copies) and eval batch
BLOCKS = 4  # r: Cayley blocks per adapted weight
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}  # autocast dtype (None: off)
# what train.py's --precision auto should mean on CUDA, from `bench.py --only precision` (bench_results/
# precision_cpu.txt): fp16 keeps the student-teacher difference of small rotations, bf16 rounds much of it away
AUTO_CUDA = train.resolve_precision("auto", "cuda")
# the precision measurement: bf16/fp16 matmuls run ~140x slower than fp32 on a CPU without AVX512-BF16 or AMX,
# so the CPU measurement takes 4 images; on CUDA the reference batch
PRECISION_IMAGES_CPU = 4
ROTATION_SIZES = (1e-4, 1e-3, 1e-2)  # target max |R - I| of the student's rotations
LOGIT_SCALE = 100.0  # OpenAI's trained checkpoints (clamped at 100); a random model's init is 1 / 0.07
GPU_CHECK_SECONDS = 560  # --gpu-check's budget: under 10 minutes (one device command) with the summary
DEFAULT_RUN = ["matmul", "ours_step", "cutout", "eval", "peft_exact", "peft_neumann", "data_parallel"]
DP_BATCH = 16  # data parallel: the global batch of the 1 vs 2 processes comparison (on GPUs: per device)
DP_EVAL_BATCHES = 4  # data parallel: evaluation batches of BATCH images (on GPUs: per device)


# ----------------------------------------------------------------------------------------------------
# Helpers shared by the workers


def peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


# the precision policy and the training step are train.py's own: the bench measures what users run
resolve_precision = train.resolve_precision  # --precision auto: fp32 on the CPU, AUTO_CUDA on CUDA
grad_scaler = train.grad_scaler  # fp16's GradScaler (starting at train.py's 2^12), disabled otherwise


def autocast(device, precision):
    """train.py's autocast on `device` (on the CPU too: the slow stand-in), off for fp32."""
    return train.autocast(device, precision)


def optimizer_step(loss, optimizer, scaler):
    """PEFT's side of a step, as train.training_step takes ours: the scaled backward, then AdamW."""
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()


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


def reference_batch(config, device, n=BATCH):
    """Images in [0, 1], labels and trimmed class-prompt tokens of the reference step (seeded)."""
    g = torch.Generator().manual_seed(0)
    size = clip_min.CONFIGS[config]["image_resolution"]
    images = torch.rand(n, 3, size, size, generator=g).to(device)
    labels = torch.randint(len(CLASSES), (n,), generator=g).to(device)
    tokens = orthcr.trim_tokens(clip_min.tokenize([f"a photo of a {c}." for c in CLASSES]))  # on the CPU, once
    return images, labels, tokens.to(device)


def memory_figures(device):
    figures = {"peak_rss_mb": peak_rss_mb()}
    if device == "cuda":
        figures["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return figures


_LOG = []  # every line log() printed: --gpu-check writes them to its .txt


def log(*args):
    print(*args, file=sys.stderr, flush=True)
    _LOG.append(" ".join(map(str, args)))


def frozen_model(config, device, seed=0):
    """(model, params): random CLIP in the official format, frozen, and its parameter dict."""
    model = clip_min.random_model(config, seed=seed).to(device)
    model.requires_grad_(False)
    return model, dict(model.state_dict())


# ----------------------------------------------------------------------------------------------------
# Workers: each prints one JSON line on stdout


def worker_matmul(args):
    """The machine's matmul rate in the step's precision: the fastest of 10 runs of a large square torch.mm and
    of the MLP's shape (the fastest, not the median: the floor is what the hardware can do, not what a loaded
    machine did)."""
    rates = matmul_rates(args, repeats=10)
    return {"matmul_flops_per_s": max(rates.values()), "matmul_rates": rates,
            "dtype": str(PRECISIONS[args.precision] or torch.float32)}


def matmul_rates(args, repeats, shapes=("square", "mlp")):
    """{shape: FLOP/s}, the fastest of `repeats` torch.mm of a large square and of the MLP's shape."""
    dtype = PRECISIONS[args.precision] or torch.float32
    c = clip_min.CONFIGS[args.config]
    n = 4096 if not args.quick else 256
    tokens = 2 * BATCH * ((c["image_resolution"] // c["vision_patch_size"]) ** 2 + 1)  # clean + cutout images
    width = c["vision_width"]
    rates = {}
    for name, (m, k, n_) in {"square": (n, n, n), "mlp": (tokens, width, 4 * width)}.items():
        if name not in shapes:
            continue
        a = torch.randn(m, k, device=args.device, dtype=dtype)
        b = torch.randn(k, n_, device=args.device, dtype=dtype)
        torch.mm(a, b)  # warm-up
        rates[name] = 2 * m * k * n_ / min(timed(lambda: torch.mm(a, b), repeats, args.device))
    return rates


def ours_setup(args):
    """Everything one of our steps needs, built once: model, params, adapters, AdamW, scaler, batch, teacher."""
    torch.manual_seed(0)
    model, params = frozen_model(args.config, args.device)
    adapters = orthcr.init_adapters(params, blocks=BLOCKS)
    images, labels, tokens = reference_batch(args.config, args.device)
    with autocast(args.device, args.precision):
        zs_text = orthcr.zero_shot_text_features(model, params, tokens)  # once per class set
    return dict(model=model, params=params, adapters=adapters, images=images, labels=labels, tokens=tokens,
                zs_text=zs_text, optimizer=train.adamw(adapters.values(), lr=1e-5),
                scaler=grad_scaler(args.device, args.precision), generator=torch.Generator().manual_seed(0))


def ours_step(s, args, cutout_mode, objective=None):
    """One training step of ours, train.py's own (train.training_step): objective under autocast, (scaled)
    backward, AdamW. `objective`: orthcr.objective, or its compiled form (--compile)."""
    method = dict(cutout=orthcr.cutout_views(cutout_mode, s["generator"]), transform=train.cayley_transform(0))

    def step():
        train.training_step(s["model"], s["params"], s["adapters"], None, s["images"], s["labels"], s["tokens"],
                            s["zs_text"], s["optimizer"], s["scaler"], args.precision, method,
                            objective=objective or orthcr.objective)
    return step


def worker_ours_step(args):
    s = ours_setup(args)
    step = ours_step(s, args, args.cutout)
    log(f"ours ({args.cutout} Cutout, {args.precision}): warm-up step (counting FLOPs)")
    flops = count_flops(step)  # also the warm-up: AdamW's state, allocator and kernel caches
    times = timed(step, args.steps, args.device)
    memory = memory_figures(args.device)  # before the merge timing below, which allocates more

    # the Cayley transform and merge alone, forward and backward, as they run inside the step
    params, adapters = s["params"], s["adapters"]
    grads = {k: torch.randn_like(params[k]) for k in adapters}

    def cayley_and_merge():
        with autocast(args.device, args.precision):
            merged = orthcr.merge(params, adapters, orthcr.cayley_fast)
        torch.autograd.backward([merged[k] for k in adapters], [grads[k] for k in adapters])
        for P in adapters.values():
            P.grad = None

    cayley_and_merge()
    merge_s = statistics.median(timed(cayley_and_merge, args.steps, args.device))
    step_s = statistics.median(times)
    return {"step_s": step_s, "step_times": times, "step_flops": flops, "cayley_merge_s": merge_s,
            "cayley_merge_share": merge_s / step_s, "trainable": orthcr.count_parameters(adapters),
            "cutout": args.cutout, "precision": args.precision, **memory}


def worker_cutout(args):
    """Attentive against random Cutout: our step with each, alternating in one process (ABBA order, so
    drift in machine load hits both alike); the ratio is the median over rounds of attentive / random, each
    pair timed back to back. Attentive reads the teacher's patch tokens from its clean pass."""
    s = ours_setup(args)
    steps = {mode: ours_step(s, args, mode) for mode in ("random", "attentive")}
    log(f"cutout: warm-up steps ({args.precision}, counting FLOPs)")
    flops = {mode: count_flops(step) for mode, step in steps.items()}  # the work itself, free of machine noise
    times = {mode: [] for mode in steps}
    for i in range(args.steps):
        for mode in (("random", "attentive") if i % 2 == 0 else ("attentive", "random")):
            times[mode] += timed(steps[mode], 1, args.device)
    median = {mode: statistics.median(t) for mode, t in times.items()}
    pairs = [a / r for a, r in zip(times["attentive"], times["random"])]
    return {"random_step_s": median["random"], "attentive_step_s": median["attentive"],
            "attentive_vs_random": statistics.median(pairs), "pair_ratios": pairs, "step_times": times,
            "attentive_vs_random_flops": flops["attentive"] / flops["random"]}


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


def eval_dtype(args):
    """fp16 on CUDA (OpenAI's dtype); fp32 on the CPU, as OpenAI's clip.load does there (its fp16 LayerNorm feeds
    an fp32 input with fp16 weights, which only the CUDA kernel accepts)."""
    return torch.float16 if args.device == "cuda" else torch.float32


def worker_eval(args):
    """encode_image images/s at batch 16 of the merged model in clip_min and, from the same state dict, in
    OpenAI's model.py, both in eval_dtype; rounds alternate between the two so that load affects both alike."""
    dtype = eval_dtype(args)
    state_dict = merged_state_dict(args.config)
    models = {"ours": clip_min.build_model(state_dict).to(args.device, dtype)}  # fp16: the same weights, .half()
    openai = openai_module()
    if openai is not None:
        # our export loads in OpenAI's code as is; its build_model stores fp16 (its own dtype), cast as asked
        models["openai"] = openai.build_model(dict(state_dict)).to(args.device, dtype).eval()
    images = clip_min.normalize(reference_batch(args.config, args.device)[0]).to(dtype)
    times = {name: [] for name in models}
    with torch.inference_mode():
        for model in models.values():
            model.encode_image(images)  # warm-up
        for _ in range(args.steps):
            for name, model in models.items():
                times[name] += timed(lambda: model.encode_image(images), 1, args.device)
    result = {f"{name}_eval_img_s": BATCH / statistics.median(t) for name, t in times.items()}
    result["eval_dtype"] = str(dtype).replace("torch.", "")
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


def pooled(output):
    """get_{image,text}_features' result: a tensor (transformers 4) or an output whose pooler_output it is (5)."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def peft_setup(args, neumann):
    """(step, trainable count) of HF CLIP + PEFT OFT (exact Cayley or Neumann), built once: the peer of ours_step."""
    from peft import OFTConfig, get_peft_model
    from transformers import CLIPModel

    torch.manual_seed(0)
    clip = CLIPModel(hf_clip_config(args.config)).to(args.device).eval()  # random init
    model = get_peft_model(clip, OFTConfig(r=BLOCKS, oft_block_size=0, target_modules=["fc1", "fc2"],
                                           use_cayley_neumann=neumann))
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-5)
    scaler = grad_scaler(args.device, args.precision)
    images, labels, tokens = reference_batch(args.config, args.device)  # tokens trimmed: the same work as ours
    with torch.no_grad(), model.disable_adapter(), autocast(args.device, args.precision):
        zs_text = pooled(clip.get_text_features(input_ids=tokens)).float()  # once per class set
    generator = torch.Generator().manual_seed(0)

    def teacher_image_features(x):  # the frozen model's class features and patch tokens, as ours (dense=True)
        vision = clip.vision_model
        tokens_out = clip.visual_projection(vision.post_layernorm(vision(pixel_values=x).last_hidden_state))
        return tokens_out[:, 0], tokens_out[:, 1:]

    def step_loss():  # the same loss as orthcr.objective: teacher views without gradient, then the student
        with torch.no_grad(), model.disable_adapter():
            if args.cutout == "attentive":
                clean, patches = teacher_image_features(clip_min.normalize(images))
                cut = orthcr.attentive_cutout(images, orthcr.similarity_map(patches, zs_text[labels]),
                                             generator=generator)
                teacher = torch.cat([clean, teacher_image_features(clip_min.normalize(cut))[0]])
            else:
                cut = orthcr.cutout(images, generator) if args.cutout == "random" else None
                views = images if cut is None else torch.cat([images, cut])
                teacher = pooled(clip.get_image_features(pixel_values=clip_min.normalize(views)))
            zs = orthcr.clip_logits(teacher, zs_text, clip.logit_scale)
        x = clip_min.normalize(images if cut is None else torch.cat([images, cut]))  # clean, cutout
        text = pooled(clip.get_text_features(input_ids=tokens))
        logits = orthcr.clip_logits(pooled(clip.get_image_features(pixel_values=x)), text, clip.logit_scale)
        if cut is None:
            loss, _ = orthcr.orthcr_loss(logits, None, zs, None, labels)
        else:
            loss, _ = orthcr.orthcr_loss(logits[:BATCH], logits[BATCH:], zs[:BATCH], zs[BATCH:], labels)
        return loss

    if getattr(args, "compile", False):  # compiled over the same scope as ours: the loss, forward and backward
        step_loss = compiled.compile_objective(step_loss, args.device)

    def step():
        with autocast(args.device, args.precision):
            loss = step_loss()
        optimizer_step(loss, optimizer, scaler)

    return step, sum(p.numel() for p in trainable)


def worker_peft_step(args, neumann):
    step, trainable = peft_setup(args, neumann)
    log(f"peft {'neumann' if neumann else 'exact'} ({args.cutout} Cutout, {args.precision}): warm-up step "
        f"(counting FLOPs)")
    flops = count_flops(step)
    times = timed(step, args.steps, args.device)
    return {"step_s": statistics.median(times), "step_times": times, "step_flops": flops,
            "trainable": trainable, "cutout": args.cutout, "precision": args.precision,
            **memory_figures(args.device)}


# ----------------------------------------------------------------------------------------------------
# The precision measurement: what bf16 and fp16 autocast do to the figures that define the method


def errors(x, reference):
    """max |x - ref| and ||x - ref|| / ||ref|| (Frobenius), in fp64."""
    d = x.double() - reference.double()
    return {"max_abs": d.abs().max().item(), "rel": (d.norm() / reference.double().norm()).item()}


def agreement(x, reference):
    """||x - ref|| / ||ref|| and the cosine between x and ref, both flattened, in fp64."""
    x, reference = x.double().flatten(), reference.double().flatten()
    return {"rel_err": ((x - reference).norm() / reference.norm()).item(),
            "cosine": F.cosine_similarity(x, reference, dim=0).item()}


def max_rotation(adapters):
    """max |R - I| over every block of every adapter (exact Cayley, fp32)."""
    with torch.no_grad():
        R = orthcr.rotations(adapters)
        return max((r - torch.eye(r.shape[-1], device=r.device)).abs().max().item() for r in R.values())


def adapters_of_size(params, size, seed=1):
    """Adapters along one seeded random direction, scaled so that max |R - I| is `size` (R - I ~ 2 skew(P) is
    nearly linear in the scale: two corrections suffice)."""
    g = torch.Generator().manual_seed(seed)
    direction = {k: torch.randn(P.shape, generator=g).to(P.device)
                 for k, P in orthcr.init_adapters(params, blocks=BLOCKS).items()}
    scale = 1e-5
    for _ in range(2):
        scale *= size / max_rotation({k: scale * d for k, d in direction.items()})
    return {k: (scale * d).requires_grad_() for k, d in direction.items()}


def rounding_figures(params, merged, keys, dtype):
    """What autocast's cast of the adapted weights keeps of W - W0: the share of entries that round to W0's
    value, and ||(round(W) - round(W0)) - (W - W0)|| / ||W - W0||."""
    equal = total = error2 = diff2 = 0.0
    for k in keys:
        W0, W = params[k].float(), merged[k].float()
        diff, rounded = W - W0, W.to(dtype).float() - W0.to(dtype).float()
        equal += (rounded == 0).sum().item()
        total += W.numel()
        error2 += (rounded - diff).double().pow(2).sum().item()
        diff2 += diff.double().pow(2).sum().item()
    return {"weights_rounded_to_w0": equal / total, "weight_diff_rel_err": (error2 / diff2) ** 0.5}


def worker_precision(args):
    """bf16 and fp16 autocast against fp32 on one batch (PRECISION_IMAGES_CPU images on the CPU, BATCH on CUDA):
    (1) L2-normalized image and text features and logits of the frozen model; (2) the student-minus-teacher
    logits at rotations of max |R - I| = ROTATION_SIZES (student: merged weights; teacher: W0; same images, same
    precision), the figure a precision must keep for the KL terms to see the finetuning; (3) the loss of
    orthcr.objective (random Cutout, generator seed 0) and its gradient w.r.t. the adapters at the 1e-3 rotation,
    the whole loss's and the KL terms' alone (fp16 scaled as GradScaler does: scaled_grad); (4) on CUDA or with
    --quick, timed AdamW steps and peak CUDA memory per precision. Logit scale 100, as OpenAI's trained models."""
    device = args.device
    n = PRECISION_IMAGES_CPU if device == "cpu" else BATCH
    model, params = frozen_model(args.config, device)
    params["logit_scale"] = torch.tensor(math.log(LOGIT_SCALE), device=device)
    images, labels, tokens = reference_batch(args.config, device, n)
    students = {size: adapters_of_size(params, size) for size in ROTATION_SIZES}
    with torch.no_grad():
        merged = {size: orthcr.merge(params, a) for size, a in students.items()}  # fp32, as in the step
    result = {"config": args.config, "device": device, "images": n, "classes": len(CLASSES),
              "logit_scale": LOGIT_SCALE, "rotations": {}, "forward": {}, "difference": {}, "loss": {}, "grad": {},
              "grad_kl": {}, "steps": {}}
    for size, a in students.items():
        keys = list(a)
        W0 = torch.cat([params[k].flatten() for k in keys])
        W = torch.cat([merged[size][k].flatten() for k in keys])
        result["rotations"][str(size)] = {"max_R_minus_I": max_rotation(a),
                                          "rel_weight_change": ((W - W0).norm() / W0.norm()).item(),
                                          **{p: rounding_figures(params, merged[size], keys, PRECISIONS[p])
                                             for p in ("bf16", "fp16")}}

    def forward(p, precision):
        with torch.no_grad(), autocast(device, precision):
            image = orthcr.encode_image(model, p, clip_min.normalize(images)).float()
            text = orthcr.encode_text(model, p, tokens).float()
        return F.normalize(image, dim=-1), F.normalize(text, dim=-1), orthcr.clip_logits(image, text, p["logit_scale"])

    grad_at = 1e-3
    figures = {}
    for precision in PRECISIONS:  # fp32 first: the reference
        t0 = time.perf_counter()
        log(f"precision {precision}: forward at W0 and at {len(ROTATION_SIZES)} rotations")
        teacher = forward(params, precision)
        differences = {size: forward(merged[size], precision)[2] - teacher[2] for size in ROTATION_SIZES}
        log(f"precision {precision}: loss and gradient at max |R - I| = {grad_at:g}")
        with autocast(device, precision):
            zs_text = orthcr.zero_shot_text_features(model, params, tokens)
            adapters = students[grad_at]
            loss, terms = orthcr.objective(model, params, adapters, images, labels, tokens, zs_text,
                                           cutout=orthcr.cutout_views("random", torch.Generator().manual_seed(0)),
                                           transform=orthcr.cayley_fast)
        regularizer = orthcr.LAMBDA1 * terms["kl"] + orthcr.LAMBDA2 * terms["kl_cutout"]  # the KL part alone
        grad, scale, finite = scaled_grad(loss, list(adapters.values()), precision == "fp16")
        grad_kl, scale_kl, finite_kl = scaled_grad(regularizer, list(adapters.values()), precision == "fp16")
        figures[precision] = dict(teacher=teacher, differences=differences, loss=loss.item(),
                                  terms={k: v.item() for k, v in terms.items()}, grad=grad, scale=scale,
                                  finite=finite, grad_kl=grad_kl, scale_kl=scale_kl, finite_kl=finite_kl)
        del loss, terms, regularizer
        log(f"precision {precision}: {time.perf_counter() - t0:.0f} s")
        if device == "cuda" or args.quick:  # a CPU bf16/fp16 step of ViT-B/16 takes many minutes
            result["steps"][precision] = timed_steps(args, model, params, images, labels, tokens, zs_text,
                                                     students[grad_at], precision)

    reference = figures["fp32"]
    result["loss"]["fp32"] = {"value": reference["loss"], "terms": reference["terms"]}
    for precision in ("bf16", "fp16"):
        f = figures[precision]
        result["forward"][precision] = {name: errors(x, ref) for name, x, ref in
                                        zip(("image_features", "text_features", "logits"), f["teacher"],
                                            reference["teacher"])}
        result["difference"][precision] = {
            str(size): {**agreement(f["differences"][size], reference["differences"][size]),
                        "fp32_norm": reference["differences"][size].norm().item()} for size in ROTATION_SIZES}
        result["loss"][precision] = {"value": f["loss"], "terms": f["terms"],
                                     "abs_err": abs(f["loss"] - reference["loss"]),
                                     "rel_err": abs(f["loss"] - reference["loss"]) / abs(reference["loss"]),
                                     "kl_rel_err": abs(f["terms"]["kl"] - reference["terms"]["kl"])
                                     / abs(reference["terms"]["kl"])}
        result["grad"][precision] = {**agreement(f["grad"], reference["grad"]), "loss_scale": f["scale"],
                                     "finite": f["finite"]}
        result["grad_kl"][precision] = {**agreement(f["grad_kl"], reference["grad_kl"]),
                                        "loss_scale": f["scale_kl"], "finite": f["finite_kl"]}
    return result


def scaled_grad(output, inputs, fp16):
    """d output / d inputs, flattened into one vector; for fp16 as GradScaler gets it: the output scaled by 2^16
    (its initial scale), lowered until the gradient is finite (any scale without overflow gives the same one).
    Returns (gradient, scale, finite)."""
    scale = 2.0 ** 16 if fp16 else 1.0
    while True:
        grads = torch.autograd.grad(output * scale, inputs, retain_graph=True)
        finite = all(g.isfinite().all() for g in grads)
        if finite or scale <= 1:
            return torch.cat([g.flatten() for g in grads]) / scale, scale, finite
        scale /= 16


def timed_steps(args, model, params, images, labels, tokens, zs_text, start, precision):
    """A warm-up and `args.steps` timed AdamW steps from a copy of `start`, train.py's way; peak CUDA memory."""
    adapters = {k: P.detach().clone().requires_grad_() for k, P in start.items()}
    optimizer = train.adamw(adapters.values(), lr=1e-5)
    scaler = grad_scaler(args.device, precision)
    generator = torch.Generator().manual_seed(0)
    if args.device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()

    method = dict(cutout=orthcr.cutout_views("random", generator), transform=train.cayley_transform(0))

    def step():
        train.training_step(model, params, adapters, None, images, labels, tokens, zs_text, optimizer, scaler,
                            precision, method)

    step()
    times = timed(step, max(args.steps, 1), args.device)
    figures = {"step_s": statistics.median(times), "step_times": times}
    if args.device == "cuda":
        figures["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return figures


# ----------------------------------------------------------------------------------------------------
# Data parallelism (train.py under torchrun): 1 process against N, alternating launches in one run


def worker_data_parallel(args):
    """One process of the data-parallel measurement, as torchrun starts it (alone: one process, no group): our
    training step, train.py's own, on this process's slice of a global batch of --dp-batch images (its loss weighted
    by its share, the gradients all-reduced), and the evaluation's `predict` on its share of --dp-eval-batches
    batches of BATCH images with the correct counts summed, as train.evaluate does. Rank 0 prints the JSON."""
    device = distributed.start(args.device)  # cuda:LOCAL_RANK under torchrun
    rank, size = distributed.rank(), distributed.size()
    torch.manual_seed(0)
    model, params = frozen_model(args.config, device)
    adapters = orthcr.init_adapters(params, blocks=BLOCKS)
    images, labels, tokens = reference_batch(args.config, device, args.dp_batch)
    mine = range(rank * args.dp_batch // size, (rank + 1) * args.dp_batch // size)  # as data.train_batches slices
    with autocast(device, args.precision):
        zs_text = orthcr.zero_shot_text_features(model, params, tokens)
    optimizer, scaler = torch.optim.AdamW(adapters.values(), lr=1e-5), grad_scaler(device, args.precision)
    kind = torch.device(device).type

    def step():
        holes = data.image_generators(0, 0, mine, data.CUTOUT_STREAM)
        method = dict(cutout=orthcr.cutout_views("random", holes), transform=train.cayley_transform(0))
        train.training_step(model, params, adapters, None, images[mine.start:mine.stop], labels[mine.start:mine.stop],
                            tokens, zs_text, optimizer, scaler, args.precision, method, share=len(mine) / args.dp_batch)

    cfg = argparse.Namespace(device=device, precision=args.precision)
    test = clip_min.normalize(reference_batch(args.config, device)[0])  # one batch of BATCH, encoded again

    def evaluate():
        correct = torch.zeros(1, dtype=torch.int64)
        for _ in range(rank, args.dp_eval_batches, size):  # every size-th batch, as data.eval_batches shards
            correct += int((train.predict(model, params, test, zs_text, cfg).cpu() == 0).sum())
        if distributed.active():
            torch.distributed.all_reduce(correct)

    figures = {"processes": size, "threads": torch.get_num_threads(), "device": device, "batch": args.dp_batch,
               "eval_images": args.dp_eval_batches * BATCH}
    for name, fn in (("step", step), ("eval", evaluate)):
        fn()  # warm-up
        if distributed.active():
            torch.distributed.barrier()
        figures[f"{name}_times"] = timed(fn, args.steps, kind)
    figures["step_s"] = statistics.median(figures["step_times"])
    figures["train_img_s"] = args.dp_batch / figures["step_s"]
    figures["eval_img_s"] = figures["eval_images"] / statistics.median(figures["eval_times"])
    distributed.stop()
    return figures if rank == 0 else None


def data_parallel(args, processes, deadline=None, rounds=2, per_process=False):
    """train.py's data parallelism, 1 process against each of `processes`, measured in one run: torchrun launches
    alternate (1, N, N, 1, ...) so that machine load hits both alike. Fixed work (`per_process` False: the CPU's
    question, the same --batch-size on more processes) or fixed work per process (True: what each added GPU
    brings). Ratios against 1 process: step time, training and evaluation images/s, and images/s per added
    process."""
    counts = sorted({1, *processes})
    times = {n: [] for n in counts}
    order = [n for r in range(rounds) for n in (counts if r % 2 == 0 else counts[::-1])]
    for n in order:
        batch = DP_BATCH * (n if per_process else 1)
        eval_batches = DP_EVAL_BATCHES * (n if per_process else 1)
        with socket_port() as port:
            command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n), "--master_port",
                       str(port), str(Path(__file__).resolve()), "--worker", "data_parallel", "--device", args.device,
                       "--steps", str(args.steps), "--precision", args.precision, "--dp-batch", str(batch),
                       "--dp-eval-batches", str(eval_batches)] + (["--quick"] if args.quick else [])
        log(f"data parallel: {n} process{'es' * (n > 1)}, batch {batch}, {eval_batches} eval batches")
        timeout = None if deadline is None else max(deadline - time.monotonic(), 1)
        env = {**os.environ, "OMP_NUM_THREADS": "1"} if args.device == "cpu" else None  # 1 core per process,
        # as torchrun sets for several: the ratio is the processes', not threads' (which oversubscribe a loaded CPU)
        done = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=timeout,
                              env=env)
        if done.returncode != 0:
            raise RuntimeError(f"{n} processes: exit code {done.returncode}: {done.stderr.strip()[-500:]}")
        times[n].append(json.loads([line for line in done.stdout.splitlines() if line.startswith("{")][-1]))
    runs = {n: {"processes": n, "threads": r[0]["threads"], "batch": r[0]["batch"], "eval_images": r[0]["eval_images"],
                "step_s": statistics.median(x["step_s"] for x in r),
                "train_img_s": statistics.median(x["train_img_s"] for x in r),
                "eval_img_s": statistics.median(x["eval_img_s"] for x in r)} for n, r in times.items()}
    one = runs[1]
    ratios = {n: {"step_s": runs[n]["step_s"] / one["step_s"], "train_img_s": runs[n]["train_img_s"] / one["train_img_s"],
                  "eval_img_s": runs[n]["eval_img_s"] / one["eval_img_s"]} for n in counts if n > 1}
    added = {n: {"train_img_s": (runs[n]["train_img_s"] - one["train_img_s"]) / (n - 1),
                 "eval_img_s": (runs[n]["eval_img_s"] - one["eval_img_s"]) / (n - 1)} for n in counts if n > 1}
    return {"scaling": "per process" if per_process else "fixed work", "runs": runs, "vs_1": ratios,
            "per_added_process": added, "rounds": rounds, "device": args.device, "config": args.config}


@contextlib.contextmanager
def socket_port():
    """A free TCP port for torchrun's rendezvous (released just before torchrun binds it)."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    yield port


def print_data_parallel(d):
    print(f"\nData parallel ({d['device']}, {d['config']}, {d['scaling']}; medians of {d['rounds']} alternating "
          f"launches):")
    print(f"{'processes':>10}{'threads':>9}{'batch':>7}{'step s':>9}{'train img/s':>13}{'eval img/s':>12}")
    for r in d["runs"].values():
        print(f"{r['processes']:>10}{r['threads']:>9}{r['batch']:>7}{r['step_s']:>9.3f}{r['train_img_s']:>13.1f}"
              f"{r['eval_img_s']:>12.1f}")
    for n, ratio in d["vs_1"].items():
        add = d["per_added_process"][n]
        print(f"  {n} vs 1: step time x{ratio['step_s']:.2f}, training images/s x{ratio['train_img_s']:.2f}, "
              f"evaluation images/s x{ratio['eval_img_s']:.2f}; per added process: {add['train_img_s']:+.1f} "
              f"training, {add['eval_img_s']:+.1f} evaluation images/s")


# The alternation (--rounds): the training steps of ours and the peers, one at a time, round by round


def round_step(name, args):
    """(step, trainable count) of contestant `name` of the alternation, built once in its own process."""
    if name == "ours_step":
        s = ours_setup(args)
        objective = compiled.compile_objective(orthcr.objective, args.device) if args.compile else orthcr.objective
        return ours_step(s, args, args.cutout, objective), orthcr.count_parameters(s["adapters"])
    return peft_setup(args, neumann=name == "peft_neumann")


def serve_rounds(args):
    """A contestant of the alternation: builds its step, warms it up (counting FLOPs; with --compile, the
    compilation, timed), answers "ready"; then one timed step per "step" line on stdin, answered by its seconds;
    "done" answers with this process's peak memory, its own alone. One JSON line per answer on stdout."""
    name = args.worker
    flops = None
    if args.compile:  # FlopCounterMode does not see through dynamo: the FLOPs of the same step, eager, first
        eager = argparse.Namespace(**{**vars(args), "compile": False})
        step, _ = round_step(name, eager)
        log(f"{name} ({args.cutout} Cutout, {args.precision}): an eager step, counting its FLOPs")
        flops = count_flops(step)
        del step
    step, trainable = round_step(name, args)
    log(f"{name} ({args.cutout} Cutout, {args.precision}{', compiled' if args.compile else ''}): warm-up step")
    start = time.perf_counter()
    if args.compile:
        step()  # the compilation (forward and backward graphs) and one step
    else:
        flops = count_flops(step)
    warm_up_s = time.perf_counter() - start
    print(json.dumps({"ready": name, "step_flops": flops, "warm_up_s": warm_up_s, "trainable": trainable}),
          flush=True)
    for line in sys.stdin:
        if line.strip() == "step":  # ours also measures the matmul rate right after: the round's own floor
            answer = {"s": timed(step, 1, args.device)[0]}
            if name == "ours_step":
                answer["matmul_flops_per_s"] = matmul_rates(args, repeats=3, shapes=("square",))["square"]
            print(json.dumps(answer), flush=True)
        elif line.strip() == "done":
            break
    print(json.dumps(memory_figures(args.device)), flush=True)


WORKERS = {
    "matmul": worker_matmul,
    "ours_step": worker_ours_step,
    "cutout": worker_cutout,
    "eval": worker_eval,
    "peft_exact": lambda args: worker_peft_step(args, neumann=False),
    "peft_neumann": lambda args: worker_peft_step(args, neumann=True),
    "precision": worker_precision,
    "data_parallel": worker_data_parallel,
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


def run_worker(name, args, timeout=None):
    """The worker's JSON result; {"skipped": why} or {"failed": why} instead of raising, so a run goes on."""
    python, why = interpreter(name)
    if python is None:
        log(f"skipping {name}: {why}")
        return {"skipped": why}
    command = worker_command(name, python, args)
    log(f"running {name} ({python})")
    try:  # stderr (progress) passes through
        done = subprocess.run(command, stdout=subprocess.PIPE, text=True, timeout=timeout, env=worker_env(name, args))
    except subprocess.TimeoutExpired:
        log(f"worker {name} ran past {timeout:.0f} s")
        return {"failed": f"ran past {timeout:.0f} s"}
    if done.returncode != 0:
        log(f"worker {name} failed with exit code {done.returncode}")
        return {"failed": f"exit code {done.returncode}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def ratio(a, b):
    return a / b if a and b else None


def worker_env(name, args):
    """The environment of worker `name`: ours as train.py runs (huge pages for large CPU tensors, unless
    --allocator says otherwise or the environment already does), the peers' as bench.py was given it."""
    env = dict(os.environ)
    if not name.startswith("peft"):
        if args.allocator == "huge-pages":
            allocator.use_huge_pages(env)
        else:
            env.setdefault(allocator.HUGE_PAGES, "0")
    return env


def worker_command(name, python, args):
    return [str(python), str(Path(__file__).resolve()), "--worker", name, "--device", args.device,
            "--steps", str(args.steps), "--precision", args.precision, "--cutout", args.cutout,
            "--allocator", args.allocator] + (["--quick"] if args.quick else []) + \
        (["--compile"] if args.compile else [])


def run_rounds(args, names):
    """The training steps of `names` (ours_step first, then peers) in alternating rounds: each contestant in
    its own process (its own peak memory), built and warmed up once; then `args.rounds` rounds of one step
    each, the order reversed every other round (ABBA), so that drift in machine load hits all alike. Per round
    the ratio ours / peer; the median of those ratios is the comparison (medians of separate runs minutes
    apart drift by +-8 % on a shared machine)."""
    procs, ready, skipped = {}, {}, {}
    for name in names:
        python, why = interpreter(name)
        if python is None:
            log(f"skipping {name}: {why}")
            skipped[name] = why
            continue
        log(f"starting {name} ({python})")
        procs[name] = subprocess.Popen(worker_command(name, python, args) + ["--serve"], stdin=subprocess.PIPE,
                                       stdout=subprocess.PIPE, text=True, bufsize=1, env=worker_env(name, args))

    def answer(name):
        line = procs[name].stdout.readline()
        if not line:
            raise RuntimeError(f"worker {name} ended with exit code {procs[name].wait()}")
        return json.loads(line)

    try:
        for name in procs:  # the set-ups and warm-ups run side by side; only the rounds are timed
            ready[name] = answer(name)
        times, rates = {name: [] for name in procs}, []
        order = list(procs)
        for i in range(args.rounds):
            for name in (order if i % 2 == 0 else order[::-1]):
                procs[name].stdin.write("step\n")
                reply = answer(name)
                times[name].append(reply["s"])
                if "matmul_flops_per_s" in reply:
                    rates.append(reply["matmul_flops_per_s"])
            log(f"round {i + 1}/{args.rounds}: " + ", ".join(f"{n} {t[-1]:.3f} s" for n, t in times.items()))
        memory = {}
        for name in procs:
            procs[name].stdin.write("done\n")
            memory[name] = answer(name)
    finally:
        for proc in procs.values():
            proc.stdin.close()
            proc.wait()
    result = {name: {**ready[name], "step_s": statistics.median(times[name]), "step_times": times[name],
                     **memory[name]} for name in procs}
    if rates and ready.get("ours_step", {}).get("step_flops"):  # each round's step against that round's floor
        flops = ready["ours_step"]["step_flops"]
        result["ours_step"]["round_matmul_flops_per_s"] = rates
        result["ours_step"]["floor_per_round"] = [t * rate / flops for t, rate in zip(times["ours_step"], rates)]
    ours = times.get("ours_step")
    for name in procs:
        if name != "ours_step" and ours:
            per_round = [a / b for a, b in zip(ours, times[name])]
            result[name]["ours_per_round"] = per_round
            result[name]["ours_ratio"] = statistics.median(per_round)
    return {**result, **{name: {"skipped": why} for name, why in skipped.items()}}


def run_bench(args, names, deadline=None):
    """Run the workers `names` and collect the summary the table and --json print."""
    r = {}
    stepping = [n for n in ("ours_step", "peft_exact", "peft_neumann") if n in names] if args.rounds else []
    for name in names:
        if name in stepping:
            continue  # measured together below
        timeout = None if deadline is None else max(deadline - time.monotonic(), 1)
        r[name] = run_worker(name, args, timeout)
    if stepping:
        r.update(run_rounds(args, stepping))
    ours, exact, neumann = r.get("ours_step", {}), r.get("peft_exact", {}), r.get("peft_neumann", {})
    ev, cut = r.get("eval", {}), r.get("cutout", {})
    rate = r.get("matmul", {}).get("matmul_flops_per_s")
    floor_s = ours["step_flops"] / rate if rate and ours.get("step_flops") else None  # None: compiled, not counted
    memory = "peak_cuda_mb" if args.device == "cuda" else "peak_rss_mb"
    return {
        "config": args.config, "device": args.device, "precision": args.precision, "cutout": args.cutout,
        "eval_dtype": ev.get("eval_dtype"), "torch": torch.__version__, "threads": torch.get_num_threads(),
        "step_s": ours.get("step_s"), "eval_img_s": ev.get("ours_eval_img_s"), "peak_rss_mb": ours.get("peak_rss_mb"),
        "peak_cuda_mb": ours.get("peak_cuda_mb"), "cayley_merge_share": ours.get("cayley_merge_share"),
        "step_flops": ours.get("step_flops"), "matmul_flops_per_s": rate, "floor_s": floor_s,
        "rounds": args.rounds, "compile": args.compile, "allocator": args.allocator,
        "ratios": {  # with --rounds, the median of the per-round ratios
            "step_vs_peft_exact": exact.get("ours_ratio") or ratio(ours.get("step_s"), exact.get("step_s")),
            "step_vs_peft_neumann": neumann.get("ours_ratio") or ratio(ours.get("step_s"), neumann.get("step_s")),
            "eval_vs_openai": ratio(ev.get("ours_eval_img_s"), ev.get("openai_eval_img_s")),
            "memory_vs_peft_exact": ratio(ours.get(memory), exact.get(memory)),
            "memory_vs_peft_neumann": ratio(ours.get(memory), neumann.get(memory)),
            "step_vs_floor": statistics.median(ours["floor_per_round"]) if ours.get("floor_per_round")
            else ratio(ours.get("step_s"), floor_s),  # with --rounds: each round against its own matmul rate
            "attentive_vs_random": cut.get("attentive_vs_random"),
        },
        "runs": r,
    }


def print_bench(summary, args):
    r = summary["runs"]
    ours, ev, cut = r.get("ours_step", {}), r.get("eval", {}), r.get("cutout", {})
    precision = args.precision + (" + GradScaler" if args.precision == "fp16" else "")
    how = f"median of {args.rounds} alternating rounds" if args.rounds else f"median of {args.steps}"
    print(f"\nOrthCR reference step: {args.config}, batch {BATCH} + {BATCH} {args.cutout} Cutout, {len(CLASSES)} "
          f"classes, r = {BLOCKS}, {args.device} ({precision}{', torch.compile' if args.compile else ', eager'}; "
          f"eval {summary['eval_dtype'] or 'not run'}), torch {torch.__version__}, {torch.get_num_threads()} "
          f"threads, {how} after a warm-up; allocator: {args.allocator} (ours)")
    memory = "peak_cuda_mb" if args.device == "cuda" else "peak_rss_mb"
    failed = {k: ev[k] for k in ("failed", "skipped") if k in ev}  # the eval worker's own fate, if any
    openai_eval = {"eval_img_s": ev["openai_eval_img_s"]} if "openai_eval_img_s" in ev else \
        {"skipped": ev["openai_skipped"]} if "openai_skipped" in ev else failed
    rows = [("ours (orthcr)", ours, {"eval_img_s": ev["ours_eval_img_s"]} if "ours_eval_img_s" in ev else failed),
            ("OpenAI clip/model.py", {}, openai_eval), ("HF + PEFT OFT exact", r.get("peft_exact", {}), {}),
            ("HF + PEFT OFT Neumann", r.get("peft_neumann", {}), {})]
    if any(step or e for _, step, e in rows):
        print(f"{'':24}{'step s':>9}{'GFLOP/step':>12}{'peak MB':>10}{'eval img/s':>12}")
    for label, step, e in rows:
        if not step and not e:
            continue  # not run
        why = step.get("skipped") or step.get("failed") or e.get("skipped") or e.get("failed")
        if why:
            print(f"{label:24}{'skipped' if step.get('skipped') or e.get('skipped') else 'failed'}: {why}")
            continue
        cells = [f"{step['step_s']:9.3f}" if "step_s" in step else f"{'':9}",
                 f"{step['step_flops'] / 1e9:12.0f}" if step.get("step_flops") else f"{'':12}",
                 f"{step[memory]:10.0f}" if memory in step else f"{'':10}",
                 f"{e['eval_img_s']:12.2f}" if "eval_img_s" in e else ""]
        print(f"{label:24}" + "".join(cells))
    if "cayley_merge_share" in ours:
        print(f"\nCayley transform + merge (forward and backward, timed alone): {ours['cayley_merge_s']:.3f} s "
              f"= {100 * ours['cayley_merge_share']:.1f}% of our step")
    if "attentive_vs_random" in cut:
        print(f"Attentive vs random Cutout (our step, alternating in one process): {cut['attentive_step_s']:.3f} s "
              f"vs {cut['random_step_s']:.3f} s (medians); attentive / random per round: "
              + " ".join(f"{x:.3f}" for x in cut["pair_ratios"]) + f"; FLOPs {cut['attentive_vs_random_flops']:.4f}x")
    for name in ("peft_exact", "peft_neumann"):
        if "ours_per_round" in r.get(name, {}):
            peer = r[name]
            print(f"Alternating rounds, ours / {name} per round: " + " ".join(f"{x:.3f}" for x in peer["ours_per_round"])
                  + f" (median {peer['ours_ratio']:.3f}); seconds ours " + " ".join(f"{x:.2f}" for x in ours["step_times"])
                  + f", {name} " + " ".join(f"{x:.2f}" for x in peer["step_times"]))
    if args.compile and "warm_up_s" in ours:
        print("Warm-up step with compilation: " + ", ".join(f"{n} {r[n]['warm_up_s']:.1f} s" for n in r
                                                           if "warm_up_s" in r.get(n, {})))
    print(f"\nRatios (targets of issue #22 in brackets; memory: {memory})")
    targets = {"step_vs_peft_exact": "<= 0.85", "step_vs_peft_neumann": "<= 0.85", "eval_vs_openai": ">= 1.0",
               "memory_vs_peft_exact": "<= 0.85", "memory_vs_peft_neumann": "<= 0.85", "step_vs_floor": "<= 1.6",
               "attentive_vs_random": "<= 1.05"}
    for name, value in summary["ratios"].items():
        print(f"  {name:26}{'n/a' if value is None else f'{value:.2f}':>8}  [{targets[name]}]")
    if summary["floor_s"]:
        rate = summary["matmul_flops_per_s"]
        print(f"\nFloor: {ours['step_flops'] / 1e12:.2f} TFLOP per step (FlopCounterMode on the warm-up step) / "
              f"{rate / 1e9:.0f} GFLOP/s (best measured {r['matmul']['dtype'].replace('torch.', '')} torch.mm) = "
              f"{summary['floor_s']:.2f} s; our step is {ours['step_s'] / summary['floor_s']:.2f} x the floor")
    if ours.get("floor_per_round"):
        print("Each round against its own floor (a square torch.mm timed right after our step): " +
              " ".join(f"{x:.2f}" for x in ours["floor_per_round"]) + f" (median {summary['ratios']['step_vs_floor']:.2f}"
              "; the ratio above); matmul GFLOP/s " + " ".join(f"{x / 1e9:.0f}" for x in ours["round_matmul_flops_per_s"]))


def print_precision(p):
    print(f"\nPrecision: {p['config']}, {p['device']} autocast, {p['images']} images (+ {p['images']} Cutout for the "
          f"loss), {p['classes']} classes, logit scale {p['logit_scale']:.0f}; every figure against fp32 on the "
          f"same batch")
    print(f"{'':34}{'bf16':>22}{'fp16':>22}")
    print(f"{'frozen model (W0)':34}{'max abs / rel':>22}{'max abs / rel':>22}")
    for name in ("image_features", "text_features", "logits"):
        cells = "".join(f"{e['max_abs']:>11.2e} / {e['rel']:<8.1e}" for e in
                        (p["forward"][q][name] for q in ("bf16", "fp16")))
        print(f"  {name + (' (L2-normalized)' if 'features' in name else ''):32}{cells}")
    loss = p["loss"]
    print(f"  {'loss (fp32 ' + format(loss['fp32']['value'], '.4f') + ')':32}" +
          "".join(f"{loss[q]['abs_err']:>11.2e} / {loss[q]['rel_err']:<8.1e}" for q in ("bf16", "fp16")))
    print(f"  {'KL term (fp32 ' + format(loss['fp32']['terms']['kl'], '.2e') + ')':32}" +
          "".join(f"{'':>11}   {loss[q]['kl_rel_err']:<8.1e}" for q in ("bf16", "fp16")))
    print(f"{'gradient w.r.t. the adapters':34}{'cosine / rel err':>22}{'cosine / rel err':>22}")
    for label, key in (("(at max |R - I| = 1e-3)", "grad"), ("KL terms alone", "grad_kl")):
        print(f"  {label:32}" + "".join(f"{g['cosine']:>11.4f} / {g['rel_err']:<8.1e}"
                                        for g in (p[key][q] for q in ("bf16", "fp16"))))
    print(f"  fp16 loss scale: {p['grad']['fp16']['loss_scale']:.0f}, KL terms alone "
          f"{p['grad_kl']['fp16']['loss_scale']:.0f} (GradScaler starts at 65536)")
    print("\nStudent minus teacher logits (merged weights minus W0, same images, same precision) against fp32:")
    print(f"{'target':>8}{'max|R-I|':>10}{'|dW|/|W0|':>11}{'|d fp32|':>10}"
          f"{'bf16 rel err':>14}{'cosine':>8}{'W=W0':>7}{'fp16 rel err':>14}{'cosine':>8}{'W=W0':>7}")
    for size, rot in p["rotations"].items():
        d = {q: p["difference"][q][size] for q in ("bf16", "fp16")}
        print(f"{float(size):>8.0e}{rot['max_R_minus_I']:>10.2e}{rot['rel_weight_change']:>11.2e}"
              f"{d['bf16']['fp32_norm']:>10.3f}" +
              "".join(f"{d[q]['rel_err']:>14.3f}{d[q]['cosine']:>8.3f}{100 * rot[q]['weights_rounded_to_w0']:>6.0f}%"
                      for q in ("bf16", "fp16")))
    print("  (W=W0: share of adapted weight entries that round to W0's value when autocast casts them)")
    if p["steps"]:
        print("\nSteps (AdamW, train.py's way; fp16 with GradScaler):")
        for q, s in p["steps"].items():
            extra = f", peak {s['peak_cuda_mb']:.0f} MB" if "peak_cuda_mb" in s else ""
            print(f"  {q}: {s['step_s']:.3f} s{extra}")


# ----------------------------------------------------------------------------------------------------
# --gpu-check: the CUDA tests, the precisions, the bench and the headline command, each guarded


def default_data_root():
    for d in (ROOT / "sample" / "eurosat", ROOT / ".cache" / "data" / "eurosat",
              ROOT.parent / "shared" / "data" / "eurosat-sample"):
        if (d / "2750").is_dir():
            return d
    return None


def eurosat_folder(path):
    """The folder holding 2750/ and the split: `path` itself or `path`/eurosat."""
    path = Path(path)
    for d in (path, path / "eurosat"):
        if (d / "2750").is_dir():
            return d
    raise FileNotFoundError(f"{path}: neither it nor {path / 'eurosat'} holds EuroSAT's 2750/ folder")


def check_tests(args, deadline):
    """pytest on tests/test_orthcr.py, the CUDA-parametrized cases (the CPU ones in a dry run): their counts."""
    selection = "cuda" if args.device == "cuda" else "cpu"
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_orthcr.py", "-k", selection]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True,
                          timeout=max(deadline - time.monotonic(), 1))
    last = (done.stdout.strip().splitlines() or [""])[-1]
    counts = {word: int(n) for n, word in re.findall(r"(\d+) (passed|failed|errors?|skipped|deselected)", last)}
    if done.returncode not in (0, 1, 5):  # 1: some failed; 5: none selected (no GPU)
        log(done.stdout[-3000:] + done.stderr[-3000:])
    return {"selection": f"-k {selection}", "exit_code": done.returncode, "summary": last,
            "passed": counts.get("passed", 0), "failed": counts.get("failed", 0) + counts.get("error", 0)
            + counts.get("errors", 0), "skipped": counts.get("skipped", 0), "deselected": counts.get("deselected", 0)}


def check_precision(args, deadline):
    """The precision worker: loss and gradient of each precision against fp32, step time, peak memory."""
    p = run_worker("precision", args, timeout=max(deadline - time.monotonic(), 1))
    if "failed" in p:
        raise RuntimeError(f"precision worker: {p['failed']}")
    with contextlib.redirect_stdout(sys.stderr):
        print_precision(p)
    return {"loss": {q: {k: v for k, v in p["loss"][q].items() if k != "terms"} for q in p["loss"]},
            "grad": p["grad"], "grad_kl": p["grad_kl"], "steps": p["steps"], "difference": p["difference"],
            "rotations": {s: r["max_R_minus_I"] for s, r in p["rotations"].items()}}


def check_bench(args, deadline):
    summary = run_bench(args, ["matmul", "ours_step", "cutout", "eval", "peft_exact", "peft_neumann"], deadline)
    with contextlib.redirect_stdout(sys.stderr):  # stdout holds the summary line alone
        print_bench(summary, args)
    runs = summary["runs"]
    notes = {name: run.get("skipped") or run.get("failed") for name, run in runs.items()
             if run.get("skipped") or run.get("failed")}
    if "openai_skipped" in runs.get("eval", {}):
        notes["openai_eval"] = runs["eval"]["openai_skipped"]
    figures = {k: summary[k] for k in ("precision", "eval_dtype", "step_s", "eval_img_s", "peak_cuda_mb", "peak_rss_mb",
                                       "floor_s")}
    return {**figures, "openai_eval_img_s": runs.get("eval", {}).get("openai_eval_img_s"),
            "peft_exact_step_s": runs.get("peft_exact", {}).get("step_s"),
            "peft_neumann_step_s": runs.get("peft_neumann", {}).get("step_s"), "ratios": summary["ratios"],
            "notes": notes}


def check_headline(args, deadline):
    """`train.py --data eurosat --shots 16` on a copy of the EuroSAT sample with a random checkpoint, timed end to
    end, and by phase where train.py writes results.json's "seconds"; a dry run takes 1 epoch and --eval-limit."""
    source = eurosat_folder(args.data_root)
    with tempfile.TemporaryDirectory(prefix="orthcr-gpu-check-") as tmp:
        tmp = Path(tmp)
        shutil.copytree(source, tmp / "data" / "eurosat")
        weights = tmp / "weights.pt"
        torch.save(clip_min.random_model(args.config, seed=0).state_dict(), weights)
        command = [sys.executable, str(ROOT / "train.py"), "--data", "eurosat", "--shots", "16", "--device",
                   args.device, "--root", str(tmp / "data"), "--weights", str(weights), "--out", str(tmp / "run")]
        if args.device == "cpu":
            command += ["--epochs", "1", "--eval-limit", "20"]
        log("headline: " + " ".join(command))
        start = time.perf_counter()
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True,
                              timeout=max(deadline - time.monotonic(), 1))
        wall = time.perf_counter() - start
        if done.returncode != 0:
            raise RuntimeError(f"train.py exit code {done.returncode}: {done.stderr.strip()[-500:]}")
        results = json.loads((tmp / "run" / "results.json").read_text())
        steps = [json.loads(line) for line in (tmp / "run" / "log.jsonl").read_text().splitlines()]
    res = results["results"]
    test_images = sum(v["n"] for v in res.values() if isinstance(v, dict))
    out = {"command": "train.py " + " ".join(command[2:]), "wall_s": wall, "steps": len(steps),
           "step_s_sum": sum(s["step_s"] for s in steps), "test_images": test_images,
           "accuracy": {k: (v["accuracy"] if isinstance(v, dict) else v) for k, v in res.items()}}
    seconds = results.get("seconds")
    if seconds:  # train.py's own phase times: data, model, train, eval
        out["seconds"] = seconds
        out["share"] = {k: v / wall for k, v in seconds.items()}
        out["share"]["other"] = 1 - sum(out["share"].values())  # interpreter start, imports, files
        if "eval" in seconds and test_images:  # the real EuroSAT test split has 8,100 images
            out["eval_s_at_8100_images"] = seconds["eval"] / test_images * 8100
    else:
        out["seconds"] = None
        out["note"] = "results.json has no 'seconds' (train.py without phase times): wall time only"
    return out


def check_data_parallel(args, deadline):
    """With several CUDA devices, train.py's data parallelism on 1 to all of them (a fixed batch per device):
    images/s per added device, training and evaluation. One device: skipped with a note. The dry run: 2 CPU
    processes."""
    n = torch.cuda.device_count() if args.device == "cuda" else 2
    if n < 2:
        return {"skipped": f"{n} CUDA device: the multi-device figures need at least 2"}
    d = data_parallel(args, [n], deadline, rounds=1, per_process=args.device == "cuda")
    with contextlib.redirect_stdout(sys.stderr):
        print_data_parallel(d)
    return d


def check_compile(args, deadline):
    """Our step and PEFT OFT exact's, both torch.compiled (Triton on CUDA), in 3 alternating rounds: the compile
    time (in each warm-up step) and the same ratios as the bench part."""
    compiled_args = argparse.Namespace(**{**vars(args), "compile": True, "rounds": 3})
    summary = run_bench(compiled_args, ["matmul", "ours_step", "peft_exact"], deadline)
    with contextlib.redirect_stdout(sys.stderr):
        print_bench(summary, compiled_args)
    runs = summary["runs"]
    failed = {name: run.get("skipped") or run.get("failed") for name, run in runs.items()
              if run.get("skipped") or run.get("failed")}
    if "ours_step" in failed:
        raise RuntimeError(f"compiled ours_step: {failed['ours_step']}")
    return {"precision": summary["precision"], "step_s": summary["step_s"], "floor_s": summary["floor_s"],
            "warm_up_s": {n: runs[n].get("warm_up_s") for n in ("ours_step", "peft_exact") if n in runs},
            "peft_exact_step_s": runs.get("peft_exact", {}).get("step_s"), "ratios": summary["ratios"],
            "notes": failed}


# each part and the seconds it may take at most (the whole check also stops at GPU_CHECK_SECONDS)
GPU_CHECK_PARTS = {"tests": (check_tests, 90), "precision": (check_precision, 90), "bench": (check_bench, 200),
                   "headline": (check_headline, 150), "data_parallel": (check_data_parallel, 120),
                   "compile": (check_compile, 240)}


def gpu_check(args):
    start = time.monotonic()
    deadline = start + GPU_CHECK_SECONDS
    args.config = "tiny" if args.device == "cpu" else "ViT-B/16"
    args.quick = args.device == "cpu"
    args.steps = 1 if args.device == "cpu" else 5
    args.precision = AUTO_CUDA  # train.py's auto on CUDA, also in the dry run (CPU autocast on the tiny config)
    args.data_root = args.data_root or default_data_root()
    summary = {"gpu_check": 1, "device": args.device, "dry_run": args.device == "cpu", "config": args.config,
               "torch": torch.__version__, "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None,
               "auto_precision": AUTO_CUDA}
    for name in args.parts:
        part, cap = GPU_CHECK_PARTS[name]
        log(f"\n== gpu-check: {name} ({time.monotonic() - start:.0f} s elapsed)")
        t0 = time.monotonic()
        try:
            if args.data_root is None and name == "headline":
                raise FileNotFoundError("no EuroSAT sample: pass --data-root (see bench.py's docstring)")
            result = {"ok": True, **part(args, min(deadline, t0 + cap))}
        except Exception as e:  # one failure is reported, the other parts still run
            result = {"ok": False, "error": f"{type(e).__name__}: {str(e)[:1000]}"}
            log(f"gpu-check {name} failed: {result['error']}")
        result["part_s"] = time.monotonic() - t0
        summary[name] = result
    if "tests" in summary:  # none selected (exit code 5: CUDA not seen) is a failure too
        t = summary["tests"]
        t["ok"] = t["ok"] and t.get("failed", 1) == 0 and t.get("passed", 0) > 0
    summary["ok"] = all(summary[name]["ok"] for name in args.parts)
    summary["seconds"] = time.monotonic() - start
    out = Path(args.out or ROOT / "bench_results" / f"gpu-check{'-cpu' if args.device == 'cpu' else ''}.json")
    # the log for a reader beside the JSON: bench_results/gpu.txt on a GPU (gpu-cpu.txt for the dry run)
    text = out.with_suffix(".txt") if args.out else out.with_name(f"gpu{'-cpu' if args.device == 'cpu' else ''}.txt")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=1) + "\n")
    log_gpu_check(summary, args)
    log(f"written to {out} and {text}")
    text.write_text(f"$ {' '.join(map(shlex.quote, sys.argv))}\n" + "\n".join(_LOG) + "\n" + json.dumps(summary) + "\n")
    print(json.dumps(summary))
    if not summary["ok"]:
        raise SystemExit(1)


def log_gpu_check(s, args):
    """A few lines for a reader, on stderr: each part's verdict and its headline figures."""
    log(f"\ngpu-check on {s['gpu'] or 'the CPU (dry run, tiny config)'}: {'ok' if s['ok'] else 'FAILED'} in "
        f"{s['seconds']:.0f} s")
    for name in args.parts:
        part = s[name]
        if not part["ok"]:
            log(f"  {name}: FAILED {part.get('error') or part.get('summary')}")
        elif name == "tests":
            log(f"  tests ({part['selection']}): {part['summary']}")
        elif name == "precision":
            log("  precision: " + "; ".join(f"{q} loss rel err {part['loss'][q]['rel_err']:.1e}, grad cosine "
                                            f"{part['grad'][q]['cosine']:.4f}" for q in ("bf16", "fp16")))
        elif name == "compile":
            log(f"  compile ({part['precision']}): step {part['step_s']:.3f} s, warm-up with compilation " +
                ", ".join(f"{n} {s:.0f} s" for n, s in part["warm_up_s"].items() if s) + ", ratios " +
                ", ".join(f"{k} {v:.2f}" for k, v in part["ratios"].items() if v is not None))
        elif name == "bench":
            log(f"  bench ({part['precision']}): step {part['step_s']:.3f} s, ratios " +
                ", ".join(f"{k} {v:.2f}" for k, v in part["ratios"].items() if v is not None))
        elif name == "data_parallel" and "skipped" in part:
            log(f"  data parallel: skipped ({part['skipped']})")
        elif name == "data_parallel":
            log("  data parallel: " + "; ".join(
                f"{n} vs 1: training x{r['train_img_s']:.2f}, evaluation x{r['eval_img_s']:.2f} images/s, per added "
                f"device {part['per_added_process'][n]['train_img_s']:+.1f} / {part['per_added_process'][n]['eval_img_s']:+.1f}"
                for n, r in part["vs_1"].items()))
        elif name == "headline":
            phases = ", ".join(f"{k} {v:.1f} s" for k, v in (part["seconds"] or {}).items())
            log(f"  headline: {part['wall_s']:.1f} s end to end, {part['steps']} steps, {part['test_images']} test "
                f"images{' (' + phases + ')' if phases else ''}")


# ----------------------------------------------------------------------------------------------------


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=5, help="timed steps (and eval batches) after the warm-up")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--precision", default="auto", choices=["auto", *PRECISIONS],
                        help=f"autocast dtype of the training steps (auto: fp32 on the CPU, {AUTO_CUDA} on CUDA)")
    parser.add_argument("--cutout", default="random", choices=orthcr.CUTOUT_MODES, help="Cutout of the steps")
    parser.add_argument("--json", action="store_true", help="end with one JSON line of every figure")
    parser.add_argument("--quick", action="store_true", help="the tiny config: a smoke test of every path")
    parser.add_argument("--only", nargs="+", choices=[*WORKERS], help="run only these measurements (data_parallel: "
                        "1 against 2 processes under torchrun)")
    parser.add_argument("--gpu-check", action="store_true", help="the CUDA machine check (a dry run on --device cpu)")
    parser.add_argument("--data-root", default=None, help="--gpu-check: the EuroSAT sample (holding 2750/), "
                                                          "or a folder holding it as eurosat/")
    parser.add_argument("--out", default=None, help="--gpu-check: the JSON file to write")
    parser.add_argument("--parts", nargs="+", choices=list(GPU_CHECK_PARTS), default=list(GPU_CHECK_PARTS),
                        help="--gpu-check: run only these parts")
    parser.add_argument("--worker", choices=list(WORKERS), help=argparse.SUPPRESS)
    parser.add_argument("--dp-batch", type=int, default=DP_BATCH, help=argparse.SUPPRESS)  # data_parallel's worker
    parser.add_argument("--dp-eval-batches", type=int, default=DP_EVAL_BATCHES, help=argparse.SUPPRESS)
    parser.add_argument("--rounds", type=int, default=0, help="time the training steps of ours and the PEFT "
                        "peers in this many alternating rounds (median of per-round ratios) instead of apart")
    parser.add_argument("--compile", action="store_true", help="torch.compile the loss of ours and the peers "
                        "(inductor on the CPU, Triton on CUDA; the first step compiles)")
    parser.add_argument("--allocator", default="huge-pages", choices=["huge-pages", "default", "keep"],
                        help="ours: huge pages for large CPU tensors (as train.py runs), the C library's default, or "
                             "keep freed memory for reuse (toolbox/allocator.py, an experiment: its page reuse varied "
                             "from process to process)")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available on this machine")
    args.precision = resolve_precision(args.precision, args.device)
    args.config = "tiny" if args.quick else "ViT-B/16"

    if args.compile and compiled.compiler_available(args.device):
        parser.error(compiled.compiler_available(args.device))
    if args.worker == "ours_step" and args.allocator == "keep":  # the experiment (train.py does not set it)
        why = allocator.keep_freed_memory()
        if why:
            log(why)
    if args.worker and args.serve:
        serve_rounds(args)
        return
    if args.worker:
        result = WORKERS[args.worker](args)
        if result is not None:  # data_parallel: rank 0's only
            print(json.dumps(result))
        return
    if args.gpu_check:
        gpu_check(args)
        return

    names = args.only or DEFAULT_RUN
    summary = run_bench(args, [n for n in names if n not in ("precision", "data_parallel")])
    if any(n not in ("precision", "data_parallel") for n in names):
        print_bench(summary, args)
    if "data_parallel" in names:  # 1 against 2 processes, each launch its own torchrun
        summary["data_parallel"] = data_parallel(args, [2])
        print_data_parallel(summary["data_parallel"])
    if "precision" in names:
        summary["precision"] = run_worker("precision", args)
        if "failed" not in summary["precision"]:
            print_precision(summary["precision"])
    if args.json:
        print(json.dumps(summary))


if __name__ == "__main__":
    main()
