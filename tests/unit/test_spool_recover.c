/* Unit tests for spool corruption recovery (edge-agent/spool_recover.c), on real files. */
#include <dirent.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cmocka.h>
#include <sqlite3.h>

#include "cistern/codec.h"
#include "cistern/err.h"
#include "spool.h"

struct fx {
    char dir[64];
    char path[128]; /* DIR/spool.db */
};

/* What the spool made by make_spool() holds. */
struct old {
    uint64_t epoch;
    uint64_t first, last; /* lowest stored seq, next_seq - 1 */
};

static int fx_setup(void **state)
{
    struct fx *f = calloc(1, sizeof(*f));
    if (!f)
        return -1;
    snprintf(f->dir, sizeof(f->dir), "/tmp/cistern-recover-XXXXXX");
    if (!mkdtemp(f->dir)) {
        free(f);
        return -1;
    }
    snprintf(f->path, sizeof(f->path), "%s/spool.db", f->dir);
    *state = f;
    return 0;
}

/* Remove DIR and everything in it (files, and directories one level down). */
static void rm_tree(const char *dir, int depth)
{
    DIR *d = opendir(dir);
    assert_non_null(d);
    struct dirent *de;
    while ((de = readdir(d)) != NULL) {
        if (!strcmp(de->d_name, ".") || !strcmp(de->d_name, ".."))
            continue;
        if (unlinkat(dirfd(d), de->d_name, 0) != 0 && depth > 0) {
            char sub[512];
            snprintf(sub, sizeof(sub), "%s/%s", dir, de->d_name);
            rm_tree(sub, depth - 1);
        }
    }
    closedir(d);
    assert_int_equal(rmdir(dir), 0);
}

static int fx_teardown(void **state)
{
    struct fx *f = *state;
    rm_tree(f->dir, 1);
    free(f);
    return 0;
}

static void fx_file(const struct fx *f, const char *name, char *out, size_t len)
{
    snprintf(out, len, "%s/%s", f->dir, name);
}

static struct agent_spool_opts opts_for(const char *path)
{
    return (struct agent_spool_opts){.path = path, .sync_full = 0, .zstd_level = 3};
}

static struct agent_spool *sp_open(const char *path)
{
    struct agent_spool_opts o = opts_for(path);
    struct agent_spool *s = NULL;
    char err[512] = "";
    int rc = agent_spool_open(&o, &s, err, sizeof(err));
    if (rc)
        fprintf(stderr, "open failed: %d %s\n", rc, err);
    assert_int_equal(rc, 0);
    return s;
}

static uint64_t sp_next_seq(const struct agent_spool *s)
{
    struct agent_spool_stats st;
    agent_spool_stats(s, &st);
    return st.next_seq;
}

/* NSEG commits of 2 records each, with 1500 incompressible bytes per record, so the segments
 * table spans many pages. */
static void commit_segs(struct agent_spool *s, int nseg, uint32_t *rng)
{
    static uint8_t payload[2][1500];
    for (int i = 0; i < nseg; i++) {
        struct cis_record r[2];
        uint32_t prio[2] = {CIS_PRIO_NORMAL, CIS_PRIO_NORMAL};
        for (int k = 0; k < 2; k++) {
            for (size_t j = 0; j < sizeof(payload[k]); j++) {
                *rng ^= *rng << 13;
                *rng ^= *rng >> 17;
                *rng ^= *rng << 5;
                payload[k][j] = (uint8_t)*rng;
            }
            r[k] = (struct cis_record){.ts_ms = 1000 + i,
                                       .stream = "t",
                                       .content_type = "application/octet-stream",
                                       .payload = payload[k],
                                       .payload_len = sizeof(payload[k])};
        }
        assert_int_equal(agent_spool_commit(s, r, prio, NULL, 2), 0);
    }
}

/* Claim the oldest NSEG segments and ack them (so the lowest stored seq is not 1). */
static void ack_oldest(struct agent_spool *s, size_t nseg)
{
    struct agent_spool_seg *g = NULL;
    size_t n = 0;
    assert_int_equal(agent_spool_claim(s, nseg * 2, SIZE_MAX, &g, &n), 0);
    assert_int_equal(n, nseg);
    uint64_t firsts[16];
    assert_true(n <= 16);
    for (size_t i = 0; i < n; i++)
        firsts[i] = g[i].seg.first_seq;
    assert_int_equal(agent_spool_ack(s, firsts, n), 0);
    agent_spool_segs_free(g, n);
}

