/* Status codes shared by every Cistern module: 0 is success, failures are negative. */
#ifndef CISTERN_ERR_H
#define CISTERN_ERR_H

#include <stddef.h>

enum {
    CIS_OK = 0,
    CIS_ENOMEM = -1,   /* allocation failed */
    CIS_EINVAL = -2,   /* bad argument or malformed input */
    CIS_EIO = -3,      /* I/O or system call failed */
    CIS_ECONFIG = -4,  /* configuration error (message carries file:line:col) */
    CIS_EDECODE = -5,  /* bytes do not decode as a valid batch or segment */
    CIS_ETOOBIG = -6,  /* a size limit was exceeded */
    CIS_EFULL = -7,    /* full: the spool at its max_size, or (receiver) its store full */
    CIS_ECORRUPT = -8, /* stored data failed an integrity check */
    CIS_ENOTFOUND = -9,
    CIS_EAGAIN = -10,  /* try again later */
    CIS_EDB = -11,     /* database error other than full/corrupt */
    CIS_ENOSPC = -12,  /* the device has no space left (ENOSPC, SQLITE_FULL) */
    CIS_ETAMPERED = -13, /* sealed data failed authentication */
    CIS_EKEY = -14,    /* a signature made with a key or secret that is not the registered one */
    CIS_EBADSIG = -15, /* a signature does not verify: the signed bytes were changed */
    CIS_EEXIST = -16,  /* already exists */
};

/* A static, human-readable description of a CIS_E* code. Never NULL. */
const char *cis_strerror(int code);

/* Fill BUF with LEN bytes from the kernel CSPRNG (getrandom; retried on EINTR and short reads).
 * Blocks only before the pool is first seeded (early boot): a key, nonce or epoch from an
 * unseeded pool is worthless. Returns CIS_OK or CIS_EIO (errno set). */
int cis_random_bytes(void *buf, size_t len);

/* Format a one-line reason into ERR (ERRLEN bytes, truncated if need be). ERR may be NULL or
 * ERRLEN 0: then nothing is written. */
void cis_set_err(char *err, size_t errlen, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

#endif
