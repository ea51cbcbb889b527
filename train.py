"""Train OrthCR on a CoOp few-shot benchmark and evaluate it with the paper's protocols.

    python train.py --data eurosat --shots 16 --device cuda            # base-to-new on EuroSAT, seed 1
    python train.py --data imagenet --protocol dg --seeds 1 2 3        # domain generalization table
    python train.py --data eurosat --zero-shot                         # zero-shot CLIP baseline row

Top to bottom: flags (validated before anything heavy), data, model, adapters, optimizer, the loop
{Cutout copy, zero-shot teacher logits, merged student logits, loss, backward, step}, evaluation.
Every file is written to a temporary name and renamed, so a crash never leaves half a file.
"""

import argparse
import hashlib
import json
import math
import os
import shlex
import signal
import statistics
import sys
import time
from pathlib import Path

import torch

import clip_min
import data
import orthcr

# ---------------------------------------------------------------------------------------------------- defaults
# The paper does not publish its optimization settings; these are ours (README: "What we chose").
EPOCHS = 20  # few-shot sets are tiny (16 shots x 5 base classes = 80 EuroSAT images): 20 passes, as PromptSRC
BATCH_SIZE = 32  # 32 clean + 32 Cutout copies per step
LR = 1e-4  # AdamW on the Cayley parameters P; R moves ~lr per step per entry, so rotations stay small
WEIGHT_DECAY = 0.0  # decay of P would pull R towards I: the KL term already keeps the model near zero-shot
WARMUP_STEPS = 10  # linear warm-up (at most a tenth of training), then cosine decay to 0
EVAL_BATCH_SIZE = 64

ADAPTER_LAYOUT = {"targets": list(orthcr.DEFAULT_TARGETS), "blocks": 4, "towers": ["visual", "text"]}
PROTOCOLS = ("base2new", "fewshot", "cross", "dg")
CROSS_TARGETS = ("caltech101", "oxford_pets", "stanford_cars", "oxford_flowers", "food101", "fgvc_aircraft",
                 "sun397", "dtd", "eurosat", "ucf101", "imagenet")
DG_TARGETS = ("imagenet", "imagenet_v2", "imagenet_sketch", "imagenet_a", "imagenet_r")


