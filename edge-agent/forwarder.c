/* The forwarder: claims pending segments from the spool, sends them as batches through the
 * transport, and deletes them only after the receiver has acknowledged its commit. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "agent.h"
#include "cistern/backoff.h"
#include "cistern/err.h"
#include "cistern/log.h"
#include "cistern/sign.h"
#include "spool.h"

#define LEDGER_PER_BATCH 64

struct slot {
    int used;
    uint64_t token;
    uint64_t *first_seqs;
    size_t nseg;
    uint64_t nrecords;
    uint64_t *ledger_ids;
    size_t nledger;
    int newest; /* claimed from the newest end of a backlog */
};

struct agent_forwarder {
    struct agent *a;
    const struct agent_config *cfg;
    struct agent_spool *spool;
    const struct agent_transport_ops *tops;
    void *t;
    struct cis_signer *signer; /* signs every batch (forward.sign) */
    struct slot *slots;
    size_t nslots, inflight;
    uint64_t inflight_records;
    uint64_t next_token;
    struct cis_backoff bo;
    int64_t retry_at;  /* monotonic; no new batch before it */
    int64_t due_at;    /* monotonic; when unclaimed records must go out, -1 if none wait */
    int failing;       /* the last attempt failed: one batch at a time until one gets through */
    uint64_t failures; /* consecutive failed attempts */
    int ledger_in_flight;
    int ledger_alone;  /* a batch with loss entries and records was refused: loss entries go
                        * in batches of their own until they are through */
    int aborting;      /* inside agent_forwarder_abort(): results say nothing of the link */
    int ack_err;       /* the last delete of acknowledged segments failed (logged once) */
    int last_newest;   /* the last batch started was claimed newest first */
    struct agent_link link; /* for `status`; in_flight is filled in on request */
};

static void slot_clear(struct slot *s)
{
    free(s->first_seqs);
    free(s->ledger_ids);
    memset(s, 0, sizeof(*s));
}

