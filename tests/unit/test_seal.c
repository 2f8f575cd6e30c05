/* Unit tests for spool encryption at rest (edge-agent/seal.c). */
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
#include <mbedtls/gcm.h>

#include "cistern/err.h"
#include "seal.h"

struct fx {
    char dir[64];
    char key[128]; /* made by keygen in setup */
};

static void fx_path(const struct fx *f, const char *name, char *out, size_t len)
{
    snprintf(out, len, "%s/%s", f->dir, name);
}

static int fx_setup(void **state)
{
    struct fx *f = calloc(1, sizeof(*f));
    if (!f)
        return -1;
    snprintf(f->dir, sizeof(f->dir), "/tmp/cistern-seal-XXXXXX");
    if (!mkdtemp(f->dir)) {
        free(f);
        return -1;
    }
    fx_path(f, "spool.key", f->key, sizeof(f->key));
    char err[256] = "";
    if (agent_seal_keygen(f->key, err, sizeof(err)) != 0) {
        fprintf(stderr, "keygen: %s\n", err);
        return -1;
    }
    *state = f;
    return 0;
}

static int fx_teardown(void **state)
{
    struct fx *f = *state;
    static const char *const names[] = {"spool.key", "k2",  "k644", "k640",  "k400",   "short",
                                        "long",      "dir", "link", "fixed", "missing"};
    for (size_t i = 0; i < sizeof(names) / sizeof(names[0]); i++) {
        char p[192];
        fx_path(f, names[i], p, sizeof(p));
        if (unlink(p) != 0)
            rmdir(p);
    }
    assert_int_equal(rmdir(f->dir), 0);
    free(f);
    return 0;
}

static void write_file(const char *path, const uint8_t *buf, size_t len, mode_t mode)
{
    FILE *fp = fopen(path, "wb");
    assert_non_null(fp);
    assert_int_equal(fwrite(buf, 1, len, fp), len);
    assert_int_equal(fclose(fp), 0);
    assert_int_equal(chmod(path, mode), 0);
}

static size_t read_file(const char *path, uint8_t *buf, size_t cap)
{
    FILE *fp = fopen(path, "rb");
    assert_non_null(fp);
    size_t n = fread(buf, 1, cap, fp);
    fclose(fp);
    return n;
}

static struct agent_seal *load_ok(const char *path)
{
    struct agent_seal *k = NULL;
    char err[256] = "";
    int rc = agent_seal_load(path, &k, err, sizeof(err));
    if (rc)
        fprintf(stderr, "load: %d %s\n", rc, err);
    assert_int_equal(rc, 0);
    assert_non_null(k);
    return k;
}

static void test_round_trip(void **state)
{
    struct fx *f = *state;
    struct agent_seal *k = load_ok(f->key);
    static const size_t lens[] = {0, 1, 15, 16, 17, 1000, 70000};
    for (size_t i = 0; i < sizeof(lens) / sizeof(lens[0]); i++) {
        size_t len = lens[i];
        uint8_t *in = malloc(len + 1);
        assert_non_null(in);
        for (size_t j = 0; j < len; j++)
            in[j] = (uint8_t)(j * 7 + 3);
        uint8_t *blob = NULL, *plain = NULL;
        size_t blen = 0, plen = 99;
        assert_int_equal(agent_seal_seal(k, 42, 100, 199, in, len, &blob, &blen), 0);
        assert_int_equal(blen, len + AGENT_SEAL_OVERHEAD);
        /* The ciphertext is not the plaintext. */
        if (len >= 16)
            assert_memory_not_equal(blob + AGENT_SEAL_NONCE_LEN, in, 16);
        assert_int_equal(agent_seal_open(k, 42, 100, 199, blob, blen, &plain, &plen), 0);
        assert_int_equal(plen, len);
        assert_non_null(plain);
        if (len)
            assert_memory_equal(plain, in, len);
        free(plain);
        free(blob);
        free(in);
    }
    agent_seal_free(k);
    agent_seal_free(NULL);
}

/* The blob layout and associated data are what seal.h says, checked with mbedTLS directly:
 * nonce || ciphertext || tag, AAD = big-endian epoch || first || last. */
