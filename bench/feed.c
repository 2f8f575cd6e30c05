/* Benchmark producer: writes N records to an agent's TCP socket input while it reads the
 * answers, so that the producer costs the machine little next to the agent it measures.
 *
 * The records are formatted into one buffer before the clock starts. The clock runs from the
 * first byte sent to the last answer received; every answer must be "OK <seq>" with seq
 * rising, else the run fails loudly (exit 1). Prints one line:
 *   records=N ok=N seconds=S rec_per_s=R first_seq=A last_seq=B
 *   t_start=T0 t_sent=T1 t_end=T2 (all on one line)
 * where T0 (first byte sent), T1 (last byte sent) and T2 (last answer) are CLOCK_MONOTONIC
 * seconds (the clock of Python's time.monotonic(), so a driver can time what follows).
 * `feed --dump N` prints the records instead. */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <netdb.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define PAYLOAD_MAX 128   /* one record plus its newline */
#define SEND_CHUNK (1 << 20)
#define ANSWER_MAX 256    /* longest answer line kept; an "OK <seq>" is ~25 bytes */

struct feed {
    long n;
    char *buf;            /* every record and its newline, back to back */
    size_t len, sent;
    long ok, err, bad, answers;
    uint64_t first_seq, last_seq;
    char line[ANSWER_MAX];
    size_t line_len;
    int line_long;        /* the current answer line overflowed line[] */
    char first_err[ANSWER_MAX];
    double t_start, t_sent, t_end; /* first byte sent, last byte sent, last answer */
};

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static int parse_long(const char *s, long min, long *out)
{
    char *end;
    errno = 0;
    *out = strtol(s, &end, 10);
    return errno == 0 && end != s && *end == '\0' && *out >= min ? 0 : -1;
}

/* The 100-byte JSON sensor record of record i, as bench/e2e.py payload(),
 * bench/baseline_sqlite.c and bench/mqtt_pubsub.c make it: keep them in sync (bench/e2e.py
 * checks feed's). Returns its length. */
static int payload(char *buf, size_t cap, long i)
{
    return snprintf(buf, cap,
                    "{\"sensor\":\"s-%03ld\",\"n\":%09ld,\"temp_c\":%5.2f,\"humidity\":%4.1f,"
                    "\"pad\":\"xxxxxxxxxxxxxxxxxxxxxxxxxxxx\"}",
                    i % 64, i, 18.0 + (double)(i % 800) / 100.0, 40.0 + (double)(i % 300) / 10.0);
}

/* Records offset..offset+n-1, one per line, into f->buf (which it allocates). */
static int feed_build(struct feed *f, long offset)
{
    f->buf = malloc((size_t)f->n * PAYLOAD_MAX);
    if (!f->buf)
        return -1;
    for (long i = 0; i < f->n; i++) {
        f->len += (size_t)payload(f->buf + f->len, PAYLOAD_MAX - 1, offset + i);
        f->buf[f->len++] = '\n';
    }
    return 0;
}

/* One complete answer line (without its newline). */
static void feed_answer(struct feed *f, const char *s, size_t len, int too_long)
{
    uint64_t seq = 0;
    size_t i;

    f->answers++;
    if (!too_long && len > 3 && memcmp(s, "OK ", 3) == 0) {
        for (i = 3; i < len && s[i] >= '0' && s[i] <= '9'; i++)
            seq = seq * 10 + (uint64_t)(s[i] - '0');
        /* the agent answers in order, and seqs only rise within an epoch */
        if (i == len && i > 3 && (f->ok == 0 || seq > f->last_seq)) {
            if (f->ok++ == 0)
                f->first_seq = seq;
            f->last_seq = seq;
            return;
        }
    }
    if (!too_long && len >= 3 && memcmp(s, "ERR", 3) == 0)
        f->err++;
    else
        f->bad++;
    if (!f->first_err[0])
        snprintf(f->first_err, sizeof(f->first_err), "answer %ld: %.*s%s", f->answers,
                 (int)(len < 120 ? len : 120), s, too_long ? "..." : "");
}

/* Splits what was read into answer lines; the last partial line waits in f->line. */
static void feed_read(struct feed *f, const char *p, size_t n)
{
    while (n) {
        const char *nl = memchr(p, '\n', n);
        size_t take = nl ? (size_t)(nl - p) : n;
        if (f->line_len + take > sizeof(f->line)) {
            f->line_long = 1; /* not kept: the line is bad anyway */
        } else {
            memcpy(f->line + f->line_len, p, take);
            f->line_len += take;
        }
        if (!nl)
            return;
        feed_answer(f, f->line, f->line_len, f->line_long);
        f->line_len = 0;
        f->line_long = 0;
        p = nl + 1;
        n -= take + 1;
    }
}

static int connect_to(const char *host, const char *port)
{
    struct addrinfo hints, *res = NULL, *ai;
    int fd = -1, rc;

    memset(&hints, 0, sizeof(hints));
    hints.ai_socktype = SOCK_STREAM;
    rc = getaddrinfo(host, port, &hints, &res);
    if (rc) {
        fprintf(stderr, "feed: %s:%s: %s\n", host, port, gai_strerror(rc));
        return -1;
    }
    for (ai = res; ai; ai = ai->ai_next) {
        fd = socket(ai->ai_family, ai->ai_socktype, ai->ai_protocol);
        if (fd < 0)
            continue;
        if (connect(fd, ai->ai_addr, ai->ai_addrlen) == 0)
            break;
        close(fd);
        fd = -1;
    }
    if (fd < 0)
        fprintf(stderr, "feed: cannot connect to %s:%s: %s\n", host, port, strerror(errno));
    freeaddrinfo(res);
    return fd;
}

