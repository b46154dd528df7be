"""The bench and the demo: outputs and their keys, the naive barrier recomputed by hand, chains that
start from the batched Deep-Align answer, failing methods, INR zoos, the CLI and its bad inputs."""

from __future__ import annotations

import dataclasses
import json
import math
import statistics

import pytest
import torch
import torch.nn.functional as F

from deepalign.bench import DEFAULT_METHODS, OUTPUTS, run_bench
from deepalign.core import arch
from deepalign.nn.model import DeepAlign, DeepAlignConfig
from deepalign.nn.sizes import MODEL_SIZES
from deepalign.nn.weight_space import WeightSpaceLayout
from deepalign.zoo.build import build_zoo
from deepalign.zoo.loader import Zoo
from deepalign.zoo.plan import make_plan

PNG = b"\x89PNG\r\n\x1a\n"
TINY = DeepAlignConfig(**MODEL_SIZES["tiny"])
POINTS = 5


def _untrained_aligner(config: dict, folder) -> None:
    torch.manual_seed(0)
    model = DeepAlign(WeightSpaceLayout.from_config(config), TINY)
    model.save_pretrained(folder, config)


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    torch.set_num_threads(1)
    path = tmp_path_factory.mktemp("bench") / "zoo"
    build_zoo(make_plan("mlp-digits", 40, seed=0, hidden=[12, 10], epochs=1), path)
    return path


@pytest.fixture(scope="module")
def aligner(zoo, tmp_path_factory):
    folder = tmp_path_factory.mktemp("bench") / "aligner"
    _untrained_aligner(Zoo(zoo).config, folder)
    return folder


@pytest.fixture(scope="module")
def bench(zoo, aligner, tmp_path_factory):
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("bench") / "out"
    result = run_bench(
        zoo, aligner, out, pairs=3, seeds=2, points=POINTS, sinkhorn_steps=3, trajectory_pairs=2
    )
    return out, result


def test_bench_writes_all_four_outputs_with_their_keys(bench):
    out, result = bench
    for name in OUTPUTS:
        assert (out / name).is_file(), name
    stored = json.loads((out / "bench.json").read_text())
    assert {"format", "settings", "methods", "sinkhorn_init", "pair_draws"} <= set(stored)
    assert list(stored["methods"]) == list(DEFAULT_METHODS)
    s = stored["settings"]
    assert (s["pairs"], s["seeds"], s["points"], s["sinkhorn_steps"]) == (3, 2, POINTS, 3)
    for method, entry in stored["methods"].items():
        assert entry["status"] == "ok", (method, entry.get("error"))
        for key in ("barrier", "auc", "acc_mid", "objective", "l2", "seconds"):
            stat = entry["summary"][key]
            assert math.isfinite(stat["mean"]) and stat["std"] >= 0, (method, key)
            assert len(stat["seed_means"]) == 2
        assert len(entry["pairs"]) == 3 * 2
        assert len(entry["curve"]["loss"]) == POINTS
    timing = {m: stored["methods"][m]["timing"] for m in DEFAULT_METHODS}
    assert timing["deepalign"] == timing["identity"] == "batched (amortised)"
    assert timing["deepalign+sinkhorn"].startswith("batched") and timing["wm"] == "per pair"
    # the Fig. 4 data: one barrier per recorded Sinkhorn step, for each start
    assert set(stored["sinkhorn_init"]) == {
        "sinkhorn",
        "wm+sinkhorn",
        "deepalign+sinkhorn",
        "identity+sinkhorn",  # the identity start, traced only (not a table row)
    }
    for t in stored["sinkhorn_init"].values():
        assert t["steps"][0] == 0 and t["steps"][-1] == 3
        assert len(t["barrier_mean"]) == len(t["steps"]) and t["pairs"] == 2 * 2
    table = (out / "bench.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ") and "(`" in line]
    assert len(rows) == len(DEFAULT_METHODS)
    for method in DEFAULT_METHODS:
        assert sum(f"(`{method}`)" in r for r in rows) == 1
    for name in ("lmc.png", "sinkhorn_init.png"):
        assert (out / name).read_bytes()[:8] == PNG
        import matplotlib.image

        img = matplotlib.image.imread(out / name)
        assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100


