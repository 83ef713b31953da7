"""The run page of a local run, ``OUTPUT/index.html``: what the Kubeflow UI shows of a run, in one page.

The steps in pipeline order with status, duration, cache reuse and log; the run's parameters (those that
differ from the defaults first); the headline figures; and every step's artifacts: HTML reports linked
(copied to ``OUTPUT/reports/*.html`` so that a browser shows them as pages), Markdown rendered, metrics as
tables, folders listed with links to their files. Self-contained (no script, no network) and with
relative links only, so the output folder can be moved or copied as a whole.
"""

from __future__ import annotations

import dataclasses
import html
import json
import os
import shutil
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple
from urllib.parse import quote

import markdown as markdown_lib
import yaml

from trainer import layout, logs

_ESC = html.escape
_MAX_LISTED_FILES = 30
_MAX_SHOWN_BYTES = 20_000
_CSS = ("body{font-family:sans-serif;margin:1.5em;max-width:1200px}table{border-collapse:collapse;margin:0.5em 0}"
        "td,th{border:1px solid #ccc;padding:2px 8px;font-size:13px;text-align:left;vertical-align:top}"
        ".succeeded{color:#1a7f37}.failed{color:#cf222e;font-weight:bold}.reused{color:#0969da}"
        ".skipped,.not-run{color:#6e7781}tr.changed td{font-weight:bold}section.step{border-top:1px solid #ddd;"
        "margin-top:1em}pre{background:#f6f8fa;padding:0.5em;overflow:auto;max-height:24em;font-size:12px}"
        ".md{border-left:3px solid #ddd;padding-left:1em}.md h1{font-size:1.3em}.md h2{font-size:1.15em}"
        ".md h3{font-size:1em}.headline{font-size:1.2em}summary{cursor:pointer;color:#0969da}")


@dataclasses.dataclass(frozen=True)
class PlannedStep:
    """A step of the compiled pipeline: its task name, display name, component and the branches it sits in."""

    name: str
    display: str
    component: str
    within: tuple[str, ...] = ()


def load_spec(pipeline_yaml: str) -> dict[str, Any]:
    """The PipelineSpec document of a compiled pipeline (the first YAML document; the second holds
    platform settings)."""
    with open(pipeline_yaml, encoding="utf-8") as handle:
        return next(yaml.safe_load_all(handle))


def planned_steps(spec: Mapping[str, Any]) -> tuple[list[PlannedStep], dict[str, tuple[str, list[str]]]]:
    """The steps in the order they run (dependencies first), and {branch task: (its display name, the steps
    inside it)} for the conditions and loops."""
    steps: list[PlannedStep] = []
    groups: dict[str, tuple[str, list[str]]] = {}

    def walk(dag: Mapping[str, Any], within: tuple[str, ...]) -> list[str]:
        tasks, placed, names = dag["tasks"], set(), []
        while len(placed) < len(tasks):
            ready = sorted(name for name, task in tasks.items()
                           if name not in placed and set(task.get("dependentTasks", [])) <= placed)
            for name in ready or sorted(set(tasks) - placed):
                placed.add(name)
                task = tasks[name]
                component = spec["components"][task["componentRef"]["name"]]
                display = task.get("taskInfo", {}).get("name", name)
                if "dag" in component:
                    groups[name] = (display, walk(component["dag"], (*within, display)))
                    names += groups[name][1]
                else:
                    steps.append(PlannedStep(name, display, task["componentRef"]["name"], within))
                    names.append(name)
        return names

    walk(spec["root"]["dag"], ())
    return steps, groups


def parameter_rows(spec: Mapping[str, Any], arguments: Mapping[str, Any]) -> list[tuple[str, Any, Any, bool]]:
    """(name, value, default, changed) for every pipeline parameter, those that differ from the default first."""
    definitions = spec["root"].get("inputDefinitions", {}).get("parameters", {})
    rows = []
    for name, definition in sorted(definitions.items()):
        default = definition.get("defaultValue")
        value = arguments.get(name, default)
        if definition.get("parameterType") == "NUMBER_INTEGER" and isinstance(default, float):
            default = int(default)
        changed = "defaultValue" not in definition or not _same(value, default)
        rows.append((name, value, default, changed))
    return sorted(rows, key=lambda row: not row[3])


