"""train.py end to end on a tiny random CLIP and miniature datasets in CoOp's layout."""

import dataclasses
import json
import math
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

import clip_min
from toolbox import cli, files, runs, tables
import data
import orthcr
import train
from conftest import ROOT, SHARED, base_args, make_eurosat_like, make_imagenet_like, read_log, run_main, saved_adapters

# ----------------------------------------------------------------------------------------------------


def settings(*argv):
    return train.settings_from(train.parse_args([str(a) for a in argv]))


def train_accuracy(weights, root, adapters=None, subsample="all"):
    model = clip_min.build_model(clip_min.read_state_dict(weights))
    params = dict(model.state_dict())
    merged = orthcr.export_state_dict(params, adapters) if adapters else params
    dataset = data.build_dataset("eurosat", root, shots=8, seed=1, subsample=subsample)
    on_train = dataclasses.replace(dataset, test=dataset.train)
    cfg = settings("--root", root, "--weights", weights, "--device", "cpu")
    return train.evaluate(model, merged, None, {"train": on_train}, cfg, 1)["train"]["accuracy"]


def test_training_lowers_the_loss_and_raises_train_accuracy(root, weights, tmp_path):
    out = tmp_path / "run"
    run_main(*base_args(root, weights, out, "--protocol", "fewshot", "--epochs", 12, "--lr", 3e-2,
                        "--warmup-steps", 0))
    log = read_log(out)
    assert len(log) == 12 * 4  # 32 images / batch 8, 12 epochs
    ce = lambda rows: sum(r["ce"] for r in rows) / len(rows)  # noqa: E731
    assert ce(log[-8:]) < 0.7 * ce(log[:4])
    before = train_accuracy(weights, root)
    after = train_accuracy(weights, root, saved_adapters(out)["adapters"])
    assert after > before + 20 and after >= 75


def test_written_files_have_the_documented_fields(root, weights, tmp_path):
    out = tmp_path / "run"
    run_main(*base_args(root, weights, out, "--epochs", 2, "--export"))
    config = json.loads((out / "config.json").read_text())
    for key in ("data", "protocol", "shots", "seed", "lr", "batch_size", "epochs", "blocks", "targets", "lambda1",
                "lambda2", "code_version", "checkpoint_sha256", "torch"):
        assert key in config, key
    assert config["checkpoint_sha256"] == files.file_sha256(weights)
    log = read_log(out)
    assert [r["step"] for r in log] == list(range(1, len(log) + 1)) and len(log) == 2 * 2  # 16 base images / 8
    assert all({"step", "epoch", "lr", "loss", "ce", "ce_cutout", "kl", "kl_cutout", "step_s"} <= set(r) for r in log)
    results = json.loads((out / "results.json").read_text())["results"]
    assert results["base"]["n"] == 12 and results["new"]["n"] == 12  # 2 classes x 6 test images each
    assert results["base"]["correct"] == round(results["base"]["accuracy"] * 12 / 100)
    assert results["hm"] == pytest.approx(train.harmonic_mean(results["base"]["accuracy"], results["new"]["accuracy"]))
    saved = saved_adapters(out)  # loads with weights_only=True
    assert set(saved) == {"adapters", "context", "config", "settings"} and saved["context"] is None
    assert saved["config"]["blocks"] == 4 and saved["config"]["targets"] == list(orthcr.DEFAULT_TARGETS)
    params = dict(clip_min.build_model(clip_min.read_state_dict(weights)).state_dict())
    assert set(saved["adapters"]) == set(orthcr.init_adapters(params))
    merged = torch.load(out / "merged.pt", weights_only=True)
    assert list(merged) == list(params)
    assert not torch.equal(merged["visual.transformer.resblocks.0.mlp.c_fc.weight"],
                           params["visual.transformer.resblocks.0.mlp.c_fc.weight"])
    assert not list(out.glob(".*tmp"))  # no temporary file left behind


