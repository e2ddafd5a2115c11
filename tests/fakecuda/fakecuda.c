/*
 * A fake CUDA driver (libcuda.so) for testing Ferry's GPU code paths on
 * machines without a GPU. It is a test double, not an emulator: "device
 * memory" is host memory (a memfd mapping per allocation, so that CUDA IPC
 * handles can be opened by another process of the same user through
 * /proc/PID/fd), and a device pointer is that mapping's address.
 *
 * What it does check, so that tests can fail:
 *  - every device address passed to a copy lies inside a live allocation or
 *    IPC mapping of this process (otherwise CUDA_ERROR_INVALID_VALUE);
 *  - asynchronous copies really are asynchronous: a worker thread per
 *    stream runs them in order, each after FAKECUDA_COPY_DELAY_US
 *    microseconds (default 300), so code that reads a destination before
 *    its event completed sees stale bytes;
 *  - an IPC handle cannot be opened by the process that made it (as with
 *    the real driver);
 *  - like the real driver, it places small allocations (under 2 MiB)
 *    inside a larger one: 4 KiB into their own mapping, so that an IPC
 *    handle maps more than the buffer and importers must apply the offset
 *    cuMemGetAddressRange gives.
 * It implements only the entry points Ferry calls. FAKECUDA_DEVICES sets
 * the number of devices (default 1; 0 = a driver with no GPU).
 *
 * Build: gcc -shared -fPIC -O1 -pthread -o libcuda.so fakecuda.c
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

typedef int CUresult;
typedef int CUdevice;
typedef unsigned long long CUdeviceptr;
typedef struct fake_ctx *CUcontext;
typedef struct fake_stream *CUstream;
typedef struct fake_event *CUevent;
typedef struct { char reserved[64]; } CUipcMemHandle;

enum {
    SUCCESS = 0,
    INVALID_VALUE = 1,
    OUT_OF_MEMORY = 2,
    NOT_INITIALIZED = 3,
    INVALID_DEVICE = 101,
    INVALID_CONTEXT = 201,
    INVALID_HANDLE = 400,
    NOT_READY = 600,
    HOST_MEMORY_ALREADY_REGISTERED = 712,
    HOST_MEMORY_NOT_REGISTERED = 713,
    NOT_SUPPORTED = 801,
};

static int initialised;
static int ndevices(void) {
    const char *e = getenv("FAKECUDA_DEVICES");
    return e ? atoi(e) : 1;
}

/* ---- address book: allocations and IPC mappings ---- */
#define MAX_AREAS 4096
struct area {
    uintptr_t base;
    size_t len;
    uintptr_t user; /* what cuMemAlloc returned (or base) */
    int fd;  /* memfd of an allocation; -1 for an IPC mapping */
    int ipc; /* opened through an IPC handle */
};
static struct area areas[MAX_AREAS];
static pthread_mutex_t areas_lock = PTHREAD_MUTEX_INITIALIZER;

static int add_area(uintptr_t base, size_t len, uintptr_t user, int fd, int ipc) {
    pthread_mutex_lock(&areas_lock);
    for (int i = 0; i < MAX_AREAS; i++) {
        if (areas[i].base == 0) {
            areas[i] = (struct area){base, len, user, fd, ipc};
            pthread_mutex_unlock(&areas_lock);
            return 0;
        }
    }
    pthread_mutex_unlock(&areas_lock);
    return -1;
}

/* The area whose user pointer is `user` (exact), removed from the book. */
static int take_area(uintptr_t user, int ipc, struct area *out) {
    int found = -1;
    pthread_mutex_lock(&areas_lock);
    for (int i = 0; i < MAX_AREAS; i++) {
        if (areas[i].user == user && user != 0 && areas[i].ipc == ipc) {
            *out = areas[i];
            areas[i] = (struct area){0};
            found = 0;
            break;
        }
    }
    pthread_mutex_unlock(&areas_lock);
    return found;
}

