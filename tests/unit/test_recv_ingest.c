/* Unit tests for the receiver's shared batch ingest (used by HTTP and MQTT): the signed
 * envelope against the device registry (unregistered, revoked, another key, a changed byte,
 * a replay), then decoding and storing; the MQTT ingest's pure parts (topic parsing, ack
 * payloads) and the mqtt.* config keys. No network. */
#include <inttypes.h>
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

#include <cistern/codec.h>
#include <cistern/err.h>
#include <cistern/sign.h>
#include <sys/stat.h>

#include "api.h"
#include "ingest/ingest.h"
#include "ingest/mqtt.h"
#include "recv_config.h"
#include "registry.h"
#include "store/store.h"

#define EPOCH UINT64_C(0x1234567890abcdef)

struct fixture {
    char dir[64];
    char path[128];
    char secret_path[128], key_path[128], other_key_path[128];
    struct recv_store *st;
    struct recv_registry *reg;
    struct cis_signer *hmac;  /* the secret registered for every HMAC device below */
    struct cis_signer *ecdsa; /* KEY_PATH's key */
    struct recv_ingest_ctx ctx;
};

#define SECRET "0123456789abcdef0123456789abcdef-test-secret"

/* Register ID in the fixture's store: with the fixture's HMAC secret, and with the fingerprint
 * of KEY (a key file) when KEY is not NULL. */
static void register_device(struct fixture *f, const char *id, const char *key)
{
    struct recv_device d = {.enabled = 1};
    char err[256];

    snprintf(d.id, sizeof d.id, "%s", id);
    memcpy(d.secret, SECRET, strlen(SECRET));
    d.secret_len = strlen(SECRET);
    if (key != NULL) {
        assert_int_equal(cis_fpr_of_file(key, d.fpr, err, sizeof err), 0);
        d.has_fpr = 1;
    }
    assert_int_equal(f->ctx.ops->device_put(f->st, &d, 1, 1000), 0);
    usleep(3000); /* past the registry's 1 ms TTL: a "not registered" cached before expires */
}

static void make_key(const char *path)
{
    char cmd[300];

    snprintf(cmd, sizeof cmd,
             "openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out %s 2>/dev/null",
             path);
    assert_int_equal(system(cmd), 0);
}

static int setup(void **state)
{
    struct fixture *f = calloc(1, sizeof *f);
    struct recv_store_opts o = {0};
    char err[256];

    assert_non_null(f);
    snprintf(f->dir, sizeof f->dir, "/tmp/test_recv_ingest.XXXXXX");
    assert_non_null(mkdtemp(f->dir));
    snprintf(f->path, sizeof f->path, "%s/store.db", f->dir);
    o.path = f->path;
    o.busy_timeout_ms = 1000;
    assert_int_equal(recv_store_sqlite.open(&o, &f->st, err, sizeof err), 0);
    /* A 1 ms TTL: every lookup of a test sees the registry as it is now. */
    assert_int_equal(recv_registry_new(&recv_store_sqlite, f->st, 1, &f->reg), 0);
    snprintf(f->secret_path, sizeof f->secret_path, "%s/secret", f->dir);
    {
        FILE *sf = fopen(f->secret_path, "w");
        assert_non_null(sf);
        fputs(SECRET "\n", sf);
        fclose(sf);
        assert_int_equal(chmod(f->secret_path, 0600), 0);
    }
    assert_int_equal(cis_signer_open_hmac(f->secret_path, &f->hmac, err, sizeof err), 0);
    snprintf(f->key_path, sizeof f->key_path, "%s/device.key", f->dir);
    snprintf(f->other_key_path, sizeof f->other_key_path, "%s/other.key", f->dir);
    make_key(f->key_path);
    make_key(f->other_key_path);
    assert_int_equal(cis_signer_open_ecdsa(f->key_path, &f->ecdsa, err, sizeof err), 0);
    f->ctx = (struct recv_ingest_ctx){
        .ops = &recv_store_sqlite,
        .st = f->st,
        .reg = f->reg,
        .max_body = 1 << 20,
        .limits = {.max_decompressed = 1 << 20, .max_records = 1000},
        .identity_name = "certificate CN",
    };
    *state = f;
    return 0;
}

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

    cis_signer_free(f->hmac);
    cis_signer_free(f->ecdsa);
    recv_registry_free(f->reg);
    recv_store_sqlite.close(f->st);
    rm_db(f->path);
    unlink(f->secret_path);
    unlink(f->key_path);
    unlink(f->other_key_path);
    assert_int_equal(rmdir(f->dir), 0); /* a test left a file behind otherwise */
    free(f);
    return 0;
}

