/* Unit tests for the table-driven YAML config loader and its size/duration parsers. */
#include <inttypes.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cmocka.h>

#include "cistern/config.h"
#include "cistern/err.h"

/* ---- test schema: a small agent-like config with a maplist and checks ---- */

struct input {
    char *name;
    int type;
    char *path;
    int64_t rate;
    uint64_t max_line;
    struct cis_strlist tags;
};

struct cfg {
    char *id;
    int log_level;
    char *spool_path;
    int sync;
    int64_t commit_interval;
    int64_t level;
    int fsync;
    char *url;
    char *token;
    uint64_t max_bytes;
    int64_t max_delay;
    struct cis_strlist peers;
    struct cis_maplist inputs;
};

static const char *const input_types[] = {"demo", "socket", NULL};
static const char *const log_levels[] = {"debug", "info", "warn", "error", NULL};
static const char *const syncs[] = {"normal", "full", NULL};

enum { INPUT_DEMO, INPUT_SOCKET };

static int input_check(void *obj, struct cis_cfg_report *r)
{
    struct input *in = obj;
    int bad = 0;

    if (in->type == INPUT_SOCKET && !in->path) {
        cis_cfg_report_error(r, "path", "is required for a socket input");
        bad = 1;
    }
    if (in->type == INPUT_DEMO && in->rate > 500) {
        cis_cfg_report_error(r, "rate", "is too fast for a demo input (at most %d)", 500);
        bad = 1;
    }
    return bad;
}

static const struct cis_cfg_key input_keys[] = {
    {.path = "name",
     .type = CIS_CFG_STRING,
     .offset = offsetof(struct input, name),
     .help = "input name",
     .required = 1},
    {.path = "type",
     .type = CIS_CFG_ENUM,
     .offset = offsetof(struct input, type),
     .help = "input type",
     .required = 1,
     .enum_values = input_types},
    {.path = "path",
     .type = CIS_CFG_STRING,
     .offset = offsetof(struct input, path),
     .help = "socket path"},
    {.path = "rate",
     .type = CIS_CFG_INT,
     .offset = offsetof(struct input, rate),
     .def = "10",
     .help = "records per second",
     .min = 1,
     .max = 1000},
    {.path = "max_line",
     .type = CIS_CFG_SIZE,
     .offset = offsetof(struct input, max_line),
     .def = "64KiB",
     .help = "longest line"},
    {.path = "opts.tags",
     .type = CIS_CFG_LIST,
     .offset = offsetof(struct input, tags),
     .help = "tags"},
    {.path = NULL},
};

static const struct cis_cfg_schema input_schema = {.keys = input_keys, .check = input_check};

static int root_check(void *obj, struct cis_cfg_report *r)
{
    struct cfg *c = obj;

    if (strncmp(c->url, "https://", 8) != 0) {
        cis_cfg_report_error(r, "forward.url", "must start with https://");
        return 1;
    }
    if (c->sync == 1 && !c->token) {
        cis_cfg_report_error(r, "forward.token", "is required with spool.sync: full");
        return 1;
    }
    if (c->inputs.n > 1 && !strcmp(c->url, "https://reject-inputs")) {
        cis_cfg_report_error(r, "inputs[1].name", "is rejected");
        return 1;
    }
    return 0;
}

