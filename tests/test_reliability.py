"""Issue 7 through the training CLI: faults lose nothing, bad input stops before any work, untrusted files run no code.

Covered elsewhere, not repeated here: download faults of `toolbox.downloads.download` (404, 500, dropped connection, wrong
checksum, full disk, rerun) in test_clip_min.py; malicious pickles and unknown TorchScript globals at the model
loader in test_checkpoints.py; dataset faults at the data layer in test_data.py; flag validation in test_train.py.
"""

import errno
import io
import json
import os
import pickle
import re
import shlex
import signal
import subprocess
import sys
import time
import zipfile

import pytest
import torch

import clip_min
import data
import orthcr
import train
from toolbox import files, runs
from conftest import ROOT
from conftest import sha256
from conftest import base_args, make_eurosat_like, make_imagenet_like, read_log, run_main, saved_adapters




def python(script, *argv, **kwargs):
    """A child interpreter running `script` with the repository importable."""
    return subprocess.Popen([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(ROOT)!r})\n{script}",
                             *map(str, argv)], cwd=ROOT, **kwargs)


# ----------------------------------------------------------------------------------------------------
# Checkpoints and results: a temporary name, then a rename

# the child writes half of the new file under the temporary name, says where, and hangs until killed
HALF_WRITTEN_SAVE = """
import io, pathlib, time, torch
from toolbox import runs

def half_then_hang(path, blob):
    with open(path, "wb") as f:
        f.write(blob[: len(blob) // 2])
        f.flush()
    print(path, flush=True)
    time.sleep(300)

if sys.argv[2] == "torch":
    def save(obj, f):  # train.py saves through an open file
        buf = io.BytesIO()
        real_save(obj, buf)
        half_then_hang(f.name, buf.getvalue())
    real_save, torch.save = torch.save, save
    runs.write_torch(sys.argv[1], {"step": 2, "adapters": {"w": torch.full((100_000,), 2.0)}})
else:
    pathlib.Path.write_text = lambda path, text: half_then_hang(path, text.encode())
    runs.write_json(sys.argv[1], {"step": 2, "results": list(range(100_000))})
"""


@pytest.mark.parametrize("kind", ["torch", "json"])
def test_a_save_killed_midway_leaves_the_previous_file(tmp_path, kind):
    path = tmp_path / ("checkpoint.pt" if kind == "torch" else "results.json")
    old = {"step": 1, "adapters": {"w": torch.full((10,), 1.0)}} if kind == "torch" else {"step": 1, "results": [1]}
    save, load = (runs.write_torch, lambda: torch.load(path, weights_only=True)) if kind == "torch" else \
        (runs.write_json, lambda: json.loads(path.read_text()))
    save(path, old)
    child = python(HALF_WRITTEN_SAVE, path, kind, stdout=subprocess.PIPE, text=True)
    try:
        tmp = tmp_path / child.stdout.readline().strip()
        assert tmp.parent == tmp_path and tmp.name.startswith(f".{path.name}.") and tmp.name.endswith(".tmp")
        assert tmp.stat().st_size > 0  # the new content is half on disk, under the temporary name only
    finally:
        child.kill()  # SIGKILL: no handler, no cleanup, as a power cut or the OOM killer
        child.wait()
    assert child.returncode == -signal.SIGKILL
    assert str(load()) == str(old)  # the previous file, whole
    assert tmp.exists()  # what the dead writer left is only a stray temporary file...
    save(path, {"step": 3})  # ...which does not stop the next save
    assert load()["step"] == 3


def test_a_failed_save_keeps_the_previous_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "checkpoint.pt"
    runs.write_torch(path, {"step": 1})
    with pytest.raises(Exception):
        runs.write_torch(path, {"step": 2, "not a tensor": lambda: 0})  # pickling fails halfway through the file
    assert torch.load(path, weights_only=True) == {"step": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]


# ----------------------------------------------------------------------------------------------------
# Ctrl-C for real: SIGINT to a training process, then the printed command

