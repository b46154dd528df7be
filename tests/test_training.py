"""Training a Deep-Align aligner end to end on a tiny zoo: outputs, resume, save/load, errors."""

from __future__ import annotations

import json

import pytest
import torch

from deepalign.core import permutation as P
from deepalign.errors import DeepAlignError
from deepalign.nn.model import DeepAlign, DeepAlignConfig
from deepalign.nn.sizes import MODEL_SIZES
from deepalign.training.loop import TrainConfig
from deepalign.training.trainer import train_aligner
from deepalign.zoo.build import build_zoo
from deepalign.zoo.loader import Zoo
from deepalign.zoo.plan import make_plan

TINY = DeepAlignConfig(**MODEL_SIZES["tiny"])


def _cfg(epochs: int) -> TrainConfig:
    return TrainConfig(
        epochs=epochs, batch=4, steps_per_epoch=3, data_batch=16, val_pairs=4, val_points=3
    )


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    torch.set_num_threads(1)
    path = tmp_path_factory.mktemp("zoo") / "mlp"
    build_zoo(make_plan("mlp-digits", 20, seed=0, hidden=[12, 10], epochs=1), path)
    return path


def test_training_writes_an_aligner_that_loads_and_aligns(zoo, tmp_path):
    out = tmp_path / "al"
    train_aligner(zoo, out, TINY, _cfg(2))
    for name in (
        "config.json",
        "model.safetensors",
        "metrics.jsonl",
        "training.png",
        "train_state.pt",
    ):
        assert (out / name).is_file(), name
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0, 1]
    assert all({"val_barrier", "val_perm_accuracy"} <= set(r) for r in rows)
    model = DeepAlign.from_pretrained(out)
    z = Zoo(zoo)
    a = z.load(z.indices("test")[:2])
    t = P.random_permutation(z.spec, seed=3, batch=2)
    b = P.apply(z.spec, t, a, batch_dims=1)
    perm = model.align(a, b)
    # Prop. 5: a planted permutation of the same network is recovered exactly, trained or not.
    assert all(torch.equal(perm[g], P.invert(t)[g]) for g in perm)
    again = DeepAlign.from_pretrained(out)
    sa, sb = model(a, b), again(a, b)
    assert all(torch.equal(sa[g], sb[g]) for g in sa)


