/* `cistern-receiver device ...` (device_cmd.h): register gateways and the credentials their
 * batches are signed with in the store's device registry; list, show, revoke, enable them. */
#include "device_cmd.h"

#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <pwd.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <cistern/backoff.h>
#include <cistern/codec.h>
#include <cistern/err.h>
#include <cistern/sign.h>

#include "api.h"
#include "recv_config.h"
#include "registry.h"
#include "store/store.h"

#define PROG "cistern-receiver device"
#define APPLY_NOTE "running receivers apply it within %d s"
#define APPLY_S (RECV_REGISTRY_TTL_MAX_MS / 1000)

/* ---- help ---- */

static void device_usage(FILE *f, const char *config_path)
{
    fprintf(f,
            "Usage: cistern-receiver [-c FILE] device COMMAND [ARGS]\n"
            "\n"
            "The device registry in the receiver's store (store.path of %s): the\n"
            "gateways allowed to deliver batches, and the key or secret each signs them with.\n"
            "Running receivers apply a change within %d s.\n"
            "\n"
            "Commands:\n"
            "  add ID (--key FILE | --fingerprint sha256:HEX) [--hmac-secret-file FILE] [--force]\n"
            "                     register a gateway with its key and/or HMAC secret\n"
            "  list [--json]      every registered gateway (never its secret)\n"
            "  show ID [--json]   one gateway, and what the store knows of its deliveries\n"
            "  revoke ID          refuse its batches (it stays registered)\n"
            "  enable ID          accept its batches again\n"
            "\n"
            "`cistern-receiver device COMMAND --help` tells more.\n"
            "Exit status: 0 done, 1 failed (nothing was changed), 2 bad usage.\n",
            config_path, APPLY_S);
}

static void add_usage(FILE *f)
{
    fprintf(
        f,
        "Usage: cistern-receiver [-c FILE] device add ID (--key FILE | --fingerprint sha256:HEX)\n"
        "           [--hmac-secret-file FILE] [--force]\n"
        "\n"
        "Registers gateway ID (its agent.id: 1 to %d of A-Z a-z 0-9 . _ : @ -), enabled,\n"
        "with the credential its batches must be signed with: at least a key or a secret.\n"
        "\n"
        "      --key FILE               the gateway's ECDSA P-256 public key, from its\n"
        "                               certificate signing request, its certificate or the\n"
        "                               key itself (PEM or DER)\n"
        "      --fingerprint sha256:HEX the key's fingerprint, as `cistern-agent enroll`\n"
        "                               printed it on the gateway; with --key both must name\n"
        "                               the same key, or nothing is registered\n"
        "      --hmac-secret-file FILE  a secret shared with the gateway (HMAC-SHA256): %d to\n"
        "                               %d bytes, the file mode 0600 or 0400\n"
        "      --force                  ID is registered already: replace its credentials\n"
        "                               and enable it (without it, it is refused)\n"
        "  -h, --help                   this help\n",
        RECV_DEVICE_ID_MAX - 1, CIS_HMAC_SECRET_MIN, CIS_HMAC_SECRET_MAX);
}

static void list_usage(FILE *f)
{
    fprintf(f, "Usage: cistern-receiver [-c FILE] device list [--json]\n"
               "\n"
               "Every registered gateway, by id: ID, STATE (enabled or revoked), KEY (the key's\n"
               "fingerprint, or -), HMAC (yes when it has a secret; the secret is never shown),\n"
               "CHANGED (the last add, revoke or enable, UTC).\n"
               "\n"
               "      --json       a JSON array of objects instead of the table\n"
               "  -h, --help       this help\n");
}

static void show_usage(FILE *f)
{
    fprintf(f, "Usage: cistern-receiver [-c FILE] device show ID [--json]\n"
               "\n"
               "Gateway ID as `device list` shows it, with when it was added, and what the store\n"
               "knows of its deliveries: first and last seen, records stored, replayed batches\n"
               "(batches of which no record was new), or \"never delivered\".\n"
               "\n"
               "      --json       a JSON object instead of the text\n"
               "  -h, --help       this help\n");
}

