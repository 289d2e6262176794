#!/bin/bash
# Mixed pairs over the UNIX-socket vchan, ours and Qubes' (C build from
# run.sh) programs in every combination:
# - dom0 -> qube: qrexec-daemon x qrexec-agent x qrexec-client, a shell
#   command (output, exit code) and an RPC service with an argument;
# - qube -> qube through a policy program that allows: the daemons (both
#   ours or both Qubes') x the calling qube's qrexec-client-vm x its agent x
#   the target's agent, the seed's `test.Add` with an argument;
# - through a real policy file (our qrexec-policy-daemon on
#   /run/qubes/policy.sock, a tmpfs in a private mount namespace, where
#   Qubes' daemon looks for it), for vmA's daemon x vmB's daemon x the
#   caller's qrexec-client-vm x its agent x the target's agent (32), and 4
#   where our daemons run Qubes' qrexec-client for the call to dom0: the seed's
#   argument-specific `test.File+testfile1` qube -> qube (allowed: the file's
#   content), `test.File+testfile2` (denied: 126, no data), and qube -> dom0
#   (`test.Add+x` to @adminvm, run by the calling qube's daemon).
# Run tests/interop/run.sh once first (it builds Qubes' programs).
# Usage (root): tests/interop/pairs.sh     Prints one line per combination.
set -u
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
work=${INTEROP_DIR:-$root/target/interop}
user=${INTEROP_USER:-qrexec-test}
ours=${OUR_BIN_DIR:-$root/target/debug}
q=$work/src/qubes-core-qrexec
[ -x "$q/daemon/qrexec-daemon" ] || { echo "pairs.sh: run tests/interop/run.sh first" >&2; exit 2; }
prog() { # prog WHO NAME
    if [ "$1" = ours ]; then echo "$ours/$2"; else
        case $2 in qrexec-agent | qrexec-client-vm) echo "$q/agent/$2" ;; *) echo "$q/daemon/$2" ;; esac
    fi
}
failed=0
for d in ours qubes; do for a in ours qubes; do for c in ours qubes; do
    tmp=$(mktemp -d /tmp/qrexec-pairs.XXXXXX)
    mkdir -p "$tmp/run" "$tmp/rpc"
    printf '#!/bin/sh\nread a b\necho "$1: $(($a+$b))"\n' >"$tmp/rpc/test.Add"
    chmod 755 "$tmp/rpc/test.Add"
    chown -R "$user" "$tmp"
    result=$(runuser -u "$user" -- env -i PATH=/usr/bin:/bin HOME="$tmp" \
        A="$(prog $a qrexec-agent)" D="$(prog $d qrexec-daemon)" C="$(prog $c qrexec-client)" T="$tmp" \
        bash -c '
        U=$(id -un)
        VCHAN_DOMAIN=5 VCHAN_SOCKET_DIR=$T QREXEC_SERVICE_PATH=$T/rpc "$A" --no-fork-server --agent-socket=$T/agent.sock 2>>$T/agent.log &
        ap=$!
        VCHAN_DOMAIN=0 VCHAN_SOCKET_DIR=$T "$D" --uuid=d95e1147-2d82-4595-90bb-5a7500cc3196 --socket-dir=$T/run --policy-program=/bin/false --direct 5 vmA "$U" 2>>$T/daemon.log &
        dp=$!
        for i in $(seq 100); do [ -e $T/run/qrexec.vmA ] && break; sleep 0.1; done
        out1=$(VCHAN_DOMAIN=0 VCHAN_SOCKET_DIR=$T timeout 20 "$C" --socket-dir=$T/run -d vmA "DEFAULT:echo hello; exit 3" 2>>$T/client.log); rc1=$?
        out2=$(echo 1 2 | VCHAN_DOMAIN=0 VCHAN_SOCKET_DIR=$T timeout 20 "$C" --socket-dir=$T/run -d vmA "DEFAULT:QUBESRPC test.Add+x dom0" 2>>$T/client.log); rc2=$?
        kill $dp $ap 2>/dev/null; wait 2>/dev/null
        [ "$out1/$rc1" = "hello/3" ] && [ "$out2/$rc2" = "x: 3/0" ] && echo ok || echo "FAIL (command: \"$out1\" $rc1, service: \"$out2\" $rc2)"
    ')
    echo "daemon=$d agent=$a client=$c: $result"
    case $result in ok) rm -rf "$tmp" ;; *) failed=1; echo "  logs in $tmp" ;; esac
