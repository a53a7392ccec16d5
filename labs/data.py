"""Where the images come from. Every source is a map-style Dataset, so the scripts pick
the sampler (RandomSampler in 02, DistributedSampler in 04) and the loader is the same.
Under DDP the sampler's shuffle is common to all ranks; each rank's random crops and flips
are its own (``augmentation_seed``).

- synthetic: a fixed pool of random images already on the device; a batch is gathered on
  the device, so there is no input pipeline and no host-to-device copy of images.
- fake: torchvision FakeData (random PIL images) through the standard ImageNet training
  augmentations and a DataLoader with workers and pinned memory: the CPU input pipeline.
- imagefolder / cifar10: local files under --data-dir. Nothing is ever downloaded.
  --dataset-size takes a seeded, class-balanced subset; with --eval an image folder
  without val/ holds a seeded, class-balanced share out of training for validation.
- shapes: coloured geometric shapes computed from --seed (vectorised torch, rendered once
  per process, the same images on every rank, no download). Unlike the random labels of
  synthetic and fake, a model can learn them: accuracy and time to accuracy mean
  something. Details above ``ShapesImages``.

Validation (``build_val_loader``, with --eval): the split's images in a fixed order, never
augmented; under DDP each rank takes its ``ShardSampler`` share, so that every image is
evaluated exactly once over the ranks (DistributedSampler would repeat some to even out
the shards).
"""

from __future__ import annotations

import functools
import math
import os
import sys
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset, Sampler, get_worker_info

from labs import envinfo
from labs.errors import UsageError
from labs.image_check import check_readable
from labs.launcher_env import Ranks, env_int

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SYNTHETIC_POOL_IMAGES = 512  # distinct images kept on the device; indices wrap around


class SyntheticImages(Dataset):
    """`size` samples served from a pool of random images resident on `device`."""

    def __init__(self, size: int, img_size: int, num_classes: int, device: torch.device,
                 seed: int, pool_images: int = SYNTHETIC_POOL_IMAGES):
        self.size = size
        pool = min(size, pool_images)
        generator = torch.Generator(device=device).manual_seed(seed)
        self.images = torch.randn(pool, 3, img_size, img_size, device=device,
                                  generator=generator)
        self.labels = torch.randint(0, num_classes, (pool,), device=device,
                                    generator=generator)

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int):
        index %= len(self.labels)
        return self.images[index], self.labels[index]

    @property
    def pool_bytes(self) -> int:
        """Device memory the pool holds for the whole run (in every measured peak)."""
        return self.images.nbytes + self.labels.nbytes

    def __getitems__(self, indices: list[int]):
        # DataLoader hands a whole batch of indices here: one gather on the device. The
        # index list is the only thing copied; from pinned memory the copy is truly
        # asynchronous (from pageable memory a "non_blocking" copy makes the host wait).
        idx = torch.as_tensor(indices).remainder_(len(self.labels))
        if self.images.is_cuda:
            idx = idx.pin_memory().to(self.images.device, non_blocking=True)
        return self.images[idx], self.labels[idx]


def resident_bytes(dataset: Dataset) -> int:
    """Device memory the data set itself holds: the synthetic pool, 0 for the others."""
    return dataset.pool_bytes if isinstance(dataset, SyntheticImages) else 0


def describe(dataset: Dataset) -> dict:
    """What training draws from, for the result: how many images and, for local files
    (whose labels are real), how many classes they cover. A --dataset-size subset of an
    image folder must cover them all: the first N files in class order would be one."""
    targets = getattr(dataset, "targets", None)  # LocalSplit's; generated data has none
    return {"images": len(dataset),
            "classes": len(set(targets)) if targets is not None else None}


def _already_batched(batch):
    return batch


