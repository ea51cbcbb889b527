"""Train OrthCR / OrthSR on a CoOp few-shot benchmark and evaluate it with the paper's protocols.

    python train.py --data eurosat --shots 16 --device cuda                 # base-to-new on EuroSAT, seed 1
    python train.py --data eurosat --cutout attentive --prompt coop         # OrthSR (v3) with CoOp's context
    python train.py --data imagenet --protocol dg --seeds 1 2 3             # domain generalization table
    python train.py --data eurosat --zero-shot                              # zero-shot CLIP's row
    python train.py --predict photos/ --adapters runs/RUN/adapters.pt       # classify your images with a run
    torchrun --nproc_per_node 8 train.py --data imagenet --device cuda      # one run on 8 GPUs (docs/distributed.md)

Reading order: the defaults and every setting; `train`, the loop, and `training_step`; `evaluate`; the
protocols; `run`, one seed from data to files; `main`. The machinery lives in toolbox/: what keeps runs safe (run
folders, locks, checkpoints, the flag checks) in runs.py and cli.py; a command's runs around `run`, a sweep's, the
table again in orchestration.py; `--predict` in predictions.py; the paper's table in tables.py.
"""

import functools
import math
import os
import time
import warnings
from contextlib import ExitStack, nullcontext
from pathlib import Path

from toolbox import allocator

allocator.use_huge_pages()  # a speed device, before torch's first allocation: huge pages for large CPU tensors
import torch
import torch.distributed as dist

import clip_min
import data
import orthcr
from toolbox import cli, compiled, distributed, files, orchestration, predictions, published, runs, settings
from toolbox.settings import Setting, at_least, learning_rate, momentum, non_negative_number, positive_number, seed
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
# CoOp's context has an optimizer of its own, CoOp's recipe, not the rotations' AdamW (Adam moves each entry by ~lr
# per step: at 1e-4 the 16 random vectors, std 0.02, barely moved in 40 steps). KaiyangZhou/CoOp
# configs/trainers/CoOp/vit_b16*.yaml and CoCoOp/vit_b16_c4_ep10_batch1_ctxv1.yaml: OPTIM.NAME "sgd", LR 0.002,
# LR_SCHEDULER "cosine", WARMUP_EPOCH 1, WARMUP_TYPE "constant", WARMUP_CONS_LR 1e-5; momentum 0.9 and weight
# decay 5e-4 are Dassl's OPTIM defaults (dassl/config/defaults.py), which those files leave as they are.
CTX_LR = 2e-3
CTX_MOMENTUM = 0.9
CTX_WEIGHT_DECAY = 5e-4
CTX_WARMUP_EPOCHS = 1  # the first epoch at the constant CTX_WARMUP_LR, then cosine decay per epoch (Dassl's)
CTX_WARMUP_LR = 1e-5
CTX_INIT = "a photo of a"  # CoCoOp's vit_b16_c4_ep10_batch1_ctxv1 (base-to-new and cross-dataset/DG scripts);
# CoOp's few-shot runs (scripts/coop/main.sh with vit_b16*.yaml) start from 16 random vectors
SKIPPED_WARN = 0.05  # fp16: warn when the grad scaler skipped more than 5 % of the steps (overflowing gradients)
LAYOUT = {"targets": orthcr.DEFAULT_TARGETS, "blocks": 4, "towers": ("visual", "text")}  # the paper's 43.45M

PROTOCOLS = ("base2new", "fewshot", "cross", "dg")
CROSS_TARGETS = ("caltech101", "oxford_pets", "stanford_cars", "oxford_flowers", "food101", "fgvc_aircraft",
                 "sun397", "dtd", "eurosat", "ucf101")  # CoCoOp's Table 2, after the source ImageNet
DG_TARGETS = ("imagenet_v2", "imagenet_sketch", "imagenet_a", "imagenet_r")  # CoCoOp's Table 3
BASE2NEW_DATASETS = ("imagenet", *CROSS_TARGETS)  # CoCoOp's Table 1, --data all


