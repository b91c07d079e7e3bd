"""One-pass multi-task serving: the Python API and ``querytune predict``."""

from __future__ import annotations

import json

import pytest
import torch
from test_bad_input import cli_error
from test_cli import querytune
from test_memory import FAST, _memory, _train

from conftest import tiny_vit
from querytune import load_run, train_run
from querytune.data import Preprocess, load_image, open_split
from querytune.errors import CheckpointError, ConfigError
from querytune.methods import build_method
from querytune.methods.memory import MemoryTaskSet
from querytune.run import eval_run
from querytune.serve import MultiTaskServer, ServedMethod, collect_images
from querytune.settings import RunSpec, Runtime
from querytune.train import predict
from querytune.trunk.cache import CacheKey
from querytune.trunk.features import extract_features
from querytune.trunk.sources import make_source


def test_server_answers_every_task_from_one_trunk_pass():
    backbone = tiny_vit(layer_scale=True)
    torch.manual_seed(0)
    linear = build_method("linear", backbone, 3, {})
    vqt = build_method("vqt", backbone, 4, {"num_queries": 2}).eval()
    first = _memory(backbone, seed=1, memory_tokens=2)
    second = _memory(backbone, seed=2, num_classes=2, memory_tokens=0)
    extension = _memory(backbone, seed=3, memory_tokens=1)
    extension.stack = MemoryTaskSet([first.stack.tasks[0], extension.stack.tasks[0]], [(), (0,)])
    methods = {"linear": linear, "vqt": vqt, "first": first, "second": second, "extension": extension}
    server = MultiTaskServer(backbone, [ServedMethod(n, m) for n, m in methods.items()], image_size=32, device="cpu")
    # first's task is also the extension's base: it runs once
    merged = server.rows.of_kind(MemoryTaskSet)
    assert len(merged.tasks) == 3 and merged.reads == [(), (), (0,)]

    trunk_passes = []
    hook = backbone.patch_embed.register_forward_hook(lambda *_: trunk_passes.append(1))
    images = torch.randn(3, 3, 32, 32)
    logits = server.predict(images)
    hook.remove()
    assert len(trunk_passes) == 1
    features = extract_features(backbone, images).to("cpu")  # as eval reads them
    with torch.no_grad():
        for name, method in methods.items():
            torch.testing.assert_close(logits[name], method(features), rtol=1e-5, atol=1e-5, msg=name)


def _served_methods(backbone) -> dict[str, object]:
    """Frozen-trunk tasks of every method and layout the batched serving path groups: VQTs with other query layers,
    counts, combines and kept features, Head2Toes of two poolings with and without kept features, linear probes and
    memory tasks of other class counts, and SynQTs."""
    torch.manual_seed(0)
    methods = {}
    for k, options in enumerate([{}, {}, {"num_queries": 2, "combine": "mean"}, {"layers": "1-2"},
                                 {"num_queries": 2, "combine": "weighted", "layers": "0,2"}, {}]):
        methods[f"vqt{k}"] = build_method("vqt", backbone, 3 + k % 2, options)
    methods["vqt5"].keep_features(torch.tensor([0, 5, 50, 97, 190]))
    with torch.no_grad():
        methods["vqt4"].query_path.query_weights.normal_()
    for k, options in enumerate([{}, {}, {"target_size": 96}]):
        methods[f"head2toe{k}"] = build_method("head2toe", backbone, 4, options)
    methods["head2toe1"].keep_features(torch.tensor([1, 47, 48, 60, 100, 150, 191]))
    for k in range(3):
        methods[f"linear{k}"] = build_method("linear", backbone, 2 + k, {})
        methods[f"memory{k}"] = _memory(backbone, seed=10 + k, num_classes=2 + k, memory_tokens=1)
    for k in range(2):
        methods[f"synqt{k}"] = build_method("synqt", backbone, 3, {"num_queries": 1 + k})
    return {name: method.eval() for name, method in methods.items()}


