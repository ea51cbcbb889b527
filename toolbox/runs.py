"""Run records: the run folder and its lock, the files a run writes (through files.write_atomic), checkpoints
and adapters files (saved, read without executing anything, checked completely), the resume and --eval-only
checks, the step log, the progress line, Ctrl-C and SIGTERM, and the one-line messages.

train.py's loop calls these; nothing here imports train.py. The settings a run records and compares are derived
from its declarations (toolbox/settings.py)."""

import dataclasses
import errno
import fcntl
import hashlib
import io
import itertools
import json
import os
import re
import shlex
import shutil
import signal
import stat
import sys
import time
import warnings
from contextlib import ExitStack, contextmanager
from pathlib import Path

import torch

import clip_min
import data
import orthcr
from toolbox import checkpoints, distributed, files, settings

ROOT = Path(__file__).resolve().parent.parent
RUN_FILES = ("config.json", "log.jsonl", "checkpoint.pt", "adapters.pt", "results.json", "merged.pt", "context.pt")


# ---------------------------------------------------------------------------------------------------- messages

def say(message):
    """A message on stderr; under torchrun only the first process speaks (errors: every process, `fail`)."""
    if distributed.main_process():
        print(message, file=sys.stderr, flush=True)


def fail(message, code=1):
    """Stop with one `error: ...` line on stderr and a non-zero exit, no traceback."""
    if code == 1:
        raise SystemExit(f"error: {message}")  # Python prints it and exits with 1
    print(f"error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(code)


# ---------------------------------------------------------------------------------------------------- the record

def run_config(cfg, seed, train_set, data_sha256):
    """config.json: every setting that applies to the run (a zero-shot run records no training settings), and
    what identifies the run's inputs and code."""
    record = dataclasses.asdict(cfg)
    unused = settings.declared(cfg).unused(record)
    return {**{k: v for k, v in record.items() if k not in unused}, "seed": seed, "data_sha256": data_sha256, "method": settings.method_name(cfg),
            "model_file": model_label(cfg), "code_version": code_version(), "torch": torch.__version__,
            "train_images": len(train_set.train) if train_set else 0}


def model_label(cfg):
    """The base model as recorded: the --weights file when one is given, else OpenAI's model name."""
    return str(Path(cfg.weights).resolve()) if cfg.weights else cfg.model


def code_version():
    """sha256 of the four modules and of toolbox/*.py (by relative path, sorted: the toolbox's data loading and
    splits change results too): identifies the code even outside a git checkout."""
    h = hashlib.sha256()
    toolbox = sorted((ROOT / "toolbox").glob("*.py"), key=lambda p: p.name)
    for path in [ROOT / name for name in ("clip_min.py", "orthcr.py", "data.py", "train.py")] + toolbox:
        content = path.read_bytes()
        h.update(f"{path.relative_to(ROOT).as_posix()}\t{len(content)}\n".encode() + content)
    return h.hexdigest()[:16]


def result_settings(cfg, seed, data_sha256=None):
    """The settings a checkpoint must have been written with to be resumed by this run."""
    declared, values = settings.declared(cfg), settings.values(cfg)
    names = set(declared.result_names()) - set(declared.unused(values))  # zero-shot: what applied, as recorded
    return {**{k: v for k, v in values.items() if k in names}, "seed": seed, "data_sha256": data_sha256}


def data_fingerprint(cfg, datasets):
    """SHA-256 of what a run reads: every training and test item (its path under the data root, its label) and the
    class names its prompts hold (a classnames.txt edited between a stop and --resume would mix two label-to-name
    maps), so that a resumed run sees the same few-shot images, test sets and classes."""
    root = os.path.abspath(Path(cfg.root).expanduser())
    train_set, eval_sets = datasets
    h = hashlib.sha256()
    for name, dataset in [("train", train_set), *eval_sets.items()]:
        if dataset is not None:
            h.update(f"[{name} classes]\n{json.dumps(list(dataset.classnames))}\n".encode())
    for name, items in [("train", train_set.train if train_set else []), *((s, d.test) for s, d in eval_sets.items())]:
        h.update(f"[{name}]\n".encode())
        for it in items:
            h.update(f"{os.path.relpath(os.path.abspath(it.impath), root)}\t{it.label}\n".encode())
    return h.hexdigest()[:16]


# ---------------------------------------------------------------------------------------------------- run folders

def run_folder(cfg, seed):
    """--out ({data} and {seed} in it become the dataset and the seed), else
    runs/<data>_<protocol>_<K>shot_<method>_seed<S>: each row of the ablation table gets its own folder; --eval-only's
    folder sits beside the adapters file."""
    name = data.dataset_name(cfg.data)  # a folder of your own images: its short name
    if cfg.out:
        return Path(cfg.out.replace("{data}", name).replace("{seed}", str(seed)))
    if cfg.eval_only:  # beside the training run, never into its files
        return Path(cfg.adapters).resolve().parent / f"eval_{name}_{cfg.protocol}_seed{seed}"
    if cfg.zero_shot:
        return Path("runs") / f"{name}_{cfg.protocol}_zeroshot_seed{seed}"
    return Path("runs") / f"{name}_{cfg.protocol}_{cfg.shots}shot_{settings.method_tag(cfg)}_seed{seed}"


@contextmanager
def hold(cfg, plan):
    """Every run folder of the plan, held (exclusive) from here to the end of the block."""
    with ExitStack() as held:
        for seed, (mode, _) in plan.items():
            held.enter_context(exclusive(run_folder(cfg, seed), cfg, mode, claim=result_settings(cfg, seed)))
        yield


@contextmanager
def exclusive(folder, cfg, plan, claim=None):
    """Hold the run folder for one run: created if needed and locked against concurrent use (`claim`: as `locked`
    takes it). What it holds was checked by plan_runs; it is checked again under the lock."""
    with locked(folder, claim=claim) as held:
        if not held:
            fail(f"{folder} is in use by another run (its .lock is held): wait for it, or choose another --out")
        if run_state(folder) != _PLAN_STATE[plan] and not (plan == "new" and cfg.overwrite):
            fail(f"{folder} changed while this run was starting (another run?): start again")
        with running(folder, plan):
            yield folder


@contextmanager
def locked(folder, shared=False, claim=None):
    """The run folder, created if needed and locked against concurrent use (flock on <folder>/.lock, which the
    kernel releases when a process dies). Yields True while held, or False at once, holding nothing, when another
    process holds it to run it (a sweep then skips it). `shared`: held only to look at the folder, beside other
    lookers; a process that takes the folder to run it waits the moment a look takes. `claim`: the settings of the
    run it is taken for (result_settings), written into .lock for other processes to compare (claimed_settings)
    before its config.json exists. On leaving, .lock is removed (by the run's holder) before it is released, and a
    folder made here that is still empty is removed again."""
    created = not folder.exists()
    try:
        lock = _take_lock(folder, shared)
    except OSError as e:
        fail(f"cannot use {folder} as the run folder: {e.strerror or e}")
    if lock is not None and not shared and claim is not None:
        try:
            lock.truncate(0)
            os.pwrite(lock.fileno(), (json.dumps(claim) + "\n").encode(), 0)
        except OSError:
            pass  # a full disk: the others then compare the run's config.json, once written
    try:
        yield lock is not None
    finally:
        if lock is not None:
            if not shared:
                (folder / ".lock").unlink(missing_ok=True)
            lock.close()
        if created and folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()


def _take_lock(folder, shared):
    """The open, flock-ed <folder>/.lock, or None when another process holds it to run it (exclusively). A look
    (a shared lock) is waited for. A holder removes .lock before it lets go: a lock taken on a file that is no
    longer the folder's .lock is let go, and the new one taken."""
    while True:
        folder.mkdir(parents=True, exist_ok=True)
        try:
            lock = os.fdopen(open_lock(folder / ".lock"), "rb+", buffering=0)
        except FileNotFoundError:  # the folder was removed (left empty by a holder) in between
            continue
        try:
            fcntl.flock(lock, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            try:  # only looks hold it when a shared lock can be had: wait for them
                fcntl.flock(lock, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                lock.close()
                return None  # held to be run
            lock.close()
            time.sleep(0.05)
            continue
        try:
            if os.stat(folder / ".lock").st_ino == os.fstat(lock.fileno()).st_ino:
                return lock
        except FileNotFoundError:
            pass
        lock.close()


@contextmanager
def running(folder, plan):
    """A run in its held folder: a write that a killed run left half done is removed first (none is in progress:
    the folder is held); a new run stopped (an error, Ctrl-C) before it left anything to continue from leaves
    nothing half-written."""
    for name in RUN_FILES:
        for stale in folder.glob(f".{name}.*.tmp"):
            stale.unlink(missing_ok=True)
    try:
        yield folder
    except BaseException:
        if plan == "new" and run_state(folder) == "partial":
            clear(folder, evaluations=False)  # only what this run wrote
        raise


def claimed_settings(folder, patience=1.0):
    """The settings of the run that another process holds `folder` for: the claim in its .lock (`locked`), else
    the run's config.json; None when neither says within `patience` seconds (a claim is written the moment the
    lock is taken; a process of older code writes none)."""
    deadline = time.monotonic() + patience
    while True:
        record = read_record(folder / ".lock") or read_record(folder / "config.json")  # half written: asked again
        if record or time.monotonic() > deadline:
            return record
        time.sleep(0.05)


def read_record(path):
    """The JSON object in the small file `path`, or None if there is none, or it is not one (yet). A link is never
    followed (open_lock refuses a linked .lock with its own line)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        with os.fdopen(fd, "rb") as f:
            record = json.loads(f.read(2**20)) if stat.S_ISREG(os.fstat(fd).st_mode) else None
    except (OSError, ValueError, RecursionError):
        return None
    return record if isinstance(record, dict) and record else None


def open_lock(path):
    """The run folder's lock file, opened (created if needed) without following a link: a .lock that is a
    symlink, dangling or not, a hard link (a file with another name too) or anything but a regular file is refused,
    and nothing is created at its target.
    Returns the file descriptor (its flock is the lock)."""
    def refuse(what):
        fail(f"{path} is {what}, not a run's lock file: a run never follows or opens it; remove it, or choose "
             f"another --out")

    if os.path.islink(path):
        refuse("a symlink")
    if os.path.lexists(path) and not stat.S_ISREG(os.lstat(path).st_mode):
        refuse("not a regular file")
    try:  # O_NOFOLLOW: a link put in its place since the check above fails here (ELOOP) instead of being followed
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o666)
    except FileNotFoundError:
        raise  # the folder went in between: the caller retries
    except OSError as e:
        if e.errno == errno.ELOOP:
            refuse("a symlink")
        fail(f"cannot use {path.parent} as the run folder: {path}: {e.strerror or e}")
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        refuse("not a regular file")
    if os.fstat(fd).st_nlink > 1:  # the claim written into .lock (locked) would overwrite the other names' file
        os.close(fd)
        refuse("a hard link to another file")
    return fd


def clear(folder, evaluations=True):
    """--overwrite: the previous run's files go, once the new run has passed every check, with the evaluations of
    its adapters that --eval-only wrote beside them (they would describe adapters that no longer exist)."""
    for name in RUN_FILES:
        (folder / name).unlink(missing_ok=True)
    for evaluation in folder.glob("eval_*_seed*") if evaluations else ():
        if evaluation.is_dir() and not evaluation.is_symlink() and (evaluation / "config.json").is_file():
            shutil.rmtree(evaluation)


def run_state(folder):
    """'done' (results.json), 'checkpoint' (checkpoint.pt, unfinished), 'partial' (a run that stopped before
    its first checkpoint) or 'empty'."""
    if (folder / "results.json").exists():
        return "done"
    if (folder / "checkpoint.pt").exists():
        return "checkpoint"
    return "partial" if any((folder / name).exists() for name in RUN_FILES) else "empty"


_PLAN_STATE = {"new": "empty", "resume": "checkpoint", "done": "done"}


def plan_runs(cfg, splits):
    """What each seed's run does: ("new", None), ("resume", checkpoint) or ("done", results) (--resume keeps a
    finished seed of a sweep as it is; `splits` are the evaluation splits its results must hold). One-line errors,
    before any data is read, for folders that cannot take their run; a checkpoint or finished run whose recorded
    settings differ from this run's is refused here."""
    folders = {seed: run_folder(cfg, seed) for seed in cfg.seeds}
    for folder in folders.values():
        check_writable(folder)
        check_apart(folder, cfg.root)
    if cfg.eval_only:
        adapters = Path(cfg.adapters).resolve()
        for folder in folders.values():
            if adapters.parent == folder.resolve():
                fail(f"--out {folder} holds the adapters being evaluated ({adapters.name}): --eval-only writes its "
                     f"own folder; choose another --out")
    states = {seed: run_state(folder) for seed, folder in folders.items()}
    if not cfg.resume:
        for seed, folder in folders.items():
            held = [name for name in RUN_FILES if (folder / name).exists()]
            if held and not cfg.overwrite:
                way = {"checkpoint": "continue exactly that run with --resume, replace it with --overwrite",
                       "done": "it is finished: replace it with --overwrite",
                       "partial": "it stopped before its first checkpoint: replace it with --overwrite"}[states[seed]]
                fail(f"{folder} already holds a run ({', '.join(held)}): {way}, or choose another --out")
        return {seed: ("new", None) for seed in folders}
    first = folders[cfg.seeds[0]]
    if all(state == "done" for state in states.values()):
        fail(f"--resume: {first} holds a finished run (results.json){' and so does every seed' * (len(states) > 1)}; "
             f"there is nothing to resume")
    if all(state == "empty" for state in states.values()):
        fail(f"--resume: no checkpoint in {first} (expected {first / 'checkpoint.pt'}); check --out, or start "
             f"a new run without --resume")
    plan = {}
    for seed, state in states.items():
        folder = folders[seed]
        if state == "partial":
            only = f"--seeds {seed} --overwrite (that seed only)" if len(folders) > 1 else "--overwrite"
            fail(f"--resume: {folder} holds a run that stopped before its first checkpoint; start it again with "
                 f"{only}")
        if state == "done":
            plan[seed] = ("done", read_finished_run(folder, cfg, seed, splits))
        elif state == "checkpoint":
            plan[seed] = ("resume", load_checkpoint(folder / "checkpoint.pt", cfg, seed))
        else:
            plan[seed] = ("new", None)
    return plan


def check_plan(cfg, plan, fingerprints, totals, adapters, context, scaler):
    """What plan_runs could not compare before the model and the data were known: each checkpoint to resume
    completely (check_checkpoint: `totals` its run's steps, `adapters`/`context` this run's trainables on meta,
    `scaler` a fresh one), each finished seed's model checksum and data."""
    for seed, (mode, payload) in plan.items():
        folder = run_folder(cfg, seed)
        if mode == "resume":
            check_checkpoint(folder / "checkpoint.pt", payload, cfg, seed, fingerprints[seed], totals[seed],
                             adapters, context, scaler)
        elif mode == "done":
            compare_settings(folder / "config.json", payload[0], cfg, seed, fingerprints[seed],
                             only=("checkpoint_sha256", "data_sha256"))


def check_writable(folder):
    """--out (or a default run folder) must be a folder, or creatable, and writable."""
    problem = unreachable("--out", folder)  # a name too long (after {seed}), no permission
    if problem:
        fail(problem)
    for path in [folder, *folder.parents]:
        if os.path.lexists(path) and not path.exists():
            fail(f"--out {folder}: {path} is a dangling symlink or a symlink loop")
        if path.exists() and not path.is_dir():
            fail(f"--out {folder}: {path} is a file, not a folder")
        if path.exists():
            if not os.access(path, os.W_OK | os.X_OK):
                fail(f"--out {folder}: {path} is not writable")
            return


def check_apart(folder, root):
    """A run folder never lies in a dataset's folder under the data root (its files would mix with the images, and a
    later run would meet them there), nor does the data root lie in a run folder: one line, before anything is
    read or written."""
    # links resolved (realpath: a loop is named by the root check later): one folder under two names is one folder
    out, root = (Path(os.path.realpath(Path(p).expanduser())) for p in (folder, root))
    for name, spec in data.DATASETS.items():
        dataset = root / spec.folder
        if out == dataset or dataset in out.parents:
            fail(f"--out {folder} is inside the folder of dataset {name} ({dataset}): run files would mix with its "
                 f"images; choose a run folder outside the dataset folders of {root}")
    if out == root or out in root.parents:
        fail(f"--out {folder} holds the data root {root} (--root or $ORTHCR_DATA): a run folder holds one run's "
             f"files; choose one outside the data")


def unreachable(flag, path):
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


def read_finished_run(folder, cfg, seed, splits):
    """The results.json of a finished seed that --resume keeps, refused unless it was run with these settings."""
    config, results = (_read_json_record(folder / name) for name in ("config.json", "results.json"))
    compare_settings(folder / "config.json", config, cfg, seed, later=("checkpoint_sha256", "data_sha256"))
    _check_results_record(folder / "results.json", results, cfg, seed, splits)
    return config, results


def _check_results_record(path, record, cfg, seed, splits):
    """A finished seed's results.json must be what this run would have written, down to each split's accuracy:
    it goes into the table beside the seeds trained now."""
    expected = {"data": cfg.data, "protocol": cfg.protocol, "shots": cfg.shots, "seed": seed,
                "method": settings.method_name(cfg), "eval_limit": cfg.eval_limit}
    for key, value in expected.items():
        if record.get(key) != value:
            fail(f"--resume: {path} records {key} = {record.get(key, '(nothing)')!r}, this run has {value!r}: it "
                 f"is not this seed's results")
    results = record.get("results")
    for split in splits:
        r = results.get(split) if isinstance(results, dict) else None
        number = isinstance(r, dict) and type(r.get("accuracy")) in (int, float) and type(r.get("n")) is int
        if not (number and 0 <= r["accuracy"] <= 100 and r["n"] >= 0):
            fail(f"--resume: {path}: results[{split!r}] is not {{'accuracy': 0-100, 'n': count, ...}} as "
                 f"train.py writes it; rerun that seed alone with --seeds {seed} --overwrite")


def _read_json_record(path):
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError) as e:
        fail(f"--resume: cannot read {path}: {e}".splitlines()[0])
    if not isinstance(record, dict):
        fail(f"--resume: {path} is not a record written by train.py")
    return record


def compare_settings(path, recorded, cfg, seed, data_sha256=None, later=(), only=None):
    """Refuse, naming the first difference and both values, a record written with other result settings.
    `later`: keys not known yet (compared once the model's checksum and the data are known), `only`: just those."""
    difference = first_difference(recorded, cfg, seed, data_sha256, later, only)
    if difference:
        key, was, now = difference
        fail(f"--resume: {path} was written with {key} = {short(was)}, this run has {key} = {short(now)}; resume "
             f"with the run's own settings, or start a new run")


def first_difference(recorded, cfg, seed, data_sha256=None, later=(), only=None):
    """(key, recorded value, this run's value) of the first result setting in which `recorded` differs, or None."""
    found = differences(recorded, cfg, seed, data_sha256, later, only)
    return found[0] if found else None


def differences(recorded, cfg, seed, data_sha256=None, later=(), only=None):
    """[(key, recorded value, this run's value)] of each result setting in which `recorded` differs."""
    current = result_settings(cfg, seed, data_sha256)
    found = []
    for key in only or current:
        if key in later:
            continue
        value, then = current[key], recorded.get(key, BEFORE_RECORDED.get(key, "(not recorded)"))
        if then != value:
            found.append((key, then, value))
    return found


# settings that records written before them lack, and the value those runs had: such a record still resumes
BEFORE_RECORDED = {"template": None, "activation": "quick_gelu"}


# ---------------------------------------------------------------------------------------------------- writing

def write_json(path, obj):
    """files.write_json (a temporary name, fsync, then the rename), a full disk as one line."""
    _write_guarded(path, lambda: files.write_json(path, obj))


def write_torch(path, obj):
    def write(tmp):
        with open(tmp, "wb") as f:  # through a Python file, a full disk is an OSError (ENOSPC), not a torch error
            torch.save(obj, f)
    _write_guarded(path, lambda: files.write_atomic(path, write))


def write_file(path, write):
    """files.write_atomic(path, write), a full disk as one line."""
    _write_guarded(path, lambda: files.write_atomic(path, write))


def _write_guarded(path, write):
    """A write with a full disk as one line that names the file (the previous file is kept)."""
    path = Path(path)
    try:
        write()
    except OSError as e:
        disk_error(path, e, f"the previous {path.name} is kept" if path.exists() else "nothing was written")


def disk_error(path, error, kept):
    """One line for a failed write; on a full disk, first the command that resumes the run, if it can be."""
    if error.errno != errno.ENOSPC:
        fail(f"cannot write {path}: {error.strerror or error}")
    if (path.parent / "checkpoint.pt").is_file():
        say(f"free some space, then resume with:\n  {resume_command(path.parent)}")
    fail(f"cannot write {path}: no space left on device (ENOSPC); {kept}")


_PATH_FLAGS = ("--out", "--root", "--weights", "--adapters", "--download-root")


def resume_command(folder):
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
    if "--out" not in argv:  # the default folder, named (with {seed}, {data} for a sweep): works from anywhere
        several = {flag: len(_values(argv, flag)) > 1 or _values(argv, flag) == ["all"]
                   for flag in ("--seeds", "--data")}
        out = folder.resolve()
        name = re.sub(r"_seed\d+$", "_seed{seed}", out.name) if several["--seeds"] else out.name
        if several["--data"]:  # the default folder begins with the dataset, then the protocol
            protocol = (_values(argv, "--protocol") or ["base2new"])[0]
            if f"_{protocol}_" in name:
                name = f"{{data}}_{protocol}_" + name.split(f"_{protocol}_", 1)[1]
        argv += ["--out", str(out.parent / name)]
    return shlex.join([sys.executable, *argv])


def _values(argv, flag):
    """The values given to `flag` in `argv` (the words after it, up to the next flag)."""
    if flag not in argv:
        return []
    return list(itertools.takewhile(lambda a: not a.startswith("--"), argv[argv.index(flag) + 1:]))


# ---------------------------------------------------------------------------------------------------- checkpoints

def _trainables(adapters, context):
    return [*adapters.values(), *([] if context is None else [context])]


def save_checkpoint(folder, cfg, seed, data_sha256, step, total, adapters, context, optimizers, scaler):
    """Everything a resumed run needs to continue bit for bit, with the settings it must be resumed with (the
    images' randomness is seeded from (seed, epoch, position): no generator to keep). `optimizers`: {"adapters":
    AdamW or None, "context": CoOp's SGD or None}, saved as "optimizer" ({} without rotations) and "ctx_optimizer"
    (None without a context). Non-finite trainables are never saved: the last good checkpoint stays the last one."""
    if not all(torch.isfinite(P).all() for P in _trainables(adapters, context)):
        fail(f"non-finite adapters after step {step} (the loss and gradient were finite: the optimizer's state?); "
             f"the last good checkpoint is {folder / 'checkpoint.pt'}", code=3)
    write_torch(folder / "checkpoint.pt", {
        "step": step, "total": total, "adapters": {k: P.detach().cpu() for k, P in adapters.items()},
        "context": None if context is None else context.detach().cpu(),
        "optimizer": optimizers["adapters"].state_dict() if optimizers["adapters"] else {},
        "ctx_optimizer": optimizers["context"].state_dict() if optimizers["context"] else None,
        "scaler": scaler.state_dict(),
        "rng": {"torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
        "settings": result_settings(cfg, seed, data_sha256), "code_version": code_version()})


def resume_from(state, folder, adapters, context, optimizers, scaler):
    """Load a checkpoint (checked completely before the model was loaded) into the fresh trainables, both
    optimizers, the scaler and every RNG; trim the step log to the checkpoint's step. Returns the step."""
    with torch.no_grad():
        for k, P in adapters.items():
            P.copy_(state["adapters"][k])
        if context is not None:
            context.copy_(state["context"])
    if optimizers["adapters"]:
        optimizers["adapters"].load_state_dict(state["optimizer"])
    if optimizers["context"]:
        optimizers["context"].load_state_dict(state["ctx_optimizer"])
    scaler.load_state_dict(state["scaler"])
    torch.set_rng_state(state["rng"]["torch"])
    if state["rng"]["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    if distributed.main_process():  # under torchrun, only the first process writes
        write_file(folder / "log.jsonl", lambda tmp: tmp.write_text("".join(_log_lines_until(folder, state["step"]))))
    say(f"resumed from {folder / 'checkpoint.pt'} at step {state['step']}/{state['total']}")
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


def load_checkpoint(path, cfg, seed):
    """A checkpoint, refused with one line unless its structure is train.py's and it was written with this run's
    settings (the model's checksum and the data are compared once known: check_checkpoint)."""
    state = load_trusted(path, "checkpoint")
    expected = {"step": int, "total": int, "adapters": dict, "optimizer": dict, "scaler": dict, "rng": dict,
                "settings": dict}
    for key, kind in expected.items():
        if type(state.get(key)) is not kind:
            fail(f"{path} is not a checkpoint written by train.py: '{key}' is missing or not a {kind.__name__}")
    compare_settings(path, state["settings"], cfg, seed, later=("checkpoint_sha256", "data_sha256"))
    return state


def check_checkpoint(path, state, cfg, seed, data_sha256, total, adapters, context, scaler):
    """The rest of a checkpoint's checks: the base model and the data, the steps, every tensor's shape, dtype and
    finiteness, the optimizer's and the scaler's state (`scaler`: a fresh one of this run), the RNG states.
    `adapters` and `context` are this run's trainables (on the meta device: only their shapes count)."""
    compare_settings(path, state["settings"], cfg, seed, data_sha256, only=("checkpoint_sha256", "data_sha256"))
    if not (0 <= state["step"] <= total and state["total"] == total):
        fail(f"{path}: step {state['step']} of {state['total']} does not fit this run's {total} steps")
    check_trainables(path, state["adapters"], state.get("context"), adapters, context)
    _check_optimizer_state(path, state["optimizer"], [P.shape for P in adapters.values()], state["step"],
                           skips=cfg.precision == "fp16")
    _check_context_optimizer_state(path, state.get("ctx_optimizer"), None if context is None else context.shape)
    fresh = scaler.state_dict()
    if set(state["scaler"]) != set(fresh) or any(type(state["scaler"][k]) is not type(v) for k, v in fresh.items()):
        fail(f"{path}: the grad scaler's state {state['scaler']!r} is not that of a {cfg.precision} run")
    rng, size = state["rng"], torch.get_rng_state().shape
    for key in ("torch", "cutout") if "cutout" in rng else ("torch",):  # older checkpoints kept a Cutout generator
        if not (isinstance(rng.get(key), torch.Tensor) and rng[key].dtype == torch.uint8 and rng[key].shape == size):
            fail(f"{path}: the {key} random state is missing or not a generator state")
    if not isinstance(rng.get("cuda"), list):
        fail(f"{path}: the CUDA random states are missing")
    if state.get("code_version") not in (None, code_version()):
        warnings.warn(f"{path} was written by other code (version {state['code_version']}, now {code_version()}): "
                      f"the resumed run may differ from an uninterrupted one")


def _check_optimizer_state(path, optimizer, shapes, step, skips=False):
    """AdamW's state must hold, for each adapter, finite moments of its shape after the first step (`skips`, fp16:
    none at all while the grad scaler has skipped every step so far); {} without rotations."""
    if not shapes:
        if optimizer != {}:
            fail(f"{path}: it holds an optimizer's state for rotations, this run trains none")
        return
    groups, moments = optimizer.get("param_groups"), optimizer.get("state")
    if not (isinstance(groups, list) and len(groups) == 1 and isinstance(groups[0], dict)
            and isinstance(groups[0].get("params"), list) and len(groups[0]["params"]) == len(shapes)
            and isinstance(moments, dict)):
        fail(f"{path}: the optimizer's state is not AdamW's over this run's {len(shapes)} trainable tensors")
    for index, shape in zip(groups[0]["params"], shapes):
        entry = moments.get(index)
        if entry is None and (step == 0 or skips and not moments):
            continue
        if not (isinstance(entry, dict) and all(isinstance(entry.get(k), torch.Tensor) and entry[k].shape == shape
                                                and torch.isfinite(entry[k]).all() for k in ("exp_avg", "exp_avg_sq"))
                and isinstance(entry.get("step"), torch.Tensor) and torch.isfinite(entry["step"]).all()):
            fail(f"{path}: the optimizer's moments of tensor {index} are missing, of the wrong shape or non-finite")


def _check_context_optimizer_state(path, optimizer, shape):
    """CoOp's SGD over the context: one group of one tensor, its momentum buffer (once a step was applied, with
    momentum) finite and of the context's shape; None without a context."""
    if shape is None:
        if optimizer is not None:
            fail(f"{path}: it holds a CoOp context optimizer's state, this run learns no context")
        return
    groups, moments = (optimizer.get("param_groups"), optimizer.get("state")) if isinstance(optimizer, dict) else \
        (None, None)
    if not (isinstance(groups, list) and len(groups) == 1 and isinstance(groups[0], dict)
            and isinstance(groups[0].get("params"), list) and len(groups[0]["params"]) == 1
            and isinstance(moments, dict)):
        fail(f"{path}: the CoOp context's optimizer state is not SGD's over one context tensor (a checkpoint from "
             f"before the context had its own optimizer?)")
    buffer = (moments.get(groups[0]["params"][0]) or {}).get("momentum_buffer")
    if buffer is not None and not (isinstance(buffer, torch.Tensor) and buffer.shape == shape
                                   and torch.isfinite(buffer).all()):
        fail(f"{path}: the CoOp context's momentum buffer is of the wrong shape or non-finite")


def check_trainables(path, saved_adapters, saved_context, adapters, context):
    """The saved tensors must be exactly this run's: same keys, same shapes, floating point, finite."""
    def describe(t):
        return tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__

    for key, P in adapters.items():
        saved = saved_adapters.get(key)
        if not isinstance(saved, torch.Tensor) or saved.shape != P.shape:
            fail(f"{path}: adapter {key} has shape {describe(saved)}, this run expects {tuple(P.shape)}")
    if set(saved_adapters) - set(adapters):
        fail(f"{path}: adapter {sorted(set(saved_adapters) - set(adapters))[0]} is not part of this run's layout")
    if (context is None) != (saved_context is None) or (
            context is not None and (not isinstance(saved_context, torch.Tensor) or saved_context.shape != context.shape)):
        fail(f"{path}: CoOp context {None if saved_context is None else describe(saved_context)} does not match this "
             f"run's {None if context is None else tuple(context.shape)}")
    for key, P in [*saved_adapters.items(), *([("context", saved_context)] if saved_context is not None else [])]:
        if not P.is_floating_point():
            fail(f"{path}: {key} holds {P.dtype} values, not floating point")
        if not torch.isfinite(P).all():
            fail(f"{path}: {key} holds non-finite values")


def load_trusted(path, what, blob=None):
    """torch.load with weights_only=True: tensors and plain containers only, no code from the file runs; the
    archive's records checked first, so that a small file cannot inflate into a large allocation. With `blob`,
    the file's bytes already read are loaded."""
    article = "an" if what[0] in "aeiou" else "a"
    try:
        if not Path(path).is_file():
            fail(f"{path} is not a regular file: not {article} {what} file")
        if Path(path).stat().st_size == 0 or blob == b"":
            fail(f"{path} is empty (0 bytes): not {article} {what} file")
        checkpoints.check_torch_file(path, blob)
        source = path if blob is None else io.BytesIO(blob)
        obj = torch.load(source, map_location="cpu", weights_only=True)
    except ValueError as e:
        fail(f"{str(e).splitlines()[0]}: not {article} {what} file written by train.py")
    except OSError as e:
        fail(f"cannot read {what} file {path}: {e.strerror or e}")
    except Exception as e:
        fail(f"{path} is not a valid {what} file (loaded with weights_only=True): {str(e).splitlines()[0]}")
    if not isinstance(obj, dict):
        fail(f"{path} is not {article} {what} file written by train.py (it holds a {type(obj).__name__})")
    return obj


# ---------------------------------------------------------------------------------------------------- adapters files

def save_adapters(path, adapters, context, cfg, seed, data_sha256, trained_on=None):
    """Only the trainable tensors (a few hundred MB at most), with the layout and the full training settings;
    with `trained_on` (a data.Dataset), the class names and prompt template they were trained with (the base
    classes of a base-to-new run), which --predict classifies among."""
    layout = settings.declared(cfg).layout_names()
    classes = {} if trained_on is None else {"classnames": list(trained_on.classnames), "template": trained_on.template}
    write_torch(path, {"adapters": {k: P.detach().cpu() for k, P in adapters.items()},
                       "context": None if context is None else context.detach().cpu(),
                       "config": {"model": model_label(cfg), "checkpoint_sha256": cfg.checkpoint_sha256,
                                  **{k: v for k, v in settings.values(cfg).items() if k in layout}, **classes},
                       "settings": result_settings(cfg, seed, data_sha256)})


def _read_training_settings(path, saved, declared):
    """The training settings recorded in an adapters file (`saved`, its content): what --eval-only takes when a
    flag is not given."""
    if not isinstance(saved.get("adapters"), dict):
        fail(f"{path} holds no 'adapters' entry: not an adapters.pt written by train.py")
    if "optimizer" in saved or "step" in saved:
        fail(f"{path} is a training checkpoint (step {saved.get('step')}), not finished adapters: continue its run "
             f"with --resume")
    for part in ("config", "settings"):
        if not isinstance(saved.get(part, {}) or {}, dict):
            fail(f"{path}: its '{part}' is a {type(saved[part]).__name__}, not the record train.py writes")
    recorded = {**(saved.get("config") or {}), **(saved.get("settings") or {})}
    for name in declared.saved_names():
        key, s = ("seed" if name == "seeds" else name), declared.by_name[name]
        one_per_run = key in ("seed", "data")  # a run's record holds its own seed and dataset
        if key in recorded and not s.valid([recorded[key]] if one_per_run else recorded[key]):
            problem = _range_problem(s, recorded[key])
            fail(f"{path}: its recorded {key} = {short(recorded[key])} is not a valid setting"
                 f"{f' ({problem})' if problem else ''}")
    check_recorded_layout(path, saved["adapters"], saved.get("context"), recorded)
    return recorded


def _range_problem(setting, value):
    """What the setting's range says of a recorded number (None for another kind of fault)."""
    if setting.check and type(value) in (int, float):
        try:
            return setting.check(value)
        except (TypeError, ValueError):
            return None
    return None


def short(value, limit=60):
    """repr(value), cut to `limit` characters (a recorded value from a file can be any size)."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text):,} characters)"


def check_recorded_layout(path, adapters, context, recorded):
    """What an adapters file records must be what its tensors are, before anything is built from either: each
    adapter (blocks, b, b) with the recorded blocks, on a recorded target and tower, no larger than a CLIP layer;
    the CoOp context (n_ctx, width) exactly when the prompt is coop, with the recorded n_ctx and --ctx-init's
    token count. A small file that claims a huge size is refused here, not after gigabytes were allocated."""
    def describe(t):
        return tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__

    targets, towers, blocks = recorded.get("targets"), recorded.get("towers"), recorded.get("blocks")
    for key, P in adapters.items():
        if not (isinstance(key, str) and isinstance(P, torch.Tensor) and P.dim() == 3 and P.shape[1] == P.shape[2]):
            fail(f"{path}: adapter {key!r} is {describe(P)}, not a (blocks, b, b) tensor")
        if blocks is not None and P.shape[0] != blocks:
            fail(f"{path}: adapter {key} has {P.shape[0]} blocks, its recorded blocks = {blocks}")
        if P.shape[0] * P.shape[1] > settings.BLOCKS_MAX:
            fail(f"{path}: adapter {key} is {tuple(P.shape)}, for {P.shape[0] * P.shape[1]:,} inputs: no CLIP "
                 f"layer has more than {settings.BLOCKS_MAX:,}")
        if targets is not None and not any(key.endswith((f".{t}.weight", f".{t}_weight")) for t in targets):
            fail(f"{path}: adapter {key} is not on one of its recorded targets ({' '.join(targets) or 'none'})")
        if towers is not None and not any(key.startswith(orthcr.TOWER_PREFIX[t]) for t in towers):
            fail(f"{path}: adapter {key} is not in one of its recorded towers ({' '.join(towers)})")
    if targets and not adapters:
        fail(f"{path} records targets {' '.join(targets)} but holds no adapters")
    prompt, n_ctx, ctx_init = recorded.get("prompt"), recorded.get("n_ctx"), recorded.get("ctx_init")
    if context is None:
        if prompt == "coop":
            fail(f"{path} records prompt = coop but holds no CoOp context")
        return
    if not (isinstance(context, torch.Tensor) and context.dim() == 2):
        fail(f"{path}: its CoOp context is {describe(context)}, not an (n_ctx, width) tensor")
    if prompt is not None and prompt != "coop":
        fail(f"{path} holds a CoOp context but records prompt = {prompt}")
    if not 1 <= context.shape[0] <= settings.N_CTX_MAX or n_ctx is not None and context.shape[0] != n_ctx:
        fail(f"{path}: its CoOp context has {context.shape[0]} vectors, its recorded n_ctx = {n_ctx} (at most "
             f"{settings.N_CTX_MAX} fit CLIP's {settings.CONTEXT_LENGTH} tokens)")
    if context.shape[1] > settings.BLOCKS_MAX:
        fail(f"{path}: its CoOp context is {tuple(context.shape)}: no CLIP text width is {context.shape[1]:,}")
    if ctx_init is not None:
        words = len(clip_min.encode(ctx_init)) if len(ctx_init) <= 100 * settings.CONTEXT_LENGTH else None
        if words != context.shape[0]:
            fail(f"{path}: its recorded ctx_init {short(ctx_init)} is {words or 'too many'} tokens, its CoOp "
                 f"context {context.shape[0]} vectors")


def read_adapters_once(path, declared):
    """An adapters file read once: its content, the SHA-256 of those bytes and the training settings they record,
    so that what is evaluated, hashed, labelled and recorded is one and the same file."""
    try:
        blob = Path(path).read_bytes()
    except OSError as e:
        fail(f"cannot read adapters file {path}: {e.strerror or e}")
    saved = load_trusted(path, "adapters", blob=blob)
    return {"saved": saved, "sha256": hashlib.sha256(blob).hexdigest(),
            "settings": _read_training_settings(path, saved, declared)}


def read_adapters_file(path, adapters_file, params, expected, expected_context, device):
    """(adapters, context, what was evaluated) of an adapters file read by read_adapters_once, checked against
    the model and this run's layout (`expected`, `expected_context`): a partial or foreign file names its first
    mismatching tensor (in state-dict order) and is never evaluated."""
    saved = adapters_file["saved"]
    evaluated = {"adapters": str(Path(path).resolve()), "adapters_sha256": adapters_file["sha256"],
                 "training_settings": adapters_file["settings"]}
    try:
        orthcr.check_adapters(params, saved["adapters"])
    except (ValueError, AttributeError, TypeError) as e:
        fail(f"{path} does not fit this model: {e}")
    first = next((k for k in params if (k in expected) != (k in saved["adapters"])
                  or (k in expected and saved["adapters"][k].shape != expected[k].shape)), None)
    if first is not None:
        config = saved.get("config") or {}
        fail(f"{path} was made for another configuration (its config: --targets "
             f"{' '.join(config.get('targets', ['?'])) or 'none'} --blocks {config.get('blocks', '?')} --towers "
             f"{' '.join(config.get('towers', ['?']))}, model {config.get('model', '?')}); first mismatching tensor "
             f"{first}: this run expects {tuple(expected[first].shape) if first in expected else 'no adapter'}, "
             f"the file has {tuple(saved['adapters'][first].shape) if first in saved['adapters'] else 'none'}")
    check_trainables(path, saved["adapters"], saved.get("context"), expected, expected_context)
    context = saved.get("context")
    return ({k: P.to(device) for k, P in saved["adapters"].items()},
            None if context is None else context.to(device), evaluated)


def export(folder, merged, context, cfg):
    """merged.pt: the merged weights as a state dict in OpenAI's key format (fp32, or fp16 as OpenAI ships
    them); the learned CoOp context beside it in context.pt, since OpenAI's format has no place for it."""
    dtype = torch.float16 if cfg.export_dtype == "fp16" else torch.float32
    write_torch(folder / "merged.pt", {k: v.to("cpu", dtype if v.is_floating_point() else v.dtype)
                                       for k, v in merged.items()})
    say(f"merged weights written to {folder / 'merged.pt'} ({cfg.export_dtype})")
    if context is not None:
        write_torch(folder / "context.pt", {"context": context.detach().cpu(), "n_ctx": cfg.n_ctx,
                                            "ctx_init": cfg.ctx_init, "prompt": "[SOS] ctx_1..ctx_n {class}. [EOS]"})
        say(f"CoOp context written to {folder / 'context.pt'}")


# ---------------------------------------------------------------------------------------------------- around the loop

def stop_not_finite(what, step, folder):
    """A non-finite loss or gradient: one line naming the step and the last good checkpoint, exit 3."""
    last = folder / "checkpoint.pt"
    fail(f"non-finite {what} at step {step}; the last good checkpoint is "
         f"{last if last.is_file() else 'none (no checkpoint was saved yet)'}", code=3)


def _stop_interrupted(folder, step, total):
    say(f"checkpoint saved to {folder / 'checkpoint.pt'} at step {step}/{total}; resume with:\n  "
        f"{resume_command(folder)}")
    raise SystemExit(130)


class Interrupt:
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
        say(f"\n{signal.Signals(signum).name}: saving a checkpoint after this step (Ctrl-C again to abort)")

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


class Bookkeeping:
    """Everything around a step that is not the method: log.jsonl (one JSON line per step, flushed), the
    checkpoint at each epoch's end (or every --save-every steps) and on Ctrl-C, the progress line."""

    def __init__(self, folder, cfg, step, total, save):
        self.folder, self.cfg, self.total, self.save = folder, cfg, total, save
        per_epoch = total // cfg.epochs
        self.save_every = cfg.save_every or per_epoch
        self.progress = Progress(step, total, cfg.batch_size)

    def __enter__(self):
        self.interrupt = Interrupt().__enter__()
        self.skipped = _skipped_steps(self.folder)  # a resumed run's, before its checkpoint
        self.progress.skipped = self.skipped
        self.log = open(self.folder / "log.jsonl", "a") if distributed.main_process() else None
        return self

    def after_step(self, step, epoch, lr, loss, terms, skipped=None, ctx_lr=None):
        """`skipped`: None, or the loss scale at which fp16's gradients overflowed (the step was not applied);
        `ctx_lr`: the CoOp context's own learning rate, where it has one beside the adapters'."""
        self.skipped += skipped is not None
        self.progress.skipped = self.skipped
        if distributed.main_process():  # under torchrun, only the first process writes
            self.log_step(step, epoch, lr, loss, terms, skipped, ctx_lr)
        stop = distributed.any_process(self.interrupt.requested)  # under torchrun, all stop after the same step
        if not distributed.main_process():
            if stop:
                fail("interrupted; the first process saved the checkpoint", code=130)
            return
        if stop or step % self.save_every == 0 or step == self.total:
            self.save(step)  # at each epoch's end (or every --save-every steps), at the last step, on Ctrl-C
        if stop:
            _stop_interrupted(self.folder, step, self.total)
        if step % self.cfg.log_every == 0 or step == self.total:
            self.progress.report(step, epoch, self.cfg.epochs, lr, terms)

    def log_step(self, step, epoch, lr, loss, terms, skipped=None, ctx_lr=None):
        """One JSON line in log.jsonl, flushed: reads the loss terms' values (a device sync). A step that fp16's
        scaler skipped says so, with the scale it overflowed at."""
        record = {"step": step, "epoch": epoch + 1, "lr": lr, **({"ctx_lr": ctx_lr} if ctx_lr is not None else {}),
                  "loss": loss.item(), **{k: v.item() for k, v in terms.items()}, "step_s": self.progress.tick(),
                  **({"skipped": True, "scale": skipped} if skipped is not None else {})}
        try:
            self.log.write(json.dumps(record) + "\n")
            self.log.flush()
        except OSError as e:
            disk_error(self.folder / "log.jsonl", e, "the steps before are kept")

    def __exit__(self, *exc):
        self.interrupt.__exit__(*exc)
        try:
            if self.log:
                self.log.close()
        except OSError:
            pass  # a full disk was reported when the line was written


def _skipped_steps(folder):
    """How many steps of the step log fp16's scaler skipped."""
    return sum(json.loads(line).get("skipped") is True for line in _log_lines_until(folder, float("inf")))


def check_steps_applied(folder, skipped, steps, warn_above):
    """After the loop: a run in which fp16's scaler skipped every step trained nothing and is not recorded as
    trained (one line, exit 3; its checkpoint, P = 0, goes); one in which it skipped more than `warn_above` of the
    steps says so in one line."""
    if steps and skipped == steps:
        (folder / "checkpoint.pt").unlink(missing_ok=True)
        fail(f"no training step was applied: the fp16 grad scaler skipped all {steps} steps (the gradients "
             f"overflowed at every loss scale; {folder / 'log.jsonl'} has each), so the adapters are still zero-shot "
             f"CLIP; nothing is recorded as trained. Try --precision fp32 or bf16", code=3)
    if steps and skipped > warn_above * steps:
        warnings.warn(f"the fp16 grad scaler skipped {skipped} of {steps} steps ({100 * skipped / steps:.0f} %, "
                      f"more than {100 * warn_above:g} %): their gradients overflowed and were not applied "
                      f"({folder / 'log.jsonl'} marks each); the run trained on the rest")


class Progress:
    """One stderr line per --log-every steps: loss terms, lr, images/s, fp16's skipped steps, the time left."""

    def __init__(self, step, total, batch_size):
        self.start, self.start_step, self.total, self.batch_size = time.monotonic(), step, total, batch_size
        self.last, self.terms, self.skipped = self.start, {}, 0

    def tick(self):
        now, last = time.monotonic(), self.last
        self.last = now
        return now - last

    def report(self, step, epoch, epochs, lr, terms):
        rate = (step - self.start_step) / max(time.monotonic() - self.start, 1e-9)
        parts = " ".join(f"{k} {v.item():.4f}" for k, v in terms.items())
        skipped = f" skipped {self.skipped}" if self.skipped else ""
        say(f"step {step}/{self.total} epoch {epoch + 1}/{epochs} ({parts}) lr {lr:.2e}{skipped} "
            f"{rate * self.batch_size:.1f} img/s ETA {files.format_duration((self.total - step) / max(rate, 1e-9))}")


@contextmanager
def stopping():
    """The command line's frame: warnings as one line, output streams that a closed reader cannot break
    (files.unbreakable_streams), SIGTERM stops as Ctrl-C does, and Ctrl-C outside the loop
    (loading, checking, evaluating) is one line with the way back where there is one. Yields a record on which
    the caller notes the settings and the plan once known."""
    files.one_line_warnings(say)
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    known = type("Known", (), {"cfg": None, "plan": {}})()
    try:
        with files.unbreakable_streams():  # `| head -1` or a closed stderr: the run goes on, unchanged
            try:
                yield known
            except KeyboardInterrupt:
                for seed in known.plan if known.cfg else ():
                    folder = run_folder(known.cfg, seed)
                    if (folder / "checkpoint.pt").is_file():
                        fail(f"interrupted; {folder} keeps its checkpoint, continue with: {resume_command(folder)}",
                             code=130)
                fail("interrupted", code=130)
    finally:
        signal.signal(signal.SIGTERM, previous)