/* A closed spool at PATH: 30 segments (seqs 1..60), the oldest 3 acked: 7..60 stored. */
static struct old make_spool(const char *path)
{
    uint32_t rng = 12345;
    struct agent_spool *s = sp_open(path);
    commit_segs(s, 30, &rng);
    ack_oldest(s, 3);
    struct old o = {.epoch = agent_spool_epoch(s), .first = 7, .last = sp_next_seq(s) - 1};
    assert_int_equal(o.last, 60);
    agent_spool_close(s);
    return o;
}

static uint8_t *slurp(const char *path, size_t *len)
{
    FILE *fp = fopen(path, "rb");
    assert_non_null(fp);
    assert_int_equal(fseek(fp, 0, SEEK_END), 0);
    long n = ftell(fp);
    assert_true(n >= 0);
    rewind(fp);
    uint8_t *buf = malloc((size_t)n + 1);
    assert_non_null(buf);
    assert_int_equal(fread(buf, 1, (size_t)n, fp), (size_t)n);
    fclose(fp);
    *len = (size_t)n;
    return buf;
}

static void spew(const char *path, const uint8_t *buf, size_t len)
{
    FILE *fp = fopen(path, "wb");
    assert_non_null(fp);
    assert_int_equal(fwrite(buf, 1, len, fp), len);
    assert_int_equal(fclose(fp), 0);
}

static void copy_file(const char *from, const char *to)
{
    size_t len = 0;
    uint8_t *b = slurp(from, &len);
    spew(to, b, len);
    free(b);
}

static int exists(const char *path)
{
    struct stat sb;
    return lstat(path, &sb) == 0;
}

/* An integer from a read-only query on the (healthy) database at PATH. */
static int64_t db_int(const char *path, const char *sql)
{
    sqlite3 *db = NULL;
    sqlite3_stmt *st = NULL;
    assert_int_equal(sqlite3_open_v2(path, &db, SQLITE_OPEN_READONLY, NULL), SQLITE_OK);
    assert_int_equal(sqlite3_prepare_v2(db, sql, -1, &st, NULL), SQLITE_OK);
    assert_int_equal(sqlite3_step(st), SQLITE_ROW);
    int64_t v = sqlite3_column_int64(st, 0);
    sqlite3_finalize(st);
    sqlite3_close(db);
    return v;
}

/* The highest page holding what salvage reads: the schema and meta (META), or the path from the
 * segments root to its leftmost leaf (MIN). */
static int64_t meta_pages_max(const char *path)
{
    return db_int(path, "SELECT max(pageno) FROM dbstat WHERE name IN"
                        " ('sqlite_schema', 'meta', 'sqlite_autoindex_meta_1')");
}

static int64_t min_pages_max(const char *path)
{
    return db_int(path, "SELECT max(pageno) FROM dbstat WHERE name = 'sqlite_schema' OR"
                        " (name = 'segments' AND path IN ('/', '/000/', '/000/000/'))");
}

static void xor_bytes(const char *path, long off, size_t n)
{
    FILE *fp = fopen(path, "r+b");
    assert_non_null(fp);
    uint8_t buf[256];
    assert_true(n <= sizeof(buf));
    assert_int_equal(fseek(fp, off, SEEK_SET), 0);
    assert_int_equal(fread(buf, 1, n, fp), n);
    for (size_t i = 0; i < n; i++)
        buf[i] ^= 0xff;
    assert_int_equal(fseek(fp, off, SEEK_SET), 0);
    assert_int_equal(fwrite(buf, 1, n, fp), n);
    assert_int_equal(fclose(fp), 0);
}

/* Names in F's directory: quarantined main files (spool.db.corrupt-*, without -wal/-shm) and
 * leftover replacements (*.new-*). The first quarantined name goes to Q. */
static void scan_dir(const struct fx *f, int *ncorrupt, int *nnew, char *q, size_t qlen)
{
    DIR *d = opendir(f->dir);
    assert_non_null(d);
    struct dirent *de;
    *ncorrupt = *nnew = 0;
    while ((de = readdir(d)) != NULL) {
        const char *n = de->d_name;
        size_t len = strlen(n);
        if (strstr(n, ".new-"))
            (*nnew)++;
        if (strncmp(n, "spool.db.corrupt-", 17) == 0 && strcmp(n + len - 4, "-wal") &&
            strcmp(n + len - 4, "-shm")) {
            if ((*ncorrupt)++ == 0 && q)
                snprintf(q, qlen, "%s/%s", f->dir, n);
        }
    }
    closedir(d);
}

struct expect {
    uint64_t epoch, first, last, count;
    const char *why;    /* in the ledger row's detail */
    int header_counter; /* the old file's change counter may have moved (see its test) */
};

