/* Signed batches (see sign.h): key fingerprints, HMAC secrets, the agent's signer, and the
 * receiver's envelope decoder and verifier, on mbedTLS 2.28 (ECDSA verification on GnuTLS). */
#include "cistern/sign.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>
#include <unistd.h>

#include <gnutls/abstract.h>
#include <gnutls/crypto.h>
#include <gnutls/gnutls.h>
#include <mbedtls/constant_time.h>
#include <mbedtls/ctr_drbg.h>
#include <mbedtls/ecp.h>
#include <mbedtls/error.h>
#include <mbedtls/md.h>
#include <mbedtls/pk.h>
#include <mbedtls/platform_util.h>
#include <mbedtls/sha256.h>
#include <mbedtls/x509_crt.h>
#include <mbedtls/x509_csr.h>

#include "cistern/codec.h"
#include "cistern/err.h"
#include "cistern/log.h"

/* The envelope's bounds (sign.h). A P-256 SubjectPublicKeyInfo is 91 bytes, and a DER ECDSA
 * P-256 signature 8 to 72. */
#define SIGN_AGENT_ID_MAX 256
#define SIGN_SPKI_MAX 256
#define SIGN_KEY_DER_MAX 512 /* a P-256 private key in DER is about 121 bytes */
#define SIGN_ECDSA_SIG_MIN 8
#define SIGN_ECDSA_SIG_MAX 80
#define SIGN_HMAC_LEN 32
/* A secret file larger than this is refused without reading it all: a secret of at most
 * CIS_HMAC_SECRET_MAX bytes with any sane trailing whitespace fits. */
#define SIGN_SECRET_FILE_MAX 4096

/* sizeof() of each label counts its NUL, which is the 0x00 after it in the signed bytes and
 * in the key id's input. */
static const char sign_label[] = "cistern.v1.SignedBatch";
static const char sign_key_id_label[] = "cistern.v1.hmac-key-id";
static const char sign_drbg_label[] = "cistern batch signer";

static int sign__fail(char *why, size_t whylen, int code, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));

static int sign__fail(char *why, size_t whylen, int code, const char *fmt, ...)
{
    va_list ap;
    if (why && whylen) {
        va_start(ap, fmt);
        vsnprintf(why, whylen, fmt, ap);
        va_end(ap);
    }
    return code;
}

static void sign__hex(const uint8_t *b, size_t n, char *out)
{
    static const char hex[] = "0123456789abcdef";
    for (size_t i = 0; i < n; i++) {
        out[2 * i] = hex[b[i] >> 4];
        out[2 * i + 1] = hex[b[i] & 15];
    }
    out[2 * n] = '\0';
}

static int sign__hexval(char c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    if (c >= 'A' && c <= 'F')
        return c - 'A' + 10;
    return -1;
}

static int sign__agent_id_ok(const char *id)
{
    size_t n = id ? strnlen(id, SIGN_AGENT_ID_MAX + 1) : 0;
    if (n == 0 || n > SIGN_AGENT_ID_MAX)
        return 0;
    for (size_t i = 0; i < n; i++)
        if (!cis_agent_id_char_ok((unsigned char)id[i]))
            return 0;
    return 1;
}

/* --- fingerprints and secrets ---------------------------------------------------------- */

void cis_fpr_format(const uint8_t fpr[CIS_FPR_LEN], char out[CIS_FPR_STR_LEN])
{
    memcpy(out, "sha256:", 7);
    sign__hex(fpr, CIS_FPR_LEN, out + 7);
}

int cis_fpr_parse(const char *s, uint8_t fpr[CIS_FPR_LEN])
{
    uint8_t v[CIS_FPR_LEN];

    if (!s)
        return CIS_EINVAL;
    if (strncasecmp(s, "sha256:", 7) == 0)
        s += 7;
    if (strnlen(s, 2 * CIS_FPR_LEN + 1) != 2 * CIS_FPR_LEN)
        return CIS_EINVAL;
    for (size_t i = 0; i < CIS_FPR_LEN; i++) {
        int hi = sign__hexval(s[2 * i]), lo = sign__hexval(s[2 * i + 1]);
        if (hi < 0 || lo < 0)
            return CIS_EINVAL;
        v[i] = (uint8_t)(hi << 4 | lo);
    }
    memcpy(fpr, v, CIS_FPR_LEN); /* only on success: a refusal leaves FPR as it was */
    return CIS_OK;
}

void cis_fpr_of_spki(const uint8_t *der, size_t len, uint8_t fpr[CIS_FPR_LEN])
{
    /* Fails only with an alternative (hardware) SHA-256 implementation, which bookworm's
     * build does not have. */
    (void)mbedtls_sha256_ret(der, len, fpr, 0);
}

/* The DER SubjectPublicKeyInfo of PK into OUT (SIGN_SPKI_MAX bytes), from its start. Returns
 * the length, or a negative mbedTLS code. */
static int sign__spki(mbedtls_pk_context *pk, uint8_t out[SIGN_SPKI_MAX])
{
    /* mbedtls_pk_write_* fill the buffer from its end and return the length. */
    int n = mbedtls_pk_write_pubkey_der(pk, out, SIGN_SPKI_MAX);
    if (n <= 0)
        return n < 0 ? n : MBEDTLS_ERR_PK_BAD_INPUT_DATA;
    memmove(out, out + SIGN_SPKI_MAX - (size_t)n, (size_t)n);
    return n;
}

