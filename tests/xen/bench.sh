#!/bin/bash
# `cargo xtask bench xen` (or run directly, as root): our firewall image
# against a Linux sys-firewall in one Xen-under-QEMU run (see README.md,
# "The benchmark"). Prepares what run.sh prepares (fetch.sh, the image, our
# dom0 tools with --features xen), plus:
#  - Debian's nftables and its libraries, unpacked into $LAB/root the way
#    fetch.sh unpacks iperf3;
#  - the Linux sys-firewall's nftables rules, generated on this host in a
#    scratch network namespace by Qubes' own firewall code: Qubes'
#    qubes-ipv4/ipv6/antispoof.nft and qubesagent/firewall.py from
#    qubes-core-agent-linux (REF, default ../shared/reference; unpacked
#    under $LAB, never into the project) driven by the project's
#    tests/qubes-box/linuxfw/qubes_firewall_driver.py with client
#    10.137.0.10's QubesDB rules (Qubes' default: accept), then `nft list
#    ruleset`;
#  - the Linux firewall's initramfs (linuxfw-init, busybox, nft, xenstore,
#    the netfilter/netback/netfront modules) and the clients' (iperf3,
#    bench-client-init);
# then boots the lab with dom0-bench.sh as dom0's test and prints its
# QFW-BENCH lines. Env: LAB (default /tmp/qubes-fw-xen-bench), SECS (10),
# UDP_RATE (iperf3 -b, 20M), ROUNDS (1), FLOWTABLE (0; 1 adds the
# qubes-nat-accel flowtable that Qubes' vif-route-qubes adds, which stalled
# every TCP connection through the Linux firewall in this lab),
# LOSE_OURS_AT (0; N reboots our firewall halfway through run N, a test
# of the restart after a lost firewall), LINUX_VCPUS (2, as Qubes gives a
# sys-firewall; 1 gives the Linux firewall our one vCPU, an experiment, not
# the comparison the goal names), TIMEOUT (s, 1500), REF.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
export LAB=${LAB:-${TMPDIR:-/tmp}/qubes-fw-xen-bench}
REF=${REF:-$ROOT/../shared/reference}
t0=$SECONDS
command -v nft >/dev/null || { apt-get update >/dev/null || true; DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends nftables >/dev/null; }
command -v python3 >/dev/null || { echo "bench.sh: python3 is needed (Qubes' firewall.py generates the Linux firewall's rules)" >&2; exit 1; }
"$HERE/fetch.sh"
R=$LAB/root
NFT_PKGS="nftables libnftables1 libedit2 libgmp10 libjansson4 libmnl0 libnftnl11 libxtables12 libbsd0 libmd0"
(cd "$LAB/debs" && missing=() && for p in $NFT_PKGS; do ls "${p}"_*.deb >/dev/null 2>&1 || missing+=("$p"); done &&
    { [ ${#missing[@]} = 0 ] || apt-get download "${missing[@]}"; } &&
    for p in $NFT_PKGS; do dpkg-deb -x "$(ls "${p}"_*.deb | head -1)" "$R"; done)
(cd "$ROOT" && cargo xtask image)
IMAGE=${CARGO_TARGET_DIR:-$ROOT/target}/xen/qubes-firewall.elf
OUT=$LAB/out; mkdir -p "$OUT"
if [ ! -e /usr/include/libxenvchan.h ]; then
    apt-get update >/dev/null || true
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends libxen-dev >/dev/null
fi
DT=${CARGO_TARGET_DIR:-$ROOT/target}/xen-dom0
(cd "$ROOT" && cargo build --target-dir "$DT" -p qubesdb -p qrexec --features qubesdb/xen,qrexec/xen --bins)
TOOLS=()
for b in qubesdb-daemon qubesdb-read qubesdb-write qrexec-daemon qrexec-client; do
    strip -o "$OUT/$b" "$DT/debug/$b"
    TOOLS+=("$OUT/$b:/usr/bin/$b")
done
# The lab's price of a hypercall (QFW-BENCH lab line): the minimal PVH guest
# without and with 100,000 xen_version hypercalls, and as many from a dom0
# process (PV).
HC=100000
gcc -c -DPOWEROFF -DLONGMODE "$HERE/hello-pvh.S" -o "$OUT/hello-pvh-lm.o"
gcc -c -DPOWEROFF -DLONGMODE -DHYPERLOOP=$HC "$HERE/hello-pvh.S" -o "$OUT/hello-pvh-loop.o"
for h in lm loop; do
    ld -m elf_x86_64 -z max-page-size=4096 --no-warn-rwx-segments -T "$HERE/hello-pvh.ld" -o "$OUT/hello-pvh-$h.elf" "$OUT/hello-pvh-$h.o"
    TOOLS+=("$OUT/hello-pvh-$h.elf:/guest/hello-pvh-$h.elf")
done
gcc -O2 -Wall -o "$OUT/dom0-hypercalls" "$HERE/dom0-hypercalls.c" -I"$R/usr/include" \
    -L"$R/usr/lib/x86_64-linux-gnu" -Wl,-rpath-link,"$R/usr/lib/x86_64-linux-gnu" -lxenctrl
TOOLS+=("$OUT/dom0-hypercalls:/usr/bin/dom0-hypercalls")
KVER=$(cat "$LAB/img/kver")
export LD_LIBRARY_PATH=$R/usr/lib/x86_64-linux-gnu:$R/lib/x86_64-linux-gnu
# libs DEST BINARY...: copy the binaries' shared libraries (and the loader).
libs() { local d=$1; shift; mkdir -p "$d/lib64" "$d/lib/x86_64-linux-gnu"
    ldd "$@" | awk '/=>/ {print $3}' | sort -u | while read -r l; do cp -L "$l" "$d/lib/x86_64-linux-gnu/"; done
    cp -L /lib64/ld-linux-x86-64.so.2 "$d/lib64/"; }

# The clients: busybox, iperf3, netfront, bench-client-init.
C=$LAB/bench-client; rm -rf "$C"; mkdir -p "$C"/{bin,proc,sys,dev,tmp}
cp /bin/busybox "$C/bin/busybox"
cp "$R/usr/bin/iperf3" "$C/bin/iperf3"; libs "$C" "$R/usr/bin/iperf3"
for a in sh ip ping insmod mount sleep cat echo sed awk timeout tail; do ln -s busybox "$C/bin/$a"; done
mknod -m 600 "$C/dev/console" c 5 1
cp "$R/lib/modules/$KVER/kernel/drivers/net/xen-netfront.ko" "$C/"
cp "$HERE/bench-client-init" "$C/init"; chmod +x "$C/init"
(cd "$C" && find . | cpio -o -H newc --quiet | gzip -1) > "$OUT/bench-client-initrd.gz"

# The Linux firewall's rules, by Qubes' own code in a scratch namespace.
mkdir -p "$LAB/ref"; tar -xzf "$REF/qubes-core-agent-linux.tar.gz" -C "$LAB/ref"
Q=$LAB/ref/qubes-core-agent-linux
NS=qfwbench-gen-$$
ip netns add "$NS"
trap 'ip netns del "$NS" 2>/dev/null || true' EXIT
for f in qubes-ipv4.nft qubes-ipv6.nft qubes-antispoof.nft; do ip netns exec "$NS" nft -f "$Q/network/$f"; done
gen=$(printf 'set /qubes-firewall/10.137.0.10/policy\tdrop\nset /qubes-firewall/10.137.0.10/0000\taction=accept\nset /qubes-firewall/10.137.0.10\t\nset /connected-ips\t10.137.0.10\nset /connected-ips6\t\napply 10.137.0.10\n' |
    QUBES_DNS="10.139.1.1 10.139.1.2" ip netns exec "$NS" python3 "$ROOT/tests/qubes-box/linuxfw/qubes_firewall_driver.py" "$Q")
[ "$gen" = "$(printf 'ready\ndone')" ] || { echo "bench.sh: Qubes' firewall code reported: $gen" >&2; exit 1; }
ip netns exec "$NS" nft list ruleset > "$OUT/linuxfw-ruleset.nft"
ip netns del "$NS"; trap - EXIT
grep -q "table ip qubes-firewall" "$OUT/linuxfw-ruleset.nft" || { echo "bench.sh: no qubes-firewall table generated" >&2; exit 1; }

# The Linux firewall: busybox, nft, xenstore-read/-write, the modules.
F=$LAB/linuxfw; rm -rf "$F"; mkdir -p "$F"/{bin,sbin,proc,sys,dev,tmp,lib/modules/"$KVER"}
cp /bin/busybox "$F/bin/busybox"
for a in $(/bin/busybox --list); do [ -e "$F/bin/$a" ] || ln -s busybox "$F/bin/$a"; done
ln -s ../bin/busybox "$F/sbin/modprobe"
cp "$R/usr/sbin/nft" "$R/usr/bin/xenstore" "$F/bin/"
for a in xenstore-read xenstore-write; do ln -s xenstore "$F/bin/$a"; done
libs "$F" "$R/usr/sbin/nft" "$R/usr/bin/xenstore"
mknod -m 600 "$F/dev/console" c 5 1
# nft resolves protocol names (ipv6-icmp, tcp) through /etc/protocols.
mkdir -p "$F/etc"; cp /etc/protocols /etc/services "$F/etc/"; printf 'protocols: files\nservices: files\n' > "$F/etc/nsswitch.conf"
MODS="xen-netfront xen-netback crc32c_generic libcrc32c nf_tables nft_ct nft_masq nft_chain_nat nft_reject_ipv4 nft_reject_ipv6 nft_reject_inet nf_flow_table nf_flow_table_inet nft_flow_offload"
/bin/busybox depmod -b "$R" "$KVER"
MD=$R/lib/modules/$KVER
for m in $MODS; do
    grep -E "/$m\.ko:" "$MD/modules.dep" | tr -d ':' | tr ' ' '\n'
done | sort -u | while read -r k; do [ -n "$k" ] && mkdir -p "$F/lib/modules/$KVER/$(dirname "$k")" && cp "$MD/$k" "$F/lib/modules/$KVER/$k"; done
cp "$MD"/modules.{dep,alias,symbols,builtin} "$F/lib/modules/$KVER/" 2>/dev/null || cp "$MD/modules.dep" "$F/lib/modules/$KVER/"
echo "$MODS" | tr ' ' '\n' > "$F/modules.load"
cp "$OUT/linuxfw-ruleset.nft" "$F/qubes.nft"
cp "$HERE/linuxfw-init" "$F/init"; chmod +x "$F/init"
(cd "$F" && find . | cpio -o -H newc --quiet | gzip -1) > "$OUT/linuxfw-initrd.gz"
unset LD_LIBRARY_PATH

printf 'SECS=%s\nUDP_RATE=%s\nROUNDS=%s\nFLOWTABLE=%s\nPROFILE=%s\nLOSE_OURS_AT=%s\nHC=%s\nLINUX_VCPUS=%s\n' "${SECS:-10}" "${UDP_RATE:-20M}" "${ROUNDS:-1}" "${FLOWTABLE:-0}" "${PROFILE:-0}" "${LOSE_OURS_AT:-0}" "$HC" "${LINUX_VCPUS:-2}" > "$OUT/bench.env"
# PROFILE=1: dom0 samples our firewall's instruction pointer (ripsample.c)
# during its TCP runs (QFW-BENCH profile lines, named by tests/xen/symbolize.sh).
if [ "${PROFILE:-0}" = 1 ]; then
    gcc -O2 -o "$OUT/ripsample" "$HERE/ripsample.c" -lxenctrl
    TOOLS+=("$OUT/ripsample:/usr/bin/ripsample")
fi
OUT=$OUT/bench-initrd.cpio.gz "$HERE/build-initramfs.sh" "$IMAGE:/guest/qubes-firewall.elf" "$LAB/img/vmlinuz:/guest/vmlinuz" \
    "$OUT/bench-client-initrd.gz:/guest/client-initrd.gz" "$OUT/linuxfw-initrd.gz:/guest/linuxfw-initrd.gz" \
    "$R/usr/bin/iperf3:/usr/bin/iperf3" "$ROOT/xen-config/qubes-firewall.cfg:/guest/qubes-firewall.cfg" \
    "$OUT/bench.env:/guest/bench.env" "$HERE/dom0-bench.sh:/guest/test.sh" "${TOOLS[@]}" >/dev/null
echo "bench.sh: prepared in $((SECONDS - t0)) s; image $(stat -c %s "$IMAGE") bytes"
export LOG=$OUT/bench-serial.log
# multi-threaded TCG as before boot.sh defaulted to single (the test's choice, against a rare lab
# fault): both firewalls' vCPUs run in parallel; ratios were alike either way (42/50 % single, 40/51 % multi).
TCG_THREAD=${TCG_THREAD:-multi} TIMEOUT=${TIMEOUT:-1500} "$HERE/boot.sh" tcg "$OUT/bench-initrd.cpio.gz" || true
grep -E 'QFW-BENCH' "$LOG" | sed 's/^\[ *[0-9.]*\] //' || true
echo "bench.sh: total $((SECONDS - t0)) s, serial log $LOG"
grep -q 'QFW-BENCH-END' "$LOG" && ! grep -q 'QFW-BENCH FAIL' "$LOG"
