/* Unit tests for the receiver's store (SQLite), its JSON read side and its config table. */
#include <inttypes.h>
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

#include <cistern/codec.h>
#include <cistern/err.h>

#include "api.h"
#include "recv_config.h"
#include "store/store.h"

#define EPOCH UINT64_C(0x1234567890abcdef)

struct fixture {
    char dir[64];
    char path[128];
    struct recv_store *st;
};

static int setup(void **state)
{
    struct fixture *f = calloc(1, sizeof *f);
    struct recv_store_opts o = {0};
    char err[256];

    assert_non_null(f);
    snprintf(f->dir, sizeof f->dir, "/tmp/test_recv_store.XXXXXX");
    assert_non_null(mkdtemp(f->dir));
    snprintf(f->path, sizeof f->path, "%s/store.db", f->dir);
    o.path = f->path;
    o.busy_timeout_ms = 1000;
    assert_int_equal(recv_store_sqlite.open(&o, &f->st, err, sizeof err), 0);
    *state = f;
    return 0;
}

/* Remove the SQLite database PATH and its WAL files. */
static void rm_db(const char *path)
{
    char p[200];

    unlink(path);
    snprintf(p, sizeof p, "%s-wal", path);
    unlink(p);
    snprintf(p, sizeof p, "%s-shm", path);
    unlink(p);
}

static int teardown(void **state)
{
    struct fixture *f = *state;

    recv_store_sqlite.close(f->st);
    rm_db(f->path);
    assert_int_equal(rmdir(f->dir), 0); /* a test left a file behind otherwise */
    free(f);
    return 0;
}

/* Encode a batch for AGENT of two segments: seqs FIRST..FIRST+N1-1 and the next N2, with one
 * loss entry; decode it into OUT the way the receiver does. */
static void make_batch(const char *agent, uint64_t epoch, uint64_t first, size_t n1, size_t n2,
                       struct cis_decoded_batch *out)
{
    struct cis_record recs[64];
    char payloads[64][32];
    struct cis_segment segs[2];
    uint8_t *data[2] = {NULL, NULL}, *buf = NULL;
    size_t dlen[2], blen = 0;
    Cistern__V1__LossEntry loss = CISTERN__V1__LOSS_ENTRY__INIT;
    const Cistern__V1__LossEntry *losses[1] = {&loss};
    struct cis_batch_meta meta = {.agent_id = agent, .epoch = epoch, .created_ms = 1000,
                                  .spool_depth = 7, .oldest_pending_ms = 5,
                                  .losses = losses, .nlosses = 1};
    struct cis_decode_limits lim = {.max_decompressed = 1 << 20, .max_records = 1000};
    char why[128];

    assert_true(n1 + n2 <= 64);
    for (size_t i = 0; i < n1 + n2; i++) {
        snprintf(payloads[i], sizeof payloads[i], "{\"v\":%zu}", i);
        recs[i] = (struct cis_record){.seq = first + i, .ts_ms = 1700000000000 + (int64_t)i,
                                      .stream = "sensors/t", .content_type = "application/json",
                                      .payload = (const uint8_t *)payloads[i],
                                      .payload_len = strlen(payloads[i])};
    }
    /* one binary payload, which the API must return as base64 */
    recs[0].payload = (const uint8_t *)"\xff\x00\x01";
    recs[0].payload_len = 3;
    loss.reason = "evicted_full";
    loss.epoch = epoch;
    loss.first_seq = 1;
    loss.last_seq = 3;
    loss.count = 3;
    loss.ts_ms = 99;
    loss.detail = "spool full";
    loss.id = 1;

    assert_int_equal(cis_segment_encode(recs, n1, 1, 3, &segs[0], &data[0], &dlen[0]), 0);
    segs[0].data = data[0];
    segs[0].data_len = dlen[0];
    assert_int_equal(cis_segment_encode(recs + n1, n2, 0, 3, &segs[1], &data[1], &dlen[1]), 0);
    segs[1].data = data[1];
    segs[1].data_len = dlen[1];
    assert_int_equal(cis_batch_encode(&meta, segs, 2, &buf, &blen), 0);
    memset(out, 0, sizeof *out);
    assert_int_equal(cis_batch_decode(buf, blen, &lim, out, why, sizeof why), 0);
    assert_int_equal(recv_batch_check(out, why, sizeof why), 0);
    free(data[0]);
    free(data[1]);
    free(buf);
}

static void test_put_twice_dedups(void **state)
{
    struct fixture *f = *state;
    struct cis_decoded_batch b;
    struct recv_put_result r = {0};
    struct recv_buf out = {0};

    make_batch("gw-1", EPOCH, 10, 3, 2, &b);
    assert_int_equal(recv_store_sqlite.put_batch(f->st, &b, 5000, &r), 0);
    assert_int_equal(r.accepted, 5);
    assert_int_equal(r.duplicates, 0);
    assert_int_equal(r.replay, 0);
    recv_api_ingest_answer(&b, &r, &out);
    assert_string_equal(out.p, "{\"accepted\":5,\"duplicates\":0,\"acked\":[[\"1311768467294899695\","
                               "10,12],[\"1311768467294899695\",13,14]]}");
    recv_buf_free(&out);

    memset(&r, 0, sizeof r);
    assert_int_equal(recv_store_sqlite.put_batch(f->st, &b, 6000, &r), 0);
    assert_int_equal(r.accepted, 0);
    assert_int_equal(r.duplicates, 5);
    assert_int_equal(r.replay, 1);
    cis_batch_free(&b);

    /* overlapping batch: 2 old, 3 new */
    make_batch("gw-1", EPOCH, 13, 2, 3, &b);
    assert_int_equal(recv_store_sqlite.put_batch(f->st, &b, 7000, &r), 0);
    assert_int_equal(r.accepted, 3);
    assert_int_equal(r.duplicates, 2);
    assert_int_equal(r.replay, 0); /* some records were new */
    cis_batch_free(&b);
}

static void test_agents_and_losses(void **state)
{
    struct fixture *f = *state;
    struct cis_decoded_batch b;
    struct recv_put_result r;
    struct recv_buf out = {0};
    sqlite3 *db;
    sqlite3_stmt *st;

    make_batch("gw-2", EPOCH, 1, 2, 2, &b);
    assert_int_equal(recv_store_sqlite.put_batch(f->st, &b, 5000, &r), 0);
    assert_int_equal(recv_store_sqlite.put_batch(f->st, &b, 9000, &r), 0);
    cis_batch_free(&b);
    make_batch("gw-1", EPOCH, 1, 1, 1, &b);
    assert_int_equal(recv_store_sqlite.put_batch(f->st, &b, 6000, &r), 0);
    cis_batch_free(&b);

    assert_int_equal(recv_api_agents(&recv_store_sqlite, f->st, &out), 0);
    assert_string_equal(out.p,
                        "{\"agents\":[{\"id\":\"gw-1\",\"first_seen_ms\":6000,\"last_seen_ms\":6000,"
                        "\"spool_depth\":7,\"oldest_pending_ms\":5,\"records\":2,"
                        "\"replayed_batches\":0},"
                        "{\"id\":\"gw-2\",\"first_seen_ms\":5000,\"last_seen_ms\":9000,"
                        "\"spool_depth\":7,\"oldest_pending_ms\":5,\"records\":4,"
                        "\"replayed_batches\":1}]}");
    recv_buf_free(&out);

    /* the loss entry is stored once per agent, although it came twice */
    assert_int_equal(sqlite3_open_v2(f->path, &db, SQLITE_OPEN_READONLY, NULL), SQLITE_OK);
    assert_int_equal(sqlite3_prepare_v2(db,
                                        "SELECT agent_id, epoch, id, reason, first_seq, last_seq,"
                                        " count, detail FROM losses ORDER BY agent_id",
                                        -1, &st, NULL),
                     SQLITE_OK);
    assert_int_equal(sqlite3_step(st), SQLITE_ROW);
    assert_string_equal((const char *)sqlite3_column_text(st, 0), "gw-1");
    assert_int_equal(sqlite3_step(st), SQLITE_ROW);
    assert_string_equal((const char *)sqlite3_column_text(st, 0), "gw-2");
    assert_true((uint64_t)sqlite3_column_int64(st, 1) == EPOCH);
    assert_int_equal(sqlite3_column_int64(st, 2), 1);
    assert_string_equal((const char *)sqlite3_column_text(st, 3), "evicted_full");
    assert_int_equal(sqlite3_column_int64(st, 6), 3);
    assert_string_equal((const char *)sqlite3_column_text(st, 7), "spool full");
    assert_int_equal(sqlite3_step(st), SQLITE_DONE);
    sqlite3_finalize(st);
    sqlite3_close(db);
}

