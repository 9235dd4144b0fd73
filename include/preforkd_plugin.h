/*
 * preforkd_plugin.h: the C ABI of preforkd's `dylib` plugin (ABI version 1).
 *
 * A plugin is a shared library that exports
 *
 *     const struct preforkd_plugin *preforkd_plugin_entry(void);
 *
 * preforkd loads it in each worker, after fork, and also in `preforkd
 * check` (to validate the symbol and the ABI version; check reads the
 * symbol from the file's ELF dynamic symbol table, then loads the library
 * in a child running as the workers' user, never as root). So the entry
 * function MUST only return a pointer to a static table: no allocation, no
 * I/O, no other side effect. Library constructors run in both places too:
 * do not use them. All work starts in init().
 *
 * Threads: a worker serves its connections from `threads` threads at once,
 * all with the same state pointer. serve_stream and serve_datagram must be
 * thread-safe (per-connection state lives in their locals).
 *
 * Config:
 *     [service.handler]
 *     plugin = "dylib"
 *     [service.handler.options]
 *     path = "/usr/lib/preforkd/plugins/libfoo.so"   # absolute
 *     banner = "hello"                                # the plugin's own keys
 *
 * The library file and every directory up to / (as named and behind
 * symlinks) must be owned by root or the master's user and not be writable
 * by group or others (as sshd's StrictModes, no exception for sticky
 * directories such as /tmp), or the worker refuses to load it.
 */
#ifndef PREFORKD_PLUGIN_H
#define PREFORKD_PLUGIN_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define PREFORKD_ABI_VERSION 1u
#define PREFORKD_ENTRY_SYMBOL "preforkd_plugin_entry"

/* Levels for preforkd_host.log. */
#define PREFORKD_LOG_ERROR 0
#define PREFORKD_LOG_WARN 1
#define PREFORKD_LOG_INFO 2
#define PREFORKD_LOG_DEBUG 3

/* What preforkd gives the plugin. Valid for the life of the worker. */
struct preforkd_host {
    /* sizeof(struct preforkd_host): fields are only ever appended. */
    uint32_t size;
    /* Nonzero once the worker has been asked to stop (SIGTERM, reload,
     * max_requests): finish the answer owed and return from serve_stream
     * at the next point where you would wait for a request. */
    int (*shutting_down)(void);
    /* One line to preforkd's log (msg is copied; a trailing newline is not
     * needed). */
    void (*log)(int level, const char *msg);
};

/* One connection or datagram. All strings are NUL-terminated and valid
 * only during the call. */
struct preforkd_conn {
    const char *service; /* the service's name */
    const char *peer;    /* "127.0.0.1:5000", "[::1]:5000", "unix:(unnamed)" */
    const char *local;   /* the address the client reached ("" for a datagram) */
    int family;          /* AF_INET, AF_INET6 or AF_UNIX */
};

struct preforkd_plugin {
    /* PREFORKD_ABI_VERSION: any other value is a boot failure. */
    uint32_t abi_version;
    /* sizeof(struct preforkd_plugin). */
    uint32_t size;
    /* The plugin's name, for the log. */
    const char *name;

    /* Called once per worker, before it serves. options_json is the
     * [service.handler.options] table without `path`, as a JSON object.
     * Store your state in *state. Return 0, or nonzero with a message in
     * err (at most errlen bytes, NUL-terminated): the worker fails to boot
     * with that reason. May be NULL. */
    int (*init)(const char *options_json, const struct preforkd_host *host,
                void **state, char *err, size_t errlen);

    /* Serves one stream connection (tcp, unix). The fd is borrowed: do not
     * close it; preforkd closes it gracefully after you return. It is a
     * blocking socket with 200 ms SO_RCVTIMEO/SO_SNDTIMEO: a read or write
     * that fails with EAGAIN/EWOULDBLOCK (or EINTR) means "call
     * host->shutting_down() and retry" (return at a request boundary when
     * it says so). Return 0 when done, nonzero on error (logged).
     * NULL: the plugin serves no stream sockets (a service that listens on
     * one fails to boot). */
    int (*serve_stream)(void *state, int fd, const struct preforkd_conn *conn);

    /* Answers one datagram (udp, unixgram). reply has *reply_len bytes of
     * room (65536); write the answer there and set *reply_len to its
     * length. Return 1 to send the reply, 0 to send nothing, negative on
     * error (logged, nothing sent). NULL: no datagram sockets. */
    int (*serve_datagram)(void *state, const uint8_t *data, size_t len,
                          const struct preforkd_conn *conn, uint8_t *reply,
                          size_t *reply_len);

    /* Called once when the worker stops serving. May be NULL. */
    void (*finish)(void *state);

    /* Must be NULL. */
    void *reserved[4];
};

/* The one exported symbol. Must only return a static table (see above). */
const struct preforkd_plugin *preforkd_plugin_entry(void);

#ifdef __cplusplus
}
#endif

#endif /* PREFORKD_PLUGIN_H */
