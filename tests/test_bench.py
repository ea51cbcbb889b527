"""bench.py on the tiny config: its --json line holds the figures the README quotes, and the --gpu-check dry run
exercises every part of the GPU check and ends with its JSON summary (no timings asserted)."""

import json
import statistics
import subprocess
import sys

from conftest import ROOT


def run_bench(*flags, exit_code=0, timeout=300):
    done = subprocess.run([sys.executable, str(ROOT / "bench.py"), *flags], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)
    assert done.returncode == exit_code, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_quick_bench_json_line_has_positive_figures():
    summary = run_bench("--quick", "--steps", "1", "--json", "--only", "matmul", "ours_step", "cutout", "eval")
    for key in ("step_s", "eval_img_s", "peak_rss_mb", "step_flops", "matmul_flops_per_s", "floor_s"):
        assert summary[key] > 0, key
    assert 0 < summary["cayley_merge_share"] < 1
    assert summary["ratios"]["step_vs_floor"] > 0 and summary["ratios"]["attentive_vs_random"] > 0
    # attentive Cutout costs the dense projection of the teacher's patch tokens on top of random Cutout's work
    assert 1 < summary["runs"]["cutout"]["attentive_vs_random_flops"] < 1.05
    assert summary["precision"] == "fp32" and summary["eval_dtype"] == "float32"  # the CPU path stays fp32
    assert summary["runs"]["ours_step"]["trainable"] == 69632  # 2 towers x 2 layers x (4 x 16^2 + 4 x 64^2)
    assert "peft_exact" not in summary["runs"]  # not asked for with --only


def test_gpu_check_dry_run_runs_every_part_and_ends_with_its_summary(tmp_path):
    out = tmp_path / "gpu-check.json"
    parts = ["tests", "precision", "headline"]  # the bench part is the workers the test above runs
    sample = ROOT / "sample" / "eurosat"  # shipped with the repository, so the headline part always has data
    summary = run_bench("--gpu-check", "--device", "cpu", "--parts", *parts, "--out", str(out),
                        "--data-root", str(sample))
    assert json.loads(out.read_text()) == summary
    log = out.with_suffix(".txt").read_text().splitlines()  # the log a reader commits: the command, each part, the JSON
    assert "--gpu-check" in log[0] and json.loads(log[-1]) == summary
    assert all(any(line.startswith(f"== gpu-check: {part}") for line in log) for part in parts)
    assert summary["dry_run"] and summary["config"] == "tiny"
    assert summary["tests"]["ok"] and summary["tests"]["passed"] > 0 and summary["tests"]["failed"] == 0

    p = summary["precision"]
    assert p["ok"] and set(p["steps"]) == {"fp32", "bf16", "fp16"}
    for size, measured in p["rotations"].items():  # the adapters are scaled to the asked max |R - I|
        assert abs(measured / float(size) - 1) < 0.01
    for q in ("bf16", "fp16"):
        assert p["grad"][q]["finite"] and -1 <= p["grad"][q]["cosine"] <= 1
    # fp16 has 3 more mantissa bits than bf16: it keeps more of the student-teacher difference, and both keep
    # more of a larger rotation
    for size in p["rotations"]:
        assert p["difference"]["fp16"][size]["rel_err"] < p["difference"]["bf16"][size]["rel_err"]
    for q in ("bf16", "fp16"):
        errs = [p["difference"][q][size]["rel_err"] for size in sorted(p["rotations"], key=float)]
        assert errs == sorted(errs, reverse=True)

    h = summary["headline"]
    assert summary["ok"] and h["ok"]
    # 16 shots x 5 base classes = 80 images in batches of 32, the last partial batch dropped as Dassl does: 2 steps
    # in the dry run's 1 epoch; --eval-limit 20 on each of base and new: 40 test images
    assert h["steps"] == 2 and h["test_images"] == 40
    assert h["wall_s"] > 0 and (h["seconds"] is None or set(h["seconds"]) >= {"train", "eval"})


def test_gpu_check_without_a_sample_reports_it_in_the_headline_part(tmp_path):
    out = tmp_path / "gpu-check.json"
    summary = run_bench("--gpu-check", "--device", "cpu", "--parts", "headline", "--out", str(out),
                        "--data-root", str(tmp_path / "nowhere"), exit_code=1)
    assert not summary["ok"] and not summary["headline"]["ok"] and "EuroSAT" in summary["headline"]["error"]


def test_alternating_rounds_time_each_contestant_once_per_round():
    # --rounds: ours (and the PEFT peers where installed) step by step in their own serving processes
    summary = run_bench("--quick", "--rounds", "2", "--json", "--only", "ours_step", "peft_exact")
    ours = summary["runs"]["ours_step"]
    assert summary["rounds"] == 2 and len(ours["step_times"]) == 2 and ours["peak_rss_mb"] > 0
    assert ours["trainable"] == 69632 and ours["step_flops"] > 0
    peer = summary["runs"]["peft_exact"]
    if "skipped" not in peer:  # the ratio is the median of the per-round ratios, not a ratio of medians
        assert len(peer["ours_per_round"]) == 2
        per_round = [a / b for a, b in zip(ours["step_times"], peer["step_times"])]
        assert peer["ours_per_round"] == per_round
        assert summary["ratios"]["step_vs_peft_exact"] == statistics.median(per_round)


def test_ours_runs_with_huge_pages_as_train_does_and_the_peers_with_the_given_environment(monkeypatch):
    sys.path.insert(0, str(ROOT))
    import bench
    from toolbox import allocator

    monkeypatch.delenv(allocator.HUGE_PAGES, raising=False)
    args = type("Args", (), {"allocator": "huge-pages"})()
    assert bench.worker_env("ours_step", args)[allocator.HUGE_PAGES] == "1"
    assert bench.worker_env("eval", args)[allocator.HUGE_PAGES] == "1"
    assert allocator.HUGE_PAGES not in bench.worker_env("peft_exact", args)  # as a PEFT user runs it
    args.allocator = "default"
    assert bench.worker_env("ours_step", args)[allocator.HUGE_PAGES] == "0"
    monkeypatch.setenv(allocator.HUGE_PAGES, "1")  # THP_MEM_ALLOC_ENABLE=1 python bench.py: every worker has it
    assert bench.worker_env("peft_exact", args)[allocator.HUGE_PAGES] == "1"