static void test_records_paging(void **state)
{
    struct fixture *f = *state;
    struct cis_decoded_batch b;
    struct recv_put_result r;
    struct recv_buf out = {0};
    struct recv_records_query q = {.agent_id = "gw-1"};
    char why[128];

    make_batch("gw-1", EPOCH, 1, 3, 2, &b);
    assert_int_equal(recv_store_sqlite.put_batch(f->st, &b, 5000, &r), 0);
    cis_batch_free(&b);
    make_batch("gw-1", 5, 1, 1, 1, &b); /* a second, smaller epoch sorts first */
    assert_int_equal(recv_store_sqlite.put_batch(f->st, &b, 6000, &r), 0);
    cis_batch_free(&b);

    assert_int_equal(recv_api_parse_records_query("0", "2", NULL, &q, why, sizeof why), 0);
    assert_int_equal(recv_api_records(&recv_store_sqlite, f->st, &q, &out), 0);
    assert_string_equal(out.p, "{\"records\":[{\"epoch\":\"5\",\"seq\":1,\"ts\":1700000000000,"
                               "\"received_ms\":6000,"
                               "\"stream\":\"sensors/t\",\"content_type\":\"application/json\","
                               "\"payload\":\"/wAB\",\"payload_base64\":true},"
                               "{\"epoch\":\"5\",\"seq\":2,\"ts\":1700000000001,"
                               "\"received_ms\":6000,"
                               "\"stream\":\"sensors/t\",\"content_type\":\"application/json\","
                               "\"payload\":\"{\\\"v\\\":1}\"}],\"next_after\":2}");
    recv_buf_free(&out);

    assert_int_equal(recv_api_parse_records_query("2", "10", "1311768467294899695", &q, why,
                                                  sizeof why), 0);
    assert_int_equal(recv_api_records(&recv_store_sqlite, f->st, &q, &out), 0);
    assert_non_null(strstr(out.p, "\"seq\":3,\"ts\":1700000000002,\"received_ms\":5000,"));
    assert_non_null(strstr(out.p, "\"seq\":5,"));
    assert_null(strstr(out.p, "\"seq\":2,"));
    assert_non_null(strstr(out.p, "\"next_after\":5}"));
    recv_buf_free(&out);

    /* past the end: empty list, next_after stays */
    assert_int_equal(recv_api_parse_records_query("99", NULL, NULL, &q, why, sizeof why), 0);
    assert_int_equal(q.limit, 100);
    assert_int_equal(recv_api_records(&recv_store_sqlite, f->st, &q, &out), 0);
    assert_string_equal(out.p, "{\"records\":[],\"next_after\":99}");
    recv_buf_free(&out);

    q.agent_id = "nobody";
    assert_int_equal(recv_api_records(&recv_store_sqlite, f->st, &q, &out), CIS_ENOTFOUND);
    recv_buf_free(&out);

    assert_int_equal(recv_api_parse_records_query("x", NULL, NULL, &q, why, sizeof why),
                     CIS_EINVAL);
    assert_int_equal(recv_api_parse_records_query(NULL, "0", NULL, &q, why, sizeof why),
                     CIS_EINVAL);
    assert_int_equal(recv_api_parse_records_query(NULL, "10001", NULL, &q, why, sizeof why),
                     CIS_EINVAL);
    assert_int_equal(recv_api_parse_records_query(NULL, NULL, "-1", &q, why, sizeof why),
                     CIS_EINVAL);
    assert_int_equal(recv_api_parse_records_query(NULL, NULL, "9223372036854775808", &q, why,
                                                  sizeof why), CIS_EINVAL);
    assert_int_equal(recv_store_sqlite.health(f->st), 0);
}

static void test_epoch_top_bit_rejected(void **state)
{
    struct cis_decoded_batch b;
    char why[128];

    (void)state;
    make_batch("gw-1", EPOCH, 1, 1, 1, &b);
    b.pb->header->epoch = UINT64_C(0x8000000000000001);
    assert_int_equal(recv_batch_check(&b, why, sizeof why), CIS_EDECODE);
    b.pb->header->epoch = EPOCH;
    b.pb->header->losses[0]->epoch = UINT64_MAX;
    assert_int_equal(recv_batch_check(&b, why, sizeof why), CIS_EDECODE);
    cis_batch_free(&b);
}

static void test_json_helpers(void **state)
{
    struct recv_buf b = {0};

    (void)state;
    recv_buf_json_str(&b, "a\"b\\c\n\x01\xc3\xa9\xff", 10);
    assert_string_equal(b.p, "\"a\\\"b\\\\c\\n\\u0001\xc3\xa9\\ufffd\"");
    recv_buf_free(&b);
    recv_buf_base64(&b, (const uint8_t *)"foobar", 6);
    recv_buf_add(&b, " ", 1);
    recv_buf_base64(&b, (const uint8_t *)"fooba", 5);
    recv_buf_add(&b, " ", 1);
    recv_buf_base64(&b, (const uint8_t *)"foob", 4);
    recv_buf_add(&b, " ", 1);
    recv_buf_base64(&b, (const uint8_t *)"", 0);
    assert_string_equal(b.p, "Zm9vYmFy Zm9vYmE= Zm9vYg== ");
    recv_buf_free(&b);
    assert_true(recv_utf8_valid((const uint8_t *)"h\xc3\xa9llo \xf0\x9f\x98\x80", 11));
    assert_false(recv_utf8_valid((const uint8_t *)"\xc0\xaf", 2));         /* overlong */
    assert_false(recv_utf8_valid((const uint8_t *)"\xed\xa0\x80", 3));     /* surrogate */
    assert_false(recv_utf8_valid((const uint8_t *)"\xf4\x90\x80\x80", 4)); /* > U+10FFFF */
    assert_false(recv_utf8_valid((const uint8_t *)"\xe2\x82", 2));         /* truncated */
    recv_json_error(&b, "certificate CN 'a' may not send for agent 'b'");
    assert_string_equal(b.p, "{\"error\":\"certificate CN 'a' may not send for agent 'b'\"}");
    recv_buf_free(&b);
}

