/* Receiver store on SQLite: WAL, one write connection and one read connection, each guarded
 * by its own mutex because libmicrohttpd calls handlers from many threads. */
#include "store/store.h"

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <sqlite3.h>

#include <cistern/err.h>
#include <cistern/log.h>

/* Version 2: the loss ledger is keyed by the spool that wrote an entry (origin_epoch), not by
 * the epoch it describes. A fresh spool's corrupt_spool entry about the old epoch reuses ids
 * the old spool already sent; under version 1's key it was silently ignored.
 * Version 3: the device registry (devices) and agents.replayed_batches. */
#define SCHEMA_VERSION 3

#define LOSSES_COLUMNS                                                                             \
    "(agent_id TEXT NOT NULL, origin_epoch INTEGER NOT NULL, id INTEGER NOT NULL,"                 \
    " reason TEXT NOT NULL, epoch INTEGER NOT NULL, first_seq INTEGER NOT NULL,"                   \
    " last_seq INTEGER NOT NULL, count INTEGER NOT NULL, ts_ms INTEGER NOT NULL, detail TEXT,"     \
    " received_ms INTEGER NOT NULL, PRIMARY KEY(agent_id, origin_epoch, id))"
/* get_gaps reads an epoch's entries in first_seq order. */
#define LOSSES_INDEX                                                                               \
    "CREATE INDEX IF NOT EXISTS losses_by_epoch ON losses(agent_id, epoch, first_seq);"
/* The device registry: fingerprint is the SHA-256 of the device key's SubjectPublicKeyInfo,
 * hmac_secret the shared secret itself (hence the file's mode 0600); either may be NULL. */
#define DEVICES_TABLE                                                                              \
    "CREATE TABLE IF NOT EXISTS devices(id TEXT PRIMARY KEY, fingerprint BLOB,"                    \
    " hmac_secret BLOB, enabled INTEGER NOT NULL, added_ms INTEGER NOT NULL,"                      \
    " changed_ms INTEGER NOT NULL);"

static const char schema_sql[] =
    "CREATE TABLE IF NOT EXISTS records(agent_id TEXT NOT NULL, epoch INTEGER NOT NULL,"
    " seq INTEGER NOT NULL, ts_ms INTEGER NOT NULL, stream TEXT NOT NULL, content_type TEXT,"
    " payload BLOB NOT NULL, received_ms INTEGER NOT NULL, PRIMARY KEY(agent_id, epoch, seq))"
    " WITHOUT ROWID;"
    "CREATE TABLE IF NOT EXISTS agents(id TEXT PRIMARY KEY, first_seen_ms INTEGER NOT NULL,"
    " last_seen_ms INTEGER NOT NULL, spool_depth INTEGER NOT NULL DEFAULT 0,"
    " oldest_pending_ms INTEGER NOT NULL DEFAULT 0, records INTEGER NOT NULL DEFAULT 0,"
    " replayed_batches INTEGER NOT NULL DEFAULT 0);"
    "CREATE TABLE IF NOT EXISTS losses" LOSSES_COLUMNS ";" LOSSES_INDEX DEVICES_TABLE
    "CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value INTEGER NOT NULL);"
    "INSERT OR IGNORE INTO meta(key, value) VALUES('schema_version', 3);";

/* Version 1 -> 2, inside the open transaction: every old entry was written by the spool of
 * the epoch it describes (nothing else could be stored under the old key), so
 * origin_epoch = epoch. Copied in received order so that order survives. */
static const char upgrade_v1_sql[] =
    "CREATE TABLE losses_v2" LOSSES_COLUMNS ";"
    "INSERT INTO losses_v2(agent_id, origin_epoch, id, reason, epoch, first_seq, last_seq,"
    " count, ts_ms, detail, received_ms) SELECT agent_id, epoch, id, reason, epoch, first_seq,"
    " last_seq, count, ts_ms, detail, received_ms FROM losses ORDER BY received_ms, rowid;"
    "DROP TABLE losses;"
    "ALTER TABLE losses_v2 RENAME TO losses;" LOSSES_INDEX
    "UPDATE meta SET value = 2 WHERE key = 'schema_version';";

/* Version 2 -> 3, inside the same transaction: old agents have replayed nothing that was
 * counted, and nobody is registered yet. */
static const char upgrade_v2_sql[] =
    "ALTER TABLE agents ADD COLUMN replayed_batches INTEGER NOT NULL DEFAULT 0;" DEVICES_TABLE
    "UPDATE meta SET value = 3 WHERE key = 'schema_version';";

static const char ins_record_sql[] =
    "INSERT OR IGNORE INTO records(agent_id, epoch, seq, ts_ms, stream, content_type, payload,"
    " received_ms) VALUES(?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)";
/* Records go in INSERT_ROWS to a statement: one statement per row spends more time starting
 * and halting the statement than inserting (bench/RESULTS.md, B2). The tail of a batch uses
 * the one-row statement. */
#define INSERT_ROWS 50
#define INSERT_COLS 8
static const char upsert_agent_sql[] =
    "INSERT INTO agents(id, first_seen_ms, last_seen_ms, spool_depth, oldest_pending_ms, records,"
    " replayed_batches) VALUES(?1, ?2, ?2, ?3, ?4, ?5, ?6) ON CONFLICT(id) DO UPDATE SET"
    " last_seen_ms = max(last_seen_ms, excluded.last_seen_ms),"
    " spool_depth = excluded.spool_depth, oldest_pending_ms = excluded.oldest_pending_ms,"
    " records = records + excluded.records,"
    " replayed_batches = replayed_batches + excluded.replayed_batches";
static const char ins_loss_sql[] =
    "INSERT OR IGNORE INTO losses(agent_id, origin_epoch, id, reason, epoch, first_seq, last_seq,"
    " count, ts_ms, detail, received_ms) VALUES(?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)";
static const char list_agents_sql[] =
    "SELECT id, first_seen_ms, last_seen_ms, spool_depth, oldest_pending_ms, records,"
    " replayed_batches FROM agents ORDER BY id";
static const char agent_exists_sql[] = "SELECT 1 FROM agents WHERE id = ?1";
static const char records_all_sql[] =
    "SELECT epoch, seq, ts_ms, stream, content_type, payload, received_ms FROM records"
    " WHERE agent_id = ?1 AND seq > ?2 ORDER BY epoch, seq LIMIT ?3";
static const char records_epoch_sql[] =
    "SELECT epoch, seq, ts_ms, stream, content_type, payload, received_ms FROM records"
    " WHERE agent_id = ?1 AND epoch = ?4 AND seq > ?2 ORDER BY seq LIMIT ?3";
/* rowid is insertion order (VACUUM may renumber it, but keeps its order). */
static const char losses_sql[] =
    "SELECT origin_epoch, id, reason, epoch, first_seq, last_seq, count, ts_ms, detail,"
    " received_ms FROM losses WHERE agent_id = ?1 ORDER BY received_ms, rowid";
