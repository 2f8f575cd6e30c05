/* Receiver HTTP(S) listeners on libmicrohttpd: mTLS identity from the client certificate's CN,
 * routing, POST /v1/batches (decode, check, store, answer after COMMIT) and the GET routes. */
#include "ingest/http.h"

#include <errno.h>
#include <inttypes.h>
#include <netdb.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <arpa/inet.h>
#include <gnutls/gnutls.h>
#include <gnutls/x509.h>
#include <microhttpd.h>

#include <cistern/backoff.h>
#include <cistern/err.h>
#include <cistern/log.h>

#include "api.h"
#include "ingest/ingest.h"
#include "ingest/ratelimit.h"

#define PEM_MAX (1024 * 1024)
#define TLS_PRIORITIES "NORMAL:-VERS-ALL:+VERS-TLS1.3:+VERS-TLS1.2"

struct listener {
    struct recv_http *h;
    struct MHD_Daemon *d;
    int fd;            /* our listen socket, until MHD is stopped */
    int tls;           /* requests need a verified client certificate */
    int ingest;        /* POST /v1/batches is served here */
    char addr[320];    /* bound address, "host:port" */
};

struct recv_http {
    struct listener main, api;
    const struct recv_store_ops *ops;
    struct recv_store *st;
    uint64_t max_body;
    struct recv_ingest_ctx ingest; /* decode, check, store: shared with the MQTT ingest */
    char *key_pem, *cert_pem, *ca_pem;
    int inflight; /* requests between first handler call and completion; atomic */
    /* limits.rate: one token bucket per client certificate CN; NULL when off */
    struct recv_rate *rate;
    /* limits.request_timeout: every open connection of both listeners, and the sweeper thread
     * that shuts down those that take longer to send one request (slowloris, slow bodies) */
    int64_t request_timeout_ms;
    pthread_mutex_t conn_mu;
    pthread_cond_t conn_cv;
    struct conn *conns;
    int sweeper_on, stopping, cutting;
    int64_t last_cut_ms;
    uint64_t cut_total;
    pthread_t sweeper;
};

/* Per-connection state (MHD's socket_context), on recv_http's list while the socket is open:
 * MHD reports the close before it closes the socket, so the fd here is always ours. */
struct conn {
    struct conn *prev, *next;
    int fd;
    int64_t since_ms; /* accept, or the last answer: the current request's clock; atomic */
    int answering;    /* a response is queued: the request is in, not ours to cut; atomic */
    int cut;          /* shut down by the sweeper */
};

enum route { R_NONE, R_BATCHES, R_AGENTS, R_RECORDS, R_GAPS, R_LOSSES, R_HEALTHZ };

/* Per-request state (MHD's con_cls). */
struct req {
    struct listener *l;
    int answered;     /* a response is queued */
    int too_big;      /* body exceeded max_body while arriving: discard, answer 413 */
    uint8_t *body;
    size_t len, cap;
    size_t discarded;
    char cn[256];     /* client certificate CN when TLS */
};

/* ---- responses ---- */

static enum MHD_Result queue_buf(struct MHD_Connection *c, unsigned status, struct recv_buf *b,
                                 const char *hname, const char *hval)
{
    struct MHD_Response *resp;
    enum MHD_Result ret;
    size_t len = 0;
    char *p = recv_buf_take(b, &len);

    if (p == NULL)
        return MHD_NO; /* out of memory: drop the connection */
    resp = MHD_create_response_from_buffer(len, p, MHD_RESPMEM_MUST_FREE);
    if (resp == NULL) {
        free(p);
        return MHD_NO;
    }
    MHD_add_response_header(resp, MHD_HTTP_HEADER_CONTENT_TYPE, "application/json");
    MHD_add_response_header(resp, MHD_HTTP_HEADER_CACHE_CONTROL, "no-store");
    if (hname != NULL)
        MHD_add_response_header(resp, hname, hval);
    ret = MHD_queue_response(c, status, resp);
    MHD_destroy_response(resp);
    return ret;
}

/* The connection's state (socket_context), or NULL. */
static struct conn *conn_of(struct MHD_Connection *c)
{
    const union MHD_ConnectionInfo *ci =
        MHD_get_connection_info(c, MHD_CONNECTION_INFO_SOCKET_CONTEXT);

    return ci != NULL ? ci->socket_context : NULL;
}

static enum MHD_Result answer(struct req *r, struct MHD_Connection *c, unsigned status,
                              struct recv_buf *b, const char *hname, const char *hval)
{
    struct conn *k = conn_of(c);

    /* The request is in: the time to process and send the answer is not the client's. */
    if (k != NULL)
        __atomic_store_n(&k->answering, 1, __ATOMIC_SEQ_CST);
    r->answered = 1;
    return queue_buf(c, status, b, hname, hval);
}

static enum MHD_Result answer_error(struct req *r, struct MHD_Connection *c, unsigned status,
                                    const char *msg, const char *hname, const char *hval)
{
    struct recv_buf b = {0};

    recv_json_error(&b, msg);
    return answer(r, c, status, &b, hname, hval);
}

/* ---- client identity ---- */

static void utc_date(time_t t, char *out, size_t outlen)
{
    struct tm tm;

    if (t == (time_t)-1 || gmtime_r(&t, &tm) == NULL ||
        strftime(out, outlen, "%Y-%m-%d %H:%M:%S UTC", &tm) == 0)
        snprintf(out, outlen, "an unreadable date");
}

