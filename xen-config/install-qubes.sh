#!/bin/bash
# Installs the Rust Qubes firewall unikernel as a firewall qube. Run in dom0,
# from the release directory made by `cargo xtask dist` (copied to dom0).
#
# usage:
#   install-qubes.sh [--name VM] [--netvm NETVM] [--kernel KERNEL]
#                    [--label LABEL] [--switch-clients FROM] [RELEASE_DIR]
#   install-qubes.sh [--name VM] --rollback LINUX_FIREWALL
#
#   RELEASE_DIR   holds vmlinuz, initramfs and SHA256SUMS (default: the
#                 directory of this script)
#   --name        the firewall qube (default: sys-firewall-rs)
#   --netvm       its uplink (default: sys-net)
#   --kernel      the kernel directory under /var/lib/qubes/vm-kernels/
#                 (default: qubes-firewall)
#   --label       the label of a new qube (default: green)
#   --switch-clients FROM
#                 after installing, start the firewall qube and move every
#                 qube whose netvm is FROM (and default_netvm, if it is
#                 FROM) to it
#   --rollback LINUX_FIREWALL
#                 move every client of the firewall qube (and default_netvm)
#                 back to LINUX_FIREWALL, then shut the firewall qube down;
#                 installs nothing
#
# What an install does, in this order, and nothing else:
# 1. checks the release: vmlinuz and initramfs present, listed in
#    SHA256SUMS with matching hashes, vmlinuz an ELF file; the qvm tools
#    present; the qube, if it exists, was made by this script (its kernel is
#    KERNEL) and is neither the UpdateVM nor the ClockVM. Any failure stops
#    here, before anything is changed.
# 2. copies vmlinuz and initramfs into /var/lib/qubes/vm-kernels/KERNEL/
#    when they differ from what is there (an upgrade replaces them, the old
#    kernel stays as vmlinuz.previous);
# 3. creates the qube if it does not exist, then sets each property and
#    feature below that does not already have its value (a second run of
#    the same release changes nothing).
#
# The environment variable QUBES_KERNELS_DIR replaces
# /var/lib/qubes/vm-kernels (the project's tests use it with fake qvm tools).
set -euo pipefail

fail() {
    echo "install-qubes.sh: $*" >&2
    exit 1
}

VM=sys-firewall-rs
NETVM=sys-net
KERNEL=qubes-firewall
LABEL=green
SWITCH_FROM=
ROLLBACK_TO=
RELEASE=
while [ $# -gt 0 ]; do
    case "$1" in
        --name) VM=${2:?--name needs a qube name}; shift 2 ;;
        --netvm) NETVM=${2:?--netvm needs a qube name}; shift 2 ;;
        --kernel) KERNEL=${2:?--kernel needs a directory name}; shift 2 ;;
        --label) LABEL=${2:?--label needs a label}; shift 2 ;;
        --switch-clients) SWITCH_FROM=${2:?--switch-clients needs a qube name}; shift 2 ;;
        --rollback) ROLLBACK_TO=${2:?--rollback needs a qube name}; shift 2 ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'; exit 0 ;;
        -*) fail "unknown option $1 (see --help)" ;;
        *) [ -z "$RELEASE" ] || fail "more than one release directory given"; RELEASE=$1; shift ;;
    esac
