"""benchmarks/vtab_shaped.py: a tiny VTAB-1k-shaped suite that the suite and data modules read."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from querytune.data import list_splits, open_split
from querytune.suite import discover_tasks

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "vtab_shaped.py"
SCALE = 0.002
SPLITS = ["test", "train800", "train800val200", "val200"]


def load_script():
    spec = importlib.util.spec_from_file_location("vtab_shaped", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    out = tmp_path_factory.mktemp("shaped") / "suite"
    result = subprocess.run([sys.executable, str(SCRIPT), "--out", str(out), "--scale", str(SCALE)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "19 tasks" in result.stdout.splitlines()[-1]
    return out


def test_the_table_is_vtab1k():
    tasks = load_script().TASKS
    assert len(tasks) == 19
    groups = [group for _, group, _, _ in tasks]
    assert (groups.count("natural"), groups.count("specialized"), groups.count("structured")) == (7, 4, 8)
    by_name = {name: (classes, test) for name, _, classes, test in tasks}
    assert by_name["sun397"] == (397, 21750)
    assert by_name["dsprites_loc"] == (16, 73728)
    assert by_name["kitti"] == (4, 711)
    assert by_name["patch_camelyon"] == (2, 32768)


def test_split_sizes_rule():
    sizes = load_script().split_sizes
    assert sizes(10, 26032, 1.0) == {"train800": 800, "val200": 200, "test": 26032, "train800val200": 1000}
    assert sizes(397, 21750, 1.0)["val200"] == 200  # the real size, below the class count
    small = sizes(16, 73728, SCALE)
    assert small == {"train800": 16, "val200": 16, "test": 147, "train800val200": 32}
    assert sizes(397, 21750, SCALE) == {"train800": 397, "val200": 200, "test": 397, "train800val200": 597}
    assert sizes(2, 711, 0.5)["test"] == 356


def test_suite_reads_as_vtab1k(suite):
    script = load_script()
    tasks = discover_tasks(suite)
    expected = {name: group for name, group, _, _ in script.TASKS}
    assert {task.name: task.group for task in tasks} == expected
    for task in tasks:
        name, _, classes, test = next(row for row in script.TASKS if row[0] == task.name)
        sizes = script.split_sizes(classes, test, SCALE)
        assert list_splits(task.path) == SPLITS
        opened = {split: open_split(task.path, split) for split in SPLITS}
        for split, images in opened.items():
            assert len(images) == sizes[split], (name, split)
            assert images.num_classes == classes, (name, split)
            labels = {label for _, label in images.items}
            if len(images) >= classes:
                assert labels == set(range(classes)), (name, split)
        union = opened["train800val200"].items
        assert union == opened["train800"].items + opened["val200"].items
        assert len({path for path, _ in union}) == len(union)
        for split in ("train800", "val200", "test"):
            assert {path.parent for path, _ in opened[split].items} == {task.path / "images" / split}
        assert not (task.path / "images" / "train800val200").exists()  # listed again, not copied
        first = opened["test"].load(0)
        assert first.size == (32, 32) and first.mode == "RGB"


def test_a_second_run_is_refused(suite):
    before = sorted(p.relative_to(suite) for p in suite.rglob("*.txt"))
    result = subprocess.run([sys.executable, str(SCRIPT), "--out", str(suite), "--scale", str(SCALE)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and "not empty" in result.stderr
    assert sorted(p.relative_to(suite) for p in suite.rglob("*.txt")) == before


def test_bad_scale_is_refused(tmp_path):
    assert load_script().main  # importable without running
    result = subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path / "x"), "--scale", "0"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "--scale must be > 0" in result.stderr
    assert not (tmp_path / "x").exists()