def test_sinkhorn_starts_are_their_first_stages_answers(bench):
    """Step 0 of each Sinkhorn start is its start's answer: the identity start's barrier there is
    the naive barrier, and a chain's is its first method's, on the same traced pairs."""
    _, result = bench
    traced = result["settings"]["trajectory_pairs"]
    for method, first in [
        ("identity+sinkhorn", "identity"),
        ("wm+sinkhorn", "wm"),
        ("deepalign+sinkhorn", "deepalign"),
    ]:
        rows = [r for r in result["methods"][first]["pairs"] if r["pos"] < traced]
        t = result["sinkhorn_init"][method]
        assert t["steps"][0] == 0
        assert t["barrier_mean"][0] == pytest.approx(
            sum(r["barrier"] for r in rows) / len(rows), rel=1e-5, abs=1e-6
        )
    assert result["sinkhorn_init"]["identity+sinkhorn"]["start"] == "identity"
    assert result["sinkhorn_init"]["sinkhorn"]["start"] == "none"


def test_pairs_are_distinct_test_networks_and_seeds_redraw_them(bench, zoo):
    _, result = bench
    test = set(Zoo(zoo).indices("test"))
    draws = [[tuple(p) for p in d] for d in result["pair_draws"]]
    for d in draws:
        assert len(set(frozenset(p) for p in d)) == len(d) == 3
        assert all(a != b and a in test and b in test for a, b in d)
    rows = result["methods"]["wm"]["pairs"]
    assert [(r["a"], r["b"]) for r in rows] == [p for d in draws for p in d]
    assert draws[0] != draws[1]


def test_identity_barrier_and_objective_match_a_hand_computation(bench, zoo):
    """The naive row: interpolate A and B ourselves, evaluate cross-entropy on the test split."""
    _, result = bench
    z = Zoo(zoo)
    test = z.dataset("test")
    net = arch.build(z.config).eval()
    lambdas = [i / (POINTS - 1) for i in range(POINTS)]
    for row in result["methods"]["identity"]["pairs"]:
        a = {k: v[0] for k, v in z.load([row["a"]]).items()}
        b = {k: v[0] for k, v in z.load([row["b"]]).items()}
        losses = []
        for lam in lambdas:
            net.load_state_dict({k: (1 - lam) * a[k] + lam * b[k] for k in a})
            with torch.no_grad():
                losses.append(float(F.cross_entropy(net(test.x), test.y)))
        gaps = [
            loss - ((1 - lam) * losses[0] + lam * losses[-1])
            for lam, loss in zip(lambdas, losses, strict=True)
        ]
        assert row["barrier"] == pytest.approx(max(max(gaps), 0.0), abs=1e-5)
        trap = sum((gaps[i] + gaps[i + 1]) / 2 / (POINTS - 1) for i in range(POINTS - 1))
        assert row["auc"] == pytest.approx(max(trap, 0.0), abs=1e-5)
        inner = sum(float((a[k].double() * b[k].double()).sum()) for k in a)
        # the objective is summed in float32: its rounding scales with the magnitudes summed
        # (sum of |a*b|), not with the inner product, which cancels to a small number
        magnitude = sum(float((a[k].double() * b[k].double()).abs().sum()) for k in a)
        assert row["objective"] == pytest.approx(inner, abs=1e-5 * magnitude)


def test_deepalign_chains_start_from_the_batched_answer(bench):
    """WM from the Deep-Align start never lowers the objective (coordinate ascent), pair by pair."""
    _, result = bench
    da = result["methods"]["deepalign"]["pairs"]
    da_wm = result["methods"]["deepalign+wm"]["pairs"]
    for r0, r1 in zip(da, da_wm, strict=True):
        assert (r0["a"], r0["b"]) == (r1["a"], r1["b"])
        assert r1["objective"] >= r0["objective"] - 1e-6 * abs(r0["objective"])
    # a chain's time per pair is its first stage's amortised time plus its own solver time
    firsts = result["methods"]["deepalign+wm"]["first_stage_seconds_per_pair"]
    assert all(r["seconds"] >= firsts[r["seed"]] for r in da_wm)


