/* Metadata the demo producer attaches to every batch. */
#ifndef FERRY_DEMO_META_H
#define FERRY_DEMO_META_H
#include <stdint.h>
#include <time.h>

typedef struct demo_meta {
    uint64_t seq;        /* producer's sequence number, 0, 1, 2, ... */
    uint64_t publish_ns; /* CLOCK_MONOTONIC at publish */
    uint32_t crc32;      /* zlib crc32 of the payload */
    uint32_t reserved;
} demo_meta;

static inline uint64_t demo_now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}
#endif
