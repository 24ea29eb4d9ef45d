"""One PNG per op next to a run's JSON: speed-up vs torch and achieved fraction of peak.

Bars per variant, grouped by (case, dtype, direction); only timed rows are drawn.
"""
from __future__ import annotations

from pathlib import Path

from .suites.base import BASELINE


def plot_result(result: dict, json_path: Path | str) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    json_path = Path(json_path)
    written = []
    timed = [r for r in result["rows"] if r["status"] == "ok" and r["median_ms"]]
    for op in dict.fromkeys(r["op"] for r in timed):
        rows = [r for r in timed if r["op"] == op]
        groups = list(dict.fromkeys((r["case"], r["dtype"], r["direction"]) for r in rows))
        variants = list(dict.fromkeys(r["variant"] for r in rows))
        value = {(r["case"], r["dtype"], r["direction"], r["variant"]): r for r in rows}
        fig, axes = plt.subplots(2, 1, figsize=(max(6.0, 0.9 * len(groups) + 2), 7.5),
                                 sharex=True)
        panels = [("speedup_vs_torch", "speed-up vs torch (x)",
                   [v for v in variants if v != BASELINE]),
                  ("peak_fraction", "fraction of measured "
                   f"{'copy bandwidth' if rows[0]['bound'] == 'memory' else 'bf16 matmul rate'}",
                   variants)]
        for ax, (field, label, names) in zip(axes, panels):
            width = 0.8 / max(1, len(names))
            for j, v in enumerate(names):
                xs, ys = [], []
                for i, g in enumerate(groups):
                    r = value.get((*g, v))
                    if r and r[field] is not None:
                        xs.append(i - 0.4 + width * (j + 0.5))
                        ys.append(r[field])
                ax.bar(xs, ys, width, label=v, color=f"C{variants.index(v) % 10}")
            if field == "speedup_vs_torch":
                ax.axhline(1.0, color="black", linewidth=0.8)
            ax.set_ylabel(label)
            ax.legend(fontsize="small")
            ax.grid(axis="y", alpha=0.3)
        axes[-1].set_xticks(range(len(groups)))
        axes[-1].set_xticklabels([f"{c}\n{d} {di}" for c, d, di in groups], rotation=45,
                                 ha="right", fontsize="small")
        fig.suptitle(f"{op} on {result['device']} ({result['created'][:10]})")
        fig.tight_layout()
        path = json_path.with_name(f"{json_path.stem}_{op}.png")
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    return written
