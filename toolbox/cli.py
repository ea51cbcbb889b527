"""The command line's checks: every flag and every combination of flags checked before anything is read (exit 2
with one line), then the checks that need the adapters file, the model's shapes, the data root or the prompts,
each one line before any heavy work."""

import argparse
import os
from pathlib import Path

import torch

import clip_min
import data
import orthcr
from toolbox import runs, settings


class Parser(argparse.ArgumentParser):
    """argparse, with a flag error as one line (not the usage block first): `train.py: error: ... (see --help)`."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def parser(declared, description=""):
    """The command line of `declared` (toolbox.settings.Declarations): each flag's default is None, so that what
    was given is what is not None; Declarations.record fills in the rest."""
    return declared.parser(Parser(prog="train.py", description=description,
                                  formatter_class=argparse.RawDescriptionHelpFormatter))


def parse_args(declared, argv=None, description=""):
    """The flags, validated before anything heavy is loaded (exit 2 with one line)."""
    p = parser(declared, description)
    args = p.parse_args(argv)
    bad = problems(declared, args)
    if bad:
        p.error("; ".join(bad))
    return args


def problems(declared, args):
    """Every flag checked before anything is read: a list of one-line problems."""
    def value(name):  # given, else the declared default
        given, default = getattr(args, name), declared.by_name[name].default
        return given if given is not None else default(vars(args)) if callable(default) else default

    bad = declared.range_problems(args)
    if args.seeds is not None and len(set(args.seeds)) != len(args.seeds):
        bad.append(f"--seeds {' '.join(map(str, args.seeds))}: each seed once (a repeated seed repeats its run)")
    if args.seeds is not None and len(args.seeds) > settings.SEEDS_MAX:
        bad.append(f"--seeds: {len(args.seeds)} seeds, at most {settings.SEEDS_MAX} (each holds its run folder's "
                   f"lock open to the end)")
    bad += _method_problems(args, value)
    bad += _unused_problems(declared, args)
    bad += _protocol_problems(args, value)
    bad += _file_problems(args, value)
    bad += _device_problems(value("device"), value("precision"))
    bad += _predict_problems(declared, args)
    return bad


def _method_problems(args, value):
    """Combinations of the method's flags that make no sense, one line each."""
    bad, cutout = [], value("cutout")
    no_adapters = args.targets is not None and [t.lower() for t in args.targets] == ["none"]
    if args.targets is not None and "none" in args.targets and len(args.targets) > 1:
        bad.append("--targets none means no orthogonal finetuning: give it alone")
    if no_adapters and (args.blocks is not None or args.towers is not None or args.neumann):
        bad.append("--targets none trains no rotation: --blocks, --towers and --neumann do not apply")
    if no_adapters and args.prompt != "coop" and not args.eval_only:
        bad.append("--targets none leaves nothing to train: add --prompt coop (plain CoOp), or use --zero-shot")
    from_file = args.eval_only and args.prompt is None  # --eval-only: the file's prompt, compared with them there
    if args.prompt != "coop" and not from_file and (args.n_ctx is not None or args.ctx_init is not None):
        bad.append("--n-ctx and --ctx-init set CoOp's learned context: add --prompt coop")
    ctx_flags = [o for o, v in (("--ctx-lr", args.ctx_lr), ("--ctx-momentum", args.ctx_momentum),
                                ("--ctx-weight-decay", args.ctx_weight_decay),
                                ("--ctx-warmup-epochs", args.ctx_warmup_epochs),
                                ("--ctx-warmup-lr", args.ctx_warmup_lr)) if v is not None]
    if ctx_flags and args.prompt != "coop" and not args.eval_only:
        bad.append(f"{', '.join(ctx_flags)} set the optimizer of CoOp's learned context: add --prompt coop")
    if args.ctx_init is not None:
        words = len(clip_min.encode(args.ctx_init)) if args.ctx_init.strip() else 0
        if not words:
            bad.append("--ctx-init is empty: give initial words such as 'a photo of a'")
        elif words > settings.N_CTX_MAX:
            bad.append(f"--ctx-init is {words} tokens: CoOp's prompt fits at most {settings.N_CTX_MAX} in CLIP's "
                       f"{settings.CONTEXT_LENGTH} (with [SOS], a class, '.' and [EOS])")
        elif args.n_ctx is not None and args.n_ctx != words:
            bad.append(f"--ctx-init {shorten(args.ctx_init)} is {words} tokens, which sets the context length: "
                       f"drop --n-ctx {args.n_ctx}")
    if cutout != "random" and args.cutout_holes is not None and args.cutout_holes != 1:
        bad.append(f"--cutout-holes is for random Cutout; --cutout {cutout} cuts "
                   f"{'one hole' if cutout == 'attentive' else 'nothing'}")
    if args.cutout_temperature is not None and cutout != "attentive":
        bad.append("--cutout-temperature samples attentive Cutout's hole: add --cutout attentive")
    if cutout == "none" and args.lambda2:
        bad.append("--lambda2 weighs the KL on Cutout images; --cutout none has none")
    if args.kl_reduction == "mean" and value("lambda1") == 0 and value("lambda2") == 0 and not args.zero_shot:
        zero = "--lambda2 0" if args.lambda2 is not None else "--cutout none (--lambda2 0)"
        bad.append(f"--kl-reduction mean reduces the KL terms, which --lambda1 0 and {zero} leave out: it would "
                   f"change nothing but the run's label; drop it, or give a KL weight")
    if args.zero_shot and (args.eval_only or args.resume):
        bad.append("--zero-shot evaluates plain CLIP with the template: it takes no --eval-only or --resume")
    if value("lr") * value("weight_decay") >= 1:
        bad.append(f"--lr {value('lr')} x --weight-decay {value('weight_decay')} >= 1: AdamW multiplies P by "
                   f"1 - lr x weight decay each step, which would flip or zero it")
    return bad


