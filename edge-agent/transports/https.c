/* Transport "https": POST each batch to the receiver with libcurl's multi interface, driven
 * by the agent's event loop (curl's sockets and timer are registered with the loop). */
#include <curl/curl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "agent.h"
#include "tls_diag.h"
#include "cistern/sign.h"
#include "cistern/backoff.h"
#include "cistern/err.h"
#include "cistern/log.h"

#define RESP_MAX 4096

struct xfer {
    struct https *h;
    struct xfer *next;
    CURL *easy;
    uint8_t *body;
    uint64_t token;
    char resp[RESP_MAX];
    size_t resp_len;
    char errbuf[CURL_ERROR_SIZE];
    /* After a refused server certificate: a second handshake that only reads the certificate
     * (no verification, no request) so the words can name its dates and names. */
    CURL *diag;
    CURLcode rc;       /* the transfer's result, kept while diag runs */
    long verify;       /* CURLINFO_SSL_VERIFYRESULT of the transfer */
};

struct https {
    struct agent *a;
    const struct agent_config *cfg;
    CURLM *multi;
    struct curl_slist *headers;
    agent_sent_cb cb;
    void *ctx;
    int64_t timer_deadline; /* monotonic ms, or -1 */
    struct xfer *xfers;
};

static void on_sock(void *ctx, int fd, short revents)
{
    struct https *h = ctx;
    int mask = 0, running;
    if (revents & POLLIN)
        mask |= CURL_CSELECT_IN;
    if (revents & POLLOUT)
        mask |= CURL_CSELECT_OUT;
    if (revents & (POLLERR | POLLHUP))
        mask |= CURL_CSELECT_ERR;
    curl_multi_socket_action(h->multi, fd, mask, &running);
}

static int sock_cb(CURL *e, curl_socket_t s, int what, void *userp, void *socketp)
{
    struct https *h = userp;
    short ev = 0;
    if (what == CURL_POLL_REMOVE) {
        agent_loop_unwatch(h->a, s);
        return 0;
    }
    if (what == CURL_POLL_IN || what == CURL_POLL_INOUT)
        ev |= POLLIN;
    if (what == CURL_POLL_OUT || what == CURL_POLL_INOUT)
        ev |= POLLOUT;
    agent_loop_watch(h->a, s, ev, on_sock, h);
    return 0;
}

static int timer_cb(CURLM *m, long timeout_ms, void *userp)
{
    struct https *h = userp;
    h->timer_deadline = timeout_ms < 0 ? -1 : cis_mono_ms() + timeout_ms;
    return 0;
}

static size_t write_cb(char *ptr, size_t size, size_t nmemb, void *userp)
{
    struct xfer *x = userp;
    size_t n = size * nmemb, room = RESP_MAX - 1 - x->resp_len;
    /* Keep the head of the answer (the JSON verdict); the rest is not needed. */
    memcpy(x->resp + x->resp_len, ptr, n < room ? n : room);
    x->resp_len += n < room ? n : room;
    x->resp[x->resp_len] = '\0';
    return n;
}

/* Words a technician can act on, for the failures seen in the field. */
static const char *explain(CURLcode rc)
{
    switch (rc) {
    case CURLE_COULDNT_RESOLVE_HOST: return "cannot resolve the receiver's host name (check forward.url and DNS)";
    case CURLE_COULDNT_CONNECT: return "cannot connect to the receiver (is it running, is the port open?)";
    case CURLE_OPERATION_TIMEDOUT: return "the receiver did not answer in time (forward.timeout)";
    case CURLE_PEER_FAILED_VERIFICATION: return "the receiver's certificate is not trusted by forward.tls.ca_file, or does not match the host in forward.url";
    case CURLE_SSL_CACERT_BADFILE: return "forward.tls.ca_file cannot be read or holds no certificate";
    case CURLE_SSL_CERTPROBLEM: return "the client certificate (forward.tls.cert_file) cannot be used";
    case CURLE_SSL_CONNECT_ERROR: return "the TLS handshake failed (certificate refused, expired, or no common TLS version)";
    case CURLE_SEND_ERROR:
    case CURLE_RECV_ERROR: return "the connection to the receiver broke";
    default: return NULL;
    }
}

