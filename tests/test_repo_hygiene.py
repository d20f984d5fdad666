"""Repository hygiene that checks itself: documentation citations resolve, imports run one way.

- Every `docs/<file>.md "<Heading>"` citation in code, YAML, the Makefile and Markdown names a
  file in docs/ and a heading it has; nothing cites the planning notes that live outside the
  repository.
- Imports follow the layers of docs/architecture.md "Import layers": read with `ast` (never
  imported), including imports inside functions; only `if TYPE_CHECKING:` blocks are skipped,
  since they never run.

Each failure names file:line, so the fix is obvious from the message alone.
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
THIS_FILE = Path(__file__).resolve()

# What is never scanned: environments, caches, build output, generated data.
SKIP_DIRS = {
    ".git", ".venv", "venv", "build", "dist", "__pycache__", ".pytest_cache", ".ruff_cache",
    ".mypy_cache", "node_modules", "demo_data", "runs", "shared",
}  # fmt: skip


def _skipped(rel: Path) -> bool:
    return any(part in SKIP_DIRS or part.endswith(".egg-info") for part in rel.parts[:-1])


@cache
def repo_files() -> tuple[Path, ...]:
    """Paths (relative to the root) of the files in the working tree: tracked, plus untracked
    ones git does not ignore; without git, a walk that leaves out SKIP_DIRS."""
    try:
        listed = subprocess.run(
            ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
            cwd=ROOT,
            capture_output=True,
            check=True,
        ).stdout.decode()
        paths = [Path(p) for p in listed.split("\0") if p]
    except (OSError, subprocess.CalledProcessError):
        paths = []
        for folder, dirs, files in os.walk(ROOT):
            dirs[:] = [d for d in dirs if d not in SKIP_DIRS and not d.endswith(".egg-info")]
            paths += [Path(folder, f).relative_to(ROOT) for f in files]
    return tuple(sorted(p for p in paths if not _skipped(p) and (ROOT / p).is_file()))


def text_files() -> list[Path]:
    """The files whose prose may cite docs: *.py, *.yaml / *.yml, Makefile, *.md."""
    return [
        p
        for p in repo_files()
        if p.suffix in (".py", ".yaml", ".yml", ".md") or p.name == "Makefile"
    ]


# ---------------------------------------------------------------------------------------------
# Documentation citations
# ---------------------------------------------------------------------------------------------

# The planning notes that live outside the repository, by the names code used to cite them.
STALE_REFERENCE = re.compile(
    r"\b(?:LESSONS|ENV-NOTES|STIV-RECIPE|ARCHITECTURE)\.md\b|\bENV-NOTES\b|\bSTIV-RECIPE\b"
    r"|\bsteering repo\b"
)
DOC_PATH = re.compile(r"\bdocs/([A-Za-z0-9_./-]+?)\.md\b")
# After the path: an optional closing backtick and comma, then the heading in double quotes.
HEADING_AFTER = re.compile(r'`?,?\s*"([^"]+)"')
# What starts a continuation line of a comment or a Markdown quote.
CONTINUATION_PREFIX = re.compile(r"^\s*(?:#+|//|\*|>)?\s*")
FENCE = re.compile(r"^\s*(```|~~~)")
HEADING = re.compile(r"^\s{0,3}#{1,6}\s+(.*?)\s*#*\s*$")


def _squash(text: str) -> str:
    return " ".join(text.split())


@cache
def doc_headings(name: str) -> frozenset[str] | None:
    """The headings of docs/<name>.md (outside code fences, white space squashed), or None
    when there is no such file."""
    path = ROOT / "docs" / f"{name}.md"
    if not path.is_file():
        return None
    headings, in_fence = set(), False
    for line in path.read_text(encoding="utf-8").splitlines():
        if FENCE.match(line):
            in_fence = not in_fence
        elif not in_fence and (match := HEADING.match(line)):
            headings.add(_squash(match.group(1)))
    return frozenset(headings)


@dataclass(frozen=True)
class Citation:
    path: Path
    line: int
    doc: str  # file name in docs/ without .md
    heading: str | None  # None: the citation names the file only


def cited_heading(lines: list[str], index: int, after: int) -> str | None:
    """The quoted heading that follows a docs path ending at column `after` of line `index`, if
    any. A heading may wrap onto the next two lines of a comment or paragraph."""
    following = lines[index][after:]
    for extra in lines[index + 1 : index + 3]:
        if '"' in following and following.count('"') >= 2:
            break
        following += " " + CONTINUATION_PREFIX.sub("", extra, count=1)
    match = HEADING_AFTER.match(following)
    return _squash(match.group(1)) if match else None


def citations(path: Path) -> Iterator[Citation]:
    lines = (ROOT / path).read_text(encoding="utf-8", errors="replace").splitlines()
    for index, line in enumerate(lines):
        for match in DOC_PATH.finditer(line):
            heading = cited_heading(lines, index, match.end())
            yield Citation(path, index + 1, match.group(1), heading)


def citation_problem(citation: Citation) -> str | None:
    headings = doc_headings(citation.doc)
    where = f"{citation.path}:{citation.line}: docs/{citation.doc}.md"
    if headings is None:
        return f"{where}: no such file in docs/"
    if citation.heading is not None and citation.heading not in headings:
        known = "; ".join(sorted(headings))
        return f'{where} "{citation.heading}": no such heading (it has: {known})'
    return None


def test_nothing_cites_notes_outside_the_repository():
    """Comments once cited planning notes that were never in the repository, so a reader could
    not follow them; the facts now live in docs/ and are cited by heading."""
    found = []
    for path in text_files():
        if ROOT / path == THIS_FILE:
            continue  # this file names them in order to find them
        text = (ROOT / path).read_text(encoding="utf-8", errors="replace")
        for number, line in enumerate(text.splitlines(), start=1):
            for match in STALE_REFERENCE.finditer(line):
                found.append(f'{path}:{number}: {match.group(0)!r}: cite docs/<file>.md "Heading"')
    assert not found, "references to files outside the repository:\n" + "\n".join(found)


def test_every_docs_citation_names_an_existing_file_and_heading():
    """A citation that points at a renamed or never-written section is a dead end."""
    problems = [
        problem
        for path in text_files()
        if ROOT / path != THIS_FILE  # its scanner test holds deliberate dead citations
        for citation in citations(path)
        if (problem := citation_problem(citation))
    ]
    assert not problems, "dangling docs/ citations:\n" + "\n".join(problems)


def test_the_citation_scanner_reads_what_authors_write(tmp_path):
    """Guards the scanner itself: a citation wrapped across comment lines, one with a comma or
    backticks, and a bare file reference are all read; a wrong heading is reported."""
    lines = [
        '# see docs/design-notes.md "The 2-core',
        '# trap" for why',
        'x = 1  # (docs/architecture.md, "Storage")',
        "Run it as `docs/cluster.md` says.",
        'Described in `docs/stages.md` "What a stage declares".',
        'docs/stages.md "No such heading"',
    ]
    found = []
    for index, line in enumerate(lines):
        for match in DOC_PATH.finditer(line):
            found.append((match.group(1), cited_heading(lines, index, match.end())))
    assert found == [
        ("design-notes", "The 2-core trap"),
        ("architecture", "Storage"),
        ("cluster", None),
        ("stages", "What a stage declares"),
        ("stages", "No such heading"),
    ]
    assert citation_problem(Citation(Path("x.py"), 6, "stages", "No such heading"))
    assert citation_problem(Citation(Path("x.py"), 6, "no-such-doc", None))
    assert citation_problem(Citation(Path("x.py"), 1, "design-notes", "The 2-core trap")) is None


# ---------------------------------------------------------------------------------------------
# Import direction
# ---------------------------------------------------------------------------------------------

# Library packages, lowest first: each may import only packages of a lower rank (and itself).
LAYERS = ("stiv_core", "model", "data_engine", "training", "stiv")
# Packages that import nothing of ours at all, whatever their rank.
SELF_CONTAINED = {"stiv_core", "model"}
# Free to import anything (and imported by no library): demos, tests, benchmark scripts.
FREE = {"demos", "tests", "bench"}
# What `training` may use of data_engine: its storage, schema and video layers.
TRAINING_MAY_USE = {
    "data_engine.store",
    "data_engine.quarantine",
    "data_engine.schema",
    "data_engine.video",
}


def module_name(path: Path) -> str:
    parts = list(path.with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


@cache
def our_modules() -> dict[str, Path]:
    """Module name -> file, for every Python file in our packages, tests and benchmarks."""
    tops = set(LAYERS) | FREE
    return {module_name(p): p for p in repo_files() if p.suffix == ".py" and p.parts[0] in tops}


@dataclass(frozen=True)
class Import:
    source: str  # importing module
    target: str  # imported module of ours
    line: int
    names: tuple[str, ...]  # names taken from it (`from target import a, b`)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _statements(tree: ast.AST) -> Iterator[ast.AST]:
    """Every node, skipping the bodies of `if TYPE_CHECKING:` (they never run)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        stack.extend(ast.iter_child_nodes(node))


