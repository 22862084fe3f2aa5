"""Cut text for TTS into sentences (and, for the first piece of a stream, a clause) [pure].

Text arrives in chunks (an LLM's tokens, ``streaming`` tts commands); a piece is handed to the
synthesizer as soon as it is certainly complete, so the first audio starts early.  Rules:

* a piece ends after ``. ! ? ; …`` (a run of them, plus closing quotes/brackets) followed by white
  space, after CJK ``。！？；`` (no space needed), and at a newline;
* not inside numbers (``3.5``, ``1,000``, ``10:30``, ``v1.2.3``: the mark is not followed by space),
  not after common abbreviations (``Mr.``, ``e.g.``, ``U.S.``...), single initials (``J. R. R.``) or a
  list number opening the piece (``1. First``), and never inside ``<tag>``, ``[...]`` or ``{...}``
  markup closed within ``MAX_MARKUP_CHARS`` (a longer "tag" is plain text);
* the first piece of a stream may also end at a clause mark (``, : — –`` + space, ``，、``) once it
  holds at least 4 words or 6 CJK characters;
* a piece reaching ``max_chars`` is cut at its last clause mark, else its last space, else hard.

Every decision looks at a bounded amount of text after the cut point and is only taken when that
text has arrived (or the stream ended), so the pieces never depend on how the text was chunked.
"""

from __future__ import annotations

import re
from typing import Optional

__all__ = ["TextSplitter", "split_text", "MAX_PIECE_CHARS", "MAX_MARKUP_CHARS"]

MAX_PIECE_CHARS = 200
MAX_MARKUP_CHARS = 100
_FIRST_CLAUSE_WORDS = 4
_FIRST_CLAUSE_CJK = 6

_SENTENCE_END = frozenset(".!?;…")
_CJK_END = frozenset("。！？；")
_CLOSERS = frozenset("\"')]}»”’」』）】")
_CLAUSE = frozenset(",:—–")
_CJK_CLAUSE = frozenset("，、")
_OPENERS = {"<": ">", "[": "]", "{": "}"}
_LEADING = "\"'([{“‘«「『（【"
_ABBREVIATIONS = frozenset(
    """Mr. Mrs. Ms. Dr. Prof. St. Sr. Jr. Mt. Ft. Gen. Col. Capt. Lt. Sgt. Rev. Hon. Gov. Sen. Rep.
    vs. Vs. etc. Etc. No. Nos. Nr. Inc. Ltd. Co. Corp. approx. Approx. dept. Dept. est. fig. Fig.
    Jan. Feb. Mar. Apr. Jun. Jul. Aug. Sep. Sept. Oct. Nov. Dec. ca. cf. al. Ave. Blvd. Rd.""".split()
)
_DOTTED = re.compile(r"[A-Z]\.|(?:[A-Za-z]\.){2,}")  # single initials; e.g. i.e. a.m. U.S.
_LIST_NUMBER = re.compile(r"\d{1,3}\.")
_WAIT = -1


def _is_cjk(ch: str) -> bool:
    o = ord(ch)
    return 0x3040 <= o <= 0x30FF or 0x3400 <= o <= 0x4DBF or 0x4E00 <= o <= 0x9FFF or 0xAC00 <= o <= 0xD7AF


def _markup_end(text: str, i: int, final: bool) -> Optional[int]:
    """End (exclusive) of the markup span opening at ``text[i]``, None if it is not one, _WAIT if unknown yet."""
    ch = text[i]
    if ch == "<":
        if i + 1 >= len(text):
            return None if final else _WAIT
        nxt = text[i + 1]
        if not (nxt.isalpha() or nxt in "/!?"):
            return None
    close = text.find(_OPENERS[ch], i + 1, i + 1 + MAX_MARKUP_CHARS)
    if close >= 0:
        return close + 1
    if not final and len(text) < i + 1 + MAX_MARKUP_CHARS:
        return _WAIT
    return None


def _no_sentence_end(text: str, start: int, dot: int) -> bool:
    """Whether the ``.`` at ``dot`` ends an abbreviation, an initial or a list number rather than a sentence."""
    ws = dot
    while ws > start and not text[ws - 1].isspace():
        ws -= 1
    token = text[ws:dot + 1].lstrip(_LEADING)
    if token in _ABBREVIATIONS or _DOTTED.fullmatch(token):
        return True
    return ws == start and _LIST_NUMBER.fullmatch(token) is not None


