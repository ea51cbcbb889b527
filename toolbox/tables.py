"""The paper's table: its numbers from the finished runs' records (each column's mean and ± over the seeds,
CoCoOp's HM and Average row) and its markdown; where a sweep's table goes, the records it is made from (each
checked to belong to the same table), the runs still missing, and table.md / table.json written once and atomically.

Nothing here imports train.py or loads a model: `--table-only` prints a table again from the records alone. The HM
is train.py's `harmonic_mean`, passed in, so that results.json's and the table's are one formula."""

import fcntl
import json
import statistics
from pathlib import Path

import data
from toolbox import files, runs, settings


# ---------------------------------------------------------------------------------------------------- the numbers

TABLE_NOTE = ("HM: the harmonic mean of the mean base and mean new accuracies over the seeds (results.json keeps each "
              "seed's own HM); on the Average row, the HM of the base and new accuracies averaged over the datasets, "
              "as in CoCoOp's tables. ±: the population standard deviation over the seeds (np.std, as CoOp's "
              "parse_test_res.py computes it), not the sample std.")
STD_NOTE = ("± is the population std over seeds (np.std, as CoOp's parse_test_res.py), not the sample std; "
            "HM is the HM of the mean base and new")


def paper_table(records, harmonic_mean):
    """The paper's table from finished runs' records (results.json): one row per dataset, each column averaged over
    its seeds (± std with several seeds); base-to-new's HM (`harmonic_mean(base, new)`) is the HM of the mean base
    and mean new accuracies, as CoCoOp's tables report it. With several datasets, an Average row: each column's mean
    over the datasets, its HM the HM of the averaged base and new (CoCoOp's Average row). Returns (the table as
    JSON, its markdown)."""
    first = records[0]
    splits = [k for k in first["results"] if k != "hm"]
    by_dataset = {}
    for r in records:
        by_dataset.setdefault(r["data"], []).append(r)
    rows = []
    for name, rs in by_dataset.items():
        row = {"dataset": data.dataset_name(name), "seeds": [r["seed"] for r in rs]}
        for split in splits:
            values = [r["results"][split]["accuracy"] for r in rs]
            row[split] = {"mean": statistics.mean(values), "std": statistics.pstdev(values) if len(values) > 1 else None,
                          "values": values}
        rows.append(_derived_columns(row, splits, first["protocol"], harmonic_mean))
    table = {"protocol": first["protocol"], "shots": first["shots"], "method": first["method"], "splits": splits,
             "rows": rows, "average": None, "note": TABLE_NOTE}
    if len(rows) > 1:  # CoCoOp's Average row: the mean over the datasets of each dataset's mean
        average = {"dataset": "Average", "datasets": [row["dataset"] for row in rows]}
        for split in splits:
            average[split] = {"mean": statistics.mean(row[split]["mean"] for row in rows), "std": None}
        table["average"] = _derived_columns(average, splits, first["protocol"], harmonic_mean)
    return table, markdown(table)


def _derived_columns(row, splits, protocol, harmonic_mean):
    """Base-to-new's HM of the mean base and new; cross and dg's average over the targets (the source excluded)."""
    if protocol == "base2new":
        row["HM"] = harmonic_mean(row["base"]["mean"], row["new"]["mean"])
    if protocol in ("cross", "dg") and len(splits) > 2:
        row["average"] = statistics.mean(row[s]["mean"] for s in splits[1:])
    return row


def markdown(table):
    """The table in the paper's form: | dataset | method | base | new | HM |, a row per dataset, then Average."""
    derived = [c for c in ("HM", "average") if c in table["rows"][0]]
    columns = [*table["splits"], *derived]

    def cells(row):
        means = [f"{row[s]['mean']:.2f}" + (f" ± {row[s]['std']:.2f}" if row[s]["std"] is not None else "")
                 for s in table["splits"]]
        return " | ".join([*means, *(f"{row[c]:.2f}" for c in derived)])

    lines = ["| dataset | method | " + " | ".join(columns) + " |", "|---|---|" + "---|" * len(columns)]
    for row in table["rows"]:
        seeds = f"{len(row['seeds'])} seed{'s' if len(row['seeds']) > 1 else ''}"
        lines.append(f"| {row['dataset']} | {table['method']} ({seeds}) | {cells(row)} |")
    if table["average"]:
        lines.append(f"| **Average** | {table['method']} ({len(table['rows'])} datasets) | {cells(table['average'])} |")
    return "\n".join(lines) + "\n"


