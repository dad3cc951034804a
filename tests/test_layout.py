"""The package's shape: the tooling (pgbeat_lab) stays out of the product's import path,
and the product's modules import each other without a cycle."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pgbeat
from pgbeat import cli

SRC = Path(pgbeat.__file__).parent


def test_the_product_loads_no_tooling():
    """Every module of pgbeat, the ones each daemon command imports lazily included, loads
    without pulling in pgbeat_lab; only `pgbeat bench` and `pgbeat chaos` do."""
    code = (
        "import pkgutil, sys, pgbeat, pgbeat.cli\n"
        "pgbeat.cli.build_parser()\n"
        "for m in pkgutil.walk_packages(pgbeat.__path__, 'pgbeat.'):\n"
        "    __import__(m.name)\n"
        "assert 'pgbeat.worker' in sys.modules and 'pgbeat.api.app' in sys.modules\n"
        "lab = sorted(m for m in sys.modules if m.split('.')[0] == 'pgbeat_lab')\n"
        "assert not lab, lab\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_lab_commands_take_their_own_arguments(capsys):
    """`pgbeat bench` and `pgbeat chaos` hand every argument, --help too, to the lab's parser."""
    for command, option in (("bench", "--floor-seconds"), ("chaos", "--seed")):
        try:
            cli.main([command, "--help"])
        except SystemExit as exc:
            assert exc.code == 0
        out = capsys.readouterr().out
        assert f"usage: pgbeat {command}" in out and option in out
    assert "bench" in cli.build_parser().format_help()
    try:
        cli.main(["worker", "--no-such-option"])
    except SystemExit as exc:
        assert exc.code == 2
    err = capsys.readouterr().err  # the daemon's own usage, and the option it does not know
    assert err.startswith("usage: pgbeat worker") and "unknown option --no-such-option" in err


def imports(path: Path) -> set[str]:
    """The pgbeat modules a file imports, at any depth of its code."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names |= {f"{node.module}.{a.name}" for a in node.names} | {node.module}
    return {n for n in names if n.split(".")[0] == "pgbeat"}


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_no_import_cycles():
    files = {module_name(p): p for p in SRC.rglob("*.py")}
    graph = {name: {m for m in imports(path) if m in files and m != name} for name, path in files.items()}
    done: set[str] = set()

    def visit(name: str, trail: list[str]) -> None:
        assert name not in trail, "import cycle: " + " -> ".join([*trail[trail.index(name) :], name])
        if name not in done:
            for target in sorted(graph[name]):
                visit(target, [*trail, name])
            done.add(name)

    for name in sorted(graph):
        visit(name, [])
