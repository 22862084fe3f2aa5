"""Spoken choices: a final transcript acting as a ``<dtmf … words="…"/>`` digit (playbook.md §5, §8.5).

:func:`match_words` says which digit, if any, a caller chose by voice.  A phrase matches as
whole words, case-insensitively, with punctuation ignored ("Sales, please." chooses ``sales``;
"wholesale" does not).  A phrase holding CJK characters matches as a substring with all spaces
removed, since those scripts put no spaces between words (and ASR output may put some anywhere).

Pure module: stdlib and the playbook model only.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Mapping

from activecall.playbook.model import PSEUDO_DIGITS

__all__ = ["MAX_TEXT_CHARS", "match_words"]

#: Longest transcript looked at; the rest is ignored (a choice is said at the start anyway).
MAX_TEXT_CHARS = 2000
# Pseudo digits (playbook.md §8.5) are taken on no input / no match, never by a phrase.
_PSEUDO = frozenset(PSEUDO_DIGITS)
# Letters and digits of any script are word characters; everything else separates words.
_SEPARATORS = re.compile(r"[\W_]+")
_CJK = re.compile(
    "[\u2e80-\u2fdf\u3040-\u30ff\u3100-\u312f\u3190-\u31ff\u3400-\u4dbf\u4e00-\u9fff"
    "\ua960-\ua97f\uac00-\ud7ff\uf900-\ufaff\uff66-\uff9f]"
)


def _normalize(text: str) -> str:
    """NFKC (full-width letters become ASCII), case-folded, punctuation runs as one space."""
    folded = unicodedata.normalize("NFKC", text).casefold()
    return " " + _SEPARATORS.sub(" ", folded).strip() + " "


def match_words(text: str, scene_words: Mapping[str, tuple[str, ...]]) -> str | None:
    """The digit of the first tag (in tag order) one of whose phrases ``text`` contains, else ``None``."""
    if not text or not scene_words:
        return None
    spaced = _normalize(text[:MAX_TEXT_CHARS])
    compact: str | None = None
    for digit, phrases in scene_words.items():
        if digit in _PSEUDO:
            continue
        for phrase in phrases:
            wanted = _normalize(phrase)
            if wanted == "  ":  # only punctuation: matches nothing
                continue
            if _CJK.search(wanted):
                if compact is None:
                    compact = spaced.replace(" ", "")
                if wanted.replace(" ", "") in compact:
                    return digit
            elif wanted in spaced:
                return digit
    return None
