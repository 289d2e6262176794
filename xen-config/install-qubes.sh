#!/bin/bash
# Install the Rust Qubes firewall unikernel as a firewall qube, in dom0.
#
# usage (in dom0):  install-qubes.sh IMAGE [VM_NAME [NETVM]]
#   IMAGE    the image built by `cargo xtask image` (target/xen/qubes-firewall.elf),
#            copied to dom0 first, e.g.
#            qvm-run --pass-io BUILD_VM 'cat src/qubes-firewall/target/xen/qubes-firewall.elf' > qubes-firewall.elf
#   VM_NAME  the qube to create (default: sys-firewall-rs)
#   NETVM    its uplink (default: sys-net)
#
# The steps are those qubes-mirage-firewall documents for its unikernel: the
# image becomes the kernel of /var/lib/qubes/vm-kernels/<kernel>/, with an
# empty initramfs, and the qube is a PVH StandaloneVM with 32 MiB that
# provides network, has the qubes-firewall feature (so dom0 writes the rules
# to its QubesDB) and no default kernel options.
set -euo pipefail
IMAGE=${1:?usage: install-qubes.sh IMAGE [VM_NAME [NETVM]]}
VM=${2:-sys-firewall-rs}
NETVM=${3:-sys-net}
KERNEL=qubes-firewall
DIR=/var/lib/qubes/vm-kernels/$KERNEL
sudo mkdir -p "$DIR"
sudo install -m 0644 "$IMAGE" "$DIR/vmlinuz"
gzip -n9 < /dev/null | sudo tee "$DIR/initramfs" > /dev/null
if ! qvm-check "$VM" >/dev/null 2>&1; then
    qvm-create \
        --property kernel=$KERNEL \
        --property kernelopts='' \
        --property memory=32 \
        --property maxmem=32 \
        --property netvm="$NETVM" \
        --property provides_network=True \
        --property vcpus=1 \
        --property virt_mode=pvh \
        --label=green \
        --class StandaloneVM \
        "$VM"
fi
qvm-prefs "$VM" kernel $KERNEL
qvm-prefs "$VM" kernelopts ''
qvm-prefs "$VM" memory 32
qvm-prefs "$VM" maxmem 32
qvm-prefs "$VM" virt_mode pvh
qvm-features "$VM" qubes-firewall 1
qvm-features "$VM" no-default-kernelopts 1
echo "Installed $DIR/vmlinuz; start it with: qvm-start $VM"
echo "Then point client qubes at it:  qvm-prefs CLIENT netvm $VM"
