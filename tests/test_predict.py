"""--predict: a trained run (and the frozen model) classifying images, end to end on the tiny CLIP."""

import csv
import json
import os
from pathlib import Path

import pytest
import torch

import clip_min
import data
import orthcr
import train
from conftest import base_args, make_eurosat_like, run_main
from toolbox import predictions, runs


@pytest.fixture(scope="module")
def trained(tmp_path_factory, weights):
    """A tiny base-to-new run on 4 toy classes (base: class 0 and class 1) and its data root."""
    top = tmp_path_factory.mktemp("predict")
    root = make_eurosat_like(top / "data")
    run_main(*base_args(root, weights, top / "run", "--epochs", 2))
    return top / "run", root


def split_images(root, classes=(0, 1), split="test"):
    """The paths and labels of a split's images of `classes` (the split file's order)."""
    entries = json.loads((root / "eurosat" / "split_zhou_EuroSAT.json").read_text())[split]
    return [(str(root / "eurosat" / "2750" / rel), label) for rel, label, _ in entries if label in classes]


def read_csv(path):
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    return rows[0], [dict(zip(rows[0], row)) for row in rows[1:]]


def expected(weights, adapters, paths, classnames, template="a centered satellite photo of {}."):
    """Each image's probabilities computed here, as the evaluation computes its logits: (N, C)."""
    model = clip_min.load(str(weights))
    params = dict(model.state_dict())
    context = None
    cfg = train.settings_from(train.parse_args(["--device", "cpu"]))
    if adapters is not None:
        adapters_file = runs.read_adapters_once(adapters, train.SETTINGS)
        cfg = train.settings_from(train.parse_args(["--eval-only", "--adapters", str(adapters)]),
                                  adapters_file["settings"])
        saved = adapters_file["saved"]
        params, context = orthcr.export_state_dict(params, saved["adapters"]), saved["context"]
    dataset = data.Dataset("x", list(classnames), template)
    class_features = train.classifier(model, params, context, dataset, cfg)
    images = torch.stack([data.test_transform(data.load_image(p), model.visual.input_resolution) for p in paths])
    return train.class_logits(model, params, images, class_features, cfg).softmax(dim=-1)


def group(row, k, prefix=""):
    return [(row[f"{prefix}class_{j}"], float(row[f"{prefix}probability_{j}"])) for j in range(1, k + 1)]


def test_predictions_agree_with_the_evaluation(trained, weights, tmp_path, capsys):
    run, root = trained
    images = split_images(root)  # the base classes' test images, which the run evaluated
    out = tmp_path / "p"
    run_main("--predict", *[p for p, _ in images], "--adapters", run / "adapters.pt", "--out", out,
             "--eval-batch-size", 5)  # batches of 5, 5 and 2
    header, rows = read_csv(out / "predictions.csv")
    assert header == ["path", "class_1", "probability_1", "class_2", "probability_2"]  # 2 base classes: k = 2
    assert [r["path"] for r in rows] == [p for p, _ in images]
    classnames = ["class 0", "class 1"]  # the base classes, recorded in adapters.pt
    correct = sum(r["class_1"] == classnames[label] for r, (_, label) in zip(rows, images))
    assert correct == json.loads((run / "results.json").read_text())["results"]["base"]["correct"]
    probabilities = expected(weights, run / "adapters.pt", [p for p, _ in images], classnames)
    for row, p in zip(rows, probabilities):
        top = group(row, 2)
        assert top[0][0] == classnames[int(p.argmax())]  # the evaluation's prediction
        assert [q for _, q in top] == sorted((q for _, q in top), reverse=True) and sum(q for _, q in top) <= 1 + 1e-5
        assert top[0][1] == pytest.approx(float(p.max()), abs=2e-6)
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) == len(images) and printed[0].startswith(f"{images[0][0]}: {rows[0]['class_1']} (")
    record = json.loads((out / "predictions.json").read_text())
    assert record["classnames"] == classnames and record["template"] == "a centered satellite photo of {}."


