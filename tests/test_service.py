"""``querytune serve``: a real server on a loopback port answered by a real HTTP client."""

from __future__ import annotations

import asyncio
import errno
import importlib.util
import io
import json
import logging
import os
import re
import select
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from datetime import datetime
from pathlib import Path

import pytest
from PIL import Image
from test_bad_input import cli_error

from conftest import tiny_vit, write_task
from querytune import MultiTaskServer, train_run
from querytune.backbones import load_backbone, save_backbone
from querytune.errors import ConfigError, DataError
from querytune.settings import RunSpec, Runtime

httpx = pytest.importorskip("httpx", reason="the service's tests need the test extra (httpx)")
uvicorn = pytest.importorskip("uvicorn", reason="the service needs the extra querytune[serve] (uvicorn)")
from querytune.service import ServiceAccess, ServiceLimits, create_app  # noqa: E402  (after the extra is known present)
from querytune.service import app as service_app  # noqa: E402
from querytune.service import live as service_live  # noqa: E402
from querytune.service.app import service_config  # noqa: E402
from querytune.service.connections import ConnectionGuard  # noqa: E402
from querytune.service.images import decode, decoded_bytes  # noqa: E402
from querytune.service.live import LiveRuns  # noqa: E402
from querytune.service.metrics import Metrics  # noqa: E402

RUNS = ("linear", "memory", "lora")  # frozen-backbone runs sharing a pass, and one adapting the backbone
JPEG = {"content-type": "image/jpeg"}
FIELD_ONLY = b'--x\r\nContent-Disposition: form-data; name="name"\r\n\r\ncat\r\n--x--\r\n'  # a form, no file
TOKEN = "s3cret-Token_42"
BEARER = {"authorization": f"Bearer {TOKEN}"}
KEYS = {"default": TOKEN}  # a bare key is named "default"


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("service")
    task = write_task(root / "tiny")
    save_backbone(tiny_vit(layer_scale=True), root / "tiny-vit.safetensors")
    for method in RUNS:
        train_run(RunSpec(method=method, backbone=root / "tiny-vit.safetensors", data=task, image_size=32),
                  root / method, train={"epochs": 1,
                  "batch_size": 8}, runtime=Runtime(workers=0, progress=False))
    return [root / method for method in RUNS]


@pytest.fixture(scope="module")
def images(runs: list[Path]) -> list[Path]:
    return sorted((runs[0].parent / "tiny" / "images" / "test").glob("*.jpg"))


