/*
 * The menu dialogue of docs/MENU.md as a preforkd dylib plugin (C ABI).
 *
 *   cc -shared -fPIC -O2 -Iinclude -o /tmp/libmenu.so examples/dylib/menu.c
 *
 * and config/examples/menu-dylib.toml. Stops at a request boundary: when
 * the worker is asked to stop, it closes at the next point where it would
 * wait for a choice.
 */
#include <errno.h>
#include <string.h>
#include <unistd.h>

#include "preforkd_plugin.h"

#define MAX_LINE 1024

static const char BANNER[] =
    "Welcome to the preforkd menu. Please choose: 0 to talk to an operator, exit to leave.\n";
static const char OPERATOR[] = "Your call is being transferred to an operator.\n";
static const char AGAIN[] =
    "Invalid choice. Please choose again: 0 to talk to an operator, exit to leave.\n";
static const char GOODBYE[] = "Goodbye.\n";

static const struct preforkd_host *host;

static int menu_init(const char *options_json, const struct preforkd_host *h, void **state,
                     char *err, size_t errlen)
{
    (void)options_json;
    (void)state;
    (void)err;
    (void)errlen;
    host = h;
    return 0;
}

/* Writes all of buf; EAGAIN is a tick: the answer is owed, keep trying. */
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

static int is_space(char c) { return c == ' ' || c == '\t'; }

/* Answers one choice; returns 1 if the caller is let go. */
static int answer(int fd, char *line, size_t len, int *err)
{
    if (len > 0 && line[len - 1] == '\r')
        len--;
    size_t a = 0;
    while (a < len && is_space(line[a]))
        a++;
    while (len > a && is_space(line[len - 1]))
        len--;
    const char *choice = line + a;
    size_t n = len - a;
    if (n == 1 && choice[0] == '0') {
        *err = send_all(fd, OPERATOR, sizeof OPERATOR - 1);
        return 0;
    }
    if (n == 4 && memcmp(choice, "exit", 4) == 0) {
        *err = send_all(fd, GOODBYE, sizeof GOODBYE - 1);
        return 1;
    }
    *err = send_all(fd, AGAIN, sizeof AGAIN - 1);
    return 0;
}

static int menu_serve(void *state, int fd, const struct preforkd_conn *conn)
{
    (void)state;
    (void)conn;
    char line[MAX_LINE];
    size_t have = 0;
    int err = 0;
    if (send_all(fd, BANNER, sizeof BANNER - 1) != 0)
        return -1;
    for (;;) {
        /* Answer every whole line already received. */
        char *nl;
        while ((nl = memchr(line, '\n', have)) != NULL) {
            size_t len = (size_t)(nl - line);
            int bye = answer(fd, line, len, &err);
            memmove(line, nl + 1, have - len - 1);
            have -= len + 1;
            if (err != 0)
                return -1;
            if (bye)
                return 0;
        }
        if (have == sizeof line) {
            /* Over 1 KiB without a newline: an invalid choice; drop it. */
            if (send_all(fd, AGAIN, sizeof AGAIN - 1) != 0)
                return -1;
            have = 0;
        }
        /* Waiting for a choice with nothing pending: a request boundary. */
        if (have == 0 && host->shutting_down())
            return 0;
        ssize_t n = read(fd, line + have, sizeof line - have);
        if (n == 0)
            return 0; /* the caller closed: close without a word */
        if (n < 0) {
            if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)
                continue; /* a tick: look at shutting_down() again */
            return -1;
        }
        have += (size_t)n;
    }
}

static const struct preforkd_plugin PLUGIN = {
    .abi_version = PREFORKD_ABI_VERSION,
    .size = sizeof(struct preforkd_plugin),
    .name = "menu",
    .init = menu_init,
    .serve_stream = menu_serve,
    .serve_datagram = NULL,
    .finish = NULL,
    .reserved = {NULL, NULL, NULL, NULL},
};

const struct preforkd_plugin *preforkd_plugin_entry(void) { return &PLUGIN; }
