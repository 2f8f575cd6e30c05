/* Writes the seed corpus of the batch, HTTP and MQTT targets: valid batches made with the codec
 * (as tests/unit/test_codec.c makes them), each also framed as the HTTP and MQTT targets read
 * their input, and a few near misses. Run: make_seeds tests/fuzz/corpus (scripts/fuzz.sh says
 * when). Deterministic: the same codec and zstd give the same files. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include <cistern/codec.h>
#include <cistern/err.h>

#define AGENT "gw-1"
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
 * Content-Type), and for the decoder when DECODE (not when the same bytes are there already). */
static void emit(const char *name, int decode, const uint8_t *batch, size_t len, const char *ct,
                 const char *cn, const char *topic)
{
    uint8_t hdr[600];
    size_t n;

    if (decode)
        put("batch_decode", name, batch, len, NULL, 0);
    n = frame(hdr, ct);
    n += frame(hdr + n, cn != NULL ? cn : "");
    put("http_ingest", name, hdr, n, batch, len);
    n = frame(hdr, topic);
    n += frame(hdr + n, ct);
    put("mqtt_ingest", name, hdr, n, batch, len);
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

int main(int argc, char **argv)
{
    Cistern__V1__LossEntry l1 = CISTERN__V1__LOSS_ENTRY__INIT, l2 = CISTERN__V1__LOSS_ENTRY__INIT;
    const Cistern__V1__LossEntry *losses[2] = {&l1, &l2};
    const char *ct = CIS_BATCH_CONTENT_TYPE;
    uint8_t *b;
    size_t len;

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
    free(b);
    /* Repetitive records: zstd. */
    make(AGENT, 7, 100, 1, 40, 100, NULL, 0, &b, &len);
    emit("zstd-40", 1, b, len, ct, AGENT, TOPIC);
    free(b);
    /* Several segments, priorities and streams, with loss entries. */
    make(AGENT, 8, 1, 3, 5, 60, losses, 2, &b, &len);
    emit("3seg-losses", 1, b, len, CIS_BATCH_CONTENT_TYPE "; charset=binary", AGENT, TOPIC);
    free(b);
    /* Loss entries only: on plain HTTP (no identity), then with no Content-Type at all. */
    make(AGENT, 9, 1, 0, 0, 0, losses, 1, &b, &len);
    emit("losses-only", 1, b, len, ct, NULL, TOPIC);
    emit("losses-only-noct", 0, b, len, NULL, AGENT, TOPIC);
    free(b);
    /* Near misses: another agent's batch (403 / identity), a wrong topic, a wrong type. */
    make("gw-2", 7, 1, 1, 2, 8, NULL, 0, &b, &len);
    emit("other-agent", 1, b, len, ct, AGENT, TOPIC);
    emit("bad-topic", 0, b, len, ct, "gw-2", "cistern/v1/gw-2/bat");
    emit("bad-type", 0, b, len, "application/json", "gw-2", "cistern/v1/gw-2/batch");
    free(b);
    return 0;
}