/* 1 when PK is an EC key on P-256 that can do ECDSA; else 0, with the reason in ERR. */
static int sign__is_p256(const mbedtls_pk_context *pk, const char *path, char *err, size_t errlen)
{
    mbedtls_pk_type_t t = mbedtls_pk_get_type(pk);

    if (t == MBEDTLS_PK_ECKEY || t == MBEDTLS_PK_ECDSA) {
        mbedtls_ecp_group_id g = mbedtls_pk_ec(*pk)->grp.id;
        if (g == MBEDTLS_ECP_DP_SECP256R1)
            return 1;
        const mbedtls_ecp_curve_info *ci = mbedtls_ecp_curve_info_from_grp_id(g);
        cis_set_err(err, errlen,
                    "%s: an EC key on curve %s; Cistern device keys are ECDSA P-256 "
                    "(prime256v1, secp256r1)",
                    path, ci ? ci->name : "unknown");
    } else if (t == MBEDTLS_PK_RSA || t == MBEDTLS_PK_RSASSA_PSS || t == MBEDTLS_PK_RSA_ALT) {
        cis_set_err(err, errlen, "%s: an RSA key; Cistern device keys are ECDSA P-256", path);
    } else if (t == MBEDTLS_PK_ECKEY_DH) {
        cis_set_err(err, errlen,
                    "%s: an EC key restricted to key agreement (ECDH); Cistern device keys are "
                    "ECDSA P-256",
                    path);
    } else {
        cis_set_err(err, errlen, "%s: a %s key; Cistern device keys are ECDSA P-256", path,
                    mbedtls_pk_get_name(pk));
    }
    return 0;
}

/* Checks that PATH is a regular file this process can read, before mbedTLS opens it: its
 * parsers answer every failure to read with one code, and a FIFO would block them. */
static int sign__check_readable(const char *path, char *err, size_t errlen)
{
    struct stat sb;
    int fd = open(path, O_RDONLY | O_CLOEXEC | O_NONBLOCK);
    if (fd < 0) {
        int e = errno;
        if (e == ENOENT || e == ENOTDIR) {
            cis_set_err(err, errlen, "%s: no such file", path);
            return CIS_ENOTFOUND;
        }
        cis_set_err(err, errlen, "%s: cannot read it: %s", path, strerror(e));
        return CIS_EIO;
    }
    int rc = fstat(fd, &sb);
    int e = errno;
    close(fd);
    if (rc != 0) {
        cis_set_err(err, errlen, "%s: cannot stat it: %s", path, strerror(e));
        return CIS_EIO;
    }
    if (!S_ISREG(sb.st_mode)) {
        cis_set_err(err, errlen, "%s: not a regular file", path);
        return CIS_EINVAL;
    }
    return CIS_OK;
}

/* An mbedTLS parser's answer meaning "a key or algorithm it does not know" (Ed25519, a curve
 * it lacks), as opposed to "not this format". */
static int sign__unknown_alg(int rc)
{
    /* The X.509 parsers add a low-level code (bits 0-6, such as "OID not found") to theirs. */
    int high = rc < 0 ? -(-rc & 0xff80) : rc;
    return high == MBEDTLS_ERR_PK_UNKNOWN_PK_ALG || high == MBEDTLS_ERR_PK_FEATURE_UNAVAILABLE ||
           high == MBEDTLS_ERR_X509_UNKNOWN_SIG_ALG || high == MBEDTLS_ERR_X509_FEATURE_UNAVAILABLE;
}

int cis_fpr_of_file(const char *path, uint8_t fpr[CIS_FPR_LEN], char *err, size_t errlen)
{
    mbedtls_x509_crt crt;
    mbedtls_x509_csr csr;
    mbedtls_pk_context pk;
    mbedtls_pk_context *found = NULL;
    uint8_t spki[SIGN_SPKI_MAX];
    int ret, rc, unknown = 0;

    if (!path || !path[0]) {
        cis_set_err(err, errlen, "no key or certificate file given");
        return CIS_EINVAL;
    }
    ret = sign__check_readable(path, err, errlen);
    if (ret)
        return ret;

    mbedtls_x509_crt_init(&crt);
    mbedtls_x509_csr_init(&csr);
    mbedtls_pk_init(&pk);
    ret = CIS_EINVAL;

    /* In the order of what an operator most likely holds on the receiver's side. A positive
     * answer from the certificate parser counts the certificates of a chain it skipped: the
     * first one it parsed (the leaf, in the usual order) is what we want. */
    rc = mbedtls_x509_crt_parse_file(&crt, path);
    if (rc >= 0 && crt.raw.len > 0) {
        found = &crt.pk;
        goto have_key;
    }
    unknown |= sign__unknown_alg(rc);
    rc = mbedtls_x509_csr_parse_file(&csr, path);
    if (rc == 0) {
        found = &csr.pk;
        goto have_key;
    }
    unknown |= sign__unknown_alg(rc);
    rc = mbedtls_pk_parse_public_keyfile(&pk, path);
    if (rc == 0) {
        found = &pk;
        goto have_key;
    }
    unknown |= sign__unknown_alg(rc);
    mbedtls_pk_free(&pk);
    mbedtls_pk_init(&pk);
    rc = mbedtls_pk_parse_keyfile(&pk, path, NULL);
    if (rc == 0) {
        found = &pk;
        goto have_key;
    }
    unknown |= sign__unknown_alg(rc);
    if (rc == MBEDTLS_ERR_PK_PASSWORD_REQUIRED)
        cis_set_err(err, errlen,
                    "%s: an encrypted private key; give its certificate or public key, or the "
                    "key unencrypted",
                    path);
    else if (unknown)
        cis_set_err(err, errlen,
                    "%s: a key or signature algorithm mbedTLS does not support (Ed25519?); "
                    "Cistern device keys are ECDSA P-256",
                    path);
    else
        cis_set_err(err, errlen, "%s: not a certificate, CSR or key (PEM or DER)", path);
    goto out;

have_key:
    if (!sign__is_p256(found, path, err, errlen))
        goto out;
    rc = sign__spki(found, spki);
    if (rc < 0) {
        cis_set_err(err, errlen, "%s: cannot encode its public key (mbedTLS -0x%04x)", path,
                    (unsigned)-rc);
        ret = CIS_EIO;
        goto out;
    }
    cis_fpr_of_spki(spki, (size_t)rc, fpr);
    ret = CIS_OK;

out:
    mbedtls_pk_free(&pk); /* wipes a private key */
    mbedtls_x509_csr_free(&csr);
    mbedtls_x509_crt_free(&crt);
    return ret;
}

