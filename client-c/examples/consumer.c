/* Demo consumer (C): a member of a consumer group. Reads every batch in
 * place, checks its crc32, records "seq partition offset latency_ns ok" per
 * batch in OUT_FILE, releases it, and commits now and then. Exits once
 * DONE_FILE exists and no batch arrived for half a second.
 *
 *   consumer STREAM GROUP OUT_FILE DONE_FILE */
#define _POSIX_C_SOURCE 200809L
#include <stdio.h>
#include <string.h>
#include <unistd.h>
#include <zlib.h>

#include "demo_meta.h"
#include "ferry.h"

int main(int argc, char **argv) {
    if (argc != 5) {
        fprintf(stderr, "usage: %s STREAM GROUP OUT_FILE DONE_FILE\n", argv[0]);
        return 2;
    }
    ferry_client *client = NULL;
    int st = ferry_client_connect(NULL, &client);
    if (st) {
        fprintf(stderr, "consumer: connect: %s\n", ferry_last_error());
        return 1;
    }
    ferry_consumer *c = NULL;
    ferry_consumer_config cfg = {.prefetch = 4, .spin_us = 50};
    for (int tries = 0; (st = ferry_consumer_open(client, argv[1], argv[2], &cfg, &c)) == FERRY_E_UNKNOWN_STREAM && tries < 200; tries++)
        nanosleep(&(struct timespec){.tv_sec = 0, .tv_nsec = 10000000}, NULL); /* the producer creates the stream */
    if (st) {
        fprintf(stderr, "consumer: open: %s\n", ferry_last_error());
        return 1;
    }
    FILE *out = fopen(argv[3], "w");
    if (!out) return 1;
    unsigned long n = 0;
    for (;;) {
        ferry_batch b;
        st = ferry_consumer_next(c, 500, &b);
        if (st == FERRY_E_TIMEOUT) {
            if (access(argv[4], F_OK) == 0) break;
            continue;
        }
        if (st) {
            fprintf(stderr, "consumer: next: %s\n", ferry_last_error());
            return 1;
        }
        uint64_t now = demo_now_ns();
        demo_meta m;
        memset(&m, 0, sizeof m);
        if (b.meta_len == sizeof m) memcpy(&m, b.meta, sizeof m);
        int ok = b.meta_len == sizeof m && (uint32_t)crc32(0L, b.data, (uInt)b.len) == m.crc32;
        fprintf(out, "%llu %u %llu %llu %d\n", (unsigned long long)m.seq, b.partition, (unsigned long long)b.offset,
                (unsigned long long)(now - m.publish_ns), ok);
        st = ferry_consumer_release(c, &b);
        if (st) {
            fprintf(stderr, "consumer: release: %s\n", ferry_last_error());
            return 1;
        }
        if (++n % 16 == 0) ferry_consumer_commit(c);
    }
    ferry_consumer_commit(c);
    fclose(out);
    ferry_consumer_free(c);
    ferry_client_free(client);
    return 0;
}