# train.py as __main__, except that the 3rd step waits until SIGINT has been handled (Interrupt restores Python's
# default handler when it runs): the signal lands mid-training whatever the machine's speed
PAUSE_IN_STEP_3 = """
import runpy, signal, time
import orthcr

real, calls, ready = orthcr.objective, [], sys.argv[1]

def objective(*args, **kwargs):
    calls.append(1)
    if len(calls) == 3:
        open(ready, "w").close()
        deadline = time.monotonic() + 120
        while signal.getsignal(signal.SIGINT) is not signal.default_int_handler and time.monotonic() < deadline:
            time.sleep(0.01)
    return real(*args, **kwargs)

orthcr.objective = objective
sys.argv = sys.argv[2:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])  # Ctrl-C, and what a job scheduler sends
def test_ctrl_c_saves_a_checkpoint_and_the_printed_command_resumes_to_the_same_adapters(root, weights, tmp_path, sig):
    flags = ("--epochs", 2, "--lr", 1e-2, "--eval-limit", 2)  # 2 steps per epoch: stopped mid-epoch 2
    full, out, ready = tmp_path / "full", tmp_path / "run with spaces", tmp_path / "in step 3"
    with open(tmp_path / "stderr", "w") as err:
        child = python(PAUSE_IN_STEP_3, ready, ROOT / "train.py", *base_args(root, weights, out, *flags), stderr=err)
        try:
            deadline = time.monotonic() + 300
            while not ready.exists() and child.poll() is None and time.monotonic() < deadline:
                time.sleep(0.02)
            assert child.poll() is None and len(read_log(out)) == 2
            child.send_signal(sig)
            assert child.wait(timeout=300) == 130
        finally:
            child.kill()
    stderr = (tmp_path / "stderr").read_text()
    assert f"checkpoint saved to {out / 'checkpoint.pt'} at step 3/4" in stderr
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 3
    assert not (out / "adapters.pt").exists() and not (out / "results.json").exists()
    lines = stderr.splitlines()
    command = shlex.split(lines[lines.index(next(x for x in lines if x.endswith("resume with:"))) + 1])
    assert command[:2] == [sys.executable, str(ROOT / "train.py")] and command[-1] == "--resume"
    resumed = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed from {out / 'checkpoint.pt'} at step 3/4" in resumed.stderr
    run_main(*base_args(root, weights, full, *flags))  # the same run, never interrupted
    assert [r["loss"] for r in read_log(out)] == [r["loss"] for r in read_log(full)]
    expected = saved_adapters(full)["adapters"]
    assert saved_adapters(out)["adapters"].keys() == expected.keys()
    for k, P in saved_adapters(out)["adapters"].items():
        assert torch.equal(P, expected[k]) and P.abs().max() > 0, k  # bit for bit, and trained


def test_ctrl_c_during_evaluation_is_one_line_with_the_way_back(root, weights, tmp_path, monkeypatch, capsys):
    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(train, "evaluate", interrupted)
    out = tmp_path / "run"
    argv = [str(a) for a in base_args(root, weights, out, "--epochs", 1)]
    monkeypatch.setattr(sys, "argv", ["train.py", *argv])
    with pytest.raises(SystemExit) as stop:
        run_main(*argv)
    assert stop.value.code == 130
    err = capsys.readouterr().err.strip().splitlines()[-1]
    prefix = f"error: interrupted; {out} keeps its checkpoint, continue with: "
    assert err.startswith(prefix)
    command = shlex.split(err[len(prefix):])
    assert train.parse_args(command[2:]).resume and command[command.index("--out") + 1] == str(out)
    assert (out / "checkpoint.pt").is_file() and not (out / "results.json").exists()


def test_ctrl_c_in_a_several_seed_run_prints_a_command_the_cli_accepts(root, weights, tmp_path, monkeypatch, capsys):
    class StopAtStep1(runs.Interrupt):  # as if Ctrl-C came during the first step
        requested = property(lambda self: True, lambda self, value: None)

    argv = ["--data", "eurosat", "--root", root, "--weights", weights, "--shots", 2, "--epochs", 1, "--seeds", 1, 2]
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(runs, "Interrupt", StopAtStep1)
    monkeypatch.setattr(sys, "argv", ["train.py", *map(str, argv)])
    with pytest.raises(SystemExit) as stop:
        run_main(*argv)
    assert stop.value.code == 130
    lines = capsys.readouterr().err.splitlines()
    command = shlex.split(lines[lines.index(next(x for x in lines if x.endswith("resume with:"))) + 1])
    args = train.parse_args(command[2:])  # exits 2 if the printed command is not a valid one
    assert args.resume and args.seeds == [1, 2] and "--overwrite" not in command


# ----------------------------------------------------------------------------------------------------
# A non-finite loss (or gradient) stops training, names the step, keeps the last good checkpoint


@pytest.mark.parametrize("fault", ["nan loss", "inf loss", "nan gradient, finite loss"])
def test_non_finite_training_stops_at_its_step_and_keeps_the_last_good_checkpoint(root, weights, tmp_path,
                                                                                   monkeypatch, capsys, fault):
    real, calls, before_step_3 = orthcr.objective, [], {}

    def objective(model, params, adapters, *args, **kwargs):
        calls.append(1)
        loss, terms = real(model, params, adapters, *args, **kwargs)
        if len(calls) < 3:
            return loss, terms
        before_step_3.update({k: P.detach().clone() for k, P in adapters.items()})
        if fault == "nan gradient, finite loss":  # adds exactly 0 to the loss; d sqrt|x| at 0 is NaN
            return loss + sum((P - P.detach()).abs().sqrt().sum() for P in adapters.values()), terms
        return loss * float(fault.split()[0]), terms

    monkeypatch.setattr(orthcr, "objective", objective)
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as stop:
        run_main(*base_args(root, weights, out, "--epochs", 2, "--lr", 1e-2, "--save-every", 1))
    assert stop.value.code not in (0, None)
    assert f"at step 3; the last good checkpoint is {out / 'checkpoint.pt'}" in capsys.readouterr().err
    checkpoint = torch.load(out / "checkpoint.pt", weights_only=True)
    assert checkpoint["step"] == 2 and [r["step"] for r in read_log(out)] == [1, 2]
    assert checkpoint["adapters"].keys() == before_step_3.keys()
    for k, P in checkpoint["adapters"].items():
        assert torch.isfinite(P).all() and torch.equal(P, before_step_3[k]) and P.abs().max() > 0, k
    assert not (out / "results.json").exists() and not (out / "adapters.pt").exists()


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf"), "inf and -inf"])
def test_the_finite_check_finds_one_bad_gradient_entry_among_millions(bad):
    grads = [torch.randn(4, 96, 96), torch.randn(4, 768, 768)]
    trainables = [torch.zeros(g.shape, requires_grad=True) for g in grads]
    for P, g in zip(trainables, grads):
        P.grad = g
    assert train.not_finite(torch.tensor(1.0), trainables) is None
    if bad == "inf and -inf":  # their sum is nan, not a finite number that would cancel out
        grads[1][3, 700, 5], grads[1][0, 1, 2] = float("inf"), float("-inf")
    else:
        grads[1][3, 700, 5] = bad
    assert train.not_finite(torch.tensor(1.0), trainables) == "gradient"
    assert train.not_finite(torch.tensor(float("nan")), trainables) == "loss (nan)"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_finite_check_reads_half_precision_gradients_by_their_entries(dtype):
    P = torch.zeros(4096, dtype=dtype, requires_grad=True)
    P.grad = torch.full((4096,), 60.0, dtype=dtype)  # finite, but a sum of 245760: inf in fp16
    assert train.not_finite(torch.tensor(1.0), [P]) is None
    P.grad[7] = float("inf")
    assert train.not_finite(torch.tensor(1.0), [P]) == "gradient"


def test_finite_check_with_no_trainables_is_a_finite_step():
    assert train.not_finite(torch.tensor(1.0), []) is None  # as before the one-pass check: all() of nothing
    assert train.not_finite(torch.tensor(float("inf")), []) == "loss (inf)"


# ----------------------------------------------------------------------------------------------------
# Untrusted files given to the CLI run nothing


class Payload:
    """Unpickling this runs `touch <marker>` through os.system."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def crafted(path, container, marker):
    """A `.pt` whose unpickling would run Payload: a plain pickle, torch.save's zip, or a TorchScript-style zip."""
    obj = {"adapters": {"visual.transformer.resblocks.0.mlp.c_fc.weight": Payload(marker)}}
    if container == "plain_pickle":
        path.write_bytes(pickle.dumps(obj, protocol=2))
    elif container == "torch_save":
        torch.save(obj, path)
    else:
        with zipfile.ZipFile(path, "w") as z:
            z.writestr("evil/data.pkl", pickle.dumps(obj, protocol=2))
            z.writestr("evil/version", "3\n")
            z.writestr("evil/constants.pkl", pickle.dumps((), protocol=2))  # what marks a TorchScript archive
            z.writestr("evil/code/__torch__.py", "")
    return path