static void revoke_usage(FILE *f)
{
    fprintf(f,
            "Usage: cistern-receiver [-c FILE] device revoke ID\n"
            "\n"
            "Refuse gateway ID's batches from now on: running receivers apply it within %d s.\n"
            "It stays registered with its credentials; `device enable ID` undoes it.\n"
            "\n"
            "  -h, --help       this help\n",
            APPLY_S);
}

static void enable_usage(FILE *f)
{
    fprintf(f,
            "Usage: cistern-receiver [-c FILE] device enable ID\n"
            "\n"
            "Accept gateway ID's batches again after `device revoke`: running receivers apply\n"
            "it within %d s.\n"
            "\n"
            "  -h, --help       this help\n",
            APPLY_S);
}

/* ---- helpers ---- */

/* The agent id rule (cis_agent_id_char_ok, 1..256 characters). Returns 0 or CIS_EINVAL with
 * the reason in ERR. */
static int check_id(const char *id, char *err, size_t errlen)
{
    size_t n = strlen(id);

    if (n == 0) {
        cis_set_err(err, errlen, "the id is empty");
        return CIS_EINVAL;
    }
    if (n >= RECV_DEVICE_ID_MAX) {
        cis_set_err(err, errlen, "the id is %zu characters; at most %d", n, RECV_DEVICE_ID_MAX - 1);
        return CIS_EINVAL;
    }
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)id[i];
        if (cis_agent_id_char_ok(c))
            continue;
        if (c > 0x20 && c < 0x7f)
            cis_set_err(err, errlen, "the id \"%s\" has '%c'; use only A-Z a-z 0-9 . _ : @ -", id,
                        c);
        else
            cis_set_err(err, errlen,
                        "the id has byte 0x%02x at %zu; use only A-Z a-z 0-9 . _ : @ -", c, i);
        return CIS_EINVAL;
    }
    return 0;
}

/* MS (wall clock) as "YYYY-MM-DDTHH:MM:SSZ". */
static void iso_utc(int64_t ms, char out[32])
{
    time_t t = (time_t)(ms / 1000);
    struct tm tm;

    if (gmtime_r(&t, &tm) == NULL || strftime(out, 32, "%Y-%m-%dT%H:%M:%SZ", &tm) == 0)
        snprintf(out, 32, "%" PRId64 " ms", ms);
}

/* The common start of every subcommand: parse ARGV (ARGV[0] is the subcommand) with the long
 * options OPTS (plus --help), leaving optind at the first operand. Returns 0 with SEEN[val]
 * set and VALS[val] its value for each option seen (vals below 128), 1 after --help (printed),
 * or 2 after a usage error (printed). */
static int parse_opts(const char *sub, int argc, char **argv, const struct option *opts,
                      void (*usage)(FILE *), const char **vals, int *seen)
{
    int c;

    optind = 0; /* GNU getopt: start afresh, whatever parsed argv before */
    opterr = 0; /* our own words, with the command's name */
    while ((c = getopt_long(argc, argv, ":h", opts, NULL)) != -1) {
        if (c == 'h') {
            usage(stdout);
            return 1;
        }
        if (c > 0 && c < 128 && c != ':' && c != '?') {
            seen[c] = 1;
            vals[c] = optarg;
            continue;
        }
        /* Only long options take values: ARGV[optind - 1] is the one missing it. */
        if (c == ':')
            fprintf(stderr, PROG " %s: a value is missing after %s\n", sub, argv[optind - 1]);
        else if (optopt)
            fprintf(stderr, PROG " %s: unknown option -%c\n", sub, optopt);
        else
            fprintf(stderr, PROG " %s: unknown option %s\n", sub, argv[optind - 1]);
        if (c == '?' && (optopt == 'c' || strcmp(argv[optind - 1], "--config") == 0))
            fprintf(stderr,
                    PROG ": give -c FILE before 'device': cistern-receiver -c FILE device"
                         " %s ...\n",
                    sub);
        usage(stderr);
        return 2;
    }
    return 0;
}

