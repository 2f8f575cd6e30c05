/* Unit tests for `cistern-agent status` (edge-agent/status.c, included whole so its static
 * helpers can be reached) and the agent's control socket (edge-agent/control.c, linked). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>
#include <fcntl.h>
#include <pthread.h>

#include "../../edge-agent/status.c"

/* ---- stubs for what main.c provides to control.c ---- */

static struct {
    agent_fd_cb cb;
    void *ctx;
    int fd;
    int unwatched;
} loop;

static struct agent_runtime stub_rt;
static struct agent_counters stub_counters;

int agent_loop_watch(struct agent *a, int fd, short events, agent_fd_cb cb, void *ctx)
{
    loop.cb = cb;
    loop.ctx = ctx;
    loop.fd = fd;
    return 0;
}

void agent_loop_unwatch(struct agent *a, int fd)
{
    if (fd == loop.fd)
        loop.unwatched = 1;
}

void agent_runtime(struct agent *a, struct agent_runtime *out)
{
    *out = stub_rt;
}

/* ---- fixture: a temporary directory ---- */

struct fx {
    char dir[64];
    char path[128]; /* spool.db in dir */
};

static void fx_path(const struct fx *f, char *out, size_t len, const char *name)
{
    snprintf(out, len, "%s/%s", f->dir, name);
}

static int fx_setup(void **state)
{
    struct fx *f = calloc(1, sizeof(*f));
    if (!f)
        return -1;
    snprintf(f->dir, sizeof(f->dir), "/tmp/cistern-status-XXXXXX");
    if (!mkdtemp(f->dir)) {
        free(f);
        return -1;
    }
    fx_path(f, f->path, sizeof(f->path), "spool.db");
    memset(&loop, 0, sizeof(loop));
    *state = f;
    return 0;
}

static int fx_teardown(void **state)
{
    struct fx *f = *state;
    static const char *const names[] = {"spool.db", "spool.db-wal", "spool.db-shm", "agent.sock",
                                        "agent.yaml", "out.txt",      "file.txt"};
    for (size_t i = 0; i < sizeof(names) / sizeof(names[0]); i++) {
        char p[192];
        fx_path(f, p, sizeof(p), names[i]);
        unlink(p);
    }
    assert_int_equal(rmdir(f->dir), 0);
    free(f);
    return 0;
}

/* What agent_json_str() makes of S. Caller frees. */
static char *json_of(const char *s)
{
    char *buf = NULL;
    size_t n = 0;
    FILE *f = open_memstream(&buf, &n);
    assert_non_null(f);
    agent_json_str(f, s);
    assert_int_equal(fclose(f), 0);
    return buf;
}

static void check_escape(const char *in, const char *want_json, const char *want_back)
{
    char *j = json_of(in);
    struct jnode *n;
    assert_string_equal(j, want_json);
    /* and it is valid JSON that decodes to WANT_BACK */
    n = jparse(j, strlen(j));
    assert_non_null(n);
    assert_int_equal(n->type, JN_STR);
    assert_string_equal(n->text, want_back);
    jfree(n);
    free(j);
}

static void test_json_escape(void **state)
{
    char *j;
    check_escape("plain gw-0042", "\"plain gw-0042\"", "plain gw-0042");
    check_escape("a\"b\\c/d", "\"a\\\"b\\\\c/d\"", "a\"b\\c/d");
    check_escape("l1\nl2\r\t\b\f", "\"l1\\nl2\\r\\t\\b\\f\"", "l1\nl2\r\t\b\f");
    check_escape("\x01\x1f\x7f", "\"\\u0001\\u001f\\u007f\"", "\x01\x1f\x7f");
    /* valid UTF-8 passes through: é (2 bytes), € (3), 😀 (4) */
    check_escape("\xc3\xa9\xe2\x82\xac\xf0\x9f\x98\x80", "\"\xc3\xa9\xe2\x82\xac\xf0\x9f\x98\x80\"",
                 "\xc3\xa9\xe2\x82\xac\xf0\x9f\x98\x80");
    /* each invalid byte becomes U+FFFD: a stray byte, a truncated sequence, an overlong '/',
     * a UTF-16 surrogate, a code point past U+10FFFF */
    check_escape("a\xff" "b", "\"a\\ufffdb\"", "a\xef\xbf\xbd" "b");
    check_escape("\xe2\x82", "\"\\ufffd\\ufffd\"", "\xef\xbf\xbd\xef\xbf\xbd");
    check_escape("\xc0\xaf", "\"\\ufffd\\ufffd\"", "\xef\xbf\xbd\xef\xbf\xbd");
    check_escape("\xed\xa0\x80", "\"\\ufffd\\ufffd\\ufffd\"",
                 "\xef\xbf\xbd\xef\xbf\xbd\xef\xbf\xbd");
    check_escape("\xf4\x90\x80\x80", "\"\\ufffd\\ufffd\\ufffd\\ufffd\"",
                 "\xef\xbf\xbd\xef\xbf\xbd\xef\xbf\xbd\xef\xbf\xbd");
    j = json_of(NULL);
    assert_string_equal(j, "null");
    free(j);
}

