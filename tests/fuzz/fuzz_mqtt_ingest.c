/* libFuzzer target: one MQTT batch message as served (recv_mqtt_handle: topic -> agent id,
 * Content Type property, envelope, the agent id against the topic's, registry, signature,
 * decode, check, store in a real SQLite store, the ack payload), without Paho or a broker. The topic prefix is the
 * default, "cistern/v1".
 *
 * Input: [1 byte T][T bytes: the topic, as Paho hands it over (length given, any bytes)]
 *        [1 byte C][C bytes: the Content Type property; C = 0xff: the message has none]
 *        [the rest: the payload, framed as fuzz_seeds.h says: as sent, or a batch the target
 *        signs with a registered secret so that mutations reach the decoder].
 * Seeds: tests/fuzz/corpus/mqtt_ingest (made by tests/fuzz/make_seeds.c). */
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "api.h"
#include "fuzz_store.h"
#include "ingest/mqtt.h"

#define PREFIX "cistern/v1"
#define IDENTITY_NAME "topic agent id" /* as recv_mqtt_start says it */

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

/* A copy of N bytes in a buffer of its own size, so that ASan sees any read past them. */
static char *dup_bytes(const uint8_t *p, size_t n)
{
    char *d = malloc(n ? n : 1);

    if (d != NULL && n > 0)
        memcpy(d, p, n);
    return d;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static const char ok_prefix[] = "{\"status\":\"";
    const struct recv_ingest_ctx *ctx = cis_fuzz_ingest_ctx(IDENTITY_NAME);
    struct recv_mqtt_outcome o;
    char *topic = NULL, *ct = NULL;
    uint8_t *payload = NULL;
    size_t t, c, off, plen;
    long long before;
    int status, has_ct;

    if (size < 2)
        return 0;
    t = data[0];
    off = 1;
    if (off + t >= size)
        return 0;
    topic = dup_bytes(data + off, t);
    off += t;
    c = data[off++];
    has_ct = c != 0xff;
    if (has_ct) {
        if (off + c > size)
            goto out;
        ct = dup_bytes(data + off, c);
        off += c;
    } else {
        c = 0;
    }
    if (cis_fuzz_body(data + off, size - off, &payload, &plen) != 0)
        goto out;
    if (topic == NULL || (has_ct && ct == NULL))
        goto out;
    before = cis_fuzz_store_version();
    status = recv_mqtt_handle(ctx, PREFIX, topic, t, ct, c, payload, plen, &o);
    if (status != o.status || (status != RECV_INGEST_OK && status != RECV_INGEST_REJECTED &&
                               status != RECV_INGEST_RETRY && status != RECV_INGEST_UNAUTHORIZED))
        abort();
    if (status != 0 && cis_fuzz_store_version() != before)
        abort(); /* a refused batch changed the store */
    if (status == 0 && (o.agent[0] == '\0' || strcmp(o.agent, o.res.agent_id) != 0))
        abort(); /* stored for an agent other than the topic's */
    if (!o.ack.oom && (o.ack.p == NULL || strncmp(o.ack.p, ok_prefix, sizeof ok_prefix - 1) != 0 ||
                       o.ack.p[o.ack.len - 1] != '}'))
        abort(); /* every ack is {"status":"...",...} */
    recv_mqtt_outcome_free(&o);
out:
    free(topic);
    free(ct);
    free(payload);
    return 0;
}
