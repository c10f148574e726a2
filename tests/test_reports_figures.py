"""What a reader sees: the drawn artists of the CD diagram, the plots' axes, publication output
(Type-42 fonts, byte-identical files, exact widths, captions outside the image) and the predictions figure."""

from __future__ import annotations

import json
import re

import numpy as np
import pandas as pd
import pytest
from matplotlib.image import imread

from bench.errors import BenchError
from bench.reports import plots
from bench.reports.cd import cd_figure, contiguous
from bench.reports.figures import WIDTHS, render, save
from bench.reports.predictions import (
    choose_images,
    mask_iou,
    pack_predictions,
    predictions_figure,
    read_predictions,
)
from bench.reports.ranks import rank_tables
from bench.reports.stats import cliques


def drawn_groups(fig) -> list[dict]:
    """The group artists of a CD figure with what they cover on screen (pixels, caps and dots included)."""
    ax = fig.axes[0]
    out = []
    for line in ax.lines:
        gid = line.get_gid() or ""
        if not gid.startswith("group:"):
            continue
        xy = ax.transData.transform(np.column_stack([line.get_xdata(), line.get_ydata()]))
        px_per_pt = fig.dpi / 72
        if line.get_marker() not in (None, "None", "", " "):
            pad = line.get_markersize() / 2 * px_per_pt
        else:
            pad = line.get_linewidth() / 2 * px_per_pt if line.get_solid_capstyle() in ("round", "projecting") else 0
        out.append({"members": gid[6:].split("|"), "x": xy[:, 0], "y": round(float(xy[0, 1]), 3),
                    "lo": xy[:, 0].min() - pad, "hi": xy[:, 0].max() + pad, "dots": line.get_marker() == "o"})
    return out


def assert_rows_do_not_touch(groups: list[dict]) -> None:
    rows: dict[float, list[dict]] = {}
    for g in groups:
        rows.setdefault(g["y"], []).append(g)
    for row in rows.values():
        row.sort(key=lambda g: g["lo"])
        for a, b in zip(row, row[1:], strict=False):
            assert b["lo"] - a["hi"] > 2.0, f"{a['members']} and {b['members']} fuse on one row"


def rank_x(fig, names: list[str]) -> dict[str, float]:
    """Screen x of each method's rank, read from the label leader lines (they start on the axis at y = 0)."""
    ax = fig.axes[0]
    out = {}
    for line in ax.lines:
        xs, ys = line.get_xdata(), line.get_ydata()
        if len(xs) == 3 and ys[0] == 0 and not (line.get_gid() or ""):
            label = next(t.get_text() for t in ax.texts
                         if t.get_position()[1] == ys[1] and abs(t.get_position()[0] - xs[2]) < 0.1)
            name = next(n for n in names if re.search(rf"(^|\s){re.escape(n)}(\s|$)", label))
            out[name] = ax.transData.transform((xs[0], 0))[0]
    return out


# --- item 1: bars that fuse ---------------------------------------------------------------------------

@pytest.mark.parametrize("width", list(WIDTHS.values()))
def test_separate_bars_on_one_row_do_not_fuse(width):
    # the case: k = 4, N = 13, CD = 1.301; A–C and B–D differ, A–D too: {A,B}, {B,C}, {C,D}
    ranks = {"A": 1.23, "B": 2.46, "C": 2.54, "D": 3.77}
    groups = cliques(ranks, lambda a, b: abs(ranks[a] - ranks[b]) >= 1.301)
    assert groups == [["A", "B"], ["B", "C"], ["C", "D"]]
    fig = cd_figure(ranks, 1.301, groups, width)
    fig.canvas.draw()
    drawn = drawn_groups(fig)
    assert sorted(g["members"] for g in drawn) == groups
    assert_rows_do_not_touch(drawn)
    x = rank_x(fig, list(ranks))
    for g in drawn:  # each bar spans exactly its members, so A–D is never shown as one group
        assert g["x"].min() == pytest.approx(x[g["members"][0]]) and g["x"].max() == pytest.approx(x[g["members"][-1]])


