/* Receiver read side: JSON helpers and the JSON bodies of the read API and ingest answer. */
#include "api.h"

#include <errno.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cistern/err.h>

static int buf_reserve(struct recv_buf *b, size_t extra)
{
    size_t need, cap;
    char *p;

    if (b->oom)
        return -1;
    need = b->len + extra + 1;
    if (need <= b->cap)
        return 0;
    cap = b->cap ? b->cap : 256;
    while (cap < need)
        cap *= 2;
    p = realloc(b->p, cap);
    if (p == NULL) {
        b->oom = 1;
        return -1;
    }
    b->p = p;
    b->cap = cap;
    return 0;
}

void recv_buf_add(struct recv_buf *b, const char *s, size_t n)
{
    if (buf_reserve(b, n))
        return;
    memcpy(b->p + b->len, s, n);
    b->len += n;
    b->p[b->len] = '\0';
}

void recv_buf_addf(struct recv_buf *b, const char *fmt, ...)
{
    va_list ap;
    int n;

    va_start(ap, fmt);
    n = vsnprintf(NULL, 0, fmt, ap);
    va_end(ap);
    if (n < 0 || buf_reserve(b, (size_t)n))
        return;
    va_start(ap, fmt);
    vsnprintf(b->p + b->len, (size_t)n + 1, fmt, ap);
    va_end(ap);
    b->len += (size_t)n;
}

/* Length of the valid UTF-8 sequence at S (at most N bytes), or 0 when invalid. */
static size_t utf8_seq(const uint8_t *s, size_t n)
{
    uint32_t c;
    size_t len;

    if (s[0] < 0x80)
        return 1;
    if (s[0] >= 0xc2 && s[0] <= 0xdf)
        len = 2, c = s[0] & 0x1f;
    else if (s[0] >= 0xe0 && s[0] <= 0xef)
        len = 3, c = s[0] & 0x0f;
    else if (s[0] >= 0xf0 && s[0] <= 0xf4)
        len = 4, c = s[0] & 0x07;
    else
        return 0;
    if (len > n)
        return 0;
    for (size_t i = 1; i < len; i++) {
        if ((s[i] & 0xc0) != 0x80)
            return 0;
        c = (c << 6) | (s[i] & 0x3f);
    }
    if ((len == 3 && c < 0x800) || (len == 4 && (c < 0x10000 || c > 0x10ffff)) ||
        (c >= 0xd800 && c <= 0xdfff))
        return 0;
    return len;
}

int recv_utf8_valid(const uint8_t *s, size_t n)
{
    size_t i = 0;
    while (i < n) {
        size_t l = utf8_seq(s + i, n - i);
        if (l == 0)
            return 0;
        i += l;
    }
    return 1;
}

void recv_buf_json_str(struct recv_buf *b, const char *str, size_t n)
{
    const uint8_t *s = (const uint8_t *)str;
    size_t i = 0, run = 0;

    recv_buf_add(b, "\"", 1);
    while (i < n) {
        uint8_t c = s[i];
        const char *esc = NULL;
        char u[8];
        size_t l = utf8_seq(s + i, n - i);

        if (l == 1 && c >= 0x20 && c != '"' && c != '\\') {
            i++;
            run++;
            continue;
        }
        if (l > 1) {
            i += l;
            run += l;
            continue;
        }
        recv_buf_add(b, (const char *)s + i - run, run);
        run = 0;
        if (l == 0) {
            esc = "\\ufffd"; /* invalid UTF-8 byte */
        } else if (c == '"') {
            esc = "\\\"";
        } else if (c == '\\') {
            esc = "\\\\";
        } else if (c == '\n') {
            esc = "\\n";
        } else if (c == '\r') {
            esc = "\\r";
        } else if (c == '\t') {
            esc = "\\t";
        } else {
            snprintf(u, sizeof u, "\\u%04x", c);
            esc = u;
        }
        recv_buf_add(b, esc, strlen(esc));
        i++;
    }
    recv_buf_add(b, (const char *)s + i - run, run);
    recv_buf_add(b, "\"", 1);
}

