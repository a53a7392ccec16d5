"""Where the images come from. Every source is a map-style Dataset, so the scripts pick
the sampler (RandomSampler in 02, DistributedSampler in 04) and the loader is the same.

- synthetic: a fixed pool of random images already on the device; a batch is gathered on
  the device, so there is no input pipeline and no host-to-device copy of images.
- fake: torchvision FakeData (random PIL images) through the standard ImageNet training
  augmentations and a DataLoader with workers and pinned memory: the CPU input pipeline.
- imagefolder / cifar10: local files under --data-dir. Nothing is ever downloaded.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset, Sampler, Subset

from labs import envinfo
from labs.errors import UsageError

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


def _already_batched(batch):
    return batch


def train_transforms(img_size: int):
    from torchvision import transforms as T

    return T.Compose([
        T.RandomResizedCrop(img_size),
        T.RandomHorizontalFlip(),
        T.ToTensor(),
        T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


def build_dataset(args, device: torch.device) -> Dataset:
    """The training set for args.data; raises UsageError when local data is missing."""
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
    if args.data == "cifar10":
        try:
            dataset = torchvision.datasets.CIFAR10(
                str(args.data_dir), train=True, download=False,
                transform=train_transforms(args.img_size))
        except RuntimeError:  # torchvision: "Dataset not found or corrupted"
            raise UsageError(f"--data-dir {args.data_dir}: no CIFAR-10 found (expected the "
                             f"python version, cifar-10-batches-py/, inside; nothing is "
                             f"downloaded)") from None
        classes = 10
    elif args.data == "imagefolder":
        root = Path(args.data_dir)
        if (root / "train").is_dir():
            root = root / "train"
        try:
            dataset = torchvision.datasets.ImageFolder(
                str(root), transform=train_transforms(args.img_size))
        except (FileNotFoundError, RuntimeError) as err:
            raise UsageError(f"--data-dir {args.data_dir}: not an image folder "
                             f"(one sub-folder of images per class): {err}") from None
        classes = len(dataset.classes)
    else:  # argparse's choices make this unreachable from the command line
        raise UsageError(f"unknown --data {args.data!r}")
    if classes > args.num_classes:
        raise UsageError(f"the data set has {classes} classes but --num-classes is "
                         f"{args.num_classes}")
    if len(dataset) > args.dataset_size:
        dataset = Subset(dataset, range(args.dataset_size))
    return dataset


def default_num_workers(args, processes_per_host: int = 1) -> int:
    """--num-workers when given; none for synthetic data; otherwise from the cores."""
    if args.data == "synthetic":
        return 0  # the images are on the device already; workers could not touch them
    if args.num_workers is not None:
        return args.num_workers
    return workers_per_process(envinfo.cpu_count(), processes_per_host)


def workers_per_process(cores: int, processes: int) -> int:
    """The host's cores shared by the training processes on it, one core left to each
    process itself, at most 8 workers (more rarely help). Step 01 recommends the same."""
    return max(0, min(8, cores // max(1, processes) - 1))


def build_loader(dataset: Dataset, args, sampler: Sampler, device: torch.device,
                 batch_size: int, num_workers: int) -> DataLoader:
    if isinstance(dataset, SyntheticImages):
        return DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=True,
                          num_workers=0, collate_fn=_already_batched)
    return DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, drop_last=True,
        num_workers=num_workers, pin_memory=device.type == "cuda",
        persistent_workers=num_workers > 0,
        generator=torch.Generator().manual_seed(args.seed),
    )
