"""harvester's layers, read from the code's own imports (every ``import``, at the top of a
module, inside a function or under ``TYPE_CHECKING``: each one is a dependency).

From the bottom up; a module imports only from its own layer and the layers its layer lists:

``pure``
    models and parsing with no sockets and no engine: ``errors``, ``clock``, ``jobs``,
    ``schedule``, ``pollsched`` and ``durations`` (which job a poll goes to), ``ratelimit``,
    ``decode/``, ``config`` (with ``secrets_io`` and ``netguard``'s address rules), ``wire``
    (``RequestSpec``, ``Response``, ``Resolver``: what goes over the wire, as plain data),
    ``azure`` (blob listings), ``specs/``, ``tracking``, and the process-wide helpers every
    layer uses (``logs``, ``tracing``, ``failpoints``, the package's ``__version__``).
``adapters``
    ``providers/``: sans-I/O; they build ``RequestSpec``s and parse ``Response``s, and hold no
    sockets and no credentials.
``io``
    what sends and stores, knowing no adapter: ``transport``, ``exchange`` (the bytes under a
    transport: aiohttp, or a test's), ``auth``, ``credentials`` (an ``Auth`` per provider),
    ``download``, ``metrics``; ``fsutil``, ``objstore`` and ``store/``.
    Adapters and this layer are siblings: neither imports the other; both import ``wire``.
``engine``
    one job's path and its helpers: ``engine/`` (``core``: lanes, workers, drain; a module
    per step: ``submit``, ``reconcile``, ``poll``, ``harvest``, ``cancel``, each taking the
    narrow ``engine.view``), ``lane``, ``ownership`` (``Solo``; ``replica``, which never
    imports the engine), ``control``, ``harvest``, ``objoutput``, ``jobsfile``,
    ``statuspage``, ``verify``.
``surfaces``
    what a person or a program talks to: ``api``, ``daemon``, ``cli``, ``cli_control``,
    ``client`` (the Python API), ``httpserver``, ``lifecycle`` (signals, exit codes),
    ``websession``, ``summary``, and the emulator (``harvester emulate``;
    ``tests/emulator/test_emu_isolation.py`` keeps it apart).
``testing``
    the engine's stand-ins for the outside world (``testing/``: a network in memory, Playment
    in memory on the emulator's model, virtual time), for tests and ``bench/``.

No import cycles either. The exceptions below are the ones the code has today, each with why.
"""

from __future__ import annotations

import ast
from pathlib import Path

import harvester

PACKAGE = Path(harvester.__file__).parent

LAYERS: dict[str, tuple[str, ...]] = {
    "pure": (
        "harvester",
        "harvester.azure",
        "harvester.clock",
        "harvester.config",
        "harvester.decode",
        "harvester.durations",
        "harvester.errors",
        "harvester.failpoints",
        "harvester.jobs",
        "harvester.logs",
        "harvester.netguard",
        "harvester.pollsched",
        "harvester.ratelimit",
        "harvester.schedule",
        "harvester.secrets_io",
        "harvester.specs",
        "harvester.tracing",
        "harvester.tracking",
        "harvester.wire",
    ),
    "adapters": ("harvester.providers",),
    "io": (
        "harvester.auth",
        "harvester.credentials",
        "harvester.download",
        "harvester.exchange",
        "harvester.fsutil",
        "harvester.heap",
        "harvester.metrics",
        "harvester.objstore",
        "harvester.offload",
        "harvester.store",
        "harvester.transport",
    ),
    "engine": (
        "harvester.control",
        "harvester.engine",
        "harvester.harvest",
        "harvester.jobsfile",
        "harvester.lane",
        "harvester.objoutput",
        "harvester.ownership",
        "harvester.replica",
        "harvester.statuspage",
        "harvester.verify",
        "harvester.verify_objects",
    ),
    "surfaces": (
        "harvester.api",
        "harvester.cli",
        "harvester.cli_control",
        "harvester.client",
        "harvester.daemon",
        "harvester.emulator",
        "harvester.httpserver",
        "harvester.lifecycle",
        "harvester.summary",
        "harvester.websession",
    ),
    "testing": ("harvester.testing",),
}
#: which layers each layer may import (besides its own)
MAY_IMPORT: dict[str, frozenset[str]] = {
    "pure": frozenset(),
    "adapters": frozenset({"pure"}),
    "io": frozenset({"pure"}),
    "engine": frozenset({"pure", "adapters", "io"}),
    "surfaces": frozenset({"pure", "adapters", "io", "engine"}),
    # stand-ins for providers and the network, for tests and the scheduling simulator: may
    # use the emulator's models; nothing in harvester imports it
    "testing": frozenset({"pure", "adapters", "io", "engine", "surfaces"}),
}

