"""The layering of STYLE §1 as a test: import directions and the pure-module ban.

Every module under ``activecall/`` is parsed with ``ast`` (nothing is imported or
executed) and its imports are collected: absolute and relative, at module level and
inside functions (a local import is a dependency too), and ``importlib.import_module``
calls with a literal name.  Two checks run over them:

- **Directions.**  Each package or module belongs to one layer of ``LAYERS``; a module
  may import its own layer and layers of a lower rank, never a higher one or another
  of the same rank.  ``RULES`` adds the specific rules STYLE names (``call/`` imports nothing from
  ``control/``, a transport never imports ``call/``, nothing imports ``tap.py``, only
  ``legs/webrtc.py`` imports aiortc, only ``tap.py`` imports the global reactor).
- **Purity.**  The modules of ``PURE`` (and the packages that contain them, whose
  ``__init__`` runs first) import only the standard library, the compute-only libraries
  of ``COMPUTE_LIBRARIES`` and other pure modules, and never ``BANNED``.

Because every activecall import is checked, and only ``tap.py`` may import the
reactor, importing any other module cannot install the global reactor through our
own code; this replaces the per-module subprocess checks the tests used to carry.
Each check lists every violation at once.
"""

from __future__ import annotations

import ast
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Sequence

from twisted.trial.unittest import SynchronousTestCase

ROOT = "activecall"
PACKAGE_DIR = Path(__file__).resolve().parents[2] / ROOT

#: Package or module -> layer.  The longest matching prefix names a module's layer
#: (``activecall`` itself matches only the package's own ``__init__``).
LAYERS: dict[str, str] = {
    "activecall": "root",  # __version__: anyone may import it
    # pure helpers and process-wide seams, free to use one another
    "activecall.config": "helpers",
    "activecall.routing": "helpers",
    "activecall.rustregex": "helpers",
    "activecall.dotenv": "helpers",
    "activecall.digits": "helpers",
    "activecall.timefmt": "helpers",
    "activecall.options": "helpers",
    "activecall.ids": "helpers",
    "activecall.fileio": "helpers",
    "activecall.interfaces": "helpers",
    "activecall.clock": "helpers",
    "activecall.logs": "helpers",
    "activecall.metrics": "helpers",
    "activecall.aio": "helpers",
    # protocol cores and their adapters
    "activecall.rtp": "rtp",
    "activecall.media": "media",
    "activecall.fetch": "fetch",
    "activecall.cluster": "cluster",
    "activecall.systemd": "systemd",
    "activecall.sdp": "sdp",
    "activecall.sip": "sip",
    "activecall.speech": "speech",
    # the only place protocol cores become two-way audio legs
    "activecall.legs": "legs",
    # the call, and what drives it
    "activecall.call": "call",
    "activecall.agent": "agent",
    "activecall.playbook": "playbook",
    # the wire
    "activecall.control": "control",
    # inbound routing and the HTTP root
    "activecall.handlers": "handlers",
    "activecall.web": "web",
    # the daemon's services
    "activecall.lifecycle": "lifecycle",
    # shipped fakes
    "activecall.testing": "testing",
    "activecall.testing_sip": "testing",
    "activecall.testing_llm": "testing",
    # the composition root
    "activecall.tap": "tap",
}

#: Layer -> rank.  A module may import its own layer and layers of a strictly lower
#: rank, never a higher one or another layer of the same rank.  Arrows point down
#: only: tap -> handlers, web -> control -> call, agent, playbook -> legs -> sip, sdp,
#: rtp, media, speech -> pure helpers.
RANKS: dict[str, int] = {
    "root": 0,
    "helpers": 1,
    "rtp": 2,
    "media": 2,
    "fetch": 2,
    "cluster": 2,  # the shared call registry: which node owns which id
    "systemd": 2,
    "sdp": 3,  # uses rtp (SRTP suites, the crypto model) and media (the codec table)
    "sip": 4,  # the dialog layer reads SDP
    "speech": 4,  # providers produce media frames and fetch over HTTP
    "legs": 5,
    "call": 6,
    "agent": 7,  # drives a call
    "playbook": 8,  # drives an agent and a call
    "control": 9,
    "handlers": 10,
    "web": 10,
    "lifecycle": 11,  # the daemon's services, composing the layers below
    "testing": 12,  # nothing in the package uses the shipped fakes
    "tap": 13,  # imported by nobody
}


@dataclass(frozen=True)
class Rule:
    """A specific forbidden import: modules under ``sources`` never import ``targets``."""

    sources: tuple[str, ...]
    targets: tuple[str, ...]
    reason: str
    exempt: tuple[str, ...] = ()


