#!/usr/bin/env bash
# Installs flotilla-agent on this host: as a hardened systemd service, or, where
# systemd does not run (a container, a minimal host), as a plain background process.
#
#   sudo ./install-agent.sh BUNDLE [BINARY]
#
# BUNDLE  the file `flotilla enroll <host>` wrote on the coordinator machine, or
#         /etc/flotilla/bundle.toml to keep the installed one.
# BINARY  the flotilla-agent executable; default: flotilla-agent beside this script,
#         then in the current directory, then the one already in /usr/local/bin.
#
# What the agent does; used when /etc/flotilla/agent.toml does not exist yet, or on
# every run with FLOTILLA_WRITE_CONFIG=yes:
#   FLOTILLA_BACKUP_ROOTS   directories to back up, space-separated (default "/etc /home")
#   FLOTILLA_RESTORE_ROOTS  directories restores may write into (default: none)
#   FLOTILLA_STORAGE        keep a backup repository here, making this a storage host
#   FLOTILLA_LISTEN         QUIC address for peer agents, e.g. 0.0.0.0:7443
#   FLOTILLA_ADVERTISE      the address peers dial to reach FLOTILLA_LISTEN (NAT, a port
#                           forward); optional
# Other knobs:
#   FLOTILLA_WRITE_CONFIG  yes: write agent.toml from the settings above even if it
#                     exists (`flotilla deploy` and the Ansible role own it); default no:
#                     an existing agent.toml is kept, hand edits and all
#   FLOTILLA_SERVICE  auto (default): systemd when it runs here (/run/systemd/system),
#                     else direct; systemd: install, enable and (re)start
#                     flotilla-agent.service; direct: run the agent in the background,
#                     its pid in /run/flotilla-agent.pid and its log in
#                     /var/log/flotilla-agent.log (nothing starts it at boot)
#   FLOTILLA_UNIT     the unit file to install (default: systemd/flotilla-agent.service
#                     beside this script)
#   FLOTILLA_DESTDIR  install under this directory instead of /, and skip the service
#                     and the config check (for packaging and tests)
#
# Nothing is replaced until the NEW binary has passed `flotilla-agent config check`
# against the new bundle and agent.toml: a failing check leaves the installed agent,
# its bundle and its agent.toml as they were, and the agent running.
#
# Running it again upgrades in place: the binary it replaces is kept as
# /usr/local/bin/flotilla-agent.previous (to roll back, move it back and restart the
# agent), the bundle and the unit are replaced, and the agent is restarted. The last
# line says what was installed: "install-agent: installed flotilla-agent VERSION".

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
previous_path=$bin_path.previous
etc_dir=/etc/flotilla
bundle_path=$etc_dir/bundle.toml
config_path=$etc_dir/agent.toml
state_dir=/var/lib/flotilla-agent
unit_path=/etc/systemd/system/flotilla-agent.service
dropin_path=/etc/systemd/system/flotilla-agent.service.d/10-writable-paths.conf
pid_file=/run/flotilla-agent.pid
log_file=/var/log/flotilla-agent.log
# How long a direct-mode agent may take to stop cleanly (as the unit's TimeoutStopSec).
stop_timeout=30

# --- Check everything before changing anything -----------------------------------

service=${FLOTILLA_SERVICE:-auto}
case "$service" in
  auto)
    if [ -d /run/systemd/system ]; then service=systemd; else service=direct; fi ;;
  systemd|direct) ;;
  *) die "FLOTILLA_SERVICE=$service: give auto, systemd or direct" ;;
esac

case "${FLOTILLA_WRITE_CONFIG:-no}" in
  yes|no) ;;
  *) die "FLOTILLA_WRITE_CONFIG=${FLOTILLA_WRITE_CONFIG}: give yes or no" ;;
esac

