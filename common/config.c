/* Table-driven YAML config loader (libyaml document API): walks the document against a
 * schema of keys, applies defaults, runs checks, and reports "FILE:LINE:COL: key: why". */
#include "cistern/config.h"
#include "cistern/err.h"

#include <ctype.h>
#include <errno.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <yaml.h>

#define CFG_PATH_MAX 256
#define CFG_WHY_MAX 512
#define CFG_FILE_MAX (16u * 1024 * 1024) /* a config larger than this is surely a mistake */

/* A 1-based position in the file. */
struct pos {
    unsigned long line, col;
};

/* One load: the document, where errors go, and the first error's code. */
struct ld {
    const char *name;
    yaml_document_t *doc;
    char *err;
    size_t errlen;
    int rc;
};

/* One object being filled: the root struct or one maplist item. */
struct obj {
    struct ld *ld;
    const struct cis_cfg_schema *schema;
    void *ptr;
    const yaml_node_t *node; /* its mapping; NULL when absent or null */
    struct pos base;         /* where "the enclosing mapping" is for this object */
    const char *prefix;      /* display prefix: "" or "inputs[1]." */
};

struct cis_cfg_report {
    struct obj *oc;
};

/* libyaml marks count from 0; this is the one place that adds 1. */
static struct pos pos_of(yaml_mark_t m)
{
    struct pos p = {(unsigned long)m.line + 1, (unsigned long)m.column + 1};
    return p;
}

static struct pos node_pos(const yaml_node_t *n)
{
    return pos_of(n->start_mark);
}

/* Record the first error as "NAME:LINE:COL: PATH: msg" (PATH omitted when NULL or ""). */
__attribute__((format(printf, 4, 5))) static int fail(struct ld *ld, struct pos p, const char *path,
                                                      const char *fmt, ...)
{
    va_list ap;
    int n;

    if (ld->rc)
        return ld->rc;
    ld->rc = CIS_ECONFIG;
    if (!ld->err || ld->errlen == 0)
        return ld->rc;
    if (path && *path)
        n = snprintf(ld->err, ld->errlen, "%s:%lu:%lu: %s: ", ld->name, p.line, p.col, path);
    else
        n = snprintf(ld->err, ld->errlen, "%s:%lu:%lu: ", ld->name, p.line, p.col);
    if (n < 0 || (size_t)n >= ld->errlen)
        return ld->rc;
    va_start(ap, fmt);
    vsnprintf(ld->err + n, ld->errlen - (size_t)n, fmt, ap);
    va_end(ap);
    return ld->rc;
}

/* Record the first error with no position ("NAME: msg"), with code RC. */
__attribute__((format(printf, 3, 4))) static int fail_nopos(struct ld *ld, int rc, const char *fmt,
                                                            ...)
{
    va_list ap;
    int n;

    if (ld->rc)
        return ld->rc;
    ld->rc = rc;
    if (!ld->err || ld->errlen == 0)
        return ld->rc;
    n = snprintf(ld->err, ld->errlen, "%s: ", ld->name);
    if (n < 0 || (size_t)n >= ld->errlen)
        return ld->rc;
    va_start(ap, fmt);
    vsnprintf(ld->err + n, ld->errlen - (size_t)n, fmt, ap);
    va_end(ap);
    return ld->rc;
}

static int oom(struct ld *ld)
{
    return fail_nopos(ld, CIS_ENOMEM, "out of memory");
}

/* ---- small helpers ---- */

/* snprintf for messages and display paths, where truncation is acceptable. */
__attribute__((format(printf, 3, 4))) static void bfmt(char *buf, size_t len, const char *fmt, ...)
{
    va_list ap;

    va_start(ap, fmt);
    vsnprintf(buf, len, fmt, ap);
    va_end(ap);
}

static const char *type_name(enum cis_cfg_type t)
{
    switch (t) {
    case CIS_CFG_STRING:
        return "string";
    case CIS_CFG_INT:
        return "integer";
    case CIS_CFG_BOOL:
        return "boolean";
    case CIS_CFG_ENUM:
        return "enum";
    case CIS_CFG_DURATION:
        return "duration";
    case CIS_CFG_SIZE:
        return "size";
    case CIS_CFG_LIST:
        return "list";
    case CIS_CFG_MAPLIST:
        return "list of mappings";
    }
    return "?";
}

/* "a size", "an integer": the article for "expected ..." messages. */
static const char *type_article(enum cis_cfg_type t)
{
    return t == CIS_CFG_INT ? "an" : "a";
}

static const char *node_kind(const yaml_node_t *n)
{
    switch (n->type) {
    case YAML_MAPPING_NODE:
        return "a mapping";
    case YAML_SEQUENCE_NODE:
        return "a sequence";
    default:
        return "a scalar";
    }
}

static const char *scalar_str(const yaml_node_t *n)
{
    return (const char *)n->data.scalar.value;
}

/* A plain empty, "~" or "null" scalar: treated as if the key were not written. */
static int is_null(const yaml_node_t *n)
{
    const char *s;

    if (!n || n->type != YAML_SCALAR_NODE || n->data.scalar.style != YAML_PLAIN_SCALAR_STYLE)
        return 0;
    s = scalar_str(n);
    return !*s || !strcmp(s, "~") || !strcmp(s, "null") || !strcmp(s, "Null") || !strcmp(s, "NULL");
}

/* Join A and B with a dot (either may be ""). Returns 0, or -1 when truncated. */
static int join(char *buf, size_t len, const char *a, const char *b)
{
    int n = snprintf(buf, len, "%s%s%s", a, (*a && *b) ? "." : "", b);
    return (n < 0 || (size_t)n >= len) ? -1 : 0;
}

/* The display path of REL inside OC: the object's prefix, then REL. */
static const char *disp(const struct obj *oc, const char *rel, char *buf, size_t len)
{
    snprintf(buf, len, "%s%s", oc->prefix, rel);
    return buf;
}

