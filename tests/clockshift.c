/* A process whose wall clock is off by CLOCKSHIFT_S seconds (may be negative or fractional), as on a
 * machine whose clock is set wrong: LD_PRELOAD=clockshift.so CLOCKSHIFT_S=600 python ...
 *
 * Only the wall clock moves (clock_gettime of CLOCK_REALTIME and CLOCK_REALTIME_COARSE; gettimeofday;
 * time): the monotonic clock, and everything that sleeps or waits on it (clock_nanosleep, sem_clockwait,
 * poll), is left alone. libfaketime's DONT_FAKE_MONOTONIC also moves clock_nanosleep, which hangs
 * Python's time.sleep. The tests compile this with gcc into their tmp_path (tests/test_node_clocks.py).
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdlib.h>
#include <sys/time.h>
#include <time.h>

static long long shift_ns(void) {
    static int read;
    static long long ns;
    if (!read) {
        const char *text = getenv("CLOCKSHIFT_S");
        ns = text ? (long long)(strtod(text, NULL) * 1e9) : 0;
        read = 1;
    }
    return ns;
}

static void shifted(struct timespec *ts) {
    long long t = (long long)ts->tv_sec * 1000000000LL + ts->tv_nsec + shift_ns();
    ts->tv_sec = t / 1000000000LL;
    ts->tv_nsec = t % 1000000000LL;
    if (ts->tv_nsec < 0) {
        ts->tv_sec -= 1;
        ts->tv_nsec += 1000000000LL;
    }
}

int clock_gettime(clockid_t id, struct timespec *ts) {
    static int (*real)(clockid_t, struct timespec *);
    if (!real)
        real = (int (*)(clockid_t, struct timespec *))dlsym(RTLD_NEXT, "clock_gettime");
    int rc = real(id, ts);
    if (rc == 0 && (id == CLOCK_REALTIME || id == CLOCK_REALTIME_COARSE))
        shifted(ts);
    return rc;
}

int gettimeofday(struct timeval *restrict tv, void *restrict tz) {
    struct timespec ts;
    int rc = clock_gettime(CLOCK_REALTIME, &ts);
    if (rc == 0) {
        tv->tv_sec = ts.tv_sec;
        tv->tv_usec = ts.tv_nsec / 1000;
    }
    if (tz) { /* obsolete; glibc fills it with zeros */
        ((struct timezone *)tz)->tz_minuteswest = 0;
        ((struct timezone *)tz)->tz_dsttime = 0;
    }
    return rc;
}

time_t time(time_t *out) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    if (out)
        *out = ts.tv_sec;
    return ts.tv_sec;
}
