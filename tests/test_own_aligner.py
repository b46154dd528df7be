"""Deep-Align on the user's own networks: checkpoints -> zoo -> trained aligner -> aligned and
merged networks of widths it never saw, through the CLI and Python, on a plain class on disk."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import deepalign as da
from deepalign.core import permutation as P
from deepalign.data import load
from deepalign.errors import DeepAlignError
from deepalign.nn.model import DeepAlign, DeepAlignConfig
from deepalign.nn.sizes import MODEL_SIZES
from deepalign.nn.weight_space import WeightSpaceLayout
from deepalign.zoo.from_checkpoints import zoo_from_checkpoints
from deepalign.zoo.loader import Zoo, open_zoos

CLASS = textwrap.dedent(
    """
    import torch
    import torch.nn.functional as F
    from torch import nn


    class Net(nn.Module):
        def __init__(self, hidden: int = 16):
            super().__init__()
            self.encoder = nn.Linear(64, hidden)
            self.middle = nn.Linear(hidden, hidden)
            self.classifier = nn.Linear(hidden, 10)
            self.drop = nn.Dropout(0.1)

        def forward(self, x):
            x = x.flatten(1)
            x = self.drop(F.relu(self.encoder(x)))
            x = F.relu(self.middle(x))
            return self.classifier(x)
    """
)


def _user_class(tmp_path: Path):
    path = tmp_path / "mynet.py"
    path.write_text(CLASS)
    from deepalign.core.user_model import import_factory

    return path, import_factory(f"{path}:Net")


def _train(net: nn.Module, seed: int, steps: int = 25) -> nn.Module:
    data = load("digits", "train")
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    net.train()
    for _ in range(steps):
        pick = torch.randint(0, len(data), (64,), generator=g)
        loss = F.cross_entropy(net(data.x[pick]), data.y[pick])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net.eval()


def _checkpoints(tmp_path: Path, Net, widths: list[int], n: int, fmt: str = "pt") -> Path:
    folder = tmp_path / "ckpts"
    folder.mkdir(exist_ok=True)
    i = 0
    for w in widths:
        for _ in range(n):
            torch.manual_seed(100 + i)
            net = _train(Net(hidden=w), seed=i)
            if fmt == "pt":
                wrapped = {"state_dict": net.state_dict()} if i % 2 else net.state_dict()
                torch.save(wrapped, folder / f"net{i:03d}.pt")
            else:
                da.core.checkpoint.save_state(net.state_dict(), folder / f"net{i:03d}.safetensors")
            i += 1
    return folder


def test_layout_of_a_user_class_follows_its_spec_not_its_names(tmp_path):
    _, Net = _user_class(tmp_path)
    layout = WeightSpaceLayout.from_module(Net(hidden=12))
    assert [x.weight_key for x in layout.layers] == [
        "encoder.weight",
        "middle.weight",
        "classifier.weight",
    ]
    assert layout.widths == (64, 12, 12, 10)
    assert layout.activations == ("relu", "relu")
    ours = WeightSpaceLayout.from_module(da.mlp([64, 12, 12, 10], flatten_input=True))
    assert layout.signature == ours.signature  # names differ, the signature does not
    # the view is exactly invertible with the user's names
    net = Net(hidden=12)
    stacked = {k: v.unsqueeze(0) for k, v in net.state_dict().items()}
    back = layout.from_view(*layout.to_view(stacked))
    for k, v in stacked.items():
        assert torch.equal(back[k], v)


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (lambda: nn.Sequential(nn.Linear(8, 6), nn.LayerNorm(6), nn.ReLU(), nn.Linear(6, 3)), "1"),
        (
            lambda: nn.Sequential(nn.Linear(8, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3)),
            "BatchNorm1d",
        ),
    ],
)
def test_what_the_view_cannot_take_is_one_error_naming_the_layer(build, match):
    with pytest.raises(DeepAlignError, match=match) as err:
        WeightSpaceLayout.from_module(build())
    assert "wm, am or sinkhorn" in str(err.value)


class _Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(8, 6)
        self.block = nn.Linear(6, 6)
        self.out = nn.Linear(6, 3)

    def forward(self, x):
        h = torch.relu(self.inp(x))
        h = h + torch.relu(self.block(h))
        return self.out(h)


def test_a_residual_addition_is_named():
    with pytest.raises(DeepAlignError, match="residual") as err:
        WeightSpaceLayout.from_module(_Residual())
    assert "wm, am or sinkhorn" in str(err.value)


def test_an_aligner_runs_on_any_hidden_width_and_says_what_really_differs():
    torch.manual_seed(0)
    narrow = WeightSpaceLayout.from_module(da.mlp([64, 8, 8, 10], flatten_input=True))
    model = DeepAlign(narrow, DeepAlignConfig(**MODEL_SIZES["tiny"], probes=4)).eval()
    wide = da.mlp([64, 40, 40, 10], flatten_input=True)
    spec = da.spec_for_module(wide)
    a = {k: v.unsqueeze(0) for k, v in wide.state_dict().items()}
    t = P.random_permutation(spec, generator=torch.Generator().manual_seed(1))
    b = {
        k: v.unsqueeze(0)
        for k, v in da.mlp([64, 40, 40, 10], flatten_input=True).state_dict().items()
    }
    perm, sims = model.align_with_similarities(a, b, spec)
    assert {g: p.shape for g, p in perm.items()} == {g: (1, 40) for g in spec.groups}
    assert all(s.shape == (1, 40, 40) for s in sims.values())
    # equivariance at the new width: permuting B's neurons permutes the scores' columns
    scores = model(a, b, model.layout_for(spec, a))
    moved = P.apply(spec, {g: p.unsqueeze(0) for g, p in t.items()}, b, batch_dims=1)
    scores_moved = model(a, moved, model.layout_for(spec, a))
    for g, q in scores.items():
        want = q[0][:, t[g]]
        assert torch.allclose(
            scores_moved[g][0], want, atol=1e-4 * float(q.detach().abs().max()) + 1e-5
        )
    # other depth / input size / activation: named, widths never blamed
    for other, word in [
        (da.mlp([64, 40, 40, 40, 10], flatten_input=True), "depth"),
        (da.mlp([32, 40, 40, 10]), "input size"),
        (da.mlp([64, 8, 8, 10], act="tanh", flatten_input=True), "activations"),
    ]:
        with pytest.raises(DeepAlignError, match=word) as err:
            model.check_compatible(da.spec_for_module(other), module=other)
        assert "width" not in str(err.value)


def test_checkpoints_to_zoo_to_aligner_to_merge_cli(tmp_path, cli):
    path, Net = _user_class(tmp_path)
    ckpts = _checkpoints(tmp_path, Net, [12, 20], 10)
    zoo = tmp_path / "zoo"
    res = cli(
        "zoo",
        "--from",
        f"{ckpts}/*.pt",
        "--model",
        f"{path}:Net",
        "--data",
        "digits",
        "--split",
        "0.6,0.4,0.0",
        "--out",
        zoo,
    )
    assert res.code == 0, res.err
    members = open_zoos(zoo)
    assert sorted(z.path.name for z in members) == ["w12-12", "w20-20"]
    for z in members:
        assert len(z) == 10
        rows = z.manifest
        assert all(Path(r["source"]).parent == ckpts.resolve() for r in rows)
        assert all(0.0 <= r["test_accuracy"] <= 1.0 for r in rows)
        assert max(r["test_accuracy"] for r in rows) > 0.5  # trained nets, evaluated as given
        # the stored tensors are the files' (the user's names kept)
        first = rows[0]
        stored = z.load([first["index"]])
        raw = torch.load(first["source"], weights_only=True)
        raw = raw.get("state_dict", raw)
        assert set(stored) == set(raw)
        assert all(torch.equal(stored[k][0], raw[k]) for k in raw)
    # a rerun with one more file appends it and keeps the rest
    torch.manual_seed(999)
    torch.save(_train(Net(hidden=12), seed=99).state_dict(), ckpts / "zz_new.pt")
    before = {r["source"]: r["split"] for z in members for r in z.manifest}
    assert (
        cli(
            "zoo",
            "--from",
            f"{ckpts}/*.pt",
            "--model",
            f"{path}:Net",
            "--data",
            "digits",
            "--split",
            "0.6,0.4,0.0",
            "--out",
            zoo,
        ).code
        == 0
    )
    after = {r["source"]: r["split"] for z in open_zoos(zoo) for r in z.manifest}
    assert len(after) == len(before) + 1 and all(after[s] == v for s, v in before.items())
    # train one aligner on both widths
    out = tmp_path / "aligner"
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
        "3",
        "--batch",
        "4",
    )
    assert res.code == 0, res.err
    config = json.loads((out / "config.json").read_text())
    assert config["widths_seen"] == [[12, 12], [20, 20]]
    assert config["signature"]["activations"] == ["relu", "relu"]
    # two new networks of a width it never saw: align and merge in the user's format
    a_path, b_path = tmp_path / "a.pt", tmp_path / "b.pt"
    torch.manual_seed(5)
    net_a = _train(Net(hidden=28), seed=5)
    torch.manual_seed(6)
    net_b = _train(Net(hidden=28), seed=6)
    torch.save(net_a.state_dict(), a_path)
    torch.save(net_b.state_dict(), b_path)
    model_args = json.dumps({"hidden": 28})
    aligned = tmp_path / "b_aligned.pt"
    res = cli(
        "align",
        a_path,
        b_path,
        "--model",
        f"{path}:Net",
        "--model-args",
        model_args,
        "--method",
        "deepalign",
        "--aligner",
        out,
        "--out",
        aligned,
    )
    assert res.code == 0, res.err
    got = torch.load(aligned, weights_only=True)
    assert set(got) == set(net_b.state_dict())
    x = load("digits", "test").x[:64]
    moved = Net(hidden=28)
    moved.load_state_dict(got)
    with torch.no_grad():
        assert torch.allclose(moved.eval()(x), net_b(x), atol=1e-5)  # same function as B
    merged = tmp_path / "merged.pt"
    res = cli(
        "merge",
        a_path,
        b_path,
        "--model",
        f"{path}:Net",
        "--model-args",
        model_args,
        "--method",
        "deepalign",
        "--aligner",
        out,
        "--out",
        merged,
    )
    assert res.code == 0, res.err
    assert set(torch.load(merged, weights_only=True)) == set(net_b.state_dict())


def test_python_walkthrough_and_bad_checkpoints(tmp_path):
    path, Net = _user_class(tmp_path)
    ckpts = _checkpoints(tmp_path, Net, [12], 8, fmt="safetensors")
    zoo = tmp_path / "zoo"
    zoo_from_checkpoints(
        str(ckpts / "*.safetensors"),
        zoo,
        f"{path}:Net",
        model_args={"hidden": 12},
        data="digits",
        split_fractions=(0.5, 0.5, 0.0),
    )
    z = Zoo(zoo)
    assert len(z) == 8 and z.spec.groups == {g: 12 for g in z.spec.groups}
    out = tmp_path / "al"
    da.train_aligner(
        zoo,
        out,
        DeepAlignConfig(**MODEL_SIZES["tiny"]),
        da.TrainConfig(epochs=1, steps_per_epoch=2, batch=4, val_pairs=4),
    )
    torch.manual_seed(1)
    a, b = _train(Net(hidden=24), seed=1), _train(Net(hidden=24), seed=2)
    aligned, info = da.align_models(a, b, method="deepalign", aligner=out)
    assert type(aligned) is Net and set(info["permutation"]) == set(z.spec.groups)
    x = load("digits", "test").x[:32]
    with torch.no_grad():
        assert torch.allclose(aligned(x), b(x), atol=1e-5)

    # another activation (written in forward, measured): refused, saying so
    class TanhNet(Net):
        def forward(self, x):
            x = x.flatten(1)
            return self.classifier(torch.tanh(self.middle(torch.tanh(self.encoder(x)))))

    with pytest.raises(DeepAlignError, match="activations: relu/relu vs tanh/tanh"):
        da.align_models(TanhNet(hidden=24), TanhNet(hidden=24), method="deepalign", aligner=out)
    # a checkpoint that does not fit the class: one line naming the file and the tensor
    bad = tmp_path / "bad"
    bad.mkdir()
    state = Net(hidden=12).state_dict()
    state["extra.weight"] = torch.zeros(2, 2)
    da.core.checkpoint.save_state(state, bad / "odd.safetensors")
    with pytest.raises(DeepAlignError, match=r"odd.safetensors.*extra.weight"):
        zoo_from_checkpoints(str(bad / "*.safetensors"), tmp_path / "z2", f"{path}:Net")
    assert not (tmp_path / "z2" / "manifest.json").exists()
    with pytest.raises(DeepAlignError, match="no checkpoint files"):
        zoo_from_checkpoints(str(tmp_path / "none" / "*.pt"), tmp_path / "z3", f"{path}:Net")


def test_zoo_of_several_widths_cli(tmp_path, cli):
    out = tmp_path / "set"
    args = ["zoo", "--task", "mlp-digits", "--widths", "6,10", "--n", "9", "--epochs", "1"]
    res = cli(*args, "--out", out)
    assert res.code == 0, res.err
    zoos = open_zoos(out)
    assert [z.path.name for z in zoos] == ["w6", "w10"]
    assert [len(z) for z in zoos] == [5, 4]  # n split evenly, the first width takes the rest
    assert [set(z.spec.groups.values()) for z in zoos] == [{6}, {10}]
    assert cli(*args, "--out", out).code == 0  # a rerun resumes (nothing left to train)
    res = cli(*args[:-1], "2", "--out", out)  # other options: refused, nothing changed
    assert res.code == 2 and "different zoo set" in res.err
    res = cli("inspect", out)
    assert res.code == 0 and "w6" in res.out and "w10" in res.out
    with pytest.raises(DeepAlignError, match="several widths"):
        Zoo(out)
    res = cli(*args, "--hidden", "4,4,4", "--out", tmp_path / "x")
    assert res.code == 2 and "--widths" in res.err
