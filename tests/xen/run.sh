#!/bin/bash
# The firewall on real Xen: fetch Debian's Xen 4.17 + a Linux dom0 (no host
# install but libxen-dev), build the image (`cargo xtask image`), our dom0
# tools (qubesdb-daemon/-read/-write..., qrexec-daemon, qrexec-client) with
# `--features xen` (real vchan through libxenvchan), the minimal hello guest
# and vchan-peer (against Debian's libxenvchan), pack the dom0 initramfs,
# boot Xen under QEMU (TCG with emulated AMD-V), run dom0-test.sh in dom0 and
# check its verdict. Run as root from a fresh clone:  tests/xen/run.sh
# Env: LAB (work dir, default /tmp/qubes-fw-xen), TIMEOUT (s, default 900:
# two firewall passes, ours and Qubes' C daemons; ~500 s at load 30).
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
export LAB=${LAB:-${TMPDIR:-/tmp}/qubes-fw-xen}
t0=$SECONDS
"$HERE/fetch.sh"
(cd "$ROOT" && cargo xtask image)
IMAGE=${CARGO_TARGET_DIR:-$ROOT/target}/xen/qubes-firewall.elf
OUT=$LAB/out; mkdir -p "$OUT"
gcc -c -DPOWEROFF -DLONGMODE "$HERE/hello-pvh.S" -o "$OUT/hello-pvh-lm.o"
ld -m elf_x86_64 -z max-page-size=4096 --no-warn-rwx-segments -T "$HERE/hello-pvh.ld" -o "$OUT/hello-pvh-lm.elf" "$OUT/hello-pvh-lm.o"
R=$LAB/root
# Our dom0 tools on real Xen: feature `xen` links libxenvchan (headers and
# .so from the host's libxen-dev). Own target dir: these binaries must not
# replace the socket-vchan ones other builds and tests use.
if [ ! -e /usr/include/libxenvchan.h ]; then
    apt-get update >/dev/null || true
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends libxen-dev >/dev/null
fi
DT=${CARGO_TARGET_DIR:-$ROOT/target}/xen-dom0
(cd "$ROOT" && cargo build --target-dir "$DT" -p qubesdb -p qrexec --features qubesdb/xen,qrexec/xen --bins)
(cd "$ROOT" && cargo build --release --target-dir "$DT" -p xenvchan --features xen --example xenvchan-loopback)
strip -o "$OUT/xenvchan-loopback" "$DT/release/examples/xenvchan-loopback"
TOOLS=("$OUT/xenvchan-loopback:/usr/bin/xenvchan-loopback")
for b in qubesdb-daemon qubesdb-read qubesdb-write qubesdb-rm qubesdb-list qubesdb-multiread qubesdb-watch qrexec-daemon qrexec-client; do
    strip -o "$OUT/$b" "$DT/debug/$b"
    TOOLS+=("$OUT/$b:/usr/bin/$b")
done
gcc -O2 -Wall -o "$OUT/vchan-peer" "$HERE/vchan-peer.c" -I"$R/usr/include" \
    -L"$R/usr/lib/x86_64-linux-gnu" -Wl,-rpath-link,"$R/usr/lib/x86_64-linux-gnu" -lxenvchan -lxenevtchn
gcc -O2 -Wall -o "$OUT/guestmem" "$HERE/guestmem.c" -I"$R/usr/include" \
    -L"$R/usr/lib/x86_64-linux-gnu" -Wl,-rpath-link,"$R/usr/lib/x86_64-linux-gnu" -lxenctrl
