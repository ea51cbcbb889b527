"""Sweeps that any number of processes share: the runs of one command (datasets x seeds), each taken by the first
process that finds it neither finished nor held, through the run folders' locks (toolbox/runs.py).

    CUDA_VISIBLE_DEVICES=0 python train.py --data all --seeds 1 2 3 &    # ... one per GPU, or a job array
    CUDA_VISIBLE_DEVICES=1 python train.py --data all --seeds 1 2 3 &

The rules (docs/runs.md, "Sweeps"): a run folder held by another process is skipped, not an error; a finished run
is kept, never trained again; a run that a stopped process left with a checkpoint (its lock released by the kernel)
is resumed from it by the next process that reaches it, when its recorded settings are this command's; one that
stopped before its first checkpoint starts again. A process that finds nothing left to take ends; the one that
finds every run finished writes the table, the others say which runs are still running and exit 0. Only commands
of the same settings share a sweep: a run folder that holds, or is held for, a run of other settings (its
config.json, or the claim its holder wrote into .lock) is refused in one line before any training.
"""

import json

from toolbox import runs, tables


class Sweep:
    """The runs of one command: `cfgs` {dataset: the settings of its runs (one dataset, every seed)}; `splits(cfg)`
    the evaluation splits a run's results hold; `table(records)` -> (table as JSON, its text) the paper's table."""

    def __init__(self, cfgs, splits, table, ignore=()):
        self.cfgs, self.splits, self.table, self.ignore = cfgs, splits, table, ignore
        self.runs = [(name, seed) for name, cfg in cfgs.items() for seed in cfg.seeds]
        self.cfg = next(iter(cfgs.values()))  # the settings the runs share
        self.folder = tables.table_folder(self.cfg)

    def __len__(self):
        return len(self.runs)

    def folder_of(self, name, seed):
        return runs.run_folder(self.cfgs[name], seed)

    # ------------------------------------------------------------------ before any data is read

    def preview(self):
        """Every run folder read and checked before the data and the model: {dataset: {seed: (mode, payload)}},
        mode "new", "resume" (payload: the checkpoint), "done" (payload: (config, results)), "restart" (stopped
        before its first checkpoint) or "busy" (held by another process, which checks it). A finished run or a
        checkpoint written with other settings is refused here, with one line."""
        tables.check_folder(self.cfg, self.ignore)
        plans = {name: {} for name in self.cfgs}
        for name, seed in self.runs:
            runs.check_writable(self.folder_of(name, seed))
        for name, seed in self.runs:
            plans[name][seed] = self._look(name, seed)
        modes = [mode for plan in plans.values() for mode, _ in plan.values()]
        if self.cfg.resume and all(mode == "done" for mode in modes):
            first = self.folder_of(*self.runs[0])
            runs.fail(f"--resume: {first} holds a finished run (results.json) and so does every run of the sweep; "
                      f"there is nothing to resume")
        if self.cfg.resume and not any(self.folder_of(*run).exists() for run in self.runs):
            first = self.folder_of(*self.runs[0])
            runs.fail(f"--resume: no checkpoint in {first} (expected {first / 'checkpoint.pt'}); check --out, or "
                      f"start a new run without --resume")
        return plans

    def finished(self, plans):
        return all(mode == "done" for plan in plans.values() for mode, _ in plan.values())

    def _look(self, name, seed):
        folder = self.folder_of(name, seed)
        if not folder.exists():
            return "new", None
        if (folder / "results.json").is_file():  # written last, atomically: the run is finished
            return self._plan(name, seed, "done", clear=False)
        with runs.locked(folder, shared=True) as held:  # a look: it never keeps a process from a run
            if not held:
                self._check_same(name, seed, "a run in progress in another process", runs.claimed_settings(folder))
                return "busy", None
            return self._plan(name, seed, runs.run_state(folder), clear=False)

    def _check_same(self, name, seed, what, recorded):
        """A run folder of this command that holds (or is held for) a run of other settings, `recorded`, is refused
        in one line naming it and each setting that differs: two commands of different settings on one --out would
        take each other's runs, and their table would mix them."""
        if recorded is None:
            return
        cfg, folder = self.cfgs[name], self.folder_of(name, seed)
        differ = runs.differences(recorded, cfg, seed, later=("checkpoint_sha256", "data_sha256"))
        if differ:  # (each one: the command may differ in several)
            listed = "; ".join(f"{key} = {runs.short(was)}, this command has {runs.short(now)}"
                               for key, was, now in differ[:4])
            more = f"; and {len(differ) - 4} more" if len(differ) > 4 else ""
            runs.fail(f"{folder} holds {what} with other settings ({listed}{more}): only commands of the same "
                      f"settings share a sweep's run folders; give this command another --out, or those settings")

    def _check_recorded(self, name, seed, what):
        """_check_same against the settings the run folder's config.json records."""
        self._check_same(name, seed, what, runs.read_record(self.folder_of(name, seed) / "config.json"))

    def _plan(self, name, seed, state, clear):
        """What to do with a held folder in `state`; `clear`: a run stopped before its first checkpoint is removed
        now (it is taken), else only checked."""
        cfg, folder = self.cfgs[name], self.folder_of(name, seed)
        if state == "done":
            self._check_recorded(name, seed, "a finished run")
            return "done", runs.read_finished_run(folder, cfg, seed, self.splits(cfg))
        if state == "checkpoint":
            self._check_recorded(name, seed, "a stopped run (its checkpoint)")
            return "resume", runs.load_checkpoint(folder / "checkpoint.pt", cfg, seed)
        if state == "partial":
            self._check_restart(name, seed)
            if clear:
                runs.clear(folder, evaluations=False)
                runs.say(f"{folder} stopped before its first checkpoint: starting it again")
                return "new", None
            return "restart", None
        return "new", None

    def _check_restart(self, name, seed):
        """A run that stopped before its first checkpoint starts again if its config.json is this command's."""
        cfg, folder = self.cfgs[name], self.folder_of(name, seed)
        try:
            config = json.loads((folder / "config.json").read_text())
            difference = runs.first_difference(config, cfg, seed, later=("checkpoint_sha256", "data_sha256")) \
                if isinstance(config, dict) else ("config.json", "not a record", "")
        except (OSError, ValueError, RecursionError):
            difference = ("config.json", "unreadable", "")
        if difference:
            key, was, now = difference
            only = f"--seeds {seed} --overwrite (that seed only)" if len(self.cfgs) == 1 else \
                f"--data {name} --seeds {seed} --overwrite (that run only)"
            reason = f" ({key} = {runs.short(was)}, this run has {runs.short(now)})" if now != "" else \
                f" (its {key} is {was})"
            runs.fail(f"{'--resume: ' if cfg.resume else ''}{folder} holds a run that stopped before its first "
                      f"checkpoint{reason}; start it again with {only}")

    # ------------------------------------------------------------------ the runs

    def take_each(self, run):
        """Take each run no other process holds or has finished, in the command's order, and `run(dataset, seed,
        plan)` it while its folder is held; again from the top until a pass finds nothing to take (a run that
        another process left with a checkpoint meanwhile). Returns how many runs this process trained."""
        trained = 0
        while True:
            taken = sum(self._take(name, seed, run) for name, seed in self.runs)
            trained += taken
            if not taken:
                return trained

    def _take(self, name, seed, run):
        folder = self.folder_of(name, seed)
        if (folder / "results.json").is_file():  # by this process, or by another since this one looked
            self._check_recorded(name, seed, "a finished run")
            return False
        with runs.locked(folder, claim=runs.result_settings(self.cfgs[name], seed)) as held:
            if not held:  # another process's since this one looked: of these settings too?
                self._check_same(name, seed, "a run in progress in another process", runs.claimed_settings(folder))
                return False
            state = runs.run_state(folder)
            if state == "done":  # finished by another process since
                self._check_recorded(name, seed, "a finished run")
                return False
            mode, payload = self._plan(name, seed, state, clear=True)
            with runs.running(folder, mode):
                run(name, seed, (mode, payload))
        return True

    # ------------------------------------------------------------------ the table

    def finish(self):
        """The table, written by the process that finds every run finished (and printed); the others say which
        runs are still running. Returns the finished runs' records."""
        records, missing, shared = tables.read_records(self.cfgs, self.splits, self.ignore, why="the sweep's table")
        if missing:
            runs.say(f"{len(missing)} of {len(self.runs)} runs are not finished: {'; '.join(missing)}. The process "
                     f"that finishes the last one writes {self.folder / 'table.md'}; a stopped run is resumed by "
                     f"the same command, run again")
            return records
        return self.write(records, missing, shared)

    def write(self, records, missing, shared):
        """table.md and table.json from `records` (`missing`, `shared`: as tables.read_records returns them),
        printed on stdout. Returns the records."""
        table, text = self.table(records)
        wrote = tables.write(self.folder, table, text, shared, missing)
        print(text, end="")
        where = f"{self.folder / 'table.md'} and table.json"
        runs.say(f"table written to {where}" if wrote else f"the table is written: {where}")
        return records
