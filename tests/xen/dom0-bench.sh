#!/bin/sh
# Runs inside dom0 as /guest/test.sh for `cargo xtask bench xen`
# (tests/xen/bench.sh). dom0 plays sys-net (xenbr0 10.137.0.1/24,
# `iperf3 -s`). Two firewalls side by side, each with one Linux client
# qube (Debian's kernel, bench-client-init, 10.137.0.10) behind it:
#   ours:  the image at Qubes' size (xen-config/qubes-firewall.cfg:
#          PVH, 1 vCPU, 16 MiB), served by our qubesdb-daemon and
#          qrexec-daemon, uplink 10.137.0.2;
#   linux: Debian's kernel as a PV domU at a Qubes Linux sys-firewall's
#          size (2 vCPUs, 400 MiB) with linuxfw-init (Qubes' nftables
#          tables, masquerade, netback + netfront), uplink 10.137.0.3.
# The runs are interleaved (each test through ours, then through linux),
# each bracketed by `xl list` CPU times of the firewall, its client and
# dom0, with the other firewall and its client paused; our firewall, if
# the lab lost it (its triple fault), is started again with its client
# before the next run through it. Results are
# `QFW-BENCH` lines; the serial log is parsed by
# xtask/src/bench_xen.rs. Env (written by bench.sh into
# /guest/bench.env): SECS, UDP_RATE, ROUNDS, FLOWTABLE, PROFILE,
# LOSE_OURS_AT, HC (hypercalls for the lab's price of one), LINUX_VCPUS.
up() { cut -d' ' -f1 /proc/uptime; }
since() { awk -v a="$1" -v b="$(up)" 'BEGIN{printf "%.2f", b-a}'; }
# waitslow FILE PATTERN SECONDS: as waitfor below, polling twice a second (during
# a measurement dom0 should not fork grep ten times a second).
waitslow() { i=0; until grep -q "$2" "$1" 2>/dev/null || [ $i -ge $(($3 * 2)) ]; do sleep 0.5; i=$((i+1)); done; grep -q "$2" "$1" 2>/dev/null; }
waitfor() { # file pattern tenths
    i=0; until grep -q "$2" "$1" 2>/dev/null || [ $i -ge "$3" ]; do sleep 0.1; i=$((i+1)); done; grep -q "$2" "$1" 2>/dev/null; }
# shellcheck disable=SC1091
[ -f /guest/bench.env ] && . /guest/bench.env
SECS=${SECS:-10} UDP_RATE=${UDP_RATE:-20M} ROUNDS=${ROUNDS:-1} FLOWTABLE=${FLOWTABLE:-0} PROFILE=${PROFILE:-0} LOSE_OURS_AT=${LOSE_OURS_AT:-0} LINUX_VCPUS=${LINUX_VCPUS:-2}
case $LINUX_VCPUS in 1|2) ;; *) echo "QFW-BENCH FAIL LINUX_VCPUS must be 1 or 2, not '$LINUX_VCPUS'"; echo "QFW-BENCH-END"; exit 1;; esac
CONS=/var/log/xen/console
mkdir -p /var/run/qubes /var/log/qubes
fail() { echo "QFW-BENCH FAIL $*"; grep LINUXFW $CONS/guest-linux-fw.log 2>/dev/null | sed 's/^/QFW-BENCH info /'; echo "QFW-BENCH-END"; exit 1; }
cpu() { xl list "$1" 2>/dev/null | awk 'NR==2{print $6}'; }
# vifirqs DOMAIN: interrupts dom0 took for the domain's uplink vif (the
# firewall's notifications to its backend).
vifirqs() { awk -v v="vif$(xl domid "$1").0" 'index($0, " " v) { for (i = 2; i <= NF; i++) if ($i ~ /^[0-9]+$/) s += $i; else break } END { print s + 0 }' /proc/interrupts; }
allcpu() { xl list | awk 'NR>1{t+=$6} END{print t}'; }
mem() { xl list "$1" 2>/dev/null | awk 'NR==2{print $3}'; }
vcpus() { xl list "$1" 2>/dev/null | awk 'NR==2{print $4}'; }
# tell DOMAIN LINE: a line on the domain's console input (its pty).
tell() { t=$(xenstore-read "/local/domain/$(xl domid "$1")/console/tty") && echo "$2" > "$t"; }