/* Is [p, p+n) inside one known area? Returns that area's index or -1. */
static int find_range(CUdeviceptr p, size_t n) {
    int found = -1;
    pthread_mutex_lock(&areas_lock);
    for (int i = 0; i < MAX_AREAS; i++) {
        struct area *a = &areas[i];
        if (a->base && p >= a->base && p - a->base <= a->len && n <= a->len - (p - a->base)) {
            found = i;
            break;
        }
    }
    pthread_mutex_unlock(&areas_lock);
    return found;
}

/* ---- driver, devices, contexts ---- */
CUresult cuInit(unsigned flags) {
    (void)flags;
    initialised = 1;
    return SUCCESS;
}

CUresult cuDriverGetVersion(int *v) {
    *v = 12080;
    return SUCCESS;
}

CUresult cuDeviceGetCount(int *n) {
    if (!initialised) return NOT_INITIALIZED;
    *n = ndevices();
    return SUCCESS;
}

CUresult cuDeviceGet(CUdevice *d, int ordinal) {
    if (!initialised) return NOT_INITIALIZED;
    if (ordinal < 0 || ordinal >= ndevices()) return INVALID_DEVICE;
    *d = ordinal;
    return SUCCESS;
}

CUresult cuDeviceGetName(char *name, int len, CUdevice d) {
    if (d < 0 || d >= ndevices()) return INVALID_DEVICE;
    snprintf(name, (size_t)len, "Ferry fake GPU %d (host memory)", d);
    return SUCCESS;
}

CUresult cuDeviceGetPCIBusId(char *bus, int len, CUdevice d) {
    if (d < 0 || d >= ndevices()) return INVALID_DEVICE;
    snprintf(bus, (size_t)len, "0000:%02X:00.0", 0x40 + d);
    return SUCCESS;
}

CUresult cuDeviceTotalMem_v2(size_t *bytes, CUdevice d) {
    if (d < 0 || d >= ndevices()) return INVALID_DEVICE;
    *bytes = (size_t)16 << 30;
    return SUCCESS;
}

CUresult cuDeviceGetAttribute(int *v, int attr, CUdevice d) {
    (void)attr;
    if (d < 0 || d >= ndevices()) return INVALID_DEVICE;
    *v = 0; /* no dma-buf, no GPUDirect RDMA */
    return SUCCESS;
}

struct fake_ctx { int dev; };
static struct fake_ctx ctxs[64];

CUresult cuDevicePrimaryCtxRetain(CUcontext *c, CUdevice d) {
    if (d < 0 || d >= ndevices() || d >= 64) return INVALID_DEVICE;
    ctxs[d].dev = d;
    *c = &ctxs[d];
    return SUCCESS;
}

CUresult cuDevicePrimaryCtxRelease_v2(CUdevice d) {
    return (d < 0 || d >= ndevices()) ? INVALID_DEVICE : SUCCESS;
}

static __thread CUcontext current;
CUresult cuCtxSetCurrent(CUcontext c) {
    current = c;
    return SUCCESS;
}

CUresult cuGetErrorString(CUresult e, const char **s) {
    static char buf[64];
    snprintf(buf, sizeof buf, "fake CUDA error %d", e);
    *s = buf;
    return SUCCESS;
}

CUresult cuGetErrorName(CUresult e, const char **s) {
    return cuGetErrorString(e, s);
}

