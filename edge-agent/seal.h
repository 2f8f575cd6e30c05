/* Encryption at rest for spool segments: AES-256-GCM (mbedTLS) with a 32-byte key read from a
 * file that only its owner may read. A sealed blob is
 *     nonce (12 random bytes) || ciphertext || tag (16 bytes)
 * and the associated data binds it to where it belongs: the spool's epoch and the segment's seq
 * range (big-endian u64 epoch, first_seq, last_seq). A blob moved to another segment or spool,
 * or changed by one bit, fails to open. */
#ifndef AGENT_SEAL_H
#define AGENT_SEAL_H

#include <stddef.h>
#include <stdint.h>

#define AGENT_SEAL_KEY_LEN 32
#define AGENT_SEAL_NONCE_LEN 12
#define AGENT_SEAL_TAG_LEN 16
#define AGENT_SEAL_OVERHEAD (AGENT_SEAL_NONCE_LEN + AGENT_SEAL_TAG_LEN)

struct agent_seal; /* an expanded key; opaque */

/* Read the key file PATH: it must be a regular file of exactly 32 bytes, with no permission bits
 * for group or others (mode 0600 or 0400). Returns 0 and *OUT, or CIS_EIO (cannot read),
 * CIS_EINVAL (wrong size, or mode too open: the message names the mode and says
 * "chmod 600 PATH"), CIS_ENOMEM, with a one-line reason in ERR. */
int agent_seal_load(const char *path, struct agent_seal **out, char *err, size_t errlen);

/* Free a key (wiping it). Accepts NULL. */
void agent_seal_free(struct agent_seal *k);

/* Make a new key file at PATH: 32 bytes from getrandom(), created with O_CREAT|O_EXCL and mode
 * 0600 (an existing file is never overwritten: CIS_EINVAL "exists"), fsync'd. Returns 0 or
 * CIS_E* with a reason in ERR. */
int agent_seal_keygen(const char *path, char *err, size_t errlen);

/* An 8-byte public fingerprint of the key (a SHA-256 over a fixed label and the key), kept in
 * the spool so a different key is noticed at start instead of every segment failing to open. */
uint64_t agent_seal_key_id(const struct agent_seal *k);

/* Seal IN (LEN bytes) for the segment (EPOCH, FIRST, LAST). On success *OUT is a malloc'd blob
 * of LEN + AGENT_SEAL_OVERHEAD bytes (*OUTLEN). Returns 0, CIS_ENOMEM, CIS_EIO (getrandom). */
int agent_seal_seal(const struct agent_seal *k, uint64_t epoch, uint64_t first, uint64_t last,
                    const uint8_t *in, size_t len, uint8_t **out, size_t *outlen);

/* Open a sealed blob. On success *OUT is a malloc'd plaintext of *OUTLEN bytes. Returns 0,
 * CIS_ETAMPERED (too short, or authentication failed: nothing is output), CIS_ENOMEM. */
int agent_seal_open(const struct agent_seal *k, uint64_t epoch, uint64_t first, uint64_t last,
                    const uint8_t *in, size_t len, uint8_t **out, size_t *outlen);

#endif