void recv_buf_base64(struct recv_buf *b, const uint8_t *s, size_t n)
{
    static const char tbl[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    char *o;
    size_t i;

    if (buf_reserve(b, (n + 2) / 3 * 4))
        return;
    o = b->p + b->len;
    for (i = 0; i + 2 < n; i += 3) {
        uint32_t v = (uint32_t)s[i] << 16 | (uint32_t)s[i + 1] << 8 | s[i + 2];
        *o++ = tbl[v >> 18];
        *o++ = tbl[(v >> 12) & 63];
        *o++ = tbl[(v >> 6) & 63];
        *o++ = tbl[v & 63];
    }
    if (i < n) {
        uint32_t v = (uint32_t)s[i] << 16 | (i + 1 < n ? (uint32_t)s[i + 1] << 8 : 0);
        *o++ = tbl[v >> 18];
        *o++ = tbl[(v >> 12) & 63];
        *o++ = i + 1 < n ? tbl[(v >> 6) & 63] : '=';
        *o++ = '=';
    }
    b->len = (size_t)(o - b->p);
    b->p[b->len] = '\0';
}

char *recv_buf_take(struct recv_buf *b, size_t *len)
{
    char *p = NULL;

    if (!b->oom) {
        if (b->p == NULL)
            recv_buf_add(b, "", 0);
        p = b->oom ? NULL : b->p;
        if (p != NULL)
            *len = b->len;
    }
    if (p == NULL)
        free(b->p);
    memset(b, 0, sizeof *b);
    return p;
}

void recv_buf_free(struct recv_buf *b)
{
    if (b == NULL)
        return;
    free(b->p);
    memset(b, 0, sizeof *b);
}

void recv_json_error(struct recv_buf *b, const char *msg)
{
    recv_buf_add(b, "{\"error\":", 9);
    recv_buf_json_str(b, msg, strlen(msg));
    recv_buf_add(b, "}", 1);
}

struct list_ctx {
    struct recv_buf *b;
    int n;
};

static int agent_row(void *ud, const struct recv_agent_info *a)
{
    struct list_ctx *c = ud;

    if (c->n++)
        recv_buf_add(c->b, ",", 1);
    recv_buf_add(c->b, "{\"id\":", 6);
    recv_buf_json_str(c->b, a->id, strlen(a->id));
    recv_buf_addf(c->b,
                  ",\"first_seen_ms\":%" PRId64 ",\"last_seen_ms\":%" PRId64
                  ",\"spool_depth\":%" PRId64 ",\"oldest_pending_ms\":%" PRId64
                  ",\"records\":%" PRId64 ",\"replayed_batches\":%" PRId64 "}",
                  a->first_seen_ms, a->last_seen_ms, a->spool_depth, a->oldest_pending_ms,
                  a->records, a->replayed_batches);
    return c->b->oom ? CIS_ENOMEM : 0;
}

int recv_api_agents(const struct recv_store_ops *ops, struct recv_store *st, struct recv_buf *b)
{
    struct list_ctx c = {.b = b};
    int rc;

    recv_buf_add(b, "{\"agents\":[", 11);
    rc = ops->list_agents(st, agent_row, &c);
    if (rc)
        return rc;
    recv_buf_add(b, "]}", 2);
    return b->oom ? CIS_ENOMEM : 0;
}

struct rec_ctx {
    struct recv_buf *b;
    int n;
    uint64_t last_seq;
};

static int record_row(void *ud, const struct recv_record_view *r)
{
    struct rec_ctx *c = ud;

    recv_buf_addf(c->b,
                  "%s{\"epoch\":\"%" PRIu64 "\",\"seq\":%" PRIu64 ",\"ts\":%" PRId64
                  ",\"received_ms\":%" PRId64 ",\"stream\":",
                  c->n++ ? "," : "", r->epoch, r->seq, r->ts_ms, r->received_ms);
    recv_buf_json_str(c->b, r->stream, strlen(r->stream));
    if (r->content_type != NULL) {
        recv_buf_add(c->b, ",\"content_type\":", 16);
        recv_buf_json_str(c->b, r->content_type, strlen(r->content_type));
    }
    recv_buf_add(c->b, ",\"payload\":", 11);
    if (recv_utf8_valid(r->payload, r->payload_len)) {
        recv_buf_json_str(c->b, (const char *)r->payload, r->payload_len);
    } else {
        recv_buf_add(c->b, "\"", 1);
        recv_buf_base64(c->b, r->payload, r->payload_len);
        recv_buf_add(c->b, "\",\"payload_base64\":true", 23);
    }
    recv_buf_add(c->b, "}", 1);
    c->last_seq = r->seq;
    return c->b->oom ? CIS_ENOMEM : 0;
}

int recv_api_records(const struct recv_store_ops *ops, struct recv_store *st,
                     const struct recv_records_query *q, struct recv_buf *b)
{
    struct rec_ctx c = {.b = b, .last_seq = q->after};
    int rc;

    recv_buf_add(b, "{\"records\":[", 12);
    rc = ops->get_records(st, q, record_row, &c);
    if (rc)
        return rc;
    recv_buf_addf(b, "],\"next_after\":%" PRIu64 "}", c.last_seq);
    return b->oom ? CIS_ENOMEM : 0;
}

/* Parse a decimal in 0..MAX. */
static int parse_u64(const char *s, uint64_t max, uint64_t *out)
{
    char *end;
    unsigned long long v;

    if (s == NULL || s[0] < '0' || s[0] > '9')
        return -1;
    errno = 0;
    v = strtoull(s, &end, 10);
    if (errno != 0 || *end != '\0' || v > max)
        return -1;
    *out = v;
    return 0;
}

/* The epoch= parameter shared by the records and gaps routes: absent, or 1..2^63-1. */
static int parse_epoch(const char *epoch, int *has_epoch, uint64_t *out, char *why, size_t whylen)
{
    uint64_t v;

    *has_epoch = 0;
    *out = 0;
    if (epoch == NULL)
        return 0;
    if (parse_u64(epoch, (uint64_t)INT64_MAX, &v) || v == 0) {
        snprintf(why, whylen, "epoch: want a decimal epoch (1..2^63-1)");
        return CIS_EINVAL;
    }
    *has_epoch = 1;
    *out = v;
    return 0;
}

int recv_api_parse_records_query(const char *after, const char *limit, const char *epoch,
                                 struct recv_records_query *q, char *why, size_t whylen)
{
    uint64_t v;

    q->after = 0;
    q->limit = RECV_RECORDS_LIMIT_DEFAULT;
    q->has_epoch = 0;
    q->epoch = 0;
    if (after != NULL) {
        if (parse_u64(after, (uint64_t)INT64_MAX, &v)) {
            snprintf(why, whylen, "after: not a sequence number (0..2^63-1)");
            return CIS_EINVAL;
        }
        q->after = v;
    }
    if (limit != NULL) {
        if (parse_u64(limit, RECV_RECORDS_LIMIT_MAX, &v) || v == 0) {
            snprintf(why, whylen, "limit: want 1..%d", RECV_RECORDS_LIMIT_MAX);
            return CIS_EINVAL;
        }
        q->limit = (unsigned)v;
    }
    return parse_epoch(epoch, &q->has_epoch, &q->epoch, why, whylen);
}

int recv_api_parse_gaps_query(const char *epoch, struct recv_gaps_query *q, char *why,
                              size_t whylen)
{
    q->max_gaps = RECV_GAPS_MAX;
    return parse_epoch(epoch, &q->has_epoch, &q->epoch, why, whylen);
}

/* Append S as a JSON string, or null when S is NULL. */
static void json_str_or_null(struct recv_buf *b, const char *s)
{
    if (s == NULL)
        recv_buf_add(b, "null", 4);
    else
        recv_buf_json_str(b, s, strlen(s));
}

static int loss_row(void *ud, const struct recv_loss_view *l)
{
    struct list_ctx *c = ud;

    recv_buf_addf(c->b, "%s{\"origin_epoch\":\"%" PRIu64 "\",\"id\":%" PRIu64 ",\"reason\":",
                  c->n++ ? "," : "", l->origin_epoch, l->id);
    recv_buf_json_str(c->b, l->reason, strlen(l->reason));
    recv_buf_addf(c->b,
                  ",\"epoch\":\"%" PRIu64 "\",\"first_seq\":%" PRIu64 ",\"last_seq\":%" PRIu64
                  ",\"count\":%" PRIu64 ",\"ts_ms\":%" PRId64 ",\"detail\":",
                  l->epoch, l->first_seq, l->last_seq, l->count, l->ts_ms);
    json_str_or_null(c->b, l->detail);
    recv_buf_addf(c->b, ",\"received_ms\":%" PRId64 "}", l->received_ms);
    return c->b->oom ? CIS_ENOMEM : 0;
}

int recv_api_losses(const struct recv_store_ops *ops, struct recv_store *st, const char *agent_id,
                    struct recv_buf *b)
{
    struct list_ctx c = {.b = b};
    int rc;

    recv_buf_add(b, "{\"agent_id\":", 12);
    recv_buf_json_str(b, agent_id, strlen(agent_id));
    recv_buf_add(b, ",\"losses\":[", 11);
    rc = ops->get_losses(st, agent_id, loss_row, &c);
    if (rc)
        return rc;
    recv_buf_add(b, "]}", 2);
    return b->oom ? CIS_ENOMEM : 0;
}

static int epoch_gaps_row(void *ud, const struct recv_epoch_gaps *e)
{
    struct list_ctx *c = ud;

    recv_buf_addf(c->b,
                  "%s{\"epoch\":\"%" PRIu64 "\",\"received\":%" PRIu64 ",\"highest_seq\":%" PRIu64
                  ",\"gaps\":[",
                  c->n++ ? "," : "", e->epoch, e->received, e->highest_seq);
    for (size_t i = 0; i < e->ngaps; i++) {
        const struct recv_gap *g = &e->gaps[i];
        recv_buf_addf(c->b,
                      "%s{\"first_seq\":%" PRIu64 ",\"last_seq\":%" PRIu64 ",\"count\":%" PRIu64
                      ",\"status\":",
                      i ? "," : "", g->first_seq, g->last_seq, g->last_seq - g->first_seq + 1);
        if (g->reason != NULL) {
            /* The status is built whole, then escaped as one string. */
            struct recv_buf status = {0};
            recv_buf_addf(&status, "dropped at the edge: %s", g->reason);
            if (status.oom) {
                recv_buf_free(&status);
                return CIS_ENOMEM;
            }
            recv_buf_json_str(c->b, status.p, status.len);
            recv_buf_free(&status);
        } else {
            recv_buf_add(c->b, "\"not yet received\"", 18);
        }
        recv_buf_add(c->b, ",\"reason\":", 10);
        json_str_or_null(c->b, g->reason);
        recv_buf_add(c->b, "}", 1);
    }
    recv_buf_addf(c->b, "],\"truncated\":%s}", e->truncated ? "true" : "false");
    return c->b->oom ? CIS_ENOMEM : 0;
}

int recv_api_gaps(const struct recv_store_ops *ops, struct recv_store *st,
                  const struct recv_gaps_query *q, struct recv_buf *b)
{
    struct list_ctx c = {.b = b};
    int rc;

    recv_buf_add(b, "{\"agent_id\":", 12);
    recv_buf_json_str(b, q->agent_id, strlen(q->agent_id));
    recv_buf_add(b, ",\"epochs\":[", 11);
    rc = ops->get_gaps(st, q, epoch_gaps_row, &c);
    if (rc)
        return rc;
    recv_buf_add(b, "]}", 2);
    return b->oom ? CIS_ENOMEM : 0;
}

void recv_api_ingest_answer(const struct cis_decoded_batch *b, const struct recv_put_result *r,
                            struct recv_buf *out)
{
    uint64_t epoch = b->pb->header->epoch;

    recv_buf_addf(out, "{\"accepted\":%" PRIu64 ",\"duplicates\":%" PRIu64 ",\"acked\":[",
                  r->accepted, r->duplicates);
    for (size_t i = 0; i < b->nsegs; i++)
        recv_buf_addf(out, "%s[\"%" PRIu64 "\",%" PRIu64 ",%" PRIu64 "]", i ? "," : "", epoch,
                      b->segs[i].seg->first_seq, b->segs[i].seg->last_seq);
    recv_buf_add(out, "]}", 2);
}
