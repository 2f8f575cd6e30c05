/* Signed batches: the agent wraps every serialized Batch in a SignedBatch envelope
 * (common/proto/cistern.proto), signed with its device key (ECDSA P-256 over SHA-256) or with
 * a secret it shares with the receiver (HMAC-SHA256). The receiver decodes the envelope and
 * verifies it against the device registry before it decompresses or stores anything.
 *
 * The signed bytes are  "cistern.v1.SignedBatch" 0x00 agent_id 0x00 batch,  so a signature
 * is bound to the agent id the receiver looks up, and cannot be moved to another message.
 *
 * Keys are named by their fingerprint, SHA-256 over the DER SubjectPublicKeyInfo, written
 * "sha256:<64 lowercase hex>" (what `openssl pkey -pubout -outform DER | sha256sum` prints,
 * and what `cistern-agent enroll` prints). mbedTLS 2.28 does the cryptography. */
#ifndef CISTERN_SIGN_H
#define CISTERN_SIGN_H

#include <stddef.h>
#include <stdint.h>

#include "cistern.pb-c.h"

#define CIS_SIGNED_BATCH_CONTENT_TYPE "application/vnd.cistern.signed-batch.v1+protobuf"

#define CIS_FPR_LEN 32              /* a fingerprint: SHA-256 */
#define CIS_FPR_STR_LEN (7 + 64 + 1) /* "sha256:" + 64 hex + NUL */
#define CIS_HMAC_KEY_ID_LEN 16
#define CIS_HMAC_SECRET_MIN 32      /* bytes: shorter secrets are refused */
#define CIS_HMAC_SECRET_MAX 128

enum cis_sig_alg {
    CIS_SIG_ECDSA = CISTERN__V1__SIGNATURE_ALG__SIGNATURE_ECDSA_P256_SHA256,
    CIS_SIG_HMAC = CISTERN__V1__SIGNATURE_ALG__SIGNATURE_HMAC_SHA256,
};

/* --- fingerprints and secrets ---------------------------------------------------------- */

/* "sha256:" + 64 lowercase hex digits of FPR into OUT. */
void cis_fpr_format(const uint8_t fpr[CIS_FPR_LEN], char out[CIS_FPR_STR_LEN]);

/* Parse "sha256:<64 hex>" (either case; the "sha256:" prefix may be left out). Returns 0 or
 * CIS_EINVAL. */
int cis_fpr_parse(const char *s, uint8_t fpr[CIS_FPR_LEN]);

/* SHA-256 of DER bytes (a SubjectPublicKeyInfo). */
void cis_fpr_of_spki(const uint8_t *der, size_t len, uint8_t fpr[CIS_FPR_LEN]);

/* The fingerprint of the ECDSA P-256 public key in PATH, which holds (PEM or DER) a
 * certificate, a certificate signing request, a public key, or a private key. Any other key
 * type or curve is refused. Returns 0, or CIS_ENOTFOUND / CIS_EIO / CIS_EINVAL with a reason
 * that names PATH in ERR. */
int cis_fpr_of_file(const char *path, uint8_t fpr[CIS_FPR_LEN], char *err, size_t errlen);

/* Read an HMAC secret from PATH: the file's bytes, without trailing whitespace (so
 * `head -c 32 /dev/urandom | base64 > secret` makes a good one). At least CIS_HMAC_SECRET_MIN
 * and at most CIS_HMAC_SECRET_MAX bytes. The file must not be readable or writable by group or
 * others (mode 0600 or 0400). OUT holds CIS_HMAC_SECRET_MAX bytes. Returns 0 or CIS_E* with a
 * reason that names PATH. */
int cis_hmac_secret_load(const char *path, uint8_t *out, size_t *len, char *err, size_t errlen);

/* The key id of a secret: the first 16 bytes of SHA-256("cistern.v1.hmac-key-id" 0x00 secret).
 * It tells the receiver which secret signed, without revealing it. */
void cis_hmac_key_id(const uint8_t *secret, size_t len, uint8_t out[CIS_HMAC_KEY_ID_LEN]);

/* --- the agent: signing ---------------------------------------------------------------- */

struct cis_signer;

/* A signer with the ECDSA P-256 private key in KEY_FILE (PEM or DER, unencrypted), or with
 * the HMAC secret in SECRET_FILE (cis_hmac_secret_load). Returns 0 or CIS_E* with a reason
 * that names the file in ERR. */
int cis_signer_open_ecdsa(const char *key_file, struct cis_signer **out, char *err,
                          size_t errlen);
int cis_signer_open_hmac(const char *secret_file, struct cis_signer **out, char *err,
                         size_t errlen);

/* For logs: "ECDSA P-256 key sha256:..." or "HMAC-SHA256 secret (key id <32 hex>)". */
const char *cis_signer_describe(const struct cis_signer *s);

/* Wrap the serialized batch BATCH (LEN bytes, borrowed) of AGENT_ID in a signed envelope.
 * *OUT is malloc'd (the caller frees it). One thread at a time per signer.
 * Returns 0, CIS_EINVAL (an agent id the receiver would refuse, an empty batch: nothing is
 * made), CIS_ENOMEM or CIS_EIO. */
int cis_signer_wrap(struct cis_signer *s, const char *agent_id, const uint8_t *batch,
                    size_t len, uint8_t **out, size_t *out_len);

/* Accepts NULL. Wipes the key material. */
void cis_signer_free(struct cis_signer *s);

/* --- the receiver: the envelope and its verification ----------------------------------- */

/* A decoded envelope; every pointer points into PB, which it owns. */
struct cis_envelope {
    Cistern__V1__SignedBatch *pb;
    const char *agent_id;
    int alg; /* enum cis_sig_alg */
    const uint8_t *key;
    size_t key_len;
    const uint8_t *sig;
    size_t sig_len;
    const uint8_t *batch;
    size_t batch_len;
};

/* Decode untrusted bytes as a SignedBatch. Checks, without any cryptography: an agent id of
 * 1..256 characters allowed by cis_agent_id_char_ok, a known algorithm, a key (ECDSA: a
 * SubjectPublicKeyInfo of at most 256 bytes; HMAC: exactly CIS_HMAC_KEY_ID_LEN bytes), a
 * signature (ECDSA: 8..80 bytes; HMAC: exactly 32), and a non-empty batch. Returns 0 or
 * CIS_EDECODE with a short reason in WHY; on success free OUT with cis_envelope_free(). */
int cis_envelope_decode(const uint8_t *buf, size_t len, struct cis_envelope *out, char *why,
                        size_t whylen);

/* Accepts a zeroed envelope. */
void cis_envelope_free(struct cis_envelope *e);

/* Verify E against what the registry holds for its agent: FPR, the fingerprint of its public
 * key (NULL when none is registered), and SECRET (SECRET_LEN bytes; 0 when none).
 * Returns
 *   0            the signature verifies with the registered key or secret;
 *   CIS_EKEY     E is signed with a credential the registry does not hold for this agent
 *                (another key, another secret, or an algorithm it has no credential for):
 *                a configuration matter, not the batch's fault;
 *   CIS_EBADSIG  E names the registered credential but the signature does not verify: the
 *                bytes were changed after signing;
 *   CIS_EDECODE  the key is not an ECDSA P-256 SubjectPublicKeyInfo;
 * with a one-line reason in WHY (fingerprints and key ids included). Thread-safe. */
int cis_envelope_verify(const struct cis_envelope *e, const uint8_t *fpr, const uint8_t *secret,
                        size_t secret_len, char *why, size_t whylen);

#endif
