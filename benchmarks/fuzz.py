"""Mutation fuzzer over every network- and client-facing parser; prints inputs/s and findings.

The targets, their documented exceptions, seed corpora and grammar templates
are those of ``tests/unit/test_fuzz_parsers.py`` (both import
``tests/fuzz_targets.py``).  Inputs are seeds with random byte flips, token
insertions, deletions, splices and number substitutions (``2^2000000000``,
5000 nines, ``1e999``, ``nan``, Unicode digits...), or grammar templates
filled with such numbers.

Run: ``python benchmarks/fuzz.py [--count 1000000] [--seed 1] [--targets sdp,rtp]``.
Anything a target raises that it does not document, an error an adapter logs,
and any input slower than ``--slow-ms`` is printed with a (shrunk) reproducer;
the exit status is 1 when there was a finding.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fuzz_targets import TARGETS, Target, random_input, run_one  # noqa: E402


def _key(error: BaseException) -> str:
    """Deduplication key: exception type and the innermost frame that raised it."""
    frames = traceback.extract_tb(error.__traceback__)
    where = f"{Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else "?"
    return f"{type(error).__name__} at {where}"


def _same(t: Target, data: bytes, key: str) -> bool:
    finding = run_one(t, data)
    return finding is not None and _key(finding.error) == key


def shrink(t: Target, data: bytes, key: str, budget: int = 400) -> bytes:
    """Cut chunks out of ``data`` while the same finding reproduces (bounded delta debugging)."""
    chunk = max(1, len(data) // 2)
    tries = 0
    while chunk >= 1 and tries < budget:
        i = 0
        changed = False
        while i < len(data) and tries < budget:
            candidate = data[:i] + data[i + chunk:]
            tries += 1
            if candidate and _same(t, candidate, key):
                data = candidate
                changed = True
            else:
                i += chunk
        if not changed:
            chunk //= 2
    return data


def _show(data: bytes, limit: int = 400) -> str:
    text = repr(data)
    return text if len(text) <= limit else text[:limit] + f"... ({len(data)} bytes)"


Findings = dict[str, tuple[int, bytes, str]]


def fuzz(t: Target, count: int, rng: random.Random, slow_s: float) -> tuple[int, float, float, bytes, Findings]:
    """Run ``count`` inputs through ``t``: (inputs, elapsed s, slowest s, slowest input, findings by key)."""
    t.reset()
    findings: Findings = {}
    slowest = 0.0
    slowest_input = b""
    started = time.perf_counter()
    inputs = list(t.seeds)
    done = 0
    while done < count:
        data = inputs.pop() if inputs else random_input(t, rng)
        t0 = time.perf_counter()
        finding = run_one(t, data)
        spent = time.perf_counter() - t0
        done += 1
        if spent > slowest:
            slowest, slowest_input = spent, data
        if finding is not None:
            key = _key(finding.error)
            seen = findings.get(key)
            findings[key] = (seen[0] + 1 if seen else 1, seen[1] if seen else data,
                             seen[2] if seen else f"{type(finding.error).__name__}: {str(finding.error)[:200]}")
        elif spent > slow_s:
            # Timed once more: a GC pause or a busy machine is not a finding.
            t0 = time.perf_counter()
            run_one(t, data)
            again = time.perf_counter() - t0
            if again > slow_s:
                key = f"slow input ({min(spent, again) * 1000:.0f} ms)"
                findings.setdefault(key, (1, data, key))
    return done, time.perf_counter() - started, slowest, slowest_input, findings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=1_000_000, help="inputs in total, split evenly (default 1,000,000)")
    parser.add_argument("--seed", type=int, default=1, help="random seed (default 1)")
    parser.add_argument("--targets", default="", help="comma-separated target names (default: all)")
    parser.add_argument("--slow-ms", type=float, default=500.0, help="report inputs slower than this (default 500)")
    parser.add_argument("--no-shrink", action="store_true", help="print reproducers as found")
    parser.add_argument("--save", metavar="DIR", help="write each finding's input and each target's slowest input here")
    args = parser.parse_args(argv)

    chosen = [t for t in TARGETS if not args.targets or t.name in args.targets.split(",")]
    if not chosen:
        parser.error("no such target; choose from " + ", ".join(t.name for t in TARGETS))
    per, extra = divmod(args.count, len(chosen))
    rng = random.Random(args.seed)
    total_inputs = 0
    total_s = 0.0
    all_findings: list[tuple[Target, str, int, bytes, str]] = []
    print(f"{'target':18} {'inputs':>9} {'seconds':>8} {'inputs/s':>9} {'slowest ms':>10} findings")
    for i, t in enumerate(chosen):
        n = per + (1 if i < extra else 0)
        done, elapsed, slowest, slowest_input, findings = fuzz(t, n, rng, args.slow_ms / 1000)
        if args.save:
            Path(args.save).mkdir(parents=True, exist_ok=True)
            (Path(args.save) / f"{t.name}.slowest.bin").write_bytes(slowest_input)
        total_inputs += done
        total_s += elapsed
        print(f"{t.name:18} {done:9d} {elapsed:8.1f} {done / elapsed if elapsed else 0:9.0f} "
              f"{slowest * 1000:10.1f} {sum(c for c, _, _ in findings.values())}", flush=True)
        for key, (count, data, message) in findings.items():
            all_findings.append((t, key, count, data, message))
    print(f"{'total':18} {total_inputs:9d} {total_s:8.1f} {total_inputs / total_s if total_s else 0:9.0f}")
    if not all_findings:
        print("findings: none")
        return 0
    print(f"\nfindings: {len(all_findings)} distinct")
    for n, (t, key, count, data, message) in enumerate(all_findings):
        small = data if args.no_shrink or key.startswith("slow") else shrink(t, data, key)
        if args.save:
            (Path(args.save) / f"{t.name}.finding{n}.bin").write_bytes(small)
        print(f"- [{t.name}, owner {t.owner}] {key}, {count}x: {message}")
        print(f"  reproducer: TARGETS_BY_NAME[{t.name!r}].run({_show(small)})")
    return 1


if __name__ == "__main__":
    sys.exit(main())