static int sign__is_space(uint8_t c)
{
    return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\v' || c == '\f';
}

int cis_hmac_secret_load(const char *path, uint8_t *out, size_t *len, char *err, size_t errlen)
{
    uint8_t buf[SIGN_SECRET_FILE_MAX + 1];
    struct stat sb;
    size_t n = 0;
    int ret = CIS_EINVAL;
    int fd;

    if (!path || !path[0] || !out || !len) {
        cis_set_err(err, errlen, "no HMAC secret file given");
        return CIS_EINVAL;
    }
    /* NONBLOCK: a FIFO put at PATH must not hang the start (refused by S_ISREG below). */
    fd = open(path, O_RDONLY | O_CLOEXEC | O_NONBLOCK);
    if (fd < 0) {
        int e = errno;
        if (e == ENOENT || e == ENOTDIR) {
            cis_set_err(err, errlen, "%s: no such file", path);
            return CIS_ENOTFOUND;
        }
        cis_set_err(err, errlen, "%s: cannot open the HMAC secret: %s", path, strerror(e));
        return CIS_EIO;
    }
    if (fstat(fd, &sb) != 0) {
        cis_set_err(err, errlen, "%s: cannot stat the HMAC secret: %s", path, strerror(errno));
        ret = CIS_EIO;
        goto out;
    }
    if (!S_ISREG(sb.st_mode)) {
        cis_set_err(err, errlen,
                    "%s: not a regular file; an HMAC secret is a file of %d to %d bytes", path,
                    CIS_HMAC_SECRET_MIN, CIS_HMAC_SECRET_MAX);
        goto out;
    }
    /* Before the size: a secret others can read is leaked whatever its length, and the
     * message should lead with that. */
    if (sb.st_mode & 077) {
        mode_t m = sb.st_mode;
        const char *how = (m & S_IROTH)   ? "readable by others"
                          : (m & S_IRGRP) ? "readable by its group"
                          : (m & S_IWOTH) ? "writable by others"
                          : (m & S_IWGRP) ? "writable by its group"
                                          : "open to its group or others";
        cis_set_err(err, errlen, "%s is %s (mode %04o): chmod 600 %s", path, how,
                    (unsigned)(m & 07777), path);
        goto out;
    }
    /* Read to EOF (not st_size bytes): the file may change under us, and what counts is
     * what was read. One byte more than the limit tells "too big" from "exactly the limit". */
    while (n < sizeof(buf)) {
        ssize_t r = read(fd, buf + n, sizeof(buf) - n);
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0) {
            cis_set_err(err, errlen, "%s: cannot read the HMAC secret: %s", path, strerror(errno));
            ret = CIS_EIO;
            goto out;
        }
        if (r == 0)
            break;
        n += (size_t)r;
    }
    if (n > SIGN_SECRET_FILE_MAX) {
        cis_set_err(err, errlen, "%s holds more than %d bytes; an HMAC secret is %d to %d bytes",
                    path, SIGN_SECRET_FILE_MAX, CIS_HMAC_SECRET_MIN, CIS_HMAC_SECRET_MAX);
        goto out;
    }
    /* `base64 > FILE` and editors end the file with a newline: not part of the secret. */
    while (n > 0 && sign__is_space(buf[n - 1]))
        n--;
    if (n == 0) {
        cis_set_err(err, errlen,
                    "%s is empty; an HMAC secret is %d to %d bytes (make one with: "
                    "head -c 32 /dev/urandom | base64 > %s)",
                    path, CIS_HMAC_SECRET_MIN, CIS_HMAC_SECRET_MAX, path);
        goto out;
    }
    if (n < CIS_HMAC_SECRET_MIN) {
        cis_set_err(err, errlen,
                    "%s holds %zu bytes (without trailing whitespace); an HMAC secret is at "
                    "least %d (make one with: head -c 32 /dev/urandom | base64 > %s)",
                    path, n, CIS_HMAC_SECRET_MIN, path);
        goto out;
    }
    if (n > CIS_HMAC_SECRET_MAX) {
        cis_set_err(err, errlen,
                    "%s holds %zu bytes (without trailing whitespace); an HMAC secret is at "
                    "most %d",
                    path, n, CIS_HMAC_SECRET_MAX);
        goto out;
    }
    memcpy(out, buf, n);
    *len = n;
    ret = CIS_OK;