/* Exactly one operand, a valid id, at optind. Returns it, or NULL after a usage message. */
static const char *one_id(const char *sub, int argc, char **argv, void (*usage)(FILE *))
{
    char err[300];

    if (optind >= argc) {
        fprintf(stderr, PROG " %s: the device id is missing\n", sub);
        usage(stderr);
        return NULL;
    }
    if (optind + 1 < argc) {
        fprintf(stderr, PROG " %s: unexpected argument \"%s\"\n", sub, argv[optind + 1]);
        usage(stderr);
        return NULL;
    }
    if (check_id(argv[optind], err, sizeof err) != 0) {
        fprintf(stderr, PROG " %s: %s\n", sub, err);
        return NULL;
    }
    return argv[optind];
}

/* Open the store of the receiver configuration CONFIG_PATH. Unless MAY_CREATE, a store that
 * does not exist is an error (a mistyped store.path must not leave an empty store behind).
 * Returns 0 with *OPS / *ST set (close with (*OPS)->close), or 1 after a message. */
static int store_open(const char *config_path, int may_create, const struct recv_store_ops **ops,
                      struct recv_store **st)
{
    struct recv_config cfg;
    struct recv_store_opts so = {0};
    struct stat sb;
    char err[1024];
    int ret = 1;

    *st = NULL;
    if (recv_config_load(config_path, &cfg, err, sizeof err) != 0) {
        fprintf(stderr, PROG ": %s\n", err);
        return 1;
    }
    if (stat(cfg.store_path, &sb) != 0) {
        if (errno != ENOENT) {
            fprintf(stderr, PROG ": %s: %s\n", cfg.store_path, strerror(errno));
            goto out;
        }
        if (!may_create) {
            fprintf(stderr,
                    PROG ": %s (store.path in %s) does not exist: no device is registered"
                         " there, and no receiver has run with it\n",
                    cfg.store_path, config_path);
            goto out;
        }
        /* root would make a store only root can open: the receiver (User=cistern in the
         * shipped unit) would then fail to start. The directory's owner is the one to run
         * this as. */
        if (geteuid() == 0) {
            char dir[4096];
            const char *slash = strrchr(cfg.store_path, '/');
            if (slash == NULL)
                snprintf(dir, sizeof dir, ".");
            else
                snprintf(dir, sizeof dir, "%.*s",
                         slash == cfg.store_path ? 1 : (int)(slash - cfg.store_path),
                         cfg.store_path);
            if (stat(dir, &sb) == 0 && sb.st_uid != 0) {
                struct passwd *pw = getpwuid(sb.st_uid);
                fprintf(stderr,
                        PROG ": %s does not exist, and made by root it would belong to root,"
                             " which the receiver's user could not open; run this as the owner"
                             " of %s (sudo -u %s ...), or start the receiver once first\n",
                        cfg.store_path, dir, pw ? pw->pw_name : "OWNER");
                goto out;
            }
        }
    }
    *ops = recv_store_find("sqlite");
    so.path = cfg.store_path;
    so.sync_full = cfg.store_sync == RECV_SYNC_FULL;
    so.busy_timeout_ms = 5000; /* a running receiver may hold the write lock for a batch */
    if ((*ops)->open(&so, st, err, sizeof err) != 0) {
        fprintf(stderr, PROG ": cannot open the %s store: %s\n", (*ops)->name, err);
        goto out;
    }
    ret = 0;
out:
    recv_config_free(&cfg);
    return ret;
}

/* A registry entry without its secret, as listed. */
struct row {
    char id[RECV_DEVICE_ID_MAX];
    char fpr[CIS_FPR_STR_LEN]; /* "-" when none */
    int hmac, enabled;
    int64_t added_ms, changed_ms;
};