def test_tasks_are_batched_across_tasks_and_each_answers_as_its_own_forward():
    backbone = tiny_vit(layer_scale=True)
    methods = _served_methods(backbone)
    server = MultiTaskServer(backbone, [ServedMethod(n, m) for n, m in methods.items()], image_size=32, device="cpu")
    kinds = {type(rows).__name__: list(own) for rows, own in zip(server.rows.sets, server.rows.own_row)}
    assert kinds == {"VQTRows": [f"vqt{k}" for k in range(6)], "Head2ToeHeads": [f"head2toe{k}" for k in range(3)],
                     "LinearHeads": [f"linear{k}" for k in range(3)], "MemoryTaskSet": [f"memory{k}" for k in range(3)],
                     "SynQTRows": ["synqt0", "synqt1"]}
    vqts = server.rows.sets[0]
    assert [len(queries) for queries in vqts.queries.values()] == [1 + 1 + 2 + 0 + 2 + 1, 1 + 1 + 2 + 1 + 0 + 1,
                                                                   1 + 1 + 2 + 1 + 2 + 1]  # one call per block
    images = torch.randn(3, 3, 32, 32)
    features = extract_features(backbone, images).to("cpu")
    with torch.no_grad():
        expected = {name: method(features) for name, method in methods.items()}
    for name, logits in server.predict(images).items():
        torch.testing.assert_close(logits, expected[name], rtol=1e-5, atol=1e-5, msg=name)
    subset = ["vqt3", "head2toe1", "linear2"]
    answered = server.predict(images, subset)
    assert list(answered) == subset
    for name, logits in answered.items():
        torch.testing.assert_close(logits, expected[name], rtol=1e-5, atol=1e-5, msg=name)
    # a subset costs that subset: its merged rows hold only its own tasks
    assert [list(own) for own in server.selected(subset)[1].own_row] == [[name] for name in subset]
    with pytest.raises(ConfigError, match="unknown task 'nope'"):
        server.predict(images, ["nope"])
    # subsets kept built hold no more tasks together than are served (beside the newest): bounded memory
    names = [task.name for task in server.tasks]
    for start in range(len(names) - 1):
        server.selected(names[start:start + 2] + names[-2:])
        assert len(server.subsets) == 1 or sum(map(len, server.subsets)) <= len(names)
    assert len(server.subsets) < len(names) - 1 and list(server.subsets)[-1] == tuple(names[-2:])


def test_a_server_built_from_the_tasks_served_leaves_the_serving_one_answering(monkeypatch):
    # a live folder's scan builds the next server from the same task objects while the batcher's thread answers
    # from the current one: building must not take anything of a task away meanwhile
    backbone = tiny_vit()
    methods = {name: method for name, method in _served_methods(backbone).items()
               if name in ("synqt0", "head2toe0", "head2toe1", "linear0")}
    tasks = [ServedMethod(name, method) for name, method in methods.items()]
    server = MultiTaskServer(backbone, tasks, image_size=32, device="cpu")
    images = torch.randn(2, 3, 32, 32)
    features = extract_features(backbone, images).to("cpu")
    with torch.no_grad():
        expected = {name: method(features) for name, method in methods.items()}
    answered: list[dict[str, torch.Tensor]] = []
    for name in ("synqt0", "head2toe1"):  # SynQT's rows read the method's backbone; so does a subset's Head2Toe
        head = methods[name].head
        train = head.train

        def answer_meanwhile(mode=True, train=train, name=name):
            answered.append(server.predict(images))
            answered.append(server.predict(images, [name]))  # a subset not built yet: built now
            return train(mode)

        monkeypatch.setattr(head, "train", answer_meanwhile)
    MultiTaskServer(backbone, tasks, image_size=32, device="cpu")
    assert len(answered) == 4
    for logits in answered:
        for name, values in logits.items():
            torch.testing.assert_close(values, expected[name], rtol=1e-5, atol=1e-5, msg=name)


def test_server_refuses_adapting_methods_on_the_shared_trunk_and_foreign_backbones():
    backbone = tiny_vit()
    plain = build_method("memory-plain", backbone, 3, {})
    with pytest.raises(ConfigError, match="task 'p': method 'memory-plain' adapts the backbone it was built on"):
        MultiTaskServer(backbone, [ServedMethod("p", plain)])
    other = build_method("linear", tiny_vit(seed=5), 3, {})
    with pytest.raises(ConfigError, match="task 'o': was built on another backbone"):
        MultiTaskServer(backbone, [ServedMethod("o", other)])


def test_runs_served_together_must_share_backbone_and_image_size(tiny_backbone_dir, tiny_task, tmp_path):
    from querytune.backbones import save_backbone

    _train(tiny_backbone_dir, tiny_task, tmp_path / "a", method="linear")
    train_run(RunSpec(method="linear", backbone=tiny_backbone_dir, data=tiny_task, image_size=40), tmp_path / "b",
              train=FAST, runtime=Runtime(workers=0, progress=False))
    with pytest.raises(ConfigError, match="a: given twice"):
        MultiTaskServer.from_runs(None, [tmp_path / "a", tmp_path / "b" / ".." / "a"])
    with pytest.raises(ConfigError, match=r"b: was trained at 40 px .* need one input size"):
        MultiTaskServer.from_runs(None, [tmp_path / "a", tmp_path / "b"])
    other = tmp_path / "other.safetensors"
    save_backbone(tiny_vit(seed=7), other)
    with pytest.raises(CheckpointError, match="a: was trained on backbone"):
        MultiTaskServer.from_runs(other, [tmp_path / "a"])
    train_run(RunSpec(method="linear", backbone=other, data=tiny_task, image_size=32), tmp_path / "c", train=FAST,
              runtime=Runtime(workers=0, progress=False))
    with pytest.raises(ConfigError, match=r"c: was trained on backbone 'other.safetensors' .* share one"):
        MultiTaskServer.from_runs(None, [tmp_path / "a", tmp_path / "c"])


