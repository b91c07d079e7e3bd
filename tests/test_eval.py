"""Evaluation in one trunk pass: every frozen-trunk run of a task evaluated on a split reads the
same features, computed once per image (counted as images through the patch embedding)."""

from __future__ import annotations

import pytest

from querytune.backbones.vit import PatchEmbed
from querytune.data import open_split
from querytune.run import eval_run, eval_runs, train_runs
from querytune.settings import RunSpec, Runtime

FAST = {"epochs": 2, "batch_size": 8}


@pytest.fixture
def trunk_images(monkeypatch):
    """The number of images the trunk has run on so far (a list holding one count)."""
    seen = [0]
    real = PatchEmbed.forward

    def counted(self, images):
        seen[0] += images.shape[0]
        return real(self, images)

    monkeypatch.setattr(PatchEmbed, "forward", counted)
    return seen


def _spec(method, backbone, task, **fields):
    return RunSpec(method=method, backbone=backbone, data=task, image_size=32, **fields)


def test_a_stack_is_evaluated_in_one_pass_over_the_split(tiny_backbone_dir, tiny_task, tmp_path, trunk_images):
    runtime = Runtime(workers=0, progress=False, cache=tmp_path / "cache", cache_splits=["train800val200"])
    seeds = {tmp_path / f"seed{seed}": {**FAST, "seed": seed, "data_seed": 0} for seed in range(3)}
    metrics = train_runs(_spec("vqt", tiny_backbone_dir, tiny_task), seeds, runtime)
    train, test = (len(open_split(tiny_task, split)) for split in ("train800val200", "test"))
    assert trunk_images[0] == train + test  # the cache built once, the live test split read once for all 3
    alone = [eval_run(run, tiny_task, "test", Runtime(workers=0, progress=False)) for run in seeds]
    assert [m["test_accuracy"] for m in metrics] == pytest.approx(alone)


def test_eval_runs_reads_the_split_once_for_every_frozen_run(tiny_backbone_dir, tiny_task, tmp_path, trunk_images):
    runtime = Runtime(workers=0, progress=False)
    runs = []
    for method in ("linear", "vqt", "memory", "synqt", "bitfit"):
        runs.append(tmp_path / method)
        train_runs(_spec(method, tiny_backbone_dir, tiny_task, eval_split=""), {runs[-1]: FAST}, runtime)
    test = len(open_split(tiny_task, "test"))
    trunk_images[0] = 0
    together = eval_runs(runs, tiny_task, "test", runtime)
    assert trunk_images[0] == 2 * test  # the four frozen-trunk runs share one pass; bitfit adapts its own trunk
    alone = [eval_run(run, tiny_task, "test", runtime) for run in runs]
    assert together == pytest.approx(alone)


def test_eval_takes_several_runs_on_the_command_line(tiny_backbone_dir, tiny_task, tmp_path, capsys):
    from querytune.cli import main

    runs = [tmp_path / "linear", tmp_path / "vqt"]
    for run in runs:
        train_runs(_spec(run.name, tiny_backbone_dir, tiny_task), {run: FAST}, Runtime(workers=0, progress=False))
    capsys.readouterr()
    main(["eval", "--run", str(runs[0]), "--run", str(runs[1]), "--data", str(tiny_task), "--workers", "0", "-q"])
    printed = capsys.readouterr().out.strip().splitlines()
    expected = [eval_run(run, tiny_task, "test", Runtime(workers=0, progress=False)) for run in runs]
    assert printed == [f"test accuracy: {accuracy:.4f}  {run}" for accuracy, run in zip(expected, runs)]


def test_eval_refuses_a_task_whose_classes_are_not_the_runs(tiny_backbone_dir, tiny_task, tmp_path, capsys):
    """A cifar10 run evaluated on dtd10 (ten classes each) printed an accuracy: the class names are compared."""
    from test_bad_input import cli_error

    from conftest import write_task

    other = write_task(tmp_path / "other")  # as many classes, other names
    (other / "classes.txt").write_text("banded\nblotchy\nbraided\n")
    run = tmp_path / "run"
    train_runs(_spec("linear", tiny_backbone_dir, tiny_task, eval_split=""), {run: FAST},
               Runtime(workers=0, progress=False))
    assert cli_error(capsys, "eval", "--run", run, "--data", other, "--workers", "0", "-q") == (
        f"error: {run}: was trained on the classes of 'tiny' (class0, class1, class2), not those of 'other' "
        "(banded, blotchy, braided); evaluate it on its own task")
