/* Receiver store interface: a const vtable per backend (sqlite now, postgres later). Every
 * backend stores records under the unique key (agent_id, epoch, seq), keeps per-agent state
 * and the loss ledger, and commits one batch in one transaction. */
#ifndef RECV_STORE_H
#define RECV_STORE_H

#include <stddef.h>
#include <stdint.h>

#include <cistern/codec.h>
#include <cistern/sign.h>

struct recv_store; /* backend-specific handle */

struct recv_store_opts {
    const char *path;    /* database file (sqlite) */
    int sync_full;       /* 1: durable on every commit (synchronous=FULL) */
    int busy_timeout_ms; /* wait this long for a lock held by another process */
};

struct recv_put_result {
    uint64_t accepted;   /* records newly stored */
    uint64_t duplicates; /* records already present under their key */
    int replay;          /* the batch had records and none was new: counted in the agent row */
};

/* Views handed to callbacks; valid only during the callback. */
struct recv_agent_info {
    const char *id;
    int64_t first_seen_ms, last_seen_ms;
    int64_t spool_depth;
    int64_t oldest_pending_ms;
    int64_t records;
    int64_t replayed_batches; /* batches with records of which none was new */
};

/* One entry of the device registry: the agents allowed to deliver, and the credentials their
 * batches must be signed with. Plain data (no pointers) so a cache can copy it. */
#define RECV_DEVICE_ID_MAX 257 /* an agent id is at most 256 characters, plus NUL */
struct recv_device {
    char id[RECV_DEVICE_ID_MAX];
    int has_fpr;                       /* 1: FPR is the fingerprint of its ECDSA P-256 key */
    uint8_t fpr[CIS_FPR_LEN];
    size_t secret_len;                 /* 0: no HMAC secret */
    uint8_t secret[CIS_HMAC_SECRET_MAX];
    int enabled;                       /* 0: revoked */
    int64_t added_ms, changed_ms;      /* changed: the last add, revoke or enable */
};

struct recv_record_view {
    uint64_t epoch, seq;
    int64_t ts_ms;
    int64_t received_ms; /* when the receiver stored it: batches arrive in this order */
    const char *stream;
    const char *content_type; /* NULL when none */
    const uint8_t *payload;
    size_t payload_len;
};

struct recv_records_query {
    const char *agent_id;
    int has_epoch; /* 0: all epochs, ordered by (epoch, seq) */
    uint64_t epoch;
    uint64_t after; /* only seq > after */
    unsigned limit; /* at most this many rows */
};

/* One loss-ledger entry as the agent sent it. ORIGIN_EPOCH is the epoch of the spool that
 * wrote the entry (the batch header's); EPOCH is the epoch of the records it describes. They
 * differ for a corrupt_spool entry written by a fresh spool about the old one. */
struct recv_loss_view {
    uint64_t origin_epoch, id; /* (agent, origin_epoch, id) identifies the entry */
    const char *reason; /* evicted_full | expired_ttl | rejected | corrupt_spool | tampered */
    uint64_t epoch, first_seq, last_seq, count;
    int64_t ts_ms;      /* agent's wall clock; information only */
    const char *detail; /* NULL when none */
    int64_t received_ms;
};

struct recv_gaps_query {
    const char *agent_id;
    int has_epoch; /* 0: every epoch of the agent, ascending */
    uint64_t epoch;
    unsigned max_gaps; /* per epoch; 0 means RECV_GAPS_MAX */
};

#define RECV_GAPS_MAX 1000

/* A missing seq range. REASON is the ledger reason when an entry for the epoch covers it
 * ("dropped at the edge"), NULL when none does ("not yet received"). */
struct recv_gap {
    uint64_t first_seq, last_seq;
    const char *reason;
};

/* What get_gaps knows about one epoch. HIGHEST_SEQ is the highest seq known: the highest
 * received, or the highest last_seq of the epoch's ledger entries if that is higher. GAPS are
 * the missing ranges below it, ascending, adjacent ranges of the same status merged; when
 * there are more than the query's cap, the first ones and TRUNCATED = 1. */
struct recv_epoch_gaps {
    uint64_t epoch;
    uint64_t received; /* records stored for the epoch */
    uint64_t highest_seq;
    const struct recv_gap *gaps;
    size_t ngaps;
    int truncated;
};

