"""``promptlab report SWEEP_DIR``: the tables and plots of a sweep, next to the published numbers.

Conventions (the papers' and their scripts'):

- per dataset, accuracies are the mean ± standard deviation over seeds; the standard deviation is
  the population one (``np.std``, ddof 0), as Dassl's ``tools/parse_test_res.py`` computes it;
- base-to-new: a dataset's HM is the harmonic mean of its seed-averaged Base and New; its "±" is
  the spread of the per-seed HMs. The average row averages Base and New over datasets and takes
  the HM of those two averages (not the mean of the per-dataset HMs), as the published tables do;
- cross-dataset: the average is over the target datasets (the source excluded), the
  domain-shift targets (ImageNetV2, -Sketch, -A, -R) averaged separately.

Outputs, in the sweep directory unless ``--out`` says otherwise: ``report.md`` (tables and the
provenance of the runs), ``<protocol>.csv`` (the same numbers, unrounded) and ``<protocol>.png``.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from promptlab.sweep import BENCHMARK_DATASETS, DOMAIN_SHIFT_DATASETS, MANIFEST

log = logging.getLogger(__name__)

PUBLISHED_FILE = Path(__file__).with_name("published.yaml")


# ---------------------------------------------------------------------- arithmetic
def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and population standard deviation (ddof 0, as Dassl's parse_test_res.py); NaN when empty."""
    if not values:
        return math.nan, math.nan
    m = sum(values) / len(values)
    return m, math.sqrt(sum((v - m) ** 2 for v in values) / len(values))


def harmonic_mean(base: float, new: float) -> float:
    """HM = 2BN / (B + N): high only when both base and new accuracies are high."""
    return 2 * base * new / (base + new) if base + new > 0 else 0.0


# ---------------------------------------------------------------------- reading a sweep
@dataclass
class RunRecord:
    """One finished run of a sweep: its metrics.json and its evaluation files by dataset name."""

    dataset: str
    shots: int
    seed: int
    dir: Path
    metrics: dict[str, Any]
    evals: dict[str, float] = field(default_factory=dict)  # eval dataset name -> accuracy


@dataclass
class SweepData:
    protocol: str
    records: list[RunRecord]
    missing: list[str]  # planned runs (or evaluations) without results yet
    manifest: dict[str, Any]


def load_sweep(sweep_dir: str | Path) -> SweepData:
    """Read a sweep directory: ``sweep.json`` and each run's ``metrics.json`` / ``eval_*.json``.

    Without a manifest (run directories made by hand with ``promptlab run``) every
    ``metrics.json`` below ``sweep_dir`` is read and the protocol is guessed from ``subsample``.
    """
    sweep_dir = Path(sweep_dir)
    manifest_path = sweep_dir / MANIFEST
    if manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text())
        runs = manifest["runs"]
    else:
        manifest = {}
        runs = [
            {"dir": p.parent.relative_to(sweep_dir).as_posix(), "evaluations": None}
            for p in sorted(sweep_dir.rglob("metrics.json"))
        ]
        if not runs:
            raise FileNotFoundError(f"{sweep_dir} has no {MANIFEST} and no metrics.json below it")
    records, missing = [], []
    for run in runs:
        d = sweep_dir / run["dir"]
        if not (d / "metrics.json").is_file():
            missing.append(run["dir"])
            continue
        m = json.loads((d / "metrics.json").read_text())
        rec = RunRecord(m["dataset"], int(m["shots"]), int(m["seed"]), d, m)
        evals = run["evaluations"]
        files = (
            [(e["name"], d / e["file"]) for e in evals]
            if evals is not None
            else [(json.loads(p.read_text())["dataset"], p) for p in sorted(d.glob("eval_*_test.json"))]
        )
        for name, path in files:
            if path.is_file():
                rec.evals[name] = float(json.loads(path.read_text())["accuracy"])
            else:
                missing.append(f"{run['dir']}/{path.name}")
        records.append(rec)
    protocol = manifest.get("protocol") or (
        "base2new"
        if any(r.metrics.get("subsample") == "base" for r in records)
        else "crossdataset"
        if any(r.evals for r in records)
        else "fewshot"
    )
    return SweepData(protocol, records, missing, manifest)