def _same(value: Any, default: Any) -> bool:
    if isinstance(value, bool) or isinstance(default, bool):
        return value is default
    if isinstance(value, (int, float)) and isinstance(default, (int, float)):
        return float(value) == float(default)
    return value == default


def write(output_dir: str, *, title: str, summary: Mapping[str, Any], spec: Mapping[str, Any],
          arguments: Mapping[str, Any], steps: Sequence[Mapping[str, Any]], headline: Sequence[str]) -> str:
    """Write ``output_dir/index.html``; returns its path.

    ``steps`` are the console's records (``StepRecord.to_dict()``); ``headline`` are the lines shown at
    the top (plain text).
    """
    planned, _ = planned_steps(spec)
    seen = {step["name"]: step for step in steps}
    rows, sections, reports = [], [], []
    ordered: list[tuple[PlannedStep | None, Mapping[str, Any] | None]] = []
    for plan in planned:
        # A step that ran more than once in the run (the lanes of a loop) is "name", "name #2", ...
        ordered.append((plan, seen.get(plan.name)))
        ordered += [(plan, step) for step in steps if step["name"].startswith(plan.name + " #")]
    placed = {step["name"] for _, step in ordered if step}
    ordered += [(None, step) for step in steps if step["name"] not in placed]
    for index, (plan, step) in enumerate(ordered, 1):
        name = step["name"] if step else plan.name
        display = (plan.display + name[len(plan.name):]) if plan else name
        status = step["status"] if step else ("not run" if summary.get("status") == "failed" else "skipped")
        seconds = step.get("seconds") if step else None
        note = (step.get("note") if step else "") or ""
        if plan and plan.within:
            note = (note + "; " if note else "") + "in branch " + " / ".join(plan.within)
        log_path = step.get("log") if step else None
        log_link = _link(output_dir, log_path, "log") if log_path else ""
        anchor = f"step-{index}"
        has_outputs = bool(step and step.get("task_dir") and os.path.isdir(step["task_dir"]))
        files = " · ".join(filter(None, [log_link, f'<a href="#{anchor}">artifacts</a>' if has_outputs else ""]))
        duration = "" if seconds is None else _ESC(logs.duration(seconds))
        attempts = step["attempts"] if step and step.get("attempts") else ""
        rows.append(f"<tr><td>{index}</td><td>{_ESC(display)}<br><small>{_ESC(name)}</small></td>"
                    f'<td class="{status.replace(" ", "-")}">{_ESC(status)}</td><td>{duration}</td>'
                    f"<td>{attempts}</td><td>{_ESC(note)}</td><td>{files}</td></tr>")
        if has_outputs:
            component = plan.component if plan else ""
            sections.append(_step_section(output_dir, spec, component, step, display, anchor, reports))
    parameters = parameter_rows(spec, arguments)
    changed = sum(1 for row in parameters if row[3])
    def parameter_table(chosen: list[tuple[str, Any, Any, bool]]) -> str:
        return ("<table><tr><th>name</th><th>value</th><th>default</th></tr>" + "".join(
            f"<tr><td>{_ESC(name)}</td><td>{_ESC(_show(value))}</td><td>{_ESC(_show(default, '(required)'))}</td>"
            "</tr>" for name, value, default, _ in chosen) + "</table>")
    status = summary.get("status", "unknown")
    page = (
        "<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>" + _ESC(title) + "</title>"
        f"<style>{_CSS}</style></head><body><h1>{_ESC(title)}</h1>"
        f"<p class=\"headline\"><span class=\"{_ESC(status)}\">{_ESC(status)}</span>"
        + "".join(f"<br>{_ESC(line)}" for line in headline) + "</p>"
        f"<p>Data: <code>{_ESC(str(summary.get('data_uri', '')))}</code>. Each step's whole output is its "
        "<i>log</i>, beside its artifacts.</p>"
        "<h2>Steps</h2><table><tr><th>#</th><th>step</th><th>status</th><th>duration</th><th>attempts</th>"
        f"<th>note</th><th>files</th></tr>{''.join(rows)}</table>"
        f"<h2>Reports</h2><ul>{''.join(reports) or '<li>none (no step got that far)</li>'}</ul>"
        f"<h2>Parameters</h2><p>{changed} differ from the pipeline's defaults:</p>"
        + parameter_table([row for row in parameters if row[3]])
        + f"<details><summary>the other {len(parameters) - changed}, at their defaults</summary>"
        + parameter_table([row for row in parameters if not row[3]]) + "</details>"
        f"<h2>Artifacts</h2>{''.join(sections) or '<p>No step wrote artifacts.</p>'}</body></html>\n")
    path = os.path.join(output_dir, layout.RUN_PAGE_FILE)
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(page)
    return path


