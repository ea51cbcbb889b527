"""Train OrthCR / OrthSR on a CoOp few-shot benchmark and evaluate it with the paper's protocols.

    python train.py --data eurosat --shots 16 --device cuda                 # base-to-new on EuroSAT, seed 1
    python train.py --data eurosat --cutout attentive --prompt coop         # OrthSR (v3) with CoOp's context
    python train.py --data imagenet --protocol dg --seeds 1 2 3             # domain generalization table
    python train.py --data eurosat --zero-shot                              # zero-shot CLIP's row

Reading order: the defaults; `train`, the loop; `evaluate`; `run`, one seed from data to files. Then the
plumbing: settings, run folders and checkpoints, progress, and the command line with its validation.
"""

import argparse
import dataclasses
import errno
import fcntl
import hashlib
import io
import itertools
import json
import math
import os
import re
import shlex
import shutil
import signal
import statistics
import sys
import time
import warnings
from contextlib import ExitStack, contextmanager, nullcontext
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont

import clip_min
from toolbox import checkpoints, files
import data
import orthcr

# ---------------------------------------------------------------------------------------------------- defaults
# The paper does not publish its optimization settings; these are ours (README: "What we chose").
EPOCHS = 20  # few-shot sets are tiny (16 shots x 5 base classes = 80 EuroSAT images): 20 passes, as PromptSRC
BATCH_SIZE = 32  # 32 clean images + their 32 Cutout copies per step
LR = 1e-4  # AdamW on the Cayley parameters P; R moves ~lr per step per entry, so rotations stay small
WEIGHT_DECAY = 0.0  # decay of P would pull R towards I: the KL term already keeps the model near zero-shot
WARMUP_STEPS = 10  # linear warm-up (at most a tenth of training), then cosine decay to 0
EVAL_BATCH_SIZE = 64
N_CTX = 16  # CoOp's context length; --ctx-init "a photo of a" gives 4 instead
LAYOUT = {"targets": orthcr.DEFAULT_TARGETS, "blocks": 4, "towers": ("visual", "text")}  # the paper's 43.45M

PROTOCOLS = ("base2new", "fewshot", "cross", "dg")
CROSS_TARGETS = ("caltech101", "oxford_pets", "stanford_cars", "oxford_flowers", "food101", "fgvc_aircraft",
                 "sun397", "dtd", "eurosat", "ucf101")  # CoCoOp's Table 2, after the source ImageNet
DG_TARGETS = ("imagenet_v2", "imagenet_sketch", "imagenet_a", "imagenet_r")  # CoCoOp's Table 3


# ---------------------------------------------------------------------------------------------------- the loop

