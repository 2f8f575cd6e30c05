/* Why a TLS peer's certificate was refused, in words a technician can act on: shared by the
 * https and mqtt transports. */
#ifndef AGENT_TLS_DIAG_H
#define AGENT_TLS_DIAG_H

#include <curl/curl.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>

/* The peer a diagnosis is about. Every string is borrowed. */
struct agent_tls_peer {
    const char *kind;     /* "receiver", "broker": the words say "the <kind>'s certificate" */
    const char *url;      /* https://host:port/...: where the handshakes go; its host is the name
                           * the certificate must hold */
    const char *ca_file;  /* the CA the certificate must chain to; NULL: the system's CAs */
    const char *cert_file, *key_file; /* this gateway's client certificate, or NULL */
    const char *ca_key;   /* the settings the words name: "forward.tls.ca_file", */
    const char *cert_key; /* "forward.tls.cert_file", */
    const char *url_key;  /* "forward.url" */
    int64_t timeout_ms;   /* a handshake's timeout (agent_tls_diagnose: both handshakes') */
};

/* Which kind of check failed, as agent_tls_words and agent_tls_diagnose say. */
enum agent_tls_verdict {
    AGENT_TLS_PASSES = 0,    /* agent_tls_diagnose: the certificate passes every check */
    AGENT_TLS_CERT = 1,      /* verifying its chain, dates or purpose failed (OpenSSL's
                              * "certificate verify failed") */
    AGENT_TLS_NAME = 2,      /* it does not hold the host's name */
    AGENT_TLS_HANDSHAKE = 3, /* no TLS version in common, or the peer refused our handshake */
};

/* How a verifying handshake failed, as libcurl reported it. */
struct agent_tls_failure {
    CURLcode rc;
    const char *errbuf; /* CURLOPT_ERRORBUFFER's text, or "" */
    long verify;        /* CURLINFO_SSL_VERIFYRESULT */
};

/* A libcurl handle for the diagnostic handshake: to P->url, CONNECT_ONLY (TCP and TLS, no
 * request), certificate verification off and CERTINFO on, so that agent_tls_words can read the
 * certificate's dates and names even though it was refused. Nothing is sent over it. The
 * caller performs it (easy or multi) and frees it with curl_easy_cleanup. Returns NULL when out
 * of memory. */
CURL *agent_tls_diag_handle(const struct agent_tls_peer *p);

/* Say which check of the peer's certificate failed F, in OUT (OUTLEN bytes): expired on <date>,
 * not valid before <date>, self-signed, not signed by <ca_key> (its issuer), for <names> not
 * <host>, not made for a TLS server; or that the peer offers no TLS version we accept, or
 * refused our handshake. DIAG (borrowed, may be NULL) is a performed agent_tls_diag_handle():
 * without it the words only lack the dates and names. Returns the agent_tls_verdict (> 0) with
 * OUT filled, or 0 when F is not a TLS failure this knows (OUT untouched: the caller's generic
 * words apply). */
int agent_tls_words(const struct agent_tls_peer *p, const struct agent_tls_failure *f, CURL *diag,
                    char *out, size_t outlen);

/* The whole diagnosis, blocking (run it off the agent's loop): when F is NULL, first a
 * handshake that verifies the certificate against P->ca_file and the host of P->url, as libcurl
 * does for HTTPS; then, if verification failed, the diagnostic handshake; then the words. Both
 * handshakes together take at most P->timeout_ms; STOP (may be NULL) set non-zero ends them
 * within about a second. Returns the agent_tls_verdict: AGENT_TLS_PASSES (OUT ""), or the kind
 * of check that failed with the words in OUT; or CIS_EAGAIN when the diagnosis cannot tell (the
 * peer could not be reached, it timed out or was stopped, or the failure is not one it knows;
 * OUT ""), CIS_ENOMEM. */
int agent_tls_diagnose(const struct agent_tls_peer *p, const struct agent_tls_failure *f,
                       const atomic_int *stop, char *out, size_t outlen);

#endif
