"""published.yaml: every entry cited, and each base-to-new HM consistent with its Base and New averages.

The HM check catches transcription slips (a digit swapped in one of the three numbers); the papers
round their own HM, so a difference of 0.01 from the HM recomputed to 2 decimals is allowed.
"""

from pathlib import Path

import pytest

from promptlab.report import find_published, harmonic_mean, load_published

FEWSHOT_SHOTS = {1, 2, 4, 8, 16}


def _entries():
    return [
        (protocol, key, e) for protocol, table in load_published().items() for key, e in (table or {}).items()
    ]


def test_every_published_entry_has_a_citation_and_a_url():
    entries = _entries()
    assert entries and set(load_published()) <= {"base2new", "fewshot"}
    for protocol, key, e in entries:
        assert isinstance(e.get("citation"), str) and e["citation"].strip(), f"{protocol}.{key}: no citation"
        assert str(e.get("url", "")).startswith("https://"), f"{protocol}.{key}: no URL"
        assert e.get("method") and e.get("arch"), f"{protocol}.{key}: method/arch missing"


@pytest.mark.parametrize("key", sorted(load_published()["base2new"]))
def test_base2new_hm_is_the_harmonic_mean_of_base_and_new(key):
    entry = load_published()["base2new"][key]
    avg = entry["average"]
    if entry.get("hm_of") == "per_dataset_mean":  # GDA's table: the mean of its per-dataset HMs
        pairs = list(entry["per_dataset"].values())
        assert len(pairs) == 11, f"{key}: per_dataset lists {len(pairs)} datasets"
        for i, name in enumerate(("base", "new")):
            mean = sum(p[i] for p in pairs) / len(pairs)
            assert abs(round(mean, 2) - avg[name]) <= 0.01 + 1e-9, (
                f"{key}: {name} {avg[name]}, per_dataset {mean:.2f}"
            )
        recomputed = round(sum(harmonic_mean(b, n) for b, n in pairs) / len(pairs), 2)
        assert abs(recomputed - avg["hm"]) <= 0.01 + 1e-9, (
            f"{key}: HM {avg['hm']}, per-dataset mean {recomputed}"
        )
        return
    assert "hm_of" not in entry, f"{key}: hm_of {entry['hm_of']!r} (known: per_dataset_mean)"
    recomputed = round(harmonic_mean(avg["base"], avg["new"]), 2)
    assert abs(recomputed - avg["hm"]) <= 0.01 + 1e-9, (
        f"{key}: HM {avg['hm']} but HM(base, new) = {recomputed}"
    )


def _fewshot_problems(section: dict) -> list[str]:
    """Few-shot entries whose ``average`` is empty or keyed by anything but the protocol's shot counts."""
    return [
        f"fewshot.{key}: shots {set(e.get('average') or {})}"
        for key, e in section.items()
        if not e.get("average") or not set(e["average"]) <= FEWSHOT_SHOTS
    ]


def test_fewshot_entries_give_shots_as_keys():
    section = load_published().get("fewshot")
    assert isinstance(section, dict)  # present (empty until verified numbers exist), so entries have a home
    assert _fewshot_problems(section) == []
    bad = {"x": {"average": {3: 50.0}}, "y": {"average": {}}, "ok": {"average": {1: 60.0, 16: 70.0}}}
    assert _fewshot_problems(bad) == ["fewshot.x: shots {3}", "fewshot.y: shots set()"]


def test_hm_check_catches_a_transcription_slip():
    assert abs(round(harmonic_mean(82.48, 70.57), 2) - 76.16) > 0.01  # 70.75 with two digits swapped


def test_ivlp_entry_matches_the_method_name_runs_record():
    from promptlab.methods.ivlp import IVLP

    entry = load_published()["base2new"]["ivlp"]
    assert entry["method"] == IVLP.__name__ and entry["average"] == {"base": 84.21, "new": 71.79, "hm": 77.51}


def test_a_fewshot_section_does_not_change_the_base2new_match(tmp_path: Path):
    """find_published reads by protocol: a fewshot entry of the same method and arch is never picked for base2new."""

    class Rec:
        metrics = {"method": "CoOp", "arch": "ViT-B-16"}

    path = tmp_path / "published.yaml"
    path.write_text(
        "fewshot:\n"
        "  coop_fs: {method: CoOp, arch: ViT-B-16, average: {16: 80.0}, citation: c, url: https://x}\n"
        "base2new:\n"
        "  coop: {method: CoOp, arch: ViT-B-16, average: {base: 1, new: 1, hm: 1}, citation: c, url: https://x}\n"
    )
    assert find_published("base2new", [Rec()], path=path)[0] == "coop"
    assert find_published("fewshot", [Rec()], path=path)[0] == "coop_fs"
