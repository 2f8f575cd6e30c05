# CMake toolchain for a Debian multiarch cross build to arm64 (aarch64-linux-gnu),
# used by scripts/cross.sh:
#   cmake -S . -B build/cross-arm64 -DCMAKE_TOOLCHAIN_FILE=tests/cross-toolchain/arm64.cmake
# Needs crossbuild-essential-arm64, the :arm64 -dev packages and qemu-user-static (cross.sh
# installs them). There is no sysroot: Debian multiarch puts the target's libraries
# in /usr/lib/aarch64-linux-gnu, which CMake searches given the library architecture.
set(CMAKE_SYSTEM_NAME Linux)
set(CMAKE_SYSTEM_PROCESSOR aarch64)
set(CMAKE_C_COMPILER aarch64-linux-gnu-gcc)
set(CMAKE_LIBRARY_ARCHITECTURE aarch64-linux-gnu)

# pkg-config must see only the target's .pc files, never the build machine's.
set(ENV{PKG_CONFIG_LIBDIR} "/usr/lib/aarch64-linux-gnu/pkgconfig:/usr/share/pkgconfig")
set(ENV{PKG_CONFIG_PATH} "")

# protoc-c (a code generator) runs on the build machine.
set(CMAKE_FIND_ROOT_PATH_MODE_PROGRAM NEVER)

# ctest runs the target's test binaries under qemu-user, called directly (binfmt_misc is
# often unavailable in containers). The programs must run with the target's own multiarch
# libc6:arm64 (its loader /lib/ld-linux-*.so and /lib/aarch64-linux-gnu/libc.so.6, the libc
# the other :arm64 libraries came with), hence -L /. Not -L /usr/aarch64-linux-gnu: the
# loader of the cross toolchain's libc6-arm64-cross is a different glibc build from the
# libc.so.6 the loader then finds, and that mix hangs in the first pthread_create.
set(CMAKE_CROSSCOMPILING_EMULATOR qemu-aarch64-static -L /)
