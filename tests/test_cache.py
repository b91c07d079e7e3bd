"""The feature cache under the faults users hit: full or read-only disks (a real small tmpfs where the
test may mount one, injected write failures everywhere), concurrent builders, a killed lock holder,
corrupted shards and adapters; and its housekeeping commands (build, ls, rm, prune)."""

from __future__ import annotations

import builtins
import errno
import io
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from test_bad_input import cli_error, train_args
from test_faults import ROOT, SHARDS_OF_4

from conftest import tiny_vit
from querytune.backbones import load_backbone
from querytune.cli import main
from querytune.data import ImageList, Preprocess, open_split
from querytune.errors import CheckpointError, DataError
from querytune.run import load_run
from querytune.trunk.cache import (
    Building,
    CacheKey,
    FeatureCache,
    ShardWriter,
    build_cache,
    cache_splits,
    human_size,
    open_or_build_cache,
    read_meta,
)
from querytune.trunk.cache import build as cache_build
from querytune.trunk.cache import entry as cache_entry
from querytune.trunk.features import Features, extract_features, held_weights
from querytune.trunk.precision import Precision


def cache_args(backbone: Path, task: Path, root: Path, *extra: str) -> list[str]:
    return ["cache", "build", "--backbone", str(backbone), "--data", str(task), "--cache", str(root), "--splits",
            "train800val200", "--image-size", "32", "--workers", "0", "-q", *extra]


def leftovers(folder: Path) -> list[str]:
    """What a failed cache build left under ``folder``: nothing, not even an empty entry folder."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) if folder.exists() else []


# --- a real small filesystem (root only) ------------------------------------------------------------

@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Callable[..., Path]]:
    """``mount(size, read_only=False)``: a fresh tmpfs of ``size`` bytes; skipped where mounting fails."""
    mounted: list[Path] = []

    def mount(size: int, read_only: bool = False) -> Path:
        point = tmp_path / f"fs{len(mounted)}"
        point.mkdir()
        options = f"size={size}" + (",ro" if read_only else "")
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(point)], capture_output=True,
                                text=True)
        if result.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({result.stderr.strip() or 'mount failed'}); the injected "
                        "faults below cover the same paths")
        mounted.append(point)
        return point

    yield mount
    for point in mounted:
        subprocess.run(["umount", str(point)], check=True)


def run_cli(args: list[str], patch: str = "") -> subprocess.CompletedProcess:
    """The command line in a fresh process (a SIGBUS there fails the test instead of killing pytest)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    code = f"{patch}\nfrom querytune.cli import main\nmain()"
    return subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, timeout=300)


def test_a_full_small_filesystem_is_one_line_not_a_sigbus(small_tmpfs, tiny_backbone_dir, tiny_task, capsys):
    """The issue's reproduction at small scale: an entry (~90 KiB) larger than its 32 KiB filesystem."""
    fs = small_tmpfs(32 * 1024)
    # up front: the free-space check names the folder and the size needed
    error = cli_error(capsys, *cache_args(tiny_backbone_dir, tiny_task, fs))
    assert error.startswith(f"error: {fs}/tiny-train800val200-") and "needs 88.0 KiB, 32.0 KiB free" in error
    assert leftovers(fs) == []
    # a disk filled after the check (by another process): the reservation fails; before, this was a SIGBUS,
    # so in a process of its own
    result = run_cli(cache_args(tiny_backbone_dir, tiny_task, fs),
                     patch="import querytune.trunk.cache.build as c; c.check_free_space = lambda *args: None")
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith(f"error: {fs}/tiny-train800val200-") and "No space left" in result.stderr
    assert result.stderr.count("\n") == 1
    assert leftovers(fs) == []
    # a run folder on the full filesystem: one line, nothing left
    (fs / "filler").write_bytes(b"\0" * (32 * 1024 - 4096))
    error = cli_error(capsys, *train_args(tiny_backbone_dir, tiny_task, fs / "run", "--no-cache"))
    assert error.startswith(f"error: {fs / 'run'}: cannot write") and "No space left" in error
    assert not (fs / "run").exists()