def default_ctx_init(values):
    """CoOp's and CoCoOp's initial context by protocol: "a photo of a" for base-to-new, cross-dataset and DG (CoCoOp's
    configs), random for few-shot (CoOp's); random too when --n-ctx is given, and under --eval-only, whose
    adapters file records its own (None there: a random start)."""
    coop = values.get("prompt") == "coop" and values.get("n_ctx") is None and not values.get("eval_only")
    return CTX_INIT if coop and values.get("protocol") != "fewshot" else None


def ctx_words(text):
    """--ctx-init's words, '_' read as a space, as CoOp's prompt learner reads CTX_INIT."""
    return text.replace("_", " ")


# Every setting, once: its flag, default, help and role ("method": what is trained, "data": on what it is trained
# and tested, "run": only how this run goes). toolbox/settings.py derives the rest: the parser and --help, the run's
# record, the resume and --eval-only comparisons, the table label, docs/flags.md. eval_only: what --eval-only does
# with the value its adapters file records ("file": taken when not given, "same": taken and must agree,
# "trained": always taken, "checked": compared with the model).
G = {"data": "data", "method": "the method", "opt": "optimisation", "eval": "evaluation", "predict": "prediction",
     "files": "run files", "hw": "model and hardware"}
SETTINGS = settings.Declarations([
    Setting("data", ["eurosat"], f"benchmarks to train on, each a row of the table: {', '.join(data.DATASETS)}; "
            "all: the 11 of CoCoOp's base-to-new table; or a folder of your own images, <class>/<image>, given as a "
            "path (docs/data.md)", "data", G["data"], nargs="+", metavar="NAME|DIR", check=cli.dataset_problem,
            shown="{}; --eval-only: the adapters file's", eval_only="file", convert=lambda v, values: datasets_named(v)),
    Setting("template", None, "the prompt of --data's classes, {} where the class name goes, e.g. 'a satellite "
            "photo of {}.'", "data", G["data"], metavar="TEXT", check=cli.template_problem,
            shown="the dataset's own, for a folder CoOp's generic 'a photo of a <class>.'; --eval-only, "
                  "--predict: the adapters file's", eval_only="file"),
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
    Setting("kl_reduction", "batchmean", "the KL terms' reduction: batchmean, the true KL (summed over classes, "
            "averaged over the batch); mean, also averaged over the C classes (PromptSRC-style code's sum / numel), "
            "which weighs each λ C times less", "method", G["method"], choices=orthcr.KL_REDUCTIONS,
            eval_only="trained", label="KL mean over classes"),
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
    Setting("ctx_init", default_ctx_init, "--prompt coop: initialize the context with the embeddings of these words "
            "('_' reads as a space, as in CoOp); their BPE tokens set the context length", "method", G["method"],
            type=ctx_words, metavar="WORDS", eval_only="same", nullable=True,
            shown=f"'{CTX_INIT}' (4 tokens) for base2new, cross and dg, as CoCoOp's configs; fewshot, or with "
                  f"--n-ctx: random N(0, 0.02^2), as CoOp's"),
    Setting("n_ctx", N_CTX, "--prompt coop: context vectors", "method", G["method"], type=int, metavar="N",
            check=between(1, settings.N_CTX_MAX, "CLIP's 77 tokens, less [SOS], a class, '.' and [EOS]"),
            shown="{} random, or the tokens of --ctx-init", eval_only="file",  # the tokens fix it
            convert=lambda v, values: len(clip_min.encode(values["ctx_init"])) if values["ctx_init"] else v),
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
    Setting("ctx_lr", CTX_LR, "--prompt coop: the context's SGD learning rate, the schedule's peak (CoOp's)", "method",
            G["opt"], type=float, metavar="LR", check=settings.context_learning_rate, eval_only="trained"),
    Setting("ctx_momentum", CTX_MOMENTUM, "--prompt coop: the context's SGD momentum (CoOp's)", "method", G["opt"],
            type=float, metavar="M", check=momentum, eval_only="trained"),
    Setting("ctx_weight_decay", CTX_WEIGHT_DECAY, "--prompt coop: the context's SGD weight decay (CoOp's)", "method",
            G["opt"], type=float, metavar="WD", check=between(0, 100), eval_only="trained"),
    Setting("ctx_warmup_epochs", CTX_WARMUP_EPOCHS, "--prompt coop: epochs at --ctx-warmup-lr before the context's "
            "cosine decay, which steps once per epoch (CoOp's)", "method", G["opt"], type=int, metavar="N",
            check=between(0, 10_000, "more than any few-shot run's epochs"), eval_only="trained"),
    Setting("ctx_warmup_lr", CTX_WARMUP_LR, "--prompt coop: the context's constant warm-up learning rate (CoOp's)",
            "method", G["opt"], type=float, metavar="LR", check=between(0, 10), eval_only="trained"),
    Setting("zero_shot", False, "evaluate plain CLIP, no training: the CLIP row; with --predict, classify with plain "
            "CLIP too (beside --adapters' run, or alone)", "method", G["eval"], switch=True),
    Setting("eval_only", False, "evaluate saved --adapters, no training", group=G["eval"], switch=True),
    Setting("adapters", None, "the adapters.pt that --eval-only evaluates and --predict classifies with",
            group=G["eval"], metavar="FILE",
            shown="none"),
    Setting("eval_data", None, "the datasets that cross and dg evaluate", "data", G["eval"], nargs="+",
            choices=tuple(data.DATASETS), metavar="NAME", shown="the paper's"),
    Setting("eval_limit", None, "evaluate N class-balanced test images per split", "data", G["eval"], type=int,
            metavar="N", shown="all",
            check=between(1, 100_000, "more than any test split: ImageNet-Sketch has 50,889")),
    Setting("table_only", False, "print and write the table of this command's finished runs again, from their "
            "records, without loading a model or training", group=G["eval"], switch=True),
    Setting("eval_batch_size", EVAL_BATCH_SIZE, "images per batch", group=G["eval"], type=int, metavar="N",
            check=between(1, 4096, "4096 images are 2.5 GB of pixels")),
    Setting("predict", None, "classify these images (files, or folders searched for image files) with --adapters' "
            "run (and/or --zero-shot), print the top classes, write predictions.csv; trains nothing",
            group=G["predict"], nargs="+", metavar="IMAGE", shown="off"),
    Setting("classes", None, "--predict: choose among these class names (or those of a file, one per line) instead "
            "of the classes the adapters were trained on (zero-shot transfer; a CoOp context is kept)",
            group=G["predict"], nargs="+", metavar="NAME", shown="the adapters file's"),
    Setting("top_k", predictions.TOP_K, "--predict: classes shown and written per image", group=G["predict"],
            type=int, metavar="K", check=between(1, 1000, "ImageNet has 1000 classes"),
            shown="{}, or the number of classes if fewer"),
    Setting("out", None, "the run folder; {seed} and {data} in it become each run's seed and dataset",
            group=G["files"], metavar="DIR",
            shown="runs/<data>_<protocol>_<K>shot_<method>_seed<S>, <method> the table's label, e.g. orthsr+coop; "
                  "--eval-only: eval_<data>_<protocol>_seed<S> beside the adapters file; --predict: predict_<n> beside "
                  "it (runs/predict_<n> for --zero-shot alone), n the first free number"),
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
    Setting("weights", None, "a local checkpoint to use instead of downloading --model: OpenAI's, or open_clip's ViT "
            "(.bin, .safetensors; open_clip_config.json beside it is read)", group=G["hw"], metavar="FILE",
            shown="none"),
    Setting("activation", lambda values: model_activation(values["weights"]), "the MLPs' activation: quick_gelu "
            "(OpenAI's CLIP) or gelu (most open_clip models)", "method", G["hw"], choices=tuple(clip_min.ACTIVATIONS),
            shown="open_clip_config.json's beside --weights, else quick_gelu", eval_only="same"),
    Setting("download_root", None, "where --model is cached", group=G["hw"], metavar="DIR",
            shown=f"{clip_min.DOWNLOAD_ROOT}, as OpenAI's clip package"),
    Setting("device", lambda values: "cuda" if torch.cuda.is_available() else "cpu", "cpu, cuda or cuda:N",
            group=G["hw"], shown="cuda where available, else cpu"),
    Setting("precision", "auto", "autocast of the towers' matrix products; auto: fp16 with a grad scaler on CUDA, "
            "fp32 on the CPU", "method", G["hw"], choices=("auto", "fp32", "bf16", "fp16"),
            convert=lambda v, values: resolve_precision(v, values["device"])),  # recorded resolved
    Setting("compile", False, "torch.compile the training objective (inductor with the system's C++ compiler on the "
            "CPU, Triton on CUDA; the first steps compile); without a compiler, one warning and eager mode",
            group=G["hw"], switch=True),
    Setting("workers", lambda values: data.default_workers(values["device"]), "data loading processes",
            group=G["hw"], type=int, metavar="N", shown="0 on the CPU, 8 on CUDA",
            check=between(0, 256, "processes: more than any machine's cores")),
    Setting("dist_timeout", distributed.TIMEOUT_S, "under torchrun: seconds a process waits for the others at a "
            "collective before the run stops (a peer that hung; the first model download counts)", group=G["hw"],
            type=float, metavar="S", check=between(1, 86_400, "a day")),
    Setting("checkpoint_sha256", None, "SHA-256 of the base model file, once it is known", "method", flag=False,
            eval_only="checked"),
])
Settings = SETTINGS.Record  # the run's settings, one immutable record


