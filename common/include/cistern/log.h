/* Logging: one function, to stderr, with sd-daemon priority prefixes for journald. */
#ifndef CISTERN_LOG_H
#define CISTERN_LOG_H

enum cis_log_level { CIS_LOG_DEBUG = 0, CIS_LOG_INFO, CIS_LOG_WARN, CIS_LOG_ERROR };

/* Messages below LEVEL are dropped. Default CIS_LOG_INFO. */
void cis_log_set_level(enum cis_log_level level);
enum cis_log_level cis_log_get_level(void);

/* Log one line. By convention FMT starts with the module prefix, e.g. "[spool] ...".
 * Thread-safe: each call is one write(2). */
void cis_log(enum cis_log_level level, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

#define cis_debug(...) cis_log(CIS_LOG_DEBUG, __VA_ARGS__)
#define cis_info(...) cis_log(CIS_LOG_INFO, __VA_ARGS__)
#define cis_warn(...) cis_log(CIS_LOG_WARN, __VA_ARGS__)
#define cis_error(...) cis_log(CIS_LOG_ERROR, __VA_ARGS__)

#endif