static void test_json_parse(void **state)
{
    static const char *const bad[] = {
        "",          "{",           "{\"a\":}",     "{\"a\":1,}",  "[1 2]",      "{\"a\":1} x",
        "01",        "1.",          "-",            "1e",          "tru",        "\"\x01\"",
        "\"\\x\"",   "\"\\u12g4\"", "{a:1}",        "\"abc",       "{\"a\" 1}",  "nul",
    };
    const char *doc = " {\"a\":{\"b\":[1,-2.5e3,true,false,null],\"c\":\"x\\u00e9\\ud83d\\ude00"
                      "\\ud800\\u0000\"},\"n\":18446744073709551615,\"neg\":-1,\"f\":1.5} ";
    struct jnode *n;
    char deep[200];

    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        n = jparse(bad[i], strlen(bad[i]));
        if (n)
            fail_msg("parsed bad JSON: %s", bad[i]);
    }
    /* nesting past the limit is refused, not a stack overflow */
    memset(deep, '[', 100);
    memset(deep + 100, ']', 100);
    assert_null(jparse(deep, sizeof(deep)));
    memset(deep, '[', 10);
    memset(deep + 10, ']', 10);
    n = jparse(deep, 20);
    assert_non_null(n);
    jfree(n);

    n = jparse(doc, strlen(doc));
    assert_non_null(n);
    assert_int_equal(n->type, JN_OBJ);
    /* surrogate pair joined; a lone surrogate and \u0000 become U+FFFD */
    assert_string_equal(jstr(n, "a.c"), "x\xc3\xa9\xf0\x9f\x98\x80\xef\xbf\xbd\xef\xbf\xbd");
    assert_int_equal(jget(n, "a.b")->type, JN_ARR);
    assert_null(jget(n, "a.b.c"));
    assert_null(jstr(n, "a.missing"));
    assert_true(ju64(n, "n", 0) == UINT64_MAX);
    assert_int_equal(ju64(n, "neg", 7), 7); /* not a u64: the default */
    assert_int_equal(ju64(n, "f", 7), 7);
    assert_int_equal(ju64(n, "a", 7), 7);
    {
        /* written back: the same document, compact */
        char *buf = NULL;
        size_t len = 0;
        FILE *f = open_memstream(&buf, &len);
        jwrite(f, n);
        fclose(f);
        assert_string_equal(buf, "{\"a\":{\"b\":[1,-2.5e3,true,false,null],\"c\":\"x\xc3\xa9"
                                 "\xf0\x9f\x98\x80\xef\xbf\xbd\xef\xbf\xbd\"},"
                                 "\"n\":18446744073709551615,\"neg\":-1,\"f\":1.5}");
        free(buf);
    }
    jfree(n);
}

static void test_formatting(void **state)
{
    char b[64];
    assert_string_equal(fmt_count(b, sizeof(b), 0), "0");
    assert_string_equal(fmt_count(b, sizeof(b), 999), "999");
    assert_string_equal(fmt_count(b, sizeof(b), 1000), "1,000");
    assert_string_equal(fmt_count(b, sizeof(b), 12345), "12,345");
    assert_string_equal(fmt_count(b, sizeof(b), 1234567), "1,234,567");
    assert_string_equal(fmt_count(b, sizeof(b), UINT64_MAX), "18,446,744,073,709,551,615");
    assert_true(strlen(fmt_count(b, 4, 12345)) < 4); /* truncated, still terminated */

    assert_string_equal(fmt_bytes(b, sizeof(b), 0), "0 B");
    assert_string_equal(fmt_bytes(b, sizeof(b), 1023), "1023 B");
    assert_string_equal(fmt_bytes(b, sizeof(b), 1024), "1 KiB");
    assert_string_equal(fmt_bytes(b, sizeof(b), 1536), "1.5 KiB");
    assert_string_equal(fmt_bytes(b, sizeof(b), 2202010), "2.1 MiB");
    assert_string_equal(fmt_bytes(b, sizeof(b), 512ULL << 20), "512 MiB");
    assert_string_equal(fmt_bytes(b, sizeof(b), (1ULL << 20) - 1), "1 MiB");
    assert_string_equal(fmt_bytes(b, sizeof(b), 3ULL << 40), "3 TiB");

    assert_string_equal(fmt_age(b, sizeof(b), -5), "0 s");
    assert_string_equal(fmt_age(b, sizeof(b), 59), "59 s");
    assert_string_equal(fmt_age(b, sizeof(b), 60), "1 min");
    assert_string_equal(fmt_age(b, sizeof(b), 192), "3 min 12 s");
    assert_string_equal(fmt_age(b, sizeof(b), 3600), "1 h");
    assert_string_equal(fmt_age(b, sizeof(b), 7500), "2 h 5 min");
    assert_string_equal(fmt_age(b, sizeof(b), 3 * 86400 + 4 * 3600 + 59), "3 d 4 h");
    assert_string_equal(fmt_age(b, sizeof(b), 2 * 86400), "2 d");

    /* 2026-11-26T10:15:00Z */
    assert_true(iso_to_ms("2026-11-26T10:15:00Z") == 1795688100000LL);
    assert_true(iso_to_ms("1970-01-01T00:00:01Z") == 1000);
    assert_true(iso_to_ms("2026-11-26T10:15:00") == 0);
    assert_true(iso_to_ms("2026-11-26T10:15:00Zjunk") == 0);
    assert_true(iso_to_ms("yesterday") == 0);
    assert_true(iso_to_ms(NULL) == 0);
    assert_string_equal(fmt_wall(b, sizeof(b), 1795688100000LL, 1795688100000LL + 3600000, 0),
                        "2026-11-26 10:15:00 UTC");
    assert_string_equal(fmt_wall(b, sizeof(b), 1795688100000LL, 1795688100000LL + 3600000, 1),
                        "10:15:00");
    assert_string_equal(fmt_wall(b, sizeof(b), 1795688100000LL, 1795688100000LL + 86400000, 1),
                        "2026-11-26 10:15:00 UTC");

    {
        char *buf = NULL;
        size_t len = 0;
        FILE *f = open_memstream(&buf, &len);
        /* ESC, BEL, C1 CSI (U+009B), DEL go; é stays */
        put_clean(f, "a\x1b]0;x\x07\xc2\x9b" "b\x7f\xc3\xa9");
        put_clean(f, NULL);
        fclose(f);
        assert_string_equal(buf, "a?]0;x??b?\xc3\xa9");
        free(buf);
    }
}