def test_bars_never_touch_on_random_rankings():
    rng = np.random.default_rng(11)
    for _ in range(25):
        k = int(rng.integers(3, 9))
        ranks = dict(zip([f"m{i}" for i in range(k)], np.sort(rng.uniform(1, k, k)).round(2), strict=True))
        cd = float(rng.uniform(0.3, 2.5))
        groups = cliques(ranks, lambda a, b, r=ranks, cd=cd: abs(r[a] - r[b]) >= cd)
        fig = cd_figure(ranks, cd, groups, float(rng.choice(list(WIDTHS.values()))))
        assert_rows_do_not_touch(drawn_groups(fig))


# --- item 2: groups that skip a method ------------------------------------------------------------------

def test_a_group_that_skips_a_method_is_drawn_with_dots_and_no_cd_bar():
    ranks = {"A": 1.0, "B": 2.0, "C": 3.0, "D": 4.0}
    sig = [{"A", "B"}, {"B", "D"}, {"A", "D"}]
    groups = cliques(ranks, lambda a, b: {a, b} in sig)
    assert ["A", "C"] in groups
    fig = cd_figure(ranks, None, groups, WIDTHS["1col"])
    drawn = {"|".join(g["members"]): g for g in drawn_groups(fig)}
    x = rank_x(fig, list(ranks))
    skip = drawn["A|C"]
    assert skip["dots"] and sorted(skip["x"]) == pytest.approx(sorted([x["A"], x["C"]]))
    assert not any(abs(v - x["B"]) < 1 for v in skip["x"])  # no dot on B
    assert not drawn["B|C"]["dots"] and not drawn["C|D"]["dots"]  # contiguous groups: bars
    assert not any(t.get_text().startswith("CD") for t in fig.axes[0].texts)
    assert_rows_do_not_touch(list(drawn.values()))


def noncontiguous_wilcoxon_table() -> pd.DataFrame:
    """A seeded 4-method table whose Wilcoxon–Holm groups include one that skips a method."""
    from bench.reports.stats import analyse

    rng = np.random.default_rng(0)
    for _ in range(2000):
        values = pd.DataFrame(rng.normal(size=(12, 4)) * rng.uniform(0.1, 2.0, 4) + rng.uniform(0, 2, 4),
                              columns=list("ABCD"))
        r = analyse(values, True, clique_test="wilcoxon")
        order = sorted(r["avg_ranks"], key=r["avg_ranks"].get)
        if any([order.index(m) for m in g] != list(range(order.index(g[0]), order.index(g[0]) + len(g)))
               for g in r["cliques"]):
            return values
    raise AssertionError("no such table found")


def test_wilcoxon_report_lists_and_draws_every_group(tmp_path):
    from bench.reports import build_report

    values = noncontiguous_wilcoxon_table()
    rows = [{"method": m, "dataset": f"d{i}", "score": v} for i, row in values.iterrows() for m, v in row.items()]
    pd.DataFrame(rows).to_csv(tmp_path / "w.csv", index=False)
    summary = build_report(tmp_path / "w.csv", tmp_path / "rep", metric="score", cliques="wilcoxon",
                           formats=("png",))
    stats = json.loads((tmp_path / "rep" / "stats.json").read_text())
    groups, ranks = stats["analyses"][0]["cliques"], stats["analyses"][0]["avg_ranks"]
    order = sorted(ranks, key=ranks.get)
    skipping = [g for g in groups if not contiguous(g, order)]
    assert skipping  # the constructed table has a group that skips a method
    drawn = {"|".join(g["members"]): g for g in drawn_groups(cd_figure(ranks, None, groups, WIDTHS["2col"]))}
    assert set(drawn) == {"|".join(g) for g in groups} and all(drawn["|".join(g)]["dots"] for g in skipping)
    md = (tmp_path / "rep" / "report.md").read_text()
    listed = re.search(r"Groups without a significant difference \(Wilcoxon signed-rank, Holm\): (.*)\.", md).group(1)
    assert listed.count("{") == len(groups) and all("{" + ", ".join(g) + "}" in listed for g in groups)
    assert "No CD bar is drawn" in md
    assert summary.out_dir == tmp_path / "rep"