out:
    mbedtls_platform_zeroize(buf, sizeof(buf));
    close(fd);
    return ret;
}

void cis_hmac_key_id(const uint8_t *secret, size_t len, uint8_t out[CIS_HMAC_KEY_ID_LEN])
{
    mbedtls_sha256_context c;
    uint8_t digest[32];

    mbedtls_sha256_init(&c);
    (void)mbedtls_sha256_starts_ret(&c, 0);
    (void)mbedtls_sha256_update_ret(&c, (const uint8_t *)sign_key_id_label,
                                    sizeof(sign_key_id_label));
    (void)mbedtls_sha256_update_ret(&c, secret, len);
    (void)mbedtls_sha256_finish_ret(&c, digest);
    mbedtls_sha256_free(&c); /* its state was computed from the secret: wiped */
    memcpy(out, digest, CIS_HMAC_KEY_ID_LEN);
    mbedtls_platform_zeroize(digest, sizeof(digest));
}

/* --- the signed bytes ------------------------------------------------------------------ */

/* SHA-256 of the signed bytes: LABEL 0x00 AGENT_ID 0x00 BATCH. */
static void sign__digest(const char *agent_id, const uint8_t *batch, size_t len, uint8_t out[32])
{
    mbedtls_sha256_context c;
    gnutls_hash_hd_t h;

    /* GnuTLS first: nettle uses the CPU's SHA instructions where there are some, several
     * times mbedTLS's speed on a whole batch. mbedTLS if it cannot allocate. */
    if (gnutls_hash_init(&h, GNUTLS_DIG_SHA256) >= 0) {
        gnutls_hash(h, sign_label, sizeof(sign_label));
        gnutls_hash(h, agent_id, strlen(agent_id) + 1);
        gnutls_hash(h, batch, len);
        gnutls_hash_deinit(h, out);
        return;
    }
    mbedtls_sha256_init(&c);
    (void)mbedtls_sha256_starts_ret(&c, 0);
    (void)mbedtls_sha256_update_ret(&c, (const uint8_t *)sign_label, sizeof(sign_label));
    (void)mbedtls_sha256_update_ret(&c, (const uint8_t *)agent_id, strlen(agent_id) + 1);
    (void)mbedtls_sha256_update_ret(&c, batch, len);
    (void)mbedtls_sha256_finish_ret(&c, out);
    mbedtls_sha256_free(&c);
}

/* HMAC-SHA256 with SECRET over the signed bytes. Returns 0 or a negative mbedTLS code. */
static int sign__hmac(const uint8_t *secret, size_t slen, const char *agent_id,
                      const uint8_t *batch, size_t len, uint8_t out[SIGN_HMAC_LEN])
{
    mbedtls_md_context_t c;
    gnutls_hmac_hd_t h;
    int rc;

    /* GnuTLS first, as in sign__digest; gnutls_hmac_deinit wipes its state. */
    if (gnutls_hmac_init(&h, GNUTLS_MAC_SHA256, secret, slen) >= 0) {
        gnutls_hmac(h, sign_label, sizeof(sign_label));
        gnutls_hmac(h, agent_id, strlen(agent_id) + 1);
        gnutls_hmac(h, batch, len);
        gnutls_hmac_deinit(h, out);
        return 0;
    }
    mbedtls_md_init(&c);
    rc = mbedtls_md_setup(&c, mbedtls_md_info_from_type(MBEDTLS_MD_SHA256), 1);
    if (rc == 0)
        rc = mbedtls_md_hmac_starts(&c, secret, slen);
    if (rc == 0)
        rc = mbedtls_md_hmac_update(&c, (const uint8_t *)sign_label, sizeof(sign_label));
    if (rc == 0)
        rc = mbedtls_md_hmac_update(&c, (const uint8_t *)agent_id, strlen(agent_id) + 1);
    if (rc == 0)
        rc = mbedtls_md_hmac_update(&c, batch, len);
    if (rc == 0)
        rc = mbedtls_md_hmac_finish(&c, out);
    mbedtls_md_free(&c); /* wipes the keyed pads */
    return rc;
}

/* --- the agent: signing ---------------------------------------------------------------- */

struct cis_signer {
    int alg;                       /* enum cis_sig_alg */
    mbedtls_pk_context pk;         /* ECDSA: the private key */
    mbedtls_ctr_drbg_context drbg; /* ECDSA: randomness for the signature's blinding */
    gnutls_privkey_t gkey;         /* ECDSA: the same key, for signing (see sign__gnutls_key) */
    uint8_t key[SIGN_SPKI_MAX];    /* the envelope's key: the SPKI (ECDSA) or key id (HMAC) */
    size_t key_len;
    uint8_t secret[CIS_HMAC_SECRET_MAX]; /* HMAC */
    size_t secret_len;
    int failing; /* the last wrap failed: logged once, until one succeeds */
    char desc[96];
};

/* CTR_DRBG's entropy source: the kernel's CSPRNG, as for every other key and nonce here. */
static int sign__entropy(void *ctx, unsigned char *buf, size_t len)
{
    (void)ctx;
    return cis_random_bytes(buf, len) == CIS_OK ? 0 : MBEDTLS_ERR_CTR_DRBG_ENTROPY_SOURCE_FAILED;
}

static struct cis_signer *sign__new(int alg)
{
    struct cis_signer *s = calloc(1, sizeof(*s));
    if (!s)
        return NULL;
    s->alg = alg;
    mbedtls_pk_init(&s->pk);
    mbedtls_ctr_drbg_init(&s->drbg);
    return s;
}

