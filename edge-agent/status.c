/* `cistern-agent status`: what a technician needs to know about a gateway, read from the spool
 * file (read-only, one short transaction) and from the running agent's control socket. */
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <poll.h>
#include <signal.h>
#include <sqlite3.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include "agent.h"
#include "cistern/backoff.h"
#include "cistern/err.h"
#include "spool.h"

#define STATUS_DEFAULT_CONFIG "/etc/cistern/agent.yaml"
#define STATUS_ANSWER_MAX (64 * 1024) /* the agent's object is ~1 KiB; more is not our agent */
#define STATUS_ASK_TIMEOUT_MS 2000
#define STATUS_DB_BUSY_MS 1000
#define JSON_MAX_DEPTH 32

static const char *const prio_names[CIS_PRIO_COUNT] = {"high", "normal", "low"};

/* Every reason the spool writes; all are always reported, so a zero is visible as a zero. */
static const char *const loss_reasons[] = {"evicted_full", "expired_ttl", "rejected",
                                           "corrupt_spool", "tampered"};
#define NREASONS (sizeof(loss_reasons) / sizeof(loss_reasons[0]))
#define MAX_LOSSES (NREASONS + 8) /* room for reasons a newer agent may add */

/* ---- a small JSON reader, for the agent's answer ---- */

enum { JN_NULL, JN_FALSE, JN_TRUE, JN_NUM, JN_STR, JN_ARR, JN_OBJ };

struct jnode {
    int type;
    char *key;           /* member name, inside an object */
    char *text;          /* JN_STR: the decoded UTF-8 (no NUL inside); JN_NUM: the lexeme */
    struct jnode *child; /* first member or element */
    struct jnode *next;  /* next sibling */
};

struct jparser {
    const char *p, *end;
    int depth;
};

/* Free N, its children and its siblings. Accepts NULL. */
static void jfree(struct jnode *n)
{
    while (n) {
        struct jnode *next = n->next;
        jfree(n->child);
        free(n->key);
        free(n->text);
        free(n);
        n = next;
    }
}

static void jp_ws(struct jparser *j)
{
    while (j->p < j->end && (*j->p == ' ' || *j->p == '\t' || *j->p == '\n' || *j->p == '\r'))
        j->p++;
}

static int hex4(const char *q, const char *end, unsigned *out)
{
    unsigned v = 0;
    if (end - q < 4)
        return 0;
    for (int i = 0; i < 4; i++) {
        char c = q[i];
        v <<= 4;
        if (c >= '0' && c <= '9')
            v |= (unsigned)(c - '0');
        else if (c >= 'a' && c <= 'f')
            v |= (unsigned)(c - 'a' + 10);
        else if (c >= 'A' && c <= 'F')
            v |= (unsigned)(c - 'A' + 10);
        else
            return 0;
    }
    *out = v;
    return 1;
}

static size_t utf8_put(char *o, unsigned cp)
{
    if (cp < 0x80) {
        o[0] = (char)cp;
        return 1;
    }
    if (cp < 0x800) {
        o[0] = (char)(0xc0 | (cp >> 6));
        o[1] = (char)(0x80 | (cp & 0x3f));
        return 2;
    }
    if (cp < 0x10000) {
        o[0] = (char)(0xe0 | (cp >> 12));
        o[1] = (char)(0x80 | ((cp >> 6) & 0x3f));
        o[2] = (char)(0x80 | (cp & 0x3f));
        return 3;
    }
    o[0] = (char)(0xf0 | (cp >> 18));
    o[1] = (char)(0x80 | ((cp >> 12) & 0x3f));
    o[2] = (char)(0x80 | ((cp >> 6) & 0x3f));
    o[3] = (char)(0x80 | (cp & 0x3f));
    return 4;
}

/* A string literal at j->p, decoded; caller frees. NULL if malformed. \u0000 and lone
 * surrogates become U+FFFD: the result is a C string. Never longer than its literal. */
static char *jp_string(struct jparser *j)
{
    const char *s, *q;
    char *out, *o;

    if (j->p >= j->end || *j->p != '"')
        return NULL;
    s = ++j->p;
    while (j->p < j->end && *j->p != '"') {
        if ((unsigned char)*j->p < 0x20)
            return NULL;
        if (*j->p == '\\' && ++j->p >= j->end)
            return NULL;
        j->p++;
    }
    if (j->p >= j->end)
        return NULL;
    out = malloc((size_t)(j->p - s) + 1);
    if (!out)
        return NULL;
    o = out;
    for (q = s; q < j->p;) {
        unsigned cp, lo;
        if (*q != '\\') {
            *o++ = *q++;
            continue;
        }
        q++;
        switch (*q++) {
        case '"': *o++ = '"'; break;
        case '\\': *o++ = '\\'; break;
        case '/': *o++ = '/'; break;
        case 'b': *o++ = '\b'; break;
        case 'f': *o++ = '\f'; break;
        case 'n': *o++ = '\n'; break;
        case 'r': *o++ = '\r'; break;
        case 't': *o++ = '\t'; break;
        case 'u':
            if (!hex4(q, j->p, &cp))
                goto bad;
            q += 4;
            if (cp >= 0xd800 && cp <= 0xdbff && j->p - q >= 6 && q[0] == '\\' && q[1] == 'u' &&
                hex4(q + 2, j->p, &lo) && lo >= 0xdc00 && lo <= 0xdfff) {
                cp = 0x10000 + ((cp - 0xd800) << 10) + (lo - 0xdc00);
                q += 6;
            }
            if (cp == 0 || (cp >= 0xd800 && cp <= 0xdfff))
                cp = 0xfffd;
            o += utf8_put(o, cp);
            break;
        default: goto bad;
        }
    }
    *o = '\0';
    j->p++; /* the closing quote */
    return out;
bad:
    free(out);
    return NULL;
}

