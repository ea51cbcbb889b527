"""data.py on a folder of your own images (ImageFolder layout): class names, the generated split and its
fingerprint, your own split.json, the checks, few-shot and base-to-new, and a path told from a benchmark's name."""

import json
import os
import random
import warnings
from collections import Counter

import pytest
import torch
from PIL import Image

import data
from toolbox import files, imagefolder


def jpeg(path, seed=0, size=8):
    path.parent.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    Image.fromarray(torch.randint(0, 256, (size, size, 3), generator=g, dtype=torch.uint8).numpy()).save(path)


def make_folder(folder, classes=("rose", "sun-flower", "tulip_red"), per_class=10):
    """folder/<class>/<i>.jpg; `per_class` an int or one count per class."""
    counts = per_class if isinstance(per_class, (list, tuple)) else [per_class] * len(classes)
    for k, (c, n) in enumerate(zip(classes, counts)):
        for i in range(n):
            jpeg(folder / c / f"{i:03d}.jpg", seed=100 * k + i)
    return folder


def build(folder, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return data.build_dataset(str(folder), None, **{"shots": 0, **kwargs})


@pytest.fixture
def flowers(tmp_path):
    return make_folder(tmp_path / "My Flowers")


# ---------------------------------------------------------------------------------------------- class names

def test_class_names_come_from_sorted_folder_names_with_underscores_and_hyphens_as_spaces(flowers):
    ds = build(flowers)
    assert ds.classnames == ["rose", "sun flower", "tulip red"]
    assert ds.template == "a photo of a {}." and ds.prompts()[1] == "a photo of a sun flower."
    assert ds.name == "My_Flowers" and ds.folder == str(flowers.resolve())
    for it in ds.train + ds.val + ds.test:  # labels follow the sorted folders, as ImageFolder's do
        assert it.impath.startswith(str(flowers / ["rose", "sun-flower", "tulip_red"][it.label]) + os.sep)


def test_class_names_come_from_classnames_txt(flowers):
    (flowers / "classnames.txt").write_text("tulip_red   red tulip\n\nrose Rosa  gallica\nsun-flower\tsunflower\n")
    assert build(flowers).classnames == ["Rosa gallica", "sunflower", "red tulip"]


def test_classnames_txt_takes_a_tab_for_folder_names_with_spaces(tmp_path):
    folder = make_folder(tmp_path / "f", classes=("sea lake", "forest"), per_class=4)
    (folder / "classnames.txt").write_text("\ufeffsea lake\tSea or Lake\nforest a forest\n")  # with a BOM
    assert build(folder).classnames == ["a forest", "Sea or Lake"]


@pytest.mark.parametrize("text, message", [
    ("rose a rose\ntulip_red a tulip\n", r"classnames.txt has no line for class\(es\) 'sun-flower'"),
    ("rose a rose\nsun-flower x\ntulip_red y\ndaisy z\n", r"classnames.txt names 'daisy', which is not a class folder"),
    ("rose a rose\nsun-flower\n", r"classnames.txt line 2 \('sun-flower'\) should be '<folder> <class name>'"),
    ("rose a\nrose b\n", r"classnames.txt line 2 names folder 'rose' a second time"),
])
def test_a_wrong_classnames_txt_is_one_line_naming_it(flowers, text, message):
    (flowers / "classnames.txt").write_text(text)
    with pytest.raises(data.DataError, match=message):
        build(flowers)


@pytest.mark.parametrize("text, a, b", [
    ("rose a rose\nsun-flower a  rose\ntulip_red tulip\n", "'a rose' (folder 'rose')", "'a rose' (folder 'sun-flower')"),
    ("rose Rose\nsun-flower sunflower\ntulip_red rose\n", "'Rose' (folder 'rose')", "'rose' (folder 'tulip_red')"),
    ("rose R&amp;D rose\nsun-flower r&d ROSE\ntulip_red tulip\n", "'R&amp;D rose' (folder 'rose')",
     "'r&d ROSE' (folder 'sun-flower')"),  # HTML entities: CLIP's cleaning unescapes them
])
def test_class_names_that_clip_reads_as_one_are_refused_naming_the_file_and_both(flowers, text, a, b):
    (flowers / "classnames.txt").write_text(text)
    with pytest.raises(data.DataError) as e:
        build(flowers)
    message = str(e.value)
    assert message.startswith(f"{flowers / 'classnames.txt'}: the class names {a} and {b} are one name to CLIP")
    assert "\n" not in message


def test_class_folders_that_give_one_class_name_are_refused_naming_both(tmp_path):
    folder = make_folder(tmp_path / "f", classes=("Sea_Lake", "forest", "sea-lake"), per_class=4)
    with pytest.raises(data.DataError, match=r"class folders 'Sea_Lake' and 'sea-lake' give one class name to CLIP "
                                             r"\('Sea Lake'\): .* name them apart in classnames.txt"):
        build(folder)
    (folder / "classnames.txt").write_text("Sea_Lake sea\nsea-lake lake\nforest forest\n")
    assert build(folder).classnames == ["sea", "forest", "lake"]


def test_same_names_compares_as_clips_tokenizer_reads():
    assert imagefolder.same_names(["cat", "dog", "Cat "]) == (0, 2)
    assert imagefolder.same_names(["a\u00a0cat", "dog", "a cat"]) == (0, 2)
    assert imagefolder.same_names(["cat", "cats", "dog"]) is None
    # the same tokens, not the same cleaned text: digits are read one by one, and spaces beside punctuation dropped
    assert imagefolder.same_names(["type 12", "type 1 2"]) == (0, 1)
    assert imagefolder.same_names(["dog", "sea-lake", "sea - lake"]) == (1, 2)
    assert imagefolder.same_names(["n.a.", "n. a."]) == (0, 1)
    assert imagefolder.same_names(["ab", "a b", "type 12", "type 13"]) is None  # other tokens: told apart


# ---------------------------------------------------------------------------------------------- the generated split

def test_generated_split_is_coops_50_20_30_saved_and_reused(flowers, monkeypatch):
    with pytest.warns(UserWarning, match=r"generated the split .*split\.json of 3 classes .*seed 1\): 15 train, "
                                         r"6 val, 9 test"):
        ds = data.build_dataset(str(flowers), None, shots=0)
    for y in range(3):
        assert [sum(it.label == y for it in s) for s in (ds.train, ds.val, ds.test)] == [5, 2, 3]
    raw = json.loads((flowers / "split.json").read_text())
    # CoOp's reader takes split["train"] etc. as [path, label, class name] and ignores other keys
    assert [[os.path.join(str(flowers), p), y, c] for p, y, c in raw["train"]] == [list(it) for it in ds.train]
    assert raw["generated"]["seed"] == data.SPLIT_SEED and raw["generated"]["images"] == 30
    assert not list(flowers.glob(".*tmp"))
    monkeypatch.setattr(data, "split_classes", lambda *a, **k: pytest.fail("the saved split should be reused"))
    again = build(flowers)
    assert (again.train, again.val, again.test) == (ds.train, ds.val, ds.test)


def test_generated_split_is_deterministic(tmp_path):
    a = build(make_folder(tmp_path / "a"))
    b = build(make_folder(tmp_path / "b"))
    assert (tmp_path / "a" / "split.json").read_bytes() == (tmp_path / "b" / "split.json").read_bytes()
    assert [os.path.relpath(it.impath, tmp_path / "a") for it in a.test] == [
        os.path.relpath(it.impath, tmp_path / "b") for it in b.test]
    # not merely sorted: the images are shuffled per class before the cut
    assert [it.impath for it in a.train] != sorted(it.impath for it in a.train)


def test_an_added_image_is_detected_in_one_line(flowers):
    build(flowers)
    jpeg(flowers / "rose" / "new.jpg", seed=999)
    with pytest.raises(data.DataError) as e:
        build(flowers)
    message = str(e.value)
    assert "\n" not in message
    assert f"{flowers} changed since its split {flowers / 'split.json'} was generated: 1 image added (e.g. " \
           "rose/new.jpg)" in message
    assert f"delete {flowers / 'split.json'} and {flowers / 'split_fewshot'}" in message
    (flowers / "split.json").unlink()  # as the message says: a new split, which lists the new image
    ds = build(flowers)
    assert str(flowers / "rose" / "new.jpg") in [it.impath for it in ds.train + ds.val + ds.test]


def test_removed_and_added_images_and_new_classes_are_counted(flowers):
    build(flowers)
    (flowers / "tulip_red" / "003.jpg").unlink()
    (flowers / "rose" / "001.jpg").unlink()
    make_folder(flowers, classes=("daisy",), per_class=4)
    with pytest.raises(data.DataError, match=r"4 images added \(e\.g\. daisy/000\.jpg\), 2 removed \(e\.g\. "
                                             r"rose/001\.jpg\)"):
        build(flowers)


def test_a_replaced_image_of_another_size_is_detected(flowers):
    build(flowers)
    jpeg(flowers / "rose" / "002.jpg", seed=5, size=32)
    with pytest.raises(data.DataError, match="no image added or removed, but some were replaced or edited"):
        build(flowers)


def test_a_copy_that_changes_modification_times_keeps_its_split(flowers):
    """cp -r, git, zip and tar do not keep each image's mtime to the nanosecond: the fingerprint (path, size) must
    not hold it, or a valid split would be refused (docs/reliability.md: an edit to the same size goes unseen)."""
    ds = build(flowers)
    for image in flowers.rglob("*.jpg"):
        os.utime(image, ns=(10**18 + 123, 10**18 + 123))
    again = build(flowers)
    assert (again.train, again.val, again.test) == (ds.train, ds.val, ds.test)


def test_the_fewshot_cache_and_other_files_do_not_change_the_fingerprint(flowers):
    build(flowers, shots=2)
    assert (flowers / "split_fewshot" / "shot_2-seed_1.json").is_file()
    (flowers / "notes.txt").write_text("mine")
    (flowers / "rose" / "Thumbs.db").write_text("x")
    ds = build(flowers, shots=2)
    assert ds.classnames == ["rose", "sun flower", "tulip red"]


def test_a_damaged_generated_record_is_refused(flowers):
    build(flowers)
    raw = json.loads((flowers / "split.json").read_text())
    raw["generated"] = "yes"
    (flowers / "split.json").write_text(json.dumps(raw))
    with pytest.raises(data.DataError, match="'generated' should be a record with a 'sha256' fingerprint"):
        build(flowers)


# ---------------------------------------------------------------------------------------------- your own split

def test_your_own_split_json_is_used_as_it_is(flowers):
    split = {"train": [["rose/000.jpg", 0, "rose"], ["tulip_red/000.jpg", 1, "tulip_red"]],
             "val": [],
             "test": [["rose/001.jpg", 0, "rose"], ["tulip_red/001.jpg", 1, "tulip_red"]]}
    (flowers / "split.json").write_text(json.dumps(split))
    jpeg(flowers / "rose" / "extra.jpg")  # not in the split: no fingerprint, so nothing to compare
    ds = build(flowers)
    assert ds.classnames == ["rose", "tulip red"]
    assert [it.impath for it in ds.test] == [str(flowers / "rose" / "001.jpg"), str(flowers / "tulip_red" / "001.jpg")]
    assert json.loads((flowers / "split.json").read_text()) == split  # never rewritten


def test_your_own_split_json_naming_a_missing_image_is_refused(flowers):
    split = {"train": [["rose/000.jpg", 0, "rose"]], "val": [], "test": [["rose/gone.jpg", 0, "rose"]]}
    (flowers / "split.json").write_text(json.dumps(split))
    with pytest.raises(data.DataError, match=r"1 of 1 test images of My_Flowers are missing or unreadable: .*gone"):
        build(flowers)


def test_your_own_split_json_with_classes_lacking_test_images_names_them(flowers):
    split = {"train": [["rose/000.jpg", 0, "rose"], ["tulip_red/000.jpg", 1, "tulip_red"]], "val": [],
             "test": [["rose/001.jpg", 0, "rose"]]}
    (flowers / "split.json").write_text(json.dumps(split))
    with pytest.raises(data.DataError, match=r"split\.json: 1 class\(es\) have no test images: 'tulip_red'"):
        build(flowers)


# ---------------------------------------------------------------------------------------------- checks

def test_classes_with_too_few_images_are_all_named(tmp_path):
    folder = make_folder(tmp_path / "f", classes=("a", "b", "c", "d"), per_class=(4, 3, 10, 1))
    with pytest.raises(data.DataError, match=rf"{tmp_path / 'f'}: 2 class folders hold too few images for CoOp's "
                                             r"50/20/30 split, which needs at least 4 per class: b \(3\), d \(1\)"):
        build(folder)
    assert not (folder / "split.json").exists()


def test_an_empty_class_folder_and_a_folder_without_classes_are_named(tmp_path):
    folder = make_folder(tmp_path / "f", classes=("a",), per_class=4)
    (folder / "empty").mkdir()
    with pytest.raises(data.DataError, match=r"1 class folder holds too few images .*: empty \(0\)"):
        build(folder)
    loose = tmp_path / "loose"
    jpeg(loose / "x.jpg")
    with pytest.raises(data.DataError, match=r"loose has no class folders: put each class's images in a folder"):
        build(loose)


def test_loose_images_and_other_files_are_left_out_with_a_warning(flowers):
    jpeg(flowers / "stray.jpg")
    (flowers / "rose" / "notes.txt").write_text("x")
    jpeg(flowers / "rose" / "deeper" / "nested.png")  # ImageFolder walks class folders
    with pytest.warns(UserWarning) as record:
        ds = data.build_dataset(str(flowers), None, shots=0)
    said = " | ".join(str(w.message) for w in record)
    assert "1 image(s) directly in" in said and "(e.g. stray.jpg)" in said
    assert "1 file(s) in the class folders" in said
    paths = [it.impath for it in ds.train + ds.val + ds.test]
    assert str(flowers / "rose" / "deeper" / "nested.png") in paths and len(paths) == 31


def test_an_unreadable_image_is_refused_before_training(flowers):
    (flowers / "rose" / "005.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(data.DataError, match=r"images of My_Flowers are missing or unreadable: .*005\.jpg"):
        build(flowers)


def test_base_to_new_needs_two_classes(tmp_path):
    folder = make_folder(tmp_path / "one", classes=("a",), per_class=4)
    assert build(folder, subsample="base").classnames == ["a"]
    with pytest.raises(data.DataError, match="one has 1 class.*new half is empty, so base-to-new needs at least 2"):
        build(folder, subsample="new")


def test_a_read_only_folder_still_works_and_says_the_split_is_not_saved(flowers, monkeypatch):
    def read_only(path, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(files, "write_json", read_only)
    with pytest.warns(UserWarning, match=r"could not save the generated split at .*split\.json \(.*Permission denied"):
        a = data.build_dataset(str(flowers), None, shots=0)
    assert not (flowers / "split.json").exists() and build(flowers).test == a.test  # the same split each run


# ---------------------------------------------------------------------------------------------- protocols

def test_few_shot_sampling_and_base_to_new_work_as_on_a_benchmark(flowers):
    full = build(flowers)
    few = build(flowers, shots=2, seed=3)
    assert sorted(Counter(it.label for it in few.train).values()) == [2, 2, 2] and set(few.train) <= set(full.train)
    cache = flowers / "split_fewshot" / "shot_2-seed_3.json"
    assert cache.is_file()
    assert build(flowers, shots=2, seed=3).train == few.train
    rng = random.Random(3)  # Dassl's sampler over the split's train, as for a benchmark
    assert few.train == data.generate_fewshot_dataset(full.train, 2, rng)
    base, new = build(flowers, shots=2, subsample="base"), build(flowers, shots=2, subsample="new")
    assert base.classnames == ["rose", "sun flower"] and new.classnames == ["tulip red"]
    assert {it.label for it in new.test} == {0} and all("tulip_red" in it.impath for it in new.test)


def test_a_template_replaces_the_default_and_a_bad_one_is_refused(flowers):
    ds = build(flowers, template="a satellite photo of {}.")
    assert ds.prompts()[0] == "a satellite photo of rose."
    assert build(flowers).template == "a photo of a {}."
    for bad in ("a photo", "{} and {}", "a {name}", "a {0", "{{}}"):
        with pytest.raises(data.DataError, match=r"should hold \{\} once, where the class name goes"):
            build(flowers, template=bad)


def test_a_template_also_replaces_a_benchmarks(tmp_path):
    from conftest import make_eurosat_like
    make_eurosat_like(tmp_path, classes=2, per_split=(2, 1, 1))
    ds = data.build_dataset("eurosat", tmp_path, shots=0, template="satellite {}")
    assert ds.template == "satellite {}" and ds.folder == ""


# ---------------------------------------------------------------------------------------------- path or name

def test_a_path_is_told_from_a_benchmark_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    make_folder(tmp_path / "eurosat", per_class=4)  # a folder that bears a benchmark's name
    make_folder(tmp_path / "birds", per_class=4)
    assert not data.is_folder("eurosat") and data.is_folder("./eurosat") and data.is_folder(str(tmp_path / "x"))
    assert data.is_folder("birds") and not data.is_folder("nowhere") and data.is_folder("~/nowhere")
    assert data.dataset_name("eurosat") == "eurosat" and data.dataset_name("./eurosat") == "eurosat_folder"
    assert data.dataset_name("birds/") == "birds" and data.dataset_name(".") == tmp_path.name.strip("._-")
    assert build("./eurosat").name == "eurosat_folder"
    with pytest.raises(data.DataError, match=r"unknown dataset 'nowhere'; valid names: .* \(or a folder of your own"):
        build("nowhere")
    with pytest.raises(data.DataError, match=r"nowhere does not exist: --data takes a benchmark name \(eurosat"):
        build("nowhere/")
    (tmp_path / "file.jpg").write_bytes(b"x")
    with pytest.raises(data.DataError, match=r"file\.jpg is a file: --data takes a folder of class folders"):
        build("./file.jpg")


def test_a_benchmark_name_beside_a_folder_of_that_name_warns(tmp_path, monkeypatch):
    from conftest import make_eurosat_like
    make_eurosat_like(tmp_path / "root", classes=2, per_split=(2, 1, 1))
    make_folder(tmp_path / "work" / "eurosat", per_class=4)
    monkeypatch.chdir(tmp_path / "work")
    with pytest.warns(UserWarning, match=r"--data eurosat is the benchmark eurosat, not the folder .*give it as a "
                                         r"path: --data \./eurosat"):
        ds = data.build_dataset("eurosat", tmp_path / "root", shots=0)
    assert ds.name == "eurosat" and ds.classnames == ["class 0", "class 1"]
    monkeypatch.chdir(tmp_path / "root")  # the benchmark's own folder under a root of "." is no ambiguity
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        data.build_dataset("eurosat", ".", shots=0)


@pytest.mark.parametrize("name, expected", [("My Flowers", "My_Flowers"), ("a/b/x y!z", "x_y_z"),
                                            ("..hidden", "hidden"), ("dtd", "dtd_folder"), ("?!", "images")])
def test_folder_name_is_short_and_safe(tmp_path, name, expected):
    assert data.folder_name(tmp_path / name) == expected


def test_describe_change_phrases():
    listing = {"a/1.jpg": 1, "a/2.jpg": 2}
    assert imagefolder.describe_change(["a/1.jpg", "a/3.jpg", "a/4.jpg"], listing) == \
        "1 image added (e.g. a/2.jpg), 2 removed (e.g. a/3.jpg)"
    assert imagefolder.describe_change(["a/1.jpg", "a/2.jpg", "a/3.jpg"], listing) == "1 image removed (e.g. a/3.jpg)"
    assert imagefolder.fingerprint(listing) != imagefolder.fingerprint({"a/1.jpg": 1, "a/2.jpg": 3})


def test_data_py_check_reads_a_folder_as_a_run_would(flowers, capsys):
    assert data.main(["--check", str(flowers)]) == 0
    out = capsys.readouterr().out
    assert "My_Flowers: ready, 3 classes (rose, sun flower, tulip red); 15 train, 6 val, 9 test images" in out
    assert (flowers / "split.json").is_file()
    jpeg(flowers / "rose" / "new.jpg", seed=999)
    assert data.main(["--check", str(flowers)]) == 1
    assert "error: " in capsys.readouterr().err
