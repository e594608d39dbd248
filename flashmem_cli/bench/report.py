"""What a benchmark returns (a Section: rows, how to show them, what to plot) and how a run is
written: results.json, results.md and PNG plots (matplotlib, an optional extra)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flashmem_cli.store.files import atomic_write_bytes


@dataclass(frozen=True)
class Column:
    """One table column: `key` is a row key, dotted into nested dicts ("resumed.median")."""

    key: str
    header: str
    fmt: str = "{}"  # str.format of the value; a missing value shows as "-"


@dataclass(frozen=True)
class Plot:
    """A line plot of some row keys against one row key."""

    name: str
    title: str
    x: str
    x_label: str
    y_label: str
    lines: tuple[tuple[str, str], ...]  # (row key, legend label)
    log_y: bool = False


@dataclass
class Section:
    name: str
    title: str
    method: str  # how it was measured, for the reader of results.md
    columns: list[Column]
    rows: list[dict[str, Any]]
    headline: dict[str, float | None] = field(default_factory=dict)  # the ratios to quote
    notes: list[str] = field(default_factory=list)
    plots: list[Plot] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "title": self.title,
            "method": self.method,
            "rows": self.rows,
            "headline": self.headline,
            "notes": self.notes,
        }

    def table(self) -> list[list[str]]:
        """Header row, then one formatted row per result row."""
        header = [c.header for c in self.columns]
        return [header] + [[cell(row, c) for c in self.columns] for row in self.rows]


@dataclass
class Results:
    machine: dict[str, Any]
    command: str
    date: str
    sections: list[Section] = field(default_factory=list)
    elapsed_s: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "command": self.command,
            "date": self.date,
            "elapsed_s": round(self.elapsed_s, 1),
            "machine": self.machine,
            "sections": {s.name: s.as_dict() for s in self.sections},
        }


def lookup(row: dict[str, Any], key: str) -> Any:
    value: Any = row
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def cell(row: dict[str, Any], column: Column) -> str:
    value = lookup(row, column.key)
    return "-" if value is None else column.fmt.format(value)


def markdown(results: Results, plot_files: dict[str, list[str]] | None = None) -> str:
    """results.md: the machine, the command, then each section's method, table and plots."""
    plot_files = plot_files or {}
    lines = [
        f"Command: `{results.command}` ({results.date}, {results.elapsed_s / 60:.1f} min)",
        "",
        *machine_lines(results.machine),
    ]
    for section in results.sections:
        lines += ["", f"### {section.title}", "", section.method, "", *markdown_table(section)]
        lines += [""] + [f"- {note}" for note in section.notes] if section.notes else []
        for path in plot_files.get(section.name, []):
            lines += ["", f"![{section.title}]({path})"]
    return "\n".join(lines) + "\n"


def machine_lines(machine: dict[str, Any]) -> list[str]:
    rows = [("machine", ""), ("---", "---")] + [(k, str(v)) for k, v in machine.items()]
    return [f"| {k} | {md_cell(v)} |" for k, v in rows]


def markdown_table(section: Section) -> list[str]:
    if not section.columns:
        return []
    header, *body = section.table()
    align = ["---:" if i else "---" for i in range(len(header))]
    return ["| " + " | ".join(map(md_cell, row)) + " |" for row in [header, align, *body]]


def md_cell(text: str) -> str:
    return text.replace("|", "\\|")


def write(results: Results, out: Path) -> list[Path]:
    """results.json, results.md and the plots (when matplotlib is installed) into `out`."""
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(
        out / "results.json", (json.dumps(results.as_dict(), indent=2) + "\n").encode()
    )
    atomic_write_bytes(out / "results.md", markdown(results).encode())
    plot_files = draw_plots(results, out)
    if plot_files:
        names = {k: [p.name for p in v] for k, v in plot_files.items()}
        atomic_write_bytes(out / "results.md", markdown(results, names).encode())
    return [out / "results.json", out / "results.md", *(p for v in plot_files.values() for p in v)]


def matplotlib_available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def draw_plots(results: Results, out: Path) -> dict[str, list[Path]]:
    if not matplotlib_available():
        return {}
    drawn: dict[str, list[Path]] = {}
    for section in results.sections:
        for plot in section.plots:
            path = out / f"{section.name}-{plot.name}.png"
            temp = path.with_name(f".{path.name}.tmp.png")
            try:
                if draw(plot, section.rows, temp):
                    os.replace(temp, path)
                    drawn.setdefault(section.name, []).append(path)
            except Exception as exc:  # a plot is a picture of the tables: never lose them for it
                section.notes.append(f"plot {plot.name} not drawn: {exc}")
            finally:
                temp.unlink(missing_ok=True)
    return drawn


def draw(plot: Plot, rows: list[dict[str, Any]], path: Path) -> bool:
    """One PNG; False when no line has a point to draw."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    figure, axes = pyplot.subplots(figsize=(6, 4), dpi=100)
    drawn = 0
    for key, label in plot.lines:
        points = [(lookup(r, plot.x), lookup(r, key)) for r in rows]
        points = [(x, y) for x, y in points if x is not None and y is not None]
        if points:
            xs, ys = zip(*points, strict=True)
            axes.plot(xs, ys, marker="o", label=label)
            drawn += 1
    if drawn:
        axes.set_title(plot.title)
        axes.set_xlabel(plot.x_label)
        axes.set_ylabel(plot.y_label)
        if plot.log_y:
            axes.set_yscale("log")
        axes.grid(True, alpha=0.3)
        axes.legend()
        figure.tight_layout()
        figure.savefig(path)
    pyplot.close(figure)
    return bool(drawn)
