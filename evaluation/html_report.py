"""``report.html``: what ``report.md`` holds (``report.report_blocks``) as one page, with the
SI-SDRi histogram shown and, for each example, its spectrograms beside an audio player for each
of its four signals.

The page is ``templates/report.html`` (``string.Template``) with the blocks as its body; every
text is escaped (``html.escape``) as it enters the markup. Images and audio are the files the
evaluation writes beside the report, referred to by relative paths rather than inlined: the
twelve example WAVs hold up to 30 s each, too much for data URIs, and the output folder stays
movable as a whole.
"""

from __future__ import annotations

import html
import re
from collections.abc import Sequence
from pathlib import Path
from string import Template
from typing import Any
from urllib.parse import quote

from evaluation.report import (
    Block,
    Examples,
    Heading,
    Image,
    Item,
    Items,
    Paragraph,
    Table,
    fmt,
    report_blocks,
)

HTML_NAME = "report.html"
TEMPLATE = Path(__file__).parent / "templates" / "report.html"
CODE_SPAN = re.compile(r"`([^`]*)`")
# The players in the order and with the names of the spectrogram figure's rows.
SIGNAL_NAMES = {"mix": "mixture", "ref": "reference", "estimate": "estimate",
                "target": "target"}


def _text(text: str) -> str:
    """Markdown inline text (``report.Block``) as HTML: escaped, its `code` spans as code."""
    return CODE_SPAN.sub(r"<code>\1</code>", html.escape(text))


def _src(path: str) -> str:
    """A path relative to the report as an attribute value."""
    return html.escape(quote(path))


def _example(label: str, example: dict[str, Any]) -> str:
    alt = html.escape(f"{label}: spectrograms of the mixture, reference, estimate and target")
    players = "".join(
        f'<li><span>{html.escape(SIGNAL_NAMES.get(name, name))}</span>'
        f'<audio controls preload="metadata" src="{_src(path)}"></audio></li>'
        for name, path in example["audio"].items())
    return (f'<section id="example-{html.escape(label)}">'
            f'<h3>{html.escape(label)}: <code>{html.escape(example["id"])}</code>, SI-SDRi '
            f'{html.escape(fmt(example["si_sdri"], "+.2f", " dB"))}</h3>'
            f'<div class="example"><a href="{_src(example["spectrogram"])}">'
            f'<img src="{_src(example["spectrogram"])}" alt="{alt}"></a>'
            f'<ul class="players">{players}</ul></div></section>')


def _html(block: Block) -> str:
    match block:
        case Heading(text, level):
            return f"<h{level}>{_text(text)}</h{level}>"
        case Paragraph(text):
            return f"<p>{_text(text)}</p>"
        case Items(items):
            entries = []
            for item in items:
                item = item if isinstance(item, Item) else Item(item)
                sub = "".join(f"<li>{_text(s)}</li>" for s in item.sub)
                entries.append(f"<li>{_text(item.text)}{f'<ul>{sub}</ul>' if sub else ''}</li>")
            return f"<ul>{''.join(entries)}</ul>"
        case Table(header, rows):
            head = "".join(f"<th>{_text(h)}</th>" for h in header)
            body = "".join("<tr>" + "".join(f"<td>{_text(c)}</td>" for c in row) + "</tr>"
                           for row in rows)
            return (f'<div class="table"><table><thead><tr>{head}</tr></thead>'
                    f"<tbody>{body}</tbody></table></div>")
        case Image(alt, src):
            return f'<figure><img src="{_src(src)}" alt="{html.escape(alt)}"></figure>'
        case Examples(examples):
            return "\n".join(_example(label, ex) for label, ex in examples.items())
    raise TypeError(f"not a report block: {block!r}")


def render_html(info: dict[str, Any], summary: dict[str, Any], rows: Sequence[dict],
                columns: Sequence[str]) -> str:
    """The HTML report of the same content as ``report.render_report``'s Markdown."""
    blocks = report_blocks(info, summary, rows, columns)
    return Template(TEMPLATE.read_text(encoding="utf-8")).substitute(
        title=html.escape(f"HiFi-TSE evaluation: {info['checkpoint']}"),
        body="\n".join(_html(b) for b in blocks),
    )
