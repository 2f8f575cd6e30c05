/* cistern-receiver: command line, start-up and shutdown around the store and the HTTP and
 * MQTT ingests. */
#include <getopt.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cistern/err.h>
#include <cistern/log.h>

#include "device_cmd.h"
#include "ingest/http.h"
#include "ingest/mqtt.h"
#include "recv_config.h"
#include "registry.h"
#include "store/store.h"

#define DEFAULT_CONFIG "/etc/cistern/receiver.yaml"
#define SHUTDOWN_GRACE_MS 10000

static void usage(FILE *f)
{
    fprintf(f,
            "Usage: cistern-receiver [--config FILE]\n"
            "       cistern-receiver --check-config FILE\n"
            "       cistern-receiver [--config FILE] device COMMAND [ARGS]\n"
            "\n"
            "Receives batches from cistern-agent over HTTPS (mutual TLS) and/or from an MQTT\n"
            "broker (shared subscription), stores them once, and answers with an\n"
            "acknowledgement after the store has committed.\n"
            "\n"
            "Options:\n"
            "  -c, --config FILE        configuration file (default " DEFAULT_CONFIG ")\n"
            "  -t, --check-config FILE  check FILE and exit: 0 when valid, 1 otherwise\n"
            "      --help-config        list every configuration key with its default\n"
            "  -h, --help               show this help and exit\n"
            "  -V, --version            show the version and exit\n"
            "\n"
            "Commands (on the device registry in the store of --config's file; see\n"
            "`cistern-receiver device --help`):\n"
            "  device add ID (--key FILE | --fingerprint sha256:HEX) [--hmac-secret-file FILE]\n"
            "             [--force]     register a gateway and the credential it signs with\n"
            "  device list [--json]     the registered gateways\n"
            "  device show ID [--json]  one gateway and its deliveries\n"
            "  device revoke ID         refuse its batches (running receivers: within 5 s)\n"
            "  device enable ID         accept its batches again\n"
            "\n"
            "Signals: SIGTERM or SIGINT stop accepting, finish requests in progress, disconnect\n"
            "from the broker (its session keeps later batches), close the store and exit 0.\n");
}

static int count_device(void *ud, const struct recv_device *d)
{
    size_t *n = ud;
    n[0]++;
    n[1] += d->enabled != 0;
    return 0;
}

/* Once at start: how many gateways may deliver. An empty registry refuses every batch, which is
 * right for a new receiver and puzzling without this line. */
static void log_registry(const struct recv_store_ops *ops, struct recv_store *st)
{
    size_t n[2] = {0, 0};

    if (ops->device_list(st, count_device, n) != 0)
        return; /* the ingest says so when it looks devices up */
    if (n[0] == 0)
        cis_warn("[main] the device registry is empty: every batch is refused (401, MQTT "
                 "\"retry\") until a gateway is registered with `cistern-receiver device add`");
    else
        cis_info("[main] device registry: %zu gateways, %zu enabled", n[0], n[1]);
}