/* The agent's epochs: those with records, found by skipping from one epoch to the next on the
 * primary key (one index probe per epoch, not a scan of the records), and those that only the
 * ledger names. ?2 NULL means all. */
static const char gap_epochs_sql[] =
    "WITH RECURSIVE e(epoch) AS (SELECT min(epoch) FROM records WHERE agent_id = ?1"
    " UNION ALL SELECT (SELECT min(r.epoch) FROM records r WHERE r.agent_id = ?1"
    " AND r.epoch > e.epoch) FROM e WHERE e.epoch IS NOT NULL)"
    " SELECT epoch FROM e WHERE epoch IS NOT NULL AND (?2 IS NULL OR epoch = ?2)"
    " UNION SELECT epoch FROM losses WHERE agent_id = ?1 AND (?2 IS NULL OR epoch = ?2)"
    " ORDER BY 1";
static const char gap_stats_sql[] =
    "SELECT (SELECT count(*) FROM records WHERE agent_id = ?1 AND epoch = ?2),"
    " (SELECT max(seq) FROM records WHERE agent_id = ?1 AND epoch = ?2),"
    " (SELECT max(last_seq) FROM losses WHERE agent_id = ?1 AND epoch = ?2)";
/* The holes between received seqs, in one ordered scan of the primary key: LAG pairs each seq
 * with the one before it (0 before the first, so a hole from seq 1 shows too). The hole after
 * the highest received seq, up to what the ledger names, is added by the caller. */
static const char gap_holes_sql[] =
    "SELECT prev + 1, seq - 1 FROM (SELECT seq, lag(seq, 1, 0) OVER (ORDER BY seq) AS prev"
    " FROM records WHERE agent_id = ?1 AND epoch = ?2) WHERE seq > prev + 1";
static const char gap_ledger_sql[] =
    "SELECT first_seq, last_seq, origin_epoch, id, reason FROM losses"
    " WHERE agent_id = ?1 AND epoch = ?2 AND last_seq >= first_seq ORDER BY first_seq";
/* Without REPLACE an existing id is left alone (no change: CIS_EEXIST); with it, added_ms is
 * kept and the rest replaced. */
static const char dev_add_sql[] =
    "INSERT INTO devices(id, fingerprint, hmac_secret, enabled, added_ms, changed_ms)"
    " VALUES(?1, ?2, ?3, ?4, ?5, ?5) ON CONFLICT(id) DO NOTHING";
static const char dev_replace_sql[] =
    "INSERT INTO devices(id, fingerprint, hmac_secret, enabled, added_ms, changed_ms)"
    " VALUES(?1, ?2, ?3, ?4, ?5, ?5) ON CONFLICT(id) DO UPDATE SET"
    " fingerprint = excluded.fingerprint, hmac_secret = excluded.hmac_secret,"
    " enabled = excluded.enabled, changed_ms = excluded.changed_ms";
static const char dev_set_enabled_sql[] =
    "UPDATE devices SET enabled = ?2, changed_ms = ?3 WHERE id = ?1";
#define DEV_COLUMNS "id, fingerprint, hmac_secret, enabled, added_ms, changed_ms"
static const char dev_get_sql[] = "SELECT " DEV_COLUMNS " FROM devices WHERE id = ?1";
static const char dev_list_sql[] = "SELECT " DEV_COLUMNS " FROM devices ORDER BY id";

struct recv_store {
    pthread_mutex_t wlock; /* guards wdb and its statements */
    pthread_mutex_t rlock; /* guards rdb and its statements */
    sqlite3 *wdb, *rdb;
    sqlite3_stmt *ins_record, *ins_records, *upsert_agent, *ins_loss;
    sqlite3_stmt *dev_add, *dev_replace, *dev_set_enabled; /* on wdb */
    sqlite3_stmt *list_agents, *agent_exists, *records_all, *records_epoch;
    sqlite3_stmt *losses, *gap_epochs, *gap_stats, *gap_holes, *gap_ledger;
    sqlite3_stmt *dev_get, *dev_list; /* on rdb */
    int failing; /* last put_batch failed: warn once, report unhealthy; atomic access */
};

static int sqlite_err(int rc)
{
    switch (rc & 0xff) {
    case SQLITE_FULL:
        return CIS_EFULL;
    case SQLITE_BUSY:
    case SQLITE_LOCKED:
        return CIS_EAGAIN;
    case SQLITE_CORRUPT:
    case SQLITE_NOTADB:
        return CIS_ECORRUPT;
    case SQLITE_NOMEM:
        return CIS_ENOMEM;
    default:
        return CIS_EDB;
    }
}

static int open_conn(const struct recv_store_opts *o, int readonly, sqlite3 **out, char *err,
                     size_t errlen)
{
    sqlite3 *db = NULL;
    int flags = SQLITE_OPEN_NOMUTEX |
                (readonly ? SQLITE_OPEN_READONLY : SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE);
    int rc = sqlite3_open_v2(o->path, &db, flags, NULL);
    if (rc != SQLITE_OK) {
        snprintf(err, errlen, "%s: %s", o->path, db ? sqlite3_errmsg(db) : sqlite3_errstr(rc));
        sqlite3_close(db);
        return sqlite_err(rc);
    }
    sqlite3_busy_timeout(db, o->busy_timeout_ms > 0 ? o->busy_timeout_ms : 5000);
    sqlite3_extended_result_codes(db, 1);
    *out = db;
    return 0;
}

static int exec(sqlite3 *db, const char *sql, char *err, size_t errlen)
{
    char *msg = NULL;
    int rc = sqlite3_exec(db, sql, NULL, NULL, &msg);
    if (rc != SQLITE_OK) {
        snprintf(err, errlen, "%s", msg ? msg : sqlite3_errstr(rc));
        sqlite3_free(msg);
        return sqlite_err(rc);
    }
    return 0;
}

static int prep(sqlite3 *db, const char *sql, sqlite3_stmt **st, char *err, size_t errlen)
{
    int rc = sqlite3_prepare_v3(db, sql, -1, SQLITE_PREPARE_PERSISTENT, st, NULL);
    if (rc != SQLITE_OK) {
        snprintf(err, errlen, "prepare: %s", sqlite3_errmsg(db));
        return sqlite_err(rc);
    }
    return 0;
}

/* ins_record_sql with INSERT_ROWS rows of values. */
static int prep_ins_records(sqlite3 *db, sqlite3_stmt **st, char *err, size_t errlen)
{
    const char *values = strstr(ins_record_sql, " VALUES(");
    size_t head = (size_t)(values - ins_record_sql) + strlen(" VALUES");
    char sql[sizeof(ins_record_sql) + INSERT_ROWS * 48];
    size_t len = head;
    int rc;

    memcpy(sql, ins_record_sql, head);
    for (int i = 0; i < INSERT_ROWS; i++) {
        int b = i * INSERT_COLS;
        len += (size_t)snprintf(sql + len, sizeof(sql) - len, "%s(?%d,?%d,?%d,?%d,?%d,?%d,?%d,?%d)",
                                i ? "," : "", b + 1, b + 2, b + 3, b + 4, b + 5, b + 6, b + 7,
                                b + 8);
    }
    rc = prep(db, sql, st, err, errlen);
    return rc;
}