def test_sinkhorn_stages_run_batched_in_chunks_from_the_previous_answer(zoo):
    """wm+sinkhorn: WM pair by pair, then Sinkhorn on chunks of pairs started from WM's answers; a
    chunk's data order is its first pair's seed, so that pair equals the per-pair solver's answer."""
    from deepalign.bench.runs import Context, run_method
    from deepalign.core.functional import unstack_state
    from deepalign.solvers import align
    from deepalign.solvers.sinkhorn import sinkhorn_batch

    z = Zoo(zoo)
    nets = z.indices("train")
    a, b = z.load(nets[:3]), z.load(nets[3:6])
    data = z.dataset("train").subset(200, seed=0)
    opts = {"steps": 4, "trajectory_steps": [0, 4]}
    ctx = Context(z.spec, z.module(), data, None, {}, opts, trajectory_pairs=3, sinkhorn_chunk=2)
    seeds = [11, 12, 13]
    run = run_method("wm+sinkhorn", a, b, ctx, seeds)
    assert run.timing == "per pair + batched (amortised)"
    assert len(run.trajectories) == 3 and all(t[-1][0] == 4 for t in run.trajectories)
    start = [align(unstack_state(a, i), unstack_state(b, i), z.spec, "wm")[0] for i in range(3)]
    init = {g: torch.stack([p[g] for p in start]) for g in z.spec.groups}
    for s, e in [(0, 2), (2, 3)]:
        want, _ = sinkhorn_batch(
            {k: v[s:e] for k, v in a.items()}, {k: v[s:e] for k, v in b.items()}, z.spec,
            module=z.module(), data=data, init={g: p[s:e] for g, p in init.items()},
            seed=seeds[s], pair_seeds=seeds[s:e], steps=4,
        )  # fmt: skip
        assert all(torch.equal(run.perm[g][s:e], want[g]) for g in z.spec.groups)
        for i in range(s, e):  # step 0 of the trajectory is WM's answer
            assert all(torch.equal(run.trajectories[i][0][1][g], init[g][i]) for g in init)
    per_pair = run_method("wm+sinkhorn", a, b, dataclasses.replace(ctx, sinkhorn_chunk=0), seeds)
    assert per_pair.timing == "per pair + per pair"
    for i in (0, 2):  # the first pair of each chunk
        assert all(torch.equal(per_pair.perm[g][i], run.perm[g][i]) for g in z.spec.groups)


def test_a_failing_method_is_reported_and_the_run_goes_on(zoo, tmp_path):
    out = tmp_path / "out"
    result = run_bench(
        zoo,
        None,
        out,
        pairs=2,
        methods="identity,sinkhorn,wm",
        points=3,
        sinkhorn_steps=2,
        options={"sinkhorn": {"tau": -1.0}},
    )
    entry = result["methods"]["sinkhorn"]
    assert entry["status"] == "failed" and "tau" in entry["error"]
    assert result["methods"]["wm"]["status"] == "ok"
    assert result["methods"]["identity"]["status"] == "ok"
    table = (out / "bench.md").read_text()
    assert "failed: sinkhorn" in table and "tau" in table
    assert all((out / name).is_file() for name in OUTPUTS)
    assert result["sinkhorn_init"] == {}


def test_inr_zoo_uses_the_mse_to_the_target(tmp_path):
    """Sine-wave INRs: pairs are two views of one wave; the curve's ends are each view's MSE."""
    path = tmp_path / "sine"
    plan = make_plan(
        "siren-sine", 8, seed=1, hidden=[8, 8], epochs=15, split_fractions=(0.5, 0.0, 0.5)
    )
    build_zoo(plan, path)
    result = run_bench(
        path, None, tmp_path / "out", pairs=2, methods="identity,wm,am,sinkhorn", points=3,
        sinkhorn_steps=2,
    )  # fmt: skip
    z = Zoo(path)
    assert result["settings"]["loss"] == "MSE"
    for m in ("identity", "wm", "am", "sinkhorn"):
        assert result["methods"][m]["status"] == "ok", result["methods"][m].get("error")
        assert result["methods"][m]["summary"]["acc_mid"] is None
    net = z.module()
    end_mse = []
    for row in result["methods"]["identity"]["pairs"]:
        assert row["a"] != row["b"] and z.rows[row["a"]]["target"] == z.rows[row["b"]]["target"]
        tg = z.targets([row["a"]])
        net.load_state_dict({k: v[0] for k, v in z.load([row["a"]]).items()})
        with torch.no_grad():
            end_mse.append(float(F.mse_loss(net(tg.coords), tg.values[0])))
    first = result["methods"]["identity"]["curve"]["loss"][0]  # lam = 0: network A alone
    assert first == pytest.approx(sum(end_mse) / len(end_mse), rel=1e-5)


