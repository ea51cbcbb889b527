"""Issue 20, sections 2 and 3: the paper's table as one command, and sweeps that any number of processes share.

Two tiny datasets (a EuroSAT-like and an ImageNet-like one, tests/conftest.py) x two seeds, the tiny random CLIP,
two steps per run. The concurrent tests start real processes of train.py, each through a small wrapper that notes
every training it starts (the check that each run is trained exactly once) and, where asked, dies at a step."""

import fcntl
import json
import os
import shlex
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import train
from conftest import ROOT, make_eurosat_like, make_imagenet_like, run_main

DATASETS = ("eurosat", "imagenet")
RUNS = [(name, seed) for name in DATASETS for seed in (1, 2)]
TABLE = "runs/table_base2new_2shot_orthcr"

# train.py, with every call of train.train noted in trained.txt (and slowed a little, so that processes overlap);
# ORTHCR_TEST_KILL_AT=k: the process kills itself (SIGKILL, no clean-up) right after its first checkpoint at step k
WRAPPER = textwrap.dedent("""
    import os, signal, sys, time
    sys.path.insert(0, sys.argv.pop(1))
    import train
    from toolbox import runs
    real_train, real_save = train.train, runs.save_checkpoint

    def noted_train(model, params, train_set, cfg, seed, folder, resume=None, data_sha256=None):
        with open("trained.txt", "a") as f:
            f.write(f"{cfg.data} {seed} {'resume' if resume else 'new'} {os.getpid()}\\n")
        time.sleep(0.3)
        return real_train(model, params, train_set, cfg, seed, folder, resume, data_sha256)

    def save_then_die(folder, cfg, seed, data_sha256, step, *rest):
        real_save(folder, cfg, seed, data_sha256, step, *rest)
        if str(step) == os.environ.get("ORTHCR_TEST_KILL_AT"):
            os.kill(os.getpid(), signal.SIGKILL)

    train.train, runs.save_checkpoint = noted_train, save_then_die
    train.main()
""")


@pytest.fixture(scope="module")
def two_datasets(tmp_path_factory):
    return make_imagenet_like(make_eurosat_like(tmp_path_factory.mktemp("sweep") / "data"), train_n=4, test_n=2)


def sweep_args(root, weights, *extra):
    training = [] if "--zero-shot" in extra else ["--epochs", 2, "--batch-size", 4]  # zero-shot trains nothing
    return ["--data", *DATASETS, "--seeds", 1, 2, "--root", root, "--weights", weights, "--shots", 2, *training,
            "--eval-limit", 4, "--log-every", 100, "--device", "cpu", *extra]


def start(folder, argv, **env):
    """One process of the sweep, in `folder`, through the wrapper."""
    (folder / "wrapper.py").write_text(WRAPPER)
    return subprocess.Popen([sys.executable, "wrapper.py", str(ROOT), *map(str, argv)], cwd=folder, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, **env})


def finish(processes, timeout=240):
    out = []
    for p in processes:
        stdout, stderr = p.communicate(timeout=timeout)
        out.append((p.returncode, stdout, stderr))
    return out


def trainings(folder):
    path = folder / "trained.txt"
    return [line.split() for line in path.read_text().splitlines()] if path.is_file() else []


def table_json(folder):
    """table.json's table (what --table-only adds, the runs it found missing, aside)."""
    return {k: v for k, v in json.loads((folder / TABLE / "table.json").read_text()).items() if k != "missing"}


@pytest.fixture(scope="module")
def one_process(two_datasets, weights, tmp_path_factory):
    """The sweep run by one process: the reference every shared sweep must equal."""
    folder = tmp_path_factory.mktemp("one")
    [(code, stdout, stderr)] = finish([start(folder, sweep_args(two_datasets, weights))])
    assert code == 0, stderr
    return folder, stdout, stderr


# ----------------------------------------------------------------------------------------------------
# The table


