/* The power-cut shim of chaos scenario 8 (LD_PRELOAD): journals every write and sync to the
 * spool's files, and kills its own process at the Nth one, so the test can rebuild the files as
 * a disk would hold them after a power cut (what was synced, plus any subset of what was not).
 *
 * Environment (read once, at load):
 *   CISTERN_POWERCUT_PREFIX   the spool's database path. Tracked: every file whose path starts
 *                             with it (the database, -wal, -journal, a quarantined copy), and the
 *                             directory holding it (SQLite fsyncs it after creating a journal or
 *                             the WAL). Of "<prefix>-shm", a memory map whose content SQLite
 *                             rebuilds, only its creation and removal are journaled: whether it
 *                             exists after a power cut is durable state the agent looks at.
 *   CISTERN_POWERCUT_JOURNAL  the journal file (appended to). Unset: the shim does nothing.
 *   CISTERN_POWERCUT_AT       N > 0: SIGKILL this process just before the Nth counted operation
 *                             (which then never happens). Unset or 0: never.
 *   CISTERN_POWERCUT_BOOT_ID  a file to read instead of /proc/sys/kernel/random/boot_id: a power
 *                             cut is a reboot, and the agent tells a stop in this boot from one
 *                             in an earlier boot (the test gives every run a new boot id).
 *   CISTERN_POWERCUT_ON       which operations count towards N: any (default: writes, truncates,
 *                             fallocates, syncs, creations, unlinks, renames), sync (syncs
 *                             only), db (any
 *                             operation on the database file itself: checkpoints), wal (any on
 *                             the -wal file).
 *
 * The real operations all happen: only the test's rebuild drops what was not synced. Each is
 * done under one mutex together with its journal record, so the journal's order is the order
 * the kernel saw, whichever thread did it; a record is written after its operation returned (a
 * sync is journaled only once it is complete). The crash record is written before the kill.
 *
 * Journal record: a header of six little-endian u64 (type, open id, a, b, path length, data
 * length), then the path, then the data:
 *   START  a=pid b=CLOCK_MONOTONIC ns
 *   OPEN   a=flags b=1 if the open created the file; path; data = u64 size after the open
 *   WRITE  a=offset; data = the bytes written
 *   TRUNC  a=length
 *   EXTEND a=length: the file is at least this long (fallocate), zeros beyond its old end
 *   SYNC   a=1 fdatasync, 0 fsync (a directory: open id of the directory's open)
 *   CLOSE
 *   UNLINK path
 *   RENAME path = the old name; data = the new name
 *   CRASH  a=the operation's count b=CLOCK_MONOTONIC ns; path; data = what it would have done
 * WRITE, TRUNC, EXTEND, SYNC, UNLINK and RENAME carry the CLOCK_MONOTONIC ns of their end in b.
 * The open id names one open file description (an fd's life), so writes through an fd whose
 * path was unlinked and made again still reach the right file.
 *
 * The wrappers call the kernel with syscall(2) rather than the next definition (dlsym): no
 * allocation, no recursion, and safe from a signal handler on an untracked fd (no lock is taken
 * for those). The exceptions, looked up at load: posix_fallocate's fallback, and fopen (only
 * to show the test's boot id). */

/* The build defines _FILE_OFFSET_BITS=64, which would rename open to open64 etc. in the headers
 * and make our definitions collide: the shim defines both names itself. */
#undef _FILE_OFFSET_BITS
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

/* The raw calls pass a 64-bit offset in one register (and pwritev's high half as 0): LP64 only
 * (amd64, arm64). On a 32-bit build the library is empty and the scenario skips. */
#if UINTPTR_MAX == UINT64_MAX

#define PC_FD_MAX 65536
#define PC_SLOTS 64 /* files of ours open at once (SQLite: a few) */
#define PC_PATH_MAX 1024
#define PC_IOV_MAX 64

