"""`promptlab report`: table arithmetic against hand-computed values, published deltas, plots."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from promptlab.cli import main
from promptlab.report import (
    compare_sweeps,
    find_published,
    harmonic_mean,
    kendall_tau,
    load_published,
    load_sweep,
    mean_std,
    write_report,
)

# dataset -> seed -> (base accuracy, new accuracy)
B2N = {
    "oxford_pets": {1: (80.0, 60.0), 2: (82.0, 64.0)},
    "dtd": {1: (90.0, 30.0), 2: (94.0, 30.0)},
}


def _write_run(
    sweep: Path,
    dataset: str,
    shots: int,
    seed: int,
    acc: float,
    evals: dict[str, tuple[str, float]],
    method: str = "CoOp",
    arch: str = "ViT-B-16",
    subsample: str = "base",
) -> dict:
    d = sweep / dataset / f"shots{shots}" / f"seed{seed}"
    d.mkdir(parents=True)
    metrics = {
        "dataset": dataset,
        "shots": shots,
        "seed": seed,
        "accuracy": acc,
        "subsample": subsample,
        "method": method,
        "arch": arch,
        "pretrained": "openai",
        "wall_time_s": 60.0,
        "git_commit": "abc",
    }
    (d / "metrics.json").write_text(json.dumps(metrics))
    run = {
        "dir": d.relative_to(sweep).as_posix(),
        "dataset": dataset,
        "shots": shots,
        "seed": seed,
        "evaluations": [],
    }
    for name, (sub, value) in evals.items():
        file = f"eval_{name}_{sub}_test.json"
        (d / file).write_text(json.dumps({"dataset": name, "subsample": sub, "accuracy": value}))
        run["evaluations"].append({"dataset": name, "subsample": sub, "name": name, "file": file})
    return run


def _manifest(sweep: Path, protocol: str, runs: list[dict], overrides: list[str] | None = None) -> None:
    (sweep / "sweep.json").write_text(
        json.dumps({"protocol": protocol, "recipe": "r.yaml", "overrides": overrides or [], "runs": runs})
    )


@pytest.fixture
def b2n_sweep(tmp_path) -> Path:
    runs = [
        _write_run(tmp_path, ds, 16, s, b, {ds: ("new", n)})
        for ds, seeds in B2N.items()
        for s, (b, n) in seeds.items()
    ]
    _manifest(tmp_path, "base2new", runs)
    return tmp_path


def test_base2new_table_against_hand_values(b2n_sweep):
    rep = write_report(b2n_sweep, published="none")
    with open(rep.csv) as f:
        rows = {r["dataset"]: r for r in csv.DictReader(f)}
    pets, dtd, avg = rows["oxford_pets"], rows["dtd"], rows["Average (2 datasets)"]
    # oxford_pets: base 80, 82 -> 81 ± 1; new 60, 64 -> 62 ± 2; HM(81, 62) = 10044 / 143
    assert (float(pets["base"]), float(pets["base_std"]), float(pets["new"]), float(pets["new_std"])) == (
        81.0,
        1.0,
        62.0,
        2.0,
    )
    assert float(pets["hm"]) == pytest.approx(10044 / 143)
    hm1, hm2 = 2 * 80 * 60 / 140, 2 * 82 * 64 / 146
    assert float(pets["hm_std"]) == pytest.approx(abs(hm1 - hm2) / 2)
    # dtd: base 92 ± 2, new 30 ± 0, HM(92, 30) = 5520 / 122
    assert (float(dtd["base"]), float(dtd["base_std"]), float(dtd["new"]), float(dtd["new_std"])) == (
        92.0,
        2.0,
        30.0,
        0.0,
    )
    assert float(dtd["hm"]) == pytest.approx(5520 / 122)
    # average: base (81 + 92) / 2 = 86.5, new (62 + 30) / 2 = 46, HM(86.5, 46) = 7958 / 132.5 = 60.06,
    # not the mean of the per-dataset HMs (57.74)
    assert (float(avg["base"]), float(avg["new"])) == (86.5, 46.0)
    assert float(avg["hm"]) == pytest.approx(7958 / 132.5)
    assert abs(float(avg["hm"]) - (10044 / 143 + 5520 / 122) / 2) > 2
    assert avg["base_std"] == ""  # no spread over seeds for an average of datasets
    md = rep.markdown.read_text()
    assert "| oxford_pets | 1,2 | 81.00 ± 1.00 | 62.00 ± 2.00 |" in md and "| 86.50 | 46.00 | 60.06 |" in md
    assert "Published" not in md


def test_published_numbers_are_data_with_citations_and_deltas(b2n_sweep):
    table = load_published()["base2new"]
    assert table["coop"]["average"] == {"base": 82.69, "new": 63.22, "hm": 71.66}
    assert all(e["citation"] and e["url"].startswith("https://arxiv.org/") for e in table.values())
    for e in table.values():  # each published HM is the HM of its published averages (to rounding)
        if e.get("hm_of") == "per_dataset_mean":  # GDA: checked in tests/test_published.py
            continue
        assert harmonic_mean(e["average"]["base"], e["average"]["new"]) == pytest.approx(
            e["average"]["hm"], abs=0.011
        )
    records = load_sweep(b2n_sweep).records
    assert find_published("base2new", records)[0] == "coop"  # matched by method and backbone
    md = write_report(b2n_sweep).markdown.read_text()
    assert f"| {86.5 - 82.69:+.2f} | {46.0 - 63.22:+.2f} | {harmonic_mean(86.5, 46.0) - 71.66:+.2f} |" in md
    assert "CoCoOp), CVPR 2022, Table 1" in md and "average covers 2 datasets, the published one 11" in md
    with pytest.raises(KeyError, match="nope"):
        find_published("base2new", records, "nope")
    assert "HM of its Base and New averages" not in md
    gda = write_report(b2n_sweep, published="gda").markdown.read_text()  # an HM printed by another rule
    assert f"| {harmonic_mean(86.5, 46.0) - 78.72:+.2f} |" in gda
    assert "mean of the per-dataset HMs, as printed; the HM of its Base and New averages" in gda
    assert "(this report's rule) is 78.96." in gda


def test_fewshot_table_and_curves(tmp_path):
    accs = {
        "oxford_pets": {1: (85.0, 87.0), 16: (90.0, 91.0)},
        "dtd": {1: (40.0, 44.0), 16: (60.0, 62.0)},
        "eurosat": {1: (50.0, 44.0)},
    }
    runs = [
        _write_run(tmp_path, ds, k, s + 1, a, {}, subsample="all")
        for ds, by_k in accs.items()
        for k, vals in by_k.items()
        for s, a in enumerate(vals)
    ]
    _manifest(tmp_path, "fewshot", runs)
    rep = write_report(tmp_path)
    rows = {(r["dataset"], r["shots"]): r for r in rep.rows}
    assert (rows["dtd", 1]["accuracy"], rows["dtd", 1]["accuracy_std"]) == (42.0, 2.0)
    assert (
        rows["Average", 1]["accuracy"] == (86.0 + 42.0 + 47.0) / 3
        and rows["Average", 16]["accuracy"] == (90.5 + 61.0) / 2
    )
    md = rep.markdown.read_text()
    assert "| dataset | 1 shot | 16 shots |" in md and "| eurosat | 47.00 ± 3.00 | — |" in md
    assert "| Average | 58.33 | 75.75 (2 of 3) |" in md  # an average over fewer datasets says so
    pixels = np.asarray(Image.open(rep.plot).convert("L"))
    assert (
        pixels.shape[0] > 100 and (pixels < 128).mean() > 0.005
    )  # curves and axes were drawn, not a blank canvas


def test_crossdataset_averages_targets_and_domain_shifts_apart(tmp_path):
    evals = {
        1: {"dtd": 40.0, "eurosat": 50.0, "imagenetv2": 60.0, "imagenet_a": 50.0},
        2: {"dtd": 42.0, "eurosat": 52.0, "imagenetv2": 62.0, "imagenet_a": 48.0},
    }
    runs = [
        _write_run(
            tmp_path, "imagenet", 16, s, 70.0 + s, {k: ("all", v) for k, v in ev.items()}, subsample="all"
        )
        for s, ev in evals.items()
    ]
    _manifest(tmp_path, "crossdataset", runs)
    rows = {r["dataset"]: r for r in write_report(tmp_path).rows}
    assert rows["imagenet"]["role"] == "source" and rows["imagenet"]["accuracy"] == 71.5
    assert rows["Average (2 targets)"]["accuracy"] == (41.0 + 51.0) / 2
    assert rows["Average (2 domain shifts)"]["accuracy"] == (61.0 + 49.0) / 2
    assert rows["imagenet_a"]["role"] == "domain shift" and rows["imagenet_a"]["accuracy_std"] == 1.0


def test_missing_results_are_reported_not_averaged(b2n_sweep, capsys):
    (b2n_sweep / "dtd" / "shots16" / "seed2" / "eval_dtd_new_test.json").unlink()
    (b2n_sweep / "oxford_pets" / "shots16" / "seed2" / "metrics.json").unlink()
    assert main(["report", str(b2n_sweep), "--published", "none"]) == 0
    out = capsys.readouterr().out
    assert "incomplete**: 2 result(s) missing" in out
    assert (
        "| oxford_pets | 1 | 80.00 ± 0.00 | 60.00 ± 0.00 |" in out
        and "| dtd | 1 | 90.00 ± 0.00 | 30.00 ± 0.00 |" in out
    )


def test_runs_without_a_manifest_are_found(tmp_path):
    for s, (b, n) in B2N["dtd"].items():
        _write_run(tmp_path, "dtd", 16, s, b, {"dtd": ("new", n)})
    data = load_sweep(tmp_path)
    assert data.protocol == "base2new" and [r.evals for r in data.records] == [{"dtd": 30.0}, {"dtd": 30.0}]


def test_mean_std_and_harmonic_mean():
    assert mean_std([80.0, 82.0]) == (81.0, 1.0)  # population std, as Dassl's parse_test_res.py
    assert mean_std([1.0, 2.0, 3.0])[1] == pytest.approx(math.sqrt(2 / 3))
    assert all(math.isnan(v) for v in mean_std([]))
    assert harmonic_mean(82.69, 63.22) == pytest.approx(71.66, abs=0.01) and harmonic_mean(0.0, 0.0) == 0.0


def test_compare_sweeps_one_table_methods_as_rows(tmp_path, capsys):
    """`promptlab report A B`: each sweep's report plus one comparison (per dataset, then the averages)."""
    a, b, fs = tmp_path / "coop", tmp_path / "zeroshot", tmp_path / "fewshot"
    runs = [
        _write_run(a, ds, 16, s, bb, {ds: ("new", n)})
        for ds, seeds in B2N.items()
        for s, (bb, n) in seeds.items()
    ]
    _manifest(a, "base2new", runs)
    zs = {"oxford_pets": (70.0, 70.0), "dtd": (50.0, 40.0)}
    _manifest(
        b,
        "base2new",
        [_write_run(b, ds, 0, 1, x, {ds: ("new", y)}, method="ZeroShotCLIP") for ds, (x, y) in zs.items()],
    )
    assert main(["report", str(a), str(b)]) == 0
    printed = capsys.readouterr().out
    assert "| coop | CoOp | — | 16 | 1,2 | 81.00 ± 1.00 | 62.00 ± 2.00 |" in printed
    assert "| zeroshot | ZeroShotCLIP | — | 0 | 1 | 70.00 ± 0.00 | 70.00 ± 0.00 | 70.00 ± 0.00 |" in printed
    assert printed.index("### dtd") < printed.index("### Average (2 datasets)")
    assert "| zeroshot | ZeroShotCLIP | — | 0 |  | 60.00 | 55.00 |" in printed  # averages of the two datasets
    out = tmp_path / "comparison"
    with open(out / "comparison.csv") as f:
        rows = list(csv.DictReader(f))
    assert {(r["sweep"], r["dataset"]) for r in rows} >= {
        ("coop", "dtd"),
        ("zeroshot", "Average (2 datasets)"),
    }
    assert np.asarray(Image.open(out / "comparison.png")).std() > 0
    assert (a / "report.md").is_file() and (b / "report.md").is_file()  # each sweep's own report too
    _manifest(fs, "fewshot", [_write_run(fs, "dtd", 1, 1, 50.0, {}, subsample="all")])
    with pytest.raises(ValueError, match="different protocols"):
        compare_sweeps([a, fs], tmp_path / "cmp")


