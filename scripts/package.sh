#!/usr/bin/env bash
# Builds the Debian packages cistern-agent and cistern-receiver (packaging/debian) into dist/:
#
#   scripts/package.sh [--arch amd64|arm64|armhf]... [--dist DIR] [--no-lintian]
#
#   --arch ARCH    build for ARCH (repeatable; default: this machine's architecture).
#                  Another architecture is a cross build (dpkg-buildpackage --host-arch):
#                  its build dependencies (crossbuild-essential-ARCH, the :ARCH -dev
#                  packages) are installed by scripts/cross.sh, which calls this script.
#   --dist DIR     where the .debs go (default dist/). Older cistern-agent/-receiver .debs
#                  of the same architecture there are replaced.
#   --no-lintian   skip lintian (otherwise its errors and warnings fail the build).
#
# For each architecture it copies the source tree (the files git knows, or everything but
# build*/, dist/ and .git) to build/pkg/ARCH/cistern-VERSION/, copies packaging/debian to
# debian/ there, writes debian/changelog with the version of CMakeLists.txt's
# project(cistern VERSION x.y.z), runs `dpkg-buildpackage -us -uc -b` (the unit tests run
# in it, except with DEB_BUILD_OPTIONS=nocheck and in cross builds), lintian on the
# result, and copies the two .debs to DIST. It prints their paths at the end.
#
# The package is Debian-native ("3.0 (native)"): its version is the project's, x.y.z.
# CISTERN_DEB_REVISION=N (digits) makes it x.y.z+N, a newer version of the same source
# (the install test's upgrade). JOBS (default 2) is the build parallelism.
# Installs what it needs (dpkg-dev, debhelper, lintian, and a native build's build
# dependencies) with apt-get when missing, as root or with sudo.
set -euo pipefail
caller=$(pwd)
cd "$(dirname "$0")/.."
root=$(pwd)

archs=()
dist=$root/dist
lintian=1
while [ $# -gt 0 ]; do
    case "$1" in
        --arch)
            [ $# -ge 2 ] || { echo "package: --arch needs a value (amd64, arm64, armhf)" >&2; exit 2; }
            case "$2" in
                amd64|arm64|armhf) archs+=("$2") ;;
                *) echo "package: unsupported architecture '$2' (amd64, arm64, armhf)" >&2; exit 2 ;;
            esac
            shift 2 ;;
        --arch=*) set -- --arch "${1#--arch=}" "${@:2}" ;;
        --dist)
            [ $# -ge 2 ] || { echo "package: --dist needs a directory" >&2; exit 2; }
            dist=$2
            shift 2 ;;
        --dist=*) dist=${1#--dist=}; shift ;;
        --no-lintian) lintian=0; shift ;;
        -h|--help) sed -n '2,25p' "$0"; exit 0 ;;
        *) echo "package: unknown argument '$1' (see --help)" >&2; exit 2 ;;
    esac
done