# The lab's price of a hypercall, before anything else runs: the minimal
# PVH guest (the kind of domain ours is) timed from `xl create` to its
# poweroff without and with $HC xen_version hypercalls (the first run
# warms up), and $HC from a dom0 process, where each is a system call into
# dom0's kernel, the privcmd ioctl and a hypercall from a PV domain (the
# kind the Linux firewall is here, tests/xen/README.md).
hello_s() { # ELF: seconds from xl create to shut down ("-" if it did not)
    printf 'name = "hello"\ntype = "pvh"\nkernel = "%s"\nmemory = 32\non_poweroff = "preserve"\n' "$1" > /tmp/hello.cfg
    t=$(up); xl create /tmp/hello.cfg > /dev/null 2>&1 || { echo -; return; }
    down() { xl list hello 2>/dev/null | awk 'NR==2{exit !($5 ~ /s/)}'; }
    i=0; until down || [ $i -ge 1200 ]; do usleep 50000; i=$((i+1)); done
    if down; then since "$t"; else echo -; fi
    xl destroy hello 2>/dev/null
}
HC=${HC:-100000}
hello_s /guest/hello-pvh-lm.elf > /dev/null
empty=$(hello_s /guest/hello-pvh-lm.elf); loop=$(hello_s /guest/hello-pvh-loop.elf)
t=$(up); dom0-hypercalls "$HC" && dom0=$(since "$t") || dom0=-
echo "QFW-BENCH lab calls=$HC pvh_empty_s=$empty pvh_calls_s=$loop dom0_calls_s=$dom0"

brctl addbr xenbr0 && ip addr add 10.137.0.1/24 dev xenbr0 && ip link set xenbr0 up
iperf3 -s -D -B 10.137.0.1 --logfile /tmp/iperf3.log

# Ours, as dom0-test.sh starts it (QubesDB, qrexec), with the network keys
# and client 10.137.0.10's rules (Qubes' default: accept all) at once.
sed -e "s|^kernel *=.*|kernel = \"/guest/qubes-firewall.elf\"|" -e "/^vif/d" -e "/^on_/d" /guest/qubes-firewall.cfg > /tmp/fw.cfg
# on_reboot too: Xen ends a triple-faulted PVH domain with a reboot, and
# xl's default restart would bring ours up again as a new domain without
# its QubesDB (served for the old domain id), which waits for it forever;
# preserved, it is lost and restart_ours replaces it properly.
cat >> /tmp/fw.cfg <<CFG
on_poweroff = "preserve"
on_crash = "preserve"
on_reboot = "preserve"
vif = [ 'bridge=xenbr0,script=vif-mini,mac=00:16:3e:5e:6c:00' ]
CFG
LOG=$CONS/guest-sys-firewall.log
# start_ours: creates our firewall with its QubesDB and qrexec-daemon and
# waits for its uplink; restart_ours (below) calls it again.
start_ours() {
    xl create -p /tmp/fw.cfg || fail "xl create of our firewall"
    domid=$(xl domid sys-firewall)
    qubesdb-daemon "$domid" sys-firewall || fail "qubesdb-daemon"
    qubesdb-write -d sys-firewall /name sys-firewall /qubes-vm-type ProxyVM /qubes-vm-persistence none /qubes-debug-mode 0 \
        /qubes-service/qubes-firewall 1 /qubes-ip 10.137.0.2 /qubes-gateway 10.137.0.1 \
        /qubes-primary-dns 10.139.1.1 /qubes-secondary-dns 10.139.1.2 \
        /qubes-firewall/10.137.0.10/policy drop /qubes-firewall/10.137.0.10/0000 action=accept /qubes-firewall/10.137.0.10 ''
    xl unpause sys-firewall
    qrexec-daemon --direct "$domid" sys-firewall root > /tmp/qrexec-daemon.log 2>&1 &
    qrexec_pid=$!
    waitfor $LOG "netfront device/vif/0 connected" 1200 || fail "our firewall's uplink did not connect"
    echo "QFW-BENCH info ours up (domain $domid)"
}
start_ours

# The Linux sys-firewall.
cat > /tmp/linuxfw.cfg <<CFG
name = "linux-fw"
type = "pv"
kernel = "/guest/vmlinuz"
ramdisk = "/guest/linuxfw-initrd.gz"
extra = "console=hvc0 quiet qfw_ip=10.137.0.3 qfw_gw=10.137.0.1 qfw_flowtable=$FLOWTABLE"
memory = 400
maxmem = 400
vcpus = $LINUX_VCPUS
on_poweroff = "preserve"
on_crash = "preserve"
vif = [ 'bridge=xenbr0,script=vif-mini,mac=00:16:3e:5e:6c:03' ]
CFG
xl create /tmp/linuxfw.cfg || fail "xl create of the Linux firewall"
LFLOG=$CONS/guest-linux-fw.log
waitfor $LFLOG "LINUXFW ready" 1800 || { sed 's/^/QFW-BENCH linux-fw console: /' $LFLOG | tail -30; fail "the Linux firewall did not come up"; }
grep "LINUXFW" $LFLOG | sed 's/^/QFW-BENCH info /'