enum pc_rec {
    PC_START = 1,
    PC_OPEN = 2,
    PC_WRITE = 3,
    PC_TRUNC = 4,
    PC_SYNC = 5,
    PC_CLOSE = 6,
    PC_UNLINK = 7,
    PC_RENAME = 8,
    PC_CRASH = 9,
    PC_EXTEND = 10,
};

enum pc_kind { PC_NONE = 0, PC_FILE_DB, PC_FILE_WAL, PC_FILE_OTHER, PC_SHM, PC_DIR };
enum pc_on { PC_ON_ANY, PC_ON_SYNC, PC_ON_DB, PC_ON_WAL };

struct pc_fd {
    int used;
    uint64_t open_id;
    enum pc_kind kind;
    char path[PC_PATH_MAX];
};

static struct {
    int active;
    int journal_fd;
    char prefix[PC_PATH_MAX];
    size_t prefix_len;
    char dir[PC_PATH_MAX];
    uint64_t crash_at; /* 0: never */
    enum pc_on on;
    uint64_t ops;
    uint64_t next_open_id;
} pc;

/* posix_fallocate() falls back to writing zeros where the filesystem cannot allocate: glibc's
 * own, looked up once at load (before any thread), for the files that are not ours. */
static int (*pc_real_posix_fallocate)(int, off64_t, off64_t);
/* The same for fopen (the boot id is read with it): looked up at load, or at first use if a
 * constructor that ran before ours opens a file. */
static FILE *(*pc_real_fopen)(const char *, const char *);
static FILE *(*pc_real_fopen64)(const char *, const char *);
static const char pc_boot_id_path[] = "/proc/sys/kernel/random/boot_id";
static char pc_boot_id_file[PC_PATH_MAX]; /* "": the real one */

static pthread_mutex_t pc_lock = PTHREAD_MUTEX_INITIALIZER;
/* fd -> 1 + its slot in pc_slots, 0 = not ours (most fds: sockets, the log). Read without the
 * lock on every write and close; set and cleared under the lock while the fd is open, so its
 * number cannot be handed out again meanwhile. */
static _Atomic unsigned char pc_slot_of[PC_FD_MAX];
static struct pc_fd pc_slots[PC_SLOTS]; /* under the lock */

/* The file of tracked FD; under the lock. */
static struct pc_fd *pc_file(int fd)
{
    return &pc_slots[atomic_load(&pc_slot_of[fd]) - 1];
}

/* Take the lock and return FD's file, if FD is still ours: another thread may have closed it
 * since the unlocked check (then the lock is released and NULL returned). */
static struct pc_fd *pc_lock_file(int fd)
{
    pthread_mutex_lock(&pc_lock);
    if (atomic_load(&pc_slot_of[fd]))
        return pc_file(fd);
    pthread_mutex_unlock(&pc_lock);
    return NULL;
}

static uint64_t pc_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

/* Write all of IOV to the journal; under the lock (or before any thread exists). A failure here
 * would make the rebuild lie, so it kills the process loudly instead. */
static void pc_journal_iov(struct iovec *iov, int n)
{
    while (n > 0) {
        long w = syscall(SYS_writev, pc.journal_fd, iov, n);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            static const char msg[] = "powercut: cannot write the journal\n";
            syscall(SYS_write, 2, msg, sizeof(msg) - 1);
            abort();
        }
        size_t left = (size_t)w;
        while (n > 0 && left >= iov->iov_len) {
            left -= iov->iov_len;
            iov++;
            n--;
        }
        if (n > 0) {
            iov->iov_base = (char *)iov->iov_base + left;
            iov->iov_len -= left;
        }
    }
}