def ctx_init_warnings(ctx_init):
    """One line when --ctx-init's BPE tokens are not its words: all its tokens' embeddings become the learned
    context here, where CoOp sets n_ctx to the word count (`len(ctx_init.split(" "))`) and learns that many."""
    tokens, words = len(clip_min.encode(ctx_init)), len(ctx_init.split())
    if tokens == words:
        return []
    coop = (f"learn the first {words} and keep the other {tokens - words} as fixed words" if tokens > words else
            f"learn {words} vectors from a text of {tokens} tokens")
    return [f"--ctx-init {shorten(ctx_init)} is {tokens} BPE tokens but {words} words: all {tokens} token embeddings "
            f"are the learned context here; CoOp (n_ctx = the word count) would {coop}"]


def shorten(text, limit=40):
    """A user's text as a message quotes it: at most `limit` characters of it, '...' where it is cut."""
    return repr(text if len(text) <= limit else text[:limit - 3] + "...")


def dataset_problem(value):
    """--data: a benchmark's name (or all), or a folder of your own images (data.is_folder)."""
    if value != "all" and value not in data.DATASETS and not data.is_folder(value):
        return (f"{value}: neither a benchmark ({', '.join(data.DATASETS)}) nor a folder of your own images "
                f"(give it as a path, e.g. ./{value})")


def template_problem(value):
    """--template: a prompt with {} once, where the class name goes."""
    try:
        data.check_template(value)
    except data.DataError as e:
        return str(e).removeprefix("template ")


def _unused_problems(declared, args):
    """A given flag that does not apply to what runs (Declarations.unused: with --zero-shot, everything that only
    training or the adapters read): it would be recorded for a run it did not shape."""
    given = [declared.by_name[name].option for name in declared.unused(vars(args))
             if getattr(args, name, None) is not None]
    if not given:
        return []
    return [f"--zero-shot evaluates plain CLIP with the template and trains nothing: {', '.join(given)} "
            f"{'does' if len(given) == 1 else 'do'} not apply"]


