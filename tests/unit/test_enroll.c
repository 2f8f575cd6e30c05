/* Unit tests for `cistern-agent enroll` (edge-agent/enroll.c): the key file, the CSR, the
 * fingerprint, and every refusal leaving the disk as it was. */
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
#include <mbedtls/ecp.h>
#include <mbedtls/pk.h>
#include <mbedtls/sha256.h>
#include <mbedtls/x509_csr.h>

#include "cistern/err.h"
#include "enroll.h"

struct fx {
    char dir[64];
    char key[128];
    char csr[128];
};

static int fx_setup(void **state)
{
    struct fx *f = calloc(1, sizeof(*f));
    if (!f)
        return -1;
    snprintf(f->dir, sizeof(f->dir), "/tmp/cistern-enroll-XXXXXX");
    if (!mkdtemp(f->dir)) {
        free(f);
        return -1;
    }
    snprintf(f->key, sizeof(f->key), "%s/device.key", f->dir);
    snprintf(f->csr, sizeof(f->csr), "%s/device.csr", f->dir);
    *state = f;
    return 0;
}

/* Remove DIR and everything in it (one level of subdirectories). */
static void rm_tree(const char *dir)
{
    DIR *d = opendir(dir);
    struct dirent *e;
    if (!d)
        return;
    while ((e = readdir(d)) != NULL) {
        char p[512];
        if (strcmp(e->d_name, ".") == 0 || strcmp(e->d_name, "..") == 0)
            continue;
        snprintf(p, sizeof(p), "%s/%s", dir, e->d_name);
        if (unlink(p) != 0) {
            chmod(p, 0700);
            rm_tree(p);
        }
    }
    closedir(d);
    rmdir(dir);
}

static int fx_teardown(void **state)
{
    struct fx *f = *state;
    rm_tree(f->dir);
    free(f);
    return 0;
}

/* The names in DIR, sorted, joined with ' ' (leftover temporary files show up here). */
static void dir_list(const char *dir, char *out, size_t len)
{
    struct dirent **names;
    int n = scandir(dir, &names, NULL, alphasort);
    assert_true(n >= 0);
    out[0] = '\0';
    for (int i = 0; i < n; i++) {
        if (strcmp(names[i]->d_name, ".") != 0 && strcmp(names[i]->d_name, "..") != 0) {
            size_t l = strlen(out);
            snprintf(out + l, len - l, "%s%s", l ? " " : "", names[i]->d_name);
        }
        free(names[i]);
    }
    free(names);
}

static size_t read_file(const char *path, char *buf, size_t cap)
{
    FILE *fp = fopen(path, "rb");
    assert_non_null(fp);
    size_t n = fread(buf, 1, cap - 1, fp);
    fclose(fp);
    buf[n] = '\0';
    return n;
}

static mode_t file_mode(const char *path)
{
    struct stat sb;
    assert_int_equal(lstat(path, &sb), 0);
    return sb.st_mode & 07777;
}

/* The fingerprint computed here, independently of enroll.c: SHA-256 over the DER SPKI. */
static void fingerprint_of(mbedtls_pk_context *pk, char out[AGENT_ENROLL_FPR_LEN])
{
    unsigned char der[256], digest[32];
    int n = mbedtls_pk_write_pubkey_der(pk, der, sizeof(der));
    assert_true(n > 0);
    assert_int_equal(mbedtls_sha256_ret(der + sizeof(der) - n, (size_t)n, digest, 0), 0);
    strcpy(out, "sha256:");
    for (int i = 0; i < 32; i++)
        snprintf(out + 7 + 2 * i, 3, "%02x", digest[i]);
}

/* Parse the key file back with mbedTLS: a P-256 EC key whose fingerprint is FPR. */
static void check_key(const char *path, const char *fpr)
{
    mbedtls_pk_context pk;
    char again[AGENT_ENROLL_FPR_LEN];
    mbedtls_pk_init(&pk);
    assert_int_equal(mbedtls_pk_parse_keyfile(&pk, path, NULL), 0);
    assert_int_equal(mbedtls_pk_get_type(&pk), MBEDTLS_PK_ECKEY);
    assert_int_equal(mbedtls_pk_ec(pk)->grp.id, MBEDTLS_ECP_DP_SECP256R1);
    assert_int_equal(mbedtls_ecp_check_privkey(&mbedtls_pk_ec(pk)->grp, &mbedtls_pk_ec(pk)->d), 0);
    fingerprint_of(&pk, again);
    assert_string_equal(again, fpr);
    mbedtls_pk_free(&pk);
}

