/*
 * echo as a preforkd dylib plugin (C ABI): what it reads, it writes back.
 * The benchmark's counterpart to the built-in `echo`:
 *
 *   cc -shared -fPIC -O2 -Iinclude -o /tmp/libecho.so examples/dylib/echo.c
 *
 * Stops at a request boundary: everything read is written back before it
 * looks at shutting_down(), and it only stops when no input is pending.
 */
#include <errno.h>
#include <unistd.h>

#include "preforkd_plugin.h"

static const struct preforkd_host *host;

static int echo_init(const char *options_json, const struct preforkd_host *h, void **state,
                     char *err, size_t errlen)
{
    (void)options_json;
    (void)state;
    (void)err;
    (void)errlen;
    host = h;
    return 0;
}

static int echo_serve(void *state, int fd, const struct preforkd_conn *conn)
{
    (void)state;
    (void)conn;
    char buf[65536];
    for (;;) {
        ssize_t n = read(fd, buf, sizeof buf);
        if (n == 0)
            return 0;
        if (n < 0) {
            if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR) {
                /* A tick with nothing read: a request boundary. */
                if (host->shutting_down())
                    return 0;
                continue;
            }
            return -1;
        }
        for (ssize_t off = 0; off < n;) {
            ssize_t w = write(fd, buf + off, (size_t)(n - off));
            if (w < 0) {
                if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)
                    continue;
                return -1;
            }
            off += w;
        }
    }
}

static int echo_datagram(void *state, const uint8_t *data, size_t len,
                         const struct preforkd_conn *conn, uint8_t *reply, size_t *reply_len)
{
    (void)state;
    (void)conn;
    size_t n = len < *reply_len ? len : *reply_len;
    for (size_t i = 0; i < n; i++)
        reply[i] = data[i];
    *reply_len = n;
    return 1;
}

static const struct preforkd_plugin PLUGIN = {
    .abi_version = PREFORKD_ABI_VERSION,
    .size = sizeof(struct preforkd_plugin),
    .name = "echo",
    .init = echo_init,
    .serve_stream = echo_serve,
    .serve_datagram = echo_datagram,
    .finish = NULL,
    .reserved = {NULL, NULL, NULL, NULL},
};

const struct preforkd_plugin *preforkd_plugin_entry(void) { return &PLUGIN; }