def model_activation(weights):
    """The activation the base model's open_clip_config.json states (beside --weights), else OpenAI's quick_gelu;
    a config clip_min refuses is named in one line when the model is loaded."""
    try:
        return clip_min.checkpoint_settings(weights)["activation"] if weights else "quick_gelu"
    except (ValueError, OSError):
        return "quick_gelu"


def datasets_named(names):
    """--data's record: one dataset's name, as each run records it; for a sweep, the datasets (all: CoCoOp's 11)."""
    names = BASE2NEW_DATASETS if tuple(names) == ("all",) else tuple(names)
    names = tuple(os.path.abspath(os.path.expanduser(n)) if data.is_folder(n) else n for n in names)
    return names[0] if len(names) == 1 else names


def sweep_datasets(cfg):
    """The datasets a command's runs cover: {name: the settings of its runs}."""
    names = (cfg.data,) if isinstance(cfg.data, str) else cfg.data
    return {name: settings.replace(cfg, data=name) for name in names}


def parse_args(argv=None):
    """The flags (None where not given), checked before anything heavy is loaded (exit 2 with one line)."""
    return cli.parse_args(SETTINGS, argv, description=__doc__)


def settings_from(args, saved=None):
    """The run's Settings from the parsed flags; with --eval-only, `saved` is what the adapters file records."""
    return SETTINGS.record(args, saved)


