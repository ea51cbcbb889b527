"""One home per setting: every table that names settings is derived from train.py's SETTINGS, and a new method
setting reaches each of them from its declaration alone."""

import dataclasses

import torch

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
