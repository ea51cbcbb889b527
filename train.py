"""Train OrthCR / OrthSR on a CoOp few-shot benchmark and evaluate it with the paper's protocols.

    python train.py --data eurosat --shots 16 --device cuda                 # base-to-new on EuroSAT, seed 1
    python train.py --data eurosat --cutout attentive --prompt coop         # OrthSR (v3) with CoOp's context
    python train.py --data imagenet --protocol dg --seeds 1 2 3             # domain generalization table
    python train.py --data eurosat --zero-shot                              # zero-shot CLIP's row

Reading order: the defaults and every setting; `train`, the loop, and `training_step`; `evaluate`; the
protocols; `run`, one seed from data to files; `main`. The machinery that keeps runs safe (run folders, locks,
checkpoints, the flag checks) lives in toolbox/.
"""

import math
import statistics
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont

import clip_min
import data
import orthcr
from toolbox import cli, files, runs, settings
from toolbox.settings import Setting, at_least, learning_rate, non_negative_number, positive_number, seed
from toolbox.settings import between, loss_weight

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


# Every setting, once: its flag, default, help and role ("method": what is trained, "data": on what it is trained
# and tested, "run": only how this run goes). toolbox/settings.py derives the rest: the parser and --help, the run's
# record, the resume and --eval-only comparisons, the table label, docs/flags.md. eval_only: what --eval-only does
# with the value its adapters file records ("file": taken when not given, "same": taken and must agree,
# "trained": always taken, "checked": compared with the model).
G = {"data": "data", "method": "the method", "opt": "optimisation", "eval": "evaluation", "files": "run files",
     "hw": "model and hardware"}
