"""`querytune serve` under load on loopback: throughput and latency, then a mix of good and malformed requests.

    python benchmarks/serve_load.py                                   # DINOv2 ViT-S/14 at 224 px, K = 1 and 8
    python benchmarks/serve_load.py --backbone tiny --faults 10000    # a tiny random ViT at 32 px
    python benchmarks/serve_load.py --image-size 56 --tasks 4 --faults 10000 --churn 1  # runs come and go

For each K in ``--tasks`` it trains K frozen-backbone runs (cycling ``--methods``, one epoch on
``--train-split`` of ``--data``, sharing one feature cache), starts ``querytune serve`` on them in a
process of its own, with a token (``--token-file``, sent by every client) and an access log, and then:

1. load: ``--clients`` clients each post one test image after another for ``--seconds``; reports
   throughput, p50/p99 latency, errors (any answer but 200) and the server's RSS and peak RSS;
2. faults (``--faults`` requests, when given): the clients cycle through good requests (raw body and a
   two-image form) and malformed ones (wrong content type, truncated image, not an image, empty body,
   unknown task, no token, a wrong token), plus a few 100 MB bodies and slow clients (who send half a
   body and stall). Every good answer is checked against the engine's own answer for that image, every
   bad one must be a 4xx (401 for the tokens); the server's RSS is read after a warm-up and at the end.

Once the server has stopped, its access log must hold one JSON line per request it was sent, and none
of the bodies. Then, with ``--faults``, a fresh server (``--header-timeout`` 2 s) meets

3. slow headers (``--slow-connections``, from 8 client addresses): half send nothing, half a header line every
   second and never the end of the headers; each must get 408 and be closed at the header timeout, while
   ``/health`` is answered meanwhile;
4. decode memory: ``--bomb-count`` concurrent POSTs of one ``--bomb-side`` squared 16-bit RGBA PNG (all zeros: a
   few hundred KB that decode to gigabytes), each answered 200; the server's RSS before, after and at its peak.

(``--slow-connections 0 --bomb-count 0`` skip 3 and 4.) With ``--churn S`` the K runs are served from a
``--runs-dir`` (``--poll-seconds`` S/2) and, during the fault phase, a :class:`Churn` changes that folder every S
seconds: ``--churn-tasks`` more tasks, two versions each (random adapters written as real run folders), are
added whole, copied straight in or written file by file, removed, or have their adapter overwritten in place.
Every good answer must then hold the K tasks and answer each task as one whole version of it
(:func:`consistent_answer`), and one more kind of request names a churned task (200 or 404). The server's RSS is
sampled every second (the second half's slope and last / first are printed).

It prints one JSON line per K and phase, then a table, and exits 1 if any check failed. Nothing here is
a timed test: figures depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import secrets
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import psutil
import torch

from querytune import MultiTaskServer, load_run, train_run
from querytune.backbones import save_backbone
from querytune.backbones.vit import VisionTransformer, ViTConfig
from querytune.data import open_split
from querytune.runfolder import ADAPTER, ADAPTER_CHECKSUM, save_adapter
from querytune.settings import RunSpec, Runtime

SHARED = Path(__file__).resolve().parents[2] / "shared"
DINOV2 = SHARED / "weights" / "dinov2-small-imgfocus"
DATA = SHARED / "data" / "vtab1k-mini" / "cifar10"
HUNDRED_MB = 100_000_000
NOT_AN_IMAGE = b"<html>not an image</html>"  # a body that must not reach the access log
HEADER_TIMEOUT = 2.0  # the second server's --header-timeout
SLOW_READ_TIMEOUT = 2.0  # the server's --read-timeout: how long a slow client holds a request (a good one, sent
# by a client on a busy 2-core machine, must still arrive within it)


def make_runs(backbone: str, data: Path, split: str, image_size: int, methods: list[str], count: int,
              root: Path) -> list[Path]:
    """``count`` runs, cycling through ``methods`` (the first K of them serve K tasks)."""
    runs = []
    for i in range(count):
        method = methods[i % len(methods)]
        run = root / f"{method}-{i}"
        train_run(RunSpec(method=method, backbone=backbone, data=data, train_split=split, eval_split=None,
                          image_size=image_size),
                  run, train={"epochs": 1, "batch_size": 32},
                  runtime=Runtime(cache=root / "cache", workers=0, progress=False))
        runs.append(run)
    return runs


def churn_versions(runs: list[Path], backbone: str, slots: int, root: Path) -> dict[str, list[Path]]:
    """Two versions of each of ``slots`` churned tasks (named churn-I), as whole run folders under root/versions/V:
    copies of the K runs, cycled, each with a random adapter of its own (and its checksum)."""
    generator = torch.Generator().manual_seed(0)
    versions: dict[str, list[Path]] = {}
    for version in range(2):
        for slot in range(slots):
            folder = root / "versions" / str(version) / f"churn-{slot}"
            shutil.copytree(runs[slot % len(runs)], folder)
            method, _ = load_run(folder, backbone)  # a backbone of its own: LoRA wraps it
            method.load_trainable_state_dict({name: tensor + torch.randn(tensor.shape, generator=generator)
                                              for name, tensor in method.trainable_state_dict().items()})
            save_adapter(folder, method)
            versions.setdefault(folder.name, []).append(folder)
    return versions


class Churn(threading.Thread):
    """Every ``interval`` s one change to the runs folder, as operators and training make them: a churned task's
    version copied in whole under a hidden name and renamed into place, copied with ``shutil.copytree`` straight
    into place (files in directory order), or written file by file as training does (each file half-written for a
    moment, metrics.json last); a task's folder deleted; its adapter and checksum overwritten in place (each half-
    written for a moment) by its other version's. Every third change is followed by ``reload()`` (``POST
    /admin/reload``); the others wait for the service's poll."""

    def __init__(self, folder: Path, versions: dict[str, list[Path]], interval: float,
                 reload: Callable[[], None]) -> None:
        super().__init__(daemon=True)
        self.folder, self.versions, self.interval, self.reload = folder, versions, interval, reload
        self.stopped = threading.Event()
        self.random = random.Random(0)
        self.served: dict[str, int] = {}  # churned task in the folder -> the version written there
        self.changes: dict[str, int] = {}
        self.reloads = 0  # POST /admin/reload sent
        self.errors: list[str] = []

    def run(self) -> None:
        while not self.stopped.wait(self.interval):
            try:
                self.change()
            except (OSError, httpx.HTTPError) as error:
                self.errors.append(f"{type(error).__name__}: {error}")

    def change(self) -> None:
        name = self.random.choice(sorted(self.versions))
        target = self.folder / name
        if name not in self.served:
            version = self.random.randrange(len(self.versions[name]))
            source = self.versions[name][version]
            kind = self.random.choice(["add renamed", "add copytree", "add file by file"])
            if kind == "add renamed":
                staged = self.folder / f".{name}.partial"
                shutil.copytree(source, staged)
                staged.rename(target)
            elif kind == "add copytree":
                shutil.copytree(source, target)
            else:
                target.mkdir()
                for file in ("config.json", ADAPTER, ADAPTER_CHECKSUM, "metrics.json"):
                    self.write_slowly(target / file, (source / file).read_bytes())
            self.served[name] = version
        elif self.random.random() < 0.5:
            kind = "remove"
            shutil.rmtree(target)
            del self.served[name]
        else:
            kind = "replace adapter"
            version = (self.served[name] + 1) % len(self.versions[name])
            for file in (ADAPTER, ADAPTER_CHECKSUM):
                self.write_slowly(target / file, (self.versions[name][version] / file).read_bytes())
            self.served[name] = version
        self.changes[kind] = self.changes.get(kind, 0) + 1
        if sum(self.changes.values()) % 3 == 0:
            self.reloads += 1
            self.reload()

    def write_slowly(self, path: Path, data: bytes) -> None:
        """``data`` written into ``path`` in two halves, a moment apart: a reader may find the first half alone."""
        with path.open("wb") as file:
            file.write(data[: len(data) // 2])
            file.flush()
            time.sleep(self.interval / 10)
            file.write(data[len(data) // 2:])


class MemorySampler(threading.Thread):
    """The RSS of process ``pid`` every ``interval`` s until stopped: (seconds since the start, MB) pairs."""

    def __init__(self, pid: int, interval: float = 1.0) -> None:
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.stopped = threading.Event()
        self.samples: list[tuple[float, float]] = []

    def run(self) -> None:
        started = time.monotonic()
        while True:
            self.samples.append((round(time.monotonic() - started, 1), memory_mb(self.pid)[0]))
            if self.stopped.wait(self.interval):
                return

    def trend(self) -> dict[str, Any]:
        """The samples, and over their second half the least-squares slope (MB a minute) and last / first."""
        half = self.samples[len(self.samples) // 2:]
        slope = statistics.linear_regression(*zip(*half)).slope * 60 if len(half) > 1 else 0.0
        return {"rss_samples_mb": [rss for _, rss in self.samples], "rss_sample_seconds": self.interval,
                "second_half_slope_mb_per_min": round(slope, 2),
                "second_half_last_over_first": round(half[-1][1] / half[0][1], 4)}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run_flags(runs: list[Path]) -> list[str]:
    """The flags that serve these runs."""
    return [flag for run in runs for flag in ("--run", str(run))]


def start_server(serving: list[str], port: int, max_body_mb: float, token_file: Path, access_log: Path,
                 *flags: str) -> subprocess.Popen:
    """``querytune serve`` with the runs of ``serving`` (:func:`run_flags`, or ``--runs-dir``), once it answers; its
    stderr goes to the access log's path with the suffix .stderr (a pipe nobody reads would fill and stall it)."""
    command = [sys.executable, "-m", "querytune", "serve", "--port", str(port), "--max-body-mb", str(max_body_mb),
               "--read-timeout", str(SLOW_READ_TIMEOUT), "--device", "cpu", "--token-file", str(token_file),
               "--access-log", str(access_log), *serving, *flags]
    stderr = access_log.with_suffix(".stderr")
    with stderr.open("w") as said:
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=said)
    deadline = time.monotonic() + 300
    while True:
        if process.poll() is not None:
            raise SystemExit(f"querytune serve exited: {stderr.read_text()}")
        if time.monotonic() > deadline:
            process.kill()
            raise SystemExit("querytune serve did not answer within 300 s")
        try:
            httpx.get(f"http://127.0.0.1:{port}/health")
            return process
        except httpx.TransportError:
            time.sleep(0.2)


def memory_mb(pid: int) -> tuple[float, float]:
    """The process's resident memory now and its peak (VmHWM), in MB."""
    rss = psutil.Process(pid).memory_info().rss / 1e6
    status = Path(f"/proc/{pid}/status").read_text()
    peak = next(int(line.split()[1]) * 1024 / 1e6 for line in status.splitlines() if line.startswith("VmHWM"))
    return round(rss, 1), round(peak, 1)


async def load(url: str, token: str, images: list[bytes], clients: int, seconds: float) -> dict[str, Any]:
    latencies: list[float] = []
    errors = 0
    headers = {"content-type": "image/jpeg", "authorization": f"Bearer {token}"}
    async with httpx.AsyncClient(base_url=url, timeout=60) as http:  # a first request warms the server up
        await http.post("/predict", content=images[0], headers=headers)
    deadline = time.monotonic() + seconds

    async def client(index: int) -> None:
        nonlocal errors
        async with httpx.AsyncClient(base_url=url, timeout=60) as http:
            i = index
            while time.monotonic() < deadline:
                started = time.perf_counter()
                response = await http.post("/predict", content=images[i % len(images)], headers=headers)
                latencies.append(time.perf_counter() - started)
                errors += response.status_code != 200
                i += clients

    started = time.monotonic()
    await asyncio.gather(*(client(i) for i in range(clients)))
    elapsed = time.monotonic() - started
    cuts = statistics.quantiles(latencies, n=100) if len(latencies) > 1 else latencies * 99
    return {"requests": len(latencies), "requests_per_s": round(len(latencies) / elapsed, 1),
            "p50_ms": round(1000 * cuts[49], 1), "p99_ms": round(1000 * cuts[98], 1), "errors": errors}


async def slow_client(port: int, token: str, image: bytes) -> int:
    """Sends the headers and half the body, then stalls: the status the server answers."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\nAuthorization: Bearer {token}"
                 f"\r\nContent-Length: {len(image)}\r\n\r\n".encode() + image[: len(image) // 2])
    await writer.drain()
    status = int((await asyncio.wait_for(reader.readline(), SLOW_READ_TIMEOUT + 30)).split()[1])
    writer.close()
    return status


async def faults(url: str, port: int, token: str, images: list[bytes], versions: list[list[dict]], required: set[str],
                 count: int, clients: int, first: int = 0, churned: tuple[str, ...] = ()) -> dict[str, Any]:
    """Requests ``first`` to ``first + count`` of the cycle through good and malformed kinds; returns counts by
    kind and what failed. A good answer must hold the tasks ``required`` and answer each task as one whole
    version of it does (``versions``: the engine's records of each version, per image; see
    :func:`consistent_answer`). With ``churned`` tasks, one more kind asks for one of them and a required one: 200
    (both answered) or 404 (naming the churned one) are right."""
    huge = b"\0" * HUNDRED_MB
    auth = {"authorization": f"Bearer {token}"}
    jpeg = {"content-type": "image/jpeg", **auth}
    kinds = ["good", "good form", "wrong content type", "truncated image", "not an image", "empty body",
             "unknown task", "no token", "wrong token"] + (["churned task"] if churned else [])
    tally: dict[str, int] = {}
    failures: list[str] = []

    async def one(http: httpx.AsyncClient, i: int) -> None:
        image = images[i % len(images)]
        answers = [version[i % len(images)]["predictions"] for version in versions]
        if i % 5000 == 199:  # a few: a 100 MB body allocates on both sides
            kind, response = "100 MB body", await http.post("/predict", content=huge, headers=jpeg)
        elif i % 1000 == 99:
            kind, status = "slow client", await slow_client(port, token, image)
            tally[kind] = tally.get(kind, 0) + 1
            if status != 408:
                failures.append(f"request {i} ({kind}): status {status}")
            return
        else:
            kind = kinds[i % len(kinds)]
            request: dict[str, Any] = {
                "good": {"content": image, "headers": jpeg},
                "good form": {"files": [("image", ("a.jpg", image)), ("image", ("b.jpg", image))], "headers": auth},
                "wrong content type": {"content": image, "headers": {"content-type": "text/plain", **auth}},
                "truncated image": {"content": image[: len(image) // 2], "headers": jpeg},
                "not an image": {"content": NOT_AN_IMAGE, "headers": jpeg},
                "empty body": {"content": b"", "headers": jpeg},
                "unknown task": {"content": image, "headers": jpeg, "params": {"tasks": "no-such-task"}},
                "no token": {"content": image, "headers": {"content-type": "image/jpeg"}},
                "wrong token": {"content": image, "headers": {**jpeg, "authorization": f"Bearer {token}x"}},
            }.get(kind, {})
            if kind == "churned task":
                asked = {min(required), churned[i % len(churned)]}
                request = {"content": image, "headers": jpeg, "params": {"tasks": ",".join(sorted(asked))}}
            response = await http.post("/predict", **request)
        if kind == "churned task":
            kind = f"churned task ({response.status_code})"
            answered = response.json().get("images", []) if response.status_code == 200 else []
            right = (len(answered) == 1 and answered[0]["predictions"].keys() == asked
                     and consistent_answer(answered[0]["predictions"], answers, asked)) if answered else (
                response.status_code == 404 and f"unknown task {churned[i % len(churned)]!r}" in response.text)
            if not right:
                failures.append(f"request {i} ({kind}): {response.text[:300]}")
        tally[kind] = tally.get(kind, 0) + 1
        if kind.startswith("churned"):
            return
        if kind.startswith("good"):
            answered = response.json().get("images", []) if response.status_code == 200 else []
            if len(answered) != (2 if kind == "good form" else 1) or not all(
                    consistent_answer(a["predictions"], answers, required) for a in answered):
                failures.append(f"request {i} ({kind}): status {response.status_code}, {response.text[:300]}")
        elif not (response.status_code == 401 if kind.endswith("token") else 400 <= response.status_code < 500) \
                or "error" not in response.json():
            failures.append(f"request {i} ({kind}): status {response.status_code}, {response.text[:200]}")

    async def client(index: int) -> None:
        async with httpx.AsyncClient(base_url=url, timeout=120) as http:
            for i in range(first + index, first + count, clients):
                try:
                    await one(http, i)
                except (httpx.HTTPError, OSError, ValueError, asyncio.TimeoutError) as error:
                    failures.append(f"request {i}: {type(error).__name__}: {error}")

    await asyncio.gather(*(client(i) for i in range(clients)))
    return {"by_kind": tally, "failures": len(failures), "first_failures": failures[:5]}


async def slow_headers(url: str, port: int, count: int) -> dict[str, Any]:
    """``count`` connections that never finish their headers (half send nothing, half a header line a second):
    how many got 408 and were closed, the longest any stayed open, and how fast ``/health`` answered meanwhile."""

    async def one(i: int) -> tuple[bool, float]:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(f"127.0.0.{2 + i % 8}", 0))
        started = time.monotonic()

        async def trickle() -> None:
            writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\n")
            while True:
                await asyncio.sleep(1)
                writer.write(b"X-Slow: 1\r\n")

        trickling = asyncio.create_task(trickle()) if i % 2 else None
        try:
            reply = await asyncio.wait_for(reader.read(), HEADER_TIMEOUT + 30)  # until the server closes
        except (OSError, asyncio.TimeoutError):
            reply = b""
        if trickling:
            trickling.cancel()
        writer.close()
        return reply.startswith(b"HTTP/1.1 408"), time.monotonic() - started

    async def health() -> float:
        await asyncio.sleep(HEADER_TIMEOUT / 2)  # while every slow connection is open
        started = time.perf_counter()
        async with httpx.AsyncClient(base_url=url, timeout=30) as http:
            (await http.get("/health")).raise_for_status()
        return time.perf_counter() - started

    *results, health_s = await asyncio.gather(*(one(i) for i in range(count)), health())
    return {"connections": count, "answered_408": sum(ok for ok, _ in results),
            "longest_open_s": round(max(seconds for _, seconds in results), 2),
            "health_ms": round(1000 * health_s, 1)}


def png16_rgba(side: int) -> bytes:
    """A ``side`` x ``side`` 16-bit RGBA PNG of zeros: small compressed, 8 bytes a pixel raw."""
    compressor = zlib.compressobj(9)
    row = bytes(1 + 8 * side)  # filter type 0, then the pixels
    pixels = b"".join(compressor.compress(row) for _ in range(side)) + compressor.flush()

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", side, side, 16, 6, 0, 0, 0)  # 16 bits, RGBA
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")


async def decode_memory(url: str, token: str, image: bytes, count: int, pid: int) -> dict[str, Any]:
    """``count`` concurrent POSTs of ``image``: their statuses, and the server's RSS before, after and at its peak."""
    before = memory_mb(pid)[0]
    started = time.monotonic()
    async with httpx.AsyncClient(base_url=url, timeout=600) as http:
        responses = await asyncio.gather(*(http.post("/predict", content=image, headers={
            "content-type": "image/png", "authorization": f"Bearer {token}"}) for _ in range(count)))
    after, peak = memory_mb(pid)
    return {"requests": count, "image_kb": round(len(image) / 1e3, 1), "seconds": round(time.monotonic() - started, 1),
            "statuses": sorted({response.status_code for response in responses}), "rss_before_mb": before,
            "rss_after_mb": after, "peak_rss_mb": peak}


def same_answer(served: dict, expected: dict) -> bool:
    """One task's answer: the same class (name and label), its probability to the rounding of another batch."""
    return (served["class"], served["label"]) == (expected["class"], expected["label"]) and abs(
        served["probability"] - expected["probability"]) < 1e-4


def consistent_answer(served: dict, versions: list[dict], required: set[str]) -> bool:
    """Whether an image's answer (task -> prediction) holds every task of ``required`` and answers each of its tasks
    as one whole version of that task does (``versions``: the engine's predictions of each version). An answer from
    a task loaded half-written, or from two versions' files mixed (one's class names with the other's weights), is
    none of them: the versions of a churned task differ in weights, so in the label and probability answered."""
    return required <= served.keys() and all(
        any(task in version and same_answer(answer, version[task]) for version in versions)
        for task, answer in served.items())


def live_log_counts(stderr: Path) -> dict[str, int]:
    """What a --runs-dir server said of its runs (lines "RUN: served", "RUN: not served: why"...), counted."""
    counts: dict[str, int] = {}
    for line in stderr.read_text().splitlines():
        for said in ("served", "replaced; now serving the new run", "removed; no longer served", "not served"):
            if line.endswith(f": {said}") or f": {said}: " in line or f": {said} any more: " in line:
                counts[said] = counts.get(said, 0) + 1
                break
    return counts


def check_access_log(log: Path, sent: int) -> dict[str, Any]:
    """The access log's lines against the requests sent; whether it holds a body it must not."""
    text = log.read_text()
    lines = [json.loads(line) for line in text.splitlines()]
    body = NOT_AN_IMAGE.decode() in text
    return {"lines": len(lines), "requests": sent, "unauthorised": sum(line["status"] == 401 for line in lines),
            "body_in_log": body, "ok": len(lines) == sent and not body}


def connection_and_decode_faults(runs: list[Path], token: str, token_file: Path, root: Path,
                                 args: argparse.Namespace) -> dict[str, Any]:
    """The slow-header and decode-memory cases, against a fresh server (so that its RSS is its own)."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    bomb = png16_rgba(args.bomb_side)
    server = start_server(run_flags(runs), port, 20, token_file, root / "access-connections.jsonl",
                          "--header-timeout", str(HEADER_TIMEOUT))
    try:
        return {"slow_headers": asyncio.run(slow_headers(url, port, args.slow_connections)),
                "decode_memory": asyncio.run(decode_memory(url, token, bomb, args.bomb_count, server.pid))}
    finally:
        server.terminate()
        server.wait(30)


def fault_phase(url: str, port: int, token: str, images: list[bytes], versions: list[list[dict]],
                required: set[str], args: argparse.Namespace, pid: int, churn: Churn | None) -> dict[str, Any]:
    """``args.faults`` requests (:func:`faults`) in two halves, while ``churn`` (if any) changes the runs folder; the
    server's RSS after the load phase (warm), after the first half and at the end (a leak grows in both halves,
    warming up, allocator arenas and caches, mostly in the first), and sampled every second."""
    before = memory_mb(pid)[0]
    sampler = MemorySampler(pid)
    sampler.start()
    if churn:
        churn.start()
    churned = tuple(sorted(churn.versions)) if churn else ()
    started = time.monotonic()
    half = args.faults // 2
    first = asyncio.run(faults(url, port, token, images, versions, required, half, args.clients, 0, churned))
    middle = memory_mb(pid)[0]
    result = asyncio.run(faults(url, port, token, images, versions, required, args.faults - half, args.clients, half,
                                churned))
    seconds = round(time.monotonic() - started, 1)
    for worker in (sampler, churn):
        if worker:
            worker.stopped.set()
            worker.join()
    after, peak = memory_mb(pid)
    result["failures"] += first["failures"]
    result["first_failures"] = (first["first_failures"] + result["first_failures"])[:5]
    for kind, count in first["by_kind"].items():
        result["by_kind"][kind] = result["by_kind"].get(kind, 0) + count
    health = httpx.get(url + "/health").json()
    return {"seconds": seconds, "rss_before_mb": before, "rss_middle_mb": middle, "rss_after_mb": after,
            "peak_rss_mb": peak, **sampler.trend(), "health": health["status"], **result,
            **({"churn": {"every_s": args.churn, "changes": churn.changes, "reloads": churn.reloads,
                          "errors": churn.errors}} if churn else {})}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", default=str(DINOV2), help="a backbone, or 'tiny' (a random ViT at 32 px)")
    parser.add_argument("--data", default=str(DATA), help="task folder the runs train on (its test images are sent)")
    parser.add_argument("--train-split", default="val200")
    parser.add_argument("--methods", default="memory,vqt,linear", help="frozen-backbone methods, cycled over tasks")
    parser.add_argument("--tasks", default="1,8", help="the values of K")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=20.0, help="length of the load phase")
    parser.add_argument("--faults", type=int, default=0, help="requests in the fault phase (0: none)")
    parser.add_argument("--images", type=int, default=64, help="distinct test images sent")
    parser.add_argument("--slow-connections", type=int, default=200, help="connections that never finish headers")
    parser.add_argument("--bomb-side", type=int, default=6300, help="side of the 16-bit RGBA PNG sent to decode")
    parser.add_argument("--bomb-count", type=int, default=16, help="concurrent POSTs of that PNG")
    parser.add_argument("--image-size", type=int, default=224, help="input size of the runs (tiny: always 32)")
    parser.add_argument("--churn", type=float, default=0.0, help="with --faults: serve the K runs from a --runs-dir "
                        "where a task is added, removed or replaced every this many seconds during the fault phase "
                        "(0: serve them with --run, no churn)")
    parser.add_argument("--churn-tasks", type=int, default=4, help="the churned tasks (two versions each)")
    parser.add_argument("--json", action="store_true", help="only the JSON lines")
    args = parser.parse_args()

    rows = []
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        backbone, image_size = args.backbone, args.image_size
        if args.backbone == "tiny":
            backbone, image_size = str(root / "tiny.safetensors"), 32
            save_backbone(VisionTransformer(ViTConfig(image_size=32, patch_size=8, embed_dim=48, depth=3,
                                                      num_heads=4, name="tiny")), backbone)
        paths = [path for path, _ in open_split(args.data, "test").items[: args.images]]
        images = [path.read_bytes() for path in paths]
        counts = [int(k) for k in args.tasks.split(",")]
        all_runs = make_runs(backbone, Path(args.data), args.train_split, image_size, args.methods.split(","),
                             max(counts), root)
        token = secrets.token_urlsafe(24)
        token_file = root / "token"
        token_file.write_text(token + "\n")
        token_file.chmod(0o600)  # serve refuses a token file others may read
        versions = churn_versions(all_runs, backbone, args.churn_tasks, root) if args.churn else {}
        for count in counts:
            runs = all_runs[:count]
            # the engine's records of each version of the tasks (the K runs have one, the churned ones two)
            expected = [MultiTaskServer.from_runs(backbone, runs + [folders[v] for folders in versions.values()],
                                                  device="cpu")(paths) for v in range(2 if versions else 1)]
            serving, served = run_flags(runs), root / f"served-{count}"
            if args.churn:
                served.mkdir()
                for run in runs:
                    shutil.copytree(run, served / run.name)
                serving = ["--runs-dir", str(served), "--backbone", backbone, "--poll-seconds", str(args.churn / 2)]
            port = free_port()
            access_log = root / f"access-{count}.jsonl"
            server = start_server(serving, port, max_body_mb=20, token_file=token_file, access_log=access_log)
            url = f"http://127.0.0.1:{port}"
            sent = 1  # requests that reached the server: start_server's answered /health
            try:
                idle = memory_mb(server.pid)
                row = {"tasks": count, "backbone": Path(args.backbone).name, "image_size": image_size,
                       "clients": args.clients, "phase": "load", "rss_idle_mb": idle[0],
                       **asyncio.run(load(url, token, images, args.clients, args.seconds))}
                row["rss_mb"], row["peak_rss_mb"] = memory_mb(server.pid)
                rows.append(row)
                sent += 1 + row["requests"]  # the warm-up, the load
                if args.faults:
                    def reload(url: str = url) -> None:
                        httpx.post(url + "/admin/reload", headers={"authorization": f"Bearer {token}"},
                                   timeout=120).raise_for_status()

                    churn = Churn(served, versions, args.churn, reload) if args.churn else None
                    row = fault_phase(url, port, token, images, expected, {run.name for run in runs}, args,
                                      server.pid, churn)
                    sent += args.faults + 1 + (churn.reloads if churn else 0)
                    rows.append({"tasks": count, "backbone": Path(args.backbone).name, "image_size": image_size,
                                 "clients": args.clients, "phase": "faults", "requests": args.faults, **row,
                                 "alive": server.poll() is None})
            finally:
                server.terminate()
                server.wait(30)
            rows[-1]["access_log"] = check_access_log(access_log, sent)
            if args.churn and args.faults:
                rows[-1]["churn"]["server_said"] = live_log_counts(access_log.with_suffix(".stderr"))
            if args.faults and (args.slow_connections or args.bomb_count):
                rows[-1].update(connection_and_decode_faults(runs, token, token_file, root, args))
    for row in rows:
        print(json.dumps(row), flush=True)
    if not args.json:
        print("\n| K | phase | requests | req/s | p50 ms | p99 ms | errors/failures | RSS MB | peak RSS MB |")
        print("|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            if r["phase"] == "load":
                print(f"| {r['tasks']} | load | {r['requests']} | {r['requests_per_s']} | {r['p50_ms']} | "
                      f"{r['p99_ms']} | {r['errors']} | {r['rss_idle_mb']} -> {r['rss_mb']} | {r['peak_rss_mb']} |")
            else:
                print(f"| {r['tasks']} | faults | {r['requests']} | {r['requests'] / r['seconds']:.1f} | | | "
                      f"{r['failures']} | {r['rss_before_mb']} -> {r['rss_middle_mb']} -> {r['rss_after_mb']} | "
                      f"{r['peak_rss_mb']} |")
    failed = any(r.get("errors") or r.get("failures") or r.get("alive") is False or r.get("churn", {}).get("errors")
                 or r.get("access_log", {"ok": True})["ok"] is False for r in rows)
    for r in rows:
        if "churn" in r and not args.json:
            churn, asked = r["churn"], {k: v for k, v in r["by_kind"].items() if k.startswith("churned")}
            print(f"\nK = {r['tasks']}, a change every {churn['every_s']} s: {churn['changes']}, {churn['reloads']} "
                  f"reloads; the server said {churn['server_said']}; {asked}. RSS over the second half: "
                  f"{r['second_half_slope_mb_per_min']} MB/min, last/first {r['second_half_last_over_first']}")
        if "slow_headers" in r:
            slow, bomb = r["slow_headers"], r["decode_memory"]
            if not args.json:
                print(f"\nK = {r['tasks']}: {slow['answered_408']}/{slow['connections']} slow-header connections "
                      f"got 408 (longest open {slow['longest_open_s']} s, /health meanwhile {slow['health_ms']} ms); "
                      f"{bomb['requests']} x {bomb['image_kb']} KB PNG ({args.bomb_side}^2, 16-bit RGBA): statuses "
                      f"{bomb['statuses']}, RSS {bomb['rss_before_mb']} -> {bomb['rss_after_mb']} MB, peak "
                      f"{bomb['peak_rss_mb']} MB, {bomb['seconds']} s")
            failed |= slow["answered_408"] != slow["connections"] or slow["longest_open_s"] > HEADER_TIMEOUT + 5 \
                or bomb["statuses"] != [200]
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
