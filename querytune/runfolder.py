"""The run folder, its one owner: what ``train`` writes and ``eval``, ``predict`` and methods
that build on a finished run (``memory --extend``) read.

    config.json          everything needed to rebuild the method (written first)
    checkpoint.pt        resumable state while training (removed once finished)
    log.jsonl            one line per epoch (:mod:`querytune.runlog`)
    curves.png           loss, learning rate, train and validation accuracy, drawn from log.jsonl
    log.csv, tensorboard/  the same records, with --log csv / --log tensorboard
    adapter.safetensors  the trainable state, written when training ends
    adapter.sha256       its checksum (``sha256sum -c`` reads it), checked whenever the adapter is loaded
    metrics.json         the results, written last: its presence marks the run finished
    .lock                held by the process training the run, while it does (:func:`lock_run_folder`)

Every file appears under its name only once whole (:mod:`querytune.files`); a write that
fails (full disk, read-only folder) is a one-line StorageError naming the folder.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from safetensors.torch import load, save

from .errors import CheckpointError, StorageError, one_line
from .files import (
    LOCK_FILE,
    folder_lock,
    remove_stale_temporaries,
    storage_error,
    write_atomic,
    write_json,
    write_text,
)

ADAPTER = "adapter.safetensors"
ADAPTER_CHECKSUM = "adapter.sha256"

if TYPE_CHECKING:
    from .methods.base import Method


def run_settings(config: dict[str, Any]) -> dict[str, Any]:
    """The parts of config.json that must match for a run to be resumed."""
    keys = ("method", "options", "backbone", "data", "train_split", "image_size", "train", "normalisation")
    return {k: config[k] for k in keys}


def setting_differences(saved: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    """How two runs' settings differ, as 'train.seed: 0 -> 1' (one level into mappings)."""
    differences = []
    for key in sorted(set(saved) | set(wanted)):
        old, new = saved.get(key), wanted.get(key)
        if isinstance(old, dict) and isinstance(new, dict):
            differences += [f"{key}.{item}: {old.get(item)!r} -> {new.get(item)!r}"
                            for item in sorted(set(old) | set(new)) if old.get(item) != new.get(item)]
        elif old != new:
            differences.append(f"{key}: {old!r} -> {new!r}")
    return differences


def lock_run_folder(out: Path) -> AbstractContextManager[None]:
    """Hold the run folder ``out`` while a run is checked, trained and finished in it: another process
    training in it is refused, naming it (:func:`querytune.files.folder_lock`; a folder it creates is
    removed again unless the run is started in it)."""
    def refuse(holder: str) -> None:
        raise CheckpointError(f"{out}: another process is training in it ({holder}); wait for it to end or "
                              "choose another --out")

    if out.exists() and not out.is_dir():
        raise CheckpointError(f"{out}: is a file, not a run folder")
    return folder_lock(out, refuse)


def check_run_folder(out: Path, config: dict[str, Any]) -> str:
    """What ``out`` holds for a run of these settings: "new" (absent or empty), "unfinished" (to
    resume) or "finished" (the same run done: rerunning it is a no-op). Anything else is an error:
    a run with other settings (which it lists), or a folder that is not a run. Writes nothing (it
    only removes what killed writers left)."""
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"{out}: is a file, not a run folder")
    if out.is_dir():
        remove_stale_temporaries(out)  # e.g. a config.json whose writer was killed
    config_path = out / "config.json"
    if config_path.exists():
        finished = (out / "metrics.json").exists()
        try:
            differences = setting_differences(run_settings(json.loads(config_path.read_text())),
                                              run_settings(config))
        except (OSError, ValueError, TypeError, KeyError) as error:
            raise CheckpointError(f"{config_path}: not a querytune run config ({one_line(error)})") from error
        if differences:
            state = "a finished" if finished else "an unfinished"
            raise CheckpointError(f"{out}: holds {state} run with other settings ({'; '.join(differences[:4])}"
                                  f"{'; ...' if len(differences) > 4 else ''}); choose another --out")
        return "finished" if finished else "unfinished"
    if out.exists() and any(path.name != LOCK_FILE for path in out.iterdir()):
        raise CheckpointError(f"{out}: exists, is not empty and is not a querytune run folder")
    return "new"


