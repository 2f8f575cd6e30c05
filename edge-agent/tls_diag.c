/* Why a TLS peer's certificate was refused, in words: libcurl's verdict (its error, OpenSSL's
 * verify result) made precise with the dates and names of the certificate, which a second,
 * non-verifying handshake reads. Used by the https transport (on its multi handle) and the mqtt
 * transport (blocking, on a worker thread: Paho says only "certificate verify failed"). */
#include "tls_diag.h"

#include <stdio.h>
#include <string.h>

#include "cistern/backoff.h"
#include "cistern/err.h"

/* OpenSSL's X509_V_ERR_* values (x509_vfy.h; stable across releases), as libcurl reports them
 * in CURLINFO_SSL_VERIFYRESULT when its TLS backend is OpenSSL, as on Debian. Spelled out
 * here so the agent needs no OpenSSL headers. */
enum {
    OSSL_V_UNABLE_TO_GET_ISSUER_CERT = 2,
    OSSL_V_CERT_NOT_YET_VALID = 9,
    OSSL_V_CERT_HAS_EXPIRED = 10,
    OSSL_V_DEPTH_ZERO_SELF_SIGNED_CERT = 18,
    OSSL_V_SELF_SIGNED_CERT_IN_CHAIN = 19,
    OSSL_V_UNABLE_TO_GET_ISSUER_CERT_LOCALLY = 20,
    OSSL_V_UNABLE_TO_VERIFY_LEAF_SIGNATURE = 21,
    OSSL_V_INVALID_PURPOSE = 26,
    OSSL_V_HOSTNAME_MISMATCH = 62,
    OSSL_V_IP_ADDRESS_MISMATCH = 64,
};

static int backend_is_openssl(void)
{
    const curl_version_info_data *v = curl_version_info(CURLVERSION_NOW);
    return v && v->ssl_version && strncmp(v->ssl_version, "OpenSSL", 7) == 0;
}

/* The value of field NAME ("Expire date") of the leaf certificate the diagnostic handshake
 * DIAG read, or "" when there is none. Borrows from DIAG's certinfo. */
static const char *leaf_field(CURL *diag, const char *name)
{
    struct curl_certinfo *ci = NULL;
    size_t n = strlen(name);

    if (!diag || curl_easy_getinfo(diag, CURLINFO_CERTINFO, &ci) != CURLE_OK || !ci ||
        ci->num_of_certs < 1)
        return "";
    for (struct curl_slist *l = ci->certinfo[0]; l; l = l->next)
        if (strncmp(l->data, name, n) == 0 && l->data[n] == ':')
            return l->data + n + 1;
    return "";
}

/* The host part of the peer's URL, for the hostname-mismatch words. */
static void url_host(const struct agent_tls_peer *p, char *out, size_t outlen)
{
    CURLU *u = curl_url();
    char *host = NULL;

    snprintf(out, outlen, "the host in %s", p->url_key);
    if (u && curl_url_set(u, CURLUPART_URL, p->url, 0) == CURLUE_OK &&
        curl_url_get(u, CURLUPART_HOST, &host, 0) == CURLUE_OK)
        snprintf(out, outlen, "%s", host);
    curl_free(host);
    curl_url_cleanup(u);
}

static int errbuf_has(const struct agent_tls_failure *f, const char *what)
{
    return f->errbuf && strstr(f->errbuf, what) != NULL;
}

static void hostname_words(const struct agent_tls_peer *p, CURL *diag, char *out, size_t outlen)
{
    char host[256];
    const char *v = leaf_field(diag, "X509v3 Subject Alternative Name");

    if (!*v)
        v = leaf_field(diag, "Subject");
    url_host(p, host, sizeof host);
    snprintf(out, outlen, "the %s's certificate is for %s, not %s: use a name it holds in %s, "
             "or reissue it", p->kind, *v ? v : "other names", host, p->url_key);
}

