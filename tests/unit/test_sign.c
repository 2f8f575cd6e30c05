/* Unit tests for signed batches (common/sign.c): fingerprints of every kind of key file,
 * HMAC secret files, the signer, and the receiver's envelope decoder and verifier. The keys
 * are made with openssl, so the fingerprints are checked against a second implementation. */
#include <dirent.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cmocka.h>
#include <mbedtls/md.h>
#include <mbedtls/pk.h>
#include <mbedtls/sha256.h>

#include "cistern/err.h"
#include "cistern/sign.h"

static char dir[64];

static void path_of(const char *name, char *out, size_t len)
{
    snprintf(out, len, "%s/%s", dir, name);
}

/* Run a shell command in the test directory; 0 on success. */
static int sh(const char *cmd)
{
    char buf[1024];
    snprintf(buf, sizeof(buf), "cd '%s' && { %s ; } >/dev/null 2>&1", dir, cmd);
    return system(buf);
}

/* The keys and files of every test, made once with openssl. */
static int group_setup(void **state)
{
    static const char *const cmds[] = {
        "openssl ecparam -name prime256v1 -genkey -noout -out key.pem",
        "openssl pkey -in key.pem -out key8.pem", /* PKCS#8 */
        "openssl pkey -in key.pem -outform DER -out key.der",
        "openssl pkey -in key.pem -pubout -out pub.pem",
        "openssl pkey -in key.pem -pubout -outform DER -out pub.der",
        "openssl req -new -key key.pem -subj /CN=gw-1 -out csr.pem",
        "openssl req -new -key key.pem -subj /CN=gw-1 -outform DER -out csr.der",
        "openssl req -x509 -new -key key.pem -subj /CN=gw-1 -days 2 -out crt.pem",
        "openssl x509 -in crt.pem -outform DER -out crt.der",
        "openssl pkey -in key.pem -pubout -outform DER | sha256sum | cut -d' ' -f1 > fpr.txt",
        "openssl pkey -in key.pem -aes256 -passout pass:secret -out enc.pem",
        "openssl ecparam -name prime256v1 -genkey -noout -out other.pem",
        "openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:1024 -out rsa.pem",
        "openssl pkey -in rsa.pem -pubout -outform DER -out rsa_pub.der",
        "openssl req -x509 -new -key rsa.pem -subj /CN=gw-1 -days 2 -out rsa_crt.pem",
        "openssl ecparam -name secp384r1 -genkey -noout -out p384.pem",
        "openssl pkey -in p384.pem -pubout -outform DER -out p384_pub.der",
        "openssl genpkey -algorithm ed25519 -out ed.pem",
        "openssl req -x509 -new -key ed.pem -subj /CN=gw-1 -days 2 -out ed_crt.pem",
        "printf 'hello, this is not a key\\n' > junk.txt",
        ": > empty",
        "mkdir sub",
    };
    (void)state;
    snprintf(dir, sizeof(dir), "/tmp/cistern-sign-XXXXXX");
    if (!mkdtemp(dir))
        return -1;
    for (size_t i = 0; i < sizeof(cmds) / sizeof(cmds[0]); i++) {
        if (sh(cmds[i]) != 0) {
            fprintf(stderr, "setup failed: %s\n", cmds[i]);
            return -1;
        }
    }
    return 0;
}

static int group_teardown(void **state)
{
    char cmd[128];
    (void)state;
    snprintf(cmd, sizeof(cmd), "rm -rf -- '%s'", dir);
    return system(cmd) == 0 ? 0 : -1;
}

static uint8_t *read_all(const char *name, size_t *len)
{
    char p[128];
    path_of(name, p, sizeof(p));
    FILE *f = fopen(p, "rb");
    assert_non_null(f);
    uint8_t *buf = malloc(65536);
    assert_non_null(buf);
    *len = fread(buf, 1, 65536, f);
    fclose(f);
    return buf;
}

static void write_file(const char *name, const void *data, size_t len, mode_t mode)
{
    char p[128];
    path_of(name, p, sizeof(p));
    unlink(p);
    FILE *f = fopen(p, "wb");
    assert_non_null(f);
    assert_int_equal(fwrite(data, 1, len, f), len);
    assert_int_equal(fclose(f), 0);
    assert_int_equal(chmod(p, mode), 0);
}

/* The fingerprint openssl printed for key.pem. */
static void openssl_fpr(uint8_t fpr[CIS_FPR_LEN])
{
    size_t n;
    char *hex = (char *)read_all("fpr.txt", &n);
    assert_true(n >= 64);
    hex[64] = '\0';
    assert_int_equal(cis_fpr_parse(hex, fpr), 0);
    free(hex);
}

static void fpr_of(const char *name, uint8_t fpr[CIS_FPR_LEN])
{
    char p[128], err[256] = "";
    path_of(name, p, sizeof(p));
    int rc = cis_fpr_of_file(p, fpr, err, sizeof(err));
    if (rc != 0)
        fail_msg("%s: %d %s", name, rc, err);
}

