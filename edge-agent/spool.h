/* The agent's SQLite segment spool: group commit of records into per-priority segments, claim
 * for forwarding, ack/release/reject, and the loss ledger. One thread, one connection. */
#ifndef AGENT_SPOOL_H
#define AGENT_SPOOL_H

#include <stddef.h>
#include <stdint.h>

#include "cistern/codec.h"

/* Schema version this code writes and reads. A newer file is refused at open; a version-1 or -2
 * file is upgraded in place (one transaction) at open.
 *
 * Schema (version 3). `cistern-agent status` reads these tables directly, read-only:
 *   meta(key TEXT PRIMARY KEY, value INTEGER NOT NULL)
 *       schema_version, epoch, next_seq, key_id (only once a sealing key was used), and
 *       open_boot (agent_spool_boot_mark() while the spool is open, 0 once closed cleanly)
 *   segments(first_seq INTEGER PRIMARY KEY, last_seq, priority, record_count, compression,
 *            raw_size, created_ms, data BLOB, expires_ms INTEGER NOT NULL DEFAULT 0 (wall ms;
 *            0: never), sealed INTEGER NOT NULL DEFAULT 0 (1: data is an agent_seal blob),
 *            crc INTEGER NOT NULL DEFAULT 0 (CRC-32C of the row's fields and data, bit 32 set;
 *            0: stored before version 3, not checked))
 *       index segments_prio(priority, first_seq); partial index on expires_ms where > 0
 *   ledger(id INTEGER PRIMARY KEY, reason, epoch, first_seq, last_seq, count, ts_ms, detail,
 *          sent INTEGER NOT NULL DEFAULT 0); partial index on id where sent = 0
 */
#define AGENT_SPOOL_SCHEMA_VERSION 3

struct agent_spool;
struct agent_seal;

struct agent_spool_opts {
    const char *path;      /* database file; its directory must exist */
    int sync_full;         /* 0: synchronous=NORMAL (a power cut may undo the last commits, never
                            * corrupts; the WAL is synced before claim or ledger_unsent hands out
                            * anything, so it undoes only what never left the agent);
                            * 1: synchronous=FULL (a returned commit survives power loss) */
    int zstd_level;        /* passed to cis_seg_encoder_create() */
    uint64_t max_size;     /* bound on the database + WAL files, bytes; 0: unbounded */
    int reject_new;        /* when a commit does not fit in max_size: 0 evicts (drop_oldest),
                            * 1 fails the commit with CIS_EFULL (reject_new) */
    uint64_t wal_max_size; /* the WAL file never grows past this; 0: 64 MiB */
    uint64_t seg_max_records; /* a commit's group of more records than this is stored as
                               * several segments, so that a batch of whole segments can keep
                               * to forward.batch.max_records; 0: no bound */
    const struct agent_seal *seal; /* NULL: blobs stored plain. Borrowed; outlives the spool */
};

/* Open (creating if needed) the spool at O->path. A new database gets the schema (with
 * auto_vacuum=INCREMENTAL), a random non-zero 63-bit epoch and next_seq = 1 in one transaction.
 * An existing one must carry schema_version 1 (upgraded in place, in one transaction) or 2 (a
 * newer one is refused). With O->seal, the key's id is checked against meta key_id (stored
 * there the first time a key is used). Every stored segment starts out pending.
 * On success *OUT is the spool (caller closes with agent_spool_close()). On failure returns
 * CIS_EINVAL (bad opts; or sealed segments are stored and the configured key differs from the
 * one that sealed them, or no key is configured), CIS_ENOTFOUND (directory missing),
 * CIS_ECORRUPT (not a database, or meta inconsistent: the caller may quarantine the file),
 * CIS_EDB (e.g. a newer schema_version, which is left untouched, or WAL unavailable),
 * CIS_ENOSPC, CIS_ENOMEM, CIS_EIO (getrandom), and writes a one-line reason to ERR (ERRLEN
 * bytes, may be NULL/0). */
int agent_spool_open(const struct agent_spool_opts *o, struct agent_spool **out, char *err,
                     size_t errlen);

/* Mark the spool closed cleanly (meta open_boot = 0), finalize statements and close the
 * connection. Accepts NULL. */
void agent_spool_close(struct agent_spool *s);

/* A positive number that names this boot of the machine (from the kernel's boot id; 1 when it
 * cannot be read): the spool's "open" mark in meta open_boot. spool_recover.c compares a mark
 * left by an unclean stop with it: in the same boot the page cache survived, so the -wal and
 * -shm files are exactly as the stopped process left them. */
int64_t agent_spool_boot_mark(void);