static const struct cis_cfg_key keys[] = {
    {.path = "agent.id",
     .type = CIS_CFG_STRING,
     .offset = offsetof(struct cfg, id),
     .help = "gateway id",
     .required = 1},
    {.path = "log.level",
     .type = CIS_CFG_ENUM,
     .offset = offsetof(struct cfg, log_level),
     .def = "info",
     .help = "log level",
     .enum_values = log_levels},
    {.path = "spool.path",
     .type = CIS_CFG_STRING,
     .offset = offsetof(struct cfg, spool_path),
     .def = "/var/lib/cistern/spool.db",
     .help = "spool database"},
    {.path = "spool.sync",
     .type = CIS_CFG_ENUM,
     .offset = offsetof(struct cfg, sync),
     .def = "normal",
     .help = "sync mode",
     .enum_values = syncs},
    {.path = "spool.commit_interval",
     .type = CIS_CFG_DURATION,
     .offset = offsetof(struct cfg, commit_interval),
     .def = "200ms",
     .help = "group commit",
     .min = 1,
     .max = 60000},
    {.path = "spool.level",
     .type = CIS_CFG_INT,
     .offset = offsetof(struct cfg, level),
     .def = "3",
     .help = "zstd level",
     .min = 1,
     .max = 22},
    {.path = "spool.fsync",
     .type = CIS_CFG_BOOL,
     .offset = offsetof(struct cfg, fsync),
     .def = "true",
     .help = "fsync"},
    {.path = "forward.url",
     .type = CIS_CFG_STRING,
     .offset = offsetof(struct cfg, url),
     .help = "receiver url",
     .required = 1},
    {.path = "forward.token",
     .type = CIS_CFG_STRING,
     .offset = offsetof(struct cfg, token),
     .help = "bearer token"},
    {.path = "forward.batch.max_bytes",
     .type = CIS_CFG_SIZE,
     .offset = offsetof(struct cfg, max_bytes),
     .def = "1MiB",
     .help = "batch bytes",
     .min = 1024,
     .max = INT64_C(1) << 30},
    {.path = "forward.batch.max_delay",
     .type = CIS_CFG_DURATION,
     .offset = offsetof(struct cfg, max_delay),
     .def = "2s",
     .help = "batch delay"},
    {.path = "forward.peers",
     .type = CIS_CFG_LIST,
     .offset = offsetof(struct cfg, peers),
     .def = "a.example",
     .help = "peers"},
    {.path = "inputs",
     .type = CIS_CFG_MAPLIST,
     .offset = offsetof(struct cfg, inputs),
     .help = "inputs",
     .sub = &input_schema,
     .item_size = sizeof(struct input)},
    {.path = NULL},
};

static const struct cis_cfg_schema schema = {.keys = keys, .check = root_check};

#define BASE "agent:\n  id: gw-1\nforward:\n  url: https://x\n"

static struct cfg C;
static char err[512];

static int load(const char *yaml)
{
    memset(&C, 0, sizeof(C));
    memset(err, 0, sizeof(err));
    return cis_config_load_string("t.yaml", yaml, strlen(yaml), &schema, &C, err, sizeof(err));
}

static void assert_zeroed(void)
{
    static const struct cfg zero;
    assert_memory_equal(&C, &zero, sizeof(C));
}

/* Loading YAML fails with exactly MSG, and leaves the struct zeroed. */
static void expect_err(const char *yaml, const char *msg)
{
    int rc = load(yaml);
    if (rc != CIS_ECONFIG || strcmp(err, msg) != 0)
        print_error("yaml:\n%s\nwant: %s\ngot (%d): %s\n", yaml, msg, rc, err);
    assert_int_equal(rc, CIS_ECONFIG);
    assert_string_equal(err, msg);
    assert_zeroed();
}

static void expect_ok(const char *yaml)
{
    int rc = load(yaml);
    if (rc)
        print_error("yaml:\n%s\nunexpected error (%d): %s\n", yaml, rc, err);
    assert_int_equal(rc, 0);
}

/* ---- loading ---- */

