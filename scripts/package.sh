#!/usr/bin/env bash
# Builds Flotilla's release artifacts for x86_64 and aarch64 Linux and writes them
# into dist/: per architecture a tarball of the CLI (with man pages, shell
# completions and deploy/), a tarball of the agent (with its unit,
# agent.toml.example and install-agent.sh), the .deb packages `flotilla` and
# `flotilla-agent`, and SHA256SUMS over every artifact of this version in DIR
# (so one run per architecture into the same DIR adds up).
#
#   scripts/package.sh [--arch x86_64|aarch64|all] [--profile release|debug]
#                      [--out DIR] [--skip-build]
#
#   --arch ARCH       the architectures to package (default: all)
#   --profile NAME    release (default), or debug: faster to build, for tests only
#   --out DIR         where the artifacts go (default: dist/ in the repository)
#   --skip-build      package the binaries already in target/ (cargo build ran before)
#
# aarch64 is cross-compiled for glibc (aarch64-unknown-linux-gnu) with Debian's
# gcc-aarch64-linux-gnu, which the script installs with apt-get when it is
# missing (as root), and the Rust target from rustup. glibc and not musl:
#   - the hosts it is for (Debian, Raspberry Pi OS, Ubuntu) are glibc systems,
#     and the same target family as x86_64 means one toolchain and binaries
#     that behave alike on both (ring and zstd-sys compile C either way);
#   - musl's malloc is markedly slower under the agent's many threads, and the
#     agent tunes glibc's allocator itself (the arena cap and malloc_trim in
#     agent/src/memory.rs), which are glibc-only.
# The binaries then need the newest glibc symbol version they use (2.34 when
# built on Debian 12); each .deb's Depends is computed from the binaries.
#
# Man pages and completions come from running this machine's `flotilla`, so one
# of the architectures must be this machine's (their text does not depend on it).

set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
. "$root/scripts/lib.sh"
umask 022 # the staging trees' modes become the installed files' modes

usage() { sed -n '2,/^$/s/^# \{0,1\}//p' "$0"; exit "${1:-0}"; }
usage_error() { printf 'error: %s\n\n' "$*" >&2; usage 2 >&2; }

arch=all
profile=release
out=""
skip_build=no
while [ $# -gt 0 ]; do
    case "$1" in
        --arch | --profile | --out)
            [ $# -ge 2 ] || usage_error "$1 needs a value"
            case "$1" in
                --arch) arch=$2 ;;
                --profile) profile=$2 ;;
                --out) out=$2 ;;
            esac
            shift 2
            ;;
        --arch=*) arch=${1#*=}; shift ;;
        --profile=*) profile=${1#*=}; shift ;;
        --out=*) out=${1#*=}; shift ;;
        --skip-build) skip_build=yes; shift ;;
        -h | --help) usage 0 ;;
        *) usage_error "unknown argument: $1" ;;
    esac
done

case "$arch" in
    all) arches=(x86_64 aarch64) ;;
    x86_64 | aarch64) arches=("$arch") ;;
    *) usage_error "--arch $arch: use x86_64, aarch64 or all" ;;
esac
case "$profile" in
    release) cargo_profile=(--release); profile_dir=release; level=9 ;;
    # Debug artifacts exist only to be tested, at once: fast compression.
    debug) cargo_profile=(); profile_dir=debug; level=1 ;;
    *) usage_error "--profile $profile: use release or debug" ;;