/* Which check a client certificate failed (gnutls_certificate_verify_peers2 STATUS), in
 * words for the log and the 401 answer. */
static void cert_refusal(gnutls_x509_crt_t crt, unsigned status, char *why, size_t whylen)
{
    char date[64];

    if (status & GNUTLS_CERT_EXPIRED) {
        utc_date(crt ? gnutls_x509_crt_get_expiration_time(crt) : (time_t)-1, date, sizeof date);
        snprintf(why, whylen, "client certificate expired on %s", date);
    } else if (status & GNUTLS_CERT_NOT_ACTIVATED) {
        utc_date(crt ? gnutls_x509_crt_get_activation_time(crt) : (time_t)-1, date, sizeof date);
        snprintf(why, whylen, "client certificate is not valid before %s", date);
    } else if (status & GNUTLS_CERT_SIGNER_NOT_FOUND) {
        snprintf(why, whylen, "client certificate %s",
                 crt && gnutls_x509_crt_check_issuer(crt, crt)
                     ? "is self-signed"
                     : "is not signed by a CA in listen.tls.client_ca_file");
    } else if (status & GNUTLS_CERT_SIGNER_NOT_CA) {
        snprintf(why, whylen, "client certificate's signer is not a CA");
    } else if (status & GNUTLS_CERT_REVOKED) {
        snprintf(why, whylen, "client certificate is revoked");
    } else if (status & GNUTLS_CERT_INSECURE_ALGORITHM) {
        snprintf(why, whylen, "client certificate uses an insecure algorithm");
    } else if (status & GNUTLS_CERT_PURPOSE_MISMATCH) {
        snprintf(why, whylen, "client certificate is not for client authentication");
    } else if (status & GNUTLS_CERT_SIGNATURE_FAILURE) {
        snprintf(why, whylen, "client certificate's signature does not verify");
    } else {
        snprintf(why, whylen, "client certificate not verified (status 0x%x)", status);
    }
}

/* Verify the peer certificate against the client CA and copy its CN into CN.
 * Returns 0, or -1 with a reason in WHY (a refused certificate is also logged, rate-limited). */
static int client_cn(struct MHD_Connection *c, char *cn, size_t cnlen, char *why, size_t whylen)
{
    const union MHD_ConnectionInfo *ci;
    gnutls_session_t sess;
    const gnutls_datum_t *certs;
    gnutls_x509_crt_t crt = NULL;
    unsigned status = 0, n = 0;
    size_t sz = cnlen;
    int rc, ret = -1;

    ci = MHD_get_connection_info(c, MHD_CONNECTION_INFO_GNUTLS_SESSION);
    if (ci == NULL || ci->tls_session == NULL) {
        snprintf(why, whylen, "no TLS session");
        return -1;
    }
    sess = (gnutls_session_t)ci->tls_session;
    if (gnutls_certificate_type_get(sess) != GNUTLS_CRT_X509) {
        snprintf(why, whylen, "client certificate required");
        return -1;
    }
    certs = gnutls_certificate_get_peers(sess, &n);
    if (certs == NULL || n == 0) {
        snprintf(why, whylen, "client certificate required");
        return -1;
    }
    /* Read the leaf before verifying it: a refusal names its CN and dates. */
    if (gnutls_x509_crt_init(&crt) < 0)
        goto out;
    if (gnutls_x509_crt_import(crt, &certs[0], GNUTLS_X509_FMT_DER) < 0) {
        gnutls_x509_crt_deinit(crt);
        crt = NULL;
    }
    if (crt == NULL ||
        gnutls_x509_crt_get_dn_by_oid(crt, GNUTLS_OID_X520_COMMON_NAME, 0, 0, cn, &sz) < 0)
        cn[0] = '\0';
    rc = gnutls_certificate_verify_peers2(sess, &status);
    if (rc == GNUTLS_E_NO_CERTIFICATE_FOUND) {
        snprintf(why, whylen, "client certificate required");
        goto out;
    }
    if (rc < 0 || status != 0) {
        const union MHD_ConnectionInfo *ai =
            MHD_get_connection_info(c, MHD_CONNECTION_INFO_CLIENT_ADDRESS);
        char ip[INET6_ADDRSTRLEN] = "?", who[INET6_ADDRSTRLEN + 80];

        if (rc < 0)
            snprintf(why, whylen, "client certificate not verified (%s)", gnutls_strerror(rc));
        else
            cert_refusal(crt, status, why, whylen);
        if (ai != NULL && ai->client_addr != NULL) {
            const struct sockaddr *sa = ai->client_addr;
            if (sa->sa_family == AF_INET)
                inet_ntop(AF_INET, &((const struct sockaddr_in *)sa)->sin_addr, ip, sizeof ip);
            else if (sa->sa_family == AF_INET6)
                inet_ntop(AF_INET6, &((const struct sockaddr_in6 *)sa)->sin6_addr, ip, sizeof ip);
        }
        snprintf(who, sizeof who, "%s CN=%s", ip, cn[0] ? cn : "(none)");
        if (recv_log_due(who, why))
            cis_warn("[http] refused the client certificate of %s: %s (answered 401; logged "
                     "once per client and reason every 10 minutes)", who, why);
        else
            cis_debug("[http] refused the client certificate of %s: %s", who, why);
        cn[0] = '\0';
        goto out;
    }
    if (crt == NULL || cn[0] == '\0') {
        snprintf(why, whylen, "client certificate has no usable CN");
        goto out;
    }
    ret = 0;
out:
    if (ret && why[0] == '\0')
        snprintf(why, whylen, "client certificate could not be read");
    if (crt != NULL)
        gnutls_x509_crt_deinit(crt);
    return ret;
}

