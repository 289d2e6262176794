#!/bin/bash
# Benchmark: our qrexec programs against Qubes' C build (the one run.sh
# builds, BACKEND_VMM=socket over qubes-core-vchan-socket), in one run,
# interleaved call by call (ours, Qubes', ours, Qubes', ...), in the socket
# layout pairs.sh uses: two qubes vmA (domain 5) and vmB (domain 6), each
# with its agent and its daemon in dom0; each implementation has its own
# vchan socket dir and daemon socket dir, both run at the same time.
#
# Both sets use the same policy daemon (ours, qrexec-policy-daemon on
# /run/qubes/policy.sock in a private mount namespace, where Qubes' daemon
# asks and where ours is pointed by QREXEC_POLICY_SOCKET), so for VM->VM only
# the qrexec programs (daemon, agent, client, client-vm) differ.
#
# Measures: call latency (BENCH_CALLS calls each, default 200; median and
# p90) of an empty service dom0->vmA (qrexec-client) and vmA->vmB through
# policy (qrexec-client-vm); throughput of BENCH_BYTES (default 1 GiB)
# dom0->vmA (client stdin -> service stdin), vmA->dom0 (service stdout ->
# client stdout), vmA->vmB (service stdout -> qrexec-client-vm stdout), in
# BENCH_ROUNDS rounds (default 3; the median round is reported). Byte counts
# are checked. Also: the floor of a call, in the same loop as the dom0->VM
# calls (exec of /bin/true, then the service script run directly: what any
# implementation pays at least, both started as the calls are), each
# client's exec alone (no arguments: usage), and the CPU time per call of
# all processes of each implementation (BENCH_CPU_CALLS calls of each kind,
# default 200, one implementation at a time; clock-tick accounting, less
# sensitive to other load than latency). Prints a table with the ratio
# ours/Qubes'.
# This is a measurement, not a test: it asserts no timing.
#
# Usage (root): OUR_BIN_DIR=target/release tests/interop/bench.sh
# (`cargo xtask bench qrexec` builds everything and runs it.)
# Run tests/interop/run.sh once first (it builds Qubes' programs).
set -u
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
work=${INTEROP_DIR:-$root/target/interop}
# Its own user: run.sh's watchdog kills long-lived processes of its user.
user=${BENCH_USER:-qrexec-bench}
ours=${OUR_BIN_DIR:-$root/target/release}
q=$work/src/qubes-core-qrexec
calls=${BENCH_CALLS:-200}
rounds=${BENCH_ROUNDS:-3}
cpu_calls=${BENCH_CPU_CALLS:-200}
bytes=${BENCH_BYTES:-1073741824}
[ "$(id -u)" = 0 ] || { echo "bench.sh: must run as root (private mount namespace, runs as user '$user')" >&2; exit 2; }
[ -x "$q/daemon/qrexec-daemon" ] || { echo "bench.sh: Qubes' build missing in $q: run tests/interop/run.sh first" >&2; exit 2; }
if ! id -u "$user" >/dev/null 2>&1; then
    useradd --system --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin "$user" ||
        { echo "bench.sh: could not create user '$user'" >&2; exit 2; }
fi
for b in qrexec-daemon qrexec-client qrexec-agent qrexec-client-vm qrexec-policy-daemon; do
    [ -x "$ours/$b" ] || { echo "bench.sh: $ours/$b not found (cargo build --release -p qrexec -p qrexec-policy --bins)" >&2; exit 2; }
done
[ $((bytes % 65536)) = 0 ] || { echo "bench.sh: BENCH_BYTES must be a multiple of 65536" >&2; exit 2; }
for d in $ours $q; do while [ "$d" != / ]; do chmod o+x "$d" 2>/dev/null || true; d=$(dirname "$d"); done; done
chmod -R o+rX "$work/src" 2>/dev/null || true

tmp=$(mktemp -d /tmp/qrexec-bench.XXXXXX)
for impl in ours qubes; do
    mkdir -p "$tmp/$impl/run" "$tmp/$impl/rpc"
done
mkdir -p "$tmp/policy.d"
for impl in ours qubes; do
    r=$tmp/$impl/rpc
    printf '#!/bin/sh\nexit 0\n' >"$r/test.Nop"
    printf '#!/bin/sh\nexec wc -c\n' >"$r/test.Sink"
    printf '#!/bin/sh\nexec dd if=/dev/zero bs=65536 count=%d status=none\n' $((bytes / 65536)) >"$r/test.Source"
    chmod 755 "$r"/test.*
