/* `cistern-agent enroll` (see enroll.h): the device key (ECDSA P-256) and its CSR, made with
 * mbedTLS on the gateway, so the private key never leaves it. */
#include "enroll.h"

#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <libgen.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <mbedtls/ctr_drbg.h>
#include <mbedtls/ecp.h>
#include <mbedtls/entropy.h>
#include <mbedtls/error.h>
#include <mbedtls/pk.h>
#include <mbedtls/platform_util.h>
#include <mbedtls/x509_csr.h>

#include "cistern/codec.h"
#include "cistern/err.h"
#include "cistern/fsync.h"
#include "cistern/sign.h"

/* Room for a P-256 key in PEM (about 230 bytes) and its CSR (about 450). */
#define ENROLL_KEY_PEM_MAX 1024
#define ENROLL_CSR_PEM_MAX 4096
/* A P-256 SubjectPublicKeyInfo is 91 bytes. */
#define ENROLL_SPKI_MAX 256

static const char enroll_drbg_label[] = "cistern-agent enroll";

int agent_enroll_check_id(const char *id, char *err, size_t errlen)
{
    size_t n = id ? strlen(id) : 0;
    if (n == 0) {
        cis_set_err(err, errlen, "the agent id is empty");
        return CIS_EINVAL;
    }
    if (n > AGENT_ENROLL_ID_MAX) {
        cis_set_err(err, errlen,
                    "the agent id is %zu characters; it becomes the certificate's CN, which "
                    "holds at most %d",
                    n, AGENT_ENROLL_ID_MAX);
        return CIS_EINVAL;
    }
    /* The receiver's rule for agent_id (common/codec.c). It also keeps the id out of the
     * syntax of the subject string ("CN=a,O=b") and of MQTT topics ('/', '+', '#'). */
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)id[i];
        if (!cis_agent_id_char_ok(c)) {
            if (c > 0x20 && c < 0x7f)
                cis_set_err(err, errlen,
                            "the agent id \"%s\" has '%c'; use only A-Z a-z 0-9 . _ : @ -", id, c);
            else
                cis_set_err(err, errlen,
                            "the agent id has byte 0x%02x at %zu; use only A-Z a-z 0-9 . _ : @ -",
                            c, i);
            return CIS_EINVAL;
        }
    }
    return CIS_OK;
}

int agent_enroll_csr_path(const char *key_path, char *out, size_t outlen)
{
    size_t n = strlen(key_path);
    /* Only a ".key" after the last '/': "keys.key/dev" keeps its whole name. */
    if (n > 4 && strcmp(key_path + n - 4, ".key") == 0 && key_path[n - 5] != '/')
        n -= 4;
    int w = snprintf(out, outlen, "%.*s.csr", (int)n, key_path);
    if (w < 0 || (size_t)w >= outlen)
        return CIS_ETOOBIG;
    return CIS_OK;
}

static int enroll__errno_code(int e)
{
    return e == ENOENT ? CIS_ENOTFOUND : e == ENOSPC || e == EDQUOT ? CIS_ENOSPC : CIS_EIO;
}

static void enroll__mbedtls_err(char *err, size_t errlen, const char *what, int rc)
{
    char buf[128];
    mbedtls_strerror(rc, buf, sizeof(buf));
    cis_set_err(err, errlen, "%s: %s (mbedTLS -0x%04x)", what, buf, (unsigned)-rc);
}

/* Refuse to start when PATH is taken (without FORCE) or cannot be replaced (a directory),
 * before any work is done. WHAT names the file in messages ("key", "CSR"). */
static int enroll__check_target(const char *path, const char *what, int force, char *err,
                                size_t errlen)
{
    struct stat sb;
    if (lstat(path, &sb) != 0) {
        if (errno == ENOENT)
            return CIS_OK; /* the directory is checked by whoever cares about it */
        cis_set_err(err, errlen, "%s: cannot check the %s path: %s", path, what, strerror(errno));
        return enroll__errno_code(errno);
    }
    if (S_ISDIR(sb.st_mode)) {
        cis_set_err(err, errlen, "%s: is a directory; give the %s file's path", path, what);
        return CIS_EINVAL;
    }
    if (!force) {
        if (strcmp(what, "key") == 0)
            cis_set_err(err, errlen,
                        "%s exists; not overwriting a device key (a certificate issued for it "
                        "would stop working); --force replaces it",
                        path);
        else
            cis_set_err(err, errlen, "%s exists; not overwriting it; --force replaces it", path);
        return CIS_EINVAL;
    }
    return CIS_OK;
}

