/* Fuzz helpers for the ingest targets: one real SQLite store per process, the ingest context
 * over it, and a probe that tells whether the store committed anything. */
#ifndef CIS_FUZZ_STORE_H
#define CIS_FUZZ_STORE_H

#include "ingest/ingest.h"

/* The ingest context over a SQLite store, and a device registry in it that holds SEED_AGENT and
 * SEED_AGENT_2 with the seeds' key and secret (fuzz_seeds.h), opened on the first call (in a temporary directory on
 * tmpfs when /dev/shm is writable; removed at exit, left behind when the process is killed:
 * rm -r /dev/shm/cistern-fuzz.*). IDENTITY_NAME names the sender's identity in messages, as
 * the transport does. Accepted batches make the store grow (some MB a minute), and a batch seen
 * before is a duplicate the next time, as on a real receiver; past 32 MiB the store is started
 * afresh. Aborts when the store cannot be opened. Borrowed, process-wide. */
const struct recv_ingest_ctx *cis_fuzz_ingest_ctx(const char *identity_name);

/* Sign BATCH (LEN bytes) for AGENT with the seeds' secret (SEED_SECRET, registered for
 * SEED_AGENT and SEED_AGENT_2): *OUT is malloc'd. Returns 0, or CIS_EINVAL for an agent id or a
 * batch no envelope can carry (the input is then skipped). */
int cis_fuzz_wrap(const char *agent, const uint8_t *batch, size_t len, uint8_t **out,
                  size_t *out_len);

/* The body of an ingest target's input P (N bytes): its first byte says what follows
 * (fuzz_seeds.h: SEED_BODY_AS_IS, or SEED_BODY_WRAP and a batch cis_fuzz_wrap signs). *BODY is
 * malloc'd with exactly *LEN bytes (1 when empty), so ASan sees any read past them. Returns 0,
 * or -1 to skip the input. */
int cis_fuzz_body(const uint8_t *p, size_t n, uint8_t **body, size_t *len);

/* PRAGMA data_version, read through a connection of our own: it changes whenever the store
 * committed something since the last call. For the oracle "a refused batch changes nothing". */
long long cis_fuzz_store_version(void);

#endif