def setting_warnings(cfg):
    """Valid settings that change what is computed in a way the user may not expect: one line each."""
    lines = []
    if cfg.precision == "bf16" and not (cfg.zero_shot or cfg.eval_only) and (cfg.lambda1 or cfg.lambda2):
        lines.append("--precision bf16 rounds away most of the small difference between the finetuned and the "
                     "zero-shot logits that the KL terms see: on ViT-B/16 their gradient's cosine with fp32's is 0.16 "
                     "(fp16: 0.96), so the regulariser steers by rounding noise until the rotations are large "
                     "(docs/precision.md); fp16 (auto) or fp32 keep it")
    if cfg.prompt == "coop" and cfg.ctx_init:
        lines += cli.ctx_init_warnings(cfg.ctx_init)  # its BPE tokens against its words (CoOp's n_ctx)
    return lines


# ---------------------------------------------------------------------------------------------------- the loop

def train(model, params, train_set, cfg, seed, folder, resume=None, data_sha256=None):
    """OrthCR's training loop on one few-shot set, from scratch or from the checkpoint `resume`. Returns the
    trained adapters and CoOp context (or None).

    Under torchrun each process takes its slice of every global batch of --batch-size images (data.train_batches'
    `shard`) and `training_step` sums the processes' gradients. Every random choice belongs to an image (its crop,
    flip and Cutout holes are seeded from (seed, epoch, position)), so any number of processes trains the same
    adapters, up to the order in which floating-point sums are taken."""
    adapters, context = init_trainables(params, cfg, seed)
    optimizers = make_optimizers(adapters, context, cfg)  # AdamW for P, CoOp's SGD for the context
    scaler = grad_scaler(cfg.device, cfg.precision)  # fp16's gradients need loss scaling
    tokens, teacher_text = class_prompts(model, params, train_set, cfg)
    normalize = normalizer(model)  # the base model's mean and std
    objective = compiled.objective_or_eager(orthcr.objective, cfg.device) if cfg.compile else orthcr.objective
    total = cfg.epochs * data.steps_per_epoch(len(train_set.train), cfg.batch_size)
    global_batch = min(cfg.batch_size, len(train_set.train))  # each step's images, over all processes
    step = runs.resume_from(resume, folder, adapters, context, optimizers, scaler) if resume else 0
    save = lambda step: runs.save_checkpoint(folder, cfg, seed, data_sha256, step, total, adapters, context,  # noqa
                                             optimizers, scaler)
    batches = data.train_batches(train_set.train, cfg.batch_size, seed, cfg.epochs, step, cfg.workers,
                                 model.visual.input_resolution, shard=(distributed.rank(), distributed.size()))
    with runs.Bookkeeping(folder, cfg, step, total, save) as books:
        for epoch, images, labels, positions in distributed.each_together(batches):  # a bad image stops all
            lr = _set_lr(optimizers["adapters"], lr_at(step, total, cfg.lr, cfg.warmup_steps))
            ctx_lr = _set_lr(optimizers["context"], ctx_lr_at(epoch, cfg.epochs, cfg.ctx_lr, cfg.ctx_warmup_epochs,
                                                              cfg.ctx_warmup_lr))
            holes = data.image_generators(seed, epoch, positions, data.CUTOUT_STREAM)  # each image's own Cutout
            try:
                loss, terms, skipped = training_step(model, params, adapters, context, images.to(cfg.device),
                                                     labels.to(cfg.device), tokens, teacher_text,
                                                     [o for o in optimizers.values() if o], scaler, cfg.precision,
                                                     method_settings(cfg, holes, normalize),
                                                     share=len(labels) / global_batch, objective=objective)
            except NonFinite as e:
                runs.stop_not_finite(e, step + 1, folder)
            step += 1
            books.after_step(step, epoch, lr if adapters else ctx_lr, loss, terms, skipped,  # step log, checkpoint
                             ctx_lr if adapters and context is not None else None)  # when due, Ctrl-C, progress
    runs.check_steps_applied(folder, books.skipped, step, SKIPPED_WARN)  # fp16: none skipped unseen
    return adapters, context