gcc -O2 -Wall -static -o "$OUT/dns-answer" "$HERE/dns-answer.c"
# A Linux client qube (the Debian kernel as a PV domU with a busybox
# initramfs, client-init) whose traffic crosses the firewall's netback,
# rules and NAT to dom0 (ping, HTTP, DNS, a denied port, rule change,
# detach/attach, uplink re-attach).
KVER=$(cat "$LAB/img/kver")
C=$LAB/client-initramfs; rm -rf "$C"; mkdir -p "$C"/{bin,proc,sys,dev,tmp}
cp /bin/busybox "$C/bin/busybox"
# iperf3 (Debian's, unpacked by fetch.sh) with its libraries, for the
# throughput check through the firewall; dom0 gets it through
# build-initramfs.sh's own library copying.
mkdir -p "$C/lib64" "$C/lib/x86_64-linux-gnu"
cp "$R/usr/bin/iperf3" "$C/bin/iperf3"
LD_LIBRARY_PATH=$R/usr/lib/x86_64-linux-gnu:$R/lib/x86_64-linux-gnu ldd "$R/usr/bin/iperf3" |
    awk '/=>/ {print $3}' | while read -r l; do cp -L "$l" "$C/lib/x86_64-linux-gnu/"; done
cp -L /lib64/ld-linux-x86-64.so.2 "$C/lib64/"
for a in sh ip ping insmod mount sleep cat echo poweroff wget sha256sum nslookup grep sed awk cut tr wc rm mkdir timeout; do ln -s busybox "$C/bin/$a"; done
mknod -m 600 "$C/dev/console" c 5 1   # the kernel opens it for init's stdio before devtmpfs
cp "$R/lib/modules/$KVER/kernel/drivers/net/xen-netfront.ko" "$C/"
cp "$HERE/client-init" "$C/init"; chmod +x "$C/init"
(cd "$C" && find . | cpio -o -H newc --quiet | gzip -1) > "$OUT/client-initrd.gz"
# Qubes' own C dom0 programs (BACKEND_VMM=xen, built from ../shared/reference
# at test time) for the qubes-c pass (dom0-qubes-c.sh); QUBES_C=0 skips it.
QC_FILES=()
if [ "${QUBES_C:-1}" != 0 ]; then
    QC=$("$HERE/build-qubes-c.sh" | tail -1)
    for b in qubesdb-daemon qubesdb-cmd qrexec-daemon qrexec-client; do QC_FILES+=("$QC/bin/$b:/usr/lib/qubes-c/$b"); done
    QC_FILES+=("$HERE/dom0-qubes-c.sh:/guest/dom0-qubes-c.sh")
fi
"$HERE/build-initramfs.sh" "$IMAGE:/guest/qubes-firewall.elf" "$LAB/img/vmlinuz:/guest/vmlinuz" "$OUT/client-initrd.gz:/guest/client-initrd.gz" "$OUT/hello-pvh-lm.elf:/guest/hello-pvh-lm.elf" \
    "$OUT/vchan-peer:/usr/bin/vchan-peer" "$OUT/guestmem:/usr/bin/guestmem" "$OUT/dns-answer:/usr/bin/dns-answer" "$R/usr/bin/iperf3:/usr/bin/iperf3" "$ROOT/xen-config/qubes-firewall.cfg:/guest/qubes-firewall.cfg" \
    "$HERE/dom0-test.sh:/guest/test.sh" "${TOOLS[@]}" "${QC_FILES[@]}" >/dev/null
echo "run.sh: prepared in $((SECONDS - t0)) s; image $(stat -c %s "$IMAGE") bytes"
export LOG=$OUT/serial.log
TIMEOUT=${TIMEOUT:-900} "$HERE/boot.sh" tcg || true
grep -E 'QFW-(CHECK|MEASURE|INFO|STATUS)|QFW-CONSOLE.*(QubesDB and qrexec|heap in use|stack high-water)|\(d[0-9]+\) TRAP |Triple fault' "$LOG" | sed 's/^\[ *[0-9.]*\] //' || true
# A CPU exception in a firewall (traps.rs): name the code at its addresses.
if grep -q ') TRAP rip' "$LOG"; then "$HERE/symbolize.sh" "$LOG" "${IMAGE%.elf}.map" || true; fi
echo "run.sh: total $((SECONDS - t0)) s, serial log $LOG"
if grep -q 'QFW-RESULT PASS' "$LOG"; then echo "run.sh: PASS"; else echo "run.sh: FAIL"; exit 1; fi