/* What PATH holds when it is not a private key, for the refusal; NULL when unknown. */
static const char *sign__what_is(const char *path)
{
    mbedtls_x509_crt crt;
    mbedtls_pk_context pk;
    const char *what = NULL;

    mbedtls_x509_crt_init(&crt);
    mbedtls_pk_init(&pk);
    if (mbedtls_x509_crt_parse_file(&crt, path) >= 0 && crt.raw.len > 0)
        what = "a certificate";
    else if (mbedtls_pk_parse_public_keyfile(&pk, path) == 0)
        what = "a public key";
    mbedtls_pk_free(&pk);
    mbedtls_x509_crt_free(&crt);
    return what;
}

/* The parsed key again, in GnuTLS, which signs: nettle's P-256 signs about 20x faster than
 * mbedTLS 2.28 (bench/RESULTS.md, B7). mbedTLS still parses the file, for its refusals. */
static int sign__gnutls_key(struct cis_signer *s)
{
    uint8_t der[SIGN_KEY_DER_MAX];
    gnutls_datum_t d;
    int n = mbedtls_pk_write_key_der(&s->pk, der, sizeof(der)), rc;

    if (n < 0)
        return n;
    /* mbedtls_pk_write_key_der writes at the end of the buffer. */
    d = (gnutls_datum_t){.data = der + sizeof(der) - (size_t)n, .size = (unsigned)n};
    rc = gnutls_privkey_init(&s->gkey);
    if (rc >= 0)
        rc = gnutls_privkey_import_x509_raw(s->gkey, &d, GNUTLS_X509_FMT_DER, NULL, 0);
    mbedtls_platform_zeroize(der, sizeof(der));
    return rc < 0 ? MBEDTLS_ERR_PK_KEY_INVALID_FORMAT : 0;
}

int cis_signer_open_ecdsa(const char *key_file, struct cis_signer **out, char *err, size_t errlen)
{
    struct cis_signer *s = NULL;
    uint8_t fpr[CIS_FPR_LEN];
    char fs[CIS_FPR_STR_LEN];
    int ret, rc;

    if (out)
        *out = NULL;
    if (!key_file || !key_file[0] || !out) {
        cis_set_err(err, errlen, "no device key file given");
        return CIS_EINVAL;
    }
    ret = sign__check_readable(key_file, err, errlen);
    if (ret)
        return ret;
    s = sign__new(CIS_SIG_ECDSA);
    if (!s) {
        cis_set_err(err, errlen, "%s: out of memory", key_file);
        return CIS_ENOMEM;
    }
    ret = CIS_EINVAL;
    rc = mbedtls_pk_parse_keyfile(&s->pk, key_file, NULL);
    if (rc == MBEDTLS_ERR_PK_PASSWORD_REQUIRED) {
        cis_set_err(err, errlen,
                    "%s: an encrypted private key; the agent needs the device key unencrypted "
                    "(mode 0600)",
                    key_file);
        goto out;
    }
    if (rc == MBEDTLS_ERR_PK_ALLOC_FAILED) {
        cis_set_err(err, errlen, "%s: out of memory", key_file);
        ret = CIS_ENOMEM;
        goto out;
    }
    if (rc != 0) {
        const char *what = sign__what_is(key_file);
        if (sign__unknown_alg(rc))
            cis_set_err(err, errlen,
                        "%s: a key type mbedTLS does not support (Ed25519?); Cistern device keys "
                        "are ECDSA P-256",
                        key_file);
        else if (what)
            cis_set_err(err, errlen,
                        "%s: %s, not a private key; sign with the device's private key (the "
                        "one `cistern-agent enroll` made)",
                        key_file, what);
        else
            cis_set_err(err, errlen, "%s: not a private key (PEM or DER, unencrypted)", key_file);
        goto out;
    }
    if (!sign__is_p256(&s->pk, key_file, err, errlen))
        goto out;
    /* The envelope carries the public key, computed once here rather than per batch. */
    rc = sign__spki(&s->pk, s->key);
    if (rc < 0) {
        cis_set_err(err, errlen, "%s: cannot encode its public key (mbedTLS -0x%04x)", key_file,
                    (unsigned)-rc);
        ret = CIS_EIO;
        goto out;
    }
    s->key_len = (size_t)rc;
    rc = sign__gnutls_key(s);
    if (rc) {
        cis_set_err(err, errlen, "%s: GnuTLS cannot load the key (mbedTLS -0x%04x)", key_file,
                    (unsigned)-rc);
        ret = CIS_EIO;
        goto out;
    }
    rc = mbedtls_ctr_drbg_seed(&s->drbg, sign__entropy, NULL,
                               (const unsigned char *)sign_drbg_label, sizeof(sign_drbg_label) - 1);
    if (rc) {
        cis_set_err(err, errlen, "cannot seed the random generator (mbedTLS -0x%04x)",
                    (unsigned)-rc);
        ret = CIS_EIO;
        goto out;
    }
    cis_fpr_of_spki(s->key, s->key_len, fpr);
    cis_fpr_format(fpr, fs);
    snprintf(s->desc, sizeof(s->desc), "ECDSA P-256 key %s", fs);
    *out = s;
    s = NULL;
    ret = CIS_OK;

out:
    cis_signer_free(s);
    return ret;
}

