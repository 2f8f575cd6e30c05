/* cis_strerror: words for the CIS_E* status codes. */
#include "cistern/err.h"

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
    }
    return "unknown error";
}