/* ---- routing ---- */

static enum route route_of(const char *url, char *id, size_t idlen)
{
    static const char agents[] = "/v1/agents/";

    if (strcmp(url, "/v1/batches") == 0)
        return R_BATCHES;
    if (strcmp(url, "/v1/agents") == 0)
        return R_AGENTS;
    if (strcmp(url, "/healthz") == 0)
        return R_HEALTHZ;
    if (strncmp(url, agents, sizeof agents - 1) == 0) {
        const char *s = url + sizeof agents - 1;
        const char *slash = strchr(s, '/');
        enum route rt;
        size_t n;
        if (slash == NULL || slash == s)
            return R_NONE;
        if (strcmp(slash, "/records") == 0)
            rt = R_RECORDS;
        else if (strcmp(slash, "/gaps") == 0)
            rt = R_GAPS;
        else if (strcmp(slash, "/losses") == 0)
            rt = R_LOSSES;
        else
            return R_NONE;
        n = (size_t)(slash - s);
        if (n >= idlen)
            return R_NONE;
        memcpy(id, s, n);
        id[n] = '\0';
        return rt;
    }
    return R_NONE;
}

/* 1 when CT names TYPE (parameters after ';' allowed). */
static int content_type_is(const char *ct, const char *type)
{
    size_t n = strlen(type);

    if (ct == NULL)
        return 0;
    while (*ct == ' ' || *ct == '\t')
        ct++;
    if (strncasecmp(ct, type, n) != 0)
        return 0;
    ct += n;
    while (*ct == ' ' || *ct == '\t')
        ct++;
    return *ct == '\0' || *ct == ';';
}

/* Only signed batches are taken; an unsigned one is told so in words. */
static const char *content_type_refusal(const char *ct)
{
    if (content_type_is(ct, CIS_SIGNED_BATCH_CONTENT_TYPE))
        return NULL;
    if (content_type_is(ct, CIS_BATCH_CONTENT_TYPE))
        return "unsigned batches are not accepted: Content-Type must be "
               CIS_SIGNED_BATCH_CONTENT_TYPE;
    return "Content-Type must be " CIS_SIGNED_BATCH_CONTENT_TYPE;
}

/* ---- GET routes ---- */

static enum MHD_Result serve_get(struct req *r, struct MHD_Connection *c, enum route rt,
                                 const char *id)
{
    struct recv_http *h = r->l->h;
    struct recv_buf b = {0};
    char why[128];
    int rc;

    if (rt == R_HEALTHZ) {
        if (h->ops->health(h->st) != 0)
            return answer_error(r, c, MHD_HTTP_SERVICE_UNAVAILABLE, "store unavailable", NULL,
                                NULL);
        recv_buf_add(&b, "{\"status\":\"ok\"}", 15);
        return answer(r, c, MHD_HTTP_OK, &b, NULL, NULL);
    }
    if (rt == R_AGENTS) {
        rc = recv_api_agents(h->ops, h->st, &b);
    } else if (rt == R_GAPS) {
        struct recv_gaps_query q = {.agent_id = id};
        rc = recv_api_parse_gaps_query(
            MHD_lookup_connection_value(c, MHD_GET_ARGUMENT_KIND, "epoch"), &q, why, sizeof why);
        if (rc)
            return answer_error(r, c, MHD_HTTP_BAD_REQUEST, why, NULL, NULL);
        rc = recv_api_gaps(h->ops, h->st, &q, &b);
    } else if (rt == R_LOSSES) {
        rc = recv_api_losses(h->ops, h->st, id, &b);
    } else {
        struct recv_records_query q = {.agent_id = id};
        rc = recv_api_parse_records_query(
            MHD_lookup_connection_value(c, MHD_GET_ARGUMENT_KIND, "after"),
            MHD_lookup_connection_value(c, MHD_GET_ARGUMENT_KIND, "limit"),
            MHD_lookup_connection_value(c, MHD_GET_ARGUMENT_KIND, "epoch"), &q, why, sizeof why);
        if (rc)
            return answer_error(r, c, MHD_HTTP_BAD_REQUEST, why, NULL, NULL);
        rc = recv_api_records(h->ops, h->st, &q, &b);
    }
    if (rc == CIS_ENOTFOUND) {
        recv_buf_free(&b);
        return answer_error(r, c, MHD_HTTP_NOT_FOUND, "unknown agent", NULL, NULL);
    }
    if (rc) {
        recv_buf_free(&b);
        return answer_error(r, c, MHD_HTTP_SERVICE_UNAVAILABLE, "store unavailable",
                            MHD_HTTP_HEADER_RETRY_AFTER, "5");
    }
    return answer(r, c, MHD_HTTP_OK, &b, NULL, NULL);
}

/* ---- POST /v1/batches ---- */

/* First call of a POST /v1/batches: headers only. Answers now when the request can be
 * refused without its body; otherwise prepares to receive it. */
static enum MHD_Result batch_begin(struct req *r, struct MHD_Connection *c)
{
    struct recv_http *h = r->l->h;
    const char *cl = MHD_lookup_connection_value(c, MHD_HEADER_KIND,
                                                 MHD_HTTP_HEADER_CONTENT_LENGTH);

