"""The zoo CLI end to end: build, inspect, export round trip, and bad inputs."""

from __future__ import annotations

import json

import pytest
import torch

import deepalign
from deepalign.zoo import Zoo

SMALL = [
    "--task",
    "mlp-digits",
    "--n",
    "6",
    "--hidden",
    "8,8",
    "--epochs",
    "1",
    "--shard-size",
    "4",
]


@pytest.fixture
def small_zoo(tmp_path, cli):
    out = tmp_path / "zoo"
    res = cli("zoo", *SMALL, "--out", out)
    assert res.code == 0, res.err
    return out, res


def test_zoo_summary_inspect_and_export(small_zoo, cli, tmp_path):
    out, res = small_zoo
    assert "6/6 models trained" in res.out and "test accuracy mean" in res.out
    rows = Zoo(out).manifest
    accs = [r["test_accuracy"] for r in rows]
    assert f"max {max(accs):.2%}" in res.out
    text = cli("inspect", out)
    assert text.code == 0 and "mlp-digits" in text.out and "P1" in text.out
    js = cli("inspect", out, "--json")
    info = json.loads(js.out)
    assert info["task"] == "mlp-digits" and info["summary"]["trained"] == 6
    assert info["parameters_per_model"] == 64 * 8 + 8 + 8 * 8 + 8 + 8 * 10 + 10
    ckpt = tmp_path / "m.safetensors"
    exp = cli("export", out, "--index", "5", "--out", ckpt)
    assert exp.code == 0, exp.err
    model = deepalign.load_model(ckpt)
    zoo = Zoo(out)
    ref = zoo.module()
    ref.load_state_dict({k: v[0] for k, v in zoo.load([5]).items()})
    x = zoo.dataset("test").x[:50]
    with torch.no_grad():
        assert torch.equal(model(x), ref(x))
    _, _, meta = deepalign.load_state(ckpt)
    assert json.loads(meta["deepalign.index"]) == 5 and meta["deepalign.task"] == "mlp-digits"


def test_rerun_is_a_no_op_and_keeps_shards(small_zoo, cli):
    out, _ = small_zoo
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*")}
    res = cli("zoo", *SMALL, "--out", out)
    assert res.code == 0 and "6/6" in res.out and "trained 0 models (6 already there)" in res.out
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*")} == before


def test_shard_option(tmp_path, cli):
    out = tmp_path / "z"
    res = cli("zoo", *SMALL, "--shard", "1/2", "--out", out)
    assert res.code == 0 and "2/6 models trained" in res.out and "not complete" in res.out
    assert [p.name for p in sorted(out.glob("shard-*"))] == ["shard-00001.safetensors"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--task", "mlp-imagenet"], "unknown zoo task 'mlp-imagenet'"),
        (["--shard", "2/2"], "--shard '2/2'"),
        (["--shard", "x"], "expected i/n"),
        (["--hidden", "8,a"], "--hidden"),
        (["--epochs", "0"], "--epochs must be positive"),
        (["--views", "2"], "--views applies to INR tasks"),
        (["--task", "siren-sine", "--batch-size", "8"], "full-batch"),
        (["--task", "mlp-mnist"], "mnist: no data folder given"),
        (["--threads", "0"], "--threads"),
        (["--device", "cuda:7"], "--device"),
    ],
)
def test_bad_zoo_inputs(tmp_path, cli, args, message):
    out = tmp_path / "z"
    res = cli("zoo", "--n", "4", *args, "--out", out)
    if res.code != 2 and "cuda" in " ".join(args) and torch.cuda.device_count() > 7:
        pytest.fail("this machine really has cuda:7; the test needs a device that does not exist")
    assert res.code == 2, (res.out, res.err)
    assert message in res.err and "Traceback" not in res.err
    assert len(res.err.strip().splitlines()) == 1
    assert not out.exists()


def test_fashion_missing_folder(tmp_path, cli):
    empty = tmp_path / "empty"
    empty.mkdir()
    res = cli(
        "zoo", "--task", "mlp-fashion", "--n", "2", "--data-dir", empty, "--out", tmp_path / "z"
    )
    assert res.code == 2 and "apt-get install dataset-fashion-mnist" in res.err
    assert not (tmp_path / "z").exists()


def test_bad_export_and_inspect(small_zoo, cli, tmp_path):
    out, _ = small_zoo
    target = tmp_path / "x.safetensors"
    res = cli("export", out, "--index", "6", "--out", target)
    assert res.code == 2 and "model 6 is not in the zoo" in res.err and not target.exists()
    res = cli("export", tmp_path / "nowhere", "--index", "0", "--out", target)
    assert res.code == 2 and "not a zoo folder" in res.err and not target.exists()
    (out / "manifest.json").write_text("[1, 2")
    res = cli("inspect", out)
    assert res.code == 2 and "corrupt zoo manifest" in res.err
    res = cli("zoo", *SMALL, "--out", out)
    assert res.code == 2 and "corrupt zoo manifest" in res.err
    assert len(list(out.glob("shard-*"))) == 2


def test_different_zoo_in_same_folder(small_zoo, cli):
    out, _ = small_zoo
    res = cli("zoo", *SMALL[:-2], "--shard-size", "3", "--out", out)
    assert res.code == 2 and "holds a different zoo (shard_size is 4 there, 3 here)" in res.err


def test_fashion_mnist_zoo_from_the_debian_files(tmp_path, cli):
    """The real IDX files (``apt-get install dataset-fashion-mnist``; ``make install`` adds it)."""
    args = ["zoo", "--task", "mlp-fashion", "--n", "2", "--hidden", "16,16", "--epochs", "3"]
    args += ["--batch-size", "32"]
    res = cli(*args, "--train-subset", "1000", "--out", tmp_path / "f")
    assert res.code == 0, res.err
    zoo = Zoo(tmp_path / "f")
    assert zoo.config["layers"][1]["in_features"] == 784 and len(zoo) == 2
    assert zoo.dataset("test").x.shape == (10000, 1, 28, 28)
    assert all(r["test_accuracy"] > 0.5 for r in zoo.manifest)  # 10 classes: chance is 0.1