/* The value for key KEY (KLEN bytes) in mapping MAP, or NULL. */
static const yaml_node_t *map_get(yaml_document_t *doc, const yaml_node_t *map, const char *key,
                                  size_t klen)
{
    yaml_node_pair_t *p;

    for (p = map->data.mapping.pairs.start; p < map->data.mapping.pairs.top; p++) {
        const yaml_node_t *k = yaml_document_get_node(doc, p->key);
        if (k && k->type == YAML_SCALAR_NODE && k->data.scalar.length == klen &&
            !memcmp(k->data.scalar.value, key, klen))
            return yaml_document_get_node(doc, p->value);
    }
    return NULL;
}

/* Find REL (dotted; a component may end in "[i]") below NODE. Returns the node or NULL;
 * *NEAR is set to the deepest node reached on the way (NULL when that is NODE itself). */
static const yaml_node_t *lookup(yaml_document_t *doc, const yaml_node_t *node, const char *rel,
                                 const yaml_node_t **near)
{
    const yaml_node_t *cur = node;
    const char *p = rel;

    *near = NULL;
    while (cur && cur->type == YAML_MAPPING_NODE) {
        const char *dot = strchr(p, '.');
        size_t clen = dot ? (size_t)(dot - p) : strlen(p);
        const char *br = memchr(p, '[', clen);
        const yaml_node_t *v = map_get(doc, cur, p, br ? (size_t)(br - p) : clen);

        if (!v)
            return NULL;
        if (br) {
            char *end;
            unsigned long idx = strtoul(br + 1, &end, 10);
            size_t n;

            if (v->type != YAML_SEQUENCE_NODE) {
                *near = v;
                return NULL;
            }
            n = (size_t)(v->data.sequence.items.top - v->data.sequence.items.start);
            if (*end != ']' || idx >= n) {
                *near = v;
                return NULL;
            }
            v = yaml_document_get_node(doc, v->data.sequence.items.start[idx]);
            if (!v)
                return NULL;
        }
        if (!dot)
            return v;
        *near = v;
        cur = v;
        p = dot + 1;
    }
    return NULL;
}

/* Where REL (relative to OC) was written; else its deepest written enclosing mapping; else
 * the object's own position. */
static struct pos locate(const struct obj *oc, const char *rel)
{
    const yaml_node_t *near;
    const yaml_node_t *n = lookup(oc->ld->doc, oc->node, rel, &near);

    if (n)
        return node_pos(n);
    return near ? node_pos(near) : oc->base;
}

static void *field(const struct obj *oc, const struct cis_cfg_key *k)
{
    return (char *)oc->ptr + k->offset;
}

/* ---- scalar parsers ---- */

static const struct {
    const char *unit;
    uint64_t mult;
} size_units[] = {
    {"B", 1},
    {"KiB", UINT64_C(1) << 10},
    {"MiB", UINT64_C(1) << 20},
    {"GiB", UINT64_C(1) << 30},
    {"TiB", UINT64_C(1) << 40},
};

/* Parse leading decimal digits of *S into *V, advancing *S. Returns digits read, or -1 on
 * overflow. */
static int parse_digits(const char **s, uint64_t *v)
{
    int n = 0;

    *v = 0;
    while (isdigit((unsigned char)**s)) {
        unsigned d = (unsigned)(**s - '0');
        if (*v > (UINT64_MAX - d) / 10)
            return -1;
        *v = *v * 10 + d;
        (*s)++;
        n++;
    }
    return n;
}

int cis_parse_size(const char *s, uint64_t *out, char *why, size_t whylen)
{
    const char *p = s, *num_end, *unit;
    uint64_t ip, frac = 0, fscale = 1, mult = 0;
    int nd, nf = 0;
    size_t i;

    if (*p == '-') {
        snprintf(why, whylen, "is not a size (sizes cannot be negative)");
        return CIS_EINVAL;
    }
    nd = parse_digits(&p, &ip);
    if (nd < 0) {
        snprintf(why, whylen, "is too large for a size");
        return CIS_EINVAL;
    }
    if (*p == '.') {
        p++;
        while (isdigit((unsigned char)*p)) {
            /* six decimals keep frac * mult (< 10^6 * 2^40) inside 64 bits */
            if (++nf > 6) {
                snprintf(why, whylen, "is not a size (at most 6 decimals)");
                return CIS_EINVAL;
            }
            frac = frac * 10 + (uint64_t)(*p - '0');
            fscale *= 10;
            p++;
        }
        if (nf == 0) {
            nd = 0; /* "1." is malformed */
        }
    }
    num_end = p;
    if (nd <= 0) {
        snprintf(why, whylen, "is not a size (use bytes or KiB, MiB, GiB, TiB: 512KiB)");
        return CIS_EINVAL;
    }
    while (*p == ' ')
        p++;
    unit = p;
    if (!*unit) {
        mult = 1;
    } else {
        for (i = 0; i < sizeof(size_units) / sizeof(size_units[0]); i++)
            if (!strcmp(unit, size_units[i].unit))
                mult = size_units[i].mult;
    }
    if (!mult) {
        /* KB, MB, k, M, kib ...: suggest the binary unit people almost always mean */
        static const char *const hint[] = {"KiB", "MiB", "GiB", "TiB", "B"};
        static const char letters[] = "kmgtb";
        const char *l = strchr(letters, tolower((unsigned char)*unit));
        size_t rest = strlen(unit);
        int ok = l && *unit && rest <= 3;

        if (ok && rest >= 2) {
            /* accept only "K", "KB", "Ki", "KiB" shapes (any case) for the hint */
            char c1 = (char)tolower((unsigned char)unit[1]);
            ok = (rest == 2 && (c1 == 'b' || c1 == 'i')) ||
                 (rest == 3 && c1 == 'i' && tolower((unsigned char)unit[2]) == 'b');
        }
        if (ok && *l != 'b')
            snprintf(why, whylen, "is not a size (try %.*s%s)", (int)(num_end - s), s,
                     hint[l - letters]);
        else
            snprintf(why, whylen, "is not a size (units: B, KiB, MiB, GiB, TiB)");
        return CIS_EINVAL;
    }
    if (nf > 0 && mult == 1) {
        snprintf(why, whylen, "is not a size (a fraction of a byte)");
        return CIS_EINVAL;
    }
    if (ip > UINT64_MAX / mult || ip * mult > UINT64_MAX - frac * mult / fscale) {
        snprintf(why, whylen, "is too large for a size");
        return CIS_EINVAL;
    }
    *out = ip * mult + frac * mult / fscale;
    return 0;
}

