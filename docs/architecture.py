"""Draws the README's architecture picture, docs/architecture.png: `.venv/bin/python docs/architecture.py`.

Hand-placed boxes and arrows (matplotlib, a dependency already), so the picture keeps its layout when it changes.
Stream names are `training-pipeline.0x2.<writer>` (config/training-pipeline.json); P is the key prefix
(`fraud:`, docs/redis-layout.md lists every key).
"""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch  # noqa: E402

OUT = Path(__file__).resolve().parent / "architecture.png"
STEP, STORE, PLAIN, GREY = "#fff7d6", "#ffffff", "#ffffff", "#f2f2f2"
STREAM, FEEDBACK = "#b58900", "#c0392b"


def area(ax, x0, y0, x1, y1, title, colour, edge):
    ax.add_patch(
        FancyBboxPatch((x0, y0), x1 - x0, y1 - y0, "round,pad=0,rounding_size=1.2", fc=colour, ec=edge)
    )
    ax.text(x0 + 1, y1 - 1, title, ha="left", va="top", fontsize=10, weight="bold", color="#333333")


def box(ax, x, y, text, colour=PLAIN, width=15, height=4.6, shape="round,pad=0,rounding_size=0.8"):
    ax.add_patch(
        FancyBboxPatch((x - width / 2, y - height / 2), width, height, shape, fc=colour, ec="#444444")
    )
    ax.text(x, y, text, ha="center", va="center", fontsize=7.5)
    return (x, y, width, height)


def edge_point(b, towards):
    """Where the line from the centre of box `b` to `towards` leaves the box."""
    x, y, w, h = b
    dx, dy = towards[0] - x, towards[1] - y
    scale = min(w / 2 / abs(dx) if dx else float("inf"), h / 2 / abs(dy) if dy else float("inf"))
    return x + dx * scale, y + dy * scale


def arrow(ax, a, b, label="", colour="#555555", rad=0.0, style="-|>", dashed=False, label_at=0.5, both=False):
    start, end = edge_point(a, b[:2]), edge_point(b, a[:2])
    ax.add_patch(
        FancyArrowPatch(
            start,
            end,
            arrowstyle=("<|-|>" if both else style),
            mutation_scale=9,
            color=colour,
            lw=1.1,
            connectionstyle=f"arc3,rad={rad}",
            linestyle="--" if dashed else "-",
        )
    )
    if label:
        mx, my = start[0] + (end[0] - start[0]) * label_at, start[1] + (end[1] - start[1]) * label_at
        ax.text(
            mx,
            my,
            label,
            fontsize=6.5,
            color=colour,
            ha="center",
            va="center",
            bbox=dict(fc="white", ec="none", pad=0.6, alpha=0.85),
        )


