#!/bin/bash
# Names the code at the addresses of the firewall image's exception reports
# ("TRAP ..." lines, unikernel/src/platform/xen/traps.rs): rip and the
# return addresses found on the stack, from the linker map `cargo xtask
# image` writes next to the image (the image itself is stripped). The map
# must come from the build that made the image of that log.
# usage: tests/xen/symbolize.sh LOG [MAP]   (MAP default: target/xen/qubes-firewall.map,
#        under $CARGO_TARGET_DIR when set); LOG may be a serial log or "-" for stdin.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
LOG=${1:?usage: symbolize.sh LOG [MAP]}
MAP=${2:-${CARGO_TARGET_DIR:-$ROOT/target}/xen/qubes-firewall.map}
[ -e "$MAP" ] || { echo "symbolize.sh: no linker map $MAP (cargo xtask image writes it)" >&2; exit 1; }
[ "$LOG" = - ] && LOG=/dev/stdin
python3 - "$MAP" "$LOG" <<'PY'
import bisect, re, sys
map_path, log_path = sys.argv[1], sys.argv[2]
# LLD map lines: VMA LMA Size Align, then the output section (1 space),
# its input sections (9) and their symbols (17) by indentation.
symbols = []
in_text = False
row = re.compile(r"^\s*([0-9a-f]+)\s+([0-9a-f]+)\s+([0-9a-f]+)\s+\d+( +)(\S.*)$")
for line in open(map_path, errors="replace"):
    m = row.match(line.rstrip("\n"))
    if not m:
        continue
    vma, size, indent, name = int(m.group(1), 16), int(m.group(3), 16), len(m.group(4)), m.group(5)
    if indent == 1:
        in_text = name == ".text"
    elif in_text and indent >= 17:
        symbols.append((vma, size, name))
symbols.sort()
starts = [s[0] for s in symbols]
def name_of(addr):
    i = bisect.bisect_right(starts, addr) - 1
    while i >= 0:
        vma, size, name = symbols[i]
        if size == 0 or addr < vma + size:
            return f"{name}+{addr - vma:#x}"
        return "?"
    return "?"
seen = set()
for line in open(log_path, errors="replace"):
    # Each report is on the serial log twice (Xen's debug port and the PV
    # console); name each line's addresses once.
    key = line[line.find("TRAP "):].strip()
    if key in seen:
        continue
    m = re.search(r"TRAP (rip (0x[0-9a-f]+)|return addresses on the stack[^:]*:(.*))", line)
    if not m:
        continue
    seen.add(key)
    if m.group(2):
        addr = int(m.group(2), 16)
        print(f"rip  {addr:#x}  {name_of(addr)}")
    else:
        for a in m.group(3).split():
            addr = int(a, 16)
            print(f"  <- {addr:#x}  {name_of(addr)}")
if not seen:
    print("symbolize.sh: no TRAP report in the log")
PY