int cis_parse_duration(const char *s, int64_t *out_ms, char *why, size_t whylen)
{
    static const struct {
        const char *unit;
        int64_t mult;
    } units[] = {
        {"ms", 1}, {"s", 1000}, {"m", 60000}, {"h", 3600000}, {"d", 86400000},
    };
    /* spellings people try, and the unit they mean */
    static const struct {
        const char *alias, *unit;
    } aliases[] = {
        {"sec", "s"},  {"secs", "s"}, {"second", "s"}, {"seconds", "s"}, {"S", "s"},
        {"min", "m"},  {"mins", "m"}, {"minute", "m"}, {"minutes", "m"}, {"hr", "h"},
        {"hrs", "h"},  {"hour", "h"}, {"hours", "h"},  {"H", "h"},       {"day", "d"},
        {"days", "d"}, {"D", "d"},    {"MS", "ms"},    {"msec", "ms"},   {"msecs", "ms"},
    };
    const char *p = s, *num_end, *unit;
    uint64_t v;
    int64_t mult = 0;
    int nd;
    size_t i;

    if (*p == '-') {
        snprintf(why, whylen, "is not a duration (durations cannot be negative)");
        return CIS_EINVAL;
    }
    nd = parse_digits(&p, &v);
    if (nd < 0 || v > INT64_MAX) {
        snprintf(why, whylen, "is too large for a duration");
        return CIS_EINVAL;
    }
    num_end = p;
    if (nd == 0) {
        snprintf(why, whylen, "is not a duration (use ms, s, m, h, d: 250ms, 30s)");
        return CIS_EINVAL;
    }
    if (*p == '.') {
        snprintf(why, whylen, "is not a duration (use a whole number with a smaller unit)");
        return CIS_EINVAL;
    }
    while (*p == ' ')
        p++;
    unit = p;
    if (!*unit) {
        if (v == 0) { /* "0" means off and needs no unit */
            *out_ms = 0;
            return 0;
        }
        snprintf(why, whylen, "is not a duration (add a unit: 30s, 250ms)");
        return CIS_EINVAL;
    }
    for (i = 0; i < sizeof(units) / sizeof(units[0]); i++)
        if (!strcmp(unit, units[i].unit))
            mult = units[i].mult;
    if (!mult) {
        for (i = 0; i < sizeof(aliases) / sizeof(aliases[0]); i++) {
            if (!strcmp(unit, aliases[i].alias)) {
                snprintf(why, whylen, "is not a duration (try %.*s%s)", (int)(num_end - s), s,
                         aliases[i].unit);
                return CIS_EINVAL;
            }
        }
        snprintf(why, whylen, "is not a duration (units: ms, s, m, h, d)");
        return CIS_EINVAL;
    }
    if (v > (uint64_t)(INT64_MAX / mult)) {
        snprintf(why, whylen, "is too large for a duration");
        return CIS_EINVAL;
    }
    *out_ms = (int64_t)v * mult;
    return 0;
}

/* Readable forms for bounds in messages: "1GiB", "5m"; raw numbers when no unit divides. */
static void fmt_size(char *buf, size_t len, uint64_t v)
{
    size_t i;

    for (i = sizeof(size_units) / sizeof(size_units[0]) - 1; i > 0; i--) {
        if (v && v % size_units[i].mult == 0) {
            snprintf(buf, len, "%" PRIu64 "%s", v / size_units[i].mult, size_units[i].unit);
            return;
        }
    }
    snprintf(buf, len, "%" PRIu64, v);
}

static void fmt_duration(char *buf, size_t len, int64_t v)
{
    static const struct {
        const char *unit;
        int64_t mult;
    } units[] = {{"d", 86400000}, {"h", 3600000}, {"m", 60000}, {"s", 1000}};
    size_t i;

    if (v == 0) {
        snprintf(buf, len, "0");
        return;
    }
    for (i = 0; i < sizeof(units) / sizeof(units[0]); i++) {
        if (v > 0 && v % units[i].mult == 0) {
            snprintf(buf, len, "%" PRId64 "%s", v / units[i].mult, units[i].unit);
            return;
        }
    }
    snprintf(buf, len, "%" PRId64 "ms", v);
}

static int parse_int(const char *s, int64_t *out, char *why, size_t whylen)
{
    char *end;
    long long v;

    if (!*s || isspace((unsigned char)*s)) {
        snprintf(why, whylen, "\"%s\" is not an integer", s);
        return CIS_EINVAL;
    }
    errno = 0;
    v = strtoll(s, &end, 10);
    if (*end) {
        snprintf(why, whylen, "\"%s\" is not an integer", s);
        return CIS_EINVAL;
    }
    if (errno == ERANGE) {
        snprintf(why, whylen, "\"%s\" is out of range for an integer", s);
        return CIS_EINVAL;
    }
    *out = (int64_t)v;
    return 0;
}

static int parse_bool(const char *s, int *out)
{
    static const char *const t[] = {"true", "yes", "on"}, *const f[] = {"false", "no", "off"};
    size_t i;

    for (i = 0; i < 3; i++) {
        if (!strcasecmp(s, t[i])) {
            *out = 1;
            return 0;
        }
        if (!strcasecmp(s, f[i])) {
            *out = 0;
            return 0;
        }
    }
    return CIS_EINVAL;
}

