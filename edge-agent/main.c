/* cistern-agent: command line, the event loop, and the ingest queue that group-commits
 * records to the spool before any source is told "OK". */
#include <curl/curl.h>
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#ifdef __GLIBC__
#include <malloc.h>
#endif
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "agent.h"
#include "cistern/backoff.h"
#include "cistern/err.h"
#include "cistern/log.h"
#include "enroll.h"
#include "seal.h"
#include "spool.h"

#define DEFAULT_CONFIG "/etc/cistern/agent.yaml"

struct watch {
    int fd;
    short events;
    agent_fd_cb cb;
    void *ctx;
    uint64_t id;
};

struct ingest_rec {
    size_t off, len; /* payload in the arena */
    int has_stream;  /* the stream name follows the payload in the arena; else src->name */
    const struct agent_input_cfg *src;
    int64_t ts_ms;
    agent_ack_cb ack;
    void *ctx;
    uint64_t token;
};

struct agent {
    struct agent_config cfg;
    struct agent_spool *spool;
    struct agent_forwarder *fwd;
    struct agent_input *inputs;
    size_t ninputs;
    struct agent_counters counters;

    struct watch *watches;
    size_t nwatches, capwatches;
    uint64_t next_watch_id;

    /* The ingest queue: records waiting for the next group commit. */
    struct ingest_rec *recs;
    size_t nrecs, caprecs;
    uint8_t *arena;
    size_t arena_len, arena_cap;
    int64_t oldest_mono; /* when the first queued record arrived */
    int commit_failing;  /* the CIS_E* code of the failing commits; 0 while they work */

    struct agent_spool_opts spool_opts;
    struct agent_seal *seal;
    int spool_corrupt;      /* a spool call said CIS_ECORRUPT: recover at the next turn */
    int64_t next_expire;    /* monotonic: next TTL sweep */
    int commit_soon;        /* a source waits for its answer before it sends more */
    int64_t started_wall_ms;
    struct agent_control *control;
    /* The wall clock when poll last woke, for the records read in that turn: one clock read
     * per turn rather than per record. 0 outside the callbacks of a turn. */
    int64_t turn_wall_ms;
    int64_t busy_mono;  /* when records last came in or went out */
    int trimmed;        /* memory given back since then */
};

static volatile sig_atomic_t signals_seen;
static int sig_pipe[2] = {-1, -1};

static void on_signal(int sig)
{
    int saved = errno;
    signals_seen++;
    if (write(sig_pipe[1], "x", 1) < 0) {
        /* the pipe is full: a wake-up is already pending */
    }
    errno = saved;
}

struct agent_counters *agent_counters(struct agent *a)
{
    return &a->counters;
}

/* ---- event loop ---- */

int agent_loop_watch(struct agent *a, int fd, short events, agent_fd_cb cb, void *ctx)
{
    for (size_t i = 0; i < a->nwatches; i++) {
        if (a->watches[i].fd == fd) {
            a->watches[i].events = events;
            if (cb) {
                a->watches[i].cb = cb;
                a->watches[i].ctx = ctx;
            }
            return 0;
        }
    }
    if (!cb)
        return CIS_EINVAL;
    if (a->nwatches == a->capwatches) {
        size_t cap = a->capwatches ? a->capwatches * 2 : 16;
        struct watch *w = realloc(a->watches, cap * sizeof(*w));
        if (!w)
            return CIS_ENOMEM;
        a->watches = w;
        a->capwatches = cap;
    }
    a->watches[a->nwatches++] =
        (struct watch){.fd = fd, .events = events, .cb = cb, .ctx = ctx, .id = ++a->next_watch_id};
    return 0;
}

void agent_loop_unwatch(struct agent *a, int fd)
{
    for (size_t i = 0; i < a->nwatches; i++) {
        if (a->watches[i].fd == fd) {
            a->watches[i] = a->watches[--a->nwatches];
            return;
        }
    }
}

/* Wait up to TIMEOUT_MS and run the callbacks of ready fds. A callback may watch or unwatch
 * any fd: each ready entry is looked up again by its watch id before it runs. */