def test_resume_gives_the_same_result_as_an_uninterrupted_run(zoo, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train_aligner(zoo, straight, TINY, _cfg(2))

    class Killed(Exception):
        pass

    def kill(row: dict) -> None:  # the process dies right after epoch 1's checkpoint
        raise Killed

    with pytest.raises(Killed):
        train_aligner(zoo, resumed, TINY, _cfg(2), on_epoch=kill)
    with pytest.raises(DeepAlignError, match="--resume"):
        train_aligner(zoo, resumed, TINY, _cfg(2))
    train_aligner(zoo, resumed, TINY, _cfg(2), resume=True)
    s1 = torch.load(straight / "train_state.pt", weights_only=True)["model"]
    s2 = torch.load(resumed / "train_state.pt", weights_only=True)["model"]
    assert all(torch.equal(s1[k], s2[k]) for k in s1)


def test_a_few_steps_reduce_the_supervised_loss(zoo, tmp_path):
    cfg = TrainConfig(
        epochs=4,
        batch=8,
        steps_per_epoch=6,
        lr=3e-3,
        w_alignment=0,
        w_lmc=0,
        val_pairs=4,
        val_points=3,
    )
    train_aligner(zoo, tmp_path / "al", TINY, cfg)
    rows = [json.loads(x) for x in (tmp_path / "al" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["train"]["supervised"] < rows[0]["train"]["supervised"]


def test_bad_inputs(zoo, tmp_path):
    with pytest.raises(DeepAlignError, match="not a zoo"):
        train_aligner(tmp_path, tmp_path / "x", TINY, _cfg(1))
    out = tmp_path / "al"
    train_aligner(zoo, out, TINY, _cfg(1))
    (out / "train_state.pt").write_bytes(b"garbage")
    with pytest.raises(DeepAlignError, match="corrupt"):
        train_aligner(zoo, out, TINY, _cfg(2), resume=True)
    (out / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(DeepAlignError, match="safetensors"):
        DeepAlign.from_pretrained(out)
    with pytest.raises(DeepAlignError, match="aligner"):
        DeepAlign.from_pretrained(tmp_path / "nothing")


@pytest.mark.parametrize(
    ("flags", "needle"),
    [
        (["--lr", "-1"], "--lr -1.0: must be a positive number"),
        (["--lr", "nan"], "--lr nan"),
        (["--w-lmc", "nan"], "--w-lmc nan"),
        (["--w-alignment", "-0.5"], "--w-alignment -0.5"),
        (["--w-lmc", "0", "--w-alignment", "0", "--w-supervised", "0"], "every loss weight is 0"),
    ],
)
def test_cli_train_refuses_bad_settings_in_one_line(zoo, tmp_path, cli, flags, needle):
    out = tmp_path / "al"
    res = cli("train", "--zoo", zoo, "--out", out, "--size", "tiny", "--epochs", "1", *flags)
    assert res.code == 2 and needle in res.err, res.err
    assert len(res.err.strip().splitlines()) == 1 and "Traceback" not in res.err
    assert not out.exists()


def test_cli_train_and_align_with_the_aligner(zoo, tmp_path, cli):
    from deepalign.zoo.loader import Zoo as _Zoo

    out = tmp_path / "al"
    res = cli(
        "train",
        "--zoo",
        zoo,
        "--out",
        out,
        "--size",
        "tiny",
        "--epochs",
        "1",
        "--steps",
        "2",
        "--batch",
        "4",
    )
    assert res.code == 0, res.err
    z = _Zoo(zoo)
    a_path, b_path = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    assert cli("export", zoo, "--index", z.indices("test")[0], "--out", a_path).code == 0
    assert cli("export", zoo, "--index", z.indices("test")[1], "--out", b_path).code == 0
    res = cli(
        "align",
        a_path,
        b_path,
        "--method",
        "deepalign",
        "--aligner",
        out,
        "--out",
        tmp_path / "c.safetensors",
    )
    assert res.code == 0, res.err
    assert (tmp_path / "c.safetensors").is_file()
    res = cli("inspect", out)
    assert res.code == 0 and "aligner" in res.out
    # Other hidden widths: the aligner runs on them (its parameters do not depend on widths).
    import deepalign as da

    layers = [m for m in z.module().modules() if isinstance(m, torch.nn.Linear)]
    dims = [layers[0].in_features, *(m.out_features for m in layers)]
    narrow = dims[:1] + [9] * (len(dims) - 2) + dims[-1:]
    other = tmp_path / "other.safetensors"
    da.save_model(da.mlp(narrow, flatten_input=True), other)
    da.save_model(da.mlp(narrow, flatten_input=True), tmp_path / "other2.safetensors")
    res = cli(
        "align",
        other,
        tmp_path / "other2.safetensors",
        "--method",
        "deepalign",
        "--aligner",
        out,
        "--out",
        tmp_path / "d.safetensors",
    )
    assert res.code == 0, res.err
    assert (tmp_path / "d.safetensors").is_file()
    # Another depth is refused, saying what differs (not the widths).
    deeper = tmp_path / "deeper.safetensors"
    da.save_model(da.mlp([dims[0], 9, 9, 9, 9, dims[-1]], flatten_input=True), deeper)
    res = cli(
        "align",
        deeper,
        deeper,
        "--method",
        "deepalign",
        "--aligner",
        out,
        "--out",
        tmp_path / "e.safetensors",
    )
    assert res.code == 2 and "depth" in res.err and "width" not in res.err
    assert not (tmp_path / "e.safetensors").exists()


def test_inr_zoo_trains_on_two_views_of_one_target(tmp_path):
    path = tmp_path / "sine"
    build_zoo(make_plan("siren-sine", 24, seed=0, hidden=[8, 8], epochs=20, views=2), path)
    out = tmp_path / "al"
    train_aligner(path, out, TINY, _cfg(1))
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["val_barrier"] >= 0 and rows[0]["train"]["lmc"] > 0
    model = DeepAlign.from_pretrained(out)
    z = Zoo(path)
    a = z.load(z.indices("test")[:2])
    t = P.random_permutation(z.spec, seed=1, batch=2)
    perm = model.align(a, P.apply(z.spec, t, a, batch_dims=1))
    assert all(torch.equal(perm[g], P.invert(t)[g]) for g in perm)