# One client behind each.
client() { # NAME BACKEND GATEWAY MAC
    cat > "/tmp/$1.cfg" <<CFG
name = "$1"
type = "pv"
kernel = "/guest/vmlinuz"
ramdisk = "/guest/client-initrd.gz"
extra = "console=hvc0 quiet qfw_gw=$3"
memory = 128
vcpus = 1
on_poweroff = "preserve"
on_crash = "preserve"
vif = [ 'backend=$2,ip=10.137.0.10,mac=$4' ]
CFG
    xl create "/tmp/$1.cfg" || fail "xl create $1"
}
client client-ours sys-firewall 10.137.0.2 00:16:3e:5e:6c:10
client client-linux linux-fw 10.137.0.3 00:16:3e:5e:6c:11
for c in client-ours client-linux; do
    waitfor $CONS/guest-$c.log "BENCH-CLIENT ready" 1800 || { sed "s/^/QFW-BENCH $c console: /" $CONS/guest-$c.log | tail -30; fail "$c did not come up"; }
    grep "BENCH-CLIENT ready" $CONS/guest-$c.log | sed "s/^/QFW-BENCH info $c: /"
done
grep "LINUXFW vif\|LINUXFW nft" $LFLOG | sed 's/^/QFW-BENCH info /'

# measure FW TEST SEQ: one run through firewall FW (ours|linux).
measure() {
    fw=$1; test=$2; seq=$3
    case $fw in ours) dom=sys-firewall other="linux-fw client-linux" ;; *) dom=linux-fw other="sys-firewall client-ours" ;; esac
    c=client-$fw
    # The other pair is paused: its idle cost (a 2-vCPU Linux ticks under
    # TCG) must not eat into this run.
    for o in $other; do xl pause "$o"; done
    f0=$(cpu $dom) c0=$(cpu $c) d0=$(cpu Domain-0) a0=$(allcpu) v0=$(vifirqs $dom) t0=$(up)
    tell $c "run $seq $test $SECS $UDP_RATE"
    # LOSE_OURS_AT=N (a test of the restart): our firewall is asked to
    # reboot halfway through run N; it shuts down with the reason Xen
    # gives a triple-faulted domain, and its configuration preserves it.
    [ "$seq" = "$LOSE_OURS_AT" ] && { sleep $((SECS / 2)); xl reboot sys-firewall; }
    sampler=
    if [ "$PROFILE" = 1 ] && [ "$fw" = ours ] && [ "$test" != udp ]; then
        # Xen pauses the vCPU for each read: a profile, not a timing.
        ripsample "$(xl domid $dom)" 100000 2000 > /tmp/samples.$seq &
        sampler=$!
    fi
    waitslow $CONS/guest-$c.log "BENCH-CLIENT result $seq " $((SECS + 60)) || echo "QFW-BENCH info $c gave no result for run $seq"
    if [ -n "$sampler" ]; then
        kill "$sampler"; wait "$sampler" 2>/dev/null
        cat /tmp/samples.$seq | sort | uniq -c | sort -rn | head -200 | while read -r n rip; do echo "QFW-BENCH profile test=$test n=$n rip=0x$rip"; done
    fi
    f1=$(cpu $dom) c1=$(cpu $c) d1=$(cpu Domain-0) a1=$(allcpu) v1=$(vifirqs $dom) t=$(since "$t0")
    for o in $other; do xl unpause "$o"; done
    r=$(grep "BENCH-CLIENT result $seq " $CONS/guest-$c.log | head -1 | sed 's/.*result [0-9]* [a-z-]* //')
    d() { awk -v a="$1" -v b="$2" 'BEGIN{printf "%.1f", b-a}'; }
    echo "QFW-BENCH result fw=$fw test=$test round=$round $r fw_cpu_s=$(d "$f0" "$f1") client_cpu_s=$(d "$c0" "$c1") dom0_cpu_s=$(d "$d0" "$d1") others_cpu_s=$(awk -v a="$a1" -v b="$a0" -v f="$(d "$f0" "$f1")" -v c="$(d "$c0" "$c1")" -v d="$(d "$d0" "$d1")" 'BEGIN{printf "%.1f", a-b-f-c-d}') wall_s=$t dom0_vif_irqs=$((v1 - v0))"
    grep "BENCH-CLIENT iperf3: " $CONS/guest-$c.log | sed 's/^/QFW-BENCH info /' | tail -6
}
# ours_lost: whether our firewall crashed or is gone. The lab's emulated
# AMD-V world switch sometimes triple-faults it (tests/xen/README.md), and
# every later test through it would fail.
ours_lost() {
    state=$(xl list sys-firewall 2>/dev/null | awk 'NR==2{print $5}')
    case $state in ''|*c*|*s*|*d*) return 0 ;; esac
    return 1
}
# recover_ours: restarts ours if it is lost, at most three times a bench
# (a firewall that keeps failing stays failed).
restarts=0
recover_ours() { if [ $restarts -lt 3 ] && ours_lost; then restart_ours; fi; }
# restart_ours: replaces a lost firewall, its dom0 daemons (whose sockets
# are named after it) and its client (whose vif names the old backend), so
# the remaining runs measure. The lost run stays in the log as it ended.
restart_ours() {
    echo "QFW-BENCH info ours lost before run $((seq + 1)) (state ${state:-gone}); restarting it and client-ours"
    tail -5 $LOG | sed 's/^/QFW-BENCH log sys-firewall: /'
    xl destroy client-ours 2>/dev/null
    xl destroy sys-firewall 2>/dev/null
    kill "$qrexec_pid" 2>/dev/null
    kill "$(cat /var/run/qubes/qubesdb.sys-firewall.pid 2>/dev/null)" 2>/dev/null
    # dom0's iperf3 server may still be serving the lost run's test (it
    # refuses every other client until that one times out).
    killall iperf3 2>/dev/null
    sleep 1
    iperf3 -s -D -B 10.137.0.1 --logfile /tmp/iperf3.log
    restarts=$((restarts + 1))
    : > $LOG
    : > $CONS/guest-client-ours.log
    start_ours
    client client-ours sys-firewall 10.137.0.2 00:16:3e:5e:6c:10
    waitfor $CONS/guest-client-ours.log "BENCH-CLIENT ready" 1800 || fail "client-ours did not come up again"
}
seq=0
round=1
while [ $round -le "$ROUNDS" ]; do
    for test in tcp-up tcp-down udp ping; do
        for fw in ours linux; do
            # Before and after each run through ours: the lab has faulted
            # ours during its runs and just after it was unpaused.
            [ $fw = ours ] && recover_ours
            seq=$((seq + 1)); measure $fw $test $seq
            [ $fw = ours ] && recover_ours
        done
    done
    round=$((round + 1))
