"""One home per setting: every table that names settings is derived from train.py's SETTINGS, and a new method
setting reaches each of them from its declaration alone."""

import dataclasses
import json
import math
import resource
import subprocess
import sys

import pytest
import torch

import clip_min
import data
import orthcr
import train
from conftest import ROOT
from toolbox import cli, runs, settings
from toolbox.settings import Setting


def test_docs_flags_md_is_what_the_declarations_generate():
    committed = (ROOT / "docs" / "flags.md").read_text()
    assert committed == train.SETTINGS.flags_doc(), "docs/flags.md is stale: run `make docs`"


def test_every_declared_setting_is_in_every_table_derived_from_it():
    declared = train.SETTINGS
    parser = cli.parser(declared)
    dests = {a.dest: a for a in parser._actions}  # the parser as argparse built it
    record = {f.name for f in dataclasses.fields(train.Settings)}
    doc = declared.flags_doc()
    cfg = train.settings_from(train.parse_args(["--device", "cpu"]))
    result = runs.result_settings(cfg, 1)
    for s in declared:
        assert s.name in record, s.name
        if s.flag is not False:
            assert s.name in dests and dests[s.name].option_strings == [s.option], s.name
            assert f"| `{s.option}` |" in doc, s.name
            default = s.default_text()
            assert (f"(default: {default})" in dests[s.name].help.replace("%%", "%")) == bool(default), s.name
            assert default or s.switch, f"{s.option} shows no default"
        assert (s.name in result) == (s.role in ("method", "data")), s.name  # compared on resume, or run-only
        assert (s.name in declared.training_only()) == (s.eval_only == "trained"), s.name
        assert (s.name in declared.saved_names()) == (s.eval_only is not None), s.name
    # what the adapters file records as its layout: the trainables' shapes and the prompts
    assert set(declared.layout_names()) == {"targets", "blocks", "towers", "neumann", "prompt", "n_ctx", "ctx_init",
                                            "activation"}


def test_the_derived_tables_are_the_ones_train_py_had():
    declared = train.SETTINGS
    assert set(declared.result_names()) == {
        "checkpoint_sha256", "data", "protocol", "shots", "epochs", "batch_size", "lr", "weight_decay", "warmup_steps",
        "targets", "blocks", "towers", "neumann", "lambda1", "lambda2", "cutout", "cutout_size", "cutout_holes",
        "cutout_temperature", "prompt", "n_ctx", "ctx_init", "precision", "eval_data", "eval_limit", "zero_shot",
        "ctx_lr", "ctx_momentum", "ctx_weight_decay", "ctx_warmup_epochs", "ctx_warmup_lr", "kl_reduction",
        "template", "activation"}
    assert set(declared.training_only()) == {"epochs", "batch_size", "lr", "weight_decay", "warmup_steps", "lambda1",
                                             "lambda2", "cutout", "cutout_size", "cutout_holes", "cutout_temperature",
                                             "ctx_lr", "ctx_momentum", "ctx_weight_decay", "ctx_warmup_epochs",
                                             "ctx_warmup_lr", "kl_reduction"}


def test_a_new_method_flag_reaches_every_table_from_its_declaration_alone():
    new = Setting("symmetric_kl", False, "KL in both directions", "method", "the method", switch=True,
                  eval_only="trained", label="symmetric KL")
    declared = settings.Declarations([*train.SETTINGS, new])
    args = cli.parse_args(declared, ["--device", "cpu", "--symmetric-kl"])
    cfg = declared.record(args)
    assert cfg.symmetric_kl is True and declared.record(cli.parse_args(declared, ["--device", "cpu"])).symmetric_kl is False
    assert "symmetric_kl" in runs.result_settings(cfg, 1)  # compared on --resume, saved with checkpoints
    assert "symmetric_kl" in declared.training_only() and "symmetric_kl" in declared.saved_names()
    assert settings.method_name(cfg) == "OrthCR (symmetric KL)"
    assert runs.run_folder(cfg, 1).name == "eurosat_base2new_16shot_orthcr-symmetric-kl_seed1"
    assert "| `--symmetric-kl` |" in declared.flags_doc()
    # --eval-only takes it from the adapters file and refuses a contradicting flag
    saved = {"symmetric_kl": True}
    evaluated = declared.record(cli.parse_args(declared, ["--device", "cpu", "--eval-only", "--adapters", __file__]),
                                saved)
    assert evaluated.symmetric_kl is True