static void test_drain_rate(void **state)
{
    struct drain d;
    memset(&d, 0, sizeof(d));
    drain_update(&d, 10000, 7, 1000);
    assert_false(d.have_rate);
    assert_false(d.have_eta);
    drain_update(&d, 9000, 7, 2000); /* 1000 rec/s */
    assert_true(d.have_rate);
    assert_true(d.rate > 999.9 && d.rate < 1000.1);
    assert_true(d.have_eta);
    assert_true(d.eta_s > 8.99 && d.eta_s < 9.01);
    drain_update(&d, 9000, 7, 3000); /* stalled: smoothed to 500 */
    assert_true(d.rate > 499.9 && d.rate < 500.1);
    drain_update(&d, 9000, 8, 4000); /* a new epoch: start over */
    assert_false(d.have_rate);
    assert_false(d.have_eta);
    drain_update(&d, 9500, 8, 5000); /* growing */
    assert_true(d.have_rate && d.rate < 0);
    assert_false(d.have_eta);
}

/* ---- the spool, read-only ---- */

static void exec_ok(sqlite3 *db, const char *sql)
{
    char *msg = NULL;
    int rc = sqlite3_exec(db, sql, NULL, NULL, &msg);
    if (rc != SQLITE_OK)
        fail_msg("%s: %s", sql, msg ? msg : "?");
    sqlite3_free(msg);
}

/* A schema-v2 spool (spool.h) with known contents:
 *   high:   2 segments, 30 records, 100 + 50 bytes, oldest created at T0 - 60 s
 *   normal: none
 *   low:    1 segment,  70 records, 200 bytes
 *   ledger: expired_ttl 120 records in 1 entry (sent); rejected 5 + 7 in 2 entries, 1 unsent;
 *           corrupt_spool 0 records, 1 entry unsent
 * Returns the writer's connection, left open (WAL mode), or closes it when CLOSE. */
static sqlite3 *make_spool(const char *path, int64_t t0, int close_it)
{
    sqlite3 *db = NULL;
    char sql[1024];
    assert_int_equal(sqlite3_open_v2(path, &db, SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE, NULL),
                     SQLITE_OK);
    exec_ok(db, "PRAGMA journal_mode=WAL");
    exec_ok(db,
            "CREATE TABLE meta(key TEXT PRIMARY KEY, value INTEGER NOT NULL);"
            "CREATE TABLE segments(first_seq INTEGER PRIMARY KEY, last_seq INTEGER NOT NULL,"
            " priority INTEGER NOT NULL, record_count INTEGER NOT NULL, compression INTEGER NOT "
            "NULL, raw_size INTEGER NOT NULL, created_ms INTEGER NOT NULL, data BLOB NOT NULL,"
            " expires_ms INTEGER NOT NULL DEFAULT 0, sealed INTEGER NOT NULL DEFAULT 0);"
            "CREATE INDEX segments_prio ON segments(priority, first_seq);"
            "CREATE TABLE ledger(id INTEGER PRIMARY KEY, reason TEXT NOT NULL, epoch INTEGER NOT "
            "NULL, first_seq INTEGER NOT NULL, last_seq INTEGER NOT NULL, count INTEGER NOT NULL,"
            " ts_ms INTEGER NOT NULL, detail TEXT, sent INTEGER NOT NULL DEFAULT 0);"
            "INSERT INTO meta VALUES('schema_version',2),('epoch',9223372036854775000),"
            "('next_seq',101);");
    snprintf(sql, sizeof(sql),
             "INSERT INTO segments(first_seq,last_seq,priority,record_count,compression,raw_size,"
             "created_ms,data) VALUES"
             "(1,20,0,20,0,100,%lld,zeroblob(100)),(21,30,0,10,0,50,%lld,zeroblob(50)),"
             "(31,100,2,70,0,200,%lld,zeroblob(200));",
             (long long)(t0 - 60000), (long long)(t0 - 1000), (long long)(t0 - 30000));
    exec_ok(db, sql);
    exec_ok(db, "INSERT INTO ledger(reason,epoch,first_seq,last_seq,count,ts_ms,detail,sent) VALUES"
                "('expired_ttl',1,1,120,120,0,NULL,1),"
                "('rejected',1,121,125,5,0,'HTTP 400: bad',1),"
                "('rejected',1,126,132,7,0,'HTTP 400: bad',0),"
                "('corrupt_spool',0,0,0,0,0,'moved aside',0);");
    if (close_it) {
        sqlite3_close(db);
        return NULL;
    }
    return db;
}

static char *slurp(const char *path, size_t *len)
{
    FILE *f = fopen(path, "rb");
    char *buf;
    long n;
    assert_non_null(f);
    fseek(f, 0, SEEK_END);
    n = ftell(f);
    fseek(f, 0, SEEK_SET);
    buf = malloc((size_t)n + 1);
    assert_non_null(buf);
    assert_int_equal(fread(buf, 1, (size_t)n, f), (size_t)n);
    buf[n] = '\0';
    fclose(f);
    *len = (size_t)n;
    return buf;
}

static void test_snap_missing_spool(void **state)
{
    struct fx *f = *state;
    struct snap s;
    char err[512], p[192];
    struct stat sb;

    assert_int_equal(snap_read(f->path, &s, err, sizeof(err)), CIS_ENOTFOUND);
    assert_non_null(strstr(err, "no spool at "));
    assert_non_null(strstr(err, f->path));
    assert_non_null(strstr(err, "has the agent run?"));
    /* nothing was created */
    assert_int_equal(stat(f->path, &sb), -1);
    fx_path(f, p, sizeof(p), "spool.db-wal");
    assert_int_equal(stat(p, &sb), -1);

    /* not a spool: a clear error, the file untouched */
    {
        int fd = open(f->path, O_WRONLY | O_CREAT, 0600);
        assert_true(fd >= 0);
        assert_int_equal(write(fd, "not a database, just text\n", 26), 26);
        close(fd);
        assert_int_equal(snap_read(f->path, &s, err, sizeof(err)), CIS_EDB);
        assert_non_null(strstr(err, "cannot read the spool"));
        assert_int_equal(stat(f->path, &sb), 0);
        assert_int_equal(sb.st_size, 26);
    }
}

