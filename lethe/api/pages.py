"""Server-rendered pages (Jinja2, autoescaped): the printable certificate, and the console's."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from jinja2 import Environment, FileSystemLoader, select_autoescape

from lethe.contracts import Certificate, Decision

TEMPLATES = Path(__file__).resolve().parent / "templates"
STATIC = Path(__file__).resolve().parent / "static"

environment = Environment(
    loader=FileSystemLoader(TEMPLATES),
    autoescape=select_autoescape(["html"]),
    trim_blocks=True,
    lstrip_blocks=True,
)


def legal_bases(decisions: Iterable[Decision]) -> str:
    """A step's legal bases: its decisions' citations, each part once, in order."""
    parts = [part.strip() for d in decisions for part in d.citation.split(";")]
    return "; ".join(dict.fromkeys(part for part in parts if part))


environment.filters["bases"] = legal_bases


def certificate_page(certificate: Certificate) -> str:
    """The certificate as a page to print or keep (no script)."""
    return environment.get_template("certificate.html").render(
        c=certificate, summary=certificate.summary()
    )
