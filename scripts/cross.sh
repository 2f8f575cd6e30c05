#!/usr/bin/env bash
# Cross-build Cistern for the gateways' ARM architectures (Debian multiarch), on an amd64
# (or any) Debian bookworm build machine, as root or with sudo:
#
#   scripts/cross.sh [arm64|armhf|all]...      (default: all = arm64 armhf)
#
# For each architecture it
#   1. installs what a cross build needs: `dpkg --add-architecture`, crossbuild-essential-ARCH,
#      the :ARCH -dev packages of scripts/deps.sh (and cmocka, pkg-config), qemu-user-static;
#   2. builds the .debs with `scripts/package.sh --arch ARCH` (dpkg-buildpackage --host-arch,
#      lintian) into dist/, and runs the packaged binaries under qemu (--version, and
#      --check-config of the shipped config);
#   3. configures a cross CMake build in build/cross-ARCH with
#      tests/cross-toolchain/ARCH.cmake (protoc-c runs natively; the tests run under
#      qemu-user through CMAKE_CROSSCOMPILING_EMULATOR), builds it and runs `ctest -L unit`.
# and prints a summary per architecture. Exits non-zero if any step failed for any arch.
#
# Options: --no-deps (skip step 1), --no-debs (skip step 2), --no-tests (skip step 3).
# JOBS (default 2) is the build parallelism. The first run downloads the cross toolchains
# and the target's libraries (31 s for arm64 here); the .debs and the unit tests under qemu
# then take about 30 s per architecture on 2 cores.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
root=$(pwd)

do_deps=1 do_debs=1 do_tests=1
archs=()
for a in "$@"; do
    case "$a" in
        arm64|armhf) archs+=("$a") ;;
        all) archs+=(arm64 armhf) ;;
        --no-deps) do_deps=0 ;;
        --no-debs) do_debs=0 ;;
        --no-tests) do_tests=0 ;;
        -h|--help) sed -n '2,/^set /{/^#/p}' "$0"; exit 0 ;;
        *) echo "cross: unknown argument '$a' (arm64, armhf, all, --no-deps, --no-debs, --no-tests)" >&2
           exit 2 ;;
    esac
done
[ ${#archs[@]} -gt 0 ] || archs=(arm64 armhf)
jobs=${JOBS:-2}

sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
# Other apt users (scripts/package.sh, deps.sh) may hold the dpkg lock for a while: wait.
apt_get() {
    DEBIAN_FRONTEND=noninteractive $sudo apt-get -o DPkg::Lock::Timeout=900 \
        -o Acquire::Retries=3 -q "$@"
}

# The target's libraries the CMake build links (scripts/deps.sh minus libpq-dev, which the
# build does not use and which is not Multi-Arch: same, so cannot sit next to the native one),
# and libc6:ARCH, whose loader qemu runs the unit tests with (see the toolchain files).
target_dev_pkgs=(libc6 libsqlite3-dev libyaml-dev libzstd-dev libprotobuf-c-dev libcurl4-openssl-dev
                 libmicrohttpd-dev libgnutls28-dev libmbedtls-dev libpaho-mqtt-dev libcmocka-dev
                 pkg-config)

declare -A result secs
now() { date +%s; }
step() { # step ARCH NAME CMD... : run, time and record one step
    local arch=$1 name=$2 t0 rc
    shift 2
    echo "=== cross $arch: $name: $*"
    t0=$(now)
    "$@"
    rc=$?
    secs[$arch.$name]=$(( $(now) - t0 ))
    if [ $rc -eq 0 ]; then
        result[$arch.$name]="ok"
    else
        result[$arch.$name]="FAILED (exit $rc)"
        echo "=== cross $arch: $name FAILED (exit $rc)" >&2
    fi
    return $rc
}

install_deps() { # install_deps ARCH
    local arch=$1 native want added=0
    native=$(dpkg --print-architecture)
    case " $(dpkg --print-foreign-architectures | tr '\n' ' ') " in
        *" $arch "*) ;;
        *) $sudo dpkg --add-architecture "$arch" || return 1; added=1 ;;
    esac
    # If this fails, take back an architecture this run added and nothing uses: its
    # unreachable indexes would fail every later `apt-get update` on this machine.
    if ! install_deps_for "$arch" "$native"; then
        if [ $added -eq 1 ] && [ -z "$(dpkg-query -W -f='${Architecture}\n' 2>/dev/null | grep -x "$arch")" ]; then
            echo "cross $arch: removing the architecture $arch again" >&2
            # (and fetch again the indexes a restricted update below may have dropped)
            $sudo dpkg --remove-architecture "$arch" && apt_get update >/dev/null 2>&1
        fi
        return 1
    fi
}