static void test_snap_reads_spool(void **state)
{
    struct fx *f = *state;
    int64_t t0 = cis_wall_ms();
    struct snap s;
    char err[512], wal[192];
    char *before, *after;
    size_t nb, na;
    struct stat sb;

    make_spool(f->path, t0, 1);
    before = slurp(f->path, &nb);
    assert_int_equal(snap_read(f->path, &s, err, sizeof(err)), 0);
    assert_true(s.epoch == 9223372036854775000ULL);
    assert_int_equal(s.next_seq, 101);
    assert_int_equal(s.records, 100);
    assert_int_equal(s.segments, 3);
    assert_int_equal(s.bytes, 350);
    assert_int_equal(s.prio[CIS_PRIO_HIGH].records, 30);
    assert_int_equal(s.prio[CIS_PRIO_HIGH].segments, 2);
    assert_int_equal(s.prio[CIS_PRIO_HIGH].bytes, 150);
    assert_int_equal(s.prio[CIS_PRIO_NORMAL].records, 0);
    assert_int_equal(s.prio[CIS_PRIO_LOW].records, 70);
    assert_int_equal(s.prio[CIS_PRIO_LOW].bytes, 200);
    assert_true(s.oldest_created_ms == t0 - 60000);
    assert_true(s.wall_ms >= t0);
    /* all five reasons, in order, zeros included */
    assert_true(s.nloss >= NREASONS);
    for (size_t i = 0; i < NREASONS; i++)
        assert_string_equal(s.loss[i].reason, loss_reasons[i]);
    assert_int_equal(s.loss[0].entries, 0); /* evicted_full */
    assert_int_equal(s.loss[1].records, 120);
    assert_int_equal(s.loss[1].entries, 1);
    assert_int_equal(s.loss[1].unsent, 0);
    assert_int_equal(s.loss[2].records, 12);
    assert_int_equal(s.loss[2].entries, 2);
    assert_int_equal(s.loss[2].unsent, 1);
    assert_int_equal(s.loss[3].records, 0);
    assert_int_equal(s.loss[3].entries, 1);
    assert_int_equal(s.loss[3].unsent, 1);
    assert_int_equal(s.loss[4].entries, 0);
    /* file sizes as on disk */
    assert_int_equal(stat(f->path, &sb), 0);
    assert_int_equal(s.db_bytes, (uint64_t)sb.st_size);
    fx_path(f, wal, sizeof(wal), "spool.db-wal");
    if (stat(wal, &sb) == 0)
        assert_int_equal(s.wal_bytes, (uint64_t)sb.st_size);
    else
        assert_int_equal(s.wal_bytes, 0);
    /* read-only: the database's bytes did not change */
    after = slurp(f->path, &na);
    assert_int_equal(na, nb);
    assert_memory_equal(after, before, nb);
    free(before);
    free(after);
}

/* While the agent holds a write transaction, status reads the last committed state without
 * waiting, and once status returns, it holds nothing that keeps a checkpoint from finishing. */
static void test_snap_beside_a_writer(void **state)
{
    struct fx *f = *state;
    sqlite3 *w = make_spool(f->path, cis_wall_ms(), 0);
    sqlite3_stmt *st = NULL;
    struct snap s;
    char err[512];

    exec_ok(w, "BEGIN IMMEDIATE");
    exec_ok(w, "INSERT INTO segments(first_seq,last_seq,priority,record_count,compression,raw_size,"
               "created_ms,data) VALUES(101,105,1,5,0,10,1,zeroblob(10))");
    assert_int_equal(snap_read(f->path, &s, err, sizeof(err)), 0);
    assert_int_equal(s.records, 100); /* the uncommitted segment is not seen */
    exec_ok(w, "COMMIT");
    assert_int_equal(snap_read(f->path, &s, err, sizeof(err)), 0);
    assert_int_equal(s.records, 105);
    assert_int_equal(s.prio[CIS_PRIO_NORMAL].records, 5);

    /* A full checkpoint that truncates the WAL: blocked by any reader still in a
     * transaction, so busy = 0 and log = 0 prove status let go. */
    assert_int_equal(sqlite3_prepare_v2(w, "PRAGMA wal_checkpoint(TRUNCATE)", -1, &st, NULL),
                     SQLITE_OK);
    assert_int_equal(sqlite3_step(st), SQLITE_ROW);
    assert_int_equal(sqlite3_column_int(st, 0), 0);
    assert_int_equal(sqlite3_column_int(st, 1), 0);
    sqlite3_finalize(st);
    sqlite3_close(w);
}

/* A WAL left behind by an agent that died: status reads through it, and neither checkpoints
 * it into the database nor removes it (a read-only connection never writes). */
static void test_snap_leaves_wal_alone(void **state)
{
    struct fx *f = *state;
    char wal[192], err[512], *db0, *wal0, *db1, *wal1;
    size_t ndb0, nwal0, ndb1, nwal1;
    struct snap s;

    fx_path(f, wal, sizeof(wal), "spool.db-wal");
    make_spool(f->path, cis_wall_ms(), 1);
    {
        /* The agent's last commit is in the WAL, and it closes without a checkpoint, as when
         * it is killed. */
        sqlite3 *db = NULL;
        assert_int_equal(sqlite3_open_v2(f->path, &db, SQLITE_OPEN_READWRITE, NULL), SQLITE_OK);
        assert_int_equal(sqlite3_db_config(db, SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE, 1, NULL),
                         SQLITE_OK);
        exec_ok(db, "PRAGMA wal_autocheckpoint=0; INSERT INTO segments(first_seq,last_seq,"
                    "priority,record_count,compression,raw_size,created_ms,data) "
                    "VALUES(101,107,1,7,0,10,1,zeroblob(10))");
        sqlite3_close(db);
    }
    db0 = slurp(f->path, &ndb0);
    wal0 = slurp(wal, &nwal0);
    assert_true(nwal0 > 0);

    assert_int_equal(snap_read(f->path, &s, err, sizeof(err)), 0);
    assert_int_equal(s.records, 107); /* the WAL's commit is seen */
    assert_int_equal(s.wal_bytes, nwal0);

    db1 = slurp(f->path, &ndb1);
    wal1 = slurp(wal, &nwal1);
    assert_int_equal(ndb1, ndb0);
    assert_memory_equal(db1, db0, ndb0);
    assert_int_equal(nwal1, nwal0);
    assert_memory_equal(wal1, wal0, nwal0);
    free(db0);
    free(wal0);
    free(db1);
    free(wal1);
}