def _step_section(output_dir: str, spec: Mapping[str, Any], component: str, step: Mapping[str, Any],
                  display: str, anchor: str, reports: list[str]) -> str:
    """One step's outputs as the executor recorded them (kfp's executor_output.json in the step's folder);
    adds a link to ``reports`` for each HTML report, Markdown report and model."""
    task_dir = step["task_dir"]
    recorded: dict[str, Any] = {}
    executor_output = os.path.join(task_dir, "executor_output.json")
    if os.path.exists(executor_output):
        with open(executor_output, encoding="utf-8") as handle:
            recorded = json.load(handle)
    definitions = spec["components"].get(component, {}).get("outputDefinitions", {})
    parts = [f"<section class=\"step\" id=\"{anchor}\"><h3>{_ESC(display)} <small>({_ESC(step['name'])}, "
             f"{_ESC(step['status'])})</small></h3>"]
    parameters = recorded.get("parameterValues") or {}
    if parameters:
        parts.append("<table>" + "".join(f"<tr><th>{_ESC(k)}</th><td>{_ESC(_show(v))}</td></tr>"
                                         for k, v in parameters.items()) + "</table>")
    for name, definition in definitions.get("artifacts", {}).items():
        schema = definition.get("artifactType", {}).get("schemaTitle", "system.Artifact")
        entries = (recorded.get("artifacts", {}).get(name) or {}).get("artifacts") or [
            {"uri": os.path.join(task_dir, name), "metadata": {}}]
        uri, metadata = entries[0]["uri"], entries[0].get("metadata") or {}
        if not os.path.exists(uri):
            continue
        parts.append(f"<h4 id=\"{anchor}-{_ESC(name)}\">{_ESC(name)} <small>{_ESC(schema.split('.')[-1])}</small></h4>")
        shown = _artifact(output_dir, step["name"], name, schema, uri, metadata)
        parts.append(shown.html)
        if shown.link or schema in ("system.Markdown", "system.Model"):
            target = shown.link or f"#{anchor}-{_ESC(name)}"
            reports.append(f"<li><a href=\"{target}\">{_ESC(display)}: {_ESC(name)}</a> "
                           f"<small>{_ESC(schema.split('.')[-1])}</small></li>")
    parts.append("</section>")
    return "".join(parts)


class _Shown(NamedTuple):
    html: str
    link: str = ""  # the relative address of a report page, for the list of reports


