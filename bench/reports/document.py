"""A report as a list of blocks, rendered to Markdown (figures linked) or self-contained HTML
(figures embedded as base64 PNG). One structure feeds both, so ``report.md`` and ``report.html`` agree.
"""

from __future__ import annotations

import base64
import html
import os
from dataclasses import dataclass, field
from pathlib import Path

from bench.reports.tables import Table, md_escape, to_html, to_markdown

CSS = """body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;max-width:1100px;margin:2em auto;
padding:0 1em;color:#222;line-height:1.45}table{border-collapse:collapse;margin:.6em 0 1.2em;font-size:.92em}
th,td{border-bottom:1px solid #ccc;padding:.25em .6em;text-align:center}td:first-child,th:first-child{
text-align:left}thead th{border-bottom:2px solid #444}caption{caption-side:bottom;font-size:.85em;color:#555;
text-align:left;padding-top:.4em}pre{background:#f5f5f5;padding:.8em;overflow-x:auto;font-size:.85em}
img{max-width:100%;display:block;margin:.5em 0 .3em}figure{margin:0 0 1.5em}figcaption{font-size:.85em;
color:#555}ul.notes{font-size:.85em;color:#555}"""


@dataclass
class Document:
    title: str
    blocks: list[tuple[str, object]] = field(default_factory=list)

    def heading(self, text: str, level: int = 2) -> None:
        self.blocks.append(("heading", (level, text)))

    def para(self, text: str) -> None:
        self.blocks.append(("para", text))

    def bullets(self, items: list[str]) -> None:
        if items:
            self.blocks.append(("bullets", list(items)))

    def code(self, text: str) -> None:
        self.blocks.append(("code", text))

    def table(self, table: Table) -> None:
        self.blocks.append(("table", table))

    def image(self, path: Path, alt: str, caption: str = "") -> None:
        """A PNG figure; ``caption`` is printed under it (captions are never baked into the image)."""
        self.blocks.append(("image", (Path(path), alt, caption)))

    def markdown(self, base: Path) -> str:
        """Markdown with figures linked relative to ``base`` (the folder report.md lives in)."""
        out = [f"# {md_escape(self.title)}", ""]
        for kind, value in self.blocks:
            if kind == "heading":
                out += ["#" * value[0] + " " + md_escape(value[1]), ""]
            elif kind == "para":
                out += [md_escape(value), ""]
            elif kind == "bullets":
                out += [f"- {md_escape(v)}" for v in value] + [""]
            elif kind == "code":
                out += ["```", value.rstrip(), "```", ""]
            elif kind == "table":
                out += [to_markdown(value)]
            elif kind == "image":
                rel = Path(os.path.relpath(value[0], base)).as_posix()
                out += [f"![{md_escape(value[1])}]({rel})", ""]
                if value[2]:
                    out += [f"*{md_escape(value[2])}*", ""]
        return "\n".join(out).rstrip() + "\n"

    def html(self) -> str:
        """A single self-contained HTML page (PNG figures inlined as data URIs)."""
        out = [f"<h1>{html.escape(self.title)}</h1>"]
        for kind, value in self.blocks:
            if kind == "heading":
                out.append(f"<h{value[0]}>{html.escape(value[1])}</h{value[0]}>")
            elif kind == "para":
                out.append(f"<p>{html.escape(value)}</p>")
            elif kind == "bullets":
                out.append("<ul>" + "".join(f"<li>{html.escape(v)}</li>" for v in value) + "</ul>")
            elif kind == "code":
                out.append(f"<pre>{html.escape(value)}</pre>")
            elif kind == "table":
                out.append(to_html(value))
            elif kind == "image":
                data = base64.b64encode(value[0].read_bytes()).decode("ascii")
                caption = f"<figcaption>{html.escape(value[2])}</figcaption>" if value[2] else ""
                out.append(f'<figure><img alt="{html.escape(value[1])}" src="data:image/png;base64,{data}">'
                           f"{caption}</figure>")
        body = "\n".join(out)
        return (f"<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'><title>{html.escape(self.title)}"
                f"</title><style>{CSS}</style></head><body>\n{body}\n</body></html>\n")