/* The spool's epoch: random, made when the database was created, stable across reopen. */
uint64_t agent_spool_epoch(const struct agent_spool *s);

/* Group commit of N records (recs[i].seq is ignored on input; the record's bytes are borrowed).
 * prio[i] is record i's priority class (CIS_PRIO_HIGH..CIS_PRIO_LOW); ttl_ms[i] its time to
 * live (0: none; TTL_MS may be NULL: none for all).
 * In ONE transaction: records are grouped by (priority class, ttl) (stable order inside a
 * group), each group present becomes one segment row with a contiguous seq range (high class
 * first, so it gets the lowest seqs; within a class, groups in order of first appearance;
 * expires_ms = commit time + ttl), and next_seq in meta advances. With max_size set, a group
 * whose records pass max_size / 64 bytes is stored as several consecutive segment rows (still
 * one contiguous seq range for the group), so that eviction frees space in steps small enough
 * to hold the file within 5% of max_size. With a seal, each segment's blob is sealed for
 * (epoch, first_seq, last_seq).
 * Size bound: if the new segments would take the files past max_size, then with drop_oldest
 * segments that are not in flight are evicted first, in the same transaction, lowest priority
 * first and oldest first within a priority, each recorded in the ledger as "evicted_full"
 * (adjacent ranges coalesced into one row); with reject_new, or when evicting everything
 * evictable is not enough, the commit fails with CIS_EFULL and nothing changes.
 * On success recs[i].seq holds each record's assigned seq. N == 0 is a no-op returning 0.
 * Returns 0, CIS_EINVAL (bad priority, negative ttl), CIS_ENOMEM, a codec or seal error,
 * CIS_EFULL (max_size), CIS_ENOSPC (SQLITE_FULL: the device is full), CIS_EAGAIN (the WAL is at
 * its cap and a reader blocks the checkpoint for ~200 ms), CIS_ECORRUPT (SQLITE_CORRUPT/NOTADB),
 * CIS_ETOOBIG (SQLITE_TOOBIG, or one commit needs more WAL than wal_max_size), CIS_EDB (other). On
 * failure nothing is committed, next_seq is unchanged and recs[i].seq is left as it was. */
int agent_spool_commit(struct agent_spool *s, struct cis_record *recs, const uint32_t *prio,
                       const int64_t *ttl_ms, size_t n);

/* Drop every segment not in flight whose expires_ms is at or before NOW_WALL_MS, in one
 * transaction, each recorded in the ledger as "expired_ttl" (adjacent ranges coalesced).
 * *DROPPED (may be NULL) gets the number of records dropped. Cheap when nothing is due (an
 * index lookup, no write). Returns 0, CIS_ENOMEM, or as agent_spool_ack(). */
int agent_spool_expire(struct agent_spool *s, int64_t now_wall_ms, uint64_t *dropped);

/* Append one ledger row (e.g. "corrupt_spool" for a quarantined predecessor) in its own
 * transaction. DETAIL may be NULL. Returns 0 or as agent_spool_ack(). */
int agent_spool_ledger_add(struct agent_spool *s, const char *reason, uint64_t epoch,
                           uint64_t first_seq, uint64_t last_seq, uint64_t count,
                           const char *detail);

struct agent_spool_seg {
    struct cis_segment seg; /* seg.data points to data */
    uint8_t *data;          /* owned by the array; freed by agent_spool_segs_free() */
    int64_t created_ms;     /* wall clock at commit; information only */
};

/* Claim the oldest pending segments, highest priority first (priority, then first_seq), not
 * already in flight and not expired, up to MAX_RECORDS records and MAX_BYTES of stored data.
 * Always at least one segment if any is pending, even if it alone exceeds the limits; stops at
 * the first segment that does not fit (never skips ahead, so order holds). Marks them in flight
 * (in memory only); with sync_full 0, first syncs the WAL if anything was committed since its last
 * sync. Sealed segments are opened: the caller gets plaintext segment data. A
 * sealed segment that fails authentication is never returned: it is deleted and recorded in
 * the ledger as "tampered"; nor is a segment that fails its checksum (crc: the file was
 * damaged), recorded as "corrupt_spool" (the cases where claim writes).
 * On success *OUT is an array of *N segments the caller frees with agent_spool_segs_free()
 * (*OUT == NULL and *N == 0 when nothing is pending). Returns 0, CIS_ENOMEM, CIS_ECORRUPT,
 * CIS_EDB; on failure nothing is marked in flight. */
int agent_spool_claim(struct agent_spool *s, size_t max_records, size_t max_bytes,
                      struct agent_spool_seg **out, size_t *n);