def _protocol_problems(args, value):
    raw = value("data")  # a list from the command line, a string from an adapters file's record
    bad, names = [], [raw] if isinstance(raw, str) else list(raw)
    if "all" in names and len(names) > 1:
        bad.append("--data all stands for the 11 datasets of CoCoOp's base-to-new table: give it alone")
    if len(set(names)) != len(names):
        bad.append(f"--data {' '.join(names)}: each dataset once (a repeated dataset repeats its runs)")
    folders = [name for name in names if data.is_folder(name)]
    short = {}  # each dataset's name in its run folders: two spellings of one folder, or two folders that share a
    for name in folders:  # name, would write into the same run folders
        key = data.dataset_name(os.path.abspath(os.path.expanduser(name)))
        if key in short:
            bad.append(f"--data {short[key]} and {name} would share the run folders {key}_...: give each folder once, "
                       f"and folders of different names")
        short.setdefault(key, name)
    if folders and value("protocol") in ("cross", "dg"):
        bad.append(f"--protocol {value('protocol')} trains on ImageNet and tests other benchmarks: a folder of "
                   f"your own images (--data {folders[0]}) takes --protocol base2new or fewshot")
    names = [name for name in names if name == "all" or name in data.DATASETS]  # dataset_problem names the rest
    if folders:
        return bad
    chosen = args.data is not None or not args.eval_only  # --eval-only takes --data from the file: checked there
    if args.protocol == "dg" and names != ["imagenet"] and chosen:
        bad.append("--protocol dg trains on imagenet: add --data imagenet")
    if args.protocol == "cross" and names != ["imagenet"] and chosen:
        bad.append("--protocol cross trains on imagenet (CoCoOp's cross-dataset table): add --data imagenet")
    for name in names:
        if name != "all" and data.DATASETS[name].kind in data.TEST_ONLY:
            bad.append(f"--data {name} has no training split (it is an evaluation-only ImageNet variant)")
    if args.eval_data and args.protocol not in ("cross", "dg"):
        bad.append("--eval-data lists the targets of --protocol cross or dg")
    return bad


def _file_problems(args, value):
    root, grid = value("root"), args.cutout_grid
    paths = {"--weights": args.weights, "--adapters": args.adapters, "--out": args.out, "--root": root,
             "--cutout-grid": grid, "--download-root": args.download_root}
    unreachable = [p for p in (runs.unreachable(flag, path) for flag, path in paths.items() if path) if p]
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
    if grid and Path(grid).is_dir():
        bad.append(f"--cutout-grid {grid} is a folder: give the PNG file to write")
    elif grid and os.path.lexists(grid) and not args.overwrite:
        bad.append(f"--cutout-grid {grid} exists: add --overwrite to replace it")
    elif grid and Path(grid).name in runs.RUN_FILES:
        bad.append(f"--cutout-grid {grid}: {Path(grid).name} is a run file's name; give a .png")
    elif grid and os.path.lexists(grid) and not _is_png(grid):
        bad.append(f"--cutout-grid {grid} exists and is not a PNG: --overwrite replaces only a picture")
    if value("export_dtype") != "fp32" and not args.export:
        bad.append(f"--export-dtype {args.export_dtype} is merged.pt's dtype: add --export")
    if args.eval_only and not args.adapters:
        bad.append("--eval-only needs --adapters PATH")
    if args.adapters and not args.eval_only and not args.predict:
        bad.append("--adapters is read by --eval-only (or --predict): add --eval-only")
    if args.adapters and not Path(args.adapters).is_file():
        bad.append(f"--adapters {args.adapters}: {'not a regular file' if os.path.lexists(args.adapters) else 'no such file'}")
    if args.out and args.seeds and len(args.seeds) > 1 and "{seed}" not in args.out:
        bad.append("--out names one run folder: with several seeds put {seed} in it, e.g. --out runs/lr3e-4_seed{seed}")
    several = args.data is not None and (len(args.data) > 1 or args.data == ["all"])
    if args.out and several and "{data}" not in args.out:
        bad.append("--out names one run folder: with several datasets put {data} in it, e.g. --out "
                   "runs/lr3e-4/{data}_seed{seed}")
    if several and (args.eval_only or grid):
        bad.append(f"{'--eval-only evaluates one adapters file' if args.eval_only else '--cutout-grid draws one batch'}"
                   f" on one dataset: give one --data")
    if args.overwrite and (several or args.seeds and len(args.seeds) > 1):
        bad.append("--overwrite replaces one run; a sweep keeps its finished runs and resumes its stopped ones: "
                   "remove the runs to redo, or overwrite one at a time (--data NAME --seeds S --overwrite)")
    if args.table_only and (args.eval_only or args.resume or args.overwrite or grid or args.export):
        bad.append("--table-only reads the finished runs' records: it takes no --eval-only, --resume, --overwrite, "
                   "--cutout-grid or --export")
    if args.resume and args.overwrite:
        bad.append("--resume continues the run in --out, --overwrite replaces it: choose one")
    if grid and not Path(grid).expanduser().resolve().parent.is_dir():
        bad.append(f"--cutout-grid {grid}: its folder does not exist")
    elif grid and not os.access(Path(grid).expanduser().resolve().parent, os.W_OK):
        bad.append(f"--cutout-grid {grid}: its folder is not writable")
    if args.resume and args.eval_only:
        bad.append("--resume continues training; --eval-only trains nothing")
    if not root.strip():
        bad.append("--root (or $ORTHCR_DATA) is empty: give the folder holding the datasets")
    if grid and (args.resume or args.eval_only or args.zero_shot):
        bad.append("--cutout-grid draws a training batch and stops: it takes no --resume, --eval-only or --zero-shot")
    return bad