def test_the_crafted_torch_save_file_is_live(tmp_path):
    """Loaded the unsafe way, the torch.save-made file does run its command: the refusals below are real."""
    path = crafted(tmp_path / "evil.pt", "torch_save", tmp_path / "ran")
    torch.load(path, weights_only=False)
    assert (tmp_path / "ran").exists()


@pytest.mark.parametrize("container", ["plain_pickle", "torch_save", "torchscript_archive"])
def test_crafted_weights_run_nothing_and_are_named(root, tmp_path, container):
    marker = tmp_path / "ran"
    evil = crafted(tmp_path / "evil.pt", container, marker)
    with pytest.raises(SystemExit) as stop:
        run_main(*base_args(root, evil, tmp_path / "run", "--zero-shot"))
    assert str(stop.value.code).startswith(f"error: {evil}")
    if container == "torchscript_archive":  # the restricted reader names the global it refused
        assert f"refusing global '{os.system.__module__}.system'" in str(stop.value.code)
    assert not marker.exists()


@pytest.mark.parametrize("container", ["plain_pickle", "torch_save"])
def test_crafted_adapters_run_nothing_and_are_named(root, weights, tmp_path, container):
    marker = tmp_path / "ran"
    evil = crafted(tmp_path / "evil.pt", container, marker)
    with pytest.raises(SystemExit) as stop:
        run_main(*base_args(root, weights, tmp_path / "run", "--eval-only", "--adapters", evil))
    refusal = {"plain_pickle": f"error: {evil}: not a torch.save zip archive",  # refused before it is unpickled
               "torch_save": f"error: {evil} is not a valid adapters file (loaded with weights_only"}
    assert str(stop.value.code).startswith(refusal[container])
    assert not marker.exists() and not (tmp_path / "run" / "results.json").exists()


