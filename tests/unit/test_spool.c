/* Unit tests for the agent's SQLite segment spool (edge-agent/spool.c). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <dirent.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cmocka.h>
#include <sqlite3.h>
#include <zstd.h>

#include "cistern/backoff.h"
#include "cistern/codec.h"
#include "cistern/err.h"
#include "seal.h"
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
    /* every file a test made: databases with their -wal/-shm, key files */
    DIR *d = opendir(f->dir);
    assert_non_null(d);
    struct dirent *e;
    while ((e = readdir(d)) != NULL)
        if (strcmp(e->d_name, ".") != 0 && strcmp(e->d_name, "..") != 0)
            fx_rm(f->dir, e->d_name);
    closedir(d);
    assert_int_equal(rmdir(f->dir), 0);
    free(f);
    return 0;
}

/* Open with O, which must succeed. */
static struct agent_spool *sp_open_with(const struct agent_spool_opts *o)
{
    struct agent_spool *s = NULL;
    char err[256] = "";
    int rc = agent_spool_open(o, &s, err, sizeof(err));
    if (rc)
        fprintf(stderr, "open failed: %d %s\n", rc, err);
    assert_int_equal(rc, 0);
    assert_non_null(s);
    return s;
}

static struct agent_spool *sp_open(const char *path)
{
    struct agent_spool_opts o = {.path = path, .sync_full = 0, .zstd_level = 3};
    return sp_open_with(&o);
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

/* The first column of the first row as text (static buffer: use before the next call). */
static const char *ext_text(sqlite3 *db, const char *sql)
{
    static char out[256];
    sqlite3_stmt *st = NULL;
    assert_int_equal(sqlite3_prepare_v2(db, sql, -1, &st, NULL), SQLITE_OK);
    assert_int_equal(sqlite3_step(st), SQLITE_ROW);
    const char *t = (const char *)sqlite3_column_text(st, 0);
    snprintf(out, sizeof(out), "%s", t ? t : "");
    sqlite3_finalize(st);
    return out;
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
    assert_int_equal(agent_spool_commit(s, r, p, NULL, n), 0);
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
    assert_int_equal(agent_spool_commit(s, r, p, NULL, 6), 0);
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
    assert_int_equal(ext_int(db, "SELECT value FROM meta WHERE key='schema_version'"), 3);
    assert_int_equal(ext_int(db, "SELECT count(*) FROM segments WHERE crc >= 4294967296"), 3);
    assert_int_equal(ext_int(db, "PRAGMA auto_vacuum"), 2); /* incremental: can shrink */
    assert_int_equal(ext_int(db, "SELECT count(*) FROM sqlite_master WHERE type='index' AND"
                                 " name IN ('segments_expires', 'ledger_unsent')"),
                     2);
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
    assert_int_equal(agent_spool_commit(s, r, p, NULL, 0), 0);
    const uint32_t bad[1] = {CIS_PRIO_COUNT};
    assert_int_equal(agent_spool_commit(s, r, bad, NULL, 1), CIS_EINVAL);
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
    assert_int_equal(agent_spool_commit(s, r, p1, NULL, 3), 0); /* high 1, normal 2, low 3 */
    const uint32_t p2[2] = {CIS_PRIO_LOW, CIS_PRIO_HIGH};
    assert_int_equal(agent_spool_commit(s, r, p2, NULL, 2), 0); /* high 4, low 5 */
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

/* The backlog share: newest first within the highest class pending, then the next class,
 * stopping at the first that does not fit; oldest-first claims then skip what it took. */
static void test_claim_newest(void **state)
{
    struct fx *f = *state;
    struct agent_spool *s = sp_open(f->path);
    for (int i = 0; i < 5; i++)
        assert_int_equal(commit_n(s, 10, CIS_PRIO_NORMAL), 1 + 10 * (uint64_t)i); /* 1..50 */
    assert_int_equal(commit_n(s, 10, CIS_PRIO_LOW), 51);                          /* 51..60 */

    struct agent_spool_seg *g = NULL;
    size_t n = 0;
    assert_int_equal(agent_spool_claim_newest(s, 25, SIZE_MAX, &g, &n), 0);
    assert_int_equal(n, 2); /* 41 and 31 fit, 21 would not */
    assert_int_equal(g[0].seg.first_seq, 41);
    assert_int_equal(g[1].seg.first_seq, 31);
    assert_int_equal(g[0].seg.priority, CIS_PRIO_NORMAL);
    agent_spool_segs_free(g, n);

    assert_int_equal(agent_spool_claim(s, 25, SIZE_MAX, &g, &n), 0);
    assert_int_equal(n, 2); /* oldest first: 1, 11 */
    assert_int_equal(g[0].seg.first_seq, 1);
    assert_int_equal(g[1].seg.first_seq, 11);
    agent_spool_segs_free(g, n);

    assert_int_equal(agent_spool_claim_newest(s, 100, SIZE_MAX, &g, &n), 0);
    assert_int_equal(n, 2); /* 21 is the last normal one left; then the low class's 51 */
    assert_int_equal(g[0].seg.first_seq, 21);
    assert_int_equal(g[1].seg.first_seq, 51);
    agent_spool_segs_free(g, n);

    assert_int_equal(agent_spool_claim_newest(s, 100, SIZE_MAX, &g, &n), 0);
    assert_int_equal(n, 0); /* everything is in flight */
    assert_null(g);
    agent_spool_close(s);
}

/* seg_max_records: a commit of 16 records in one class, with a bound of 6, is stored as
 * segments of 6, 6 and 4 in seq order, and a claim of at most 6 records takes exactly one. */
static void test_seg_max_records(void **state)
{
    struct fx *f = *state;
    struct agent_spool_opts o = {.path = f->path, .zstd_level = 3, .seg_max_records = 6};
    struct agent_spool *s = sp_open_with(&o);
    assert_int_equal(commit_n(s, 16, CIS_PRIO_NORMAL), 1);

    struct agent_spool_seg *g = NULL;
    size_t n = 0;
    assert_int_equal(agent_spool_claim(s, 6, SIZE_MAX, &g, &n), 0);
    assert_int_equal(n, 1);
    assert_int_equal(g[0].seg.first_seq, 1);
    assert_int_equal(g[0].seg.record_count, 6);
    agent_spool_segs_free(g, n);
    assert_int_equal(agent_spool_claim(s, SIZE_MAX, SIZE_MAX, &g, &n), 0);
    assert_int_equal(n, 2);
    assert_int_equal(g[0].seg.first_seq, 7);
    assert_int_equal(g[0].seg.record_count, 6);
    assert_int_equal(g[1].seg.first_seq, 13);
    assert_int_equal(g[1].seg.record_count, 4);
    agent_spool_segs_free(g, n);
    agent_spool_close(s);

    /* Without the bound the same commit is one segment. */
    char plain[160];
    snprintf(plain, sizeof(plain), "%s/plain.db", f->dir);
    s = sp_open(plain);
    assert_int_equal(commit_n(s, 16, CIS_PRIO_NORMAL), 1);
    assert_int_equal(agent_spool_claim(s, 6, SIZE_MAX, &g, &n), 0);
    assert_int_equal(n, 1);
    assert_int_equal(g[0].seg.record_count, 16);
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

/* A detail quoting bytes of a corrupt file (SQLite's words do) is stored as printable ASCII:
 * every reader takes the row as text, and the wire as a protobuf string. */
static void test_ledger_detail_printable(void **state)
{
    struct fx *f = *state;
    struct agent_spool *s = sp_open(f->path);
    commit_n(s, 2, CIS_PRIO_NORMAL); /* 1..2 */
    uint64_t one = 1;
    assert_int_equal(agent_spool_reject(s, &one, 1, "bad \xff\xfe\x01 schema\n"), 0);
    sqlite3 *db = ext_open(f->path);
    assert_int_equal(ext_int(db, "SELECT count(*) FROM ledger WHERE detail='bad ??? schema?'"), 1);
    sqlite3_close(db);
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
    /* the spool's TTL clock: the wall clock at open plus monotonic time (within a few ms) */
    assert_true(st.oldest_created_ms >= t0 - 5 && st.oldest_created_ms <= t1 + 5);

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
    assert_int_equal(agent_spool_commit(s, r, p, NULL, 5), 0);

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
    assert_int_equal(agent_spool_commit(s, r, p, NULL, 3), CIS_EDB);
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

    assert_int_equal(agent_spool_commit(s, r, p, NULL, 3), 0);
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
    assert_int_equal(agent_spool_commit(s, r, p, NULL, 4), CIS_ENOSPC);
    assert_int_equal(agent_spool_commit(s, r, p, NULL, 4), CIS_ENOSPC); /* and again */
    /* ack/ledger writes fail the same way and change nothing */
    uint64_t one = 1;
    assert_int_equal(agent_spool_ack(s, &one, 1), CIS_ENOSPC);
    assert_int_equal(agent_spool_reject(s, &one, 1, "x"), CIS_ENOSPC);
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
    assert_int_equal(agent_spool_commit(s, r, p, NULL, 4), 0);
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
    ext_exec(db, "UPDATE meta SET value = 4 WHERE key = 'schema_version'");
    sqlite3_close(db);
    o.path = f->path;
    o.sync_full = 1;
    err[0] = 0;
    assert_int_not_equal(agent_spool_open(&o, &s, err, sizeof(err)), 0);
    assert_null(s);
    assert_non_null(strstr(err, "newer"));
    assert_int_equal(db_int(f->path, "SELECT value FROM meta WHERE key='schema_version'"), 4);

    /* next_seq not above the stored seqs: refused as corrupt rather than reusing seqs */
    db = ext_open(f->path);
    ext_exec(db, "UPDATE meta SET value = 3 WHERE key = 'schema_version'");
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

/* ---- version 2: (priority, ttl) groups, TTL, size and WAL bounds, sealing ---- */

static struct agent_spool *sp_open_opts(const char *path, uint64_t max_size, int reject_new,
                                        uint64_t wal_max, const struct agent_seal *seal)
{
    struct agent_spool_opts o = {.path = path,
                                 .zstd_level = 3,
                                 .max_size = max_size,
                                 .reject_new = reject_new,
                                 .wal_max_size = wal_max,
                                 .seal = seal};
    return sp_open_with(&o);
}

static uint64_t file_size(const char *path)
{
    struct stat sb;
    return stat(path, &sb) == 0 ? (uint64_t)sb.st_size : 0;
}

static uint64_t wal_size(const char *db)
{
    char p[256];
    snprintf(p, sizeof(p), "%s-wal", db);
    return file_size(p);
}

/* Incompressible bytes (xorshift64*), so zstd keeps segments at their raw size. */
static void fill_random(uint8_t *b, size_t n, uint64_t *st)
{
    for (size_t i = 0; i < n; i++) {
        *st ^= *st >> 12;
        *st ^= *st << 25;
        *st ^= *st >> 27;
        b[i] = (uint8_t)((*st * 0x2545F4914F6CDD1DULL) >> 56);
    }
}

/* Commit one record of LEN random bytes with class PRIO (and TTL). Returns commit's result. */
static int commit_big(struct agent_spool *s, uint8_t *buf, size_t len, uint32_t prio, int64_t ttl,
                      uint64_t *rng, uint64_t *seq)
{
    fill_random(buf, len, rng);
    struct cis_record r = {
        .seq = 999999, .ts_ms = 1, .stream = "big", .payload = buf, .payload_len = len};
    int rc = agent_spool_commit(s, &r, &prio, &ttl, 1);
    if (seq)
        *seq = r.seq;
    return rc;
}

static int64_t ext_int_bind(sqlite3 *db, const char *sql, int64_t a)
{
    sqlite3_stmt *st = NULL;
    assert_int_equal(sqlite3_prepare_v2(db, sql, -1, &st, NULL), SQLITE_OK);
    sqlite3_bind_int64(st, 1, a);
    assert_int_equal(sqlite3_step(st), SQLITE_ROW);
    int64_t v = sqlite3_column_int64(st, 0);
    sqlite3_finalize(st);
    return v;
}

static void test_commit_groups_by_priority_and_ttl(void **state)
{
    struct fx *f = *state;
    struct agent_spool *s = sp_open(f->path);
    struct cis_record r[8];
    char bufs[8 * 16];
    mkrecs(r, bufs, 8, "s");
    const uint32_t p[8] = {CIS_PRIO_NORMAL, CIS_PRIO_HIGH, CIS_PRIO_NORMAL, CIS_PRIO_HIGH,
                           CIS_PRIO_NORMAL, CIS_PRIO_HIGH, CIS_PRIO_LOW,    CIS_PRIO_NORMAL};
    const int64_t ttl[8] = {0, 5000, 1000, 0, 0, 5000, 0, 1000};
    /* groups by first appearance: (N,0)={0,4} (H,5000)={1,5} (N,1000)={2,7} (H,0)={3} (L,0)={6};
     * high first: (H,5000) 1..2, (H,0) 3, (N,0) 4..5, (N,1000) 6..7, (L,0) 8 */
    int64_t t0 = cis_wall_ms();
    assert_int_equal(agent_spool_commit(s, r, p, ttl, 8), 0);
    int64_t t1 = cis_wall_ms();
    const uint64_t want[8] = {4, 1, 6, 3, 5, 2, 8, 7};
    for (size_t i = 0; i < 8; i++)
        assert_int_equal(r[i].seq, want[i]);

    sqlite3 *db = ext_open(f->path);
    assert_int_equal(ext_int(db, "SELECT count(*) FROM segments"), 5);
    static const struct {
        uint64_t first, last;
        int prio;
        int64_t ttl;
    } seg[5] = {{1, 2, CIS_PRIO_HIGH, 5000},
                {3, 3, CIS_PRIO_HIGH, 0},
                {4, 5, CIS_PRIO_NORMAL, 0},
                {6, 7, CIS_PRIO_NORMAL, 1000},
                {8, 8, CIS_PRIO_LOW, 0}};
    for (size_t k = 0; k < 5; k++) {
        char q[256];
        snprintf(q, sizeof(q),
                 "SELECT count(*) FROM segments WHERE first_seq=%llu AND last_seq=%llu AND"
                 " priority=%d AND record_count=%llu AND sealed=0",
                 (unsigned long long)seg[k].first, (unsigned long long)seg[k].last, seg[k].prio,
                 (unsigned long long)(seg[k].last - seg[k].first + 1));
        assert_int_equal(ext_int(db, q), 1);
        int64_t exp = ext_int_bind(db, "SELECT expires_ms FROM segments WHERE first_seq=?",
                                   (int64_t)seg[k].first);
        int64_t created = ext_int_bind(db, "SELECT created_ms FROM segments WHERE first_seq=?",
                                       (int64_t)seg[k].first);
        assert_true(created >= t0 - 5 && created <= t1 + 5); /* the TTL clock: see test_stats */
        assert_int_equal(exp, seg[k].ttl ? created + seg[k].ttl : 0);
    }
    assert_int_equal(ext_int(db, "SELECT value FROM meta WHERE key='next_seq'"), 9);

    /* the per-class counters agree with the table */
    struct agent_spool_stats st;
    agent_spool_stats(s, &st);
    for (int c = 0; c < CIS_PRIO_COUNT; c++) {
        char q[160];
        snprintf(q, sizeof(q), "SELECT count(*) FROM segments WHERE priority=%d", c);
        assert_int_equal(st.prio[c].segments, ext_int(db, q));
        snprintf(q, sizeof(q),
                 "SELECT coalesce(sum(record_count),0) FROM segments WHERE priority=%d", c);
        assert_int_equal(st.prio[c].records, ext_int(db, q));
        snprintf(q, sizeof(q),
                 "SELECT coalesce(sum(length(data)),0) FROM segments WHERE priority=%d", c);
        assert_int_equal(st.prio[c].bytes, ext_int(db, q));
    }
    assert_int_equal(st.prio[CIS_PRIO_HIGH].records, 3);
    assert_int_equal(st.prio[CIS_PRIO_NORMAL].segments, 2);
    assert_int_equal(st.pending_records, 8);
    assert_int_equal(st.pending_segments, 5);
    assert_int_equal(st.db_bytes, (uint64_t)ext_int(db, "PRAGMA page_count") *
                                      (uint64_t)ext_int(db, "PRAGMA page_size"));

    /* a negative ttl is refused and changes nothing */
    const int64_t neg[2] = {0, -1};
    assert_int_equal(agent_spool_commit(s, r, p, neg, 2), CIS_EINVAL);
    assert_int_equal(ext_int(db, "SELECT count(*) FROM segments"), 5);
    agent_spool_stats(s, &st);
    assert_int_equal(st.next_seq, 9);
    sqlite3_close(db);

    struct agent_spool_salvage sv;
    agent_spool_salvage_info(s, &sv);
    assert_int_equal(sv.epoch, agent_spool_epoch(s));
    assert_int_equal(sv.next_seq, 9);
    assert_int_equal(sv.min_pending_seq, 1);
    agent_spool_close(s);

    /* with max_size 1 MiB, a group past 16 KiB (max_size / 64) becomes consecutive segments:
     * records of ~6 KB, two per segment */
    char other[192];
    snprintf(other, sizeof(other), "%s/b.db", f->dir);
    s = sp_open_opts(other, 1024 * 1024, 0, 0, NULL);
    static uint8_t big[5][6000];
    uint64_t rng = 11;
    struct cis_record rb[7];
    uint32_t pb[7];
    for (size_t i = 0; i < 5; i++) {
        fill_random(big[i], sizeof(big[i]), &rng);
        rb[i] = (struct cis_record){.stream = "s", .payload = big[i], .payload_len = 6000};
        pb[i] = CIS_PRIO_LOW;
    }
    mkrecs(rb + 5, bufs, 2, "s");
    pb[5] = pb[6] = CIS_PRIO_HIGH;
    assert_int_equal(agent_spool_commit(s, rb, pb, NULL, 7), 0);
    assert_int_equal(rb[5].seq, 1);
    assert_int_equal(rb[6].seq, 2);
    for (size_t i = 0; i < 5; i++)
        assert_int_equal(rb[i].seq, 3 + i);
    db = ext_open(other);
    assert_int_equal(ext_int(db, "SELECT count(*) FROM segments"), 4);
    assert_int_equal(ext_int(db, "SELECT count(*) FROM segments WHERE priority=0 AND first_seq=1"
                                 " AND last_seq=2"),
                     1);
    assert_string_equal(ext_text(db, "SELECT group_concat(first_seq || '-' || last_seq) FROM"
                                     " (SELECT * FROM segments WHERE priority=2 ORDER BY"
                                     " first_seq)"),
                        "3-4,5-6,7-7");
    sqlite3_close(db);
    struct agent_spool_seg *g = NULL;
    size_t n = 0;
    assert_int_equal(agent_spool_claim(s, 100, SIZE_MAX, &g, &n), 0);
    assert_int_equal(n, 4);
    for (size_t k = 0; k < n; k++) {
        Cistern__V1__SegmentBody *body = NULL;
        char why[128] = "";
        assert_int_equal(cis_segment_decode(&g[k].seg, 1 << 20, &body, why, sizeof(why)), 0);
        assert_int_equal(body->n_records, g[k].seg.record_count);
        if (k > 0) {
            assert_memory_equal(body->records[0]->payload.data, big[g[k].seg.first_seq - 3], 6000);
        }
        cistern__v1__segment_body__free_unpacked(body, NULL);
    }
    agent_spool_segs_free(g, n);
    agent_spool_close(s);
}

/* A version-1 spool (the old schema, made by hand) is upgraded in place at open; its segments,
 * counters and ledger carry over. */
static void test_schema_v1_upgrade(void **state)
{
    struct fx *f = *state;
    sqlite3 *db = NULL;
    assert_int_equal(
        sqlite3_open_v2(f->path, &db, SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE, NULL), SQLITE_OK);
    ext_exec(db, "PRAGMA journal_mode=WAL");
    ext_exec(db,
             "CREATE TABLE meta(key TEXT PRIMARY KEY, value INTEGER NOT NULL);"
             "CREATE TABLE segments(first_seq INTEGER PRIMARY KEY, last_seq INTEGER NOT NULL,"
             " priority INTEGER NOT NULL, record_count INTEGER NOT NULL, compression INTEGER NOT"
             " NULL, raw_size INTEGER NOT NULL, created_ms INTEGER NOT NULL, data BLOB NOT NULL);"
             "CREATE INDEX segments_prio ON segments(priority, first_seq);"
             "CREATE TABLE ledger(id INTEGER PRIMARY KEY, reason TEXT NOT NULL, epoch INTEGER NOT"
             " NULL, first_seq INTEGER NOT NULL, last_seq INTEGER NOT NULL, count INTEGER NOT"
             " NULL, ts_ms INTEGER NOT NULL, detail TEXT, sent INTEGER NOT NULL DEFAULT 0);"
             "INSERT INTO meta VALUES('schema_version', 1), ('epoch', 4242), ('next_seq', 11);"
             "INSERT INTO ledger(reason, epoch, first_seq, last_seq, count, ts_ms)"
             " VALUES('rejected', 4242, 1, 4, 4, 5);");
    /* two segments with real blobs: 5..7 (normal) and 8..10 (low) */
    struct cis_record r[3];
    char bufs[3 * 16];
    mkrecs(r, bufs, 3, "old");
    for (uint64_t first = 5; first <= 8; first += 3) {
        for (size_t i = 0; i < 3; i++)
            r[i].seq = first + i;
        uint32_t prio = first == 5 ? CIS_PRIO_NORMAL : CIS_PRIO_LOW;
        struct cis_segment seg;
        uint8_t *data = NULL;
        size_t len = 0;
        assert_int_equal(cis_segment_encode(r, 3, prio, 3, &seg, &data, &len), 0);
        sqlite3_stmt *st = NULL;
        assert_int_equal(
            sqlite3_prepare_v2(db, "INSERT INTO segments VALUES(?,?,?,3,?,?,77,?)", -1, &st, NULL),
            SQLITE_OK);
        sqlite3_bind_int64(st, 1, (int64_t)first);
        sqlite3_bind_int64(st, 2, (int64_t)first + 2);
        sqlite3_bind_int(st, 3, (int)prio);
        sqlite3_bind_int(st, 4, seg.compression);
        sqlite3_bind_int64(st, 5, (int64_t)seg.raw_size);
        sqlite3_bind_blob(st, 6, data, (int)len, SQLITE_TRANSIENT);
        assert_int_equal(sqlite3_step(st), SQLITE_DONE);
        sqlite3_finalize(st);
        free(data);
    }
    assert_int_equal(ext_int(db, "PRAGMA auto_vacuum"), 0);
    sqlite3_close(db);

    struct agent_spool *s = sp_open(f->path);
    assert_int_equal(agent_spool_epoch(s), 4242);
    struct agent_spool_stats st;
    agent_spool_stats(s, &st);
    assert_int_equal(st.next_seq, 11);
    assert_int_equal(st.pending_segments, 2);
    assert_int_equal(st.pending_records, 6);
    assert_int_equal(st.prio[CIS_PRIO_LOW].records, 3);
    assert_int_equal(st.ledger_unsent, 1);
    assert_int_equal(st.oldest_created_ms, 77);

    db = ext_open(f->path);
    assert_int_equal(ext_int(db, "SELECT value FROM meta WHERE key='schema_version'"), 3);
    assert_int_equal(ext_int(db, "SELECT count(*) FROM pragma_table_info('segments')"
                                 " WHERE name IN ('expires_ms', 'sealed', 'crc')"),
                     3);
    assert_int_equal(ext_int(db, "SELECT count(*) FROM sqlite_master WHERE type='index' AND"
                                 " name IN ('segments_expires', 'ledger_unsent')"),
                     2);
    assert_int_equal(
        ext_int(db, "SELECT count(*) FROM segments WHERE expires_ms=0 AND sealed=0 AND crc=0"), 2);
    assert_int_equal(ext_int(db, "PRAGMA auto_vacuum"), 0); /* only new files get it */
    assert_string_equal(ext_text(db, "PRAGMA integrity_check"), "ok");
    sqlite3_close(db);

    /* the old segments are claimable and decode; new commits use the new columns */
    struct agent_spool_seg *g = NULL;
    size_t n = 0;
    assert_int_equal(agent_spool_claim(s, 100, SIZE_MAX, &g, &n), 0);
    assert_int_equal(n, 2);
    assert_int_equal(g[0].seg.first_seq, 5);
    assert_int_equal(g[1].seg.first_seq, 8);
    for (size_t k = 0; k < n; k++) {
        Cistern__V1__SegmentBody *body = NULL;
        char why[128] = "";
        assert_int_equal(cis_segment_decode(&g[k].seg, 1 << 20, &body, why, sizeof(why)), 0);
        assert_int_equal(body->n_records, 3);
        assert_int_equal(body->records[0]->seq, g[k].seg.first_seq);
        cistern__v1__segment_body__free_unpacked(body, NULL);
    }
    agent_spool_segs_free(g, n);
    const uint32_t p1 = CIS_PRIO_HIGH;
    const int64_t ttl1 = 60000;
    assert_int_equal(agent_spool_commit(s, r, &p1, &ttl1, 1), 0);
    assert_int_equal(r[0].seq, 11);
    assert_true(db_int(f->path, "SELECT expires_ms FROM segments WHERE first_seq=11") > 0);
    agent_spool_close(s);

    /* reopening the upgraded file changes nothing */
    s = sp_open(f->path);
    agent_spool_stats(s, &st);
    assert_int_equal(st.pending_segments, 3);
    agent_spool_close(s);
    assert_int_equal(db_int(f->path, "SELECT value FROM meta WHERE key='schema_version'"), 3);
}

static uint64_t commit_ttl(struct agent_spool *s, size_t n, uint32_t prio, int64_t ttl)
{
    struct cis_record r[16];
    char bufs[16 * 16];
    uint32_t p[16];
    int64_t t[16];
    assert_true(n <= 16);
    mkrecs(r, bufs, n, "t");
    for (size_t i = 0; i < n; i++) {
        p[i] = prio;
        t[i] = ttl;
    }
    assert_int_equal(agent_spool_commit(s, r, p, t, n), 0);
    return r[0].seq;
}

static void test_expire(void **state)
{
    struct fx *f = *state;
    struct agent_spool *s = sp_open(f->path);
    const int64_t hour = 3600 * 1000;
    assert_int_equal(commit_ttl(s, 1, CIS_PRIO_HIGH, hour), 1);
    struct agent_spool_seg *g = NULL;
    size_t n = 0;
    assert_int_equal(agent_spool_claim(s, 1, SIZE_MAX, &g, &n), 0); /* 1 in flight */
    assert_int_equal(n, 1);
    assert_int_equal(g[0].seg.first_seq, 1);
    agent_spool_segs_free(g, n);
    assert_int_equal(commit_ttl(s, 2, CIS_PRIO_LOW, hour), 2);     /* 2..3 */
    assert_int_equal(commit_ttl(s, 2, CIS_PRIO_NORMAL, hour), 4);  /* 4..5 */
    assert_int_equal(commit_ttl(s, 2, CIS_PRIO_LOW, 2 * hour), 6); /* 6..7 */
    assert_int_equal(commit_ttl(s, 1, CIS_PRIO_NORMAL, 0), 8);     /* never expires */
    assert_int_equal(commit_ttl(s, 1, CIS_PRIO_LOW, 2 * hour), 9);
    const int64_t now = cis_wall_ms();

    /* nothing due: no write at all (another connection sees the same data_version) */
    sqlite3 *db = ext_open(f->path);
    int64_t dv = ext_int(db, "PRAGMA data_version");
    uint64_t dropped = 99;
    assert_int_equal(agent_spool_expire(s, now, &dropped), 0);
    assert_int_equal(dropped, 0);
    assert_int_equal(ext_int(db, "PRAGMA data_version"), dv);
    assert_int_equal(ext_int(db, "SELECT count(*) FROM segments"), 6);

    /* an hour later: 2..3 and 4..5 go (adjacent: one ledger row); 1 is in flight and stays */
    assert_int_equal(agent_spool_expire(s, now + hour + 60000, &dropped), 0);
    assert_int_equal(dropped, 4);
    assert_true(ext_int(db, "PRAGMA data_version") != dv);
    assert_int_equal(ext_int(db, "SELECT count(*) FROM segments WHERE first_seq IN (2, 4)"), 0);
    assert_int_equal(ext_int(db, "SELECT count(*) FROM segments WHERE first_seq IN (1,6,8,9)"), 4);
    assert_int_equal(ext_int(db, "SELECT count(*) FROM ledger"), 1);
    assert_int_equal(ext_int(db, "SELECT count(*) FROM ledger WHERE reason='expired_ttl' AND"
                                 " first_seq=2 AND last_seq=5 AND count=4 AND sent=0"),
                     1);
    assert_int_equal((uint64_t)ext_int(db, "SELECT epoch FROM ledger"), agent_spool_epoch(s));
    struct agent_spool_stats st;
    agent_spool_stats(s, &st);
    assert_int_equal(st.expired_records, 4);
    assert_int_equal(st.ledger_unsent, 1);
    assert_int_equal(st.pending_records, 5);
    assert_int_equal(st.prio[CIS_PRIO_LOW].records, 3);
    assert_int_equal(st.prio[CIS_PRIO_NORMAL].records, 1);
    assert_int_equal(st.prio[CIS_PRIO_HIGH].records, 1);
    assert_int_equal(st.inflight_segments, 1);

    /* The forwarder takes the row into a batch: it is never extended after that, even by the
     * adjacent 6..7 (which would otherwise coalesce). 9 is not adjacent to 7 (8 has no TTL). */
    Cistern__V1__LossEntry *e = NULL;
    assert_int_equal(agent_spool_ledger_unsent(s, 10, &e, &n), 0);
    assert_int_equal(n, 1);
    uint64_t id0 = e[0].id;
    agent_spool_ledger_free(e, n);
    assert_int_equal(agent_spool_expire(s, now + 2 * hour + 60000, &dropped), 0);
    assert_int_equal(dropped, 3);
    assert_int_equal(ext_int(db, "SELECT count(*) FROM ledger"), 3);
    assert_int_equal(ext_int_bind(db, "SELECT last_seq FROM ledger WHERE id=?", (int64_t)id0), 5);
    assert_int_equal(ext_int(db, "SELECT count(*) FROM ledger WHERE reason='expired_ttl' AND"
                                 " first_seq=6 AND last_seq=7 AND count=2"),
                     1);
    assert_int_equal(ext_int(db, "SELECT count(*) FROM ledger WHERE reason='expired_ttl' AND"
                                 " first_seq=9 AND last_seq=9 AND count=1"),
                     1);
    assert_int_equal(agent_spool_ledger_mark_sent(s, &id0, 1), 0);

    /* back from flight, 1 expires on the next sweep */
    uint64_t one = 1;
    agent_spool_release(s, &one, 1);
    assert_int_equal(agent_spool_expire(s, now + 2 * hour + 60000, NULL), 0);
    assert_int_equal(ext_int(db, "SELECT count(*) FROM segments"), 1); /* 8 */
    assert_int_equal(ext_int(db, "SELECT count(*) FROM ledger WHERE first_seq=1 AND last_seq=1"
                                 " AND reason='expired_ttl'"),
                     1);
    agent_spool_stats(s, &st);
    assert_int_equal(st.expired_records, 8);
    assert_int_equal(st.pending_records, 1);
    assert_int_equal(st.ledger_unsent, 3);
    assert_int_equal(st.oldest_created_ms,
                     ext_int(db, "SELECT created_ms FROM segments WHERE first_seq=8"));

    /* claim skips an expired segment (the sweep has not run yet) and leaves it stored */
    assert_int_equal(commit_ttl(s, 1, CIS_PRIO_HIGH, 1), 10);
    assert_int_equal(commit_ttl(s, 1, CIS_PRIO_HIGH, 0), 11);
    usleep(20 * 1000);
    assert_int_equal(agent_spool_claim(s, 100, SIZE_MAX, &g, &n), 0);
    assert_int_equal(n, 2);
    assert_int_equal(g[0].seg.first_seq, 11);
    assert_int_equal(g[1].seg.first_seq, 8);
    agent_spool_segs_free(g, n);
    assert_int_equal(ext_int(db, "SELECT count(*) FROM segments WHERE first_seq=10"), 1);
    assert_int_equal(agent_spool_expire(s, cis_wall_ms(), &dropped), 0);
    assert_int_equal(dropped, 1);
    assert_int_equal(ext_int(db, "SELECT count(*) FROM segments WHERE first_seq=10"), 0);
    sqlite3_close(db);
    agent_spool_close(s);

    /* the counters survive a reopen */
    s = sp_open(f->path);
    agent_spool_stats(s, &st);
    assert_int_equal(st.pending_segments, 2);
    assert_int_equal(st.ledger_unsent, 4);
    agent_spool_close(s);
}

struct model_seg {
    uint64_t first, last;
    uint32_t prio;
    int live, inflight;
};

/* Eviction order: low class first, oldest first inside a class. */
static int model_cmp(const void *a, const void *b)
{
    const struct model_seg *x = *(const struct model_seg *const *)a;
    const struct model_seg *y = *(const struct model_seg *const *)b;
    if (x->prio != y->prio)
        return x->prio > y->prio ? -1 : 1;
    return x->first < y->first ? -1 : x->first > y->first;
}

#define BOUND_MAX (4ULL * 1024 * 1024)
#define BOUND_REC 20000
#define BOUND_P1 180 /* single records, classes mixed */
#define BOUND_P2 200 /* single high records */
#define BOUND_P3 60  /* low commits of BOUND_BIG records: several segments each */
#define BOUND_BIG 8
#define BOUND_SEQS (BOUND_P1 + BOUND_P2 + BOUND_P3 * BOUND_BIG)

/* Segments whose TTL was stamped while the wall clock was unset (a Pi that booted at 1970) get
 * their whole TTL again at the first open with a set clock: the jump to now does not expire them.
 * Stamps made with a set clock are left alone. */
static void test_ttl_clock_unset(void **state)
{
    struct fx *f = *state;
    const int64_t hour = 3600 * 1000;
    struct agent_spool *s = sp_open(f->path);
    assert_int_equal(commit_ttl(s, 2, CIS_PRIO_NORMAL, hour), 1);     /* 1..2: "at 1970" */
    assert_int_equal(commit_ttl(s, 2, CIS_PRIO_NORMAL, 2 * hour), 3); /* 3..4: set clock */
    assert_int_equal(commit_ttl(s, 1, CIS_PRIO_NORMAL, 0), 5);        /* 5: no TTL */
    agent_spool_close(s);
    sqlite3 *db = ext_open(f->path);
    /* as a run that started at 1970-01-01 would have stamped them, ten minutes in */
    ext_exec(db, "UPDATE segments SET created_ms = 600000, expires_ms = 600000 + 3600000"
                 " WHERE first_seq = 1");
    ext_exec(db, "UPDATE segments SET created_ms = 600000 WHERE first_seq = 5");
    int64_t exp3 = ext_int(db, "SELECT expires_ms FROM segments WHERE first_seq = 3");
    sqlite3_close(db);

    int64_t t0 = cis_wall_ms();
    s = sp_open(f->path);
    int64_t t1 = cis_wall_ms();
    uint64_t dropped = 99;
    assert_int_equal(agent_spool_expire(s, cis_wall_ms(), &dropped), 0);
    assert_int_equal(dropped, 0); /* counted from 1970, 1..2 would have expired */
    int64_t exp1 = db_int(f->path, "SELECT expires_ms FROM segments WHERE first_seq = 1");
    assert_true(exp1 >= t0 - 5 + hour && exp1 <= t1 + 5 + hour);
    assert_int_equal(db_int(f->path, "SELECT expires_ms FROM segments WHERE first_seq = 3"), exp3);
    assert_int_equal(db_int(f->path, "SELECT expires_ms FROM segments WHERE first_seq = 5"), 0);
    /* an hour later by the TTL clock, 1..2 go; 3..4 an hour after that */
    assert_int_equal(agent_spool_expire(s, cis_wall_ms() + hour + 60000, &dropped), 0);
    assert_int_equal(dropped, 2);
    assert_int_equal(db_int(f->path, "SELECT count(*) FROM ledger WHERE reason='expired_ttl' AND"
                                     " first_seq=1 AND last_seq=2"),
                     1);
    agent_spool_close(s);

    /* reopening changes nothing more */
    s = sp_open(f->path);
    assert_int_equal(db_int(f->path, "SELECT expires_ms FROM segments WHERE first_seq = 3"), exp3);
    agent_spool_close(s);
}

static void test_size_bound_drop_oldest(void **state)
{
    struct fx *f = *state;
    struct agent_spool *s = sp_open_opts(f->path, BOUND_MAX, 0, 0, NULL);
    static uint8_t buf[BOUND_BIG][BOUND_REC];
    static struct model_seg m[BOUND_SEQS];
    static const struct model_seg *order[BOUND_SEQS];
    static uint8_t present[BOUND_SEQS + 2];
    uint64_t rng = 0x9e3779b97f4a7c15ULL;
    size_t nm = 0;
    uint64_t maxsum = 0, phase2 = 0, next = 1;
    size_t split = 0;
    sqlite3 *db = ext_open(f->path);

    for (size_t k = 0; k < BOUND_P1 + BOUND_P2 + BOUND_P3; k++) {
        /* phase 1 mixes the classes, phase 2 is high only: the evictions take every low
         * segment, then normal, then the oldest high; phase 3 commits 160 KiB at a time, as
         * the agent's group commits do, stored as segments of at most max_size / 64 */
        uint32_t prio = k < BOUND_P1 ? (uint32_t)(k % 3) : CIS_PRIO_HIGH;
        if (k == 0 || k == 1)
            prio = k == 0 ? CIS_PRIO_LOW : CIS_PRIO_NORMAL;
        size_t nrec = 1;
        if (k >= BOUND_P1 + BOUND_P2) {
            prio = CIS_PRIO_LOW;
            nrec = BOUND_BIG;
        }
        struct cis_record r[BOUND_BIG];
        uint32_t p[BOUND_BIG];
        for (size_t i = 0; i < nrec; i++) {
            fill_random(buf[i], BOUND_REC, &rng);
            r[i] = (struct cis_record){
                .ts_ms = 1, .stream = "big", .payload = buf[i], .payload_len = BOUND_REC};
            p[i] = prio;
        }
        assert_int_equal(agent_spool_commit(s, r, p, NULL, nrec), 0);
        assert_int_equal(r[0].seq, next);
        if (k == BOUND_P1)
            phase2 = next;

        /* which stored segments went, and were they the first in eviction order? */
        memset(present, 0, sizeof(present));
        size_t nm_before = nm;
        sqlite3_stmt *q = NULL;
        assert_int_equal(sqlite3_prepare_v2(db,
                                            "SELECT first_seq, last_seq, priority FROM segments"
                                            " ORDER BY first_seq",
                                            -1, &q, NULL),
                         SQLITE_OK);
        while (sqlite3_step(q) == SQLITE_ROW) {
            int64_t fs = sqlite3_column_int64(q, 0), ls = sqlite3_column_int64(q, 1);
            assert_true(fs >= 1 && ls >= fs && ls < (int64_t)(next + nrec));
            present[fs] = 1;
            if ((uint64_t)fs >= next) { /* this commit's */
                assert_int_equal(sqlite3_column_int(q, 2), (int)prio);
                m[nm++] = (struct model_seg){
                    .first = (uint64_t)fs, .last = (uint64_t)ls, .prio = prio, .live = 1};
            }
        }
        sqlite3_finalize(q);
        /* the new segments cover the commit's seqs, contiguous, none above the cap */
        assert_int_equal(m[nm_before].first, next);
        for (size_t i = nm_before + 1; i < nm; i++)
            assert_int_equal(m[i].first, m[i - 1].last + 1);
        assert_int_equal(m[nm - 1].last, next + nrec - 1);
        if (nm - nm_before > 1)
            split++;
        assert_true(nm - nm_before <= (nrec + 2) / 3); /* 3 records of 20 KB in 64 KiB */

        size_t ncand = 0, nevicted = 0;
        for (size_t i = 0; i < nm_before; i++)
            if (m[i].live && !m[i].inflight)
                order[ncand++] = &m[i];
        qsort(order, ncand, sizeof(order[0]), model_cmp);
        for (size_t i = 0; i < nm_before; i++) {
            if (!m[i].live)
                continue;
            if (m[i].inflight)
                assert_true(present[m[i].first]); /* never evicted */
            if (!present[m[i].first])
                nevicted++;
        }
        for (size_t i = 0; i < ncand; i++)
            assert_int_equal(present[order[i]->first], i < nevicted ? 0 : 1);
        for (size_t i = 0; i < nm_before; i++)
            if (!present[m[i].first])
                m[i].live = 0;

        if (k == 0 || k == 1) {
            /* keep the first low and the first normal segment in flight throughout */
            struct agent_spool_seg *g = NULL;
            size_t n = 0;
            assert_int_equal(agent_spool_claim(s, 1, SIZE_MAX, &g, &n), 0);
            assert_int_equal(n, 1);
            assert_int_equal(g[0].seg.first_seq, next);
            agent_spool_segs_free(g, n);
            m[nm - 1].inflight = 1;
        }
        next += nrec;

        uint64_t sum = file_size(f->path) + wal_size(f->path);
        if (sum > maxsum)
            maxsum = sum;
        if (sum > BOUND_MAX + BOUND_MAX / 20)
            fprintf(stderr, "commit %zu: db %llu + wal %llu\n", k,
                    (unsigned long long)file_size(f->path), (unsigned long long)wal_size(f->path));
        assert_true(sum <= BOUND_MAX + BOUND_MAX / 20);
        if (k == BOUND_P1 + BOUND_P2 - 1 || k == BOUND_P1 + BOUND_P2 + BOUND_P3 - 1) {
            fprintf(stderr,
                    "size bound after commit %zu: max %llu, now %llu (db %llu + wal %llu),"
                    " max_size %llu\n",
                    k, (unsigned long long)maxsum, (unsigned long long)sum,
                    (unsigned long long)file_size(f->path), (unsigned long long)wal_size(f->path),
                    (unsigned long long)BOUND_MAX);
            assert_true(sum >= BOUND_MAX - BOUND_MAX / 20);
        }
    }
    assert_int_equal(split, BOUND_P3);

    /* every seq ever committed is stored or inside exactly one evicted_full range */
    static uint8_t cover[BOUND_SEQS + 2];
    memset(cover, 0, sizeof(cover));
    uint64_t evicted = 0;
    sqlite3_stmt *q = NULL;
    assert_int_equal(sqlite3_prepare_v2(db,
                                        "SELECT first_seq, last_seq, record_count, 0 FROM segments"
                                        " UNION ALL SELECT first_seq, last_seq, count, 1 FROM"
                                        " ledger WHERE reason='evicted_full'",
                                        -1, &q, NULL),
                     SQLITE_OK);
    while (sqlite3_step(q) == SQLITE_ROW) {
        int64_t a = sqlite3_column_int64(q, 0), b = sqlite3_column_int64(q, 1);
        assert_true(a >= 1 && b >= a && b <= BOUND_SEQS);
        assert_int_equal(sqlite3_column_int64(q, 2), b - a + 1);
        for (int64_t x = a; x <= b; x++)
            cover[x]++;
        if (sqlite3_column_int(q, 3))
            evicted += (uint64_t)(b - a + 1);
    }
    sqlite3_finalize(q);
    assert_int_equal(next, BOUND_SEQS + 1);
    for (size_t x = 1; x <= BOUND_SEQS; x++)
        assert_int_equal(cover[x], 1);
    assert_int_equal(ext_int(db, "SELECT count(*) FROM ledger WHERE reason != 'evicted_full'"), 0);
    struct agent_spool_stats st;
    agent_spool_stats(s, &st);
    assert_int_equal(st.evicted_records, evicted);
    assert_true(evicted > BOUND_SEQS / 2);
    assert_int_equal(st.pending_records + evicted, BOUND_SEQS);
    assert_int_equal(st.ledger_unsent, ext_int(db, "SELECT count(*) FROM ledger"));
    assert_int_equal(st.full, 0);
    /* Adjacent evictions share a row: from phase 2 on, the high run and the low run of phase
     * 3 (a row per segment would be hundreds) */
    int64_t late_rows =
        ext_int_bind(db, "SELECT count(*) FROM ledger WHERE first_seq >= ?", (int64_t)phase2);
    fprintf(stderr, "ledger: %lld rows for %llu evicted records (%lld from phase 2 on)\n",
            (long long)ext_int(db, "SELECT count(*) FROM ledger"), (unsigned long long)evicted,
            (long long)late_rows);
    assert_true(late_rows >= 1 && late_rows <= 3);
    assert_string_equal(ext_text(db, "PRAGMA integrity_check"), "ok");
    /* the two in flight are still there */
    assert_int_equal(ext_int(db, "SELECT count(*) FROM segments WHERE first_seq IN (1, 2)"), 2);
    sqlite3_close(db);
    agent_spool_close(s);

    /* a smaller max_size is given back with incremental vacuum, a bounded step per
     * transaction */
    s = sp_open_opts(f->path, BOUND_MAX / 2, 0, 0, NULL);
    uint8_t small[64];
    uint64_t first_db = file_size(f->path);
    int k = 0;
    /* until the file, not only the logical size, is back within the band (the file is cut
     * at the checkpoint after the vacuum) */
    for (agent_spool_stats(s, &st);
         k < 400 && (st.db_bytes > BOUND_MAX / 2 ||
                     file_size(f->path) + wal_size(f->path) > BOUND_MAX / 2 + BOUND_MAX / 40);
         k++) {
        assert_int_equal(commit_big(s, small, sizeof(small), CIS_PRIO_HIGH, 0, &rng, NULL), 0);
        agent_spool_stats(s, &st);
    }
    fprintf(stderr, "max_size halved: file %llu -> %llu after %d commits\n",
            (unsigned long long)first_db, (unsigned long long)file_size(f->path), k);
    assert_true(k > 1); /* bounded work per transaction, not all at once */
    assert_true(st.db_bytes <= BOUND_MAX / 2);
    assert_true(file_size(f->path) + wal_size(f->path) <= BOUND_MAX / 2 + BOUND_MAX / 40);
    agent_spool_close(s);
}

static void test_size_bound_reject_new(void **state)
{
    struct fx *f = *state;
    const uint64_t max = 1024 * 1024;
    struct agent_spool *s = sp_open_opts(f->path, max, 1, 0, NULL);
    static uint8_t buf[BOUND_REC];
    uint64_t rng = 7;
    int rc = 0;
    size_t ok = 0;
    for (size_t k = 0; k < 200; k++) {
        rc = commit_big(s, buf, sizeof(buf), CIS_PRIO_LOW, 0, &rng, NULL);
        if (rc)
            break;
        ok++;
        assert_true(file_size(f->path) + wal_size(f->path) <= max + max / 20);
    }
    assert_int_equal(rc, CIS_EFULL);
    assert_true(ok > 10);
    struct agent_spool_stats st;
    agent_spool_stats(s, &st);
    assert_int_equal(st.full, 1);
    assert_int_equal(st.next_seq, ok + 1);

    /* refused again: nothing changes, nothing is evicted */
    uint64_t seq = 12345;
    assert_int_equal(commit_big(s, buf, sizeof(buf), CIS_PRIO_HIGH, 0, &rng, &seq), CIS_EFULL);
    assert_int_equal(seq, 999999);
    assert_int_equal(db_int(f->path, "SELECT count(*) FROM segments"), (int64_t)ok);
    assert_int_equal(db_int(f->path, "SELECT value FROM meta WHERE key='next_seq'"),
                     (int64_t)ok + 1);
    assert_int_equal(db_int(f->path, "SELECT count(*) FROM ledger"), 0);
    agent_spool_stats(s, &st);
    assert_int_equal(st.pending_records, ok);
    assert_int_equal(st.evicted_records, 0);
    assert_true(file_size(f->path) + wal_size(f->path) <= max + max / 20);

    /* a delivery frees space: the next commit is taken and the state clears */
    struct agent_spool_seg *g = NULL;
    size_t n = 0;
    assert_int_equal(agent_spool_claim(s, 2, SIZE_MAX, &g, &n), 0);
    assert_int_equal(n, 2);
    uint64_t firsts[2] = {g[0].seg.first_seq, g[1].seg.first_seq};
    agent_spool_segs_free(g, n);
    assert_int_equal(agent_spool_ack(s, firsts, 2), 0);
    assert_int_equal(commit_big(s, buf, sizeof(buf), CIS_PRIO_HIGH, 0, &rng, &seq), 0);
    assert_int_equal(seq, ok + 1);
    agent_spool_stats(s, &st);
    assert_int_equal(st.full, 0);
    agent_spool_close(s);
}

#define WAL_MAX (1024 * 1024)

static void test_wal_bound(void **state)
{
    struct fx *f = *state;
    struct agent_spool *s = sp_open_opts(f->path, 0, 0, WAL_MAX, NULL);
    static uint8_t buf[BOUND_REC];
    uint64_t rng = 99, maxwal = 0;
    size_t ok = 0;
    for (size_t k = 0; k < 150; k++) {
        assert_int_equal(commit_big(s, buf, sizeof(buf), CIS_PRIO_NORMAL, 0, &rng, NULL), 0);
        ok++;
        uint64_t w = wal_size(f->path);
        if (w > maxwal)
            maxwal = w;
        assert_true(w <= WAL_MAX);
    }
    /* checkpoints keep it at a quarter of the cap (+ one commit), not at the cap */
    assert_true(maxwal <= WAL_MAX / 4 + 64 * 1024);

    /* A reader holds a snapshot: checkpoints cannot reset the WAL. Commits go on until the WAL
     * is at its cap, then fail with CIS_EAGAIN (nothing committed); the WAL never passes it. */
    sqlite3 *db = ext_open(f->path);
    ext_exec(db, "BEGIN");
    assert_int_equal(ext_int(db, "SELECT count(*) FROM segments"), (int64_t)ok);
    size_t eagain = 0, during = 0;
    struct agent_spool_stats st;
    for (size_t k = 0; k < 200 && eagain < 3; k++) {
        agent_spool_stats(s, &st);
        uint64_t before = st.next_seq;
        uint64_t seq = 0;
        int rc = commit_big(s, buf, sizeof(buf), CIS_PRIO_NORMAL, 0, &rng, &seq);
        assert_true(rc == 0 || rc == CIS_EAGAIN);
        agent_spool_stats(s, &st);
        if (rc == CIS_EAGAIN) {
            eagain++;
            assert_int_equal(seq, 999999);
            assert_int_equal(st.next_seq, before);
        } else {
            assert_int_equal(eagain, 0); /* once capped, stays capped while the reader holds */
            ok++;
            during++;
        }
        assert_true(wal_size(f->path) <= WAL_MAX);
        assert_true(st.wal_bytes <= WAL_MAX);
    }
    assert_int_equal(eagain, 3);
    assert_true(during >= 10); /* the reader did not stop commits before the cap */
    /* the reader's snapshot is intact */
    assert_int_equal(ext_int(db, "SELECT count(*) FROM segments"), (int64_t)(ok - during));
    ext_exec(db, "COMMIT");
    sqlite3_close(db);

    /* the reader is gone: the next commit truncates the WAL first, so it holds only that
     * commit, within the room the spool keeps reserved for the WAL (1.25 x the checkpoint
     * threshold, a quarter of the cap here: its room on a full disk); and the spool's own
     * figure is the file's size */
    assert_true(wal_size(f->path) > WAL_MAX / 2);
    assert_int_equal(commit_big(s, buf, sizeof(buf), CIS_PRIO_NORMAL, 0, &rng, NULL), 0);
    ok++;
    assert_true(wal_size(f->path) > WAL_MAX / 4 && wal_size(f->path) <= WAL_MAX / 4 + WAL_MAX / 16);
    agent_spool_stats(s, &st);
    assert_int_equal(st.wal_bytes, wal_size(f->path));
    assert_int_equal(st.pending_records, ok);
    assert_int_equal(db_int(f->path, "SELECT count(*) FROM segments"), (int64_t)ok);
    assert_int_equal(db_int(f->path, "SELECT value FROM meta WHERE key='next_seq'"),
                     (int64_t)ok + 1);
    agent_spool_close(s);
}

static int read_file(const char *path, uint8_t **out, size_t *len)
{
    *out = NULL;
    *len = 0;
    FILE *fp = fopen(path, "rb");
    if (!fp)
        return 0; /* e.g. no -wal */
    uint8_t *b = NULL;
    size_t n = 0, cap = 0;
    for (;;) {
        if (n == cap) {
            cap = cap ? cap * 2 : 65536;
            uint8_t *p = realloc(b, cap);
            assert_non_null(p);
            b = p;
        }
        size_t r = fread(b + n, 1, cap - n, fp);
        n += r;
        if (r == 0)
            break;
    }
    fclose(fp);
    *out = b;
    *len = n;
    return 1;
}

/* Do these bytes appear anywhere in the database or its WAL? */
static int on_disk(const char *dbpath, const uint8_t *needle, size_t nlen)
{
    char p[256];
    const char *paths[2] = {dbpath, p};
    snprintf(p, sizeof(p), "%s-wal", dbpath);
    int found = 0;
    for (int i = 0; i < 2 && !found; i++) {
        uint8_t *b = NULL;
        size_t len = 0;
        if (!read_file(paths[i], &b, &len))
            continue;
        found = len >= nlen && memmem(b, len, needle, nlen) != NULL;
        free(b);
    }
    return found;
}

static struct agent_seal *load_key(const struct fx *f, const char *name)
{
    char p[192], err[256] = "";
    snprintf(p, sizeof(p), "%s/%s", f->dir, name);
    struct agent_seal *k = NULL;
    if (access(p, F_OK) != 0)
        assert_int_equal(agent_seal_keygen(p, err, sizeof(err)), 0);
    int rc = agent_seal_load(p, &k, err, sizeof(err));
    if (rc)
        fprintf(stderr, "seal load: %s\n", err);
    assert_int_equal(rc, 0);
    return k;
}

/* A damaged row (its blob, or a field of it) that SQLite's own checks cannot see fails its
 * checksum at claim: never returned, deleted, ledgered as corrupt_spool; the others go out. */
static void test_segment_checksum(void **state)
{
    struct fx *f = *state;
    struct agent_spool *s = sp_open(f->path);
    for (int i = 0; i < 4; i++)
        commit_n(s, 2, CIS_PRIO_NORMAL); /* segments 1, 3, 5, 7 */
    sqlite3 *db = ext_open(f->path);
    /* one byte of segment 3's blob; segment 5's raw_size */
    sqlite3_stmt *q = NULL;
    assert_int_equal(
        sqlite3_prepare_v2(db, "SELECT data FROM segments WHERE first_seq=3", -1, &q, NULL),
        SQLITE_OK);
    assert_int_equal(sqlite3_step(q), SQLITE_ROW);
    size_t blen = (size_t)sqlite3_column_bytes(q, 0);
    uint8_t *blob = malloc(blen);
    assert_non_null(blob);
    memcpy(blob, sqlite3_column_blob(q, 0), blen);
    sqlite3_finalize(q);
    blob[blen - 1] ^= 0x20;
    assert_int_equal(
        sqlite3_prepare_v2(db, "UPDATE segments SET data=? WHERE first_seq=3", -1, &q, NULL),
        SQLITE_OK);
    sqlite3_bind_blob(q, 1, blob, (int)blen, SQLITE_STATIC);
    assert_int_equal(sqlite3_step(q), SQLITE_DONE);
    sqlite3_finalize(q);
    free(blob);
    ext_exec(db, "UPDATE segments SET raw_size = raw_size + 1 WHERE first_seq=5");

    struct agent_spool_seg *g = NULL;
    size_t n = 0;
    assert_int_equal(agent_spool_claim(s, 100, SIZE_MAX, &g, &n), 0);
    assert_int_equal(n, 2);
    assert_int_equal(g[0].seg.first_seq, 1);
    assert_int_equal(g[1].seg.first_seq, 7);
    agent_spool_segs_free(g, n);
    assert_int_equal(ext_int(db, "SELECT count(*) FROM segments WHERE first_seq IN (3, 5)"), 0);
    assert_int_equal(ext_int(db, "SELECT count(*) FROM ledger"), 2);
    assert_int_equal(ext_int(db, "SELECT count(*) FROM ledger WHERE reason='corrupt_spool' AND"
                                 " ((first_seq=3 AND last_seq=4) OR (first_seq=5 AND last_seq=6))"
                                 " AND count=2 AND detail LIKE '%checksum%'"),
                     2);
    sqlite3_close(db);
    struct agent_spool_stats st;
    agent_spool_stats(s, &st);
    assert_int_equal(st.pending_segments, 2);
    assert_int_equal(st.ledger_unsent, 2);
    agent_spool_close(s);
}

static void test_sealing(void **state)
{
    struct fx *f = *state;
    struct agent_seal *k1 = load_key(f, "k1.key");
    struct agent_seal *k2 = load_key(f, "k2.key");
    uint64_t rng = 5;
    static uint8_t pay[3][256];
    for (int i = 0; i < 3; i++)
        fill_random(pay[i], sizeof(pay[i]), &rng);
    struct cis_record r = {.ts_ms = 1, .stream = "x", .payload_len = sizeof(pay[0])};
    const uint32_t prio = CIS_PRIO_NORMAL;

    /* control: unsealed, the payload is on disk as it is (so the check below can fail) */
    char plain[192];
    snprintf(plain, sizeof(plain), "%s/plain.db", f->dir);
    struct agent_spool *s = sp_open(plain);
    r.payload = pay[0];
    assert_int_equal(agent_spool_commit(s, &r, &prio, NULL, 1), 0);
    assert_true(on_disk(plain, pay[0], sizeof(pay[0])));
    agent_spool_close(s);

    /* a segment stored before sealing was turned on is sent as it is */
    s = sp_open(f->path);
    r.payload = pay[0];
    assert_int_equal(agent_spool_commit(s, &r, &prio, NULL, 1), 0); /* 1 */
    agent_spool_close(s);

    s = sp_open_opts(f->path, 0, 0, 0, k1);
    assert_int_equal((uint64_t)db_int(f->path, "SELECT value FROM meta WHERE key='key_id'"),
                     agent_seal_key_id(k1));
    for (int i = 0; i < 3; i++) {
        r.payload = pay[i];
        assert_int_equal(agent_spool_commit(s, &r, &prio, NULL, 1), 0); /* 2, 3, 4 */
        assert_int_equal(r.seq, (uint64_t)i + 2);
    }
    assert_int_equal(db_int(f->path, "SELECT count(*) FROM segments WHERE sealed=1"), 3);
    assert_int_equal(db_int(f->path, "SELECT sealed FROM segments WHERE first_seq=1"), 0);
    for (int i = 1; i < 3; i++)
        assert_false(on_disk(f->path, pay[i], sizeof(pay[i])));

    /* claim hands out plaintext that decodes */
    struct agent_spool_seg *g = NULL;
    size_t n = 0;
    assert_int_equal(agent_spool_claim(s, 100, SIZE_MAX, &g, &n), 0);
    assert_int_equal(n, 4);
    uint64_t firsts[4];
    for (size_t k = 0; k < n; k++) {
        firsts[k] = g[k].seg.first_seq;
        assert_int_equal(g[k].seg.first_seq, k + 1);
        Cistern__V1__SegmentBody *body = NULL;
        char why[128] = "";
        int rc = cis_segment_decode(&g[k].seg, 1 << 20, &body, why, sizeof(why));
        if (rc)
            fprintf(stderr, "decode: %s\n", why);
        assert_int_equal(rc, 0);
        assert_int_equal(body->n_records, 1);
        assert_int_equal(body->records[0]->seq, k + 1);
        const uint8_t *want = pay[k == 0 ? 0 : k - 1];
        assert_int_equal(body->records[0]->payload.len, sizeof(pay[0]));
        assert_memory_equal(body->records[0]->payload.data, want, sizeof(pay[0]));
        cistern__v1__segment_body__free_unpacked(body, NULL);
    }
    agent_spool_segs_free(g, n);
    agent_spool_release(s, firsts, n);

    /* one flipped byte in segment 3: never returned, deleted, ledgered as tampered */
    sqlite3 *db = ext_open(f->path);
    sqlite3_stmt *q = NULL;
    assert_int_equal(
        sqlite3_prepare_v2(db, "SELECT data FROM segments WHERE first_seq=3", -1, &q, NULL),
        SQLITE_OK);
    assert_int_equal(sqlite3_step(q), SQLITE_ROW);
    size_t blen = (size_t)sqlite3_column_bytes(q, 0);
    uint8_t *blob = malloc(blen);
    assert_non_null(blob);
    memcpy(blob, sqlite3_column_blob(q, 0), blen);
    sqlite3_finalize(q);
    blob[blen / 2] ^= 0x01;
    assert_int_equal(
        sqlite3_prepare_v2(db, "UPDATE segments SET data=? WHERE first_seq=3", -1, &q, NULL),
        SQLITE_OK);
    sqlite3_bind_blob(q, 1, blob, (int)blen, SQLITE_STATIC);
    assert_int_equal(sqlite3_step(q), SQLITE_DONE);
    sqlite3_finalize(q);
    free(blob);

    assert_int_equal(agent_spool_claim(s, 100, SIZE_MAX, &g, &n), 0);
    assert_int_equal(n, 3);
    assert_int_equal(g[0].seg.first_seq, 1);
    assert_int_equal(g[1].seg.first_seq, 2);
    assert_int_equal(g[2].seg.first_seq, 4);
    agent_spool_segs_free(g, n);
    assert_int_equal(ext_int(db, "SELECT count(*) FROM segments WHERE first_seq=3"), 0);
    assert_int_equal(ext_int(db, "SELECT count(*) FROM ledger"), 1);
    assert_int_equal(ext_int(db, "SELECT count(*) FROM ledger WHERE reason='tampered' AND"
                                 " first_seq=3 AND last_seq=3 AND count=1 AND detail LIKE"
                                 " '%authentication%'"),
                     1);
    sqlite3_close(db);
    struct agent_spool_stats st;
    agent_spool_stats(s, &st);
    assert_int_equal(st.tampered_records, 1);
    assert_int_equal(st.pending_segments, 3);
    assert_int_equal(st.ledger_unsent, 1);
    agent_spool_close(s);

    /* another key, or none, with sealed segments stored: refused, and nothing changes */
    char err[256] = "";
    struct agent_spool_opts o = {.path = f->path, .zstd_level = 3, .seal = k2};
    struct agent_spool *s2 = NULL;
    assert_int_equal(agent_spool_open(&o, &s2, err, sizeof(err)), CIS_EINVAL);
    assert_null(s2);
    assert_non_null(strstr(err, "key id"));
    o.seal = NULL;
    err[0] = 0;
    assert_int_equal(agent_spool_open(&o, &s2, err, sizeof(err)), CIS_EINVAL);
    assert_null(s2);
    assert_non_null(strstr(err, "spool.encryption_key_file"));
    assert_int_equal(db_int(f->path, "SELECT count(*) FROM segments"), 3);
    assert_int_equal((uint64_t)db_int(f->path, "SELECT value FROM meta WHERE key='key_id'"),
                     agent_seal_key_id(k1));

    /* once nothing sealed is left, a new key is taken (nothing would fail to open) */
    s = sp_open_opts(f->path, 0, 0, 0, k1);
    ack_all(s);
    agent_spool_close(s);
    s = sp_open_opts(f->path, 0, 0, 0, k2);
    assert_int_equal((uint64_t)db_int(f->path, "SELECT value FROM meta WHERE key='key_id'"),
                     agent_seal_key_id(k2));
    agent_spool_close(s);
    agent_seal_free(k1);
    agent_seal_free(k2);
}

/* The spool's own connection, caught as it opens, to set PRAGMA max_page_count on it: SQLite
 * then answers SQLITE_FULL as on a full device. */
static sqlite3 *g_spool_db;

static int catch_db(sqlite3 *db, char **msg, const struct sqlite3_api_routines *api)
{
    (void)msg;
    (void)api;
    if (!g_spool_db)
        g_spool_db = db;
    return SQLITE_OK;
}

static void test_disk_full_max_page_count(void **state)
{
    struct fx *f = *state;
    g_spool_db = NULL;
    assert_int_equal(sqlite3_auto_extension((void (*)(void))catch_db), SQLITE_OK);
    struct agent_spool *s = sp_open(f->path);
    sqlite3_reset_auto_extension();
    assert_non_null(g_spool_db);
    commit_n(s, 2, CIS_PRIO_NORMAL); /* 1..2 */

    int64_t pages = 0;
    {
        sqlite3_stmt *st = NULL;
        assert_int_equal(sqlite3_prepare_v2(g_spool_db, "PRAGMA page_count", -1, &st, NULL),
                         SQLITE_OK);
        assert_int_equal(sqlite3_step(st), SQLITE_ROW);
        pages = sqlite3_column_int64(st, 0);
        sqlite3_finalize(st);
    }
    char sql[64];
    snprintf(sql, sizeof(sql), "PRAGMA max_page_count=%lld", (long long)pages);
    assert_int_equal(sqlite3_exec(g_spool_db, sql, NULL, NULL, NULL), SQLITE_OK);

    static uint8_t buf[BOUND_REC];
    uint64_t rng = 3, seq = 0;
    assert_int_equal(commit_big(s, buf, sizeof(buf), CIS_PRIO_LOW, 60000, &rng, &seq), CIS_ENOSPC);
    assert_int_equal(seq, 999999);
    assert_int_equal(commit_big(s, buf, sizeof(buf), CIS_PRIO_HIGH, 0, &rng, &seq), CIS_ENOSPC);
    struct agent_spool_stats st;
    agent_spool_stats(s, &st);
    assert_int_equal(st.next_seq, 3);
    assert_int_equal(st.pending_records, 2);
    assert_int_equal(st.pending_segments, 1);
    assert_int_equal(st.prio[CIS_PRIO_LOW].records, 0);
    assert_int_equal(st.prio[CIS_PRIO_HIGH].records, 0);
    assert_int_equal(st.full, 0); /* the device, not max_size */
    assert_int_equal(db_int(f->path, "SELECT count(*) FROM segments"), 1);
    assert_int_equal(db_int(f->path, "SELECT value FROM meta WHERE key='next_seq'"), 3);
    /* reads and small writes go on (deliveries free space) */
    struct agent_spool_seg *g = NULL;
    size_t n = 0;
    assert_int_equal(agent_spool_claim(s, 10, SIZE_MAX, &g, &n), 0);
    assert_int_equal(n, 1);
    agent_spool_segs_free(g, n);

    /* space is back: the commit goes through with the seqs it would have had */
    assert_int_equal(sqlite3_exec(g_spool_db, "PRAGMA max_page_count=1073741823", NULL, NULL, NULL),
                     SQLITE_OK);
    assert_int_equal(commit_big(s, buf, sizeof(buf), CIS_PRIO_LOW, 60000, &rng, &seq), 0);
    assert_int_equal(seq, 3);
    agent_spool_stats(s, &st);
    assert_int_equal(st.next_seq, 4);
    assert_int_equal(st.prio[CIS_PRIO_LOW].records, 1);
    assert_int_equal(db_int(f->path, "SELECT count(*) FROM segments"), 2);
    g_spool_db = NULL;
    agent_spool_close(s);
}

static void test_ledger_add_and_salvage(void **state)
{
    struct fx *f = *state;
    struct agent_spool *s = sp_open(f->path);
    assert_int_equal(agent_spool_ledger_add(s, "corrupt_spool", 777, 5, 9, 5, "moved aside"), 0);
    assert_int_equal(agent_spool_ledger_add(s, "corrupt_spool", 0, 0, 0, 0, NULL), 0);
    assert_int_equal(agent_spool_ledger_add(s, NULL, 1, 1, 1, 1, NULL), CIS_EINVAL);
    assert_int_equal(db_int(f->path, "SELECT count(*) FROM ledger WHERE reason='corrupt_spool'"
                                     " AND epoch=777 AND first_seq=5 AND last_seq=9 AND count=5"
                                     " AND detail='moved aside' AND sent=0"),
                     1);
    assert_int_equal(db_int(f->path, "SELECT count(*) FROM ledger"), 2);
    struct agent_spool_stats st;
    agent_spool_stats(s, &st);
    assert_int_equal(st.ledger_unsent, 2);

    struct agent_spool_salvage sv;
    agent_spool_salvage_info(s, &sv);
    assert_int_equal(sv.epoch, agent_spool_epoch(s));
    assert_int_equal(sv.next_seq, 1);
    assert_int_equal(sv.min_pending_seq, 0);
    commit_n(s, 2, CIS_PRIO_LOW);  /* 1..2 */
    commit_n(s, 3, CIS_PRIO_HIGH); /* 3..5 */
    agent_spool_salvage_info(s, &sv);
    assert_int_equal(sv.next_seq, 6);
    assert_int_equal(sv.min_pending_seq, 1);
    uint64_t one = 1;
    assert_int_equal(agent_spool_ack(s, &one, 1), 0);
    agent_spool_salvage_info(s, &sv);
    assert_int_equal(sv.min_pending_seq, 3);
    ack_all(s);
    agent_spool_salvage_info(s, &sv);
    assert_int_equal(sv.min_pending_seq, 0);
    agent_spool_close(s);
}

/* ---- the segment encoder's bytes, the checksum, and reservations that write nothing ---- */

/* The SegmentBody protobuf-c packs for these records: the reference the encoder must match. */
static uint8_t *pb_reference(const struct cis_record *r, size_t n, size_t *len)
{
    Cistern__V1__Record *rv = calloc(n, sizeof(*rv));
    Cistern__V1__Record **rp = calloc(n, sizeof(*rp));
    assert_non_null(rv);
    assert_non_null(rp);
    for (size_t i = 0; i < n; i++) {
        Cistern__V1__Record x = CISTERN__V1__RECORD__INIT;
        x.seq = r[i].seq;
        x.ts_ms = r[i].ts_ms;
        x.stream = (char *)(r[i].stream ? r[i].stream : "");
        x.content_type = (char *)(r[i].content_type ? r[i].content_type : "");
        x.payload.data = (uint8_t *)r[i].payload;
        x.payload.len = r[i].payload_len;
        rv[i] = x;
        rp[i] = &rv[i];
    }
    Cistern__V1__SegmentBody body = CISTERN__V1__SEGMENT_BODY__INIT;
    body.n_records = n;
    body.records = rp;
    *len = cistern__v1__segment_body__get_packed_size(&body);
    uint8_t *out = malloc(*len ? *len : 1);
    assert_non_null(out);
    assert_int_equal(cistern__v1__segment_body__pack(&body, out), *len);
    free(rp);
    free(rv);
    return out;
}

/* A blob as stored (zstd or not) back to its serialized SegmentBody. */
static uint8_t *blob_raw(const uint8_t *blob, size_t blen, int compression, uint64_t raw_size)
{
    uint8_t *raw = malloc(raw_size ? raw_size : 1);
    assert_non_null(raw);
    if (compression == CISTERN__V1__COMPRESSION__COMPRESSION_ZSTD) {
        assert_int_equal(ZSTD_decompress(raw, raw_size, blob, blen), raw_size);
    } else {
        assert_int_equal(compression, CISTERN__V1__COMPRESSION__COMPRESSION_NONE);
        assert_int_equal(blen, raw_size);
        memcpy(raw, blob, blen);
    }
    return raw;
}

/* Records that reach every branch of the wire format: fields left out at their defaults (seq 0,
 * ts 0, empty names and payloads), negative and extreme times (10-byte varints), lengths of one,
 * two and three varint bytes, names shared between records and not. */
#define WIRE_N 24
static void wire_records(struct cis_record *r, uint64_t first, uint8_t *big, size_t bigcap)
{
    static char longname[300];
    memset(longname, 'n', sizeof(longname) - 1);
    static const int64_t ts[] = {0, -1, 1, -1700000000000LL, INT64_MAX, INT64_MIN,
                                 1700000000123LL, 127, 128};
    const char *streams[] = {"apps", NULL, "", "a", longname, "apps"};
    const char *ctypes[] = {"application/json", NULL, "", "text/plain"};
    const size_t plens[] = {0, 1, 127, 128, 300, 16383, 16384, 20000, 95};
    uint64_t rng = 11;
    fill_random(big, bigcap, &rng);
    for (size_t i = 0; i < WIRE_N; i++) {
        size_t pl = plens[i % (sizeof(plens) / sizeof(plens[0]))];
        assert_true(pl <= bigcap);
        r[i] = (struct cis_record){
            .seq = first + i,
            .ts_ms = ts[i % (sizeof(ts) / sizeof(ts[0]))],
            .stream = streams[i % (sizeof(streams) / sizeof(streams[0]))],
            .content_type = ctypes[i % (sizeof(ctypes) / sizeof(ctypes[0]))],
            .payload = pl || i % 2 ? big + i : NULL, /* an empty payload with and without data */
            .payload_len = pl};
    }
}

static void test_segment_wire_format(void **state)
{
    (void)state;
    static uint8_t big[20000 + WIRE_N];
    struct cis_record r[WIRE_N];
    struct cis_seg_encoder *e = NULL;
    assert_int_equal(cis_seg_encoder_create(3, &e), 0);
    /* One encoder for segments of several sizes, big and then small (its buffers are reused),
     * from seq 0 (left out on the wire) to seqs that take 6 varint bytes. */
    const uint64_t firsts[] = {0, 1, 1ULL << 35, 300};
    const size_t counts[] = {WIRE_N, 3, WIRE_N, 1};
    for (size_t k = 0; k < 4; k++) {
        wire_records(r, firsts[k], big, sizeof(big) - WIRE_N);
        size_t n = counts[k];
        size_t want_len = 0;
        uint8_t *want = pb_reference(r, n, &want_len);
        for (int oneshot = 0; oneshot < 2; oneshot++) {
            struct cis_segment seg;
            uint8_t *data = NULL;
            size_t len = 0;
            if (oneshot)
                assert_int_equal(cis_segment_encode(r, n, CIS_PRIO_LOW, 3, &seg, &data, &len), 0);
            else
                assert_int_equal(
                    cis_seg_encoder_encode(e, r, n, CIS_PRIO_LOW, &seg, &data, &len), 0);
            assert_int_equal(seg.first_seq, firsts[k]);
            assert_int_equal(seg.last_seq, firsts[k] + n - 1);
            assert_int_equal(seg.record_count, n);
            assert_int_equal(seg.priority, CIS_PRIO_LOW);
            assert_int_equal(seg.raw_size, want_len);
            uint8_t *raw = blob_raw(data, len, seg.compression, seg.raw_size);
            assert_memory_equal(raw, want, want_len);
            free(raw);
            /* and protobuf-c reads it back, record by record */
            seg.data = data;
            seg.data_len = len;
            Cistern__V1__SegmentBody *body = NULL;
            char why[128] = "";
            assert_int_equal(cis_segment_decode(&seg, 1 << 20, &body, why, sizeof(why)), 0);
            assert_int_equal(body->n_records, n);
            for (size_t i = 0; i < n; i++) {
                assert_int_equal(body->records[i]->ts_ms, r[i].ts_ms);
                assert_string_equal(body->records[i]->stream, r[i].stream ? r[i].stream : "");
                assert_int_equal(body->records[i]->payload.len, r[i].payload_len);
                if (r[i].payload_len)
                    assert_memory_equal(body->records[i]->payload.data, r[i].payload,
                                        r[i].payload_len);
            }
            cistern__v1__segment_body__free_unpacked(body, NULL);
            free(data);
        }
        free(want);
        /* An idle agent gives the context and buffers back; the next encode makes them again
         * and writes the same bytes. */
        if (k == 1)
            cis_seg_encoder_trim(e);
    }
    cis_seg_encoder_trim(NULL);
    /* seqs must be contiguous; nothing comes out */
    r[1].seq = r[0].seq + 2;
    struct cis_segment seg;
    uint8_t *data = (uint8_t *)1;
    size_t len = 1;
    assert_int_equal(cis_seg_encoder_encode(e, r, 2, 1, &seg, &data, &len), CIS_EINVAL);
    assert_null(data);
    assert_int_equal(len, 0);
    assert_int_equal(cis_seg_encoder_encode(e, r, 0, 1, &seg, &data, &len), CIS_EINVAL);
    cis_seg_encoder_destroy(e);
    cis_seg_encoder_destroy(NULL);
}

/* The spool stores what the encoder makes: the blob on disk is protobuf-c's bytes, compressed. */
static void test_commit_stores_wire_format(void **state)
{
    struct fx *f = *state;
    static uint8_t big[20000 + WIRE_N];
    struct cis_record r[WIRE_N];
    uint32_t p[WIRE_N];
    wire_records(r, 999999, big, sizeof(big) - WIRE_N);
    for (size_t i = 0; i < WIRE_N; i++)
        p[i] = CIS_PRIO_NORMAL;
    struct agent_spool *s = sp_open(f->path);
    commit_n(s, 2, CIS_PRIO_NORMAL); /* 1..2: the next commit starts at 3 */
    agent_spool_release_memory(s);   /* as an idle agent does: the commit after it still works */
    assert_int_equal(agent_spool_commit(s, r, p, NULL, WIRE_N), 0);
    assert_int_equal(r[0].seq, 3);
    size_t want_len = 0;
    uint8_t *want = pb_reference(r, WIRE_N, &want_len);

    sqlite3 *db = ext_open(f->path);
    sqlite3_stmt *q = NULL;
    assert_int_equal(sqlite3_prepare_v2(db,
                                        "SELECT data, compression, raw_size FROM segments"
                                        " WHERE first_seq=3",
                                        -1, &q, NULL),
                     SQLITE_OK);
    assert_int_equal(sqlite3_step(q), SQLITE_ROW);
    assert_int_equal(sqlite3_column_int64(q, 2), (int64_t)want_len);
    uint8_t *raw = blob_raw(sqlite3_column_blob(q, 0), (size_t)sqlite3_column_bytes(q, 0),
                            sqlite3_column_int(q, 1), want_len);
    assert_memory_equal(raw, want, want_len);
    free(raw);
    free(want);
    sqlite3_finalize(q);
    sqlite3_close(db);
    agent_spool_close(s);
}

/* CRC-32C, one bit at a time: what the tables and the CPU instructions must agree with. */
static uint32_t crc_ref(uint32_t crc, const uint8_t *p, size_t n)
{
    crc = ~crc;
    while (n--) {
        crc ^= *p++;
        for (int k = 0; k < 8; k++)
            crc = crc & 1 ? (crc >> 1) ^ 0x82F63B78u : crc >> 1;
    }
    return ~crc;
}

static void test_crc32c(void **state)
{
    struct fx *f = *state;
    /* the standard check value */
    assert_int_equal(agent_spool_crc32c(0, "123456789", 9, 0), 0xE3069283u);
    assert_int_equal(agent_spool_crc32c(0, "123456789", 9, 1), 0xE3069283u);
    /* every length and alignment around the 8-byte steps, and continued in two calls */
    static uint8_t buf[1100];
    uint64_t rng = 7;
    fill_random(buf, sizeof(buf), &rng);
    for (size_t off = 0; off < 8; off++)
        for (size_t n = 0; n < 80 || (n == 80 && off == 0); n++) {
            size_t len = n < 80 ? n : 1024;
            uint32_t want = crc_ref(0, buf + off, len);
            assert_int_equal(agent_spool_crc32c(0, buf + off, len, 0), want);
            assert_int_equal(agent_spool_crc32c(0, buf + off, len, 1), want);
            size_t half = len / 3;
            assert_int_equal(agent_spool_crc32c(agent_spool_crc32c(0, buf + off, half, 0),
                                                buf + off + half, len - half, 1),
                             want);
        }

    /* on disk: the crc column is the CRC-32C of the row's fields (little-endian u64) and its
     * blob, with bit 32 set, as spools written before this code hold it (claim checks it) */
    struct agent_spool *s = sp_open(f->path);
    commit_n(s, 5, CIS_PRIO_LOW);
    sqlite3 *db = ext_open(f->path);
    sqlite3_stmt *q = NULL;
    assert_int_equal(sqlite3_prepare_v2(db,
                                        "SELECT first_seq, last_seq, priority, record_count,"
                                        " compression, raw_size, data, crc FROM segments",
                                        -1, &q, NULL),
                     SQLITE_OK);
    assert_int_equal(sqlite3_step(q), SQLITE_ROW);
    uint8_t h[48];
    for (int i = 0; i < 6; i++) {
        uint64_t v = (uint64_t)sqlite3_column_int64(q, i);
        for (int b = 0; b < 8; b++)
            h[i * 8 + b] = (uint8_t)(v >> (8 * b));
    }
    uint32_t c = crc_ref(0, h, sizeof(h));
    c = crc_ref(c, sqlite3_column_blob(q, 6), (size_t)sqlite3_column_bytes(q, 6));
    assert_int_equal(sqlite3_column_int64(q, 7), (int64_t)((uint64_t)c | (1ULL << 32)));
    sqlite3_finalize(q);
    sqlite3_close(db);
    struct agent_spool_seg *g = NULL;
    size_t n = 0;
    assert_int_equal(agent_spool_claim(s, 100, SIZE_MAX, &g, &n), 0);
    assert_int_equal(n, 1); /* and it passes its own check */
    agent_spool_segs_free(g, n);
    agent_spool_close(s);
}

/* This process's write_bytes (/proc/self/io: page-cache pages it dirtied), or -1. */
static int64_t io_write_bytes(void)
{
    FILE *fp = fopen("/proc/self/io", "r");
    if (!fp)
        return -1;
    char line[128];
    long long v = -1;
    while (fgets(line, sizeof(line), fp))
        if (sscanf(line, "write_bytes: %lld", &v) == 1)
            break;
    fclose(fp);
    return v;
}

/* Can the spool's filesystem allocate without writing, and does it account writes? Else the
 * check below means nothing (tmpfs counts no writes; without fallocate, glibc writes zeros). */
static int wear_measurable(const struct fx *f)
{
    char p[192];
    snprintf(p, sizeof(p), "%s/probe", f->dir);
    int fd = open(p, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    assert_true(fd >= 0);
    int ok = fallocate(fd, 0, 0, 1 << 20) == 0;
    static uint8_t b[1 << 20];
    int64_t w0 = io_write_bytes();
    ok = ok && w0 >= 0 && pwrite(fd, b, sizeof(b), 1 << 20) == (ssize_t)sizeof(b) &&
         io_write_bytes() - w0 >= (int64_t)sizeof(b) / 2;
    close(fd);
    unlink(p);
    if (!ok)
        fprintf(stderr, "note: %s cannot show written bytes (tmpfs, or no fallocate): the wear"
                        " checks are skipped\n",
                f->dir);
    return ok;
}

/* Flash wear: the room the spool reserves (the WAL's after each checkpoint, the database's ahead
 * of a commit that grows it) is allocated, not written. Reserving it with SQLite's size hint
 * wrote a byte into every 4 KiB block, which dirtied (and wrote to flash) every page of it. */
static void test_reserve_writes_nothing(void **state)
{
    struct fx *f = *state;
    if (!wear_measurable(f))
        return;
    /* the default max_size: the WAL's room is 1.25 x 16 MiB */
    int64_t w0 = io_write_bytes();
    struct agent_spool *s = sp_open_opts(f->path, 512ULL << 20, 0, 0, NULL);
    int64_t w_open = io_write_bytes() - w0;
    uint64_t room = wal_size(f->path);
    assert_true(room >= 19ULL << 20);
    struct stat sb;
    char wal[192];
    snprintf(wal, sizeof(wal), "%s-wal", f->path);
    assert_int_equal(stat(wal, &sb), 0);
    assert_true((uint64_t)sb.st_blocks * 512 >= room); /* allocated, not a hole */
    assert_true(w_open < 1 << 20);                      /* not written */

    /* commits that grow the database by ~4 MiB of incompressible segments: what is written is
     * the WAL's frames, not the reservation of the database's new size on top */
    static uint8_t buf[64 * 1024];
    uint64_t rng = 9;
    uint64_t db0 = file_size(f->path);
    w0 = io_write_bytes();
    for (int i = 0; i < 64; i++)
        assert_int_equal(commit_big(s, buf, sizeof(buf), CIS_PRIO_NORMAL, 0, &rng, NULL), 0);
    int64_t w_commits = io_write_bytes() - w0;
    struct agent_spool_stats st;
    agent_spool_stats(s, &st);
    assert_int_equal(st.pending_records, 64);
    uint64_t grown = file_size(f->path) - db0;
    assert_true(grown >= 64 * sizeof(buf)); /* reserved ahead of the checkpoint */
    assert_true(st.wal_bytes == room);      /* the frames went into the WAL's room */
    /* frames: 64 KiB of payload is 64 pages + a few, at 1048 bytes each in the WAL */
    assert_true(w_commits >= (int64_t)(64 * sizeof(buf)));
    assert_true(w_commits < (int64_t)(64 * sizeof(buf)) * 5 / 4);
    agent_spool_close(s);
}

#define T(fn) cmocka_unit_test_setup_teardown(fn, fx_setup, fx_teardown)

int main(void)
{
    const struct CMUnitTest tests[] = {
        T(test_commit_groups_by_priority),
        T(test_seq_never_reused),
        T(test_epoch),
        T(test_claim_order),
        T(test_claim_newest),
        T(test_seg_max_records),
        T(test_claim_limits),
        T(test_inflight_not_reclaimed_until_released),
        T(test_inflight_pending_after_reopen),
        T(test_ack_deletes),
        T(test_reject_and_ledger),
        T(test_ledger_detail_printable),
        T(test_stats),
        T(test_decode_claimed_segment),
        T(test_commit_failure_rolls_back),
        T(test_commit_disk_full),
        T(test_external_reader_does_not_block),
        T(test_open_errors),
        T(test_commit_groups_by_priority_and_ttl),
        T(test_schema_v1_upgrade),
        T(test_expire),
        T(test_ttl_clock_unset),
        T(test_size_bound_drop_oldest),
        T(test_size_bound_reject_new),
        T(test_wal_bound),
        T(test_segment_checksum),
        T(test_sealing),
        T(test_disk_full_max_page_count),
        T(test_ledger_add_and_salvage),
        T(test_segment_wire_format),
        T(test_commit_stores_wire_format),
        T(test_crc32c),
        T(test_reserve_writes_nothing),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
