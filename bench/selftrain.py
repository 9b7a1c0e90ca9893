"""Self-training on a small real dataset: scikit-learn's bundled handwritten digits.

    python -m bench.selftrain

1,797 8x8 images as 64-d vectors (scaled to unit variance), 10 classes. ``pseudolabel
run`` clusters them into k = 10 with balanced labels; NMI and Hungarian-matched accuracy
are reported for the nearest and the balanced labels. ``pseudolabel train --compare``
then trains MLP heads (Ray Train, 2 workers) on the balanced labels, the nearest
labels and random labels; held-out accuracy and a linear probe score each against the
classes, with a probe on the raw vectors for reference.
"""

from __future__ import annotations

import os
import shutil

import numpy as np
from sklearn.datasets import load_digits

from bench.common import OUT, save, start_ray
from pseudolabel.pipelines.commands.run import run
from pseudolabel.pipelines.commands.train import train
from pseudolabel.pipelines.config import TrainConfig, build
from tests.data import write_parquet_shards


def main() -> None:
    digits = load_digits()
    x = digits.data.astype(np.float32)
    x = (x - x.mean(0)) / (x.std(0) + 1e-6)
    work = OUT / "digits"
    shutil.rmtree(work, ignore_errors=True)
    write_parquet_shards(work / "in", x, 2, truth=digits.target)
    start_ray(os.cpu_count())
    r: dict = {"rows": len(x), "dim": x.shape[1]}
    manifest = run(
        build(
            input=str(work / "in"),
            output=str(work / "run"),
            k=10,
            balanced=True,
            truth_column="truth",
            iterations=50,
            seed=0,
        )
    )
    r["clustering"] = manifest["metrics"]["truth"]
    metrics = train(
        TrainConfig(
            input=str(work / "in"),
            labels=str(work / "run"),
            output=str(work / "head"),
            head="mlp",
            hidden=64,
            epochs=20,
            batch_size=64,
            truth_column="truth",
            compare=True,
        )
    )
    r["selftraining"] = metrics["comparison"]
    print(f"Digits ({len(x)} x {x.shape[1]}), k = 10")
    for name, s in r["clustering"].items():
        print(f"  clustering, {name:13s}  NMI {s['nmi']:.3f}  accuracy {s['accuracy']:.3f}")
    for name, s in r["selftraining"].items():
        held = s.get("heldout_accuracy")
        print(
            f"  head on {name:14s} probe {s['probe_accuracy']:.3f}"
            + (f"  held-out accuracy {held:.3f}" if held is not None else "")
        )
    print(f"  results: {save('selftrain', r)}")


if __name__ == "__main__":
    main()
