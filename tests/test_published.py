"""The published zero-shot table is consistent with itself and with data.py, and `compare` flags a real gap."""

import pytest

import data
from toolbox import published


def test_every_published_row_is_a_base_to_new_dataset_of_data_py():
    assert set(published.ZERO_SHOT_BASE_TO_NEW) <= set(data.DATASETS)
    assert len(published.ZERO_SHOT_BASE_TO_NEW) == 11  # CoCoOp's 11 benchmarks, none missing
    assert published.ZERO_SHOT_BASE_TO_NEW["eurosat"] == {"base": 56.48, "new": 64.05, "hm": 60.03}  # issue #19


def test_the_table_agrees_with_itself_so_no_number_was_mistyped():
    rows = published.ZERO_SHOT_BASE_TO_NEW.values()
    for row in rows:  # each HM is its row's harmonic mean, rounded to two decimals
        assert abs(2 * row["base"] * row["new"] / (row["base"] + row["new"]) - row["hm"]) <= 0.005 + 1e-9
    base, new = (sum(row[k] for row in rows) / len(rows) for k in ("base", "new"))
    average = published.PUBLISHED_AVERAGE  # the table's Average row: means of base and new, HM of the means
    assert round(base, 2) == average["base"] and round(new, 2) == average["new"]
    assert round(2 * base * new / (base + new), 2) == average["hm"]


def test_compare_puts_the_published_row_beside_the_measured_one():
    line = published.compare("eurosat", 56.9, 63.3)
    assert "\n" not in line
    assert "measured base 56.90, new 63.30, HM 59.93" in line and "base 56.48, new 64.05, HM 60.03" in line
    assert "CHECK" not in line and "within 1 point" in line  # 0.42 and 0.75 points: within the default 1.0


@pytest.mark.parametrize("base, new, flagged", [(53.0, 64.05, "base -3.48"), (56.48, 65.56, "new +1.51"),
                                                (57.49, 62.00, "base +1.01, new -2.05")])
def test_compare_flags_each_accuracy_beyond_the_tolerance(base, new, flagged):
    line = published.compare("eurosat", base, new)
    assert f"CHECK: {flagged} points, beyond 1" in line


def test_compare_uses_the_tolerance_it_is_given():
    assert "CHECK" not in published.compare("dtd", 55.24, 59.90, tolerance=2.5)
    assert "CHECK: base +2.00" in published.compare("dtd", 55.24, 59.90, tolerance=1.5)


def test_compare_says_when_there_is_no_published_row_and_refuses_what_is_not_a_percentage():
    assert "no published zero-shot base-to-new row" in published.compare("imagenet_r", 50.0, 60.0)
    for bad in (101.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="new accuracy .*: expected a percentage in \\[0, 100\\]"):
            published.compare("eurosat", 56.48, bad)
