"""Zoo training and storage: batched == per-model training, determinism, splits, shards, resume."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F

from deepalign.core.arch import build, cnn, describe, mlp, siren
from deepalign.core.functional import batched_forward
from deepalign.data import load, sine_targets
from deepalign.errors import DeepAlignError
from deepalign.zoo import ShardSlice, Zoo, build_zoo, make_plan
from deepalign.zoo.batched import init_state, init_states, make_forward
from deepalign.zoo.build import order_seed, task_data, train_shard
from deepalign.zoo.train import Adam

CPU = torch.device("cpu")


def _tiny(task="mlp-digits", n=10, **kw):
    defaults = {"mlp-digits": dict(hidden=[8, 8], epochs=2, shard_size=4)}.get(task, {})
    return make_plan(task, n, **{**defaults, **kw})


def _stacked(config, seeds):
    return init_states(config, seeds)


@pytest.mark.parametrize(
    "module, x_shape",
    [
        (mlp([64, 16, 12, 10], flatten_input=True), (5, 1, 8, 8)),
        (mlp([6, 9, 4]), (5, 6)),
        (siren([2, 7, 7, 1]), (11, 2)),
    ],
)
def test_fast_chain_forward_matches_batched_forward(module, x_shape):
    config = describe(module)
    params = _stacked(config, [1, 2, 3])
    fast = make_forward(config)
    x = torch.randn(x_shape, generator=torch.Generator().manual_seed(0))
    ref = batched_forward(module, params, x)
    assert torch.allclose(fast(params, x, True), ref, atol=1e-5)
    xs = torch.randn((3, *x_shape), generator=torch.Generator().manual_seed(1))
    ref = batched_forward(module, params, xs, shared_input=False)
    assert torch.allclose(fast(params, xs, False), ref, atol=1e-5)


def test_cpu_conv_forward_matches_batched_forward():
    module = cnn(1, [3, 4], 10, 8)
    config = describe(module)
    params = _stacked(config, [1, 2, 3])
    loop = make_forward(config, "cpu")
    x = torch.randn(5, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(loop(params, x, True), batched_forward(module, params, x), atol=1e-5)
    xs = torch.randn(3, 5, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    ref = batched_forward(module, params, xs, shared_input=False)
    assert torch.allclose(loop(params, xs, False), ref, atol=1e-5)


def test_init_is_per_seed_and_leaves_global_rng_alone():
    config = describe(mlp([4, 5, 3]))
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    a = init_state(config, 7)
    assert torch.equal(torch.rand(3), before)  # global stream untouched
    b, c = init_state(config, 7), init_state(config, 8)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["0.weight"], c["0.weight"])


def test_siren_init_bounds():
    s = init_state(describe(siren([2, 64, 64, 1], w0=30.0)), 0)
    assert s["0.weight"].abs().max() <= 1 / 2 + 1e-6 and s["0.weight"].abs().max() > 0.4
    bound = (6 / 64) ** 0.5 / 30
    assert s["2.weight"].abs().max() <= bound + 1e-7 and s["2.weight"].abs().max() > 0.8 * bound


def test_adam_matches_torch_adam():
    g = torch.Generator().manual_seed(0)
    a = [
        torch.randn(4, 3, generator=g).requires_grad_(),
        torch.randn(5, generator=g).requires_grad_(),
    ]
    b = [t.detach().clone().requires_grad_() for t in a]
    ours, ref = Adam(a, 1e-2), torch.optim.Adam(b, lr=1e-2)
    for _ in range(20):
        for ps, opt in ((a, ours), (b, ref)):
            opt.zero_grad()
            sum((p**3 - p).sum() for p in ps).backward()
            opt.step()
    assert all(torch.allclose(x, y, atol=1e-6) for x, y in zip(a, b, strict=True))


def _reference_classifier(config, seed, train, epochs, batch, lr):
    """One model trained alone, the plain way: nn.Module + torch.optim.Adam + its own data order."""
    model = build(config)
    model.load_state_dict(init_state(config, seed))
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(order_seed(seed))
    for _ in range(epochs):
        order = torch.randperm(len(train), generator=g)
        for s in range(0, len(train), batch):
            idx = order[s : s + batch]
            loss = F.cross_entropy(model(train.x[idx]), train.y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.state_dict()


@pytest.mark.parametrize(
    "task, kw",
    [
        ("mlp-digits", dict(hidden=[8, 8], epochs=2, shard_size=3)),
        ("cnn-digits", dict(hidden=[4, 6], epochs=1, shard_size=2)),
    ],
)
def test_batched_training_equals_per_model_training(task, kw):
    plan = make_plan(task, 3, seed=5, **kw)
    data = task_data(plan, None)
    params, rows = train_shard(plan, 0, data, CPU)
    test = load("digits", "test")
    for j, row in enumerate(plan.base_rows()[: len(plan.shard_indices(0))]):
        ref = _reference_classifier(
            plan.arch,
            row["seed"],
            data["train"],
            plan.training.epochs,
            plan.training.batch_size,
            plan.training.lr,
        )
        for k, v in ref.items():
            assert torch.allclose(params[k][j], v, atol=2e-5), (task, j, k)
        model = build(plan.arch).eval()
        model.load_state_dict(ref)
        with torch.no_grad():
            acc = (model(test.x).argmax(1) == test.y).float().mean().item()
        assert abs(rows[j]["test_accuracy"] - acc) < 1e-6
        assert rows[j]["index"] == row["index"]


def test_batched_inr_fit_equals_per_model_fit():
    plan = make_plan("siren-sine", 4, seed=2, hidden=[8, 8], epochs=15)
    params, rows = train_shard(plan, 0, task_data(plan, None), CPU)
    base = plan.base_rows()
    for j in (0, 3):
        model = build(plan.arch)
        model.load_state_dict(init_state(plan.arch, base[j]["seed"]))
        tg = sine_targets([base[j]["frequency"]])
        opt = torch.optim.Adam(model.parameters(), lr=plan.training.lr)
        for _ in range(15):
            loss = ((model(tg.coords) - tg.values[0]) ** 2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        for k, v in model.state_dict().items():
            assert torch.allclose(params[k][j], v, atol=1e-5)
        with torch.no_grad():
            mse = ((model(tg.coords) - tg.values[0]) ** 2).mean().item()
        assert rows[j]["test_loss"] == pytest.approx(mse, rel=1e-4, abs=1e-7)
    # two views of one wave: same target, different seeds, different weights
    assert base[0]["frequency"] == base[1]["frequency"] and base[0]["seed"] != base[1]["seed"]
    assert not torch.equal(params["0.weight"][0], params["0.weight"][1])


def test_plan_splits_and_seeds():
    plan = make_plan("mlp-digits", 200, seed=3)
    rows = plan.base_rows()
    counts = {s: sum(r["split"] == s for r in rows) for s in ("train", "val", "test")}
    assert counts == {"train": 160, "val": 20, "test": 20}
    assert rows == make_plan("mlp-digits", 200, seed=3).base_rows()
    other = make_plan("mlp-digits", 200, seed=4).base_rows()
    assert [r["split"] for r in rows] != [r["split"] for r in other]
    assert len({r["seed"] for r in rows}) == 200
    assert [r["split"] for r in rows[:50]] != ["train"] * 50  # shuffled, not cut in order
    inr = make_plan("siren-fashion", 40, seed=0, views=4).base_rows()
    for t in range(10):
        assert len({r["split"] for r in inr if r["target"] == t}) == 1
    with pytest.raises(DeepAlignError, match="--views"):
        make_plan("mlp-digits", 5, views=2)
    with pytest.raises(DeepAlignError, match="unknown zoo task"):
        make_plan("mlp-imagenet", 5)
    with pytest.raises(DeepAlignError, match="--n"):
        make_plan("mlp-digits", 0)


def _tensors(zoo: Zoo):
    return zoo.load(zoo.indices("all"))


def test_build_load_and_api(tmp_path):
    plan = _tiny(n=10)
    rows = build_zoo(plan, tmp_path / "z")
    zoo = Zoo(tmp_path / "z")
    assert len(zoo) == 10 and zoo.complete and zoo.task == "mlp-digits"
    assert sorted(zoo.indices("train") + zoo.indices("val") + zoo.indices("test")) == list(
        range(10)
    )
    stacked = zoo.load([7, 2, 7])
    assert stacked["1.weight"].shape == (3, 8, 64)
    assert torch.equal(stacked["1.weight"][0], stacked["1.weight"][2])
    one = zoo.load([2])
    assert all(torch.equal(one[k][0], stacked[k][1]) for k in one)
    small = Zoo(tmp_path / "z", cache_bytes=1)  # shard-at-a-time path: the same tensors
    again = small.load([7, 2, 7])
    assert all(torch.equal(again[k], stacked[k]) for k in stacked)
    from safetensors.torch import load_file

    shard1 = load_file(str(tmp_path / "z" / "shard-00001.safetensors"))  # models 4..7
    assert torch.equal(stacked["3.weight"][0], shard1["3.weight"][3])
    module = zoo.module()
    assert not module.training
    zoo.spec.check({k: v[0] for k, v in stacked.items()}, "zoo")
    ds = zoo.dataset("test")
    model = zoo.module()
    model.load_state_dict({k: v[0] for k, v in zoo.load([4]).items()})
    with torch.no_grad():
        acc = (model(ds.x).argmax(1) == ds.y).float().mean().item()
    assert zoo.manifest[4]["test_accuracy"] == pytest.approx(acc, abs=1e-6)
    assert rows[4]["test_accuracy"] == zoo.manifest[4]["test_accuracy"]
    manifest = json.loads((tmp_path / "z" / "manifest.json").read_text())
    for key in (
        "task",
        "arch",
        "dataset",
        "seed",
        "n",
        "shard_size",
        "training",
        "models",
        "complete",
    ):
        assert key in manifest
    for r in manifest["models"]:
        assert {"index", "seed", "split", "shard", "test_loss", "test_accuracy"} <= set(r)
    got = [ix for ix, _ in zoo.batches("train", 3)]
    assert sum(got, []) == zoo.indices("train")
    with pytest.raises(DeepAlignError, match="not in the zoo"):
        zoo.load([10])
    with pytest.raises(DeepAlignError, match="classifier zoo"):
        zoo.targets([0])


def test_same_plan_same_bits_different_seed_different_models(tmp_path):
    build_zoo(_tiny(n=5), tmp_path / "a")
    build_zoo(_tiny(n=5), tmp_path / "b")
    build_zoo(_tiny(n=5, seed=1), tmp_path / "c")
    a, b, c = (_tensors(Zoo(tmp_path / x)) for x in "abc")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["1.weight"], c["1.weight"])
    # models of one zoo differ from each other
    assert not torch.equal(a["1.weight"][0], a["1.weight"][1])


def test_shard_slices_union_is_the_full_zoo(tmp_path):
    plan = _tiny(n=11)  # 3 shards of 4, 4, 3
    build_zoo(plan, tmp_path / "full")
    part = tmp_path / "parts"
    r0 = build_zoo(plan, part, shard=ShardSlice(0, 2))
    assert sum(r["trained"] for r in r0) == 7  # shards 0 and 2
    partial = Zoo(part)
    assert not partial.complete and len(partial) == 7
    assert partial.indices() == [0, 1, 2, 3, 8, 9, 10]
    got, want = partial.load([9, 0]), Zoo(tmp_path / "full").load([9, 0])
    assert all(torch.equal(got[k], want[k]) for k in want)
    with pytest.raises(DeepAlignError, match="model 5 is not in the zoo"):
        partial.load([5])
    r1 = build_zoo(plan, part, shard=ShardSlice(1, 2))
    assert all(r["trained"] for r in r1)
    full, parts = _tensors(Zoo(tmp_path / "full")), _tensors(Zoo(part))
    assert all(torch.equal(full[k], parts[k]) for k in full)
    assert Zoo(part).manifest == Zoo(tmp_path / "full").manifest


def test_inr_zoo_targets(tmp_path):
    plan = make_plan("siren-sine", 6, seed=1, hidden=[8], epochs=5)
    build_zoo(plan, tmp_path / "s")
    zoo = Zoo(tmp_path / "s")
    tg = zoo.targets([5, 0])
    rows = zoo.rows
    assert tg.values.shape == (2, 128, 1)
    x = tg.coords[:, 0]
    assert torch.allclose(tg.values[0, :, 0], torch.sin(rows[5]["frequency"] * x), atol=1e-6)
    assert rows[4]["target"] == rows[5]["target"] == 2 and {rows[4]["view"], rows[5]["view"]} == {
        0,
        1,
    }
    with pytest.raises(DeepAlignError, match="INR zoo"):
        zoo.dataset("test")


def test_bad_folders_and_shards(tmp_path):
    plan = _tiny(n=8)
    z = tmp_path / "z"
    build_zoo(plan, z)
    before = {p.name: p.read_bytes() for p in z.glob("shard-*")}
    # a different zoo into the same folder: refused, shards untouched
    with pytest.raises(DeepAlignError, match="holds a different zoo.*epochs"):
        build_zoo(_tiny(n=8, epochs=3), z)
    assert {p.name: p.read_bytes() for p in z.glob("shard-*")} == before
    # a folder with other things in it
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(DeepAlignError, match="not empty"):
        build_zoo(plan, tmp_path / "busy")
    assert sorted(p.name for p in (tmp_path / "busy").iterdir()) == ["notes.txt"]
    # a corrupt shard: loader and builder both refuse, and the builder does not overwrite it
    shard = z / "shard-00001.safetensors"
    shard.write_bytes(before["shard-00001.safetensors"][:100])
    with pytest.raises(DeepAlignError, match="shard-00001.safetensors: corrupt"):
        Zoo(z)
    with pytest.raises(DeepAlignError, match="corrupt"):
        build_zoo(plan, z)
    assert len(shard.read_bytes()) == 100
    # a shard from another zoo
    build_zoo(_tiny(n=8, seed=9), tmp_path / "other")
    shard.write_bytes((tmp_path / "other" / "shard-00001.safetensors").read_bytes())
    with pytest.raises(DeepAlignError, match="different zoo"):
        Zoo(z)
    shard.write_bytes(before["shard-00001.safetensors"])
    assert len(Zoo(z)) == 8
    # a corrupt manifest
    (z / "manifest.json").write_text('{"format": "deepalign-zoo/1", "task": ')
    with pytest.raises(DeepAlignError, match="corrupt zoo manifest"):
        Zoo(z)
    with pytest.raises(DeepAlignError, match="corrupt zoo manifest"):
        build_zoo(plan, z)
    assert {p.name: p.read_bytes() for p in z.glob("shard-*")} == before
    with pytest.raises(DeepAlignError, match="not a zoo folder"):
        Zoo(tmp_path / "busy")


def test_missing_dataset_creates_nothing(tmp_path):
    plan = make_plan("mlp-mnist", 4)
    with pytest.raises(DeepAlignError, match="--data-dir"):
        build_zoo(plan, tmp_path / "z", data_dir=tmp_path / "empty")
    assert not (tmp_path / "z").exists()


def _shard_contents(folder, k):
    from safetensors import safe_open

    with safe_open(str(folder / f"shard-{k:05d}.safetensors"), framework="pt") as f:
        return {n: f.get_tensor(n) for n in f.keys()}, f.metadata()  # noqa: SIM118


def test_kill_and_resume_gives_the_same_zoo(tmp_path, cli):
    args = ["zoo", "--task", "mlp-digits", "--n", "24", "--shard-size", "3", "--epochs", "4"]
    args += ["--hidden", "16,16", "--threads", "1", "--seed", "4"]
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    cmd = [sys.executable, "-m", "deepalign.cli.app", *args, "--out", str(killed)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not (killed / "shard-00000.safetensors").exists():
            assert proc.poll() is None, "the zoo run ended before it could be killed"
            assert time.monotonic() < deadline
            time.sleep(0.002)
        proc.kill()
    finally:
        proc.wait()
    present = sorted(p.name for p in killed.glob("shard-*.safetensors"))
    assert 1 <= len(present) < 8, present  # killed mid-run: some shards missing
    assert not Zoo(killed).complete
    resumed = cli(*args, "--out", killed)
    assert resumed.code == 0, resumed.err
    assert cli(*args, "--out", clean).code == 0
    for k in range(8):  # tensors bit for bit, and the same metric rows
        (ta, ma), (tb, mb) = _shard_contents(killed, k), _shard_contents(clean, k)
        assert ta.keys() == tb.keys() and all(torch.equal(ta[n], tb[n]) for n in ta), k
        assert ma == mb
    assert Zoo(killed).manifest == Zoo(clean).manifest
    assert not list(killed.glob(".shard-*"))  # stale temporaries removed once complete
