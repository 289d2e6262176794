#!/bin/bash
# Build the dom0 initramfs: busybox + xl/xenstored/xenconsoled + libs + Xen
# kernel modules + /init.  Extra files (guest kernels, test scripts, test
# programs) are added with:  build-initramfs.sh [SRC:DEST ...]; the shared
# libraries of extra dynamic executables (e.g. vchan-peer, which needs
# libxenvchan) are copied too. Adapted from shared/xenlab/build-initramfs.sh.
set -euo pipefail
LAB=${LAB:-${TMPDIR:-/tmp}/qubes-fw-xen}
HERE=$(cd "$(dirname "$0")" && pwd)
R=$LAB/root
KVER=$(cat "$LAB/img/kver")
I=$LAB/initramfs
OUT=${OUT:-$LAB/out/initrd.cpio.gz}
rm -rf "$I"; mkdir -p "$I"/{bin,sbin,etc/xen/scripts,proc,sys,dev,tmp,run,var/lib/xen,var/lib/xenstored,var/log/xen,var/lock,guest,lib/modules/$KVER,usr/lib/xen-4.17/bin,usr/bin}
ln -s ../run "$I/var/run"
cp /bin/busybox "$I/bin/busybox"
for a in $(/bin/busybox --list); do [ -e "$I/bin/$a" ] || ln -s busybox "$I/bin/$a"; done
XB=$R/usr/lib/xen-4.17/bin
BINS="$XB/xl $XB/xenstored $XB/xen-init-dom0 $XB/xenconsoled $XB/xenstore-control $R/usr/bin/xenstore"
for b in $BINS; do cp "$b" "$I/usr/lib/xen-4.17/bin/"; done
for t in xl xenstored xenconsoled xen-init-dom0 xenstore-control; do ln -sf /usr/lib/xen-4.17/bin/$t "$I/usr/bin/$t"; done
for t in xenstore-ls xenstore-read xenstore-write xenstore-list xenstore-rm xenstore-exists xenstore-watch xenstore-chmod; do
    ln -sf /usr/lib/xen-4.17/bin/xenstore "$I/usr/bin/$t"; done
cp "$R/etc/xen/xl.conf" "$I/etc/xen/"
# shared libraries: resolve with the host loader against the unpacked libs
export LD_LIBRARY_PATH=$R/usr/lib/x86_64-linux-gnu:$R/lib/x86_64-linux-gnu
EXTRA_BINS=""
for spec in "$@"; do src=${spec%%:*}; head -c 4 "$src" | grep -q ELF && ldd "$src" >/dev/null 2>&1 && EXTRA_BINS="$EXTRA_BINS $src"; done
for b in $BINS $EXTRA_BINS; do ldd "$b"; done | awk '/=>/ {print $3} /^\t\/lib64/ {print $1}' | sort -u | while read -r l; do
    [ -e "$l" ] || { echo "missing lib $l" >&2; exit 1; }
    mkdir -p "$I/lib/x86_64-linux-gnu"; cp -L "$l" "$I/lib/x86_64-linux-gnu/"
done
mkdir -p "$I/lib64"; cp -L /lib64/ld-linux-x86-64.so.2 "$I/lib64/"
cp -L /lib/x86_64-linux-gnu/libgcc_s.so.1 "$I/lib/x86_64-linux-gnu/"   # dlopen()ed by pthread_cancel in xl
# kernel modules (none of these are built in on Debian's 6.1 kernel); order = deps first
M=$R/lib/modules/$KVER/kernel
for m in drivers/xen/xen-evtchn drivers/xen/xen-privcmd drivers/xen/xenfs/xenfs drivers/xen/xen-gntdev \
         drivers/xen/xen-gntalloc drivers/block/xen-blkback/xen-blkback drivers/net/xen-netback/xen-netback \
         net/llc/llc net/802/stp net/bridge/bridge; do
    cp "$M/$m.ko" "$I/lib/modules/$KVER/"; echo "$(basename $m).ko" >> "$I/lib/modules/$KVER/load-order"
done
cp "$HERE/init" "$I/init"; chmod +x "$I/init"
cp "$HERE/vif-mini" "$I/etc/xen/scripts/vif-mini"; chmod +x "$I/etc/xen/scripts/vif-mini"
for spec in "$@"; do src=${spec%%:*}; dst=${spec#*:}; mkdir -p "$I/$(dirname "$dst")"; cp "$src" "$I/$dst"; done
mkdir -p "$(dirname "$OUT")"
(cd "$I" && find . | cpio -o -H newc --quiet | gzip -1) > "$OUT"
ls -l "$OUT"; du -sh "$I"