static void write_file(const char *path, const char *text)
{
    FILE *f = fopen(path, "w");
    assert_non_null(f);
    fputs(text, f);
    fclose(f);
}

static void test_config(void **state)
{
    struct fixture *f = *state;
    struct recv_config cfg;
    char path[160], err[512], host[64], why[64], shipped[4096];
    unsigned port;
    /* the shipped example passes as it is */
    snprintf(shipped, sizeof shipped, "%s/configs/receiver.yaml", CISTERN_SOURCE_DIR);
    assert_int_equal(recv_config_load(shipped, &cfg, err, sizeof err), 0);
    assert_string_equal(cfg.listen_http, "0.0.0.0:8443");
    assert_true(cfg.max_body == 8u << 20);
    assert_int_equal(cfg.connection_timeout_ms, 30000);
    recv_config_free(&cfg);

    snprintf(path, sizeof path, "%s/r.yaml", f->dir);
    write_file(path, "listen:\n  http: 127.0.0.1:0\n");
    assert_int_not_equal(recv_config_load(path, &cfg, err, sizeof err), 0);
    assert_non_null(strstr(err, "listen.tls.cert_file"));

    write_file(path, "listen:\n  http: 127.0.0.1:0\n  insecure_plain_http: true\n");
    assert_int_equal(recv_config_load(path, &cfg, err, sizeof err), 0);
    recv_config_free(&cfg);

    write_file(path, "listen:\n  http: 127.0.0.1:0\n  insecure_plain_http: true\n"
                     "store:\n  type: postgres\n");
    assert_int_not_equal(recv_config_load(path, &cfg, err, sizeof err), 0);
    assert_non_null(strstr(err, "store.type"));
    unlink(path);

    assert_int_equal(cis_parse_hostport("[::1]:8443", host, sizeof host, &port, why, sizeof why),
                     0);
    assert_string_equal(host, "::1");
    assert_int_equal(port, 8443);
    assert_int_not_equal(cis_parse_hostport("::1:80", host, sizeof host, &port, why, sizeof why),
                         0);
    assert_int_not_equal(cis_parse_hostport("h:99999", host, sizeof host, &port, why, sizeof why),
                         0);
    assert_int_not_equal(cis_parse_hostport("h", host, sizeof host, &port, why, sizeof why), 0);
}

/* ---- loss ledger key, schema upgrade, gaps ---- */

struct tloss {
    uint64_t id;
    const char *reason;
    uint64_t epoch, first, last;
};

/* Store one batch from the spool of EPOCH: one segment per seq range in RANGES (NRANGES
 * pairs first,last, ascending) and the ledger entries LOSSES, received at NOW_MS. */
static void put(struct fixture *f, const char *agent, uint64_t epoch, const uint64_t *ranges,
                size_t nranges, const struct tloss *losses, size_t nlosses, int64_t now_ms)
{
    Cistern__V1__LossEntry le[8];
    const Cistern__V1__LossEntry *lp[8];
    struct cis_segment segs[8];
    uint8_t *data[8] = {NULL}, *buf = NULL;
    size_t blen = 0;
    struct cis_batch_meta meta = {
        .agent_id = agent, .epoch = epoch, .created_ms = 1000, .losses = lp, .nlosses = nlosses};
    struct cis_decode_limits lim = {.max_decompressed = 1 << 20, .max_records = 1000};
    struct cis_decoded_batch b;
    struct recv_put_result r;
    char why[128];

    assert_true(nranges <= 8 && nlosses <= 8);
    for (size_t i = 0; i < nlosses; i++) {
        le[i] = (Cistern__V1__LossEntry)CISTERN__V1__LOSS_ENTRY__INIT;
        le[i].id = losses[i].id;
        le[i].reason = (char *)losses[i].reason;
        le[i].epoch = losses[i].epoch;
        le[i].first_seq = losses[i].first;
        le[i].last_seq = losses[i].last;
        le[i].count = losses[i].last - losses[i].first + 1;
        le[i].ts_ms = 42;
        lp[i] = &le[i];
    }
    for (size_t i = 0; i < nranges; i++) {
        uint64_t first = ranges[2 * i], n = ranges[2 * i + 1] - first + 1;
        struct cis_record *recs = calloc(n, sizeof *recs);
        size_t dlen;
        assert_non_null(recs);
        for (uint64_t k = 0; k < n; k++)
            recs[k] = (struct cis_record){.seq = first + k,
                                          .ts_ms = 7,
                                          .stream = "s",
                                          .payload = (const uint8_t *)"x",
                                          .payload_len = 1};
        assert_int_equal(cis_segment_encode(recs, n, 1, 3, &segs[i], &data[i], &dlen), 0);
        segs[i].data = data[i];
        segs[i].data_len = dlen;
        free(recs);
    }
    assert_int_equal(cis_batch_encode(&meta, segs, nranges, &buf, &blen), 0);
    assert_int_equal(cis_batch_decode(buf, blen, &lim, &b, why, sizeof why), 0);
    assert_int_equal(recv_batch_check(&b, why, sizeof why), 0);
    assert_int_equal(recv_store_sqlite.put_batch(f->st, &b, now_ms, &r), 0);
    cis_batch_free(&b);
    free(buf);
    for (size_t i = 0; i < nranges; i++)
        free(data[i]);
}

/* get_gaps as one line per epoch: "E recv=N hi=M 11-15:evicted_full 16-20:- ...[ truncated]". */
static int gaps_text(void *ud, const struct recv_epoch_gaps *e)
{
    struct recv_buf *b = ud;

    recv_buf_addf(b, "%s%" PRIu64 " recv=%" PRIu64 " hi=%" PRIu64, b->len ? "; " : "", e->epoch,
                  e->received, e->highest_seq);
    for (size_t i = 0; i < e->ngaps; i++)
        recv_buf_addf(b, " %" PRIu64 "-%" PRIu64 ":%s", e->gaps[i].first_seq, e->gaps[i].last_seq,
                      e->gaps[i].reason ? e->gaps[i].reason : "-");
    if (e->truncated)
        recv_buf_add(b, " truncated", 10);
    return 0;
}

/* The gaps of AGENT (EPOCH 0: all epochs, MAX 0: default cap) as gaps_text writes them.
 * Caller frees. */
static char *gaps_of(struct fixture *f, const char *agent, uint64_t epoch, unsigned max)
{
    struct recv_gaps_query q = {
        .agent_id = agent, .has_epoch = epoch != 0, .epoch = epoch, .max_gaps = max};
    struct recv_buf b = {0};
    size_t len;

    assert_int_equal(recv_store_sqlite.get_gaps(f->st, &q, gaps_text, &b), 0);
    return recv_buf_take(&b, &len);
}

#define assert_gaps(f, agent, epoch, max, want)                                                    \
    do {                                                                                           \
        char *got_ = gaps_of(f, agent, epoch, max);                                                \
        assert_string_equal(got_, want);                                                           \
        free(got_);                                                                                \
    } while (0)

