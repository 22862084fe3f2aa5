"""References such as "protocol.md §5.4" in the code resolve to a document and a section under docs/.

The code cites four reference documents by name and section: ``protocol.md``, ``config.md``,
``playbook.md`` and ``providers.md`` (also as ``docs/…``, ``spec/…``, and "spec §…" for the
protocol). A section is a Markdown heading that starts with its number (``### 12.1 …``,
``## 14a. …``); "§6.20" or "§2.1" may also name item 20 or 1 of a numbered list directly under
heading §6 or §2 ("§6 item 20"). A bare "§…" belongs to the last document named earlier on the same
line, else to the one document the first line of the file's docstring names (when the docstring
mentions no RFC);
"RFC nnnn" and "STYLE" end the attribution, so RFC sections are never checked here.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from activecall.config import parse_config

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
SCANNED = ("activecall", "twisted", "tests", "benchmarks")
CITED = ("protocol", "config", "playbook", "providers")

_HEADING = re.compile(r"#{1,6}\s+(\d+[a-z]?(?:\.\d+)*)\.?\s")
_ANY_HEADING = re.compile(r"#{1,6}\s")
_SEC = r"\d+[a-z]?(?:\.\d+)*"
_TOKEN = re.compile(
    r"(?<![\w-])(?:docs/|spec/)?(?P<doc>" + "|".join(CITED) + r")\.md"
    r"|(?P<spec>\bspec)(?=\s*§)"
    r"|(?P<stop>\bRFC\s*\d+|\bSTYLE\b)"
    rf"|§\s?(?P<sec>{_SEC})(?:\s*[–-]\s*§?(?P<end>{_SEC}))?"
)
# Other documents named by path, e.g. "docs/security.md".
_DOCS_PATH = re.compile(r"(?<![\w/])docs/([\w.-]+\.md)")


def sections(text: str) -> dict[str, list[str]]:
    """Section number -> the lines between its heading and the next heading (any level)."""
    out: dict[str, list[str]] = {}
    body: list[str] | None = None
    for line in text.splitlines():
        m = _HEADING.match(line)
        if m is not None:
            body = out.setdefault(m.group(1), [])
            continue
        if _ANY_HEADING.match(line):
            body = None
            continue
        if body is not None:
            body.append(line)
    return out


def resolves(doc_sections: dict[str, list[str]], section: str) -> bool:
    """Whether ``section`` is a heading, or item M of the numbered list under heading N ("N.M")."""
    if section in doc_sections:
        return True
    parent, _, item = section.rpartition(".")
    if not parent or parent not in doc_sections or not item.isdigit():
        return False
    item_line = re.compile(rf"\s*{item}\.\s")
    return any(item_line.match(line) for line in doc_sections[parent])


def _file_default(path: Path, text: str) -> str | None:
    """The document bare "§" references of this file belong to: the one its docstring's first line names."""
    if path.suffix == ".md":
        return path.stem if path.parent == DOCS and path.stem in CITED else None
    try:
        docstring = ast.get_docstring(ast.parse(text)) or ""
    except SyntaxError:
        return None
    if "RFC" in docstring:
        return None
    first_line = docstring.split("\n", 1)[0]
    names = {m.group("doc") or "protocol" for m in _TOKEN.finditer(first_line) if m.group("doc") or m.group("spec")}
    return names.pop() if len(names) == 1 else None


def references(path: Path, text: str) -> list[tuple[int, str, str | None]]:
    """``(line number, document, section or None)`` for every reference in ``text``."""
    default = _file_default(path, text)
    found: list[tuple[int, str, str | None]] = []
    for number, line in enumerate(text.splitlines(), 1):
        current = default
        for m in _TOKEN.finditer(line):
            if m.group("doc"):
                current = m.group("doc")
                found.append((number, current, None))
            elif m.group("spec"):
                current = "protocol"
            elif m.group("stop"):
                current = None
            elif current is not None:
                found.append((number, current, m.group("sec")))
                if m.group("end"):
                    found.append((number, current, m.group("end")))
    return found


def scanned_files() -> list[Path]:
    """The source, test and documentation files whose references are checked."""
    files = [p for top in SCANNED for p in sorted((ROOT / top).rglob("*.py"))
             if ".venv" not in p.parts and p.resolve() != Path(__file__).resolve()]
    return files + sorted(DOCS.glob("*.md"))