static void test_all_types(void **state)
{
    struct input *in;

    (void)state;
    expect_ok("agent:\n"
              "  id: gw-0042\n"
              "log:\n"
              "  level: warn\n"
              "spool:\n"
              "  path: /tmp/s.db\n"
              "  sync: full\n"
              "  commit_interval: 250ms\n"
              "  level: 22\n"
              "  fsync: Off\n"
              "forward:\n"
              "  url: https://ingest.example.com/v1\n"
              "  token: \"secret\"\n"
              "  batch:\n"
              "    max_bytes: 1.5MiB\n"
              "    max_delay: 5m\n"
              "  peers: [p1, p2, p3]\n"
              "inputs:\n"
              "  - name: demo\n"
              "    type: demo\n"
              "    rate: 500\n"
              "    opts:\n"
              "      tags: solo\n"
              "  - name: apps\n"
              "    type: socket\n"
              "    path: /run/x.sock\n"
              "    max_line: 1KiB\n"
              "    opts: {tags: [a, b]}\n");
    assert_string_equal(C.id, "gw-0042");
    assert_int_equal(C.log_level, 2);
    assert_string_equal(C.spool_path, "/tmp/s.db");
    assert_int_equal(C.sync, 1);
    assert_int_equal(C.commit_interval, 250);
    assert_int_equal(C.level, 22);
    assert_int_equal(C.fsync, 0);
    assert_string_equal(C.url, "https://ingest.example.com/v1");
    assert_string_equal(C.token, "secret");
    assert_int_equal(C.max_bytes, 1572864);
    assert_int_equal(C.max_delay, 300000);
    assert_int_equal(C.peers.n, 3);
    assert_string_equal(C.peers.v[0], "p1");
    assert_string_equal(C.peers.v[2], "p3");
    assert_int_equal(C.inputs.n, 2);
    in = C.inputs.items;
    assert_string_equal(in[0].name, "demo");
    assert_int_equal(in[0].type, INPUT_DEMO);
    assert_null(in[0].path);
    assert_int_equal(in[0].rate, 500);
    assert_int_equal(in[0].max_line, 65536);
    assert_int_equal(in[0].tags.n, 1);
    assert_string_equal(in[0].tags.v[0], "solo");
    assert_string_equal(in[1].name, "apps");
    assert_int_equal(in[1].type, INPUT_SOCKET);
    assert_string_equal(in[1].path, "/run/x.sock");
    assert_int_equal(in[1].rate, 10);
    assert_int_equal(in[1].max_line, 1024);
    assert_int_equal(in[1].tags.n, 2);
    assert_string_equal(in[1].tags.v[1], "b");
    cis_config_free(&schema, &C);
    assert_zeroed();
}

static void test_defaults(void **state)
{
    (void)state;
    expect_ok(BASE);
    assert_string_equal(C.id, "gw-1");
    assert_int_equal(C.log_level, 1);
    assert_string_equal(C.spool_path, "/var/lib/cistern/spool.db");
    assert_int_equal(C.sync, 0);
    assert_int_equal(C.commit_interval, 200);
    assert_int_equal(C.level, 3);
    assert_int_equal(C.fsync, 1);
    assert_null(C.token);
    assert_int_equal(C.max_bytes, 1048576);
    assert_int_equal(C.max_delay, 2000);
    assert_int_equal(C.peers.n, 1);
    assert_string_equal(C.peers.v[0], "a.example");
    assert_int_equal(C.inputs.n, 0);
    assert_null(C.inputs.items);
    cis_config_free(&schema, &C);

    /* a null value counts as not written: the default applies */
    expect_ok(BASE "spool:\n  path:\n  level: ~\n  sync: normal\nlog:\n");
    assert_string_equal(C.spool_path, "/var/lib/cistern/spool.db");
    assert_int_equal(C.level, 3);
    cis_config_free(&schema, &C);

    /* a quoted empty string is a value */
    expect_ok(BASE "spool:\n  path: \"\"\n");
    assert_string_equal(C.spool_path, "");
    cis_config_free(&schema, &C);
}

static void test_scalar_errors(void **state)
{
    (void)state;
    expect_err(BASE "spool:\n  sync: fast\n",
               "t.yaml:6:9: spool.sync: \"fast\" is not one of: normal, full");
    expect_err(BASE "spool:\n  commit_interval: 30\n",
               "t.yaml:6:20: spool.commit_interval: \"30\" is not a duration (add a unit: 30s, "
               "250ms)");
    expect_err(BASE "  batch:\n    max_bytes: \"256KB\"\n",
               "t.yaml:6:16: forward.batch.max_bytes: \"256KB\" is not a size (try 256KiB)");
    expect_err(BASE "spool:\n  fsync: maybe\n",
               "t.yaml:6:10: spool.fsync: \"maybe\" is not a boolean (use true or false)");
    expect_err(BASE "spool:\n  level: 3x\n", "t.yaml:6:10: spool.level: \"3x\" is not an integer");
    expect_err(BASE "spool:\n  level: \" 3\"\n",
               "t.yaml:6:10: spool.level: \" 3\" is not an integer");
    expect_err(BASE "spool:\n  level: 99999999999999999999\n",
               "t.yaml:6:10: spool.level: \"99999999999999999999\" is out of range for an "
               "integer");
    expect_err(BASE "  batch:\n    max_delay: -1s\n",
               "t.yaml:6:16: forward.batch.max_delay: \"-1s\" is not a duration (durations "
               "cannot be negative)");
}