/* Length of a JSON number at j->p (RFC 8259 grammar), 0 if there is none. */
static size_t jp_number_len(const struct jparser *j)
{
    const char *p = j->p, *e = j->end;
    if (p < e && *p == '-')
        p++;
    if (p < e && *p == '0') {
        p++;
    } else if (p < e && *p >= '1' && *p <= '9') {
        while (p < e && *p >= '0' && *p <= '9')
            p++;
    } else {
        return 0;
    }
    if (p < e && *p == '.') {
        if (++p >= e || *p < '0' || *p > '9')
            return 0;
        while (p < e && *p >= '0' && *p <= '9')
            p++;
    }
    if (p < e && (*p == 'e' || *p == 'E')) {
        p++;
        if (p < e && (*p == '+' || *p == '-'))
            p++;
        if (p >= e || *p < '0' || *p > '9')
            return 0;
        while (p < e && *p >= '0' && *p <= '9')
            p++;
    }
    return (size_t)(p - j->p);
}

static int jp_literal(struct jparser *j, const char *word)
{
    size_t n = strlen(word);
    if ((size_t)(j->end - j->p) < n || memcmp(j->p, word, n) != 0)
        return 0;
    j->p += n;
    return 1;
}

static struct jnode *jp_value(struct jparser *j)
{
    struct jnode *n, **tail;
    size_t len;

    jp_ws(j);
    if (j->p >= j->end || j->depth >= JSON_MAX_DEPTH)
        return NULL;
    n = calloc(1, sizeof(*n));
    if (!n)
        return NULL;
    tail = &n->child;
    switch (*j->p) {
    case '{':
    case '[': {
        int obj = *j->p == '{';
        char close = obj ? '}' : ']';
        n->type = obj ? JN_OBJ : JN_ARR;
        j->p++;
        j->depth++;
        jp_ws(j);
        if (j->p < j->end && *j->p == close) {
            j->p++;
            j->depth--;
            break;
        }
        for (;;) {
            char *key = NULL;
            struct jnode *v;
            if (obj) {
                jp_ws(j);
                key = jp_string(j);
                jp_ws(j);
                if (!key || j->p >= j->end || *j->p != ':') {
                    free(key);
                    goto bad;
                }
                j->p++;
            }
            v = jp_value(j);
            if (!v) {
                free(key);
                goto bad;
            }
            v->key = key;
            *tail = v;
            tail = &v->next;
            jp_ws(j);
            if (j->p < j->end && *j->p == ',') {
                j->p++;
                continue;
            }
            if (j->p < j->end && *j->p == close) {
                j->p++;
                break;
            }
            goto bad;
        }
        j->depth--;
        break;
    }
    case '"':
        n->type = JN_STR;
        if (!(n->text = jp_string(j)))
            goto bad;
        break;
    case 't':
        n->type = JN_TRUE;
        if (!jp_literal(j, "true"))
            goto bad;
        break;
    case 'f':
        n->type = JN_FALSE;
        if (!jp_literal(j, "false"))
            goto bad;
        break;
    case 'n':
        n->type = JN_NULL;
        if (!jp_literal(j, "null"))
            goto bad;
        break;
    default:
        n->type = JN_NUM;
        len = jp_number_len(j);
        if (!len || !(n->text = strndup(j->p, len)))
            goto bad;
        j->p += len;
    }
    return n;
bad:
    jfree(n);
    return NULL;
}

/* Parse TEXT (LEN bytes) as exactly one JSON value, whitespace around it allowed. Returns the
 * tree (caller frees with jfree()) or NULL when it is not valid JSON or nests too deep. */
static struct jnode *jparse(const char *text, size_t len)
{
    struct jparser j = {.p = text, .end = text + len};
    struct jnode *n = jp_value(&j);
    if (!n)
        return NULL;
    jp_ws(&j);
    if (j.p != j.end) {
        jfree(n);
        return NULL;
    }
    return n;
}

/* The member at dotted PATH ("link.state") below object N, or NULL. */
static const struct jnode *jget(const struct jnode *n, const char *path)
{
    while (n && *path) {
        const char *dot = strchr(path, '.');
        size_t len = dot ? (size_t)(dot - path) : strlen(path);
        const struct jnode *c;
        if (n->type != JN_OBJ)
            return NULL;
        for (c = n->child; c; c = c->next)
            if (strlen(c->key) == len && memcmp(c->key, path, len) == 0)
                break;
        n = c;
        path += len + (dot ? 1 : 0);
    }
    return n;
}

static const char *jstr(const struct jnode *n, const char *path)
{
    n = jget(n, path);
    return n && n->type == JN_STR ? n->text : NULL;
}

static int jtrue(const struct jnode *n, const char *path)
{
    n = jget(n, path);
    return n && n->type == JN_TRUE;
}

