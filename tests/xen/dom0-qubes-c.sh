# Sourced by dom0-test.sh (inside dom0, after its own checks and the
# firewall's shutdown) when run.sh packed Qubes' own C dom0 programs
# (tests/xen/build-qubes-c.sh: qubesdb-daemon, qubesdb-cmd, qrexec-daemon,
# qrexec-client, BACKEND_VMM=xen) into /usr/lib/qubes-c: the firewall is
# started again, this time served by Qubes' qubesdb-daemon (seeded with
# Qubes' qubesdb-write) and Qubes' qrexec-daemon, and Qubes' qrexec-client
# calls qubes.FirewallStatus. Uses dom0-test.sh's check/waitcount/up/since,
# $CONS, $QDB_BASE, stop_qdb and $QREXEC_PID. Every check names "qubes-c".
QCB=/usr/lib/qubes-c
if [ -x $QCB/qubesdb-daemon ] && [ -x $QCB/qrexec-daemon ]; then
    echo "QFW: qubes-c pass: the firewall with Qubes' C qubesdb-daemon and qrexec-daemon/qrexec-client in dom0"
    stop_qdb sys-firewall
    kill "$QREXEC_PID" 2>/dev/null
    xl destroy sys-firewall 2>/dev/null
    sleep 1
    rm -f /var/run/qubes/qubesdb.sys-firewall.sock /var/run/qubes/qubesdb.sys-firewall.pid /var/run/qubes/qrexec.sys-firewall /var/log/qubes/qubesdb.sys-firewall.log
    mkdir -p /tmp/qc
    for c in read write rm list multiread watch; do ln -sf $QCB/qubesdb-cmd /tmp/qc/qubesdb-$c; done
    LOG=$CONS/guest-sys-firewall.log
    n_conn=$(grep -c "QubesDB and qrexec" $LOG 2>/dev/null); n_sync=$(grep -c "QubesDB: synchronised" $LOG 2>/dev/null)
    n_net=$(grep -c "netfront device/vif/0 connected" $LOG 2>/dev/null)
    cp /tmp/fw.cfg /tmp/fw-qc.cfg
    tq=$(up)
    xl create -p /tmp/fw-qc.cfg; rc=$?
    qdomid=$(xl domid sys-firewall 2>/dev/null)
    quuid=$(xenstore-read /local/domain/$qdomid/vm 2>/dev/null | sed 's|^/vm/||')
    echo "QFW: qubes-c: firewall is domain $qdomid (uuid $quuid), xl create rc=$rc"
    $QCB/qubesdb-daemon "$qdomid" sys-firewall; r1=$?
    # shellcheck disable=SC2086
    /tmp/qc/qubesdb-write -d sys-firewall $QDB_BASE $QDB_NET; r2=$?
    check "qubes-c qubesdb-daemon $qdomid sys-firewall started (rc=$r1) and seeded with Qubes' qubesdb-write, network keys included (rc=$r2)" $([ $r1 = 0 ] && [ $r2 = 0 ] && echo ok)
    xl unpause sys-firewall
    $QCB/qrexec-daemon -D -u "$quuid" "$qdomid" sys-firewall root > /tmp/qc-qrexec-daemon.log 2>&1 &
    QC_QREXEC_PID=$!
    if waitcount $LOG "QubesDB and qrexec" $((n_conn + 1)) 900; then
        echo "QFW-MEASURE qubes-c: xl create -> \"QubesDB and qrexec ... connected\" in $(since $tq) s"
        check "qubes-c: firewall's QubesDB and qrexec agents connected to Qubes' C daemons" ok
    else
        check "qubes-c: firewall's QubesDB and qrexec agents connected to Qubes' C daemons" no
    fi
    waitcount $LOG "QubesDB: synchronised" $((n_sync + 1)) 50
    check "qubes-c: firewall synchronised with Qubes' qubesdb-daemon over real vchan (libvchan-xen server)" $(waitcount $LOG "QubesDB: synchronised" $((n_sync + 1)) 1 && echo ok)
    v=$(/tmp/qc/qubesdb-read -d sys-firewall /qubes-vm-type 2>&1)
    check "qubes-c: Qubes' qubesdb-read reads back /qubes-vm-type ($v)" $([ "$v" = ProxyVM ] && echo ok)
    waitcount $LOG "netfront device/vif/0 connected" $((n_net + 1)) 300
    check "qubes-c: netfront connected to dom0's netback (network keys from Qubes' qubesdb-daemon)" $(waitcount $LOG "netfront device/vif/0 connected" $((n_net + 1)) 1 && echo ok)
    i=0; until /tmp/qc/qubesdb-read -d sys-firewall /qubes-iptables-error >/dev/null 2>&1 || [ $i -ge 100 ]; do sleep 0.1; i=$((i+1)); done
    v=$(/tmp/qc/qubesdb-read -d sys-firewall /qubes-iptables-error 2>&1); r=$?
    check "qubes-c: firewall wrote /qubes-iptables-error to Qubes' qubesdb-daemon, read back with Qubes' qubesdb-read (rc=$r: '$v')" $([ $r = 0 ] && echo ok)
    i=0; until [ -S /var/run/qubes/qrexec.$qdomid ] || [ $i -ge 300 ]; do sleep 0.1; i=$((i+1)); done
    [ -S /var/run/qubes/qrexec.$qdomid ] && kill -0 $QC_QREXEC_PID 2>/dev/null
    check "qubes-c: Qubes' qrexec-daemon did the HELLO with the agent over real vchan and listens" $([ $? = 0 ] && echo ok)
    ts=$(up)
    timeout 60 $QCB/qrexec-client -d sys-firewall 'DEFAULT:QUBESRPC qubes.FirewallStatus dom0' > /tmp/qc-status.txt 2>&1; r=$?
    echo "QFW-MEASURE qubes-c: Qubes' qrexec-client -d sys-firewall qubes.FirewallStatus: rc=$r in $(since $ts) s"
    sed 's/^/QFW-STATUS qubes-c /' /tmp/qc-status.txt | head -20
    check "qubes-c: Qubes' qrexec-client -d sys-firewall 'DEFAULT:QUBESRPC qubes.FirewallStatus dom0' printed the status (rc=$r)" $([ $r = 0 ] && grep -q "^qubes-firewall status" /tmp/qc-status.txt && echo ok)
    grep -q "^ip: 10.137.0.2" /tmp/qc-status.txt
    check "qubes-c: FirewallStatus shows the config read from Qubes' qubesdb-daemon (ip: 10.137.0.2)" $([ $? = 0 ] && echo ok)
    # A live write through Qubes' qubesdb-write (a client's rules and their
    # commit) must reach the running firewall (its QubesDB entry count grows).
    e1=$(sed -n 's/^qubesdb: entries \([0-9]*\).*/\1/p' /tmp/qc-status.txt)
    /tmp/qc/qubesdb-write -d sys-firewall /qubes-firewall/10.137.0.10/policy drop /qubes-firewall/10.137.0.10/0000 action=accept /qubes-firewall/10.137.0.10 ''; r=$?
    i=0; e2=$e1
    while [ $i -lt 20 ]; do
        timeout 60 $QCB/qrexec-client -d sys-firewall 'DEFAULT:QUBESRPC qubes.FirewallStatus dom0' > /tmp/qc-status3.txt 2>&1
        e2=$(sed -n 's/^qubesdb: entries \([0-9]*\).*/\1/p' /tmp/qc-status3.txt)
        [ -n "$e1" ] && [ -n "$e2" ] && [ "$e2" -gt "$e1" ] && break
        sleep 0.5; i=$((i+1))
    done
    check "qubes-c: a live qubesdb-write (rc=$r) of client rules reaches the firewall through Qubes' daemon (QubesDB entries $e1 -> $e2)" $([ -n "$e1" ] && [ -n "$e2" ] && [ "$e2" -gt "$e1" ] && echo ok)
    # Mixed pair, for information: our qrexec-client through Qubes' daemon.
    timeout 60 qrexec-client -d sys-firewall 'DEFAULT:QUBESRPC qubes.FirewallStatus dom0' > /tmp/qc-status2.txt 2>&1; r=$?
    if [ $r = 0 ] && grep -q "^qubes-firewall status" /tmp/qc-status2.txt; then echo "QFW-INFO ok   qubes-c: our qrexec-client through Qubes' qrexec-daemon"; else echo "QFW-INFO FAIL qubes-c: our qrexec-client through Qubes' qrexec-daemon (rc=$r): $(head -3 /tmp/qc-status2.txt | tr '\n' ' ')"; fi
    sed 's/^/QFW: qubes-c qrexec-daemon: /' /tmp/qc-qrexec-daemon.log | tail -15
    sed 's/^/QFW: qubes-c qubesdb-daemon: /' /var/log/qubes/qubesdb.sys-firewall.log 2>/dev/null | tail -10
    tq=$(up)
    xl shutdown sys-firewall; rc=$?
    i=0; until xl list sys-firewall 2>/dev/null | awk 'NR==2{exit !($5 ~ /s/)}' || [ $i -ge 300 ]; do sleep 0.1; i=$((i+1)); done
    qstate=$(xl list sys-firewall 2>/dev/null | awk 'NR==2{print $5}')
    echo "QFW-MEASURE qubes-c: xl shutdown -> state $qstate in $(since $tq) s"
    case "$qstate" in *c*) qok=no ;; *s*) qok=ok ;; *) qok=no ;; esac
    check "qubes-c: xl shutdown (rc=$rc) leaves the firewall shut down, not crashed ($qstate)" $([ $rc = 0 ] && echo $qok)
    kill $QC_QREXEC_PID 2>/dev/null
    # shellcheck disable=SC2046
    kill $(pidof qubesdb-daemon 2>/dev/null) 2>/dev/null
    xl destroy sys-firewall 2>/dev/null
fi
