#!/usr/bin/env bash
# Builds zvmm's fuzz targets (cargo-fuzz, libFuzzer with AddressSanitizer
# and debug assertions, on the nightly pinned in rust-toolchain.toml) and
# runs each for SECONDS (default 30), then prints a table of executions,
# executions per second, corpus size and crashes. Fails if any target
# crashed, leaked, timed out or ran out of memory; the input is kept in
# fuzz/artifacts/TARGET/ (copy it into fuzz/regressions/TARGET/ with the
# fix, so every later run replays it first).
#
#   bash fuzz/run.sh               # every target, 30 s each (CI)
#   bash fuzz/run.sh 3600          # every target, an hour each
#   FUZZ_TARGET=virtio_block bash fuzz/run.sh 36000
#
# Corpora grow in fuzz/corpus/TARGET/ (not committed) from the committed
# seeds in fuzz/seeds/TARGET/; dictionaries are fuzz/dict/TARGET.dict.
set -euo pipefail
cd "$(dirname "$0")"
seconds="${1:-${FUZZ_SECONDS:-30}}"
only="${FUZZ_TARGET:-}"
rss_limit_mb="${FUZZ_RSS_LIMIT_MB:-2560}"
timeout_s="${FUZZ_TIMEOUT:-20}"

command -v cargo-fuzz >/dev/null || {
    echo "fuzz/run.sh: cargo-fuzz is missing: bash resources/install-host-deps.sh installs it" >&2
    exit 1
}
targets=()
for file in fuzz_targets/*.rs; do
    name="$(basename "$file" .rs)"
    [[ -z "$only" || "$only" == "$name" ]] && targets+=("$name")
done
if ((${#targets[@]} == 0)); then
    echo "fuzz/run.sh: no target named '$only' (see fuzz/fuzz_targets/)" >&2
    exit 1
fi

# Largest input per target: images need room, the rest stays small.
max_len() {
    case "$1" in
    kernel_image | disk_image) echo 262144 ;;
    *) echo 65536 ;;
    esac
}

build_start=$(date +%s)
if [[ -n "$only" ]]; then
    cargo fuzz build --fuzz-dir . --debug-assertions --codegen-units 16 "$only"
else
    cargo fuzz build --fuzz-dir . --debug-assertions --codegen-units 16
fi
echo "fuzz/run.sh: built in $(($(date +%s) - build_start)) s" >&2
bin_dir="target/x86_64-unknown-linux-gnu/release"

rows=()
failed=()
for target in "${targets[@]}"; do
    corpus="corpus/$target"
    artifacts="artifacts/$target"
    log="artifacts/$target.log"
    mkdir -p "$corpus" "$artifacts"
    dirs=("$corpus")
    for extra in "seeds/$target" "regressions/$target"; do
        [[ -d "$extra" ]] && dirs+=("$extra")
    done
    args=(-max_total_time="$seconds" -rss_limit_mb="$rss_limit_mb" -timeout="$timeout_s"
        -max_len="$(max_len "$target")" -print_final_stats=1
        -artifact_prefix="$artifacts/")
    [[ -f "dict/$target.dict" ]] && args+=(-dict="dict/$target.dict")
    echo "fuzz/run.sh: $target for ${seconds} s" >&2
    status=0
    "$bin_dir/$target" "${args[@]}" "${dirs[@]}" >"$log" 2>&1 || status=$?
    execs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' | tail -1)
    rate=$(grep -o 'stat::average_exec_per_sec: *[0-9]*' "$log" | grep -o '[0-9]*$' | tail -1)
    corp=$(grep -o 'corp: [0-9]*' "$log" | grep -o '[0-9]*$' | tail -1)
    found=$(find "$artifacts" -type f | wc -l)
    if ((status != 0 || found > 0)); then
        failed+=("$target")
        echo "fuzz/run.sh: $target failed (exit $status); the end of $log:" >&2
        tail -n 40 "$log" >&2
    fi
    rows+=("$(printf '%-16s %12s %8s %8s %8s' "$target" "${execs:-?}" "${rate:-?}" "${corp:-?}" "$found")")
done

printf '%-16s %12s %8s %8s %8s\n' target executions exec/s corpus crashes
printf '%s\n' "${rows[@]}"
if ((${#failed[@]})); then
    echo "fuzz/run.sh: FAILED: ${failed[*]} (inputs in fuzz/artifacts/)" >&2
    exit 1
fi
echo "fuzz/run.sh: ${#targets[@]} targets, ${seconds} s each, no crash"