/* A SignedBatch packed by hand, for what the signer never makes. Caller frees. */
static uint8_t *pack_env(const char *agent, int alg, const uint8_t *key, size_t klen,
                         const uint8_t *sig, size_t slen, const uint8_t *batch, size_t blen,
                         size_t *len)
{
    Cistern__V1__SignedBatch m = CISTERN__V1__SIGNED_BATCH__INIT;
    m.agent_id = (char *)agent;
    m.alg = (Cistern__V1__SignatureAlg)alg;
    m.key.data = (uint8_t *)key;
    m.key.len = klen;
    m.signature.data = (uint8_t *)sig;
    m.signature.len = slen;
    m.batch.data = (uint8_t *)batch;
    m.batch.len = blen;
    *len = cistern__v1__signed_batch__get_packed_size(&m);
    uint8_t *buf = malloc(*len ? *len : 1);
    assert_non_null(buf);
    cistern__v1__signed_batch__pack(&m, buf);
    return buf;
}

static struct cis_signer *open_ecdsa(const char *name)
{
    char p[128], err[256] = "";
    struct cis_signer *s = NULL;
    path_of(name, p, sizeof(p));
    int rc = cis_signer_open_ecdsa(p, &s, err, sizeof(err));
    if (rc != 0)
        fail_msg("%s: %d %s", name, rc, err);
    return s;
}

static const char secret_b64[] = "q3ZK0f8y1f3c9cQmTqS0m2m4V8r3kVQyq8pX3cPZ0yA=";

static struct cis_signer *open_hmac(void)
{
    char p[128], err[256] = "";
    struct cis_signer *s = NULL;
    char content[64];
    snprintf(content, sizeof(content), "%s\n", secret_b64);
    write_file("secret", content, strlen(content), 0600);
    path_of("secret", p, sizeof(p));
    int rc = cis_signer_open_hmac(p, &s, err, sizeof(err));
    if (rc != 0)
        fail_msg("hmac: %d %s", rc, err);
    return s;
}

static void fill(uint8_t *b, size_t n, uint32_t seed)
{
    for (size_t i = 0; i < n; i++) {
        seed = seed * 1103515245u + 12345u;
        b[i] = (uint8_t)(seed >> 16);
    }
}

/* --- fingerprints ---------------------------------------------------------------------- */

static void test_fpr_format_parse(void **state)
{
    uint8_t f[CIS_FPR_LEN], g[CIS_FPR_LEN];
    char s[CIS_FPR_STR_LEN], up[CIS_FPR_STR_LEN];
    (void)state;

    fill(f, sizeof(f), 7);
    cis_fpr_format(f, s);
    assert_int_equal(strlen(s), CIS_FPR_STR_LEN - 1);
    assert_memory_equal(s, "sha256:", 7);
    for (size_t i = 7; s[i]; i++)
        assert_non_null(strchr("0123456789abcdef", s[i]));
    assert_int_equal(cis_fpr_parse(s, g), 0);
    assert_memory_equal(f, g, sizeof(f));
    /* Without the prefix, and in upper case. */
    memset(g, 0, sizeof(g));
    assert_int_equal(cis_fpr_parse(s + 7, g), 0);
    assert_memory_equal(f, g, sizeof(f));
    for (size_t i = 0; i < sizeof(up); i++)
        up[i] = (char)(s[i] >= 'a' && s[i] <= 'f' ? s[i] - 32 : s[i]);
    memset(g, 0, sizeof(g));
    assert_int_equal(cis_fpr_parse(up, g), 0);
    assert_memory_equal(f, g, sizeof(f));

    /* Refusals leave the output as it was. */
    char bad[96];
    memset(g, 0xaa, sizeof(g));
    assert_int_equal(cis_fpr_parse(NULL, g), CIS_EINVAL);
    assert_int_equal(cis_fpr_parse("", g), CIS_EINVAL);
    assert_int_equal(cis_fpr_parse("sha256:", g), CIS_EINVAL);
    snprintf(bad, sizeof(bad), "%.70s", s); /* 63 hex digits */
    assert_int_equal(cis_fpr_parse(bad, g), CIS_EINVAL);
    snprintf(bad, sizeof(bad), "%s0", s); /* 65 */
    assert_int_equal(cis_fpr_parse(bad, g), CIS_EINVAL);
    snprintf(bad, sizeof(bad), "%s", s);
    bad[20] = 'g';
    assert_int_equal(cis_fpr_parse(bad, g), CIS_EINVAL);
    snprintf(bad, sizeof(bad), "sha1:%s", s + 7);
    assert_int_equal(cis_fpr_parse(bad, g), CIS_EINVAL);
    snprintf(bad, sizeof(bad), " %s", s);
    assert_int_equal(cis_fpr_parse(bad, g), CIS_EINVAL);
    snprintf(bad, sizeof(bad), "%s\n", s);
    assert_int_equal(cis_fpr_parse(bad, g), CIS_EINVAL);
    for (size_t i = 0; i < sizeof(g); i++)
        assert_int_equal(g[i], 0xaa);
}

