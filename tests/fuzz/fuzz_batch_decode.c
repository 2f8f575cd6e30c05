/* libFuzzer target: the batch decoder (protobuf, segment headers, zstd, segment bodies) on
 * untrusted bytes, then the receiver's range check on what it accepts. Input: a batch as sent. */
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <cistern/codec.h>
#include <cistern/err.h>

#include "store/store.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static const struct cis_decode_limits limits = {.max_decompressed = 4 << 20,
                                                    .max_records = 10000};
    struct cis_decoded_batch b;
    char why[256];
    volatile size_t sink = 0;

    if (cis_batch_decode(data, size, &limits, &b, why, sizeof why) != CIS_OK)
        return 0;
    (void)recv_batch_check(&b, why, sizeof why);
    /* Touch every decoded byte, so that a view past its buffer shows up under ASan. */
    for (size_t i = 0; i < b.nsegs; i++) {
        const Cistern__V1__SegmentBody *body = b.segs[i].body;
        for (size_t j = 0; j < body->n_records; j++) {
            const Cistern__V1__Record *r = body->records[j];
            sink += strlen(r->stream) + strlen(r->content_type);
            for (size_t k = 0; k < r->payload.len; k++)
                sink += r->payload.data[k];
        }
    }
    (void)sink;
    cis_batch_free(&b);
    return 0;
}
