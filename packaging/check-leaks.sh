#!/bin/sh
# Fail when a file below TREE contains one of PATHS (the directories a package
# was built in): an installed package must not point back at its build host.
#
# Usage: packaging/check-leaks.sh TREE PATH...
set -eu
tree=${1:?usage: check-leaks.sh TREE PATH...}
shift
for path in "$@"; do
    set -- "$@" -e "$path"
    shift
done
leaks=$(grep -rlF "$@" "$tree" || true)
if [ -n "$leaks" ]; then
    echo "check-leaks.sh: the build directory leaks into the package:" >&2
    echo "$leaks" >&2
    exit 1
fi
