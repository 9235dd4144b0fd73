/*
 * The menu dialogue of docs/MENU.md as a preforkd dylib plugin (C ABI):
 * the socketserver tutorial's texts by default, English with the option
 * language = "en".
 *
 *   cc -shared -fPIC -O2 -Iinclude -o /tmp/libmenu.so examples/dylib/menu.c
 *
 * and config/examples/menu-dylib.toml. Stops at a request boundary: when
 * the worker is asked to stop, it closes at the next point where it would
 * wait for a choice.
 */
#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "preforkd_plugin.h"

/* The most one read takes: a longer choice is answered in pieces. */
#define MAX_READ 1024

struct texts {
    const char *banner, *operator_, *again, *goodbye;
};

/* The socketserver tutorial's own texts (the default). */
static const struct texts ZH = {
    "欢迎致电 10086,请输入1xxx,0转人工服务.\n",
    "通过可能会被录音.balabala一大推\n",
    "请重新输入.\n",
    "",
};

/* docs/MENU.md's English texts: options {"language": "en"}. */
static const struct texts EN = {
    "Welcome to the preforkd menu. Please choose: 0 to talk to an operator, exit to leave.\n",
    "Your call is being transferred to an operator.\n",
    "Invalid choice. Please choose again: 0 to talk to an operator, exit to leave.\n",
    "Goodbye.\n",
};

static const struct preforkd_host *host;
static const struct texts *texts = &ZH;

static int menu_init(const char *options_json, const struct preforkd_host *h, void **state,
                     char *err, size_t errlen)
{
    (void)state;
    host = h;
    /* The options arrive as compact JSON: {} or {"language":"en"}. */
    const char *lang = strstr(options_json, "\"language\":");
    if (lang == NULL)
        return 0;
    lang += strlen("\"language\":");
    if (strncmp(lang, "\"en\"", 4) == 0) {
        texts = &EN;
    } else if (strncmp(lang, "\"zh\"", 4) != 0) {
        snprintf(err, errlen, "language must be \"zh\" (the tutorial's texts) or \"en\"");
        return -1;
    }
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

static int send_str(int fd, const char *s) { return send_all(fd, s, strlen(s)); }

static int is_space(char c) { return c == ' ' || c == '\t'; }

/* Answers one choice; returns 1 if the caller is let go. */
static int answer(int fd, const char *line, size_t len, int *err)
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
        *err = send_str(fd, texts->operator_);
        return 0;
    }
    if (n == 4 && memcmp(choice, "exit", 4) == 0) {
        *err = send_str(fd, texts->goodbye);
        return 1;
    }
    *err = send_str(fd, texts->again);
    return 0;
}

/*
 * A choice is a line, or what one read delivered after its last newline
 * (the tutorial's client sends a choice with no newline and waits).
 */
static int menu_serve(void *state, int fd, const struct preforkd_conn *conn)
{
    (void)state;
    (void)conn;
    char buf[MAX_READ];
    int err = 0;
    if (send_str(fd, texts->banner) != 0)
        return -1;
    for (;;) {
        /* Waiting for a choice with nothing pending: a request boundary. */
        if (host->shutting_down())
            return 0;
        ssize_t got = read(fd, buf, sizeof buf);
        if (got == 0)
            return 0; /* the caller closed: close without a word */
        if (got < 0) {
            if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)
                continue; /* a tick: look at shutting_down() again */
            return -1;
        }
        size_t have = (size_t)got;
        if (buf[have - 1] == '\n')
            have--; /* the last line's newline ends it; nothing follows */
        const char *p = buf;
        for (;;) {
            const char *nl = memchr(p, '\n', have - (size_t)(p - buf));
            size_t len = nl ? (size_t)(nl - p) : have - (size_t)(p - buf);
            int bye = answer(fd, p, len, &err);
            if (err != 0)
                return -1;
            if (bye)
                return 0;
            if (nl == NULL)
                break;
            p = nl + 1;
        }
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
