/* Writes the seed corpus of the batch, HTTP, MQTT and envelope targets: valid batches made with
 * the codec (as tests/unit/test_codec.c makes them), each also framed as the HTTP and MQTT
 * targets read their input, signed envelopes of some of them (ECDSA and HMAC, with the key and
 * secret fuzz_envelope.c registers), and a few near misses. Run: make_seeds tests/fuzz/corpus
 * (scripts/fuzz.sh says when). Deterministic: the same codec and zstd give the same files, and
 * mbedTLS signs ECDSA deterministically (RFC 6979). */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cistern/codec.h>
#include <cistern/err.h>
#include <cistern/sign.h>

#include "fuzz_seeds.h"

#define AGENT SEED_AGENT
#define TOPIC "cistern/v1/" AGENT "/batch"

static const char *outdir;

static void die(const char *what)
{
    fprintf(stderr, "make_seeds: %s\n", what);
    exit(1);
}

static void put(const char *target, const char *name, const uint8_t *a, size_t alen,
                const uint8_t *b, size_t blen)
{
    char path[512];
    FILE *f;

    snprintf(path, sizeof path, "%s/%s", outdir, target);
    if (mkdir(path, 0755) != 0 && errno != EEXIST)
        die(path);
    snprintf(path, sizeof path, "%s/%s/%s", outdir, target, name);
    f = fopen(path, "wb");
    if (f == NULL || fwrite(a, 1, alen, f) != alen || (blen && fwrite(b, 1, blen, f) != blen) ||
        fclose(f) != 0)
        die(path);
}

/* One header byte LEN then S, as the HTTP and MQTT targets frame their strings; S NULL: the
 * byte 0xff (no header / no property), "" : the byte 0. */
static size_t frame(uint8_t *out, const char *s)
{
    size_t n;

    if (s == NULL) {
        out[0] = 0xff;
        return 1;
    }
    n = strlen(s);
    out[0] = (uint8_t)n;
    memcpy(out + 1, s, n);
    return 1 + n;
}

/* The batch under NAME for the HTTP and MQTT targets with the given framing (CT NULL: no
 * Content-Type), for the decoder when DECODE (not when the same bytes are there already). The
 * ingest targets get it to sign for ENV_AGENT (SEED_BODY_WRAP; NULL: the CN, else AGENT). */
static void emit_as(const char *name, int decode, const uint8_t *batch, size_t len,
                    const char *ct, const char *cn, const char *topic, const char *env_agent)
{
    uint8_t hdr[900];
    size_t n, w;

    if (decode)
        put("batch_decode", name, batch, len, NULL, 0);
    if (env_agent == NULL)
        env_agent = cn != NULL && cn[0] ? cn : AGENT;
    n = frame(hdr, ct);
    n += frame(hdr + n, cn != NULL ? cn : "");
    w = n;
    hdr[w++] = SEED_BODY_WRAP;
    w += frame(hdr + w, env_agent);
    put("http_ingest", name, hdr, w, batch, len);
    n = frame(hdr, topic);
    n += frame(hdr + n, ct);
    w = n;
    hdr[w++] = SEED_BODY_WRAP;
    w += frame(hdr + w, env_agent);
    put("mqtt_ingest", name, hdr, w, batch, len);
}

static void emit(const char *name, int decode, const uint8_t *batch, size_t len, const char *ct,
                 const char *cn, const char *topic)
{
    emit_as(name, decode, batch, len, ct, cn, topic, NULL);
}

/* BODY as sent (SEED_BODY_AS_IS), e.g. an envelope, for both ingest targets. */
static void emit_body(const char *name, const uint8_t *body, size_t len, const char *ct,
                      const char *cn, const char *topic)
{
    uint8_t hdr[600];
    size_t n;

    n = frame(hdr, ct);
    n += frame(hdr + n, cn != NULL ? cn : "");
    hdr[n++] = SEED_BODY_AS_IS;
    put("http_ingest", name, hdr, n, body, len);
    n = frame(hdr, topic);
    n += frame(hdr + n, ct);
    hdr[n++] = SEED_BODY_AS_IS;
    put("mqtt_ingest", name, hdr, n, body, len);
}

