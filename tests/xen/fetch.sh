#!/bin/bash
# Download (not install) Xen 4.17, its tools and libxenvchan (+ headers) and a
# Debian kernel, and unpack them into $LAB/root; install only qemu-system-x86,
# busybox-static, cpio and gcc on the host. The host's bootloader and Xen
# installation are never touched. Adapted from shared/xenlab/fetch.sh.
set -euo pipefail
LAB=${LAB:-${TMPDIR:-/tmp}/qubes-fw-xen}
mkdir -p "$LAB/debs" "$LAB/img"
export DEBIAN_FRONTEND=noninteractive
need=()
[ -x /bin/busybox ] && /bin/busybox --list | grep -qx brctl || need+=(busybox-static)
command -v cpio >/dev/null || need+=(cpio)
command -v gcc >/dev/null || need+=(gcc)
[ -e /usr/lib/x86_64-linux-gnu/libc.a ] || need+=(libc6-dev)   # headers; static dns-answer
command -v ld >/dev/null || need+=(binutils)
if [ ${#need[@]} != 0 ]; then
    apt-get update >/dev/null || true
    apt-get install -y --no-install-recommends "${need[@]}" >/dev/null
fi
if ! command -v qemu-system-x86_64 >/dev/null; then
    if dpkg-query -W -f='${Version}' qemu-utils 2>/dev/null | grep -q bpo12; then
        # This machine kind ships qemu-utils from bookworm-backports; installing
        # bookworm's qemu-system-x86 would REMOVE it. Take QEMU from backports
        # too, through a private apt list dir (/etc/apt is left untouched).
        B=$LAB/apt-bpo; mkdir -p "$B/lists/partial"
        K=/usr/share/keyrings/debian-archive-keyring.gpg
        M=$(awk '/^URIs:/{print $2; exit}' /etc/apt/sources.list.d/*.sources 2>/dev/null)
        [ -n "$M" ] || M=$(awk '/^deb /{print $2; exit}' /etc/apt/sources.list)
        for s in bookworm bookworm-updates bookworm-backports; do
            echo "deb [signed-by=$K] $M $s main"; done > "$B/sources.list"
        echo "deb [signed-by=$K] ${M%/debian}/debian-security bookworm-security main" >> "$B/sources.list"
        APTO=(-o Dir::Etc::SourceList="$B/sources.list" -o Dir::Etc::SourceParts=/dev/null -o Dir::State::Lists="$B/lists")
        apt-get "${APTO[@]}" update >/dev/null
        apt-get "${APTO[@]}" install -y --no-install-recommends -t bookworm-backports qemu-system-x86 >/dev/null
    else
        apt-get update >/dev/null || true
        apt-get install -y --no-install-recommends qemu-system-x86 >/dev/null
    fi
fi
qemu-system-x86_64 --version | head -1
KPKG=$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-[0-9]/{print $2; exit}')
PKGS="xen-hypervisor-4.17-amd64 xen-utils-4.17 xen-utils-common xenstore-utils libxencall1 libxenevtchn1
      libxenforeignmemory1 libxengnttab1 libxenmisc4.17 libxenstore4 libxentoollog1
      libxendevicemodel1 libxenhypfs1 libxentoolcore1 libyajl2 libxen-dev $KPKG
      iperf3 libiperf0 libsctp1"
cd "$LAB/debs"
chmod 777 . # lets apt's _apt user write here (avoids the "unsandboxed" warning)
missing=()
for p in $PKGS; do ls "${p}"_*.deb >/dev/null 2>&1 || missing+=("$p"); done
[ ${#missing[@]} = 0 ] || apt-get download "${missing[@]}"
rm -rf "$LAB/root"; mkdir -p "$LAB/root"
for p in $PKGS; do dpkg-deb -x "$(ls "${p}"_*.deb | head -1)" "$LAB/root"; done
zcat "$LAB"/root/boot/xen-4.17-amd64.gz > "$LAB/img/xen"          # 32-bit multiboot ELF
cp "$LAB"/root/boot/vmlinuz-* "$LAB/img/vmlinuz"
ls "$LAB/root/lib/modules" > "$LAB/img/kver"
du -sh "$LAB/debs" "$LAB/root"