/* "normal, full" into BUF. */
static void enum_list(char *buf, size_t len, const char *const *vals)
{
    size_t off = 0;
    size_t i;

    buf[0] = '\0';
    for (i = 0; vals && vals[i] && off < len; i++) {
        int n = snprintf(buf + off, len - off, "%s%s", i ? ", " : "", vals[i]);
        if (n < 0)
            break;
        off += (size_t)n;
    }
}

/* Free what a key's field holds and zero it. */
static void free_field(const struct cis_cfg_key *k, void *dst)
{
    switch (k->type) {
    case CIS_CFG_STRING: {
        char **sp = dst;
        free(*sp);
        *sp = NULL;
        break;
    }
    case CIS_CFG_INT:
    case CIS_CFG_DURATION:
        *(int64_t *)dst = 0;
        break;
    case CIS_CFG_SIZE:
        *(uint64_t *)dst = 0;
        break;
    case CIS_CFG_BOOL:
    case CIS_CFG_ENUM:
        *(int *)dst = 0;
        break;
    case CIS_CFG_LIST: {
        struct cis_strlist *l = dst;
        size_t i;
        for (i = 0; i < l->n; i++)
            free(l->v[i]);
        free(l->v);
        l->v = NULL;
        l->n = 0;
        break;
    }
    case CIS_CFG_MAPLIST: {
        struct cis_maplist *m = dst;
        size_t i;
        for (i = 0; k->sub && i < m->n; i++)
            cis_config_free(k->sub, (char *)m->items + i * k->item_size);
        free(m->items);
        m->items = NULL;
        m->n = 0;
        break;
    }
    }
}

/* Parse TEXT as a scalar of K's type into DST, checking bounds. Returns 0, CIS_ENOMEM, or
 * CIS_EINVAL with "what is wrong" (quoting TEXT) in WHY. */
static int set_scalar(const struct cis_cfg_key *k, const char *text, void *dst, char *why,
                      size_t whylen)
{
    char r[CFG_WHY_MAX], lo[32], hi[32];
    int bounded = k->max > k->min;

    switch (k->type) {
    case CIS_CFG_STRING: {
        char *s = strdup(text);
        if (!s)
            return CIS_ENOMEM;
        free(*(char **)dst);
        *(char **)dst = s;
        return 0;
    }
    case CIS_CFG_INT: {
        int64_t v;
        if (parse_int(text, &v, why, whylen))
            return CIS_EINVAL;
        if (bounded && (v < k->min || v > k->max)) {
            snprintf(why, whylen, "\"%s\" must be between %" PRId64 " and %" PRId64, text, k->min,
                     k->max);
            return CIS_EINVAL;
        }
        *(int64_t *)dst = v;
        return 0;
    }
    case CIS_CFG_BOOL:
        if (parse_bool(text, (int *)dst)) {
            snprintf(why, whylen, "\"%s\" is not a boolean (use true or false)", text);
            return CIS_EINVAL;
        }
        return 0;
    case CIS_CFG_ENUM: {
        int i;
        for (i = 0; k->enum_values && k->enum_values[i]; i++) {
            if (!strcmp(text, k->enum_values[i])) {
                *(int *)dst = i;
                return 0;
            }
        }
        enum_list(r, sizeof(r), k->enum_values);
        bfmt(why, whylen, "\"%s\" is not one of: %s", text, r);
        return CIS_EINVAL;
    }
    case CIS_CFG_DURATION: {
        int64_t v;
        if (cis_parse_duration(text, &v, r, sizeof(r))) {
            bfmt(why, whylen, "\"%s\" %s", text, r);
            return CIS_EINVAL;
        }
        if (bounded && (v < k->min || v > k->max)) {
            fmt_duration(lo, sizeof(lo), k->min);
            fmt_duration(hi, sizeof(hi), k->max);
            bfmt(why, whylen, "\"%s\" must be between %s and %s", text, lo, hi);
            return CIS_EINVAL;
        }
        *(int64_t *)dst = v;
        return 0;
    }
    case CIS_CFG_SIZE: {
        uint64_t v, mn = k->min > 0 ? (uint64_t)k->min : 0, mx = (uint64_t)k->max;
        if (cis_parse_size(text, &v, r, sizeof(r))) {
            bfmt(why, whylen, "\"%s\" %s", text, r);
            return CIS_EINVAL;
        }
        if (bounded && k->max > 0 && (v < mn || v > mx)) {
            fmt_size(lo, sizeof(lo), mn);
            fmt_size(hi, sizeof(hi), mx);
            bfmt(why, whylen, "\"%s\" must be between %s and %s", text, lo, hi);
            return CIS_EINVAL;
        }
        *(uint64_t *)dst = v;
        return 0;
    }
    case CIS_CFG_LIST:
    case CIS_CFG_MAPLIST:
        break;
    }
    snprintf(why, whylen, "is not a scalar key");
    return CIS_EINVAL;
}

/* Append one string (ownership taken) to list L. Frees S on failure. */
static int list_push(struct cis_strlist *l, char *s)
{
    char **v = realloc(l->v, (l->n + 1) * sizeof(*v));

    if (!v) {
        free(s);
        return CIS_ENOMEM;
    }
    l->v = v;
    l->v[l->n++] = s;
    return 0;
}

/* ---- ${VAR} substitution ---- */

struct buf {
    char *p;
    size_t len, cap;
};

static int buf_add(struct buf *b, const char *s, size_t n)
{
    if (b->len + n + 1 > b->cap) {
        size_t cap = b->cap ? b->cap : 64;
        char *p;
        while (cap < b->len + n + 1)
            cap *= 2;
        p = realloc(b->p, cap);
        if (!p)
            return CIS_ENOMEM;
        b->p = p;
        b->cap = cap;
    }
    memcpy(b->p + b->len, s, n);
    b->len += n;
    b->p[b->len] = '\0';
    return 0;
}

