#!/bin/sh
# Runs inside dom0 as /guest/test.sh (tests/xen/run.sh): starts the firewall
# image with `xl create`, serves its QubesDB with a qubesdb-daemon (seeded
# with that set's qubesdb-write), connects a qrexec-daemon to its agent and
# calls qubes.FirewallStatus with a qrexec-client, plays a hostile QubesDB
# with vchan-peer (C, libxenvchan), runs a second image instance and a Linux
# client qube behind it (dom0 plays sys-net: HTTP, DNS; live rule change,
# detach/attach of the client and of the uplink), reads a status larger than
# a page, checks the guest's PV console log, stops it with `xl shutdown`,
# and measures it against a minimal PVH guest.
# The firewall pass (firewall_pass) runs once per dom0 daemon set:
#   ours     our qubesdb-daemon/-read/-write, qrexec-daemon, qrexec-client
#            (built with --features xen: real vchan through libxenvchan);
#   qubes-c  Qubes' own C programs (build-qubes-c.sh, packed by run.sh into
#            /usr/lib/qubes-c; dom0-qubes-c.sh defines the set), every
#            check line prefixed "qubes-c: ".
# The same check code runs for both; only the daemon binaries (and how they
# are started) differ. Every verdict line starts with QFW-.
up() { cut -d' ' -f1 /proc/uptime; }
since() { awk -v a="$1" -v b="$(up)" 'BEGIN{printf "%.2f", b-a}'; }
fail=0 n_ok=0 n_fail=0 PFX=
check() {
    if [ "$2" = ok ]; then echo "QFW-CHECK ok   $PFX$1"; n_ok=$((n_ok+1))
    else echo "QFW-CHECK FAIL $PFX$1"; fail=1; n_fail=$((n_fail+1)); fi; }
waitcount() { # file pattern count tenths
    i=0; until [ "$(grep -c "$2" "$1" 2>/dev/null)" -ge "$3" ] || [ $i -ge "$4" ]; do sleep 0.1; i=$((i+1)); done
    [ "$(grep -c "$2" "$1" 2>/dev/null)" -ge "$3" ]; }
waitfor() { # file pattern tenths
    i=0; until grep -q "$2" "$1" 2>/dev/null || [ $i -ge "$3" ]; do sleep 0.1; i=$((i+1)); done; grep -q "$2" "$1" 2>/dev/null; }
CONS=/var/log/xen/console
mkdir -p /var/run/qubes /var/log/qubes
QDB_BASE="/name sys-firewall /qubes-vm-type ProxyVM /qubes-vm-persistence none /qubes-debug-mode 0 /qubes-service/qubes-firewall 1"
# IPv6 as qubesd derives it (fd09:24ef:4179::a89:<last 16 bits of the IPv4
# address>, as tests/qubes-box does): dom0 (sys-net) ::a89:1, the firewall
# ::a89:2, the Linux client ::a89:a.
IP6_NET=fd09:24ef:4179::a89:1 IP6_FW=fd09:24ef:4179::a89:2 IP6_CLIENT=fd09:24ef:4179::a89:a
# The network keys, /qubes-ip last: the firewall brings its uplink up (and
# reads the rest, once) as soon as /qubes-ip and /qubes-gateway are there; a
# fresh daemon that the firewall has already synchronised with gets them one
# write at a time, so in another order IPv6 could be missed under load.
QDB_NET="/qubes-ip6 $IP6_FW /qubes-gateway6 $IP6_NET /qubes-primary-dns 10.139.1.1 /qubes-secondary-dns 10.139.1.2 /qubes-gateway 10.137.0.1 /qubes-ip 10.137.0.2"

# ---- The dom0 daemon set. use_ours here, use_qubes_c in dom0-qubes-c.sh,
# set: DSET, QDB_DAEMON (qubesdb-daemon), QDB_TOOLS (the folder of its
# qubesdb-read/-write), QREXEC_DAEMON, QREXEC_CLIENT, and the words the
# check lines use (QDB_WHO, QREXEC_WHO).
use_ours() {
    DSET=ours PFX=
    QDB_DAEMON=/usr/bin/qubesdb-daemon QDB_TOOLS=/usr/bin
    QREXEC_DAEMON=/usr/bin/qrexec-daemon QREXEC_CLIENT=/usr/bin/qrexec-client
    QDB_WHO="our qubesdb-daemon" QREXEC_WHO="our qrexec-daemon" CLIENT_WHO="our qrexec-client"
}
qdb() { c=$1; shift; "$QDB_TOOLS/qubesdb-$c" "$@"; }
# start_qdb DOMID NAME KEY VALUE...: the set's qubesdb-daemon (both detach
# once their vchan is offered in xenstore), then seeded as dom0's qubesd
# would, with the set's qubesdb-write.
start_qdb() {
    d=$1; n=$2; shift 2
    "$QDB_DAEMON" "$d" "$n"; r1=$?
    qdb write -d "$n" "$@"; r2=$?
    check "$QDB_WHO $d $n started (rc=$r1) and seeded with its qubesdb-write (rc=$r2)" $([ $r1 = 0 ] && [ $r2 = 0 ] && echo ok)
}
# Both write /var/run/qubes/qubesdb.NAME.pid.
stop_qdb() { kill "$(cat /var/run/qubes/qubesdb.$1.pid 2>/dev/null)" 2>/dev/null; }
# qdb_wait NAME PATH TENTHS: until the VM has written PATH to the daemon.
qdb_wait() { i=0; until qdb read -d "$1" "$2" >/dev/null 2>&1 || [ $i -ge "$3" ]; do sleep 0.1; i=$((i+1)); done
    qdb read -d "$1" "$2" >/dev/null 2>&1; }
