"""Programs that run other code, recognised by content first and by name second.

Each case copies a real program of this machine (or one compiled here with
gcc) into a root-owned temp tree under a chosen name, declares it with
capabilities, applies, and compares with the reference ``getcap``: a loader,
runtime, emulator or debugger is refused and nothing is written; ordinary
programs (static, static-PIE, ``true``, ``ping``) are granted.
"""

from __future__ import annotations

import glob
import io
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from capkeeper.capabilities import format_text, parse
from capkeeper.cli import ExitStatus, main
from capkeeper.elf import ElfFacts, ElfType, inspect_bytes
from capkeeper.enforce import reconcile
from capkeeper.files import XATTR_NAME, observe
from capkeeper.interpreters import MARKER_SYMBOLS, runs_other_code
from capkeeper.model import Entry
from capkeeper.reconcile import Status
from tests.conftest import getcap, require_tool
from tests.elf_builder import build_elf

LOADER = "/lib64/ld-linux-x86-64.so.2"
LOADED = "it is the dynamic loader"
HINT = (
    " (hint: give the one service that needs them AmbientCapabilities= in its unit, or "
    "declare allow_interpreter = true if you really mean it)"
)


def _entry(path: Path, **kw: object) -> Entry:
    caps = parse("cap_net_bind_service=+ep", last_cap=40)
    return Entry(path=str(path), caps=caps, caps_text=format_text(caps, last_cap=40), **kw)  # type: ignore[arg-type]


def _need(path: str) -> str:
    if not os.path.exists(path):
        pytest.skip(f"needs {path} (make test installs it)")
    return path


def _valgrind_tool() -> str:
    found = sorted(glob.glob("/usr/libexec/valgrind/memcheck-*-linux"))
    found += sorted(glob.glob("/usr/lib/*/valgrind/memcheck-*-linux"))
    if not found:
        pytest.skip("needs valgrind (make test installs it)")
    return found[0]


