"""How good could a siamese aligner be? Optimise the trained aligner's neuron embeddings directly.

For 32 validation networks of a zoo and 64 overlapping pairs among them, start from the aligner's
embeddings and minimise the training LMC loss (cross-entropy of ``(1-λ) A + λ P(B)`` at random
λ, ``P`` = Sinkhorn of ``s² cos``) over the embeddings themselves:

- ``network``: one embedding per network, shared by all its pairs (what a siamese aligner can
  output: if this reaches low barriers, the cosine head and siamese structure are not the limit);
- ``pair``: separate embeddings for every pair;
- ``scores``: free score matrices per pair (plain Sinkhorn re-basin from the aligner's scores).

Reports the barrier (test split, 25 λ) of the hard permutations every 50 steps.

    .venv/bin/python benchmarks/embedding_ceiling.py --zoo /work/zoos/mlp-digits --aligner /work/aligners/mlp-digits
"""

from __future__ import annotations

import argparse
import math

import torch
import torch.nn.functional as F

from deepalign.core import permutation as P
from deepalign.core.functional import batched_forward
from deepalign.core.permutation import apply_soft
from deepalign.lmc import lmc_curves
from deepalign.nn import DeepAlign
from deepalign.solvers import linear_assignment, log_sinkhorn
from deepalign.zoo import Zoo


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--zoo", required=True)
    ap.add_argument("--aligner", required=True)
    ap.add_argument("--modes", default="network,pair,scores")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--networks", type=int, default=32)
    ap.add_argument("--pairs", type=int, default=64)
    args = ap.parse_args()
    torch.set_num_threads(1)
    zoo = Zoo(args.zoo)
    spec, module = zoo.spec, zoo.module()
    model = DeepAlign.from_pretrained(args.aligner)
    nets = zoo.indices("val")[: args.networks]
    g0 = torch.Generator().manual_seed(0)
    pairs: list[tuple[int, int]] = []
    while len(pairs) < args.pairs:
        i, j = torch.randint(0, len(nets), (2,), generator=g0).tolist()
        if i != j and (i, j) not in pairs and (j, i) not in pairs:
            pairs.append((i, j))
    ia, ib = torch.tensor([p[0] for p in pairs]), torch.tensor([p[1] for p in pairs])
    W = zoo.load(nets)
    A, B = {k: v[ia] for k, v in W.items()}, {k: v[ib] for k, v in W.items()}
    train, test = zoo.dataset("train"), zoo.dataset("test")
    with torch.no_grad():
        emb = {g: F.normalize(e, dim=-1) for g, e in model.embed(W).items()}
    s2 = float(model.log_scale.detach().mul(2).exp())

    def barrier(q: dict) -> float:
        perm = {g: linear_assignment(v.detach()) for g, v in q.items()}
        curves = lmc_curves(module, A, P.apply(spec, perm, B, batch_dims=1), test, 25)
        return float(torch.as_tensor(curves["barrier"]).mean())

    for mode in args.modes.split(","):
        if mode == "network":
            params = {g: e.clone().requires_grad_() for g, e in emb.items()}
        elif mode == "pair":
            params = {
                **{f"a:{g}": e[ia].clone().requires_grad_() for g, e in emb.items()},
                **{f"b:{g}": e[ib].clone().requires_grad_() for g, e in emb.items()},
            }
        else:
            params = {
                g: (s2 * torch.einsum("bid,bjd->bij", e[ia], e[ib])).requires_grad_()
                for g, e in emb.items()
            }

        def scores(mode: str = mode, params: dict = params) -> dict:
            if mode == "scores":
                return params
            out = {}
            for g in emb:
                ea = params[g][ia] if mode == "network" else params[f"a:{g}"]
                eb = params[g][ib] if mode == "network" else params[f"b:{g}"]
                cos = torch.einsum("bid,bjd->bij", F.normalize(ea, dim=-1), F.normalize(eb, dim=-1))
                out[g] = s2 * cos
            return out

        opt = torch.optim.Adam(params.values(), lr=0.1 if mode == "scores" else 0.01)
        gen = torch.Generator().manual_seed(1)
        n = len(pairs)
        for step in range(args.steps + 1):
            q = scores()
            if step % 50 == 0:
                print(f"{mode:8} step {step:4d}  barrier {barrier(q):.4f}", flush=True)
            if step == args.steps:
                break
            soft = {g: log_sinkhorn(v, 20).exp() for g, v in q.items()}
            moved = apply_soft(spec, soft, B, batch_dims=1)
            lam = torch.rand(n, generator=gen)
            merged = {
                k: torch.lerp(A[k], moved[k], lam.view(-1, *[1] * (A[k].dim() - 1))) for k in A
            }
            idx = torch.randint(0, len(train), (128,), generator=gen)
            out = batched_forward(module, merged, train.x[idx])
            classes = out.shape[-1]
            loss = F.cross_entropy(out.reshape(-1, classes), train.y[idx].repeat(n)) * n
            opt.zero_grad()
            loss.backward()
            opt.step()
    print(f"(cos head scale s^2 = {s2:.1f}; {math.comb(len(nets), 2)} possible pairs, {n} used)")


if __name__ == "__main__":
    main()
