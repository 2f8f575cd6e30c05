/* Receiver HTTP(S) listeners on libmicrohttpd: mTLS identity from the client certificate's CN,
 * routing, POST /v1/batches (decode, check, store, answer after COMMIT) and the GET routes. */
#include "ingest/http.h"

#include <errno.h>
#include <inttypes.h>
#include <netdb.h>
#include <netinet/in.h>
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

static enum MHD_Result answer(struct req *r, struct MHD_Connection *c, unsigned status,
                              struct recv_buf *b, const char *hname, const char *hval)
{
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

/* Verify the peer certificate against the client CA and copy its CN into CN.
 * Returns 0, or -1 with a reason in WHY. */
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
    rc = gnutls_certificate_verify_peers2(sess, &status);
    if (rc == GNUTLS_E_NO_CERTIFICATE_FOUND) {
        snprintf(why, whylen, "client certificate required");
        return -1;
    }
    if (rc < 0 || status != 0) {
        snprintf(why, whylen, "client certificate not verified");
        return -1;
    }
    certs = gnutls_certificate_get_peers(sess, &n);
    if (certs == NULL || n == 0) {
        snprintf(why, whylen, "client certificate required");
        return -1;
    }
    if (gnutls_x509_crt_init(&crt) < 0)
        goto out;
    if (gnutls_x509_crt_import(crt, &certs[0], GNUTLS_X509_FMT_DER) < 0 ||
        gnutls_x509_crt_get_dn_by_oid(crt, GNUTLS_OID_X520_COMMON_NAME, 0, 0, cn, &sz) < 0 ||
        cn[0] == '\0') {
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

static int content_type_ok(const char *ct)
{
    size_t n = strlen(CIS_BATCH_CONTENT_TYPE);

    if (ct == NULL)
        return 0;
    while (*ct == ' ' || *ct == '\t')
        ct++;
    if (strncasecmp(ct, CIS_BATCH_CONTENT_TYPE, n) != 0)
        return 0;
    ct += n;
    while (*ct == ' ' || *ct == '\t')
        ct++;
    return *ct == '\0' || *ct == ';';
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

    if (!content_type_ok(MHD_lookup_connection_value(c, MHD_HEADER_KIND,
                                                     MHD_HTTP_HEADER_CONTENT_TYPE)))
        return answer_error(r, c, MHD_HTTP_UNSUPPORTED_MEDIA_TYPE,
                            "Content-Type must be " CIS_BATCH_CONTENT_TYPE, NULL, NULL);
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

static enum MHD_Result batch_end(struct req *r, struct MHD_Connection *c)
{
    struct recv_http *h = r->l->h;
    struct recv_ingest_result res;
    char why[600];
    enum MHD_Result ret;
    unsigned status;

    if (r->too_big)
        return answer_error(r, c, MHD_HTTP_CONTENT_TOO_LARGE, "request body too large", NULL,
                            NULL);
    switch (recv_ingest_batch(&h->ingest, r->body, r->len, r->l->tls ? r->cn : NULL, &res, why,
                              sizeof why)) {
    case RECV_INGEST_OK:
        cis_debug("[http] batch from %s epoch %" PRIu64 ": %" PRIu64 " accepted, %" PRIu64
                  " duplicates",
                  res.agent_id, res.epoch, res.accepted, res.duplicates);
        ret = answer(r, c, MHD_HTTP_OK, &res.answer, NULL, NULL);
        break;
    case RECV_INGEST_RETRY:
        /* 503: nothing was committed; the agent keeps the batch and retries. */
        ret = answer_error(r, c, MHD_HTTP_SERVICE_UNAVAILABLE, why, MHD_HTTP_HEADER_RETRY_AFTER,
                           "5");
        break;
    default:
        if (res.reject == RECV_REJECT_IDENTITY) {
            cis_debug("[http] batch rejected: %s", why);
            status = MHD_HTTP_FORBIDDEN;
        } else {
            cis_debug("[http] batch rejected (%s): %s", r->cn[0] ? r->cn : "-", why);
            status = res.reject == RECV_REJECT_TOO_BIG ? MHD_HTTP_CONTENT_TOO_LARGE
                                                       : MHD_HTTP_BAD_REQUEST;
        }
        ret = answer_error(r, c, status, why, NULL, NULL);
        break;
    }
    recv_ingest_result_free(&res);
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
    if (rt == R_BATCHES)
        return batch_begin(r, c);
    return serve_get(r, c, rt, id);
}

static void on_completed(void *cls, struct MHD_Connection *c, void **con_cls,
                         enum MHD_RequestTerminationCode toe)
{
    struct listener *l = cls;
    struct req *r = *con_cls;

    if (r == NULL)
        return;
    free(r->body);
    free(r);
    *con_cls = NULL;
    __atomic_sub_fetch(&l->h->inflight, 1, __ATOMIC_SEQ_CST);
}

static void on_mhd_log(void *cls, const char *fmt, va_list ap)
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

    if (l->tls) {
        l->d = MHD_start_daemon(
            flags | MHD_USE_TLS, 0, NULL, NULL, on_request, l, MHD_OPTION_EXTERNAL_LOGGER,
            on_mhd_log, NULL, MHD_OPTION_LISTEN_SOCKET, l->fd, MHD_OPTION_NOTIFY_COMPLETED,
            on_completed, l, MHD_OPTION_CONNECTION_LIMIT, limit, MHD_OPTION_CONNECTION_TIMEOUT, timeout,
            MHD_OPTION_HTTPS_MEM_KEY, h->key_pem, MHD_OPTION_HTTPS_MEM_CERT, h->cert_pem,
            MHD_OPTION_HTTPS_MEM_TRUST, h->ca_pem, MHD_OPTION_HTTPS_PRIORITIES, TLS_PRIORITIES,
            MHD_OPTION_END);
    } else {
        l->d = MHD_start_daemon(flags, 0, NULL, NULL, on_request, l, MHD_OPTION_EXTERNAL_LOGGER,
                                on_mhd_log, NULL, MHD_OPTION_LISTEN_SOCKET, l->fd,
                                MHD_OPTION_NOTIFY_COMPLETED, on_completed, l,
                                MHD_OPTION_CONNECTION_LIMIT, limit, MHD_OPTION_CONNECTION_TIMEOUT,
                                timeout, MHD_OPTION_END);
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
    quiesce_listener(&h->main);
    quiesce_listener(&h->api);
    deadline = cis_mono_ms() + grace_ms;
    while (__atomic_load_n(&h->inflight, __ATOMIC_SEQ_CST) > 0 && cis_mono_ms() < deadline) {
        struct timespec ts = {0, 20 * 1000 * 1000};
        nanosleep(&ts, NULL);
    }
    stop_listener(&h->main);
    stop_listener(&h->api);
    free(h->key_pem);
    free(h->cert_pem);
    free(h->ca_pem);
    free(h);
}

int recv_http_start(const struct recv_config *cfg, const struct recv_store_ops *ops,
                    struct recv_store *st, struct recv_http **out, char *err, size_t errlen)
{
    struct recv_http *h;
    int rc;

    *out = NULL;
    h = calloc(1, sizeof *h);
    if (h == NULL) {
        snprintf(err, errlen, "out of memory");
        return CIS_ENOMEM;
    }
    h->ops = ops;
    h->st = st;
    h->max_body = cfg->max_body;
    h->ingest = (struct recv_ingest_ctx){
        .ops = ops,
        .st = st,
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
