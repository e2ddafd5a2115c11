/* C ABI tests for libferry, built with -fsanitize=address,undefined.
 * Needs a running ferryd: FERRY_SOCKET names its socket. Exits non-zero on
 * the first failed check; prints "N passed, 0 failed" at the end. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ferry.h"

static int passed = 0;

#define CHECK(cond)                                                                  \
    do {                                                                             \
        if (!(cond)) {                                                               \
            fprintf(stderr, "%s:%d: check failed: %s (last error: %s)\n", __FILE__,  \
                    __LINE__, #cond, ferry_last_error());                            \
            printf("%d passed, 1 failed\n", passed);                                 \
            exit(1);                                                                 \
        }                                                                            \
        passed++;                                                                    \
    } while (0)

#define EXPECT(call, want) CHECK((call) == (want))

static void test_static_strings(void) {
    CHECK(strlen(ferry_version()) > 0);
    CHECK(ferry_abi_version() == FERRY_ABI_VERSION);
    CHECK(strcmp(ferry_status_str(FERRY_OK), "ok") == 0);
    CHECK(strstr(ferry_status_str(FERRY_E_NOT_HELD), "released twice") != NULL);
    CHECK(strcmp(ferry_status_str(12345), "unknown status code") == 0);
}

static void test_not_running(void) {
    ferry_client *sentinel = (ferry_client *)0x1;
    ferry_client *c = sentinel;
    EXPECT(ferry_client_connect("/tmp/ferry-c-test-nowhere/ferryd.sock", &c), FERRY_E_NOT_RUNNING);
    CHECK(c == sentinel); /* output written only on success */
    CHECK(strstr(ferry_last_error(), "/tmp/ferry-c-test-nowhere/ferryd.sock") != NULL);
}

static void test_null_arguments(ferry_client *client) {
    ferry_producer *p = NULL;
    ferry_consumer *c = NULL;
    ferry_batch b;
    ferry_slot s;
    EXPECT(ferry_client_connect(NULL, NULL), FERRY_E_INVALID_ARGUMENT);
    EXPECT(ferry_producer_open(NULL, "s", NULL, &p), FERRY_E_INVALID_ARGUMENT);
    EXPECT(ferry_producer_open(client, NULL, NULL, &p), FERRY_E_INVALID_ARGUMENT);
    EXPECT(ferry_consumer_open(client, "s", NULL, NULL, &c), FERRY_E_INVALID_ARGUMENT);
    EXPECT(ferry_consumer_next(NULL, 0, &b), FERRY_E_INVALID_ARGUMENT);
    EXPECT(ferry_producer_reserve(NULL, 0, &s), FERRY_E_INVALID_ARGUMENT);
    EXPECT(ferry_consumer_release(NULL, &b), FERRY_E_INVALID_ARGUMENT);
    CHECK(p == NULL && c == NULL);
    ferry_producer_free(NULL);
    ferry_consumer_free(NULL);
    ferry_client_free(NULL);
}