def _order(names: Sequence[str]) -> list[str]:
    """The papers' column order for known datasets, then the others in order of appearance."""
    known = [*BENCHMARK_DATASETS, *DOMAIN_SHIFT_DATASETS]
    unique = list(dict.fromkeys(names))
    return sorted(unique, key=lambda n: known.index(n) if n in known else len(known) + unique.index(n))


# ---------------------------------------------------------------------- tables (rows of plain dicts)
def base2new_rows(records: Sequence[RunRecord]) -> list[dict[str, Any]]:
    """Per (dataset, shots): Base, New, HM over seeds; then one average row per shots value."""
    rows: list[dict[str, Any]] = []
    for shots in sorted({r.shots for r in records}):
        per_ds = []
        for ds in _order([r.dataset for r in records if r.shots == shots]):
            runs = [r for r in records if r.shots == shots and r.dataset == ds and ds in r.evals]
            if not runs:
                continue
            base = [float(r.metrics["accuracy"]) for r in runs]
            new = [r.evals[ds] for r in runs]
            (b, b_sd), (n, n_sd) = mean_std(base), mean_std(new)
            hm_sd = mean_std([harmonic_mean(x, y) for x, y in zip(base, new)])[1]
            per_ds.append(
                {
                    "dataset": ds,
                    "shots": shots,
                    "seeds": ",".join(str(r.seed) for r in runs),
                    "base": b,
                    "base_std": b_sd,
                    "new": n,
                    "new_std": n_sd,
                    "hm": harmonic_mean(b, n),
                    "hm_std": hm_sd,
                }
            )
        if per_ds:
            b = sum(r["base"] for r in per_ds) / len(per_ds)
            n = sum(r["new"] for r in per_ds) / len(per_ds)
            rows += per_ds + [
                {
                    "dataset": f"Average ({len(per_ds)} datasets)",
                    "shots": shots,
                    "seeds": "",
                    "base": b,
                    "base_std": math.nan,
                    "new": n,
                    "new_std": math.nan,
                    "hm": harmonic_mean(b, n),
                    "hm_std": math.nan,
                }
            ]
    return rows


def fewshot_rows(records: Sequence[RunRecord]) -> list[dict[str, Any]]:
    """Long format: one row per (dataset, shots) with accuracy over seeds, then the average per shots."""
    rows = []
    for ds in _order([r.dataset for r in records]):
        for shots in sorted({r.shots for r in records if r.dataset == ds}):
            runs = [r for r in records if r.dataset == ds and r.shots == shots]
            m, sd = mean_std([float(r.metrics["accuracy"]) for r in runs])
            rows.append(
                {
                    "dataset": ds,
                    "shots": shots,
                    "seeds": ",".join(str(r.seed) for r in runs),
                    "accuracy": m,
                    "accuracy_std": sd,
                }
            )
    n_ds = len({r["dataset"] for r in rows})
    for shots in sorted({r["shots"] for r in rows}):
        vals = [r["accuracy"] for r in rows if r["shots"] == shots]
        rows.append(
            {
                "dataset": "Average",
                "shots": shots,
                "seeds": "",
                "accuracy": sum(vals) / len(vals),
                "accuracy_std": math.nan,
                "datasets": f"{len(vals)} of {n_ds}",
            }
        )
    return rows


def crossdataset_rows(records: Sequence[RunRecord]) -> list[dict[str, Any]]:
    """Per (source, shots): the source's own accuracy, each target's, and the two averages."""
    rows: list[dict[str, Any]] = []
    for source in _order([r.dataset for r in records]):
        for shots in sorted({r.shots for r in records if r.dataset == source}):
            runs = [r for r in records if r.dataset == source and r.shots == shots]
            seeds = ",".join(str(r.seed) for r in runs)
            m, sd = mean_std([float(r.metrics["accuracy"]) for r in runs])
            group = [
                {
                    "source": source,
                    "shots": shots,
                    "dataset": source,
                    "role": "source",
                    "seeds": seeds,
                    "accuracy": m,
                    "accuracy_std": sd,
                }
            ]
            for target in _order([t for r in runs for t in r.evals]):
                vals = [r.evals[target] for r in runs if target in r.evals]
                m, sd = mean_std(vals)
                role = "domain shift" if target in DOMAIN_SHIFT_DATASETS else "target"
                group.append(
                    {
                        "source": source,
                        "shots": shots,
                        "dataset": target,
                        "role": role,
                        "seeds": seeds,
                        "accuracy": m,
                        "accuracy_std": sd,
                    }
                )
            for role, label in (("target", "targets"), ("domain shift", "domain shifts")):
                vals = [g["accuracy"] for g in group if g["role"] == role]
                if vals:
                    group.append(
                        {
                            "source": source,
                            "shots": shots,
                            "dataset": f"Average ({len(vals)} {label})",
                            "role": "average",
                            "seeds": "",
                            "accuracy": sum(vals) / len(vals),
                            "accuracy_std": math.nan,
                        }
                    )
            rows += group
    return rows