static void test_bounds(void **state)
{
    (void)state;
    expect_err(BASE "spool:\n  level: 30\n",
               "t.yaml:6:10: spool.level: \"30\" must be between 1 and 22");
    expect_err(BASE "spool:\n  level: 0\n",
               "t.yaml:6:10: spool.level: \"0\" must be between 1 and 22");
    expect_err(BASE "spool:\n  commit_interval: 2m\n",
               "t.yaml:6:20: spool.commit_interval: \"2m\" must be between 1ms and 1m");
    expect_err(BASE "  batch:\n    max_bytes: 2GiB\n",
               "t.yaml:6:16: forward.batch.max_bytes: \"2GiB\" must be between 1KiB and 1GiB");
    expect_err(BASE "  batch:\n    max_bytes: 1000\n",
               "t.yaml:6:16: forward.batch.max_bytes: \"1000\" must be between 1KiB and 1GiB");
    /* the edges themselves are fine */
    expect_ok(BASE "  batch:\n    max_bytes: 1GiB\n"
                   "spool:\n  level: 22\n  commit_interval: 1m\n");
    cis_config_free(&schema, &C);
    /* a section written under the wrong parent is an unknown key */
    expect_err(BASE "spool:\n  batch:\n    max_bytes: 1GiB\n",
               "t.yaml:6:3: spool.batch: unknown key (did you mean spool.path?)");
}

static void test_shape_errors(void **state)
{
    (void)state;
    expect_err(BASE "  batch:\n    max_bytes:\n      x: 1\n",
               "t.yaml:7:7: forward.batch.max_bytes: expected a size, got a mapping");
    expect_err(BASE "spool:\n  level: [1]\n",
               "t.yaml:6:10: spool.level: expected an integer, got a sequence");
    expect_err("agent:\n  id: {a: 1}\n", "t.yaml:2:7: agent.id: expected a string, got a mapping");
    expect_err(BASE "spool: 5\n", "t.yaml:5:8: spool: expected a mapping, got a scalar");
    expect_err(BASE "  batch: [1, 2]\n",
               "t.yaml:5:10: forward.batch: expected a mapping, got a sequence");
    expect_err(BASE "  peers: {a: b}\n",
               "t.yaml:5:10: forward.peers: expected a list, got a mapping");
    expect_err(BASE "  peers:\n    - a\n    - {b: c}\n",
               "t.yaml:7:7: forward.peers[1]: expected a string, got a mapping");
    expect_err(BASE "inputs: x\n", "t.yaml:5:9: inputs: expected a list of mappings, got a scalar");
    expect_err(BASE "inputs:\n  - foo\n",
               "t.yaml:6:5: inputs[0]: expected a mapping, got a scalar");
    expect_err("- a\n- b\n", "t.yaml:1:1: expected a mapping at the top level, got a sequence");
    expect_err("just text\n", "t.yaml:1:1: expected a mapping at the top level, got a scalar");
    expect_err("[1]: x\n", "t.yaml:1:1: expected a key, got a sequence");
}

static void test_unknown_keys(void **state)
{
    (void)state;
    expect_err(BASE "spool:\n  pathh: /x\n",
               "t.yaml:6:3: spool.pathh: unknown key (did you mean spool.path?)");
    expect_err(BASE "sppol:\n  path: x\n", "t.yaml:5:1: sppol: unknown key (did you mean spool?)");
    expect_err(BASE "  batch:\n    max_byte: 1KiB\n",
               "t.yaml:6:5: forward.batch.max_byte: unknown key (did you mean "
               "forward.batch.max_bytes?)");
    expect_err(BASE "zzzzzzzz: 1\n", "t.yaml:5:1: zzzzzzzz: unknown key");
    expect_err(BASE "forward.token: x\n",
               "t.yaml:5:1: forward.token: unknown key (write nested mappings, not dotted keys)");
    expect_err(BASE "inputs:\n  - nmae: a\n    type: demo\n",
               "t.yaml:6:5: inputs[0].nmae: unknown key (did you mean inputs[0].name?)");
    expect_err(BASE "inputs:\n  - name: a\n    type: demo\n    opts:\n      tag: [x]\n",
               "t.yaml:9:7: inputs[0].opts.tag: unknown key (did you mean inputs[0].opts.tags?)");
}