static void test_round_trip(ferry_client *client) {
    ferry_stream_config cfg = {.partitions = 2, .slot_count = 8, .slot_size = 4096};
    ferry_producer *p = NULL;
    ferry_consumer *c = NULL;
    ferry_consumer_config ccfg = {.prefetch = 4, .spin_us = 10};
    EXPECT(ferry_producer_open(client, "c-abi", &cfg, &p), FERRY_OK);
    EXPECT(ferry_consumer_open(client, "c-abi", "g", &ccfg, &c), FERRY_OK);

    for (uint64_t i = 0; i < 50; i++) {
        ferry_slot s;
        EXPECT(ferry_producer_reserve(p, 5000, &s), FERRY_OK);
        CHECK(s.capacity == 4096);
        memset(s.data, (int)(i & 0xff), 4096);
        uint64_t key = i % 5;
        EXPECT(ferry_producer_publish(p, &s, 100 + i, &i, sizeof i, &key), FERRY_OK);

        ferry_batch b;
        EXPECT(ferry_consumer_next(c, 5000, &b), FERRY_OK);
        CHECK(strcmp(b.stream, "c-abi") == 0);
        CHECK(b.len == 100 + i);
        CHECK(b.meta_len == sizeof i);
        uint64_t got;
        memcpy(&got, b.meta, sizeof got);
        CHECK(got == i);
        CHECK(b.data[0] == (uint8_t)i && b.data[b.len - 1] == (uint8_t)i);
        CHECK(b.device == -1 && b.device_data == 0);
        CHECK(b.partition < 2);
        EXPECT(ferry_consumer_release(c, &b), FERRY_OK);
        /* Releasing twice is a clear status, not a crash. */
        EXPECT(ferry_consumer_release(c, &b), FERRY_E_NOT_HELD);
    }
    EXPECT(ferry_consumer_commit(c), FERRY_OK);

    /* Nothing pending: a zero timeout returns at once. */
    ferry_batch none;
    EXPECT(ferry_consumer_next(c, 0, &none), FERRY_E_TIMEOUT);

    /* Payload larger than the slot, metadata larger than 256 bytes. */
    ferry_slot s;
    EXPECT(ferry_producer_reserve(p, 5000, &s), FERRY_OK);
    EXPECT(ferry_producer_publish(p, &s, 4097, NULL, 0, NULL), FERRY_E_TOO_LARGE);
    char big[300] = {0};
    EXPECT(ferry_producer_publish(p, &s, 1, big, sizeof big, NULL), FERRY_E_TOO_LARGE);
    EXPECT(ferry_producer_publish(p, &s, 1, NULL, 5, NULL), FERRY_E_INVALID_ARGUMENT);
    /* The slot stays reserved after a refused publish. */
    EXPECT(ferry_producer_publish(p, &s, 1, NULL, 0, NULL), FERRY_OK);
    EXPECT(ferry_producer_publish(p, &s, 1, NULL, 0, NULL), FERRY_E_NOT_HELD);
    ferry_batch b;
    EXPECT(ferry_consumer_next(c, 5000, &b), FERRY_OK);
    EXPECT(ferry_consumer_release(c, &b), FERRY_OK);

    /* Seek back replays the same bytes. */
    EXPECT(ferry_consumer_seek(c, b.partition, b.offset), FERRY_OK);
    ferry_batch again;
    EXPECT(ferry_consumer_next(c, 5000, &again), FERRY_OK);
    CHECK(again.partition == b.partition && again.offset == b.offset && again.len == 1);
    EXPECT(ferry_consumer_release(c, &again), FERRY_OK);
    EXPECT(ferry_consumer_seek(c, 0, 1u << 30), FERRY_E_OFFSET_GONE);
    EXPECT(ferry_consumer_seek(c, 7, 0), FERRY_E_INVALID_ARGUMENT);

    ferry_consumer_free(c);
    ferry_producer_free(p);
}

/* GPU delivery. Without a CUDA driver in this process: NO_DEVICE. With
 * one (a GPU machine, or scripts/test.sh's second run against the fake
 * driver, FERRY_FAKE_CUDA=1, whose device pointers are host addresses), a
 * real round trip; the bytes are compared only under the fake. */