/* A batch of NSEG segments of PER records each from seq FIRST, payloads of PAYLOAD_SIZE bytes
 * (repetitive: zstd takes them), with the losses given. *OUT is malloc'd. */
static void make(const char *agent, uint64_t epoch, uint64_t first, size_t nseg, size_t per,
                 size_t payload_size, const Cistern__V1__LossEntry *const *losses, size_t nlosses,
                 uint8_t **out, size_t *len)
{
    struct cis_segment segs[4];
    uint8_t *data[4] = {0};
    struct cis_record recs[64];
    char payloads[64][128];
    struct cis_batch_meta meta = {.agent_id = agent, .epoch = epoch, .created_ms = 1700000000000,
                                  .spool_depth = 12, .oldest_pending_ms = 1500,
                                  .losses = losses, .nlosses = nlosses};
    uint64_t seq = first;

    if (nseg > 4 || per > 64 || payload_size >= sizeof payloads[0])
        die("make: too many");
    for (size_t s = 0; s < nseg; s++) {
        size_t dlen = 0;
        for (size_t i = 0; i < per; i++, seq++) {
            size_t k;
            for (k = 0; k < payload_size; k++)
                payloads[i][k] = "{\"t\":21.5,\"h\":40}"[k % 18];
            payloads[i][k] = '\0';
            recs[i] = (struct cis_record){.seq = seq, .ts_ms = 1700000000000 + (int64_t)seq,
                                          .stream = s % 2 ? "apps" : "sensors/t",
                                          .content_type = s % 2 ? NULL : "application/json",
                                          .payload = (const uint8_t *)payloads[i],
                                          .payload_len = payload_size};
        }
        if (cis_segment_encode(recs, per, (uint32_t)(s % 3), 3, &segs[s], &data[s], &dlen) !=
            CIS_OK)
            die("cis_segment_encode");
        segs[s].data = data[s];
        segs[s].data_len = dlen;
    }
    if (cis_batch_encode(&meta, segs, nseg, out, len) != CIS_OK)
        die("cis_batch_encode");
    for (size_t s = 0; s < nseg; s++)
        free(data[s]);
}

/* The seeds' signing key and secret: test values, printed here, never a device's. The envelope
 * target (fuzz_envelope.c) registers their fingerprint and the same secret, so the fuzzer
 * starts from envelopes that verify; keep the two files in step. */
static const char seed_key_pem[] =
    "-----BEGIN EC PRIVATE KEY-----\n"
    "MHcCAQEEIKhR+stC7/7xbV2mWdVZ5ayd9PajxhGY163h4t49ZDFAoAoGCCqGSM49\n"
    "AwEHoUQDQgAEs+PtHAIFAOaM8Ix9idoXeoploehtVBACvkIMfS9nAT+lijg0LnK5\n"
    "pVWFMM+lnK3L0ucZX4WDqUD1Z2a7cbjlWw==\n"
    "-----END EC PRIVATE KEY-----\n";

/* Write TEXT to a new private temporary file; its path goes to PATH (PATHLEN bytes). */
static void tmp_file(const char *text, char *path, size_t pathlen)
{
    int fd;
    snprintf(path, pathlen, "/tmp/cistern-seeds-XXXXXX");
    fd = mkstemp(path); /* mode 0600, as the secret loader demands */
    if (fd < 0 || write(fd, text, strlen(text)) != (ssize_t)strlen(text) || close(fd) != 0)
        die("temporary file");
}

static struct cis_signer *open_signer(int alg, const char *text)
{
    struct cis_signer *s = NULL;
    char path[64], err[512];
    int rc;

    tmp_file(text, path, sizeof path);
    rc = alg == CIS_SIG_ECDSA ? cis_signer_open_ecdsa(path, &s, err, sizeof err)
                              : cis_signer_open_hmac(path, &s, err, sizeof err);
    unlink(path);
    if (rc != CIS_OK)
        die(err);
    return s;
}

/* Wrap BATCH with S and write it as envelope/NAME; WANT is what fuzz_envelope.c's verification
 * must answer (checked here, so that the "valid" seeds really reach the cryptography). */
