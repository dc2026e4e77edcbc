"""tools/mutate.py --in-process: its bookkeeping (names, selection, mutmut's .meta verdicts, the table).

Nothing here runs mutmut or a mutant: the worker itself is checked by running it against mutmut's own
verdicts on the same mutants (issue 24's notes), which takes minutes, not a unit test's second.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def mutate():
    spec = importlib.util.spec_from_file_location("promptlab_tools_mutate", ROOT / "tools" / "mutate.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def test_function_of_names_the_function_or_method(mutate):
    assert mutate.function_of("promptlab.engine.x_lr_at__mutmut_3") == "lr_at"
    assert mutate.function_of("promptlab.engine.x_make_schedule__mutmut_120") == "make_schedule"
    assert (
        mutate.function_of("promptlab.engine.xǁFeatureBatchesǁ__iter____mutmut_2")
        == "FeatureBatches.__iter__"
    )
    assert mutate.function_of("promptlab.data.fewshot.x__draw__mutmut_1") == "_draw"


def test_select_mutants_filters_like_mutmut_run(mutate):
    names = [
        "promptlab.engine.x_lr_at__mutmut_1",
        "promptlab.engine.x_lr_at__mutmut_2",
        "promptlab.engine.x_make_schedule__mutmut_1",
        "promptlab.engine.xǁFeatureBatchesǁ__len____mutmut_1",
    ]
    assert mutate.select_mutants(names, []) == names
    assert mutate.select_mutants(names, ["*lr_at*"]) == names[:2]
    assert mutate.select_mutants(names, ["promptlab.engine.x_lr_at__mutmut_2", "*FeatureBatches*"]) == [
        names[1],
        names[3],
    ]
    assert mutate.select_mutants(names, ["*timm*"]) == []


def test_record_writes_mutmuts_exit_codes(mutate, tmp_path):
    """Verdicts land in the .meta file with the exit codes mutmut reads back (results, show, browse)."""
    meta = tmp_path / "engine.py.meta"
    keys = [f"promptlab.engine.x_lr_at__mutmut_{i}" for i in (1, 2, 3, 4)]
    meta.write_text(
        json.dumps(
            {
                "exit_code_by_key": dict.fromkeys(keys),
                "hash_by_function_name": {"x_lr_at": "abc"},
                "type_check_error_by_key": {},
                "durations_by_key": {},
                "estimated_durations_by_key": {},
            }
        )
    )
    results = [
        {"name": keys[0], "status": "killed", "rc": 1, "seconds": 2.5},
        {"name": keys[1], "status": "survived", "rc": 0, "seconds": 9.0},
        {"name": keys[2], "status": "timeout", "rc": 1, "seconds": 60.0},
        {"name": "promptlab.metrics.x_accuracy__mutmut_1", "status": "killed", "rc": 1, "seconds": 1.0},
    ]
    assert mutate.record(meta, results) == 3
    data = json.loads(meta.read_text())
    assert data["exit_code_by_key"] == {keys[0]: 1, keys[1]: 0, keys[2]: 36, keys[3]: None}
    assert data["durations_by_key"] == {keys[0]: 2.5, keys[1]: 9.0, keys[2]: 60.0}
    assert data["hash_by_function_name"] == {"x_lr_at": "abc"}  # mutmut's cache key is kept
    stats = pytest.importorskip("mutmut.stats")
    status = [stats.status_by_exit_code[data["exit_code_by_key"][k]] for k in keys]
    assert status == ["killed", "survived", "timeout", "not checked"]


def test_summary_counts_per_function_and_lists_survivors(mutate):
    results = [
        {"name": "promptlab.engine.x_lr_at__mutmut_1", "status": "killed"},
        {"name": "promptlab.engine.x_lr_at__mutmut_2", "status": "survived"},
        {"name": "promptlab.engine.x_lr_at__mutmut_3", "status": "crash"},
        {"name": "promptlab.engine.xǁFeatureBatchesǁ__len____mutmut_1", "status": "timeout"},
        {"name": "promptlab.engine.xǁFeatureBatchesǁ__len____mutmut_2", "status": "suspicious"},
    ]
    lines = mutate.summary(results).splitlines()
    assert lines[0].split() == ["function", "mutants", "killed", "survived", "timeout", "other"]
    rows = {line.split()[0]: [int(v) for v in line.split()[1:]] for line in lines[1:3]}
    assert rows == {"FeatureBatches.__len__": [2, 0, 0, 1, 1], "lr_at": [3, 2, 1, 0, 0]}
    assert lines[-2:] == ["1 survived:", "  promptlab.engine.x_lr_at__mutmut_2"]
