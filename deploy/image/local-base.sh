#!/usr/bin/env bash
# A Debian base image made from Debian packages, for machines that cannot pull one
# (no registry access, no Docker engine): mmdebstrap builds a minimal bookworm rootfs
# with Python, buildah imports it as an image. Prints the image name for `BASE=`.
#
# The tarball is cached in $PUDU_IMAGE_CACHE (default /var/cache/pudu-image), keyed by
# suite, package list and ISO week, so CI reruns reuse it and a week later it picks up
# Debian's security updates. A second run with the image present does nothing.
set -euo pipefail

SUITE=${SUITE:-bookworm}
PACKAGES=${PACKAGES:-python3,python3-venv,ca-certificates}
CACHE=${PUDU_IMAGE_CACHE:-/var/cache/pudu-image}

# Debian's own slim images leave out manuals, translations and docs (copyrights kept).
TRIM=(--dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/locale/*'
      --dpkgopt='path-include=/usr/share/locale/locale.alias'
      --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-include=/usr/share/doc/*/copyright')

key=$(printf '%s %s %s %s' "$SUITE" "$PACKAGES" "${TRIM[*]}" "$(date -u +%G-W%V)" | sha256sum | cut -c1-12)
tarball="$CACHE/base-$SUITE-$key.tar"
image="localhost/pudu-base:$SUITE-$key"

log() { echo "local-base: $*" >&2; }

if buildah inspect --type image "$image" >/dev/null 2>&1; then
  echo "$image"
  exit 0
fi

mkdir -p "$CACHE"
if [ ! -s "$tarball" ]; then
  log "building $tarball with mmdebstrap (about a minute)"
  # minbase: essential packages only (no apt recommends, no compiler); the mirror is
  # whatever apt on this machine uses.
  mmdebstrap --variant=minbase --include="$PACKAGES" "${TRIM[@]}" \
    --customize-hook='rm -rf "$1"/var/cache/apt/* "$1"/var/lib/apt/lists/*' \
    "$SUITE" "${tarball%.tar}.partial.tar" >&2
  mv "${tarball%.tar}.partial.tar" "$tarball"
  # keep only this key's tarball
  find "$CACHE" -maxdepth 1 -name "base-$SUITE-*.tar" ! -name "$(basename "$tarball")" -delete
fi

log "importing $tarball as $image"
ctr=$(buildah from scratch)
mnt=$(buildah mount "$ctr")
tar -C "$mnt" -xf "$tarball"
buildah umount "$ctr" >/dev/null
buildah config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
  --env LANG=C.UTF-8 --cmd /bin/bash "$ctr"
buildah commit --quiet "$ctr" "$image" >/dev/null
buildah rm "$ctr" >/dev/null
# older bases of this suite (last week's) go, unless a container still uses them
for old in $(buildah images --format '{{.Name}}:{{.Tag}}' | grep "^localhost/pudu-base:$SUITE-" | grep -vx "$image"); do
  buildah rmi "$old" >/dev/null 2>&1 || true
done
echo "$image"
