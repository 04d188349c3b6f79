"""The README and docs/ say only what the repository holds.

- Every relative link in ``README.md`` and ``docs/*.md`` resolves to a file or folder of the
  checkout, and a link's ``#anchor`` to a heading of the page it points at.
- Every repository path the pages name in backticks (``fxprefetch/...``, ``passes/...``,
  ``tests/...``, ``benchmarks/...``, ``docs/...``) exists; a ``*`` in one must match a file.
- The README stays short (at most :data:`README_MAX_LINES` lines).
- The README's repository table is the code's layering: each module imports only from its own
  row and the rows above it (imports of every kind counted: deferred into functions, and for
  type checkers alone), and every name the table's first column gives exists.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README_MAX_LINES = 250
REPO_ROOTS = ("fxprefetch", "passes", "tests", "benchmarks", "docs")

FENCE = re.compile(r"^ {0,3}(```|~~~).*?^ {0,3}\1", re.S | re.M)
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
CODE = re.compile(r"(`+)(.+?)\1", re.S)
REPO_PATH = re.compile(rf"^(?:{'|'.join(REPO_ROOTS)})/[\w.*/-]*$")
HEADING = re.compile(r"^ {0,3}#{1,6}\s+(.*?)\s*#*\s*$", re.M)


def _pages() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _prose(text: str) -> str:
    """``text`` without its fenced code blocks (their brackets and backticks are code)."""
    return FENCE.sub("", text)


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link's text
    text = re.sub(r"[^\w\- ]", "", text.lower().replace("`", ""))
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """Every heading's anchor in ``page`` (a repeated heading gets ``-1``, ``-2``, ...)."""
    seen: dict[str, int] = {}
    found = set()
    for heading in HEADING.findall(_prose(page.read_text())):
        slug = _slug(heading)
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        found.add(slug if count == 0 else f"{slug}-{count}")
    return found


def broken_links(page: Path, root: Path = ROOT) -> list[str]:
    """The relative links of ``page`` whose file, folder or anchor does not exist."""
    broken = []
    for target in LINK.findall(_prose(page.read_text())):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto:, ...: not relative
            continue
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        if not resolved.is_relative_to(root.resolve()) or not resolved.exists():
            broken.append(f"{target}: no such file")
        elif anchor and (resolved.suffix != ".md" or anchor not in anchors(resolved)):
            broken.append(f"{target}: no heading #{anchor} in {resolved.name}")
    return broken


def named_paths(page: Path) -> set[str]:
    """The repository paths ``page`` names in backticks (``tests/x.py::test_y`` names
    ``tests/x.py``); placeholders such as ``tests/test_<module>.py`` are not paths."""
    found = set()
    for _, code in CODE.findall(_prose(page.read_text())):
        path = code.strip().split("::")[0]
        if REPO_PATH.match(path):
            found.add(path)
    return found


def missing_paths(page: Path, root: Path = ROOT) -> list[str]:
    missing = []
    for path in sorted(named_paths(page)):
        exists = any(root.glob(path)) if "*" in path else (root / path).exists()
        if not exists:
            missing.append(path)
    return missing


