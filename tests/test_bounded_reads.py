"""Cases from this round's adversarial probe: small files we read whole (a class list, a split, a config) are
bounded before they are read; a folder given twice shares no run folders; a resumed run sees the same class names;
a record whose accuracy is not a percentage agreeing with its count is not tabulated."""

import os

import pytest

import data
import train
from toolbox import files, predictions, runs, splitfiles, tables

from test_own_images import build, make_folder


def sparse(path, size=20 * 2**30):
    """A file that claims `size` bytes and takes none on disk."""
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def test_read_bounded_refuses_a_large_file_and_what_is_not_a_regular_file(tmp_path):
    with pytest.raises(ValueError, match=r"is 20.0 GiB, more than the 1.0 MiB"):
        files.read_bounded(sparse(tmp_path / "big.txt"), 2**20, "list")
    os.symlink("/dev/zero", tmp_path / "zero.txt")
    with pytest.raises(ValueError, match=r"zero.txt is not a regular file"):
        files.read_bounded(tmp_path / "zero.txt", 2**20, "list")
    (tmp_path / "ok.txt").write_bytes(b"x" * 10)
    assert files.read_bounded(tmp_path / "ok.txt", 10) == b"x" * 10


def test_a_huge_classnames_txt_or_split_json_is_one_line(tmp_path):
    folder = make_folder(tmp_path / "flowers")
    sparse(folder / "classnames.txt")
    with pytest.raises(data.DataError, match=r"classnames.txt cannot be read: class names file .* is 20.0 GiB"):
        build(folder)
    with pytest.raises(data.DataError, match=r"split file .*split.json is 20.0 GiB"):
        splitfiles.read_json(sparse(tmp_path / "split.json"), "split file")


def test_a_class_name_longer_than_any_prompt_is_refused_before_tokenizing(tmp_path):
    folder = make_folder(tmp_path / "flowers")
    (folder / "classnames.txt").write_text("rose Rose\nsun-flower " + "a" * 5000 + "\ntulip_red Tulip\n")
    with pytest.raises(data.DataError, match=r"a class name of 5,000 characters"):
        build(folder)


def test_classes_from_a_huge_file_and_many_repeats_are_one_line(tmp_path):
    with pytest.raises(SystemExit, match=r"--classes .*huge.txt: cannot read it"):
        predictions.read_classes([str(sparse(tmp_path / "huge.txt"))])
    with pytest.raises(SystemExit, match=r"'a' given more than once"):
        predictions.read_classes([f"c{i}" for i in range(100_000)] + ["a", "a"])  # one pass, not quadratic


def test_one_folder_spelled_twice_or_two_folders_of_one_name_are_refused(tmp_path, monkeypatch):
    make_folder(tmp_path / "d1")
    make_folder(tmp_path / "other" / "d1")
    monkeypatch.chdir(tmp_path / "other")
    for spelling in (["../d1", str(tmp_path / "d1")], [str(tmp_path / "d1"), "d1"]):
        with pytest.raises(SystemExit) as e:
            train.parse_args(["--data", *spelling, "--device", "cpu"])
        assert e.value.code == 2


def test_the_data_fingerprint_holds_the_class_names(tmp_path):
    folder = make_folder(tmp_path / "flowers")
    cfg = train.settings_from(train.parse_args(["--data", str(folder), "--device", "cpu"]))
    datasets = train.protocol_datasets(cfg, 1)
    before = runs.data_fingerprint(cfg, datasets)
    train_set, eval_sets = datasets
    renamed = data.Dataset(train_set.name, [*train_set.classnames[::-1]], train_set.template, train_set.train)
    assert runs.data_fingerprint(cfg, (renamed, eval_sets)) != before


@pytest.mark.parametrize("split, ok", [({"accuracy": 50.0, "correct": 4, "n": 8}, True),
                                       ({"accuracy": float("nan")}, False), ({"accuracy": 99.0, "correct": 4, "n": 8}, False),
                                       ({"accuracy": 150.0}, False), ({"accuracy": "50"}, False)])
def test_only_a_percentage_that_agrees_with_its_count_is_tabulated(split, ok):
    assert tables._holds({"results": {"base": split}}, ["base"]) is ok
