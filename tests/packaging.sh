#!/usr/bin/env bash
# The packages' CI test (issue 13). Packages the debug binaries that
# `cargo build --workspace --bins` has just made (scripts/package.sh
# --skip-build: seconds, no cargo build), checks SHA256SUMS and what each
# tarball and .deb holds, then, as root, installs both .debs, checks their
# versions, the conffile and `flotilla-agent config check` with a real bundle,
# removes and purges them, checks what is kept, and deletes what it made itself.
# A failure part-way purges the packages again.
#
#   tests/packaging.sh     (scripts/test.sh runs it after building)
#
# Without dpkg-deb it is skipped; without root or dpkg, the install half is.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh

skip() { log "packaging: skipped: $*"; exit 0; }
fail() { die "packaging: $*"; }

command -v dpkg-deb >/dev/null 2>&1 || skip "dpkg-deb is missing (not a Debian system)"

arch="$(uname -m)"
case "$arch" in
    x86_64) deb_arch=amd64 ;;
    aarch64) deb_arch=arm64 ;;
    *) skip "no packages for $arch" ;;
esac
bin_dir="${CARGO_TARGET_DIR:-target}/debug"
for bin in flotilla flotilla-agent; do
    [ -x "$bin_dir/$bin" ] \
        || fail "$bin_dir/$bin is missing: build the workspace first (cargo build --workspace --bins --locked; scripts/test.sh does)"
done
version="$("$bin_dir/flotilla" --version | cut -d' ' -f2)"
deb_version="${version/-/\~}"

tmp="$(mktemp -d)"
dist="$tmp/dist"
installed=no
cleanup() {
    local rc=$?
    if [ "$installed" = yes ]; then
        log "packaging: failed part-way: purging the packages and what the test made"
        dpkg -P flotilla-agent flotilla >/dev/null 2>&1 || true
        rm -f /etc/flotilla/bundle.toml
        rm -rf /var/lib/flotilla-agent
        rmdir /etc/flotilla 2>/dev/null || true
    fi
    rm -rf "$tmp"
    exit "$rc"
}
trap cleanup EXIT

# --- The artifacts --------------------------------------------------------------------

scripts/package.sh --arch "$arch" --profile debug --skip-build --out "$dist" >"$tmp/package.log" 2>&1 \
    || { cat "$tmp/package.log" >&2; fail "scripts/package.sh failed (output above)"; }

cli_deb="flotilla_${deb_version}_$deb_arch.deb"
agent_deb="flotilla-agent_${deb_version}_$deb_arch.deb"
cli_tar="flotilla-$version-$arch-linux"
agent_tar="flotilla-agent-$version-$arch-linux"
(cd "$dist" && sha256sum -c --quiet SHA256SUMS) || fail "sha256sum -c SHA256SUMS failed in $dist"
for artifact in "$cli_deb" "$agent_deb" "$cli_tar.tar.gz" "$agent_tar.tar.gz"; do
    grep -q "  $artifact\$" "$dist/SHA256SUMS" || fail "SHA256SUMS does not cover $artifact: $(cat "$dist/SHA256SUMS")"
done

# has LISTING WHAT PATH...: every PATH is a line of LISTING.
has() {
    local listing=$1 what=$2 path
    shift 2
    for path in "$@"; do
        grep -qxF -- "$path" <<<"$listing" || fail "$what lacks $path; it holds:"$'\n'"$listing"
    done
}
has "$(tar -tzf "$dist/$cli_tar.tar.gz")" "$cli_tar.tar.gz" \
    "$cli_tar/flotilla" "$cli_tar/man/man1/flotilla.1" "$cli_tar/man/man1/flotilla-backup.1" \
    "$cli_tar/completions/flotilla.bash" "$cli_tar/completions/_flotilla" "$cli_tar/completions/flotilla.fish" \
    "$cli_tar/deploy/install-agent.sh" "$cli_tar/deploy/systemd/flotilla-serve.service"
has "$(tar -tzf "$dist/$agent_tar.tar.gz")" "$agent_tar.tar.gz" \
    "$agent_tar/flotilla-agent" "$agent_tar/install-agent.sh" "$agent_tar/agent.toml.example" \
    "$agent_tar/systemd/flotilla-agent.service"