/* Give back the segment encoder's zstd context and buffers and the memory of SQLite's page
 * cache that nothing holds (the agent calls it once it has been idle for a while; all of it
 * comes back on use). */
void agent_spool_release_memory(struct agent_spool *s);

/* The same from the other end: the newest pending segments of the highest class pending,
 * descending (then the next class's), stopping likewise at the first that does not fit, in the
 * order read (a batch's segments need not be in seq order: the header spans them).
 * The forwarder uses it for one batch at a time during a backlog, so live records do not wait
 * for the whole backlog to drain (DESIGN.md §2, "Backlog"). */
int agent_spool_claim_newest(struct agent_spool *s, size_t max_records, size_t max_bytes,
                             struct agent_spool_seg **out, size_t *n);

/* Free an array from agent_spool_claim(). Accepts NULL. Does not change in-flight state. */
void agent_spool_segs_free(struct agent_spool_seg *segs, size_t n);

/* The receiver acknowledged a committed store of these segments (by first_seq): delete them in
 * one transaction and drop them from the in-flight set. Unknown first_seqs are ignored (an ack
 * may repeat). Returns 0, CIS_ENOSPC, CIS_ECORRUPT, CIS_EDB (then nothing is deleted and the
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
 * CIS_ENOSPC, CIS_ECORRUPT, CIS_EDB. */
int agent_spool_ledger_mark_sent(struct agent_spool *s, const uint64_t *ids, size_t n);

struct agent_spool_class_stats {
    uint64_t records, segments, bytes; /* stored (in flight included); bytes as stored */
};

struct agent_spool_stats {
    struct agent_spool_class_stats prio[CIS_PRIO_COUNT];
    uint64_t db_bytes;          /* database file size (page_count * page_size) */
    uint64_t wal_bytes;         /* WAL file size */
    uint64_t evicted_records;   /* dropped as evicted_full since open */
    uint64_t expired_records;   /* dropped as expired_ttl since open */
    uint64_t tampered_records;  /* dropped as tampered since open */
    int full;                   /* 1 while the last commit failed with CIS_EFULL */
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

/* CRC-32C (Castagnoli) of N bytes at P, continuing from CRC (0 to start): the checksum in the
 * segments' crc column. The CPU's CRC instruction where there is one (x86-64 with SSE4.2, arm64
 * with CRC32), else tables; PORTABLE 1 forces the tables (the tests compare the two ways). */
uint32_t agent_spool_crc32c(uint32_t crc, const void *p, size_t n, int portable);

/* ---- corruption: quarantine and a fresh spool (spool_recover.c) ---- */

/* What is known of a spool being quarantined; zero where unknown. */
struct agent_spool_salvage {
    uint64_t epoch;           /* 0: unknown */
    uint64_t next_seq;        /* 0: unknown */
    uint64_t min_pending_seq; /* lowest first_seq stored; 0: none or unknown */
};

/* Open the spool at O->path, checking it first, and recover from corruption:
 * - before opening, an existing non-empty file gets PRAGMA quick_check on its own connection; a
 *   zero-byte database with a -wal or -shm beside it, a truncated or flipped file, a file that
 *   is not a database, and a WAL that was deleted while its -shm remains (committed records
 *   lost) all count as corrupt;
 * - a corrupt spool is moved aside: PATH, PATH-wal and PATH-shm are renamed to
 *   PATH.corrupt-<UTC YYYYmmddTHHMMSSZ> (+ "-wal", "-shm"), after a fresh spool (new epoch) with
 *   one "corrupt_spool" ledger row (old epoch and lost seq range where readable, else zeros;
 *   DETAIL says why and where the files went) was made beside it and is then renamed into
 *   place, so a crash at any step leaves either the old files or the complete new spool.
 * *RECOVERED (may be NULL) is set to 1 when a quarantine happened. Returns as
 * agent_spool_open() (never CIS_ECORRUPT: that case is recovered), with a reason in ERR. */
int agent_spool_open_checked(const struct agent_spool_opts *o, struct agent_spool **out,
                             int *recovered, char *err, size_t errlen);

/* At run time, after an operation on S returned CIS_ECORRUPT: close S (*SP), quarantine its
 * files as above (WHY goes into the ledger row's detail) and open a fresh spool into *SP. What S
 * knew (epoch, next_seq, lowest pending seq) is used when the file cannot be read. Returns 0 or
 * as agent_spool_open(); on failure *SP is NULL. */
int agent_spool_recover(struct agent_spool **sp, const struct agent_spool_opts *o, const char *why,
                        char *err, size_t errlen);

/* What S knows of itself, for agent_spool_recover() (no I/O). */
void agent_spool_salvage_info(const struct agent_spool *s, struct agent_spool_salvage *out);

#endif