# ----------------------------------------------------------------------------------------------------
# An adapters file that claims absurd sizes (issue 18): its records are checked against its own tensors and the
# settings' ranges before anything is built from them


def coop_adapters_file(path, context_rows=8, **records):
    """A well-formed tiny CoOp adapters file, then `records` written over its config and settings."""
    params = dict(clip_min.random_model("tiny", seed=0).state_dict())
    adapters = {k: P.detach() for k, P in orthcr.init_adapters(params).items()}
    config = {"model": "tiny", "targets": list(orthcr.DEFAULT_TARGETS), "blocks": 4, "towers": ["visual", "text"],
              "neumann": 0, "prompt": "coop", "n_ctx": context_rows, "ctx_init": None}
    config.update({k: v for k, v in records.items() if k != "adapters"})
    torch.save({"adapters": records.get("adapters", adapters), "context": torch.zeros(context_rows, 64),
                "config": config, "settings": {"data": "eurosat", "protocol": "base2new", "seed": 1}}, path)
    return path


@pytest.mark.parametrize("context_rows, records, match", [
    (1100, dict(n_ctx=10**8, targets=[], adapters={}), "its recorded n_ctx = 100000000 is not a valid setting (must "
                                                       "be <= 73"),  # the 280 KB file
    (1100, dict(n_ctx=8, targets=[], adapters={}), "its CoOp context has 1100 vectors, its recorded n_ctx = 8"),
    (8, dict(n_ctx=60), "its CoOp context has 8 vectors, its recorded n_ctx = 60"),
    (8, dict(ctx_init="a photo of a"), "its recorded ctx_init 'a photo of a' is 4 tokens, its CoOp context 8 vectors"),
    (8, dict(ctx_init="a " * 10**5), "(200,002 characters) is too many tokens"),
    (8, dict(blocks=10**6), "its recorded blocks = 1000000 is not a valid setting (must be <= 4,096"),
    (8, dict(blocks=2), "has 4 blocks, its recorded blocks = 2"),
    (8, dict(targets=["attn.out_proj"]), "is not on one of its recorded targets (attn.out_proj)"),
    (8, dict(towers=["text"]), "is not in one of its recorded towers (text)"),
    (8, dict(prompt="fixed"), "holds a CoOp context but records prompt = fixed"),
    (8, dict(blocks=4096, adapters={"visual.transformer.resblocks.0.mlp.c_fc.weight": torch.zeros(4096, 2, 2)}),
     "for 8,192 inputs: no CLIP layer has more than 4,096"),
    (8, dict(cutout_holes=100000), "its recorded cutout_holes = 100000 is not a valid setting (must be <= 64"),
])
def test_an_adapters_file_that_claims_absurd_sizes_is_refused_before_anything_is_built(
        root, weights, tmp_path, monkeypatch, context_rows, records, match):
    built = []
    for module, name in ((clip_min, "read_state_dict"), (clip_min, "tokenize"), (orthcr, "init_context"),
                         (data, "build_dataset")):
        monkeypatch.setattr(module, name, lambda *a, _name=name, **k: built.append(_name))
    path = coop_adapters_file(tmp_path / "adapters.pt", context_rows, **records)
    if context_rows == 1100:
        assert 270_000 < path.stat().st_size < 300_000  # the 280 KB file
    with pytest.raises(SystemExit) as stop:
        run_main("--root", root, "--weights", weights, "--eval-only", "--adapters", path, "--out", tmp_path / "e")
    message = str(stop.value.code)
    assert message.startswith(f"error: {path}") and "\n" not in message and match in message, message
    assert len(message) < 400 and not built and not (tmp_path / "e").exists()


