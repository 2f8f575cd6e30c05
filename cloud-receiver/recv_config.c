/* Receiver configuration: the key table for receiver.yaml and its cross-key checks. */
#include "recv_config.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cistern/err.h>

#define O(field) offsetof(struct recv_config, field)

static const char *const log_levels[] = {"debug", "info", "warn", "error", NULL};
static const char *const store_types[] = {"sqlite", "postgres", NULL};
static const char *const sync_modes[] = {"normal", "full", NULL};

static const struct cis_cfg_key recv_keys[] = {
    {.path = "log.level", .type = CIS_CFG_ENUM, .offset = O(log_level), .def = "info",
     .help = "log level: debug | info | warn | error", .enum_values = log_levels},
    {.path = "listen.http", .type = CIS_CFG_STRING, .offset = O(listen_http),
     .help = "ingest and API listener, host:port ([v6]:port for IPv6); optional with mqtt.url"},
    {.path = "listen.tls.cert_file", .type = CIS_CFG_STRING, .offset = O(tls_cert_file),
     .help = "server certificate (PEM)"},
    {.path = "listen.tls.key_file", .type = CIS_CFG_STRING, .offset = O(tls_key_file),
     .help = "server private key (PEM)"},
    {.path = "listen.tls.client_ca_file", .type = CIS_CFG_STRING,
     .offset = O(tls_client_ca_file),
     .help = "CA that signs gateway client certificates; identity is the certificate CN"},
    {.path = "listen.insecure_plain_http", .type = CIS_CFG_BOOL, .offset = O(insecure_plain_http),
     .def = "false", .help = "serve plain HTTP without client identity (behind a TLS proxy only)"},
    {.path = "listen.api", .type = CIS_CFG_STRING, .offset = O(listen_api),
     .help = "optional second listener, plain HTTP, read API and health checks only (GET)"},
    {.path = "store.type", .type = CIS_CFG_ENUM, .offset = O(store_type), .def = "sqlite",
     .help = "store backend: sqlite (postgres comes later)", .enum_values = store_types},
    {.path = "store.path", .type = CIS_CFG_STRING, .offset = O(store_path),
     .def = "/var/lib/cistern/store.db", .help = "SQLite database file"},
    {.path = "store.sync", .type = CIS_CFG_ENUM, .offset = O(store_sync), .def = "full",
     .help = "full | normal: full syncs every batch commit before the agent is told it is stored", .enum_values = sync_modes},
    {.path = "limits.max_body", .type = CIS_CFG_SIZE, .offset = O(max_body), .def = "8MiB",
     .help = "largest request body; larger is answered 413", .min = 1024,
     .max = INT64_C(1) << 32},
    {.path = "limits.max_decompressed", .type = CIS_CFG_SIZE, .offset = O(max_decompressed),
     .def = "64MiB", .help = "decompressed segment bytes in one batch; more is answered 413",
     .min = 1024, .max = INT64_C(1) << 34},
    {.path = "limits.max_records", .type = CIS_CFG_INT, .offset = O(max_records), .def = "100000",
     .help = "records in one batch; more is answered 413", .min = 1, .max = 100000000},
    {.path = "limits.max_connections", .type = CIS_CFG_INT, .offset = O(max_connections),
     .def = "256", .help = "concurrent connections", .min = 1, .max = 65536},
    {.path = "limits.connection_timeout", .type = CIS_CFG_DURATION,
     .offset = O(connection_timeout_ms), .def = "30s", .help = "idle connection timeout",
     .min = 1000, .max = INT64_C(86400000)},
    {.path = "limits.max_header_size", .type = CIS_CFG_SIZE, .offset = O(max_header_size),
     .def = "32KiB", .help = "memory for one request's line and headers; more is answered 431",
     .min = 4096, .max = INT64_C(1) << 20},
    {.path = "limits.max_connections_per_ip", .type = CIS_CFG_INT,
     .offset = O(max_connections_per_ip), .def = "0",
     .help = "concurrent connections from one address; 0: no limit (gateways behind one NAT "
             "or a proxy share an address)", .min = 0, .max = 65536},
    {.path = "limits.request_timeout", .type = CIS_CFG_DURATION, .offset = O(request_timeout_ms),
     .def = "60s", .help = "time to send one whole request (headers and body), counted from "
                          "the connection or the previous answer; then the connection is closed",
     .min = 1000, .max = INT64_C(86400000)},
    {.path = "limits.rate", .type = CIS_CFG_INT, .offset = O(rate), .def = "50",
     .help = "batches per second from one client certificate CN; more is answered 429 with "
             "Retry-After; 0: no limit", .min = 0, .max = 1000000},
    {.path = "limits.rate_burst", .type = CIS_CFG_INT, .offset = O(rate_burst), .def = "100",
     .help = "batches one CN may send at once above limits.rate", .min = 1, .max = 1000000},
    {.path = "mqtt.url", .type = CIS_CFG_STRING, .offset = O(mqtt_url),
     .help = "broker for MQTT ingest, ssl://host:8883 or mqtts://host:8883; unset: no MQTT"},
    {.path = "mqtt.group", .type = CIS_CFG_STRING, .offset = O(mqtt_group), .def = "cistern",
     .help = "shared subscription group: the receivers of one group split the batches"},
    {.path = "mqtt.topic_prefix", .type = CIS_CFG_STRING, .offset = O(mqtt_topic_prefix),
     .def = "cistern/v1", .help = "batches arrive on <prefix>/<agent_id>/batch"},
    {.path = "mqtt.client_id", .type = CIS_CFG_STRING, .offset = O(mqtt_client_id),
     .help = "client id of this receiver's persistent session, unique per receiver (required "
             "with mqtt.url)"},
    {.path = "mqtt.tls.ca_file", .type = CIS_CFG_STRING, .offset = O(mqtt_ca_file),
     .help = "CA of the broker's certificate (default: the system's)"},
    {.path = "mqtt.tls.cert_file", .type = CIS_CFG_STRING, .offset = O(mqtt_cert_file),
     .help = "client certificate for the broker (PEM)"},
    {.path = "mqtt.tls.key_file", .type = CIS_CFG_STRING, .offset = O(mqtt_key_file),
     .help = "client private key for the broker (PEM)"},
    {.path = "mqtt.username", .type = CIS_CFG_STRING, .offset = O(mqtt_username),
     .help = "user name (optional; with a client certificate the broker may use its CN)"},
    {.path = "mqtt.password", .type = CIS_CFG_STRING, .offset = O(mqtt_password),
     .help = "password (optional), e.g. ${CISTERN_MQTT_PASSWORD}"},
    {.path = "mqtt.keepalive", .type = CIS_CFG_DURATION, .offset = O(mqtt_keepalive_ms),
     .def = "30s", .min = 1000, .max = INT64_C(65535000), .help = "MQTT keep-alive"},
    {.path = "mqtt.session_expiry", .type = CIS_CFG_DURATION, .offset = O(mqtt_session_expiry_ms),
     .def = "7d", .min = 1000, .max = INT64_C(4294967) * 1000,
     .help = "how long the broker keeps this receiver's session, and the batches for it, while "
             "it is away"},
    {.path = NULL},
};