static void sqlite_close(struct recv_store *s)
{
    if (s == NULL)
        return;
    sqlite3_finalize(s->ins_record);
    sqlite3_finalize(s->ins_records);
    sqlite3_finalize(s->upsert_agent);
    sqlite3_finalize(s->ins_loss);
    sqlite3_finalize(s->list_agents);
    sqlite3_finalize(s->agent_exists);
    sqlite3_finalize(s->records_all);
    sqlite3_finalize(s->records_epoch);
    sqlite3_finalize(s->losses);
    sqlite3_finalize(s->gap_epochs);
    sqlite3_finalize(s->gap_stats);
    sqlite3_finalize(s->gap_holes);
    sqlite3_finalize(s->gap_ledger);
    sqlite3_finalize(s->dev_add);
    sqlite3_finalize(s->dev_replace);
    sqlite3_finalize(s->dev_set_enabled);
    sqlite3_finalize(s->dev_get);
    sqlite3_finalize(s->dev_list);
    sqlite3_close(s->rdb);
    sqlite3_close(s->wdb);
    pthread_mutex_destroy(&s->wlock);
    pthread_mutex_destroy(&s->rlock);
    free(s);
}

/* The schema version of DB: 0 when the file has no schema yet. Returns 0 or CIS_E*. */
static int schema_version(sqlite3 *db, sqlite3_int64 *version, char *err, size_t errlen)
{
    sqlite3_stmt *st = NULL;
    int rc;

    *version = 0;
    rc = prep(db, "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'meta'", &st, err,
              errlen);
    if (rc)
        return rc;
    rc = sqlite3_step(st);
    sqlite3_finalize(st);
    st = NULL;
    if (rc == SQLITE_DONE)
        return 0;
    if (rc != SQLITE_ROW) {
        snprintf(err, errlen, "reading the schema: %s", sqlite3_errmsg(db));
        return sqlite_err(rc);
    }
    rc = prep(db, "SELECT value FROM meta WHERE key = 'schema_version'", &st, err, errlen);
    if (rc)
        return rc;
    rc = sqlite3_step(st);
    if (rc == SQLITE_ROW)
        *version = sqlite3_column_int64(st, 0);
    else if (rc != SQLITE_DONE)
        snprintf(err, errlen, "reading the schema version: %s", sqlite3_errmsg(db));
    sqlite3_finalize(st);
    if (rc != SQLITE_ROW && rc != SQLITE_DONE)
        return sqlite_err(rc);
    if (rc == SQLITE_DONE)
        *version = -1; /* a meta table without a version: not ours */
    return 0;
}

/* Inside the caller's write transaction: create the schema on an empty file, upgrade an
 * older one, refuse a newer or unknown one. Returns 0 or CIS_E* with a reason in ERR. */
static int schema_setup(sqlite3 *db, const char *path, char *err, size_t errlen)
{
    sqlite3_int64 v;
    int rc = schema_version(db, &v, err, errlen);

    if (rc)
        return rc;
    if (v == 0 || v == SCHEMA_VERSION)
        return exec(db, schema_sql, err, errlen);
    if (v >= 1 && v < SCHEMA_VERSION) {
        /* One step per version, all in the caller's transaction: a failure at any step
         * rolls every step back, and the file keeps its old version. */
        static const char *const steps[] = {upgrade_v1_sql, upgrade_v2_sql};
        char why[200];
        _Static_assert(sizeof steps / sizeof steps[0] == SCHEMA_VERSION - 1,
                       "one upgrade step per schema version");
        for (sqlite3_int64 from = v; from < SCHEMA_VERSION; from++) {
            rc = exec(db, steps[from - 1], why, sizeof why);
            if (rc) {
                snprintf(err, errlen,
                         "%s: upgrading the schema from version %lld to %d failed, nothing"
                         " was changed: %s",
                         path, (long long)v, SCHEMA_VERSION, why);
                return rc;
            }
        }
        cis_info("[store] %s: schema upgraded from version %lld to %d", path, (long long)v,
                 SCHEMA_VERSION);
        return 0;
    }
    if (v > SCHEMA_VERSION)
        snprintf(err, errlen,
                 "%s: schema version %lld was written by a newer receiver (this one knows up to"
                 " %d); run that version or newer, the file is left as it is",
                 path, (long long)v, SCHEMA_VERSION);
    else
        snprintf(err, errlen, "%s: unknown schema version %lld (this receiver knows 1..%d)", path,
                 (long long)v, SCHEMA_VERSION);
    return CIS_EDB;
}

/* The store holds HMAC secrets: make a new database file mode 0600 whatever the umask, and
 * take group and other permissions away from an existing one (and its -wal and -shm), which
 * an older receiver made with the umask's mode. SQLite gives the -wal and -shm files it
 * creates the database file's mode, so they follow. Returns 0 or CIS_EIO with a reason. */
static int secure_files(const char *path, char *err, size_t errlen)
{
    static const char *const suffixes[] = {"", "-wal", "-shm"};
    struct stat sb;
    int fd;

    /* ":memory:" and "" (a private temporary file) have no file of ours. */
    if (path[0] == '\0' || strcmp(path, ":memory:") == 0)
        return 0;
    fd = open(path, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC | O_NOCTTY, 0600);
    if (fd >= 0) {
        /* fchmod does not go through the umask: a umask of 0277 would leave 0400 above. */
        int rc = fchmod(fd, 0600);
        int e = errno;
        close(fd);
        if (rc != 0) {
            snprintf(err, errlen, "%s: cannot make it mode 0600: %s", path, strerror(e));
            unlink(path);
            return CIS_EIO;
        }
        return 0;
    }
    if (errno != EEXIST) {
        snprintf(err, errlen, "%s: %s", path, strerror(errno));
        return CIS_EIO;
    }
    for (size_t i = 0; i < sizeof suffixes / sizeof suffixes[0]; i++) {
        char p[4096];
        if ((size_t)snprintf(p, sizeof p, "%s%s", path, suffixes[i]) >= sizeof p)
            continue;
        if (stat(p, &sb) != 0 || !S_ISREG(sb.st_mode) || (sb.st_mode & 077) == 0)
            continue;
        /* Not fatal: a receiver whose user does not own the file keeps running, and the
         * operator is told why the mode matters. */
        if (chmod(p, sb.st_mode & 0700) != 0)
            cis_warn("[store] %s is mode %04o and holds HMAC secrets; cannot make it %04o: %s", p,
                     (unsigned)(sb.st_mode & 07777), (unsigned)(sb.st_mode & 0700),
                     strerror(errno));
        else
            cis_info("[store] %s: mode %04o -> %04o (it holds HMAC secrets)", p,
                     (unsigned)(sb.st_mode & 07777), (unsigned)(sb.st_mode & 0700));
    }
    return 0;
}

