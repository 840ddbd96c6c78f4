"""MkDocs hooks: the pages generated at build time, never committed.

- `running.md`: the configuration table, from `mekd_fl.config.settings_table()` (the settings schema),
  replaces the marker `<!-- settings-table -->`.
- `benchmarks/<study>/index.md`: one page per study folder in `experiments/results/`, from its report
  (`report.md`, else `README.md`, else its one Markdown file), with the study's PNG plots beside it.
- the list of those pages, injected into `benchmarks/index.md` at `<!-- studies -->`.
- `reference/<module>.md`: one mkdocstrings page per module a Flower user imports (`REFERENCE`): a
  package's page documents each name of its `__all__`, a module's page the module. A public name
  without a docstring is a warning, so `mkdocs build --strict` fails on it.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import re
import warnings
from pathlib import Path

from mkdocs.structure.files import File, Files

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "experiments" / "results"
TABLE_MARKER = "<!-- settings-table -->"
STUDIES_MARKER = "<!-- studies -->"
log = logging.getLogger("mkdocs.hooks.mekd")

#: The modules of the generated API reference: those tests/test_api_reference.py checks docs/api.md for.
REFERENCE = (
    "strategies",
    "mekd_fl.client",
    "mekd_fl.client.handlers",
    "mekd_fl.client.edge",
    "mekd_fl.teacher",
    "mekd_fl.teacher.oracle",
    "mekd_fl.teacher.app",
    "mekd_fl.teacher.answer_cache",
)


def public_names(module_name: str) -> list[str]:
    """`__all__` of the module when it has one, else its own public classes and functions."""
    module = importlib.import_module(module_name)
    if hasattr(module, "__all__"):
        return list(module.__all__)
    return [
        name
        for name, obj in vars(module).items()
        if not name.startswith("_")
        and (inspect.isclass(obj) or inspect.isfunction(obj))
        and getattr(obj, "__module__", None) == module_name
    ]


def reference_page(module_name: str) -> str:
    """A mkdocstrings page; warns (a strict build fails) for each public name without a docstring."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the Flower and click imports' deprecation notices
        module = importlib.import_module(module_name)
        names = public_names(module_name)
        objects = {name: getattr(module, name) for name in names}
    for name, obj in objects.items():
        if not (getattr(obj, "__doc__", None) or "").strip():
            log.warning("%s.%s is public but has no docstring", module_name, name)
    lines = [f"# `{module_name}`", ""]
    if hasattr(module, "__all__"):
        lines += [(module.__doc__ or "").strip(), ""]
        for name, obj in objects.items():
            # lazy exports (PEP 562) are invisible to static analysis: document each where it is defined
            path = obj.__name__ if inspect.ismodule(obj) else f"{obj.__module__}.{name}"
            home = path if inspect.ismodule(obj) else obj.__module__
            if home in REFERENCE and home != module_name:  # documented once, on its module's page
                anchor = "" if inspect.ismodule(obj) else f"#{path}"
                lines += [f"- [`{module_name}.{name}`]({home}.md{anchor}): documented in `{home}`", ""]
                continue
            lines += [f"::: {path}", "    options:", "      show_root_heading: true", ""]
    else:
        lines += [f"::: {module_name}", ""]
    lines += ["The hand-written entries, with every parameter: [API reference](../api.md).", ""]
    return "\n".join(lines)


def report_of(study: Path) -> Path | None:
    """The Markdown file a study folder is read through."""
    for name in ("report.md", "README.md"):
        if (study / name).is_file():
            return study / name
    found = sorted(study.glob("*.md"))
    return found[0] if found else None


def studies() -> list[tuple[str, Path]]:
    """(name, report) of every study folder under experiments/results/, in name order."""
    found = []
    for study in sorted(p for p in RESULTS.iterdir() if p.is_dir()):
        report = report_of(study)
        if report is not None:
            found.append((study.name, report))
    return found


def title_of(text: str, fallback: str) -> str:
    match = re.search(r"^# (.+)$", text, re.M)
    return match.group(1).strip() if match else fallback


def study_page(name: str, report: Path) -> str:
    """The report, with links to files that are not plots turned into code spans (they stay in the
    repository, `experiments/results/<study>/`), and a line saying where it comes from."""
    text = report.read_text()
    plots = {p.name for p in report.parent.glob("*.png")}

    def link(match: re.Match[str]) -> str:
        label, target = match.group(1), match.group(2)
        if target.startswith(("http://", "https://", "#")) or target in plots:
            return match.group(0)
        return f"{label} (`experiments/results/{name}/{target}`)"

    text = re.sub(r"(?<!!)\[([^\]]*)\]\(([^)\s]+)\)", link, text)
    if not re.search(r"^# ", text, re.M):
        text = f"# {name}\n\n{text}"
    source = f"`experiments/results/{name}/{report.name}`"
    redraw = f"`mekd-fl report experiments/results/{name}`"
    return f"{text.rstrip()}\n\n---\n\nGenerated from {source}; redraw it with {redraw}.\n"


def studies_list() -> str:
    lines = []
    for name, report in studies():
        lines.append(f"- [{title_of(report.read_text(), name)}]({name}/index.md) (`experiments/results/{name}/`)")
    return "\n".join(lines)


def on_files(files: Files, config) -> Files:
    for module_name in REFERENCE:
        files.append(File.generated(config, f"reference/{module_name}.md", content=reference_page(module_name)))
    for name, report in studies():
        files.append(File.generated(config, f"benchmarks/{name}/index.md", content=study_page(name, report)))
        for plot in sorted(report.parent.glob("*.png")):
            files.append(File.generated(config, f"benchmarks/{name}/{plot.name}", abs_src_path=str(plot)))
    return files


def on_page_markdown(markdown: str, page, config, files) -> str:
    if TABLE_MARKER in markdown:
        from mekd_fl.config import settings_table

        markdown = markdown.replace(TABLE_MARKER, settings_table())
    if STUDIES_MARKER in markdown:
        markdown = markdown.replace(STUDIES_MARKER, studies_list())
    return markdown


def on_config(config):
    """List every study page under "Benchmarks" in the navigation."""
    for entry in config["nav"] or []:
        if isinstance(entry, dict) and "Benchmarks" in entry:
            entry["Benchmarks"] += [{name: f"benchmarks/{name}/index.md"} for name, _ in studies()]
    return config