static void loop_once(struct agent *a, int timeout_ms)
{
    size_t n = a->nwatches + 1, k = 0;
    struct pollfd *pfd = calloc(n, sizeof(*pfd));
    uint64_t *ids = calloc(n, sizeof(*ids));
    if (!pfd || !ids) {
        free(pfd);
        free(ids);
        usleep(10000);
        return;
    }
    pfd[k++] = (struct pollfd){.fd = sig_pipe[0], .events = POLLIN};
    for (size_t i = 0; i < a->nwatches; i++) {
        if (!a->watches[i].events)
            continue; /* not even POLLHUP: the owner does not want to hear from it now */
        ids[k] = a->watches[i].id;
        pfd[k++] = (struct pollfd){.fd = a->watches[i].fd, .events = a->watches[i].events};
    }
    if (poll(pfd, k, timeout_ms) > 0) {
        a->turn_wall_ms = cis_wall_ms();
        if (pfd[0].revents) {
            char buf[16];
            while (read(sig_pipe[0], buf, sizeof(buf)) > 0) {
            }
        }
        for (size_t j = 1; j < k; j++) {
            if (!pfd[j].revents)
                continue;
            for (size_t i = 0; i < a->nwatches; i++) {
                if (a->watches[i].id == ids[j]) {
                    a->watches[i].cb(a->watches[i].ctx, pfd[j].fd, pfd[j].revents);
                    break;
                }
            }
        }
    }
    a->turn_wall_ms = 0;
    free(pfd);
    free(ids);
}

/* ---- ingest queue and group commit ---- */

int agent_ingest_submit_stream(struct agent *a, const struct agent_input_cfg *src,
                               const char *stream, const uint8_t *payload, size_t len,
                               agent_ack_cb ack, void *ctx, uint64_t token)
{
    /* The stream name is kept NUL-terminated in the arena, after the payload. */
    size_t slen = stream ? strlen(stream) + 1 : 0;
    size_t need = len + slen;
    if (a->nrecs == a->caprecs) {
        size_t cap = a->caprecs ? a->caprecs * 2 : 1024;
        struct ingest_rec *r = realloc(a->recs, cap * sizeof(*r));
        if (!r)
            return CIS_ENOMEM;
        a->recs = r;
        a->caprecs = cap;
    }
    if (a->arena_len + need > a->arena_cap) {
        size_t cap = a->arena_cap ? a->arena_cap : 65536;
        uint8_t *p;
        while (cap < a->arena_len + need)
            cap *= 2;
        p = realloc(a->arena, cap);
        if (!p)
            return CIS_ENOMEM;
        a->arena = p;
        a->arena_cap = cap;
    }
    memcpy(a->arena + a->arena_len, payload, len);
    if (slen)
        memcpy(a->arena + a->arena_len + len, stream, slen);
    if (a->nrecs == 0)
        a->oldest_mono = cis_mono_ms();
    int64_t ts_ms = a->turn_wall_ms ? a->turn_wall_ms : cis_wall_ms();
    a->recs[a->nrecs++] = (struct ingest_rec){.off = a->arena_len, .len = len, .src = src,
                                              .has_stream = slen != 0, .ts_ms = ts_ms,
                                              .ack = ack, .ctx = ctx,
                                              .token = token};
    a->arena_len += need;
    a->counters.produced++;
    return 0;
}

int agent_ingest_submit(struct agent *a, const struct agent_input_cfg *src, const uint8_t *payload,
                        size_t len, agent_ack_cb ack, void *ctx, uint64_t token)
{
    return agent_ingest_submit_stream(a, src, NULL, payload, len, ack, ctx, token);
}

int agent_ingest_full(const struct agent *a)
{
    return a->nrecs >= 2 * (size_t)a->cfg.commit_max_records ||
           a->arena_len >= 2 * a->cfg.commit_max_bytes;
}

void agent_ingest_commit_soon(struct agent *a)
{
    a->commit_soon = 1;
}

static int commit_due(const struct agent *a, int64_t now)
{
    return a->nrecs && (a->commit_soon || a->nrecs >= (size_t)a->cfg.commit_max_records ||
                        a->arena_len >= a->cfg.commit_max_bytes ||
                        now - a->oldest_mono >= a->cfg.commit_interval_ms);
}

/* Commit the queue in one spool transaction, then answer each record's source. Nothing is
 * acknowledged before the commit returns: that is the durability promise. */