def test_a_read_only_filesystem_is_one_line(small_tmpfs, tiny_backbone_dir, tiny_task, capsys):
    fs = small_tmpfs(1 << 20, read_only=True)
    error = cli_error(capsys, *cache_args(tiny_backbone_dir, tiny_task, fs / "cache"))
    assert error.startswith(f"error: {fs}/cache/tiny-train800val200-") and "Read-only file system" in error
    error = cli_error(capsys, *train_args(tiny_backbone_dir, tiny_task, fs / "run", "--no-cache"))
    assert error.startswith(f"error: {fs / 'run'}: cannot write") and "Read-only file system" in error


# --- injected write failures (any user, any CI) -----------------------------------------------------

class FailingFile:
    """A file opened for writing whose writes fail with ``code``."""

    def __init__(self, handle: io.IOBase, code: int) -> None:
        self.handle, self.code = handle, code

    def write(self, data: bytes | str) -> int:
        raise OSError(self.code, os.strerror(self.code))

    def __enter__(self) -> FailingFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.handle.close()

    def __getattr__(self, name: str):
        return getattr(self.handle, name)


@pytest.fixture
def failing_writes(monkeypatch: pytest.MonkeyPatch) -> Callable[[Path, int, str], None]:
    """``arm(folder, code, name)``: files under ``folder`` whose names contain ``name``, opened for writing
    (by Python, pathlib, numpy or torch), fail every write with ``code`` from then on."""
    real_open = builtins.open

    def arm(folder: Path, code: int, name: str = "") -> None:
        def failing_open(file, mode="r", *args, **kwargs):
            handle = real_open(file, mode, *args, **kwargs)
            if (isinstance(file, (str, os.PathLike)) and set(mode) & set("wax+")
                    and Path(file).resolve().is_relative_to(folder.resolve()) and name in Path(file).name):
                return FailingFile(handle, code)
            return handle

        monkeypatch.setattr(builtins, "open", failing_open)
        monkeypatch.setattr(io, "open", failing_open)

    return arm


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS, errno.EACCES])
def test_failed_cache_writes_are_one_line_and_leave_no_entry(code, failing_writes, tiny_backbone_dir, tiny_task,
                                                             tmp_path, capsys):
    root = tmp_path / "cache"
    failing_writes(root, code)
    error = cli_error(capsys, *cache_args(tiny_backbone_dir, tiny_task, root))
    assert error.startswith(f"error: {root}/tiny-train800val200-") and os.strerror(code) in error
    assert leftovers(root) == []


