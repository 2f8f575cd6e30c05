# CMake toolchain for a Debian multiarch cross build to armhf (arm-linux-gnueabihf),
# used by scripts/cross.sh:
#   cmake -S . -B build/cross-armhf -DCMAKE_TOOLCHAIN_FILE=tests/cross-toolchain/armhf.cmake
# Needs crossbuild-essential-armhf, the :armhf -dev packages and qemu-user-static (cross.sh
# installs them). There is no sysroot: Debian multiarch puts the target's libraries
# in /usr/lib/arm-linux-gnueabihf, which CMake searches given the library architecture.
set(CMAKE_SYSTEM_NAME Linux)
set(CMAKE_SYSTEM_PROCESSOR arm)
set(CMAKE_C_COMPILER arm-linux-gnueabihf-gcc)
set(CMAKE_LIBRARY_ARCHITECTURE arm-linux-gnueabihf)

# pkg-config must see only the target's .pc files, never the build machine's.
set(ENV{PKG_CONFIG_LIBDIR} "/usr/lib/arm-linux-gnueabihf/pkgconfig:/usr/share/pkgconfig")
set(ENV{PKG_CONFIG_PATH} "")

# protoc-c (a code generator) runs on the build machine.
set(CMAKE_FIND_ROOT_PATH_MODE_PROGRAM NEVER)

# ctest runs the target's test binaries under qemu-user, called directly (binfmt_misc is
# often unavailable in containers). The programs must run with the target's own multiarch
# libc6:armhf (its loader /lib/ld-linux-*.so and /lib/arm-linux-gnueabihf/libc.so.6, the libc
# the other :armhf libraries came with), hence -L /. Not -L /usr/arm-linux-gnueabihf: the
# loader of the cross toolchain's libc6-armhf-cross is a different glibc build from the
# libc.so.6 the loader then finds, and that mix hangs in the first pthread_create.
set(CMAKE_CROSSCOMPILING_EMULATOR qemu-arm-static -L /)
