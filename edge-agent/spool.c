/* The agent's SQLite segment spool: schema, group commit, claim/ack/release/reject, loss ledger.
 *
 * Durability model:
 * - Records enter only through agent_spool_commit(): one BEGIN IMMEDIATE ... COMMIT that inserts
 *   one segment row per priority class AND advances meta.next_seq. Because both happen in the
 *   same transaction, a crash can never leave stored records whose seqs a later commit reuses,
 *   nor skip-and-reuse a range. Sources are told "accepted" only after this returns 0.
 * - Segments are deleted only by agent_spool_ack() (the receiver committed them) or
 *   agent_spool_reject() (which writes the ledger row in the same transaction as the delete,
 *   so no drop is ever unaccounted for).
 * - In-flight state lives IN MEMORY only (a small set of first_seqs), never in the database:
 *   claim and release cost zero writes (flash wear), and after a restart every stored segment is
 *   pending again, which is exactly the "in-flight back to pending at start-up" rule.
 * - Counters for stats are computed once at open with one query and then maintained on
 *   commit/ack/reject, so stats never touch the disk.
 */
#include "spool.h"

#include <errno.h>
#include <libgen.h>
#include <sqlite3.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <sys/stat.h>

#include "cistern/backoff.h"
#include "cistern/err.h"
#include "cistern/log.h"

#define SPOOL_BUSY_TIMEOUT_MS 5000
/* Cap the WAL file left on disk after a checkpoint (wal_autocheckpoint keeps its default). */
#define SPOOL_JOURNAL_SIZE_LIMIT (64LL * 1024 * 1024)

enum {
    ST_BEGIN,
    ST_COMMIT,
    ST_ROLLBACK,
    ST_SEG_INSERT,
    ST_SET_NEXT_SEQ,
    ST_CLAIM_SCAN,
    ST_SEG_DATA,
    ST_SEG_INFO,
    ST_SEG_DELETE,
    ST_OLDEST,
    ST_LEDGER_INSERT,
    ST_LEDGER_UNSENT,
    ST_LEDGER_MARK,
    ST_COUNT
};

static const char *const spool_sql[ST_COUNT] = {
    [ST_BEGIN] = "BEGIN IMMEDIATE",
    [ST_COMMIT] = "COMMIT",
    [ST_ROLLBACK] = "ROLLBACK",
    [ST_SEG_INSERT] = "INSERT INTO segments(first_seq, last_seq, priority, record_count, "
                      "compression, raw_size, created_ms, data) VALUES(?,?,?,?,?,?,?,?)",
    [ST_SET_NEXT_SEQ] = "UPDATE meta SET value = ? WHERE key = 'next_seq'",
    /* length(data) does not load the blob, so in-flight rows are skipped cheaply;
     * the blob of a taken segment is read by ST_SEG_DATA. Uses index segments_prio. */
    [ST_CLAIM_SCAN] = "SELECT first_seq, last_seq, priority, record_count, compression, raw_size, "
                      "created_ms, length(data) FROM segments ORDER BY priority, first_seq",
    [ST_SEG_DATA] = "SELECT data FROM segments WHERE first_seq = ?",
    [ST_SEG_INFO] = "SELECT last_seq, record_count FROM segments WHERE first_seq = ?",
    [ST_SEG_DELETE] = "DELETE FROM segments WHERE first_seq = ?",
    [ST_OLDEST] = "SELECT created_ms FROM segments ORDER BY first_seq LIMIT 1",
    [ST_LEDGER_INSERT] = "INSERT INTO ledger(reason, epoch, first_seq, last_seq, count, ts_ms, "
                         "detail) VALUES(?,?,?,?,?,?,?)",
    [ST_LEDGER_UNSENT] = "SELECT id, reason, epoch, first_seq, last_seq, count, ts_ms, detail "
                         "FROM ledger WHERE sent = 0 ORDER BY id LIMIT ?",
    [ST_LEDGER_MARK] = "UPDATE ledger SET sent = 1 WHERE id = ? AND sent = 0",
};