def test_failed_reservation_is_one_line_and_leaves_no_entry(monkeypatch, tiny_backbone_dir, tiny_task, tmp_path,
                                                            capsys):
    def no_space(fd: int, offset: int, length: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(cache_build.os, "posix_fallocate", no_space)
    error = cli_error(capsys, *cache_args(tiny_backbone_dir, tiny_task, tmp_path / "cache"))
    assert "No space left on device" in error
    assert leftovers(tmp_path / "cache") == []


@pytest.mark.parametrize("name", ["config.json", "log.jsonl", "checkpoint.pt", "adapter.safetensors",
                                  "adapter.sha256"])
def test_failed_run_file_writes_are_one_line_and_remove_the_new_run(name, failing_writes, tiny_backbone_dir,
                                                                     tiny_task, tmp_path, capsys):
    out = tmp_path / "run"
    failing_writes(out, errno.ENOSPC, name)
    error = cli_error(capsys, *train_args(tiny_backbone_dir, tiny_task, out, "--no-cache"))
    assert error == f"error: {out}: cannot write {name} (No space left on device); free space there or choose " \
                    "another folder"
    assert not out.exists()


def test_free_space_is_checked_before_building_with_the_estimate(monkeypatch, tiny_backbone_dir, tiny_task,
                                                                  tmp_path, capsys):
    monkeypatch.setattr(cache_build.shutil, "disk_usage", lambda path: SimpleNamespace(free=1000))
    root = tmp_path / "cache"
    error = cli_error(capsys, *cache_args(tiny_backbone_dir, tiny_task, root))
    assert f"{root}/tiny-train800val200-" in error
    assert "the feature cache of tiny/train800val200 needs 88.0 KiB, 1000 B free there" in error
    assert leftovers(root) == []


def test_a_failed_shard_write_drops_the_writes_queued_after_it(tmp_path, monkeypatch):
    """The background writer: once a shard's rename fails, the next shard's queued rows must not land
    in the failed shard's files (and be renamed into place under the next shard's name)."""
    renames = []

    def failing_replace(source, target):
        renames.append(target)
        time.sleep(0.2)  # every write below is queued by now
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(cache_build.os, "replace", failing_replace)
    writer = ShardWriter(tmp_path, {"cls": [3]}, rows=[2, 2], depth=4)
    for shard, row in ((0, 0), (0, 1), (1, 0), (1, 1)):
        writer.write(shard, row, {"cls": np.full((1, 3), shard, np.float16)})
    with pytest.raises(OSError, match="No space left"):
        writer.finish()
    writer.close()
    assert len(renames) == 1
    assert leftovers(tmp_path) == []  # the unfinished shard's temporary file is gone


# --- two builders of one entry ------------------------------------------------------------------------

def entry_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def wait_for(ready: Callable[[], bool], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def gated_builder(args: list[str], log: Path, gate: Path, free_images: int = 0) -> subprocess.Popen:
    """The command line in a new process whose image loads block, after ``free_images``, until ``gate`` exists;
    its output (wide, unwrapped) goes to ``log``."""
    env = {**os.environ, "COLUMNS": "400",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    code = ("import os, time, querytune.data.core as data; load, calls = data.load_image, []\n"
            "def gated(path, **options):\n"
            "    calls.append(path)\n"
            f"    while len(calls) > {free_images} and not os.path.exists({str(gate)!r}): time.sleep(0.02)\n"
            "    return load(path, **options)\n"
            "data.load_image = gated\n"
            "from querytune.cli import main; main()")
    with open(log, "w") as handle:
        return subprocess.Popen([sys.executable, "-c", code, *args], env=env, stdout=handle, stderr=subprocess.STDOUT,
                                text=True)


def test_concurrent_builders_build_once_and_a_killed_holder_blocks_none(tiny_backbone_dir, tiny_task, tmp_path):
    """Three builders want one entry: another process takes the lock, builds a shard and hangs; two builders
    here wait (each opens the lock file itself, so they exclude each other as processes do). Once the
    process is killed (-9) one of them builds the rest while the other waits again, then finds it built."""
    root = tmp_path / "cache"
    holder = gated_builder(cache_args(tiny_backbone_dir, tiny_task, root, "--shard-size", "4", "--batch-size", "2"),
                           tmp_path / "holder.log", tmp_path / "never", free_images=4)
    wait_for(lambda: any(root.glob("*/shard-00000.cls.npy")))  # one shard written, then it hangs, locked
    backbone = load_backbone(tiny_backbone_dir)
    built: list[bool] = []

    def build() -> None:
        ((_, _, was_built),) = cache_splits(root, backbone, tiny_task, ["train800val200"], 32,
                                            building=Building(batch_size=2, shard_size=4, show_progress=False))
        built.append(was_built)

    waiters = [threading.Thread(target=build) for _ in range(2)]
    for waiter in waiters:
        waiter.start()
        waiter.join(timeout=2)
    assert all(waiter.is_alive() for waiter in waiters)  # waiting for the lock
    holder.kill()  # SIGKILL, as kill -9: the kernel drops its flock
    holder.wait()
    for waiter in waiters:
        waiter.join(timeout=120)
    assert sorted(built) == [False, True]

    main(cache_args(tiny_backbone_dir, tiny_task, tmp_path / "alone", "--shard-size", "4"))
    assert entry_files(root) == entry_files(tmp_path / "alone")


# --- corrupted shards and adapters --------------------------------------------------------------------

def flip_a_byte(file: Path, from_end: int = 100) -> None:
    data = bytearray(file.read_bytes())
    data[-from_end] ^= 0xFF
    file.write_bytes(bytes(data))


def test_a_corrupted_shard_is_found_once_opened_for_training_and_rebuilt(tiny_task, tmp_path, monkeypatch):
    backbone = tiny_vit()
    images = open_split(tiny_task, "test")
    preprocess = Preprocess(32, backbone.config.mean, backbone.config.std)
    path = build_cache(tmp_path, CacheKey(backbone, images, preprocess), SHARDS_OF_4)
    good = FeatureCache.open(path).features(np.arange(len(images)))
    meta = read_meta(path)
    assert meta is not None and not meta["verified"] and len(meta["checksums"]) == 3 * 2  # 3 shards x 2 kinds
    shard = path / "shard-00001.layers.npy"
    original = shard.read_bytes()
    flip_a_byte(shard)
    assert FeatureCache.open(path).features(np.arange(len(images))).layers.ne(good.layers).any()  # header intact

    rebuilt = open_or_build_cache(tmp_path, CacheKey(backbone, images, preprocess, with_layers=True), SHARDS_OF_4)
    assert shard.read_bytes() == original
    assert torch.equal(rebuilt.features(np.arange(len(images))).layers, good.layers)
    assert read_meta(path)["verified"]

    # checked whole once: an unchanged entry is not read again (the cost is a read of the whole entry)
    hashed = []
    for module in (cache_entry, cache_build):
        monkeypatch.setattr(module, "data_checksum", lambda array: hashed.append(array) or "")
    open_or_build_cache(tmp_path, CacheKey(backbone, images, preprocess, with_layers=True), SHARDS_OF_4)
    assert hashed == []


def checked_entry(task: Path, root: Path) -> tuple[Callable[[], FeatureCache], Path, Features]:
    """A tiny entry under ``root`` (3 shards of 4 images), opened for training once, so checked whole: a
    function opening it for training again, its folder and its features."""
    backbone = tiny_vit()
    key = CacheKey(backbone, open_split(task, "test"), Preprocess(32, backbone.config.mean, backbone.config.std))

    def open_for_training() -> FeatureCache:
        return open_or_build_cache(root, key, SHARDS_OF_4)

    cache = open_for_training()
    assert read_meta(cache.path)["verified"]
    return open_for_training, cache.path, cache.features(np.arange(len(cache)))


def recorded_earlier(file: Path) -> None:
    """Date the record of ``file``'s shard a second before ``file``, as when ``file`` is written after it
    (whatever the file system's clock granularity)."""
    record = cache_entry.record_file(file.parent, int(file.name[6:11]))
    earlier = file.stat().st_mtime_ns - 10**9
    os.utime(record, ns=(earlier, earlier))


def count_hashes(monkeypatch: pytest.MonkeyPatch) -> list[np.ndarray]:
    """The arrays whose full sha256 is taken from now on."""
    hashed: list[np.ndarray] = []
    checksum = cache_entry.data_checksum
    for module in (cache_entry, cache_build):
        monkeypatch.setattr(module, "data_checksum", lambda array: hashed.append(array) or checksum(array))
    return hashed


def test_bytes_written_into_a_checked_shard_are_found_on_the_next_open_and_rebuilt(tiny_task, tmp_path):
    open_for_training, path, good = checked_entry(tiny_task, tmp_path)
    shard = path / "shard-00000.layers.npy"
    original = shard.read_bytes()
    with open(shard, "r+b") as handle:  # as `dd conv=notrunc` would: size and header kept
        handle.seek(len(original) // 2)
        handle.write(b"\xff" * 4096)

    rebuilt = open_for_training()
    assert shard.read_bytes() == original
    assert torch.equal(rebuilt.features(np.arange(len(rebuilt))).layers, good.layers)


def test_a_shard_modified_after_its_record_is_checked_in_full(tiny_task, tmp_path, monkeypatch):
    open_for_training, path, good = checked_entry(tiny_task, tmp_path)
    monkeypatch.setattr(cache_entry, "sampled_checksum", lambda file: "")  # only the times tell
    for shard in range(3):
        cache_entry.write_record(path, shard, {name: {**record, "sample": ""} for name, record in
                                               json.loads(cache_entry.record_file(path, shard).read_text()).items()})
    shard = path / "shard-00001.cls.npy"
    original = shard.read_bytes()
    flip_a_byte(shard)
    recorded_earlier(shard)
    hashed = count_hashes(monkeypatch)
    rebuilt = open_for_training()
    assert shard.read_bytes() == original and len(hashed) >= 1
    assert torch.equal(rebuilt.features(np.arange(len(rebuilt))).pooled, good.pooled)


def test_a_change_with_its_modification_time_put_back_is_found_in_the_sampled_blocks(tiny_task, tmp_path):
    open_for_training, path, good = checked_entry(tiny_task, tmp_path)
    shard = path / "shard-00002.layers.npy"
    original, modified = shard.read_bytes(), shard.stat().st_mtime_ns
    flip_a_byte(shard, from_end=1)  # the last sampled block ends the file
    os.utime(shard, ns=(modified, modified))

    rebuilt = open_for_training()
    assert shard.read_bytes() == original
    assert torch.equal(rebuilt.features(np.arange(len(rebuilt))).layers, good.layers)


def test_shards_copied_with_new_times_are_checked_once_and_kept(tiny_task, tmp_path, monkeypatch):
    open_for_training, path, good = checked_entry(tiny_task, tmp_path)
    shards = sorted(path.glob("shard-*.npy"))
    inodes = [file.stat().st_ino for file in shards]
    for file in shards:  # as `cp -r` without -p leaves them
        recorded_earlier(file)
    hashed = count_hashes(monkeypatch)
    open_for_training()
    assert len(hashed) == len(shards)
    assert [file.stat().st_ino for file in shards] == inodes  # checked and recorded afresh, not rebuilt
    hashed.clear()
    open_for_training()
    assert hashed == []


def test_an_entry_without_records_is_checked_in_full_once_and_gets_them(tiny_task, tmp_path, monkeypatch):
    open_for_training, path, good = checked_entry(tiny_task, tmp_path)
    records = {file.name: file.read_bytes() for file in path.glob("shard-*.json")}
    for name in records:  # as an entry written before records were
        (path / name).unlink()
    hashed = count_hashes(monkeypatch)
    open_for_training()
    assert len(hashed) == 3 * 2  # every file of its 3 shards
    assert {file.name: file.read_bytes() for file in path.glob("shard-*.json")} == records
    hashed.clear()
    open_for_training()
    assert hashed == []


def test_without_meta_a_corrupted_shard_is_rebuilt_not_adopted(tiny_task, tmp_path):
    open_for_training, path, good = checked_entry(tiny_task, tmp_path)
    meta = json.loads((path / "meta.json").read_text())
    shard = path / "shard-00001.layers.npy"
    original = shard.read_bytes()
    flip_a_byte(shard)
    (path / "meta.json").unlink()

    rebuilt = open_for_training()
    assert shard.read_bytes() == original
    assert json.loads((path / "meta.json").read_text())["checksums"] == meta["checksums"]
    assert torch.equal(rebuilt.features(np.arange(len(rebuilt))).layers, good.layers)


def test_a_shard_whose_build_was_killed_before_its_record_is_rebuilt(tiny_task, tmp_path):
    open_for_training, path, good = checked_entry(tiny_task, tmp_path)
    (path / "meta.json").unlink()
    cache_entry.record_file(path, 1).unlink()
    kept, unrecorded = path / "shard-00000.cls.npy", path / "shard-00001.cls.npy"
    inodes = kept.stat().st_ino, unrecorded.stat().st_ino

    rebuilt = open_for_training()
    assert kept.stat().st_ino == inodes[0] and unrecorded.stat().st_ino != inodes[1]
    assert cache_entry.record_file(path, 1).exists()
    assert torch.equal(rebuilt.features(np.arange(len(rebuilt))).layers, good.layers)


def test_a_read_only_entry_is_checked_on_every_open_and_never_written(tiny_task, tmp_path, monkeypatch):
    backbone = tiny_vit()
    images = open_split(tiny_task, "test")
    preprocess = Preprocess(32, backbone.config.mean, backbone.config.std)
    path = build_cache(tmp_path, CacheKey(backbone, images, preprocess), SHARDS_OF_4)
    monkeypatch.setattr(cache_build.os, "access", lambda path, mode: False)  # root may write anywhere
    meta = (path / "meta.json").read_bytes()
    open_or_build_cache(tmp_path, CacheKey(backbone, images, preprocess, with_layers=True), SHARDS_OF_4)
    flip_a_byte(path / "shard-00002.cls.npy", from_end=1)
    with pytest.raises(DataError, match=r"shard-00002.cls.npy: corrupted \(its checksum differs\) in a read-only"):
        open_or_build_cache(tmp_path, CacheKey(backbone, images, preprocess, with_layers=True), SHARDS_OF_4)
    assert (path / "meta.json").read_bytes() == meta and not (path / ".lock").exists()


def test_a_corrupted_adapter_is_refused(tiny_backbone_dir, tiny_task, tmp_path, capsys):
    out = tmp_path / "run"
    main([str(a) for a in train_args(tiny_backbone_dir, tiny_task, out, "--no-cache")])
    load_run(out)
    flip_a_byte(out / "adapter.safetensors", from_end=3)  # a weight's bytes: still a readable safetensors file
    with pytest.raises(CheckpointError, match=r"adapter.safetensors: corrupted \(its sha256 differs from "
                                              r"adapter.sha256\); train the run again"):
        load_run(out)
    (out / "adapter.sha256").unlink()  # no checksum, nothing to check the adapter against: refused
    with pytest.raises(CheckpointError, match=r"adapter.sha256: not found, so adapter.safetensors cannot be checked"):
        load_run(out)


# --- the trunk's held weights ---------------------------------------------------------------------------

def test_the_bf16_trunk_holds_its_weights_in_bf16_and_computes_what_autocast_computes():
    """The trunk of a bf16 run reads its linear and convolution weights held in bfloat16 (autocast would
    re-cast the float32 ones on every call), and its features are those of autocast over the float32 weights."""
    backbone = tiny_vit(layer_scale=True)
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        layers = []
        last = backbone.run_blocks(backbone.embed(images), after_norm=lambda _, u: layers.append(u.half()))
        pooled = backbone.pool(last).half()
    held = extract_features(backbone, images, precision=Precision.BF16)
    torch.testing.assert_close(held.pooled, pooled, atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(held.layers, torch.stack(layers, dim=1), atol=1e-3, rtol=1e-3)
    twin = held_weights(backbone, torch.bfloat16)
    assert twin.blocks[0].attn.qkv.weight.dtype == twin.patch_embed.proj.weight.dtype == torch.bfloat16
    assert twin.blocks[0].norm1.weight is backbone.blocks[0].norm1.weight  # the rest is shared, not copied
    assert held_weights(backbone, torch.bfloat16) is twin  # made once
    with torch.no_grad():
        backbone.blocks[0].attn.qkv.weight.mul_(2)  # changed weights: the twin is made again
    assert torch.equal(held_weights(backbone, torch.bfloat16).blocks[0].attn.qkv.weight,
                       backbone.blocks[0].attn.qkv.weight.bfloat16())
    assert backbone.blocks[0].attn.qkv.weight.dtype == torch.float32  # the backbone itself is untouched


# --- the key ------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("with_layers", "precision", "folder"), [
    (True, Precision.FP32, "cats-train800-1bfd0350f13e523f"),
    (True, Precision.FP16, "cats-train800-1bfd0350f13e523f"),  # an fp16 run's trunk runs in float32
    (True, Precision.BF16, "cats-train800-bf16-15eb6255bce6d3aa"),
    (False, Precision.FP32, "cats-train800-cls-6e42ec6d4684017f"),
    (False, Precision.BF16, "cats-train800-cls-bf16-4fea2b7825f91ae4"),
])
def test_an_entry_keeps_its_folder_and_digest_so_existing_caches_still_match(with_layers, precision, folder, tmp_path):
    """Fixed inputs give the folder names (and digests) the cache has always given them: changing what the key
    hashes would orphan every entry on disk."""
    items = []
    for index in range(2):
        image = tmp_path / "cats" / f"img{index}.png"
        image.parent.mkdir(exist_ok=True)
        image.write_bytes(bytes([index]) * (10 + index))
        os.utime(image, ns=(1_700_000_000_000_000_000 + index,) * 2)
        items.append((image, index))
    backbone = tiny_vit()
    setattr(backbone, cache_entry.FINGERPRINT_ATTRIBUTE, "0" * 64)  # the weights' hash, fixed here
    key = CacheKey(backbone, ImageList(tmp_path / "cats", "train800", tuple(items), None),
                   Preprocess(32, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)), with_layers, precision)
    assert key.folder(Path("root")) == Path("root") / folder
    assert key.digest().startswith(folder.rsplit("-", 1)[1])
    if (with_layers, precision) == (True, Precision.FP32):
        assert key.digest() == "1bfd0350f13e523f69c12841a8b2bd7620692f17835c6ede4103372f350a06cf"


def test_draft_decoding_changes_the_pixels_and_the_key_only_when_on(tmp_path):
    """JPEG draft mode decodes a large JPEG at a reduced scale, so its pixels differ a little and it enters the
    entry's key; off (the default) the key is the one entries have always had."""
    from PIL import Image

    from querytune.data import ImageDataset

    folder = tmp_path / "dogs"
    folder.mkdir()
    generator = np.random.default_rng(0)
    Image.fromarray(generator.integers(0, 256, (128, 128, 3), dtype=np.uint8)).save(folder / "big.jpg", quality=90)
    Image.fromarray(generator.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(folder / "small.jpg", quality=90)
    images = ImageList(folder, "train800", ((folder / "big.jpg", 0), (folder / "small.jpg", 1)), None)
    plain, draft = (Preprocess(32, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), draft=on) for on in (False, True))
    full, drafted = ImageDataset(images, plain)[0][0], ImageDataset(images, draft)[0][0]
    assert drafted.shape == full.shape and 0 < (drafted - full).abs().mean() < 0.2  # 1/4 scale, then the resize
    assert torch.equal(ImageDataset(images, draft)[1][0], ImageDataset(images, plain)[1][0])  # under twice: as is
    assert torch.equal(ImageDataset(images, draft)[0, 7][0], ImageDataset(images, plain)[0, 7][0])  # augmented: as is
    backbone = tiny_vit()
    setattr(backbone, cache_entry.FINGERPRINT_ATTRIBUTE, "0" * 64)
    keys = [CacheKey(backbone, images, preprocess).digest() for preprocess in (plain, Preprocess(32, plain.mean,
                                                                                                 plain.std), draft)]
    assert keys[0] == keys[1] != keys[2]


# --- housekeeping: build again, ls, rm, prune ---------------------------------------------------------

def test_cache_commands_build_list_remove_and_prune(tiny_backbone_dir, tiny_task, tmp_path, capsys):
    root = tmp_path / "cache"
    both = cache_args(tiny_backbone_dir, tiny_task, root)
    both[both.index("--splits") + 1] = "train800val200,test"
    main(both)
    assert capsys.readouterr().out.count(", built ->") == 2
    main(both)  # the same build again: a no-op that says so
    out = capsys.readouterr().out
    assert out.count("exists already, nothing to do") == 2 and "built" not in out

    main(["cache", "ls", "--cache", str(root)])
    listing = capsys.readouterr().out
    entries = sorted(p.name for p in root.iterdir())
    assert all(name in listing for name in entries) and "tiny/test" in listing and "tiny/train800val200" in listing
    size = sum(file.stat().st_size for file in root.rglob("*") if file.is_file())
    assert f"2 entries, {human_size(size)} in {root}" in listing

    train_entry = next(name for name in entries if "train800val200" in name)
    long_ago = time.time() - 3 * 86400
    os.utime(root / train_entry / "meta.json", (long_ago, long_ago))
    main(["cache", "prune", "--older-than", "2d", "--cache", str(root)])
    assert f"removed {train_entry}" in capsys.readouterr().out
    assert sorted(p.name for p in root.iterdir()) == [n for n in entries if n != train_entry]

    main(["cache", "prune", "--max-size", "1K", "--cache", str(root)])
    assert "1 removed, 0 left" in capsys.readouterr().out and list(root.iterdir()) == []

    assert "no such entry" in cli_error(capsys, "cache", "rm", "nothing-here", "--cache", root)
    assert "--older-than '7 days'" in cli_error(capsys, "cache", "prune", "--older-than", "7 days", "--cache", root)
    assert "--max-size" in cli_error(capsys, "cache", "prune", "--cache", root)


def test_cache_rm_removes_an_entry_and_refuses_one_being_built(tiny_backbone_dir, tiny_task, tmp_path, capsys):
    import fcntl

    root = tmp_path / "cache"
    main(cache_args(tiny_backbone_dir, tiny_task, root))
    (entry,) = root.iterdir()
    with open(entry / ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # as a builder holds it
        assert "another process is building it" in cli_error(capsys, "cache", "rm", entry.name, "--cache", root)
    main(["cache", "rm", entry.name, "--cache", str(root)])
    assert not entry.exists()


def test_cache_splits_chooses_the_cached_splits_of_a_run(tiny_backbone_dir, tiny_task, tmp_path, capsys):
    root = tmp_path / "cache"
    args = [a for a in train_args(tiny_backbone_dir, tiny_task, tmp_path / "run") if a != "-q"]
    args[args.index("linear")] = "vqt"
    main([str(a) for a in args] + ["--cache", str(root)])
    assert [entry.name.split("-")[1] for entry in root.iterdir()] == ["train800val200"]  # the test split ran live
    main([str(a) for a in args] + ["--out", str(tmp_path / "all"), "--cache", str(tmp_path / "all-cache"),
                                   "--cache-splits", "train800val200,test"])
    assert sorted(entry.name.split("-")[1] for entry in (tmp_path / "all-cache").iterdir()) == ["test",
                                                                                                "train800val200"]
    live, cached = (json.loads((tmp_path / run / "metrics.json").read_text()) for run in ("run", "all"))
    assert live["test_accuracy"] == cached["test_accuracy"]

    error = cli_error(capsys, *args, "--out", tmp_path / "other", "--cache-splits", "val200")
    assert error == "error: --cache-splits 'val200': not a split of this run (test, train800val200)"
    assert "exclude each other" in cli_error(capsys, *args, "--no-cache", "--cache-splits", "test")


def test_train800_and_val200_are_read_from_the_train800val200_entry(tiny_backbone_dir, tiny_task, tmp_path, capsys):
    backbone = tiny_vit()
    preprocess = Preprocess(32, backbone.config.mean, backbone.config.std)
    whole = open_split(tiny_task, "train800val200")
    shared, own = tmp_path / "shared", tmp_path / "own"
    open_or_build_cache(shared, CacheKey(backbone, whole, preprocess, with_layers=True), SHARDS_OF_4)
    for split in ("train800", "val200"):
        images = open_split(tiny_task, split)
        own_entry = build_cache(own, CacheKey(backbone, images, preprocess), SHARDS_OF_4)
        part = open_or_build_cache(shared, CacheKey(backbone, images, preprocess, with_layers=True), SHARDS_OF_4)
        assert len(part) == len(images) and part.labels.tolist() == [label for _, label in images.items]
        order = np.random.default_rng(0).permutation(len(images))
        want, got = FeatureCache.open(own_entry).features(order), part.features(order)
        assert torch.equal(got.layers, want.layers) and torch.equal(got.pooled, want.pooled)
        pooled, layers = part.load(torch.device("cpu"))  # as a GPU run holds an entry
        assert torch.equal(pooled, FeatureCache.open(own_entry).load(torch.device("cpu"))[0])
        assert torch.equal(layers.transpose(0, 1), want.layers[np.argsort(order)])
        assert part.nbytes() == FeatureCache.open(own_entry).nbytes()
    assert [entry.name.split("-")[1] for entry in shared.iterdir()] == ["train800val200"]  # no entry of their own
    # training on a part with nothing cached builds the whole split's entry, for the other part and the final runs
    fresh = tmp_path / "fresh"
    part = open_or_build_cache(fresh, CacheKey(backbone, open_split(tiny_task, "val200"), preprocess), SHARDS_OF_4)
    assert len(part) == 6 and [entry.name.split("-")[1] for entry in fresh.iterdir()] == ["train800val200"]
    # a class-token reader (the linear probe) does not build per-layer features it will not read
    cls_only = tmp_path / "cls-only"
    open_or_build_cache(cls_only, CacheKey(backbone, open_split(tiny_task, "val200"), preprocess, with_layers=False),
                        SHARDS_OF_4)
    assert [entry.name.split("-")[1:3] for entry in cls_only.iterdir()] == [["val200", "cls"]]

    # `cache build` of the parts builds nothing either; a split not all in the whole gets its own entry.
    args = ["cache", "build", "--backbone", str(tiny_backbone_dir), "--data", str(tiny_task), "--cache",
            str(tmp_path / "cli"), "--image-size", "32", "--workers", "0", "-q"]
    main([*args, "--splits", "train800val200,train800,val200"])
    out = capsys.readouterr().out
    assert out.count(", built ->") == 1 and out.count("exists already, nothing to do") == 2
    (tiny_task / "val200.txt").write_text((tiny_task / "val200.txt").read_text() + "images/test/00000.jpg 0\n")
    main([*args, "--splits", "val200"])
    assert ", built ->" in capsys.readouterr().out
