/* Receiver batch ingest shared by HTTP and MQTT: envelope, identity, registry, signature,
 * decode, store, answer. The order matters: everything before the store is refused by the
 * cheapest check that can refuse it, and nothing is decompressed before the signature says
 * that a registered device made the bytes. */
#include "ingest/ingest.h"

#include <inttypes.h>
#include <pthread.h>
#include <stdio.h>
#include <string.h>

#include <cistern/backoff.h>
#include <cistern/err.h>
#include <cistern/log.h>
#include <cistern/sign.h>

#define LOG_SLOTS 64
#define LOG_EVERY_MS (10 * 60 * 1000)
static pthread_mutex_t log_mu = PTHREAD_MUTEX_INITIALIZER;
static struct {
    uint64_t key;
    int64_t at;
} log_seen[LOG_SLOTS];

int recv_log_due(const char *who, const char *why)
{
    uint64_t k = 1469598103934665603ULL; /* FNV-1a */
    int64_t now = cis_mono_ms();
    size_t slot = 0;
    int due = 1;

    for (const char *p = who; *p; p++)
        k = (k ^ (unsigned char)*p) * 1099511628211ULL;
    k = (k ^ 0xff) * 1099511628211ULL;
    for (const char *p = why; *p; p++)
        k = (k ^ (unsigned char)*p) * 1099511628211ULL;
    pthread_mutex_lock(&log_mu);
    for (size_t i = 0; i < LOG_SLOTS; i++) {
        if (log_seen[i].at != 0 && log_seen[i].key == k) {
            slot = i;
            due = now - log_seen[i].at >= LOG_EVERY_MS;
            break;
        }
        if (log_seen[i].at < log_seen[slot].at)
            slot = i; /* the oldest slot, if the key is new */
    }
    if (due) {
        log_seen[slot].key = k;
        log_seen[slot].at = now;
    }
    pthread_mutex_unlock(&log_mu);
    return due;
}

void recv_ingest_log_refusal(const char *why)
{
    if (recv_log_due("device", why))
        cis_warn("[ingest] refused: %s; nothing stored (logged once per reason every 10 "
                 "minutes)", why);
    else
        cis_debug("[ingest] refused: %s", why);
}

/* Who may deliver: the registry's word on AGENT and the signature of ENV. Returns
 * RECV_INGEST_OK when the batch may be decoded, or the status with RES and WHY filled. */
static int authorize(const struct recv_ingest_ctx *ctx, const struct cis_envelope *env,
                     struct recv_ingest_result *res, char *why, size_t whylen)
{
    struct recv_device dev;
    int rc = recv_registry_lookup(ctx->reg, env->agent_id, &dev);

    if (rc == CIS_ENOTFOUND) {
        snprintf(why, whylen,
                 "agent '%s' is not registered at this receiver (cistern-receiver device add)",
                 env->agent_id);
        res->code = rc;
        return RECV_INGEST_UNAUTHORIZED;
    }
    if (rc) {
        snprintf(why, whylen, "device registry unavailable: %s", cis_strerror(rc));
        res->code = rc;
        return RECV_INGEST_RETRY;
    }
    if (!dev.enabled) {
        snprintf(why, whylen, "agent '%s' is revoked at this receiver (cistern-receiver device "
                 "enable)", env->agent_id);
        res->code = CIS_EKEY;
        return RECV_INGEST_UNAUTHORIZED;
    }
    rc = cis_envelope_verify(env, dev.has_fpr ? dev.fpr : NULL, dev.secret, dev.secret_len, why,
                             whylen);
    res->code = rc;
    if (rc == CIS_EKEY)
        return RECV_INGEST_UNAUTHORIZED;
    if (rc == CIS_EBADSIG) {
        res->reject = RECV_REJECT_SIGNATURE;
        return RECV_INGEST_REJECTED;
    }
    if (rc) {
        res->reject = RECV_REJECT_MALFORMED;
        return RECV_INGEST_REJECTED;
    }
    return RECV_INGEST_OK;
}

int recv_ingest_batch(const struct recv_ingest_ctx *ctx, const uint8_t *body, size_t len,
                      const char *identity, struct recv_ingest_result *res, char *why,
                      size_t whylen)
{
    struct cis_envelope env = {0};
    struct cis_decoded_batch dec = {0};
    struct recv_put_result put = {0};
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
    rc = cis_envelope_decode(body, len, &env, why, whylen);
    if (rc) {
        if (why[0] == '\0')
            snprintf(why, whylen, "%s", cis_strerror(rc));
        res->reject = RECV_REJECT_MALFORMED;
        res->code = rc;
        return RECV_INGEST_REJECTED;
    }
    snprintf(res->agent_id, sizeof res->agent_id, "%s", env.agent_id);
    if (identity != NULL && strcmp(identity, env.agent_id) != 0) {
        snprintf(why, whylen, "%s '%s' may not send for agent '%s'",
                 ctx->identity_name ? ctx->identity_name : "identity", identity, env.agent_id);
        res->reject = RECV_REJECT_IDENTITY;
        res->code = CIS_EINVAL;
        ret = RECV_INGEST_REJECTED;
        goto out;
    }
    ret = authorize(ctx, &env, res, why, whylen);
    if (ret == RECV_INGEST_UNAUTHORIZED || res->reject == RECV_REJECT_SIGNATURE)
        recv_ingest_log_refusal(why);
    if (ret != RECV_INGEST_OK)
        goto out;
    rc = cis_batch_decode(env.batch, env.batch_len, &ctx->limits, &dec, why, whylen);
    if (rc == 0)
        rc = recv_batch_check(&dec, why, whylen);
    if (rc == 0 && strcmp(dec.pb->header->agent_id, env.agent_id) != 0) {
        snprintf(why, whylen, "the batch's agent id '%s' is not its envelope's '%s'",
                 dec.pb->header->agent_id, env.agent_id);
        rc = CIS_EDECODE;
    }
    if (rc) {
        if (why[0] == '\0')
            snprintf(why, whylen, "%s", cis_strerror(rc));
        res->reject = rc == CIS_ETOOBIG ? RECV_REJECT_TOO_BIG : RECV_REJECT_MALFORMED;
        res->code = rc;
        ret = RECV_INGEST_REJECTED;
        goto out;
    }
    res->epoch = dec.pb->header->epoch;
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
    res->replay = put.replay;
    recv_api_ingest_answer(&dec, &put, &res->answer);
    ret = RECV_INGEST_OK;
out:
    cis_batch_free(&dec);
    cis_envelope_free(&env);
    return ret;
}

void recv_ingest_result_free(struct recv_ingest_result *res)
{
    if (res == NULL)
        return;
    recv_buf_free(&res->answer);
}
