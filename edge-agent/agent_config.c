/* The agent's config table: every key once, with its type, default and help. */
#include "agent_config.h"

#include <stddef.h>
#include <stdio.h>
#include <string.h>

#include "cistern/err.h"

static const char *const log_levels[] = {"debug", "info", "warn", "error", NULL};
static const char *const input_types[] = {"socket", "demo", "mqtt", NULL};
static const char *const priorities[] = {"high", "normal", "low", NULL};
static const char *const syncs[] = {"normal", "full", NULL};
static const char *const when_fulls[] = {"drop_oldest", "reject_new", NULL};
static const char *const transports[] = {"https", "mqtt", NULL};
static const char *const mqtt_acks[] = {"end-to-end", "broker", NULL};
static const char *const input_acks[] = {"after_commit", "on_arrival", NULL};
static const char *const sign_methods[] = {"ecdsa", "hmac", NULL};

#define IN(f) offsetof(struct agent_input_cfg, f)
#define AC(f) offsetof(struct agent_config, f)

static int input_check(void *obj, struct cis_cfg_report *r)
{
    struct agent_input_cfg *in = obj;
    if (in->type == AGENT_INPUT_SOCKET && !in->path && !in->listen) {
        cis_cfg_report_error(r, "type", "a socket input needs path (Unix socket) and/or listen (TCP)");
        return 1;
    }
    if (in->type != AGENT_INPUT_SOCKET && (in->path || in->listen)) {
        cis_cfg_report_error(r, in->path ? "path" : "listen", "only a socket input takes this key");
        return 1;
    }
    if (in->type == AGENT_INPUT_MQTT) {
        if (!in->url || in->topics.n == 0) {
            cis_cfg_report_error(r, in->url ? "topics" : "url",
                                 "an mqtt input needs url (e.g. tcp://127.0.0.1:1883) and topics");
            return 1;
        }
        if (strncmp(in->url, "tcp://", 6) != 0 && strncmp(in->url, "ssl://", 6) != 0 &&
            strncmp(in->url, "mqtt://", 7) != 0 && strncmp(in->url, "mqtts://", 8) != 0) {
            cis_cfg_report_error(r, "url", "\"%s\" is not tcp://, mqtt://, ssl:// or mqtts://",
                                 in->url);
            return 1;
        }
        if ((in->cert_file == NULL) != (in->key_file == NULL)) {
            cis_cfg_report_error(r, in->cert_file ? "key_file" : "cert_file",
                                 "cert_file and key_file go together");
            return 1;
        }
    } else if (in->url || in->topics.n) {
        cis_cfg_report_error(r, in->url ? "url" : "topics", "only an mqtt input takes this key");
        return 1;
    }
    if (in->type == AGENT_INPUT_DEMO && in->rate <= 0) {
        cis_cfg_report_error(r, "rate", "a demo input needs a rate above 0");
        return 1;
    }
    return 0;
}