/* Parse the CSR: subject CN=<ID>, SHA-256 signature that verifies, the key's public half. */
static void check_csr(const char *path, const char *id, const char *fpr)
{
    mbedtls_x509_csr csr;
    char dn[256], want[128], csr_fpr[AGENT_ENROLL_FPR_LEN];
    unsigned char hash[32];

    mbedtls_x509_csr_init(&csr);
    assert_int_equal(mbedtls_x509_csr_parse_file(&csr, path), 0);
    assert_true(mbedtls_x509_dn_gets(dn, sizeof(dn), &csr.subject) > 0);
    snprintf(want, sizeof(want), "CN=%s", id);
    assert_string_equal(dn, want);
    assert_int_equal(csr.sig_md, MBEDTLS_MD_SHA256);
    assert_int_equal(mbedtls_pk_get_type(&csr.pk), MBEDTLS_PK_ECKEY);
    /* The self-signature: made by the private key of the public key it carries. */
    assert_int_equal(mbedtls_sha256_ret(csr.cri.p, csr.cri.len, hash, 0), 0);
    assert_int_equal(
        mbedtls_pk_verify(&csr.pk, MBEDTLS_MD_SHA256, hash, sizeof(hash), csr.sig.p, csr.sig.len),
        0);
    fingerprint_of(&csr.pk, csr_fpr);
    assert_string_equal(csr_fpr, fpr);
    mbedtls_x509_csr_free(&csr);
}

static void check_fpr_format(const char *fpr)
{
    assert_int_equal(strlen(fpr), AGENT_ENROLL_FPR_LEN - 1);
    assert_memory_equal(fpr, "sha256:", 7);
    for (size_t i = 7; fpr[i]; i++)
        assert_non_null(strchr("0123456789abcdef", fpr[i]));
}

static void test_enroll_makes_key_and_csr(void **state)
{
    struct fx *f = *state;
    struct agent_enroll_req req = {.id = "gw-0042", .key_path = f->key, .csr_path = f->csr};
    char fpr[AGENT_ENROLL_FPR_LEN], err[512] = "", names[512];

    /* umask 0 would give a plain open(0666) a world-readable key: the mode must not depend
     * on it. */
    mode_t old = umask(0);
    int rc = agent_enroll(&req, fpr, err, sizeof(err));
    umask(old);
    assert_int_equal(rc, 0);
    assert_int_equal(file_mode(f->key), 0600);
    assert_int_equal(file_mode(f->csr), 0644);
    check_fpr_format(fpr);
    check_key(f->key, fpr);
    check_csr(f->csr, "gw-0042", fpr);

    char pem[4096];
    read_file(f->key, pem, sizeof(pem));
    assert_non_null(strstr(pem, "-----BEGIN EC PRIVATE KEY-----"));
    read_file(f->csr, pem, sizeof(pem));
    assert_non_null(strstr(pem, "-----BEGIN CERTIFICATE REQUEST-----"));
    /* No temporary file left next to them. */
    dir_list(f->dir, names, sizeof(names));
    assert_string_equal(names, "device.csr device.key");

    /* Under a restrictive umask the public CSR is still 0644, the key still 0600. */
    old = umask(077);
    req.force = 1;
    rc = agent_enroll(&req, fpr, err, sizeof(err));
    umask(old);
    assert_int_equal(rc, 0);
    assert_int_equal(file_mode(f->key), 0600);
    assert_int_equal(file_mode(f->csr), 0644);
}