def test_a_folder_is_searched_for_images_sorted(trained, tmp_path):
    run, root = trained
    folder = root / "eurosat" / "2750" / "Class1"
    (folder / "notes.txt").write_text("not an image")
    (folder / ".hidden.jpg").write_bytes(b"")
    try:
        run_main("--predict", folder, "--adapters", run / "adapters.pt", "--out", tmp_path / "p", "--top-k", 1)
    finally:
        (folder / "notes.txt").unlink()
        (folder / ".hidden.jpg").unlink()
    header, rows = read_csv(tmp_path / "p" / "predictions.csv")
    assert header == ["path", "class_1", "probability_1"]
    assert [r["path"] for r in rows] == sorted(str(p) for p in folder.glob("*.jpg") if not p.name.startswith("."))
    assert len(rows) == 16  # 8 + 2 + 6 images of the class


def test_the_default_folder_is_new_beside_the_adapters_and_never_overwritten(trained, tmp_path):
    run, root = trained
    image = split_images(root)[0][0]
    first = run_main("--predict", image, "--adapters", run / "adapters.pt")
    second = run_main("--predict", image, "--adapters", run / "adapters.pt")
    assert first == second
    made = sorted(p.name for p in run.glob("predict_*"))
    assert made[-2:] == [f"predict_{len(made) - 1}", f"predict_{len(made)}"]
    out = tmp_path / "p"
    out.mkdir()
    (out / "predictions.csv").write_text("earlier results\n")
    with pytest.raises(SystemExit, match="predictions.csv exists: add --overwrite"):
        run_main("--predict", image, "--adapters", run / "adapters.pt", "--out", out)
    assert (out / "predictions.csv").read_text() == "earlier results\n"
    run_main("--predict", image, "--adapters", run / "adapters.pt", "--out", out, "--overwrite")
    assert read_csv(out / "predictions.csv")[1][0]["path"] == image
    assert not list(out.glob(".*tmp"))


def test_classes_override_the_recorded_ones(trained, weights, tmp_path):
    run, root = trained
    images = [p for p, _ in split_images(root, classes=(0, 1, 2, 3))]
    names = ["class 0", "class 1", "class 2", "class 3"]
    (tmp_path / "classes.txt").write_text("\n".join(names) + "\n\n")
    for given in (names, [tmp_path / "classes.txt"]):
        out = tmp_path / f"p{len(given)}"
        run_main("--predict", *images, "--adapters", run / "adapters.pt", "--out", out, "--classes", *given)
        header, rows = read_csv(out / "predictions.csv")
        assert len(header) == 1 + 2 * 4  # top-5 is clamped to the 4 classes
        probabilities = expected(weights, run / "adapters.pt", images, names)
        assert all({c for c, _ in group(r, 4)} == set(names) for r in rows)
        assert [r["class_1"] for r in rows] == [names[i] for i in probabilities.argmax(dim=1)]
        assert {r["class_1"] for r in rows} & {"class 2", "class 3"}  # the new classes are chosen for some images


def test_zero_shot_is_the_frozen_models_prediction(trained, weights, tmp_path):
    run, root = trained
    images = [p for p, _ in split_images(root)]
    out = tmp_path / "both"
    run_main("--predict", *images, "--adapters", run / "adapters.pt", "--zero-shot", "--out", out)
    header, rows = read_csv(out / "predictions.csv")
    assert header[5:] == ["zero_shot_class_1", "zero_shot_probability_1", "zero_shot_class_2",
                          "zero_shot_probability_2"]
    frozen = expected(weights, None, images, ["class 0", "class 1"])
    trained_ = expected(weights, run / "adapters.pt", images, ["class 0", "class 1"])
    assert not torch.allclose(frozen, trained_, atol=1e-4)  # the two groups are different models
    for row, p, q in zip(rows, frozen, trained_):
        assert group(row, 1, "zero_shot_")[0][1] == pytest.approx(float(p.max()), abs=2e-6)
        assert group(row, 1)[0][1] == pytest.approx(float(q.max()), abs=2e-6)
    alone = tmp_path / "alone"  # plain CLIP, no run: the classes and the generic template are given
    run_main("--predict", *images, "--zero-shot", "--weights", weights, "--classes", "class 0", "class 1",
             "--out", alone)
    _, rows = read_csv(alone / "predictions.csv")
    plain = expected(weights, None, images, ["class 0", "class 1"], template=data.PHOTO)
    assert [r["class_1"] for r in rows] == [f"class {int(i)}" for i in plain.argmax(dim=1)]
    assert [float(r["probability_1"]) for r in rows] == pytest.approx(plain.max(dim=1).values.tolist(), abs=2e-6)


