/* The agent's SQLite segment spool: schema, group commit, claim/ack/release/reject, TTL, the
 * size and WAL bounds, sealing, and the loss ledger.
 *
 * Durability model:
 * - Records enter only through agent_spool_commit(): one BEGIN IMMEDIATE ... COMMIT that inserts
 *   one segment row per (priority, ttl) group AND advances meta.next_seq. Because both happen in
 *   the same transaction, a crash can never leave stored records whose seqs a later commit
 *   reuses, nor skip-and-reuse a range. Sources are told "accepted" only after this returns 0.
 * - A segment leaves the spool only in a transaction that also accounts for it: ack (the
 *   receiver committed it), or reject / eviction / TTL expiry / failed authentication, each of
 *   which writes its loss-ledger row in the same transaction as the delete, so no drop is ever
 *   unaccounted for.
 * - In-flight state lives IN MEMORY only (a small set of first_seqs), never in the database:
 *   claim and release cost zero writes (flash wear), and after a restart every stored segment is
 *   pending again, which is exactly the "in-flight back to pending at start-up" rule.
 * - Counters for stats are computed once at open and then maintained from what each write
 *   transaction changed, applied only after its COMMIT returned, so stats never touch the disk
 *   and never count what was rolled back.
 *
 * TTL clock: segments' created_ms and expires_ms, and the expiry checks, use the spool's own
 * clock: the wall clock at open, advanced by the monotonic clock (spool__now()). A wall clock
 * that jumps while the agent runs (NTP setting a Pi that booted at 1970, or a clock set back)
 * neither expires records early nor keeps them late. Stamps made while the wall clock was
 * unset (before SPOOL_CLOCK_FLOOR_MS, a Pi without an RTC before NTP) get their TTL counted
 * again from the first open with a set clock (spool__clock_rebase()), so the jump from 1970 to
 * now between two runs does not expire them either. Downtime between runs counts, by the wall
 * clock of the next start.
 *
 * Size model (opts.max_size bounds the database file plus its WAL):
 * - The WAL is checkpointed with TRUNCATE after any transaction that takes it past a small
 *   threshold (wal_ckpt), without waiting on readers, and at once given back wal_keep frames of
 *   disk (1.25 x wal_ckpt, zero-filled: SQLite reads a WAL only as far as its frames are valid),
 *   so at rest the WAL file is wal_keep frames. That space is the spool's room on a full disk:
 *   every transaction up to wal_keep - wal_ckpt after the last checkpoint fits into blocks the
 *   WAL already holds, so the spool can still delete what the receiver acknowledged and reuse
 *   its own free pages (a WAL truncated to zero would need new blocks even for a delete).
 * - A commit that grows the database reserves the file's new size before it commits: on a full
 *   disk it fails there, cleanly, instead of committing into the WAL pages that the checkpoint
 *   could then not copy into the file (the WAL could never be rewritten, and every later
 *   transaction, deletes included, would need more disk).
 * - Both reservations allocate blocks without writing them (posix_fallocate on a descriptor of
 *   our own, spool__fallocate()). SQLite's SQLITE_FCNTL_SIZE_HINT, as Debian builds it (no
 *   HAVE_POSIX_FALLOCATE), writes one byte into every 4 KiB block instead: each such write
 *   dirties a whole page, so reserving cost as many bytes written to flash as it reserved
 *   (20 MiB per checkpoint for the default WAL room, and once more the database's growth).
 * - The database may use db_budget pages' worth of bytes: max_size less half the checkpoint
 *   threshold and a margin for one commit. The file then sits between db_budget - one commit and
 *   db_budget, the WAL adds wal_keep at rest (up to wal_ckpt + one commit for a moment), and the
 *   sum stays within a few percent either side of max_size.
 * - Usage is counted in pages (page_count - freelist_count) inside the write transaction, which
 *   is exact and cheap (both are in page 1). Pages freed by acks and evictions go to the freelist
 *   and are reused, so a full spool's file does not grow.
 */
#include "spool.h"

#include <errno.h>
#include <fcntl.h>
#include <libgen.h>
#include <pthread.h>
#include <sqlite3.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <unistd.h>
#if defined(__aarch64__) && defined(__linux__)
#include <sys/auxv.h> /* getauxval: the CPU's CRC32 instructions (spool__crc_hw_ok()) */
#endif

#include "cistern/backoff.h"
#include "cistern/err.h"
#include "cistern/log.h"
#include "seal.h"

#define SPOOL_BUSY_TIMEOUT_MS 5000
/* How long a commit may wait for readers when the WAL is at its cap (see spool__wal_room()). */
#define SPOOL_CKPT_GRACE_MS 200
#define SPOOL_WAL_MAX_DEFAULT (64ULL * 1024 * 1024)
/* Checkpoint threshold floor (see spool__limits()). */
#define SPOOL_CKPT_FLOOR (32ULL * 1024)
/* Smallest segment cap (see spool__limits()). */
#define SPOOL_SEG_FLOOR (8ULL * 1024)
#define SPOOL_CKPT_UNBOUNDED (4ULL * 1024 * 1024) /* ~ SQLite's default wal_autocheckpoint */
/* Pages given back by one incremental vacuum step (bounded work after a transaction). */
#define SPOOL_VACUUM_STEP 256
#define SPOOL_WAL_HDR 32
#define SPOOL_WAL_FRAME_HDR 24
/* A wall clock before this (2024-01-01T00:00:00Z) is taken as unset (see the top of the file). */
#define SPOOL_CLOCK_FLOOR_MS 1704067200000LL
/* The database file grows by this many pages at a time (SQLITE_FCNTL_CHUNK_SIZE). */
#define SPOOL_CHUNK_PAGES 16

static const char spool_detail_evicted[] = "spool.max_size reached (when_full: drop_oldest)";
static const char spool_detail_expired[] = "record TTL passed before delivery";
static const char spool_detail_tampered[] = "segment failed authentication (AES-GCM)";
static const char spool_detail_checksum[] =
    "segment failed its checksum: the spool file was damaged (e.g. the storage)";

enum {
    ST_BEGIN,
    ST_COMMIT,
    ST_ROLLBACK,
    ST_SEG_INSERT,
    ST_SET_NEXT_SEQ,
    ST_CLAIM_SCAN,
    ST_CLAIM_SCAN_NEWEST,
    ST_SEG_DATA,
    ST_SEG_INFO,
    ST_SEG_DELETE,
    ST_OLDEST,
    ST_EVICT_NEXT,
    ST_EXPIRE_DUE,
    ST_LEDGER_INSERT,
    ST_LEDGER_LAST,
    ST_LEDGER_EXTEND,
    ST_LEDGER_UNSENT,
    ST_LEDGER_MARK,
    ST_PAGE_COUNT,
    ST_FREELIST_COUNT,
    ST_COUNT
};

static const char *const spool_sql[ST_COUNT] = {
    [ST_BEGIN] = "BEGIN IMMEDIATE",
    [ST_COMMIT] = "COMMIT",
    [ST_ROLLBACK] = "ROLLBACK",
    [ST_SEG_INSERT] = "INSERT INTO segments(first_seq, last_seq, priority, record_count, "
                      "compression, raw_size, created_ms, data, expires_ms, sealed, crc) "
                      "VALUES(?,?,?,?,?,?,?,?,?,?,?)",
    [ST_SET_NEXT_SEQ] = "UPDATE meta SET value = ? WHERE key = 'next_seq'",
    /* Only columns stored before the blob, and length(data), which does not load it: in-flight
     * rows are skipped cheaply. expires_ms and sealed are stored after the blob (version 1
     * spools gained them with ALTER TABLE ... ADD COLUMN), so reading them walks the blob's
     * overflow chain: ST_SEG_DATA reads them together with the blob of a taken segment. Uses
     * index segments_prio. */
    [ST_CLAIM_SCAN] = "SELECT first_seq, last_seq, priority, record_count, compression, raw_size, "
                      "created_ms, length(data) FROM segments ORDER BY priority, first_seq",
    [ST_CLAIM_SCAN_NEWEST] = "SELECT first_seq, last_seq, priority, record_count, compression, "
                             "raw_size, created_ms, length(data) FROM segments "
                             "ORDER BY priority, first_seq DESC",
    [ST_SEG_DATA] = "SELECT data, expires_ms, sealed, crc FROM segments WHERE first_seq = ?",
    [ST_SEG_INFO] = "SELECT last_seq, record_count, priority, length(data) FROM segments "
                    "WHERE first_seq = ?",
    [ST_SEG_DELETE] = "DELETE FROM segments WHERE first_seq = ?",
    [ST_OLDEST] = "SELECT first_seq, created_ms FROM segments ORDER BY first_seq LIMIT 1",
    /* One class at a time, so the lookup is an index seek on segments_prio; the caller steps
     * past in-flight segments by raising the lower bound. */
    [ST_EVICT_NEXT] = "SELECT first_seq FROM segments WHERE priority = ? AND first_seq > ? "
                      "ORDER BY first_seq LIMIT 1",
    /* INDEXED BY: a full scan would read expires_ms behind every blob. */
    [ST_EXPIRE_DUE] = "SELECT first_seq FROM segments INDEXED BY segments_expires "
                      "WHERE expires_ms > 0 AND expires_ms <= ?",
    [ST_LEDGER_INSERT] = "INSERT INTO ledger(reason, epoch, first_seq, last_seq, count, ts_ms, "
                         "detail) VALUES(?,?,?,?,?,?,?)",
    [ST_LEDGER_LAST] = "SELECT id, reason, epoch, last_seq, sent FROM ledger "
                       "ORDER BY id DESC LIMIT 1",
    [ST_LEDGER_EXTEND] = "UPDATE ledger SET last_seq = ?, count = count + ?, ts_ms = ? "
                         "WHERE id = ?",
    [ST_LEDGER_UNSENT] = "SELECT id, reason, epoch, first_seq, last_seq, count, ts_ms, detail "
                         "FROM ledger WHERE sent = 0 ORDER BY id LIMIT ?",
    [ST_LEDGER_MARK] = "UPDATE ledger SET sent = 1 WHERE id = ? AND sent = 0",
    [ST_PAGE_COUNT] = "PRAGMA page_count",
    [ST_FREELIST_COUNT] = "PRAGMA freelist_count",
};

/* Version 3. The segment columns after data came with versions 2 and 3, so that a file
 * upgraded with ALTER TABLE ... ADD COLUMN and a new file have the same layout. crc: see
 * spool__seg_crc() (0: a segment stored before version 3, not checked). */
static const char spool_schema_sql[] =
    "CREATE TABLE meta(key TEXT PRIMARY KEY, value INTEGER NOT NULL);"
    "CREATE TABLE segments(first_seq INTEGER PRIMARY KEY, last_seq INTEGER NOT NULL,"
    " priority INTEGER NOT NULL, record_count INTEGER NOT NULL, compression INTEGER NOT NULL,"
    " raw_size INTEGER NOT NULL, created_ms INTEGER NOT NULL, data BLOB NOT NULL,"
    " expires_ms INTEGER NOT NULL DEFAULT 0, sealed INTEGER NOT NULL DEFAULT 0,"
    " crc INTEGER NOT NULL DEFAULT 0);"
    "CREATE INDEX segments_prio ON segments(priority, first_seq);"
    "CREATE INDEX segments_expires ON segments(expires_ms) WHERE expires_ms > 0;"
    "CREATE TABLE ledger(id INTEGER PRIMARY KEY, reason TEXT NOT NULL, epoch INTEGER NOT NULL,"
    " first_seq INTEGER NOT NULL, last_seq INTEGER NOT NULL, count INTEGER NOT NULL,"
    " ts_ms INTEGER NOT NULL, detail TEXT, sent INTEGER NOT NULL DEFAULT 0);"
    "CREATE INDEX ledger_unsent ON ledger(id) WHERE sent = 0;";

/* Version 1 -> 2, run inside the open transaction. */
static const char spool_upgrade_v2_sql[] =
    "ALTER TABLE segments ADD COLUMN expires_ms INTEGER NOT NULL DEFAULT 0;"
    "ALTER TABLE segments ADD COLUMN sealed INTEGER NOT NULL DEFAULT 0;"
    "CREATE INDEX segments_expires ON segments(expires_ms) WHERE expires_ms > 0;"
    "CREATE INDEX ledger_unsent ON ledger(id) WHERE sent = 0;"
    "UPDATE meta SET value = 2 WHERE key = 'schema_version';";

/* Version 2 -> 3, run inside the open transaction (after the step above for a version-1 file). */
static const char spool_upgrade_v3_sql[] =
    "ALTER TABLE segments ADD COLUMN crc INTEGER NOT NULL DEFAULT 0;"
    "UPDATE meta SET value = 3 WHERE key = 'schema_version';";

struct agent_spool {
    sqlite3 *db;
    char *path;
    /* Our own descriptor of the database file, for spool__fallocate() (-1: none, SQLite's size
     * hint instead). Closed only after the connection: closing any descriptor of a file drops
     * the process's POSIX locks on it, SQLite's included. */
    int db_fd;
    char *wal_path; /* the -wal file's name, as SQLite made it */
    sqlite3_stmt *st[ST_COUNT];
    uint64_t epoch;
    uint64_t next_seq;
    struct cis_seg_encoder *enc; /* kept across commits: its zstd context and buffers */
    const struct agent_seal *seal; /* borrowed */
    /* In-flight first_seqs: memory only (see the top of the file). Small: the forwarder's
     * window. */
    uint64_t *inflight;
    size_t ninflight, capinflight;
    /* Counters, maintained in memory. */
    struct agent_spool_class_stats cls[CIS_PRIO_COUNT];
    uint64_t ledger_unsent;
    uint64_t evicted_records, expired_records, tampered_records;
    int64_t oldest_created_ms;
    uint64_t min_first_seq; /* lowest stored first_seq; 0: none */
    /* Ledger rows with an id up to this one may be in a batch the forwarder is sending: they are
     * never extended by coalescing (the receiver would get the old range, and the row would then
     * be marked sent with the new one). */
    uint64_t ledger_handed_id;
    int last_err; /* last error logged, so a repeating failure is logged once */
    /* Size bound (see the top of the file); bytes, 0 / UINT64_MAX when unbounded. */
    uint64_t max_size, db_budget_pages, wal_cap, wal_ckpt, wal_max;
    uint64_t seg_max; /* records of a group beyond this many bytes start another segment */
    uint64_t seg_max_records; /* and beyond this many records; UINT64_MAX: no bound */
    int reject_new;
    int incremental; /* auto_vacuum = INCREMENTAL: the file can be shrunk */
    uint32_t page_size;
    uint64_t page_count, freelist_count; /* after the last transaction */
    /* WAL frames: wal_frames as the wal hook last reported (frames since the WAL was reset);
     * wal_hwm the most the file holds until it is truncated (a restarted WAL reuses the file, and
     * after a truncation it holds wal_keep frames of reserved space). */
    uint64_t wal_frames, wal_hwm, wal_keep;
    /* The TTL clock's origin: the wall and monotonic clocks at open (see spool__now()). */
    int64_t clock_wall0, clock_mono0;
    /* State-change logging. */
    int full;     /* the last commit failed with CIS_EFULL */
    int evicting; /* in a run of commits that evict */
    uint64_t run_segs, run_recs;
    int ckpt_blocked; /* the last checkpoint was blocked (SQLITE_BUSY) */
    int ckpt_err;     /* the last checkpoint failed otherwise (logged once) */
    int wal_capped;   /* a commit failed with CIS_EAGAIN at the WAL cap */
    /* synchronous=FULL; else NORMAL, where wal_unsynced says a commit since the last WAL sync
     * (or complete checkpoint) could still be undone by a power cut (see spool__durable()). */
    int sync_full;
    int wal_unsynced;
    int wal_sync_err; /* the last WAL sync failed (logged once) */
    int reserve_err;  /* errno of the last failed reservation for the database (logged once) */
};

