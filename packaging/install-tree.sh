#!/bin/sh
# Install capkeeper into DESTDIR the way both packages ship it (debian/rules and
# the rpm spec call this; one rule in one place):
#   /usr/lib/capkeeper          a virtualenv on the system python3.11, built
#                               offline from the pinned WHEELHOUSE
#   /usr/bin/capkeeper          runs it in isolated mode (-I)
#   UNITDIR/                    capkeeper.service, capkeeper-dropin.{path,service}
#   UNITDIR/../system-preset/   50-capkeeper.preset (enable both)
#   /usr/lib/sysusers.d/capkeeper.conf, /usr/lib/systemd/catalog/capkeeper.catalog
#   /usr/libexec/capkeeper/     the package-trigger and drop-in helpers
#   /etc/capkeeper/state.toml   commented examples; /etc/capkeeper/state.d/
#   /usr/share/man/man8/capkeeper.8, man5/capkeeper-state.5
#
# Usage: packaging/install-tree.sh DESTDIR WHEELHOUSE UNITDIR
#
# The venv must not remember where it was built: shebangs are rewritten to the
# installed path, pyvenv.cfg loses its "command =" line, direct_url.json and
# byte code (compiled by the maintainer scripts instead) are not shipped, and
# the build fails if the build directory's path is still found in any file.
set -eu
mkdir -p "${1:?usage: install-tree.sh DESTDIR WHEELHOUSE UNITDIR}"
destdir=$(cd "$1" && pwd)
wheelhouse=$(cd "${2:?}" && pwd)
unitdir=${3:?}
src=$(cd "$(dirname "$0")/.." && pwd)
python=/usr/bin/python3.11
venv=/usr/lib/capkeeper
target=$destdir$venv
umask 022
export PYTHONDONTWRITEBYTECODE=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1
# Use the pinned pip from the wheelhouse (python can run pip from its wheel):
# no python3-pip, no network, no pip configuration of the build host.
export PIP_CONFIG_FILE=/dev/null
unset PIP_FIND_LINKS PIP_INDEX_URL PIP_EXTRA_INDEX_URL PIP_CONSTRAINT PIP_REQUIREMENT 2>/dev/null || true
set -- "$wheelhouse"/pip-*.whl
[ $# -eq 1 ] && [ -f "$1" ] || { echo "install-tree.sh: want one pip wheel in $wheelhouse" >&2; exit 1; }
pip="$python $1/pip"
offline="--no-index --find-links $wheelhouse"

# capkeeper's own wheel, from this source tree (setuptools and wheel come from
# the wheelhouse through pip's build isolation).
work=$(mktemp -d "${TMPDIR:-/tmp}/capkeeper-build.XXXXXX")
trap 'rm -rf "$work"' EXIT
cp -R "$src/capkeeper" "$src/pyproject.toml" "$src/README.md" "$work/"
rm -rf "$work/capkeeper/__pycache__"
$pip wheel --quiet $offline --no-deps --wheel-dir "$work/dist" "$work"

rm -rf "$target"
$python -m venv --without-pip "$target"
$pip --python "$target/bin/python" install --quiet $offline --only-binary=:all: \
    --no-compile --no-warn-script-location "$work"/dist/capkeeper-*.whl

# Forget the build directory.
rm -f "$target"/bin/activate "$target"/bin/activate.csh "$target"/bin/activate.fish \
    "$target"/bin/Activate.ps1
for f in "$target"/bin/*; do
    # Regular files only: bin/python* are symlinks to the system interpreter.
    if [ -f "$f" ] && [ ! -L "$f" ]; then
        sed -i "s|$target/|$venv/|g" "$f"
    fi
done
sed -i '/^command = /d' "$target/pyvenv.cfg"
# Relative, as Debian policy wants (dh_link would do it for the .deb only).
ln -sfn ../../../bin/python3.11 "$target/bin/python3.11"
rm -f "$target"/lib/python3.11/site-packages/*.dist-info/direct_url.json
# A build path too long for a shebang makes pip write a /bin/sh trampoline
# (#!/bin/sh, then an exec line, then a quote line) instead: give those scripts
# a plain shebang too.
# RECORD: drop direct_url.json, and give the rewritten scripts their new hash
# and size (the old ones were of the build path; two builds must not differ).
$python - "$target/lib/python3.11/site-packages" "$venv" <<'EOF2'
import base64, hashlib, pathlib, sys

site = pathlib.Path(sys.argv[1])
quotes = b"'" * 3
for script in (site.parents[2] / "bin").iterdir():
    if script.is_file() and not script.is_symlink():
        data = script.read_bytes()
        if data.startswith(b"#!/bin/sh\n" + quotes + b"exec' "):
            body = data.split(b"\n' " + quotes + b"\n", 1)[1]
            script.write_bytes(f"#!{sys.argv[2]}/bin/python\n".encode() + body)
for record in site.glob("*.dist-info/RECORD"):
    lines = []
    for line in record.read_text().splitlines():
        path = line.split(",")[0]
        if path.endswith("/direct_url.json"):
            continue
        if path.startswith("../../../bin/"):
            data = (site / path).read_bytes()
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=")
            line = f"{path},sha256={digest.decode()},{len(data)}"
        lines.append(line)
    record.write_text("".join(f"{line}\n" for line in lines))
EOF2
find "$target" -name __pycache__ -type d -prune -exec rm -rf {} +
# Same permissions whatever the build host's umask did to unpacked files.
chmod -R u+rwX,go+rX,go-w "$target"

# The command, as packaging/install.sh writes it (see there why -I).
install -d "$destdir/usr/bin"
cat > "$destdir/usr/bin/capkeeper" <<EOF2
#!/bin/sh
exec "$venv/bin/python" -I -m capkeeper "\$@"
EOF2
chmod 0755 "$destdir/usr/bin/capkeeper"

install -D -m 0644 -t "$destdir$unitdir" "$src/systemd/capkeeper.service" \
    "$src/systemd/capkeeper-dropin.path" "$src/systemd/capkeeper-dropin.service"
install -D -m 0644 "$src/systemd/50-capkeeper.preset" \
    "$destdir$(dirname "$unitdir")/system-preset/50-capkeeper.preset"
install -D -m 0644 "$src/systemd/capkeeper.sysusers" "$destdir/usr/lib/sysusers.d/capkeeper.conf"
install -D -m 0644 "$src/systemd/capkeeper.catalog" \
    "$destdir/usr/lib/systemd/catalog/capkeeper.catalog"
install -D -m 0755 -t "$destdir/usr/libexec/capkeeper" "$src/packaging/libexec/reapply" \
    "$src/packaging/libexec/dropin-sync"
install -D -m 0644 "$src/packaging/state.toml" "$destdir/etc/capkeeper/state.toml"
install -d -m 0755 "$destdir/etc/capkeeper/state.d"
install -D -m 0644 "$src/man/capkeeper.8" "$destdir/usr/share/man/man8/capkeeper.8"
install -D -m 0644 "$src/man/capkeeper-state.5" "$destdir/usr/share/man/man5/capkeeper-state.5"

# Nothing may point back at the build: it would not exist on the target host.
sh "$src/packaging/check-leaks.sh" "$destdir" "$destdir" "$src" "$wheelhouse" "$work"
