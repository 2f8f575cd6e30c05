/* Batch codec: records -> segment blobs (protobuf + zstd) -> batches, and the strict
 * decoder the receiver runs on untrusted bytes. */
#include "cistern/codec.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <zstd.h>

#include "cistern/err.h"

#define AGENT_ID_MAX 128

static int fail(char *why, size_t whylen, int code, const char *msg)
{
    if (why && whylen)
        snprintf(why, whylen, "%s", msg);
    return code;
}

/* ---- segment encoding ----
 *
 * A SegmentBody is written here directly rather than through protobuf-c's generic packer, which
 * walks field descriptors and needs a Record struct (and a pointer to it) per record: at group
 * commit rates that was a third of the spool's CPU. The bytes are the ones protobuf-c writes
 * (tests/unit/test_spool.c compares them), which any protobuf decoder reads:
 *   SegmentBody: per record, field 1 (length-delimited): tag 0x0a, varint length, the Record.
 *   Record (proto3: a field at its default value is left out, fields in number order):
 *     1 seq (0x08 varint), 2 ts_ms (0x10 varint; a negative int64 takes 10 bytes),
 *     3 stream (0x1a), 4 content_type (0x22), 5 payload (0x2a): length-delimited. */

struct cis_seg_encoder {
    int level;
    ZSTD_CCtx *cctx; /* reused: a new one per segment allocated and cleared ~1 MiB each time */
    uint8_t *raw, *z; /* the serialized body, and the compressed frame */
    size_t rawcap, zcap;
};

/* Bytes of V as a varint: 7 bits per byte, ceil(bits / 7) without a loop. */
static size_t pb_varint_len(uint64_t v)
{
    unsigned bits = 64 - (unsigned)__builtin_clzll(v | 1);
    return (bits * 9 + 64) / 64;
}

static uint8_t *pb_put_varint(uint8_t *p, uint64_t v)
{
    while (v >= 0x80) {
        *p++ = (uint8_t)(v | 0x80);
        v >>= 7;
    }
    *p++ = (uint8_t)v;
    return p;
}

static uint8_t *pb_put_bytes(uint8_t *p, uint8_t tag, const void *b, size_t len)
{
    *p++ = tag;
    p = pb_put_varint(p, len);
    memcpy(p, b, len);
    return p + len;
}

/* Grow *BUF (of *CAP bytes) to hold at least NEED. Returns 0 or CIS_ENOMEM (*BUF unchanged). */
static int grow(uint8_t **buf, size_t *cap, size_t need)
{
    if (need <= *cap)
        return CIS_OK;
    size_t c = *cap ? *cap : 4096;
    while (c < need)
        c = c > SIZE_MAX / 2 ? need : c * 2;
    uint8_t *p = realloc(*buf, c);
    if (!p)
        return CIS_ENOMEM;
    *buf = p;
    *cap = c;
    return CIS_OK;
}

int cis_seg_encoder_create(int level, struct cis_seg_encoder **out)
{
    struct cis_seg_encoder *e = calloc(1, sizeof(*e));
    *out = NULL;
    if (!e)
        return CIS_ENOMEM;
    e->level = level;
    e->cctx = ZSTD_createCCtx();
    if (!e->cctx) {
        free(e);
        return CIS_ENOMEM;
    }
    *out = e;
    return CIS_OK;
}

void cis_seg_encoder_trim(struct cis_seg_encoder *e)
{
    if (!e)
        return;
    ZSTD_freeCCtx(e->cctx);
    free(e->raw);
    free(e->z);
    e->cctx = NULL;
    e->raw = e->z = NULL;
    e->rawcap = e->zcap = 0;
}

void cis_seg_encoder_destroy(struct cis_seg_encoder *e)
{
    cis_seg_encoder_trim(e); /* its context and buffers; NULL is fine */
    free(e);
}