@pytest.mark.parametrize("page", _pages(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(page):
    assert not broken_links(page), f"{page.relative_to(ROOT)}: {broken_links(page)}"


@pytest.mark.parametrize("page", _pages(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_named_repository_path_exists(page):
    assert not missing_paths(page), f"{page.relative_to(ROOT)} names {missing_paths(page)}"


def test_the_readme_is_short():
    lines = len((ROOT / "README.md").read_text().splitlines())
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines (at most {README_MAX_LINES})"


def test_the_checks_catch_a_broken_link_anchor_and_path(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_a.py").write_text("")
    (tmp_path / "docs" / "other.md").write_text("# Other page\n\n## The `x` option, again\n")
    page = tmp_path / "docs" / "page.md"
    page.write_text(
        "[ok](other.md) [ok](other.md#the-x-option-again) [ok](#title) [web](https://x.org)\n"
        "[gone](missing.md) [bad anchor](other.md#nowhere) [outside](../../etc/passwd)\n"
        "`tests/test_a.py::test_one` `tests/test_<module>.py` `tests/*.py` `tests/gone.py`\n"
        "`docs/*.txt`\n```\n[in code](nowhere.md) `tests/in_code.py`\n```\n# Title\n"
    )
    assert broken_links(page, tmp_path) == [
        "missing.md: no such file",
        "other.md#nowhere: no heading #nowhere in other.md",
        "../../etc/passwd: no such file",
    ]
    assert missing_paths(page, tmp_path) == ["docs/*.txt", "tests/gone.py"]


# -- the repository table ------------------------------------------------------------------


def _repository_table() -> list[list[str]]:
    """The README's repository table: one list of cells per row, header left out."""
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## Repository\n", 1)[1]
    lines = section[section.index("\n| folder |") + 1 :].splitlines()
    table = lines[: next((i for i, line in enumerate(lines) if not line.startswith("|")), None)]
    rows = [line for line in table if not line.startswith("| ---")]
    cells = [[c.strip() for c in row.strip("|").split(" | ")] for row in rows]
    assert cells[0][:3] == ["folder", "what lives there", "what it may import"], cells[0]
    return cells[1:]


def _claims(first_cell: str) -> list[str]:
    """The paths a row claims, from the names its first cell gives in backticks (ending ``/``
    or ``.py``): the files and folders named relative to its folder (the first name), or the
    whole folder where none is; and the paths named from the repository's root."""
    names = [n for _, n in CODE.findall(first_cell) if n.endswith(("/", ".py"))]
    folder, rest = names[0], names[1:]
    full = [n for n in rest if n.startswith(("fxprefetch/", "passes/"))]
    relative = [folder + n for n in rest if n not in full]
    return [*(relative or [folder]), *full]


def _module_of(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = ("fxprefetch", *rel.parts) if rel.parts[0] == "passes" else rel.parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    files = [*(ROOT / "fxprefetch").rglob("*.py"), *(ROOT / "passes").rglob("*.py")]
    return {_module_of(p): p for p in files if "__pycache__" not in p.parts}


def _imported(path: Path, modules: dict[str, Path]) -> set[str]:
    """The fxprefetch modules ``path`` imports, of any kind (``from package import module``
    imports the module, not the package)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            submodules = {f"{node.module}.{a.name}" for a in node.names} & modules.keys()
            found |= submodules
            if len(submodules) < len(node.names):
                found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return found & modules.keys()


def test_the_repository_table_names_what_exists_and_covers_every_folder():
    rows = _repository_table()
    for cells in rows:
        for path in _claims(cells[0]):
            assert (ROOT / path).exists(), f"the repository table names {path}, which is not there"
    folders = {_claims(cells[0])[0].split("/")[0] for cells in rows}
    assert set(REPO_ROOTS) <= folders, f"no row for {set(REPO_ROOTS) - folders}"


def _row_of(module: str, rows: list[list[str]]) -> int:
    """The row whose named path covers the module most closely."""
    path = module.replace(".", "/").replace("fxprefetch/passes", "passes", 1)
    best = max(
        ((len(claim), index)
         for index, claims in enumerate(rows)
         for claim in claims
         if claim in (f"{path}.py", f"{path}/__init__.py")
         or (path + "/").startswith(claim.rstrip("/") + "/")),
        default=None,
    )  # fmt: skip
    assert best is not None, f"{module} is in no row of the README's repository table"
    return best[1]


def _layout_layers() -> list[tuple[str, tuple[str, ...]]]:
    """``LAYERS`` of tests/test_layout.py, read as data (lowest layer first)."""
    tree = ast.parse((ROOT / "tests" / "test_layout.py").read_text())
    for node in tree.body:
        target = getattr(node, "target", None) or (getattr(node, "targets", None) or [None])[0]
        if isinstance(target, ast.Name) and target.id == "LAYERS":
            return ast.literal_eval(node.value)
    raise AssertionError("tests/test_layout.py defines no LAYERS")


def test_the_repository_table_has_test_layouts_layers_in_order():
    """Each row of the README's table holds the modules of one layer of test_layout's
    ``LAYERS``, and the rows go up the layers in order (a layer may take consecutive rows)."""
    rows = [_claims(cells[0]) for cells in _repository_table()]
    layers = _layout_layers()

    def layer_of(module: str) -> str:
        return max(
            (len(prefix), name)
            for name, prefixes in layers
            for prefix in prefixes
            if module == prefix or module.startswith(prefix + ".")
        )[1]

    by_row: dict[int, set[str]] = {}
    for module in _modules():
        by_row.setdefault(_row_of(module, rows), set()).add(layer_of(module))
    order = [name for name, _ in layers]
    mixed = {row + 1: sorted(found) for row, found in by_row.items() if len(found) > 1}
    assert not mixed, f"rows of the README's table mixing layers of LAYERS: {mixed}"
    row_layers = [next(iter(by_row[row])) for row in sorted(by_row)]
    # a layer may take several rows in a row (passes/: tables, analysis, the passes)
    collapsed = [layer for i, layer in enumerate(row_layers) if row_layers[i - 1 : i] != [layer]]
    assert collapsed == order, f"the table's rows hold {row_layers}; LAYERS is {order}"


def test_the_repository_table_is_the_code_layering():
    rows = [_claims(cells[0]) for cells in _repository_table()]
    modules = _modules()

    def row_of(module: str) -> int:
        return _row_of(module, rows)

    upward = [
        f"{name} (row {row_of(name) + 1}) imports {imported} (row {row_of(imported) + 1})"
        for name, path in sorted(modules.items())
        for imported in sorted(_imported(path, modules))
        if row_of(imported) > row_of(name)
    ]
    assert not upward, "imports from a later row of the README's repository table:\n" + (
        "\n".join(upward)
    )
