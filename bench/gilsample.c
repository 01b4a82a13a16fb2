/* A native thread that samples whether the GIL is held, for bench/gil_meter.py.
 *
 * A Python thread cannot watch the GIL (it needs the GIL to run), so this thread reads the
 * interpreter's own "locked" flag every 10-30 us (jittered, so it cannot beat in step with a
 * periodic workload) and counts how often it is set. Built by gil_meter.py with the running
 * interpreter's internal headers; read-only, and only ever loaded by the benchmarks.
 */
#define Py_BUILD_CORE 1
#include <Python.h>
#if PY_VERSION_HEX < 0x030C0000
#include "internal/pycore_runtime.h"
#define GIL_LOCKED() ((volatile int *)&_PyRuntime.ceval.gil.locked)
#else
#include "internal/pycore_interp.h"
#define GIL_LOCKED() ((volatile int *)&PyInterpreterState_Main()->ceval.gil->locked)
#endif
#include <pthread.h>
#include <time.h>

static volatile int running = 0;
static pthread_t sampler;
static long long held = 0, total = 0;
static long interval_ns = 20000;

static void *sample(void *arg) {
    volatile int *locked = (volatile int *)arg;
    unsigned long long seed = 88172645463325252ULL;
    struct timespec ts = {0, 0};
    while (running) {
        held += *locked == 1;
        total++;
        seed = seed * 6364136223846793005ULL + 1442695040888963407ULL;
        ts.tv_nsec = interval_ns / 2 + (long)((seed >> 33) % (unsigned long long)interval_ns);
        nanosleep(&ts, NULL);
    }
    return NULL;
}

/* Called with the GIL held (ctypes.PyDLL). */
int gil_start(long ns) {
    held = total = 0;
    interval_ns = ns;
    running = 1;
    return pthread_create(&sampler, NULL, sample, (void *)GIL_LOCKED());
}

void gil_stop(long long *out) {
    running = 0;
    pthread_join(sampler, NULL);
    out[0] = held;
    out[1] = total;
}

/* A calibration workload: hold the GIL for held_ns, release it for free_ns, reps times. */
static void spin(long ns) {
    struct timespec a, b;
    clock_gettime(CLOCK_MONOTONIC, &a);
    do {
        clock_gettime(CLOCK_MONOTONIC, &b);
    } while ((b.tv_sec - a.tv_sec) * 1000000000L + (b.tv_nsec - a.tv_nsec) < ns);
}

void gil_pattern(long held_ns, long free_ns, long reps) {
    for (long i = 0; i < reps; i++) {
        spin(held_ns);
        Py_BEGIN_ALLOW_THREADS
        spin(free_ns);
        Py_END_ALLOW_THREADS
    }
}