# ---------------------------------------------------------------------- published numbers
def load_published(path: Path = PUBLISHED_FILE) -> dict[str, dict[str, Any]]:
    return yaml.safe_load(path.read_text()) or {}


def find_published(
    protocol: str, records: Sequence[RunRecord], key: str | None = None, path: Path = PUBLISHED_FILE
) -> tuple[str, dict[str, Any]] | None:
    """The published entry to compare with: ``key`` if given, else the one whose method and arch match the runs."""
    table = load_published(path).get(protocol, {})
    if key is not None:
        if key not in table:
            raise KeyError(
                f"no published {protocol} entry {key!r} in {path}; known: {', '.join(table) or '(none)'}"
            )
        return key, table[key]
    if not records:
        return None
    method, arch = records[0].metrics.get("method"), records[0].metrics.get("arch")
    for k, entry in table.items():
        if entry.get("method") == method and entry.get("arch") == arch:
            return k, entry
    return None


def kendall_tau(x: Sequence[float], y: Sequence[float]) -> float:
    """Kendall's tau-b of two paired score lists (ties in either list handled, as scipy's default).

    tau-b = (concordant - discordant) / sqrt((n0 - ties_x) * (n0 - ties_y)) over all n0 = n(n-1)/2
    pairs; nan when either list is constant or there are fewer than two pairs.
    """
    if len(x) != len(y):
        raise ValueError(f"kendall_tau needs paired lists, got {len(x)} and {len(y)} values")
    concordant = discordant = ties_x = ties_y = 0
    for i in range(len(x)):
        for j in range(i + 1, len(x)):
            dx, dy = x[i] - x[j], y[i] - y[j]
            ties_x += dx == 0
            ties_y += dy == 0
            if dx * dy > 0:
                concordant += 1
            elif dx * dy < 0:
                discordant += 1
    n0 = len(x) * (len(x) - 1) // 2
    denom = math.sqrt((n0 - ties_x) * (n0 - ties_y))
    return (concordant - discordant) / denom if denom else math.nan


def published_ranking(
    hm_by_method: dict[str, float], path: Path = PUBLISHED_FILE
) -> tuple[float, list[tuple[str, float, float]]] | None:
    """How well a set of methods' HMs ranks like the published base-to-new averages.

    ``hm_by_method`` maps a PromptModule class name (as metrics.json records it) to the HM it got
    here, on whatever backbone and data (the sandbox, typically). Each is paired with the published
    11-dataset average HM of the same method (``published.yaml``; ViT-B/16 when several backbones are
    listed). Returns Kendall's tau-b over the methods that have a published entry, and the pairs
    (method, HM here, published HM) sorted by the published HM; ``None`` with fewer than 3 such methods,
    where a ranking says nothing.
    """
    table = load_published(path).get("base2new", {})
    published: dict[str, float] = {}
    for entry in table.values():
        method = entry.get("method")
        if method in hm_by_method and (method not in published or entry.get("arch") == "ViT-B-16"):
            published[method] = float(entry["average"]["hm"])
    pairs = sorted(((m, hm_by_method[m], published[m]) for m in published), key=lambda p: -p[2])
    if len(pairs) < 3:
        return None
    return kendall_tau([p[1] for p in pairs], [p[2] for p in pairs]), pairs


