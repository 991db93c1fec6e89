"""The import rule of docs/architecture.md, checked on the source (imports under
``TYPE_CHECKING`` count too: a type that points upwards is a dependency that points
upwards).

chargegw's layers, lowest first; a module may import its own layer and the ones below:

0 kernel   chargegw (package), core, config, logs, metrics, audit
1 store    chargegw.store
2 net      chargegw.net
3 domain   chargegw.domain
4 drivers  chargegw.drivers
5 cluster  chargegw.cluster
6 api      chargegw.api, chargegw.console
7 entry    chargegw.app (composition root), supervisor, cli, __main__

and besides: drivers never import the engines (params, firmware, billing), which register
the handlers they need; chargeproto imports neither chargegw nor chargesim; chargegw never
imports chargesim (``chargegw sim``/``loadtest`` load it by name, on use).
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

LAYERS = {
    "chargegw.store": 1,
    "chargegw.net": 2,
    "chargegw.domain": 3,
    "chargegw.drivers": 4,
    "chargegw.cluster": 5,
    "chargegw.api": 6,
    "chargegw.console": 6,
    "chargegw.app": 7,
    "chargegw.supervisor": 7,
    "chargegw.cli": 7,
    "chargegw.ops": 7,
    "chargegw.replay": 7,
    "chargegw.__main__": 7,
}
KERNEL = 0
ENGINES = ("chargegw.domain.params", "chargegw.domain.firmware", "chargegw.domain.billing")


def layer_of(module: str) -> int:
    """The layer of a chargegw module (the kernel unless a package above claims it)."""
    for prefix, rank in LAYERS.items():
        if module == prefix or module.startswith(prefix + "."):
            return rank
    return KERNEL


def module_name(path: Path, src: Path) -> str:
    parts = list(path.relative_to(src).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports(path: Path, module: str) -> Iterator[tuple[int, str]]:
    """(line, imported module) for every import in the file, relative ones resolved."""
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            yield node.lineno, target
            # `from chargegw.domain import params` imports the module chargegw.domain.params
            for alias in node.names:
                if _is_module(f"{target}.{alias.name}"):
                    yield node.lineno, f"{target}.{alias.name}"


def _is_module(name: str) -> bool:
    top, *rest = name.split(".")
    base = ROOT / top / "src" / top / Path(*rest) if rest else ROOT / top / "src" / top
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


def sources(distribution: str, package: str) -> Iterator[tuple[Path, str]]:
    src = ROOT / distribution / "src"
    for path in sorted((src / package).rglob("*.py")):
        yield path, module_name(path, src)


def violations() -> list[str]:
    found: list[str] = []
    for path, module in sources("chargegw", "chargegw"):
        where = f"{module}"
        own = layer_of(module)
        for line, target in imports(path, module):
            if target.startswith("chargesim"):
                found.append(f"{where}:{line} imports the tools package {target}")
            if not target.startswith("chargegw"):
                continue
            if target in ("chargegw", "chargegw.__version__"):
                continue
            if layer_of(target) > own:
                found.append(f"{where}:{line} imports the higher layer {target}")
            if module.startswith("chargegw.drivers") and target.startswith(ENGINES):
                found.append(f"{where}:{line} (a driver) imports the engine {target}")
    for path, module in sources("chargeproto", "chargeproto"):
        for line, target in imports(path, module):
            if target.split(".")[0] in ("chargegw", "chargesim"):
                found.append(f"{module}:{line} (the codec library) imports {target}")
    return sorted(set(found))


#: violations that exist today and are being removed (the list only ever shrinks)
KNOWN: set[str] = set()


def _key(violation: str) -> str:
    module, _, rest = violation.partition(":")
    return module + " " + rest.partition(" ")[2]


def test_no_new_layer_violations() -> None:
    new = [v for v in violations() if _key(v) not in KNOWN]
    assert not new, "imports that break the layer rule (docs/architecture.md):\n" + "\n".join(new)


def test_known_violations_still_exist() -> None:
    """A fixed violation leaves KNOWN too, so the list cannot hide a new one later."""
    gone = KNOWN - {_key(v) for v in violations()}
    assert not gone, f"fixed, remove from KNOWN: {sorted(gone)}"


@pytest.mark.parametrize(
    ("module", "layer"),
    [
        ("chargegw.core", 0),
        ("chargegw.store.writer", 1),
        ("chargegw.net.transport", 2),
        ("chargegw.domain.orders", 3),
        ("chargegw.drivers.bkv", 4),
        ("chargegw.cluster.directory", 5),
        ("chargegw.api.app", 6),
        ("chargegw.app", 7),
        ("chargegw.application", 0),
    ],
)
def test_layer_of(module: str, layer: int) -> None:
    assert layer_of(module) == layer


# ---------------------------------------------------------------- SQL stays in repositories

#: packages that hold no SQL: routers and drivers call the repositories of store/domain
NO_SQL = ("chargegw.api", "chargegw.drivers")
#: a string that starts like a statement (upper case, as the code base writes SQL)
_STATEMENT = re.compile(r"^\s*(SELECT|INSERT|UPDATE|DELETE|WITH)\s")
#: asyncpg connection and pool methods that run SQL
_RUNS_SQL = frozenset(
    {
        "fetch",
        "fetchrow",
        "fetchval",
        "execute",
        "executemany",
        "cursor",
        "copy_records_to_table",
        "copy_to_table",
        "copy_from_query",
        "copy_from_table",
    }
)


def sql_uses(path: Path) -> list[tuple[int, str]]:
    """(line, what) for SQL text and for calls that run SQL in a source file."""
    return sorted(set(_sql_nodes(path)))


def _sql_nodes(path: Path) -> Iterator[tuple[int, str]]:
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        text = None
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            text = node.value
        elif isinstance(node, ast.JoinedStr) and node.values:
            first = node.values[0]
            if isinstance(first, ast.Constant) and isinstance(first.value, str):
                text = first.value
        if text is not None and (match := _STATEMENT.match(text)):
            yield node.lineno, f"a {match.group(1)} statement"
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr in _RUNS_SQL
        ):
            yield node.lineno, f"a .{node.func.attr}() call"


def sql_violations() -> list[str]:
    found = []
    for path, module in sources("chargegw", "chargegw"):
        if module.startswith(NO_SQL):
            found += [f"{module}:{line} runs SQL: {what}" for line, what in sql_uses(path)]
    return sorted(set(found))


#: SQL in routers and drivers today, being moved into repositories (only ever shrinks)
KNOWN_SQL: set[str] = set()


def test_no_sql_in_routers_or_drivers() -> None:
    new = [v for v in sql_violations() if _key(v) not in KNOWN_SQL]
    assert not new, "SQL belongs in store/domain repositories:\n" + "\n".join(new)


def test_known_sql_still_exists() -> None:
    gone = KNOWN_SQL - {_key(v) for v in sql_violations()}
    assert not gone, f"fixed, remove from KNOWN_SQL: {sorted(gone)}"


def test_the_sql_check_finds_sql(tmp_path: Path) -> None:
    source = tmp_path / "router.py"
    source.write_text(
        "async def f(conn, x):\n"
        "    await conn.fetchrow('SELECT 1')\n"
        '    q = f"""\n  UPDATE t SET a = {x}"""\n'
        "    return 'Select a device'\n"
    )
    assert sql_uses(source) == [
        (2, "a .fetchrow() call"),
        (2, "a SELECT statement"),
        (3, "a UPDATE statement"),
    ]