static int is_set(const char *s)
{
    return s != NULL && s[0] != '\0';
}

/* 1 when S holds an MQTT wildcard, which topic names and prefixes may not. */
static int has_wildcard(const char *s)
{
    return strpbrk(s, "+#") != NULL;
}

static int mqtt_check(struct recv_config *c, struct cis_cfg_report *r)
{
    const char *url = c->mqtt_url, *p = c->mqtt_topic_prefix, *g = c->mqtt_group;
    size_t plen = p ? strlen(p) : 0;
    int bad = 0;

    if (!is_set(url)) {
        /* Keys without a default that only MQTT reads: set without mqtt.url, they are a
         * mistake (MQTT ingest is off), not something to ignore quietly. */
        static const char *const keys[] = {"mqtt.client_id", "mqtt.tls.ca_file",
                                           "mqtt.tls.cert_file", "mqtt.tls.key_file",
                                           "mqtt.username", "mqtt.password"};
        const char *const vals[] = {c->mqtt_client_id, c->mqtt_ca_file, c->mqtt_cert_file,
                                    c->mqtt_key_file, c->mqtt_username, c->mqtt_password};
        for (size_t i = 0; i < sizeof keys / sizeof keys[0]; i++)
            if (vals[i] != NULL) {
                cis_cfg_report_error(r, keys[i], "has no effect without mqtt.url (MQTT ingest "
                                                 "is off): set mqtt.url or remove this key");
                return 1;
            }
        return 0;
    }
    if ((strncmp(url, "ssl://", 6) != 0 || url[6] == '\0') &&
        (strncmp(url, "mqtts://", 8) != 0 || url[8] == '\0')) {
        cis_cfg_report_error(r, "mqtt.url",
                             "\"%s\": MQTT ingest needs TLS: ssl://host:8883 or "
                             "mqtts://host:8883", url);
        bad = 1;
    }
    if (!is_set(c->mqtt_client_id)) {
        cis_cfg_report_error(r, "mqtt.client_id",
                             "is required with mqtt.url: each receiver of a group needs its own "
                             "client id, the name of its persistent session");
        bad = 1;
    }
    if (!is_set(g) || strchr(g, '/') != NULL || has_wildcard(g)) {
        cis_cfg_report_error(r, "mqtt.group", "\"%s\" must be a non-empty name without '/', "
                             "'+' or '#'", g ? g : "");
        bad = 1;
    }
    if (plen == 0 || p[0] == '/' || p[plen - 1] == '/' || has_wildcard(p) || p[0] == '$') {
        cis_cfg_report_error(r, "mqtt.topic_prefix",
                             "\"%s\" must be a topic such as cistern/v1: not empty, no "
                             "leading or trailing '/', no '+', '#' or leading '$'", p ? p : "");
        bad = 1;
    }
    if ((c->mqtt_cert_file == NULL) != (c->mqtt_key_file == NULL)) {
        cis_cfg_report_error(r, c->mqtt_cert_file ? "mqtt.tls.key_file" : "mqtt.tls.cert_file",
                             "cert_file and key_file go together");
        bad = 1;
    }
    return bad;
}