def test_collect_images_walks_folders_and_names_what_is_missing(tiny_task, tmp_path):
    from querytune.errors import DataError

    images = collect_images([tiny_task / "images"])
    assert len(images) == 27 and images == sorted(images)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty: no images"):
        collect_images([tmp_path / "empty"])
    with pytest.raises(DataError, match="nothing.jpg: no such image"):
        collect_images([tmp_path / "nothing.jpg"])


def assert_close(served: float, expected: float) -> None:
    """Within float32's rounding across batchings (other batch sizes sum in other orders), far from a wrong answer."""
    torch.testing.assert_close(torch.tensor(served), torch.tensor(expected), rtol=1e-5, atol=1e-5)


def assert_served_as(served: dict, expected: torch.Tensor) -> None:
    """``served`` (a task's record) predicts as the class probabilities ``expected`` of one image do: its probability
    is theirs, and its label their argmax wherever no other class comes within the tolerance (else one of those)."""
    assert_close(served["probability"], expected[served["label"]].item())
    assert_close(served["probability"], expected.max().item())
    runner_up = expected.topk(2).values[1].item() if len(expected) > 1 else 0.0
    if expected.max().item() - runner_up > 1e-4:  # no tie within the tolerance: the one right answer
        assert served["label"] == expected.argmax().item()


def test_predict_cli_serves_runs_together_as_eval_predicts_them(tiny_backbone_dir, tiny_task, tmp_path, capsys):
    for method, extra in (("linear", []), ("memory", ["--memory-tokens", "2"])):
        result = querytune("train", "--method", method, "--backbone", tiny_backbone_dir, "--data", tiny_task,
                           "--out", tmp_path / method, "--epochs", "2", "--batch-size", "8", "--image-size", "32",
                           "--workers", "0", "-q", *extra)
        assert result.returncode == 0, result.stderr
    _train(tiny_backbone_dir, tiny_task, tmp_path / "lora", method="lora")  # adapts the backbone: a pass of its own
    out = tmp_path / "predictions.jsonl"
    runs = ["--run", tmp_path / "linear", "--run", tmp_path / "memory", "--run", tmp_path / "lora"]
    result = querytune("predict", *runs, tiny_task / "images" / "test", "--out", out, "--workers", "0")
    assert result.returncode == 0, result.stderr
    records = {r["path"]: r["predictions"] for r in map(json.loads, out.read_text().splitlines())}
    images = open_split(tiny_task, "test")
    assert len(records) == len(images)

    for name in ("linear", "memory", "lora"):  # what `querytune eval` computes, image by image
        method, config = load_run(tmp_path / name)
        preprocess = Preprocess(32, method.backbone.config.mean, method.backbone.config.std)
        source = make_source(method.reads, CacheKey(method.backbone, images, preprocess), torch.device("cpu"))
        probabilities = predict([method], source, torch.device("cpu"))[0].softmax(-1)
        correct = 0
        for (path, label), expected in zip(images.items, probabilities):
            served = records[str(path)][name]
            assert served["class"] == config["classes"][served["label"]]
            assert_served_as(served, expected)
            correct += served["label"] == label
        assert correct / len(images) == eval_run(tmp_path / name, tiny_task, "test",
                                                 runtime=Runtime(workers=0, progress=False))

    before = out.read_bytes()
    result = querytune("predict", *runs, tiny_task / "images" / "test", "--out", out)
    assert result.returncode == 2 and "exists; pass --overwrite" in result.stderr and out.read_bytes() == before
    result = querytune("predict", "--run", tmp_path / "memory", tiny_task / "images" / "test" / "00000.jpg",
                       "--workers", "0", "--topk", "3", "--logits")
    assert result.returncode == 0, result.stderr
    (line,) = result.stdout.splitlines()
    first = records[str(tiny_task / "images" / "test" / "00000.jpg")]["memory"]
    answer = json.loads(line)["predictions"]["memory"]  # this image alone, the first one in a batch of all
    assert sorted(t["label"] for t in answer["top"]) == [0, 1, 2] and len(answer["logits"]) == 3
    probabilities = torch.tensor(answer["logits"]).softmax(-1)
    assert_served_as(first, probabilities)
    assert_served_as(answer, probabilities)
    assert answer["top"][0] == {key: answer[key] for key in ("class", "label", "probability")}
    for ranked in answer["top"]:
        assert_close(ranked["probability"], probabilities[ranked["label"]].item())
    error = cli_error(capsys, "predict", "--run", tmp_path / "memory", tiny_task / "images", "--topk", "0")
    assert error == "error: --topk must be at least 1 (got 0)"