static int64_t sql_int(const char *path, const char *sql)
{
    sqlite3 *db = NULL;
    sqlite3_stmt *s = NULL;
    int64_t v;

    assert_int_equal(sqlite3_open_v2(path, &db, SQLITE_OPEN_READONLY, NULL), SQLITE_OK);
    assert_int_equal(sqlite3_prepare_v2(db, sql, -1, &s, NULL), SQLITE_OK);
    assert_int_equal(sqlite3_step(s), SQLITE_ROW);
    v = sqlite3_column_int64(s, 0);
    sqlite3_finalize(s);
    sqlite3_close(db);
    return v;
}

/* Encode a batch for AGENT: one segment of N records from seq FIRST. *OUT is malloc'd. */
static void make_raw_batch(const char *agent, uint64_t epoch, uint64_t first, size_t n,
                           uint8_t **out, size_t *len)
{
    struct cis_record recs[32];
    char payloads[32][32];
    struct cis_segment seg;
    uint8_t *data = NULL;
    size_t dlen = 0;
    struct cis_batch_meta meta = {.agent_id = agent, .epoch = epoch, .created_ms = 1000};

    assert_true(n <= 32);
    for (size_t i = 0; i < n; i++) {
        snprintf(payloads[i], sizeof payloads[i], "{\"v\":%zu}", i);
        recs[i] = (struct cis_record){.seq = first + i, .ts_ms = 1700000000000 + (int64_t)i,
                                      .stream = "sensors/t", .content_type = "application/json",
                                      .payload = (const uint8_t *)payloads[i],
                                      .payload_len = strlen(payloads[i])};
    }
    assert_int_equal(cis_segment_encode(recs, n, 1, 3, &seg, &data, &dlen), 0);
    seg.data = data;
    seg.data_len = dlen;
    assert_int_equal(cis_batch_encode(&meta, &seg, 1, out, len), 0);
    free(data);
}

/* The batch of make_raw_batch, in an envelope for ENV_AGENT signed by SIGNER. */
static void make_signed(struct cis_signer *signer, const char *env_agent, const char *agent,
                        uint64_t epoch, uint64_t first, size_t n, uint8_t **out, size_t *len)
{
    uint8_t *raw = NULL;
    size_t rlen = 0;

    make_raw_batch(agent, epoch, first, n, &raw, &rlen);
    assert_int_equal(cis_signer_wrap(signer, env_agent, raw, rlen, out, len), 0);
    free(raw);
}

/* A batch of AGENT as its agent sends it: signed with the fixture's HMAC secret. */
#define make_batch(agent, epoch, first, n, out, len)                                              \
    make_signed(f->hmac, (agent), (agent), (epoch), (first), (n), (out), (len))

static int64_t stored(struct fixture *f)
{
    return sql_int(f->path, "SELECT count(*) FROM records");
}

/* ---- recv_ingest_batch ---- */

