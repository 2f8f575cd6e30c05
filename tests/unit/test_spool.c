/* Unit tests for the agent's SQLite segment spool (edge-agent/spool.c). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cmocka.h>
#include <sqlite3.h>

#include "cistern/backoff.h"
#include "cistern/codec.h"
#include "cistern/err.h"
#include "spool.h"

struct fx {
    char dir[64];
    char path[128];
};

static int fx_setup(void **state)
{
    struct fx *f = calloc(1, sizeof(*f));
    if (!f)
        return -1;
    snprintf(f->dir, sizeof(f->dir), "/tmp/cistern-spool-XXXXXX");
    if (!mkdtemp(f->dir)) {
        free(f);
        return -1;
    }
    snprintf(f->path, sizeof(f->path), "%s/spool.db", f->dir);
    *state = f;
    return 0;
}

static void fx_rm(const char *dir, const char *name)
{
    char p[192];
    snprintf(p, sizeof(p), "%s/%s", dir, name);
    unlink(p);
}

static int fx_teardown(void **state)
{
    struct fx *f = *state;
    static const char *const names[] = {"spool.db", "spool.db-wal", "spool.db-shm", "b.db",
                                        "b.db-wal", "b.db-shm",     "junk.db"};
    for (size_t i = 0; i < sizeof(names) / sizeof(names[0]); i++)
        fx_rm(f->dir, names[i]);
    assert_int_equal(rmdir(f->dir), 0);
    free(f);
    return 0;
}

static struct agent_spool *sp_open(const char *path)
{
    struct agent_spool_opts o = {.path = path, .sync_full = 0, .zstd_level = 3};
    struct agent_spool *s = NULL;
    char err[256] = "";
    int rc = agent_spool_open(&o, &s, err, sizeof(err));
    if (rc)
        fprintf(stderr, "open failed: %d %s\n", rc, err);
    assert_int_equal(rc, 0);
    assert_non_null(s);
    return s;
}

/* An external connection, as a test or a `status` command would open it. */
static sqlite3 *ext_open(const char *path)
{
    sqlite3 *db = NULL;
    assert_int_equal(sqlite3_open_v2(path, &db, SQLITE_OPEN_READWRITE, NULL), SQLITE_OK);
    sqlite3_busy_timeout(db, 5000);
    return db;
}

static int64_t ext_int(sqlite3 *db, const char *sql)
{
    sqlite3_stmt *st = NULL;
    assert_int_equal(sqlite3_prepare_v2(db, sql, -1, &st, NULL), SQLITE_OK);
    assert_int_equal(sqlite3_step(st), SQLITE_ROW);
    int64_t v = sqlite3_column_int64(st, 0);
    sqlite3_finalize(st);
    return v;
}

static void ext_exec(sqlite3 *db, const char *sql)
{
    char *msg = NULL;
    int rc = sqlite3_exec(db, sql, NULL, NULL, &msg);
    if (rc != SQLITE_OK)
        fprintf(stderr, "%s: %s\n", sql, msg ? msg : "?");
    sqlite3_free(msg);
    assert_int_equal(rc, SQLITE_OK);
}

static int64_t db_int(const char *path, const char *sql)
{
    sqlite3 *db = ext_open(path);
    int64_t v = ext_int(db, sql);
    sqlite3_close(db);
    return v;
}

/* Fill N records; payload "p<i>" in BUFS (N * 16 bytes). */
static void mkrecs(struct cis_record *r, char *bufs, size_t n, const char *stream)
{
    for (size_t i = 0; i < n; i++) {
        char *b = bufs + i * 16;
        int len = snprintf(b, 16, "p%zu", i);
        r[i] = (struct cis_record){.seq = 999999,
                                   .ts_ms = 1000 + (int64_t)i,
                                   .stream = stream,
                                   .content_type = "text/plain",
                                   .payload = (const uint8_t *)b,
                                   .payload_len = (size_t)len};
    }
}

/* Commit N records all of class PRIO; returns the first assigned seq. */
static uint64_t commit_n(struct agent_spool *s, size_t n, uint32_t prio)
{
    struct cis_record r[16];
    char bufs[16 * 16];
    uint32_t p[16];
    assert_true(n <= 16);
    mkrecs(r, bufs, n, "t");
    for (size_t i = 0; i < n; i++)
        p[i] = prio;
    assert_int_equal(agent_spool_commit(s, r, p, n), 0);
    return r[0].seq;
}

static void ack_all(struct agent_spool *s)
{
    struct agent_spool_seg *g = NULL;
    size_t n = 0;
    assert_int_equal(agent_spool_claim(s, SIZE_MAX, SIZE_MAX, &g, &n), 0);
    uint64_t firsts[64];
    assert_true(n <= 64);
    for (size_t i = 0; i < n; i++)
        firsts[i] = g[i].seg.first_seq;
    assert_int_equal(agent_spool_ack(s, firsts, n), 0);
    agent_spool_segs_free(g, n);
}

/* ---- tests ---- */