/* ---- the report ---- */

static char *render(const struct agent_config *cfg, const struct snap *s,
                    const struct agent_answer *a, const struct drain *d, int json)
{
    char *buf = NULL;
    size_t n = 0;
    FILE *f = open_memstream(&buf, &n);
    assert_non_null(f);
    if (json)
        report_json(f, cfg, s, a, d);
    else
        report_text(f, cfg, s, a, d);
    assert_int_equal(fclose(f), 0);
    return buf;
}

static void test_report_json(void **state)
{
    struct fx *f = *state;
    struct agent_config cfg = {.id = "gw-\"odd\"\n", .spool_path = f->path,
                               .spool_max_size = 512ULL << 20};
    struct agent_answer a = {.state = "not running"};
    struct drain d;
    struct snap s;
    struct jnode *n;
    char err[512], *out;
    const char *ans = "{\"running\":true,\"pid\":812,\"agent_id\":\"gw-run\",\"link\":"
                      "{\"state\":\"down\",\"last_error\":\"bad \\\"x\\\"\"}}";

    make_spool(f->path, cis_wall_ms(), 1);
    assert_int_equal(snap_read(f->path, &s, err, sizeof(err)), 0);

    out = render(&cfg, &s, &a, NULL, 1);
    assert_int_equal(out[strlen(out) - 1], '\n');
    n = jparse(out, strlen(out));
    assert_non_null(n);
    assert_string_equal(jstr(n, "agent_id"), "gw-\"odd\"\n");
    assert_string_equal(jstr(n, "spool_path"), f->path);
    assert_string_equal(jstr(n, "epoch"), "9223372036854775000");
    assert_int_equal(ju64(n, "next_seq", 0), 101);
    assert_int_equal(ju64(n, "pending.records", 0), 100);
    assert_int_equal(ju64(n, "pending.segments", 0), 3);
    assert_int_equal(ju64(n, "pending.bytes", 0), 350);
    assert_int_equal(ju64(n, "pending.by_priority.high.records", 9), 30);
    assert_int_equal(ju64(n, "pending.by_priority.high.segments", 9), 2);
    assert_int_equal(ju64(n, "pending.by_priority.normal.records", 9), 0);
    assert_int_equal(ju64(n, "pending.by_priority.low.bytes", 9), 200);
    assert_int_equal(jget(n, "oldest_pending_age_s")->type, JN_NUM);
    assert_true(strtod(jget(n, "oldest_pending_age_s")->text, NULL) >= 60.0);
    assert_int_equal(ju64(n, "spool_files.db_bytes", 0), s.db_bytes);
    assert_int_equal(ju64(n, "spool_files.wal_bytes", 1), s.wal_bytes);
    assert_int_equal(ju64(n, "spool_files.max_size", 0), 512ULL << 20);
    for (size_t i = 0; i < NREASONS; i++) {
        char p[64];
        snprintf(p, sizeof(p), "ledger.%s.records", loss_reasons[i]);
        assert_non_null(jget(n, p));
    }
    assert_int_equal(ju64(n, "ledger.expired_ttl.records", 0), 120);
    assert_int_equal(ju64(n, "ledger.rejected.entries", 0), 2);
    assert_int_equal(ju64(n, "ledger.rejected.unsent", 0), 1);
    assert_int_equal(ju64(n, "ledger.corrupt_spool.entries", 0), 1);
    assert_int_equal(jget(n, "agent")->type, JN_OBJ);
    assert_int_equal(jget(n, "agent.running")->type, JN_FALSE);
    assert_null(jget(n, "agent.pid"));
    assert_null(jget(n, "drain_rate")); /* only with --watch */
    jfree(n);
    free(out);

    /* the agent's object is carried whole; watch adds the rate */
    a.obj = jparse(ans, strlen(ans));
    assert_non_null(a.obj);
    memset(&d, 0, sizeof(d));
    drain_update(&d, 200, s.epoch, 0);
    drain_update(&d, 100, s.epoch, 1000);
    out = render(&cfg, &s, &a, &d, 1);
    n = jparse(out, strlen(out));
    assert_non_null(n);
    assert_string_equal(jstr(n, "agent_id"), "gw-run");
    assert_true(jtrue(n, "agent.running"));
    assert_int_equal(ju64(n, "agent.pid", 0), 812);
    assert_string_equal(jstr(n, "agent.link.last_error"), "bad \"x\"");
    assert_string_equal(jget(n, "drain_rate")->text, "100.0");
    assert_string_equal(jget(n, "eta_s")->text, "1");
    jfree(n);
    free(out);
    jfree(a.obj);

    /* an empty spool: oldest is null */
    memset(&s, 0, sizeof(s));
    a.obj = NULL;
    out = render(&cfg, &s, &a, NULL, 1);
    n = jparse(out, strlen(out));
    assert_non_null(n);
    assert_int_equal(jget(n, "oldest_pending_age_s")->type, JN_NULL);
    jfree(n);
    free(out);
}