int cis_signer_open_hmac(const char *secret_file, struct cis_signer **out, char *err, size_t errlen)
{
    struct cis_signer *s = NULL;
    char hex[2 * CIS_HMAC_KEY_ID_LEN + 1];
    int ret;

    if (out)
        *out = NULL;
    if (!secret_file || !secret_file[0] || !out) {
        cis_set_err(err, errlen, "no HMAC secret file given");
        return CIS_EINVAL;
    }
    s = sign__new(CIS_SIG_HMAC);
    if (!s) {
        cis_set_err(err, errlen, "%s: out of memory", secret_file);
        return CIS_ENOMEM;
    }
    ret = cis_hmac_secret_load(secret_file, s->secret, &s->secret_len, err, errlen);
    if (ret) {
        cis_signer_free(s);
        return ret;
    }
    cis_hmac_key_id(s->secret, s->secret_len, s->key);
    s->key_len = CIS_HMAC_KEY_ID_LEN;
    sign__hex(s->key, CIS_HMAC_KEY_ID_LEN, hex);
    snprintf(s->desc, sizeof(s->desc), "HMAC-SHA256 secret (key id %s)", hex);
    *out = s;
    return CIS_OK;
}

const char *cis_signer_describe(const struct cis_signer *s)
{
    return s ? s->desc : "no signer";
}

/* Log a failure to sign once, not for every batch the forwarder retries. */
static int sign__wrap_failed(struct cis_signer *s, int code, const char *what, int rc)
{
    if (!s->failing)
        cis_error("[sign] cannot sign batches with the %s: %s (error %d)", s->desc, what, rc);
    s->failing = 1;
    return code;
}

int cis_signer_wrap(struct cis_signer *s, const char *agent_id, const uint8_t *batch, size_t len,
                    uint8_t **out, size_t *out_len)
{
    Cistern__V1__SignedBatch m = CISTERN__V1__SIGNED_BATCH__INIT;
    uint8_t sig[MBEDTLS_PK_SIGNATURE_MAX_SIZE > SIGN_HMAC_LEN ? MBEDTLS_PK_SIGNATURE_MAX_SIZE
                                                              : SIGN_HMAC_LEN];
    size_t sig_len = 0;
    uint8_t *buf;
    size_t n;
    int rc;

    if (out)
        *out = NULL;
    if (out_len)
        *out_len = 0;
    /* What the receiver's decoder would refuse is a caller's bug: say so here, where it can be
     * found, rather than have every batch answered 4xx and dropped. */
    if (!s || !out || !out_len || !sign__agent_id_ok(agent_id) || !batch || len == 0)
        return CIS_EINVAL;

    if (s->alg == CIS_SIG_ECDSA) {
        uint8_t hash[32];
        gnutls_datum_t hd = {.data = hash, .size = sizeof(hash)}, sd = {NULL, 0};
        sign__digest(agent_id, batch, len, hash);
        /* REPRODUCIBLE: RFC 6979 deterministic nonces, as mbedTLS signed before. */
        rc = gnutls_privkey_sign_hash2(s->gkey, GNUTLS_SIGN_ECDSA_SHA256,
                                       GNUTLS_PRIVKEY_FLAG_REPRODUCIBLE, &hd, &sd);
        if (rc < 0)
            return sign__wrap_failed(s, rc == GNUTLS_E_MEMORY_ERROR ? CIS_ENOMEM : CIS_EIO,
                                     gnutls_strerror(rc), rc);
        sig_len = sd.size;
        if (sig_len <= sizeof(sig))
            memcpy(sig, sd.data, sig_len);
        gnutls_free(sd.data);
        if (sig_len < SIGN_ECDSA_SIG_MIN || sig_len > SIGN_ECDSA_SIG_MAX)
            return sign__wrap_failed(s, CIS_EIO, "the signature has an impossible length",
                                     MBEDTLS_ERR_PK_BAD_INPUT_DATA);
    } else {
        rc = sign__hmac(s->secret, s->secret_len, agent_id, batch, len, sig);
        if (rc)
            return sign__wrap_failed(s, rc == MBEDTLS_ERR_MD_ALLOC_FAILED ? CIS_ENOMEM : CIS_EIO,
                                     "HMAC failed", rc);
        sig_len = SIGN_HMAC_LEN;
    }

    /* protobuf-c's structs are not const-correct; packing only reads these. */
    m.agent_id = (char *)agent_id;
    m.alg = (Cistern__V1__SignatureAlg)s->alg;
    m.key.data = s->key;
    m.key.len = s->key_len;
    m.signature.data = sig;
    m.signature.len = sig_len;
    m.batch.data = (uint8_t *)batch;
    m.batch.len = len;
    n = cistern__v1__signed_batch__get_packed_size(&m);
    buf = malloc(n);
    if (!buf)
        return CIS_ENOMEM;
    cistern__v1__signed_batch__pack(&m, buf);
    if (s->failing) {
        cis_info("[sign] signing with the %s works again", s->desc);
        s->failing = 0;
    }
    *out = buf;
    *out_len = n;
    return CIS_OK;
}

void cis_signer_free(struct cis_signer *s)
{
    if (!s)
        return;
    mbedtls_pk_free(&s->pk);         /* wipes the private key */
    mbedtls_ctr_drbg_free(&s->drbg); /* and the generator's state */
    if (s->gkey)
        gnutls_privkey_deinit(s->gkey); /* wipes its copy */
    mbedtls_platform_zeroize(s, sizeof(*s));
    free(s);
}

/* --- the receiver: the envelope and its verification ----------------------------------- */

