#!/usr/bin/python
# Copyright: capkeeper contributors
# MIT License (see https://opensource.org/licenses/MIT)

from __future__ import annotations

DOCUMENTATION = r"""
module: capkeeper_binary
short_description: Declare the file capabilities capkeeper keeps on one binary
version_added: 0.1.0
description:
  - Declares one binary for capkeeper as a C([[binary]]) table in a file of its own in the
    C(state.d/) directory beside capkeeper's main state file (C(/etc/capkeeper/state.d/) by
    default). The file name is derived from O(path), so each binary has exactly one
    declaration file and re-running the task is idempotent.
  - Before anything is written, the would-be state (the host's state with this declaration
    added, replaced or removed) is checked by C(capkeeper validate) in a private root-owned
    copy. An invalid declaration (an unknown capability, a path already declared elsewhere,
    a file the trust policy refuses) fails the task with capkeeper's message and leaves the
    host's state as it was. A valid one is moved into place atomically.
  - Then C(capkeeper apply) runs for O(path) at once, so the result says whether the
    capabilities had to be restored (RV(status)). A binary that does not exist yet is not an
    error; capkeeper applies its capabilities when it appears.
  - Unlike M(community.general.capabilities), which sets capabilities once, the declaration is
    enforced from then on by the capkeeper daemon, which puts the capabilities back after every
    deploy. The daemon reads new declarations on C(systemctl reload capkeeper); the
    P(capkeeper.capkeeper.capkeeper#role) role does that in a handler.
  - With O(state=absent) the declaration file is removed. capkeeper never changes a file it
    was not asked about, so the binary keeps the capabilities it carries; remove them with
    C(setcap -r) if it must lose them.
options:
  path:
    description:
      - Absolute path of the binary.
    type: path
    required: true
  caps:
    description:
      - The capabilities, in libcap text form exactly as C(setcap) takes it, for example
        V(cap_net_bind_service=ep).
      - Required when O(state=present).
    type: str
  sha256:
    description:
      - Grant the capabilities only to this content (hex SHA-256 of the file).
    type: str
  owner:
    description:
      - Owner the binary must have, a user name or uid. capkeeper's default is V(root).
      - A non-root owner can rewrite the binary without losing its capabilities.
    type: str
  allow_inheritable:
    description:
      - Allow inheritable capabilities in O(caps).
    type: bool
    default: false
  allow_interpreter:
    description:
      - Allow capabilities on an interpreter (python, node, bash, ...). Every script it runs
        gets them.
    type: bool
    default: false
  state:
    description:
      - Whether the binary is declared.
    type: str
    choices: [present, absent]
    default: present
  state_file:
    description:
      - capkeeper's main state file; the declaration goes to C(state.d/) beside it.
    type: path
    default: /etc/capkeeper/state.toml
  executable:
    description:
      - The capkeeper command. By default it is looked up on E(PATH) and in C(/usr/bin).
    type: path
attributes:
  check_mode:
    description:
      - Can run in check_mode and return changed status prediction without modifying target.
    support: full
  diff_mode:
    description:
      - Will return details on what has changed (or possibly needs changing in check_mode).
    support: full
  platform:
    description: Target OS/families that can be operated against.
    support: full
    platforms: posix
notes:
  - In check mode the candidate state is validated and C(capkeeper check) tells whether the
    capabilities would be restored; nothing on the host changes.
  - The temporary copy used for validation is a root-owned mode 0700 directory beside the main
    state file, so it passes capkeeper's ownership rules for state files; it is removed again.
requirements:
  - capkeeper installed on the managed host (for example with the
    P(capkeeper.capkeeper.capkeeper#role) role).
seealso:
  - module: community.general.capabilities
  - module: capkeeper.capkeeper.capkeeper_audit
author:
  - capkeeper contributors (@capkeeper)
"""

EXAMPLES = r"""
- name: Let the web server bind port 443 without root, and keep it that way across deploys
  capkeeper.capkeeper.capkeeper_binary:
    path: /usr/local/bin/web
    caps: cap_net_bind_service=ep
  notify: Reload capkeeper

- name: Grant only to one build
  capkeeper.capkeeper.capkeeper_binary:
    path: /opt/probe/bin/probe
    caps: cap_net_raw,cap_net_admin=ep
    sha256: 9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08

- name: Stop managing a binary (it keeps its current capabilities)
  capkeeper.capkeeper.capkeeper_binary:
    path: /usr/local/bin/old-tool
    state: absent
"""

