"""The task table every serving backend selects tasks through: names vs indices, skipped records, hot add and remove.

Bundles here are written by hand (bundle.json, tasks/NAME.json and a task file with its sha256),
so each case states exactly which record is good, broken or foreign; the runtimes' own tests
(tests/serving/) run the same table through real graphs.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from metatt_deploy.common.errors import MetaTTError
from metatt_deploy.inference.formats import BUNDLE_JSON, TASKS_DIR
from metatt_deploy.inference.task_table import TaskTable

BUNDLE_ID = "0123456789abcdef" * 2


def write_task(bundle: Path, name: str, *, bundle_id: str = BUNDLE_ID, labels: tuple[str, ...] = ("neg", "pos")) -> None:
    """tasks/NAME.json and its one file, as merge --factored records them (the checks read only these fields)."""
    data = f"weights of {name}".encode()
    (bundle / TASKS_DIR / f"{name}.safetensors").write_bytes(data)
    record = {
        "task": name,
        "bundle_id": bundle_id,
        "labels": list(labels),
        "num_labels": len(labels),
        "shapes": {"head.weight": [len(labels), 4]},
        "files": {"safetensors": {"file": f"{name}.safetensors", "sha256": hashlib.sha256(data).hexdigest()}},
    }
    (bundle / TASKS_DIR / f"{name}.json").write_text(json.dumps(record), encoding="utf-8")


@pytest.fixture
def bundle(tmp_path: Path) -> tuple[Path, dict]:
    """A classifier bundle: tasks 'nli' and 'movie' baked (in that order), 'zeta' added later, and bundle.json's info."""
    path = tmp_path / "bundle"
    (path / TASKS_DIR).mkdir(parents=True)
    info = {"format_version": 1, "bundle_id": BUNDLE_ID, "tasks": ["nli", "movie"], "task_core": 0, "adapter_config": {}}
    (path / BUNDLE_JSON).write_text(json.dumps(info), encoding="utf-8")
    for name in ("movie", "nli", "zeta"):
        write_task(path, name)
    return path, info


def test_tasks_are_baked_first_then_added_ones_by_name(bundle) -> None:
    table = TaskTable.of_bundle(*bundle)
    assert table.tasks == ["nli", "movie", "zeta"] and list(table.records) == table.tasks
    assert table.records["movie"]["labels"] == ["neg", "pos"] and not table.fixed and not table.skipped


def test_a_name_an_index_or_ascii_digits_choose_a_task(bundle) -> None:
    table = TaskTable.of_bundle(*bundle)
    assert [table.name("movie"), table.name(0), table.name(2), table.name("1"), table.name("02")] == [
        "movie",
        "nli",
        "zeta",
        "movie",
        "zeta",
    ]
    with pytest.raises(
        MetaTTError, match=r"unknown task '\\u0663'"
    ):  # Arabic-Indic three (echoed escaped): digits in another script stay a name
        table.name("٣")
    with pytest.raises(MetaTTError, match=r"unknown task id 3; this bundle has tasks 0=nli, 1=movie, 2=zeta"):
        table.name("3")
    with pytest.raises(MetaTTError, match="unknown task id True"):  # a bool is not an index
        table.name(True)
    with pytest.raises(MetaTTError, match="serves several tasks"):
        table.name(None)


def test_a_served_name_made_of_digits_is_that_task_not_an_index(bundle) -> None:
    path, info = bundle
    write_task(path, "0")
    table = TaskTable.of_bundle(path, info)
    assert table.tasks == ["nli", "movie", "0", "zeta"]
    assert table.name("0") == "0" and table.name(0) == "nli"


def test_a_broken_record_is_skipped_with_its_reason_or_is_an_error(bundle) -> None:
    path, info = bundle
    write_task(path, "alien", bundle_id="f" * 32)
    (path / TASKS_DIR / "junk.json").write_text("{", encoding="utf-8")
    with pytest.raises(MetaTTError, match="belongs to bundle ffffffffffff"):
        TaskTable.of_bundle(path, info)
    table = TaskTable.of_bundle(path, info, keep_going=True)
    assert table.tasks == ["nli", "movie", "zeta"] and set(table.skipped) == {"alien.json", "junk.json"}
    with pytest.raises(MetaTTError, match=r"task 'alien' is not served: task file alien.json belongs to bundle ffffffffffff"):
        table.name("alien")


