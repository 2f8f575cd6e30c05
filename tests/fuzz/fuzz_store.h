/* Fuzz helpers for the ingest targets: one real SQLite store per process, the ingest context
 * over it, and a probe that tells whether the store committed anything. */
#ifndef CIS_FUZZ_STORE_H
#define CIS_FUZZ_STORE_H

#include "ingest/ingest.h"

/* The ingest context over a SQLite store opened on the first call (in a temporary directory on
 * tmpfs when /dev/shm is writable; removed at exit, left behind when the process is killed:
 * rm -r /dev/shm/cistern-fuzz.*). IDENTITY_NAME names the sender's identity in messages, as
 * the transport does. Accepted batches make the store grow (some MB a minute), and a batch seen
 * before is a duplicate the next time, as on a real receiver; past 32 MiB the store is started
 * afresh. Aborts when the store cannot be opened. Borrowed, process-wide. */
const struct recv_ingest_ctx *cis_fuzz_ingest_ctx(const char *identity_name);

/* PRAGMA data_version, read through a connection of our own: it changes whenever the store
 * committed something since the last call. For the oracle "a refused batch changes nothing". */
long long cis_fuzz_store_version(void);

#endif