# start_qrexec DOMID NAME: the set's qrexec-daemon, in the foreground mode
# (logs to /tmp/qrexec-daemon.$DSET.log), its pid in QREXEC_PID.
start_qrexec() {
    case $DSET in
        ours) "$QREXEC_DAEMON" --direct "$1" "$2" root > /tmp/qrexec-daemon.$DSET.log 2>&1 & ;;
        *) uuid=$(xenstore-read /local/domain/$1/vm 2>/dev/null | sed 's|^/vm/||')
           "$QREXEC_DAEMON" -D -u "$uuid" "$1" "$2" root > /tmp/qrexec-daemon.$DSET.log 2>&1 & ;;
    esac
    QREXEC_PID=$!
}
# firewall_status FILE: the set's qrexec-client through its qrexec-daemon.
firewall_status() {
    ts=$(up)
    timeout 60 "$QREXEC_CLIENT" -d sys-firewall 'DEFAULT:QUBESRPC qubes.FirewallStatus dom0' > "$1" 2>&1; r=$?
    echo "QFW-MEASURE ${PFX}$CLIENT_WHO -d sys-firewall qubes.FirewallStatus: rc=$r, $(wc -c < "$1") bytes in $(since $ts) s"
    sed "s/^/QFW-STATUS $PFX/" "$1" | head -40
    return $r
}
use_ours

# dom0 plays the net qube: the firewall's uplink vif joins xenbr0 (vif-mini).
brctl addbr xenbr0 && ip addr add 10.137.0.1/24 dev xenbr0 && ip link set xenbr0 up
# Its IPv6 as sys-net has it: its own address, a route to the firewall's
# (the firewall masquerades its clients' IPv6 as Qubes does).
# (busybox's ip has no nodad: duplicate address detection is turned off.)
echo 0 > /proc/sys/net/ipv6/conf/xenbr0/accept_dad && ip -6 addr add $IP6_NET/128 dev xenbr0 && ip -6 route add $IP6_FW/128 dev xenbr0
check "dom0 (sys-net) has IPv6 $IP6_NET on xenbr0 and a route to the firewall's $IP6_FW" $([ $? = 0 ] && echo ok)
# sys-net's services for the Linux client: HTTP on 10.137.0.1 ports 80 and
# 81 (busybox httpd), iperf3, DNS on the Qubes DNS addresses 10.139.1.1/.2
# (dns-answer, as sys-net's DNAT would).
ip addr add 10.139.1.1/32 dev xenbr0; ip addr add 10.139.1.2/32 dev xenbr0
mkdir -p /www && dd if=/dev/urandom of=/www/blob bs=1M count=3 2>/dev/null && echo small > /www/small
BLOB_SHA=$(sha256sum /www/blob | cut -d' ' -f1)
httpd -p 10.137.0.1:80 -h /www; httpd -p 10.137.0.1:81 -h /www
iperf3 -s -D -B 10.137.0.1 --logfile /tmp/iperf3.log
dns-answer 10.139.1.1 10.139.1.2 > /tmp/dns.log 2>&1 &
DNS_PID=$!

# 0) Baseline: the minimal hello guest (long mode, PV console line, poweroff).
cat > /tmp/hello.cfg <<CFG
name = "hello"
type = "pvh"
kernel = "/guest/hello-pvh-lm.elf"
memory = 32
on_poweroff = "preserve"
CFG
t0=$(up)
xl create /tmp/hello.cfg >/dev/null
if waitfor $CONS/guest-hello.log HELLO-PVCONSOLE 300; then
    echo "QFW-MEASURE hello-pvh: xl create -> PV console line in $(since $t0) s"
else
    echo "QFW-MEASURE hello-pvh: no console line"
fi
xl destroy hello 2>/dev/null

# 0b) Our libxenvchan wrapper on real Xen: dom0 to itself, a reader and a
#     writer thread on each end, 8 MiB each way at once, checked byte by byte.
timeout 120 xenvchan-loopback 8 > /tmp/loopback.log 2>&1; rc=$?
sed 's/^/QFW: /' /tmp/loopback.log
echo "QFW-MEASURE xenvchan loopback in dom0: $(grep -o '[0-9.]* MB/s' /tmp/loopback.log)"
grep -q "XENVCHAN-LOOPBACK ok" /tmp/loopback.log; check "xenvchan: bulk both ways over a real vchan (dom0 loopback, rc=$rc)" $([ $? = 0 ] && echo ok)