/* What one transaction changed; applied to the counters only after its COMMIT returned. */
struct spool_delta {
    int64_t recs[CIS_PRIO_COUNT], segs[CIS_PRIO_COUNT], bytes[CIS_PRIO_COUNT];
    uint64_t ledger_rows; /* rows inserted (a coalesced row is not a new one) */
    uint64_t drop_segs, drop_recs;
};

/* ---- helpers ---- */

/* Map a failed SQLite result code to a CIS_E* code (never CIS_OK: a "success" code met where a
 * row or completion was expected is a database error too). SQLITE_FULL is the device (or
 * max_page_count) being full, not our max_size: CIS_ENOSPC. */
static int spool__map(int rc)
{
    switch (rc & 0xff) {
    case SQLITE_FULL:
        return CIS_ENOSPC;
    case SQLITE_CORRUPT:
    case SQLITE_NOTADB:
        return CIS_ECORRUPT;
    case SQLITE_NOMEM:
        return CIS_ENOMEM;
    case SQLITE_TOOBIG:
        return CIS_ETOOBIG;
    default:
        return CIS_EDB;
    }
}

/* Log a database failure (once per distinct error in a row) and return its CIS_E* code.
 * Call before ROLLBACK, which would overwrite the connection's error message. */
static int spool__fail(struct agent_spool *s, const char *what, int rc)
{
    int code = spool__map(rc);
    /* A code the connection did not set (spool__commit_tx()'s reservation) has no message
     * there: SQLite's text for the code itself. */
    int ext = sqlite3_extended_errcode(s->db);
    const char *msg = (ext & 0xff) == (rc & 0xff) ? sqlite3_errmsg(s->db) : sqlite3_errstr(rc);
    if ((ext & 0xff) != (rc & 0xff))
        ext = rc;
    if (code != s->last_err)
        cis_error("[spool] %s: %s (sqlite %d)", what, msg, ext);
    else
        cis_debug("[spool] %s: %s (again)", what, msg);
    s->last_err = code;
    return code;
}

/* Step a statement that returns no rows, then reset it. Returns a SQLite code (SQLITE_OK on
 * success). */
static int spool__exec(sqlite3_stmt *st)
{
    int rc = sqlite3_step(st);
    sqlite3_reset(st);
    return rc == SQLITE_DONE || rc == SQLITE_ROW ? SQLITE_OK : rc;
}

/* Step a statement that returns one integer (a pragma). */
static int spool__int(sqlite3_stmt *st, uint64_t *out)
{
    int rc = sqlite3_step(st);
    if (rc == SQLITE_ROW) {
        int64_t v = sqlite3_column_int64(st, 0);
        *out = v > 0 ? (uint64_t)v : 0;
        rc = SQLITE_OK;
    } else if (rc == SQLITE_DONE) {
        rc = SQLITE_CORRUPT;
    }
    sqlite3_reset(st);
    return rc;
}

/* CRC-32C (Castagnoli), reflected, as the segments' crc column has always held it. Three ways to
 * the same value: the CPU's instruction (x86-64 with SSE4.2, arm64 with the CRC32 extension: Pi
 * 3/4/5), picked at run time, or tables, eight bytes a step (slicing-by-8) elsewhere (armhf, an
 * older x86). Chosen and built once. */
static uint32_t spool_crc_tab[8][256];
static uint32_t (*spool_crc_fn)(uint32_t, const uint8_t *, size_t);
static pthread_once_t spool_crc_once = PTHREAD_ONCE_INIT;

/* The tables; CRC is the register (inverted by the caller). */
static uint32_t spool__crc_sw(uint32_t crc, const uint8_t *p, size_t n)
{
    for (; n && ((uintptr_t)p & 7); n--)
        crc = spool_crc_tab[0][(crc ^ *p++) & 0xff] ^ (crc >> 8);
    for (; n >= 8; n -= 8, p += 8) {
        uint32_t lo = crc ^ ((uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 |
                             (uint32_t)p[3] << 24);
        crc = spool_crc_tab[7][lo & 0xff] ^ spool_crc_tab[6][(lo >> 8) & 0xff] ^
              spool_crc_tab[5][(lo >> 16) & 0xff] ^ spool_crc_tab[4][lo >> 24] ^
              spool_crc_tab[3][p[4]] ^ spool_crc_tab[2][p[5]] ^ spool_crc_tab[1][p[6]] ^
              spool_crc_tab[0][p[7]];
    }
    while (n--)
        crc = spool_crc_tab[0][(crc ^ *p++) & 0xff] ^ (crc >> 8);
    return crc;
}

#if defined(__x86_64__) && defined(__GNUC__)
#define SPOOL_CRC_HW 1
__attribute__((target("sse4.2"))) static uint32_t spool__crc_hw(uint32_t crc, const uint8_t *p,
                                                                size_t n)
{
    for (; n && ((uintptr_t)p & 7); n--)
        crc = __builtin_ia32_crc32qi(crc, *p++);
    uint64_t c = crc;
    for (; n >= 8; n -= 8, p += 8) {
        uint64_t v;
        memcpy(&v, p, 8);
        c = __builtin_ia32_crc32di(c, v);
    }
    crc = (uint32_t)c;
    while (n--)
        crc = __builtin_ia32_crc32qi(crc, *p++);
    return crc;
}

static int spool__crc_hw_ok(void)
{
    __builtin_cpu_init();
    return __builtin_cpu_supports("sse4.2");
}
#elif defined(__aarch64__) && defined(__GNUC__) && defined(__linux__)
#define SPOOL_CRC_HW 1
#ifndef HWCAP_CRC32
#define HWCAP_CRC32 (1 << 7)
#endif
__attribute__((target("+crc"))) static uint32_t spool__crc_hw(uint32_t crc, const uint8_t *p,
                                                              size_t n)
{
    for (; n && ((uintptr_t)p & 7); n--)
        crc = __builtin_aarch64_crc32cb(crc, *p++);
    for (; n >= 8; n -= 8, p += 8) {
        uint64_t v;
        memcpy(&v, p, 8);
        crc = __builtin_aarch64_crc32cx(crc, v);
    }
    while (n--)
        crc = __builtin_aarch64_crc32cb(crc, *p++);
    return crc;
}

static int spool__crc_hw_ok(void)
{
    return (getauxval(AT_HWCAP) & HWCAP_CRC32) != 0;
}
#endif

static void spool__crc_init(void)
{
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++)
            c = c & 1 ? (c >> 1) ^ 0x82F63B78u : c >> 1;
        spool_crc_tab[0][i] = c;
    }
    for (uint32_t i = 0; i < 256; i++)
        for (int t = 1; t < 8; t++)
            spool_crc_tab[t][i] =
                spool_crc_tab[0][spool_crc_tab[t - 1][i] & 0xff] ^ (spool_crc_tab[t - 1][i] >> 8);
    spool_crc_fn = spool__crc_sw;
#ifdef SPOOL_CRC_HW
    if (spool__crc_hw_ok())
        spool_crc_fn = spool__crc_hw;
#endif
}

uint32_t agent_spool_crc32c(uint32_t crc, const void *p, size_t n, int portable)
{
    pthread_once(&spool_crc_once, spool__crc_init);
    return ~(portable ? spool__crc_sw : spool_crc_fn)(~crc, p, n);
}

/* A segment row's checksum: CRC-32C over its fields and its stored blob, with bit 32 set (0 in
 * the column: a row stored before schema version 3). SQLite checks its own structure
 * (quick_check at start, SQLITE_CORRUPT at run time), not the bytes inside a row: without this,
 * a damaged blob or seq range would be sent as it is, and the receiver would refuse it (or, in
 * an uncompressed segment, store damaged payloads as if they were the records). */
static int64_t spool__seg_crc(uint64_t first, uint64_t last, int64_t prio, int64_t count,
                              int64_t compression, int64_t raw_size, const uint8_t *blob,
                              size_t len)
{
    const uint64_t f[6] = {first, last, (uint64_t)prio, (uint64_t)count, (uint64_t)compression,
                           (uint64_t)raw_size};
    uint8_t h[sizeof(f)];
    for (size_t i = 0; i < 6; i++)
        for (size_t b = 0; b < 8; b++)
            h[i * 8 + b] = (uint8_t)(f[i] >> (8 * b));
    uint32_t c = agent_spool_crc32c(0, h, sizeof(h), 0);
    if (len)
        c = agent_spool_crc32c(c, blob, len, 0);
    return (int64_t)((uint64_t)c | (1ULL << 32));
}

/* The spool's TTL clock, in wall-clock milliseconds that never jump (see the top of the file). */
static int64_t spool__now(const struct agent_spool *s)
{
    return s->clock_wall0 + (cis_mono_ms() - s->clock_mono0);
}

static int spool__begin(struct agent_spool *s)
{
    /* IMMEDIATE takes the write lock up front, so a concurrent reader cannot turn a later write
     * into SQLITE_BUSY mid-transaction (busy_timeout covers the wait for the lock). */
    return spool__exec(s->st[ST_BEGIN]);
}

static void spool__rollback(struct agent_spool *s)
{
    /* On SQLITE_FULL/IOERR/NOMEM SQLite may already have rolled back by itself. */
    if (!sqlite3_get_autocommit(s->db))
        spool__exec(s->st[ST_ROLLBACK]);
}

static size_t spool__inflight_find(const struct agent_spool *s, uint64_t seq)
{
    for (size_t i = 0; i < s->ninflight; i++)
        if (s->inflight[i] == seq)
            return i;
    return SIZE_MAX;
}

static void spool__inflight_remove(struct agent_spool *s, uint64_t seq)
{
    size_t i = spool__inflight_find(s, seq);
    if (i == SIZE_MAX)
        return;
    s->inflight[i] = s->inflight[--s->ninflight];
}

static int spool__inflight_reserve(struct agent_spool *s, size_t extra)
{
    if (s->ninflight + extra <= s->capinflight)
        return CIS_OK;
    size_t cap = s->capinflight ? s->capinflight : 16;
    while (cap < s->ninflight + extra)
        cap *= 2;
    uint64_t *p = realloc(s->inflight, cap * sizeof(*p));
    if (!p)
        return CIS_ENOMEM;
    s->inflight = p;
    s->capinflight = cap;
    return CIS_OK;
}

static uint64_t spool__total_segments(const struct agent_spool *s)
{
    uint64_t n = 0;
    for (int c = 0; c < CIS_PRIO_COUNT; c++)
        n += s->cls[c].segments;
    return n;
}

static uint64_t spool__sub(uint64_t a, int64_t d)
{
    /* Apply a signed delta without wrapping below zero (counters are never negative). */
    if (d >= 0)
        return a + (uint64_t)d;
    return a >= (uint64_t)(-d) ? a - (uint64_t)(-d) : 0;
}

static void spool__apply(struct agent_spool *s, const struct spool_delta *d)
{
    for (int c = 0; c < CIS_PRIO_COUNT; c++) {
        s->cls[c].records = spool__sub(s->cls[c].records, d->recs[c]);
        s->cls[c].segments = spool__sub(s->cls[c].segments, d->segs[c]);
        s->cls[c].bytes = spool__sub(s->cls[c].bytes, d->bytes[c]);
    }
    s->ledger_unsent += d->ledger_rows;
}

/* Read one meta value inside the open transaction. Returns a SQLite code; SQLITE_NOTFOUND if the
 * key is missing. */
static int spool__meta_get(sqlite3 *db, const char *key, int64_t *val)
{
    sqlite3_stmt *st = NULL;
    int rc = sqlite3_prepare_v2(db, "SELECT value FROM meta WHERE key = ?", -1, &st, NULL);
    if (rc != SQLITE_OK)
        return rc;
    sqlite3_bind_text(st, 1, key, -1, SQLITE_STATIC);
    rc = sqlite3_step(st);
    if (rc == SQLITE_ROW) {
        *val = sqlite3_column_int64(st, 0);
        rc = SQLITE_OK;
    } else if (rc == SQLITE_DONE) {
        rc = SQLITE_NOTFOUND;
    }
    sqlite3_finalize(st);
    return rc;
}

/* Insert or replace one meta value inside the open transaction. Returns a SQLite code. */
static int spool__meta_put(sqlite3 *db, const char *key, int64_t val)
{
    sqlite3_stmt *st = NULL;
    int rc = sqlite3_prepare_v2(db, "INSERT OR REPLACE INTO meta(key, value) VALUES(?, ?)", -1, &st,
                                NULL);
    if (rc != SQLITE_OK)
        return rc;
    sqlite3_bind_text(st, 1, key, -1, SQLITE_STATIC);
    sqlite3_bind_int64(st, 2, val);
    rc = sqlite3_step(st);
    sqlite3_finalize(st);
    return rc == SQLITE_DONE ? SQLITE_OK : rc;
}

/* A random non-zero 63-bit epoch (top bit clear: a positive SQLite INTEGER). */
static int spool__random_epoch(uint64_t *out)
{
    uint64_t v = 0;
    do {
        if (cis_random_bytes(&v, sizeof(v)) != CIS_OK)
            return CIS_EIO;
        v &= (uint64_t)INT64_MAX;
    } while (v == 0);
    *out = v;
    return CIS_OK;
}

static int spool__pragma(struct agent_spool *s, const char *sql, char *err, size_t errlen)
{
    int rc = sqlite3_exec(s->db, sql, NULL, NULL, NULL);
    if (rc != SQLITE_OK)
        cis_set_err(err, errlen, "%s: %s: %s", s->path, sql, sqlite3_errmsg(s->db));
    return rc;
}

/* ---- WAL and size bound ---- */

static uint64_t spool__frame_bytes(const struct agent_spool *s)
{
    return (uint64_t)s->page_size + SPOOL_WAL_FRAME_HDR;
}

static uint64_t spool__wal_bytes_for(const struct agent_spool *s, uint64_t frames)
{
    return frames ? SPOOL_WAL_HDR + frames * spool__frame_bytes(s) : 0;
}

