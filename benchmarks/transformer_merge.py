"""Merging independently trained transformers: barriers of the straight path per alignment method.

Pairs of user-style transformers (the test suite's ``tests/transformer_models.py``, plain
``nn.Module`` classes) trained from different seeds on this machine's data:

- ``vit``: ``TinyViT`` (torch's ``nn.TransformerEncoderLayer``, pre-norm, 2 layers, width 32,
  4 heads, 4x4 patches of the 8x8 digits, pixels in [0, 1]);
- ``gpt``: ``TinyGPT`` (attention written by hand: fused qkv, explicit causal softmax; 2 blocks,
  width 32, 4 heads, tied embeddings) on the characters of the GNU licences Debian ships in
  ``/usr/share/common-licenses`` (else Python's ``argparse`` source), 32-character windows,
  the last 10% of the text held out.

For each pair: the loss along ``(1 - lam) A + lam P(B)`` on held-out data at 11 values of lam,
barrier = max over lam of the loss above the chord. Methods: ``identity`` (plain averaging),
``wm``, ``am`` (training data), ``am-streams`` (``am`` with ``streams=True``: the residual stream
read at every op), ``sinkhorn`` (task loss, 200 steps), ``wm+sinkhorn``.

    .venv/bin/python benchmarks/transformer_merge.py --json bench-out/transformer_merge.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

import deepalign as da  # noqa: E402
from deepalign.data import load  # noqa: E402
from deepalign.lmc.curves import lmc_curve  # noqa: E402
from deepalign.solvers import align  # noqa: E402
from transformer_models import TinyGPT, TinyViT  # noqa: E402

METHODS = ("identity", "wm", "am", "am-streams", "sinkhorn", "wm+sinkhorn")
CONTEXT = 32


def _text() -> str:
    folder = Path("/usr/share/common-licenses")
    names = ("GPL-3", "GFDL-1.3", "Apache-2.0", "LGPL-3", "MPL-2.0")
    parts = [(folder / n).read_text() for n in names if (folder / n).is_file()]
    if sum(map(len, parts)) < 20_000:
        import argparse as source

        parts.append(Path(source.__file__).read_text())
    return "".join(parts)


def _windows(ids: torch.Tensor, n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    start = torch.randint(0, len(ids) - CONTEXT - 1, (n,), generator=gen)
    idx = start[:, None] + torch.arange(CONTEXT)
    return ids[idx], ids[idx + 1]


def task(kind: str, seed: int):
    """(model factory, training data, held-out data, example input)."""
    gen = torch.Generator().manual_seed(seed)
    if kind == "vit":
        tr, te = load("digits", "train", normalize=False), load("digits", "test", normalize=False)
        train = (tr.x.view(-1, 1, 8, 8), tr.y)
        return (lambda: TinyViT(dim=32, heads=4)), train, (te.x.view(-1, 1, 8, 8), te.y)
    text = _text()
    chars = sorted(set(text))
    ids = torch.tensor([chars.index(c) for c in text])
    cut = int(0.9 * len(ids))
    train = _windows(ids[:cut], 4096, gen)
    test = _windows(ids[cut:], 512, gen)

    def make() -> torch.nn.Module:
        return TinyGPT(vocab=len(chars), dim=32, heads=4, depth=2, context=CONTEXT)

    return make, train, test


def fit(model: torch.nn.Module, data, steps: int, seed: int) -> torch.nn.Module:
    x, y = data
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, x.shape[0], (64,), generator=gen)
        out = model(x[idx])
        loss = F.cross_entropy(out.reshape(-1, out.shape[-1]), y[idx].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", default="bench-out/transformer_merge.json")
    ap.add_argument("--kinds", default="vit,gpt")
    ap.add_argument("--pairs", type=int, default=5)
    ap.add_argument("--steps", type=int, default=1500, help="training steps per network")
    ap.add_argument("--quick", action="store_true", help="2 pairs, 300 steps (a smoke run)")
    args = ap.parse_args()
    if args.quick:
        args.pairs, args.steps = 2, 300
    torch.set_num_threads(1)
    results: dict = {"steps": args.steps, "pairs": args.pairs, "kinds": {}}
    for kind in args.kinds.split(","):
        make, train, test = task(kind, 0)
        rows = []
        for pair in range(args.pairs):
            nets = []
            for side in (0, 1):
                torch.manual_seed(1000 * pair + side)
                nets.append(fit(make(), train, args.steps, 1000 * pair + side))
            a, b = nets
            spec = da.spec_from_model(a, train[0][:2])
            sa, sb = a.state_dict(), b.state_dict()
            row = {}
            for method in METHODS:
                opts = {"steps": 200} if "sinkhorn" in method else {}
                if method == "am-streams":
                    opts = {"streams": True}
                name = method.removesuffix("-streams")
                t0 = time.perf_counter()
                perm, _ = align(sa, sb, spec, name, module=a, data=train, seed=pair, **opts)
                seconds = time.perf_counter() - t0
                curve = lmc_curve(a, sa, da.apply(spec, perm, sb), test, points=11)
                row[method] = {
                    "barrier": float(curve["barrier"]),
                    "mid_loss": float(curve["loss"][5]),
                    "ends": [float(curve["loss"][0]), float(curve["loss"][-1])],
                    "mid_accuracy": float(curve["accuracy"][5]),
                    "seconds": seconds,
                }
            rows.append(row)
            print(kind, pair, {m: round(r["barrier"], 3) for m, r in row.items()}, flush=True)
        summary = {
            m: {
                "barrier_mean": statistics.mean(r[m]["barrier"] for r in rows),
                "barrier_std": statistics.pstdev(r[m]["barrier"] for r in rows),
                "mid_accuracy_mean": statistics.mean(r[m]["mid_accuracy"] for r in rows),
                "end_loss_mean": statistics.mean(sum(r[m]["ends"]) / 2 for r in rows),
                "seconds_median": statistics.median(r[m]["seconds"] for r in rows),
            }
            for m in METHODS
        }
        results["kinds"][kind] = {"pairs": rows, "summary": summary}
        for m, s in summary.items():
            print(
                f"{kind} {m:12s} barrier {s['barrier_mean']:.3f} ± {s['barrier_std']:.3f}  "
                f"acc@0.5 {s['mid_accuracy_mean']:.3f}  {s['seconds_median']:.2f} s"
            )
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
