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
    CHECK(ferry_consumer_prefetch(c) == 4 && ferry_consumer_prefetch(NULL) == 0);

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

/* Typed records: written with the writer calls, read back field by field
 * without being told the structure; a malformed table is a clear status. */
static void test_records(ferry_client *client) {
    ferry_stream_config cfg = {.partitions = 1, .slot_count = 4, .slot_size = 8192};
    ferry_producer *p = NULL;
    ferry_consumer *c = NULL;
    EXPECT(ferry_producer_open(client, "c-rec", &cfg, &p), FERRY_OK);
    EXPECT(ferry_consumer_open(client, "c-rec", "g", NULL, &c), FERRY_OK);

    ferry_slot s;
    ferry_record_writer w;
    EXPECT(ferry_producer_reserve(p, 5000, &s), FERRY_OK);
    EXPECT(ferry_record_begin(p, &s, 3, &w), FERRY_OK);
    uint64_t shape[2] = {2, 3};
    uint8_t *img = NULL;
    EXPECT(ferry_record_add_tensor(&w, "image", FERRY_DTYPE_F32, 2, shape, NULL, 0, &img), FERRY_OK);
    CHECK(img != NULL && ((uintptr_t)img % 64) == 0);
    for (int i = 0; i < 6; i++) {
        float v = (float)i;
        memcpy(img + 4 * i, &v, 4);
    }
    EXPECT(ferry_record_add_int(&w, "label", 7), FERRY_OK);
    EXPECT(ferry_record_add_int(&w, "label", 8), FERRY_E_INVALID_ARGUMENT); /* twice */
    EXPECT(ferry_producer_publish_record(p, &w, NULL, 0, NULL), FERRY_E_INVALID_ARGUMENT); /* 2 of 3 */
    EXPECT(ferry_record_add_bytes(&w, "caption", FERRY_FIELD_STR, "a cat", 5), FERRY_OK);
    EXPECT(ferry_record_add_float(&w, "extra", 1.0), FERRY_E_INVALID_ARGUMENT); /* all added */
    EXPECT(ferry_producer_publish_record(p, &w, "m", 1, NULL), FERRY_OK);

    ferry_batch b;
    EXPECT(ferry_consumer_next(c, 5000, &b), FERRY_OK);
    CHECK(b.flags & FERRY_BATCH_RECORD);
    uint32_t n = 0;
    EXPECT(ferry_batch_field_count(c, &b, &n), FERRY_OK);
    CHECK(n == 3);
    ferry_field f;
    EXPECT(ferry_batch_field(c, &b, 0, &f), FERRY_OK);
    CHECK(strcmp(f.name, "image") == 0 && f.kind == FERRY_FIELD_TENSOR && f.dtype == FERRY_DTYPE_F32);
    CHECK(f.ndim == 2 && f.shape[0] == 2 && f.shape[1] == 3 && f.strides[0] == 3 && f.strides[1] == 1);
    CHECK(f.len == 24 && f.data == b.data + f.offset);
    float last;
    memcpy(&last, f.data + 20, 4);
    CHECK(last == 5.0f);
    EXPECT(ferry_batch_field_by_name(c, &b, "label", &f), FERRY_OK);
    CHECK(f.kind == FERRY_FIELD_INT && f.int_value == 7);
    EXPECT(ferry_batch_field_by_name(c, &b, "caption", &f), FERRY_OK);
    CHECK(f.kind == FERRY_FIELD_STR && f.len == 5 && memcmp(f.data, "a cat", 5) == 0);
    EXPECT(ferry_batch_field_by_name(c, &b, "nope", &f), FERRY_E_INVALID_ARGUMENT);
    EXPECT(ferry_batch_field(c, &b, 3, &f), FERRY_E_INVALID_ARGUMENT);
    EXPECT(ferry_consumer_release(c, &b), FERRY_OK);
    EXPECT(ferry_batch_field_count(c, &b, &n), FERRY_E_NOT_HELD);

    /* A field that does not fit, then a table corrupted before publishing. */
    EXPECT(ferry_producer_reserve(p, 5000, &s), FERRY_OK);
    EXPECT(ferry_record_begin(p, &s, 1, &w), FERRY_OK);
    uint64_t huge[1] = {1u << 20};
    EXPECT(ferry_record_add_tensor(&w, "t", FERRY_DTYPE_U8, 1, huge, NULL, 0, &img), FERRY_E_TOO_LARGE);
    uint64_t small[1] = {16};
    EXPECT(ferry_record_add_tensor(&w, "t", FERRY_DTYPE_U8, 1, small, NULL, 0, &img), FERRY_OK);
    s.data[16 + 88] = 0xff; /* shape[0]: now far larger than the field */
    EXPECT(ferry_producer_publish_record(p, &w, NULL, 0, NULL), FERRY_OK);
    EXPECT(ferry_consumer_next(c, 5000, &b), FERRY_OK);
    CHECK(b.flags & FERRY_BATCH_RECORD);
    EXPECT(ferry_batch_field_count(c, &b, &n), FERRY_E_PROTOCOL);
    CHECK(strstr(ferry_last_error(), "malformed") != NULL);
    EXPECT(ferry_consumer_release(c, &b), FERRY_OK);

    /* A plain batch is not a record. */
    EXPECT(ferry_producer_reserve(p, 5000, &s), FERRY_OK);
    EXPECT(ferry_producer_publish(p, &s, 3, NULL, 0, NULL), FERRY_OK);
    EXPECT(ferry_consumer_next(c, 5000, &b), FERRY_OK);
    CHECK(!(b.flags & FERRY_BATCH_RECORD));
    EXPECT(ferry_batch_field_count(c, &b, &n), FERRY_E_INVALID_ARGUMENT);
    EXPECT(ferry_consumer_release(c, &b), FERRY_OK);
    ferry_consumer_free(c);
    ferry_producer_free(p);
}

