#!/usr/bin/env bash
# Installs flotilla-agent on this host as a hardened systemd service.
#
#   sudo ./install-agent.sh BUNDLE [BINARY]
#
# BUNDLE  the file `flotilla enroll <host>` wrote on the coordinator machine.
# BINARY  the flotilla-agent executable; default: flotilla-agent beside this script,
#         then in the current directory, then the one already in /usr/local/bin.
#
# Used only when /etc/flotilla/agent.toml does not exist yet (an existing one is kept):
#   FLOTILLA_BACKUP_ROOTS   directories to back up, space-separated (default "/etc /home")
#   FLOTILLA_RESTORE_ROOTS  directories restores may write into (default: none)
#   FLOTILLA_STORAGE        keep a backup repository here, making this a storage host
#   FLOTILLA_LISTEN         QUIC address for peer agents, e.g. 0.0.0.0:7443
# Other knobs:
#   FLOTILLA_UNIT     the unit file to install (default: systemd/flotilla-agent.service
#                     beside this script)
#   FLOTILLA_DESTDIR  install under this directory instead of /, and skip systemctl and
#                     the config check (for packaging and tests)
#
# Running it again upgrades the binary, the bundle and the unit, keeps agent.toml, and
# restarts the agent.

set -euo pipefail

prog=install-agent
die() { printf '%s: error: %s\n' "$prog" "$*" >&2; exit 1; }
info() { printf '%s: %s\n' "$prog" "$*"; }
usage() { sed -n '2,/^$/s/^# \{0,1\}//p' "$0"; exit "${1:-0}"; }

case "${1:-}" in
  -h|--help) usage 0 ;;