def summary_table(records, harmonic_mean):
    """One dataset's runs as the paper's table: one row, each column averaged over the seeds (± and HM as
    STD_NOTE says, under the table with several seeds)."""
    return paper_table(records, harmonic_mean)[1].rstrip("\n") + (f"\n{STD_NOTE}" if len(records) > 1 else "")


def table_with_note(records, harmonic_mean):
    """A sweep's table and, under it, how its HM and ± are computed."""
    table, text = paper_table(records, harmonic_mean)
    return table, f"{text}\n{TABLE_NOTE}\n"


# ---------------------------------------------------------------------------------------------------- the files

# settings that differ between the runs of one table by design, or that the records compare otherwise
_OWN = ("data", "seed", "data_sha256", "checkpoint_sha256")


def table_folder(cfg):
    """Where a sweep's table.md and table.json go: runs/table_<protocol>_<K>shot_<method>/ beside the default run
    folders (runs/table_<protocol>_zeroshot/ for --zero-shot); with --out, the deepest folder of its template that
    holds no {data} or {seed} (the folder that holds the sweep's run folders)."""
    if cfg.out:
        template = Path(cfg.out)
        fixed = [part for part in template.parents if "{" not in str(part)]
        return fixed[0] if "{" in template.name else template.parent
    if cfg.zero_shot:
        return Path("runs") / f"table_{cfg.protocol}_zeroshot"
    return Path("runs") / f"table_{cfg.protocol}_{cfg.shots}shot_{settings.method_tag(cfg)}"


def shared_settings(cfg, ignore=()):
    """The settings every run of one table must share: the method and data settings (toolbox/settings.py's roles),
    except each run's own dataset and seed; the base model is compared between the runs' records."""
    return {k: v for k, v in runs.result_settings(cfg, 0).items() if k not in _OWN and k not in ignore}


def check_folder(cfg, ignore=()):
    """A table folder that holds another sweep's table (other settings) is refused before any work: its table
    would be replaced."""
    path = table_folder(cfg) / "table.json"
    if not path.is_file():
        return
    try:
        recorded = json.loads(path.read_text()).get("settings", {})
    except (OSError, ValueError, AttributeError):
        runs.fail(f"{path} exists and is not a table.json written by train.py: move it, or choose another --out")
    expected = shared_settings(cfg, ignore)
    different = next((k for k in expected if recorded.get(k, "(not recorded)") != expected[k]), None)
    if different:
        runs.fail(f"{path} is the table of another sweep ({different} = {recorded.get(different, '(not recorded)')!r},"
                  f" this one has {expected[different]!r}): give each sweep its own folder, e.g. --out "
                  f"sweeps/<name>/{{data}}_seed{{seed}}")


def read_records(cfgs, splits, ignore=(), why="--table-only"):
    """Each finished run's results.json, in the sweep's order (dataset, then seed), a line for each run still
    missing, and the settings they share as recorded (with the base model). `cfgs`: {dataset: its runs' settings};
    `splits(cfg)`: the evaluation splits a record must hold. One line refuses the runs whose records differ from
    these settings (any method or data setting, except the dataset and the seed themselves) or were trained on
    another base model than the others."""
    records, missing, differ, base_models, shared = [], [], [], {}, None
    for name, cfg in cfgs.items():
        for seed in cfg.seeds:
            folder = runs.run_folder(cfg, seed)
            if not (folder / "results.json").is_file():
                missing.append(f"{folder} ({_why_missing(folder)})")
                continue
            config, record = (_read(folder / f, why) for f in ("config.json", "results.json"))
            expected = shared_settings(cfg, ignore)
            for key, value in expected.items():
                if config.get(key, "(not recorded)") != value:
                    differ.append(f"{folder} ({key} = {config.get(key, '(not recorded)')!r}, not {value!r})")
                    break
            else:
                if config.get("model_file") != runs.model_label(cfg):
                    differ.append(f"{folder} (base model {config.get('model_file')!r}, not {runs.model_label(cfg)!r})")
                elif (config.get("data"), config.get("seed")) != (name, seed) or record.get("data") != name \
                        or record.get("seed") != seed:
                    differ.append(f"{folder} (it records data = {record.get('data')!r}, seed = "
                                  f"{record.get('seed')!r})")
                elif not _holds(record, splits(cfg)):
                    differ.append(f"{folder} (its results.json lacks {', '.join(splits(cfg))}, or an accuracy "
                                  f"that is a percentage agreeing with its correct / n)")
                base_models.setdefault(config.get("checkpoint_sha256"), folder)
                records.append(record)
                shared = shared or {**{k: config.get(k) for k in shared_settings(cfg)},
                                    "model_file": config.get("model_file"),
                                    "checkpoint_sha256": config.get("checkpoint_sha256")}
    if differ:
        runs.fail(f"{why}: {len(differ)} run(s) differ from this command's settings: {'; '.join(differ)}")
    if len(base_models) > 1:
        (a, first), (b, second) = list(base_models.items())[:2]
        runs.fail(f"{why}: {first} and {second} were trained on different base models (SHA-256 {str(a)[:16]}..., "
                  f"{str(b)[:16]}...): one table holds one base model")
    if shared:  # what the table covers: another command's table in the same folder is never replaced unasked
        shared = {**shared, "datasets": [data.dataset_name(name) for name in cfgs],
                  "seeds": list(next(iter(cfgs.values())).seeds)}
    return records, missing, shared