/* A non-negative integer member, or DEF when it is missing or not one. */
static uint64_t ju64(const struct jnode *n, const char *path, uint64_t def)
{
    char *end;
    unsigned long long v;
    n = jget(n, path);
    if (!n || n->type != JN_NUM || n->text[0] == '-')
        return def;
    errno = 0;
    v = strtoull(n->text, &end, 10);
    if (errno || *end)
        return def;
    return (uint64_t)v;
}

/* Write N as JSON. Strings go through agent_json_str(), so the output is valid UTF-8 JSON. */
static void jwrite(FILE *f, const struct jnode *n)
{
    const struct jnode *c;
    switch (n->type) {
    case JN_NULL: fputs("null", f); break;
    case JN_FALSE: fputs("false", f); break;
    case JN_TRUE: fputs("true", f); break;
    case JN_NUM: fputs(n->text, f); break;
    case JN_STR: agent_json_str(f, n->text); break;
    default:
        fputc(n->type == JN_OBJ ? '{' : '[', f);
        for (c = n->child; c; c = c->next) {
            if (c != n->child)
                fputc(',', f);
            if (n->type == JN_OBJ) {
                agent_json_str(f, c->key);
                fputc(':', f);
            }
            jwrite(f, c);
        }
        fputc(n->type == JN_OBJ ? '}' : ']', f);
    }
}

/* ---- human formatting ---- */

/* "12,345" */
static const char *fmt_count(char *buf, size_t len, uint64_t v)
{
    char digits[32];
    int n = snprintf(digits, sizeof(digits), "%" PRIu64, v);
    size_t o = 0;
    for (int i = 0; i < n && o + 1 < len; i++) {
        if (i && (n - i) % 3 == 0 && o + 2 < len)
            buf[o++] = ',';
        buf[o++] = digits[i];
    }
    buf[o < len ? o : len - 1] = '\0';
    return buf;
}

/* "512 B", "2.1 MiB", "512 MiB" (binary units, one decimal unless it is .0) */
static const char *fmt_bytes(char *buf, size_t len, uint64_t v)
{
    static const char *const units[] = {"KiB", "MiB", "GiB", "TiB"};
    double d = (double)v;
    size_t u = 0;
    int n;

    if (v < 1024) {
        snprintf(buf, len, "%" PRIu64 " B", v);
        return buf;
    }
    d /= 1024;
    while (d >= 1023.95 && u + 1 < sizeof(units) / sizeof(units[0])) {
        d /= 1024;
        u++;
    }
    n = snprintf(buf, len, "%.1f", d);
    if (n >= 2 && (size_t)n < len && buf[n - 1] == '0' && buf[n - 2] == '.')
        buf[n - 2] = '\0';
    snprintf(buf + strlen(buf), len - strlen(buf), " %s", units[u]);
    return buf;
}

/* An age or a duration: "12 s", "3 min 12 s", "2 h 5 min", "3 d 4 h". */
static const char *fmt_age(char *buf, size_t len, int64_t s)
{
    if (s < 0)
        s = 0;
    if (s < 60)
        snprintf(buf, len, "%" PRId64 " s", s);
    else if (s < 3600 && s % 60)
        snprintf(buf, len, "%" PRId64 " min %" PRId64 " s", s / 60, s % 60);
    else if (s < 3600)
        snprintf(buf, len, "%" PRId64 " min", s / 60);
    else if (s < 86400 && s / 60 % 60)
        snprintf(buf, len, "%" PRId64 " h %" PRId64 " min", s / 3600, s / 60 % 60);
    else if (s < 86400)
        snprintf(buf, len, "%" PRId64 " h", s / 3600);
    else if (s / 3600 % 24)
        snprintf(buf, len, "%" PRId64 " d %" PRId64 " h", s / 86400, s / 3600 % 24);
    else
        snprintf(buf, len, "%" PRId64 " d", s / 86400);
    return buf;
}

/* Wall-clock MS in UTC: "2026-11-26 10:15:00 UTC", or just "10:15:00" when SHORT and it is
 * the same UTC day as NOW_MS. */
static const char *fmt_wall(char *buf, size_t len, int64_t ms, int64_t now_ms, int short_form)
{
    time_t t = (time_t)(ms / 1000), now = (time_t)(now_ms / 1000);
    struct tm tm, tn;
    if (!gmtime_r(&t, &tm) || !gmtime_r(&now, &tn)) {
        snprintf(buf, len, "?");
        return buf;
    }
    if (short_form && tm.tm_year == tn.tm_year && tm.tm_yday == tn.tm_yday)
        strftime(buf, len, "%H:%M:%S", &tm);
    else
        strftime(buf, len, "%Y-%m-%d %H:%M:%S UTC", &tm);
    return buf;
}

/* "2026-11-26T10:15:00Z" to wall-clock ms; 0 if S is NULL or not in that form. */
static int64_t iso_to_ms(const char *s)
{
    struct tm tm;
    char z = 0;
    int n = 0;
    time_t t;

    if (!s)
        return 0;
    memset(&tm, 0, sizeof(tm));
    if (sscanf(s, "%4d-%2d-%2dT%2d:%2d:%2d%c%n", &tm.tm_year, &tm.tm_mon, &tm.tm_mday,
               &tm.tm_hour, &tm.tm_min, &tm.tm_sec, &z, &n) != 7 ||
        z != 'Z' || s[n] != '\0')
        return 0;
    tm.tm_year -= 1900;
    tm.tm_mon -= 1;
    t = timegm(&tm);
    return t < 0 ? 0 : (int64_t)t * 1000;
}

