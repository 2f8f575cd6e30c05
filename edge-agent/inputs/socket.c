/* Input "socket": one record per line over a Unix stream socket and/or TCP. Each line is
 * answered, in order, "OK <seq>" once its record's spool transaction has committed, or
 * "ERR <reason>" when it is refused. */
#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include "agent.h"
#include "cistern/config.h"
#include "cistern/err.h"
#include "cistern/log.h"

#define READ_CHUNK 65536
#define READS_PER_WAKE 8
#define OUT_HIGH_WATER (1u << 20) /* stop reading a client that does not read its answers */

enum answer_state { ANS_PENDING = 0, ANS_OK, ANS_ERR };

struct answer {
    uint8_t state;
    uint64_t seq;
    const char *err; /* static string */
};

struct conn {
    struct sock_input *owner;
    struct conn *next;
    int fd;
    int eof;      /* peer closed its side, or a fatal error: read no more */
    int dead;     /* writes fail: answers are dropped */
    short events; /* what the loop watches now */
    /* the partial line being read */
    char *line;
    size_t line_len;
    int discarding; /* the current line is over max_line: skip to its end */
    /* answers owed, in order: answers[head..nanswers) are still owed; answers[0] has absolute
     * index base. The head moves forward as answers go out; the array is compacted only when
     * it is full, so answering n records costs O(n), not O(n^2). */
    struct answer *answers;
    size_t head, nanswers, cap;
    uint64_t base;
    size_t pending; /* answers still waiting for a commit */
    /* bytes to write */
    char *out;
    size_t out_len, out_off, out_cap;
};

struct sock_input {
    struct agent_input *in;
    int unix_fd, tcp_fd;
    char *unix_path;
    struct conn *conns;
    int stopped;
};

static void conn_sync_events(struct conn *c);

static int out_append(struct conn *c, const char *s, size_t n)
{
    if (c->dead)
        return 0;
    if (c->out_len + n > c->out_cap) {
        size_t cap = c->out_cap ? c->out_cap : 4096;
        char *p;
        while (cap < c->out_len + n)
            cap *= 2;
        p = realloc(c->out, cap);
        if (!p)
            return CIS_ENOMEM;
        c->out = p;
        c->out_cap = cap;
    }
    memcpy(c->out + c->out_len, s, n);
    c->out_len += n;
    return 0;
}

/* Format "OK <seq>\n" without printf: this runs once per record. */
static size_t format_ok(char *buf, uint64_t seq)
{
    char digits[20];
    size_t n = 0, len = 3;
    do {
        digits[n++] = (char)('0' + seq % 10);
        seq /= 10;
    } while (seq);
    memcpy(buf, "OK ", 3);
    while (n)
        buf[len++] = digits[--n];
    buf[len++] = '\n';
    return len;
}

/* Move answers that are ready, from the head of the queue, into the output buffer. Answers
 * behind a pending one wait: sources see answers in the order they sent lines. */
static void conn_flush_answers(struct conn *c)
{
    char buf[160];
    for (; c->head < c->nanswers && c->answers[c->head].state != ANS_PENDING; c->head++) {
        const struct answer *a = &c->answers[c->head];
        size_t n = a->state == ANS_OK ? format_ok(buf, a->seq)
                                      : (size_t)snprintf(buf, sizeof(buf), "ERR %s\n", a->err);
        out_append(c, buf, n);
    }
    if (c->head == c->nanswers) {
        c->base += c->nanswers;
        c->head = c->nanswers = 0;
    }
}

static int conn_add_answer(struct conn *c, uint8_t state, const char *err, uint64_t *index)
{
    if (c->nanswers == c->cap && c->head > 0) {
        /* Compact: drop the answers already sent. */
        memmove(c->answers, c->answers + c->head, (c->nanswers - c->head) * sizeof(*c->answers));
        c->nanswers -= c->head;
        c->base += c->head;
        c->head = 0;
    }
    if (c->nanswers == c->cap) {
        size_t cap = c->cap ? c->cap * 2 : 64;
        struct answer *p = realloc(c->answers, cap * sizeof(*p));
        if (!p)
            return CIS_ENOMEM;
        c->answers = p;
        c->cap = cap;
    }
    c->answers[c->nanswers] = (struct answer){.state = state, .err = err};
    *index = c->base + c->nanswers;
    c->nanswers++;
    return 0;
}