def _holds(record, splits):
    results = record.get("results")
    return isinstance(results, dict) and all(isinstance(results.get(s), dict) and _accuracy(results[s]) for s in splits)


def _accuracy(split):
    """A split's accuracy is a number from 0 to 100 and agrees with its own count (correct / n), when it has one."""
    accuracy, correct, n = split.get("accuracy"), split.get("correct"), split.get("n")
    if type(accuracy) not in (int, float) or not 0 <= accuracy <= 100:  # NaN fails too
        return False
    if type(correct) is int and type(n) is int and n > 0:
        return abs(accuracy - 100 * correct / n) < 1e-6
    return True


def _why_missing(folder):
    if not folder.exists():
        return "not started"
    with runs.locked(folder, shared=True) as held:  # a look: it never keeps a process from the run
        if not held:
            return "running in another process"
        state = runs.run_state(folder)
    if state == "done":
        return "finished just now"
    if state == "checkpoint":
        return "stopped with a checkpoint: the sweep's command resumes it"
    return "stopped before its first checkpoint" if state == "partial" else "not started"


def _read(path, why):
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError) as e:
        runs.fail(f"{why}: cannot read {path}: {e}".splitlines()[0])
    if not isinstance(record, dict):
        runs.fail(f"{why}: {path} is not a record written by train.py")
    return record


def write(folder, table, text, shared, missing):
    """table.md (`text`) and table.json (`table`, with the settings its runs share (`shared`, as read_records
    returns them) and the runs still missing), written under the folder's .table.lock so that two processes that
    finish together write it once. Returns whether this call wrote them (False: they already held this table)."""
    folder = Path(folder)
    try:
        files.make_dirs(folder)
    except OSError as e:
        runs.fail(f"cannot write the table into {folder}: {e.strerror or e}")
    content = {**table, "settings": shared, "missing": missing}
    with open(folder / ".table.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # held for a moment: two writers of the same table take turns
        try:
            old = json.loads((folder / "table.json").read_text())
        except (OSError, ValueError):
            old = None
        same = old == json.loads(json.dumps(content))
        if isinstance(old, dict) and isinstance(old.get("settings"), dict) and not same:
            before = {k: old["settings"].get(k) for k in ("datasets", "seeds")}
            now = {k: shared.get(k) for k in ("datasets", "seeds")}
            if before != now and None not in before.values():
                runs.fail(f"{folder / 'table.json'} is the table of {before['datasets']} over seeds {before['seeds']}, "
                          f"this command's is of {now['datasets']} over seeds {now['seeds']}: give each table its "
                          f"own folder (--out with {{data}} and {{seed}}), or move the old one")
            if not old.get("missing") and missing:
                runs.fail(f"{folder / 'table.json'} holds a complete table; this one would miss "
                          f"{len(missing)} run(s): it is not replaced (move it to write the partial one)")
        if same and (folder / "table.md").is_file() and (folder / "table.md").read_text() == text:
            return False
        runs.write_file(folder / "table.md", lambda tmp: Path(tmp).write_text(text))
        runs.write_json(folder / "table.json", content)
    return True