/* The scalar N with ${VAR} replaced from the environment, into *OUT (caller frees). "$${"
 * stands for a literal "${"; any other "$" is literal. PATH is for messages. */
static int expand(struct ld *ld, const yaml_node_t *n, const char *path, char **out)
{
    const char *s = scalar_str(n);
    size_t len = n->data.scalar.length, i = 0;
    struct buf b = {NULL, 0, 0};
    int rc = 0;

    *out = NULL;
    if (memchr(s, '\0', len)) {
        rc = fail(ld, node_pos(n), path, "contains a NUL character");
        goto out;
    }
    if (buf_add(&b, "", 0))
        goto nomem;
    while (i < len) {
        const char *dollar = memchr(s + i, '$', len - i);
        size_t lit = dollar ? (size_t)(dollar - (s + i)) : len - i;

        if (buf_add(&b, s + i, lit))
            goto nomem;
        i += lit;
        if (i >= len)
            break;
        if (i + 2 < len && s[i + 1] == '$' && s[i + 2] == '{') {
            if (buf_add(&b, "${", 2))
                goto nomem;
            i += 3;
        } else if (i + 1 < len && s[i + 1] == '{') {
            const char *close = memchr(s + i + 2, '}', len - i - 2);
            size_t nlen, k;
            char name[128];
            const char *val;

            if (!close) {
                rc = fail(ld, node_pos(n), path, "\"%s\" has an unterminated ${", s);
                goto out;
            }
            nlen = (size_t)(close - (s + i + 2));
            for (k = 0; k < nlen; k++) {
                char c = s[i + 2 + k];
                if (!(c == '_' || isalpha((unsigned char)c) || (k && isdigit((unsigned char)c))))
                    break;
            }
            if (nlen == 0 || k < nlen || nlen >= sizeof(name)) {
                rc = fail(ld, node_pos(n), path, "${%.*s} is not a valid variable name", (int)nlen,
                          s + i + 2);
                goto out;
            }
            memcpy(name, s + i + 2, nlen);
            name[nlen] = '\0';
            val = getenv(name);
            if (!val) {
                rc = fail(ld, node_pos(n), path, "${%s} is not set in the environment", name);
                goto out;
            }
            if (buf_add(&b, val, strlen(val)))
                goto nomem;
            i += nlen + 3;
        } else {
            if (buf_add(&b, "$", 1))
                goto nomem;
            i++;
        }
    }
    *out = b.p;
    b.p = NULL;
    goto out;
nomem:
    rc = oom(ld);
out:
    free(b.p);
    return rc;
}

/* ---- loading ---- */

static int load_obj(struct ld *ld, const struct cis_cfg_schema *schema, void *ptr,
                    const yaml_node_t *node, struct pos base, const char *prefix);

static const struct cis_cfg_key *find_key(const struct cis_cfg_schema *s, const char *rel)
{
    const struct cis_cfg_key *k;

    for (k = s->keys; k->path; k++)
        if (!strcmp(k->path, rel))
            return k;
    return NULL;
}

/* Whether REL is a section: a proper prefix, at a dot, of some key's path. */
static int is_section(const struct cis_cfg_schema *s, const char *rel)
{
    const struct cis_cfg_key *k;
    size_t n = strlen(rel);

    for (k = s->keys; k->path; k++)
        if (!strncmp(k->path, rel, n) && k->path[n] == '.')
            return 1;
    return 0;
}

static size_t lev(const char *a, size_t la, const char *b, size_t lb)
{
    size_t row[64], i, j;

    if (la >= 64 || lb >= 64)
        return SIZE_MAX;
    for (j = 0; j <= lb; j++)
        row[j] = j;
    for (i = 1; i <= la; i++) {
        size_t prev = row[0];
        row[0] = i;
        for (j = 1; j <= lb; j++) {
            size_t tmp = row[j], best = row[j] + 1;
            if (row[j - 1] + 1 < best)
                best = row[j - 1] + 1;
            if (prev + (a[i - 1] != b[j - 1]) < best)
                best = prev + (a[i - 1] != b[j - 1]);
            row[j] = best;
            prev = tmp;
        }
    }
    return row[lb];
}

/* Report KEYNODE (named KEY, in section REL) as unknown, suggesting the nearest sibling. */
static int unknown_key(struct obj *oc, const char *rel, const char *key, const yaml_node_t *keynode)
{
    const struct cis_cfg_key *k;
    size_t rlen = strlen(rel), klen = strlen(key), best = SIZE_MAX, limit;
    const char *bp = NULL;
    size_t blen = 0;
    char full[CFG_PATH_MAX], path[CFG_PATH_MAX], sugg[CFG_PATH_MAX];

    for (k = oc->schema->keys; k->path; k++) {
        const char *c = k->path, *dot;
        size_t clen, d;

        if (rlen) {
            if (strncmp(c, rel, rlen) || c[rlen] != '.')
                continue;
            c += rlen + 1;
        }
        dot = strchr(c, '.');
        clen = dot ? (size_t)(dot - c) : strlen(c);
        d = lev(key, klen, c, clen);
        if (d < best) {
            best = d;
            bp = c;
            blen = clen;
        }
    }
    join(full, sizeof(full), rel, key);
    disp(oc, full, path, sizeof(path));
    if (strchr(key, '.'))
        return fail(oc->ld, node_pos(keynode), path,
                    "unknown key (write nested mappings, not dotted keys)");
    limit = klen / 3 > 2 ? klen / 3 : 2;
    if (bp && best <= limit) {
        snprintf(sugg, sizeof(sugg), "%s%s%s%.*s", oc->prefix, rel, rlen ? "." : "", (int)blen, bp);
        return fail(oc->ld, node_pos(keynode), path, "unknown key (did you mean %s?)", sugg);
    }
    return fail(oc->ld, node_pos(keynode), path, "unknown key");
}

