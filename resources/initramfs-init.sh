#!/bin/busybox sh
# /init of the default guest's initramfs: mount the pseudo file systems,
# report what the guest sees, then give a shell on the console (or power off
# with zvmm.poweroff on the kernel command line).
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev 2>/dev/null
echo "zvmm-guest: booted $(uname -r) with $(grep -c ^processor /proc/cpuinfo) CPUs"
echo "zvmm-guest: memory $(awk '/MemTotal/{print $2, $3}' /proc/meminfo)"
echo "zvmm-guest: cmdline $(cat /proc/cmdline)"
if grep -q zvmm.poweroff /proc/cmdline; then
    poweroff -f
fi
echo "zvmm-guest: busybox shell; 'poweroff -f' ends the VM"
exec setsid cttyhack sh
