/* Receiver store on SQLite: WAL, one write connection and one read connection, each guarded
 * by its own mutex because libmicrohttpd calls handlers from many threads. */
#include "store/store.h"

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <sqlite3.h>

#include <cistern/err.h>
#include <cistern/log.h>

#define SCHEMA_VERSION 1

static const char schema_sql[] =
    "CREATE TABLE IF NOT EXISTS records(agent_id TEXT NOT NULL, epoch INTEGER NOT NULL,"
    " seq INTEGER NOT NULL, ts_ms INTEGER NOT NULL, stream TEXT NOT NULL, content_type TEXT,"
    " payload BLOB NOT NULL, received_ms INTEGER NOT NULL, PRIMARY KEY(agent_id, epoch, seq))"
    " WITHOUT ROWID;"
    "CREATE TABLE IF NOT EXISTS agents(id TEXT PRIMARY KEY, first_seen_ms INTEGER NOT NULL,"
    " last_seen_ms INTEGER NOT NULL, spool_depth INTEGER NOT NULL DEFAULT 0,"
    " oldest_pending_ms INTEGER NOT NULL DEFAULT 0, records INTEGER NOT NULL DEFAULT 0);"
    "CREATE TABLE IF NOT EXISTS losses(agent_id TEXT NOT NULL, epoch INTEGER NOT NULL,"
    " id INTEGER NOT NULL, reason TEXT NOT NULL, first_seq INTEGER NOT NULL,"
    " last_seq INTEGER NOT NULL, count INTEGER NOT NULL, ts_ms INTEGER NOT NULL, detail TEXT,"
    " received_ms INTEGER NOT NULL, PRIMARY KEY(agent_id, epoch, id));"
    "CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value INTEGER NOT NULL);"
    "INSERT OR IGNORE INTO meta(key, value) VALUES('schema_version', 1);";

static const char ins_record_sql[] =
    "INSERT OR IGNORE INTO records(agent_id, epoch, seq, ts_ms, stream, content_type, payload,"
    " received_ms) VALUES(?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)";
static const char upsert_agent_sql[] =
    "INSERT INTO agents(id, first_seen_ms, last_seen_ms, spool_depth, oldest_pending_ms, records)"
    " VALUES(?1, ?2, ?2, ?3, ?4, ?5) ON CONFLICT(id) DO UPDATE SET"
    " last_seen_ms = max(last_seen_ms, excluded.last_seen_ms),"
    " spool_depth = excluded.spool_depth, oldest_pending_ms = excluded.oldest_pending_ms,"
    " records = records + excluded.records";
static const char ins_loss_sql[] =
    "INSERT OR IGNORE INTO losses(agent_id, epoch, id, reason, first_seq, last_seq, count, ts_ms,"
    " detail, received_ms) VALUES(?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)";
static const char list_agents_sql[] =
    "SELECT id, first_seen_ms, last_seen_ms, spool_depth, oldest_pending_ms, records"
    " FROM agents ORDER BY id";
static const char agent_exists_sql[] = "SELECT 1 FROM agents WHERE id = ?1";
static const char records_all_sql[] =
    "SELECT epoch, seq, ts_ms, stream, content_type, payload FROM records"
    " WHERE agent_id = ?1 AND seq > ?2 ORDER BY epoch, seq LIMIT ?3";
static const char records_epoch_sql[] =
    "SELECT epoch, seq, ts_ms, stream, content_type, payload FROM records"
    " WHERE agent_id = ?1 AND epoch = ?4 AND seq > ?2 ORDER BY seq LIMIT ?3";