    const char *ct_why = content_type_refusal(
        MHD_lookup_connection_value(c, MHD_HEADER_KIND, MHD_HTTP_HEADER_CONTENT_TYPE));

    if (ct_why != NULL)
        return answer_error(r, c, MHD_HTTP_UNSUPPORTED_MEDIA_TYPE, ct_why, NULL, NULL);
    if (cl != NULL) {
        char *end;
        unsigned long long n;
        errno = 0;
        n = strtoull(cl, &end, 10);
        if (errno != 0 || end == cl || *end != '\0' || n > h->max_body)
            return answer_error(r, c, MHD_HTTP_CONTENT_TOO_LARGE, "request body too large",
                                NULL, NULL);
        if (n > 0) {
            r->body = malloc((size_t)n);
            if (r->body == NULL)
                return answer_error(r, c, MHD_HTTP_SERVICE_UNAVAILABLE, "out of memory",
                                    MHD_HTTP_HEADER_RETRY_AFTER, "5");
            r->cap = (size_t)n;
        }
    }
    return MHD_YES;
}

static enum MHD_Result batch_data(struct req *r, const char *data, size_t n)
{
    uint64_t max = r->l->h->max_body;

    if (r->too_big || n > max - r->len) {
        /* Over the limit mid-stream (chunked, or a lying Content-Length): the answer can only
         * be queued once the body is read, so discard it, but not without end. */
        r->too_big = 1;
        r->discarded += n;
        return r->discarded > max ? MHD_NO : MHD_YES;
    }
    if (r->len + n > r->cap) {
        size_t cap = r->cap ? r->cap : 64 * 1024;
        uint8_t *p;
        while (cap < r->len + n)
            cap *= 2;
        if (cap > max)
            cap = (size_t)max;
        p = realloc(r->body, cap);
        if (p == NULL)
            return MHD_NO;
        r->body = p;
        r->cap = cap;
    }
    memcpy(r->body + r->len, data, n);
    r->len += n;
    return MHD_YES;
}

/* The whole answer to a POST /v1/batches once its body is in, without libmicrohttpd (the
 * fuzz target calls it). The checks batch_begin made on the headers are made again: they cost
 * nothing and keep this function whole on its own. */
int recv_http_batch(const struct recv_ingest_ctx *ctx, const char *content_type,
                    const uint8_t *body, size_t len, const char *identity, struct recv_buf *answer)
{
    struct recv_ingest_result res;
    const char *ct_why = content_type_refusal(content_type);
    char why[600];
    int status;

    memset(answer, 0, sizeof *answer);
    if (ct_why != NULL) {
        recv_json_error(answer, ct_why);
        return MHD_HTTP_UNSUPPORTED_MEDIA_TYPE;
    }
    if (ctx->max_body > 0 && len > ctx->max_body) {
        recv_json_error(answer, "request body too large");
        return MHD_HTTP_CONTENT_TOO_LARGE;
    }
    switch (recv_ingest_batch(ctx, body, len, identity, &res, why, sizeof why)) {
    case RECV_INGEST_OK:
        cis_debug("[http] batch from %s epoch %" PRIu64 ": %" PRIu64 " accepted, %" PRIu64
                  " duplicates",
                  res.agent_id, res.epoch, res.accepted, res.duplicates);
        *answer = res.answer; /* the answer moves to the caller */
        memset(&res.answer, 0, sizeof res.answer);
        status = MHD_HTTP_OK;
        break;
    case RECV_INGEST_RETRY:
        /* 503: nothing was committed; the agent keeps the batch and retries. */
        recv_json_error(answer, why);
        status = MHD_HTTP_SERVICE_UNAVAILABLE;
        break;
    case RECV_INGEST_UNAUTHORIZED:
        /* 401: the device, not the batch: the agent keeps it and retries with backoff. */
        recv_json_error(answer, why);
        status = MHD_HTTP_UNAUTHORIZED;
        break;
    default:
        if (res.reject == RECV_REJECT_IDENTITY) {
            cis_debug("[http] batch rejected: %s", why);
            status = MHD_HTTP_FORBIDDEN;
        } else {
            cis_debug("[http] batch rejected (%s): %s", identity != NULL ? identity : "-", why);
            status = res.reject == RECV_REJECT_TOO_BIG ? MHD_HTTP_CONTENT_TOO_LARGE
                                                       : MHD_HTTP_BAD_REQUEST;
        }
        recv_json_error(answer, why);
        break;
    }
    recv_ingest_result_free(&res);
    return status;
}

static enum MHD_Result batch_end(struct req *r, struct MHD_Connection *c)
{
    struct recv_http *h = r->l->h;
    struct recv_buf b;
    enum MHD_Result ret;
    int status;

    if (r->too_big)
        return answer_error(r, c, MHD_HTTP_CONTENT_TOO_LARGE, "request body too large", NULL,
                            NULL);
    status = recv_http_batch(&h->ingest,
                             MHD_lookup_connection_value(c, MHD_HEADER_KIND,
                                                         MHD_HTTP_HEADER_CONTENT_TYPE),
                             r->body, r->len, r->l->tls ? r->cn : NULL, &b);
    ret = answer(r, c, (unsigned)status, &b,
                 status == MHD_HTTP_SERVICE_UNAVAILABLE ? MHD_HTTP_HEADER_RETRY_AFTER : NULL,
                 "5");
    free(r->body);
    r->body = NULL;
    r->len = r->cap = 0;
    return ret;
}