static void test_fpr_of_file_forms(void **state)
{
    static const char *const names[] = {"key.pem", "key8.pem", "key.der", "pub.pem", "pub.der",
                                        "csr.pem", "csr.der",  "crt.pem", "crt.der"};
    uint8_t want[CIS_FPR_LEN], got[CIS_FPR_LEN], spki[CIS_FPR_LEN];
    (void)state;

    openssl_fpr(want);
    for (size_t i = 0; i < sizeof(names) / sizeof(names[0]); i++) {
        memset(got, 0, sizeof(got));
        fpr_of(names[i], got);
        if (memcmp(got, want, sizeof(want)) != 0)
            fail_msg("%s: another fingerprint than openssl's", names[i]);
    }
    size_t n;
    uint8_t *der = read_all("pub.der", &n);
    cis_fpr_of_spki(der, n, spki);
    assert_memory_equal(spki, want, sizeof(want));
    free(der);
    /* Another key, another fingerprint. */
    fpr_of("other.pem", got);
    assert_memory_not_equal(got, want, sizeof(want));
}

static void expect_fpr_refusal(const char *name, int code, const char *words)
{
    char p[128], err[512] = "";
    uint8_t f[CIS_FPR_LEN];
    path_of(name, p, sizeof(p));
    int rc = cis_fpr_of_file(p, f, err, sizeof(err));
    if (rc != code || !strstr(err, words) || strncmp(err, p, strlen(p)) != 0)
        fail_msg("%s: got %d \"%s\", want %d and \"%s\"", name, rc, err, code, words);
}

static void test_fpr_of_file_refusals(void **state)
{
    (void)state;
    expect_fpr_refusal("missing.pem", CIS_ENOTFOUND, ": no such file");
    expect_fpr_refusal("junk.txt", CIS_EINVAL, ": not a certificate, CSR or key (PEM or DER)");
    expect_fpr_refusal("empty", CIS_EINVAL, "not a certificate, CSR or key");
    expect_fpr_refusal("rsa.pem", CIS_EINVAL, ": an RSA key; Cistern device keys are ECDSA P-256");
    expect_fpr_refusal("rsa_pub.der", CIS_EINVAL, ": an RSA key");
    expect_fpr_refusal("rsa_crt.pem", CIS_EINVAL, ": an RSA key");
    expect_fpr_refusal("p384.pem", CIS_EINVAL, "secp384r1");
    expect_fpr_refusal("ed.pem", CIS_EINVAL, "does not support (Ed25519?)");
    expect_fpr_refusal("ed_crt.pem", CIS_EINVAL, "does not support (Ed25519?)");
    expect_fpr_refusal("enc.pem", CIS_EINVAL, "an encrypted private key");
    expect_fpr_refusal("sub", CIS_EINVAL, "not a regular file");
}

/* --- HMAC secrets ---------------------------------------------------------------------- */

static int load_secret(const char *content, size_t len, mode_t mode, uint8_t *out, size_t *olen,
                       char *err, size_t errlen)
{
    char p[128];
    write_file("s", content, len, mode);
    path_of("s", p, sizeof(p));
    return cis_hmac_secret_load(p, out, olen, err, errlen);
}

static void test_hmac_secret_load(void **state)
{
    uint8_t out[CIS_HMAC_SECRET_MAX];
    size_t len = 0;
    char err[512], p[128], want[256];
    char big[300];
    (void)state;

    path_of("s", p, sizeof(p));
    /* base64 of 32 bytes plus the newline base64 writes: the newline is not the secret. */
    char content[64];
    snprintf(content, sizeof(content), "%s\n", secret_b64);
    assert_int_equal(load_secret(content, strlen(content), 0600, out, &len, err, sizeof(err)), 0);
    assert_int_equal(len, strlen(secret_b64));
    assert_memory_equal(out, secret_b64, len);
    snprintf(content, sizeof(content), "%s \r\n\t\n", secret_b64);
    assert_int_equal(load_secret(content, strlen(content), 0400, out, &len, err, sizeof(err)), 0);
    assert_int_equal(len, strlen(secret_b64));

    /* Modes. */
    len = 0;
    assert_int_equal(load_secret(content, strlen(content), 0644, out, &len, err, sizeof(err)),
                     CIS_EINVAL);
    snprintf(want, sizeof(want), "%s is readable by others (mode 0644): chmod 600 %s", p, p);
    assert_string_equal(err, want);
    assert_int_equal(len, 0);
    assert_int_equal(load_secret(content, strlen(content), 0640, out, &len, err, sizeof(err)),
                     CIS_EINVAL);
    assert_non_null(strstr(err, "readable by its group (mode 0640): chmod 600"));
    assert_int_equal(load_secret(content, strlen(content), 0620, out, &len, err, sizeof(err)),
                     CIS_EINVAL);
    assert_non_null(strstr(err, "writable by its group"));
    assert_int_equal(load_secret(content, strlen(content), 0601, out, &len, err, sizeof(err)),
                     CIS_EINVAL);

    /* Sizes: exactly the bounds pass, one past them is refused with the sizes said. */
    memset(big, 'k', sizeof(big));
    assert_int_equal(load_secret(big, CIS_HMAC_SECRET_MIN, 0600, out, &len, err, sizeof(err)), 0);
    assert_int_equal(len, CIS_HMAC_SECRET_MIN);
    assert_int_equal(load_secret(big, CIS_HMAC_SECRET_MAX, 0600, out, &len, err, sizeof(err)), 0);
    assert_int_equal(len, CIS_HMAC_SECRET_MAX);
    len = 0;
    assert_int_equal(load_secret(big, CIS_HMAC_SECRET_MIN - 1, 0600, out, &len, err, sizeof(err)),
                     CIS_EINVAL);
    assert_non_null(strstr(err, "holds 31 bytes"));
    assert_non_null(strstr(err, "at least 32"));
    assert_int_equal(load_secret(big, CIS_HMAC_SECRET_MAX + 1, 0600, out, &len, err, sizeof(err)),
                     CIS_EINVAL);
    assert_non_null(strstr(err, "holds 129 bytes"));
    assert_non_null(strstr(err, "at most 128"));
    /* 31 bytes and a newline: the newline does not count. */
    big[31] = '\n';
    assert_int_equal(load_secret(big, 32, 0600, out, &len, err, sizeof(err)), CIS_EINVAL);
    assert_int_equal(load_secret("", 0, 0600, out, &len, err, sizeof(err)), CIS_EINVAL);
    assert_non_null(strstr(err, "is empty"));
    assert_int_equal(load_secret(" \n\n", 3, 0600, out, &len, err, sizeof(err)), CIS_EINVAL);
    assert_non_null(strstr(err, "is empty"));
    assert_int_equal(len, 0);

    /* Missing, and not a file. */
    path_of("nope", p, sizeof(p));
    assert_int_equal(cis_hmac_secret_load(p, out, &len, err, sizeof(err)), CIS_ENOTFOUND);
    assert_non_null(strstr(err, "no such file"));
    path_of("sub", p, sizeof(p));
    chmod(p, 0700);
    assert_int_equal(cis_hmac_secret_load(p, out, &len, err, sizeof(err)), CIS_EINVAL);
}