static void test_commit_groups_by_priority(void **state)
{
    struct fx *f = *state;
    struct agent_spool *s = sp_open(f->path);
    struct cis_record r[6];
    char bufs[6 * 16];
    mkrecs(r, bufs, 6, "s");
    const uint32_t p[6] = {CIS_PRIO_LOW,  CIS_PRIO_HIGH, CIS_PRIO_NORMAL,
                           CIS_PRIO_HIGH, CIS_PRIO_LOW,  CIS_PRIO_NORMAL};
    assert_int_equal(agent_spool_commit(s, r, p, 6), 0);
    /* high gets the lowest seqs, stable order inside each class */
    assert_int_equal(r[1].seq, 1);
    assert_int_equal(r[3].seq, 2);
    assert_int_equal(r[2].seq, 3);
    assert_int_equal(r[5].seq, 4);
    assert_int_equal(r[0].seq, 5);
    assert_int_equal(r[4].seq, 6);

    sqlite3 *db = ext_open(f->path);
    assert_int_equal(ext_int(db, "SELECT count(*) FROM segments"), 3);
    assert_int_equal(ext_int(db, "SELECT priority FROM segments WHERE first_seq=1 AND last_seq=2"
                                 " AND record_count=2"),
                     CIS_PRIO_HIGH);
    assert_int_equal(ext_int(db, "SELECT priority FROM segments WHERE first_seq=3 AND last_seq=4"
                                 " AND record_count=2"),
                     CIS_PRIO_NORMAL);
    assert_int_equal(ext_int(db, "SELECT priority FROM segments WHERE first_seq=5 AND last_seq=6"
                                 " AND record_count=2"),
                     CIS_PRIO_LOW);
    assert_int_equal(ext_int(db, "SELECT value FROM meta WHERE key='next_seq'"), 7);
    assert_int_equal(ext_int(db, "SELECT value FROM meta WHERE key='schema_version'"), 1);
    assert_int_equal(ext_int(db, "SELECT count(*) FROM pragma_index_list('segments')"
                                 " WHERE name='segments_prio'"),
                     1);
    sqlite3_stmt *st = NULL;
    assert_int_equal(sqlite3_prepare_v2(db, "PRAGMA journal_mode", -1, &st, NULL), SQLITE_OK);
    assert_int_equal(sqlite3_step(st), SQLITE_ROW);
    assert_string_equal((const char *)sqlite3_column_text(st, 0), "wal");
    sqlite3_finalize(st);

    /* one class only: one segment, contiguous after the last */
    assert_int_equal(commit_n(s, 4, CIS_PRIO_NORMAL), 7);
    assert_int_equal(ext_int(db, "SELECT count(*) FROM segments"), 4);
    assert_int_equal(ext_int(db, "SELECT last_seq FROM segments WHERE first_seq=7"), 10);
    assert_int_equal(ext_int(db, "SELECT value FROM meta WHERE key='next_seq'"), 11);
    sqlite3_close(db);

    /* zero records: a no-op; a bad priority: refused, nothing changes */
    assert_int_equal(agent_spool_commit(s, r, p, 0), 0);
    const uint32_t bad[1] = {CIS_PRIO_COUNT};
    assert_int_equal(agent_spool_commit(s, r, bad, 1), CIS_EINVAL);
    struct agent_spool_stats st2;
    agent_spool_stats(s, &st2);
    assert_int_equal(st2.next_seq, 11);
    agent_spool_close(s);
}

static void test_seq_never_reused(void **state)
{
    struct fx *f = *state;
    struct agent_spool *s = sp_open(f->path);
    assert_int_equal(commit_n(s, 3, CIS_PRIO_NORMAL), 1);
    ack_all(s);
    assert_int_equal(db_int(f->path, "SELECT count(*) FROM segments"), 0);
    agent_spool_close(s);

    s = sp_open(f->path);
    struct agent_spool_stats st;
    agent_spool_stats(s, &st);
    assert_int_equal(st.next_seq, 4);
    assert_int_equal(st.pending_segments, 0);
    assert_int_equal(commit_n(s, 2, CIS_PRIO_HIGH), 4);
    agent_spool_close(s);
}

static void test_epoch(void **state)
{
    struct fx *f = *state;
    struct agent_spool *s = sp_open(f->path);
    uint64_t e = agent_spool_epoch(s);
    assert_true(e != 0);
    assert_true(e <= (uint64_t)INT64_MAX);
    agent_spool_close(s);
    assert_int_equal((uint64_t)db_int(f->path, "SELECT value FROM meta WHERE key='epoch'"), e);

    s = sp_open(f->path);
    assert_int_equal(agent_spool_epoch(s), e);
    agent_spool_close(s);

    char other[192];
    snprintf(other, sizeof(other), "%s/b.db", f->dir);
    s = sp_open(other);
    assert_true(agent_spool_epoch(s) != e);
    assert_true(agent_spool_epoch(s) != 0);
    agent_spool_close(s);
}

