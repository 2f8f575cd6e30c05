/* The agent's SQLite segment spool: group commit of records into per-priority segments, claim
 * for forwarding, ack/release/reject, and the loss ledger. One thread, one connection. */
#ifndef AGENT_SPOOL_H
#define AGENT_SPOOL_H

#include <stddef.h>
#include <stdint.h>

#include "cistern/codec.h"

/* Schema version this code writes and reads. A newer file is refused at open. */
#define AGENT_SPOOL_SCHEMA_VERSION 1

struct agent_spool;

struct agent_spool_opts {
    const char *path; /* database file; its directory must exist */
    int sync_full;    /* 0: synchronous=NORMAL (a power cut may undo the last commits, never
                       * corrupts); 1: synchronous=FULL (a returned commit survives power loss) */
    int zstd_level;   /* passed to cis_segment_encode() */
};

/* Open (creating if needed) the spool at O->path. A new database gets the schema, a random
 * non-zero 63-bit epoch and next_seq = 1 in one transaction. An existing one must carry
 * schema_version 1 (a newer one is refused). Every stored segment starts out pending.
 * On success *OUT is the spool (caller closes with agent_spool_close()). On failure returns
 * CIS_EINVAL (bad opts), CIS_ENOTFOUND (directory missing), CIS_ECORRUPT (not a database, or
 * meta inconsistent: the caller may quarantine the file), CIS_EDB (e.g. a newer schema_version,
 * which is left untouched, or WAL unavailable), CIS_EFULL, CIS_ENOMEM, CIS_EIO (getrandom),
 * and writes a one-line reason to ERR (ERRLEN bytes, may be NULL/0). */
int agent_spool_open(const struct agent_spool_opts *o, struct agent_spool **out, char *err,
                     size_t errlen);

/* Finalize statements and close the connection. Accepts NULL. */
void agent_spool_close(struct agent_spool *s);

/* The spool's epoch: random, made when the database was created, stable across reopen. */
uint64_t agent_spool_epoch(const struct agent_spool *s);

/* Group commit of N records (recs[i].seq is ignored on input; the record's bytes are borrowed).
 * prio[i] is record i's priority class (CIS_PRIO_HIGH..CIS_PRIO_LOW).
 * In ONE transaction: records are grouped by priority class (stable order inside a class), each
 * class present becomes one segment row with a contiguous seq range (high class first, so it
 * gets the lowest seqs), and next_seq in meta advances. On success recs[i].seq holds each
 * record's assigned seq. N == 0 is a no-op returning 0.
 * Returns 0, CIS_EINVAL (bad priority), CIS_ENOMEM, a codec error, CIS_EFULL (SQLITE_FULL: disk
 * full), CIS_ECORRUPT (SQLITE_CORRUPT/NOTADB), CIS_ETOOBIG (SQLITE_TOOBIG), CIS_EDB (other). On
 * failure nothing is committed, next_seq is unchanged and recs[i].seq is left as it was. */
int agent_spool_commit(struct agent_spool *s, struct cis_record *recs, const uint32_t *prio,
                       size_t n);

struct agent_spool_seg {
    struct cis_segment seg; /* seg.data points to data */
    uint8_t *data;          /* owned by the array; freed by agent_spool_segs_free() */
    int64_t created_ms;     /* wall clock at commit; information only */
};

/* Claim the oldest pending segments, highest priority first (priority, then first_seq), not
 * already in flight, up to MAX_RECORDS records and MAX_BYTES of stored data. Always at least one
 * segment if any is pending, even if it alone exceeds the limits; stops at the first segment
 * that does not fit (never skips ahead, so order holds). Marks them in flight (in memory only).
 * On success *OUT is an array of *N segments the caller frees with agent_spool_segs_free()
 * (*OUT == NULL and *N == 0 when nothing is pending). Returns 0, CIS_ENOMEM, CIS_ECORRUPT,
 * CIS_EDB; on failure nothing is marked in flight. */
int agent_spool_claim(struct agent_spool *s, size_t max_records, size_t max_bytes,
                      struct agent_spool_seg **out, size_t *n);

/* Free an array from agent_spool_claim(). Accepts NULL. Does not change in-flight state. */
void agent_spool_segs_free(struct agent_spool_seg *segs, size_t n);

/* The receiver acknowledged a committed store of these segments (by first_seq): delete them in
 * one transaction and drop them from the in-flight set. Unknown first_seqs are ignored (an ack
 * may repeat). Returns 0, CIS_EFULL, CIS_ECORRUPT, CIS_EDB (then nothing is deleted and the
 * segments stay in flight). */
int agent_spool_ack(struct agent_spool *s, const uint64_t *first_seqs, size_t n);

/* Sending failed (will retry): back to pending. Memory only, nothing written. */
void agent_spool_release(struct agent_spool *s, const uint64_t *first_seqs, size_t n);

/* The receiver permanently rejected these segments: in ONE transaction write one ledger row per
 * segment (reason "rejected", DETAIL = receiver's reason (may be NULL), its seq range and count)
 * and delete them. Unknown first_seqs are ignored. Returns as agent_spool_ack(). */
int agent_spool_reject(struct agent_spool *s, const uint64_t *first_seqs, size_t n,
                       const char *detail);

/* Ledger rows not yet forwarded (sent = 0), oldest first (by id), at most MAX. On success *OUT
 * is a malloc'd array of *N entries (reason/detail malloc'd; never NULL) that the caller frees
 * with agent_spool_ledger_free(); *OUT == NULL when *N == 0. Returns 0, CIS_ENOMEM, CIS_EDB,
 * CIS_ECORRUPT. */
int agent_spool_ledger_unsent(struct agent_spool *s, size_t max, Cistern__V1__LossEntry **out,
                              size_t *n);

/* Free an array from agent_spool_ledger_unsent(). Accepts NULL. */
void agent_spool_ledger_free(Cistern__V1__LossEntry *e, size_t n);

/* The receiver committed a batch that carried these ledger rows (by id): mark them sent, in one
 * transaction (the rows are kept). Unknown or already-sent ids are ignored. Returns 0,
 * CIS_EFULL, CIS_ECORRUPT, CIS_EDB. */
int agent_spool_ledger_mark_sent(struct agent_spool *s, const uint64_t *ids, size_t n);

struct agent_spool_stats {
    uint64_t pending_records;   /* records in every stored segment (in flight included) */
    uint64_t pending_segments;  /* stored segments (in flight included) */
    uint64_t inflight_segments; /* of those, claimed and not yet acked/released/rejected */
    uint64_t next_seq;          /* the seq the next committed record gets */
    uint64_t ledger_unsent;     /* ledger rows with sent = 0 */
    int64_t oldest_created_ms;  /* created_ms of the stored segment with the lowest first_seq;
                                 * 0 if none */
};

/* Fill ST from in-memory counters (no I/O). */
void agent_spool_stats(const struct agent_spool *s, struct agent_spool_stats *st);

#endif