static void test_fingerprint_is_stable_and_per_key(void **state)
{
    struct fx *f = *state;
    struct agent_enroll_req req = {.id = "gw-1", .key_path = f->key, .csr_path = f->csr};
    char fpr1[AGENT_ENROLL_FPR_LEN], fpr2[AGENT_ENROLL_FPR_LEN], err[512] = "";

    assert_int_equal(agent_enroll(&req, fpr1, err, sizeof(err)), 0);
    /* Recomputed from the file, twice: the same every time. */
    check_key(f->key, fpr1);
    check_key(f->key, fpr1);
    req.force = 1;
    assert_int_equal(agent_enroll(&req, fpr2, err, sizeof(err)), 0);
    check_fpr_format(fpr2);
    assert_string_not_equal(fpr1, fpr2);
    check_key(f->key, fpr2);
    check_csr(f->csr, "gw-1", fpr2);
}

static void test_never_overwrites(void **state)
{
    struct fx *f = *state;
    struct agent_enroll_req req = {.id = "gw-1", .key_path = f->key, .csr_path = f->csr};
    char fpr[AGENT_ENROLL_FPR_LEN], fpr2[AGENT_ENROLL_FPR_LEN], err[512] = "";
    char key1[4096], csr1[4096], now[4096], names[512];

    assert_int_equal(agent_enroll(&req, fpr, err, sizeof(err)), 0);
    read_file(f->key, key1, sizeof(key1));
    read_file(f->csr, csr1, sizeof(csr1));

    err[0] = '\0';
    assert_int_equal(agent_enroll(&req, fpr2, err, sizeof(err)), CIS_EINVAL);
    assert_non_null(strstr(err, f->key));
    assert_non_null(strstr(err, "exists"));
    assert_string_equal(fpr2, "");
    read_file(f->key, now, sizeof(now));
    assert_string_equal(now, key1);
    read_file(f->csr, now, sizeof(now));
    assert_string_equal(now, csr1);

    /* Only the CSR is there: still refused, and no key appears. */
    assert_int_equal(unlink(f->key), 0);
    err[0] = '\0';
    assert_int_equal(agent_enroll(&req, fpr2, err, sizeof(err)), CIS_EINVAL);
    assert_non_null(strstr(err, f->csr));
    assert_int_equal(access(f->key, F_OK), -1);
    read_file(f->csr, now, sizeof(now));
    assert_string_equal(now, csr1);

    /* A dangling symbolic link counts as taken: its target is not created. */
    char target[160];
    snprintf(target, sizeof(target), "%s/elsewhere.key", f->dir);
    assert_int_equal(unlink(f->csr), 0);
    assert_int_equal(symlink(target, f->key), 0);
    assert_int_equal(agent_enroll(&req, fpr2, err, sizeof(err)), CIS_EINVAL);
    assert_int_equal(access(target, F_OK), -1);
    assert_int_equal(access(f->csr, F_OK), -1);
    dir_list(f->dir, names, sizeof(names));
    assert_string_equal(names, "device.key");

    /* --force replaces the link itself, never writes through it. */
    req.force = 1;
    assert_int_equal(agent_enroll(&req, fpr2, err, sizeof(err)), 0);
    assert_int_equal(access(target, F_OK), -1);
    assert_int_equal(file_mode(f->key), 0600); /* lstat: a regular file now */
    check_key(f->key, fpr2);
}

static void test_force_replaces(void **state)
{
    struct fx *f = *state;
    struct agent_enroll_req req = {.id = "gw-1", .key_path = f->key, .csr_path = f->csr};
    char fpr1[AGENT_ENROLL_FPR_LEN], fpr2[AGENT_ENROLL_FPR_LEN], err[512] = "";
    char key1[4096], csr1[4096], now[4096], names[512];

    assert_int_equal(agent_enroll(&req, fpr1, err, sizeof(err)), 0);
    read_file(f->key, key1, sizeof(key1));
    read_file(f->csr, csr1, sizeof(csr1));
    /* An old key left world-readable by hand: the replacement is 0600 again. */
    assert_int_equal(chmod(f->key, 0644), 0);
    req.force = 1;
    req.id = "gw-2";
    assert_int_equal(agent_enroll(&req, fpr2, err, sizeof(err)), 0);
    read_file(f->key, now, sizeof(now));
    assert_string_not_equal(now, key1);
    read_file(f->csr, now, sizeof(now));
    assert_string_not_equal(now, csr1);
    assert_int_equal(file_mode(f->key), 0600);
    check_key(f->key, fpr2);
    check_csr(f->csr, "gw-2", fpr2);
    dir_list(f->dir, names, sizeof(names));
    assert_string_equal(names, "device.csr device.key");
}