/* sqlite3_wal_hook: called after each commit with the number of frames in the WAL. Installing it
 * replaces SQLite's own wal_autocheckpoint, which would wait on readers: checkpoints are ours
 * (spool__after_tx()). */
static int spool__wal_hook(void *arg, sqlite3 *db, const char *name, int nframe)
{
    struct agent_spool *s = arg;
    (void)db;
    (void)name;
    s->wal_frames = nframe > 0 ? (uint64_t)nframe : 0;
    if (s->wal_frames > s->wal_hwm)
        s->wal_hwm = s->wal_frames;
    s->wal_unsynced = 1;
    return SQLITE_OK;
}

/* Make the file of FD at least WANT bytes long, its new blocks allocated but not written
 * (posix_fallocate: on ext4, f2fs, btrfs, xfs and tmpfs unwritten extents that read as zeros;
 * where the filesystem cannot, glibc writes a byte per block, as SQLite's size hint would). A
 * file already that long is left alone (one fstat). Returns 0 or an errno value (ENOSPC: no
 * room). */
static int spool__fallocate(int fd, uint64_t want)
{
    struct stat st;
    if (fstat(fd, &st) != 0)
        return errno;
    if (st.st_size < 0 || (uint64_t)st.st_size >= want)
        return 0;
    int err;
    do
        err = posix_fallocate(fd, st.st_size, (off_t)(want - (uint64_t)st.st_size));
    while (err == EINTR);
    return err;
}

/* Give the WAL file wal_keep frames of disk again after a checkpoint truncated it (or at open):
 * see the top of the file. The space reads as zeros, which SQLite takes for no frames. Best
 * effort: on a full disk the WAL stays as it is, and the next checkpoint tries again. */
static void spool__wal_reserve(struct agent_spool *s)
{
    sqlite3_file *wal = NULL;
    if (!s->wal_keep || s->wal_hwm >= s->wal_keep ||
        sqlite3_file_control(s->db, "main", SQLITE_FCNTL_JOURNAL_POINTER, &wal) != SQLITE_OK ||
        !wal || !wal->pMethods)
        return;
    /* The truncation first, durably. Else a power cut could keep some of the zeros below and
     * lose the truncation: zeros inside the old, already checkpointed frames, and recovery
     * would replay only the frames before them, older than the pages the database now holds
     * (a corrupt spool; found by chaos scenario 8). SQLite syncs a restarted WAL's header for the
     * same reason. One fdatasync per checkpoint. */
    if (wal->pMethods->xSync(wal, SQLITE_SYNC_NORMAL) != SQLITE_OK)
        return;
    uint64_t want = spool__wal_bytes_for(s, s->wal_keep);
    /* Allocated through a descriptor of our own, opened and closed here: SQLite takes no POSIX
     * lock on the -wal file (its locks are on the database and the -shm), so closing it drops
     * none. Without one, SQLite's size hint (which writes the room: see the top of the file). */
    int fd = s->wal_path ? open(s->wal_path, O_WRONLY | O_CLOEXEC) : -1;
    if (fd >= 0) {
        int err = spool__fallocate(fd, want);
        close(fd);
        if (err == 0)
            s->wal_hwm = s->wal_keep;
        else
            cis_debug("[spool] cannot reserve %llu bytes for the WAL: %s",
                      (unsigned long long)want, strerror(err));
        return;
    }
    int exact = 1; /* no rounding: the file is then exactly wal_keep frames */
    sqlite3_int64 hint = (sqlite3_int64)want;
    wal->pMethods->xFileControl(wal, SQLITE_FCNTL_CHUNK_SIZE, &exact);
    if (wal->pMethods->xFileControl(wal, SQLITE_FCNTL_SIZE_HINT, &hint) == SQLITE_OK)
        s->wal_hwm = s->wal_keep;
}

/* Checkpoint the WAL and truncate it to zero bytes, then reserve wal_keep frames for it again
 * (spool__wal_reserve()), waiting at most WAIT_MS for readers (0: not at all: a `status` reader
 * must never stall the agent). Returns 0, CIS_EAGAIN (a reader or another checkpointer was in the
 * way: retried after the next transaction), or a CIS_E* code. */
static int spool__checkpoint(struct agent_spool *s, int wait_ms)
{
    int nlog = 0, nckpt = 0;
    sqlite3_busy_timeout(s->db, wait_ms);
    int rc = sqlite3_wal_checkpoint_v2(s->db, NULL, SQLITE_CHECKPOINT_TRUNCATE, &nlog, &nckpt);
    sqlite3_busy_timeout(s->db, SPOOL_BUSY_TIMEOUT_MS);
    if (rc == SQLITE_OK) {
        s->wal_frames = 0;
        s->wal_hwm = 0;
        s->wal_unsynced = 0; /* a complete checkpoint synced the WAL, then the database */
        if (s->ckpt_blocked || s->ckpt_err)
            cis_info("[spool] WAL checkpoints work again; the WAL is truncated");
        s->ckpt_blocked = 0;
        s->ckpt_err = 0;
        spool__wal_reserve(s);
        return CIS_OK;
    }
    if ((rc & 0xff) == SQLITE_BUSY || (rc & 0xff) == SQLITE_LOCKED) {
        if (!s->ckpt_blocked)
            cis_info("[spool] WAL checkpoint blocked by a reader (%d of %d frames copied);"
                     " retrying after the next transaction",
                     nckpt, nlog);
        s->ckpt_blocked = 1;
        return CIS_EAGAIN;
    }
    if (!s->ckpt_err)
        cis_warn("[spool] WAL checkpoint failed: %s (sqlite %d); retrying after the next"
                 " transaction",
                 sqlite3_errmsg(s->db), rc);
    s->ckpt_err = 1;
    return spool__map(rc);
}

/* Make every commit so far survive a power cut before anything read from the spool leaves the
 * process. With synchronous=FULL each commit already did. With NORMAL a commit lives only in the
 * WAL until the WAL is synced (at a checkpoint): were a segment sent before that, a power cut
 * could take back its commit, next_seq with it, and the next commit would hand the same seqs to
 * other records, which the receiver would then drop as duplicates of what it already holds.
 * So sync the WAL (one fdatasync, and only when something was committed since the last sync):
 * what a power cut undoes is then only what never left the agent. Returns 0 or CIS_EDB. */
static int spool__durable(struct agent_spool *s)
{
    if (s->sync_full || !s->wal_unsynced)
        return CIS_OK;
    sqlite3_file *wal = NULL;
    int rc = sqlite3_file_control(s->db, "main", SQLITE_FCNTL_JOURNAL_POINTER, &wal);
    if (rc == SQLITE_OK && wal && wal->pMethods)
        rc = wal->pMethods->xSync(wal, SQLITE_SYNC_NORMAL);
    if (rc != SQLITE_OK) {
        if (!s->wal_sync_err)
            cis_error("[spool] cannot sync the WAL (sqlite %d): nothing is forwarded until it"
                      " can be",
                      rc);
        s->wal_sync_err = 1;
        return CIS_EDB;
    }
    if (s->wal_sync_err)
        cis_info("[spool] the WAL can be synced again");
    s->wal_sync_err = 0;
    s->wal_unsynced = 0;
    return CIS_OK;
}

/* Pages in use and in the file, read inside the current transaction (or in a short read
 * transaction of their own). Both come from page 1: no I/O beyond the page cache. */
static int spool__pages(struct agent_spool *s, uint64_t *page_count, uint64_t *freelist)
{
    int rc = spool__int(s->st[ST_PAGE_COUNT], page_count);
    if (rc == SQLITE_OK)
        rc = spool__int(s->st[ST_FREELIST_COUNT], freelist);
    return rc;
}

/* COMMIT the open write transaction, after reserving the disk blocks its pages take in the
 * database file (see the top of the file). In WAL mode the file grows only when a checkpoint
 * copies the pages in; on a full disk that checkpoint would fail after the commit, and the WAL
 * could then never be rewritten. Reserving first makes the commit itself fail instead: the
 * caller rolls back, and SQLITE_FULL says why. */
static int spool__commit_tx(struct agent_spool *s)
{
    uint64_t pc = 0;
    int rc = spool__int(s->st[ST_PAGE_COUNT], &pc);
    if (rc != SQLITE_OK)
        return rc;
    /* To whole chunks (SQLITE_FCNTL_CHUNK_SIZE, as SQLite itself extends the file), and only if
     * it is shorter: one fstat() when nothing grew. */
    if (s->db_fd >= 0) {
        const uint64_t chunk = (uint64_t)s->page_size * SPOOL_CHUNK_PAGES;
        int err = spool__fallocate(s->db_fd, (pc * s->page_size + chunk - 1) / chunk * chunk);
        if (err == ENOSPC || err == EDQUOT)
            return SQLITE_FULL;
        if (err) {
            /* spool__fail() logs the failed transaction; this says why, once per cause. */
            if (err != s->reserve_err)
                cis_error("[spool] cannot reserve disk space for the database: %s",
                          strerror(err));
            s->reserve_err = err;
            return SQLITE_IOERR;
        }
        s->reserve_err = 0;
        return spool__exec(s->st[ST_COMMIT]);
    }
    /* No descriptor of our own: SQLite's size hint, which fakes the allocation by writes. */
    sqlite3_int64 want = (sqlite3_int64)(pc * s->page_size);
    rc = sqlite3_file_control(s->db, "main", SQLITE_FCNTL_SIZE_HINT, &want);
    if (rc != SQLITE_OK && rc != SQLITE_NOTFOUND) {
        /* The VFS says only "write failed": a full disk, if it lacks the room this grows by. */
        struct statvfs vfs;
        uint64_t need = (pc > s->page_count ? (pc - s->page_count) * s->page_size : 0) +
                        (uint64_t)s->page_size * SPOOL_CHUNK_PAGES;
        if (statvfs(s->path, &vfs) == 0 && (uint64_t)vfs.f_bavail * vfs.f_frsize < need)
            return SQLITE_FULL;
        return rc;
    }
    return spool__exec(s->st[ST_COMMIT]);
}

/* Give back pages above the budget (max_size lowered, or after a big backlog was delivered), a
 * bounded number per call so no transaction becomes large: incremental_vacuum moves pages from
 * the end of the file into free slots and truncates it. Best effort: a failure is retried after
 * the next transaction. Returns 1 if it wrote. */
static int spool__vacuum_some(struct agent_spool *s)
{
    if (!s->incremental || !s->max_size || s->page_count <= s->db_budget_pages ||
        s->freelist_count == 0)
        return 0;
    uint64_t n = s->page_count - s->db_budget_pages;
    if (n > s->freelist_count)
        n = s->freelist_count;
    if (n > SPOOL_VACUUM_STEP)
        n = SPOOL_VACUUM_STEP;
    /* Moving a page writes it and its parent's pointer to it (and pointer-map pages, shared by
     * hundreds): keep the WAL within its cap. */
    uint64_t room = s->wal_cap / spool__frame_bytes(s);
    room = room > s->wal_frames ? (room - s->wal_frames) / 2 : 0;
    if (n > room)
        n = room;
    if (n == 0)
        return 0;
    char sql[64];
    snprintf(sql, sizeof(sql), "PRAGMA incremental_vacuum(%llu)", (unsigned long long)n);
    /* sqlite3_exec: the pragma returns a row per page freed and must be stepped to the end. */
    int rc = sqlite3_exec(s->db, sql, NULL, NULL, NULL);
    if (rc != SQLITE_OK) {
        cis_debug("[spool] incremental vacuum: %s", sqlite3_errmsg(s->db));
        return 0;
    }
    uint64_t pc = 0, fl = 0;
    if (spool__pages(s, &pc, &fl) == SQLITE_OK) {
        s->page_count = pc;
        s->freelist_count = fl;
    }
    return 1;
}

/* After every write transaction: give back pages above the budget, then keep the WAL small. A
 * checkpoint that a reader blocks is simply tried again after the next transaction. */
static void spool__ckpt_if_due(struct agent_spool *s)
{
    /* Frames since the WAL was reset, not the file's size: up to wal_keep frames of it are the
     * room reserved after the last checkpoint. */
    if (spool__wal_bytes_for(s, s->wal_frames) >= s->wal_ckpt)
        spool__checkpoint(s, 0);
}

static void spool__after_tx(struct agent_spool *s)
{
    spool__ckpt_if_due(s);
    if (spool__vacuum_some(s)) /* after the checkpoint: it has the WAL's room to work in */
        spool__ckpt_if_due(s);
}

/* Can the WAL take EST more frames without passing its cap? If not, checkpoint, waiting a short
 * grace for readers. Returns 0, CIS_EAGAIN (a reader still blocks it: nothing is written), or
 * CIS_ETOOBIG (even an empty WAL could not take this commit). */
static int spool__wal_room(struct agent_spool *s, uint64_t est)
{
    if (spool__wal_bytes_for(s, s->wal_frames + est) <= s->wal_cap)
        return CIS_OK;
    int rc = spool__checkpoint(s, SPOOL_CKPT_GRACE_MS);
    if (rc == CIS_OK) {
        if (spool__wal_bytes_for(s, est) <= s->wal_cap)
            return CIS_OK;
        /* The bound derived from max_size is a target; wal_max_size is a promise. */
        if (spool__wal_bytes_for(s, est) <= s->wal_max)
            return CIS_OK;
        cis_error("[spool] one commit needs ~%llu bytes of WAL, more than spool.wal_max_size"
                  " (%llu): lower commit_max_bytes or raise wal_max_size",
                  (unsigned long long)spool__wal_bytes_for(s, est), (unsigned long long)s->wal_max);
        return CIS_ETOOBIG;
    }
    if (rc != CIS_EAGAIN)
        return rc; /* e.g. CIS_ENOSPC: the checkpoint itself could not write */
    if (!s->wal_capped)
        cis_warn("[spool] the WAL is at its cap (%llu bytes) and a reader blocks the checkpoint:"
                 " commits fail (try again) until it ends",
                 (unsigned long long)s->wal_cap);
    s->wal_capped = 1;
    return CIS_EAGAIN;
}

/* Pages a segment row with a blob of LEN bytes needs: whole overflow pages, plus the bytes its
 * cell takes on a table leaf and its entries on index leaves (*LEAF_BYTES, summed over a commit
 * by the caller). Follows SQLite's split of a record into a local part and overflow pages
 * (btree.c, btreeParseCellAdjustSizeForOverflow) for a table leaf without reserved bytes, with
 * the other columns and the record header counted at their largest (64 bytes): close enough that
 * a full spool's file settles within a few pages of the budget. */
static uint64_t spool__pages_for(const struct agent_spool *s, size_t len, uint64_t *leaf_bytes)
{
    const uint64_t u = s->page_size;
    const uint64_t max_local = u - 35;
    const uint64_t min_local = (u - 12) * 32 / 255 - 23;
    const uint64_t payload = (uint64_t)len + 64;
    uint64_t local = payload, overflow = 0;
    if (payload > max_local) {
        local = min_local + (payload - min_local) % (u - 4);
        if (local > max_local)
            local = min_local;
        overflow = (payload - local + u - 5) / (u - 4);
    }
    /* cell: local part, overflow pointer, lengths, rowid, cell pointer; two index entries */
    *leaf_bytes += local + 16 + 2 * 24;
    return overflow;
}