static void test_ok_then_duplicate(void **state)
{
    struct fixture *f = *state;
    struct recv_ingest_result res;
    uint8_t *buf = NULL;
    size_t len = 0;
    char why[256], want[256];

    register_device(f, "gw-1", NULL);
    register_device(f, "gw-2", NULL);
    make_batch("gw-1", EPOCH, 1, 5, &buf, &len);
    assert_int_equal(recv_ingest_batch(&f->ctx, buf, len, "gw-1", &res, why, sizeof why),
                     RECV_INGEST_OK);
    assert_int_equal(res.reject, RECV_REJECT_NONE);
    assert_int_equal(res.replay, 0);
    assert_int_equal(res.accepted, 5);
    assert_int_equal(res.duplicates, 0);
    assert_string_equal(res.agent_id, "gw-1");
    assert_true(res.epoch == EPOCH);
    snprintf(want, sizeof want,
             "{\"accepted\":5,\"duplicates\":0,\"acked\":[[\"%" PRIu64 "\",1,5]]}", EPOCH);
    assert_non_null(res.answer.p);
    assert_string_equal(res.answer.p, want);
    recv_ingest_result_free(&res);
    assert_int_equal(stored(f), 5);
    assert_int_equal(sql_int(f->path, "SELECT count(*) FROM records WHERE agent_id = 'gw-1' AND "
                                      "seq BETWEEN 1 AND 5"),
                     5);

    /* the same batch again (a re-send after a lost ack): stored once, acked again */
    assert_int_equal(recv_ingest_batch(&f->ctx, buf, len, "gw-1", &res, why, sizeof why),
                     RECV_INGEST_OK);
    assert_int_equal(res.accepted, 0);
    assert_int_equal(res.duplicates, 5);
    assert_int_equal(res.replay, 1); /* counted, and nothing new stored */
    assert_int_equal(sql_int(f->path, "SELECT replayed_batches FROM agents WHERE id = 'gw-1'"), 1);
    snprintf(want, sizeof want,
             "{\"accepted\":0,\"duplicates\":5,\"acked\":[[\"%" PRIu64 "\",1,5]]}", EPOCH);
    assert_string_equal(res.answer.p, want);
    recv_ingest_result_free(&res);
    assert_int_equal(stored(f), 5);

    /* no identity to match (plain HTTP behind a proxy): any registered agent id, its
     * signature alone says who sent it */
    free(buf);
    make_batch("gw-2", EPOCH, 1, 3, &buf, &len);
    assert_int_equal(recv_ingest_batch(&f->ctx, buf, len, NULL, &res, why, sizeof why),
                     RECV_INGEST_OK);
    recv_ingest_result_free(&res);
    assert_int_equal(stored(f), 8);
    free(buf);
}

static void test_identity_mismatch(void **state)
{
    struct fixture *f = *state;
    struct recv_ingest_result res;
    uint8_t *buf = NULL;
    size_t len = 0;
    char why[256];

    register_device(f, "gw-1", NULL);
    register_device(f, "gw-2", NULL);
    make_batch("gw-2", EPOCH, 1, 4, &buf, &len);
    assert_int_equal(recv_ingest_batch(&f->ctx, buf, len, "gw-1", &res, why, sizeof why),
                     RECV_INGEST_REJECTED);
    assert_int_equal(res.reject, RECV_REJECT_IDENTITY);
    assert_string_equal(why, "certificate CN 'gw-1' may not send for agent 'gw-2'");
    assert_null(res.answer.p);
    recv_ingest_result_free(&res);
    assert_int_equal(stored(f), 0);
    assert_int_equal(sql_int(f->path, "SELECT count(*) FROM agents"), 0);

    f->ctx.identity_name = "topic agent id";
    assert_int_equal(recv_ingest_batch(&f->ctx, buf, len, "gw-1", &res, why, sizeof why),
                     RECV_INGEST_REJECTED);
    assert_string_equal(why, "topic agent id 'gw-1' may not send for agent 'gw-2'");
    recv_ingest_result_free(&res);
    assert_int_equal(stored(f), 0);
    free(buf);
}