class NonFinite(ArithmeticError):
    """The loss or a gradient is not finite: the step stops before it can reach P."""


def training_step(model, params, adapters, context, images, labels, tokens, teacher_text, optimizer, scaler,
                  precision, method, share=1.0, objective=orthcr.objective):
    """One step of OrthCR (train.py's and bench.py's): `orthcr.objective` under autocast, its backward through
    the grad scaler, then the update of each optimizer (`optimizer`: one, or a list), unless the loss or a gradient
    is not finite (NonFinite, before the update). Under fp16 an overflowing gradient is the scaler's to handle: the
    step is skipped (every optimizer's) and the scale lowered. Returns (loss, terms, skipped): skipped is None, or
    the loss scale at which the gradients overflowed.

    Under torchrun, `images` are this process's slice of the global batch and `share` its part of it (its images
    over the batch's): the loss, a mean over the slice, is weighted by `share`, so that the gradients summed over
    the processes are the gradient of the global batch's mean loss, whatever the slices' sizes. The loss and terms
    returned are the global batch's, the same on every process, and so is the finite check."""
    optimizers = optimizer if isinstance(optimizer, (list, tuple)) else [optimizer]
    with autocast(images.device, precision):
        loss, terms = objective(model, params, adapters, images, labels, tokens, teacher_text,
                                       context=context, **method)
    for o in optimizers:
        o.zero_grad(set_to_none=True)
    trainables = trainable_tensors(adapters, context)
    scaler.scale(loss * share).backward()  # one process: share 1
    if distributed.active():  # data parallel: the sum of the processes' weighted gradients (JAX's pmean)
        for P in trainables:
            dist.all_reduce(P.grad)  # every process now holds the same gradients, so takes the same step
        values = torch.stack([loss.detach().float(), *(t.detach().float() for t in terms.values())]) * share
        dist.all_reduce(values)  # the global batch's loss and terms: the log, and one finite check for all
        loss, terms = values[0], dict(zip(terms, values[1:]))
    for o in optimizers:
        scaler.unscale_(o)  # the true gradients, checked once for all optimizers (a no-op without fp16)
    what = not_finite(loss, trainables)
    if what and not (what == "gradient" and scaler.is_enabled()):
        raise NonFinite(what)
    skipped = scaler.get_scale() if what else None  # fp16's overflow: no optimizer steps, the scale halves
    if not what:
        for o in optimizers:
            scaler.step(o)
    scaler.update()
    return loss, terms, skipped


