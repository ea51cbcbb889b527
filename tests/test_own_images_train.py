"""train.py on a folder of your own images (--data PATH, --template), end to end on the tiny CLIP: trained,
evaluated again with --eval-only, and used with --predict. data.py's side is tests/test_own_images.py."""

import csv
import json

import pytest
import torch

import train
from conftest import COLOURS, run_main, toy_image

TEMPLATE = "a satellite photo of {}."


def make_folder(folder, classes=("sea_lake", "forest", "pasture-land", "river"), per_class=10):
    for label, name in enumerate(classes):
        for i in range(per_class):
            toy_image(folder / name / f"{i:03d}.jpg", COLOURS[label], 100 * label + i)
    return folder


def test_a_folder_trains_evaluates_and_predicts_with_its_template(weights, tmp_path, monkeypatch, capsys):
    folder = make_folder(tmp_path / "My Tiles")
    monkeypatch.chdir(tmp_path)  # the default run folder, runs/<folder name>_..., lands here
    common = ["--weights", weights, "--shots", 4, "--batch-size", 4, "--epochs", 1, "--log-every", 100]
    first = run_main("--data", folder, "--template", TEMPLATE, *common)[0]
    run = tmp_path / "runs" / "My_Tiles_base2new_4shot_orthcr_seed1"
    config = json.loads((run / "config.json").read_text())
    assert config["data"] == str(folder) and config["template"] == TEMPLATE
    saved = torch.load(run / "adapters.pt", weights_only=True)
    # the base classes: the first half of the sorted class folders, "_" and "-" read as spaces
    assert saved["config"]["classnames"] == ["forest", "pasture land"] and saved["config"]["template"] == TEMPLATE
    assert "| My_Tiles | OrthCR (1 seed) |" in capsys.readouterr().out

    # --eval-only takes the data and the template from the adapters file
    again = run_main("--eval-only", "--adapters", run / "adapters.pt", "--weights", weights)[0]
    assert again["results"] == first["results"]
    other = run_main("--eval-only", "--adapters", run / "adapters.pt", "--weights", weights, "--template",
                     "a photo of {}, a kind of land.", "--out", tmp_path / "other")[0]
    assert json.loads((tmp_path / "other" / "config.json").read_text())["template"] == "a photo of {}, a kind of land."
    assert other["results"]["base"]["n"] == first["results"]["base"]["n"]

    run_main("--predict", folder / "forest", "--adapters", run / "adapters.pt", "--out", tmp_path / "p")
    with open(tmp_path / "p" / "predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 10 and {r["class_1"] for r in rows} <= {"forest", "pasture land"}
    assert json.loads((tmp_path / "p" / "predictions.json").read_text())["template"] == TEMPLATE
    run_main("--predict", folder / "forest", "--adapters", run / "adapters.pt", "--out", tmp_path / "q",
             "--template", "a photo of {}.")
    assert json.loads((tmp_path / "q" / "predictions.json").read_text())["template"] == "a photo of {}."


def test_a_folder_takes_no_cross_or_dg_protocol(tmp_path, capsys):
    folder = make_folder(tmp_path / "tiles", per_class=4)
    for protocol in ("cross", "dg"):
        with pytest.raises(SystemExit):
            train.parse_args(["--data", str(folder), "--protocol", protocol])
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "takes --protocol base2new or fewshot" in err[0]