/* One record: header, path, then DATA_IOV (DATA_N entries, DATA_LEN bytes in all). */
static void pc_record(uint64_t type, uint64_t open_id, uint64_t a, uint64_t b, const char *path,
                      const struct iovec *data_iov, int data_n, uint64_t data_len)
{
    uint64_t plen = path ? strlen(path) : 0;
    uint64_t hdr[6] = {type, open_id, a, b, plen, data_len};
    struct iovec iov[PC_IOV_MAX + 2];
    int n = 0;
    iov[n].iov_base = hdr;
    iov[n++].iov_len = sizeof(hdr);
    if (plen) {
        iov[n].iov_base = (void *)path;
        iov[n++].iov_len = plen;
    }
    uint64_t left = data_len;
    for (int i = 0; i < data_n && left > 0; i++) {
        size_t take = data_iov[i].iov_len < left ? data_iov[i].iov_len : (size_t)left;
        if (take == 0)
            continue;
        if (n == PC_IOV_MAX + 2) { /* flush what we have: we hold the lock, order is kept */
            pc_journal_iov(iov, n);
            n = 0;
        }
        iov[n].iov_base = data_iov[i].iov_base;
        iov[n++].iov_len = take;
        left -= take;
    }
    pc_journal_iov(iov, n);
}

static void pc_record_simple(uint64_t type, uint64_t open_id, uint64_t a, uint64_t b,
                             const char *path)
{
    pc_record(type, open_id, a, b, path, NULL, 0, 0);
}

/* Count one operation of KIND; at the chosen one, journal the crash and die. Under the lock. */
static void pc_op(enum pc_kind kind, int is_sync, const char *what, const char *path)
{
    int counts = pc.on == PC_ON_ANY || (pc.on == PC_ON_SYNC && is_sync) ||
                 (pc.on == PC_ON_DB && kind == PC_FILE_DB) ||
                 (pc.on == PC_ON_WAL && kind == PC_FILE_WAL);
    if (!counts)
        return;
    pc.ops++;
    if (pc.crash_at && pc.ops == pc.crash_at) {
        struct iovec d = {(void *)what, strlen(what)};
        pc_record(PC_CRASH, 0, pc.ops, pc_now_ns(), path, &d, 1, d.iov_len);
        syscall(SYS_kill, (long)getpid(), (long)SIGKILL);
        for (;;)
            pause();
    }
}

/* What PATH (relative to DIRFD) is to us; FULL gets the absolute path when it is ours. */
static enum pc_kind pc_classify(int dirfd, const char *path, char *full)
{
    if (!pc.active || !path)
        return PC_NONE;
    char buf[PC_PATH_MAX];
    if (path[0] == '/') {
        if (strlen(path) >= sizeof(buf))
            return PC_NONE;
        memcpy(buf, path, strlen(path) + 1);
    } else if (dirfd == AT_FDCWD) {
        if (!getcwd(buf, sizeof(buf)))
            return PC_NONE;
        size_t l = strlen(buf);
        if (l + 1 + strlen(path) >= sizeof(buf))
            return PC_NONE;
        buf[l] = '/';
        memcpy(buf + l + 1, path, strlen(path) + 1);
    } else {
        return PC_NONE; /* SQLite opens by absolute or cwd-relative path only */
    }
    size_t l = strlen(buf);
    while (l > 1 && buf[l - 1] == '/')
        buf[--l] = '\0';
    enum pc_kind k = PC_NONE;
    if (strcmp(buf, pc.dir) == 0) {
        k = PC_DIR;
    } else if (strncmp(buf, pc.prefix, pc.prefix_len) == 0) {
        const char *rest = buf + pc.prefix_len;
        k = rest[0] == '\0'             ? PC_FILE_DB
            : strcmp(rest, "-wal") == 0 ? PC_FILE_WAL
            : strcmp(rest, "-shm") == 0 ? PC_SHM
                                        : PC_FILE_OTHER;
    }
    if (k != PC_NONE)
        memcpy(full, buf, l + 1);
    return k;
}