esac
if [ $# -lt 1 ] || [ $# -gt 2 ]; then usage 2 >&2; fi

bundle=$1
binary=${2:-}
destdir=${FLOTILLA_DESTDIR:-}
script_dir=$(cd "$(dirname "$0")" && pwd)

bin_path=/usr/local/bin/flotilla-agent
etc_dir=/etc/flotilla
bundle_path=$etc_dir/bundle.toml
config_path=$etc_dir/agent.toml
state_dir=/var/lib/flotilla-agent
unit_path=/etc/systemd/system/flotilla-agent.service
dropin_path=/etc/systemd/system/flotilla-agent.service.d/10-writable-paths.conf

# --- Check everything before changing anything -----------------------------------

if [ -z "$destdir" ]; then
  [ "$(id -u)" -eq 0 ] || die "must run as root (try: sudo $0 $*)"
  command -v systemctl >/dev/null 2>&1 || die "systemctl not found: this script installs a systemd service"
fi

[ -f "$bundle" ] || die "bundle $bundle not found (make one on the coordinator machine: flotilla enroll <host>)"
[ -r "$bundle" ] || die "bundle $bundle is not readable"
host=$(sed -n 's/^host[[:space:]]*=[[:space:]]*"\([^"]*\)".*/\1/p' "$bundle" | head -n 1)
[ -n "$host" ] || die "$bundle is not a Flotilla bundle (it has no host = \"...\" line)"

if [ -z "$binary" ]; then
  for candidate in "$script_dir/flotilla-agent" ./flotilla-agent "$destdir$bin_path"; do
    if [ -f "$candidate" ]; then binary=$candidate; break; fi
  done
  [ -n "$binary" ] || die "no flotilla-agent binary found; give its path: $0 $bundle /path/to/flotilla-agent"
fi
[ -f "$binary" ] || die "binary $binary not found"
[ -x "$binary" ] || die "binary $binary is not executable (chmod +x it)"

unit=${FLOTILLA_UNIT:-$script_dir/systemd/flotilla-agent.service}
[ -f "$unit" ] || die "unit file $unit not found; run this script from Flotilla's deploy/ directory or set FLOTILLA_UNIT"

# Paths go into TOML strings and ReadWritePaths=: allow only plain absolute paths.
check_path() { # what path
  case "$2" in
    /*) ;;
    *) die "$1 $2 is not an absolute path" ;;
  esac
  case "$2" in
    *[\"\\\'\`\$]*|*[[:cntrl:]]*) die "$1 $2 contains a quote, backslash, \$ or control character" ;;
  esac
}

write_config=no
writable=""
if [ ! -e "$destdir$config_path" ]; then
  write_config=yes
  read -r -a backup_roots <<<"${FLOTILLA_BACKUP_ROOTS-/etc /home}"
  read -r -a restore_roots <<<"${FLOTILLA_RESTORE_ROOTS-}"
  storage=${FLOTILLA_STORAGE:-}
  listen=${FLOTILLA_LISTEN:-}
  [ ${#backup_roots[@]} -gt 0 ] || [ ${#restore_roots[@]} -gt 0 ] || [ -n "$storage" ] \
    || die "FLOTILLA_BACKUP_ROOTS is empty and there is no storage or restore root: this agent would have nothing to do"
  # ${a[@]+"${a[@]}"}: an empty array, without tripping set -u on older bash.
  for r in ${backup_roots[@]+"${backup_roots[@]}"}; do
    check_path "backup root" "$r"
    [ -d "$r" ] || die "backup root $r is not an existing directory"
  done
  for r in ${restore_roots[@]+"${restore_roots[@]}"}; do
    check_path "restore root" "$r"
    [ -d "$r" ] || die "restore root $r is not an existing directory"
    writable="$writable $r"
  done
  if [ -n "$storage" ]; then
    check_path "storage directory" "$storage"
    writable="$writable $storage"
  fi
  if [ -n "$listen" ]; then
    case "$listen" in
      *:[0-9]*) ;;
      *) die "FLOTILLA_LISTEN=$listen is not ADDRESS:PORT (e.g. 0.0.0.0:7443)" ;;
    esac
    case "$listen" in
      *[\"\\]*|*[[:space:]]*) die "FLOTILLA_LISTEN=$listen contains a quote, backslash or space" ;;
    esac
  fi
fi

if [ -z "$destdir" ]; then
  short=$(hostname -s 2>/dev/null || true)
  if [ -n "$short" ] && [ "$short" != "$host" ]; then
    info "note: this machine is called '$short' but the bundle is for fleet host '$host'"
  fi
fi

# --- Install ---------------------------------------------------------------------

info "installing flotilla-agent for fleet host '$host'"

install -d -m 0755 "$destdir/usr/local/bin"
if [ ! "$binary" -ef "$destdir$bin_path" ]; then
  # Copy then rename, so a running agent's executable is never overwritten in place.
  install -m 0755 "$binary" "$destdir$bin_path.new"
  mv -f "$destdir$bin_path.new" "$destdir$bin_path"
fi
info "binary: $bin_path"

# The bundle holds the host's private key and maybe the repository key: root only.
install -d -m 0750 "$destdir$etc_dir"
if [ ! "$bundle" -ef "$destdir$bundle_path" ]; then
  (umask 077; cp "$bundle" "$destdir$bundle_path.new")
  chmod 0600 "$destdir$bundle_path.new"
  mv -f "$destdir$bundle_path.new" "$destdir$bundle_path"
fi
info "bundle: $bundle_path (mode 0600)"

if [ "$write_config" = yes ]; then
  toml_list() { # items...
    local out="" item
    for item in "$@"; do out="$out${out:+, }\"$item\""; done
    printf '[%s]' "$out"
  }
  tmp=$destdir$config_path.new
  {
    printf '# Written by install-agent.sh on %s. Every key: agent.toml.example.\n' "$(date -u +%Y-%m-%d)"
    printf 'bundle = "%s"\n' "$bundle_path"
    printf 'state_dir = "%s"\n' "$state_dir"
    printf 'backup_roots = %s\n' "$(toml_list ${backup_roots[@]+"${backup_roots[@]}"})"
    printf 'restore_roots = %s\n' "$(toml_list ${restore_roots[@]+"${restore_roots[@]}"})"
    [ -z "$storage" ] || printf 'storage = "%s"\n' "$storage"
    [ -z "$listen" ] || printf 'listen = "%s"\n' "$listen"
    printf 'heartbeat_interval = "5s"\n'
  } >"$tmp"
  chmod 0644 "$tmp"
  mv -f "$tmp" "$destdir$config_path"
  info "config: $config_path (written)"
  if [ -n "$storage" ]; then
    install -d -m 0700 "$destdir$storage"
  fi
else
  info "config: $config_path (kept; FLOTILLA_* root settings ignored)"
fi

install -d -m 0700 "$destdir$state_dir"

install -d -m 0755 "$destdir$(dirname "$unit_path")"
install -m 0644 "$unit" "$destdir$unit_path"
if [ -n "$writable" ]; then
  # The unit makes the filesystem read-only; storage and restore roots must be writable.
  install -d -m 0755 "$destdir$(dirname "$dropin_path")"
  printf '# Written by install-agent.sh: the storage and restore roots of agent.toml.\n[Service]\nReadWritePaths=%s\n' \
    "${writable# }" >"$destdir$dropin_path"
  chmod 0644 "$destdir$dropin_path"
  info "unit: $unit_path, with writable paths:$writable"
else
  info "unit: $unit_path"
fi

if [ -n "$destdir" ]; then
  info "installed under $destdir; skipped systemctl and the config check"
  exit 0
fi

systemctl daemon-reload
systemctl enable flotilla-agent.service || die "systemctl enable flotilla-agent failed"

info "checking the configuration"
if ! "$bin_path" config check --config "$config_path"; then
  die "config check failed (see above). Fix $config_path, then: systemctl restart flotilla-agent"
fi

systemctl restart flotilla-agent.service || die "flotilla-agent did not start; see: journalctl -u flotilla-agent -n 50"
sleep 2
systemctl is-active --quiet flotilla-agent.service \
  || die "flotilla-agent did not stay up; see: journalctl -u flotilla-agent -n 50"

info "flotilla-agent is running. Logs: journalctl -u flotilla-agent -f; fleet view: flotilla hosts (on the coordinator)"
