#!/usr/bin/env bash
# Runs every cargo-fuzz target for SECONDS each and prints, per target, the
# executions and the crashes, then the total; exits non-zero on any crash.
#
# Usage: fuzz/run.sh SECONDS [TARGET...]
#
#   SECONDS   wall-clock time per target (libFuzzer -max_total_time)
#   TARGET    only these targets (default: all of fuzz/Cargo.toml's [[bin]]s)
#
# Environment:
#   FUZZ_SANITIZER  address (default, cargo-fuzz's default) or none (about
#                   twice the executions; the workspace forbids unsafe code)
#   FUZZ_ARGS       extra libFuzzer flags, e.g. "-max_len=65536 -jobs=2"
#
# Needs the nightly toolchain (installed with rustup when missing) and
# cargo-fuzz (`cargo install cargo-fuzz --locked` when missing), a C++
# compiler for libFuzzer, and the network the first time (crates).
#
# Inputs: fuzz/seeds/<target>/ (committed) and fuzz/regressions/<target>/
# (committed, inputs that once failed) are read every run; the working corpus
# fuzz/corpus/<target>/ grows and is kept between runs (not committed).
# Output: fuzz/logs/<UTC time>/ holds one log per target, summary.md (the
# table, for docs/reliability.md) and crashes.txt (the failing inputs, which
# libFuzzer writes to fuzz/artifacts/<target>/).
set -euo pipefail

cd "$(dirname "$0")/.."
root=$(pwd)

die() { echo "fuzz/run.sh: $*" >&2; exit 2; }