static void ingest_commit(struct agent *a)
{
    size_t n = a->nrecs;
    struct cis_record *recs = calloc(n, sizeof(*recs));
    uint32_t *prio = calloc(n, sizeof(*prio));
    int64_t *ttl = calloc(n, sizeof(*ttl));
    int rc = CIS_ENOMEM;

    if (recs && prio && ttl) {
        for (size_t i = 0; i < n; i++) {
            recs[i] = (struct cis_record){.ts_ms = a->recs[i].ts_ms,
                                          .stream = a->recs[i].has_stream
                                                        ? (const char *)a->arena + a->recs[i].off +
                                                              a->recs[i].len
                                                        : a->recs[i].src->name,
                                          .content_type = a->recs[i].src->content_type,
                                          .payload = a->arena + a->recs[i].off,
                                          .payload_len = a->recs[i].len};
            prio[i] = (uint32_t)a->recs[i].src->priority;
            ttl[i] = a->recs[i].src->ttl_ms;
        }
        rc = agent_spool_commit(a->spool, recs, prio, ttl, n);
    }
    if (rc == 0) {
        a->counters.spooled += n;
        if (a->commit_failing)
            cis_info("[spool] commits work again: sources are told OK again");
        a->commit_failing = 0;
        agent_forwarder_notify(a->fwd, cis_mono_ms());
    } else {
        a->counters.refused += n;
        /* One line per change of state, not one per refused commit. */
        if (a->commit_failing != rc) {
            if (rc == CIS_EFULL)
                cis_warn("[spool] full: spool.max_size (%llu bytes) reached and spool.when_full is "
                         "reject_new; sources are told ERR full until the forwarder frees space",
                         (unsigned long long)a->cfg.spool_max_size);
            else if (rc == CIS_ENOSPC)
                cis_error("[spool] the disk holding %s is full; sources are told ERR until space "
                          "returns (nothing told OK is lost)",
                          a->cfg.spool_path);
            else
                cis_error("[spool] commit failed: %s; sources are told ERR until it works again",
                          cis_strerror(rc));
        }
        a->commit_failing = rc;
        agent_spool_failed(a, rc);
    }
    for (size_t i = 0; i < n; i++)
        if (a->recs[i].ack)
            a->recs[i].ack(a->recs[i].ctx, a->recs[i].token, rc, rc == 0 ? recs[i].seq : 0);
    a->nrecs = 0;
    a->arena_len = 0;
    a->commit_soon = 0;
    free(recs);
    free(prio);
    free(ttl);
}

/* After a burst the agent keeps its peak memory: the ingest queue's arrays, SQLite's page
 * cache and freed heap that malloc keeps for reuse. Once nothing has come in or gone out for
 * IDLE_TRIM_MS, give it back, once per idle period (bench/RESULTS.md, B4). */
#define IDLE_TRIM_MS 3000

static void idle_trim(struct agent *a, int64_t now)
{
    if (a->nrecs || !agent_forwarder_idle(a->fwd)) {
        a->busy_mono = now;
        a->trimmed = 0;
        return;
    }
    if (a->trimmed || now - a->busy_mono < IDLE_TRIM_MS)
        return;
    free(a->recs);
    free(a->arena);
    a->recs = NULL;
    a->arena = NULL;
    a->caprecs = a->arena_cap = 0;
    agent_spool_release_memory(a->spool);
#ifdef __GLIBC__
    malloc_trim(0);
#endif
    a->trimmed = 1;
}

void agent_spool_failed(struct agent *a, int rc)
{
    if (rc == CIS_ECORRUPT)
        a->spool_corrupt = 1;
}

void agent_runtime(struct agent *a, struct agent_runtime *out)
{
    memset(out, 0, sizeof(*out));
    out->agent_id = a->cfg.id;
    out->started_wall_ms = a->started_wall_ms;
    agent_forwarder_link(a->fwd, &out->link);
    out->counters = &a->counters;
    out->spool_full = a->commit_failing == CIS_EFULL;
    out->disk_full = a->commit_failing == CIS_ENOSPC;
}

/* A spool call met SQLITE_CORRUPT: stop sending, move the files aside, and carry on with a
 * fresh spool (a new epoch); the loss is in the new spool's ledger. */
