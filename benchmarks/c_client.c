/* A minimal client in C: the round trip with no Python on the client's side.
 *
 *   c_client primed SOCKET    speaks primed's protocol (protocol/PROTOCOL.md)
 *   c_client floor SOCKET     speaks the floor's (benchmarks/floor.py)
 *
 * It connects (and, for primed, says HELLO), then reads a count N from each line
 * of stdin and does N round trips: ALLOCATE 64x64 XR24 count 1, receive the reply
 * and its fd (SCM_RIGHTS), close the fd, RELEASE, receive the reply. For each line
 * it writes one line: its own CPU time for the N round trips (ns), then each
 * round trip's wall time (ns). EOF on stdin ends it. Any unexpected reply is an
 * error: a message on stderr and exit status 1.
 *
 * Built by the benchmark at run time: gcc -O2 -o c_client c_client.c
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#define WIDTH 64
#define HEIGHT 64
#define XR24 0x34325258u /* fourcc_code('X', 'R', '2', '4') */

enum { HELLO = 0x0001, ALLOCATE = 0x0002, RELEASE = 0x0003 };
enum { ERROR = 0x8000, WELCOME = 0x8001, ALLOCATED = 0x8002, RELEASED = 0x8003 };
enum { F_ALLOCATE = 1, F_RELEASE = 2 }; /* the floor's opcodes */

static int sock = -1;
static uint32_t serial;

static void fail(const char *what) {
    fprintf(stderr, "c_client: %s: %s\n", what, errno ? strerror(errno) : "unexpected reply");
    exit(1);
}

static void put16(unsigned char *p, uint16_t v) { memcpy(p, &v, 2); } /* x86: little-endian */
static void put32(unsigned char *p, uint32_t v) { memcpy(p, &v, 4); }
static void put64(unsigned char *p, uint64_t v) { memcpy(p, &v, 8); }
static uint16_t get16(const unsigned char *p) { uint16_t v; memcpy(&v, p, 2); return v; }
static uint32_t get32(const unsigned char *p) { uint32_t v; memcpy(&v, p, 4); return v; }
static uint64_t get64(const unsigned char *p) { uint64_t v; memcpy(&v, p, 8); return v; }

static uint64_t now_ns(clockid_t clock) {
    struct timespec t;
    clock_gettime(clock, &t);
    return (uint64_t)t.tv_sec * 1000000000u + (uint64_t)t.tv_nsec;
}

static void send_all(const unsigned char *data, size_t size) {
    if (send(sock, data, size, 0) != (ssize_t)size) fail("send");
}

/* primed's header: opcode, nfds, body size, serial. */
static size_t header(unsigned char *p, uint16_t opcode, uint32_t size) {
    put16(p, opcode);
    put16(p + 2, 0);
    put32(p + 4, size);
    put32(p + 8, ++serial);
    return 12;
}

/* Receive one datagram and at most one fd (-1 if none came). */
static ssize_t receive(unsigned char *data, size_t size, int *fd) {
    union {
        struct cmsghdr align;
        char space[CMSG_SPACE(sizeof(int))];
    } control;
    struct iovec iov = {data, size};
    struct msghdr msg = {0};
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.space;
    msg.msg_controllen = sizeof control.space;
    ssize_t got = recvmsg(sock, &msg, MSG_CMSG_CLOEXEC);
    if (got <= 0) fail("recvmsg");
    *fd = -1;
    struct cmsghdr *c = CMSG_FIRSTHDR(&msg);
    if (c && c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_RIGHTS &&
        c->cmsg_len == CMSG_LEN(sizeof(int)))
        memcpy(fd, CMSG_DATA(c), sizeof(int));
    if (msg.msg_flags & (MSG_TRUNC | MSG_CTRUNC)) {
        errno = 0;
        fail("truncated reply");
    }
    return got;
}

static void primed_hello(void) {
    static const char name[] = "c-bench";
    unsigned char m[12 + 12 + sizeof name - 1] = {0};
    header(m, HELLO, 12 + sizeof name - 1);
    put16(m + 12, 1);
    put16(m + 14, 1);
    put16(m + 20, sizeof name - 1);
    memcpy(m + 24, name, sizeof name - 1);
    send_all(m, sizeof m);
    unsigned char r[1024];
    int fd;
    ssize_t got = receive(r, sizeof r, &fd);
    errno = 0;
    if (fd >= 0) close(fd);
    if (got < 12 || get16(r) != WELCOME) fail("HELLO");
}