static const char spool_schema_sql[] =
    "CREATE TABLE meta(key TEXT PRIMARY KEY, value INTEGER NOT NULL);"
    "CREATE TABLE segments(first_seq INTEGER PRIMARY KEY, last_seq INTEGER NOT NULL,"
    " priority INTEGER NOT NULL, record_count INTEGER NOT NULL, compression INTEGER NOT NULL,"
    " raw_size INTEGER NOT NULL, created_ms INTEGER NOT NULL, data BLOB NOT NULL);"
    "CREATE INDEX segments_prio ON segments(priority, first_seq);"
    "CREATE TABLE ledger(id INTEGER PRIMARY KEY, reason TEXT NOT NULL, epoch INTEGER NOT NULL,"
    " first_seq INTEGER NOT NULL, last_seq INTEGER NOT NULL, count INTEGER NOT NULL,"
    " ts_ms INTEGER NOT NULL, detail TEXT, sent INTEGER NOT NULL DEFAULT 0);";

struct agent_spool {
    sqlite3 *db;
    char *path;
    sqlite3_stmt *st[ST_COUNT];
    uint64_t epoch;
    uint64_t next_seq;
    int zstd_level;
    /* In-flight first_seqs: memory only (see the top of the file). Small: the forwarder's
     * window. */
    uint64_t *inflight;
    size_t ninflight, capinflight;
    /* Counters, maintained in memory. */
    uint64_t pending_records, pending_segments, ledger_unsent;
    int64_t oldest_created_ms;
    int last_err; /* last error logged, so a repeating failure is logged once */
};

/* ---- helpers ---- */