def test_same_seed_gives_identical_results_and_eval_only_reproduces_them(root, weights, tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    run_main(*base_args(root, weights, a, "--epochs", 3, "--lr", 1e-2))
    run_main(*base_args(root, weights, b, "--epochs", 3, "--lr", 1e-2))
    results = lambda out: json.loads((out / "results.json").read_text())["results"]  # noqa: E731
    assert results(a) == results(b)
    assert all(torch.equal(saved_adapters(a)["adapters"][k], P) for k, P in saved_adapters(b)["adapters"].items())
    run_main(*base_args(root, weights, c, "--eval-only", "--adapters", a / "adapters.pt"))
    assert results(c) == results(a)
    assert not (c / "log.jsonl").exists()  # nothing was trained


def test_resume_after_a_stop_equals_the_uninterrupted_run(root, weights, tmp_path, monkeypatch):
    full, stopped = tmp_path / "full", tmp_path / "stopped"
    args = ("--epochs", 3, "--lr", 1e-2, "--save-every", 1)
    run_main(*base_args(root, weights, full, *args))

    class StopAtStep5(runs.Interrupt):  # as if Ctrl-C came during step 5
        @property
        def requested(self):
            return len(read_log(stopped)) >= 5 if (stopped / "log.jsonl").exists() else False

        @requested.setter
        def requested(self, value):
            pass

    monkeypatch.setattr(runs, "Interrupt", StopAtStep5)
    with pytest.raises(SystemExit) as stop:
        run_main(*base_args(root, weights, stopped, *args))
    assert stop.value.code == 130 and not (stopped / "results.json").exists()
    monkeypatch.undo()
    run_main(*base_args(root, weights, stopped, *args, "--resume"))
    assert [r["loss"] for r in read_log(stopped)] == [r["loss"] for r in read_log(full)]
    for k, P in saved_adapters(full)["adapters"].items():
        assert torch.equal(saved_adapters(stopped)["adapters"][k], P), k
    assert json.loads((stopped / "results.json").read_text())["results"] == \
        json.loads((full / "results.json").read_text())["results"]


def new_class_drift(weights, root, out):
    """Mean KL(zero-shot || finetuned) of the class distributions on the new classes' test images."""
    model = clip_min.build_model(clip_min.read_state_dict(weights))
    params = dict(model.state_dict())
    merged = orthcr.export_state_dict(params, saved_adapters(out)["adapters"])
    new = data.build_dataset("eurosat", root, shots=8, seed=1, subsample="new")
    images = torch.stack([data.test_transform(data.load_image(it.impath), 32) for it in new.test])
    tokens = clip_min.tokenize(new.prompts())
    with torch.no_grad():
        logits = {name: orthcr.clip_logits(orthcr.encode_image(model, p, images), orthcr.encode_text(model, p, tokens),
                                           p["logit_scale"]) for name, p in (("zs", params), ("ft", merged))}
    return orthcr.kl_to_zero_shot(logits["ft"], logits["zs"]).item()


def test_cross_regularization_keeps_new_classes_closer_to_zero_shot(root, weights, tmp_path):
    regularized, free = tmp_path / "reg", tmp_path / "free"
    common = ("--epochs", 6, "--lr", 3e-2, "--warmup-steps", 0)
    run_main(*base_args(root, weights, regularized, *common, "--lambda1", 1.5, "--lambda2", 1.0))
    run_main(*base_args(root, weights, free, *common, "--lambda1", 0, "--lambda2", 0))
    assert new_class_drift(weights, root, free) > 1.5 * new_class_drift(weights, root, regularized)


def test_zero_shot_row_equals_plain_clip(root, weights, tmp_path):
    out = tmp_path / "zs"
    results = run_main(*base_args(root, weights, out, "--zero-shot", "--protocol", "fewshot"))[0]["results"]
    model = clip_min.build_model(clip_min.read_state_dict(weights))
    dataset = data.build_dataset("eurosat", root, shots=8, seed=1)
    images = torch.stack([clip_min.preprocess(Image.open(it.impath), 32) for it in dataset.test])
    with torch.no_grad():
        predictions = model(images, clip_min.tokenize(dataset.prompts()))[0].argmax(-1)
    correct = (predictions == torch.tensor([it.label for it in dataset.test])).sum().item()
    assert results["all"] == {"accuracy": 100 * correct / len(dataset.test), "correct": correct,
                              "n": len(dataset.test)}
    assert not (out / "adapters.pt").exists()


def test_seeds_give_a_mean_std_table(root, weights, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    all_results = run_main("--data", "eurosat", "--root", root, "--weights", weights, "--shots", 2, "--epochs", 1,
                           "--batch-size", 4, "--seeds", 1, 2, "--eval-limit", 4)
    assert [r["seed"] for r in all_results] == [1, 2]
    assert all(r["results"]["base"]["n"] == 4 for r in all_results)  # --eval-limit
    for seed in (1, 2):
        assert (tmp_path / "runs" / f"eurosat_base2new_2shot_orthcr_seed{seed}" / "results.json").is_file()
    table = capsys.readouterr().out.strip().splitlines()
    assert table[0] == "| dataset | method | base | new | HM |"
    base = [r["results"]["base"]["accuracy"] for r in all_results]
    new = [r["results"]["new"]["accuracy"] for r in all_results]
    assert f"{sum(base) / 2:.2f} ± " in table[2] and "OrthCR (2 seeds)" in table[2]
    # CoCoOp's convention: the HM of the mean base and new accuracies, not the mean of per-seed HMs
    assert table[2].endswith(f" | {train.harmonic_mean(sum(base) / 2, sum(new) / 2):.2f} |")


def test_dg_and_cross_protocols_evaluate_every_target(tmp_path, weights):
    root = make_imagenet_like(make_eurosat_like(tmp_path / "data"))
    dg = run_main("--data", "imagenet", "--protocol", "dg", "--root", root, "--weights", weights, "--shots", 2,
                  "--epochs", 1, "--batch-size", 4, "--out", tmp_path / "dg")[0]["results"]
    assert list(dg) == ["imagenet", *train.DG_TARGETS]  # the source first, as CoCoOp's Table 3
    assert dg["imagenet"]["n"] == 16 and dg["imagenet_v2"]["n"] == 8 and dg["imagenet_a"]["n"] == 2
    cross = run_main("--data", "imagenet", "--protocol", "cross", "--eval-data", "eurosat", "--root", root,
                     "--weights", weights, "--shots", 2, "--epochs", 1, "--batch-size", 4,
                     "--out", tmp_path / "cross")[0]["results"]
    assert list(cross) == ["imagenet", "eurosat"] and cross["eurosat"]["n"] == 24
    with pytest.raises(SystemExit, match="caltech-101"):  # the paper's targets, absent here, are named up front
        run_main("--data", "imagenet", "--protocol", "cross", "--root", root, "--weights", weights,
                 "--out", tmp_path / "x")


# ----------------------------------------------------------------------------------------------------
# Bad input: one clear line, non-zero exit, before any work


@pytest.mark.parametrize("flags, message", [
    (["--shots", "0"], "--shots must be >= 1"),
    (["--batch-size", "0"], "--batch-size must be >= 1"),
    (["--lr", "0"], "--lr must be a positive number"),
    (["--lr=-1e-3"], "--lr must be a positive number"),
    (["--data", "mnist"], "--data mnist: neither a benchmark"),
    (["--data", "./photos", "--protocol", "cross"], "a folder of your own images (--data ./photos) takes"),
    (["--template", "a photo"], "--template 'a photo' should hold {} once"),
    (["--protocol", "zeroshot"], "argument --protocol: invalid choice: 'zeroshot'"),
    (["--epochs", "0"], "--epochs must be >= 1"),
    (["--weights", "/nonexistent/model.pt"], "--weights /nonexistent/model.pt: no such file"),
    (["--eval-only"], "--eval-only needs --adapters"),
    (["--device", "tpu"], "--device tpu"),
    (["--seeds", "1", "1"], "--seeds 1 1: each seed once"),
    (["--seeds", "-3"], "--seeds: -3 is not a seed"),
    (["--cutout", "none", "--lambda2", "1"], "--cutout none has none"),
    (["--cutout", "attentive", "--cutout-holes", "2"], "--cutout-holes is for random Cutout"),
    (["--kl-reduction", "mean", "--lambda1", "0", "--lambda2", "0"], "--kl-reduction mean reduces the KL terms, "
     "which --lambda1 0 and --lambda2 0 leave out: it would change nothing but the run's label"),
    (["--kl-reduction", "mean", "--lambda1", "0", "--cutout", "none"], "which --lambda1 0 and --cutout none "
     "(--lambda2 0) leave out"),
    (["--cutout-temperature", "0.1"], "add --cutout attentive"),
    (["--n-ctx", "4"], "add --prompt coop"),
    (["--prompt", "coop", "--ctx-init", "a photo of a", "--n-ctx", "16"], "drop --n-ctx 16"),
    (["--targets", "none"], "--targets none leaves nothing to train"),
    (["--targets", "none", "--prompt", "coop", "--blocks", "2"], "--targets none trains no rotation"),
    (["--zero-shot", "--prompt", "coop"], "--zero-shot evaluates plain CLIP"),
    (["--resume", "--overwrite"], "choose one"),
    (["--adapters", "x.pt"], "--adapters is read by --eval-only"),
    (["--protocol", "dg"], "--protocol dg trains on imagenet"),
    (["--root", ""], "--root (or $ORTHCR_DATA) is empty"),
    (["--export-dtype", "fp16"], "add --export"),
    (["--out", "x" * 300], "File name too long"),
    (["--cutout", "sideways"], "invalid choice: 'sideways'"),
])
def test_invalid_flags_exit_with_one_clear_line(flags, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        train.parse_args(["--root", str(tmp_path)] + flags)
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("train.py: error: ") and message in err[0]  # no usage block


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_asked_for_but_absent(tmp_path, capsys):
    with pytest.raises(SystemExit):
        train.parse_args(["--device", "cuda"])
    assert "CUDA is not available" in capsys.readouterr().err


def test_cli_validates_before_loading_anything(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "train.py"), "--shots", "-1", "--lr", "0",
                             "--weights", str(tmp_path / "nope.pt"), "--out", str(tmp_path / "run")],
                            capture_output=True, text=True)
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert "--shots must be >= 1" in last and "--lr must be a positive number" in last and "nope.pt" in last
    assert not (tmp_path / "run").exists()  # nothing was started


def test_missing_dataset_is_reported_before_the_model_is_loaded(tmp_path, monkeypatch):
    loaded = []
    monkeypatch.setattr(clip_min, "read_state_dict", lambda *a: loaded.append(a))
    with pytest.raises(SystemExit, match=r"dtd"):
        run_main("--data", "dtd", "--root", tmp_path, "--weights", __file__)
    assert not loaded


# ----------------------------------------------------------------------------------------------------
# The real EuroSAT sample


def test_one_epoch_on_the_real_eurosat_sample(shared, weights, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(SHARED / "data" / "eurosat-sample", root / "eurosat")  # ../shared is read-only in CI
    results = run_main("--data", "eurosat", "--root", root, "--weights", weights, "--shots", 4, "--epochs", 1,
                       "--batch-size", 10, "--out", tmp_path / "run")[0]["results"]
    assert results["base"]["n"] == 50 and results["new"]["n"] == 50
    assert len(read_log(tmp_path / "run")) == 2  # 4 shots x 5 base classes / batch 10
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["train_images"] == 20


# ----------------------------------------------------------------------------------------------------
# Both versions of the paper and their ablations, one command each


def table_row(capsys):
    return capsys.readouterr().out.strip().splitlines()[2]


@pytest.mark.parametrize("flags, method", [
    ([], "OrthCR"),
    (["--cutout", "attentive"], "OrthSR"),
    (["--cutout", "attentive", "--prompt", "coop", "--ctx-init", "a photo of a"], "OrthSR + CoOp"),
    (["--towers", "visual"], "OrthCR (image tower only)"),
    (["--towers", "text"], "OrthCR (text tower only)"),
    (["--lambda1", "0", "--lambda2", "0"], "OrthCR (w/o KL)"),
    (["--cutout", "none"], "OrthCR (w/o CutOut)"),
    (["--targets", "none", "--prompt", "coop", "--n-ctx", "4", "--lambda1", "0", "--cutout", "none"], "CoOp"),
    (["--zero-shot"], "zero-shot CLIP"),
])
def test_each_ablation_prints_its_row_in_the_papers_table_form(root, weights, tmp_path, capsys, flags, method):
    epochs = [] if "--zero-shot" in flags else ["--epochs", 1]  # zero-shot trains nothing: --epochs is refused
    run_main(*base_args(root, weights, tmp_path / "run", *epochs, "--eval-limit", 4, *flags))
    row = table_row(capsys)
    assert row.startswith(f"| eurosat | {method} (1 seed) | ") and " ± " not in row  # one seed: no "± 0.00"


def test_a_coop_run_reloads_to_identical_results_and_exports_its_context(root, weights, tmp_path):
    out, again = tmp_path / "coop", tmp_path / "again"
    flags = ("--prompt", "coop", "--n-ctx", 4, "--cutout", "attentive", "--epochs", 2, "--lr", 1e-2)
    first = run_main(*base_args(root, weights, out, *flags))[0]
    saved = saved_adapters(out)
    assert saved["context"].shape == (4, 64) and saved["config"]["prompt"] == "coop"
    assert saved["context"].abs().sum() > 0
    second = run_main(*base_args(root, weights, again, "--eval-only", "--adapters", out / "adapters.pt", "--export"))[0]
    assert second["results"] == first["results"]  # prompt, n_ctx and the layout were read from the file
    with pytest.raises(SystemExit, match="ctx_init = None"):  # trained from a random context, not from words
        run_main(*base_args(root, weights, tmp_path / "x", "--eval-only", "--adapters", out / "adapters.pt",
                            "--ctx-init", "a photo of"))
    assert not (tmp_path / "x").exists()
    context = torch.load(again / "context.pt", weights_only=True)
    assert torch.equal(context["context"], saved["context"]) and context["n_ctx"] == 4
    merged = torch.load(again / "merged.pt", weights_only=True)
    assert merged["visual.proj"].dtype == torch.float32 and set(merged) == set(clip_min.random_model().state_dict())


def test_export_in_fp16_halves_the_file(root, weights, tmp_path):
    run_main(*base_args(root, weights, tmp_path / "a", "--epochs", 1, "--export"))
    run_main(*base_args(root, weights, tmp_path / "b", "--epochs", 1, "--export", "--export-dtype", "fp16"))
    fp32, fp16 = (torch.load(tmp_path / x / "merged.pt", weights_only=True) for x in "ab")
    assert all(v.dtype == torch.float16 for v in fp16.values() if v.is_floating_point())
    assert (tmp_path / "b" / "merged.pt").stat().st_size < 0.6 * (tmp_path / "a" / "merged.pt").stat().st_size
    assert all(torch.equal(fp32[k].half(), fp16[k]) for k in fp32)


def test_the_cutout_grid_is_a_png_of_the_first_batch(root, weights, tmp_path):
    path = tmp_path / "grid.png"
    assert run_main("--data", "eurosat", "--root", root, "--weights", weights, "--shots", 4,
                    "--cutout-grid", path) == []
    image = Image.open(path)
    assert image.format == "PNG" and image.size == (4 * 32, 20 + 8 * 32)  # titles, then 4 panels x 8 images
    assert not (tmp_path / "runs").exists()


# ----------------------------------------------------------------------------------------------------
# The README's commands


def readme_commands():
    """Every `python train.py ...` in the README: code blocks, table cells, the loop over datasets ($d), up to a
    shell operator (the sweep's `&`)."""
    readme = (ROOT / "README.md").read_text()
    return sorted({m.group(0).strip() for m in re.finditer(r"python train\.py[^`\n#&|>]*", readme)})


def test_every_train_command_in_the_readme_passes_the_flag_checks():
    commands = readme_commands()
    assert len(commands) > 20 and "python train.py --data eurosat --shots 16 --device cuda" in commands
    # what an earlier README command makes: the quick start's checkpoint, a training run's adapters, the figure
    made_earlier = ("--weights tiny.pt: no such file", "--weights vit_b16_random.pt: no such file",
                    "--adapters runs/eurosat_base2new_16shot_orthcr_seed1/adapters.pt: no such file")
    for command in commands:
        argv = shlex.split(command.replace("$d", "oxford_pets"))[2:]
        if argv == ["--help"]:
            continue
        argv = ["cpu" if a == "cuda" else a for a in argv]  # this machine's device; the rest as written
        problems = [p for p in cli.problems(train.SETTINGS, cli.parser(train.SETTINGS).parse_args(argv))
                    if p not in made_earlier]
        assert not problems, f"README: `{command}`: {problems}"


def test_each_row_of_the_readme_ablation_table_has_its_own_run_folders():
    readme = (ROOT / "README.md").read_text()
    rows = re.findall(r"^\|[^|]*\| `(python train\.py [^`]*)`", readme, flags=re.M)
    assert len(rows) >= 9
    folders = {}
    for command in rows:
        argv = ["cpu" if a == "cuda" else a for a in shlex.split(command)[2:]]
        cfg = train.settings_from(train.parse_args(argv))
        for seed in cfg.seeds:
            folder = runs.run_folder(cfg, seed)
            assert folder not in folders, f"`{command}` and `{folders[folder]}` share {folder}"
            folders[folder] = command
    assert Path("runs/eurosat_base2new_16shot_orthsr+coop_seed1") in folders
    assert Path("runs/eurosat_base2new_16shot_orthcr-no-cutout_seed2") in folders


def test_out_with_seed_names_one_folder_per_seed():
    cfg = train.settings_from(train.parse_args(["--seeds", "1", "2", "--out", "sweep/lr3e-4_seed{seed}", "--device", "cpu"]))
    assert [runs.run_folder(cfg, s) for s in cfg.seeds] == [Path("sweep/lr3e-4_seed1"), Path("sweep/lr3e-4_seed2")]
    with pytest.raises(SystemExit):  # one folder for two seeds would mix them
        train.parse_args(["--seeds", "1", "2", "--out", "sweep/lr3e-4", "--device", "cpu"])


# ----------------------------------------------------------------------------------------------------
# Issue #19: CoOp's context trains with CoOp's recipe; fp16 steps cannot fail silently; the table's std; the KL's
# reduction; the zero-shot self-check


def test_the_coop_context_has_its_own_sgd_with_coops_recipe(tiny_model):
    cfg = settings("--device", "cpu", "--prompt", "coop")
    assert (cfg.ctx_lr, cfg.ctx_momentum, cfg.ctx_weight_decay, cfg.ctx_warmup_epochs, cfg.ctx_warmup_lr) == \
        (2e-3, 0.9, 5e-4, 1, 1e-5)  # CoOp's configs/trainers/CoOp/vit_b16.yaml with Dassl's defaults
    params = dict(tiny_model.state_dict())
    adapters, context = train.init_trainables(params, cfg, seed=1)
    optimizers = train.make_optimizers(adapters, context, cfg)
    assert isinstance(optimizers["adapters"], torch.optim.AdamW) and optimizers["adapters"].defaults["lr"] == train.LR
    sgd = optimizers["context"]
    assert isinstance(sgd, torch.optim.SGD) and sgd.param_groups[0]["params"] == [context]
    assert (sgd.defaults["momentum"], sgd.defaults["weight_decay"], sgd.defaults["nesterov"]) == (0.9, 5e-4, False)
    assert not any(P is context for P in optimizers["adapters"].param_groups[0]["params"])
    # Dassl's ConstantWarmupScheduler around CosineAnnealingLR(T_max=epochs), stepped once per epoch
    lrs = [train.ctx_lr_at(e, 20, 2e-3, 1, 1e-5) for e in range(20)]
    assert lrs[0] == 1e-5 and lrs[1] == 2e-3 and lrs[11] == pytest.approx(1e-3)
    assert lrs[19] == pytest.approx(2e-3 * 0.5 * (1 + math.cos(math.pi * 18 / 20))) and lrs[19] > 0
    assert train.make_optimizers({}, context, cfg)["adapters"] is None  # plain CoOp: no rotation, no AdamW
    assert train.make_optimizers(adapters, None, settings("--device", "cpu"))["context"] is None


@pytest.mark.parametrize("flags, ctx_init, n_ctx", [
    (["--prompt", "coop"], "a photo of a", 4),  # base-to-new: CoCoOp's vit_b16_c4_ep10_batch1_ctxv1
    (["--prompt", "coop", "--protocol", "fewshot"], None, 16),  # CoOp's few-shot runs: 16 random vectors
    (["--prompt", "coop", "--data", "imagenet", "--protocol", "cross"], "a photo of a", 4),  # CoCoOp's xd scripts
    (["--prompt", "coop", "--data", "imagenet", "--protocol", "dg"], "a photo of a", 4),
    (["--prompt", "coop", "--n-ctx", "8"], None, 8),  # a length asks for a random start
    (["--prompt", "coop", "--ctx-init", "a_centered_satellite_photo_of"], "a centered satellite photo of", 5),
    ([], None, 16),  # the hand-written prompt: no context
])
def test_the_initial_context_follows_the_protocol_as_coop_and_cocoop(flags, ctx_init, n_ctx):
    cfg = settings("--device", "cpu", *flags)
    assert (cfg.ctx_init, cfg.n_ctx) == (ctx_init, n_ctx)


def test_a_context_whose_tokens_are_not_its_words_and_bf16_say_so_in_one_line():
    assert train.setting_warnings(settings("--device", "cpu", "--prompt", "coop")) == []
    lines = train.setting_warnings(settings("--device", "cpu", "--prompt", "coop", "--ctx-init", "an x-ray photo"))
    assert len(lines) == 1 and "is 5 BPE tokens but 3 words" in lines[0] and "\n" not in lines[0]
    bf16 = dataclasses.replace(settings("--device", "cpu"), precision="bf16")  # the CPU refuses bf16 as a flag
    lines = train.setting_warnings(bf16)
    assert len(lines) == 1 and "0.16" in lines[0] and "docs/precision.md" in lines[0]
    assert train.setting_warnings(dataclasses.replace(bf16, zero_shot=True)) == []  # no regulariser is trained


def test_a_long_contexts_warning_is_one_line_that_quotes_it_cut_short():
    text = "an x-ray photo " + "of a very long and winding description " * 5  # 40 tokens, 38 words
    lines = train.setting_warnings(settings("--device", "cpu", "--prompt", "coop", "--ctx-init", text))
    assert len(lines) == 1 and "\n" not in lines[0] and "is 40 BPE tokens but 38 words" in lines[0]
    assert repr(text[:37] + "...") in lines[0] and text.strip() not in lines[0] and len(lines[0]) < 250
    assert "CoOp (n_ctx = the word count) would learn the first 38 and keep the other 2 as fixed words" in lines[0]
    assert train.setting_warnings(settings("--device", "cpu", "--prompt", "coop", "--ctx-init", "a  photo")) == []


def test_the_context_moves_at_coops_rate_and_both_optimizers_resume_exactly(root, weights, tmp_path, monkeypatch):
    full, stopped = tmp_path / "full", tmp_path / "stopped"
    args = ("--prompt", "coop", "--epochs", 3, "--save-every", 1, "--ctx-warmup-epochs", 0)
    run_main(*base_args(root, weights, full, *args))
    log = read_log(full)
    assert log[0]["ctx_lr"] == 2e-3 and log[0]["lr"] == 1e-4 and "skipped" not in log[0]  # its own schedule
    init = train.init_trainables(dict(clip_min.build_model(clip_min.read_state_dict(weights)).state_dict()),
                                 settings("--root", root, "--weights", weights, "--prompt", "coop"), 1)[1]
    moved = (saved_adapters(full)["context"] - init).abs().max().item()
    assert moved > 6 * 1e-4  # farther than AdamW at lr 1e-4 could take it in 6 steps

    class StopAtStep3(runs.Interrupt):
        @property
        def requested(self):
            return len(read_log(stopped)) >= 3 if (stopped / "log.jsonl").exists() else False

        @requested.setter
        def requested(self, value):
            pass

    monkeypatch.setattr(runs, "Interrupt", StopAtStep3)
    with pytest.raises(SystemExit):
        run_main(*base_args(root, weights, stopped, *args))
    state = torch.load(stopped / "checkpoint.pt", weights_only=True)
    assert state["ctx_optimizer"]["state"][0]["momentum_buffer"].shape == init.shape  # the SGD's momentum, saved
    monkeypatch.undo()
    run_main(*base_args(root, weights, stopped, *args, "--resume"))
    assert [r["loss"] for r in read_log(stopped)] == [r["loss"] for r in read_log(full)]
    assert torch.equal(saved_adapters(stopped)["context"], saved_adapters(full)["context"])


def fp16_on_the_cpu(monkeypatch, init_scale, backoff_factor=0.5):
    """fp16 autocast with a grad scaler on the CPU (the flag checks keep fp16 for CUDA), from `init_scale`."""
    monkeypatch.setattr(train, "resolve_precision", lambda precision, device: "fp16")
    monkeypatch.setattr(train, "grad_scaler", lambda device, precision: torch.amp.GradScaler(
        "cpu", init_scale=init_scale, backoff_factor=backoff_factor, enabled=precision == "fp16"))


def test_a_run_whose_every_fp16_step_was_skipped_is_not_recorded_as_trained(root, weights, tmp_path, monkeypatch,
                                                                            capsys):
    fp16_on_the_cpu(monkeypatch, 2.0**40)  # the loss scaled by 2^40 overflows fp16 at every step of this run
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as stop:
        run_main(*base_args(root, weights, out, "--epochs", 1))
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert stop.value.code == 3 and len(errors) == 1
    assert "no training step was applied: the fp16 grad scaler skipped all 2 steps" in errors[0]
    assert not (out / "adapters.pt").exists() and not (out / "results.json").exists()
    assert not out.exists()  # a new run that trained nothing leaves no folder behind (P = 0, nothing to continue)


def test_each_skipped_fp16_step_is_logged_counted_and_warned_about(root, weights, tmp_path, monkeypatch, capsys):
    fp16_on_the_cpu(monkeypatch, 2.0**40, backoff_factor=2.0**-30)  # step 1 overflows, then the scale is 2^10
    out = tmp_path / "run"
    run_main(*base_args(root, weights, out, "--epochs", 2, "--log-every", 1))
    log = read_log(out)
    assert log[0]["skipped"] is True and log[0]["scale"] == 2.0**40
    assert not any(r.get("skipped") for r in log[1:]) and len(log) == 4
    err = capsys.readouterr().err
    assert "skipped 1 " in err.splitlines()[-1] or any("skipped 1 " in line for line in err.splitlines())
    warning = [line for line in err.splitlines() if line.startswith("warning: the fp16 grad scaler skipped")]
    assert len(warning) == 1 and "1 of 4 steps (25 %, more than 5 %)" in warning[0]
    assert (out / "results.json").is_file()  # three steps were applied: the run trained


def test_the_std_column_is_the_population_std_as_coops_parse_test_res():
    runs_ = [{"data": "eurosat", "protocol": "base2new", "method": "OrthCR", "seed": seed, "shots": 16,
              "results": {"base": {"accuracy": 80.0}, "new": {"accuracy": new}}}
             for seed, new in enumerate((30, 30, 35), 1)]
    lines = tables.summary_table(runs_, train.harmonic_mean).splitlines()
    assert "| 31.67 ± 2.36 |" in lines[2]  # np.std([30, 30, 35]); statistics.stdev would print 2.89
    assert lines[3] == tables.STD_NOTE and "population std" in lines[3]
    assert len(tables.summary_table(runs_[:1], train.harmonic_mean).splitlines()) == 3  # one seed: no ± and no note


def test_the_kl_reduction_reaches_the_loss_and_names_its_row(tiny_model):
    assert train.settings_from(train.parse_args(["--device", "cpu"])).kl_reduction == "batchmean"
    cfg = settings("--device", "cpu", "--kl-reduction", "mean")
    assert runs.run_folder(cfg, 1).name == "eurosat_base2new_16shot_orthcr-kl-mean-over-classes_seed1"
    assert train.method_settings(cfg, torch.Generator())["reduction"] == "mean"
    params = dict(tiny_model.state_dict())
    adapters = {k: torch.randn_like(P) * 0.1 for k, P in orthcr.init_adapters(params).items()}
    images, labels = torch.rand(4, 3, 32, 32), torch.tensor([0, 1, 2, 0])
    tokens = orthcr.trim_tokens(clip_min.tokenize(["a photo of a cat.", "a photo of a dog.", "a photo of a car."]))
    teacher = orthcr.zero_shot_text_features(tiny_model, params, tokens)
    terms = {}
    for reduction in orthcr.KL_REDUCTIONS:
        cfg = settings("--device", "cpu", "--kl-reduction", reduction, "--cutout", "none")
        terms[reduction] = orthcr.objective(tiny_model, params, adapters, images, labels, tokens, teacher,
                                            **train.method_settings(cfg, torch.Generator()))[1]
    assert terms["mean"]["kl"].item() == pytest.approx(terms["batchmean"]["kl"].item() / 3, rel=1e-5)  # C = 3
    assert settings("--device", "cpu", "--kl-reduction", "mean", "--lambda1", "0").kl_reduction == "mean"  # L2 > 0


def test_zero_shot_on_the_official_weights_is_checked_against_cocoops_row(root, weights, tmp_path, monkeypatch,
                                                                          capsys):
    # the tiny weights play OpenAI's ViT-B/16: its URL carries their SHA-256 (nothing is downloaded)
    url = clip_min.MODELS["ViT-B/16"].split("/")
    monkeypatch.setitem(clip_min.MODELS, "ViT-B/16", "/".join([*url[:-2], files.file_sha256(weights), url[-1]]))
    run_main(*base_args(root, weights, tmp_path / "zs", "--zero-shot"))
    lines = [line for line in capsys.readouterr().err.splitlines() if "CoCoOp Table 1" in line]
    assert len(lines) == 1 and lines[0].startswith("eurosat: measured base ")
    assert "base 56.48, new 64.05, HM 60.03" in lines[0] and "CHECK" in lines[0]  # a random tiny model is far off
    run_main(*base_args(root, weights, tmp_path / "limited", "--zero-shot", "--eval-limit", 2))
    assert "CoCoOp Table 1" not in capsys.readouterr().err  # a subset is not the published test set
    monkeypatch.undo()
    run_main(*base_args(root, weights, tmp_path / "other", "--zero-shot"))
    assert "CoCoOp Table 1" not in capsys.readouterr().err  # other weights: nothing to compare with


def test_the_fused_adamw_takes_the_plain_adamws_steps():
    # train.adamw is a speed device: torch's fused kernel, the same update as the plain AdamW up to float rounding
    g = torch.Generator().manual_seed(0)
    start = [torch.randn(4, 8, 8, generator=g), torch.randn(2, 16, 16, generator=g)]
    grads = [[torch.randn(p.shape, generator=g) for p in start] for _ in range(5)]
    runs = []
    for make in (lambda ps: train.adamw(ps, lr=1e-2, weight_decay=0.1),
                 lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1, foreach=False)):
        params = [p.clone().requires_grad_() for p in start]
        optimizer = make(params)
        for step in grads:
            for p, grad in zip(params, step):
                p.grad = grad.clone()
            optimizer.step()
        runs.append((optimizer, params))
    (fused, ours), (_, plain) = runs
    assert fused.defaults["fused"]
    for a, b, p0 in zip(ours, plain, start):
        assert torch.allclose(a, b, atol=1e-6) and not torch.allclose(a, p0, atol=1e-3)