@contextmanager
def running(server: MultiTaskServer | LiveRuns, access: ServiceAccess | None = None, poll_seconds: float = 2.0,
            **limits: float) -> Iterator[str]:
    """The service on a free loopback port, in a thread of this process; yields its base URL."""
    app = create_app(server, ServiceLimits(**limits), access, poll_seconds)
    service = uvicorn.Server(service_config(app, "127.0.0.1", 0))
    thread = threading.Thread(target=service.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not service.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the service did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{service.servers[0].sockets[0].getsockname()[1]}"
    finally:
        service.should_exit = True
        thread.join(10)


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def reply_of(sock: socket.socket, seconds: float = 10) -> bytes:
    """What the server sends on ``sock`` until it closes it (or ``seconds`` pass)."""
    sock.settimeout(seconds)
    reply = b""
    with suppress(OSError):  # a reset once the server has closed
        while part := sock.recv(4096):
            reply += part
    return reply


def image_bytes(size: tuple[int, int], mode: str = "RGB", kind: str = "PNG") -> bytes:
    image = Image.new(mode, size)
    bands = len(image.getbands())
    image.putpixel((0, 0), 255 if bands == 1 else (255,) * bands)  # not all one colour
    buffer = io.BytesIO()
    image.save(buffer, kind)
    return buffer.getvalue()


def assert_same_answers(served: object, expected: object, where: str = "") -> None:
    """Answers computed in two batches: names and labels equal, probabilities and logits to float rounding."""
    if isinstance(expected, dict):
        assert isinstance(served, dict) and served.keys() == expected.keys(), where
        for key in expected:
            assert_same_answers(served[key], expected[key], f"{where}.{key}")
    elif isinstance(expected, list):
        assert isinstance(served, list) and len(served) == len(expected), where
        for i, (one, other) in enumerate(zip(served, expected)):
            assert_same_answers(one, other, f"{where}[{i}]")
    elif isinstance(expected, float):
        assert served == pytest.approx(expected, rel=1e-5, abs=1e-6), where
    else:
        assert served == expected, where


def test_service_answers_as_predict_does(runs, images):
    server = MultiTaskServer.from_runs(None, runs, device="cpu")
    expected = {record["path"]: record["predictions"]
                for record in server.predict_files(images, topk=2, with_logits=True)}
    with running(server) as url, httpx.Client(base_url=url) as client:
        tasks = client.get("/tasks").json()
        assert [(t["name"], t["method"], t["shares_trunk"]) for t in tasks["tasks"]] == [
            ("linear", "linear", True), ("memory", "memory", True), ("lora", "lora", False)]
        assert tasks["tasks"][0]["classes"] == ["class0", "class1", "class2"] and tasks["image_size"] == 32

        files = [("image", (path.name, path.read_bytes(), "image/jpeg")) for path in images[:3]]
        response = client.post("/predict", params={"topk": 2, "logits": 1}, files=files)
        assert response.status_code == 200, response.text
        answers = response.json()["images"]
        assert [answer["name"] for answer in answers] == [path.name for path in images[:3]]
        for answer, path in zip(answers, images):
            assert_same_answers(answer["predictions"], expected[str(path)])

        asked = []
        predict = server.predict
        server.predict = lambda batch, tasks=None: (asked.append(tasks), predict(batch, tasks))[1]  # type: ignore[method-assign]
        response = client.post("/predict", params={"tasks": "lora,linear"}, content=images[4].read_bytes(),
                               headers=JPEG)
        assert asked == [["linear", "lora"]]  # only the tasks asked for are computed
        (answer,) = response.json()["images"]
        top1 = {task: {key: expected[str(images[4])][task][key] for key in ("class", "label", "probability")}
                for task in ("lora", "linear")}
        assert list(answer["predictions"]) == ["linear", "lora"]
        assert_same_answers(answer["predictions"], top1)
        assert client.get("/health").json() == {"status": "ok", "tasks": 3, "batches": 2, "images": 4}
        assert "<title>querytune</title>" in client.get("/").text


def test_concurrent_requests_are_batched_up_to_the_limit(runs, images):
    server = MultiTaskServer.from_runs(None, runs[:2], device="cpu")
    sizes: list[int] = []
    predict = server.predict
    server.predict = lambda batch, tasks=None: (sizes.append(len(batch)), predict(batch, tasks))[1]  # type: ignore[method-assign]
    expected = {record["path"]: record["predictions"] for record in server.predict_files(images)}
    sizes.clear()

    async def together(url: str, paths: list[Path]) -> list[dict]:
        async with httpx.AsyncClient(base_url=url) as client:
            responses = await asyncio.gather(*(client.post("/predict", content=path.read_bytes(), headers=JPEG)
                                               for path in paths))
        assert all(response.status_code == 200 for response in responses)
        return [response.json()["images"][0]["predictions"] for response in responses]

    # long waits: requests sent together arrive within them (even on a loaded machine)
    with running(server, max_wait_ms=20_000, max_batch=4) as url:
        started = time.monotonic()
        answers = asyncio.run(together(url, images[:8]))
        assert time.monotonic() - started < 20  # a full batch does not wait
        for answer, path in zip(answers, images):
            assert_same_answers(answer, expected[str(path)])
        assert sizes == [4, 4]
    sizes.clear()
    with running(server, max_wait_ms=2000, max_batch=4) as url:
        asyncio.run(together(url, images[:3]))
        assert sizes == [3]  # a batch that does not fill runs when its wait is over
    with running(server, max_wait_ms=0) as url:
        asyncio.run(together(url, images[:1]))
        assert sizes[-1] == 1


def test_bad_requests_get_a_4xx_json_error_and_the_service_goes_on(runs, images):
    server = MultiTaskServer.from_runs(None, runs[:1], device="cpu")
    good = images[0].read_bytes()
    big = io.BytesIO()
    Image.new("RGB", (3000, 2000)).save(big, "PNG")
    cases = [
        ("empty body", dict(content=b"", headers=JPEG), 400, "empty body: no image"),
        ("not an image", dict(content=b"hello", headers=JPEG), 400,
         "body: cannot read image (not a recognised image format)"),
        ("truncated image", dict(content=good[:400], headers=JPEG), 400, "body: cannot read image"),
        ("wrong content type", dict(json={"image": "cat.jpg"}), 415, "content type 'application/json'"),
        ("too large a body", dict(content=b"\0" * 1_100_000, headers=JPEG), 413,
         "body of 1100000 bytes is larger than the 1000000 allowed"),
        ("too large a streamed body", dict(content=iter([b"\0" * 600_000] * 2), headers=JPEG), 413,
         "body larger than the 1000000 bytes allowed"),  # chunked: no length declared
        ("too many pixels", dict(content=big.getvalue(), headers={"content-type": "image/png"}), 400,
         "body: 3000x2000 pixels, more than the 1000000 allowed"),
        ("too many images", dict(files=[("f", ("a.jpg", good))] * 3), 413, "3 images in one request, more than"),
        ("a form without files", dict(content=FIELD_ONLY, headers={"content-type": "multipart/form-data; boundary=x"}),
         400, "no file in the multipart form"),
        ("a torn form", dict(content=b"--x\r\nContent-Disp", headers={"content-type": "multipart/form-data"}), 400,
         "boundary"),
        ("one bad file of two", dict(files=[("f", ("a.jpg", good)), ("f", ("b.jpg", b"GIF89a"))]), 400,
         "b.jpg: cannot read image"),
    ]
    with running(server, max_body_mb=1, max_pixels=1_000_000, max_images=2, read_timeout=0.5) as url, \
            httpx.Client(base_url=url) as client:
        for name, request, status, message in cases:
            response = client.post("/predict", **request)
            assert response.status_code == status and message in response.json()["error"], (name, response.text)
        for query, status, message in (("topk=0", 400, "topk '0': must be a positive integer"),
                                       ("topk=x", 400, "topk 'x'"),
                                       ("tasks=linear,cats", 404, "unknown task 'cats' (served: linear)")):
            response = client.post(f"/predict?{query}", content=good, headers=JPEG)
            assert response.status_code == status and message in response.json()["error"], query
        assert client.get("/predict").status_code == 405 and client.get("/nothing").json() == {"error": "Not Found"}

        with socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1]))) as slow:  # sends half, stalls
            slow.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\n"
                         + f"Content-Length: {len(good)}\r\n\r\n".encode() + good[:100])
            slow.settimeout(10)
            reply = ""
            while not reply.endswith("}") and (part := slow.recv(4096).decode()):
                reply += part
            assert reply.startswith("HTTP/1.1 408") and "took longer than 0.5 s" in reply, reply

        response = client.post("/predict", content=good, headers=JPEG)
        assert response.status_code == 200 and client.get("/health").json()["images"] == 1


def test_a_client_slow_to_send_its_headers_gets_408_and_its_connection_closed(runs):
    server = MultiTaskServer.from_runs(None, runs[:1], device="cpu")
    with running(server, header_timeout=1, read_timeout=30) as url, httpx.Client(base_url=url) as client:
        address = ("127.0.0.1", port_of(url))
        started = time.monotonic()
        with socket.create_connection(address) as idle, socket.create_connection(address) as trickling, \
                socket.create_connection(address) as between:
            between.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\nGET /health HTTP/1.1\r\n")  # one, then half
            trickling.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
            while time.monotonic() - started < 20:  # a header line every 0.2 s, never the end of the headers
                with suppress(OSError):
                    trickling.sendall(b"X-Slow: 1\r\n")
                if select.select([trickling], [], [], 0.2)[0]:
                    break
            for sock in (trickling, idle, between):
                reply = reply_of(sock).decode()
                assert reply.count("HTTP/1.1 408") == 1 and reply.endswith(
                    '{"error": "no complete request headers within 1 s (--header-timeout)"}'), reply
            assert reply.startswith("HTTP/1.1 200")  # the complete request was answered first
        assert time.monotonic() - started < 10  # closed at --header-timeout, long before --read-timeout
        assert scrape(client)['querytune_connections_closed_total{reason="header_timeout"}'] == 3
        assert client.get("/health").status_code == 200


