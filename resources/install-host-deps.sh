#!/usr/bin/env bash
# Installs what building and testing zvmm needs on a Debian/Ubuntu host:
# the Rust target for the probe guest, QEMU (the reference peer),
# qemu-img (disk image tests), ACPICA (iasl validates our ACPI tables),
# cpio (initramfs), lzop (LZO extraction tests), sfdisk (partitioned
# images for zvmm image info), mtools (reads back the
# cloud-init seeds zvmm builds), gdisk, dosfstools and e2fsprogs (the
# EFI disks of resources/vm-disk/), ping and ip (network tests), Python with
# openapi-schema-validator (REST answers against cloud-hypervisor's spec),
# virtiofsd (the
# virtio-fs backend zvmm starts for --fs; built from crates.io at a pinned
# version, with its Debian build dependencies), and a pinned nightly with
# cargo-fuzz (fuzz/run.sh). Idempotent.
set -euo pipefail
missing=()
command -v qemu-system-x86_64 >/dev/null || missing+=(qemu-system-x86)
command -v qemu-img >/dev/null || missing+=(qemu-utils)
command -v iasl >/dev/null || missing+=(acpica-tools)
command -v cpio >/dev/null || missing+=(cpio)
command -v lzop >/dev/null || missing+=(lzop)
command -v sfdisk >/dev/null || missing+=(fdisk)
command -v mtype >/dev/null || missing+=(mtools)
command -v sgdisk >/dev/null || missing+=(gdisk)
command -v mkfs.fat >/dev/null || missing+=(dosfstools)
command -v debugfs >/dev/null || missing+=(e2fsprogs)
{ command -v ping && command -v ip; } >/dev/null || missing+=(iputils-ping iproute2)
python3 -c 'import venv, ensurepip' 2>/dev/null || missing+=(python3 python3-venv)
command -v c++ >/dev/null || missing+=(g++) # libfuzzer-sys builds libFuzzer (fuzz/)
VIRTIOFSD_VERSION=1.14.0
virtiofsd_bin="${CARGO_HOME:-$HOME/.cargo}/bin/virtiofsd"
have_virtiofsd() {
    "$virtiofsd_bin" --version 2>/dev/null | grep -qx "virtiofsd $VIRTIOFSD_VERSION"
}
if ! have_virtiofsd; then
    for pkg in libseccomp-dev libcap-ng-dev pkg-config; do
        dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
    done
fi
if ((${#missing[@]})); then
    echo "install-host-deps: apt-get install ${missing[*]}" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi
if ! rustup target list --installed | grep -qx x86_64-unknown-none; then
    rustup target add x86_64-unknown-none
fi
for component in rustfmt clippy; do
    rustup component list --installed | grep -q "^$component" || rustup component add "$component"
done
if ! have_virtiofsd; then
    echo "install-host-deps: cargo install virtiofsd --version $VIRTIOFSD_VERSION --locked" >&2
    cargo install --quiet virtiofsd --version "$VIRTIOFSD_VERSION" --locked
fi
# The fuzz targets (fuzz/run.sh) build with cargo-fuzz on the nightly
# pinned in fuzz/rust-toolchain.toml (libFuzzer needs -Zsanitizer).
fuzz_nightly="$(sed -n 's/^channel = "\(.*\)"/\1/p' "$(dirname "$0")/../fuzz/rust-toolchain.toml")"
CARGO_FUZZ_VERSION=0.13.2
if ! rustup toolchain list | grep -q "^$fuzz_nightly-"; then
    echo "install-host-deps: rustup toolchain install $fuzz_nightly" >&2
    rustup toolchain install "$fuzz_nightly" --profile minimal
fi
if ! cargo fuzz --version 2>/dev/null | grep -qx "cargo-fuzz $CARGO_FUZZ_VERSION"; then
    echo "install-host-deps: cargo install cargo-fuzz --version $CARGO_FUZZ_VERSION --locked" >&2
    cargo install --quiet cargo-fuzz --version "$CARGO_FUZZ_VERSION" --locked
fi
# openapi-schema-validator (PyPI) checks the REST answers against
# cloud-hypervisor's OpenAPI spec in the cloud-hypervisor agent tests.
ch_api_venv="$(cd "$(dirname "$0")/.." && pwd)/target/ch-api-venv"
if ! "$ch_api_venv/bin/python3" -c 'import openapi_schema_validator, yaml' 2>/dev/null; then
    echo "install-host-deps: pip install openapi-schema-validator pyyaml into $ch_api_venv" >&2
    python3 -m venv "$ch_api_venv"
    "$ch_api_venv/bin/pip" install --quiet openapi-schema-validator==0.9.0 pyyaml
fi