# ---------------------------------------------------------------------------------------------------- flags

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="eurosat", help=f"dataset: {', '.join(data.DATASETS)}")
    p.add_argument("--root", default=os.environ.get("ORTHCR_DATA", "~/data"),
                   help="folder holding the datasets in CoOp's layout (default $ORTHCR_DATA, else ~/data)")
    p.add_argument("--protocol", default="base2new", help=f"one of {', '.join(PROTOCOLS)}")
    p.add_argument("--shots", type=int, default=16, help="training images per class")
    p.add_argument("--seeds", type=int, nargs="+", default=[1], help="one run per seed; a table of mean ± std")
    p.add_argument("--model", default="ViT-B/16", help=f"OpenAI model name: {', '.join(clip_min.available_models())}")
    p.add_argument("--weights", default=None, help="a local checkpoint to use instead of downloading --model")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu, cuda, cuda:N")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="auto: bf16 autocast on CUDA where supported (else fp16 + grad scaler), fp32 on CPU")
    # optimization
    p.add_argument("--epochs", type=int, default=EPOCHS)
    p.add_argument("--batch-size", type=int, default=BATCH_SIZE)
    p.add_argument("--lr", type=float, default=LR)
    p.add_argument("--weight-decay", type=float, default=WEIGHT_DECAY)
    p.add_argument("--warmup-steps", type=int, default=WARMUP_STEPS)
    # the method
    # the adapter layout; with --eval-only, what is not given is read from the adapters file
    p.add_argument("--blocks", type=int, default=None, help="r: diagonal blocks of each orthogonal matrix (4)")
    p.add_argument("--targets", nargs="+", default=None, help=f"layers to adapt ({' '.join(orthcr.DEFAULT_TARGETS)})")
    p.add_argument("--towers", nargs="+", default=None, help="towers to adapt (visual text)")
    p.add_argument("--neumann", type=int, default=0, help="terms of the approximate Cayley (0: exact solve)")
    p.add_argument("--lambda1", type=float, default=1.5, help="weight of KL(zero-shot || finetuned) on clean images")
    p.add_argument("--lambda2", type=float, default=1.0, help="weight of the KL term on Cutout images")
    p.add_argument("--cutout-holes", type=int, default=1)
    p.add_argument("--cutout-size", type=int, default=16)
    # evaluation and files
    p.add_argument("--eval-data", nargs="+", default=None, help="datasets evaluated by cross/dg (default: the paper's)")
    p.add_argument("--eval-limit", type=int, default=None, help="evaluate on N class-balanced test images per split")
    p.add_argument("--eval-batch-size", type=int, default=EVAL_BATCH_SIZE)
    p.add_argument("--zero-shot", action="store_true", help="evaluate plain CLIP (no training)")
    p.add_argument("--eval-only", action="store_true", help="evaluate saved --adapters")
    p.add_argument("--adapters", default=None, help="adapters.pt to evaluate with --eval-only")
    p.add_argument("--export", action="store_true", help="also write merged.pt, the merged official state dict")
    p.add_argument("--out", default=None, help="run folder (default runs/<data>_<protocol>_<shots>shot_seed<S>)")
    p.add_argument("--resume", action="store_true", help="continue from <out>/checkpoint.pt")
    p.add_argument("--save-every", type=int, default=0, help="also checkpoint every N steps (0: each epoch end)")
    p.add_argument("--workers", type=int, default=0, help="data loading processes")
    p.add_argument("--log-every", type=int, default=1)
    p.add_argument("--download-root", default=None, help="model cache (default ~/.cache/clip)")
    args = p.parse_args(argv)
    args.layout_given = [k for k in ADAPTER_LAYOUT if getattr(args, k) is not None]
    for k, default in ADAPTER_LAYOUT.items():
        if getattr(args, k) is None:
            setattr(args, k, default)
    problems = validate(args)
    if problems:
        p.error("; ".join(problems))
    return args


