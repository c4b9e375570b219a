#!/bin/sh
# /sbin/init of a zvmm container root (make-rootfs.sh): says it is up, then
# powers off when the kernel command line has zvmm.poweroff, else runs a
# shell on the console and powers off when it exits.
[ -e /proc/self ] || mount -t proc proc /proc
[ -d /sys/kernel ] || mount -t sysfs sys /sys
[ -e /dev/null ] || mount -t devtmpfs dev /dev
hostname -F /etc/hostname 2>/dev/null
echo "zvmm-container: up $(uname -r)"
if ! grep -qwF zvmm.poweroff /proc/cmdline; then
    echo "zvmm-container: shell on the console; exit it to power off"
    setsid cttyhack sh -l
fi
# The root is shared with the host: flush what the guest wrote first.
sync
poweroff -f
