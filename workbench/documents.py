"""Report documents: one list of sections rendered to Markdown and to self-contained HTML (a jinja2
template, images inlined), written atomically beside their PNGs."""

from __future__ import annotations

import base64
import html
import math
from pathlib import Path
from typing import Any

import jinja2
import numpy as np
from servebench.workbench.runs import atomic_path

# A section is (title, kind, content): kind "table" -> (header, rows), "image" -> (file name, PNG bytes),
# "code" -> YAML text, "text" -> Markdown prose. One list renders to both Markdown and HTML.
Section = tuple[str, str, Any]

# html.escape, not jinja2's autoescape: the same entities as the reports written so far, byte for byte.
_HTML = jinja2.Environment(autoescape=False, keep_trailing_newline=True, undefined=jinja2.StrictUndefined)
_HTML.filters["esc"] = lambda value: html.escape(str(value))
_HTML.filters["b64"] = lambda data: base64.b64encode(data).decode()
HTML_TEMPLATE = _HTML.from_string("""\
<!doctype html><html><head><meta charset='utf-8'><title>{{ title|esc }}</title><style>\
body{font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:collapse}\
td,th{border:1px solid #ccc;padding:2px 8px}img{max-width:100%}\
pre{background:#f6f6f6;padding:1em}.text{white-space:pre-wrap}\
</style></head><body><h1>{{ title|esc }}</h1>
{% for name, kind, content in sections -%}
<h2>{{ name|esc }}</h2>
{% if kind == "table" -%}
<table><tr>{% for cell in content[0] %}<th>{{ cell|esc }}</th>{% endfor %}</tr>
{%- for row in content[1] %}<tr>{% for cell in row %}<td>{{ cell|esc }}</td>{% endfor %}</tr>{% endfor -%}
</table>
{% elif kind == "image" -%}
<img alt='{{ name|esc }}' src='data:image/png;base64,{{ content[1]|b64 }}'>
{% elif kind == "text" -%}
<div class='text'>{{ content|esc }}</div>
{% else -%}
<pre>{{ content|esc }}</pre>
{% endif -%}
{% endfor -%}
</body></html>
""")


def write_document(folder: Path, stem: str, title: str, sections: list[Section]) -> Path:
    """{stem}.md and {stem}.html (and each image section's PNG) into folder; returns the Markdown's path."""
    folder.mkdir(parents=True, exist_ok=True)
    for _, kind, content in sections:
        if kind == "image":
            _atomic_write(folder / content[0], content[1])
    _atomic_write(folder / f"{stem}.html", HTML_TEMPLATE.render(title=title, sections=sections).encode())
    _atomic_write(folder / f"{stem}.md", _markdown(title, sections).encode())
    return folder / f"{stem}.md"


def _atomic_write(path: Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def _markdown(title: str, sections: list[Section]) -> str:
    out = [f"# {title}"]
    for name, kind, content in sections:
        out.append(f"## {name}")
        if kind == "table":
            header, rows = content
            out.append("\n".join("| " + " | ".join(map(str, r)) + " |"
                                  for r in [header, ["---"] * len(header), *rows]))
        elif kind == "image":
            out.append(f"![{name}]({content[0]})")
        elif kind == "text":
            out.append(content.rstrip())
        else:
            out.append(f"```yaml\n{content.rstrip()}\n```")
    return "\n\n".join(out) + "\n"


def fmt(value: Any) -> str:
    """A table cell: floats to 4 significant digits (NaN as n/a), anything else as str()."""
    if isinstance(value, float | np.floating):
        return "n/a" if math.isnan(value) else f"{value:.4g}"
    return str(value)