static void test_claim_order(void **state)
{
    struct fx *f = *state;
    struct agent_spool *s = sp_open(f->path);
    struct cis_record r[3];
    char bufs[3 * 16];
    mkrecs(r, bufs, 3, "s");
    const uint32_t p1[3] = {CIS_PRIO_LOW, CIS_PRIO_NORMAL, CIS_PRIO_HIGH};
    assert_int_equal(agent_spool_commit(s, r, p1, 3), 0); /* high 1, normal 2, low 3 */
    const uint32_t p2[2] = {CIS_PRIO_LOW, CIS_PRIO_HIGH};
    assert_int_equal(agent_spool_commit(s, r, p2, 2), 0); /* high 4, low 5 */
    assert_int_equal(commit_n(s, 1, CIS_PRIO_NORMAL), 6);

    struct agent_spool_seg *g = NULL;
    size_t n = 0;
    assert_int_equal(agent_spool_claim(s, 100, SIZE_MAX, &g, &n), 0);
    assert_int_equal(n, 6);
    const uint64_t want[6] = {1, 4, 2, 6, 3, 5};
    const uint32_t wantp[6] = {0, 0, 1, 1, 2, 2};
    for (size_t i = 0; i < n; i++) {
        assert_int_equal(g[i].seg.first_seq, want[i]);
        assert_int_equal(g[i].seg.last_seq, want[i]);
        assert_int_equal(g[i].seg.record_count, 1);
        assert_int_equal(g[i].seg.priority, wantp[i]);
        assert_ptr_equal(g[i].seg.data, g[i].data);
        assert_true(g[i].seg.data_len > 0);
        assert_true(g[i].created_ms > 0);
    }
    agent_spool_segs_free(g, n);
    agent_spool_close(s);
}

static void test_claim_limits(void **state)
{
    struct fx *f = *state;
    struct agent_spool *s = sp_open(f->path);
    commit_n(s, 2, CIS_PRIO_NORMAL); /* 1..2 */
    commit_n(s, 2, CIS_PRIO_NORMAL); /* 3..4 */
    commit_n(s, 2, CIS_PRIO_NORMAL); /* 5..6 */
    struct agent_spool_seg *g = NULL;
    size_t n = 0;
    uint64_t f1;

    /* max_records 3: the second segment would make 4 */
    assert_int_equal(agent_spool_claim(s, 3, SIZE_MAX, &g, &n), 0);
    assert_int_equal(n, 1);
    f1 = g[0].seg.first_seq;
    assert_int_equal(f1, 1);
    size_t len1 = g[0].seg.data_len;
    agent_spool_segs_free(g, n);
    agent_spool_release(s, &f1, 1);

    /* exactly 4 records fit two */
    assert_int_equal(agent_spool_claim(s, 4, SIZE_MAX, &g, &n), 0);
    assert_int_equal(n, 2);
    uint64_t fs[2] = {g[0].seg.first_seq, g[1].seg.first_seq};
    size_t len2 = g[1].seg.data_len;
    agent_spool_segs_free(g, n);
    agent_spool_release(s, fs, 2);

    /* always at least one, even if alone it exceeds the limits */
    assert_int_equal(agent_spool_claim(s, 1, 1, &g, &n), 0);
    assert_int_equal(n, 1);
    assert_int_equal(g[0].seg.first_seq, 1);
    agent_spool_segs_free(g, n);
    agent_spool_release(s, &f1, 1);
    assert_int_equal(agent_spool_claim(s, 0, 0, &g, &n), 0);
    assert_int_equal(n, 1);
    agent_spool_segs_free(g, n);
    agent_spool_release(s, &f1, 1);

    /* max_bytes: exactly the first two blobs fit, one byte less fits one */
    assert_int_equal(agent_spool_claim(s, 100, len1 + len2, &g, &n), 0);
    assert_int_equal(n, 2);
    agent_spool_segs_free(g, n);
    agent_spool_release(s, fs, 2);
    assert_int_equal(agent_spool_claim(s, 100, len1 + len2 - 1, &g, &n), 0);
    assert_int_equal(n, 1);
    agent_spool_segs_free(g, n);
    agent_spool_release(s, &f1, 1);

    struct agent_spool_stats st;
    agent_spool_stats(s, &st);
    assert_int_equal(st.inflight_segments, 0);
    agent_spool_close(s);
}

static void test_inflight_not_reclaimed_until_released(void **state)
{
    struct fx *f = *state;
    struct agent_spool *s = sp_open(f->path);
    commit_n(s, 1, CIS_PRIO_NORMAL); /* 1 */
    commit_n(s, 1, CIS_PRIO_NORMAL); /* 2 */
    struct agent_spool_seg *g = NULL;
    size_t n = 0;
    struct agent_spool_stats st;

    assert_int_equal(agent_spool_claim(s, 1, SIZE_MAX, &g, &n), 0);
    assert_int_equal(n, 1);
    assert_int_equal(g[0].seg.first_seq, 1);
    agent_spool_segs_free(g, n);
    agent_spool_stats(s, &st);
    assert_int_equal(st.inflight_segments, 1);

    assert_int_equal(agent_spool_claim(s, 1, SIZE_MAX, &g, &n), 0);
    assert_int_equal(n, 1);
    assert_int_equal(g[0].seg.first_seq, 2);
    agent_spool_segs_free(g, n);

    assert_int_equal(agent_spool_claim(s, 100, SIZE_MAX, &g, &n), 0);
    assert_int_equal(n, 0);
    assert_null(g);

    uint64_t one = 1;
    agent_spool_release(s, &one, 1);
    agent_spool_stats(s, &st);
    assert_int_equal(st.inflight_segments, 1);
    assert_int_equal(st.pending_segments, 2); /* in flight still counts as stored */
    assert_int_equal(agent_spool_claim(s, 100, SIZE_MAX, &g, &n), 0);
    assert_int_equal(n, 1);
    assert_int_equal(g[0].seg.first_seq, 1);
    agent_spool_segs_free(g, n);
    agent_spool_close(s);
}