SETTINGS = settings.Declarations([
    Setting("data", "eurosat", f"benchmark to train on: {', '.join(data.DATASETS)}", "data", G["data"],
            choices=tuple(data.DATASETS), metavar="NAME", shown="{}; --eval-only: the adapters file's", eval_only="file"),
    Setting("root", lambda values: files.default_data_root(), "folder holding the datasets in CoOp's layout",
            group=G["data"], metavar="DIR", shown="$ORTHCR_DATA, else ~/data"),
    Setting("protocol", "base2new", "base2new: train on the base classes, test base and new; fewshot: all classes; "
            "cross: train on ImageNet, test 10 datasets; dg: train on ImageNet, test its 4 variants", "data", G["data"],
            choices=PROTOCOLS, shown="{}; --eval-only: the adapters file's", eval_only="file"),
    Setting("shots", 16, "training images per class", "data", G["data"], type=int, metavar="K",
            check=between(1, 10_000, "more than any class holds: EuroSAT's largest has 1,500 training images"),
            shown="{}; --eval-only: the adapters file's", eval_only="same"),
    Setting("seeds", [1], "one run per seed, then a mean ± std table", group=G["data"], type=int, nargs="+",
            metavar="S", check=seed, eval_only="same"),
    Setting("download", True, "never download a dataset; say what is missing", group=G["data"], switch=True,
            flag="--no-download"),
    Setting("targets", LAYOUT["targets"], "layers whose input space R rotates, or 'none' for no orthogonal finetuning "
            "(plain CoOp with --prompt coop)", "method", G["method"], nargs="+", metavar="LAYER", eval_only="file",
            convert=lambda v, values: () if v == ("none",) else v),
    Setting("blocks", LAYOUT["blocks"], "diagonal blocks of each R", "method", G["method"], type=int, metavar="R",
            check=between(1, settings.BLOCKS_MAX, "a block is at least 1 x 1"), eval_only="file"),
    Setting("towers", LAYOUT["towers"], "towers to finetune", "method", G["method"], nargs="+",
            choices=tuple(orthcr.TOWER_PREFIX), eval_only="file"),
    Setting("neumann", 0, "terms of the approximate Cayley transform, which is not exactly orthogonal; 0: the exact "
            "solve", "method", G["method"], type=int, metavar="N",
            check=between(0, 64, "past 64 terms fp32 gains nothing the exact solve, 0, lacks"), eval_only="same"),
    Setting("lambda1", orthcr.LAMBDA1, "weight of KL(zero-shot ‖ finetuned) on the clean images", "method",
            G["method"], type=float, metavar="L1", check=loss_weight, eval_only="trained"),
    Setting("lambda2", lambda values: 0.0 if values.get("cutout") == "none" else orthcr.LAMBDA2,
            "weight of the KL on the Cutout images", "method", G["method"], type=float, metavar="L2",
            check=loss_weight, shown=f"{orthcr.LAMBDA2}; 0 with --cutout none", eval_only="trained"),
    Setting("cutout", "random", "random: OrthCR's Cutout (v1); attentive: OrthSR's (v3), the hole on the patch most "
            "similar to the class text; none: no Cutout views, no Cutout terms", "method", G["method"],
            choices=orthcr.CUTOUT_MODES, eval_only="trained"),
    Setting("cutout_size", orthcr.CUTOUT_SIZE, "side of the square hole in pixels (16 covers 0.5 % of a 224 px image)",
            "method", G["method"], type=int, metavar="PX", eval_only="trained",
            check=between(1, settings.IMAGE_MAX, "no model's images are larger")),
    Setting("cutout_holes", 1, "holes per image, random Cutout only", "method", G["method"], type=int, metavar="N",
            check=between(1, 64, "64 holes of 16 px cover a third of a 224 px image"), eval_only="trained"),
    Setting("cutout_temperature", None, "attentive Cutout: draw the hole's patch from softmax(similarity / T) instead "
            "of taking the argmax", "method", G["method"], type=float, metavar="T", check=settings.temperature,
            shown="argmax", eval_only="trained"),
    Setting("cutout_grid", None, "write a picture of the first training batch (random hole, attentive hole, "
            "similarity map) to PNG and stop, without training", group=G["method"], metavar="PNG", shown="off"),
    Setting("prompt", "fixed", "fixed: the dataset's hand-written template; coop: CoOp's learned context", "method",
            G["method"], choices=("fixed", "coop"), shown="{}; --eval-only: the adapters file's", eval_only="file"),
    Setting("n_ctx", N_CTX, "--prompt coop: context vectors", "method", G["method"], type=int, metavar="N",
            check=between(1, settings.N_CTX_MAX, "CLIP's 77 tokens, less [SOS], a class, '.' and [EOS]"),
            shown="{}, or the words of --ctx-init", eval_only="file",  # initial words fix it
            convert=lambda v, values: len(clip_min.encode(values["ctx_init"])) if values["ctx_init"] else v),
    Setting("ctx_init", None, "--prompt coop: initialize the context with these words, e.g. 'a photo of a'",
            "method", G["method"], metavar="WORDS", shown="random, N(0, 0.02^2)", eval_only="file"),
    Setting("epochs", EPOCHS, "passes over the few-shot training set", "method", G["opt"], type=int,
            check=between(1, 10_000, "CoOp's longest schedule is 200"), eval_only="trained"),
    Setting("batch_size", BATCH_SIZE, "training images per step, plus their Cutout copies", "method", G["opt"],
            type=int, metavar="N", check=between(1, 4096, "4096 images are 2.5 GB of pixels"), eval_only="trained"),
    Setting("lr", LR, "AdamW's learning rate, the schedule's peak", "method", G["opt"], type=float, check=learning_rate,
            eval_only="trained"),
    Setting("weight_decay", WEIGHT_DECAY, "AdamW's weight decay on P", "method", G["opt"], type=float, metavar="WD",
            check=between(0, 100, "P shrinks by lr x WD per step"), eval_only="trained"),
    Setting("warmup_steps", WARMUP_STEPS, "linear warm-up (at most a tenth of the steps), then cosine decay to 0",
            "method", G["opt"], type=int, metavar="N", check=between(0, settings.STEPS_MAX), eval_only="trained"),
    Setting("zero_shot", False, "evaluate plain CLIP, no training: the CLIP row", "method", G["eval"], switch=True),
    Setting("eval_only", False, "evaluate saved --adapters, no training", group=G["eval"], switch=True),
    Setting("adapters", None, "the adapters.pt that --eval-only evaluates", group=G["eval"], metavar="FILE",
            shown="none"),
    Setting("eval_data", None, "the datasets that cross and dg evaluate", "data", G["eval"], nargs="+",
            choices=tuple(data.DATASETS), metavar="NAME", shown="the paper's"),
    Setting("eval_limit", None, "evaluate N class-balanced test images per split", "data", G["eval"], type=int,
            metavar="N", shown="all",
            check=between(1, 100_000, "more than any test split: ImageNet-Sketch has 50,889")),
    Setting("eval_batch_size", EVAL_BATCH_SIZE, "images per batch", group=G["eval"], type=int, metavar="N",
            check=between(1, 4096, "4096 images are 2.5 GB of pixels")),
    Setting("out", None, "the run folder; {seed} in it becomes the seed", group=G["files"], metavar="DIR",
            shown="runs/<data>_<protocol>_<K>shot_<method>_seed<S>, <method> the table's label, e.g. orthsr+coop; "
                  "--eval-only: eval_<data>_<protocol>_seed<S> beside the adapters file"),
    Setting("resume", False, "continue the run in the run folder from its checkpoint", group=G["files"], switch=True),
    Setting("overwrite", False, "replace the run already in the run folder", group=G["files"], switch=True),
    Setting("export", False, "also write merged.pt, the merged weights in OpenAI's format", group=G["files"],
            switch=True),
    Setting("export_dtype", "fp32", "merged.pt's dtype; fp16 (OpenAI's) is half the size but rounds small rotations "
            "away", group=G["files"], choices=("fp32", "fp16")),
    Setting("save_every", 0, "checkpoint every N steps; 0: at the end of each epoch", group=G["files"], type=int,
            metavar="N", check=between(0, settings.STEPS_MAX)),
    Setting("log_every", 1, "a progress line every N steps", group=G["files"], type=int, metavar="N",
            check=between(1, settings.STEPS_MAX)),
    Setting("model", "ViT-B/16", "OpenAI's CLIP, downloaded and verified once", group=G["hw"],
            choices=tuple(clip_min.available_models())),
    Setting("weights", None, "a local checkpoint to use instead of downloading --model", group=G["hw"],
            metavar="FILE", shown="none"),
    Setting("download_root", None, "where --model is cached", group=G["hw"], metavar="DIR",
            shown=f"{clip_min.DOWNLOAD_ROOT}, as OpenAI's clip package"),
    Setting("device", lambda values: "cuda" if torch.cuda.is_available() else "cpu", "cpu, cuda or cuda:N",
            group=G["hw"], shown="cuda where available, else cpu"),
    Setting("precision", "auto", "autocast of the towers' matrix products; auto: fp16 with a grad scaler on CUDA, "
            "fp32 on the CPU", "method", G["hw"], choices=("auto", "fp32", "bf16", "fp16"),
            convert=lambda v, values: resolve_precision(v, values["device"])),  # recorded resolved
    Setting("workers", lambda values: data.default_workers(values["device"]), "data loading processes",
            group=G["hw"], type=int, metavar="N", shown="0 on the CPU, 8 on CUDA",
            check=between(0, 256, "processes: more than any machine's cores")),
    Setting("checkpoint_sha256", None, "SHA-256 of the base model file, once it is known", "method", flag=False,
            eval_only="checked"),
])
Settings = SETTINGS.Record  # the run's settings, one immutable record