/* The key's directory must exist, and nobody but its owners may add, remove or rename files
 * in it: in a directory writable by everyone, anyone could swap the key for their own. */
static int enroll__check_key_dir(const char *key_path, char *err, size_t errlen)
{
    struct stat sb;
    char *copy = strdup(key_path);
    if (!copy) {
        cis_set_err(err, errlen, "%s: out of memory", key_path);
        return CIS_ENOMEM;
    }
    const char *dir = dirname(copy);
    int ret = CIS_OK;
    if (stat(dir, &sb) != 0) {
        int e = errno;
        cis_set_err(err, errlen, "%s: directory %s: %s%s", key_path, dir, strerror(e),
                    e == ENOENT ? " (create it first, e.g. install -d -m 0755)" : "");
        ret = enroll__errno_code(e);
    } else if (!S_ISDIR(sb.st_mode)) {
        cis_set_err(err, errlen, "%s: %s is not a directory", key_path, dir);
        ret = CIS_EINVAL;
    } else if (sb.st_mode & S_IWOTH) {
        cis_set_err(err, errlen,
                    "%s: directory %s is writable by everyone (mode %04o); keep the device key "
                    "in a directory only root can change, such as /etc/cistern",
                    key_path, dir, (unsigned)(sb.st_mode & 07777));
        ret = CIS_EINVAL;
    }
    free(copy);
    return ret;
}

/* Write LEN bytes of DATA to a new temporary file next to PATH with exactly MODE, synced.
 * On success the temporary file's name is in TMP (TMPLEN bytes); the caller moves or removes
 * it. On failure nothing is left behind. */
static int enroll__write_tmp(const char *path, const char *what, const void *data, size_t len,
                             mode_t mode, char *tmp, size_t tmplen, char *err, size_t errlen)
{
    int w = snprintf(tmp, tmplen, "%s.new-XXXXXX", path);
    if (w < 0 || (size_t)w >= tmplen) {
        cis_set_err(err, errlen, "%s: path too long", path);
        return CIS_ETOOBIG;
    }
    /* mkostemp creates with O_EXCL and mode 0600: the key is never readable by others, not
     * even for a moment before the chmod. */
    int fd = mkostemp(tmp, O_CLOEXEC);
    if (fd < 0) {
        int e = errno;
        cis_set_err(err, errlen, "%s: cannot create the %s file: %s", path, what, strerror(e));
        return enroll__errno_code(e);
    }
    int ret = CIS_OK;
    const char *step = "write";
    int e = 0;
    /* Set exactly, whatever the umask: 0600 for the key, 0644 for the (public) CSR. */
    if (fchmod(fd, mode) != 0) {
        step = "chmod";
        e = errno;
        goto fail;
    }
    for (size_t put = 0; put < len;) {
        ssize_t n = write(fd, (const char *)data + put, len - put);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0) {
            e = n < 0 ? errno : EIO;
            goto fail;
        }
        put += (size_t)n;
    }
    /* The content must be on disk before the rename makes it the file at PATH: otherwise a
     * power cut could leave PATH naming an empty key. */
    if (fsync(fd) != 0) {
        step = "fsync";
        e = errno;
        goto fail;
    }
    if (close(fd) != 0) {
        fd = -1;
        step = "close";
        e = errno;
        goto fail;
    }
    return CIS_OK;

fail:
    cis_set_err(err, errlen, "%s: %s of the %s file failed: %s", path, step, what, strerror(e));
    ret = enroll__errno_code(e);
    if (fd >= 0)
        close(fd);
    unlink(tmp);
    return ret;
}

/* Move TMP to PATH. Without FORCE an existing PATH is never replaced, even if it appeared
 * after enroll__check_target() looked: RENAME_NOREPLACE, or where the filesystem lacks it,
 * link() (which fails on an existing name too) and unlink. */
static int enroll__install(const char *tmp, const char *path, const char *what, int force,
                           char *err, size_t errlen)
{
    int rc;
    if (force) {
        rc = rename(tmp, path);
    } else {
        rc = renameat2(AT_FDCWD, tmp, AT_FDCWD, path, RENAME_NOREPLACE);
        if (rc != 0 && (errno == EINVAL || errno == ENOSYS)) {
            rc = link(tmp, path);
            if (rc == 0)
                unlink(tmp);
        }
    }
    if (rc != 0) {
        int e = errno;
        if (e == EEXIST)
            cis_set_err(err, errlen, "%s appeared while the %s was made; not overwriting it", path,
                        what);
        else
            cis_set_err(err, errlen, "%s: cannot move the new %s into place: %s", path, what,
                        strerror(e));
        unlink(tmp);
        return e == EEXIST ? CIS_EINVAL : enroll__errno_code(e);
    }
    return CIS_OK;
}

