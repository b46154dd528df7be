"""The user's own models, end to end: plain nn.Module classes, state dicts saved the usual way, their
own preprocessing — through the Python verbs and the CLI."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import deepalign as da
from deepalign.data import load
from deepalign.errors import DeepAlignError
from user_models import MyMLP, ResCNN, train

HERE = Path(__file__).parent


@pytest.fixture(scope="module")
def digits01():
    """Digits as a user preprocesses them: pixels in [0, 1], no standardisation."""
    tr, te = load("digits", "train", normalize=False), load("digits", "test", normalize=False)
    return tr.x, tr.y, te.x, te.y


@pytest.fixture(scope="module")
def mlps(digits01):
    x, y, _, _ = digits01
    torch.manual_seed(0)
    a = train(MyMLP(), x, y, 150, seed=1)
    torch.manual_seed(1)
    b = train(MyMLP(), x, y, 150, seed=2)
    return a, b


@pytest.fixture(scope="module")
def cnns(digits01):
    x, y, _, _ = digits01
    torch.manual_seed(0)
    a = train(ResCNN(), x, y, 60, seed=1)
    torch.manual_seed(1)
    b = train(ResCNN(), x, y, 60, seed=2)
    return a, b


def _acc(model, x, y) -> float:
    with torch.no_grad():
        return float((model(x).argmax(-1) == y).float().mean())


# -- Python -----------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["wm", "am", "sinkhorn", "wm+sinkhorn"])
def test_align_models_keeps_bs_function_on_a_plain_class(mlps, digits01, method):
    a, b = mlps
    x, y, xt, _ = digits01
    opts = {"steps": 20} if "sinkhorn" in method else {}
    aligned, info = da.align_models(a, b, method=method, data=(x, y), **opts)
    assert type(aligned) is MyMLP and aligned is not b
    with torch.no_grad():
        assert torch.allclose(aligned(xt), b(xt), atol=1e-5, rtol=1e-5)
    assert info["l2"] <= info["l2_before"] + 1e-6
    assert set(info["permutation"]) == {"fc1.out", "fc2.out"}


def test_merge_models_beats_plain_averaging(mlps, digits01):
    a, b = mlps
    x, y, xt, yt = digits01
    merged = da.merge_models(a, b, method="wm")
    naive = da.merge_models(a, b, method="identity")
    assert type(merged) is MyMLP
    assert _acc(merged, xt, yt) > _acc(naive, xt, yt)


def test_data_may_be_batches(mlps, digits01):
    a, b = mlps
    x, y, _, _ = digits01
    batches = [(x[i : i + 100], y[i : i + 100]) for i in range(0, len(x), 100)]
    one, _ = da.align_models(a, b, method="am", data=(x, y))
    many, _ = da.align_models(a, b, method="am", data=iter(batches))
    for k in one.state_dict():
        assert torch.equal(one.state_dict()[k], many.state_dict()[k])


def test_residual_cnn_with_batchnorm_sinkhorn_task_loss_and_reset(cnns, digits01):
    """Sinkhorn's task loss on BatchNorm networks (running stats are never differentiated)."""
    a, b = cnns
    x, y, xt, yt = digits01
    ex = x[:2]
    aligned, info = da.align_models(
        a, b, method="sinkhorn", example_input=ex, data=(x, y), steps=15
    )
    with torch.no_grad():
        assert torch.allclose(aligned(xt), b(xt), atol=1e-4, rtol=1e-4)
    merged = da.merge_models(a, b, method="wm", example_input=ex, data=(x, y), reset_bn=True)
    stale = da.merge_models(a, b, method="wm", example_input=ex)
    assert _acc(merged, xt, yt) > _acc(stale, xt, yt)
    assert not torch.equal(merged.bn.running_mean, stale.bn.running_mean)


def test_python_errors_name_python_arguments(mlps, cnns):
    a, b = mlps
    with pytest.raises(DeepAlignError, match=r"pass data="):
        da.align_models(a, b, method="am")
    with pytest.raises(DeepAlignError, match=r"a and b have different architectures: fc1.weight"):
        da.align_models(a, MyMLP(hidden=16))
    bad = MyMLP()
    bad.load_state_dict(a.state_dict())
    with torch.no_grad():
        bad.fc2.weight[0, 0] = float("nan")
    with pytest.raises(DeepAlignError, match=r"b: tensor fc2.weight holds NaN"):
        da.align_models(a, bad)
    with pytest.raises(DeepAlignError, match="example_input"):
        da.align_models(*cnns)  # a conv net: the input shape cannot be guessed
    with pytest.raises(DeepAlignError, match="spec_from_model"):
        da.save_model(a, "never.safetensors")
    with pytest.raises(DeepAlignError, match="spec_from_model"):
        da.spec_for_module(a)


