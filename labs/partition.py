"""Each rank's own share of the training set, as federated learning's clients hold theirs.

``--partition iid`` (the default) is DistributedSampler's: every epoch a fresh random
1/N of the images per rank, the same label mix everywhere. ``--partition dirichlet
--dirichlet-alpha A`` gives each rank a fixed, label-skewed shard, drawn the way the
federated-learning literature draws non-IID clients (Hsu et al., 2019, "Measuring the
Effects of Non-Identical Data Distribution"): for every class, the shares of its images
that go to the N ranks are a draw from Dirichlet(A, ..., A). Small A: most of a rank's
images come from a few classes; large A: close to the same mix on every rank.

The shards are disjoint and cover the training set; every rank draws the same shards
from ``--seed`` (no communication), so rank 0 can record every rank's class histogram.
Ranks must take the same number of steps (each step ends in a collective), so an epoch
is ``len(dataset) // N`` images on every rank: a larger shard is sampled without
replacement, a smaller one cycled.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Sampler

from labs.errors import UsageError

DRAWS = 100  # Dirichlet draws tried before a too-small shard is an error


def labels_of(dataset) -> list[int] | None:
    """The class of every training image, or None where labels are random (synthetic and
    fake data: a skew of random labels teaches nothing)."""
    targets = getattr(dataset, "targets", None)  # local image folders, CIFAR-10
    if targets is None and type(dataset).__name__ == "ShapesImages":
        targets = dataset.labels
    if targets is None:
        return None
    return [int(t) for t in (targets.tolist() if torch.is_tensor(targets) else targets)]


def dirichlet_shards(labels: list[int], num_replicas: int, alpha: float, seed: int,
                     min_size: int = 1) -> list[list[int]]:
    """Disjoint index lists, one per rank, covering ``labels``: each class split over the
    ranks in Dirichlet(alpha) shares. Redrawn (seeded) while a shard has fewer than
    ``min_size`` images; UsageError after ``DRAWS`` tries."""
    rng = np.random.default_rng(seed)
    by_class: dict[int, list[int]] = {}
    for index, label in enumerate(labels):
        by_class.setdefault(label, []).append(index)
    for _ in range(DRAWS):
        shards: list[list[int]] = [[] for _ in range(num_replicas)]
        for label in sorted(by_class):
            indices = rng.permutation(by_class[label])
            shares = rng.dirichlet([alpha] * num_replicas)
            cuts = (np.cumsum(shares)[:-1] * len(indices)).round().astype(int)
            for rank, part in enumerate(np.split(indices, cuts)):
                shards[rank].extend(int(i) for i in part)
        if min(map(len, shards)) >= min_size:
            return [sorted(s) for s in shards]
    raise UsageError(f"--dirichlet-alpha {alpha:g}: in {DRAWS} draws some rank always got "
                     f"fewer than {min_size} of the {len(labels)} images (one batch); raise "
                     f"--dirichlet-alpha or --dataset-size")


class DirichletSampler(Sampler):
    """This rank's fixed Dirichlet shard, reshuffled every epoch (``set_epoch``), sized
    ``len(dataset) // num_replicas`` on every rank."""

    def __init__(self, dataset, args, ranks):
        labels = labels_of(dataset)
        if labels is None:
            raise UsageError(f"--partition dirichlet needs labelled images: --data "
                             f"{args.data} has random labels (use --data shapes, "
                             f"imagefolder or cifar10)")
        self.shards = dirichlet_shards(labels, ranks.world_size, args.dirichlet_alpha,
                                       args.seed, min_size=args.batch_size)
        self.shard = self.shards[ranks.rank]
        self.length = len(labels) // ranks.world_size
        self.seed, self.rank, self.epoch = args.seed, ranks.rank, 0
        self.dataset = dataset  # as DistributedSampler keeps it

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.length

    def __iter__(self):
        rng = np.random.default_rng([self.seed, self.rank, self.epoch])
        laps = -(-self.length // len(self.shard))  # a small shard goes round more than once
        order = np.concatenate([rng.permutation(self.shard) for _ in range(laps)])
        return iter(order[:self.length].tolist())


def histograms(sampler, args) -> list | None:
    """Images per class in each rank's share (the first epoch's, under DistributedSampler),
    for the result's ``config.class_histograms``: ``[[count of class 0, ...] per rank]``;
    None for random labels."""
    dataset = sampler.dataset
    labels = labels_of(dataset)
    if labels is None:
        return None
    if isinstance(sampler, DirichletSampler):
        shares = sampler.shards
    else:  # DistributedSampler: the same shuffle on every rank, rank r takes every N-th
        shares = [list(type(sampler)(dataset, num_replicas=sampler.num_replicas, rank=r,
                                     shuffle=True, seed=sampler.seed,
                                     drop_last=sampler.drop_last))
                  for r in range(sampler.num_replicas)]
    return [np.bincount([labels[i] for i in share], minlength=args.num_classes).tolist()
            for share in shares]