@pytest.fixture(scope="module")
def compiled(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny programs built with gcc: static, static-PIE, and one linking libpython3.11."""
    gcc = require_tool("gcc")
    work = tmp_path_factory.mktemp("cc")
    (work / "tiny.c").write_text("int main(void) { return 0; }\n")
    (work / "embed.c").write_text(
        "#include <Python.h>\nint main(void) { Py_Initialize(); return Py_FinalizeEx(); }\n"
    )
    _need("/usr/include/python3.11/Python.h")
    builds = {
        "static": ["-static", "tiny.c"],
        "static-pie": ["-static-pie", "-fPIE", "tiny.c"],
        "embed": ["-I/usr/include/python3.11", "embed.c", "-lpython3.11"],
    }
    for name, argv in builds.items():
        subprocess.run([gcc, "-O", "-o", name, *argv], cwd=work, check=True, capture_output=True)
    return {name: work / name for name in builds}


@dataclass(frozen=True)
class Case:
    source: str  # a path, or "compiled:<name>"
    name: str  # the copy's name
    why: str | None  # None: an ordinary program
    runs: str = "program"


CASES = {
    "loader as myapp": Case(LOADER, "myapp", "it is the dynamic loader"),
    "loader, resolved": Case(
        os.path.realpath(LOADER), "ld-linux-x86-64.so.2", "it is the dynamic loader"
    ),
    "python3.11 as myapp": Case(
        "/usr/bin/python3.11",
        "myapp",
        "it embeds a Python runtime (exports Py_BytesMain)",
        "script",
    ),
    "perl as myapp": Case(
        "/usr/bin/perl", "myapp", "it embeds a Perl runtime (exports perl_parse)", "script"
    ),
    "bash as myapp": Case(
        "/bin/bash", "myapp", "it embeds a Bash runtime (exports parse_and_execute)", "script"
    ),
    "gdb as myapp": Case("/usr/bin/gdb", "myapp", "it links libpython3.11.so.1.0", "script"),
    "program linking libpython": Case(
        "compiled:embed", "myapp", "it links libpython3.11.so.1.0", "script"
    ),
    "valgrind launcher": Case(
        "/usr/bin/valgrind.bin", "valgrind.bin", "it is an emulator (valgrind)"
    ),
    "valgrind tool": Case("valgrind-tool", "memcheck-amd64-linux", "it is an emulator (valgrind)"),
    "pypy3 by name": Case("/bin/true", "pypy3", "its name looks like an interpreter", "script"),
    "qemu-x86_64 by name": Case("/bin/true", "qemu-x86_64", "it is an emulator (qemu)"),
    "php-fpm8.2 by name": Case(
        "/bin/true", "php-fpm8.2", "its name looks like an interpreter", "script"
    ),
    "python3.11-dbg by name": Case(
        "/bin/true", "python3.11-dbg", "its name looks like an interpreter", "script"
    ),
    "gdbserver by name": Case("/bin/true", "gdbserver", "it is a debugger (gdb)"),
    "static": Case("compiled:static", "myapp", None),
    "static-pie": Case("compiled:static-pie", "myapp", None),
    "true": Case("/bin/true", "true", None),
    "ping": Case("/usr/bin/ping", "ping", None),
}


@pytest.mark.parametrize("case", list(CASES))
def test_real_programs(case: str, tree: Path, compiled: dict[str, Path]) -> None:
    """Apply on a copy of a real program: refused (nothing written) or granted, as getcap sees."""
    spec = CASES[case]
    if spec.source.startswith("compiled:"):
        source = str(compiled[spec.source.removeprefix("compiled:")])
    elif spec.source == "valgrind-tool":
        source = _valgrind_tool()
    else:
        source = _need(spec.source)
    copy = tree / spec.name
    shutil.copyfile(source, copy)  # follows symlinks: the content of the real file
    copy.chmod(0o755)
    outcome = reconcile(_entry(copy), write=True)
    if spec.why is None:
        assert outcome.status is Status.RESTORED, outcome.reason
        assert getcap(copy) == "cap_net_bind_service=ep"
        return
    assert outcome.status is Status.REFUSED
    assert outcome.reason == (
        f"{copy} runs other code: {spec.why}; every {spec.runs} it runs would get these "
        f"capabilities{HINT}"
    )
    assert XATTR_NAME not in os.listxattr(copy)
    assert getcap(copy) == ""


def test_allow_interpreter_grants_even_the_loader(tree: Path) -> None:
    """allow_interpreter = true is the one way to put capabilities on a loader copy."""
    copy = tree / "myapp"
    shutil.copyfile(LOADER, copy)
    copy.chmod(0o755)
    outcome = reconcile(_entry(copy, allow_interpreter=True), write=True)
    assert outcome.status is Status.RESTORED
    assert getcap(copy) == "cap_net_bind_service=ep"


def test_validate_reports_the_loader(tree: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """validate names the reason and the rule, and exits with refusal status."""
    copy = tree / "myapp"
    shutil.copyfile(LOADER, copy)
    copy.chmod(0o755)
    state = tree / "state.toml"
    state.write_text(f'[[binary]]\npath = "{copy}"\ncaps = "cap_dac_read_search+ep"\n')
    out = io.StringIO()
    code = main(["--log-format", "console", "validate", "--state", str(state), "--json"], out=out)
    records = [r for r in out.getvalue().splitlines() if '"interpreter"' in r]
    assert len(records) == 1
    assert "runs other code: it is the dynamic loader" in records[0]
    assert code != ExitStatus.OK
    assert getcap(copy) == ""


def test_observation_carries_the_elf_facts(tree: Path) -> None:
    """observe() reads the facts from the descriptor it opened."""
    copy = tree / "myapp"
    shutil.copyfile(LOADER, copy)
    facts = observe(str(copy)).elf
    assert facts is not None
    assert facts.interp is None
    assert facts.soname == "ld-linux-x86-64.so.2"


def _facts(**kw: object) -> ElfFacts:
    return inspect_bytes(build_elf(**kw).data, MARKER_SYMBOLS)  # type: ignore[arg-type,return-value]


@pytest.mark.parametrize(
    ("facts", "why"),
    [
        (
            {"interp": None, "soname": "ld-linux-aarch64.so.1", "needed": ()},
            "it is the dynamic loader",
        ),
        ({"interp": None, "soname": "ld64.so.2", "needed": ()}, "it is the dynamic loader"),
        (
            {"interp": None, "soname": "ld-musl-x86_64.so.1", "needed": ()},
            "it is the dynamic loader",
        ),
        (
            {"interp": None, "soname": None, "exports": ("_rtld_global",)},
            "it is the dynamic loader",
        ),
        ({"needed": ("libruby-3.1.so.3.1",)}, "it links libruby-3.1.so.3.1"),
        ({"needed": ("libnode.so.108",)}, "it links libnode.so.108"),
        ({"needed": ("liblua5.4.so.0",)}, "it links liblua5.4.so.0"),
        ({"needed": ("libluajit-5.1.so.2",)}, "it links libluajit-5.1.so.2"),
        ({"needed": ("libjvm.so",)}, "it links libjvm.so"),
        ({"needed": ("libmonosgen-2.0.so.1",)}, "it links libmonosgen-2.0.so.1"),
        ({"needed": ("libtcl8.6.so",)}, "it links libtcl8.6.so"),
        ({"needed": ("libguile-3.0.so.1",)}, "it links libguile-3.0.so.1"),
        ({"needed": ("libphp8.2.so",)}, "it links libphp8.2.so"),
        ({"needed": ("libjulia.so.1",)}, "it links libjulia.so.1"),
        ({"needed": ("libR.so",)}, "it links libR.so"),
        ({"needed": ("libmozjs-102.so.0",)}, "it links libmozjs-102.so.0"),
        ({"needed": ("libgjs.so.0",)}, "it links libgjs.so.0"),
        ({"needed": ("libperl.so.5.36",)}, "it links libperl.so.5.36"),
        ({"exports": ("ruby_init",)}, "it embeds a Ruby runtime (exports ruby_init)"),
        ({"exports": ("luaL_newstate",)}, "it embeds a Lua runtime (exports luaL_newstate)"),
        (
            {"exports": ("JNI_CreateJavaVM",)},
            "it embeds a Java runtime (exports JNI_CreateJavaVM)",
        ),
        ({"exports": ("Tcl_CreateInterp",)}, "it embeds a Tcl runtime (exports Tcl_CreateInterp)"),
        ({"imports": ("Py_BytesMain",)}, None),  # an import is not a runtime
        ({"e_type": ElfType.DYN, "interp": None, "needed": ()}, None),  # static-PIE shape
        ({"e_type": ElfType.EXEC, "interp": None, "soname": "ld-linux-x86-64.so.2"}, None),
        ({"needed": ("libpythonic.so.1", "libc.so.6")}, None),
    ],
)
def test_content_signals(facts: dict[str, object], why: str | None) -> None:
    """Each content signal on a built file, and look-alikes that are not signals."""
    found = runs_other_code("app", _facts(**facts))
    assert (found.reason if found else None) == why


@pytest.mark.parametrize(
    "name",
    [
        "python3", "python3.11", "python3.11d", "python3.11-dbg", "pypy3", "pypy3.9", "perl5.36.0",
        "ruby3.1", "node", "nodejs", "php", "php8.2", "php-fpm8.2", "php-cgi", "lua5.4",
        "luajit", "tclsh8.6", "bash", "busybox", "gawk", "java", "Rscript", "julia", "erl",
        "pwsh", "deno", "bun", "gdb", "gdbserver", "lldb-15", "qemu-x86_64",
        "qemu-aarch64-static", "qemu-system-x86_64", "valgrind", "valgrind.bin", "vgdb",
        "memcheck-amd64-linux", "none-x86-linux", "box64", "FEXInterpreter", "vim", "emacs",
        "ld.so", "ld-linux-x86-64.so.2", "ld-2.36.so", "ld-musl-x86_64.so.1",
    ],
)  # fmt: skip
def test_names_flagged(name: str) -> None:
    """The second signal: names of interpreters, emulators and debuggers."""
    assert runs_other_code(name, None) is not None


@pytest.mark.parametrize(
    "name",
    ["myapp", "ping", "sshd", "named", "nginx", "pythonic", "perlbrew-helper", "ld", "nodered",
     "shred", "bashful", "gdbm_dump", "qemu"],
)  # fmt: skip
def test_names_not_flagged(name: str) -> None:
    """Names that only resemble one are not flagged by name."""
    assert runs_other_code(name, None) is None