def test_add_publishes_only_after_the_check_passes_in_one_step(bundle) -> None:
    path, info = bundle
    table = TaskTable.of_bundle(path, info)
    write_task(path, "sst2", labels=("a", "b", "c"))
    before_records, before_tasks = table.records, table.tasks
    seen: list[tuple[str, list[str], int]] = []

    def check(name: str, record: dict) -> None:
        seen.append((name, table.tasks, record["num_labels"]))  # what a concurrent reader sees while the backend loads

    record = table.add("sst2", check)
    assert seen == [("sst2", ["nli", "movie", "zeta"], 3)]
    assert record["labels"] == ["a", "b", "c"] and table.records["sst2"] is record
    assert table.tasks == ["nli", "movie", "zeta", "sst2"] and table.name(3) == "sst2"
    assert "sst2" not in before_records and before_tasks == ["nli", "movie", "zeta"]  # a reader's snapshot stays whole and old
    with pytest.raises(TypeError):
        table.records["x"] = record  # type: ignore[index]  # published records are read-only: changes go through add/remove


def test_a_failing_check_or_a_bad_record_leaves_the_table_unchanged(bundle) -> None:
    path, info = bundle
    table = TaskTable.of_bundle(path, info)
    write_task(path, "sst2")
    before = table.records

    def refuse(name: str, record: dict) -> None:
        raise MetaTTError(f"the adapter of {name} does not load")

    with pytest.raises(MetaTTError, match="the adapter of sst2 does not load"):
        table.add("sst2", refuse)
    assert table.records is before and table.tasks == ["nli", "movie", "zeta"]
    write_task(path, "alien", bundle_id="f" * 32)
    for name, error in [
        ("alien", "belongs to bundle"),
        ("movie", "already served"),
        ("missing", "has no task file"),
        ("../x", "not a task name"),
    ]:
        with pytest.raises(MetaTTError, match=error):
            table.add(name, refuse)
        assert table.records is before
    assert table.add("sst2")["task"] == "sst2"  # the same file, now without the failing check


def test_a_repaired_skipped_record_can_be_added_and_is_no_longer_skipped(bundle) -> None:
    path, info = bundle
    write_task(path, "late", bundle_id="f" * 32)
    table = TaskTable.of_bundle(path, info, keep_going=True)
    assert set(table.skipped) == {"late.json"}
    write_task(path, "late")
    table.add("late")
    assert table.name("late") == "late" and not table.skipped


def test_remove_by_name_or_index(bundle) -> None:
    table = TaskTable.of_bundle(*bundle)
    assert table.remove("movie") == "movie" and table.tasks == ["nli", "zeta"]
    assert table.remove("1") == "zeta" and table.tasks == ["nli"] and list(table.records) == ["nli"]
    with pytest.raises(MetaTTError, match="unknown task 'movie'"):
        table.remove("movie")
    assert table.name(None) == "nli"  # the one task left is the default


@pytest.mark.parametrize("record", [{"task": "sst2", "labels": ["neg", "pos"], "num_labels": 2}, None], ids=["classifier", "decoder"])
def test_a_single_task_export_is_fixed(tmp_path: Path, record: dict | None) -> None:
    table = TaskTable.single_task(tmp_path / "exported", record)
    assert table.fixed and table.tasks == ([] if record is None else ["sst2"])
    if record is not None:
        assert table.name(None) == table.name(0) == table.name("sst2") == "sst2"
    for verb, change in (("add", table.add), ("remove", table.remove)):
        with pytest.raises(
            MetaTTError, match=f"exported is a single-task export: its task is fixed; serve a factored bundle to {verb} tasks"
        ):
            change("sst2")
