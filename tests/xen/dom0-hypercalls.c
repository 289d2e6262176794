/* dom0-hypercalls N: makes N xen_version hypercalls from a dom0 process
 * (each a system call into dom0's kernel, the privcmd ioctl and the
 * hypercall), for bench.sh's price of a hypercall from a PV domain. */
#include <stdio.h>
#include <stdlib.h>
#include <xenctrl.h>
int main(int argc, char **argv) {
    if (argc != 2) { fprintf(stderr, "usage: dom0-hypercalls N\n"); return 2; }
    xc_interface *x = xc_interface_open(NULL, NULL, 0);
    if (!x) { perror("xc_interface_open"); return 1; }
    long n = atol(argv[1]);
    for (long i = 0; i < n; i++)
        if (xc_version(x, XENVER_version, NULL) < 0) { perror("xc_version"); return 1; }
    return 0;
}