/* The receiver, as the certificate words name it (tls_diag.c). */
static void https_peer(const struct https *h, struct agent_tls_peer *p)
{
    *p = (struct agent_tls_peer){
        .kind = "receiver",
        .url = h->cfg->url,
        .ca_file = h->cfg->ca_file,
        .ca_key = "forward.tls.ca_file",
        .cert_key = "forward.tls.cert_file",
        .url_key = "forward.url",
        .timeout_ms = h->cfg->timeout_ms < 5000 ? h->cfg->timeout_ms : 5000,
    };
}

/* Say which TLS check failed, in words that name the file or setting to fix. Returns 0 when
 * this is not a TLS failure it knows, so the generic words apply. */
static int tls_words(struct xfer *x, CURLcode rc, char *out, size_t outlen)
{
    struct agent_tls_peer p;
    struct agent_tls_failure f = {rc, x->errbuf, x->verify};

    https_peer(x->h, &p);
    return agent_tls_words(&p, &f, x->diag, out, outlen);
}

/* Pull "error":"..." out of the receiver's JSON answer, or keep the raw text. */
static void reason_from_body(const char *body, char *out, size_t outlen)
{
    const char *p = strstr(body, "\"error\"");
    size_t n = 0;
    if (p && (p = strchr(p + 7, '"')) != NULL) {
        p++;
        while (p[n] && p[n] != '"' && n + 1 < outlen)
            n++;
        snprintf(out, outlen, "%.*s", (int)n, p);
        return;
    }
    snprintf(out, outlen, "%s", body);
}

static void xfer_free(struct xfer *x)
{
    struct https *h = x->h;
    for (struct xfer **pp = &h->xfers; *pp; pp = &(*pp)->next) {
        if (*pp == x) {
            *pp = x->next;
            break;
        }
    }
    curl_multi_remove_handle(h->multi, x->easy);
    curl_easy_cleanup(x->easy);
    if (x->diag) {
        curl_multi_remove_handle(h->multi, x->diag);
        curl_easy_cleanup(x->diag);
    }
    free(x->body);
    free(x);
}

static void classify(struct xfer *x, CURLcode rc, struct agent_send_result *r)
{
    memset(r, 0, sizeof(*r));
    if (rc != CURLE_OK) {
        const char *why = explain(rc);
        r->status = CIS_EAGAIN;
        if (tls_words(x, rc, r->reason, sizeof(r->reason)))
            return;
        snprintf(r->reason, sizeof(r->reason), "%s%s%s", why ? why : curl_easy_strerror(rc),
                 x->errbuf[0] ? ": " : "", x->errbuf);
        return;
    }
    curl_easy_getinfo(x->easy, CURLINFO_RESPONSE_CODE, &r->code);
    if (r->code >= 200 && r->code < 300) {
        r->status = 0;
        snprintf(r->reason, sizeof(r->reason), "%s", x->resp);
    } else if (r->code == 401 || r->code == 408 || r->code == 429 || r->code >= 500 ||
               r->code < 200 || (r->code >= 300 && r->code < 400)) {
        /* 401 is about this gateway's certificate (expired, not yet valid, from another CA),
         * not about the batch: the records stay spooled, with full backoff, until it is
         * renewed, as they do when the handshake itself fails. */
        curl_off_t ra = 0;
        r->status = CIS_EAGAIN;
        if (curl_easy_getinfo(x->easy, CURLINFO_RETRY_AFTER, &ra) == CURLE_OK && ra > 0)
            r->retry_after_ms = (int64_t)ra * 1000;
        snprintf(r->reason, sizeof(r->reason), "HTTP %ld: %s", r->code,
                 r->code == 401 ? "the receiver refused this gateway: " : "");
        reason_from_body(x->resp, r->reason + strlen(r->reason), sizeof(r->reason) - strlen(r->reason));
    } else {
        /* Any other 4xx is the receiver's final word on this batch: never retried. */
        r->status = CIS_EINVAL;
        snprintf(r->reason, sizeof(r->reason), "HTTP %ld: ", r->code);
        reason_from_body(x->resp, r->reason + strlen(r->reason), sizeof(r->reason) - strlen(r->reason));
    }
}