/* Serialize the SegmentBody of N records into E->raw; *LEN its size. */
static int encode_body(struct cis_seg_encoder *e, const struct cis_record *recs, size_t n,
                       size_t *len)
{
    /* Records of one source share their stream and content type strings: measure each string
     * once per run of the same pointer. */
    const char *last_stream = NULL, *last_ct = NULL;
    size_t slen = 0, ctlen = 0, at = 0;
    for (size_t i = 0; i < n; i++) {
        const struct cis_record *r = &recs[i];
        const char *st = r->stream ? r->stream : "";
        const char *ct = r->content_type ? r->content_type : "";
        if (st != last_stream) {
            last_stream = st;
            slen = strlen(st);
        }
        if (ct != last_ct) {
            last_ct = ct;
            ctlen = strlen(ct);
        }
        const uint64_t ts = (uint64_t)r->ts_ms;
        size_t rl = 0;
        if (r->seq)
            rl += 1 + pb_varint_len(r->seq);
        if (ts)
            rl += 1 + pb_varint_len(ts);
        if (slen)
            rl += 1 + pb_varint_len(slen) + slen;
        if (ctlen)
            rl += 1 + pb_varint_len(ctlen) + ctlen;
        if (r->payload_len)
            rl += 1 + pb_varint_len(r->payload_len) + r->payload_len;
        /* tag, length, record: the length takes at most 10 bytes */
        if (rl > SIZE_MAX - 11 - at || grow(&e->raw, &e->rawcap, at + 11 + rl))
            return CIS_ENOMEM;
        uint8_t *p = e->raw + at;
        *p++ = 0x0a;
        p = pb_put_varint(p, rl);
        if (r->seq) {
            *p++ = 0x08;
            p = pb_put_varint(p, r->seq);
        }
        if (ts) {
            *p++ = 0x10;
            p = pb_put_varint(p, ts);
        }
        if (slen)
            p = pb_put_bytes(p, 0x1a, st, slen);
        if (ctlen)
            p = pb_put_bytes(p, 0x22, ct, ctlen);
        if (r->payload_len)
            p = pb_put_bytes(p, 0x2a, r->payload, r->payload_len);
        at = (size_t)(p - e->raw);
    }
    *len = at;
    return CIS_OK;
}

int cis_seg_encoder_encode(struct cis_seg_encoder *e, const struct cis_record *recs, size_t n,
                           uint32_t priority, struct cis_segment *seg, uint8_t **data,
                           size_t *data_len)
{
    size_t raw_len = 0;
    *data = NULL;
    *data_len = 0;
    if (n == 0 || n > UINT32_MAX)
        return CIS_EINVAL;
    for (size_t i = 1; i < n; i++)
        if (recs[i].seq != recs[0].seq + i)
            return CIS_EINVAL;
    int rc = encode_body(e, recs, n, &raw_len);
    if (rc)
        return rc;

    seg->first_seq = recs[0].seq;
    seg->last_seq = recs[n - 1].seq;
    seg->record_count = (uint32_t)n;
    seg->priority = priority;
    seg->raw_size = raw_len;
    seg->data = NULL;
    seg->data_len = 0;

    if (grow(&e->z, &e->zcap, ZSTD_compressBound(raw_len)))
        return CIS_ENOMEM;
    /* Same frame as ZSTD_compress() (which makes a context for the one call). */
    if (!e->cctx && !(e->cctx = ZSTD_createCCtx())) /* given back by cis_seg_encoder_trim */
        return CIS_ENOMEM;
    size_t zlen = ZSTD_compressCCtx(e->cctx, e->z, e->zcap, e->raw, raw_len, e->level);
    const uint8_t *src = e->raw;
    size_t len = raw_len;
    if (!ZSTD_isError(zlen) && zlen < raw_len) {
        seg->compression = CISTERN__V1__COMPRESSION__COMPRESSION_ZSTD;
        src = e->z;
        len = zlen;
    } else {
        seg->compression = CISTERN__V1__COMPRESSION__COMPRESSION_NONE;
    }
    /* The caller's copy is exactly the blob: the scratch buffers stay for the next segment. */
    uint8_t *out = malloc(len ? len : 1);
    if (!out)
        return CIS_ENOMEM;
    memcpy(out, src, len);
    *data = out;
    *data_len = len;
    return CIS_OK;
}

