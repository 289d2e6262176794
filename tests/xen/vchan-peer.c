/*
 * vchan-peer: the dom0 side of the firewall's two control links, built
 * against Xen's own libxenvchan (Debian libxen-dev / libxenmisc4.17), for the
 * real-Xen boot test (tests/xen/run.sh). It is a test double, not a Qubes
 * tool: it plays just enough of dom0's qubesdb-daemon and qrexec-daemon to
 * prove that the firewall's Rust vchan client and server interoperate with
 * the C implementation byte for byte.
 *
 *   vchan-peer qubesdb DOMID   libxenvchan SERVER on /local/domain/0/data/vchan/DOMID/111
 *                              (as qubes-core-qubesdb db-daemon.c: dom0 serves, VM connects,
 *                              rings 4096/4096); waits for the VM's QDB_CMD_MULTIREAD with an
 *                              empty path, answers one QDB_RESP_MULTIREAD per entry and the
 *                              empty-path end marker; then answers WRITE/RM with QDB_RESP_OK
 *                              until the VM closes the vchan.
 *   vchan-peer qubesdb-net DOMID
 *                              the same, plus the network keys (/qubes-ip 10.137.0.2,
 *                              /qubes-gateway 10.137.0.1, DNS), so the firewall brings up its
 *                              uplink (netfront) towards dom0's bridge.
 *   vchan-peer qubesdb-client DOMID
 *                              the same with a client qube's keys (/qubes-ip 10.137.0.10,
 *                              /qubes-gateway 10.137.0.2): a second instance of the image plays a
 *                              client qube whose vif is served by the firewall's netback.
 *   vchan-peer hostile-qubesdb DOMID
 *                              the same server, but once the VM has sent its MULTIREAD it
 *                              corrupts the ring it writes (right.prod far past right.cons +
 *                              ring size) and notifies: the VM must drop the link (cli_live
 *                              0), not crash, and connect again later.
 *   vchan-peer qrexec DOMID    libxenvchan CLIENT of /local/domain/DOMID/data/vchan/0/512
 *                              (the VM's agent serves); reads the agent's MSG_HELLO, answers
 *                              MSG_HELLO version 3 (what qrexec-daemon does), then drains.
 *
 * Layouts: struct qdb_hdr { uint8_t type; char path[64]; uint32_t data_len; } (72 bytes,
 * qubes-core-qubesdb include/qubesdb.h); struct msg_header { uint32_t type, len; } and
 * MSG_HELLO 0x300 with struct peer_info { uint32_t version; } (qubes-core-qrexec libqrexec).
 * Every line it prints starts with "PEER-" so the test can grep the serial log.
 */
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <libxenvchan.h>

struct qdb_hdr {
    uint8_t type;
    char path[64];
    uint32_t data_len;
};
enum { QDB_CMD_WRITE = 1, QDB_CMD_MULTIREAD = 2, QDB_CMD_RM = 4, QDB_RESP_OK = 7, QDB_RESP_MULTIREAD = 11 };

struct msg_header {
    uint32_t type;
    uint32_t len;
};
#define MSG_HELLO 0x300

static volatile sig_atomic_t stop;

static void on_term(int sig)
{
    (void)sig;
    stop = 1;
}

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static int recv_all(struct libxenvchan *v, void *buf, size_t len)
{
    return libxenvchan_recv(v, buf, len) == (int)len ? 0 : -1;
}

static int send_all(struct libxenvchan *v, const void *buf, size_t len)
{
    return libxenvchan_send(v, buf, len) == (int)len ? 0 : -1;
}

static int send_qdb(struct libxenvchan *v, int type, const char *path, const char *data)
{
    struct qdb_hdr h;
    memset(&h, 0, sizeof h);
    h.type = type;
    strncpy(h.path, path, sizeof h.path - 1);
    h.data_len = data ? strlen(data) : 0;
    if (send_all(v, &h, sizeof h))
        return -1;
    return h.data_len ? send_all(v, data, h.data_len) : 0;
}

/* What dom0 would publish for a firewall VM with no network yet: no
 * /qubes-ip, so the firewall waits for its network keys (and still obeys
 * `xl shutdown`). */
static const char *entries[][2] = {
    { "/name", "sys-firewall" },
    { "/qubes-vm-type", "ProxyVM" },
    { "/qubes-vm-persistence", "none" },
    { "/qubes-debug-mode", "0" },
    { "/qubes-service/qubes-firewall", "1" },
};

