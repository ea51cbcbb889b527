"""A command's runs from start to end, around train.py's `run`: every run's data read and checked, then the base model
loaded and checked against the layout, the adapters file and each checkpoint to resume, then each seed's run and the
table; a sweep's runs shared by any number of processes (toolbox/sweeps.py); the Cutout grid instead of training.

train.py's `main` decides which of these a command is; nothing here imports train.py. What they call back in
train.py (`run`, the protocols' datasets, the trainables, the grad scaler...) comes in a `Reference`, which
train.py's `reference()` fills."""

import dataclasses
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import clip_min
import data
from toolbox import cli, distributed, figures, files, runs, settings, sweeps, tables


@dataclasses.dataclass(frozen=True)
class Reference:
    """train.py's settings and functions that the machinery calls (each is train.py's of the same name)."""
    settings: object  # SETTINGS, the declarations
    model_activation: Callable
    init_trainables: Callable
    cayley_transform: Callable
    class_prompts: Callable
    normalizer: Callable
    mean_std: Callable
    autocast: Callable
    grad_scaler: Callable
    classifier: Callable
    class_logits: Callable
    harmonic_mean: Callable
    protocol_datasets: Callable
    evaluation_splits: Callable
    run: Callable

    def table(self, records):
        """A sweep's table, with its note (toolbox/tables.py), its HM train.py's."""
        return tables.table_with_note(records, self.harmonic_mean)


def run_all(cfg, plan, adapters_file, ref):
    """One dataset's runs: the data, then the model, checked completely; then each seed's run and the table."""
    ready = prepare({cfg.data: cfg}, {cfg.data: plan}, adapters_file, ref)
    if cfg.cutout_grid:
        seed = cfg.seeds[0]
        if distributed.main_process():
            runs.write_file(Path(cfg.cutout_grid), lambda tmp: figures.cutout_grid(
                ready.model, ready.params, ready.datasets[cfg.data, seed][0], cfg, seed, ref).save(tmp, format="PNG"))
        runs.say(f"Cutout grid written to {cfg.cutout_grid}")
        return []
    all_results = [run_checked(ready, cfg.data, seed, plan[seed], adapters_file, ref) for seed in cfg.seeds]
    if distributed.main_process():
        print(tables.summary_table(all_results, ref.harmonic_mean))
    return all_results


def run_sweep(cfgs, known, ref):
    """Several runs (`cfgs`: {dataset: its runs' settings}, each over its seeds), which any number of processes
    started with the same command share (toolbox/sweeps.py): each takes the next run that no other holds or has
    finished; the process that finds them all finished writes the table (table.md, table.json)."""
    sweep = sweeps.Sweep(cfgs, ref.evaluation_splits, ref.table)
    plans = sweep.preview()  # every run folder checked before any data is read
    if sweep.finished(plans):  # nothing to train: the table from the records
        return sweep.finish()
    ready = prepare(sweep.cfgs, plans, None, ref)

    def run_one(name, seed, plan):  # called with the run's folder held
        cfg = ready.cfgs[name]
        known.cfg, known.plan = cfg, {seed: plan}
        runs.say(f"{name}, seed {seed}: {runs.run_folder(cfg, seed)}")
        runs.check_plan(cfg, {seed: plan}, {seed: ready.fingerprints[name, seed]}, {seed: ready.totals[name, seed]},
                        *ready.trainables, ref.grad_scaler(cfg.device, cfg.precision))
        run_checked(ready, name, seed, plan, None, ref)

    sweep.take_each(run_one)
    known.cfg = None
    return sweep.finish()


def table_only(cfgs, precision, ref):
    """--table-only: the table of the command's runs (`cfgs`: {dataset: its runs' settings}) again, from their
    records alone: no data, no model. `precision` as given: auto (or none) is the device's, not known here, so the
    records' is not compared."""
    ignore = () if precision not in (None, "auto") else ("precision",)
    sweep = sweeps.Sweep(cfgs, ref.evaluation_splits, ref.table, ignore)
    records, missing, shared = tables.read_records(cfgs, ref.evaluation_splits, ignore)
    if not records:
        runs.fail(f"--table-only: no finished run to tabulate (expected {missing[0].split(' (')[0]}/results.json)")
    for line in missing:
        runs.say(f"missing: {line}")
    return sweep.write(records, missing, shared)