def test_connections_past_the_total_or_per_client_limit_get_503(runs):
    server = MultiTaskServer.from_runs(None, runs[:1], device="cpu")
    with running(server, max_connections=6, max_connections_per_client=3) as url:
        port = port_of(url)

        def connect(client: str) -> socket.socket:
            return socket.create_connection(("127.0.0.1", port), source_address=(client, 0))

        def health() -> int:
            with httpx.Client(base_url=url) as client:
                return client.get("/health").status_code

        held = [connect("127.0.0.2") for _ in range(3)]
        with connect("127.0.0.2") as fourth:
            reply = reply_of(fourth).decode()
        assert reply.startswith("HTTP/1.1 503") and reply.endswith(
            '{"error": "client 127.0.0.2 already has 3 connections open, the most allowed '
            '(--max-connections-per-client)"}'), reply
        assert health() == 200  # another client meanwhile
        held += [connect("127.0.0.3") for _ in range(3)]
        with connect("127.0.0.4") as seventh:
            reply = reply_of(seventh).decode()
        assert reply.startswith("HTTP/1.1 503") and reply.endswith(
            '{"error": "6 connections are open, the most allowed (--max-connections)"}'), reply
        for sock in held:
            sock.close()
        deadline = time.monotonic() + 10
        while (status := health()) != 200:  # the server sees the closes soon after
            assert status == 503 and time.monotonic() < deadline
            time.sleep(0.05)
        with httpx.Client(base_url=url) as client:
            samples = scrape(client)
    assert samples['querytune_connections_closed_total{reason="max_connections_per_client"}'] == 1
    assert samples['querytune_connections_closed_total{reason="max_connections"}'] >= 1


def test_failing_accepts_are_logged_once_per_interval():
    guard = ConnectionGuard(ServiceLimits(), Metrics(1))
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logger = logging.getLogger("uvicorn.error")
    logger.addHandler(handler)
    loop = asyncio.new_event_loop()
    try:
        for _ in range(1000):  # asyncio retries a failed accept every second, and more often under load
            guard.loop_error(loop, {"message": "socket.accept() out of system resource",
                                    "exception": OSError(errno.EMFILE, "Too many open files")})
    finally:
        logger.removeHandler(handler)
        loop.close()
    assert [record.getMessage() for record in records] == [
        "cannot accept connections: Too many open files (1 failed accepts since the last such line; connections "
        "are retried every second)"]
    assert guard.metrics.accept_errors == 1000