static void test_malformed_and_limits(void **state)
{
    struct fixture *f = *state;
    struct recv_ingest_result res;
    static const uint8_t junk[] = {0x0a, 0xff, 0xff, 0x01, 0x02};
    uint8_t *buf = NULL;
    size_t len = 0;
    char why[256];

    register_device(f, "gw-1", NULL);
    /* not an envelope */
    assert_int_equal(recv_ingest_batch(&f->ctx, junk, sizeof junk, "gw-1", &res, why, sizeof why),
                     RECV_INGEST_REJECTED);
    assert_int_equal(res.reject, RECV_REJECT_MALFORMED);
    assert_int_equal(res.code, CIS_EDECODE);
    assert_true(why[0] != '\0');
    recv_ingest_result_free(&res);
    /* empty */
    assert_int_equal(recv_ingest_batch(&f->ctx, junk, 0, "gw-1", &res, why, sizeof why),
                     RECV_INGEST_REJECTED);
    assert_int_equal(res.reject, RECV_REJECT_MALFORMED);
    recv_ingest_result_free(&res);

    /* an unsigned batch, as agents sent before batches were signed */
    make_raw_batch("gw-1", EPOCH, 1, 2, &buf, &len);
    assert_int_equal(recv_ingest_batch(&f->ctx, buf, len, "gw-1", &res, why, sizeof why),
                     RECV_INGEST_REJECTED);
    assert_int_equal(res.reject, RECV_REJECT_MALFORMED);
    recv_ingest_result_free(&res);
    free(buf);

    /* epoch with the top bit set: decodes, but recv_batch_check refuses it */
    make_batch("gw-1", UINT64_C(1) << 63, 1, 2, &buf, &len);
    assert_int_equal(recv_ingest_batch(&f->ctx, buf, len, "gw-1", &res, why, sizeof why),
                     RECV_INGEST_REJECTED);
    assert_int_equal(res.reject, RECV_REJECT_MALFORMED);
    assert_non_null(strstr(why, "epoch"));
    recv_ingest_result_free(&res);
    free(buf);

    /* over max_body */
    make_batch("gw-1", EPOCH, 1, 10, &buf, &len);
    f->ctx.max_body = len - 1;
    assert_int_equal(recv_ingest_batch(&f->ctx, buf, len, "gw-1", &res, why, sizeof why),
                     RECV_INGEST_REJECTED);
    assert_int_equal(res.reject, RECV_REJECT_TOO_BIG);
    assert_int_equal(res.code, CIS_ETOOBIG);
    recv_ingest_result_free(&res);
    f->ctx.max_body = len;

    /* over max_records */
    f->ctx.limits.max_records = 9;
    assert_int_equal(recv_ingest_batch(&f->ctx, buf, len, "gw-1", &res, why, sizeof why),
                     RECV_INGEST_REJECTED);
    assert_int_equal(res.reject, RECV_REJECT_TOO_BIG);
    recv_ingest_result_free(&res);
    assert_int_equal(stored(f), 0);

    /* exactly at both limits: stored */
    f->ctx.limits.max_records = 10;
    assert_int_equal(recv_ingest_batch(&f->ctx, buf, len, "gw-1", &res, why, sizeof why),
                     RECV_INGEST_OK);
    recv_ingest_result_free(&res);
    assert_int_equal(stored(f), 10);
    free(buf);
}

/* A store whose put_batch fails as a busy or failing database does. */
static int failing_put(struct recv_store *s, const struct cis_decoded_batch *b, int64_t now_ms,
                       struct recv_put_result *res)
{
    (void)s;
    (void)b;
    (void)now_ms;
    (void)res;
    return CIS_EAGAIN;
}

static void test_store_failure_is_retry(void **state)
{
    struct fixture *f = *state;
    struct recv_store_ops ops = recv_store_sqlite;
    struct recv_ingest_result res;
    uint8_t *buf = NULL;
    size_t len = 0;
    char why[256];

    register_device(f, "gw-1", NULL);
    ops.put_batch = failing_put;
    f->ctx.ops = &ops;
    make_batch("gw-1", EPOCH, 1, 3, &buf, &len);
    assert_int_equal(recv_ingest_batch(&f->ctx, buf, len, "gw-1", &res, why, sizeof why),
                     RECV_INGEST_RETRY);
    assert_int_equal(res.reject, RECV_REJECT_NONE);
    assert_int_equal(res.code, CIS_EAGAIN);
    assert_non_null(strstr(why, "store unavailable"));
    assert_null(res.answer.p);
    recv_ingest_result_free(&res);
    assert_int_equal(stored(f), 0);
    free(buf);
}