static void row_of(const struct recv_device *d, struct row *r)
{
    memset(r, 0, sizeof *r);
    snprintf(r->id, sizeof r->id, "%s", d->id);
    if (d->has_fpr)
        cis_fpr_format(d->fpr, r->fpr);
    else
        snprintf(r->fpr, sizeof r->fpr, "-");
    r->hmac = d->secret_len > 0;
    r->enabled = d->enabled;
    r->added_ms = d->added_ms;
    r->changed_ms = d->changed_ms;
}

/* The JSON object of R, without its closing brace (show adds the agent). */
static void row_json(struct recv_buf *b, const struct row *r)
{
    recv_buf_add(b, "{\"id\":", 6);
    recv_buf_json_str(b, r->id, strlen(r->id));
    recv_buf_addf(b, ",\"state\":\"%s\",\"enabled\":%s,\"fingerprint\":",
                  r->enabled ? "enabled" : "revoked", r->enabled ? "true" : "false");
    if (strcmp(r->fpr, "-") == 0)
        recv_buf_add(b, "null", 4);
    else
        recv_buf_json_str(b, r->fpr, strlen(r->fpr));
    recv_buf_addf(b, ",\"hmac\":%s,\"added_ms\":%" PRId64 ",\"changed_ms\":%" PRId64,
                  r->hmac ? "true" : "false", r->added_ms, r->changed_ms);
}

/* Print B (JSON) and a newline, or an error when it ran out of memory. Returns 0 or 1. */
static int print_json(struct recv_buf *b)
{
    int ret = 0;

    if (b->oom || b->p == NULL) {
        fprintf(stderr, PROG ": out of memory\n");
        ret = 1;
    } else {
        printf("%s\n", b->p);
    }
    recv_buf_free(b);
    return ret;
}

static void print_row_text(const struct row *r)
{
    char added[32], changed[32];

    iso_utc(r->added_ms, added);
    iso_utc(r->changed_ms, changed);
    printf("id:               %s\n"
           "state:            %s\n"
           "key:              %s\n"
           "hmac:             %s\n"
           "added:            %s\n"
           "changed:          %s\n",
           r->id, r->enabled ? "enabled" : "revoked", r->fpr, r->hmac ? "yes" : "no", added,
           changed);
}

/* ---- add ---- */

