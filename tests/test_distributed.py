"""Data parallelism under torchrun (toolbox/distributed.py, train.py's loop and evaluation): on the CPU with gloo.

Two processes train the adapters of one, up to floating-point reduction order; a run stopped on two processes
resumes on one; only rank 0 writes; a fault on any process stops every process with one line, without a hang.

TOLERANCE, measured: 2 processes against 1 on the tiny model (4 AdamW steps at lr 1e-2, global batch 7 split 3 + 4,
attentive Cutout drawn with a temperature, CoOp's context): all the trainables together differ by 5.7e-5 of their
norm; 99.9 % of the entries by less than 5.4e-6, the worst entry by 1.4e-4 (random Cutout at batch 8: 5e-6 of the
norm, worst entry 5e-6); the step losses by ~1e-7 relative; the accuracy counts not at all. Nothing random differs
(every draw is the image's); what differs is the order of floating-point sums: each process's forward on 3 or 4
images instead of 7 (the matrix products block differently) and the gradients summed as (rank 0) + (rank 1)
instead of over the 7 images at once, ~1e-7 relative on each gradient entry. AdamW then divides each entry by its
own sqrt(v) + 1e-8, so the few entries whose gradient is near that eps carry the error up to lr * dg / eps: those
are the worst entries. TOLERANCE is 1e-3 of the norm, and 1e-3 (a tenth of an AdamW step) on any entry; a mistake
in the weighting (the 3 and 4 images' losses each weighted 1/2 instead of 3/7 and 4/7) moves the trainables by 0.40
of their norm, 0.045 on the worst entry.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing

from conftest import ROOT, make_eurosat_like, run_main, saved_adapters

import data
import orthcr
from toolbox import distributed, runs

TOLERANCE = 1e-3  # 1 process against 2: the trainables' relative difference, and any entry's (the module's docstring)
TIMEOUT_S = 20  # --dist-timeout in these tests: a hang would end here, and the test's own bound is a few times it
FLAGS = ["--data", "eurosat", "--shots", 8, "--batch-size", 7, "--epochs", 2, "--lr", 1e-2, "--log-every", 100,
         "--cutout", "attentive", "--cutout-temperature", 1.0, "--prompt", "coop", "--dist-timeout", TIMEOUT_S]
# 2 base classes x 8 shots = 16 images: 2 steps of 7 per epoch, each split 3 + 4 over 2 processes


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """The data root and the tiny model's weights, shared by the module's runs."""
    folder = tmp_path_factory.mktemp("toy")
    weights = folder / "tiny.pt"
    torch.save(orthcr.clip_min.random_model("tiny", seed=0).state_dict(), weights)
    return make_eurosat_like(folder / "data"), weights


@pytest.fixture(scope="module")
def one_process(toy, tmp_path_factory):
    """The reference: the same run on one process."""
    root, weights = toy
    folder = tmp_path_factory.mktemp("one")
    out = folder / "run"
    [(code, stderr)] = launch(folder, [*FLAGS, "--root", root, "--weights", weights, "--out", out], size=1)
    assert code == 0, stderr
    return out


# ---------------------------------------------------------------------------------------------------- the pieces

def test_the_processes_slices_make_up_the_single_process_batches(tmp_path):
    make_eurosat_like(tmp_path)
    items = data.build_dataset("eurosat", tmp_path, shots=0).train  # 32 items
    whole = list(data.train_batches(items, 7, seed=3, epochs=2, n_px=8))
    for processes in (2, 3):
        shards = [list(data.train_batches(items, 7, seed=3, epochs=2, n_px=8, shard=(r, processes)))
                  for r in range(processes)]
        for step, (epoch, images, labels, positions) in enumerate(whole):
            parts = [shard[step] for shard in shards]
            assert all(part[0] == epoch for part in parts)
            assert torch.equal(torch.cat([p[1] for p in parts]), images)  # the same crops and flips
            assert torch.equal(torch.cat([p[2] for p in parts]), labels)
            assert torch.equal(torch.cat([p[3] for p in parts]), positions)
            assert positions.tolist() == list(range(step % 4 * 7, step % 4 * 7 + 7))  # 32 // 7 = 4 steps an epoch
            assert [len(p[2]) for p in parts] == ([3, 4] if processes == 2 else [2, 2, 3])


def test_evaluation_shards_take_whole_batches_in_turn(tmp_path):
    make_eurosat_like(tmp_path)
    items = data.build_dataset("eurosat", tmp_path, shots=0).test  # 24 items
    lists = [items[:10], items[10:]]
    whole = [(i, labels.tolist()) for i, _, labels in data.eval_batches(lists, 4, n_px=8)]
    shards = [[(i, labels.tolist()) for i, _, labels in data.eval_batches(lists, 4, n_px=8, shard=(r, 2))]
              for r in range(2)]
    assert shards[0] == whole[0::2] and shards[1] == whole[1::2]  # each image in the batch it has on one process


def test_each_images_cutout_is_its_own_whichever_batch_it_is_in():
    images = torch.rand(6, 3, 32, 32)
    similarity = torch.rand(6, 4, 4)
    generators = lambda: data.image_generators(5, 0, range(6), data.CUTOUT_STREAM)  # noqa: E731
    whole = orthcr.cutout(images, generators(), holes=2, size=8)
    halves = [orthcr.cutout(images[s], generators()[s], holes=2, size=8) for s in (slice(0, 2), slice(2, 6))]
    assert torch.equal(torch.cat(halves), whole)
    for temperature in (None, 0.5):
        whole = orthcr.attentive_cutout(images, similarity, 8, generators(), temperature)
        halves = [orthcr.attentive_cutout(images[s], similarity[s], 8, generators()[s], temperature)
                  for s in (slice(0, 3), slice(3, 6))]
        assert torch.equal(torch.cat(halves), whole)
    one = torch.Generator().manual_seed(5)  # one generator for the batch: the holes depend on the batch
    assert not torch.equal(orthcr.cutout(images[2:], one, 2, 8), orthcr.cutout(images, one, 2, 8)[2:])
    with pytest.raises(ValueError, match="one per image"):
        orthcr.cutout(images, generators()[:5])


def test_one_process_without_torchrun_starts_no_group(monkeypatch):
    for name in distributed.LAUNCH_ENV:
        monkeypatch.delenv(name, raising=False)
    assert (distributed.rank(), distributed.size(), distributed.launched()) == (0, 1, False)
    with distributed.session("cpu") as device:
        assert device == "cpu" and not distributed.active()
    with pytest.raises(SystemExit, match="over 3 processes"):
        monkeypatch.setenv("RANK", "0"), monkeypatch.setenv("WORLD_SIZE", "3"), monkeypatch.setenv("LOCAL_RANK", "0")
        distributed.check_batch(8, 2)


# ---------------------------------------------------------------------------------------------------- processes

def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _process(rank, size, port, cwd, argv, fault, log):
    """One of `size` processes, as torchrun starts it (its environment), running train.main; stderr to `log`.
    `fault`: what goes wrong on this process (a test's stand-in for a bad disk, a kill, a Ctrl-C)."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(size), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    # one thread per process, the reference's too: a shared machine's cores, and the same order of sums within each
    # process. (Set here, in the started process: changing the test process's own thread count mid-run left its
    # later LAPACK calls corrupt, torch.linalg.solve's pivots in test_orthcr.)
    torch.set_num_threads(1)
    err = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(err, 2)
    sys.stderr = os.fdopen(2, "w", buffering=1)
    os.chdir(cwd)
    import train  # noqa: F401 (after the environment is set)
    if fault == "bad image" and rank == 1:  # every image this process reads is unreadable, as on a bad disk
        def unreadable(path):
            raise data.DataError(f"image {path} is not an image (cannot identify image file)")
        data.load_image = unreadable
    after_step = runs.Bookkeeping.after_step

    def faulty(self, step, *rest):
        if step == 2 and fault == "killed" and rank == 1:
            os.kill(os.getpid(), signal.SIGKILL)
        if step == 2 and fault == "ctrl-c" and rank == 0:  # only this process sees it: the stop is agreed
            self.interrupt.requested = True
        return after_step(self, step, *rest)
    runs.Bookkeeping.after_step = faulty
    train.main([str(a) for a in argv])


def launch(tmp_path, argv, fault=None, size=2, bound_s=6 * TIMEOUT_S):
    """Run train.main on `size` processes (forked, each in its own working folder tmp_path/rank<r>); returns
    [(exit code, stderr)] in rank order. Fails the test if any process is still running after `bound_s`."""
    # spawn, not fork: a process forked from one whose BLAS threads have run may leave the parent's next LAPACK
    # calls corrupt (seen: torch.linalg.solve's pivots, in test_orthcr after these tests)
    context = torch.multiprocessing.get_context("spawn")
    port, processes, logs = _free_port(), [], []
    for rank in range(size):
        cwd, log = tmp_path / f"rank{rank}", tmp_path / f"rank{rank}.log"
        cwd.mkdir(exist_ok=True)
        p = context.Process(target=_process, args=(rank, size, port, cwd, argv, fault, log))
        p.start()
        processes.append(p)
        logs.append(log)
    deadline = time.monotonic() + bound_s
    for p in processes:
        p.join(max(0.1, deadline - time.monotonic()))
    hung = [r for r, p in enumerate(processes) if p.is_alive()]
    for p in processes:
        if p.is_alive():
            p.kill()
            p.join()
    assert not hung, f"processes {hung} still running after {bound_s} s"
    return [(p.exitcode, log.read_text()) for p, log in zip(processes, logs)]


def error_lines(stderr):
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def assert_close_adapters(a, b):
    """The trainables (adapters and CoOp context) of two adapters.pt: within TOLERANCE of their norm, and each
    entry within TOLERANCE."""
    assert a["adapters"].keys() == b["adapters"].keys()
    x, y = (torch.cat([*(P.flatten() for P in s["adapters"].values()), s["context"].flatten()]) for s in (a, b))
    assert (x - y).norm() <= TOLERANCE * x.norm()
    assert (x - y).abs().max() <= TOLERANCE


def test_two_processes_train_the_adapters_of_one_and_only_rank_0_writes(toy, one_process, tmp_path):
    root, weights = toy
    out = Path("run")  # relative: each process's own working folder, so that what rank 1 wrote would show
    results = launch(tmp_path, [*FLAGS, "--root", root, "--weights", weights, "--out", out])
    assert [code for code, _ in results] == [0, 0], results
    two = tmp_path / "rank0" / out
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one_process.iterdir())
    assert list((tmp_path / "rank1").iterdir()) == []  # no lock, no record, no log, no checkpoint
    assert_close_adapters(saved_adapters(two), saved_adapters(one_process))
    r1, r2 = (json.loads((folder / "results.json").read_text())["results"] for folder in (one_process, two))
    assert {s: r2[s]["correct"] for s in ("base", "new")} == {s: r1[s]["correct"] for s in ("base", "new")}
    assert r2["hm"] == r1["hm"]
    logs = [[json.loads(line) for line in (f / "log.jsonl").read_text().splitlines()] for f in (one_process, two)]
    assert [r["step"] for r in logs[1]] == [1, 2, 3, 4]
    for a, b in zip(*logs):  # the global batch's loss, logged by rank 0
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
    assert "loading" not in results[1][1]  # rank 1 says nothing unless it fails