/* Thresholds from the options and the page size (see the top of the file). */
static void spool__limits(struct agent_spool *s, const struct agent_spool_opts *o)
{
    s->wal_max = o->wal_max_size ? o->wal_max_size : SPOOL_WAL_MAX_DEFAULT;
    s->seg_max_records = o->seg_max_records ? o->seg_max_records : UINT64_MAX;
    s->max_size = o->max_size;
    s->reject_new = o->reject_new;
    if (!s->max_size) {
        s->wal_ckpt = s->wal_max / 4 < SPOOL_CKPT_UNBOUNDED ? s->wal_max / 4 : SPOOL_CKPT_UNBOUNDED;
        s->wal_cap = s->wal_max;
        s->db_budget_pages = UINT64_MAX;
        s->seg_max = SIZE_MAX;
    } else {
        /* T = clamp(max_size / 32, 32 KiB, wal_max / 4). A larger floor (256 KiB) would by
         * itself take more than the +-5% band of a small spool: the file sits at the budget
         * and the WAL swings 0..T on top. */
        uint64_t m = s->max_size;
        uint64_t t = m / 32;
        if (t > s->wal_max / 4)
            t = s->wal_max / 4;
        if (t < SPOOL_CKPT_FLOOR)
            t = SPOOL_CKPT_FLOOR;
        s->wal_ckpt = t;
        /* Eviction frees whole segments, so a full spool's data (and so its file) settles up to
         * one segment below the budget: a group of records larger than this is stored as
         * several segments (see agent_spool_commit()). 1/64 of max_size: well inside the band;
         * above a 64 MiB max_size it exceeds the default commit_max_bytes (1 MiB), so such a
         * spool's commits are not split. */
        s->seg_max = m / 64 > SPOOL_SEG_FLOOR ? m / 64 : SPOOL_SEG_FLOOR;
        /* The file sits at db_budget (a little under); the WAL adds 0..T at rest. Centre that
         * swing on max_size, less a margin for the commit in progress. */
        uint64_t margin = t / 8;
        uint64_t budget = m > t / 2 + margin ? m - t / 2 - margin : m / 2;
        s->db_budget_pages = budget / s->page_size;
        /* While a reader blocks checkpoints the WAL may use what is left up to max_size + 5%,
         * and never more than wal_max_size. */
        uint64_t cap = m + m / 20 - budget;
        s->wal_cap = cap < s->wal_max ? cap : s->wal_max;
    }
    /* The room the WAL keeps on disk (see the top of the file): a quarter of the threshold past
     * it, so the transaction that crosses the threshold still fits on a full disk. */
    uint64_t keep = s->wal_ckpt + s->wal_ckpt / 4;
    if (keep > s->wal_cap)
        keep = s->wal_cap;
    s->wal_keep = keep > SPOOL_WAL_HDR ? (keep - SPOOL_WAL_HDR) / spool__frame_bytes(s) : 0;
}

/* ---- the ledger ---- */

/* Write a ledger row for a dropped range inside the open transaction. With COALESCE, a range
 * that directly follows the newest row (unsent, not handed to the forwarder, same reason and
 * epoch) extends it instead, so a long outage does not add a row per commit. */
static int spool__ledger_put(struct agent_spool *s, const char *reason, uint64_t epoch,
                             uint64_t first, uint64_t last, uint64_t count, int64_t now,
                             const char *detail, int coalesce, struct spool_delta *d)
{
    int rc;
    if (coalesce) {
        sqlite3_stmt *q = s->st[ST_LEDGER_LAST];
        rc = sqlite3_step(q);
        if (rc == SQLITE_ROW) {
            int64_t id = sqlite3_column_int64(q, 0);
            const char *r = (const char *)sqlite3_column_text(q, 1);
            uint64_t e = (uint64_t)sqlite3_column_int64(q, 2);
            int64_t l = sqlite3_column_int64(q, 3);
            int sent = sqlite3_column_int(q, 4);
            int extend = id > 0 && (uint64_t)id > s->ledger_handed_id && !sent && r &&
                         strcmp(r, reason) == 0 && e == epoch && l >= 0 && (uint64_t)l + 1 == first;
            sqlite3_reset(q);
            if (extend) {
                sqlite3_stmt *u = s->st[ST_LEDGER_EXTEND];
                sqlite3_bind_int64(u, 1, (sqlite3_int64)last);
                sqlite3_bind_int64(u, 2, (sqlite3_int64)count);
                sqlite3_bind_int64(u, 3, now);
                sqlite3_bind_int64(u, 4, id);
                rc = spool__exec(u);
                if (rc == SQLITE_OK && sqlite3_changes(s->db) != 1)
                    rc = SQLITE_CORRUPT;
                return rc;
            }
        } else {
            sqlite3_reset(q);
            if (rc != SQLITE_DONE)
                return rc;
        }
    }
    /* The detail is words from the receiver or from SQLite, and SQLite's words about a
     * corrupt file can quote its garbage: keep printable ASCII only, so the row stays valid
     * text for every reader and a valid protobuf string on the wire. */
    char clean[1024];
    if (detail) {
        size_t i = 0;
        for (; detail[i] && i < sizeof(clean) - 1; i++)
            clean[i] = (unsigned char)detail[i] >= 0x20 && (unsigned char)detail[i] < 0x7f
                           ? detail[i] : '?';
        clean[i] = '\0';
        detail = clean;
    }
    sqlite3_stmt *li = s->st[ST_LEDGER_INSERT];
    sqlite3_bind_text(li, 1, reason, -1, SQLITE_STATIC);
    sqlite3_bind_int64(li, 2, (sqlite3_int64)epoch);
    sqlite3_bind_int64(li, 3, (sqlite3_int64)first);
    sqlite3_bind_int64(li, 4, (sqlite3_int64)last);
    sqlite3_bind_int64(li, 5, (sqlite3_int64)count);
    sqlite3_bind_int64(li, 6, now);
    if (detail)
        sqlite3_bind_text(li, 7, detail, -1, SQLITE_STATIC);
    else
        sqlite3_bind_null(li, 7);
    rc = spool__exec(li);
    sqlite3_clear_bindings(li);
    if (rc == SQLITE_OK)
        d->ledger_rows++;
    return rc;
}

/* Delete segment FIRST inside the open transaction; with REASON, write its ledger row in the
 * same transaction first. *FOUND is 0 when there is no such segment (nothing done). */
static int spool__drop_seg(struct agent_spool *s, uint64_t first, const char *reason,
                           const char *detail, int coalesce, int64_t now, struct spool_delta *d,
                           int *found)
{
    sqlite3_stmt *info = s->st[ST_SEG_INFO];
    *found = 0;
    sqlite3_bind_int64(info, 1, (sqlite3_int64)first);
    int rc = sqlite3_step(info);
    if (rc == SQLITE_DONE) {
        sqlite3_reset(info);
        return SQLITE_OK;
    }
    if (rc != SQLITE_ROW) {
        sqlite3_reset(info);
        return rc;
    }
    int64_t last = sqlite3_column_int64(info, 0);
    int64_t count = sqlite3_column_int64(info, 1);
    int64_t prio = sqlite3_column_int64(info, 2);
    int64_t bytes = sqlite3_column_int64(info, 3);
    sqlite3_reset(info);
    if (last < (int64_t)first || count <= 0 || prio < 0 || prio >= CIS_PRIO_COUNT)
        return SQLITE_CORRUPT; /* inconsistent row: the spool cannot be trusted */

    if (reason) {
        rc = spool__ledger_put(s, reason, s->epoch, first, (uint64_t)last, (uint64_t)count, now,
                               detail, coalesce, d);
        if (rc != SQLITE_OK)
            return rc;
    }
    sqlite3_stmt *del = s->st[ST_SEG_DELETE];
    sqlite3_bind_int64(del, 1, (sqlite3_int64)first);
    rc = spool__exec(del);
    if (rc != SQLITE_OK)
        return rc;
    d->recs[prio] -= count;
    d->segs[prio] -= 1;
    d->bytes[prio] -= bytes > 0 ? bytes : 0;
    d->drop_segs++;
    d->drop_recs += (uint64_t)count;
    *found = 1;
    return SQLITE_OK;
}

/* The oldest stored segment, read inside the transaction (a primary-key lookup). */
static int spool__read_oldest(struct agent_spool *s, uint64_t *min_first, int64_t *created)
{
    *min_first = 0;
    *created = 0;
    int rc = sqlite3_step(s->st[ST_OLDEST]);
    if (rc == SQLITE_ROW) {
        *min_first = (uint64_t)sqlite3_column_int64(s->st[ST_OLDEST], 0);
        *created = sqlite3_column_int64(s->st[ST_OLDEST], 1);
    }
    sqlite3_reset(s->st[ST_OLDEST]);
    return rc == SQLITE_ROW || rc == SQLITE_DONE ? SQLITE_OK : rc;
}

/* ---- open ---- */

/* Is any sealed segment stored? A scan (sealed is stored behind the blob), so only asked when
 * meta says a key was used and the configured one is missing or different. */
static int spool__has_sealed(sqlite3 *db, int *out)
{
    sqlite3_stmt *st = NULL;
    int rc = sqlite3_prepare_v2(db, "SELECT EXISTS(SELECT 1 FROM segments WHERE sealed != 0)", -1,
                                &st, NULL);
    if (rc == SQLITE_OK)
        rc = sqlite3_step(st);
    if (rc == SQLITE_ROW) {
        *out = sqlite3_column_int(st, 0) != 0;
        rc = SQLITE_OK;
    }
    sqlite3_finalize(st);
    return rc;
}

/* The sealing key against the one the spool remembers (meta key_id), inside the open
 * transaction. Refuses (CIS_EINVAL) rather than let every sealed segment fail as tampered. */
static int spool__check_key(struct agent_spool *s, char *err, size_t errlen)
{
    int64_t v = 0;
    int sealed = 0;
    int rc = spool__meta_get(s->db, "key_id", &v);
    if (rc != SQLITE_OK && rc != SQLITE_NOTFOUND) {
        cis_set_err(err, errlen, "%s: read key_id: %s", s->path, sqlite3_errmsg(s->db));
        return spool__map(rc);
    }
    int have = rc == SQLITE_OK;
    uint64_t stored = (uint64_t)v;

    if (s->seal) {
        uint64_t kid = agent_seal_key_id(s->seal);
        if (have && stored == kid)
            return CIS_OK;
        if (have) {
            rc = spool__has_sealed(s->db, &sealed);
            if (rc != SQLITE_OK) {
                cis_set_err(err, errlen, "%s: %s", s->path, sqlite3_errmsg(s->db));
                return spool__map(rc);
            }
            if (sealed) {
                cis_set_err(err, errlen,
                            "%s: spool was sealed with key id %016llx, the configured key is"
                            " %016llx; refusing to start rather than drop every segment as"
                            " tampered",
                            s->path, (unsigned long long)stored, (unsigned long long)kid);
                return CIS_EINVAL;
            }
            /* Nothing sealed with the old key is left: nothing would fail to open. */
            cis_info("[spool] %s: sealing key changed from %016llx to %016llx (no segment was"
                     " sealed with the old one)",
                     s->path, (unsigned long long)stored, (unsigned long long)kid);
        }
        rc = spool__meta_put(s->db, "key_id", (int64_t)kid);
        if (rc != SQLITE_OK) {
            cis_set_err(err, errlen, "%s: store key_id: %s", s->path, sqlite3_errmsg(s->db));
            return spool__map(rc);
        }
        return CIS_OK;
    }

    /* No key. A sealed segment can only exist once key_id was stored (at the open that
     * configured the key, before any commit), so without key_id there is nothing to scan for. */
    if (!have)
        return CIS_OK;
    rc = spool__has_sealed(s->db, &sealed);
    if (rc != SQLITE_OK) {
        cis_set_err(err, errlen, "%s: %s", s->path, sqlite3_errmsg(s->db));
        return spool__map(rc);
    }
    if (sealed) {
        cis_set_err(err, errlen,
                    "%s: spool holds segments sealed with key id %016llx but no"
                    " spool.encryption_key_file is configured; refusing to start rather than"
                    " drop every segment as tampered",
                    s->path, (unsigned long long)stored);
        return CIS_EINVAL;
    }
    return CIS_OK;
}

/* With the wall clock set (SPOOL_CLOCK_FLOOR_MS), give the segments whose TTL was stamped while
 * it was unset (a Pi that booted at 1970) their whole TTL again from now: their age is unknown,
 * and counting it from 1970 would expire them all at once (see the top of the file). One
 * UPDATE on the expires_ms index; best effort (they then expire later, never sooner). */
static void spool__clock_rebase(struct agent_spool *s)
{
    if (s->clock_wall0 < SPOOL_CLOCK_FLOOR_MS)
        return;
    sqlite3_stmt *st = NULL;
    int rc = sqlite3_prepare_v2(s->db,
                                "UPDATE segments SET expires_ms = ?1 + (expires_ms - created_ms),"
                                " created_ms = ?1 WHERE expires_ms > 0 AND expires_ms < ?2",
                                -1, &st, NULL);
    if (rc == SQLITE_OK) {
        sqlite3_bind_int64(st, 1, spool__now(s));
        sqlite3_bind_int64(st, 2, SPOOL_CLOCK_FLOOR_MS);
        rc = spool__exec(st);
    }
    int n = rc == SQLITE_OK ? sqlite3_changes(s->db) : 0;
    sqlite3_finalize(st);
    if (rc != SQLITE_OK)
        cis_warn("[spool] cannot restart the TTL of segments stored before the clock was set: %s",
                 sqlite3_errmsg(s->db));
    else if (n > 0)
        cis_info("[spool] %d segments were stored while the clock was not set (before 2024): their"
                 " TTL counts from now",
                 n);
    if (n > 0)
        spool__after_tx(s);
}

/* Create the schema, or check (and upgrade) an existing one, and load meta and the counters, in
 * one transaction. */