/* ---- the registry and the signature ---- */

/* Ingest BUF for IDENTITY; expect STATUS, and nothing stored unless it is RECV_INGEST_OK. */
static void expect(struct fixture *f, const uint8_t *buf, size_t len, const char *identity,
                   int status, int reject, int code, const char *in_why)
{
    struct recv_ingest_result res;
    int64_t before = stored(f);
    char why[600];

    assert_int_equal(recv_ingest_batch(&f->ctx, buf, len, identity, &res, why, sizeof why),
                     status);
    assert_int_equal(res.reject, reject);
    if (code)
        assert_int_equal(res.code, code);
    if (in_why != NULL && strstr(why, in_why) == NULL)
        fail_msg("'%s' not in '%s'", in_why, why);
    if (status != RECV_INGEST_OK) {
        assert_null(res.answer.p);
        assert_int_equal(stored(f), before);
    }
    recv_ingest_result_free(&res);
}

static void test_unregistered_and_revoked(void **state)
{
    struct fixture *f = *state;
    uint8_t *buf = NULL;
    size_t len = 0;

    make_batch("gw-1", EPOCH, 1, 3, &buf, &len);
    /* not registered: the device may not deliver, the batch is fine (the agent keeps it) */
    expect(f, buf, len, "gw-1", RECV_INGEST_UNAUTHORIZED, RECV_REJECT_NONE, CIS_ENOTFOUND,
           "agent 'gw-1' is not registered");
    assert_int_equal(sql_int(f->path, "SELECT count(*) FROM agents"), 0);
    /* without an identity (plain HTTP) too */
    expect(f, buf, len, NULL, RECV_INGEST_UNAUTHORIZED, RECV_REJECT_NONE, CIS_ENOTFOUND, NULL);

    register_device(f, "gw-1", NULL);
    expect(f, buf, len, "gw-1", RECV_INGEST_OK, RECV_REJECT_NONE, 0, NULL);
    assert_int_equal(stored(f), 3);
    free(buf);

    /* revoked: refused; enabled again: taken */
    assert_int_equal(f->ctx.ops->device_set_enabled(f->st, "gw-1", 0, 2000), 0);
    usleep(5000); /* past the 1 ms TTL */
    make_batch("gw-1", EPOCH, 4, 2, &buf, &len);
    expect(f, buf, len, "gw-1", RECV_INGEST_UNAUTHORIZED, RECV_REJECT_NONE, 0,
           "agent 'gw-1' is revoked");
    assert_int_equal(f->ctx.ops->device_set_enabled(f->st, "gw-1", 1, 3000), 0);
    usleep(5000);
    expect(f, buf, len, "gw-1", RECV_INGEST_OK, RECV_REJECT_NONE, 0, NULL);
    assert_int_equal(stored(f), 5);
    free(buf);
}

static void test_ecdsa_keys(void **state)
{
    struct fixture *f = *state;
    struct cis_signer *other = NULL;
    uint8_t *buf = NULL;
    size_t len = 0;
    char err[256];

    register_device(f, "gw-e", f->key_path);
    make_signed(f->ecdsa, "gw-e", "gw-e", EPOCH, 1, 4, &buf, &len);
    expect(f, buf, len, "gw-e", RECV_INGEST_OK, RECV_REJECT_NONE, 0, NULL);
    assert_int_equal(stored(f), 4);
    free(buf);

    /* a CA-signed certificate for gw-e on another key (impersonation by certificate): its
     * batches are signed with that key, which is not gw-e's registered one */
    assert_int_equal(cis_signer_open_ecdsa(f->other_key_path, &other, err, sizeof err), 0);
    make_signed(other, "gw-e", "gw-e", EPOCH, 5, 2, &buf, &len);
    expect(f, buf, len, "gw-e", RECV_INGEST_UNAUTHORIZED, RECV_REJECT_NONE, CIS_EKEY,
           "not its registered key");
    free(buf);
    cis_signer_free(other);

    /* a device registered with a secret only: an ECDSA envelope has no key to check against */
    register_device(f, "gw-h", NULL);
    make_signed(f->ecdsa, "gw-h", "gw-h", EPOCH, 1, 2, &buf, &len);
    expect(f, buf, len, "gw-h", RECV_INGEST_UNAUTHORIZED, RECV_REJECT_NONE, CIS_EKEY, NULL);
    free(buf);
    assert_int_equal(stored(f), 4);
}