static void test_hmac_key_id(void **state)
{
    static const char label[] = "cistern.v1.hmac-key-id";
    uint8_t in[sizeof(label) + 64], want[32], id[CIS_HMAC_KEY_ID_LEN], id2[CIS_HMAC_KEY_ID_LEN];
    uint8_t secret[64];
    (void)state;

    fill(secret, sizeof(secret), 3);
    memcpy(in, label, sizeof(label)); /* with its NUL */
    memcpy(in + sizeof(label), secret, sizeof(secret));
    assert_int_equal(mbedtls_sha256_ret(in, sizeof(in), want, 0), 0);
    cis_hmac_key_id(secret, sizeof(secret), id);
    assert_memory_equal(id, want, CIS_HMAC_KEY_ID_LEN);
    secret[63] ^= 1;
    cis_hmac_key_id(secret, sizeof(secret), id2);
    assert_memory_not_equal(id, id2, CIS_HMAC_KEY_ID_LEN);
}

/* --- signing and verifying ------------------------------------------------------------- */

/* The signed bytes, built here from sign.h's words: label 0x00 agent 0x00 batch. */
static uint8_t *signed_bytes(const char *agent, const uint8_t *batch, size_t len, size_t *n)
{
    static const char label[] = "cistern.v1.SignedBatch";
    size_t a = strlen(agent) + 1;
    *n = sizeof(label) + a + len;
    uint8_t *b = malloc(*n);
    assert_non_null(b);
    memcpy(b, label, sizeof(label));
    memcpy(b + sizeof(label), agent, a);
    memcpy(b + sizeof(label) + a, batch, len);
    return b;
}

static void test_ecdsa_roundtrip(void **state)
{
    uint8_t batch[1000], fpr[CIS_FPR_LEN], hash[32];
    char fs[CIS_FPR_STR_LEN], why[512] = "";
    struct cis_envelope e;
    uint8_t *env = NULL;
    size_t env_len = 0, spki_len, sb_len;
    (void)state;

    fill(batch, sizeof(batch), 11);
    openssl_fpr(fpr);
    cis_fpr_format(fpr, fs);
    uint8_t *spki = read_all("pub.der", &spki_len);

    /* The SEC1 PEM, PKCS#8 PEM and DER forms all sign with the same key. */
    static const char *const forms[] = {"key.pem", "key8.pem", "key.der"};
    for (size_t f = 0; f < 3; f++) {
        struct cis_signer *s = open_ecdsa(forms[f]);
        char desc[128];
        snprintf(desc, sizeof(desc), "ECDSA P-256 key %s", fs);
        assert_string_equal(cis_signer_describe(s), desc);
        assert_int_equal(cis_signer_wrap(s, "gw-1", batch, sizeof(batch), &env, &env_len), 0);
        assert_true(env_len > sizeof(batch));
        {
            /* RFC 6979: the same batch signs to the same bytes (no nonce to leak). */
            uint8_t *again = NULL;
            size_t again_len = 0;
            assert_int_equal(cis_signer_wrap(s, "gw-1", batch, sizeof(batch), &again, &again_len), 0);
            assert_int_equal(again_len, env_len);
            assert_memory_equal(again, env, env_len);
            free(again);
        }
        cis_signer_free(s);

        assert_int_equal(cis_envelope_decode(env, env_len, &e, why, sizeof(why)), 0);
        assert_string_equal(e.agent_id, "gw-1");
        assert_int_equal(e.alg, CIS_SIG_ECDSA);
        assert_int_equal(e.key_len, spki_len);
        assert_memory_equal(e.key, spki, spki_len); /* the key is the SPKI openssl wrote */
        assert_int_equal(e.batch_len, sizeof(batch));
        assert_memory_equal(e.batch, batch, sizeof(batch));
        assert_int_equal(cis_envelope_verify(&e, fpr, NULL, 0, why, sizeof(why)), 0);

        /* The signature is ECDSA over SHA-256 of the signed bytes as sign.h defines them,
         * checked with mbedTLS directly. */
        mbedtls_pk_context pk;
        mbedtls_pk_init(&pk);
        assert_int_equal(mbedtls_pk_parse_public_key(&pk, spki, spki_len), 0);
        uint8_t *sb = signed_bytes("gw-1", batch, sizeof(batch), &sb_len);
        assert_int_equal(mbedtls_sha256_ret(sb, sb_len, hash, 0), 0);
        assert_int_equal(mbedtls_pk_verify(&pk, MBEDTLS_MD_SHA256, hash, 32, e.sig, e.sig_len), 0);
        free(sb);
        mbedtls_pk_free(&pk);
        cis_envelope_free(&e);
        free(env);
    }
    free(spki);
}