static int spool__init_db(struct agent_spool *s, char *err, size_t errlen)
{
    sqlite3_stmt *st = NULL;
    int64_t v = 0;
    int created = 0, upgraded = 0;
    int ret = CIS_OK;

    int rc = sqlite3_exec(s->db, "BEGIN IMMEDIATE", NULL, NULL, NULL);
    if (rc != SQLITE_OK) {
        cis_set_err(err, errlen, "%s: begin: %s", s->path, sqlite3_errmsg(s->db));
        return spool__map(rc);
    }

    rc = sqlite3_prepare_v2(
        s->db, "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = 'meta'", -1, &st,
        NULL);
    if (rc == SQLITE_OK)
        rc = sqlite3_step(st);
    if (rc != SQLITE_ROW) {
        cis_set_err(err, errlen, "%s: %s", s->path, sqlite3_errmsg(s->db));
        ret = spool__map(rc);
        goto out;
    }
    int has_meta = sqlite3_column_int(st, 0) > 0;
    sqlite3_finalize(st);
    st = NULL;

    if (!has_meta) {
        /* A new spool: the schema, its epoch and next_seq are made in this one transaction, so
         * a crash leaves either no spool or a complete one, never one without an epoch. */
        ret = spool__random_epoch(&s->epoch);
        if (ret) {
            cis_set_err(err, errlen, "%s: getrandom: %s", s->path, strerror(errno));
            goto out;
        }
        char ins[256];
        snprintf(ins, sizeof(ins),
                 "INSERT INTO meta(key, value) VALUES('schema_version', %d), ('epoch', %lld),"
                 " ('next_seq', 1);",
                 AGENT_SPOOL_SCHEMA_VERSION, (long long)s->epoch);
        rc = sqlite3_exec(s->db, spool_schema_sql, NULL, NULL, NULL);
        if (rc == SQLITE_OK)
            rc = sqlite3_exec(s->db, ins, NULL, NULL, NULL);
        if (rc != SQLITE_OK) {
            cis_set_err(err, errlen, "%s: create schema: %s", s->path, sqlite3_errmsg(s->db));
            ret = spool__map(rc);
            goto out;
        }
        s->next_seq = 1;
        created = 1;
    } else {
        rc = spool__meta_get(s->db, "schema_version", &v);
        if (rc != SQLITE_OK) {
            cis_set_err(err, errlen, "%s: no schema_version in meta: %s", s->path,
                        rc == SQLITE_NOTFOUND ? "missing" : sqlite3_errmsg(s->db));
            ret = rc == SQLITE_NOTFOUND ? CIS_ECORRUPT : spool__map(rc);
            goto out;
        }
        if (v > AGENT_SPOOL_SCHEMA_VERSION) {
            cis_set_err(err, errlen,
                        "%s: spool schema_version %lld is newer than this agent supports (%d);"
                        " upgrade the agent or move the file aside",
                        s->path, (long long)v, AGENT_SPOOL_SCHEMA_VERSION);
            ret = CIS_EDB;
            goto out;
        }
        if (v < 1) {
            cis_set_err(err, errlen, "%s: bad schema_version %lld", s->path, (long long)v);
            ret = CIS_ECORRUPT;
            goto out;
        }
        if (v == 1) {
            /* In this same transaction: a crash leaves the version-1 file as it was. */
            rc = sqlite3_exec(s->db, spool_upgrade_v2_sql, NULL, NULL, NULL);
            if (rc != SQLITE_OK) {
                cis_set_err(err, errlen, "%s: upgrade to schema version 2: %s", s->path,
                            sqlite3_errmsg(s->db));
                ret = spool__map(rc);
                goto out;
            }
            upgraded = 1;
        }
        if (v <= 2) {
            /* Rows stored so far keep crc 0: not checked (see spool__seg_crc()). */
            rc = sqlite3_exec(s->db, spool_upgrade_v3_sql, NULL, NULL, NULL);
            if (rc != SQLITE_OK) {
                cis_set_err(err, errlen, "%s: upgrade to schema version 3: %s", s->path,
                            sqlite3_errmsg(s->db));
                ret = spool__map(rc);
                goto out;
            }
            upgraded = (int)v;
        }
        rc = spool__meta_get(s->db, "epoch", &v);
        if (rc != SQLITE_OK || v <= 0) {
            cis_set_err(err, errlen, "%s: meta epoch missing or invalid", s->path);
            ret = rc == SQLITE_OK || rc == SQLITE_NOTFOUND ? CIS_ECORRUPT : spool__map(rc);
            goto out;
        }
        s->epoch = (uint64_t)v;
        rc = spool__meta_get(s->db, "next_seq", &v);
        if (rc != SQLITE_OK || v <= 0) {
            cis_set_err(err, errlen, "%s: meta next_seq missing or invalid", s->path);
            ret = rc == SQLITE_OK || rc == SQLITE_NOTFOUND ? CIS_ECORRUPT : spool__map(rc);
            goto out;
        }
        s->next_seq = (uint64_t)v;
    }

    ret = spool__check_key(s, err, errlen);
    if (ret)
        goto out;

    /* The counters, once. Segments do not overlap, so the row with the highest first_seq has the
     * highest last_seq: it must lie below next_seq, or seqs could be reused. */
    rc = sqlite3_prepare_v2(s->db,
                            "SELECT (SELECT first_seq FROM segments ORDER BY first_seq LIMIT 1),"
                            " (SELECT created_ms FROM segments ORDER BY first_seq LIMIT 1),"
                            " (SELECT last_seq FROM segments ORDER BY first_seq DESC LIMIT 1),"
                            " (SELECT count(*) FROM ledger WHERE sent = 0)",
                            -1, &st, NULL);
    if (rc == SQLITE_OK)
        rc = sqlite3_step(st);
    if (rc != SQLITE_ROW) {
        cis_set_err(err, errlen, "%s: read counters: %s", s->path, sqlite3_errmsg(s->db));
        ret = spool__map(rc);
        goto out;
    }
    int64_t min_first = sqlite3_column_int64(st, 0);
    s->min_first_seq = min_first > 0 ? (uint64_t)min_first : 0;
    s->oldest_created_ms = sqlite3_column_int64(st, 1);
    int64_t max_last = sqlite3_column_int64(st, 2);
    s->ledger_unsent = (uint64_t)sqlite3_column_int64(st, 3);
    if (max_last >= 0 && (uint64_t)max_last >= s->next_seq) {
        cis_set_err(err, errlen, "%s: meta next_seq %llu is not above stored seq %lld", s->path,
                    (unsigned long long)s->next_seq, (long long)max_last);
        ret = CIS_ECORRUPT;
        goto out;
    }
    sqlite3_finalize(st);
    st = NULL;

    /* Per class; length(data) reads the blob's size from the record header, not the blob. */
    rc = sqlite3_prepare_v2(s->db,
                            "SELECT priority, count(*), coalesce(sum(record_count), 0),"
                            " coalesce(sum(length(data)), 0) FROM segments GROUP BY priority",
                            -1, &st, NULL);
    while (rc == SQLITE_OK && (rc = sqlite3_step(st)) == SQLITE_ROW) {
        int64_t c = sqlite3_column_int64(st, 0);
        if (c < 0 || c >= CIS_PRIO_COUNT) {
            cis_set_err(err, errlen, "%s: segments with unknown priority %lld", s->path,
                        (long long)c);
            ret = CIS_ECORRUPT;
            goto out;
        }
        s->cls[c].segments = (uint64_t)sqlite3_column_int64(st, 1);
        s->cls[c].records = (uint64_t)sqlite3_column_int64(st, 2);
        s->cls[c].bytes = (uint64_t)sqlite3_column_int64(st, 3);
        rc = SQLITE_OK;
    }
    if (rc != SQLITE_DONE) {
        cis_set_err(err, errlen, "%s: read counters: %s", s->path, sqlite3_errmsg(s->db));
        ret = spool__map(rc);
        goto out;
    }
    sqlite3_finalize(st);
    st = NULL;

    rc = sqlite3_exec(s->db, "COMMIT", NULL, NULL, NULL);
    if (rc != SQLITE_OK) {
        cis_set_err(err, errlen, "%s: commit: %s", s->path, sqlite3_errmsg(s->db));
        ret = spool__map(rc);
        goto out;
    }
    if (created)
        cis_info("[spool] created %s", s->path);
    if (upgraded)
        cis_info("[spool] upgraded %s from schema version %d to %d", s->path, upgraded,
                 AGENT_SPOOL_SCHEMA_VERSION);

out:
    sqlite3_finalize(st);
    if (ret && !sqlite3_get_autocommit(s->db))
        sqlite3_exec(s->db, "ROLLBACK", NULL, NULL, NULL);
    return ret;
}

/* ---- public API ---- */

int agent_spool_open(const struct agent_spool_opts *o, struct agent_spool **out, char *err,
                     size_t errlen)
{
    struct agent_spool *s = NULL;
    char *dir = NULL;
    int ret = CIS_OK;
    int rc;

    if (out)
        *out = NULL;
    if (!o || !o->path || !o->path[0] || !out) {
        cis_set_err(err, errlen, "spool: no path given");
        return CIS_EINVAL;
    }

    /* A clear message for the common installation mistake, rather than SQLite's
     * "unable to open database file". */
    dir = strdup(o->path);
    if (!dir) {
        ret = CIS_ENOMEM;
        goto out;
    }
    const char *d = dirname(dir);
    struct stat sb;
    if (stat(d, &sb) != 0 || !S_ISDIR(sb.st_mode)) {
        cis_set_err(err, errlen, "%s: spool directory %s does not exist", o->path, d);
        ret = CIS_ENOTFOUND;
        goto out;
    }

    s = calloc(1, sizeof(*s));
    if (s)
        s->db_fd = -1;
    if (!s || !(s->path = strdup(o->path)) || cis_seg_encoder_create(o->zstd_level, &s->enc)) {
        cis_set_err(err, errlen, "%s: out of memory", o->path);
        ret = CIS_ENOMEM;
        goto out;
    }
    s->seal = o->seal;
    s->clock_wall0 = cis_wall_ms();
    s->clock_mono0 = cis_mono_ms();
    s->sync_full = o->sync_full;

    /* NOMUTEX: one connection used by one thread (the agent's event loop). */
    rc = sqlite3_open_v2(o->path, &s->db,
                         SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE | SQLITE_OPEN_NOMUTEX, NULL);
    if (rc != SQLITE_OK) {
        cis_set_err(err, errlen, "%s: open: %s", o->path,
                    s->db ? sqlite3_errmsg(s->db) : sqlite3_errstr(rc));
        ret = spool__map(rc);
        goto out;
    }
    sqlite3_extended_result_codes(s->db, 1);
    /* An external reader (tests, `status`) must not make our writes fail. */
    sqlite3_busy_timeout(s->db, SPOOL_BUSY_TIMEOUT_MS);

    /* Before anything creates the file's first page: a new spool is made with incremental
     * auto-vacuum, so its file can be shrunk when max_size is lowered or a backlog is gone
     * (spools made without it keep their size). This is the first statement that reads the
     * file, so a file that is not a database fails here with
     * SQLITE_NOTADB -> CIS_ECORRUPT. */
    {
        /* Only on a new (missing or empty) file: on an existing one the pragma would rewrite
         * the header at every start (a flash write, and into a file not yet checked). */
        struct stat fsb;
        int is_new = stat(o->path, &fsb) != 0 || fsb.st_size == 0;
        rc = spool__pragma(s, is_new ? "PRAGMA page_size=1024; PRAGMA auto_vacuum=INCREMENTAL" : "PRAGMA schema_version",
                           err, errlen);
    }
    if (rc != SQLITE_OK) {
        ret = spool__map(rc);
        goto out;
    }

    /* WAL: a commit appends to the WAL instead of rewriting pages twice (fewer flash writes),
     * and readers do not block the writer. */
    {
        sqlite3_stmt *st = NULL;
        rc = sqlite3_prepare_v2(s->db, "PRAGMA journal_mode=WAL", -1, &st, NULL);
        if (rc == SQLITE_OK)
            rc = sqlite3_step(st);
        if (rc != SQLITE_ROW) {
            cis_set_err(err, errlen, "%s: journal_mode=WAL: %s", o->path, sqlite3_errmsg(s->db));
            sqlite3_finalize(st);
            ret = spool__map(rc);
            goto out;
        }
        const char *mode = (const char *)sqlite3_column_text(st, 0);
        int is_wal = mode && strcmp(mode, "wal") == 0;
        if (!is_wal)
            cis_set_err(err, errlen, "%s: cannot use WAL (journal_mode is %s)", o->path,
                        mode ? mode : "?");
        sqlite3_finalize(st);
        if (!is_wal) {
            ret = CIS_EDB;
            goto out;
        }
    }
    /* synchronous=FULL fsyncs the WAL at every commit: a returned commit survives power loss.
     * NORMAL fsyncs only at checkpoints: a power cut can undo the last commits (never corrupt
     * the file); chosen where flash wear matters more, per opts->sync_full.
     * secure_delete=FAST: Debian builds SQLite with secure_delete on, which rewrites every page
     * a deleted blob freed with zeros: each acked or evicted byte would be written to flash
     * twice more (WAL, then the checkpoint). FAST still clears deleted cells on pages that are
     * written anyway; freed pages are overwritten when the next segments reuse them. */
    rc = spool__pragma(s, o->sync_full ? "PRAGMA synchronous=FULL" : "PRAGMA synchronous=NORMAL",
                       err, errlen);
    if (rc == SQLITE_OK)
        rc = spool__pragma(s, "PRAGMA secure_delete=FAST", err, errlen);
    if (rc != SQLITE_OK) {
        ret = spool__map(rc);
        goto out;
    }
    {
        uint64_t ps = 0;
        sqlite3_stmt *st = NULL;
        rc = sqlite3_prepare_v2(s->db, "PRAGMA page_size", -1, &st, NULL);
        if (rc == SQLITE_OK && sqlite3_step(st) == SQLITE_ROW)
            ps = (uint64_t)sqlite3_column_int64(st, 0);
        sqlite3_finalize(st);
        s->page_size = ps >= 512 && ps <= 65536 ? (uint32_t)ps : 4096;
    }
    spool__limits(s, o);
    {
        /* The cap's backstop: a WAL restarted after a checkpoint is cut to this size. */
        char sql[64];
        snprintf(sql, sizeof(sql), "PRAGMA journal_size_limit=%llu",
                 (unsigned long long)s->wal_cap);
        rc = spool__pragma(s, sql, err, errlen);
        if (rc != SQLITE_OK) {
            ret = spool__map(rc);
            goto out;
        }
        /* The file grows by whole chunks (spool__commit_tx()): fewer extensions, and room for a
         * page that a transaction other than a commit may add (a ledger row). */
        int chunk = (int)s->page_size * SPOOL_CHUNK_PAGES;
        sqlite3_file_control(s->db, "main", SQLITE_FCNTL_CHUNK_SIZE, &chunk);
    }
    /* Our hook replaces wal_autocheckpoint (which waits on readers); see spool__after_tx(). */
    sqlite3_wal_hook(s->db, spool__wal_hook, s);

    ret = spool__init_db(s, err, errlen);
    if (ret)
        goto out;
    /* The file exists now. Its name and the WAL's as SQLite made them (symlinks resolved), so
     * our descriptors name the very files SQLite writes. Without them the reservations fall
     * back to SQLite's size hint: correct, only more bytes written. */
    {
        const char *dbname = sqlite3_db_filename(s->db, "main");
        const char *walname = dbname ? sqlite3_filename_wal(dbname) : NULL;
        if (walname && walname[0] && !(s->wal_path = strdup(walname))) {
            ret = CIS_ENOMEM;
            goto out;
        }
        s->db_fd = dbname && dbname[0] ? open(dbname, O_RDWR | O_CLOEXEC) : -1;
        if (s->db_fd < 0)
            cis_warn("[spool] %s: cannot open a descriptor to reserve disk space with (%s):"
                     " reserving through SQLite, which writes what it reserves",
                     s->path, strerror(errno));
    }

    for (int i = 0; i < ST_COUNT; i++) {
        rc =
            sqlite3_prepare_v3(s->db, spool_sql[i], -1, SQLITE_PREPARE_PERSISTENT, &s->st[i], NULL);
        if (rc != SQLITE_OK) {
            cis_set_err(err, errlen, "%s: prepare: %s", o->path, sqlite3_errmsg(s->db));
            /* The schema is ours (init checked its version): a table or column it lacks is a
             * damaged schema, for the caller to quarantine, not a reason not to start. */
            ret = (rc & 0xff) == SQLITE_ERROR ? CIS_ECORRUPT : spool__map(rc);
            goto out;
        }
    }
    {
        sqlite3_stmt *st = NULL;
        rc = sqlite3_prepare_v2(s->db, "PRAGMA auto_vacuum", -1, &st, NULL);
        if (rc == SQLITE_OK && sqlite3_step(st) == SQLITE_ROW)
            s->incremental = sqlite3_column_int(st, 0) == 2;
        sqlite3_finalize(st);
    }
    rc = spool__pages(s, &s->page_count, &s->freelist_count);
    if (rc != SQLITE_OK) {
        cis_set_err(err, errlen, "%s: page count: %s", o->path, sqlite3_errmsg(s->db));
        ret = spool__map(rc);
        goto out;
    }
    /* Mark the spool open (meta open_boot, see agent_spool_boot_mark()); the checkpoint below
     * puts the mark in the database file itself, after syncing the WAL (and so its name in the
     * directory). A mark found there by the next start with no -wal beside the file means the
     * WAL of an unclean stop is gone (spool_recover.c). Best effort: without it, that one case
     * is not detected. */
    {
        char sql[96];
        snprintf(sql, sizeof(sql),
                 "INSERT OR REPLACE INTO meta(key, value) VALUES('open_boot', %lld)",
                 (long long)agent_spool_boot_mark());
        if (sqlite3_exec(s->db, sql, NULL, NULL, NULL) != SQLITE_OK)
            cis_debug("[spool] cannot mark the spool open: %s", sqlite3_errmsg(s->db));
    }
    /* A WAL left by the previous run: learn its size, and start from an empty one if no reader
     * is in the way. */
    {
        char wal[4096];
        struct stat wb;
        snprintf(wal, sizeof(wal), "%s-wal", o->path);
        if (stat(wal, &wb) == 0 && (uint64_t)wb.st_size > SPOOL_WAL_HDR)
            s->wal_hwm = ((uint64_t)wb.st_size - SPOOL_WAL_HDR) / spool__frame_bytes(s);
        s->wal_frames = s->wal_hwm;
        spool__checkpoint(s, 0);
    }
    spool__after_tx(s); /* gives back pages if max_size was lowered */
    spool__clock_rebase(s);

    cis_info("[spool] opened %s epoch=%llu next_seq=%llu pending=%llu records in %llu segments%s",
             s->path, (unsigned long long)s->epoch, (unsigned long long)s->next_seq,
             (unsigned long long)(s->cls[0].records + s->cls[1].records + s->cls[2].records),
             (unsigned long long)spool__total_segments(s), s->seal ? " (sealed)" : "");
    *out = s;
    s = NULL;

out:
    if (ret == CIS_ENOMEM)
        cis_set_err(err, errlen, "%s: out of memory", o->path);
    free(dir);
    agent_spool_close(s);
    return ret;
}

