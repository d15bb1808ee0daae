"""Programs that run other code: the dynamic loader, language runtimes, emulators, debuggers.

File capabilities are raised at ``execve`` of the file that carries them and
stay with the process; they are recomputed at the next ``execve``. A program
that runs code it is given *inside its own process* hands its capabilities to
that code: ``ld.so ./prog`` maps and runs ``prog`` in the loader's process,
``python3 script.py`` runs the script, ``qemu-x86_64 ./prog`` and valgrind's
tools run a guest program, a debugger runs commands and scripts. So such a
program with capabilities gives them to whoever can run it.

Pure: :func:`runs_other_code` judges a file name and the
:class:`~capkeeper.elf.ElfFacts` read from its content; the content is the
first signal, the name (:data:`INTERPRETER`) the second.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from typing import NamedTuple

from capkeeper.elf import ElfFacts, ElfType

__all__ = [
    "INTERPRETER",
    "LOADER_SONAME",
    "MARKER_SYMBOLS",
    "RUNTIME_LIBRARY",
    "RunsCode",
    "runs_other_code",
]

LOADER_SONAME = re.compile(
    r"ld-linux[\w.-]*\.so[0-9.]*|ld64\.so[0-9.]*|ld\.so[0-9.]*|ld-[0-9.]+\.so"
    r"|ld-musl-[\w.-]+|libc\.musl-[\w.-]+|ld-uClibc[\w.-]*|ld-elf[\w.]*\.so[0-9.]*"
)
"""SONAMEs of program interpreters (glibc, musl, uClibc, FreeBSD)."""

_LOADER_SYMBOLS = ("_rtld_global", "_rtld_global_ro", "_dl_argv")  # defined by glibc's ld.so

RUNTIME_LIBRARY = re.compile(
    r"lib(?:python|pypy|perl|ruby|node|v8|lua|luajit|jvm|mono|monosgen|coreclr|tcl|guile|php"
    r"|julia|R|gjs|mozjs|mruby|duktape|quickjs|ecl|gauche|chicken|racket|jim)"
    r"(?:[-_]?[0-9][0-9.]*[dmu]{0,2})?(?:-c)?\.so(?:\.[0-9]+)*"
)
"""``DT_NEEDED`` names of shared language runtimes (``libpython3.11.so.1.0``, ``libperl.so.5.36``).
"""

_RUNTIME_SYMBOLS: Mapping[str, str] = {
    # Exported by a program that links a runtime statically (Debian's python3.11 and
    # perl do), and by the runtime's shared library itself.
    "Py_BytesMain": "Python",
    "Py_Main": "Python",
    "Py_Initialize": "Python",
    "parse_and_execute": "Bash",  # bash is linked -rdynamic for its loadable builtins
    "perl_parse": "Perl",
    "perl_run": "Perl",
    "ruby_init": "Ruby",
    "ruby_run_node": "Ruby",
    "luaL_newstate": "Lua",
    "lua_newstate": "Lua",
    "JNI_CreateJavaVM": "Java",
    "Tcl_CreateInterp": "Tcl",
    "Jim_CreateInterp": "Tcl",
    "scm_boot_guile": "Guile",
    "scm_init_guile": "Guile",
    "php_execute_script": "PHP",
    "php_module_startup": "PHP",
    "jl_init": "Julia",
    "Rf_initEmbeddedR": "R",
    "mono_jit_init": "Mono",
    "napi_module_register": "Node.js",
    "gjs_context_eval": "GJS",
    "JS_NewContext": "JavaScript",
    "duk_create_heap": "JavaScript",
    "mrb_open": "mruby",
}

MARKER_SYMBOLS: tuple[str, ...] = (*_LOADER_SYMBOLS, *_RUNTIME_SYMBOLS)
"""Dynamic symbols to look up in an ELF file (see :func:`capkeeper.elf.parse`)."""

_EMULATORS: Mapping[str, re.Pattern[str]] = {
    "qemu": re.compile(r"qemu-[\w.+-]+"),
    "valgrind": re.compile(
        r"valgrind(?:\.bin)?|vgdb|(?:memcheck|cachegrind|callgrind|helgrind|drd|massif|dhat"
        r"|lackey|none|exp-[a-z]+|getoff)-(?:amd64|x86|arm64|arm|ppc32|ppc64be|ppc64le|s390x"
        r"|mips32|mips64|nanomips)-(?:linux|freebsd|solaris|darwin)"
    ),
    "box64": re.compile(r"box(?:64|86)"),
    "FEX": re.compile(r"FEX(?:Interpreter|Loader|Bash)"),
    "blink": re.compile(r"blink(?:enlights)?"),
}
_DEBUGGERS: Mapping[str, re.Pattern[str]] = {
    "gdb": re.compile(r"gdb(?:server|-multiarch)?[0-9.\-]*"),
    "lldb": re.compile(r"lldb(?:-server)?[0-9.\-]*"),
}

INTERPRETER = re.compile(
    r"(?:python[0-9.]*(?:d|m|dm|u)?|pypy|perl|ruby|jruby|irb|node|nodejs|php(?:-cgi|-fpm|-cli)?"
    r"|lua|luajit|texlua|tclsh|wish|jimsh|expect|bash|sh|dash|zsh|ksh|ksh93|mksh|yash|csh|tcsh"
    r"|fish|busybox|toybox|awk|gawk|mawk|nawk|java|jshell|jrunscript|guile|Rscript|R|julia|erl"
    r"|escript|beam\.smp|elixir|pwsh|deno|bun|qjs|gjs|vim?|nvim|emacs"
    r"|ld-(?:linux|musl|uClibc)[\w.-]*|ld64\.so|ld\.so|ld-[0-9.]+\.so)"
    r"[0-9.\-]*(?:-?dbg|-debug)?(?:\.bin|\.real)?"
)
"""Basenames of programs that run code they are given (the second signal, after content)."""


class RunsCode(NamedTuple):
    """Why a file is judged to run other code, and what it runs."""

    reason: str  # a clause: "it is the dynamic loader"
    runs: str  # "program" or "script"

    def __str__(self) -> str:
        return f"runs other code: {self.reason}; every {self.runs} it runs"


@functools.lru_cache(maxsize=256)
def _by_content(elf: ElfFacts) -> RunsCode | None:
    if elf.type == ElfType.DYN and elf.interp is None:
        # A shared object without PT_INTERP that the kernel can exec runs as its own
        # program interpreter; the dynamic loader is the one whose job is to load others.
        # Static-PIE executables share the shape but have no loader SONAME or symbols.
        loader = elf.soname is not None and LOADER_SONAME.fullmatch(elf.soname)
        symbol = next((s for s in _LOADER_SYMBOLS if s in elf.exports), None)
        if loader or symbol:
            return RunsCode("it is the dynamic loader", "program")
    library = next((n for n in elf.needed if RUNTIME_LIBRARY.fullmatch(n)), None)
    if library is not None:
        return RunsCode(f"it links {library}", "script")
    for symbol, language in _RUNTIME_SYMBOLS.items():
        if symbol in elf.exports:
            return RunsCode(f"it embeds a {language} runtime (exports {symbol})", "script")
    return None


# Every declared binary has a name of its own (10,000 at the scale the daemon is built
# for), few distinct facts: each is remembered on its own, the names in a larger memo.
@functools.lru_cache(maxsize=16384)
def _by_name(name: str) -> RunsCode | None:
    for label, pattern in _EMULATORS.items():
        if pattern.fullmatch(name):
            return RunsCode(f"it is an emulator ({label})", "program")
    for label, pattern in _DEBUGGERS.items():
        if pattern.fullmatch(name):
            return RunsCode(f"it is a debugger ({label})", "program")
    if INTERPRETER.fullmatch(name):
        return RunsCode("its name looks like an interpreter", "script")
    return None


@functools.lru_cache(maxsize=1024)
def runs_other_code(name: str, elf: ElfFacts | None) -> RunsCode | None:
    """Why the ELF file called ``name`` runs other code, or ``None`` when it does not.

    ``elf`` is ``None`` when the content could not be read as ELF: the name decides.
    Remembered by value; past 1,024 pairs (each declared binary has a name of its own),
    the content's verdict and the name's are still remembered apart.
    """
    return (_by_content(elf) if elf is not None else None) or _by_name(name)