def test_a_coop_context_classifies_new_class_names(weights, tmp_path):
    root = make_eurosat_like(tmp_path / "data")
    run = tmp_path / "coop"
    run_main(*base_args(root, weights, run, "--epochs", 1, "--prompt", "coop", "--ctx-init", "a photo of a"))
    images = [p for p, _ in split_images(root, classes=(2, 3))]
    run_main("--predict", *images, "--adapters", run / "adapters.pt", "--out", tmp_path / "p", "--classes",
             "class 2", "class 3")
    _, rows = read_csv(tmp_path / "p" / "predictions.csv")
    probabilities = expected(weights, run / "adapters.pt", images, ["class 2", "class 3"])  # with the context
    assert [float(r["probability_1"]) for r in rows] == pytest.approx(probabilities.max(dim=1).values.tolist(),
                                                                      abs=2e-6)
    assert json.loads((tmp_path / "p" / "predictions.json").read_text())["prompt"] == "coop"


def test_a_bad_image_is_one_line_before_the_model_loads(trained, tmp_path, monkeypatch, capsys):
    run, root = trained
    bad = tmp_path / "cut.jpg"
    good = split_images(root)[0][0]
    bad.write_bytes(open(good, "rb").read()[:200])  # cut short
    loaded = []
    monkeypatch.setattr(clip_min, "load", lambda *a, **k: loaded.append(a))
    with pytest.raises(SystemExit) as exit_:
        run_main("--predict", good, bad, "--adapters", run / "adapters.pt", "--out", tmp_path / "p")
    message = str(exit_.value.code)
    assert "1 of 2 images" in message and str(bad) in message and "\n" not in message
    assert not loaded and not (tmp_path / "p").exists()


def test_an_adapters_file_without_class_names_needs_classes(trained, weights, tmp_path):
    run, root = trained
    saved = torch.load(run / "adapters.pt", weights_only=True)
    assert saved["config"]["classnames"] == ["class 0", "class 1"]
    del saved["config"]["classnames"], saved["config"]["template"]  # as files written before they were recorded
    older = tmp_path / "older.pt"
    torch.save(saved, older)
    image = split_images(root)[0][0]
    with pytest.raises(SystemExit, match="records no class names .* --classes"):
        run_main("--predict", image, "--adapters", older, "--out", tmp_path / "p")
    run_main("--predict", image, "--adapters", older, "--out", tmp_path / "p", "--classes", "class 0", "class 1")
    record = json.loads((tmp_path / "p" / "predictions.json").read_text())
    assert record["template"] == data.DATASETS["eurosat"].template  # the recorded dataset's


def test_the_base_model_is_the_recorded_one(trained, tmp_path):
    run, root = trained
    other = tmp_path / "other.pt"
    torch.save(clip_min.random_model("tiny", seed=1).state_dict(), other)
    with pytest.raises(SystemExit, match="trained on a base model with SHA-256"):
        run_main("--predict", split_images(root)[0][0], "--adapters", run / "adapters.pt", "--weights", other,
                 "--out", tmp_path / "p")
    assert not (tmp_path / "p").exists()