def parse_args(argv=None):
    """The flags (None where not given), checked before anything heavy is loaded (exit 2 with one line)."""
    return cli.parse_args(SETTINGS, argv, description=__doc__)


def settings_from(args, saved=None):
    """The run's Settings from the parsed flags; with --eval-only, `saved` is what the adapters file records."""
    return SETTINGS.record(args, saved)


# ---------------------------------------------------------------------------------------------------- the loop

def train(model, params, train_set, cfg, seed, folder, resume=None, data_sha256=None):
    """OrthCR's training loop on one few-shot set, from scratch or from the checkpoint `resume`. Returns the
    trained adapters and CoOp context (or None)."""
    adapters, context = init_trainables(params, cfg, seed)
    optimizer = torch.optim.AdamW(trainable_tensors(adapters, context), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scaler = grad_scaler(cfg.device, cfg.precision)  # fp16's gradients need loss scaling
    tokens, teacher_text = class_prompts(model, params, train_set, cfg)
    generator = torch.Generator().manual_seed(seed)  # all of Cutout's randomness
    method = method_settings(cfg, generator)
    total = cfg.epochs * data.steps_per_epoch(len(train_set.train), cfg.batch_size)
    step = runs.resume_from(resume, folder, adapters, context, optimizer, scaler, generator) if resume else 0
    save = lambda step: runs.save_checkpoint(folder, cfg, seed, data_sha256, step, total, adapters, context,  # noqa
                                             optimizer, scaler, generator)
    with runs.Bookkeeping(folder, cfg, step, total, save) as books:
        for epoch, images, labels in data.train_batches(train_set.train, cfg.batch_size, seed, cfg.epochs, step,
                                                        cfg.workers, model.visual.input_resolution):
            lr = _set_lr(optimizer, lr_at(step, total, cfg.lr, cfg.warmup_steps))
            try:
                loss, terms = training_step(model, params, adapters, context, images.to(cfg.device),
                                            labels.to(cfg.device), tokens, teacher_text, optimizer, scaler,
                                            cfg.precision, method)
            except NonFinite as e:
                runs.stop_not_finite(e, step + 1, folder)
            step += 1
            books.after_step(step, epoch, lr, loss, terms)  # step log, checkpoint when due, Ctrl-C, progress
    return adapters, context


class NonFinite(ArithmeticError):
    """The loss or a gradient is not finite: the step stops before it can reach P."""


def training_step(model, params, adapters, context, images, labels, tokens, teacher_text, optimizer, scaler,
                  precision, method):
    """One step of OrthCR (train.py's and bench.py's): `orthcr.objective` under autocast, its backward through
    the grad scaler, then AdamW's update, unless the loss or a gradient is not finite (NonFinite, before the
    update). Returns (loss, terms)."""
    with autocast(images.device, precision):
        loss, terms = orthcr.objective(model, params, adapters, images, labels, tokens, teacher_text,
                                       context=context, **method)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    what = not_finite(loss, trainable_tensors(adapters, context), scaler)
    if what:
        raise NonFinite(what)
    scaler.step(optimizer)
    scaler.update()
    return loss, terms


def not_finite(loss, trainables, scaler):
    """What is not finite after the backward ("loss (nan)", "gradient") or None; the fp16 scaler skips inf/NaN
    gradient steps itself. Reads values: one device sync per step."""
    if not torch.isfinite(loss):
        return f"loss ({loss.item()})"
    if not scaler.is_enabled() and not all(P.grad.isfinite().all() for P in trainables):
        return "gradient"
    return None


def method_settings(cfg, generator):
    """The settings of `orthcr.objective` that define the method: Cutout (drawing from `generator`), the loss
    weights, the transform."""
    return dict(cutout=orthcr.cutout_views(cfg.cutout, generator, cfg.cutout_holes, cfg.cutout_size,
                                           cfg.cutout_temperature),
                lambda1=cfg.lambda1, lambda2=cfg.lambda2, transform=cayley_transform(cfg.neumann))


def cayley_transform(neumann):
    """The exact Cayley transform (its fast backward), or its Neumann approximation with `neumann` terms."""
    return orthcr.cayley_fast if neumann == 0 else lambda P: orthcr.cayley_neumann(P, neumann)


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


def class_prompts(model, params, dataset, cfg):
    """(the student's prompt tokens, the teacher's fp32 class features). The teacher always reads the
    hand-written template; the student reads it too, or CoOp's prompts when its context is learned. Tokens are
    trimmed once, here on the CPU, because trimming reads their values."""
    teacher_tokens = orthcr.trim_tokens(clip_min.tokenize(dataset.prompts()))
    with autocast(cfg.device, cfg.precision):
        teacher_text = orthcr.zero_shot_text_features(model, params, teacher_tokens.to(cfg.device))
    student_tokens = teacher_tokens if cfg.prompt == "fixed" else \
        orthcr.trim_tokens(orthcr.coop_tokens(dataset.classnames, cfg.n_ctx, cfg.ctx_init))
    return student_tokens.to(cfg.device), teacher_text


# ---------------------------------------------------------------------------------------------------- precision
# README: "Precision". The towers' matrix products in fp16 (CUDA's auto) or bf16, everything that defines the
# method's properties in fp32 (orthcr.py turns autocast off there).

def resolve_precision(precision, device):
    """fp32 on the CPU; on CUDA, `auto` is fp16 autocast with a grad scaler."""
    if precision != "auto":
        return precision
    return "fp32" if torch.device(device).type == "cpu" else "fp16"


def autocast(device, precision):
    """Autocast of the towers' matrix products in bf16 or fp16; nothing for fp32 (and on the tests' meta device)."""
    device_type = torch.device(device).type
    if precision == "fp32" or not torch.amp.is_autocast_available(device_type):
        return nullcontext()
    return torch.autocast(device_type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def grad_scaler(device, precision):
    """Loss scaling for fp16 (a pass-through otherwise). It starts at 2^12, not torch's 2^16: on ViT-B/16 the
    loss scaled by 2^16 overflowed fp16 (bench_results/precision_cpu.txt), and each overflow skips a step."""
    device_type = torch.device(device).type
    return torch.amp.GradScaler(device_type if device_type != "meta" else "cpu", init_scale=2.0**12,
                                enabled=precision == "fp16")


# ---------------------------------------------------------------------------------------------------- evaluation

def evaluate(model, params, context, eval_sets, cfg, seed):
    """Top-1 accuracy (%) of CLIP's classifier under `params` on each evaluation split, with the count behind it.
    All splits go through one loader; each class set's classifier is computed once (ImageNet, -V2 and -Sketch
    share theirs)."""
    classifiers = {}
    for dataset in eval_sets.values():
        key = (tuple(dataset.classnames), dataset.template)
        if key not in classifiers:
            classifiers[key] = classifier(model, params, context, dataset, cfg)
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
def classifier(model, params, context, dataset, cfg, batch=256):
    """The class-prompt features under `params`, (C, E) fp32: the template's prompts, or CoOp's with `context`."""
    tokens = clip_min.tokenize(dataset.prompts()) if context is None else \
        orthcr.coop_tokens(dataset.classnames, cfg.n_ctx, cfg.ctx_init)
    with autocast(cfg.device, cfg.precision):
        return torch.cat([orthcr.encode_text(model, params, orthcr.trim_tokens(t).to(cfg.device), context).float()
                          for t in tokens.split(batch)])


@torch.no_grad()
def predict(model, params, images, class_features, cfg):
    """The predicted class of each (normalized) image: argmax of CLIP's logits."""
    with autocast(cfg.device, cfg.precision):
        features = orthcr.encode_image(model, params, images)
    return orthcr.clip_logits(features, class_features, params["logit_scale"]).argmax(dim=-1)


def _test_items(items, limit, seed):
    return items if limit is None else data.class_balanced_subset(items, limit, seed)


def harmonic_mean(a, b):
    return 2 * a * b / (a + b) if a + b > 0 else 0.0


# ---------------------------------------------------------------------------------------------------- protocols

def protocol_datasets(cfg, seed):
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
    return train_set, {cfg.data: train_set, **{name: build(name, shots=0) for name in targets(cfg)}}


def targets(cfg):
    """The datasets a cross-dataset or domain-generalization run is evaluated on, besides its source."""
    chosen = cfg.eval_data or (DG_TARGETS if cfg.protocol == "dg" else CROSS_TARGETS)
    return [name for name in chosen if name != cfg.data]


def evaluation_splits(cfg):
    """The splits a run's results.json holds (besides base-to-new's "hm")."""
    return {"base2new": ["base", "new"], "fewshot": ["all"]}.get(cfg.protocol) or [cfg.data, *targets(cfg)]


# ---------------------------------------------------------------------------------------------------- one run

def run(cfg, seed, plan, datasets, model, params, seconds, data_sha256, adapters_file=None):
    """One seed: train (`plan` ("new", None) or ("resume", checkpoint)) or load adapters, merge, evaluate, write
    the run folder. Returns results.json's content (a finished run that --resume meets is kept as it is)."""
    folder, (mode, payload) = runs.run_folder(cfg, seed), plan
    if mode == "done":
        runs.say(f"{folder} is finished: its results.json is kept as it is")
        return payload[1]
    train_set, eval_sets = datasets
    torch.manual_seed(seed)
    started = time.monotonic()
    adapters, context = {}, None  # zero-shot CLIP
    if cfg.eval_only:  # checked against the model before anything is written
        adapters, context, evaluated = runs.read_adapters_file(cfg.adapters, adapters_file, params,
                                                               *init_trainables(params, cfg, 0), cfg.device)
    if cfg.overwrite:
        runs.clear(folder)
    runs.write_json(folder / "config.json", runs.run_config(cfg, seed, train_set, data_sha256))
    if not (cfg.zero_shot or cfg.eval_only):
        adapters, context = train(model, params, train_set, cfg, seed, folder, payload, data_sha256)
        runs.save_adapters(folder / "adapters.pt", adapters, context, cfg, seed, data_sha256)
    trained = time.monotonic()
    merged = orthcr.export_state_dict(params, adapters, cayley_transform(cfg.neumann))  # eval costs plain CLIP
    if cfg.export:
        runs.export(folder, merged, context, cfg)
    results = evaluate(model, merged, context, eval_sets, cfg, seed)
    for split, r in results.items():
        runs.say(f"{split}: {r['accuracy']:.2f}% of {r['n']} test images")
    if cfg.protocol == "base2new":
        results["hm"] = harmonic_mean(results["base"]["accuracy"], results["new"]["accuracy"])
    record = {"data": cfg.data, "protocol": cfg.protocol, "shots": cfg.shots, "seed": seed,
              "method": method_name(cfg), "eval_limit": cfg.eval_limit, "results": results,
              "seconds": {**seconds, "train": trained - started, "eval": time.monotonic() - trained}}
    if cfg.eval_only:
        record["evaluated"] = evaluated
    runs.write_json(folder / "results.json", record)
    (folder / "checkpoint.pt").unlink(missing_ok=True)  # the run is complete: adapters.pt holds what it learned
    runs.say(f"results written to {folder / 'results.json'}")
    return record


method_name = settings.method_name  # the table's row label, e.g. "OrthSR + CoOp (w/o CutOut)"


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
    _, teacher_text = class_prompts(model, params, train_set, cfg)
    with torch.no_grad(), autocast(cfg.device, cfg.precision):
        _, patches = orthcr.encode_image(model, params, clip_min.normalize(images.to(cfg.device)), dense=True)
    similarity = orthcr.similarity_map(patches, teacher_text[labels.to(cfg.device)]).cpu()  # (N, grid, grid)
    random_cut = orthcr.cutout(images, torch.Generator().manual_seed(seed), cfg.cutout_holes, cfg.cutout_size)
    attentive_cut = orthcr.attentive_cutout(images, similarity, cfg.cutout_size, torch.Generator().manual_seed(seed),
                                            cfg.cutout_temperature)
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


# ---------------------------------------------------------------------------------------------------- main

def main(argv=None):
    """Flags, run folders, data, model, each seed, the table: every check before the heavy work it guards."""
    with runs.stopping() as known:  # one-line warnings; Ctrl-C or SIGTERM outside the loop: one line
        args = parse_args(argv)
        adapters_file = runs.read_adapters_once(args.adapters, SETTINGS) if args.eval_only else None
        saved = adapters_file["settings"] if adapters_file else None
        if saved:
            cli.check_training_flags(SETTINGS, args, saved)
        known.cfg = cfg = settings_from(args, saved)
        known.plan = plan = {} if cfg.cutout_grid else runs.plan_runs(cfg, evaluation_splits(cfg))  # folders first
        with runs.hold(cfg, plan):  # each run folder is locked from here to the end, before any data is read
            return run_all(cfg, plan, adapters_file)


def run_all(cfg, plan, adapters_file):
    """The data, then the model, checked completely; then each seed's run and the table."""
    cli.check_layout(cfg, init_trainables)  # a named model's shapes: checked before any data is read or downloaded
    cli.check_root(cfg)
    clock = time.monotonic()
    try:  # the datasets are read and checked, completely, before the model is loaded or downloaded
        datasets = {seed: protocol_datasets(cfg, seed) for seed in cfg.seeds}
    except (data.DataError, OSError) as e:
        runs.fail(str(e) if isinstance(e, data.DataError) else f"cannot read the data: {e}")
    cli.check_prompts(cfg, datasets)
    fingerprints = {seed: runs.data_fingerprint(cfg, datasets[seed]) for seed in cfg.seeds}
    data_s = time.monotonic() - clock
    try:
        path, model_sha256 = clip_min.checkpoint(cfg.weights or cfg.model, cfg.download_root)
        cfg = settings.replace(cfg, checkpoint_sha256=model_sha256)
        adapters, context = cli.check_layout(cfg, init_trainables, path)
        if cfg.eval_only:
            cli.check_evaluation(cfg, adapters_file["settings"])
        totals = {seed: cfg.epochs * data.steps_per_epoch(len(datasets[seed][0].train), cfg.batch_size)
                  for seed, (mode, _) in plan.items() if mode == "resume"}
        runs.check_plan(cfg, plan, fingerprints, totals, adapters, context, grad_scaler(cfg.device, cfg.precision))
        runs.say(f"loading {runs.model_label(cfg)} ({files.format_size(path.stat().st_size)})")
        model = clip_min.load(str(path), cfg.device)
    except (ValueError, RuntimeError, OSError) as e:  # bad file, failed download, unreadable path
        runs.fail(str(e).splitlines()[0] if str(e) else repr(e))
    model.requires_grad_(False)  # W0 is frozen: only the adapters (and CoOp's context) get gradients
    params = dict(model.state_dict())
    if cfg.cutout_grid:
        seed = cfg.seeds[0]
        runs.write_file(Path(cfg.cutout_grid), lambda tmp: cutout_grid(model, params, datasets[seed][0], cfg, seed)
                        .save(tmp, format="PNG"))
        runs.say(f"Cutout grid written to {cfg.cutout_grid}")
        return []
    seconds = {"data": data_s, "model": time.monotonic() - clock - data_s}
    all_results = []
    for seed in cfg.seeds:
        try:
            all_results.append(run(cfg, seed, plan[seed], datasets[seed], model, params, seconds, fingerprints[seed],
                                   adapters_file))
        except data.DataError as e:  # a file that changed on disk since it was checked
            folder = runs.run_folder(cfg, seed)
            if (folder / "checkpoint.pt").is_file():
                runs.say(f"the run can continue from its checkpoint once the data is back:\n  "
                         f"{runs.resume_command(folder)}")
            runs.fail(str(e))
    print(summary_table(all_results))
    return all_results


if __name__ == "__main__":
    main()