def test_runs_of_every_method_are_served_as_their_own_eval_predicts_them(tiny_backbone_dir, tiny_task, tmp_path):
    from querytune import METHODS, MultiTaskServer

    runs = []
    for name in sorted(METHODS):
        _train(tiny_backbone_dir, tiny_task, tmp_path / name, method=name)
        runs.append(tmp_path / name)
    server = MultiTaskServer.from_runs(tiny_backbone_dir, runs, device="cpu")
    adapting = [task.name for task in server.tasks if not task.shares_trunk]
    assert sorted(adapting) == sorted(n for n, cls in METHODS.items() if not cls.reads.frozen)
    backbones = {id(task.method.backbone) for task in server.tasks if not task.shares_trunk}
    assert len(backbones) == len(adapting) and id(server.backbone) not in backbones  # a copy each

    images = open_split(tiny_task, "test")
    trunk_passes = []
    for model in [server.backbone, *(task.method.backbone for task in server.tasks if not task.shares_trunk)]:
        model.patch_embed.register_forward_hook(lambda *_: trunk_passes.append(1))
    batch = torch.stack([server.preprocess(image) for image in map(load_image, (p for p, _ in images.items))])
    logits = server.predict(batch)
    assert len(trunk_passes) == 1 + len(adapting)  # the frozen-backbone tasks share one pass

    for run in runs:  # what `querytune eval` computes from the run alone (the served heads batched across tasks)
        method, _ = load_run(run)
        preprocess = Preprocess(32, method.backbone.config.mean, method.backbone.config.std)
        source = make_source(method.reads, CacheKey(method.backbone, images, preprocess), torch.device("cpu"))
        torch.testing.assert_close(logits[run.name], predict([method], source, torch.device("cpu"))[0], rtol=1e-5,
                                   atol=1e-5, msg=run.name)

    paths = [path for path, _ in images.items[:2]]
    records = server([paths[0], load_image(paths[1])], topk=2, with_logits=True)
    assert records[0]["path"] == str(paths[0]) and "path" not in records[1]
    for record, row in zip(records, range(2)):
        for name, answer in record["predictions"].items():
            probabilities = logits[name][row].softmax(-1)
            assert [t["label"] for t in answer["top"]] == probabilities.topk(2).indices.tolist()
            assert answer["label"] == answer["top"][0]["label"] and answer["class"] == f"class{answer['label']}"
            assert answer["logits"] == pytest.approx(logits[name][row].tolist(), abs=1e-5)
    with pytest.raises(ConfigError, match="topk must be at least 1"):
        server(paths[0], topk=0)


@pytest.mark.parametrize("workers", ["0", "2"])
def test_predict_names_an_unreadable_image_and_goes_on_past_it_with_skip_bad(workers, tiny_backbone_dir, tiny_task,
                                                                              tmp_path, capsys):
    _train(tiny_backbone_dir, tiny_task, tmp_path / "linear", method="linear")
    images = tmp_path / "images"
    images.mkdir()
    for name in ("a.jpg", "c.jpg", "d.jpg"):
        (images / name).write_bytes((tiny_task / "images" / "test" / "00000.jpg").read_bytes())
    (images / "b.jpg").write_bytes(b"")
    out = tmp_path / "predictions.jsonl"
    command = ("predict", "--run", tmp_path / "linear", images, "--workers", workers, "--batch-size", "2", "--out", out)
    # one line, whether the image was read in this process or in a loader's worker
    assert cli_error(capsys, *command) == f"error: {images / 'b.jpg'}: cannot read image (empty file)"
    assert not out.exists()

    result = querytune(*command, "--skip-bad")
    assert result.returncode == 0, result.stderr
    assert result.stderr.splitlines() == [f"skipped {images / 'b.jpg'}: cannot read image (empty file)"]
    assert "3 images x 1 tasks" in result.stdout and "(1 skipped)" in result.stdout
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [record["path"] for record in records] == [str(images / name) for name in ("a.jpg", "b.jpg", "c.jpg",
                                                                                        "d.jpg")]
    assert records[1] == {"path": str(images / "b.jpg"), "error": f"{images / 'b.jpg'}: cannot read image (empty file)"}
    for record in (records[2], records[3]):  # the same image, answered alone (beside b.jpg) and in a batch of two
        assert_close(record["predictions"]["linear"]["probability"], records[0]["predictions"]["linear"]["probability"])