int cis_segment_encode(const struct cis_record *recs, size_t n, uint32_t priority, int level,
                       struct cis_segment *seg, uint8_t **data, size_t *data_len)
{
    struct cis_seg_encoder *e = NULL;
    *data = NULL;
    *data_len = 0;
    if (n == 0 || n > UINT32_MAX)
        return CIS_EINVAL;
    int rc = cis_seg_encoder_create(level, &e);
    if (rc == CIS_OK)
        rc = cis_seg_encoder_encode(e, recs, n, priority, seg, data, data_len);
    cis_seg_encoder_destroy(e);
    return rc;
}

int cis_batch_encode(const struct cis_batch_meta *meta, const struct cis_segment *segs,
                     size_t nseg, uint8_t **out, size_t *out_len)
{
    Cistern__V1__Batch batch = CISTERN__V1__BATCH__INIT;
    Cistern__V1__BatchHeader hdr = CISTERN__V1__BATCH_HEADER__INIT;
    Cistern__V1__Segment *sv = NULL, **sp = NULL;
    uint8_t *buf = NULL;
    size_t len;
    uint64_t count = 0;
    int rc = CIS_ENOMEM;

    *out = NULL;
    *out_len = 0;
    if (nseg) {
        sv = calloc(nseg, sizeof(*sv));
        sp = calloc(nseg, sizeof(*sp));
        if (!sv || !sp)
            goto out;
    }
    hdr.agent_id = (char *)meta->agent_id;
    hdr.epoch = meta->epoch;
    for (size_t i = 0; i < nseg; i++) {
        Cistern__V1__Segment s = CISTERN__V1__SEGMENT__INIT;
        s.first_seq = segs[i].first_seq;
        s.last_seq = segs[i].last_seq;
        s.record_count = segs[i].record_count;
        s.priority = segs[i].priority;
        s.compression = segs[i].compression;
        s.raw_size = segs[i].raw_size;
        s.data.data = (uint8_t *)segs[i].data;
        s.data.len = segs[i].data_len;
        sv[i] = s;
        sp[i] = &sv[i];
        count += segs[i].record_count;
        if (i == 0 || segs[i].first_seq < hdr.first_seq)
            hdr.first_seq = segs[i].first_seq;
        if (i == 0 || segs[i].last_seq > hdr.last_seq)
            hdr.last_seq = segs[i].last_seq;
    }
    if (count > UINT32_MAX) {
        rc = CIS_ETOOBIG;
        goto out;
    }
    hdr.record_count = (uint32_t)count;
    hdr.created_ms = meta->created_ms;
    hdr.spool_depth = meta->spool_depth;
    hdr.oldest_pending_ms = meta->oldest_pending_ms;
    hdr.n_losses = meta->nlosses;
    hdr.losses = (Cistern__V1__LossEntry **)meta->losses;
    batch.header = &hdr;
    batch.n_segments = nseg;
    batch.segments = sp;

    len = cistern__v1__batch__get_packed_size(&batch);
    buf = malloc(len ? len : 1);
    if (!buf)
        goto out;
    cistern__v1__batch__pack(&batch, buf);
    *out = buf;
    *out_len = len;
    rc = CIS_OK;
out:
    free(sp);
    free(sv);
    return rc;
}

int cis_agent_id_char_ok(int c)
{
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
           c == '-' || c == '_' || c == '.' || c == ':' || c == '@';
}

