"""Each DDP rank draws its own random crops and flips, while what the ranks must share
stays shared: the sampler's shuffle (DistributedSampler, seeded with --seed on every rank),
the images themselves, and the global RNG the model's initial weights come from.

Loaders are built in this process the way 04 builds them on each rank (its own data set,
``data.build_loader(..., rank=rank)``), with both ranks handed the same indices: then only
the augmentations can differ. Before issue 20 every rank seeded them with --seed alone, so
a global batch of N·B images got only B distinct crops."""

from __future__ import annotations

import ast

import pytest
import torch
from PIL import Image
from torch.utils.data import Sampler
from torch.utils.data.distributed import DistributedSampler

from conftest import REPO
from labs import cli, data

CPU = torch.device("cpu")
BATCH = 6
INDICES = [5, 0, 11, 3, 8, 2]  # one batch: the same samples on both ranks


def parse(*argv: str):
    return cli.parse_args("04_ddp", argv=["--preset", "smoke", "--img-size", "32",
                                          "--dataset-size", "16", *argv])


class SameIndices(Sampler):
    """A stand-in for a 2-rank sampler that gives every rank the same indices."""

    def __iter__(self):
        return iter(INDICES)

    def __len__(self) -> int:
        return len(INDICES)


def first_batch(args, rank: int, workers: int = 0, global_seed: int | None = None):
    """Rank ``rank``'s first batch, built as 04 builds it in that rank's process."""
    torch.manual_seed(args.seed if global_seed is None else global_seed)  # as 04 does
    dataset = data.build_dataset(args, CPU)  # each rank builds its own
    args.batch_size = BATCH
    loader = data.build_loader(dataset, args, SameIndices(), CPU, workers, rank=rank)
    images, labels = next(iter(loader))
    del loader  # ends a worker now rather than at garbage collection
    return images.clone(), labels.clone()


def image_folder(root):
    for c, name in enumerate(("cat", "dog", "owl")):
        (root / name).mkdir(parents=True)
        for i in range(6):
            colours = [(40 * c + 10 * i + x, 5 * x, 200 - 3 * x) for x in range(40)]
            image = Image.new("RGB", (40, 36))
            image.putdata([colours[x] for _ in range(36) for x in range(40)])  # a gradient
            image.save(root / name / f"{i}.png")
    return root


SOURCES = [("fake", 0), ("fake", 1), ("imagefolder", 0)]


@pytest.mark.parametrize("source, workers", SOURCES)
def test_two_ranks_augment_the_same_images_differently(source, workers, tmp_path):
    argv = ["--data", source, "--num-workers", str(workers)]
    if source == "imagefolder":
        argv += ["--data-dir", str(image_folder(tmp_path)), "--num-classes", "3"]
    args = parse(*argv, "--seed", "7")
    images0, labels0 = first_batch(args, rank=0, workers=workers)
    images1, labels1 = first_batch(args, rank=1, workers=workers)
    assert torch.equal(labels0, labels1)  # the same samples...
    differ = [not torch.equal(a, b) for a, b in zip(images0, images1)]
    assert sum(differ) >= BATCH - 1, differ  # ...cropped and flipped differently
    # The same seed and rank give the same batch again, whatever the global RNG holds
    # (without workers the augmentations have their own stream; workers are seeded by it).
    again0, _ = first_batch(args, rank=0, workers=workers, global_seed=12345)
    assert torch.equal(images0, again0)
    again1, _ = first_batch(args, rank=1, workers=workers, global_seed=678)
    assert torch.equal(images1, again1)
    # and another seed gives other crops
    other, _ = first_batch(parse(*argv, "--seed", "8"), rank=0, workers=workers)
    assert not torch.equal(images0, other)


