/* The key and secret the seeds are signed with (tests/fuzz/make_seeds.c), and which the
 * envelope and ingest targets register, so that mutations of valid envelopes reach the
 * cryptography and the batch behind it. Test values, never a device's. */
#ifndef CIS_FUZZ_SEEDS_H
#define CIS_FUZZ_SEEDS_H

/* The fingerprint of make_seeds.c's seed_key_pem. */
#define SEED_KEY_FPR "sha256:6e29b5656a0ca8d4739a8cae9c6df7c333d4d047f6e8105b9a44d51165589179"
#define SEED_SECRET "cistern fuzz seed secret: not a real one, 32+ bytes"

/* The agents the ingest targets register (both with the key and the secret). */
#define SEED_AGENT "gw-1"
#define SEED_AGENT_2 "gw-2"

/* Ingest targets: the first byte of the body part says what follows.
 *   SEED_BODY_AS_IS  the body exactly as sent (an envelope, or anything)
 *   SEED_BODY_WRAP   [1 byte L][L bytes: an agent id][a serialized Batch]: the target signs the
 *                    batch for that agent with SEED_SECRET (HMAC) and sends the envelope, so
 *                    the fuzzer's mutations of the batch get past the signature to the decoder */
#define SEED_BODY_AS_IS 0
#define SEED_BODY_WRAP 1

#endif