def ranking_markdown(rows: Sequence[dict[str, Any]]) -> str:
    """The comparison's sentence on ranking agreement: one HM per sweep (its average over datasets, or
    its one dataset), one sweep per method; empty when fewer than 3 methods have published numbers."""
    hm: dict[str, float] = {}
    for sweep in dict.fromkeys(r["sweep"] for r in rows):
        mine = [r for r in rows if r["sweep"] == sweep]
        avg = [r for r in mine if r["dataset"].startswith("Average")]
        row = avg[0] if avg else mine[0] if len(mine) == 1 else None  # the average, or the one dataset
        if row is not None:
            hm.setdefault(str(row["method"]), float(row["hm"]))
    ranked = published_ranking(hm)
    if ranked is None:
        return ""
    tau, pairs = ranked
    body = [[m, f"{here:.2f}", f"{pub:.2f}"] for m, here, pub in pairs]
    return (
        "### Ranking against the published base-to-new averages\n\n"
        + _md_table(["method", "HM here", "published HM (11 datasets, ViT-B/16)"], body)
        + f"\n\nKendall's tau-b between the two rankings: **{tau:.2f}** over {len(pairs)} methods "
        "(1: the same order; 0: unrelated; -1: reversed)."
    )


# ---------------------------------------------------------------------- formatting
def _pm(m: float, sd: float) -> str:
    if math.isnan(m):
        return "—"
    return f"{m:.2f}" if math.isnan(sd) else f"{m:.2f} ± {sd:.2f}"


def _md_table(header: Sequence[str], body: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in body])


def base2new_markdown(rows: Sequence[dict[str, Any]], published: tuple[str, dict[str, Any]] | None) -> str:
    out = []
    for shots in dict.fromkeys(r["shots"] for r in rows):
        body = [
            [
                r["dataset"],
                r["seeds"],
                _pm(r["base"], r["base_std"]),
                _pm(r["new"], r["new_std"]),
                _pm(r["hm"], r["hm_std"]),
            ]
            for r in rows
            if r["shots"] == shots
        ]
        if published is not None:
            key, entry = published
            avg = next(r for r in rows if r["shots"] == shots and r["dataset"].startswith("Average"))
            pub = entry["average"]
            body.append(
                [
                    f"Published: {key} ({entry.get('arch', '?')}, 11 datasets)",
                    "",
                    f"{pub['base']:.2f}",
                    f"{pub['new']:.2f}",
                    f"{pub['hm']:.2f}",
                ]
            )
            body.append(
                [
                    "Δ (average − published)",
                    "",
                    f"{avg['base'] - pub['base']:+.2f}",
                    f"{avg['new'] - pub['new']:+.2f}",
                    f"{avg['hm'] - pub['hm']:+.2f}",
                ]
            )
        out.append(f"### {shots} shots\n\n" + _md_table(["dataset", "seeds", "Base", "New", "HM"], body))
    if published is not None:
        n_ds = len({r["dataset"] for r in rows if not r["dataset"].startswith("Average")})
        caveat = (
            ""
            if n_ds == len(BENCHMARK_DATASETS)
            else (
                f" Caution: the sweep's average covers {n_ds} datasets, the published one {len(BENCHMARK_DATASETS)}."
            )
        )
        if published[1].get("hm_of") == "per_dataset_mean":  # GDA prints the mean of its per-dataset HMs
            pub = published[1]["average"]
            caveat += (
                f" Its HM is the mean of the per-dataset HMs, as printed; the HM of its Base and New averages"
                f" (this report's rule) is {harmonic_mean(pub['base'], pub['new']):.2f}."
            )
        out.append(f"Published numbers: {published[1]['citation']} ({published[1].get('url', '')}).{caveat}")
    return "\n\n".join(out)


def _partial(row: dict[str, Any]) -> str:
    """ " (2 of 3)" after an average over fewer datasets than the table has."""
    n, _, total = str(row.get("datasets", "")).partition(" of ")
    return f" ({n} of {total})" if total and n != total else ""