def _artifact(output_dir: str, step: str, name: str, schema: str, uri: str, metadata: Mapping[str, Any]) -> _Shown:
    if schema == "system.HTML" and os.path.isfile(uri):
        reports = os.path.join(output_dir, layout.RUN_REPORTS_DIR)
        os.makedirs(reports, exist_ok=True)
        copy = os.path.join(reports, f"{step.replace(' #', '-')}-{name}.html")
        shutil.copyfile(uri, copy)
        link = _link(output_dir, copy, "open the report")
        return _Shown(f"<p>{link} ({_size(os.path.getsize(uri))})</p>", _href(output_dir, copy))
    if schema == "system.Markdown" and os.path.isfile(uri):
        with open(uri, encoding="utf-8") as handle:
            text = handle.read()
        # Our reports hold no HTML of their own: any "<" is text (a file or class name), never markup.
        rendered = markdown_lib.markdown(text.replace("<", "&lt;"), extensions=["tables", "fenced_code"])
        return _Shown(f"<details open><summary>rendered Markdown</summary><div class=\"md\">{rendered}</div>"
                      "</details>")
    parts = []
    if schema == "system.ClassificationMetrics" and "confusionMatrix" in metadata:
        parts.append(_confusion_matrix(metadata["confusionMatrix"]))
        metadata = {k: v for k, v in metadata.items() if k not in ("confusionMatrix", "confidenceMetrics")}
    scalars = {k: v for k, v in metadata.items() if not isinstance(v, (dict, list)) or len(json.dumps(v)) < 200}
    if scalars:
        parts.append("<table>" + "".join(f"<tr><th>{_ESC(k)}</th><td>{_ESC(_show(v))}</td></tr>"
                                         for k, v in scalars.items()) + "</table>")
    if os.path.isdir(uri):
        parts.append(_listing(output_dir, uri))
    elif os.path.isfile(uri) and schema not in ("system.Metrics", "system.ClassificationMetrics"):
        parts.append(_file_preview(output_dir, uri))
    return _Shown("".join(parts))


def _confusion_matrix(matrix: Mapping[str, Any]) -> str:
    labels = [spec.get("displayName", "") for spec in matrix.get("annotationSpecs", [])]
    head = "".join(f"<th>{_ESC(label)}</th>" for label in labels)
    body = "".join(f"<tr><th>{_ESC(label)}</th>" + "".join(f"<td>{value}</td>" for value in row.get("row", []))
                   + "</tr>" for label, row in zip(labels, matrix.get("rows", []), strict=False))
    return (f"<p>Confusion matrix (rows: true class, columns: predicted)</p>"
            f"<table><tr><th></th>{head}</tr>{body}</table>")


def _listing(output_dir: str, folder: str) -> str:
    files = []
    for root, dirs, names in os.walk(folder):
        dirs.sort()
        files += [os.path.join(root, name) for name in sorted(names)]
    shown = "".join(f"<li>{_link(output_dir, path, os.path.relpath(path, folder))} "
                    f"<small>{_size(os.path.getsize(path))}</small></li>" for path in files[:_MAX_LISTED_FILES])
    more = f"<li>... and {len(files) - _MAX_LISTED_FILES} more</li>" if len(files) > _MAX_LISTED_FILES else ""
    return (f"<p>Folder {_link(output_dir, folder, os.path.basename(folder) + '/')}: {len(files)} file(s)</p>"
            f"<ul>{shown}{more}</ul>")


def _file_preview(output_dir: str, path: str) -> str:
    link = f"<p>{_link(output_dir, path, os.path.basename(path))} <small>{_size(os.path.getsize(path))}</small></p>"
    if os.path.getsize(path) > _MAX_SHOWN_BYTES:
        return link
    try:
        with open(path, encoding="utf-8") as handle:
            return link + f"<pre>{_ESC(handle.read())}</pre>"
    except UnicodeDecodeError:
        return link


def _href(output_dir: str, path: str) -> str:
    """The relative address of ``path`` from the run page (URL-quoted, so odd names still resolve)."""
    return _ESC(quote(os.path.relpath(path, output_dir).replace(os.sep, "/")))


def _link(output_dir: str, path: str, text: str) -> str:
    return f"<a href=\"{_href(output_dir, path)}\">{_ESC(text)}</a>"


def _size(count: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if count < 1024 or unit == "GiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return str(count)


def _show(value: Any, none: str = "null") -> str:
    if value is None:
        return none
    return value if isinstance(value, str) else json.dumps(value)