esac
# A relative --out is relative to where the script was called from.
case "$out" in
    "") out="$root/dist" ;;
    /*) ;;
    *) out="$PWD/$out" ;;
esac
cd "$root"

host_arch="$(uname -m)"
case "$host_arch" in
    x86_64 | aarch64) ;;
    *) die "this machine is $host_arch: man pages and completions come from running flotilla here, so package on x86_64 or aarch64 Linux" ;;
esac

for tool in dpkg-deb readelf sha256sum gzip tar numfmt; do
    command -v "$tool" >/dev/null 2>&1 || case "$tool" in
        dpkg-deb) die "dpkg-deb is needed to build the .deb packages: apt-get install dpkg (Debian or Ubuntu)" ;;
        readelf) die "readelf is needed to check the binaries' architecture and glibc version: apt-get install binutils" ;;
        *) die "$tool is needed: apt-get install coreutils gzip tar" ;;
    esac
done
ensure_rust

# --- Version and target directory, from the workspace -------------------------------

# Compact JSON from cargo; a package object starts "name", then "version".
metadata="$(cargo metadata --no-deps --format-version 1)" \
    || die "cargo metadata failed (above): is $root a complete checkout?"
version="$(grep -o '"name":"flotilla-coordinator","version":"[^"]*"' <<<"$metadata" | cut -d'"' -f8 || true)"
[[ "$version" =~ ^[0-9]+\.[0-9]+\.[0-9]+[-+.0-9A-Za-z]*$ ]] \
    || die "cannot read flotilla-coordinator's version from cargo metadata (found '$version')"
target_dir="$(grep -o '"target_directory":"[^"]*"' <<<"$metadata" | cut -d'"' -f4 || true)"
[ -n "$target_dir" ] && [ "${target_dir#*$'\n'}" = "$target_dir" ] || target_dir="$root/target"
# One target directory for every architecture (cargo puts a cross build under
# target/TRIPLE/); CARGO_TARGET_DIR or a cargo config may have moved it.
export CARGO_TARGET_DIR="$target_dir"
# Debian versions sort "~" before anything, as SemVer sorts a pre-release.
deb_version="${version/-/\~}"

# Every timestamp in the artifacts is the last commit's, so the same commit
# packages to the same bytes (dpkg-deb reads SOURCE_DATE_EPOCH too).
SOURCE_DATE_EPOCH="${SOURCE_DATE_EPOCH:-$(git -C "$root" log -1 --format=%ct 2>/dev/null || date +%s)}"
export SOURCE_DATE_EPOCH

triple_of() { printf '%s-unknown-linux-gnu' "$1"; }
gnu_prefix_of() { printf '%s-linux-gnu' "$1"; }
deb_arch_of() { case "$1" in x86_64) echo amd64 ;; aarch64) echo arm64 ;; esac; }
elf_machine_of() { case "$1" in x86_64) echo "Advanced Micro Devices X86-64" ;; aarch64) echo AArch64 ;; esac; }
# Debian's cross compiler and the target's C library headers (only recommended by the compiler).
cross_packages_of() {
    case "$1" in
        aarch64) echo "gcc-aarch64-linux-gnu libc6-dev-arm64-cross" ;;
        x86_64) echo "gcc-x86-64-linux-gnu libc6-dev-amd64-cross" ;;
    esac
}
# This machine's architecture builds without --target, into target/PROFILE,
# where `cargo build` (and scripts/test.sh) put it too.
bin_dir_of() {
    if [ "$1" = "$host_arch" ]; then
        printf '%s/%s' "$target_dir" "$profile_dir"
    else
        printf '%s/%s/%s' "$target_dir" "$(triple_of "$1")" "$profile_dir"
    fi
}

# --- Build ------------------------------------------------------------------------

# The C cross toolchain and the Rust standard library for ARCH.
ensure_cross() {
    local a=$1 prefix triple packages
    prefix="$(gnu_prefix_of "$a")"
    triple="$(triple_of "$a")"
    packages="$(cross_packages_of "$a")"
    if ! command -v "$prefix-gcc" >/dev/null 2>&1 || [ ! -e "/usr/$prefix/include/stdio.h" ]; then
        if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
            log "installing the $a cross compiler: $packages (Debian)"
            # shellcheck disable=SC2086 # two package names
            DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $packages >/dev/null \
                || { apt-get update -q >/dev/null \
                    && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $packages >/dev/null; } \
                || die "apt-get could not install $packages: install them by hand, or run with --arch $host_arch"
        else
            die "$prefix-gcc (the $a cross compiler) is missing: install it (sudo apt-get install $packages), or run with --arch $host_arch"
        fi
    fi
    if command -v rustup >/dev/null 2>&1; then
        if ! rustup target list --installed 2>/dev/null | grep -x "$triple" >/dev/null; then
            log "adding the Rust target $triple (rustup)"
            rustup target add "$triple" \
                || die "rustup target add $triple failed (above): add it by hand, or run with --arch $host_arch"
        fi
    else
        log "no rustup here: assuming this Rust already has the $triple standard library"
    fi
}

build() { # ARCH WHAT CARGO-SELECTION...
    local a=$1 what=$2 triple prefix up low
    shift 2
    if [ "$a" = "$host_arch" ]; then
        log "building $what for $a ($profile)"
        cargo build --locked ${cargo_profile[@]+"${cargo_profile[@]}"} "$@" \
            || die "cargo build for $a failed (above): fix the build, then run this again"
        return
    fi
    ensure_cross "$a"
    triple="$(triple_of "$a")"
    prefix="$(gnu_prefix_of "$a")"
    up="$(tr 'a-z-' 'A-Z_' <<<"$triple")"
    low="${triple//-/_}"
    log "building $what for $a ($profile), cross-compiled with $prefix-gcc"
    # For aarch64: CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER links the
    # binaries; CC_ and AR_aarch64_unknown_linux_gnu are what the cc crate
    # uses for the C in ring and zstd-sys.
    env "CARGO_TARGET_${up}_LINKER=$prefix-gcc" "CC_$low=$prefix-gcc" "AR_$low=$prefix-ar" \
        cargo build --locked ${cargo_profile[@]+"${cargo_profile[@]}"} --target "$triple" "$@" \
        || die "cargo build for $a failed (above): fix the build, or package only this machine's architecture: --arch $host_arch"
}

host_in_arches=no
for a in "${arches[@]}"; do
    if [ "$a" = "$host_arch" ]; then host_in_arches=yes; fi
done

if [ "$skip_build" = no ]; then
    for a in "${arches[@]}"; do
        build "$a" "flotilla and flotilla-agent" -p flotilla-coordinator -p flotilla-agent --bins
    done
    if [ "$host_in_arches" = no ]; then
        # Only to write the man pages and completions.
        build "$host_arch" "flotilla (for the man pages and completions)" -p flotilla-coordinator --bins
    fi
fi

# --- Check the binaries -------------------------------------------------------------

rebuild_hint() { # ARCH
    local cmd="cargo build --locked"
    if [ "$skip_build" = no ]; then
        printf 'the build above should have made it: look at its output'
        return
    fi
    if [ "$profile" = release ]; then cmd="$cmd --release"; fi
    if [ "$1" != "$host_arch" ]; then cmd="$cmd --target $(triple_of "$1")"; fi
    printf 'run without --skip-build, or build first: %s -p flotilla-coordinator -p flotilla-agent --bins' "$cmd"
}

for a in "${arches[@]}"; do
    dir="$(bin_dir_of "$a")"
    for bin in flotilla flotilla-agent; do
        [ -x "$dir/$bin" ] || die "no $a binary $dir/$bin: $(rebuild_hint "$a")"
        machine="$(readelf -h "$dir/$bin" 2>/dev/null | sed -n 's/^ *Machine: *//p' || true)"
        [ "$machine" = "$(elf_machine_of "$a")" ] \
            || die "$dir/$bin is not an $a binary (readelf says: ${machine:-not ELF}): $(rebuild_hint "$a")"
    done
