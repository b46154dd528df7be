"""align / merge / lmc / similarity end to end on tiny digits models trained here."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import deepalign as da
from deepalign.core import permutation as P
from deepalign.data import load
from deepalign.lmc import barrier


def _train(model: torch.nn.Module, seed: int, steps: int = 200) -> torch.nn.Module:
    ds = load("digits")
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    step = 0
    while step < steps:
        for x, y in ds.batches(64, generator=g, shuffle=True):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
            step += 1
            if step == steps:
                break
    return model.eval()


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("models")
    out = {}
    for seed in (0, 1, 2):
        torch.manual_seed(seed)
        out[f"mlp{seed}"] = root / f"mlp{seed}.safetensors"
        da.save_model(_train(da.mlp([64, 24, 24, 10], flatten_input=True), seed), out[f"mlp{seed}"])
    for seed in (0, 1):
        torch.manual_seed(seed)
        out[f"cnn{seed}"] = root / f"cnn{seed}.safetensors"
        da.save_model(_train(da.cnn(1, [6, 8], 10, 8, batchnorm=True), seed, 80), out[f"cnn{seed}"])
    return out


def _outputs(path: Path, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return da.load_model(path)(x)


def test_align_writes_b_in_a_basis_with_the_same_function(cli, models, tmp):
    out, perm_file = tmp / "aligned.safetensors", tmp / "perm.json"
    res = cli(
        "align",
        models["mlp0"],
        models["mlp1"],
        "--method",
        "wm",
        "--out",
        out,
        "--perm-out",
        perm_file,
    )
    assert res.code == 0, res.err
    x = load("digits", split="test").x
    torch.testing.assert_close(_outputs(out, x), _outputs(models["mlp1"], x), rtol=1e-5, atol=1e-5)
    a, _, _ = da.load_state(models["mlp0"])
    b, _, _ = da.load_state(models["mlp1"])
    al, _, meta = da.load_state(out)
    dist = lambda s: sum(float(((a[k] - s[k]) ** 2).sum()) for k in a)  # noqa: E731
    assert dist(al) < dist(b)
    spec = da.spec_for_module(da.load_model(models["mlp0"]))
    perm = P.load_json(perm_file, spec)
    assert all(torch.equal(al[k], v) for k, v in da.apply(spec, perm, b).items())
    assert meta["deepalign.method"] == "wm" and "weight distance" in res.out


def test_align_with_activation_matching_on_data(cli, models, tmp):
    out = tmp / "am.safetensors"
    res = cli("align", models["cnn0"], models["cnn1"], "-m", "am", "--data", "digits", "--out", out)
    assert res.code == 0, res.err
    x = load("digits", split="test").x
    torch.testing.assert_close(_outputs(out, x), _outputs(models["cnn1"], x), rtol=1e-4, atol=1e-4)


def test_merge_is_the_average_with_aligned_b(cli, models, tmp):
    aligned, merged, a_only = (
        tmp / "al.safetensors",
        tmp / "merged.safetensors",
        tmp / "a.safetensors",
    )
    assert cli("align", models["mlp0"], models["mlp1"], "--out", aligned, "--seed", "3").code == 0
    res = cli(
        "merge", models["mlp0"], models["mlp1"], "--alpha", "0.3", "--out", merged, "--seed", "3"
    )
    assert res.code == 0, res.err
    a, _, _ = da.load_state(models["mlp0"])
    al, _, _ = da.load_state(aligned)
    mg, _, _ = da.load_state(merged)
    for k in a:
        torch.testing.assert_close(mg[k], 0.7 * a[k] + 0.3 * al[k])
    assert cli("merge", models["mlp0"], models["mlp1"], "--alpha", "0", "--out", a_only).code == 0
    zero, _, _ = da.load_state(a_only)
    assert all(torch.equal(zero[k], a[k]) for k in a)


def test_merge_with_bn_reset(cli, models, tmp):
    out = tmp / "m.safetensors"
    res = cli(
        "merge", models["cnn0"], models["cnn1"], "--data", "digits", "--bn-reset", "--out", out
    )
    assert res.code == 0, res.err
    merged, _, _ = da.load_state(out)
    a, _, _ = da.load_state(models["cnn0"])
    assert not torch.allclose(merged["1.running_mean"], a["1.running_mean"])


def test_lmc_json_and_plot(cli, models, tmp):
    j, png = tmp / "lmc.json", tmp / "lmc.png"
    res = cli(
        "lmc",
        models["mlp0"],
        models["mlp1"],
        "--data",
        "digits",
        "--points",
        "7",
        "--json",
        j,
        "--plot",
        png,
    )
    assert res.code == 0, res.err
    data = json.loads(j.read_text())
    for key in ("lambdas", "loss", "accuracy", "barrier", "auc", "method", "seconds", "naive"):
        assert key in data
    assert len(data["lambdas"]) == len(data["loss"]) == len(data["accuracy"]) == 7
    assert data["barrier"] == pytest.approx(barrier(data["lambdas"], data["loss"]))
    assert data["naive"]["loss"][0] == pytest.approx(data["loss"][0])  # same A at lambda 0
    test = load("digits", split="test")
    want = float(F.cross_entropy(_outputs(models["mlp0"], test.x), test.y))
    assert data["loss"][0] == pytest.approx(want, rel=1e-5)
    assert data["barrier"] < data["naive"]["barrier"]  # alignment helps on these nets
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_lmc_with_bn_reset(cli, models, tmp):
    j = tmp / "bn.json"
    res = cli(
        "lmc",
        models["cnn0"],
        models["cnn1"],
        "--data",
        "digits",
        "--points",
        "3",
        "--bn-reset",
        "--json",
        j,
    )
    assert res.code == 0, res.err
    assert json.loads(j.read_text())["bn_reset"] is True


def test_similarity_matrix(cli, models, tmp):
    j = tmp / "sim.json"
    res = cli("similarity", models["mlp0"], models["mlp1"], models["mlp2"], "--json", j)
    assert res.code == 0, res.err
    data = json.loads(j.read_text())
    for name in ("after", "before"):
        m = torch.tensor(data[name])
        assert m.shape == (3, 3) and torch.equal(m, m.T) and torch.all(m.diagonal() == 0)
        assert torch.all(m[~torch.eye(3, dtype=torch.bool)] > 0)
    assert torch.all(torch.tensor(data["after"]) <= torch.tensor(data["before"]) + 1e-9)


def test_similarity_of_a_permuted_copy_is_zero(cli, models, tmp):
    shuffled = tmp / "shuffled.safetensors"
    assert cli("permute", models["mlp0"], "--seed", "4", "--out", shuffled).code == 0
    j = tmp / "s.json"
    assert cli("similarity", models["mlp0"], shuffled, "--json", j).code == 0
    data = json.loads(j.read_text())
    assert data["after"][0][1] < 1e-5 < data["before"][0][1]


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["align", "{mlp0}", "{mlp1}", "-m", "am"], "needs data"),
        (["align", "{mlp0}", "{mlp1}", "-m", "wm+am"], "needs data"),
        (["align", "{mlp0}", "{mlp1}", "-m", "magic"], "unknown method"),
        (["align", "{mlp0}", "{cnn1}"], "different architectures"),
        (["merge", "{mlp0}", "{mlp1}", "--alpha", "1.5"], "--alpha"),
        (["merge", "{mlp0}", "{cnn0}"], "different architectures"),
        (["align", "{mlp0}", "{mlp1}", "-m", "deepalign"], "--aligner"),
        (["align", "{mlp0}", "{mlp1}", "-o", "steps"], "KEY=VALUE"),
        (["align", "{mlp0}", "{mlp1}", "-o", "bogus=1"], "unknown option"),
        (["align", "{mlp0}", "{mlp1}", "-m", "sinkhorn", "-o", "init_scale=abc"], "a number"),
        (["align", "{mlp0}", "{mlp1}", "-m", "sinkhorn", "-o", "steps=2.5"], "an integer"),
        (["align", "{mlp0}", "{mlp1}", "-m", "wm+sinkhorn", "-o", "lr=NaN"], "a number"),
        (["merge", "{mlp0}", "{mlp1}", "-o", "history=3"], "a boolean"),
        (["align", "{mlp0}", "{mlp1}", "--data", "nosuchdata"], "nosuchdata"),
    ],
)
def test_bad_inputs_exit_2_with_one_line_and_no_output(cli, models, tmp, args, needle):
    out = tmp / "out.safetensors"
    full = [a.format(**{k: str(v) for k, v in models.items()}) for a in args] + ["--out", str(out)]
    res = cli(*full)
    assert res.code == 2
    assert res.err.startswith("error: ") and len(res.err.strip().splitlines()) == 1
    assert needle in res.err
    if "different architectures" in needle:
        assert Path(full[1]).name in res.err and Path(full[2]).name in res.err
    assert not out.exists() and list(tmp.iterdir()) == []


def test_lmc_errors_leave_no_files(cli, models, tmp):
    j, png = tmp / "x.json", tmp / "x.png"
    res = cli("lmc", models["mlp0"], models["cnn0"], "--data", "digits", "--json", j, "--plot", png)
    assert res.code == 2 and "different architectures" in res.err
    res = cli(
        "lmc", models["mlp0"], models["mlp1"], "--data", "digits", "--points", "1", "--json", j
    )
    assert res.code == 2 and "--points" in res.err
    assert list(tmp.iterdir()) == []


def test_every_command_help_has_an_example(cli):
    for cmd in ("align", "merge", "lmc", "similarity"):
        res = cli(cmd, "--help")
        assert res.code == 0 and f"Example: deepalign {cmd}" in res.out


def test_outputs_are_all_or_nothing(cli, models, tmp):
    out = tmp / "aligned.safetensors"
    folder = tmp / "a_folder"
    folder.mkdir()
    res = cli("align", models["mlp0"], models["mlp1"], "--out", out, "--perm-out", folder)
    assert res.code == 2 and "folder" in res.err
    assert sorted(p.name for p in tmp.iterdir()) == ["a_folder"]
