"""Data-parallel training under torchrun: two CPU processes (gloo) train like one process."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import write_task
from querytune import distributed, train_run
from querytune.errors import ConfigError
from querytune.settings import RunSpec, Runtime

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun(*args: str | Path, nproc: int = 2) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
               "--master-addr", "127.0.0.1", "--master-port", str(free_port()), "-m", "querytune", *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.parametrize(("world", "expected"), [
    (1, [list(range(10))]),
    # batch 4 over 2 ranks: slices of 2; the last global batch (8, 9) is rank 0's alone
    (2, [[0, 1, 4, 5, 8, 9], [2, 3, 6, 7]]),
])
def test_each_rank_takes_its_slice_of_every_global_batch(world, expected, monkeypatch):
    monkeypatch.setattr(distributed, "world_size", lambda: world)
    orders = []
    for rank in range(world):
        monkeypatch.setattr(distributed, "rank", lambda rank=rank: rank)
        orders.append(distributed.rank_order(np.arange(10), 4).tolist())
    assert orders == expected
    with pytest.raises(ConfigError, match="batch size 5 does not split evenly over 2 processes"):
        monkeypatch.setattr(distributed, "world_size", lambda: 2)
        distributed.local_batch_size(5)


@pytest.mark.parametrize(("method", "cached"), [("vqt", True), ("linear", False)])
def test_two_processes_train_like_one(method, cached, tiny_backbone_dir, tmp_path):
    """VQT without query dropout from a cache the ranks build together; a linear probe on live
    features with a loader worker per rank. Neither draws random numbers, so one process must
    end at the same adapter."""
    # 66 images: two cache shards (64 + 2), and the last global batch of 2 is rank 0's alone
    task = write_task(tmp_path / "task", per_split={"train800": 66, "val200": 11, "test": 9})
    options = {"query_dropout": 0.0, "num_queries": 2} if method == "vqt" else {}
    flags = [f"--{key.replace('_', '-')}={value}" for key, value in options.items()]
    features = ["--cache", tmp_path / "ddp-cache", "--workers", "0"] if cached else ["--no-cache", "--workers", "1"]
    result = torchrun("train", "--method", method, "--backbone", tiny_backbone_dir, "--data", task,
                      "--train-split", "train800", "--out", tmp_path / "ddp", "--image-size", "32", "-q",
                      "--epochs", "2", "--batch-size", "8", "--lr", "0.05", "--device", "cpu", "--eval-every", "1",
                      *flags, *features)
    assert result.returncode == 0, result.stderr[-3000:]

    one = train_run(RunSpec(method=method, backbone=tiny_backbone_dir, data=task, train_split="train800", image_size=32,
                            options=options, eval_every=1),
                    tmp_path / "one", train={"epochs": 2, "batch_size": 8, "lr": 0.05},
                    runtime=Runtime(workers=0, progress=False, cache=tmp_path / "one-cache" if cached else None,
                                    device="cpu"))
    ddp = json.loads((tmp_path / "ddp" / "metrics.json").read_text())
    assert ddp["processes"] == 2 and one["processes"] == 1
    assert ddp["test_accuracy"] == one["test_accuracy"]
    assert ddp["train_loss"] == pytest.approx(one["train_loss"], rel=1e-5)
    assert ddp["train_accuracy"] == one["train_accuracy"]
    logs = [[json.loads(line) for line in (tmp_path / run / "log.jsonl").read_text().splitlines()]
            for run in ("ddp", "one")]
    assert len(logs[0]) == 2  # rank 0 alone writes
    # every rank validates its part of val200 (11 images: an odd count), the log holds the whole split's accuracy
    assert [r["val_accuracy"] for r in logs[0]] == [r["val_accuracy"] for r in logs[1]]
    a, b = (load_file(str(tmp_path / run / "adapter.safetensors")) for run in ("ddp", "one"))
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6)
    if not cached:
        return

    # the cache the two ranks built shard by shard equals the one built by one process
    entries = sorted((tmp_path / "one-cache").iterdir())
    # train800val200 (77 images), which train800 and val200 are read from (test, read once, runs live)
    assert [len(list(entry.glob("shard-*.cls.npy"))) for entry in entries] == [2]
    for entry in entries:
        twin = tmp_path / "ddp-cache" / entry.name
        assert sorted(p.name for p in entry.iterdir()) == sorted(p.name for p in twin.iterdir())
        for file in entry.iterdir():
            assert file.read_bytes() == (twin / file.name).read_bytes(), file


def test_a_bench_over_two_ranks_reports_what_one_process_does(tiny_backbone_dir, tmp_path):
    """Each gloo rank trains whole tasks; rank 0 reads every cell back and writes the one report."""
    from querytune.cli import main

    suite = tmp_path / "suite"
    for index, task in enumerate(("alpha", "beta", "gamma")):
        write_task(suite / task, classes=2 + index, seed=index)
    args = ["bench", "--suite", suite, "--methods", "linear,vqt", "-b", tiny_backbone_dir, "--seeds", "2",
            "--image-size", "32", "--workers", "0", "-q", "--min-steps", "0"]
    result = torchrun(*args, "--out", tmp_path / "ranks")
    assert result.returncode == 0, result.stderr[-3000:]
    main([str(a) for a in (*args, "--out", tmp_path / "one")])
    cells = {}
    for out in ("ranks", "one"):
        rows = json.loads((tmp_path / out / "results.json").read_text())["results"]
        # all but what is timed or measured on the running process (the step's peak memory)
        cells[out] = [{k: v for k, v in row.items() if k not in ("train_seconds", "train_peak_bytes")} for row in rows]
    assert len(cells["one"]) == 3 * 2 * 2 and not any(row.get("error") for row in cells["one"])
    assert cells["ranks"] == cells["one"]
    hosts = {json.loads(run.read_text())["processes"] for run in (tmp_path / "ranks" / "runs").rglob("metrics.json")}
    assert hosts == {1}  # every run trained on one rank, alone