def test_serve_under_a_low_open_file_limit_keeps_answering_and_logs_no_tracebacks(runs):
    """300 idle connections, from five client addresses, to `querytune serve` under `ulimit -n 256`."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    root = Path(__file__).resolve().parents[1]
    command = f"ulimit -n 256 && exec {sys.executable} -m querytune serve --run {runs[0]} --port {port} " \
              "--device cpu --header-timeout 2 --access-log /dev/null"
    process = subprocess.Popen(["bash", "-c", command], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "PYTHONPATH": str(root)})
    idle: list[socket.socket] = []
    try:
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None and time.monotonic() < deadline, "the service did not start"
            with suppress(httpx.TransportError):
                httpx.get(f"http://127.0.0.1:{port}/health")
                break
            time.sleep(0.2)
        for i in range(300):
            with suppress(OSError):  # refused ones may be reset as they open
                idle.append(socket.create_connection(("127.0.0.1", port), source_address=(f"127.0.0.{2 + i % 5}", 0)))
        answered = httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code
        assert answered in (200, 503)  # at once, as full or not; never a timeout
        deadline = time.monotonic() + 20
        while httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code != 200:  # idle ones timed out
            assert time.monotonic() < deadline
            time.sleep(0.2)
    finally:
        for sock in idle:
            sock.close()
        process.terminate()
        stderr = process.communicate(timeout=60)[1]
    lines = stderr.strip().splitlines()
    assert re.fullmatch(r"--max-connections lowered to \d+: ulimit -n is 256",
                        lines[0]), stderr
    # a burst of connections can still exhaust the descriptors before the refused ones are closed: a line per 10 s
    assert all(line.startswith("ERROR:    cannot accept connections: Too many open files (") for line in lines[1:])
    assert "Traceback" not in stderr and len(lines) < 5, stderr


def test_decoded_bytes_are_bounded_per_request_and_jpegs_decode_small(runs):
    server = MultiTaskServer.from_runs(None, runs[:1], device="cpu")
    png = image_bytes((1000, 1000))  # 1M pixels: within --max-pixels, 4 MB decoded
    jpeg = image_bytes((1000, 1000), kind="JPEG")  # drafted to 125x125 for 32-pixel input
    small = image_bytes((400, 400))  # 0.64 MB decoded each
    with running(server, max_decode_mb=1, max_decode_inflight_mb=2) as url, httpx.Client(base_url=url) as client:
        response = client.post("/predict", content=png, headers={"content-type": "image/png"})
        assert response.status_code == 413 and response.json() == {
            "error": "the images take 4.0 MB decoded, more than the 1 MB allowed (--max-decode-mb)"}
        assert client.post("/predict", content=jpeg, headers=JPEG).status_code == 200
        assert client.post("/predict", files=[("f", ("a.png", small))]).status_code == 200
        response = client.post("/predict", files=[("f", ("a.png", small)), ("f", ("b.png", small))])
        assert response.status_code == 413 and "take 1.3 MB decoded" in response.json()["error"]


def test_images_are_decoded_one_budget_at_a_time(runs, monkeypatch):
    server = MultiTaskServer.from_runs(None, runs[:1], device="cpu")
    png = image_bytes((700, 700))  # 1.96 MB decoded: one fits in 3 MB, two do not
    decoding, most = 0, 0
    lock = threading.Lock()

    def slow_decode(*args: object) -> Image.Image:
        nonlocal decoding, most
        with lock:
            decoding += 1
            most = max(most, decoding)
        time.sleep(0.3)
        try:
            return decode(*args)  # type: ignore[arg-type]
        finally:
            with lock:
                decoding -= 1

    monkeypatch.setattr(service_app, "decode", slow_decode)

    async def together(url: str) -> list[int]:
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            responses = await asyncio.gather(*(client.post("/predict", content=png,
                                                           headers={"content-type": "image/png"}) for _ in range(4)))
        return [response.status_code for response in responses]

    with running(server, max_decode_mb=2, max_decode_inflight_mb=3) as url:
        assert asyncio.run(together(url)) == [200] * 4
    assert most == 1


def test_decoding_reads_the_header_first_and_decodes_no_larger_than_needed():
    assert decoded_bytes(image_bytes((300, 200), "RGBA"), "a.png", 10**6, 32) == 300 * 200 * 8  # RGBA, then RGB
    assert decoded_bytes(image_bytes((300, 200)), "a.png", 10**6, 32) == 300 * 200 * 4  # reduced as decoded
    assert decoded_bytes(image_bytes((300, 200), "I;16"), "a.png", 10**6, 32) == 300 * 200 * 6
    jpeg = image_bytes((2000, 1500), kind="JPEG")
    assert decoded_bytes(jpeg, "a.jpg", 10**7, 32) == 250 * 188 * 4  # decoded at 1/8: still 64 pixels a side
    assert decode(jpeg, "a.jpg", 10**7, 32).size == (84, 94)  # then reduced 3x2: no side under 64
    assert decode(image_bytes((300, 200), "RGBA"), "a.png", 10**6, 32).size == (75, 67)
    assert decode(image_bytes((50, 40), "P"), "a.png", 10**6, 32).size == (50, 40)
    with pytest.raises(DataError, match=r"^a.png: 2000x1500 pixels, more than the 1000000 allowed$"):
        decoded_bytes(image_bytes((2000, 1500)), "a.png", 10**6, 32)


def test_a_missing_extra_is_one_line_naming_it(runs, monkeypatch):
    monkeypatch.setitem(sys.modules, "starlette.applications", None)  # as if starlette were not installed
    with pytest.raises(ConfigError, match=r"needs its extra: pip install querytune\[serve\]"):
        create_app(MultiTaskServer.from_runs(None, runs[:1], device="cpu"))


def test_service_limits_are_checked(tmp_path, capsys):
    with pytest.raises(ConfigError, match="--max-images 8 must be at most --max-batch 4"):
        ServiceLimits(max_batch=4, max_images=8)
    with pytest.raises(ConfigError, match="--max-wait-ms must be 0 or more"):
        ServiceLimits(max_wait_ms=-1)
    error = cli_error(capsys, "serve", "--run", tmp_path, "--max-batch", "0")
    assert error == "error: --max-batch must be at least 1 (got 0)"
    error = cli_error(capsys, "serve", "--run", tmp_path, "--max-inflight-per-client", "0")
    assert error == "error: --max-inflight-per-client must be at least 1 (got 0)"
    both = "error: give the runs to serve: --run (repeated) or --runs-dir, not both"
    assert cli_error(capsys, "serve") == both
    assert cli_error(capsys, "serve", "--run", tmp_path, "--runs-dir", tmp_path) == both
    assert cli_error(capsys, "serve", "--runs-dir", tmp_path) == (
        "error: --runs-dir needs --backbone: the backbone its runs are served on")
    assert cli_error(capsys, "serve", "--runs-dir", tmp_path / "absent", "--backbone", "tiny") == (
        f"error: --runs-dir {tmp_path / 'absent'}: not a folder")


SAMPLE = re.compile(r"([a-z_]+)(\{[^}]*\})? (\S+)")


def scrape(client: httpx.Client) -> dict[str, float]:
    """GET /metrics, checked to be the Prometheus text format: each sample by its name and labels."""
    response = client.get("/metrics")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    samples, typed = {}, set()
    for line in response.text.splitlines():
        if line.startswith("# TYPE "):
            typed.add(line.split()[2])
        elif not line.startswith("# HELP "):
            match = SAMPLE.fullmatch(line)
            assert match, line
            family = re.sub(r"_(bucket|sum|count)$", "", match[1])
            assert match[1] in typed or family in typed, f"{line}: no # TYPE before it"
            samples[match[1] + (match[2] or "")] = float(match[3])
    return samples


def test_every_request_but_health_and_the_page_needs_the_token(runs, images):
    server = MultiTaskServer.from_runs(None, runs[:1], device="cpu")
    good = images[0].read_bytes()
    refused = [({}, "missing token: send the header 'Authorization: Bearer <token>'"),
               ({"authorization": "Bearer wrong"}, "wrong token"),
               ({"authorization": f"Bearer {TOKEN}x"}, "wrong token"),
               ({"authorization": f"Bearer {TOKEN[:-1]}"}, "wrong token"),
               ({"authorization": f"Basic {TOKEN}"}, "the Authorization header must be 'Bearer <token>'"),
               ({"authorization": TOKEN}, "the Authorization header must be 'Bearer <token>'")]
    with running(server, ServiceAccess(KEYS)) as url, httpx.Client(base_url=url) as client:
        for headers, says in refused:
            for method, path in (("POST", "/predict"), ("GET", "/tasks"), ("GET", "/metrics"), ("POST", "/health"),
                                 ("GET", "/nothing")):
                response = client.request(method, path, content=good, headers={**JPEG, **headers})
                assert response.status_code == 401 and response.json() == {"error": says}, (headers, path)
                assert response.headers["www-authenticate"] == "Bearer"
        assert client.get("/health").json()["batches"] == 0  # nothing refused reached the model
        assert "<title>querytune</title>" in client.get("/").text  # the page's HTML, which asks for the token
        for scheme in ("Bearer", "bearer"):  # the scheme is case-insensitive (RFC 9110)
            response = client.post("/predict", content=good, headers={**JPEG, "authorization": f"{scheme} {TOKEN}"})
            assert response.status_code == 200 and response.json()["images"][0]["name"] == "body", response.text
        assert client.get("/tasks", headers=BEARER).json()["tasks"][0]["name"] == "linear"
        assert client.get("/health").json()["batches"] == 2


def test_metrics_count_what_was_answered(runs, images):
    server = MultiTaskServer.from_runs(None, runs[:2], device="cpu")
    good = images[0].read_bytes()
    with running(server, ServiceAccess(KEYS), max_batch=4) as url, \
            httpx.Client(base_url=url, headers=BEARER) as client:
        first = scrape(client)
        assert not any(name.startswith("querytune_requests_total") for name in first), first
        assert first["querytune_images_total"] == 0 and first["querytune_batch_images_count"] == 0
        assert first["querytune_requests_in_flight"] == 1  # the scrape itself
        assert client.post("/predict", content=good, headers=JPEG).status_code == 200
        assert client.post("/predict", files=[("f", ("a.jpg", good))] * 3).status_code == 200
        assert client.post("/predict", content=b"not an image", headers=JPEG).status_code == 400
        assert httpx.post(url + "/predict", content=good, headers=JPEG).status_code == 401
        assert client.get("/health").status_code == 200 and client.get("/nothing").status_code == 404
        samples = scrape(client)
    requests = {name: value for name, value in samples.items() if name.startswith("querytune_requests_total")}
    assert requests == {'querytune_requests_total{route="/predict",status="200"}': 2,
                        'querytune_requests_total{route="/predict",status="400"}': 1,
                        'querytune_requests_total{route="/predict",status="401"}': 1,
                        'querytune_requests_total{route="/health",status="200"}': 1,
                        'querytune_requests_total{route="/metrics",status="200"}': 1,  # the first scrape
                        'querytune_requests_total{route="other",status="404"}': 1}
    assert samples["querytune_images_total"] == 4
    batches = {name: value for name, value in samples.items() if name.startswith("querytune_batch_images")}
    assert batches == {'querytune_batch_images_bucket{le="1"}': 1, 'querytune_batch_images_bucket{le="2"}': 1,
                       'querytune_batch_images_bucket{le="4"}': 2, 'querytune_batch_images_bucket{le="+Inf"}': 2,
                       "querytune_batch_images_sum": 4, "querytune_batch_images_count": 2}
    latency = [value for name, value in samples.items()
               if name.startswith('querytune_request_duration_seconds_bucket{route="/predict"')]
    assert len(latency) == 12 and latency == sorted(latency) and latency[-1] == 4  # cumulative, +Inf last
    assert samples['querytune_request_duration_seconds_count{route="/predict"}'] == 4
    assert 0 < samples['querytune_request_duration_seconds_sum{route="/predict"}'] < 4 * 60


def test_the_access_log_says_who_asked_for_what_and_holds_no_body(runs, images, tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    token_file.chmod(0o600)
    log = tmp_path / "access.jsonl"
    access = ServiceAccess.from_options("127.0.0.1", token_file, False, str(log))
    assert access.keys == KEYS  # the trailing newline stripped
    server = MultiTaskServer.from_runs(None, runs[:2], device="cpu")
    good, marker = images[0].read_bytes(), b"BODY-MARKER " * 200
    both = ["linear", "memory"]
    sent = [  # (method, path, request, status, logged tasks, logged images)
        ("POST", "/predict?tasks=memory", dict(content=good, headers={**JPEG, **BEARER}), 200, ["memory"], 1),
        ("POST", "/predict", dict(files=[("f", ("a.jpg", good)), ("f", ("b.jpg", good))], headers=BEARER), 200,
         both, 2),
        ("POST", "/predict", dict(content=marker, headers={**JPEG, **BEARER}), 400, both, 1),
        ("POST", "/predict", dict(content=marker, headers=JPEG), 401, None, 0),
        ("POST", "/predict?tasks=cats", dict(content=good, headers={**JPEG, **BEARER}), 404, ["cats"], 0),
        ("GET", "/health", {}, 200, None, 0),
        ("GET", "/tasks", dict(headers=BEARER), 200, None, 0),
    ]
    with running(server, access) as url, httpx.Client(base_url=url) as client:
        for method, path, request, status, _, _ in sent:
            assert client.request(method, path, **request).status_code == status, path
    assert access.log is not None
    access.log.close()
    text = log.read_text()
    lines = [json.loads(line) for line in text.splitlines()]
    assert [(line["method"], line["route"], line["tasks"], line["images"], line["status"]) for line in lines] == [
        (method, path.split("?")[0], tasks, count, status) for method, path, _, status, tasks, count in sent]
    for line in lines:
        assert line.keys() == {"time", "client", "key", "method", "route", "tasks", "images", "status", "ms"}
        assert line["client"] == "127.0.0.1" and 0 <= line["ms"] < 60_000
        assert time.time() - datetime.fromisoformat(line["time"]).timestamp() < 600
    assert "BODY-MARKER" not in text and TOKEN not in text and len(text) < 250 * len(lines)  # no body, no token


def test_a_client_past_its_inflight_limit_gets_429_and_others_are_served(runs, images):
    server = MultiTaskServer.from_runs(None, runs[:1], device="cpu")
    good = images[0].read_bytes()
    elsewhere = httpx.HTTPTransport(local_address="127.0.0.2")  # another client: another loopback address
    with running(server, ServiceAccess(KEYS), max_inflight_per_client=2, read_timeout=5) as url, \
            httpx.Client(base_url=url, headers=BEARER) as here, \
            httpx.Client(base_url=url, headers=BEARER, transport=elsewhere) as there:
        port = int(url.rsplit(":", 1)[1])
        stalled = []
        for _ in range(2):  # client 127.0.0.2 sends half a body, twice, and stalls: two requests in flight
            sock = socket.create_connection(("127.0.0.1", port), source_address=("127.0.0.2", 0))
            sock.sendall(f"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\nAuthorization: Bearer "
                         f"{TOKEN}\r\nContent-Length: {len(good)}\r\n\r\n".encode() + good[:100])
            stalled.append(sock)
        deadline = time.monotonic() + 4
        while scrape(here)["querytune_requests_in_flight"] < 3:  # the two, and the scrape
            assert time.monotonic() < deadline, "the stalled requests did not arrive"
            time.sleep(0.02)
        response = there.post("/predict", content=good, headers=JPEG)
        assert response.status_code == 429 and response.headers["retry-after"] == "1"
        assert response.json() == {"error": "client 127.0.0.2 already has 2 requests unanswered, the most allowed "
                                            "(--max-inflight-per-client)"}
        assert there.get("/health").status_code == 200  # never limited
        assert here.post("/predict", content=good, headers=JPEG).status_code == 200  # another client meanwhile
        for sock in stalled:
            sock.settimeout(30)
            assert sock.recv(4096).startswith(b"HTTP/1.1 408"), "a stalled request was not timed out"
            sock.close()
        assert there.post("/predict", content=good, headers=JPEG).status_code == 200  # its slots are free again
        samples = scrape(here)
    assert samples['querytune_requests_total{route="/predict",status="429"}'] == 1
    assert samples['querytune_requests_total{route="/predict",status="408"}'] == 2
    assert samples["querytune_requests_in_flight"] == 1


def test_serving_beyond_loopback_needs_a_token(runs, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("QUERYTUNE_TOKEN", raising=False)
    run = str(runs[0])
    for host in ("0.0.0.0", "::", "192.168.1.20", "example.org"):
        assert cli_error(capsys, "serve", "--run", run, "--host", host) == (
            f"error: --host {host} is reachable from other machines: give a token (--token-file FILE or "
            "QUERYTUNE_TOKEN), or --no-auth to answer anyone")
    for host in ("127.0.0.1", "127.3.2.1", "::1", "[::1]", "localhost", "LocalHost"):
        assert ServiceAccess.from_options(host, None, False, None) == ServiceAccess(None, None), host
    assert ServiceAccess.from_options("0.0.0.0", None, True, None).keys is None  # --no-auth says so

    token_file = tmp_path / "token"
    token_file.touch(0o600)
    for text, says in (("", "is empty: it must hold the token"), ("\n", "is empty: it must hold the token"),
                       ("two words\n", "the token must be printable ASCII without spaces"),
                       ("t\u00f6ken", "the token must be printable ASCII without spaces")):
        token_file.write_text(text)
        assert cli_error(capsys, "serve", "--run", run, "--token-file", token_file).startswith(
            f"error: --token-file {token_file}"), text
        assert says in cli_error(capsys, "serve", "--run", run, "--token-file", token_file)
    token_file.write_text(TOKEN)
    for mode in (0o644, 0o640, 0o604, 0o620):  # as ssh refuses such a key
        token_file.chmod(mode)
        assert cli_error(capsys, "serve", "--run", run, "--token-file", token_file) == (
            f"error: --token-file {token_file}: permissions {mode:04o} let group or others access it; "
            f"chmod 600 {token_file}")
    token_file.chmod(0o600)
    assert ServiceAccess.from_options("0.0.0.0", token_file, False, None).keys == KEYS
    assert cli_error(capsys, "serve", "--run", run, "--token-file", tmp_path / "absent") == (
        f"error: --token-file {tmp_path / 'absent'}: No such file or directory")
    token_file.write_text("from-the-file\r\n")
    assert cli_error(capsys, "serve", "--run", run, "--token-file", token_file, "--no-auth") == (
        "error: --no-auth contradicts the token of --token-file")
    assert cli_error(capsys, "serve", "--run", run, "--access-log", tmp_path / "no" / "log") == (
        f"error: --access-log {tmp_path / 'no' / 'log'}: No such file or directory")
    monkeypatch.setenv("QUERYTUNE_TOKEN", TOKEN)
    assert ServiceAccess.from_options("0.0.0.0", None, False, None).keys == KEYS
    from_the_flag = ServiceAccess.from_options("0.0.0.0", token_file, False, None)
    assert from_the_flag.keys == {"default": "from-the-file"}  # the flag first
    monkeypatch.setenv("QUERYTUNE_TOKEN", "")
    assert cli_error(capsys, "serve", "--run", run) == "error: QUERYTUNE_TOKEN is empty: it must hold the token"

    monkeypatch.delenv("QUERYTUNE_TOKEN")  # the real command, in its own process: one line, exit 2, nothing bound
    result = subprocess.run([sys.executable, "-m", "querytune", "serve", "--run", run, "--host", "0.0.0.0"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stderr.startswith("error: --host 0.0.0.0 is reachable"), result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and result.stdout == ""


def page_test_needs(reason: str) -> None:
    """Skips the page test for ``reason`` (what it needs and lacks); fails it in CI, where it must run."""
    if os.environ.get("CI"):
        pytest.fail(f"{reason}; CI must run the page test (.ci/run installs Chromium)")
    pytest.skip(reason)


def test_page_asks_for_the_token_once_and_shows_every_task_answer_in_headless_chromium(runs, images, tmp_path):
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    try:
        from selenium import webdriver
        from selenium.webdriver.common.by import By
        from selenium.webdriver.support.ui import WebDriverWait
    except ImportError:
        page_test_needs("the page test needs selenium (test extra)")
    if browser is None or driver is None:
        page_test_needs("headless Chromium is absent (apt-get install chromium chromium-driver; .ci/run does as root)")

    server = MultiTaskServer.from_runs(None, runs, device="cpu")
    (expected,) = server([images[0]], topk=3)
    not_image = tmp_path / "notes.jpg"
    not_image.write_text("not an image")
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(argument)
    with running(server, ServiceAccess(KEYS)) as url:
        chrome = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=driver))
        try:
            chrome.get(url + "/")
            WebDriverWait(chrome, 30).until(lambda c: c.find_element(By.ID, "login").is_displayed())
            for token in ("not-the-token", TOKEN):
                chrome.find_element(By.ID, "token").send_keys(token)
                chrome.find_element(By.CSS_SELECTOR, "#login button").click()
                if token != TOKEN:
                    WebDriverWait(chrome, 30).until(lambda c: c.find_element(By.ID, "login-error").text)
                    refused = chrome.find_element(By.ID, "login-error").text
            WebDriverWait(chrome, 30).until(lambda c: "3 tasks" in c.find_element(By.ID, "tasks").text)
            assert not chrome.find_element(By.ID, "login").is_displayed()
            chrome.find_element(By.ID, "file").send_keys(str(images[0]))
            WebDriverWait(chrome, 30).until(lambda c: c.find_element(By.ID, "answers").is_displayed())
            rows = {row.get_attribute("data-task"): [cell.text for cell in row.find_elements(By.TAG_NAME, "td")]
                    for row in chrome.find_elements(By.CSS_SELECTOR, "#answers tbody tr")}
            chrome.find_element(By.ID, "file").send_keys(str(not_image))
            WebDriverWait(chrome, 30).until(lambda c: c.find_element(By.ID, "error").text)
            error = chrome.find_element(By.ID, "error").text
            chrome.refresh()  # asked once: the tab keeps the token
            WebDriverWait(chrome, 30).until(lambda c: "3 tasks" in c.find_element(By.ID, "tasks").text)
            asked_again = chrome.find_element(By.ID, "login").is_displayed()
        finally:
            chrome.quit()
    assert refused == "that token was refused" and not asked_again
    assert rows.keys() == set(RUNS)
    for task, answer in expected["predictions"].items():
        assert rows[task][:4] == [task, task, answer["class"], f"{100 * answer['probability']:.1f}%"]
    assert error.startswith("400: ") and "cannot read image" in error


def test_serve_command_under_a_bounded_load_of_good_and_malformed_requests(tiny_task):
    """benchmarks/serve_load.py, small: `querytune serve` in its own process, with a token, answers concurrent clients;
    every good answer is right, every malformed request (wrong type, truncated, 100 MB, slow client, no token...) a
    4xx; no crash."""
    pytest.importorskip("psutil", reason="the load check reads the server's memory with psutil (test extra)")
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, root / "benchmarks" / "serve_load.py", "--backbone", "tiny", "--data",
                             tiny_task, "--train-split", "train800", "--tasks", "2", "--clients", "4", "--seconds", "1",
                             "--faults", "200", "--slow-connections", "20", "--bomb-side", "2000", "--bomb-count", "4",
                             "--json"], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONPATH": str(root)})  # this checkout's querytune, not another
    assert result.returncode == 0, result.stdout + result.stderr
    load, faults = map(json.loads, result.stdout.splitlines())
    assert load["phase"] == "load" and load["requests"] > 0 and load["errors"] == 0
    assert faults["failures"] == 0 and faults["alive"] and faults["health"] == "ok", faults
    assert faults["by_kind"]["100 MB body"] == 1 and faults["by_kind"]["slow client"] == 1
    assert sum(faults["by_kind"].values()) == 200 and faults["by_kind"]["no token"] > 0
    log = faults["access_log"]  # with the token on: one line per request sent, the refused ones 401, no body
    assert log["ok"] and log["lines"] == log["requests"] == 1 + 1 + load["requests"] + 200 + 1, log
    assert log["unauthorised"] == faults["by_kind"]["no token"] + faults["by_kind"]["wrong token"]
    assert faults["rss_after_mb"] - faults["rss_before_mb"] < 64  # the benchmark's 10k requests say more
    assert faults["slow_headers"]["answered_408"] == 20 and faults["decode_memory"]["statuses"] == [200], faults


def test_serve_under_load_while_runs_come_and_go_never_fails_nor_answers_from_a_half_loaded_run(runs, images,
                                                                                                tmp_path):
    """benchmarks/serve_load.py --churn, small and in this process: a live runs folder takes 300 good and malformed
    requests while, every 0.2 s, a task is added (renamed into place, copied straight in, or file by file), removed
    or has its adapter overwritten in place; no request fails, and each task's answer is that of one whole version
    of it (the churned tasks' versions are random adapters: a half-loaded or mixed one answers otherwise)."""
    spec = importlib.util.spec_from_file_location("serve_load", Path(__file__).parents[1] / "benchmarks" /
                                                  "serve_load.py")
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    backbone = runs[0].parent / "tiny-vit.safetensors"
    stable = runs[:2]  # linear and memory; the churned tasks are a linear, a memory and a LoRA run
    versions = bench.churn_versions(runs, str(backbone), 3, tmp_path)
    expected = [MultiTaskServer.from_runs(backbone, stable + [folders[v] for folders in versions.values()],
                                          device="cpu")(images) for v in range(2)]
    folder = tmp_path / "served"
    folder.mkdir()
    for run in stable:
        add_run(run, folder, run.name)
    live = LiveRuns(folder, load_backbone(backbone), "cpu", lambda line: None)
    live.scan()
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    token_file.chmod(0o600)
    access = ServiceAccess.from_options("127.0.0.1", token_file, False, None)
    with running(live, access, poll_seconds=0.1, read_timeout=2) as url:
        churn = bench.Churn(folder, versions, 0.2, lambda: httpx.post(url + "/admin/reload", headers=BEARER,
                                                                       timeout=60).raise_for_status())
        churn.start()
        try:
            result = asyncio.run(bench.faults(url, port_of(url), TOKEN, [path.read_bytes() for path in images],
                                              expected, {run.name for run in stable}, 300, 4, 0,
                                              tuple(sorted(versions))))
        finally:
            churn.stopped.set()
            churn.join()
    assert result["failures"] == 0, result["first_failures"]
    assert churn.errors == [] and sum(churn.changes.values()) >= 10 and churn.reloads >= 3, churn.changes
    assert {"remove", "replace adapter"} <= churn.changes.keys(), churn.changes
    asked = {kind: count for kind, count in result["by_kind"].items() if kind.startswith("churned task")}
    assert sum(asked.values()) == 28 and asked.get("churned task (200)"), result["by_kind"]  # a tenth, less 2


def wait_until(check: object, seconds: float = 20, what: str = "") -> None:
    """Polls ``check()`` every 0.1 s until it is true; fails after ``seconds``."""
    deadline = time.monotonic() + seconds
    while not check():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"not within {seconds} s: {what}"
        time.sleep(0.1)


def add_run(run: Path, folder: Path, name: str, edit: Callable[[Path], object] = lambda staged: None) -> Path:
    """``run`` copied into ``folder`` as an operator would: under a hidden name (where ``edit`` may change it),
    then renamed into place."""
    staged = folder / f".{name}.partial"
    shutil.copytree(run, staged)
    edit(staged)
    return staged.rename(folder / name)


def test_a_live_runs_folder_serves_runs_as_they_come_and_go(runs, images, tmp_path):
    folder, outside = tmp_path / "runs", tmp_path / "elsewhere"
    folder.mkdir()
    said: list[str] = []
    live = LiveRuns(folder, load_backbone(runs[0].parent / "tiny-vit.safetensors"), "cpu", said.append)
    add_run(runs[0], folder, "linear")
    live.scan()
    token_file = tmp_path / "keys"
    token_file.write_text(f"alice:{TOKEN}\n# the build robot\nbob:bobs-key\n")
    token_file.chmod(0o600)
    access = ServiceAccess.from_options("127.0.0.1", token_file, False, None)
    assert access.keys == {"alice": TOKEN, "bob": "bobs-key"}
    good = images[0].read_bytes()
    with running(live, access, poll_seconds=0.2) as url, httpx.Client(base_url=url, headers=BEARER) as client:
        def served() -> list[str]:
            return [task["name"] for task in client.get("/tasks").json()["tasks"]]

        assert served() == ["linear"]
        add_run(runs[1], folder, "memory")  # added: served within a few polls, no restart
        wait_until(lambda: served() == ["linear", "memory"], what="the added run served")
        response = client.post("/predict", content=good, headers=JPEG)
        assert response.status_code == 200 and response.json()["images"][0]["predictions"].keys() == {
            "linear", "memory"}

        def corrupt(staged: Path) -> None:  # its adapter no longer matches its checksum
            adapter = staged / "adapter.safetensors"
            adapter.write_bytes(adapter.read_bytes()[:-1] + b"\0")

        adapter = add_run(runs[2], folder, "corrupt", corrupt) / "adapter.safetensors"
        shutil.copytree(runs[2], outside)
        (folder / "linked").symlink_to(outside)  # a run outside the folder, through a symlink
        add_run(runs[2], folder, "unfinished", lambda staged: (staged / "metrics.json").unlink())
        shutil.rmtree(folder / "linear")  # removed: no longer served
        wait_until(lambda: served() == ["memory"], what="the removed run dropped")
        time.sleep(1)  # five more polls: nothing more is said
        response = client.post("/predict?tasks=linear", content=good, headers=JPEG)
        assert response.status_code == 404 and "unknown task 'linear'" in response.json()["error"]

        bob = {"authorization": "Bearer bobs-key"}
        assert client.get("/tasks", headers=bob).status_code == 200
        token_file.write_text(f"alice:{TOKEN}\n")  # bob revoked
        reloaded = client.post("/admin/reload")
        assert reloaded.status_code == 200 and [task["name"] for task in reloaded.json()["tasks"]] == ["memory"]
        assert client.get("/tasks", headers=bob).status_code == 401
        assert client.get("/tasks").status_code == 200  # alice still in
        samples = scrape(client)
    assert samples['querytune_task_requests_total{task="memory"}'] == 1
    assert samples['querytune_task_request_duration_seconds_count{task="linear"}'] == 1
    assert 'querytune_task_requests_total{task="corrupt"}' not in samples
    assert said.count(f"{folder / 'memory'}: served") == 1 and f"{folder / 'linear'}: removed; no longer served" in said
    about = {name: [line for line in said if line.startswith(str(folder / name) + ":")]
             for name in ("corrupt", "linked", "unfinished")}
    assert about["corrupt"] == [f"{folder / 'corrupt'}: not served: {adapter}: corrupted (its sha256 differs from "
                                "adapter.sha256); train the run again"], said  # once, not every poll
    assert about["linked"] == [f"{folder / 'linked'}: not served: the folder leads to {outside}, outside {folder}"]
    assert about["unfinished"] == [f"{folder / 'unfinished'}: not served: not finished (no metrics.json)"]


def test_a_run_for_another_input_size_is_refused_with_one_line(runs, tmp_path):
    folder = tmp_path / "runs"
    folder.mkdir()
    add_run(runs[0], folder, "a")
    other = add_run(runs[1], folder, "b")
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "image_size": 64}))
    said: list[str] = []
    live = LiveRuns(folder, load_backbone(runs[0].parent / "tiny-vit.safetensors"), "cpu", said.append)
    assert live.scan() and not live.scan()
    assert live.current is not None and [task.name for task in live.current.tasks] == ["a"]
    assert said == [f"{folder / 'a'}: served", f"{folder / 'b'}: not served: {other}: was trained at 64 px and "
                                               f"{folder / 'a'} at 32 px; runs served together need one input size"]
    shutil.rmtree(folder)  # the folder itself gone: the runs served stay, said once
    assert not live.scan() and not live.scan() and live.current is not None
    assert said[2:] == [f"{folder}: cannot be read ([Errno 2] No such file or directory: '{folder}'); the runs "
                        "served stay"]


