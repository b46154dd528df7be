"""The end-to-end demo on the embedded default (scikit-learn's digits, nothing downloads).

Three stages in one folder: ``zoo/`` (a zoo of digits MLPs), ``aligner/`` (a CPU-sized Deep-Align
trained on the zoo's train split) and ``bench/`` (every method on held-out test pairs). Each stage
is reused when a previous run finished it: the zoo resumes shard by shard, the aligner resumes from
its last epoch checkpoint (or is skipped when all epochs are done), and the bench is skipped when
its inputs and settings are unchanged. ``demo.json`` records which profile the folder holds, so a
``--quick`` run never mixes with a full one.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from deepalign.bench.report import OUTPUTS
from deepalign.bench.runner import DEFAULT_METHODS, check_out, run_bench
from deepalign.core.io import atomic_write_text
from deepalign.errors import DeepAlignError
from deepalign.nn.sizes import DEFAULT_PROBES, MODEL_SIZES
from deepalign.zoo.build import build_zoo
from deepalign.zoo.loader import Zoo
from deepalign.zoo.plan import make_plan

FORMAT = "deepalign-demo/1"
TASK = "mlp-digits"


@dataclass(frozen=True)
class DemoProfile:
    """Sizes of the three stages. ``full`` targets < 15 minutes on 2 idle CPU cores."""

    name: str
    zoo_n: int
    zoo_hidden: tuple[int, ...] | None  # None: the task default (32, 32, 32)
    zoo_epochs: int | None  # None: the task default (10)
    size: str  # Deep-Align size name: "cpu" or "tiny"
    train_epochs: int
    train_steps: int
    train_batch: int
    pairs: int
    points: int
    sinkhorn_steps: int
    seeds: int = 1
    data_examples: int = 2000
    trajectory_pairs: int = 16
    train_extra: dict[str, Any] = field(default_factory=dict)  # other TrainConfig fields
    seed: int = 0
    probes: int = DEFAULT_PROBES  # probe inputs of the aligner (the digits MLP supports them)


PROFILES = {
    "full": DemoProfile(
        name="full",
        zoo_n=2000,
        zoo_hidden=None,
        zoo_epochs=None,
        size="cpu",
        train_epochs=12,
        train_steps=50,
        train_batch=32,
        pairs=64,
        points=25,
        sinkhorn_steps=100,
    ),
    "quick": DemoProfile(
        name="quick",
        zoo_n=40,
        zoo_hidden=(12, 10),
        zoo_epochs=1,
        size="tiny",
        train_epochs=1,
        train_steps=2,
        train_batch=4,
        pairs=4,
        points=5,
        sinkhorn_steps=5,
        data_examples=500,
        trajectory_pairs=4,
        train_extra={"val_pairs": 4, "val_points": 3, "data_batch": 16},
    ),
}


@dataclass
class DemoHooks:
    """Optional callbacks for progress display (the CLI draws bars with them)."""

    stage: Callable[[str, str], None] | None = None  # (stage name, message)
    zoo: Callable[[float, int], None] | None = None  # (models done, total)
    train: Callable[[int, int, int, int, dict], None] | None = (
        None  # (epoch, epochs, step, steps, means)
    )
    bench: Callable[[dict[str, Any]], None] | None = None  # run_bench events


def _say(hooks: DemoHooks, stage: str, message: str) -> None:
    if hooks.stage is not None:
        hooks.stage(stage, message)


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def _read_stamp(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        stamp = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise DeepAlignError(f"{path}: corrupt demo stamp (delete it to start over)") from None
    if not isinstance(stamp, dict) or stamp.get("format") != FORMAT:
        raise DeepAlignError(f"{path}: not a deepalign demo stamp")
    return stamp


def _train_config(p: DemoProfile):
    from deepalign.training.loop import TrainConfig

    return TrainConfig(
        epochs=p.train_epochs,
        batch=p.train_batch,
        steps_per_epoch=p.train_steps,
        seed=p.seed,
        **p.train_extra,
    )


def aligner_done(folder: Path, epochs: int) -> bool:
    """Whether ``folder`` holds an aligner whose training reached ``epochs`` epochs."""
    from deepalign.training.loop import load_training_state
    from deepalign.training.trainer import STATE_FILE

    if not (folder / "config.json").is_file() or not (folder / "model.safetensors").is_file():
        return False
    state = folder / STATE_FILE
    if not state.is_file():
        return True  # an aligner folder without a training checkpoint: use it as it is
    return int(load_training_state(state)["epoch"]) + 1 >= epochs


def run_demo(
    out: str | os.PathLike = "demo-out",
    quick: bool = False,
    device: str | torch.device = "cpu",
    hooks: DemoHooks | None = None,
) -> dict[str, Any]:
    """Build the digits zoo, train the aligner, run the bench (each reused when already done).

    The aligner's size is the profile's entry of :data:`deepalign.nn.sizes.MODEL_SIZES`, with the
    profile's probe features.
    Returns ``{"out", "profile", "zoo", "aligner", "bench", "outputs", "result", "reused",
    "seconds"}``; ``result`` is the bench result (as in ``bench.json``).
    """
    from deepalign.nn.model import DeepAlignConfig
    from deepalign.training.trainer import train_aligner

    hooks = hooks or DemoHooks()
    profile = PROFILES["quick" if quick else "full"]
    folder = check_out(out)
    stamp_path = folder / "demo.json"
    plan = make_plan(
        TASK, profile.zoo_n, profile.seed, hidden=profile.zoo_hidden, epochs=profile.zoo_epochs
    )
    model = {**MODEL_SIZES[profile.size], "probes": profile.probes}
    settings = json.loads(
        json.dumps({**asdict(profile), "model": model, "zoo_plan": plan.fingerprint})
    )
    stamp = _read_stamp(stamp_path)
    if stamp is not None and stamp.get("settings") != settings:
        raise DeepAlignError(
            f"{folder}: holds a {stamp.get('profile', 'different')} demo with other settings; "
            f"choose another --out for the {profile.name} demo (or delete {folder})"
        )
    dev = torch.device(device)
    stamp = stamp or {"format": FORMAT, "profile": profile.name, "settings": settings}
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(stamp_path, json.dumps(stamp, indent=1))
    start = time.perf_counter()
    reused: dict[str, bool] = {}

    # 1. the zoo (resumes shard by shard)
    zoo_dir = folder / "zoo"
    reused["zoo"] = (zoo_dir / "manifest.json").is_file() and Zoo(zoo_dir).complete
    _say(
        hooks,
        "zoo",
        f"{'reusing' if reused['zoo'] else 'training'} {profile.zoo_n} {TASK} networks in {zoo_dir}",
    )
    build_zoo(
        plan,
        zoo_dir,
        device=dev,
        on_progress=(lambda done: hooks.zoo(done, plan.n)) if hooks.zoo else None,
    )

    # 2. the aligner (resumes from its last epoch)
    al_dir = folder / "aligner"
    cfg = _train_config(profile)
    reused["aligner"] = aligner_done(al_dir, cfg.epochs)
    if reused["aligner"]:
        _say(hooks, "aligner", f"reusing the trained aligner in {al_dir}")
    else:
        _say(
            hooks,
            "aligner",
            f"training Deep-Align ({profile.train_epochs} epochs x {profile.train_steps} steps of "
            f"{profile.train_batch} pairs) into {al_dir}",
        )
        on_step = None
        if hooks.train is not None:
            train_hook = hooks.train

            def on_step(epoch: int, step: int, means: dict) -> None:
                train_hook(epoch, cfg.epochs, step, profile.train_steps, means)

        train_aligner(
            zoo_dir,
            al_dir,
            DeepAlignConfig(**model),
            cfg,
            dev,
            resume=True,
            on_step=on_step,
        )

    # 3. the bench (skipped when nothing it depends on changed)
    bench_dir = folder / "bench"
    fingerprint = hashlib.sha256(
        json.dumps(
            [settings, plan.fingerprint, _file_digest(al_dir / "model.safetensors"), str(dev)]
        ).encode()
    ).hexdigest()[:16]
    have = all((bench_dir / name).is_file() for name in OUTPUTS)
    reused["bench"] = have and stamp.get("bench_fingerprint") == fingerprint
    if reused["bench"]:
        _say(hooks, "bench", f"reusing the bench results in {bench_dir}")
        result = json.loads((bench_dir / "bench.json").read_text())
    else:
        _say(
            hooks,
            "bench",
            f"benchmarking {len(DEFAULT_METHODS)} methods on {profile.pairs} held-out pairs",
        )
        result = run_bench(
            zoo_dir,
            al_dir,
            bench_dir,
            pairs=profile.pairs,
            methods=DEFAULT_METHODS,
            seeds=profile.seeds,
            points=profile.points,
            sinkhorn_steps=profile.sinkhorn_steps,
            device=dev,
            on_progress=hooks.bench,
            seed=profile.seed,
            data_examples=profile.data_examples,
            trajectory_pairs=profile.trajectory_pairs,
        )
        stamp["bench_fingerprint"] = fingerprint
        atomic_write_text(stamp_path, json.dumps(stamp, indent=1))
    return {
        "out": folder,
        "profile": profile.name,
        "zoo": zoo_dir,
        "aligner": al_dir,
        "bench": bench_dir,
        "outputs": [bench_dir / name for name in OUTPUTS],
        "result": result,
        "reused": reused,
        "seconds": time.perf_counter() - start,
    }