/* Start a handshake that only reads the receiver's certificate, once its verification
 * failed, so tls_words can name dates and names. Verification is off on this one handle,
 * which sends nothing and is closed at once. Returns 0 if started. */
static int diag_start(struct xfer *x)
{
    struct https *h = x->h;
    struct agent_tls_peer p;
    CURL *e;

    https_peer(h, &p);
    e = agent_tls_diag_handle(&p);
    if (!e)
        return CIS_ENOMEM;
    curl_easy_setopt(e, CURLOPT_PRIVATE, x);
    curl_multi_remove_handle(h->multi, x->easy);
    if (curl_multi_add_handle(h->multi, e) != CURLM_OK) {
        curl_easy_cleanup(e);
        return CIS_EIO;
    }
    x->diag = e;
    return 0;
}

static void check_done(struct https *h)
{
    CURLMsg *m;
    int left;
    /* Collect first: callbacks may start new transfers. */
    struct done {
        struct xfer *x;
        CURLcode rc;
        int diag; /* the diagnostic handshake ended, not the transfer */
    } done[64];
    size_t n = 0;
    while (n < 64 && (m = curl_multi_info_read(h->multi, &left)) != NULL) {
        if (m->msg != CURLMSG_DONE)
            continue;
        struct xfer *x = NULL;
        curl_easy_getinfo(m->easy_handle, CURLINFO_PRIVATE, (char **)&x);
        done[n++] = (struct done){x, m->data.result, m->easy_handle == x->diag};
    }
    for (size_t i = 0; i < n; i++) {
        struct agent_send_result r;
        struct xfer *x = done[i].x;
        uint64_t token = x->token;
        if (!done[i].diag) {
            x->rc = done[i].rc;
            if (curl_easy_getinfo(x->easy, CURLINFO_SSL_VERIFYRESULT, &x->verify) != CURLE_OK)
                x->verify = 0;
            /* The verdict waits for the certificate's details; without them, the words
             * are only less precise. */
            if (x->rc == CURLE_PEER_FAILED_VERIFICATION && diag_start(x) == 0)
                continue;
        }
        classify(x, x->rc, &r);
        xfer_free(x);
        h->cb(h->ctx, token, &r);
    }
}

static int https_create(struct agent *a, const struct agent_config *cfg, agent_sent_cb cb,
                        void *ctx, void **out)
{
    struct https *h = calloc(1, sizeof(*h));
    char auth[1024];
    if (!h)
        return CIS_ENOMEM;
    h->a = a;
    h->cfg = cfg;
    h->cb = cb;
    h->ctx = ctx;
    h->timer_deadline = -1;
    h->multi = curl_multi_init();
    if (!h->multi) {
        free(h);
        return CIS_ENOMEM;
    }
    curl_multi_setopt(h->multi, CURLMOPT_SOCKETFUNCTION, sock_cb);
    curl_multi_setopt(h->multi, CURLMOPT_SOCKETDATA, h);
    curl_multi_setopt(h->multi, CURLMOPT_TIMERFUNCTION, timer_cb);
    curl_multi_setopt(h->multi, CURLMOPT_TIMERDATA, h);
    curl_multi_setopt(h->multi, CURLMOPT_MAX_HOST_CONNECTIONS, (long)cfg->in_flight);
    h->headers = curl_slist_append(NULL, "Content-Type: " CIS_SIGNED_BATCH_CONTENT_TYPE);
    h->headers = curl_slist_append(h->headers, "Expect:");
    if (cfg->token) {
        snprintf(auth, sizeof(auth), "Authorization: Bearer %s", cfg->token);
        h->headers = curl_slist_append(h->headers, auth);
    }
    *out = h;
    return 0;
}