static void test_bad_ids(void **state)
{
    struct fx *f = *state;
    static const char *const bad[] = {"",         "gw/1", "gw 1",      "gw+1",  "gw#",
                                      "CN=x,O=y", "gw\n", "g\xc3\xa9", "gw\\1", "\"gw\""};
    char fpr[AGENT_ENROLL_FPR_LEN], err[512], names[512], longid[AGENT_ENROLL_ID_MAX + 2];

    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        struct agent_enroll_req req = {.id = bad[i], .key_path = f->key, .csr_path = f->csr};
        err[0] = '\0';
        assert_int_equal(agent_enroll_check_id(bad[i], err, sizeof(err)), CIS_EINVAL);
        assert_true(err[0] != '\0');
        assert_int_equal(agent_enroll(&req, fpr, err, sizeof(err)), CIS_EINVAL);
    }
    assert_int_equal(agent_enroll_check_id(NULL, err, sizeof(err)), CIS_EINVAL);
    memset(longid, 'a', sizeof(longid) - 1);
    longid[sizeof(longid) - 1] = '\0'; /* 65 characters */
    assert_int_equal(agent_enroll_check_id(longid, err, sizeof(err)), CIS_EINVAL);
    assert_non_null(strstr(err, "64"));
    longid[AGENT_ENROLL_ID_MAX] = '\0';
    assert_int_equal(agent_enroll_check_id(longid, err, sizeof(err)), 0);
    static const char *const good[] = {"gw-0042", "a", "site.7:gw_1@acme", "GW-A-9"};
    for (size_t i = 0; i < sizeof(good) / sizeof(good[0]); i++)
        assert_int_equal(agent_enroll_check_id(good[i], err, sizeof(err)), 0);
    /* Nothing was written for any refused id. */
    dir_list(f->dir, names, sizeof(names));
    assert_string_equal(names, "");

    /* The longest id still makes a CSR that parses with that CN. */
    struct agent_enroll_req req = {.id = longid, .key_path = f->key, .csr_path = f->csr};
    assert_int_equal(agent_enroll(&req, fpr, err, sizeof(err)), 0);
    check_csr(f->csr, longid, fpr);
}

static void test_bad_places(void **state)
{
    struct fx *f = *state;
    char fpr[AGENT_ENROLL_FPR_LEN], err[512], names[512], p[192], c[192];
    struct agent_enroll_req req = {.id = "gw-1", .key_path = p, .csr_path = c};

    /* No such directory: the message names the file and says so. */
    snprintf(p, sizeof(p), "%s/missing/device.key", f->dir);
    snprintf(c, sizeof(c), "%s/device.csr", f->dir);
    err[0] = '\0';
    assert_int_equal(agent_enroll(&req, fpr, err, sizeof(err)), CIS_ENOTFOUND);
    assert_non_null(strstr(err, p));
    assert_non_null(strstr(err, "No such file or directory"));

    /* A directory anyone can write to. */
    snprintf(p, sizeof(p), "%s/open", f->dir);
    assert_int_equal(mkdir(p, 0700), 0);
    assert_int_equal(chmod(p, 01777), 0);
    snprintf(p, sizeof(p), "%s/open/device.key", f->dir);
    err[0] = '\0';
    assert_int_equal(agent_enroll(&req, fpr, err, sizeof(err)), CIS_EINVAL);
    assert_non_null(strstr(err, "writable by everyone"));

    /* The key path is a directory (even with --force). */
    snprintf(p, sizeof(p), "%s/open", f->dir);
    assert_int_equal(chmod(p, 0700), 0);
    req.force = 1;
    assert_int_equal(agent_enroll(&req, fpr, err, sizeof(err)), CIS_EINVAL);
    assert_non_null(strstr(err, "is a directory"));

    /* Key and CSR the same file. */
    req.force = 0;
    snprintf(p, sizeof(p), "%s/same", f->dir);
    snprintf(c, sizeof(c), "%s/same", f->dir);
    assert_int_equal(agent_enroll(&req, fpr, err, sizeof(err)), CIS_EINVAL);

    /* The CSR's directory is missing: the key, already complete in its temporary file,
     * is not left behind either. */
    snprintf(p, sizeof(p), "%s/device.key", f->dir);
    snprintf(c, sizeof(c), "%s/nodir/device.csr", f->dir);
    err[0] = '\0';
    assert_int_equal(agent_enroll(&req, fpr, err, sizeof(err)), CIS_ENOTFOUND);
    assert_non_null(strstr(err, c));

    dir_list(f->dir, names, sizeof(names));
    assert_string_equal(names, "open");
}