def test_the_augmentation_seed_rule():
    fake = data.build_dataset(parse("--data", "fake"), CPU)
    assert data.augmentation_seed(fake, 7) == data.augmentation_seed(fake, 7, rank=0) == 7

    def stream(seed: int, rank: int) -> int:
        """What torch makes of the seed: a CPU generator uses its low 32 bits only."""
        return data.augmentation_seed(fake, seed, rank) % 2**32

    assert torch.equal(torch.rand(4, generator=torch.Generator().manual_seed(7)),
                       torch.rand(4, generator=torch.Generator().manual_seed(7 + 2**32)))
    # The ranks of a run never share a stream, nor do two (seed, rank) pairs of small
    # seeds: rank 1 of seed 0 is not rank 0 of seed 1 (as seed + rank would make it).
    pairs = [(seed, rank) for seed in [*range(64), 999_999, 2**31 + 5] for rank in range(1024)]
    assert len({stream(seed, rank) for seed, rank in pairs}) == len(pairs)
    # ... and for seeds below a million and ranks below 1024: two ranks' streams are at
    # least a million apart, farther than two such seeds can be.
    assert min(min(stream(0, d), 2**32 - stream(0, d)) for d in range(1, 1024)) > 10**6
    assert 0 <= data.augmentation_seed(fake, 2**64 - 1, rank=5) < 2**64  # a valid torch seed
    for source in ("synthetic", "shapes"):  # no augmentations: nothing to seed
        assert data.augmentation_seed(data.build_dataset(parse("--data", source), CPU),
                                      7, rank=1) is None


@pytest.mark.parametrize("source", ["synthetic", "shapes"])
def test_sources_without_augmentation_are_the_same_on_every_rank(source):
    args = parse("--data", source)
    images0, labels0 = first_batch(args, rank=0)
    images1, labels1 = first_batch(args, rank=1)
    assert torch.equal(images0, images1) and torch.equal(labels0, labels1)


def test_the_loader_leaves_the_global_rng_alone():
    """torch.manual_seed(args.seed) comes before the loader in 02 and 04, the model after
    it: building the loader and drawing from it (rank 1, no workers, augmentations in this
    process) must not move the global RNG, or the ranks would start from other weights."""
    args = parse("--data", "fake")
    torch.manual_seed(args.seed)
    before = torch.get_rng_state()
    first_batch(args, rank=1)
    assert torch.equal(torch.get_rng_state(), before)


def test_distributed_sampler_shuffles_the_same_on_every_rank():
    """Both ranks cut their shares out of one permutation drawn from --seed and the epoch,
    as DistributedSampler always did; only the augmentations depend on the rank."""
    args = parse("--data", "fake", "--seed", "3")
    dataset = data.build_dataset(args, CPU)
    for epoch in (0, 1):
        shares = []
        for rank in (0, 1):  # as 04 builds it, the world (2 ranks) given explicitly
            sampler = DistributedSampler(dataset, num_replicas=2, rank=rank, shuffle=True,
                                         seed=args.seed, drop_last=True)
            sampler.set_epoch(epoch)
            shares.append(list(sampler))
        order = torch.randperm(len(dataset),
                               generator=torch.Generator().manual_seed(3 + epoch)).tolist()
        assert shares[0] == order[0::2] and shares[1] == order[1::2]
        assert not set(shares[0]) & set(shares[1])


def call_in_04(name: str) -> ast.Call:
    tree = ast.parse((REPO / "04_ddp_training.py").read_text(encoding="utf-8"))
    [call] = [node for node in ast.walk(tree) if isinstance(node, ast.Call)
              and ast.unparse(node.func).split(".")[-1] == name]
    return call


def test_04_seeds_the_sampler_with_the_seed_and_the_loader_with_the_rank():
    """The tests above build what 04 builds; this keeps 04 building it that way."""
    sampler = {k.arg: ast.unparse(k.value) for k in call_in_04("DistributedSampler").keywords}
    assert sampler["seed"] == "args.seed" and sampler["shuffle"] == "True"
    loader = {k.arg: ast.unparse(k.value) for k in call_in_04("build_loader").keywords}
    assert loader["rank"] == "ranks.rank"
