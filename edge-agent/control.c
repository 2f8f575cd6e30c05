/* The agent's control socket: a Unix stream socket that answers each connection with one JSON
 * object of what only the running process knows (link state, counters), for `status`. */
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include "agent.h"
#include "cistern/err.h"
#include "cistern/log.h"

/* Connections taken per wake-up, so a flood of clients cannot hold the loop. */
#define ACCEPT_PER_WAKE 16

struct agent_control {
    struct agent *a;
    int fd;
    char *path;
};

/* Write S to F as a JSON string literal: quotes, backslash and control characters escaped, valid
 * UTF-8 passed through, and every byte that is not part of valid UTF-8 replaced by U+FFFD, so
 * the output is always valid JSON whatever bytes a config or a receiver sent. S NULL: null. */
void agent_json_str(FILE *f, const char *s)
{
    const unsigned char *p = (const unsigned char *)s;

    if (!s) {
        fputs("null", f);
        return;
    }
    fputc('"', f);
    while (*p) {
        unsigned c = *p;
        size_t n = 0;
        unsigned cp = 0;

        if (c < 0x80) {
            switch (c) {
            case '"': fputs("\\\"", f); break;
            case '\\': fputs("\\\\", f); break;
            case '\n': fputs("\\n", f); break;
            case '\r': fputs("\\r", f); break;
            case '\t': fputs("\\t", f); break;
            case '\b': fputs("\\b", f); break;
            case '\f': fputs("\\f", f); break;
            default:
                if (c < 0x20 || c == 0x7f)
                    fprintf(f, "\\u%04x", c);
                else
                    fputc((int)c, f);
            }
            p++;
            continue;
        }
        /* Lead byte: how many continuation bytes, and the smallest code point allowed (to
         * refuse overlong forms). */
        if (c >= 0xc2 && c <= 0xdf) {
            n = 1;
            cp = c & 0x1f;
        } else if (c >= 0xe0 && c <= 0xef) {
            n = 2;
            cp = c & 0x0f;
        } else if (c >= 0xf0 && c <= 0xf4) {
            n = 3;
            cp = c & 0x07;
        }
        for (size_t i = 1; n && i <= n; i++) {
            if ((p[i] & 0xc0) != 0x80) {
                n = 0; /* also stops at the terminating NUL */
                break;
            }
            cp = (cp << 6) | (p[i] & 0x3f);
        }
        if (n == 2 && (cp < 0x800 || (cp >= 0xd800 && cp <= 0xdfff)))
            n = 0;
        if (n == 3 && (cp < 0x10000 || cp > 0x10ffff))
            n = 0;
        if (!n) {
            fputs("\\ufffd", f);
            p++;
            continue;
        }
        fwrite(p, 1, n + 1, f);
        p += n + 1;
    }
    fputc('"', f);
}

/* Wall-clock MS as "2026-11-26T10:15:00Z", or null for 0 (never). */
static void json_time(FILE *f, int64_t ms)
{
    char buf[32];
    struct tm tm;
    time_t t;

    if (ms <= 0) {
        fputs("null", f);
        return;
    }
    t = (time_t)(ms / 1000);
    if (!gmtime_r(&t, &tm) || !strftime(buf, sizeof(buf), "%Y-%m-%dT%H:%M:%SZ", &tm)) {
        fputs("null", f);
        return;
    }
    fprintf(f, "\"%s\"", buf);
}

/* Build the status object (newline-terminated) into a malloc'd buffer the caller frees.
 * Returns NULL when out of memory. */
static char *control_json(struct agent *a, size_t *len)
{
    static const char *const states[] = {"unknown", "up", "down"};
    struct agent_runtime rt;
    struct agent_counters zero = {0}, *cnt;
    char *buf = NULL;
    size_t n = 0;
    FILE *f;

    memset(&rt, 0, sizeof(rt));
    agent_runtime(a, &rt);
    cnt = rt.counters ? rt.counters : &zero;
    f = open_memstream(&buf, &n);
    if (!f)
        return NULL;
    fprintf(f, "{\"running\":true,\"pid\":%ld,\"agent_id\":", (long)getpid());
    agent_json_str(f, rt.agent_id);
    fputs(",\"started_at\":", f);
    json_time(f, rt.started_wall_ms);
    fprintf(f, ",\"link\":{\"state\":\"%s\",\"last_error\":",
            rt.link.state >= 0 && rt.link.state <= 2 ? states[rt.link.state] : "unknown");
    agent_json_str(f, rt.link.last_error[0] ? rt.link.last_error : NULL);
    fputs(",\"last_error_at\":", f);
    json_time(f, rt.link.last_error_wall_ms);
    fputs(",\"last_success_at\":", f);
    json_time(f, rt.link.last_success_wall_ms);
    fprintf(f,
            ",\"consecutive_failures\":%" PRIu64 ",\"in_flight_batches\":%zu},"
            "\"spool_full\":%s,\"disk_full\":%s,"
            "\"counters\":{\"produced\":%" PRIu64 ",\"spooled\":%" PRIu64
            ",\"delivered\":%" PRIu64 ",\"rejected\":%" PRIu64 ",\"refused\":%" PRIu64 "}}\n",
            rt.link.consecutive_failures, rt.link.in_flight, rt.spool_full ? "true" : "false",
            rt.disk_full ? "true" : "false", cnt->produced, cnt->spooled, cnt->delivered,
            cnt->rejected, cnt->refused);
    if (fclose(f) != 0) {
        free(buf);
        return NULL;
    }
    *len = n;
    return buf;
}