def test_a_consistent_coop_adapters_file_is_evaluated(root, weights, tmp_path):
    path = coop_adapters_file(tmp_path / "adapters.pt", 8)
    results = run_main("--root", root, "--weights", weights, "--eval-only", "--adapters", path, "--eval-limit", 2,
                       "--out", tmp_path / "e")[0]["results"]
    assert results["base"]["n"] == 2  # the checks above refuse the claims, not the files train.py writes


# ----------------------------------------------------------------------------------------------------
# Adapters from another configuration: the first mismatching tensor is named

TINY = clip_min.CONFIGS["tiny"]


@pytest.mark.parametrize("config, targets, blocks, first", [
    (dict(TINY, vision_width=128), orthcr.DEFAULT_TARGETS, 4, "visual.transformer.resblocks.0.mlp.c_fc.weight"),
    (dict(TINY, vision_layers=3), orthcr.DEFAULT_TARGETS, 4, "visual.transformer.resblocks.2.mlp.c_fc.weight"),
    (dict(TINY, vision_layers=1), orthcr.DEFAULT_TARGETS, 4, "visual.transformer.resblocks.1.mlp.c_fc.weight"),
    (TINY, ("attn.out_proj", "mlp.c_fc"), 4, "visual.transformer.resblocks.0.attn.out_proj.weight"),
    (TINY, orthcr.DEFAULT_TARGETS, 2, "visual.transformer.resblocks.0.mlp.c_fc.weight"),
], ids=["wider model", "deeper model", "shallower model", "other targets", "other block count"])
def test_adapters_from_another_configuration_name_the_first_mismatching_tensor(root, weights, tmp_path, config,
                                                                                targets, blocks, first):
    params = dict(clip_min.random_model(config, seed=1).state_dict())
    adapters = {k: torch.randn(P.shape) * 0.01 for k, P in orthcr.init_adapters(params, targets, blocks).items()}
    path = tmp_path / "adapters.pt"
    layout = {"model": "other", "targets": list(targets), "blocks": blocks, "towers": ["visual", "text"], "neumann": 0}
    # a file that records another layout than the flags ask for is refused for the flag (test_runs.py); here the
    # tiny model's files record none, and a file made for another model fails whatever is asked
    torch.save({"adapters": adapters, **({"config": layout} if config is not TINY else {})}, path)
    layout = ("--targets", *orthcr.DEFAULT_TARGETS, "--blocks", 4)
    with pytest.raises(SystemExit) as stop:
        run_main(*base_args(root, weights, tmp_path / "run", "--eval-only", "--adapters", path, *layout))
    message = str(stop.value.code)
    assert message.startswith(f"error: {path} ")
    assert f"{first}'" in message or f"tensor {first}:" in message  # quoted by orthcr, bare in train.py
    assert not (tmp_path / "run" / "results.json").exists()