static void test_inflight_pending_after_reopen(void **state)
{
    struct fx *f = *state;
    struct agent_spool *s = sp_open(f->path);
    commit_n(s, 2, CIS_PRIO_HIGH);
    commit_n(s, 3, CIS_PRIO_LOW);
    struct agent_spool_seg *g = NULL;
    size_t n = 0;
    assert_int_equal(agent_spool_claim(s, 100, SIZE_MAX, &g, &n), 0);
    assert_int_equal(n, 2);
    agent_spool_segs_free(g, n);
    agent_spool_close(s); /* "crash" with both in flight */

    s = sp_open(f->path);
    struct agent_spool_stats st;
    agent_spool_stats(s, &st);
    assert_int_equal(st.inflight_segments, 0);
    assert_int_equal(st.pending_segments, 2);
    assert_int_equal(st.pending_records, 5);
    assert_int_equal(agent_spool_claim(s, 100, SIZE_MAX, &g, &n), 0);
    assert_int_equal(n, 2);
    assert_int_equal(g[0].seg.first_seq, 1);
    assert_int_equal(g[1].seg.first_seq, 3);
    agent_spool_segs_free(g, n);
    agent_spool_close(s);
}

static void test_ack_deletes(void **state)
{
    struct fx *f = *state;
    struct agent_spool *s = sp_open(f->path);
    commit_n(s, 2, CIS_PRIO_NORMAL); /* 1..2 */
    commit_n(s, 3, CIS_PRIO_NORMAL); /* 3..5 */
    struct agent_spool_seg *g = NULL;
    size_t n = 0;
    assert_int_equal(agent_spool_claim(s, 100, SIZE_MAX, &g, &n), 0);
    assert_int_equal(n, 2);
    agent_spool_segs_free(g, n);

    uint64_t first = 1;
    assert_int_equal(agent_spool_ack(s, &first, 1), 0);
    assert_int_equal(db_int(f->path, "SELECT count(*) FROM segments WHERE first_seq=1"), 0);
    assert_int_equal(db_int(f->path, "SELECT count(*) FROM segments WHERE first_seq=3"), 1);
    struct agent_spool_stats st;
    agent_spool_stats(s, &st);
    assert_int_equal(st.pending_segments, 1);
    assert_int_equal(st.pending_records, 3);
    assert_int_equal(st.inflight_segments, 1);
    /* a repeated or unknown ack changes nothing */
    uint64_t again[2] = {1, 77};
    assert_int_equal(agent_spool_ack(s, again, 2), 0);
    agent_spool_stats(s, &st);
    assert_int_equal(st.pending_segments, 1);
    assert_int_equal(st.pending_records, 3);
    assert_int_equal(st.ledger_unsent, 0);
    assert_int_equal(db_int(f->path, "SELECT count(*) FROM ledger"), 0);
    agent_spool_close(s);
}