/* The spool S is new (epoch not OLD_EPOCH, next_seq 1) and holds exactly one ledger row, the
 * corrupt_spool row E describes. */
static void check_new_spool(struct agent_spool *s, uint64_t old_epoch, const struct expect *e)
{
    assert_true(agent_spool_epoch(s) != old_epoch);
    assert_true(agent_spool_epoch(s) != 0);
    assert_int_equal(sp_next_seq(s), 1);
    Cistern__V1__LossEntry *le = NULL;
    size_t n = 0;
    assert_int_equal(agent_spool_ledger_unsent(s, 100, &le, &n), 0);
    assert_int_equal(n, 1);
    fprintf(stderr, "ledger: %s epoch=%llu %llu..%llu count=%llu: %s\n", le[0].reason,
            (unsigned long long)le[0].epoch, (unsigned long long)le[0].first_seq,
            (unsigned long long)le[0].last_seq, (unsigned long long)le[0].count, le[0].detail);
    assert_string_equal(le[0].reason, "corrupt_spool");
    assert_true(le[0].epoch == e->epoch);
    assert_true(le[0].first_seq == e->first);
    assert_true(le[0].last_seq == e->last);
    assert_true(le[0].count == e->count);
    assert_non_null(strstr(le[0].detail, ".db.corrupt-"));
    if (e->why)
        assert_non_null(strstr(le[0].detail, e->why));
    if (!e->count)
        assert_non_null(strstr(le[0].detail, "unknown"));
    agent_spool_ledger_free(le, n);
}

/* open_checked on F's spool recovers: a new spool with the ledger row E, the old bytes OLD
 * (OLD_LEN) kept in the one spool.db.corrupt-* file, no leftovers. */
static void expect_recovered(const struct fx *f, uint64_t old_epoch, const uint8_t *old,
                             size_t old_len, const struct expect *e)
{
    struct agent_spool_opts o = opts_for(f->path);
    struct agent_spool *s = NULL;
    int recovered = -1;
    char err[512] = "";
    int rc = agent_spool_open_checked(&o, &s, &recovered, err, sizeof(err));
    if (rc)
        fprintf(stderr, "open_checked: %d %s\n", rc, err);
    assert_int_equal(rc, 0);
    assert_non_null(s);
    assert_int_equal(recovered, 1);
    check_new_spool(s, old_epoch, e);
    agent_spool_close(s);

    int ncorrupt, nnew;
    char q[256] = "";
    scan_dir(f, &ncorrupt, &nnew, q, sizeof(q));
    assert_int_equal(ncorrupt, 1);
    assert_int_equal(nnew, 0);
    size_t qlen = 0;
    uint8_t *qb = slurp(q, &qlen);
    assert_int_equal(qlen, old_len);
    if (e->header_counter && old_len >= 100) {
        /* All but the header's change counter (24..27) and version-valid-for (92..95). */
        assert_memory_equal(qb, old, 24);
        assert_memory_equal(qb + 28, old + 28, 92 - 28);
        assert_memory_equal(qb + 96, old + 96, old_len - 96);
    } else if (old_len) {
        assert_memory_equal(qb, old, old_len);
    }
    free(qb);
    struct stat sb;
    assert_int_equal(stat(q, &sb), 0);
    assert_int_equal(sb.st_nlink, 1); /* no longer also PATH */

    /* The new spool reopens as it is, and works. */
    s = NULL;
    recovered = -1;
    assert_int_equal(agent_spool_open_checked(&o, &s, &recovered, err, sizeof(err)), 0);
    assert_int_equal(recovered, 0);
    uint32_t rng = 99;
    commit_segs(s, 1, &rng);
    assert_int_equal(sp_next_seq(s), 3);
    agent_spool_close(s);
}

/* ---- tests ---- */

static void test_healthy_spool_kept(void **state)
{
    struct fx *f = *state;
    struct old old = make_spool(f->path);
    /* A leftover replacement from a crashed quarantine goes. */
    char left[192], leftwal[192];
    fx_file(f, "spool.db.new-4242", left, sizeof(left));
    fx_file(f, "spool.db.new-4242-wal", leftwal, sizeof(leftwal));
    spew(left, (const uint8_t *)"x", 1);
    spew(leftwal, (const uint8_t *)"x", 1);

    struct agent_spool_opts o = opts_for(f->path);
    struct agent_spool *s = NULL;
    int recovered = -1;
    char err[512] = "";
    assert_int_equal(agent_spool_open_checked(&o, &s, &recovered, err, sizeof(err)), 0);
    assert_int_equal(recovered, 0);
    assert_true(agent_spool_epoch(s) == old.epoch);
    assert_int_equal(sp_next_seq(s), old.last + 1);
    Cistern__V1__LossEntry *le = NULL;
    size_t n = 9;
    assert_int_equal(agent_spool_ledger_unsent(s, 100, &le, &n), 0);
    assert_int_equal(n, 0);
    agent_spool_close(s);

    int ncorrupt, nnew;
    scan_dir(f, &ncorrupt, &nnew, NULL, 0);
    assert_int_equal(ncorrupt, 0);
    assert_int_equal(nnew, 0);

    /* A missing file is a new spool. */
    char other[192];
    fx_file(f, "fresh.db", other, sizeof(other));
    o = opts_for(other);
    assert_int_equal(agent_spool_open_checked(&o, &s, &recovered, err, sizeof(err)), 0);
    assert_int_equal(recovered, 0);
    assert_int_equal(sp_next_seq(s), 1);
    agent_spool_close(s);
}