static void test_csr_path(void **state)
{
    char out[64];
    (void)state;
    assert_int_equal(agent_enroll_csr_path("/etc/cistern/device.key", out, sizeof(out)), 0);
    assert_string_equal(out, "/etc/cistern/device.csr");
    assert_int_equal(agent_enroll_csr_path("k", out, sizeof(out)), 0);
    assert_string_equal(out, "k.csr");
    assert_int_equal(agent_enroll_csr_path("dev.pem", out, sizeof(out)), 0);
    assert_string_equal(out, "dev.pem.csr");
    assert_int_equal(agent_enroll_csr_path("/keys/.key", out, sizeof(out)), 0);
    assert_string_equal(out, "/keys/.key.csr");
    assert_int_equal(
        agent_enroll_csr_path("/a/very/long/path/that/does/not/fit/in/64/bytes.key", out, 20),
        CIS_ETOOBIG);
}

/* The command line: exit statuses, and what reaches the disk. */
static int run_main(int n, ...)
{
    char *argv[16];
    va_list ap;
    va_start(ap, n);
    for (int i = 0; i < n; i++)
        argv[i] = va_arg(ap, char *);
    va_end(ap);
    argv[n] = NULL;
    return agent_enroll_main(n, argv);
}

static void test_main(void **state)
{
    struct fx *f = *state;
    char names[512], key1[4096], now[4096];

    assert_int_equal(run_main(1, "enroll"), 2);                            /* no --id */
    assert_int_equal(run_main(3, "enroll", "--id", "gw/1"), 2);            /* bad id */
    assert_int_equal(run_main(4, "enroll", "--id", "gw-1", "--bogus"), 2); /* unknown */
    assert_int_equal(run_main(4, "enroll", "--id", "gw-1", "extra"), 2);   /* argument */
    assert_int_equal(run_main(4, "enroll", "--id", "gw-1", "--key"), 2);   /* no value */
    assert_int_equal(run_main(6, "enroll", "--id", "gw-1", "--key", f->key, "--csr", f->key), 2);
    assert_int_equal(run_main(2, "enroll", "--help"), 0);
    dir_list(f->dir, names, sizeof(names));
    assert_string_equal(names, "");

    /* --csr defaults to the key's name with .csr for .key. */
    assert_int_equal(run_main(5, "enroll", "--id", "gw-9", "--key", f->key), 0);
    dir_list(f->dir, names, sizeof(names));
    assert_string_equal(names, "device.csr device.key");
    read_file(f->key, key1, sizeof(key1));
    assert_int_equal(run_main(5, "enroll", "--id", "gw-9", "--key", f->key), 1);
    read_file(f->key, now, sizeof(now));
    assert_string_equal(now, key1);
    assert_int_equal(run_main(6, "enroll", "--id", "gw-9", "--key", f->key, "--force"), 0);
    read_file(f->key, now, sizeof(now));
    assert_string_not_equal(now, key1);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_enroll_makes_key_and_csr, fx_setup, fx_teardown),
        cmocka_unit_test_setup_teardown(test_fingerprint_is_stable_and_per_key, fx_setup,
                                        fx_teardown),
        cmocka_unit_test_setup_teardown(test_never_overwrites, fx_setup, fx_teardown),
        cmocka_unit_test_setup_teardown(test_force_replaces, fx_setup, fx_teardown),
        cmocka_unit_test_setup_teardown(test_bad_ids, fx_setup, fx_teardown),
        cmocka_unit_test_setup_teardown(test_bad_places, fx_setup, fx_teardown),
        cmocka_unit_test(test_csr_path),
        cmocka_unit_test_setup_teardown(test_main, fx_setup, fx_teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