static void conn_free(struct conn *c)
{
    struct sock_input *s = c->owner;
    struct conn **pp;
    for (pp = &s->conns; *pp; pp = &(*pp)->next) {
        if (*pp == c) {
            *pp = c->next;
            break;
        }
    }
    agent_loop_unwatch(s->in->agent, c->fd);
    close(c->fd);
    free(c->line);
    free(c->answers);
    free(c->out);
    free(c);
}

/* A connection can go once it has nothing more to read, no commit outstanding and nothing
 * left to write. Until its last ack arrives it stays, so the ack callback never dangles. */
static int conn_maybe_free(struct conn *c)
{
    if (c->eof && c->pending == 0 && (c->dead || c->out_off == c->out_len)) {
        conn_free(c);
        return 1;
    }
    return 0;
}

static void on_ack(void *ctx, uint64_t token, int status, uint64_t seq)
{
    struct conn *c = ctx;
    struct answer *a = &c->answers[token - c->base];
    if (status == 0) {
        a->state = ANS_OK;
        a->seq = seq;
    } else {
        a->state = ANS_ERR;
        switch (status) {
        case CIS_EFULL: a->err = "full: the spool is at spool.max_size; try again later"; break;
        case CIS_ENOSPC: a->err = "disk full: no space left for the spool; try again later"; break;
        case CIS_EAGAIN: a->err = "busy: the spool cannot write now; try again later"; break;
        default: a->err = "spool: record could not be stored; try again later"; break;
        }
    }
    c->pending--;
    conn_flush_answers(c);
    if (!conn_maybe_free(c))
        conn_sync_events(c);
}

static void conn_line(struct conn *c, char *line, size_t len)
{
    struct agent_input *in = c->owner->in;
    const char *err = NULL;
    uint64_t idx;

    if (len && line[len - 1] == '\r')
        len--;
    if (c->discarding)
        err = "line too long";
    else if (len == 0)
        err = "empty line";
    else if (memchr(line, '\0', len))
        err = "line contains a NUL byte";
    if (err) {
        agent_counters(in->agent)->refused++;
        if (conn_add_answer(c, ANS_ERR, err, &idx) == 0)
            conn_flush_answers(c);
        return;
    }
    if (conn_add_answer(c, ANS_PENDING, NULL, &idx) != 0 ||
        agent_ingest_submit(in->agent, in->cfg, (const uint8_t *)line, len, on_ack, c, idx) != 0) {
        /* Out of memory: say so rather than drop the line silently. */
        if (c->nanswers && c->answers[c->nanswers - 1].state == ANS_PENDING &&
            idx == c->base + c->nanswers - 1) {
            c->answers[c->nanswers - 1].state = ANS_ERR;
            c->answers[c->nanswers - 1].err = "out of memory";
        }
        conn_flush_answers(c);
        return;
    }
    c->pending++;
}

/* Read once; returns the bytes read, 0 at EOF or error or when nothing waits. */
static ssize_t conn_read(struct conn *c)
{
    size_t max = c->owner->in->cfg->max_line;
    char buf[READ_CHUNK];
    ssize_t n = read(c->fd, buf, sizeof(buf));

    if (n == 0 || (n < 0 && errno != EAGAIN && errno != EINTR)) {
        /* A partial last line without '\n' is not a record: the source never finished it. */
        c->eof = 1;
        return 0;
    }
    if (n < 0)
        return 0;
    for (char *p = buf, *end = buf + n; p < end;) {
        char *nl = memchr(p, '\n', (size_t)(end - p));
        size_t chunk = (size_t)((nl ? nl : end) - p);
        if (!c->discarding) {
            if (c->line_len + chunk > max) {
                c->discarding = 1;
                c->line_len = 0;
            } else if (c->line_len == 0 && nl) {
                conn_line(c, p, chunk); /* the whole line is in buf: no copy */
                p = nl + 1;
                continue;
            } else {
                if (!c->line) {
                    c->line = malloc(max + 1);
                    if (!c->line) {
                        c->eof = 1;
                        return 0;
                    }
                }
                memcpy(c->line + c->line_len, p, chunk);
                c->line_len += chunk;
            }
        }
        if (!nl)
            break;
        conn_line(c, c->line ? c->line : p, c->discarding ? 0 : c->line_len);
        c->discarding = 0;
        c->line_len = 0;
        p = nl + 1;
    }
    return n;
}

