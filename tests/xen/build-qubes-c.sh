#!/bin/bash
# Build Qubes' own C dom0 programs for real Xen, from the reference tarballs
# (never copied into this project): libvchan-xen (qubes-core-vchan-xen,
# against Debian's libxen: xenctrl, xenstore, libxenvchan), qubesdb-daemon and
# qubesdb-cmd (qubes-core-qubesdb, without systemd: the daemon forks itself
# and its parent returns once the vchan server is offered), libqrexec-utils,
# qrexec-daemon and qrexec-client (qubes-core-qrexec, BACKEND_VMM=xen).
# Output: $QC/bin/{qubesdb-daemon,qubesdb-cmd,qrexec-daemon,qrexec-client}
# with RUNPATH $QC/lib, and $QC/lib/*.so.* (build-initramfs.sh copies the
# libraries it resolves with ldd into the initramfs's /lib).
# Env: LAB (default /tmp/qubes-fw-xen), QC (default $LAB/qubes-c), REF
# (default ../shared/reference from the project root).
# Usage: tests/xen/build-qubes-c.sh   (prints $QC on its last line)
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
LAB=${LAB:-${TMPDIR:-/tmp}/qubes-fw-xen}
QC=${QC:-$LAB/qubes-c}
REF=${REF:-$ROOT/../shared/reference}
for t in qubes-core-vchan-xen qubes-core-qubesdb qubes-core-qrexec; do
    [ -e "$REF/$t.tar.gz" ] || { echo "build-qubes-c.sh: $REF/$t.tar.gz missing (set REF to the folder of Qubes' reference tarballs)" >&2; exit 1; }
done
stamp=$(cat "$REF"/qubes-core-{vchan-xen,qubesdb,qrexec}.tar.gz "$0" | sha256sum | cut -c1-16)
if [ -e "$QC/.built-$stamp" ]; then echo "$QC"; exit 0; fi
need=""
[ -e /usr/include/libxenvchan.h ] || need="$need libxen-dev"
command -v pkg-config >/dev/null || need="$need pkg-config"
command -v make >/dev/null || need="$need make"
command -v gcc >/dev/null || need="$need gcc"
if [ -n "$need" ]; then
    apt-get update >/dev/null || true
    # shellcheck disable=SC2086
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $need >/dev/null
fi
rm -rf "$QC"; mkdir -p "$QC"/{src,bin,lib,include/vchan-xen,lib/pkgconfig}
S=$QC/src
for t in qubes-core-vchan-xen qubes-core-qubesdb qubes-core-qrexec; do
    mkdir -p "$S/$t"; tar xzf "$REF/$t.tar.gz" -C "$S/$t" --strip-components=1
done
J=-j2
# libvchan-xen
make $J -C "$S/qubes-core-vchan-xen/vchan" -f Makefile.linux PREFIX="$QC" LIBDIR="$QC/lib" INCLUDEDIR="$QC/include" all >/dev/null
make -C "$S/qubes-core-vchan-xen/vchan" -f Makefile.linux PREFIX="$QC" LIBDIR="$QC/lib" INCLUDEDIR="$QC/include" install >/dev/null
export PKG_CONFIG_PATH=$QC/lib/pkgconfig
export LDFLAGS="-L$QC/lib -Wl,-rpath,$QC/lib"
# qubesdb
make $J -C "$S/qubes-core-qubesdb/daemon" SYSTEMD=0 BACKEND_VMM=xen >/dev/null
make $J -C "$S/qubes-core-qubesdb/client" BACKEND_VMM=xen >/dev/null
cp "$S/qubes-core-qubesdb/daemon/qubesdb-daemon" "$S/qubes-core-qubesdb/client/qubesdb-cmd" "$QC/bin/"
cp -P "$S/qubes-core-qubesdb/client"/libqubesdb.so* "$QC/lib/"
# qrexec (libqrexec-utils, daemon: qrexec-daemon, qrexec-client)
make $J -C "$S/qubes-core-qrexec/libqrexec" BACKEND_VMM=xen >/dev/null
cp -P "$S/qubes-core-qrexec/libqrexec"/libqrexec-utils.so* "$QC/lib/"
LDFLAGS="$LDFLAGS -L$S/qubes-core-qrexec/libqrexec" make $J -C "$S/qubes-core-qrexec/daemon" BACKEND_VMM=xen >/dev/null
cp "$S/qubes-core-qrexec/daemon/qrexec-daemon" "$S/qubes-core-qrexec/daemon/qrexec-client" "$QC/bin/"
LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-} ldd "$QC/bin"/* | grep -q 'not found' && { echo "build-qubes-c.sh: unresolved libraries:" >&2; ldd "$QC/bin"/* >&2; exit 1; }
touch "$QC/.built-$stamp"
echo "$QC"