def train(model, params, train_set, cfg, seed, folder, resume=None, data_sha256=None):
    """OrthCR's training loop on one few-shot set, from scratch or from the checkpoint `resume`. Returns the
    trained adapters and CoOp context (or None)."""
    adapters, context = init_trainables(params, cfg, seed)
    optimizer = torch.optim.AdamW(trainable_tensors(adapters, context), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scaler = _grad_scaler(cfg)  # fp16's gradients need loss scaling
    tokens, teacher_text = class_prompts(model, params, train_set.classnames, train_set.template, cfg)
    generator = torch.Generator().manual_seed(seed)  # all of Cutout's randomness
    total = cfg.epochs * data.steps_per_epoch(len(train_set.train), cfg.batch_size)
    step = _resume_from(resume, folder, adapters, context, optimizer, scaler, generator) if resume else 0
    save = lambda step: _save_checkpoint(folder, cfg, seed, data_sha256, step, total, adapters, context,  # noqa
                                         optimizer, scaler, generator)
    with _Bookkeeping(folder, cfg, step, total, save) as books:
        for epoch, images, labels in data.train_batches(train_set.train, cfg.batch_size, seed, cfg.epochs, step,
                                                        cfg.workers, model.visual.input_resolution):
            lr = _set_lr(optimizer, lr_at(step, total, cfg.lr, cfg.warmup_steps))
            with _autocast(cfg.device, cfg.precision):
                loss, terms = orthcr.objective(model, params, adapters, images.to(cfg.device), labels.to(cfg.device),
                                               tokens, teacher_text, generator, context=context, **method_settings(cfg))
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            _stop_if_not_finite(loss, adapters, context, scaler, step + 1, folder)  # before it can reach P
            scaler.step(optimizer)
            scaler.update()
            step += 1
            books.after_step(step, epoch, lr, loss, terms)  # step log, checkpoint when due, Ctrl-C, progress
    return adapters, context


def method_settings(cfg):
    """The settings of `orthcr.objective` that define the method: Cutout, the loss weights, the transform."""
    return dict(cutout_mode=cfg.cutout, lambda1=cfg.lambda1, lambda2=cfg.lambda2, holes=cfg.cutout_holes,
                size=cfg.cutout_size, temperature=cfg.cutout_temperature, transform=cayley_transform(cfg.neumann))


def _set_lr(optimizer, lr):
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr


def lr_at(step, total, lr, warmup):
    """Linear warm-up over `warmup` steps (at most a tenth of the steps), then cosine decay to 0 at the end."""
    warmup = min(warmup, total // 10)
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(total - warmup, 1)
    return lr * 0.5 * (1 + math.cos(math.pi * progress))


def init_trainables(params, cfg, seed):
    """P = 0 for every targeted weight (the model starts as zero-shot CLIP), and CoOp's context if asked for."""
    adapters = orthcr.init_adapters(params, cfg.targets, cfg.blocks, cfg.towers) if cfg.targets else {}
    context = None
    if cfg.prompt == "coop":
        context = orthcr.init_context(params, cfg.n_ctx, cfg.ctx_init, torch.Generator().manual_seed(seed))
    return adapters, context


def trainable_tensors(adapters, context):
    return [*adapters.values(), *([] if context is None else [context])]


def class_prompts(model, params, classnames, template, cfg):
    """(the student's prompt tokens, the teacher's fp32 class features). The teacher always reads the
    hand-written template; the student reads it too, or CoOp's prompts when its context is learned. Tokens are
    trimmed once, here on the CPU, because trimming reads their values."""
    teacher_tokens = orthcr.trim_tokens(clip_min.tokenize([template.format(c) for c in classnames]))
    with _autocast(cfg.device, cfg.precision):
        teacher_text = orthcr.zero_shot_text_features(model, params, teacher_tokens.to(cfg.device))
    student_tokens = teacher_tokens if cfg.prompt == "fixed" else \
        orthcr.trim_tokens(orthcr.coop_tokens(classnames, cfg.n_ctx, cfg.ctx_init))
    return student_tokens.to(cfg.device), teacher_text


def cayley_transform(neumann):
    """The exact Cayley transform (its fast backward), or its Neumann approximation with `neumann` terms."""
    return orthcr.cayley_fast if neumann == 0 else lambda P: orthcr.cayley_neumann(P, neumann)


# ---------------------------------------------------------------------------------------------------- evaluation

def evaluate(model, params, context, eval_sets, cfg, seed):
    """Top-1 accuracy (%) of CLIP's classifier under `params` on each evaluation split, with the count behind it.
    All splits go through one loader; each class set's classifier is computed once (ImageNet, -V2 and -Sketch
    share theirs)."""
    classifiers = {}
    for dataset in eval_sets.values():
        key = (tuple(dataset.classnames), dataset.template)
        if key not in classifiers:
            classifiers[key] = classifier(model, params, context, dataset.classnames, dataset.template, cfg)
    splits = list(eval_sets)
    items = [_test_items(eval_sets[s].test, cfg.eval_limit, seed) for s in splits]
    correct = [0] * len(splits)
    for i, images, labels in data.eval_batches(items, cfg.eval_batch_size, cfg.workers, model.visual.input_resolution):
        dataset = eval_sets[splits[i]]
        weights = classifiers[(tuple(dataset.classnames), dataset.template)]
        correct[i] += int((predict(model, params, images.to(cfg.device), weights, cfg).cpu() == labels).sum())
    return {s: {"accuracy": 100.0 * c / len(its), "correct": c, "n": len(its)}
            for s, c, its in zip(splits, correct, items)}


@torch.no_grad()
def classifier(model, params, context, classnames, template, cfg, batch=256):
    """The class-prompt features under `params`, (C, E) fp32: the template's prompts, or CoOp's with `context`."""
    tokens = clip_min.tokenize([template.format(c) for c in classnames]) if context is None else \
        orthcr.coop_tokens(classnames, cfg.n_ctx, cfg.ctx_init)
    with _autocast(cfg.device, cfg.precision):
        return torch.cat([orthcr.encode_text(model, params, orthcr.trim_tokens(t).to(cfg.device), context).float()
                          for t in tokens.split(batch)])


@torch.no_grad()
def predict(model, params, images, class_features, cfg):
    """The predicted class of each (normalized) image: argmax of CLIP's logits."""
    with _autocast(cfg.device, cfg.precision):
        features = orthcr.encode_image(model, params, images)
    return orthcr.clip_logits(features, class_features, params["logit_scale"]).argmax(dim=-1)


def _test_items(items, limit, seed):
    return items if limit is None else data.class_balanced_subset(items, limit, seed)


def harmonic_mean(a, b):
    return 2 * a * b / (a + b) if a + b > 0 else 0.0


# ---------------------------------------------------------------------------------------------------- one run

def run(cfg, seed, plan, datasets, model, params, seconds, data_sha256, adapters_file=None):
    """One seed: train (`plan` ("new", None) or ("resume", checkpoint)) or load adapters, merge, evaluate, write
    the run folder. Returns results.json's content (a finished run that --resume meets is kept as it is)."""
    folder, (mode, payload) = _run_folder(cfg, seed), plan
    if mode == "done":
        _say(f"{folder} is finished: its results.json is kept as it is")
        return payload[1]
    train_set, eval_sets = datasets
    torch.manual_seed(seed)
    started = time.monotonic()
    adapters, context = {}, None  # zero-shot CLIP
    if cfg.eval_only:  # checked against the model before anything is written
        adapters, context, evaluated = _read_adapters_file(cfg.adapters, adapters_file, params, cfg)
    if cfg.overwrite:
        _clear(folder)
    _write_json(folder / "config.json", _run_config(cfg, seed, train_set, data_sha256))
    if not (cfg.zero_shot or cfg.eval_only):
        adapters, context = train(model, params, train_set, cfg, seed, folder, payload, data_sha256)
        _save_adapters(folder / "adapters.pt", adapters, context, cfg, seed, data_sha256)
    trained = time.monotonic()
    merged = orthcr.export_state_dict(params, adapters, cayley_transform(cfg.neumann))  # eval costs plain CLIP
    if cfg.export:
        _export(folder, merged, context, cfg)
    results = evaluate(model, merged, context, eval_sets, cfg, seed)
    for split, r in results.items():
        _say(f"{split}: {r['accuracy']:.2f}% of {r['n']} test images")
    if cfg.protocol == "base2new":
        results["hm"] = harmonic_mean(results["base"]["accuracy"], results["new"]["accuracy"])
    record = {"data": cfg.data, "protocol": cfg.protocol, "shots": cfg.shots, "seed": seed,
              "method": method_name(cfg), "eval_limit": cfg.eval_limit, "results": results,
              "seconds": {**seconds, "train": trained - started, "eval": time.monotonic() - trained}}
    if cfg.eval_only:
        record["evaluated"] = evaluated
    _write_json(folder / "results.json", record)
    (folder / "checkpoint.pt").unlink(missing_ok=True)  # the run is complete: adapters.pt holds what it learned
    _say(f"results written to {folder / 'results.json'}")
    return record


def method_name(cfg):
    """The row label of the paper's tables: OrthCR (v1), OrthSR (v3, attentive Cutout), CoOp, zero-shot CLIP,
    with the ablation in brackets."""
    if cfg.zero_shot:
        return "zero-shot CLIP"
    name = ("OrthSR" if cfg.cutout == "attentive" else "OrthCR") if cfg.targets else "CoOp"
    if cfg.targets and cfg.prompt == "coop":
        name += " + CoOp"
    ablations = []
    if cfg.targets and set(cfg.towers) != {"visual", "text"}:
        ablations.append("image tower only" if cfg.towers == ("visual",) else "text tower only")
    if cfg.cutout == "none" and cfg.targets:
        ablations.append("w/o CutOut")
    if cfg.lambda1 == cfg.lambda2 == 0 and cfg.targets:
        ablations.append("w/o KL")
    if not cfg.targets:  # CoOp with OrthCR's other terms
        kl = cfg.lambda1 or (cfg.cutout != "none" and cfg.lambda2)
        extras = [term for term, used in (("KL", kl), ("CutOut", cfg.cutout != "none")) if used]
        ablations += [f"+ {' + '.join(extras)}"] if extras else []
    return name + (f" ({', '.join(ablations)})" if ablations else "")


def summary_table(all_results):
    """The paper's table form: one row, each column averaged over seeds (± std with several seeds). HM is
    the HM of the mean base and mean new accuracies, as CoCoOp's tables report it; results.json keeps each
    seed's own HM."""
    first = all_results[0]
    splits = [k for k in first["results"] if k != "hm"]

    def values(split):
        return [r["results"][split]["accuracy"] for r in all_results]

    def cell(vals):
        std = f" ± {statistics.stdev(vals):.2f}" if len(vals) > 1 else ""
        return f"{statistics.mean(vals):.2f}{std}"

    columns = {s: cell(values(s)) for s in splits}
    if first["protocol"] == "base2new":
        columns["HM"] = f"{harmonic_mean(statistics.mean(values('base')), statistics.mean(values('new'))):.2f}"
    if first["protocol"] in ("cross", "dg") and len(splits) > 2:  # the targets' average, source excluded
        columns["average"] = f"{statistics.mean(statistics.mean(values(s)) for s in splits[1:]):.2f}"
    seeds = f"{len(all_results)} seed{'s' if len(all_results) > 1 else ''}"
    header = "| dataset | method | " + " | ".join(columns) + " |"
    rule = "|---|---|" + "---|" * len(columns)
    row = f"| {first['data']} | {first['method']} ({seeds}) | " + " | ".join(columns.values()) + " |"
    return "\n".join([header, rule, row])


def cutout_grid(model, params, train_set, cfg, seed, n=8):
    """A PNG-ready picture of the first training batch: per image, the image, its random Cutout hole, its
    attentive Cutout hole, and the teacher's patch-to-class-text similarity as a heat overlay (red = similar)."""
    first = data.train_batches(train_set.train, min(n, len(train_set.train)), seed, 1, 0, 0,
                               model.visual.input_resolution)
    images, labels = next(iter(first))[1:]  # the first batch of epoch 1, as training sees it
    _, teacher_text = class_prompts(model, params, train_set.classnames, train_set.template, cfg)
    with torch.no_grad(), _autocast(cfg.device, cfg.precision):
        _, patches = orthcr.encode_image(model, params, clip_min.normalize(images.to(cfg.device)), dense=True)
    similarity = orthcr.similarity_map(patches, teacher_text[labels.to(cfg.device)]).cpu()  # (N, grid, grid)
    random_cut = orthcr.cutout(images, torch.Generator().manual_seed(seed), cfg.cutout_holes, cfg.cutout_size)
    attentive_cut = orthcr.attentive_cutout(images, similarity, cfg.cutout_size)
    heat = torch.nn.functional.interpolate(similarity[:, None], size=images.shape[-2:], mode="nearest")  # (N, 1, H, W)
    low, high = heat.amin(dim=(2, 3), keepdim=True), heat.amax(dim=(2, 3), keepdim=True)
    heat = (heat - low) / (high - low).clamp_min(1e-12)
    red = torch.cat([torch.ones_like(heat), torch.zeros_like(heat), torch.zeros_like(heat)], dim=1)
    overlay = images * (1 - 0.6 * heat) + red * 0.6 * heat
    columns = [images, random_cut, attentive_cut, overlay]  # each (N, 3, H, W) in [0, 1]
    grid = torch.cat([torch.cat(list(column), dim=1) for column in columns], dim=2)  # (3, N*H, 4*W)
    picture = Image.fromarray((grid.permute(1, 2, 0).clamp(0, 1) * 255).round().to(torch.uint8).numpy())
    return _with_header(picture, ["image", "random hole", "attentive hole", "similarity"])


def _with_header(picture, titles, height=20):
    """The picture under a white band naming its columns."""
    framed = Image.new("RGB", (picture.width, picture.height + height), "white")
    framed.paste(picture, (0, height))
    draw, width = ImageDraw.Draw(framed), picture.width // len(titles)
    font = ImageFont.load_default(size=min(12, max(6, width // 10)))
    for i, title in enumerate(titles):
        draw.text((i * width + 3, 3), title, fill="black", font=font)
    return framed


# ==================================================================================================== plumbing
# Settings: every flag, as one immutable record

@dataclasses.dataclass(frozen=True)
class Settings:
    data: str
    root: str
    protocol: str
    shots: int
    seeds: tuple
    model: str
    weights: str | None
    download: bool
    device: str
    precision: str  # resolved: fp32, bf16 or fp16
    epochs: int
    batch_size: int
    lr: float
    weight_decay: float
    warmup_steps: int
    targets: tuple  # empty: no orthogonal finetuning (plain CoOp)
    blocks: int
    towers: tuple
    neumann: int
    lambda1: float
    lambda2: float
    cutout: str
    cutout_size: int
    cutout_holes: int
    cutout_temperature: float | None
    prompt: str
    n_ctx: int
    ctx_init: str | None
    eval_data: tuple | None
    eval_limit: int | None
    eval_batch_size: int
    zero_shot: bool
    eval_only: bool
    adapters: str | None
    export: bool
    export_dtype: str
    out: str | None
    resume: bool
    overwrite: bool
    save_every: int
    workers: int
    log_every: int
    download_root: str | None
    cutout_grid: str | None
    checkpoint_sha256: str | None = None  # of the base model file, once it is known


# the settings that change what a run computes: a resumed run must match its checkpoint in each of them
_RESULT_SETTINGS = ("checkpoint_sha256", "data", "protocol", "shots", "epochs", "batch_size", "lr", "weight_decay", "warmup_steps",
                   "targets", "blocks", "towers", "neumann", "lambda1", "lambda2", "cutout", "cutout_size",
                   "cutout_holes", "cutout_temperature", "prompt", "n_ctx", "ctx_init", "precision", "eval_data",
                   "eval_limit", "zero_shot")


# the settings that only training reads: --eval-only takes them from the adapters file, never from flags
_TRAINING_ONLY = ("epochs", "batch_size", "lr", "weight_decay", "warmup_steps", "lambda1", "lambda2", "cutout",
                  "cutout_size", "cutout_holes", "cutout_temperature")


def settings_from(args, saved=None):
    """The run's Settings from the parsed flags. With --eval-only, a flag that was not given takes the value
    recorded in the adapters file (`saved`), as PEFT reads adapter_config.json; else its default."""
    saved = saved or {}

    def pick(name, default):
        given = getattr(args, name)
        return given if given is not None else saved.get(name, default)

    targets = tuple(pick("targets", LAYOUT["targets"]))
    ctx_init = pick("ctx_init", None)
    training = {"lambda2": 0.0 if args.cutout == "none" else orthcr.LAMBDA2, "cutout_holes": 1}  # flag defaults
    training = {k: getattr(args, k) if getattr(args, k) is not None else training.get(k) for k in _TRAINING_ONLY}
    if args.eval_only:  # the adapters as they were trained: the table's label and the record say how
        training.update({k: saved[k] for k in _TRAINING_ONLY if k in saved})
    values = {**vars(args), **training,
              "workers": args.workers if args.workers is not None else data.default_workers(args.device),
              "data": pick("data", "eurosat"), "protocol": pick("protocol", "base2new"), "shots": pick("shots", 16),
              "seeds": tuple(args.seeds or [saved.get("seed", 1)]),
              "targets": () if targets == ("none",) else targets,
              "blocks": pick("blocks", LAYOUT["blocks"]), "towers": tuple(pick("towers", LAYOUT["towers"])),
              "neumann": pick("neumann", 0), "prompt": pick("prompt", "fixed"), "ctx_init": ctx_init,
              # CoOp: initial words fix the context length
              "n_ctx": len(clip_min.encode(ctx_init)) if ctx_init else pick("n_ctx", N_CTX),
              "eval_data": tuple(args.eval_data) if args.eval_data else None,
              "precision": _resolve_precision(args.precision, args.device), "download": not args.no_download}
    return Settings(**{f.name: values[f.name] for f in dataclasses.fields(Settings) if f.name in values})


def _resolve_precision(precision, device):
    """fp32 on the CPU; on CUDA, `auto` is fp16 autocast with a grad scaler (README: "Precision")."""
    if precision != "auto":
        return precision
    return "fp32" if torch.device(device).type == "cpu" else "fp16"


def _grad_scaler(cfg):
    """Loss scaling for fp16 (a pass-through otherwise). It starts at 2^12, not torch's 2^16: on ViT-B/16 the
    loss scaled by 2^16 overflowed fp16 (bench_results/precision_cpu.txt), and each overflow skips a step."""
    return torch.amp.GradScaler(torch.device(cfg.device).type if cfg.device != "meta" else "cpu",
                                init_scale=2.0**12, enabled=cfg.precision == "fp16")


def _autocast(device, precision):
    """Autocast of the towers' matrix products in bf16 or fp16; nothing for fp32 (and on the tests' meta device)."""
    device_type = torch.device(device).type
    if precision == "fp32" or not torch.amp.is_autocast_available(device_type):
        return nullcontext()
    return torch.autocast(device_type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def _run_config(cfg, seed, train_set, data_sha256):
    return {**dataclasses.asdict(cfg), "seed": seed, "data_sha256": data_sha256, "method": method_name(cfg),
            "model_file": _model_label(cfg),
            "code_version": _code_version(), "torch": torch.__version__,
            "train_images": len(train_set.train) if train_set else 0}


def _model_label(cfg):
    """The base model as recorded: the --weights file when one is given, else OpenAI's model name."""
    return str(Path(cfg.weights).resolve()) if cfg.weights else cfg.model


def _code_version():
    """sha256 of the four modules: identifies the code even outside a git checkout."""
    h = hashlib.sha256()
    for name in ("clip_min.py", "orthcr.py", "data.py", "train.py"):
        h.update((Path(__file__).parent / name).read_bytes())
    return h.hexdigest()[:16]


def _result_settings(cfg, seed, data_sha256=None):
    """The settings a checkpoint must have been written with to be resumed by this run."""
    return {**{k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(cfg).items()
               if k in _RESULT_SETTINGS}, "seed": seed, "data_sha256": data_sha256}


def _data_fingerprint(cfg, datasets):
    """SHA-256 of what a run reads: every training and test item (its path under the data root, its label), so
    that a resumed run sees the same few-shot images and the same test sets."""
    root = os.path.abspath(Path(cfg.root).expanduser())
    train_set, eval_sets = datasets
    h = hashlib.sha256()
    for name, items in [("train", train_set.train if train_set else []), *((s, d.test) for s, d in eval_sets.items())]:
        h.update(f"[{name}]\n".encode())
        for it in items:
            h.update(f"{os.path.relpath(os.path.abspath(it.impath), root)}\t{it.label}\n".encode())
    return h.hexdigest()[:16]


# ---------------------------------------------------------------------------------------------------- protocols

def _protocol_datasets(cfg, seed):
    """(training Dataset or None, {split name: Dataset to evaluate}) for the chosen protocol."""
    root = Path(cfg.root).expanduser()

    def build(name, subsample="all", shots=cfg.shots):
        return data.build_dataset(name, root, shots=shots, seed=seed, subsample=subsample, download=cfg.download)

    if cfg.protocol == "base2new":
        base, new = build(cfg.data, "base"), build(cfg.data, "new")
        return base, {"base": base, "new": new}
    train_set = build(cfg.data)
    if cfg.protocol == "fewshot":
        return train_set, {"all": train_set}
    # the source dataset first (CoCoOp's tables show it beside the targets), then each target's test set
    return train_set, {cfg.data: train_set, **{name: build(name, shots=0) for name in _targets(cfg)}}


def _targets(cfg):
    """The datasets a cross-dataset or domain-generalization run is evaluated on, besides its source."""
    targets = cfg.eval_data or (DG_TARGETS if cfg.protocol == "dg" else CROSS_TARGETS)
    return [name for name in targets if name != cfg.data]


# ---------------------------------------------------------------------------------------------------- run folders

RUN_FILES = ("config.json", "log.jsonl", "checkpoint.pt", "adapters.pt", "results.json", "merged.pt", "context.pt")


def _run_folder(cfg, seed):
    """--out ({seed} in it becomes the seed), else runs/<data>_<protocol>_<K>shot_<method>_seed<S>: each row of
    the ablation table gets its own folder; --eval-only's folder sits beside the adapters file."""
    if cfg.out:
        return Path(cfg.out.replace("{seed}", str(seed)))
    if cfg.eval_only:  # beside the training run, never into its files
        return Path(cfg.adapters).resolve().parent / f"eval_{cfg.data}_{cfg.protocol}_seed{seed}"
    if cfg.zero_shot:
        return Path("runs") / f"{cfg.data}_{cfg.protocol}_zeroshot_seed{seed}"
    return Path("runs") / f"{cfg.data}_{cfg.protocol}_{cfg.shots}shot_{_method_tag(cfg)}_seed{seed}"


def _method_tag(cfg):
    """The table label as a folder name: "OrthSR + CoOp (w/o CutOut)" -> "orthsr+coop-no-cutout"."""
    name = method_name(cfg).lower().replace("(+ ", "(").replace(", + ", "+").replace(" + ", "+").replace("w/o ", "no-")
    return "-".join(name.replace("(", " ").replace(")", " ").replace(",", " ").split())


@contextmanager
def _exclusive(folder, cfg, plan):
    """Hold the run folder for one run: created if needed and locked against concurrent use (flock, which the
    kernel releases when a run crashes). What it holds was checked by _plan_runs; it is checked again under the
    lock. A folder made here that is still empty at the end is removed again."""
    created = not folder.exists()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        lock = open(folder / ".lock", "a")
    except OSError as e:
        _fail(f"cannot use {folder} as the run folder: {e.strerror or e}")
    try:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            _fail(f"{folder} is in use by another run (its .lock is held): wait for it, or choose another --out")
        try:
            if _run_state(folder) != _PLAN_STATE[plan] and not (plan == "new" and cfg.overwrite):
                _fail(f"{folder} changed while this run was starting (another run?): start again")
            for name in RUN_FILES:  # a write that a killed run left half done (none is in progress: we hold the lock)
                for stale in folder.glob(f".{name}.*.tmp"):
                    stale.unlink(missing_ok=True)
            try:
                yield folder
            except BaseException:  # stopped (an error, Ctrl-C) before a new run left anything to continue from:
                if plan == "new" and _run_state(folder) == "partial":  # nothing half-written is kept
                    _clear(folder, evaluations=False)  # only what this run wrote
                raise
        finally:
            (folder / ".lock").unlink(missing_ok=True)
    finally:
        lock.close()
        if created and not any(folder.iterdir()):
            folder.rmdir()


def _clear(folder, evaluations=True):
    """--overwrite: the previous run's files go, once the new run has passed every check, with the evaluations of
    its adapters that --eval-only wrote beside them (they would describe adapters that no longer exist)."""
    for name in RUN_FILES:
        (folder / name).unlink(missing_ok=True)
    for evaluation in folder.glob("eval_*_seed*") if evaluations else ():
        if evaluation.is_dir() and not evaluation.is_symlink() and (evaluation / "config.json").is_file():
            shutil.rmtree(evaluation)


def _run_state(folder):
    """'done' (results.json), 'checkpoint' (checkpoint.pt, unfinished), 'partial' (a run that stopped before
    its first checkpoint) or 'empty'."""
    if (folder / "results.json").exists():
        return "done"
    if (folder / "checkpoint.pt").exists():
        return "checkpoint"
    return "partial" if any((folder / name).exists() for name in RUN_FILES) else "empty"


_PLAN_STATE = {"new": "empty", "resume": "checkpoint", "done": "done"}


def _plan_runs(cfg):
    """What each seed's run does: ("new", None), ("resume", checkpoint) or ("done", results) (--resume keeps a
    finished seed of a sweep as it is). One-line errors, before any data is read, for folders that cannot take
    their run; a checkpoint or finished run whose recorded settings differ from this run's is refused here."""
    folders = {seed: _run_folder(cfg, seed) for seed in cfg.seeds}
    for folder in folders.values():
        _check_writable(folder)
    if cfg.eval_only:
        adapters = Path(cfg.adapters).resolve()
        for folder in folders.values():
            if adapters.parent == folder.resolve():
                _fail(f"--out {folder} holds the adapters being evaluated ({adapters.name}): --eval-only writes its "
                      f"own folder; choose another --out")
    states = {seed: _run_state(folder) for seed, folder in folders.items()}
    if not cfg.resume:
        for seed, folder in folders.items():
            held = [name for name in RUN_FILES if (folder / name).exists()]
            if held and not cfg.overwrite:
                way = {"checkpoint": "continue exactly that run with --resume, replace it with --overwrite",
                       "done": "it is finished: replace it with --overwrite",
                       "partial": "it stopped before its first checkpoint: replace it with --overwrite"}[states[seed]]
                _fail(f"{folder} already holds a run ({', '.join(held)}): {way}, or choose another --out")
        return {seed: ("new", None) for seed in folders}
    first = folders[cfg.seeds[0]]
    if all(state == "done" for state in states.values()):
        _fail(f"--resume: {first} holds a finished run (results.json){' and so does every seed' * (len(states) > 1)}; "
              f"there is nothing to resume")
    if all(state == "empty" for state in states.values()):
        _fail(f"--resume: no checkpoint in {first} (expected {first / 'checkpoint.pt'}); check --out, or start "
              f"a new run without --resume")
    plan = {}
    for seed, state in states.items():
        folder = folders[seed]
        if state == "partial":
            only = f"--seeds {seed} --overwrite (that seed only)" if len(folders) > 1 else "--overwrite"
            _fail(f"--resume: {folder} holds a run that stopped before its first checkpoint; start it again with "
                  f"{only}")
        if state == "done":
            plan[seed] = ("done", _read_finished_run(folder, cfg, seed))
        elif state == "checkpoint":
            plan[seed] = ("resume", _load_checkpoint(folder / "checkpoint.pt", cfg, seed))
        else:
            plan[seed] = ("new", None)
    return plan


def _check_writable(folder):
    """--out (or a default run folder) must be a folder, or creatable, and writable."""
    unreachable = _unreachable("--out", folder)  # a name too long (after {seed}), no permission
    if unreachable:
        _fail(unreachable)
    for path in [folder, *folder.parents]:
        if os.path.lexists(path) and not path.exists():
            _fail(f"--out {folder}: {path} is a dangling symlink or a symlink loop")
        if path.exists() and not path.is_dir():
            _fail(f"--out {folder}: {path} is a file, not a folder")
        if path.exists():
            if not os.access(path, os.W_OK | os.X_OK):
                _fail(f"--out {folder}: {path} is not writable")
            return


def _read_finished_run(folder, cfg, seed):
    """The results.json of a finished seed that --resume keeps, refused unless it was run with these settings."""
    config, results = (_read_json_record(folder / name) for name in ("config.json", "results.json"))
    _compare_settings(folder / "config.json", config, cfg, seed, later=("checkpoint_sha256", "data_sha256"))
    _check_results_record(folder / "results.json", results, cfg, seed)
    return config, results


def _check_results_record(path, record, cfg, seed):
    """A finished seed's results.json must be what this run would have written, down to each split's accuracy:
    it goes into the table beside the seeds trained now."""
    expected = {"data": cfg.data, "protocol": cfg.protocol, "shots": cfg.shots, "seed": seed,
                "method": method_name(cfg), "eval_limit": cfg.eval_limit}
    for key, value in expected.items():
        if record.get(key) != value:
            _fail(f"--resume: {path} records {key} = {record.get(key, '(nothing)')!r}, this run has {value!r}: it "
                  f"is not this seed's results")
    splits = {"base2new": ["base", "new"], "fewshot": ["all"]}.get(cfg.protocol) or [cfg.data, *_targets(cfg)]
    results = record.get("results")
    for split in splits:
        r = results.get(split) if isinstance(results, dict) else None
        number = isinstance(r, dict) and type(r.get("accuracy")) in (int, float) and type(r.get("n")) is int
        if not (number and 0 <= r["accuracy"] <= 100 and r["n"] >= 0):
            _fail(f"--resume: {path}: results[{split!r}] is not {{'accuracy': 0-100, 'n': count, ...}} as "
                  f"train.py writes it; rerun that seed alone with --seeds {seed} --overwrite")


def _read_json_record(path):
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError) as e:
        _fail(f"--resume: cannot read {path}: {e}".splitlines()[0])
    if not isinstance(record, dict):
        _fail(f"--resume: {path} is not a record written by train.py")
    return record


def _compare_settings(path, recorded, cfg, seed, data_sha256=None, later=(), only=None):
    """Refuse, naming the first difference and both values, a record written with other result settings.
    `later`: keys not known yet (compared once the model's checksum and the data are known), `only`: just those."""
    current = _result_settings(cfg, seed, data_sha256)
    for key in only or current:
        if key in later:
            continue
        value = current[key]
        if recorded.get(key, "(not recorded)") != value:
            _fail(f"--resume: {path} was written with {key} = {recorded.get(key, '(not recorded)')!r}, this run has "
                  f"{key} = {value!r}; resume with the run's own settings, or start a new run")


def _write_json(path, obj):
    """Every file of a run goes through files.write_atomic: a temporary name, fsync, then the rename."""
    _write_file(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=2) + "\n"))


def _write_torch(path, obj):
    def write(tmp):
        with open(tmp, "wb") as f:  # through a Python file, a full disk is an OSError (ENOSPC), not a torch error
            torch.save(obj, f)
    _write_file(path, write)


def _write_file(path, write):
    """files.write_atomic, with a full disk as one line that names the file (the previous file is kept)."""
    try:
        files.write_atomic(path, write)
    except OSError as e:
        _disk_error(path, e, f"the previous {path.name} is kept" if path.exists() else "nothing was written")


def _disk_error(path, error, kept):
    """One line for a failed write; on a full disk, first the command that resumes the run, if it can be."""
    if error.errno != errno.ENOSPC:
        _fail(f"cannot write {path}: {error.strerror or error}")
    if (path.parent / "checkpoint.pt").is_file():
        _say(f"free some space, then resume with:\n  {_resume_command(path.parent)}")
    _fail(f"cannot write {path}: no space left on device (ENOSPC); {kept}")


_PATH_FLAGS = ("--out", "--root", "--weights", "--adapters", "--download-root")


def _resume_command(folder):
    """The command that continues this run: the same flags plus --resume, minus --overwrite (which would
    discard what was just saved), with absolute paths so that it works from any folder. Quoted, so that
    paths with spaces survive copy and paste."""
    argv = []
    for a in sys.argv:  # --flag=value as --flag value, so that paths can be made absolute
        argv += a.split("=", 1) if a.startswith("--") and "=" in a else [a]
    argv = [a for a in argv if a != "--overwrite"]
    for i, a in enumerate(argv[:-1]):
        if a in _PATH_FLAGS:
            argv[i + 1] = str(Path(argv[i + 1]).expanduser().resolve())
    argv[0] = str(Path(argv[0]).resolve()) if argv[0].endswith(".py") else argv[0]
    argv += [] if "--resume" in argv else ["--resume"]
    if "--out" not in argv:  # the default folder, named (with {seed} for a sweep): the command works from anywhere
        seeds = argv[argv.index("--seeds") + 1:] if "--seeds" in argv else []
        several = len(list(itertools.takewhile(lambda a: not a.startswith("--"), seeds))) > 1
        out = folder.resolve()
        argv += ["--out", str(out.parent / re.sub(r"_seed\d+$", "_seed{seed}", out.name)) if several else str(out)]
    return shlex.join([sys.executable, *argv])


# ---------------------------------------------------------------------------------------------------- checkpoints

def _save_checkpoint(folder, cfg, seed, data_sha256, step, total, adapters, context, optimizer, scaler, generator):
    """Everything a resumed run needs to continue bit for bit, with the settings it must be resumed with.
    Non-finite trainables are never saved: the last good checkpoint stays the last one."""
    if not all(torch.isfinite(P).all() for P in trainable_tensors(adapters, context)):
        _fail(f"non-finite adapters after step {step} (the loss and gradient were finite: the optimizer's state?); "
              f"the last good checkpoint is {folder / 'checkpoint.pt'}", code=3)
    _write_torch(folder / "checkpoint.pt", {
        "step": step, "total": total, "adapters": {k: P.detach().cpu() for k, P in adapters.items()},
        "context": None if context is None else context.detach().cpu(),
        "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
        "rng": {"torch": torch.get_rng_state(), "cutout": generator.get_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
        "settings": _result_settings(cfg, seed, data_sha256), "code_version": _code_version()})


def _resume_from(state, folder, adapters, context, optimizer, scaler, generator):
    """Load a checkpoint (checked completely before the model was loaded) into the fresh trainables, the
    optimizer, the scaler and every RNG; trim the step log to the checkpoint's step. Returns the step."""
    with torch.no_grad():
        for k, P in adapters.items():
            P.copy_(state["adapters"][k])
        if context is not None:
            context.copy_(state["context"])
    optimizer.load_state_dict(state["optimizer"])
    scaler.load_state_dict(state["scaler"])
    torch.set_rng_state(state["rng"]["torch"])
    generator.set_state(state["rng"]["cutout"])
    if state["rng"]["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    _write_file(folder / "log.jsonl", lambda tmp: tmp.write_text("".join(_log_lines_until(folder, state["step"]))))
    _say(f"resumed from {folder / 'checkpoint.pt'} at step {state['step']}/{state['total']}")
    return state["step"]


def _log_lines_until(folder, step):
    """The step log's lines up to `step`; a line cut short by a crash (or not a step record) is dropped."""
    path, kept = folder / "log.jsonl", []
    for line in path.read_text(errors="replace").splitlines() if path.is_file() else []:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and type(record.get("step")) is int and record["step"] <= step:
            kept.append(line + "\n")
    return kept


def _load_checkpoint(path, cfg, seed):
    """A checkpoint, refused with one line unless its structure is train.py's and it was written with this run's
    settings (the model's checksum and the data are compared once known: _check_checkpoint)."""
    state = _load_trusted(path, "checkpoint")
    expected = {"step": int, "total": int, "adapters": dict, "optimizer": dict, "scaler": dict, "rng": dict,
                "settings": dict}
    for key, kind in expected.items():
        if type(state.get(key)) is not kind:
            _fail(f"{path} is not a checkpoint written by train.py: '{key}' is missing or not a {kind.__name__}")
    _compare_settings(path, state["settings"], cfg, seed, later=("checkpoint_sha256", "data_sha256"))
    return state


def _check_checkpoint(path, state, cfg, seed, data_sha256, total, adapters, context):
    """The rest of a checkpoint's checks: the base model and the data, the steps, every tensor's shape, dtype and
    finiteness, the optimizer's and the scaler's state, the RNG states. `adapters` and `context` are this run's
    trainables (on the meta device: only their shapes count)."""
    _compare_settings(path, state["settings"], cfg, seed, data_sha256, only=("checkpoint_sha256", "data_sha256"))
    if not (0 <= state["step"] <= total and state["total"] == total):
        _fail(f"{path}: step {state['step']} of {state['total']} does not fit this run's {total} steps")
    _check_trainables(path, state["adapters"], state.get("context"), adapters, context)
    _check_optimizer_state(path, state["optimizer"], [P.shape for P in trainable_tensors(adapters, context)],
                           state["step"])
    fresh = _grad_scaler(cfg).state_dict()
    if set(state["scaler"]) != set(fresh) or any(type(state["scaler"][k]) is not type(v) for k, v in fresh.items()):
        _fail(f"{path}: the grad scaler's state {state['scaler']!r} is not that of a {cfg.precision} run")
    rng, size = state["rng"], torch.get_rng_state().shape
    for key in ("torch", "cutout"):
        if not (isinstance(rng.get(key), torch.Tensor) and rng[key].dtype == torch.uint8 and rng[key].shape == size):
            _fail(f"{path}: the {key} random state is missing or not a generator state")
    if not isinstance(rng.get("cuda"), list):
        _fail(f"{path}: the CUDA random states are missing")
    if state.get("code_version") not in (None, _code_version()):
        warnings.warn(f"{path} was written by other code (version {state['code_version']}, now {_code_version()}): "
                      f"the resumed run may differ from an uninterrupted one")


def _check_optimizer_state(path, optimizer, shapes, step):
    """AdamW's state must hold, for each trainable tensor, finite moments of its shape (after the first step)."""
    groups, moments = optimizer.get("param_groups"), optimizer.get("state")
    if not (isinstance(groups, list) and len(groups) == 1 and isinstance(groups[0], dict)
            and isinstance(groups[0].get("params"), list) and len(groups[0]["params"]) == len(shapes)
            and isinstance(moments, dict)):
        _fail(f"{path}: the optimizer's state is not AdamW's over this run's {len(shapes)} trainable tensors")
    for index, shape in zip(groups[0]["params"], shapes):
        entry = moments.get(index)
        if entry is None and step == 0:
            continue
        if not (isinstance(entry, dict) and all(isinstance(entry.get(k), torch.Tensor) and entry[k].shape == shape
                                                and torch.isfinite(entry[k]).all() for k in ("exp_avg", "exp_avg_sq"))
                and isinstance(entry.get("step"), torch.Tensor) and torch.isfinite(entry["step"]).all()):
            _fail(f"{path}: the optimizer's moments of tensor {index} are missing, of the wrong shape or non-finite")


def _check_trainables(path, saved_adapters, saved_context, adapters, context):
    """The saved tensors must be exactly this run's: same keys, same shapes, floating point, finite."""
    def describe(t):
        return tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__

    for key, P in adapters.items():
        saved = saved_adapters.get(key)
        if not isinstance(saved, torch.Tensor) or saved.shape != P.shape:
            _fail(f"{path}: adapter {key} has shape {describe(saved)}, this run expects {tuple(P.shape)}")
    if set(saved_adapters) - set(adapters):
        _fail(f"{path}: adapter {sorted(set(saved_adapters) - set(adapters))[0]} is not part of this run's layout")
    if (context is None) != (saved_context is None) or (
            context is not None and (not isinstance(saved_context, torch.Tensor) or saved_context.shape != context.shape)):
        _fail(f"{path}: CoOp context {None if saved_context is None else describe(saved_context)} does not match this "
              f"run's {None if context is None else tuple(context.shape)}")
    for key, P in [*saved_adapters.items(), *([("context", saved_context)] if saved_context is not None else [])]:
        if not P.is_floating_point():
            _fail(f"{path}: {key} holds {P.dtype} values, not floating point")
        if not torch.isfinite(P).all():
            _fail(f"{path}: {key} holds non-finite values")


# ---------------------------------------------------------------------------------------------------- adapters files

def _save_adapters(path, adapters, context, cfg, seed, data_sha256):
    """Only the trainable tensors (a few hundred MB at most), with the layout and the full training settings."""
    _write_torch(path, {"adapters": {k: P.detach().cpu() for k, P in adapters.items()},
                        "context": None if context is None else context.detach().cpu(),
                        "config": {"model": _model_label(cfg), "checkpoint_sha256": cfg.checkpoint_sha256,
                                   "targets": list(cfg.targets), "blocks": cfg.blocks, "towers": list(cfg.towers),
                                   "neumann": cfg.neumann, "prompt": cfg.prompt, "n_ctx": cfg.n_ctx,
                                   "ctx_init": cfg.ctx_init},
                        "settings": _result_settings(cfg, seed, data_sha256)})


# what --eval-only may take from an adapters file, and what each must be
_SAVED_KINDS = {"data": lambda v: v in data.DATASETS, "protocol": lambda v: v in PROTOCOLS,
                "shots": lambda v: type(v) is int and v >= 1, "seed": lambda v: type(v) is int and 0 <= v < 2**32,
                "targets": lambda v: isinstance(v, list) and all(isinstance(t, str) for t in v),
                "blocks": lambda v: type(v) is int and v >= 1,
                "towers": lambda v: isinstance(v, list) and v and set(v) <= set(orthcr.TOWER_PREFIX),
                "neumann": lambda v: type(v) is int and v >= 0, "prompt": lambda v: v in ("fixed", "coop"),
                "n_ctx": lambda v: type(v) is int and v >= 1, "ctx_init": lambda v: v is None or isinstance(v, str),
                "checkpoint_sha256": lambda v: v is None or isinstance(v, str),
                # the training settings, for the evaluation's label and record
                **{k: lambda v: type(v) is int and v >= 0 for k in ("epochs", "batch_size", "warmup_steps",
                                                                    "cutout_size", "cutout_holes")},
                **{k: lambda v: type(v) in (int, float) and math.isfinite(v) and v >= 0
                   for k in ("lr", "weight_decay", "lambda1", "lambda2")},
                "cutout": lambda v: v in orthcr.CUTOUT_MODES,
                "cutout_temperature": lambda v: v is None or (type(v) in (int, float) and v > 0)}


def _read_training_settings(path, saved):
    """The training settings recorded in an adapters file (`saved`, its content): what --eval-only takes when a
    flag is not given."""
    if not isinstance(saved.get("adapters"), dict):
        _fail(f"{path} holds no 'adapters' entry: not an adapters.pt written by train.py")
    if "optimizer" in saved or "step" in saved:
        _fail(f"{path} is a training checkpoint (step {saved.get('step')}), not finished adapters: continue its run "
              f"with --resume")
    for part in ("config", "settings"):
        if not isinstance(saved.get(part, {}) or {}, dict):
            _fail(f"{path}: its '{part}' is a {type(saved[part]).__name__}, not the record train.py writes")
    settings = {**(saved.get("config") or {}), **(saved.get("settings") or {})}
    for key, valid in _SAVED_KINDS.items():
        if key in settings and not valid(settings[key]):
            _fail(f"{path}: its recorded {key} = {settings[key]!r} is not a valid setting")
    return settings


def _check_training_flags(args, saved, given):
    """--eval-only with a flag that contradicts the adapters file: one line. The training settings would describe
    a training that never happened, shots and seed would label another run, --neumann would evaluate another
    transform; the same value, as in a repeated training command, is fine."""
    if args.seeds and len(args.seeds) > 1:
        _fail(f"--eval-only evaluates one adapters file, trained with one seed: drop --seeds {' '.join(map(str, args.seeds))}")
    for k in (*_TRAINING_ONLY, "shots", "neumann", "seeds"):
        recorded = "seed" if k == "seeds" else k
        if k not in given or recorded not in saved:
            continue
        value = args.seeds[0] if k == "seeds" else getattr(args, k)
        if value != saved[recorded]:
            flag = f"--{k.replace('_', '-')}"
            _fail(f"{flag} {value} contradicts {args.adapters}, trained with {recorded} = {saved[recorded]}: "
                  f"--eval-only evaluates the adapters as they were trained; drop {flag}")


def _check_evaluation(cfg, saved):
    """--eval-only must evaluate the adapters as what they are: on the base model they were trained on, and
    without calling "new" the classes they were trained on."""
    trained = saved.get("checkpoint_sha256")
    if trained and cfg.checkpoint_sha256 and trained != cfg.checkpoint_sha256:
        _fail(f"--adapters {cfg.adapters} were trained on a base model with SHA-256 {trained[:16]}..., not on "
              f"{_model_label(cfg)} ({cfg.checkpoint_sha256[:16]}...): pass that model's --weights or --model")
    if (cfg.protocol == "base2new" and saved.get("data") == cfg.data
            and saved.get("protocol") in ("fewshot", "cross", "dg")):
        _fail(f"--adapters {cfg.adapters} were trained on all classes of {cfg.data} (--protocol "
              f"{saved['protocol']}): base-to-new would call trained classes new; evaluate with --protocol fewshot")


def _read_adapters_once(path):
    """An adapters file read once: its content, the SHA-256 of those bytes and the training settings they record,
    so that what is evaluated, hashed, labelled and recorded is one and the same file."""
    try:
        blob = Path(path).read_bytes()
    except OSError as e:
        _fail(f"cannot read adapters file {path}: {e.strerror or e}")
    saved = _load_trusted(path, "adapters", blob=blob)
    return {"saved": saved, "sha256": hashlib.sha256(blob).hexdigest(),
            "settings": _read_training_settings(path, saved)}


def _read_adapters_file(path, adapters_file, params, cfg):
    """(adapters, context, what was evaluated) of an adapters file read by _read_adapters_once, checked against
    the model and this run's layout: a partial or foreign file names its first mismatching tensor (in state-dict
    order) and is never evaluated."""
    saved = adapters_file["saved"]
    evaluated = {"adapters": str(Path(path).resolve()), "adapters_sha256": adapters_file["sha256"],
                 "training_settings": adapters_file["settings"]}
    try:
        orthcr.check_adapters(params, saved["adapters"])
    except (ValueError, AttributeError, TypeError) as e:
        _fail(f"{path} does not fit this model: {e}")
    expected, expected_context = init_trainables(params, cfg, 0)  # the layout this run evaluates
    first = next((k for k in params if (k in expected) != (k in saved["adapters"])
                  or (k in expected and saved["adapters"][k].shape != expected[k].shape)), None)
    if first is not None:
        config = saved.get("config") or {}
        _fail(f"{path} was made for another configuration (its config: --targets "
              f"{' '.join(config.get('targets', ['?'])) or 'none'} --blocks {config.get('blocks', '?')} --towers "
              f"{' '.join(config.get('towers', ['?']))}, model {config.get('model', '?')}); first mismatching tensor "
              f"{first}: this run expects {tuple(expected[first].shape) if first in expected else 'no adapter'}, "
              f"the file has {tuple(saved['adapters'][first].shape) if first in saved['adapters'] else 'none'}")
    _check_trainables(path, saved["adapters"], saved.get("context"), expected, expected_context)
    context = saved.get("context")
    return ({k: P.to(cfg.device) for k, P in saved["adapters"].items()},
            None if context is None else context.to(cfg.device), evaluated)


def _export(folder, merged, context, cfg):
    """merged.pt: the merged weights as a state dict in OpenAI's key format (fp32, or fp16 as OpenAI ships
    them); the learned CoOp context beside it in context.pt, since OpenAI's format has no place for it."""
    dtype = torch.float16 if cfg.export_dtype == "fp16" else torch.float32
    _write_torch(folder / "merged.pt", {k: v.to("cpu", dtype if v.is_floating_point() else v.dtype)
                                        for k, v in merged.items()})
    _say(f"merged weights written to {folder / 'merged.pt'} ({cfg.export_dtype})")
    if context is not None:
        _write_torch(folder / "context.pt", {"context": context.detach().cpu(), "n_ctx": cfg.n_ctx,
                                             "ctx_init": cfg.ctx_init, "prompt": "[SOS] ctx_1..ctx_n {class}. [EOS]"})
        _say(f"CoOp context written to {folder / 'context.pt'}")


def _load_trusted(path, what, blob=None):
    """torch.load with weights_only=True: tensors and plain containers only, no code from the file runs; the
    archive's records checked first, so that a small file cannot inflate into a large allocation. With `blob`,
    the file's bytes already read are loaded."""
    article = "an" if what[0] in "aeiou" else "a"
    try:
        if not Path(path).is_file():
            _fail(f"{path} is not a regular file: not {article} {what} file")
        if Path(path).stat().st_size == 0 or blob == b"":
            _fail(f"{path} is empty (0 bytes): not {article} {what} file")
        checkpoints.check_torch_file(path, blob)
        source = path if blob is None else io.BytesIO(blob)
        obj = torch.load(source, map_location="cpu", weights_only=True)
    except ValueError as e:
        _fail(f"{str(e).splitlines()[0]}: not {article} {what} file written by train.py")
    except OSError as e:
        _fail(f"cannot read {what} file {path}: {e.strerror or e}")
    except Exception as e:
        _fail(f"{path} is not a valid {what} file (loaded with weights_only=True): {str(e).splitlines()[0]}")
    if not isinstance(obj, dict):
        _fail(f"{path} is not {article} {what} file written by train.py (it holds a {type(obj).__name__})")
    return obj


# ---------------------------------------------------------------------------------------------------- the loop's helpers

def _stop_if_not_finite(loss, adapters, context, scaler, step, folder):
    """A non-finite loss or gradient stops the run before it can reach P or a checkpoint (the fp16 scaler
    skips inf/NaN gradient steps itself). Reads values: one device sync per step."""
    if not torch.isfinite(loss):
        what = f"loss ({loss.item()})"
    elif not scaler.is_enabled() and not all(P.grad.isfinite().all() for P in trainable_tensors(adapters, context)):
        what = "gradient"
    else:
        return
    last = folder / "checkpoint.pt"
    _fail(f"non-finite {what} at step {step}; the last good checkpoint is "
         f"{last if last.is_file() else 'none (no checkpoint was saved yet)'}", code=3)


def _stop_interrupted(folder, step, total):
    _say(f"checkpoint saved to {folder / 'checkpoint.pt'} at step {step}/{total}; resume with:\n  "
        f"{_resume_command(folder)}")
    raise SystemExit(130)


class _Interrupt:
    """The first Ctrl-C (or SIGTERM, as a job scheduler sends) asks the loop to checkpoint and stop after the
    current step; a second one stops at once."""

    def __init__(self):
        self.requested = False

    def __enter__(self):
        self.previous = {sig: signal.signal(sig, self.handle) for sig in (signal.SIGINT, signal.SIGTERM)}
        return self

    def handle(self, signum, frame):
        self.requested = True
        for sig in self.previous:
            signal.signal(sig, signal.default_int_handler)
        _say(f"\n{signal.Signals(signum).name}: saving a checkpoint after this step (Ctrl-C again to abort)")

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


class _Bookkeeping:
    """Everything around a step that is not the method: log.jsonl (one JSON line per step, flushed), the
    checkpoint at each epoch's end (or every --save-every steps) and on Ctrl-C, the progress line."""

    def __init__(self, folder, cfg, step, total, save):
        self.folder, self.cfg, self.total, self.save = folder, cfg, total, save
        per_epoch = total // cfg.epochs
        self.save_every = cfg.save_every or per_epoch
        self.progress = _Progress(step, total, cfg.batch_size)

    def __enter__(self):
        self.interrupt = _Interrupt().__enter__()
        self.log = open(self.folder / "log.jsonl", "a")
        return self

    def after_step(self, step, epoch, lr, loss, terms):
        self.log_step(step, epoch, lr, loss, terms)
        if self.interrupt.requested or step % self.save_every == 0 or step == self.total:
            self.save(step)  # at each epoch's end (or every --save-every steps), at the last step, on Ctrl-C
        if self.interrupt.requested:
            _stop_interrupted(self.folder, step, self.total)
        if step % self.cfg.log_every == 0 or step == self.total:
            self.progress.report(step, epoch, self.cfg.epochs, lr, terms)

    def log_step(self, step, epoch, lr, loss, terms):
        """One JSON line in log.jsonl, flushed: reads the loss terms' values (a device sync)."""
        record = {"step": step, "epoch": epoch + 1, "lr": lr, "loss": loss.item(),
                  **{k: v.item() for k, v in terms.items()}, "step_s": self.progress.tick()}
        try:
            self.log.write(json.dumps(record) + "\n")
            self.log.flush()
        except OSError as e:
            _disk_error(self.folder / "log.jsonl", e, "the steps before are kept")

    def __exit__(self, *exc):
        self.interrupt.__exit__(*exc)
        try:
            self.log.close()
        except OSError:
            pass  # a full disk was reported when the line was written


class _Progress:
    """One stderr line per --log-every steps: loss terms, lr, images/s and the time left."""

    def __init__(self, step, total, batch_size):
        self.start, self.start_step, self.total, self.batch_size = time.monotonic(), step, total, batch_size
        self.last, self.terms = self.start, {}

    def tick(self):
        now, last = time.monotonic(), self.last
        self.last = now
        return now - last

    def report(self, step, epoch, epochs, lr, terms):
        rate = (step - self.start_step) / max(time.monotonic() - self.start, 1e-9)
        parts = " ".join(f"{k} {v.item():.4f}" for k, v in terms.items())
        _say(f"step {step}/{self.total} epoch {epoch + 1}/{epochs} ({parts}) lr {lr:.2e} "
            f"{rate * self.batch_size:.1f} img/s ETA {_duration((self.total - step) / max(rate, 1e-9))}")


def _duration(seconds):
    """H:MM:SS, with as many hours as it takes (never wraps at 24 h)."""
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


# ---------------------------------------------------------------------------------------------------- messages

def _say(message):
    print(message, file=sys.stderr, flush=True)


def _fail(message, code=1):
    """Stop with one `error: ...` line on stderr and a non-zero exit, no traceback."""
    if code == 1:
        raise SystemExit(f"error: {message}")  # Python prints it and exits with 1
    _say(f"error: {message}")
    raise SystemExit(code)


def _one_line_warnings():
    """Warnings as one `warning: ...` line each, without Python's category and source line."""
    warnings.showwarning = lambda message, *args, **kwargs: _say(f"warning: {message}")


# ---------------------------------------------------------------------------------------------------- the command line

class _Parser(argparse.ArgumentParser):
    """argparse, with a flag error as one line (not the usage block first): `train.py: error: ... (see --help)`."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Every flag's help ends with its default: the declared one, or the one its text states."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "(default" not in text and not any(action.default is x for x in (None, False, argparse.SUPPRESS)):
            shown = " ".join(map(str, action.default)) if isinstance(action.default, (list, tuple)) else action.default
            text += f" (default: {shown})"
        return text


def parser():
    datasets = ", ".join(data.DATASETS)
    p = _Parser(prog="train.py", description=__doc__, formatter_class=_HelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--data", default=None, choices=list(data.DATASETS), metavar="NAME",
                   help=f"benchmark to train on: {datasets} (default: eurosat; --eval-only: the adapters file's)")
    g.add_argument("--root", default=os.environ.get("ORTHCR_DATA", "~/data"), metavar="DIR",
                   help="folder holding the datasets in CoOp's layout (default: $ORTHCR_DATA, else ~/data)")
    g.add_argument("--protocol", default=None, choices=PROTOCOLS,
                   help="base2new: train on the base classes, test base and new; fewshot: all classes; cross: "
                        "train on ImageNet, test 10 datasets; dg: train on ImageNet, test its 4 variants "
                        "(default: base2new; --eval-only: the adapters file's)")
    g.add_argument("--shots", type=int, default=None, metavar="K",
                   help="training images per class (default: 16; --eval-only: the adapters file's)")
    g.add_argument("--seeds", type=int, nargs="+", default=None, metavar="S",
                   help="one run per seed, then a mean ± std table (default: 1)")
    g.add_argument("--no-download", action="store_true", help="never download a dataset; say what is missing")
    g = p.add_argument_group("the method")
    g.add_argument("--targets", nargs="+", default=None, metavar="LAYER",
                   help="layers whose input space R rotates, or 'none' for no orthogonal finetuning (plain CoOp "
                        f"with --prompt coop) (default: {' '.join(LAYOUT['targets'])})")
    g.add_argument("--blocks", type=int, default=None, metavar="R",
                   help=f"diagonal blocks of each R (default: {LAYOUT['blocks']})")
    g.add_argument("--towers", nargs="+", default=None, choices=list(orthcr.TOWER_PREFIX),
                   help=f"towers to finetune (default: {' '.join(LAYOUT['towers'])})")
    g.add_argument("--neumann", type=int, default=None, metavar="N",
                   help="terms of the approximate Cayley transform, which is not exactly orthogonal; 0: the exact "
                        "solve (default: 0)")
    g.add_argument("--lambda1", type=float, default=orthcr.LAMBDA1, metavar="L1",
                   help="weight of KL(zero-shot ‖ finetuned) on the clean images")
    g.add_argument("--lambda2", type=float, default=None, metavar="L2",
                   help=f"weight of the KL on the Cutout images (default: {orthcr.LAMBDA2}; 0 with --cutout none)")
    g.add_argument("--cutout", default="random", choices=orthcr.CUTOUT_MODES,
                   help="random: OrthCR's Cutout (v1); attentive: OrthSR's (v3), the hole on the patch most "
                        "similar to the class text; none: no Cutout views, no Cutout terms")
    g.add_argument("--cutout-size", type=int, default=orthcr.CUTOUT_SIZE, metavar="PX",
                   help="side of the square hole in pixels (16 covers 0.5 %% of a 224 px image)")
    g.add_argument("--cutout-holes", type=int, default=None, metavar="N",
                   help="holes per image, random Cutout only (default: 1)")
    g.add_argument("--cutout-temperature", type=float, default=None, metavar="T",
                   help="attentive Cutout: draw the hole's patch from softmax(similarity / T) instead of taking "
                        "the argmax (default: argmax)")
    g.add_argument("--cutout-grid", default=None, metavar="PNG",
                   help="write a picture of the first training batch (random hole, attentive hole, similarity "
                        "map) to PNG and stop, without training (default: off)")
    g.add_argument("--prompt", default=None, choices=("fixed", "coop"),
                   help="fixed: the dataset's hand-written template; coop: CoOp's learned context "
                        "(default: fixed; --eval-only: the adapters file's)")
    g.add_argument("--n-ctx", type=int, default=None, metavar="N",
                   help=f"--prompt coop: context vectors (default: {N_CTX}, or the words of --ctx-init)")
    g.add_argument("--ctx-init", default=None, metavar="WORDS",
                   help="--prompt coop: initialize the context with these words, e.g. 'a photo of a' "
                        "(default: random, N(0, 0.02^2))")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=EPOCHS, help="passes over the few-shot training set")
    g.add_argument("--batch-size", type=int, default=BATCH_SIZE, metavar="N",
                   help="training images per step, plus their Cutout copies")
    g.add_argument("--lr", type=float, default=LR, help="AdamW's learning rate, the schedule's peak")
    g.add_argument("--weight-decay", type=float, default=WEIGHT_DECAY, metavar="WD", help="AdamW's weight decay on P")
    g.add_argument("--warmup-steps", type=int, default=WARMUP_STEPS, metavar="N",
                   help="linear warm-up (at most a tenth of the steps), then cosine decay to 0")
    g = p.add_argument_group("evaluation")
    g.add_argument("--zero-shot", action="store_true", help="evaluate plain CLIP, no training: the CLIP row")
    g.add_argument("--eval-only", action="store_true", help="evaluate saved --adapters, no training")
    g.add_argument("--adapters", default=None, metavar="FILE", help="the adapters.pt that --eval-only evaluates (default: none)")
    g.add_argument("--eval-data", nargs="+", default=None, choices=list(data.DATASETS), metavar="NAME",
                   help="the datasets that cross and dg evaluate (default: the paper's)")
    g.add_argument("--eval-limit", type=int, default=None, metavar="N",
                   help="evaluate N class-balanced test images per split (default: all)")
    g.add_argument("--eval-batch-size", type=int, default=EVAL_BATCH_SIZE, metavar="N", help="images per batch")
    g = p.add_argument_group("run files")
    g.add_argument("--out", default=None, metavar="DIR",
                   help="the run folder; {seed} in it becomes the seed (default: "
                        "runs/<data>_<protocol>_<K>shot_<method>_seed<S>, <method> the table's label, e.g. "
                        "orthsr+coop; --eval-only: eval_<data>_<protocol>_seed<S> beside the adapters file)")
    g.add_argument("--resume", action="store_true", help="continue the run in the run folder from its checkpoint")
    g.add_argument("--overwrite", action="store_true", help="replace the run already in the run folder")
    g.add_argument("--export", action="store_true", help="also write merged.pt, the merged weights in OpenAI's format")
    g.add_argument("--export-dtype", default="fp32", choices=("fp32", "fp16"),
                   help="merged.pt's dtype; fp16 (OpenAI's) is half the size but rounds small rotations away")
    g.add_argument("--save-every", type=int, default=0, metavar="N",
                   help="checkpoint every N steps; 0: at the end of each epoch")
    g.add_argument("--log-every", type=int, default=1, metavar="N", help="a progress line every N steps")
    g = p.add_argument_group("model and hardware")
    g.add_argument("--model", default="ViT-B/16", choices=clip_min.available_models(),
                   help="OpenAI's CLIP, downloaded and verified once")
    g.add_argument("--weights", default=None, metavar="FILE",
                   help="a local checkpoint to use instead of downloading --model (default: none)")
    g.add_argument("--download-root", default=None, metavar="DIR",
                   help="where --model is cached (default: ~/.cache/clip, as OpenAI's clip package)")
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu, cuda or cuda:N (default: cuda where available, else cpu)")
    g.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16"),
                   help="autocast of the towers' matrix products; auto: fp16 with a grad scaler on CUDA, fp32 on "
                        "the CPU")
    g.add_argument("--workers", type=int, default=None, metavar="N",
                   help="data loading processes (default: 0 on the CPU, 8 on CUDA)")
    return p


def parse_args(argv=None):
    """The flags, validated before anything heavy is loaded (exit 2 with one line)."""
    p = parser()
    args = p.parse_args(argv)
    problems = _validate(args)
    if problems:
        p.error("; ".join(problems))
    return args


def _validate(args):
    """Every flag checked before anything is read: a list of one-line problems."""
    bad = []
    positive = dict(epochs=args.epochs, batch_size=args.batch_size, eval_batch_size=args.eval_batch_size,
                    log_every=args.log_every, cutout_size=args.cutout_size, shots=args.shots, blocks=args.blocks,
                    n_ctx=args.n_ctx, cutout_holes=args.cutout_holes)
    bad += [f"--{k.replace('_', '-')} must be >= 1, got {v}" for k, v in positive.items() if v is not None and v < 1]
    non_negative = dict(warmup_steps=args.warmup_steps, neumann=args.neumann, save_every=args.save_every,
                        workers=args.workers)
    bad += [f"--{k.replace('_', '-')} must be >= 0, got {v}" for k, v in non_negative.items() if v is not None and v < 0]
    if not (0 < args.lr < torch.finfo(torch.float32).max):  # AdamW keeps it as a float32 tensor on some paths
        bad.append(f"--lr must be a positive number (below 3.4e38), got {args.lr}")
    for name in ("weight_decay", "lambda1", "lambda2"):
        value = getattr(args, name)
        if value is not None and not (value >= 0 and math.isfinite(value)):
            bad.append(f"--{name.replace('_', '-')} must be a non-negative number, got {value}")
    if args.cutout_temperature is not None and not (args.cutout_temperature > 0 and math.isfinite(args.cutout_temperature)):
        bad.append(f"--cutout-temperature must be a positive number, got {args.cutout_temperature}")
    if args.eval_limit is not None and args.eval_limit < 1:
        bad.append(f"--eval-limit must be >= 1, got {args.eval_limit}")
    if args.seeds is not None:
        if len(set(args.seeds)) != len(args.seeds):
            bad.append(f"--seeds {' '.join(map(str, args.seeds))}: each seed once (a repeated seed repeats its run)")
        bad += [f"--seeds: {s} is not a seed (expected 0 <= seed < 2**32)" for s in args.seeds if not 0 <= s < 2**32]
    bad += _validate_method(args)
    bad += _validate_protocol(args)
    bad += _validate_files(args)
    bad += _validate_device(args)
    return bad


def _validate_method(args):
    """Combinations of the method's flags that make no sense, one line each."""
    bad = []
    no_adapters = args.targets is not None and [t.lower() for t in args.targets] == ["none"]
    if args.targets is not None and "none" in args.targets and len(args.targets) > 1:
        bad.append("--targets none means no orthogonal finetuning: give it alone")
    if no_adapters and (args.blocks is not None or args.towers is not None or args.neumann):
        bad.append("--targets none trains no rotation: --blocks, --towers and --neumann do not apply")
    if no_adapters and args.prompt != "coop" and not args.eval_only:
        bad.append("--targets none leaves nothing to train: add --prompt coop (plain CoOp), or use --zero-shot")
    if args.prompt != "coop" and (args.n_ctx is not None or args.ctx_init is not None):
        bad.append("--n-ctx and --ctx-init set CoOp's learned context: add --prompt coop")
    if args.ctx_init is not None:
        words = len(clip_min.encode(args.ctx_init)) if args.ctx_init.strip() else 0
        if not words:
            bad.append("--ctx-init is empty: give initial words such as 'a photo of a'")
        elif args.n_ctx is not None and args.n_ctx != words:
            bad.append(f"--ctx-init {args.ctx_init!r} is {words} tokens, which sets the context length: "
                       f"drop --n-ctx {args.n_ctx}")
    if args.cutout != "random" and args.cutout_holes is not None and args.cutout_holes != 1:
        bad.append(f"--cutout-holes is for random Cutout; --cutout {args.cutout} cuts "
                   f"{'one hole' if args.cutout == 'attentive' else 'nothing'}")
    if args.cutout_temperature is not None and args.cutout != "attentive":
        bad.append("--cutout-temperature samples attentive Cutout's hole: add --cutout attentive")
    if args.cutout == "none" and args.lambda2:
        bad.append("--lambda2 weighs the KL on Cutout images; --cutout none has none")
    if args.zero_shot and (args.eval_only or args.resume or args.prompt == "coop" or args.targets is not None):
        bad.append("--zero-shot evaluates plain CLIP with the template: it takes no --eval-only, --resume, "
                   "--prompt coop or --targets")
    return bad


def _validate_protocol(args):
    bad = []
    name = args.data or "eurosat"
    if args.protocol == "dg" and name != "imagenet":
        bad.append("--protocol dg trains on imagenet: add --data imagenet")
    if args.protocol == "cross" and name != "imagenet" and args.data is not None:
        bad.append("--protocol cross trains on imagenet (CoCoOp's cross-dataset table): add --data imagenet")
    if data.DATASETS[name].kind in data.TEST_ONLY:
        bad.append(f"--data {name} has no training split (it is an evaluation-only ImageNet variant)")
    if args.eval_data and args.protocol not in ("cross", "dg"):
        bad.append("--eval-data lists the targets of --protocol cross or dg")
    return bad


def _validate_files(args):
    paths = {"--weights": args.weights, "--adapters": args.adapters, "--out": args.out, "--root": args.root,
             "--cutout-grid": args.cutout_grid, "--download-root": args.download_root}
    unreachable = [p for p in (_unreachable(flag, path) for flag, path in paths.items() if path) if p]
    if unreachable:  # a name too long, a folder we may not enter: the checks below could not even ask
        return unreachable
    bad = []
    if args.weights is not None and not Path(args.weights).is_file():
        bad.append(f"--weights {args.weights}: {'not a regular file' if os.path.lexists(args.weights) else 'no such file'}")
    if args.download_root is not None and Path(args.download_root).expanduser().exists() \
            and not Path(args.download_root).expanduser().is_dir():
        bad.append(f"--download-root {args.download_root} is a file, not a folder")
    if args.out is not None and not args.out.strip():
        bad.append("--out is empty: give the run folder, or leave --out out for the default one")
    if args.cutout_grid and Path(args.cutout_grid).is_dir():
        bad.append(f"--cutout-grid {args.cutout_grid} is a folder: give the PNG file to write")
    elif args.cutout_grid and os.path.lexists(args.cutout_grid) and not args.overwrite:
        bad.append(f"--cutout-grid {args.cutout_grid} exists: add --overwrite to replace it")
    elif args.cutout_grid and Path(args.cutout_grid).name in RUN_FILES:
        bad.append(f"--cutout-grid {args.cutout_grid}: {Path(args.cutout_grid).name} is a run file's name; give a .png")
    elif args.cutout_grid and os.path.lexists(args.cutout_grid) and not _is_png(args.cutout_grid):
        bad.append(f"--cutout-grid {args.cutout_grid} exists and is not a PNG: --overwrite replaces only a picture")
    if args.export_dtype != "fp32" and not args.export:
        bad.append(f"--export-dtype {args.export_dtype} is merged.pt's dtype: add --export")
    if args.eval_only and not args.adapters:
        bad.append("--eval-only needs --adapters PATH")
    if args.adapters and not args.eval_only:
        bad.append("--adapters is read by --eval-only: add --eval-only")
    if args.adapters and not Path(args.adapters).is_file():
        bad.append(f"--adapters {args.adapters}: {'not a regular file' if os.path.lexists(args.adapters) else 'no such file'}")
    if args.out and args.seeds and len(args.seeds) > 1 and "{seed}" not in args.out:
        bad.append("--out names one run folder: with several seeds put {seed} in it, e.g. --out runs/lr3e-4_seed{seed}")
    if args.resume and args.overwrite:
        bad.append("--resume continues the run in --out, --overwrite replaces it: choose one")
    if args.cutout_grid and not Path(args.cutout_grid).expanduser().resolve().parent.is_dir():
        bad.append(f"--cutout-grid {args.cutout_grid}: its folder does not exist")
    elif args.cutout_grid and not os.access(Path(args.cutout_grid).expanduser().resolve().parent, os.W_OK):
        bad.append(f"--cutout-grid {args.cutout_grid}: its folder is not writable")
    if args.resume and args.eval_only:
        bad.append("--resume continues training; --eval-only trains nothing")
    if not args.root.strip():
        bad.append("--root (or $ORTHCR_DATA) is empty: give the folder holding the datasets")
    if args.cutout_grid and (args.resume or args.eval_only or args.zero_shot):
        bad.append("--cutout-grid draws a training batch and stops: it takes no --resume, --eval-only or --zero-shot")
    return bad


def _is_png(path):
    try:
        with open(path, "rb") as f:
            return f.read(8) == b"\x89PNG\r\n\x1a\n"
    except OSError:
        return False


def _unreachable(flag, path):
    """One line if the file system cannot even say whether `path` exists (ENAMETOOLONG, EACCES, ELOOP...)."""
    try:
        os.stat(Path(path).expanduser())
    except FileNotFoundError:
        return None
    except NotADirectoryError:
        return None  # a file on the way: the checks below name it
    except OSError as e:
        if e.errno != errno.ELOOP:  # a symlink loop: the run folder checks name it
            return f"{flag} {path}: {e.strerror or e}"
        return None
    except ValueError as e:  # an embedded NUL
        return f"{flag} {path}: {e}"
    return None


def _validate_device(args):
    try:
        device = torch.device(args.device)
    except RuntimeError:
        return [f"--device {args.device}: expected cpu, cuda or cuda:N"]
    if device.type not in ("cpu", "cuda"):
        return [f"--device {args.device}: expected cpu, cuda or cuda:N"]
    if device.type == "cuda" and not torch.cuda.is_available():
        return [f"--device {args.device}: CUDA is not available on this machine"]
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        return [f"--device {args.device}: only {torch.cuda.device_count()} CUDA device(s)"]
    if device.type == "cpu" and args.precision in ("bf16", "fp16"):
        return [f"--precision {args.precision} is for CUDA; the CPU runs in fp32"]
    if device.type == "cuda" and args.precision == "bf16" and torch.cuda.get_device_capability(device)[0] < 8:
        return [f"--precision bf16: {args.device} ({torch.cuda.get_device_name(device)}) has no bf16; use fp16"]
    return []


def _check_root(cfg):
    try:
        data.check_root(Path(cfg.root).expanduser())
    except (data.DataError, OSError) as e:
        _fail(f"--root (or $ORTHCR_DATA): {e}")


def _check_prompts(cfg, datasets):
    """Every prompt the run will tokenize fits CLIP's 77 tokens (a long class name, or a long CoOp context)."""
    for train_set, eval_sets in datasets.values():
        for dataset in [*([train_set] if train_set else []), *eval_sets.values()]:
            prompts = [dataset.template.format(c) for c in dataset.classnames]
            try:
                clip_min.tokenize(prompts)
                if cfg.prompt == "coop":
                    orthcr.coop_tokens(dataset.classnames, cfg.n_ctx, cfg.ctx_init)
            except RuntimeError as e:
                flag = f"--n-ctx {cfg.n_ctx}: " if cfg.prompt == "coop" else ""
                _fail(f"{flag}a prompt of {dataset.name} does not fit CLIP's context: {e}".split(";")[0])


def _check_layout(cfg, path=None):
    """--targets/--blocks/--towers against the model's shapes, known without loading it: from the checkpoint's
    records (tensors as meta tensors: shapes, no data), or, before a named --model is downloaded, from its
    architecture. Returns the trainables this run will have, on the meta device."""
    if path is None and (cfg.weights or cfg.model not in clip_min.CONFIGS):  # a file is read after the data
        return None
    source = path or cfg.model
    if path is None:
        with torch.device("meta"):
            shapes = clip_min.CLIP(**clip_min.CONFIGS[cfg.model]).state_dict()
    else:
        try:
            shapes = {k: torch.empty(s, device="meta") for k, s in clip_min.read_shapes(source).items()}
        except (ValueError, OSError) as e:
            _fail(str(e).splitlines()[0])
    try:
        n_px = clip_min.config_from_state_dict(shapes)["image_resolution"]
    except (ValueError, KeyError, IndexError, TypeError):  # not a CLIP checkpoint: build_model says why, in one line
        try:
            clip_min.build_model(clip_min.read_state_dict(source), source=str(source))
        except ValueError as e:
            _fail(str(e).splitlines()[0])
    if cfg.cutout_size > n_px:
        _fail(f"--cutout-size {cfg.cutout_size} is larger than the model's {n_px} px images")
    try:
        return init_trainables(shapes, cfg, seed=0)
    except (ValueError, KeyError) as e:
        _fail(f"{'--blocks' if 'divisible' in str(e) else '--targets/--towers'} do not fit {source}: {e}")


def main(argv=None):
    _one_line_warnings()
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM stops as Ctrl-C does
    cfg, plan = None, {}
    try:
        args = parse_args(argv)
        adapters_file = _read_adapters_once(args.adapters) if args.eval_only else None
        saved = adapters_file["settings"] if adapters_file else None
        if saved:
            _check_training_flags(args, saved, _given_flags(argv))
        cfg = settings_from(args, saved)
        plan = {} if cfg.cutout_grid else _plan_runs(cfg)  # run folders first: a refused folder costs nothing
        with ExitStack() as held:  # each run folder is locked from here to the end, before any data is read
            for seed, (mode, _) in plan.items():
                held.enter_context(_exclusive(_run_folder(cfg, seed), cfg, mode))
            return _check_and_run(cfg, plan, adapters_file)
    except KeyboardInterrupt:
        _stop_outside_the_loop(cfg, plan)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _given_flags(argv):
    """The names of the flags given on the command line (not those left at their defaults)."""
    p = parser()
    for action in p._actions:
        action.default = argparse.SUPPRESS
    return set(vars(p.parse_args(sys.argv[1:] if argv is None else argv)))


def _stop_outside_the_loop(cfg, plan):
    """Ctrl-C or SIGTERM while loading, checking or evaluating: one line, and the way back where there is one."""
    for seed in plan if cfg else ():
        folder = _run_folder(cfg, seed)
        if (folder / "checkpoint.pt").is_file():
            _fail(f"interrupted; {folder} keeps its checkpoint, continue with: {_resume_command(folder)}", code=130)
    _fail("interrupted", code=130)


def _check_and_run(cfg, plan, adapters_file):
    """The data, then the model, checked completely; then each seed's run and the table."""
    _check_layout(cfg)  # a named model's shapes are known: checked before any data is read or model downloaded
    _check_root(cfg)
    clock = time.monotonic()
    try:  # the datasets are read and checked, completely, before the model is loaded or downloaded
        datasets = {seed: _protocol_datasets(cfg, seed) for seed in cfg.seeds}
    except (data.DataError, OSError) as e:
        _fail(str(e) if isinstance(e, data.DataError) else f"cannot read the data: {e}")
    _check_prompts(cfg, datasets)
    fingerprints = {seed: _data_fingerprint(cfg, datasets[seed]) for seed in cfg.seeds}
    data_s = time.monotonic() - clock
    try:
        path, model_sha256 = clip_min.checkpoint(cfg.weights or cfg.model, cfg.download_root)
        cfg = dataclasses.replace(cfg, checkpoint_sha256=model_sha256)
        adapters, context = _check_layout(cfg, path)
        if cfg.eval_only:
            _check_evaluation(cfg, adapters_file["settings"])
        for seed, (mode, payload) in plan.items():  # what could not be compared before: the model, the data
            folder = _run_folder(cfg, seed)
            if mode == "resume":
                total = cfg.epochs * data.steps_per_epoch(len(datasets[seed][0].train), cfg.batch_size)
                _check_checkpoint(folder / "checkpoint.pt", payload, cfg, seed, fingerprints[seed], total, adapters,
                                  context)
            elif mode == "done":
                _compare_settings(folder / "config.json", payload[0], cfg, seed, fingerprints[seed],
                                  only=("checkpoint_sha256", "data_sha256"))
        _say(f"loading {_model_label(cfg)} ({path.stat().st_size / 2**20:.0f} MiB)")
        model = clip_min.build_model(clip_min.read_state_dict(path), source=str(path)).to(cfg.device)
    except (ValueError, RuntimeError, OSError) as e:  # bad file, failed download, unreadable path
        _fail(str(e).splitlines()[0] if str(e) else repr(e))
    model.requires_grad_(False)  # W0 is frozen: only the adapters (and CoOp's context) get gradients
    params = dict(model.state_dict())
    if cfg.cutout_grid:
        seed = cfg.seeds[0]
        _write_file(Path(cfg.cutout_grid), lambda tmp: cutout_grid(model, params, datasets[seed][0], cfg, seed)
                    .save(tmp, format="PNG"))
        _say(f"Cutout grid written to {cfg.cutout_grid}")
        return []
    seconds = {"data": data_s, "model": time.monotonic() - clock - data_s}
    all_results = []
    for seed in cfg.seeds:
        try:
            all_results.append(run(cfg, seed, plan[seed], datasets[seed], model, params, seconds, fingerprints[seed],
                                   adapters_file))
        except data.DataError as e:  # a file that changed on disk since it was checked
            folder = _run_folder(cfg, seed)
            if (folder / "checkpoint.pt").is_file():
                _say(f"the run can continue from its checkpoint once the data is back:\n  {_resume_command(folder)}")
            _fail(str(e))
    print(summary_table(all_results))
    return all_results


if __name__ == "__main__":
    main()