static int load_list(struct obj *oc, const struct cis_cfg_key *k, const yaml_node_t *v,
                     const char *path)
{
    struct cis_strlist *l = field(oc, k);
    char ipath[CFG_PATH_MAX];
    char *s;
    yaml_node_item_t *it;
    int rc;

    free_field(k, l);
    if (v->type == YAML_SCALAR_NODE) {
        if ((rc = expand(oc->ld, v, path, &s)))
            return rc;
        return list_push(l, s) ? oom(oc->ld) : 0;
    }
    if (v->type != YAML_SEQUENCE_NODE)
        return fail(oc->ld, node_pos(v), path, "expected a list, got %s", node_kind(v));
    for (it = v->data.sequence.items.start; it < v->data.sequence.items.top; it++) {
        const yaml_node_t *e = yaml_document_get_node(oc->ld->doc, *it);

        bfmt(ipath, sizeof(ipath), "%s[%zu]", path, (size_t)(it - v->data.sequence.items.start));
        if (!e)
            return fail(oc->ld, node_pos(v), ipath, "missing list item");
        if (e->type != YAML_SCALAR_NODE)
            return fail(oc->ld, node_pos(e), ipath, "expected a string, got %s", node_kind(e));
        if ((rc = expand(oc->ld, e, ipath, &s)))
            return rc;
        if (list_push(l, s))
            return oom(oc->ld);
    }
    return 0;
}

static int load_maplist(struct obj *oc, const struct cis_cfg_key *k, const yaml_node_t *v,
                        const char *path)
{
    struct cis_maplist *m = field(oc, k);
    char prefix[CFG_PATH_MAX];
    size_t n, i;
    int rc;

    if (!k->sub || !k->item_size)
        return fail_nopos(oc->ld, CIS_ECONFIG, "%s: maplist key without sub-schema (schema bug)",
                          path);
    free_field(k, m);
    if (v->type != YAML_SEQUENCE_NODE)
        return fail(oc->ld, node_pos(v), path, "expected a list of mappings, got %s", node_kind(v));
    n = (size_t)(v->data.sequence.items.top - v->data.sequence.items.start);
    if (n == 0)
        return 0;
    m->items = calloc(n, k->item_size);
    if (!m->items)
        return oom(oc->ld);
    m->n = n; /* zeroed items are safe to free if a later item fails */
    for (i = 0; i < n; i++) {
        const yaml_node_t *e = yaml_document_get_node(oc->ld->doc, v->data.sequence.items.start[i]);

        bfmt(prefix, sizeof(prefix), "%s[%zu]", path, i);
        if (!e)
            return fail(oc->ld, node_pos(v), prefix, "missing list item");
        if (!is_null(e) && e->type != YAML_MAPPING_NODE)
            return fail(oc->ld, node_pos(e), prefix, "expected a mapping, got %s", node_kind(e));
        bfmt(prefix, sizeof(prefix), "%s[%zu].", path, i);
        rc = load_obj(oc->ld, k->sub, (char *)m->items + i * k->item_size,
                      e->type == YAML_MAPPING_NODE ? e : NULL, node_pos(e), prefix);
        if (rc)
            return rc;
    }
    return 0;
}

/* Set key K from value node V. A null value counts as not written. */
static int load_leaf(struct obj *oc, const struct cis_cfg_key *k, const yaml_node_t *v)
{
    char path[CFG_PATH_MAX], why[CFG_WHY_MAX];
    char *text = NULL;
    int rc;

    disp(oc, k->path, path, sizeof(path));
    if (is_null(v))
        return 0;
    if (k->type == CIS_CFG_LIST)
        return load_list(oc, k, v, path);
    if (k->type == CIS_CFG_MAPLIST)
        return load_maplist(oc, k, v, path);
    if (v->type != YAML_SCALAR_NODE)
        return fail(oc->ld, node_pos(v), path, "expected %s %s, got %s", type_article(k->type),
                    k->type == CIS_CFG_ENUM ? "string" : type_name(k->type), node_kind(v));
    if ((rc = expand(oc->ld, v, path, &text)))
        return rc;
    rc = set_scalar(k, text, field(oc, k), why, sizeof(why));
    if (rc == CIS_ENOMEM)
        rc = oom(oc->ld);
    else if (rc)
        rc = fail(oc->ld, node_pos(v), path, "%s", why);
    free(text);
    return rc;
}

/* Walk mapping MAP, which sits at section REL ("" for the object itself). */
static int walk_map(struct obj *oc, const yaml_node_t *map, const char *rel)
{
    yaml_document_t *doc = oc->ld->doc;
    yaml_node_pair_t *p, *q;
    char full[CFG_PATH_MAX], path[CFG_PATH_MAX];
    int rc;

    for (p = map->data.mapping.pairs.start; p < map->data.mapping.pairs.top; p++) {
        const yaml_node_t *kn = yaml_document_get_node(doc, p->key);
        const yaml_node_t *vn = yaml_document_get_node(doc, p->value);
        const struct cis_cfg_key *k;
        const char *key;

        if (!kn || !vn)
            return fail(oc->ld, node_pos(map), disp(oc, rel, path, sizeof(path)),
                        "malformed mapping");
        if (kn->type != YAML_SCALAR_NODE)
            return fail(oc->ld, node_pos(kn), disp(oc, rel, path, sizeof(path)),
                        "expected a key, got %s", node_kind(kn));
        key = scalar_str(kn);
        if (join(full, sizeof(full), rel, key) || strlen(key) != kn->data.scalar.length)
            return fail(oc->ld, node_pos(kn), disp(oc, rel, path, sizeof(path)),
                        "unknown key \"%.40s...\"", key);
        disp(oc, full, path, sizeof(path));
        for (q = map->data.mapping.pairs.start; q < p; q++) {
            const yaml_node_t *qk = yaml_document_get_node(doc, q->key);
            if (qk && qk->type == YAML_SCALAR_NODE && !strcmp(scalar_str(qk), key)) {
                struct pos first = node_pos(qk);
                return fail(oc->ld, node_pos(kn), path, "duplicate key (first given at %lu:%lu)",
                            first.line, first.col);
            }
        }
        /* keys are written as nested mappings, never as "a.b: v" */
        if (strchr(key, '.') || strchr(key, '['))
            k = NULL;
        else
            k = find_key(oc->schema, full);
        if (k) {
            rc = load_leaf(oc, k, vn);
        } else if (!strchr(key, '.') && !strchr(key, '[') && is_section(oc->schema, full)) {
            if (is_null(vn))
                rc = 0;
            else if (vn->type != YAML_MAPPING_NODE)
                rc = fail(oc->ld, node_pos(vn), path, "expected a mapping, got %s", node_kind(vn));
            else
                rc = walk_map(oc, vn, full);
        } else {
            rc = unknown_key(oc, rel, key, kn);
        }
        if (rc)
            return rc;
    }
    return 0;
}