if [ -z "$destdir" ]; then
  [ "$(id -u)" -eq 0 ] || die "must run as root (try: sudo $0 $*)"
  if [ "$service" = systemd ]; then
    command -v systemctl >/dev/null 2>&1 || die "systemctl not found: give FLOTILLA_SERVICE=direct to run the agent without systemd"
    [ -d /run/systemd/system ] || die "FLOTILLA_SERVICE=systemd, but systemd is not running here; give FLOTILLA_SERVICE=direct (or auto)"
  else
    command -v setsid >/dev/null 2>&1 || die "setsid not found (util-linux): the direct service needs it"
    command -v nohup >/dev/null 2>&1 || die "nohup not found (coreutils): the direct service needs it"
  fi
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
[ -r "$binary" ] || die "binary $binary is not readable"

unit=${FLOTILLA_UNIT:-$script_dir/systemd/flotilla-agent.service}
if [ ! -f "$unit" ]; then
  # Only systemd needs it; installed anyway where it is at hand, for a later switch.
  if [ "$service" = systemd ] || [ -n "$destdir" ]; then
    die "unit file $unit not found; run this script from Flotilla's deploy/ directory or set FLOTILLA_UNIT"
  fi
  unit=""
fi

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
check_addr() { # name value
  case "$2" in
    *:[0-9]*) ;;
    *) die "$1=$2 is not ADDRESS:PORT (e.g. 0.0.0.0:7443)" ;;
  esac
  case "$2" in
    *[\"\\]*|*[[:space:]]*) die "$1=$2 contains a quote, backslash or space" ;;
  esac
}

write_config=no
writable=""
if [ "${FLOTILLA_WRITE_CONFIG:-no}" = yes ] || [ ! -e "$destdir$config_path" ]; then
  write_config=yes
  read -r -a backup_roots <<<"${FLOTILLA_BACKUP_ROOTS-/etc /home}"
  read -r -a restore_roots <<<"${FLOTILLA_RESTORE_ROOTS-}"
  storage=${FLOTILLA_STORAGE:-}
  listen=${FLOTILLA_LISTEN:-}
  advertise=${FLOTILLA_ADVERTISE:-}
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
  [ -z "$listen" ] || check_addr FLOTILLA_LISTEN "$listen"
  if [ -n "$advertise" ]; then
    [ -n "$listen" ] || die "FLOTILLA_ADVERTISE=$advertise needs FLOTILLA_LISTEN too: an agent that does not listen has nothing to advertise"
    check_addr FLOTILLA_ADVERTISE "$advertise"
  fi
fi

if [ -z "$destdir" ]; then
  short=$(hostname -s 2>/dev/null || true)
  if [ -n "$short" ] && [ "$short" != "$host" ]; then
    info "note: this machine is called '$short' but the bundle is for fleet host '$host'"
  fi
fi

# --- Stage: every new file beside the one it replaces, as NAME.new ------------------

info "installing flotilla-agent for fleet host '$host' (service: $service)"

staged=()
discard_staged() {
  local f
  for f in ${staged[@]+"${staged[@]}"}; do rm -f "$f"; done
}
trap discard_staged EXIT

# Created if missing; an existing one keeps its mode (Debian's is 2775 root:staff).
[ -d "$destdir/usr/local/bin" ] || install -d -m 0755 "$destdir/usr/local/bin"
bin_new=$destdir$bin_path.new
staged+=("$bin_new")
install -m 0755 "$binary" "$bin_new"

version=""
if [ -z "$destdir" ]; then
  # The new binary must run here before anything else happens (a binary for another
  # architecture, or one the filesystem will not execute, stops the install now).
  version=$("$bin_new" --version 2>/dev/null | sed -n 's/^flotilla-agent[[:space:]]\{1,\}\([^[:space:]]*\).*/\1/p' | head -n 1) || true
  [ -n "$version" ] || die "$binary does not run on this machine ($(uname -m)): is it built for another architecture? Nothing was changed"
fi

