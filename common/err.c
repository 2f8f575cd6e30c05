/* cis_strerror: words for the CIS_E* status codes. */
#include "cistern/err.h"

#include <errno.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <sys/random.h>

const char *cis_strerror(int code)
{
    switch (code) {
    case CIS_OK: return "ok";
    case CIS_ENOMEM: return "out of memory";
    case CIS_EINVAL: return "invalid argument";
    case CIS_EIO: return "I/O error";
    case CIS_ECONFIG: return "configuration error";
    case CIS_EDECODE: return "malformed data";
    case CIS_ETOOBIG: return "size limit exceeded";
    case CIS_EFULL: return "full";
    case CIS_ECORRUPT: return "corrupt data";
    case CIS_ENOTFOUND: return "not found";
    case CIS_EAGAIN: return "try again later";
    case CIS_EDB: return "database error";
    case CIS_ENOSPC: return "no space left on the device";
    case CIS_ETAMPERED: return "sealed data failed authentication (tampered)";
    case CIS_EKEY: return "signed with a key that is not the registered one";
    case CIS_EBADSIG: return "the signature does not verify";
    case CIS_EEXIST: return "already exists";
    }
    return "unknown error";
}

void cis_set_err(char *err, size_t errlen, const char *fmt, ...)
{
    va_list ap;
    if (!err || errlen == 0)
        return;
    va_start(ap, fmt);
    vsnprintf(err, errlen, fmt, ap);
    va_end(ap);
}

int cis_random_bytes(void *buf, size_t len)
{
    uint8_t *p = buf;
    size_t got = 0;
    while (got < len) {
        ssize_t r = getrandom(p + got, len - got, 0);
        if (r < 0) {
            if (errno == EINTR)
                continue;
            return CIS_EIO;
        }
        got += (size_t)r;
    }
    return CIS_OK;
}