static int sqlite_open(const struct recv_store_opts *o, struct recv_store **out, char *err,
                       size_t errlen)
{
    struct recv_store *s = NULL;
    char pragmas[160];
    int rc;

    *out = NULL;
    s = calloc(1, sizeof *s);
    if (s == NULL) {
        snprintf(err, errlen, "out of memory");
        return CIS_ENOMEM;
    }
    pthread_mutex_init(&s->wlock, NULL);
    pthread_mutex_init(&s->rlock, NULL);

    rc = secure_files(o->path, err, errlen);
    if (rc)
        goto out;
    rc = open_conn(o, 0, &s->wdb, err, errlen);
    if (rc)
        goto out;
    /* WAL lets the read connection run while a batch commits. NORMAL in WAL mode can lose the
     * last commits on power loss (never corrupts); FULL fsyncs the WAL on every commit, so an
     * acknowledged batch survives power loss. */
    snprintf(pragmas, sizeof pragmas,
             "PRAGMA journal_mode=WAL; PRAGMA synchronous=%s; PRAGMA foreign_keys=OFF;",
             o->sync_full ? "FULL" : "NORMAL");
    rc = exec(s->wdb, pragmas, err, errlen);
    if (rc)
        goto out;
    /* Check and create or upgrade the schema in one write transaction: a second receiver
     * starting on the same file waits, then finds the finished schema; a failed upgrade
     * leaves version 1 as it was. */
    rc = exec(s->wdb, "BEGIN IMMEDIATE", err, errlen);
    if (rc)
        goto out;
    rc = schema_setup(s->wdb, o->path, err, errlen);
    if (rc) {
        char dummy[8];
        exec(s->wdb, "ROLLBACK", dummy, sizeof dummy);
        goto out;
    }
    rc = exec(s->wdb, "COMMIT", err, errlen);
    if (rc)
        goto out;

    rc = open_conn(o, 1, &s->rdb, err, errlen);
    if (rc)
        goto out;
    if ((rc = prep(s->wdb, ins_record_sql, &s->ins_record, err, errlen)) ||
        (rc = prep_ins_records(s->wdb, &s->ins_records, err, errlen)) ||
        (rc = prep(s->wdb, upsert_agent_sql, &s->upsert_agent, err, errlen)) ||
        (rc = prep(s->wdb, ins_loss_sql, &s->ins_loss, err, errlen)) ||
        (rc = prep(s->rdb, list_agents_sql, &s->list_agents, err, errlen)) ||
        (rc = prep(s->rdb, agent_exists_sql, &s->agent_exists, err, errlen)) ||
        (rc = prep(s->rdb, records_all_sql, &s->records_all, err, errlen)) ||
        (rc = prep(s->rdb, records_epoch_sql, &s->records_epoch, err, errlen)) ||
        (rc = prep(s->rdb, losses_sql, &s->losses, err, errlen)) ||
        (rc = prep(s->rdb, gap_epochs_sql, &s->gap_epochs, err, errlen)) ||
        (rc = prep(s->rdb, gap_stats_sql, &s->gap_stats, err, errlen)) ||
        (rc = prep(s->rdb, gap_holes_sql, &s->gap_holes, err, errlen)) ||
        (rc = prep(s->rdb, gap_ledger_sql, &s->gap_ledger, err, errlen)) ||
        (rc = prep(s->wdb, dev_add_sql, &s->dev_add, err, errlen)) ||
        (rc = prep(s->wdb, dev_replace_sql, &s->dev_replace, err, errlen)) ||
        (rc = prep(s->wdb, dev_set_enabled_sql, &s->dev_set_enabled, err, errlen)) ||
        (rc = prep(s->rdb, dev_get_sql, &s->dev_get, err, errlen)) ||
        (rc = prep(s->rdb, dev_list_sql, &s->dev_list, err, errlen)))
        goto out;
    *out = s;
    s = NULL;
out:
    sqlite_close(s);
    return rc;
}

/* Step a write statement to completion; reset it either way. Every statement binds all its
 * parameters before each step, so bindings need no clearing. */
static int step_done(sqlite3_stmt *st)
{
    int rc = sqlite3_step(st);
    sqlite3_reset(st);
    return rc == SQLITE_DONE ? SQLITE_OK : rc;
}

/* Bind one record to the 8 parameters after `base` of an insert into records. */
static void bind_record(sqlite3_stmt *st, int base, const char *agent, sqlite3_int64 epoch,
                        const Cistern__V1__Record *r, int64_t now_ms)
{
    sqlite3_bind_text(st, base + 1, agent, -1, SQLITE_STATIC);
    sqlite3_bind_int64(st, base + 2, epoch);
    sqlite3_bind_int64(st, base + 3, (sqlite3_int64)r->seq);
    sqlite3_bind_int64(st, base + 4, r->ts_ms);
    sqlite3_bind_text(st, base + 5, r->stream ? r->stream : "", -1, SQLITE_STATIC);
    if (r->content_type != NULL && r->content_type[0] != '\0')
        sqlite3_bind_text(st, base + 6, r->content_type, -1, SQLITE_STATIC);
    else
        sqlite3_bind_null(st, base + 6);
    /* zeroblob-safe: a NULL data pointer with length 0 would bind NULL, which the NOT NULL
     * column rejects. */
    sqlite3_bind_blob(st, base + 7, r->payload.len ? (const void *)r->payload.data : "",
                      (int)r->payload.len, SQLITE_STATIC);
    sqlite3_bind_int64(st, base + 8, now_ms);
}