/* ---- the MHD callbacks ---- */

static enum MHD_Result on_request(void *cls, struct MHD_Connection *c, const char *url,
                                  const char *method, const char *version,
                                  const char *upload_data, size_t *upload_data_size,
                                  void **con_cls)
{
    struct listener *l = cls;
    struct req *r = *con_cls;
    char id[256], why[128] = "";
    enum route rt;
    int is_get, is_post;

    if (r != NULL) {
        if (r->answered) {
            *upload_data_size = 0;
            return MHD_YES;
        }
        if (*upload_data_size != 0) {
            enum MHD_Result ok = batch_data(r, upload_data, *upload_data_size);
            *upload_data_size = 0;
            return ok;
        }
        return batch_end(r, c);
    }

    r = calloc(1, sizeof *r);
    if (r == NULL)
        return MHD_NO;
    r->l = l;
    *con_cls = r;
    __atomic_add_fetch(&l->h->inflight, 1, __ATOMIC_SEQ_CST);

    rt = route_of(url, id, sizeof id);
    is_get = strcmp(method, MHD_HTTP_METHOD_GET) == 0 || strcmp(method, MHD_HTTP_METHOD_HEAD) == 0;
    is_post = strcmp(method, MHD_HTTP_METHOD_POST) == 0;
    if (rt == R_NONE)
        return answer_error(r, c, MHD_HTTP_NOT_FOUND, "not found", NULL, NULL);
    if (rt == R_BATCHES && !l->ingest)
        return answer_error(r, c, MHD_HTTP_NOT_FOUND,
                            "not found: this listener serves the read API (GET) only", NULL,
                            NULL);
    if (rt == R_BATCHES && !is_post)
        return answer_error(r, c, MHD_HTTP_METHOD_NOT_ALLOWED, "method not allowed",
                            MHD_HTTP_HEADER_ALLOW, "POST");
    if (rt != R_BATCHES && !is_get)
        return answer_error(r, c, MHD_HTTP_METHOD_NOT_ALLOWED, "method not allowed",
                            MHD_HTTP_HEADER_ALLOW, "GET, HEAD");
    if (l->tls && client_cn(c, r->cn, sizeof r->cn, why, sizeof why) != 0)
        return answer_error(r, c, MHD_HTTP_UNAUTHORIZED, why, NULL, NULL);
    if (rt == R_BATCHES && l->tls) {
        /* An unregistered or revoked CN is refused on its headers: its body is never read. The
         * ingest checks again, with the signature, whatever the transport. */
        struct recv_device dev;
        int rc = recv_registry_lookup(l->h->ingest.reg, r->cn, &dev);
        if (rc == CIS_ENOTFOUND || (rc == 0 && !dev.enabled)) {
            char msg[400];
            snprintf(msg, sizeof msg, rc ? "agent '%s' is not registered at this receiver "
                                           "(cistern-receiver device add)"
                                         : "agent '%s' is revoked at this receiver "
                                           "(cistern-receiver device enable)", r->cn);
            recv_ingest_log_refusal(msg);
            return answer_error(r, c, MHD_HTTP_UNAUTHORIZED, msg, NULL, NULL);
        }
    }
    if (rt == R_BATCHES && l->tls && l->h->rate != NULL) {
        /* limits.rate, on the headers alone: a refused batch costs no read, decode or store. */
        int64_t wait = recv_rate_take(l->h->rate, r->cn, cis_mono_ms());
        if (wait > 0) {
            char ra[24];
            snprintf(ra, sizeof ra, "%lld", (long long)((wait + 999) / 1000));
            cis_debug("[http] %s is over limits.rate: 429, Retry-After %s", r->cn, ra);
            return answer_error(r, c, MHD_HTTP_TOO_MANY_REQUESTS,
                                "too many batches from this client (limits.rate)",
                                MHD_HTTP_HEADER_RETRY_AFTER, ra);
        }
    }
    if (rt == R_BATCHES)
        return batch_begin(r, c);
    return serve_get(r, c, rt, id);
}

static void on_completed(void *cls, struct MHD_Connection *c, void **con_cls,
                         enum MHD_RequestTerminationCode toe)
{
    struct listener *l = cls;
    struct req *r = *con_cls;
    struct conn *k = conn_of(c);

    (void)toe;
    if (k != NULL) {
        /* The next request on this keep-alive connection starts its own clock. */
        __atomic_store_n(&k->since_ms, cis_mono_ms(), __ATOMIC_SEQ_CST);
        __atomic_store_n(&k->answering, 0, __ATOMIC_SEQ_CST);
    }
    if (r == NULL)
        return;
    free(r->body);
    free(r);
    *con_cls = NULL;
    __atomic_sub_fetch(&l->h->inflight, 1, __ATOMIC_SEQ_CST);
}

/* MHD_OPTION_NOTIFY_CONNECTION: keep every open connection on H's list, from accept (before
 * the TLS handshake and the headers, which no request callback sees) until MHD closes it. */
static void on_connection(void *cls, struct MHD_Connection *c, void **socket_context,
                          enum MHD_ConnectionNotificationCode toe)
{
    struct recv_http *h = cls;
    struct conn *k = *socket_context;

