"""Mini-batch k-means, in this process and on Ray, against scikit-learn's MiniBatchKMeans:
time to one inertia.

    python -m bench.minibatch [--rows 1000000] [--dim 128] [--k 1024] [--epochs 1] [--seeds 3]

Every side runs once per seed s in range(--seeds), on the same data and cores:
scikit-learn's ``MiniBatchKMeans(k, random_state=s, n_init=1).fit`` with its defaults
(batch 1024, early stopping), before Ray starts and after a small untimed warm-up fit;
pseudolabel with seed s for --epochs epochs, sized as ``pseudolabel run --algorithm
minibatch`` would size it here.

What is timed: each side's own work only. scikit-learn's clock starts at the call of
``fit`` (validation, seeding, steps); ours at starting the workers (actor start, Ray
Data's reads, seeding, steps; Ray start-up excluded); in this process (the side
``--backend auto`` runs for data this size) from starting the worker that loads the
rows (the load, seeding, steps). After every step the centroids
are copied with the seconds so far, the clock stopped while copying: a step is kept
once 2% more time has passed than at the last kept one, the last step always.
scikit-learn's final full pass for ``inertia_`` comes after its last step and is not
counted. Snapshots are evaluated afterwards on all rows, outside the clock.

Target: 1.01 x the highest final inertia of all runs, both sides and every seed, the
level every run reaches; a target near the better side's inertia could leave the other
side without a time. A run's time to target is that of the first kept snapshot at or
under it, found by bisection (the full-data inertia of successive snapshots is taken as
decreasing; the inertias evaluated are saved with the results). Reported: times per
seed, per-side medians, and the ratio of the medians. Ours runs twice per seed in a
fresh Ray session: cold (every process starts) and warm (the same fit again, Ray Data's
read workers of the first reused, as on a live cluster).
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import numpy as np
import ray
from sklearn.cluster import MiniBatchKMeans

from bench.common import dataset, inertia, save, size_parser, start_ray
from pseudolabel.ops.kmeans import KMeansParams, fit, init_state
from pseudolabel.pipelines.config import build
from pseudolabel.pipelines.io.plan import ReadSettings, make_plan
from pseudolabel.pipelines.runtime import calls
from pseudolabel.pipelines.runtime.actors import WorkerSpec
from pseudolabel.pipelines.runtime.session import size_pools
from pseudolabel.pipelines.stages.fit import start_workers

SIDES = {
    "sklearn": "scikit-learn",
    "ours_local": "pseudolabel local",
    "ours_cold": "pseudolabel cold",
    "ours_warm": "pseudolabel warm",
}


class Snapshots:
    """Centroids after each step, with the seconds of the fit's own work until then."""

    def __init__(self, growth: float = 1.02):
        self.growth = growth
        self.kept: list[tuple[float, np.ndarray]] = []
        self.steps, self.seconds, self.paused, self.next_at = 0, 0.0, 0.0, 0.0
        self.t0 = time.perf_counter()  # the fit's clock starts here

    def step(self, centroids: np.ndarray) -> None:
        now = time.perf_counter()
        self.steps += 1
        self.seconds = now - self.t0 - self.paused
        if self.seconds >= self.next_at:
            self.kept.append((self.seconds, centroids.copy()))
            self.next_at = self.seconds * self.growth
            self.paused += time.perf_counter() - now  # the copy is not the fit's work

    def finish(self, centroids: np.ndarray) -> None:
        """Keep the final centroids (those of the last step) if that step was not kept."""
        if not self.kept or self.kept[-1][0] != self.seconds:
            self.kept.append((self.seconds, centroids.copy()))


@contextmanager
def sklearn_steps(snaps: Snapshots) -> Iterator[None]:
    """scikit-learn's ``fit`` calls ``_mini_batch_step`` once per step, writing the new
    centroids into ``centers_new``: snapshot them after each call."""
    import sklearn.cluster._kmeans as km

    step = km._mini_batch_step

    def wrapped(*args, **kwargs):
        out = step(*args, **kwargs)
        snaps.step(kwargs["centers_new"])
        return out

    km._mini_batch_step = wrapped
    try:
        yield
    finally:
        km._mini_batch_step = step


def fit_sklearn(x: np.ndarray, k: int, seed: int) -> tuple[Snapshots, float]:
    """Snapshots of one scikit-learn fit, and the wall time of the whole call."""
    t0 = time.perf_counter()
    snaps = Snapshots()
    with sklearn_steps(snaps):
        mbk = MiniBatchKMeans(k, random_state=seed, n_init=1).fit(x)
    wall = time.perf_counter() - t0
    if snaps.steps != mbk.n_steps_:
        raise RuntimeError(f"hooked {snaps.steps} of {mbk.n_steps_} scikit-learn steps")
    snaps.finish(mbk.cluster_centers_)
    return snaps, wall


def fit_ours(config, plan, spec: WorkerSpec, workers: int, params: KMeansParams) -> Snapshots:
    """Snapshots of one fit: the seeded centroids, then one per mini-batch step."""
    snaps = Snapshots()
    data = start_workers(config, plan, ReadSettings(dim=plan.dim), spec, workers)
    try:
        state, _ = init_state(data, params)
        snaps.step(state.centroids)
        fit(data, params, state, on_step=lambda s, i, b: snaps.step(s.centroids))
        snaps.finish(state.centroids)
    finally:
        data.shutdown()
    return snaps


def time_to_target(kept: list, target: float, cost: Callable[[int], float]) -> float:
    """Seconds of the first kept snapshot with inertia ``cost(i)`` <= target, by bisection
    (the last one, the final centroids, is at or under it by the choice of target)."""
    lo, hi = 0, len(kept) - 1
    while lo < hi:
        mid = (lo + hi) // 2
        if cost(mid) <= target:
            hi = mid
        else:
            lo = mid + 1
    return kept[lo][0]