static void test_truncated(void **state)
{
    struct fx *f = *state;
    struct old old = make_spool(f->path);
    int64_t page = db_int(f->path, "PRAGMA page_size");
    int64_t pages = db_int(f->path, "PRAGMA page_count");
    int64_t keep = pages / 2;
    int meta_ok = meta_pages_max(f->path) <= keep, min_ok = min_pages_max(f->path) <= keep;
    assert_int_equal(truncate(f->path, keep * page), 0);
    size_t len = 0;
    uint8_t *bytes = slurp(f->path, &len);
    struct expect e = {.why = "truncated: "};
    if (meta_ok)
        e.epoch = old.epoch;
    if (meta_ok && min_ok) {
        e.first = old.first;
        e.last = old.last;
        e.count = old.last - old.first + 1;
    }
    expect_recovered(f, old.epoch, bytes, len, &e);
    free(bytes);
}

static void test_flipped_middle_page(void **state)
{
    struct fx *f = *state;
    struct old old = make_spool(f->path);
    int64_t page = db_int(f->path, "PRAGMA page_size");
    /* The rightmost leaf of segments: not on the path min(first_seq) reads, so the range stays
     * readable; its page header turned to garbage is structural damage quick_check sees. */
    int64_t victim = db_int(f->path, "SELECT pageno FROM dbstat WHERE name = 'segments' AND"
                                     " pagetype = 'leaf' ORDER BY path DESC LIMIT 1");
    char sql[256];
    snprintf(sql, sizeof(sql),
             "SELECT count(*) FROM dbstat WHERE name = 'segments' AND pageno = %lld AND"
             " path IN ('/', '/000/', '/000/000/')",
             (long long)victim);
    assert_int_equal(db_int(f->path, sql), 0);
    assert_true(db_int(f->path, "SELECT count(*) FROM dbstat WHERE name = 'segments' AND"
                                " pagetype = 'leaf'") > 1);
    xor_bytes(f->path, (long)((victim - 1) * page), 12);
    size_t len = 0;
    uint8_t *bytes = slurp(f->path, &len);
    struct expect e = {.epoch = old.epoch,
                       .first = old.first,
                       .last = old.last,
                       .count = old.last - old.first + 1,
                       .why = "failed quick_check"};
    expect_recovered(f, old.epoch, bytes, len, &e);
    free(bytes);
}

static void test_flipped_index_page(void **state)
{
    struct fx *f = *state;
    struct old old = make_spool(f->path);
    int64_t page = db_int(f->path, "PRAGMA page_size");
    int64_t root =
        db_int(f->path, "SELECT rootpage FROM sqlite_master WHERE name = 'segments_prio'");
    xor_bytes(f->path, (long)((root - 1) * page), 8);
    size_t len = 0;
    uint8_t *bytes = slurp(f->path, &len);
    struct expect e = {.epoch = old.epoch,
                       .first = old.first,
                       .last = old.last,
                       .count = old.last - old.first + 1,
                       .why = "failed quick_check"};
    expect_recovered(f, old.epoch, bytes, len, &e);
    free(bytes);
}

static void test_flipped_header(void **state)
{
    struct fx *f = *state;
    struct old old = make_spool(f->path);
    xor_bytes(f->path, 0, 16); /* "SQLite format 3\0" */
    size_t len = 0;
    uint8_t *bytes = slurp(f->path, &len);
    struct expect e = {.why = "not a database"};
    expect_recovered(f, old.epoch, bytes, len, &e);
    free(bytes);
}

static void test_random_bytes(void **state)
{
    struct fx *f = *state;
    uint8_t junk[65536];
    uint32_t x = 777;
    for (size_t i = 0; i < sizeof(junk); i++) {
        x = x * 1103515245u + 12345u;
        junk[i] = (uint8_t)(x >> 16);
    }
    spew(f->path, junk, sizeof(junk));
    struct expect e = {.why = "not a database"};
    expect_recovered(f, 0, junk, sizeof(junk), &e);
}