static void test_tampered(void **state)
{
    struct fixture *f = *state;
    uint8_t *buf = NULL;
    size_t len = 0;

    register_device(f, "gw-1", f->key_path);
    /* The inner batch is the envelope's last field: its last byte is a record's payload. */
    for (int alg = 0; alg < 2; alg++) {
        make_signed(alg ? f->ecdsa : f->hmac, "gw-1", "gw-1", EPOCH, 1, 3, &buf, &len);
        buf[len - 1] ^= 0x01;
        expect(f, buf, len, "gw-1", RECV_INGEST_REJECTED, RECV_REJECT_SIGNATURE, CIS_EBADSIG,
               "does not verify");
        free(buf);
    }
    assert_int_equal(sql_int(f->path, "SELECT count(*) FROM agents"), 0);

    /* a signature that verifies, on a batch whose header names another agent */
    register_device(f, "gw-2", NULL);
    make_signed(f->hmac, "gw-1", "gw-2", EPOCH, 1, 3, &buf, &len);
    expect(f, buf, len, "gw-1", RECV_INGEST_REJECTED, RECV_REJECT_MALFORMED, CIS_EDECODE,
           "is not its envelope's");
    free(buf);
    assert_int_equal(stored(f), 0);
}

/* ---- MQTT pure parts ---- */

static void test_topic_agent(void **state)
{
    char a[64];
    const char *t;

    (void)state;
    t = "cistern/v1/gw-0042/batch";
    assert_int_equal(recv_mqtt_topic_agent("cistern/v1", t, strlen(t), a, sizeof a), 0);
    assert_string_equal(a, "gw-0042");
    t = "site/a/cistern/gw.1/batch";
    assert_int_equal(recv_mqtt_topic_agent("site/a/cistern", t, strlen(t), a, sizeof a), 0);
    assert_string_equal(a, "gw.1");

    static const char *const bad[] = {
        "cistern/v1//batch",         /* empty id */
        "cistern/v1/gw/ack",         /* not a batch topic */
        "cistern/v1/a/b/batch",      /* id with a '/' */
        "cistern/v2/gw/batch",       /* another prefix */
        "cistern/v1gw/batch",        /* prefix not followed by '/' */
        "cistern/v1/batch",          /* no id at all */
        "cistern/v1/gw/batchx",      /* suffix */
        "cistern/v1/+/batch",        /* wildcard */
        "",
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        snprintf(a, sizeof a, "untouched");
        assert_int_equal(recv_mqtt_topic_agent("cistern/v1", bad[i], strlen(bad[i]), a, sizeof a),
                         -1);
        assert_string_equal(a, "untouched");
    }
    /* an embedded NUL (Paho passes the length then) */
    assert_int_equal(recv_mqtt_topic_agent("cistern/v1", "cistern/v1/g\0w/batch", 20, a, sizeof a),
                     -1);
    /* the id must fit */
    t = "cistern/v1/0123456789/batch";
    assert_int_equal(recv_mqtt_topic_agent("cistern/v1", t, strlen(t), a, 10), -1);
    assert_int_equal(recv_mqtt_topic_agent("cistern/v1", t, strlen(t), a, 11), 0);
    assert_string_equal(a, "0123456789");
}

