/* Unit tests for the batch codec: round trips, compression choice, and malformed input. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <zstd.h>
#include <string.h>

#include <cmocka.h>

#include "cistern/codec.h"
#include "cistern/err.h"

static const struct cis_decode_limits big = {.max_decompressed = 64 << 20, .max_records = 100000};

/* Make N records starting at FIRST; payloads are "rec-<seq>" (or random bytes if RANDOM). */
static struct cis_record *make_records(uint64_t first, size_t n, int random_payload, uint8_t **store)
{
    struct cis_record *r = calloc(n, sizeof(*r));
    *store = calloc(n, 64);
    for (size_t i = 0; i < n; i++) {
        uint8_t *p = *store + i * 64;
        size_t len;
        if (random_payload) {
            for (size_t j = 0; j < 64; j++)
                p[j] = (uint8_t)rand();
            len = 64;
        } else {
            len = (size_t)snprintf((char *)p, 64, "rec-%llu", (unsigned long long)(first + i));
        }
        r[i] = (struct cis_record){.seq = first + i, .ts_ms = 1000 + (int64_t)i, .stream = "s",
                                   .content_type = "text/plain", .payload = p, .payload_len = len};
    }
    return r;
}

static void encode_batch(uint64_t first, size_t n, int random_payload, uint8_t **out, size_t *out_len)
{
    uint8_t *store, *data;
    size_t data_len;
    struct cis_segment seg;
    struct cis_record *r = make_records(first, n, random_payload, &store);
    struct cis_batch_meta meta = {.agent_id = "gw-1", .epoch = 42, .created_ms = 5};

    assert_int_equal(cis_segment_encode(r, n, CIS_PRIO_NORMAL, 3, &seg, &data, &data_len), CIS_OK);
    seg.data = data;
    seg.data_len = data_len;
    assert_int_equal(cis_batch_encode(&meta, &seg, 1, out, out_len), CIS_OK);
    free(data);
    free(store);
    free(r);
}

static void round_trip(void **state)
{
    uint8_t *buf;
    size_t len;
    struct cis_decoded_batch b;
    char why[128];

    encode_batch(10, 500, 0, &buf, &len);
    assert_int_equal(cis_batch_decode(buf, len, &big, &b, why, sizeof(why)), CIS_OK);
    assert_string_equal(b.pb->header->agent_id, "gw-1");
    assert_int_equal(b.pb->header->epoch, 42);
    assert_int_equal(b.pb->header->first_seq, 10);
    assert_int_equal(b.pb->header->last_seq, 509);
    assert_int_equal(b.nsegs, 1);
    assert_int_equal(b.nrecords, 500);
    /* Repetitive payloads compress, so the segment went out as zstd. */
    assert_int_equal(b.segs[0].seg->compression, CISTERN__V1__COMPRESSION__COMPRESSION_ZSTD);
    for (size_t i = 0; i < 500; i++) {
        char want[32];
        Cistern__V1__Record *r = b.segs[0].body->records[i];
        snprintf(want, sizeof(want), "rec-%zu", 10 + i);
        assert_int_equal(r->seq, 10 + i);
        assert_int_equal(r->payload.len, strlen(want));
        assert_memory_equal(r->payload.data, want, strlen(want));
        assert_string_equal(r->stream, "s");
    }
    cis_batch_free(&b);
    cis_batch_free(&b); /* idempotent on a zeroed struct */
    free(buf);
}

static void incompressible_stays_raw(void **state)
{
    uint8_t *store, *data;
    size_t data_len;
    struct cis_segment seg;
    struct cis_record *r = make_records(1, 1, 1, &store);
    Cistern__V1__SegmentBody *body;

    assert_int_equal(cis_segment_encode(r, 1, CIS_PRIO_HIGH, 3, &seg, &data, &data_len), CIS_OK);
    assert_int_equal(seg.compression, CISTERN__V1__COMPRESSION__COMPRESSION_NONE);
    assert_int_equal(seg.raw_size, data_len);
    seg.data = data;
    seg.data_len = data_len;
    assert_int_equal(cis_segment_decode(&seg, 1 << 20, &body, NULL, 0), CIS_OK);
    assert_memory_equal(body->records[0]->payload.data, store, 64);
    cistern__v1__segment_body__free_unpacked(body, NULL);
    free(data);
    free(store);
    free(r);
}

static void non_contiguous_rejected(void **state)
{
    uint8_t *store, *data;
    size_t data_len;
    struct cis_segment seg;
    struct cis_record *r = make_records(1, 3, 0, &store);
    r[2].seq = 7;
    assert_int_equal(cis_segment_encode(r, 3, 1, 3, &seg, &data, &data_len), CIS_EINVAL);
    assert_null(data);
    free(store);
    free(r);
}

static void garbage_and_truncation(void **state)
{
    uint8_t *buf;
    size_t len;
    struct cis_decoded_batch b;
    char why[128];
    static const uint8_t junk[] = "this is not protobuf \xff\xff\xff\xff";

    assert_int_equal(cis_batch_decode(junk, sizeof(junk), &big, &b, why, sizeof(why)), CIS_EDECODE);
    encode_batch(1, 100, 0, &buf, &len);
    /* Every truncation must fail cleanly, never crash or succeed with partial data. */
    for (size_t cut = 0; cut < len; cut++)
        assert_int_not_equal(cis_batch_decode(buf, cut, &big, &b, why, sizeof(why)), CIS_OK);
    /* Flip each byte of the body: decode either fails, or yields a fully valid batch. */
    for (size_t i = 0; i < len; i++) {
        buf[i] ^= 0x5a;
        if (cis_batch_decode(buf, len, &big, &b, why, sizeof(why)) == CIS_OK) {
            assert_int_equal(b.nrecords, b.pb->header->record_count);
            cis_batch_free(&b);
        }
        buf[i] ^= 0x5a;
    }
    free(buf);
}