# what --predict reads; every other flag describes training or evaluation, which the adapters file already records
PREDICT_FLAGS = ("predict", "classes", "template", "top_k", "zero_shot", "adapters", "out", "overwrite",
                 "eval_batch_size", "model", "weights", "activation", "download_root", "device", "precision",
                 "workers")


def _predict_problems(declared, args):
    if not args.predict:
        return ["--classes and --top-k are --predict's: add --predict IMAGE..."] \
            if args.classes is not None or args.top_k is not None else []
    others = [s.option for s in declared.flags() if s.name not in PREDICT_FLAGS and getattr(args, s.name) is not None]
    bad = [f"--predict classifies with what the adapters file records: drop {', '.join(others)}"] if others else []
    if not args.adapters and not args.zero_shot:
        bad.append("--predict needs --adapters RUN/adapters.pt, or --zero-shot for plain CLIP")
    elif not args.adapters and not args.classes:
        bad.append("--predict --zero-shot without --adapters needs the classes to choose from: --classes NAME...")
    return bad


def _is_png(path):
    try:
        with open(path, "rb") as f:
            return f.read(8) == b"\x89PNG\r\n\x1a\n"
    except OSError:
        return False


def _device_problems(name, precision):
    try:
        device = torch.device(name)
    except RuntimeError:
        return [f"--device {name}: expected cpu, cuda or cuda:N"]
    if device.type not in ("cpu", "cuda"):
        return [f"--device {name}: expected cpu, cuda or cuda:N"]
    if device.type == "cuda" and not torch.cuda.is_available():
        return [f"--device {name}: CUDA is not available on this machine"]
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        return [f"--device {name}: only {torch.cuda.device_count()} CUDA device(s)"]
    if device.type == "cpu" and precision in ("bf16", "fp16"):
        return [f"--precision {precision} is for CUDA; the CPU runs in fp32"]
    if device.type == "cuda" and precision == "bf16" and torch.cuda.get_device_capability(device)[0] < 8:
        return [f"--precision bf16: {name} ({torch.cuda.get_device_name(device)}) has no bf16; use fp16"]
    return []


# ---------------------------------------------------------------------------------------------------- later checks

def check_training_flags(declared, args, saved):
    """--eval-only with a flag that contradicts the adapters file, or a file that records what the command line
    refuses: one line, before anything is read or downloaded. The training settings would describe a training
    that never happened, shots and seed would label another run, --neumann would evaluate another transform, a
    method flag (--ctx-init, --blocks...) would describe other adapters; the same value, as in a repeated
    training command, is fine. Only what the data is (--data, --protocol) may be chosen anew."""
    if args.seeds and len(args.seeds) > 1:
        runs.fail(f"--eval-only evaluates one adapters file, trained with one seed: drop --seeds "
                  f"{' '.join(map(str, args.seeds))}")
    for name in declared.names(eval_only=("trained", "same")) + declared.names(role=("method",), eval_only=("file",)):
        recorded, given, s = ("seed" if name == "seeds" else name), getattr(args, name), declared.by_name[name]
        if given is None or recorded not in saved:
            continue
        value = given[0] if name == "seeds" else given
        if _plain(s, value) != _plain(s, saved[recorded]):
            runs.fail(f"{s.option} {_shown(value)} contradicts {args.adapters}, trained with {recorded} = "
                      f"{_shown(saved[recorded])}: --eval-only evaluates the adapters as they were trained; drop "
                      f"{s.option}")
    _check_recorded_combination(declared, args, saved)


def _plain(setting, value):
    """A value as the record holds it: lists as tuples, converted where the conversion needs no other setting
    (--targets none is no targets)."""
    value = tuple(value) if isinstance(value, list) else value
    try:
        return setting.convert(value, {}) if setting.convert else value
    except (KeyError, TypeError):  # the conversion reads other settings: the value as given
        return value


def _shown(value):
    if isinstance(value, (list, tuple)):
        return " ".join(map(str, value)) or "none"
    return repr(value) if isinstance(value, str) and " " in value else str(value)


