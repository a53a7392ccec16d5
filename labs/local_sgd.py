"""``04 --sync local-sgd --average-every H``: communicate less. Each rank steps its own
replica; every H optimizer steps the replicas' parameters (and floating-point buffers,
batch-norm statistics) are averaged over all ranks. Evaluation sees the average (for
its duration only), as FedAvg evaluates its global model. The first ``--local-sgd-warmup``
steps synchronise every step, as DDP does (post-local SGD: Lin et al., 2020, "Don't Use
Large Mini-Batches, Use Local SGD"). With data split per rank this is federated
averaging (FedAvg): clients = ranks, rounds = averaging periods.

PyTorch's own pieces run it, on gloo and NCCL alike: DDP's ``post_localSGD_hook`` (with
``post_local_gradient_allreduce=False``: after the warm-up, gradients stay local) and
``model_averaging.utils.average_parameters`` (one all-reduce of the flattened parameters)
on ``PeriodicModelAverager``'s schedule. Not the averager itself: it averages only the
parameters that hold a gradient, and the lesson's step sets them to None.

What it all-reduced is counted (``bytes_all_reduced``), and, at each average, how far the
replicas had drifted: each rank's distance to the average, relative to the average's norm.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks.post_localSGD_hook import (
    PostLocalSGDState, post_localSGD_hook)
from torch.distributed.algorithms.model_averaging.utils import average_parameters
from torch.nn.utils import parameters_to_vector

from labs.distributed import run_collective


class EveryStep:
    """--sync every-step (DDP as it is): nothing to do after a step."""

    def after_step(self) -> None:
        pass


class LocalSGD:
    def __init__(self, model, period: int, warmup_steps: int):
        self.module = getattr(model, "module", model)  # the replica inside DDP
        self.hook_state = PostLocalSGDState(process_group=None, subgroup=None,
                                            start_localSGD_iter=warmup_steps,
                                            post_local_gradient_allreduce=False)
        model.register_comm_hook(self.hook_state, post_localSGD_hook)
        self.period, self.warmup_steps = period, warmup_steps
        self.gradient_bytes = sum(p.numel() * p.element_size()
                                  for p in self.module.parameters() if p.requires_grad)
        self.steps = 0
        self.averages = 0
        self.averaged_bytes = 0
        self.divergence: list[torch.Tensor] = []

    def _due(self) -> bool:
        """PeriodicModelAverager's rule: from the end of the warm-up, every H-th step."""
        step = self.steps  # steps before this one
        return step >= self.warmup_steps and (step - self.warmup_steps) % self.period == 0

    @contextlib.contextmanager
    def averaged_for_evaluation(self):
        """The replicas' average while the trainer evaluates (FedAvg evaluates its global
        model, never one client's), then each rank's own replica back: training goes on
        averaging every H steps only."""
        tensors = [*self.module.parameters(), *(b for b in self.module.buffers()
                                                if b.is_floating_point())]
        saved = [t.detach().clone() for t in tensors]
        with torch.no_grad():
            average_parameters(iter(tensors), dist.group.WORLD)
        try:
            yield
        finally:
            with torch.no_grad():
                for tensor, own in zip(tensors, saved):
                    tensor.copy_(own)

    def after_step(self) -> None:
        """After optimizer.step(): every H steps, the replicas averaged."""
        due = self._due()
        self.steps += 1
        if not due:
            return
        params = [p for p in self.module.parameters() if p.requires_grad]
        before = parameters_to_vector(params).detach().clone()
        average_parameters(iter(params), dist.group.WORLD)  # one flat all-reduce, / N
        after = parameters_to_vector(params).detach()
        # kept on the device: read once, when the result is written, not in a timed step
        self.divergence.append((before - after).norm() / after.norm().clamp_min(1e-12))
        buffers = [b for b in self.module.buffers() if b.is_floating_point()]
        for buffer in buffers:  # batch-norm statistics: averaged with the weights
            run_collective(dist.all_reduce, buffer)
            buffer.div_(dist.get_world_size())
        self.averages += 1
        self.averaged_bytes += sum(t.numel() * t.element_size() for t in [*params, *buffers])

    @property
    def bytes_all_reduced(self) -> int:
        """Gradients during the warm-up (every step), then the averages."""
        return min(self.steps, self.warmup_steps) * self.gradient_bytes + self.averaged_bytes

    def summary(self, samples_per_step: int) -> dict:
        return {"average_every": self.period, "warmup_steps": self.warmup_steps,
                "steps": self.steps, "averages": self.averages,
                "bytes_all_reduced": self.bytes_all_reduced,
                "bytes_per_sample": self.bytes_all_reduced / (self.steps * samples_per_step)
                if self.steps else None,
                "divergence": [float(d) for d in self.divergence],
                "method": "torch.distributed.algorithms: post_localSGD_hook "
                          "(post_local_gradient_allreduce=False), average_parameters"}


def setup(model, args, trainer):
    """What runs after each training step: nothing for DDP, the averaging for local SGD
    (its figures kept in the trainer's meter, ``meter.local_sgd``, for the result). The
    warm-up defaults to the learning rate's."""
    if args.sync != "local-sgd":
        return EveryStep()
    warmup = args.local_sgd_warmup if args.local_sgd_warmup is not None \
        else trainer.lr_warmup_steps
    averager = LocalSGD(model, args.average_every, warmup)
    trainer.meter.local_sgd = averager  # its summary goes into the rank's figures
    trainer.evaluation_context = averager.averaged_for_evaluation
    return averager
