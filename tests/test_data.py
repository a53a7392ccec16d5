"""Where the images come from (labs/data.py): synthetic, fake, imagefolder and cifar10
sources, the DataLoader built around them, and the default number of workers."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch.utils.data import RandomSampler, SequentialSampler

from labs import cli, data
from labs.errors import UsageError

CPU = torch.device("cpu")
IMG = 32


def parse(*argv: str):
    return cli.parse_args("02_baseline", argv=["--preset", "smoke", "--img-size", str(IMG),
                                               *argv])


def first_batches(loader, n: int = 2):
    batches = []
    for images, labels in loader:
        batches.append((images.clone(), labels.clone()))
        if len(batches) == n:
            break
    return batches


def loader_for(args, *, seed_sampler: bool = True, num_workers: int = 0, batch_size: int = 4):
    dataset = data.build_dataset(args, CPU)
    if seed_sampler:  # what 02 does
        sampler = RandomSampler(dataset, generator=torch.Generator().manual_seed(args.seed))
    else:
        sampler = SequentialSampler(dataset)
    args.batch_size = batch_size
    return data.build_loader(dataset, args, sampler, CPU, num_workers)


def assert_batch(images, labels, batch_size: int, num_classes: int):
    assert images.shape == (batch_size, 3, IMG, IMG)
    assert images.dtype == torch.float32
    assert labels.shape == (batch_size,)
    assert labels.dtype == torch.int64
    assert 0 <= int(labels.min()) and int(labels.max()) < num_classes


# --- synthetic -----------------------------------------------------------------------------

def test_synthetic_dataset_shapes_dtypes_and_labels():
    ds = data.SyntheticImages(size=100, img_size=IMG, num_classes=7, device=CPU, seed=0)
    assert len(ds) == 100
    image, label = ds[3]
    assert image.shape == (3, IMG, IMG) and image.dtype == torch.float32
    assert label.dtype == torch.int64
    assert 0 <= int(ds.labels.min()) and int(ds.labels.max()) < 7
    assert len(set(ds.labels.tolist())) > 1  # not one constant class


def test_synthetic_pool_wraps_around():
    ds = data.SyntheticImages(size=20, img_size=IMG, num_classes=5, device=CPU, seed=0,
                              pool_images=8)
    assert len(ds) == 20
    assert ds.images.shape[0] == 8  # only the pool is kept in memory
    assert torch.equal(ds[8][0], ds[0][0]) and torch.equal(ds[19][0], ds[3][0])
    images, labels = ds.__getitems__([0, 8, 17, 1])
    assert torch.equal(images[0], images[1])  # 8 wraps to 0
    assert torch.equal(images[2], ds.images[1])  # 17 wraps to 1
    assert torch.equal(images[3], ds.images[1])
    assert torch.equal(labels, ds.labels[torch.tensor([0, 0, 1, 1])])
    assert not torch.equal(ds.images[0], ds.images[1])


def test_synthetic_pool_is_never_larger_than_the_data_set():
    ds = data.SyntheticImages(size=3, img_size=IMG, num_classes=5, device=CPU, seed=0)
    assert ds.images.shape[0] == 3


def test_synthetic_batches_through_build_loader(monkeypatch):
    def one_by_one(self, index):
        raise AssertionError("the loader fetched images one at a time")

    # A batch is one gather (__getitems__), never batch_size calls of __getitem__.
    monkeypatch.setattr(data.SyntheticImages, "__getitem__", one_by_one)
    args = parse("--num-classes", "10")
    loader = loader_for(args, batch_size=8)
    assert len(loader) == args.dataset_size // 8
    [(images, labels)] = first_batches(loader, 1)
    assert_batch(images, labels, 8, 10)


def test_synthetic_same_seed_same_batches_different_seed_different():
    a = first_batches(loader_for(parse("--seed", "3")))
    b = first_batches(loader_for(parse("--seed", "3")))
    c = first_batches(loader_for(parse("--seed", "4")))
    for (xa, ya), (xb, yb) in zip(a, b):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert not torch.equal(a[0][0], c[0][0])


def test_synthetic_ignores_workers():
    args = parse("--num-workers", "3")
    loader = loader_for(args, num_workers=3)
    assert loader.num_workers == 0  # the pool lives on the device; workers could not reach it


# --- fake (FakeData through the CPU pipeline) --------------------------------------------------

@pytest.mark.parametrize("workers", [0, 1])
def test_fake_data_through_the_loader(workers):
    args = parse("--data", "fake", "--num-classes", "5", "--num-workers", str(workers),
                 "--dataset-size", "16")
    loader = loader_for(args, num_workers=workers)
    assert loader.num_workers == workers
    torch.manual_seed(args.seed)  # as 02 does before building anything
    batches = first_batches(loader)
    for images, labels in batches:
        assert_batch(images, labels, 4, 5)
        # Normalised with the ImageNet mean and std: centred values, some below zero,
        # and not the raw [0, 1] range of ToTensor.
        assert images.min() < 0 < images.max()
        assert images.abs().max() < 10
    torch.manual_seed(args.seed)
    again = first_batches(loader_for(args, num_workers=workers))
    for (x1, y1), (x2, y2) in zip(batches, again):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    del loader


def test_fake_data_with_a_worker_is_seeded_by_the_seed_option():
    # Worker processes seed their augmentations from the loader's generator (--seed),
    # not from whatever the main process's global RNG happens to be.
    args = parse("--data", "fake", "--num-workers", "1", "--dataset-size", "16")
    torch.manual_seed(123)
    a = first_batches(loader_for(args, num_workers=1), 1)
    torch.manual_seed(456)
    b = first_batches(loader_for(args, num_workers=1), 1)
    assert torch.equal(a[0][0], b[0][0])
    other = parse("--data", "fake", "--num-workers", "1", "--dataset-size", "16", "--seed", "9")
    torch.manual_seed(123)
    c = first_batches(loader_for(other, num_workers=1), 1)
    assert not torch.equal(a[0][0], c[0][0])


# --- imagefolder -------------------------------------------------------------------------------

def make_image_folder(root: Path, classes=("cat", "dog"), per_class: int = 3) -> Path:
    for c, name in enumerate(classes):
        folder = root / name
        folder.mkdir(parents=True)
        for i in range(per_class):
            colour = (40 * c + 10 * i, 100, 200 - 30 * i)
            Image.new("RGB", (40 + i, 36), colour).save(folder / f"{i}.png")
    return root


@pytest.mark.parametrize("layout", ["flat", "train-subfolder"])
def test_imagefolder(tmp_path, layout):
    root = tmp_path / "images"
    make_image_folder(root / "train" if layout == "train-subfolder" else root)
    if layout == "train-subfolder":
        make_image_folder(root / "val", classes=("x", "y", "z", "w"), per_class=1)
    # --no-eval: every image trains (with --eval a flat folder lends some to validation)
    args = parse("--data", "imagefolder", "--data-dir", str(root), "--num-classes", "2",
                 "--no-eval")
    dataset = data.build_dataset(args, CPU)
    assert len(dataset) == 6
    assert dataset.classes == ["cat", "dog"]  # train/, not val/ nor the root itself
    args.batch_size = 3
    loader = data.build_loader(dataset, args, SequentialSampler(dataset), CPU, 0)
    batches = first_batches(loader, 2)
    assert len(batches) == 2
    for images, labels in batches:
        assert_batch(images, labels, 3, 2)
    assert batches[0][1].tolist() == [0, 0, 0] and batches[1][1].tolist() == [1, 1, 1]


def test_imagefolder_capped_by_dataset_size(tmp_path):
    root = make_image_folder(tmp_path / "images")
    args = parse("--data", "imagefolder", "--data-dir", str(root), "--dataset-size", "4")
    assert len(data.build_dataset(args, CPU)) == 4


def test_imagefolder_with_more_classes_than_num_classes(tmp_path):
    root = make_image_folder(tmp_path / "images", classes=("a", "b", "c"), per_class=1)
    args = parse("--data", "imagefolder", "--data-dir", str(root), "--num-classes", "2")
    with pytest.raises(UsageError, match="3 classes but --num-classes is 2"):
        data.build_dataset(args, CPU)


def test_imagefolder_without_images_is_a_usage_error(tmp_path):
    (tmp_path / "empty" / "cat").mkdir(parents=True)
    args = parse("--data", "imagefolder", "--data-dir", str(tmp_path / "empty"))
    with pytest.raises(UsageError, match="not an image folder"):
        data.build_dataset(args, CPU)


# --- cifar10 -----------------------------------------------------------------------------------

def test_cifar10_without_files_is_a_usage_error_and_downloads_nothing(tmp_path):
    folder = tmp_path / "cifar"
    folder.mkdir()
    args = parse("--data", "cifar10", "--data-dir", str(folder))
    with pytest.raises(UsageError) as info:
        data.build_dataset(args, CPU)
    message = str(info.value)
    assert "nothing is downloaded" in message
    assert "CIFAR-10" in message
    assert list(folder.iterdir()) == []


# --- default_num_workers -------------------------------------------------------------------------

@pytest.fixture
def cores(monkeypatch):
    def set_cores(n: int):
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(n)), raising=False)
    return set_cores


def test_default_num_workers_synthetic_uses_none(cores):
    cores(16)
    assert data.default_num_workers(parse("--data", "synthetic", "--num-workers", "4")) == 0


def test_default_num_workers_explicit_value_wins(cores):
    cores(16)
    assert data.default_num_workers(parse("--data", "fake", "--num-workers", "3")) == 3
    assert data.default_num_workers(parse("--data", "fake", "--num-workers", "0")) == 0


@pytest.mark.parametrize("n_cores, processes, expected", [
    (16, 1, 8),   # capped at 8
    (4, 1, 3),    # one core left for the training process
    (8, 2, 3),    # cores shared by the processes on the host
    (4, 4, 0),
    (1, 1, 0),    # never negative
])
def test_default_num_workers_from_cores(cores, n_cores, processes, expected):
    cores(n_cores)
    args = parse("--data", "fake")
    args.num_workers = None  # the smoke preset sets 0; the full defaults leave it unset
    assert data.default_num_workers(args, processes_per_host=processes) == expected


# --- shapes: a learnable task computed from the seed ------------------------------------------

def fresh_shapes(*args, **kwargs) -> data.ShapesImages:
    """Rendered anew: the per-process cache would hand back the very same tensors."""
    data._shapes_split.cache_clear()
    data._noise_pool.cache_clear()
    return data.ShapesImages(*args, **kwargs)


def test_shapes_same_seed_same_images_another_seed_other_images():
    a = fresh_shapes(96, IMG, 10, seed=3)
    b = fresh_shapes(96, IMG, 10, seed=3)
    c = fresh_shapes(96, IMG, 10, seed=4)
    assert a.images is not b.images  # really rendered twice
    assert torch.equal(a.uint8_images(), b.uint8_images()) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.uint8_images(), c.uint8_images())
    assert (a.uint8_images() != c.uint8_images()).float().mean() > 0.5  # not a few pixels


def test_shapes_labels_balanced_and_images_normalised():
    ds = fresh_shapes(103, IMG, 10, seed=0)
    counts = torch.bincount(ds.labels, minlength=10)
    assert counts.max() - counts.min() <= 1  # 103 images: three classes get 11
    images, labels = ds.__getitems__([0, 5, 7])
    assert_batch(images, labels, 3, 10)
    assert images.min() < -1 and images.max() > 1  # (x - 0.5) / 0.25 of [0, 1] pixels
    assert not torch.equal(images[0], images[1])


def test_shapes_any_size_and_class_count():
    ds = fresh_shapes(12, 48, 23, seed=1)  # 23 classes: 5 kinds x 5 colour families
    image, label = ds[11]
    assert image.shape == (3, 48, 48) and 0 <= int(label) < 23
    assert int(ds.labels.max()) < 23


def test_shapes_rendered_batch_by_batch_are_the_cached_images(monkeypatch):
    cached = fresh_shapes(40, IMG, 10, seed=2)
    assert cached.images is not None
    monkeypatch.setattr(data, "SHAPES_CACHE_BYTES", 0)  # too large to keep: on the fly
    on_the_fly = fresh_shapes(40, IMG, 10, seed=2)
    assert on_the_fly.images is None
    assert torch.equal(on_the_fly.uint8_images(), cached.images)
    assert torch.equal(on_the_fly.__getitems__([3, 39])[0], cached.__getitems__([3, 39])[0])


def test_shapes_training_and_validation_splits_never_share_a_stream_or_an_image():
    streams = {data.shapes_stream(s, split) for s in range(50) for split in ("train", "val")}
    assert len(streams) == 100  # no two (seed, split) pairs share a random stream
    args = parse("--data", "shapes", "--val-size", "64")
    train_set = data.build_dataset(args, CPU)
    val_set = data.build_val_dataset(args, CPU)
    assert isinstance(train_set, data.ShapesImages) and len(val_set) == 64
    assert args.val_size == 64
    seen = {bytes(image.numpy().tobytes()) for image in train_set.uint8_images()}
    assert not any(bytes(image.numpy().tobytes()) in seen for image in val_set.uint8_images())
    # and the split itself differs, not just the images: another parameter stream
    assert not torch.equal(train_set.params[:64], val_set.params)


def test_shapes_need_no_network(monkeypatch):
    import socket

    def no_network(*args, **kwargs):
        raise AssertionError("--data shapes tried to open a socket")

    monkeypatch.setattr(socket, "socket", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    data._shapes_split.cache_clear()
    data._noise_pool.cache_clear()
    args = parse("--data", "shapes", "--dataset-size", "64", "--val-size", "16")
    loader = loader_for(args, batch_size=8)
    [(images, labels)] = first_batches(loader, 1)
    assert_batch(images, labels, 8, args.num_classes)
    val_loader = data.build_val_loader(args, CPU, num_workers=0)
    assert sum(len(labels) for _, labels in val_loader) == 16


def test_shapes_defaults_evaluation_on_random_labels_off():
    shapes = parse("--data", "shapes")
    assert shapes.eval is True and shapes.target_accuracy == 0.5
    assert (shapes.batch_size, shapes.epochs, shapes.steps_per_epoch) == (32, 5, None)
    synthetic = parse()
    assert synthetic.eval is False and synthetic.target_accuracy is None
    assert synthetic.batch_size == 8  # the smoke preset of random data is unchanged
    assert data.build_val_loader(synthetic, CPU, 0) is None and synthetic.val_size is None
    forced = parse("--data", "shapes", "--no-eval", "--target-accuracy", "0.7")
    assert forced.eval is False and forced.target_accuracy == 0.7


@pytest.mark.parametrize("value", ["0", "1.5", "-0.2", "half"])
def test_target_accuracy_must_be_a_fraction(value):
    with pytest.raises(UsageError, match="--target-accuracy"):
        parse("--data", "shapes", "--target-accuracy", value)


# --- validation shards: every image on exactly one rank -----------------------------------------

@pytest.mark.parametrize("size, world", [(7, 1), (7, 2), (7, 3), (10, 4), (2, 3)])
def test_shard_sampler_gives_every_index_to_exactly_one_rank(size, world):
    shards = [list(data.ShardSampler(size, rank, world)) for rank in range(world)]
    assert sorted(i for shard in shards for i in shard) == list(range(size))
    assert [len(s) for s in shards] == [len(data.ShardSampler(size, r, world))
                                        for r in range(world)]
    assert max(map(len, shards)) - min(map(len, shards)) <= 1


# --- local files: class-balanced subsets and hold-outs --------------------------------------------

def class_counts(dataset) -> list[int]:
    from collections import Counter

    return sorted(Counter(dataset.targets).values())


def test_imagefolder_dataset_size_takes_a_seeded_class_balanced_subset(tmp_path):
    root = make_image_folder(tmp_path / "images", classes=("a", "b", "c"), per_class=8)
    argv = ("--data", "imagefolder", "--data-dir", str(root), "--num-classes", "3",
            "--dataset-size", "6", "--no-eval")
    dataset = data.build_dataset(parse(*argv), CPU)
    assert len(dataset) == 6
    assert class_counts(dataset) == [2, 2, 2]  # the first 6 files would all be class a
    assert data.build_dataset(parse(*argv), CPU).indices == dataset.indices
    other = data.build_dataset(parse(*argv, "--seed", "5"), CPU)
    assert other.indices != dataset.indices and class_counts(other) == [2, 2, 2]
    odd = data.build_dataset(parse(*argv[:-3], "--dataset-size", "7", "--no-eval"), CPU)
    assert class_counts(odd) == [2, 2, 3]


def test_imagefolder_holds_out_a_seeded_class_balanced_validation_split(tmp_path):
    root = make_image_folder(tmp_path / "images", classes=("a", "b", "c"), per_class=10)
    argv = ("--data", "imagefolder", "--data-dir", str(root), "--num-classes", "3",
            "--val-size", "6")
    args = parse(*argv)
    assert args.eval  # on by default for local images
    train_set = data.build_dataset(args, CPU)
    val_set = data.build_val_dataset(args, CPU)
    assert len(val_set) == 6 and args.val_size == 6
    assert class_counts(val_set) == [2, 2, 2]
    assert len(train_set) == 24 and not set(train_set.indices) & set(val_set.indices)
    image, _ = val_set[0]
    assert image.shape == (3, IMG, IMG)
    assert torch.equal(image, val_set[0][0])  # no augmentation: the same tensor every time
    again = data.build_val_dataset(parse(*argv), CPU)
    other = data.build_val_dataset(parse(*argv, "--seed", "3"), CPU)
    assert again.indices == val_set.indices and other.indices != val_set.indices
    # at most a fifth of the folder is held out, whatever --val-size asks
    capped = parse(*argv[:-2])
    assert len(data.build_val_dataset(capped, CPU)) == 6 and capped.val_size == 6


def test_imagefolder_with_val_folder_validates_on_it_and_trains_on_all_of_train(tmp_path):
    root = tmp_path / "images"
    make_image_folder(root / "train", per_class=4)
    make_image_folder(root / "val", per_class=3)
    args = parse("--data", "imagefolder", "--data-dir", str(root), "--num-classes", "2")
    assert len(data.build_dataset(args, CPU)) == 8  # nothing held out of train/
    val_set = data.build_val_dataset(args, CPU)
    assert len(val_set) == 6 and val_set.base.root.endswith("val")