# The firewall's config: created paused so the QubesDB server (dom0's side)
# is there before it runs, as qubesd arranges on Qubes. Its command line is
# what Qubes passes without the feature no-default-kernelopts:
# qubes-core-admin's kernelopts_common default, then the default kernelopts
# (swiotlb=2048). The firewall must ignore them with a warning. Preserved
# on a reboot: Xen ends a triple-faulted PVH domain with one, and xl's
# restart would hide the fault behind a new domain waiting for a QubesDB
# served for the old one's id.
QUBES_DEFAULT_KERNELOPTS="root=/dev/mapper/dmroot ro nomodeset console=hvc0 rd_NO_PLYMOUTH rd.plymouth.enable=0 plymouth.enable=0 xen_privcmd.unrestricted swiotlb=2048"
sed -e "s|^kernel *=.*|kernel = \"/guest/qubes-firewall.elf\"|" -e "/^vif/d" -e "/^on_/d" -e "/^cmdline/d" /guest/qubes-firewall.cfg > /tmp/fw.cfg
cat >> /tmp/fw.cfg <<CFG
cmdline = "$QUBES_DEFAULT_KERNELOPTS"
on_poweroff = "preserve"
on_crash = "preserve"
on_reboot = "preserve"
vif = [ 'bridge=xenbr0,script=vif-mini,mac=00:16:3e:5e:6c:00' ]
CFG
# The second image instance playing a client qube (step 4).
cat > /tmp/client.cfg <<CFG
name = "client"
type = "pvh"
kernel = "/guest/qubes-firewall.elf"
memory = 32
on_poweroff = "preserve"
on_crash = "preserve"
vif = [ 'backend=sys-firewall,ip=10.137.0.10,mac=00:16:3e:5e:6c:10' ]
CFG
RULES=/qubes-firewall/10.137.0.10
RULES6=/qubes-firewall/$IP6_CLIENT
# The vif's ip as Qubes' toolstack writes it: IPv4 and IPv6, space-separated.
LINUX_VIF_IP="10.137.0.10 $IP6_CLIENT"
LINUX_VIF="backend=sys-firewall,ip=$LINUX_VIF_IP,mac=00:16:3e:5e:6c:11"
# /connected-ips (200 IPv4) and /connected-ips6 (100 IPv6), each under
# QubesDB's 3072-byte value limit: the status lists them all, which makes it
# larger than a page (step 4c).
CONNECTED4=$(i=1; while [ $i -le 200 ]; do printf '10.137.%d.%d ' $((1 + i / 250)) $((i % 250)); i=$((i+1)); done)
CONNECTED6=$(i=1; while [ $i -le 100 ]; do printf 'fd09:24ef:4179::a8b:%x ' $i; i=$((i+1)); done)

# Qubes' client qubes are PVH. Debian's kernel as a PVH domU stops at once
# in this lab (---s--, 0.0 s of CPU, no console line); this short attempt
# (first pass only) with earlyprintk=xen keeps the evidence (QFW-INFO),
# including the guest kernel's own log, read out of its memory (guestmem):
# an early exception in copy_bootdata, its first touch of the direct map,
# which early boot maps on a page fault, with CR2 reading 0 (see
# tests/xen/README.md, step 7). The checks then use the same kernel as a PV
# guest (CONFIG_XEN_PV), which boots.
linux_pvh_attempt() {
    cat > /tmp/linux-pvh.cfg <<CFG
name = "linux-pvh"
type = "pvh"
kernel = "/guest/vmlinuz"
ramdisk = "/guest/client-initrd.gz"
extra = "console=hvc0 earlyprintk=xen loglevel=8"
memory = 128
on_poweroff = "preserve"
on_reboot = "preserve"
on_crash = "preserve"
CFG
    t5=$(up)
    xl create /tmp/linux-pvh.cfg > /tmp/linux-pvh.log 2>&1; rc=$?
    pdom=$(xl domid linux-pvh 2>/dev/null)
    i=0; until xl list linux-pvh 2>/dev/null | awk 'NR==2{exit !($5 ~ /[sc]/)}' || [ $i -ge 100 ]; do sleep 0.1; i=$((i+1)); done
    echo "QFW-INFO linux PVH attempt: xl create rc=$rc in $(since $t5) s; $(xl list linux-pvh 2>/dev/null | awk 'NR==2{print "state " $5 ", " $6 " s of CPU"}')"
    sed 's/^/QFW-INFO linux-pvh xl: /' /tmp/linux-pvh.log | tail -5
    xl list -v linux-pvh 2>/dev/null | sed 's/^/QFW-INFO linux-pvh (Reason-Code 0 = poweroff, 1 = reboot, 3 = crash): /'
    head -c 3000 $CONS/guest-linux-pvh.log 2>/dev/null | sed 's/^/QFW-INFO linux-pvh console: /' | head -15
    xl dmesg | grep -E "\(d$pdom\)|d${pdom}v0|d$pdom " | grep -v "save:\|restore:" | tail -15 | sed 's/^/QFW-INFO linux-pvh xl dmesg: /'
    # Its kernel log buffer: dom0 runs the same kernel, whose /proc/kallsyms
    # names the buffer's address; a PVH domU is loaded at the kernel's link
    # address, so its physical address is that minus __START_KERNEL_map;
    # 0x40000 bytes (256 KiB) is the buffer's size in Debian's kernel.
    lb=$(awk '$3 == "__log_buf" {print $1}' /proc/kallsyms)
    if [ -n "$lb" ] && [ -n "$pdom" ]; then
        guestmem "$pdom" "$(printf '%x' $((0x$lb - 0xffffffff80000000)))" 40000 2>&1 | strings -n 6 | head -20 |
            sed 's/^/QFW-INFO linux-pvh kernel log: /'
    fi
    xl destroy linux-pvh 2>/dev/null
}

