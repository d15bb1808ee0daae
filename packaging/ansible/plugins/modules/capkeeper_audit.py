#!/usr/bin/python
# Copyright: capkeeper contributors
# MIT License (see https://opensource.org/licenses/MIT)

from __future__ import annotations

DOCUMENTATION = r"""
module: capkeeper_audit
short_description: Account for every file with capabilities on a host (capkeeper audit)
version_added: 0.1.0
description:
  - Runs C(capkeeper audit --json) on the managed host and returns its findings, that is every
    file that carries file capabilities, classified against capkeeper's state as in sync, drifted,
    refused or unmanaged, each unmanaged file rated V(low), V(medium), V(high) or V(critical)
    with its reasons.
  - Changes nothing. The C(capkeeper.capkeeper.fleet_audit) playbook gathers the results of
    every host into one report on the controller.
options:
  roots:
    description:
      - Directories to walk. Pseudo and network file systems are skipped unless named in
        O(include_fs).
    type: list
    elements: path
    default: [/]
  one_file_system:
    description:
      - Do not cross into other mounts.
    type: bool
    default: false
  include_fs:
    description:
      - Also walk mounts of these file system types, for example V(nfs4).
    type: list
    elements: str
    default: []
  max_rating:
    description:
      - The worst rating accepted; findings rated above it are listed in RV(above_max_rating).
      - V(none) accepts no unmanaged file at all.
    type: str
    choices: [none, low, medium, high, critical]
    default: medium
  state_file:
    description:
      - capkeeper's main state file.
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
    support: none
  platform:
    description: Target OS/families that can be operated against.
    support: full
    platforms: posix
requirements:
  - capkeeper installed on the managed host.
seealso:
  - module: capkeeper.capkeeper.capkeeper_binary
author:
  - capkeeper contributors (@capkeeper)
"""

EXAMPLES = r"""
- name: Audit the host
  capkeeper.capkeeper.capkeeper_audit:
    max_rating: low
  register: audit

- name: Fail on anything rated above low
  ansible.builtin.assert:
    that: audit.above_max_rating | length == 0
"""

RETURN = r"""
unmanaged:
  description: Files with capabilities that the state does not declare.
  returned: always
  type: int
  sample: 1
drifted:
  description: Declared files whose capabilities differ from the state.
  returned: always
  type: int
  sample: 0
refused:
  description: Declared files the trust policy refuses.
  returned: always
  type: int
  sample: 0
in_sync:
  description: Declared files that carry their declared capabilities.
  returned: always
  type: int
  sample: 3
worst_rating:
  description: The highest rating of an unmanaged file, or V(none) when there is none.
  returned: always
  type: str
  sample: high
above_max_rating:
  description: The findings rated above O(max_rating).
  returned: always
  type: list
  elements: dict
  sample: [{"path": "/usr/local/bin/x", "caps": "cap_sys_admin=ep", "rating": "high",
            "reasons": ["cap_sys_admin amounts to root"], "verdict": "unmanaged"}]
findings:
  description: Every finding as C(capkeeper audit --json) prints it (type V(finding)).
  returned: always
  type: list
  elements: dict
exit_status:
  description: The exit status of C(capkeeper audit); 0 clean, 1 findings, 2 walk errors only.
  returned: always
  type: int
  sample: 1
errors:
  description: What the walk could not read (type V(error) records).
  returned: always
  type: list
  elements: dict
summary:
  description: The summary record of C(capkeeper audit --json).
  returned: always
  type: dict
"""

import json

from ansible.module_utils.basic import AnsibleModule

LEVELS = ("none", "low", "medium", "high", "critical")


def main():
    module = AnsibleModule(
        argument_spec={
            "roots": {"type": "list", "elements": "path", "default": ["/"]},
            "one_file_system": {"type": "bool", "default": False},
            "include_fs": {"type": "list", "elements": "str", "default": []},
            "max_rating": {
                "type": "str",
                "choices": ["none", "low", "medium", "high", "critical"],
                "default": "medium",
            },
            "state_file": {"type": "path", "default": "/etc/capkeeper/state.toml"},
            "executable": {"type": "path"},
        },
        supports_check_mode=True,
    )
    params = module.params
    executable = params["executable"] or module.get_bin_path(
        "capkeeper", required=True, opt_dirs=["/usr/bin"]
    )
    argv = [executable, "audit", "--json", "--state", params["state_file"]]
    if params["one_file_system"]:
        argv.append("--one-file-system")
    for fstype in params["include_fs"]:
        argv += ["--include-fs", fstype]
    argv += ["--"] + params["roots"]
    rc, out, err = module.run_command(argv, environ_update={"LC_ALL": "C.UTF-8"})
    records = []
    for line in out.splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    summary = next((r for r in records if r.get("type") == "summary"), None)
    # 0 clean, 1 findings, 2 walk errors only: all three are an audit that ran.
    if rc not in (0, 1, 2) or summary is None:
        module.fail_json(msg=err.strip() or f"capkeeper audit failed (exit status {rc})", rc=rc)
    findings = [r for r in records if r.get("type") == "finding"]
    worst = max((LEVELS.index(f["rating"]) for f in findings if f.get("rating")), default=0)
    limit = LEVELS.index(params["max_rating"])
    module.exit_json(
        changed=False,
        # Not "rc": Ansible fails a result whose rc is not 0, and 1 means findings here.
        exit_status=rc,
        unmanaged=summary.get("unmanaged", 0),
        drifted=summary.get("drifted", 0),
        refused=summary.get("refused", 0),
        in_sync=summary.get("in-sync", 0),
        worst_rating=LEVELS[worst],
        above_max_rating=[
            f for f in findings if f.get("rating") and LEVELS.index(f["rating"]) > limit
        ],
        findings=findings,
        errors=[r for r in records if r.get("type") == "error"],
        summary=summary,
        stderr=err,
    )


if __name__ == "__main__":
    main()
