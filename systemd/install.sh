#!/usr/bin/env bash
# Install (or uninstall) the Pudu fleet bridge as systemd services: `make install`.
#
#   install.sh install   [DESTDIR=...] [WHEELHOUSE=dir] [PYTHON=python3]
#   install.sh uninstall [DESTDIR=...]          stops and disables the units (live root);
#                                               keeps /etc/* config and /var/lib/* data
#   install.sh wheelhouse WHEELHOUSE=dir [PLATFORM=manylinux2014_aarch64 PYVER=3.11]
#   install.sh replica-unit                     prints callback-server@.service
#
# Idempotent: a second install changes no file's content or mode (pip's byte-code caches
# aside). Config files under /etc are written only when absent, never overwritten.
# With an empty DESTDIR and root on a systemd host, sysusers/tmpfiles are applied and
# systemd reloaded; with a DESTDIR everything lands under it and nothing is applied.
set -euo pipefail

ACTION=${1:-install}
HERE=$(cd "$(dirname "$0")/.." && pwd)
DESTDIR=${DESTDIR:-}
PREFIX=/opt/pudu-fleet-bridge
PYTHON=${PYTHON:-python3}
WHEELHOUSE=${WHEELHOUSE:-}
# Optional parts installed with the program: awsiot (awscrt, for MQTT_BACKEND=awsiot).
# EXTRAS= (empty) for a paho-only gateway, e.g. 32-bit ARM, where awscrt has no wheel.
EXTRAS=${EXTRAS-awsiot}
# Every dependency at the version the suite last passed with (constraints.txt; `make lock`
# re-pins). CONSTRAINTS= (empty) takes the newest pyproject.toml allows.
CONSTRAINTS=${CONSTRAINTS-$HERE/constraints.txt}
PIN=(${CONSTRAINTS:+-c "$CONSTRAINTS"})
# Vendor units where systemd looks for the administrator's installs, below /etc: edits
# (`systemctl edit`: drop-ins in /etc/systemd/system/NAME.service.d/) survive a re-install.
UNITDIR=/usr/local/lib/systemd/system
OLD_UNITDIR=/etc/systemd/system  # where installs before issue 26 put them
SYSUSERS=/usr/lib/sysusers.d/pudu-fleet-bridge.conf
TMPFILES=/usr/lib/tmpfiles.d/pudu-fleet-bridge.conf
SERVICES=(edge-agent callback-server)
REPLICA=callback-server@  # the template: callback-server@1, @2... share the HTTP port

log() { echo "install: $*" >&2; }

# Write $2 to $1 with mode $3, only if its content or mode differs (keeps a re-run a no-op).
put() {
  local dest=$1 src=$2 mode=$3
  if [ -f "$dest" ] && cmp -s "$src" "$dest" && [ "$(stat -c %a "$dest")" = "${mode#0}" ]; then
    return 0
  fi
  install -D -m "$mode" "$src" "$dest"
  log "wrote $dest"
}

# The callback server's unit as a template of replicas on one host (one per core: a
# replica is one Python process), made from the unit itself so the two cannot drift.
# CALLBACK_REPLICA=%i shares the port and suffixes the MQTT client id; the replicas and
# the single unit conflict, as they would on the port.
replica_unit() {
  sed -e 's#^Description=.*#&, replica %i#' \
      -e '/^After=/a Conflicts=callback-server.service' \
      -e '/^EnvironmentFile=/a Environment=CALLBACK_REPLICA=%i' \
      "$HERE/systemd/callback-server.service"
}