# firewall_pass: every QubesDB and qrexec check, against the daemon set in
# use (use_ours / use_qubes_c). In the qubes-c pass the Linux client skips
# its iperf3 run (a throughput figure, not a daemon check; saves ~8 s).
firewall_pass() {
pass_t0=$(up); n_ok=0; n_fail=0
echo "QFW: ==== firewall pass with dom0 daemon set '$DSET': $QDB_DAEMON, $QDB_TOOLS/qubesdb-*, $QREXEC_DAEMON, $QREXEC_CLIENT ===="
# xenconsoled and the qubesdb-daemons append to their logs: the previous
# pass's are kept under another name.
for f in $CONS/guest-sys-firewall.log $CONS/guest-client.log $CONS/guest-linux-client.log /var/log/qubes/qubesdb.sys-firewall.log /var/log/qubes/qubesdb.client.log; do
    [ -e "$f" ] && mv "$f" "$f.before-$DSET"
done
rm -f /www/uplink-done
# The previous pass's daemons are gone: no stale socket or pid file.
i=0; while [ -e /proc/"$(cat /var/run/qubes/qubesdb.sys-firewall.pid 2>/dev/null)" ] && [ $i -lt 50 ]; do sleep 0.1; i=$((i+1)); done
rm -f /var/run/qubes/qubesdb.sys-firewall.sock /var/run/qubes/qubesdb.sys-firewall.pid /var/run/qubes/qrexec.sys-firewall

# 1) The firewall, its QubesDB and qrexec daemons.
t0=$(up)
xl create -p /tmp/fw.cfg; rc=$?
check "xl create -p rc=$rc" $([ $rc = 0 ] && echo ok)
domid=$(xl domid sys-firewall 2>/dev/null)
echo "QFW: ${PFX}firewall is domain $domid"
LOG=$CONS/guest-sys-firewall.log
if [ "$DSET" = qubes-c ]; then
    # Qubes' qubesdb-daemon late (qubesd starts it before it unpauses a
    # VM; a race or a daemon restart can invert that): the firewall runs
    # first, finds no QubesDB vchan (xenstored: EACCES, the directory
    # above is dom0's) and keeps trying, as Qubes' libvchan_client_init
    # waits for its server.
    xl unpause sys-firewall
    waitfor $LOG "QubesDB (vchan port 111) not offered yet" 600
    grep -q "QubesDB (vchan port 111) not offered yet" $LOG
    check "firewall started before $QDB_WHO waits for it (no QubesDB vchan yet)" $([ $? = 0 ] && echo ok)
    # shellcheck disable=SC2086
    start_qdb "$domid" sys-firewall $QDB_BASE
else
    # shellcheck disable=SC2086
    start_qdb "$domid" sys-firewall $QDB_BASE
    xl unpause sys-firewall
fi
start_qrexec "$domid" sys-firewall
if waitfor $LOG "booted:" 600; then
    echo "QFW-MEASURE ${PFX}firewall: xl create -> first console line in $(since $t0) s"
fi
if waitfor $LOG "QubesDB and qrexec" 900; then
    echo "QFW-MEASURE ${PFX}firewall: xl create -> \"QubesDB and qrexec ... connected\" in $(since $t0) s"
    check "QubesDB and qrexec agents connected to $QDB_WHO and $QREXEC_WHO" ok
else
    check "QubesDB and qrexec agents connected to $QDB_WHO and $QREXEC_WHO" no
fi
grep -q "booted:" $LOG; check "image booted (console line via xenconsoled)" $([ $? = 0 ] && echo ok)
grep -q "ignoring 9 Linux kernel option" $LOG; check "booted with Qubes' default kernel options, ignored with a warning" $([ $? = 0 ] && echo ok)
grep -q "domain $domid (sys-firewall)" $LOG; check "read its domid/name from xenstore" $([ $? = 0 ] && echo ok)
waitfor $LOG "QubesDB: synchronised" 50
grep -q "QubesDB: synchronised" $LOG; check "firewall synchronised with $QDB_WHO over real vchan (its vchan server)" $([ $? = 0 ] && echo ok)
v=$(qdb read -d sys-firewall /qubes-vm-type 2>&1)
check "$QDB_WHO's qubesdb-read reads back /qubes-vm-type ($v)" $([ "$v" = ProxyVM ] && echo ok)
case $DSET in
    ours) grep -q "for sys-firewall (domain $domid)" /var/log/qubes/qubesdb.sys-firewall.log 2>/dev/null ;;
    *) kill -0 "$(cat /var/run/qubes/qubesdb.sys-firewall.pid 2>/dev/null)" 2>/dev/null ;;
esac
check "$QDB_WHO serves domain $domid" $([ $? = 0 ] && echo ok)
i=0; until [ -S /var/run/qubes/qrexec.$domid ] || [ $i -ge 300 ]; do sleep 0.1; i=$((i+1)); done
[ -S /var/run/qubes/qrexec.$domid ] && kill -0 $QREXEC_PID 2>/dev/null
check "$QREXEC_WHO did the HELLO with the agent over real vchan and listens" $([ $? = 0 ] && echo ok)
firewall_status /tmp/status1.$DSET.txt && grep -q "^qubes-firewall status" /tmp/status1.$DSET.txt
check "$CLIENT_WHO -d sys-firewall 'DEFAULT:QUBESRPC qubes.FirewallStatus dom0' printed the status" $([ $? = 0 ] && echo ok)
xenstore-ls -f /local/domain/$domid/data 2>/dev/null | sed 's/^/QFW: xenstore /'
echo "QFW: guest memory:"; xl list sys-firewall

