"""Faults: ``kill -9`` during training or caching, then the same command, ends as an uninterrupted
run would; torn cache shards are found and rebuilt, never read; a second process writing a run or bench
folder in use is refused."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import tiny_vit
from querytune.cli import main
from querytune.data import Preprocess, open_split
from querytune.errors import DataError
from querytune.trunk.cache import Building, CacheKey, FeatureCache, build_cache, open_or_build_cache

ROOT = Path(__file__).resolve().parents[1]
SHARDS_OF_4 = Building(shard_size=4, show_progress=False)  # a tiny split in several shards, quietly
# The command line with every image load slowed down, so that the test can kill it mid-way.
SLOWED_CLI = ("import time, querytune.data.core as data; load = data.load_image; "
              "data.load_image = lambda path, **kw: (time.sleep({delay}), load(path, **kw))[1]; "
              "from querytune.cli import main; main()")


def start_slowed(args: list[str], delay: float) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen([sys.executable, "-c", SLOWED_CLI.format(delay=delay), *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def kill_when(process: subprocess.Popen, ready: Callable[[], bool], timeout: float = 120) -> None:
    """``kill -9`` the process as soon as ``ready()`` holds."""
    deadline = time.monotonic() + timeout
    while not ready():
        assert process.poll() is None, f"finished before it could be killed: {process.stderr.read()[-2000:]}"
        assert time.monotonic() < deadline, "timed out waiting to kill"
        time.sleep(0.01)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    process.stderr.close()


def test_kill_during_training_then_rerun_ends_like_an_uninterrupted_run(tiny_backbone_dir, tiny_task, tmp_path):
    def args(out: Path) -> list[str]:
        # VQT with query dropout: the resumed run must also restore the RNG
        return ["train", "--method", "vqt", "--backbone", str(tiny_backbone_dir), "--data", str(tiny_task),
                "--out", str(out), "--epochs", "3", "--batch-size", "8", "--lr", "0.05", "--image-size", "32",
                "--workers", "0", "--no-cache", "-q"]

    cut = tmp_path / "cut"
    process = start_slowed(args(cut), delay=0.03)
    kill_when(process, lambda: (cut / "checkpoint.pt").exists())
    assert process.returncode == -signal.SIGKILL
    assert not (cut / "metrics.json").exists()

    main(args(cut))
    main(args(tmp_path / "whole"))
    assert json.loads((cut / "metrics.json").read_text())["resumed"]
    assert (cut / "adapter.safetensors").read_bytes() == (tmp_path / "whole" / "adapter.safetensors").read_bytes()
    assert [json.loads(line)["epoch"] for line in (cut / "log.jsonl").read_text().splitlines()] == [1, 2, 3]
    assert sorted(p.name for p in cut.iterdir()) == ["adapter.safetensors", "adapter.sha256", "config.json",
                                                     "curves.png", "log.jsonl", "metrics.json"]


def test_kill_during_caching_then_rerun_ends_like_an_uninterrupted_build(tiny_backbone_dir, tiny_task, tmp_path):
    def args(cache: Path) -> list[str]:
        return ["cache", "build", "--backbone", str(tiny_backbone_dir), "--data", str(tiny_task), "--cache", str(cache),
                "--splits", "train800val200", "--shard-size", "4", "--batch-size", "2", "--image-size", "32",
                "--workers", "0", "-q"]

    cut = tmp_path / "cut"
    process = start_slowed(args(cut), delay=0.05)
    kill_when(process, lambda: any(cut.glob("*/shard-00001.cls.npy")))
    (entry,) = cut.iterdir()
    assert not (entry / "meta.json").exists()

    main(args(cut))
    main(args(tmp_path / "whole"))
    twin = tmp_path / "whole" / entry.name
    assert sorted(p.name for p in entry.iterdir()) == sorted(p.name for p in twin.iterdir())  # no temporary files
    for file in twin.iterdir():
        assert (entry / file.name).read_bytes() == file.read_bytes(), file.name


@pytest.mark.parametrize("damage", ["truncated", "garbage", "extended", "emptied", "other shape"])
def test_torn_shards_under_their_final_names_are_rebuilt_never_read(damage, tiny_task, tmp_path):
    backbone = tiny_vit()
    images = open_split(tiny_task, "test")
    preprocess = Preprocess(32, backbone.config.mean, backbone.config.std)
    path = build_cache(tmp_path, CacheKey(backbone, images, preprocess), SHARDS_OF_4)
    good = FeatureCache.open(path).features(np.arange(len(images)))

    shard = path / "shard-00001.layers.npy"
    data = shard.read_bytes()
    if damage == "truncated":
        shard.write_bytes(data[: len(data) - 100])
    elif damage == "garbage":
        shard.write_bytes(np.random.default_rng(0).bytes(len(data)))
    elif damage == "extended":
        shard.write_bytes(data + b"\0" * 64)
    elif damage == "emptied":
        shard.write_bytes(b"")
    else:
        np.save(shard, np.zeros((4, 3, 9, 48), np.float16))
    with pytest.raises(DataError, match=f"{shard}: missing or torn"):
        FeatureCache.open(path)

    rebuilt = open_or_build_cache(tmp_path, CacheKey(backbone, images, preprocess, with_layers=True), SHARDS_OF_4)
    assert shard.read_bytes() == data
    assert torch.equal(rebuilt.features(np.arange(len(images))).layers, good.layers)


# --- two processes, one folder ------------------------------------------------------------------------

def test_a_second_train_in_a_folder_being_trained_is_refused_naming_the_first(tiny_backbone_dir, tiny_task,
                                                                              tmp_path, capsys):
    """Two identical trains on one --out both ran, logging every epoch twice: the second is refused, naming
    the first's pid; once the first is killed (-9) the folder is free and the run resumes."""
    from test_bad_input import cli_error

    out = tmp_path / "run"
    args = ["train", "--method", "linear", "--backbone", str(tiny_backbone_dir), "--data", str(tiny_task),
            "--out", str(out), "--epochs", "4", "--batch-size", "8", "--image-size", "32", "--workers", "0",
            "--no-cache", "-q"]
    first = start_slowed(args, delay=0.05)
    deadline = time.monotonic() + 120
    while not (out / "config.json").exists():  # started: it holds the folder
        assert first.poll() is None and time.monotonic() < deadline, "the first train did not start"
        time.sleep(0.01)
    assert cli_error(capsys, *args) == (f"error: {out}: another process is training in it (pid {first.pid}); "
                                        "wait for it to end or choose another --out")
    kill_when(first, lambda: True)
    main(args)
    assert [json.loads(line)["epoch"] for line in (out / "log.jsonl").read_text().splitlines()] == [1, 2, 3, 4]
    assert not (out / ".lock").exists()


def test_a_second_bench_on_a_folder_in_use_is_refused_naming_the_first(tiny_backbone_dir, tiny_task, tmp_path,
                                                                       capsys):
    """Two benches on one --out trained every cell twice: the second is refused, naming the first's pid."""
    from test_bad_input import cli_error

    out = tmp_path / "bench"
    args = ["bench", "--suite", str(tiny_task), "--methods", "linear", "-b", str(tiny_backbone_dir), "--out", str(out),
            "--image-size", "32", "--workers", "0", "-q", "--min-steps", "0"]
    first = start_slowed(args, delay=0.05)
    deadline = time.monotonic() + 120
    while not (out / "bench.json").exists():  # started: it holds the folder
        assert first.poll() is None and time.monotonic() < deadline, "the first bench did not start"
        time.sleep(0.01)
    try:
        assert cli_error(capsys, *args) == (f"error: {out}: another bench is running in it (pid {first.pid}); "
                                            "wait for it to end or choose another --out")
    finally:
        kill_when(first, lambda: True)
