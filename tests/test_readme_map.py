"""The README's map of files ("Reading it beside the paper") gives line numbers; they must stay true as the
files change. Each `name` at / line N must be on line N of its file, each "Eq. K at N" on line N, and the
file-formats column must point at the "File formats: not in the paper" banner."""
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def map_rows():
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    section = text[text.index("## Reading it beside the paper"):]
    section = section[:section.index("\n## ", 5)]
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 5 and cells[0].startswith("`") and cells[0].endswith(".py`"):
            yield cells[0].strip("`"), cells[3], cells[4]


def test_readme_map_line_numbers_point_at_what_they_name():
    rows = list(map_rows())
    assert len(rows) == 8, rows  # every top-level module has a row
    checked = 0
    for name, starts, formats in rows:
        lines = open(os.path.join(ROOT, name), encoding="utf-8").read().splitlines()
        at = lambda n: lines[int(n) - 1]  # noqa: E731
        for symbol, n in re.findall(r"`([^`]+)`(?: \([^)]*\))?(?:,? (?:line|at) )(\d+)", starts):
            symbol = symbol.split()[-1]  # "class PoseLLaVA" -> "PoseLLaVA"
            assert symbol in at(n), f"{name}:{n} should hold {symbol!r}: {at(n)!r}"
            checked += 1
        for eq, n in re.findall(r"(Eq\. \d+) at (\d+)", starts):
            assert eq in at(n), f"{name}:{n} should hold {eq!r}: {at(n)!r}"
            checked += 1
        if formats != "none":
            n = re.match(r"line (\d+)", formats).group(1)
            assert "File formats: not in the paper" in at(n), f"{name}:{n}: {at(n)!r}"
            checked += 1
            plumbing = re.search(r"run plumbing: line (\d+)", formats)
            if plumbing:
                assert "Run plumbing" in at(plumbing.group(1)), f"{name}:{plumbing.group(1)}"
    assert checked >= 15, checked