static int cmd_add(const char *config_path, int argc, char **argv)
{
    static const struct option opts[] = {
        {"key", required_argument, NULL, 'k'},
        {"fingerprint", required_argument, NULL, 'f'},
        {"hmac-secret-file", required_argument, NULL, 's'},
        {"force", no_argument, NULL, 'F'},
        {"help", no_argument, NULL, 'h'},
        {0},
    };
    const char *vals[128] = {0};
    int seen[128] = {0};
    const struct recv_store_ops *ops = NULL;
    struct recv_store *st = NULL;
    struct recv_device d, cur;
    struct row r;
    uint8_t given[CIS_FPR_LEN];
    char err[1024], a[CIS_FPR_STR_LEN], b[CIS_FPR_STR_LEN];
    const char *id;
    int rc, existed = 0, ret = 1;

    memset(&d, 0, sizeof d);
    memset(&cur, 0, sizeof cur);
    rc = parse_opts("add", argc, argv, opts, add_usage, vals, seen);
    if (rc)
        return rc == 1 ? 0 : 2;
    id = one_id("add", argc, argv, add_usage);
    if (id == NULL)
        return 2;
    if (!seen['k'] && !seen['f'] && !seen['s']) {
        fprintf(stderr, PROG " add: give the gateway's key (--key FILE or --fingerprint"
                             " sha256:HEX) and/or --hmac-secret-file FILE\n");
        add_usage(stderr);
        return 2;
    }
    if (seen['f'] && cis_fpr_parse(vals['f'], given) != 0) {
        fprintf(stderr, PROG " add: --fingerprint \"%s\" is not sha256: and 64 hex digits\n",
                vals['f']);
        return 2;
    }
    snprintf(d.id, sizeof d.id, "%s", id);
    d.enabled = 1;

    /* Every credential is read and checked before the store is opened: a refusal changes
     * nothing. */
    if (seen['k']) {
        if (cis_fpr_of_file(vals['k'], d.fpr, err, sizeof err) != 0) {
            fprintf(stderr, PROG " add: %s; nothing registered\n", err);
            goto out;
        }
        /* The operator compares the key file's fingerprint with the one read off the
         * gateway: a mismatch means the file is not that gateway's key. */
        if (seen['f'] && memcmp(d.fpr, given, CIS_FPR_LEN) != 0) {
            cis_fpr_format(d.fpr, a);
            cis_fpr_format(given, b);
            fprintf(stderr,
                    PROG " add: the key in %s is %s, not %s (--fingerprint): it is not the"
                         " key that gateway has; nothing registered\n",
                    vals['k'], a, b);
            goto out;
        }
        d.has_fpr = 1;
    } else if (seen['f']) {
        memcpy(d.fpr, given, CIS_FPR_LEN);
        d.has_fpr = 1;
    }
    if (seen['s'] &&
        cis_hmac_secret_load(vals['s'], d.secret, &d.secret_len, err, sizeof err) != 0) {
        fprintf(stderr, PROG " add: %s; nothing registered\n", err);
        goto out;
    }

    if (store_open(config_path, 1, &ops, &st) != 0)
        goto out;
    if (seen['F'])
        existed = ops->device_get(st, id, &cur) == 0; /* only for the message */
    rc = ops->device_put(st, &d, seen['F'], cis_wall_ms());
    if (rc == CIS_EEXIST) {
        fprintf(stderr, PROG " add: %s: already registered; --force replaces its credentials\n",
                id);
        goto out;
    }
    if (rc != 0) {
        fprintf(stderr, PROG " add: %s: not registered: %s\n", id, cis_strerror(rc));
        goto out;
    }
    /* Print what the store holds now (with --force, added stays the first add's). */
    if (ops->device_get(st, id, &cur) != 0)
        cur = d;
    row_of(&cur, &r);
    printf("%s: %s\n", id, existed ? "credentials replaced, enabled (--force)" : "registered");
    print_row_text(&r);
    printf(APPLY_NOTE "\n", APPLY_S);
    ret = 0;
out:
    if (ops != NULL)
        ops->close(st);
    explicit_bzero(&d, sizeof d);
    explicit_bzero(&cur, sizeof cur);
    return ret;
}

/* ---- list ---- */

struct rows {
    struct row *v;
    size_t n, cap;
};

static int collect_row(void *ud, const struct recv_device *d)
{
    struct rows *rs = ud;

    if (rs->n == rs->cap) {
        size_t cap = rs->cap ? rs->cap * 2 : 64;
        struct row *v = realloc(rs->v, cap * sizeof *v);
        if (v == NULL)
            return CIS_ENOMEM;
        rs->v = v;
        rs->cap = cap;
    }
    row_of(d, &rs->v[rs->n++]);
    return 0;
}

