"""Greedy SGD (GSGD) on smooth convex problems: the theory behind SIFT, checked where F* is known exactly.

The SIFT paper (Das et al., ICML 2024, arXiv 2402.07052) proves for smooth convex losses that GSGD (draw R
samples, take one gradient step on the one with the largest approximate loss) reaches a constant factor of the
minimum F* of the average loss F in fewer iterations than SGD on a random sample, if the approximate argmax is
the true one often enough. This script checks it on least squares and L2-regularised logistic regression whose
per-sample losses are heterogeneous (feature scales and noise that vary from sample to sample). Methods:

- sgd: a uniformly random sample of each drawn batch (its first element: the batch is drawn i.i.d.)
- gsgd: the sample with the largest exact loss
- noise s: the largest of loss * exp(s * xi), xi ~ N(0, 1) fresh per sample and step (s -> infinity is sgd)
- proj k: the largest loss of the prediction seen through a random projection to k of the d dimensions,
  (P x).(P w), P fixed per run (k orthonormal rows times sqrt(d / k)): a cheaper score whose error is
  systematic, as an early exit's is; k = d is the exact loss

Every method sees the same batches (the comparison is paired by seed) and runs at the same learning rate: the rate
of a grid, in units of 1/L_max (L_max: the largest per-sample smoothness), at which SGD reaches 2 F* in the fewest
iterations among the rates at which no method diverges. F* is exact: lstsq for least squares, a trust-region
Newton solve for the logistic loss.

With exact losses GSGD is SGD on G(w) = E[max of f(w, x) over a batch of R], which is convex and lies between F
and R F; with a vanishing rate it converges to argmin G, not to argmin F. The script minimises G too, so the
factor GSGD settles at, F(argmin G) / F*, is computed, not only observed.

    python benchmarks/gsgd_convex.py            # both problems, 8 seeds (a few minutes on 2 CPU cores)
    python benchmarks/gsgd_convex.py --quick    # a smoke test of the script, seconds
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import matplotlib

matplotlib.use("Agg")  # files only: no display needed, none opened
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from scipy.optimize import minimize  # noqa: E402
from scipy.special import expit  # noqa: E402

KINDS = ("least_squares", "logistic")
SPREAD = 0.5  # per-sample feature norms and least-squares noise scales: exp(SPREAD * N(0, 1))
NOISE = 0.1  # least squares: the noise scale before its per-sample factor
MARGIN = 100.0  # logistic: P(y = 1 | x) = sigmoid(MARGIN x.w_true), labels flip only near the boundary
L2 = 1e-5  # logistic: so that the minimum exists and F* is small next to F(0) = log 2
BLOWUP = 100.0  # a run diverged if F exceeded BLOWUP F(w_0) or stopped being finite


@dataclass(frozen=True)
class Problem:
    """One data set per seed, stacked: X (S, n, d), y (S, n); every per-sample loss adds lam/2 |w|^2."""

    kind: str
    X: np.ndarray
    y: np.ndarray
    lam: float

    def losses(self, z: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Per-sample data loss of the predictions z (the L2 term is the same for every sample)."""
        if self.kind == "least_squares":
            return 0.5 * (z - y) ** 2
        return np.logaddexp(0.0, -y * z)

    def dlosses(self, z: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Derivative of `losses` in z: the gradient of a sample's loss is dlosses * x + lam * w."""
        return z - y if self.kind == "least_squares" else -y * expit(-y * z)

    def objective(self, w: np.ndarray) -> np.ndarray:
        """F(w) for each seed: w (S, d) -> (S,)."""
        z = np.einsum("snd,sd->sn", self.X, w)
        return self.losses(z, self.y).mean(axis=1) + 0.5 * self.lam * (w * w).sum(axis=1)

    def smoothness(self) -> float:
        """L_max: the largest per-sample smoothness constant over every seed's data."""
        curvature = 1.0 if self.kind == "least_squares" else 0.25
        return float(curvature * (self.X ** 2).sum(axis=2).max() + self.lam)


def make_problem(kind: str, seeds: list[int], n: int, d: int) -> Problem:
    """Synthetic data with heterogeneous per-sample losses (see the constants above), one data set per seed."""
    Xs, ys = [], []
    for seed in seeds:
        rng = np.random.default_rng([seed, KINDS.index(kind)])
        scale = np.exp(SPREAD * rng.standard_normal(n))
        X = scale[:, None] * rng.standard_normal((n, d)) / np.sqrt(d)
        w_true = rng.standard_normal(d)
        if kind == "least_squares":
            y = X @ w_true + NOISE * np.exp(SPREAD * rng.standard_normal(n)) * rng.standard_normal(n)
        else:
            y = np.where(rng.random(n) < expit(MARGIN * X @ w_true), 1.0, -1.0)
        Xs.append(X)
        ys.append(y)
    return Problem(kind, np.stack(Xs), np.stack(ys), 0.0 if kind == "least_squares" else L2)


def minimum(problem: Problem) -> tuple[np.ndarray, np.ndarray]:
    """w* (S, d) and F* (S,), exactly: lstsq, or Newton steps with a trust region to a gradient below 1e-10."""
    ws = []
    for X, y in zip(problem.X, problem.y):
        if problem.kind == "least_squares":
            ws.append(np.linalg.lstsq(X, y, rcond=None)[0])
            continue
        n, d = X.shape

        def fun(w):
            z = X @ w
            return (problem.losses(z, y).mean() + 0.5 * problem.lam * w @ w,
                    X.T @ problem.dlosses(z, y) / n + problem.lam * w)

        def hess(w):
            p = expit(X @ w)
            return (X.T * (p * (1 - p))) @ X / n + problem.lam * np.eye(d)

        done = minimize(fun, np.zeros(d), jac=True, hess=hess, method="trust-exact", options={"gtol": 1e-10})
        assert done.success, done.message
        ws.append(done.x)
    w = np.stack(ws)
    return w, problem.objective(w)


def batch_max_weights(n: int, R: int) -> np.ndarray:
    """P(the sample of rank j in ascending loss order is the largest of R drawn with replacement), j = 1..n."""
    j = np.arange(1, n + 1) / n
    return j ** R - (j - 1 / n) ** R


def gsgd_objective(problem: Problem, w: np.ndarray, R: int) -> np.ndarray:
    """G(w) = E[max of f(w, x) over a batch of R] for each seed: w (S, d) -> (S,)."""
    z = np.einsum("snd,sd->sn", problem.X, w)
    ranked = np.sort(problem.losses(z, problem.y), axis=1)
    return ranked @ batch_max_weights(problem.X.shape[1], R) + 0.5 * problem.lam * (w * w).sum(axis=1)


def gsgd_limit(problem: Problem, w_star: np.ndarray, R: int) -> np.ndarray:
    """argmin G for each seed (S, d): where exact GSGD settles with a vanishing rate (L-BFGS from w*; G is
    convex and differentiable wherever no two losses tie)."""
    weights = batch_max_weights(problem.X.shape[1], R)
    ws = []
    for X, y, w0 in zip(problem.X, problem.y, w_star):

        def fun(w):
            z = X @ w
            f = problem.losses(z, y)
            c = np.empty_like(f)
            c[np.argsort(f)] = weights
            return c @ f + 0.5 * problem.lam * w @ w, X.T @ (c * problem.dlosses(z, y)) + problem.lam * w

        ws.append(minimize(fun, w0, jac=True, method="L-BFGS-B", options={"maxiter": 5000, "ftol": 1e-15,
                                                                            "gtol": 1e-12}).x)
    return np.stack(ws)


@dataclass(frozen=True)
class Method:
    kind: str  # sgd | gsgd | noise | proj
    level: float = 0.0  # noise: s; proj: k

    @property
    def label(self) -> str:
        return self.kind if self.kind in ("sgd", "gsgd") else f"{self.kind} {self.level:g}"


class Runner:
    """Runs methods on one problem: the same batches for every method, one data set (and trajectory) per seed."""

    def __init__(self, problem: Problem, R: int, iters: int, seed: int):
        S, n, _ = problem.X.shape
        self.problem, self.seed = problem, seed
        self.batches = np.random.default_rng([seed, 0]).integers(0, n, size=(iters, S, R), dtype=np.int32)
        self.rows = np.arange(S)[:, None]

    def step(self, method: Method, w: np.ndarray, t: int, lr: float, rng: np.random.Generator,
             P: Optional[np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """One update of every seed's w: returns (new w, the sample picked, the sample of largest exact loss)."""
        p, idx = self.problem, self.batches[t]
        X, y = p.X[self.rows, idx], p.y[self.rows, idx]  # (S, R, d), (S, R)
        z = np.einsum("srd,sd->sr", X, w)
        exact = p.losses(z, y)
        if method.kind == "sgd":
            pick = np.zeros(len(w), dtype=int)
        elif method.kind == "gsgd":
            pick = exact.argmax(axis=1)
        elif method.kind == "noise":
            pick = (exact * np.exp(method.level * rng.standard_normal(exact.shape))).argmax(axis=1)
        else:  # proj: the prediction seen through the projection, (P x).(P w)
            Px, Pw = np.einsum("skd,srd->srk", P, X), np.einsum("skd,sd->sk", P, w)
            pick = p.losses(np.einsum("srk,sk->sr", Px, Pw), y).argmax(axis=1)
        s = np.arange(len(w))
        grad = p.dlosses(z[s, pick], y[s, pick])[:, None] * X[s, pick] + p.lam * w
        return w - lr * grad, idx[s, pick], idx[s, exact.argmax(axis=1)]

    def run(self, method: Method, lr: float, iters: int, every: int, decay: Optional[float] = None
            ) -> tuple[np.ndarray, np.ndarray]:
        """F(w_t) for t = 0, every, 2 every, ... (S, iters // every + 1), and per seed the fraction of steps whose
        picked sample is the one of largest exact loss. decay: rate lr / (1 + t / decay), else constant."""
        p = self.problem
        S, _, d = p.X.shape
        rng = np.random.default_rng([self.seed, 1])
        P = None
        if method.kind == "proj":
            k = int(method.level)
            # k orthonormal rows scaled by sqrt(d / k): E[P^T P] = I, and k = d is the exact loss
            P = np.sqrt(d / k) * np.linalg.qr(rng.standard_normal((S, d, d)))[0][:, :k, :]
        w = np.zeros((S, d))
        curve, agree = [p.objective(w)], np.zeros(S)
        with np.errstate(over="ignore", invalid="ignore"):  # a diverging seed turns inf, then nan: reported
            for t in range(iters):
                w, picked, largest = self.step(method, w, t, lr / (1 + t / decay) if decay else lr, rng, P)
                agree += picked == largest
                if (t + 1) % every == 0:
                    curve.append(p.objective(w))
        return np.stack(curve, axis=1), agree / iters


def iterations_to(ratio: np.ndarray, factor: float, every: int) -> list[Optional[int]]:
    """Per seed, the first evaluated iteration at which F / F* <= factor (None: never within the run)."""
    hits = ratio <= factor
    return [int(row.argmax()) * every if row.any() else None for row in hits]


def diverged(ratio: np.ndarray) -> np.ndarray:
    """Per seed: did F exceed BLOWUP F(w_0), or stop being finite?"""
    with np.errstate(invalid="ignore"):
        return ~np.isfinite(ratio).all(axis=1) | (ratio.max(axis=1) > BLOWUP * ratio[:, 0])


def cell(values: list[Optional[float]], digits: int = 0, empty: str = "not reached") -> str:
    """Median [min, max] of the seeds counted (None and non-finite are not), and how many when not all."""
    got = [v for v in values if v is not None and np.isfinite(v)]
    if not got:
        return f"{empty} (0/{len(values)})"
    text = f"{statistics.median(got):,.{digits}f} [{min(got):,.{digits}f}, {max(got):,.{digits}f}]"
    return text + (f" ({len(got)}/{len(values)})" if len(got) < len(values) else "")


def speedup(sgd: list[Optional[int]], other: list[Optional[int]]) -> list[Optional[float]]:
    """Per seed, SGD's iterations over the method's where both got there (> 1: the method needed fewer)."""
    return [a / b if a is not None and b else None for a, b in zip(sgd, other)]


def median_iterations(hits: list[Optional[int]]) -> float:
    """The median with a seed that never got there counted as infinitely many iterations."""
    return statistics.median(np.inf if v is None else v for v in hits)


def typical_speedup(sgd: list[Optional[int]], other: list[Optional[int]]) -> Optional[float]:
    """The median over seeds of `speedup`, None when no seed has both."""
    pairs = [v for v in speedup(sgd, other) if v is not None]
    return statistics.median(pairs) if pairs else None


def rate_text(c: float) -> str:
    return f"{c:g}/L_max"


@dataclass
class Study:
    """One problem's results: every method at every rate of the grid, and the long runs at a decaying rate."""

    kind: str
    methods: list[Method]
    rates: list[float]
    factors: list[float]
    every: int
    f_star: np.ndarray
    start: np.ndarray  # F(w_0) / F*
    settle: np.ndarray  # F(argmin G) / F*
    bound: np.ndarray  # G(w*) / F*
    L: float
    grid: dict = field(default_factory=dict)  # (label, rate) -> (F / F* curve (S, T), agreement (S,))
    decayed: dict = field(default_factory=dict)  # label -> F / F* curve at the decaying rate

    def hits(self, label: str, rate: float, factor: float) -> list[Optional[int]]:
        return iterations_to(self.grid[label, rate][0], factor, self.every)

    def broke(self, label: str, rate: float) -> np.ndarray:
        return diverged(self.grid[label, rate][0])

    def best_rate(self, label: str, allowed: Callable[[float], bool]) -> float:
        """The allowed rate at which `label` reaches the first factor in the fewest iterations (median over seeds;
        ties: the smaller rate); the smallest rate if none is allowed."""
        rates = [c for c in self.rates if allowed(c)] or self.rates[:1]
        return min(rates, key=lambda c: (median_iterations(self.hits(label, c, self.factors[0])), c))

    @property
    def rate(self) -> float:
        """The common rate: SGD's best among the rates at which no method diverged in any seed."""
        return self.best_rate("sgd", lambda c: not any(self.broke(m.label, c).any() for m in self.methods))

    def own_rate(self, label: str) -> float:
        return self.best_rate(label, lambda c: not self.broke(label, c).any())


def study(kind: str, args, methods: list[Method]) -> Study:
    problem = make_problem(kind, args.seeds, args.n, args.d)
    w_star, f_star = minimum(problem)
    w0 = np.zeros_like(w_star)
    result = Study(kind, methods, args.lr_grid, args.factors, args.every, f_star,
                   start=problem.objective(w0) / f_star,
                   settle=problem.objective(gsgd_limit(problem, w_star, args.R)) / f_star,
                   bound=gsgd_objective(problem, w_star, args.R) / f_star, L=problem.smoothness())
    runner = Runner(problem, args.R, max(args.iters, args.decay_iters), seed=1000)
    for m in methods:
        for c in args.lr_grid:
            ratio, agree = runner.run(m, c / result.L, args.iters, args.every)
            result.grid[m.label, c] = ratio / f_star[:, None], agree
            print(f"  {kind} {m.label:>10} lr {rate_text(c)}: iterations to {args.factors[0]:g} F* "
                  f"{cell(result.hits(m.label, c, args.factors[0]))}", flush=True)
    rate = result.rate
    result.decayed = {m.label: runner.run(m, rate / result.L, args.decay_iters, args.decay_every,
                                          decay=args.decay_iters / 20)[0] / f_star[:, None] for m in methods}
    return result


def tables(r: Study, decay_iters: int) -> list[str]:
    """The comparison at the common rate (and each method at its own best rate), then the whole grid."""
    from common import markdown_table  # imports the app (hydra, transformers): the numerical core does without
    rate, first = r.rate, r.factors[0]
    sgd_own = r.hits("sgd", r.own_rate("sgd"), first)
    rows = []
    for m in r.methods:
        ratio, agree = r.grid[m.label, rate]
        own = r.own_rate(m.label)
        own_hits = r.hits(m.label, own, first)
        tail = ratio[:, -max(1, ratio.shape[1] // 4):].mean(axis=1)
        row = [m.label, cell(list(agree), 3)]
        for f in r.factors:
            hits = r.hits(m.label, rate, f)
            row += [cell(hits), cell(speedup(r.hits("sgd", rate, f), hits), 2, "-")]
        rows.append(row + [f"{rate_text(own)}: {cell(own_hits)}", cell(speedup(sgd_own, own_hits), 2, "-"),
                           cell(list(tail), 2), cell(list(r.decayed[m.label][:, -1]), 3)])
    header = (["method", "P(picked = largest exact loss)"]
              + [x for f in r.factors for x in (f"iterations to {f:g} F*", "x fewer than SGD")]
              + [f"own best rate: iterations to {first:g} F*", "x fewer than SGD at its best",
                 "F/F*, last quarter", f"F/F* after {decay_iters:,} at a decaying rate"])
    grid_rows = []
    for m in r.methods:
        row = [m.label]
        for c in r.rates:
            text = cell(r.hits(m.label, c, first))
            broke = int(r.broke(m.label, c).sum())
            text += f", diverged {broke}/{len(r.f_star)}" if broke else ""
            row.append(f"**{text}**" if c == rate else text)
        grid_rows.append(row)
    return [markdown_table(header, rows), "",
            f"Every rate of the grid: iterations to {first:g} F* at a constant rate (bold: the common rate)", "",
            markdown_table(["method"] + [rate_text(c) for c in r.rates], grid_rows)]


def observed(r: Study) -> str:
    """What the numbers say about the paper's three claims, in sentences computed from them."""
    rate, first = r.rate, r.factors[0]

    def fewer(sgd: list[Optional[int]], other: list[Optional[int]]) -> str:
        x = typical_speedup(sgd, other)
        return "no seed reached it" if x is None else f"{x:.2f}x fewer"

    sgd, gsgd = r.hits("sgd", rate, first), r.hits("gsgd", rate, first)
    sgd_rate, gsgd_rate = r.own_rate("sgd"), r.own_rate("gsgd")
    sgd_own, gsgd_own = r.hits("sgd", sgd_rate, first), r.hits("gsgd", gsgd_rate, first)
    text = [f"**{r.kind.replace('_', ' ')}**: at the common rate {rate_text(rate)}, GSGD reached {first:g} F* in "
            f"{median_iterations(gsgd):,.0f} iterations (median) against SGD's {median_iterations(sgd):,.0f}, "
            f"{fewer(sgd, gsgd)} paired by seed; each at its own best rate ({rate_text(gsgd_rate)} and "
            f"{rate_text(sgd_rate)}), {median_iterations(gsgd_own):,.0f} against {median_iterations(sgd_own):,.0f}, "
            f"{fewer(sgd_own, gsgd_own)}."]
    slower = [c for c in r.rates
              if median_iterations(r.hits("gsgd", c, first)) > median_iterations(r.hits("sgd", c, first))]
    if slower:
        text.append(f"GSGD needed more iterations than SGD at {', '.join(rate_text(c) for c in slower)}.")
    approximations = sorted((m for m in r.methods if m.kind in ("noise", "proj")),
                            key=lambda m: -statistics.median(r.grid[m.label, rate][1]))
    text.append("With approximate losses, by falling agreement P(picked = largest exact loss), iterations "
                "against SGD's at the common rate: "
                + "; ".join(f"{m.label} (P {statistics.median(r.grid[m.label, rate][1]):.2f}) "
                            f"{fewer(sgd, r.hits(m.label, rate, first))}" for m in approximations) + ".")
    broke = [f"{m.label} at {rate_text(c)} ({int(r.broke(m.label, c).sum())}/{len(r.f_star)})"
             for c in r.rates for m in r.methods if r.broke(m.label, c).any() and not r.broke("sgd", c).any()]
    if broke:
        text.append("Diverged where SGD did not (seeds): " + ", ".join(broke) + ".")
    final = {label: statistics.median(curve[:, -1]) for label, curve in r.decayed.items()}
    text.append(f"At a decaying rate SGD ended at {final['sgd']:.3f} F* and GSGD at {final['gsgd']:.3f} F*; exact "
                f"GSGD's limit, F(argmin G), is {statistics.median(r.settle):.3f} F* (median over seeds).")
    return " ".join(text)


def band(ax, x: np.ndarray, excess: np.ndarray, label: str, **style) -> None:
    """Median over seeds as a line, min to max as a shaded band."""
    line, = ax.plot(x, np.median(excess, axis=0), label=label, **style)
    ax.fill_between(x, excess.min(axis=0), excess.max(axis=0), color=line.get_color(), alpha=0.15, linewidth=0)


def colours(methods: list[Method]) -> dict:
    """sgd black, gsgd red; each approximation family a shade that darkens as the approximation worsens."""
    out = {"sgd": "k", "gsgd": "C3"}
    for kind, cmap, worse in (("noise", plt.cm.Blues, 1), ("proj", plt.cm.Greens, -1)):  # more noise, fewer dims
        family = sorted((m for m in methods if m.kind == kind), key=lambda m: worse * m.level)
        for i, m in enumerate(family):
            out[m.label] = cmap(0.4 + 0.55 * i / max(1, len(family) - 1))
    return out


def draw(r: Study, path: Path, decay_every: int) -> None:
    curves = {m.label: r.grid[m.label, r.rate][0] for m in r.methods}
    panels = [(f"noisy exact loss, constant rate {rate_text(r.rate)}", ("sgd", "gsgd", "noise"), curves, r.every),
              (f"random projection, constant rate {rate_text(r.rate)}", ("sgd", "gsgd", "proj"), curves, r.every),
              ("every method, decaying rate (log iterations)", ("sgd", "gsgd", "noise", "proj"), r.decayed,
               decay_every)]
    colour = colours(r.methods)
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.8), sharey=True)
    for ax, (title, kinds, data, every) in zip(axes, panels):
        for m in r.methods:
            if m.kind in kinds:
                ratio = data[m.label]
                band(ax, np.arange(ratio.shape[1]) * every, ratio - 1, m.label, color=colour[m.label],
                     linewidth=2 if m.kind in ("sgd", "gsgd") else 1)
        ax.axhline(r.factors[0] - 1, color="grey", linestyle=":", linewidth=1)
        ax.axhline(float(np.median(r.settle)) - 1, color="C3", linestyle="--", linewidth=1)
        ax.set(yscale="log", xlabel="iteration", title=title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
    axes[2].set_xscale("symlog", linthresh=10 * decay_every)  # the first hundreds of steps and the long tail
    axes[2].set_xlim(left=0)
    # the excess over the minimum on a log scale: the gap between settling at 1.07 F* and at F* stays visible
    axes[0].set_ylabel("F(w_t) / F* - 1  (median; band: min to max over seeds)")
    fig.suptitle(f"{r.kind.replace('_', ' ')}: dotted {r.factors[0]:g} F*; dashed F(argmin G), "
                 "where exact GSGD settles at a vanishing rate")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    from common import command_line, machine, report_path

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--problems", default=",".join(KINDS))
    parser.add_argument("--seeds", default="0,1,2,3,4,5,6,7")
    parser.add_argument("--n", type=int, default=1000, help="samples per data set")
    parser.add_argument("--d", type=int, default=50, help="features")
    parser.add_argument("--R", type=int, default=10, help="samples drawn per iteration (one is trained on)")
    parser.add_argument("--iters", type=int, default=8000, help="iterations at each constant rate")
    parser.add_argument("--every", type=int, default=10, help="iterations between evaluations of F")
    parser.add_argument("--decay-iters", type=int, default=100_000,
                        help="iterations at the decaying rate lr / (1 + t / (decay_iters / 20))")
    parser.add_argument("--factors", default="2,1.25", help="targets, multiples of F* (the first picks the rate)")
    parser.add_argument("--lr-grid", default="1,2,4,8,16,32,64", help="constant rates, in units of 1/L_max")
    parser.add_argument("--noise", default="0.1,0.3,1,3", help="levels s of the noisy exact loss")
    parser.add_argument("--proj", default="49,45,35,20", help="projected dimensions k (at most d)")
    parser.add_argument("--quick", action="store_true", help="2 seeds, 300 samples, short runs: checks the script")
    parser.add_argument("--out", type=Path, help="markdown report (default benchmarks/results/gsgd_convex.md; "
                                                 "with --quick outputs/benchmarks/gsgd_convex-quick.md)")
    args = parser.parse_args()
    args.seeds = [int(s) for s in args.seeds.split(",")]
    args.factors = [float(f) for f in args.factors.split(",")]
    args.lr_grid = [float(c) for c in args.lr_grid.split(",")]
    if args.quick:
        args.seeds, args.n, args.iters, args.decay_iters = args.seeds[:2], 300, 2000, 4000
    args.decay_every = max(1, args.decay_iters // 1000)
    methods = ([Method("sgd"), Method("gsgd")] + [Method("noise", float(s)) for s in args.noise.split(",")]
               + [Method("proj", int(k)) for k in args.proj.split(",")])
    if any(m.level > args.d for m in methods if m.kind == "proj"):
        parser.error(f"--proj {args.proj}: every projected dimension must be at most --d {args.d}")
    out = report_path("gsgd_convex", args.quick, args.out)

    started, load = time.perf_counter(), os.getloadavg()[0]
    results = [study(kind, args, methods) for kind in args.problems.split(",")]
    elapsed = time.perf_counter() - started

    text = [
        "# Greedy SGD on smooth convex problems: the theory behind SIFT", "",
        f"- Command: `{command_line()}` ({elapsed / 60:.1f} min)",
        f"- Machine: {machine()}; load average {load:.1f} at the start",
        f"- Data: {len(args.seeds)} seeds ({', '.join(map(str, args.seeds))}), each its own data set of n = "
        f"{args.n:,} samples in d = {args.d} dimensions and its own batches. Feature norms exp({SPREAD:g} N(0, 1)); "
        f"least squares: y = x.w_true + noise of scale {NOISE:g} exp({SPREAD:g} N(0, 1)), drawn per sample; "
        f"logistic: P(y = 1) = sigmoid({MARGIN:g} x.w_true), L2 weight {L2:g}",
        f"- Each iteration draws R = {args.R} samples with replacement, the same for every method, and takes one "
        f"gradient step on one of them, from w = 0. {args.iters:,} iterations at each constant rate of the grid "
        f"({', '.join(rate_text(c) for c in args.lr_grid)}; L_max: the largest per-sample smoothness, |x|^2 for "
        f"least squares and |x|^2 / 4 + L2 for logistic), F evaluated every {args.every}; then {args.decay_iters:,} "
        f"iterations at lr / (1 + t / {args.decay_iters // 20:,}) from the common rate",
        "- The common rate (every method runs at it): the rate at which SGD reaches "
        f"{args.factors[0]:g} F* in the fewest iterations (median over seeds), among the rates at which no method "
        f"diverged (F above {BLOWUP:g} F(w_0)) in any seed; `own best rate`: the same choice made for each method "
        "on its own runs",
        "- Cells: median [min, max] over seeds; `x fewer than SGD`: SGD's iterations over the method's, paired by "
        "seed; (m/S): how many seeds a cell counts when not all got there",
        "- P(picked = largest exact loss): the fraction of steps, along the method's own run at the common rate, at "
        "which the sample it trained on was the batch's largest exact loss (sgd: about 1/R, by chance)",
        "- F* exact (lstsq; trust-region Newton to a gradient below 1e-10). G(w) = E[max of f(w, x) over a batch of "
        "R] is what exact GSGD descends: F <= G <= R F, so its limit argmin G has F(argmin G) <= G(w*) <= R F*",
        "", "## What we observed", "",
    ]
    text += [observed(r) + "\n" for r in results]
    out.parent.mkdir(parents=True, exist_ok=True)
    for r in results:
        plot = out.parent / f"{out.stem}-{r.kind}.png"
        draw(r, plot, args.decay_every)
        text += [f"## {r.kind.replace('_', ' ')}", "",
                 f"- F(0) / F* = {cell(list(r.start), 1)}; L_max = {r.L:.2f}; common rate {rate_text(r.rate)} "
                 f"= {r.rate / r.L:.4g}",
                 f"- F(argmin G) / F* = {cell(list(r.settle), 3)}; G(w*) / F* = {cell(list(r.bound), 2)} "
                 f"(at most R = {args.R})", "",
                 *tables(r, args.decay_iters), "",
                 f"![F / F* - 1 against iterations, {r.kind}]({plot.name})", ""]
    out.write_text("\n".join(text))
    print("\n".join(text))
    print(f"report: {out}")


if __name__ == "__main__":
    main()
