/* Receiver batch ingest shared by HTTP and MQTT: decode, check, identity, store, answer. */
#include "ingest/ingest.h"

#include <inttypes.h>
#include <stdio.h>
#include <string.h>

#include <cistern/backoff.h>
#include <cistern/err.h>

int recv_ingest_batch(const struct recv_ingest_ctx *ctx, const uint8_t *body, size_t len,
                      const char *identity, struct recv_ingest_result *res, char *why,
                      size_t whylen)
{
    struct cis_decoded_batch dec = {0};
    struct recv_put_result put = {0};
    const char *agent;
    int rc, ret;

    memset(res, 0, sizeof *res);
    why[0] = '\0';
    if (ctx->max_body > 0 && len > ctx->max_body) {
        snprintf(why, whylen, "batch of %zu bytes is over the limit of %" PRIu64, len,
                 ctx->max_body);
        res->reject = RECV_REJECT_TOO_BIG;
        res->code = CIS_ETOOBIG;
        return RECV_INGEST_REJECTED;
    }
    rc = cis_batch_decode(body, len, &ctx->limits, &dec, why, whylen);
    if (rc == 0)
        rc = recv_batch_check(&dec, why, whylen);
    if (rc) {
        if (why[0] == '\0')
            snprintf(why, whylen, "%s", cis_strerror(rc));
        res->reject = rc == CIS_ETOOBIG ? RECV_REJECT_TOO_BIG : RECV_REJECT_MALFORMED;
        res->code = rc;
        ret = RECV_INGEST_REJECTED;
        goto out;
    }
    agent = dec.pb->header->agent_id;
    snprintf(res->agent_id, sizeof res->agent_id, "%s", agent);
    res->epoch = dec.pb->header->epoch;
    if (identity != NULL && strcmp(identity, agent) != 0) {
        snprintf(why, whylen, "%s '%s' may not send for agent '%s'",
                 ctx->identity_name ? ctx->identity_name : "identity", identity, agent);
        res->reject = RECV_REJECT_IDENTITY;
        res->code = CIS_EINVAL;
        ret = RECV_INGEST_REJECTED;
        goto out;
    }
    rc = ctx->ops->put_batch(ctx->st, &dec, cis_wall_ms(), &put);
    if (rc) {
        /* Nothing was committed: the sender keeps the batch and sends it again. */
        snprintf(why, whylen, "store unavailable: %s", cis_strerror(rc));
        res->code = rc;
        ret = RECV_INGEST_RETRY;
        goto out;
    }
    res->accepted = put.accepted;
    res->duplicates = put.duplicates;
    recv_api_ingest_answer(&dec, &put, &res->answer);
    ret = RECV_INGEST_OK;
out:
    cis_batch_free(&dec);
    return ret;
}

void recv_ingest_result_free(struct recv_ingest_result *res)
{
    if (res == NULL)
        return;
    recv_buf_free(&res->answer);
}