# 2) dom0's QubesDB goes away, a hostile one takes its place (corrupts the
#    ring indices), then a good one comes back: the firewall must drop the
#    bad link, stay up, and resynchronise.
stop_qdb sys-firewall
i=0; while [ -e /proc/"$(cat /var/run/qubes/qubesdb.sys-firewall.pid 2>/dev/null)" ] && [ $i -lt 50 ]; do sleep 0.1; i=$((i+1)); done
t2=$(up)
vchan-peer hostile-qubesdb "$domid" > /tmp/peer-hostile.$DSET.log 2>&1 &
HOSTILE_PID=$!
waitfor /tmp/peer-hostile.$DSET.log "client closed\|FAIL" 300
grep -q "client closed the vchan" /tmp/peer-hostile.$DSET.log
check "firewall dropped a QubesDB vchan with corrupt indices" $([ $? = 0 ] && echo ok)
wait $HOSTILE_PID 2>/dev/null
# A fresh daemon, now with the network keys and, as dom0 does for each
# client, the rules of client 10.137.0.10 (accept everything) and the commit.
# shellcheck disable=SC2086
start_qdb "$domid" sys-firewall $QDB_BASE $QDB_NET
qdb write -d sys-firewall $RULES/policy drop $RULES/0000 action=accept $RULES ''
if waitcount $LOG "QubesDB: synchronised" 2 300; then
    echo "QFW-MEASURE ${PFX}firewall: QubesDB lost -> hostile peer dropped -> resynchronised in $(since $t2) s"
    check "firewall resynchronised with a fresh $QDB_WHO" ok
else
    check "firewall resynchronised with a fresh $QDB_WHO" no
fi
state=$(xl list sys-firewall 2>/dev/null | awk 'NR==2{print $5}')
case $state in ""|*c*|*s*|*d*) check "firewall still running after the hostile peer (state '$state')" no ;; *) check "firewall still running after the hostile peer (state $state)" ok ;; esac

# 3) The new QubesDB carries the network keys: the firewall brings up its
#    uplink (netfront <-> dom0's netback on xenbr0) and answers ARP.
t3=$(up)
if waitfor $LOG "netfront device/vif/0 connected" 300; then
    echo "QFW-MEASURE ${PFX}firewall: network keys -> netfront connected in $(since $t3) s"
    check "netfront connected to dom0's netback (network keys from $QDB_WHO)" ok
else
    check "netfront connected to dom0's netback (network keys from $QDB_WHO)" no
fi
qdb_wait sys-firewall /qubes-iptables-error 100; rc=$?
check "firewall reported networking up (/qubes-iptables-error written to $QDB_WHO, read back with its qubesdb-read: '$(qdb read -d sys-firewall /qubes-iptables-error 2>&1)')" $([ $rc = 0 ] && echo ok)
# IPv4 pings from the net qube are not answered (Linux sys-firewall's input
# chain takes ICMP from clients only), but the firewall answers ARP for its
# uplink address: dom0 learns its MAC.
ip neigh flush dev xenbr0 2>/dev/null
ping -c 1 -W 2 10.137.0.2 > /tmp/ping.log 2>&1; rc=$?
neigh=$(ip neigh show 10.137.0.2 dev xenbr0)
echo "QFW: ping rc=$rc (no answer expected); neighbour: $neigh"
check "dom0 resolves the firewall's uplink address by ARP over netfront ($neigh); its IPv4 ping is not answered (rc=$rc)" \
    $(echo "$neigh" | grep -q "00:16:3e:5e:6c:00" && [ $rc != 0 ] && echo ok)
vif=$(xl list | awk '$1=="sys-firewall"{print "vif"$2".0"}')
firewall_status /tmp/status2.$DSET.txt && grep -q "^ip: 10.137.0.2" /tmp/status2.$DSET.txt
check "FirewallStatus shows the config read from $QDB_WHO (ip: 10.137.0.2)" $([ $? = 0 ] && echo ok)
# Mixed pair, for information: our qrexec-client through the other set's
# qrexec-daemon.
if [ $DSET != ours ]; then
    timeout 60 /usr/bin/qrexec-client -d sys-firewall 'DEFAULT:QUBESRPC qubes.FirewallStatus dom0' > /tmp/status-mixed.$DSET.txt 2>&1; r=$?
    if [ $r = 0 ] && grep -q "^qubes-firewall status" /tmp/status-mixed.$DSET.txt; then echo "QFW-INFO ok   ${PFX}our qrexec-client through $QREXEC_WHO"
    else echo "QFW-INFO FAIL ${PFX}our qrexec-client through $QREXEC_WHO (rc=$r): $(head -3 /tmp/status-mixed.$DSET.txt | tr '\n' ' ')"; fi
fi
echo "QFW: $vif rx_packets=$(cat /sys/class/net/$vif/statistics/rx_packets 2>/dev/null) tx_packets=$(cat /sys/class/net/$vif/statistics/tx_packets 2>/dev/null)"

# 4) A client qube behind the firewall: a second instance of the image whose
#    vif is served by the firewall's netback (backend=sys-firewall), its own
#    QubesDB from the set's daemon. It connects its netfront, and the two
#    exchange frames (its ARP for its gateway, the firewall's answer); frame
#    counts are logged at shutdown.
t4=$(up)
xl create -p /tmp/client.cfg; rc=$?
check "xl create -p client with backend=sys-firewall rc=$rc" $([ $rc = 0 ] && echo ok)
cdomid=$(xl domid client 2>/dev/null)
# shellcheck disable=SC2086
start_qdb "$cdomid" client $QDB_BASE /qubes-primary-dns 10.139.1.1 /qubes-secondary-dns 10.139.1.2 /qubes-gateway 10.137.0.2 /qubes-ip 10.137.0.10
xl unpause client
CLOG=$CONS/guest-client.log
if waitfor $LOG "netback vif$cdomid.0 connected" 300; then
    echo "QFW-MEASURE ${PFX}firewall: client created -> netback vif$cdomid.0 connected in $(since $t4) s"
    check "firewall's netback connected the client's netfront" ok
else
    check "firewall's netback connected the client's netfront" no