static int sqlite_put_batch(struct recv_store *s, const struct cis_decoded_batch *b,
                            int64_t now_ms, struct recv_put_result *res)
{
    const Cistern__V1__BatchHeader *h = b->pb->header;
    const char *agent = h->agent_id;
    sqlite3_int64 epoch = (sqlite3_int64)h->epoch;
    uint64_t accepted = 0, duplicates = 0;
    int rc = SQLITE_OK, in_tx = 0, replay = 0;

    pthread_mutex_lock(&s->wlock);
    /* The whole batch is one transaction: the agent is acknowledged only after COMMIT, and a
     * failure leaves nothing from the batch behind, so a retry starts clean. IMMEDIATE takes
     * the write lock up front (busy_timeout applies) instead of failing mid-way. */
    rc = sqlite3_exec(s->wdb, "BEGIN IMMEDIATE", NULL, NULL, NULL);
    if (rc != SQLITE_OK)
        goto out;
    in_tx = 1;

    {
        /* Rows go INSERT_ROWS to a statement while that many remain, then one at a time. */
        size_t total = 0, done = 0, row = 0;
        sqlite3_stmt *st = NULL;
        for (size_t i = 0; i < b->nsegs; i++)
            total += b->segs[i].body->n_records;
        for (size_t i = 0; i < b->nsegs; i++) {
            const Cistern__V1__SegmentBody *body = b->segs[i].body;
            for (size_t j = 0; j < body->n_records; j++) {
                if (row == 0)
                    st = total - done >= INSERT_ROWS ? s->ins_records : s->ins_record;
                bind_record(st, row * INSERT_COLS, agent, epoch, body->records[j], now_ms);
                done++;
                if (++row == (st == s->ins_records ? INSERT_ROWS : 1)) {
                    rc = step_done(st);
                    if (rc != SQLITE_OK)
                        goto out;
                    accepted += (uint64_t)sqlite3_changes(s->wdb);
                    row = 0;
                }
            }
        }
        duplicates = total - accepted;
    }

    sqlite3_bind_text(s->upsert_agent, 1, agent, -1, SQLITE_STATIC);
    sqlite3_bind_int64(s->upsert_agent, 2, now_ms);
    sqlite3_bind_int64(s->upsert_agent, 3,
                       h->spool_depth > (uint64_t)INT64_MAX ? INT64_MAX
                                                            : (sqlite3_int64)h->spool_depth);
    sqlite3_bind_int64(s->upsert_agent, 4, h->oldest_pending_ms);
    sqlite3_bind_int64(s->upsert_agent, 5, (sqlite3_int64)accepted);
    /* A replay: records, none of them new (a retry after a lost answer, or a capture sent
     * again). Counted in this transaction, so the count is exactly the replays stored. */
    replay = accepted == 0 && duplicates > 0;
    sqlite3_bind_int64(s->upsert_agent, 6, replay);
    rc = step_done(s->upsert_agent);
    if (rc != SQLITE_OK)
        goto out;

    for (size_t i = 0; i < h->n_losses; i++) {
        const Cistern__V1__LossEntry *l = h->losses[i];
        sqlite3_stmt *st = s->ins_loss;
        /* Ledger ids count per spool: the entry is the header epoch's (the spool that wrote
         * it), whatever epoch its range is in. */
        sqlite3_bind_text(st, 1, agent, -1, SQLITE_STATIC);
        sqlite3_bind_int64(st, 2, epoch);
        sqlite3_bind_int64(st, 3, (sqlite3_int64)l->id);
        sqlite3_bind_text(st, 4, l->reason ? l->reason : "", -1, SQLITE_STATIC);
        sqlite3_bind_int64(st, 5, (sqlite3_int64)l->epoch);
        sqlite3_bind_int64(st, 6, (sqlite3_int64)l->first_seq);
        sqlite3_bind_int64(st, 7, (sqlite3_int64)l->last_seq);
        sqlite3_bind_int64(st, 8, (sqlite3_int64)l->count);
        sqlite3_bind_int64(st, 9, l->ts_ms);
        if (l->detail != NULL && l->detail[0] != '\0')
            sqlite3_bind_text(st, 10, l->detail, -1, SQLITE_STATIC);
        else
            sqlite3_bind_null(st, 10);
        sqlite3_bind_int64(st, 11, now_ms);
        rc = step_done(st);
        if (rc != SQLITE_OK)
            goto out;
    }

    rc = sqlite3_exec(s->wdb, "COMMIT", NULL, NULL, NULL);
    if (rc == SQLITE_OK)
        in_tx = 0;
out:
    if (rc != SQLITE_OK) {
        if (!s->failing)
            cis_warn("[store] batch from %s not stored: %s", agent, sqlite3_errmsg(s->wdb));
        __atomic_store_n(&s->failing, 1, __ATOMIC_RELAXED);
        if (in_tx)
            sqlite3_exec(s->wdb, "ROLLBACK", NULL, NULL, NULL);
    } else {
        if (s->failing)
            cis_info("[store] storing batches again");
        __atomic_store_n(&s->failing, 0, __ATOMIC_RELAXED);
        res->accepted = accepted;
        res->duplicates = duplicates;
        res->replay = replay;
    }
    pthread_mutex_unlock(&s->wlock);
    return rc == SQLITE_OK ? 0 : sqlite_err(rc);
}

static int sqlite_list_agents(struct recv_store *s, recv_agent_cb cb, void *ud)
{
    sqlite3_stmt *st = s->list_agents;
    int rc, ret = 0;

    pthread_mutex_lock(&s->rlock);
    while ((rc = sqlite3_step(st)) == SQLITE_ROW) {
        struct recv_agent_info a = {
            .id = (const char *)sqlite3_column_text(st, 0),
            .first_seen_ms = sqlite3_column_int64(st, 1),
            .last_seen_ms = sqlite3_column_int64(st, 2),
            .spool_depth = sqlite3_column_int64(st, 3),
            .oldest_pending_ms = sqlite3_column_int64(st, 4),
            .records = sqlite3_column_int64(st, 5),
            .replayed_batches = sqlite3_column_int64(st, 6),
        };
        if (a.id == NULL)
            a.id = "";
        ret = cb(ud, &a);
        if (ret)
            break;
    }
    if (ret == 0 && rc != SQLITE_DONE)
        ret = sqlite_err(rc);
    sqlite3_reset(st);
    pthread_mutex_unlock(&s->rlock);
    return ret;
}

/* Reset a read statement and drop its bindings. */
static void stmt_done(sqlite3_stmt *st)
{
    sqlite3_reset(st);
    sqlite3_clear_bindings(st);
}

/* With rlock held: open a read transaction, so that every read until read_end sees one WAL
 * snapshot, and check that AGENT_ID is known. Returns 0 with the transaction open, or
 * CIS_ENOTFOUND / CIS_E* with it closed. */
static int read_begin(struct recv_store *s, const char *agent_id)
{
    int rc = sqlite3_exec(s->rdb, "BEGIN", NULL, NULL, NULL);

    if (rc != SQLITE_OK)
        return sqlite_err(rc);
    sqlite3_bind_text(s->agent_exists, 1, agent_id, -1, SQLITE_STATIC);
    rc = sqlite3_step(s->agent_exists);
    stmt_done(s->agent_exists);
    if (rc == SQLITE_ROW)
        return 0;
    sqlite3_exec(s->rdb, "COMMIT", NULL, NULL, NULL);
    return rc == SQLITE_DONE ? CIS_ENOTFOUND : sqlite_err(rc);
}

static void read_end(struct recv_store *s)
{
    sqlite3_exec(s->rdb, "COMMIT", NULL, NULL, NULL);
}