static void test_ack_json(void **state)
{
    struct fixture *f = *state;
    struct recv_ingest_result res;
    struct recv_buf b = {0};
    uint8_t *buf = NULL;
    size_t len = 0;
    char why[256], want[256];
    int st;

    register_device(f, "gw-1", NULL);
    make_batch("gw-1", EPOCH, 7, 2, &buf, &len);
    st = recv_ingest_batch(&f->ctx, buf, len, "gw-1", &res, why, sizeof why);
    assert_int_equal(st, RECV_INGEST_OK);
    recv_mqtt_ack_json(st, &res, why, &b);
    snprintf(want, sizeof want,
             "{\"status\":\"ok\",\"accepted\":2,\"duplicates\":0,\"acked\":[[\"%" PRIu64
             "\",7,8]]}",
             EPOCH);
    assert_string_equal(b.p, want);
    recv_buf_free(&b);
    recv_ingest_result_free(&res);
    free(buf);

    memset(&res, 0, sizeof res);
    recv_mqtt_ack_json(RECV_INGEST_REJECTED, &res, "bad \"batch\"\n", &b);
    assert_string_equal(b.p, "{\"status\":\"rejected\",\"error\":\"bad \\\"batch\\\"\\n\"}");
    recv_buf_free(&b);
    recv_mqtt_ack_json(RECV_INGEST_RETRY, &res, "store unavailable: busy", &b);
    assert_string_equal(b.p, "{\"status\":\"retry\",\"error\":\"store unavailable: busy\"}");
    recv_buf_free(&b);
    /* a device that may not deliver now keeps its batch: "retry", not "rejected" */
    recv_mqtt_ack_json(RECV_INGEST_UNAUTHORIZED, &res, "agent 'gw-9' is not registered", &b);
    assert_string_equal(b.p,
                        "{\"status\":\"retry\",\"error\":\"agent 'gw-9' is not registered\"}");
    recv_buf_free(&b);
}

/* ---- mqtt.* config keys ---- */

static void write_file(const char *path, const char *text)
{
    FILE *f = fopen(path, "w");
    assert_non_null(f);
    fputs(text, f);
    fclose(f);
}

/* Load TEXT; expect failure with all of the NULL-terminated fragments in the message. */
static void config_fails(const char *path, const char *text, ...)
{
    struct recv_config cfg;
    char err[512];
    const char *frag;
    va_list ap;

    write_file(path, text);
    assert_int_not_equal(recv_config_load(path, &cfg, err, sizeof err), 0);
    va_start(ap, text);
    while ((frag = va_arg(ap, const char *)) != NULL) {
        if (strstr(err, frag) == NULL)
            fail_msg("'%s' not in '%s'", frag, err);
    }
    va_end(ap);
}