static void test_gpu_delivery(ferry_client *client) {
    ferry_consumer *c = NULL;
    ferry_consumer_config gpu = {.prefetch = 4, .spin_us = 10, .device = "cuda:0"};
    ferry_stream_config cfg = {.partitions = 2, .slot_count = 8, .slot_size = 4096};
    ferry_producer *p = NULL;
    EXPECT(ferry_producer_open(client, "c-abi-gpu", &cfg, &p), FERRY_OK);
    int st = ferry_consumer_open(client, "c-abi-gpu", "gpu", &gpu, &c);
    if (st != FERRY_OK) {
        CHECK(getenv("FERRY_FAKE_CUDA") == NULL);
        EXPECT(st, FERRY_E_NO_DEVICE);
        CHECK(strstr(ferry_last_error(), "cuda:0") != NULL);
        CHECK(c == NULL);
    } else {
        for (uint64_t i = 0; i < 20; i++) {
            ferry_slot s;
            EXPECT(ferry_producer_reserve(p, 5000, &s), FERRY_OK);
            memset(s.data, (int)(0x40 + i), 4096);
            EXPECT(ferry_producer_publish(p, &s, 4000 + i, &i, sizeof i, NULL), FERRY_OK);
            ferry_batch b;
            EXPECT(ferry_consumer_next(c, 5000, &b), FERRY_OK);
            CHECK(b.device == 0 && b.device_data != 0 && b.data == NULL);
            CHECK(b.len == 4000 + i && b.meta_len == sizeof i);
            uint64_t got;
            memcpy(&got, b.meta, sizeof got); /* metadata stays in host memory */
            CHECK(got == i);
            if (getenv("FERRY_FAKE_CUDA")) {
                const uint8_t *d = (const uint8_t *)(uintptr_t)b.device_data;
                CHECK(d[0] == 0x40 + i && d[b.len - 1] == 0x40 + i);
            }
            EXPECT(ferry_consumer_release(c, &b), FERRY_OK);
            EXPECT(ferry_consumer_release(c, &b), FERRY_E_NOT_HELD);
        }
        /* A producer publishing from GPU memory, to the GPU consumer. */
        ferry_producer *gp = NULL;
        EXPECT(ferry_producer_open_device(client, "c-abi-gpu", NULL, "cuda:0", &gp), FERRY_OK);
        for (uint64_t i = 0; i < 5; i++) {
            ferry_slot gs;
            EXPECT(ferry_producer_reserve(gp, 5000, &gs), FERRY_OK);
            CHECK(gs.data == NULL && gs.device_data != 0 && gs.capacity == 4096);
            if (getenv("FERRY_FAKE_CUDA")) memset((void *)(uintptr_t)gs.device_data, (int)(0x70 + i), 4096);
            EXPECT(ferry_producer_publish(gp, &gs, 4096, &i, sizeof i, NULL), FERRY_OK);
            ferry_batch gb;
            EXPECT(ferry_consumer_next(c, 5000, &gb), FERRY_OK);
            CHECK(gb.len == 4096 && gb.device == 0 && gb.device_data != 0);
            uint64_t tag;
            memcpy(&tag, gb.meta, sizeof tag);
            CHECK(tag == i);
            if (getenv("FERRY_FAKE_CUDA")) {
                const uint8_t *d = (const uint8_t *)(uintptr_t)gb.device_data;
                CHECK(d[0] == 0x70 + i && d[4095] == 0x70 + i);
            }
            EXPECT(ferry_consumer_release(c, &gb), FERRY_OK);
        }
        ferry_producer_free(gp);
        ferry_consumer_free(c);
        c = NULL;
    }
    if (st != FERRY_OK) {
        ferry_producer *gp = NULL;
        EXPECT(ferry_producer_open_device(client, "c-abi-gpu", NULL, "cuda:0", &gp), FERRY_E_NO_DEVICE);
        CHECK(gp == NULL);
    }
    {
        ferry_producer *gp = NULL;
        EXPECT(ferry_producer_open_device(client, "c-abi-gpu", NULL, "tpu:0", &gp), FERRY_E_INVALID_ARGUMENT);
        EXPECT(ferry_producer_open_device(client, "c-abi-gpu", NULL, "cpu", &gp), FERRY_OK);
        ferry_producer_free(gp);
    }
    ferry_producer_free(p);
    ferry_consumer_config missing = {.prefetch = 4, .spin_us = 10, .device = "cuda:7"};
    EXPECT(ferry_consumer_open(client, "c-abi", "gpu", &missing, &c), FERRY_E_NO_DEVICE);
    CHECK(strstr(ferry_last_error(), "cuda:7") != NULL);
    ferry_consumer_config bad = {.prefetch = 4, .spin_us = 10, .device = "gpu0"};
    EXPECT(ferry_consumer_open(client, "c-abi", "gpu", &bad, &c), FERRY_E_INVALID_ARGUMENT);
    CHECK(strstr(ferry_last_error(), "cuda:N") != NULL);
    CHECK(c == NULL);
    ferry_consumer_config host = {.prefetch = 4, .spin_us = 10, .device = "cpu"};
    EXPECT(ferry_consumer_open(client, "c-abi", "host", &host, &c), FERRY_OK);
    ferry_consumer_free(c);
}

static void test_unknown_and_mismatched_streams(ferry_client *client) {
    ferry_producer *p = NULL;
    ferry_consumer *c = NULL;
    EXPECT(ferry_consumer_open(client, "no-such-stream", "g", NULL, &c), FERRY_E_UNKNOWN_STREAM);
    CHECK(strstr(ferry_last_error(), "no-such-stream") != NULL);
    EXPECT(ferry_producer_open(client, "no-such-stream", NULL, &p), FERRY_E_UNKNOWN_STREAM);
    ferry_stream_config other = {.partitions = 3, .slot_count = 8, .slot_size = 4096};
    EXPECT(ferry_producer_open(client, "c-abi", &other, &p), FERRY_E_STREAM_MISMATCH);
    EXPECT(ferry_producer_open(client, "bad/name", NULL, &p), FERRY_E_INVALID_ARGUMENT);
    CHECK(p == NULL && c == NULL);
}

int main(void) {
    test_static_strings();
    test_not_running();
    ferry_client *client = NULL;
    EXPECT(ferry_client_connect(getenv("FERRY_SOCKET"), &client), FERRY_OK);
    test_null_arguments(client);
    test_round_trip(client);
    test_unknown_and_mismatched_streams(client);
    test_gpu_delivery(client);
    ferry_client_free(client);
    printf("%d passed, 0 failed\n", passed);
    return 0;
}
