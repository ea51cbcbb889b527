"""Issue 11 through the training CLI: a run folder is a trustworthy record, and every fault is one line, early.

Each refusal is checked for what the user meets: a non-zero exit without a traceback, the offending path or flag
named, and the earlier results byte-identical."""

import errno
import fcntl
import json
import os
import shutil
import subprocess
import shlex
import sys
import zipfile
from pathlib import Path

import pytest
import torch

import clip_min
from toolbox import files, runs, settings
import data
import train
from conftest import ROOT
from conftest import base_args, make_eurosat_like, make_imagenet_like, read_log, run_main




def snapshot(folder):
    """Every file under `folder` with its bytes: what must stay byte-identical after a refusal."""
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def refused(*argv, match=None):
    """Run the CLI expecting a one-line refusal; returns the message."""
    with pytest.raises(SystemExit) as stop:
        run_main(*argv)
    message = str(stop.value.code)
    assert message.startswith("error: ") and "\n" not in message, message
    if match:
        assert match in message, message
    return message


@pytest.fixture
def finished(root, weights, tmp_path):
    """A finished two-epoch run and its files."""
    out = tmp_path / "run"
    run_main(*base_args(root, weights, out, "--epochs", 2, "--lr", 1e-2))
    return out


# ----------------------------------------------------------------------------------------------------
# Run folders are exclusive and faithful


def test_a_folder_that_holds_a_run_is_refused_and_left_byte_identical(root, weights, finished, stopped):
    before = snapshot(finished)
    message = refused(*base_args(root, weights, finished, "--epochs", 3, "--lr", 2e-2))
    # a finished run cannot be resumed: the ways out are --overwrite and another --out
    assert str(finished) in message and "--overwrite" in message and "--resume" not in message
    assert snapshot(finished) == before
    before = snapshot(stopped)
    message = refused(*base_args(root, weights, stopped, "--epochs", 3, "--lr", 2e-2))
    assert "continue exactly that run with --resume" in message and "--overwrite" in message
    assert snapshot(stopped) == before


def test_overwrite_replaces_the_run_and_its_log(root, weights, finished):
    run_main(*base_args(root, weights, finished, "--epochs", 3, "--lr", 2e-2, "--overwrite"))
    config = json.loads((finished / "config.json").read_text())
    assert config["epochs"] == 3 and config["lr"] == 2e-2
    assert [r["step"] for r in read_log(finished)] == [1, 2, 3, 4, 5, 6]  # one run's steps, not two runs mixed