static void test_reject_and_ledger(void **state)
{
    struct fx *f = *state;
    struct agent_spool *s = sp_open(f->path);
    commit_n(s, 2, CIS_PRIO_NORMAL); /* 1..2 */
    commit_n(s, 3, CIS_PRIO_NORMAL); /* 3..5 */
    commit_n(s, 1, CIS_PRIO_NORMAL); /* 6 */
    uint64_t rej[2] = {1, 3};
    assert_int_equal(agent_spool_reject(s, rej, 2, "422 bad stream"), 0);

    sqlite3 *db = ext_open(f->path);
    assert_int_equal(ext_int(db, "SELECT count(*) FROM segments"), 1);
    assert_int_equal(ext_int(db, "SELECT count(*) FROM ledger"), 2);
    assert_int_equal(ext_int(db, "SELECT count(*) FROM ledger WHERE reason='rejected' AND"
                                 " detail='422 bad stream' AND sent=0"),
                     2);
    assert_int_equal(ext_int(db, "SELECT count FROM ledger WHERE first_seq=3 AND last_seq=5"), 3);
    assert_int_equal(ext_int(db, "SELECT count FROM ledger WHERE first_seq=1 AND last_seq=2"), 2);
    assert_int_equal((uint64_t)ext_int(db, "SELECT epoch FROM ledger WHERE first_seq=1"),
                     agent_spool_epoch(s));
    sqlite3_close(db);

    struct agent_spool_stats st;
    agent_spool_stats(s, &st);
    assert_int_equal(st.ledger_unsent, 2);
    assert_int_equal(st.pending_segments, 1);
    assert_int_equal(st.pending_records, 1);

    Cistern__V1__LossEntry *e = NULL;
    size_t n = 0;
    assert_int_equal(agent_spool_ledger_unsent(s, 1, &e, &n), 0);
    assert_int_equal(n, 1);
    assert_int_equal(e[0].first_seq, 1);
    agent_spool_ledger_free(e, n);

    assert_int_equal(agent_spool_ledger_unsent(s, 10, &e, &n), 0);
    assert_int_equal(n, 2);
    assert_string_equal(e[0].reason, "rejected");
    assert_string_equal(e[0].detail, "422 bad stream");
    assert_int_equal(e[0].epoch, agent_spool_epoch(s));
    assert_int_equal(e[0].first_seq, 1);
    assert_int_equal(e[0].last_seq, 2);
    assert_int_equal(e[0].count, 2);
    assert_true(e[0].ts_ms > 0);
    assert_int_equal(e[1].first_seq, 3);
    assert_int_equal(e[1].last_seq, 5);
    assert_int_equal(e[1].count, 3);
    assert_true(e[0].id < e[1].id);
    uint64_t id0 = e[0].id;
    /* each entry packs as a valid protobuf message */
    size_t plen = cistern__v1__loss_entry__get_packed_size(&e[0]);
    assert_true(plen > 0);
    agent_spool_ledger_free(e, n);

    assert_int_equal(agent_spool_ledger_mark_sent(s, &id0, 1), 0);
    assert_int_equal(agent_spool_ledger_mark_sent(s, &id0, 1), 0); /* idempotent */
    agent_spool_stats(s, &st);
    assert_int_equal(st.ledger_unsent, 1);
    assert_int_equal(db_int(f->path, "SELECT count(*) FROM ledger"), 2); /* rows kept */
    assert_int_equal(db_int(f->path, "SELECT count(*) FROM ledger WHERE sent=1"), 1);
    assert_int_equal(agent_spool_ledger_unsent(s, 10, &e, &n), 0);
    assert_int_equal(n, 1);
    assert_int_equal(e[0].first_seq, 3);
    agent_spool_ledger_free(e, n);

    /* a NULL detail is allowed */
    uint64_t six = 6;
    assert_int_equal(agent_spool_reject(s, &six, 1, NULL), 0);
    agent_spool_close(s);

    s = sp_open(f->path);
    agent_spool_stats(s, &st);
    assert_int_equal(st.ledger_unsent, 2);
    assert_int_equal(st.pending_segments, 0);
    assert_int_equal(st.oldest_created_ms, 0);
    assert_int_equal(agent_spool_ledger_unsent(s, 10, &e, &n), 0);
    assert_int_equal(n, 2);
    assert_string_equal(e[1].detail, "");
    agent_spool_ledger_free(e, n);
    assert_int_equal(agent_spool_ledger_unsent(s, 0, &e, &n), 0);
    assert_int_equal(n, 0);
    agent_spool_close(s);
}

static void test_stats(void **state)
{
    struct fx *f = *state;
    struct agent_spool *s = sp_open(f->path);
    struct agent_spool_stats st;
    agent_spool_stats(s, &st);
    assert_int_equal(st.pending_records, 0);
    assert_int_equal(st.pending_segments, 0);
    assert_int_equal(st.inflight_segments, 0);
    assert_int_equal(st.next_seq, 1);
    assert_int_equal(st.ledger_unsent, 0);
    assert_int_equal(st.oldest_created_ms, 0);

    int64_t t0 = cis_wall_ms();
    commit_n(s, 3, CIS_PRIO_LOW);
    int64_t t1 = cis_wall_ms();
    commit_n(s, 2, CIS_PRIO_HIGH);
    agent_spool_stats(s, &st);
    assert_int_equal(st.pending_records, 5);
    assert_int_equal(st.pending_segments, 2);
    assert_int_equal(st.next_seq, 6);
    assert_true(st.oldest_created_ms >= t0 && st.oldest_created_ms <= t1);

    /* make the oldest distinguishable, then check reopen and ack recompute it */
    sqlite3 *db = ext_open(f->path);
    ext_exec(db, "UPDATE segments SET created_ms = 111 WHERE first_seq = 1");
    ext_exec(db, "UPDATE segments SET created_ms = 222 WHERE first_seq = 4");
    sqlite3_close(db);
    agent_spool_close(s);
    s = sp_open(f->path);
    agent_spool_stats(s, &st);
    assert_int_equal(st.oldest_created_ms, 111);
    assert_int_equal(st.pending_records, 5);
    assert_int_equal(st.pending_segments, 2);
    uint64_t one = 1;
    assert_int_equal(agent_spool_ack(s, &one, 1), 0);
    agent_spool_stats(s, &st);
    assert_int_equal(st.oldest_created_ms, 222);
    assert_int_equal(st.pending_records, 2);
    assert_int_equal(st.pending_segments, 1);
    ack_all(s);
    agent_spool_stats(s, &st);
    assert_int_equal(st.oldest_created_ms, 0);
    assert_int_equal(st.pending_records, 0);
    assert_int_equal(st.pending_segments, 0);
    assert_int_equal(st.inflight_segments, 0);
    agent_spool_close(s);
}