/* ---- memory ---- */
CUresult cuMemAlloc_v2(CUdeviceptr *p, size_t len) {
    if (!current) return INVALID_CONTEXT;
    if (len == 0) return INVALID_VALUE;
    size_t pad = len < ((size_t)2 << 20) ? 4096 : 0;
    size_t total = len + pad;
    int fd = memfd_create("fakecuda", MFD_CLOEXEC);
    if (fd < 0 || ftruncate(fd, (off_t)total) != 0) {
        if (fd >= 0) close(fd);
        return OUT_OF_MEMORY;
    }
    void *m = mmap(NULL, total, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (m == MAP_FAILED) {
        close(fd);
        return OUT_OF_MEMORY;
    }
    /* Fresh device memory is not zero on a real GPU either. */
    memset(m, 0xA5, total);
    uintptr_t user = (uintptr_t)m + pad;
    if (add_area((uintptr_t)m, total, user, fd, 0) != 0) {
        munmap(m, total);
        close(fd);
        return OUT_OF_MEMORY;
    }
    *p = (CUdeviceptr)user;
    return SUCCESS;
}

CUresult cuMemFree_v2(CUdeviceptr p) {
    struct area a;
    if (take_area((uintptr_t)p, 0, &a) != 0) return INVALID_VALUE;
    munmap((void *)a.base, a.len);
    close(a.fd);
    return SUCCESS;
}

CUresult cuPointerSetAttribute(const void *value, int attr, CUdeviceptr p) {
    (void)value;
    (void)attr;
    return find_range(p, 1) >= 0 ? SUCCESS : INVALID_VALUE;
}

CUresult cuMemHostAlloc(void **p, size_t len, unsigned flags) {
    (void)flags;
    if (len == 0) return INVALID_VALUE;
    *p = calloc(1, len);
    return *p ? SUCCESS : OUT_OF_MEMORY;
}

CUresult cuMemFreeHost(void *p) {
    free(p);
    return SUCCESS;
}

/* Registered host ranges, by start address: registering one twice is an
 * error, as with the real driver, and so is unregistering one that is not. */
#define MAX_REGISTERED 256
static uintptr_t registered[MAX_REGISTERED];
static pthread_mutex_t registered_lock = PTHREAD_MUTEX_INITIALIZER;

CUresult cuMemHostRegister_v2(void *p, size_t len, unsigned flags) {
    (void)flags;
    if (!p || !len) return INVALID_VALUE;
    CUresult r = OUT_OF_MEMORY;
    pthread_mutex_lock(&registered_lock);
    for (int i = 0; i < MAX_REGISTERED; i++) {
        if (registered[i] == (uintptr_t)p) {
            r = HOST_MEMORY_ALREADY_REGISTERED;
            break;
        }
    }
    for (int i = 0; r == OUT_OF_MEMORY && i < MAX_REGISTERED; i++) {
        if (registered[i] == 0) {
            registered[i] = (uintptr_t)p;
            r = SUCCESS;
        }
    }
    pthread_mutex_unlock(&registered_lock);
    return r;
}

CUresult cuMemHostUnregister(void *p) {
    CUresult r = HOST_MEMORY_NOT_REGISTERED;
    pthread_mutex_lock(&registered_lock);
    for (int i = 0; i < MAX_REGISTERED; i++) {
        if (p && registered[i] == (uintptr_t)p) {
            registered[i] = 0;
            r = SUCCESS;
            break;
        }
    }
    pthread_mutex_unlock(&registered_lock);
    return r;
}

CUresult cuMemcpyHtoD_v2(CUdeviceptr d, const void *h, size_t n) {
    if (find_range(d, n) < 0) return INVALID_VALUE;
    memcpy((void *)(uintptr_t)d, h, n);
    return SUCCESS;
}

CUresult cuMemcpyDtoH_v2(void *h, CUdeviceptr d, size_t n) {
    if (find_range(d, n) < 0) return INVALID_VALUE;
    memcpy(h, (const void *)(uintptr_t)d, n);
    return SUCCESS;
}

CUresult cuMemGetHandleForAddressRange(void *h, CUdeviceptr p, size_t n, int type, unsigned long long flags) {
    (void)h;
    (void)p;
    (void)n;
    (void)type;
    (void)flags;
    return NOT_SUPPORTED;
}

CUresult cuMemGetAddressRange_v2(CUdeviceptr *base, size_t *size, CUdeviceptr p) {
    int i = find_range(p, 0);
    if (i < 0) return INVALID_VALUE;
    *base = areas[i].base;
    *size = areas[i].len;
    return SUCCESS;
}

/* ---- IPC ---- */
struct ipc_bytes {
    char magic[8];
    int32_t pid;
    int32_t fd;
    uint64_t len;
};

CUresult cuIpcGetMemHandle(CUipcMemHandle *h, CUdeviceptr p) {
    int i = find_range(p, 0);
    if (i < 0 || areas[i].user != p || areas[i].ipc) return INVALID_VALUE;
    struct ipc_bytes b = {"FAKECUD", (int32_t)getpid(), areas[i].fd, areas[i].len};
    memset(h, 0, sizeof *h);
    memcpy(h->reserved, &b, sizeof b);
    return SUCCESS;
}

CUresult cuIpcOpenMemHandle_v2(CUdeviceptr *p, CUipcMemHandle h, unsigned flags) {
    (void)flags;
    struct ipc_bytes b;
    memcpy(&b, h.reserved, sizeof b);
    if (memcmp(b.magic, "FAKECUD", 8) != 0) return INVALID_VALUE;
    if (b.pid == getpid()) return INVALID_CONTEXT; /* as the real driver */
    char path[64];
    snprintf(path, sizeof path, "/proc/%d/fd/%d", b.pid, b.fd);
    int fd = open(path, O_RDWR | O_CLOEXEC);
    if (fd < 0) return INVALID_HANDLE;
    void *m = mmap(NULL, b.len, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    close(fd);
    if (m == MAP_FAILED) return INVALID_HANDLE;
    if (add_area((uintptr_t)m, b.len, (uintptr_t)m, -1, 1) != 0) {
        munmap(m, b.len);
        return OUT_OF_MEMORY;
    }
    *p = (CUdeviceptr)(uintptr_t)m;
    return SUCCESS;
}

CUresult cuIpcCloseMemHandle(CUdeviceptr p) {
    struct area a;
    if (take_area((uintptr_t)p, 1, &a) != 0) return INVALID_VALUE;
    munmap((void *)a.base, a.len);
    return SUCCESS;
}

/* ---- streams and events: a worker thread per stream ---- */
struct op {
    void *dst;
    const void *src;
    size_t n;
    struct op *next;
};

struct fake_stream {
    pthread_mutex_t lock;
    pthread_cond_t cond;
    pthread_t worker;
    struct op *head, *tail;
    uint64_t queued, done;
    int stop;
};

struct fake_event {
    CUstream s;
    uint64_t target;
};

static void *stream_worker(void *arg) {
    CUstream s = arg;
    const char *e = getenv("FAKECUDA_COPY_DELAY_US");
    long delay_us = e ? atol(e) : 300;
    pthread_mutex_lock(&s->lock);
    for (;;) {
        while (!s->head && !s->stop) pthread_cond_wait(&s->cond, &s->lock);
        if (!s->head) break;
        struct op *o = s->head;
        pthread_mutex_unlock(&s->lock);
        if (delay_us > 0) {
            struct timespec ts = {delay_us / 1000000, (delay_us % 1000000) * 1000};
            nanosleep(&ts, NULL);
        }
        memcpy(o->dst, o->src, o->n);
        pthread_mutex_lock(&s->lock);
        s->head = o->next;
        if (!s->head) s->tail = NULL;
        s->done++;
        free(o);
        pthread_cond_broadcast(&s->cond);
    }
    pthread_mutex_unlock(&s->lock);
    return NULL;
}

CUresult cuStreamCreate(CUstream *out, unsigned flags) {
    (void)flags;
    if (!current) return INVALID_CONTEXT;
    CUstream s = calloc(1, sizeof *s);
    if (!s) return OUT_OF_MEMORY;
    pthread_mutex_init(&s->lock, NULL);
    pthread_cond_init(&s->cond, NULL);
    if (pthread_create(&s->worker, NULL, stream_worker, s) != 0) {
        free(s);
        return OUT_OF_MEMORY;
    }
    *out = s;
    return SUCCESS;
}

static CUresult enqueue(CUstream s, void *dst, const void *src, size_t n) {
    if (!s) return INVALID_HANDLE; /* Ferry never uses the legacy stream */
    struct op *o = malloc(sizeof *o);
    if (!o) return OUT_OF_MEMORY;
    *o = (struct op){dst, src, n, NULL};
    pthread_mutex_lock(&s->lock);
    if (s->tail) s->tail->next = o;
    else s->head = o;
    s->tail = o;
    s->queued++;
    pthread_cond_broadcast(&s->cond);
    pthread_mutex_unlock(&s->lock);
    return SUCCESS;
}

CUresult cuMemcpyHtoDAsync_v2(CUdeviceptr d, const void *h, size_t n, CUstream s) {
    if (find_range(d, n) < 0) return INVALID_VALUE;
    return enqueue(s, (void *)(uintptr_t)d, h, n);
}

CUresult cuMemcpyDtoHAsync_v2(void *h, CUdeviceptr d, size_t n, CUstream s) {
    if (find_range(d, n) < 0) return INVALID_VALUE;
    return enqueue(s, h, (const void *)(uintptr_t)d, n);
}

CUresult cuMemcpyDtoDAsync_v2(CUdeviceptr d, CUdeviceptr src, size_t n, CUstream s) {
    if (find_range(d, n) < 0 || find_range(src, n) < 0) return INVALID_VALUE;
    return enqueue(s, (void *)(uintptr_t)d, (const void *)(uintptr_t)src, n);
}

CUresult cuMemcpyPeerAsync(CUdeviceptr d, CUcontext dc, CUdeviceptr src, CUcontext sc, size_t n, CUstream s) {
    if (!dc || !sc) return INVALID_CONTEXT;
    return cuMemcpyDtoDAsync_v2(d, src, n, s);
}

CUresult cuStreamSynchronize(CUstream s) {
    if (!s) return INVALID_HANDLE;
    pthread_mutex_lock(&s->lock);
    while (s->done < s->queued) pthread_cond_wait(&s->cond, &s->lock);
    pthread_mutex_unlock(&s->lock);
    return SUCCESS;
}

CUresult cuStreamDestroy_v2(CUstream s) {
    if (!s) return INVALID_HANDLE;
    cuStreamSynchronize(s);
    pthread_mutex_lock(&s->lock);
    s->stop = 1;
    pthread_cond_broadcast(&s->cond);
    pthread_mutex_unlock(&s->lock);
    pthread_join(s->worker, NULL);
    /* Not freed: events recorded on it may be queried or destroyed later
     * (the real driver allows that); a test double can afford the leak. */
    return SUCCESS;
}

CUresult cuEventCreate(CUevent *e, unsigned flags) {
    (void)flags;
    *e = calloc(1, sizeof **e);
    return *e ? SUCCESS : OUT_OF_MEMORY;
}

CUresult cuEventRecord(CUevent e, CUstream s) {
    if (!e || !s) return INVALID_HANDLE;
    pthread_mutex_lock(&s->lock);
    e->s = s;
    e->target = s->queued;
    pthread_mutex_unlock(&s->lock);
    return SUCCESS;
}

CUresult cuEventQuery(CUevent e) {
    if (!e) return INVALID_HANDLE;
    if (!e->s) return SUCCESS;
    pthread_mutex_lock(&e->s->lock);
    int done = e->s->done >= e->target;
    pthread_mutex_unlock(&e->s->lock);
    return done ? SUCCESS : NOT_READY;
}

CUresult cuEventSynchronize(CUevent e) {
    if (!e) return INVALID_HANDLE;
    if (!e->s) return SUCCESS;
    pthread_mutex_lock(&e->s->lock);
    while (e->s->done < e->target) pthread_cond_wait(&e->s->cond, &e->s->lock);
    pthread_mutex_unlock(&e->s->lock);
    return SUCCESS;
}

CUresult cuEventDestroy_v2(CUevent e) {
    free(e);
    return SUCCESS;
}