static void emit_env(const char *name, struct cis_signer *s, const char *agent,
                     const uint8_t *batch, size_t len, int want)
{
    struct cis_envelope e;
    uint8_t fpr[CIS_FPR_LEN], *env;
    size_t env_len;
    char why[512] = "";
    int rc;

    if (cis_signer_wrap(s, agent, batch, len, &env, &env_len) != CIS_OK)
        die("cis_signer_wrap");
    if (cis_fpr_parse(SEED_KEY_FPR, fpr) != CIS_OK ||
        cis_envelope_decode(env, env_len, &e, why, sizeof why) != CIS_OK)
        die("envelope seed does not decode");
    rc = cis_envelope_verify(&e, fpr, (const uint8_t *)SEED_SECRET, strlen(SEED_SECRET), why,
                             sizeof why);
    cis_envelope_free(&e);
    if (rc != want) {
        fprintf(stderr, "make_seeds: envelope %s: %d (%s), want %d\n", name, rc, why, want);
        exit(1);
    }
    put("envelope", name, env, env_len, NULL, 0);
    free(env);
}

/* Near misses of envelopes, made by hand: what no signer makes. */
static void emit_env_raw(const char *name, const char *agent, int alg, const uint8_t *key,
                         size_t klen, size_t slen, const uint8_t *batch, size_t blen)
{
    Cistern__V1__SignedBatch m = CISTERN__V1__SIGNED_BATCH__INIT;
    uint8_t sig[80] = {0x30, 0x44, 0x02, 0x20}, *buf;
    size_t n;

    m.agent_id = (char *)agent;
    m.alg = (Cistern__V1__SignatureAlg)alg;
    m.key.data = (uint8_t *)key;
    m.key.len = klen;
    m.signature.data = sig;
    m.signature.len = slen;
    m.batch.data = (uint8_t *)batch;
    m.batch.len = blen;
    n = cistern__v1__signed_batch__get_packed_size(&m);
    buf = malloc(n);
    if (buf == NULL)
        die("malloc");
    cistern__v1__signed_batch__pack(&m, buf);
    put("envelope", name, buf, n, NULL, 0);
    free(buf);
}

/* The envelope seeds: valid ECDSA and HMAC ones, another secret, and broken ones. */
static void envelopes(const uint8_t *plain, size_t plain_len, const uint8_t *zstd, size_t zstd_len)
{
    struct cis_signer *ec = open_signer(CIS_SIG_ECDSA, seed_key_pem);
    struct cis_signer *hm = open_signer(CIS_SIG_HMAC, SEED_SECRET "\n");
    struct cis_signer *other = open_signer(CIS_SIG_HMAC, "another secret, not registered anywhere");
    uint8_t *env, *bad;
    size_t len;
    struct cis_envelope e;
    char why[256];

    emit_env("ecdsa-plain-3", ec, AGENT, plain, plain_len, CIS_OK);
    emit_env("ecdsa-zstd-40", ec, AGENT, zstd, zstd_len, CIS_OK);
    emit_env("hmac-plain-3", hm, AGENT, plain, plain_len, CIS_OK);
    emit_env("hmac-zstd-40", hm, AGENT, zstd, zstd_len, CIS_OK);
    emit_env("hmac-other-secret", other, AGENT, plain, plain_len, CIS_EKEY);

    /* Broken: a changed batch byte, a truncated envelope. */
    if (cis_signer_wrap(ec, AGENT, plain, plain_len, &env, &len) != CIS_OK)
        die("cis_signer_wrap");
    bad = malloc(len);
    if (bad == NULL)
        die("malloc");
    memcpy(bad, env, len);
    bad[len - 1] ^= 0x01; /* the batch is the last field: its last byte */
    put("envelope", "ecdsa-changed-batch", bad, len, NULL, 0);
    put("envelope", "ecdsa-truncated", env, len / 2, NULL, 0);
    /* The ingest targets, as sent: one that is stored, one refused for its signature. */
    emit_body("env-ecdsa-plain-3", env, len, CIS_SIGNED_BATCH_CONTENT_TYPE, AGENT, TOPIC);
    emit_body("env-ecdsa-changed-batch", bad, len, CIS_SIGNED_BATCH_CONTENT_TYPE, AGENT, TOPIC);
    /* The registered key with another's signature: a signature that does not verify. */
    if (cis_envelope_decode(env, len, &e, why, sizeof why) != CIS_OK)
        die("cis_envelope_decode");
    emit_env_raw("ecdsa-bad-sig", AGENT, CIS_SIG_ECDSA, e.key, e.key_len, 70, plain, plain_len);
    emit_env_raw("alg-none", AGENT, 0, e.key, e.key_len, 70, plain, plain_len);
    emit_env_raw("bad-agent-id", "gw/1", CIS_SIG_ECDSA, e.key, e.key_len, 70, plain, plain_len);
    emit_env_raw("hmac-short-key-id", AGENT, CIS_SIG_HMAC, e.key, 15, 32, plain, plain_len);
    cis_envelope_free(&e);
    free(bad);
    free(env);
    cis_signer_free(other);
    cis_signer_free(hm);
    cis_signer_free(ec);
}