static void test_inconsistent_meta(void **state)
{
    struct fx *f = *state;
    struct old old = make_spool(f->path);
    /* A well-formed database that is not a consistent spool: quick_check passes, open refuses. */
    sqlite3 *db = NULL;
    assert_int_equal(sqlite3_open(f->path, &db), SQLITE_OK);
    assert_int_equal(
        sqlite3_exec(db, "UPDATE meta SET value = 0 WHERE key = 'next_seq'", NULL, NULL, NULL),
        SQLITE_OK);
    sqlite3_close(db);
    size_t len = 0;
    uint8_t *bytes = slurp(f->path, &len);
    /* agent_spool_open() is what finds this one, and its PRAGMA auto_vacuum rewrites the
     * header's change counter before it reads meta. */
    struct expect e = {.epoch = old.epoch, .why = "inconsistent", .header_counter = 1};
    expect_recovered(f, old.epoch, bytes, len, &e);
    free(bytes);
}

static void test_zero_byte_beside_wal(void **state)
{
    struct fx *f = *state;
    char wal[192], src[192], srcwal[192];
    fx_file(f, "spool.db-wal", wal, sizeof(wal));
    fx_file(f, "src.db", src, sizeof(src));
    fx_file(f, "src.db-wal", srcwal, sizeof(srcwal));
    /* A real WAL, taken from a spool that is open. */
    struct agent_spool *s = sp_open(src);
    uint32_t rng = 5;
    commit_segs(s, 2, &rng);
    copy_file(srcwal, wal);
    agent_spool_close(s);
    spew(f->path, (const uint8_t *)"", 0);
    size_t wlen = 0;
    uint8_t *wbytes = slurp(wal, &wlen);
    assert_true(wlen > 0);

    struct expect e = {.why = "zero-byte database beside a WAL"};
    expect_recovered(f, 0, NULL, 0, &e);

    /* The WAL went with it, under the matching name. */
    int ncorrupt, nnew;
    char q[256], qwal[300];
    scan_dir(f, &ncorrupt, &nnew, q, sizeof(q));
    snprintf(qwal, sizeof(qwal), "%s-wal", q);
    size_t qlen = 0;
    uint8_t *qb = slurp(qwal, &qlen);
    assert_int_equal(qlen, wlen);
    assert_memory_equal(qb, wbytes, wlen);
    assert_false(exists(wal));
    free(qb);
    free(wbytes);
}

static void test_zero_byte_alone(void **state)
{
    struct fx *f = *state;
    spew(f->path, (const uint8_t *)"", 0);
    struct agent_spool_opts o = opts_for(f->path);
    struct agent_spool *s = NULL;
    int recovered = -1;
    char err[512] = "";
    assert_int_equal(agent_spool_open_checked(&o, &s, &recovered, err, sizeof(err)), 0);
    assert_int_equal(recovered, 0);
    assert_int_equal(sp_next_seq(s), 1);
    Cistern__V1__LossEntry *le = NULL;
    size_t n = 9;
    assert_int_equal(agent_spool_ledger_unsent(s, 100, &le, &n), 0);
    assert_int_equal(n, 0);
    agent_spool_close(s);
    int ncorrupt, nnew;
    scan_dir(f, &ncorrupt, &nnew, NULL, 0);
    assert_int_equal(ncorrupt, 0);
    assert_true(db_int(f->path, "SELECT count(*) FROM meta") >= 3);
}

/* The agent's files while it runs (database, -wal, -shm), as copies: SRC stays open with
 * commits in its WAL since the last checkpoint. Returns what the database file alone says
 * (checkpointed state) in *CKPT. */
static struct agent_spool *running_spool(const struct fx *f, const char *src, struct old *ckpt)
{
    *ckpt = make_spool(src); /* closed: all of it checkpointed */
    struct agent_spool *s = sp_open(src);
    uint32_t rng = 7;
    commit_segs(s, 5, &rng); /* 61..70, in the WAL only */
    assert_int_equal(sp_next_seq(s), 71);
    return s;
}

