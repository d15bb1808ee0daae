#!/bin/sh
# Copy what the package builds need from this checkout to DEST (build-deb.sh,
# build-rpm.sh): the package source, units, man pages and install scripts.
set -eu
dest=${1:?usage: copy-sources.sh DEST}
src=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$dest"
(cd "$src" && tar -c --exclude=__pycache__ capkeeper pyproject.toml README.md CHANGELOG.md \
    systemd man packaging/install-tree.sh packaging/check-leaks.sh packaging/libexec \
    packaging/state.toml) | tar -x -C "$dest"
