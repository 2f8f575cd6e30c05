/* Receiver store interface: the backend table and the checks shared by all backends. */
#include "store/store.h"

#include <inttypes.h>
#include <stdio.h>
#include <string.h>

#include <cistern/err.h>

static const struct recv_store_ops *const backends[] = {&recv_store_sqlite, NULL};

const struct recv_store_ops *recv_store_find(const char *name)
{
    for (size_t i = 0; backends[i] != NULL; i++)
        if (strcmp(backends[i]->name, name) == 0)
            return backends[i];
    return NULL;
}

int recv_batch_check(const struct cis_decoded_batch *b, char *why, size_t whylen)
{
    const Cistern__V1__BatchHeader *h = b->pb->header;

    /* Stores keep epochs and seqs in signed 64-bit INTEGER columns: the top bit must be 0. */
    if (h->epoch == 0 || h->epoch > (uint64_t)INT64_MAX) {
        snprintf(why, whylen, "epoch %" PRIu64 " out of range (1..2^63-1)", h->epoch);
        return CIS_EDECODE;
    }
    for (size_t i = 0; i < b->nsegs; i++) {
        const Cistern__V1__Segment *sg = b->segs[i].seg;
        if (sg->last_seq > (uint64_t)INT64_MAX || sg->first_seq > sg->last_seq) {
            snprintf(why, whylen, "segment %zu: seq range out of range", i);
            return CIS_EDECODE;
        }
    }
    for (size_t i = 0; i < h->n_losses; i++) {
        const Cistern__V1__LossEntry *l = h->losses[i];
        /* Epoch 0 means "unknown": only a corrupt_spool entry, whose old spool could not be
         * read, may carry it. */
        int unknown_ok = l->reason && strcmp(l->reason, "corrupt_spool") == 0;
        if ((l->epoch == 0 && !unknown_ok) || l->epoch > (uint64_t)INT64_MAX) {
            snprintf(why, whylen, "loss entry %zu: epoch out of range (1..2^63-1)", i);
            return CIS_EDECODE;
        }
        if (l->first_seq > (uint64_t)INT64_MAX || l->last_seq > (uint64_t)INT64_MAX ||
            l->count > (uint64_t)INT64_MAX || l->id > (uint64_t)INT64_MAX) {
            snprintf(why, whylen, "loss entry %zu: value out of range", i);
            return CIS_EDECODE;
        }
    }
    return 0;
}