def test_compare_fewshot_sweeps_shots_as_columns(tmp_path):
    """Few-shot sweeps compare as one row per method with a column per shot count, and curves per method."""
    a, b = tmp_path / "coop", tmp_path / "linear"
    acc = {"coop": {1: (50.0, 54.0), 16: (80.0, 82.0)}, "linear": {1: (30.0, 30.0), 16: (70.0, 74.0)}}
    for sweep, method in ((a, "CoOp"), (b, "Linear")):
        runs = [
            _write_run(sweep, "dtd", k, seed, v, {}, method=method, subsample="all")
            for k, vals in acc[sweep.name].items()
            for seed, v in zip((1, 2), vals)
        ]
        _manifest(sweep, "fewshot", runs)
    rep = compare_sweeps([a, b], tmp_path / "cmp")
    text = rep.markdown.read_text()
    assert "| sweep | method | overrides | 1 shot | 16 shots |" in text
    assert "| coop | CoOp | — | 52.00 ± 2.00 | 81.00 ± 1.00 |" in text
    assert "| linear | Linear | — | 30.00 ± 0.00 | 72.00 ± 2.00 |" in text
    assert "### Average" not in text  # one dataset: the average would repeat it
    assert np.asarray(Image.open(rep.plot)).std() > 0
    xd = tmp_path / "xd"
    _manifest(
        xd, "crossdataset", [_write_run(xd, "dtd", 16, 1, 50.0, {"eurosat": ("all", 40.0)}, subsample="all")]
    )
    with pytest.raises(ValueError, match="only base2new or fewshot"):
        compare_sweeps([a, xd], tmp_path / "cmp2")