static int sqlite_get_records(struct recv_store *s, const struct recv_records_query *q,
                              recv_record_cb cb, void *ud)
{
    sqlite3_stmt *st;
    int rc, ret;

    pthread_mutex_lock(&s->rlock);
    ret = read_begin(s, q->agent_id);
    if (ret)
        goto unlock;

    st = q->has_epoch ? s->records_epoch : s->records_all;
    sqlite3_bind_text(st, 1, q->agent_id, -1, SQLITE_STATIC);
    sqlite3_bind_int64(st, 2, q->after > (uint64_t)INT64_MAX ? INT64_MAX : (sqlite3_int64)q->after);
    sqlite3_bind_int64(st, 3, q->limit);
    if (q->has_epoch)
        sqlite3_bind_int64(st, 4, (sqlite3_int64)q->epoch);
    while ((rc = sqlite3_step(st)) == SQLITE_ROW) {
        const void *blob = sqlite3_column_blob(st, 5);
        struct recv_record_view r = {
            .epoch = (uint64_t)sqlite3_column_int64(st, 0),
            .seq = (uint64_t)sqlite3_column_int64(st, 1),
            .ts_ms = sqlite3_column_int64(st, 2),
            .stream = (const char *)sqlite3_column_text(st, 3),
            .content_type = (const char *)sqlite3_column_text(st, 4),
            .received_ms = sqlite3_column_int64(st, 6),
        };
        r.payload_len = (size_t)sqlite3_column_bytes(st, 5);
        r.payload = blob ? blob : (const uint8_t *)"";
        if (r.stream == NULL)
            r.stream = "";
        ret = cb(ud, &r);
        if (ret)
            break;
    }
    if (ret == 0 && rc != SQLITE_DONE)
        ret = sqlite_err(rc);
    stmt_done(st);
    read_end(s);
unlock:
    pthread_mutex_unlock(&s->rlock);
    return ret;
}

static int sqlite_get_losses(struct recv_store *s, const char *agent_id, recv_loss_cb cb, void *ud)
{
    sqlite3_stmt *st = s->losses;
    int rc, ret;

    pthread_mutex_lock(&s->rlock);
    ret = read_begin(s, agent_id);
    if (ret)
        goto unlock;
    sqlite3_bind_text(st, 1, agent_id, -1, SQLITE_STATIC);
    while ((rc = sqlite3_step(st)) == SQLITE_ROW) {
        struct recv_loss_view l = {
            .origin_epoch = (uint64_t)sqlite3_column_int64(st, 0),
            .id = (uint64_t)sqlite3_column_int64(st, 1),
            .reason = (const char *)sqlite3_column_text(st, 2),
            .epoch = (uint64_t)sqlite3_column_int64(st, 3),
            .first_seq = (uint64_t)sqlite3_column_int64(st, 4),
            .last_seq = (uint64_t)sqlite3_column_int64(st, 5),
            .count = (uint64_t)sqlite3_column_int64(st, 6),
            .ts_ms = sqlite3_column_int64(st, 7),
            .detail = (const char *)sqlite3_column_text(st, 8),
            .received_ms = sqlite3_column_int64(st, 9),
        };
        if (l.reason == NULL)
            l.reason = "";
        ret = cb(ud, &l);
        if (ret)
            break;
    }
    if (ret == 0 && rc != SQLITE_DONE)
        ret = sqlite_err(rc);
    stmt_done(st);
    read_end(s);
unlock:
    pthread_mutex_unlock(&s->rlock);
    return ret;
}

/* ---- get_gaps: missing ranges of an epoch, classified against its ledger entries ----
 *
 * The holes between received seqs come from SQL (gap_holes_sql), ascending. Each hole is then
 * cut where ledger coverage changes, in one sweep that reads the epoch's entries in first_seq
 * order alongside the holes: an entry is "active" from its first_seq to its last_seq, and
 * where several are active the first by (origin_epoch, id) names the reason. Work is per hole
 * and per entry, never per seq, so a hole of 2^40 seqs costs what a hole of 1 does. */

struct cover {
    uint64_t first, last;
    sqlite3_int64 origin, id;
    const char *reason; /* interned in gap_sweep.reasons */
};

struct gap_sweep {
    sqlite3_stmt *ledger; /* gap_ledger_sql, bound and stepping */
    int have_next;        /* NEXT holds the ledger row not yet made active */
    struct cover next;
    struct cover *active;
    size_t nactive, cap_active;
    char **reasons; /* distinct reason strings; pointers compare equal for equal reasons */
    size_t nreasons;
    struct recv_gap *gaps; /* the answer for the current epoch */
    size_t ngaps, cap_gaps, max_gaps;
    struct recv_gap pend; /* last piece, still growing while the next one is adjacent */
    int have_pend;
    int truncated;
};

/* Copy of REASON that lives as long as the sweep: one per distinct reason. NULL on OOM. */
static const char *sweep_intern(struct gap_sweep *w, const char *reason)
{
    char **r;

    for (size_t i = 0; i < w->nreasons; i++)
        if (strcmp(w->reasons[i], reason) == 0)
            return w->reasons[i];
    r = realloc(w->reasons, (w->nreasons + 1) * sizeof *r);
    if (r == NULL)
        return NULL;
    w->reasons = r;
    r[w->nreasons] = strdup(reason);
    if (r[w->nreasons] == NULL)
        return NULL;
    return r[w->nreasons++];
}

/* Step the ledger statement into NEXT. Returns 0 or CIS_E*. */
static int sweep_next_entry(struct gap_sweep *w)
{
    int rc = sqlite3_step(w->ledger);
    const char *reason;

    w->have_next = 0;
    if (rc == SQLITE_DONE)
        return 0;
    if (rc != SQLITE_ROW)
        return sqlite_err(rc);
    reason = (const char *)sqlite3_column_text(w->ledger, 4);
    w->next = (struct cover){
        .first = (uint64_t)sqlite3_column_int64(w->ledger, 0),
        .last = (uint64_t)sqlite3_column_int64(w->ledger, 1),
        .origin = sqlite3_column_int64(w->ledger, 2),
        .id = sqlite3_column_int64(w->ledger, 3),
        .reason = sweep_intern(w, reason ? reason : ""),
    };
    if (w->next.reason == NULL)
        return CIS_ENOMEM;
    w->have_next = 1;
    return 0;
}

/* Move the finished piece into the answer; past the cap, only note that there is more. */
static int sweep_flush(struct gap_sweep *w)
{
    if (!w->have_pend)
        return 0;
    w->have_pend = 0;
    if (w->ngaps == w->max_gaps) {
        w->truncated = 1;
        return 0;
    }
    if (w->ngaps == w->cap_gaps) {
        size_t cap = w->cap_gaps ? w->cap_gaps * 2 : 16;
        struct recv_gap *g;
        if (cap > w->max_gaps)
            cap = w->max_gaps;
        g = realloc(w->gaps, cap * sizeof *g);
        if (g == NULL)
            return CIS_ENOMEM;
        w->gaps = g;
        w->cap_gaps = cap;
    }
    w->gaps[w->ngaps++] = w->pend;
    return 0;
}

/* Add FIRST..LAST with REASON (interned or NULL), merged into the previous piece when they
 * touch and say the same. */