static void test_hmac_roundtrip(void **state)
{
    uint8_t batch[1000], id[CIS_HMAC_KEY_ID_LEN], mac[32];
    char why[512] = "", desc[128], hex[33];
    struct cis_envelope e;
    uint8_t *env = NULL;
    size_t env_len = 0, sb_len;
    const uint8_t *secret = (const uint8_t *)secret_b64;
    size_t secret_len = strlen(secret_b64);
    (void)state;

    fill(batch, sizeof(batch), 12);
    struct cis_signer *s = open_hmac();
    cis_hmac_key_id(secret, secret_len, id);
    for (int i = 0; i < 16; i++)
        snprintf(hex + 2 * i, 3, "%02x", id[i]);
    snprintf(desc, sizeof(desc), "HMAC-SHA256 secret (key id %s)", hex);
    assert_string_equal(cis_signer_describe(s), desc);
    assert_int_equal(cis_signer_wrap(s, "gw-1", batch, sizeof(batch), &env, &env_len), 0);
    cis_signer_free(s);

    assert_int_equal(cis_envelope_decode(env, env_len, &e, why, sizeof(why)), 0);
    assert_string_equal(e.agent_id, "gw-1");
    assert_int_equal(e.alg, CIS_SIG_HMAC);
    assert_int_equal(e.key_len, CIS_HMAC_KEY_ID_LEN);
    assert_memory_equal(e.key, id, CIS_HMAC_KEY_ID_LEN);
    assert_int_equal(e.sig_len, 32);
    assert_int_equal(e.batch_len, sizeof(batch));
    assert_memory_equal(e.batch, batch, sizeof(batch));
    assert_int_equal(cis_envelope_verify(&e, NULL, secret, secret_len, why, sizeof(why)), 0);

    /* HMAC-SHA256 with the secret over the signed bytes, computed with mbedTLS directly. */
    uint8_t *sb = signed_bytes("gw-1", batch, sizeof(batch), &sb_len);
    assert_int_equal(mbedtls_md_hmac(mbedtls_md_info_from_type(MBEDTLS_MD_SHA256), secret,
                                     secret_len, sb, sb_len, mac),
                     0);
    assert_memory_equal(e.sig, mac, 32);
    free(sb);
    cis_envelope_free(&e);
    free(env);
}

/* Decode and verify BUF against key.pem's fingerprint and the test secret. */
static int check(const uint8_t *buf, size_t len, char *why, size_t whylen)
{
    struct cis_envelope e;
    uint8_t fpr[CIS_FPR_LEN];
    openssl_fpr(fpr);
    int rc = cis_envelope_decode(buf, len, &e, why, whylen);
    if (rc != 0)
        return rc;
    rc = cis_envelope_verify(&e, fpr, (const uint8_t *)secret_b64, strlen(secret_b64), why, whylen);
    cis_envelope_free(&e);
    return rc;
}

/* A field of the envelope, to change one byte of. */
enum part { P_AGENT, P_SIG, P_BATCH };

/* Flip every byte of PART of ENV's decoded fields with each mask, re-pack, and check the
 * result is refused as changed or malformed, never accepted. */
static void flip_part(const uint8_t *env, size_t env_len, enum part part)
{
    static const uint8_t masks[] = {0x01, 0x80};
    struct cis_envelope e;
    char why[512];
    assert_int_equal(cis_envelope_decode(env, env_len, &e, why, sizeof(why)), 0);
    char agent[300];
    uint8_t sig[128], batch[64];
    assert_true(e.sig_len <= sizeof(sig) && e.batch_len <= sizeof(batch));
    size_t n = part == P_AGENT ? strlen(e.agent_id) : part == P_SIG ? e.sig_len : e.batch_len;
    for (size_t i = 0; i < n; i++) {
        for (size_t m = 0; m < sizeof(masks); m++) {
            snprintf(agent, sizeof(agent), "%s", e.agent_id);
            memcpy(sig, e.sig, e.sig_len);
            memcpy(batch, e.batch, e.batch_len);
            if (part == P_AGENT)
                agent[i] ^= (char)masks[m];
            else if (part == P_SIG)
                sig[i] ^= masks[m];
            else
                batch[i] ^= masks[m];
            size_t len;
            uint8_t *buf =
                pack_env(agent, e.alg, e.key, e.key_len, sig, e.sig_len, batch, e.batch_len, &len);
            int rc = check(buf, len, why, sizeof(why));
            if (rc != CIS_EBADSIG && rc != CIS_EDECODE)
                fail_msg("alg %d part %d byte %zu mask %02x: %d (%s)", e.alg, (int)part, i,
                         masks[m], rc, why);
            free(buf);
        }
    }
    cis_envelope_free(&e);
}