static void test_duplicate_key(void **state)
{
    (void)state;
    expect_err("agent:\n  id: a\n  id: b\nforward:\n  url: https://x\n",
               "t.yaml:3:3: agent.id: duplicate key (first given at 2:3)");
    expect_err(BASE "forward:\n  token: x\n",
               "t.yaml:5:1: forward: duplicate key (first given at 3:1)");
}

static void test_env(void **state)
{
    (void)state;
    setenv("CIS_TEST_HOST", "example.org", 1);
    setenv("CIS_TEST_PORT", "8443", 1);
    setenv("CIS_TEST_EMPTY", "", 1);
    setenv("CIS_TEST_SIZE", "2MiB", 1);
    unsetenv("CIS_TEST_UNSET");
    expect_ok("agent:\n  id: \"${CIS_TEST_HOST}\"\n"
              "forward:\n"
              "  url: https://${CIS_TEST_HOST}:${CIS_TEST_PORT}/v1\n"
              "  token: a${CIS_TEST_EMPTY}b $$ c$5 $${NOT_EXPANDED} $\n"
              "  batch:\n    max_bytes: ${CIS_TEST_SIZE}\n"
              "  peers: [\"${CIS_TEST_PORT}\"]\n");
    assert_string_equal(C.id, "example.org");
    assert_string_equal(C.url, "https://example.org:8443/v1");
    assert_string_equal(C.token, "ab $$ c$5 ${NOT_EXPANDED} $");
    assert_int_equal(C.max_bytes, 2 * 1048576);
    assert_string_equal(C.peers.v[0], "8443");
    cis_config_free(&schema, &C);

    expect_err(BASE "  token: x${CIS_TEST_UNSET}y\n",
               "t.yaml:5:10: forward.token: ${CIS_TEST_UNSET} is not set in the environment");
    expect_err(BASE "  peers: [a, \"${CIS_TEST_UNSET}\"]\n",
               "t.yaml:5:14: forward.peers[1]: ${CIS_TEST_UNSET} is not set in the environment");
    expect_err(BASE "  token: abc${X\n",
               "t.yaml:5:10: forward.token: \"abc${X\" has an unterminated ${");
    expect_err(BASE "  token: ${1X}\n",
               "t.yaml:5:10: forward.token: ${1X} is not a valid variable name");
    expect_err(BASE "  token: ${}\n",
               "t.yaml:5:10: forward.token: ${} is not a valid variable name");
    expect_err(BASE "inputs:\n  - name: ${CIS_TEST_UNSET}\n",
               "t.yaml:6:11: inputs[0].name: ${CIS_TEST_UNSET} is not set in the environment");
}

static void test_required(void **state)
{
    (void)state;
    expect_err("", "t.yaml:1:1: agent.id: is required");
    expect_err("# only a comment\n", "t.yaml:1:1: agent.id: is required");
    expect_err("agent:\n  id: a\n", "t.yaml:1:1: forward.url: is required");
    expect_err("agent:\n  id: a\nforward:\n  token: t\n", "t.yaml:4:3: forward.url: is required");
    expect_err("agent:\n  id: a\nforward:\n", "t.yaml:3:9: forward.url: is required");
    expect_err(BASE "inputs:\n  - type: demo\n", "t.yaml:6:5: inputs[0].name: is required");
    expect_err(BASE "inputs:\n  - name: a\n    type: demo\n  -\n",
               "t.yaml:8:4: inputs[1].name: is required");
}

static void test_maplist(void **state)
{
    (void)state;
    expect_err(BASE "inputs:\n"
                    "  - name: a\n"
                    "    type: demo\n"
                    "  - name: b\n"
                    "    type: socket\n"
                    "    rate: 0\n",
               "t.yaml:10:11: inputs[1].rate: \"0\" must be between 1 and 1000");
    expect_err(BASE "inputs:\n"
                    "  - name: a\n"
                    "    type: demo\n"
                    "  - name: b\n"
                    "    type: sock\n",
               "t.yaml:9:11: inputs[1].type: \"sock\" is not one of: demo, socket");
    expect_err(BASE "inputs:\n"
                    "  - name: a\n"
                    "    type: demo\n"
                    "    opts:\n"
                    "      tags: [x, [y]]\n",
               "t.yaml:9:17: inputs[0].opts.tags[1]: expected a string, got a sequence");
    expect_ok(BASE "inputs: []\n");
    assert_int_equal(C.inputs.n, 0);
    cis_config_free(&schema, &C);
}

