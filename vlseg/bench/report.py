"""Markdown reports with tables and PNG plots, plus a description of the machine they were measured on."""

from __future__ import annotations

import json
import math
import os
import platform
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from vlseg.viz import pyplot, save_figure

__all__ = ["Report", "fmt", "machine_info", "machine_lines", "bar_plot", "line_plot", "repo_root", "default_out_dir"]


def repo_root() -> Path:
    """The checkout holding ``vlseg/`` (editable install) -- where ``bundles/``, ``apps/`` and ``reports/`` live."""
    return Path(__file__).resolve().parents[2]


def default_out_dir(name: str) -> Path:
    return repo_root() / "reports" / name


def fmt(x: Any, digits: int = 3) -> str:
    """Human formatting for tables: ints with thousands separators, floats with ``digits`` significant decimals."""
    if x is None:
        return "-"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, int):
        return f"{x:,}"
    if isinstance(x, float):
        if math.isnan(x):
            return "n/a"
        if x != 0 and (abs(x) >= 1e5 or abs(x) < 10 ** (-digits)):
            return f"{x:.{digits - 1}e}"
        return f"{x:.{digits}f}"
    return str(x)


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict[str, Any]:
    """CPU, cores usable by this process, threads torch uses, memory, load at the time of the call, versions."""
    import torch

    info: dict[str, Any] = {
        "cpu": _cpu_model(),
        "logical_cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
    }
    try:
        import monai

        info["monai"] = monai.__version__
    except ImportError:  # pragma: no cover
        pass
    try:
        import psutil

        info["ram_gib"] = round(psutil.virtual_memory().total / 2**30, 1)
    except ImportError:  # pragma: no cover
        pass
    try:
        info["load_average_1min"] = round(os.getloadavg()[0], 2)
    except OSError:  # pragma: no cover
        pass
    return info


def machine_lines(info: Mapping[str, Any]) -> list[str]:
    load = info.get("load_average_1min")
    shared = ""
    if load is not None and info.get("usable_cores") and load > 1.25 * info["usable_cores"]:
        shared = " **(the machine was busy with other work: absolute times are pessimistic; ratios measured in the same run are the reliable part)**"
    return [
        f"- CPU: {info.get('cpu')} -- {info.get('usable_cores')} usable of {info.get('logical_cores')} logical cores, "
        f"torch uses {info.get('torch_threads')} threads; RAM {info.get('ram_gib', '?')} GiB",
        f"- load average (1 min) when the run started: {load}{shared}",
        f"- python {info.get('python')}, torch {info.get('torch')}, monai {info.get('monai', '?')}; {info.get('platform')}",
    ]


class Report:
    """Accumulates Markdown and raw results; :meth:`write` puts ``report.md`` and ``results.json`` in ``out_dir``."""

    def __init__(self, out_dir, title: str, command: str | None = None):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.title = title
        self.lines: list[str] = [f"# {title}", ""]
        self.results: dict[str, Any] = {"title": title}
        self.started = time.perf_counter()
        self.images: list[Path] = []
        if command:
            self.p(f"Reproduce: `{command}`")

    # -- Markdown pieces --------------------------------------------------------------------------------------
    def h2(self, text: str) -> None:
        self.lines += [f"## {text}", ""]

    def h3(self, text: str) -> None:
        self.lines += [f"### {text}", ""]

    def p(self, text: str) -> None:
        self.lines += [text, ""]

    def bullets(self, items: Iterable[str]) -> None:
        self.lines += [f"- {s}" if not s.startswith("- ") else s for s in items]
        self.lines.append("")

    def code(self, text: str, lang: str = "") -> None:
        self.lines += [f"```{lang}", text.rstrip("\n"), "```", ""]

    def table(self, headers: Sequence[str], rows: Iterable[Sequence[Any]], digits: int = 3) -> None:
        self.lines.append("| " + " | ".join(str(h) for h in headers) + " |")
        self.lines.append("|" + "|".join("---" for _ in headers) + "|")
        for row in rows:
            cells = [fmt(c, digits) if not isinstance(c, str) else c for c in row]
            self.lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
        self.lines.append("")

    def image(self, path, caption: str = "") -> None:
        path = Path(path)
        self.images.append(path)
        rel = os.path.relpath(path, self.out_dir)
        self.lines += [f"![{caption}]({rel})", ""]
        if caption:
            self.lines += [f"*{caption}*", ""]

    def machine(self, info: Mapping[str, Any] | None = None) -> dict[str, Any]:
        info = dict(info or machine_info())
        self.results["machine"] = info
        self.h2("Machine")
        self.lines += machine_lines(info) + [""]
        return info

    # -- output -----------------------------------------------------------------------------------------------
    def write(self) -> Path:
        elapsed = time.perf_counter() - self.started
        self.results["wall_seconds"] = round(elapsed, 1)
        text = "\n".join(self.lines).rstrip() + f"\n\n---\nGenerated in {elapsed:.0f} s wall time.\n"
        path = self.out_dir / "report.md"
        path.write_text(portable_paths(text))
        results = json.dumps(self.results, indent=2, default=_json_default) + "\n"
        (self.out_dir / "results.json").write_text(portable_paths(results))
        return path


