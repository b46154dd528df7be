"""`deepalign inspect` and `deepalign permute` through the real CLI, on tiny models on disk."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import deepalign as da
from deepalign.core import permutation as P


@pytest.fixture
def models(tmp_path: Path) -> dict[str, Path]:
    """A digits-sized MLP (64-32-32-10 on 8x8 images) and a small 1-channel CNN, on disk."""
    from conftest import randomize_bn_stats

    torch.manual_seed(0)
    mlp = da.mlp([64, 32, 32, 10], flatten_input=True)
    cnn = da.cnn(1, [5, 3], 10, 8, batchnorm=True)
    randomize_bn_stats(cnn, seed=1)
    folder = tmp_path / "models"
    da.save_model(mlp, folder / "mlp.safetensors")
    da.save_model(cnn, folder / "cnn.safetensors")
    return {"mlp": folder / "mlp.safetensors", "cnn": folder / "cnn.safetensors"}


def images(n: int = 16) -> torch.Tensor:
    return torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_inspect_lists_groups(cli, models, name: str) -> None:
    res = cli("inspect", models[name])
    assert res.code == 0, res.err
    spec = da.spec_for_module(da.load_model(models[name]))
    assert f"{len(spec.groups)} permutation groups" in res.out
    for g, n in spec.groups.items():
        assert f"{g}  size {n:>5}" in res.out
    res = cli("inspect", models[name], "--json")
    info = json.loads(res.out)
    n_params = sum(p.numel() for p in da.load_model(models[name]).parameters())
    n_buffers = sum(
        v.numel() for k, v in da.load_model(models[name]).state_dict().items() if "running" in k
    )
    assert info["parameters"] == n_params + n_buffers
    assert [(r["group"], r["size"]) for r in info["groups"]] == list(spec.groups.items())
    assert info["architecture"] == da.describe(da.load_model(models[name]))


def test_inspect_mlp_shows_the_flatten_and_blocks(cli, models) -> None:
    info = json.loads(cli("inspect", models["mlp"], "--json").out)
    assert [r["size"] for r in info["groups"]] == [32, 32]
    info = json.loads(cli("inspect", models["cnn"], "--json").out)
    last = info["groups"][-1]
    assert last["size"] == 3 and "9.weight:1x4" in last["axes"]  # 3 channels x (2x2) after pooling


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_permute_keeps_the_function(cli, models, tmp_path: Path, name: str) -> None:
    out, perm_out = tmp_path / "out" / f"{name}.safetensors", tmp_path / "out" / "perm.json"
    res = cli("permute", models[name], "--seed", 7, "--out", out, "--perm-out", perm_out)
    assert res.code == 0, res.err
    assert "largest output difference" in res.out
    diff = float(res.out.split("random inputs:")[1].split()[0])
    assert diff < 1e-4
    a, b = da.load_model(models[name]), da.load_model(out)
    x = images()
    with torch.no_grad():
        torch.testing.assert_close(b(x), a(x), atol=1e-5, rtol=0)
    sa, sb = a.state_dict(), b.state_dict()
    assert any(not torch.equal(sa[k], sb[k]) for k in sa)  # the neurons did move
    spec = da.spec_for_module(a)
    perm = P.load_json(perm_out, spec)  # valid JSON, one permutation per group
    assert set(perm) == set(spec.groups)
    back = da.apply(spec, perm, sa)
    assert all(torch.equal(back[k], sb[k]) for k in sa)  # the file says what was done
    # same seed, same result
    again = tmp_path / "again.safetensors"
    assert cli("permute", models[name], "--seed", 7, "--out", again).code == 0
    assert all(torch.equal(v, da.load_model(again).state_dict()[k]) for k, v in sb.items())


def test_permute_plain_state_dict_with_arch(cli, models, tmp_path: Path) -> None:
    model = da.load_model(models["mlp"])
    torch.save(model.state_dict(), tmp_path / "plain.pt")
    arch = tmp_path / "arch.json"
    arch.write_text(json.dumps(da.describe(model)))
    out = tmp_path / "p.safetensors"
    res = cli("permute", tmp_path / "plain.pt", "--arch", arch, "--out", out)
    assert res.code == 0, res.err
    with torch.no_grad():
        torch.testing.assert_close(da.load_model(out)(images()), model(images()), atol=1e-5, rtol=0)


def bad_inputs(folder: Path, models: dict[str, Path]) -> list[tuple[str, list, str]]:
    """(label, CLI args after the command, expected message) for every kind of bad input."""
    folder.mkdir()
    (folder / "text.safetensors").write_text("not a checkpoint")
    torch.save(da.mlp([2, 3, 1]), folder / "module.pt")
    torch.save(models["mlp"].stat(), folder / "object.pt")  # an os.stat_result: not a state dict
    model = da.load_model(models["mlp"])
    sd = model.state_dict()
    save_file(sd, str(folder / "plain.safetensors"))
    nan = dict(sd, **{"1.weight": sd["1.weight"].clone().fill_(float("nan"))})
    da.save_state(nan, folder / "nan.safetensors", da.describe(model))
    inf = dict(sd, **{"3.bias": sd["3.bias"].clone().fill_(float("inf"))})
    da.save_state(inf, folder / "inf.safetensors", da.describe(model))
    narrow = json.dumps(da.describe(da.mlp([64, 16, 32, 10], flatten_input=True)))
    short = json.dumps(da.describe(da.mlp([64, 32, 10], flatten_input=True)))
    return [
        ("missing", [folder / "missing.safetensors"], "no such file"),
        ("not safetensors", [folder / "text.safetensors"], "not a safetensors file"),
        ("module pickle", [folder / "module.pt", "--arch", "mlp:2-3-1"], "refused to unpickle"),
        ("object pickle", [folder / "object.pt", "--arch", "mlp:2-3-1"], "refused to unpickle"),
        ("no arch", [folder / "plain.safetensors"], "does not describe its architecture"),
        (
            "arch shapes",
            [models["mlp"], "--arch", narrow],
            "1.weight axis 0 has size 32, expected 16",
        ),
        ("arch names", [models["mlp"], "--arch", short], "unexpected 5.bias, 5.weight"),
        ("bad arch", [models["mlp"], "--arch", "mlp:64"], "not a JSON file"),
        ("nan", [folder / "nan.safetensors"], "tensor 1.weight holds NaN or inf"),
        ("inf", [folder / "inf.safetensors"], "tensor 3.bias holds NaN or inf"),
        ("unknown option", [models["mlp"], "--bogus", "1"], "No such option: --bogus"),
        ("bad seed", [models["mlp"], "--seed", "x"], "Invalid value for '--seed'"),
    ]


def test_every_bad_input_is_one_line_exit_2_and_no_output(cli, models, tmp_path: Path) -> None:
    cases = bad_inputs(tmp_path / "bad", models)
    outdir = tmp_path / "out"
    outdir.mkdir()
    for label, args, message in cases:
        for command in ("inspect", "permute"):
            extra = ["--out", outdir / "o.safetensors", "--perm-out", outdir / "p.json"]
            expected = message
            if command == "inspect":  # no --out, and no --seed either
                extra = []
                expected = "No such option: --seed" if label == "bad seed" else message
            res = cli(command, *args, *extra)
            where = f"{command} / {label}: {res.err!r}"
            assert res.code == 2, where
            lines = res.err.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith("error: "), where
            assert expected in lines[0], where
            assert "Traceback" not in res.err + res.out, where
            assert list(outdir.iterdir()) == [], where  # no output, no temp file
    # the inputs' folders gained no temp files either
    assert not [p for p in (tmp_path / "bad").iterdir() if p.name.startswith(".")]
    assert not [p for p in tmp_path.joinpath("models").iterdir() if p.name.startswith(".")]


def test_bad_output_paths_write_nothing(cli, models, tmp_path: Path) -> None:
    (tmp_path / "dir.json").mkdir()
    res = cli(
        "permute",
        models["mlp"],
        "--out",
        tmp_path / "o.safetensors",
        "--perm-out",
        tmp_path / "dir.json",
    )
    assert res.code == 2 and res.err.startswith("error: ") and "is a folder" in res.err
    assert not (tmp_path / "o.safetensors").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir.json", "models"]
    res = cli("permute", models["mlp"], "--out", tmp_path)
    assert res.code == 2 and "is a folder" in res.err