static void test_decode_claimed_segment(void **state)
{
    struct fx *f = *state;
    struct agent_spool *s = sp_open(f->path);
    struct cis_record r[5];
    char bufs[5 * 16];
    mkrecs(r, bufs, 5, "sensors/a");
    r[4].content_type = NULL;
    /* a large, compressible payload so zstd is used for that segment */
    static uint8_t big[8192];
    memset(big, 'x', sizeof(big));
    r[2].payload = big;
    r[2].payload_len = sizeof(big);
    const uint32_t p[5] = {CIS_PRIO_NORMAL, CIS_PRIO_HIGH, CIS_PRIO_NORMAL, CIS_PRIO_HIGH,
                           CIS_PRIO_NORMAL};
    assert_int_equal(agent_spool_commit(s, r, p, 5), 0);

    struct agent_spool_seg *g = NULL;
    size_t n = 0;
    assert_int_equal(agent_spool_claim(s, 100, SIZE_MAX, &g, &n), 0);
    assert_int_equal(n, 2);
    size_t seen = 0;
    for (size_t k = 0; k < n; k++) {
        Cistern__V1__SegmentBody *body = NULL;
        char why[128] = "";
        int rc = cis_segment_decode(&g[k].seg, 1 << 20, &body, why, sizeof(why));
        if (rc)
            fprintf(stderr, "decode: %s\n", why);
        assert_int_equal(rc, 0);
        assert_int_equal(body->n_records, g[k].seg.record_count);
        for (size_t j = 0; j < body->n_records; j++) {
            const Cistern__V1__Record *pr = body->records[j];
            size_t i;
            for (i = 0; i < 5; i++)
                if (r[i].seq == pr->seq)
                    break;
            assert_true(i < 5);
            assert_int_equal(pr->seq, g[k].seg.first_seq + j);
            assert_int_equal(p[i], g[k].seg.priority);
            assert_int_equal(pr->ts_ms, r[i].ts_ms);
            assert_string_equal(pr->stream, "sensors/a");
            assert_string_equal(pr->content_type, r[i].content_type ? r[i].content_type : "");
            assert_int_equal(pr->payload.len, r[i].payload_len);
            assert_memory_equal(pr->payload.data, r[i].payload, r[i].payload_len);
            seen++;
        }
        cistern__v1__segment_body__free_unpacked(body, NULL);
    }
    assert_int_equal(seen, 5);
    assert_int_equal(g[1].seg.compression, CISTERN__V1__COMPRESSION__COMPRESSION_ZSTD);
    assert_true(g[1].seg.data_len < sizeof(big));
    agent_spool_segs_free(g, n);
    agent_spool_close(s);
}

/* A commit that fails after its segment rows were inserted (a trigger on the meta update)
 * leaves nothing behind: no segments, next_seq unchanged, seqs untouched. */
static void test_commit_failure_rolls_back(void **state)
{
    struct fx *f = *state;
    struct agent_spool *s = sp_open(f->path);
    commit_n(s, 2, CIS_PRIO_NORMAL); /* 1..2 */

    sqlite3 *db = ext_open(f->path);
    ext_exec(db, "CREATE TRIGGER boom BEFORE UPDATE ON meta BEGIN SELECT RAISE(FAIL, 'boom'); END");
    struct cis_record r[3];
    char bufs[3 * 16];
    mkrecs(r, bufs, 3, "s");
    const uint32_t p[3] = {CIS_PRIO_HIGH, CIS_PRIO_LOW, CIS_PRIO_HIGH};
    assert_int_equal(agent_spool_commit(s, r, p, 3), CIS_EDB);
    for (size_t i = 0; i < 3; i++)
        assert_int_equal(r[i].seq, 999999);
    struct agent_spool_stats st;
    agent_spool_stats(s, &st);
    assert_int_equal(st.next_seq, 3);
    assert_int_equal(st.pending_segments, 1);
    assert_int_equal(st.pending_records, 2);
    assert_int_equal(ext_int(db, "SELECT count(*) FROM segments"), 1);
    assert_int_equal(ext_int(db, "SELECT value FROM meta WHERE key='next_seq'"), 3);
    ext_exec(db, "DROP TRIGGER boom");
    sqlite3_close(db);

    assert_int_equal(agent_spool_commit(s, r, p, 3), 0);
    assert_int_equal(r[0].seq, 3);
    assert_int_equal(r[2].seq, 4);
    assert_int_equal(r[1].seq, 5);
    agent_spool_close(s);
}

/* ---- a VFS that can make every write fail with SQLITE_FULL (a full disk) ---- */

static sqlite3_vfs *g_real_vfs;
static sqlite3_vfs g_full_vfs;
static int g_disk_full;

struct full_file {
    sqlite3_file base;
    sqlite3_file *real;
};
#define REAL(f) (((struct full_file *)(f))->real)

