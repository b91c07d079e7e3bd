"""``querytune predict | serve | export``: finished runs put to use."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Optional

import typer

from ..errors import ConfigError
from ..service import ServiceLimits
from ..settings import Runtime
from .app import app, console
from .flags import Flags, Given, settings_command

PREDICT_RUNTIME = Flags(Runtime, "Options", ("device", "workers"))  # "Options": typer's own panel
SERVE_GROUPS = (Flags(ServiceLimits, "Limits"), Flags(Runtime, "Options", ("device",)))
RunsOpt = typer.Option(..., "--run", "-r", help="a finished run of any method; repeat for more tasks")
BackboneOpt = typer.Option(None, "--backbone", "-b", help="default: the first run's own")


@app.command()
@settings_command(PREDICT_RUNTIME)
def predict(
    given: Given,
    images: list[Path] = typer.Argument(..., help="image files and folders of images (searched recursively)"),
    run: list[Path] = RunsOpt,
    backbone: Optional[str] = BackboneOpt,
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="JSON-lines file (default: standard output)"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace an existing --out file"),
    topk: int = typer.Option(1, "--topk", help="also list each task's k most probable classes (under 'top')"),
    logits: bool = typer.Option(False, "--logits", help="also write each task's logits"),
    batch_size: int = typer.Option(32),
    skip_bad: bool = typer.Option(False, "--skip-bad", help="go on past an image that cannot be read: named on "
                                  "stderr, its line is {\"path\", \"error\"} (default: stop, exit 2)"),
) -> None:
    """Answer every run's task, the frozen-backbone runs from one shared backbone pass per image batch and each
    run that adapts the backbone from its own: one JSON line per image."""
    from ..files import write_atomic
    from ..serve import MultiTaskServer, collect_images

    if out is not None:
        if out.exists() and not overwrite:
            raise ConfigError(f"{out}: exists; pass --overwrite to replace it")
        if not out.parent.is_dir():
            raise ConfigError(f"{out}: its folder does not exist")
    if topk < 1:
        raise ConfigError(f"--topk must be at least 1 (got {topk})")
    runtime = Runtime(**given[Runtime])
    paths = collect_images(images)
    server = MultiTaskServer.from_runs(backbone, run, device=runtime.device)
    skipped = 0

    def records() -> Iterator[str]:
        nonlocal skipped
        for record in server.predict_files(paths, batch_size, runtime.num_workers, topk, logits, skip_bad):
            if "error" in record:
                skipped += 1
                typer.echo(f"skipped {record['error']}", err=True)
            yield json.dumps(record)

    if out is None:
        for line in records():
            print(line, flush=True)
        return

    def write(tmp: Path) -> None:
        with open(tmp, "w") as handle:
            for line in records():
                handle.write(line + "\n")

    write_atomic(out, write)  # a failed run leaves no partial --out behind
    console.print(f"{len(paths) - skipped} images x {len(server.tasks)} tasks -> {out}"
                  + (f" ({skipped} skipped)" if skipped else ""), highlight=False)


@app.command("export")
def export_command(
    runs: list[Path] = typer.Argument(..., help="a finished run folder; several frozen-backbone runs for onnx"),
    format: str = typer.Option(..., "--format", "-f", help="peft (LoRA runs), merged (linear, full, LoRA, "
                                                             "BitFit) or onnx (any run)"),
    out: Path = typer.Option(..., "--out", "-o", help="the export folder (absent or empty)"),
) -> None:
    """Export runs for other tools, with a model card: PEFT adapter, merged ViT weights, or an ONNX graph."""
    from ..export import export_runs

    done = export_runs(runs, format, out)
    state = "already holds this export; nothing to do" if done.unchanged else "written"
    console.print(f"{out}: {state} ({', '.join(done.files)})", highlight=False, soft_wrap=True)


@app.command()
@settings_command(*SERVE_GROUPS)
def serve(
    given: Given,
    run: Optional[list[Path]] = typer.Option(None, "--run", "-r", help="a finished run of any method; repeat for "
                                             "more tasks"),
    runs_dir: Optional[Path] = typer.Option(None, "--runs-dir", help="serve every finished run in this folder, as "
                                            "runs come, change and go (needs --backbone)"),
    poll_seconds: float = typer.Option(2.0, "--poll-seconds", help="how often --runs-dir is read again (also at once "
                                       "on SIGHUP or POST /admin/reload)", min=0.1),
    backbone: Optional[str] = BackboneOpt,
    host: str = typer.Option("127.0.0.1", help="address to listen on"),
    port: int = typer.Option(8000, help="port to listen on"),
    token_file: Optional[Path] = typer.Option(None, help="file holding the token that every request but GET /health "
                                              "must send as 'Authorization: Bearer <token>' (or env QUERYTUNE_TOKEN)"),
    no_auth: bool = typer.Option(False, "--no-auth", help="answer anyone on a non-loopback --host, without a token"),
    access_log: str = typer.Option("-", help="append one JSON line per request to this file (-: stderr)"),
) -> None:
    r"""Answer every run's task over HTTP: POST /predict (images), GET /tasks, GET /health, GET /metrics, POST
    /admin/reload, and a page at /. Needs the extra querytune\[serve]; docs/serving.md."""
    from ..serve import MultiTaskServer
    from ..service import ServiceAccess
    from ..service import serve as run_service
    from ..service.live import LiveRuns

    if bool(run) == (runs_dir is not None):
        raise ConfigError("give the runs to serve: --run (repeated) or --runs-dir, not both")
    if runs_dir is not None and backbone is None:
        raise ConfigError("--runs-dir needs --backbone: the backbone its runs are served on")
    limits = ServiceLimits(**given[ServiceLimits])  # checked before any work
    access = ServiceAccess.from_options(host, token_file, no_auth, access_log)  # before the model loads
    device = Runtime(**given[Runtime]).device
    runs: MultiTaskServer | LiveRuns
    if runs_dir is not None:
        assert backbone is not None
        runs = LiveRuns(runs_dir, backbone, device)
        runs.scan()
        served = f"the runs in {runs_dir} ({len(runs.current.tasks) if runs.current else 0} now)"
    else:
        runs = MultiTaskServer.from_runs(backbone, run or [], device=device)
        served = ", ".join(task.name for task in runs.tasks)
    console.print(f"serving {served} on http://{host}:{port} ({'token required' if access.keys else 'no token'})",
                  highlight=False)
    run_service(runs, host, port, limits, access, poll_seconds)