# --- items 3 and 4: axes ---------------------------------------------------------------------------------

@pytest.fixture
def fractions_frame() -> pd.DataFrame:
    rng = np.random.default_rng(0)
    rows = []
    for m, q in zip(["scratch", "byol", "dicoh"], [0.0, 0.02, 0.04], strict=True):
        for d in ["Kvasir-SEG", "CVC-ClinicDB"]:
            for f in [0.01, 0.02, 0.05, 0.1, 1.0]:
                for s in range(3):
                    rows.append({"method": m, "dataset": d, "fraction": f, "seed": s, "status": "ok",
                                 "miou": 0.78 + q + 0.02 * np.log10(f) + rng.normal(0, 0.005),
                                 "hd95": 30 - 100 * q + rng.normal(0, 0.5)})
    return pd.DataFrame(rows)


@pytest.mark.parametrize("width", list(WIDTHS.values()))
def test_label_efficiency_uses_a_log_axis_with_readable_fraction_ticks(fractions_frame, width):
    fig = plots.label_efficiency(fractions_frame, "miou", width)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    panels = [ax for ax in fig.axes if ax.get_title()]
    assert len(panels) == (3 if width > 5 else 1)  # one column: the mean over the datasets alone
    for ax in panels:
        assert ax.get_xscale() == "log"
        assert list(ax.get_xticks()) == pytest.approx([0.01, 0.02, 0.05, 0.1, 1.0])
        labels = [t for t in ax.get_xticklabels() if t.get_text()]
        assert [t.get_text() for t in labels] == ["0.01", "0.02", "0.05", "0.1", "1"]
        boxes = [t.get_window_extent(renderer) for t in labels]
        assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1:])
    assert fig.get_size_inches()[0] == pytest.approx(width)


@pytest.mark.parametrize("metric, higher, words", [("miou", True, "higher is better"),
                                                   ("hd95", False, "lower is better")])
def test_dataset_strip_zooms_on_the_seeds_and_marks_the_direction(fractions_frame, metric, higher, words):
    fig = plots.dataset_strip(fractions_frame, metric, "Kvasir-SEG", WIDTHS["2col"], higher)
    ax = fig.axes[0]
    sub = fractions_frame[fractions_frame["dataset"] == "Kvasir-SEG"]
    lo, hi = ax.get_xlim()
    assert lo > 0.5 * sub[metric].min() and lo <= sub[metric].min() and hi >= sub[metric].max()  # not from 0
    points = np.concatenate([c.get_offsets() for c in ax.collections])
    assert len(points) == len(sub)  # every seed is a dot
    assert words in ax.get_xlabel()


# --- items 12 and 13: publication output -------------------------------------------------------------------

def test_figures_are_type42_deterministic_and_exactly_sized(tmp_path, fractions_frame):
    def draw(width):
        return plots.rank_chart(rank_tables(fractions_frame, "miou", True), width)

    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
    first = render("rank_chart", "caption", draw, tmp_path / "a" / "rank_chart")
    second = render("rank_chart", "caption", draw, tmp_path / "b" / "rank_chart")
    names = sorted(p.name for p in first.paths)
    assert names == sorted(f"rank_chart{s}.{e}" for s in ("", "_1col") for e in ("pdf", "svg", "png"))
    for a, b in zip(first.paths, second.paths, strict=True):
        assert a.read_bytes() == b.read_bytes(), a.name
    for width_name, width in WIDTHS.items():
        pdf = first.pdf(width_name).read_bytes()
        assert b"/FontFile2" in pdf and b"/Type3" not in pdf and b"CreationDate" not in pdf
        box = re.search(rb"/MediaBox \[\s*0 0 ([\d.]+) ([\d.]+)\s*\]", pdf)
        assert float(box.group(1)) == pytest.approx(width * 72, abs=0.5)
        png = imread(first.png(width_name))
        assert png.shape[1] == pytest.approx(width * 200, abs=1)
        svg = next(p for p in first.files[width_name] if p.suffix == ".svg").read_text()
        assert re.search(r'width="([\d.]+)pt"', svg).group(1) == f"{width * 72:g}" and "<dc:date>" not in svg