done; done; done
for d in ours qubes; do for cv in ours qubes; do for a in ours qubes; do for b in ours qubes; do
    tmp=$(mktemp -d /tmp/qrexec-pairs.XXXXXX)
    mkdir -p "$tmp/run" "$tmp/rpcA" "$tmp/rpcB"
    printf '#!/bin/sh\nread a b\necho "$1: $(($a+$b))"\n' >"$tmp/rpcB/test.Add"
    printf '#!/bin/sh\n# -- SOURCE TARGET SERVICE\necho "$2 $3 $4" >>%s/policy.log\nprintf "result=allow\\nuser=%s\\ntarget=%%s\\nrequested_target=%%s\\nautostart=False\\n" "$3" "$3"\n' "$tmp" "$user" >"$tmp/policy"
    chmod 755 "$tmp/rpcB/test.Add" "$tmp/policy"
    chown -R "$user" "$tmp"
    result=$(runuser -u "$user" -- env -i PATH=/usr/bin:/bin HOME="$tmp" \
        A="$(prog $a qrexec-agent)" B="$(prog $b qrexec-agent)" D="$(prog $d qrexec-daemon)" \
        CV="$(prog $cv qrexec-client-vm)" T="$tmp" \
        bash -c '
        U=$(id -un)
        VCHAN_DOMAIN=5 VCHAN_SOCKET_DIR=$T QREXEC_SERVICE_PATH=$T/rpcA "$A" --no-fork-server --agent-socket=$T/agent5.sock 2>>$T/agent5.log &
        p1=$!
        VCHAN_DOMAIN=6 VCHAN_SOCKET_DIR=$T QREXEC_SERVICE_PATH=$T/rpcB "$B" --no-fork-server --agent-socket=$T/agent6.sock 2>>$T/agent6.log &
        p2=$!
        VCHAN_DOMAIN=0 VCHAN_SOCKET_DIR=$T QREXEC_POLICY_SOCKET=$T/no-policy-daemon "$D" --uuid=d95e1147-2d82-4595-90bb-5a7500cc3196 --socket-dir=$T/run --policy-program=$T/policy --direct 5 vmA "$U" 2>>$T/daemon5.log &
        p3=$!
        VCHAN_DOMAIN=0 VCHAN_SOCKET_DIR=$T QREXEC_POLICY_SOCKET=$T/no-policy-daemon "$D" --uuid=a95e1147-2d82-4595-90bb-5a7500cc3196 --socket-dir=$T/run --policy-program=$T/policy --direct 6 vmB "$U" 2>>$T/daemon6.log &
        p4=$!
        for i in $(seq 100); do [ -e $T/run/qrexec.vmA ] && [ -e $T/run/qrexec.vmB ] && [ -e $T/agent5.sock ] && break; sleep 0.1; done
        out=$(echo 1 2 | VCHAN_DOMAIN=5 VCHAN_SOCKET_DIR=$T timeout 20 "$CV" --agent-socket=$T/agent5.sock vmB test.Add+x 2>>$T/client-vm.log); rc=$?
        kill $p1 $p2 $p3 $p4 2>/dev/null; wait 2>/dev/null
        [ "$out/$rc" = "x: 3/0" ] && echo ok || echo "FAIL (\"$out\" $rc)"
    ')
    echo "vmA->vmB test.Add: daemons=$d client-vm=$cv agentA=$a agentB=$b: $result"
    case $result in ok) rm -rf "$tmp" ;; *) failed=1; echo "  logs in $tmp" ;; esac