@pytest.mark.parametrize("flags, message", [
    (["--classes", "a", "b"], "--classes and --top-k are --predict's"),
    (["--predict", "x.jpg"], "--predict needs --adapters"),
    (["--predict", "x.jpg", "--zero-shot"], "needs the classes to choose from"),
    (["--predict", "x.jpg", "--zero-shot", "--classes", "a", "--epochs", "3", "--data", "dtd"],
     "drop --data, --epochs"),
    (["--predict", "x.jpg", "--zero-shot", "--classes", "a", "--top-k", "0"], "--top-k must be >= 1"),
])
def test_predict_flags_are_checked_in_one_line(flags, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        train.parse_args(flags)
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


def test_class_lists_are_checked(tmp_path):
    with pytest.raises(SystemExit, match="at least two"):
        predictions.read_classes(["cat"])
    with pytest.raises(SystemExit, match="'cat' given more than once"):
        predictions.read_classes(["cat", "dog", "cat"])
    (tmp_path / "same.txt").write_text("Cat\ndog\ncat\n")  # one name to CLIP: identical prompts
    with pytest.raises(SystemExit, match=f"--classes {tmp_path / 'same.txt'}: 'Cat' and 'cat' are one name to CLIP"):
        predictions.read_classes([str(tmp_path / "same.txt")])
    (tmp_path / "names.txt").write_text("cat\n\ndog\n")
    assert predictions.read_classes([str(tmp_path / "names.txt")]) == ["cat", "dog"]


def test_an_activation_that_contradicts_the_adapters_file_is_refused(trained, weights, tmp_path, monkeypatch):
    run, root = trained
    image = split_images(root)[0][0]
    assert torch.load(run / "adapters.pt", weights_only=True)["settings"]["activation"] == "quick_gelu"
    real_load, loaded = clip_min.load, []
    monkeypatch.setattr(clip_min, "load", lambda *a, **k: loaded.append(a) or real_load(*a, **k))
    with pytest.raises(SystemExit) as exit_:
        run_main("--predict", image, "--adapters", run / "adapters.pt", "--activation", "gelu", "--out", tmp_path / "p")
    message = str(exit_.value.code)
    assert "--activation gelu" in message and str(run / "adapters.pt") in message and "quick_gelu" in message
    assert "\n" not in message and not loaded and not (tmp_path / "p").exists()
    run_main("--predict", image, "--adapters", run / "adapters.pt", "--activation", "quick_gelu", "--out",
             tmp_path / "same")  # the recorded one, repeated: fine
    assert json.loads((tmp_path / "same" / "predictions.json").read_text())["activation"] == "quick_gelu"
    run_main("--predict", image, "--zero-shot", "--weights", weights, "--classes", "a", "b", "--activation", "gelu",
             "--out", tmp_path / "plain")  # no adapters file: the flag is the model's setting
    assert json.loads((tmp_path / "plain" / "predictions.json").read_text())["activation"] == "gelu"


@pytest.mark.parametrize("where", ["a folder named predictions.json", "a folder under /proc"])
def test_an_unusable_out_is_one_line_before_the_model_loads(where, trained, tmp_path, monkeypatch):
    run, root = trained
    if where == "a folder under /proc":  # the permission bits allow it (to root), the file system does not
        if not os.path.isdir("/proc/self"):
            pytest.skip("no /proc")
        out = Path("/proc") / f"orthcr-predict-{os.getpid()}" / "p"
    else:
        out = tmp_path / "p"
        (out / "predictions.json").mkdir(parents=True)
    before = sorted(os.listdir(out.parent)) if out.parent.exists() else None
    loaded = []
    monkeypatch.setattr(clip_min, "load", lambda *a, **k: loaded.append(a))
    with pytest.raises(SystemExit) as exit_:
        run_main("--predict", split_images(root)[0][0], "--adapters", run / "adapters.pt", "--out", out)
    message = str(exit_.value.code)
    assert message.startswith("error: ") and str(out) in message and "\n" not in message
    assert not loaded  # refused before the model, and before any image is classified
    if before is not None:
        assert sorted(os.listdir(out.parent)) == before and sorted(os.listdir(out)) == ["predictions.json"]


def test_the_output_check_leaves_nothing_behind(tmp_path):
    out = tmp_path / "a" / "b"
    predictions.check_output(out, overwrite=False)
    assert os.listdir(tmp_path) == []  # the folders it made to try are gone again
    out.mkdir(parents=True)
    predictions.check_output(out, overwrite=False)
    assert os.listdir(out) == []