/* One int64 from SQL against the store file (read through a separate connection). */
static int64_t sql_int(const char *path, const char *sql)
{
    sqlite3 *db;
    sqlite3_stmt *st;
    int64_t v;

    assert_int_equal(sqlite3_open_v2(path, &db, SQLITE_OPEN_READONLY, NULL), SQLITE_OK);
    assert_int_equal(sqlite3_prepare_v2(db, sql, -1, &st, NULL), SQLITE_OK);
    assert_int_equal(sqlite3_step(st), SQLITE_ROW);
    v = sqlite3_column_int64(st, 0);
    sqlite3_finalize(st);
    sqlite3_close(db);
    return v;
}

static void test_gaps_classified(void **state)
{
    struct fixture *f = *state;
    const uint64_t e5[] = {1, 10, 21, 30, 41, 50};
    const struct tloss a[] = {{1, "evicted_full", 5, 11, 15}, {2, "expired_ttl", 5, 51, 60}};
    const uint64_t e7[] = {3, 6};
    /* Spool 7 replaced spool 5: its ids start at 1 again and describe epoch 5. The tampered
     * range overlaps spool 5's own evicted_full entry, which is first by (origin, id). */
    const struct tloss b[] = {{1, "corrupt_spool", 5, 31, 45}, {2, "tampered", 5, 13, 18}};
    const uint64_t full[] = {1, 20};
    struct recv_gaps_query q = {.agent_id = "nobody"};
    struct recv_buf out = {0};
    char why[128];

    /* received 1..10, 21..30, 41..50 of epoch 5, in three batches; ledger in the first */
    put(f, "gw-g", 5, e5, 1, a, 2, 1000);
    put(f, "gw-g", 5, e5 + 2, 1, NULL, 0, 2000);
    put(f, "gw-g", 5, e5 + 4, 1, NULL, 0, 3000);
    assert_gaps(f, "gw-g", 0, 0,
                "5 recv=30 hi=60 11-15:evicted_full 16-20:- 31-40:- 51-60:expired_ttl");

    put(f, "gw-g", 7, e7, 1, b, 2, 4000);
    assert_gaps(f, "gw-g", 0, 0,
                "5 recv=30 hi=60 11-15:evicted_full 16-18:tampered 19-20:- 31-40:corrupt_spool"
                " 51-60:expired_ttl; 7 recv=4 hi=6 1-2:-");
    /* the epoch filter; an epoch the agent never used has nothing to report */
    assert_gaps(f, "gw-g", 7, 0, "7 recv=4 hi=6 1-2:-");
    assert_gaps(f, "gw-g", 99, 0, "");
    /* the cap: the first gaps, and the flag; exactly at the cap is not truncated */
    assert_gaps(f, "gw-g", 5, 2, "5 recv=30 hi=60 11-15:evicted_full 16-18:tampered truncated");
    assert_gaps(f, "gw-g", 7, 1, "7 recv=4 hi=6 1-2:-");

    /* nothing missing: an empty list */
    put(f, "gw-full", 3, full, 1, NULL, 0, 1000);
    assert_gaps(f, "gw-full", 0, 0, "3 recv=20 hi=20");
    assert_int_equal(recv_api_parse_gaps_query(NULL, &q, why, sizeof why), 0);
    q.agent_id = "gw-full";
    assert_int_equal(recv_api_gaps(&recv_store_sqlite, f->st, &q, &out), 0);
    assert_string_equal(out.p, "{\"agent_id\":\"gw-full\",\"epochs\":[{\"epoch\":\"3\","
                               "\"received\":20,\"highest_seq\":20,\"gaps\":[],"
                               "\"truncated\":false}]}");
    recv_buf_free(&out);

    /* the JSON answer, with an epoch filter and an epoch beyond 2^53 */
    assert_int_equal(recv_api_parse_gaps_query("7", &q, why, sizeof why), 0);
    q.agent_id = "gw-g";
    assert_int_equal(recv_api_gaps(&recv_store_sqlite, f->st, &q, &out), 0);
    assert_string_equal(out.p, "{\"agent_id\":\"gw-g\",\"epochs\":[{\"epoch\":\"7\","
                               "\"received\":4,\"highest_seq\":6,\"gaps\":[{\"first_seq\":1,"
                               "\"last_seq\":2,\"count\":2,\"status\":\"not yet received\","
                               "\"reason\":null}],\"truncated\":false}]}");
    recv_buf_free(&out);
    assert_int_equal(recv_api_parse_gaps_query("5", &q, why, sizeof why), 0);
    assert_int_equal(recv_api_gaps(&recv_store_sqlite, f->st, &q, &out), 0);
    assert_non_null(strstr(out.p, "{\"first_seq\":11,\"last_seq\":15,\"count\":5,"
                                  "\"status\":\"dropped at the edge: evicted_full\","
                                  "\"reason\":\"evicted_full\"}"));
    assert_non_null(strstr(out.p, "{\"first_seq\":31,\"last_seq\":40,\"count\":10,"
                                  "\"status\":\"dropped at the edge: corrupt_spool\","
                                  "\"reason\":\"corrupt_spool\"}"));
    recv_buf_free(&out);

    /* bad epochs; unknown agent */
    assert_int_equal(recv_api_parse_gaps_query("0", &q, why, sizeof why), CIS_EINVAL);
    assert_int_equal(recv_api_parse_gaps_query("x5", &q, why, sizeof why), CIS_EINVAL);
    assert_int_equal(recv_api_parse_gaps_query("9223372036854775808", &q, why, sizeof why),
                     CIS_EINVAL);
    assert_int_equal(recv_api_parse_gaps_query("9223372036854775807", &q, why, sizeof why), 0);
    assert_true(q.has_epoch && q.epoch == (uint64_t)INT64_MAX);
    q.agent_id = "nobody";
    assert_int_equal(recv_api_gaps(&recv_store_sqlite, f->st, &q, &out), CIS_ENOTFOUND);
    recv_buf_free(&out);
}

static void test_gaps_edges(void **state)
{
    struct fixture *f = *state;
    const uint64_t m[] = {1, 2, 10, 10};
    /* adjacent entries with one reason read as one range; a ledger-only epoch (4) shows */
    const struct tloss ml[] = {
        {1, "evicted_full", 2, 3, 5}, {2, "evicted_full", 2, 6, 7}, {3, "rejected", 4, 1, 8}};
    const uint64_t odd[] = {1, 1, 3, 3, 5, 5, 7, 7}, nine[] = {9, 9};
    const uint64_t big[] = {1, 1, UINT64_C(1) << 40, UINT64_C(1) << 40};
    const uint64_t late[] = {11, 12};
    const struct tloss cover[] = {{4, "expired_ttl", 2, 1, 20}};

    put(f, "gw-m", 2, m, 2, ml, 3, 1000);
    assert_gaps(f, "gw-m", 0, 0,
                "2 recv=3 hi=10 3-7:evicted_full 8-9:-; 4 recv=0 hi=8 1-8:rejected");
    /* a later, wider entry (id 4) only fills what no earlier one covers */
    put(f, "gw-m", 2, late, 1, cover, 1, 2000);
    assert_gaps(f, "gw-m", 2, 0,
                "2 recv=5 hi=20 3-7:evicted_full 8-9:expired_ttl 13-20:expired_ttl");

    /* one gap per even seq: the cap counts gaps, not seqs */
    put(f, "gw-t", 1, odd, 4, NULL, 0, 1000);
    assert_gaps(f, "gw-t", 0, 3, "1 recv=4 hi=7 2-2:- 4-4:- 6-6:-");
    put(f, "gw-t", 1, nine, 1, NULL, 0, 2000);
    assert_gaps(f, "gw-t", 0, 3, "1 recv=5 hi=9 2-2:- 4-4:- 6-6:- truncated");
    assert_gaps(f, "gw-t", 0, 0, "1 recv=5 hi=9 2-2:- 4-4:- 6-6:- 8-8:-");

    /* a hole of 2^40 - 2 seqs is one range (and costs no more than a small one) */
    put(f, "gw-big", 1, big, 2, NULL, 0, 1000);
    assert_gaps(f, "gw-big", 0, 0, "1 recv=2 hi=1099511627776 2-1099511627775:-");
}

