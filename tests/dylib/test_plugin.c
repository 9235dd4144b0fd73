/*
 * A plugin for tests/dylib.rs, built by the test with cc in variants:
 *   -DTEST_ABI=99      a wrong ABI version
 *   -DNO_ENTRY         no preforkd_plugin_entry symbol
 *   -DCONSTRUCTOR_MARKER='"PATH"'  a constructor (which the header forbids
 *                      side effects) appends its process's uid to PATH:
 *                      proves `preforkd check` does not run it as root
 * Options (JSON): "banner" (sent on connect, and prefixed to datagram
 * replies), "fail" (init fails with that message).
 * Stream: line by line; "crash" segfaults the worker, "pid" answers the
 * worker's pid, "stop?" answers shutting_down(), anything else is echoed.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "preforkd_plugin.h"

#ifdef CONSTRUCTOR_MARKER
__attribute__((constructor)) static void t_marker(void)
{
    FILE *f = fopen(CONSTRUCTOR_MARKER, "a");
    if (f != NULL) {
        fprintf(f, "%u\n", (unsigned)getuid());
        fclose(f);
    }
}
#endif

#ifndef TEST_ABI
#define TEST_ABI PREFORKD_ABI_VERSION
#endif

struct state {
    char banner[256];
};

static const struct preforkd_host *host;

/* The string value of "key" in a flat JSON object (no escapes). */
static int json_str(const char *json, const char *key, char *out, size_t outlen)
{
    char pat[64];
    snprintf(pat, sizeof pat, "\"%s\":\"", key);
    const char *p = strstr(json, pat);
    if (p == NULL)
        return 0;
    p += strlen(pat);
    const char *e = strchr(p, '"');
    if (e == NULL)
        return 0;
    size_t n = (size_t)(e - p);
    if (n >= outlen)
        n = outlen - 1;
    memcpy(out, p, n);
    out[n] = 0;
    return 1;
}

static int t_init(const char *json, const struct preforkd_host *h, void **state, char *err,
                  size_t errlen)
{
    host = h;
    char fail[256];
    if (json_str(json, "fail", fail, sizeof fail)) {
        snprintf(err, errlen, "told to fail: %s", fail);
        return 1;
    }
    struct state *s = calloc(1, sizeof *s);
    if (s == NULL)
        return 1;
    json_str(json, "banner", s->banner, sizeof s->banner);
    *state = s;
    char msg[300];
    snprintf(msg, sizeof msg, "test plugin initialised with %s", json);
    host->log(PREFORKD_LOG_INFO, msg);
    return 0;
}

static int send_all(int fd, const char *buf, size_t len)
{
    while (len > 0) {
        ssize_t n = write(fd, buf, len);
        if (n < 0) {
            if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)
                continue;
            return -1;
        }
        buf += n;
        len -= (size_t)n;
    }
    return 0;
}

static int t_serve(void *state, int fd, const struct preforkd_conn *conn)
{
    struct state *s = state;
    char line[1024];
    size_t have = 0;
    (void)conn;
    if (s->banner[0]) {
        char b[300];
        int n = snprintf(b, sizeof b, "%s\n", s->banner);
        if (send_all(fd, b, (size_t)n) != 0)
            return -1;
    }
    for (;;) {
        char *nl;
        while ((nl = memchr(line, '\n', have)) != NULL) {
            size_t len = (size_t)(nl - line);
            char out[1100];
            int n;
            if (len == 5 && memcmp(line, "crash", 5) == 0) {
                volatile int *p = NULL;
                *p = 1;
            }
            if (len == 3 && memcmp(line, "pid", 3) == 0)
                n = snprintf(out, sizeof out, "%d\n", (int)getpid());
            else if (len == 5 && memcmp(line, "stop?", 5) == 0)
                n = snprintf(out, sizeof out, "%d\n", host->shutting_down());
            else
                n = snprintf(out, sizeof out, "%.*s\n", (int)len, line);
            if (send_all(fd, out, (size_t)n) != 0)
                return -1;
            memmove(line, nl + 1, have - len - 1);
            have -= len + 1;
        }
        if (have == sizeof line)
            return 2; /* too long: an error, logged */
        if (have == 0 && host->shutting_down())
            return 0;
        ssize_t n = read(fd, line + have, sizeof line - have);
        if (n == 0)
            return 0;
        if (n < 0) {
            if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)
                continue;
            return -1;
        }
        have += (size_t)n;
    }
}

static int t_datagram(void *state, const uint8_t *data, size_t len,
                      const struct preforkd_conn *conn, uint8_t *reply, size_t *reply_len)
{
    struct state *s = state;
    int n = snprintf((char *)reply, *reply_len, "%s|%s|%.*s", s->banner, conn->service,
                     (int)len, (const char *)data);
    if (n < 0)
        return -1;
    *reply_len = (size_t)n < *reply_len ? (size_t)n : *reply_len;
    return 1;
}

static void t_finish(void *state) { free(state); }

static const struct preforkd_plugin PLUGIN = {
    .abi_version = TEST_ABI,
    .size = sizeof(struct preforkd_plugin),
    .name = "test",
    .init = t_init,
    .serve_stream = t_serve,
    .serve_datagram = t_datagram,
    .finish = t_finish,
    .reserved = {NULL, NULL, NULL, NULL},
};

#ifdef NO_ENTRY
const struct preforkd_plugin *not_the_entry(void) { return &PLUGIN; }
#else
const struct preforkd_plugin *preforkd_plugin_entry(void) { return &PLUGIN; }
#endif