int agent_tls_words(const struct agent_tls_peer *p, const struct agent_tls_failure *f, CURL *diag,
                    char *out, size_t outlen)
{
    const char *v;

    if (f->rc == CURLE_PEER_FAILED_VERIFICATION) {
        /* libcurl checks the name itself, once the chain verified, and then reports no
         * X509_V_ERR code of its own (1, "unspecified", with OpenSSL 3): only its words say. */
        if (errbuf_has(f, "target host name") || errbuf_has(f, "does not match")) {
            hostname_words(p, diag, out, outlen);
            return AGENT_TLS_NAME;
        }
        switch (backend_is_openssl() ? f->verify : -1) {
        case OSSL_V_CERT_HAS_EXPIRED:
            v = leaf_field(diag, "Expire date");
            snprintf(out, outlen, "the %s's certificate expired%s%s: renew it on the %s (or "
                     "check this gateway's clock)", p->kind, *v ? " on " : "", v, p->kind);
            return AGENT_TLS_CERT;
        case OSSL_V_CERT_NOT_YET_VALID:
            v = leaf_field(diag, "Start date");
            snprintf(out, outlen, "the %s's certificate is not valid before %s: check this "
                     "gateway's clock, or the certificate's start date", p->kind,
                     *v ? v : "a later date");
            return AGENT_TLS_CERT;
        case OSSL_V_DEPTH_ZERO_SELF_SIGNED_CERT:
            v = leaf_field(diag, "Subject");
            snprintf(out, outlen, "the %s's certificate%s%s%s is self-signed: give the %s one "
                     "signed by the CA in %s", p->kind, *v ? " (" : "", v, *v ? ")" : "",
                     p->kind, p->ca_key);
            return AGENT_TLS_CERT;
        case OSSL_V_SELF_SIGNED_CERT_IN_CHAIN:
        case OSSL_V_UNABLE_TO_GET_ISSUER_CERT:
        case OSSL_V_UNABLE_TO_GET_ISSUER_CERT_LOCALLY:
        case OSSL_V_UNABLE_TO_VERIFY_LEAF_SIGNATURE:
            v = leaf_field(diag, "Issuer");
            snprintf(out, outlen, "the %s's certificate is not signed by %s%s%s%s: set %s to "
                     "the CA that signed it", p->kind, p->ca_key, *v ? " (its issuer is " : "",
                     v, *v ? ")" : "", p->ca_key);
            return AGENT_TLS_CERT;
        case OSSL_V_INVALID_PURPOSE:
            snprintf(out, outlen, "the %s's certificate is not made for a TLS server "
                     "(extendedKeyUsage serverAuth is missing): reissue it", p->kind);
            return AGENT_TLS_CERT;
        case OSSL_V_HOSTNAME_MISMATCH:
        case OSSL_V_IP_ADDRESS_MISMATCH:
            hostname_words(p, diag, out, outlen);
            return AGENT_TLS_NAME;
        default:
            break;
        }
        snprintf(out, outlen, "the %s's certificate was refused (%s)", p->kind,
                 f->errbuf && f->errbuf[0] ? f->errbuf : curl_easy_strerror(f->rc));
        return AGENT_TLS_CERT;
    }
    if (f->rc != CURLE_SSL_CONNECT_ERROR && f->rc != CURLE_RECV_ERROR &&
        f->rc != CURLE_SEND_ERROR)
        return 0;
    if (errbuf_has(f, "protocol version") || errbuf_has(f, "unsupported protocol") ||
        errbuf_has(f, "no protocols available")) {
        snprintf(out, outlen, "the %s offers no TLS version this gateway accepts (TLS 1.2 or "
                 "newer only): upgrade the %s's TLS settings", p->kind, p->kind);
        return AGENT_TLS_HANDSHAKE;
    }
    if (errbuf_has(f, "alert")) {
        /* The peer ended the handshake with an alert: it refused what we presented. */
        snprintf(out, outlen, "the %s refused the TLS handshake (%s): if it names a "
                 "certificate, check %s and key_file", p->kind, f->errbuf, p->cert_key);
        return AGENT_TLS_HANDSHAKE;
    }
    return 0;
}

/* A handshake-only handle to P->url, verifying (against P->ca_file and the URL's host) or not
 * (and then reading the certificate), with TIMEOUT_MS. Caller frees. */