def test_a_recorded_value_is_checked_against_its_declaration():
    s = train.SETTINGS.by_name
    assert s["shots"].valid(16) and not s["shots"].valid(0) and not s["shots"].valid("16")
    assert s["lr"].valid(1e-3) and not s["lr"].valid(float("nan")) and not s["lr"].valid(-1.0)
    assert s["towers"].valid(["visual"]) and not s["towers"].valid(["audio"]) and not s["towers"].valid("visual")
    assert s["cutout_temperature"].valid(None) and not s["cutout_temperature"].valid(0.0)
    assert s["seeds"].valid([2**32 - 1]) and not s["seeds"].valid([2**32])
    assert s["ctx_init"].valid(None) and s["ctx_init"].valid("a photo of a") and not s["ctx_init"].valid(4)


def test_a_flag_not_given_is_none_until_the_record_fills_in_its_declared_default():
    args = train.parse_args(["--device", "cpu", "--cutout", "none"])
    assert args.lr is None and args.cutout == "none" and args.resume is None
    cfg = train.settings_from(args)
    assert cfg.lr == train.LR and cfg.lambda2 == 0.0 and cfg.resume is False and cfg.download is True
    assert train.settings_from(train.parse_args(["--device", "cpu", "--no-download"])).download is False
    assert cfg.precision == "fp32" and cfg.workers == 0  # resolved for the device
    cfg = train.settings_from(train.parse_args(["--device", "cpu", "--prompt", "coop", "--ctx-init", "a photo of a"]))
    assert cfg.n_ctx == 4 and cfg.targets == train.LAYOUT["targets"]
    assert train.settings_from(train.parse_args(["--device", "cpu", "--targets", "none", "--prompt", "coop"])).targets == ()


def test_the_training_step_is_the_one_the_bench_measures():
    import bench
    assert bench.grad_scaler is train.grad_scaler and bench.resolve_precision is train.resolve_precision
    scaler = bench.grad_scaler("cpu", "fp16")
    assert scaler.get_scale() == 2.0**12  # train.py's start, not torch's 2^16
    assert bench.AUTO_CUDA == train.resolve_precision("auto", "cuda") == "fp16"
    assert isinstance(bench.autocast("cpu", "bf16"), torch.autocast)


# ----------------------------------------------------------------------------------------------------
# Ranges (issue 18): every numeric setting has one, both ends, that follows from what it means


def numeric(declared=train.SETTINGS):
    return [s for s in declared if s.type in (int, float)]


def test_every_numeric_setting_has_a_range_with_both_ends_around_its_default():
    assert {s.name for s in numeric()} >= {"cutout_holes", "cutout_size", "n_ctx", "cutout_temperature", "blocks",
                                           "epochs", "batch_size", "eval_batch_size", "shots", "lr", "weight_decay",
                                           "warmup_steps", "save_every", "log_every", "eval_limit", "neumann",
                                           "lambda1", "lambda2", "workers"}
    for s in numeric():
        assert s.check is not None, s.name
        huge = 10**12 if s.type is int else 1e30
        assert s.check(huge) and s.check(-1), s.name  # bounded above and below
        if s.type is float:
            assert all(s.check(v) for v in (float("nan"), float("inf"), -float("inf"))), s.name
        default = s.default({"device": "cpu", "cutout": "random"}) if callable(s.default) else s.default
        assert all(s.check(v) is None for v in (default if s.nargs else [default]) if v is not None), s.name