#: The rules STYLE §1 and §2 spell out, checked on top of the ranks.  Names match as
#: dotted prefixes; ``ROOT`` matches every module; ``exempt`` modules may import it.
RULES: tuple[Rule, ...] = (
    Rule((ROOT,), ("activecall.tap",), "nothing imports tap.py"),
    Rule(("activecall.call",), ("activecall.control",), "call/ imports nothing from control/"),
    Rule(("activecall.sip.transport", "activecall.rtp.transport", "activecall.legs"), ("activecall.call",),
         "a transport never imports call/"),
    Rule((ROOT,), ("aiortc",), "only legs/webrtc.py imports aiortc", exempt=("activecall.legs.webrtc",)),
    Rule((ROOT,), ("redis",), "only cluster/redisstore.py imports redis", exempt=("activecall.cluster.redisstore",)),
    Rule((ROOT,), ("twisted.internet.reactor",), "only tap.py imports the global reactor",
         exempt=("activecall.tap",)),
)

#: The pure modules: STYLE §1's [pure] tags plus the modules earlier tests kept pure.
#: ``pkg.*`` means the package and every module under it.  Names not present in the
#: tree (yet, or any more) are skipped.
PURE: tuple[str, ...] = (
    "activecall.config",
    "activecall.routing",
    "activecall.rustregex",
    "activecall.dotenv",
    "activecall.digits",
    "activecall.timefmt",
    "activecall.options",
    "activecall.ids",
    "activecall.interfaces",
    "activecall.sip.message",
    "activecall.sip.uri",
    "activecall.sip.auth",
    "activecall.sip.transaction",
    "activecall.sip.dialog",
    "activecall.sip.framing",
    "activecall.sip.security",
    "activecall.sdp.*",
    "activecall.rtp.packet",
    "activecall.rtp.jitter",
    "activecall.rtp.session",
    "activecall.rtp.srtp",
    "activecall.rtp.dtmf",
    "activecall.media.codecs.*",
    "activecall.media._audioop",
    "activecall.media.resample",
    "activecall.media.mixer",
    "activecall.media.dtmf_detect",
    "activecall.media.agc",
    "activecall.media.dtmf_tones",
    "activecall.media.tracks",
    "activecall.speech.interfaces",
    "activecall.speech.vad.segmenter",
    "activecall.call.events",
    "activecall.call.record",
    "activecall.playbook.model",
    "activecall.playbook.actions",
    "activecall.playbook.dtmf",
    "activecall.playbook.templates",
    "activecall.playbook.words",
    "activecall.playbook.prompt",
    "activecall.playbook.functions",
    "activecall.control.commands",
    "activecall.control.events",
)

#: What a pure module never imports (a dotted prefix), and the one exception.
BANNED: tuple[str, ...] = (
    "twisted.internet", "asyncio", "socket", "time", "random", "threading", "treq", "autobahn",
)
BANNED_EXCEPT: tuple[str, ...] = ("twisted.internet.interfaces",)

#: Third-party libraries that only compute, which pure modules may use.
COMPUTE_LIBRARIES: tuple[str, ...] = (
    "zope.interface", "automat", "numpy", "pylibsrtp", "av", "yaml", "audioop", "jinja2",
    "twisted.internet.interfaces",
)

#: External names whose submodules the rules tell apart (``from twisted.internet import
#: reactor`` must be seen as ``twisted.internet.reactor``).
_SPECIFIC = BANNED + BANNED_EXCEPT + COMPUTE_LIBRARIES + tuple(t for r in RULES for t in r.targets)


@dataclass(frozen=True)
class Import:
    """One import found in a module's source."""

    name: str
    line: int
    local: bool


def _matches(name: str, prefix: str) -> bool:
    """Whether dotted ``name`` is ``prefix`` or lies under it."""
    return name == prefix or name.startswith(prefix + ".")


def _internal(name: str) -> bool:
    """Whether ``name`` is a module of the activecall package."""
    return _matches(name, ROOT)