/* Print S for a terminal: control characters (C0, DEL, and C1 as UTF-8) become '?', so words
 * from a config or a receiver cannot move the cursor or retitle the window. */
static void put_clean(FILE *f, const char *s)
{
    const unsigned char *p = (const unsigned char *)(s ? s : "");
    for (; *p; p++) {
        if (*p < 0x20 || *p == 0x7f) {
            fputc('?', f);
        } else if (*p == 0xc2 && p[1] >= 0x80 && p[1] <= 0x9f) {
            fputc('?', f);
            p++;
        } else {
            fputc(*p, f);
        }
    }
}

static const char *plural(uint64_t n, const char *one, const char *many)
{
    return n == 1 ? one : many;
}

/* ---- the spool, read-only ---- */

struct loss {
    char reason[32];
    uint64_t records, entries, unsent;
};

struct snap {
    uint64_t epoch, next_seq;
    struct agent_spool_class_stats prio[CIS_PRIO_COUNT];
    uint64_t records, segments, bytes;
    int64_t oldest_created_ms; /* 0: nothing pending */
    uint64_t db_bytes, wal_bytes;
    struct loss loss[MAX_LOSSES];
    size_t nloss;
    int64_t wall_ms; /* when it was read */
};

static struct loss *snap_loss(struct snap *s, const char *reason)
{
    for (size_t i = 0; i < s->nloss; i++)
        if (strcmp(s->loss[i].reason, reason) == 0)
            return &s->loss[i];
    if (s->nloss == MAX_LOSSES)
        return NULL;
    snprintf(s->loss[s->nloss].reason, sizeof(s->loss[0].reason), "%s", reason);
    return &s->loss[s->nloss++];
}

static uint64_t col_u64(sqlite3_stmt *st, int col)
{
    sqlite3_int64 v = sqlite3_column_int64(st, col);
    return v > 0 ? (uint64_t)v : 0;
}

/* Read the spool at PATH into S without disturbing the agent that writes it: a read-only
 * connection (never creating the file) and one short read transaction, so a checkpoint waits
 * for us at most as long as three small queries take. Returns 0; CIS_ENOTFOUND (no such file)
 * or CIS_EDB with a reason in ERR. */
static int snap_read(const char *path, struct snap *s, char *err, size_t errlen)
{
    static const char *const q_meta = "SELECT key, value FROM meta";
    static const char *const q_seg = "SELECT priority, count(*), sum(record_count), "
                                     "sum(length(data)), min(created_ms) FROM segments "
                                     "GROUP BY priority";
    static const char *const q_ledger = "SELECT reason, count(*), sum(count), sum(sent = 0) "
                                        "FROM ledger GROUP BY reason";
    char wal[4096];
    sqlite3 *db = NULL;
    sqlite3_stmt *st = NULL;
    struct stat sb;
    int rc = CIS_EDB;

    memset(s, 0, sizeof(*s));
    for (size_t i = 0; i < NREASONS; i++)
        snap_loss(s, loss_reasons[i]);
    if (stat(path, &sb) < 0) {
        if (errno == ENOENT) {
            snprintf(err, errlen, "no spool at %s yet (has the agent run?)", path);
            return CIS_ENOTFOUND;
        }
        snprintf(err, errlen, "cannot read the spool %s: %s", path, strerror(errno));
        return CIS_EDB;
    }
    s->db_bytes = (uint64_t)sb.st_size;
    snprintf(wal, sizeof(wal), "%s-wal", path);
    if (stat(wal, &sb) == 0)
        s->wal_bytes = (uint64_t)sb.st_size;

    if (sqlite3_open_v2(path, &db, SQLITE_OPEN_READONLY, NULL) != SQLITE_OK)
        goto db_err;
    sqlite3_busy_timeout(db, STATUS_DB_BUSY_MS);
    if (sqlite3_exec(db, "BEGIN", NULL, NULL, NULL) != SQLITE_OK)
        goto db_err;

    if (sqlite3_prepare_v2(db, q_meta, -1, &st, NULL) != SQLITE_OK)
        goto db_err;
    while (sqlite3_step(st) == SQLITE_ROW) {
        const char *k = (const char *)sqlite3_column_text(st, 0);
        if (k && strcmp(k, "epoch") == 0)
            s->epoch = col_u64(st, 1);
        else if (k && strcmp(k, "next_seq") == 0)
            s->next_seq = col_u64(st, 1);
    }
    if (sqlite3_finalize(st) != SQLITE_OK) {
        st = NULL;
        goto db_err;
    }

    if (sqlite3_prepare_v2(db, q_seg, -1, &st, NULL) != SQLITE_OK)
        goto db_err;
    while (sqlite3_step(st) == SQLITE_ROW) {
        sqlite3_int64 prio = sqlite3_column_int64(st, 0);
        int64_t oldest = sqlite3_column_int64(st, 4);
        struct agent_spool_class_stats c = {.segments = col_u64(st, 1),
                                            .records = col_u64(st, 2),
                                            .bytes = col_u64(st, 3)};
        if (prio >= 0 && prio < CIS_PRIO_COUNT)
            s->prio[prio] = c;
        s->records += c.records;
        s->segments += c.segments;
        s->bytes += c.bytes;
        if (c.segments && (s->oldest_created_ms == 0 || oldest < s->oldest_created_ms))
            s->oldest_created_ms = oldest > 0 ? oldest : 1;
    }
    if (sqlite3_finalize(st) != SQLITE_OK) {
        st = NULL;
        goto db_err;
    }

    if (sqlite3_prepare_v2(db, q_ledger, -1, &st, NULL) != SQLITE_OK)
        goto db_err;
    while (sqlite3_step(st) == SQLITE_ROW) {
        const char *reason = (const char *)sqlite3_column_text(st, 0);
        struct loss *l = snap_loss(s, reason ? reason : "?");
        if (!l)
            continue;
        l->entries = col_u64(st, 1);
        l->records = col_u64(st, 2);
        l->unsent = col_u64(st, 3);
    }
    rc = sqlite3_finalize(st);
    st = NULL;
    if (rc != SQLITE_OK || sqlite3_exec(db, "COMMIT", NULL, NULL, NULL) != SQLITE_OK)
        goto db_err;
    s->wall_ms = cis_wall_ms();
    rc = 0;
    goto out;
db_err:
    snprintf(err, errlen, "cannot read the spool %s: %s", path,
             db ? sqlite3_errmsg(db) : "out of memory");
    rc = CIS_EDB;
out:
    sqlite3_finalize(st);
    sqlite3_close(db); /* also ends the transaction if it is still open */
    return rc;
}

