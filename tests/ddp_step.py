"""Run under torchrun (or alone): one training step's gradient on a zoo, saved by rank 0.

python -m torch.distributed.run --standalone --nproc_per_node 2 tests/ddp_step.py ZOO OUT.pt
"""

from __future__ import annotations

import sys

import torch

from deepalign.nn.model import DeepAlign, DeepAlignConfig
from deepalign.nn.sizes import MODEL_SIZES
from deepalign.nn.weight_space import WeightSpaceLayout
from deepalign.training.distributed import setup, teardown
from deepalign.training.loop import TrainConfig, TrainGroup, train_epoch
from deepalign.training.pairs import pair_task
from deepalign.zoo.loader import Zoo


def main(zoo_path: str, out: str) -> None:
    torch.set_num_threads(1)
    device = torch.device("cpu")
    ranks = setup(device)
    zoo = Zoo(zoo_path)
    cfg = TrainConfig(epochs=1, batch=8, steps_per_epoch=1)
    torch.manual_seed(0)
    layout = WeightSpaceLayout.from_config(zoo.config)
    model = DeepAlign(layout, DeepAlignConfig(**MODEL_SIZES["tiny"]))
    task = pair_task(zoo, "train", cfg.data_batch)
    net = torch.nn.parallel.DistributedDataParallel(model) if ranks.active else model

    class Capture:  # the optimizer's place: keep the (averaged) gradient instead of stepping
        param_groups: list[dict] = [{}]

        def zero_grad(self, set_to_none: bool = True) -> None:
            model.zero_grad()

        def step(self) -> None:
            if ranks.main:
                torch.save({n: p.grad.clone() for n, p in model.named_parameters()}, out)

    states = zoo.load(task.indices)
    group = TrainGroup(layout, zoo.module(), states, task)
    train_epoch(model, Capture(), [group], cfg, 0, device, ranks=ranks, net=net)
    teardown(ranks)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
