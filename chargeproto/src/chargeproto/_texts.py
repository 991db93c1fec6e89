"""One object for a text that many frames repeat (a device's id)."""

from __future__ import annotations

#: distinct texts kept before the table starts again: a sender of ever new ids costs at
#: most this many (about 14 MiB), not memory without end as ``sys.intern`` would on
#: Python builds whose interned strings are immortal (3.12.0-3.12.5, free-threaded)
MAX_SHARED_TEXTS = 1 << 17

_texts: dict[str, str] = {}


def shared_text(text: str) -> str:
    """``text``, or the equal text returned before: one object for the copy every frame
    brings. The codec's decoded ids (AP3000 ``phy_id``, BKV ``gateway_id``) come from
    here; a receiver that keeps ids for a long time can pass ids it composes itself."""
    found = _texts.get(text)
    if found is None:
        if len(_texts) >= MAX_SHARED_TEXTS:
            _texts.clear()
        found = _texts[text] = text
    return found