static void test_tamper(void **state)
{
    uint8_t batch[48];
    char why[512];
    (void)state;

    fill(batch, sizeof(batch), 13);
    struct cis_signer *signers[2] = {open_ecdsa("key.pem"), open_hmac()};
    for (int k = 0; k < 2; k++) {
        uint8_t *env;
        size_t len;
        assert_int_equal(
            cis_signer_wrap(signers[k], "gw-1.site:a@b_c", batch, sizeof(batch), &env, &len), 0);
        assert_int_equal(check(env, len, why, sizeof(why)), 0);
        flip_part(env, len, P_AGENT);
        flip_part(env, len, P_SIG);
        flip_part(env, len, P_BATCH);
        /* Any byte of the whole envelope, the key and the framing included: never accepted. */
        for (size_t i = 0; i < len; i++) {
            env[i] ^= 0x01;
            if (check(env, len, why, sizeof(why)) == 0)
                fail_msg("signer %d: byte %zu flipped and still accepted", k, i);
            env[i] ^= 0x01;
        }
        /* A signature moved to another agent's name does not verify. */
        struct cis_envelope e;
        assert_int_equal(cis_envelope_decode(env, len, &e, why, sizeof(why)), 0);
        size_t l2;
        uint8_t *moved =
            pack_env("gw-2", e.alg, e.key, e.key_len, e.sig, e.sig_len, e.batch, e.batch_len, &l2);
        assert_int_equal(check(moved, l2, why, sizeof(why)), CIS_EBADSIG);
        assert_non_null(strstr(why, "signature of agent 'gw-2' does not verify"));
        assert_non_null(strstr(why, "changed after it was signed"));
        free(moved);
        cis_envelope_free(&e);
        free(env);
        cis_signer_free(signers[k]);
    }
}

static void test_wrong_credentials(void **state)
{
    uint8_t batch[100], fpr[CIS_FPR_LEN], other[CIS_FPR_LEN];
    char why[512], fs[CIS_FPR_STR_LEN], os[CIS_FPR_STR_LEN], want[512];
    struct cis_envelope e;
    uint8_t *env;
    size_t len;
    static const char other_secret[] = "another secret, another key id, 32+ bytes";
    (void)state;

    fill(batch, sizeof(batch), 14);
    openssl_fpr(fpr);
    fpr_of("other.pem", other);
    cis_fpr_format(fpr, fs);
    cis_fpr_format(other, os);

    /* ECDSA: another key's fingerprint, no key, only a secret registered. */
    struct cis_signer *s = open_ecdsa("key.pem");
    assert_int_equal(cis_signer_wrap(s, "gw-1", batch, sizeof(batch), &env, &len), 0);
    cis_signer_free(s);
    assert_int_equal(cis_envelope_decode(env, len, &e, why, sizeof(why)), 0);
    assert_int_equal(cis_envelope_verify(&e, other, NULL, 0, why, sizeof(why)), CIS_EKEY);
    snprintf(want, sizeof(want),
             "batch of agent 'gw-1' is signed with key %s, not its registered key %s", fs, os);
    assert_string_equal(why, want);
    assert_int_equal(cis_envelope_verify(&e, NULL, NULL, 0, why, sizeof(why)), CIS_EKEY);
    assert_non_null(strstr(why, fs));
    assert_non_null(strstr(why, "no key is registered"));
    assert_int_equal(cis_envelope_verify(&e, NULL, (const uint8_t *)secret_b64, strlen(secret_b64),
                                         why, sizeof(why)),
                     CIS_EKEY);
    cis_envelope_free(&e);
    free(env);

    /* HMAC: another secret, no secret, only a key registered. */
    s = open_hmac();
    assert_int_equal(cis_signer_wrap(s, "gw-1", batch, sizeof(batch), &env, &len), 0);
    cis_signer_free(s);
    assert_int_equal(cis_envelope_decode(env, len, &e, why, sizeof(why)), 0);
    assert_int_equal(cis_envelope_verify(&e, NULL, (const uint8_t *)other_secret,
                                         strlen(other_secret), why, sizeof(why)),
                     CIS_EKEY);
    assert_non_null(strstr(why, "not its registered secret (key id"));
    assert_int_equal(cis_envelope_verify(&e, fpr, NULL, 0, why, sizeof(why)), CIS_EKEY);
    assert_non_null(strstr(why, "no secret is registered"));
    assert_int_equal(cis_envelope_verify(&e, fpr, (const uint8_t *)secret_b64, 0, why, sizeof(why)),
                     CIS_EKEY);
    assert_int_equal(cis_envelope_verify(&e, NULL, (const uint8_t *)secret_b64, strlen(secret_b64),
                                         why, sizeof(why)),
                     0);
    cis_envelope_free(&e);
    free(env);
}

