"""train.py on an open_clip-style checkpoint: --activation (from open_clip_config.json beside --weights, else
quick_gelu), recorded and checked, and the config's mean and std reaching preprocessing. clip_min's side (reading
the files, parity with open_clip) is tests/test_checkpoints.py."""

import csv
import json

import pytest
import torch

import clip_min
import data
import train
from conftest import base_args, make_eurosat_like, run_main

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.3, 0.35)  # not OpenAI's: a model trained with other constants


@pytest.fixture(scope="module")
def open_clip_weights(tmp_path_factory):
    """The tiny CLIP as open_clip ships a ViT: open_clip_pytorch_model.bin, with a config saying GELU (no
    quick_gelu entry) and its own mean and std."""
    folder = tmp_path_factory.mktemp("open_clip")
    torch.save(clip_min.random_model("tiny", seed=0, activation="gelu").state_dict(),
               folder / "open_clip_pytorch_model.bin")
    (folder / clip_min.OPEN_CLIP_CONFIG).write_text(json.dumps(
        {"model_cfg": {"embed_dim": 64, "vision_cfg": {}, "text_cfg": {}},
         "preprocess_cfg": {"mean": list(MEAN), "std": list(STD)}}))
    return folder / "open_clip_pytorch_model.bin"


def test_the_activation_comes_from_the_config_is_recorded_and_checked(open_clip_weights, weights, tmp_path, capsys):
    root = make_eurosat_like(tmp_path / "data")
    assert train.settings_from(train.parse_args(["--weights", str(open_clip_weights)])).activation == "gelu"
    assert train.settings_from(train.parse_args(["--weights", str(weights)])).activation == "quick_gelu"  # OpenAI's
    out = tmp_path / "run"
    first = run_main(*base_args(root, open_clip_weights, out, "--epochs", 1))[0]
    assert json.loads((out / "config.json").read_text())["activation"] == "gelu"
    assert torch.load(out / "adapters.pt", weights_only=True)["settings"]["activation"] == "gelu"
    again = run_main("--eval-only", "--adapters", out / "adapters.pt", "--weights", open_clip_weights, "--root", root,
                     "--out", tmp_path / "eval")[0]
    assert again["results"] == first["results"]
    with pytest.raises(SystemExit, match="contradicts .* drop --activation"):
        run_main("--eval-only", "--adapters", out / "adapters.pt", "--weights", open_clip_weights, "--root", root,
                 "--out", tmp_path / "eval2", "--activation", "quick_gelu")
    with pytest.raises(SystemExit, match="says the model uses gelu, not the quick_gelu asked for") as exit_:
        run_main(*base_args(root, open_clip_weights, tmp_path / "other", "--epochs", 1, "--activation", "quick_gelu"))
    assert "\n" not in str(exit_.value.code)


def test_the_configs_mean_and_std_reach_preprocessing(open_clip_weights, tmp_path):
    root = make_eurosat_like(tmp_path / "data", classes=2, per_split=(1, 1, 3))
    images = sorted(str(p) for p in (root / "eurosat" / "2750").rglob("*.jpg"))
    run_main("--predict", *images, "--zero-shot", "--weights", open_clip_weights, "--classes", "red", "green",
             "--out", tmp_path / "p")
    with open(tmp_path / "p" / "predictions.csv", newline="") as f:
        written = [float(r["probability_1"]) for r in csv.DictReader(f)]
    model = clip_min.build_model(clip_min.read_state_dict(open_clip_weights), activation="gelu")
    params = dict(model.state_dict())
    cfg = train.settings_from(train.parse_args(["--device", "cpu"]))
    features = train.classifier(model, params, None, data.Dataset("x", ["red", "green"], data.PHOTO), cfg)

    def probabilities(mean, std):
        batch = torch.stack([data.test_transform(data.load_image(p), 32, mean, std) for p in images])
        return train.class_logits(model, params, batch, features, cfg).softmax(dim=-1).max(dim=1).values.tolist()

    assert written == pytest.approx(probabilities(MEAN, STD), abs=2e-6)
    assert written != pytest.approx(probabilities(clip_min.MEAN, clip_min.STD), abs=2e-6)  # OpenAI's would differ
    x = torch.rand(2, 3, 32, 32)  # training normalizes its (Cutout) views with the same constants
    assert torch.equal(train.normalizer(clip_min.load(str(open_clip_weights)))(x), clip_min.normalize(x, MEAN, STD))