def test_the_bounds_that_come_from_clip_are_clip_s():
    # the longest CoOp context leaves room for [SOS], a one-token class, "." and [EOS] in CLIP's 77 tokens
    orthcr.coop_tokens(["cat"], settings.N_CTX_MAX)
    with pytest.raises(RuntimeError):
        orthcr.coop_tokens(["cat"], settings.N_CTX_MAX + 1)
    assert settings.CONTEXT_LENGTH == 77 and settings.N_CTX_MAX == 73
    assert settings.IMAGE_MAX == max(clip_min.CONFIGS[m]["image_resolution"] for m in clip_min.available_models())
    with torch.device("meta"):  # no layer of any CLIP has more inputs than --blocks may cut into 1 x 1 blocks
        widest = max(P.shape[1] for m in clip_min.available_models()
                     for P in clip_min.CLIP(**clip_min.CONFIGS[m]).state_dict().values() if P.dim() == 2)
    assert widest == settings.BLOCKS_MAX


def test_the_lowest_temperature_cannot_overflow_the_softmax_in_fp32():
    t = settings.TEMPERATURE_MIN
    assert torch.isfinite(torch.exp(torch.tensor(2 / t, dtype=torch.float32)))  # the spread of cosines in [-1, 1]
    assert not torch.isfinite(torch.exp(torch.tensor(2 / (t / 10), dtype=torch.float32)))  # a bound that binds
    assert t - 2 / math.log(settings.FLOAT32_MAX) < 1e-3  # rounded up by less than 0.001
    similarity = torch.tensor([[[1.0, -1.0], [-1.0, 1.0]]])  # the widest spread a cosine map can have
    for temperature in (t, 1000.0):
        orthcr.attentive_cutout(torch.rand(1, 3, 8, 8), similarity, 2, torch.Generator().manual_seed(0), temperature)
    assert train.SETTINGS.by_name["cutout_temperature"].check(1e-45)


def flag_error(capsys, *argv):
    """The command line's flag error: exit 2, one line; returns it."""
    with pytest.raises(SystemExit) as stop:
        train.main([str(a) for a in argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and len(err) == 1 and err[0].startswith("train.py: error: "), err
    return err[0]


@pytest.fixture
def nothing_allocated(monkeypatch):
    """Every step that would read, download or build something records itself here instead."""
    calls = []
    for module, name in ((clip_min, "read_state_dict"), (clip_min, "checkpoint"), (clip_min, "CLIP"),
                         (orthcr, "init_context"), (orthcr, "init_adapters"), (orthcr, "cutout"),
                         (data, "build_dataset")):
        monkeypatch.setattr(module, name, lambda *a, _name=name, **k: calls.append(_name))
    return calls


@pytest.mark.parametrize("flags, match", [
    (["--cutout-holes", 100000], "--cutout-holes must be <= 64"),
    (["--prompt", "coop", "--n-ctx", 10000000], "--n-ctx must be <= 73"),  # without --weights: a named model
    (["--cutout", "attentive", "--cutout-temperature", 1e-45], "--cutout-temperature must be from 0.023 to 1000"),
    (["--cutout-size", 100000], "--cutout-size must be <= 336"),
    (["--blocks", 10**9], "--blocks must be <= 4,096"),
    (["--epochs", 10**9], "--epochs must be <= 10,000"),
    (["--batch-size", 10**9], "--batch-size must be <= 4,096"),
    (["--eval-batch-size", 10**9], "--eval-batch-size must be <= 4,096"),
    (["--shots", 10**9], "--shots must be <= 10,000"),
    (["--lr", "inf"], "--lr must be a positive number, at most 10"),
    (["--weight-decay", "1e300"], "--weight-decay must be <= 100"),
    (["--lr", 1, "--weight-decay", 2], "AdamW multiplies P by 1 - lr x weight decay"),
    (["--warmup-steps", 10**10], "--warmup-steps must be <= 1,000,000,000"),
    (["--save-every", 10**10], "--save-every must be <= 1,000,000,000"),
    (["--log-every", 10**10], "--log-every must be <= 1,000,000,000"),
    (["--eval-limit", 10**9], "--eval-limit must be <= 100,000"),
    (["--neumann", 10**9], "--neumann must be <= 64"),
    (["--lambda1", "1e300"], "--lambda1 must be a number from 0 to 1000"),
    (["--lambda2", "nan"], "--lambda2 must be a number from 0 to 1000"),
    (["--workers", 10**6], "--workers must be <= 256"),
    (["--seeds", *range(300)], "--seeds: 300 seeds, at most 256"),
    (["--prompt", "coop", "--ctx-init", "a " * 80], "--ctx-init is 80 tokens: CoOp's prompt fits at most 73"),
])
def test_an_out_of_range_flag_is_one_line_before_anything_is_allocated(tmp_path, capsys, nothing_allocated, flags,
                                                                       match):
    line = flag_error(capsys, "--root", tmp_path / "data", "--out", tmp_path / "run", "--device", "cpu", *flags)
    assert match in line, line
    assert not nothing_allocated and not (tmp_path / "run").exists()


def test_the_context_learning_rate_is_explained_by_its_own_sgd_not_adamw(tmp_path, capsys, nothing_allocated):
    """CoOp's context trains with its own SGD (train.py's CTX_LR): --ctx-lr's help and range line say so."""
    line = flag_error(capsys, "--root", tmp_path, "--device", "cpu", "--prompt", "coop", "--ctx-lr", 20)
    assert "--ctx-lr must be a positive number, at most 10 (the context's SGD moves it" in line
    assert "AdamW" not in line and not nothing_allocated
    ctx_lr = train.SETTINGS.by_name["ctx_lr"]
    assert "SGD" in ctx_lr.help and "AdamW" not in ctx_lr.help and ctx_lr.check(train.CTX_LR) is None


def test_a_context_of_ten_million_fails_in_a_fresh_process_in_bounded_memory(tmp_path):
    """The issue's case: without --weights the context was built (20 GB) before the prompt length was checked."""
    def limit():  # 3 GB: torch loads; a 20 GB context would fail fast instead of calling the OOM killer
        resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))

    done = subprocess.run([sys.executable, str(ROOT / "train.py"), "--root", str(tmp_path), "--device", "cpu",
                           "--out", str(tmp_path / "run"), "--prompt", "coop", "--n-ctx", "10000000"],
                          capture_output=True, text=True, cwd=tmp_path, preexec_fn=limit, timeout=300)
    assert done.returncode == 2 and done.stdout == "", done.stderr
    assert done.stderr.splitlines() == [f"train.py: error: --n-ctx must be <= 73 (CLIP's 77 tokens, less [SOS], a "
                                        f"class, '.' and [EOS]), got 10000000 (see --help)"]
    assert not (tmp_path / "run").exists()