done
printf 'test.Nop * vmA vmB allow\ntest.Source * vmA vmB allow\ntest.Nop * @anyvm @anyvm deny\ntest.Source * @anyvm @anyvm deny\n' >"$tmp/policy.d/30-bench.policy"
printf '{"domains": {"dom0": {"type": "AdminVM", "power_state": "Running"}, "vmA": {"type": "AppVM", "power_state": "Running"}, "vmB": {"type": "AppVM", "power_state": "Running"}}}\n' >"$tmp/qubes.json"
cat >"$tmp/bench-inner.sh" <<'EOF'
U=$(id -un)
S=/run/qubes/policy.sock
prog() { # prog IMPL NAME
    if [ "$1" = ours ]; then echo "$OURS/$2"; else
        case $2 in qrexec-agent | qrexec-client-vm) echo "$Q/agent/$2" ;; *) echo "$Q/daemon/$2" ;; esac
    fi
}
"$OURS/qrexec-policy-daemon" --socket-path $S --policy-path $T/policy.d --legacy-policy-path $T/legacy --system-info $T/qubes.json \
    --eval-socket-path $T/policy.EvalSimple --gui-socket-path $T/policy.EvalGUI 2>>$T/policy-daemon.log &
pids=$!
for i in $(seq 100); do [ -e $S ] && break; sleep 0.1; done
for impl in ours qubes; do
    I=$T/$impl
    for dom in 5 6; do
        VCHAN_DOMAIN=$dom VCHAN_SOCKET_DIR=$I QREXEC_SERVICE_PATH=$I/rpc "$(prog $impl qrexec-agent)" --no-fork-server --agent-socket=$I/agent$dom.sock 2>>$I/agent$dom.log &
        pids="$pids $!"
    done
    VCHAN_DOMAIN=0 VCHAN_SOCKET_DIR=$I QREXEC_SERVICE_PATH=$I/rpc QREXEC_POLICY_SOCKET=$S "$(prog $impl qrexec-daemon)" --uuid=d95e1147-2d82-4595-90bb-5a7500cc3196 --socket-dir=$I/run --policy-program=/bin/false --direct 5 vmA "$U" 2>>$I/daemon5.log &
    pids="$pids $!"
    VCHAN_DOMAIN=0 VCHAN_SOCKET_DIR=$I QREXEC_SERVICE_PATH=$I/rpc QREXEC_POLICY_SOCKET=$S "$(prog $impl qrexec-daemon)" --uuid=a95e1147-2d82-4595-90bb-5a7500cc3196 --socket-dir=$I/run --policy-program=/bin/false --direct 6 vmB "$U" 2>>$I/daemon6.log &
    pids="$pids $!"
done
for i in $(seq 200); do
    ready=1
    for impl in ours qubes; do
        for f in run/qrexec.vmA run/qrexec.vmB agent5.sock agent6.sock; do [ -e $T/$impl/$f ] || ready=0; done
    done
    [ $ready = 1 ] && break
    sleep 0.1