native=$(dpkg --print-architecture)
[ ${#archs[@]} -gt 0 ] || archs=("$native")
jobs=${JOBS:-2}

upstream=$(sed -n 's/^project(cistern VERSION \([0-9][0-9.]*\).*/\1/p' CMakeLists.txt)
[ -n "$upstream" ] || { echo "package: no project(cistern VERSION x.y.z) in CMakeLists.txt" >&2; exit 1; }
version=$upstream
if [ -n "${CISTERN_DEB_REVISION:-}" ]; then
    case "$CISTERN_DEB_REVISION" in
        *[!0-9]*) echo "package: CISTERN_DEB_REVISION must be a number, not '$CISTERN_DEB_REVISION'" >&2
                  exit 2 ;;
    esac
    version=$upstream+$CISTERN_DEB_REVISION
fi

sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
apt_get() {
    # Other apt users (scripts/cross.sh, deps.sh, the install test) may hold the lock.
    DEBIAN_FRONTEND=noninteractive $sudo apt-get -o DPkg::Lock::Timeout=900 -q "$@" </dev/null
}
missing() { # missing PKG...: prints those not installed
    local p
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || echo "$p"
    done
}

tools=(dpkg-dev debhelper)
[ $lintian -eq 1 ] && tools+=(lintian)
mapfile -t need < <(missing "${tools[@]}")
if [ ${#need[@]} -gt 0 ]; then
    echo "package: installing ${need[*]}"
    apt_get update || true
    apt_get install -y --no-install-recommends "${need[@]}"
fi
[ $lintian -eq 1 ] || echo "package: --no-lintian: lintian NOT run; these packages are unchecked"

case "$dist" in /*) ;; *) dist=$caller/$dist ;; esac # relative to where it was called
mkdir -p build/pkg "$dist"
dist=$(cd "$dist" && pwd)
# One package build at a time in this checkout: the build dirs are per architecture, and
# a second run would delete the first one's tree under it.
exec 9>build/pkg/.lock
flock 9

# copy_tree DEST: the source tree without build output or VCS data
copy_tree() {
    local dest=$1
    mkdir -p "$dest"
    if [ -d .git ] && command -v git >/dev/null 2>&1; then
        # tracked and new (not ignored) files as they are in the working tree; a tracked
        # file deleted in it is skipped
        git ls-files -z --cached --others --exclude-standard |
            while IFS= read -r -d '' f; do [ -e "$f" ] && printf '%s\0' "$f"; done |
            tar --null -T - -cf - | tar -xf - -C "$dest"
    else
        tar --exclude='./build*' --exclude=./dist --exclude=./.git -cf - . | tar -xf - -C "$dest"
    fi
}

changelog_date() {
    # the last commit's date keeps a rebuild of one commit byte-identical
    # (SOURCE_DATE_EPOCH comes from here)
    git log -1 --format=%cD 2>/dev/null || date -R
}

built=()
for arch in "${archs[@]}"; do
    work=$root/build/pkg/$arch
    src=$work/cistern-$version
    echo "=== package $arch: cistern $version in $src"
    rm -rf "$work"
    copy_tree "$src"
    rm -rf "$src/debian"
    cp -a packaging/debian "$src/debian"
    rev=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
    [ "$rev" = unknown ] || git diff --quiet HEAD 2>/dev/null || rev="$rev with local changes"
    cat >"$src/debian/changelog" <<EOF
cistern ($version) bookworm; urgency=medium

  * Cistern $upstream, built by scripts/package.sh
    from git $rev.

 -- Cistern developers <dev@cistern.invalid>  $(changelog_date)
EOF

    opts=(-us -uc -b)
    bopts="parallel=$jobs ${DEB_BUILD_OPTIONS:-}"
    profiles=()
    if [ "$arch" != "$native" ]; then
        # The target's binaries do not run here: scripts/cross.sh runs the unit tests under
        # qemu-user in a build of its own.
        opts+=(--host-arch "$arch")
        bopts="$bopts nocheck"
        profiles+=(cross)
    fi
    case " $bopts " in *" nocheck "*) profiles+=(nocheck) ;; esac
    if [ ${#profiles[@]} -gt 0 ]; then
        opts+=("--build-profiles=$(IFS=,; echo "${profiles[*]}")")
    fi

    check=(dpkg-checkbuilddeps)
    [ "$arch" = "$native" ] || check+=(-a "$arch")
    [ ${#profiles[@]} -eq 0 ] || check+=("-P$(IFS=,; echo "${profiles[*]}")")
    if ! (cd "$src" && "${check[@]}" 2>/dev/null); then
        if [ "$arch" = "$native" ]; then
            echo "package $arch: installing the build dependencies"
            apt_get update || true
            (cd "$src" && apt_get build-dep -y --no-install-recommends ./)
        else
            (cd "$src" && "${check[@]}") || true
            echo "package $arch: the cross build dependencies are missing; install them with" \
                 "scripts/cross.sh $arch --no-debs --no-tests" >&2
            exit 1
        fi
    fi

    echo "=== package $arch: dpkg-buildpackage ${opts[*]} (DEB_BUILD_OPTIONS=$bopts)"
    (cd "$src" && DEB_BUILD_OPTIONS="$bopts" dpkg-buildpackage "${opts[@]}") 2>&1 | tee "$work/build.log"

    changes=$work/cistern_${version}_$arch.changes
    [ -f "$changes" ] || { echo "package $arch: no $changes" >&2; exit 1; }
    if [ $lintian -eq 1 ]; then
        echo "=== package $arch: lintian --fail-on error,warning"
        lintian --fail-on error,warning --display-info "$changes" 2>&1 | tee "$work/lintian.log"
        echo "package $arch: lintian: no errors, no warnings"
    fi

    rm -f "$dist"/cistern-agent_*_"$arch".deb "$dist"/cistern-receiver_*_"$arch".deb
    for p in cistern-agent cistern-receiver; do
        cp "$work/${p}_${version}_$arch.deb" "$dist/"
        built+=("$dist/${p}_${version}_$arch.deb")
    done
done

echo "=== packages (debug symbols: build/pkg/ARCH/*-dbgsym_*.deb)"
printf '%s\n' "${built[@]}"