static void test_format_matches_header(void **state)
{
    struct fx *f = *state;
    char p[192];
    uint8_t key[32];
    for (int i = 0; i < 32; i++)
        key[i] = (uint8_t)i;
    fx_path(f, "fixed", p, sizeof(p));
    write_file(p, key, sizeof(key), 0600);
    struct agent_seal *k = load_ok(p);

    const uint8_t msg[] = "segment bytes";
    uint8_t *blob = NULL;
    size_t blen = 0;
    assert_int_equal(agent_seal_seal(k, 0x0102030405060708ULL, 9, 0x1000000000ULL, msg, sizeof(msg),
                                     &blob, &blen),
                     0);
    uint8_t aad[24] = {1, 2, 3, 4, 5, 6, 7, 8, 0, 0, 0, 0, 0, 0, 0, 9, 0, 0, 0, 0x10, 0, 0, 0, 0};
    uint8_t out[sizeof(msg)];
    mbedtls_gcm_context gcm;
    mbedtls_gcm_init(&gcm);
    assert_int_equal(mbedtls_gcm_setkey(&gcm, MBEDTLS_CIPHER_ID_AES, key, 256), 0);
    assert_int_equal(mbedtls_gcm_auth_decrypt(&gcm, sizeof(msg), blob, 12, aad, sizeof(aad),
                                              blob + 12 + sizeof(msg), 16, blob + 12, out),
                     0);
    mbedtls_gcm_free(&gcm);
    assert_memory_equal(out, msg, sizeof(msg));

    /* The key id is SHA-256("cistern spool key id v1" || key), first 8 bytes big-endian
     * (reference value computed with Python's hashlib). */
    assert_true(agent_seal_key_id(k) == 0xb6b062a88dab184eULL);
    free(blob);
    agent_seal_free(k);
}

static void test_every_bit_flip_is_tampered(void **state)
{
    struct fx *f = *state;
    struct agent_seal *k = load_ok(f->key);
    const uint8_t msg[] = "forty bytes of payload, give or take...";
    uint8_t *blob = NULL;
    size_t blen = 0;
    assert_int_equal(agent_seal_seal(k, 7, 1, 5, msg, sizeof(msg), &blob, &blen), 0);
    size_t checked = 0;
    for (size_t byte = 0; byte < blen; byte++) {
        for (int bit = 0; bit < 8; bit++) {
            blob[byte] ^= (uint8_t)(1u << bit);
            uint8_t *plain = (uint8_t *)"sentinel";
            size_t plen = 12345;
            int rc = agent_seal_open(k, 7, 1, 5, blob, blen, &plain, &plen);
            if (rc != CIS_ETAMPERED)
                fprintf(stderr, "flip byte %zu bit %d: rc %d\n", byte, bit, rc);
            assert_int_equal(rc, CIS_ETAMPERED);
            assert_null(plain);
            assert_int_equal(plen, 0);
            blob[byte] ^= (uint8_t)(1u << bit);
            checked++;
        }
    }
    /* Nonce, ciphertext and tag were all covered. */
    assert_int_equal(checked, (sizeof(msg) + AGENT_SEAL_OVERHEAD) * 8);
    uint8_t *plain = NULL;
    size_t plen = 0;
    assert_int_equal(agent_seal_open(k, 7, 1, 5, blob, blen, &plain, &plen), 0);
    assert_memory_equal(plain, msg, sizeof(msg));
    free(plain);
    free(blob);
    agent_seal_free(k);
}

static void test_wrong_place_is_tampered(void **state)
{
    struct fx *f = *state;
    struct agent_seal *k = load_ok(f->key);
    const uint8_t msg[] = "payload";
    uint8_t *blob = NULL, *plain = NULL;
    size_t blen = 0, plen = 0;
    assert_int_equal(agent_seal_seal(k, 1000, 20, 29, msg, sizeof(msg), &blob, &blen), 0);
    assert_int_equal(agent_seal_open(k, 1001, 20, 29, blob, blen, &plain, &plen), CIS_ETAMPERED);
    assert_null(plain);
    assert_int_equal(agent_seal_open(k, 1000, 21, 29, blob, blen, &plain, &plen), CIS_ETAMPERED);
    assert_null(plain);
    assert_int_equal(agent_seal_open(k, 1000, 20, 30, blob, blen, &plain, &plen), CIS_ETAMPERED);
    assert_null(plain);
    /* Swapping first and last must not open either. */
    assert_int_equal(agent_seal_open(k, 1000, 29, 20, blob, blen, &plain, &plen), CIS_ETAMPERED);
    assert_null(plain);

    /* Another key does not open it. */
    char p[192];
    fx_path(f, "k2", p, sizeof(p));
    assert_int_equal(agent_seal_keygen(p, NULL, 0), 0);
    struct agent_seal *k2 = load_ok(p);
    assert_int_equal(agent_seal_open(k2, 1000, 20, 29, blob, blen, &plain, &plen), CIS_ETAMPERED);
    assert_null(plain);

    assert_int_equal(agent_seal_open(k, 1000, 20, 29, blob, blen, &plain, &plen), 0);
    assert_int_equal(plen, sizeof(msg));
    free(plain);
    free(blob);
    agent_seal_free(k2);
    agent_seal_free(k);
}