int cis_envelope_decode(const uint8_t *buf, size_t len, struct cis_envelope *out, char *why,
                        size_t whylen)
{
    Cistern__V1__SignedBatch *pb;
    size_t n;
    int ret = CIS_EDECODE;

    memset(out, 0, sizeof(*out));
    if (!buf || len == 0)
        return sign__fail(why, whylen, CIS_EDECODE, "the signed envelope is empty");
    pb = cistern__v1__signed_batch__unpack(NULL, len, buf);
    if (!pb)
        return sign__fail(why, whylen, CIS_EDECODE,
                          "not a signed envelope (SignedBatch): bad protobuf");
    /* protobuf-c ends a string at its first NUL: "gw-1\0anything" would read as "gw-1", with
     * bytes no signature covers. Re-encoding gives the input's size only when nothing was
     * dropped (unknown fields are kept and count). */
    if (cistern__v1__signed_batch__get_packed_size(pb) != len) {
        sign__fail(why, whylen, CIS_EDECODE,
                   "the signed envelope is not in canonical form (a repeated field, or a NUL "
                   "in the agent id)");
        goto bad;
    }
    n = strnlen(pb->agent_id, SIGN_AGENT_ID_MAX + 1);
    if (n == 0) {
        sign__fail(why, whylen, CIS_EDECODE, "the signed envelope has no agent id");
        goto bad;
    }
    if (n > SIGN_AGENT_ID_MAX) {
        sign__fail(why, whylen, CIS_EDECODE,
                   "the signed envelope's agent id is longer than %d characters",
                   SIGN_AGENT_ID_MAX);
        goto bad;
    }
    if (!sign__agent_id_ok(pb->agent_id)) {
        sign__fail(why, whylen, CIS_EDECODE,
                   "the signed envelope's agent id has a character other than A-Z a-z 0-9 . _ "
                   ": @ -");
        goto bad;
    }
    switch ((int)pb->alg) {
    case CIS_SIG_ECDSA:
        if (pb->key.len == 0 || pb->key.len > SIGN_SPKI_MAX) {
            sign__fail(why, whylen, CIS_EDECODE,
                       "the ECDSA envelope's key is %zu bytes; a public key is 1 to %d",
                       pb->key.len, SIGN_SPKI_MAX);
            goto bad;
        }
        if (pb->signature.len < SIGN_ECDSA_SIG_MIN || pb->signature.len > SIGN_ECDSA_SIG_MAX) {
            sign__fail(why, whylen, CIS_EDECODE,
                       "the ECDSA signature is %zu bytes; one is %d to %d", pb->signature.len,
                       SIGN_ECDSA_SIG_MIN, SIGN_ECDSA_SIG_MAX);
            goto bad;
        }
        break;
    case CIS_SIG_HMAC:
        if (pb->key.len != CIS_HMAC_KEY_ID_LEN) {
            sign__fail(why, whylen, CIS_EDECODE,
                       "the HMAC envelope's key id is %zu bytes; one is %d", pb->key.len,
                       CIS_HMAC_KEY_ID_LEN);
            goto bad;
        }
        if (pb->signature.len != SIGN_HMAC_LEN) {
            sign__fail(why, whylen, CIS_EDECODE, "the HMAC signature is %zu bytes; one is %d",
                       pb->signature.len, SIGN_HMAC_LEN);
            goto bad;
        }
        break;
    case CISTERN__V1__SIGNATURE_ALG__SIGNATURE_NONE:
        sign__fail(why, whylen, CIS_EDECODE, "the envelope is not signed (alg NONE)");
        goto bad;
    default:
        sign__fail(why, whylen, CIS_EDECODE, "the envelope's signature algorithm %d is unknown",
                   (int)pb->alg);
        goto bad;
    }
    if (pb->batch.len == 0) {
        sign__fail(why, whylen, CIS_EDECODE, "the signed envelope holds no batch");
        goto bad;
    }
    out->pb = pb;
    out->agent_id = pb->agent_id;
    out->alg = (int)pb->alg;
    out->key = pb->key.data;
    out->key_len = pb->key.len;
    out->sig = pb->signature.data;
    out->sig_len = pb->signature.len;
    out->batch = pb->batch.data;
    out->batch_len = pb->batch.len;
    return CIS_OK;

bad:
    cistern__v1__signed_batch__free_unpacked(pb, NULL);
    return ret;
}

void cis_envelope_free(struct cis_envelope *e)
{
    if (!e)
        return;
    if (e->pb)
        cistern__v1__signed_batch__free_unpacked(e->pb, NULL);
    memset(e, 0, sizeof(*e));
}