def prepare(cfgs, plans, adapters_file, ref):
    """The data of every run, then the model, checked completely: `cfgs` {dataset: its runs' settings}, `plans`
    {dataset: {seed: (mode, payload)}}. Returns what the runs need (the settings now hold the model's checksum)."""
    cfg = next(iter(cfgs.values()))  # what every run shares
    cli.check_layout(cfg, ref.init_trainables)  # a named model's shapes: checked before any data is read or downloaded
    cli.check_root(cfg)
    clock = time.monotonic()
    datasets = {}
    with distributed.node_first():  # torchrun: each machine's first process reads (and downloads), then the others
        for name, c in cfgs.items():  # read and checked, completely, before the model is loaded or downloaded
            try:
                datasets.update({(name, seed): ref.protocol_datasets(c, seed) for seed in c.seeds})
            except (data.DataError, OSError) as e:
                problem = str(e) if isinstance(e, data.DataError) else f"cannot read the data: {e}"
                runs.fail(problem if len(cfgs) == 1 else f"--data {name}: {problem}")
        cli.check_prompts(cfg, datasets)
        if not (cfg.zero_shot or cfg.eval_only):
            for train_set, _ in datasets.values():  # under torchrun, every process needs an image of each step
                distributed.check_batch(cfg.batch_size, len(train_set.train))
        fingerprints = {key: runs.data_fingerprint(cfg, d) for key, d in datasets.items()}
    totals = {key: cfg.epochs * data.steps_per_epoch(len(d[0].train), cfg.batch_size) for key, d in datasets.items()}
    data_s = time.monotonic() - clock
    with distributed.node_first():
        cfgs, trainables, model = _load_model(cfgs, plans, fingerprints, totals, adapters_file, ref)
    model.requires_grad_(False)  # W0 is frozen: only the adapters (and CoOp's context) get gradients
    seconds = {"data": data_s, "model": time.monotonic() - clock - data_s}
    return SimpleNamespace(cfgs=cfgs, datasets=datasets, fingerprints=fingerprints, totals=totals,
                           trainables=trainables, model=model, params=dict(model.state_dict()), seconds=seconds)


def _load_model(cfgs, plans, fingerprints, totals, adapters_file, ref):
    """The base model, checked against the layout, the adapters file and each checkpoint to resume; the settings
    then record its checksum."""
    cfg = next(iter(cfgs.values()))
    try:
        path, model_sha256 = clip_min.checkpoint(cfg.weights or cfg.model, cfg.download_root)
        cfgs = {name: settings.replace(c, checkpoint_sha256=model_sha256) for name, c in cfgs.items()}
        cfg = next(iter(cfgs.values()))
        trainables = cli.check_layout(cfg, ref.init_trainables, path)
        if cfg.eval_only:
            cli.check_evaluation(cfg, adapters_file["settings"])
        for name, plan in plans.items():
            runs.check_plan(cfgs[name], plan, {seed: fingerprints[name, seed] for seed in plan},
                            {seed: totals[name, seed] for seed in plan}, *trainables,
                            ref.grad_scaler(cfg.device, cfg.precision))
        runs.say(f"loading {runs.model_label(cfg)} ({files.format_size(path.stat().st_size)})")
        model = clip_min.load(str(path), cfg.device, activation=cfg.activation)
    except (ValueError, RuntimeError, OSError) as e:  # bad file, failed download, unreadable path
        runs.fail(str(e).splitlines()[0] if str(e) else repr(e))
    return cfgs, trainables, model


def run_checked(ready, name, seed, plan, adapters_file, ref):
    """One run of `prepare`d data and model; a file that changed on disk since it was checked stops it with one
    line, and the command that continues it."""
    cfg = ready.cfgs[name]
    try:
        return ref.run(cfg, seed, plan, ready.datasets[name, seed], ready.model, ready.params, ready.seconds,
                       ready.fingerprints[name, seed], adapters_file)
    except data.DataError as e:
        folder = runs.run_folder(cfg, seed)
        if (folder / "checkpoint.pt").is_file():
            runs.say(f"the run can continue from its checkpoint once the data is back:\n  "
                     f"{runs.resume_command(folder)}")
        runs.fail(str(e))
