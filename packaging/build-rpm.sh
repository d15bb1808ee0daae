#!/bin/sh
# Build capkeeper-VERSION-1.x86_64.rpm with rpmbuild, offline, from the same
# wheelhouse and sources as the .deb, then copy it to OUTDIR. Debian's rpm
# provides rpmbuild; packaging/rpm/macros.capkeeper the systemd and sysusers
# macros it lacks. --nodeps: the build host's dpkg-installed tools are not in
# an rpm database.
#
# Usage: packaging/build-rpm.sh WHEELHOUSE OUTDIR [BUILDDIR]
set -eu
src=$(cd "$(dirname "$0")/.." && pwd)
wheelhouse=$(cd "${1:?usage: build-rpm.sh WHEELHOUSE OUTDIR [BUILDDIR]}" && pwd)
mkdir -p "${2:?}"
out=$(cd "$2" && pwd)
build=${3:-$src/build/rpm}
spec=$src/packaging/rpm/capkeeper.spec
version=$(sed -n 's/^Version:[[:space:]]*//p' "$spec")
release=$(sed -n 's/^Release:[[:space:]]*//p' "$spec")
rm -rf "$build"
mkdir -p "$build/SOURCES" "$build/tree/capkeeper-$version"
sh "$src/packaging/copy-sources.sh" "$build/tree/capkeeper-$version"
tar -C "$build/tree" --sort=name --owner=0 --group=0 --mtime=@0 \
    -czf "$build/SOURCES/capkeeper-$version.tar.gz" "capkeeper-$version"
rpmbuild -bb --nodeps --quiet \
    --load="$src/packaging/rpm/macros.capkeeper" \
    --define "_topdir $build" \
    --define "packager capkeeper developers <dev@capkeeper.invalid>" \
    --define "_capkeeper_rpmdir $src/packaging/rpm" \
    --define "wheelhouse $wheelhouse" \
    "$spec"
cp "$build/RPMS/x86_64/capkeeper-$version-$release.x86_64.rpm" "$out/"
echo "built $out/capkeeper-$version-$release.x86_64.rpm"