void agent_spool_close(struct agent_spool *s)
{
    if (!s)
        return;
    /* Closed cleanly: the last connection's close checkpoints this into the file, then removes
     * the WAL (see agent_spool_open()). */
    if (s->db && sqlite3_get_autocommit(s->db))
        sqlite3_exec(s->db, "UPDATE meta SET value = 0 WHERE key = 'open_boot'", NULL, NULL,
                     NULL);
    for (int i = 0; i < ST_COUNT; i++)
        sqlite3_finalize(s->st[i]);
    if (s->db)
        sqlite3_close(s->db);
    /* After the connection, whose locks closing this would drop (see struct agent_spool). */
    if (s->db_fd >= 0)
        close(s->db_fd);
    cis_seg_encoder_destroy(s->enc);
    free(s->inflight);
    free(s->wal_path);
    free(s->path);
    free(s);
}

uint64_t agent_spool_epoch(const struct agent_spool *s)
{
    return s->epoch;
}

int64_t agent_spool_boot_mark(void)
{
    /* FNV-1a of the kernel's boot id: the same for every process of one boot. */
    char id[64] = "";
    FILE *fp = fopen("/proc/sys/kernel/random/boot_id", "re");
    if (fp) {
        if (!fgets(id, sizeof(id), fp))
            id[0] = '\0';
        fclose(fp);
    }
    if (!id[0])
        return 1;
    uint64_t h = 0xcbf29ce484222325ULL;
    for (const char *p = id; *p && *p != '\n'; p++)
        h = (h ^ (uint8_t)*p) * 0x100000001b3ULL;
    h &= INT64_MAX;
    return h > 1 ? (int64_t)h : 2;
}

/* One (priority, ttl) group of a commit: its slice of the work array. */
struct spool_group {
    uint32_t prio;
    int64_t ttl;
    size_t cnt, start, fill;
};

/* One segment row of a commit: a run of one group's records, and its blob. */
struct spool_part {
    uint32_t prio;
    int64_t ttl;
    size_t start, cnt;
    struct cis_segment seg;
    uint8_t *data;
    size_t len;
};

/* Evict segments that are not in flight, lowest priority first and oldest first within a
 * priority, each recorded as evicted_full, until NEED more pages fit in the budget. Inside the
 * open transaction. *FITS is 0 when everything evictable went and it still does not fit (the
 * caller rolls back). */
static int spool__evict(struct agent_spool *s, uint64_t need, int64_t now, struct spool_delta *d,
                        int *fits)
{
    uint64_t pc = 0, fl = 0;
    int rc = spool__pages(s, &pc, &fl);
    *fits = 0;
    for (int c = CIS_PRIO_COUNT - 1; rc == SQLITE_OK && c >= 0; c--) {
        uint64_t after = 0; /* first_seqs up to here are in flight (or gone) */
        while (rc == SQLITE_OK) {
            if (pc - fl + need <= s->db_budget_pages) {
                *fits = 1;
                return SQLITE_OK;
            }
            sqlite3_stmt *q = s->st[ST_EVICT_NEXT];
            sqlite3_bind_int(q, 1, c);
            sqlite3_bind_int64(q, 2, (sqlite3_int64)after);
            rc = sqlite3_step(q);
            if (rc == SQLITE_DONE) {
                sqlite3_reset(q);
                rc = SQLITE_OK;
                break; /* nothing more in this class */
            }
            if (rc != SQLITE_ROW) {
                sqlite3_reset(q);
                break;
            }
            uint64_t first = (uint64_t)sqlite3_column_int64(q, 0);
            sqlite3_reset(q);
            rc = SQLITE_OK;
            after = first;
            if (spool__inflight_find(s, first) != SIZE_MAX)
                continue; /* being sent: the receiver may still commit it */
            int found = 0;
            rc = spool__drop_seg(s, first, "evicted_full", spool_detail_evicted, 1, now, d, &found);
            if (rc == SQLITE_OK)
                rc = spool__pages(s, &pc, &fl);
        }
    }
    if (rc == SQLITE_OK && pc - fl + need <= s->db_budget_pages)
        *fits = 1;
    return rc;
}

/* The lengths of the last stream and content type names seen: the records of one source share
 * the same strings, so each is measured once per run of records. */
struct spool_names {
    const char *stream, *ctype;
    size_t slen, clen;
};

/* The bytes a record adds to a segment before compression (payload, names, framing). */
static size_t spool__rec_bytes(const struct cis_record *r, struct spool_names *nm)
{
    if (r->stream != nm->stream) {
        nm->stream = r->stream;
        nm->slen = r->stream ? strlen(r->stream) : 0;
    }
    if (r->content_type != nm->ctype) {
        nm->ctype = r->content_type;
        nm->clen = r->content_type ? strlen(r->content_type) : 0;
    }
    return r->payload_len + nm->slen + nm->clen + 32;
}

/* Make room for one more element after the N in *ARR (*CAP allocated, SIZE bytes each); the new
 * room is zeroed. Returns 0 or CIS_ENOMEM (*ARR unchanged). Small arrays (a commit's groups and
 * segments): grown as needed rather than sized for one per record. */
static int spool__room(void **arr, size_t n, size_t *cap, size_t size)
{
    if (n < *cap)
        return CIS_OK;
    size_t c = *cap ? *cap * 2 : 4;
    void *p = realloc(*arr, c * size);
    if (!p)
        return CIS_ENOMEM;
    memset((char *)p + *cap * size, 0, (c - *cap) * size);
    *arr = p;
    *cap = c;
    return CIS_OK;
}