static int hostile_qubesdb(int domid)
{
    char path[128];
    snprintf(path, sizeof path, "/local/domain/0/data/vchan/%d/111", domid);
    struct libxenvchan *v = libxenvchan_server_init(NULL, domid, path, 4096, 4096);
    if (!v) {
        printf("PEER-HOSTILE FAIL server_init %s\n", path);
        return 1;
    }
    v->blocking = 1;
    printf("PEER-HOSTILE server up at %s\n", path);
    struct qdb_hdr h;
    if (recv_all(v, &h, sizeof h)) {
        printf("PEER-HOSTILE FAIL no request from the VM\n");
        return 1;
    }
    printf("PEER-HOSTILE got type %u; corrupting right.prod\n", h.type);
    v->ring->right.prod = v->ring->right.cons + 0x10000;
    xenevtchn_notify(v->event, v->event_port);
    double t0 = now();
    while (libxenvchan_is_open(v) != 0 && now() - t0 < 20)
        usleep(10000);
    if (libxenvchan_is_open(v) == 0)
        printf("PEER-HOSTILE client closed the vchan after %.3f s\n", now() - t0);
    else
        printf("PEER-HOSTILE FAIL client kept the corrupt vchan open\n");
    libxenvchan_close(v);
    return 0;
}

/* The network keys dom0 writes once the firewall VM has a netvm
 * (`qubes-ip` etc.), for `qubesdb-net`: the lab's dom0 plays the net qube
 * on bridge xenbr0 at 10.137.0.1. */
static const char *net_entries[][2] = {
    { "/qubes-ip", "10.137.0.2" },
    { "/qubes-gateway", "10.137.0.1" },
    { "/qubes-primary-dns", "10.139.1.1" },
    { "/qubes-secondary-dns", "10.139.1.2" },
};
/* `qubesdb-client`: a client qube behind the firewall (10.137.0.10, its
 * gateway is the firewall's 10.137.0.2). */
static const char *client_entries[][2] = {
    { "/qubes-ip", "10.137.0.10" },
    { "/qubes-gateway", "10.137.0.2" },
    { "/qubes-primary-dns", "10.139.1.1" },
    { "/qubes-secondary-dns", "10.139.1.2" },
};
static int with_net, as_client;

static int qubesdb(int domid)
{
    char path[128];
    snprintf(path, sizeof path, "/local/domain/0/data/vchan/%d/111", domid);
    struct libxenvchan *v = libxenvchan_server_init(NULL, domid, path, 4096, 4096);
    if (!v) {
        printf("PEER-QUBESDB FAIL server_init %s\n", path);
        return 1;
    }
    v->blocking = 1;
    printf("PEER-QUBESDB server up at %s\n", path);
    fflush(stdout);
    double t0 = now();
    while (libxenvchan_is_open(v) == 2) {
        if (now() - t0 > 120) {
            printf("PEER-QUBESDB FAIL no client in 120 s\n");
            return 1;
        }
        usleep(10000);
    }
    printf("PEER-QUBESDB client connected after %.3f s\n", now() - t0);
    fflush(stdout);
    struct qdb_hdr h;
    int synced = 0, writes = 0;
    char data[3072];
    while (!stop && recv_all(v, &h, sizeof h) == 0) {
        if (h.data_len >= sizeof data) {
            printf("PEER-QUBESDB FAIL data_len %u too long\n", h.data_len);
            return 1;
        }
        if (h.data_len && recv_all(v, data, h.data_len))
            break;
        data[h.data_len] = 0;
        h.path[sizeof h.path - 1] = 0;
        if (h.type == QDB_CMD_MULTIREAD && !synced) {
            if (h.path[0] != 0 || h.data_len != 0) {
                printf("PEER-QUBESDB FAIL MULTIREAD path '%s' len %u\n", h.path, h.data_len);
                return 1;
            }
            for (size_t i = 0; i < sizeof entries / sizeof entries[0]; i++)
                send_qdb(v, QDB_RESP_MULTIREAD, entries[i][0], entries[i][1]);
            for (size_t i = 0; with_net && i < sizeof net_entries / sizeof net_entries[0]; i++)
                send_qdb(v, QDB_RESP_MULTIREAD, as_client ? client_entries[i][0] : net_entries[i][0],
                         as_client ? client_entries[i][1] : net_entries[i][1]);
            send_qdb(v, QDB_RESP_MULTIREAD, "", NULL);
            synced = 1;
            if (with_net && !as_client) {
                /* Then, as dom0 does for each client: the rules of client
                 * 10.137.0.10 (accept everything), then the commit. */
                send_qdb(v, QDB_CMD_WRITE, "/qubes-firewall/10.137.0.10/policy", "drop");
                send_qdb(v, QDB_CMD_WRITE, "/qubes-firewall/10.137.0.10/0000", "action=accept");
                send_qdb(v, QDB_CMD_WRITE, "/qubes-firewall/10.137.0.10", "");
                printf("PEER-QUBESDB pushed the rules of client 10.137.0.10 and committed\n");
            }
            printf("PEER-QUBESDB MULTIREAD answered with %zu entries\n",
                   sizeof entries / sizeof entries[0] + (with_net ? sizeof net_entries / sizeof net_entries[0] : 0));
        } else if (h.type == QDB_CMD_WRITE || h.type == QDB_CMD_RM) {
            writes++;
            printf("PEER-QUBESDB VM %s %s = '%s'\n", h.type == QDB_CMD_WRITE ? "wrote" : "removed", h.path, data);
            send_qdb(v, QDB_RESP_OK, h.path, NULL);
        } else {
            printf("PEER-QUBESDB got type %u path '%s' len %u\n", h.type, h.path, h.data_len);
        }
        fflush(stdout);
    }
    printf("PEER-QUBESDB vchan closed (synced=%d, writes=%d)\n", synced, writes);
    libxenvchan_close(v);
    return synced ? 0 : 1;
}

