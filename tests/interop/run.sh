#!/bin/bash
# Runs Qubes' own qrexec socket test suite (qubes-core-qrexec's
# qrexec/tests/socket/) against our qrexec programs, or against Qubes' own C
# build as a baseline.  See tests/interop/README.md.
#
# Usage: tests/interop/run.sh [ours|qubes] [extra pytest arguments...]
# Environment: OUR_BIN_DIR (default target/debug), INTEROP_TIMEOUT (seconds
# per test, default 20), INTEROP_LABEL (names the tree/results/log files,
# default the target), QUBES_REFERENCE (default ../shared/reference),
# INTEROP_SKIP_FILE (tests not to run, e.g. tests/interop/not-passing.txt).
# Exit status: pytest's (0: every test run passed).
# Must run as root (it installs packages, creates the unprivileged user the
# suite runs as, and makes a private mount namespace).  Work dir:
# target/interop/ (kept between runs: the C build and the venv are cached).
set -euo pipefail

target=${1:-ours}
shift || true
case $target in
ours | qubes) ;;
*)
    echo "run.sh: unknown target '$target' (expected 'ours' or 'qubes')" >&2
    exit 2
    ;;
esac

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
ref=${QUBES_REFERENCE:-$root/../shared/reference}
work=${INTEROP_DIR:-$root/target/interop}
user=${INTEROP_USER:-qrexec-test}
timeout=${INTEROP_TIMEOUT:-20}
label=${INTEROP_LABEL:-$target}

if [ "$(id -u)" != 0 ]; then
    echo "run.sh: must run as root (installs packages, creates user '$user', uses a private mount namespace)" >&2
    exit 2
fi
for t in qubes-core-qrexec qubes-core-vchan-socket; do
    if [ ! -f "$ref/$t.tar.gz" ]; then
        echo "run.sh: $ref/$t.tar.gz not found (set QUBES_REFERENCE to the folder with Qubes' tarballs)" >&2
        exit 2
    fi
done

mkdir -p "$work"
log=$work/build.log