done

# This machine's binaries must say the workspace's version: stale binaries left
# by an older checkout (--skip-build) must not be packaged under a new name.
# (Cross-built binaries cannot run here; they come from the same cargo build.)
host_cli="$(bin_dir_of "$host_arch")/flotilla"
[ -x "$host_cli" ] || die "no $host_cli to write the man pages and completions with: $(rebuild_hint "$host_arch")"
check_version() { # BINARY NAME
    local said
    said="$("$1" --version 2>&1)" || die "$1 --version failed: $said"
    [ "$said" = "$2 $version" ] \
        || die "$1 says '$said' but the workspace is version $version: stale binaries? $(rebuild_hint "$host_arch")"
}
check_version "$host_cli" flotilla
if [ "$host_in_arches" = yes ]; then
    check_version "$(bin_dir_of "$host_arch")/flotilla-agent" flotilla-agent
fi

# --- Man pages and completions (the same for every architecture) --------------------

work="$(mktemp -d)"
# Also the half-written artifacts of a run that failed (each is written as
# .NAME.tmp and renamed when complete).
trap 'rm -rf "$work"; rm -f "$out"/.*.tmp' EXIT
gen="$work/generated"
mkdir -p "$gen/completions"
"$host_cli" man --dir "$gen/man1" >/dev/null || die "$host_cli man --dir failed (above)"
ls "$gen/man1"/*.1 >/dev/null 2>&1 || die "$host_cli man --dir wrote no man pages"
for shell in bash zsh fish; do
    "$host_cli" completions "$shell" >"$gen/completions/$shell" \
        || die "$host_cli completions $shell failed (above)"
    [ -s "$gen/completions/$shell" ] || die "$host_cli completions $shell printed nothing"
done

# --- Artifacts ----------------------------------------------------------------------

mkdir -p "$out" || die "cannot create the output directory $out"

# Writes a tarball of the directory $work/NAME to $out/NAME.tar.gz: files owned
# by root, sorted, stamped with SOURCE_DATE_EPOCH.
tarball() { # NAME
    tar --sort=name --owner=0 --group=0 --numeric-owner --mtime="@$SOURCE_DATE_EPOCH" \
        -C "$work" -cf - "$1" | gzip -n "-$level" >"$out/.$1.tar.gz.tmp" \
        || die "cannot write $out/$1.tar.gz"
    mv -f "$out/.$1.tar.gz.tmp" "$out/$1.tar.gz"
}

cli_tarball() { # ARCH
    local a=$1 name dir
    name="flotilla-$version-$a-linux"
    dir="$work/$name"
    install -d "$dir/man/man1" "$dir/completions"
    install -m 0755 "$(bin_dir_of "$a")/flotilla" "$dir/flotilla"
    install -m 0644 README.md "$dir/README.md"
    install -m 0644 "$gen/man1"/*.1 "$dir/man/man1/"
    install -m 0644 "$gen/completions/bash" "$dir/completions/flotilla.bash"
    install -m 0644 "$gen/completions/zsh" "$dir/completions/_flotilla"
    install -m 0644 "$gen/completions/fish" "$dir/completions/flotilla.fish"
    # deploy/ as it is (units, install-agent.sh, agent.toml.example, README),
    # without the packaging templates, which are of no use to a user.
    cp -R deploy "$dir/deploy"
    rm -rf "$dir/deploy/debian"
    chmod -R u=rwX,go=rX "$dir/deploy"
    chmod 0755 "$dir/deploy/install-agent.sh"
    tarball "$name"
}

# Laid out so that install-agent.sh finds the binary and the unit beside it:
# unpack, then `sudo ./install-agent.sh BUNDLE` in the unpacked folder.
agent_tarball() { # ARCH
    local a=$1 name dir
    name="flotilla-agent-$version-$a-linux"
    dir="$work/$name"
    install -d "$dir/systemd"
    install -m 0755 "$(bin_dir_of "$a")/flotilla-agent" "$dir/flotilla-agent"
    install -m 0755 deploy/install-agent.sh "$dir/install-agent.sh"
    install -m 0644 deploy/systemd/flotilla-agent.service "$dir/systemd/flotilla-agent.service"
    install -m 0644 deploy/agent.toml.example "$dir/agent.toml.example"
    install -m 0644 deploy/README.md "$dir/README.md"
    tarball "$name"
}

# The newest glibc symbol version the binaries use: the libc6 they depend on.
# (They also link libm, in libc6, and libgcc_s, in libgcc-s1, which libc6
# depends on: libc6 is the only dependency to declare.)
glibc_needed() { # BINARY...
    readelf -V --wide "$@" | grep -o 'GLIBC_[0-9][0-9.]*[0-9]' | sed 's/^GLIBC_//' | sort -uV | tail -n 1
}

# The unit as shipped in deploy/ runs /usr/local/bin/...; the package installs to /usr/bin.
packaged_unit() { # SOURCE DEST
    sed 's#/usr/local/bin/#/usr/bin/#g' "$1" >"$2"
    chmod 0644 "$2"
    if grep -q /usr/local/bin "$2" || ! grep -q '^ExecStart=/usr/bin/' "$2"; then
        die "$1: the package's copy should run /usr/bin/..., but its Exec lines are not in the expected form"
    fi
}

# Fills deploy/debian/PACKAGE/ into the staging tree STAGE and builds the .deb.
deb() { # PACKAGE ARCH STAGE
    local pkg=$1 a=$2 stage=$3 templates="deploy/debian/$1" glibc size file script
    file="${pkg}_${deb_version}_$(deb_arch_of "$a").deb"
    install -d -m 0755 "$stage/DEBIAN" "$stage/usr/share/doc/$pkg"
    install -m 0644 deploy/debian/copyright "$stage/usr/share/doc/$pkg/copyright"
    glibc="$(glibc_needed "$stage/usr/bin/$pkg" || true)"
    [ -n "$glibc" ] || die "readelf found no GLIBC_ symbol version in $stage/usr/bin/$pkg: not a glibc binary?"
    size="$(du -sk --exclude=DEBIAN "$stage" | cut -f1)"
    sed -e "s/@VERSION@/$deb_version/g" -e "s/@ARCH@/$(deb_arch_of "$a")/g" \
        -e "s/@GLIBC@/$glibc/g" -e "s/@INSTALLED_SIZE@/$size/g" \
        "$templates/control" >"$stage/DEBIAN/control"
    if grep -n '@[A-Z_]*@' "$stage/DEBIAN/control" >&2; then
        die "$templates/control has a placeholder (above) that scripts/package.sh does not fill"
    fi
    for script in preinst postinst prerm postrm; do
        [ ! -f "$templates/$script" ] || install -m 0755 "$templates/$script" "$stage/DEBIAN/$script"
    done
    [ ! -f "$templates/conffiles" ] || install -m 0644 "$templates/conffiles" "$stage/DEBIAN/conffiles"
    # md5sums of every file but the conffiles, for `dpkg --verify` and debsums.
    (
        cd "$stage"
        find . -path ./DEBIAN -prune -o -type f -printf '%P\n' | LC_ALL=C sort \
            | { if [ -f DEBIAN/conffiles ]; then grep -vxF -f <(sed 's#^/##' DEBIAN/conffiles); else cat; fi; } \
            | xargs -r -d '\n' md5sum >DEBIAN/md5sums
    ) || die "cannot write the md5sums of $pkg"
    chmod 0644 "$stage/DEBIAN/md5sums"
    local compress=()
    # dpkg-deb's default (xz) for release; gzip -1 keeps a debug package's test quick.
    [ "$profile" = release ] || compress=(-Zgzip "-z$level")
    dpkg-deb --root-owner-group ${compress[@]+"${compress[@]}"} --build "$stage" "$out/.$file.tmp" >/dev/null \
        || die "dpkg-deb could not build $file (above): check deploy/debian/$pkg/"
    mv -f "$out/.$file.tmp" "$out/$file"
}

man_and_completions_into() { # STAGE
    local stage=$1 page
    install -d -m 0755 "$stage/usr/share/man/man1" "$stage/usr/share/bash-completion/completions" \
        "$stage/usr/share/zsh/vendor-completions" "$stage/usr/share/fish/vendor_completions.d"
    for page in "$gen/man1"/*.1; do
        gzip -9n -c "$page" >"$stage/usr/share/man/man1/$(basename "$page").gz"
    done
    chmod 0644 "$stage/usr/share/man/man1"/*.gz
    install -m 0644 "$gen/completions/bash" "$stage/usr/share/bash-completion/completions/flotilla"
    install -m 0644 "$gen/completions/zsh" "$stage/usr/share/zsh/vendor-completions/_flotilla"
    install -m 0644 "$gen/completions/fish" "$stage/usr/share/fish/vendor_completions.d/flotilla.fish"
}

cli_deb() { # ARCH
    local a=$1 stage="$work/deb-flotilla-$1"
    install -d -m 0755 "$stage/usr/bin" "$stage/lib/systemd/system" "$stage/usr/share/doc/flotilla"
    install -m 0755 "$(bin_dir_of "$a")/flotilla" "$stage/usr/bin/flotilla"
    packaged_unit deploy/systemd/flotilla-serve.service "$stage/lib/systemd/system/flotilla-serve.service"
    man_and_completions_into "$stage"
    gzip -9n -c README.md >"$stage/usr/share/doc/flotilla/README.md.gz"
    chmod 0644 "$stage/usr/share/doc/flotilla/README.md.gz"
    deb flotilla "$a" "$stage"
}

agent_deb() { # ARCH
    local a=$1 stage="$work/deb-flotilla-agent-$1"
    # /etc/flotilla stays 0755: a coordinator's flotilla-serve (user flotilla)
    # reads its config and fleet directory under it. The bundle itself is 0600.
    install -d -m 0755 "$stage/usr/bin" "$stage/lib/systemd/system" "$stage/etc/flotilla" \
        "$stage/usr/share/doc/flotilla-agent"
    install -m 0755 "$(bin_dir_of "$a")/flotilla-agent" "$stage/usr/bin/flotilla-agent"
    packaged_unit deploy/systemd/flotilla-agent.service "$stage/lib/systemd/system/flotilla-agent.service"
    install -m 0644 deploy/agent.toml.example "$stage/etc/flotilla/agent.toml"
    gzip -9n -c deploy/README.md >"$stage/usr/share/doc/flotilla-agent/README.md.gz"
    chmod 0644 "$stage/usr/share/doc/flotilla-agent/README.md.gz"
    deb flotilla-agent "$a" "$stage"
}

for a in "${arches[@]}"; do
    log "packaging $version for $a into $out"
    cli_tarball "$a"
    agent_tarball "$a"
    cli_deb "$a"
    agent_deb "$a"
done

# --- Checksums and summary ----------------------------------------------------------

cd "$out"
shopt -s nullglob
artifacts=(
    "flotilla-$version"-*-linux.tar.gz
    "flotilla-agent-$version"-*-linux.tar.gz
    "flotilla_${deb_version}"_*.deb
    "flotilla-agent_${deb_version}"_*.deb
)
shopt -u nullglob
[ ${#artifacts[@]} -gt 0 ] || die "no artifacts of version $version in $out"
sha256sum -- "${artifacts[@]}" >.SHA256SUMS.tmp || die "sha256sum failed in $out"
mv -f .SHA256SUMS.tmp SHA256SUMS

printf 'Flotilla %s (%s) in %s:\n' "$version" "$profile" "$out"
for f in "${artifacts[@]}" SHA256SUMS; do
    printf '  %-50s %8s\n' "$f" "$(numfmt --to=iec --suffix=B "$(stat -c %s "$f")")"
done