static void limits_enforced(void **state)
{
    uint8_t *buf;
    size_t len;
    struct cis_decoded_batch b;
    char why[128];
    struct cis_decode_limits small = {.max_decompressed = 100, .max_records = 100000};
    struct cis_decode_limits few = {.max_decompressed = 1 << 20, .max_records = 10};

    encode_batch(1, 100, 0, &buf, &len);
    assert_int_equal(cis_batch_decode(buf, len, &small, &b, why, sizeof(why)), CIS_ETOOBIG);
    assert_non_null(strstr(why, "decompressed"));
    assert_int_equal(cis_batch_decode(buf, len, &few, &b, why, sizeof(why)), CIS_ETOOBIG);
    assert_non_null(strstr(why, "records"));
    free(buf);
}

/* Hand-build a batch to hit each header check. */
static int decode_custom(const char *agent, uint64_t epoch, uint32_t count_delta, char *why)
{
    uint8_t *store, *data, *buf;
    size_t data_len, len;
    struct cis_segment seg;
    struct cis_decoded_batch b;
    struct cis_record *r = make_records(5, 4, 0, &store);
    int rc;

    assert_int_equal(cis_segment_encode(r, 4, 1, 3, &seg, &data, &data_len), CIS_OK);
    seg.data = data;
    seg.data_len = data_len;
    seg.record_count += count_delta;
    seg.last_seq += count_delta;
    struct cis_batch_meta meta = {.agent_id = agent, .epoch = epoch};
    assert_int_equal(cis_batch_encode(&meta, &seg, 1, &buf, &len), CIS_OK);
    rc = cis_batch_decode(buf, len, &big, &b, why, 128);
    if (rc == CIS_OK)
        cis_batch_free(&b);
    free(buf);
    free(data);
    free(store);
    free(r);
    return rc;
}

static void header_checks(void **state)
{
    char why[128];
    assert_int_equal(decode_custom("gw-1", 7, 0, why), CIS_OK);
    assert_int_equal(decode_custom("", 7, 0, why), CIS_EDECODE);
    assert_int_equal(decode_custom("gw/1", 7, 0, why), CIS_EDECODE);
    assert_int_equal(decode_custom("gw-1", 0, 0, why), CIS_EDECODE);
    assert_int_equal(decode_custom("gw-1", UINT64_C(1) << 63, 0, why), CIS_EDECODE);
    /* A segment that claims more records than it holds. */
    assert_int_equal(decode_custom("gw-1", 7, 1, why), CIS_EDECODE);
    assert_non_null(strstr(why, "different number"));
}

static void zip_bomb_declared_small(void **state)
{
    /* A zstd frame whose content is far larger than the declared raw_size is refused
     * before it is decompressed into a buffer of the declared size. */
    size_t big_len = 1 << 20, zcap;
    uint8_t *zeros = calloc(1, big_len), *buf;
    size_t len;
    struct cis_decoded_batch b;
    char why[128];
    struct cis_segment seg = {.first_seq = 1, .last_seq = 1, .record_count = 1,
                              .compression = CISTERN__V1__COMPRESSION__COMPRESSION_ZSTD,
                              .raw_size = 16};
    zcap = ZSTD_compressBound(big_len);
    uint8_t *z = malloc(zcap);
    seg.data_len = ZSTD_compress(z, zcap, zeros, big_len, 1);
    seg.data = z;
    struct cis_batch_meta meta = {.agent_id = "gw-1", .epoch = 1};
    assert_int_equal(cis_batch_encode(&meta, &seg, 1, &buf, &len), CIS_OK);
    assert_int_equal(cis_batch_decode(buf, len, &big, &b, why, sizeof(why)), CIS_EDECODE);
    free(buf);
    free(z);
    free(zeros);
}

static void loss_only_batch(void **state)
{
    Cistern__V1__LossEntry e = CISTERN__V1__LOSS_ENTRY__INIT;
    const Cistern__V1__LossEntry *ep[1] = {&e};
    struct cis_batch_meta meta = {.agent_id = "gw-1", .epoch = 3, .losses = ep, .nlosses = 1};
    struct cis_decoded_batch b;
    uint8_t *buf;
    size_t len;
    char why[128];

    e.reason = "rejected";
    e.first_seq = 4;
    e.last_seq = 9;
    e.count = 6;
    assert_int_equal(cis_batch_encode(&meta, NULL, 0, &buf, &len), CIS_OK);
    assert_int_equal(cis_batch_decode(buf, len, &big, &b, why, sizeof(why)), CIS_OK);
    assert_int_equal(b.pb->header->n_losses, 1);
    assert_string_equal(b.pb->header->losses[0]->reason, "rejected");
    cis_batch_free(&b);
    free(buf);
    e.reason = "because";
    assert_int_equal(cis_batch_encode(&meta, NULL, 0, &buf, &len), CIS_OK);
    assert_int_equal(cis_batch_decode(buf, len, &big, &b, why, sizeof(why)), CIS_EDECODE);
    free(buf);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(round_trip),
        cmocka_unit_test(incompressible_stays_raw),
        cmocka_unit_test(non_contiguous_rejected),
        cmocka_unit_test(garbage_and_truncation),
        cmocka_unit_test(limits_enforced),
        cmocka_unit_test(header_checks),
        cmocka_unit_test(zip_bomb_declared_small),
        cmocka_unit_test(loss_only_batch),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
