"""Scale-out: data-parallel training under torchrun (2 CPU processes, gloo) gives the gradient and
the aligner of one process; zoo shards running at once build the one-process zoo; bench shards
gathered give the one-process numbers."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from deepalign.nn.model import DeepAlign
from deepalign.zoo import build_zoo, make_plan
from deepalign.zoo.loader import Zoo

HERE = Path(__file__).parent
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node"]


def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE)}
    res = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    return res


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    path = tmp_path_factory.mktemp("ddp") / "zoo"
    build_zoo(make_plan("mlp-digits", 40, seed=0, hidden=[12, 10], epochs=1), path)
    return path


def _rel(a: dict, b: dict) -> float:
    num = sum(float((a[k].detach().double() - b[k].detach().double()).norm() ** 2) for k in a)
    den = sum(float(a[k].detach().double().norm() ** 2) for k in a)
    return (num / den) ** 0.5


def test_two_processes_average_to_the_one_process_gradient(zoo, tmp_path):
    _run([sys.executable, str(HERE / "ddp_step.py"), str(zoo), "one.pt"], tmp_path)
    _run([*TORCHRUN, "2", str(HERE / "ddp_step.py"), str(zoo), "two.pt"], tmp_path)
    one = torch.load(tmp_path / "one.pt", weights_only=True)
    two = torch.load(tmp_path / "two.pt", weights_only=True)
    assert set(one) == set(two)
    # float32 sums over the global batch in another order: relative differences of ~1e-6
    assert _rel(one, two) < 1e-4


def test_torchrun_trains_the_aligner_one_process_trains(zoo, tmp_path):
    args = ["train", "--zoo", str(zoo), "--size", "tiny", "--epochs", "1", "--steps", "3"]
    # a small learning rate bounds what AdamW makes of rounding noise in analytically-zero
    # gradients (biases before BatchNorm: steps of +-lr whatever their size)
    args += ["--batch", "8", "--lr", "3e-4"]
    _run([sys.executable, "-m", "deepalign", *args, "--out", "one"], tmp_path)
    res = _run([*TORCHRUN, "2", "-m", "deepalign", *args, "--out", "two"], tmp_path)
    assert res.stdout.count("aligner written to") == 1  # rank 0 reports and writes
    one = load_file(str(tmp_path / "one" / "model.safetensors"))
    two = load_file(str(tmp_path / "two" / "model.safetensors"))
    assert _rel(one, two) < 1e-3
    a, b = (DeepAlign.from_pretrained(tmp_path / d) for d in ("one", "two"))
    z = Zoo(zoo)
    left, right = z.load(z.indices("val")[:2]), z.load(z.indices("val")[2:4])
    sa, sb = a(left, right), b(left, right)
    assert _rel(sa, sb) < 1e-3
    assert all(
        torch.equal(x, y)
        for x, y in zip(a.align(left, right).values(), b.align(left, right).values(), strict=True)
    )
    info = (tmp_path / "two" / "config.json").read_text()
    assert '"processes": 2' in info
    # --resume under torchrun continues the run (one more epoch)
    more = list(args)
    more[more.index("--epochs") + 1] = "2"  # one more epoch, every other setting as before
    _run([*TORCHRUN, "2", "-m", "deepalign", *more, "--out", "two", "--resume"], tmp_path)
    assert len((tmp_path / "two" / "metrics.jsonl").read_text().splitlines()) == 2


def test_a_batch_that_does_not_split_is_refused(zoo, tmp_path):
    args = ["train", "--zoo", str(zoo), "--size", "tiny", "--epochs", "1", "--steps", "1"]
    cmd = [*TORCHRUN, "2", "-m", "deepalign", *args, "--batch", "7", "--out", "odd"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode != 0
    assert "does not split evenly over 2 processes" in res.stderr + res.stdout
    assert not (tmp_path / "odd").exists()


def test_zoo_shards_running_at_once_build_the_one_process_zoo(tmp_path):
    """Two array jobs (--shard auto) writing one folder at the same time: the same models and the
    same manifest as a single build."""
    plan = make_plan("mlp-digits", 12, seed=3, hidden=[8, 8], epochs=1, shard_size=3)
    build_zoo(plan, tmp_path / "one")
    cmd = [
        sys.executable,
        "-m",
        "deepalign",
        "zoo",
        "--task",
        "mlp-digits",
        "--n",
        "12",
        "--seed",
        "3",
    ]
    cmd += ["--hidden", "8,8", "--epochs", "1", "--shard-size", "3", "--shard", "auto"]
    cmd += ["--out", str(tmp_path / "two")]
    jobs = [
        subprocess.Popen(
            cmd,
            env={**os.environ, "SLURM_ARRAY_TASK_ID": str(5 + i), "SLURM_ARRAY_TASK_MIN": "5",
                 "SLURM_ARRAY_TASK_COUNT": "2", "OMP_NUM_THREADS": "1"},
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for i in range(2)
    ]  # fmt: skip
    for job in jobs:
        _, err = job.communicate(timeout=300)
        assert job.returncode == 0, err
    one, two = Zoo(tmp_path / "one"), Zoo(tmp_path / "two")
    assert two.complete and len(two) == 12
    a, b = one.load(list(range(12))), two.load(list(range(12)))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert one.rows == two.rows


def test_shard_auto_needs_a_job_array():
    from deepalign.errors import DeepAlignError
    from deepalign.zoo.build import ShardSlice

    assert ShardSlice.parse(
        "auto", {"DEEPALIGN_SHARD_INDEX": "1", "DEEPALIGN_SHARD_COUNT": "3"}
    ) == ShardSlice(1, 3)
    env = {"SLURM_ARRAY_TASK_ID": "4", "SLURM_ARRAY_TASK_MIN": "1", "SLURM_ARRAY_TASK_COUNT": "4"}
    assert ShardSlice.parse("auto", env) == ShardSlice(3, 4)
    with pytest.raises(DeepAlignError, match="no job array"):
        ShardSlice.parse("auto", {})


def test_bench_shards_gathered_give_the_one_process_numbers(zoo, tmp_path):
    from deepalign.bench import run_bench

    kw = dict(pairs=6, methods="identity,wm,sinkhorn,wm+sinkhorn", sinkhorn_steps=3, points=5)
    kw |= dict(trajectory_pairs=3, sinkhorn_chunk=2)
    whole = run_bench(zoo, None, tmp_path / "whole", **kw)
    for i in range(3):
        part = run_bench(zoo, None, tmp_path / "parts", shard=f"{i}/3", **kw)
        assert part["shard"] == [i, 3] and part["pairs"] == [2]
        assert not (tmp_path / "parts" / "bench.json").exists()
    gathered = run_bench(zoo, None, tmp_path / "parts", gather=True, **kw)
    for m, e in whole["methods"].items():
        got = gathered["methods"][m]
        keys = ("a", "b", "pos", "barrier", "auc", "objective", "l2")
        assert [[r[k] for k in keys] for r in e["pairs"]] == [
            [r[k] for k in keys] for r in got["pairs"]
        ]
    for m, curve in whole["sinkhorn_init"].items():
        assert gathered["sinkhorn_init"][m]["barrier_mean"] == curve["barrier_mean"]
    assert (tmp_path / "parts" / "bench.md").is_file()


def test_gather_refuses_missing_shards(zoo, tmp_path):
    from deepalign.bench import run_bench
    from deepalign.errors import DeepAlignError

    kw = dict(pairs=6, methods="identity,wm", points=5, sinkhorn_chunk=2)
    run_bench(zoo, None, tmp_path / "parts", shard="0/3", **kw)
    with pytest.raises(DeepAlignError, match="not finished by every shard"):
        run_bench(zoo, None, tmp_path / "parts", gather=True, **kw)
    assert not (tmp_path / "parts" / "bench.json").exists()