def test_comparison_shows_each_sweeps_overrides(tmp_path):
    """Two sweeps of one recipe that differ only by an override are told apart in the table."""
    a, b = tmp_path / "short", tmp_path / "long"
    for sweep, extra in ((a, ["train.epochs=2"]), (b, [])):
        _manifest(sweep, "base2new", [_write_run(sweep, "dtd", 16, 1, 80.0, {"dtd": ("new", 60.0)})], extra)
    text = compare_sweeps([a, b], tmp_path / "cmp").markdown.read_text()
    assert "| short | CoOp | train.epochs=2 | 16 | 1 |" in text
    assert "| long | CoOp | — | 16 | 1 |" in text


def _overlaps(a, b) -> bool:
    return a.x0 < b.x1 and b.x0 < a.x1 and a.y0 < b.y1 and b.y0 < a.y1


@pytest.mark.parametrize("protocol", ["base2new", "fewshot"])
def test_plot_legend_covers_no_data(protocol):
    """The legend sits outside every axes, so it cannot hide a bar or a curve (it used to sit over the bars)."""
    import matplotlib.pyplot as plt

    from promptlab.report import figure

    if protocol == "base2new":
        rows = [
            {
                "dataset": f"d{i}",
                **{k: 99.0 for k in ("base", "new", "hm")},
                **{k: 0.5 for k in ("base_std", "new_std", "hm_std")},
            }
            for i in range(3)
        ]
    else:
        rows = [
            {"dataset": "dtd", "sweep": s, "shots": k, "accuracy": 50.0 + k, "accuracy_std": 1.0}
            for s in ("coop", "linear")
            for k in (1, 2, 4, 8, 16)
        ]
    fig = figure(protocol, rows)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    legends = fig.legends + [ax.get_legend() for ax in fig.axes if ax.get_legend() is not None]
    assert len(legends) == 1
    box = legends[0].get_window_extent(renderer)
    for ax in fig.axes:
        if ax.axison:
            assert not _overlaps(box, ax.get_window_extent(renderer)), f"legend over the {protocol} axes"
    plt.close(fig)