int main(int argc, char **argv)
{
    Cistern__V1__LossEntry l1 = CISTERN__V1__LOSS_ENTRY__INIT, l2 = CISTERN__V1__LOSS_ENTRY__INIT;
    const Cistern__V1__LossEntry *losses[2] = {&l1, &l2};
    const char *ct = CIS_SIGNED_BATCH_CONTENT_TYPE;
    uint8_t *b, *b2;
    size_t len, len2;

    if (argc != 2) {
        fprintf(stderr, "usage: make_seeds CORPUS_DIR\n");
        return 2;
    }
    outdir = argv[1];
    l1.id = 1;
    l1.reason = "evicted_full";
    l1.epoch = 7;
    l1.first_seq = 1;
    l1.last_seq = 40;
    l1.count = 40;
    l1.ts_ms = 1700000000000;
    l1.detail = "spool full";
    l2.id = 2;
    l2.reason = "corrupt_spool";
    l2.epoch = 0; /* unknown: only corrupt_spool may say so */
    l2.ts_ms = 1700000000001;

    /* Small records: stored uncompressed (zstd is not smaller). */
    make(AGENT, 7, 1, 1, 3, 8, NULL, 0, &b, &len);
    emit("plain-3", 1, b, len, ct, AGENT, TOPIC);
    /* Repetitive records: zstd. */
    make(AGENT, 7, 100, 1, 40, 100, NULL, 0, &b2, &len2);
    emit("zstd-40", 1, b2, len2, ct, AGENT, TOPIC);
    envelopes(b, len, b2, len2);
    free(b);
    free(b2);
    /* Several segments, priorities and streams, with loss entries. */
    make(AGENT, 8, 1, 3, 5, 60, losses, 2, &b, &len);
    emit("3seg-losses", 1, b, len, CIS_SIGNED_BATCH_CONTENT_TYPE "; charset=binary", AGENT,
         TOPIC);
    free(b);
    /* Loss entries only: on plain HTTP (no identity), then with no Content-Type at all. */
    make(AGENT, 9, 1, 0, 0, 0, losses, 1, &b, &len);
    emit("losses-only", 1, b, len, ct, NULL, TOPIC);
    emit("losses-only-noct", 0, b, len, NULL, AGENT, TOPIC);
    free(b);
    /* Near misses: another agent's batch (403 / identity), an envelope for one agent around
     * another's batch, a wrong topic, a wrong type, the unsigned type. */
    make(SEED_AGENT_2, 7, 1, 1, 2, 8, NULL, 0, &b, &len);
    emit_as("other-agent", 1, b, len, ct, AGENT, TOPIC, SEED_AGENT_2);
    emit_as("envelope-agent-differs", 0, b, len, ct, AGENT, TOPIC, AGENT);
    emit("unsigned-type", 0, b, len, CIS_BATCH_CONTENT_TYPE, SEED_AGENT_2,
         "cistern/v1/" SEED_AGENT_2 "/batch");
    emit("bad-topic", 0, b, len, ct, "gw-2", "cistern/v1/gw-2/bat");
    emit("bad-type", 0, b, len, "application/json", "gw-2", "cistern/v1/gw-2/batch");
    free(b);
    return 0;
}