static int cmd_list(const char *config_path, int argc, char **argv)
{
    static const struct option opts[] = {
        {"json", no_argument, NULL, 'j'},
        {"help", no_argument, NULL, 'h'},
        {0},
    };
    const char *vals[128] = {0};
    int seen[128] = {0};
    const struct recv_store_ops *ops = NULL;
    struct recv_store *st = NULL;
    struct rows rs = {0};
    int rc, ret = 1;

    rc = parse_opts("list", argc, argv, opts, list_usage, vals, seen);
    if (rc)
        return rc == 1 ? 0 : 2;
    if (optind < argc) {
        fprintf(stderr, PROG " list: unexpected argument \"%s\"\n", argv[optind]);
        list_usage(stderr);
        return 2;
    }
    if (store_open(config_path, 0, &ops, &st) != 0)
        return 1;
    rc = ops->device_list(st, collect_row, &rs);
    ops->close(st);
    if (rc != 0) {
        fprintf(stderr, PROG " list: %s\n", cis_strerror(rc));
        goto out;
    }
    if (seen['j']) {
        struct recv_buf b = {0};
        recv_buf_add(&b, "[", 1);
        for (size_t i = 0; i < rs.n; i++) {
            if (i)
                recv_buf_add(&b, ",", 1);
            row_json(&b, &rs.v[i]);
            recv_buf_add(&b, "}", 1);
        }
        recv_buf_add(&b, "]", 1);
        ret = print_json(&b);
        goto out;
    }
    if (rs.n == 0) {
        printf("no devices registered\n");
    } else {
        int wid = 2, wkey = 3;
        for (size_t i = 0; i < rs.n; i++) {
            int l = (int)strlen(rs.v[i].id), k = (int)strlen(rs.v[i].fpr);
            wid = l > wid ? l : wid;
            wkey = k > wkey ? k : wkey;
        }
        printf("%-*s  %-7s  %-*s  %-4s  %s\n", wid, "ID", "STATE", wkey, "KEY", "HMAC", "CHANGED");
        for (size_t i = 0; i < rs.n; i++) {
            char changed[32];
            iso_utc(rs.v[i].changed_ms, changed);
            printf("%-*s  %-7s  %-*s  %-4s  %s\n", wid, rs.v[i].id,
                   rs.v[i].enabled ? "enabled" : "revoked", wkey, rs.v[i].fpr,
                   rs.v[i].hmac ? "yes" : "no", changed);
        }
    }
    ret = 0;
out:
    free(rs.v);
    return ret;
}

/* ---- show ---- */

struct agent_find {
    const char *id;
    struct recv_agent_info a; /* id not kept: valid only in the callback */
    int found;
};

/* Agents come ordered by id: stop at ID, or at the first id after it. */
static int find_agent(void *ud, const struct recv_agent_info *a)
{
    struct agent_find *f = ud;
    int c = strcmp(a->id, f->id);

    if (c < 0)
        return 0;
    if (c == 0) {
        f->a = *a;
        f->a.id = NULL;
        f->found = 1;
    }
    return 1;
}

static int cmd_show(const char *config_path, int argc, char **argv)
{
    static const struct option opts[] = {
        {"json", no_argument, NULL, 'j'},
        {"help", no_argument, NULL, 'h'},
        {0},
    };
    const char *vals[128] = {0};
    int seen[128] = {0};
    const struct recv_store_ops *ops = NULL;
    struct recv_store *st = NULL;
    struct recv_device d;
    struct agent_find af = {0};
    struct row r;
    const char *id;
    int rc, arc;

    memset(&d, 0, sizeof d);
    rc = parse_opts("show", argc, argv, opts, show_usage, vals, seen);
    if (rc)
        return rc == 1 ? 0 : 2;
    id = one_id("show", argc, argv, show_usage);
    if (id == NULL)
        return 2;
    if (store_open(config_path, 0, &ops, &st) != 0)
        return 1;
    rc = ops->device_get(st, id, &d);
    af.id = id;
    arc = ops->list_agents(st, find_agent, &af);
    ops->close(st);
    row_of(&d, &r);
    explicit_bzero(&d, sizeof d);
    if (rc == CIS_ENOTFOUND) {
        if (arc >= 0 && af.found)
            fprintf(stderr,
                    PROG " show: %s: not registered (the store holds %" PRId64 " records from it;"
                         " register it with `device add`)\n",
                    id, af.a.records);
        else
            fprintf(stderr, PROG " show: %s: not registered\n", id);
        return 1;
    }
    if (rc != 0 || arc < 0) {
        fprintf(stderr, PROG " show: %s: %s\n", id, cis_strerror(rc ? rc : arc));
        return 1;
    }
    if (seen['j']) {
        struct recv_buf b = {0};
        row_json(&b, &r);
        if (af.found)
            recv_buf_addf(&b,
                          ",\"agent\":{\"first_seen_ms\":%" PRId64 ",\"last_seen_ms\":%" PRId64
                          ",\"records\":%" PRId64 ",\"replayed_batches\":%" PRId64
                          ",\"spool_depth\":%" PRId64 ",\"oldest_pending_ms\":%" PRId64 "}}",
                          af.a.first_seen_ms, af.a.last_seen_ms, af.a.records,
                          af.a.replayed_batches, af.a.spool_depth, af.a.oldest_pending_ms);
        else
            recv_buf_add(&b, ",\"agent\":null}", 14);
        return print_json(&b);
    }
    print_row_text(&r);
    if (af.found) {
        char first[32], last[32];
        iso_utc(af.a.first_seen_ms, first);
        iso_utc(af.a.last_seen_ms, last);
        printf("first seen:       %s\n"
               "last seen:        %s\n"
               "records:          %" PRId64 "\n"
               "replayed batches: %" PRId64 "\n",
               first, last, af.a.records, af.a.replayed_batches);
    } else {
        printf("agent:            never delivered\n");
    }
    return 0;
}