def test_one_command_trains_each_run_and_writes_the_papers_table(one_process):
    folder, stdout, stderr = one_process
    assert sorted((name, int(seed)) for name, seed, *_ in trainings(folder)) == RUNS
    table = table_json(folder)
    records = [json.loads((folder / f"runs/{name}_base2new_2shot_orthcr_seed{seed}/results.json").read_text())
               for name, seed in RUNS]
    assert [row["dataset"] for row in table["rows"]] == list(DATASETS)
    assert table["settings"]["lr"] == 1e-4 and table["settings"]["precision"] == "fp32"
    for row in table["rows"]:
        mine = [r for r in records if r["data"] == row["dataset"]]
        for split in ("base", "new"):
            assert row[split]["values"] == [r["results"][split]["accuracy"] for r in mine]
        assert row["HM"] == train.harmonic_mean(row["base"]["mean"], row["new"]["mean"])
    base = sum(row["base"]["mean"] for row in table["rows"]) / 2
    new = sum(row["new"]["mean"] for row in table["rows"]) / 2
    # CoCoOp's Average row: the HM of the averaged base and new, not the average of the datasets' HMs
    assert table["average"]["base"]["mean"] == base and table["average"]["HM"] == train.harmonic_mean(base, new)
    text = (folder / TABLE / "table.md").read_text()
    assert stdout == text and text.splitlines()[0] == "| dataset | method | base | new | HM |"
    assert text.splitlines()[4].startswith("| **Average** | OrthCR (2 datasets) | ")
    assert "HM of the base and new accuracies averaged over the datasets" in text
    assert "table written to" in stderr


def test_a_finished_sweep_is_not_trained_again_and_table_only_reprints_it(one_process, two_datasets, weights,
                                                                           monkeypatch, capsys):
    folder, stdout, _ = one_process
    monkeypatch.chdir(folder)
    monkeypatch.setattr(train, "train", lambda *a, **k: pytest.fail("a finished run was trained again"))
    monkeypatch.setattr(train.clip_min, "load", lambda *a, **k: pytest.fail("a model was loaded"))
    records = run_main(*sweep_args(two_datasets, weights))
    assert [(r["data"], r["seed"]) for r in records] == RUNS and capsys.readouterr().out == stdout
    records = run_main(*sweep_args(two_datasets, weights, "--table-only"))
    assert len(records) == 4 and capsys.readouterr().out == stdout


def test_table_only_names_the_runs_whose_settings_differ_and_the_missing_ones(one_process, two_datasets, weights,
                                                                              monkeypatch, capsys):
    folder, _, _ = one_process
    monkeypatch.chdir(folder)
    with pytest.raises(SystemExit) as stop:
        run_main(*sweep_args(two_datasets, weights, "--table-only", "--lr", 3e-4))
    message = str(stop.value.code)
    assert "\n" not in message and "4 run(s) differ" in message and "lr = 0.0001, not 0.0003" in message
    assert "runs/imagenet_base2new_2shot_orthcr_seed2" in message
    argv = sweep_args(two_datasets, weights, "--table-only")
    argv[argv.index("--seeds") + 1:argv.index("--seeds") + 3] = [1, 2, 3]
    before = [(folder / TABLE / name).read_text() for name in ("table.md", "table.json")]
    with pytest.raises(SystemExit, match=r"is the table of .* over seeds \[1, 2\], this command's is of .* over seeds "
                                         r"\[1, 2, 3\]: give each table its own folder"):
        run_main(*argv)  # another command's table (the two-seed one) is never replaced unasked
    err = capsys.readouterr().err
    assert "missing: runs/eurosat_base2new_2shot_orthcr_seed3 (not started)" in err
    assert "missing: runs/imagenet_base2new_2shot_orthcr_seed3 (not started)" in err
    assert [(folder / TABLE / name).read_text() for name in ("table.md", "table.json")] == before
    with pytest.raises(SystemExit, match="no finished run to tabulate"):
        run_main(*sweep_args(two_datasets, weights, "--table-only", "--shots", 3))