def test_adapters_with_other_block_count_evaluate_when_the_flags_say_so(root, weights, tmp_path):
    params = dict(clip_min.random_model("tiny", seed=0).state_dict())
    path = tmp_path / "adapters.pt"
    torch.save({"adapters": {k: P.detach() for k, P in orthcr.init_adapters(params, blocks=2).items()}}, path)
    results = run_main(*base_args(root, weights, tmp_path / "run", "--eval-only", "--adapters", path, "--blocks", 2,
                                  "--eval-limit", 2))[0]["results"]
    assert results["base"]["n"] == 2  # the refusal above is about the mismatch, not the block count


def test_eval_only_reads_the_layout_from_the_adapters_file(root, weights, tmp_path):
    params = dict(clip_min.random_model("tiny", seed=0).state_dict())
    targets = ["attn.out_proj", "mlp.c_fc"]
    adapters = {k: P.detach() for k, P in orthcr.init_adapters(params, targets, blocks=2, towers=["visual"]).items()}
    path = tmp_path / "adapters.pt"
    torch.save({"adapters": adapters, "config": {"targets": targets, "blocks": 2, "towers": ["visual"]}}, path)
    run_main(*base_args(root, weights, tmp_path / "run", "--eval-only", "--adapters", path, "--eval-limit", 2))
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert (config["targets"], config["blocks"], config["towers"]) == (targets, 2, ["visual"])
    # a method flag given on the command line must agree with the file: it would describe other adapters
    with pytest.raises(SystemExit, match="--blocks 4 contradicts .*trained with blocks = 2"):
        run_main(*base_args(root, weights, tmp_path / "run2", "--eval-only", "--adapters", path, "--blocks", 4))


# ----------------------------------------------------------------------------------------------------
# Dataset faults through the CLI: the path is named before the model is read or anything is trained


def truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize("fault", ["truncated JPEG", "image absent", "split not JSON", "empty class folder"])
def test_dataset_faults_name_the_path_before_the_model_is_read(tmp_path, monkeypatch, fault):
    data_root, data_name = tmp_path / "data", "eurosat"
    if fault == "empty class folder":
        make_imagenet_like(data_root, classes=3)
        bad, data_name = data_root / "imagenet" / "images" / "train" / "n00000001", "imagenet"
        for image in bad.iterdir():
            image.unlink()
    else:
        make_eurosat_like(data_root)
        bad = {"truncated JPEG": data_root / "eurosat" / "2750" / "Class0" / "Class0_0.jpg",  # in the 8-shot subset
               "image absent": data_root / "eurosat" / "2750" / "Class1" / "Class1_27.jpg",  # a test image
               "split not JSON": data_root / "eurosat" / "split_zhou_EuroSAT.json"}[fault]
        if fault == "image absent":
            bad.unlink()
        elif fault == "truncated JPEG":
            truncate(bad)
        else:
            bad.write_text('{"train": [')
    read = []
    monkeypatch.setattr(clip_min, "read_state_dict", lambda *a: read.append(a))
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as stop:
        run_main("--data", data_name, "--protocol", "fewshot", "--root", data_root, "--weights", __file__,
                 "--shots", 8, "--out", out)
    assert str(stop.value.code).startswith("error: ") and str(bad) in str(stop.value.code)
    assert not read and not out.exists()  # no model read, no run folder, no log.jsonl


# ----------------------------------------------------------------------------------------------------
# A model download that fails through the CLI: URL and cache path named, nothing cached, the rerun works


