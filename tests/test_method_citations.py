"""Every "method §N" citation in the repository resolves to docs/method.md: the section (§4.3), the numbered step
("§4.3 step 6", "§5.4 steps 5-7") and the row of the §12 table ("§12 #9") must exist there."""

from __future__ import annotations

import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCANNED = ("simflow", "tools", "tests", "configs", "slurm", "README.md")
SUFFIXES = (".py", ".md", ".yaml", ".sh", ".cfg")
_REF = r"§\s*(\d+(?:\.\d+)?)((?:\s*(?:steps?|#)\s*\d+(?:\s*(?:-|and|,)\s*\d+)*)?)"
CITATION = re.compile("method " + _REF)
CHAINED = re.compile(r"\s*(?:/|,|and|or)\s*" + _REF)  # "method §3.2 / §5.1", "method §4.5, §7"


def _method_index():
    """Sections, numbered steps per section and §12 table rows found in docs/method.md."""
    sections, steps, rows, current = set(), {}, set(), None
    with open(os.path.join(ROOT, "docs", "method.md"), encoding="utf-8") as f:
        for line in f:
            m = re.match(r"#{2,3} (\d+(?:\.\d+)?)\.? ", line)
            if m:
                current = m.group(1)
                sections.add(current)
                continue
            m = re.match(r"(\d+)\. ", line)
            if m and current is not None:
                steps.setdefault(current, set()).add(int(m.group(1)))
            m = re.match(r"\| (\d+) \|", line)
            if m and current == "12":
                rows.add(int(m.group(1)))
    return sections, steps, rows


def _files():
    for entry in SCANNED:
        path = os.path.join(ROOT, entry)
        if os.path.isfile(path):
            yield path
        for base, _, names in os.walk(path):
            for name in names:
                if name.endswith(SUFFIXES):
                    yield os.path.join(base, name)


def _citations():
    for path in _files():
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                for m in CITATION.finditer(line):
                    where = f"{os.path.relpath(path, ROOT)}:{lineno}"
                    yield where, m.group(1), m.group(2)
                    end = m.end()
                    while (c := CHAINED.match(line, end)) is not None:
                        yield where, c.group(1), c.group(2)
                        end = c.end()


def test_method_index_has_the_fixed_sections():
    sections, steps, rows = _method_index()
    for sec in ("0", "1", "2", "3.1", "3.2", "4.1", "4.5", "5.4", "6.2", "7", "9", "10.7", "11.4", "12"):
        assert sec in sections, sec
    assert steps["4.3"] == set(range(1, 9))
    assert steps["5.4"] == set(range(1, 8))
    assert {1, 2, 3, 4} <= steps["4.5"]
    assert rows == set(range(1, 13))


def test_every_method_citation_resolves():
    sections, steps, rows = _method_index()
    found, broken = 0, []
    for where, sec, tail in _citations():
        found += 1
        if sec not in sections:
            broken.append(f"{where}: §{sec} is not a section of docs/method.md")
            continue
        numbers = [int(n) for n in re.findall(r"\d+", tail)]
        if "-" in tail and len(numbers) == 2:
            numbers = list(range(numbers[0], numbers[1] + 1))
        for n in numbers:
            ok = n in rows if "#" in tail else n in steps.get(sec, set())
            if not ok:
                broken.append(f"{where}: §{sec}{tail} has no {'row' if '#' in tail else 'step'} {n}")
    assert found > 100, found  # the scan really ran over the code base
    assert not broken, "\n".join(broken)