def test_bench_cli_prints_the_table_and_reports_a_broken_option(cli, zoo, aligner, tmp_path):
    out = tmp_path / "cli"
    res = cli(
        "bench", "--zoo", zoo, "--aligner", aligner, "--out", out, "--pairs", "2",
        "--methods", "identity,deepalign,sinkhorn", "--points", "3", "--sinkhorn-steps", "2",
        "-o", "sinkhorn:tau=-1",
    )  # fmt: skip
    assert res.code == 0, res.err
    assert "deepalign" in res.out and "failed" in res.out and "bench.md" in res.out
    assert all((out / name).is_file() for name in OUTPUTS)
    stored = json.loads((out / "bench.json").read_text())
    assert stored["settings"]["options"] == {"sinkhorn": {"tau": -1}}


@pytest.mark.parametrize(
    "case",
    [
        "missing-zoo",
        "other-arch",
        "unknown-method",
        "no-aligner",
        "bad-opt",
        "bad-value",
        "zero-pairs",
        "negative-trajectory",
    ],
)
def test_bench_cli_bad_inputs_exit_2_with_one_line_and_no_output(cli, zoo, aligner, tmp_path, case):
    other = tmp_path / "other-aligner"
    if case == "other-arch":
        _untrained_aligner(arch.describe(arch.mlp([64, 9, 7, 5, 10], flatten_input=True)), other)
    args = {
        "missing-zoo": ["--zoo", tmp_path / "nope", "--aligner", aligner],
        "other-arch": ["--zoo", zoo, "--aligner", other],
        "unknown-method": ["--zoo", zoo, "--aligner", aligner, "--methods", "wm,magic"],
        "no-aligner": ["--zoo", zoo, "--methods", "wm,deepalign+wm"],
        "bad-opt": ["--zoo", zoo, "--aligner", aligner, "-o", "sinkhorn-lr"],
        "bad-value": ["--zoo", zoo, "--aligner", aligner, "-o", "deepalign+sinkhorn:lr=fast"],
        "zero-pairs": ["--zoo", zoo, "--aligner", aligner, "--pairs", "0"],
        "negative-trajectory": ["--zoo", zoo, "--aligner", aligner, "--trajectory-pairs", "-1"],
    }[case]
    out = tmp_path / "out"
    res = cli("bench", *args, "--out", out)
    assert res.code == 2
    lines = res.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.err
    expect = {
        "missing-zoo": "not a zoo folder",
        "other-arch": "depth: 4 layers vs 3",
        "unknown-method": "magic",
        "no-aligner": "--aligner",
        "bad-opt": "METHOD:KEY=VALUE",
        "bad-value": "method 'deepalign+sinkhorn': option lr='fast' must be a number",
        "zero-pairs": "--pairs",
        "negative-trajectory": "--trajectory-pairs",
    }[case]
    assert expect in lines[0]
    assert not out.exists()


def test_demo_quick_runs_end_to_end_and_reuses_its_work(cli, tmp_path):
    out = tmp_path / "demo"
    res = cli("demo", "--quick", "--out", out)
    assert res.code == 0, res.err
    for name in OUTPUTS:
        assert (out / "bench" / name).is_file(), name
    assert (out / "zoo" / "manifest.json").is_file()
    # the demo trains exactly what `deepalign train --size tiny` names, with its probe features
    from deepalign.bench.demo import PROFILES

    trained = json.loads((out / "aligner" / "config.json").read_text())["model"]
    want = DeepAlignConfig(**MODEL_SIZES["tiny"], probes=PROFILES["quick"].probes).to_dict()
    assert trained == want and trained["probes"] > 0
    stored = json.loads((out / "bench" / "bench.json").read_text())
    assert list(stored["methods"]) == list(DEFAULT_METHODS)
    assert all(e["status"] == "ok" for e in stored["methods"].values())
    assert "bench.md" in res.out and "lmc.png" in res.out
    before = (out / "bench" / "bench.json").read_bytes()
    again = cli("demo", "--quick", "--out", out)
    assert again.code == 0, again.err
    assert "reused: zoo, aligner, bench" in again.out
    assert (out / "bench" / "bench.json").read_bytes() == before
    # a full demo refuses the quick demo's folder before doing anything
    full = cli("demo", "--out", out)
    assert full.code == 2 and "quick" in full.err and len(full.err.strip().splitlines()) == 1