RETURN = r"""
declaration:
  description: The declaration file in C(state.d/).
  returned: always
  type: str
  sample: /etc/capkeeper/state.d/ansible-usr_local_bin_web-5d41402abc.toml
status:
  description:
    - capkeeper's verdict on the binary after the task (C(capkeeper apply)), or what it would be
      in check mode (C(capkeeper check)).
    - V(in-sync) it carries the declared set; V(restored) it did not and now does; V(drift) (check
      mode) it would be restored; V(missing) the file does not exist yet; V(refused) the trust
      policy refuses it; V(failed) the write failed.
  returned: when O(state=present)
  type: str
  sample: restored
restored:
  description: Whether the capabilities were (in check mode, would be) re-applied to the binary.
  returned: when O(state=present)
  type: bool
  sample: true
found:
  description: The capabilities the binary carried before the task, as C(getcap) prints them.
  returned: when O(state=present) and capkeeper reported them
  type: str
  sample: none
expected:
  description: The declared capabilities, normalised by capkeeper.
  returned: when O(state=present) and capkeeper reported them
  type: str
  sample: cap_net_bind_service=ep
declaration_changed:
  description: Whether the declaration file was (in check mode, would be) written or removed.
  returned: always
  type: bool
  sample: true
"""

import json
import os
import re
import shutil
import tempfile
from hashlib import sha256 as _sha256

from ansible.module_utils.basic import AnsibleModule

HEADER = (
    "# Managed by Ansible (capkeeper.capkeeper.capkeeper_binary): local edits are overwritten.\n"
)
JOURNAL_SOCKET = "/run/systemd/journal/socket"
EX_CONFIG = 78


def declaration_name(path):
    """A stable file name for the declaration of ``path``: readable, and unique by its hash."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", path.strip("/"))[:64].strip("._-") or "root"
    digest = _sha256(path.encode("utf-8", "surrogateescape")).hexdigest()[:10]
    return f"ansible-{slug}-{digest}.toml"


def toml_string(value):
    """A TOML basic string: quotes, backslashes and control characters escaped."""
    out = []
    for char in value:
        if char in '"\\':
            out.append("\\" + char)
        elif char in "\b\t\n\f\r":
            out.append({"\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r"}[char])
        elif ord(char) < 0x20 or ord(char) == 0x7F:
            out.append(f"\\u{ord(char):04x}")
        else:
            out.append(char)
    return '"{}"'.format("".join(out))


def render(params):
    """The declaration file's text."""
    lines = [HEADER, "[[binary]]\n"]
    lines.append("path = {}\n".format(toml_string(params["path"])))
    lines.append("caps = {}\n".format(toml_string(params["caps"])))
    for key in ("sha256", "owner"):
        if params[key] is not None:
            lines.append(f"{key} = {toml_string(params[key])}\n")
    for key in ("allow_inheritable", "allow_interpreter"):
        if params[key]:
            lines.append(f"{key} = true\n")
    return "".join(lines)


def read_text(path):
    try:
        with open(path, "rb") as handle:
            return handle.read().decode("utf-8", "surrogateescape")
    except FileNotFoundError:
        return None


def write_atomically(directory, name, text):
    """Replace ``directory/name`` with ``text``: a temporary file, fsync, rename, fsync."""
    # The temporary name does not end in .toml: capkeeper only reads state.d/*.toml.
    fd, temp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=directory)
    try:
        os.fchmod(fd, 0o644)
        with os.fdopen(fd, "wb") as handle:
            handle.write(text.encode("utf-8", "surrogateescape"))
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, os.path.join(directory, name))
    except BaseException:
        if os.path.exists(temp):
            os.unlink(temp)
        raise
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


class Capkeeper:
    """The capkeeper command on the managed host."""

    def __init__(self, module, executable):
        self.module = module
        self.executable = executable

    def run(self, *args):
        argv = [self.executable]
        if os.path.exists(JOURNAL_SOCKET):
            # Restores made by Ansible reach the journal with their MESSAGE_ID, like the daemon's.
            argv += ["--log-format", "journal"]
        return self.module.run_command(argv + list(args), environ_update={"LC_ALL": "C.UTF-8"})

    def verdict(self, command, state_file, path):
        """``capkeeper apply|check --json PATH``: (exit status, record for PATH or None, stderr)."""
        rc, out, err = self.run(command, "--state", state_file, "--json", path)
        record = None
        for line in out.splitlines():
            try:
                data = json.loads(line)
            except ValueError:
                continue
            if isinstance(data, dict) and data.get("path") == path:
                record = data
        return rc, record, err.strip()


class Candidate:
    """A private copy of the host's state with one declaration file replaced or removed.

    The copy lives in a root-owned mode 0700 directory beside the main state file: capkeeper
    refuses state reached through directories others can write, and the host's own state
    directory already passes that rule.
    """

    def __init__(self, state_file, name, text):
        self.state_file = state_file
        self.name = name
        self.text = text
        self.directory = None

    def __enter__(self):
        parent = os.path.dirname(self.state_file)
        self.directory = tempfile.mkdtemp(prefix=".ansible-candidate-", dir=parent)
        try:
            main = os.path.join(self.directory, os.path.basename(self.state_file))
            shutil.copyfile(self.state_file, main)
            os.chmod(main, 0o644)
            dropin = os.path.join(self.directory, "state.d")
            os.mkdir(dropin, 0o755)
            source = os.path.join(parent, "state.d")
            names = sorted(os.listdir(source)) if os.path.isdir(source) else []
            for other in names:
                path = os.path.join(source, other)
                if other != self.name and other.endswith(".toml") and os.path.isfile(path):
                    shutil.copyfile(path, os.path.join(dropin, other))
                    os.chmod(os.path.join(dropin, other), 0o644)
            if self.text is not None:
                with open(os.path.join(dropin, self.name), "w") as handle:
                    handle.write(self.text)
                os.chmod(os.path.join(dropin, self.name), 0o644)
            self.main = main
        except BaseException:
            shutil.rmtree(self.directory, ignore_errors=True)
            raise
        return self

    def __exit__(self, *exc_info):
        shutil.rmtree(self.directory, ignore_errors=True)
        return False