int agent_spool_commit(struct agent_spool *s, struct cis_record *recs, const uint32_t *prio,
                       const int64_t *ttl_ms, size_t n)
{
    struct cis_record *work = NULL;
    struct spool_group *grp = NULL;
    struct spool_part *part = NULL;
    size_t *pos = NULL; /* record i's index in work (its seq less base) */
    size_t ngrp = 0, npart = 0, capgrp = 0, cappart = 0;
    void *arr = NULL;
    struct spool_delta d;
    int ret = CIS_OK;
    int in_tx = 0;
    int rc;

    memset(&d, 0, sizeof(d));
    if (n == 0)
        return CIS_OK;
    if (!recs || !prio)
        return CIS_EINVAL;
    for (size_t i = 0; i < n; i++) {
        if (prio[i] >= CIS_PRIO_COUNT || (ttl_ms && ttl_ms[i] < 0))
            return CIS_EINVAL;
    }
    const uint64_t base = s->next_seq;
    if (n > (uint64_t)INT64_MAX - base)
        return CIS_EINVAL; /* seq space exhausted; cannot happen in practice */

    work = malloc(n * sizeof(*work));
    pos = malloc(n * sizeof(*pos));
    if (!work || !pos) {
        ret = CIS_ENOMEM;
        goto out;
    }

    /* Group by (class, ttl) in order of first appearance; pos[i] holds the group for now. The
     * last group matched is tried first: a commit usually holds long runs of one input. */
    size_t hint = 0;
    for (size_t i = 0; i < n; i++) {
        int64_t ttl = ttl_ms ? ttl_ms[i] : 0;
        size_t g = SIZE_MAX;
        if (ngrp && grp[hint].prio == prio[i] && grp[hint].ttl == ttl) {
            g = hint;
        } else {
            for (size_t k = 0; k < ngrp; k++)
                if (grp[k].prio == prio[i] && grp[k].ttl == ttl) {
                    g = k;
                    break;
                }
        }
        if (g == SIZE_MAX) {
            arr = grp;
            ret = spool__room(&arr, ngrp, &capgrp, sizeof(*grp));
            grp = arr;
            if (ret)
                goto out;
            g = ngrp++;
            grp[g].prio = prio[i];
            grp[g].ttl = ttl;
        }
        grp[g].cnt++;
        pos[i] = g;
        hint = g;
    }
    /* High class first, so it gets the lowest seqs; within a class, groups in order of first
     * appearance; records in their order inside a group. */
    size_t at = 0;
    for (uint32_t c = 0; c < CIS_PRIO_COUNT; c++)
        for (size_t g = 0; g < ngrp; g++)
            if (grp[g].prio == c) {
                grp[g].start = at;
                at += grp[g].cnt;
            }
    for (size_t i = 0; i < n; i++) {
        struct spool_group *g = &grp[pos[i]];
        pos[i] = g->start + g->fill++;
        work[pos[i]] = recs[i];
        work[pos[i]].seq = base + pos[i];
    }

    /* Each group is one segment, or several consecutive ones when its records pass seg_max
     * (only when a commit is large next to max_size: eviction then frees space in steps small
     * enough for the size bound) or number more than seg_max_records (a batch takes whole
     * segments). Parts come out in seq order. */
    struct spool_names names = {0};
    for (uint32_t c = 0; c < CIS_PRIO_COUNT; c++)
        for (size_t g = 0; g < ngrp; g++) {
            if (grp[g].prio != c)
                continue;
            size_t bytes = 0;
            for (size_t i = grp[g].start; i < grp[g].start + grp[g].cnt; i++) {
                size_t rb = spool__rec_bytes(&work[i], &names);
                struct spool_part *pt = npart ? &part[npart - 1] : NULL;
                if (!pt || i == grp[g].start || bytes + rb > s->seg_max ||
                    pt->cnt >= s->seg_max_records) {
                    arr = part;
                    ret = spool__room(&arr, npart, &cappart, sizeof(*part));
                    part = arr;
                    if (ret)
                        goto out;
                    pt = &part[npart++];
                    pt->prio = c;
                    pt->ttl = grp[g].ttl;
                    pt->start = i;
                    bytes = 0;
                }
                pt->cnt++;
                bytes += rb;
            }
        }

    /* Encode, compress and seal before taking the write lock: the transaction stays short. */
    uint64_t need = 0, leaf_bytes = 0;
    for (size_t k = 0; k < npart; k++) {
        struct spool_part *pt = &part[k];
        ret = cis_seg_encoder_encode(s->enc, work + pt->start, pt->cnt, pt->prio, &pt->seg,
                                     &pt->data, &pt->len);
        if (ret) {
            cis_error("[spool] commit: encoding %zu records failed (%d)", pt->cnt, ret);
            goto out;
        }
        if (s->seal) {
            uint8_t *sealed = NULL;
            size_t slen = 0;
            ret =
                agent_seal_seal(s->seal, s->epoch, base + pt->start, base + pt->start + pt->cnt - 1,
                                pt->data, pt->len, &sealed, &slen);
            if (ret) {
                cis_error("[spool] commit: sealing a segment failed: %s", cis_strerror(ret));
                goto out;
            }
            free(pt->data);
            pt->data = sealed;
            pt->len = slen;
        }
        need += spool__pages_for(s, pt->len, &leaf_bytes);
    }
    /* Leaf space (plus one page: the last leaf is partly used), and one pointer-map page per
     * page_size / 5 pages (auto-vacuum). */
    need += (leaf_bytes + s->page_size - 1) / s->page_size + 1;
    need += need / (s->page_size / 5) + 1;

    /* The WAL gets every page the transaction dirties: the new pages, plus the b-tree, meta,
     * freelist, pointer-map and ledger pages it touches (more with evictions). */
    ret = spool__wal_room(s, need + need / 8 + 16 + 2 * npart);
    if (ret)
        goto out;

    const int64_t created = spool__now(s);
    rc = spool__begin(s);
    if (rc != SQLITE_OK) {
        ret = spool__fail(s, "commit: begin", rc);
        goto out;
    }
    in_tx = 1;

    if (s->max_size) {
        uint64_t pc = 0, fl = 0;
        rc = spool__pages(s, &pc, &fl);
        if (rc != SQLITE_OK) {
            ret = spool__fail(s, "commit: page count", rc);
            goto out;
        }
        if (pc - fl + need > s->db_budget_pages) {
            int fits = 0;
            if (!s->reject_new && need < s->db_budget_pages) {
                rc = spool__evict(s, need, created, &d, &fits);
                if (rc != SQLITE_OK) {
                    ret = spool__fail(s, "commit: evict", rc);
                    goto out;
                }
            }
            if (!fits) {
                if (!s->full)
                    cis_warn("[spool] full (max_size %llu, when_full %s): refusing new records"
                             " until deliveries free space",
                             (unsigned long long)s->max_size,
                             s->reject_new ? "reject_new"
                                           : "drop_oldest, and nothing more can be evicted");
                s->full = 1;
                ret = CIS_EFULL;
                goto out;
            }
        }
    }

    for (size_t k = 0; k < npart; k++) {
        struct spool_part *pt = &part[k];
        int64_t expires = 0;
        if (pt->ttl > 0)
            expires = pt->ttl > INT64_MAX - created ? INT64_MAX : created + pt->ttl;
        sqlite3_stmt *st = s->st[ST_SEG_INSERT];
        sqlite3_bind_int64(st, 1, (sqlite3_int64)(base + pt->start));
        sqlite3_bind_int64(st, 2, (sqlite3_int64)(base + pt->start + pt->cnt - 1));
        sqlite3_bind_int(st, 3, (int)pt->prio);
        sqlite3_bind_int64(st, 4, (sqlite3_int64)pt->cnt);
        sqlite3_bind_int(st, 5, pt->seg.compression);
        sqlite3_bind_int64(st, 6, (sqlite3_int64)pt->seg.raw_size);
        sqlite3_bind_int64(st, 7, created);
        sqlite3_bind_blob64(st, 8, pt->data, pt->len, SQLITE_STATIC);
        sqlite3_bind_int64(st, 9, expires);
        sqlite3_bind_int(st, 10, s->seal ? 1 : 0);
        sqlite3_bind_int64(st, 11,
                           spool__seg_crc(base + pt->start, base + pt->start + pt->cnt - 1,
                                          (int64_t)pt->prio, (int64_t)pt->cnt,
                                          pt->seg.compression, (int64_t)pt->seg.raw_size,
                                          pt->data, pt->len));
        rc = spool__exec(st);
        sqlite3_clear_bindings(st); /* do not keep a pointer to pt->data */
        if (rc != SQLITE_OK) {
            ret = spool__fail(s, "commit: insert segment", rc);
            goto out;
        }
        d.recs[pt->prio] += (int64_t)pt->cnt;
        d.segs[pt->prio] += 1;
        d.bytes[pt->prio] += (int64_t)pt->len;
    }
    /* next_seq advances in the same transaction as the inserts: seqs are never reused, even
     * after every segment has been deleted and the agent restarted. */
    sqlite3_bind_int64(s->st[ST_SET_NEXT_SEQ], 1, (sqlite3_int64)(base + n));
    rc = spool__exec(s->st[ST_SET_NEXT_SEQ]);
    if (rc == SQLITE_OK && sqlite3_changes(s->db) != 1)
        rc = SQLITE_CORRUPT; /* meta row vanished */
    if (rc != SQLITE_OK) {
        ret = spool__fail(s, "commit: advance next_seq", rc);
        goto out;
    }
    uint64_t min_first = s->min_first_seq;
    int64_t oldest = s->oldest_created_ms;
    if (d.drop_segs)
        rc = spool__read_oldest(s, &min_first, &oldest);
    uint64_t pc = 0, fl = 0;
    if (rc == SQLITE_OK)
        rc = spool__pages(s, &pc, &fl);
    if (rc != SQLITE_OK) {
        ret = spool__fail(s, "commit: read state", rc);
        goto out;
    }
    /* The records are durable (per synchronous) once this COMMIT returns; only then may the
     * caller acknowledge its sources. */
    rc = spool__commit_tx(s);
    if (rc != SQLITE_OK) {
        ret = spool__fail(s, "commit", rc);
        goto out;
    }
    in_tx = 0;

    if (!d.drop_segs && spool__total_segments(s) == 0) {
        min_first = base;
        oldest = created;
    }
    spool__apply(s, &d);
    s->min_first_seq = min_first;
    s->oldest_created_ms = oldest;
    s->page_count = pc;
    s->freelist_count = fl;
    s->next_seq = base + n;
    s->evicted_records += d.drop_recs;
    for (size_t i = 0; i < n; i++)
        recs[i].seq = base + pos[i];

    if (d.drop_segs) {
        if (!s->evicting)
            cis_warn("[spool] full (max_size %llu): evicting oldest low-priority segments;"
                     " recorded in the loss ledger",
                     (unsigned long long)s->max_size);
        s->evicting = 1;
        s->run_segs += d.drop_segs;
        s->run_recs += d.drop_recs;
    } else if (s->evicting && pc - fl <= s->db_budget_pages - s->db_budget_pages / 16) {
        /* Stop only with some headroom, so a spool at the edge does not log every commit. */
        cis_info("[spool] no longer evicting: %llu records in %llu segments were evicted"
                 " (evicted_full in the loss ledger)",
                 (unsigned long long)s->run_recs, (unsigned long long)s->run_segs);
        s->evicting = 0;
        s->run_segs = s->run_recs = 0;
    }
    if (s->full)
        cis_info("[spool] space available again: taking new records");
    s->full = 0;
    if (s->wal_capped)
        cis_info("[spool] the WAL takes commits again");
    s->wal_capped = 0;
    if (s->last_err)
        cis_info("[spool] commits succeed again");
    s->last_err = 0;
    spool__after_tx(s);

out:
    if (in_tx)
        spool__rollback(s);
    /* The disk is full and this commit did not fit in the WAL's room: checkpoint now, which
     * gives the WAL its whole reserved room back for the next transaction, instead of leaving
     * every later one that crosses the same point to fail the same way. */
    if (ret == CIS_ENOSPC && s->wal_frames)
        spool__checkpoint(s, 0);
    for (size_t k = 0; part && k < npart; k++)
        free(part[k].data);
    free(part);
    free(grp);
    free(pos);
    free(work);
    return ret;
}

/* Delete segments that failed authentication (REASON "tampered") or their checksum
 * ("corrupt_spool"), one ledger row each, in one transaction. Best effort: on failure they stay
 * stored and are skipped again next time. */
static void spool__drop_bad(struct agent_spool *s, const uint64_t *firsts, size_t n,
                            const char *reason, const char *detail)
{
    struct spool_delta d;
    memset(&d, 0, sizeof(d));
    const int64_t now = cis_wall_ms();
    uint64_t min_first = 0;
    int64_t oldest = 0;
    int rc = spool__begin(s);
    for (size_t i = 0; rc == SQLITE_OK && i < n; i++) {
        int found = 0;
        rc = spool__drop_seg(s, firsts[i], reason, detail, 0, now, &d, &found);
    }
    if (rc == SQLITE_OK)
        rc = spool__read_oldest(s, &min_first, &oldest);
    if (rc == SQLITE_OK)
        rc = spool__commit_tx(s);
    if (rc != SQLITE_OK) {
        spool__fail(s, "claim: drop damaged segments", rc);
        spool__rollback(s);
        return;
    }
    spool__apply(s, &d);
    s->min_first_seq = min_first;
    s->oldest_created_ms = oldest;
    if (strcmp(reason, "tampered") == 0) {
        s->tampered_records += d.drop_recs;
        cis_error("[spool] %llu sealed segments (%llu records) failed authentication: deleted and"
                  " recorded in the loss ledger as tampered",
                  (unsigned long long)d.drop_segs, (unsigned long long)d.drop_recs);
    } else {
        cis_error("[spool] %llu segments (%llu records) failed their checksum (the spool file was"
                  " damaged): deleted and recorded in the loss ledger as %s",
                  (unsigned long long)d.drop_segs, (unsigned long long)d.drop_recs, reason);
    }
    spool__after_tx(s);
}

/* Append V to the array *ARR (*N used, *CAP allocated), growing it. Returns 0 or CIS_ENOMEM. */
static int spool__push(uint64_t **arr, size_t *n, size_t *cap, uint64_t v)
{
    if (*n == *cap) {
        size_t ncap = *cap ? *cap * 2 : 4;
        uint64_t *p = realloc(*arr, ncap * sizeof(*p));
        if (!p)
            return CIS_ENOMEM;
        *arr = p;
        *cap = ncap;
    }
    (*arr)[(*n)++] = v;
    return CIS_OK;
}

static int spool__claim(struct agent_spool *s, int newest, size_t max_records, size_t max_bytes,
                        struct agent_spool_seg **out, size_t *n);

int agent_spool_claim(struct agent_spool *s, size_t max_records, size_t max_bytes,
                      struct agent_spool_seg **out, size_t *n)
{
    return spool__claim(s, 0, max_records, max_bytes, out, n);
}

int agent_spool_claim_newest(struct agent_spool *s, size_t max_records, size_t max_bytes,
                             struct agent_spool_seg **out, size_t *n)
{
    return spool__claim(s, 1, max_records, max_bytes, out, n);
}

static int spool__claim(struct agent_spool *s, int newest, size_t max_records, size_t max_bytes,
                        struct agent_spool_seg **out, size_t *n)
{
    struct agent_spool_seg *arr = NULL;
    size_t cnt = 0, cap = 0;
    uint64_t *bad = NULL; /* sealed segments that failed authentication */
    size_t nbad = 0, capbad = 0;
    uint64_t *dmg = NULL; /* segments that failed their checksum */
    size_t ndmg = 0, capdmg = 0;
    size_t recs_total = 0, bytes_total = 0;
    sqlite3_stmt *scan = s->st[newest ? ST_CLAIM_SCAN_NEWEST : ST_CLAIM_SCAN];
    sqlite3_stmt *get = s->st[ST_SEG_DATA];
    int ret = CIS_OK;
    int rc;

    *out = NULL;
    *n = 0;
    if (s->ninflight >= spool__total_segments(s))
        return CIS_OK; /* everything stored is already in flight: no I/O */
    const int64_t now = spool__now(s);

    while ((rc = sqlite3_step(scan)) == SQLITE_ROW) {
        uint64_t first = (uint64_t)sqlite3_column_int64(scan, 0);
        if (spool__inflight_find(s, first) != SIZE_MAX)
            continue;
        uint64_t last = (uint64_t)sqlite3_column_int64(scan, 1);
        int64_t prio = sqlite3_column_int64(scan, 2);
        int64_t rcount = sqlite3_column_int64(scan, 3);
        int64_t dlen = sqlite3_column_int64(scan, 7);
        if (last < first || rcount <= 0 || (uint64_t)rcount != last - first + 1 || prio < 0 ||
            prio >= CIS_PRIO_COUNT || dlen < 0) {
            cis_error("[spool] claim: segment %llu has inconsistent metadata",
                      (unsigned long long)first);
            ret = CIS_ECORRUPT;
            goto out;
        }
        if (cnt > 0 && (recs_total >= max_records || (size_t)rcount > max_records - recs_total ||
                        bytes_total >= max_bytes || (size_t)dlen > max_bytes - bytes_total))
            break; /* never skip ahead: order is oldest (or newest) first within a class */

        sqlite3_bind_int64(get, 1, (sqlite3_int64)first);
        rc = sqlite3_step(get);
        if (rc != SQLITE_ROW) {
            sqlite3_reset(get);
            ret = rc == SQLITE_DONE ? CIS_ECORRUPT : spool__fail(s, "claim: read segment", rc);
            goto out;
        }
        int64_t expires = sqlite3_column_int64(get, 1);
        int sealed = sqlite3_column_int(get, 2);
        int64_t crc = sqlite3_column_int64(get, 3);
        if (expires != 0 && expires <= now) {
            /* Left for agent_spool_expire(), which ledgers it. */
            sqlite3_reset(get);
            continue;
        }
        size_t blen = (size_t)sqlite3_column_bytes(get, 0);
        const uint8_t *blob = sqlite3_column_blob(get, 0);
        uint8_t *data = NULL;
        size_t len = 0;
        /* A sealed blob is authenticated below (a change to it is "tampered", as before the
         * checksum existed); the checksum still covers the row's other fields. */
        int damaged = crc != 0 && crc != spool__seg_crc(first, last, prio, rcount,
                                                        sqlite3_column_int64(scan, 4),
                                                        sqlite3_column_int64(scan, 5), blob, blen);
        if (damaged && !sealed) {
            sqlite3_reset(get);
            ret = spool__push(&dmg, &ndmg, &capdmg, first);
            if (ret)
                goto out;
            continue;
        }
        if (sealed) {
            if (!s->seal) {
                /* open refuses a spool with sealed segments and no key: only an outside write
                 * gets here */
                sqlite3_reset(get);
                cis_error("[spool] claim: segment %llu is sealed and no key is configured",
                          (unsigned long long)first);
                ret = CIS_ECORRUPT;
                goto out;
            }
            ret = agent_seal_open(s->seal, s->epoch, first, last, blob, blen, &data, &len);
            sqlite3_reset(get);
            if (ret == CIS_ETAMPERED) {
                ret = CIS_OK;
                if (nbad == capbad) {
                    size_t ncap = capbad ? capbad * 2 : 4;
                    uint64_t *p = realloc(bad, ncap * sizeof(*p));
                    if (!p) {
                        ret = CIS_ENOMEM;
                        goto out;
                    }
                    bad = p;
                    capbad = ncap;
                }
                bad[nbad++] = first;
                continue;
            }
            if (ret)
                goto out;
            if (damaged) {
                free(data);
                ret = spool__push(&dmg, &ndmg, &capdmg, first);
                if (ret)
                    goto out;
                continue;
            }
        } else {
            data = malloc(blen ? blen : 1);
            if (!data) {
                sqlite3_reset(get);
                ret = CIS_ENOMEM;
                goto out;
            }
            if (blen)
                memcpy(data, blob, blen);
            len = blen;
            sqlite3_reset(get);
        }

        if (cnt == cap) {
            size_t ncap = cap ? cap * 2 : 8;
            struct agent_spool_seg *p = realloc(arr, ncap * sizeof(*p));
            if (!p) {
                free(data);
                ret = CIS_ENOMEM;
                goto out;
            }
            arr = p;
            cap = ncap;
        }
        struct agent_spool_seg *g = &arr[cnt];
        memset(g, 0, sizeof(*g));
        g->seg.first_seq = first;
        g->seg.last_seq = last;
        g->seg.record_count = (uint32_t)rcount;
        g->seg.priority = (uint32_t)prio;
        g->seg.compression = sqlite3_column_int(scan, 4);
        g->seg.raw_size = (uint64_t)sqlite3_column_int64(scan, 5);
        g->created_ms = sqlite3_column_int64(scan, 6);
        g->data = data;
        g->seg.data = data;
        g->seg.data_len = len;
        cnt++;
        recs_total += (size_t)rcount;
        bytes_total += (size_t)dlen;
    }
    if (rc != SQLITE_ROW && rc != SQLITE_DONE) {
        ret = spool__fail(s, "claim: scan", rc);
        goto out;
    }
    sqlite3_reset(scan); /* end the read before the write below */
    if (nbad)
        spool__drop_bad(s, bad, nbad, "tampered", spool_detail_tampered);
    if (ndmg)
        spool__drop_bad(s, dmg, ndmg, "corrupt_spool", spool_detail_checksum);
    if (cnt) {
        ret = spool__durable(s); /* before any of them can reach the receiver */
        if (ret)
            goto out;
    }

