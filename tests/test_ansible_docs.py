"""The collection's documentation and packaging, checked by the pinned ansible-core itself.

``ansible-doc`` renders the modules' DOCUMENTATION/EXAMPLES/RETURN and the role's
argument specs; its JSON form is compared with the options the modules accept.
``ansible-galaxy collection build`` checks ``galaxy.yml``. (``ansible-test
sanity`` needs network access for its own virtualenvs and runs outside the suite.)
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import tarfile
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
ANSIBLE_BIN = REPO / ".venv-ansible" / "bin"
COLLECTION = REPO / "packaging" / "ansible"
MODULES = ("capkeeper_binary", "capkeeper_audit")


@pytest.fixture(scope="module")
def collections_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A collections root holding this checkout's collection as capkeeper.capkeeper."""
    if not (ANSIBLE_BIN / "ansible-doc").exists():
        pytest.skip(f"needs the pinned ansible-core in {ANSIBLE_BIN.parent} (make ansible)")
    root = tmp_path_factory.mktemp("collections")
    (root / "ansible_collections" / "capkeeper").mkdir(parents=True)
    (root / "ansible_collections" / "capkeeper" / "capkeeper").symlink_to(COLLECTION)
    return root


def _ansible(tool: str, *args: str, root: Path, cwd: Path | None = None) -> str:
    env = {
        **os.environ,
        "ANSIBLE_COLLECTIONS_PATH": str(root),
        "ANSIBLE_NOCOLOR": "1",
        "ANSIBLE_HOME": str(root / ".ansible"),
    }
    result = subprocess.run(
        [str(ANSIBLE_BIN / tool), *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "[ERROR]" not in result.stderr, result.stderr
    return result.stdout


def _argument_spec(module: str) -> dict[str, Any]:
    """The argument_spec literal of a module's AnsibleModule(...) call."""
    tree = ast.parse((COLLECTION / "plugins" / "modules" / f"{module}.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.keyword) and node.arg == "argument_spec":
            spec: dict[str, Any] = ast.literal_eval(node.value)
            return spec
    raise AssertionError(f"no argument_spec in {module}")


def test_ansible_doc_renders_each_module(collections_path: Path) -> None:
    """ansible-doc shows each module's documentation, examples and return values."""
    names = [f"capkeeper.capkeeper.{module}" for module in MODULES]
    text = _ansible("ansible-doc", *names, root=collections_path)
    pages = text.split("> MODULE ")[1:]
    assert [page.split()[0] for page in pages] == names
    for page in pages:
        for heading in ("OPTIONS", "EXAMPLES:", "RETURN VALUES:"):
            assert heading in page


def test_documented_options_match_the_argument_spec(collections_path: Path) -> None:
    """Every option a module accepts is documented with the same type, default and choices."""
    names = [f"capkeeper.capkeeper.{module}" for module in MODULES]
    docs = json.loads(_ansible("ansible-doc", "--json", *names, root=collections_path))
    for module, name in zip(MODULES, names, strict=True):
        data = docs[name]
        documented = data["doc"]["options"]
        spec = _argument_spec(module)
        assert set(documented) == set(spec), module
        for option, rules in spec.items():
            where = f"{module}: {option}"
            assert documented[option]["type"] == rules.get("type", "str"), where
            assert documented[option].get("default") == rules.get("default"), where
            assert documented[option].get("choices") == rules.get("choices"), where
            assert documented[option].get("required", False) == rules.get("required", False)
        assert data["examples"].strip()
        assert data["return"]
        assert data["doc"]["attributes"]["check_mode"]["support"] == "full"


def test_ansible_doc_renders_the_role(collections_path: Path) -> None:
    """The role's argument specs are its documentation."""
    text = _ansible(
        "ansible-doc", "-t", "role", "capkeeper.capkeeper.capkeeper", root=collections_path
    )
    for option in ("capkeeper_package_file", "capkeeper_source_dir", "capkeeper_binaries"):
        assert option in text


def test_collection_builds(collections_path: Path, tmp_path: Path) -> None:
    """ansible-galaxy builds the collection with its modules, role and playbook."""
    _ansible(
        "ansible-galaxy",
        "collection",
        "build",
        str(COLLECTION),
        "--output-path",
        str(tmp_path),
        root=collections_path,
    )
    (archive,) = tmp_path.glob("capkeeper-capkeeper-*.tar.gz")
    with tarfile.open(archive) as tar:
        names = set(tar.getnames())
    assert {
        "MANIFEST.json",
        "meta/runtime.yml",
        "plugins/modules/capkeeper_binary.py",
        "plugins/modules/capkeeper_audit.py",
        "roles/capkeeper/tasks/main.yml",
        "roles/capkeeper/handlers/main.yml",
        "playbooks/fleet_audit.yml",
    } <= names