# -- CLI --------------------------------------------------------------------------------------
@pytest.fixture
def files(tmp_path, mlps, cnns, digits01):
    """State dicts saved the usual way, the user's model file, and their data as .npz/.pt."""
    shutil.copy(HERE / "user_models.py", tmp_path / "user_models.py")
    out = {"dir": tmp_path, "model": f"{tmp_path / 'user_models.py'}:MyMLP"}
    for name, m in (("a", mlps[0]), ("b", mlps[1]), ("ca", cnns[0]), ("cb", cnns[1])):
        torch.save(m.state_dict(), tmp_path / f"{name}.pt")
    x, y, xt, yt = digits01
    np.savez(tmp_path / "train.npz", x=x.numpy(), y=y.numpy())
    np.savez(tmp_path / "test.npz", x=xt.numpy(), y=yt.numpy())
    torch.save({"x": xt, "y": yt}, tmp_path / "test.pt")
    np.savez(tmp_path / "nox.npz", y=y.numpy())
    return out


def test_cli_aligns_plain_state_dicts_with_the_users_class(cli, files, mlps, digits01):
    d, model = files["dir"], files["model"]
    out = d / "b_al.pt"
    res = cli(
        "align", d / "a.pt", d / "b.pt", "--model", model, "--out", out, "--perm-out", d / "p.json"
    )
    assert res.code == 0, res.err
    mine = MyMLP()
    mine.load_state_dict(torch.load(out, weights_only=True))  # the user's names, a plain .pt
    mine.eval()
    xt = digits01[2]
    with torch.no_grad():
        assert torch.allclose(mine(xt), mlps[1](xt), atol=1e-5, rtol=1e-5)
    perm = json.loads((d / "p.json").read_text())
    assert set(perm["perm"]) == {"fc1.out", "fc2.out"}


def test_cli_every_network_command_takes_the_model(cli, files, tmp_path):
    d, model = files["dir"], files["model"]
    res = cli("inspect", d / "a.pt", "--model", model, "--json")
    assert res.code == 0, res.err
    assert [g["group"] for g in json.loads(res.out)["groups"]] == ["fc1.out", "fc2.out"]
    res = cli("permute", d / "a.pt", "--model", model, "--seed", "3", "--out", d / "s.pt")
    assert res.code == 0, res.err
    assert float(res.out.split("inputs:")[1]) < 1e-5
    res = cli("merge", d / "a.pt", d / "b.pt", "--model", model, "--out", d / "m.safetensors")
    assert res.code == 0, res.err
    merged = MyMLP()
    merged.load_state_dict(da.load_state(d / "m.safetensors")[0])
    res = cli(
        "lmc", d / "a.pt", d / "b.pt", "--model", model, "--data", d / "test.npz", "-m", "am",
        "--json", d / "l.json",
    )  # fmt: skip
    assert res.code == 0, res.err
    curve = json.loads((d / "l.json").read_text())
    assert curve["barrier"] < curve["naive"]["barrier"]
    assert (
        min(curve["accuracy"][0], curve["accuracy"][-1]) > 0.8
    )  # used as given: no chance warning
    assert "near chance" not in res.err
    res = cli(
        "similarity",
        d / "a.pt",
        d / "b.pt",
        d / "s.pt",
        "--model",
        model,
        "--data",
        d / "test.pt",
        "--json",
        d / "sim.json",
    )
    assert res.code == 0, res.err
    assert "same prediction" in res.out and "relative" in res.out and "s.pt" in res.out
    sim = json.loads((d / "sim.json").read_text())
    assert sim["after"][0][2] < 1e-4 and sim["agreement"][0][2] == 1.0  # s.pt is a permuted a.pt


def test_cli_model_args_package_reference_and_input_shape(cli, files, monkeypatch, cnns):
    d = files["dir"]
    monkeypatch.syspath_prepend(str(d))
    small = MyMLP(hidden=16)
    torch.save(small.state_dict(), d / "small.pt")
    res = cli(
        "inspect",
        d / "small.pt",
        "--model",
        "user_models:make_mlp",
        "--model-args",
        '{"hidden": 16}',
        "--json",
    )
    assert res.code == 0, res.err
    assert json.loads(res.out)["groups"][0]["size"] == 16
    res = cli(
        "align", d / "ca.pt", d / "cb.pt", "--model", "user_models:ResCNN", "--input-shape", "1,8,8",
        "--data", d / "train.npz", "-m", "sinkhorn", "-o", "steps=5", "--out", d / "cb_al.pt",
    )  # fmt: skip
    assert res.code == 0, res.err
    assert "sinkhorn" in res.err  # its progress bar
    mine = ResCNN()
    mine.load_state_dict(torch.load(d / "cb_al.pt", weights_only=True))
    x = torch.rand(4, 1, 8, 8)
    with torch.no_grad():
        assert torch.allclose(mine.eval()(x), cnns[1](x), atol=1e-4, rtol=1e-4)


