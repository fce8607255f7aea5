"""The package's shape: no import cycle, and what plugin authors are promised is there."""

from __future__ import annotations

import ast
import json
import os
import socket
import subprocess
import sys
from importlib.resources import files
from pathlib import Path

import pgslowlog
from pgslowlog.bpf.compiler import CHILD_COMMAND, SOCKET_FD_ENV

PACKAGE = Path(str(files("pgslowlog")))


def module_name(path: Path) -> str:
    parts = ["pgslowlog", *path.relative_to(PACKAGE).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """Every pgslowlog module `path` imports, wherever the import is: at the top, in a
    function, or under TYPE_CHECKING. `from pgslowlog.x import y` counts as x.y where y
    is a module, else as x."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                submodule = f"{node.module}.{alias.name}"
                found.add(submodule if submodule in modules else node.module)
    return {name for name in found if name in modules}


def import_graph() -> dict[str, set[str]]:
    paths = sorted(PACKAGE.rglob("*.py"))
    modules = {module_name(path) for path in paths}
    return {module_name(path): imports_of(path, modules) - {module_name(path)} for path in paths}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle through each module that is on one (depth-first search)."""
    found, done = [], set()

    def visit(module: str, path: list[str]) -> None:
        if module in path:
            found.append([*path[path.index(module) :], module])
            return
        if module in done:
            return
        for imported in sorted(graph[module]):
            visit(imported, [*path, module])
        done.add(module)

    for module in sorted(graph):
        visit(module, [])
    return found


def test_no_module_imports_itself_back():
    graph = import_graph()
    assert "pgslowlog.probes" in graph and "pgslowlog.sampled.source" in graph
    assert graph["pgslowlog.bpf.program"] >= {"pgslowlog.probes", "pgslowlog.bpf.source"}
    assert cycles(graph) == []


def test_the_cycle_finder_finds_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c", "a"]]


def test_what_plugin_authors_import_is_exported():
    for name in pgslowlog.__all__:
        assert hasattr(pgslowlog, name), name
    promised = {
        "ProbeDefinition",
        "OpenSource",
        "ChecksBinary",
        "StatementSource",
        "RecordReader",
        "HandsOver",
        "ExplainsLosses",
        "COUNTERS",
        "RawStatement",
        "BackendNotice",
        "BpfProgram",
        "SinkType",
        "BaseSink",
        "hookimpl",
    }
    assert promised <= set(pgslowlog.__all__)


def test_the_compiler_child_starts_cleanly():
    """Not `python -m pgslowlog.bpf.compiler`: importing the package imports that module
    first, and runpy would warn of it on stderr, which a refusal quotes. Asked for
    nothing, the child answers (compiled, or why not where bcc is missing) and exits."""
    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    request = {"program": "", "cflags": [], "functions": [], "maps": []}
    with parent, child:
        result = subprocess.run(
            [sys.executable, *CHILD_COMMAND],
            input=json.dumps(request).encode(),
            capture_output=True,
            pass_fds=[child.fileno()],
            env={**os.environ, SOCKET_FD_ENV: str(child.fileno())},
            timeout=120,
        )
        parent.settimeout(5)
        reply = json.loads(parent.recv(1 << 16))
    assert result.returncode == 0, result.stderr
    assert b"RuntimeWarning" not in result.stderr, result.stderr
    if reply["ok"]:  # bcc compiled nothing, as asked
        assert (reply["functions"], reply["maps"]) == ([], [])
    else:  # a machine without bcc, or one that cannot compile for this user
        assert reply["error"].startswith(("bcc's Python module", "compiling failed")), reply