done

# Memory: the domains' sizes, ours' heap (qubes.FirewallStatus over
# qrexec), Linux's MemTotal - MemAvailable.
qrexec-client -d sys-firewall 'DEFAULT:QUBESRPC qubes.FirewallStatus dom0' > /tmp/status.txt 2>&1
heap=$(grep -E "^heap: " /tmp/status.txt | head -1)
echo "QFW-BENCH memory fw=ours domain_mib=$(mem sys-firewall) vcpus=$(vcpus sys-firewall) $(echo "$heap" | awk '{print "heap_used_kib=" $3 " heap_total_kib=" $9}')"
tell linux-fw mem
waitfor $LFLOG "LINUXFW mem " 100
lm=$(grep "LINUXFW mem " $LFLOG | tail -1 | sed 's/.*LINUXFW mem //')
echo "QFW-BENCH memory fw=linux domain_mib=$(mem linux-fw) vcpus=$(vcpus linux-fw) $lm"
tell linux-fw stats
waitfor $LFLOG "LINUXFW stats nft" 100
grep "LINUXFW stats" $LFLOG | sed 's/^/QFW-BENCH info /'
grep -E "^interface|^gso|^ring|^drop|^heap|^clock" /tmp/status.txt | sed 's/^/QFW-BENCH info ours status: /'
xl list | sed 's/^/QFW-BENCH info xl list: /'
if [ "$PROFILE" = 1 ]; then
    # Xen's TSC report ('s' key): whether it traps the guests' RDTSC
    # (a PVH guest's clock reads then cost a world switch each).
    xl debug-keys s
    xl dmesg | grep -iE "tsc|dom[0-9]+.*mode=" | tail -12 | sed 's/^/QFW-BENCH info tsc: /'
fi
# Our firewall's last console lines and Xen's word on any domain that
# crashed (a crashed firewall leaves nothing else behind).
tail -15 $CONS/guest-sys-firewall.log 2>/dev/null | sed "s/^/QFW-BENCH log sys-firewall: /"
xl dmesg | grep -iwE "domain_crash|crash|crashed|triple|fault|panic" | tail -10 | sed "s/^/QFW-BENCH info xen: /"
for f in linux-fw client-linux client-ours; do grep -v "^\[" $CONS/guest-$f.log | tail -25 | sed "s/^/QFW-BENCH log $f: /"; done
for dd in client-ours client-linux linux-fw sys-firewall; do xl destroy $dd 2>/dev/null; done
echo "QFW-BENCH-END"
