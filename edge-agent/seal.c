/* Encryption at rest for spool segments (see seal.h): key file load/keygen, AES-256-GCM
 * seal/open with the segment's place (epoch, first_seq, last_seq) as associated data. */
#include "seal.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <mbedtls/gcm.h>
#include <mbedtls/platform_util.h>
#include <mbedtls/sha256.h>

#include "cistern/err.h"
#include "cistern/fsync.h"

#define SEAL_AAD_LEN 24
static const char seal_key_id_label[] = "cistern spool key id v1";

/* Only the raw key is kept. A GCM context is set up per call instead of once here: an
 * mbedtls_gcm_context carries per-message state, so one shared context could not back the const
 * (and so shareable, e.g. across a spool reopened by agent_spool_recover()) seal/open calls.
 * Expanding an AES-256 key costs about a microsecond, nothing next to a segment's zstd. */
struct agent_seal {
    uint8_t key[AGENT_SEAL_KEY_LEN];
};

static void seal__put_be64(uint8_t *p, uint64_t v)
{
    for (int i = 7; i >= 0; i--) {
        p[i] = (uint8_t)v;
        v >>= 8;
    }
}

static void seal__aad(uint8_t aad[SEAL_AAD_LEN], uint64_t epoch, uint64_t first, uint64_t last)
{
    seal__put_be64(aad, epoch);
    seal__put_be64(aad + 8, first);
    seal__put_be64(aad + 16, last);
}

int agent_seal_load(const char *path, struct agent_seal **out, char *err, size_t errlen)
{
    struct agent_seal *k = NULL;
    struct stat sb;
    int ret = CIS_OK;
    int fd = -1;

    if (out)
        *out = NULL;
    if (!path || !path[0] || !out) {
        cis_set_err(err, errlen, "no key file given");
        return CIS_EINVAL;
    }
    /* NOFOLLOW: the checks below must be about the key file itself, not a link that may later
     * point elsewhere. NONBLOCK: a FIFO put at PATH must not hang the agent's start (it has no
     * effect on a regular file and is refused by the S_ISREG check anyway). */
    fd = open(path, O_RDONLY | O_CLOEXEC | O_NOFOLLOW | O_NONBLOCK);
    if (fd < 0) {
        if (errno == ELOOP) {
            cis_set_err(err, errlen,
                        "%s: is a symbolic link; point spool.encryption_key_file at the key "
                        "file itself",
                        path);
            return CIS_EINVAL;
        }
        cis_set_err(err, errlen, "%s: cannot open the spool key: %s", path, strerror(errno));
        return CIS_EIO;
    }
    if (fstat(fd, &sb) != 0) {
        cis_set_err(err, errlen, "%s: cannot stat the spool key: %s", path, strerror(errno));
        ret = CIS_EIO;
        goto out;
    }
    if (!S_ISREG(sb.st_mode)) {
        cis_set_err(err, errlen, "%s: not a regular file; a spool key is a 32-byte file", path);
        ret = CIS_EINVAL;
        goto out;
    }
    /* Checked before the size: a readable key is a leak whatever its length, and the message
     * should lead with that. */
    if ((sb.st_mode & 077) != 0) {
        cis_set_err(err, errlen, "%s: mode %04o lets %s read the spool key; run chmod 600 %s", path,
                    (unsigned)(sb.st_mode & 07777), (sb.st_mode & 07) ? "others" : "its group",
                    path);
        ret = CIS_EINVAL;
        goto out;
    }
    if (sb.st_size != AGENT_SEAL_KEY_LEN) {
        cis_set_err(err, errlen,
                    "%s: is %lld bytes; a spool key is exactly %d (make one with "
                    "cistern-agent keygen FILE)",
                    path, (long long)sb.st_size, AGENT_SEAL_KEY_LEN);
        ret = CIS_EINVAL;
        goto out;
    }
    k = calloc(1, sizeof(*k));
    if (!k) {
        cis_set_err(err, errlen, "%s: out of memory", path);
        ret = CIS_ENOMEM;
        goto out;
    }
    /* Read straight into the key struct: no other copy of the key to wipe. */
    size_t got = 0;
    while (got < AGENT_SEAL_KEY_LEN) {
        ssize_t r = read(fd, k->key + got, AGENT_SEAL_KEY_LEN - got);
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0) {
            cis_set_err(err, errlen, "%s: cannot read the spool key: %s", path,
                        r < 0 ? strerror(errno) : "file shrank while reading");
            ret = CIS_EIO;
            goto out;
        }
        got += (size_t)r;
    }
    *out = k;
    k = NULL;

