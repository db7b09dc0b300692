"""Is one method's trade-off front dominated by another's points? With paired noise estimates.

A point is a summary row (method, lock, β, scale) with mean image and text alignment. Point P
dominates Q when P is at least as good on both axes and better on one. The report says, for
the method under test (Perfusion):

- its front: its points that none of its own points dominate;
- for every front point, the baseline points that dominate it;
- for every baseline point, the image-alignment gap at the baseline's text alignment: the baseline's
  image alignment minus the front's, linearly interpolated between the two front points around it
  (None outside the front's text range). Positive: the baseline lies above the front;
- for every baseline point, the paired difference to the front point nearest in text alignment, with
  its standard error over the (concept, prompt, seed) cases both were drawn on (same seeds and
  prompts, so the pairing removes most of the per-prompt spread).
"""

from __future__ import annotations

import math

from .evaluate import BASE_METHOD


def label(entry: dict) -> str:
    """'perfusion global β=0.5', 'custom-diffusion', 'lora ×0.5'."""
    parts = [entry["method"]]
    if entry.get("lock"):
        parts.append(entry["lock"])
    if entry.get("beta") is not None:
        parts.append(f"β={entry['beta']:g}")
    if entry.get("scale") is not None:
        parts.append(f"×{entry['scale']:g}")
    return " ".join(parts)


def dominates(p: dict, q: dict) -> bool:
    pi, pt, qi, qt = p["image_alignment"], p["text_alignment"], q["image_alignment"], q["text_alignment"]
    return pi >= qi and pt >= qt and (pi > qi or pt > qt)


def front(points: list[dict]) -> list[dict]:
    """The points no other point of the list dominates, by increasing text alignment."""
    kept = [p for p in points if not any(dominates(q, p) for q in points if q is not p)]
    return sorted(kept, key=lambda p: p["text_alignment"])


def image_gap(point: dict, front_points: list[dict]) -> float | None:
    """point's image alignment minus the front's (interpolated) at the point's text alignment."""
    x = point["text_alignment"]
    for left, right in zip(front_points, front_points[1:]):
        if left["text_alignment"] <= x <= right["text_alignment"]:
            span = right["text_alignment"] - left["text_alignment"]
            w = 0.0 if span == 0 else (x - left["text_alignment"]) / span
            return point["image_alignment"] - ((1 - w) * left["image_alignment"] + w * right["image_alignment"])
    if len(front_points) == 1 and front_points[0]["text_alignment"] == x:
        return point["image_alignment"] - front_points[0]["image_alignment"]
    return None


def paired_difference(rows: list[dict], a: dict, b: dict, metric: str) -> tuple[float, float, int]:
    """Mean of (a − b) over the cases both points were measured on, its standard error, and the count."""

    def cases(entry: dict) -> dict[tuple, float]:
        key = (entry["method"], entry.get("lock"), entry.get("beta"), entry.get("scale"))
        return {
            (r["concept"], r["prompt"], r["seed"]): float(r[metric])
            for r in rows
            if (r["method"], r.get("lock"), r.get("beta"), r.get("scale")) == key
        }

    left, right = cases(a), cases(b)
    shared = sorted(set(left) & set(right))
    if not shared:
        return math.nan, math.nan, 0
    diffs = [left[k] - right[k] for k in shared]
    mean = sum(diffs) / len(diffs)
    if len(diffs) < 2:
        return mean, math.nan, len(diffs)
    var = sum((d - mean) ** 2 for d in diffs) / (len(diffs) - 1)
    return mean, math.sqrt(var / len(diffs)), len(diffs)


def front_report(summary: list[dict], rows: list[dict], method: str = "perfusion") -> dict:
    """See the module docstring. ``summary``: ``evaluate.summarize`` entries; ``rows``: the per-image rows."""
    ours = [e for e in summary if e["method"] == method]
    baselines = [e for e in summary if e["method"] not in (method, BASE_METHOD)]
    our_front = front(ours)
    front_entries = [
        {"point": label(p), "dominated_by": [label(b) for b in baselines if dominates(b, p)]} for p in our_front
    ]
    baseline_entries = []
    for b in baselines:
        nearest = min(our_front, key=lambda p: abs(p["text_alignment"] - b["text_alignment"])) if our_front else None
        entry = {
            "point": label(b),
            "image_gap_at_equal_text": None if (gap := image_gap(b, our_front)) is None else round(gap, 4),
            "dominates_front_points": [label(p) for p in our_front if dominates(b, p)],
            "dominated_by_front": any(dominates(p, b) for p in our_front),
        }
        if nearest is not None:
            entry["nearest_front_point"] = label(nearest)
            for metric in ("image_alignment", "text_alignment"):
                mean, se, n = paired_difference(rows, b, nearest, metric)
                entry[f"paired_{metric}_difference"] = round(mean, 4)
                entry[f"paired_{metric}_se"] = round(se, 4)
                entry["paired_cases"] = n
        baseline_entries.append(entry)
    return {
        "method": method,
        "front": front_entries,
        "baselines": baseline_entries,
        "front_dominated": any(e["dominated_by"] for e in front_entries),
    }


def markdown(report: dict) -> str:
    """The report as Markdown: the front, then one row per baseline point."""
    method = report["method"]
    lines = [
        f"{method}'s front (its points no other of its points dominates): "
        + ", ".join(f"{e['point']}" + (" — dominated" if e["dominated_by"] else "") for e in report["front"])
        + ".",
        "",
        f"| baseline point | dominates {method} front points | image gap at equal text alignment "
        f"| nearest front point | paired Δimage ± SE | paired Δtext ± SE |",
        "|---|---|---|---|---|---|",
    ]
    for e in report["baselines"]:
        gap = e["image_gap_at_equal_text"]
        lines.append(
            f"| {e['point']} | {', '.join(e['dominates_front_points']) or 'none'} | "
            f"{'outside the front' if gap is None else f'{gap:+.4f}'} | {e.get('nearest_front_point', '')} | "
            f"{e.get('paired_image_alignment_difference', math.nan):+.4f} ± {e.get('paired_image_alignment_se', math.nan):.4f} | "
            f"{e.get('paired_text_alignment_difference', math.nan):+.4f} ± {e.get('paired_text_alignment_se', math.nan):.4f} |"
        )
    lines += [
        "",
        f"{method}'s front dominated by a baseline point: **{'yes' if report['front_dominated'] else 'no'}**. "
        "Gap > 0: the baseline lies above the front at its own text alignment. Paired Δ: baseline minus the "
        "nearest front point over the same (concept, prompt, seed) cases; a |Δ| under ≈ 2 SE is within noise.",
        "",
    ]
    return "\n".join(lines)