/* ---- the running agent, through its control socket ---- */

struct agent_answer {
    struct jnode *obj; /* the agent's object when it runs and answered; else NULL */
    const char *state; /* when obj is NULL: "not running", "not answering" or "unknown" */
    char why[160];     /* ... and why, for the human report */
};

/* Ask the agent at PATH (its status.socket). Never fails: a missing or silent agent is a
 * finding, put in A->why. */
static void ask_agent(const char *path, struct agent_answer *a)
{
    struct sockaddr_un addr;
    int64_t deadline = cis_mono_ms() + STATUS_ASK_TIMEOUT_MS;
    char *buf = NULL;
    size_t len = 0;
    int fd = -1;

    memset(a, 0, sizeof(*a));
    a->state = "unknown";
    if (!path || !*path) {
        snprintf(a->why, sizeof(a->why), "not asked: status.socket is off in the config");
        return;
    }
    memset(&addr, 0, sizeof(addr));
    addr.sun_family = AF_UNIX;
    if (strlen(path) >= sizeof(addr.sun_path)) {
        snprintf(a->why, sizeof(a->why), "status.socket is too long for a Unix socket");
        return;
    }
    memcpy(addr.sun_path, path, strlen(path));
    fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0)
        goto fail;
    /* Non-blocking: a Unix connect returns at once, or EAGAIN while the agent's backlog is
     * full (it is busy); then retry until the deadline rather than hang on a stuck agent. */
    while (connect(fd, (struct sockaddr *)&addr, sizeof(addr)) < 0) {
        if (errno != EAGAIN || cis_mono_ms() >= deadline)
            goto fail;
        poll(NULL, 0, 20);
    }
    if (!(buf = malloc(STATUS_ANSWER_MAX + 1)))
        goto fail;
    for (;;) {
        struct pollfd p = {.fd = fd, .events = POLLIN};
        int64_t left = deadline - cis_mono_ms();
        ssize_t n;
        if (left <= 0) {
            errno = ETIMEDOUT;
            goto fail;
        }
        if (poll(&p, 1, (int)left) < 0 && errno != EINTR)
            goto fail;
        n = read(fd, buf + len, STATUS_ANSWER_MAX - len);
        if (n == 0)
            break;
        if (n < 0) {
            if (errno == EAGAIN || errno == EINTR)
                continue;
            goto fail;
        }
        len += (size_t)n;
        if (len == STATUS_ANSWER_MAX) {
            snprintf(a->why, sizeof(a->why), "the answer on %s is too long to be the agent's",
                     path);
            goto out;
        }
    }
    a->obj = jparse(buf, len);
    if (!a->obj || a->obj->type != JN_OBJ || !jtrue(a->obj, "running")) {
        jfree(a->obj);
        a->obj = NULL;
        snprintf(a->why, sizeof(a->why), "the answer on %s is not an agent's status", path);
    }
    goto out;
fail:
    /* No socket file, or nobody listening on it: no agent (the socket of one that was
     * killed stays behind). Anything else (EACCES) says nothing about the agent. */
    if (errno == ENOENT || errno == ECONNREFUSED) {
        a->state = "not running";
        snprintf(a->why, sizeof(a->why), "no answer on %s", path);
    } else if (errno == ETIMEDOUT || errno == EAGAIN) {
        a->state = "not answering";
        snprintf(a->why, sizeof(a->why), "no answer on %s within %d s", path,
                 STATUS_ASK_TIMEOUT_MS / 1000);
    } else {
        snprintf(a->why, sizeof(a->why), "cannot ask on %s: %s", path, strerror(errno));
    }
out:
    free(buf);
    if (fd >= 0)
        close(fd);
}

/* ---- the report ---- */

struct drain {
    int have_rate;      /* a rate was measured (--watch, from the second sample) */
    double rate;        /* pending records falling per second, smoothed; < 0: growing */
    int have_eta;
    double eta_s;
    uint64_t prev_records, prev_epoch;
    int64_t prev_mono;
    int have_prev;
};

/* Fold a new sample (RECORDS pending in EPOCH, at NOW_MONO) into D: the rate is the fall of
 * pending over the last interval, smoothed over a few intervals (batches are acked in steps). */