int main(int argc, char **argv)
{
    static const struct option opts[] = {
        {"config", required_argument, NULL, 'c'},
        {"check-config", required_argument, NULL, 't'},
        {"help-config", no_argument, NULL, 'K'},
        {"help", no_argument, NULL, 'h'},
        {"version", no_argument, NULL, 'V'},
        {NULL, 0, NULL, 0},
    };
    const char *config = DEFAULT_CONFIG, *check = NULL;
    struct recv_config cfg;
    const struct recv_store_ops *ops = NULL;
    struct recv_store *st = NULL;
    struct recv_registry *reg = NULL;
    struct recv_http *http = NULL;
    struct recv_mqtt *mqtt = NULL;
    struct recv_store_opts so = {0};
    char err[1024] = "";
    sigset_t sigs;
    int c, sig = 0, ret = 1;

    memset(&cfg, 0, sizeof cfg);
    /* '+': stop at the first operand, so that a command's own options (device add --key)
     * are left to it. */
    while ((c = getopt_long(argc, argv, "+c:t:hV", opts, NULL)) != -1) {
        switch (c) {
        case 'c':
            config = optarg;
            break;
        case 't':
            check = optarg;
            break;
        case 'K':
            cis_config_print_help(&recv_config_schema, stdout);
            return 0;
        case 'h':
            usage(stdout);
            return 0;
        case 'V':
            printf("cistern-receiver %s\n", CISTERN_VERSION);
            return 0;
        default:
            usage(stderr);
            return 2;
        }
    }
    if (optind < argc && check == NULL && strcmp(argv[optind], "device") == 0)
        return recv_device_main(config, argc - optind, argv + optind);
    if (optind != argc) {
        fprintf(stderr, "cistern-receiver: unexpected argument '%s'\n", argv[optind]);
        usage(stderr);
        return 2;
    }

    if (check != NULL) {
        if (recv_config_load(check, &cfg, err, sizeof err) != 0) {
            fprintf(stderr, "%s\n", err);
            return 1;
        }
        recv_config_free(&cfg);
        printf("%s: ok\n", check);
        return 0;
    }

    if (recv_config_load(config, &cfg, err, sizeof err) != 0) {
        cis_error("[main] %s", err);
        return 1;
    }
    cis_log_set_level((enum cis_log_level)cfg.log_level);

    /* Block the stop signals in every thread (MHD's threads inherit this mask) and take them
     * with sigwait() below; a write to a closed peer must not kill the process. */
    signal(SIGPIPE, SIG_IGN);
    sigemptyset(&sigs);
    sigaddset(&sigs, SIGTERM);
    sigaddset(&sigs, SIGINT);
    pthread_sigmask(SIG_BLOCK, &sigs, NULL);

    ops = recv_store_find("sqlite");
    so.path = cfg.store_path;
    so.sync_full = cfg.store_sync == RECV_SYNC_FULL;
    so.busy_timeout_ms = 5000;
    if (ops->open(&so, &st, err, sizeof err) != 0) {
        cis_error("[store] cannot open %s store: %s", ops->name, err);
        goto out;
    }
    if (recv_registry_new(ops, st, RECV_REGISTRY_TTL_MS, &reg) != 0) {
        cis_error("[main] cannot make the device registry cache: out of memory");
        goto out;
    }
    log_registry(ops, st);
    if (cfg.listen_http != NULL && cfg.listen_http[0] != '\0' &&
        recv_http_start(&cfg, ops, st, reg, &http, err, sizeof err) != 0) {
        cis_error("[http] %s", err);
        goto out;
    }
    if (cfg.mqtt_url != NULL && cfg.mqtt_url[0] != '\0' &&
        recv_mqtt_start(&cfg, ops, st, reg, &mqtt, err, sizeof err) != 0) {
        cis_error("[mqtt] %s", err);
        goto out;
    }
    if (http != NULL)
        cis_info("[main] cistern-receiver %s started: listen %s%s%s (%s)%s%s%s, store %s %s "
                 "(sync %s)",
                 CISTERN_VERSION, recv_http_address(http),
                 recv_http_api_address(http) ? ", api " : "",
                 recv_http_api_address(http) ? recv_http_api_address(http) : "",
                 cfg.insecure_plain_http ? "plain http" : "https, client certificates",
                 mqtt ? ", mqtt " : "", mqtt ? cfg.mqtt_url : "",
                 mqtt ? " (shared subscription)" : "", ops->name, cfg.store_path,
                 cfg.store_sync == RECV_SYNC_FULL ? "full" : "normal");
    else
        cis_info("[main] cistern-receiver %s started: mqtt %s (shared subscription, no HTTP "
                 "listener), store %s %s (sync %s)",
                 CISTERN_VERSION, cfg.mqtt_url, ops->name, cfg.store_path,
                 cfg.store_sync == RECV_SYNC_FULL ? "full" : "normal");

    if (sigwait(&sigs, &sig) != 0)
        sig = SIGTERM;
    cis_info("[main] %s: stopping", sig == SIGINT ? "SIGINT" : "SIGTERM");
    ret = 0;
out:
    /* Both ingests stop before the store closes: a batch in progress finishes first. */
    recv_mqtt_stop(mqtt);
    recv_http_stop(http, SHUTDOWN_GRACE_MS);
    if (ops != NULL)
        ops->close(st);
    recv_registry_free(reg);
    recv_config_free(&cfg);
    if (ret == 0)
        cis_info("[main] stopped");
    return ret;
}