static void test_check(void **state)
{
    (void)state;
    /* item check, key not written: at the item's mapping */
    expect_err(BASE "inputs:\n"
                    "  - name: a\n"
                    "    type: demo\n"
                    "  - name: b\n"
                    "    type: socket\n",
               "t.yaml:8:5: inputs[1].path: is required for a socket input");
    /* item check, key written: at its value */
    expect_err(BASE "inputs:\n"
                    "  - name: a\n"
                    "    type: demo\n"
                    "    rate: 600\n",
               "t.yaml:8:11: inputs[0].rate: is too fast for a demo input (at most 500)");
    /* root check: written key, unwritten key in a written section, indexed path */
    expect_err("agent:\n  id: a\nforward:\n  url: http://x\n",
               "t.yaml:4:8: forward.url: must start with https://");
    expect_err(BASE "spool:\n  sync: full\n",
               "t.yaml:4:3: forward.token: is required with spool.sync: full");
    expect_err("agent:\n  id: a\nforward:\n  url: https://reject-inputs\ninputs:\n"
               "  - {name: a, type: demo}\n  - {name: b, type: demo}\n",
               "t.yaml:7:12: inputs[1].name: is rejected");
}

static void test_syntax_errors(void **state)
{
    (void)state;
    expect_err("agent:\n  id: a\n bad: x\n", "t.yaml:3:2: did not find expected key");
    expect_err("agent:\n  id: [a, b\n", "t.yaml:3:1: did not find expected ',' or ']'");
    expect_err("agent:\n  id: a\n\tx: 1\n",
               "t.yaml:3:1: found a tab character that violates indentation");
    expect_err("a: 1\n---\nb: 2\n", "t.yaml:3:1: only one YAML document is allowed");
}

static int bad_check(void *obj, struct cis_cfg_report *r)
{
    (void)obj;
    (void)r;
    return 1;
}

static void test_schema_bugs(void **state)
{
    static const struct cis_cfg_key bad_keys[] = {
        {.path = "timeout", .type = CIS_CFG_DURATION, .offset = 0, .def = "30"},
        {.path = NULL},
    };
    static const struct cis_cfg_schema bad = {.keys = bad_keys};
    static const struct cis_cfg_key ok_keys[] = {
        {.path = "timeout", .type = CIS_CFG_DURATION, .offset = 0, .def = "30s"},
        {.path = NULL},
    };
    static const struct cis_cfg_schema silent = {.keys = ok_keys, .check = bad_check};
    int64_t v = 0;

    (void)state;
    assert_int_equal(cis_config_load_string("t.yaml", "", 0, &bad, &v, err, sizeof(err)),
                     CIS_ECONFIG);
    assert_string_equal(err, "t.yaml: timeout: invalid default in schema: \"30\" is not a "
                             "duration (add a unit: 30s, 250ms)");
    assert_int_equal(v, 0);
    /* a check that fails without saying why still fails the load */
    assert_int_equal(cis_config_load_string("t.yaml", "", 0, &silent, &v, err, sizeof(err)),
                     CIS_ECONFIG);
    assert_string_equal(err, "t.yaml:1:1: is not valid");
    assert_int_equal(v, 0);
}

static void test_small_err_buffer(void **state)
{
    char small[12];

    (void)state;
    memset(&C, 0, sizeof(C));
    assert_int_equal(
        cis_config_load_string("t.yaml", "x: 1\n", 5, &schema, &C, small, sizeof(small)),
        CIS_ECONFIG);
    assert_string_equal(small, "t.yaml:1:1:");
    memset(&C, 0, sizeof(C));
    assert_int_equal(cis_config_load_string("t.yaml", "x: 1\n", 5, &schema, &C, NULL, 0),
                     CIS_ECONFIG);
}

static void test_free_zeroed(void **state)
{
    struct cfg z;

    (void)state;
    memset(&z, 0, sizeof(z));
    cis_config_free(&schema, &z);
    cis_config_free(&schema, &z);
    cis_config_free(&schema, NULL);
    memset(&C, 0, sizeof(C));
    assert_memory_equal(&z, &C, sizeof(z));
}