struct recv_store {
    pthread_mutex_t wlock; /* guards wdb and its statements */
    pthread_mutex_t rlock; /* guards rdb and its statements */
    sqlite3 *wdb, *rdb;
    sqlite3_stmt *ins_record, *upsert_agent, *ins_loss;
    sqlite3_stmt *list_agents, *agent_exists, *records_all, *records_epoch;
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

static void sqlite_close(struct recv_store *s)
{
    if (s == NULL)
        return;
    sqlite3_finalize(s->ins_record);
    sqlite3_finalize(s->upsert_agent);
    sqlite3_finalize(s->ins_loss);
    sqlite3_finalize(s->list_agents);
    sqlite3_finalize(s->agent_exists);
    sqlite3_finalize(s->records_all);
    sqlite3_finalize(s->records_epoch);
    sqlite3_close(s->rdb);
    sqlite3_close(s->wdb);
    pthread_mutex_destroy(&s->wlock);
    pthread_mutex_destroy(&s->rlock);
    free(s);
}

static int sqlite_open(const struct recv_store_opts *o, struct recv_store **out, char *err,
                       size_t errlen)
{
    struct recv_store *s = NULL;
    sqlite3_stmt *st = NULL;
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
    rc = exec(s->wdb, "BEGIN IMMEDIATE", err, errlen);
    if (rc)
        goto out;
    rc = exec(s->wdb, schema_sql, err, errlen);
    if (rc) {
        char dummy[8];
        exec(s->wdb, "ROLLBACK", dummy, sizeof dummy);
        goto out;
    }
    rc = exec(s->wdb, "COMMIT", err, errlen);
    if (rc)
        goto out;

    rc = prep(s->wdb, "SELECT value FROM meta WHERE key = 'schema_version'", &st, err, errlen);
    if (rc)
        goto out;
    if (sqlite3_step(st) != SQLITE_ROW || sqlite3_column_int64(st, 0) != SCHEMA_VERSION) {
        snprintf(err, errlen, "%s: unknown schema version (this receiver knows %d)", o->path,
                 SCHEMA_VERSION);
        rc = CIS_EDB;
        goto out;
    }

    rc = open_conn(o, 1, &s->rdb, err, errlen);
    if (rc)
        goto out;
    if ((rc = prep(s->wdb, ins_record_sql, &s->ins_record, err, errlen)) ||
        (rc = prep(s->wdb, upsert_agent_sql, &s->upsert_agent, err, errlen)) ||
        (rc = prep(s->wdb, ins_loss_sql, &s->ins_loss, err, errlen)) ||
        (rc = prep(s->rdb, list_agents_sql, &s->list_agents, err, errlen)) ||
        (rc = prep(s->rdb, agent_exists_sql, &s->agent_exists, err, errlen)) ||
        (rc = prep(s->rdb, records_all_sql, &s->records_all, err, errlen)) ||
        (rc = prep(s->rdb, records_epoch_sql, &s->records_epoch, err, errlen)))
        goto out;
    *out = s;
    s = NULL;
out:
    sqlite3_finalize(st);
    sqlite_close(s);
    return rc;
}

/* Step a write statement to completion; reset it either way. */
static int step_done(sqlite3_stmt *st)
{
    int rc = sqlite3_step(st);
    sqlite3_reset(st);
    sqlite3_clear_bindings(st);
    return rc == SQLITE_DONE ? SQLITE_OK : rc;
}

static int sqlite_put_batch(struct recv_store *s, const struct cis_decoded_batch *b,
                            int64_t now_ms, struct recv_put_result *res)
{
    const Cistern__V1__BatchHeader *h = b->pb->header;
    const char *agent = h->agent_id;
    sqlite3_int64 epoch = (sqlite3_int64)h->epoch;
    uint64_t accepted = 0, duplicates = 0;
    int rc = SQLITE_OK, in_tx = 0;

    pthread_mutex_lock(&s->wlock);
    /* The whole batch is one transaction: the agent is acknowledged only after COMMIT, and a
     * failure leaves nothing from the batch behind, so a retry starts clean. IMMEDIATE takes
     * the write lock up front (busy_timeout applies) instead of failing mid-way. */
    rc = sqlite3_exec(s->wdb, "BEGIN IMMEDIATE", NULL, NULL, NULL);
    if (rc != SQLITE_OK)
        goto out;
    in_tx = 1;

    for (size_t i = 0; i < b->nsegs; i++) {
        const Cistern__V1__SegmentBody *body = b->segs[i].body;
        for (size_t j = 0; j < body->n_records; j++) {
            const Cistern__V1__Record *r = body->records[j];
            sqlite3_stmt *st = s->ins_record;
            sqlite3_bind_text(st, 1, agent, -1, SQLITE_STATIC);
            sqlite3_bind_int64(st, 2, epoch);
            sqlite3_bind_int64(st, 3, (sqlite3_int64)r->seq);
            sqlite3_bind_int64(st, 4, r->ts_ms);
            sqlite3_bind_text(st, 5, r->stream ? r->stream : "", -1, SQLITE_STATIC);
            if (r->content_type != NULL && r->content_type[0] != '\0')
                sqlite3_bind_text(st, 6, r->content_type, -1, SQLITE_STATIC);
            else
                sqlite3_bind_null(st, 6);
            /* zeroblob-safe: a NULL data pointer with length 0 would bind NULL, which the
             * NOT NULL column rejects. */
            sqlite3_bind_blob(st, 7, r->payload.len ? (const void *)r->payload.data : "",
                              (int)r->payload.len, SQLITE_STATIC);
            sqlite3_bind_int64(st, 8, now_ms);
            rc = step_done(st);
            if (rc != SQLITE_OK)
                goto out;
            if (sqlite3_changes(s->wdb) == 1)
                accepted++;
            else
                duplicates++;
        }
    }

    sqlite3_bind_text(s->upsert_agent, 1, agent, -1, SQLITE_STATIC);
    sqlite3_bind_int64(s->upsert_agent, 2, now_ms);
    sqlite3_bind_int64(s->upsert_agent, 3,
                       h->spool_depth > (uint64_t)INT64_MAX ? INT64_MAX
                                                            : (sqlite3_int64)h->spool_depth);
    sqlite3_bind_int64(s->upsert_agent, 4, h->oldest_pending_ms);
    sqlite3_bind_int64(s->upsert_agent, 5, (sqlite3_int64)accepted);
    rc = step_done(s->upsert_agent);
    if (rc != SQLITE_OK)
        goto out;

    for (size_t i = 0; i < h->n_losses; i++) {
        const Cistern__V1__LossEntry *l = h->losses[i];
        sqlite3_stmt *st = s->ins_loss;
        sqlite3_bind_text(st, 1, agent, -1, SQLITE_STATIC);
        sqlite3_bind_int64(st, 2, (sqlite3_int64)l->epoch);
        sqlite3_bind_int64(st, 3, (sqlite3_int64)l->id);
        sqlite3_bind_text(st, 4, l->reason ? l->reason : "", -1, SQLITE_STATIC);
        sqlite3_bind_int64(st, 5, (sqlite3_int64)l->first_seq);
        sqlite3_bind_int64(st, 6, (sqlite3_int64)l->last_seq);
        sqlite3_bind_int64(st, 7, (sqlite3_int64)l->count);
        sqlite3_bind_int64(st, 8, l->ts_ms);
        if (l->detail != NULL && l->detail[0] != '\0')
            sqlite3_bind_text(st, 9, l->detail, -1, SQLITE_STATIC);
        else
            sqlite3_bind_null(st, 9);
        sqlite3_bind_int64(st, 10, now_ms);
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

static int sqlite_get_records(struct recv_store *s, const struct recv_records_query *q,
                              recv_record_cb cb, void *ud)
{
    sqlite3_stmt *st;
    int rc, ret = 0;

    pthread_mutex_lock(&s->rlock);
    /* Read the existence check and the rows in one read transaction (one WAL snapshot). */
    rc = sqlite3_exec(s->rdb, "BEGIN", NULL, NULL, NULL);
    if (rc != SQLITE_OK) {
        ret = sqlite_err(rc);
        goto unlock;
    }
    sqlite3_bind_text(s->agent_exists, 1, q->agent_id, -1, SQLITE_STATIC);
    rc = sqlite3_step(s->agent_exists);
    sqlite3_reset(s->agent_exists);
    sqlite3_clear_bindings(s->agent_exists);
    if (rc == SQLITE_DONE) {
        ret = CIS_ENOTFOUND;
        goto out;
    }
    if (rc != SQLITE_ROW) {
        ret = sqlite_err(rc);
        goto out;
    }

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
    sqlite3_reset(st);
    sqlite3_clear_bindings(st);
out:
    sqlite3_exec(s->rdb, "COMMIT", NULL, NULL, NULL);
unlock:
    pthread_mutex_unlock(&s->rlock);
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

const struct recv_store_ops recv_store_sqlite = {
    .name = "sqlite",
    .open = sqlite_open,
    .close = sqlite_close,
    .put_batch = sqlite_put_batch,
    .list_agents = sqlite_list_agents,
    .get_records = sqlite_get_records,
    .health = sqlite_health,
};