def portable_paths(text: str) -> str:
    """Committed reports carry no machine paths: paths inside the repository become relative to it, paths in the
    home folder start with ``~``."""
    root = str(Path(__file__).resolve().parents[2]) + os.sep
    text = text.replace(root, "")
    home = os.path.expanduser("~").rstrip(os.sep)
    return text.replace(home + os.sep, "~" + os.sep) if home else text


def _json_default(o):
    try:
        import numpy as np

        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, np.ndarray):
            return o.tolist()
    except ImportError:  # pragma: no cover
        pass
    if isinstance(o, Path):
        return str(o)
    return str(o)


def bar_plot(path, groups: Sequence[str], series: Mapping[str, Sequence[float]], ylabel: str, title: str = "",
             errors: Mapping[str, Sequence[float]] | None = None, log: bool = False, ylim=None) -> Path:
    """Grouped bars: one group per entry of ``groups``, one bar per series."""
    import numpy as np

    plt = pyplot()
    names = list(series)
    width = 0.8 / max(1, len(names))
    x = np.arange(len(groups))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(groups) * max(1, len(names)) ** 0.5 + 2), 4.2))
    for i, name in enumerate(names):
        vals = np.array([np.nan if v is None else v for v in series[name]], dtype=float)
        err = None
        if errors and name in errors:
            err = np.array([0 if e is None else e for e in errors[name]], dtype=float)
        ax.bar(x + (i - (len(names) - 1) / 2) * width, vals, width, yerr=err, label=name, capsize=2)
    ax.set_xticks(x)
    ax.set_xticklabels(groups, rotation=30 if max((len(g) for g in groups), default=0) > 8 else 0, ha="right")
    ax.set_ylabel(ylabel)
    if log:
        ax.set_yscale("log")
    if ylim is not None:
        ax.set_ylim(*ylim)
    if title:
        ax.set_title(title)
    if len(names) > 1:
        ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return save_figure(fig, path)


def line_plot(path, series: Mapping[str, tuple[Sequence[float], Sequence[float]]], xlabel: str, ylabel: str,
              title: str = "", bands: Mapping[str, Sequence[float]] | None = None, hlines: Mapping[str, float] | None = None,
              diagonal: bool = False) -> Path:
    """One line per series ``name -> (x, y)``; optional +-band per series, horizontal reference lines, y = x."""
    import numpy as np

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for name, (xs, ys) in series.items():
        xs, ys = np.asarray(xs, dtype=float), np.asarray(ys, dtype=float)
        (line,) = ax.plot(xs, ys, marker="o", ms=4, label=name)
        if bands and name in bands:  # the band in its line's colour
            b = np.asarray(bands[name], dtype=float)
            ax.fill_between(xs, ys - b, ys + b, alpha=0.2, color=line.get_color(), label=f"{name} ± std")
    for name, y in (hlines or {}).items():
        ax.axhline(y, ls="--", lw=1, color="grey")
        ax.text(ax.get_xlim()[0], y, f" {name}", va="bottom", fontsize=8, color="grey")
    if diagonal:
        ax.plot([0, 1], [0, 1], ls=":", color="black", lw=1, label="perfect calibration")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, path)