out:
    agent_seal_free(k);
    close(fd);
    return ret;
}

void agent_seal_free(struct agent_seal *k)
{
    if (!k)
        return;
    mbedtls_platform_zeroize(k, sizeof(*k));
    free(k);
}

int agent_seal_keygen(const char *path, char *err, size_t errlen)
{
    uint8_t key[AGENT_SEAL_KEY_LEN];
    int ret = CIS_OK;

    if (!path || !path[0]) {
        cis_set_err(err, errlen, "no key file given");
        return CIS_EINVAL;
    }
    /* EXCL: a key is never overwritten, since every segment sealed with it would become
     * unreadable. NOFOLLOW: a dangling symlink at PATH must not make us create its target. */
    int fd = open(path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC | O_NOFOLLOW, 0600);
    if (fd < 0) {
        if (errno == EEXIST || errno == ELOOP) {
            cis_set_err(err, errlen,
                        "%s exists; not overwriting a key (the spool sealed with it would "
                        "become unreadable)",
                        path);
            return CIS_EINVAL;
        }
        int e = errno;
        cis_set_err(err, errlen, "%s: cannot create the key file: %s", path, strerror(e));
        return e == ENOENT ? CIS_ENOTFOUND : e == ENOSPC ? CIS_ENOSPC : CIS_EIO;
    }
    /* The umask may have taken bits away from 0600 (never added any); set it exactly. */
    if (fchmod(fd, 0600) != 0) {
        cis_set_err(err, errlen, "%s: chmod 600: %s", path, strerror(errno));
        ret = CIS_EIO;
        goto fail;
    }
    if (cis_random_bytes(key, sizeof(key)) != CIS_OK) {
        cis_set_err(err, errlen, "%s: getrandom: %s", path, strerror(errno));
        ret = CIS_EIO;
        goto fail;
    }
    size_t put = 0;
    while (put < sizeof(key)) {
        ssize_t w = write(fd, key + put, sizeof(key) - put);
        if (w < 0 && errno == EINTR)
            continue;
        if (w <= 0) {
            int e = w < 0 ? errno : EIO;
            cis_set_err(err, errlen, "%s: write: %s", path, strerror(e));
            ret = e == ENOSPC ? CIS_ENOSPC : CIS_EIO;
            goto fail;
        }
        put += (size_t)w;
    }
    mbedtls_platform_zeroize(key, sizeof(key));
    /* The key must be on disk before anything is sealed with it: after a power cut, a spool
     * holding blobs sealed with a key that never reached the disk is unreadable. Same for the
     * directory entry. */
    if (fsync(fd) != 0) {
        cis_set_err(err, errlen, "%s: fsync: %s", path, strerror(errno));
        ret = CIS_EIO;
        goto fail;
    }
    if (close(fd) != 0) {
        fd = -1;
        cis_set_err(err, errlen, "%s: close: %s", path, strerror(errno));
        ret = CIS_EIO;
        goto fail;
    }
    fd = -1;
    if (cis_fsync_parent(path) != 0) {
        cis_set_err(err, errlen, "%s: fsync of its directory: %s", path, strerror(errno));
        ret = CIS_EIO;
        goto fail;
    }
    return CIS_OK;

fail:
    mbedtls_platform_zeroize(key, sizeof(key));
    if (fd >= 0)
        close(fd);
    /* We created it (O_EXCL), so removing it is safe, and lets the user simply retry. */
    unlink(path);
    return ret;
}

uint64_t agent_seal_key_id(const struct agent_seal *k)
{
    mbedtls_sha256_context ctx;
    uint8_t digest[32];
    uint64_t id = 0;

    mbedtls_sha256_init(&ctx);
    /* SHA-256 cannot fail in software; a failure (hardware accelerator) would only give a key id
     * that does not match, which start-up reports as a different key. */
    if (mbedtls_sha256_starts_ret(&ctx, 0) == 0 &&
        mbedtls_sha256_update_ret(&ctx, (const unsigned char *)seal_key_id_label,
                                  sizeof(seal_key_id_label) - 1) == 0 &&
        mbedtls_sha256_update_ret(&ctx, k->key, sizeof(k->key)) == 0 &&
        mbedtls_sha256_finish_ret(&ctx, digest) == 0) {
        for (int i = 0; i < 8; i++)
            id = (id << 8) | digest[i];
    }
    mbedtls_sha256_free(&ctx);
    return id;
}