/* End of epoch, copy-on-write writes, start positions. */
static void test_epochs_writes_and_starts(ferry_client *client) {
    ferry_stream_config cfg = {.partitions = 2, .slot_count = 2, .slot_size = 4096};
    ferry_producer *p = NULL;
    ferry_consumer *c = NULL;
    ferry_consumer_config cow = {.prefetch = 2, .spin_us = 10, .flags = FERRY_CONSUMER_COPY_ON_WRITE};
    EXPECT(ferry_producer_open(client, "c-epoch", &cfg, &p), FERRY_OK);
    EXPECT(ferry_consumer_open(client, "c-epoch", "g", &cow, &c), FERRY_OK);
    for (int i = 0; i < 6; i++) {
        ferry_slot s;
        EXPECT(ferry_producer_reserve(p, 5000, &s), FERRY_OK);
        memset(s.data, i + 1, 4096);
        EXPECT(ferry_producer_publish(p, &s, 4096, NULL, 0, NULL), FERRY_OK);
        ferry_batch b;
        EXPECT(ferry_consumer_next(c, 5000, &b), FERRY_OK);
        /* Every byte is the new batch's, though the last batch in this
         * slot was written over below. */
        for (int k = 0; k < 4096; k += 512) CHECK(b.data[k] == i + 1);
        memset((uint8_t *)b.data, 0, 4096); /* private: nobody else sees it */
        EXPECT(ferry_consumer_release(c, &b), FERRY_OK);
    }
    EXPECT(ferry_producer_end(p), FERRY_OK);
    ferry_batch b;
    EXPECT(ferry_consumer_next(c, 5000, &b), FERRY_E_END_OF_EPOCH);
    EXPECT(ferry_consumer_next(c, 0, &b), FERRY_E_TIMEOUT); /* the next epoch: empty so far */

    /* Start positions (for a group the join creates). */
    ferry_consumer *late = NULL;
    uint64_t offsets[1] = {0};
    ferry_consumer_config wrong = {.start = FERRY_START_OFFSETS, .start_offsets = offsets, .start_offsets_len = 1};
    EXPECT(ferry_consumer_open(client, "c-epoch", "late", &wrong, &late), FERRY_E_INVALID_ARGUMENT);
    ferry_consumer_config bad = {.start = 9};
    EXPECT(ferry_consumer_open(client, "c-epoch", "late", &bad, &late), FERRY_E_INVALID_ARGUMENT);
    ferry_consumer_config earliest = {.start = FERRY_START_EARLIEST};
    EXPECT(ferry_consumer_open(client, "c-epoch", "late", &earliest, &late), FERRY_OK);
    EXPECT(ferry_consumer_next(late, 5000, &b), FERRY_OK); /* a batch still in the pool */
    CHECK(b.data[0] != 0); /* the producer's bytes, not the other consumer's writes */
    EXPECT(ferry_consumer_release(late, &b), FERRY_OK);
    ferry_consumer_free(late);
    ferry_consumer_free(c);
    ferry_producer_free(p);
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
    test_records(client);
    test_epochs_writes_and_starts(client);
    test_gpu_delivery(client);
    ferry_client_free(client);
    printf("%d passed, 0 failed\n", passed);
    return 0;
}