static void test_deleted_wal(void **state)
{
    struct fx *f = *state;
    char src[192], srcshm[192], shm[192];
    fx_file(f, "src.db", src, sizeof(src));
    fx_file(f, "src.db-shm", srcshm, sizeof(srcshm));
    fx_file(f, "spool.db-shm", shm, sizeof(shm));
    struct old ckpt;
    struct agent_spool *s = running_spool(f, src, &ckpt);
    copy_file(src, f->path);
    copy_file(srcshm, shm);
    agent_spool_close(s);
    size_t len = 0;
    uint8_t *bytes = slurp(f->path, &len);
    /* What the file holds is counted; the WAL's records cannot be. */
    struct expect e = {.epoch = ckpt.epoch,
                       .first = ckpt.first,
                       .last = ckpt.last,
                       .count = ckpt.last - ckpt.first + 1,
                       .why = "WAL deleted"};
    expect_recovered(f, ckpt.epoch, bytes, len, &e);
    /* The -shm, the evidence of the lost WAL, went with the database. */
    assert_false(exists(shm));
    int ncorrupt, nnew;
    char q[256], qshm[300];
    scan_dir(f, &ncorrupt, &nnew, q, sizeof(q));
    snprintf(qshm, sizeof(qshm), "%s-shm", q);
    assert_true(exists(qshm));
    free(bytes);
}

/* The files of a spool whose process stopped without closing it, in this boot (the copies of
 * running_spool()): with DAMAGE applied to the WAL copy (NULL: none; "gone" with the -shm too,
 * "cut" short, "header" garbage), open_checked either keeps the spool (DAMAGE NULL: the WAL's
 * commits are there) or quarantines it, counting what the database file holds. */
static void unclean_stop(const struct fx *f, const char *damage)
{
    char src[192], srcwal[192], srcshm[192], wal[192], shm[192];
    fx_file(f, "src.db", src, sizeof(src));
    fx_file(f, "src.db-wal", srcwal, sizeof(srcwal));
    fx_file(f, "src.db-shm", srcshm, sizeof(srcshm));
    fx_file(f, "spool.db-wal", wal, sizeof(wal));
    fx_file(f, "spool.db-shm", shm, sizeof(shm));
    struct old ckpt;
    struct agent_spool *s = running_spool(f, src, &ckpt);
    copy_file(src, f->path);
    if (!damage || strcmp(damage, "gone") != 0) {
        copy_file(srcwal, wal);
        copy_file(srcshm, shm);
    }
    agent_spool_close(s);
    if (damage && strcmp(damage, "cut") == 0) {
        /* the header and one frame of the ten commits' frames */
        assert_int_equal(truncate(wal, 32 + 1024 + 24), 0);
    } else if (damage && strcmp(damage, "header") == 0) {
        xor_bytes(wal, 4, 8);
    }
    size_t len = 0;
    uint8_t *bytes = slurp(f->path, &len);
    struct agent_spool_opts o = opts_for(f->path);
    if (!damage) {
        struct agent_spool *k = NULL;
        int recovered = -1;
        char err[512] = "";
        assert_int_equal(agent_spool_open_checked(&o, &k, &recovered, err, sizeof(err)), 0);
        assert_int_equal(recovered, 0);
        assert_int_equal(agent_spool_epoch(k), ckpt.epoch);
        assert_int_equal(sp_next_seq(k), 71); /* the WAL's commits are there */
        agent_spool_close(k);
        free(bytes);
        return;
    }
    struct expect e = {.epoch = ckpt.epoch,
                       .first = ckpt.first,
                       .last = ckpt.last,
                       .count = ckpt.last - ckpt.first + 1,
                       .why = strcmp(damage, "gone") == 0 ? "not closed cleanly"
                              : strcmp(damage, "cut") == 0 ? "frames committed"
                                                           : "not a WAL header"};
    expect_recovered(f, ckpt.epoch, bytes, len, &e);
    free(bytes);
}

static void test_unclean_stop_wal_intact(void **state)
{
    unclean_stop(*state, NULL);
}

/* Without its -shm too, the WAL's loss shows only in the mark the file holds. */
static void test_unclean_stop_wal_and_shm_gone(void **state)
{
    unclean_stop(*state, "gone");
}

static void test_unclean_stop_wal_cut(void **state)
{
    unclean_stop(*state, "cut");
}

static void test_unclean_stop_wal_header_garbage(void **state)
{
    unclean_stop(*state, "header");
}

/* A crash after the link and the move of the WAL, before the new spool was renamed into place:
 * the next start finishes the job (and counts the records in the moved WAL). */
