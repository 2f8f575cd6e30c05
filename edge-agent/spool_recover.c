/* Spool corruption: check a spool file before it is opened, and quarantine a corrupt one (its
 * files moved aside, a fresh spool with one "corrupt_spool" ledger row put in its place).
 * The contract is in spool.h (agent_spool_open_checked(), agent_spool_recover()).
 *
 * Names used below, for a spool at PATH:
 *   PATH.corrupt-<UTC>[.N] (+ "-wal", "-shm")  Q: where a corrupt spool's files go. ".N" only
 *                                              when that name is taken (a Pi without an RTC
 *                                              boots at 1970, so stamps can repeat).
 *   PATH.new-<pid>                             N: the replacement, built beside PATH.
 */
#include "spool.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <sqlite3.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "cistern/err.h"
#include "cistern/fsync.h"
#include "cistern/log.h"

#define RECOVER_WHY_LEN 512
#define RECOVER_DETAIL_LEN 1024
/* Enough of quick_check's first complaint for the ledger and the log. */
#define RECOVER_SQLMSG_LEN 200

/* The file names of one quarantine, kept off the stack (PATH_MAX each). */
struct recover_names {
    char dir[PATH_MAX];  /* directory of PATH ("." for a bare name) */
    char base[PATH_MAX]; /* last component of PATH */
    char wal[PATH_MAX], shm[PATH_MAX];
    char q[PATH_MAX], qwal[PATH_MAX], qshm[PATH_MAX];
    char n[PATH_MAX], nwal[PATH_MAX], nshm[PATH_MAX], njournal[PATH_MAX];
};

