#!/bin/sh
# Install capkeeper system-wide the way a package would:
#   /usr/lib/capkeeper/         a virtualenv holding capkeeper and its dependencies
#   /usr/bin/capkeeper          the command
#   /usr/lib/systemd/system/capkeeper.service
#   /usr/lib/sysusers.d/capkeeper.conf, then systemd-sysusers
#   /usr/lib/systemd/catalog/capkeeper.catalog, then journalctl --update-catalog
#   /etc/capkeeper/state.toml   (an empty state, only if none exists)
#
# Usage: packaging/install.sh [--venv EXISTING_VENV]
#   --venv  reuse an existing virtualenv that already has capkeeper installed
#           (the tests do this inside a throwaway systemd) instead of building one.
set -eu
umask 022  # root runs this venv (ExecStartPre=+): nobody else may be able to write it
src=$(cd "$(dirname "$0")/.." && pwd)
venv=""
while [ $# -gt 0 ]; do
    case "$1" in
        --venv) venv=$2; shift 2 ;;
        *) echo "usage: $0 [--venv VENV]" >&2; exit 64 ;;
    esac
done
if [ "$(id -u)" != 0 ]; then
    echo "install.sh: run as root" >&2
    exit 1
fi
if [ -z "$venv" ]; then
    venv=/usr/lib/capkeeper
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet "$src"
fi
if ! "$venv/bin/python" -I -c 'import capkeeper' 2>/dev/null; then
    echo "install.sh: $venv/bin/python cannot import capkeeper" >&2
    exit 1
fi
# -I (isolated mode): ignore PYTHON* variables and do not put the working
# directory on sys.path. 'ExecStartPre=+capkeeper apply' runs as root with the
# consuming unit's Environment= and WorkingDirectory=, which its unprivileged
# user may control: without -I, a capkeeper/ package (or a pydantic.py) in
# that directory, or on a PYTHONPATH set there, would run as root.
cat > /usr/bin/capkeeper.new <<EOF2
#!/bin/sh
exec "$venv/bin/python" -I -m capkeeper "\$@"
EOF2
chmod 0755 /usr/bin/capkeeper.new
mv -f /usr/bin/capkeeper.new /usr/bin/capkeeper
install -D -m 0644 "$src/systemd/capkeeper.service" /usr/lib/systemd/system/capkeeper.service
install -D -m 0644 "$src/systemd/capkeeper.sysusers" /usr/lib/sysusers.d/capkeeper.conf
install -D -m 0644 "$src/systemd/capkeeper.catalog" /usr/lib/systemd/catalog/capkeeper.catalog
install -d -m 0755 /etc/capkeeper /etc/capkeeper/state.d
if [ ! -e /etc/capkeeper/state.toml ]; then
    printf '# Declared binaries: one [[binary]] table each (see capkeeper README).\n' \
        > /etc/capkeeper/state.toml
fi
systemd-sysusers /usr/lib/sysusers.d/capkeeper.conf
journalctl --update-catalog
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload
fi
echo "capkeeper installed; declare binaries in /etc/capkeeper/state.toml, then:"
echo "  capkeeper systemd-dropin && systemctl daemon-reload && systemctl enable --now capkeeper"
