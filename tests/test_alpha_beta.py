"""The alpha-beta model of all-reduce (labs/bandwidth.py): fitted on synthetic sweeps
whose latency and bandwidth are known, and the DDP step it predicts, by its formula."""

from __future__ import annotations

import random

import pytest

from labs import bandwidth

SIZES = [2 ** k for k in range(10, 29, 2)]  # 1 KiB to 256 MiB, as step 01's sweep


def sweep(alpha_s: float, beta_gb_s: float, world_size: int, noise: float = 0.0,
          seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    factor = bandwidth.ring_factor(world_size)
    return [{"size_bytes": s, "time_s": (alpha_s + factor * s / (beta_gb_s * 1e9))
             * (1 + rng.uniform(-noise, noise))} for s in SIZES]


@pytest.mark.parametrize("alpha_s, beta_gb_s, world_size", [
    (20e-6, 150.0, 8),   # NVLink-like: 20 us, 150 GB/s
    (50e-6, 12.0, 2),    # PCIe-like
    (300e-6, 1.5, 2),    # gloo between CPU processes
])
def test_known_latency_and_bandwidth_are_recovered(alpha_s, beta_gb_s, world_size):
    fit = bandwidth.fit_alpha_beta(sweep(alpha_s, beta_gb_s, world_size), world_size)
    assert fit.alpha_s == pytest.approx(alpha_s, rel=1e-6)
    assert fit.beta_gb_s == pytest.approx(beta_gb_s, rel=1e-6)
    assert max(abs(r) for r in fit.residuals) < 1e-9


def test_with_5_percent_noise_the_fit_is_within_a_few_percent():
    for seed in range(5):
        fit = bandwidth.fit_alpha_beta(sweep(30e-6, 40.0, 4, noise=0.05, seed=seed), 4)
        assert fit.alpha_s == pytest.approx(30e-6, rel=0.06)
        assert fit.beta_gb_s == pytest.approx(40.0, rel=0.06)
        assert len(fit.residuals) == len(SIZES) and max(map(abs, fit.residuals)) < 0.12


def test_a_sweep_that_cannot_be_fitted_gives_none():
    one_size = [{"size_bytes": 1024, "time_s": 1e-4}] * 3
    assert bandwidth.fit_alpha_beta(one_size, 2) is None
    assert bandwidth.fit_alpha_beta(sweep(1e-5, 10.0, 2), 1) is None  # one rank: no ring
    junk = [{"size_bytes": "big", "time_s": None}, None, {"size_bytes": -1, "time_s": 1.0}]
    assert bandwidth.fit_alpha_beta(junk, 2) is None


def test_noise_that_makes_latency_negative_gives_a_line_through_zero():
    points = [{"size_bytes": 1000, "time_s": 0.9e-6}, {"size_bytes": 2000, "time_s": 2.0e-6}]
    fit = bandwidth.fit_alpha_beta(points, 2)
    assert fit.alpha_s == 0.0 and fit.beta_gb_s > 0


def test_the_predicted_ddp_step_is_compute_plus_the_exposed_all_reduce():
    fit = bandwidth.AlphaBeta(alpha_s=1e-4, beta_gb_s=10.0, world_size=4, residuals=())
    gradient_bytes, buckets, compute_s = 100e6, 4, 0.200
    all_reduce_s = buckets * 1e-4 + 1.5 * gradient_bytes / 10e9  # 2(4-1)/4 = 1.5
    for hidden in (0.0, 0.25, 1.0):
        predicted = bandwidth.predict_ddp_step_s(compute_s, gradient_bytes, buckets, fit,
                                                 hidden)
        assert predicted == pytest.approx(compute_s + (1 - hidden) * all_reduce_s, rel=1e-12)


def test_a_stalled_point_is_left_out_and_the_fit_survives_it():
    points = sweep(300e-6, 1.5, 2)
    points[0] = {**points[0], "time_s": points[0]["time_s"] * 12}  # another process ran
    fit = bandwidth.fit_alpha_beta(points, 2)
    assert fit.outliers == (SIZES[0],)
    assert fit.alpha_s == pytest.approx(300e-6, rel=1e-6)
    assert fit.beta_gb_s == pytest.approx(1.5, rel=1e-6)
    assert fit.residuals[0] == pytest.approx(11.0, rel=1e-6)  # still reported, against the fit


def test_a_sweep_that_is_mostly_stalls_is_not_trimmed_to_fit():
    points = [{**p, "time_s": p["time_s"] * (10 if i % 2 else 1)}
              for i, p in enumerate(sweep(300e-6, 1.5, 2))]
    fit = bandwidth.fit_alpha_beta(points, 2)
    assert fit.outliers == ()  # half the points cannot be noise: nothing left out
    assert max(map(abs, fit.residuals)) > 0.5  # and the residuals say the fit is poor


def test_sweeps_by_world_size_reads_old_and_new_files_and_skips_wrong_sums():
    main = {"world_size": 8, "all_correct": True, "results": sweep(2e-5, 150.0, 8)}
    assert list(bandwidth.sweeps_by_world_size(main)) == [8]  # before smaller sizes existed
    smaller = [{"world_size": 2, "results": sweep(2e-5, 150.0, 2), "all_correct": True},
               {"world_size": 4, "results": sweep(2e-5, 150.0, 4), "all_correct": False},
               {"world_size": True, "results": []}, "junk"]
    assert list(bandwidth.sweeps_by_world_size({**main, "smaller_world_sizes": smaller})) \
        == [2, 8]
    assert bandwidth.sweeps_by_world_size({**main, "all_correct": False}) == {}
    assert bandwidth.sweeps_by_world_size(None) == {}