# --- shapes: a learnable data set computed from the seed ----------------------------------
#
# Random labels (synthetic, fake) measure speed but teach nothing: the loss cannot fall and
# there is no accuracy to compare. `--data shapes` is a small vision task computed from
# --seed alone, so every machine, rank and rerun sees the same images without a download:
# one coloured shape on a noisy, shaded background. The class is the shape's kind (disk,
# square, triangle, plus, ring) and, once there are more classes than kinds, its colour
# family (the hue circle cut into equal arcs). Position, size, rotation, saturation,
# brightness, background and pixel noise vary from image to image, so a model must learn
# shapes, not memorise pixels: ResNet-18 at 32 px needs a few epochs to get most of them
# right. With 10 classes (5 kinds x 2 colour families; chance 10%) a `--preset smoke` run
# (5 epochs of 1,024 images, half a minute on 2 CPU cores) ends around 50-60% top-1: the
# colour family is learnt in the first epoch, the shapes in the next ones.
#
# Cost: about 10,000 images/s at 32 px on one CPU core, rendered once per process; a split
# larger than SHAPES_CACHE_BYTES (e.g. 12,800 images at 224 px) is rendered batch by batch
# in the DataLoader workers instead (about 200 images/s per core at 224 px: watch the data
# wait, or use a smaller --dataset-size, which is then kept in memory).

SHAPE_KINDS = ("disk", "square", "triangle", "plus", "ring")
SHAPES_CACHE_BYTES = 256 * 2**20  # a split up to this size (uint8) is rendered once and kept
SHAPES_MEAN, SHAPES_STD = 0.5, 0.25  # pixels in [0, 1] become about [-2, 2]
SHAPES_SPLITS = {"train": 0, "val": 1}
SHAPES_NOISE_TILES = 64
_RENDER_PIXELS = 2**22  # pixels rendered at once (bounds the temporary memory)


def shapes_stream(seed: int, split: str) -> int:
    """The random stream of one split: 2·seed for training, 2·seed + 1 for validation, so
    no two splits of any seeds ever share a stream (and so never an image)."""
    return 2 * seed + SHAPES_SPLITS[split]