def test_cli_builtin_data_normalisation_is_switchable_and_mismatch_is_flagged(cli, files, digits01):
    d, model = files["dir"], files["model"]
    acc = {}
    for norm in ("standard", "none"):
        j = d / f"{norm}.json"
        res = cli(
            "lmc", d / "a.pt", d / "b.pt", "--model", model, "--data", "digits", "--normalize",
            norm, "--points", "3", "--json", j,
        )  # fmt: skip
        assert res.code == 0, res.err
        acc[norm] = json.loads(j.read_text())["accuracy"][0]
    assert acc["none"] > 0.9 > acc["standard"]  # the models were trained on [0, 1] pixels
    x, y, xt, yt = digits01
    np.savez(d / "raw.npz", x=(1 - xt).numpy(), y=yt.numpy())  # inverted: a preprocessing slip
    res = cli(
        "lmc", d / "a.pt", d / "b.pt", "--model", model, "--data", d / "raw.npz", "--points", "3"
    )
    assert res.code == 0, res.err
    assert "near chance" in res.err and "preprocessing" in res.err


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--model", "{dir}/nowhere.py:MyMLP"], "no such file"),
        (["--model", "{dir}/user_models.py:Nope"], "has no class or function 'Nope'"),
        (["--model", "{dir}/user_models.py:Broken"], "building it failed"),
        (["--model", "{dir}/user_models.py:MyMLP", "--model-args", "{{bad"], "not valid JSON"),
        (
            ["--model", "{dir}/user_models.py:MyMLP", "--model-args", '{{"hidden": 8}}'],
            "fc1.weight axis 0",
        ),
        (["--model", "{dir}/user_models.py:ResCNN"], "fc1.weight is in"),
        (["--model", "{dir}/user_models.py:MyMLP", "--input-shape", "3,5"], "does not run"),
        (["--model", "{dir}/user_models.py:MyMLP", "--input-shape", "a,b"], "input shape"),
        (
            ["--model", "{dir}/user_models.py:MyMLP", "-m", "am", "--data", "{dir}/nox.npz"],
            "no array 'x'",
        ),
        (
            ["--model", "{dir}/user_models.py:MyMLP", "-m", "am", "--data", "{dir}/none.npz"],
            "no such data file",
        ),
        ([], "does not describe its architecture"),
    ],
)
def test_cli_bad_user_inputs_are_one_line_exit_2_and_no_output(cli, files, args, needle):
    d = files["dir"]
    out = d / "never.pt"
    res = cli("align", d / "a.pt", d / "b.pt", "--out", out, *[a.format(dir=d) for a in args])
    assert res.code == 2, res.out + res.err
    assert needle in res.err, res.err
    assert len(res.err.strip().splitlines()) == 1 and "Traceback" not in res.err
    assert not out.exists() and not list(d.glob(".never.pt*"))


def test_help_does_not_load_torch():
    code = "import sys, deepalign.cli.app; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_resnet18_traced_permuted_and_its_planted_permutation_recovered():
    """torchvision's resnet18 (written out: torchvision cannot be installed beside this torch):
    traced, permuted without changing its function, a planted permutation recovered by wm."""
    from conftest import randomize_bn_stats
    from deepalign.solvers import align
    from user_models import ResNet18

    torch.manual_seed(0)
    net = ResNet18(num_classes=10).eval()
    randomize_bn_stats(net, seed=1)
    x = torch.randn(2, 3, 32, 32)
    spec = da.spec_from_model(net, x)
    # one group per stage's residual stream (the stem joins stage 1's) and per block's inner conv
    sizes = sorted(spec.groups.values())
    assert sizes == sorted([64, 64, 64, 128, 128, 128, 256, 256, 256, 512, 512, 512])
    assert da.verify(net, spec, torch.randn(4, 3, 32, 32)) < 1e-4
    state = net.state_dict()
    planted = da.random_permutation(spec, seed=3)
    moved = da.apply(spec, planted, state)
    perm, _ = align(state, moved, spec, "wm")
    want = da.invert(planted)
    assert all(torch.equal(perm[g], want[g]) for g in spec.groups)