def validate(args):
    """Every flag checked before anything heavy is loaded: a list of one-line problems."""
    bad = []
    positive = dict(shots=args.shots, epochs=args.epochs, batch_size=args.batch_size, blocks=args.blocks,
                    eval_batch_size=args.eval_batch_size, log_every=args.log_every,
                    cutout_size=args.cutout_size)
    bad += [f"--{k.replace('_', '-')} must be >= 1, got {v}" for k, v in positive.items() if v < 1]
    non_negative = dict(warmup_steps=args.warmup_steps, neumann=args.neumann, save_every=args.save_every,
                        workers=args.workers, cutout_holes=args.cutout_holes)
    bad += [f"--{k.replace('_', '-')} must be >= 0, got {v}" for k, v in non_negative.items() if v < 0]
    if not (args.lr > 0 and math.isfinite(args.lr)):
        bad.append(f"--lr must be a positive number, got {args.lr}")
    for name in ("weight_decay", "lambda1", "lambda2"):
        value = getattr(args, name)
        if not (value >= 0 and math.isfinite(value)):
            bad.append(f"--{name.replace('_', '-')} must be a non-negative number, got {value}")
    if args.eval_limit is not None and args.eval_limit < 1:
        bad.append(f"--eval-limit must be >= 1, got {args.eval_limit}")
    for name in [args.data] + (args.eval_data or []):
        if name not in data.DATASETS:
            bad.append(f"unknown dataset {name!r}: expected one of {', '.join(data.DATASETS)}")
    if args.protocol not in PROTOCOLS:
        bad.append(f"unknown --protocol {args.protocol!r}: expected one of {', '.join(PROTOCOLS)}")
    if args.protocol == "dg" and args.data != "imagenet":
        bad.append("--protocol dg trains on imagenet: use --data imagenet")
    if data.DATASETS.get(args.data) and data.DATASETS[args.data].kind in data.TEST_ONLY:
        bad.append(f"--data {args.data} has no training split (it is an evaluation-only ImageNet variant)")
    unknown_towers = set(args.towers) - set(orthcr.TOWER_PREFIX)
    if unknown_towers:
        bad.append(f"unknown --towers {sorted(unknown_towers)}: expected visual and/or text")
    if args.weights is None and args.model not in clip_min.available_models():
        bad.append(f"unknown --model {args.model!r}: expected one of {', '.join(clip_min.available_models())} "
                   f"or --weights PATH")
    if args.weights is not None and not Path(args.weights).is_file():
        bad.append(f"--weights {args.weights}: no such file")
    if args.eval_only and not args.adapters:
        bad.append("--eval-only needs --adapters PATH")
    if args.adapters and not Path(args.adapters).is_file():
        bad.append(f"--adapters {args.adapters}: no such file")
    if args.zero_shot and (args.eval_only or args.resume):
        bad.append("--zero-shot evaluates plain CLIP: it takes neither --eval-only nor --resume")
    if args.out and len(args.seeds) > 1:
        bad.append("--out names one run folder: use it with a single seed")
    try:
        device = torch.device(args.device)
        if device.type not in ("cpu", "cuda"):
            bad.append(f"--device {args.device}: expected cpu, cuda or cuda:N")
        elif device.type == "cuda" and not torch.cuda.is_available():
            bad.append(f"--device {args.device}: CUDA is not available on this machine")
        elif device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
            bad.append(f"--device {args.device}: only {torch.cuda.device_count()} CUDA device(s)")
        elif device.type == "cpu" and args.precision in ("bf16", "fp16"):
            bad.append(f"--precision {args.precision} is for CUDA; the CPU runs in fp32")
    except RuntimeError:
        bad.append(f"--device {args.device}: expected cpu, cuda or cuda:N")
    return bad


def autocast_dtype(args):
    """None for fp32; else the autocast dtype (bf16 where the GPU supports it, else fp16 with a scaler)."""
    if args.device.startswith("cpu") or args.precision == "fp32":
        return None
    if args.precision == "bf16" or (args.precision == "auto" and torch.cuda.is_bf16_supported()):
        return torch.bfloat16
    return torch.float16


# ---------------------------------------------------------------------------------------------------- files

def save_json(path, obj):  # every file of a run goes through clip_min.write_atomic: temporary name, then rename
    clip_min.write_atomic(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=2) + "\n"))


def save_torch(path, obj):
    clip_min.write_atomic(path, lambda tmp: torch.save(obj, tmp))


