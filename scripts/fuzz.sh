#!/usr/bin/env bash
# Runs livemirror's cargo-fuzz targets (nbd-frontend/fuzz) for a bounded time
# each and fails if any of them finds a crash, a leak, an out-of-memory or a
# timeout. .ci/run calls this script; it is also fine to run by hand.
#
#   scripts/fuzz.sh [SECONDS] [TARGET...]
#
# SECONDS (default 60) is per target; TARGETs default to all of them
# (`cargo fuzz list`). Each target starts from a temporary copy of its committed
# seed corpus (nbd-frontend/fuzz/corpus/TARGET), so the run never modifies the
# checkout; new corpus entries are thrown away. Crash inputs go to
# nbd-frontend/fuzz/artifacts/TARGET/ (ignored by git) with the run's full log
# (fuzz.log); their paths and hex dumps are printed. Reproduce one with
#   cd nbd-frontend/fuzz && cargo +nightly fuzz run TARGET artifacts/TARGET/crash-...
#
# With FUZZ_CORPUS_OUT=DIR set, each target's final corpus (seeds plus what
# the run found) is copied to DIR/TARGET, e.g. for a CI cache or for
# `cargo fuzz coverage TARGET DIR/TARGET`.
#
# Installs nothing. Needs a nightly toolchain and cargo-fuzz, e.g.
#   rustup toolchain install nightly --profile minimal
#   cargo install cargo-fuzz --version 0.13.2 --locked
# plus a C++ compiler (libfuzzer-sys builds libFuzzer from source).
#
# Exit status: 0 no findings, 1 a target found something, 2 setup/build error.
set -euo pipefail

seconds="${1:-60}"
if ! [[ "$seconds" =~ ^[0-9]+$ ]] || [ "$seconds" -lt 1 ]; then
    echo "usage: $0 [SECONDS] [TARGET...]" >&2
    exit 2
fi
shift $(( $# > 0 ? 1 : 0 ))

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
fuzz_dir="$root/nbd-frontend/fuzz"
cd "$fuzz_dir"

if ! cargo +nightly --version >/dev/null 2>&1; then
    echo "fuzz.sh: no nightly toolchain (rustup toolchain install nightly --profile minimal)" >&2
    exit 2
fi
if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
    echo "fuzz.sh: cargo-fuzz is not installed (cargo install cargo-fuzz --version 0.13.2 --locked)" >&2
    exit 2
fi

if [ $# -gt 0 ]; then
    targets=("$@")
else
    mapfile -t targets < <(cargo +nightly fuzz list)
fi
if [ ${#targets[@]} -eq 0 ]; then
    echo "fuzz.sh: no fuzz targets found" >&2
    exit 2
fi

work="$(mktemp -d "${TMPDIR:-/tmp}/livemirror-fuzz.XXXXXX")"
trap 'rm -rf "$work"' EXIT

# Build everything first so that a compile error is not mistaken for a finding.
echo "== building fuzz targets: ${targets[*]}"
for t in "${targets[@]}"; do
    if ! cargo +nightly fuzz build "$t" >"$work/build-$t.log" 2>&1; then
        cat "$work/build-$t.log" >&2
        echo "fuzz.sh: building fuzz target $t failed" >&2
        exit 2
    fi
done

failed=()
for t in "${targets[@]}"; do
    corpus="$work/corpus-$t"
    mkdir -p "$corpus"
    if [ -d "corpus/$t" ]; then
        cp -R "corpus/$t/." "$corpus/"
    fi
    log="$work/$t.log"
    echo "== fuzzing $t for ${seconds}s (seeds: $(find "$corpus" -type f | wc -l))"
    status=0
    cargo +nightly fuzz run "$t" "$corpus" -- \
        -max_total_time="$seconds" \
        -malloc_limit_mb=64 \
        -rss_limit_mb=1024 \
        -timeout=30 \
        -print_final_stats=1 \
        >"$log" 2>&1 || status=$?
    if [ -n "${FUZZ_CORPUS_OUT:-}" ]; then
        mkdir -p "$FUZZ_CORPUS_OUT/$t"
        cp -R "$corpus/." "$FUZZ_CORPUS_OUT/$t/"
    fi
    # Progress lines are long and many; show the interesting part.
    grep -E '^#[0-9]+[[:space:]]+(INITED|DONE)|^stat::|^Done [0-9]+ runs' "$log" || true
    if [ "$status" -ne 0 ]; then
        failed+=("$t")
        echo "!! fuzz target $t FAILED (exit $status):"
        # The panic message or sanitizer report, without the long backtraces.
        grep -E -A3 "panicked at" "$log" | grep -v '^ *#[0-9]' || true
        grep -E '^(==[0-9]+== ?ERROR|SUMMARY):' "$log" || true
        mkdir -p "artifacts/$t"
        cp "$log" "artifacts/$t/fuzz.log"
        echo "!! full log: $fuzz_dir/artifacts/$t/fuzz.log"
        # libFuzzer prints "Test unit written to <path>" for every saved input.
        grep -o 'Test unit written to .*' "$log" | sed 's/^Test unit written to //' | sort -u |
            while read -r artifact; do
                case "$artifact" in /*) ;; *) artifact="$fuzz_dir/$artifact" ;; esac
                echo "!! artifact: $artifact"
                echo "   reproduce: (cd $fuzz_dir && cargo +nightly fuzz run $t $artifact)"
                if [ -f "$artifact" ] && [ "$(wc -c <"$artifact")" -le 16384 ]; then
                    od -An -tx1 -v "$artifact" | tr -d ' \n'
                    echo
                fi
            done
    fi
done

if [ ${#failed[@]} -gt 0 ]; then
    echo "fuzz.sh: findings in: ${failed[*]}" >&2
    exit 1
fi
echo "fuzz.sh: no findings in ${targets[*]} (${seconds}s each)"
