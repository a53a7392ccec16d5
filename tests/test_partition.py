"""Per-rank data for federated-style training (labs/partition.py): Dirichlet shards are
seeded, disjoint, cover the training set and are as skewed as alpha says; the sampler gives
every rank the same number of images per epoch; random labels are refused."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from labs import partition
from labs.errors import UsageError

CLASSES, PER_CLASS, RANKS = 10, 200, 4
LABELS = [c for c in range(CLASSES) for _ in range(PER_CLASS)]


def top_share(shards, k: int = 2) -> float:
    """Mean over ranks of the share of a rank's images in its k largest classes."""
    shares = []
    for shard in shards:
        counts = np.sort(np.bincount([LABELS[i] for i in shard], minlength=CLASSES))[::-1]
        shares.append(counts[:k].sum() / counts.sum())
    return float(np.mean(shares))


def test_shards_are_seeded_disjoint_and_cover_every_image():
    shards = partition.dirichlet_shards(LABELS, RANKS, alpha=0.5, seed=3)
    assert shards == partition.dirichlet_shards(LABELS, RANKS, alpha=0.5, seed=3)
    assert shards != partition.dirichlet_shards(LABELS, RANKS, alpha=0.5, seed=4)
    every = [i for shard in shards for i in shard]
    assert sorted(every) == list(range(len(LABELS)))  # disjoint and complete


def test_small_alpha_skews_and_large_alpha_is_close_to_iid():
    skewed = np.mean([top_share(partition.dirichlet_shards(LABELS, RANKS, 0.1, seed))
                      for seed in range(5)])
    even = np.mean([top_share(partition.dirichlet_shards(LABELS, RANKS, 100.0, seed))
                    for seed in range(5)])
    assert skewed > 0.7  # a rank's two largest classes: most of its images
    assert even < 0.25  # iid: 2 of 10 classes hold about 20 %
    half = np.mean([top_share(partition.dirichlet_shards(LABELS, RANKS, 0.5, seed))
                    for seed in range(5)])
    assert even < half < skewed  # alpha orders the skew


def test_every_rank_gets_one_batch_or_a_clear_refusal():
    shards = partition.dirichlet_shards(LABELS, RANKS, 0.05, seed=0, min_size=32)
    assert min(map(len, shards)) >= 32
    with pytest.raises(UsageError, match="--dirichlet-alpha 0.01: .* fewer than 500"):
        partition.dirichlet_shards(LABELS[:600], 8, 0.01, seed=0, min_size=500)


def test_the_sampler_gives_every_rank_an_equal_epoch_from_its_own_shard():
    dataset = SimpleNamespace(targets=LABELS)
    args = SimpleNamespace(data="shapes", dirichlet_alpha=0.3, seed=1, batch_size=8,
                           num_classes=CLASSES)
    samplers = [partition.DirichletSampler(dataset, args, SimpleNamespace(rank=r,
                                                                           world_size=RANKS))
                for r in range(RANKS)]
    for rank, sampler in enumerate(samplers):
        epoch0 = list(sampler)
        assert len(epoch0) == len(sampler) == len(LABELS) // RANKS  # same steps on all
        assert set(epoch0) <= set(sampler.shards[rank])  # only its own images
        sampler.set_epoch(1)
        assert list(sampler) != epoch0  # reshuffled every epoch
    histograms = partition.histograms(samplers[0], args)
    assert [sum(h) for h in histograms] == [len(s) for s in samplers[0].shards]
    assert np.sum(histograms, axis=0).tolist() == [PER_CLASS] * CLASSES


def test_random_labels_cannot_be_skewed():
    synthetic = SimpleNamespace(labels=[0, 1])  # not ShapesImages: labels are random
    assert partition.labels_of(synthetic) is None
    args = SimpleNamespace(data="synthetic", dirichlet_alpha=0.5, seed=0, batch_size=2)
    with pytest.raises(UsageError, match="needs labelled images: --data synthetic"):
        partition.DirichletSampler(synthetic, args, SimpleNamespace(rank=0, world_size=2))


# --- 04 end to end: local SGD on label-skewed shards ----------------------------------------

def test_04_local_sgd_on_dirichlet_shards_records_what_it_saved(tmp_path):
    from conftest import read_single_result, run_script

    proc = run_script("04_ddp_training.py", "--nproc", "2", "--preset", "smoke", "--data",
                      "shapes", "--epochs", "1", "--dataset-size", "256", "--batch-size", "16",
                      "--sync", "local-sgd", "--average-every", "4", "--local-sgd-warmup", "2",
                      "--partition", "dirichlet", "--dirichlet-alpha", "0.3",
                      "--results-dir", tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    record = read_single_result(tmp_path)
    config, metrics = record["config"], record["metrics"]
    assert (config["sync"], config["average_every"], config["partition"],
            config["dirichlet_alpha"]) == ("local-sgd", 4, "dirichlet", 0.3)
    histograms = config["class_histograms"]
    assert len(histograms) == 2 and sum(map(sum, histograms)) == 256  # shards cover the set
    local = metrics["local_sgd"]
    steps = config["steps_per_epoch"]  # one epoch: 128 images per rank, 8 steps of 16
    assert local["steps"] == steps and local["warmup_steps"] == 2
    assert local["averages"] == 2  # at steps 2 and 6 (counted from 0)
    assert local["divergence"]["samples"] == 2 * local["averages"]  # each rank, each average
    ddp_bytes = config["gradient_bytes"] / config["per_device_batch_size"]
    assert metrics["comm_bytes_per_sample"] == pytest.approx(local["bytes_per_sample"])
    assert local["bytes_all_reduced"] == pytest.approx(local["bytes_per_sample"] * steps * 16)
    # 2 synced steps and 2 averages (weights and batch-norm statistics) in 8 steps
    assert metrics["comm_bytes_per_sample"] / ddp_bytes == pytest.approx(4 / 8, rel=0.01)
    assert "post_localSGD_hook" in local["method"]


@pytest.mark.parametrize("argv, says", [
    (["--average-every", "4"], "--average-every and --local-sgd-warmup need --sync local-sgd"),
    (["--sync", "local-sgd", "--comm-hook", "fp16"], "drop --comm-hook fp16"),
    (["--partition", "dirichlet", "--data", "synthetic"], "needs labelled images"),
    (["--dirichlet-alpha", "0"], "--dirichlet-alpha"),
])
def test_04_refuses_what_cannot_run_in_one_line(tmp_path, argv, says):
    from conftest import run_script

    proc = run_script("04_ddp_training.py", "--preset", "smoke", *argv,
                      "--results-dir", tmp_path / "r")
    assert proc.returncode == 2, proc.stderr[-1000:]
    (line,) = proc.stderr.strip().splitlines()
    assert says in line
    assert not (tmp_path / "r").exists() or not any((tmp_path / "r").iterdir())
