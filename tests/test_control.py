"""The positive control: supervised (upper reference) against scratch, paired over blocks."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from bench.reports import build_report
from bench.reports.control import positive_controls

REF = "supervised (upper reference)"


def _frame(gaps: dict[tuple[str, float], float], metric: str = "miou") -> pd.DataFrame:
    """scratch at 0.5 (seed 0) and 0.6 (seed 1) everywhere; supervised = scratch + the block's gap."""
    rows = []
    for (dataset, fraction), gap in gaps.items():
        for seed, base in ((0, 0.5), (1, 0.6)):
            rows.append({"method": "scratch", "dataset": dataset, "fraction": fraction, "seed": seed, metric: base,
                         "status": "ok"})
            rows.append({"method": REF, "method_name": "supervised", "dataset": dataset, "fraction": fraction,
                         "seed": seed, metric: base + gap, "status": "ok"})
    frame = pd.DataFrame(rows)
    frame["method_name"] = frame["method_name"].fillna(frame["method"])
    return frame


def _gaps(values: list[float]) -> dict[tuple[str, float], float]:
    keys = [(f"set{i // 2}", (0.05, 0.1)[i % 2]) for i in range(len(values))]
    return dict(zip(keys, values, strict=True))


def test_a_reference_ahead_in_every_block_passes_with_the_exact_signed_rank_p():
    gaps = [0.10, 0.20, 0.05, 0.15, 0.12, 0.08, 0.30, 0.01]
    (control,) = positive_controls(_frame(_gaps(gaps)), "miou", True, {REF: "upper"})
    assert (control.n, control.ahead) == (8, 8)
    assert control.mean == pytest.approx(sum(gaps) / 8)
    assert control.p == pytest.approx(1 / 2**8)  # all 8 signed ranks positive: one of 2^8 sign patterns
    assert control.interval[0] < control.mean < control.interval[1]
    assert control.passed and control.statement().startswith("Positive control passed")


def test_a_reference_not_significantly_ahead_fails_loudly():
    (control,) = positive_controls(_frame(_gaps([0.1, -0.1, -0.05, 0.1, 0.02, -0.03])), "miou", True,
                                   {REF: "upper"})
    assert control.ahead == 3 and control.p > 0.05 and not control.passed
    assert "FAILED" in control.statement()


def test_significantly_ahead_passes_even_when_one_block_is_behind():
    """Seven of eight blocks ahead, the eighth slightly behind: exact p = 2/256 < 0.05."""
    (control,) = positive_controls(_frame(_gaps([0.1, 0.2, 0.05, 0.15, 0.12, 0.08, 0.3, -0.01])), "miou", True,
                                   {REF: "upper"})
    assert control.ahead == 7 and control.p == pytest.approx(2 / 256) and control.passed


def test_too_few_blocks_are_not_conclusive_and_say_how_many_are_needed():
    (control,) = positive_controls(_frame(_gaps([0.2, 0.3, 0.25, 0.2])), "miou", True, {REF: "upper"})
    assert control.p == pytest.approx(1 / 16) and not control.passed  # 0.0625 > 0.05 whatever the data
    assert "not conclusive" in control.statement() and "at least 5 blocks" in control.statement()


def test_lower_is_better_metrics_count_a_smaller_distance_as_ahead():
    frame = _frame(_gaps([-3.0] * 6), metric="hd95")  # supervised's HD95 three pixels smaller
    (control,) = positive_controls(frame, "hd95", False, {REF: "upper"})
    assert control.ahead == 6 and control.mean == pytest.approx(-3.0) and control.passed
    assert control.interval[1] <= -3.0 + 1e-9


def test_no_scratch_no_control():
    frame = _frame(_gaps([0.1, 0.2]))
    assert positive_controls(frame[frame["method"] != "scratch"], "miou", True, {REF: "upper"}) == []


def test_the_report_puts_the_control_first_and_into_stats_json(tmp_path):
    frame = _frame(_gaps([0.10, 0.20, 0.05, 0.15, 0.12, 0.08]))
    frame["method"] = frame["method_name"]
    frame["reference"] = ["upper" if m == "supervised" else None for m in frame["method"]]
    other = frame[frame["method"] == "scratch"].assign(method="byol", method_name="byol",
                                                       miou=lambda f: f["miou"] + 0.01)
    csv = tmp_path / "results.csv"
    pd.concat([frame, other]).drop(columns=["method_name"]).to_csv(csv, index=False)
    summary = build_report(csv, tmp_path / "report", formats=("png",))
    assert summary.lines[0].startswith("Positive control passed")
    text = (tmp_path / "report" / "report.md").read_text()
    assert text.index("## Positive control") < text.index("## Ranks")
    stats = json.loads((tmp_path / "report" / "stats.json").read_text())
    assert stats["positive_control"][0]["passed"] is True
    assert stats["positive_control"][0]["ahead"] == 6