def draw() -> None:
    fig, ax = plt.subplots(figsize=(12, 6.6))
    ax.set(xlim=(0, 120), ylim=(-2, 72))
    ax.axis("off")

    client = box(ax, 60, 68, "client, curl, docs page (/api/docs, Try It)", GREY, width=34)

    area(ax, 2, 38, 118, 62, "training service  :8020", "#e8f0fb", "#7a9cc6")
    run_pipeline = box(ax, 12, 55, "run-pipeline")
    run_from_raw = box(ax, 31, 55, "run-from-raw")
    status_api = box(ax, 51, 55, "pipeline-status,\nlist-runs")
    registry_api = box(ax, 73, 55, "list-models, promote-model,\nrollback, clean-runs", width=21)
    export_orders = box(ax, 95, 55, "export-orders")
    redeliver = box(ax, 111, 55, "redeliver\n(retry, dead\nletters)", GREY, width=10, height=6)
    names = [
        "1 sample-data",
        "2 preprocess",
        "3 feature-calc",
        "4 training-data",
        "5 train-model\n(gate)",
        "6 prepare-db\n(+ carry-over)",
    ]
    steps = [box(ax, 12 + 19 * i, 44, name, STEP, width=14) for i, name in enumerate(names)]
    for a, b in zip(steps, steps[1:], strict=False):
        arrow(ax, a, b, colour=STREAM)
    ax.text(
        60,
        39.6,
        "each yellow arrow is a Redis stream (training-pipeline.0x2.<step>): a step ends by writing the "
        "event that starts the next",
        ha="center",
        fontsize=7,
        color=STREAM,
        style="italic",
    )
    arrow(ax, run_pipeline, steps[0], colour=STREAM)
    arrow(ax, run_from_raw, steps[1], colour=STREAM)
    arrow(ax, client, run_pipeline, rad=0.1)
    arrow(ax, client, run_from_raw, "your orders", rad=0.05)

    dask = box(
        ax,
        12,
        29,
        "Dask cluster\n(scheduler + workers,\nlocal if none set)\nxgboost.dask",
        "#efe7f8",
        width=17,
        height=8,
    )
    disk = box(
        ax,
        12,
        14,
        "data/\nruns/<run_id>/\nmodels/<model_id>/\n(model.ubj, metadata.json,\nreport/*.png)\n"
        "exports/<time>/ (orders for\nrun-from-raw)",
        GREY,
        width=19,
        height=13,
    )
    arrow(ax, steps[2], dask, "steps 2-6 work\non Dask", dashed=True, both=True, rad=-0.15)
    arrow(ax, dask, disk, dashed=True, both=True)

    area(ax, 26, 18, 118, 35, "Redis", "#fbe9e7", "#d08a80")
    runs = box(ax, 37, 24, "P run:<run_id>\nrun status", STORE, width=14, height=6)
    live = box(ax, 58, 24, "P live (model + version)\nP model:<model_id>", STORE, width=20, height=6)
    fs = box(ax, 82, 24, "feature store\nP fs:<version>:<entity>:<value>", STORE, width=25, height=6)
    events = box(ax, 105, 24, "P events\nscored orders, labels", STORE, width=17, height=6)

    arrow(ax, status_api, runs, dashed=True, style="-", rad=0.1)
    arrow(ax, registry_api, live, "promote,\nrollback", dashed=True, label_at=0.8, rad=0.15)
    arrow(ax, steps[5], live, "switch", rad=0.1, label_at=0.6)
    arrow(ax, steps[5], fs, "load version", label_at=0.6)

    area(ax, 26, 1, 118, 14, "prediction service  :8021", "#e9f6ea", "#7fb885")
    lookups = box(ax, 40, 6.5, "find-orders,\nmodel-info")
    predict = box(ax, 68, 6.5, "predict,\npredict-batch")
    report_label = box(ax, 92, 6.5, "report-label")
    arrow(ax, live, predict, "model", label_at=0.4)
    arrow(ax, fs, predict, "features;\nappend order", both=True, label_at=0.45, rad=0.1)
    arrow(ax, lookups, fs, dashed=True, style="-", rad=-0.25)
    arrow(ax, predict, events, "order", rad=0.35, label_at=0.7)
    arrow(ax, report_label, fs, "label", label_at=0.45)
    arrow(ax, report_label, events, "label", label_at=0.55)

    arrow(ax, events, steps[5], "carry-over into\nthe new version", FEEDBACK, label_at=0.3, rad=0.2)
    arrow(ax, events, export_orders, "export", FEEDBACK, rad=-0.35, label_at=0.62)
    arrow(ax, export_orders, disk, colour=FEEDBACK, rad=0.55)
    arrow(ax, redeliver, steps[5], "re-deliver", dashed=True, rad=0.0, label_at=0.5)

    ax.text(
        60,
        -1.5,
        "red: the label-feedback loop (orders scored and labels reported online go into the next "
        "feature-store version and, exported, into the next training run)",
        ha="center",
        fontsize=7,
        color=FEEDBACK,
    )
    fig.savefig(OUT, dpi=110, bbox_inches="tight", metadata={"Software": None})


if __name__ == "__main__":
    draw()