static void test_too_short(void **state)
{
    struct fx *f = *state;
    struct agent_seal *k = load_ok(f->key);
    uint8_t buf[AGENT_SEAL_OVERHEAD] = {0};
    uint8_t *plain = NULL;
    size_t plen = 0;
    assert_int_equal(agent_seal_open(k, 1, 1, 1, buf, 0, &plain, &plen), CIS_ETAMPERED);
    assert_int_equal(agent_seal_open(k, 1, 1, 1, NULL, 0, &plain, &plen), CIS_ETAMPERED);
    assert_int_equal(agent_seal_open(k, 1, 1, 1, buf, AGENT_SEAL_OVERHEAD - 1, &plain, &plen),
                     CIS_ETAMPERED);
    assert_null(plain);
    /* Exactly the overhead is a well-formed (empty) blob, but these zeros are not authentic. */
    assert_int_equal(agent_seal_open(k, 1, 1, 1, buf, AGENT_SEAL_OVERHEAD, &plain, &plen),
                     CIS_ETAMPERED);
    assert_null(plain);
    agent_seal_free(k);
}

static void test_random_nonce(void **state)
{
    struct fx *f = *state;
    struct agent_seal *k = load_ok(f->key);
    const uint8_t msg[] = "same plaintext";
    uint8_t *a = NULL, *b = NULL;
    size_t alen = 0, blen = 0;
    assert_int_equal(agent_seal_seal(k, 5, 1, 1, msg, sizeof(msg), &a, &alen), 0);
    assert_int_equal(agent_seal_seal(k, 5, 1, 1, msg, sizeof(msg), &b, &blen), 0);
    assert_int_equal(alen, blen);
    assert_memory_not_equal(a, b, AGENT_SEAL_NONCE_LEN);
    assert_memory_not_equal(a + AGENT_SEAL_NONCE_LEN, b + AGENT_SEAL_NONCE_LEN,
                            alen - AGENT_SEAL_NONCE_LEN);
    free(a);
    free(b);
    agent_seal_free(k);
}

static void test_keygen(void **state)
{
    struct fx *f = *state;
    struct stat sb;
    assert_int_equal(stat(f->key, &sb), 0);
    assert_true(S_ISREG(sb.st_mode));
    assert_int_equal(sb.st_mode & 07777, 0600);
    assert_int_equal(sb.st_size, 32);

    uint8_t before[64], after[64];
    assert_int_equal(read_file(f->key, before, sizeof(before)), 32);
    /* Not all zeros (it came from getrandom). */
    static const uint8_t zeros[32];
    assert_memory_not_equal(before, zeros, 32);

    char err[256] = "";
    assert_int_equal(agent_seal_keygen(f->key, err, sizeof(err)), CIS_EINVAL);
    assert_non_null(strstr(err, "exists"));
    assert_non_null(strstr(err, f->key));
    assert_int_equal(read_file(f->key, after, sizeof(after)), 32);
    assert_memory_equal(before, after, 32);

    /* A permissive umask does not widen the mode. */
    char p[192];
    fx_path(f, "k2", p, sizeof(p));
    mode_t old = umask(0);
    assert_int_equal(agent_seal_keygen(p, err, sizeof(err)), 0);
    umask(old);
    assert_int_equal(stat(p, &sb), 0);
    assert_int_equal(sb.st_mode & 07777, 0600);
    uint8_t other[32];
    assert_int_equal(read_file(p, other, sizeof(other)), 32);
    assert_memory_not_equal(before, other, 32);

    /* A missing directory is an error, not a crash. */
    assert_int_not_equal(agent_seal_keygen("/nonexistent-cistern-dir/k", err, sizeof(err)), 0);
}