def test_cd_figure_has_no_caption_inside(tmp_path):
    ranks = {"A": 1.2, "B": 2.1, "C": 2.7}
    fig = cd_figure(ranks, 1.0, [["B", "C"]], WIDTHS["1col"])
    texts = [t.get_text() for t in fig.axes[0].texts]
    allowed = re.compile(r"^(\d+|CD = [\d.]+|.*\(\d\.\d\d\).*)$", re.S)
    assert all(allowed.match(t) for t in texts), texts
    assert not fig.texts and fig._suptitle is None
    paths = save(fig, tmp_path / "cd")
    assert [p.suffix for p in paths] == [".pdf", ".svg", ".png"]


# --- predictions (issue 14 §3) ------------------------------------------------------------------------------

def test_predictions_pack_round_trip_with_native_sizes(tmp_path):
    rng = np.random.default_rng(0)
    masks = [rng.random((5, 7)) > 0.5, rng.random((3, 11)) > 0.5, np.zeros((4, 4), bool)]
    path = pack_predictions(tmp_path / "c.npz", masks, ["a", "b", "c"], iou=[0.5, 0.25, 1.0])
    got, iou = read_predictions(path)
    assert list(got) == ["a", "b", "c"] and iou == {"a": 0.5, "b": 0.25, "c": 1.0}
    for m, g in zip(masks, got.values(), strict=True):
        np.testing.assert_array_equal(m, g)
    stack = rng.random((2, 6, 6)) > 0.5  # one stack of equal sizes: ``shape`` instead of ``shapes``
    np.savez(tmp_path / "s.npz", test_ids=np.array([3, 4]), shape=np.array(stack.shape), masks=np.packbits(stack))
    got, iou = read_predictions(tmp_path / "s.npz")
    np.testing.assert_array_equal(got["4"], stack[1])
    assert iou == {}
    np.savez(tmp_path / "bad.npz", test_ids=np.array([1]))
    with pytest.raises(BenchError, match="cannot read predictions"):
        read_predictions(tmp_path / "bad.npz")


def test_mask_iou_conventions_and_image_choice():
    a = np.zeros((4, 4), bool)
    b = a.copy()
    b[:2, :2] = True
    c = a.copy()
    c[:2] = True
    assert mask_iou(a, a) == 1.0 and mask_iou(b, a) == 0.0 and mask_iou(b, c) == pytest.approx(0.5)
    ious = {f"i{k}": v for k, v in enumerate([0.9, 0.1, 0.5, 0.7, 0.3, 0.0, 1.0])}
    assert choose_images(ious, 4) == ["i5", "i4", "i3", "i6"]  # lowest … highest, evenly spread
    assert choose_images(ious, 4, among=["i0", "i1"]) == ["i1", "i0"]


def test_predictions_figure_layout():
    rng = np.random.default_rng(1)
    ids = ["x", "y"]
    images = {i: rng.integers(0, 255, (3, 8, 10), dtype=np.uint8) for i in ids}
    truths = {i: rng.random((8, 10)) > 0.5 for i in ids}
    preds = {m: {i: rng.random((8, 10)) > 0.5 for i in ids} for m in ("scratch", "byol", "dicoh")}
    ious = {m: {i: mask_iou(preds[m][i], truths[i]) for i in ids} for m in preds}
    fig = predictions_figure(ids, preds, ious, WIDTHS["2col"], images, truths)
    assert len(fig.axes) == 2 * 5
    titles = [ax.get_title() for ax in fig.axes[:5]]
    assert titles == ["image", "ground truth", "scratch", "byol", "dicoh"]
    corner = [t.get_text() for ax in fig.axes for t in ax.texts]
    assert corner == [f"{ious[m][i]:.2f}" for i in ids for m in preds]
    assert fig.get_size_inches()[0] == pytest.approx(WIDTHS["2col"])
