"""The results of a run as a text table, Markdown, JSON and a plot of score against budget."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from evaluation.runner import EvalResult
from evaluation.types import Row

GroupKey = tuple[str, str, str, int]  # task, variant, measure, context length


def groups(rows: list[Row]) -> Iterator[tuple[GroupKey, list[Row]]]:
    """Rows grouped by (task, variant, measure, context length), in first-seen order."""
    order: dict[GroupKey, list[Row]] = {}
    for row in rows:
        order.setdefault((row.task, row.variant, row.measure, row.context_len), []).append(row)
    yield from order.items()


def fmt_score(value: float) -> str:
    if math.isnan(value):
        return "nan"
    return f"{value:.3f}" if abs(value) < 10 else f"{value:.2f}"


def fmt_cell(row: Row) -> str:
    """``score [low, high] n=K (ratio)``; the interval and n where the row has an interval,
    wins/losses and the p-value instead of a ratio on a paired row."""
    out = fmt_score(row.score)
    if row.interval is not None:
        out += f" [{fmt_score(row.interval.low)}, {fmt_score(row.interval.high)}]"
    if row.interval is not None or math.isnan(row.score):
        out += f" n={row.samples}"
    if row.paired is not None:
        return out + f" +{row.paired.wins}/-{row.paired.losses} p={row.paired.p_value:.2g}"
    if row.policy == "full":
        return f"{out} (ref)"
    ratio = "n/a" if row.ratio_to_full is None else f"{100 * row.ratio_to_full:.1f}%"
    return f"{out} ({ratio})"


def _table(rows: list[Row]) -> tuple[list[str], list[list[str]]]:
    """Header and body of one group: a line per policy, a column per budget."""
    budgets = sorted({r.budget for r in rows if r.budget is not None})
    header = ["policy", "full KV"] + [f"budget {b}" for b in budgets]
    policies = list(dict.fromkeys(r.policy for r in rows))
    body = []
    for policy in policies:
        mine = {r.budget: r for r in rows if r.policy == policy}
        line = [policy, fmt_cell(mine[None]) if None in mine else ""]
        line += [fmt_cell(mine[b]) if b in mine else "" for b in budgets]
        body.append(line)
    return header, body


def _title(key: GroupKey, rows: list[Row]) -> str:
    task, variant, measure, n = key
    better = "higher" if rows[0].higher_is_better else "lower"
    title = f"{task} / {variant} — {measure} ({better} is better), {n} tokens"
    counts = {r.samples for r in rows}
    if len(counts) == 1:
        title += f", {counts.pop()} samples"
    methods = sorted({r.interval.method for r in rows if r.interval is not None})
    if methods:
        title += f", 95% {'/'.join(methods)} intervals"
    if any(r.paired is not None for r in rows):
        title += ", +wins/-losses against oracle with the exact McNemar p"
    return title


def text_table(rows: list[Row]) -> str:
    """Plain-text tables, one per group: score (ratio to full)."""
    out = []
    for key, group in groups(rows):
        header, body = _table(group)
        widths = [max(len(x) for x in col) for col in zip(header, *body, strict=True)]
        out.append(_title(key, group))
        for line in [header, *body]:
            out.append("  ".join(x.ljust(w) for x, w in zip(line, widths, strict=True)))
        out.append("")
    return "\n".join(out)


def markdown_tables(rows: list[Row]) -> str:
    """Markdown tables, one per group."""
    out = []
    for key, group in groups(rows):
        header, body = _table(group)
        out.append(f"**{_title(key, group)}**\n")
        out.append("| " + " | ".join(header) + " |")
        out.append("|" + "|".join("---" for _ in header) + "|")
        out += ["| " + " | ".join(line) + " |" for line in body]
        out.append("")
    return "\n".join(out)


def to_json(result: EvalResult, config: dict[str, Any]) -> dict[str, Any]:
    """The ``--json`` object: ``config``, ``summary`` rows and every sample."""
    return {
        "config": config,
        "seconds": round(result.seconds, 1),
        "summary": [asdict(r) for r in result.rows],
        "samples": [asdict(s) for s in result.samples],
    }


def write_json(path: str | Path, result: EvalResult, config: dict[str, Any]) -> None:
    Path(path).write_text(json.dumps(to_json(result, config), indent=1) + "\n", encoding="utf-8")


def plot(path: str | Path, rows: list[Row]) -> None:
    """Score against budget per policy, one panel per group; ``full`` is a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = list(groups(rows))
    cols = min(3, len(panels))
    lines = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(lines, cols, figsize=(5 * cols, 3.6 * lines), squeeze=False)
    for ax, (key, group) in zip(axes.flat, panels, strict=False):
        _panel(ax, key, group)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(8, len(labels)), frameon=False)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _panel(ax: Any, key: GroupKey, group: list[Row]) -> None:
    task, variant, measure, n = key
    budgets = sorted({r.budget for r in group if r.budget is not None})
    for policy in dict.fromkeys(r.policy for r in group):
        mine = sorted((r for r in group if r.policy == policy), key=lambda r: r.budget or 0)
        if policy == "full":
            ax.axhline(mine[0].score, color="black", linestyle="--", label="full")
            continue
        errors = [
            (r.score - r.interval.low, r.interval.high - r.score)
            if r.interval is not None
            else (0.0, 0.0)
            for r in mine
        ]
        ax.errorbar(
            [r.budget for r in mine],
            [r.score for r in mine],
            yerr=np.array(errors).T,
            marker="o",
            capsize=3,
            label=policy,
        )
    if budgets:
        ax.set_xscale("log", base=2)
        ax.set_xticks(budgets, [str(b) for b in budgets])
    ax.set_title(f"{task} {variant} @ {n}", fontsize=9)
    ax.set_xlabel("token budget")
    ax.set_ylabel(measure)
    ax.grid(alpha=0.3)