static void on_sent(void *ctx, uint64_t token, const struct agent_send_result *r)
{
    struct agent_forwarder *f = ctx;
    struct agent_counters *cnt = agent_counters(f->a);
    struct slot *s = NULL;
    int64_t now = cis_mono_ms();
    int rc;

    for (size_t i = 0; i < f->nslots; i++)
        if (f->slots[i].used && f->slots[i].token == token)
            s = &f->slots[i];
    if (!s)
        return;

    if (f->aborting) {
        /* We cut the send short (shutdown, or a spool being replaced): the receiver never
         * answered, so this is neither a link failure nor a reason to back off. */
        agent_spool_release(f->spool, s->first_seqs, s->nseg);
    } else if (r->status == 0) {
        /* The receiver answered 2xx only after its store committed: now, and only now, the
         * segments may leave the spool. */
        rc = agent_spool_ack(f->spool, s->first_seqs, s->nseg);
        if (rc) {
            /* Once per change of state: a full disk fails every retry. */
            if (f->ack_err != rc)
                cis_warn("[forward] acknowledged segments could not be deleted (%s): they will "
                         "be sent again, and the receiver will drop the duplicates",
                         cis_strerror(rc));
            f->ack_err = rc;
            /* A failed ack leaves them in flight; only a release makes them claimable again. */
            agent_spool_release(f->spool, s->first_seqs, s->nseg);
            f->due_at = now;
            agent_spool_failed(f->a, rc);
        } else if (f->ack_err) {
            cis_info("[forward] acknowledged segments are deleted again");
            f->ack_err = 0;
        }
        if (s->nledger) {
            rc = agent_spool_ledger_mark_sent(f->spool, s->ledger_ids, s->nledger);
            if (rc)
                agent_spool_failed(f->a, rc);
        }
        cnt->delivered += s->nrecords;
        if (f->failing)
            cis_info("[forward] delivering again after %llu failed attempt%s",
                     (unsigned long long)f->failures, f->failures == 1 ? "" : "s");
        f->failing = 0;
        f->failures = 0;
        cis_backoff_reset(&f->bo);
        f->link.state = AGENT_LINK_UP;
        f->link.last_success_wall_ms = cis_wall_ms();
        f->link.consecutive_failures = 0;
    } else if (r->status == CIS_EAGAIN) {
        int64_t delay = cis_backoff_next(&f->bo);
        /* Unreachable (no HTTP answer): a connection attempt costs a down receiver nothing,
         * so keep them short and resume within seconds of its return. An answer (5xx, 429)
         * means it is up and struggling: back off in full, and honour Retry-After. */
        if (r->code == 0 && delay > f->cfg->retry_unreachable_max_ms)
            delay = f->cfg->retry_unreachable_max_ms;
        if (r->retry_after_ms > delay)
            delay = r->retry_after_ms;
        agent_spool_release(f->spool, s->first_seqs, s->nseg);
        if (f->retry_at < now + delay)
            f->retry_at = now + delay;
        f->due_at = now;
        if (!f->failing)
            cis_warn("[forward] cannot deliver: %s; retrying with backoff, records stay in the spool",
                     r->reason);
        else
            cis_debug("[forward] retry failed: %s (next in %lld ms)", r->reason, (long long)delay);
        f->failing = 1;
        f->failures++;
        f->link.state = AGENT_LINK_DOWN;
        snprintf(f->link.last_error, sizeof(f->link.last_error), "%s", r->reason);
        f->link.last_error_wall_ms = cis_wall_ms();
        f->link.consecutive_failures++;
    } else if (s->nseg && s->nledger) {
        /* Refused, but which part: the records or the loss entries riding with them? Loss
         * entries go out again with every batch until one is taken, so a refused entry would
         * get every later batch's records ledgered as rejected. Send the two apart: records
         * the receiver refuses on their own are rejected then. */
        cis_warn("[forward] receiver refused a batch of %llu records with %zu loss entr%s: %s; "
                 "sending them apart", (unsigned long long)s->nrecords, s->nledger,
                 s->nledger == 1 ? "y" : "ies", r->reason);
        agent_spool_release(f->spool, s->first_seqs, s->nseg);
        f->ledger_alone = 1;
        f->due_at = now;
        f->failing = 0;
        f->failures = 0;
        cis_backoff_reset(&f->bo);
        f->link.state = AGENT_LINK_UP;
        f->link.consecutive_failures = 0;
    } else {
        /* A final 4xx: this batch will never be taken. Ledger it and move on, so one poison
         * batch never blocks the queue. */
        if (s->nseg)
            cis_warn("[forward] receiver rejected %llu records (seq %llu..): %s; recorded in the "
                     "loss ledger", (unsigned long long)s->nrecords,
                     (unsigned long long)s->first_seqs[0], r->reason);
        else
            cis_warn("[forward] receiver refused %zu loss entr%s: %s; they are not sent again",
                     s->nledger, s->nledger == 1 ? "y" : "ies", r->reason);
        if (s->nseg) {
            rc = agent_spool_reject(f->spool, s->first_seqs, s->nseg, r->reason);
            if (rc) {
                cis_error("[forward] could not ledger the rejected batch (%s); it stays pending",
                          cis_strerror(rc));
                agent_spool_release(f->spool, s->first_seqs, s->nseg);
                agent_spool_failed(f->a, rc);
            } else {
                cnt->rejected += s->nrecords;
            }
        } else if (s->nledger) {
            /* A batch of loss entries alone was refused: do not send them forever. */
            rc = agent_spool_ledger_mark_sent(f->spool, s->ledger_ids, s->nledger);
            if (rc)
                agent_spool_failed(f->a, rc);
        }
        if (f->failing) {
            f->failing = 0;
            f->failures = 0;
        }
        cis_backoff_reset(&f->bo);
        /* The receiver answered: the link works even though it refused this batch. */
        f->link.state = AGENT_LINK_UP;
        f->link.consecutive_failures = 0;
    }
    if (s->nledger)
        f->ledger_in_flight = 0;
    /* Loss entries sent on their own were answered (taken or refused for good). */
    if (s->nledger && !s->nseg && !f->aborting && r->status != CIS_EAGAIN)
        f->ledger_alone = 0;
    f->inflight--;
    f->inflight_records -= s->nrecords;
    slot_clear(s);
}