def _owner(name: str, modules: dict[str, Path]) -> str | None:
    """The longest prefix of dotted `name` that is one of our modules."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        candidate = ".".join(parts[:end])
        if candidate in modules:
            return candidate
    return None


@cache
def parsed(module: str) -> ast.Module:
    path = our_modules()[module]
    return ast.parse((ROOT / path).read_text(encoding="utf-8"), filename=str(path))


def _from_base(module: str, node: ast.ImportFrom) -> str:
    """The absolute module a `from ... import` statement reads from (relative ones resolved)."""
    if not node.level:
        return node.module or ""
    path = our_modules()[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    parts = package.split(".")
    anchor = parts[: len(parts) - (node.level - 1)]
    return ".".join([*anchor, node.module] if node.module else anchor)


def _bindings(module: str) -> Iterator[tuple[ast.stmt, str | None, str, str | None]]:
    """(statement, local name, our module, name taken from it) for every import of ours in
    `module`; the name is None when the import binds the module itself."""
    modules = our_modules()
    for node in _statements(parsed(module)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if target := _owner(alias.name, modules):
                    if alias.asname:
                        local = alias.asname if target == alias.name else None
                    else:
                        local = alias.name.split(".")[0]
                        target = _owner(local, modules) or target
                    yield node, local, target, None
        elif isinstance(node, ast.ImportFrom):
            base = _from_base(module, node)
            for alias in node.names:
                local = alias.asname or alias.name
                if f"{base}.{alias.name}" in modules:
                    yield node, local, f"{base}.{alias.name}", None
                elif target := _owner(base, modules):
                    yield node, local, target, alias.name


@cache
def imports_of(module: str) -> tuple[Import, ...]:
    """The imports of `module` that land in one of our modules. `from pkg import sub` counts as
    an import of `pkg.sub` when that is a module, else of `pkg`; `import a.b.c` of `a.b.c`."""
    modules = our_modules()
    found = []
    for node, _, target, name in _bindings(module):
        if isinstance(node, ast.Import):
            # `import a.b` binds `a` but imports (and depends on) `a.b`.
            for alias in node.names:
                full = _owner(alias.name, modules)
                if full and _top(full) == _top(target):
                    target = full
        found.append(Import(module, target, node.lineno, (name,) if name else ()))
    return tuple(dict.fromkeys(found))


def _top(module: str) -> str:
    return module.split(".", 1)[0]


def layer_problem(imp: Import) -> str | None:
    source, target = _top(imp.source), _top(imp.target)
    if source in FREE or source == target:
        return None
    where = f"{our_modules()[imp.source]}:{imp.line}: {imp.source} imports {imp.target}"
    if target in FREE:
        return (
            f"{where}: library code may not import {target}/ (demos, tests and benchmarks sit "
            "above every library)"
        )
    if source in SELF_CONTAINED:
        return f"{where}: {source}/ imports nothing of ours"
    if LAYERS.index(target) > LAYERS.index(source):
        return (
            f"{where}: the arrow runs up ({' < '.join(LAYERS)}); move what both need into "
            f"{source}/ or lower"
        )
    if source == "training" and target == "data_engine" and imp.target not in TRAINING_MAY_USE:
        allowed = ", ".join(sorted(TRAINING_MAY_USE))
        return (
            f"{where}: training/ may use only data_engine's storage, schema and video ({allowed})"
        )
    return None


def all_imports() -> list[Import]:
    return [imp for module in sorted(our_modules()) for imp in imports_of(module)]


def test_imports_run_down_the_layers():
    """An arrow that runs up (a library importing the CLI, the demos or the tests) makes the
    lower package impossible to use or test on its own."""
    problems = [p for imp in all_imports() if (p := layer_problem(imp))]
    assert not problems, 'imports against docs/architecture.md "Import layers":\n' + "\n".join(
        problems
    )


def import_cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module, or a module importing itself
    (Tarjan's algorithm, iterative), each sorted; sorted by first member."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    cycles: list[list[str]] = []
    counter = 0
    for root in sorted(edges):
        if root in index:
            continue
        work = [(root, iter(sorted(edges.get(root, ()))))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges.get(child, ())))))
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            else:
                work.pop()
                if work:
                    parent = work[-1][0]
                    low[parent] = min(low[parent], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1 or node in edges.get(node, ()):
                        cycles.append(sorted(component))
    return sorted(cycles)


def test_no_import_cycles():
    """A cycle (even through an import inside a function) means two modules cannot be
    understood, tested or moved apart; what both need belongs in a third, lower module."""
    edges: dict[str, set[str]] = {}
    lines: dict[tuple[str, str], int] = {}
    for imp in all_imports():
        if imp.target != imp.source:
            edges.setdefault(imp.source, set()).add(imp.target)
            lines.setdefault((imp.source, imp.target), imp.line)
    report = []
    for cycle in import_cycles(edges):
        members = set(cycle)
        arrows = [
            f"  {our_modules()[a]}:{lines[a, b]}: {a} -> {b}"
            for a in cycle
            for b in sorted(edges.get(a, ()) & members)
        ]
        report.append("cycle " + " <-> ".join(cycle) + ":\n" + "\n".join(arrows))
    assert not report, "import cycles:\n" + "\n".join(report)


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def private_uses(module: str) -> Iterator[str]:
    """`from x import _y`, `import x._y`, and `x._y` on a module of ours bound by an import."""
    modules = our_modules()
    path = modules[module]
    bound: dict[str, str] = {}  # local name -> our module it refers to
    for node, local, target, name in _bindings(module):
        if target == module:
            continue
        if name is not None and _private(name):
            yield f"{path}:{node.lineno}: {module} imports {target}.{name}"
        if any(_private(part) for part in target.split(".")) and _top(target) != _top(module):
            yield f"{path}:{node.lineno}: {module} imports the private module {target}"
        if name is None and local is not None:
            bound[local] = target
    for node in _statements(parsed(module)):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id in bound
            and _private(node.attr)
            and f"{bound[node.value.id]}.{node.attr}" not in modules
        ):
            yield f"{path}:{node.lineno}: {module} uses {bound[node.value.id]}.{node.attr}"


def test_no_private_name_crosses_a_module():
    """A private name used from another module is an undeclared interface: renaming it breaks a
    caller nobody knew about. Share it under a public name instead. Tests are held to this too:
    they test through what modules make public."""
    problems = [p for module in sorted(our_modules()) for p in private_uses(module)]
    assert not problems, "private names used across modules:\n" + "\n".join(problems)


def test_the_import_checks_see_what_they_should():
    """Guards the checkers: an upward arrow, a cycle and a private import are each reported,
    and a legal downward import is not."""
    up = Import("data_engine.config", "stiv.config", 21, ("ConfigError",))
    down = Import("training.prepare", "data_engine.store", 41, ("Database",))
    inner = Import("model.sampling", "model.flow", 29, ("sample",))
    assert "runs up" in (layer_problem(up) or "")
    assert layer_problem(down) is None and layer_problem(inner) is None
    assert "imports nothing of ours" in (
        layer_problem(Import("model.flow", "stiv_core.config", 3, ())) or ""
    )
    assert "may not import demos/" in (
        layer_problem(Import("data_engine.split", "demos.samples", 3, ())) or ""
    )
    assert "storage, schema and video" in (
        layer_problem(Import("training.prepare", "data_engine.pipeline", 3, ())) or ""
    )
    assert import_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert import_cycles({"a": {"b"}, "b": set()}) == []
    assert import_cycles({"a": {"a"}}) == [["a"]]


# ---------------------------------------------------------------------------------------------
# Habits
# ---------------------------------------------------------------------------------------------


def test_every_cli_command_and_flag_has_help():
    """`stiv X --help` is the CLI's documentation: a flag without `help=` is one a user has to
    read the source for."""
    import argparse

    from stiv.cli import build_parser

    missing = []
    pending = [("stiv", build_parser())]
    while pending:
        name, parser = pending.pop()
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            if isinstance(action, argparse._SubParsersAction):
                helped = {choice.dest for choice in action._choices_actions if choice.help}
                for command, subparser in action.choices.items():
                    if command not in helped:
                        missing.append(f"{name} {command}: no help")
                    pending.append((f"{name} {command}", subparser))
                continue
            if not action.help:
                missing.append(f"{name} {'/'.join(action.option_strings) or action.dest}: no help")
    assert not missing, "CLI entries without help=:\n" + "\n".join(sorted(missing))


def test_every_ruff_ignore_gives_its_reason():
    """A rule switched off without a reason is never switched back on."""
    import tomllib

    text = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    ignored = tomllib.loads(text)["tool"]["ruff"]["lint"].get("ignore", [])
    block = re.search(r"(?ms)^\[tool\.ruff\.lint\]$.*?^ignore = \[(.*?)^\]", text)
    assert block, "pyproject.toml: [tool.ruff.lint] ignore must be a multi-line list"
    reasons = dict(re.findall(r'^\s*"([A-Z]+\d+)",\s*#\s*(\S.*)$', block.group(1), re.M))
    unexplained = [rule for rule in ignored if rule not in reasons]
    assert not unexplained, f"ruff ignores without a `# reason` on their line: {unexplained}"