fi
waitfor $LOG "client vif$cdomid.0 added" 50
grep -q "client vif$cdomid.0 added with IP 10.137.0.10" $LOG; check "firewall added client vif$cdomid.0 (10.137.0.10) to its router" $([ $? = 0 ] && echo ok)
qdb_wait client /qubes-iptables-error 300
check "client brought its network up through the firewall's netback (its /qubes-iptables-error in $QDB_WHO)" $([ $? = 0 ] && echo ok)
sleep 3   # let the client ARP for its gateway a few times
xl shutdown client
i=0; until xl list client 2>/dev/null | awk 'NR==2{exit !($5 ~ /s/)}' || [ $i -ge 100 ]; do sleep 0.1; i=$((i+1)); done
sleep 0.5
grep -E "netfront device/vif/0: [1-9][0-9]* frames received, [1-9]" $CLOG > /dev/null
check "client's netfront received and sent frames via the firewall ($(grep -o 'netfront device/vif/0: .*' $CLOG))" $([ $? = 0 ] && echo ok)
sed "s/^/QFW-CLIENT-CONSOLE $PFX/" $CLOG
xl destroy client 2>/dev/null
stop_qdb client

# 4b) A Linux client qube behind the firewall (Debian's kernel, our busybox
#     initramfs tests/xen/client-init): its netfront -> our netback
#     (checksum offload) -> rules -> NAT -> our netfront -> dom0's
#     netback/bridge, and back. dom0 plays sys-net (HTTP, iperf3, DNS, set
#     up above). The client's rules, written with the set's qubesdb-write,
#     deny TCP port 81 until dom0 changes them live. The client reports
#     each check; dom0 turns them into gating QFW-CHECK lines.
qdb write -d sys-firewall $RULES6/policy drop $RULES6/0000 action=accept $RULES6 ''
qdb write -d sys-firewall $RULES/policy drop $RULES/0000 "action=drop proto=tcp dstports=81-81" $RULES/0001 action=accept $RULES ''
[ $DSET = ours ] && linux_pvh_attempt
iperf=1 expect_iperf="iperf3 TCP"
[ $DSET = ours ] || iperf=0 expect_iperf=
cat > /tmp/linux-client.cfg <<CFG
name = "linux-client"
type = "pv"
kernel = "/guest/vmlinuz"
ramdisk = "/guest/client-initrd.gz"
extra = "console=hvc0 quiet qfw_sha=$BLOB_SHA qfw_ip6=$IP6_CLIENT qfw_gw6=$IP6_FW qfw_net6=$IP6_NET qfw_iperf=$iperf"
memory = 128
on_poweroff = "preserve"
on_crash = "preserve"
vif = [ '$LINUX_VIF' ]
CFG
t5=$(up)
xl create /tmp/linux-client.cfg; rc=$?
check "xl create linux-client (PV) with backend=sys-firewall rc=$rc" $([ $rc = 0 ] && echo ok)
ldom=$(xl domid linux-client 2>/dev/null)
LLOG=$CONS/guest-linux-client.log
client_said() { waitfor $LLOG "CLIENT-LINUX $1" "$2"; }
if client_said "init started" 1200; then
    echo "QFW-MEASURE ${PFX}linux-client: xl create -> init started in $(since $t5) s"
fi
# 5. The live rule change: port 81 allowed (the client retries).
if client_said "READY rule-change" 1200; then
    t6=$(up)
    qdb write -d sys-firewall $RULES/0000 action=accept $RULES ''
    client_said "CHECK .* a live rule change" 400 && echo "QFW-MEASURE ${PFX}linux-client: rule change -> port 81 reachable in $(since $t6) s"
fi
# 6. xl network-detach of the client must complete (libxl waits for our
#    backend to reach Closed; a timeout is the bug of mirage-firewall #157).
if client_said "READY detach" 600; then
    t6=$(up)
    timeout 60 xl network-detach linux-client 0 > /tmp/detach.log 2>&1; rc=$?
    took=$(since $t6)
    echo "QFW-MEASURE ${PFX}linux-client: xl network-detach took $took s (rc=$rc)"
    sed 's/^/QFW: detach: /' /tmp/detach.log
    left=$(xenstore-ls /local/domain/$domid/backend/vif/$ldom 2>/dev/null | wc -l)
    check "linux-client: xl network-detach completes without timeout (rc=$rc in $took s; backend entries left: $left)" \
        $([ $rc = 0 ] && ! grep -qi "timed out\|timeout" /tmp/detach.log && echo ok)
    waitfor $LOG "client vif$ldom.0 removed" 100
    check "linux-client: the firewall removed vif$ldom.0 from its router" $([ $? = 0 ] && echo ok)
    xl network-attach linux-client backend=sys-firewall "ip=$LINUX_VIF_IP" mac=00:16:3e:5e:6c:11 > /tmp/attach.log 2>&1; rc=$?
    echo "QFW: xl network-attach linux-client rc=$rc $(tr '\n' ' ' < /tmp/attach.log)"