static int apply_default(struct obj *oc, const struct cis_cfg_key *k)
{
    char path[CFG_PATH_MAX], why[CFG_WHY_MAX];
    void *dst = field(oc, k);
    char *s;
    int rc;

    if (!k->def || k->type == CIS_CFG_MAPLIST)
        return 0;
    disp(oc, k->path, path, sizeof(path));
    if (k->type == CIS_CFG_LIST) {
        free_field(k, dst);
        s = strdup(k->def);
        if (!s || list_push(dst, s))
            return oom(oc->ld);
        return 0;
    }
    rc = set_scalar(k, k->def, dst, why, sizeof(why));
    if (rc == CIS_ENOMEM)
        return oom(oc->ld);
    if (rc)
        return fail_nopos(oc->ld, CIS_ECONFIG, "%s: invalid default in schema: %s", path, why);
    return 0;
}

/* Fill PTR from mapping NODE (NULL: empty) with SCHEMA: walk the keys written, then
 * required keys and defaults, then the schema's check. BASE is where "the enclosing
 * mapping" of a missing key is; PREFIX is put before every path in messages. */
static int load_obj(struct ld *ld, const struct cis_cfg_schema *schema, void *ptr,
                    const yaml_node_t *node, struct pos base, const char *prefix)
{
    struct obj oc = {ld, schema, ptr, node, base, prefix};
    const struct cis_cfg_key *k;
    char path[CFG_PATH_MAX];
    int rc;

    if (node && (rc = walk_map(&oc, node, "")))
        return rc;
    for (k = schema->keys; k->path; k++) {
        const yaml_node_t *near;
        const yaml_node_t *n = lookup(ld->doc, node, k->path, &near);

        if (n && !is_null(n))
            continue;
        if (k->required)
            return fail(ld, locate(&oc, k->path), disp(&oc, k->path, path, sizeof(path)),
                        "is required");
        if ((rc = apply_default(&oc, k)))
            return rc;
    }
    if (schema->check) {
        struct cis_cfg_report r = {&oc};
        /* a check that fails without reporting still fails the load */
        if (schema->check(ptr, &r) && !ld->rc) {
            size_t plen = strlen(prefix);
            snprintf(path, sizeof(path), "%.*s", (int)(plen ? plen - 1 : 0), prefix);
            return fail(ld, base, path, "is not valid");
        }
        return ld->rc;
    }
    return 0;
}

void cis_cfg_report_error(struct cis_cfg_report *r, const char *path, const char *fmt, ...)
{
    struct obj *oc = r->oc;
    char full[CFG_PATH_MAX], msg[CFG_WHY_MAX];
    va_list ap;

    if (oc->ld->rc)
        return;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);
    if (!path || !*path) { /* about the object itself: its path without the trailing dot */
        size_t plen = strlen(oc->prefix);
        bfmt(full, sizeof(full), "%.*s", (int)(plen ? plen - 1 : 0), oc->prefix);
        fail(oc->ld, oc->base, full, "%s", msg);
        return;
    }
    fail(oc->ld, locate(oc, path), disp(oc, path, full, sizeof(full)), "%s", msg);
}

int cis_config_load_string(const char *name, const char *yaml, size_t len,
                           const struct cis_cfg_schema *schema, void *obj, char *err, size_t errlen)
{
    yaml_parser_t parser;
    yaml_document_t doc, extra;
    int have_parser = 0, have_doc = 0;
    struct ld ld = {name ? name : "<config>", &doc, err, errlen, 0};
    struct pos top = {1, 1};
    const yaml_node_t *root;

    if (err && errlen)
        err[0] = '\0';
    if (!yaml)
        yaml = ""; /* libyaml insists on a non-NULL input */
    if (!yaml_parser_initialize(&parser)) {
        oom(&ld);
        goto out;
    }
    have_parser = 1;
    yaml_parser_set_input_string(&parser, (const unsigned char *)yaml, len);
    if (!yaml_parser_load(&parser, &doc)) {
        if (parser.error == YAML_MEMORY_ERROR)
            oom(&ld);
        else
            fail(&ld, pos_of(parser.problem_mark), NULL, "%s",
                 parser.problem ? parser.problem : "invalid YAML");
        goto out;
    }
    have_doc = 1;
    root = yaml_document_get_root_node(&doc);
    if (root && !is_null(root) && root->type != YAML_MAPPING_NODE) {
        fail(&ld, node_pos(root), NULL, "expected a mapping at the top level, got %s",
             node_kind(root));
        goto out;
    }
    /* a second document would be silently ignored; say so instead */
    if (!yaml_parser_load(&parser, &extra)) {
        if (parser.error == YAML_MEMORY_ERROR)
            oom(&ld);
        else
            fail(&ld, pos_of(parser.problem_mark), NULL, "%s",
                 parser.problem ? parser.problem : "invalid YAML");
        goto out;
    }
    if (yaml_document_get_root_node(&extra))
        fail(&ld, node_pos(yaml_document_get_root_node(&extra)), NULL,
             "only one YAML document is allowed");
    yaml_document_delete(&extra);
    if (ld.rc)
        goto out;
    load_obj(&ld, schema, obj, root && root->type == YAML_MAPPING_NODE ? root : NULL, top, "");
out:
    if (have_doc)
        yaml_document_delete(&doc);
    if (have_parser)
        yaml_parser_delete(&parser);
    if (ld.rc)
        cis_config_free(schema, obj);
    return ld.rc;
}

