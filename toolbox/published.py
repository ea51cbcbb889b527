"""Published zero-shot accuracies to check a real-weights install against: `compare` puts a measured row beside them.

Zero-shot CLIP ViT-B/16 (hand-written template per dataset, no training) on CoOp's base-to-new splits, in percent:
CoCoOp's Table 1 (Zhou et al., CVPR 2022, arXiv 2203.05557), the row "CLIP". Each later base-to-new paper copies
this row unchanged. Source of the numbers below, stored and citable: the row "CLIP" of TransAgent's Table 1
(arXiv 2410.12183, which takes it from CoCoOp) as extracted in
    github.com/deep-diver/ai-paper-reviewer, content/paper-reviews/2410.12183/index.md,
    commit 7afec4f53f93ba68dfd22a8488d9a5f62568eb54.
Every dataset's HM is the harmonic mean of its base and new to 0.01, and the 11 bases and news average to 69.34
and 74.22, whose harmonic mean 71.70 completes the table's "Average" row, which two more stored READMEs print:
astra-vision/ProLIP README.md @ b43e795cbf0b53a9b0aa83cf4f47d9755896ba6f and
zhengli97/Awesome-Prompt-Adapter-Learning-for-VLMs README.md @ 01290dff107953cfdd132d1d03f4f313903a254d.
"""

import clip_min

# dataset (data.DATASETS' names) -> {"base", "new", "hm"}: zero-shot CLIP ViT-B/16, CoCoOp Table 1 (see above)
ZERO_SHOT_BASE_TO_NEW = {
    "imagenet": {"base": 72.43, "new": 68.14, "hm": 70.22},
    "caltech101": {"base": 96.84, "new": 94.00, "hm": 95.40},
    "oxford_pets": {"base": 91.17, "new": 97.26, "hm": 94.12},
    "stanford_cars": {"base": 63.37, "new": 74.89, "hm": 68.65},
    "oxford_flowers": {"base": 72.08, "new": 77.80, "hm": 74.83},
    "food101": {"base": 90.10, "new": 91.22, "hm": 90.66},
    "fgvc_aircraft": {"base": 27.19, "new": 36.29, "hm": 31.09},
    "sun397": {"base": 69.36, "new": 75.35, "hm": 72.23},
    "dtd": {"base": 53.24, "new": 59.90, "hm": 56.37},
    "eurosat": {"base": 56.48, "new": 64.05, "hm": 60.03},
    "ucf101": {"base": 70.53, "new": 77.50, "hm": 73.85},
}
PUBLISHED_AVERAGE = {"base": 69.34, "new": 74.22, "hm": 71.70}  # the table's own "Average" row

# Zero-shot evaluation has no seed: a gap comes only from the pipeline. A different resize or interpolation, fp16
# against fp32 towers, or another image library moves accuracy by tenths of a point; a wrong template, class-name
# list or split moves it by several points. One point separates the two.
TOLERANCE = 1.0


def applies(cfg):
    """Zero-shot CLIP on a full base-to-new test set with OpenAI's ViT-B/16 (by name, or a --weights file with its
    SHA-256): CoCoOp's Table 1 published that row, so the measured one must be close."""
    official = clip_min.MODELS["ViT-B/16"].split("/")[-2]  # OpenAI's URL carries the file's SHA-256
    return (cfg.zero_shot and cfg.protocol == "base2new" and cfg.eval_limit is None
            and cfg.checkpoint_sha256 == official)


def compare(dataset, base, new, tolerance=TOLERANCE):
    """One line: the measured zero-shot base/new/HM accuracies (percent) beside the published row, flagged
    "CHECK" when base or new is more than `tolerance` points away. Datasets without a published row say so."""
    for name, value in (("base", base), ("new", new)):
        if not 0 <= value <= 100:
            raise ValueError(f"{name} accuracy {value!r}: expected a percentage in [0, 100]")
    measured = f"base {base:.2f}, new {new:.2f}, HM {_harmonic_mean(base, new):.2f}"
    if dataset not in ZERO_SHOT_BASE_TO_NEW:
        return f"{dataset}: measured {measured}; no published zero-shot base-to-new row for this dataset"
    row = ZERO_SHOT_BASE_TO_NEW[dataset]
    published = f"base {row['base']:.2f}, new {row['new']:.2f}, HM {row['hm']:.2f}"
    gaps = {name: value - row[name] for name, value in (("base", base), ("new", new))}
    far = [f"{name} {gap:+.2f}" for name, gap in gaps.items() if abs(gap) > tolerance]
    verdict = (f"CHECK: {', '.join(far)} points, beyond {tolerance:g}" if far
               else f"within {tolerance:g} point{'s' if tolerance != 1 else ''}")
    return f"{dataset}: measured {measured} | CoCoOp Table 1 zero-shot CLIP {published} | {verdict}"


def _harmonic_mean(a, b):
    return 2 * a * b / (a + b) if a + b else 0.0
