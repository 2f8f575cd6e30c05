/* Table-driven YAML configuration (libyaml): every key declared once with its type,
 * default and help; errors read "FILE:LINE:COL: key.path: what is wrong". */
#ifndef CISTERN_CONFIG_H
#define CISTERN_CONFIG_H

#include <stddef.h>
#include <stdint.h>

enum cis_cfg_type {
    CIS_CFG_STRING,   /* char * (malloc'd, freed by cis_config_free); NULL when unset */
    CIS_CFG_INT,      /* int64_t; "min"/"max" bound it when max > min */
    CIS_CFG_BOOL,     /* int: 0 or 1; YAML true/false/yes/no/on/off */
    CIS_CFG_ENUM,     /* int: index into enum_values */
    CIS_CFG_DURATION, /* int64_t milliseconds: "250ms", "30s", "5m", "1h", "7d" */
    CIS_CFG_SIZE,     /* uint64_t bytes: "512KiB", "64MiB", "1GiB", "1TiB", or plain bytes */
    CIS_CFG_LIST,     /* struct cis_strlist: a YAML sequence of scalars (a lone scalar is a
                       * list of one) */
    CIS_CFG_MAPLIST,  /* struct cis_maplist: a YAML sequence of mappings, each parsed with
                       * .sub into an item of .item_size bytes */
};

struct cis_strlist {
    char **v; /* n malloc'd strings */
    size_t n;
};

struct cis_maplist {
    void *items; /* n items of the key's item_size bytes each, contiguous */
    size_t n;
};

struct cis_cfg_report;
struct cis_cfg_schema;

struct cis_cfg_key {
    const char *path;                /* dotted path from the schema root: "forward.batch.max_bytes" */
    enum cis_cfg_type type;
    size_t offset;                   /* offsetof() into the target struct */
    const char *def;                 /* default, written as in YAML ("200ms"); NULL = no default */
    const char *help;                /* one line, shown by --help-config and in errors for enums */
    int required;                    /* 1: missing key is an error */
    const char *const *enum_values;  /* CIS_CFG_ENUM: NULL-terminated */
    int64_t min, max;                /* CIS_CFG_INT/DURATION/SIZE bounds, checked when max > min */
    const struct cis_cfg_schema *sub; /* CIS_CFG_MAPLIST: schema of one item */
    size_t item_size;                /* CIS_CFG_MAPLIST: sizeof one item */
};

struct cis_cfg_schema {
    const struct cis_cfg_key *keys; /* terminated by an entry with path == NULL */
    /* Optional cross-key check, run after all keys (and defaults) are set. OBJ is the
     * struct being filled (for a MAPLIST item: the item). Report problems with
     * cis_cfg_report_error(); return 0 if fine, non-zero after reporting. */
    int (*check)(void *obj, struct cis_cfg_report *r);
};

/* From a schema's check callback: report an error about PATH (relative to the object being
 * checked, e.g. "path" inside an input item) at the location where that key was written, or,
 * when it was not written, at the location of the enclosing mapping. The first reported
 * error is the one returned by the loader. */
void cis_cfg_report_error(struct cis_cfg_report *r, const char *path, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

/* Load FILE against SCHEMA into OBJ (which the caller has zeroed). Scalars may use ${VAR}
 * to take a value from the environment; an unset VAR is an error. Unknown keys are errors
 * that suggest the nearest known key. Returns 0, or CIS_ECONFIG / CIS_EIO with the message
 * ("FILE:LINE:COL: key.path: what is wrong", lines and columns from 1) in ERR. On error OBJ
 * is left freed (as by cis_config_free) and zeroed. */
int cis_config_load(const char *file, const struct cis_cfg_schema *schema, void *obj, char *err,
                    size_t errlen);

/* The same from memory; NAME stands for the file name in messages. */
int cis_config_load_string(const char *name, const char *yaml, size_t len,
                           const struct cis_cfg_schema *schema, void *obj, char *err,
                           size_t errlen);

/* Free everything the loader allocated inside OBJ (strings, lists, maplist items,
 * recursively). Accepts a zeroed OBJ. Does not free OBJ itself. */
void cis_config_free(const struct cis_cfg_schema *schema, void *obj);

/* Print every key of SCHEMA with its type, default and help, one per line, to F (FILE *). */
void cis_config_print_help(const struct cis_cfg_schema *schema, void *f);

/* Parsers used by the loader, exposed for tests and for command-line flags.
 * Each returns 0, or CIS_EINVAL with a reason (e.g. "is not a size (try 256KiB)") in WHY. */
int cis_parse_size(const char *s, uint64_t *out, char *why, size_t whylen);
int cis_parse_duration(const char *s, int64_t *out_ms, char *why, size_t whylen);
/* Split "host:port" or "[v6]:port" into HOST (brackets removed) and PORT (0..65535). */
int cis_parse_hostport(const char *s, char *host, size_t hostlen, unsigned *port, char *why,
                       size_t whylen);

#endif