static int ff_close(sqlite3_file *f)
{
    return REAL(f)->pMethods->xClose(REAL(f));
}
static int ff_read(sqlite3_file *f, void *b, int n, sqlite3_int64 o)
{
    return REAL(f)->pMethods->xRead(REAL(f), b, n, o);
}
static int ff_write(sqlite3_file *f, const void *b, int n, sqlite3_int64 o)
{
    if (g_disk_full)
        return SQLITE_FULL;
    return REAL(f)->pMethods->xWrite(REAL(f), b, n, o);
}
static int ff_truncate(sqlite3_file *f, sqlite3_int64 sz)
{
    return REAL(f)->pMethods->xTruncate(REAL(f), sz);
}
static int ff_sync(sqlite3_file *f, int fl)
{
    return REAL(f)->pMethods->xSync(REAL(f), fl);
}
static int ff_size(sqlite3_file *f, sqlite3_int64 *sz)
{
    return REAL(f)->pMethods->xFileSize(REAL(f), sz);
}
static int ff_lock(sqlite3_file *f, int l)
{
    return REAL(f)->pMethods->xLock(REAL(f), l);
}
static int ff_unlock(sqlite3_file *f, int l)
{
    return REAL(f)->pMethods->xUnlock(REAL(f), l);
}
static int ff_reserved(sqlite3_file *f, int *out)
{
    return REAL(f)->pMethods->xCheckReservedLock(REAL(f), out);
}
static int ff_fctl(sqlite3_file *f, int op, void *arg)
{
    return REAL(f)->pMethods->xFileControl(REAL(f), op, arg);
}
static int ff_sector(sqlite3_file *f)
{
    return REAL(f)->pMethods->xSectorSize(REAL(f));
}
static int ff_devchar(sqlite3_file *f)
{
    return REAL(f)->pMethods->xDeviceCharacteristics(REAL(f));
}
static int ff_shmmap(sqlite3_file *f, int pg, int sz, int ext, void volatile **pp)
{
    return REAL(f)->pMethods->xShmMap(REAL(f), pg, sz, ext, pp);
}
static int ff_shmlock(sqlite3_file *f, int off, int n, int fl)
{
    return REAL(f)->pMethods->xShmLock(REAL(f), off, n, fl);
}
static void ff_shmbarrier(sqlite3_file *f)
{
    REAL(f)->pMethods->xShmBarrier(REAL(f));
}
static int ff_shmunmap(sqlite3_file *f, int del)
{
    return REAL(f)->pMethods->xShmUnmap(REAL(f), del);
}

static const sqlite3_io_methods ff_methods = {
    .iVersion = 2,
    .xClose = ff_close,
    .xRead = ff_read,
    .xWrite = ff_write,
    .xTruncate = ff_truncate,
    .xSync = ff_sync,
    .xFileSize = ff_size,
    .xLock = ff_lock,
    .xUnlock = ff_unlock,
    .xCheckReservedLock = ff_reserved,
    .xFileControl = ff_fctl,
    .xSectorSize = ff_sector,
    .xDeviceCharacteristics = ff_devchar,
    .xShmMap = ff_shmmap,
    .xShmLock = ff_shmlock,
    .xShmBarrier = ff_shmbarrier,
    .xShmUnmap = ff_shmunmap,
};

static int ff_open(sqlite3_vfs *vfs, const char *name, sqlite3_file *f, int flags, int *outflags)
{
    struct full_file *ff = (struct full_file *)f;
    ff->real = (sqlite3_file *)(ff + 1);
    int rc = g_real_vfs->xOpen(g_real_vfs, name, ff->real, flags, outflags);
    ff->base.pMethods = ff->real->pMethods ? &ff_methods : NULL;
    return rc;
}

static void full_vfs_register(void)
{
    g_real_vfs = sqlite3_vfs_find(NULL);
    assert_non_null(g_real_vfs);
    g_full_vfs = *g_real_vfs;
    g_full_vfs.zName = "cistern-test-full";
    g_full_vfs.szOsFile = (int)sizeof(struct full_file) + g_real_vfs->szOsFile;
    g_full_vfs.xOpen = ff_open;
    assert_int_equal(sqlite3_vfs_register(&g_full_vfs, 1), SQLITE_OK);
}

static void test_commit_disk_full(void **state)
{
    struct fx *f = *state;
    full_vfs_register();
    struct agent_spool *s = sp_open(f->path);
    commit_n(s, 2, CIS_PRIO_NORMAL); /* 1..2 */

    struct cis_record r[4];
    char bufs[4 * 16];
    mkrecs(r, bufs, 4, "s");
    const uint32_t p[4] = {CIS_PRIO_LOW, CIS_PRIO_HIGH, CIS_PRIO_LOW, CIS_PRIO_NORMAL};
    g_disk_full = 1;
    assert_int_equal(agent_spool_commit(s, r, p, 4), CIS_EFULL);
    assert_int_equal(agent_spool_commit(s, r, p, 4), CIS_EFULL); /* and again */
    /* ack/ledger writes fail the same way and change nothing */
    uint64_t one = 1;
    assert_int_equal(agent_spool_ack(s, &one, 1), CIS_EFULL);
    assert_int_equal(agent_spool_reject(s, &one, 1, "x"), CIS_EFULL);
    g_disk_full = 0;

    struct agent_spool_stats st;
    agent_spool_stats(s, &st);
    assert_int_equal(st.next_seq, 3);
    assert_int_equal(st.pending_segments, 1);
    assert_int_equal(st.pending_records, 2);
    assert_int_equal(st.ledger_unsent, 0);
    for (size_t i = 0; i < 4; i++)
        assert_int_equal(r[i].seq, 999999);
    assert_int_equal(db_int(f->path, "SELECT value FROM meta WHERE key='next_seq'"), 3);
    assert_int_equal(db_int(f->path, "SELECT count(*) FROM segments"), 1);

    /* space is back: the same batch commits with the seqs it would have had */
    assert_int_equal(agent_spool_commit(s, r, p, 4), 0);
    assert_int_equal(r[1].seq, 3);
    assert_int_equal(r[3].seq, 4);
    assert_int_equal(r[0].seq, 5);
    assert_int_equal(r[2].seq, 6);
    agent_spool_close(s);

    s = sp_open(f->path);
    agent_spool_stats(s, &st);
    assert_int_equal(st.next_seq, 7);
    assert_int_equal(st.pending_segments, 4);
    assert_int_equal(st.pending_records, 6);
    agent_spool_close(s);
    assert_int_equal(sqlite3_vfs_unregister(&g_full_vfs), SQLITE_OK);
}