def validate(module, capkeeper, candidate, path, result):
    """Fail the task when capkeeper rejects the candidate state or refuses this binary."""
    rc, out, err = capkeeper.run("validate", "--state", candidate.main, "--json")
    if rc == 0:
        return
    if rc == EX_CONFIG:
        module.fail_json(msg=err or "capkeeper rejected the state (exit status 78)", **result)
    ours = f"state.d/{candidate.name}:"
    problems = []
    for line in out.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if not isinstance(record, dict) or record.get("kind") != "problem":
            continue
        where = str(record.get("entry", ""))
        text = "{}: {}".format(where, record.get("message", ""))
        if where.startswith(ours) or where.endswith(f"({path})"):
            problems.append(text)
        else:
            module.warn(f"capkeeper validate: {text}")
    if problems:
        module.fail_json(msg="capkeeper refuses {}: {}".format(path, "; ".join(problems)), **result)
    if rc not in (0, 2):
        module.fail_json(msg=err or f"capkeeper validate failed (exit status {rc})", **result)


def report(record, result):
    if record is None:
        return
    result["status"] = record.get("status")
    result["restored"] = record.get("status") in ("restored", "drift")
    for key in ("found", "expected"):
        if key in record:
            result[key] = record[key]


def main():
    module = AnsibleModule(
        argument_spec={
            "path": {"type": "path", "required": True},
            "caps": {"type": "str"},
            "sha256": {"type": "str"},
            "owner": {"type": "str"},
            "allow_inheritable": {"type": "bool", "default": False},
            "allow_interpreter": {"type": "bool", "default": False},
            "state": {"type": "str", "choices": ["present", "absent"], "default": "present"},
            "state_file": {"type": "path", "default": "/etc/capkeeper/state.toml"},
            "executable": {"type": "path"},
        },
        required_if=[("state", "present", ("caps",))],
        supports_check_mode=True,
    )
    params = module.params
    path = params["path"]
    state_file = params["state_file"]
    name = declaration_name(path)
    dropin = os.path.join(os.path.dirname(state_file), "state.d")
    target = os.path.join(dropin, name)
    result = {"changed": False, "declaration": target, "declaration_changed": False}

    if not os.path.isfile(state_file):
        module.fail_json(
            msg=f"capkeeper's state file {state_file} does not exist: install capkeeper first "
            "(the capkeeper.capkeeper.capkeeper role does)",
            **result,
        )
    executable = params["executable"] or module.get_bin_path(
        "capkeeper", required=True, opt_dirs=["/usr/bin"]
    )
    capkeeper = Capkeeper(module, executable)
    current = read_text(target)
    wanted = render(params) if params["state"] == "present" else None
    result["declaration_changed"] = current != wanted
    if module._diff and current != wanted:
        result["diff"] = {
            "before_header": target,
            "after_header": target,
            "before": current or "",
            "after": wanted or "",
        }

    if params["state"] == "absent":
        if current is not None:
            result["changed"] = True
            if not module.check_mode:
                os.unlink(target)
        module.exit_json(**result)

    if current != wanted or module.check_mode:
        with Candidate(state_file, name, wanted) as candidate:
            validate(module, capkeeper, candidate, path, result)
            if module.check_mode:
                rc, record, err = capkeeper.verdict("check", candidate.main, path)
                if record is None:
                    module.fail_json(
                        msg=err or f"capkeeper check failed (exit status {rc})", **result
                    )
                report(record, result)
                result["changed"] = result["declaration_changed"] or result["restored"]
                module.exit_json(**result)
        if not os.path.isdir(dropin):
            os.mkdir(dropin, 0o755)
        write_atomically(dropin, name, wanted)

    rc, record, err = capkeeper.verdict("apply", state_file, path)
    if record is None:
        module.fail_json(msg=err or f"capkeeper apply failed (exit status {rc})", **result)
    report(record, result)
    result["changed"] = result["declaration_changed"] or result["restored"]
    if record.get("status") in ("refused", "failed"):
        module.fail_json(
            msg="capkeeper could not apply {}: {}".format(
                path, record.get("reason", record["status"])
            ),
            **result,
        )
    module.exit_json(**result)


if __name__ == "__main__":
    main()
