"""Tracing and weight matching on a GPT at GPT-2-small's shape (12 blocks, width 768, 12 heads).

The test suite's ``TinyGPT`` (plain ``nn.Module``, attention written by hand) with 64 positions and a
1,000-token vocabulary (86M parameters): seconds to derive the spec, and to undo a planted
permutation (heads included) with weight matching, medians of ``--repeats`` runs, one thread.

    .venv/bin/python benchmarks/transformer_scale.py --json bench-out/transformer_scale.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

import deepalign as da  # noqa: E402
from deepalign.core import permutation as P  # noqa: E402
from deepalign.solvers import align  # noqa: E402
from transformer_models import TinyGPT  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", default="bench-out/transformer_scale.json")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--depth", type=int, default=12)
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    m = TinyGPT(vocab=1000, dim=768, heads=12, depth=args.depth, context=64).eval()
    x = torch.randint(0, 1000, (2, 64))
    trace_s, wm_s = [], []
    for r in range(args.repeats):
        t0 = time.perf_counter()
        spec = da.spec_from_model(m, x)
        trace_s.append(time.perf_counter() - t0)
        a = m.state_dict()
        planted = P.random_permutation(spec, seed=r)
        t0 = time.perf_counter()
        found, info = align(a, P.apply(spec, planted, a), spec, "wm")
        wm_s.append(time.perf_counter() - t0)
        want = P.invert(planted)
        if not all(torch.equal(found[g], want[g]) for g in spec.groups):
            print("planted permutation NOT recovered", flush=True)
            return 1
    out = {
        "params_millions": sum(p.numel() for p in m.parameters()) / 1e6,
        "groups": len(spec.groups),
        "trace_seconds_median": statistics.median(trace_s),
        "wm_seconds_median": statistics.median(wm_s),
        "wm_sweeps": info["sweeps"],
    }
    print(json.dumps(out, indent=1))
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