static void spool__set_err(char *err, size_t errlen, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

static void spool__set_err(char *err, size_t errlen, const char *fmt, ...)
{
    va_list ap;
    if (!err || errlen == 0)
        return;
    va_start(ap, fmt);
    vsnprintf(err, errlen, fmt, ap);
    va_end(ap);
}

/* Map a failed SQLite result code to a CIS_E* code (never CIS_OK: a "success" code met where a
 * row or completion was expected is a database error too). */
static int spool__map(int rc)
{
    switch (rc & 0xff) {
    case SQLITE_FULL:
        return CIS_EFULL;
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
    if (code != s->last_err)
        cis_error("[spool] %s: %s (sqlite %d)", what, sqlite3_errmsg(s->db),
                  sqlite3_extended_errcode(s->db));
    else
        cis_debug("[spool] %s: %s (again)", what, sqlite3_errmsg(s->db));
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

/* A random non-zero 63-bit epoch (top bit clear: a positive SQLite INTEGER). */
static int spool__random_epoch(uint64_t *out)
{
    uint64_t v = 0;
    do {
        uint8_t *p = (uint8_t *)&v;
        size_t got = 0;
        while (got < sizeof(v)) {
            ssize_t r = getrandom(p + got, sizeof(v) - got, 0);
            if (r < 0) {
                if (errno == EINTR)
                    continue;
                return CIS_EIO;
            }
            got += (size_t)r;
        }
        v &= (uint64_t)INT64_MAX;
    } while (v == 0);
    *out = v;
    return CIS_OK;
}

static int spool__pragma(struct agent_spool *s, const char *sql, char *err, size_t errlen)
{
    int rc = sqlite3_exec(s->db, sql, NULL, NULL, NULL);
    if (rc != SQLITE_OK)
        spool__set_err(err, errlen, "%s: %s: %s", s->path, sql, sqlite3_errmsg(s->db));
    return rc;
}

/* Create the schema, or check an existing one, and load meta and the counters, in one
 * transaction. */
static int spool__init_db(struct agent_spool *s, char *err, size_t errlen)
{
    sqlite3_stmt *st = NULL;
    int64_t v = 0;
    int created = 0;
    int ret = CIS_OK;

    int rc = sqlite3_exec(s->db, "BEGIN IMMEDIATE", NULL, NULL, NULL);
    if (rc != SQLITE_OK) {
        spool__set_err(err, errlen, "%s: begin: %s", s->path, sqlite3_errmsg(s->db));
        return spool__map(rc);
    }

    rc = sqlite3_prepare_v2(
        s->db, "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = 'meta'", -1, &st,
        NULL);
    if (rc == SQLITE_OK)
        rc = sqlite3_step(st);
    if (rc != SQLITE_ROW) {
        spool__set_err(err, errlen, "%s: %s", s->path, sqlite3_errmsg(s->db));
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
            spool__set_err(err, errlen, "%s: getrandom: %s", s->path, strerror(errno));
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
            spool__set_err(err, errlen, "%s: create schema: %s", s->path, sqlite3_errmsg(s->db));
            ret = spool__map(rc);
            goto out;
        }
        s->next_seq = 1;
        created = 1;
    } else {
        rc = spool__meta_get(s->db, "schema_version", &v);
        if (rc != SQLITE_OK) {
            spool__set_err(err, errlen, "%s: no schema_version in meta: %s", s->path,
                           rc == SQLITE_NOTFOUND ? "missing" : sqlite3_errmsg(s->db));
            ret = rc == SQLITE_NOTFOUND ? CIS_ECORRUPT : spool__map(rc);
            goto out;
        }
        if (v > AGENT_SPOOL_SCHEMA_VERSION) {
            spool__set_err(err, errlen,
                           "%s: spool schema_version %lld is newer than this agent supports (%d);"
                           " upgrade the agent or move the file aside",
                           s->path, (long long)v, AGENT_SPOOL_SCHEMA_VERSION);
            ret = CIS_EDB;
            goto out;
        }
        if (v < 1) {
            spool__set_err(err, errlen, "%s: bad schema_version %lld", s->path, (long long)v);
            ret = CIS_ECORRUPT;
            goto out;
        }
        rc = spool__meta_get(s->db, "epoch", &v);
        if (rc != SQLITE_OK || v <= 0) {
            spool__set_err(err, errlen, "%s: meta epoch missing or invalid", s->path);
            ret = rc == SQLITE_OK || rc == SQLITE_NOTFOUND ? CIS_ECORRUPT : spool__map(rc);
            goto out;
        }
        s->epoch = (uint64_t)v;
        rc = spool__meta_get(s->db, "next_seq", &v);
        if (rc != SQLITE_OK || v <= 0) {
            spool__set_err(err, errlen, "%s: meta next_seq missing or invalid", s->path);
            ret = rc == SQLITE_OK || rc == SQLITE_NOTFOUND ? CIS_ECORRUPT : spool__map(rc);
            goto out;
        }
        s->next_seq = (uint64_t)v;
    }

    /* The counters, once. Segments do not overlap, so the row with the highest first_seq has the
     * highest last_seq: it must lie below next_seq, or seqs could be reused. */
    rc = sqlite3_prepare_v2(s->db,
                            "SELECT (SELECT count(*) FROM segments),"
                            " (SELECT coalesce(sum(record_count), 0) FROM segments),"
                            " (SELECT created_ms FROM segments ORDER BY first_seq LIMIT 1),"
                            " (SELECT last_seq FROM segments ORDER BY first_seq DESC LIMIT 1),"
                            " (SELECT count(*) FROM ledger WHERE sent = 0)",
                            -1, &st, NULL);
    if (rc == SQLITE_OK)
        rc = sqlite3_step(st);
    if (rc != SQLITE_ROW) {
        spool__set_err(err, errlen, "%s: read counters: %s", s->path, sqlite3_errmsg(s->db));
        ret = spool__map(rc);
        goto out;
    }
    s->pending_segments = (uint64_t)sqlite3_column_int64(st, 0);
    s->pending_records = (uint64_t)sqlite3_column_int64(st, 1);
    s->oldest_created_ms = sqlite3_column_int64(st, 2);
    int64_t max_last = sqlite3_column_int64(st, 3);
    s->ledger_unsent = (uint64_t)sqlite3_column_int64(st, 4);
    if (max_last >= 0 && (uint64_t)max_last >= s->next_seq) {
        spool__set_err(err, errlen, "%s: meta next_seq %llu is not above stored seq %lld", s->path,
                       (unsigned long long)s->next_seq, (long long)max_last);
        ret = CIS_ECORRUPT;
        goto out;
    }
    sqlite3_finalize(st);
    st = NULL;

    rc = sqlite3_exec(s->db, "COMMIT", NULL, NULL, NULL);
    if (rc != SQLITE_OK) {
        spool__set_err(err, errlen, "%s: commit: %s", s->path, sqlite3_errmsg(s->db));
        ret = spool__map(rc);
        goto out;
    }
    if (created)
        cis_info("[spool] created %s", s->path);

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
        spool__set_err(err, errlen, "spool: no path given");
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
        spool__set_err(err, errlen, "%s: spool directory %s does not exist", o->path, d);
        ret = CIS_ENOTFOUND;
        goto out;
    }

    s = calloc(1, sizeof(*s));
    if (!s || !(s->path = strdup(o->path))) {
        spool__set_err(err, errlen, "%s: out of memory", o->path);
        ret = CIS_ENOMEM;
        goto out;
    }
    s->zstd_level = o->zstd_level;

    /* NOMUTEX: one connection used by one thread (the agent's event loop). */
    rc = sqlite3_open_v2(o->path, &s->db,
                         SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE | SQLITE_OPEN_NOMUTEX, NULL);
    if (rc != SQLITE_OK) {
        spool__set_err(err, errlen, "%s: open: %s", o->path,
                       s->db ? sqlite3_errmsg(s->db) : sqlite3_errstr(rc));
        ret = spool__map(rc);
        goto out;
    }
    sqlite3_extended_result_codes(s->db, 1);
    /* An external reader (tests, `status`) must not make our writes fail. */
    sqlite3_busy_timeout(s->db, SPOOL_BUSY_TIMEOUT_MS);

    /* WAL: a commit appends to the WAL instead of rewriting pages twice (fewer flash writes),
     * and readers do not block the writer. This is the first statement that reads the file, so
     * a file that is not a database fails here with SQLITE_NOTADB -> CIS_ECORRUPT. */
    {
        sqlite3_stmt *st = NULL;
        rc = sqlite3_prepare_v2(s->db, "PRAGMA journal_mode=WAL", -1, &st, NULL);
        if (rc == SQLITE_OK)
            rc = sqlite3_step(st);
        if (rc != SQLITE_ROW) {
            spool__set_err(err, errlen, "%s: journal_mode=WAL: %s", o->path, sqlite3_errmsg(s->db));
            sqlite3_finalize(st);
            ret = spool__map(rc);
            goto out;
        }
        const char *mode = (const char *)sqlite3_column_text(st, 0);
        int is_wal = mode && strcmp(mode, "wal") == 0;
        if (!is_wal)
            spool__set_err(err, errlen, "%s: cannot use WAL (journal_mode is %s)", o->path,
                           mode ? mode : "?");
        sqlite3_finalize(st);
        if (!is_wal) {
            ret = CIS_EDB;
            goto out;
        }
    }
    /* synchronous=FULL fsyncs the WAL at every commit: a returned commit survives power loss.
     * NORMAL fsyncs only at checkpoints: a power cut can undo the last commits (never corrupt
     * the file); chosen where flash wear matters more, per opts->sync_full. */
    rc = spool__pragma(s, o->sync_full ? "PRAGMA synchronous=FULL" : "PRAGMA synchronous=NORMAL",
                       err, errlen);
    if (rc == SQLITE_OK) {
        char sql[64];
        snprintf(sql, sizeof(sql), "PRAGMA journal_size_limit=%lld", SPOOL_JOURNAL_SIZE_LIMIT);
        rc = spool__pragma(s, sql, err, errlen);
    }
    if (rc != SQLITE_OK) {
        ret = spool__map(rc);
        goto out;
    }

    ret = spool__init_db(s, err, errlen);
    if (ret)
        goto out;

    for (int i = 0; i < ST_COUNT; i++) {
        rc =
            sqlite3_prepare_v3(s->db, spool_sql[i], -1, SQLITE_PREPARE_PERSISTENT, &s->st[i], NULL);
        if (rc != SQLITE_OK) {
            spool__set_err(err, errlen, "%s: prepare: %s", o->path, sqlite3_errmsg(s->db));
            ret = spool__map(rc);
            goto out;
        }
    }

    cis_info("[spool] opened %s epoch=%llu next_seq=%llu pending=%llu records in %llu segments",
             s->path, (unsigned long long)s->epoch, (unsigned long long)s->next_seq,
             (unsigned long long)s->pending_records, (unsigned long long)s->pending_segments);
    *out = s;
    s = NULL;

out:
    if (ret == CIS_ENOMEM)
        spool__set_err(err, errlen, "%s: out of memory", o->path);
    free(dir);
    agent_spool_close(s);
    return ret;
}

void agent_spool_close(struct agent_spool *s)
{
    if (!s)
        return;
    for (int i = 0; i < ST_COUNT; i++)
        sqlite3_finalize(s->st[i]);
    if (s->db)
        sqlite3_close(s->db);
    free(s->inflight);
    free(s->path);
    free(s);
}

uint64_t agent_spool_epoch(const struct agent_spool *s)
{
    return s->epoch;
}

int agent_spool_commit(struct agent_spool *s, struct cis_record *recs, const uint32_t *prio,
                       size_t n)
{
    struct cis_record *work = NULL;
    struct cis_segment seg[CIS_PRIO_COUNT];
    uint8_t *data[CIS_PRIO_COUNT] = {NULL};
    size_t len[CIS_PRIO_COUNT] = {0};
    size_t cnt[CIS_PRIO_COUNT] = {0}, start[CIS_PRIO_COUNT], off[CIS_PRIO_COUNT];
    int ret = CIS_OK;
    int in_tx = 0;
    int rc;

    if (n == 0)
        return CIS_OK;
    if (!recs || !prio)
        return CIS_EINVAL;
    for (size_t i = 0; i < n; i++) {
        if (prio[i] >= CIS_PRIO_COUNT)
            return CIS_EINVAL;
        cnt[prio[i]]++;
    }
    const uint64_t base = s->next_seq;
    if (n > (uint64_t)INT64_MAX - base)
        return CIS_EINVAL; /* seq space exhausted; cannot happen in practice */

    /* Stable grouping: high class first, so it gets the lowest seqs. */
    work = malloc(n * sizeof(*work));
    if (!work)
        return CIS_ENOMEM;
    size_t pos = 0;
    for (int c = 0; c < CIS_PRIO_COUNT; c++) {
        start[c] = off[c] = pos;
        pos += cnt[c];
    }
    for (size_t i = 0; i < n; i++)
        work[off[prio[i]]++] = recs[i];
    for (size_t j = 0; j < n; j++)
        work[j].seq = base + j;

    /* Encode and compress before taking the write lock: the transaction stays short. */
    for (int c = 0; c < CIS_PRIO_COUNT; c++) {
        if (!cnt[c])
            continue;
        ret = cis_segment_encode(work + start[c], cnt[c], (uint32_t)c, s->zstd_level, &seg[c],
                                 &data[c], &len[c]);
        if (ret) {
            cis_error("[spool] commit: encoding %zu records failed (%d)", cnt[c], ret);
            goto out;
        }
    }

    const int64_t created = cis_wall_ms();
    rc = spool__begin(s);
    if (rc != SQLITE_OK) {
        ret = spool__fail(s, "commit: begin", rc);
        goto out;
    }
    in_tx = 1;
    for (int c = 0; c < CIS_PRIO_COUNT; c++) {
        if (!cnt[c])
            continue;
        sqlite3_stmt *st = s->st[ST_SEG_INSERT];
        sqlite3_bind_int64(st, 1, (sqlite3_int64)(base + start[c]));
        sqlite3_bind_int64(st, 2, (sqlite3_int64)(base + start[c] + cnt[c] - 1));
        sqlite3_bind_int(st, 3, c);
        sqlite3_bind_int64(st, 4, (sqlite3_int64)cnt[c]);
        sqlite3_bind_int(st, 5, seg[c].compression);
        sqlite3_bind_int64(st, 6, (sqlite3_int64)seg[c].raw_size);
        sqlite3_bind_int64(st, 7, created);
        sqlite3_bind_blob64(st, 8, data[c], len[c], SQLITE_STATIC);
        rc = spool__exec(st);
        sqlite3_clear_bindings(st); /* do not keep a pointer to data[c] */
        if (rc != SQLITE_OK) {
            ret = spool__fail(s, "commit: insert segment", rc);
            goto out;
        }
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
    /* The records are durable (per synchronous) once this COMMIT returns; only then may the
     * caller acknowledge its sources. */
    rc = spool__exec(s->st[ST_COMMIT]);
    if (rc != SQLITE_OK) {
        ret = spool__fail(s, "commit", rc);
        goto out;
    }
    in_tx = 0;

    if (s->pending_segments == 0)
        s->oldest_created_ms = created;
    s->next_seq = base + n;
    s->pending_records += n;
    for (int c = 0; c < CIS_PRIO_COUNT; c++)
        s->pending_segments += cnt[c] ? 1 : 0;
    for (int c = 0; c < CIS_PRIO_COUNT; c++)
        off[c] = start[c];
    for (size_t i = 0; i < n; i++)
        recs[i].seq = base + off[prio[i]]++;
    if (s->last_err)
        cis_info("[spool] commits succeed again");
    s->last_err = 0;

out:
    if (in_tx)
        spool__rollback(s);
    for (int c = 0; c < CIS_PRIO_COUNT; c++)
        free(data[c]);
    free(work);
    return ret;
}

int agent_spool_claim(struct agent_spool *s, size_t max_records, size_t max_bytes,
                      struct agent_spool_seg **out, size_t *n)
{
    struct agent_spool_seg *arr = NULL;
    size_t cnt = 0, cap = 0;
    size_t recs_total = 0, bytes_total = 0;
    sqlite3_stmt *scan = s->st[ST_CLAIM_SCAN];
    sqlite3_stmt *get = s->st[ST_SEG_DATA];
    int ret = CIS_OK;
    int rc;

    *out = NULL;
    *n = 0;
    if (s->ninflight >= s->pending_segments)
        return CIS_OK; /* everything stored is already in flight: no I/O */

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
            break; /* never skip ahead: order is oldest first within a class */

        if (cnt == cap) {
            size_t ncap = cap ? cap * 2 : 8;
            struct agent_spool_seg *p = realloc(arr, ncap * sizeof(*p));
            if (!p) {
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

        sqlite3_bind_int64(get, 1, (sqlite3_int64)first);
        rc = sqlite3_step(get);
        if (rc != SQLITE_ROW) {
            sqlite3_reset(get);
            ret = rc == SQLITE_DONE ? CIS_ECORRUPT : spool__fail(s, "claim: read segment", rc);
            goto out;
        }
        size_t blen = (size_t)sqlite3_column_bytes(get, 0);
        const void *blob = sqlite3_column_blob(get, 0);
        g->data = malloc(blen ? blen : 1);
        if (!g->data) {
            sqlite3_reset(get);
            ret = CIS_ENOMEM;
            goto out;
        }
        if (blen)
            memcpy(g->data, blob, blen);
        sqlite3_reset(get);
        g->seg.data = g->data;
        g->seg.data_len = blen;
        cnt++;
        recs_total += (size_t)rcount;
        bytes_total += blen;
    }
    if (rc != SQLITE_ROW && rc != SQLITE_DONE) {
        ret = spool__fail(s, "claim: scan", rc);
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
    uint64_t del_segs = 0, del_recs = 0, ledger_rows = 0;
    int64_t oldest = 0;
    int ret = CIS_OK;
    int rc;

    if (n == 0)
        return CIS_OK;
    if (!first_seqs)
        return CIS_EINVAL;
    const int64_t now = cis_wall_ms();

    rc = spool__begin(s);
    if (rc != SQLITE_OK)
        return spool__fail(s, what, rc);

    for (size_t i = 0; i < n; i++) {
        sqlite3_stmt *info = s->st[ST_SEG_INFO];
        sqlite3_bind_int64(info, 1, (sqlite3_int64)first_seqs[i]);
        rc = sqlite3_step(info);
        if (rc == SQLITE_DONE) {
            sqlite3_reset(info);
            continue; /* already gone: a repeated ack */
        }
        if (rc != SQLITE_ROW) {
            sqlite3_reset(info);
            ret = spool__fail(s, what, rc);
            goto out;
        }
        int64_t last = sqlite3_column_int64(info, 0);
        int64_t count = sqlite3_column_int64(info, 1);
        sqlite3_reset(info);

        if (reason) {
            sqlite3_stmt *li = s->st[ST_LEDGER_INSERT];
            sqlite3_bind_text(li, 1, reason, -1, SQLITE_STATIC);
            sqlite3_bind_int64(li, 2, (sqlite3_int64)s->epoch);
            sqlite3_bind_int64(li, 3, (sqlite3_int64)first_seqs[i]);
            sqlite3_bind_int64(li, 4, last);
            sqlite3_bind_int64(li, 5, count);
            sqlite3_bind_int64(li, 6, now);
            if (detail)
                sqlite3_bind_text(li, 7, detail, -1, SQLITE_STATIC);
            else
                sqlite3_bind_null(li, 7);
            rc = spool__exec(li);
            sqlite3_clear_bindings(li);
            if (rc != SQLITE_OK) {
                ret = spool__fail(s, what, rc);
                goto out;
            }
            ledger_rows++;
        }
        sqlite3_stmt *del = s->st[ST_SEG_DELETE];
        sqlite3_bind_int64(del, 1, (sqlite3_int64)first_seqs[i]);
        rc = spool__exec(del);
        if (rc != SQLITE_OK) {
            ret = spool__fail(s, what, rc);
            goto out;
        }
        del_segs++;
        del_recs += count > 0 ? (uint64_t)count : 0;
    }

    /* The new oldest segment, read inside the transaction (a primary-key lookup, no write). */
    rc = sqlite3_step(s->st[ST_OLDEST]);
    if (rc == SQLITE_ROW)
        oldest = sqlite3_column_int64(s->st[ST_OLDEST], 0);
    sqlite3_reset(s->st[ST_OLDEST]);
    if (rc != SQLITE_ROW && rc != SQLITE_DONE) {
        ret = spool__fail(s, what, rc);
        goto out;
    }

    rc = spool__exec(s->st[ST_COMMIT]);
    if (rc != SQLITE_OK) {
        ret = spool__fail(s, what, rc);
        goto out;
    }

    for (size_t i = 0; i < n; i++)
        spool__inflight_remove(s, first_seqs[i]);
    s->pending_segments = s->pending_segments >= del_segs ? s->pending_segments - del_segs : 0;
    s->pending_records = s->pending_records >= del_recs ? s->pending_records - del_recs : 0;
    s->oldest_created_ms = s->pending_segments ? oldest : 0;
    s->ledger_unsent += ledger_rows;
    if (ledger_rows)
        cis_warn("[spool] %llu segments (%llu records) %s: %s", (unsigned long long)del_segs,
                 (unsigned long long)del_recs, reason, detail ? detail : "");
    s->last_err = 0;
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
    rc = spool__exec(s->st[ST_COMMIT]);
    if (rc != SQLITE_OK) {
        ret = spool__fail(s, "ledger mark sent", rc);
        goto out;
    }
    s->ledger_unsent = s->ledger_unsent >= changed ? s->ledger_unsent - changed : 0;
    return CIS_OK;

out:
    spool__rollback(s);
    return ret;
}

void agent_spool_stats(const struct agent_spool *s, struct agent_spool_stats *st)
{
    st->pending_records = s->pending_records;
    st->pending_segments = s->pending_segments;
    st->inflight_segments = s->ninflight;
    st->next_seq = s->next_seq;
    st->ledger_unsent = s->ledger_unsent;
    st->oldest_created_ms = s->pending_segments ? s->oldest_created_ms : 0;
}