done; done; done; done
policy_daemon=$ours/qrexec-policy-daemon
[ -x "$policy_daemon" ] || { echo "pairs.sh: $policy_daemon missing (cargo build --workspace --bins)" >&2; exit 2; }
policy_case() { # policy_case DAEMON_A DAEMON_B CLIENT_VM AGENT_A AGENT_B [QREXEC_CLIENT_FOR_OUR_DAEMONS]
    local da=$1 db=$2 cv=$3 a=$4 b=$5 qc=${6:-} tmp result
    tmp=$(mktemp -d /tmp/qrexec-pairs.XXXXXX)
    mkdir -p "$tmp/run" "$tmp/rpcA" "$tmp/rpcB" "$tmp/rpc0" "$tmp/policy.d" "$tmp/files"
    printf '#!/bin/sh\nread a b\necho "$1: $(($a+$b))"\n' >"$tmp/rpc0/test.Add"
    printf '#!/bin/sh\n[ "$1" = "$QREXEC_SERVICE_ARGUMENT" ] || exit 9\ncat %s/files/"$1"\n' "$tmp" >"$tmp/rpcB/test.File"
    echo "content of testfile1" >"$tmp/files/testfile1"
    echo "content of testfile2" >"$tmp/files/testfile2"
    printf 'test.File +testfile1 vmA vmB allow\ntest.File * @anyvm @anyvm deny\ntest.Add +x vmA @adminvm allow\ntest.Add * @anyvm @anyvm deny\n' >"$tmp/policy.d/30-pairs.policy"
    printf '{"domains": {"dom0": {"type": "AdminVM", "power_state": "Running"}, "vmA": {"type": "AppVM", "power_state": "Running"}, "vmB": {"type": "AppVM", "power_state": "Running"}}}\n' >"$tmp/qubes.json"
    chmod 755 "$tmp/rpc0/test.Add" "$tmp/rpcB/test.File"
    cat >"$tmp/calls.sh" <<'EOF'
U=$(id -un)
# the qrexec-client our daemons run for calls to dom0
[ -n "$QC" ] && export QREXEC_CLIENT_PATH=$QC
S=/run/qubes/policy.sock
"$P" --socket-path $S --policy-path $T/policy.d --legacy-policy-path $T/legacy --system-info $T/qubes.json \
    --eval-socket-path $T/policy.EvalSimple --gui-socket-path $T/policy.EvalGUI 2>>$T/policy-daemon.log &
p0=$!
VCHAN_DOMAIN=5 VCHAN_SOCKET_DIR=$T QREXEC_SERVICE_PATH=$T/rpcA "$A" --no-fork-server --agent-socket=$T/agent5.sock 2>>$T/agent5.log &
p1=$!
VCHAN_DOMAIN=6 VCHAN_SOCKET_DIR=$T QREXEC_SERVICE_PATH=$T/rpcB "$B" --no-fork-server --agent-socket=$T/agent6.sock 2>>$T/agent6.log &
p2=$!
for i in $(seq 100); do [ -e $S ] && break; sleep 0.1; done
VCHAN_DOMAIN=0 VCHAN_SOCKET_DIR=$T QREXEC_SERVICE_PATH=$T/rpc0 QREXEC_POLICY_SOCKET=$S "$DA" --uuid=d95e1147-2d82-4595-90bb-5a7500cc3196 --socket-dir=$T/run --policy-program=/bin/false --direct 5 vmA "$U" 2>>$T/daemon5.log &
p3=$!
VCHAN_DOMAIN=0 VCHAN_SOCKET_DIR=$T QREXEC_SERVICE_PATH=$T/rpc0 QREXEC_POLICY_SOCKET=$S "$DB" --uuid=a95e1147-2d82-4595-90bb-5a7500cc3196 --socket-dir=$T/run --policy-program=/bin/false --direct 6 vmB "$U" 2>>$T/daemon6.log &
p4=$!
for i in $(seq 100); do [ -e $T/run/qrexec.vmA ] && [ -e $T/run/qrexec.vmB ] && [ -e $T/agent5.sock ] && break; sleep 0.1; done
cv() { VCHAN_DOMAIN=5 VCHAN_SOCKET_DIR=$T timeout 20 "$CV" --agent-socket=$T/agent5.sock "$@" </dev/null 2>>$T/client-vm.log; }
out1=$(cv vmB test.File+testfile1); rc1=$?
out2=$(cv vmB test.File+testfile2); rc2=$?
out3=$(echo 1 2 | VCHAN_DOMAIN=5 VCHAN_SOCKET_DIR=$T timeout 20 "$CV" --agent-socket=$T/agent5.sock @adminvm test.Add+x 2>>$T/client-vm.log); rc3=$?
kill $p0 $p1 $p2 $p3 $p4 2>/dev/null; wait 2>/dev/null
[ "$out1/$rc1" = "content of testfile1/0" ] && [ "$out2/$rc2" = "/126" ] && [ "$out3/$rc3" = "x: 3/0" ] && echo ok ||
    echo "FAIL (test.File+testfile1: \"$out1\" $rc1, test.File+testfile2: \"$out2\" $rc2, to dom0: \"$out3\" $rc3)"
EOF
    chown -R "$user" "$tmp"
    # Qubes' daemon asks the policy daemon at /run/qubes/policy.sock only:
    # a private tmpfs on /run, in a private mount namespace.
    result=$(unshare -m --propagation private bash -c 'mount -t tmpfs -o mode=755 pairs /run && mkdir -m 1777 /run/qubes && exec "$@"' sh \
        runuser -u "$user" -- env -i PATH=/usr/bin:/bin HOME="$tmp" \
        A="$(prog $a qrexec-agent)" B="$(prog $b qrexec-agent)" DA="$(prog $da qrexec-daemon)" DB="$(prog $db qrexec-daemon)" QC="$qc" \
        CV="$(prog $cv qrexec-client-vm)" P="$policy_daemon" T="$tmp" bash "$tmp/calls.sh")
    echo "policy file: test.File vmA->vmB, test.Add vmA->dom0: daemonA=$da daemonB=$db client-vm=$cv agentA=$a agentB=$b${qc:+ qrexec-client-for-our-daemons=qubes}: $result"
    case $result in ok) rm -rf "$tmp" ;; *) failed=1; echo "  logs in $tmp" ;; esac
}
for da in ours qubes; do for db in ours qubes; do for cv in ours qubes; do for a in ours qubes; do for b in ours qubes; do
    policy_case $da $db $cv $a $b
done; done; done; done; done
# Our daemon runs qrexec-client for a call to dom0 (Qubes 4.4's runs the
# service itself): also with Qubes' qrexec-client.
for cv in ours qubes; do for a in ours qubes; do
    policy_case ours ours $cv $a ours "$(prog qubes qrexec-client)"
done; done
exit $failed
