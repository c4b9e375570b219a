#!/bin/busybox sh
# shellcheck shell=dash
# /init of zvmm's container initramfs (build-initramfs.sh): loads the
# virtio-fs modules, mounts the virtiofs tag named by root= (default vroot)
# at /newroot and switch_roots into its /sbin/init (or init=).
#
# Kernel command line: root=TAG, rootfstype=TYPE (default virtiofs),
# rootdelay=SECS (retry the mount that long, default 10), ro/rw, init=PATH.
# When the root cannot be mounted it prints one line and then: with panic=N,
# exits so that the kernel panics and follows panic= (N<0 reboots at once,
# N>0 after N seconds, 0 hangs); else with zvmm.poweroff, powers off; else
# runs a rescue shell on the console.
#
# Sourced by another shell (the tests), it only defines the functions: the
# boot runs as PID 1 only.

# Sets root_tag, root_fstype, root_delay, root_mode, new_init and on_fail
# (panic, poweroff or shell) from the kernel command line $1.
zvmm_parse_cmdline() {
    local arg
    root_tag=vroot root_fstype=virtiofs root_delay=10 root_mode=rw
    new_init=/sbin/init on_fail=shell
    set -f
    for arg in $1; do
        case "$arg" in
        root=?*) root_tag=${arg#root=} ;;
        rootfstype=?*) root_fstype=${arg#rootfstype=} ;;
        rootdelay=*) root_delay=${arg#rootdelay=} ;;
        init=?*) new_init=${arg#init=} ;;
        ro | rw) root_mode=$arg ;;
        panic=*) on_fail=panic ;;
        zvmm.poweroff) [ "$on_fail" = panic ] || on_fail=poweroff ;;
        esac
    done
    set +f
    case "$root_delay" in
    '' | *[!0-9]*)
        echo "zvmm-initramfs: ignoring rootdelay=$root_delay (not a whole number of seconds)"
        root_delay=10
        ;;
    esac
}

# Names the root for messages: "virtiofs tag vroot".
zvmm_root_name() {
    if [ "$root_fstype" = virtiofs ]; then
        echo "virtiofs tag $root_tag"
    else
        echo "$root_fstype root $root_tag"
    fi
}

# Loads the modules listed, in dependency order, in modules.zvmm-order.
zvmm_load_modules() {
    local dir ko err
    dir=/lib/modules/$(uname -r)
    if [ ! -f "$dir/modules.zvmm-order" ]; then
        [ -z "$(ls /lib/modules 2>/dev/null)" ] ||
            echo "zvmm-initramfs: no modules for kernel $(uname -r) (built for $(ls /lib/modules))"
        return 0
    fi
    while read -r ko; do
        err=$(insmod "$dir/$ko" 2>&1) || echo "zvmm-initramfs: cannot load $ko: $err"
    done <"$dir/modules.zvmm-order"
}

# Whether the kernel knows file system type $1.
zvmm_have_fs() {
    grep -qw "$1" /proc/filesystems
}

# Why the root did not mount, from mount's message $1 and the kernel's.
zvmm_mount_reason() {
    if [ "$root_fstype" = virtiofs ] && dmesg | grep -qF "virtio-fs: tag <$root_tag> not found"; then
        echo "no virtio-fs device has this tag"
    elif ! zvmm_have_fs "$root_fstype"; then
        echo "the kernel has no $root_fstype file system"
    else
        echo "${1##*: }"
    fi
}

# Mounts the root at $1, retrying once a second for $root_delay seconds;
# prints why and fails if it never mounts.
zvmm_mount_root() {
    local tries=0 err
    while ! err=$(mount -t "$root_fstype" -o "$root_mode" "$root_tag" "$1" 2>&1); do
        if [ "$tries" -ge "$root_delay" ]; then
            echo "zvmm-initramfs: cannot mount $(zvmm_root_name): $(zvmm_mount_reason "$err")"
            return 1
        fi
        tries=$((tries + 1))
        sleep 1
    done
}

# Moves /dev, /proc and /sys to the same places under $1.
zvmm_move_mounts() {
    local dir
    for dir in dev proc sys; do
        if [ -d "$1/$dir" ] || mkdir "$1/$dir"; then
            mount --move "/$dir" "$1/$dir"
        else
            echo "zvmm-initramfs: the root has no /$dir; unmounting it"
            umount -l "/$dir"
        fi
    done
}

# What happens after a failure; see the top of this file.
zvmm_fail() {
    case "$on_fail" in
    panic)
        echo "zvmm-initramfs: exiting; the kernel panics and follows panic="
        exit 1
        ;;
    poweroff) poweroff -f ;;
    *)
        echo "zvmm-initramfs: rescue shell; 'poweroff -f' ends the VM"
        setsid cttyhack sh
        poweroff -f
        ;;
    esac
}

zvmm_main() {
    mount -t proc proc /proc
    mount -t sysfs sys /sys
    mount -t devtmpfs dev /dev 2>/dev/null
    zvmm_parse_cmdline "$(cat /proc/cmdline)"
    zvmm_load_modules
    zvmm_mount_root /newroot || zvmm_fail
    if [ ! -L "/newroot$new_init" ] && [ ! -x "/newroot$new_init" ]; then
        echo "zvmm-initramfs: $new_init is not an executable in the $(zvmm_root_name)"
        umount /newroot
        zvmm_fail
    fi
    zvmm_move_mounts /newroot
    exec switch_root /newroot "$new_init"
}

if [ "$$" = 1 ]; then
    zvmm_main
fi