/* ---- revoke, enable ---- */

static int set_enabled(const char *config_path, int argc, char **argv, int enabled)
{
    static const struct option opts[] = {
        {"help", no_argument, NULL, 'h'},
        {0},
    };
    const char *sub = enabled ? "enable" : "revoke";
    const char *state = enabled ? "enabled" : "revoked";
    void (*usage)(FILE *) = enabled ? enable_usage : revoke_usage;
    const char *vals[128] = {0};
    int seen[128] = {0};
    const struct recv_store_ops *ops = NULL;
    struct recv_store *st = NULL;
    struct recv_device d;
    const char *id;
    int rc, ret = 1;

    memset(&d, 0, sizeof d);
    rc = parse_opts(sub, argc, argv, opts, usage, vals, seen);
    if (rc)
        return rc == 1 ? 0 : 2;
    id = one_id(sub, argc, argv, usage);
    if (id == NULL)
        return 2;
    if (store_open(config_path, 0, &ops, &st) != 0)
        return 1;
    rc = ops->device_get(st, id, &d);
    if (rc == 0 && (d.enabled != 0) == enabled) {
        /* Nothing to do; changed_ms keeps telling when it last changed. */
        printf("%s: %s (it was %s already)\n", id, state, state);
        ret = 0;
        goto out;
    }
    if (rc == 0)
        rc = ops->device_set_enabled(st, id, enabled, cis_wall_ms());
    if (rc == CIS_ENOTFOUND) {
        fprintf(stderr, PROG " %s: %s: not registered\n", sub, id);
        goto out;
    }
    if (rc != 0) {
        fprintf(stderr, PROG " %s: %s: %s\n", sub, id, cis_strerror(rc));
        goto out;
    }
    printf("%s: %s (" APPLY_NOTE ")\n", id, state, APPLY_S);
    ret = 0;
out:
    ops->close(st);
    explicit_bzero(&d, sizeof d);
    return ret;
}

static int cmd_revoke(const char *config_path, int argc, char **argv)
{
    return set_enabled(config_path, argc, argv, 0);
}

static int cmd_enable(const char *config_path, int argc, char **argv)
{
    return set_enabled(config_path, argc, argv, 1);
}

/* ---- dispatch ---- */

int recv_device_main(const char *config_path, int argc, char **argv)
{
    static const struct {
        const char *name;
        int (*run)(const char *config_path, int argc, char **argv);
    } cmds[] = {
        {"add", cmd_add},       {"list", cmd_list},     {"show", cmd_show},
        {"revoke", cmd_revoke}, {"enable", cmd_enable},
    };

    if (argc < 2) {
        fprintf(stderr, PROG ": a command is missing\n");
        device_usage(stderr, config_path);
        return 2;
    }
    if (strcmp(argv[1], "--help") == 0 || strcmp(argv[1], "-h") == 0 ||
        strcmp(argv[1], "help") == 0) {
        device_usage(stdout, config_path);
        return 0;
    }
    for (size_t i = 0; i < sizeof cmds / sizeof cmds[0]; i++)
        if (strcmp(argv[1], cmds[i].name) == 0)
            return cmds[i].run(config_path, argc - 1, argv + 1);
    fprintf(stderr, PROG ": unknown command \"%s\"\n", argv[1]);
    device_usage(stderr, config_path);
    return 2;
}