static void conn_write(struct conn *c)
{
    while (c->out_off < c->out_len) {
        ssize_t n = write(c->fd, c->out + c->out_off, c->out_len - c->out_off);
        if (n < 0) {
            if (errno == EAGAIN || errno == EINTR)
                return;
            /* The source went away: its records are still committed; answers are dropped. */
            c->dead = 1;
            c->eof = 1;
            c->out_off = c->out_len = 0;
            return;
        }
        c->out_off += (size_t)n;
    }
    c->out_off = c->out_len = 0;
}

static void conn_sync_events(struct conn *c)
{
    short ev = 0;
    if (!c->eof && !c->owner->stopped && !agent_ingest_full(c->owner->in->agent) &&
        c->out_len - c->out_off < OUT_HIGH_WATER)
        ev |= POLLIN;
    if (!c->dead && c->out_off < c->out_len)
        ev |= POLLOUT;
    if (ev != c->events) {
        c->events = ev;
        agent_loop_watch(c->owner->in->agent, c->fd, ev, NULL, NULL);
    }
}

static void on_conn(void *ctx, int fd, short revents)
{
    struct conn *c = ctx;
    /* A busy source gets several reads per wake-up (up to READS_PER_WAKE chunks), so the
     * loop's per-turn work is spread over more records; a full queue stops it early. */
    if (!c->eof && (revents & (POLLIN | POLLHUP | POLLERR))) {
        for (int i = 0; i < READS_PER_WAKE; i++) {
            if (conn_read(c) < READ_CHUNK || c->eof || agent_ingest_full(c->owner->in->agent))
                break;
        }
    }
    if (c->out_off < c->out_len)
        conn_write(c);
    if (!conn_maybe_free(c))
        conn_sync_events(c);
}

static void on_accept(void *ctx, int lfd, short revents)
{
    struct sock_input *s = ctx;
    for (int i = 0; i < 64; i++) {
        int fd = accept4(lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
        struct conn *c;
        if (fd < 0) {
            if (errno != EAGAIN && errno != EINTR)
                cis_warn("[socket] %s: accept: %s", s->in->cfg->name, strerror(errno));
            return;
        }
        c = calloc(1, sizeof(*c));
        if (!c) {
            close(fd);
            return;
        }
        c->owner = s;
        c->fd = fd;
        c->next = s->conns;
        s->conns = c;
        c->events = POLLIN;
        agent_loop_watch(s->in->agent, fd, POLLIN, on_conn, c);
    }
}

static int listen_unix(struct sock_input *s, const char *path)
{
    struct sockaddr_un sa = {.sun_family = AF_UNIX};
    int fd;
    if (strlen(path) >= sizeof(sa.sun_path)) {
        cis_error("[socket] %s: path %s is too long for a Unix socket", s->in->cfg->name, path);
        return CIS_EINVAL;
    }
    memcpy(sa.sun_path, path, strlen(path) + 1);
    fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    if (fd < 0)
        return CIS_EIO;
    /* A socket file left by an earlier run that did not exit cleanly: nobody can be
     * listening on it now (we hold the spool), so it is safe to replace. */
    {
        struct stat st;
        if (lstat(path, &st) == 0 && S_ISSOCK(st.st_mode))
            unlink(path);
    }
    if (bind(fd, (struct sockaddr *)&sa, sizeof(sa)) < 0 || chmod(path, 0660) < 0 ||
        listen(fd, 128) < 0) {
        cis_error("[socket] %s: cannot listen on %s: %s", s->in->cfg->name, path, strerror(errno));
        close(fd);
        return CIS_EIO;
    }
    s->unix_fd = fd;
    s->unix_path = strdup(path);
    return 0;
}

static int listen_tcp(struct sock_input *s, const char *hostport)
{
    char host[256], port[8], why[128];
    unsigned portnum;
    struct addrinfo hints = {.ai_socktype = SOCK_STREAM, .ai_flags = AI_PASSIVE | AI_NUMERICSERV},
                    *res = NULL;
    int fd = -1, one = 1, rc;

    if (cis_parse_hostport(hostport, host, sizeof(host), &portnum, why, sizeof(why)) != 0) {
        cis_error("[socket] %s: listen \"%s\" %s", s->in->cfg->name, hostport, why);
        return CIS_EINVAL;
    }
    snprintf(port, sizeof(port), "%u", portnum);
    rc = getaddrinfo(host, port, &hints, &res);
    if (rc != 0) {
        cis_error("[socket] %s: listen %s: %s", s->in->cfg->name, hostport, gai_strerror(rc));
        return CIS_EINVAL;
    }
    fd = socket(res->ai_family, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    if (fd < 0 || setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one)) < 0 ||
        bind(fd, res->ai_addr, res->ai_addrlen) < 0 || listen(fd, 128) < 0) {
        cis_error("[socket] %s: cannot listen on %s: %s", s->in->cfg->name, hostport, strerror(errno));
        if (fd >= 0)
            close(fd);
        freeaddrinfo(res);
        return CIS_EIO;
    }
    freeaddrinfo(res);
    s->tcp_fd = fd;
    return 0;
}