def test_kendall_tau_against_hand_values():
    """tau-b = (C - D) / sqrt((n0 - ties_x)(n0 - ties_y)), counted by hand for each case."""
    assert kendall_tau([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx((5 - 1) / 6)  # one swapped pair
    assert kendall_tau([1, 2, 3], [30, 20, 10]) == pytest.approx(-1.0)
    assert kendall_tau([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(5 / math.sqrt(5 * 6))  # a tie in x
    assert kendall_tau([1, 1, 2, 2], [1, 2, 1, 2]) == pytest.approx(0.0)
    assert math.isnan(kendall_tau([1, 1, 1], [1, 2, 3]))  # a constant list ranks nothing
    with pytest.raises(ValueError, match="paired"):
        kendall_tau([1, 2], [1])
    import scipy.stats as scipy_stats  # a dependency of promptlab (metrics)

    x, y = [3.1, 1.0, 2.2, 2.2, 5.0, 4.4], [2.0, 1.0, 3.0, 2.5, 4.0, 4.0]
    assert kendall_tau(x, y) == pytest.approx(scipy_stats.kendalltau(x, y).statistic)


def test_comparison_ranks_methods_against_the_published_averages(tmp_path, capsys):
    """Three base2new sweeps of methods with published averages: the comparison gives Kendall's tau of
    their HMs against the published HMs (KgCoOp 77.00 > CoCoOp 75.83 > CoOp 71.66)."""
    hm_here = {"CoOp": 60.0, "CoCoOp": 70.0, "KgCoOp": 65.0}  # CoCoOp/KgCoOp swapped: C=2, D=1 -> 1/3
    dirs = []
    for method, acc in hm_here.items():
        d = tmp_path / method.lower()
        _manifest(d, "base2new", [_write_run(d, "dtd", 16, 1, acc, {"dtd": ("new", acc)}, method=method)])
        dirs.append(str(d))
    assert main(["report", *dirs]) == 0
    printed = capsys.readouterr().out
    assert "Kendall's tau-b between the two rankings: **0.33** over 3 methods" in printed
    assert "| KgCoOp | 65.00 | 77.00 |" in printed  # sorted by the published HM
    assert (tmp_path / "comparison" / "comparison.md").read_text().count("Kendall") == 1
    assert main(["report", *dirs[:2], "--out", str(tmp_path / "two")]) == 0
    assert "Kendall" not in capsys.readouterr().out  # two methods: no ranking to speak of


def test_fewshot_comparison_of_many_sweeps_stays_legible():
    """Twelve sweeps (the README's sandbox comparison): every line tells itself apart (colour and line style),
    and the legend lies inside the figure beside the axes instead of being cut off below them."""
    import matplotlib.pyplot as plt

    from promptlab.report import figure

    sweeps = [f"method{i}-fewshot" for i in range(12)]
    rows = [
        {"dataset": "sandbox_shapes", "sweep": s, "shots": k, "accuracy": 30.0 + i + k, "accuracy_std": 0.5}
        for i, s in enumerate(sweeps)
        for k in (1, 2, 4, 8, 16)
    ]
    fig = figure("fewshot", rows)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    (ax,) = [a for a in fig.axes if a.axison]
    lines = [c.lines[0] for c in ax.containers if c.get_label() in sweeps]  # errorbar: the data line
    styles = {(line.get_color(), line.get_linestyle()) for line in lines}
    assert len(styles) == 12
    (legend,) = fig.legends
    box, whole = legend.get_window_extent(renderer), fig.bbox
    assert box.x0 >= whole.x0 and box.x1 <= whole.x1 and box.y0 >= whole.y0 and box.y1 <= whole.y1
    assert not _overlaps(box, ax.get_window_extent(renderer))
    assert [t.get_text() for t in legend.get_texts()] == sweeps
    plt.close(fig)


def test_comparison_grows_from_an_earlier_reports_csv(tmp_path, capsys):
    """`promptlab report OLD/comparison.csv NEW_SWEEP ...`: the CSV's sweeps come back with their numbers
    (mean, std, seeds), a folder of the same sweep name replaces the CSV's rows, and a CSV that
    promptlab did not write is refused by name."""
    acc = {"coop": (50.0, 54.0), "linear": (30.0, 31.0), "tip": (40.0, 40.0)}
    sweeps = {}
    for name, vals in acc.items():
        sweeps[name] = tmp_path / "runs" / name
        runs = [
            _write_run(sweeps[name], "dtd", 4, seed, v, {}, method=name.title(), subsample="all")
            for seed, v in zip((1, 2), vals)
        ]
        _manifest(sweeps[name], "fewshot", runs)
    old = compare_sweeps([sweeps["coop"], sweeps["linear"]], tmp_path / "old")
    again = tmp_path / "again" / "coop"  # the same sweep name, re-run with other numbers
    _manifest(again, "fewshot", [_write_run(again, "dtd", 4, 3, 70.0, {}, method="Coop", subsample="all")])
    assert main(["report", str(old.csv), str(sweeps["tip"]), str(again), "--out", str(tmp_path / "new")]) == 0
    printed = capsys.readouterr().out
    assert "| linear | Linear | — | 30.50 ± 0.50 |" in printed  # from the CSV, std included
    assert "| tip | Tip | — | 40.00 ± 0.00 |" in printed
    assert "| coop | Coop | — | 70.00 ± 0.00 |" in printed and "52.00" not in printed  # replaced
    with open(tmp_path / "new" / "comparison.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["sweep"], r["seeds"]) for r in rows if r["dataset"] == "dtd"] == [
        ("linear", "1,2"),
        ("tip", "1,2"),
        ("coop", "3"),
    ]
    assert not (old.csv.parent / "report.md").exists()  # a CSV input gets no report of its own
    bad = tmp_path / "bad.csv"
    bad.write_text("name,score\na,1\n")
    with pytest.raises(ValueError, match=r"bad\.csv: not a CSV written by promptlab report"):
        compare_sweeps([bad, sweeps["tip"]], tmp_path / "x")