def test_named_keys_are_revoked_on_sighup_and_sigterm_drains_then_exits_0(runs, images, tmp_path):
    import signal

    folder = tmp_path / "runs"
    folder.mkdir()
    add_run(runs[0], folder, "linear")
    token_file, log = tmp_path / "keys", tmp_path / "access.jsonl"
    token_file.write_text(f"alice:{TOKEN}\nbob:bobs-key\n")
    token_file.chmod(0o600)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    root = Path(__file__).resolve().parents[1]
    process = subprocess.Popen(
        [sys.executable, "-m", "querytune", "serve", "--runs-dir", folder, "--backbone",
         runs[0].parent / "tiny-vit.safetensors", "--port", str(port), "--device", "cpu", "--token-file", token_file,
         "--access-log", log], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(root)})
    url, good = f"http://127.0.0.1:{port}", images[0].read_bytes()
    alice, bob = BEARER, {"authorization": "Bearer bobs-key"}
    try:
        def answers(headers: dict[str, str]) -> int:
            with suppress(httpx.TransportError):
                return httpx.get(url + "/tasks", headers=headers, timeout=5).status_code
            assert process.poll() is None, process.communicate()
            return 0

        wait_until(lambda: answers(bob) == 200, 120, "the service started")
        token_file.write_text(f"alice:{TOKEN}\n")  # bob revoked, then SIGHUP
        process.send_signal(signal.SIGHUP)
        wait_until(lambda: answers(bob) == 401, what="bob's key revoked")
        assert answers(alice) == 200

        sock = socket.create_connection(("127.0.0.1", port))  # a request in flight: half its body sent
        sock.sendall(f"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\nAuthorization: Bearer "
                     f"{TOKEN}\r\nContent-Length: {len(good)}\r\n\r\n".encode() + good[:100])
        time.sleep(0.5)
        process.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        assert process.poll() is None  # still draining
        sock.sendall(good[100:])
        reply = reply_of(sock, 30)
        sock.close()
        assert reply.startswith(b"HTTP/1.1 200"), reply[:200]
        assert process.wait(30) == 0
    finally:
        if process.poll() is None:
            process.kill()
        stderr = process.communicate(timeout=30)[1]
    assert f"--token-file {token_file}: keys revoked bob" in stderr
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    keys = {(line["key"], line["status"]) for line in lines if line["route"] == "/tasks"}
    assert keys == {("alice", 200), ("bob", 200), (None, 401)}
    assert [line["key"] for line in lines if line["route"] == "/predict"] == ["alice"]
    text = log.read_text()
    assert TOKEN not in text and "bobs-key" not in text