static int sign__verify_ecdsa(const struct cis_envelope *e, const uint8_t *fpr, char *why,
                              size_t whylen)
{
    gnutls_pubkey_t pk;
    gnutls_datum_t der, hd, sd;
    gnutls_ecc_curve_t curve = GNUTLS_ECC_CURVE_INVALID;
    uint8_t got[CIS_FPR_LEN], hash[32];
    char gs[CIS_FPR_STR_LEN], rs[CIS_FPR_STR_LEN];
    int ret;

    cis_fpr_of_spki(e->key, e->key_len, got);
    cis_fpr_format(got, gs);
    if (!fpr)
        return sign__fail(why, whylen, CIS_EKEY,
                          "batch of agent '%s' is signed with ECDSA key %s, but no key is "
                          "registered for it",
                          e->agent_id, gs);
    /* The fingerprint first: a key we do not know is a registry matter whatever its bytes,
     * and only the registered key (91 known bytes) reaches the parser below. */
    if (memcmp(got, fpr, CIS_FPR_LEN) != 0) {
        cis_fpr_format(fpr, rs);
        return sign__fail(why, whylen, CIS_EKEY,
                          "batch of agent '%s' is signed with key %s, not its registered key %s",
                          e->agent_id, gs, rs);
    }
    /* Verified with GnuTLS (nettle): an ECDSA P-256 verify costs about a tenth of mbedTLS
     * 2.28's, and the receiver verifies every batch (bench/RESULTS.md, B2). */
    if (gnutls_pubkey_init(&pk) < 0)
        return sign__fail(why, whylen, CIS_ENOMEM, "out of memory verifying a batch");
    der = (gnutls_datum_t){.data = (unsigned char *)e->key, .size = (unsigned)e->key_len};
    if (e->key_len > UINT_MAX || gnutls_pubkey_import(pk, &der, GNUTLS_X509_FMT_DER) < 0 ||
        gnutls_pubkey_get_pk_algorithm(pk, NULL) != GNUTLS_PK_ECDSA ||
        gnutls_pubkey_export_ecc_raw2(pk, &curve, NULL, NULL, 0) < 0 ||
        curve != GNUTLS_ECC_CURVE_SECP256R1) {
        ret = sign__fail(why, whylen, CIS_EDECODE,
                         "the key %s in the batch of agent '%s' is not an ECDSA P-256 public key",
                         gs, e->agent_id);
        goto out;
    }
    sign__digest(e->agent_id, e->batch, e->batch_len, hash);
    hd = (gnutls_datum_t){.data = hash, .size = sizeof(hash)};
    sd = (gnutls_datum_t){.data = (unsigned char *)e->sig, .size = (unsigned)e->sig_len};
    if (e->sig_len > UINT_MAX ||
        gnutls_pubkey_verify_hash2(pk, GNUTLS_SIGN_ECDSA_SHA256, 0, &hd, &sd) < 0) {
        ret = sign__fail(why, whylen, CIS_EBADSIG,
                         "signature of agent '%s' does not verify with its key %s (the batch "
                         "was changed after it was signed)",
                         e->agent_id, gs);
        goto out;
    }
    ret = CIS_OK;
out:
    gnutls_pubkey_deinit(pk);
    return ret;
}

static int sign__verify_hmac(const struct cis_envelope *e, const uint8_t *secret, size_t secret_len,
                             char *why, size_t whylen)
{
    uint8_t id[CIS_HMAC_KEY_ID_LEN], mac[SIGN_HMAC_LEN];
    char gs[2 * CIS_HMAC_KEY_ID_LEN + 1], rs[2 * CIS_HMAC_KEY_ID_LEN + 1];
    int ret, rc;

    sign__hex(e->key, CIS_HMAC_KEY_ID_LEN, gs);
    if (!secret || secret_len == 0)
        return sign__fail(why, whylen, CIS_EKEY,
                          "batch of agent '%s' is signed with an HMAC secret (key id %s), but no "
                          "secret is registered for it",
                          e->agent_id, gs);
    /* A key id is public (it is on the wire): an ordinary comparison is fine. */
    cis_hmac_key_id(secret, secret_len, id);
    if (memcmp(id, e->key, CIS_HMAC_KEY_ID_LEN) != 0) {
        sign__hex(id, CIS_HMAC_KEY_ID_LEN, rs);
        return sign__fail(why, whylen, CIS_EKEY,
                          "batch of agent '%s' is signed with HMAC secret key id %s, not its "
                          "registered secret (key id %s)",
                          e->agent_id, gs, rs);
    }
    rc = sign__hmac(secret, secret_len, e->agent_id, e->batch, e->batch_len, mac);
    if (rc != 0)
        return sign__fail(why, whylen, rc == MBEDTLS_ERR_MD_ALLOC_FAILED ? CIS_ENOMEM : CIS_EIO,
                          "cannot compute the HMAC (mbedTLS -0x%04x)", (unsigned)-rc);
    /* Constant time: how many leading bytes matched must not leak to a forger. */
    if (mbedtls_ct_memcmp(mac, e->sig, SIGN_HMAC_LEN) != 0)
        ret = sign__fail(why, whylen, CIS_EBADSIG,
                         "signature of agent '%s' does not verify with its secret (key id %s) "
                         "(the batch was changed after it was signed)",
                         e->agent_id, gs);
    else
        ret = CIS_OK;
    mbedtls_platform_zeroize(mac, sizeof(mac));
    return ret;
}

int cis_envelope_verify(const struct cis_envelope *e, const uint8_t *fpr, const uint8_t *secret,
                        size_t secret_len, char *why, size_t whylen)
{
    if (!e || !e->pb || !e->agent_id || !e->key || !e->sig || !e->batch)
        return sign__fail(why, whylen, CIS_EINVAL, "no decoded envelope");
    if (e->alg == CIS_SIG_ECDSA)
        return sign__verify_ecdsa(e, fpr, why, whylen);
    if (e->alg == CIS_SIG_HMAC && e->key_len == CIS_HMAC_KEY_ID_LEN && e->sig_len == SIGN_HMAC_LEN)
        return sign__verify_hmac(e, secret, secret_len, why, whylen);
    return sign__fail(why, whylen, CIS_EDECODE, "the envelope's signature algorithm %d is unknown",
                      e->alg);
}
