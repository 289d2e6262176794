/* dns-answer: dom0's stand-in for the DNS server behind sys-net in
 * tests/xen. Listens on UDP port 53 of each address given (the Qubes DNS
 * addresses 10.139.1.1 and 10.139.1.2, which sys-net DNATs to its real
 * resolver) and answers every A query with ANSWER_A (10.11.12.13), every
 * other query with an empty NOERROR answer. Each reply leaves from the
 * address the query was sent to, as the DNAT'd reply would.
 * usage: dns-answer ADDR...   (logs one line per query on stdout) */
#include <arpa/inet.h>
#include <poll.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#define MAX_SOCKS 4
static const unsigned char ANSWER_A[4] = {10, 11, 12, 13};

int main(int argc, char **argv) {
    struct pollfd fds[MAX_SOCKS];
    int n = 0;
    for (int i = 1; i < argc && n < MAX_SOCKS; i++) {
        struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(53)};
        if (inet_pton(AF_INET, argv[i], &a.sin_addr) != 1) { fprintf(stderr, "bad address %s\n", argv[i]); return 2; }
        int s = socket(AF_INET, SOCK_DGRAM, 0);
        if (s < 0 || bind(s, (struct sockaddr *)&a, sizeof a) < 0) { perror(argv[i]); return 1; }
        fds[n].fd = s; fds[n].events = POLLIN; n++;
    }
    printf("dns-answer: listening on %d address(es)\n", n); fflush(stdout);
    for (;;) {
        if (poll(fds, n, -1) < 0) { perror("poll"); return 1; }
        for (int i = 0; i < n; i++) {
            if (!(fds[i].revents & POLLIN)) continue;
            unsigned char q[512], r[600];
            struct sockaddr_in from; socklen_t flen = sizeof from;
            ssize_t len = recvfrom(fds[i].fd, q, sizeof q, 0, (struct sockaddr *)&from, &flen);
            if (len < 12 || (q[2] & 0x80)) continue;            /* not a query */
            /* The question: QNAME labels, then QTYPE and QCLASS. */
            size_t at = 12;
            while (at < (size_t)len && q[at] != 0) at += q[at] + 1;
            if (at + 5 > (size_t)len) continue;
            size_t qend = at + 5;
            unsigned qtype = (q[at + 1] << 8) | q[at + 2];
            memcpy(r, q, qend);
            r[2] = 0x84 | (q[2] & 0x01);                          /* QR, AA, keep RD */
            r[3] = 0x80;                                          /* RA, NOERROR */
            r[4] = 0; r[5] = 1;                                   /* QDCOUNT */
            r[6] = 0; r[7] = qtype == 1 ? 1 : 0;                  /* ANCOUNT */
            memset(r + 8, 0, 4);                                  /* NSCOUNT, ARCOUNT */
            size_t out = qend;
            if (qtype == 1) {
                static const unsigned char rr[] = {0xc0, 0x0c, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4};
                memcpy(r + out, rr, sizeof rr); out += sizeof rr;
                memcpy(r + out, ANSWER_A, 4); out += 4;
            }
            sendto(fds[i].fd, r, out, 0, (struct sockaddr *)&from, flen);
            printf("dns-answer: query type %u from %s answered\n", qtype, inet_ntoa(from.sin_addr));
            fflush(stdout);
        }
    }
}