int cis_config_load(const char *file, const struct cis_cfg_schema *schema, void *obj, char *err,
                    size_t errlen)
{
    FILE *f = NULL;
    char *data = NULL;
    size_t len = 0, cap = 0;
    int rc = 0;

    f = fopen(file, "rb");
    if (!f) {
        if (err && errlen)
            snprintf(err, errlen, "%s: cannot open: %s", file, strerror(errno));
        rc = CIS_EIO;
        goto out;
    }
    for (;;) {
        size_t n;
        if (len == cap) {
            char *p;
            if (cap >= CFG_FILE_MAX) {
                if (err && errlen)
                    snprintf(err, errlen, "%s: is larger than %u bytes", file, CFG_FILE_MAX);
                rc = CIS_ECONFIG;
                goto out;
            }
            cap = cap ? cap * 2 : 4096;
            p = realloc(data, cap);
            if (!p) {
                if (err && errlen)
                    snprintf(err, errlen, "%s: out of memory", file);
                rc = CIS_ENOMEM;
                goto out;
            }
            data = p;
        }
        n = fread(data + len, 1, cap - len, f);
        len += n;
        if (n == 0)
            break;
    }
    if (ferror(f)) {
        if (err && errlen)
            snprintf(err, errlen, "%s: cannot read: %s", file, strerror(errno));
        rc = CIS_EIO;
        goto out;
    }
    rc = cis_config_load_string(file, data ? data : "", len, schema, obj, err, errlen);
out:
    if (f)
        fclose(f);
    free(data);
    if (rc)
        cis_config_free(schema, obj);
    return rc;
}

void cis_config_free(const struct cis_cfg_schema *schema, void *obj)
{
    const struct cis_cfg_key *k;

    if (!schema || !obj)
        return;
    for (k = schema->keys; k->path; k++)
        free_field(k, (char *)obj + k->offset);
}

static void print_keys(const struct cis_cfg_schema *schema, FILE *f, const char *prefix)
{
    const struct cis_cfg_key *k;
    char path[CFG_PATH_MAX], type[CFG_WHY_MAX];

    for (k = schema->keys; k->path; k++) {
        snprintf(path, sizeof(path), "%s%s", prefix, k->path);
        if (k->type == CIS_CFG_ENUM) {
            enum_list(type, sizeof(type), k->enum_values);
            for (char *c = type; (c = strstr(c, ", ")) != NULL;) {
                c[0] = '|';
                memmove(c + 1, c + 2, strlen(c + 2) + 1);
            }
        } else {
            snprintf(type, sizeof(type), "%s", type_name(k->type));
        }
        if (k->required)
            fprintf(f, "%s (%s, required): %s\n", path, type, k->help ? k->help : "");
        else if (k->def && k->type != CIS_CFG_MAPLIST)
            fprintf(f, "%s (%s, default %s): %s\n", path, type, k->def, k->help ? k->help : "");
        else
            fprintf(f, "%s (%s): %s\n", path, type, k->help ? k->help : "");
        if (k->type == CIS_CFG_MAPLIST && k->sub) {
            snprintf(path, sizeof(path), "%s%s[].", prefix, k->path);
            print_keys(k->sub, f, path);
        }
    }
}

void cis_config_print_help(const struct cis_cfg_schema *schema, void *f)
{
    print_keys(schema, f, "");
}

int cis_parse_hostport(const char *s, char *host, size_t hostlen, unsigned *port, char *why,
                        size_t whylen)
{
    const char *h, *colon;
    size_t hl;
    char *end;
    unsigned long p;

    if (s == NULL || s[0] == '\0') {
        snprintf(why, whylen, "is empty (want host:port)");
        return CIS_EINVAL;
    }
    if (s[0] == '[') {
        const char *rb = strchr(s, ']');
        if (rb == NULL || rb[1] != ':') {
            snprintf(why, whylen, "is not [v6-address]:port");
            return CIS_EINVAL;
        }
        h = s + 1;
        hl = (size_t)(rb - h);
        colon = rb + 1;
    } else {
        colon = strrchr(s, ':');
        if (colon == NULL) {
            snprintf(why, whylen, "has no port (want host:port)");
            return CIS_EINVAL;
        }
        h = s;
        hl = (size_t)(colon - s);
        if (memchr(h, ':', hl) != NULL) {
            snprintf(why, whylen, "is ambiguous: write an IPv6 address as [addr]:port");
            return CIS_EINVAL;
        }
    }
    if (hl == 0 || hl >= hostlen) {
        snprintf(why, whylen, "has an empty or too long host");
        return CIS_EINVAL;
    }
    if (colon[1] < '0' || colon[1] > '9') {
        snprintf(why, whylen, "has no port number (want host:port)");
        return CIS_EINVAL;
    }
    errno = 0;
    p = strtoul(colon + 1, &end, 10);
    if (errno != 0 || *end != '\0' || p > 65535) {
        snprintf(why, whylen, "has a bad port (want 0..65535)");
        return CIS_EINVAL;
    }
    memcpy(host, h, hl);
    host[hl] = '\0';
    *port = (unsigned)p;
    return 0;
}