# The bundle holds the host's private key and maybe the repository key: it is
# 0600 (root only). The directory is made 0755 when missing and never changed
# when present: on the coordinator's own machine `flotilla serve` (user
# flotilla) reads /etc/flotilla/fleet, as the .deb sets it up.
[ -d "$destdir$etc_dir" ] || install -d -m 0755 "$destdir$etc_dir"
bundle_to_check=$destdir$bundle_path
if [ ! "$bundle" -ef "$destdir$bundle_path" ]; then
  bundle_to_check=$destdir$bundle_path.new
  staged+=("$bundle_to_check")
  (umask 077; cp "$bundle" "$bundle_to_check")
  chmod 0600 "$bundle_to_check"
fi

config_to_check=$destdir$config_path
if [ "$write_config" = yes ]; then
  toml_list() { # items...
    local out="" item
    for item in "$@"; do out="$out${out:+, }\"$item\""; done
    printf '[%s]' "$out"
  }
  config_to_check=$destdir$config_path.new
  staged+=("$config_to_check")
  {
    printf '# Written by install-agent.sh on %s. Every key: agent.toml.example.\n' "$(date -u +%Y-%m-%d)"
    printf 'bundle = "%s"\n' "$bundle_path"
    printf 'state_dir = "%s"\n' "$state_dir"
    printf 'backup_roots = %s\n' "$(toml_list ${backup_roots[@]+"${backup_roots[@]}"})"
    printf 'restore_roots = %s\n' "$(toml_list ${restore_roots[@]+"${restore_roots[@]}"})"
    [ -z "$storage" ] || printf 'storage = "%s"\n' "$storage"
    [ -z "$listen" ] || printf 'listen = "%s"\n' "$listen"
    [ -z "$advertise" ] || printf 'advertise = "%s"\n' "$advertise"
    printf 'heartbeat_interval = "5s"\n'
  } >"$config_to_check"
  chmod 0644 "$config_to_check"
  if [ -n "$storage" ]; then
    install -d -m 0700 "$destdir$storage"
  fi
fi

install -d -m 0700 "$destdir$state_dir"

# --- Check the new binary against the new bundle and agent.toml ---------------------

if [ -z "$destdir" ]; then
  info "checking the configuration with flotilla-agent $version"
  if ! "$bin_new" config check --config "$config_to_check" --bundle "$bundle_to_check"; then
    if [ "$write_config" = yes ]; then
      die "config check failed (see above); nothing was changed: fix the settings (FLOTILLA_* above) and run this again"
    fi
    die "config check failed (see above); nothing was changed: fix $config_path and run this again"
  fi
fi

# --- Replace --------------------------------------------------------------------

if [ -e "$destdir$bin_path" ] && ! cmp -s "$destdir$bin_path" "$bin_new"; then
  # A hard link keeps the old binary as it is, even while it runs; a copy where
  # links cannot be made.
  ln -f "$destdir$bin_path" "$destdir$previous_path" 2>/dev/null \
    || cp -pf "$destdir$bin_path" "$destdir$previous_path"
  info "previous binary: $previous_path (to roll back: move it back to $bin_path and restart the agent)"
fi
# A rename, so that a running agent's executable is never overwritten in place.
mv -f "$bin_new" "$destdir$bin_path"
info "binary: $bin_path"

if [ "$bundle_to_check" != "$destdir$bundle_path" ]; then
  mv -f "$bundle_to_check" "$destdir$bundle_path"
fi
info "bundle: $bundle_path (mode 0600)"

if [ "$write_config" = yes ]; then
  mv -f "$config_to_check" "$destdir$config_path"
  info "config: $config_path (written)"
else
  info "config: $config_path (kept; FLOTILLA_* root settings ignored; FLOTILLA_WRITE_CONFIG=yes replaces it)"
fi
trap - EXIT