def not_finite(loss, trainables):
    """What is not finite after the backward ("loss (nan)", "gradient") or None. Reads values: one device sync per
    step."""
    if not torch.isfinite(loss):
        return f"loss ({loss.item()})"
    # one pass over each gradient: a sum is inf or nan when an entry is (or when the sum overflows, which takes entries
    # of ~1e31 in fp32: as good as not finite); isfinite().all() took five passes, 0.1 s of a ViT-B/16 step on a CPU.
    # Summed in fp32 at least: fp16's sums overflow at 65504, a finite gradient's sum of a few thousand entries
    sums = [P.grad.sum(dtype=torch.promote_types(P.grad.dtype, torch.float32)) for P in trainables]
    if sums and not torch.stack(sums).isfinite().all():
        return "gradient"
    return None


def method_settings(cfg, generator, normalize=clip_min.normalize):
    """The settings of `orthcr.objective` that define the method: Cutout (drawing from `generator`, one for the
    batch or, as `train` gives it, one per image), the loss weights and the KL's reduction, the transform;
    `normalize`, the base model's image normalization (normalizer)."""
    return dict(cutout=orthcr.cutout_views(cfg.cutout, generator, cfg.cutout_holes, cfg.cutout_size,
                                           cfg.cutout_temperature),
                lambda1=cfg.lambda1, lambda2=cfg.lambda2, reduction=cfg.kl_reduction,
                transform=cayley_transform(cfg.neumann), normalize=normalize)


def normalizer(model):
    """clip_min.normalize with the base model's mean and std (clip_min.load sets them: open_clip's config, else
    OpenAI's constants)."""
    return functools.partial(clip_min.normalize, mean=mean_std(model)[0], std=mean_std(model)[1])


def mean_std(model):
    return getattr(model, "mean", clip_min.MEAN), getattr(model, "std", clip_min.STD)


def cayley_transform(neumann):
    """The exact Cayley transform (its fast backward), or its Neumann approximation with `neumann` terms."""
    return orthcr.cayley_fast if neumann == 0 else lambda P: orthcr.cayley_neumann(P, neumann)


def make_optimizers(adapters, context, cfg):
    """{"adapters": AdamW over every P (None without rotations), "context": SGD over CoOp's context (None without
    one)}. The context follows CoOp's recipe (see CTX_LR): an optimizer of its own, since Adam's ~lr steps at the
    rotations' lr 1e-4 leave a random context random."""
    return {"adapters": adamw(adapters.values(), lr=cfg.lr, weight_decay=cfg.weight_decay) if adapters else None,
            "context": torch.optim.SGD([context], lr=cfg.ctx_lr, momentum=cfg.ctx_momentum,
                                       weight_decay=cfg.ctx_weight_decay) if context is not None else None}


def adamw(params, lr, weight_decay=0.0):
    """torch's AdamW, fused where torch has the kernel (a speed device: one pass over each tensor instead of about
    ten, the same update up to float rounding; for ViT-B/16's 43.45M parameters 0.05 s instead of 0.43 s on a CPU)."""
    params = list(params)
    fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=fused)


def _set_lr(optimizer, lr):
    for group in optimizer.param_groups if optimizer else ():
        group["lr"] = lr
    return lr