static int https_send(void *t, uint8_t *body, size_t len, uint64_t token)
{
    struct https *h = t;
    struct xfer *x = calloc(1, sizeof(*x));
    if (!x) {
        free(body);
        return CIS_ENOMEM;
    }
    x->h = h;
    x->body = body;
    x->token = token;
    x->easy = curl_easy_init();
    if (!x->easy) {
        free(body);
        free(x);
        return CIS_ENOMEM;
    }
    CURL *e = x->easy;
    curl_easy_setopt(e, CURLOPT_URL, h->cfg->url);
    curl_easy_setopt(e, CURLOPT_POST, 1L);
    curl_easy_setopt(e, CURLOPT_POSTFIELDS, body);
    curl_easy_setopt(e, CURLOPT_POSTFIELDSIZE_LARGE, (curl_off_t)len);
    curl_easy_setopt(e, CURLOPT_HTTPHEADER, h->headers);
    curl_easy_setopt(e, CURLOPT_WRITEFUNCTION, write_cb);
    curl_easy_setopt(e, CURLOPT_WRITEDATA, x);
    curl_easy_setopt(e, CURLOPT_PRIVATE, x);
    curl_easy_setopt(e, CURLOPT_ERRORBUFFER, x->errbuf);
    curl_easy_setopt(e, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(e, CURLOPT_TIMEOUT_MS, (long)h->cfg->timeout_ms);
    curl_easy_setopt(e, CURLOPT_CONNECTTIMEOUT_MS,
                     (long)(h->cfg->timeout_ms < 10000 ? h->cfg->timeout_ms : 10000));
    curl_easy_setopt(e, CURLOPT_PROTOCOLS_STR, "https");
    /* Verification is always on: there is no switch to turn it off. */
    curl_easy_setopt(e, CURLOPT_SSL_VERIFYPEER, 1L);
    curl_easy_setopt(e, CURLOPT_SSL_VERIFYHOST, 2L);
    curl_easy_setopt(e, CURLOPT_SSLVERSION, (long)CURL_SSLVERSION_TLSv1_2);
    if (h->cfg->ca_file)
        curl_easy_setopt(e, CURLOPT_CAINFO, h->cfg->ca_file);
    if (h->cfg->cert_file) {
        curl_easy_setopt(e, CURLOPT_SSLCERT, h->cfg->cert_file);
        curl_easy_setopt(e, CURLOPT_SSLKEY, h->cfg->key_file);
    }
    x->next = h->xfers;
    h->xfers = x;
    if (curl_multi_add_handle(h->multi, e) != CURLM_OK) {
        xfer_free(x);
        return CIS_EIO;
    }
    return 0;
}

static int64_t https_tick(void *t, int64_t now)
{
    struct https *h = t;
    if (h->timer_deadline >= 0 && now >= h->timer_deadline) {
        int running;
        h->timer_deadline = -1;
        curl_multi_socket_action(h->multi, CURL_SOCKET_TIMEOUT, 0, &running);
    }
    check_done(h);
    return h->timer_deadline;
}

static void https_abort_all(void *t)
{
    struct https *h = t;
    while (h->xfers) {
        struct agent_send_result r = {.status = CIS_EAGAIN};
        uint64_t token = h->xfers->token;
        snprintf(r.reason, sizeof(r.reason), "aborted at shutdown");
        xfer_free(h->xfers);
        h->cb(h->ctx, token, &r);
    }
}

static void https_destroy(void *t)
{
    struct https *h = t;
    if (!h)
        return;
    while (h->xfers)
        xfer_free(h->xfers);
    curl_multi_cleanup(h->multi);
    curl_slist_free_all(h->headers);
    free(h);
}

const struct agent_transport_ops agent_transport_https = {
    .name = "https",
    .create = https_create,
    .send = https_send,
    .tick = https_tick,
    .abort_all = https_abort_all,
    .destroy = https_destroy,
};
