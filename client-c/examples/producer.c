/* Demo producer: publishes image-like batches (e.g. 64 x 3x224x224 uint8)
 * into a stream for a fixed time, as fast as the consumers take them.
 *
 *   producer STREAM BATCH_BYTES SECONDS PARTITIONS SLOTS
 *
 * Uses FERRY_SOCKET (or the default socket). Prints one summary line. */
#define _POSIX_C_SOURCE 200809L
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <zlib.h>

#include "demo_meta.h"
#include "ferry.h"

static int die(const char *what, int status) {
    fprintf(stderr, "producer: %s: %s (%s)\n", what, ferry_status_str(status), ferry_last_error());
    return 1;
}

int main(int argc, char **argv) {
    if (argc != 6) {
        fprintf(stderr, "usage: %s STREAM BATCH_BYTES SECONDS PARTITIONS SLOTS\n", argv[0]);
        return 2;
    }
    const char *stream = argv[1];
    uint64_t batch = strtoull(argv[2], NULL, 10);
    double seconds = atof(argv[3]);
    ferry_stream_config cfg = {
        .partitions = (uint32_t)atoi(argv[4]),
        .slot_count = (uint32_t)atoi(argv[5]),
        .slot_size = batch,
    };
    ferry_client *client = NULL;
    int st = ferry_client_connect(NULL, &client);
    if (st) return die("connect", st);
    ferry_producer *p = NULL;
    st = ferry_producer_open(client, stream, &cfg, &p);
    if (st) return die("open producer", st);

    uint64_t seq = 0, bytes = 0;
    uint64_t end = demo_now_ns() + (uint64_t)(seconds * 1e9);
    while (demo_now_ns() < end) {
        ferry_slot s;
        st = ferry_producer_reserve(p, 1000, &s);
        if (st == FERRY_E_TIMEOUT) continue; /* consumers are behind: wait */
        if (st) return die("reserve", st);
        /* Image-like content that differs per batch: a per-batch fill with
         * the sequence number stamped on every 4 KiB page. */
        memset(s.data, (int)(seq * 37 & 0xff), batch);
        for (uint64_t off = 0; off + sizeof seq <= batch; off += 4096) memcpy(s.data + off, &seq, sizeof seq);
        demo_meta m = {.seq = seq, .crc32 = (uint32_t)crc32(0L, s.data, (uInt)batch)};
        m.publish_ns = demo_now_ns();
        st = ferry_producer_publish(p, &s, batch, &m, sizeof m, NULL);
        if (st) return die("publish", st);
        seq++;
        bytes += batch;
    }
    ferry_producer_free(p);
    ferry_client_free(client);
    printf("produced %llu batches %llu bytes\n", (unsigned long long)seq, (unsigned long long)bytes);
    return 0;
}
