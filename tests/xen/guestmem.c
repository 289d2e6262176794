/* guestmem DOMID PADDR LEN (hex): writes LEN bytes of a domain's memory from
 * guest-physical address PADDR (page-aligned down) to stdout, page by page;
 * a page that cannot be mapped is reported on stderr and skipped.
 * dom0-test.sh reads with it the kernel log of a Linux PVH domU that
 * stopped before it had a console (tests/xen/README.md, step 7). */
#define XC_WANT_COMPAT_MAP_FOREIGN_API
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <xenctrl.h>
int main(int argc, char **argv) {
    if (argc != 4) { fprintf(stderr, "usage: guestmem DOMID PADDR LEN (hex)\n"); return 2; }
    xc_interface *x = xc_interface_open(NULL, NULL, 0);
    if (!x) { perror("xc_interface_open"); return 1; }
    int dom = atoi(argv[1]);
    unsigned long first = strtoul(argv[2], NULL, 16) >> 12, len = strtoul(argv[3], NULL, 16);
    for (unsigned long page = first; page < first + (len + 4095) / 4096; page++) {
        void *p = xc_map_foreign_range(x, dom, 4096, PROT_READ, page);
        if (!p) { fprintf(stderr, "guestmem: page %lx of domain %d: cannot map\n", page, dom); continue; }
        fwrite(p, 1, 4096, stdout);
        munmap(p, 4096);
    }
    return 0;
}