/* An ECDSA envelope whose key is registered but is not a P-256 key: CIS_EDECODE. */
static void test_registered_key_not_p256(void **state)
{
    static const char *const names[] = {"rsa_pub.der", "p384_pub.der"};
    uint8_t sig[70], batch[10], fpr[CIS_FPR_LEN];
    char why[512];
    struct cis_envelope e;
    (void)state;

    memset(sig, 0x30, sizeof(sig));
    memset(batch, 'b', sizeof(batch));
    for (size_t i = 0; i < 2; i++) {
        size_t klen, len;
        uint8_t *key = read_all(names[i], &klen);
        assert_true(klen <= 256);
        cis_fpr_of_spki(key, klen, fpr);
        uint8_t *env = pack_env("gw-1", CIS_SIG_ECDSA, key, klen, sig, sizeof(sig), batch,
                                sizeof(batch), &len);
        assert_int_equal(cis_envelope_decode(env, len, &e, why, sizeof(why)), 0);
        assert_int_equal(cis_envelope_verify(&e, fpr, NULL, 0, why, sizeof(why)), CIS_EDECODE);
        assert_non_null(strstr(why, "not an ECDSA P-256 public key"));
        cis_envelope_free(&e);
        free(env);
        free(key);
    }
}

static void expect_decode_refusal(const uint8_t *buf, size_t len, const char *words)
{
    struct cis_envelope e;
    char why[256] = "";
    memset(&e, 0x5a, sizeof(e));
    int rc = cis_envelope_decode(buf, len, &e, why, sizeof(why));
    if (rc != CIS_EDECODE || !strstr(why, words))
        fail_msg("got %d \"%s\", want CIS_EDECODE and \"%s\"", rc, why, words);
    assert_null(e.pb); /* zeroed: cis_envelope_free() on it is safe */
    cis_envelope_free(&e);
}

static void expect_env_refusal(const char *agent, int alg, size_t klen, size_t slen, size_t blen,
                               const char *words)
{
    static uint8_t key[512], sig[512], batch[64];
    size_t len;
    uint8_t *buf = pack_env(agent, alg, key, klen, sig, slen, batch, blen, &len);
    expect_decode_refusal(buf, len, words);
    free(buf);
}

static void test_decode_refusals(void **state)
{
    uint8_t batch[40];
    char why[256], id[300];
    struct cis_envelope e;
    (void)state;

    expect_decode_refusal(NULL, 0, "empty");
    expect_decode_refusal((const uint8_t *)"", 0, "empty");
    expect_decode_refusal((const uint8_t *)"\xff\xff\xff\xff", 4, "bad protobuf");

    /* Every proper prefix of a valid envelope is refused. */
    fill(batch, sizeof(batch), 15);
    struct cis_signer *s = open_hmac();
    uint8_t *env;
    size_t len;
    assert_int_equal(cis_signer_wrap(s, "gw-1", batch, sizeof(batch), &env, &len), 0);
    cis_signer_free(s);
    for (size_t n = 0; n < len; n++) {
        memset(&e, 0, sizeof(e));
        assert_int_equal(cis_envelope_decode(env, n, &e, why, sizeof(why)), CIS_EDECODE);
        assert_null(e.pb);
    }
    /* Trailing bytes that are no field: refused too. */
    uint8_t *longer = malloc(len + 1);
    assert_non_null(longer);
    memcpy(longer, env, len);
    longer[len] = 0;
    expect_decode_refusal(longer, len + 1, "bad protobuf");
    free(longer);
    free(env);

    /* The algorithm. */
    expect_env_refusal("gw-1", 0, 16, 32, 10, "not signed (alg NONE)");
    expect_env_refusal("gw-1", 3, 16, 32, 10, "algorithm 3 is unknown");
    /* The agent id. */
    expect_env_refusal("", CIS_SIG_HMAC, 16, 32, 10, "no agent id");
    expect_env_refusal("gw/1", CIS_SIG_HMAC, 16, 32, 10, "agent id has a character");
    expect_env_refusal("gw 1", CIS_SIG_HMAC, 16, 32, 10, "agent id has a character");
    expect_env_refusal("gw+1", CIS_SIG_HMAC, 16, 32, 10, "agent id has a character");
    expect_env_refusal("gw\xc3\xa9", CIS_SIG_HMAC, 16, 32, 10, "agent id has a character");
    memset(id, 'a', 257);
    id[257] = '\0';
    expect_env_refusal(id, CIS_SIG_HMAC, 16, 32, 10, "longer than 256");
    /* The key. */
    expect_env_refusal("gw-1", CIS_SIG_ECDSA, 257, 70, 10, "key is 257 bytes");
    expect_env_refusal("gw-1", CIS_SIG_ECDSA, 0, 70, 10, "key is 0 bytes");
    expect_env_refusal("gw-1", CIS_SIG_HMAC, 15, 32, 10, "key id is 15 bytes");
    expect_env_refusal("gw-1", CIS_SIG_HMAC, 17, 32, 10, "key id is 17 bytes");
    /* The signature. */
    expect_env_refusal("gw-1", CIS_SIG_ECDSA, 91, 7, 10, "signature is 7 bytes");
    expect_env_refusal("gw-1", CIS_SIG_ECDSA, 91, 81, 10, "signature is 81 bytes");
    expect_env_refusal("gw-1", CIS_SIG_HMAC, 16, 31, 10, "signature is 31 bytes");
    expect_env_refusal("gw-1", CIS_SIG_HMAC, 16, 0, 10, "signature is 0 bytes");
    /* The batch. */
    expect_env_refusal("gw-1", CIS_SIG_HMAC, 16, 32, 0, "no batch");

    /* The bounds themselves pass decoding. */
    memset(id, 'a', 256);
    id[256] = '\0';
    static uint8_t zero[512];
    size_t l;
    uint8_t *ok = pack_env(id, CIS_SIG_ECDSA, zero, 256, zero, 80, zero, 1, &l);
    assert_int_equal(cis_envelope_decode(ok, l, &e, why, sizeof(why)), 0);
    assert_int_equal(strlen(e.agent_id), 256);
    cis_envelope_free(&e);
    free(ok);
    ok = pack_env("gw-1", CIS_SIG_ECDSA, zero, 1, zero, 8, zero, 1, &l);
    assert_int_equal(cis_envelope_decode(ok, l, &e, why, sizeof(why)), 0);
    cis_envelope_free(&e);
    free(ok);

    /* A NUL in the agent id would hide bytes from the signature: refused. */
    static const uint8_t nul[] = {0x0a, 6, 'g', 'w',  '-', '1', 0,    'x', 0x10, 2,
                                  0x1a, 1, 'k', 0x22, 1,   's', 0x2a, 1,   'b'};
    expect_decode_refusal(nul, sizeof(nul), "canonical");
}

