"""The short text summary printed at the end of a run (and by ``pseudolabel report``)."""

from __future__ import annotations

from typing import Any


def text_summary(manifest: dict[str, Any], output_url: str) -> str:
    fit, rows, clusters = manifest["fit"], manifest["rows"], manifest["clusters"]
    metrics, t = manifest["metrics"], manifest["timings"]
    state = "converged" if fit["converged"] else "iteration limit"
    resumed = fit.get("resumed_from_iteration")
    how = f"{fit['algorithm']}, {fit['iterations_run']} iterations, {state}" + (
        f", resumed from {resumed}" if resumed is not None else ""
    )
    if fit["algorithm"] == "given":  # pseudolabel label: nothing was fitted
        how = f"labelled with {fit['init'].removeprefix('given ').strip('()')}"
    lines = [
        f"pseudolabel: {rows['input']} rows x {manifest['input']['dim']} dims -> "
        f"k={clusters['k']} ({how})",
        f"  output     {output_url}  ({rows['output']} labelled rows, "
        f"{rows['skipped']['total']} skipped)",
        f"  distance   mean squared distance to the label's centroid "
        f"{metrics['mean_distance']:.4g}",
    ]
    named = [("label", clusters)]
    if "nearest" in clusters:
        named = [("balanced", clusters), ("nearest", clusters["nearest"])]
    for name, section in named:
        b = section["balance"]
        lines.append(
            f"  sizes      {b['min']}..{b['max']}  max/min {b['max_over_min']:.2f}"
            f"  imbalance {b['imbalance_factor']:.3f}  empty {b['empty']}"
            + (f"  ({name})" if len(named) > 1 else "")
        )
    if "balance" in manifest and "given" in manifest["balance"]:
        s = manifest["balance"]
        lines.append(f"  balance    the given duals (eps {s['epsilon']:.3g})")
    elif "balance" in manifest:
        s = manifest["balance"]
        sink, sizes = s["sinkhorn"], s["sizes"]
        lines.append(
            f"  balance    Sinkhorn {sink['iterations']} steps on {s['sample_rows']} rows"
            f" (eps {s['epsilon']:.3g}, {s['epsilon_relative']:g} x score std), then"
            f" {sizes['passes']} passes: sizes within {100 * sizes['max_deviation']:.2f}%"
            f" of target"
        )
    for column, s in metrics.get("truth", {}).items():
        lines.append(
            f"  vs truth   NMI {s['nmi']:.4f}  ARI {s['ari']:.4f}  accuracy {s['accuracy']:.4f}"
            + (f"  ({column})" if len(metrics["truth"]) > 1 else "")
        )
    stages = ", ".join(f"{k} {v:.1f} s" for k, v in t.items() if k != "total")
    lines.append(f"  time       {stages}; total {t.get('total', 0):.1f} s")
    return "\n".join(lines)
