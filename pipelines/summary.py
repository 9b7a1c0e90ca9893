"""The short text summary printed at the end of a run (and by ``pseudolabel report``)."""

from __future__ import annotations

from typing import Any


def text_summary(manifest: dict[str, Any], output_url: str) -> str:
    fit, rows, clusters = manifest["fit"], manifest["rows"], manifest["clusters"]
    balance, metrics, t = clusters["balance"], manifest["metrics"], manifest["timings"]
    state = "converged" if fit["converged"] else "iteration limit"
    resumed = fit.get("resumed_from_iteration")
    lines = [
        f"pseudolabel: {rows['input']} rows x {manifest['input']['dim']} dims -> "
        f"k={clusters['k']} ({fit['algorithm']}, {fit['iterations_run']} iterations, {state}"
        + (f", resumed from {resumed}" if resumed is not None else "")
        + ")",
        f"  output     {output_url}  ({rows['output']} labelled rows, "
        f"{rows['skipped']['total']} skipped)",
        f"  objective  {metrics['final_inertia']:.6e}  "
        f"(mean squared distance {metrics['mean_distance']:.4g})",
        f"  sizes      {balance['min']}..{balance['max']}  max/min {balance['max_over_min']:.2f}"
        f"  imbalance {balance['imbalance_factor']:.3f}  empty {balance['empty']}",
    ]
    if "truth" in metrics:
        s = metrics["truth"]
        lines.append(
            f"  vs truth   NMI {s['nmi']:.4f}  ARI {s['ari']:.4f}  accuracy {s['accuracy']:.4f}"
        )
    stages = ", ".join(f"{k} {v:.1f} s" for k, v in t.items() if k != "total")
    lines.append(f"  time       {stages}; total {t.get('total', 0):.1f} s")
    return "\n".join(lines)