static void drain_update(struct drain *d, uint64_t records, uint64_t epoch, int64_t now_mono)
{
    if (d->have_prev && epoch == d->prev_epoch && now_mono > d->prev_mono) {
        double inst = ((double)d->prev_records - (double)records) * 1000.0 /
                      (double)(now_mono - d->prev_mono);
        d->rate = d->have_rate ? 0.5 * d->rate + 0.5 * inst : inst;
        d->have_rate = 1;
    } else if (d->have_prev) {
        d->have_rate = 0; /* a new spool (quarantined and replaced): start over */
    }
    d->have_eta = d->have_rate && d->rate > 0.05 && records > 0;
    d->eta_s = d->have_eta ? (double)records / d->rate : 0;
    d->prev_records = records;
    d->prev_epoch = epoch;
    d->prev_mono = now_mono;
    d->have_prev = 1;
}

static void report_json(FILE *f, const struct agent_config *cfg, const struct snap *s,
                        const struct agent_answer *a, const struct drain *d)
{
    fputs("{\"agent_id\":", f);
    agent_json_str(f, a->obj && jstr(a->obj, "agent_id") ? jstr(a->obj, "agent_id") : cfg->id);
    fputs(",\"spool_path\":", f);
    agent_json_str(f, cfg->spool_path);
    fprintf(f,
            ",\"epoch\":\"%" PRIu64 "\",\"next_seq\":%" PRIu64 ",\"pending\":{\"records\":%" PRIu64
            ",\"segments\":%" PRIu64 ",\"bytes\":%" PRIu64 ",\"by_priority\":{",
            s->epoch, s->next_seq, s->records, s->segments, s->bytes);
    for (int i = 0; i < CIS_PRIO_COUNT; i++)
        fprintf(f, "%s\"%s\":{\"records\":%" PRIu64 ",\"segments\":%" PRIu64 ",\"bytes\":%" PRIu64
                "}", i ? "," : "", prio_names[i], s->prio[i].records, s->prio[i].segments,
                s->prio[i].bytes);
    fputs("}},\"oldest_pending_age_s\":", f);
    if (s->oldest_created_ms)
        fprintf(f, "%.1f",
                s->wall_ms > s->oldest_created_ms ? (s->wall_ms - s->oldest_created_ms) / 1000.0
                                                  : 0.0);
    else
        fputs("null", f);
    fprintf(f,
            ",\"spool_files\":{\"db_bytes\":%" PRIu64 ",\"wal_bytes\":%" PRIu64
            ",\"max_size\":%" PRIu64 "},\"ledger\":{",
            s->db_bytes, s->wal_bytes, cfg->spool_max_size);
    for (size_t i = 0; i < s->nloss; i++) {
        fputs(i ? "," : "", f);
        agent_json_str(f, s->loss[i].reason);
        fprintf(f, ":{\"records\":%" PRIu64 ",\"entries\":%" PRIu64 ",\"unsent\":%" PRIu64 "}",
                s->loss[i].records, s->loss[i].entries, s->loss[i].unsent);
    }
    fputs("},\"agent\":", f);
    if (a->obj)
        jwrite(f, a->obj);
    else
        fputs("{\"running\":false}", f);
    if (d) {
        fputs(",\"drain_rate\":", f);
        if (d->have_rate)
            fprintf(f, "%.1f", d->rate);
        else
            fputs("null", f);
        fputs(",\"eta_s\":", f);
        if (d->have_eta)
            fprintf(f, "%.0f", d->eta_s);
        else
            fputs("null", f);
    }
    fputs("}\n", f);
}

#define LABEL "%-13s"

static void report_link(FILE *f, const struct jnode *ag, int64_t now)
{
    const char *state = jstr(ag, "link.state");
    uint64_t fails = ju64(ag, "link.consecutive_failures", 0);
    uint64_t inflight = ju64(ag, "link.in_flight_batches", 0);
    int64_t err_at = iso_to_ms(jstr(ag, "link.last_error_at"));
    int64_t ok_at = iso_to_ms(jstr(ag, "link.last_success_at"));
    char b1[64], b2[64];

    fprintf(f, LABEL, "link:");
    if (state && strcmp(state, "down") == 0) {
        fputs("down — ", f);
        put_clean(f, jstr(ag, "link.last_error"));
        fprintf(f, " (%s failed %s", fmt_count(b1, sizeof(b1), fails),
                plural(fails, "attempt", "attempts"));
        if (err_at)
            fprintf(f, ", the last at %s", fmt_wall(b2, sizeof(b2), err_at, now, 1));
        fputs(")\n", f);
    } else if (state && strcmp(state, "up") == 0) {
        fprintf(f, "up (%s %s in flight)\n", fmt_count(b1, sizeof(b1), inflight),
                plural(inflight, "batch", "batches"));
    } else {
        fputs("not known yet (no batch answered since the agent started)\n", f);
    }
    fprintf(f, LABEL, "last sent:");
    if (ok_at) {
        fputs(fmt_wall(b1, sizeof(b1), ok_at, now, 0), f);
        if (now >= ok_at)
            fprintf(f, " (%s ago)", fmt_age(b2, sizeof(b2), (now - ok_at) / 1000));
        fputc('\n', f);
    } else {
        fputs("nothing since the agent started\n", f);
    }
}