class DocsReferenceTests(SynchronousTestCase):
    """Every document and section the code cites exists under docs/."""

    def setUp(self) -> None:
        self.docs = {name: sections((DOCS / f"{name}.md").read_text(encoding="utf-8"))
                     for name in CITED if (DOCS / f"{name}.md").exists()}

    def test_cited_documents_exist(self) -> None:
        """protocol.md, config.md, playbook.md and providers.md are all under docs/."""
        self.assertEqual(sorted(self.docs), sorted(CITED))

    def test_every_reference_resolves(self) -> None:
        """Each "<doc>.md §N" (and each bare § attributed to a doc) names an existing section."""
        broken = []
        checked = 0
        for path in scanned_files():
            text = path.read_text(encoding="utf-8", errors="replace")
            for number, doc, section in references(path, text):
                if section is None:
                    continue
                checked += 1
                if doc not in self.docs or not resolves(self.docs[doc], section):
                    broken.append(f"{path.relative_to(ROOT)}:{number}: {doc}.md §{section}")
        self.assertEqual(broken, [])
        # The code cites well over a hundred sections: finding few means the scanner broke.
        self.assertGreater(checked, 150)

    def test_named_docs_paths_exist(self) -> None:
        """Every "docs/<name>.md" named in the code or the docs is a file."""
        missing = []
        for path in scanned_files():
            text = path.read_text(encoding="utf-8", errors="replace")
            for m in _DOCS_PATH.finditer(text):
                if not (DOCS / m.group(1)).is_file():
                    missing.append(f"{path.relative_to(ROOT)}: docs/{m.group(1)}")
        self.assertEqual(missing, [])

    def test_relative_links_between_docs_exist(self) -> None:
        """Markdown links such as [config.md](config.md) in docs/ point at files that exist."""
        missing = []
        for path in sorted(DOCS.glob("*.md")):
            for target in re.findall(r"\]\(([^)#:\s]+)(?:#[^)]*)?\)", path.read_text(encoding="utf-8")):
                if not (DOCS / target).exists():
                    missing.append(f"{path.name}: {target}")
        self.assertEqual(missing, [])


class ResolverTests(SynchronousTestCase):
    """The scanner and resolver themselves."""

    DOC = "# T\n\n## 1. One\n\n### 1.2 Sub\n\n## 6. List\n\n1. first\n2. second\n\n## 14a. Extra\n"

    def test_headings_and_list_items(self) -> None:
        """Headings resolve by number; N.M resolves to item M of a list under N; others do not."""
        s = sections(self.DOC)
        for section in ("1", "1.2", "6", "6.2", "14a"):
            self.assertTrue(resolves(s, section), section)
        for section in ("1.1", "6.3", "2", "14b"):
            self.assertFalse(resolves(s, section), section)

    def test_attribution(self) -> None:
        """Bare § follows the doc named before it on the line, "spec" means protocol, RFC stops it."""
        text = '"""Module (config.md §5)."""\nx = 1  # §3, protocol.md §1.4, §5.4; RFC 3261 §8.1 and spec §5.1–5.3\n'
        refs = references(Path("m.py"), text)
        self.assertEqual([(d, s) for _, d, s in refs if s is not None],
                         [("config", "5"), ("config", "3"), ("protocol", "1.4"), ("protocol", "5.4"),
                          ("protocol", "5.1"), ("protocol", "5.3")])

    def test_no_default_with_rfc_docstring(self) -> None:
        """A module whose docstring cites an RFC gets no default document for bare §."""
        text = '"""Dialogs (RFC 3261 §12; config.md §4)."""\n# see §12.1.1\n'
        self.assertEqual([s for _, _, s in references(Path("m.py"), text) if s == "12.1.1"], [])


class ConfigExampleTests(SynchronousTestCase):
    """The example of docs/config.md §16 is a valid configuration."""

    def test_example_parses_without_warnings(self) -> None:
        """The TOML block under "## 16." parses, and no key in it is unknown."""
        text = (DOCS / "config.md").read_text(encoding="utf-8")
        block = re.search(r"^## 16\..*?```toml\n(.*?)```", text, re.S | re.M)
        assert block is not None
        config = parse_config(block.group(1))
        self.assertEqual(config.warnings, ())
        self.assertEqual(config.tls_port, 5061)
        self.assertEqual(config.handler.default, "reception.md")  # type: ignore[union-attr]