static void test_losses_keyed_by_origin(void **state)
{
    struct fixture *f = *state;
    const uint64_t r1[] = {1, 3}, r2[] = {1, 2};
    /* the old spool (epoch 11) and the new one (22) both have ledger id 1, about epoch 11 */
    const struct tloss old_spool[] = {{1, "evicted_full", 11, 4, 6}};
    const struct tloss new_spool[] = {{1, "corrupt_spool", 11, 7, 9}};
    struct recv_buf out = {0};

    /* the new spool's batch arrives first: the answer is in received order, not key order */
    put(f, "gw-l", 22, r2, 1, new_spool, 1, 5000);
    put(f, "gw-l", 11, r1, 1, old_spool, 1, 6000);
    put(f, "gw-l", 22, r2, 1, new_spool, 1, 7000); /* a repeated batch */
    assert_int_equal(sql_int(f->path, "SELECT count(*) FROM losses"), 2);
    assert_int_equal(sql_int(f->path, "SELECT count(*) FROM losses WHERE origin_epoch = 22"
                                      " AND id = 1 AND epoch = 11 AND reason = 'corrupt_spool'"
                                      " AND received_ms = 5000"),
                     1);
    assert_int_equal(sql_int(f->path, "SELECT count(*) FROM losses WHERE origin_epoch = 11"
                                      " AND id = 1 AND epoch = 11 AND reason = 'evicted_full'"),
                     1);

    assert_int_equal(recv_api_losses(&recv_store_sqlite, f->st, "gw-l", &out), 0);
    assert_string_equal(out.p, "{\"agent_id\":\"gw-l\",\"losses\":["
                               "{\"origin_epoch\":\"22\",\"id\":1,\"reason\":\"corrupt_spool\","
                               "\"epoch\":\"11\",\"first_seq\":7,\"last_seq\":9,\"count\":3,"
                               "\"ts_ms\":42,\"detail\":null,\"received_ms\":5000},"
                               "{\"origin_epoch\":\"11\",\"id\":1,\"reason\":\"evicted_full\","
                               "\"epoch\":\"11\",\"first_seq\":4,\"last_seq\":6,\"count\":3,"
                               "\"ts_ms\":42,\"detail\":null,\"received_ms\":6000}]}");
    recv_buf_free(&out);
    /* both entries classify epoch 11's gap */
    assert_gaps(f, "gw-l", 11, 0, "11 recv=3 hi=9 4-6:evicted_full 7-9:corrupt_spool");

    assert_int_equal(recv_api_losses(&recv_store_sqlite, f->st, "nobody", &out), CIS_ENOTFOUND);
    recv_buf_free(&out);
}

/* The receiver store's schema version 1, as released. */
static const char schema_v1_sql[] =
    "CREATE TABLE records(agent_id TEXT NOT NULL, epoch INTEGER NOT NULL,"
    " seq INTEGER NOT NULL, ts_ms INTEGER NOT NULL, stream TEXT NOT NULL, content_type TEXT,"
    " payload BLOB NOT NULL, received_ms INTEGER NOT NULL, PRIMARY KEY(agent_id, epoch, seq))"
    " WITHOUT ROWID;"
    "CREATE TABLE agents(id TEXT PRIMARY KEY, first_seen_ms INTEGER NOT NULL,"
    " last_seen_ms INTEGER NOT NULL, spool_depth INTEGER NOT NULL DEFAULT 0,"
    " oldest_pending_ms INTEGER NOT NULL DEFAULT 0, records INTEGER NOT NULL DEFAULT 0);"
    "CREATE TABLE losses(agent_id TEXT NOT NULL, epoch INTEGER NOT NULL,"
    " id INTEGER NOT NULL, reason TEXT NOT NULL, first_seq INTEGER NOT NULL,"
    " last_seq INTEGER NOT NULL, count INTEGER NOT NULL, ts_ms INTEGER NOT NULL, detail TEXT,"
    " received_ms INTEGER NOT NULL, PRIMARY KEY(agent_id, epoch, id));"
    "CREATE TABLE meta(key TEXT PRIMARY KEY, value INTEGER NOT NULL);"
    "INSERT INTO meta(key, value) VALUES('schema_version', 1);"
    "INSERT INTO agents VALUES('gw-u', 900, 2000, 0, 0, 3);"
    "INSERT INTO records VALUES('gw-u', 5, 1, 7, 's', NULL, x'01', 900),"
    " ('gw-u', 5, 2, 7, 's', NULL, x'02', 900), ('gw-u', 5, 3, 7, 's', NULL, x'03', 900);"
    /* id 2 arrived before id 1 */
    "INSERT INTO losses VALUES('gw-u', 5, 1, 'evicted_full', 4, 6, 3, 99, 'spool full', 2000),"
    " ('gw-u', 5, 2, 'expired_ttl', 7, 8, 2, 98, NULL, 1500);";

/* A version 1 store at PATH, plus EXTRA SQL run after it. */
static void make_v1(const char *path, const char *extra)
{
    sqlite3 *db;

    assert_int_equal(sqlite3_open(path, &db), SQLITE_OK);
    assert_int_equal(sqlite3_exec(db, schema_v1_sql, NULL, NULL, NULL), SQLITE_OK);
    if (extra != NULL)
        assert_int_equal(sqlite3_exec(db, extra, NULL, NULL, NULL), SQLITE_OK);
    sqlite3_close(db);
}