fi
# 7. The uplink: sys-net restart as qubesd does it (detach, network keys
#    rewritten with the set's qubesdb-write, attach a new vif); the
#    firewall keeps running.
if client_said "READY uplink" 900; then
    t6=$(up)
    timeout 60 xl network-detach sys-firewall 0 > /tmp/updetach.log 2>&1; rc=$?
    echo "QFW-MEASURE ${PFX}firewall: uplink xl network-detach took $(since $t6) s (rc=$rc)"
    check "firewall: uplink xl network-detach completes (rc=$rc)" $([ $rc = 0 ] && echo ok)
    # shellcheck disable=SC2086
    qdb write -d sys-firewall $QDB_NET; rc=$?
    check "firewall: network keys rewritten with $QDB_WHO's qubesdb-write (rc=$rc)" $([ $rc = 0 ] && echo ok)
    xl network-attach sys-firewall bridge=xenbr0 script=vif-mini mac=00:16:3e:5e:6c:00 > /tmp/attach.log 2>&1; rc=$?
    echo "QFW: uplink xl network-attach rc=$rc $(tr '\n' ' ' < /tmp/attach.log)"
    waitcount $LOG "netfront device/vif/0 connected" 2 300
    echo "QFW-MEASURE ${PFX}firewall: uplink detach -> connected again in $(since $t6) s"
    echo done > /www/uplink-done
    check "firewall: the same instance kept running across the uplink detach/attach (domain $(xl domid sys-firewall 2>/dev/null), $(grep -c 'Qubes firewall starting' $LOG) start)" \
        $([ "$(xl domid sys-firewall 2>/dev/null)" = "$domid" ] && [ "$(grep -c 'Qubes firewall starting' $LOG)" = 1 ] && echo ok)
fi
client_said "DONE" 900
i=0; until xl list linux-client 2>/dev/null | awk 'NR==2{exit !($5 ~ /[sc]/)}' || [ $i -ge 100 ]; do sleep 0.1; i=$((i+1)); done
echo "QFW-MEASURE ${PFX}linux-client: xl create -> all client checks done in $(since $t5) s"
sed 's/^/QFW-LINUX-CLIENT /' $LLOG | grep -v "CHECK" | tail -30
# The client's own verdicts, gating; each expected one must be there.
client_ok=1
for c in "ping dom0" "IPv6 ping dom0" "HTTP download" "DNS query" "$expect_iperf" "TCP port 81 denied" "a live rule change" \
         "traffic flows again after xl network-detach" "traffic flows again after the uplink"; do
    [ -n "$c" ] || continue
    line=$(grep -o "CLIENT-LINUX CHECK [a-zA-Z]* $c.*" $LLOG | head -1)
    case $line in
        "CLIENT-LINUX CHECK ok "*) check "linux-client: ${line#CLIENT-LINUX CHECK ok }" ok ;;
        "CLIENT-LINUX CHECK FAIL "*) check "linux-client: ${line#CLIENT-LINUX CHECK FAIL }" no; client_ok=0 ;;
        *) check "linux-client: $c (no result from the client)" no; client_ok=0 ;;
    esac
done
fwmem=$(xl list sys-firewall 2>/dev/null | awk 'NR==2{print $3}')
check "linux-client: all of the above with the firewall at $fwmem MiB (16 required)" $([ "$fwmem" = 16 ] && [ $client_ok = 1 ] && echo ok)
sed 's/^/QFW: dns: /' /tmp/dns.log | tail -4
firewall_status /tmp/status3.$DSET.txt > /dev/null
grep -E "^interface|^drop [1-9]|^heap" /tmp/status3.$DSET.txt | sed "s/^/QFW-STATUS $PFX/"
# The status (over qrexec) reports the heap: used and free, both non-zero,
# with the firewall at 16 MiB after all the client's traffic.
heap=$(grep -E "^heap: used [0-9]+ KiB free [0-9]+ KiB of [0-9]+ KiB$" /tmp/status3.$DSET.txt | head -1)
hused=$(echo "$heap" | awk '{print $3}'); hfree=$(echo "$heap" | awk '{print $6}')
check "qubes.FirewallStatus over qrexec ($CLIENT_WHO) reports the heap at $fwmem MiB (${heap:-no heap line})" \
    $([ "$fwmem" = 16 ] && [ "${hused:-0}" -gt 0 ] && [ "${hfree:-0}" -gt 0 ] && echo ok)
xl destroy linux-client 2>/dev/null

# 4c) qrexec output larger than a page: dom0 lists 300 connected qubes
#     (/connected-ips, /connected-ips6, one live qubesdb-write), the status
#     lists every one of them; it must arrive whole (> 4096 bytes, every
#     address, the last line).
e1=$(sed -n 's/^qubesdb: entries \([0-9]*\).*/\1/p' /tmp/status3.$DSET.txt)
qdb write -d sys-firewall /connected-ips "$CONNECTED4" /connected-ips6 "$CONNECTED6"; rc=$?
i=0; n=0
while [ $i -lt 20 ]; do
    firewall_status /tmp/status4.$DSET.txt > /dev/null
    n=$(sed -n 's/^connected_ips://p' /tmp/status4.$DSET.txt | wc -w)
    [ "$n" = 300 ] && break
    sleep 0.5; i=$((i+1))
done
size=$(wc -c < /tmp/status4.$DSET.txt)
e2=$(sed -n 's/^qubesdb: entries \([0-9]*\).*/\1/p' /tmp/status4.$DSET.txt)
echo "QFW-MEASURE ${PFX}qubes.FirewallStatus with 300 connected addresses: $size bytes"
check "a live qubesdb-write (rc=$rc) of /connected-ips and /connected-ips6 reaches the firewall (QubesDB entries $e1 -> $e2)" \
    $([ $rc = 0 ] && [ -n "$e1" ] && [ -n "$e2" ] && [ "$e2" -gt "$e1" ] && echo ok)
check "qrexec output larger than a page: $CLIENT_WHO got the whole $size-byte status (300 addresses: $n; last line: $(tail -n 1 /tmp/status4.$DSET.txt | cut -c1-30)...)" \
    $([ "$size" -gt 4096 ] && [ "$n" = 300 ] && grep -q "fd09:24ef:4179::a8b:64" /tmp/status4.$DSET.txt && grep -q "^qrexec: started" /tmp/status4.$DSET.txt && echo ok)