static int recv_config_check(void *obj, struct cis_cfg_report *r)
{
    struct recv_config *c = obj;
    char host[256], why[128];
    unsigned port;
    int bad = 0;

    if (!is_set(c->listen_http)) {
        /* An MQTT-only receiver has no HTTP listener; a receiver with neither has no ingest. */
        if (!is_set(c->mqtt_url)) {
            cis_cfg_report_error(r, "listen.http",
                                 "is required unless mqtt.url is set: a receiver needs at least "
                                 "one ingest (listen.http for HTTPS, mqtt.url for MQTT)");
            bad = 1;
        }
        if (is_set(c->listen_api)) {
            cis_cfg_report_error(r, "listen.api", "needs listen.http: the read API listener "
                                                  "runs beside the HTTP ingest listener");
            bad = 1;
        }
    } else {
        if (cis_parse_hostport(c->listen_http, host, sizeof host, &port, why, sizeof why) != 0) {
            cis_cfg_report_error(r, "listen.http", "\"%s\" %s", c->listen_http, why);
            bad = 1;
        }
        if (is_set(c->listen_api) &&
            cis_parse_hostport(c->listen_api, host, sizeof host, &port, why, sizeof why) != 0) {
            cis_cfg_report_error(r, "listen.api", "\"%s\" %s", c->listen_api, why);
            bad = 1;
        }
        if (!c->insecure_plain_http) {
            if (!is_set(c->tls_cert_file)) {
                cis_cfg_report_error(r, "listen.tls.cert_file",
                                     "is required unless listen.insecure_plain_http is true");
                bad = 1;
            }
            if (!is_set(c->tls_key_file)) {
                cis_cfg_report_error(r, "listen.tls.key_file",
                                     "is required unless listen.insecure_plain_http is true");
                bad = 1;
            }
            if (!is_set(c->tls_client_ca_file)) {
                cis_cfg_report_error(r, "listen.tls.client_ca_file",
                                     "is required with TLS: gateways are identified by client "
                                     "certificate");
                bad = 1;
            }
        }
    }
    if (mqtt_check(c, r))
        bad = 1;
    if (c->store_type != RECV_STORE_SQLITE) {
        cis_cfg_report_error(r, "store.type", "\"%s\" is not supported yet (only sqlite)",
                             store_types[c->store_type]);
        bad = 1;
    }
    if (!is_set(c->store_path)) {
        cis_cfg_report_error(r, "store.path", "must not be empty");
        bad = 1;
    }
    return bad;
}

const struct cis_cfg_schema recv_config_schema = {.keys = recv_keys, .check = recv_config_check};

int recv_config_load(const char *file, struct recv_config *cfg, char *err, size_t errlen)
{
    memset(cfg, 0, sizeof *cfg);
    return cis_config_load(file, &recv_config_schema, cfg, err, errlen);
}

void recv_config_free(struct recv_config *cfg)
{
    if (cfg == NULL)
        return;
    cis_config_free(&recv_config_schema, cfg);
    memset(cfg, 0, sizeof *cfg);
}