def test_a_run_stopped_on_two_processes_resumes_on_one(toy, one_process, tmp_path):
    root, weights = toy
    out = tmp_path / "run"  # absolute: the processes share it, as under torchrun
    results = launch(tmp_path, [*FLAGS, "--root", root, "--weights", weights, "--out", out], fault="ctrl-c")
    assert [code for code, _ in results] == [130, 130], results  # rank 0 saw Ctrl-C, both stop after step 2
    assert [r["step"] for r in map(json.loads, (out / "log.jsonl").read_text().splitlines())] == [1, 2]
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 2
    assert "resume with" in results[0][1] and len(error_lines(results[1][1])) == 1
    run_main(*FLAGS, "--root", root, "--weights", weights, "--out", out, "--resume")
    assert_close_adapters(saved_adapters(out), saved_adapters(one_process))


@pytest.mark.parametrize("fault", ["bad image", "killed"])
def test_a_fault_on_one_process_stops_every_process_with_one_line(toy, tmp_path, fault):
    root, weights = toy
    out = tmp_path / "run"
    started = time.monotonic()
    results = launch(tmp_path, [*FLAGS, "--root", root, "--weights", weights, "--out", out], fault=fault)
    assert time.monotonic() - started < 6 * TIMEOUT_S  # launch's bound: no process waited for the timeout twice
    (code0, err0), (code1, err1) = results
    assert code0 != 0 and code1 != 0
    assert "Traceback" not in err0 and len(error_lines(err0)) == 1
    if fault == "bad image":  # rank 1 names the image; rank 0 names rank 1 and its reason
        assert "Traceback" not in err1 and len(error_lines(err1)) == 1 and "is not an image" in err1
        assert "process 1 of 2 stopped" in error_lines(err0)[0] and "is not an image" in err0
        assert not out.exists()  # a new run that failed before its first checkpoint leaves nothing
    else:
        assert code1 == -signal.SIGKILL
        assert "lost contact" in error_lines(err0)[0]


def test_torchrun_itself_runs_train_py_on_two_processes(toy, one_process, tmp_path):
    """The user's command: python -m torch.distributed.run --nproc_per_node 2 train.py ..."""
    root, weights = toy
    out = tmp_path / "run"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(_free_port()), str(ROOT / "train.py"), *map(str, FLAGS), "--root", str(root), "--weights",
               str(weights), "--out", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=6 * TIMEOUT_S,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count("| eurosat |") == 1  # the table, printed once (rank 0)
    assert_close_adapters(saved_adapters(out), saved_adapters(one_process))
