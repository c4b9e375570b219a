#!/usr/bin/env bash
# Builds a minimal root file system to share with a zvmm guest over
# virtio-fs: Debian's static busybox with its applet links, /etc/passwd,
# /etc/group, /etc/hostname and an /sbin/init that prints
# "zvmm-container: up <kernel release>".
#   make-rootfs.sh DIR
# DIR must be new, empty or made by this script before (it holds
# .zvmm-rootfs); running it again refreshes busybox and its links and keeps
# every other file as it is.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source-path=SCRIPTDIR source=common.sh
. "$here/common.sh"

if (($# != 1)); then
    echo "usage: make-rootfs.sh DIR" >&2
    exit 2
fi
root=$1
marker="$root/.zvmm-rootfs"
if [[ -e "$root" && ! -d "$root" ]]; then
    die "$root exists and is not a directory"
fi
if [[ -d "$root" && ! -e "$marker" && -n "$(ls -A "$root")" ]]; then
    die "$root is not empty and was not made by make-rootfs.sh; give a new or empty directory"
fi
busybox=$(cached_busybox)
mkdir -p "$root"
echo "made by zvmm's resources/container/make-rootfs.sh" >"$marker"
mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,etc,proc,sys,dev,run,tmp,root,var/tmp}
chmod 1777 "$root/tmp" "$root/var/tmp"
chmod 700 "$root/root"
install_busybox "$busybox" "$root"

# Writes stdin to $1 under the root unless the file is already there.
keep_or_write() {
    if [[ -e "$root/$1" ]]; then
        cat >/dev/null
    else
        cat >"$root/$1"
    fi
}
keep_or_write etc/passwd <<<"root::0:0:root:/root:/bin/sh"
keep_or_write etc/group <<<"root:x:0:"
keep_or_write etc/hostname <<<"zvmm"
keep_or_write sbin/init <"$here/rootfs-init.sh"
chmod 755 "$root/sbin/init"
echo "make-rootfs: root file system ready in $root"