static void test_file(void **state)
{
    char path[] = "/tmp/cis_test_config_XXXXXX";
    const char *yaml = BASE "spool:\n  pathh: x\n";
    int fd;
    FILE *f;

    (void)state;
    fd = mkstemp(path);
    assert_true(fd >= 0);
    f = fdopen(fd, "w");
    assert_non_null(f);
    fputs(BASE "spool:\n  level: 7\n", f);
    fclose(f);
    memset(&C, 0, sizeof(C));
    assert_int_equal(cis_config_load(path, &schema, &C, err, sizeof(err)), 0);
    assert_string_equal(C.id, "gw-1");
    assert_int_equal(C.level, 7);
    cis_config_free(&schema, &C);

    /* the file name is in the message */
    f = fopen(path, "w");
    assert_non_null(f);
    fputs(yaml, f);
    fclose(f);
    memset(&C, 0, sizeof(C));
    assert_int_equal(cis_config_load(path, &schema, &C, err, sizeof(err)), CIS_ECONFIG);
    {
        char want[256];
        snprintf(want, sizeof(want),
                 "%s:6:3: spool.pathh: unknown key (did you mean "
                 "spool.path?)",
                 path);
        assert_string_equal(err, want);
    }
    assert_zeroed();
    unlink(path);

    assert_int_equal(cis_config_load("/nonexistent/cistern.yaml", &schema, &C, err, sizeof(err)),
                     CIS_EIO);
    assert_string_equal(err, "/nonexistent/cistern.yaml: cannot open: No such file or directory");
    assert_zeroed();
}

static void test_print_help(void **state)
{
    char *buf = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&buf, &len);

    (void)state;
    assert_non_null(f);
    cis_config_print_help(&schema, f);
    fclose(f);
    assert_non_null(strstr(buf, "agent.id (string, required): gateway id\n"));
    assert_non_null(strstr(buf, "spool.sync (normal|full, default normal): sync mode\n"));
    assert_non_null(strstr(buf, "forward.batch.max_bytes (size, default 1MiB): batch bytes\n"));
    assert_non_null(strstr(buf, "inputs (list of mappings): inputs\n"));
    assert_non_null(strstr(buf, "inputs[].name (string, required): input name\n"));
    assert_non_null(strstr(buf, "inputs[].rate (integer, default 10): records per second\n"));
    assert_non_null(strstr(buf, "inputs[].opts.tags (list): tags\n"));
    free(buf);
}

/* ---- parsers ---- */

static void size_ok(const char *s, uint64_t want)
{
    uint64_t v = 12345;
    char why[128] = "";
    int rc = cis_parse_size(s, &v, why, sizeof(why));
    if (rc)
        print_error("%s: %s\n", s, why);
    assert_int_equal(rc, 0);
    assert_true(v == want);
}

static void size_bad(const char *s, const char *want)
{
    uint64_t v = 12345;
    char why[128] = "";
    int rc = cis_parse_size(s, &v, why, sizeof(why));
    if (rc != CIS_EINVAL)
        print_error("%s: accepted as %" PRIu64 "\n", s, v);
    assert_int_equal(rc, CIS_EINVAL);
    assert_string_equal(why, want);
    assert_true(v == 12345);
}