def fewshot_markdown(rows: Sequence[dict[str, Any]]) -> str:
    shots = sorted({r["shots"] for r in rows})
    body = []
    for name in dict.fromkeys(r["dataset"] for r in rows):
        cells = {
            r["shots"]: _pm(r["accuracy"], r["accuracy_std"]) + _partial(r)
            for r in rows
            if r["dataset"] == name
        }
        body.append([name, *[cells.get(k, "—") for k in shots]])
    return _md_table(["dataset", *[f"{k} shot{'s' * (k != 1)}" for k in shots]], body)


def crossdataset_markdown(rows: Sequence[dict[str, Any]]) -> str:
    out = []
    for source, shots in dict.fromkeys((r["source"], r["shots"]) for r in rows):
        body = [
            [r["dataset"], r["role"], r["seeds"], _pm(r["accuracy"], r["accuracy_std"])]
            for r in rows
            if (r["source"], r["shots"]) == (source, shots)
        ]
        out.append(
            f"### source {source}, {shots} shots\n\n"
            + _md_table(["dataset", "role", "seeds", "accuracy"], body)
        )
    return "\n\n".join(out)


def provenance_markdown(data: SweepData) -> str:
    """Who made these numbers: method, backbone, weights, code versions, wall time."""

    def values(key: str) -> str:
        return ", ".join(sorted({str(r.metrics.get(key)) for r in data.records})) or "—"

    lines = [
        f"- protocol: {data.protocol}; recipe: {data.manifest.get('recipe', '—')}; overrides: {' '.join(data.manifest.get('overrides', [])) or '—'}",
        f"- method: {values('method')}; backbone: {values('arch')} ({values('pretrained')}); weights fingerprint: {values('weights_fingerprint')}",
        f"- promptlab {values('promptlab_version')}, git commit {values('git_commit')}, torch {values('torch')}",
        f"- runs: {len(data.records)} finished; total wall time {sum(float(r.metrics.get('wall_time_s', 0)) for r in data.records) / 3600:.2f} h",
    ]
    if data.missing:
        shown = ", ".join(data.missing[:10]) + (" ..." if len(data.missing) > 10 else "")
        lines.append(f"- **incomplete**: {len(data.missing)} result(s) missing: {shown}")
    return "\n".join(lines)


def write_csv(path: Path, rows: Sequence[dict[str, Any]]) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(
            f, fieldnames=list(dict.fromkeys(k for r in rows for k in r)) or ["dataset"], restval=""
        )
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()})
    return path