static int agent_id_ok(const char *id)
{
    size_t n = id ? strlen(id) : 0;
    if (n == 0 || n > AGENT_ID_MAX)
        return 0;
    for (size_t i = 0; i < n; i++) {
        if (!cis_agent_id_char_ok((unsigned char)id[i]))
            return 0;
    }
    return 1;
}

static int known_reason(const char *r)
{
    static const char *const reasons[] = {"evicted_full", "expired_ttl", "rejected",
                                          "corrupt_spool", "tampered", NULL};
    for (size_t i = 0; r && reasons[i]; i++)
        if (strcmp(r, reasons[i]) == 0)
            return 1;
    return 0;
}

/* Validate a segment's header fields (no decompression). */
static int segment_header_ok(const Cistern__V1__Segment *s, char *why, size_t whylen)
{
    if (s->first_seq == 0 || s->last_seq < s->first_seq)
        return fail(why, whylen, CIS_EDECODE, "segment seq range is invalid");
    if (s->record_count == 0 || s->last_seq - s->first_seq + 1 != s->record_count)
        return fail(why, whylen, CIS_EDECODE, "segment record_count does not match its seq range");
    if (s->compression != CISTERN__V1__COMPRESSION__COMPRESSION_NONE &&
        s->compression != CISTERN__V1__COMPRESSION__COMPRESSION_ZSTD)
        return fail(why, whylen, CIS_EDECODE, "segment compression is unknown");
    if (s->compression == CISTERN__V1__COMPRESSION__COMPRESSION_NONE && s->data.len != s->raw_size)
        return fail(why, whylen, CIS_EDECODE, "segment raw_size does not match its data");
    return CIS_OK;
}

/* A bump allocator for what cis_batch_decode unpacks: a batch of 5,000 records is about
 * 20,000 small protobuf-c allocations (record, stream, content type, payload), and the
 * receiver frees them all at once. Chunks are chained; a free of one object does nothing. */
struct cis_arena {
    struct cis_arena *next;
    size_t used, cap;
    max_align_t data[];
};

#define ARENA_CHUNK (256u << 10)

static void *arena_alloc(void *ctx, size_t size)
{
    struct cis_arena **head = ctx, *a = *head;
    size_t need = (size + sizeof(max_align_t) - 1) & ~(sizeof(max_align_t) - 1);
    if (need < size)
        return NULL;
    if (!a || a->cap - a->used < need) {
        size_t cap = need > ARENA_CHUNK ? need : ARENA_CHUNK;
        a = malloc(sizeof(*a) + cap);
        if (!a)
            return NULL;
        a->used = 0;
        a->cap = cap;
        a->next = *head;
        *head = a;
    }
    a->used += need;
    return (char *)a->data + a->used - need;
}

static void arena_free(void *ctx, void *p)
{
    (void)ctx;
    (void)p; /* the whole arena goes in cis_batch_free */
}

static void arena_release(struct cis_arena *a)
{
    while (a) {
        struct cis_arena *next = a->next;
        free(a);
        a = next;
    }
}

static int segment_decode(const struct cis_segment *seg, size_t max_raw,
                          ProtobufCAllocator *alloc, Cistern__V1__SegmentBody **body, char *why,
                          size_t whylen);

int cis_segment_decode(const struct cis_segment *seg, size_t max_raw, Cistern__V1__SegmentBody **body,
                       char *why, size_t whylen)
{
    return segment_decode(seg, max_raw, NULL, body, why, whylen);
}