/* snprintf that reports truncation (a path too long to name its siblings). */
static int recover__fmt(char *out, size_t len, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

static int recover__fmt(char *out, size_t len, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(out, len, fmt, ap);
    va_end(ap);
    return n >= 0 && (size_t)n < len ? 0 : -1;
}

/* 1: PATH exists (as anything), 0: it does not, -1: cannot tell (errno set). */
static int recover__exists(const char *path)
{
    struct stat sb;
    if (lstat(path, &sb) == 0)
        return 1;
    return errno == ENOENT ? 0 : -1;
}

/* A WAL holds pages only past its 32-byte header: a reader (`cistern-agent status`) leaves an
 * empty one behind. */
#define RECOVER_WAL_HDR 32

/* 1 if PATH is a WAL with at least one frame. */
static int recover__wal_has_frames(const char *path)
{
    struct stat sb;
    return lstat(path, &sb) == 0 && sb.st_size > RECOVER_WAL_HDR;
}

/* unlink that treats "already gone" as success. */
static int recover__unlink(const char *path)
{
    return unlink(path) == 0 || errno == ENOENT ? 0 : -1;
}

/* rename that treats a missing source as success (the -wal/-shm need not exist). */
static int recover__rename_if(const char *from, const char *to)
{
    return rename(from, to) == 0 || errno == ENOENT ? 0 : -1;
}

/* PATH itself or, if it is a symlink, the file it points to: SQLite follows a symlinked database
 * and keeps the -wal/-shm beside the target, so those are the names to check and move (and the
 * symlink stays as the user made it). Returns a malloc'd string, or NULL (out of memory). */
static char *recover__resolve(const char *path)
{
    struct stat sb;
    if (lstat(path, &sb) == 0 && S_ISLNK(sb.st_mode)) {
        char *real = realpath(path, NULL);
        if (real)
            return real;
    }
    return strdup(path);
}

/* Fill the names that depend only on PATH: its directory, base name, -wal/-shm, and N. */
static int recover__names_init(struct recover_names *nm, const char *path)
{
    const char *slash = strrchr(path, '/');
    if (slash) {
        size_t dlen = slash == path ? 1 : (size_t)(slash - path);
        if (dlen >= sizeof(nm->dir))
            return -1;
        memcpy(nm->dir, path, dlen);
        nm->dir[dlen] = '\0';
    } else {
        nm->dir[0] = '.';
        nm->dir[1] = '\0';
    }
    long pid = (long)getpid();
    if (recover__fmt(nm->base, sizeof(nm->base), "%s", slash ? slash + 1 : path) ||
        recover__fmt(nm->wal, sizeof(nm->wal), "%s-wal", path) ||
        recover__fmt(nm->shm, sizeof(nm->shm), "%s-shm", path) ||
        recover__fmt(nm->n, sizeof(nm->n), "%s.new-%ld", path, pid) ||
        recover__fmt(nm->nwal, sizeof(nm->nwal), "%s.new-%ld-wal", path, pid) ||
        recover__fmt(nm->nshm, sizeof(nm->nshm), "%s.new-%ld-shm", path, pid) ||
        recover__fmt(nm->njournal, sizeof(nm->njournal), "%s.new-%ld-journal", path, pid))
        return -1;
    return 0;
}

static int recover__set_q(struct recover_names *nm, const char *q)
{
    if (recover__fmt(nm->q, sizeof(nm->q), "%s", q) ||
        recover__fmt(nm->qwal, sizeof(nm->qwal), "%s-wal", q) ||
        recover__fmt(nm->qshm, sizeof(nm->qshm), "%s-shm", q))
        return -1;
    return 0;
}

/* Pick Q = PATH.corrupt-<UTC> (or with ".N") such that none of Q, Q-wal, Q-shm exists: an
 * earlier quarantine is never overwritten. */
static int recover__pick_q(struct recover_names *nm, const char *path)
{
    char stamp[32], q[PATH_MAX];
    struct tm tm;
    time_t now = time(NULL);
    if (!gmtime_r(&now, &tm) || strftime(stamp, sizeof(stamp), "%Y%m%dT%H%M%SZ", &tm) == 0)
        return -1;
    for (int i = 0; i < 1000; i++) {
        int bad = i ? recover__fmt(q, sizeof(q), "%s.corrupt-%s.%d", path, stamp, i)
                    : recover__fmt(q, sizeof(q), "%s.corrupt-%s", path, stamp);
        if (bad || recover__set_q(nm, q))
            return -1;
        if (recover__exists(nm->q) == 0 && recover__exists(nm->qwal) == 0 &&
            recover__exists(nm->qshm) == 0)
            return 0;
    }
    errno = EEXIST;
    return -1;
}

/* Is NAME (in the spool's directory) a leftover replacement: BASE.new-<digits>[-wal|-shm|
 * -journal]? */
static int recover__is_leftover(const char *name, const char *base)
{
    size_t blen = strlen(base);
    if (strncmp(name, base, blen) != 0 || strncmp(name + blen, ".new-", 5) != 0)
        return 0;
    const char *p = name + blen + 5;
    if (*p < '0' || *p > '9')
        return 0;
    while (*p >= '0' && *p <= '9')
        p++;
    return !*p || !strcmp(p, "-wal") || !strcmp(p, "-shm") || !strcmp(p, "-journal");
}

/* Remove replacements left by a quarantine that crashed before renaming one into place (step 1
 * below): they were never the spool, and only hold a copy of the ledger row that the next
 * quarantine writes again. */
static void recover__sweep(const struct recover_names *nm)
{
    DIR *d = opendir(nm->dir);
    if (!d)
        return;
    struct dirent *de;
    while ((de = readdir(d)) != NULL) {
        if (!recover__is_leftover(de->d_name, nm->base))
            continue;
        if (unlinkat(dirfd(d), de->d_name, 0) == 0)
            cis_info("[spool] removed %s/%s, left by an interrupted quarantine", nm->dir,
                     de->d_name);
        else
            cis_warn("[spool] cannot remove %s/%s: %s", nm->dir, de->d_name, strerror(errno));
    }
    closedir(d);
}

/* Find a quarantine interrupted between its link and its final rename (see the comment at
 * recover__quarantine()): PATH still has a second name PATH.corrupt-* (same inode). Returns 1
 * and fills Q in NM, or 0. */
static int recover__find_interrupted(struct recover_names *nm, const struct stat *sb)
{
    if (sb->st_nlink < 2)
        return 0;
    DIR *d = opendir(nm->dir);
    if (!d)
        return 0;
    size_t blen = strlen(nm->base);
    int found = 0;
    struct dirent *de;
    while (!found && (de = readdir(d)) != NULL) {
        const char *name = de->d_name;
        size_t len = strlen(name);
        if (strncmp(name, nm->base, blen) != 0 || strncmp(name + blen, ".corrupt-", 9) != 0)
            continue;
        if (len >= 4 && (!strcmp(name + len - 4, "-wal") || !strcmp(name + len - 4, "-shm")))
            continue;
        struct stat qs;
        if (fstatat(dirfd(d), name, &qs, AT_SYMLINK_NOFOLLOW) != 0)
            continue;
        if (qs.st_dev == sb->st_dev && qs.st_ino == sb->st_ino) {
            char q[PATH_MAX];
            found = recover__fmt(q, sizeof(q), "%s/%s", nm->dir, name) == 0 &&
                    recover__set_q(nm, q) == 0;
        }
    }
    closedir(d);
    return found;
}

static int recover__corrupt_rc(int rc)
{
    if ((rc & 0xff) == SQLITE_CORRUPT || (rc & 0xff) == SQLITE_NOTADB)
        return 1;
#ifdef SQLITE_IOERR_CORRUPTFS
    if (rc == SQLITE_IOERR_CORRUPTFS)
        return 1;
#endif
    /* The file is shorter than its own header says: truncated. */
    return rc == SQLITE_IOERR_SHORT_READ;
}

/* Make a message one line (quick_check lists its findings on several) and drop the noise
 * SQLite puts in front of them. */
static void recover__one_line(char *msg)
{
    static const char noise[] = "*** in database main *** ";
    char *p = msg;
    for (char *c = msg; *c; c++)
        if (*c == '\n' || *c == '\r' || *c == '\t')
            *c = ' ';
    while ((p = strstr(msg, noise)) != NULL)
        memmove(p, p + sizeof(noise) - 1, strlen(p + sizeof(noise) - 1) + 1);
}

static void recover__why_sql(char *why, size_t whylen, int rc, const char *msg)
{
    const char *what = (rc & 0xff) == SQLITE_NOTADB    ? "not a database"
                       : rc == SQLITE_IOERR_SHORT_READ ? "truncated"
                                                       : "failed quick_check";
    snprintf(why, whylen, "%s (%.*s)", what, RECOVER_SQLMSG_LEN, msg ? msg : "?");
}

/* If PATH is shorter than its own header says (a valid in-header size), put "truncated" in WHY:
 * clearer for a technician than SQLite's "malformed". Only meaningful without a WAL, which may
 * hold pages a checkpoint had not yet written. */
static void recover__explain_truncation(const char *path, off_t size, char *why, size_t whylen)
{
    uint8_t h[100];
    FILE *fp = fopen(path, "rbe");
    if (!fp)
        return;
    size_t got = fread(h, 1, sizeof(h), fp);
    fclose(fp);
    if (got != sizeof(h) || memcmp(h, "SQLite format 3", 16) != 0)
        return;
    uint32_t psize = (uint32_t)h[16] << 8 | h[17];
    if (psize == 1)
        psize = 65536;
    uint32_t change = (uint32_t)h[24] << 24 | (uint32_t)h[25] << 16 | (uint32_t)h[26] << 8 | h[27];
    uint32_t pages = (uint32_t)h[28] << 24 | (uint32_t)h[29] << 16 | (uint32_t)h[30] << 8 | h[31];
    uint32_t valid = (uint32_t)h[92] << 24 | (uint32_t)h[93] << 16 | (uint32_t)h[94] << 8 | h[95];
    uint64_t want = (uint64_t)psize * pages;
    if (change != valid || pages == 0 || (uint64_t)size >= want)
        return;
    char was[RECOVER_WHY_LEN];
    snprintf(was, sizeof(was), "%s", why);
    snprintf(why, whylen, "truncated: %lld bytes where its header says %llu; %s", (long long)size,
             (unsigned long long)want, was);
}

/* Run PRAGMA quick_check on PATH over a connection of its own (read-write, so that a WAL left by
 * a crash is recovered as the agent itself would). Returns 1 (corrupt: WHY says why) or 0
 * (healthy, or the check could not run for a reason that is not corruption, e.g. permissions or
 * a lock; agent_spool_open() then reports that reason itself). */
static int recover__quick_check(const char *path, char *why, size_t whylen)
{
    sqlite3 *db = NULL;
    sqlite3_stmt *st = NULL;
    int corrupt = 0;
    int rc = sqlite3_open_v2(path, &db, SQLITE_OPEN_READWRITE | SQLITE_OPEN_NOMUTEX, NULL);
    if (rc != SQLITE_OK) {
        if (recover__corrupt_rc(rc)) {
            recover__why_sql(why, whylen, rc, db ? sqlite3_errmsg(db) : sqlite3_errstr(rc));
            corrupt = 1;
        }
        goto out;
    }
    sqlite3_extended_result_codes(db, 1);
    sqlite3_busy_timeout(db, 5000);
    /* Preparing reads the schema: a file that is not a database fails already here. */
    rc = sqlite3_prepare_v2(db, "PRAGMA quick_check", -1, &st, NULL);
    if (rc == SQLITE_OK) {
        int rows = 0;
        while ((rc = sqlite3_step(st)) == SQLITE_ROW) {
            const char *line = (const char *)sqlite3_column_text(st, 0);
            if (rows++ == 0 && !(line && strcmp(line, "ok") == 0)) {
                /* Any finding at all is corruption, whatever happens next. */
                snprintf(why, whylen, "failed quick_check (%.*s)", RECOVER_SQLMSG_LEN,
                         line ? line : "?");
                corrupt = 1;
            }
        }
        if (rc == SQLITE_DONE) {
            if (!corrupt && rows != 1) {
                snprintf(why, whylen, "failed quick_check (%d result rows)", rows);
                corrupt = 1;
            }
            goto out;
        }
    }
    rc = sqlite3_extended_errcode(db);
    if (recover__corrupt_rc(rc)) {
        if (!corrupt)
            recover__why_sql(why, whylen, rc, sqlite3_errmsg(db));
        corrupt = 1;
    } else if (!corrupt) {
        cis_warn("[spool] %s: cannot check the spool before opening it: %s (sqlite %d)", path,
                 sqlite3_errmsg(db), rc);
    }

out:
    sqlite3_finalize(st);
    sqlite3_close(db);
    return corrupt;
}

/* PATH as a SQLite URI with PARAMS ("file:" + the path with %, ?, # escaped). */
static int recover__uri(char *out, size_t len, const char *path, const char *params)
{
    size_t o = 0;
    /* "file:" + "//" (empty authority) for an absolute path, so "//x" stays a path. */
    const char *pre = path[0] == '/' ? "file://" : "file:";
    if (recover__fmt(out, len, "%s", pre))
        return -1;
    o = strlen(out);
    for (const unsigned char *p = (const unsigned char *)path; *p; p++) {
        if (o + 4 >= len)
            return -1;
        if (*p == '%' || *p == '?' || *p == '#' || *p < 0x20 || *p >= 0x7f)
            o += (size_t)snprintf(out + o, len - o, "%%%02X", *p);
        else
            out[o++] = (char)*p;
    }
    out[o] = '\0';
    return recover__fmt(out + o, len - o, "?%s", params);
}

/* ---- the WAL of an unclean stop ---- */

static uint32_t recover__be32(const uint8_t *p)
{
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

/* SQLite's WAL checksum (its file format, section 4.1) over N bytes (a multiple of 8), words in
 * big-endian order when BIG, else little-endian, continuing from S[0], S[1]. */
static void recover__wal_cksum(int big, const uint8_t *b, size_t n, uint32_t s[2])
{
    for (size_t i = 0; i + 8 <= n; i += 8) {
        uint32_t x0, x1;
        if (big) {
            x0 = recover__be32(b + i);
            x1 = recover__be32(b + i + 4);
        } else {
            x0 = (uint32_t)b[i] | (uint32_t)b[i + 1] << 8 | (uint32_t)b[i + 2] << 16 |
                 (uint32_t)b[i + 3] << 24;
            x1 = (uint32_t)b[i + 4] | (uint32_t)b[i + 5] << 8 | (uint32_t)b[i + 6] << 16 |
                 (uint32_t)b[i + 7] << 24;
        }
        s[0] += x0 + s[1];
        s[1] += x1 + s[0];
    }
}

/* From the -shm file a stopped process left (SHM), read as SQLite's wal-index header: the
 * index of the last committed frame and the WAL's salts. Returns 1 if the header is whole (its
 * two copies agree and its checksum holds), else 0 (no information). */
static int recover__shm_header(const char *shm, uint32_t *mx_frame, uint8_t salt[8])
{
    uint8_t h[96];
    FILE *fp = fopen(shm, "rbe");
    if (!fp)
        return 0;
    size_t got = fread(h, 1, sizeof(h), fp);
    fclose(fp);
    if (got != sizeof(h) || memcmp(h, h + 48, 48) != 0)
        return 0;
    uint32_t w[12];
    memcpy(w, h, sizeof(w)); /* the machine's byte order: the -shm never leaves it */
    /* iVersion 3007000, isInit (byte 12) set */
    if (w[0] != 3007000 || h[12] != 1)
        return 0;
    uint32_t s[2] = {0, 0};
    for (int i = 0; i < 10; i += 2) {
        s[0] += w[i] + s[1];
        s[1] += w[i + 1] + s[0];
    }
    if (s[0] != w[10] || s[1] != w[11])
        return 0;
    *mx_frame = w[4];
    memcpy(salt, h + 32, 8);
    return 1;
}

/* Is the WAL at WAL whole, as the -shm header at SHM (may be NULL) says it was when the process
 * stopped? Only for a stop in this boot (the page cache survived: a power cut can legitimately
 * leave less, and SQLite then recovers the valid frames). Returns 1 with WHY filled when the WAL
 * lost committed frames: its header is garbage, or it holds fewer valid frames (SQLite's rules:
 * salts and a checksum chain) than were committed. */
static int recover__wal_damaged(const char *wal, const char *shm, char *why, size_t whylen)
{
    uint8_t hdr[32];
    uint32_t mx = 0;
    uint8_t salt[8];
    int have_shm = shm && recover__shm_header(shm, &mx, salt);
    FILE *fp = fopen(wal, "rbe");
    if (!fp)
        return 0;
    int damaged = 0;
    size_t got = fread(hdr, 1, sizeof(hdr), fp);
    static const uint8_t zero[32];
    if (got < sizeof(hdr) || memcmp(hdr, zero, sizeof(hdr)) == 0) {
        /* no header: an empty WAL (or its reserved room), unless frames were committed */
        if (have_shm && mx > 0) {
            snprintf(why, whylen, "WAL damaged: it holds none of the %u frames committed", mx);
            damaged = 1;
        }
        goto out;
    }
    uint32_t magic = recover__be32(hdr), psize = recover__be32(hdr + 8);
    int big = magic & 1;
    uint32_t ck[2] = {0, 0};
    recover__wal_cksum(big, hdr, 24, ck);
    if ((magic & ~1u) != 0x377f0682u || recover__be32(hdr + 4) != 3007000 || psize < 512 ||
        psize > 65536 || (psize & (psize - 1)) || ck[0] != recover__be32(hdr + 24) ||
        ck[1] != recover__be32(hdr + 28)) {
        snprintf(why, whylen, "WAL damaged: its header is not a WAL header");
        damaged = 1;
        goto out;
    }
    if (!have_shm || mx == 0)
        goto out;
    if (memcmp(hdr + 16, salt, 8) != 0) {
        snprintf(why, whylen, "WAL damaged: it is not the WAL of the %u frames committed", mx);
        damaged = 1;
        goto out;
    }
    uint8_t *fr = malloc(24 + (size_t)psize);
    if (!fr)
        goto out;
    uint32_t last_commit = 0;
    for (uint32_t i = 1; i <= mx; i++) {
        if (fread(fr, 1, 24 + (size_t)psize, fp) != 24 + (size_t)psize)
            break;
        if (recover__be32(fr) == 0 || memcmp(fr + 8, hdr + 16, 8) != 0)
            break;
        recover__wal_cksum(big, fr, 8, ck);
        recover__wal_cksum(big, fr + 24, psize, ck);
        if (ck[0] != recover__be32(fr + 16) || ck[1] != recover__be32(fr + 20))
            break;
        if (recover__be32(fr + 4) != 0)
            last_commit = i;
    }
    free(fr);
    if (last_commit < mx) {
        snprintf(why, whylen, "WAL damaged: it holds %u of the %u frames committed", last_commit,
                 mx);
        damaged = 1;
    }
out:
    fclose(fp);
    return damaged;
}

/* The spool's "open" mark (meta open_boot, see agent_spool_boot_mark()) as the database file at
 * PATH holds it (read through SQLite with immutable=1: nothing is written or created beside
 * it). 0: closed cleanly, from before the mark existed, or unreadable. */
static int64_t recover__open_mark(const char *path)
{
    char uri[PATH_MAX * 3 + 32];
    sqlite3 *db = NULL;
    sqlite3_stmt *st = NULL;
    int64_t v = 0;
    if (recover__uri(uri, sizeof(uri), path, "immutable=1") != 0)
        return 0;
    if (sqlite3_open_v2(uri, &db, SQLITE_OPEN_READONLY | SQLITE_OPEN_URI | SQLITE_OPEN_NOMUTEX,
                        NULL) == SQLITE_OK &&
        sqlite3_prepare_v2(db, "SELECT value FROM meta WHERE key = 'open_boot'", -1, &st,
                           NULL) == SQLITE_OK &&
        sqlite3_step(st) == SQLITE_ROW && sqlite3_column_type(st, 0) == SQLITE_INTEGER)
        v = sqlite3_column_int64(st, 0);
    sqlite3_finalize(st);
    sqlite3_close(db);
    return v;
}

/* After an unclean stop, did the WAL lose commits? Either it is gone (the mark is in the file,
 * which the agent puts there only after the WAL's name was synced), or, for a stop in this boot,
 * it is shorter or other than the -shm says (recover__wal_damaged()). A stop in an earlier boot
 * may be a power cut, whose loss SQLite's own recovery handles. Returns 1 with WHY filled.
 * *WAL_CHECKED is set to 1 when it looked at the WAL and found it intact. */
static int recover__wal_lost(const char *path, const struct recover_names *nm, int has_wal,
                             int has_shm, char *why, size_t whylen, int *wal_checked)
{
    int64_t mark = recover__open_mark(path);
    if (mark <= 0)
        return 0;
    if (!has_wal) {
        snprintf(why, whylen,
                 "WAL deleted: the spool was not closed cleanly and its -wal file is gone; records"
                 " committed since the last checkpoint are lost");
        return 1;
    }
    int64_t now = agent_spool_boot_mark();
    if (mark == 1 || mark != now)
        return 0;
    if (recover__wal_damaged(nm->wal, has_shm ? nm->shm : NULL, why, whylen))
        return 1;
    *wal_checked = 1;
    return 0;
}

/* What could be read of a corrupt spool. */
struct recover_info {
    struct agent_spool_salvage sv;
    int have_min; /* the segments query answered: sv.min_pending_seq is known (0: none stored) */
};

/* Best effort, and never trusting the file: read epoch, next_seq and the lowest stored seq from
 * the (corrupt) database at PATH, read-only. Whatever fails stays zero. With a -wal beside it
 * the WAL is honoured (mode=ro: it may hold the latest next_seq); without one (or with an empty
 * one), immutable=1 reads the file alone and creates nothing beside it (a read-only connection
 * would make an empty -wal next to a stale -shm, blurring what happened). */
static void recover__salvage(const char *path, int has_wal, struct recover_info *ri)
{
    char uri[PATH_MAX * 3 + 32];
    sqlite3 *db = NULL;
    sqlite3_stmt *st = NULL;

    memset(ri, 0, sizeof(*ri));
    if (recover__uri(uri, sizeof(uri), path, has_wal ? "mode=ro" : "immutable=1") != 0)
        return;
    if (sqlite3_open_v2(uri, &db, SQLITE_OPEN_READONLY | SQLITE_OPEN_URI | SQLITE_OPEN_NOMUTEX,
                        NULL) != SQLITE_OK)
        goto out;
    sqlite3_busy_timeout(db, 1000);
    /* cell_size_check: each cell's size is checked against its page as it is read, so garbage
     * gives an error rather than a read past the page. writable_schema: a file shorter than its
     * header says (truncated) is still read as far as it goes instead of refused outright, and
     * a damaged schema row does not hide the intact ones; the connection is read-only, so
     * nothing can be written through it. */
    sqlite3_exec(db, "PRAGMA cell_size_check=ON; PRAGMA writable_schema=ON", NULL, NULL, NULL);
    if (sqlite3_prepare_v2(db, "SELECT key, value FROM meta WHERE key IN ('epoch','next_seq')", -1,
                           &st, NULL) == SQLITE_OK) {
        uint64_t epoch = 0, next = 0;
        int rc;
        while ((rc = sqlite3_step(st)) == SQLITE_ROW) {
            const char *k = (const char *)sqlite3_column_text(st, 0);
            sqlite3_int64 v = sqlite3_column_int64(st, 1);
            if (!k || sqlite3_column_type(st, 1) != SQLITE_INTEGER || v <= 0)
                continue;
            if (!strcmp(k, "epoch"))
                epoch = (uint64_t)v;
            else if (!strcmp(k, "next_seq"))
                next = (uint64_t)v;
        }
        /* Only a complete answer counts: a read that failed half-way may have missed a row. */
        if (rc == SQLITE_DONE) {
            ri->sv.epoch = epoch;
            ri->sv.next_seq = next;
        }
    }
    sqlite3_finalize(st);
    st = NULL;
    if (sqlite3_prepare_v2(db, "SELECT min(first_seq) FROM segments", -1, &st, NULL) == SQLITE_OK &&
        sqlite3_step(st) == SQLITE_ROW) {
        if (sqlite3_column_type(st, 0) == SQLITE_NULL) {
            ri->have_min = 1;
        } else if (sqlite3_column_type(st, 0) == SQLITE_INTEGER &&
                   sqlite3_column_int64(st, 0) > 0) {
            ri->sv.min_pending_seq = (uint64_t)sqlite3_column_int64(st, 0);
            ri->have_min = 1;
        }
    }
    /* min() on the key follows the tree's leftmost path alone: right when the damage is
     * elsewhere, but two swapped pages lead it to another leaf, above records still there,
     * which would then be lost without a ledger entry. So the table itself is scanned too (NOT
     * INDEXED: not the segments_prio index that covers first_seq), and the least seq of any row
     * it reads lowers the answer, as far as the scan gets before damage stops it. */
    sqlite3_finalize(st);
    st = NULL;
    if (ri->sv.min_pending_seq > 0 &&
        sqlite3_prepare_v2(db, "SELECT first_seq FROM segments NOT INDEXED", -1, &st, NULL) ==
            SQLITE_OK)
        while (sqlite3_step(st) == SQLITE_ROW)
            if (sqlite3_column_type(st, 0) == SQLITE_INTEGER && sqlite3_column_int64(st, 0) > 0 &&
                (uint64_t)sqlite3_column_int64(st, 0) < ri->sv.min_pending_seq)
                ri->sv.min_pending_seq = (uint64_t)sqlite3_column_int64(st, 0);

out:
    sqlite3_finalize(st);
    sqlite3_close(db);
}

/* Quarantine the spool at O->path (corrupt because of WHY; the real file, not a symlink) and put
 * a fresh one in its place. FALLBACK (may be NULL) is what a running spool knew, used where the
 * file cannot be read.
 * WAL_LOST: the WAL was deleted (its records are not in any count). RESUME: NM->q is already a
 * second name of PATH, made by an interrupted earlier run; finish that run.
 *
 * Crash safety. The steps, and what a crash after each leaves:
 *  1. Build the replacement N = PATH.new-<pid> completely (agent_spool_open, one ledger row,
 *     clean close, which checkpoints and removes N's -wal/-shm), fsync N and the directory.
 *     A crash before step 2 leaves the old files untouched; N is a leftover that the next
 *     start removes, and that start finds the corruption again and starts over.
 *  2. link(PATH, Q), fsync the directory. Q is now a second name of the old database and the
 *     durable mark that a quarantine is under way: a start that finds PATH with a
 *     PATH.corrupt-* of the same inode resumes at step 3 instead of opening PATH (whose WAL
 *     may already have moved, so PATH alone could look healthy yet be stale: seqs reused).
 *  3. rename PATH-wal and PATH-shm to Q-wal, Q-shm: now Q opens with its own WAL. These must
 *     move before step 4, or SQLite would apply the old WAL to the new database.
 *  4. rename(N, PATH): atomic, so PATH is at any instant either the old database or the
 *     complete new spool. The old inode keeps its name Q.
 *  5. fsync the directory, so the renames survive a power cut (if they do not, the next start
 *     sees the state after step 2 and resumes).
 * Without hard links (vfat, some FUSE), step 2 becomes a rename(PATH, Q) after step 3, and a
 * crash between steps 3 and 4 leaves PATH without its WAL: that case cannot be told apart
 * from a healthy spool afterwards. The agent's spool belongs on a POSIX filesystem. */
static int recover__quarantine(const struct agent_spool_opts *o, struct recover_names *nm,
                               const char *why, const struct recover_info *fallback, int wal_lost,
                               int resume, uint64_t *new_epoch, char *err, size_t errlen)
{
    const char *path = o->path;
    struct agent_spool *ns = NULL;
    struct recover_info ri;
    char detail[RECOVER_DETAIL_LEN];
    const char *note = "";
    char notebuf[256];
    int ret = CIS_OK;

    if (resume) {
        /* Finish step 3 first: then Q is whole, with its WAL, and is what we salvage from. */
        if (recover__rename_if(nm->wal, nm->qwal) || recover__rename_if(nm->shm, nm->qshm)) {
            cis_set_err(err, errlen, "%s: cannot move its -wal/-shm aside to %s: %s", path, nm->q,
                        strerror(errno));
            return CIS_EIO;
        }
        recover__salvage(nm->q, recover__wal_has_frames(nm->qwal), &ri);
    } else {
        if (recover__pick_q(nm, path) != 0) {
            cis_set_err(err, errlen, "%s: cannot name a quarantine file: %s", path,
                        strerror(errno));
            return CIS_EIO;
        }
        struct stat sb;
        if (stat(path, &sb) == 0 && sb.st_size > 0)
            recover__salvage(path, recover__wal_has_frames(nm->wal), &ri);
        else
            memset(&ri, 0, sizeof(ri));
    }

    /* What the file says wins; what the running spool knew fills the gaps. */
    if (fallback) {
        if (!ri.sv.epoch)
            ri.sv.epoch = fallback->sv.epoch;
        if (!ri.sv.next_seq)
            ri.sv.next_seq = fallback->sv.next_seq;
        if (!ri.have_min && fallback->have_min) {
            ri.sv.min_pending_seq = fallback->sv.min_pending_seq;
            ri.have_min = 1;
        }
    }

    /* The lost range: every seq from the lowest still stored to the last one given out. It may
     * include records acknowledged out of order; the receiver has those and ignores them. */
    uint64_t first = 0, last = 0, count = 0;
    if (ri.sv.epoch && ri.sv.next_seq && ri.have_min) {
        uint64_t lo = ri.sv.min_pending_seq ? ri.sv.min_pending_seq : ri.sv.next_seq;
        if (ri.sv.next_seq > 1 && lo <= ri.sv.next_seq - 1) {
            first = lo;
            last = ri.sv.next_seq - 1;
            count = last - first + 1;
        } else if (ri.sv.min_pending_seq == 0) {
            note = "; no records were pending";
        } else {
            note = "; the lost seq range is unknown (stored seqs are not below next_seq)";
        }
    } else if (ri.sv.epoch && ri.sv.next_seq) {
        snprintf(notebuf, sizeof(notebuf),
                 "; the lost seq range is unknown (segments unreadable; next_seq was %llu)",
                 (unsigned long long)ri.sv.next_seq);
        note = notebuf;
    } else {
        note = ri.sv.epoch ? "; the lost seq range is unknown (next_seq unreadable)"
                           : "; the epoch and the lost seq range are unknown (unreadable)";
    }
    snprintf(detail, sizeof(detail), "%s: %s; moved to %s%s%s", nm->base, why, nm->q, note,
             wal_lost ? "; only what was checkpointed is counted: the records in the lost WAL "
                        "are not"
                      : "");

    /* Step 1. A leftover N with our pid (pids repeat across boots) is just overwritten. */
    recover__unlink(nm->n);
    recover__unlink(nm->nwal);
    recover__unlink(nm->nshm);
    recover__unlink(nm->njournal);
    struct agent_spool_opts no = *o;
    no.path = nm->n;
    ret = agent_spool_open(&no, &ns, err, errlen);
    if (ret)
        goto fail;
    ret = agent_spool_ledger_add(ns, "corrupt_spool", ri.sv.epoch, first, last, count, detail);
    if (ret) {
        cis_set_err(err, errlen, "%s: cannot write the ledger row of the new spool: %s", nm->n,
                    cis_strerror(ret));
        goto fail;
    }
    *new_epoch = agent_spool_epoch(ns);
    agent_spool_close(ns);
    ns = NULL;
    /* A clean close checkpoints everything into N and removes its -wal: a WAL still there
     * would be left behind by the rename below, and the ledger row with it. */
    if (recover__exists(nm->nwal) != 0) {
        cis_set_err(err, errlen, "%s: its WAL was not checkpointed on close", nm->n);
        ret = CIS_EDB;
        goto fail;
    }
    recover__unlink(nm->nshm);
    if (cis_fsync_path(nm->n, 0) || cis_fsync_path(nm->dir, 1)) {
        cis_set_err(err, errlen, "%s: fsync: %s", nm->n, strerror(errno));
        ret = CIS_EIO;
        goto fail;
    }

    if (!resume) {
        /* Step 2 (or, without hard links, its rename after step 3). */
        int linked = link(path, nm->q) == 0;
        if (!linked && errno == EEXIST) {
            cis_set_err(err, errlen, "%s: %s appeared meanwhile; not overwriting it", path, nm->q);
            ret = CIS_EIO;
            goto fail;
        }
        if (linked && cis_fsync_path(nm->dir, 1)) {
            cis_set_err(err, errlen, "%s: fsync: %s", nm->dir, strerror(errno));
            ret = CIS_EIO;
            goto fail;
        }
        /* Step 3. */
        if (recover__rename_if(nm->wal, nm->qwal) || recover__rename_if(nm->shm, nm->qshm)) {
            cis_set_err(err, errlen, "%s: cannot move its -wal/-shm aside to %s: %s", path, nm->q,
                        strerror(errno));
            ret = CIS_EIO;
            goto fail;
        }
        if (!linked && rename(path, nm->q) != 0) {
            cis_set_err(err, errlen, "%s: cannot move it aside to %s: %s", path, nm->q,
                        strerror(errno));
            ret = CIS_EIO;
            goto fail;
        }
    }
    /* Step 4. */
    if (rename(nm->n, path) != 0) {
        cis_set_err(err, errlen, "%s: cannot put the new spool %s in place: %s", path, nm->n,
                    strerror(errno));
        ret = CIS_EIO;
        goto fail;
    }
    /* Step 5. */
    if (cis_fsync_path(nm->dir, 1))
        cis_warn("[spool] fsync %s: %s (the quarantine may not survive a power cut; it resumes "
                 "at the next start if so)",
                 nm->dir, strerror(errno));
    cis_error("[spool] %s was corrupt (%s); moved aside to %s; started a new spool (epoch %llu); "
              "the loss is recorded in the ledger",
              path, why, nm->q, (unsigned long long)*new_epoch);
    return CIS_OK;

fail:
    /* The old files are still at PATH (or at Q with PATH as a second name, which the next start
     * resumes); only N goes. */
    agent_spool_close(ns);
    recover__unlink(nm->n);
    recover__unlink(nm->nwal);
    recover__unlink(nm->nshm);
    recover__unlink(nm->njournal);
    return ret == CIS_ECORRUPT ? CIS_EDB : ret;
}

/* agent_spool_open() of the (new) spool at O->path, never returning CIS_ECORRUPT. */
static int recover__open(const struct agent_spool_opts *o, struct agent_spool **out, char *err,
                         size_t errlen)
{
    int ret = agent_spool_open(o, out, err, errlen);
    return ret == CIS_ECORRUPT ? CIS_EDB : ret;
}

int agent_spool_open_checked(const struct agent_spool_opts *o, struct agent_spool **out,
                             int *recovered, char *err, size_t errlen)
{
    struct recover_names *nm = NULL;
    struct agent_spool_opts ro;
    char *real = NULL;
    char why[RECOVER_WHY_LEN] = "";
    char err2[RECOVER_WHY_LEN];
    struct stat sb;
    int corrupt = 0, wal_lost = 0, resume = 0;
    uint64_t new_epoch = 0;
    int ret;

    if (recovered)
        *recovered = 0;
    if (out)
        *out = NULL;
    if (!o || !o->path || !o->path[0] || !out)
        return agent_spool_open(o, out, err, errlen); /* its CIS_EINVAL and message */
    nm = calloc(1, sizeof(*nm));
    real = recover__resolve(o->path);
    if (!nm || !real) {
        cis_set_err(err, errlen, "%s: out of memory", o->path);
        ret = CIS_ENOMEM;
        goto out;
    }
    ro = *o;
    ro.path = real;
    if (recover__names_init(nm, real) != 0) {
        cis_set_err(err, errlen, "%s: path too long", real);
        ret = CIS_EINVAL;
        goto out;
    }
    recover__sweep(nm);

    if (lstat(real, &sb) != 0 || !S_ISREG(sb.st_mode)) {
        /* Missing: a new spool. Anything else (a directory, a symlink, no permission) is not
         * ours to move: agent_spool_open() says what is wrong with it. */
        ret = recover__open(o, out, err, errlen);
        goto out;
    }
    int has_wal = recover__exists(nm->wal) == 1;
    int has_shm = recover__exists(nm->shm) == 1;
    int wal_checked = 0; /* recover__wal_lost() found the WAL intact */

    if (recover__find_interrupted(nm, &sb)) {
        resume = 1;
        snprintf(why, sizeof(why), "an earlier quarantine to %s was interrupted", nm->q);
    } else if (sb.st_size == 0) {
        if (has_wal || has_shm) {
            /* SQLite would take the empty file for a new database and ignore the WAL. */
            snprintf(why, sizeof(why), "zero-byte database beside a %s",
                     has_wal ? "WAL" : "-shm file");
            corrupt = 1;
        } else {
            /* SQLite creates the file empty and writes the schema in the first transaction: a
             * crash in between leaves this, and it never held a record. */
            cis_warn("[spool] %s is empty (a spool that never got its schema); starting a new one",
                     real);
            if (unlink(real) != 0 && errno != ENOENT) {
                cis_set_err(err, errlen, "%s: cannot remove the empty file: %s", real,
                            strerror(errno));
                ret = CIS_EIO;
                goto out;
            }
        }
    } else if (has_shm && !has_wal) {
        /* SQLite would open the file alone, without a word, as if those commits never were. */
        snprintf(why, sizeof(why),
                 "WAL deleted: records committed since the last checkpoint are lost");
        corrupt = 1;
        wal_lost = 1;
    } else if (recover__wal_lost(real, nm, has_wal, has_shm, why, sizeof(why), &wal_checked)) {
        /* As above: SQLite would go on without the lost commits, and hand their seqs out again. */
        corrupt = 1;
        wal_lost = 1;
    } else {
        /* recover__wal_lost() reads the open mark from the database; a damaged file may not
         * give it. A WAL that is itself damaged lost its commits whatever the mark says, and
         * the ledger entry must not claim to count them (chaos c6: a truncated database beside
         * a -wal of random bytes). Looked at before quick_check, whose SQLite connection would
         * reset a WAL with a bad header. Not twice: recover__wal_lost() may have found it
         * intact already. */
        char walwhy[RECOVER_WHY_LEN];
        int wal_bad =
            has_wal && !wal_checked &&
            recover__wal_damaged(nm->wal, has_shm ? nm->shm : NULL, walwhy, sizeof(walwhy));
        corrupt = recover__quick_check(real, why, sizeof(why));
        if (corrupt && !recover__wal_has_frames(nm->wal))
            recover__explain_truncation(real, sb.st_size, why, sizeof(why));
        if (corrupt && wal_bad) {
            size_t n = strlen(why);
            snprintf(why + n, sizeof(why) - n, "; %s", walwhy);
            wal_lost = 1;
        }
    }

    if (!corrupt && !resume) {
        ret = agent_spool_open(o, out, err2, sizeof(err2));
        if (ret != CIS_ECORRUPT) {
            if (ret)
                cis_set_err(err, errlen, "%s", err2);
            goto out;
        }
        /* Passed quick_check, yet its content is not a consistent spool. Its message starts
         * with the path: drop that, the detail names the file already. */
        size_t plen = strlen(o->path);
        const char *msg = strncmp(err2, o->path, plen) == 0 && err2[plen] == ':'
                              ? err2 + plen + 1 + (err2[plen + 1] == ' ')
                              : err2;
        snprintf(why, sizeof(why), "inconsistent: %s", msg);
        corrupt = 1;
    }

    recover__one_line(why);
    ret = recover__quarantine(&ro, nm, why, NULL, wal_lost, resume, &new_epoch, err, errlen);
    if (ret)
        goto out;
    if (recovered)
        *recovered = 1;
    ret = recover__open(o, out, err, errlen);

out:
    free(real);
    free(nm);
    return ret;
}

int agent_spool_recover(struct agent_spool **sp, const struct agent_spool_opts *o, const char *why,
                        char *err, size_t errlen)
{
    struct recover_info known;
    struct agent_spool_stats st;
    struct agent_spool_opts ro;
    struct recover_names *nm = NULL;
    char *real = NULL;
    uint64_t new_epoch = 0;
    char whybuf[RECOVER_WHY_LEN];
    int ret;

    if (!sp || !*sp || !o || !o->path || !o->path[0]) {
        cis_set_err(err, errlen, "spool: recover needs an open spool and its options");
        if (sp) {
            agent_spool_close(*sp);
            *sp = NULL;
        }
        return CIS_EINVAL;
    }
    /* What the spool knew, taken before the close: the fallback if the file cannot be read.
     * Its lowest pending seq is 0 both for "none" and "unknown"; the counters tell which. */
    memset(&known, 0, sizeof(known));
    agent_spool_salvage_info(*sp, &known.sv);
    agent_spool_stats(*sp, &st);
    known.have_min = known.sv.min_pending_seq != 0 || st.pending_segments == 0;
    agent_spool_close(*sp);
    *sp = NULL;

    nm = calloc(1, sizeof(*nm));
    real = recover__resolve(o->path);
    if (!nm || !real) {
        cis_set_err(err, errlen, "%s: out of memory", o->path);
        ret = CIS_ENOMEM;
        goto out;
    }
    ro = *o;
    ro.path = real;
    if (recover__names_init(nm, real) != 0) {
        cis_set_err(err, errlen, "%s: path too long", real);
        ret = CIS_EINVAL;
        goto out;
    }
    snprintf(whybuf, sizeof(whybuf), "%s", why && why[0] ? why : "corrupt at run time");
    recover__one_line(whybuf);
    ret = recover__quarantine(&ro, nm, whybuf, &known, 0, 0, &new_epoch, err, errlen);
    if (ret)
        goto out;
    ret = recover__open(o, sp, err, errlen);

out:
    free(real);
    free(nm);
    return ret;
}
