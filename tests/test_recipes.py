"""Per-task recipes: the official VQT and SynQT settings of the VTAB-1k tasks, as data in the package."""

from __future__ import annotations

import json

import pytest

from conftest import write_task
from querytune import train_run
from querytune.errors import ConfigError
from querytune.recipes import load_recipe, recipe_options
from querytune.settings import RunSpec, Runtime

FAST = {"epochs": 1, "batch_size": 8}
VTAB1K_TASKS = {"caltech101", "cifar", "dtd", "oxford_flowers102", "oxford_iiit_pet", "svhn", "sun397",
                "patch_camelyon", "eurosat", "resisc45", "diabetic_retinopathy", "clevr_count", "clevr_dist", "dmlab",
                "kitti", "dsprites_loc", "dsprites_ori", "smallnorb_azi", "smallnorb_ele"}


def test_vtab1k_recipe_holds_the_official_settings_with_their_sources():
    recipe = load_recipe("vtab1k")
    for method in ("vqt", "synqt"):
        assert set(recipe["methods"][method]["tasks"]) == VTAB1K_TASKS
        assert recipe["methods"][method]["source"]
    # spot checks against the official files (docs: VQT run_demo_exp.sh, SynQT configs/vit_21k/*.yaml)
    assert recipe_options("vtab1k", "vqt", "dtd") == {"num_queries": 1, "compress": 0.7}
    assert recipe_options("vtab1k", "vqt", "smallnorb_ele") == {"num_queries": 10}
    assert recipe_options("vtab1k", "vqt", "kitti") == {"num_queries": 20}
    assert recipe_options("vtab1k", "synqt", "cifar") == {"num_queries": 4, "attn_scale": 1.0, "ffn_scale": 0.1,
                                                          "feat_scale": 0.1}
    assert recipe_options("vtab1k", "linear", "dtd") == {}  # no settings for a method: its defaults stay


def test_a_recipe_changes_exactly_the_settings_it_names(tiny_backbone_dir, tmp_path):
    task = write_task(tmp_path / "dtd")  # named like the VTAB-1k folder
    plain = train_run(RunSpec(method="vqt", backbone=tiny_backbone_dir, data=task, image_size=32), tmp_path / "plain",
                      train=FAST, runtime=Runtime(workers=0, progress=False))
    recipe = train_run(RunSpec(method="vqt", backbone=tiny_backbone_dir, data=task, image_size=32, recipe="vtab1k"),
                       tmp_path / "recipe", train=FAST, runtime=Runtime(workers=0, progress=False))
    assert recipe["kept_features"] < recipe["total_features"] and "kept_features" not in plain
    plain_options = json.loads((tmp_path / "plain" / "config.json").read_text())["options"]
    config = json.loads((tmp_path / "recipe" / "config.json").read_text())
    changed = {k for k in plain_options if plain_options[k] != config["options"][k]}
    assert changed == {"compress"} and config["options"]["compress"] == 0.7  # num_queries 1 is VQT's default too
    assert config["recipe"] == {"name": "vtab1k", "settings": {"num_queries": 1, "compress": 0.7}}

    overridden = train_run(RunSpec(method="vqt", backbone=tiny_backbone_dir, data=task, image_size=32, recipe="vtab1k",
                                   options={"compress": 0.5}),
                           tmp_path / "flag", train=FAST, runtime=Runtime(workers=0, progress=False))
    assert overridden["kept_features"] == round(0.5 * overridden["total_features"])  # a given option wins


def test_recipe_errors_name_the_culprit_and_write_nothing(tiny_backbone_dir, tiny_task, tmp_path):
    with pytest.raises(ConfigError, match=r"task 'tiny' is not in recipe 'vtab1k' for vqt \(known: caltech101, "):
        train_run(RunSpec(method="vqt", backbone=tiny_backbone_dir, data=tiny_task, image_size=32, recipe="vtab1k"),
                  tmp_path / "run", train=FAST, runtime=Runtime(workers=0, progress=False))
    with pytest.raises(ConfigError, match=r"unknown recipe 'vtab2k' \(known: vtab1k, vtab1k-mini\)"):
        train_run(RunSpec(method="vqt", backbone=tiny_backbone_dir, data=tiny_task, image_size=32, recipe="vtab2k"),
                  tmp_path / "run", train=FAST, runtime=Runtime(workers=0, progress=False))
    assert not (tmp_path / "run").exists()
    metrics = train_run(RunSpec(method="synqt", backbone=tiny_backbone_dir, data=tiny_task, image_size=32,
                                recipe="vtab1k", task_name="dtd"),
                        tmp_path / "named", train=FAST, runtime=Runtime(workers=0, progress=False))
    assert metrics["task"] == "dtd"


def test_the_mini_recipe_reads_each_task_as_the_vtab1k_task_it_stands_in_for():
    mini = load_recipe("vtab1k-mini")
    assert set(mini["tasks"].values()) <= VTAB1K_TASKS
    for task, vtab_task in mini["tasks"].items():
        for method in ("vqt", "synqt", "linear"):
            assert recipe_options("vtab1k-mini", method, task) == recipe_options("vtab1k", method, vtab_task)
    assert recipe_options("vtab1k-mini", "vqt", "signdigits") == {"num_queries": 20}  # svhn's settings
    with pytest.raises(ConfigError, match=r"task 'svhn' is not in recipe 'vtab1k-mini' \(known: cifar10, "):
        recipe_options("vtab1k-mini", "vqt", "svhn")