static const struct cis_cfg_key input_keys[] = {
    {.path = "name", .type = CIS_CFG_STRING, .offset = IN(name), .required = 1,
     .help = "name of this input; the stream of its records"},
    {.path = "type", .type = CIS_CFG_ENUM, .offset = IN(type), .required = 1,
     .enum_values = input_types, .help = "socket | demo | mqtt"},
    {.path = "priority", .type = CIS_CFG_ENUM, .offset = IN(priority), .def = "normal",
     .enum_values = priorities, .help = "high | normal | low: high goes out first"},
    {.path = "ttl", .type = CIS_CFG_DURATION, .offset = IN(ttl_ms), .def = "0", .min = 0,
     .max = 3650LL * 86400000, .help = "drop records not delivered within this long (0: never)"},
    {.path = "content_type", .type = CIS_CFG_STRING, .offset = IN(content_type),
     .help = "content type recorded with each record (optional)"},
    {.path = "path", .type = CIS_CFG_STRING, .offset = IN(path),
     .help = "socket: Unix stream socket path"},
    {.path = "listen", .type = CIS_CFG_STRING, .offset = IN(listen),
     .help = "socket: TCP listener host:port"},
    {.path = "max_line", .type = CIS_CFG_SIZE, .offset = IN(max_line), .def = "64KiB",
     .min = 16, .max = 64 << 20,
     .help = "socket: longest line accepted; mqtt: largest payload stored (larger: acknowledged, refused)"},
    {.path = "rate", .type = CIS_CFG_INT, .offset = IN(rate), .def = "10", .min = 0,
     .max = 1000000, .help = "demo: records per second"},
    {.path = "sensors", .type = CIS_CFG_INT, .offset = IN(sensors), .def = "4", .min = 1,
     .max = 100000, .help = "demo: distinct sensor ids"},
    {.path = "url", .type = CIS_CFG_STRING, .offset = IN(url),
     .help = "mqtt: the local broker, tcp://127.0.0.1:1883 (ssl:// with TLS)"},
    {.path = "topics", .type = CIS_CFG_LIST, .offset = IN(topics),
     .help = "mqtt: topic filters to subscribe to, e.g. [\"sensors/#\"]"},
    {.path = "qos", .type = CIS_CFG_INT, .offset = IN(qos), .def = "1", .min = 0, .max = 1,
     .help = "mqtt: subscription QoS (1: the broker keeps messages for us while we are away)"},
    {.path = "client_id", .type = CIS_CFG_STRING, .offset = IN(client_id),
     .help = "mqtt: client id of the persistent session (default <agent.id>-<name>)"},
    {.path = "username", .type = CIS_CFG_STRING, .offset = IN(username),
     .help = "mqtt: user name (optional)"},
    {.path = "password", .type = CIS_CFG_STRING, .offset = IN(password),
     .help = "mqtt: password (optional), e.g. ${MQTT_PASSWORD}"},
    {.path = "ca_file", .type = CIS_CFG_STRING, .offset = IN(ca_file),
     .help = "mqtt over ssl://: CA of the broker's certificate"},
    {.path = "cert_file", .type = CIS_CFG_STRING, .offset = IN(cert_file),
     .help = "mqtt over ssl://: client certificate"},
    {.path = "key_file", .type = CIS_CFG_STRING, .offset = IN(key_file),
     .help = "mqtt over ssl://: client key"},
    {.path = "ack", .type = CIS_CFG_ENUM, .offset = IN(ack), .def = "after_commit",
     .enum_values = input_acks,
     .help = "mqtt: after_commit (PUBACK once the record is committed: no loss window, one commit "
             "per message) | on_arrival (PUBACK on arrival, group commits: a crash loses at most "
             "one commit_interval of messages)"},
    {.path = "session_expiry", .type = CIS_CFG_DURATION, .offset = IN(session_expiry_ms),
     .def = "7d", .min = 1000, .max = 4294967LL * 1000,
     .help = "mqtt: how long the broker keeps our session and queued messages while we are away"},
    {0},
};

static const struct cis_cfg_schema input_schema = {.keys = input_keys, .check = input_check};