static void test_upgrade_v1(void **state)
{
    struct fixture *f = *state;
    struct recv_store_opts o = {.path = f->path, .busy_timeout_ms = 1000};
    struct recv_buf out = {0};
    const uint64_t r[] = {9, 9};
    const struct tloss again[] = {{1, "corrupt_spool", 5, 9, 9}};
    const char *path = f->path;
    char err[256];

    /* The fixture's file is replaced by version 1 ones; teardown closes and removes them. */
    recv_store_sqlite.close(f->st);
    f->st = NULL;
    rm_db(path);

    /* A newer version is refused and the file is left alone. */
    make_v1(path, "UPDATE meta SET value = 4");
    assert_int_equal(recv_store_sqlite.open(&o, &f->st, err, sizeof err), CIS_EDB);
    assert_non_null(strstr(err, "schema version 4"));
    assert_non_null(strstr(err, "newer receiver"));
    assert_int_equal(sql_int(path, "SELECT value FROM meta"), 4);
    rm_db(path);

    /* An upgrade that fails half-way changes nothing: it is one transaction. The broken view
     * lets the copy and the DROP run, then makes the RENAME fail. */
    make_v1(path, "CREATE VIEW broken AS SELECT * FROM nosuch");
    assert_int_equal(recv_store_sqlite.open(&o, &f->st, err, sizeof err), CIS_EDB);
    assert_non_null(strstr(err, "nosuch"));
    assert_int_equal(sql_int(path, "SELECT value FROM meta"), 1);
    assert_int_equal(sql_int(path, "SELECT count(*) FROM sqlite_master WHERE name = 'losses_v2'"),
                     0);
    assert_int_equal(sql_int(path, "SELECT count(*) FROM losses"), 2);
    assert_int_equal(sql_int(path, "SELECT count(*) FROM pragma_table_info('losses')"
                                   " WHERE name = 'origin_epoch'"),
                     0);
    rm_db(path);

    make_v1(path, NULL);
    assert_int_equal(recv_store_sqlite.open(&o, &f->st, err, sizeof err), 0);
    /* 1 -> 2 -> 3 in one go */
    assert_int_equal(sql_int(path, "SELECT value FROM meta WHERE key = 'schema_version'"), 3);
    assert_int_equal(sql_int(path, "SELECT count(*) FROM sqlite_master WHERE name = 'devices'"), 1);
    assert_int_equal(sql_int(path, "SELECT replayed_batches FROM agents WHERE id = 'gw-u'"), 0);
    assert_int_equal(sql_int(path, "SELECT count(*) FROM sqlite_master WHERE name = 'losses_v2'"),
                     0);
    assert_int_equal(sql_int(path, "SELECT count(*) FROM sqlite_master"
                                   " WHERE name = 'losses_by_epoch'"),
                     1);
    /* records kept, byte for byte */
    assert_int_equal(sql_int(path, "SELECT count(*) FROM records WHERE agent_id = 'gw-u'"
                                   " AND epoch = 5 AND hex(payload) = printf('%02d', seq)"),
                     3);
    assert_int_equal(sql_int(path, "SELECT records FROM agents WHERE id = 'gw-u'"), 3);
    /* losses kept, origin_epoch = epoch, received order kept */
    assert_int_equal(recv_api_losses(&recv_store_sqlite, f->st, "gw-u", &out), 0);
    assert_string_equal(out.p, "{\"agent_id\":\"gw-u\",\"losses\":["
                               "{\"origin_epoch\":\"5\",\"id\":2,\"reason\":\"expired_ttl\","
                               "\"epoch\":\"5\",\"first_seq\":7,\"last_seq\":8,\"count\":2,"
                               "\"ts_ms\":98,\"detail\":null,\"received_ms\":1500},"
                               "{\"origin_epoch\":\"5\",\"id\":1,\"reason\":\"evicted_full\","
                               "\"epoch\":\"5\",\"first_seq\":4,\"last_seq\":6,\"count\":3,"
                               "\"ts_ms\":99,\"detail\":\"spool full\",\"received_ms\":2000}]}");
    recv_buf_free(&out);
    assert_gaps(f, "gw-u", 0, 0, "5 recv=3 hi=8 4-6:evicted_full 7-8:expired_ttl");

    /* the new key: a new spool's id 1 about epoch 5 is stored beside the old id 1 */
    put(f, "gw-u", 6, r, 1, again, 1, 3000);
    assert_int_equal(sql_int(path, "SELECT count(*) FROM losses WHERE id = 1"), 2);
    assert_gaps(f, "gw-u", 5, 0,
                "5 recv=3 hi=9 4-6:evicted_full 7-8:expired_ttl 9-9:corrupt_spool");

    /* reopening a version 3 store is a no-op */
    recv_store_sqlite.close(f->st);
    f->st = NULL;
    assert_int_equal(recv_store_sqlite.open(&o, &f->st, err, sizeof err), 0);
    assert_int_equal(sql_int(path, "SELECT count(*) FROM losses"), 3);
    assert_int_equal(sql_int(path, "SELECT value FROM meta WHERE key = 'schema_version'"), 3);
}

/* ---- version 2 -> 3, the device registry, replays, the file's mode ---- */

/* The receiver store's schema version 2, as released. */
static const char schema_v2_sql[] =
    "CREATE TABLE records(agent_id TEXT NOT NULL, epoch INTEGER NOT NULL,"
    " seq INTEGER NOT NULL, ts_ms INTEGER NOT NULL, stream TEXT NOT NULL, content_type TEXT,"
    " payload BLOB NOT NULL, received_ms INTEGER NOT NULL, PRIMARY KEY(agent_id, epoch, seq))"
    " WITHOUT ROWID;"
    "CREATE TABLE agents(id TEXT PRIMARY KEY, first_seen_ms INTEGER NOT NULL,"
    " last_seen_ms INTEGER NOT NULL, spool_depth INTEGER NOT NULL DEFAULT 0,"
    " oldest_pending_ms INTEGER NOT NULL DEFAULT 0, records INTEGER NOT NULL DEFAULT 0);"
    "CREATE TABLE losses(agent_id TEXT NOT NULL, origin_epoch INTEGER NOT NULL,"
    " id INTEGER NOT NULL, reason TEXT NOT NULL, epoch INTEGER NOT NULL,"
    " first_seq INTEGER NOT NULL, last_seq INTEGER NOT NULL, count INTEGER NOT NULL,"
    " ts_ms INTEGER NOT NULL, detail TEXT, received_ms INTEGER NOT NULL,"
    " PRIMARY KEY(agent_id, origin_epoch, id));"
    "CREATE INDEX losses_by_epoch ON losses(agent_id, epoch, first_seq);"
    "CREATE TABLE meta(key TEXT PRIMARY KEY, value INTEGER NOT NULL);"
    "INSERT INTO meta(key, value) VALUES('schema_version', 2);"
    "INSERT INTO agents VALUES('gw-v2', 900, 2000, 4, 3, 2);"
    "INSERT INTO records VALUES('gw-v2', 5, 1, 7, 's', NULL, x'01', 900),"
    " ('gw-v2', 5, 2, 7, 's', 'text/plain', x'02', 900);"
    "INSERT INTO losses VALUES('gw-v2', 5, 1, 'evicted_full', 5, 3, 6, 4, 99, 'full', 2000);";

/* Run SQL against the store file through a separate connection. */
static void sql_exec(const char *path, const char *sql)
{
    sqlite3 *db;

    assert_int_equal(sqlite3_open(path, &db), SQLITE_OK);
    sqlite3_busy_timeout(db, 5000);
    assert_int_equal(sqlite3_exec(db, sql, NULL, NULL, NULL), SQLITE_OK);
    sqlite3_close(db);
}

