"""The package's layering, read from every module's imports with ``ast``.

Four layers; an import only ever points down (or sideways within a layer), nothing
imports the CLI, and there is no import circle. The pure core imports no module that
does I/O, so it can be tested with built inputs. See "Architecture" in README.md.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "capkeeper"

LEAF = 0
PURE = 1
ADAPTER = 2
SHELL = 3

# Every module of the package, by layer. A new module must be placed here.
LAYERS: dict[str, int] = {
    "exit_codes": LEAF,
    "errors": LEAF,
    "events": LEAF,
    "capabilities": PURE,
    "plaintoml": PURE,
    "elf": PURE,
    "interpreters": PURE,
    "model": PURE,
    "trust": PURE,
    "reconcile": PURE,
    "schedule": PURE,
    "paths": ADAPTER,
    "classify": PURE,
    "files": ADAPTER,
    "kernel": ADAPTER,
    "mounts": ADAPTER,
    "inotify": ADAPTER,
    "watcher": ADAPTER,
    "notify": ADAPTER,
    "journal": ADAPTER,
    "log": ADAPTER,
    "cache": ADAPTER,
    "state": ADAPTER,
    "settings": ADAPTER,
    "status": ADAPTER,
    "snapshot": ADAPTER,
    "systemd": ADAPTER,
    "enforce": ADAPTER,
    "keeper": ADAPTER,
    "scan": ADAPTER,
    "frames": ADAPTER,
    "helper": ADAPTER,
    "inventory": ADAPTER,
    "diagnose": ADAPTER,
    "daemon": SHELL,
    "cli": SHELL,
    "parser": SHELL,
    "__main__": SHELL,
    "__init__": LEAF,
    "_version": LEAF,
}

# Standard-library and third-party modules that reach the OS: the pure core and the
# leaf never import them.
IO_MODULES = frozenset(
    {
        "os",
        "io",
        "subprocess",
        "socket",
        "select",
        "selectors",
        "signal",
        "fcntl",
        "mmap",
        "shutil",
        "tempfile",
        "pathlib",
        "pwd",
        "grp",
        "ctypes",
        "threading",
        "multiprocessing",
        "logging",
        "time",
        "importlib",
        "pyinotify",
        "xattr",
        "sdnotify",
        "structlog",
        "pydantic",
        "pydantic_settings",
        "tomllib",
    }
)


def _module_name(path: Path) -> str:
    relative = path.relative_to(PACKAGE).with_suffix("")
    return ".".join(relative.parts)


def _modules() -> dict[str, ast.Module]:
    return {
        _module_name(path): ast.parse(path.read_text(), str(path))
        for path in sorted(PACKAGE.rglob("*.py"))
    }


def _imports(tree: ast.Module) -> Iterator[str]:
    """Every module named by an import anywhere in ``tree`` (function-level too)."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "capkeeper":
                for alias in node.names:
                    is_module = (PACKAGE / f"{alias.name}.py").exists()
                    yield f"capkeeper.{alias.name}" if is_module else "capkeeper"
            else:
                yield node.module


def _internal(name: str) -> str | None:
    if name == "capkeeper":
        return "__init__"
    if name.startswith("capkeeper."):
        return name.removeprefix("capkeeper.")
    return None


def _layer(module: str) -> int:
    top = module.split(".", maxsplit=1)[0]
    if top == "commands":
        return SHELL
    return LAYERS[top]


MODULES = _modules()


def test_every_module_has_a_layer() -> None:
    """A new module is placed in a layer before it is used."""
    unplaced = [
        m for m in MODULES if m.split(".")[0] not in LAYERS and m.split(".")[0] != "commands"
    ]
    assert unplaced == []


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_point_down(module: str) -> None:
    """No module imports one of a higher layer, and nothing but ``__main__`` imports the CLI."""
    own = _layer(module)
    upward = []
    for name in _imports(MODULES[module]):
        target = _internal(name)
        if target is None or target == module:
            continue
        if _layer(target) > own:
            upward.append(target)
        if target == "cli" and module != "__main__":
            upward.append("cli")
    assert upward == []