static void report_text(FILE *f, const struct agent_config *cfg, const struct snap *s,
                        const struct agent_answer *a, const struct drain *d)
{
    const struct jnode *ag = a->obj;
    int64_t now = s->wall_ms;
    const char *base = strrchr(cfg->spool_path, '/');
    char b1[64], b2[64], b3[64];

    fputs("cistern-agent ", f);
    put_clean(f, ag && jstr(ag, "agent_id") ? jstr(ag, "agent_id") : cfg->id);
    if (ag) {
        int64_t since = iso_to_ms(jstr(ag, "started_at"));
        fputs(" — running", f);
        if (since)
            fprintf(f, " since %s", fmt_wall(b1, sizeof(b1), since, now, 0));
        fprintf(f, " (pid %" PRIu64 ")\n", ju64(ag, "pid", 0));
        report_link(f, ag, now);
        if (jtrue(ag, "disk_full"))
            fprintf(f, LABEL "the disk is full: new records are refused (ERR) until space is "
                    "freed\n", "alert:");
        if (jtrue(ag, "spool_full"))
            fprintf(f, LABEL "the spool is at spool.max_size: new records are refused (ERR) "
                    "until it drains\n", "alert:");
    } else {
        fputc('\n', f);
        fprintf(f, LABEL "%s (", "agent:", a->state);
        put_clean(f, a->why);
        fputs(")\n", f);
    }

    fprintf(f, LABEL "%s %s", "pending:", fmt_count(b1, sizeof(b1), s->records),
            plural(s->records, "record", "records"));
    if (s->segments) {
        fprintf(f, " in %s %s, %s (", fmt_count(b2, sizeof(b2), s->segments),
                plural(s->segments, "segment", "segments"), fmt_bytes(b3, sizeof(b3), s->bytes));
        for (int i = 0; i < CIS_PRIO_COUNT; i++)
            fprintf(f, "%s%s %s", i ? ", " : "", prio_names[i],
                    fmt_count(b1, sizeof(b1), s->prio[i].records));
        fputc(')', f);
    }
    fputc('\n', f);
    fprintf(f, LABEL "%s\n", "oldest:",
            s->oldest_created_ms
                ? fmt_age(b1, sizeof(b1),
                          now > s->oldest_created_ms ? (now - s->oldest_created_ms) / 1000 : 0)
                : "none");
    if (d) {
        fprintf(f, LABEL, "drain:");
        if (!d->have_rate)
            fputs("measuring…\n", f);
        else if (d->have_eta)
            fprintf(f, "drained in %s%s at %s rec/s\n", d->eta_s < 1 ? "< " : "~",
                    fmt_age(b1, sizeof(b1), d->eta_s < 1 ? 1 : (int64_t)(d->eta_s + 0.5)),
                    fmt_count(b2, sizeof(b2), (uint64_t)(d->rate + 0.5)));
        else if (d->rate < -0.05)
            fprintf(f, "growing by %s rec/s\n", fmt_count(b1, sizeof(b1), (uint64_t)(-d->rate + 0.5)));
        else
            fputs(s->records ? "not draining\n" : "empty\n", f);
    }

    fprintf(f, LABEL, "spool:");
    put_clean(f, base ? base + 1 : cfg->spool_path);
    fprintf(f, " %s + WAL %s", fmt_bytes(b1, sizeof(b1), s->db_bytes),
            fmt_bytes(b2, sizeof(b2), s->wal_bytes));
    if (cfg->spool_max_size)
        fprintf(f, " of %s (%.1f%%)", fmt_bytes(b3, sizeof(b3), cfg->spool_max_size),
                100.0 * (double)(s->db_bytes + s->wal_bytes) / (double)cfg->spool_max_size);
    fputc('\n', f);

    fprintf(f, LABEL, "losses:");
    for (size_t i = 0; i < s->nloss; i++) {
        const struct loss *l = &s->loss[i];
        fprintf(f, "%s", i ? " · " : "");
        put_clean(f, l->reason);
        fprintf(f, " %s", fmt_count(b1, sizeof(b1), l->records));
        if (l->entries && l->unsent)
            fprintf(f, " (%s %s, %s not yet reported)", fmt_count(b2, sizeof(b2), l->entries),
                    plural(l->entries, "entry", "entries"), fmt_count(b3, sizeof(b3), l->unsent));
        else if (l->entries)
            fprintf(f, " (%s %s, sent)", fmt_count(b2, sizeof(b2), l->entries),
                    plural(l->entries, "entry", "entries"));
    }
    fputc('\n', f);

    if (ag) {
        static const char *const names[] = {"produced", "spooled", "delivered", "rejected",
                                            "refused"};
        fprintf(f, LABEL, "since start:");
        for (size_t i = 0; i < sizeof(names) / sizeof(names[0]); i++) {
            char path[32];
            snprintf(path, sizeof(path), "counters.%s", names[i]);
            fprintf(f, "%s%s %s", i ? " · " : "", names[i],
                    fmt_count(b1, sizeof(b1), ju64(ag, path, 0)));
        }
        fputc('\n', f);
    }
}

/* ---- the command ---- */

static volatile sig_atomic_t status_stop;

static void status_on_signal(int sig)
{
    (void)sig;
    status_stop = 1;
}

