"""benchmarks/gsgd_convex.py at a tiny size: selection, agreement, the exact minima, the claim on least squares."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import gsgd_convex as g  # noqa: E402


@pytest.fixture(scope="module", params=g.KINDS)
def problem(request):
    return g.make_problem(request.param, seeds=[0, 1], n=60, d=6)


def test_gsgd_steps_on_the_largest_exact_loss_and_sgd_on_the_first_draw(problem):
    runner = g.Runner(problem, R=8, iters=1, seed=3)
    w = np.random.default_rng(0).standard_normal((2, 6))
    idx = runner.batches[0]
    rows = np.arange(2)[:, None]
    X, y = problem.X[rows, idx], problem.y[rows, idx]
    losses = problem.losses(np.einsum("srd,sd->sr", X, w), y)
    for method, pick in ((g.Method("gsgd"), losses.argmax(axis=1)), (g.Method("sgd"), np.zeros(2, dtype=int))):
        new, picked, largest = runner.step(method, w, 0, 0.1, np.random.default_rng(0), None)
        x, t = X[[0, 1], pick], y[[0, 1], pick]
        z = (x * w).sum(axis=1)
        dz = z - t if problem.kind == "least_squares" else -t / (1 + np.exp(t * z))
        np.testing.assert_allclose(new, w - 0.1 * (dz[:, None] * x + problem.lam * w))
        np.testing.assert_array_equal(picked, idx[[0, 1], pick])
        np.testing.assert_array_equal(largest, idx[[0, 1], losses.argmax(axis=1)])


def test_agreement_is_one_for_exact_scores_and_falls_with_noise(problem):
    runner = g.Runner(problem, R=8, iters=300, seed=3)
    lr = 1 / problem.smoothness()

    def agreement(method):
        return runner.run(method, lr, 300, every=100)[1].mean()

    assert agreement(g.Method("noise", 0.0)) == 1.0
    assert agreement(g.Method("proj", 6)) == 1.0  # the projection to all d dimensions is a rotation
    levels = [agreement(g.Method("noise", s)) for s in (0.3, 1.0, 10.0)]
    assert 1.0 > levels[0] > levels[1] > levels[2]
    assert abs(agreement(g.Method("sgd")) - 1 / 8) < 0.08  # a random pick matches about 1 time in R


def test_the_minima_are_exact_and_gsgd_objective_lies_between_f_and_r_f(problem):
    w_star, f_star = g.minimum(problem)
    rng = np.random.default_rng(1)
    for _ in range(5):
        assert (problem.objective(w_star + 1e-3 * rng.standard_normal(w_star.shape)) > f_star).all()
    w = rng.standard_normal(w_star.shape)
    G, F = g.gsgd_objective(problem, w, 4), problem.objective(w)
    assert (F <= G).all() and (G <= 4 * F).all()
    w_g = g.gsgd_limit(problem, w_star, 4)
    assert (g.gsgd_objective(problem, w_g, 4) <= g.gsgd_objective(problem, w_star, 4) + 1e-12).all()
    assert (problem.objective(w_g) >= f_star).all()


def test_batch_max_weights_are_the_distribution_of_the_largest_rank():
    weights = g.batch_max_weights(5, 3)
    draws = np.random.default_rng(0).integers(0, 5, size=(200_000, 3)).max(axis=1)
    np.testing.assert_allclose(weights, np.bincount(draws, minlength=5) / len(draws), atol=4e-3)
    assert weights.sum() == pytest.approx(1.0)


def test_gsgd_reaches_twice_the_minimum_sooner_than_sgd_on_least_squares():
    problem = g.make_problem("least_squares", seeds=[0, 1, 2], n=200, d=10)
    _, f_star = g.minimum(problem)
    runner = g.Runner(problem, R=10, iters=3000, seed=0)
    lr = 1 / problem.smoothness()
    hits = {m: g.iterations_to(runner.run(g.Method(m), lr, 3000, every=10)[0] / f_star[:, None], 2.0, 10)
            for m in ("sgd", "gsgd")}
    assert None not in hits["gsgd"]
    assert all(s is None or s > q for s, q in zip(hits["sgd"], hits["gsgd"]))


def test_iterations_to_and_diverged_read_the_curves():
    ratio = np.array([[10.0, 3.0, 1.5, 1.9], [10.0, 5.0, 4.0, 3.0], [10.0, 2e3, np.inf, np.nan]])
    assert g.iterations_to(ratio, 2.0, every=10) == [20, None, None]
    assert g.diverged(ratio).tolist() == [False, False, True]
    assert g.cell([None, 3.0, 5.0, 4.0]) == "4 [3, 5] (3/4)"