static void test_report_text(void **state)
{
    struct fx *f = *state;
    struct agent_config cfg = {.id = "gw-0042", .spool_path = f->path,
                               .spool_max_size = 512ULL << 20};
    struct agent_answer a = {.state = "not running"};
    struct snap s;
    char err[512], *out;
    const char *ans =
        "{\"running\":true,\"pid\":812,\"agent_id\":\"gw-0042\",\"started_at\":"
        "\"2026-11-26T10:15:00Z\",\"link\":{\"state\":\"down\",\"last_error\":\"cannot connect "
        "to ingest.example.com:8443: connection refused\\u001b[2J\",\"last_error_at\":"
        "\"2026-11-26T10:31:02Z\",\"last_success_at\":\"2026-11-26T10:31:00Z\","
        "\"consecutive_failures\":14,\"in_flight_batches\":1},\"spool_full\":false,"
        "\"disk_full\":true,\"counters\":{\"produced\":12345,\"spooled\":12345,\"delivered\":0,"
        "\"rejected\":0,\"refused\":0}}";

    make_spool(f->path, cis_wall_ms(), 1);
    assert_int_equal(snap_read(f->path, &s, err, sizeof(err)), 0);
    snprintf(a.why, sizeof(a.why), "no answer on /run/cistern/agent.sock");
    out = render(&cfg, &s, &a, NULL, 0);
    assert_non_null(strstr(out, "cistern-agent gw-0042\n"));
    assert_non_null(strstr(out, "agent:       not running (no answer on /run/cistern/agent.sock)\n"));
    assert_non_null(strstr(out, "pending:     100 records in 3 segments, 350 B (high 30, normal 0, "
                                "low 70)\n"));
    assert_non_null(strstr(out, "oldest:      1 min"));
    assert_non_null(strstr(out, "spool:       spool.db "));
    assert_non_null(strstr(out, " of 512 MiB ("));
    assert_non_null(strstr(out, "losses:      evicted_full 0 · expired_ttl 120 (1 entry, sent) · "
                                "rejected 12 (2 entries, 1 not yet reported) · corrupt_spool 0 (1 "
                                "entry, 1 not yet reported) · tampered 0\n"));
    assert_null(strstr(out, "link:"));
    free(out);

    a.obj = jparse(ans, strlen(ans));
    assert_non_null(a.obj);
    /* "now" the same day, so times of day are short */
    s.wall_ms = iso_to_ms("2026-11-26T10:34:00Z");
    s.oldest_created_ms = s.wall_ms - 192000;
    out = render(&cfg, &s, &a, NULL, 0);
    assert_non_null(strstr(out, "cistern-agent gw-0042 — running since 2026-11-26 10:15:00 UTC "
                                "(pid 812)\n"));
    /* the escape sequence from the receiver's words is defused */
    assert_non_null(strstr(out, "link:        down — cannot connect to ingest.example.com:8443: "
                                "connection refused?[2J (14 failed attempts, the last at "
                                "10:31:02)\n"));
    assert_null(strchr(out, '\x1b'));
    assert_non_null(strstr(out, "last sent:   2026-11-26 10:31:00 UTC (3 min ago)\n"));
    assert_non_null(strstr(out, "oldest:      3 min 12 s\n"));
    assert_non_null(strstr(out, "alert:       the disk is full"));
    assert_non_null(strstr(out, "since start: produced 12,345 · spooled 12,345 · delivered 0"));
    assert_null(strstr(out, "agent:"));
    assert_null(strstr(out, "drain:"));
    free(out);

    /* --watch adds the drain line */
    {
        struct drain d = {.have_rate = 1, .rate = 1230.4, .have_eta = 1, .eta_s = 241};
        out = render(&cfg, &s, &a, &d, 0);
        assert_non_null(strstr(out, "drain:       drained in ~4 min 1 s at 1,230 rec/s\n"));
        free(out);
        d = (struct drain){.have_rate = 1, .rate = 5000, .have_eta = 1, .eta_s = 0.02};
        out = render(&cfg, &s, &a, &d, 0);
        assert_non_null(strstr(out, "drain:       drained in < 1 s at 5,000 rec/s\n"));
        free(out);
        d = (struct drain){.have_rate = 1, .rate = -49.6};
        out = render(&cfg, &s, &a, &d, 0);
        assert_non_null(strstr(out, "drain:       growing by 50 rec/s\n"));
        free(out);
        d = (struct drain){0};
        out = render(&cfg, &s, &a, &d, 0);
        assert_non_null(strstr(out, "drain:       measuring"));
        free(out);
    }
    jfree(a.obj);
}

/* ---- the control socket, end to end ---- */

static void read_all(int fd, char *buf, size_t cap, size_t *len)
{
    *len = 0;
    for (;;) {
        ssize_t n = read(fd, buf + *len, cap - 1 - *len);
        if (n <= 0)
            break;
        *len += (size_t)n;
    }
    buf[*len] = '\0';
}

static int connect_to(const char *path)
{
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    int fd = socket(AF_UNIX, SOCK_STREAM, 0);
    assert_true(fd >= 0);
    snprintf(addr.sun_path, sizeof(addr.sun_path), "%s", path);
    if (connect(fd, (struct sockaddr *)&addr, sizeof(addr)) < 0) {
        close(fd);
        return -1;
    }
    return fd;
}

static void set_runtime(void)
{
    memset(&stub_rt, 0, sizeof(stub_rt));
    memset(&stub_counters, 0, sizeof(stub_counters));
    stub_counters = (struct agent_counters){.produced = 5, .spooled = 4, .delivered = 3,
                                            .rejected = 2, .refused = 1};
    stub_rt.agent_id = "gw-\xff\"q\"";
    stub_rt.started_wall_ms = 1795688100000LL + 999; /* 2026-11-26T10:15:00.999Z */
    stub_rt.link.state = AGENT_LINK_DOWN;
    snprintf(stub_rt.link.last_error, sizeof(stub_rt.link.last_error),
             "HTTP 503: \"busy\"\n\\ \x01 caf\xc3\xa9");
    stub_rt.link.last_error_wall_ms = 1795689062000LL;
    stub_rt.link.consecutive_failures = 14;
    stub_rt.link.in_flight = 1;
    stub_rt.counters = &stub_counters;
    stub_rt.disk_full = 1;
}