def _check_recorded_combination(declared, args, saved):
    """The data and protocol the adapters file records, alone and with the flags given over them, must be a
    combination the command line accepts (`_protocol_problems`): a file that records cross or dg on another
    dataset than ImageNet, or training on a test-only set, was not written by a run train.py allows."""
    def namespace(values):
        merged = argparse.Namespace(**{s.name: None for s in declared.flags()})  # as if training were asked for
        for name, value in values.items():
            setattr(merged, name, value)
        return merged

    recorded = {name: saved[name] for name in ("data", "protocol", "eval_data") if saved.get(name) is not None}
    given = {name: getattr(args, name) for name in ("data", "protocol", "eval_data") if getattr(args, name) is not None}
    for values, lead in ((recorded, f"--adapters {args.adapters} records"),
                         ({**recorded, **given}, f"--eval-only of {args.adapters} with the flags given is")):
        merged = namespace(values)
        problems = _protocol_problems(merged, lambda name: getattr(merged, name) if getattr(merged, name) is not None
                                      else declared.by_name[name].default)
        if problems:
            what = ", ".join(f"{k} = {_shown(v)}" for k, v in values.items())
            runs.fail(f"{lead} {what}, which the command line refuses: {problems[0]}")


def check_evaluation(cfg, saved):
    """--eval-only must evaluate the adapters as what they are: on the base model they were trained on, and
    without calling "new" the classes they were trained on."""
    trained = saved.get("checkpoint_sha256")
    if trained and cfg.checkpoint_sha256 and trained != cfg.checkpoint_sha256:
        runs.fail(f"--adapters {cfg.adapters} were trained on a base model with SHA-256 {trained[:16]}..., not on "
                  f"{runs.model_label(cfg)} ({cfg.checkpoint_sha256[:16]}...): pass that model's --weights or --model")
    if (cfg.protocol == "base2new" and saved.get("data") == cfg.data
            and saved.get("protocol") in ("fewshot", "cross", "dg")):
        runs.fail(f"--adapters {cfg.adapters} were trained on all classes of {cfg.data} (--protocol "
                  f"{saved['protocol']}): base-to-new would call trained classes new; evaluate with --protocol fewshot")


def check_root(cfg):
    if data.is_folder(cfg.data):  # your own images are read from their folder, not from the data root
        return
    try:
        data.check_root(Path(cfg.root).expanduser())
    except (data.DataError, OSError) as e:
        runs.fail(f"--root (or $ORTHCR_DATA): {e}")


def check_prompts(cfg, datasets):
    """Every prompt the run will tokenize fits CLIP's 77 tokens (a long class name, or a long CoOp context)."""
    for train_set, eval_sets in datasets.values():
        for dataset in [*([train_set] if train_set else []), *eval_sets.values()]:
            try:
                clip_min.tokenize(dataset.prompts())
                if cfg.prompt == "coop":
                    orthcr.coop_tokens(dataset.classnames, cfg.n_ctx, cfg.ctx_init)
            except RuntimeError as e:
                flag = f"--n-ctx {cfg.n_ctx}: " if cfg.prompt == "coop" else ""
                runs.fail(f"{flag}a prompt of {dataset.name} does not fit CLIP's context: {e}".split(";")[0])


def check_layout(cfg, init_trainables, path=None):
    """--targets/--blocks/--towers against the model's shapes, known without loading it: from the checkpoint's
    records (tensors as meta tensors: shapes, no data), or, before a named --model is downloaded, from its
    architecture. Returns the trainables this run will have (`init_trainables(params, cfg, seed)`), on meta."""
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
            runs.fail(str(e).splitlines()[0])
    try:
        n_px = clip_min.config_from_state_dict(shapes)["image_resolution"]
    except (ValueError, KeyError, IndexError, TypeError):  # not a CLIP checkpoint: build_model says why, in one line
        try:
            clip_min.build_model(clip_min.read_state_dict(source), source=str(source))
        except ValueError as e:
            runs.fail(str(e).splitlines()[0])
    if cfg.cutout_size > n_px:
        runs.fail(f"--cutout-size {cfg.cutout_size} is larger than the model's {n_px} px images")
    try:
        return init_trainables(shapes, cfg, seed=0)
    except (ValueError, KeyError) as e:
        runs.fail(f"{'--blocks' if 'divisible' in str(e) else '--targets/--towers'} do not fit {source}: {e}")