def load_torch(path, what):
    """torch.load with weights_only=True: tensors and plain containers only, no code from the file runs."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise SystemExit(f"error: {path} is not a valid {what} file (loaded with weights_only=True): "
                         f"{str(e).splitlines()[0]}")


def code_version():
    """sha256 of the four modules: identifies the code even outside a git checkout."""
    h = hashlib.sha256()
    for name in ("clip_min.py", "orthcr.py", "data.py", "train.py"):
        h.update((Path(__file__).parent / name).read_bytes())
    return h.hexdigest()[:16]


def run_folder(args, seed):
    if args.out:
        return Path(args.out)
    shots = "zeroshot" if args.zero_shot else f"{args.shots}shot"
    return Path("runs") / f"{args.data}_{args.protocol}_{shots}_seed{seed}"


# ---------------------------------------------------------------------------------------------------- data

def protocol_datasets(args, seed):
    """(training Dataset or None, {split name: Dataset to evaluate}) for the chosen protocol."""
    root = Path(args.root).expanduser()
    build = lambda name, subsample="all", shots=args.shots: data.build_dataset(  # noqa: E731
        name, root, shots=shots, seed=seed, subsample=subsample)
    if args.protocol == "base2new":
        base, new = build(args.data, "base"), build(args.data, "new")
        return base, {"base": base, "new": new}
    train_set = build(args.data)
    if args.protocol == "fewshot":
        return train_set, {"all": train_set}
    targets = args.eval_data or (DG_TARGETS if args.protocol == "dg" else CROSS_TARGETS)
    return train_set, {name: (train_set if name == args.data else build(name, shots=0))
                       for name in targets if args.protocol == "dg" or name != args.data}


def test_items(args, dataset, seed):
    if args.eval_limit is None:
        return dataset.test
    return data.class_balanced_subset(dataset.test, args.eval_limit, seed)


# ---------------------------------------------------------------------------------------------------- evaluation

def autocast(device, dtype):
    return torch.autocast(torch.device(device).type, dtype=dtype, enabled=dtype is not None)


@torch.no_grad()
def class_features(model, params, prompts, device, dtype, batch=256):
    """Text features of the class prompts under `params`: the classifier, computed once per class set."""
    tokens = clip_min.tokenize(prompts).to(device)
    with autocast(device, dtype):
        return torch.cat([orthcr.encode_text(model, params, orthcr.trim_tokens(t)).float()
                          for t in tokens.split(batch)])


@torch.no_grad()
def evaluate(model, params, dataset, items, args, dtype, n_px, classifier=None):
    """Top-1 accuracy (%) of CLIP's classifier under `params` on `items`, with the count behind it."""
    if classifier is None:
        classifier = class_features(model, params, dataset.prompts(), args.device, dtype)
    correct = 0
    for images, labels in data.batches(items, args.eval_batch_size, train=False, num_workers=args.workers,
                                       n_px=n_px):
        with autocast(args.device, dtype):
            features = orthcr.encode_image(model, params, images.to(args.device)).float()
        logits = orthcr.clip_logits(features, classifier, params["logit_scale"].float())
        correct += (logits.argmax(-1).cpu() == labels).sum().item()
    return {"accuracy": 100.0 * correct / max(len(items), 1), "correct": correct, "n": len(items)}


def harmonic_mean(a, b):
    return 2 * a * b / (a + b) if a + b > 0 else 0.0


def evaluate_all(model, params, eval_sets, args, seed, dtype, n_px):
    results, classifiers = {}, {}
    for split, dataset in eval_sets.items():
        prompts = tuple(dataset.prompts())  # ImageNet, -V2 and -Sketch share one 1000-class classifier
        if prompts not in classifiers:
            classifiers[prompts] = class_features(model, params, prompts, args.device, dtype)
        results[split] = evaluate(model, params, dataset, test_items(args, dataset, seed), args, dtype, n_px,
                                  classifiers[prompts])
        print(f"{split}: {results[split]['accuracy']:.2f}% of {results[split]['n']} test images", file=sys.stderr)
    if args.protocol == "base2new":
        results["hm"] = harmonic_mean(results["base"]["accuracy"], results["new"]["accuracy"])
    return results


# ---------------------------------------------------------------------------------------------------- training

