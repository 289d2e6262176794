# Sourced by dom0-test.sh (inside dom0, after the pass with our daemons)
# when run.sh packed Qubes' own C dom0 programs (tests/xen/build-qubes-c.sh:
# qubesdb-daemon, qubesdb-cmd, qrexec-daemon, qrexec-client, all built with
# BACKEND_VMM=xen) into /usr/lib/qubes-c. Defines the daemon set "qubes-c"
# for dom0-test.sh's firewall_pass, which then runs every QubesDB and qrexec
# check again with Qubes' programs in place of ours: Qubes' qubesdb-daemon
# (seeded and rewritten live with Qubes' qubesdb-write, read with its
# qubesdb-read), Qubes' qrexec-daemon (-D -u <uuid>), Qubes' qrexec-client.
# Check lines are prefixed "qubes-c: ".
QCB=/usr/lib/qubes-c
# use_qubes_c: selects the set; fails if the programs are missing.
use_qubes_c() {
    [ -x $QCB/qubesdb-daemon ] && [ -x $QCB/qubesdb-cmd ] && [ -x $QCB/qrexec-daemon ] && [ -x $QCB/qrexec-client ] || return 1
    # qubesdb-cmd picks its command from its name (qubesdb-read, -write, ...).
    mkdir -p /tmp/qc
    for c in read write rm list multiread watch; do ln -sf $QCB/qubesdb-cmd /tmp/qc/qubesdb-$c; done
    DSET=qubes-c PFX="qubes-c: "
    QDB_DAEMON=$QCB/qubesdb-daemon QDB_TOOLS=/tmp/qc
    QREXEC_DAEMON=$QCB/qrexec-daemon QREXEC_CLIENT=$QCB/qrexec-client
    QDB_WHO="Qubes' qubesdb-daemon" QREXEC_WHO="Qubes' qrexec-daemon" CLIENT_WHO="Qubes' qrexec-client"
}