static void on_accept(void *ctx, int fd, short revents)
{
    struct agent_control *c = ctx;
    char *json = NULL;
    size_t len = 0;

    for (int i = 0; i < ACCEPT_PER_WAKE; i++) {
        int cfd = accept4(fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (cfd < 0)
            break; /* EAGAIN: all taken; anything else: the client is gone, nothing to do */
        if (!json)
            json = control_json(c->a, &len);
        /* The object is far smaller than a Unix socket's buffer, so one non-blocking send
         * normally takes it whole; a client that cannot take it now gets what fitted and
         * is dropped, never waited for. On a Unix socket the bytes sit in the peer's queue,
         * so closing right away loses nothing. */
        if (json && send(cfd, json, len, MSG_NOSIGNAL | MSG_DONTWAIT) < 0)
            cis_debug("[control] answer not sent: %s", strerror(errno));
        close(cfd);
    }
    free(json);
}

/* 1 if something answers on the Unix socket at ADDR. */
static int socket_alive(const struct sockaddr_un *addr)
{
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0), alive;
    if (fd < 0)
        return 0;
    alive = connect(fd, (const struct sockaddr *)addr, sizeof(*addr)) == 0;
    close(fd);
    return alive;
}

int agent_control_start(struct agent *a, const char *path, struct agent_control **out)
{
    struct agent_control *c = NULL;
    struct sockaddr_un addr;
    struct stat st;
    mode_t old_mask;
    int fd = -1;

    *out = NULL;
    if (!path || !*path)
        return 0; /* status.socket: "" turns it off */
    memset(&addr, 0, sizeof(addr));
    addr.sun_family = AF_UNIX;
    if (strlen(path) >= sizeof(addr.sun_path)) {
        cis_error("[control] status.socket \"%s\" is too long for a Unix socket (%zu bytes at "
                  "most); `status` will not reach this agent",
                  path, sizeof(addr.sun_path) - 1);
        return CIS_EIO;
    }
    memcpy(addr.sun_path, path, strlen(path));

    if (lstat(path, &st) == 0) {
        /* Only a socket is ours to replace: a path pointing at a regular file (a typo in the
         * config) must not cost the technician that file. */
        if (!S_ISSOCK(st.st_mode)) {
            cis_error("[control] %s exists and is not a socket; leaving it alone (check "
                      "status.socket); `status` will not reach this agent",
                      path);
            return CIS_EIO;
        }
        if (socket_alive(&addr)) {
            cis_error("[control] another process answers on %s (a second agent with the same "
                      "status.socket?); `status` will not reach this agent",
                      path);
            return CIS_EIO;
        }
        if (unlink(path) < 0 && errno != ENOENT) {
            cis_error("[control] cannot remove the stale socket %s: %s", path, strerror(errno));
            return CIS_EIO;
        }
    }

    fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        cis_error("[control] socket: %s", strerror(errno));
        goto out;
    }
    /* Create it 0660 from the start: there is no moment when others could connect. */
    old_mask = umask(0117);
    if (bind(fd, (struct sockaddr *)&addr, sizeof(addr)) < 0) {
        int e = errno;
        umask(old_mask);
        cis_error("[control] cannot listen on %s: %s%s; `status` will not reach this agent", path,
                  strerror(e), e == ENOENT ? " (its directory does not exist)" : "");
        goto out;
    }
    umask(old_mask);
    if (chmod(path, 0660) < 0 || listen(fd, 16) < 0) {
        cis_error("[control] cannot listen on %s: %s", path, strerror(errno));
        unlink(path);
        goto out;
    }
    c = calloc(1, sizeof(*c));
    if (c) {
        c->a = a;
        c->fd = fd;
        c->path = strdup(path);
    }
    if (!c || !c->path || agent_loop_watch(a, fd, POLLIN, on_accept, c) != 0) {
        cis_error("[control] out of memory; `status` will not reach this agent");
        unlink(path);
        goto out;
    }
    cis_debug("[control] answering `cistern-agent status` on %s", path);
    *out = c;
    return 0;
out:
    if (c)
        free(c->path);
    free(c);
    if (fd >= 0)
        close(fd);
    return CIS_EIO;
}

void agent_control_stop(struct agent_control *c)
{
    if (!c)
        return;
    agent_loop_unwatch(c->a, c->fd);
    close(c->fd);
    unlink(c->path);
    free(c->path);
    free(c);
}