_Static_assert(AGENT_ENROLL_FPR_LEN == CIS_FPR_STR_LEN, "a fingerprint string is sign.h's");

/* The fingerprint of PK as "sha256:<hex>" in FPR: cis_fpr_of_spki() over its DER
 * SubjectPublicKeyInfo, the one definition the receiver's registry uses too. */
static int enroll__fingerprint(mbedtls_pk_context *pk, char fpr[AGENT_ENROLL_FPR_LEN])
{
    unsigned char der[ENROLL_SPKI_MAX];
    uint8_t digest[CIS_FPR_LEN];

    /* pk_write_* fill the buffer from its end; the return value is the length. */
    int n = mbedtls_pk_write_pubkey_der(pk, der, sizeof(der));
    if (n <= 0)
        return n < 0 ? n : MBEDTLS_ERR_PK_BAD_INPUT_DATA;
    cis_fpr_of_spki(der + sizeof(der) - (size_t)n, (size_t)n, digest);
    cis_fpr_format(digest, fpr);
    return 0;
}

int agent_enroll(const struct agent_enroll_req *req, char fpr[AGENT_ENROLL_FPR_LEN], char *err,
                 size_t errlen)
{
    mbedtls_entropy_context entropy;
    mbedtls_ctr_drbg_context drbg;
    mbedtls_pk_context pk;
    mbedtls_x509write_csr csr;
    unsigned char key_pem[ENROLL_KEY_PEM_MAX];
    unsigned char csr_pem[ENROLL_CSR_PEM_MAX];
    char subject[16 + AGENT_ENROLL_ID_MAX];
    char key_tmp[PATH_MAX + 16] = "", csr_tmp[PATH_MAX + 16] = "";
    int key_placed = 0, csr_placed = 0;
    int ret, rc;

    fpr[0] = '\0';
    if (!req->key_path || !req->key_path[0] || !req->csr_path || !req->csr_path[0]) {
        cis_set_err(err, errlen, "no key or CSR path given");
        return CIS_EINVAL;
    }
    ret = agent_enroll_check_id(req->id, err, errlen);
    if (ret)
        return ret;
    if (strcmp(req->key_path, req->csr_path) == 0) {
        cis_set_err(err, errlen, "%s: the key and the CSR cannot be the same file", req->key_path);
        return CIS_EINVAL;
    }
    /* These refusals come before any work; a later failure removes what it made. */
    if ((ret = enroll__check_key_dir(req->key_path, err, errlen)) != 0 ||
        (ret = enroll__check_target(req->key_path, "key", req->force, err, errlen)) != 0 ||
        (ret = enroll__check_target(req->csr_path, "CSR", req->force, err, errlen)) != 0)
        return ret;

    mbedtls_entropy_init(&entropy);
    mbedtls_ctr_drbg_init(&drbg);
    mbedtls_pk_init(&pk);
    mbedtls_x509write_csr_init(&csr);
    ret = CIS_EIO;

    /* mbedTLS's default entropy source is getrandom()/urandom, as for every other key here. */
    rc = mbedtls_ctr_drbg_seed(&drbg, mbedtls_entropy_func, &entropy,
                               (const unsigned char *)enroll_drbg_label,
                               sizeof(enroll_drbg_label) - 1);
    if (rc) {
        enroll__mbedtls_err(err, errlen, "cannot seed the random generator", rc);
        goto out;
    }
    rc = mbedtls_pk_setup(&pk, mbedtls_pk_info_from_type(MBEDTLS_PK_ECKEY));
    if (rc == 0)
        rc = mbedtls_ecp_gen_key(MBEDTLS_ECP_DP_SECP256R1, mbedtls_pk_ec(pk),
                                 mbedtls_ctr_drbg_random, &drbg);
    if (rc) {
        enroll__mbedtls_err(err, errlen, "cannot generate a P-256 key", rc);
        goto out;
    }
    /* SEC1 "EC PRIVATE KEY" PEM, with the curve named: what OpenSSL, under both libcurl and
     * Paho, reads as forward.tls.key_file. */
    rc = mbedtls_pk_write_key_pem(&pk, key_pem, sizeof(key_pem));
    if (rc) {
        enroll__mbedtls_err(err, errlen, "cannot encode the key", rc);
        goto out;
    }
    snprintf(subject, sizeof(subject), "CN=%s", req->id);
    mbedtls_x509write_csr_set_md_alg(&csr, MBEDTLS_MD_SHA256);
    mbedtls_x509write_csr_set_key(&csr, &pk);
    rc = mbedtls_x509write_csr_set_subject_name(&csr, subject);
    if (rc == 0)
        rc = mbedtls_x509write_csr_pem(&csr, csr_pem, sizeof(csr_pem), mbedtls_ctr_drbg_random,
                                       &drbg);
    if (rc) {
        enroll__mbedtls_err(err, errlen, "cannot make the certificate signing request", rc);
        goto out;
    }
    rc = enroll__fingerprint(&pk, fpr);
    if (rc) {
        enroll__mbedtls_err(err, errlen, "cannot compute the key's fingerprint", rc);
        goto out;
    }

    ret = enroll__write_tmp(req->key_path, "key", key_pem, strlen((char *)key_pem), 0600, key_tmp,
                            sizeof(key_tmp), err, errlen);
    if (ret) {
        key_tmp[0] = '\0';
        goto out;
    }
    ret = enroll__write_tmp(req->csr_path, "CSR", csr_pem, strlen((char *)csr_pem), 0644, csr_tmp,
                            sizeof(csr_tmp), err, errlen);
    if (ret) {
        csr_tmp[0] = '\0';
        goto out;
    }
    /* Both files are complete on disk; only the two renames remain. The key goes first: a CSR
     * is worth nothing without its key. */
    ret = enroll__install(key_tmp, req->key_path, "key", req->force, err, errlen);
    key_tmp[0] = '\0';
    if (ret)
        goto out;
    key_placed = 1;
    ret = enroll__install(csr_tmp, req->csr_path, "CSR", req->force, err, errlen);
    csr_tmp[0] = '\0';
    if (ret)
        goto out;
    csr_placed = 1;
    /* The directory entries too: a key that vanishes in a power cut after its CSR went to the
     * CA would leave a certificate nobody can use. */
    {
        const char *synced = req->key_path;
        if (cis_fsync_parent(synced) != 0 || cis_fsync_parent(synced = req->csr_path) != 0) {
            int e = errno;
            cis_set_err(err, errlen, "%s: fsync of its directory: %s", synced, strerror(e));
            ret = enroll__errno_code(e);
            goto out;
        }
    }
    ret = CIS_OK;

out:
    if (ret) {
        fpr[0] = '\0';
        if (key_tmp[0])
            unlink(key_tmp);
        if (csr_tmp[0])
            unlink(csr_tmp);
        /* Without --force the paths were free: remove what we put there, so a retry works.
         * With --force the old files are gone already; say so rather than pretend. */
        if (!req->force) {
            if (key_placed)
                unlink(req->key_path);
            if (csr_placed)
                unlink(req->csr_path);
        } else if (key_placed && !csr_placed) {
            size_t l = strlen(err ? err : "");
            if (err && l + 1 < errlen)
                snprintf(err + l, errlen - l, " (%s was replaced: run again with --force)",
                         req->key_path);
        }
    }
    mbedtls_platform_zeroize(key_pem, sizeof(key_pem));
    mbedtls_x509write_csr_free(&csr);
    mbedtls_pk_free(&pk); /* wipes the private key */
    mbedtls_ctr_drbg_free(&drbg);
    mbedtls_entropy_free(&entropy);
    return ret;
}