static int agent_check(void *obj, struct cis_cfg_report *r)
{
    struct agent_config *c = obj;
    if (c->inputs.n == 0) {
        cis_cfg_report_error(r, "inputs", "at least one input is needed");
        return 1;
    }
    for (size_t i = 0; i < c->inputs.n; i++) {
        for (size_t j = 0; j < i; j++) {
            if (strcmp(agent_config_input(c, i)->name, agent_config_input(c, j)->name) == 0) {
                char p[64];
                snprintf(p, sizeof(p), "inputs[%zu].name", i);
                cis_cfg_report_error(r, p, "\"%s\" is already the name of inputs[%zu]",
                                     agent_config_input(c, i)->name, j);
                return 1;
            }
        }
    }
    if (c->transport == AGENT_TRANSPORT_HTTPS && strncmp(c->url, "https://", 8) != 0) {
        cis_cfg_report_error(r, "forward.url", "\"%s\" is not an https:// URL", c->url);
        return 1;
    }
    if (c->transport == AGENT_TRANSPORT_MQTT && strncmp(c->url, "ssl://", 6) != 0 &&
        strncmp(c->url, "mqtts://", 8) != 0) {
        cis_cfg_report_error(r, "forward.url",
                             "\"%s\": the mqtt transport needs TLS: ssl://host:8883 or mqtts://",
                             c->url);
        return 1;
    }
    if ((c->cert_file == NULL) != (c->key_file == NULL)) {
        cis_cfg_report_error(r, c->cert_file ? "forward.tls.key_file" : "forward.tls.cert_file",
                             "cert_file and key_file go together");
        return 1;
    }
    if (c->sign_method == AGENT_SIGN_ECDSA && c->sign_key_file == NULL && c->key_file == NULL) {
        cis_cfg_report_error(r, "forward.sign.key_file",
                             "every batch is signed with the device key: set forward.tls.key_file "
                             "or forward.sign.key_file (cistern-agent enroll makes one), or use "
                             "forward.sign.method: hmac");
        return 1;
    }
    if (c->sign_method == AGENT_SIGN_HMAC && c->sign_hmac_secret_file == NULL) {
        cis_cfg_report_error(r, "forward.sign.hmac_secret_file",
                             "forward.sign.method hmac needs the secret's file");
        return 1;
    }
    if (c->wal_max_size > c->spool_max_size / 2) {
        /* The WAL counts against max_size; checkpoints keep it far below its cap. */
        c->wal_max_size = c->spool_max_size / 2;
    }
    for (size_t i = 0; i < c->inputs.n; i++) {
        const struct agent_input_cfg *in = agent_config_input(c, i);
        if (in->type == AGENT_INPUT_MQTT && in->ack == AGENT_INPUT_ACK_AFTER_COMMIT &&
            c->transport == AGENT_TRANSPORT_MQTT) {
            char p[64];
            snprintf(p, sizeof(p), "inputs[%zu].ack", i);
            /* Paho runs every client of a process under one lock: a callback held until the
             * commit would stall the MQTT transport's publishes. */
            cis_cfg_report_error(r, p,
                                 "after_commit cannot be combined with forward.transport: mqtt "
                                 "(one Paho lock per process); set ack: on_arrival and accept its "
                                 "loss window, or forward over https");
            return 1;
        }
    }
    if (c->retry_max_ms < c->retry_initial_ms) {
        cis_cfg_report_error(r, "forward.retry.max", "must not be less than forward.retry.initial");
        return 1;
    }
    return 0;
}