static void test_parse_size(void **state)
{
    (void)state;
    size_ok("0", 0);
    size_ok("1048576", 1048576);
    size_ok("1B", 1);
    size_ok("512KiB", 512 * 1024);
    size_ok("64MiB", UINT64_C(64) << 20);
    size_ok("1GiB", UINT64_C(1) << 30);
    size_ok("1TiB", UINT64_C(1) << 40);
    size_ok("1 KiB", 1024);
    size_ok("1.5MiB", 1572864);
    size_ok("0.5KiB", 512);
    size_ok("1.0001KiB", 1024); /* floor */
    size_ok("18446744073709551615", UINT64_MAX);
    size_ok("16777215TiB", UINT64_C(16777215) << 40);
    size_bad("16777216TiB", "is too large for a size");
    size_ok("16777215.999999TiB",
            (UINT64_C(16777215) << 40) + 999999 * (UINT64_C(1) << 40) / 1000000);
    size_bad("16777216.5TiB", "is too large for a size");
    size_bad("18446744073709551616", "is too large for a size");
    size_bad("99999999999999999999999KiB", "is too large for a size");
    size_bad("-1", "is not a size (sizes cannot be negative)");
    size_bad("", "is not a size (use bytes or KiB, MiB, GiB, TiB: 512KiB)");
    size_bad("KiB", "is not a size (use bytes or KiB, MiB, GiB, TiB: 512KiB)");
    size_bad("1.KiB", "is not a size (use bytes or KiB, MiB, GiB, TiB: 512KiB)");
    size_bad("1.5", "is not a size (a fraction of a byte)");
    size_bad("1.1234567MiB", "is not a size (at most 6 decimals)");
    size_bad("256KB", "is not a size (try 256KiB)");
    size_bad("256kb", "is not a size (try 256KiB)");
    size_bad("1k", "is not a size (try 1KiB)");
    size_bad("2M", "is not a size (try 2MiB)");
    size_bad("2MB", "is not a size (try 2MiB)");
    size_bad("1.5GB", "is not a size (try 1.5GiB)");
    size_bad("3mib", "is not a size (try 3MiB)");
    size_bad("1T", "is not a size (try 1TiB)");
    size_bad("1PiB", "is not a size (units: B, KiB, MiB, GiB, TiB)");
    size_bad("1xyz", "is not a size (units: B, KiB, MiB, GiB, TiB)");
    size_bad("1b", "is not a size (units: B, KiB, MiB, GiB, TiB)");
    size_bad("+1", "is not a size (use bytes or KiB, MiB, GiB, TiB: 512KiB)");
}

static void dur_ok(const char *s, int64_t want)
{
    int64_t v = 12345;
    char why[128] = "";
    int rc = cis_parse_duration(s, &v, why, sizeof(why));
    if (rc)
        print_error("%s: %s\n", s, why);
    assert_int_equal(rc, 0);
    assert_true(v == want);
}

static void dur_bad(const char *s, const char *want)
{
    int64_t v = 12345;
    char why[128] = "";
    assert_int_equal(cis_parse_duration(s, &v, why, sizeof(why)), CIS_EINVAL);
    assert_string_equal(why, want);
    assert_true(v == 12345);
}

static void test_parse_duration(void **state)
{
    (void)state;
    dur_ok("0", 0);
    dur_ok("0s", 0);
    dur_ok("250ms", 250);
    dur_ok("30s", 30000);
    dur_ok("5m", 300000);
    dur_ok("1h", 3600000);
    dur_ok("7d", 604800000);
    dur_ok("2 s", 2000);
    dur_ok("9223372036854775807ms", INT64_MAX);
    dur_ok("106751991167d", INT64_C(106751991167) * 86400000);
    dur_bad("106751991168d", "is too large for a duration");
    dur_bad("9223372036854775808ms", "is too large for a duration");
    dur_bad("99999999999999999999s", "is too large for a duration");
    dur_bad("30", "is not a duration (add a unit: 30s, 250ms)");
    dur_bad("-1s", "is not a duration (durations cannot be negative)");
    dur_bad("", "is not a duration (use ms, s, m, h, d: 250ms, 30s)");
    dur_bad("s", "is not a duration (use ms, s, m, h, d: 250ms, 30s)");
    dur_bad("1.5s", "is not a duration (use a whole number with a smaller unit)");
    dur_bad("30sec", "is not a duration (try 30s)");
    dur_bad("5min", "is not a duration (try 5m)");
    dur_bad("2hours", "is not a duration (try 2h)");
    dur_bad("1w", "is not a duration (units: ms, s, m, h, d)");
    dur_bad("1h30m", "is not a duration (units: ms, s, m, h, d)");
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_all_types),      cmocka_unit_test(test_defaults),
        cmocka_unit_test(test_scalar_errors),  cmocka_unit_test(test_bounds),
        cmocka_unit_test(test_shape_errors),   cmocka_unit_test(test_unknown_keys),
        cmocka_unit_test(test_duplicate_key),  cmocka_unit_test(test_env),
        cmocka_unit_test(test_required),       cmocka_unit_test(test_maplist),
        cmocka_unit_test(test_check),          cmocka_unit_test(test_syntax_errors),
        cmocka_unit_test(test_schema_bugs),    cmocka_unit_test(test_small_err_buffer),
        cmocka_unit_test(test_free_zeroed),    cmocka_unit_test(test_file),
        cmocka_unit_test(test_print_help),     cmocka_unit_test(test_parse_size),
        cmocka_unit_test(test_parse_duration),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