def test_an_adapters_file_s_recorded_numbers_are_held_to_the_same_ranges():
    s = train.SETTINGS.by_name
    assert not s["n_ctx"].valid(10**8) and s["n_ctx"].valid(settings.N_CTX_MAX)
    assert not s["blocks"].valid(10**6) and not s["cutout_holes"].valid(100000)
    assert not s["cutout_temperature"].valid(1e-45) and s["cutout_temperature"].valid(None)


def test_zero_shot_takes_the_base_models_activation_but_no_training_flag():
    # the probe: a GELU checkpoint without open_clip_config.json could not be evaluated zero-shot
    args = train.parse_args(["--zero-shot", "--activation", "gelu", "--device", "cpu"])
    assert train.settings_from(args).activation == "gelu"
    with pytest.raises(SystemExit) as e:
        train.parse_args(["--zero-shot", "--epochs", "3", "--device", "cpu"])
    assert e.value.code == 2


def test_a_number_given_as_minus_zero_is_recorded_as_zero():
    cfg = train.settings_from(train.parse_args(["--device", "cpu", "--prompt", "coop", "--lambda1", "-0",
                                                "--weight-decay", "-0.0", "--ctx-warmup-lr", "-.0"]))
    for name in ("lambda1", "weight_decay", "ctx_warmup_lr"):
        value = getattr(cfg, name)
        assert value == 0 and type(value) is float and math.copysign(1, value) == 1, name
    assert "-0" not in json.dumps(dataclasses.asdict(cfg))  # config.json's record
    assert settings.positive_zero(-0.0) == 0.0 and settings.positive_zero(-1.5) == -1.5
    assert settings.positive_zero(0) == 0 and settings.positive_zero(False) is False  # only floats change