def lr_at(step, total, lr, warmup):
    """Linear warm-up over `warmup` steps (at most a tenth of the steps), then cosine decay to 0 at the end."""
    warmup = min(warmup, total // 10)
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(total - warmup, 1)
    return lr * 0.5 * (1 + math.cos(math.pi * progress))


def ctx_lr_at(epoch, epochs, lr, warmup_epochs, warmup_lr):
    """CoOp's context schedule, per epoch as Dassl steps it: `warmup_lr` for the first `warmup_epochs` epochs, then
    cosine decay over `epochs` epochs counted from the warm-up's end (Dassl's ConstantWarmupScheduler around
    CosineAnnealingLR(T_max=epochs), WARMUP_RECOUNT), which has not reached 0 at the last epoch."""
    if epoch < warmup_epochs:
        return warmup_lr
    return lr * 0.5 * (1 + math.cos(math.pi * (epoch - warmup_epochs) / epochs))


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
    share theirs). Under torchrun each process encodes every N-th batch (each image in the batch it has on one
    process) and the correct counts are summed: the accuracies are one process's."""
    classifiers = {}
    for dataset in eval_sets.values():
        key = (tuple(dataset.classnames), dataset.template)
        if key not in classifiers:
            classifiers[key] = classifier(model, params, context, dataset, cfg)
    splits = list(eval_sets)
    items = [_test_items(eval_sets[s].test, cfg.eval_limit, seed) for s in splits]
    correct = torch.zeros(len(splits), dtype=torch.int64)
    batches = data.eval_batches(items, cfg.eval_batch_size, cfg.workers, model.visual.input_resolution,
                                *mean_std(model), shard=(distributed.rank(), distributed.size()))  # torchrun: a share
    for i, images, labels in distributed.each_together(batches):
        dataset = eval_sets[splits[i]]
        weights = classifiers[(tuple(dataset.classnames), dataset.template)]
        correct[i] += int((predict(model, params, images.to(cfg.device), weights, cfg).cpu() == labels).sum())
    if distributed.active():
        dist.all_reduce(correct)  # every process's correct counts, summed
    correct = correct.tolist()
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
def class_logits(model, params, images, class_features, cfg):
    """CLIP's logits (N, C) fp32 of (normalized) images against the class features."""
    with autocast(cfg.device, cfg.precision):
        features = orthcr.encode_image(model, params, images)
    return orthcr.clip_logits(features, class_features, params["logit_scale"])


def predict(model, params, images, class_features, cfg):
    """The predicted class of each (normalized) image: argmax of CLIP's logits."""
    return class_logits(model, params, images, class_features, cfg).argmax(dim=-1)


def _test_items(items, limit, seed):
    return items if limit is None else data.class_balanced_subset(items, limit, seed)


def harmonic_mean(a, b):
    return 2 * a * b / (a + b) if a + b > 0 else 0.0


# ---------------------------------------------------------------------------------------------------- protocols

def protocol_datasets(cfg, seed):
    """(training Dataset or None, {split name: Dataset to evaluate}) for the chosen protocol."""
    root = Path(cfg.root).expanduser()

    def build(name, subsample="all", shots=cfg.shots):  # --template is --data's prompt, not the targets'
        return data.build_dataset(name, root, shots=shots, seed=seed, subsample=subsample, download=cfg.download,
                                  template=cfg.template if name == cfg.data else None)

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
    writes = distributed.main_process()  # under torchrun, only the first process writes
    if cfg.overwrite and writes:
        runs.clear(folder)
    if writes:
        runs.write_json(folder / "config.json", runs.run_config(cfg, seed, train_set, data_sha256))
    if not (cfg.zero_shot or cfg.eval_only):
        adapters, context = train(model, params, train_set, cfg, seed, folder, payload, data_sha256)
        if writes:
            runs.save_adapters(folder / "adapters.pt", adapters, context, cfg, seed, data_sha256, train_set)
    trained = time.monotonic()
    merged = orthcr.export_state_dict(params, adapters, cayley_transform(cfg.neumann))  # eval costs plain CLIP
    if cfg.export and writes:
        runs.export(folder, merged, context, cfg)
    results = evaluate(model, merged, context, eval_sets, cfg, seed)
    for split, r in results.items():
        runs.say(f"{split}: {r['accuracy']:.2f}% of {r['n']} test images")
    if cfg.protocol == "base2new":
        results["hm"] = harmonic_mean(results["base"]["accuracy"], results["new"]["accuracy"])
        if published.applies(cfg):  # the real-weights install checked against CoCoOp's Table 1
            runs.say(published.compare(cfg.data, results["base"]["accuracy"], results["new"]["accuracy"]))
    record = {"data": cfg.data, "protocol": cfg.protocol, "shots": cfg.shots, "seed": seed,
              "method": method_name(cfg), "eval_limit": cfg.eval_limit, "results": results,
              "seconds": {**seconds, "train": trained - started, "eval": time.monotonic() - trained}}
    if cfg.eval_only:
        record["evaluated"] = evaluated
    if writes:
        runs.write_json(folder / "results.json", record)
        (folder / "checkpoint.pt").unlink(missing_ok=True)  # the run is complete: adapters.pt holds what it learned
    runs.say(f"results written to {folder / 'results.json'}")
    return record


