"""The trials report of a search, as Markdown and as an HTML page with inline SVG plots.

The plots: the objective of every trial in trial order, and the objective against each tuned
hyperparameter (a log axis where the range was searched on one, categories side by side for
categorical ranges). The best trial is marked in every plot and in the table; stopped (pruned)
trials are drawn hollow at the last value they reported, failed ones are listed but have no point.
A trial continued after an interruption says at which epoch(s) it resumed, next to its status.
"""

from __future__ import annotations

import html as html_lib
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

from trainer.evaluate.model_card import markdown_cell
from trainer.tune import search_space

_WIDTH, _HEIGHT, _PAD = 440, 260, 48
_COLOURS = {"completed": "#1f77b4", "stopped early": "#ff7f0e", "best": "#d62728"}


def markdown(summary: Mapping[str, Any]) -> str:
    best = summary["best"]
    lines = [f"# Tuning: {summary['strategy']} search of {summary['objective']} ({summary['direction']})", ""]
    if best:
        lines.append(f"**Best: trial {best['trial']}, {summary['objective']} = {best['value']:.4f}**")
    else:
        lines.append("**No trial completed.**")
    counts: dict[str, int] = {}
    for trial in summary["trials"]:
        counts[trial["status"]] = counts.get(trial["status"], 0) + 1
    lines += ["", f"{len(summary['trials'])} trials: " + ", ".join(f"{n} {s}" for s, n in counts.items()), ""]
    tuned = list(summary["tuned"])
    lines.append("| trial | status | " + summary["objective"] + " | epochs | seconds | " + " | ".join(tuned) + " |")
    lines.append("|---" * (5 + len(tuned)) + "|")
    for trial in summary["trials"]:
        mark = " (best)" if best and trial["trial"] == best["trial"] else ""
        status = trial["status"] + _resumed(trial) + (f": {trial['error']}" if trial["error"] else "")
        values = [markdown_cell(_fmt(trial["hyperparameters"].get(name))) for name in tuned]
        lines.append(f"| {trial['trial']}{mark} | {markdown_cell(status)} | {_fmt(trial['value'])} | "
                     f"{trial['epochs']} | {_fmt(trial['seconds'])} | " + " | ".join(values) + " |")
    return "\n".join(lines) + "\n"


def html(summary: Mapping[str, Any]) -> str:
    """A self-contained page (no scripts, no external files): the table and the plots."""
    best = summary["best"]
    esc = html_lib.escape
    title = f"Tuning: {summary['strategy']} search of {summary['objective']}"
    head = (f"<p><b>Best: trial {best['trial']}, {esc(summary['objective'])} = {best['value']:.4f}</b></p>"
            if best else "<p><b>No trial completed.</b></p>")
    tuned = list(summary["tuned"])
    rows = []
    for trial in summary["trials"]:
        is_best = bool(best and trial["trial"] == best["trial"])
        status = esc(trial["status"] + _resumed(trial)) + (f": {esc(trial['error'])}" if trial["error"] else "")
        cells = "".join(f"<td>{esc(_fmt(trial['hyperparameters'].get(name)))}</td>" for name in tuned)
        row_class = ' class="best"' if is_best else ""
        mark = " &#9733; best" if is_best else ""
        rows.append(f"<tr{row_class}><td>{trial['trial']}{mark}"
                    f"</td><td>{status}</td><td>{esc(_fmt(trial['value']))}</td><td>{trial['epochs']}</td>"
                    f"<td>{esc(_fmt(trial['seconds']))}</td>{cells}</tr>")
    header = "".join(f"<th>{esc(name)}</th>" for name in tuned)
    ranges = {r.name: r for r in search_space.parse_ranges(summary["ranges"]).ranges} if summary["ranges"] else {}
    plots = [_plot(summary, "trial", None)] + [_plot(summary, name, ranges.get(name)) for name in tuned]
    return (
        "<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>" + esc(title) + "</title><style>"
        "body{font-family:sans-serif;margin:1.5em}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:2px 6px;font-size:13px}tr.best{background:#fde2e2;font-weight:bold}"
        "figure{display:inline-block;margin:0.5em}</style></head><body>"
        f"<h1>{esc(title)}</h1>{head}<p>direction: {esc(summary['direction'])}; early stopping: "
        f"{esc(summary['early_stopping_type'])}; tuned: {esc(', '.join(tuned))}</p>"
        f"<table><tr><th>trial</th><th>status</th><th>{esc(summary['objective'])}</th><th>epochs</th>"
        f"<th>seconds</th>{header}</tr>{''.join(rows)}</table><h2>Plots</h2><p>Filled: completed; hollow: stopped "
        "early (at its last reported value); large red: the best trial. Failed trials have no point.</p>"
        f"{''.join(plots)}</body></html>\n")