static void test_interrupted_quarantine_resumes(void **state)
{
    struct fx *f = *state;
    char src[192], srcwal[192], srcshm[192], q[192], qwal[192], qshm[192], left[192];
    fx_file(f, "src.db", src, sizeof(src));
    fx_file(f, "src.db-wal", srcwal, sizeof(srcwal));
    fx_file(f, "src.db-shm", srcshm, sizeof(srcshm));
    fx_file(f, "spool.db.corrupt-19700101T000001Z", q, sizeof(q));
    fx_file(f, "spool.db.corrupt-19700101T000001Z-wal", qwal, sizeof(qwal));
    fx_file(f, "spool.db.corrupt-19700101T000001Z-shm", qshm, sizeof(qshm));
    fx_file(f, "spool.db.new-1", left, sizeof(left));
    struct old ckpt;
    struct agent_spool *s = running_spool(f, src, &ckpt);
    copy_file(src, f->path);
    copy_file(srcwal, qwal);
    copy_file(srcshm, qshm);
    agent_spool_close(s);
    assert_int_equal(link(f->path, q), 0);
    spew(left, (const uint8_t *)"half-made", 9);
    size_t len = 0;
    uint8_t *bytes = slurp(f->path, &len);

    struct expect e = {.epoch = ckpt.epoch,
                       .first = ckpt.first,
                       .last = 70,
                       .count = 70 - ckpt.first + 1,
                       .why = "interrupted"};
    expect_recovered(f, ckpt.epoch, bytes, len, &e);
    /* The old spool with its WAL is intact under Q, and still opens. */
    assert_true(exists(qwal));
    assert_int_equal(db_int(q, "SELECT value FROM meta WHERE key = 'next_seq'"), 71);
    free(bytes);
}

static void test_two_quarantines_keep_both(void **state)
{
    struct fx *f = *state;
    uint8_t a[4096], b[4096];
    memset(a, 'a', sizeof(a));
    memset(b, 'b', sizeof(b));
    struct agent_spool_opts o = opts_for(f->path);
    struct agent_spool *s = NULL;
    char err[512] = "";
    int recovered = 0;
    spew(f->path, a, sizeof(a));
    assert_int_equal(agent_spool_open_checked(&o, &s, &recovered, err, sizeof(err)), 0);
    assert_int_equal(recovered, 1);
    agent_spool_close(s);
    spew(f->path, b, sizeof(b));
    assert_int_equal(agent_spool_open_checked(&o, &s, &recovered, err, sizeof(err)), 0);
    assert_int_equal(recovered, 1);
    agent_spool_close(s);

    /* Both kept, whatever the clock did in between. */
    DIR *d = opendir(f->dir);
    assert_non_null(d);
    struct dirent *de;
    int seen_a = 0, seen_b = 0;
    while ((de = readdir(d)) != NULL) {
        if (strncmp(de->d_name, "spool.db.corrupt-", 17) != 0)
            continue;
        char p[300];
        snprintf(p, sizeof(p), "%s/%s", f->dir, de->d_name);
        size_t len = 0;
        uint8_t *buf = slurp(p, &len);
        assert_int_equal(len, 4096);
        seen_a += buf[0] == 'a';
        seen_b += buf[0] == 'b';
        free(buf);
    }
    closedir(d);
    assert_int_equal(seen_a, 1);
    assert_int_equal(seen_b, 1);
}

/* A symlinked spool: SQLite keeps the -wal/-shm beside the target, so the quarantine happens
 * there, and the symlink stays. */
static void test_symlinked_spool(void **state)
{
    struct fx *f = *state;
    char realdir[192], target[192];
    fx_file(f, "real", realdir, sizeof(realdir));
    fx_file(f, "real/t.db", target, sizeof(target));
    assert_int_equal(mkdir(realdir, 0700), 0);
    struct old old = make_spool(target);
    assert_int_equal(symlink("real/t.db", f->path), 0);
    xor_bytes(target, 0, 16);
    size_t len = 0;
    uint8_t *bytes = slurp(target, &len);

    struct agent_spool_opts o = opts_for(f->path);
    struct agent_spool *s = NULL;
    int recovered = -1;
    char err[512] = "";
    assert_int_equal(agent_spool_open_checked(&o, &s, &recovered, err, sizeof(err)), 0);
    assert_int_equal(recovered, 1);
    struct expect e = {.why = "not a database"};
    check_new_spool(s, old.epoch, &e);
    agent_spool_close(s);

    struct stat sb;
    assert_int_equal(lstat(f->path, &sb), 0);
    assert_true(S_ISLNK(sb.st_mode));
    DIR *d = opendir(realdir);
    assert_non_null(d);
    struct dirent *de;
    int found = 0, others = 0;
    while ((de = readdir(d)) != NULL) {
        if (!strncmp(de->d_name, "t.db.corrupt-", 13)) {
            char p[300];
            snprintf(p, sizeof(p), "%s/%s", realdir, de->d_name);
            size_t qlen = 0;
            uint8_t *qb = slurp(p, &qlen);
            assert_int_equal(qlen, len);
            assert_memory_equal(qb, bytes, len);
            free(qb);
            found++;
        } else if (strcmp(de->d_name, ".") && strcmp(de->d_name, "..") &&
                   strcmp(de->d_name, "t.db")) {
            others++;
        }
    }
    closedir(d);
    assert_int_equal(found, 1);
    assert_int_equal(others, 0);
    free(bytes);
}