static void test_upgrade_v2(void **state)
{
    struct fixture *f = *state;
    struct recv_store_opts o = {.path = f->path, .busy_timeout_ms = 1000};
    struct recv_device d = {.id = "gw-v2", .enabled = 1}, g;
    const uint64_t r[] = {1, 2};
    const char *path = f->path;
    char err[256];

    recv_store_sqlite.close(f->st);
    f->st = NULL;
    rm_db(path);

    /* A failure in the last step undoes the earlier ones too: one transaction. Here agents
     * has the new column already, so 2 -> 3's ALTER TABLE fails after 1 -> 2 rebuilt losses. */
    make_v1(path, "ALTER TABLE agents ADD COLUMN replayed_batches INTEGER");
    assert_int_equal(recv_store_sqlite.open(&o, &f->st, err, sizeof err), CIS_EDB);
    assert_non_null(strstr(err, "from version 1 to 3 failed, nothing was changed"));
    assert_int_equal(sql_int(path, "SELECT value FROM meta"), 1);
    assert_int_equal(sql_int(path, "SELECT count(*) FROM pragma_table_info('losses')"
                                   " WHERE name = 'origin_epoch'"),
                     0);
    assert_int_equal(sql_int(path, "SELECT count(*) FROM sqlite_master WHERE name = 'devices'"), 0);
    rm_db(path);

    sql_exec(path, schema_v2_sql);
    assert_int_equal(recv_store_sqlite.open(&o, &f->st, err, sizeof err), 0);
    assert_int_equal(sql_int(path, "SELECT value FROM meta WHERE key = 'schema_version'"), 3);
    assert_int_equal(sql_int(path, "SELECT count(*) FROM sqlite_master WHERE type = 'table'"
                                   " AND name = 'devices'"),
                     1);
    assert_int_equal(sql_int(path, "SELECT count(*) FROM devices"), 0);
    /* rows kept, the new column 0 */
    assert_int_equal(sql_int(path, "SELECT count(*) FROM agents WHERE id = 'gw-v2'"
                                   " AND first_seen_ms = 900 AND last_seen_ms = 2000"
                                   " AND spool_depth = 4 AND oldest_pending_ms = 3"
                                   " AND records = 2 AND replayed_batches = 0"),
                     1);
    assert_int_equal(sql_int(path, "SELECT count(*) FROM records WHERE agent_id = 'gw-v2'"
                                   " AND hex(payload) = printf('%02d', seq)"),
                     2);
    assert_int_equal(sql_int(path, "SELECT count(*) FROM losses WHERE origin_epoch = 5"
                                   " AND reason = 'evicted_full' AND detail = 'full'"),
                     1);
    /* and it works as a version 3 store: a replay of the stored records is counted */
    put(f, "gw-v2", 5, r, 1, NULL, 0, 3000);
    assert_int_equal(sql_int(path, "SELECT replayed_batches FROM agents WHERE id = 'gw-v2'"), 1);
    assert_int_equal(recv_store_sqlite.device_put(f->st, &d, 0, 4000), 0);
    assert_int_equal(recv_store_sqlite.device_get(f->st, "gw-v2", &g), 0);
    assert_int_equal(g.added_ms, 4000);

    /* reopened: nothing to do */
    recv_store_sqlite.close(f->st);
    f->st = NULL;
    assert_int_equal(recv_store_sqlite.open(&o, &f->st, err, sizeof err), 0);
    assert_int_equal(sql_int(path, "SELECT count(*) FROM devices"), 1);
    assert_int_equal(sql_int(path, "SELECT value FROM meta WHERE key = 'schema_version'"), 3);
}

static int collect_ids(void *ud, const struct recv_device *d)
{
    struct recv_buf *b = ud;

    recv_buf_addf(b, "%s%s:%s:%s:%zu", b->len ? "," : "", d->id, d->enabled ? "on" : "off",
                  d->has_fpr ? "key" : "-", d->secret_len);
    return 0;
}

static int stop_at_second(void *ud, const struct recv_device *d)
{
    int *n = ud;

    (void)d;
    return ++*n == 2 ? 42 : 0;
}

static void test_devices(void **state)
{
    struct fixture *f = *state;
    const struct recv_store_ops *ops = &recv_store_sqlite;
    struct recv_device d, g;
    struct recv_buf out = {0};
    uint8_t secret[CIS_HMAC_SECRET_MAX];
    int n = 0;

    memset(&d, 0, sizeof d);
    snprintf(d.id, sizeof d.id, "gw-d1");
    d.has_fpr = 1;
    memset(d.fpr, 0xab, sizeof d.fpr);
    for (size_t i = 0; i < sizeof secret; i++)
        secret[i] = (uint8_t)(i * 7 + 1);
    d.secret_len = 40;
    memcpy(d.secret, secret, 40);
    d.enabled = 1;
    assert_int_equal(ops->device_put(f->st, &d, 0, 1000), 0);

    memset(&g, 0x5a, sizeof g);
    assert_int_equal(ops->device_get(f->st, "gw-d1", &g), 0);
    assert_string_equal(g.id, "gw-d1");
    assert_int_equal(g.has_fpr, 1);
    assert_memory_equal(g.fpr, d.fpr, sizeof d.fpr);
    assert_int_equal(g.secret_len, 40);
    assert_memory_equal(g.secret, secret, 40);
    assert_int_equal(g.enabled, 1);
    assert_int_equal(g.added_ms, 1000);
    assert_int_equal(g.changed_ms, 1000);
    /* the row itself */
    assert_int_equal(sql_int(f->path, "SELECT count(*) FROM devices WHERE id = 'gw-d1'"
                                      " AND hex(fingerprint) = 'ABABABABABABABABABABABABABABABAB"
                                      "ABABABABABABABABABABABABABABABAB' AND length(hmac_secret)"
                                      " = 40 AND enabled = 1 AND added_ms = 1000"
                                      " AND changed_ms = 1000"),
                     1);

    /* an id registered already: refused, and nothing changes */
    d.enabled = 0;
    d.has_fpr = 0;
    assert_int_equal(ops->device_put(f->st, &d, 0, 2000), CIS_EEXIST);
    assert_int_equal(sql_int(f->path, "SELECT count(*) FROM devices WHERE id = 'gw-d1'"
                                      " AND fingerprint IS NOT NULL AND enabled = 1"
                                      " AND changed_ms = 1000"),
                     1);

    /* replaced: new credentials and flag, added_ms kept */
    d.secret_len = 32;
    memcpy(d.secret, secret + 8, 32);
    assert_int_equal(ops->device_put(f->st, &d, 1, 3000), 0);
    assert_int_equal(ops->device_get(f->st, "gw-d1", &g), 0);
    assert_int_equal(g.has_fpr, 0);
    assert_int_equal(g.secret_len, 32);
    assert_memory_equal(g.secret, secret + 8, 32);
    assert_int_equal(g.enabled, 0);
    assert_int_equal(g.added_ms, 1000);
    assert_int_equal(g.changed_ms, 3000);
    assert_int_equal(sql_int(f->path, "SELECT count(*) FROM devices"), 1);
    assert_int_equal(sql_int(f->path, "SELECT fingerprint IS NULL FROM devices"), 1);

    /* enable / revoke */
    assert_int_equal(ops->device_set_enabled(f->st, "gw-d1", 1, 4000), 0);
    assert_int_equal(sql_int(f->path, "SELECT enabled FROM devices WHERE id = 'gw-d1'"), 1);
    assert_int_equal(ops->device_get(f->st, "gw-d1", &g), 0);
    assert_int_equal(g.enabled, 1);
    assert_int_equal(g.changed_ms, 4000);
    assert_int_equal(g.added_ms, 1000);
    assert_int_equal(ops->device_set_enabled(f->st, "gw-d1", 0, 5000), 0);
    assert_int_equal(sql_int(f->path, "SELECT enabled FROM devices WHERE id = 'gw-d1'"), 0);

    /* unknown ids */
    assert_int_equal(ops->device_get(f->st, "nobody", &g), CIS_ENOTFOUND);
    assert_int_equal(ops->device_set_enabled(f->st, "nobody", 0, 6000), CIS_ENOTFOUND);
    assert_int_equal(sql_int(f->path, "SELECT count(*) FROM devices WHERE id = 'nobody'"), 0);

    /* bad input changes nothing */
    memset(&g, 0, sizeof g);
    assert_int_equal(ops->device_put(f->st, &g, 0, 1), CIS_EINVAL); /* empty id */
    memset(g.id, 'a', sizeof g.id);                                 /* no NUL */
    assert_int_equal(ops->device_put(f->st, &g, 0, 1), CIS_EINVAL);
    snprintf(g.id, sizeof g.id, "gw-x");
    g.secret_len = CIS_HMAC_SECRET_MAX + 1;
    assert_int_equal(ops->device_put(f->st, &g, 0, 1), CIS_EINVAL);
    assert_int_equal(sql_int(f->path, "SELECT count(*) FROM devices"), 1);

    /* list: ordered by id */
    memset(&g, 0, sizeof g);
    snprintf(g.id, sizeof g.id, "gw-z");
    g.has_fpr = 1;
    g.enabled = 1;
    assert_int_equal(ops->device_put(f->st, &g, 0, 7000), 0);
    snprintf(g.id, sizeof g.id, "gw-a");
    g.has_fpr = 0;
    g.secret_len = 32;
    assert_int_equal(ops->device_put(f->st, &g, 0, 7000), 0);
    assert_int_equal(ops->device_list(f->st, collect_ids, &out), 0);
    assert_string_equal(out.p, "gw-a:on:-:32,gw-d1:off:-:32,gw-z:on:key:0");
    recv_buf_free(&out);
    /* a callback's non-zero value stops the walk and is returned */
    assert_int_equal(ops->device_list(f->st, stop_at_second, &n), 42);
    assert_int_equal(n, 2);

    /* a row this code cannot have written is an error, not a device */
    sql_exec(f->path, "UPDATE devices SET fingerprint = x'0102' WHERE id = 'gw-z'");
    assert_int_equal(ops->device_get(f->st, "gw-z", &g), CIS_EDB);
    assert_int_equal(ops->device_list(f->st, collect_ids, &out), CIS_EDB);
    recv_buf_free(&out);
}

