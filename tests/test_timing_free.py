"""No unit test asserts on a measured time: on a busy machine such an assertion fails while the
code is right (a test of N=4 against N=16 read `speedup > 1.5` and failed under load). Costs are
asserted as calls and FLOPs, and the timing helpers are tested on a clock the test drives
(tests/evaluation/test_latency.py); measured speedups belong to `migm bench` and the reports.

The check reads every test file's assertions: an ordering comparison (<, >, <=, >=) of a value
whose name says it is timed (speedup, latency, ms, elapsed, ...) is refused, except against 0
(that a time was recorded at all)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

TESTS = Path(__file__).resolve().parent
TIMED = re.compile(r"speedup|latency|(^|_)ms($|_)|elapsed|perf_counter|monotonic|duration|seconds|"
                   r"wall_?time|time_s\b|per_s\b")
ORDER = (ast.Lt, ast.Gt, ast.LtE, ast.GtE)


def _words(node: ast.AST) -> list[str]:
    """Identifiers, attribute names and string keys in an expression."""
    out = []
    for sub in ast.walk(node):
        if isinstance(sub, ast.Name):
            out.append(sub.id)
        elif isinstance(sub, ast.Attribute):
            out.append(sub.attr)
        elif isinstance(sub, ast.Constant) and isinstance(sub.value, str):
            out.append(sub.value)
    return out


def _timed(node: ast.AST) -> bool:
    return any(TIMED.search(w.lower()) for w in _words(node))


def _zero(node: ast.AST) -> bool:
    return isinstance(node, ast.Constant) and node.value == 0


def _compares(test: ast.AST) -> list[tuple[ast.Compare, list[ast.AST]]]:
    """Each comparison in an assertion, with the iterables of the comprehensions around it
    (`all(costs[k] > 1 for k in ("decode_ms",))` orders a timed value too)."""
    out, inner = [], set()
    for comp in ast.walk(test):
        if isinstance(comp, (ast.GeneratorExp, ast.ListComp, ast.SetComp)):
            iters = [g.iter for g in comp.generators]
            for c in ast.walk(comp.elt):
                if isinstance(c, ast.Compare) and id(c) not in inner:
                    inner.add(id(c))
                    out.append((c, iters))
    out += [(c, []) for c in ast.walk(test) if isinstance(c, ast.Compare) and id(c) not in inner]
    return out


def timed_assertions(source: str, filename: str = "<test>") -> list[str]:
    """`file:line: text` of every assertion ordering a timed value against anything but 0."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        if not isinstance(node, ast.Assert):
            continue
        for cmp, iters in _compares(node.test):
            operands = [cmp.left, *cmp.comparators]
            context = any(_timed(i) for i in iters)
            if any(isinstance(op, ORDER) and not (_zero(a) or _zero(b)) and (context or _timed(a) or _timed(b))
                   for op, a, b in zip(cmp.ops, operands, operands[1:])):
                found.append(f"{filename}:{node.lineno}: {ast.get_source_segment(source, node)}")
                break
    return found


def test_no_test_asserts_on_a_measured_time():
    found = [hit for path in sorted(TESTS.rglob("*.py"))
             for hit in timed_assertions(path.read_text(), str(path.relative_to(TESTS)))]
    assert not found, "timed assertions (assert calls or FLOPs instead):\n" + "\n".join(found)


def test_the_check_sees_the_assertions_it_forbids():
    forbidden = ['assert rows[0]["speedup"] > 1.5', "assert lat.ms_per_batch >= 20",
                 "assert elapsed < 2.0", 'assert 1.0 < r["latency_ms_per_image"] < 9',
                 'assert all(costs[k] < 3 for k in ("decode_ms",))']
    allowed = ['assert rows[1]["speedup"] == 1.0', 'assert r["latency_ms_per_image"] > 0',
               "assert flops[1] / flops[0] > 3.9", 'assert r["base_calls"] < r["steps"]']
    assert [len(timed_assertions(a)) for a in forbidden] == [1] * len(forbidden)
    assert [len(timed_assertions(a)) for a in allowed] == [0] * len(allowed)
