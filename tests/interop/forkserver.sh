#!/bin/bash
# The fork server, ours and Qubes' (C build from run.sh), in every pairing
# with the agent, ours and Qubes': the agent is started with
# --fork-server-socket=DIR/fs.%s.sock, the user's fork server listens on
# DIR/fs.USER.sock; a dom0 call (our daemon and qrexec-client) of an RPC
# service with an argument and of a shell command must be run by the fork
# server (it has RUN_BY=fork-server in its environment, the agent
# RUN_BY=agent). Then, with the fork server gone, the agent runs the call.
# Run tests/interop/run.sh once first (it builds Qubes' programs).
# Usage (root): tests/interop/forkserver.sh     One line per pairing.
set -u
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
work=${INTEROP_DIR:-$root/target/interop}
user=${INTEROP_USER:-qrexec-test}
ours=${OUR_BIN_DIR:-$root/target/debug}
q=$work/src/qubes-core-qrexec
[ -x "$q/agent/qrexec-fork-server" ] || { echo "forkserver.sh: run tests/interop/run.sh first" >&2; exit 2; }
[ -x "$ours/qrexec-fork-server" ] || { echo "forkserver.sh: $ours/qrexec-fork-server missing (cargo build -p qrexec --bins)" >&2; exit 2; }
failed=0
for a in ours qubes; do for f in ours qubes; do
    tmp=$(mktemp -d /tmp/qrexec-forkserver.XXXXXX)
    mkdir -p "$tmp/run" "$tmp/rpc"
    printf '#!/bin/sh\necho "$RUN_BY $1"\n' >"$tmp/rpc/test.Where"
    chmod 755 "$tmp/rpc/test.Where"
    chown -R "$user" "$tmp"
    if [ $a = ours ]; then A=$ours/qrexec-agent; else A=$q/agent/qrexec-agent; fi
    if [ $f = ours ]; then F=$ours/qrexec-fork-server; else F=$q/agent/qrexec-fork-server; fi
    result=$(runuser -u "$user" -- env -i PATH=/usr/bin:/bin HOME="$tmp" \
        A="$A" F="$F" D="$ours/qrexec-daemon" C="$ours/qrexec-client" T="$tmp" \
        bash -c '
        U=$(id -un)
        RUN_BY=agent VCHAN_DOMAIN=5 VCHAN_SOCKET_DIR=$T QREXEC_SERVICE_PATH=$T/rpc "$A" --fork-server-socket=$T/fs.%s.sock --agent-socket=$T/agent.sock 2>>$T/agent.log &
        ap=$!
        VCHAN_DOMAIN=0 VCHAN_SOCKET_DIR=$T QREXEC_POLICY_SOCKET=$T/none "$D" --uuid=d95e1147-2d82-4595-90bb-5a7500cc3196 --socket-dir=$T/run --policy-program=/bin/false --direct 5 vmA "$U" 2>>$T/daemon.log &
        dp=$!
        # Qubes fork server forks into the background: its own process group.
        RUN_BY=fork-server VCHAN_DOMAIN=5 VCHAN_SOCKET_DIR=$T QREXEC_SERVICE_PATH=$T/rpc setsid "$F" $T/fs.$U.sock 2>>$T/fork-server.log &
        fp=$!
        for i in $(seq 100); do [ -e $T/run/qrexec.vmA ] && [ -e $T/fs.$U.sock ] && break; sleep 0.1; done
        call() { VCHAN_DOMAIN=0 VCHAN_SOCKET_DIR=$T timeout 20 "$C" --socket-dir=$T/run -d vmA "$1" 2>>$T/client.log; echo "/$?"; }
        out1=$(call "DEFAULT:QUBESRPC test.Where+x dom0")
        out2=$(call "DEFAULT:echo \$RUN_BY")
        kill -- -$fp 2>/dev/null; sleep 0.5; rm -f $T/fs.$U.sock
        out3=$(call "DEFAULT:QUBESRPC test.Where+y dom0")
        kill $dp $ap 2>/dev/null; wait 2>/dev/null
        if [ "$out1" = "fork-server x
/0" ] && [ "$out2" = "fork-server
/0" ] && [ "$out3" = "agent y
/0" ]; then echo ok; else echo "FAIL (service: \"$out1\", command: \"$out2\", without fork server: \"$out3\")" | tr "\n" " "; fi
    ')
    echo "agent=$a fork-server=$f: $result"
    case $result in ok) rm -rf "$tmp" ;; *) failed=1; echo "  logs in $tmp" ;; esac
done; done
exit $failed
