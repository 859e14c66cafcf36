# Shared by both guest inits (busybox sh). Sourced, not executed.
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/root TERM=dumb

uptime_s() { read -r up _ < /proc/uptime; echo "$up"; }

mount_basics() {
    mount -t proc proc /proc
    mount -t sysfs sysfs /sys
    mount -t devtmpfs devtmpfs /dev
    mount -t securityfs securityfs /sys/kernel/security 2>/dev/null
    mkdir -p /dev/pts /dev/shm /run /tmp /var/tmp /mnt
    mount -t devpts devpts /dev/pts 2>/dev/null
    mount -t tmpfs tmpfs /tmp
    mount -t tmpfs tmpfs /run
    ln -sf /proc/self/fd /dev/fd 2>/dev/null
}

# Modules in dependency order, computed on the host from modules.dep.
load_modules() {
    kver=$(uname -r)
    read -r cmdline < /proc/cmdline
    while read -r ko; do
        [ -n "$ko" ] || continue
        name=${ko##*/}; name=${name%.ko}; name=$(echo "$name" | tr - _)
        # The kernel may have loaded it already through request_module (busybox modprobe).
        [ -d "/sys/module/$name" ] && continue
        # The kernel ignores `module.param=value` for modules it did not build in: modprobe
        # passes them on at load (kmod, busybox). insmod does not, so pass them here.
        if ! err=$(insmod "/lib/modules/$kver/$ko" $(cmdline_options "$name" "$cmdline") 2>&1)
        then
            echo "MODULE-FAIL $ko $err"
        fi
    done < /etc/modules.load
}

cmdline_options() { # $1 = module name (with _), $2 = the kernel command line
    for word in $2; do
        case "$word" in "$1".*=*) echo "${word#"$1".}" ;; esac
    done
}

driver_of() { # $1 = sysfs device dir
    if [ -L "$1/driver" ]; then basename "$(readlink "$1/driver")"; else echo -; fi
}

device_snapshot() {
    for d in /sys/bus/pci/devices/*; do echo "$d $(driver_of "$d")"; done
    ls /sys/block /sys/class/net /sys/bus/usb/devices 2>/dev/null
}

has_nvme_controller() {
    grep -qx '0x010802' /sys/bus/pci/devices/*/class 2>/dev/null
}

# Wait until the set of bound drivers, block devices, interfaces and USB devices stops
# changing (1 s without change), at most $1 seconds. An nvme controller's namespaces show
# up after its asynchronous reset work, so wait for one of them too.
settle() {
    max_quarters=$(( $1 * 4 )); n=0; stable=0; prev=
    while [ "$n" -lt "$max_quarters" ]; do
        cur=$(device_snapshot | md5sum)
        if [ "$cur" = "$prev" ]; then stable=$((stable + 1)); else stable=0; fi
        prev=$cur
        if [ "$stable" -ge 4 ]; then
            if ! has_nvme_controller || ls -d /sys/block/nvme* >/dev/null 2>&1; then
                return 0
            fi
        fi
        sleep 0.25; n=$((n + 1))
    done
    echo "SETTLE-TIMEOUT after $1 s"
    return 1
}

# The second kernel's initramfs (/boot/second.cpio.gz: the cached base plus this run's
# /second-scenario.sh) and command line ($SECOND_CMDLINE), for whoever loads it: stage 1, or a
# scenario that loads it the way a bootloader does. Needs MARKER and SECOND_APPEND.
prepare_second() {
    if [ -f /boot/second-extra.cpio.gz ]; then
        cat /boot/second-base.cpio.gz /boot/second-extra.cpio.gz > /boot/second.cpio.gz
    else
        cp /boot/second-base.cpio.gz /boot/second.cpio.gz
    fi
    SECOND_CMDLINE="console=ttyS0 panic=-1 loglevel=6 PETITKEXEC_SECOND=$MARKER $SECOND_APPEND"
    export SECOND_CMDLINE
}