static void status_usage(FILE *f)
{
    fprintf(f,
            "Usage: cistern-agent status [-c FILE] [--json] [--watch] [--interval DUR]\n"
            "\n"
            "Shows what this gateway holds and how its uplink is doing: records waiting in the\n"
            "spool and the oldest one's age, the spool's size on disk, the losses recorded in\n"
            "its ledger, and, when the agent runs, the link to the receiver and its counters.\n"
            "The spool is read read-only; the running agent is not disturbed.\n"
            "\n"
            "  -c, --config FILE    the agent's configuration (default " STATUS_DEFAULT_CONFIG ")\n"
            "      --json           one JSON object instead of the text report\n"
            "  -w, --watch          report again every --interval until Ctrl-C, with the drain\n"
            "                       rate and when the spool will be empty (with --json: one\n"
            "                       object per line)\n"
            "  -i, --interval DUR   how often --watch reports (default 1s)\n"
            "  -h, --help           this help\n"
            "\n"
            "Exit status: 0 the report was made (also when the agent is not running), 1 the\n"
            "config or the spool could not be read, 2 bad usage.\n");
}

/* One report: read the spool, ask the agent, print. Returns 0, or 1 when the spool could not
 * be read (the reason is printed to stderr). */
static int report_once(const struct agent_config *cfg, int json, struct drain *d, int clear)
{
    struct snap s;
    struct agent_answer a;
    char err[4352];

    if (snap_read(cfg->spool_path, &s, err, sizeof(err)) != 0) {
        fprintf(stderr, "cistern-agent status: %s\n", err);
        return 1;
    }
    /* After the spool's transaction has ended: the agent is never waited for while we hold
     * a read snapshot. */
    ask_agent(cfg->status_socket, &a);
    if (d)
        drain_update(d, s.records, s.epoch, cis_mono_ms());
    if (clear)
        fputs("\033[H\033[2J", stdout);
    if (json)
        report_json(stdout, cfg, &s, &a, d);
    else
        report_text(stdout, cfg, &s, &a, d);
    fflush(stdout);
    jfree(a.obj);
    return 0;
}

int agent_status_main(int argc, char **argv)
{
    static const struct option opts[] = {
        {"config", required_argument, NULL, 'c'},
        {"json", no_argument, NULL, 'j'},
        {"watch", no_argument, NULL, 'w'},
        {"interval", required_argument, NULL, 'i'},
        {"help", no_argument, NULL, 'h'},
        {0},
    };
    const char *config = STATUS_DEFAULT_CONFIG;
    int64_t interval_ms = 1000;
    int json = 0, watch = 0, c, status;
    struct agent_config cfg;
    char err[1024];

    optind = 0; /* GNU getopt: start afresh, whatever parsed argv before */
    opterr = 0; /* our own words, with the command's name */
    while ((c = getopt_long(argc, argv, ":c:wi:h", opts, NULL)) != -1) {
        switch (c) {
        case 'c': config = optarg; break;
        case 'j': json = 1; break;
        case 'w': watch = 1; break;
        case 'i':
            if (cis_parse_duration(optarg, &interval_ms, err, sizeof(err)) != 0) {
                fprintf(stderr, "cistern-agent status: --interval \"%s\" %s\n", optarg, err);
                return 2;
            }
            if (interval_ms < 100) {
                fprintf(stderr, "cistern-agent status: --interval must be at least 100ms\n");
                return 2;
            }
            break;
        case 'h': status_usage(stdout); return 0;
        case ':':
        default:
            /* optopt names a short option; for a long one, argv[optind - 1] is it */
            if (optopt)
                fprintf(stderr, "cistern-agent status: %s -%c\n",
                        c == ':' ? "a value is missing after" : "unknown option", optopt);
            else
                fprintf(stderr, "cistern-agent status: %s %s\n",
                        c == ':' ? "a value is missing after" : "unknown option",
                        argv[optind - 1]);
            status_usage(stderr);
            return 2;
        }
    }
    if (optind < argc) {
        fprintf(stderr, "cistern-agent status: unexpected argument \"%s\"\n", argv[optind]);
        status_usage(stderr);
        return 2;
    }

    memset(&cfg, 0, sizeof(cfg));
    if (agent_config_load(config, &cfg, err, sizeof(err)) != 0) {
        fprintf(stderr, "%s\n", err);
        return 1;
    }
    if (!watch) {
        status = report_once(&cfg, json, NULL, 0);
    } else {
        struct drain d;
        struct sigaction sa, old_int, old_term;
        int clear = !json && isatty(STDOUT_FILENO);
        int64_t next = cis_mono_ms();

        memset(&d, 0, sizeof(d));
        memset(&sa, 0, sizeof(sa));
        sa.sa_handler = status_on_signal; /* no SA_RESTART: the sleep below ends at once */
        sigemptyset(&sa.sa_mask);
        status_stop = 0;
        sigaction(SIGINT, &sa, &old_int);
        sigaction(SIGTERM, &sa, &old_term);
        status = report_once(&cfg, json, &d, clear);
        while (status == 0 && !status_stop) {
            int64_t now = cis_mono_ms();
            next += interval_ms;
            if (next < now)
                next = now; /* a slow read: do not try to catch up */
            if (next > now)
                poll(NULL, 0, (int)(next - now));
            if (status_stop)
                break;
            /* A spool missing for a moment (quarantined and replaced) is reported, not fatal. */
            report_once(&cfg, json, &d, clear);
        }
        sigaction(SIGINT, &old_int, NULL);
        sigaction(SIGTERM, &old_term, NULL);
    }
    agent_config_free(&cfg);
    return status;
}