def write_html(summary: Mapping[str, Any], path: str) -> str:
    """Write the HTML report to a local ``path`` (for browsers and screenshot tests); returns the path."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(html(summary))
    return path


def _plot(summary: Mapping[str, Any], x_name: str, rng: search_space.ParameterRange | None) -> str:
    """One SVG scatter plot of the objective against the trial number or one hyperparameter."""
    esc = html_lib.escape
    best = summary["best"]
    points = [t for t in summary["trials"] if t["value"] is not None and t["status"] in ("completed", "stopped early")
              and (x_name == "trial" or x_name in t["hyperparameters"])]
    caption = f"{summary['objective']} per trial" if x_name == "trial" else f"{summary['objective']} vs {x_name}"
    svg = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{_WIDTH}" height="{_HEIGHT}" role="img" '
           f'aria-label="{esc(caption)}"><rect width="100%" height="100%" fill="white"/>']
    left, right, top, bottom = _PAD, _WIDTH - 12, 12, _HEIGHT - _PAD
    svg.append(f'<line x1="{left}" y1="{bottom}" x2="{right}" y2="{bottom}" stroke="black"/>'
               f'<line x1="{left}" y1="{top}" x2="{left}" y2="{bottom}" stroke="black"/>')
    svg.append(f'<text x="{(left + right) / 2}" y="{_HEIGHT - 8}" text-anchor="middle" font-size="12">'
               f'{esc(x_name)}{" (log scale)" if rng is not None and rng.scale == "Logarithmic" else ""}</text>')
    if points:
        ys = [float(t["value"]) for t in points]
        y_low, y_high = _span(min(ys), max(ys))
        categories: list[str] = []
        if x_name == "trial":
            xs = [float(t["trial"]) for t in points]
        elif rng is not None and rng.kind == search_space.CATEGORICAL:
            categories = [str(search_space._plain(v)) for v in rng.values]
            xs = [float(categories.index(str(t["hyperparameters"][x_name]))) if str(t["hyperparameters"][x_name])
                  in categories else 0.0 for t in points]
        else:
            log = rng is not None and rng.scale == "Logarithmic"
            xs = [math.log10(float(t["hyperparameters"][x_name])) if log else float(t["hyperparameters"][x_name])
                  for t in points]
        if categories:
            x_low, x_high = -0.5, len(categories) - 0.5
            for i, name in enumerate(categories):
                x = left + (i - x_low) / (x_high - x_low) * (right - left)
                svg.append(f'<text x="{x:.1f}" y="{bottom + 14}" text-anchor="middle" font-size="10">'
                           f'{esc(name)}</text>')
        else:
            x_low, x_high = _span(min(xs), max(xs))
            # Ticks at the smallest and largest value tried, the right one anchored inside the plot.
            for value, anchor in ((min(xs), "start"), (max(xs), "end")) if max(xs) > min(xs) else ((min(xs),
                                                                                                    "middle"),):
                x = left + (value - x_low) / (x_high - x_low) * (right - left)
                label = _fmt(10 ** value if rng is not None and rng.scale == "Logarithmic" else value)
                svg.append(f'<line x1="{x:.1f}" y1="{bottom}" x2="{x:.1f}" y2="{bottom + 4}" stroke="black"/>'
                           f'<text x="{x:.1f}" y="{bottom + 14}" text-anchor="{anchor}" font-size="10">'
                           f'{esc(label)}</text>')
        for value in sorted({min(ys), max(ys)}):
            y = bottom - (value - y_low) / (y_high - y_low) * (bottom - top)
            svg.append(f'<line x1="{left - 4}" y1="{y:.1f}" x2="{left}" y2="{y:.1f}" stroke="black"/>'
                       f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end" font-size="10">{_fmt(value)}</text>')
        for trial, x_value, y_value in zip(points, xs, ys, strict=True):
            x = left + (x_value - x_low) / (x_high - x_low) * (right - left)
            y = bottom - (y_value - y_low) / (y_high - y_low) * (bottom - top)
            is_best = bool(best and trial["trial"] == best["trial"])
            colour = _COLOURS["best"] if is_best else _COLOURS[trial["status"]]
            fill = colour if trial["status"] == "completed" else "none"
            svg.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="{7 if is_best else 4}" fill="{fill}" stroke="{colour}" '
                       f'stroke-width="2"><title>trial {trial["trial"]}: {_fmt(y_value)} ({trial["status"]})'
                       f'</title></circle>')
            if is_best:
                svg.append(f'<text x="{x + 9:.1f}" y="{y - 6:.1f}" font-size="11" fill="{colour}">best</text>')
    else:
        svg.append(f'<text x="{(left + right) / 2}" y="{(top + bottom) / 2}" text-anchor="middle" font-size="12">'
                   'no trial reported a value</text>')
    svg.append("</svg>")
    return f"<figure>{''.join(svg)}<figcaption>{esc(caption)}</figcaption></figure>"


def _resumed(trial: Mapping[str, Any]) -> str:
    """Text such as ' (resumed at epoch 3)' for a trial continued from its backup after an interruption."""
    epochs = trial.get("resumed_at_epochs") or []
    if not epochs:
        return ""
    return f" (resumed at epoch{'s' if len(epochs) > 1 else ''} {', '.join(str(e) for e in epochs)})"


def _span(low: float, high: float) -> tuple[float, float]:
    if high - low < 1e-12:
        return low - 0.5 if low == 0 else low - abs(low) * 0.05, high + 0.5 if high == 0 else high + abs(high) * 0.05
    margin = (high - low) * 0.05
    return low - margin, high + margin


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


__all__: Sequence[str] = ("markdown", "html", "write_html")