def evaluate(x: np.ndarray, s: Snapshots, final: float, target: float) -> dict:
    """One run's time to target and summary; the inertias evaluated on the way are kept."""
    seen = {len(s.kept) - 1: final}

    def cost(i: int) -> float:
        if i not in seen:
            seen[i] = inertia(x, s.kept[i][1])
        return seen[i]

    return {
        "time_to_target": time_to_target(s.kept, target, cost),
        "fit_seconds": s.seconds,  # own work until the last step
        "steps": s.steps,
        "final_inertia": final,
        "evaluated": sorted((s.kept[i][0], v) for i, v in seen.items()),
    }


def main() -> None:
    p = size_parser(rows=1_000_000, dim=128, k=1024)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--seeds", type=int, default=3)
    a = p.parse_args()
    root, x = dataset(a.rows, a.dim)
    r: dict = {"rows": a.rows, "dim": a.dim, "k": a.k, "cores": os.cpu_count()}
    seeds = range(a.seeds)
    snaps: dict[str, list[Snapshots]] = {side: [] for side in SIDES}

    # scikit-learn first, with no Ray processes on the machine, after a small untimed fit
    # that pays its one-time start-up (thread pools), as Ray start-up is left out of ours.
    MiniBatchKMeans(8, random_state=0, n_init=1).fit(x[:4096])
    r["sklearn_fit_call"] = []  # the whole fit call, final full pass included
    for seed in seeds:
        s, wall = fit_sklearn(x, a.k, seed)
        snaps["sklearn"].append(s)
        r["sklearn_fit_call"].append(wall)

    plan = make_plan(str(root), ReadSettings())
    # In this process, as `--backend auto` runs a job this size (no Ray yet): one worker
    # holds the rows and takes its batches from them; its clock includes the load.
    for seed in seeds:
        config = build(input=str(root), output="unused", k=a.k, algorithm="minibatch", seed=seed)
        spec = WorkerSpec("l2", batch_rows=config.batch_rows, seed=seed, threads=os.cpu_count())
        params = KMeansParams(k=a.k, algorithm="minibatch", iterations=a.epochs, tol=0, seed=seed)
        with calls.in_process():
            snaps["ours_local"].append(fit_ours(config, plan, spec, 1, params))

    r["ray_start"] = []
    for seed in seeds:
        r["ray_start"].append(start_ray(os.cpu_count()))  # a fresh session: cold again
        try:
            config = build(
                input=str(root), output="unused", k=a.k, algorithm="minibatch", seed=seed
            )
            sizing = size_pools(config, ray.cluster_resources())
            spec = WorkerSpec(
                "l2",
                num_cpus=config.cpus_per_worker,
                batch_rows=config.batch_rows,
                threads=sizing.worker_threads,
            )
            params = KMeansParams(
                k=a.k, algorithm="minibatch", iterations=a.epochs, tol=0, seed=seed
            )
            for side in ("ours_cold", "ours_warm"):
                snaps[side].append(fit_ours(config, plan, spec, sizing.workers, params))
        finally:
            ray.shutdown()
    r["ours_workers"], r["ours_batch_rows"] = sizing.workers, config.batch_rows

    # Outside every clock: final inertias, the common target, each run's time to it.
    finals = {side: [inertia(x, s.kept[-1][1]) for s in runs] for side, runs in snaps.items()}
    target = 1.01 * max(max(f) for f in finals.values())
    r["target_inertia"] = target
    r["target_rule"] = "1.01 x the highest final inertia of all runs"
    r["runs"] = {}
    for side, runs in snaps.items():
        r["runs"][side] = []
        for seed, s, final in zip(seeds, runs, finals[side], strict=True):
            r["runs"][side].append({"seed": seed, **evaluate(x, s, final, target)})
        for key in ("time_to_target", "fit_seconds", "final_inertia"):
            r[f"{side}_{key}"] = [run[key] for run in r["runs"][side]]
            r[f"{side}_median_{key}"] = statistics.median(r[f"{side}_{key}"])
        snaps[side] = []  # free the centroids
    median = {side: r[f"{side}_median_time_to_target"] for side in SIDES}
    r["speedup_cold"] = median["sklearn"] / median["ours_cold"]
    r["speedup_warm"] = median["sklearn"] / median["ours_warm"]
    r["speedup_local"] = median["sklearn"] / median["ours_local"]
    r["inertia_ratio"] = r["ours_cold_median_final_inertia"] / r["sklearn_median_final_inertia"]

    print(f"Mini-batch, {a.rows} x {a.dim}, k={a.k}, {r['cores']} cores, seeds 0..{a.seeds - 1}")
    print(f"  target inertia {target:.4e}: {r['target_rule']}")
    print(
        "  time to target, s (per seed; median)  |  own work until the last step  |  final inertia"
    )
    for side, name in SIDES.items():
        per_seed = " ".join(f"{t:.2f}" for t in r[f"{side}_time_to_target"])
        print(
            f"  {name:17s} {per_seed} ; {median[side]:.2f}  |  "
            f"{r[f'{side}_median_fit_seconds']:.2f} s  |  {r[f'{side}_median_final_inertia']:.4e}"
        )
    print(
        f"  median scikit-learn / median pseudolabel, time to target: "
        f"{r['speedup_local']:.2f}x in this process, {r['speedup_cold']:.2f}x cold on Ray, "
        f"{r['speedup_warm']:.2f}x warm; final inertia "
        f"pseudolabel x{r['inertia_ratio']:.4f} of scikit-learn (medians, {a.epochs} epoch(s))"
    )
    print(f"  results: {save('minibatch', r)}")


if __name__ == "__main__":
    main()