static int segment_decode(const struct cis_segment *seg, size_t max_raw,
                          ProtobufCAllocator *alloc, Cistern__V1__SegmentBody **body, char *why,
                          size_t whylen)
{
    Cistern__V1__SegmentBody *b = NULL;
    uint8_t *raw = NULL;
    const uint8_t *src = seg->data;
    size_t raw_len = seg->data_len;
    int rc;

    *body = NULL;
    if (seg->raw_size > max_raw)
        return fail(why, whylen, CIS_ETOOBIG, "segment decompressed size exceeds the limit");
    if (seg->compression == CISTERN__V1__COMPRESSION__COMPRESSION_ZSTD) {
        unsigned long long fcs = ZSTD_getFrameContentSize(seg->data, seg->data_len);
        size_t got;
        /* Check the frame's own declared size before allocating or decompressing. */
        if (fcs == ZSTD_CONTENTSIZE_ERROR)
            return fail(why, whylen, CIS_EDECODE, "segment is not a zstd frame");
        if (fcs != ZSTD_CONTENTSIZE_UNKNOWN && fcs != seg->raw_size)
            return fail(why, whylen, CIS_EDECODE, "segment raw_size does not match its zstd frame");
        raw = malloc(seg->raw_size ? seg->raw_size : 1);
        if (!raw)
            return CIS_ENOMEM;
        got = ZSTD_decompress(raw, seg->raw_size, seg->data, seg->data_len);
        if (ZSTD_isError(got) || got != seg->raw_size) {
            free(raw);
            return fail(why, whylen, CIS_EDECODE, "segment does not decompress to raw_size bytes");
        }
        src = raw;
        raw_len = got;
    } else if (seg->compression != CISTERN__V1__COMPRESSION__COMPRESSION_NONE) {
        return fail(why, whylen, CIS_EDECODE, "segment compression is unknown");
    } else if (seg->data_len != seg->raw_size) {
        return fail(why, whylen, CIS_EDECODE, "segment raw_size does not match its data");
    }
    b = cistern__v1__segment_body__unpack(alloc, raw_len, src);
    free(raw);
    if (!b)
        return fail(why, whylen, CIS_EDECODE, "segment body is not valid protobuf");
    if (b->n_records != seg->record_count) {
        rc = fail(why, whylen, CIS_EDECODE, "segment holds a different number of records than declared");
        goto bad;
    }
    for (size_t i = 0; i < b->n_records; i++) {
        if (b->records[i]->seq != seg->first_seq + i) {
            rc = fail(why, whylen, CIS_EDECODE, "segment records are not its seq range in order");
            goto bad;
        }
    }
    *body = b;
    return CIS_OK;
bad:
    cistern__v1__segment_body__free_unpacked(b, alloc);
    return rc;
}

static int cmp_seg_first(const void *a, const void *b)
{
    const Cistern__V1__Segment *x = *(Cistern__V1__Segment *const *)a;
    const Cistern__V1__Segment *y = *(Cistern__V1__Segment *const *)b;
    return x->first_seq < y->first_seq ? -1 : x->first_seq > y->first_seq;
}

int cis_batch_decode(const uint8_t *buf, size_t len, const struct cis_decode_limits *limits,
                     struct cis_decoded_batch *out, char *why, size_t whylen)
{
    Cistern__V1__Batch *pb = NULL;
    const Cistern__V1__BatchHeader *h;
    Cistern__V1__Segment **sorted = NULL;
    uint64_t total_raw = 0, total_records = 0;
    ProtobufCAllocator alloc = {.alloc = arena_alloc, .free = arena_free};
    int rc;