static void test_signer_refusals(void **state)
{
    char p[128], err[512];
    struct cis_signer *s = (struct cis_signer *)1;
    uint8_t batch[4] = {1, 2, 3, 4}, *out = (uint8_t *)1;
    size_t out_len = 1;
    (void)state;

    static const struct {
        const char *name;
        int code;
        const char *words;
    } cases[] = {
        {"missing.key", CIS_ENOTFOUND, "no such file"},
        {"pub.pem", CIS_EINVAL, "a public key, not a private key"},
        {"crt.pem", CIS_EINVAL, "a certificate, not a private key"},
        {"junk.txt", CIS_EINVAL, "not a private key"},
        {"rsa.pem", CIS_EINVAL, "an RSA key; Cistern device keys are ECDSA P-256"},
        {"p384.pem", CIS_EINVAL, "curve secp384r1"},
        {"ed.pem", CIS_EINVAL, "does not support (Ed25519?)"},
        {"enc.pem", CIS_EINVAL, "an encrypted private key"},
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        path_of(cases[i].name, p, sizeof(p));
        s = (struct cis_signer *)1;
        err[0] = '\0';
        int rc = cis_signer_open_ecdsa(p, &s, err, sizeof(err));
        if (rc != cases[i].code || !strstr(err, cases[i].words) || !strstr(err, p) || s != NULL)
            fail_msg("%s: got %d \"%s\"", cases[i].name, rc, err);
    }
    write_file("s644", secret_b64, strlen(secret_b64), 0644);
    path_of("s644", p, sizeof(p));
    s = (struct cis_signer *)1;
    assert_int_equal(cis_signer_open_hmac(p, &s, err, sizeof(err)), CIS_EINVAL);
    assert_null(s);
    assert_non_null(strstr(err, "chmod 600"));
    assert_int_equal(cis_signer_open_hmac(NULL, &s, err, sizeof(err)), CIS_EINVAL);
    assert_int_equal(cis_signer_open_ecdsa("", &s, err, sizeof(err)), CIS_EINVAL);

    /* Wrapping what the receiver would refuse is the caller's bug: refused, nothing made. */
    s = open_hmac();
    assert_int_equal(cis_signer_wrap(s, "gw/1", batch, 4, &out, &out_len), CIS_EINVAL);
    assert_null(out);
    assert_int_equal(out_len, 0);
    assert_int_equal(cis_signer_wrap(s, "", batch, 4, &out, &out_len), CIS_EINVAL);
    assert_int_equal(cis_signer_wrap(s, NULL, batch, 4, &out, &out_len), CIS_EINVAL);
    assert_int_equal(cis_signer_wrap(s, "gw-1", batch, 0, &out, &out_len), CIS_EINVAL);
    assert_null(out);
    cis_signer_free(s);
    cis_signer_free(NULL);
    struct cis_envelope z;
    memset(&z, 0, sizeof(z));
    cis_envelope_free(&z);
    cis_envelope_free(NULL);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_fpr_format_parse),
        cmocka_unit_test(test_fpr_of_file_forms),
        cmocka_unit_test(test_fpr_of_file_refusals),
        cmocka_unit_test(test_hmac_secret_load),
        cmocka_unit_test(test_hmac_key_id),
        cmocka_unit_test(test_ecdsa_roundtrip),
        cmocka_unit_test(test_hmac_roundtrip),
        cmocka_unit_test(test_tamper),
        cmocka_unit_test(test_wrong_credentials),
        cmocka_unit_test(test_registered_key_not_p256),
        cmocka_unit_test(test_decode_refusals),
        cmocka_unit_test(test_signer_refusals),
    };
    return cmocka_run_group_tests(tests, group_setup, group_teardown);
}