def _hsv_to_rgb(h: torch.Tensor, s: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """(B,) hue, saturation, value in [0, 1] -> (B, 3) RGB in [0, 1]."""
    k = (torch.tensor([5.0, 3.0, 1.0]) + 6 * h[:, None]) % 6
    return v[:, None] * (1 - s[:, None] * torch.clamp(torch.minimum(k, 4 - k), 0, 1))


def _polar(u, v):
    return torch.sqrt(u * u + v * v), torch.atan2(v, u)


def _triangle(u, v):
    r, phi = _polar(u, v)
    third = 2 * math.pi / 3
    return r * torch.cos(torch.remainder(phi, third) - third / 2) - 0.5


# Signed distance (negative inside) of each kind, in the shape's own coordinates (u, v),
# where its outer radius is about 1. In SHAPE_KINDS order.
_DISTANCES = (
    lambda u, v: torch.sqrt(u * u + v * v) - 0.9,                          # disk
    lambda u, v: torch.maximum(u.abs(), v.abs()) - 0.72,                   # square
    _triangle,                                                             # triangle
    lambda u, v: torch.minimum(torch.maximum(u.abs() - 0.28, v.abs() - 0.95),  # plus
                               torch.maximum(v.abs() - 0.28, u.abs() - 0.95)),
    lambda u, v: (torch.sqrt(u * u + v * v) - 0.7).abs() - 0.22,           # ring
)


def _shape_distance(kind: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Each image's signed distance field, for its own kind of shape."""
    distance = torch.empty_like(u)
    for k, field in enumerate(_DISTANCES):
        chosen = kind == k
        if bool(chosen.any()):
            distance[chosen] = field(u[chosen], v[chosen])
    return distance


@functools.lru_cache(maxsize=8)
def _noise_pool(stream: int, img_size: int) -> torch.Tensor:
    """SHAPES_NOISE_TILES fields of pixel noise for one split (triangular, sd about 0.08);
    each image takes one, shifted by its own offsets, so an image still depends only on
    its own parameters."""
    generator = torch.Generator().manual_seed(stream)
    shape = (SHAPES_NOISE_TILES, 3, img_size, img_size)
    return 0.2 * (torch.rand(shape, generator=generator)
                  + torch.rand(shape, generator=generator) - 1)


class ShapesImages(Dataset):
    """`size` images of coloured shapes for one split, a pure function of (seed, split,
    size, img_size, num_classes). Labels are balanced (every class size // num_classes or
    one more times, in a seeded order). A split of up to SHAPES_CACHE_BYTES is rendered
    once per process and kept as uint8; a larger one is rendered batch by batch, with the
    same pixels (an image depends only on its own parameters and its split's noise)."""

    def __init__(self, size: int, img_size: int, num_classes: int, seed: int,
                 split: str = "train"):
        self.size, self.img_size, self.num_classes = size, img_size, num_classes
        self.split = split
        self.stream = shapes_stream(seed, split)
        self.params, self.labels, self.images = _shapes_split(self.stream, size, img_size,
                                                              num_classes)

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int):
        images, labels = self.__getitems__([index])
        return images[0], labels[0]

    def __getitems__(self, indices: list[int]):
        # DataLoader hands a whole batch of indices here: one gather (or one rendering)
        idx = torch.as_tensor(indices, dtype=torch.long)
        return normalize_shapes(self._pixels(idx)), self.labels[idx]

    def _pixels(self, idx: torch.Tensor) -> torch.Tensor:
        if self.images is not None:
            return self.images[idx]
        return render_shapes(self.params[idx], self.labels[idx],
                             _noise_pool(self.stream, self.img_size), self.num_classes)

    def uint8_images(self) -> torch.Tensor:
        """Every image as uint8 (size, 3, H, W), e.g. to look at or compare them."""
        if self.images is not None:
            return self.images
        chunk = _chunk(self.img_size)
        return torch.cat([self._pixels(torch.arange(i, min(i + chunk, self.size)))
                          for i in range(0, self.size, chunk)])


def normalize_shapes(pixels: torch.Tensor) -> torch.Tensor:
    return (pixels.float() / 255 - SHAPES_MEAN) / SHAPES_STD


def _chunk(img_size: int) -> int:
    return max(1, _RENDER_PIXELS // (img_size * img_size))


@functools.lru_cache(maxsize=4)
def _shapes_split(stream: int, size: int, img_size: int, num_classes: int):
    """(parameters, labels, images or None) of one split; cached per process, so that a
    data set built twice (a test, a second loader) is rendered once."""
    generator = torch.Generator().manual_seed(stream)
    labels = (torch.arange(size) % num_classes)[torch.randperm(size, generator=generator)]
    params = torch.rand(size, SHAPES_PARAMS, generator=generator)
    if not shapes_cached(size, img_size):
        return params, labels, None  # rendered batch by batch, when asked for
    noise = _noise_pool(stream, img_size)
    chunk = _chunk(img_size)
    images = torch.cat([render_shapes(params[i:i + chunk], labels[i:i + chunk], noise,
                                      num_classes) for i in range(0, size, chunk)])
    return params, labels, images


SHAPES_PARAMS = 15  # uniforms per image: colours, background, geometry, noise tile


def render_shapes(params: torch.Tensor, labels: torch.Tensor, noise: torch.Tensor,
                  num_classes: int) -> torch.Tensor:
    """Draw one image per row of ``params``: uint8 (B, 3, H, W), H = W = noise's size."""
    n, img_size = labels.shape[0], noise.shape[-1]
    kinds = min(num_classes, len(SHAPE_KINDS))
    families = -(-num_classes // kinds)  # colour families: hue arcs of 1/families each
    kind, family = labels % kinds, labels // kinds
    p = params.unbind(1)
    # the shape's colour: a hue inside its family's arc (the middle 60% of it, so families
    # never touch), saturated and bright; any hue at all when there is one family
    width = 0.6 if families > 1 else 1.0
    hue = torch.remainder((family + (1 - width) / 2 + width * p[0]) / families, 1.0)
    fg = _hsv_to_rgb(hue, 0.6 + 0.4 * p[1], 0.7 + 0.3 * p[2]).view(n, 3, 1, 1)
    # the background: any hue, greyish, darker than every shape, shaded along a direction
    bg = _hsv_to_rgb(p[3], 0.35 * p[4], 0.05 + 0.4 * p[5]).view(n, 3, 1, 1)
    grid = (torch.arange(img_size, dtype=torch.float32) + 0.5) / img_size * 2 - 1
    y, x = grid.view(1, -1, 1), grid.view(1, 1, -1)
    direction = 2 * math.pi * p[6].view(-1, 1, 1)
    shade = 0.15 * (2 * p[7].view(-1, 1, 1) - 1) * (x * torch.cos(direction)
                                                    + y * torch.sin(direction))
    # where: centre, outer radius (a share of the half-width) and rotation
    cx, cy = (0.7 * p[8] - 0.35).view(-1, 1, 1), (0.7 * p[9] - 0.35).view(-1, 1, 1)
    r = (0.45 + 0.35 * p[10]).view(-1, 1, 1)
    angle = 2 * math.pi * p[11].view(-1, 1, 1)
    cos, sin = torch.cos(angle), torch.sin(angle)
    u, v = ((x - cx) * cos + (y - cy) * sin) / r, ((y - cy) * cos - (x - cx) * sin) / r
    # anti-aliased coverage: the signed distance in pixels, clipped to one pixel's width
    alpha = torch.clamp(0.5 - _shape_distance(kind, u, v) * (r * img_size / 2), 0, 1)
    alpha = alpha.unsqueeze(1)
    image = (bg + shade.unsqueeze(1)) * (1 - alpha) + fg * alpha
    # pixel noise: one tile of the split's pool, shifted by the image's own offsets
    tile = (p[12] * noise.shape[0]).long().clamp_(max=noise.shape[0] - 1)
    rows = (torch.arange(img_size) + (p[13] * img_size).long().view(-1, 1)) % img_size
    cols = (torch.arange(img_size) + (p[14] * img_size).long().view(-1, 1)) % img_size
    image += noise[tile.view(-1, 1, 1, 1), torch.arange(3).view(1, 3, 1, 1),
                   rows.view(n, 1, -1, 1), cols.view(n, 1, 1, -1)]
    return torch.round(torch.clamp(image, 0, 1) * 255).to(torch.uint8)


def train_transforms(img_size: int):
    from torchvision import transforms as T

    return Augment(T.Compose([
        T.RandomResizedCrop(img_size),
        T.RandomHorizontalFlip(),
        T.ToTensor(),
        T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ]))


def augmentation_seed(dataset: Dataset, seed: int, rank: int = 0) -> int | None:
    """The seed of one rank's random crops and flips: --seed on rank 0 (02, 03 and rank 0
    of 04 draw alike), another on every other rank; None for data without them (synthetic,
    shapes: the same images on every rank). The sampler's shuffle and the model's initial
    weights stay on --seed on every rank."""
    if not isinstance(getattr(dataset, "transform", None), Augment):
        return None
    # torch seeds a CPU stream from the low 32 bits only (rank·2**32 would change nothing);
    # seed + rank gives rank 1 of seed 0 the crops of rank 0 of seed 1. An odd step (2**32 /
    # golden ratio) parts a run's ranks, and every pair of seed < 10**6 and rank < 1024.
    return (seed + rank * 0x9E3779B9) % 2**64  # within 64 bits, the most a seed takes


class Augment:
    """The training augmentations. In a DataLoader worker they draw from its global RNG,
    seeded from the loader's generator (a base seed + the worker's number); without
    workers from their own stream (``reseed``), not from the training's global RNG."""

    def __init__(self, transform):
        self.transform, self.state = transform, None

    def reseed(self, seed: int) -> None:
        self.state = torch.Generator().manual_seed(seed).get_state()

    def __call__(self, image):
        if self.state is None or get_worker_info() is not None:
            return self.transform(image)
        outer = torch.get_rng_state()
        torch.set_rng_state(self.state)
        try:
            return self.transform(image)
        finally:
            self.state = torch.get_rng_state()
            torch.set_rng_state(outer)


def eval_transforms(img_size: int):
    """Validation: no augmentation, the ImageNet habit of a centre crop of a resized image."""
    from torchvision import transforms as T

    return T.Compose([
        T.Resize(round(img_size * 256 / 224)),
        T.CenterCrop(img_size),
        T.ToTensor(),
        T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


HOLD_OUT_MAX_SHARE = 0.2  # an image folder without val/ gives at most this share to it


def build_dataset(args, device: torch.device) -> Dataset:
    """The training set for args.data; raises UsageError when local data is missing.

    Local files (imagefolder, cifar10): with --eval and no separate validation images (an
    image folder without val/), a seeded, class-balanced hold-out is kept out of training
    first (``hold_out``); then --dataset-size takes a seeded, class-balanced subset of the
    rest, so a small N still sees every class (the first N files would be one class)."""
    import torchvision

    if args.data == "synthetic":
        return SyntheticImages(args.dataset_size, args.img_size, args.num_classes, device,
                               seed=args.seed)
    if args.data == "fake":
        source = round(args.img_size * 256 / 224)  # ImageNet habit: crop 224 from ~256
        return torchvision.datasets.FakeData(
            size=args.dataset_size, image_size=(3, source, source),
            num_classes=args.num_classes, transform=train_transforms(args.img_size),
            random_offset=args.seed * args.dataset_size)  # seeds never share images
    if args.data == "shapes":
        return ShapesImages(args.dataset_size, args.img_size, args.num_classes, args.seed,
                            split="train")
    if args.data not in ("cifar10", "imagefolder"):  # argparse's choices prevent it
        raise UsageError(f"unknown --data {args.data!r}")
    base = _local_files(args.data, str(args.data_dir), train=True)
    _check_classes(base, args)
    targets = _targets(base)
    candidates, held = range(len(base)), []
    if _held_out_of_training(args):
        held = hold_out(targets, args)
        kept_out = set(held)
        candidates = [i for i in candidates if i not in kept_out]
    chosen = balanced_subset(targets, args.dataset_size, _stream(args.seed, "train"),
                             among=candidates)
    # the held-out validation images too: every bad file of the folder named at once
    _check_files(base, [*chosen, *held], f"--data-dir {args.data_dir}")
    return LocalSplit(base, chosen, train_transforms(args.img_size))


def _check_files(base, indices, where: str) -> None:
    """An image folder's chosen images, checked before training (CIFAR-10's batches
    are checked by torchvision when they load)."""
    samples = getattr(base, "samples", None)
    if samples is not None:
        check_readable([samples[i][0] for i in indices], where)


def _stream(seed: int, split: str) -> int:
    """The seed of the random choices made on local files, per split: 2·seed and
    2·seed + 1, as for shapes, so the training subset and the hold-out never share one."""
    return shapes_stream(seed, split)


def _held_out_of_training(args) -> bool:
    """An image folder without val/ lends its validation images from training."""
    return bool(args.eval) and args.data == "imagefolder" and _val_root(args.data_dir) is None


def hold_out(targets: list[int], args) -> list[int]:
    """The validation images held out of an image folder without val/: --val-size of them,
    at most HOLD_OUT_MAX_SHARE of the folder, class-balanced, chosen with the seed. One
    image of every class always stays for training (a class never trained cannot be
    validated fairly): a class of one image is not validated, and that is said."""
    stream = _stream(args.seed, "val")
    kept = set(balanced_subset(targets, len(set(targets)), stream + 1))  # one per class
    among = [i for i in range(len(targets)) if i not in kept]
    size = min(args.val_size, int(len(targets) * HOLD_OUT_MAX_SHARE), len(among))
    if size < 1:
        raise UsageError(f"--data-dir {args.data_dir}: {len(targets)} image(s) are too few "
                         f"to hold some out for validation; add images or use --no-eval")
    lonely = sorted(set(targets) - {targets[i] for i in among})
    if lonely:
        _note_once(f"note: {len(lonely)} class(es) of --data-dir {args.data_dir} have one "
                   f"image, kept for training, so not validated (class index {lonely[:5]})")
    return balanced_subset(targets, size, stream, among=among)


@functools.lru_cache(maxsize=None)
def _note_once(text: str) -> None:
    """Said once per process (the hold-out is computed for both splits), by rank 0."""
    if os.environ.get("RANK", "0") == "0":
        print(text, file=sys.stderr)


def _val_root(data_dir) -> Path | None:
    root = Path(data_dir)
    return root / "val" if (root / "train").is_dir() and (root / "val").is_dir() else None


@functools.lru_cache(maxsize=4)
def _local_files(kind: str, data_dir: str, train: bool):
    """The files of a local data set, without transforms (scanned once per process: an
    ImageNet folder takes a while); ``LocalSplit`` adds the split's transform."""
    import torchvision

    if kind == "cifar10":
        try:
            return torchvision.datasets.CIFAR10(data_dir, train=train, download=False)
        except RuntimeError:  # torchvision: "Dataset not found or corrupted"
            raise UsageError(f"--data-dir {data_dir}: no CIFAR-10 found (expected the "
                             f"python version, cifar-10-batches-py/, inside; nothing is "
                             f"downloaded)") from None
    root = Path(data_dir)
    if train and (root / "train").is_dir():
        root = root / "train"
    elif not train:
        root = _val_root(data_dir)
    try:
        return torchvision.datasets.ImageFolder(str(root))
    except (FileNotFoundError, RuntimeError) as err:
        raise UsageError(f"--data-dir {data_dir}: not an image folder "
                         f"(one sub-folder of images per class): {err}") from None


def _check_classes(base, args) -> None:
    """A data set a classifier can learn from and the report can score: two classes at
    least, no more than --num-classes, and a training image of every class (a
    --dataset-size below the class count would validate classes never trained)."""
    classes = len(base.classes)
    if classes < 2:
        raise UsageError(f"--data-dir {args.data_dir}: one class ({base.classes[0]!r}); a "
                         f"classifier needs two or more class folders")
    if classes > args.num_classes:
        raise UsageError(f"the data set has {classes} classes but --num-classes is "
                         f"{args.num_classes}")
    if args.dataset_size < classes:
        raise UsageError(f"--dataset-size {args.dataset_size} is fewer than the {classes} "
                         f"classes of --data-dir: every class needs a training image; use "
                         f"--dataset-size {classes} or more")


def _targets(base) -> list[int]:
    return list(base.targets)


class LocalSplit(Dataset):
    """Some images of a local data set (``indices``, in file order) with a transform."""

    def __init__(self, base, indices, transform):
        self.base, self.indices, self.transform = base, list(indices), transform
        self.classes = base.classes

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int):
        i = self.indices[index]
        try:
            image, target = self.base[i]
        except OSError as err:  # damaged after the check: name the file at least
            path = self.base.samples[i][0] if hasattr(self.base, "samples") else i
            raise OSError(f"cannot read image {path}: {err}") from err
        return self.transform(image), target

    @property
    def targets(self) -> list[int]:
        return [self.base.targets[i] for i in self.indices]


def balanced_subset(targets, size: int, seed: int, among=None) -> list[int]:
    """``size`` indices of ``among`` (default: all), as evenly spread over the classes as
    the images allow: every class gets its turn, in a seeded order, and each class's
    images are taken in a seeded order, until ``size`` are chosen. Returned sorted."""
    import numpy as np

    labels = np.asarray(targets)
    pool = np.arange(len(labels)) if among is None else np.asarray(list(among), dtype=int)
    if size >= len(pool):
        return sorted(pool.tolist())
    generator = torch.Generator().manual_seed(seed)
    pool = pool[torch.randperm(len(pool), generator=generator).numpy()]  # seeded order
    classes = np.unique(labels[pool])
    turn = np.empty(classes.max() + 1, dtype=np.int64)
    turn[classes] = torch.randperm(len(classes), generator=generator).numpy()
    # the k-th image (in seeded order) of each class comes in round k, classes in turn
    pool_labels = labels[pool]
    order = np.argsort(pool_labels, kind="stable")
    rank = np.empty(len(pool), dtype=np.int64)
    starts = np.searchsorted(pool_labels[order], pool_labels[order], side="left")
    rank[order] = np.arange(len(pool)) - starts
    key = rank * len(classes) + turn[pool_labels]
    return sorted(pool[np.argsort(key, kind="stable")[:size]].tolist())


# --- validation -------------------------------------------------------------------------

def build_val_dataset(args, device: torch.device) -> Dataset | None:
    """The validation split, or None without --eval. Records how many images it holds in
    ``args.val_size`` (the result's config.val_size). Never augmented.

    - shapes: its own split of --val-size images (a seed stream training never uses);
    - imagefolder: val/ beside train/ when there is one, else the hold-out kept out of
      training (``hold_out``); cifar10: its test batch; class-balanced, capped by
      --val-size, chosen with the seed;
    - synthetic / fake: random images and labels from another seed: accuracy at chance,
      which is what random labels allow."""
    import torchvision

    if not args.eval:
        args.val_size = None
        return None
    if args.data == "shapes":
        dataset = ShapesImages(args.val_size, args.img_size, args.num_classes, args.seed,
                               split="val")
    elif args.data == "synthetic":
        dataset = SyntheticImages(args.val_size, args.img_size, args.num_classes, device,
                                  seed=_stream(args.seed, "val") + 2**32)
    elif args.data == "fake":
        source = round(args.img_size * 256 / 224)
        dataset = torchvision.datasets.FakeData(
            size=args.val_size, image_size=(3, source, source), num_classes=args.num_classes,
            transform=eval_transforms(args.img_size),
            random_offset=2**40 + args.seed * args.val_size)  # never a training image
    elif _held_out_of_training(args):
        base = _local_files(args.data, str(args.data_dir), train=True)
        held = hold_out(_targets(base), args)  # checked with the training images
        dataset = LocalSplit(base, held, eval_transforms(args.img_size))
    else:  # cifar10's test batch, or an image folder's val/
        base = _local_files(args.data, str(args.data_dir), train=False)
        train_base = _local_files(args.data, str(args.data_dir), train=True)
        if base.classes != train_base.classes:
            raise UsageError(f"--data-dir {args.data_dir}: val/ holds other classes than "
                             f"train/ ({len(base.classes)} vs {len(train_base.classes)}); "
                             f"give it the same class folders, or use --no-eval")
        chosen = balanced_subset(_targets(base), args.val_size, _stream(args.seed, "val"))
        _check_files(base, chosen, f"--data-dir {args.data_dir} (validation)")
        dataset = LocalSplit(base, chosen, eval_transforms(args.img_size))
    args.val_size = len(dataset)
    return dataset


class ShardSampler(Sampler):
    """Every index of a data set of ``size`` on exactly one of ``world_size`` ranks: rank r
    takes r, r + world_size, r + 2·world_size, … in order. Shards differ by at most one
    sample. DistributedSampler instead pads the shards to equal length by repeating
    samples, so an evaluation would count some images twice; training can afford that
    (or drop_last), an accuracy cannot."""

    def __init__(self, size: int, rank: int, world_size: int):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside a world of {world_size}")
        self.size, self.rank, self.world_size = size, rank, world_size

    def __iter__(self):
        return iter(range(self.rank, self.size, self.world_size))

    def __len__(self) -> int:
        return len(range(self.rank, self.size, self.world_size))


def build_val_loader(args, device: torch.device, num_workers: int,
                     shard: Ranks | None = None) -> DataLoader | None:
    """The validation loader (None without --eval): batches of --batch-size in a fixed
    order, the last one short (drop_last=False). ``shard`` (DDP: this process's ranks):
    its ShardSampler share, so every image is evaluated once over all ranks."""
    dataset = build_val_dataset(args, device)
    if dataset is None:
        return None
    rank, world_size = (shard.rank, shard.world_size) if shard else (0, 1)
    if len(dataset) < world_size:
        raise UsageError(f"--val-size: {len(dataset)} validation image(s) for {world_size} "
                         f"ranks; every rank needs at least one (raise --val-size)")
    return eval_loader(dataset, args.batch_size, device, num_workers,
                       ShardSampler(len(dataset), rank, world_size))


def eval_loader(dataset: Dataset, batch_size: int, device: torch.device, num_workers: int,
                sampler: Sampler) -> DataLoader:
    batched = isinstance(dataset, (SyntheticImages, ShapesImages))
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=False,
                      num_workers=0 if isinstance(dataset, SyntheticImages) else num_workers,
                      collate_fn=_already_batched if batched else None,
                      pin_memory=device.type == "cuda" and not isinstance(dataset,
                                                                          SyntheticImages),
                      persistent_workers=num_workers > 0 and not batched)


def default_num_workers(args, processes_per_host: int | None = None) -> int:
    """--num-workers when given; none for synthetic data, nor for shapes rendered in
    memory; otherwise from the cores, shared by the processes on this host (04's ranks:
    LOCAL_WORLD_SIZE)."""
    if args.data == "synthetic":
        return 0  # the images are on the device already; workers could not touch them
    if args.num_workers is not None:
        return args.num_workers
    if args.data == "shapes" and shapes_cached(args.dataset_size, args.img_size):
        return 0  # a gather from memory: a worker would only add a copy between processes
    if processes_per_host is None:
        processes_per_host = env_int("LOCAL_WORLD_SIZE", default=1, minimum=1)
    return workers_per_process(envinfo.cpu_count(), processes_per_host)


def shapes_cached(size: int, img_size: int) -> bool:
    """Is a shapes split of this size rendered once and kept (else batch by batch)?"""
    return size * 3 * img_size * img_size <= SHAPES_CACHE_BYTES


def workers_per_process(cores: int, processes: int) -> int:
    """The host's cores shared by the training processes on it, one core left to each
    process itself, at most 8 workers (more rarely help). Step 01 recommends the same."""
    return max(0, min(8, cores // max(1, processes) - 1))


def build_loader(dataset: Dataset, args, sampler: Sampler, device: torch.device,
                 num_workers: int, rank: int = 0) -> DataLoader:
    """The training loader: batches of --batch-size (03: the global batch; 04: each
    rank's), ``sampler`` picks the images, ``rank`` the stream of their random crops and
    flips (``augmentation_seed``), in workers or in this process."""
    batch_size = args.batch_size
    if isinstance(dataset, SyntheticImages):
        return DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=True,
                          num_workers=0, collate_fn=_already_batched)
    if (seed := augmentation_seed(dataset, args.seed, rank)) is not None:
        dataset.transform.reseed(seed)
    return DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, drop_last=True,
        num_workers=num_workers, pin_memory=device.type == "cuda",
        persistent_workers=num_workers > 0,
        collate_fn=_already_batched if isinstance(dataset, ShapesImages) else None,
        generator=torch.Generator().manual_seed(args.seed if seed is None else seed),
    )
