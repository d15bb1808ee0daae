"""State file loading: valid files, state.d order, and every error message in full."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from capkeeper.capabilities import parse
from capkeeper.errors import StateError, UsageError
from capkeeper.state import MAX_STATE_BYTES, load_state


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _problems(main: Path) -> list[str]:
    with pytest.raises(StateError) as info:
        load_state(main, last_cap=40)
    return info.value.problems


def test_loads_main_and_dropins_in_name_order(tmp_path: Path) -> None:
    """Entries come from state.toml then state.d/*.toml sorted by name."""
    main = _write(tmp_path / "state.toml", '[[binary]]\npath = "/a"\ncaps = "cap_chown+ep"\n')
    _write(tmp_path / "state.d/20-b.toml", '[[binary]]\npath = "/b"\ncaps = "cap_kill=p"\n')
    _write(tmp_path / "state.d/10-c.toml", '[[binary]]\npath = "/c"\ncaps = "CAP_NET_RAW=ep"\n')
    _write(tmp_path / "state.d/ignored.txt", "not toml")
    state = load_state(main, last_cap=40)
    assert [e.path for e in state.entries] == ["/a", "/c", "/b"]
    assert [e.caps_text for e in state.entries] == ["cap_chown=ep", "cap_net_raw=ep", "cap_kill=p"]
    assert state.entries[1].source == "state.d/10-c.toml: entry 1"
    assert state.entries[0].caps == parse("cap_chown=ep", last_cap=40)


def test_optional_keys(tmp_path: Path) -> None:
    """sha256, owner and allow_inheritable are read and normalised."""
    digest = "AB" * 32
    main = _write(
        tmp_path / "state.toml",
        f'[[binary]]\npath = "/usr//bin/./x"\ncaps = "cap_net_raw=eip"\nsha256 = "{digest}"\n'
        'owner = "nobody"\nallow_inheritable = true\n',
    )
    (entry,) = load_state(main, last_cap=40).entries
    assert entry.path == "/usr/bin/x"
    assert entry.sha256 == digest.lower()
    assert entry.owner == "nobody"
    assert entry.owner_uid == 65534
    assert entry.allow_inheritable


def test_all_errors_reported_at_once_with_file_and_entry(tmp_path: Path) -> None:
    """Every problem in every file is listed, each naming its file and entry."""
    main = _write(
        tmp_path / "state.toml",
        '[[binary]]\npath = "/usr/bin/a"\ncaps = "cap_net_raw+ep"\n'
        '[[binary]]\npath = "relative/b"\ncaps = "cap_net_raw+ep"\ncolour = "red"\n',
    )
    _write(
        tmp_path / "state.d/web.toml",
        '[[binary]]\npath = "/usr/local/bin/ok"\ncaps = "cap_chown=p"\n'
        '[[binary]]\npath = "/usr/bin/a"\ncaps = "cap_chown=p"\n'
        '[[binary]]\npath = "/usr/local/bin/web"\ncaps = "cap_net_bind=+ep"\n'
        '[[binary]]\npath = "/usr/local/bin/inh"\ncaps = "cap_chown=ip"\n'
        '[[binary]]\npath = "/usr/local/bin/own"\ncaps = "cap_chown=p"\n'
        'owner = "no-such-user-here"\nsha256 = "xyz"\n'
        '[[binary]]\ncaps = "cap_chown=p"\n',
    )
    assert _problems(main) == [
        "state.toml: entry 2 (relative/b): path: must be an absolute path, got 'relative/b'",
        "state.toml: entry 2 (relative/b): colour: unknown key",
        "state.d/web.toml: entry 2 (/usr/bin/a): path: already declared in state.toml: entry 1",
        "state.d/web.toml: entry 3 (/usr/local/bin/web): caps: "
        "unknown capability 'cap_net_bind' (clause 1: 'cap_net_bind=+ep')",
        "state.d/web.toml: entry 4 (/usr/local/bin/inh): caps: "
        "inheritable capabilities need allow_inheritable = true",
        "state.d/web.toml: entry 5 (/usr/local/bin/own): sha256: must be 64 hexadecimal digits",
        "state.d/web.toml: entry 6: path: Field required",
    ]


def test_unknown_owner(tmp_path: Path) -> None:
    """An owner that is not a user on this host is an error."""
    main = _write(
        tmp_path / "state.toml",
        '[[binary]]\npath = "/x"\ncaps = "cap_chown=p"\nowner = "no-such-user-here"\n',
    )
    assert _problems(main) == ["state.toml: entry 1 (/x): owner: no such user 'no-such-user-here'"]


def test_wrong_types_and_top_level_keys(tmp_path: Path) -> None:
    """Wrong value types and unknown top-level keys are reported, not crashed on."""
    main = _write(
        tmp_path / "state.toml",
        'version = 2\n[[binary]]\npath = 7\ncaps = "cap_chown=p"\nallow_inheritable = "yes"\n',
    )
    assert _problems(main) == [
        "state.toml: unknown top-level key 'version' (only [[binary]] tables are allowed)",
        "state.toml: entry 1: path: Input should be a valid string",
        "state.toml: entry 1: allow_inheritable: Input should be a valid boolean",
    ]


def test_capability_beyond_kernel(tmp_path: Path) -> None:
    """A capability number above the running kernel's last cap is refused."""
    main = _write(tmp_path / "state.toml", '[[binary]]\npath = "/x"\ncaps = "41=p"\n')
    assert _problems(main) == [
        "state.toml: entry 1 (/x): caps: 41 not known to this kernel (last capability is 40)"
    ]


def test_invalid_toml_and_missing_file(tmp_path: Path) -> None:
    """TOML syntax errors and a missing main file are reported with the file name."""
    main = _write(tmp_path / "state.toml", "[[binary]\n")
    (problem,) = _problems(main)
    assert problem.startswith("state.toml: invalid TOML: ")
    missing = tmp_path / "nope.toml"
    assert _problems(missing) == [
        f"{missing}: not found (create it, or point --state / CAPKEEPER_STATE at another file)"
    ]


def test_state_nested_too_deeply_is_a_problem(tmp_path: Path) -> None:
    """tomllib recurses once per nesting level: a document nested past Python's recursion
    limit is reported (the RecursionError escaped as an internal error before)."""
    main = _write(tmp_path / "state.toml", "x = " + "[" * 3000 + "]" * 3000 + "\n")
    assert _problems(main) == ["state.toml: invalid TOML: nested too deeply to parse"]


def test_state_larger_than_the_limit_is_not_read(tmp_path: Path) -> None:
    """A state file (main or drop-in) larger than MAX_STATE_BYTES is a problem, found from
    its size before anything is read: a multi-gigabyte file cannot exhaust memory."""
    main = _write(tmp_path / "state.toml", "")
    with open(main, "r+b") as handle:
        handle.truncate(MAX_STATE_BYTES + 1)  # sparse: NUL bytes, which are invalid TOML
    dropin = _write(tmp_path / "state.d" / "big.toml", "")
    with open(dropin, "r+b") as handle:
        handle.truncate(8 << 30)
    limit = f"larger than {MAX_STATE_BYTES >> 20} MiB, the most a state file may hold"
    assert _problems(main) == [
        f"state.toml: {limit}: not read (split it into state.d/ drop-ins)",
        f"state.d/big.toml: {limit}: not read (split it into state.d/ drop-ins)",
    ]
    with open(main, "r+b") as handle:
        handle.truncate(MAX_STATE_BYTES)  # at the limit: read (and refused as TOML)
    (big, problem) = _problems(main)
    assert big.startswith("state.d/big.toml: larger than")
    assert problem.startswith("state.toml: invalid TOML: ")


def test_binary_must_be_array_of_tables(tmp_path: Path) -> None:
    """A [binary] table instead of [[binary]] is explained."""
    main = _write(tmp_path / "state.toml", '[binary]\npath = "/x"\n')
    assert _problems(main) == ["state.toml: 'binary' must be an array of tables ([[binary]])"]


def test_select_unknown_path_is_an_error(tmp_path: Path) -> None:
    """Selecting a path the state does not declare raises a usage error."""
    main = _write(tmp_path / "state.toml", '[[binary]]\npath = "/x"\ncaps = "cap_chown=p"\n')
    state = load_state(main, last_cap=40)
    assert [e.path for e in state.select(["/x"])] == ["/x"]
    with pytest.raises(UsageError, match="not declared in the state: /y"):
        state.select(["/x", "/y"])


def test_state_writable_by_others_is_refused(tmp_path: Path) -> None:
    """Whoever can edit the state can grant capabilities: loose state files are errors."""
    main = _write(tmp_path / "state.toml", '[[binary]]\npath = "/x"\ncaps = "cap_chown=p"\n')
    dropin = _write(tmp_path / "state.d/web.toml", "")
    os.chmod(main, 0o664)
    os.chown(dropin, 65534, 65534)
    assert _problems(main) == [
        "state.toml: writable by group or others (mode 0664): whoever can edit the state can "
        f"grant capabilities (chmod go-w {main})",
        f"state.d/web.toml: owned by uid 65534: whoever can edit the state can grant "
        f"capabilities (chown root {dropin})",
    ]
    os.chmod(main, 0o644)
    os.chown(dropin, 0, 0)
    os.chmod(tmp_path / "state.d", 0o777)
    assert _problems(main) == [
        "state.d: writable by group or others (mode 0777): whoever can edit the state can "
        f"grant capabilities (chmod go-w {tmp_path / 'state.d'})",
    ]


def test_paths_are_normalised_and_control_characters_refused(tmp_path: Path) -> None:
    """'//x' and '/x' are one path; a path with a newline is refused."""
    main = _write(
        tmp_path / "state.toml",
        '[[binary]]\npath = "//x"\ncaps = "cap_chown=p"\n'
        '[[binary]]\npath = "/x"\ncaps = "cap_chown=p"\n'
        '[[binary]]\npath = "/a\\nb"\ncaps = "cap_chown=p"\n',
    )
    assert _problems(main) == [
        "state.toml: entry 2 (/x): path: already declared in state.toml: entry 1",
        "state.toml: entry 3 (/a\\nb): path: must not contain control or format characters",
    ]


@pytest.mark.parametrize(
    ("path", "escaped"),
    [
        ("/a\nb", "/a\\nb"),
        ("/a\u202eb", "/a\\u202eb"),
        ("/a\u2028b", "/a\\u2028b"),
        ("/a\u200bb", "/a\\u200bb"),
        ("/a\x7fb", "/a\\x7fb"),
    ],
)
def test_path_with_what_printable_escapes_is_refused(
    tmp_path: Path, path: str, escaped: str
) -> None:
    """The state refuses exactly the paths errors.printable would have to escape."""
    # JSON's \\uXXXX escapes are valid in a TOML basic string.
    main = _write(
        tmp_path / "state.toml", f'[[binary]]\npath = {json.dumps(path)}\ncaps = "cap_chown=p"\n'
    )
    assert _problems(main) == [
        f"state.toml: entry 1 ({escaped}): path: must not contain control or format characters"
    ]


def test_printable_non_ascii_paths_are_accepted(tmp_path: Path) -> None:
    """Letters with accents, CJK and the no-break space are printable: such paths load."""
    paths = ["/opt/café/bin", "/opt/ü/漢字", "/opt/a\u00a0b"]
    main = _write(
        tmp_path / "state.toml",
        "".join(f'[[binary]]\npath = "{p}"\ncaps = "cap_chown=p"\n' for p in paths),
    )
    assert [e.path for e in load_state(main, last_cap=40).entries] == paths


def test_owner_out_of_range_or_with_nul(tmp_path: Path) -> None:
    """Owners that cannot be users are errors, not crashes."""
    main = _write(
        tmp_path / "state.toml",
        '[[binary]]\npath = "/x"\ncaps = "cap_chown=p"\nowner = "99999999999999999999"\n'
        '[[binary]]\npath = "/y"\ncaps = "cap_chown=p"\nowner = "a\\u0000b"\n',
    )
    assert _problems(main) == [
        "state.toml: entry 1 (/x): owner: no such user '99999999999999999999'",
        "state.toml: entry 2 (/y): owner: no such user 'a\\x00b'",
    ]


@pytest.mark.parametrize(
    "owner", ["\u00b2", "\u0661\u0662", "\uff11"], ids=["superscript", "arabic", "fullwidth"]
)
def test_owner_in_non_ascii_digits_is_a_user_name(tmp_path: Path, owner: str) -> None:
    """Only ASCII digits are a uid. ``"²"`` passes str.isdigit() but not int() (the
    ValueError escaped the loader: an internal error, and the daemon died on SIGHUP);
    ``"١٢"`` passed both and was silently uid 12. Both are user names, and there are none."""
    main = _write(
        tmp_path / "state.toml",
        f'[[binary]]\npath = "/x"\ncaps = "cap_chown=p"\nowner = "{owner}"\n',
    )
    assert _problems(main) == [f"state.toml: entry 1 (/x): owner: no such user {owner!r}"]


def test_allow_interpreter_is_read(tmp_path: Path) -> None:
    """allow_interpreter is an optional boolean key."""
    main = _write(
        tmp_path / "state.toml",
        '[[binary]]\npath = "/usr/bin/node"\ncaps = "cap_net_bind_service=+ep"\n'
        "allow_interpreter = true\n",
    )
    (entry,) = load_state(main, last_cap=40).entries
    assert entry.allow_interpreter


def test_problems_are_printed_escaped(tmp_path: Path) -> None:
    """A key with a newline cannot forge a line in the problem list."""
    main = _write(
        tmp_path / "state.toml",
        '[[binary]]\npath = "/x"\ncaps = "cap_chown=p"\n"evil\\nfake" = 1\n"\\u202e" = 2\n',
    )
    with pytest.raises(StateError) as info:
        load_state(main, last_cap=40)
    assert info.value.message.split("\n") == [
        "2 problems in the state:",
        "  state.toml: entry 1 (/x): evil\\nfake: unknown key",
        "  state.toml: entry 1 (/x): \\u202e: unknown key",
    ]


# -- the state files get the binaries' trust walk ----------------------------------------

OTHER = 4242  # a uid that is not root (no passwd entry needed)


def test_ancestor_owned_by_another_user_is_refused(tmp_path: Path) -> None:
    """A directory above the state that another user owns could swap the state in."""
    owned = tmp_path / "owned"
    main = _write(owned / "etc" / "state.toml", '[[binary]]\npath = "/x"\ncaps = "cap_chown=p"\n')
    os.chown(owned, OTHER, OTHER)
    assert _problems(main) == [
        f"directory {owned} is owned by uid {OTHER}, not by root: whoever can edit the state "
        f"can grant capabilities (chown root {owned})"
    ]


def test_untrusted_state_file_is_not_read(tmp_path: Path) -> None:
    """A state file whose route or owner is refused is not read at all, so whatever it
    holds (invalid TOML here; in an attack, gigabytes or deep nesting) is never parsed:
    only the trust problems are reported. The same holds for state.d and its drop-ins."""
    owned = tmp_path / "owned"
    main = _write(owned / "state.toml", "[[binary]\n")
    _write(owned / "state.d" / "10-x.toml", "[[binary]\n")
    os.chown(owned, OTHER, OTHER)
    assert _problems(main) == [
        f"directory {owned} is owned by uid {OTHER}, not by root: whoever can edit the state "
        f"can grant capabilities (chown root {owned})"
    ]
    os.chown(owned, 0, 0)
    os.chown(main, OTHER, OTHER)
    os.chmod(owned / "state.d" / "10-x.toml", 0o666)
    assert _problems(main) == [
        f"state.toml: owned by uid {OTHER}: whoever can edit the state can grant capabilities "
        f"(chown root {main})",
        "state.d/10-x.toml: writable by group or others (mode 0666): whoever can edit the "
        f"state can grant capabilities (chmod go-w {owned / 'state.d' / '10-x.toml'})",
    ]


def test_writable_ancestor_is_refused_but_root_sticky_one_is_not(tmp_path: Path) -> None:
    """A group-writable ancestor is refused; a root-owned sticky one (like /tmp) is not."""
    loose = tmp_path / "loose"
    main = _write(loose / "etc" / "state.toml", '[[binary]]\npath = "/x"\ncaps = "cap_chown=p"\n')
    os.chmod(loose, 0o775)
    assert _problems(main) == [
        f"directory {loose} is writable by group (mode 0775): whoever can edit the state can "
        f"grant capabilities (chmod go-w {loose})"
    ]
    os.chmod(loose, 0o1777)
    assert [e.path for e in load_state(main, last_cap=40).entries] == ["/x"]


def test_symlink_owned_by_another_user_is_refused(tmp_path: Path) -> None:
    """A symlink on the way to the state must be root's; a root-owned one is followed."""
    _write(tmp_path / "real" / "state.toml", '[[binary]]\npath = "/x"\ncaps = "cap_chown=p"\n')
    _write(
        tmp_path / "real" / "state.d" / "10-y.toml",
        '[[binary]]\npath = "/y"\ncaps = "cap_kill=p"\n',
    )
    link = tmp_path / "current"
    link.symlink_to("real")
    state = load_state(link / "state.toml", last_cap=40)
    assert [e.path for e in state.entries] == ["/x", "/y"]
    assert state.files == (str(link / "state.toml"), str(link / "state.d" / "10-y.toml"))
    os.lchown(link, OTHER, OTHER)
    assert _problems(link / "state.toml") == [
        f"symlink {link} -> real is owned by uid {OTHER}, not by root: whoever can edit the "
        f"state can grant capabilities (make it root's: chown -h root {link})"
    ]


def test_hard_linked_state_in_sticky_directory_is_refused(tmp_path: Path) -> None:
    """In a sticky world-writable directory a hard link proves nothing about who put it there."""
    sticky = tmp_path / "sticky"
    sticky.mkdir()
    os.chmod(sticky, 0o1777)
    real = _write(tmp_path / "real.toml", '[[binary]]\npath = "/x"\ncaps = "cap_chown=p"\n')
    os.link(real, sticky / "state.toml")
    assert _problems(sticky / "state.toml") == [
        f"{sticky}/state.toml has 2 hard links and sits in world-writable {sticky}, where "
        "anyone could have linked it: whoever can edit the state can grant capabilities "
        "(keep the state in a directory only root can write)"
    ]


def test_dropins_that_are_not_regular_files_are_reported(tmp_path: Path) -> None:
    """A directory, FIFO or dangling symlink named *.toml in state.d is a problem, not skipped."""
    main = _write(tmp_path / "state.toml", "")
    dropin = tmp_path / "state.d"
    (dropin / "a.toml").mkdir(parents=True)
    os.mkfifo(dropin / "b.toml")
    (dropin / "c.toml").symlink_to("gone.toml")
    (dropin / "d.toml").symlink_to("b.toml")
    (dropin / ".#e.toml").symlink_to("root@host.123")  # an editor's lock: hidden, skipped
    assert _problems(main) == [
        "state.d/a.toml: is a directory, not a regular file: not read (remove it, or rename "
        "it without .toml)",
        "state.d/b.toml: is a FIFO, not a regular file: not read (remove it, or rename it "
        "without .toml)",
        "state.d/c.toml: dangling symlink to gone.toml: not read (remove it, or restore its "
        "target)",
        "state.d/d.toml: is a symlink to a FIFO (b.toml), not a regular file: not read "
        "(remove it, or rename it without .toml)",
    ]


def test_symlinked_dropin_is_walked_like_the_main_file(tmp_path: Path) -> None:
    """A drop-in symlinked from elsewhere is read when its own route and file pass."""
    main = _write(tmp_path / "state.toml", "")
    shared = _write(
        tmp_path / "shared" / "web.toml", '[[binary]]\npath = "/w"\ncaps = "cap_kill=p"\n'
    )
    (tmp_path / "state.d").mkdir()
    (tmp_path / "state.d" / "web.toml").symlink_to(shared)
    assert [e.path for e in load_state(main, last_cap=40).entries] == ["/w"]
    os.chown(tmp_path / "shared", OTHER, OTHER)
    assert _problems(main) == [
        f"directory {tmp_path / 'shared'} is owned by uid {OTHER}, not by root: whoever can "
        f"edit the state can grant capabilities (chown root {tmp_path / 'shared'})"
    ]


def test_state_d_that_is_not_a_directory(tmp_path: Path) -> None:
    """A state.d that is a file is reported instead of silently reading no drop-in."""
    main = _write(tmp_path / "state.toml", "")
    _write(tmp_path / "state.d", "")
    assert _problems(main) == [
        "state.d: not a directory: no drop-in is read (remove it, or make it a directory)"
    ]


def test_dangling_state_d_symlink_is_reported(tmp_path: Path) -> None:
    """state.d as a symlink to a directory that is not there (an unmounted file system, a
    removed release) is reported: read as "no drop-ins", every entry they declared would
    silently stop being enforced at the next reload. No state.d at all stays silent."""
    main = _write(tmp_path / "state.toml", '[[binary]]\npath = "/x"\ncaps = "cap_chown=p"\n')
    assert [e.path for e in load_state(main, last_cap=40).entries] == ["/x"]
    missing = tmp_path / "missing" / "state.d"
    (tmp_path / "state.d").symlink_to(missing)
    assert _problems(main) == [
        f"state.d: dangling symlink to {missing}: no drop-in is read (restore its target, or "
        "remove the symlink)"
    ]


def test_main_state_that_is_a_directory(tmp_path: Path) -> None:
    """A directory given as the state is reported as not a regular file."""
    assert _problems(tmp_path) == [
        f"{tmp_path}: not a regular file (create it, or point --state / CAPKEEPER_STATE at "
        "another file)"
    ]


def test_relative_state_path_is_walked_from_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--state state.toml works and names its files as given relative to the working dir."""
    _write(tmp_path / "state.toml", '[[binary]]\npath = "/x"\ncaps = "cap_chown=p"\n')
    monkeypatch.chdir(tmp_path)
    state = load_state(Path("state.toml"), last_cap=40)
    assert [e.path for e in state.entries] == ["/x"]
    assert state.files == (str(tmp_path / "state.toml"),)


def test_dropin_names_are_escaped(tmp_path: Path) -> None:
    """A drop-in whose name holds a newline cannot forge a line in the problem list."""
    main = _write(tmp_path / "state.toml", "")
    _write(tmp_path / "state.d" / "a\nfake: ok.toml", "[[binary]\n")
    (problem,) = _problems(main)
    assert problem.startswith("state.d/a\\nfake: ok.toml: invalid TOML: ")