static void expect_load_fails(const char *path, int code, const char *needle)
{
    struct agent_seal *k = (struct agent_seal *)&k;
    char err[512] = "";
    assert_int_equal(agent_seal_load(path, &k, err, sizeof(err)), code);
    assert_null(k);
    if (!strstr(err, needle))
        fprintf(stderr, "message \"%s\" lacks \"%s\"\n", err, needle);
    assert_non_null(strstr(err, needle));
}

static void test_load_refuses(void **state)
{
    struct fx *f = *state;
    uint8_t key[32];
    assert_int_equal(read_file(f->key, key, sizeof(key)), 32);
    char p[192], msg[256];

    fx_path(f, "k644", p, sizeof(p));
    write_file(p, key, 32, 0644);
    snprintf(msg, sizeof(msg), "chmod 600 %s", p);
    expect_load_fails(p, CIS_EINVAL, msg);
    expect_load_fails(p, CIS_EINVAL, "0644");

    fx_path(f, "k640", p, sizeof(p));
    write_file(p, key, 32, 0640);
    snprintf(msg, sizeof(msg), "chmod 600 %s", p);
    expect_load_fails(p, CIS_EINVAL, msg);
    expect_load_fails(p, CIS_EINVAL, "0640");

    fx_path(f, "short", p, sizeof(p));
    write_file(p, key, 31, 0600);
    expect_load_fails(p, CIS_EINVAL, "31 bytes");

    fx_path(f, "long", p, sizeof(p));
    uint8_t big[33] = {0};
    memcpy(big, key, 32);
    write_file(p, big, 33, 0600);
    expect_load_fails(p, CIS_EINVAL, "33 bytes");

    fx_path(f, "dir", p, sizeof(p));
    assert_int_equal(mkdir(p, 0700), 0);
    expect_load_fails(p, CIS_EINVAL, "not a regular file");

    /* A symlink to a good key is refused all the same. */
    fx_path(f, "link", p, sizeof(p));
    assert_int_equal(symlink(f->key, p), 0);
    expect_load_fails(p, CIS_EINVAL, "symbolic link");

    fx_path(f, "missing", p, sizeof(p));
    expect_load_fails(p, CIS_EIO, p);

    /* 0400 is fine. */
    fx_path(f, "k400", p, sizeof(p));
    write_file(p, key, 32, 0400);
    struct agent_seal *k = load_ok(p);
    agent_seal_free(k);
}

static void test_key_id(void **state)
{
    struct fx *f = *state;
    char p[192];
    fx_path(f, "k2", p, sizeof(p));
    assert_int_equal(agent_seal_keygen(p, NULL, 0), 0);
    struct agent_seal *a = load_ok(f->key), *a2 = load_ok(f->key), *b = load_ok(p);
    assert_true(agent_seal_key_id(a) == agent_seal_key_id(a2));
    assert_true(agent_seal_key_id(a) != agent_seal_key_id(b));
    assert_true(agent_seal_key_id(a) != 0);

    /* A blob sealed with one load opens with another load of the same file. */
    const uint8_t msg[] = "x";
    uint8_t *blob = NULL, *plain = NULL;
    size_t blen = 0, plen = 0;
    assert_int_equal(agent_seal_seal(a, 3, 4, 4, msg, sizeof(msg), &blob, &blen), 0);
    assert_int_equal(agent_seal_open(a2, 3, 4, 4, blob, blen, &plain, &plen), 0);
    free(plain);
    free(blob);
    agent_seal_free(a);
    agent_seal_free(a2);
    agent_seal_free(b);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_round_trip, fx_setup, fx_teardown),
        cmocka_unit_test_setup_teardown(test_format_matches_header, fx_setup, fx_teardown),
        cmocka_unit_test_setup_teardown(test_every_bit_flip_is_tampered, fx_setup, fx_teardown),
        cmocka_unit_test_setup_teardown(test_wrong_place_is_tampered, fx_setup, fx_teardown),
        cmocka_unit_test_setup_teardown(test_too_short, fx_setup, fx_teardown),
        cmocka_unit_test_setup_teardown(test_random_nonce, fx_setup, fx_teardown),
        cmocka_unit_test_setup_teardown(test_keygen, fx_setup, fx_teardown),
        cmocka_unit_test_setup_teardown(test_load_refuses, fx_setup, fx_teardown),
        cmocka_unit_test_setup_teardown(test_key_id, fx_setup, fx_teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