static int spool_recover_now(struct agent *a)
{
    char err[1024];
    a->spool_corrupt = 0;
    agent_forwarder_abort(a->fwd);
    int rc = agent_spool_recover(&a->spool, &a->spool_opts, "SQLite reported corruption at run time",
                                 err, sizeof(err));
    if (rc) {
        cis_error("[spool] cannot start a new spool after corruption: %s", err);
        return rc;
    }
    agent_forwarder_set_spool(a->fwd, a->spool);
    agent_forwarder_notify(a->fwd, cis_mono_ms());
    return 0;
}

static void expire_due(struct agent *a, int64_t now)
{
    uint64_t dropped = 0;
    if (now < a->next_expire)
        return;
    a->next_expire = now + 1000;
    int rc = agent_spool_expire(a->spool, cis_wall_ms(), &dropped);
    if (rc)
        agent_spool_failed(a, rc);
}

/* ---- start-up, run, shutdown ---- */

static void usage(FILE *f)
{
    fprintf(f,
            "Usage: cistern-agent [--config FILE]\n"
            "       cistern-agent --check-config FILE\n"
            "       cistern-agent status [--config FILE] [--json] [--watch] [--interval DUR]\n"
            "       cistern-agent keygen FILE\n"
            "       cistern-agent enroll --id ID [--key FILE] [--csr FILE] [--force]\n"
            "\n"
            "Collects records from local inputs, keeps them in an SQLite spool, and forwards\n"
            "them to a cistern-receiver. A source is told OK only after its record committed.\n"
            "\n"
            "  -c, --config FILE        configuration (default " DEFAULT_CONFIG ")\n"
            "  -t, --check-config FILE  check FILE and exit: prints \"FILE: ok\" or the error\n"
            "      --help-config        list every configuration key with its default\n"
            "  -h, --help               this help\n"
            "  -V, --version            print the version\n"
            "\n"
            "  status                   what the spool holds, the link, the losses (see status --help)\n"
            "  keygen FILE              write a new spool.encryption_key_file (32 random bytes,\n"
            "                           mode 0600); never overwrites\n"
            "  enroll --id ID           make the device key (ECDSA P-256, mode 0600) and a CSR\n"
            "                           with CN=ID, print its fingerprint (see enroll --help)\n"
            "\n"
            "Signals: SIGTERM/SIGINT stop inputs, commit, keep delivering for up to\n"
            "forward.shutdown_timeout while the receiver takes batches, and exit 0.\n"
            "A second signal stops at once. What is not delivered stays in the spool.\n");
}

static int start_inputs(struct agent *a)
{
    a->ninputs = a->cfg.inputs.n;
    a->inputs = calloc(a->ninputs, sizeof(*a->inputs));
    if (!a->inputs)
        return CIS_ENOMEM;
    for (size_t i = 0; i < a->ninputs; i++) {
        struct agent_input *in = &a->inputs[i];
        in->cfg = agent_config_input(&a->cfg, i);
        in->agent = a;
        in->ops = in->cfg->type == AGENT_INPUT_DEMO   ? &agent_input_demo
                  : in->cfg->type == AGENT_INPUT_MQTT ? &agent_input_mqtt
                                                      : &agent_input_socket;
        int rc = in->ops->start(in);
        if (rc)
            return rc;
    }
    return 0;
}

static void log_stats(struct agent *a)
{
    struct agent_spool_stats st;
    agent_spool_stats(a->spool, &st);
    cis_info("[stats] produced=%llu spooled=%llu delivered=%llu pending=%llu rejected=%llu "
             "refused=%llu evicted=%llu expired=%llu tampered=%llu spool_bytes=%llu",
             (unsigned long long)a->counters.produced, (unsigned long long)a->counters.spooled,
             (unsigned long long)a->counters.delivered, (unsigned long long)st.pending_records,
             (unsigned long long)a->counters.rejected, (unsigned long long)a->counters.refused,
             (unsigned long long)st.evicted_records, (unsigned long long)st.expired_records,
             (unsigned long long)st.tampered_records,
             (unsigned long long)(st.db_bytes + st.wal_bytes));
}

