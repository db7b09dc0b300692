"""keylocked.evaluation.pareto: dominance, the front, the gap at equal text alignment, paired noise."""

import math

import pytest

from keylocked.evaluation.pareto import dominates, front, front_report, image_gap, markdown, paired_difference


def point(method, image, text, beta=None, lock=None, scale=None):
    return {
        "method": method,
        "lock": lock,
        "beta": beta,
        "scale": scale,
        "image_alignment": image,
        "text_alignment": text,
    }


def test_dominates_needs_both_axes_at_least_as_good_and_one_better():
    assert dominates(point("a", 0.2, 0.2), point("b", 0.1, 0.2))
    assert not dominates(point("a", 0.2, 0.2), point("b", 0.2, 0.2))  # equal is not domination
    assert not dominates(point("a", 0.3, 0.1), point("b", 0.1, 0.2))  # a trade-off


def test_front_drops_dominated_points_and_sorts_by_text():
    points = [point("p", 0.15, 0.17, 0.5), point("p", 0.12, 0.19, 0.7), point("p", 0.10, 0.18, 0.9)]
    assert [p["beta"] for p in front(points)] == [0.5, 0.7]


def test_image_gap_interpolates_between_the_front_points_around_the_baseline():
    ours = front([point("p", 0.16, 0.17, 0.5), point("p", 0.12, 0.19, 0.7)])
    assert image_gap(point("cd", 0.15, 0.18), ours) == pytest.approx(0.15 - 0.14)
    assert image_gap(point("cd", 0.15, 0.20), ours) is None  # outside the front's text range


def test_paired_difference_uses_only_shared_cases():
    rows = [
        {"method": "a", "lock": None, "beta": None, "scale": None, "concept": "x", "prompt": p, "seed": 0, "m": v}
        for p, v in (("p1", 0.3), ("p2", 0.5), ("p3", 0.9))
    ] + [
        {"method": "b", "lock": "local", "beta": 0.7, "scale": None, "concept": "x", "prompt": p, "seed": 0, "m": v}
        for p, v in (("p1", 0.1), ("p2", 0.4))
    ]
    mean, se, n = paired_difference(rows, point("a", 0, 0), point("b", 0, 0, 0.7, "local"), "m")
    assert n == 2 and mean == pytest.approx(0.15) and se == pytest.approx(0.05)
    assert math.isnan(paired_difference(rows, point("a", 0, 0), point("c", 0, 0), "m")[0])


def test_front_report_flags_a_dominating_baseline_and_ignores_the_base_model():
    summary = [
        point("base", 0.10, 0.30),  # the reference point dominates nothing it is compared with
        point("perfusion", 0.15, 0.17, 0.5, "local"),
        point("perfusion", 0.12, 0.19, 0.7, "local"),
        point("custom-diffusion", 0.16, 0.18),
        point("lora", 0.05, 0.10, scale=1.0),
    ]
    report = front_report(summary, rows=[])
    assert report["front_dominated"]
    by_point = {e["point"]: e for e in report["baselines"]}
    assert by_point["custom-diffusion"]["dominates_front_points"] == ["perfusion local β=0.5"]
    assert by_point["custom-diffusion"]["image_gap_at_equal_text"] == pytest.approx(0.16 - 0.135)
    assert by_point["lora ×1"]["dominated_by_front"] and "base" not in by_point
    assert "dominated by a baseline point: **yes**" in markdown(report)
    summary[3] = point("custom-diffusion", 0.14, 0.18)  # now on the front's line: no domination
    report = front_report(summary, rows=[])
    assert not report["front_dominated"]
    assert "dominated by a baseline point: **no**" in markdown(report)
