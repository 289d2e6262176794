/* ripsample DOMID COUNT USEC: prints vCPU 0's instruction pointer COUNT times, USEC apart
 * (PROFILE=1 cargo xtask bench xen; name the addresses with tests/xen/symbolize.sh). */
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>
#include <xenctrl.h>
int main(int argc, char **argv) {
    if (argc != 4) { fprintf(stderr, "usage: ripsample DOMID COUNT USEC\n"); return 2; }
    setvbuf(stdout, NULL, _IOLBF, 0); /* killed when the run ends */
    xc_interface *x = xc_interface_open(NULL, NULL, 0);
    if (!x) { perror("xc_interface_open"); return 1; }
    int dom = atoi(argv[1]), n = atoi(argv[2]), us = atoi(argv[3]);
    for (int i = 0; i < n; i++) {
        vcpu_guest_context_any_t ctx;
        if (xc_vcpu_getcontext(x, dom, 0, &ctx) == 0) printf("%lx\n", (unsigned long)ctx.x64.user_regs.rip);
        if (us) usleep(us);
    }
    return 0;
}