# ---------------------------------------------------------------------- plots
def figure(protocol: str, rows: Sequence[dict[str, Any]]) -> Any:
    """The report's matplotlib figure (see :func:`plot`); legends sit outside the axes, never over data."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if protocol == "fewshot":
        names = list(dict.fromkeys(r["dataset"] for r in rows))
        sweeps = list(dict.fromkeys(r.get("sweep") for r in rows))
        cols = min(4, len(names))
        many = len(sweeps) > 3  # a long legend goes beside the panels, one entry per line
        fig, axes = plt.subplots(
            math.ceil(len(names) / cols),
            cols,
            figsize=(
                3.2 * cols + (3.4 if many else 0),
                max(2.8 * math.ceil(len(names) / cols), 0.3 * len(sweeps)),
            ),
            squeeze=False,
            layout="constrained",
        )
        for ax, name in zip(axes.flat, names):
            here = [r for r in rows if r["dataset"] == name]
            for sweep in dict.fromkeys(r.get("sweep") for r in here):  # one line per compared sweep
                pts = [r for r in here if r.get("sweep") == sweep]
                k = sweeps.index(sweep)  # the colour cycle has 10 colours: later lines are dashed
                ax.errorbar(
                    [r["shots"] for r in pts],
                    [r["accuracy"] for r in pts],
                    yerr=[0 if math.isnan(r["accuracy_std"]) else r["accuracy_std"] for r in pts],
                    marker="os^"[k // 10 % 3],
                    linestyle=["-", "--", ":"][k // 10 % 3],
                    capsize=3,
                    label=sweep,
                )
            ticks = sorted({r["shots"] for r in here})
            ax.set_xscale("log", base=2)
            ax.set_xticks(ticks, [str(k) for k in ticks])
            ax.set_title(name, fontsize=10)
            ax.set_xlabel("shots per class")
            ax.set_ylabel("accuracy (%)")
            ax.grid(alpha=0.3)
        for ax in list(axes.flat)[len(names) :]:
            ax.axis("off")
        if any(r.get("sweep") for r in rows):  # one legend for every panel, below them
            handles, labels = axes.flat[0].get_legend_handles_labels()
            if many:
                fig.legend(handles, labels, loc="outside right upper", fontsize=8)
            else:
                fig.legend(handles, labels, loc="outside lower center", ncols=min(len(labels), 3), fontsize=8)
    else:
        import numpy as np

        if protocol == "base2new":
            labels = [r["dataset"].split(" (")[0] for r in rows]
            series = [("Base", "base", "base_std"), ("New", "new", "new_std"), ("HM", "hm", "hm_std")]
        else:
            rows = [r for r in rows if r["role"] != "source"]
            labels = [r["dataset"] for r in rows]
            series = [("accuracy", "accuracy", "accuracy_std")]
        fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(rows) + 2), 4), layout="constrained")
        x = np.arange(len(rows))
        width = 0.8 / len(series)
        for i, (label, key, sd) in enumerate(series):
            err = [0 if math.isnan(r[sd]) else r[sd] for r in rows]
            ax.bar(
                x + (i - (len(series) - 1) / 2) * width,
                [r[key] for r in rows],
                width,
                yerr=err,
                capsize=2,
                label=label,
            )
        ax.set_xticks(x, labels, rotation=30, ha="right")
        ax.set_ylabel("accuracy (%)")
        fig.legend(loc="outside right upper")  # beside the axes: bars reach the top at any accuracy
        ax.grid(axis="y", alpha=0.3)
    return fig


def plot(protocol: str, rows: Sequence[dict[str, Any]], path: Path) -> Path:
    """base2new: Base/New/HM bars per dataset; fewshot: accuracy vs shots per dataset; crossdataset: bars."""
    import matplotlib.pyplot as plt

    fig = figure(protocol, rows)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------- the report
@dataclass
class Report:
    protocol: str
    rows: list[dict[str, Any]]
    markdown: Path
    csv: Path
    plot: Path | None


def write_report(
    sweep_dir: str | Path, out: str | Path | None = None, published: str | None = None
) -> Report:
    """Write ``report.md``, ``<protocol>.csv`` and ``<protocol>.png`` for a sweep directory.

    Args:
        sweep_dir: a directory made by ``promptlab sweep`` (or holding run directories).
        out: where to write (default: ``sweep_dir``).
        published: a key of ``published.yaml`` to compare with; ``"none"`` for no comparison;
            default: the entry whose method and backbone match the runs, if any.
    """
    data = load_sweep(sweep_dir)
    out = Path(out) if out is not None else Path(sweep_dir)
    out.mkdir(parents=True, exist_ok=True)
    if data.protocol == "base2new":
        rows = base2new_rows(data.records)
        pub = None if published == "none" else find_published("base2new", data.records, published)
        table = base2new_markdown(rows, pub)
    elif data.protocol == "fewshot":
        rows = fewshot_rows(data.records)
        table = fewshot_markdown(rows)
    else:
        rows = crossdataset_rows(data.records)
        table = crossdataset_markdown(rows)
    notes = {
        "base2new": "Mean ± population std over seeds. HM: harmonic mean of the seed-averaged Base and New (± std of the "
        "per-seed HMs); the average row's HM is the HM of the averaged Base and New, as in the papers.",
        "fewshot": "Top-1 accuracy (%), mean ± population std over seeds; the average is over the datasets run with that shot count.",
        "crossdataset": "Top-1 accuracy (%), mean ± population std over seeds; averages over the targets, source excluded.",
    }[data.protocol]
    md = out / "report.md"
    title = f"# {data.protocol} report: {Path(sweep_dir).resolve().name}"
    md.write_text(f"{title}\n\n{provenance_markdown(data)}\n\n{table}\n\n{notes}\n")
    csv_path = write_csv(out / f"{data.protocol}.csv", rows)
    png = plot(data.protocol, rows, out / f"{data.protocol}.png") if rows else None
    return Report(data.protocol, rows, md, csv_path, png)


_NUMERIC = {"shots": int, **{k: float for k in ("accuracy", "base", "new", "hm")}}


def _csv_value(key: str, text: str) -> Any:
    kind = _NUMERIC.get(key.removesuffix("_std"))
    if kind is None:
        return text
    return math.nan if text == "" else kind(text)


def load_report_csv(path: str | Path) -> tuple[str, list[dict[str, Any]]]:
    """Rows of a ``comparison.csv`` (or a sweep's ``<protocol>.csv``) that ``promptlab report`` wrote.

    Why: a comparison can then grow over time or across machines (the sweeps measured last month sit
    in the CSV, this week's are folders) without re-running anything. A sweep's own CSV has no
    ``sweep`` / ``method`` columns: they become its folder's name and "—".

    Raises:
        ValueError: the file is not such a CSV (no ``dataset`` and ``accuracy`` or ``base`` column).
    """
    path = Path(path)
    with open(path, newline="") as f:
        raw = list(csv.DictReader(f))
    columns = set(raw[0]) if raw else set()
    if "dataset" not in columns or not columns & {"accuracy", "base"}:
        raise ValueError(
            f"{path}: not a CSV written by promptlab report (needs a 'dataset' column and 'accuracy' "
            f"(fewshot) or 'base' (base2new); found {sorted(columns) or 'no rows'})"
        )
    protocol = "base2new" if "base" in columns else "fewshot"
    label = {"sweep": path.parent.name, "method": "—", "overrides": "—"}
    return protocol, [
        {**label, **{k: _csv_value(k, v or "") for k, v in r.items() if k is not None}} for r in raw
    ]


def _sweep_rows(sweep_dir: str | Path) -> tuple[str, list[dict[str, Any]]]:
    """A sweep's protocol and table rows, each labelled with the sweep's folder name and method.

    A ``.csv`` file stands for the sweeps whose rows it holds (:func:`load_report_csv`).
    """
    if Path(sweep_dir).suffix == ".csv":
        return load_report_csv(sweep_dir)
    data = load_sweep(sweep_dir)
    if data.protocol not in ("base2new", "fewshot"):
        raise ValueError(
            f"{sweep_dir}: a {data.protocol} sweep; only base2new or fewshot sweeps can be compared"
        )
    method = ", ".join(sorted({str(r.metrics.get("method")) for r in data.records}))
    table = base2new_rows if data.protocol == "base2new" else fewshot_rows
    overrides = " ".join(data.manifest.get("overrides", [])) or "—"  # what made this sweep differ
    label = {"sweep": Path(sweep_dir).resolve().name, "method": method, "overrides": overrides}
    return data.protocol, [{**label, **r} for r in table(data.records)]


def compare_sweeps(sweep_dirs: Sequence[str | Path], out: str | Path) -> Report:
    """One table over several sweeps of the same protocol, methods as rows (the papers' comparisons).

    base2new: per dataset (then the average over datasets) one row per sweep with Base / New / HM,
    and bars of each sweep's single dataset (or its average when it covers several). fewshot: per
    dataset (then the average) one row per sweep with a column per shot count, and accuracy-vs-shots
    curves with one line per sweep. Writes ``comparison.md``, ``comparison.csv`` and ``comparison.png``.

    Raises:
        ValueError: fewer than two sweeps, a cross-dataset sweep, or sweeps of different protocols.
    """
    if len(sweep_dirs) < 2:
        raise ValueError("compare needs at least two sweep directories")
    tables = [_sweep_rows(d) for d in sweep_dirs]
    protocols = {p for p, _ in tables}
    if len(protocols) > 1:
        raise ValueError(f"cannot compare sweeps of different protocols: {sorted(protocols)}")
    protocol = protocols.pop()
    rows: list[dict[str, Any]] = []
    for _, own in tables:  # a later input's sweep replaces the same-named sweep of an earlier CSV
        names = {r["sweep"] for r in own}
        rows = [r for r in rows if r["sweep"] not in names] + own
    sweeps = list(dict.fromkeys(r["sweep"] for r in rows))
    real = {
        s: {r["dataset"] for r in rows if r["sweep"] == s and not r["dataset"].startswith("Average")}
        for s in sweeps
    }
    single = all(len(ds) == 1 for ds in real.values())  # then the average tables repeat the dataset's
    datasets = [
        d for d in dict.fromkeys(r["dataset"] for r in rows) if not (single and d.startswith("Average"))
    ]
    datasets.sort(key=lambda d: d.startswith("Average"))  # per-dataset tables first, averages last
    sections = []
    for dataset in datasets:
        mine = [r for r in rows if r["dataset"] == dataset]
        if protocol == "base2new":
            header = ["sweep", "method", "overrides", "shots", "seeds", "Base", "New", "HM"]
            body = [
                [
                    r["sweep"],
                    r["method"],
                    r["overrides"],
                    str(r["shots"]),
                    r["seeds"],
                    _pm(r["base"], r["base_std"]),
                    _pm(r["new"], r["new_std"]),
                    _pm(r["hm"], r["hm_std"]),
                ]
                for r in mine
            ]
        else:
            shots = sorted({r["shots"] for r in mine})
            header = ["sweep", "method", "overrides", *[f"{k} shot{'s' * (k != 1)}" for k in shots]]
            body = []
            for sweep in dict.fromkeys(r["sweep"] for r in mine):
                cells = {
                    r["shots"]: _pm(r["accuracy"], r["accuracy_std"]) + _partial(r)
                    for r in mine
                    if r["sweep"] == sweep
                }
                first = next(r for r in mine if r["sweep"] == sweep)
                body.append([sweep, first["method"], first["overrides"], *[cells.get(k, "—") for k in shots]])
        sections.append(f"### {dataset}\n\n{_md_table(header, body)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    md = out / "comparison.md"
    note = "HM of the seed-averaged Base and New." if protocol == "base2new" else "Top-1 accuracy (%)."
    ranking = ranking_markdown(rows) if protocol == "base2new" else ""
    md.write_text(
        f"# {protocol} comparison\n\n"
        + "\n\n".join(sections)
        + f"\n\nMean ± population std over seeds; {note}\n"
        + (f"\n{ranking}\n" if ranking else "")
    )
    csv_path = write_csv(out / "comparison.csv", rows)
    if protocol == "base2new":  # one group of bars per sweep
        shown = [
            r
            for r in rows
            if r["dataset"] in (datasets if single else [d for d in datasets if d.startswith("Average")])
        ]
        png = plot("base2new", [{**r, "dataset": r["sweep"]} for r in shown], out / "comparison.png")
    else:  # one line per sweep in each dataset's panel
        png = plot("fewshot", [r for r in rows if r["dataset"] in datasets], out / "comparison.png")
    return Report(protocol, rows, md, csv_path, png)


def cmd_report(args: argparse.Namespace) -> int:
    if len(args.sweep_dir) > 1:  # each sweep's own report, then the comparison (printed)
        for d in args.sweep_dir:
            if Path(d).suffix != ".csv":  # a CSV is an earlier report's rows, not a sweep
                write_report(d, None, args.published)
        parent = Path(os.path.commonpath([Path(d).resolve() for d in args.sweep_dir]))
        rep = compare_sweeps(args.sweep_dir, args.out or parent / "comparison")
    else:
        rep = write_report(args.sweep_dir[0], args.out, args.published)
    print(rep.markdown.read_text())
    print(f"written: {rep.markdown}, {rep.csv}" + (f", {rep.plot}" if rep.plot else ""))
    return 0


def add_report_command(sub: Any) -> None:
    """Register ``promptlab report`` on the CLI's subparsers."""
    r = sub.add_parser(
        "report",
        help="Markdown/CSV tables and PNG plots of a sweep (mean ± std over seeds, HM, published deltas)",
    )
    r.add_argument(
        "sweep_dir",
        nargs="+",
        help="a sweep directory; several base2new or fewshot sweeps: also a comparison table",
    )
    r.add_argument(
        "--out",
        help="where to write report.md, <protocol>.csv, <protocol>.png (default: SWEEP_DIR); with several "
        "sweeps, comparison.{md,csv,png} (default: their common parent/comparison)",
    )
    r.add_argument(
        "--published",
        help="published.yaml entry to compare with (e.g. coop), or 'none' (default: match by method and backbone)",
    )
    r.set_defaults(func=cmd_report)
