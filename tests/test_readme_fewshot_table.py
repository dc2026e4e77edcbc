"""The README's sandbox few-shot table is typed by hand from docs/sandbox_fewshot.csv, the report rows the
plot beside it is drawn from: this checks that every number in the table is that file's, to the digit shown,
and that every sweep in the file has its row (a row copied wrong, or a sweep added to the plot but not to the
table, fails here)."""

from __future__ import annotations

import csv
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHOTS = (1, 2, 4, 8, 16)
# README label (before any parenthesis) -> the sweep folder name its rows carry in the CSV
SWEEPS = {
    "zero-shot CLIP": "zeroshot-fewshot",
    "CoOp": "coop_base2new-fewshot",
    "CoCoOp": "cocoop_base2new-fewshot",
    "KgCoOp": "kgcoop_base2new-fewshot",
    "IVLP": "ivlp_base2new-fewshot",
    "MaPLe": "maple_base2new-fewshot",
    "linear probe": "linear_probe-fewshot",
    "CLIP-Adapter": "clip_adapter-fewshot",
    "Tip-Adapter": "tip_adapter-fewshot",
    "Tip-Adapter-F": "tip_adapter_f-fewshot",
    "GDA": "gda-fewshot",
    "CLIP-LoRA": "clip_lora-fewshot",
    "TCP": "tcp_base2new-fewshot",
    "ProGrad": "prograd_base2new-fewshot",
    "PromptSRC": "promptsrc_base2new-fewshot",
    "MoCoOp": "mocoop_base2new-fewshot",
}


def readme_rows() -> dict[str, list[str]]:
    """The table's rows under its header line: README label -> the five shot cells."""
    lines = (REPO / "README.md").read_text().splitlines()
    start = lines.index("| method | 1 shot | 2 shots | 4 shots | 8 shots | 16 shots | time per seed |") + 2
    rows = {}
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[re.sub(r"\s*\(.*", "", cells[0])] = cells[1:6]
    return rows


def csv_rows() -> dict[tuple[str, int], dict[str, str]]:
    with open(REPO / "docs" / "sandbox_fewshot.csv", newline="") as f:
        return {(r["sweep"], int(r["shots"])): r for r in csv.DictReader(f) if r["dataset"] != "Average"}


def test_every_number_of_the_readme_few_shot_table_is_the_csv_s() -> None:
    table, data = readme_rows(), csv_rows()
    assert set(table) == set(SWEEPS), "README rows and the label -> sweep map differ"
    assert {sweep for sweep, _ in data} == set(SWEEPS.values()), "a sweep in the CSV has no README row"
    for label, cells in table.items():
        for shots, cell in zip(SHOTS, cells):
            row = data.get((SWEEPS[label], shots))
            if cell == "—":
                assert row is None, f"{label} at {shots} shots: the CSV has {row['accuracy']}"
                continue
            assert row is not None, f"{label} at {shots} shots: {cell} in the README, no row in the CSV"
            mean, _, std = cell.partition(" ± ")
            assert mean == f"{float(row['accuracy']):.1f}", f"{label} at {shots} shots: {cell} vs {row}"
            if std:
                assert std == f"{float(row['accuracy_std']):.1f}", (
                    f"{label} at {shots} shots: {cell} vs {row}"
                )
            else:  # no ± is shown for one seed (or zero-shot, whose std is 0)
                assert row["seeds"] == "1" or float(row["accuracy_std"]) == 0.0, f"{label} at {shots}: {row}"