def lr_at(step, total, args):
    """Linear warm-up over --warmup-steps (at most a tenth of the steps), then cosine decay to 0 at the end."""
    warmup = min(args.warmup_steps, total // 10)
    if step < warmup:
        return args.lr * (step + 1) / warmup
    progress = (step - warmup) / max(total - warmup, 1)
    return args.lr * 0.5 * (1 + math.cos(math.pi * progress))


def cayley_transform(neumann):
    """The exact Cayley transform, or its Neumann approximation with `neumann` terms (--neumann)."""
    return orthcr.cayley_fast if neumann == 0 else lambda P: orthcr.cayley_neumann(P, neumann)


def adapter_config(args, checkpoint_sha256):
    return {"model": args.model, "checkpoint_sha256": checkpoint_sha256, "targets": list(args.targets),
            "towers": list(args.towers), "blocks": args.blocks, "neumann": args.neumann}


def load_adapters(path, params, args):
    """Adapters saved by this script. The layout flags not given on the command line are taken from the file's
    config (as PEFT reads adapter_config.json); a mismatch with the model or with the layout names the first
    offending tensor (in state-dict order), so a partial or foreign file is never evaluated."""
    saved = load_torch(path, "adapters")
    if not isinstance(saved, dict) or not isinstance(saved.get("adapters"), dict):
        raise SystemExit(f"error: {path} holds no 'adapters' entry: not an adapters.pt written by train.py")
    for k in ADAPTER_LAYOUT:
        if k not in args.layout_given and k in (saved.get("config") or {}):
            setattr(args, k, saved["config"][k])
    try:
        orthcr.check_adapters(params, saved["adapters"])
        keys = orthcr.target_keys(params, args.targets, args.towers)
    except ValueError as e:
        raise SystemExit(f"error: {path} does not fit this model: {e}")
    size = lambda k: params[k].shape[1] // args.blocks  # noqa: E731
    expected = {k: (args.blocks, size(k), size(k)) for k in keys}
    found = {k: tuple(P.shape) for k, P in saved["adapters"].items()}
    for key in (k for k in params if expected.get(k) != found.get(k)):
        config = saved.get("config") or {}
        raise SystemExit(f"error: {path} was made for another configuration (its config: --targets "
                         f"{' '.join(config.get('targets', ['?']))} --blocks {config.get('blocks', '?')} --towers "
                         f"{' '.join(config.get('towers', ['?']))}, model {config.get('model', '?')}); first "
                         f"mismatching tensor {key}: this run expects {expected.get(key, 'no adapter')}, the file "
                         f"has {found.get(key, 'none')}")
    return saved


class Interrupt:
    """The first Ctrl-C asks the loop to checkpoint and stop after the current step; a second one kills."""

    def __init__(self):
        self.requested = False

    def __enter__(self):
        self.previous = signal.signal(signal.SIGINT, self.handle)
        return self

    def handle(self, signum, frame):
        self.requested = True
        signal.signal(signal.SIGINT, signal.default_int_handler)
        print("\ninterrupted: saving a checkpoint after this step (Ctrl-C again to abort)", file=sys.stderr)

    def __exit__(self, *exc):
        signal.signal(signal.SIGINT, self.previous)


def rng_state(cutout_gen):
    """Every random state the loop draws from (data augmentation is seeded per (seed, epoch, position))."""
    return {"torch": torch.get_rng_state(), "cutout": cutout_gen.get_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state, cutout_gen):
    torch.set_rng_state(state["torch"])
    cutout_gen.set_state(state["cutout"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def train(model, params, train_set, args, seed, out, dtype, n_px, checkpoint_sha256):
    """The loop. Returns the trained adapters, or exits (non-zero) on a non-finite loss or Ctrl-C."""
    device = args.device
    adapters = orthcr.init_adapters(params, args.targets, args.blocks, args.towers)
    optimizer = torch.optim.AdamW(adapters.values(), lr=args.lr, weight_decay=args.weight_decay)
    scaler = torch.amp.GradScaler(device=torch.device(device).type, enabled=dtype == torch.float16)
    transform = cayley_transform(args.neumann)
    tokens = orthcr.trim_tokens(clip_min.tokenize(train_set.prompts())).to(device)
    with autocast(device, dtype):
        zs_text = orthcr.zero_shot_text_features(model, params, tokens)  # the frozen teacher's classifier, once
    cutout_gen = torch.Generator().manual_seed(seed)
    per_epoch = data.num_batches(len(train_set.train), args.batch_size)
    total = per_epoch * args.epochs
    step = 0
    ckpt_path, log_path = out / "checkpoint.pt", out / "log.jsonl"

    def save_checkpoint():
        save_torch(ckpt_path, {"step": step, "adapters": {k: P.detach() for k, P in adapters.items()},
                               "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                               "rng": rng_state(cutout_gen), "config": adapter_config(args, checkpoint_sha256)})

    if args.resume and ckpt_path.is_file():
        state = load_torch(ckpt_path, "checkpoint")
        with torch.no_grad():
            for k, P in adapters.items():
                P.copy_(state["adapters"][k])
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"], cutout_gen)
        step = state["step"]
        # the log keeps exactly the steps the checkpoint holds
        kept = [line for line in log_path.read_text().splitlines() if json.loads(line)["step"] <= step] \
            if log_path.is_file() else []
        clip_min.write_atomic(log_path, lambda tmp: tmp.write_text("".join(line + "\n" for line in kept)))
        print(f"resumed from {ckpt_path} at step {step}/{total}", file=sys.stderr)
    elif args.resume:
        print(f"--resume: no checkpoint at {ckpt_path}, starting from scratch", file=sys.stderr)

    start_time, start_step = time.monotonic(), step
    with Interrupt() as interrupt, open(log_path, "a") as log:
        while step < total:
            epoch, first = divmod(step, per_epoch)
            for images, labels in data.batches(train_set.train, args.batch_size, train=True, seed=seed, epoch=epoch,
                                               start=first, num_workers=args.workers, n_px=n_px):
                t0 = time.monotonic()
                lr = lr_at(step, total, args)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                with autocast(device, dtype):
                    loss, terms = orthcr.objective(model, params, adapters, images.to(device), labels.to(device),
                                                   tokens, zs_text, cutout_gen, lambda1=args.lambda1,
                                                   lambda2=args.lambda2, holes=args.cutout_holes,
                                                   size=args.cutout_size, transform=transform)
                if not torch.isfinite(loss):
                    stop_non_finite(f"loss ({loss.item()})", step + 1, ckpt_path)
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                # the fp16 scaler skips steps with inf/NaN gradients itself; otherwise one would poison P (and the
                # next checkpoint) while the loss still looks finite
                if not scaler.is_enabled() and not torch.stack([P.grad.isfinite().all()
                                                                for P in adapters.values()]).all():
                    stop_non_finite("gradient", step + 1, ckpt_path)
                scaler.step(optimizer)
                scaler.update()
                step += 1
                seconds = time.monotonic() - t0
                record = {"step": step, "epoch": epoch + 1, "lr": lr, "loss": loss.item(),
                          **{k: v.item() for k, v in terms.items()}, "step_s": seconds}
                log.write(json.dumps(record) + "\n")
                log.flush()
                if step % args.log_every == 0 or step == total:
                    report_progress(record, step, total, args, images.shape[0], start_time, start_step)
                if interrupt.requested:
                    save_checkpoint()
                    argv = [sys.executable, *sys.argv, *([] if args.resume else ["--resume"])]
                    if not args.out and len(args.seeds) == 1:  # --out takes one seed; several resume by default
                        argv += ["--out", str(out)]
                    command = shlex.join(argv)  # quoted: paths with spaces survive copy and paste
                    print(f"checkpoint saved to {ckpt_path} at step {step}/{total}; resume with:\n  {command}",
                          file=sys.stderr)
                    raise SystemExit(130)
                if (args.save_every and step % args.save_every == 0) or step % per_epoch == 0:
                    save_checkpoint()
    return adapters


def stop_non_finite(what, step, ckpt_path):
    print(f"error: non-finite {what} at step {step}; the last good checkpoint is "
          f"{ckpt_path if ckpt_path.is_file() else 'none (no checkpoint was saved yet)'}", file=sys.stderr)
    raise SystemExit(3)


def report_progress(record, step, total, args, batch, start_time, start_step):
    elapsed = time.monotonic() - start_time
    rate = (step - start_step) / max(elapsed, 1e-9)
    eta = (total - step) / max(rate, 1e-9)
    print(f"step {step}/{total} epoch {record['epoch']}/{args.epochs} loss {record['loss']:.4f} "
          f"(ce {record['ce']:.3f} ce_cut {record['ce_cutout']:.3f} kl {record['kl']:.4f} "
          f"kl_cut {record['kl_cutout']:.4f}) lr {record['lr']:.2e} {rate * batch:.1f} img/s "
          f"ETA {time.strftime('%H:%M:%S', time.gmtime(eta))}", file=sys.stderr)


# ---------------------------------------------------------------------------------------------------- one run

def run(args, seed, datasets, model, params, checkpoint_sha256):
    """One seed: training (or loaded adapters), evaluation, files. Returns results.json's content."""
    out = run_folder(args, seed)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    dtype = autocast_dtype(args)
    n_px = model.visual.input_resolution
    train_set, eval_sets = datasets
    if args.eval_only:  # before config.json, which then records the layout read from the file
        saved = load_adapters(args.adapters, params, args)
    config = {**vars(args), "seed": seed, "code_version": code_version(), "checkpoint_sha256": checkpoint_sha256,
              "torch": torch.__version__, "train_images": len(train_set.train) if train_set else 0}
    save_json(out / "config.json", config)

    if args.zero_shot:
        merged = params
    else:
        if args.eval_only:
            adapters = {k: P.to(args.device) for k, P in saved["adapters"].items()}
            neumann = saved.get("config", {}).get("neumann", 0)  # evaluated as they were trained
        else:
            adapters = train(model, params, train_set, args, seed, out, dtype, n_px, checkpoint_sha256)
            save_torch(out / "adapters.pt", {"adapters": {k: P.detach().cpu() for k, P in adapters.items()},
                                             "config": adapter_config(args, checkpoint_sha256)})
            neumann = args.neumann
        merged = orthcr.export_state_dict(params, adapters, cayley_transform(neumann))  # merged once: eval costs plain CLIP
        if args.export:
            save_torch(out / "merged.pt", {k: v.cpu() for k, v in merged.items()})
    results = {"data": args.data, "protocol": args.protocol, "shots": args.shots, "seed": seed,
               "zero_shot": args.zero_shot, "eval_limit": args.eval_limit,
               "results": evaluate_all(model, params if args.zero_shot else merged, eval_sets, args, seed, dtype,
                                       n_px)}
    save_json(out / "results.json", results)
    print(f"results written to {out / 'results.json'}", file=sys.stderr)
    return results


def summary_table(all_results, args):
    """The paper's table form: one row, mean ± std over seeds of each reported accuracy."""
    first = all_results[0]["results"]
    columns = [k for k in first if k != "hm"] + (["hm"] if "hm" in first else [])

    def cell(key):
        values = [r["results"][key] if key == "hm" else r["results"][key]["accuracy"] for r in all_results]
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{statistics.mean(values):.2f} ± {std:.2f}"

    name = f"{args.data} ({'zero-shot CLIP' if args.zero_shot else 'OrthCR'}, {len(all_results)} seed(s))"
    header = "| dataset | " + " | ".join("HM" if c == "hm" else c for c in columns) + " |"
    rule = "|" + "---|" * (len(columns) + 1)
    return "\n".join([header, rule, f"| {name} | " + " | ".join(cell(c) for c in columns) + " |"])


def main(argv=None):
    args = parse_args(argv)
    # the datasets are read and checked before the (large) model is loaded or downloaded
    try:
        datasets = {seed: protocol_datasets(args, seed) for seed in args.seeds}
    except data.DataError as e:
        raise SystemExit(f"error: {e}")
    try:
        path, checkpoint_sha256 = clip_min.checkpoint(args.weights or args.model, args.download_root)
        model = clip_min.build_model(clip_min.read_state_dict(path), source=str(path)).to(args.device)
    except (ValueError, RuntimeError, OSError) as e:  # bad file, failed download, unreadable path
        raise SystemExit(f"error: {e}")
    model.requires_grad_(False)  # W0 is frozen: only the adapters get gradients
    params = dict(model.state_dict())
    all_results = [run(args, seed, datasets[seed], model, params, checkpoint_sha256) for seed in args.seeds]
    print(summary_table(all_results, args))
    return all_results


if __name__ == "__main__":
    main()