# The template's instances with an enable link (systemctl enable callback-server@2).
enabled_replicas() {
  local link
  for link in "$DESTDIR"/etc/systemd/system/*.wants/"$REPLICA"*.service; do
    if [ -L "$link" ]; then basename "$link"; fi
  done | sort -u
}

dir() {  # dir PATH MODE
  install -d -m "$2" "$1"
  chmod "$2" "$1"
}

# pip resolving the program's dependencies (its arguments), quiet unless it fails; then
# its errors from the first on, with the reason of a conflict that --quiet would hide.
resolve() {
  local out said
  if out=$("$@" 2>&1); then return 0; fi
  said=$(printf '%s\n' "$out" | sed -n '/^ERROR/,$p')
  printf '%s\n' "${said:-$(printf '%s\n' "$out" | tail -n 20)}" >&2
  if [ -n "$CONSTRAINTS" ]; then
    log "the versions pinned in $CONSTRAINTS could not be installed as asked (make lock" \
        "re-pins; CONSTRAINTS= takes the newest pyproject.toml allows)"
  fi
  return 1
}

build_wheel() {  # the project's own wheel, reproducible (zip times from SOURCE_DATE_EPOCH)
  local out=$1
  mkdir -p "$out"
  rm -rf "$HERE/build"  # setuptools never empties it: a file removed from the tree would ship
  SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-1700000000} \
    "$PYTHON" -m pip wheel --quiet --disable-pip-version-check --no-deps -w "$out" "$HERE" >/dev/null
}

wheel_digest() {  # content of a wheel's files, not of the zip (whose metadata may vary)
  "$PYTHON" - "$1" <<'PY'
import hashlib, sys, zipfile
z = zipfile.ZipFile(sys.argv[1])
h = hashlib.sha256()
for name in sorted(z.namelist()):
    if name.endswith("RECORD"):
        continue
    h.update(name.encode() + b"\0" + z.read(name))
print(h.hexdigest())
PY
}

# One line naming what is missing, before anything is written (a venv made without
# python3-venv is half-made and breaks every later run).
prerequisites() {
  local missing=()
  command -v "$PYTHON" >/dev/null 2>&1 || missing+=("$PYTHON (python3)")
  if command -v "$PYTHON" >/dev/null 2>&1; then
    "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null \
      || missing+=("Python 3.11 or newer as $PYTHON")
    "$PYTHON" -c 'import ensurepip, venv' 2>/dev/null || missing+=(python3-venv)
  fi
  if [ ${#missing[@]} -gt 0 ]; then
    log "missing prerequisites: ${missing[*]} (Debian: apt-get install make python3-venv)"
    exit 1
  fi
  if [ -n "$CONSTRAINTS" ] && [ ! -f "$CONSTRAINTS" ]; then
    log "no pinned versions at $CONSTRAINTS (CONSTRAINTS= takes the newest instead)"
    exit 1
  fi
}

# The newest of the wheelhouse's builds of the project: by version (PEP 440, with pip's
# own parser), then by file time for two builds of one version.
newest_wheel() {
  "$PYTHON" - "$@" <<'PY'
import os, sys
try:
    from pip._vendor.packaging.version import InvalidVersion, Version
except ImportError:  # no pip beside this interpreter: compare the digits
    InvalidVersion = ValueError
    def Version(text):
        return tuple(int(p) if p.isdigit() else 0 for p in text.replace("-", ".").split("."))
def key(path):
    try:
        version = Version(os.path.basename(path).split("-")[1])
    except InvalidVersion:
        version = Version("0")
    return (version, os.stat(path).st_mtime)
print(max(sys.argv[1:], key=key))
PY
}

# Why the venv cannot be kept (empty when it can): half-made, its interpreter gone or
# changed (Debian 12 -> 13 re-points python3), or a dependency broken or missing.
venv_fault() {
  local venv=$1 want have made
  if [ -L "$venv/bin/python" ] && [ ! -e "$venv/bin/python" ]; then
    echo "its interpreter is gone ($(readlink "$venv/bin/python"))"; return 0
  fi
  if [ ! -x "$venv/bin/python" ] || [ ! -f "$venv/pyvenv.cfg" ]; then
    [ -e "$venv" ] && echo "it is half-made (no interpreter)"
    return 0
  fi
  have=$("$venv/bin/python" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null) \
    || { echo "its interpreter is gone"; return 0; }
  made=$(sed -n 's/^version[_a-z]* *= *\([0-9]*\.[0-9]*\).*/\1/p' "$venv/pyvenv.cfg" | head -n1)
  if [ -n "$made" ] && [ "$made" != "$have" ]; then
    echo "it was made for Python $made and its python3 is now $have"; return 0
  fi
  want=$("$PYTHON" -c 'import os, sys; print(os.path.realpath(sys._base_executable))')
  have=$("$venv/bin/python" -c 'import os, sys; print(os.path.realpath(sys._base_executable))')
  if [ "$want" != "$have" ]; then
    echo "it runs $have, not $want"; return 0
  fi
  if ! "$venv/bin/python" -m pip --version >/dev/null 2>&1; then
    echo "it is half-made (no pip)"; return 0
  fi
  local check
  if ! check=$("$venv/bin/python" -m pip check --disable-pip-version-check 2>&1); then
    echo "pip check: $(echo "$check" | head -n1)"; return 0
  fi
}