done
[ $ready = 1 ] || { echo "setup: daemons/agents not ready in 20 s; logs in $T" >&2; kill $pids; exit 1; }
dom0_call() { # IMPL SERVICE
    VCHAN_DOMAIN=0 VCHAN_SOCKET_DIR=$T/$1 "$(prog $1 qrexec-client)" --socket-dir=$T/$1/run -d vmA "DEFAULT:QUBESRPC $2 dom0" 2>>$T/$1/client.log
}
vm_call() { # IMPL SERVICE
    VCHAN_DOMAIN=5 VCHAN_SOCKET_DIR=$T/$1 "$(prog $1 qrexec-client-vm)" --agent-socket=$T/$1/agent5.sock vmB "$2" 2>>$T/$1/client-vm.log
}
us() { local t=${EPOCHREALTIME/./}; echo $((10#$t)); }
fails=0
for what in dom0-vm vm-vm; do
    for i in $(seq $CALLS); do
        for impl in ours qubes; do
            t0=$(us)
            if [ $what = dom0-vm ]; then dom0_call $impl test.Nop </dev/null >/dev/null; else vm_call $impl test.Nop </dev/null >/dev/null; fi
            rc=$?
            t1=$(us)
            if [ $rc = 0 ]; then echo "lat $what $impl $((t1 - t0))"; else fails=$((fails + 1)); echo "fail lat $what $impl rc=$rc"; fi
        done
        [ $what = dom0-vm ] || continue
        # The floor, in the same loop: what any implementation pays for a
        # call at least, started the same way (bash forks and execs a
        # program, then the service script runs): a trivial program's exec
        # followed by the service run directly; and each client's exec alone
        # (no arguments: it prints its usage and exits).
        t0=$(us)
        /bin/true && "$T/qubes/rpc/test.Nop" </dev/null >/dev/null
        t1=$(us)
        echo "lat floor-call floor $((t1 - t0))"
        for impl in ours qubes; do
            t0=$(us)
            "$(prog $impl qrexec-client)" </dev/null >/dev/null 2>&1
            t1=$(us)
            echo "lat floor-client $impl $((t1 - t0))"
        done
        t0=$(us)
        /bin/true
        t1=$(us)
        echo "lat floor-true floor $((t1 - t0))"
    done
done
# CPU time per call (all processes of one implementation: the client, run
# by this shell, and the daemons and agents with the processes they started
# and reaped: services, per-call processes), in a block of calls of one kind
# and one implementation at a time. Less sensitive to other load than
# latency. /proc/PID/stat fields 14-17 (utime stime cutime cstime) and the
# shell's `times` are in clock ticks; the policy daemon is shared and
# counted apart.
tck=$(getconf CLK_TCK)
cpu() { local v; v=$(awk '{print $14+$15+$16+$17}' /proc/$1/stat 2>/dev/null); echo "${v:-0}"; }
# `times` in this shell (not in a subshell, whose children are its own):
# the second line is the reaped children's user and system time; in µs.
kids() { # sets KIDS
    times >"$T/times.txt"
    KIDS=$(awk 'NR == 2 {split($1, u, "m"); split($2, s, "m"); printf "%d\n", (u[1] * 60 + u[2] + s[1] * 60 + s[2]) * 1000000 + 0.5}' "$T/times.txt")
}
pd=$(pgrep -u "$U" -f "qrexec-policy-daemon --socket-path $S")
for what in dom0-vm vm-vm; do
    for impl in ours qubes; do
        procs=$(pgrep -u "$U" -f "$T/$impl/(agent[56][.]sock|run --policy-program)" | tr '\n' ' ')
        b=0; for p in $procs; do b=$((b + $(cpu $p))); done
        bp=$(cpu $pd); kids; bk=$KIDS
        for i in $(seq $CPU_CALLS); do
            if [ $what = dom0-vm ]; then dom0_call $impl test.Nop </dev/null >/dev/null; else vm_call $impl test.Nop </dev/null >/dev/null; fi
        done
        kids; ak=$KIDS
        a=0; for p in $procs; do a=$((a + $(cpu $p))); done
        # client (with the shell's fork for it) + daemons and agents, in µs per call
        echo "cpu $what $impl $(( (ak - bk) / CPU_CALLS + (a - b) * 1000000 / tck / CPU_CALLS )) $(( ($(cpu $pd) - bp) * 1000000 / tck / CPU_CALLS ))"
    done
done
blocks=$((BYTES / 65536))
for r in $(seq $ROUNDS); do
    for impl in ours qubes; do
        t0=$(us)
        n=$(dd if=/dev/zero bs=65536 count=$blocks status=none | dom0_call $impl test.Sink)
        t1=$(us)
        [ "$n" = "$BYTES" ] && echo "tput dom0-vm $impl $((t1 - t0))" || { fails=$((fails + 1)); echo "fail tput dom0-vm $impl got '$n'"; }
        t0=$(us)
        n=$(dom0_call $impl test.Source </dev/null | wc -c)
        t1=$(us)
        [ "$n" = "$BYTES" ] && echo "tput vm-dom0 $impl $((t1 - t0))" || { fails=$((fails + 1)); echo "fail tput vm-dom0 $impl got '$n'"; }
        t0=$(us)
        n=$(vm_call $impl test.Source </dev/null | wc -c)
        t1=$(us)
        [ "$n" = "$BYTES" ] && echo "tput vm-vm $impl $((t1 - t0))" || { fails=$((fails + 1)); echo "fail tput vm-vm $impl got '$n'"; }
    done
done
kill $pids 2>/dev/null
wait 2>/dev/null
echo "fails $fails"
EOF
chown -R "$user" "$tmp"
echo "bench.sh: $calls calls x 2 kinds x 2 implementations, then $rounds rounds of 3 transfers of $bytes bytes each; load average: $(cut -d' ' -f1-3 /proc/loadavg)" >&2
unshare -m --propagation private bash -c 'mkdir -p /run/qubes && mount -t tmpfs -o mode=1777 bench /run/qubes && exec "$@"' sh \
    runuser -u "$user" -- env -i PATH=/usr/bin:/bin HOME="$tmp" \
    OURS="$ours" Q="$q" T="$tmp" CALLS="$calls" CPU_CALLS="$cpu_calls" ROUNDS="$rounds" BYTES="$bytes" \
    bash "$tmp/bench-inner.sh" >"$tmp/raw.txt"
grep '^fail ' "$tmp/raw.txt" | head -5 >&2
awk -v bytes="$bytes" -v load="$(cut -d' ' -f1-3 /proc/loadavg)" '
function pick(a, n, p,   k) { k = int(p * n + 0.999999); if (k < 1) k = 1; if (k > n) k = n; return a[k] }
function sorted(key, out,   n, i, j, v) {
    n = split(vals[key], out, " ")
    for (i = 2; i <= n; i++) { v = out[i] + 0; for (j = i - 1; j >= 1 && out[j] + 0 > v; j--) out[j + 1] = out[j]; out[j + 1] = v }
    return n
}
/^lat |^tput / { vals[$1 " " $2 " " $3] = vals[$1 " " $2 " " $3] " " $4 }
/^cpu / { cpu[$2 " " $3] = $4 " " $5 }
/^fails / { fails = $2 }
END {
    printf "%-36s %12s %12s %12s\n", "measure", "ours", "Qubes'"'"'", "ours/Qubes'"'"'"
    split("dom0-vm vm-vm", kinds, " ")
    names["dom0-vm"] = "dom0->VM"; names["vm-vm"] = "VM->VM (policy)"; names["vm-dom0"] = "VM->dom0"
    for (k = 1; k <= 2; k++) {
        for (p = 1; p <= 2; p++) {
            pc = (p == 1) ? 0.5 : 0.9; label = (p == 1) ? "median" : "p90"
            no = sorted("lat " kinds[k] " ours", a); nq = sorted("lat " kinds[k] " qubes", b)
            if (no == 0 || nq == 0) { printf "%-36s %12s\n", "latency " names[kinds[k]] " " label " (ms)", "no data"; continue }
            o = pick(a, no, pc) / 1000; qq = pick(b, nq, pc) / 1000
            printf "%-36s %12.2f %12.2f %12.2f\n", "latency " names[kinds[k]] " " label " (ms)", o, qq, o / qq
        }
    }
    # The floor (see the latency loop): one figure for both, and the exec
    # of each client alone.
    split("floor-true floor-call", fl, " ")
    fnames["floor-true"] = "floor: /bin/true"; fnames["floor-call"] = "floor: true + service"
    for (k = 1; k <= 2; k++) {
        n = sorted("lat " fl[k] " floor", a)
        if (n > 0) printf "%-36s %12.2f %12s %12s\n", fnames[fl[k]] " median (ms)", pick(a, n, 0.5) / 1000, "(same)", ""
    }
    no = sorted("lat floor-client ours", a); nq = sorted("lat floor-client qubes", b)
    if (no > 0 && nq > 0) {
        o = pick(a, no, 0.5) / 1000; qq = pick(b, nq, 0.5) / 1000
        printf "%-36s %12.2f %12.2f %12.2f\n", "qrexec-client exec alone median (ms)", o, qq, o / qq
    }
    for (k = 1; k <= 2; k++) {
        split(cpu[kinds[k] " ours"], co, " "); split(cpu[kinds[k] " qubes"], cq, " ")
        if (co[1] == "" || cq[1] == "") continue
        printf "%-36s %12.2f %12.2f %12.2f\n", "CPU per call " names[kinds[k]] " (ms)", co[1] / 1000, cq[1] / 1000, (cq[1] > 0) ? co[1] / cq[1] : 0
        if (kinds[k] == "vm-vm") printf "%-36s %12.2f %12.2f\n", "  + shared policy daemon (ms)", co[2] / 1000, cq[2] / 1000
    }
    split("dom0-vm vm-dom0 vm-vm", dirs, " ")
    for (k = 1; k <= 3; k++) {
        no = sorted("tput " dirs[k] " ours", a); nq = sorted("tput " dirs[k] " qubes", b)
        if (no == 0 || nq == 0) { printf "%-36s %12s\n", "throughput " names[dirs[k]] " (MiB/s)", "no data"; continue }
        o = bytes / 1048576 / (pick(a, no, 0.5) / 1e6); qq = bytes / 1048576 / (pick(b, nq, 0.5) / 1e6)
        printf "%-36s %12.0f %12.0f %12.2f\n", "throughput " names[dirs[k]] " (MiB/s)", o, qq, o / qq
    }
    printf "(latency: %d calls each; throughput: median of rounds of %d bytes; failed calls: %s; load average at end: %s)\n", no_calls, bytes, fails, load
}' no_calls="$calls" "$tmp/raw.txt"
fails=$(awk '/^fails /{print $2}' "$tmp/raw.txt")
if [ "${fails:-x}" = 0 ]; then rm -rf "$tmp"; exit 0; fi
echo "bench.sh: some calls failed (or the run did not finish); raw figures and logs in $tmp" >&2
exit 1