@pytest.fixture
def refuse_to_combine_b(monkeypatch):
    """Call it to make every server built with a task named "b" fail, as a merge of rows that cannot be merged
    would."""
    combine = service_live.MultiTaskServer

    def refusing(backbone, tasks, *args):
        if any(task.name == "b" for task in tasks):
            raise ValueError("rows of another shape")
        return combine(backbone, tasks, *args)

    return lambda: monkeypatch.setattr(service_live, "MultiTaskServer", refusing)


def test_runs_that_cannot_be_combined_are_not_served_and_the_others_stay(runs, tmp_path, refuse_to_combine_b):
    folder = tmp_path / "runs"
    folder.mkdir()
    add_run(runs[0], folder, "a")
    said: list[str] = []
    live = LiveRuns(folder, load_backbone(runs[0].parent / "tiny-vit.safetensors"), "cpu", said.append)
    assert live.scan() and [task.name for task in live.current.tasks] == ["a"]
    refuse_to_combine_b()
    add_run(runs[1], folder, "b")
    live.scan()
    assert [task.name for task in live.current.tasks] == ["a"]
    assert said[-1] == (f"{folder / 'b'}: not served: cannot be served with the other runs: "
                        "ValueError: rows of another shape")
    assert not live.scan() and said[-1].startswith(f"{folder / 'b'}: not served")  # said once, not every poll


def test_a_run_that_cannot_be_combined_leaves_the_runs_found_with_it_served(runs, tmp_path, refuse_to_combine_b):
    # the first scan finds every run at once: the one that cannot be combined is refused, not all of them
    folder = tmp_path / "runs"
    folder.mkdir()
    for run, name in zip(runs[:3], "abc"):
        add_run(run, folder, name)
    refuse_to_combine_b()
    said: list[str] = []
    live = LiveRuns(folder, load_backbone(runs[0].parent / "tiny-vit.safetensors"), "cpu", said.append)
    assert live.scan() and live.current is not None
    assert [task.name for task in live.current.tasks] == ["a", "c"]
    assert [line for line in said if "not served" in line] == [
        f"{folder / 'b'}: not served: cannot be served with the other runs: ValueError: rows of another shape"]