def test_zero_shot_sweep_gives_clips_table(two_datasets, weights, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    records = run_main(*sweep_args(two_datasets, weights, "--zero-shot"))
    assert all(r["method"] == "zero-shot CLIP" for r in records) and len(records) == 4
    table = json.loads((tmp_path / "runs/table_base2new_zeroshot/table.json").read_text())
    assert table["method"] == "zero-shot CLIP" and table["average"] is not None
    assert capsys.readouterr().out.splitlines()[2].startswith("| eurosat | zero-shot CLIP (2 seeds) |")


# ----------------------------------------------------------------------------------------------------
# Shared sweeps


@pytest.mark.parametrize("n", [2, 3])
def test_concurrent_processes_train_each_run_once_and_write_the_same_table(one_process, two_datasets, weights,
                                                                           tmp_path, n):
    reference, _, _ = one_process
    results = finish([start(tmp_path, sweep_args(two_datasets, weights)) for _ in range(n)])
    for code, _, stderr in results:
        assert code == 0 and "error" not in stderr, stderr
    done = trainings(tmp_path)
    assert sorted((name, int(seed)) for name, seed, *_ in done) == RUNS  # each run trained exactly once
    assert all(mode == "new" for _, _, mode, _ in done)
    writers = [stderr for _, _, stderr in results if "table written to" in stderr]
    assert len(writers) == 1  # the process that finished the last run wrote the table
    for _, stdout, stderr in results:  # the others said who was still running, or that the table is written
        assert stdout or "are not finished" in stderr, stderr
    assert table_json(tmp_path) == table_json(reference)
    assert (tmp_path / TABLE / "table.md").read_text() == (reference / TABLE / "table.md").read_text()


def test_a_killed_processs_run_is_resumed_from_its_checkpoint_by_the_next(one_process, two_datasets, weights,
                                                                         tmp_path):
    reference, _, _ = one_process
    [(code, _, _)] = finish([start(tmp_path, sweep_args(two_datasets, weights), ORTHCR_TEST_KILL_AT="1")])
    assert code == -9  # killed right after its first checkpoint, its lock released by the kernel
    stopped = tmp_path / "runs/eurosat_base2new_2shot_orthcr_seed1"
    assert (stopped / "checkpoint.pt").is_file() and not (stopped / "results.json").exists()
    [(code, stdout, stderr)] = finish([start(tmp_path, sweep_args(two_datasets, weights))])
    assert code == 0, stderr
    assert f"resumed from {stopped.relative_to(tmp_path) / 'checkpoint.pt'} at step 1/2" in stderr
    assert [t[:3] for t in trainings(tmp_path)] == [["eurosat", "1", "new"], ["eurosat", "1", "resume"],
                                                    ["eurosat", "2", "new"], ["imagenet", "1", "new"],
                                                    ["imagenet", "2", "new"]]
    assert table_json(tmp_path) == table_json(reference)  # resumed bit for bit on the CPU


def test_a_run_held_by_another_process_is_skipped_and_the_last_finisher_writes_the_table(two_datasets, weights,
                                                                                        tmp_path, monkeypatch,
                                                                                        capsys):
    monkeypatch.chdir(tmp_path)
    held = tmp_path / "runs/imagenet_base2new_2shot_orthcr_seed2"
    held.mkdir(parents=True)
    with open(held / ".lock", "a") as lock:  # another process is training this run
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        records = run_main(*sweep_args(two_datasets, weights))
    assert [(r["data"], r["seed"]) for r in records] == RUNS[:3]
    captured = capsys.readouterr()
    assert captured.out == "" and f"1 of 4 runs are not finished: {held.relative_to(tmp_path)} (running in " \
        f"another process)" in captured.err
    assert not (tmp_path / TABLE / "table.md").exists()
    records = run_main(*sweep_args(two_datasets, weights))  # the holder is gone: this process takes the last run
    assert len(records) == 4 and (tmp_path / TABLE / "table.md").is_file()


def refusal(*argv):
    """The one-line refusal of a command that must stop before any training."""
    with pytest.raises(SystemExit) as stop:
        run_main(*argv)
    message = str(stop.value.code)
    assert message.startswith("error: ") and "\n" not in message, message
    return message


def test_a_finished_sweep_of_other_settings_is_refused_and_resume_is_not_what_helps(one_process, two_datasets,
                                                                                    weights, tmp_path, monkeypatch):
    """The runs of a sweep stopped before its table was written (its last run stopped, or still running), then a
    command with other settings on the same folders."""
    shutil.copytree(one_process[0] / "runs", tmp_path / "runs", ignore=shutil.ignore_patterns("table_*"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(train, "train", lambda *a, **k: pytest.fail("a run was trained"))
    monkeypatch.setattr(train.clip_min, "load", lambda *a, **k: pytest.fail("a model was loaded"))
    before = {p: p.read_bytes() for p in sorted(Path("runs").rglob("*")) if p.is_file()}
    message = refusal(*sweep_args(two_datasets, weights, "--lr", 3e-4, "--epochs", 3))
    assert "runs/eurosat_base2new_2shot_orthcr_seed1 holds a finished run with other settings (epochs = 2, this " \
           "command has 3; lr = 0.0001, this command has 0.0003)" in message
    assert "another --out, or those settings" in message and "--resume" not in message  # run one after the other
    assert {p: p.read_bytes() for p in sorted(Path("runs").rglob("*")) if p.is_file()} == before


@pytest.mark.parametrize("lr", [1e-3, 1e-4])
def test_a_run_held_for_other_settings_is_refused_before_any_training_and_one_of_the_same_is_shared(
        two_datasets, weights, tmp_path, monkeypatch, lr):
    monkeypatch.chdir(tmp_path)
    held = tmp_path / "runs/imagenet_base2new_2shot_orthcr_seed2"  # the last run of the sweep
    theirs = train.sweep_datasets(train.settings_from(train.parse_args(
        [str(a) for a in sweep_args(two_datasets, weights, "--lr", lr)])))["imagenet"]
    with train.runs.locked(held, claim=train.runs.result_settings(theirs, 2)) as taken:  # another process claims it
        assert taken and json.loads((held / ".lock").read_text())["lr"] == lr
        if lr != 1e-4:
            monkeypatch.setattr(train, "train", lambda *a, **k: pytest.fail("a run was trained"))
            message = refusal(*sweep_args(two_datasets, weights))
            assert f"{held.relative_to(tmp_path)} holds a run in progress in another process with other settings " \
                   f"(lr = 0.001, this command has 0.0001)" in message
            assert not (tmp_path / "runs/eurosat_base2new_2shot_orthcr_seed1").exists()
        else:  # the same settings: shared as before, the held run left to its holder
            records = run_main(*sweep_args(two_datasets, weights))
            assert [(r["data"], r["seed"]) for r in records] == RUNS[:3]


def test_a_claim_with_a_huge_value_is_refused_in_one_short_line(two_datasets, weights, tmp_path, monkeypatch):
    # a .lock's claim is any JSON its holder wrote: each value the refusal names is cut short
    monkeypatch.chdir(tmp_path)
    held = tmp_path / "runs/imagenet_base2new_2shot_orthcr_seed2"
    theirs = train.sweep_datasets(train.settings_from(train.parse_args(
        [str(a) for a in sweep_args(two_datasets, weights)])))["imagenet"]
    claim = {**train.runs.result_settings(theirs, 2), "lr": "x" * 100_000}
    with train.runs.locked(held, claim=claim) as taken:
        assert taken
        monkeypatch.setattr(train, "train", lambda *a, **k: pytest.fail("a run was trained"))
        message = refusal(*sweep_args(two_datasets, weights))
    assert f"{held.relative_to(tmp_path)} holds a run in progress in another process with other settings (lr = " \
           f"'xxxx" in message and "100,002 characters" in message and len(message) < 600, message[:600]


def test_concurrent_sweeps_of_different_settings_on_one_out_take_no_run_of_each_other(two_datasets, weights,
                                                                                       tmp_path):
    """Whichever process claims a run first trains the sweep; the other, whether it meets the claim when it looks
    or when it takes, stops before training anything, naming the run folder and the setting."""
    results = finish([start(tmp_path, sweep_args(two_datasets, weights, *lr)) for lr in ([], ["--lr", 3e-4])])
    refused = [(code, stderr) for code, _, stderr in results if code != 0]
    assert len(refused) == 1, results
    code, stderr = refused[0]
    line = stderr.strip().splitlines()[-1]
    assert code == 1 and line.startswith("error: runs/") and " with other settings (lr = " in line, stderr
    assert len({pid for *_, pid in trainings(tmp_path)}) == 1  # one process trained every run
    assert sorted((name, int(seed)) for name, seed, *_ in trainings(tmp_path)) == RUNS
    assert (tmp_path / TABLE / "table.md").is_file()


def test_a_run_stopped_before_its_first_checkpoint_starts_again(two_datasets, weights, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "runs/eurosat_base2new_2shot_orthcr_seed1"
    argv = sweep_args(two_datasets, weights, "--lr", 1e-3)
    run_main(*argv[:2], *argv[3:5], *argv[6:], "--out", folder)  # eurosat, seed 1 alone
    for name in ("results.json", "adapters.pt"):  # as a process killed before its first checkpoint leaves it
        (folder / name).unlink()
    with pytest.raises(SystemExit, match=r"lr = 0.001, this run has 0.0001\); start it again with --data eurosat "
                                         r"--seeds 1 --overwrite \(that run only\)"):
        run_main(*sweep_args(two_datasets, weights))  # not this command's run: refused before any training
    assert not (tmp_path / "runs/eurosat_base2new_2shot_orthcr_seed2").exists()
    assert len(run_main(*argv)) == 4  # this command's: started again
    assert [r["step"] for r in map(json.loads, (folder / "log.jsonl").read_text().splitlines())] == [1, 2]


@pytest.mark.parametrize("flags, message", [
    (["--data", "all", "eurosat"], "--data all stands for the 11 datasets"),
    (["--data", "dtd", "dtd"], "each dataset once"),
    (["--data", "dtd", "eurosat", "--out", "runs/x_seed{seed}"], "with several datasets put {data} in it"),
    (["--data", "all", "--protocol", "dg"], "--protocol dg trains on imagenet"),
    (["--data", "dtd", "eurosat", "--overwrite"], "--overwrite replaces one run"),
    (["--data", "dtd", "eurosat", "--cutout-grid", "g.png"], "--cutout-grid draws one batch on one dataset"),
    (["--table-only", "--resume"], "--table-only reads the finished runs' records"),
])
def test_sweep_flags_are_checked_before_anything(flags, message, capsys):
    with pytest.raises(SystemExit) as stop:
        train.parse_args([*flags, "--device", "cpu"])
    assert stop.value.code == 2 and message in capsys.readouterr().err


def test_data_all_is_cocoops_eleven_and_each_run_keeps_its_own_dataset():
    cfg = train.settings_from(train.parse_args(["--data", "all", "--device", "cpu", "--out", "s/{data}_{seed}"]))
    assert cfg.data == ("imagenet", "caltech101", "oxford_pets", "stanford_cars", "oxford_flowers", "food101",
                        "fgvc_aircraft", "sun397", "dtd", "eurosat", "ucf101")
    runs_of = train.sweep_datasets(cfg)
    assert list(runs_of) == list(cfg.data) and runs_of["dtd"].data == "dtd"
    assert str(train.runs.run_folder(runs_of["dtd"], 3)) == "s/dtd_3"
    assert train.settings_from(train.parse_args(["--data", "dtd", "--device", "cpu"])).data == "dtd"  # one: its name


def test_a_stopped_sweeps_resume_command_names_every_dataset_and_seed(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["train.py", "--data", "all", "--seeds", "1", "2", "--device", "cpu"])
    command = shlex.split(train.runs.resume_command(Path("runs/dtd_base2new_16shot_orthcr_seed2")))
    args = train.parse_args(command[2:])  # exits 2 if the printed command is not a valid one
    assert args.resume and args.data == ["all"] and args.seeds == [1, 2]
    assert args.out == str(Path.cwd() / "runs" / "{data}_base2new_16shot_orthcr_seed{seed}")
    cfg = train.sweep_datasets(train.settings_from(args))["dtd"]
    assert train.runs.run_folder(cfg, 2) == Path.cwd() / "runs/dtd_base2new_16shot_orthcr_seed2"


def test_every_datasets_data_is_checked_before_any_training(two_datasets, weights, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(train.clip_min, "load", lambda *a, **k: pytest.fail("the model was loaded"))
    argv = sweep_args(two_datasets, weights)
    argv[argv.index("imagenet")] = "dtd"  # not under --root
    with pytest.raises(SystemExit) as stop:
        run_main(*argv)
    assert str(stop.value.code).startswith("error: --data dtd: ") and "\n" not in str(stop.value.code)
    assert not (tmp_path / "runs").exists()  # eurosat, first in the sweep, was not trained