static int sweep_emit(struct gap_sweep *w, uint64_t first, uint64_t last, const char *reason)
{
    int rc;

    if (w->have_pend && w->pend.last_seq + 1 == first && w->pend.reason == reason) {
        w->pend.last_seq = last;
        return 0;
    }
    rc = sweep_flush(w);
    if (rc)
        return rc;
    w->pend = (struct recv_gap){.first_seq = first, .last_seq = last, .reason = reason};
    w->have_pend = 1;
    return 0;
}

/* Classify the hole A..B (holes come ascending and disjoint). Returns 0 or CIS_E*. */
static int sweep_hole(struct gap_sweep *w, uint64_t a, uint64_t b)
{
    uint64_t pos = a;
    int rc;

    while (!w->truncated) {
        const struct cover *win = NULL;
        uint64_t end = b;

        /* Entries that start at or before POS become active (unless already over). */
        while (w->have_next && w->next.first <= pos) {
            if (w->next.last >= pos) {
                if (w->nactive == w->cap_active) {
                    size_t cap = w->cap_active ? w->cap_active * 2 : 8;
                    struct cover *c = realloc(w->active, cap * sizeof *c);
                    if (c == NULL)
                        return CIS_ENOMEM;
                    w->active = c;
                    w->cap_active = cap;
                }
                w->active[w->nactive++] = w->next;
            }
            rc = sweep_next_entry(w);
            if (rc)
                return rc;
        }
        for (size_t i = 0; i < w->nactive;) {
            if (w->active[i].last < pos) {
                w->active[i] = w->active[--w->nactive];
                continue;
            }
            if (win == NULL || w->active[i].origin < win->origin ||
                (w->active[i].origin == win->origin && w->active[i].id < win->id))
                win = &w->active[i];
            i++;
        }
        /* The piece ends where the winner's range ends or where another entry starts. */
        if (w->have_next && w->next.first - 1 < end)
            end = w->next.first - 1;
        if (win != NULL && win->last < end)
            end = win->last;
        rc = sweep_emit(w, pos, end, win ? win->reason : NULL);
        if (rc)
            return rc;
        if (end == b)
            break;
        pos = end + 1;
    }
    return 0;
}

/* Fill E for EPOCH of AGENT: counts, then the holes classified. Returns 0 or CIS_E*. */
static int gaps_of_epoch(struct recv_store *s, struct gap_sweep *w, const char *agent,
                         sqlite3_int64 epoch, struct recv_epoch_gaps *e)
{
    uint64_t hi_received, hi_ledger;
    int rc = SQLITE_DONE, ret = 0;

    memset(e, 0, sizeof *e);
    e->epoch = (uint64_t)epoch;
    sqlite3_bind_text(s->gap_stats, 1, agent, -1, SQLITE_STATIC);
    sqlite3_bind_int64(s->gap_stats, 2, epoch);
    rc = sqlite3_step(s->gap_stats);
    if (rc != SQLITE_ROW) {
        stmt_done(s->gap_stats);
        return sqlite_err(rc);
    }
    e->received = (uint64_t)sqlite3_column_int64(s->gap_stats, 0);
    hi_received = (uint64_t)sqlite3_column_int64(s->gap_stats, 1); /* NULL reads as 0 */
    hi_ledger = (uint64_t)sqlite3_column_int64(s->gap_stats, 2);
    stmt_done(s->gap_stats);
    e->highest_seq = hi_ledger > hi_received ? hi_ledger : hi_received;

    w->nactive = 0;
    w->ngaps = 0;
    w->have_pend = 0;
    w->truncated = 0;
    sqlite3_bind_text(s->gap_ledger, 1, agent, -1, SQLITE_STATIC);
    sqlite3_bind_int64(s->gap_ledger, 2, epoch);
    ret = sweep_next_entry(w);
    if (ret)
        goto out;

    sqlite3_bind_text(s->gap_holes, 1, agent, -1, SQLITE_STATIC);
    sqlite3_bind_int64(s->gap_holes, 2, epoch);
    while (!w->truncated && (rc = sqlite3_step(s->gap_holes)) == SQLITE_ROW) {
        ret = sweep_hole(w, (uint64_t)sqlite3_column_int64(s->gap_holes, 0),
                         (uint64_t)sqlite3_column_int64(s->gap_holes, 1));
        if (ret)
            goto out;
    }
    if (!w->truncated && rc != SQLITE_DONE) {
        ret = sqlite_err(rc);
        goto out;
    }
    /* Above the highest received seq, up to the highest seq the ledger names. */
    if (!w->truncated && hi_received < e->highest_seq) {
        ret = sweep_hole(w, hi_received + 1, e->highest_seq);
        if (ret)
            goto out;
    }
    if (!w->truncated)
        ret = sweep_flush(w);
    e->gaps = w->gaps;
    e->ngaps = w->ngaps;
    e->truncated = w->truncated;
out:
    stmt_done(s->gap_holes);
    stmt_done(s->gap_ledger);
    return ret;
}

static int sqlite_get_gaps(struct recv_store *s, const struct recv_gaps_query *q, recv_gaps_cb cb,
                           void *ud)
{
    struct gap_sweep w = {.ledger = s->gap_ledger,
                          .max_gaps = q->max_gaps ? q->max_gaps : RECV_GAPS_MAX};
    struct recv_epoch_gaps e;
    sqlite3_stmt *st = s->gap_epochs;
    int rc, ret;

    pthread_mutex_lock(&s->rlock);
    ret = read_begin(s, q->agent_id);
    if (ret)
        goto unlock;
    sqlite3_bind_text(st, 1, q->agent_id, -1, SQLITE_STATIC);
    if (q->has_epoch)
        sqlite3_bind_int64(st, 2, (sqlite3_int64)q->epoch);
    else
        sqlite3_bind_null(st, 2);
    while ((rc = sqlite3_step(st)) == SQLITE_ROW) {
        ret = gaps_of_epoch(s, &w, q->agent_id, sqlite3_column_int64(st, 0), &e);
        if (ret == 0)
            ret = cb(ud, &e);
        if (ret)
            break;
    }
    if (ret == 0 && rc != SQLITE_DONE)
        ret = sqlite_err(rc);
    stmt_done(st);
    read_end(s);
unlock:
    pthread_mutex_unlock(&s->rlock);
    for (size_t i = 0; i < w.nreasons; i++)
        free(w.reasons[i]);
    free(w.reasons);
    free(w.active);
    free(w.gaps);
    return ret;
}

static int sqlite_health(struct recv_store *s)
{
    sqlite3_stmt *st = NULL;
    int rc;

    pthread_mutex_lock(&s->rlock);
    rc = sqlite3_prepare_v2(s->rdb, "SELECT value FROM meta WHERE key = 'schema_version'", -1,
                            &st, NULL);
    if (rc == SQLITE_OK)
        rc = sqlite3_step(st) == SQLITE_ROW ? SQLITE_OK : SQLITE_ERROR;
    sqlite3_finalize(st);
    pthread_mutex_unlock(&s->rlock);
    if (rc == SQLITE_OK) {
        if (__atomic_load_n(&s->failing, __ATOMIC_RELAXED))
            rc = SQLITE_ERROR;
    }
    return rc == SQLITE_OK ? 0 : CIS_EDB;
}

