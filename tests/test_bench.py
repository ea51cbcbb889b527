"""bench.py --quick runs end to end and its --json line holds the figures the README quotes (no timings asserted)."""

import json
import subprocess
import sys

from conftest import ROOT


def test_quick_bench_json_line_has_positive_figures():
    done = subprocess.run([sys.executable, str(ROOT / "bench.py"), "--quick", "--steps", "1", "--json",
                           "--only", "matmul", "ours_step", "eval"],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    for key in ("step_s", "eval_img_s", "peak_rss_mb", "step_flops", "matmul_flops_per_s", "floor_s"):
        assert summary[key] > 0, key
    assert 0 < summary["cayley_merge_share"] < 1
    assert summary["ratios"]["step_vs_floor"] > 0
    assert summary["runs"]["ours_step"]["trainable"] == 69632  # 2 towers x 2 layers x (4 x 16^2 + 4 x 64^2)
    assert "peft_exact" not in summary["runs"]  # not asked for with --only