static void primed_round_trip(void) {
    unsigned char m[12 + 28] = {0};
    header(m, ALLOCATE, 20);
    put32(m + 12, WIDTH);
    put32(m + 16, HEIGHT);
    put32(m + 20, XR24);
    put32(m + 24, 1);
    send_all(m, 12 + 20);

    unsigned char r[12 + 16 + 72];
    int fd;
    ssize_t got = receive(r, sizeof r, &fd);
    errno = 0;
    if (fd < 0 || got != (ssize_t)sizeof r || get16(r) != ALLOCATED || get16(r + 2) != 1 ||
        get32(r + 20) != 1 || get32(r + 12 + 16 + 8) != WIDTH)
        fail("ALLOCATE");
    uint64_t id = get64(r + 12 + 16);
    close(fd);

    header(m, RELEASE, 16);
    put32(m + 12, 1);
    put32(m + 16, 0);
    put64(m + 20, id);
    send_all(m, 12 + 16);
    got = receive(r, sizeof r, &fd);
    errno = 0;
    if (fd >= 0) close(fd);
    if (got != 12 + 8 || get16(r) != RELEASED || get32(r + 12) != 1) fail("RELEASE");
}

/* The floor's messages: request <IIIQ (op, width, height, id), reply <IIQQ. */
static void floor_round_trip(void) {
    unsigned char m[20] = {0}, r[24];
    int fd;
    put32(m, F_ALLOCATE);
    put32(m + 4, WIDTH);
    put32(m + 8, HEIGHT);
    send_all(m, sizeof m);
    ssize_t got = receive(r, sizeof r, &fd);
    errno = 0;
    if (fd < 0 || got != (ssize_t)sizeof r || get32(r) != 0) fail("floor allocate");
    uint64_t id = get64(r + 8);
    close(fd);
    memset(m, 0, sizeof m);
    put32(m, F_RELEASE);
    put64(m + 12, id);
    send_all(m, sizeof m);
    got = receive(r, sizeof r, &fd);
    errno = 0;
    if (fd >= 0) close(fd);
    if (got != (ssize_t)sizeof r || get32(r) != 0) fail("floor release");
}

int main(int argc, char **argv) {
    if (argc != 3 || (strcmp(argv[1], "primed") && strcmp(argv[1], "floor"))) {
        fprintf(stderr, "usage: c_client primed|floor SOCKET\n");
        return 2;
    }
    int primed = strcmp(argv[1], "primed") == 0;
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    if (strlen(argv[2]) >= sizeof addr.sun_path) {
        fprintf(stderr, "c_client: socket path too long\n");
        return 2;
    }
    strcpy(addr.sun_path, argv[2]);
    sock = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
    if (sock < 0) fail("socket");
    if (connect(sock, (struct sockaddr *)&addr, sizeof addr) < 0) fail("connect");
    if (primed) primed_hello();
    void (*round_trip)(void) = primed ? primed_round_trip : floor_round_trip;

    char line[64];
    while (fgets(line, sizeof line, stdin)) {
        long count = strtol(line, NULL, 10);
        if (count <= 0) {
            fprintf(stderr, "c_client: bad count %s", line);
            return 2;
        }
        uint64_t *samples = malloc(sizeof *samples * (size_t)count);
        if (!samples) fail("malloc");
        uint64_t cpu = now_ns(CLOCK_PROCESS_CPUTIME_ID);
        for (long i = 0; i < count; i++) {
            uint64_t start = now_ns(CLOCK_MONOTONIC);
            round_trip();
            samples[i] = now_ns(CLOCK_MONOTONIC) - start;
        }
        cpu = now_ns(CLOCK_PROCESS_CPUTIME_ID) - cpu;
        printf("%llu", (unsigned long long)cpu);
        for (long i = 0; i < count; i++) printf(" %llu", (unsigned long long)samples[i]);
        printf("\n");
        fflush(stdout);
        free(samples);
    }
    close(sock);
    return 0;
}