@pytest.mark.parametrize("module", sorted(m for m in MODULES if _layer(m) <= PURE))
def test_pure_core_does_no_io(module: str) -> None:
    """The pure core and the leaf import no module that reaches the OS."""
    io = sorted({n.split(".")[0] for n in _imports(MODULES[module])} & IO_MODULES)
    assert io == []


def test_exit_codes_import_nothing_internal() -> None:
    """exit_codes.py and errors.py sit below everything: they import no capkeeper module."""
    for module in ("exit_codes", "errors"):
        assert [n for n in _imports(MODULES[module]) if _internal(n)] == []


def test_no_import_circle() -> None:
    """The import graph of the package (function-level imports included) has no cycle."""
    graph = {
        module: {
            target
            for name in _imports(tree)
            if (target := _internal(name)) is not None and target in MODULES and target != module
        }
        for module, tree in MODULES.items()
    }
    # __init__ is imported implicitly by every submodule; it must import none of them.
    graph["__init__"] = {t for t in graph["__init__"] if t != "__init__"}
    done: set[str] = set()
    stack: list[str] = []

    def visit(module: str) -> None:
        if module in stack:
            cycle = [*stack[stack.index(module) :], module]
            raise AssertionError("import circle: " + " -> ".join(cycle))
        if module in done:
            return
        stack.append(module)
        for target in sorted(graph[module]):
            visit(target)
        stack.pop()
        done.add(module)

    for module in sorted(graph):
        visit(module)


# -- extended attributes: one adapter -----------------------------------------------------

_OS_XATTR = frozenset({"getxattr", "setxattr", "listxattr", "removexattr"})
# files.py is the one module that reaches extended attributes, through the xattr package
# (by descriptor) or os (by name, for the audit walker's hot loop).
OS_XATTR_USERS = frozenset({"files"})


def _xattr_uses(tree: ast.Module) -> tuple[bool, bool]:
    """Whether ``tree`` imports the ``xattr`` package, and whether it names an
    ``os.*xattr`` function (called, or bound to a local name for a hot loop)."""
    package = any(name == "xattr" or name.startswith("xattr.") for name in _imports(tree))
    direct = False
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and node.attr in _OS_XATTR
            and isinstance(node.value, ast.Name)
            and node.value.id == "os"
        ):
            direct = True
        elif isinstance(node, ast.ImportFrom) and node.module == "os":
            direct = direct or any(alias.name in _OS_XATTR for alias in node.names)
    return package, direct


def test_xattr_package_is_used_by_files_alone() -> None:
    """The xattr package is imported by files.py and nowhere else."""
    users = {module for module, tree in MODULES.items() if _xattr_uses(tree)[0]}
    assert users == {"files"}


def test_os_xattr_calls_stay_in_the_adapter() -> None:
    """os.getxattr/setxattr/listxattr/removexattr are named in files.py and nowhere else."""
    users = {module for module, tree in MODULES.items() if _xattr_uses(tree)[1]}
    assert users == OS_XATTR_USERS, f"os.*xattr outside the adapter: {users - OS_XATTR_USERS}"


# -- each dependency behind one adapter ---------------------------------------------------

ADAPTER_OF = {
    "xattr": {"files"},
    "pyinotify": {"inotify"},
    "sdnotify": {"notify"},
    "structlog": {"log", "journal"},
}


@pytest.mark.parametrize("dependency", sorted(ADAPTER_OF))
def test_each_dependency_has_one_adapter(dependency: str) -> None:
    """A package that reaches the OS or shapes output is imported by its adapter alone."""
    users = {
        module
        for module, tree in MODULES.items()
        if any(name.split(".")[0] == dependency for name in _imports(tree))
    }
    assert users == ADAPTER_OF[dependency]