install_venv() {
  local root=$DESTDIR$PREFIX venv=$DESTDIR$PREFIX/.venv stage
  stage=$(mktemp -d)
  trap 'rm -rf "$stage"' RETURN
  local wheel
  if [ -n "$WHEELHOUSE" ]; then
    local found=("$WHEELHOUSE"/pudu_fleet_bridge-*.whl)
    [ -e "${found[0]}" ] \
      || { log "no pudu_fleet_bridge wheel in $WHEELHOUSE (make wheelhouse builds one)"; exit 1; }
    wheel=$(newest_wheel "${found[@]}")
    [ ${#found[@]} -eq 1 ] || log "wheelhouse has ${#found[@]} builds: installing $(basename "$wheel")"
  else
    build_wheel "$stage"
    wheel=$(ls "$stage"/pudu_fleet_bridge-*.whl | head -n1)
  fi
  local digest marker=$root/.installed-wheel fault
  digest=$(wheel_digest "$wheel")
  # new pins install again, as a new build does; so do other extras (EXTRAS=awsiot after
  # EXTRAS= would otherwise find "this build" and leave awscrt out)
  if [ -n "$CONSTRAINTS" ]; then digest="$digest $(sha256sum < "$CONSTRAINTS" | cut -c1-16)"; fi
  digest="$digest extras=$EXTRAS"
  fault=$(venv_fault "$venv")
  if [ -n "$fault" ]; then
    log "rebuilding the venv $venv: $fault"
    rm -rf "$venv" "$marker"
  elif [ -f "$marker" ] && [ "$(cat "$marker")" = "$digest" ]; then
    log "venv $venv already has this build"
    return 0
  fi
  [ -x "$venv/bin/python" ] || "$PYTHON" -m venv "$venv" \
    || { rm -rf "$venv"; log "could not make the venv $venv"; exit 1; }
  local pip=("$venv/bin/python" -m pip install --disable-pip-version-check)
  if [ -n "$WHEELHOUSE" ]; then
    pip+=(--no-index --find-links "$WHEELHOUSE")
  fi
  "${pip[@]}" --quiet --force-reinstall --no-deps "$wheel"
  resolve "${pip[@]}" "${PIN[@]}" "$wheel${EXTRAS:+[$EXTRAS]}" || exit 1  # as pinned
  if [ -n "$DESTDIR" ]; then
    # Scripts were written with the staging path in their #! line; point them at the
    # final one (a venv cannot be moved otherwise).
    grep -rlI --null "$DESTDIR$PREFIX" "$venv/bin" | xargs -0r sed -i "s#$DESTDIR$PREFIX#$PREFIX#g"
  fi
  printf '%s\n' "$digest" > "$marker.tmp" && mv "$marker.tmp" "$marker"
  chmod 0644 "$marker"
  log "installed $(basename "$wheel") into $venv"
}

install_files() {
  local tmp
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' RETURN
  for svc in "${SERVICES[@]}"; do
    put "$DESTDIR$UNITDIR/$svc.service" "$HERE/systemd/$svc.service" 0644
    local old=$DESTDIR$OLD_UNITDIR/$svc.service
    if [ -f "$old" ] && cmp -s "$old" "$HERE/systemd/$svc.service"; then
      rm -f "$old" && log "removed $old (an unedited copy from an earlier install)"
    elif [ -f "$old" ]; then
      log "$old overrides $UNITDIR/$svc.service: put your changes in a drop-in" \
          "(systemctl edit $svc) and delete it, or upgrades of the unit never apply"
    fi
    dir "$DESTDIR/etc/$svc" 0750
    dir "$DESTDIR/etc/$svc/credentials" 0700
    local cred
    for cred in $(sed -n 's#^LoadCredential=\([a-z_]*\):.*#\1#p' "$HERE/systemd/$svc.service"); do
      # systemd refuses a unit whose credential file is missing: empty means "not set".
      [ -e "$DESTDIR/etc/$svc/credentials/$cred" ] \
        || install -m 0600 /dev/null "$DESTDIR/etc/$svc/credentials/$cred"
    done
    local config=$DESTDIR/etc/$svc/config.yaml
    if [ ! -e "$config" ]; then  # never overwrite an operator's config
      install -m 0640 "$HERE/config.example/$svc.yaml" "$config"
      if [ "$svc" = callback-server ]; then  # `keys add` and the service find it there
        sed -i "s#^api_keys_file: null #api_keys_file: /etc/$svc/keys.yaml #" "$config"
      fi
      log "wrote $config (edit it)"
    fi
  done
  local replicas=$tmp/$REPLICA.service
  replica_unit > "$replicas"
  put "$DESTDIR$UNITDIR/$REPLICA.service" "$replicas" 0644
  # API keys (hashes only): root writes them (`keys add`), the service's group reads them.
  local keys=$DESTDIR/etc/callback-server/keys.yaml
  [ -e "$keys" ] || { printf 'keys: []\n' > "$keys" && chmod 0640 "$keys"; }
  put "$DESTDIR$SYSUSERS" "$HERE/systemd/sysusers.conf" 0644
  put "$DESTDIR$TMPFILES" "$HERE/systemd/tmpfiles.conf" 0644
  put "$DESTDIR$PREFIX/systemd/README.md" "$HERE/systemd/README.md" 0644
}

apply_live() {
  [ -z "$DESTDIR" ] && [ "$(id -u)" -eq 0 ] || return 0
  command -v systemd-sysusers >/dev/null && systemd-sysusers "$SYSUSERS"
  command -v systemd-tmpfiles >/dev/null && systemd-tmpfiles --create "$TMPFILES"
  for svc in "${SERVICES[@]}"; do chgrp pudu-bridge "/etc/$svc" "/etc/$svc/config.yaml" 2>/dev/null || true; done
  chgrp pudu-bridge /etc/callback-server/keys.yaml 2>/dev/null || true
  if [ -d /run/systemd/system ]; then systemctl daemon-reload; fi
  log "enable with: systemctl enable --now edge-agent   (or callback-server," \
      "or replicas: callback-server@1 callback-server@2)"
}

uninstall() {
  if [ -z "$DESTDIR" ] && [ -d /run/systemd/system ] && [ "$(id -u)" -eq 0 ]; then
    # Before the unit files go: disabling needs their [Install] section, and enable
    # symlinks left in multi-user.target.wants would dangle.
    for svc in "${SERVICES[@]}"; do
      if [ -f "$UNITDIR/$svc.service" ]; then
        systemctl disable --now "$svc.service" || log "could not disable $svc.service"
      fi
    done
    local unit
    for unit in $(enabled_replicas); do
      systemctl disable --now "$unit" || log "could not disable $unit"
    done
    systemctl stop "$REPLICA*.service" || true  # started, never enabled
  fi
  rm -f "$DESTDIR$UNITDIR/$REPLICA.service"
  for svc in "${SERVICES[@]}"; do
    rm -f "$DESTDIR$UNITDIR/$svc.service"
    if [ -f "$DESTDIR$OLD_UNITDIR/$svc.service" ] \
       && cmp -s "$DESTDIR$OLD_UNITDIR/$svc.service" "$HERE/systemd/$svc.service"; then
      rm -f "$DESTDIR$OLD_UNITDIR/$svc.service"
    fi
  done
  rm -f "$DESTDIR$SYSUSERS" "$DESTDIR$TMPFILES"
  rm -rf "$DESTDIR$PREFIX"
  if [ -z "$DESTDIR" ] && [ -d /run/systemd/system ] && [ "$(id -u)" -eq 0 ]; then
    systemctl daemon-reload
  fi
  log "removed the program and units; kept /etc/edge-agent, /etc/callback-server and /var/lib data"
}

wheelhouse() {
  [ -n "$WHEELHOUSE" ] || { log "set WHEELHOUSE=dir"; exit 2; }
  mkdir -p "$WHEELHOUSE"
  local wheel built
  built=$(mktemp -d)
  build_wheel "$built"
  wheel=$(ls "$built"/pudu_fleet_bridge-*.whl)
  cp -p "$wheel" "$WHEELHOUSE/" && rm -rf "$built"
  wheel=$WHEELHOUSE/$(basename "$wheel")
  wheel=$wheel${EXTRAS:+[$EXTRAS]}
  if [ -n "${PLATFORM:-}" ]; then
    # Another machine's platform (a gateway): binary wheels only, for its Python. What
    # has none is said here, not found by a gateway with no compiler.
    local out
    if ! out=$("$PYTHON" -m pip download --disable-pip-version-check \
          --only-binary=:all: --platform "$PLATFORM" --python-version "${PYVER:-3.11}" \
          -d "$WHEELHOUSE" "${PIN[@]}" "$wheel" 2>&1); then
      local missing
      # unpinned, pip names it; pinned, it is the constraint pip could not meet
      missing=$(echo "$out" | sed -n -e 's/.*No matching distribution found for \([^ ]*\).*/\1/p' \
                -e 's/.*The user requested (constraint) \([^ ]*\).*/\1/p' | head -n1)
      if [ -n "$missing" ]; then
        log "$missing has no wheel for $PLATFORM (Python ${PYVER:-3.11}): the gateway would" \
            "have to compile it. docs/install.md (armhf) says what runs there" \
            "(EXTRAS= drops awscrt)."
      else
        echo "$out" >&2
      fi
      exit 1
    fi
  else
    resolve "$PYTHON" -m pip wheel --disable-pip-version-check -w "$WHEELHOUSE" "${PIN[@]}" \
      "$wheel" || exit 1
  fi
  log "wheelhouse $WHEELHOUSE: $(ls "$WHEELHOUSE" | wc -l) wheels"
}

case "$ACTION" in
  install) prerequisites; install_venv; install_files; apply_live ;;
  venv) prerequisites; install_venv ;;  # the program only (packaging/build-deb.sh)
  uninstall) uninstall ;;
  wheelhouse) prerequisites; wheelhouse ;;
  replica-unit) replica_unit ;;  # packaging/build-deb.sh
  *) echo "usage: $0 install|uninstall|wheelhouse|venv|replica-unit" >&2; exit 2 ;;
esac