static const struct cis_cfg_key agent_keys[] = {
    {.path = "agent.id", .type = CIS_CFG_STRING, .offset = AC(id), .required = 1,
     .help = "this gateway's id; with mTLS, the CN of its certificate"},
    {.path = "log.level", .type = CIS_CFG_ENUM, .offset = AC(log_level), .def = "info",
     .enum_values = log_levels, .help = "debug | info | warn | error"},
    {.path = "log.stats_interval", .type = CIS_CFG_DURATION, .offset = AC(stats_interval_ms),
     .def = "0", .min = 0, .max = 86400000, .help = "log a counters line this often (0: never)"},
    {.path = "spool.path", .type = CIS_CFG_STRING, .offset = AC(spool_path),
     .def = "/var/lib/cistern/spool.db", .help = "SQLite spool database"},
    {.path = "spool.sync", .type = CIS_CFG_ENUM, .offset = AC(sync), .def = "normal",
     .enum_values = syncs, .help = "normal | full: sync every commit before answering OK"},
    {.path = "spool.commit_interval", .type = CIS_CFG_DURATION, .offset = AC(commit_interval_ms),
     .def = "200ms", .min = 1, .max = 60000, .help = "longest wait before a group commit"},
    {.path = "spool.commit_max_records", .type = CIS_CFG_INT, .offset = AC(commit_max_records),
     .def = "5000", .min = 1, .max = 1000000, .help = "commit as soon as this many records wait"},
    {.path = "spool.commit_max_bytes", .type = CIS_CFG_SIZE, .offset = AC(commit_max_bytes),
     .def = "1MiB", .min = 1024, .max = 256 << 20, .help = "commit as soon as this many payload bytes wait"},
    {.path = "spool.compression_level", .type = CIS_CFG_INT, .offset = AC(compression_level),
     .def = "3", .min = 1, .max = 19, .help = "zstd level for segments"},
    {.path = "spool.max_size", .type = CIS_CFG_SIZE, .offset = AC(spool_max_size),
     .def = "512MiB", .min = 1 << 20, .max = 1LL << 40,
     .help = "bound on the spool's files on disk (database + WAL)"},
    {.path = "spool.when_full", .type = CIS_CFG_ENUM, .offset = AC(when_full),
     .def = "drop_oldest", .enum_values = when_fulls,
     .help = "drop_oldest (evict low priority, then oldest; ledgered) | reject_new (ERR full)"},
    {.path = "spool.wal_max_size", .type = CIS_CFG_SIZE, .offset = AC(wal_max_size),
     .def = "64MiB", .min = 64 << 10, .max = 1LL << 32,
     .help = "cap on the WAL file; it is checkpointed and truncated well before"},
    {.path = "spool.encryption_key_file", .type = CIS_CFG_STRING,
     .offset = AC(encryption_key_file),
     .help = "32-byte key (mode 0600) sealing segments with AES-256-GCM; make one with cistern-agent keygen FILE"},
    {.path = "status.socket", .type = CIS_CFG_STRING, .offset = AC(status_socket),
     .def = "/run/cistern/agent.sock",
     .help = "Unix socket where the agent answers `cistern-agent status` (\"\": off)"},
    {.path = "inputs", .type = CIS_CFG_MAPLIST, .offset = AC(inputs), .sub = &input_schema,
     .item_size = sizeof(struct agent_input_cfg), .help = "where records come from"},
    {.path = "forward.transport", .type = CIS_CFG_ENUM, .offset = AC(transport), .def = "https",
     .enum_values = transports, .help = "https | mqtt"},
    {.path = "forward.url", .type = CIS_CFG_STRING, .offset = AC(url), .required = 1,
     .help = "https: the receiver, https://host:port/v1/batches; mqtt: the broker, ssl://host:8883"},
    {.path = "forward.tls.ca_file", .type = CIS_CFG_STRING, .offset = AC(ca_file),
     .help = "CA bundle for the receiver's certificate (default: the system's)"},
    {.path = "forward.tls.cert_file", .type = CIS_CFG_STRING, .offset = AC(cert_file),
     .help = "client certificate (mTLS)"},
    {.path = "forward.tls.key_file", .type = CIS_CFG_STRING, .offset = AC(key_file),
     .help = "client private key (mTLS)"},
    {.path = "forward.sign.method", .type = CIS_CFG_ENUM, .offset = AC(sign_method),
     .def = "ecdsa", .enum_values = sign_methods,
     .help = "how every batch is signed: ecdsa (the device key, ECDSA P-256) | hmac (HMAC-SHA256 "
             "with a secret the receiver's registry also holds)"},
    {.path = "forward.sign.key_file", .type = CIS_CFG_STRING, .offset = AC(sign_key_file),
     .help = "ecdsa: the device key (default: forward.tls.key_file, as cistern-agent enroll makes it)"},
    {.path = "forward.sign.hmac_secret_file", .type = CIS_CFG_STRING,
     .offset = AC(sign_hmac_secret_file),
     .help = "hmac: file holding the secret, 32 to 128 bytes, mode 0600"},
    {.path = "forward.token", .type = CIS_CFG_STRING, .offset = AC(token),
     .help = "bearer token (optional), e.g. ${CISTERN_TOKEN}"},
    {.path = "forward.batch.max_records", .type = CIS_CFG_INT, .offset = AC(batch_max_records),
     .def = "5000", .min = 1, .max = 1000000, .help = "records in one batch"},
    {.path = "forward.batch.max_bytes", .type = CIS_CFG_SIZE, .offset = AC(batch_max_bytes),
     .def = "1MiB", .min = 1024, .max = 256 << 20, .help = "stored segment bytes in one batch"},
    {.path = "forward.batch.max_delay", .type = CIS_CFG_DURATION, .offset = AC(batch_max_delay_ms),
     .def = "2s", .min = 0, .max = 3600000, .help = "longest wait for a batch to fill"},
    {.path = "forward.in_flight", .type = CIS_CFG_INT, .offset = AC(in_flight), .def = "4",
     .min = 1, .max = 64, .help = "batches sent concurrently"},
    {.path = "forward.timeout", .type = CIS_CFG_DURATION, .offset = AC(timeout_ms), .def = "30s",
     .min = 100, .max = 3600000,
     .help = "https: one request, connect to answer; mqtt: publish to the receiver's ack, else re-sent"},
    {.path = "forward.retry.initial", .type = CIS_CFG_DURATION, .offset = AC(retry_initial_ms),
     .def = "1s", .min = 1, .max = 3600000, .help = "first retry delay"},
    {.path = "forward.retry.max", .type = CIS_CFG_DURATION, .offset = AC(retry_max_ms),
     .def = "5m", .min = 1, .max = 86400000, .help = "longest retry delay after the receiver answered with an error"},
    {.path = "forward.retry.unreachable_max", .type = CIS_CFG_DURATION,
     .offset = AC(retry_unreachable_max_ms), .def = "2s", .min = 1, .max = 86400000,
     .help = "longest delay between connection attempts while the receiver is unreachable"},
    {.path = "forward.shutdown_timeout", .type = CIS_CFG_DURATION, .offset = AC(shutdown_timeout_ms),
     .def = "5s", .min = 0, .max = 600000, .help = "on SIGTERM, keep delivering this long while the receiver takes batches"},
    {.path = "forward.mqtt.topic_prefix", .type = CIS_CFG_STRING, .offset = AC(mqtt_topic_prefix),
     .def = "cistern/v1", .help = "batches go to <prefix>/<agent.id>/batch, acks come on <prefix>/<agent.id>/ack"},
    {.path = "forward.mqtt.ack", .type = CIS_CFG_ENUM, .offset = AC(mqtt_ack), .def = "end-to-end",
     .enum_values = mqtt_acks,
     .help = "end-to-end: delete on the receiver's ack after its commit | broker: on PUBACK (weaker)"},
    {.path = "forward.mqtt.client_id", .type = CIS_CFG_STRING, .offset = AC(mqtt_client_id),
     .help = "client id of the persistent session (default agent.id)"},
    {.path = "forward.mqtt.username", .type = CIS_CFG_STRING, .offset = AC(mqtt_username),
     .help = "user name (optional; with mTLS the broker may take the certificate's CN)"},
    {.path = "forward.mqtt.password", .type = CIS_CFG_STRING, .offset = AC(mqtt_password),
     .help = "password (optional), e.g. ${CISTERN_MQTT_PASSWORD}"},
    {.path = "forward.mqtt.keepalive", .type = CIS_CFG_DURATION, .offset = AC(mqtt_keepalive_ms),
     .def = "30s", .min = 1000, .max = 65535000, .help = "MQTT keep-alive"},
    {.path = "forward.mqtt.session_expiry", .type = CIS_CFG_DURATION,
     .offset = AC(mqtt_session_expiry_ms), .def = "7d", .min = 1000, .max = 4294967LL * 1000,
     .help = "how long the broker keeps our session (and acks for us) while we are away"},
    {0},
};

const struct cis_cfg_schema agent_config_schema = {.keys = agent_keys, .check = agent_check};

int agent_config_load(const char *file, struct agent_config *cfg, char *err, size_t errlen)
{
    return cis_config_load(file, &agent_config_schema, cfg, err, errlen);
}

void agent_config_free(struct agent_config *cfg)
{
    cis_config_free(&agent_config_schema, cfg);
}