class _Kill(BaseException):
    """Stands in for a kill (not an Exception, so the bench does not record it as a failure)."""


def test_a_killed_bench_resumes_to_the_same_result(zoo, tmp_path):
    kw = dict(pairs=2, methods="identity,wm,sinkhorn", points=3, sinkhorn_steps=2)
    straight = run_bench(zoo, None, tmp_path / "straight", **kw)

    def kill_at_sinkhorn(ev):
        if ev["method"] == "sinkhorn":
            raise _Kill

    out = tmp_path / "killed"
    with pytest.raises(_Kill):
        run_bench(zoo, None, out, on_progress=kill_at_sinkhorn, **kw)
    assert (out / "bench.partial.pt").is_file()
    assert not any((out / name).exists() for name in OUTPUTS)
    resumed = run_bench(zoo, None, out, **kw)
    assert resumed["resumed_runs"] == 2  # identity and wm were finished before the kill
    assert not (out / "bench.partial.pt").exists()
    for m in ("identity", "wm", "sinkhorn"):
        got = [
            (r["a"], r["b"], r["barrier"], r["objective"]) for r in resumed["methods"][m]["pairs"]
        ]
        want = [
            (r["a"], r["b"], r["barrier"], r["objective"]) for r in straight["methods"][m]["pairs"]
        ]
        assert got == want, m
    # a rerun with other settings does not reuse the runs a killed one left
    with pytest.raises(_Kill):
        run_bench(zoo, None, out, on_progress=kill_at_sinkhorn, **kw)
    other = run_bench(zoo, None, out, **{**kw, "points": 4})
    assert other["resumed_runs"] == 0 and other["settings"]["points"] == 4


def test_gap_closed_is_measured_from_wm_to_the_best_method(bench):
    """Gap closed = (WM - method) / (WM - best) on mean barriers, per seed and over all pairs."""
    out, result = bench
    methods = result["methods"]
    means = {m: statistics.fmean(r["barrier"] for r in e["pairs"]) for m, e in methods.items()}
    best = min(means, key=means.get)
    assert means[best] < means["wm"]  # (else every gap is undefined, None)
    for m, e in methods.items():
        gap = e["summary"]["gap_closed"]
        want = (means["wm"] - means[m]) / (means["wm"] - means[best])
        assert gap["mean"] == pytest.approx(want, rel=1e-9, abs=1e-12)
        assert gap["floor_method"] == best and len(gap["seed_values"]) == 2
        assert gap["std"] >= 0
        for k in range(2):
            seed_means = {
                x: statistics.fmean(r["barrier"] for r in y["pairs"] if r["seed"] == k)
                for x, y in methods.items()
            }
            floor = min(seed_means.values())
            if floor == seed_means["wm"]:  # wm is this seed's best: no gap to close
                assert gap["seed_values"][k] is None
                continue
            expect = (seed_means["wm"] - seed_means[m]) / (seed_means["wm"] - floor)
            assert gap["seed_values"][k] == pytest.approx(expect, rel=1e-9, abs=1e-12)
    assert methods["wm"]["summary"]["gap_closed"]["mean"] == 0.0
    assert methods[best]["summary"]["gap_closed"]["mean"] == pytest.approx(1.0)
    assert "Gap closed" in (out / "bench.md").read_text()


def test_gap_closed_needs_weight_matching_in_the_run(zoo):
    result = run_bench(zoo, None, None, pairs=2, methods="identity,sinkhorn", sinkhorn_steps=2)
    assert all(e["summary"]["gap_closed"] is None for e in result["methods"].values())