static void test_recover_at_run_time(void **state)
{
    struct fx *f = *state;
    struct agent_spool_opts o = opts_for(f->path);
    uint32_t rng = 3;
    struct agent_spool *s = sp_open(f->path);
    commit_segs(s, 10, &rng);
    ack_oldest(s, 2);
    uint64_t old_epoch = agent_spool_epoch(s);
    assert_int_equal(sp_next_seq(s), 21);

    /* Everything in the file itself, then the file is damaged under the open spool. */
    sqlite3 *db = NULL;
    assert_int_equal(sqlite3_open(f->path, &db), SQLITE_OK);
    assert_int_equal(sqlite3_exec(db, "PRAGMA wal_checkpoint(TRUNCATE)", NULL, NULL, NULL),
                     SQLITE_OK);
    sqlite3_close(db);
    xor_bytes(f->path, 0, 16);
    size_t len = 0;
    uint8_t *bytes = slurp(f->path, &len);

    char err[512] = "";
    int rc =
        agent_spool_recover(&s, &o, "commit: database disk image is malformed", err, sizeof(err));
    if (rc)
        fprintf(stderr, "recover: %d %s\n", rc, err);
    assert_int_equal(rc, 0);
    assert_non_null(s);
    /* The file is unreadable, so the range is what the running spool knew. */
    struct expect e = {.epoch = old_epoch,
                       .first = 5,
                       .last = 20,
                       .count = 16,
                       .why = "commit: database disk image is malformed"};
    check_new_spool(s, old_epoch, &e);
    commit_segs(s, 1, &rng);
    assert_int_equal(sp_next_seq(s), 3);
    agent_spool_close(s);

    int ncorrupt, nnew;
    char q[256];
    scan_dir(f, &ncorrupt, &nnew, q, sizeof(q));
    assert_int_equal(ncorrupt, 1);
    assert_int_equal(nnew, 0);
    size_t qlen = 0;
    uint8_t *qb = slurp(q, &qlen);
    assert_int_equal(qlen, len);
    assert_memory_equal(qb, bytes, len);
    free(qb);
    free(bytes);

    /* Bad arguments: an error, nothing touched. */
    struct agent_spool *none = NULL;
    assert_int_equal(agent_spool_recover(&none, &o, "x", err, sizeof(err)), CIS_EINVAL);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_healthy_spool_kept, fx_setup, fx_teardown),
        cmocka_unit_test_setup_teardown(test_truncated, fx_setup, fx_teardown),
        cmocka_unit_test_setup_teardown(test_flipped_middle_page, fx_setup, fx_teardown),
        cmocka_unit_test_setup_teardown(test_flipped_index_page, fx_setup, fx_teardown),
        cmocka_unit_test_setup_teardown(test_flipped_header, fx_setup, fx_teardown),
        cmocka_unit_test_setup_teardown(test_random_bytes, fx_setup, fx_teardown),
        cmocka_unit_test_setup_teardown(test_inconsistent_meta, fx_setup, fx_teardown),
        cmocka_unit_test_setup_teardown(test_zero_byte_beside_wal, fx_setup, fx_teardown),
        cmocka_unit_test_setup_teardown(test_zero_byte_alone, fx_setup, fx_teardown),
        cmocka_unit_test_setup_teardown(test_deleted_wal, fx_setup, fx_teardown),
        cmocka_unit_test_setup_teardown(test_unclean_stop_wal_intact, fx_setup, fx_teardown),
        cmocka_unit_test_setup_teardown(test_unclean_stop_wal_and_shm_gone, fx_setup,
                                        fx_teardown),
        cmocka_unit_test_setup_teardown(test_unclean_stop_wal_cut, fx_setup, fx_teardown),
        cmocka_unit_test_setup_teardown(test_unclean_stop_wal_header_garbage, fx_setup,
                                        fx_teardown),
        cmocka_unit_test_setup_teardown(test_interrupted_quarantine_resumes, fx_setup, fx_teardown),
        cmocka_unit_test_setup_teardown(test_two_quarantines_keep_both, fx_setup, fx_teardown),
        cmocka_unit_test_setup_teardown(test_symlinked_spool, fx_setup, fx_teardown),
        cmocka_unit_test_setup_teardown(test_recover_at_run_time, fx_setup, fx_teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