    if (toe == MHD_CONNECTION_NOTIFY_STARTED) {
        const union MHD_ConnectionInfo *ci =
            MHD_get_connection_info(c, MHD_CONNECTION_INFO_CONNECTION_FD);
        if (ci == NULL || (k = calloc(1, sizeof *k)) == NULL)
            return; /* untracked: only the idle timeout applies to it */
        k->fd = ci->connect_fd;
        k->since_ms = cis_mono_ms();
        pthread_mutex_lock(&h->conn_mu);
        k->next = h->conns;
        if (h->conns != NULL)
            h->conns->prev = k;
        h->conns = k;
        pthread_mutex_unlock(&h->conn_mu);
        *socket_context = k;
    } else if (toe == MHD_CONNECTION_NOTIFY_CLOSED && k != NULL) {
        /* Unlinked before MHD closes the socket, so the sweeper never touches a reused fd. */
        pthread_mutex_lock(&h->conn_mu);
        if (k->prev != NULL)
            k->prev->next = k->next;
        else
            h->conns = k->next;
        if (k->next != NULL)
            k->next->prev = k->prev;
        pthread_mutex_unlock(&h->conn_mu);
        free(k);
        *socket_context = NULL;
    }
}

/* Shut down the connections that have taken longer than limits.request_timeout to send one
 * request; their MHD thread sees the socket end and closes it. Called with conn_mu held. */
static void sweep(struct recv_http *h)
{
    int64_t now = cis_mono_ms();
    unsigned n = 0;

    for (struct conn *k = h->conns; k != NULL; k = k->next) {
        if (k->cut || __atomic_load_n(&k->answering, __ATOMIC_SEQ_CST) ||
            now - __atomic_load_n(&k->since_ms, __ATOMIC_SEQ_CST) <= h->request_timeout_ms)
            continue;
        shutdown(k->fd, SHUT_RDWR);
        k->cut = 1;
        n++;
    }
    h->cut_total += n;
    /* Once when it starts and once when it has stopped for 30 s, not once per connection. */
    if (n > 0) {
        if (!h->cutting)
            cis_warn("[http] closing connections that do not send a whole request within "
                     "limits.request_timeout (%lld ms): slow clients, or a slowloris attack",
                     (long long)h->request_timeout_ms);
        h->cutting = 1;
        h->last_cut_ms = now;
    } else if (h->cutting && now - h->last_cut_ms > 30000) {
        cis_info("[http] no slow connections for 30 s; %" PRIu64 " closed so far", h->cut_total);
        h->cutting = 0;
    }
}

static void *sweeper_main(void *arg)
{
    struct recv_http *h = arg;
    /* A quarter of the timeout, at most 1 s: a slow connection is cut at most that late. */
    int64_t every = h->request_timeout_ms / 4 < 1000 ? h->request_timeout_ms / 4 : 1000;

    pthread_mutex_lock(&h->conn_mu);
    while (!h->stopping) {
        struct timespec ts;
        cis_mono_timespec(cis_mono_ms() + every, &ts);
        pthread_cond_timedwait(&h->conn_cv, &h->conn_mu, &ts);
        if (!h->stopping)
            sweep(h);
    }
    pthread_mutex_unlock(&h->conn_mu);
    return NULL;
}

/* libmicrohttpd's messages: FMT is its own printf format. */
__attribute__((format(printf, 2, 0))) static void on_mhd_log(void *cls, const char *fmt,
                                                             va_list ap)
{
    char line[512];
    size_t n;

    vsnprintf(line, sizeof line, fmt, ap);
    n = strlen(line);
    while (n > 0 && (line[n - 1] == '\n' || line[n - 1] == '\r'))
        line[--n] = '\0';
    cis_debug("[http] libmicrohttpd: %s", line);
}

/* ---- setup ---- */

/* Read a PEM file into a NUL-terminated malloc'd string (caller frees). */
static int read_pem(const char *key, const char *path, char **out, char *err, size_t errlen)
{
    FILE *f = fopen(path, "rb");
    char *p = NULL;
    size_t n;

    if (f == NULL) {
        snprintf(err, errlen, "%s: %s: %s", key, path, strerror(errno));
        return CIS_EIO;
    }
    p = malloc(PEM_MAX + 1);
    if (p == NULL) {
        fclose(f);
        snprintf(err, errlen, "out of memory");
        return CIS_ENOMEM;
    }
    n = fread(p, 1, PEM_MAX + 1, f);
    if (ferror(f) || n > PEM_MAX || n == 0) {
        snprintf(err, errlen, "%s: %s: %s", key, path,
                 ferror(f) ? strerror(errno) : n == 0 ? "is empty" : "is too large");
        fclose(f);
        free(p);
        return CIS_EIO;
    }
    fclose(f);
    p[n] = '\0';
    *out = p;
    return 0;
}