[ $# -ge 1 ] || die "usage: fuzz/run.sh SECONDS [TARGET...]"
secs=$1
shift
[[ $secs =~ ^[0-9]+$ ]] && [ "$secs" -gt 0 ] || die "SECONDS must be a positive integer, not '$secs'"
sanitizer=${FUZZ_SANITIZER:-address}
read -r -a extra <<<"${FUZZ_ARGS:-}"

# Targets that need the agent's `repository::fuzzing` facade.
internal_targets=(pack_format index_file)

all_targets=()
while IFS= read -r t; do all_targets+=("$t"); done < <(
    awk '/^\[\[bin\]\]/ { bin = 1; next } bin && /^name *=/ { gsub(/.*= *"|".*/, ""); print; bin = 0 }' fuzz/Cargo.toml
)
[ ${#all_targets[@]} -gt 0 ] || die "no [[bin]] targets found in fuzz/Cargo.toml"
if [ $# -gt 0 ]; then
    targets=("$@")
    for t in "${targets[@]}"; do
        printf '%s\n' "${all_targets[@]}" | grep -qx -- "$t" || die "unknown target '$t' (have: ${all_targets[*]})"
    done
else
    targets=("${all_targets[@]}")
fi

# --- toolchain -----------------------------------------------------------------
if ! rustup toolchain list 2>/dev/null | grep -q '^nightly'; then
    echo "installing the nightly toolchain"
    rustup toolchain install nightly --profile minimal
fi
if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
    echo "installing cargo-fuzz"
    cargo install cargo-fuzz --locked
fi

# --- which targets this tree can build --------------------------------------------
features=()
skipped=()
if grep -q 'pub mod fuzzing' agent/src/repository.rs 2>/dev/null; then
    features=(--features agent-internals)
else
    keep=()
    for t in "${targets[@]}"; do
        if printf '%s\n' "${internal_targets[@]}" | grep -qx -- "$t"; then
            skipped+=("$t")
        else
            keep+=("$t")
        fi
    done
    targets=(${keep[@]+"${keep[@]}"})
    if [ ${#skipped[@]} -gt 0 ]; then
        echo "skipping ${skipped[*]}: flotilla_agent::repository::fuzzing does not exist yet (git apply fuzz/agent-facade.patch)"
    fi
fi
[ ${#targets[@]} -gt 0 ] || die "no target left to run"

# Build options: the same for build and run, so `run` finds everything built.
# -O release with -a debug assertions (overflow checks on, as in tests).
opts=(--fuzz-dir fuzz --release --debug-assertions --sanitizer "$sanitizer" ${features[@]+"${features[@]}"})

stamp=$(date -u +%Y%m%dT%H%M%SZ)
out="fuzz/logs/$stamp"
mkdir -p "$out"
scratch=$(mktemp -d "${TMPDIR:-/tmp}/flotilla-fuzz.XXXXXX")
trap 'rm -rf "$scratch"' EXIT
export FLOTILLA_FUZZ_TMP="$scratch"

echo "building the targets (sanitizer: $sanitizer); the first build takes a while"
if ! cargo +nightly fuzz build "${opts[@]}" 2>&1 | tee "$out/build.log" | tail -3; then
    die "build failed; see $out/build.log"
fi

# --- run ---------------------------------------------------------------------------
total=0
crashed=0
rows=()
: >"$out/crashes.txt"
for t in "${targets[@]}"; do
    mkdir -p "fuzz/corpus/$t" "fuzz/seeds/$t" "fuzz/regressions/$t" "fuzz/artifacts/$t"
    log="$out/$t.log"
    marker="$out/.start-$t"
    touch "$marker"
    sleep 1 # artifacts must be strictly newer than the marker
    echo "fuzzing $t for ${secs}s"
    set +e
    cargo +nightly fuzz run "${opts[@]}" "$t" \
        "fuzz/corpus/$t" "fuzz/seeds/$t" "fuzz/regressions/$t" -- \
        -max_total_time="$secs" -print_final_stats=1 -timeout=30 -rss_limit_mb=2048 \
        ${extra[@]+"${extra[@]}"} >"$log" 2>&1
    rc=$?
    set -e

    # Executions: libFuzzer's final stats, else "Done N runs", else the last "#N" status line.
    execs=$(awk '/^stat::number_of_executed_units:/ { n = $2 } END { print n + 0 }' "$log")
    [ "$execs" -gt 0 ] || execs=$(sed -n 's/^Done \([0-9][0-9]*\) runs.*/\1/p' "$log" | tail -1)
    [ -n "$execs" ] && [ "$execs" -gt 0 ] || execs=$(sed -n 's/^#\([0-9][0-9]*\)[[:space:]].*/\1/p' "$log" | tail -1)
    execs=${execs:-0}

    found=()
    while IFS= read -r f; do found+=("$f"); done < <(
        find "fuzz/artifacts/$t" -type f -newer "$marker" \
            \( -name 'crash-*' -o -name 'oom-*' -o -name 'timeout-*' -o -name 'leak-*' \) | sort
    )
    rm -f "$marker"
    n=${#found[@]}
    if [ "$rc" -ne 0 ] && [ "$n" -eq 0 ]; then
        # Failed without an input to show (build error, harness self-check, ...).
        n=1
        echo "$t: exit $rc without an artifact; see $log" >>"$out/crashes.txt"
    fi
    for f in "${found[@]}"; do echo "$t: $root/$f" >>"$out/crashes.txt"; done
    [ "$n" -eq 0 ] || crashed=$((crashed + n))
    total=$((total + execs))
    rows+=("$t $execs $n")
done

# --- report ----------------------------------------------------------------------------
rev=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
dirty=$(git status --porcelain 2>/dev/null | grep -q . && echo "+changes" || true)
{
    echo "Fuzzing: \`fuzz/run.sh $secs\`, $(date -u +%Y-%m-%d), commit $rev$dirty, sanitizer $sanitizer, $(nproc) cores."
    echo
    echo "| target | executions | crashes |"
    echo "|---|---:|---:|"
    for r in "${rows[@]}"; do
        read -r t e c <<<"$r"
        echo "| \`$t\` | $e | $c |"
    done
    echo "| **total** | **$total** | **$crashed** |"
    if [ ${#skipped[@]} -gt 0 ]; then
        echo
        echo "Not run (they need the agent facade, fuzz/agent-facade.patch): ${skipped[*]}."
    fi
} >"$out/summary.md"

echo
printf '%-18s %15s %8s\n' target executions crashes
for r in "${rows[@]}"; do
    read -r t e c <<<"$r"
    printf '%-18s %15s %8s\n' "$t" "$e" "$c"
done
printf '%-18s %15s %8s\n' total "$total" "$crashed"
echo
echo "logs and summary.md: $out/"

if [ "$crashed" -gt 0 ]; then
    echo
    echo "failing inputs (also in $out/crashes.txt):"
    sed 's/^/  /' "$out/crashes.txt"
    echo
    echo "reproduce: cargo +nightly fuzz run ${opts[*]} TARGET INPUT"
    echo "keep as a regression: cp INPUT fuzz/regressions/TARGET/ (see fuzz/README.md)"
    exit 1
fi