static int run(struct agent *a)
{
    int draining = 0;
    int64_t drain_deadline = 0, next_stats = -1;

    if (a->cfg.stats_interval_ms > 0)
        next_stats = cis_mono_ms() + a->cfg.stats_interval_ms;
    for (;;) {
        int64_t now = cis_mono_ms(), deadline = -1;

        if (signals_seen && !draining) {
            cis_info("[agent] stopping: inputs closed, committing, delivering for up to %lld ms",
                     (long long)a->cfg.shutdown_timeout_ms);
            for (size_t i = 0; i < a->ninputs; i++)
                a->inputs[i].ops->stop(&a->inputs[i]);
            draining = 1;
            drain_deadline = now + a->cfg.shutdown_timeout_ms;
        } else if (signals_seen > 1 && draining) {
            cis_info("[agent] second signal: stopping now");
            break;
        }
        if (a->spool_corrupt && spool_recover_now(a) != 0)
            return 1;
        for (size_t i = 0; i < a->ninputs; i++)
            deadline = agent_deadline_min(deadline, a->inputs[i].ops->tick(&a->inputs[i], now));
        if (commit_due(a, now) || (draining && a->nrecs))
            ingest_commit(a);
        expire_due(a, now);
        idle_trim(a, now);
        if (!a->trimmed)
            deadline = agent_deadline_min(deadline, a->busy_mono + IDLE_TRIM_MS);
        deadline = agent_deadline_min(deadline, a->next_expire);
        if (a->nrecs)
            deadline = agent_deadline_min(deadline, a->oldest_mono + a->cfg.commit_interval_ms);
        deadline = agent_deadline_min(deadline, agent_forwarder_tick(a->fwd, now, draining));
        if (next_stats >= 0) {
            if (now >= next_stats) {
                log_stats(a);
                next_stats = now + a->cfg.stats_interval_ms;
            }
            deadline = agent_deadline_min(deadline, next_stats);
        }
        if (draining) {
            int idle = a->nrecs == 0 && agent_forwarder_idle(a->fwd);
            for (size_t i = 0; i < a->ninputs && idle; i++)
                idle = a->inputs[i].ops->idle(&a->inputs[i]);
            if (idle)
                break;
            if (now >= drain_deadline) {
                cis_warn("[agent] shutdown timeout: %zu batch(es) in flight and whatever is still "
                         "pending stay in the spool and go out after the next start",
                         agent_forwarder_in_flight(a->fwd));
                agent_forwarder_abort(a->fwd);
                break;
            }
            deadline = agent_deadline_min(deadline, drain_deadline);
        }
        {
            int64_t wait = deadline < 0 ? 1000 : deadline - now;
            if (wait < 0)
                wait = 0;
            if (wait > 1000)
                wait = 1000;
            loop_once(a, (int)wait);
        }
    }
    if (a->cfg.stats_interval_ms > 0)
        log_stats(a);
    return 0;
}

static void agent_free(struct agent *a)
{
    for (size_t i = 0; i < a->ninputs; i++)
        if (a->inputs[i].ops)
            a->inputs[i].ops->destroy(&a->inputs[i]);
    free(a->inputs);
    agent_control_stop(a->control);
    agent_forwarder_destroy(a->fwd);
    agent_spool_close(a->spool);
    agent_seal_free(a->seal);
    agent_config_free(&a->cfg);
    free(a->watches);
    free(a->recs);
    free(a->arena);
}