static void test_control_answers(void **state)
{
    struct fx *f = *state;
    struct agent_control *c = NULL;
    char sock[192], buf[8192];
    struct stat sb;
    struct jnode *n;
    size_t len;
    int fd;

    set_runtime();
    fx_path(f, sock, sizeof(sock), "agent.sock");
    assert_int_equal(agent_control_start(NULL, sock, &c), 0);
    assert_non_null(c);
    assert_non_null(loop.cb);
    assert_int_equal(lstat(sock, &sb), 0);
    assert_true(S_ISSOCK(sb.st_mode));
    assert_int_equal(sb.st_mode & 0777, 0660);

    fd = connect_to(sock);
    assert_true(fd >= 0);
    loop.cb(loop.ctx, loop.fd, POLLIN);
    read_all(fd, buf, sizeof(buf), &len);
    close(fd);
    assert_true(len > 0);
    assert_int_equal(buf[len - 1], '\n');
    n = jparse(buf, len);
    if (!n)
        fail_msg("not JSON: %s", buf);
    assert_true(jtrue(n, "running"));
    assert_int_equal(ju64(n, "pid", 0), (uint64_t)getpid());
    assert_string_equal(jstr(n, "agent_id"), "gw-\xef\xbf\xbd\"q\"");
    assert_string_equal(jstr(n, "started_at"), "2026-11-26T10:15:00Z");
    assert_string_equal(jstr(n, "link.state"), "down");
    assert_string_equal(jstr(n, "link.last_error"), "HTTP 503: \"busy\"\n\\ \x01 caf\xc3\xa9");
    assert_string_equal(jstr(n, "link.last_error_at"), "2026-11-26T10:31:02Z");
    assert_int_equal(jget(n, "link.last_success_at")->type, JN_NULL);
    assert_int_equal(ju64(n, "link.consecutive_failures", 0), 14);
    assert_int_equal(ju64(n, "link.in_flight_batches", 0), 1);
    assert_int_equal(jget(n, "spool_full")->type, JN_FALSE);
    assert_int_equal(jget(n, "disk_full")->type, JN_TRUE);
    assert_int_equal(ju64(n, "counters.produced", 0), 5);
    assert_int_equal(ju64(n, "counters.spooled", 0), 4);
    assert_int_equal(ju64(n, "counters.delivered", 0), 3);
    assert_int_equal(ju64(n, "counters.rejected", 0), 2);
    assert_int_equal(ju64(n, "counters.refused", 0), 1);
    jfree(n);

    /* up, nothing failed yet: last_error is null */
    stub_rt.link = (struct agent_link){.state = AGENT_LINK_UP, .last_success_wall_ms = 1000};
    fd = connect_to(sock);
    loop.cb(loop.ctx, loop.fd, POLLIN);
    read_all(fd, buf, sizeof(buf), &len);
    close(fd);
    n = jparse(buf, len);
    assert_non_null(n);
    assert_string_equal(jstr(n, "link.state"), "up");
    assert_int_equal(jget(n, "link.last_error")->type, JN_NULL);
    assert_int_equal(jget(n, "link.last_error_at")->type, JN_NULL);
    assert_string_equal(jstr(n, "link.last_success_at"), "1970-01-01T00:00:01Z");
    jfree(n);

    /* a woken loop with nobody waiting does not block */
    loop.cb(loop.ctx, loop.fd, POLLIN);

    agent_control_stop(c);
    assert_true(loop.unwatched);
    assert_int_equal(lstat(sock, &sb), -1);
    assert_int_equal(errno, ENOENT);
}

static void *serve_once(void *arg)
{
    struct pollfd p = {.fd = loop.fd, .events = POLLIN};
    (void)arg;
    if (poll(&p, 1, 10000) == 1)
        loop.cb(loop.ctx, loop.fd, POLLIN);
    return NULL;
}

/* status's side: ask_agent() against a live control socket, a stale one, and none. */
static void test_ask_agent(void **state)
{
    struct fx *f = *state;
    struct agent_control *c = NULL;
    struct agent_answer a;
    pthread_t th;
    char sock[192];
    int fd;
    struct sockaddr_un addr = {.sun_family = AF_UNIX};

    set_runtime();
    fx_path(f, sock, sizeof(sock), "agent.sock");
    ask_agent(sock, &a);
    assert_null(a.obj);
    assert_string_equal(a.state, "not running");
    assert_non_null(strstr(a.why, "no answer on "));

    assert_int_equal(agent_control_start(NULL, sock, &c), 0);
    assert_int_equal(pthread_create(&th, NULL, serve_once, NULL), 0);
    ask_agent(sock, &a);
    pthread_join(th, NULL);
    assert_non_null(a.obj);
    assert_int_equal(ju64(a.obj, "link.consecutive_failures", 0), 14);
    jfree(a.obj);
    agent_control_stop(c);

    /* a socket file left by a killed agent: refused, so "not running" */
    fd = socket(AF_UNIX, SOCK_STREAM, 0);
    snprintf(addr.sun_path, sizeof(addr.sun_path), "%s", sock);
    assert_int_equal(bind(fd, (struct sockaddr *)&addr, sizeof(addr)), 0);
    close(fd);
    ask_agent(sock, &a);
    assert_null(a.obj);
    assert_string_equal(a.state, "not running");

    /* ... and the next agent replaces it */
    assert_int_equal(agent_control_start(NULL, sock, &c), 0);
    fd = connect_to(sock);
    assert_true(fd >= 0);
    close(fd);
    agent_control_stop(c);

    ask_agent("", &a);
    assert_null(a.obj);
    assert_non_null(strstr(a.why, "off"));
}