/* Bind and listen on HOSTPORT; fills L->fd and L->addr with the bound address. */
static int open_listener(struct listener *l, const char *key, const char *hostport, char *err,
                         size_t errlen)
{
    struct addrinfo hints = {0}, *ai = NULL;
    struct sockaddr_storage ss;
    socklen_t sl = sizeof ss;
    char host[256], portstr[8], why[128], ip[INET6_ADDRSTRLEN];
    unsigned port;
    int fd = -1, one = 1, rc;

    if (cis_parse_hostport(hostport, host, sizeof host, &port, why, sizeof why) != 0) {
        snprintf(err, errlen, "%s: \"%s\" %s", key, hostport, why);
        return CIS_EINVAL;
    }
    snprintf(portstr, sizeof portstr, "%u", port);
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    hints.ai_flags = AI_PASSIVE | AI_NUMERICSERV;
    rc = getaddrinfo(host, portstr, &hints, &ai);
    if (rc != 0) {
        snprintf(err, errlen, "%s: %s: %s", key, host, gai_strerror(rc));
        return CIS_EINVAL;
    }
    fd = socket(ai->ai_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0 || setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one) != 0 ||
        (ai->ai_family == AF_INET6 &&
         setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &one, sizeof one) != 0) ||
        bind(fd, ai->ai_addr, ai->ai_addrlen) != 0 || listen(fd, 128) != 0 ||
        getsockname(fd, (struct sockaddr *)&ss, &sl) != 0) {
        snprintf(err, errlen, "%s: cannot listen on %s: %s", key, hostport, strerror(errno));
        if (fd >= 0)
            close(fd);
        freeaddrinfo(ai);
        return CIS_EIO;
    }
    freeaddrinfo(ai);
    if (ss.ss_family == AF_INET6) {
        const struct sockaddr_in6 *s6 = (const struct sockaddr_in6 *)&ss;
        inet_ntop(AF_INET6, &s6->sin6_addr, ip, sizeof ip);
        snprintf(l->addr, sizeof l->addr, "[%s]:%u", ip, (unsigned)ntohs(s6->sin6_port));
    } else {
        const struct sockaddr_in *s4 = (const struct sockaddr_in *)&ss;
        inet_ntop(AF_INET, &s4->sin_addr, ip, sizeof ip);
        snprintf(l->addr, sizeof l->addr, "%s:%u", ip, (unsigned)ntohs(s4->sin_port));
    }
    l->fd = fd;
    return 0;
}

static int start_daemon(struct listener *l, const struct recv_config *cfg, char *err,
                        size_t errlen)
{
    struct recv_http *h = l->h;
    unsigned flags = MHD_USE_INTERNAL_POLLING_THREAD | MHD_USE_THREAD_PER_CONNECTION |
                     MHD_USE_POLL | MHD_USE_ITC | MHD_USE_ERROR_LOG;
    unsigned limit = (unsigned)cfg->max_connections;
    unsigned timeout = (unsigned)((cfg->connection_timeout_ms + 999) / 1000);
    /* The ingest limits MHD enforces itself, before any callback: limits.max_header_size (its
     * per-connection pool holds the request line and headers; more is answered 431) and
     * limits.max_connections_per_ip; and the connection list limits.request_timeout needs. */
    struct MHD_OptionItem opts[] = {
        {MHD_OPTION_CONNECTION_MEMORY_LIMIT, (intptr_t)cfg->max_header_size, NULL},
        {MHD_OPTION_PER_IP_CONNECTION_LIMIT, (intptr_t)cfg->max_connections_per_ip, NULL},
        {MHD_OPTION_NOTIFY_CONNECTION, (intptr_t)on_connection, h},
        {MHD_OPTION_END, 0, NULL},
    };

    if (l->tls) {
        l->d = MHD_start_daemon(
            flags | MHD_USE_TLS, 0, NULL, NULL, on_request, l, MHD_OPTION_EXTERNAL_LOGGER,
            on_mhd_log, NULL, MHD_OPTION_LISTEN_SOCKET, l->fd, MHD_OPTION_NOTIFY_COMPLETED,
            on_completed, l, MHD_OPTION_ARRAY, opts,
            MHD_OPTION_CONNECTION_LIMIT, limit, MHD_OPTION_CONNECTION_TIMEOUT, timeout,
            MHD_OPTION_HTTPS_MEM_KEY, h->key_pem, MHD_OPTION_HTTPS_MEM_CERT, h->cert_pem,
            MHD_OPTION_HTTPS_MEM_TRUST, h->ca_pem, MHD_OPTION_HTTPS_PRIORITIES, TLS_PRIORITIES,
            MHD_OPTION_END);
    } else {
        l->d = MHD_start_daemon(flags, 0, NULL, NULL, on_request, l, MHD_OPTION_EXTERNAL_LOGGER,
                                on_mhd_log, NULL, MHD_OPTION_LISTEN_SOCKET, l->fd,
                                MHD_OPTION_NOTIFY_COMPLETED, on_completed, l, MHD_OPTION_ARRAY,
                                opts, MHD_OPTION_CONNECTION_LIMIT, limit,
                                MHD_OPTION_CONNECTION_TIMEOUT, timeout, MHD_OPTION_END);
    }
    if (l->d == NULL) {
        snprintf(err, errlen, "cannot start %s listener on %s%s", l->tls ? "HTTPS" : "HTTP",
                 l->addr, l->tls ? " (check the listen.tls key, certificate and CA files)" : "");
        return CIS_EIO;
    }
    return 0;
}

static void stop_listener(struct listener *l)
{
    if (l->d != NULL) {
        MHD_stop_daemon(l->d);
        l->d = NULL;
    }
    if (l->fd >= 0) {
        close(l->fd);
        l->fd = -1;
    }
}

static void quiesce_listener(struct listener *l)
{
    if (l->d != NULL) {
        /* MHD hands the listen socket back: closing it refuses new connections now. */
        MHD_socket fd = MHD_quiesce_daemon(l->d);
        if (fd != MHD_INVALID_SOCKET && fd == l->fd) {
            close(l->fd);
            l->fd = -1;
        }
    }
}