static int replays_of(void *ud, const struct recv_agent_info *a)
{
    int64_t *v = ud;

    if (strcmp(a->id, "gw-r") == 0)
        *v = a->replayed_batches;
    return 0;
}

static void test_replay_counted(void **state)
{
    struct fixture *f = *state;
    struct cis_decoded_batch b;
    struct recv_put_result r;
    int64_t replays = -1;

    make_batch("gw-r", EPOCH, 1, 2, 1, &b);
    memset(&r, 0x7f, sizeof r);
    assert_int_equal(recv_store_sqlite.put_batch(f->st, &b, 1000, &r), 0);
    assert_int_equal(r.replay, 0);
    assert_int_equal(sql_int(f->path, "SELECT replayed_batches FROM agents WHERE id = 'gw-r'"), 0);
    memset(&r, 0x7f, sizeof r);
    assert_int_equal(recv_store_sqlite.put_batch(f->st, &b, 2000, &r), 0);
    assert_int_equal(r.replay, 1);
    assert_int_equal(r.duplicates, 3);
    assert_int_equal(sql_int(f->path, "SELECT replayed_batches FROM agents WHERE id = 'gw-r'"), 1);
    assert_int_equal(recv_store_sqlite.list_agents(f->st, replays_of, &replays), 0);
    assert_int_equal(replays, 1);
    assert_int_equal(sql_int(f->path, "SELECT records FROM agents WHERE id = 'gw-r'"), 3);
    cis_batch_free(&b);

    /* part new, part old: not a replay */
    make_batch("gw-r", EPOCH, 3, 1, 1, &b);
    assert_int_equal(recv_store_sqlite.put_batch(f->st, &b, 3000, &r), 0);
    assert_int_equal(r.replay, 0);
    assert_int_equal(r.accepted, 1);
    assert_int_equal(sql_int(f->path, "SELECT replayed_batches FROM agents WHERE id = 'gw-r'"), 1);
    cis_batch_free(&b);
}

/* Mode bits of PATH. */
static unsigned file_mode(const char *path)
{
    struct stat sb;

    assert_int_equal(stat(path, &sb), 0);
    return (unsigned)(sb.st_mode & 07777);
}

static void test_file_mode(void **state)
{
    struct fixture *f = *state;
    struct recv_store_opts o = {.path = f->path, .busy_timeout_ms = 1000};
    char wal[200], shm[200], err[256];
    sqlite3 *db;
    mode_t old;

    snprintf(wal, sizeof wal, "%s-wal", f->path);
    snprintf(shm, sizeof shm, "%s-shm", f->path);
    recv_store_sqlite.close(f->st);
    f->st = NULL;

    /* New files: 0600 under a lax umask and under a strict one. */
    for (int i = 0; i < 2; i++) {
        rm_db(f->path);
        old = umask(i == 0 ? 022 : 0277);
        assert_int_equal(recv_store_sqlite.open(&o, &f->st, err, sizeof err), 0);
        umask(old);
        assert_int_equal(file_mode(f->path), 0600);
        assert_int_equal(file_mode(wal), 0600); /* both exist while the store is open */
        assert_int_equal(file_mode(shm), 0600);
        recv_store_sqlite.close(f->st);
        f->st = NULL;
    }

    /* An older receiver's store, 0644 by the umask, open in WAL mode by another process (a
     * receiver still running), so its -wal and -shm exist: all three lose group and other
     * access. */
    rm_db(f->path);
    old = umask(022);
    sql_exec(f->path, schema_v2_sql);
    assert_int_equal(sqlite3_open(f->path, &db), SQLITE_OK);
    assert_int_equal(sqlite3_exec(db, "PRAGMA journal_mode=WAL; INSERT INTO meta VALUES('x', 1)",
                                  NULL, NULL, NULL),
                     SQLITE_OK);
    umask(old);
    assert_int_equal(file_mode(f->path), 0644);
    assert_int_equal(file_mode(wal), 0644);
    assert_int_equal(file_mode(shm), 0644);
    assert_int_equal(recv_store_sqlite.open(&o, &f->st, err, sizeof err), 0);
    assert_int_equal(file_mode(f->path), 0600);
    assert_int_equal(file_mode(wal), 0600);
    assert_int_equal(file_mode(shm), 0600);
    sqlite3_close(db);
    assert_int_equal(sql_int(f->path, "SELECT value FROM meta WHERE key = 'schema_version'"), 3);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_put_twice_dedups, setup, teardown),
        cmocka_unit_test_setup_teardown(test_agents_and_losses, setup, teardown),
        cmocka_unit_test_setup_teardown(test_records_paging, setup, teardown),
        cmocka_unit_test(test_epoch_top_bit_rejected),
        cmocka_unit_test(test_json_helpers),
        cmocka_unit_test_setup_teardown(test_config, setup, teardown),
        cmocka_unit_test_setup_teardown(test_gaps_classified, setup, teardown),
        cmocka_unit_test_setup_teardown(test_gaps_edges, setup, teardown),
        cmocka_unit_test_setup_teardown(test_losses_keyed_by_origin, setup, teardown),
        cmocka_unit_test_setup_teardown(test_upgrade_v1, setup, teardown),
        cmocka_unit_test_setup_teardown(test_upgrade_v2, setup, teardown),
        cmocka_unit_test_setup_teardown(test_devices, setup, teardown),
        cmocka_unit_test_setup_teardown(test_replay_counted, setup, teardown),
        cmocka_unit_test_setup_teardown(test_file_mode, setup, teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