__attribute__((constructor)) static void pc_init(void)
{
    pc_real_posix_fallocate = (int (*)(int, off64_t, off64_t))dlsym(RTLD_NEXT, "posix_fallocate64");
    pc_real_fopen = (FILE * (*)(const char *, const char *)) dlsym(RTLD_NEXT, "fopen");
    pc_real_fopen64 = (FILE * (*)(const char *, const char *)) dlsym(RTLD_NEXT, "fopen64");
    const char *boot = getenv("CISTERN_POWERCUT_BOOT_ID");
    if (boot && boot[0] && strlen(boot) < sizeof(pc_boot_id_file))
        memcpy(pc_boot_id_file, boot, strlen(boot) + 1);
    const char *j = getenv("CISTERN_POWERCUT_JOURNAL");
    const char *p = getenv("CISTERN_POWERCUT_PREFIX");
    if (!j || !j[0] || !p || p[0] != '/' || strlen(p) >= sizeof(pc.prefix))
        return;
    memcpy(pc.prefix, p, strlen(p) + 1);
    pc.prefix_len = strlen(p);
    memcpy(pc.dir, p, pc.prefix_len + 1);
    char *slash = strrchr(pc.dir, '/');
    if (slash == pc.dir)
        slash[1] = '\0';
    else
        *slash = '\0';
    const char *at = getenv("CISTERN_POWERCUT_AT");
    pc.crash_at = at ? strtoull(at, NULL, 10) : 0;
    const char *on = getenv("CISTERN_POWERCUT_ON");
    pc.on = !on || strcmp(on, "any") == 0 ? PC_ON_ANY
            : strcmp(on, "sync") == 0     ? PC_ON_SYNC
            : strcmp(on, "db") == 0       ? PC_ON_DB
            : strcmp(on, "wal") == 0      ? PC_ON_WAL
                                          : PC_ON_ANY;
    pc.journal_fd =
        (int)syscall(SYS_openat, AT_FDCWD, j, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
    if (pc.journal_fd < 0) {
        static const char msg[] = "powercut: cannot open the journal\n";
        syscall(SYS_write, 2, msg, sizeof(msg) - 1);
        abort();
    }
    pc.active = 1;
    pc_record_simple(PC_START, 0, (uint64_t)getpid(), pc_now_ns(), NULL);
}

/* ---- opens ---- */

/* PATH, or the test's boot id file in place of the kernel's. */
static const char *pc_redirect(const char *path)
{
    return pc_boot_id_file[0] && path && strcmp(path, pc_boot_id_path) == 0 ? pc_boot_id_file
                                                                            : path;
}

FILE *fopen(const char *path, const char *mode)
{
    if (!pc_real_fopen)
        pc_real_fopen = (FILE * (*)(const char *, const char *)) dlsym(RTLD_NEXT, "fopen");
    return pc_real_fopen(pc_redirect(path), mode);
}

FILE *fopen64(const char *path, const char *mode)
{
    if (!pc_real_fopen64)
        pc_real_fopen64 = (FILE * (*)(const char *, const char *)) dlsym(RTLD_NEXT, "fopen64");
    return pc_real_fopen64(pc_redirect(path), mode);
}

static int pc_openat(int dirfd, const char *path, int flags, mode_t mode)
{
    path = pc_redirect(path);
    char full[PC_PATH_MAX];
    enum pc_kind k = pc_classify(dirfd, path, full);
    if (k == PC_NONE)
        return (int)syscall(SYS_openat, dirfd, path, flags, mode);

    pthread_mutex_lock(&pc_lock);
    struct stat sb;
    int existed = stat(full, &sb) == 0;
    int creates = (flags & O_CREAT) && !existed;
    if (k != PC_DIR && (creates || (k != PC_SHM && (flags & O_TRUNC) && existed && sb.st_size > 0)))
        pc_op(k, 0, creates ? "create" : "open O_TRUNC", full);
    int fd = (int)syscall(SYS_openat, dirfd, path, flags, mode);
    int saved = errno;
    if (fd >= 0 && k == PC_SHM) {
        /* Its name only: its writes (and SQLite's mmap of it) are not durable state. */
        if (creates)
            pc_record_simple(PC_OPEN, ++pc.next_open_id, (uint64_t)flags, 1, full);
    } else if (fd >= 0) {
        if (fd >= PC_FD_MAX) {
            static const char msg[] = "powercut: fd number too large to track\n";
            syscall(SYS_write, 2, msg, sizeof(msg) - 1);
            abort();
        }
        int slot = 0;
        while (slot < PC_SLOTS && pc_slots[slot].used)
            slot++;
        if (slot == PC_SLOTS) {
            static const char msg[] = "powercut: too many files open at once\n";
            syscall(SYS_write, 2, msg, sizeof(msg) - 1);
            abort();
        }
        uint64_t size = 0;
        if (fstat(fd, &sb) == 0)
            size = (uint64_t)sb.st_size;
        struct pc_fd *f = &pc_slots[slot];
        f->used = 1;
        f->open_id = ++pc.next_open_id;
        f->kind = k;
        memcpy(f->path, full, strlen(full) + 1);
        atomic_store(&pc_slot_of[fd], (unsigned char)(slot + 1));
        struct iovec d = {&size, sizeof(size)};
        pc_record(PC_OPEN, f->open_id, (uint64_t)flags, (uint64_t)creates, full, &d, 1,
                  sizeof(size));
    }
    pthread_mutex_unlock(&pc_lock);
    errno = saved;
    return fd;
}

static mode_t pc_mode(int flags, va_list ap)
{
    return (flags & O_CREAT) || (flags & O_TMPFILE) == O_TMPFILE ? (mode_t)va_arg(ap, int) : 0;
}

int open(const char *path, int flags, ...)
{
    va_list ap;
    va_start(ap, flags);
    mode_t m = pc_mode(flags, ap);
    va_end(ap);
    return pc_openat(AT_FDCWD, path, flags, m);
}

int open64(const char *path, int flags, ...)
{
    va_list ap;
    va_start(ap, flags);
    mode_t m = pc_mode(flags, ap);
    va_end(ap);
    return pc_openat(AT_FDCWD, path, flags | O_LARGEFILE, m);
}

int openat(int dirfd, const char *path, int flags, ...)
{
    va_list ap;
    va_start(ap, flags);
    mode_t m = pc_mode(flags, ap);
    va_end(ap);
    return pc_openat(dirfd, path, flags, m);
}

int openat64(int dirfd, const char *path, int flags, ...)
{
    va_list ap;
    va_start(ap, flags);
    mode_t m = pc_mode(flags, ap);
    va_end(ap);
    return pc_openat(dirfd, path, flags | O_LARGEFILE, m);
}

int creat(const char *path, mode_t mode)
{
    return pc_openat(AT_FDCWD, path, O_CREAT | O_WRONLY | O_TRUNC, mode);
}

int creat64(const char *path, mode_t mode)
{
    return pc_openat(AT_FDCWD, path, O_CREAT | O_WRONLY | O_TRUNC | O_LARGEFILE, mode);
}

/* The _FORTIFY_SOURCE entry points (no mode: O_CREAT is not allowed through them). */
int __open_2(const char *path, int flags);
int __open64_2(const char *path, int flags);
int __openat_2(int dirfd, const char *path, int flags);
int __openat64_2(int dirfd, const char *path, int flags);

int __open_2(const char *path, int flags)
{
    return pc_openat(AT_FDCWD, path, flags, 0);
}

int __open64_2(const char *path, int flags)
{
    return pc_openat(AT_FDCWD, path, flags | O_LARGEFILE, 0);
}

int __openat_2(int dirfd, const char *path, int flags)
{
    return pc_openat(dirfd, path, flags, 0);
}

int __openat64_2(int dirfd, const char *path, int flags)
{
    return pc_openat(dirfd, path, flags | O_LARGEFILE, 0);
}

/* ---- writes ---- */

static int pc_is_tracked(int fd)
{
    return fd >= 0 && fd < PC_FD_MAX && atomic_load(&pc_slot_of[fd]);
}

static uint64_t pc_iov_len(const struct iovec *iov, int n)
{
    uint64_t t = 0;
    for (int i = 0; i < n; i++)
        t += iov[i].iov_len;
    return t;
}

/* A write of IOV at OFF (-1: at the file position) to tracked FD: count it, do it, journal what
 * was written. */
static ssize_t pc_write_tracked(int fd, const struct iovec *iov, int n, int64_t off)
{
    struct pc_fd *f = pc_lock_file(fd);
    if (!f) /* closed meanwhile: the number is not ours any more */
        return off < 0 ? syscall(SYS_writev, fd, iov, n)
                       : syscall(SYS_pwritev, fd, iov, n, (long)off, 0L);
    int64_t at = off;
    if (at < 0) {
        int fl = fcntl(fd, F_GETFL);
        if (fl >= 0 && (fl & O_APPEND)) {
            struct stat sb;
            at = fstat(fd, &sb) == 0 ? (int64_t)sb.st_size : 0;
        } else {
            at = (int64_t)lseek(fd, 0, SEEK_CUR);
        }
    }
    if (f->kind != PC_DIR && pc_iov_len(iov, n) > 0)
        pc_op(f->kind, 0, "write", f->path);
    long w =
        off < 0 ? syscall(SYS_writev, fd, iov, n) : syscall(SYS_pwritev, fd, iov, n, (long)off, 0L);
    int saved = errno;
    if (w > 0)
        pc_record(PC_WRITE, f->open_id, (uint64_t)at, pc_now_ns(), NULL, iov, n, (uint64_t)w);
    pthread_mutex_unlock(&pc_lock);
    errno = saved;
    return (ssize_t)w;
}

ssize_t write(int fd, const void *buf, size_t n)
{
    if (!pc_is_tracked(fd))
        return (ssize_t)syscall(SYS_write, fd, buf, n);
    struct iovec v = {(void *)buf, n};
    return pc_write_tracked(fd, &v, 1, -1);
}

ssize_t pwrite(int fd, const void *buf, size_t n, off_t off)
{
    if (!pc_is_tracked(fd))
        return (ssize_t)syscall(SYS_pwrite64, fd, buf, n, off);
    struct iovec v = {(void *)buf, n};
    return pc_write_tracked(fd, &v, 1, (int64_t)off);
}

ssize_t pwrite64(int fd, const void *buf, size_t n, off64_t off)
{
    if (!pc_is_tracked(fd))
        return (ssize_t)syscall(SYS_pwrite64, fd, buf, n, off);
    struct iovec v = {(void *)buf, n};
    return pc_write_tracked(fd, &v, 1, (int64_t)off);
}

ssize_t writev(int fd, const struct iovec *iov, int n)
{
    if (!pc_is_tracked(fd))
        return (ssize_t)syscall(SYS_writev, fd, iov, n);
    return pc_write_tracked(fd, iov, n, -1);
}

ssize_t pwritev(int fd, const struct iovec *iov, int n, off_t off)
{
    if (!pc_is_tracked(fd))
        return (ssize_t)syscall(SYS_pwritev, fd, iov, n, (long)off, 0L);
    return pc_write_tracked(fd, iov, n, (int64_t)off);
}

ssize_t pwritev64(int fd, const struct iovec *iov, int n, off64_t off)
{
    if (!pc_is_tracked(fd))
        return (ssize_t)syscall(SYS_pwritev, fd, iov, n, (long)off, 0L);
    return pc_write_tracked(fd, iov, n, (int64_t)off);
}

static int pc_truncate(int fd, int64_t len)
{
    struct pc_fd *f = pc_is_tracked(fd) ? pc_lock_file(fd) : NULL;
    if (!f)
        return (int)syscall(SYS_ftruncate, fd, (long)len);
    if (f->kind != PC_DIR)
        pc_op(f->kind, 0, "truncate", f->path);
    int r = (int)syscall(SYS_ftruncate, fd, (long)len);
    int saved = errno;
    if (r == 0)
        pc_record_simple(PC_TRUNC, f->open_id, (uint64_t)len, pc_now_ns(), NULL);
    pthread_mutex_unlock(&pc_lock);
    errno = saved;
    return r;
}

int ftruncate(int fd, off_t len)
{
    return pc_truncate(fd, (int64_t)len);
}

int ftruncate64(int fd, off64_t len)
{
    return pc_truncate(fd, (int64_t)len);
}

/* Space reserved by fallocate (MODE 0: the file grows to OFF + LEN if shorter; KEEP_SIZE: no
 * visible change). Returns 0 or an errno value. Other modes are not modelled: abort, loudly. */
static int pc_fallocate(int fd, int mode, int64_t off, int64_t len, int posix)
{
    int r;
    struct pc_fd *f = pc_is_tracked(fd) ? pc_lock_file(fd) : NULL;
    if (!f) {
        if (posix && pc_real_posix_fallocate)
            return pc_real_posix_fallocate(fd, off, len);
        r = (int)syscall(SYS_fallocate, fd, mode, (long)off, (long)len);
        return r == 0 ? 0 : errno;
    }
    if (mode & ~FALLOC_FL_KEEP_SIZE) {
        static const char msg[] = "powercut: fallocate mode not modelled\n";
        syscall(SYS_write, 2, msg, sizeof(msg) - 1);
        abort();
    }
    if (!(mode & FALLOC_FL_KEEP_SIZE))
        pc_op(f->kind, 0, "fallocate", f->path);
    r = (int)syscall(SYS_fallocate, fd, mode, (long)off, (long)len);
    int err = r == 0 ? 0 : errno;
    if (err == EOPNOTSUPP && posix && pc_real_posix_fallocate) {
        /* glibc then writes a zero byte into each block that reads as zero (with its own
         * internal pwrite, which we do not see): the same content, at least OFF + LEN long */
        err = pc_real_posix_fallocate(fd, off, len);
    }
    if (err == 0 && !(mode & FALLOC_FL_KEEP_SIZE))
        pc_record_simple(PC_EXTEND, f->open_id, (uint64_t)(off + len), pc_now_ns(), NULL);
    pthread_mutex_unlock(&pc_lock);
    return err;
}

int posix_fallocate(int fd, off_t off, off_t len)
{
    return pc_fallocate(fd, 0, (int64_t)off, (int64_t)len, 1);
}

int posix_fallocate64(int fd, off64_t off, off64_t len)
{
    return pc_fallocate(fd, 0, (int64_t)off, (int64_t)len, 1);
}

int fallocate(int fd, int mode, off_t off, off_t len)
{
    int err = pc_fallocate(fd, mode, (int64_t)off, (int64_t)len, 0);
    if (err) {
        errno = err;
        return -1;
    }
    return 0;
}

int fallocate64(int fd, int mode, off64_t off, off64_t len)
{
    return fallocate(fd, mode, (off_t)off, (off_t)len);
}

/* ---- syncs ---- */

static int pc_sync(int fd, int data_only)
{
    long nr = data_only ? SYS_fdatasync : SYS_fsync;
    /* The lock is held across the sync: no write may slip in between the sync's end and its
     * record, or the rebuild would count it as synced. */
    struct pc_fd *f = pc_is_tracked(fd) ? pc_lock_file(fd) : NULL;
    if (!f)
        return (int)syscall(nr, fd);
    pc_op(f->kind, 1, data_only ? "fdatasync" : "fsync", f->path);
    int r = (int)syscall(nr, fd);
    int saved = errno;
    if (r == 0)
        pc_record_simple(PC_SYNC, f->open_id, (uint64_t)data_only, pc_now_ns(), NULL);
    pthread_mutex_unlock(&pc_lock);
    errno = saved;
    return r;
}

int fsync(int fd)
{
    return pc_sync(fd, 0);
}

int fdatasync(int fd)
{
    return pc_sync(fd, 1);
}

/* sync(2) and syncfs(2) flush everything: a sync of every tracked fd, directory included. */
static void pc_sync_all(void)
{
    pthread_mutex_lock(&pc_lock);
    for (int fd = 0; fd < PC_FD_MAX; fd++) {
        if (!atomic_load(&pc_slot_of[fd]))
            continue;
        struct pc_fd *f = pc_file(fd);
        pc_op(f->kind, 1, "sync", f->path);
        if (syscall(SYS_fsync, fd) == 0)
            pc_record_simple(PC_SYNC, f->open_id, 0, pc_now_ns(), NULL);
    }
    pthread_mutex_unlock(&pc_lock);
}

void sync(void)
{
    if (pc.active)
        pc_sync_all();
    syscall(SYS_sync);
}

int syncfs(int fd)
{
    if (pc.active)
        pc_sync_all();
    return (int)syscall(SYS_syncfs, fd);
}

int close(int fd)
{
    struct pc_fd *f = pc_is_tracked(fd) ? pc_lock_file(fd) : NULL;
    if (!f)
        return (int)syscall(SYS_close, fd);
    /* Untracked before the real close: once closed, the number may be handed out again. */
    atomic_store(&pc_slot_of[fd], 0);
    pc_record_simple(PC_CLOSE, f->open_id, 0, 0, NULL);
    f->used = 0;
    int r = (int)syscall(SYS_close, fd);
    int saved = errno;
    pthread_mutex_unlock(&pc_lock);
    errno = saved;
    return r;
}

/* ---- names ---- */

int unlinkat(int dirfd, const char *path, int flags)
{
    char full[PC_PATH_MAX];
    enum pc_kind k = pc_classify(dirfd, path, full);
    if (k == PC_NONE || k == PC_DIR)
        return (int)syscall(SYS_unlinkat, dirfd, path, flags);
    pthread_mutex_lock(&pc_lock);
    pc_op(k, 0, "unlink", full);
    int r = (int)syscall(SYS_unlinkat, dirfd, path, flags);
    int saved = errno;
    if (r == 0)
        pc_record_simple(PC_UNLINK, 0, 0, pc_now_ns(), full);
    pthread_mutex_unlock(&pc_lock);
    errno = saved;
    return r;
}

int unlink(const char *path)
{
    return unlinkat(AT_FDCWD, path, 0);
}

int renameat2(int olddirfd, const char *oldpath, int newdirfd, const char *newpath,
              unsigned int flags)
{
    char a[PC_PATH_MAX], b[PC_PATH_MAX];
    enum pc_kind ka = pc_classify(olddirfd, oldpath, a);
    enum pc_kind kb = pc_classify(newdirfd, newpath, b);
    if ((ka == PC_NONE || ka == PC_DIR) && (kb == PC_NONE || kb == PC_DIR))
        return (int)syscall(SYS_renameat2, olddirfd, oldpath, newdirfd, newpath, flags);
    pthread_mutex_lock(&pc_lock);
    pc_op(ka != PC_NONE ? ka : kb, 0, "rename", ka != PC_NONE ? a : b);
    int r = (int)syscall(SYS_renameat2, olddirfd, oldpath, newdirfd, newpath, flags);
    int saved = errno;
    if (r == 0) {
        /* Both names, absolute (an untracked side is recorded as given). */
        char both[2 * PC_PATH_MAX];
        const char *pa = ka != PC_NONE ? a : oldpath;
        const char *pb = kb != PC_NONE ? b : newpath;
        size_t la = strlen(pa), lb = strlen(pb);
        if (la + lb + 1 < sizeof(both)) {
            memcpy(both, pa, la + 1);
            memcpy(both + la + 1, pb, lb);
            struct iovec d = {both + la + 1, lb};
            pc_record(PC_RENAME, 0, 0, pc_now_ns(), both, &d, 1, lb);
        }
    }
    pthread_mutex_unlock(&pc_lock);
    errno = saved;
    return r;
}

int renameat(int olddirfd, const char *oldpath, int newdirfd, const char *newpath)
{
    return renameat2(olddirfd, oldpath, newdirfd, newpath, 0);
}

int rename(const char *oldpath, const char *newpath)
{
    return renameat2(AT_FDCWD, oldpath, AT_FDCWD, newpath, 0);
}

#else
typedef int pc_lp64_only; /* not an empty translation unit */
#endif
