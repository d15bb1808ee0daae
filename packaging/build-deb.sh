#!/bin/sh
# Build capkeeper_VERSION_amd64.deb with dpkg-buildpackage, offline, in a scratch
# copy of the sources (dpkg-buildpackage wants debian/ at the top and writes its
# results next to the source tree), then copy the .deb to OUTDIR.
#
# Usage: packaging/build-deb.sh WHEELHOUSE OUTDIR [BUILDDIR]
#   DEB_VERSION=V   build version V instead of debian/changelog's (tests build
#                   a "previous" package to upgrade from)
set -eu
src=$(cd "$(dirname "$0")/.." && pwd)
wheelhouse=$(cd "${1:?usage: build-deb.sh WHEELHOUSE OUTDIR [BUILDDIR]}" && pwd)
mkdir -p "${2:?}"
out=$(cd "$2" && pwd)
build=${3:-$src/build/deb}
version=${DEB_VERSION:-$(dpkg-parsechangelog -l "$src/packaging/debian/changelog" -SVersion)}
tree=$build/capkeeper-$version
rm -rf "$build"
mkdir -p "$tree"
sh "$src/packaging/copy-sources.sh" "$tree"
cp -R "$src/packaging/debian" "$tree/debian"
if [ -n "${DEB_VERSION:-}" ]; then
    { printf 'capkeeper (%s) unstable; urgency=medium\n\n  * Build of version %s.\n\n' \
          "$version" "$version"
      printf ' -- capkeeper developers <dev@capkeeper.invalid>  %s\n\n' \
          "$(dpkg-parsechangelog -l "$tree/debian/changelog" -SDate)"
      cat "$src/packaging/debian/changelog"; } > "$tree/debian/changelog"
fi
(cd "$tree" && WHEELHOUSE=$wheelhouse dpkg-buildpackage -b -us -uc)
cp "$build/capkeeper_${version}_amd64.deb" "$out/"
echo "built $out/capkeeper_${version}_amd64.deb"