    memset(out, 0, sizeof(*out));
    alloc.allocator_data = &out->arena;
    pb = cistern__v1__batch__unpack(&alloc, len, buf);
    if (!pb) {
        arena_release(out->arena);
        out->arena = NULL;
        return fail(why, whylen, CIS_EDECODE, "body is not a valid protobuf batch");
    }
    h = pb->header;
    if (!h) {
        rc = fail(why, whylen, CIS_EDECODE, "batch has no header");
        goto bad;
    }
    if (!agent_id_ok(h->agent_id)) {
        rc = fail(why, whylen, CIS_EDECODE, "agent_id is empty, too long or has characters outside [A-Za-z0-9._:@-]");
        goto bad;
    }
    if (h->epoch == 0 || h->epoch > (uint64_t)INT64_MAX) {
        rc = fail(why, whylen, CIS_EDECODE, "epoch must be between 1 and 2^63-1");
        goto bad;
    }
    if (pb->n_segments == 0 && h->n_losses == 0) {
        rc = fail(why, whylen, CIS_EDECODE, "batch has neither segments nor loss entries");
        goto bad;
    }
    for (size_t i = 0; i < h->n_losses; i++) {
        const Cistern__V1__LossEntry *l = h->losses[i];
        if (!known_reason(l->reason) || l->last_seq < l->first_seq) {
            rc = fail(why, whylen, CIS_EDECODE, "loss entry has an unknown reason or a bad seq range");
            goto bad;
        }
    }
    /* Limits first, from declared sizes, before any decompression. */
    for (size_t i = 0; i < pb->n_segments; i++) {
        const Cistern__V1__Segment *s = pb->segments[i];
        rc = segment_header_ok(s, why, whylen);
        if (rc)
            goto bad;
        total_raw += s->raw_size;
        total_records += s->record_count;
        if (total_raw > limits->max_decompressed) {
            rc = fail(why, whylen, CIS_ETOOBIG, "decompressed size of the batch exceeds the limit");
            goto bad;
        }
        if (total_records > limits->max_records) {
            rc = fail(why, whylen, CIS_ETOOBIG, "too many records in the batch");
            goto bad;
        }
    }
    if (h->record_count != total_records) {
        rc = fail(why, whylen, CIS_EDECODE, "header record_count does not match the segments");
        goto bad;
    }
    if (pb->n_segments) {
        sorted = malloc(pb->n_segments * sizeof(*sorted));
        if (!sorted) {
            rc = CIS_ENOMEM;
            goto bad;
        }
        memcpy(sorted, pb->segments, pb->n_segments * sizeof(*sorted));
        qsort(sorted, pb->n_segments, sizeof(*sorted), cmp_seg_first);
        for (size_t i = 1; i < pb->n_segments; i++) {
            if (sorted[i]->first_seq <= sorted[i - 1]->last_seq) {
                rc = fail(why, whylen, CIS_EDECODE, "segments overlap");
                goto bad;
            }
        }
        if (h->first_seq != sorted[0]->first_seq ||
            h->last_seq != sorted[pb->n_segments - 1]->last_seq) {
            rc = fail(why, whylen, CIS_EDECODE, "header seq range does not match the segments");
            goto bad;
        }
        free(sorted);
        sorted = NULL;
    }

    out->segs = calloc(pb->n_segments ? pb->n_segments : 1, sizeof(*out->segs));
    if (!out->segs) {
        rc = CIS_ENOMEM;
        goto bad;
    }
    out->pb = pb;
    for (size_t i = 0; i < pb->n_segments; i++) {
        const Cistern__V1__Segment *s = pb->segments[i];
        struct cis_segment view = {
            .first_seq = s->first_seq,
            .last_seq = s->last_seq,
            .record_count = s->record_count,
            .priority = s->priority,
            .compression = s->compression,
            .raw_size = s->raw_size,
            .data = s->data.data,
            .data_len = s->data.len,
        };
        out->segs[i].seg = s;
        rc = segment_decode(&view, limits->max_decompressed, &alloc, &out->segs[i].body, why,
                            whylen);
        if (rc)
            goto bad_out;
        out->nsegs = i + 1;
    }
    out->nrecords = total_records;
    return CIS_OK;
bad_out:
    cis_batch_free(out);
    return rc;
bad:
    free(sorted);
    arena_release(out->arena);
    memset(out, 0, sizeof(*out));
    return rc;
}

void cis_batch_free(struct cis_decoded_batch *b)
{
    if (!b)
        return;
    /* pb and the bodies live in the arena: nothing to free one by one. */
    free(b->segs);
    arena_release(b->arena);
    memset(b, 0, sizeof(*b));
}