/* ---- the command ---- */

static void enroll_usage(FILE *f)
{
    fprintf(f,
            "Usage: cistern-agent enroll --id ID [--key FILE] [--csr FILE] [--force]\n"
            "\n"
            "Makes this gateway's device key (ECDSA P-256, mode 0600) and a certificate signing\n"
            "request (CSR) for it with subject CN=ID, and prints the key's fingerprint\n"
            "(sha256: over the public key) and what to do next. The private key never leaves\n"
            "the gateway: only the CSR goes to the CA.\n"
            "\n"
            "      --id ID        the agent id (agent.id), 1 to %d of A-Z a-z 0-9 . _ : @ -\n"
            "      --key FILE     the key file (default " AGENT_ENROLL_DEFAULT_KEY ", the shipped\n"
            "                     forward.tls.key_file); its directory must exist\n"
            "      --csr FILE     the CSR (default: FILE of --key with .csr for .key)\n"
            "      --force        replace existing files (the old key's certificate stops\n"
            "                     working); without it an existing file is never touched\n"
            "  -h, --help         this help\n"
            "\n"
            "Exit status: 0 done, 1 the files could not be made (nothing is left behind),\n"
            "2 bad usage.\n",
            AGENT_ENROLL_ID_MAX);
}

/* The certificate's suggested path: the CSR's with .pem for .csr. */
static void enroll__cert_path(const char *csr_path, char *out, size_t outlen)
{
    size_t n = strlen(csr_path);
    if (n > 4 && strcmp(csr_path + n - 4, ".csr") == 0)
        n -= 4;
    snprintf(out, outlen, "%.*s.pem", (int)n, csr_path);
}