done
case "$KERNEL" in
    ''|*/*|.|..) fail "--kernel must be a plain directory name, not '$KERNEL'" ;;
esac
[ -n "$VM" ] || fail "--name must not be empty"

for tool in qvm-check qvm-prefs qvm-features qvm-create qvm-ls qvm-start \
    qvm-shutdown qubes-prefs sha256sum; do
    command -v "$tool" >/dev/null || fail "$tool not found: run this in dom0 of Qubes OS 4.2"
done

# The clients of a qube: every other qube whose netvm is $1.
clients_of() {
    qvm-ls --raw-data --fields NAME,NETVM | while IFS='|' read -r name netvm; do
        if [ "$netvm" = "$1" ] && [ "$name" != "$1" ]; then
            echo "$name"
        fi
    done
}

# Moves default_netvm (if it is $1) and then every client of $1 still on it
# to $2. Qubes that follow default_netvm move with it and stay following it.
move_clients() {
    local from=$1 to=$2 client
    if [ "$(qubes-prefs default_netvm)" = "$from" ]; then
        echo "install-qubes.sh: default_netvm $from -> $to"
        qubes-prefs default_netvm "$to"
    fi
    for client in $(clients_of "$from"); do
        [ "$client" = "$to" ] && continue
        echo "install-qubes.sh: $client: netvm $from -> $to"
        qvm-prefs "$client" netvm "$to"
    done
}

if [ -n "$ROLLBACK_TO" ]; then
    [ -n "$SWITCH_FROM" ] && fail "--rollback and --switch-clients exclude each other"
    [ -n "$RELEASE" ] && fail "--rollback installs nothing: give no release directory"
    [ "$ROLLBACK_TO" != "$VM" ] || fail "--rollback must name another (Linux) firewall qube than $VM"
    qvm-check --quiet "$VM" 2>/dev/null || fail "no qube named $VM"
    qvm-check --quiet "$ROLLBACK_TO" 2>/dev/null || fail "no qube named $ROLLBACK_TO to roll back to"
    [ "$(qvm-prefs "$ROLLBACK_TO" provides_network)" = True ] \
        || fail "$ROLLBACK_TO does not provide network (qvm-prefs $ROLLBACK_TO provides_network)"
    qvm-start --skip-if-running "$ROLLBACK_TO"
    move_clients "$VM" "$ROLLBACK_TO"
    qvm-shutdown --wait "$VM"
    echo "install-qubes.sh: rolled back to $ROLLBACK_TO; $VM is shut down (remove it with: qvm-remove $VM)"
    exit 0
fi

# 1. Checks; nothing is changed until they all pass.
RELEASE=${RELEASE:-$(dirname "$0")}
[ -d "$RELEASE" ] || fail "release directory $RELEASE not found"
for file in SHA256SUMS vmlinuz initramfs; do
    [ -f "$RELEASE/$file" ] || fail "$RELEASE/$file is missing: copy the whole release directory to dom0"
done
for file in vmlinuz initramfs; do
    listed=$(awk -v f="$file" '$2 == f || $2 == "*" f { print $1 }' "$RELEASE/SHA256SUMS")
    [ -n "$listed" ] || fail "$file is not listed in $RELEASE/SHA256SUMS"
    actual=$(sha256sum < "$RELEASE/$file" | cut -d' ' -f1)
    [ "$listed" = "$actual" ] \
        || fail "$RELEASE/$file: SHA-256 $actual, but SHA256SUMS says $listed: the copy is damaged or not this release"
done
[ "$(head -c 4 "$RELEASE/vmlinuz" | od -An -tx1 | tr -d ' \n')" = 7f454c46 ] \
    || fail "$RELEASE/vmlinuz is not an ELF image"

EXISTS=no
if qvm-check --quiet "$VM" 2>/dev/null; then
    EXISTS=yes
    current_kernel=$(qvm-prefs "$VM" kernel)
    [ "$current_kernel" = "$KERNEL" ] \
        || fail "$VM exists with kernel '$current_kernel', not '$KERNEL': it was not made by this script; choose another --name"
fi
for role in updatevm clockvm; do
    [ "$(qubes-prefs "$role")" != "$VM" ] \
        || fail "$VM is the $role: that must stay a Linux qube (qubes-prefs $role OTHER_QUBE)"
done
qvm-check --quiet "$NETVM" 2>/dev/null || fail "no qube named $NETVM for --netvm"
if [ -n "$SWITCH_FROM" ]; then
    [ "$SWITCH_FROM" != "$VM" ] || fail "--switch-clients must name the old firewall, not $VM"
    qvm-check --quiet "$SWITCH_FROM" 2>/dev/null || fail "no qube named $SWITCH_FROM for --switch-clients"
fi

# 2. The kernel files.
DIR=${QUBES_KERNELS_DIR:-/var/lib/qubes/vm-kernels}/$KERNEL
as_root() {
    if [ "$(id -u)" = 0 ] || [ -w "$(dirname "$DIR")" ]; then "$@"; else sudo "$@"; fi
}
if [ ! -d "$DIR" ]; then
    as_root mkdir -p "$DIR"
fi
if ! cmp -s "$RELEASE/vmlinuz" "$DIR/vmlinuz"; then
    if [ -f "$DIR/vmlinuz" ]; then
        as_root cp -p "$DIR/vmlinuz" "$DIR/vmlinuz.previous"
        echo "install-qubes.sh: upgrade: the old kernel is kept as $DIR/vmlinuz.previous"
    fi
    as_root install -m 0644 "$RELEASE/vmlinuz" "$DIR/vmlinuz.new"
    as_root mv -f "$DIR/vmlinuz.new" "$DIR/vmlinuz"
    echo "install-qubes.sh: installed $DIR/vmlinuz"
fi
if ! cmp -s "$RELEASE/initramfs" "$DIR/initramfs"; then
    as_root install -m 0644 "$RELEASE/initramfs" "$DIR/initramfs"
fi

# 3. The qube.
if [ "$EXISTS" = no ]; then
    qvm-create --class StandaloneVM --label "$LABEL" \
        --property virt_mode=pvh \
        --property kernel="$KERNEL" \
        --property kernelopts= \
        --property memory=32 \
        --property maxmem=32 \
        --property vcpus=1 \
        --property provides_network=True \
        --property netvm="$NETVM" \
        "$VM"
    echo "install-qubes.sh: created $VM"
fi
set_pref() {
    if [ "$(qvm-prefs "$VM" "$1")" != "$2" ]; then
        qvm-prefs "$VM" "$1" "$2"
        echo "install-qubes.sh: $VM: $1 = '$2'"
    fi
}
set_pref virt_mode pvh
set_pref kernel "$KERNEL"
set_pref kernelopts ''
set_pref memory 32
set_pref maxmem 32
set_pref vcpus 1
set_pref provides_network True
set_pref netvm "$NETVM"
set_pref audiovm ''
set_pref default_dispvm ''
set_feature() {
    if [ "$(qvm-features "$VM" "$1" || true)" != "$2" ]; then
        qvm-features "$VM" "$1" "$2"
        echo "install-qubes.sh: $VM: feature $1 = $2"
    fi
}
set_feature qubes-firewall 1
set_feature no-default-kernelopts 1
set_feature skip-update 1

if [ -n "$SWITCH_FROM" ]; then
    qvm-start --skip-if-running "$VM"
    move_clients "$SWITCH_FROM" "$VM"
fi
echo "install-qubes.sh: done. Start it with: qvm-start $VM (after an upgrade: qvm-shutdown --wait $VM; qvm-start $VM)"
echo "install-qubes.sh: keep the UpdateVM and the ClockVM on Linux qubes (qubes-prefs updatevm / clockvm)"
