"""Self-describing checkpoints: round trips, plain state dicts, and every kind of bad file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file
from torch import nn

import deepalign as da
from arch_strategies import BUILDERS, Case
from deepalign.core.checkpoint import load_state, parse_arch
from deepalign.errors import DeepAlignError


def files_in(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@pytest.mark.parametrize("kind", sorted(BUILDERS))
@settings(
    max_examples=5, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_save_load_round_trip_gives_identical_outputs(kind: str, data, tmp_path: Path) -> None:
    case: Case = data.draw(BUILDERS[kind])
    path = tmp_path / f"{kind}.safetensors"
    da.save_model(case.model, path, meta={"note": "test"})
    back = da.load_model(path)
    assert type(back) is type(case.model) and not back.training
    assert da.describe(back) == da.describe(case.model)
    for k, v in case.model.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
    with torch.no_grad():
        assert torch.equal(back(case.x), case.model(case.x))
    _, arch, meta = load_state(path)
    assert arch == da.describe(case.model) and meta["deepalign.note"] == "test"


def test_plain_state_dicts_load_only_with_an_architecture(tmp_path: Path) -> None:
    torch.manual_seed(0)
    m = da.mlp([4, 6, 3], act="tanh").eval()
    x = torch.randn(5, 4)
    torch.save(m.state_dict(), tmp_path / "plain.pt")
    torch.save({"state_dict": m.state_dict(), "epoch": 3}, tmp_path / "wrapped.pth")
    save_file(m.state_dict(), str(tmp_path / "plain.safetensors"))
    for name in ("plain.pt", "wrapped.pth", "plain.safetensors"):
        with pytest.raises(DeepAlignError, match="does not describe its architecture"):
            da.load_model(tmp_path / name)
        for arch in ("mlp:4-6-3:tanh", da.describe(m), json.dumps(da.describe(m))):
            back = da.load_model(tmp_path / name, arch=arch)
            with torch.no_grad():
                assert torch.equal(back(x), m(x))


def one_line_error(call, pattern: str) -> str:
    with pytest.raises(DeepAlignError, match=pattern) as info:
        call()
    assert "\n" not in str(info.value)
    return str(info.value)


class Custom:
    def __init__(self) -> None:
        self.w = torch.ones(2)


def test_refuses_pickles_weights_only_would_not_load(tmp_path: Path) -> None:
    torch.save(da.mlp([2, 3, 1]), tmp_path / "module.pt")
    torch.save({"obj": Custom()}, tmp_path / "custom.pt")
    for name in ("module.pt", "custom.pt"):
        msg = one_line_error(lambda n=name: load_state(tmp_path / n), "refused to unpickle")
        assert name in msg
    torch.save({"a": 1}, tmp_path / "ints.pt")
    one_line_error(lambda: load_state(tmp_path / "ints.pt"), "expected a state dict of tensors")


def test_not_a_checkpoint(tmp_path: Path) -> None:
    (tmp_path / "text.safetensors").write_text("hello, not tensors")
    (tmp_path / "empty.safetensors").write_bytes(b"")
    (tmp_path / "junk.pt").write_bytes(bytes(range(256)) * 3)
    (tmp_path / "folder").mkdir()
    one_line_error(lambda: load_state(tmp_path / "text.safetensors"), "not a safetensors file")
    one_line_error(lambda: load_state(tmp_path / "empty.safetensors"), "not a safetensors file")
    one_line_error(lambda: load_state(tmp_path / "junk.pt"), r"junk\.pt: (not a readable|refused)")
    one_line_error(lambda: load_state(tmp_path / "missing.safetensors"), "no such file")
    one_line_error(lambda: load_state(tmp_path / "folder"), "is a folder")


def test_truncated_checkpoints_are_refused(tmp_path: Path) -> None:
    da.save_model(da.cnn(1, [3], 2, 4), tmp_path / "ok.safetensors")
    torch.save(da.mlp([3, 4, 2]).state_dict(), tmp_path / "ok.pt")
    for name in ("ok.safetensors", "ok.pt"):
        raw = (tmp_path / name).read_bytes()
        for cut in (8, len(raw) // 2, len(raw) - 1):
            bad = tmp_path / f"cut{cut}{Path(name).suffix}"
            bad.write_bytes(raw[:cut])
            one_line_error(lambda b=bad: da.load_model(b, arch="mlp:3-4-2"), bad.name)


def test_architecture_that_does_not_match_the_tensors(tmp_path: Path) -> None:
    m = da.mlp([4, 5, 3])
    path = tmp_path / "m.safetensors"
    da.save_model(m, path)
    one_line_error(lambda: da.load_model(path, arch="mlp:4-6-3"), r"0\.weight axis 0 has size 5")
    one_line_error(lambda: da.load_model(path, arch="mlp:4-5-5-3"), r"missing 4\.weight, 4\.bias")
    one_line_error(lambda: da.load_model(path, arch="mlp:7-5-3"), r"0\.weight has shape \(5, 4\)")
    renamed = {("layer." + k if k.startswith("0.") else k): v for k, v in m.state_dict().items()}
    save_file(renamed, str(tmp_path / "renamed.safetensors"))
    one_line_error(
        lambda: da.load_model(tmp_path / "renamed.safetensors", arch="mlp:4-5-3"),
        r"missing 0\.weight, 0\.bias; unexpected layer\.0\.(bias|weight)",
    )
    cnn = da.describe(da.cnn(1, [3], 2, 4))
    one_line_error(lambda: da.load_model(path, arch=cnn), "do not match the architecture")


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nan_and_inf_weights_are_refused(tmp_path: Path, bad: float) -> None:
    m = da.mlp([3, 4, 2], norm="batchnorm")
    sd = m.state_dict()
    sd["1.running_var"][2] = bad
    save_file(sd, str(tmp_path / "m.safetensors"))
    one_line_error(
        lambda: da.load_model(tmp_path / "m.safetensors", arch=da.describe(m)),
        r"tensor 1\.running_var holds NaN or inf",
    )


def test_unsupported_layer_is_refused_and_writes_nothing(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.GroupNorm(2, 4), nn.Linear(4, 1))
    one_line_error(
        lambda: da.save_model(model, tmp_path / "g.safetensors"),
        r"model\.1: unsupported layer GroupNorm",
    )

    class Mine(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(2, 2)

    one_line_error(
        lambda: da.save_model(Mine(), tmp_path / "m.safetensors"), "unsupported layer Mine"
    )
    assert files_in(tmp_path) == []


def test_failed_write_leaves_no_file(tmp_path: Path) -> None:
    bad = {"w": torch.zeros(2), "v": "not a tensor"}
    with pytest.raises(Exception):  # noqa: B017  (whatever safetensors raises, nothing is left)
        da.save_state(bad, tmp_path / "x.safetensors")  # type: ignore[arg-type]
    assert files_in(tmp_path) == []
    da.save_model(da.mlp([2, 3, 1]), tmp_path / "x.safetensors")
    assert files_in(tmp_path) == ["x.safetensors"]


def test_parse_arch_forms(tmp_path: Path) -> None:
    assert parse_arch("mlp:64-32-10") == da.describe(da.mlp([64, 32, 10]))
    assert parse_arch(" mlp:4-8-8-2:gelu ") == da.describe(da.mlp([4, 8, 8, 2], act="gelu"))
    config = da.describe(da.resnet(1, [2, 3], 4))
    assert parse_arch(json.dumps(config)) == config
    (tmp_path / "arch.json").write_text(json.dumps(config))
    assert parse_arch(str(tmp_path / "arch.json")) == config
    assert da.describe(da.build(config)) == config
    one_line_error(lambda: parse_arch("mlp:64"), "not a JSON file")
    one_line_error(lambda: parse_arch("mlp:4-8-2:swish"), "unknown activation 'swish'")
    one_line_error(lambda: parse_arch('{"type": "Conv9d"}'), "unknown layer type 'Conv9d'")
    one_line_error(
        lambda: parse_arch('{"type": "Linear", "in_features": 3}'), "malformed architecture"
    )
    one_line_error(lambda: parse_arch(str(tmp_path / "nope.json")), "not a JSON file")