def test_model_download_fault_through_the_cli_then_rerun(root, server, tmp_path, monkeypatch):
    blob = tmp_path / "tiny.pt"
    torch.save(clip_min.random_model("tiny", seed=0).state_dict(), blob)
    digest = sha256(blob.read_bytes())
    url, cache = f"{server['url']}/clip/models/{digest}/ViT-B-16.pt", tmp_path / "cache"
    monkeypatch.setattr(clip_min, "MODELS", {"ViT-B/16": url})
    argv = ["--data", "eurosat", "--root", root, "--model", "ViT-B/16", "--download-root", cache, "--zero-shot",
            "--eval-limit", 2, "--out", tmp_path / "run"]
    with pytest.raises(SystemExit) as stop:  # not served yet: 404
        run_main(*argv)
    message = str(stop.value.code)
    assert message.startswith("error: ") and "404" in message and url in message and str(cache) in message
    assert not cache.exists() or list(cache.iterdir()) == []
    server["files"][url[len(server["url"]):]] = blob.read_bytes()
    results = run_main(*argv)[0]["results"]
    assert results["base"]["n"] == 2 and (cache / "ViT-B-16.pt").read_bytes() == blob.read_bytes()


# ----------------------------------------------------------------------------------------------------
# Output streams (issue 18): a reader that goes away, or a closed descriptor, changes nothing a run does or writes;
# the exit status stays the run's own (0 for a finished run), and what nobody reads is dropped without a traceback


@pytest.fixture(scope="module")
def reference(tmp_path_factory, weights):
    """A run with ordinary streams, to compare each run below with."""
    root = make_eurosat_like(tmp_path_factory.mktemp("streams") / "data")
    out = root.parent / "reference"
    run_main(*base_args(root, weights, out, "--epochs", 1, "--eval-limit", 4))
    return root, out


@pytest.mark.parametrize("streams", ["2>&1 | head -1", "stdout closed at once", "stderr closed after its first line",
                                     ">&- 2>&-"])
def test_a_closed_output_stream_changes_nothing_the_run_does_or_writes(reference, weights, tmp_path, streams):
    root, expected = reference
    out = tmp_path / "run"
    argv = [sys.executable, str(ROOT / "train.py"), *map(str, base_args(root, weights, out, "--epochs", 1,
                                                                         "--eval-limit", 4))]
    errors, printed = tmp_path / "stderr.txt", ""
    if streams == "2>&1 | head -1":
        child = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        assert child.stdout.readline()
        child.stdout.close()
    elif streams == "stdout closed at once":
        with open(errors, "w") as err:
            child = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=err, text=True)
        child.stdout.close()
    elif streams == "stderr closed after its first line":
        child = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert child.stderr.readline()
        child.stderr.close()
        printed = child.stdout.read()
    else:  # started without descriptors 1 and 2: the run's files must not take their numbers
        child = subprocess.Popen(["bash", "-c", 'exec "$@" >&- 2>&-', "bash", *argv])
    assert child.wait(timeout=600) == 0  # the run's own status: it finished
    if streams == "stdout closed at once":
        assert errors.read_text().splitlines()[-1] == f"results written to {out / 'results.json'}"
        assert not any(word in errors.read_text() for word in ("Traceback", "Exception ignored", "BrokenPipe"))
    if streams == "stderr closed after its first line":
        assert printed.splitlines()[0].startswith("| dataset | method |")  # stdout kept working
    # the same files as the reference run, complete, and nothing else
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in expected.iterdir())
    assert json.loads((out / "results.json").read_text())["results"] == \
        json.loads((expected / "results.json").read_text())["results"]
    assert [r["loss"] for r in read_log(out)] == [r["loss"] for r in read_log(expected)]
    trained, reference_adapters = saved_adapters(out), saved_adapters(expected)
    assert all(torch.equal(P, reference_adapters["adapters"][k]) for k, P in trained["adapters"].items())
    config = json.loads((out / "config.json").read_text())  # valid JSON: no stray output went into it
    assert config["epochs"] == 1