install_deps_for() { # install_deps_for ARCH NATIVE
    local arch=$1 native=$2 want
    # the target's libraries, its cross compiler, and the native tools: the code
    # generator, CMake, the emulator, and what scripts/package.sh needs
    want=("crossbuild-essential-$arch" cmake protobuf-c-compiler qemu-user-static
          dpkg-dev debhelper lintian binutils)
    for p in "${target_dev_pkgs[@]}"; do want+=("$p:$arch"); done
    # A mirror caught mid-sync serves an index that does not match its Release file, and
    # apt then drops the whole suite (every architecture): retry, and at last update only
    # the architectures this build needs, so that a broken index of another one does not
    # stop it.
    apt_get update || { sleep 30; apt_get update; } ||
        { echo "cross $arch: apt-get update failed; retrying with only $native and $arch" >&2
          apt_get -o APT::Architectures::="$native" -o APT::Architectures::="$arch" update; } ||
        return 1
    # --no-install-recommends: the cross compilers recommend whole native toolchains.
    # Installing an :ARCH -dev package may upgrade its native twin (Multi-Arch: same
    # packages must have equal versions on every architecture).
    apt_get install -y --no-install-recommends "${want[@]}"
}

debs() {
    local arch=$1 qemu d deb b rc=0
    scripts/package.sh --arch "$arch" || return 1
    # Smoke test of what was packaged (built with the package's hardening flags, which the
    # CMake build below does not use): each binary runs under qemu and accepts the config
    # its package ships.
    case "$arch" in arm64) qemu="qemu-aarch64-static" ;; armhf) qemu="qemu-arm-static" ;; esac
    d=$(mktemp -d) || return 1
    for b in agent receiver; do
        deb=$(ls dist/cistern-${b}_*_"$arch".deb) && dpkg-deb -x "$deb" "$d" &&
            "$qemu" -L / "$d/usr/bin/cistern-$b" --version &&
            "$qemu" -L / "$d/usr/bin/cistern-$b" --check-config "$d/etc/cistern/$b.yaml" || rc=1
    done
    rm -rf "$d"
    return $rc
}

unit_tests() {
    local arch=$1 b="build/cross-$1" machine
    cmake -S . -B "$b" -DCMAKE_TOOLCHAIN_FILE="$root/tests/cross-toolchain/$arch.cmake" \
        -DCMAKE_BUILD_TYPE=RelWithDebInfo -DCISTERN_WERROR=ON || return 1
    cmake --build "$b" -j"$jobs" || return 1
    # The binaries really are for the target: a silently native build would "pass" too.
    machine=$(readelf -h "$b/bin/cistern-agent" | sed -n 's/^ *Machine: *//p')
    echo "    cistern-agent: $machine"
    case "$arch:$machine" in
        arm64:AArch64|armhf:ARM) ;;
        *) echo "cross $arch: $b/bin/cistern-agent is built for '$machine'" >&2; return 1 ;;
    esac
    # ctest prefixes each unit test with the toolchain's CMAKE_CROSSCOMPILING_EMULATOR
    (cd "$b" && ctest -L unit --output-on-failure --timeout 600 -j"$jobs")
}

t_all=$(now)
for a in "${archs[@]}"; do
    if [ $do_deps -eq 1 ] && ! step "$a" deps install_deps "$a"; then
        continue # nothing else can work for this architecture
    fi
    [ $do_debs -eq 1 ] && step "$a" debs debs "$a"
    [ $do_tests -eq 1 ] && step "$a" unit-tests unit_tests "$a"
done

echo
echo "=== cross summary (total $(( $(now) - t_all ))s)"
fail=0
for a in "${archs[@]}"; do
    for s in deps debs unit-tests; do
        [ -n "${result[$a.$s]:-}" ] || continue
        printf '  %-6s %-11s %-18s %5ss\n' "$a" "$s" "${result[$a.$s]}" "${secs[$a.$s]}"
        [ "${result[$a.$s]}" = ok ] || fail=1
    done
    if [ -n "${result[$a.debs]:-}" ]; then
        ls -1 dist/*_"$a".deb 2>/dev/null | sed 's/^/         /'
    fi
done
exit $fail