def start_run_folder(out: Path, config: dict[str, Any]) -> bool:
    """Create the run folder with its config.json; return whether the folder itself was created."""
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise storage_error(out, error, "the run folder") from error
    try:
        write_json(out / "config.json", config)
    except StorageError:
        discard_run_folder(out, created)
        raise
    return created


def discard_run_folder(out: Path, created: bool) -> None:
    """Undo :func:`start_run_folder` and what followed: the folder was absent or empty before."""
    if created:
        shutil.rmtree(out, ignore_errors=True)
        return
    for path in out.iterdir():
        if path.name != LOCK_FILE:  # its holder removes it
            shutil.rmtree(path) if path.is_dir() else path.unlink()


def save_adapter(out: Path, method: Method) -> None:
    """Write the adapter, then its checksum (an adapter without one, from a killed run, is rewritten on resume)."""
    data = save({k: v.contiguous().cpu() for k, v in method.trainable_state_dict().items()})
    write_atomic(out / ADAPTER, lambda tmp: tmp.write_bytes(data))
    write_text(out / ADAPTER_CHECKSUM, f"{hashlib.sha256(data).hexdigest()}  {ADAPTER}\n")


def read_metrics(run: Path) -> dict[str, Any]:
    """A finished run's metrics.json."""
    try:
        return json.loads((run / "metrics.json").read_text())
    except (OSError, ValueError) as error:
        raise CheckpointError(f"{run / 'metrics.json'}: unreadable ({one_line(error)})") from error


def finish_run_folder(out: Path, metrics: dict[str, Any]) -> None:
    """Write metrics.json, which marks the run finished, and drop the resumable checkpoint."""
    write_json(out / "metrics.json", metrics)
    (out / "checkpoint.pt").unlink(missing_ok=True)


def record_accuracy(run: Path, split: str, accuracy: float) -> dict[str, Any]:
    """Add the accuracy on ``split``, measured after training (``eval_runs``), to a finished run's
    metrics.json; return the metrics."""
    metrics = {**read_metrics(run), "eval_split": split, f"{split}_accuracy": accuracy}
    write_json(run / "metrics.json", metrics)
    return metrics


def read_run_config(run: str | Path) -> dict[str, Any]:
    """The config.json of a finished run (one with its adapter written)."""
    run = Path(run)
    config_path = run / "config.json"
    for path in (config_path, run / ADAPTER):
        if not path.is_file():
            raise CheckpointError(f"{path}: not found; is {run} a finished querytune run?")
    try:
        config = json.loads(config_path.read_text())
        missing = [k for k in ("method", "options", "num_classes", "image_size", "backbone") if k not in config]
        missing += [f"backbone.{k}" for k in ("source", "fingerprint", "name") if k not in config.get("backbone", {})]
        if missing:
            raise KeyError(f"missing {', '.join(missing)}")
        config["num_classes"] = int(config["num_classes"])
    except (ValueError, TypeError, KeyError, AttributeError) as error:
        raise CheckpointError(f"{config_path}: not a querytune run config ({type(error).__name__}: "
                              f"{one_line(error)})") from error
    return config


def load_adapter(run: str | Path, method: Method) -> None:
    """Load a finished run's adapter into ``method`` (built from the run's config), checked against its
    checksum."""
    adapter_path = Path(run) / ADAPTER
    checksum_path = Path(run) / ADAPTER_CHECKSUM
    try:
        data = adapter_path.read_bytes()
    except OSError as error:
        raise CheckpointError(f"{adapter_path}: not a readable adapter ({one_line(error)})") from error
    try:
        expected = checksum_path.read_text().split()[0]
    except FileNotFoundError:
        raise CheckpointError(f"{checksum_path}: not found, so {ADAPTER} cannot be checked against it; train the "
                              "run again") from None
    except (OSError, IndexError) as error:
        raise CheckpointError(f"{checksum_path}: not a readable checksum ({one_line(error)})") from error
    if hashlib.sha256(data).hexdigest() != expected:
        raise CheckpointError(f"{adapter_path}: corrupted (its sha256 differs from {checksum_path.name}); "
                              "train the run again")
    try:
        state = load(data)
    except Exception as error:  # safetensors raises its own error types for torn files
        raise CheckpointError(f"{adapter_path}: not a readable adapter ({one_line(error)})") from error
    method.load_trainable_state_dict(state, source=str(adapter_path))