int agent_enroll_main(int argc, char **argv)
{
    static const struct option opts[] = {
        {"id", required_argument, NULL, 'i'},
        {"key", required_argument, NULL, 'k'},
        {"csr", required_argument, NULL, 'r'},
        {"force", no_argument, NULL, 'f'},
        {"help", no_argument, NULL, 'h'},
        {0},
    };
    struct agent_enroll_req req = {.key_path = AGENT_ENROLL_DEFAULT_KEY};
    char csr_default[PATH_MAX], cert[PATH_MAX + 8], fpr[AGENT_ENROLL_FPR_LEN], err[1024];
    int c;

    optind = 0; /* GNU getopt: start afresh, whatever parsed argv before */
    opterr = 0; /* our own words, with the command's name */
    while ((c = getopt_long(argc, argv, ":h", opts, NULL)) != -1) {
        switch (c) {
        case 'i': req.id = optarg; break;
        case 'k': req.key_path = optarg; break;
        case 'r': req.csr_path = optarg; break;
        case 'f': req.force = 1; break;
        case 'h': enroll_usage(stdout); return 0;
        case ':':
        default:
            if (optopt)
                fprintf(stderr, "cistern-agent enroll: %s -%c\n",
                        c == ':' ? "a value is missing after" : "unknown option", optopt);
            else
                fprintf(stderr, "cistern-agent enroll: %s %s\n",
                        c == ':' ? "a value is missing after" : "unknown option", argv[optind - 1]);
            enroll_usage(stderr);
            return 2;
        }
    }
    if (optind < argc) {
        fprintf(stderr, "cistern-agent enroll: unexpected argument \"%s\"\n", argv[optind]);
        enroll_usage(stderr);
        return 2;
    }
    if (!req.id) {
        fprintf(stderr, "cistern-agent enroll: --id ID is required (this gateway's agent.id)\n");
        enroll_usage(stderr);
        return 2;
    }
    if (agent_enroll_check_id(req.id, err, sizeof(err)) != 0) {
        fprintf(stderr, "cistern-agent enroll: --id: %s\n", err);
        return 2;
    }
    if (!req.key_path[0] || (req.csr_path && !req.csr_path[0])) {
        fprintf(stderr, "cistern-agent enroll: --%s needs a file name\n",
                req.key_path[0] ? "csr" : "key");
        return 2;
    }
    if (!req.csr_path) {
        if (agent_enroll_csr_path(req.key_path, csr_default, sizeof(csr_default)) != 0) {
            fprintf(stderr, "cistern-agent enroll: %s: path too long\n", req.key_path);
            return 2;
        }
        req.csr_path = csr_default;
    }
    if (strcmp(req.key_path, req.csr_path) == 0) {
        fprintf(stderr, "cistern-agent enroll: --key and --csr name the same file %s\n",
                req.key_path);
        return 2;
    }
    if (agent_enroll(&req, fpr, err, sizeof(err)) != 0) {
        fprintf(stderr, "cistern-agent enroll: %s\n", err);
        return 1;
    }
    enroll__cert_path(req.csr_path, cert, sizeof(cert));
    printf("key:         %s (ECDSA P-256, mode 0600)\n"
           "request:     %s (CN=%s)\n"
           "fingerprint: %s\n"
           "\n"
           "Next: have your CA sign the request as a client certificate, for example\n"
           "  openssl x509 -req -in %s -CA ca.pem -CAkey ca.key -CAcreateserial \\\n"
           "    -days 825 -sha256 -extfile <(printf 'extendedKeyUsage=clientAuth') -out %s\n"
           "then put the certificate at forward.tls.cert_file, set agent.id: %s and\n"
           "forward.tls.key_file: %s, let the agent's user read the key\n"
           "(chown cistern:cistern %s), and register the device on the receiver with the\n"
           "fingerprint above (docs/security.md, \"Enrolling a gateway\").\n",
           req.key_path, req.csr_path, req.id, fpr, req.csr_path, cert, req.id, req.key_path,
           req.key_path);
    return 0;
}