static void test_external_reader_does_not_block(void **state)
{
    struct fx *f = *state;
    struct agent_spool *s = sp_open(f->path);
    commit_n(s, 1, CIS_PRIO_NORMAL);
    sqlite3 *db = ext_open(f->path);
    ext_exec(db, "BEGIN");
    assert_int_equal(ext_int(db, "SELECT count(*) FROM segments"), 1); /* holds a read snapshot */
    commit_n(s, 1, CIS_PRIO_NORMAL);
    ack_all(s);
    assert_int_equal(ext_int(db, "SELECT count(*) FROM segments"), 1);
    ext_exec(db, "COMMIT");
    assert_int_equal(ext_int(db, "SELECT count(*) FROM segments"), 0);
    sqlite3_close(db);
    agent_spool_close(s);
}

static void test_open_errors(void **state)
{
    struct fx *f = *state;
    struct agent_spool *s = NULL;
    char err[256] = "";
    char p[192];

    snprintf(p, sizeof(p), "%s/nope/spool.db", f->dir);
    struct agent_spool_opts o = {.path = p, .zstd_level = 3};
    assert_int_equal(agent_spool_open(&o, &s, err, sizeof(err)), CIS_ENOTFOUND);
    assert_null(s);
    assert_non_null(strstr(err, "does not exist"));

    struct agent_spool_opts none = {.path = NULL};
    assert_int_equal(agent_spool_open(&none, &s, err, sizeof(err)), CIS_EINVAL);

    /* not a database */
    snprintf(p, sizeof(p), "%s/junk.db", f->dir);
    FILE *fp = fopen(p, "w");
    assert_non_null(fp);
    for (int i = 0; i < 200; i++)
        fputs("this is not an sqlite database file at all. ", fp);
    fclose(fp);
    assert_int_equal(agent_spool_open(&o, &s, err, sizeof(err)), CIS_ECORRUPT);
    assert_null(s);

    /* a newer schema is refused and left untouched */
    s = sp_open(f->path);
    agent_spool_close(s);
    s = NULL;
    sqlite3 *db = ext_open(f->path);
    ext_exec(db, "UPDATE meta SET value = 2 WHERE key = 'schema_version'");
    sqlite3_close(db);
    o.path = f->path;
    o.sync_full = 1;
    err[0] = 0;
    assert_int_not_equal(agent_spool_open(&o, &s, err, sizeof(err)), 0);
    assert_null(s);
    assert_non_null(strstr(err, "newer"));
    assert_int_equal(db_int(f->path, "SELECT value FROM meta WHERE key='schema_version'"), 2);

    /* next_seq not above the stored seqs: refused as corrupt rather than reusing seqs */
    db = ext_open(f->path);
    ext_exec(db, "UPDATE meta SET value = 1 WHERE key = 'schema_version'");
    sqlite3_close(db);
    s = sp_open(f->path);
    commit_n(s, 3, CIS_PRIO_NORMAL);
    agent_spool_close(s);
    s = NULL;
    db = ext_open(f->path);
    ext_exec(db, "UPDATE meta SET value = 2 WHERE key = 'next_seq'");
    sqlite3_close(db);
    assert_int_equal(agent_spool_open(&o, &s, err, sizeof(err)), CIS_ECORRUPT);
    assert_null(s);

    agent_spool_close(NULL);
    agent_spool_segs_free(NULL, 0);
    agent_spool_ledger_free(NULL, 0);
}

#define T(fn) cmocka_unit_test_setup_teardown(fn, fx_setup, fx_teardown)

int main(void)
{
    const struct CMUnitTest tests[] = {
        T(test_commit_groups_by_priority),
        T(test_seq_never_reused),
        T(test_epoch),
        T(test_claim_order),
        T(test_claim_limits),
        T(test_inflight_not_reclaimed_until_released),
        T(test_inflight_pending_after_reopen),
        T(test_ack_deletes),
        T(test_reject_and_ledger),
        T(test_stats),
        T(test_decode_claimed_segment),
        T(test_commit_failure_rolls_back),
        T(test_commit_disk_full),
        T(test_external_reader_does_not_block),
        T(test_open_errors),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