/* Callbacks return 0 to continue, non-zero to stop (that value is returned by the caller). */
typedef int (*recv_agent_cb)(void *ud, const struct recv_agent_info *a);
typedef int (*recv_record_cb)(void *ud, const struct recv_record_view *r);
typedef int (*recv_loss_cb)(void *ud, const struct recv_loss_view *l);
typedef int (*recv_gaps_cb)(void *ud, const struct recv_epoch_gaps *e);
typedef int (*recv_device_cb)(void *ud, const struct recv_device *d);

struct recv_store_ops {
    const char *name;
    /* Open or create the store. On success *OUT is the handle (release with close).
     * Returns 0 or CIS_E* with a reason in ERR. */
    int (*open)(const struct recv_store_opts *opts, struct recv_store **out, char *err,
                size_t errlen);
    /* Close and free. Accepts NULL. */
    void (*close)(struct recv_store *s);
    /* Store every record of B (borrowed, already checked by recv_batch_check) in one
     * transaction, upsert the agent row and the loss entries (each keyed by agent, the
     * header's epoch and its id: a repeated entry is stored once). NOW_MS is the receive time.
     * Fills RES only when the transaction committed. Thread-safe. Returns 0 or CIS_EDB /
     * CIS_EFULL / CIS_EAGAIN (the agent should retry). */
    int (*put_batch)(struct recv_store *s, const struct cis_decoded_batch *b, int64_t now_ms,
                     struct recv_put_result *res);
    /* Call CB for every agent, ordered by id. Thread-safe. */
    int (*list_agents)(struct recv_store *s, recv_agent_cb cb, void *ud);
    /* Call CB for the records Q selects, in (epoch, seq) order. CIS_ENOTFOUND when the
     * agent is unknown. Thread-safe. */
    int (*get_records)(struct recv_store *s, const struct recv_records_query *q, recv_record_cb cb,
                       void *ud);
    /* Call CB for every loss-ledger entry of AGENT_ID, in the order they were received.
     * CIS_ENOTFOUND when the agent is unknown. Thread-safe. */
    int (*get_losses)(struct recv_store *s, const char *agent_id, recv_loss_cb cb, void *ud);
    /* Call CB once per epoch of the agent that has records or ledger entries (only Q->epoch
     * when Q->has_epoch; none when the agent never used it), ascending, with the epoch's
     * missing seq ranges classified against the ledger (see struct recv_epoch_gaps).
     * CIS_ENOTFOUND when the agent is unknown. Thread-safe. */
    int (*get_gaps)(struct recv_store *s, const struct recv_gaps_query *q, recv_gaps_cb cb,
                    void *ud);
    /* 0 when the store answers queries, CIS_EDB otherwise. Thread-safe. */
    int (*health)(struct recv_store *s);

    /* The device registry. Every call is one transaction and thread-safe; other processes
     * (`cistern-receiver device ...`) may change the registry while a receiver runs. */
    /* Add D (D->added_ms and changed_ms are set to NOW_MS). CIS_EEXIST when D->id is already
     * registered and REPLACE is 0; with REPLACE its credentials and enabled flag are replaced
     * and added_ms kept. */
    int (*device_put)(struct recv_store *s, const struct recv_device *d, int replace,
                      int64_t now_ms);
    /* Fill OUT for ID. 0, CIS_ENOTFOUND or CIS_EDB. */
    int (*device_get)(struct recv_store *s, const char *id, struct recv_device *out);
    /* Call CB for every device, ordered by id. */
    int (*device_list)(struct recv_store *s, recv_device_cb cb, void *ud);
    /* Set ID's enabled flag (0: revoke) and changed_ms. 0, CIS_ENOTFOUND or CIS_EDB. */
    int (*device_set_enabled)(struct recv_store *s, const char *id, int enabled, int64_t now_ms);
};

extern const struct recv_store_ops recv_store_sqlite;

/* The backend called NAME, or NULL. */
const struct recv_store_ops *recv_store_find(const char *name);

/* Checks a decoded batch must pass before any store sees it: epochs (header and loss
 * entries) and seqs fit a signed 63-bit INTEGER. Returns 0 or CIS_EDECODE with a reason. */
int recv_batch_check(const struct cis_decoded_batch *b, char *why, size_t whylen);

#endif