#: (importer, imported): edges the rules above do not allow yet, each with why
EXCEPTIONS: dict[tuple[str, str], str] = {
    # PEP 562: ``harvester.Harvester`` loads the Python API on first use (and under
    # TYPE_CHECKING), so ``from harvester import __version__`` loads nothing above it.
    ("harvester", "harvester.client"): "lazy re-export of the Python API",
    # ``logs.configure`` installs tracing's log processor; tracing redacts with logs' rules.
    ("harvester.logs", "harvester.tracing"): "imported at configure() time",
    # ``verify_outputs`` dispatches to the bucket checker, which shares its report and rules.
    ("harvester.verify", "harvester.verify_objects"): "imported at call time",
}


def _modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


MODULES = _modules()


def _owner(name: str) -> str:
    """The module a dotted import name loads (a name inside a module: that module)."""
    while name not in MODULES:
        name = name.rpartition(".")[0]
    return name


def _imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out |= {_owner(a.name) for a in node.names if a.name.startswith("harvester")}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("harvester"):
            assert node.module is not None and node.level == 0, f"{path}: relative import"
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                out.add(full if full in MODULES else _owner(node.module))
    return out


def _layer(module: str) -> str:
    best = ("", "")
    for layer, roots in LAYERS.items():
        for root in roots:
            if (module == root or module.startswith(root + ".")) and len(root) > len(best[1]):
                best = (layer, root)
    assert best[0], f"{module} is in no layer: add it to LAYERS"
    return best[0]


def _graph() -> dict[str, set[str]]:
    graph = {}
    for module, path in MODULES.items():
        if module.startswith("harvester.emulator."):
            continue  # the emulator's own insides (test_emu_isolation.py)
        graph[module] = {m for m in _imports(path) - {module} if (module, m) not in EXCEPTIONS}
    return graph


def test_every_module_has_a_layer() -> None:
    for module in MODULES:
        _layer(module)


def _back_edges(graph: dict[str, set[str]]) -> list[str]:
    offenders = []
    for module, imported in sorted(graph.items()):
        mine = _layer(module)
        for target in sorted(imported):
            theirs = _layer(target)
            if theirs != mine and theirs not in MAY_IMPORT[mine]:
                offenders.append(f"{module} ({mine}) imports {target} ({theirs})")
    return offenders


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    cycles: list[list[str]] = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(module: str) -> None:
        state[module] = 1
        path.append(module)
        for target in sorted(graph.get(module, ())):
            if state.get(target) == 1:
                cycles.append([*path[path.index(target) :], target])
            elif target not in state:
                visit(target)
        path.pop()
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module)
    return cycles


def test_imports_point_only_down_the_layers() -> None:
    assert _back_edges(_graph()) == []


def test_no_import_cycles() -> None:
    assert _cycles(_graph()) == []


def test_the_exceptions_are_still_needed() -> None:
    """An exception the code no longer needs is removed, so the list stays honest."""
    for importer, imported in EXCEPTIONS:
        assert imported in _imports(MODULES[importer]), (importer, imported)


def test_the_checks_see_a_back_edge_and_a_cycle(tmp_path: Path) -> None:
    """What the issue found before this test existed would fail it."""
    bad = tmp_path / "bad.py"
    bad.write_text(
        "from harvester.providers.base import RequestSpec\n"
        "def f():\n    from harvester.engine import Engine\n"
    )
    graph = {"harvester.transport": _imports(bad), "harvester.engine": {"harvester.transport"}}
    assert graph["harvester.transport"] == {"harvester.providers.base", "harvester.engine"}
    assert _back_edges(graph) == [
        "harvester.transport (io) imports harvester.engine (engine)",
        "harvester.transport (io) imports harvester.providers.base (adapters)",
    ]
    assert _cycles(graph) == [["harvester.engine", "harvester.transport", "harvester.engine"]]