method_name = settings.method_name  # the table's row label, e.g. "OrthSR + CoOp (w/o CutOut)"


# ---------------------------------------------------------------------------------------------------- main

def main(argv=None):
    """Flags, run folders, data, model, each run, the table: every check before the heavy work it guards.
    Under torchrun (docs/distributed.md) every process runs this; the points where they could diverge are agreed
    (toolbox/distributed.py), so that a fault on any one stops all of them with one line each."""
    with runs.stopping() as known:  # one-line warnings; Ctrl-C or SIGTERM outside the loop: one line
        args, ref = parse_args(argv), reference()
        if args.predict:
            return predictions.predict_images(args, ref)
        adapters_file = runs.read_adapters_once(args.adapters, SETTINGS) if args.eval_only else None
        saved = adapters_file["settings"] if adapters_file else None
        if saved and args.data is not None and args.data != saved.get("data"):  # another dataset, its own prompt
            saved = {**saved, "template": None}
        if saved:
            cli.check_training_flags(SETTINGS, args, saved)
        known.cfg = cfg = settings_from(args, saved)
        for line in setting_warnings(cfg):
            warnings.warn(line)
        by_dataset = sweep_datasets(cfg)  # {dataset: its runs' settings}
        if cfg.table_only:  # the records alone: no data, no model
            return orchestration.table_only(by_dataset, args.precision, ref)
        if distributed.launched() and len(by_dataset) > 1:
            runs.fail("under torchrun, one dataset per command (its processes train one run together); a sweep's "
                      "runs are shared by processes started without torchrun (docs/runs.md)", code=2)
        if (len(by_dataset) > 1 or len(cfg.seeds) > 1 and not cfg.cutout_grid) and not distributed.launched():
            return orchestration.run_sweep(by_dataset, known, ref)
        with distributed.session(cfg.device, cfg.dist_timeout) as device, ExitStack() as held:  # torchrun's group
            known.cfg = cfg = settings.replace(cfg, device=device)  # under torchrun, --device cuda: cuda:LOCAL_RANK
            with distributed.together():  # every process checks the folders; only the first locks and writes them
                known.plan = plan = {} if cfg.cutout_grid else runs.plan_runs(cfg, evaluation_splits(cfg))
                if distributed.main_process():  # each run folder is locked to the end, before any data is read
                    held.enter_context(runs.hold(cfg, plan))
            return orchestration.run_all(cfg, plan, adapters_file, ref)


def reference():
    """The settings and functions of this module that the machinery calls (toolbox/ never imports train.py), as
    they are when the command starts."""
    return orchestration.Reference(
        settings=SETTINGS, model_activation=model_activation, init_trainables=init_trainables,
        cayley_transform=cayley_transform, class_prompts=class_prompts, normalizer=normalizer, mean_std=mean_std,
        autocast=autocast, grad_scaler=grad_scaler, classifier=classifier, class_logits=class_logits,
        harmonic_mean=harmonic_mean, protocol_datasets=protocol_datasets, evaluation_splits=evaluation_splits, run=run)


if __name__ == "__main__":
    main()