static int sock_start(struct agent_input *in)
{
    struct sock_input *s = calloc(1, sizeof(*s));
    int rc = 0;
    if (!s)
        return CIS_ENOMEM;
    s->in = in;
    s->unix_fd = s->tcp_fd = -1;
    in->priv = s;
    if (in->cfg->path && (rc = listen_unix(s, in->cfg->path)) != 0)
        return rc;
    if (in->cfg->listen && (rc = listen_tcp(s, in->cfg->listen)) != 0)
        return rc;
    if (s->unix_fd >= 0)
        agent_loop_watch(in->agent, s->unix_fd, POLLIN, on_accept, s);
    if (s->tcp_fd >= 0)
        agent_loop_watch(in->agent, s->tcp_fd, POLLIN, on_accept, s);
    cis_info("[socket] %s: listening%s%s%s%s", in->cfg->name, s->unix_path ? " on " : "",
             s->unix_path ? s->unix_path : "", in->cfg->listen ? " on tcp " : "",
             in->cfg->listen ? in->cfg->listen : "");
    return 0;
}

static int64_t sock_tick(struct agent_input *in, int64_t now)
{
    struct sock_input *s = in->priv;
    /* Backpressure comes and goes with the ingest queue: re-evaluate what to watch. */
    for (struct conn *c = s->conns, *next; c; c = next) {
        next = c->next;
        conn_sync_events(c);
    }
    return -1;
}

static void close_listeners(struct sock_input *s)
{
    if (s->unix_fd >= 0) {
        agent_loop_unwatch(s->in->agent, s->unix_fd);
        close(s->unix_fd);
        s->unix_fd = -1;
    }
    if (s->tcp_fd >= 0) {
        agent_loop_unwatch(s->in->agent, s->tcp_fd);
        close(s->tcp_fd);
        s->tcp_fd = -1;
    }
    if (s->unix_path) {
        unlink(s->unix_path);
        free(s->unix_path);
        s->unix_path = NULL;
    }
}

static void sock_stop(struct agent_input *in)
{
    struct sock_input *s = in->priv;
    if (!s)
        return;
    s->stopped = 1;
    close_listeners(s);
    /* Lines already read are committed and answered; nothing more is read. */
    for (struct conn *c = s->conns, *next; c; c = next) {
        next = c->next;
        c->eof = 1;
        if (!conn_maybe_free(c))
            conn_sync_events(c);
    }
}

static int sock_idle(struct agent_input *in)
{
    struct sock_input *s = in->priv;
    for (struct conn *c = s ? s->conns : NULL; c; c = c->next)
        if (c->pending || (!c->dead && c->out_off < c->out_len))
            return 0;
    return 1;
}

static void sock_destroy(struct agent_input *in)
{
    struct sock_input *s = in->priv;
    if (!s)
        return;
    close_listeners(s);
    while (s->conns)
        conn_free(s->conns);
    free(s);
    in->priv = NULL;
}

const struct agent_input_ops agent_input_socket = {
    .name = "socket",
    .start = sock_start,
    .tick = sock_tick,
    .stop = sock_stop,
    .idle = sock_idle,
    .destroy = sock_destroy,
};