def _clause_ready(text: str, start: int, end: int) -> bool:
    piece = text[start:end]
    return len(piece.split()) >= _FIRST_CLAUSE_WORDS or sum(map(_is_cjk, piece)) >= _FIRST_CLAUSE_CJK


def _long_cut(text: str, start: int, limit: int, final: bool) -> int:
    """Where to cut a piece that reached ``limit``: last clause mark, else last space, else last point outside markup."""
    clause = space = None
    free = start
    i = start
    while i < limit:
        ch = text[i]
        if ch in _OPENERS:
            end = _markup_end(text, i, final)
            if end is not None and end != _WAIT:
                if end > limit:
                    break
                i = end
                free = i
                continue
        if ch in _CJK_CLAUSE or (ch in _CLAUSE and i + 1 < len(text) and text[i + 1].isspace()):
            clause = i + 1
        elif ch.isspace() and i > start:
            space = i
        i += 1
        free = i
    return clause or space or max(free, start + 1)


def _next_cut(text: str, start: int, pos: int, final: bool, clause: bool, max_chars: int) -> tuple[Optional[int], int]:
    """Scan ``text`` from ``pos`` for the end of the piece that starts at ``start``.

    Returns ``(cut, pos)``: ``cut`` is the piece's end (exclusive), or None when more text is
    needed, with ``pos`` where the scan should resume.
    """
    n = len(text)
    limit = start + max_chars
    i = pos
    while i < n:
        if i >= limit:
            return _long_cut(text, start, limit, final), 0
        ch = text[i]
        if ch in _OPENERS:
            end = _markup_end(text, i, final)
            if end == _WAIT:
                return None, i
            if end is not None:
                i = end
                continue
        if ch == "\n":
            return i + 1, 0
        if ch in _SENTENCE_END or ch in _CJK_END:
            j = i + 1
            cjk = ch in _CJK_END
            while j < n and (text[j] in _SENTENCE_END or text[j] in _CJK_END or text[j] in _CLOSERS):
                cjk = cjk or text[j] in _CJK_END
                j += 1
            if j == n:
                if not final:
                    return None, i
                return n, 0
            if cjk or (text[j].isspace() and not (j == i + 1 and ch == "." and _no_sentence_end(text, start, i))):
                return j, 0
            i = j
            continue
        if clause and (ch in _CJK_CLAUSE or ch in _CLAUSE):
            if ch in _CLAUSE:
                if i + 1 >= n:
                    if not final:
                        return None, i
                elif text[i + 1].isspace() and _clause_ready(text, start, i + 1):
                    return i + 1, 0
            elif _clause_ready(text, start, i + 1):
                return i + 1, 0
        i += 1
    return (n, 0) if final else (None, n)


class TextSplitter:
    """Splits a stream of text chunks into pieces ready to synthesize.

    ``first_clause``: let the first piece end at a clause mark so the first audio starts early.
    """

    def __init__(self, *, first_clause: bool = True, max_chars: int = MAX_PIECE_CHARS) -> None:
        self._buf = ""
        self._pos = 0  # where the scan of the current piece resumes
        self._first_clause = first_clause
        self._clause = first_clause
        self._max_chars = max_chars

    def feed(self, chunk: str) -> list[str]:
        """Add ``chunk``; return the pieces it completed (possibly none)."""
        self._buf += chunk
        return self._drain(final=False)

    def flush(self) -> list[str]:
        """End of the stream: return the remaining pieces; the splitter can start a new stream."""
        out = self._drain(final=True)
        self._buf, self._pos, self._clause = "", 0, self._first_clause
        return out

    def _drain(self, final: bool) -> list[str]:
        out: list[str] = []
        while True:
            start = len(self._buf) - len(self._buf.lstrip())
            if start:
                self._buf = self._buf[start:]
                self._pos = max(0, self._pos - start)
            if not self._buf:
                return out
            cut, pos = _next_cut(self._buf, 0, self._pos, final, self._clause, self._max_chars)
            if cut is None:
                self._pos = pos
                return out
            piece = self._buf[:cut].strip()
            self._buf, self._pos = self._buf[cut:], 0
            if piece:
                out.append(piece)
                self._clause = False


def split_text(text: str, *, max_chars: int = MAX_PIECE_CHARS) -> list[str]:
    """Split a whole (non-streamed) text into sentences, by the same rules without the clause rule."""
    splitter = TextSplitter(first_clause=False, max_chars=max_chars)
    return splitter.feed(text) + splitter.flush()