def _resolve_from(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    """The absolute module an ``ImportFrom`` node imports from."""
    if not node.level:
        return node.module or ""
    parts = module.split(".") if is_package else module.split(".")[:-1]
    if node.level > 1:
        parts = parts[: len(parts) - (node.level - 1)]
    base = ".".join(parts)
    return f"{base}.{node.module}" if node.module else base


class _Collector(ast.NodeVisitor):
    """Collects the imports of one module, noting those inside functions."""

    def __init__(self, module: str, is_package: bool, modules: frozenset[str]) -> None:
        self.module = module
        self.is_package = is_package
        self.modules = modules
        self.imports: list[Import] = []
        self._depth = 0

    def _add(self, name: str, node: ast.AST) -> None:
        imp = Import(name, getattr(node, "lineno", 0), self._depth > 0)
        if imp not in self.imports:
            self.imports.append(imp)

    def _function(self, node: ast.AST) -> None:
        self._depth += 1
        self.generic_visit(node)
        self._depth -= 1

    visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = _function

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._add(alias.name, node)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        base = _resolve_from(self.module, self.is_package, node)
        for alias in node.names:
            full = f"{base}.{alias.name}"
            if _internal(base):
                self._add(full if full in self.modules else base, node)
            elif any(rule.startswith(base + ".") for rule in _SPECIFIC):
                self._add(full, node)
            else:
                self._add(base, node)

    def visit_Call(self, node: ast.Call) -> None:
        func = node.func
        named = (isinstance(func, ast.Attribute) and func.attr == "import_module") or (
            isinstance(func, ast.Name) and func.id in ("import_module", "__import__"))
        if named and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
            self._add(node.args[0].value, node)
        self.generic_visit(node)


def collect_imports(module: str, source: str, is_package: bool, modules: Iterable[str]) -> list[Import]:
    """Every import in ``source``, the text of ``module``, as absolute dotted names."""
    collector = _Collector(module, is_package, frozenset(modules))
    collector.visit(ast.parse(source))
    return collector.imports


@dataclass(frozen=True)
class Tree:
    """A set of modules and their imports."""

    imports: Mapping[str, Sequence[Import]]
    packages: frozenset[str]


def scan(sources: Mapping[str, str], packages: Iterable[str] = ()) -> Tree:
    """Collect the imports of modules given as ``{dotted name: source}``."""
    packages = frozenset(packages)
    names = frozenset(sources)
    return Tree({m: collect_imports(m, s, m in packages, names) for m, s in sources.items()}, packages)


def scan_package(directory: Path = PACKAGE_DIR) -> Tree:
    """Collect the imports of every module in the activecall package on disk."""
    sources: dict[str, str] = {}
    packages: set[str] = set()
    for path in sorted(directory.rglob("*.py")):
        parts = (ROOT,) + path.relative_to(directory).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
            packages.add(".".join(parts))
        sources[".".join(parts)] = path.read_text(encoding="utf-8")
    return scan(sources, packages)


def layer_of(module: str) -> str | None:
    """The ``LAYERS`` entry a module belongs to, or None if it has none."""
    parts = module.split(".")
    for end in range(len(parts), 0, -1):
        key = ".".join(parts[:end])
        if key in LAYERS and (key != ROOT or module == ROOT):
            return key
    return None


def _label(entry: str) -> str:
    """A module's layer for messages: ``call (6)``."""
    return f"{LAYERS[entry]} ({RANKS[LAYERS[entry]]})"


def _where(imp: Import) -> str:
    """Where in the module an import is, for messages."""
    return f"line {imp.line}" + (", local import" if imp.local else "")


def layer_violations(tree: Tree) -> list[str]:
    """Every import that points up or sideways, or breaks one of ``RULES``."""
    found: list[str] = []
    for module in sorted(tree.imports):
        source = layer_of(module)
        if source is None:
            found.append(f"module {module} has no layer: add its package to LAYERS")
            continue
        for imp in tree.imports[module]:
            reasons = [r.reason for r in RULES
                       if any(_matches(module, s) for s in r.sources)
                       and any(_matches(imp.name, t) for t in r.targets)
                       and not any(_matches(module, e) for e in r.exempt)]
            target = layer_of(imp.name) if _internal(imp.name) else None
            if _internal(imp.name) and target is None:
                reasons.insert(0, "the imported module has no layer")
                shown = "no layer"
            elif target is not None:
                if LAYERS[target] != LAYERS[source] and RANKS[LAYERS[target]] >= RANKS[LAYERS[source]]:
                    reasons.insert(0, "layers point down only")
                shown = _label(target)
            else:
                shown = "external"
            if reasons:
                found.append(f"module {module} (layer {_label(source)}) imports {imp.name} (layer {shown}), "
                             f"{_where(imp)}: not allowed ({'; '.join(reasons)})")
    return found


def pure_modules(tree: Tree) -> list[str]:
    """The modules of ``tree`` that ``PURE`` names, with the packages containing them."""
    pure: set[str] = set()
    for module in tree.imports:
        for entry in PURE:
            if module == entry.removesuffix(".*") or (entry.endswith(".*") and _matches(module, entry[:-2])):
                pure.add(module)
    for module in list(pure):
        parts = module.split(".")
        pure.update(".".join(parts[:end]) for end in range(1, len(parts)) if ".".join(parts[:end]) in tree.imports)
    return sorted(pure)


def _stdlib(name: str) -> bool:
    """Whether ``name`` belongs to the standard library."""
    return name.split(".")[0] in sys.stdlib_module_names


def purity_violations(tree: Tree) -> list[str]:
    """Every import of a pure module that is neither stdlib, compute-only nor pure."""
    pure = pure_modules(tree)
    found: list[str] = []
    for module in pure:
        for imp in tree.imports[module]:
            name = imp.name
            if _internal(name):
                if name in pure or name not in tree.imports:
                    reason = "" if name in pure else "no such module"
                else:
                    reason = f"{name} is not a pure module"
            elif any(_matches(name, b) for b in BANNED) and not any(_matches(name, e) for e in BANNED_EXCEPT):
                reason = ("pure modules never import twisted.internet (but its interfaces), asyncio, socket, "
                          "time, random, threading, treq or autobahn")
            elif _stdlib(name) or any(_matches(name, lib) for lib in COMPUTE_LIBRARIES):
                reason = ""
            else:
                reason = "pure modules import only the stdlib and compute-only libraries"
            if reason:
                found.append(f"module {module} (pure) imports {name}, {_where(imp)}: not allowed ({reason})")
    return found


def _report(title: str, violations: list[str]) -> str:
    """One failure message listing every violation."""
    return f"{len(violations)} {title}:\n" + "\n".join(violations)


class LayeringTests(SynchronousTestCase):
    """The activecall package keeps STYLE §1's layering."""

    def setUp(self) -> None:
        self.tree = scan_package()

    def test_directions(self) -> None:
        """Every import points down the layers and keeps the specific rules."""
        violations = layer_violations(self.tree)
        if violations:
            self.fail(_report("layering violations", violations))

    def test_pure_modules(self) -> None:
        """Pure modules import only the stdlib, compute-only libraries and other pure modules."""
        violations = purity_violations(self.tree)
        if violations:
            self.fail(_report("purity violations", violations))

    def test_scan_sees_the_package(self) -> None:
        """The scan finds the package's modules and the pure set is not empty."""
        self.assertIn("activecall.sip.message", self.tree.imports)
        self.assertIn("activecall.sip", self.tree.packages)
        self.assertIn("activecall.rtp.packet", pure_modules(self.tree))


class CheckerTests(SynchronousTestCase):
    """The checkers catch what they are meant to, on synthetic sources."""

    def test_upward_import(self) -> None:
        """An import from a higher layer is reported with both layers."""
        tree = scan({
            "activecall.call.controller": "from activecall.control.events import Answered\n",
            "activecall.control.events": "",
        })
        self.assertEqual(layer_violations(tree), [
            "module activecall.call.controller (layer call (6)) imports activecall.control.events "
            "(layer control (9)), line 1: not allowed (layers point down only; call/ imports nothing from control/)",
        ])

    def test_downward_imports_pass(self) -> None:
        """Imports of lower layers and of the module's own package are fine."""
        tree = scan({
            "activecall.legs.rtp": "from activecall.rtp import packet\nimport activecall.media.codecs\n",
            "activecall.legs.sip": "from activecall.legs.rtp import RtpLeg\nfrom . import rtp\n",
            "activecall.rtp.packet": "import struct\n",
            "activecall.media.codecs": "",
        }, packages={"activecall.media.codecs"})
        self.assertEqual(layer_violations(tree), [])

    def test_local_import(self) -> None:
        """An import inside a function counts, and is marked as local."""
        tree = scan({
            "activecall.sip.transport": "def f():\n    from activecall.call import controller\n",
            "activecall.call.controller": "",
        })
        self.assertEqual(layer_violations(tree), [
            "module activecall.sip.transport (layer sip (4)) imports activecall.call.controller (layer call (6)), "
            "line 2, local import: not allowed (layers point down only; a transport never imports call/)",
        ])

    def test_relative_import(self) -> None:
        """Relative imports resolve against the module's package (or the package itself for __init__)."""
        tree = scan({
            "activecall.call.record": "from ..control import events\n",
            "activecall.call": "from ..control.session import CallSession\n",
            "activecall.control.events": "",
            "activecall.control.session": "",
        }, packages={"activecall.call"})
        self.assertEqual([imp.name for imp in tree.imports["activecall.call.record"]], ["activecall.control.events"])
        self.assertEqual([imp.name for imp in tree.imports["activecall.call"]], ["activecall.control.session"])
        self.assertEqual(len(layer_violations(tree)), 2)

    def test_every_violation_listed(self) -> None:
        """All violations are reported at once, including tap, aiortc and the reactor."""
        tree = scan({
            "activecall.web": "import activecall.tap\nimport aiortc\n",
            "activecall.legs.webrtc": "from aiortc import RTCPeerConnection\n",
            "activecall.media.clock": "def run():\n    from twisted.internet import reactor\n",
            "activecall.tap": "def main():\n    from twisted.internet import reactor\n",
            "activecall.newthing": "",
        })
        self.assertEqual(layer_violations(tree), [
            "module activecall.media.clock (layer media (2)) imports twisted.internet.reactor (layer external), "
            "line 2, local import: not allowed (only tap.py imports the global reactor)",
            "module activecall.newthing has no layer: add its package to LAYERS",
            "module activecall.web (layer web (10)) imports activecall.tap (layer tap (13)), line 1: "
            "not allowed (layers point down only; nothing imports tap.py)",
            "module activecall.web (layer web (10)) imports aiortc (layer external), line 2: "
            "not allowed (only legs/webrtc.py imports aiortc)",
        ])

    def test_import_module_call(self) -> None:
        """``importlib.import_module`` with a literal name counts as an import."""
        tree = scan({
            "activecall.media.clock": "import importlib\ndef f():\n    importlib.import_module('activecall.call.x')\n",
            "activecall.call.x": "",
        })
        self.assertEqual([(i.name, i.local) for i in tree.imports["activecall.media.clock"]],
                         [("importlib", False), ("activecall.call.x", True)])
        self.assertEqual(len(layer_violations(tree)), 1)

    def test_sideways_import(self) -> None:
        """Two packages of the same rank may not import each other."""
        tree = scan({"activecall.rtp.session": "import activecall.media.resample\n", "activecall.media.resample": ""})
        self.assertEqual(len(layer_violations(tree)), 1)

    def test_pure_bans(self) -> None:
        """A pure module may use the stdlib, compute libraries and IReactorTime, nothing that does I/O."""
        tree = scan({
            "activecall.rtp.jitter": (
                "import math, numpy\n"
                "from twisted.internet.interfaces import IReactorTime\n"
                "from twisted.internet import interfaces\n"
                "from zope.interface import implementer\n"
                "def now():\n"
                "    import time\n"
                "from twisted.internet import defer\n"
                "import socket\n"
                "import twisted.logger\n"
            ),
        })
        self.assertEqual(purity_violations(tree), [
            "module activecall.rtp.jitter (pure) imports time, line 6, local import: not allowed (pure modules never "
            "import twisted.internet (but its interfaces), asyncio, socket, time, random, threading, treq or autobahn)",
            "module activecall.rtp.jitter (pure) imports twisted.internet.defer, line 7: not allowed (pure modules "
            "never import twisted.internet (but its interfaces), asyncio, socket, time, random, threading, treq or "
            "autobahn)",
            "module activecall.rtp.jitter (pure) imports socket, line 8: not allowed (pure modules never "
            "import twisted.internet (but its interfaces), asyncio, socket, time, random, threading, treq or autobahn)",
            "module activecall.rtp.jitter (pure) imports twisted.logger, line 9: not allowed "
            "(pure modules import only the stdlib and compute-only libraries)",
        ])

    def test_pure_imports_only_pure(self) -> None:
        """A pure module importing an adapter module (relatively) is reported; so is an impure package __init__."""
        tree = scan({
            "activecall.rtp": "",
            "activecall.rtp.srtp": "from .transport import RtpTransport\nfrom .packet import RtpPacket\n",
            "activecall.rtp.packet": "",
            "activecall.rtp.transport": "",
            "activecall.media": "from activecall.media.clock import MediaClock\n",
            "activecall.media.resample": "",
            "activecall.media.clock": "",
        }, packages={"activecall.rtp", "activecall.media"})
        self.assertEqual(purity_violations(tree), [
            "module activecall.media (pure) imports activecall.media.clock, line 1: not allowed "
            "(activecall.media.clock is not a pure module)",
            "module activecall.rtp.srtp (pure) imports activecall.rtp.transport, line 1: not allowed "
            "(activecall.rtp.transport is not a pure module)",
        ])