    ret = spool__inflight_reserve(s, cnt);
    if (ret)
        goto out;
    for (size_t i = 0; i < cnt; i++)
        s->inflight[s->ninflight++] = arr[i].seg.first_seq;
    *out = cnt ? arr : NULL;
    *n = cnt;
    if (!cnt)
        free(arr);
    arr = NULL;
    cnt = 0;

out:
    sqlite3_reset(scan);
    free(bad);
    free(dmg);
    agent_spool_segs_free(arr, cnt);
    return ret;
}

void agent_spool_segs_free(struct agent_spool_seg *segs, size_t n)
{
    if (!segs)
        return;
    for (size_t i = 0; i < n; i++)
        free(segs[i].data);
    free(segs);
}

/* Delete these segments in one transaction; with REASON set, write a ledger row for each first,
 * in the same transaction, so a dropped range is always accounted for. */
static int spool__remove(struct agent_spool *s, const uint64_t *first_seqs, size_t n,
                         const char *reason, const char *detail, const char *what)
{
    struct spool_delta d;
    uint64_t min_first = 0;
    int64_t oldest = 0;
    int ret = CIS_OK;
    int rc;

    memset(&d, 0, sizeof(d));
    if (n == 0)
        return CIS_OK;
    if (!first_seqs)
        return CIS_EINVAL;
    const int64_t now = cis_wall_ms();

    rc = spool__begin(s);
    if (rc != SQLITE_OK)
        return spool__fail(s, what, rc);

    for (size_t i = 0; i < n; i++) {
        int found = 0; /* not found: already gone, a repeated ack */
        rc = spool__drop_seg(s, first_seqs[i], reason, detail, 0, now, &d, &found);
        if (rc != SQLITE_OK) {
            ret = spool__fail(s, what, rc);
            goto out;
        }
    }

    rc = spool__read_oldest(s, &min_first, &oldest);
    uint64_t pc = 0, fl = 0;
    if (rc == SQLITE_OK)
        rc = spool__pages(s, &pc, &fl);
    if (rc != SQLITE_OK) {
        ret = spool__fail(s, what, rc);
        goto out;
    }

    rc = spool__commit_tx(s);
    if (rc != SQLITE_OK) {
        ret = spool__fail(s, what, rc);
        goto out;
    }

    for (size_t i = 0; i < n; i++)
        spool__inflight_remove(s, first_seqs[i]);
    spool__apply(s, &d);
    s->min_first_seq = min_first;
    s->oldest_created_ms = oldest;
    s->page_count = pc;
    s->freelist_count = fl;
    if (d.ledger_rows)
        cis_warn("[spool] %llu segments (%llu records) %s: %s", (unsigned long long)d.drop_segs,
                 (unsigned long long)d.drop_recs, reason, detail ? detail : "");
    s->last_err = 0;
    spool__after_tx(s);
    return CIS_OK;

out:
    spool__rollback(s);
    return ret;
}

int agent_spool_ack(struct agent_spool *s, const uint64_t *first_seqs, size_t n)
{
    /* The caller's contract: the receiver has acknowledged a *committed* store that holds these
     * segments; only then may they be deleted. */
    return spool__remove(s, first_seqs, n, NULL, NULL, "ack");
}

void agent_spool_release(struct agent_spool *s, const uint64_t *first_seqs, size_t n)
{
    for (size_t i = 0; first_seqs && i < n; i++)
        spool__inflight_remove(s, first_seqs[i]);
}

int agent_spool_reject(struct agent_spool *s, const uint64_t *first_seqs, size_t n,
                       const char *detail)
{
    return spool__remove(s, first_seqs, n, "rejected", detail, "reject");
}

static int spool__cmp_u64(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

int agent_spool_expire(struct agent_spool *s, int64_t now_wall_ms, uint64_t *dropped)
{
    uint64_t *due = NULL;
    size_t ndue = 0, cap = 0;
    struct spool_delta d;
    uint64_t min_first = 0;
    int64_t oldest = 0;
    sqlite3_stmt *q = s->st[ST_EXPIRE_DUE];
    int ret = CIS_OK;
    int rc;

    memset(&d, 0, sizeof(d));
    if (dropped)
        *dropped = 0;
    if (spool__total_segments(s) == 0)
        return CIS_OK;

    /* A read on the partial index; nothing is written unless something is due. The caller's
     * time is taken relative to the wall clock's now, on the TTL clock (see the top of the
     * file): the agent passes the wall clock itself. */
    sqlite3_bind_int64(q, 1, spool__now(s) + (now_wall_ms - cis_wall_ms()));
    while ((rc = sqlite3_step(q)) == SQLITE_ROW) {
        uint64_t first = (uint64_t)sqlite3_column_int64(q, 0);
        if (spool__inflight_find(s, first) != SIZE_MAX)
            continue; /* being sent; expired on a later sweep if it comes back */
        if (ndue == cap) {
            size_t ncap = cap ? cap * 2 : 16;
            uint64_t *p = realloc(due, ncap * sizeof(*p));
            if (!p) {
                sqlite3_reset(q);
                free(due);
                return CIS_ENOMEM;
            }
            due = p;
            cap = ncap;
        }
        due[ndue++] = first;
    }
    sqlite3_reset(q);
    if (rc != SQLITE_DONE) {
        free(due);
        return spool__fail(s, "expire: scan", rc);
    }
    if (ndue == 0)
        return CIS_OK;
    /* In seq order, so adjacent ranges coalesce into one ledger row. */
    qsort(due, ndue, sizeof(*due), spool__cmp_u64);

    const int64_t now = cis_wall_ms();
    rc = spool__begin(s);
    if (rc != SQLITE_OK) {
        free(due);
        return spool__fail(s, "expire", rc);
    }
    for (size_t i = 0; i < ndue; i++) {
        int found = 0;
        rc = spool__drop_seg(s, due[i], "expired_ttl", spool_detail_expired, 1, now, &d, &found);
        if (rc != SQLITE_OK)
            break;
    }
    if (rc == SQLITE_OK)
        rc = spool__read_oldest(s, &min_first, &oldest);
    uint64_t pc = 0, fl = 0;
    if (rc == SQLITE_OK)
        rc = spool__pages(s, &pc, &fl);
    if (rc == SQLITE_OK)
        rc = spool__commit_tx(s);
    if (rc != SQLITE_OK) {
        ret = spool__fail(s, "expire", rc);
        spool__rollback(s);
        free(due);
        return ret;
    }
    free(due);
    spool__apply(s, &d);
    s->min_first_seq = min_first;
    s->oldest_created_ms = oldest;
    s->page_count = pc;
    s->freelist_count = fl;
    s->expired_records += d.drop_recs;
    if (dropped)
        *dropped = d.drop_recs;
    cis_info("[spool] %llu records in %llu segments expired (TTL); recorded in the loss ledger",
             (unsigned long long)d.drop_recs, (unsigned long long)d.drop_segs);
    s->last_err = 0;
    spool__after_tx(s);
    return CIS_OK;
}

int agent_spool_ledger_add(struct agent_spool *s, const char *reason, uint64_t epoch,
                           uint64_t first_seq, uint64_t last_seq, uint64_t count,
                           const char *detail)
{
    struct spool_delta d;
    memset(&d, 0, sizeof(d));
    if (!reason || !reason[0] || first_seq > (uint64_t)INT64_MAX ||
        last_seq > (uint64_t)INT64_MAX || count > (uint64_t)INT64_MAX ||
        epoch > (uint64_t)INT64_MAX)
        return CIS_EINVAL;
    int rc = spool__begin(s);
    if (rc != SQLITE_OK)
        return spool__fail(s, "ledger add", rc);
    rc = spool__ledger_put(s, reason, epoch, first_seq, last_seq, count, cis_wall_ms(), detail, 0,
                           &d);
    if (rc == SQLITE_OK)
        rc = spool__commit_tx(s);
    if (rc != SQLITE_OK) {
        int ret = spool__fail(s, "ledger add", rc);
        spool__rollback(s);
        return ret;
    }
    spool__apply(s, &d);
    s->last_err = 0;
    spool__after_tx(s);
    return CIS_OK;
}

static char *spool__dup_col(sqlite3_stmt *st, int col)
{
    const char *t = (const char *)sqlite3_column_text(st, col);
    return strdup(t ? t : "");
}

int agent_spool_ledger_unsent(struct agent_spool *s, size_t max, Cistern__V1__LossEntry **out,
                              size_t *n)
{
    Cistern__V1__LossEntry *arr = NULL;
    size_t cnt = 0, cap = 0;
    sqlite3_stmt *st = s->st[ST_LEDGER_UNSENT];
    int ret = CIS_OK;
    int rc;

    *out = NULL;
    *n = 0;
    if (max == 0)
        return CIS_OK;
    sqlite3_bind_int64(st, 1, max > (size_t)INT64_MAX ? INT64_MAX : (sqlite3_int64)max);
    while ((rc = sqlite3_step(st)) == SQLITE_ROW) {
        if (cnt == cap) {
            size_t ncap = cap ? cap * 2 : 8;
            Cistern__V1__LossEntry *p = realloc(arr, ncap * sizeof(*p));
            if (!p) {
                ret = CIS_ENOMEM;
                goto out;
            }
            arr = p;
            cap = ncap;
        }
        Cistern__V1__LossEntry *e = &arr[cnt];
        cistern__v1__loss_entry__init(e);
        e->id = (uint64_t)sqlite3_column_int64(st, 0);
        e->epoch = (uint64_t)sqlite3_column_int64(st, 2);
        e->first_seq = (uint64_t)sqlite3_column_int64(st, 3);
        e->last_seq = (uint64_t)sqlite3_column_int64(st, 4);
        e->count = (uint64_t)sqlite3_column_int64(st, 5);
        e->ts_ms = sqlite3_column_int64(st, 6);
        e->reason = spool__dup_col(st, 1);
        e->detail = spool__dup_col(st, 7);
        cnt++; /* counted before the check, so ledger_free() releases a half-filled entry */
        if (!e->reason || !e->detail) {
            ret = CIS_ENOMEM;
            goto out;
        }
    }
    if (rc != SQLITE_DONE) {
        ret = spool__fail(s, "ledger", rc);
        goto out;
    }
    if (cnt) {
        sqlite3_reset(st);
        ret = spool__durable(s); /* a drop the receiver hears of is one no power cut undoes */
        if (ret)
            goto out;
    }
    /* These rows may now travel in a batch: never extend them (see ledger_handed_id). */
    for (size_t i = 0; i < cnt; i++)
        if (arr[i].id > s->ledger_handed_id)
            s->ledger_handed_id = arr[i].id;
    *out = arr;
    *n = cnt;
    if (!cnt) {
        free(arr);
        *out = NULL;
    }
    arr = NULL;
    cnt = 0;

out:
    sqlite3_reset(st);
    agent_spool_ledger_free(arr, cnt);
    return ret;
}

void agent_spool_ledger_free(Cistern__V1__LossEntry *e, size_t n)
{
    if (!e)
        return;
    for (size_t i = 0; i < n; i++) {
        /* free(NULL) is fine; the shared empty string of protobuf-c is never ours. */
        if (e[i].reason != protobuf_c_empty_string)
            free(e[i].reason);
        if (e[i].detail != protobuf_c_empty_string)
            free(e[i].detail);
    }
    free(e);
}

int agent_spool_ledger_mark_sent(struct agent_spool *s, const uint64_t *ids, size_t n)
{
    uint64_t changed = 0;
    int ret = CIS_OK;
    int rc;

    if (n == 0)
        return CIS_OK;
    if (!ids)
        return CIS_EINVAL;
    rc = spool__begin(s);
    if (rc != SQLITE_OK)
        return spool__fail(s, "ledger mark sent", rc);
    for (size_t i = 0; i < n; i++) {
        sqlite3_bind_int64(s->st[ST_LEDGER_MARK], 1, (sqlite3_int64)ids[i]);
        rc = spool__exec(s->st[ST_LEDGER_MARK]);
        if (rc != SQLITE_OK) {
            ret = spool__fail(s, "ledger mark sent", rc);
            goto out;
        }
        changed += (uint64_t)sqlite3_changes(s->db);
    }
    rc = spool__commit_tx(s);
    if (rc != SQLITE_OK) {
        ret = spool__fail(s, "ledger mark sent", rc);
        goto out;
    }
    s->ledger_unsent = s->ledger_unsent >= changed ? s->ledger_unsent - changed : 0;
    s->last_err = 0;
    spool__after_tx(s);
    return CIS_OK;

out:
    spool__rollback(s);
    return ret;
}

void agent_spool_stats(const struct agent_spool *s, struct agent_spool_stats *st)
{
    memset(st, 0, sizeof(*st));
    for (int c = 0; c < CIS_PRIO_COUNT; c++) {
        st->prio[c] = s->cls[c];
        st->pending_records += s->cls[c].records;
        st->pending_segments += s->cls[c].segments;
    }
    st->db_bytes = s->page_count * s->page_size;
    st->wal_bytes =
        spool__wal_bytes_for(s, s->wal_hwm > s->wal_frames ? s->wal_hwm : s->wal_frames);
    st->evicted_records = s->evicted_records;
    st->expired_records = s->expired_records;
    st->tampered_records = s->tampered_records;
    st->full = s->full;
    st->inflight_segments = s->ninflight;
    st->next_seq = s->next_seq;
    st->ledger_unsent = s->ledger_unsent;
    st->oldest_created_ms = st->pending_segments ? s->oldest_created_ms : 0;
}

void agent_spool_salvage_info(const struct agent_spool *s, struct agent_spool_salvage *out)
{
    memset(out, 0, sizeof(*out));
    if (!s)
        return;
    out->epoch = s->epoch;
    out->next_seq = s->next_seq;
    out->min_pending_seq = spool__total_segments(s) ? s->min_first_seq : 0;
}

void agent_spool_release_memory(struct agent_spool *s)
{
    if (!s)
        return;
    cis_seg_encoder_trim(s->enc);
    if (s->db)
        sqlite3_db_release_memory(s->db); /* unpinned pages of its cache; they reload as read */
}