/* Sends everything while reading answers until all N are in. 0, or -1 with a message. */
static int feed_run(struct feed *f, int fd, long timeout_s)
{
    static char rbuf[1 << 16];
    double last_progress = now_s();

    if (fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK) != 0) {
        perror("feed: fcntl");
        return -1;
    }
    f->t_start = now_s();
    while (f->answers < f->n) {
        struct pollfd p = {.fd = fd, .events = POLLIN};
        int r;

        if (f->sent < f->len)
            p.events |= POLLOUT;
        r = poll(&p, 1, 1000);
        if (r < 0) {
            if (errno == EINTR)
                continue;
            perror("feed: poll");
            return -1;
        }
        if (r == 0) {
            if (now_s() - last_progress > (double)timeout_s) {
                fprintf(stderr, "feed: no progress for %ld s: sent %zu of %zu bytes, %ld of %ld "
                                "answers\n", timeout_s, f->sent, f->len, f->answers, f->n);
                return -1;
            }
            continue;
        }
        if (p.revents & POLLOUT) {
            size_t want = f->len - f->sent < SEND_CHUNK ? f->len - f->sent : SEND_CHUNK;
            ssize_t w = send(fd, f->buf + f->sent, want, MSG_NOSIGNAL);
            if (w > 0) {
                f->sent += (size_t)w;
                last_progress = now_s();
                if (f->sent == f->len)
                    f->t_sent = last_progress;
            } else if (w < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR) {
                fprintf(stderr, "feed: send: %s (sent %zu of %zu bytes, %ld answers)\n",
                        strerror(errno), f->sent, f->len, f->answers);
                return -1;
            }
        }
        if (p.revents & (POLLIN | POLLHUP | POLLERR)) {
            ssize_t got = recv(fd, rbuf, sizeof(rbuf), 0);
            if (got > 0) {
                feed_read(f, rbuf, (size_t)got);
                last_progress = now_s();
            } else if (got == 0 || (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR)) {
                fprintf(stderr, "feed: connection lost (%s) after %ld of %ld answers (sent %zu of "
                                "%zu bytes)\n", got == 0 ? "closed by the agent" : strerror(errno),
                        f->answers, f->n, f->sent, f->len);
                return -1;
            }
        }
    }
    f->t_end = now_s();
    return 0;
}

static void usage(void)
{
    fprintf(stderr, "usage: feed HOST PORT N [--offset K] [--timeout S]\n"
                    "       feed --dump N [--offset K]\n"
                    "Sends records K..K+N-1 (default K=0) to the agent's TCP socket input and "
                    "checks every answer is OK <seq>;\n--timeout: fail after S seconds without "
                    "progress (default 300). --dump prints the records.\n");
}

int main(int argc, char **argv)
{
    struct feed f;
    long offset = 0, timeout_s = 300;
    const char *host = NULL, *port = NULL;
    int dump = 0, fd = -1, rc = 1, argi;

    memset(&f, 0, sizeof(f));
    if (argc >= 3 && strcmp(argv[1], "--dump") == 0) {
        dump = 1;
        argi = 2;
    } else if (argc >= 4) {
        host = argv[1];
        port = argv[2];
        argi = 3;
    } else {
        usage();
        return 2;
    }
    /* the payload's %09ld stays ~100 bytes below 10^9 records, and n * PAYLOAD_MAX fits */
    if (parse_long(argv[argi++], 1, &f.n) || f.n > 100000000L) {
        usage();
        return 2;
    }
    for (; argi < argc; argi += 2) {
        long *dst = strcmp(argv[argi], "--offset") == 0    ? &offset
                    : strcmp(argv[argi], "--timeout") == 0 ? &timeout_s
                                                           : NULL;
        if (!dst || argi + 1 >= argc || parse_long(argv[argi + 1], dst == &offset ? 0 : 1, dst) ||
            offset > 900000000L) {
            usage();
            return 2;
        }
    }
    if (feed_build(&f, offset)) {
        fprintf(stderr, "feed: out of memory for %ld records\n", f.n);
        return 1;
    }
    if (dump) {
        rc = fwrite(f.buf, 1, f.len, stdout) == f.len && fflush(stdout) == 0 ? 0 : 1;
        goto out;
    }
    fd = connect_to(host, port);
    if (fd < 0)
        goto out;
    if (feed_run(&f, fd, timeout_s) == 0 && f.ok == f.n)
        rc = 0;
    if (f.err || f.bad)
        fprintf(stderr, "feed: FAILED: %ld ERR and %ld malformed or out-of-order answers of %ld; "
                        "first: %s\n", f.err, f.bad, f.answers, f.first_err);
    if (rc == 0) {
        double s = f.t_end - f.t_start;
        printf("records=%ld ok=%ld seconds=%.3f rec_per_s=%.0f first_seq=%" PRIu64
               " last_seq=%" PRIu64 " t_start=%.6f t_sent=%.6f t_end=%.6f\n",
               f.n, f.ok, s, (double)f.n / s, f.first_seq, f.last_seq, f.t_start, f.t_sent,
               f.t_end);
    } else {
        fprintf(stderr, "feed: FAILED: %ld of %ld records answered OK\n", f.ok, f.n);
    }
out:
    if (fd >= 0)
        close(fd);
    free(f.buf);
    return rc;
}
