"""The console's one catalogue of texts, in Simplified Chinese and English.

The YAML files of ``catalogue/`` (one per area of the console, merged; a key in two
files is an error) map each key to its texts: ``nav.devices: {en: Devices, zh: 设备}``.
Templates translate with ``t("nav.devices")``; the page carries the catalogue of its
language for its modules (``t()`` in ``static/js/i18n.js``). Statuses, stop reasons and
units are keys too (``order_status.charging``, ``stop_reason.full``), so everything a
user reads comes from here. A test checks that every key has both languages and that
every key the templates and modules use exists.
"""

from __future__ import annotations

import functools
from importlib import resources
from typing import Any

import yaml

__all__ = ["LANGUAGES", "catalogue", "negotiate", "translate"]

#: the console's languages, the default first
LANGUAGES = ("zh", "en")


@functools.cache
def _entries() -> dict[str, dict[str, str]]:
    merged: dict[str, dict[str, str]] = {}
    folder = resources.files("chargegw.console") / "catalogue"
    for entry in sorted(folder.iterdir(), key=lambda e: e.name):
        if not entry.name.endswith(".yaml"):
            continue
        loaded: dict[str, dict[str, str]] = yaml.safe_load(entry.read_text("utf-8")) or {}
        for key, texts in loaded.items():
            if key in merged:
                raise ValueError(f"console catalogue: {key} is in two files ({entry.name})")
            merged[key] = texts
    return merged


@functools.cache
def catalogue(lang: str) -> dict[str, str]:
    """Every text of ``lang``, by key."""
    return {key: texts[lang] for key, texts in _entries().items()}


def translate(lang: str, key: str, **values: Any) -> str:
    """The text of ``key`` in ``lang`` with ``{name}`` fields filled; the key itself when
    the catalogue lacks it (a test keeps that from shipping)."""
    text = catalogue(lang).get(key, key)
    return text.format(**values) if values else text


def negotiate(chosen: str | None, accept_language: str | None) -> str:
    """The page's language: the one the user chose (cookie), else the browser's first
    language the console has (``zh-CN``, ``zh-TW`` and ``zh`` all give ``zh``), else
    Chinese."""
    if chosen in LANGUAGES:
        return chosen
    ranked: list[tuple[float, str]] = []
    for part in (accept_language or "").split(",")[:20]:
        tag, _, params = part.strip().partition(";")
        quality = 1.0
        if params.strip().startswith("q="):
            try:
                quality = float(params.strip()[2:])
            except ValueError:
                quality = 0.0
        base = tag.strip().lower().split("-")[0]
        if base in LANGUAGES and quality > 0:
            ranked.append((quality, base))
    if ranked:
        return max(ranked, key=lambda r: r[0])[1]
    return LANGUAGES[0]