int agent_seal_seal(const struct agent_seal *k, uint64_t epoch, uint64_t first, uint64_t last,
                    const uint8_t *in, size_t len, uint8_t **out, size_t *outlen)
{
    mbedtls_gcm_context gcm;
    uint8_t aad[SEAL_AAD_LEN];
    int ret = CIS_OK;

    *out = NULL;
    *outlen = 0;
    if (len > SIZE_MAX - AGENT_SEAL_OVERHEAD)
        return CIS_ENOMEM;
    uint8_t *blob = malloc(len + AGENT_SEAL_OVERHEAD);
    if (!blob)
        return CIS_ENOMEM;
    /* A random 96-bit nonce per blob: blobs are sealed once each, far fewer than the 2^32 per
     * key after which random nonces risk a repeat. */
    if (cis_random_bytes(blob, AGENT_SEAL_NONCE_LEN) != CIS_OK) {
        free(blob);
        return CIS_EIO;
    }
    seal__aad(aad, epoch, first, last);
    mbedtls_gcm_init(&gcm);
    if (mbedtls_gcm_setkey(&gcm, MBEDTLS_CIPHER_ID_AES, k->key, AGENT_SEAL_KEY_LEN * 8) != 0 ||
        mbedtls_gcm_crypt_and_tag(&gcm, MBEDTLS_GCM_ENCRYPT, len, blob, AGENT_SEAL_NONCE_LEN, aad,
                                  sizeof(aad), in, blob + AGENT_SEAL_NONCE_LEN, AGENT_SEAL_TAG_LEN,
                                  blob + AGENT_SEAL_NONCE_LEN + len) != 0) {
        /* Only bad parameters or a hardware accelerator fault get here. */
        free(blob);
        ret = CIS_EIO;
        goto out;
    }
    *out = blob;
    *outlen = len + AGENT_SEAL_OVERHEAD;

out:
    mbedtls_gcm_free(&gcm); /* wipes the expanded key */
    return ret;
}

int agent_seal_open(const struct agent_seal *k, uint64_t epoch, uint64_t first, uint64_t last,
                    const uint8_t *in, size_t len, uint8_t **out, size_t *outlen)
{
    mbedtls_gcm_context gcm;
    uint8_t aad[SEAL_AAD_LEN];
    int ret = CIS_OK;

    *out = NULL;
    *outlen = 0;
    if (!in || len < AGENT_SEAL_OVERHEAD)
        return CIS_ETAMPERED;
    size_t plen = len - AGENT_SEAL_OVERHEAD;
    /* +1: malloc(0) may return NULL, and an empty plaintext is valid. */
    uint8_t *plain = malloc(plen + 1);
    if (!plain)
        return CIS_ENOMEM;
    seal__aad(aad, epoch, first, last);
    mbedtls_gcm_init(&gcm);
    int rc = mbedtls_gcm_setkey(&gcm, MBEDTLS_CIPHER_ID_AES, k->key, AGENT_SEAL_KEY_LEN * 8);
    if (rc == 0)
        /* Compares the tag in constant time, and wipes the output when it does not match. */
        rc = mbedtls_gcm_auth_decrypt(&gcm, plen, in, AGENT_SEAL_NONCE_LEN, aad, sizeof(aad),
                                      in + AGENT_SEAL_NONCE_LEN + plen, AGENT_SEAL_TAG_LEN,
                                      in + AGENT_SEAL_NONCE_LEN, plain);
    if (rc != 0) {
        mbedtls_platform_zeroize(plain, plen + 1);
        free(plain);
        ret = rc == MBEDTLS_ERR_GCM_AUTH_FAILED ? CIS_ETAMPERED : CIS_EIO;
        goto out;
    }
    *out = plain;
    *outlen = plen;

out:
    mbedtls_gcm_free(&gcm);
    return ret;
}