/* The signer forward.sign names, with the outcome logged once. */
static int open_signer(const struct agent_config *cfg, struct cis_signer **out)
{
    char err[512];
    int rc = cfg->sign_method == AGENT_SIGN_HMAC
                 ? cis_signer_open_hmac(cfg->sign_hmac_secret_file, out, err, sizeof(err))
                 : cis_signer_open_ecdsa(cfg->sign_key_file ? cfg->sign_key_file : cfg->key_file,
                                         out, err, sizeof(err));
    if (rc)
        cis_error("[forward] cannot sign batches (forward.sign): %s", err);
    else
        cis_info("[forward] batches are signed with %s", cis_signer_describe(*out));
    return rc;
}

int agent_forwarder_create(struct agent *a, const struct agent_config *cfg,
                           struct agent_spool *spool, struct agent_forwarder **out)
{
    struct agent_forwarder *f = calloc(1, sizeof(*f));
    struct agent_spool_stats st;
    int rc;
    if (!f)
        return CIS_ENOMEM;
    rc = open_signer(cfg, &f->signer);
    if (rc) {
        free(f);
        return rc;
    }
    f->a = a;
    f->cfg = cfg;
    f->spool = spool;
    f->tops = cfg->transport == AGENT_TRANSPORT_MQTT ? &agent_transport_mqtt
                                                     : &agent_transport_https;
    f->nslots = (size_t)cfg->in_flight;
    f->slots = calloc(f->nslots, sizeof(*f->slots));
    if (!f->slots) {
        cis_signer_free(f->signer);
        free(f);
        return CIS_ENOMEM;
    }
    cis_backoff_init(&f->bo, cfg->retry_initial_ms, cfg->retry_max_ms);
    rc = f->tops->create(a, cfg, on_sent, f, &f->t);
    if (rc) {
        cis_signer_free(f->signer);
        free(f->slots);
        free(f);
        return rc;
    }
    agent_spool_stats(spool, &st);
    /* A backlog from before a restart goes out at once. */
    f->due_at = st.pending_segments ? cis_mono_ms() : -1;
    *out = f;
    return 0;
}

/* During a backlog, live records would wait for all of it: batches go oldest first. So while
 * more than two batches' worth wait beyond those in flight, one batch at a time (and never two
 * in a row) is claimed from the newest end instead: live data gets a share of the link, at
 * least every other batch, and the backlog drains from both ends (DESIGN.md §2, "Backlog";
 * bench/RESULTS.md, B6). In steady state nothing changes: batches go oldest first. */
static int backlog_share_due(const struct agent_forwarder *f)
{
    struct agent_spool_stats st;
    if (f->last_newest)
        return 0;
    for (size_t i = 0; i < f->nslots; i++)
        if (f->slots[i].used && f->slots[i].newest)
            return 0;
    agent_spool_stats(f->spool, &st);
    return st.pending_records > f->inflight_records + 2 * (uint64_t)f->cfg->batch_max_records;
}