# --- Debian build packages ------------------------------------------------
need=()
for p in build-essential pkg-config libpam0g-dev; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed' || need+=("$p")
done
if [ ${#need[@]} -gt 0 ]; then
    echo "run.sh: installing ${need[*]}" >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${need[@]}" >>"$log" 2>&1 ||
        { apt-get update -q >>"$log" 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${need[@]}" >>"$log" 2>&1; } ||
        { echo "run.sh: apt-get install ${need[*]} failed, see $log" >&2; exit 1; }
fi

# --- Unpack and build Qubes' C programs (cached by tarball checksum) ------
stamp=$(cat "$ref/qubes-core-qrexec.tar.gz" "$ref/qubes-core-vchan-socket.tar.gz" | sha256sum | cut -c1-16)
src=$work/src
if [ "$(cat "$src/.built" 2>/dev/null)" != "$stamp" ]; then
    echo "run.sh: building Qubes' qrexec (BACKEND_VMM=socket) in $src" >&2
    rm -rf "$src"
    mkdir -p "$src"
    tar -xzf "$ref/qubes-core-qrexec.tar.gz" -C "$src"
    tar -xzf "$ref/qubes-core-vchan-socket.tar.gz" -C "$src"
    prefix=$src/prefix
    vflags=(PREFIX="$prefix" LIBDIR="$prefix/lib" INCLUDEDIR="$prefix/include")
    {
        make -C "$src/qubes-core-vchan-socket" "${vflags[@]}" all &&
            make -C "$src/qubes-core-vchan-socket" "${vflags[@]}" install
    } >>"$log" 2>&1 || { echo "run.sh: building vchan-socket failed, see $log" >&2; exit 1; }
    ln -sf vchan-socket.pc "$prefix/lib/pkgconfig/vchan.pc"
    q=$src/qubes-core-qrexec
    (
        export PKG_CONFIG_PATH=$prefix/lib/pkgconfig
        export LDFLAGS="-L$prefix/lib -Wl,-rpath,$prefix/lib -L$q/libqrexec -Wl,-rpath,$q/libqrexec"
        export CFLAGS="-I$prefix/include -O2 -g"
        make -C "$q/libqrexec" BACKEND_VMM=socket &&
            make -C "$q/agent" BACKEND_VMM=socket qrexec-agent qrexec-client-vm qrexec-fork-server &&
            make -C "$q/daemon" BACKEND_VMM=socket
    ) >>"$log" 2>&1 || { echo "run.sh: building qubes-core-qrexec failed, see $log" >&2; exit 1; }
    echo "$stamp" >"$src/.built"
fi
q=$src/qubes-core-qrexec

# --- Python 3.12 readable by the test user, and the venv ------------------
py=$work/python
if [ ! -x "$py/bin/python3.12" ]; then
    found=
    for d in /root/.pyenv/versions/3.12*; do
        [ -x "$d/bin/python3.12" ] && found=$d
    done
    if [ -n "$found" ]; then
        rm -rf "$py"
        cp -a "$found" "$py"
    elif command -v python3.12 >/dev/null && python3.12 -c 'import venv' 2>/dev/null; then
        mkdir -p "$py/bin"
        ln -sf "$(command -v python3.12)" "$py/bin/python3.12"
    else
        echo "run.sh: no Python 3.12 found (pyenv's /root/.pyenv/versions/3.12* or python3.12 on PATH)" >&2
        exit 1
    fi
fi
export LD_LIBRARY_PATH=$py/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
venv=$work/venv
pkgs=(pytest pytest-asyncio pytest-timeout psutil pyinotify pyasyncore)
if [ ! -f "$venv/.ready" ]; then
    echo "run.sh: creating venv $venv" >&2
    rm -rf "$venv"
    "$py/bin/python3.12" -m venv "$venv" >>"$log" 2>&1
    "$venv/bin/pip" install -q "${pkgs[@]}" >>"$log" 2>&1 ||
        { echo "run.sh: pip install ${pkgs[*]} failed, see $log" >&2; exit 1; }
    touch "$venv/.ready"
fi

# --- The tree of links the suite runs from --------------------------------
tree=$work/tree-$label
rm -rf "$tree"
mkdir -p "$tree/agent" "$tree/daemon"
ln -s "$q/qrexec" "$tree/qrexec"
ln -s "$q/libqrexec" "$tree/libqrexec"
if [ "$target" = ours ]; then
    bin=${OUR_BIN_DIR:-$root/target/debug}
    for b in qrexec-agent qrexec-client-vm qrexec-daemon qrexec-client; do
        if [ ! -x "$bin/$b" ]; then
            echo "run.sh: $bin/$b not found: build it first (cargo build -p qrexec --bins)" >&2
            exit 1
        fi
    done
    ln -s "$bin/qrexec-agent" "$tree/agent/qrexec-agent"
    ln -s "$bin/qrexec-client-vm" "$tree/agent/qrexec-client-vm"
    ln -s "$bin/qrexec-daemon" "$tree/daemon/qrexec-daemon"
    ln -s "$bin/qrexec-client" "$tree/daemon/qrexec-client"
else
    ln -s "$q/agent/qrexec-agent" "$tree/agent/qrexec-agent"
    ln -s "$q/agent/qrexec-client-vm" "$tree/agent/qrexec-client-vm"
    ln -s "$q/agent/qrexec-fork-server" "$tree/agent/qrexec-fork-server"
    ln -s "$q/daemon/qrexec-daemon" "$tree/daemon/qrexec-daemon"
    ln -s "$q/daemon/qrexec-client" "$tree/daemon/qrexec-client"
fi

# --- The unprivileged user ------------------------------------------------
if ! id -u "$user" >/dev/null 2>&1; then
    useradd --system --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin "$user" ||
        { echo "run.sh: could not create user '$user'" >&2; exit 1; }
fi
# The user must reach the tree and the binaries (read + traverse only).
d=$work
while [ "$d" != / ]; do
    chmod o+x "$d" 2>/dev/null || true
    d=$(dirname "$d")
done
chmod -R o+rX "$work/src" "$work/python" "$venv" "$tree" 2>/dev/null || true
if [ "$target" = ours ]; then
    d=$bin
    while [ "$d" != / ]; do
        chmod o+x "$d" 2>/dev/null || true
        d=$(dirname "$d")
    done
fi

# --- Tests not run (INTEROP_SKIP_FILE: "FILE.py::Class::test  reason" lines) --
skip_args=()
if [ -n "${INTEROP_SKIP_FILE:-}" ]; then
    while read -r id _; do
        case $id in '' | '#'*) continue ;; esac
        skip_args+=(--deselect "qrexec/tests/socket/$id")
    done <"$INTEROP_SKIP_FILE"
fi

# --- Run -------------------------------------------------------------------
results=$work/results-$label.xml
rm -f "$results"
tmp=$(mktemp -d /tmp/qrexec-interop.XXXXXX)
chown "$user" "$tmp"
chmod 700 "$tmp"
set +e
# Watchdog: pytest-timeout interrupts a hung test, but the suite's cleanup
# then waits for every child of the program under test; a child that is
# still stuck well past the per-test timeout is killed so the run goes on
# (the test is already counted as failed).
(
    while sleep 5; do
        ps -u "$user" -o pid=,etimes=,comm= 2>/dev/null | while read -r pid age comm; do
            case $comm in python*) continue ;; esac
            [ "$age" -gt $((timeout * 2)) ] && kill -9 "$pid" 2>/dev/null
        done
    done
) &
watchdog=$!
# /bin/sh is bash inside the private mount namespace only (Qubes' tests use
# bash features in `sh -c` commands).
unshare -m bash -c '
    mount --make-rprivate / &&
    mount --bind /bin/bash /bin/sh &&
    exec runuser -u "$0" -- env -i PATH=/usr/local/bin:/usr/bin:/bin \
        HOME="$1" TMPDIR="$1" LD_LIBRARY_PATH="$2" PYTHONDONTWRITEBYTECODE=1 \
        bash -c "cd \"\$0\" && exec \"\$1\"/bin/python -m pytest -o python_files=*.py \
            -p no:cacheprovider --timeout=\"\$2\" --junitxml=\"\$3\" -q -rN \"\${@:4}\" qrexec/tests/socket" \
        "$3" "$4" "$5" "$1/junit.xml" "${@:6}"
' "$user" "$tmp" "$LD_LIBRARY_PATH" "$tree" "$venv" "$timeout" "${skip_args[@]}" "$@" >"$work/pytest-$label.log" 2>&1
rc=$?
kill "$watchdog" 2>/dev/null
wait "$watchdog" 2>/dev/null
set -e
cp "$tmp/junit.xml" "$results" 2>/dev/null || true
rm -rf "$tmp"
if [ ! -f "$results" ]; then
    echo "run.sh: pytest produced no results (exit $rc); see $work/pytest-$label.log" >&2
    tail -20 "$work/pytest-$label.log" >&2
    exit 1
fi
"$venv/bin/python" "$here/summary.py" "$results" "$label"
exit $rc
