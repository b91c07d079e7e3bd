"""``querytune serve``: a real server on a loopback port answered by a real HTTP client."""

from __future__ import annotations

import asyncio
import io
import json
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from PIL import Image
from test_bad_input import cli_error

from conftest import tiny_vit, write_task
from querytune import MultiTaskServer, train_run
from querytune.backbones import save_backbone
from querytune.errors import ConfigError
from querytune.settings import RunSpec, Runtime

httpx = pytest.importorskip("httpx", reason="the service's tests need the test extra (httpx)")
uvicorn = pytest.importorskip("uvicorn", reason="the service needs the extra querytune[serve] (uvicorn)")
from querytune.service import ServiceLimits, create_app  # noqa: E402  (after the extra is known present)

RUNS = ("linear", "memory", "lora")  # frozen-backbone runs sharing a pass, and one adapting the backbone
JPEG = {"content-type": "image/jpeg"}
FIELD_ONLY = b'--x\r\nContent-Disposition: form-data; name="name"\r\n\r\ncat\r\n--x--\r\n'  # a form, no file


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
def running(server: MultiTaskServer, **limits: float) -> Iterator[str]:
    """The service on a free loopback port, in a thread of this process; yields its base URL."""
    config = uvicorn.Config(create_app(server, ServiceLimits(**limits)), host="127.0.0.1", port=0,
                            log_level="warning")
    service = uvicorn.Server(config)
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

        response = client.post("/predict", params={"tasks": "lora,linear"}, content=images[4].read_bytes(),
                               headers=JPEG)
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
    server.predict = lambda batch: (sizes.append(len(batch)), predict(batch))[1]  # type: ignore[method-assign]
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


def test_page_shows_every_task_answer_in_headless_chromium(runs, images, tmp_path):
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    webdriver = pytest.importorskip("selenium.webdriver", reason="the page test needs selenium (test extra)")
    if browser is None or driver is None:
        pytest.skip("headless Chromium is absent (apt-get install chromium chromium-driver; .ci/run does as root)")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    server = MultiTaskServer.from_runs(None, runs, device="cpu")
    (expected,) = server([images[0]], topk=3)
    not_image = tmp_path / "notes.jpg"
    not_image.write_text("not an image")
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(argument)
    with running(server) as url:
        chrome = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=driver))
        try:
            chrome.get(url + "/")
            WebDriverWait(chrome, 30).until(lambda c: "3 tasks" in c.find_element(By.ID, "tasks").text)
            chrome.find_element(By.ID, "file").send_keys(str(images[0]))
            WebDriverWait(chrome, 30).until(lambda c: c.find_element(By.ID, "answers").is_displayed())
            rows = {row.get_attribute("data-task"): [cell.text for cell in row.find_elements(By.TAG_NAME, "td")]
                    for row in chrome.find_elements(By.CSS_SELECTOR, "#answers tbody tr")}
            chrome.find_element(By.ID, "file").send_keys(str(not_image))
            WebDriverWait(chrome, 30).until(lambda c: c.find_element(By.ID, "error").text)
            error = chrome.find_element(By.ID, "error").text
        finally:
            chrome.quit()
    assert rows.keys() == set(RUNS)
    for task, answer in expected["predictions"].items():
        assert rows[task][:4] == [task, task, answer["class"], f"{100 * answer['probability']:.1f}%"]
    assert error.startswith("400: ") and "cannot read image" in error


def test_serve_command_under_a_bounded_load_of_good_and_malformed_requests(tiny_task):
    """benchmarks/serve_load.py, small: `querytune serve` in its own process answers concurrent clients; every good
    answer is right, every malformed request (wrong type, truncated, 100 MB, slow client...) a 4xx; no crash."""
    pytest.importorskip("psutil", reason="the load check reads the server's memory with psutil (test extra)")
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "serve_load.py"
    result = subprocess.run([sys.executable, script, "--backbone", "tiny", "--data", tiny_task, "--train-split",
                             "train800", "--tasks", "2", "--clients", "4", "--seconds", "1", "--faults", "200",
                             "--json"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    load, faults = map(json.loads, result.stdout.splitlines())
    assert load["phase"] == "load" and load["requests"] > 0 and load["errors"] == 0
    assert faults["failures"] == 0 and faults["alive"] and faults["health"] == "ok", faults
    assert faults["by_kind"]["100 MB body"] == 1 and faults["by_kind"]["slow client"] == 1
    assert sum(faults["by_kind"].values()) == 200
    assert faults["rss_after_mb"] - faults["rss_before_mb"] < 64  # the benchmark's 10k requests say more