# deb_check DEB: its control fields are right and every file is root's.
deb_check() {
    local deb=$1 info
    info="$(dpkg-deb --info "$dist/$deb")"
    grep -qx " Version: $deb_version" <<<"$info" || fail "$deb: not version $deb_version:"$'\n'"$info"
    grep -qx " Architecture: $deb_arch" <<<"$info" || fail "$deb: not architecture $deb_arch:"$'\n'"$info"
    grep -qE '^ Depends: libc6 \(>= 2\.[0-9]+\)$' <<<"$info" || fail "$deb: Depends is not libc6 (>= 2.N):"$'\n'"$info"
    if dpkg-deb --contents "$dist/$deb" | awk '$2 != "root/root"' | grep .; then
        fail "$deb: the files above are not owned by root/root"
    fi
}
deb_check "$cli_deb"
deb_check "$agent_deb"
# dpkg-deb --contents lists "./path" in its last column.
contents() { dpkg-deb --contents "$dist/$1" | awk '{print $NF}'; }
has "$(contents "$cli_deb")" "$cli_deb" \
    ./usr/bin/flotilla ./lib/systemd/system/flotilla-serve.service \
    ./usr/share/bash-completion/completions/flotilla ./usr/share/zsh/vendor-completions/_flotilla \
    ./usr/share/fish/vendor_completions.d/flotilla.fish \
    ./usr/share/man/man1/flotilla.1.gz ./usr/share/man/man1/flotilla-backup.1.gz \
    ./usr/share/doc/flotilla/copyright ./usr/share/doc/flotilla/README.md.gz
has "$(contents "$agent_deb")" "$agent_deb" \
    ./usr/bin/flotilla-agent ./lib/systemd/system/flotilla-agent.service ./etc/flotilla/agent.toml \
    ./usr/share/doc/flotilla-agent/copyright
[ "$(dpkg-deb --info "$dist/$agent_deb" conffiles)" = /etc/flotilla/agent.toml ] \
    || fail "$agent_deb: its conffiles are not exactly /etc/flotilla/agent.toml"
# unit_runs DEB UNIT BINARY: the packaged unit runs /usr/bin/BINARY, not /usr/local/bin.
unit_runs() {
    local text
    text="$(dpkg-deb --fsys-tarfile "$dist/$1" | tar -xOf - "./lib/systemd/system/$2" || true)"
    if ! grep -q "^ExecStart=/usr/bin/$3 " <<<"$text" || grep -q /usr/local/bin <<<"$text"; then
        fail "$2 in $1 does not run /usr/bin/$3:"$'\n'"$text"
    fi
}
unit_runs "$cli_deb" flotilla-serve.service flotilla
unit_runs "$agent_deb" flotilla-agent.service flotilla-agent

# --- Install, configure, remove, purge (root) -----------------------------------------

[ "$(id -u)" -eq 0 ] || skip "the artifacts are right; installing them needs root"
command -v dpkg >/dev/null 2>&1 || skip "the artifacts are right; dpkg is missing, so they were not installed"
# This installs into the real /etc and /var/lib: never on top of a real installation.
# (Empty directories are no installation: the deploy tests' sshd mounts its
# throwaway /etc/flotilla and /var/lib/flotilla-agent on them.)
for path in /etc/flotilla /var/lib/flotilla-agent; do
    if [ -e "$path" ] && { [ ! -d "$path" ] || [ -n "$(ls -A "$path")" ]; }; then
        skip "the artifacts are right, but $path exists (a real installation?), so they were not installed"
    fi
done
# installed, config-files, ...; empty or not-installed when dpkg does not have it.
status_of() { dpkg-query -W -f='${db:Status-Status}' "$1" 2>/dev/null || true; }
for pkg in flotilla flotilla-agent; do
    case "$(status_of "$pkg")" in
        "" | not-installed) ;;
        *) skip "the artifacts are right, but $pkg is $(status_of "$pkg") here already, so they were not installed" ;;
    esac
done

agent_conf=/etc/flotilla/agent.toml
bundle=/etc/flotilla/bundle.toml
state_dir=/var/lib/flotilla-agent
installed=yes
dpkg -i "$dist/$cli_deb" "$dist/$agent_deb" </dev/null >"$tmp/install.log" 2>&1 \
    || { cat "$tmp/install.log" >&2; fail "dpkg -i failed (output above)"; }
grep -q "there is no $bundle yet" "$tmp/install.log" \
    || { cat "$tmp/install.log" >&2; fail "postinst did not say that the bundle is missing (output above)"; }

[ "$(/usr/bin/flotilla --version)" = "flotilla $version" ] || fail "/usr/bin/flotilla --version: $(/usr/bin/flotilla --version)"
[ "$(/usr/bin/flotilla-agent --version)" = "flotilla-agent $version" ] \
    || fail "/usr/bin/flotilla-agent --version: $(/usr/bin/flotilla-agent --version)"
