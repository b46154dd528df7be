"""The whole pipeline on every device this machine has (CPU always; CUDA/MPS when present).

Each test runs on ``device`` and checks the answer against the CPU or against an exact property
(a planted permutation recovered, an aligned network computing the same function). On a CPU-only
machine the tests run with an explicit ``cpu`` device, which still exercises the device plumbing.
"""

from __future__ import annotations

import json

import pytest
import torch

from deepalign.core import permutation as P
from deepalign.core.arch import build
from deepalign.core.checkpoint import load_state
from deepalign.data import load
from deepalign.nn.model import DeepAlign, DeepAlignConfig
from deepalign.nn.sizes import MODEL_SIZES
from deepalign.nn.weight_space import WeightSpaceLayout
from deepalign.solvers import align
from deepalign.zoo import Zoo, build_zoo, make_plan
from deepalign.zoo.build import task_data, train_shard

DEVICES = ["cpu"]
if torch.cuda.is_available():
    DEVICES.append("cuda")
if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
    DEVICES.append("mps")


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    path = tmp_path_factory.mktemp("devzoo") / "mlp"
    build_zoo(make_plan("mlp-digits", 40, seed=0, hidden=[12, 10], epochs=1), path)
    return path


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "task, kw",
    [
        ("mlp-digits", dict(hidden=[8, 8], epochs=1, shard_size=3)),
        ("cnn-digits", dict(hidden=[4, 6], epochs=1, shard_size=2)),
    ],
)
def test_zoo_training_on_device_matches_cpu(device, task, kw):
    plan = make_plan(task, 2, seed=3, **kw)
    data = task_data(plan, None)
    ref, ref_rows = train_shard(plan, 0, data, torch.device("cpu"))
    got, rows = train_shard(plan, 0, data, torch.device(device))
    for k, v in ref.items():
        assert torch.allclose(got[k].cpu(), v, atol=1e-4), (device, task, k)
    for r, g in zip(ref_rows, rows, strict=True):
        assert abs(r["test_accuracy"] - g["test_accuracy"]) < 0.02


@pytest.mark.parametrize("device", DEVICES)
def test_aligner_on_device_matches_cpu_and_recovers_planted_permutations(device, zoo):
    z = Zoo(zoo)
    layout = WeightSpaceLayout.from_config(z.config)
    torch.manual_seed(0)
    model = DeepAlign(layout, DeepAlignConfig(**MODEL_SIZES["cpu"])).eval()
    a = z.load(z.indices("test")[:3])
    b = z.load(z.indices("test")[1:4])
    t = P.random_permutation(z.spec, seed=1, batch=3)
    planted = P.apply(z.spec, t, a, batch_dims=1)
    with torch.no_grad():
        ref = model(a, b)
        on = model.to(device)
        got = on({k: v.to(device) for k, v in a.items()}, {k: v.to(device) for k, v in b.items()})
        perm = on.align(
            {k: v.to(device) for k, v in a.items()}, {k: v.to(device) for k, v in planted.items()}
        )
    for g in ref:
        assert got[g].device.type == torch.device(device).type
        assert torch.allclose(got[g].cpu(), ref[g], atol=1e-4, rtol=1e-4), g
        assert torch.equal(perm[g].cpu(), P.invert(t)[g]), g


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method", ["wm", "am", "sinkhorn"])
def test_solvers_on_device_recover_a_planted_permutation(device, method, zoo):
    z = Zoo(zoo)
    a = {k: v[0] for k, v in z.load(z.indices("test")[:1], device).items()}
    t = P.random_permutation(z.spec, seed=4)
    b = P.apply(z.spec, {g: p.to(device) for g, p in t.items()}, a)
    opts = {"steps": 150, "loss": "l2"} if method == "sinkhorn" else {}
    data = load("digits", "train").subset(256, seed=0).to(device) if method == "am" else None
    perm, _ = align(a, b, z.spec, method, module=z.module().to(device), data=data, **opts)
    for g, p in perm.items():
        assert p.device.type == torch.device(device).type
        assert torch.equal(p.cpu(), P.invert(t)[g]), (method, g)


@pytest.mark.parametrize("device", DEVICES)
def test_cli_train_align_and_bench_on_device(device, zoo, tmp_path, cli):
    out = tmp_path / "al"
    args = ["--size", "tiny", "--epochs", "1", "--steps", "2", "--batch", "4"]
    res = cli("train", "--zoo", zoo, "--out", out, *args, "--device", device)
    assert res.code == 0, res.err
    z = Zoo(zoo)
    a_path, b_path, c_path = (tmp_path / f"{n}.safetensors" for n in "abc")
    for i, path in zip(z.indices("test")[:2], (a_path, b_path), strict=True):
        assert cli("export", zoo, "--index", i, "--out", path).code == 0
    res = cli(
        "align",
        a_path,
        b_path,
        "--method",
        "deepalign+sinkhorn",
        "--aligner",
        out,
        "--data",
        "digits",
        "-o",
        "steps=5",
        "--out",
        c_path,
        "--device",
        device,
    )
    assert res.code == 0, res.err
    # the aligned B computes what B computes
    x = load("digits", "test").x[:64]
    net_b, net_c = build(z.config).eval(), build(z.config).eval()
    net_b.load_state_dict(load_state(b_path)[0])
    net_c.load_state_dict(load_state(c_path)[0])
    with torch.no_grad():
        assert torch.allclose(net_b(x), net_c(x), atol=1e-5)
    bench = tmp_path / "bench"
    res = cli(
        "bench",
        "--zoo",
        zoo,
        "--aligner",
        out,
        "--out",
        bench,
        "--pairs",
        "3",
        "--methods",
        "wm,deepalign,deepalign+sinkhorn",
        "--points",
        "3",
        "--sinkhorn-steps",
        "3",
        "--trajectory-pairs",
        "2",
        "--device",
        device,
    )
    assert res.code == 0, res.err
    result = json.loads((bench / "bench.json").read_text())
    assert result["settings"]["device"] == device
    assert all(m["status"] == "ok" for m in result["methods"].values())


def test_a_missing_cuda_index_is_refused_in_one_line(monkeypatch):
    """On a machine with one GPU, ``--device cuda:3`` is a one-line error, not a CUDA traceback."""
    from deepalign.cli.common import resolve_device
    from deepalign.errors import DeepAlignError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(DeepAlignError, match="has 1 CUDA device"):
        resolve_device("cuda:3")
    assert resolve_device("cuda:0") == torch.device("cuda:0")
    assert resolve_device("cuda") == torch.device("cuda")