if [ -n "$unit" ]; then
  install -d -m 0755 "$destdir$(dirname "$unit_path")"
  install -m 0644 "$unit" "$destdir$unit_path"
  if [ "$write_config" = yes ]; then
    if [ -n "$writable" ]; then
      # The unit makes the filesystem read-only; storage and restore roots must be writable.
      install -d -m 0755 "$destdir$(dirname "$dropin_path")"
      printf '# Written by install-agent.sh: the storage and restore roots of agent.toml.\n[Service]\nReadWritePaths=%s\n' \
        "${writable# }" >"$destdir$dropin_path"
      chmod 0644 "$destdir$dropin_path"
      info "unit: $unit_path, with writable paths:$writable"
    else
      rm -f "$destdir$dropin_path"
      info "unit: $unit_path"
    fi
  else
    info "unit: $unit_path"
  fi
fi

if [ -n "$destdir" ]; then
  info "installed flotilla-agent under $destdir (version not asked; no service, no config check)"
  exit 0
fi

# --- (Re)start --------------------------------------------------------------------

# Whether process $1 runs (an exited child not yet reaped is a zombie, not running).
alive() {
  kill -0 "$1" 2>/dev/null && ! grep -q ') Z ' "/proc/$1/stat" 2>/dev/null
}

# An agent this script started without systemd: SIGTERM is a clean stop (its last
# heartbeat, agent.offline; unfinished tasks resume at the next start).
stop_direct() {
  local pid waited=0
  [ -f "$pid_file" ] || return 0
  pid=$(cat "$pid_file" 2>/dev/null || true)
  case "$pid" in
    ''|*[!0-9]*) rm -f "$pid_file"; return 0 ;;
  esac
  # A stale pid file may name another process by now: only stop a flotilla-agent.
  if alive "$pid" && grep -qa flotilla-agent "/proc/$pid/cmdline" 2>/dev/null; then
    info "stopping the running agent (pid $pid)"
    kill -TERM "$pid" 2>/dev/null || true
    while alive "$pid"; do
      if [ "$waited" -ge "$stop_timeout" ]; then
        info "the agent did not stop within ${stop_timeout}s; killing it (its unfinished tasks resume at the next start)"
        kill -KILL "$pid" 2>/dev/null || true
        sleep 1
        break
      fi
      sleep 1
      waited=$((waited + 1))
    done
  fi
  rm -f "$pid_file"
}

if [ "$service" = systemd ]; then
  # An agent once started without systemd must not run beside the service.
  stop_direct
  systemctl daemon-reload
  systemctl enable flotilla-agent.service || die "systemctl enable flotilla-agent failed"
  if systemctl is-active --quiet flotilla-agent.service; then
    info "restarting flotilla-agent.service"
  else
    info "starting flotilla-agent.service"
  fi
  systemctl restart flotilla-agent.service || die "flotilla-agent did not start; see: journalctl -u flotilla-agent -n 50"
  sleep 2
  systemctl is-active --quiet flotilla-agent.service \
    || die "flotilla-agent did not stay up; see: journalctl -u flotilla-agent -n 50"
  info "flotilla-agent is running. Logs: journalctl -u flotilla-agent -f; fleet view: flotilla hosts (on the coordinator)"
else
  stop_direct
  # mkdir, not install -d: /var/log's mode and group are the system's (syslog may write there).
  mkdir -p "$(dirname "$pid_file")" "$(dirname "$log_file")"
  # setsid: a session of its own, so that the end of this script's session (an ssh
  # connection) does not take it down; every descriptor away from the caller's.
  setsid nohup "$bin_path" run --config "$config_path" </dev/null >>"$log_file" 2>&1 &
  pid=$!
  printf '%s\n' "$pid" >"$pid_file"
  sleep 1
  if ! alive "$pid"; then
    rm -f "$pid_file"
    printf '%s: the last lines of %s:\n' "$prog" "$log_file" >&2
    tail -n 20 "$log_file" >&2 || true
    die "flotilla-agent exited right after starting (its log is above); the binary it replaced is $previous_path"
  fi
  info "flotilla-agent is running (pid $pid, not started at boot: no systemd). Log: $log_file; fleet view: flotilla hosts (on the coordinator)"
fi

info "service: $service"
info "installed flotilla-agent $version"
