#!/usr/bin/env bash
# Runs every zvmm check: formatting, clippy, and all tests (unit, loader,
# ACPI validated by iasl, end-to-end with the probe guest under zvmm and
# QEMU, and the Debian kernel's early boot). Installs what it needs first.
set -euo pipefail
cd "$(dirname "$0")/.."
bash resources/install-host-deps.sh
bash resources/fetch-debian-assets.sh
cargo fmt --all -- --check
(cd resources/probe && cargo fmt -- --check)
cargo clippy --workspace --all-targets -- -D warnings
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --quiet
cargo test --workspace --no-fail-fast
bash fuzz/run.sh "${FUZZ_SECONDS:-20}"