static void test_control_refuses_to_clobber(void **state)
{
    struct fx *f = *state;
    struct agent_control *c = NULL, *c2 = NULL;
    char path[192], buf[64];
    struct stat sb;
    size_t len;
    int fd;

    /* a regular file at status.socket (a typo in the config) is left alone */
    fx_path(f, path, sizeof(path), "file.txt");
    fd = open(path, O_WRONLY | O_CREAT, 0644);
    assert_true(fd >= 0);
    assert_int_equal(write(fd, "precious", 8), 8);
    close(fd);
    assert_int_equal(agent_control_start(NULL, path, &c), CIS_EIO);
    assert_null(c);
    assert_int_equal(stat(path, &sb), 0);
    assert_true(S_ISREG(sb.st_mode));
    fd = open(path, O_RDONLY);
    read_all(fd, buf, sizeof(buf), &len);
    close(fd);
    assert_string_equal(buf, "precious");

    /* a socket another agent answers on is not taken over */
    set_runtime();
    fx_path(f, path, sizeof(path), "agent.sock");
    assert_int_equal(agent_control_start(NULL, path, &c), 0);
    assert_int_equal(agent_control_start(NULL, path, &c2), CIS_EIO);
    assert_null(c2);
    assert_int_equal(lstat(path, &sb), 0);
    agent_control_stop(c);

    /* a path too long for sun_path, a missing directory */
    memset(buf, 'x', sizeof(buf) - 1);
    buf[sizeof(buf) - 1] = '\0';
    {
        char longp[256];
        snprintf(longp, sizeof(longp), "%s/%s%s", f->dir, buf, buf);
        assert_int_equal(agent_control_start(NULL, longp, &c), CIS_EIO);
        snprintf(longp, sizeof(longp), "%s/nodir/agent.sock", f->dir);
        assert_int_equal(agent_control_start(NULL, longp, &c), CIS_EIO);
    }
    /* "" turns it off */
    assert_int_equal(agent_control_start(NULL, "", &c), 0);
    assert_null(c);
}

/* ---- the command ---- */

static int run_status(const char *out_path, int argc, char **argv)
{
    int saved = dup(STDOUT_FILENO), fd, rc;
    fflush(stdout);
    fd = open(out_path, O_WRONLY | O_CREAT | O_TRUNC, 0600);
    assert_true(fd >= 0);
    dup2(fd, STDOUT_FILENO);
    close(fd);
    rc = agent_status_main(argc, argv);
    fflush(stdout);
    dup2(saved, STDOUT_FILENO);
    close(saved);
    return rc;
}

static void test_status_main(void **state)
{
    struct fx *f = *state;
    char cfgp[192], outp[192], sock[192], yaml[1024], *out;
    size_t len;
    struct jnode *n;
    struct stat sb;
    FILE *y;

    fx_path(f, cfgp, sizeof(cfgp), "agent.yaml");
    fx_path(f, outp, sizeof(outp), "out.txt");
    fx_path(f, sock, sizeof(sock), "agent.sock");
    snprintf(yaml, sizeof(yaml),
             "agent:\n  id: gw-main\nspool:\n  path: %s\n  max_size: 1MiB\nstatus:\n"
             "  socket: %s\ninputs:\n  - name: d\n    type: demo\nforward:\n"
             "  url: https://127.0.0.1:1/v1/batches\n  sign:\n    key_file: device.key\n",
             f->path, sock);
    y = fopen(cfgp, "w");
    assert_non_null(y);
    fputs(yaml, y);
    fclose(y);

    {
        char *argv[] = {"status", "--bogus", NULL};
        assert_int_equal(run_status(outp, 2, argv), 2);
    }
    {
        char *argv[] = {"status", "--interval", "1 fortnight", NULL};
        assert_int_equal(run_status(outp, 3, argv), 2);
    }
    {
        char *argv[] = {"status", "-c", cfgp, "extra", NULL};
        assert_int_equal(run_status(outp, 4, argv), 2);
    }
    {
        char *argv[] = {"status", "--help", NULL};
        assert_int_equal(run_status(outp, 2, argv), 0);
        out = slurp(outp, &len);
        assert_non_null(strstr(out, "Usage: cistern-agent status"));
        free(out);
    }
    {
        char missing[192];
        char *argv[] = {"status", "-c", missing, NULL};
        fx_path(f, missing, sizeof(missing), "nope.yaml");
        assert_int_equal(run_status(outp, 3, argv), 1);
    }
    {
        /* no spool yet: exit 1, and none is created */
        char *argv[] = {"status", "-c", cfgp, "--json", NULL};
        assert_int_equal(run_status(outp, 4, argv), 1);
        assert_int_equal(stat(f->path, &sb), -1);
    }
    make_spool(f->path, cis_wall_ms(), 1);
    {
        char *argv[] = {"status", "-c", cfgp, "--json", NULL};
        assert_int_equal(run_status(outp, 4, argv), 0);
        out = slurp(outp, &len);
        n = jparse(out, len);
        if (!n)
            fail_msg("not JSON: %s", out);
        assert_string_equal(jstr(n, "agent_id"), "gw-main");
        assert_int_equal(ju64(n, "pending.records", 0), 100);
        assert_int_equal(ju64(n, "spool_files.max_size", 0), 1 << 20);
        assert_int_equal(jget(n, "agent.running")->type, JN_FALSE);
        jfree(n);
        free(out);
    }
    {
        char *argv[] = {"status", "-c", cfgp, NULL};
        assert_int_equal(run_status(outp, 3, argv), 0);
        out = slurp(outp, &len);
        assert_non_null(strstr(out, "cistern-agent gw-main\n"));
        assert_non_null(strstr(out, "not running (no answer on "));
        assert_non_null(strstr(out, "pending:     100 records"));
        free(out);
    }
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_json_escape),
        cmocka_unit_test(test_json_parse),
        cmocka_unit_test(test_formatting),
        cmocka_unit_test(test_drain_rate),
        cmocka_unit_test_setup_teardown(test_snap_missing_spool, fx_setup, fx_teardown),
        cmocka_unit_test_setup_teardown(test_snap_reads_spool, fx_setup, fx_teardown),
        cmocka_unit_test_setup_teardown(test_snap_beside_a_writer, fx_setup, fx_teardown),
        cmocka_unit_test_setup_teardown(test_snap_leaves_wal_alone, fx_setup, fx_teardown),
        cmocka_unit_test_setup_teardown(test_report_json, fx_setup, fx_teardown),
        cmocka_unit_test_setup_teardown(test_report_text, fx_setup, fx_teardown),
        cmocka_unit_test_setup_teardown(test_control_answers, fx_setup, fx_teardown),
        cmocka_unit_test_setup_teardown(test_ask_agent, fx_setup, fx_teardown),
        cmocka_unit_test_setup_teardown(test_control_refuses_to_clobber, fx_setup, fx_teardown),
        cmocka_unit_test_setup_teardown(test_status_main, fx_setup, fx_teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