def test_unbreakable_streams_drop_what_a_gone_reader_misses_and_raise_other_faults(monkeypatch):
    class Gone(io.StringIO):
        def write(self, text):
            raise BrokenPipeError(errno.EPIPE, "Broken pipe")

    class Full(io.StringIO):
        def write(self, text):
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(sys, "stdout", Gone())
    monkeypatch.setattr(sys, "stderr", Full())
    with files.unbreakable_streams():
        print("the table")  # dropped: nobody reads it
        print("twice")
        with pytest.raises(OSError, match="No space"):  # a redirect to a full disk is still an error
            print("a line", file=sys.stderr)
    assert isinstance(sys.stdout, Gone) and isinstance(sys.stderr, Full)  # restored


# ----------------------------------------------------------------------------------------------------
# docs/reliability.md: what we promise, and how it is tested, with counts that pytest's collection recounts

RELIABILITY_DOC = ROOT / "docs" / "reliability.md"


def _cells(line):
    return [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]  # "\|" inside a cell is not a border


def selections(doc):
    """Each promise row of the table: (its line, its `file: word, word` selections)."""
    return [(line, [(f, [w.strip() for w in words.split(",")]) for f, words in re.findall(r"`([\w.]+\.py): ([^`]+)`",
                                                                                            _cells(line)[2])])
            for line in doc.splitlines() if line.startswith("| **") and len(_cells(line)) == 4
            and "`" in _cells(line)[2]]


def collected_tests(files):
    """pytest's own list of the tests in `files`, each test function once: which parametrized cases exist depends on
    the machine (a CUDA device's cases, the third-party archives and open_clip CI fetches), the functions do not."""
    done = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                           *[f"tests/{f}" for f in files]], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return list(dict.fromkeys(i.split("[")[0] for i in done.stdout.splitlines() if "::" in i))


def selected(tests, file, words):
    return [t for t in tests if t.startswith(f"tests/{file}::")
            and any(w in t.split("::", 1)[1].split("[")[0] for w in words)]


def reliability_doc(doc, tests):
    """docs/reliability.md with each promise's count recounted from `tests`, and the distinct total."""
    rows, everything = selections(doc), set()
    for line, chosen in rows:
        cases = {t for file, words in chosen for t in selected(tests, file, words)}
        everything |= cases
        doc = doc.replace(line, line[:line.rstrip().rstrip("|").rstrip().rindex("|")] + f"| {len(cases)} |")
    files = {file for _, chosen in rows for file, _ in chosen}
    total = len([t for t in tests if t.split("::")[0][len("tests/"):] in files])
    return re.sub(r"^(\| \*\*in all\*\* \|.*\| )\d+ of \d+ \|$", rf"\g<1>{len(everything)} of {total} |", doc,
                  flags=re.M)


def test_the_reliability_page_s_counts_are_pytest_s():
    doc = RELIABILITY_DOC.read_text()
    rows = selections(doc)
    assert len(rows) >= 8 and "[docs/reliability.md](docs/reliability.md)" in (ROOT / "README.md").read_text()
    tests = collected_tests(sorted({file for _, chosen in rows for file, _ in chosen}))
    for line, chosen in rows:  # every word selects a test: a renamed test cannot silently drop out of its promise
        for file, words in chosen:
            for word in words:
                assert selected(tests, file, [word]), f"{file}: {word!r} selects no test ({_cells(line)[0]})"
    assert doc == reliability_doc(doc, tests), "docs/reliability.md's counts are stale: run `make docs`"


def test_the_reliability_counts_count_what_they_say():
    doc = ("| **p** | how | `test_a.py: one, two` `test_b.py: three` | 7 |\n"
           "| **in all** | distinct | | 9 of 9 |\n")
    tests = ["tests/test_a.py::test_one", "tests/test_a.py::test_two[x]", "tests/test_a.py::test_two[y]",
             "tests/test_a.py::test_three", "tests/test_b.py::test_three_and_one", "tests/test_b.py::test_four"]
    assert reliability_doc(doc, tests) == ("| **p** | how | `test_a.py: one, two` `test_b.py: three` | 4 |\n"
                                           "| **in all** | distinct | | 4 of 6 |\n")


if __name__ == "__main__":  # `make docs`: recount docs/reliability.md
    text = RELIABILITY_DOC.read_text()
    RELIABILITY_DOC.write_text(reliability_doc(text, collected_tests(sorted({f for _, c in selections(text)
                                                                              for f, _ in c}))))
