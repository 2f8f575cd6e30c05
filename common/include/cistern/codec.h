/* Batch codec: records -> segment blobs (protobuf + zstd) -> batches, and the strict decoder
 * the receiver runs on untrusted bytes. Encoding is kept apart from sending so tests can
 * check the bytes without a network. */
#ifndef CISTERN_CODEC_H
#define CISTERN_CODEC_H

#include <stddef.h>
#include <stdint.h>

#include "cistern.pb-c.h"

#define CIS_BATCH_CONTENT_TYPE "application/vnd.cistern.batch.v1+protobuf"

enum cis_priority { CIS_PRIO_HIGH = 0, CIS_PRIO_NORMAL = 1, CIS_PRIO_LOW = 2, CIS_PRIO_COUNT = 3 };

/* One record, borrowed views (nothing here is owned). */
struct cis_record {
    uint64_t seq;
    int64_t ts_ms;
    const char *stream;       /* NUL-terminated */
    const char *content_type; /* NUL-terminated or NULL */
    const uint8_t *payload;
    size_t payload_len;
};

/* A segment as stored in the spool and sent on the wire. */
struct cis_segment {
    uint64_t first_seq, last_seq; /* inclusive, contiguous */
    uint32_t record_count;
    uint32_t priority;
    int compression;              /* CISTERN__V1__COMPRESSION__COMPRESSION_NONE / _ZSTD */
    uint64_t raw_size;            /* serialized SegmentBody size */
    const uint8_t *data;          /* borrowed */
    size_t data_len;
};

/* Encode N records (seqs must be contiguous, ascending) into a segment blob.
 * Compresses with zstd at LEVEL when that is smaller. On success *DATA is malloc'd
 * (caller frees) and SEG's fields other than data/data_len are filled. Returns 0, CIS_EINVAL
 * (N is 0 or seqs not contiguous) or CIS_ENOMEM. */
int cis_segment_encode(const struct cis_record *recs, size_t n, uint32_t priority, int level,
                       struct cis_segment *seg, uint8_t **data, size_t *data_len);

/* A segment encoder for many segments in a row (the spool's group commits): it keeps its zstd
 * context and buffers from one segment to the next, so an encode allocates only the blob it
 * returns. The bytes are those of cis_segment_encode(). One thread at a time. */
struct cis_seg_encoder;

/* Make an encoder that compresses at zstd LEVEL. Returns 0 or CIS_ENOMEM; *OUT is freed with
 * cis_seg_encoder_destroy(). */
int cis_seg_encoder_create(int level, struct cis_seg_encoder **out);

/* Free E (and its buffers). Accepts NULL. */
void cis_seg_encoder_destroy(struct cis_seg_encoder *e);

/* Give back E's zstd context and buffers (a few MiB after 1 MiB commits) until the next
 * encode, which makes them again. For an agent gone idle. */
void cis_seg_encoder_trim(struct cis_seg_encoder *e);

/* As cis_segment_encode(), with E's level. *DATA is malloc'd (caller frees). */
int cis_seg_encoder_encode(struct cis_seg_encoder *e, const struct cis_record *recs, size_t n,
                           uint32_t priority, struct cis_segment *seg, uint8_t **data,
                           size_t *data_len);

struct cis_batch_meta {
    const char *agent_id;
    uint64_t epoch;
    int64_t created_ms;
    uint64_t spool_depth;
    int64_t oldest_pending_ms;
    const Cistern__V1__LossEntry *const *losses; /* borrowed, may be NULL */
    size_t nlosses;
};

/* Serialize a batch of NSEG segments (borrowed). *OUT is malloc'd, caller frees. */
int cis_batch_encode(const struct cis_batch_meta *meta, const struct cis_segment *segs,
                     size_t nseg, uint8_t **out, size_t *out_len);

struct cis_decode_limits {
    size_t max_decompressed; /* total serialized SegmentBody bytes in one batch */
    size_t max_records;      /* records in one batch */
};

/* A decoded, validated batch. Owns everything below it. */
struct cis_decoded_segment {
    const Cistern__V1__Segment *seg;
    Cistern__V1__SegmentBody *body;
};
struct cis_decoded_batch {
    Cistern__V1__Batch *pb;
    struct cis_decoded_segment *segs;
    size_t nsegs;
    size_t nrecords;
    struct cis_arena *arena; /* holds pb and every body: freed whole by cis_batch_free */
};

/* 1 when C may appear in an agent id (A-Z a-z 0-9 . _ : @ -), the rule the decoder applies.
 * The id also becomes an MQTT topic level and a certificate's CN: none of these characters
 * has a meaning there. */
int cis_agent_id_char_ok(int c);

/* Decode untrusted bytes. Checks: header present, agent_id non-empty and printable,
 * epoch non-zero, every segment's seq range consistent with its record count, records in
 * each segment exactly first_seq..last_seq in order, declared raw sizes and actual
 * decompressed sizes within LIMITS (checked before decompressing), record count within
 * LIMITS. Returns 0, CIS_EDECODE (malformed), or CIS_ETOOBIG (a limit), with a short
 * reason in WHY. On success the caller frees OUT with cis_batch_free(). */
int cis_batch_decode(const uint8_t *buf, size_t len, const struct cis_decode_limits *limits,
                     struct cis_decoded_batch *out, char *why, size_t whylen);

/* Free what cis_batch_decode() made. Accepts a zeroed struct. */
void cis_batch_free(struct cis_decoded_batch *b);

/* Decode one segment blob as stored (used by tools and tests). Caller frees *BODY with
 * cistern__v1__segment_body__free_unpacked(*body, NULL). */
int cis_segment_decode(const struct cis_segment *seg, size_t max_raw, Cistern__V1__SegmentBody **body,
                       char *why, size_t whylen);

#endif
