/* Enrolment of a gateway: `cistern-agent enroll` makes the device key (ECDSA P-256, mbedTLS)
 * and a certificate signing request for it, and names the key by its fingerprint
 *     sha256:<64 lowercase hex>  = SHA-256 over the DER SubjectPublicKeyInfo
 * (what `openssl pkey -in KEY -pubout -outform DER | sha256sum` prints). The fingerprint names
 * the key, not a certificate: it stays the same when the certificate is renewed for that key. */
#ifndef AGENT_ENROLL_H
#define AGENT_ENROLL_H

#include <stddef.h>

/* An id becomes the CN of the certificate, and X.509 bounds a CN at 64 characters
 * (RFC 5280, ub-common-name); the receiver's rule allows longer ids, a certificate does not. */
#define AGENT_ENROLL_ID_MAX 64
/* "sha256:" + 64 hex digits + NUL */
#define AGENT_ENROLL_FPR_LEN (7 + 64 + 1)
/* The shipped configs/agent.yaml names this forward.tls.key_file. */
#define AGENT_ENROLL_DEFAULT_KEY "/etc/cistern/device.key"

struct agent_enroll_req {
    const char *id;       /* the agent id: the CSR's subject is CN=<id> */
    const char *key_path; /* where the key goes (PEM, mode 0600) */
    const char *csr_path; /* where the CSR goes (PEM, mode 0644) */
    int force;            /* replace existing files at those paths */
};

/* Check ID against the agent id rule (the one the receiver's batch decoder applies,
 * common/codec.c: 1 or more of A-Z a-z 0-9 . _ : @ -), bounded here at AGENT_ENROLL_ID_MAX.
 * Returns 0, or CIS_EINVAL with the reason in ERR. */
int agent_enroll_check_id(const char *id, char *err, size_t errlen);

/* The default CSR path for KEY_PATH: KEY_PATH without a trailing ".key", plus ".csr"
 * ("/etc/cistern/device.key" -> "/etc/cistern/device.csr", "k" -> "k.csr"). Writes OUT
 * (OUTLEN bytes). Returns 0 or CIS_ETOOBIG. */
int agent_enroll_csr_path(const char *key_path, char *out, size_t outlen);

/* Make a new P-256 key and a SHA-256-signed CSR with subject CN=<id>, and write both.
 * Each file is written to a temporary file next to its path, synced, then moved into place,
 * so a path holds either nothing, the old file, or the complete new one. Without FORCE an
 * existing file (or symbolic link) at either path is never replaced, and nothing is written.
 * The key's directory must exist and not be writable by everyone.
 * On success FPR holds the key's fingerprint. Returns 0 or CIS_EINVAL (bad id, a file exists,
 * a bad directory), CIS_ENOTFOUND (no such directory), CIS_ENOSPC, CIS_EIO, CIS_ENOMEM, with a
 * one-line reason that names the file in ERR; on failure nothing new is left behind. */
int agent_enroll(const struct agent_enroll_req *req, char fpr[AGENT_ENROLL_FPR_LEN], char *err,
                 size_t errlen);

/* `cistern-agent enroll --id ID [--key FILE] [--csr FILE] [--force]`: ARGV[0] is "enroll".
 * Returns the process exit status: 0 done, 1 failed, 2 bad usage. */
int agent_enroll_main(int argc, char **argv);

#endif