void recv_http_stop(struct recv_http *h, int grace_ms)
{
    int64_t deadline;

    if (h == NULL)
        return;
    if (h->sweeper_on) {
        pthread_mutex_lock(&h->conn_mu);
        h->stopping = 1;
        pthread_cond_signal(&h->conn_cv);
        pthread_mutex_unlock(&h->conn_mu);
        pthread_join(h->sweeper, NULL);
        h->sweeper_on = 0;
    }
    quiesce_listener(&h->main);
    quiesce_listener(&h->api);
    deadline = cis_mono_ms() + grace_ms;
    while (__atomic_load_n(&h->inflight, __ATOMIC_SEQ_CST) > 0 && cis_mono_ms() < deadline) {
        struct timespec ts = {0, 20 * 1000 * 1000};
        nanosleep(&ts, NULL);
    }
    stop_listener(&h->main);
    stop_listener(&h->api);
    /* MHD reported every close while it stopped; nothing is left on the list. */
    pthread_cond_destroy(&h->conn_cv);
    pthread_mutex_destroy(&h->conn_mu);
    recv_rate_destroy(h->rate);
    free(h->key_pem);
    free(h->cert_pem);
    free(h->ca_pem);
    free(h);
}

int recv_http_start(const struct recv_config *cfg, const struct recv_store_ops *ops,
                    struct recv_store *st, struct recv_registry *reg, struct recv_http **out,
                    char *err, size_t errlen)
{
    struct recv_http *h;
    pthread_condattr_t ca;
    int rc;

    *out = NULL;
    h = calloc(1, sizeof *h);
    if (h == NULL) {
        snprintf(err, errlen, "out of memory");
        return CIS_ENOMEM;
    }
    /* The sweeper waits on the monotonic clock, as limits.request_timeout is measured. */
    pthread_mutex_init(&h->conn_mu, NULL);
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(&h->conn_cv, &ca);
    pthread_condattr_destroy(&ca);
    h->request_timeout_ms = cfg->request_timeout_ms;
    h->ops = ops;
    h->st = st;
    h->max_body = cfg->max_body;
    h->ingest = (struct recv_ingest_ctx){
        .ops = ops,
        .st = st,
        .reg = reg,
        .max_body = cfg->max_body,
        .limits = {.max_decompressed = (size_t)cfg->max_decompressed,
                   .max_records = (size_t)cfg->max_records},
        .identity_name = "certificate CN",
    };
    h->main = (struct listener){.h = h, .fd = -1, .ingest = 1, .tls = !cfg->insecure_plain_http};
    h->api = (struct listener){.h = h, .fd = -1};

    if (h->main.tls) {
        if (!MHD_is_feature_supported(MHD_FEATURE_TLS)) {
            snprintf(err, errlen, "libmicrohttpd was built without TLS support");
            rc = CIS_EIO;
            goto out;
        }
        if ((rc = read_pem("listen.tls.key_file", cfg->tls_key_file, &h->key_pem, err, errlen)) ||
            (rc = read_pem("listen.tls.cert_file", cfg->tls_cert_file, &h->cert_pem, err,
                           errlen)) ||
            (rc = read_pem("listen.tls.client_ca_file", cfg->tls_client_ca_file, &h->ca_pem, err,
                           errlen)))
            goto out;
    }
    rc = open_listener(&h->main, "listen.http", cfg->listen_http, err, errlen);
    if (rc)
        goto out;
    if (cfg->listen_api != NULL && cfg->listen_api[0] != '\0') {
        rc = open_listener(&h->api, "listen.api", cfg->listen_api, err, errlen);
        if (rc)
            goto out;
    }
    if (cfg->rate > 0 && h->main.tls) {
        /* Keys are client certificate CNs, so their number is the fleet's: 64k is plenty. */
        rc = recv_rate_create(cfg->rate, cfg->rate_burst, 65536, &h->rate);
        if (rc) {
            snprintf(err, errlen, "limits.rate: %s", cis_strerror(rc));
            goto out;
        }
    } else if (cfg->rate > 0) {
        cis_info("[http] limits.rate does not apply to plain HTTP (no client identity before "
                 "the body is decoded): the TLS proxy in front must rate limit");
    }
    rc = pthread_create(&h->sweeper, NULL, sweeper_main, h);
    if (rc) {
        snprintf(err, errlen, "cannot start the request timeout thread: %s", strerror(rc));
        rc = CIS_EIO;
        goto out;
    }
    h->sweeper_on = 1;
    rc = start_daemon(&h->main, cfg, err, errlen);
    if (rc)
        goto out;
    if (h->api.fd >= 0) {
        rc = start_daemon(&h->api, cfg, err, errlen);
        if (rc)
            goto out;
    }
    cis_info("[http] listening on %s", h->main.addr);
    if (h->api.d != NULL)
        cis_info("[http] api listening on %s", h->api.addr);
    if (!h->main.tls)
        cis_warn("[http] listen.insecure_plain_http is true: serving plain HTTP on %s without "
                 "client authentication; any agent id is accepted",
                 h->main.addr);
    *out = h;
    h = NULL;
out:
    if (h != NULL)
        recv_http_stop(h, 0);
    return rc;
}

const char *recv_http_address(const struct recv_http *h)
{
    return h->main.addr;
}

const char *recv_http_api_address(const struct recv_http *h)
{
    return h->api.d != NULL ? h->api.addr : NULL;
}