[ -f "$agent_conf" ] || fail "$agent_conf was not installed"
conffiles="$(dpkg-query -W -f='${Conffiles}\n' flotilla-agent)"
grep -q "^ $agent_conf " <<<"$conffiles" || fail "dpkg does not list $agent_conf as a conffile of flotilla-agent: $conffiles"
[ "$(stat -c %a "$state_dir")" = 700 ] || fail "$state_dir is not a directory of mode 0700"

# A real bundle, and roots that exist: then the packaged config must pass.
/usr/bin/flotilla init --fleet "$tmp/fleet" --nats nats://127.0.0.1:4222 >/dev/null \
    || fail "the installed flotilla could not init a fleet (above)"
/usr/bin/flotilla enroll testhost --fleet "$tmp/fleet" --out "$bundle" >/dev/null \
    || fail "the installed flotilla could not enroll testhost into $bundle (above)"
[ "$(stat -c %a "$bundle")" = 600 ] || fail "enroll wrote $bundle with mode $(stat -c %a "$bundle"), not 0600"
mkdir "$tmp/data"
sed -i "s|^backup_roots = .*|backup_roots = [\"$tmp/data\"]|" "$agent_conf"
grep -qxF "backup_roots = [\"$tmp/data\"]" "$agent_conf" || fail "could not set backup_roots in $agent_conf"
/usr/bin/flotilla-agent config check --config "$agent_conf" >"$tmp/check.log" 2>&1 \
    || { cat "$tmp/check.log" >&2; fail "flotilla-agent config check failed with a real bundle (output above)"; }
grep -q "host testhost" "$tmp/check.log" || fail "config check did not name the host: $(cat "$tmp/check.log")"

# Installed again (an upgrade, as far as the scripts know): with the bundle in
# place, postinst runs config check itself; the edited conffile is kept.
dpkg -i "$dist/$agent_deb" </dev/null >"$tmp/reinstall.log" 2>&1 \
    || { cat "$tmp/reinstall.log" >&2; fail "dpkg -i over the configured agent failed (output above)"; }
grep -q "config ok: host testhost" "$tmp/reinstall.log" \
    || { cat "$tmp/reinstall.log" >&2; fail "postinst did not run config check with the bundle in place (output above)"; }
grep -qxF "backup_roots = [\"$tmp/data\"]" "$agent_conf" || fail "reinstalling lost the edit to $agent_conf"

dpkg -r flotilla-agent </dev/null >"$tmp/remove.log" 2>&1 \
    || { cat "$tmp/remove.log" >&2; fail "dpkg -r flotilla-agent failed (output above)"; }
[ ! -e /usr/bin/flotilla-agent ] || fail "dpkg -r left /usr/bin/flotilla-agent"
[ -d "$state_dir" ] || fail "dpkg -r deleted $state_dir"
[ -f "$bundle" ] || fail "dpkg -r deleted $bundle"
[ -f "$agent_conf" ] || fail "dpkg -r deleted the conffile $agent_conf"
[ "$(status_of flotilla-agent)" = config-files ] || fail "after dpkg -r, flotilla-agent is '$(status_of flotilla-agent)', not config-files"

dpkg -P flotilla-agent </dev/null >"$tmp/purge.log" 2>&1 \
    || { cat "$tmp/purge.log" >&2; fail "dpkg -P flotilla-agent failed (output above)"; }
dpkg -P flotilla </dev/null >>"$tmp/purge.log" 2>&1 \
    || { cat "$tmp/purge.log" >&2; fail "dpkg -P flotilla failed (output above)"; }
[ ! -e "$agent_conf" ] || fail "dpkg -P left the conffile $agent_conf"
[ ! -e /usr/bin/flotilla ] || fail "dpkg -P left /usr/bin/flotilla"
[ ! -e /lib/systemd/system/flotilla-serve.service ] || fail "dpkg -P left flotilla-serve.service"
[ -d "$state_dir" ] || fail "dpkg -P deleted $state_dir"
[ -f "$bundle" ] || fail "dpkg -P deleted $bundle"
for pkg in flotilla flotilla-agent; do
    case "$(status_of "$pkg")" in
        "" | not-installed) ;;
        *) fail "after dpkg -P, $pkg is still $(status_of "$pkg")" ;;
    esac
done

# What the test made itself; the machine is as it was.
rm -f "$bundle"
rm -rf "$state_dir"
rmdir /etc/flotilla || fail "/etc/flotilla is not empty after the purge: $(ls -A /etc/flotilla)"
installed=no
log "packaging: ok ($cli_deb and $agent_deb installed, configured, removed and purged)"
