/* cis_log: one line per call to stderr, with sd-daemon priority prefixes for journald. */
#include "cistern/log.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static enum cis_log_level log_level = CIS_LOG_INFO;

void cis_log_set_level(enum cis_log_level level)
{
    log_level = level;
}

enum cis_log_level cis_log_get_level(void)
{
    return log_level;
}

void cis_log(enum cis_log_level level, const char *fmt, ...)
{
    /* <7> debug, <6> info, <4> warning, <3> err: journald strips these and sets the
     * priority; on a terminal a short word is friendlier. */
    static const char *const prio[] = {"<7>", "<6>", "<4>", "<3>"};
    static const char *const word[] = {"debug", "info", "warn", "error"};
    char line[2048];
    size_t len = 0;
    int n;
    va_list ap;

    if (level < log_level)
        return;
    if (level > CIS_LOG_ERROR)
        level = CIS_LOG_ERROR;
    if (isatty(STDERR_FILENO)) {
        struct timespec ts;
        struct tm tm;
        clock_gettime(CLOCK_REALTIME, &ts);
        gmtime_r(&ts.tv_sec, &tm);
        n = snprintf(line, sizeof(line), "%02d:%02d:%02d.%03ld %-5s ", tm.tm_hour, tm.tm_min,
                     tm.tm_sec, ts.tv_nsec / 1000000, word[level]);
    } else {
        n = snprintf(line, sizeof(line), "%s", prio[level]);
    }
    if (n > 0)
        len = (size_t)n;
    va_start(ap, fmt);
    n = vsnprintf(line + len, sizeof(line) - len - 1, fmt, ap);
    va_end(ap);
    if (n > 0)
        len += (size_t)n < sizeof(line) - len - 1 ? (size_t)n : sizeof(line) - len - 2;
    line[len++] = '\n';
    /* One write(2) per line so lines from several threads do not interleave. */
    if (write(STDERR_FILENO, line, len) < 0) {
        /* nowhere left to report it */
    }
}