/* Claim segments and loss entries and start one batch. Returns 1 if a batch was started. */
static int start_batch(struct agent_forwarder *f, int64_t now, int with_segments)
{
    struct agent_spool_seg *segs = NULL;
    struct cis_segment *views = NULL;
    Cistern__V1__LossEntry *losses = NULL;
    const Cistern__V1__LossEntry **lp = NULL;
    struct agent_spool_stats st;
    size_t nseg = 0, nloss = 0;
    struct slot *slot = NULL;
    uint8_t *body = NULL;
    size_t body_len;
    int started = 0, rc;

    for (size_t i = 0; i < f->nslots && !slot; i++)
        if (!f->slots[i].used)
            slot = &f->slots[i];
    if (!slot)
        return 0;
    if (with_segments) {
        int newest = backlog_share_due(f);
        rc = (newest ? agent_spool_claim_newest : agent_spool_claim)(
            f->spool, (size_t)f->cfg->batch_max_records, (size_t)f->cfg->batch_max_bytes, &segs,
            &nseg);
        f->last_newest = newest;
        slot->newest = newest;
        if (rc) {
            cis_warn("[forward] cannot read the spool: %s", cis_strerror(rc));
            agent_spool_failed(f->a, rc);
            f->retry_at = now + 1000;
            return 0;
        }
        /* Stored but nothing claimable: what is left has expired (the TTL sweep will ledger
         * it) or is in flight. Wait for new records or a release instead of asking again. */
        if (nseg == 0)
            f->due_at = -1;
    }
    if (!f->ledger_in_flight && !(f->ledger_alone && nseg)) {
        rc = agent_spool_ledger_unsent(f->spool, LEDGER_PER_BATCH, &losses, &nloss);
        if (rc) {
            agent_spool_failed(f->a, rc);
            losses = NULL;
            nloss = 0;
        }
    }
    if (nseg == 0 && nloss == 0)
        goto out;

    agent_spool_stats(f->spool, &st);
    slot->first_seqs = calloc(nseg ? nseg : 1, sizeof(uint64_t));
    slot->ledger_ids = calloc(nloss ? nloss : 1, sizeof(uint64_t));
    views = calloc(nseg ? nseg : 1, sizeof(*views));
    lp = calloc(nloss ? nloss : 1, sizeof(*lp));
    if (!slot->first_seqs || !slot->ledger_ids || !views || !lp)
        goto fail;
    for (size_t i = 0; i < nseg; i++) {
        views[i] = segs[i].seg;
        slot->first_seqs[i] = segs[i].seg.first_seq;
        slot->nrecords += segs[i].seg.record_count;
    }
    for (size_t i = 0; i < nloss; i++) {
        lp[i] = &losses[i];
        slot->ledger_ids[i] = losses[i].id;
    }
    slot->nseg = nseg;
    slot->nledger = nloss;
    {
        int64_t wall = cis_wall_ms();
        struct cis_batch_meta meta = {
            .agent_id = f->cfg->id,
            .epoch = agent_spool_epoch(f->spool),
            .created_ms = wall,
            .spool_depth = st.pending_records,
            .oldest_pending_ms = st.oldest_created_ms && wall > st.oldest_created_ms
                                     ? wall - st.oldest_created_ms : 0,
            .losses = lp,
            .nlosses = nloss,
        };
        uint8_t *batch = NULL;
        size_t batch_len;
        if (cis_batch_encode(&meta, views, nseg, &batch, &batch_len) != 0)
            goto fail;
        rc = cis_signer_wrap(f->signer, f->cfg->id, batch, batch_len, &body, &body_len);
        free(batch);
        if (rc) {
            cis_warn("[forward] cannot sign a batch: %s", cis_strerror(rc));
            goto fail;
        }
    }
    slot->used = 1;
    slot->token = ++f->next_token;
    f->inflight++;
    f->inflight_records += slot->nrecords;
    if (nloss)
        f->ledger_in_flight = 1;
    if (f->tops->send(f->t, body, body_len, slot->token) != 0) {
        /* send() freed the body. */
        f->inflight--;
        f->inflight_records -= slot->nrecords;
        if (nloss)
            f->ledger_in_flight = 0;
        goto fail;
    }
    started = 1;
    goto out;
fail:
    if (nseg)
        agent_spool_release(f->spool, slot->first_seqs, nseg);
    slot_clear(slot);
    f->retry_at = now + 1000;
out:
    free(views);
    free(lp);
    agent_spool_segs_free(segs, nseg);
    agent_spool_ledger_free(losses, nloss);
    return started;
}