static int qrexec(int domid)
{
    char path[128];
    snprintf(path, sizeof path, "/local/domain/%d/data/vchan/0/512", domid);
    struct libxenvchan *v = NULL;
    double t0 = now();
    while (!(v = libxenvchan_client_init(NULL, domid, path))) {
        if (now() - t0 > 120) {
            printf("PEER-QREXEC FAIL no server at %s in 120 s\n", path);
            return 1;
        }
        usleep(50000);
    }
    v->blocking = 1;
    printf("PEER-QREXEC connected to %s after %.3f s\n", path, now() - t0);
    fflush(stdout);
    struct msg_header h;
    uint32_t version;
    if (recv_all(v, &h, sizeof h) || h.type != MSG_HELLO || h.len != 4 || recv_all(v, &version, 4)) {
        printf("PEER-QREXEC FAIL expected MSG_HELLO, got type %#x len %u\n", h.type, h.len);
        return 1;
    }
    printf("PEER-QREXEC agent HELLO version %u\n", version);
    struct msg_header reply = { MSG_HELLO, 4 };
    uint32_t ours = 3;
    if (send_all(v, &reply, sizeof reply) || send_all(v, &ours, 4)) {
        printf("PEER-QREXEC FAIL sending HELLO\n");
        return 1;
    }
    printf("PEER-QREXEC HELLO exchanged\n");
    fflush(stdout);
    char buf[4096];
    int n;
    while ((n = libxenvchan_read(v, buf, sizeof buf)) > 0)
        printf("PEER-QREXEC got %d more bytes\n", n);
    printf("PEER-QREXEC vchan closed\n");
    libxenvchan_close(v);
    return 0;
}

int main(int argc, char **argv)
{
    setvbuf(stdout, NULL, _IOLBF, 0);
    /* SIGTERM ends a blocking libxenvchan_recv (no SA_RESTART), then the
     * vchan is closed properly: srv_live 0, xenstore path removed. */
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_term;
    sigaction(SIGTERM, &sa, NULL);
    if (argc != 3) {
        fprintf(stderr, "usage: vchan-peer qubesdb|qubesdb-net|qubesdb-client|hostile-qubesdb|qrexec DOMID\n");
        return 2;
    }
    int domid = atoi(argv[2]);
    if (!strcmp(argv[1], "qubesdb"))
        return qubesdb(domid);
    if (!strcmp(argv[1], "qubesdb-client")) {
        with_net = as_client = 1;
        return qubesdb(domid);
    }
    if (!strcmp(argv[1], "qubesdb-net")) {
        with_net = 1;
        return qubesdb(domid);
    }
    if (!strcmp(argv[1], "hostile-qubesdb"))
        return hostile_qubesdb(domid);
    if (!strcmp(argv[1], "qrexec"))
        return qrexec(domid);
    fprintf(stderr, "vchan-peer: unknown mode %s\n", argv[1]);
    return 2;
}