def test_a_folder_in_use_is_refused_and_a_crashed_run_does_not_keep_it(root, weights, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    with open(out / ".lock", "a") as held:  # another run holds the folder
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        refused(*base_args(root, weights, out, "--epochs", 1), match=f"{out} is in use by another run")
        # refused before the data is read: a second run spends nothing (this root holds no dataset)
        refused(*base_args(tmp_path / "no_data", weights, out, "--epochs", 1), match=f"{out} is in use")
    assert not (out / "config.json").exists()
    # a run killed while holding the lock: the kernel releases flock with the process
    child = subprocess.Popen([sys.executable, "-c", "import fcntl, sys, time; f = open(sys.argv[1], 'a'); "
                              "fcntl.flock(f, fcntl.LOCK_EX); print('locked', flush=True); time.sleep(300)",
                              str(out / ".lock")], stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "locked"
    child.kill()
    child.wait()
    assert run_main(*base_args(root, weights, out, "--epochs", 1))[0]["results"]["base"]["n"] == 12
    assert not (out / ".lock").exists()


def test_eval_only_writes_its_own_folder_and_records_what_it_evaluated(root, weights, tmp_path):
    trained = tmp_path / "four_shot"
    run_main(*base_args(root, weights, trained, "--epochs", 1, "--shots", 4, "--lr", 1e-2))
    before = snapshot(trained)
    record = run_main("--root", root, "--weights", weights, "--eval-only", "--adapters", trained / "adapters.pt")[0]
    assert {p: b for p, b in snapshot(trained).items() if p.parts[0] in runs.RUN_FILES} == before  # untouched
    folder = trained / "eval_eurosat_base2new_seed1"
    assert json.loads((folder / "results.json").read_text()) == record
    assert record["shots"] == 4 and json.loads((folder / "config.json").read_text())["shots"] == 4  # from the file
    evaluated = record["evaluated"]
    assert evaluated["adapters"] == str((trained / "adapters.pt").resolve())
    assert evaluated["adapters_sha256"] == files.file_sha256(trained / "adapters.pt")
    assert evaluated["training_settings"]["lr"] == 1e-2 and evaluated["training_settings"]["shots"] == 4
    assert record["results"] == json.loads((trained / "results.json").read_text())["results"]
    # a second evaluation into the same folder is refused like any other run
    refused("--root", root, "--weights", weights, "--eval-only", "--adapters", trained / "adapters.pt",
            match=str(folder))


def test_eval_only_labels_and_records_the_method_the_adapters_were_trained_with(root, weights, tmp_path):
    trained = tmp_path / "orthsr"
    run_main(*base_args(root, weights, trained, "--epochs", 1, "--cutout", "attentive", "--lambda1", 0.5))
    record = run_main("--root", root, "--weights", weights, "--eval-only", "--adapters", trained / "adapters.pt")[0]
    assert record["method"] == "OrthSR"  # not the defaults' "OrthCR"
    config = json.loads((trained / "eval_eurosat_base2new_seed1" / "config.json").read_text())
    assert (config["cutout"], config["lambda1"], config["epochs"]) == ("attentive", 0.5, 1)
    # a training flag with --eval-only would describe a training that never happened
    refused("--root", root, "--weights", weights, "--eval-only", "--adapters", trained / "adapters.pt", "--lr", 1,
            "--out", tmp_path / "e", match="--lr 1.0 contradicts")
    assert not (tmp_path / "e").exists()


def test_eval_only_records_the_bytes_it_evaluated_even_if_the_file_changes(root, weights, finished, tmp_path,
                                                                            monkeypatch):
    adapters = tmp_path / "adapters.pt"
    shutil.copy(finished / "adapters.pt", adapters)
    original = files.file_sha256(adapters)
    real = train.evaluate

    def evaluate_then_replace(*args):
        results = real(*args)
        adapters.write_bytes(b"another file now")  # replaced while this run evaluated the old one
        return results

    monkeypatch.setattr(train, "evaluate", evaluate_then_replace)
    record = run_main("--root", root, "--weights", weights, "--eval-only", "--adapters", adapters, "--out",
                      tmp_path / "e")[0]
    assert record["evaluated"]["adapters_sha256"] == original
    assert record["evaluated"]["training_settings"]["lr"] == json.loads((finished / "config.json").read_text())["lr"]


def test_the_recorded_model_is_the_weights_file(root, weights, finished):
    config = json.loads((finished / "config.json").read_text())
    assert config["model_file"] == str(weights.resolve()) and config["checkpoint_sha256"] == files.file_sha256(weights)
    assert torch.load(finished / "adapters.pt", weights_only=True)["config"]["model"] == str(weights.resolve())


# ----------------------------------------------------------------------------------------------------
# --resume continues exactly the run it names, or nothing


@pytest.fixture
def stopped(root, weights, tmp_path, monkeypatch):
    """A run stopped (as by Ctrl-C) at step 3 of 4, with its checkpoint."""
    out = tmp_path / "stopped"

    class StopAtStep3(runs.Interrupt):
        requested = property(lambda self: (out / "log.jsonl").exists() and len(read_log(out)) >= 3,
                             lambda self, value: None)

    monkeypatch.setattr(runs, "Interrupt", StopAtStep3)
    with pytest.raises(SystemExit):
        run_main(*base_args(root, weights, out, "--epochs", 2, "--lr", 1e-2))
    monkeypatch.undo()
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 3
    return out


def test_a_resumed_run_removes_what_a_killed_write_left_half_done(root, weights, stopped):
    stale = stopped / ".checkpoint.pt.0badc0de.tmp"  # files.write_atomic's temporary name, left by kill -9
    stale.write_bytes(b"half a checkpoint")
    unrelated = stopped / ".notes.tmp"  # not one of ours: kept
    unrelated.write_text("mine")
    run_main(*base_args(root, weights, stopped, "--epochs", 2, "--lr", 1e-2, "--resume"))
    assert not stale.exists() and unrelated.exists() and (stopped / "results.json").is_file()


@pytest.mark.parametrize("flags, difference", [
    (["--lr", "0.02"], "lr = 0.01"),
    (["--epochs", "3"], "epochs = 2"),
    (["--lambda1", "0"], "lambda1 = 1.5"),
    (["--blocks", "2"], "blocks = 4"),
    (["--cutout", "attentive"], "cutout = 'random'"),
    (["--protocol", "fewshot"], "protocol = 'base2new'"),
    (["--seeds", "2"], "seed = 1"),
    (["--shots", "4"], "shots = 8"),
])
def test_resume_refuses_other_settings_naming_the_first_difference(root, weights, stopped, flags,
                                                                    difference):
    before = snapshot(stopped)
    args = base_args(root, weights, stopped, "--epochs", 2, "--lr", 1e-2, "--resume")
    message = refused(*args, *flags, match=difference)
    assert str(stopped / "checkpoint.pt") in message and "this run has" in message
    assert snapshot(stopped) == before  # config.json and log.jsonl not rewritten


def test_resume_refuses_another_base_model(root, stopped, tmp_path):
    other = tmp_path / "other.pt"
    torch.save(clip_min.random_model("tiny", seed=7).state_dict(), other)
    before = snapshot(stopped)
    refused(*base_args(root, other, stopped, "--epochs", 2, "--lr", 1e-2, "--resume"), match="checkpoint_sha256")
    assert snapshot(stopped) == before


def test_resume_of_a_folder_without_checkpoint_is_an_error(root, weights, tmp_path):
    typo = tmp_path / "stoped"
    message = refused(*base_args(root, weights, typo, "--resume"), match="no checkpoint")
    assert str(typo) in message and not typo.exists()


def test_resume_of_a_finished_run_is_an_error(root, weights, finished):
    before = snapshot(finished)
    refused(*base_args(root, weights, finished, "--epochs", 2, "--lr", 1e-2, "--resume"), match="finished run")
    assert snapshot(finished) == before


def corrupt(path, change):
    state = torch.load(path, weights_only=True)
    change(state)
    torch.save(state, path)


def first_adapter(state):
    return next(iter(state["adapters"]))


def optimizer_moment(state):
    return state["optimizer"]["state"][0]


# each fault: how the checkpoint is damaged, and what the one-line refusal must say
CHECKPOINT_FAULTS = {
    "empty file": (lambda path: path.write_bytes(b""), "is empty (0 bytes)"),
    "not a checkpoint": (lambda path: path.write_bytes(b"\x80\x04 not a pickle"), "not a torch.save zip archive: not a checkpoint file written by train.py"),
    "missing key": (lambda s: s.pop("optimizer"), "'optimizer' is missing"),
    "step not an int": (lambda s: s.update(step="3"), "'step' is missing or not a int"),
    "step a bool": (lambda s: s.update(step=True), "'step' is missing or not a int"),
    "negative step": (lambda s: s.update(step=-4), "step -4 of 4"),
    "step past the end": (lambda s: s.update(step=9), "step 9 of 4"),
    "adapter of the wrong shape": (lambda s: s["adapters"].update({first_adapter(s): torch.zeros(1, 16)}),
                                   "this run expects (4, 16, 16)"),
    "integer adapter": (lambda s: s["adapters"].update({first_adapter(s): torch.zeros(4, 16, 16, dtype=torch.long)}),
                        "not floating point"),
    "non-finite adapter": (lambda s: s["adapters"][first_adapter(s)].view(-1).__setitem__(0, float("nan")),
                           "holds non-finite values"),
    "context that is not a tensor": (lambda s: s.update(context="abc"), "CoOp context str does not match"),
    "non-finite optimizer moment": (lambda s: optimizer_moment(s)["exp_avg"].view(-1).__setitem__(0, float("nan")),
                                    "moments of tensor 0 are missing, of the wrong shape or non-finite"),
    "optimizer moment of the wrong shape": (lambda s: optimizer_moment(s).update(exp_avg=torch.zeros(3)),
                                            "moments of tensor 0"),
    "optimizer moments missing": (lambda s: s["optimizer"].update(state={}), "moments of tensor 0"),
    "another optimizer": (lambda s: s.update(optimizer={"foo": 1}), "not AdamW's"),
    "scaler state of another precision": (lambda s: s.update(scaler={"scale": "x"}), "grad scaler's state"),
    "random state missing": (lambda s: s.update(rng={}), "torch random state is missing"),
    "random state cut short": (lambda s: s["rng"].update(torch=torch.zeros(3, dtype=torch.uint8)),
                               "torch random state"),
}


@pytest.mark.parametrize("fault", CHECKPOINT_FAULTS)
def test_bad_checkpoints_are_refused_before_anything_is_rewritten(root, weights, stopped, fault):
    damage, match = CHECKPOINT_FAULTS[fault]
    path = stopped / "checkpoint.pt"
    if fault in ("empty file", "not a checkpoint"):
        damage(path)
    else:
        corrupt(path, damage)
    before = snapshot(stopped)
    message = refused(*base_args(root, weights, stopped, "--epochs", 2, "--lr", 1e-2, "--resume"), match=match)
    assert str(path) in message
    assert snapshot(stopped) == before


def test_resume_refuses_other_data(root, weights, stopped, tmp_path):
    other = tmp_path / "other_data"
    shutil.copytree(root, other)
    split = other / "eurosat" / "split_zhou_EuroSAT.json"
    entries = json.loads(split.read_text())
    entries["test"] = entries["test"][:-1]  # one test image fewer: the same settings, other data
    split.write_text(json.dumps(entries))
    before = snapshot(stopped)
    args = base_args(other, weights, stopped, "--epochs", 2, "--lr", 1e-2, "--resume")
    refused(*args, match="data_sha256")
    assert snapshot(stopped) == before


def test_a_log_line_cut_short_by_a_crash_does_not_stop_the_resume(root, weights, stopped):
    with open(stopped / "log.jsonl", "a") as log:
        log.write('{"step": 4, "epo')  # a crash in the middle of writing step 4's line
    run_main(*base_args(root, weights, stopped, "--epochs", 2, "--lr", 1e-2, "--resume"))
    assert [r["step"] for r in read_log(stopped)] == [1, 2, 3, 4]


def test_non_finite_adapters_are_never_saved(root, weights, tmp_path):
    cfg = train.settings_from(train.parse_args(["--root", str(root), "--weights", str(weights)]))
    P = torch.full((2, 2), float("nan"))
    with pytest.raises(SystemExit) as stop:
        runs.save_checkpoint(tmp_path, cfg, 1, "x", 3, 4, {"w": P}, None,
                             {"adapters": torch.optim.AdamW([P]), "context": None},
                             torch.amp.GradScaler(enabled=False))
    assert stop.value.code == 3 and not (tmp_path / "checkpoint.pt").exists()


# ----------------------------------------------------------------------------------------------------
# Sweeps and --eval-only: nothing mixed, nothing relabeled


def test_a_resumed_sweep_refuses_another_base_model_and_a_finished_one_is_not_resumed(root, weights, tmp_path,  # noqa
                                                                                     monkeypatch):
    monkeypatch.chdir(tmp_path)
    sweep = ["--data", "eurosat", "--root", root, "--shots", 2, "--epochs", 1, "--batch-size", 4, "--eval-limit", 4]
    run_main(*sweep, "--weights", weights, "--seeds", 3)
    other = tmp_path / "other.pt"
    torch.save(clip_min.random_model("tiny", seed=5).state_dict(), other)
    finished = tmp_path / "runs" / "eurosat_base2new_2shot_orthcr_seed3"
    before = snapshot(finished)
    refused(*sweep, "--weights", other, "--seeds", 3, 7, "--resume", match="checkpoint_sha256")
    assert snapshot(finished) == before and not (tmp_path / "runs" / "eurosat_base2new_2shot_orthcr_seed7").exists()
    run_main(*sweep, "--weights", weights, "--seeds", 3, 7, "--resume")  # seed 3 kept, seed 7 run
    refused(*sweep, "--weights", weights, "--seeds", 3, 7, "--resume", match="nothing to resume")


def test_eval_only_refuses_what_would_mislabel_its_results(root, weights, tmp_path, finished):
    adapters = finished / "adapters.pt"
    before = snapshot(finished)
    refused("--root", root, "--weights", weights, "--eval-only", "--adapters", adapters, "--out", finished,
            "--overwrite", match="holds the adapters being evaluated")
    other = tmp_path / "other.pt"
    torch.save(clip_min.random_model("tiny", seed=5).state_dict(), other)
    refused("--root", root, "--weights", other, "--eval-only", "--adapters", adapters, "--out", tmp_path / "e1",
            match="were trained on a base model with SHA-256")
    fewshot = tmp_path / "fewshot"
    run_main(*base_args(root, weights, fewshot, "--protocol", "fewshot", "--epochs", 1))
    refused("--root", root, "--weights", weights, "--eval-only", "--adapters", fewshot / "adapters.pt",
            "--protocol", "base2new", "--out", tmp_path / "e3", match="trained on all classes of eurosat")
    assert snapshot(finished) == before and not any((tmp_path / f"e{i}").exists() for i in (1, 3))


def test_eval_only_refuses_a_training_checkpoint(root, weights, stopped, tmp_path):
    refused("--root", root, "--weights", weights, "--eval-only", "--adapters", stopped / "checkpoint.pt",
            "--out", tmp_path / "e", match="is a training checkpoint (step 3), not finished adapters")


def test_a_refused_overwrite_deletes_nothing(root, weights, finished, tmp_path):
    bad = tmp_path / "bad.pt"
    saved = torch.load(finished / "adapters.pt", weights_only=True)
    saved["adapters"][next(iter(saved["adapters"]))].view(-1)[0] = float("nan")
    torch.save(saved, bad)
    target = tmp_path / "target"
    run_main(*base_args(root, weights, target, "--epochs", 1))
    before = snapshot(target)
    refused("--root", root, "--weights", weights, "--eval-only", "--adapters", bad, "--out", target, "--overwrite",
            match="holds non-finite values")
    assert snapshot(target) == before


def test_a_full_disk_while_saving_names_the_file_keeps_the_previous_checkpoint_and_says_how_to_resume(
        root, weights, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    real, saves = files.write_atomic, []

    def write_atomic(path, write):
        if path.name == "checkpoint.pt":
            saves.append(path)
            if len(saves) == 2:
                raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, write)

    monkeypatch.setattr(files, "write_atomic", write_atomic)
    monkeypatch.setattr(sys, "argv", ["train.py", *map(str, base_args(root, weights, out, "--epochs", 2,
                                                                      "--lr", 1e-2))])
    message = refused(*base_args(root, weights, out, "--epochs", 2, "--lr", 1e-2),
                      match=f"cannot write {out / 'checkpoint.pt'}: no space left on device (ENOSPC)")
    assert "previous checkpoint.pt is kept" in message
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 2  # the epoch-1 checkpoint
    lines = capsys.readouterr().err.splitlines()  # the resume command, printed before the error
    assert lines[lines.index("free some space, then resume with:") + 1].strip().endswith("--resume")
    monkeypatch.undo()
    resumed = run_main(*base_args(root, weights, out, "--epochs", 2, "--lr", 1e-2, "--resume"))
    assert resumed[0]["results"]["base"]["n"] == 12


# ----------------------------------------------------------------------------------------------------
# Faults found before the model is loaded


@pytest.fixture
def no_model(monkeypatch):
    """Records every attempt to read a checkpoint's tensors."""
    read = []
    monkeypatch.setattr(clip_min, "read_state_dict", lambda *a, **k: read.append(a))
    return read


def test_out_that_is_a_file_or_under_a_file_or_read_only(root, weights, tmp_path, no_model):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    refused(*base_args(root, weights, a_file), match=f"--out {a_file}: {a_file} is a file")
    refused(*base_args(root, weights, a_file / "run"), match=f"{a_file} is a file")
    if os.geteuid() != 0:  # root writes anywhere
        read_only = tmp_path / "ro"
        read_only.mkdir(mode=0o555)
        refused(*base_args(root, weights, read_only / "run"), match="is not writable")
    assert not no_model


@pytest.mark.parametrize("flags, match", [
    (["--blocks", "5"], "not divisible by r = 5"),
    (["--targets", "attn.nope"], "'attn.nope' matches no 2-D weight"),
])
def test_a_layout_that_does_not_fit_the_model_is_refused_before_it_is_loaded(root, weights, tmp_path, no_model,  # noqa
                                                                            flags, match):
    refused(*base_args(root, weights, tmp_path / "run", *flags), match=match)
    assert not no_model and not (tmp_path / "run").exists()


@pytest.mark.parametrize("flags, match", [
    (["--blocks", "5"], "--blocks do not fit ViT-B/16: visual.transformer.resblocks.0.mlp.c_fc.weight: input dimension 768"),
    (["--model", "ViT-B/16", "--cutout-size", "300"], "larger than the model's 224 px images"),  # 336 px exist
])
def test_a_named_model_s_layout_is_checked_before_the_data_or_the_download(tmp_path, no_model, flags, match):
    refused("--root", tmp_path / "no_data", "--download-root", tmp_path / "models", "--out", tmp_path / "run", *flags,
            match=match)  # this root holds no dataset: the layout was checked first
    assert not no_model and not (tmp_path / "models").exists() and not (tmp_path / "run").exists()


def test_a_failed_evaluation_of_foreign_adapters_leaves_no_folder(root, weights, tmp_path):
    path = tmp_path / "adapters.pt"
    torch.save({"adapters": {"visual.transformer.resblocks.0.mlp.c_fc.weight": torch.zeros(2, 32, 32)}}, path)
    refused(*base_args(root, weights, tmp_path / "run", "--eval-only", "--adapters", path), match=str(path))
    assert not (tmp_path / "run").exists()


def test_a_compressed_adapters_file_is_refused_before_it_is_inflated(root, weights, tmp_path, finished):
    bomb = tmp_path / "bomb.pt"
    with zipfile.ZipFile(finished / "adapters.pt") as src, zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():  # the same records, deflated: torch.load would inflate them
            dst.writestr(info.filename, src.read(info))
    torch.load(bomb, weights_only=True)  # torch itself reads it
    message = refused("--root", root, "--weights", weights, "--eval-only", "--adapters", bomb, "--out", tmp_path / "e",
                      match=str(bomb))
    assert "is compressed" in message and "not an adapters file written by train.py" in message
    assert not (tmp_path / "e").exists()


def test_the_eta_does_not_wrap_at_24_hours():
    assert files.format_duration(25 * 3600 + 61) == "25:01:01"
    assert files.format_duration(59) == "0:00:59"


def test_the_cli_prints_one_line_and_no_traceback(root, weights, finished):
    done = subprocess.run([sys.executable, str(ROOT / "train.py"), *map(str, base_args(root, weights, finished))],
                          capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith(f"error: {finished} already holds a run")


def test_run_files_follow_the_users_umask(root, weights, tmp_path):
    previous = os.umask(0o022)
    try:
        run_main(*base_args(root, weights, tmp_path / "run", "--epochs", 1, "--export"))
    finally:
        os.umask(previous)
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "run").iterdir()}
    assert modes == {name: 0o644 for name in ("config.json", "log.jsonl", "adapters.pt", "merged.pt", "results.json")}


@pytest.mark.parametrize("kind", ["a file", "a symlink loop", "empty"])
def test_a_bad_data_root_is_one_line_before_anything_is_read(weights, tmp_path, monkeypatch, capsys, no_model,  # noqa
                                                            kind):
    bad = tmp_path / "data"
    if kind == "a file":
        bad.write_text("not a folder")
    elif kind == "a symlink loop":
        bad.symlink_to(bad)
    monkeypatch.setenv("ORTHCR_DATA", "" if kind == "empty" else str(bad))
    if kind == "empty":  # a flag problem: argparse's one line, exit 2
        with pytest.raises(SystemExit) as stop:
            run_main("--weights", weights, "--out", tmp_path / "run")
        assert stop.value.code == 2 and "--root (or $ORTHCR_DATA) is empty" in capsys.readouterr().err
    else:
        assert str(bad) in refused("--weights", weights, "--out", tmp_path / "run")
    assert not no_model and not (tmp_path / "run").exists()


def test_a_coop_context_too_long_for_clip_is_refused_before_the_model_is_loaded(root, weights, tmp_path,  # noqa
                                                                                 no_model):
    # 73 is the flag's bound (a one-token class name); this toy's names are two tokens
    refused(*base_args(root, weights, tmp_path / "run", "--prompt", "coop", "--n-ctx", settings.N_CTX_MAX),
            match=f"--n-ctx {settings.N_CTX_MAX}: a prompt of eurosat does not fit CLIP's context")
    assert not no_model and not (tmp_path / "run").exists()


@pytest.mark.parametrize("kind", ["a symlink loop", "a dangling symlink", "under a symlink loop"])
def test_out_through_a_broken_symlink_is_one_line_before_anything_is_read(root, weights, tmp_path, no_model, kind):  # noqa
    loop, dangling = tmp_path / "loop", tmp_path / "dangling"
    loop.symlink_to(loop)
    dangling.symlink_to(tmp_path / "nowhere")
    out = {"a symlink loop": loop, "a dangling symlink": dangling, "under a symlink loop": loop / "run"}[kind]
    refused(*base_args(root, weights, out), match="is a dangling symlink or a symlink loop")
    assert not no_model


@pytest.mark.parametrize("flags, match", [
    (["--lr", "1e300"], "--lr must be a positive number, at most 10"),
    (["--out", ""], "--out is empty"),
    (["--weights", "."], "--weights .: not a regular file"),
])
def test_impossible_values_are_flag_errors(root, weights, tmp_path, capsys, flags, match):
    with pytest.raises(SystemExit) as stop:
        run_main(*base_args(root, weights, tmp_path / "run"), *flags)
    assert stop.value.code == 2 and match in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_a_cutout_grid_never_replaces_a_file_unasked(root, weights, tmp_path, capsys):
    picture = tmp_path / "grid.png"
    picture.write_bytes(b"a result")
    with pytest.raises(SystemExit) as stop:
        run_main("--data", "eurosat", "--root", root, "--weights", weights, "--cutout-grid", picture)
    assert stop.value.code == 2 and "add --overwrite" in capsys.readouterr().err
    assert picture.read_bytes() == b"a result"
    with pytest.raises(SystemExit) as stop:  # --overwrite replaces a picture, never a run's file or a result
        run_main("--data", "eurosat", "--root", root, "--weights", weights, "--cutout-grid", picture, "--overwrite")
    assert stop.value.code == 2 and "is not a PNG" in capsys.readouterr().err
    assert picture.read_bytes() == b"a result"
    picture.write_bytes(b"\x89PNG\r\n\x1a\nan older grid")
    run_main("--data", "eurosat", "--root", root, "--weights", weights, "--cutout-grid", picture, "--overwrite")
    assert picture.read_bytes().startswith(b"\x89PNG") and len(picture.read_bytes()) > 100


def test_a_hole_larger_than_the_image_is_refused_before_the_model_is_loaded(root, weights, tmp_path, no_model):  # noqa
    refused(*base_args(root, weights, tmp_path / "run", "--cutout-size", 33), match="larger than the model's 32 px")
    assert not no_model


def test_non_finite_base_weights_name_the_tensor(root, tmp_path):
    state = clip_min.random_model("tiny").state_dict()
    state["visual.proj"][0, 0] = float("nan")
    path = tmp_path / "nan.pt"
    torch.save(state, path)
    refused(*base_args(root, path, tmp_path / "run"), match=f"{path}: tensor visual.proj holds non-finite values")
    assert not (tmp_path / "run").exists()


def test_data_that_vanishes_during_a_run_is_one_line_with_the_way_back(root, weights, tmp_path, monkeypatch,  # noqa
                                                                       capsys):
    def vanished(*args, **kwargs):
        raise data.DataError(f"image {root / 'eurosat' / '2750' / 'Class1' / 'gone.jpg'} does not exist")
        yield

    monkeypatch.setattr(data, "eval_batches", vanished)
    out = tmp_path / "run"
    refused(*base_args(root, weights, out, "--epochs", 1), match="gone.jpg does not exist")
    assert (out / "checkpoint.pt").is_file() and not (out / "results.json").exists()
    assert "once the data is back" in capsys.readouterr().err


def test_a_sweep_with_one_partial_seed_points_at_that_seed_only(root, weights, tmp_path):
    out = str(tmp_path / "sweep_seed{seed}")
    run_main(*base_args(root, weights, out, "--epochs", 1, "--seeds", 1))
    (tmp_path / "sweep_seed2").mkdir()
    (tmp_path / "sweep_seed2" / "config.json").write_text("{}")  # killed before its first checkpoint
    refused(*base_args(root, weights, out, "--epochs", 1, "--seeds", 1, 2, "--resume"),
            match="start it again with --seeds 2 --overwrite (that seed only)")
    message = refused(*base_args(root, weights, out, "--epochs", 1, "--seeds", 1))
    assert "it is finished: replace it with --overwrite" in message and "--resume" not in message


@pytest.mark.parametrize("damage, match", [
    (lambda r: r.update(results={"base": 5}), "results['base'] is not"),
    (lambda r: r.update(results={}), "results['base'] is not"),
    (lambda r: r["results"]["new"].update(accuracy="50"), "results['new'] is not"),
    (lambda r: r["results"]["base"].update(accuracy=float("nan")), "results['base'] is not"),
    (lambda r: r.update(data="dtd"), "records data = 'dtd', this run has 'eurosat'"),
    (lambda r: r.pop("protocol"), "records protocol = '(nothing)'"),
    (lambda r: r.update(seed=7), "records seed = 7, this run has 1"),
])
def test_a_damaged_finished_seed_is_refused_before_a_sweep_trains(root, weights, tmp_path, damage, match):
    out = str(tmp_path / "sweep_seed{seed}")
    run_main(*base_args(root, weights, out, "--epochs", 1, "--seeds", 1))
    path = tmp_path / "sweep_seed1" / "results.json"
    record = json.loads(path.read_text())
    damage(record)
    path.write_text(json.dumps(record))
    refused(*base_args(root, weights, out, "--epochs", 1, "--seeds", 1, 2, "--resume"), match=match)
    assert not (tmp_path / "sweep_seed2").exists()  # seed 2 was not trained


def test_eval_only_refuses_any_given_flag_that_contradicts_the_file(root, weights, finished, tmp_path):
    adapters = finished / "adapters.pt"  # trained with --shots 8 --epochs 2 --lr 1e-2, seed 1
    common = ("--root", root, "--weights", weights, "--eval-only", "--adapters", adapters, "--out", tmp_path / "e")
    refused(*common, "--epochs", 20, match="--epochs 20 contradicts")  # 20 is the default, but it was given
    refused(*common, "--shots", 2, match="--shots 2 contradicts")
    refused(*common, "--seeds", 3, match="--seeds 3 contradicts")
    refused(*common[:-2], "--seeds", 1, 2, match="evaluates one adapters file, trained with one seed")
    refused(*common, "--neumann", 3, match="--neumann 3 contradicts")
    assert run_main(*common, "--shots", 8, "--epochs", 2)[0]["shots"] == 8  # the same values: a repeated command


@pytest.mark.parametrize("flags", [["--zero-shot"], ["--epochs", 1]])
def test_an_interrupted_new_run_leaves_no_half_folder(root, weights, tmp_path, monkeypatch, flags):
    def interrupted(*args):
        raise KeyboardInterrupt

    # zero-shot: stopped while evaluating; training: stopped before its first checkpoint
    monkeypatch.setattr(train, "evaluate" if "--zero-shot" in flags else "train", interrupted)
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as stop:
        run_main(*base_args(root, weights, out, *flags))
    assert stop.value.code == 130 and not out.exists()  # no config.json alone that would block the next run
    monkeypatch.undo()
    run_main(*base_args(root, weights, out, *flags))


def test_overwrite_removes_the_evaluations_of_the_adapters_it_replaces(root, weights, finished):
    run_main("--root", root, "--weights", weights, "--eval-only", "--adapters", finished / "adapters.pt")
    assert (finished / "eval_eurosat_base2new_seed1" / "results.json").is_file()
    run_main(*base_args(root, weights, finished, "--epochs", 1, "--overwrite"))
    assert not (finished / "eval_eurosat_base2new_seed1").exists()


def test_a_cutout_grid_is_never_written_under_a_run_file_s_name(root, weights, stopped, capsys):
    with pytest.raises(SystemExit) as stop:
        run_main("--data", "eurosat", "--root", root, "--weights", weights, "--cutout-grid", stopped / "results.json")
    assert stop.value.code == 2 and "is a run file's name" in capsys.readouterr().err
    assert not (stopped / "results.json").exists()


def test_the_resume_command_works_from_any_folder(root, weights, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["train.py", "--root=data", "--seeds", "1", "2", "--weights", "w.pt"])
    command = shlex.split(runs.resume_command(Path("runs/eurosat_base2new_16shot_orthcr_seed2")))
    assert command[command.index("--root") + 1] == str(tmp_path / "data")  # --flag=value made absolute too
    assert command[command.index("--out") + 1] == str(tmp_path / "runs" / "eurosat_base2new_16shot_orthcr_seed{seed}")
    assert command[-3:] == ["--resume", "--out", command[-1]] and command[command.index("--weights") + 1] == str(
        tmp_path / "w.pt")


def test_coop_rows_name_the_terms_they_add():
    def label(*flags):
        cfg = train.settings_from(train.parse_args(["--targets", "none", "--prompt", "coop", "--device", "cpu", *flags]))
        return train.method_name(cfg), settings.method_tag(cfg)

    assert label("--lambda1", "0", "--cutout", "none") == ("CoOp", "coop")
    assert label("--lambda1", "0", "--lambda2", "0") == ("CoOp (+ CutOut)", "coop-cutout")  # no KL weight, no KL
    assert label() == ("CoOp (+ KL + CutOut)", "coop-kl+cutout")


# ----------------------------------------------------------------------------------------------------
# Records that say what ran (issue 18)


@pytest.mark.parametrize("where", ["imagenet/images/train/n00000000", "eurosat/2750/Class0", "eurosat",
                                   "imagenet-sketch/new", "the root", "above the root"])
def test_a_run_folder_and_the_data_never_hold_each_other(tmp_path, weights, no_model, where):
    root = make_imagenet_like(make_eurosat_like(tmp_path / "data", classes=2), classes=2, train_n=1, test_n=1)
    before = snapshot(root)
    out = {"the root": root, "above the root": tmp_path}.get(where, root / where)
    message = refused("--root", root, "--weights", weights, "--out", out, "--epochs", 1)
    assert ("is inside the folder of dataset" if "/" in where or where == "eurosat" else "holds the data root") \
        in message
    assert snapshot(root) == before and not no_model
    link = tmp_path / "elsewhere"  # the same folder under another name is the same folder
    link.symlink_to(root / "eurosat" / "2750")
    refused("--root", root, "--weights", weights, "--out", link / "run", match="inside the folder of dataset eurosat")


def test_zero_shot_refuses_every_setting_that_does_not_apply_naming_them(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        train.parse_args(["--root", str(tmp_path), "--zero-shot", "--lr", "5", "--epochs", "9", "--lambda1", "7"])
    err = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and len(err) == 1
    assert "trains nothing: --lambda1, --epochs, --lr do not apply" in err[0]
    # derived from the declarations: what only training reads, and the adapters' layout
    unused = set(train.SETTINGS.unused({"zero_shot": True}))
    assert unused == (set(train.SETTINGS.training_only()) | set(train.SETTINGS.layout_names())) - {"activation"}
    assert {"lr", "epochs", "lambda1", "blocks", "n_ctx"} <= unused and not unused & {"data", "eval_limit", "precision",
                                                                                    "activation"}
    assert train.SETTINGS.unused({"zero_shot": False}) == ()


def test_a_zero_shot_record_holds_only_the_settings_that_applied(root, weights, tmp_path):
    run_main(*base_args(root, weights, tmp_path / "zs", "--zero-shot", "--eval-limit", 2))
    config = json.loads((tmp_path / "zs" / "config.json").read_text())
    assert not set(config) & set(train.SETTINGS.unused({"zero_shot": True}))
    assert config["zero_shot"] is True and config["data"] == "eurosat" and config["eval_limit"] == 2
    assert config["method"] == "zero-shot CLIP" and config["precision"] == "fp32"
    run_main(*base_args(root, weights, tmp_path / "trained", "--epochs", 1, "--eval-limit", 2))
    trained = json.loads((tmp_path / "trained" / "config.json").read_text())
    assert {"lr", "epochs", "lambda1", "blocks"} <= set(trained)  # a training run records them all


@pytest.mark.parametrize("flags", [["--protocol", "cross", "--eval-data", "eurosat"],
                                   ["--protocol", "cross", "--eval-data", "eurosat", "--data", "eurosat"],
                                   ["--protocol", "cross"], ["--protocol", "dg"]])
def test_cross_and_dg_train_on_imagenet_whether_or_not_data_is_given(tmp_path, capsys, flags):
    with pytest.raises(SystemExit) as stop:
        train.parse_args(["--root", str(tmp_path), *flags])
    assert stop.value.code == 2 and "trains on imagenet" in capsys.readouterr().err
    train.parse_args(["--root", str(tmp_path), *flags, "--data", "imagenet"])  # the one they train on


def adapters_recording(source, path, **changes):
    """A copy of an adapters file whose records say `changes` (in "settings" and "config" where there)."""
    saved = torch.load(source, weights_only=True)
    for part in ("settings", "config"):
        saved[part].update({k: v for k, v in changes.items() if part == "settings" or k in saved[part]})
    torch.save(saved, path)
    return path


@pytest.mark.parametrize("changes, match", [
    (dict(protocol="cross"), "records data = eurosat, protocol = cross, which the command line refuses: --protocol "
                             "cross trains on imagenet"),
    (dict(protocol="dg"), "--protocol dg trains on imagenet"),
    (dict(data="imagenet_v2", protocol="fewshot"), "--data imagenet_v2 has no training split"),
    (dict(data="imagenet_sketch"), "--data imagenet_sketch has no training split"),
])
def test_eval_only_refuses_a_file_that_records_what_the_command_line_refuses(root, weights, finished, tmp_path,
                                                                              monkeypatch, changes, match):
    built = []
    monkeypatch.setattr(data, "build_dataset", lambda *a, **k: built.append(a))  # nothing is read or downloaded
    path = adapters_recording(finished / "adapters.pt", tmp_path / "odd.pt", **changes)
    refused("--root", root, "--weights", weights, "--eval-only", "--adapters", path, "--out", tmp_path / "e",
            match=match)
    assert not built and not (tmp_path / "e").exists()


def test_eval_only_refuses_flags_that_make_the_evaluation_a_combination_the_command_line_refuses(
        root, weights, finished, tmp_path, capsys):
    common = ("--root", root, "--weights", weights, "--eval-only", "--adapters", finished / "adapters.pt")
    refused(*common, "--protocol", "cross", "--out", tmp_path / "e", match="with the flags given is data = eurosat, "
            "protocol = cross, which the command line refuses")
    with pytest.raises(SystemExit) as stop:  # a given --data is checked with the flags
        run_main(*common, "--data", "imagenet_r", "--out", tmp_path / "e")
    assert stop.value.code == 2 and "imagenet_r has no training split" in capsys.readouterr().err
    assert not (tmp_path / "e").exists()


def test_eval_only_refuses_a_method_flag_that_contradicts_the_file(root, weights, finished, tmp_path):
    """Adapters trained from a random context of 3 vectors: --ctx-init 'a photo of' (3 tokens) would evaluate
    the same tensors and record a ctx_init they never had."""
    saved = torch.load(finished / "adapters.pt", weights_only=True)
    saved["context"] = torch.randn(3, 64, generator=torch.Generator().manual_seed(0)) * 0.02
    saved["config"].update(prompt="coop", n_ctx=3, ctx_init=None)
    saved["settings"].update(prompt="coop", n_ctx=3, ctx_init=None)
    torch.save(saved, tmp_path / "coop.pt")
    common = ("--root", root, "--weights", weights, "--eval-only", "--adapters", tmp_path / "coop.pt",
              "--eval-limit", 2)
    refused(*common, "--ctx-init", "a photo of", "--out", tmp_path / "e1",
            match="--ctx-init 'a photo of' contradicts")
    refused(*common, "--prompt", "fixed", "--out", tmp_path / "e2", match="--prompt fixed contradicts")
    refused(*common, "--targets", "none", "--out", tmp_path / "e3", match="--targets none contradicts")
    assert not any((tmp_path / f"e{i}").exists() for i in (1, 2, 3))
    run_main(*common, "--prompt", "coop", "--n-ctx", 3, "--out", tmp_path / "e4")  # what the file says: fine
    assert json.loads((tmp_path / "e4" / "config.json").read_text())["ctx_init"] is None


@pytest.mark.parametrize("kind", ["dangling symlink", "symlink to a file", "symlink to a folder", "fifo", "folder"])
def test_a_lock_that_is_not_a_regular_file_is_refused_and_never_followed(root, weights, tmp_path, no_model, kind):
    out, target = tmp_path / "run", tmp_path / "outside"
    out.mkdir()
    lock = out / ".lock"
    if kind == "dangling symlink":
        lock.symlink_to(target)
    elif kind == "symlink to a file":
        target.write_text("someone's file\n")
        lock.symlink_to(target)
    elif kind == "symlink to a folder":
        target.mkdir()
        lock.symlink_to(target)
    elif kind == "fifo":
        os.mkfifo(lock)
    else:
        lock.mkdir()
    message = refused(*base_args(root, weights, out, "--epochs", 1))
    assert f"{lock} is a symlink" in message if "symlink" in kind else f"{lock} is not a regular file" in message
    assert (not target.exists() if kind == "dangling symlink" else
            target.read_text() == "someone's file\n" if kind == "symlink to a file" else True)
    assert not (target.is_dir() and any(target.iterdir()))
    assert os.path.lexists(lock) and sorted(p.name for p in out.iterdir()) == [".lock"]  # nothing else written


def test_a_lock_that_is_a_hard_link_is_refused_and_the_linked_file_kept(root, weights, tmp_path, no_model):
    # a run writes its claim into .lock: through a second name of someone's file, that file would be overwritten
    out, theirs = tmp_path / "run", tmp_path / "someones_file.txt"
    out.mkdir()
    theirs.write_text("someone's results\n")
    os.link(theirs, out / ".lock")
    message = refused(*base_args(root, weights, out, "--epochs", 1))
    assert f"{out / '.lock'} is a hard link to another file" in message
    assert theirs.read_text() == "someone's results\n" and os.stat(theirs).st_nlink == 2
    assert sorted(p.name for p in out.iterdir()) == [".lock"] and not no_model  # nothing else written or read


def test_the_code_version_covers_the_toolbox_modules(tmp_path, monkeypatch):
    """config.json's code_version: the four modules and toolbox/*.py (data loading and splits change results too)."""
    for name in ("clip_min.py", "orthcr.py", "data.py", "train.py", "toolbox/files.py", "toolbox/splitfiles.py"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text(f"# {name}\n")
    monkeypatch.setattr(runs, "ROOT", tmp_path)
    versions = [runs.code_version()]
    (tmp_path / "toolbox/splitfiles.py").write_text("# another split\n")  # a toolbox module edited
    versions.append(runs.code_version())
    (tmp_path / "toolbox/images.py").write_text("")  # one added
    versions.append(runs.code_version())
    (tmp_path / "toolbox/notes.txt").write_text("not code")  # not a module: no change
    assert runs.code_version() == versions[-1] and len(set(versions)) == 3
    (tmp_path / "train.py").write_text("# edited\n")  # the four modules still count
    assert runs.code_version() not in versions