int64_t agent_forwarder_tick(struct agent_forwarder *f, int64_t now, int draining)
{
    int64_t next = f->tops->tick(f->t, now);
    struct agent_spool_stats st;

    /* Draining (shutdown): flush what is committed while the receiver takes it, but start
     * nothing once it fails; the rest waits in the spool for the next start. */
    if (draining && f->failing)
        return next;
    if (draining)
        f->due_at = now;
    if (now < f->retry_at)
        return next < 0 || f->retry_at < next ? f->retry_at : next;
    while (f->inflight < (f->failing ? 1u : f->nslots)) {
        uint64_t unclaimed;
        agent_spool_stats(f->spool, &st);
        if (f->ledger_alone && !f->ledger_in_flight) {
            /* Loss entries set apart go first, on their own. */
            if (st.ledger_unsent && start_batch(f, now, 0))
                continue;
            f->ledger_alone = 0;
        }
        unclaimed = st.pending_records - f->inflight_records;
        if (st.pending_segments <= st.inflight_segments) {
            /* Nothing left to claim; loss entries may still need a ride. */
            f->due_at = -1;
            if (st.ledger_unsent && !f->ledger_in_flight && f->inflight == 0)
                start_batch(f, now, 0);
            break;
        }
        if (unclaimed < (uint64_t)f->cfg->batch_max_records && (f->due_at < 0 || now < f->due_at))
            break;
        if (!start_batch(f, now, 1))
            break;
        agent_spool_stats(f->spool, &st);
        /* What is left unclaimed now is a backlog: it is due at once. */
        f->due_at = st.pending_segments > st.inflight_segments ? now : -1;
    }
    if (f->retry_at > now) /* a failed start: try again then, not in a busy loop */
        return next < 0 || f->retry_at < next ? f->retry_at : next;
    if (f->due_at >= 0 && f->inflight < (f->failing ? 1u : f->nslots) &&
        (next < 0 || f->due_at < next))
        next = f->due_at > now ? f->due_at : now + 1;
    return next;
}

void agent_forwarder_notify(struct agent_forwarder *f, int64_t now)
{
    if (f->due_at < 0)
        f->due_at = now + f->cfg->batch_max_delay_ms;
}

size_t agent_forwarder_in_flight(const struct agent_forwarder *f)
{
    return f->inflight;
}

int agent_forwarder_idle(const struct agent_forwarder *f)
{
    struct agent_spool_stats st;
    if (f->inflight)
        return 0;
    agent_spool_stats(f->spool, &st);
    return f->failing || (st.pending_segments == 0 && st.ledger_unsent == 0);
}

void agent_forwarder_abort(struct agent_forwarder *f)
{
    f->aborting = 1;
    f->tops->abort_all(f->t);
    f->aborting = 0;
}

void agent_forwarder_set_spool(struct agent_forwarder *f, struct agent_spool *spool)
{
    struct agent_spool_stats st;

    /* The old spool's seqs mean nothing in the new one: a slot still holding them would ack
     * or reject segments of the wrong database. */
    for (size_t i = 0; i < f->nslots; i++) {
        if (f->slots[i].used) {
            cis_error("[forward] spool replaced with a batch still in flight (a bug): its "
                      "answer will be ignored");
            slot_clear(&f->slots[i]);
        }
    }
    f->inflight = 0;
    f->inflight_records = 0;
    f->ledger_in_flight = 0;
    f->ledger_alone = 0;
    f->spool = spool;
    agent_spool_stats(spool, &st);
    /* The fresh spool's backlog (or its corrupt_spool ledger row) goes out at once; the
     * link's backoff state is kept, it has nothing to do with the spool. */
    f->due_at = st.pending_segments ? cis_mono_ms() : -1;
}

void agent_forwarder_link(const struct agent_forwarder *f, struct agent_link *out)
{
    *out = f->link;
    out->in_flight = f->inflight;
}

void agent_forwarder_destroy(struct agent_forwarder *f)
{
    if (!f)
        return;
    f->tops->destroy(f->t);
    for (size_t i = 0; i < f->nslots; i++)
        slot_clear(&f->slots[i]);
    free(f->slots);
    cis_signer_free(f->signer);
    free(f);
}