static CURL *handshake_handle(const struct agent_tls_peer *p, int verify, int64_t timeout_ms)
{
    CURL *e = curl_easy_init();

    if (!e)
        return NULL;
    curl_easy_setopt(e, CURLOPT_URL, p->url);
    curl_easy_setopt(e, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(e, CURLOPT_CONNECT_ONLY, 1L);
    curl_easy_setopt(e, CURLOPT_PROTOCOLS_STR, "https");
    curl_easy_setopt(e, CURLOPT_SSLVERSION, (long)CURL_SSLVERSION_TLSv1_2);
    curl_easy_setopt(e, CURLOPT_TIMEOUT_MS, (long)(timeout_ms > 0 ? timeout_ms : 1));
    if (verify) {
        curl_easy_setopt(e, CURLOPT_SSL_VERIFYPEER, 1L);
        curl_easy_setopt(e, CURLOPT_SSL_VERIFYHOST, 2L);
        if (p->ca_file)
            curl_easy_setopt(e, CURLOPT_CAINFO, p->ca_file);
    } else {
        curl_easy_setopt(e, CURLOPT_CERTINFO, 1L);
        curl_easy_setopt(e, CURLOPT_SSL_VERIFYPEER, 0L);
        curl_easy_setopt(e, CURLOPT_SSL_VERIFYHOST, 0L);
    }
    /* A peer that requires a client certificate (a broker) may otherwise end the handshake
     * before it is complete on our side, and then libcurl keeps no certificate details. */
    if (p->cert_file) {
        curl_easy_setopt(e, CURLOPT_SSLCERT, p->cert_file);
        if (p->key_file)
            curl_easy_setopt(e, CURLOPT_SSLKEY, p->key_file);
    }
    return e;
}

CURL *agent_tls_diag_handle(const struct agent_tls_peer *p)
{
    return handshake_handle(p, 0, p->timeout_ms);
}

/* libcurl's progress callback, also called while it connects: non-zero ends the handshake. */
static int stop_cb(void *clientp, curl_off_t dltotal, curl_off_t dlnow, curl_off_t ultotal,
                   curl_off_t ulnow)
{
    return atomic_load((const atomic_int *)clientp) != 0;
}

/* Perform E, a handshake-only handle, stoppable through STOP (may be NULL). */
static CURLcode perform(CURL *e, const atomic_int *stop)
{
    if (stop) {
        curl_easy_setopt(e, CURLOPT_NOPROGRESS, 0L);
        curl_easy_setopt(e, CURLOPT_XFERINFOFUNCTION, stop_cb);
        curl_easy_setopt(e, CURLOPT_XFERINFODATA, (void *)stop);
    }
    return curl_easy_perform(e);
}

int agent_tls_diagnose(const struct agent_tls_peer *p, const struct agent_tls_failure *f,
                       const atomic_int *stop, char *out, size_t outlen)
{
    struct agent_tls_failure vf = {CURLE_OK, "", 0};
    char errbuf[CURL_ERROR_SIZE] = "";
    int64_t deadline = cis_mono_ms() + p->timeout_ms;
    CURL *v = NULL, *d = NULL;
    int rc;

    if (outlen)
        out[0] = '\0';
    if (!f) {
        v = handshake_handle(p, 1, p->timeout_ms);
        if (!v)
            return CIS_ENOMEM;
        curl_easy_setopt(v, CURLOPT_ERRORBUFFER, errbuf);
        vf.rc = perform(v, stop);
        vf.errbuf = errbuf;
        if (curl_easy_getinfo(v, CURLINFO_SSL_VERIFYRESULT, &vf.verify) != CURLE_OK)
            vf.verify = 0;
        if (vf.rc == CURLE_OK) {
            rc = AGENT_TLS_PASSES; /* the failure is elsewhere */
            goto out;
        }
        f = &vf;
    }
    if (f->rc == CURLE_PEER_FAILED_VERIFICATION && deadline - cis_mono_ms() > 0) {
        /* Its result does not matter: whatever it read of the certificate is in its certinfo,
         * and without that the words only lack the dates and names. */
        d = handshake_handle(p, 0, deadline - cis_mono_ms());
        if (d && perform(d, stop) != CURLE_OK && stop && atomic_load(stop)) {
            rc = CIS_EAGAIN;
            goto out;
        }
    }
    rc = agent_tls_words(p, f, d, out, outlen);
    if (rc == 0)
        rc = CIS_EAGAIN;
out:
    curl_easy_cleanup(d);
    curl_easy_cleanup(v);
    return rc;
}
