#!/bin/sh
# Fetch the pinned wheelhouse the package builds install from, offline.
#
# Usage: packaging/wheels.sh WHEELHOUSE   (PIP: the pip command to fetch with)
#
# Every file is checked against packaging/requirements.lock (--require-hashes).
# pyinotify and sdnotify are published only as source: their wheels are built
# here, offline, from the setuptools and wheel just fetched, exactly as the
# package builds later build capkeeper itself. The directory is replaced only
# when everything succeeded; WHEELHOUSE/.complete records the lock it matches.
set -eu
dest=${1:?usage: packaging/wheels.sh WHEELHOUSE}
pip=${PIP:-pip}
here=$(cd "$(dirname "$0")" && pwd)
lock=$here/requirements.lock
# Wheels built here get fixed timestamps (bdist_wheel honours SOURCE_DATE_EPOCH).
SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-315532800}
export SOURCE_DATE_EPOCH
work=$dest.partial
rm -rf "$work"
mkdir -p "$work"
$pip download --quiet --disable-pip-version-check --require-hashes --no-deps \
    --dest "$work" -r "$lock"
sdists=$(find "$work" -maxdepth 1 -name '*.tar.gz' | sort)
if [ -n "$sdists" ]; then
    # shellcheck disable=SC2086 # one argument per sdist
    $pip wheel --quiet --disable-pip-version-check --no-deps --no-index \
        --find-links "$work" --wheel-dir "$work" $sdists
fi
# Every pinned name must now be a wheel (the package builds use --only-binary).
missing=""
for name in $(sed -n 's/^\([A-Za-z0-9._-]*\)==.*/\1/p' "$lock"); do
    norm=$(printf '%s' "$name" | tr 'A-Z.-' 'a-z__')  # as in wheel file names
    ls "$work" | tr 'A-Z' 'a-z' | grep -q "^${norm}-[0-9][^-]*-.*\.whl$" || missing="$missing $name"
done
if [ -n "$missing" ]; then
    echo "wheels.sh: no wheel for:$missing" >&2
    exit 1
fi
cp "$lock" "$work/.complete"
rm -rf "$dest"
mv "$work" "$dest"
echo "wheelhouse ready: $dest ($(ls "$dest" | wc -l) files)"
