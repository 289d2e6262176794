#!/bin/bash
# Boot Xen 4.17 + Debian dom0 + our initramfs in QEMU, timestamp the serial log.
# usage: boot.sh [tcg|kvm] [initrd]     env: TIMEOUT (s, default 600), SMP, LOG, QEMU_CPU (tcg),
#        TCG_THREAD (single, the default: one host thread for all vCPUs; or multi)
# single: in 2 of 23 passes with multi-threaded TCG the emulated AMD-V world switch
# left the firewall's vCPU holding Xen's own context (a triple fault no guest code
# can cause); 6 passes with single were clean and no slower. See tests/xen/README.md.
set -uo pipefail
LAB=${LAB:-${TMPDIR:-/tmp}/qubes-fw-xen}
MODE=${1:-tcg}
INITRD=${2:-$LAB/out/initrd.cpio.gz}
TIMEOUT=${TIMEOUT:-600}
SMP=${SMP:-2}
LOG=${LOG:-$LAB/out/serial-$MODE.log}
case $MODE in
  tcg) ACCEL=(-accel "tcg,thread=${TCG_THREAD:-single}" -cpu "${QEMU_CPU:-qemu64,+svm,+npt,+rdrand}") ;;   # emulated AMD-V incl. nested paging
  kvm) ACCEL=(-accel kvm -cpu host,-arch-capabilities) ;;  # needs real VT-x/AMD-V in the host (fails here: kvm_pvm)
  *) echo "mode must be tcg or kvm" >&2; exit 2 ;;
esac
XENCMD="console=com1 com1=115200,8n1 dom0_mem=${DOM0_MEM:-512M},max:${DOM0_MEM:-512M} dom0_max_vcpus=1 loglvl=all guest_loglvl=all noreboot ${XENEXTRA:-}"
DOM0CMD="console=hvc0 earlyprintk=xen ${DOM0EXTRA:-}"
FIFO=$(mktemp -u); mkfifo "$FIFO"
T0=${EPOCHREALTIME/./}
timeout "$TIMEOUT" qemu-system-x86_64 -machine pc "${ACCEL[@]}" -smp "$SMP" -m 2048 \
    -display none -serial stdio -monitor none -no-reboot \
    -device isa-debug-exit,iobase=0xf4,iosize=4 \
    -kernel "$LAB/img/xen" -append "$XENCMD" \
    -initrd "$LAB/img/vmlinuz $DOM0CMD,$INITRD" </dev/null >"$FIFO" 2>&1 &
QPID=$!   # timeout(1) forwards our kill to QEMU
: > "$LOG"
stamp() { local t=$(( (${EPOCHREALTIME/./} - T0) / 10000 )); printf '[%4d.%02d] %s\n' $((t/100)) $((t%100)) "$1"; }
exec 3<"$FIFO"
pending= done_at=0
while :; do
    if IFS= read -r -t 1 -u 3 line; then
        line=${pending}${line%$'\r'}; pending=
        stamp "$line" >> "$LOG"
        case $line in
          *XENLAB*) stamp "$line" ;;
          *"Panic on CPU"*|*"Kernel panic"*) echo "PANIC: $line"; kill "$QPID" 2>/dev/null ;;
        esac
        [[ $line == *XENLAB-DONE* ]] && done_at=$SECONDS
    elif (( $? > 128 )); then
        pending+=$line                       # read timed out: keep the partial line
    else
        [ -n "$pending$line" ] && stamp "$pending$line" >> "$LOG"
        break                                # EOF: QEMU has exited
    fi
    # normally QEMU leaves through isa-debug-exit; else stop it 5 s after DONE
    (( done_at > 0 && SECONDS - done_at > 5 )) && { kill "$QPID" 2>/dev/null; done_at=0; }
done
exec 3<&-
wait "$QPID"; QRC=$?
rm -f "$FIFO"
[ "$QRC" = 124 ] && echo "boot.sh: TIMEOUT after ${TIMEOUT}s"
echo "boot.sh: qemu exit code $QRC (isa-debug-exit(1) => 3), log: $LOG"
grep -q XENLAB-DOM0-READY "$LOG"