static void test_mqtt_config(void **state)
{
    struct fixture *f = *state;
    struct recv_config cfg;
    char path[160], err[512], loc[200];

    snprintf(path, sizeof path, "%s/r.yaml", f->dir);

    /* MQTT only: no HTTP listener needed, defaults filled in */
    write_file(path, "mqtt:\n  url: ssl://broker:8883\n  client_id: recv-1\n");
    assert_int_equal(recv_config_load(path, &cfg, err, sizeof err), 0);
    assert_null(cfg.listen_http);
    assert_string_equal(cfg.mqtt_url, "ssl://broker:8883");
    assert_string_equal(cfg.mqtt_client_id, "recv-1");
    assert_string_equal(cfg.mqtt_group, "cistern");
    assert_string_equal(cfg.mqtt_topic_prefix, "cistern/v1");
    assert_int_equal(cfg.mqtt_keepalive_ms, 30000);
    assert_int_equal(cfg.mqtt_session_expiry_ms, INT64_C(7) * 86400 * 1000);
    assert_null(cfg.mqtt_ca_file);
    recv_config_free(&cfg);

    /* both ingests, every key */
    write_file(path, "listen:\n  http: 127.0.0.1:0\n  insecure_plain_http: true\n"
                     "mqtt:\n  url: mqtts://broker:8883\n  group: g2\n  topic_prefix: a/b\n"
                     "  client_id: r2\n  tls:\n    ca_file: /ca.pem\n    cert_file: /c.pem\n"
                     "    key_file: /k.pem\n  username: u\n  password: p\n  keepalive: 10s\n"
                     "  session_expiry: 1h\n");
    assert_int_equal(recv_config_load(path, &cfg, err, sizeof err), 0);
    assert_string_equal(cfg.mqtt_group, "g2");
    assert_string_equal(cfg.mqtt_topic_prefix, "a/b");
    assert_string_equal(cfg.mqtt_ca_file, "/ca.pem");
    assert_string_equal(cfg.mqtt_key_file, "/k.pem");
    assert_string_equal(cfg.mqtt_password, "p");
    assert_int_equal(cfg.mqtt_keepalive_ms, 10000);
    assert_int_equal(cfg.mqtt_session_expiry_ms, 3600000);
    recv_config_free(&cfg);

    /* no ingest at all */
    config_fails(path, "store:\n  path: /tmp/x.db\n", "listen.http", "mqtt.url", NULL);
    /* plain MQTT is refused, at the key's location */
    snprintf(loc, sizeof loc, "%s:2:8: mqtt.url", path);
    config_fails(path, "mqtt:\n  url: tcp://broker:1883\n  client_id: r\n", loc, "TLS", NULL);
    config_fails(path, "mqtt:\n  url: ssl://\n  client_id: r\n", "mqtt.url", NULL);
    /* client_id is required with url */
    config_fails(path, "mqtt:\n  url: ssl://broker:8883\n", "mqtt.client_id", "required", NULL);
    /* and means nothing without it */
    snprintf(loc, sizeof loc, "%s:5:14: mqtt.client_id", path);
    config_fails(path, "listen:\n  http: 127.0.0.1:0\n  insecure_plain_http: true\n"
                       "mqtt:\n  client_id: r\n",
                 loc, "mqtt.url", NULL);
    config_fails(path, "mqtt:\n  url: ssl://b:8883\n  client_id: r\n  topic_prefix: a/+/b\n",
                 "mqtt.topic_prefix", NULL);
    config_fails(path, "mqtt:\n  url: ssl://b:8883\n  client_id: r\n  topic_prefix: a/b/\n",
                 "mqtt.topic_prefix", NULL);
    config_fails(path, "mqtt:\n  url: ssl://b:8883\n  client_id: r\n  group: a/b\n",
                 "mqtt.group", NULL);
    config_fails(path, "mqtt:\n  url: ssl://b:8883\n  client_id: r\n  tls:\n    cert_file: /c\n",
                 "mqtt.tls.key_file", "together", NULL);
    config_fails(path, "mqtt:\n  url: ssl://b:8883\n  client_id: r\n  keepalive: 0s\n",
                 "mqtt.keepalive", NULL);
    /* the read API listener needs the HTTP one */
    config_fails(path, "listen:\n  api: 127.0.0.1:0\nmqtt:\n  url: ssl://b:8883\n  client_id: r\n",
                 "listen.api", "listen.http", NULL);
    /* a typo in the section is an unknown key, as everywhere */
    config_fails(path, "mqtt:\n  url: ssl://b:8883\n  clientid: r\n", "mqtt.clientid",
                 "unknown key", NULL);
    unlink(path);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_ok_then_duplicate, setup, teardown),
        cmocka_unit_test_setup_teardown(test_identity_mismatch, setup, teardown),
        cmocka_unit_test_setup_teardown(test_malformed_and_limits, setup, teardown),
        cmocka_unit_test_setup_teardown(test_store_failure_is_retry, setup, teardown),
        cmocka_unit_test_setup_teardown(test_unregistered_and_revoked, setup, teardown),
        cmocka_unit_test_setup_teardown(test_ecdsa_keys, setup, teardown),
        cmocka_unit_test_setup_teardown(test_tampered, setup, teardown),
        cmocka_unit_test(test_topic_agent),
        cmocka_unit_test_setup_teardown(test_ack_json, setup, teardown),
        cmocka_unit_test_setup_teardown(test_mqtt_config, setup, teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