int main(int argc, char **argv)
{
    static const struct option opts[] = {
        {"config", required_argument, NULL, 'c'},
        {"check-config", required_argument, NULL, 't'},
        {"help-config", no_argument, NULL, 'H'},
        {"help", no_argument, NULL, 'h'},
        {"version", no_argument, NULL, 'V'},
        {0},
    };
    const char *config = DEFAULT_CONFIG, *check = NULL;
    struct agent a;
    char err[1024];
    int c, rc, status = 1;

    if (argc > 1 && strcmp(argv[1], "status") == 0)
        return agent_status_main(argc - 1, argv + 1);
    if (argc > 1 && strcmp(argv[1], "enroll") == 0)
        return agent_enroll_main(argc - 1, argv + 1);
    if (argc > 1 && strcmp(argv[1], "keygen") == 0) {
        if (argc != 3 || argv[2][0] == '-') {
            fprintf(stderr, "usage: cistern-agent keygen FILE\n");
            return 2;
        }
        rc = agent_seal_keygen(argv[2], err, sizeof(err));
        if (rc) {
            fprintf(stderr, "cistern-agent: %s\n", err);
            return 1;
        }
        printf("%s: new spool key (32 bytes, mode 0600); set spool.encryption_key_file to it\n",
               argv[2]);
        return 0;
    }
    while ((c = getopt_long(argc, argv, "c:t:hV", opts, NULL)) != -1) {
        switch (c) {
        case 'c': config = optarg; break;
        case 't': check = optarg; break;
        case 'H': cis_config_print_help(&agent_config_schema, stdout); return 0;
        case 'h': usage(stdout); return 0;
        case 'V': printf("cistern-agent %s\n", CISTERN_VERSION); return 0;
        default: usage(stderr); return 2;
        }
    }
    if (optind < argc) {
        fprintf(stderr, "cistern-agent: unexpected argument \"%s\"\n", argv[optind]);
        usage(stderr);
        return 2;
    }

    memset(&a, 0, sizeof(a));
    if (check) {
        rc = agent_config_load(check, &a.cfg, err, sizeof(err));
        if (rc) {
            fprintf(stderr, "%s\n", err);
            return 1;
        }
        /* The key file is checked too: a key others can read is refused before deployment. */
        if (a.cfg.encryption_key_file) {
            struct agent_seal *k = NULL;
            rc = agent_seal_load(a.cfg.encryption_key_file, &k, err, sizeof(err));
            agent_seal_free(k);
            if (rc) {
                fprintf(stderr, "%s: spool.encryption_key_file: %s\n", check, err);
                agent_config_free(&a.cfg);
                return 1;
            }
        }
        printf("%s: ok\n", check);
        agent_config_free(&a.cfg);
        return 0;
    }
    rc = agent_config_load(config, &a.cfg, err, sizeof(err));
    if (rc) {
        fprintf(stderr, "%s\n", err);
        return 1;
    }
    if (a.cfg.encryption_key_file) {
        rc = agent_seal_load(a.cfg.encryption_key_file, &a.seal, err, sizeof(err));
        if (rc) {
            fprintf(stderr, "%s: spool.encryption_key_file: %s\n", config, err);
            agent_config_free(&a.cfg);
            return 1;
        }
    }
    cis_log_set_level((enum cis_log_level)a.cfg.log_level);

    if (pipe2(sig_pipe, O_NONBLOCK | O_CLOEXEC) < 0) {
        cis_error("[agent] pipe: %s", strerror(errno));
        goto out;
    }
    {
        struct sigaction sa = {.sa_handler = on_signal};
        sigemptyset(&sa.sa_mask);
        sigaction(SIGTERM, &sa, NULL);
        sigaction(SIGINT, &sa, NULL);
        signal(SIGPIPE, SIG_IGN);
    }
    if (curl_global_init(CURL_GLOBAL_DEFAULT) != CURLE_OK) {
        cis_error("[agent] libcurl failed to initialise");
        goto out;
    }
    {
        a.spool_opts = (struct agent_spool_opts){
            .path = a.cfg.spool_path,
            .sync_full = a.cfg.sync == AGENT_SYNC_FULL,
            .zstd_level = (int)a.cfg.compression_level,
            .max_size = a.cfg.spool_max_size,
            .reject_new = a.cfg.when_full == AGENT_WHEN_FULL_REJECT_NEW,
            .wal_max_size = a.cfg.wal_max_size,
            .seg_max_records = (uint64_t)a.cfg.batch_max_records,
            .seal = a.seal,
        };
        rc = agent_spool_open_checked(&a.spool_opts, &a.spool, NULL, err, sizeof(err));
        if (rc) {
            cis_error("[spool] %s", err);
            goto out_curl;
        }
    }
    a.started_wall_ms = cis_wall_ms();
    rc = agent_forwarder_create(&a, &a.cfg, a.spool, &a.fwd);
    if (rc) {
        cis_error("[forward] cannot start: %s", cis_strerror(rc));
        goto out_curl;
    }
    if (start_inputs(&a) != 0)
        goto out_curl;
    /* `status` works without it (it reads the spool); it only adds the link and counters. */
    if (a.cfg.status_socket && a.cfg.status_socket[0])
        agent_control_start(&a, a.cfg.status_socket, &a.control);
    cis_info("[agent] cistern-agent %s running as %s, forwarding to %s", CISTERN_VERSION, a.cfg.id,
             a.cfg.url);
    status = run(&a);
    cis_info("[agent] stopped");
out_curl:
    agent_free(&a);
    curl_global_cleanup();
    return status;
out:
    agent_free(&a);
    return status;
}