/* ---- the device registry ---- */

/* Overwrite the secret of D: copies of a registry entry must not linger on the stack. */
static void device_wipe(struct recv_device *d)
{
    explicit_bzero(d->secret, sizeof d->secret);
    d->secret_len = 0;
}

static int sqlite_device_put(struct recv_store *s, const struct recv_device *d, int replace,
                             int64_t now_ms)
{
    size_t idlen = strnlen(d->id, sizeof d->id);
    sqlite3_stmt *st = replace ? s->dev_replace : s->dev_add;
    int rc;

    if (idlen == 0 || idlen == sizeof d->id || d->secret_len > sizeof d->secret)
        return CIS_EINVAL;
    pthread_mutex_lock(&s->wlock);
    /* One statement, so one transaction: the registry never shows half a device. */
    sqlite3_bind_text(st, 1, d->id, (int)idlen, SQLITE_STATIC);
    if (d->has_fpr)
        sqlite3_bind_blob(st, 2, d->fpr, (int)sizeof d->fpr, SQLITE_STATIC);
    else
        sqlite3_bind_null(st, 2);
    if (d->secret_len > 0)
        sqlite3_bind_blob(st, 3, d->secret, (int)d->secret_len, SQLITE_STATIC);
    else
        sqlite3_bind_null(st, 3);
    sqlite3_bind_int(st, 4, d->enabled ? 1 : 0);
    sqlite3_bind_int64(st, 5, now_ms);
    rc = step_done(st);
    if (rc != SQLITE_OK)
        cis_warn("[store] device %s not registered: %s", d->id, sqlite3_errmsg(s->wdb));
    else if (sqlite3_changes(s->wdb) == 0)
        rc = -1; /* the id was there already and REPLACE is 0 */
    pthread_mutex_unlock(&s->wlock);
    if (rc == -1)
        return CIS_EEXIST;
    return rc == SQLITE_OK ? 0 : sqlite_err(rc);
}

/* Fill D from the current row of ST (DEV_COLUMNS). Returns 0, or CIS_EDB when the row cannot
 * be a device this code wrote (a fingerprint or secret of another size, an id too long). */
static int device_row(sqlite3_stmt *st, struct recv_device *d)
{
    /* Types first (a conversion would change them), and by type, not by pointer: an empty
     * BLOB reads as a NULL pointer too. */
    int fpr_null = sqlite3_column_type(st, 1) == SQLITE_NULL;
    int secret_null = sqlite3_column_type(st, 2) == SQLITE_NULL;
    const char *id = (const char *)sqlite3_column_text(st, 0);
    int idlen = sqlite3_column_bytes(st, 0);
    const void *fpr = sqlite3_column_blob(st, 1);
    int fprlen = sqlite3_column_bytes(st, 1);
    const void *secret = sqlite3_column_blob(st, 2);
    int secretlen = sqlite3_column_bytes(st, 2);

    memset(d, 0, sizeof *d);
    if (id == NULL || idlen <= 0 || (size_t)idlen >= sizeof d->id)
        return CIS_EDB;
    memcpy(d->id, id, (size_t)idlen);
    if (!fpr_null) {
        if (fpr == NULL || fprlen != (int)sizeof d->fpr)
            return CIS_EDB;
        memcpy(d->fpr, fpr, sizeof d->fpr);
        d->has_fpr = 1;
    }
    if (!secret_null) {
        if (secret == NULL || secretlen <= 0 || (size_t)secretlen > sizeof d->secret)
            return CIS_EDB;
        memcpy(d->secret, secret, (size_t)secretlen);
        d->secret_len = (size_t)secretlen;
    }
    d->enabled = sqlite3_column_int(st, 3) != 0;
    d->added_ms = sqlite3_column_int64(st, 4);
    d->changed_ms = sqlite3_column_int64(st, 5);
    return 0;
}

static int sqlite_device_get(struct recv_store *s, const char *id, struct recv_device *out)
{
    sqlite3_stmt *st = s->dev_get;
    int rc, ret;

    pthread_mutex_lock(&s->rlock);
    /* Each step of a statement in autocommit mode reads the newest commit: a change made by
     * `cistern-receiver device` in another process shows on the next lookup. */
    sqlite3_bind_text(st, 1, id, -1, SQLITE_STATIC);
    rc = sqlite3_step(st);
    if (rc == SQLITE_ROW)
        ret = device_row(st, out);
    else
        ret = rc == SQLITE_DONE ? CIS_ENOTFOUND : CIS_EDB;
    stmt_done(st);
    pthread_mutex_unlock(&s->rlock);
    if (ret == CIS_EDB)
        device_wipe(out);
    return ret;
}

static int sqlite_device_list(struct recv_store *s, recv_device_cb cb, void *ud)
{
    sqlite3_stmt *st = s->dev_list;
    struct recv_device d = {0};
    int rc, ret = 0;

    pthread_mutex_lock(&s->rlock);
    while ((rc = sqlite3_step(st)) == SQLITE_ROW) {
        ret = device_row(st, &d);
        if (ret == 0)
            ret = cb(ud, &d);
        if (ret)
            break;
    }
    if (ret == 0 && rc != SQLITE_DONE)
        ret = CIS_EDB;
    stmt_done(st);
    pthread_mutex_unlock(&s->rlock);
    device_wipe(&d);
    return ret;
}

static int sqlite_device_set_enabled(struct recv_store *s, const char *id, int enabled,
                                     int64_t now_ms)
{
    sqlite3_stmt *st = s->dev_set_enabled;
    int rc, changed = 0;

    pthread_mutex_lock(&s->wlock);
    sqlite3_bind_text(st, 1, id, -1, SQLITE_STATIC);
    sqlite3_bind_int(st, 2, enabled ? 1 : 0);
    sqlite3_bind_int64(st, 3, now_ms);
    rc = step_done(st);
    if (rc != SQLITE_OK)
        cis_warn("[store] device %s not %s: %s", id, enabled ? "enabled" : "revoked",
                 sqlite3_errmsg(s->wdb));
    else
        changed = sqlite3_changes(s->wdb);
    pthread_mutex_unlock(&s->wlock);
    if (rc != SQLITE_OK)
        return CIS_EDB;
    return changed ? 0 : CIS_ENOTFOUND;
}

const struct recv_store_ops recv_store_sqlite = {
    .name = "sqlite",
    .open = sqlite_open,
    .close = sqlite_close,
    .put_batch = sqlite_put_batch,
    .list_agents = sqlite_list_agents,
    .get_records = sqlite_get_records,
    .get_losses = sqlite_get_losses,
    .get_gaps = sqlite_get_gaps,
    .health = sqlite_health,
    .device_put = sqlite_device_put,
    .device_get = sqlite_device_get,
    .device_list = sqlite_device_list,
    .device_set_enabled = sqlite_device_set_enabled,
};