qdb write -d sys-firewall /connected-ips "10.137.0.10" /connected-ips6 "$IP6_CLIENT"
# The other direction, for information: qubes.SetDateTime with its date
# line followed by 8 KiB more stdin (the agent reads the line, discards the
# rest); the status then shows the wall clock set.
{ date -u -Iseconds; head -c 8192 /dev/zero | tr '\0' x; echo; } > /tmp/stdin-big.txt
timeout 60 "$QREXEC_CLIENT" -d sys-firewall 'DEFAULT:QUBESRPC qubes.SetDateTime dom0' < /tmp/stdin-big.txt > /tmp/setdate.$DSET.txt 2>&1; r=$?
firewall_status /tmp/status5.$DSET.txt > /dev/null
wclk=$(grep "^wall_clock_unix" /tmp/status5.$DSET.txt)
if [ $r = 0 ] && grep -q "^wall_clock_unix: [0-9]" /tmp/status5.$DSET.txt; then
    echo "QFW-INFO ok   ${PFX}qrexec stdin larger than a page: $CLIENT_WHO sent $(wc -c < /tmp/stdin-big.txt) bytes to qubes.SetDateTime (rc=$r; $wclk)"
else
    echo "QFW-INFO FAIL ${PFX}qrexec stdin larger than a page: $CLIENT_WHO sent $(wc -c < /tmp/stdin-big.txt) bytes to qubes.SetDateTime (rc=$r: $(head -c 200 /tmp/setdate.$DSET.txt | tr '\n' ' '); $wclk)"
fi

# 4d) Idle, the firewall sleeps: its CPU time over 5 s without traffic
#     (a main loop that returned from `wait` at once, or polled with a
#     deadline in the past, would use most of them).
c1=$(xl list sys-firewall 2>/dev/null | awk 'NR==2{print $6}')
sleep 5
c2=$(xl list sys-firewall 2>/dev/null | awk 'NR==2{print $6}')
used=$(awk -v a="$c1" -v b="$c2" 'BEGIN{printf "%.1f", b - a}')
check "idle, the firewall sleeps: $used s of CPU in 5 s (under 1 s required)" \
    $(awk -v a="$c1" -v b="$c2" 'BEGIN{exit !(a != "" && b != "" && b - a < 1.0)}' && echo ok)

# 5) Clean shutdown.
t1=$(up)
xl shutdown sys-firewall; rc=$?
check "xl shutdown rc=$rc" $([ $rc = 0 ] && echo ok)
i=0; until xl list sys-firewall 2>/dev/null | awk 'NR==2{exit !($5 ~ /s/)}' || [ $i -ge 300 ]; do sleep 0.1; i=$((i+1)); done
state=$(xl list sys-firewall 2>/dev/null | awk 'NR==2{print $5}')
echo "QFW-MEASURE ${PFX}firewall: xl shutdown -> state $state in $(since $t1) s"
xl list
case $state in *c*) check "final state $state is shut down, not crashed" no ;; *s*) check "final state $state is shut down" ok ;; *) check "final state '$state' is shut down" no ;; esac
sleep 0.5
echo "QFW: ---- guest console log ($DSET pass) ----"; sed "s/^/QFW-CONSOLE $PFX/" $LOG
# qrexec-daemon, as Qubes', logs the agent's disconnection and waits for it
# to come back; we started it, so we end it.
if waitfor /tmp/qrexec-daemon.$DSET.log "qrexec-agent has disconnected\|disconnected" 100; then
    echo "QFW-INFO ok   ${PFX}$QREXEC_WHO saw the agent disconnect $(since $t1) s after xl shutdown"
else
    echo "QFW-INFO no   ${PFX}$QREXEC_WHO did not log the agent's disconnection within 10 s of the shutdown"
fi
kill $QREXEC_PID 2>/dev/null
stop_qdb sys-firewall
echo "QFW: ---- dom0 daemon logs ($DSET pass) ----"
for f in /var/log/qubes/qubesdb.sys-firewall.log /var/log/qubes/qubesdb.client.log /tmp/qrexec-daemon.$DSET.log /tmp/peer-hostile.$DSET.log; do
    [ -e $f ] && sed "s|^|QFW-LOG $PFX$(basename $f): |" $f | tail -40
done
grep -E "netback vif[0-9]+\.0: [1-9][0-9]* frames received, [1-9]" $LOG > /dev/null; rc=$?
check "firewall's netback received and sent frames ($(grep -o 'netback vif[0-9.]*: [0-9]* frames.*' $LOG | tr '\n' ' '))" $([ $rc = 0 ] && echo ok)
xl destroy sys-firewall 2>/dev/null
echo "QFW-MEASURE pass '$DSET': $n_ok checks ok, $n_fail failed, in $(since $pass_t0) s"
}

firewall_pass
echo "QFW: ---- guest lines in xl dmesg ----"; xl dmesg | grep -E '^\(d[0-9]+\)' | tail -20
# The qubes-c pass: Qubes' C qubesdb-daemon and qrexec-daemon/-client in
# place of ours (run.sh packs them with dom0-qubes-c.sh unless QUBES_C=0).
if [ -f /guest/dom0-qubes-c.sh ]; then
    . /guest/dom0-qubes-c.sh
    if use_qubes_c; then
        firewall_pass
    else
        check "qubes-c: Qubes' C dom0 programs present in $QCB" no
    fi
fi
kill $DNS_PID 2>/dev/null
echo "QFW-RESULT $( [ $fail = 0 ] && echo PASS || echo FAIL )"
exit $fail
