/* _ring.c - the lock-free shared-memory transport and the write hook of safe_redirect.
 *
 * No policy lives here: this file moves bytes and reports what it could not move; what to do about
 * a full lane or a fork is decided by the Python code that calls it.
 *
 * Byte layout of a segment (native-endian; offsets in bytes):
 *
 *   segment header, SEG_HEADER bytes
 *      0  u64 magic          SEG_MAGIC
 *      8  u32 version        SEG_VERSION
 *     12  u32 nlanes
 *     16  u64 lane_bytes     data capacity of one lane, a power of two
 *     24  u64 master_pid     the installing process
 *     32  u64 master_start   its start time, microseconds since the epoch
 *     40  u32 closed         1 once the master uninstalled: producers detach at their next write
 *     44  u32 lane_misses    children that found no free lane (they write to their terminal only)
 *     48  u64 reads          reads that took records from any lane: a producer waiting for room
 *                            keeps waiting while this moves (the master is reading, if not it)
 *     64  u32 sleeping       1 while the drain thread sleeps on `bell`
 *     68  u32 bell           futex word, bumped to wake the drain thread
 *   then nlanes lanes, each LANE_HEADER + lane_bytes:
 *     lane header, three cache lines so that producer and consumer never share one
 *      +0   u64 owner_pid    0 = free; a producer claims the lane by compare-and-swap 0 -> pid
 *      +8   u32 state        LANE_FREE / LANE_ACTIVE / LANE_CLOSED
 *      +16  i64 rank         -1 = unknown
 *      +24  u64 owner_start  the owner's start time in microseconds (tells a reused pid apart)
 *      +32  char name[32]    the owner's process name, NUL-terminated
 *      +64  u64 tail         producer: bytes ever published, stored with release order
 *      +72  u64 records, +80 bytes, +88 spilled_records, +96 spilled_bytes, +104 stalls
 *      +128 u64 head         consumer: bytes ever consumed, stored with release order
 *      +136 u32 space_waiting 1 while the producer sleeps for room; +140 u32 space_bell, its futex
 *      +144 i32 pipe_fds[2]  fd mode: the owner's pipe read ends for stdout and stderr, -1 if none
 *      +152 u32 pipes_acked  fd mode: 1 once the consumer opened read ends of its own
 *      +156 u32 identity     bumped each time the owner sets rank and name anew (the consumer
 *                            renders the tag again): a lane claimed at fork, before a launcher
 *                            named the process, gets the name the process has at its first write
 *      +160 u32 pipe_thread  fd mode: the thread number that bytes from the owner's pipes carry
 *                            (what the consumer recovers from them continues those lines)
 *     data, lane_bytes: a byte ring of records, each
 *      u32 len | u8 stream | u8 flags | u16 thread | i32 rank | u32 zero | u64 time_ns |
 *      len payload bytes | pad to 8
 *     `thread` is a small number for the writing thread (1..65535, per process), so that the
 *     reader rebuilds lines per thread: two threads' writes never splice into one line. `rank` is
 *     the writing thread's rank where a launcher runs ranks as threads (torch_xla), else -1.
 *     A record may wrap around the end of the ring. A write larger than half the ring is cut into
 *     records flagged FLAG_CONT except the last; the reader joins bytes per stream anyway.
 *     FLAG_FLUSH marks a flush (no payload); FLAG_GAP a record before which the writer spilled
 *     the rest of an unfinished line: the reader ends that line there instead of joining.
 *
 * Single producer per lane: a lane belongs to one process, and a record is written by one C call
 * that holds the GIL from the space check to the publish of tail, so threads of one process need
 * no lock. In fd mode a lane has two writers in its process: the write hooks (Python-level
 * writes, with the GIL) and the pump thread (what reached the pipes on fds 1 and 2, without the
 * GIL); a lock of the Producer object, in process memory, serialises them (see "fd mode's two
 * paths" below). It is never shared with another process, and a forked child makes producers of
 * its own, so a fork cannot leave it held where it is used.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <pythread.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <errno.h>
#include <sched.h>
#include <unistd.h>
#include <poll.h>
#include <sys/ioctl.h>
#include <time.h>
#include <pthread.h>
#include <signal.h>
#ifdef __linux__
#include <linux/futex.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

#define SEG_MAGIC 0x3152445245464153ULL /* "SAFERDR1" */
#define SEG_VERSION 1u
#define SEG_HEADER 128u
#define LANE_HEADER 192u
#define REC_HEADER 24u
/* what a segment may hold: install() checks its arguments against these */
#define MAX_LANES 65536u
#define MIN_LANE_BYTES 4096ull
#define MAX_LANE_BYTES (1ull << 32)

#define LANE_FREE 0u
#define LANE_ACTIVE 1u
#define LANE_CLOSED 2u

#define FLAG_CONT 1u
#define FLAG_FLUSH 2u
#define FLAG_GAP 4u /* the line this stream had open was spilled in part: it ends before this */

#define KIND_TEXT 0
#define KIND_BYTES 1
#define KIND_FLUSH 2
#define KIND_BUFFER_FLUSH 3 /* a buffer's flush: a no-op for us inside a text-layer call */
#define KIND_RAW 4 /* fd mode: the FileIO write at the bottom of a stream, aimed at the terminal */

typedef struct {
    uint64_t magic;
    uint32_t version;
    uint32_t nlanes;
    uint64_t lane_bytes;
    uint64_t master_pid;
    uint64_t master_start;
    _Atomic uint32_t closed;
    _Atomic uint32_t lane_misses;
    _Atomic uint64_t reads;
    char pad0[64 - 56];
    _Atomic uint32_t sleeping;
    _Atomic uint32_t bell;
    char pad1[64 - 8];
} seg_header;

typedef struct {
    _Atomic uint64_t owner_pid;
    _Atomic uint32_t state;
    uint32_t pad_s;
    int64_t rank;
    uint64_t owner_start;
    char name[32]; /* the owner's process name, NUL-terminated (multiprocessing's, say) */
    _Atomic uint64_t tail;
    _Atomic uint64_t records;
    _Atomic uint64_t bytes;
    _Atomic uint64_t spilled_records;
    _Atomic uint64_t spilled_bytes;
    _Atomic uint64_t stalls;
    char pad1[64 - 48];
    _Atomic uint64_t head;
    _Atomic uint32_t space_waiting; /* 1 while the producer sleeps on space_bell */
    _Atomic uint32_t space_bell;    /* futex word, bumped when the consumer frees space */
    _Atomic int32_t pipe_fds[2];    /* fd mode: the owner's pipe read ends, -1 if none */
    _Atomic uint32_t pipes_acked;   /* fd mode: 1 once the consumer holds its own read ends */
    _Atomic uint32_t identity;      /* bumped when the owner sets rank and name anew */
    _Atomic uint32_t pipe_thread;   /* fd mode: the thread number of bytes from the pipes */
    char pad2[64 - 36];
} lane_header;

_Static_assert(sizeof(seg_header) == SEG_HEADER, "segment header layout");
_Static_assert(sizeof(lane_header) == LANE_HEADER, "lane header layout");

/* Bumped in every child right after fork(), before any Python code runs there, also for forks
 * made by C libraries that skip Python's own fork handlers. The write hook compares it with the
 * generation its producer was made in: one load instead of a getpid() system call. */
static _Atomic uint64_t fork_generation = 0;

/* How deep this thread is inside a hooked text-layer call. TextIOWrapper hands its encoded bytes to
 * `buffer.write` through a normal attribute lookup, so a hooked buffer would see them a second time. */
static _Thread_local int text_depth = 0;

/* How many writes this thread made to a terminal through a KIND_RAW hook: a hook compares it
 * around the call it stands in for, to know that the pipes were just taken (fd mode). */
static _Thread_local unsigned long raw_writes = 0;

/* This thread's number in the records it writes; 0 until its first write. */
static _Thread_local uint16_t thread_slot = 0;
static _Atomic uint32_t next_thread_slot = 0;

/* This thread's rank, for launchers whose ranks are threads of one process; -1: the process's. */
static _Thread_local int32_t thread_rank = -1;

static uint16_t current_thread_slot(void) {
    if (!thread_slot) thread_slot = (uint16_t)(atomic_fetch_add(&next_thread_slot, 1) % 65535u + 1);
    return thread_slot;
}

/* fd pumps of this process inside an append without the GIL (see ring_pump): Producer.close()
 * and Segment.release() wait until there is none. Per process, not per segment, so that the
 * fork handler can zero it: a child has no pump thread, whatever the count said at the fork. */
static _Atomic int pumps_appending = 0;

static void after_fork_in_child(void) {
    atomic_fetch_add(&fork_generation, 1);
    atomic_store(&pumps_appending, 0);
}

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static inline uint64_t align8(uint64_t n) { return (n + 7u) & ~(uint64_t)7u; }

/* ---------------------------------------------------------------- raw ring operations */

static inline lane_header *lane_at(char *base, uint64_t lane_bytes, uint32_t i) {
    return (lane_header *)(base + SEG_HEADER + (uint64_t)i * (LANE_HEADER + lane_bytes));
}

static inline char *lane_data(lane_header *lane) { return (char *)lane + LANE_HEADER; }

static void ring_copy_in(char *data, uint64_t cap, uint64_t pos, const char *src, uint64_t n) {
    uint64_t at = pos & (cap - 1), first = cap - at;
    if (n <= first) {
        memcpy(data + at, src, n);
    } else {
        memcpy(data + at, src, first);
        memcpy(data, src + first, n - first);
    }
}

static void ring_copy_out(const char *data, uint64_t cap, uint64_t pos, char *dst, uint64_t n) {
    uint64_t at = pos & (cap - 1), first = cap - at;
    if (n <= first) {
        memcpy(dst, data + at, n);
    } else {
        memcpy(dst, data + at, first);
        memcpy(dst + first, data, n - first);
    }
}

static void futex_wake_all(_Atomic uint32_t *word) {
#ifdef __linux__
    syscall(SYS_futex, (uint32_t *)word, FUTEX_WAKE, INT32_MAX, NULL, NULL, 0);
#else
    (void)word;
#endif
}

/* Sleep while *word == seq, at most `timeout` seconds; the caller holds no GIL. Without futexes
 * (not Linux) it just sleeps: polling, bounded by the timeout. */
static void futex_wait(_Atomic uint32_t *word, uint32_t seq, double timeout) {
    if (timeout <= 0) return;
    struct timespec ts;
    ts.tv_sec = (time_t)timeout;
    ts.tv_nsec = (long)((timeout - (double)ts.tv_sec) * 1e9);
#ifdef __linux__
    syscall(SYS_futex, (uint32_t *)word, FUTEX_WAIT, seq, &ts, NULL, 0);
#else
    (void)word;
    (void)seq;
    nanosleep(&ts, NULL);
#endif
}

/* The same with the GIL released. */
static void futex_wait_released(_Atomic uint32_t *word, uint32_t seq, double timeout) {
    Py_BEGIN_ALLOW_THREADS
    futex_wait(word, seq, timeout);
    Py_END_ALLOW_THREADS
}

/* Test hook (tests/reliability/kill.py): stop this process with SIGSTOP inside its next record
 * write, at stage 1 (the header is copied), 2 (half the payload is copied) or 3 (all is copied
 * and counted, tail not yet published), so that a test can SIGKILL a writer at an exact point of
 * a write. 0, the only value outside such a test, costs one predictable branch per write. */
static int stop_inside_next_record = 0;

static void stop_here_if(int stage) {
    if (stop_inside_next_record != stage) return;
    stop_inside_next_record = 0;
    raise(SIGSTOP);
}

static void ring_bell(seg_header *seg) {
    atomic_fetch_add(&seg->bell, 1);
    futex_wake_all(&seg->bell);
}

/* Append `len` bytes as one or more records, written by thread `slot` of rank `rank`. Returns the
 * payload bytes published: `len` when all fit, less when the lane filled up (the caller decides
 * how to wait), -1 when the segment is closed. */
static int64_t ring_append(seg_header *seg, lane_header *lane, unsigned stream, unsigned flags,
                           unsigned first_flags, const char *src, uint64_t len, uint16_t slot,
                           int32_t rank) {
    if (atomic_load_explicit(&seg->closed, memory_order_relaxed)) return -1;
    uint64_t cap = seg->lane_bytes;
    uint64_t max_chunk = cap / 2 - REC_HEADER;
    char *data = lane_data(lane);
    uint64_t tail = atomic_load_explicit(&lane->tail, memory_order_relaxed);
    uint64_t head = atomic_load_explicit(&lane->head, memory_order_acquire);
    uint64_t done = 0, nrec = 0, t = now_ns();
    do {
        uint64_t chunk = len - done < max_chunk ? len - done : max_chunk;
        uint64_t need = align8(REC_HEADER + chunk);
        if (cap - (tail - head) < need) break;
        unsigned char hdr[REC_HEADER];
        uint32_t n32 = (uint32_t)chunk;
        memcpy(hdr, &n32, 4);
        hdr[4] = (unsigned char)stream;
        hdr[5] = (unsigned char)(flags | (nrec ? 0u : first_flags) |
                                 (done + chunk < len ? FLAG_CONT : 0u));
        memcpy(hdr + 6, &slot, 2);
        memcpy(hdr + 8, &rank, 4);
        memset(hdr + 12, 0, 4);
        memcpy(hdr + 16, &t, 8);
        ring_copy_in(data, cap, tail, (const char *)hdr, REC_HEADER);
        if (stop_inside_next_record) { /* test hook */
            stop_here_if(1);
            ring_copy_in(data, cap, tail + REC_HEADER, src + done, chunk / 2);
            stop_here_if(2);
            ring_copy_in(data, cap, tail + REC_HEADER + chunk / 2, src + done + chunk / 2,
                         chunk - chunk / 2);
        } else {
            ring_copy_in(data, cap, tail + REC_HEADER, src + done, chunk);
        }
        tail += need;
        done += chunk;
        nrec++;
    } while (done < len);
    if (nrec == 0) return 0;
    /* Statistics. A lane has one producer, which appends holding the GIL: a plain load and
     * store, not a locked read-modify-write (measured: a hooked child print 1.24x -> 1.18x). */
    if (len) /* not markers */
        atomic_store_explicit(&lane->records,
                              atomic_load_explicit(&lane->records, memory_order_relaxed) + nrec,
                              memory_order_relaxed);
    atomic_store_explicit(&lane->bytes,
                          atomic_load_explicit(&lane->bytes, memory_order_relaxed) + done,
                          memory_order_relaxed);
    if (stop_inside_next_record) stop_here_if(3); /* test hook */
    /* Dekker with the consumer's wait: publish tail, then look whether it sleeps. A sequentially
     * consistent exchange is the publishing store and the full barrier in one instruction (xchg
     * on x86), cheaper than a release store followed by a fence. */
    atomic_exchange_explicit(&lane->tail, tail, memory_order_seq_cst);
    if (atomic_load_explicit(&seg->sleeping, memory_order_seq_cst) &&
        atomic_exchange(&seg->sleeping, 0u)) {
        ring_bell(seg);
    }
    return (int64_t)done;
}

/* ---------------------------------------------------------------- Segment */

typedef struct {
    PyObject_HEAD
    Py_buffer view; /* keeps the mapping alive and pinned while we point into it */
    int has_view;
    char *base;
    seg_header *hdr;
    _Atomic int releasing; /* release() began: pumps append nothing more */
} SegmentObject;

static PyTypeObject Segment_Type;
static PyTypeObject Producer_Type;
static PyTypeObject Hook_Type;

static int segment_ready(SegmentObject *self) {
    if (!self->has_view) {
        PyErr_SetString(PyExc_ValueError, "segment is released");
        return 0;
    }
    return 1;
}

static lane_header *segment_lane(SegmentObject *self, long i) {
    if (!segment_ready(self)) return NULL;
    if (i < 0 || (uint64_t)i >= self->hdr->nlanes) {
        PyErr_Format(PyExc_IndexError, "lane %ld out of range", i);
        return NULL;
    }
    return lane_at(self->base, self->hdr->lane_bytes, (uint32_t)i);
}

static Py_ssize_t segment_size(uint64_t nlanes, uint64_t lane_bytes) {
    return (Py_ssize_t)(SEG_HEADER + nlanes * (LANE_HEADER + lane_bytes));
}

static PyObject *ring_format(PyObject *mod, PyObject *args) {
    PyObject *buf;
    unsigned long nlanes;
    unsigned long long lane_bytes, master_pid, master_start;
    if (!PyArg_ParseTuple(args, "OkKKK", &buf, &nlanes, &lane_bytes, &master_pid, &master_start))
        return NULL;
    if (nlanes == 0 || nlanes > MAX_LANES) {
        PyErr_SetString(PyExc_ValueError, "nlanes must be 1..65536");
        return NULL;
    }
    if (lane_bytes < MIN_LANE_BYTES || (lane_bytes & (lane_bytes - 1)) ||
        lane_bytes > MAX_LANE_BYTES) {
        PyErr_SetString(PyExc_ValueError, "lane_bytes must be a power of two in 4 KiB..4 GiB");
        return NULL;
    }
    Py_buffer view;
    if (PyObject_GetBuffer(buf, &view, PyBUF_WRITABLE) < 0) return NULL;
    if (view.len < segment_size(nlanes, lane_bytes)) {
        PyBuffer_Release(&view);
        PyErr_SetString(PyExc_ValueError, "buffer too small for the segment");
        return NULL;
    }
    char *base = view.buf;
    memset(base, 0, SEG_HEADER);
    seg_header *hdr = (seg_header *)base;
    hdr->version = SEG_VERSION;
    hdr->nlanes = (uint32_t)nlanes;
    hdr->lane_bytes = lane_bytes;
    hdr->master_pid = master_pid;
    hdr->master_start = master_start;
    for (uint32_t i = 0; i < nlanes; i++) {
        lane_header *lane = lane_at(base, lane_bytes, i);
        memset(lane, 0, LANE_HEADER);
        lane->rank = -1;
        lane->pipe_fds[0] = lane->pipe_fds[1] = -1;
    }
    atomic_thread_fence(memory_order_release);
    hdr->magic = SEG_MAGIC;
    PyBuffer_Release(&view);
    Py_RETURN_NONE;
}

static PyObject *ring_segment_size(PyObject *mod, PyObject *args) {
    unsigned long nlanes;
    unsigned long long lane_bytes;
    if (!PyArg_ParseTuple(args, "kK", &nlanes, &lane_bytes)) return NULL;
    return PyLong_FromSsize_t(segment_size(nlanes, lane_bytes));
}

static int Segment_init(SegmentObject *self, PyObject *args, PyObject *kwds) {
    PyObject *buf;
    if (!PyArg_ParseTuple(args, "O", &buf)) return -1;
    if (self->has_view) {
        PyErr_SetString(PyExc_RuntimeError, "segment already initialised");
        return -1;
    }
    if (PyObject_GetBuffer(buf, &self->view, PyBUF_WRITABLE) < 0) return -1;
    self->has_view = 1;
    atomic_store(&self->releasing, 0);
    self->base = self->view.buf;
    self->hdr = (seg_header *)self->base;
    if ((size_t)self->view.len < SEG_HEADER || self->hdr->magic != SEG_MAGIC ||
        self->hdr->version != SEG_VERSION ||
        self->view.len < segment_size(self->hdr->nlanes, self->hdr->lane_bytes)) {
        PyBuffer_Release(&self->view);
        self->has_view = 0;
        PyErr_SetString(PyExc_ValueError, "not a safe_redirect segment of this version");
        return -1;
    }
    return 0;
}

static void Segment_dealloc(SegmentObject *self) {
    if (self->has_view) PyBuffer_Release(&self->view);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* Wait until no fd pump of this process is inside an append (see ring_pump): a bounded copy,
 * microseconds. Callers first make sure that no new append starts. */
static void wait_for_pumps(void) {
    while (atomic_load(&pumps_appending)) {
        Py_BEGIN_ALLOW_THREADS
        sched_yield();
        Py_END_ALLOW_THREADS
    }
}

static PyObject *Segment_release(SegmentObject *self, PyObject *unused) {
    atomic_store(&self->releasing, 1);
    wait_for_pumps();
    if (self->has_view) {
        PyBuffer_Release(&self->view);
        self->has_view = 0;
    }
    Py_RETURN_NONE;
}

static PyObject *Segment_claim(SegmentObject *self, PyObject *args) {
    unsigned long long pid, start;
    long long rank;
    const char *name = "";
    Py_ssize_t name_len = 0;
    int out_fd = -1, err_fd = -1, count_miss = 1;
    if (!PyArg_ParseTuple(args, "KKL|y#iip", &pid, &start, &rank, &name, &name_len, &out_fd,
                          &err_fd, &count_miss))
        return NULL;
    if (!segment_ready(self)) return NULL;
    if (pid == 0) {
        PyErr_SetString(PyExc_ValueError, "pid must not be 0");
        return NULL;
    }
    for (uint32_t i = 0; i < self->hdr->nlanes; i++) {
        lane_header *lane = lane_at(self->base, self->hdr->lane_bytes, i);
        uint64_t expected = 0;
        if (atomic_load_explicit(&lane->owner_pid, memory_order_relaxed) != 0) continue;
        if (atomic_compare_exchange_strong(&lane->owner_pid, &expected, pid)) {
            lane->rank = rank;
            lane->owner_start = start;
            memset(lane->name, 0, sizeof lane->name);
            memcpy(lane->name, name, (size_t)(name_len < 31 ? name_len : 31));
            atomic_store(&lane->pipe_fds[0], out_fd);
            atomic_store(&lane->pipe_fds[1], err_fd);
            atomic_store(&lane->pipes_acked, 0u);
            atomic_store(&lane->pipe_thread, 0u);
            atomic_store_explicit(&lane->state, LANE_ACTIVE, memory_order_release);
            if (out_fd >= 0 || err_fd >= 0) ring_bell(self->hdr); /* come and take the pipes */
            return PyLong_FromUnsignedLong(i);
        }
    }
    /* a process that retries counts once, at its last try: lane_misses counts processes */
    if (count_miss) atomic_fetch_add(&self->hdr->lane_misses, 1);
    return PyLong_FromLong(-1);
}

static PyObject *Segment_busy_lanes(SegmentObject *self, PyObject *unused) {
    if (!segment_ready(self)) return NULL;
    PyObject *out = PyList_New(0);
    if (!out) return NULL;
    for (uint32_t i = 0; i < self->hdr->nlanes; i++) {
        lane_header *lane = lane_at(self->base, self->hdr->lane_bytes, i);
        if (atomic_load_explicit(&lane->owner_pid, memory_order_acquire) == 0) continue;
        PyObject *n = PyLong_FromUnsignedLong(i);
        if (!n || PyList_Append(out, n) < 0) {
            Py_XDECREF(n);
            Py_DECREF(out);
            return NULL;
        }
        Py_DECREF(n);
    }
    return out;
}

/* How many lanes hold unread bytes right now. */
static PyObject *Segment_lanes_with_data(SegmentObject *self, PyObject *unused) {
    if (!segment_ready(self)) return NULL;
    long count = 0;
    for (uint32_t i = 0; i < self->hdr->nlanes; i++) {
        lane_header *lane = lane_at(self->base, self->hdr->lane_bytes, i);
        if (atomic_load_explicit(&lane->tail, memory_order_acquire) !=
            atomic_load_explicit(&lane->head, memory_order_relaxed))
            count++;
    }
    return PyLong_FromLong(count);
}

static PyObject *Segment_lane_info(SegmentObject *self, PyObject *arg) {
    long i = PyLong_AsLong(arg);
    if (i == -1 && PyErr_Occurred()) return NULL;
    lane_header *lane = segment_lane(self, i);
    if (!lane) return NULL;
    uint64_t pid = atomic_load_explicit(&lane->owner_pid, memory_order_acquire);
    uint32_t state = atomic_load_explicit(&lane->state, memory_order_acquire);
    char name[sizeof lane->name];
    memcpy(name, lane->name, sizeof name);
    name[sizeof name - 1] = 0;
    return Py_BuildValue(
        "(KIKLKKKKKKKy(ii))", (unsigned long long)pid, (unsigned)state,
        (unsigned long long)lane->owner_start, (long long)lane->rank,
        (unsigned long long)atomic_load(&lane->head), (unsigned long long)atomic_load(&lane->tail),
        (unsigned long long)atomic_load(&lane->records), (unsigned long long)atomic_load(&lane->bytes),
        (unsigned long long)atomic_load(&lane->spilled_records),
        (unsigned long long)atomic_load(&lane->spilled_bytes),
        (unsigned long long)atomic_load(&lane->stalls), name, (int)atomic_load(&lane->pipe_fds[0]),
        (int)atomic_load(&lane->pipe_fds[1]));
}

/* How often the owner of a lane set its rank and name anew (Producer.set_identity). */
static PyObject *Segment_identity(SegmentObject *self, PyObject *arg) {
    long i = PyLong_AsLong(arg);
    if (i == -1 && PyErr_Occurred()) return NULL;
    lane_header *lane = segment_lane(self, i);
    if (!lane) return NULL;
    return PyLong_FromUnsignedLong(atomic_load_explicit(&lane->identity, memory_order_acquire));
}

/* fd mode: the thread number that bytes from the pipes of a lane's owner carry (0: none). */
static PyObject *Segment_pipe_thread(SegmentObject *self, PyObject *arg) {
    long i = PyLong_AsLong(arg);
    if (i == -1 && PyErr_Occurred()) return NULL;
    lane_header *lane = segment_lane(self, i);
    if (!lane) return NULL;
    return PyLong_FromUnsignedLong(atomic_load(&lane->pipe_thread));
}

/* Reads the record header at `pos`; 0 if it is not a sane record below `tail`. */
static int read_record_header(const char *data, uint64_t cap, uint64_t pos, uint64_t tail,
                              uint32_t *len, unsigned *stream, unsigned *flags, unsigned *thread,
                              int32_t *rank, uint64_t *t_ns, uint64_t *size) {
    unsigned char hdr[REC_HEADER];
    uint16_t slot;
    ring_copy_out(data, cap, pos, (char *)hdr, REC_HEADER);
    memcpy(len, hdr, 4);
    *stream = hdr[4];
    *flags = hdr[5];
    memcpy(&slot, hdr + 6, 2);
    *thread = slot;
    memcpy(rank, hdr + 8, 4);
    memcpy(t_ns, hdr + 16, 8);
    *size = align8(REC_HEADER + (uint64_t)*len);
    /* Cannot fail with a well-behaved producer: tail is published after the whole record. */
    return (uint64_t)*len <= cap / 2 && *size <= tail - pos;
}

/* Shrink the joined payload of a run to its size and append
 * (stream, flags, time, payload, thread, rank); flags: FLAG_GAP if the run's first record had it. */
static int close_run(PyObject *out, PyObject **payload, Py_ssize_t filled, unsigned stream,
                     unsigned flags, uint64_t t_ns, unsigned thread, int32_t rank) {
    if (_PyBytes_Resize(payload, filled) < 0) return -1; /* frees *payload on failure */
    PyObject *rec = Py_BuildValue("(iiKNii)", (int)stream, (int)flags, (unsigned long long)t_ns,
                                  *payload, (int)thread, (int)rank);
    *payload = NULL;
    if (!rec) return -1;
    int r = PyList_Append(out, rec);
    Py_DECREF(rec);
    return r;
}

/* Consumer side: after head moved, wake a producer that sleeps for room. */
static void wake_space_waiter(lane_header *lane) {
    atomic_thread_fence(memory_order_seq_cst);
    if (atomic_load_explicit(&lane->space_waiting, memory_order_relaxed) &&
        atomic_exchange(&lane->space_waiting, 0u)) {
        atomic_fetch_add(&lane->space_bell, 1);
        futex_wake_all(&lane->space_bell);
    }
}

/* Consumer side: take the published records of a lane (about `max_bytes` of them at most) as
 * [(stream, flags, time_ns, payload, thread, rank)]. Consecutive data records of one stream,
 * thread and rank come back joined,
 * with the time of the first: the reader rebuilds lines from bytes, not from records, and one
 * Python object per batch instead of per write is what keeps the drain ahead of its writers.
 * With `join_gap_ns` > 0 a write stamped more than that after the one before it starts a run of
 * its own: a writer's pause (waiting for other processes) keeps the time of what follows. */
static PyObject *Segment_read(SegmentObject *self, PyObject *args) {
    long i;
    Py_ssize_t max_bytes;
    unsigned long long join_gap_ns = 0;
    if (!PyArg_ParseTuple(args, "ln|K", &i, &max_bytes, &join_gap_ns)) return NULL;
    lane_header *lane = segment_lane(self, i);
    if (!lane) return NULL;
    uint64_t cap = self->hdr->lane_bytes;
    const char *data = lane_data(lane);
    uint64_t head = atomic_load_explicit(&lane->head, memory_order_relaxed);
    uint64_t published = atomic_load_explicit(&lane->tail, memory_order_acquire);
    uint64_t start = head, stop = published;
    if ((uint64_t)max_bytes < stop - head) stop = head + (uint64_t)max_bytes; /* soft bound */
    PyObject *out = PyList_New(0);
    if (!out) return NULL;
    PyObject *payload = NULL; /* the run being joined; its size is an upper bound until done */
    Py_ssize_t filled = 0;
    unsigned run_stream = 0, run_thread = 0, run_flags = 0;
    int32_t run_rank = -1;
    uint64_t run_time = 0, last_time = 0;
    while (head < stop) {
        uint32_t len;
        unsigned stream, flags, thread;
        int32_t rank;
        uint64_t t_ns, size;
        if (!read_record_header(data, cap, head, published, &len, &stream, &flags, &thread, &rank,
                                &t_ns, &size))
            goto corrupt;
        if (payload && (stream != run_stream || thread != run_thread || rank != run_rank ||
                        (flags & (FLAG_FLUSH | FLAG_GAP)) ||
                        (join_gap_ns && t_ns > last_time + join_gap_ns))) {
            if (close_run(out, &payload, filled, run_stream, run_flags, run_time, run_thread,
                          run_rank) < 0)
                goto fail;
        }
        if (flags & FLAG_FLUSH) {
            PyObject *rec = Py_BuildValue("(iiKy#ii)", (int)stream, (int)FLAG_FLUSH,
                                          (unsigned long long)t_ns, "", (Py_ssize_t)0,
                                          (int)thread, (int)rank);
            if (!rec || PyList_Append(out, rec) < 0) {
                Py_XDECREF(rec);
                goto fail;
            }
            Py_DECREF(rec);
        } else {
            if (!payload) {
                /* the payloads of this run fit in the ring bytes that are left to read */
                payload = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)(published - head));
                if (!payload) goto fail;
                filled = 0;
                run_stream = stream;
                run_thread = thread;
                run_rank = rank;
                run_flags = flags & FLAG_GAP;
                run_time = t_ns;
            }
            ring_copy_out(data, cap, head + REC_HEADER, PyBytes_AS_STRING(payload) + filled, len);
            filled += len;
            last_time = t_ns;
        }
        head += size;
    }
    if (payload && close_run(out, &payload, filled, run_stream, run_flags, run_time, run_thread,
                             run_rank) < 0)
        goto fail;
    if (head != start) {
        atomic_store_explicit(&lane->head, head, memory_order_release);
        atomic_fetch_add_explicit(&self->hdr->reads, 1, memory_order_relaxed);
        wake_space_waiter(lane);
    }
    return out;
corrupt:
    Py_XDECREF(payload);
    atomic_store_explicit(&lane->head, published, memory_order_release);
    Py_DECREF(out);
    PyErr_Format(PyExc_RuntimeError, "corrupt record in lane %ld at %llu", i,
                 (unsigned long long)head);
    return NULL;
fail:
    Py_XDECREF(payload);
    Py_DECREF(out);
    return NULL; /* head not moved: nothing is lost */
}

/* Consumer side: return a lane whose producer is gone (closed or dead) to the free pool. */
static PyObject *Segment_free(SegmentObject *self, PyObject *arg) {
    long i = PyLong_AsLong(arg);
    if (i == -1 && PyErr_Occurred()) return NULL;
    lane_header *lane = segment_lane(self, i);
    if (!lane) return NULL;
    atomic_store(&lane->head, 0);
    atomic_store(&lane->tail, 0);
    atomic_store(&lane->records, 0);
    atomic_store(&lane->bytes, 0);
    atomic_store(&lane->spilled_records, 0);
    atomic_store(&lane->spilled_bytes, 0);
    atomic_store(&lane->stalls, 0);
    lane->rank = -1;
    lane->owner_start = 0;
    memset(lane->name, 0, sizeof lane->name);
    atomic_store(&lane->pipe_fds[0], -1);
    atomic_store(&lane->pipe_fds[1], -1);
    atomic_store(&lane->state, LANE_FREE);
    atomic_store_explicit(&lane->owner_pid, 0, memory_order_release);
    Py_RETURN_NONE;
}

static int segment_has_data(SegmentObject *self) {
    for (uint32_t i = 0; i < self->hdr->nlanes; i++) {
        lane_header *lane = lane_at(self->base, self->hdr->lane_bytes, i);
        if (atomic_load_explicit(&lane->tail, memory_order_acquire) !=
            atomic_load_explicit(&lane->head, memory_order_relaxed))
            return 1;
    }
    return 0;
}

/* Consumer side: sleep until a producer publishes, wake() is called, or `timeout` seconds pass.
 * Returns True when data was already waiting. Releases the GIL while it sleeps. */
static PyObject *Segment_wait(SegmentObject *self, PyObject *arg) {
    double timeout = PyFloat_AsDouble(arg);
    if (timeout == -1.0 && PyErr_Occurred()) return NULL;
    if (!segment_ready(self)) return NULL;
    seg_header *hdr = self->hdr;
    uint32_t seq = atomic_load(&hdr->bell);
    atomic_store(&hdr->sleeping, 1u);
    atomic_thread_fence(memory_order_seq_cst);
    if (segment_has_data(self)) {
        atomic_store(&hdr->sleeping, 0u);
        Py_RETURN_TRUE;
    }
    futex_wait_released(&hdr->bell, seq, timeout);
    atomic_store(&hdr->sleeping, 0u);
    Py_RETURN_FALSE;
}

static PyObject *Segment_ack_pipes(SegmentObject *self, PyObject *arg) {
    long i = PyLong_AsLong(arg);
    if (i == -1 && PyErr_Occurred()) return NULL;
    lane_header *lane = segment_lane(self, i);
    if (!lane) return NULL;
    atomic_store(&lane->pipes_acked, 1u);
    Py_RETURN_NONE;
}

/* Consumer side: a short pause between passes that does not arm the doorbell (producers do not
 * pay a system call per write while the drain is busy), but that a producer waiting for room
 * cuts short: it rings the bell itself. */
/* The drain between passes: sleep `timeout` seconds to let more collect, unless a writer waits
 * for room (it rang the bell, maybe while the drain was busy, before this pause began). */
static PyObject *Segment_pause(SegmentObject *self, PyObject *arg) {
    double timeout = PyFloat_AsDouble(arg);
    if (timeout == -1.0 && PyErr_Occurred()) return NULL;
    if (!segment_ready(self)) return NULL;
    uint32_t seq = atomic_load(&self->hdr->bell);
    for (uint32_t i = 0; i < self->hdr->nlanes; i++)
        if (atomic_load(&lane_at(self->base, self->hdr->lane_bytes, i)->space_waiting))
            Py_RETURN_NONE;
    futex_wait_released(&self->hdr->bell, seq, timeout);
    Py_RETURN_NONE;
}

static PyObject *Segment_wake(SegmentObject *self, PyObject *unused) {
    if (!segment_ready(self)) return NULL;
    ring_bell(self->hdr);
    Py_RETURN_NONE;
}

static PyObject *Segment_mark_closed(SegmentObject *self, PyObject *unused) {
    if (!segment_ready(self)) return NULL;
    atomic_store(&self->hdr->closed, 1u);
    Py_RETURN_NONE;
}

static PyObject *Segment_producer(SegmentObject *self, PyObject *arg);
static PyObject *Segment_placeholder(SegmentObject *self, PyObject *unused);

#define SEG_GETTER(name, expr)                                                     \
    static PyObject *Segment_get_##name(SegmentObject *self, void *closure) {    \
        if (!segment_ready(self)) return NULL;                                     \
        return PyLong_FromUnsignedLongLong((unsigned long long)(expr));           \
    }
SEG_GETTER(nlanes, self->hdr->nlanes)
SEG_GETTER(lane_bytes, self->hdr->lane_bytes)
SEG_GETTER(master_pid, self->hdr->master_pid)
SEG_GETTER(master_start, self->hdr->master_start)
SEG_GETTER(closed, atomic_load(&self->hdr->closed))
SEG_GETTER(lane_misses, atomic_load(&self->hdr->lane_misses))

static PyObject *Segment_get_released(SegmentObject *self, void *closure) {
    return PyBool_FromLong(!self->has_view);
}

static PyGetSetDef Segment_getset[] = {
    {"nlanes", (getter)Segment_get_nlanes, NULL, NULL, NULL},
    {"lane_bytes", (getter)Segment_get_lane_bytes, NULL, NULL, NULL},
    {"master_pid", (getter)Segment_get_master_pid, NULL, NULL, NULL},
    {"master_start", (getter)Segment_get_master_start, NULL, NULL, NULL},
    {"closed", (getter)Segment_get_closed, NULL, NULL, NULL},
    {"lane_misses", (getter)Segment_get_lane_misses, NULL, NULL, NULL},
    {"released", (getter)Segment_get_released, NULL, NULL, NULL},
    {NULL},
};

static PyMethodDef Segment_methods[] = {
    {"claim", (PyCFunction)Segment_claim, METH_VARARGS,
     "claim(pid, start_us, rank, name=b'', stdout_pipe_fd=-1, stderr_pipe_fd=-1, count_miss=True)"
     " -> lane or -1 (a miss is counted in lane_misses if count_miss)"},
    {"placeholder", (PyCFunction)Segment_placeholder, METH_NOARGS,
     "a Producer of no lane whose first use asks the hook's on_fork for a real one"},
    {"producer", (PyCFunction)Segment_producer, METH_O, "producer(lane) -> Producer"},
    {"busy_lanes", (PyCFunction)Segment_busy_lanes, METH_NOARGS, "lanes that have an owner"},
    {"lanes_with_data", (PyCFunction)Segment_lanes_with_data, METH_NOARGS,
     "how many lanes hold unread bytes"},
    {"pipe_thread", (PyCFunction)Segment_pipe_thread, METH_O,
     "pipe_thread(lane) -> fd mode: the thread number of bytes from its owner's pipes (0: none)"},
    {"identity", (PyCFunction)Segment_identity, METH_O,
     "identity(lane) -> how often its owner set rank and name anew"},
    {"lane_info", (PyCFunction)Segment_lane_info, METH_O,
     "(owner_pid, state, owner_start, rank, head, tail, records, bytes, spilled_records, "
     "spilled_bytes, stalls, name, (stdout_pipe_fd, stderr_pipe_fd))"},
    {"read", (PyCFunction)Segment_read, METH_VARARGS,
     "read(lane, max_bytes, join_gap_ns=0) -> [(stream, flags, time_ns, payload, thread, rank)]"},
    {"free", (PyCFunction)Segment_free, METH_O, "free(lane): consumer returns a dead lane"},
    {"wait", (PyCFunction)Segment_wait, METH_O, "wait(timeout) -> bool: sleep until data"},
    {"wake", (PyCFunction)Segment_wake, METH_NOARGS, "wake the consumer"},
    {"pause", (PyCFunction)Segment_pause, METH_O,
     "pause(timeout): sleep between passes; a producer out of room cuts it short"},
    {"ack_pipes", (PyCFunction)Segment_ack_pipes, METH_O,
     "ack_pipes(lane): the consumer holds read ends of the lane owner's pipes"},
    {"mark_closed", (PyCFunction)Segment_mark_closed, METH_NOARGS,
     "tell every producer that the master is gone"},
    {"release", (PyCFunction)Segment_release, METH_NOARGS, "drop the buffer"},
    {NULL},
};

static PyTypeObject Segment_Type = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "safe_redirect._ring.Segment",
    .tp_basicsize = sizeof(SegmentObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Segment(buffer): a formatted segment in a writable buffer (an mmap).",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Segment_init,
    .tp_dealloc = (destructor)Segment_dealloc,
    .tp_methods = Segment_methods,
    .tp_getset = Segment_getset,
};

/* ---------------------------------------------------------------- Producer */

typedef struct {
    PyObject_HEAD
    SegmentObject *segment;
    lane_header *lane;
    long index;
    uint64_t generation; /* fork generation of the process that claimed the lane */
    _Atomic int detached; /* the lane is closed or the segment is gone: capture nothing more */
    unsigned skip_line;  /* bit per stream: the line being written there was spilled in part */
    unsigned mid_line;   /* bit per stream: what this process published there ends inside a line */
    unsigned gap;        /* bit per stream: its next record carries FLAG_GAP */
    /* fd mode (see "fd mode's two paths"): the pipes that feed this lane besides the hooks */
    _Atomic uint32_t lock;    /* 0 free, 1 held, 2 held with waiters (a futex word) */
    int feed_read[2];         /* per stream: the read end of its pipe, -1 if none */
    int feed_terminal[2];     /* per stream: the saved terminal, where Python's bytes go */
    uint16_t feed_slot;       /* the thread number that bytes from the pipes carry */
    _Atomic int32_t feed_rank; /* and their rank (the process's, as the pump last read it) */
    unsigned hook_mid_line;   /* bit per stream: the hooks' last append ended inside a line */
    unsigned raw_mid_line;    /* bit per stream: the last write to the terminal did */
    char *take_buf;           /* where a hook takes what the pipes hold */
    /* per stream: what the hooks captured of a buffered stream whose bytes have not reached the
     * terminal yet, as entries (stage_entry, payload); appended at the stream's next raw write */
    char *stage[2];
    size_t stage_len[2], stage_cap[2];
    size_t stage_last[2]; /* offset of the last entry: a write of the same thread joins it */
} ProducerObject;

typedef struct {
    uint32_t len;
    uint16_t slot;
    uint8_t flags, pad;
    int32_t rank;
} stage_entry;

static void producer_init_feed(ProducerObject *p) {
    p->lock = 0;
    p->feed_read[0] = p->feed_read[1] = p->feed_terminal[0] = p->feed_terminal[1] = -1;
    p->feed_slot = 0;
    p->feed_rank = -1;
    p->hook_mid_line = p->raw_mid_line = 0;
    p->take_buf = NULL;
    for (int s = 0; s < 2; s++) {
        p->stage[s] = NULL;
        p->stage_len[s] = p->stage_cap[s] = p->stage_last[s] = 0;
    }
}

static PyObject *Segment_producer(SegmentObject *self, PyObject *arg) {
    long i = PyLong_AsLong(arg);
    if (i == -1 && PyErr_Occurred()) return NULL;
    lane_header *lane = segment_lane(self, i);
    if (!lane) return NULL;
    ProducerObject *p = PyObject_New(ProducerObject, &Producer_Type);
    if (!p) return NULL;
    Py_INCREF(self);
    p->segment = self;
    p->lane = lane;
    p->index = i;
    p->generation = atomic_load(&fork_generation);
    p->detached = 0;
    p->skip_line = p->mid_line = p->gap = 0;
    producer_init_feed(p);
    return (PyObject *)p;
}

static PyObject *Segment_placeholder(SegmentObject *self, PyObject *unused) {
    if (!segment_ready(self)) return NULL;
    ProducerObject *p = PyObject_New(ProducerObject, &Producer_Type);
    if (!p) return NULL;
    Py_INCREF(self);
    p->segment = self;
    p->lane = NULL;
    p->index = -1;
    p->generation = UINT64_MAX; /* never the current generation: the first write attaches */
    p->detached = 1;
    p->skip_line = p->mid_line = p->gap = 0;
    producer_init_feed(p);
    return (PyObject *)p;
}

static void Producer_dealloc(ProducerObject *self) {
    Py_XDECREF(self->segment);
    PyMem_RawFree(self->take_buf);
    PyMem_RawFree(self->stage[0]);
    PyMem_RawFree(self->stage[1]);
    PyObject_Free(self);
}

/* ---- fd mode's two paths
 *
 * In fd mode Python-level writes (print, sys.stdout.write, .buffer.write) are captured by the
 * hooks, which know the writing thread (its line is rebuilt on its own, under its rank), and
 * the bottom of sys.stdout / sys.stderr (their FileIO) writes to the saved terminal instead of
 * fd 1 / 2 (a KIND_RAW hook): only what bypasses them (C libraries, os.write, os.system) goes
 * through the pipes, where the pump thread reads it. Both append to the process's lane, so
 * `lock` makes their appends, the pipes' reads and the writes to the terminal one sequence:
 * - the pump reads, appends and tees under the lock;
 * - a raw write (the bytes of a print reaching the terminal) first takes what the pipes hold
 *   (producer_take_pipes) when it starts a line or follows staged text, then appends what the
 *   hooks staged for its stream, then writes: a C write followed by a print lands in that order
 *   in the lane and on the terminal; a print followed by a C write is in order anyway;
 * - a hook on a stream whose bytes reach the terminal through a raw hook (`terminal`) appends
 *   what it captured at once if the call wrote to the terminal (write-through, line-buffered,
 *   a buffer that filled up), else stages it (a block-buffered stream): where the bytes of a
 *   print wait in the stream's buffer, their record waits too, and the order is the
 *   terminal's. No system call per print on a buffered stream; one ioctl per line on a
 *   write-through one. A hook on any other stream (not on fd 1 / 2) appends at once.
 * Bytes from the pipes carry one thread number of their own (feed_slot) whoever moves them, so
 * that a C line split between the pump and a hook is rebuilt as one line.
 * Whoever waits for the lock and holds the GIL lets it go first (producer_lock_gil); the pump
 * never takes the GIL while holding the lock. */

static int producer_feeding(ProducerObject *p) {
    return p->feed_read[0] >= 0 || p->feed_read[1] >= 0;
}

/* Without the GIL. */
static void producer_lock_nogil(ProducerObject *p) {
    uint32_t c = 0;
    if (atomic_compare_exchange_strong(&p->lock, &c, 1u)) return;
    if (c != 2u) c = atomic_exchange(&p->lock, 2u);
    while (c != 0u) {
        futex_wait(&p->lock, 2u, 0.01);
        c = atomic_exchange(&p->lock, 2u);
    }
}

/* Holding the GIL: let it go while the lock is taken elsewhere. */
static void producer_lock_gil(ProducerObject *p) {
    uint32_t c = 0;
    if (atomic_compare_exchange_strong(&p->lock, &c, 1u)) return;
    Py_BEGIN_ALLOW_THREADS
    producer_lock_nogil(p);
    Py_END_ALLOW_THREADS
}

static void producer_unlock(ProducerObject *p) {
    if (atomic_exchange(&p->lock, 0u) == 2u) futex_wake_all(&p->lock);
}

/* Whether the pipe of `stream` holds bytes nobody has read yet: one ioctl. */
static int pipe_holds_bytes(ProducerObject *p, int stream) {
    int fd = p->feed_read[stream], held = 0;
    return fd >= 0 && ioctl(fd, FIONREAD, &held) == 0 && held > 0;
}

static void producer_take_pipes(ProducerObject *p); /* with the pump, below */

#define STAGE_MAX (64u * 1024u) /* more staged than a stream buffers: a stream we do not see flush */

static int64_t producer_append_as(ProducerObject *p, unsigned stream, unsigned flags,
                                  const char *buf, uint64_t len, uint16_t slot, int32_t rank);

/* Stage a captured write (lock held). A write of the thread that staged the last entry joins it:
 * one record per thread and flush instead of one per write, for the lane and for the drain.
 * -1: no memory (the caller appends it at once instead). */
static int stage_add(ProducerObject *p, int s, const char *buf, uint64_t len, unsigned flags) {
    uint16_t slot = current_thread_slot();
    if (p->stage_len[s] && !flags) {
        stage_entry last;
        memcpy(&last, p->stage[s] + p->stage_last[s], sizeof last);
        if (last.slot == slot && last.rank == thread_rank && !last.flags &&
            last.len + len <= STAGE_MAX && p->stage_len[s] + len <= p->stage_cap[s]) {
            memcpy(p->stage[s] + p->stage_len[s], buf, (size_t)len);
            p->stage_len[s] += (size_t)len;
            last.len += (uint32_t)len;
            memcpy(p->stage[s] + p->stage_last[s], &last, sizeof last);
            return 0;
        }
    }
    size_t need = p->stage_len[s] + sizeof(stage_entry) + (size_t)len;
    if (need > p->stage_cap[s]) {
        size_t cap = p->stage_cap[s] ? p->stage_cap[s] * 2 : 4096;
        while (cap < need) cap *= 2;
        char *grown = PyMem_RawRealloc(p->stage[s], cap);
        if (!grown) return -1;
        p->stage[s] = grown;
        p->stage_cap[s] = cap;
    }
    stage_entry e = {(uint32_t)len, slot, (uint8_t)flags, 0, thread_rank};
    p->stage_last[s] = p->stage_len[s];
    memcpy(p->stage[s] + p->stage_len[s], &e, sizeof e);
    memcpy(p->stage[s] + p->stage_len[s] + sizeof e, buf, (size_t)len);
    p->stage_len[s] = need;
    return 0;
}

/* What a full lane left of the staged entries: the caller (lock released, GIL held) hands it to
 * the overflow policy, entry by entry, as the thread that wrote it. */
typedef struct {
    char *buf;       /* owned; NULL if nothing is left */
    size_t len, pos; /* entries from `pos` on */
    uint64_t done;   /* bytes of the entry at `pos` already appended */
} stage_left;

/* Append the entries staged for stream s, each as its writer (lock held). */
static stage_left stage_move(ProducerObject *p, int s) {
    stage_left left = {NULL, 0, 0, 0};
    size_t pos = 0, len = p->stage_len[s];
    char *buf = p->stage[s];
    while (pos < len) {
        stage_entry e;
        memcpy(&e, buf + pos, sizeof e);
        int64_t n = producer_append_as(p, (unsigned)s, e.flags, buf + pos + sizeof e, e.len,
                                       e.slot, e.rank);
        if (n >= 0 && (uint64_t)n < e.len) { /* full: the rest goes to the overflow policy */
            left.buf = buf;
            left.len = len;
            left.pos = pos;
            left.done = (uint64_t)n;
            p->stage[s] = NULL;
            p->stage_cap[s] = 0;
            break;
        }
        pos += sizeof e + e.len;
    }
    p->stage_len[s] = 0;
    return left;
}

/* Lock held, GIL held: what the pipes hold goes first, then what is staged for stream s. */
static stage_left take_then_move(ProducerObject *p, int s) {
    if (pipe_holds_bytes(p, s)) {
        Py_BEGIN_ALLOW_THREADS
        producer_take_pipes(p);
        Py_END_ALLOW_THREADS
    }
    return stage_move(p, s);
}

static int producer_live(ProducerObject *p) {
    return p->lane && !p->detached && p->segment->has_view &&
           !atomic_load(&p->segment->releasing);
}

/* Returns bytes published, or -1 when the producer is detached. In fd mode the caller holds
 * the lock. */
static int64_t producer_append_as(ProducerObject *p, unsigned stream, unsigned flags,
                                  const char *buf, uint64_t len, uint16_t slot, int32_t rank) {
    if (!producer_live(p)) return -1;
    uint64_t skipped = 0;
    if ((p->skip_line >> stream) & 1u && len) {
        /* The start of this line was spilled: spill the rest of it too, up to its end, so that
         * the lane never holds a line's tail without its head (a phantom empty line, say). */
        while (skipped < len && buf[skipped] != '\n' && buf[skipped] != '\r') skipped++;
        if (skipped < len) {
            skipped++; /* the line end goes with its line */
            p->skip_line &= ~(1u << stream);
        }
        atomic_fetch_add(&p->lane->spilled_records, 1);
        atomic_fetch_add(&p->lane->spilled_bytes, skipped);
        if (skipped == len) return (int64_t)len;
    }
    unsigned bit = 1u << stream;
    int64_t n = ring_append(p->segment->hdr, p->lane, stream, flags, p->gap & bit ? FLAG_GAP : 0u,
                            buf + skipped, len - skipped, slot, rank);
    if (n < 0) {
        p->detached = 1;
        return n;
    }
    if (n > 0) {
        char last = buf[skipped + (uint64_t)n - 1];
        p->gap &= ~bit;
        p->mid_line = last == '\n' || last == '\r' ? p->mid_line & ~bit : p->mid_line | bit;
    }
    return n + (int64_t)skipped;
}

/* The same, written by the calling thread. */
static int64_t producer_append(ProducerObject *p, unsigned stream, unsigned flags, const char *buf,
                               uint64_t len) {
    return producer_append_as(p, stream, flags, buf, len, current_thread_slot(), thread_rank);
}

static PyObject *Producer_append(ProducerObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "append(stream, flags, data) takes 3 arguments");
        return NULL;
    }
    long stream = PyLong_AsLong(args[0]);
    long flags = PyLong_AsLong(args[1]);
    if ((stream == -1 || flags == -1) && PyErr_Occurred()) return NULL;
    Py_buffer data;
    if (PyObject_GetBuffer(args[2], &data, PyBUF_SIMPLE) < 0) return NULL;
    if (stream < 0 || stream > 7 || flags < 0 || flags > 255) {
        PyBuffer_Release(&data);
        PyErr_SetString(PyExc_ValueError, "stream must be 0..7 and flags 0..255");
        return NULL;
    }
    int feeding = producer_feeding(self);
    if (feeding) producer_lock_gil(self);
    int64_t n = producer_append(self, (unsigned)stream, (unsigned)flags, data.buf,
                                (uint64_t)data.len);
    if (feeding) producer_unlock(self);
    PyBuffer_Release(&data);
    return PyLong_FromLongLong(n);
}

static PyObject *Producer_count(ProducerObject *self, PyObject *args) {
    unsigned long long spilled_records, spilled_bytes, stalls;
    if (!PyArg_ParseTuple(args, "KKK", &spilled_records, &spilled_bytes, &stalls)) return NULL;
    if (!self->lane || !self->segment->has_view) Py_RETURN_NONE;
    atomic_fetch_add(&self->lane->spilled_records, spilled_records);
    atomic_fetch_add(&self->lane->spilled_bytes, spilled_bytes);
    atomic_fetch_add(&self->lane->stalls, stalls);
    Py_RETURN_NONE;
}

/* Producer side, without the GIL: sleep until the consumer frees `need` bytes of room in this
 * lane, or `timeout` seconds pass. Returns 1 when the room is there. */
static int lane_wait_space(seg_header *seg, lane_header *lane, uint64_t need, double timeout) {
    uint64_t cap = seg->lane_bytes;
    if (need > cap / 2) need = cap / 2; /* what one record needs at most */
    uint32_t seq = atomic_load(&lane->space_bell);
    atomic_store(&lane->space_waiting, 1u); /* before the bell: a pausing drain looks for it */
    ring_bell(seg); /* the drain may be pausing between passes: come now */
    atomic_thread_fence(memory_order_seq_cst);
    uint64_t used = atomic_load(&lane->tail) - atomic_load(&lane->head);
    if (cap - used < need) {
        futex_wait(&lane->space_bell, seq, timeout);
        used = atomic_load(&lane->tail) - atomic_load(&lane->head);
    }
    atomic_store(&lane->space_waiting, 0u);
    return cap - used >= need;
}

/* Producer side: sleep until the consumer frees room in this lane, or `timeout` seconds pass.
 * Returns True when room appeared (or already was there). Releases the GIL while it sleeps. */
static PyObject *Producer_wait_space(ProducerObject *self, PyObject *args) {
    unsigned long long need;
    double timeout;
    if (!PyArg_ParseTuple(args, "Kd", &need, &timeout)) return NULL;
    if (!producer_live(self)) Py_RETURN_FALSE;
    int room;
    Py_BEGIN_ALLOW_THREADS
    room = lane_wait_space(self->segment->hdr, self->lane, need, timeout);
    Py_END_ALLOW_THREADS
    return PyBool_FromLong(room);
}

/* The writer spilled `rest` of a write on `stream` (it reached the terminal only). Keep lines
 * whole in the lane: a line whose head is in the lane ends there (its next record carries
 * FLAG_GAP), and a line whose head was spilled is spilled up to its end (skip_line). */
static PyObject *Producer_spilled(ProducerObject *self, PyObject *args) {
    int stream, line_ended;
    if (!PyArg_ParseTuple(args, "ip", &stream, &line_ended)) return NULL;
    if (stream < 0 || stream > 7) {
        PyErr_SetString(PyExc_ValueError, "stream must be 0..7");
        return NULL;
    }
    unsigned bit = 1u << stream;
    int feeding = producer_feeding(self);
    if (feeding) producer_lock_gil(self);
    if (self->mid_line & bit) self->gap |= bit;
    self->mid_line &= ~bit;
    if (line_ended)
        self->skip_line &= ~bit;
    else
        self->skip_line |= bit;
    if (feeding) producer_unlock(self);
    Py_RETURN_NONE;
}

static PyObject *Producer_close(ProducerObject *self, PyObject *unused) {
    int live = producer_live(self);
    self->detached = 1;
    wait_for_pumps(); /* the master frees a closed lane: nothing may land after */
    if (live) atomic_store(&self->lane->state, LANE_CLOSED);
    if (self->lane && self->segment->has_view) ring_bell(self->segment->hdr);
    Py_RETURN_NONE;
}

#define TAKE_BYTES (64u * 1024u)

/* fd mode: the pipes that feed this lane, their saved terminals (-1 where a stream is not
 * captured). From now on the hooks and the pump share the lane (see "fd mode's two paths"). */
static PyObject *Producer_feed(ProducerObject *self, PyObject *args) {
    int read_fds[2], terminal_fds[2];
    if (!PyArg_ParseTuple(args, "(ii)(ii)", &read_fds[0], &read_fds[1], &terminal_fds[0],
                          &terminal_fds[1]))
        return NULL;
    if (!self->take_buf) {
        self->take_buf = PyMem_RawMalloc(TAKE_BYTES);
        if (!self->take_buf) return PyErr_NoMemory();
    }
    producer_lock_gil(self);
    if (!self->feed_slot) self->feed_slot = (uint16_t)(atomic_fetch_add(&next_thread_slot, 1) % 65535u + 1);
    if (producer_live(self)) atomic_store(&self->lane->pipe_thread, self->feed_slot);
    for (int s = 0; s < 2; s++) {
        self->feed_read[s] = read_fds[s];
        self->feed_terminal[s] = terminal_fds[s];
    }
    producer_unlock(self);
    Py_RETURN_NONE;
}

/* Lock held, GIL held: what the pipes hold, then what the hooks staged for stream s, into the
 * lane; what a full lane cannot take is counted as spilled. */
static void unstage_stream(ProducerObject *p, int s) {
    if (!p->stage_len[s]) return;
    stage_left left = take_then_move(p, s);
    for (size_t pos = left.pos; left.buf && pos < left.len;) {
        stage_entry e;
        memcpy(&e, left.buf + pos, sizeof e);
        if (p->lane && p->segment->has_view) {
            atomic_fetch_add(&p->lane->spilled_records, 1);
            atomic_fetch_add(&p->lane->spilled_bytes, e.len - (pos == left.pos ? left.done : 0));
        }
        pos += sizeof e + e.len;
    }
    PyMem_RawFree(left.buf);
}

static int producer_of_this_process(ProducerObject *p) {
    return p->generation == atomic_load_explicit(&fork_generation, memory_order_relaxed);
}

/* What the hooks staged goes into the lane now, after what the pipes hold (a flush, an exit, the
 * hooks coming off). What a full lane cannot take is counted as spilled. */
static PyObject *Producer_unstage(ProducerObject *self, PyObject *unused) {
    if (!producer_feeding(self) || !producer_of_this_process(self)) Py_RETURN_NONE;
    producer_lock_gil(self);
    for (int s = 0; s < 2; s++) unstage_stream(self, s);
    producer_unlock(self);
    Py_RETURN_NONE;
}

/* fd mode ends for `stream` (-1: both), before its pipe's read end and its saved terminal
 * close: what is staged for it goes into the lane first, and the hooks write through again.
 * The lane must never hold an fd number after its owner closed it (the number is reused). */
static PyObject *Producer_unfeed(ProducerObject *self, PyObject *args) {
    int stream = -1;
    if (!PyArg_ParseTuple(args, "|i", &stream)) return NULL;
    if (stream < -1 || stream > 1) {
        PyErr_SetString(PyExc_ValueError, "stream must be 0, 1 or -1 (both)");
        return NULL;
    }
    producer_lock_gil(self);
    for (int s = 0; s < 2; s++) {
        if (stream >= 0 && s != stream) continue;
        if (producer_of_this_process(self)) unstage_stream(self, s);
        self->feed_read[s] = self->feed_terminal[s] = -1;
    }
    producer_unlock(self);
    Py_RETURN_NONE;
}

/* The owner's rank and name, set anew (a launcher named the process after the lane was claimed):
 * the consumer sees `identity` move and renders the tag again. */
static PyObject *Producer_set_identity(ProducerObject *self, PyObject *args) {
    long long rank;
    const char *name;
    Py_ssize_t name_len;
    if (!PyArg_ParseTuple(args, "Ly#", &rank, &name, &name_len)) return NULL;
    if (!producer_live(self)) Py_RETURN_NONE;
    lane_header *lane = self->lane;
    char fresh[sizeof lane->name];
    memset(fresh, 0, sizeof fresh);
    memcpy(fresh, name, (size_t)(name_len < 31 ? name_len : 31));
    if (lane->rank == rank && memcmp(lane->name, fresh, sizeof fresh) == 0) Py_RETURN_NONE;
    lane->rank = rank;
    memcpy(lane->name, fresh, sizeof fresh);
    atomic_fetch_add_explicit(&lane->identity, 1u, memory_order_release);
    Py_RETURN_NONE;
}

static PyObject *Producer_head(ProducerObject *self, void *closure) {
    if (!self->lane || !self->segment->has_view) return PyLong_FromLong(0);
    return PyLong_FromUnsignedLongLong(atomic_load(&self->lane->head));
}

/* How far the consumer has got, for a producer that waits for room: its lane's head plus the
 * reads of every lane. It moves while the master reads anything, even while it is busy with
 * other lanes before it comes back to this one. */
static PyObject *Producer_progress(ProducerObject *self, void *closure) {
    if (!self->lane || !self->segment->has_view) return PyLong_FromLong(0);
    return PyLong_FromUnsignedLongLong(atomic_load(&self->lane->head) +
                                       atomic_load(&self->segment->hdr->reads));
}

static PyObject *Producer_get_pipes_acked(ProducerObject *self, void *closure) {
    if (!self->lane || !self->segment->has_view) Py_RETURN_FALSE;
    return PyBool_FromLong(atomic_load(&self->lane->pipes_acked));
}

static PyObject *Producer_get_feeding(ProducerObject *self, void *closure) {
    return PyBool_FromLong(producer_feeding(self));
}

static PyObject *Producer_get_live(ProducerObject *self, void *closure) {
    return PyBool_FromLong(producer_live(self));
}

static PyObject *Producer_get_generation(ProducerObject *self, void *closure) {
    return PyLong_FromUnsignedLongLong(self->generation);
}

static PyObject *Producer_get_lane(ProducerObject *self, void *closure) {
    return PyLong_FromLong(self->index);
}

static PyObject *Producer_get_segment(ProducerObject *self, void *closure) {
    return Py_NewRef((PyObject *)self->segment);
}

static PyGetSetDef Producer_getset[] = {
    {"lane", (getter)Producer_get_lane, NULL, NULL, NULL},
    {"segment", (getter)Producer_get_segment, NULL, NULL, NULL},
    {"generation", (getter)Producer_get_generation, NULL, NULL, NULL},
    {"live", (getter)Producer_get_live, NULL, NULL, NULL},
    {"feeding", (getter)Producer_get_feeding, NULL, "fd mode: pipes feed this lane too", NULL},
    {"pipes_acked", (getter)Producer_get_pipes_acked, NULL,
     "fd mode: the consumer holds read ends of this process's pipes", NULL},
    {"head", (getter)Producer_head, NULL, "bytes the consumer has taken from this lane", NULL},
    {"progress", (getter)Producer_progress, NULL,
     "this lane's head plus the consumer's reads of every lane: moves while the master reads",
     NULL},
    {NULL},
};

static PyMethodDef Producer_methods[] = {
    {"append", (PyCFunction)(void (*)(void))Producer_append, METH_FASTCALL,
     "append(stream, flags, data) -> bytes published (< len: lane full; -1: detached)"},
    {"wait_space", (PyCFunction)Producer_wait_space, METH_VARARGS,
     "wait_space(need, timeout) -> bool: sleep until the consumer frees `need` bytes of room"},
    {"count", (PyCFunction)Producer_count, METH_VARARGS,
     "count(spilled_records, spilled_bytes, stalls): add to the lane's counters"},
    {"spilled", (PyCFunction)Producer_spilled, METH_VARARGS,
     "spilled(stream, line_ended): the rest of a write was spilled; keep the lane's lines whole"},
    {"close", (PyCFunction)Producer_close, METH_NOARGS,
     "mark the lane closed: the consumer drains it, then frees it"},
    {"feed", (PyCFunction)Producer_feed, METH_VARARGS,
     "feed((stdout_read, stderr_read), (stdout_terminal, stderr_terminal)): fd mode, the pipes "
     "that feed this lane besides the hooks, and the terminals Python's writes go to"},
    {"unstage", (PyCFunction)Producer_unstage, METH_NOARGS,
     "fd mode: what the hooks staged for buffered streams goes into the lane now"},
    {"unfeed", (PyCFunction)Producer_unfeed, METH_VARARGS,
     "unfeed(stream=-1): fd mode ends for stream (-1: both): what is staged for it goes into "
     "the lane, its pipe and terminal are forgotten (before they close)"},
    {"set_identity", (PyCFunction)Producer_set_identity, METH_VARARGS,
     "set_identity(rank, name): the owner's rank (-1: none) and name, set anew"},
    {NULL},
};

static PyTypeObject Producer_Type = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "safe_redirect._ring.Producer",
    .tp_basicsize = sizeof(ProducerObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "The writing end of one lane, made by Segment.producer().",
    .tp_dealloc = (destructor)Producer_dealloc,
    .tp_methods = Producer_methods,
    .tp_getset = Producer_getset,
};

/* ---------------------------------------------------------------- Hook */

/* A callable that stands in for a stream's `write` (text or bytes) or `flush`: it calls the
 * writer it replaced, then copies what was written into the producer's lane. Everything that is
 * not the common case (a fork since the producer was made, a full lane) is handed to Python. */
typedef struct {
    PyObject_HEAD
    vectorcallfunc vectorcall;
    PyObject *target;   /* the writer it stands in for */
    PyObject *producer; /* ProducerObject or None: None = pass through only */
    PyObject *on_fork;  /* on_fork(hook): give the hook a producer of this process, or None */
    PyObject *on_full;  /* on_full(hook, stream, remaining: bytes): wait, retry, or spill */
    unsigned long skip_thread; /* writes from this thread (the drain thread) are not captured */
    unsigned long host_thread; /* nor from this one: a host re-writing what reached fd 1 or 2 */
    int stream;
    int kind;
    int terminal; /* fd mode: a KIND_RAW hook of ours under this one writes the stream's bytes */
} HookObject;

static void report_unraisable(PyObject *hook, const char *what) {
    /* The user's write already happened; a failure of ours must not become theirs. */
    PyObject *msg = PyUnicode_FromString(what);
    PyErr_WriteUnraisable(msg ? msg : hook);
    Py_XDECREF(msg);
}

/* The first write of a new process: let Python re-aim the hook (plain writer, own lane) before
 * anything of the parent's is called. */
static void hook_check_fork(HookObject *self) {
    if (self->producer == Py_None) return;
    ProducerObject *p = (ProducerObject *)self->producer;
    if (p->generation == atomic_load_explicit(&fork_generation, memory_order_relaxed)) return;
    PyObject *r = PyObject_CallOneArg(self->on_fork, (PyObject *)self);
    if (!r)
        report_unraisable((PyObject *)self, "safe_redirect: attaching a forked child failed");
    Py_XDECREF(r);
}

/* Hand what a full lane left of staged entries to the overflow policy, each entry as the thread
 * that wrote it (on_full appends with the calling thread's number and rank). GIL held, lock not. */
static void stage_overflow(HookObject *self, int s, stage_left left) {
    uint16_t my_slot = current_thread_slot();
    int32_t my_rank = thread_rank;
    for (size_t pos = left.pos; left.buf && pos < left.len;) {
        stage_entry e;
        memcpy(&e, left.buf + pos, sizeof e);
        uint64_t done = pos == left.pos ? left.done : 0;
        PyObject *rest = PyBytes_FromStringAndSize(left.buf + pos + sizeof e + done,
                                                   (Py_ssize_t)(e.len - done));
        pos += sizeof e + e.len;
        if (!rest) {
            PyErr_Clear();
            continue;
        }
        thread_slot = e.slot;
        thread_rank = e.rank;
        PyObject *r = PyObject_CallFunction(self->on_full, "OiN", (PyObject *)self, s, rest);
        thread_slot = my_slot;
        thread_rank = my_rank;
        if (!r)
            report_unraisable((PyObject *)self, "safe_redirect: handling a full lane failed");
        Py_XDECREF(r);
    }
    PyMem_RawFree(left.buf);
}

/* Capture what the call wrote. `raw_written`: the call wrote to the terminal through a KIND_RAW
 * hook, which took the pipes and the staged writes just before (fd mode). */
static int hook_capture(HookObject *self, const char *buf, uint64_t len, unsigned flags,
                        int raw_written) {
    if (self->producer == Py_None) return 0;
    if (self->skip_thread || self->host_thread) {
        unsigned long me = PyThread_get_thread_ident();
        if (me == self->skip_thread || me == self->host_thread) return 0;
    }
    ProducerObject *p = (ProducerObject *)self->producer;
    if (p->generation != atomic_load_explicit(&fork_generation, memory_order_relaxed))
        return 0; /* never write into a lane of another process */
    int64_t n;
    int s = self->stream;
    stage_left left = {NULL, 0, 0, 0};
    if (producer_feeding(p) && s < 2) {
        producer_lock_gil(p);
        if (self->terminal && len && !raw_written && p->feed_terminal[s] >= 0 &&
            stage_add(p, s, buf, len, flags) == 0) {
            /* a buffered stream: the record waits with the bytes (see "fd mode's two paths") */
            if (p->stage_len[s] > STAGE_MAX) left = take_then_move(p, s);
            producer_unlock(p);
            stage_overflow(self, s, left);
            return 0;
        }
        if (self->terminal && !raw_written && p->stage_len[s]) left = take_then_move(p, s);
        n = producer_append(p, (unsigned)s, flags, buf, len);
        producer_unlock(p);
        stage_overflow(self, s, left);
    } else {
        n = producer_append(p, (unsigned)s, flags, buf, len);
    }
    if (n < 0 || (uint64_t)n == len) return 0;
    PyObject *rest = PyBytes_FromStringAndSize(buf + n, (Py_ssize_t)(len - (uint64_t)n));
    if (!rest) return -1;
    PyObject *r = PyObject_CallFunction(self->on_full, "OiN", (PyObject *)self, s, rest);
    if (!r) {
        report_unraisable((PyObject *)self, "safe_redirect: handling a full lane failed");
        return 0;
    }
    Py_DECREF(r);
    return 0;
}

/* KIND_RAW, fd mode: write to the saved terminal instead of fd 1 / 2 (the pipe would capture the
 * bytes a second time); first what the pipes hold (when the write starts a line or follows
 * staged text) and what the hooks staged for the stream go into the lane. Returns what
 * FileIO.write returns; without a feeding producer of this process it is FileIO.write. */
static PyObject *hook_raw_write(HookObject *self, PyObject *const *args, size_t nargsf,
                                PyObject *kwnames) {
    PyObject *producer = self->producer;
    ProducerObject *p = producer == Py_None ? NULL : (ProducerObject *)producer;
    int s = self->stream;
    if (!p || p->generation != atomic_load_explicit(&fork_generation, memory_order_relaxed) ||
        s > 1 || !producer_feeding(p) || PyVectorcall_NARGS(nargsf) != 1 || kwnames)
        return PyObject_Vectorcall(self->target, args, nargsf, kwnames);
    Py_buffer view;
    if (PyObject_GetBuffer(args[0], &view, PyBUF_SIMPLE) < 0) {
        PyErr_Clear();
        return PyObject_Vectorcall(self->target, args, nargsf, kwnames);
    }
    Py_INCREF(producer); /* the hook's producer may be replaced while the GIL is let go */
    unsigned bit = 1u << s;
    ssize_t written = -1;
    int err = 0;
    stage_left left = {NULL, 0, 0, 0};
    raw_writes++;
    /* a session inside another: our terminal is the outer one's pipe, whose session captured
     * these bytes with its own hooks already; its raw hook under ours writes them on */
    int nested = 0;
    for (PyObject *below = self->target; Py_IS_TYPE(below, &Hook_Type) && !nested;
         below = ((HookObject *)below)->target)
        nested = ((HookObject *)below)->kind == KIND_RAW;
    producer_lock_gil(p);
    int terminal = p->feed_terminal[s];
    if (terminal >= 0 && nested) {
        if (p->stage_len[s] || !(p->raw_mid_line & bit)) left = take_then_move(p, s);
        if (view.len) {
            char last = ((const char *)view.buf)[view.len - 1];
            p->raw_mid_line = last == '\n' || last == '\r' ? p->raw_mid_line & ~bit
                                                           : p->raw_mid_line | bit;
        }
        producer_unlock(p);
        terminal = -1; /* written by the target, below */
    } else if (terminal >= 0) {
        if (p->stage_len[s] || !(p->raw_mid_line & bit)) left = take_then_move(p, s);
        Py_BEGIN_ALLOW_THREADS
        do {
            written = write(terminal, view.buf, (size_t)view.len);
        } while (written < 0 && errno == EINTR);
        if (written < 0) err = errno;
        if (written > 0) {
            char last = ((const char *)view.buf)[written - 1];
            p->raw_mid_line = last == '\n' || last == '\r' ? p->raw_mid_line & ~bit
                                                           : p->raw_mid_line | bit;
        }
        producer_unlock(p);
        Py_END_ALLOW_THREADS
    } else {
        producer_unlock(p); /* fd mode ended meanwhile */
    }
    PyBuffer_Release(&view);
    stage_overflow(self, s, left);
    Py_DECREF(producer);
    if (terminal < 0) return PyObject_Vectorcall(self->target, args, nargsf, kwnames);
    if (written < 0) {
        if (err == EAGAIN) Py_RETURN_NONE; /* as FileIO.write on a non-blocking fd */
        errno = err;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    return PyLong_FromSsize_t(written);
}

static PyObject *hook_vectorcall(PyObject *op, PyObject *const *args, size_t nargsf,
                                 PyObject *kwnames) {
    HookObject *self = (HookObject *)op;
    Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
    PyObject *result;
    hook_check_fork(self);
    if (self->kind == KIND_RAW) return hook_raw_write(self, args, nargsf, kwnames);
    int buffer_layer = self->kind == KIND_BYTES || self->kind == KIND_BUFFER_FLUSH;
    if (buffer_layer && text_depth > 0) {
        /* TextIOWrapper handing on text (or a flush) we already captured at the text layer. */
        return PyObject_Vectorcall(self->target, args, nargsf, kwnames);
    }
    unsigned long raw_before = raw_writes;
    if (!buffer_layer) text_depth++;
    result = PyObject_Vectorcall(self->target, args, nargsf, kwnames);
    if (!buffer_layer) text_depth--;
    if (!result || self->producer == Py_None) return result;
    int raw_written = raw_writes != raw_before;

    int ok = 0;
    if (self->kind == KIND_FLUSH || self->kind == KIND_BUFFER_FLUSH) {
        ok = hook_capture(self, "", 0, FLAG_FLUSH, raw_written);
    } else if (nargs == 1 && kwnames == NULL) {
        PyObject *data = args[0];
        if (PyUnicode_Check(data)) {
            Py_ssize_t size;
            const char *utf8 = PyUnicode_AsUTF8AndSize(data, &size);
            if (utf8) {
                if (size) ok = hook_capture(self, utf8, (uint64_t)size, 0, raw_written);
            } else {
                /* Lone surrogates: keep them visible rather than lose the write. */
                PyErr_Clear();
                PyObject *b = PyUnicode_AsEncodedString(data, "utf-8", "backslashreplace");
                if (b) {
                    if (PyBytes_GET_SIZE(b))
                        ok = hook_capture(self, PyBytes_AS_STRING(b),
                                          (uint64_t)PyBytes_GET_SIZE(b), 0, raw_written);
                    Py_DECREF(b);
                } else {
                    ok = -1;
                }
            }
        } else if (PyObject_CheckBuffer(data)) {
            Py_buffer view;
            if (PyObject_GetBuffer(data, &view, PyBUF_SIMPLE) == 0) {
                if (view.len) ok = hook_capture(self, view.buf, (uint64_t)view.len, 0, raw_written);
                PyBuffer_Release(&view);
            } else {
                PyErr_Clear(); /* not contiguous: the target accepted it, we let it pass */
            }
        }
    }
    if (ok < 0) report_unraisable(op, "safe_redirect: capturing a write failed");
    return result;
}

static int Hook_init(HookObject *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"target", "producer", "stream", "kind", "on_fork", "on_full", NULL};
    PyObject *target, *producer, *on_fork, *on_full;
    int stream, kind;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOiiOO", kwlist, &target, &producer, &stream,
                                     &kind, &on_fork, &on_full))
        return -1;
    if (producer != Py_None && !PyObject_TypeCheck(producer, &Producer_Type)) {
        PyErr_SetString(PyExc_TypeError, "producer must be a Producer or None");
        return -1;
    }
    if (stream < 0 || stream > 7 || kind < KIND_TEXT || kind > KIND_RAW) {
        PyErr_SetString(PyExc_ValueError, "stream must be 0..7 and kind 0..4");
        return -1;
    }
    Py_XSETREF(self->target, Py_NewRef(target));
    Py_XSETREF(self->producer, Py_NewRef(producer));
    Py_XSETREF(self->on_fork, Py_NewRef(on_fork));
    Py_XSETREF(self->on_full, Py_NewRef(on_full));
    self->stream = stream;
    self->kind = kind;
    self->skip_thread = 0;
    self->host_thread = 0;
    self->terminal = 0;
    self->vectorcall = hook_vectorcall;
    return 0;
}

static int Hook_traverse(HookObject *self, visitproc visit, void *arg) {
    Py_VISIT(self->target);
    Py_VISIT(self->producer);
    Py_VISIT(self->on_fork);
    Py_VISIT(self->on_full);
    return 0;
}

static int Hook_clear(HookObject *self) {
    Py_CLEAR(self->target);
    Py_CLEAR(self->producer);
    Py_CLEAR(self->on_fork);
    Py_CLEAR(self->on_full);
    return 0;
}

static void Hook_dealloc(HookObject *self) {
    PyObject_GC_UnTrack(self);
    Hook_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *Hook_get_target(HookObject *self, void *c) { return Py_NewRef(self->target); }
static int Hook_set_target(HookObject *self, PyObject *v, void *c) {
    if (!v || !PyCallable_Check(v)) {
        PyErr_SetString(PyExc_TypeError, "target must be callable");
        return -1;
    }
    Py_XSETREF(self->target, Py_NewRef(v));
    return 0;
}
static PyObject *Hook_get_producer(HookObject *self, void *c) { return Py_NewRef(self->producer); }
static int Hook_set_producer(HookObject *self, PyObject *v, void *c) {
    if (!v || (v != Py_None && !PyObject_TypeCheck(v, &Producer_Type))) {
        PyErr_SetString(PyExc_TypeError, "producer must be a Producer or None");
        return -1;
    }
    Py_XSETREF(self->producer, Py_NewRef(v));
    return 0;
}
static PyObject *Hook_get_skip_thread(HookObject *self, void *c) {
    return PyLong_FromUnsignedLong(self->skip_thread);
}
static int Hook_set_skip_thread(HookObject *self, PyObject *v, void *c) {
    unsigned long t = v ? PyLong_AsUnsignedLong(v) : 0;
    if (t == (unsigned long)-1 && PyErr_Occurred()) return -1;
    self->skip_thread = t;
    return 0;
}
static PyObject *Hook_get_host_thread(HookObject *self, void *c) {
    return PyLong_FromUnsignedLong(self->host_thread);
}
static int Hook_set_host_thread(HookObject *self, PyObject *v, void *c) {
    unsigned long t = v ? PyLong_AsUnsignedLong(v) : 0;
    if (t == (unsigned long)-1 && PyErr_Occurred()) return -1;
    self->host_thread = t;
    return 0;
}
static PyObject *Hook_get_stream(HookObject *self, void *c) { return PyLong_FromLong(self->stream); }
static PyObject *Hook_get_terminal(HookObject *self, void *c) {
    return PyBool_FromLong(self->terminal);
}
static int Hook_set_terminal(HookObject *self, PyObject *v, void *c) {
    int t = v ? PyObject_IsTrue(v) : 0;
    if (t < 0) return -1;
    self->terminal = t;
    return 0;
}
static PyObject *Hook_get_kind(HookObject *self, void *c) { return PyLong_FromLong(self->kind); }

static PyGetSetDef Hook_getset[] = {
    {"target", (getter)Hook_get_target, (setter)Hook_set_target, "the writer it stands in for", NULL},
    {"producer", (getter)Hook_get_producer, (setter)Hook_set_producer, "Producer or None", NULL},
    {"skip_thread", (getter)Hook_get_skip_thread, (setter)Hook_set_skip_thread,
     "ident of a thread whose writes are not captured (0: none)", NULL},
    {"host_thread", (getter)Hook_get_host_thread, (setter)Hook_set_host_thread,
     "ident of a host's thread that re-writes what reached the fd: not captured (0: none)", NULL},
    {"stream", (getter)Hook_get_stream, NULL, NULL, NULL},
    {"terminal", (getter)Hook_get_terminal, (setter)Hook_set_terminal,
     "fd mode: a KIND_RAW hook under this one writes the stream's bytes to the terminal", NULL},
    {"kind", (getter)Hook_get_kind, NULL, NULL, NULL},
    {NULL},
};

static PyTypeObject Hook_Type = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "safe_redirect._ring.Hook",
    .tp_basicsize = sizeof(HookObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL,
    .tp_doc = "Hook(target, producer, stream, kind, on_fork, on_full): a capturing writer.",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Hook_init,
    .tp_dealloc = (destructor)Hook_dealloc,
    .tp_traverse = (traverseproc)Hook_traverse,
    .tp_clear = (inquiry)Hook_clear,
    .tp_call = PyVectorcall_Call,
    .tp_vectorcall_offset = offsetof(HookObject, vectorcall),
    .tp_getset = Hook_getset,
};

/* ---------------------------------------------------------------- module */

static PyObject *ring_set_thread_rank(PyObject *mod, PyObject *arg) {
    long rank = PyLong_AsLong(arg);
    if (rank == -1 && PyErr_Occurred()) return NULL;
    if (rank < -1 || rank > INT32_MAX) {
        PyErr_SetString(PyExc_ValueError, "rank must be -1 (none) or 0..2**31-1");
        return NULL;
    }
    thread_rank = (int32_t)rank;
    Py_RETURN_NONE;
}

static PyObject *ring_get_thread_rank(PyObject *mod, PyObject *unused) {
    return PyLong_FromLong(thread_rank);
}

static PyObject *ring_stop_inside_next_record(PyObject *mod, PyObject *arg) {
    long stage = PyLong_AsLong(arg);
    if (stage == -1 && PyErr_Occurred()) return NULL;
    if (stage < 0 || stage > 3) {
        PyErr_SetString(PyExc_ValueError, "stage must be 0 (off), 1, 2 or 3");
        return NULL;
    }
    stop_inside_next_record = (int)stage;
    Py_RETURN_NONE;
}

static PyObject *ring_fork_generation(PyObject *mod, PyObject *unused) {
    return PyLong_FromUnsignedLongLong(atomic_load(&fork_generation));
}

/* ---------------------------------------------------------------- fd mode's pump */

static void write_all(int fd, const char *buf, size_t n) {
    while (n && fd >= 0) {
        ssize_t w = write(fd, buf, n);
        if (w < 0) {
            if (errno == EINTR) continue;
            return; /* a terminal that went away is not the writer's problem */
        }
        buf += w;
        n -= (size_t)w;
    }
}

/* What ring_pump returns for (its first item). */
enum {
    PUMP_READY = 1,   /* data arrived after the pipes were idle: nothing read yet (set the rank) */
    PUMP_WAKE = 3,    /* the wake fd is readable: a sync or stop request */
    PUMP_EOF = 4,     /* every writer of one pipe closed it */
    PUMP_REST = 5,    /* spilling: rest is what the lane had no room for */
    PUMP_FULL = 8,    /* the lane stayed full for wait_room seconds; nothing read */
    PUMP_TIMEOUT = 6, /* max_seconds in here, busy all along (the caller refreshes the rank) */
    PUMP_DRAINED = 7, /* drain_only: every pipe read until empty */
};

#define PUMP_MAX_PIPES 2
#define PUMP_RECORD (64u * 1024u)

typedef struct {
    int read_fd, terminal_fd, stream;
    ssize_t last_read;
    int emptied; /* the last read took less than it asked for: the pipe is empty now */
} pump_pipe;

static double seconds_since(const struct timespec *start) {
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    return (double)(now.tv_sec - start->tv_sec) + (double)(now.tv_nsec - start->tv_nsec) * 1e-9;
}

/* The payload size of the pump's records in this lane: one producer_append each. */
static uint64_t pump_record(seg_header *seg) {
    uint64_t max_chunk = seg->lane_bytes / 2 - REC_HEADER;
    return PUMP_RECORD < max_chunk ? PUMP_RECORD : max_chunk;
}

/* The most payload the pump's records can take in this lane right now, headers and padding
 * counted (the pump is the lane's only writer: room only grows until it appends). */
static uint64_t lane_payload_room(seg_header *seg, lane_header *lane) {
    uint64_t free_bytes = seg->lane_bytes - (atomic_load(&lane->tail) - atomic_load(&lane->head));
    uint64_t rec = pump_record(seg), unit = align8(REC_HEADER + rec);
    uint64_t room = free_bytes / unit * rec, left = free_bytes % unit;
    if (left >= REC_HEADER + 8) room += left - REC_HEADER - 7; /* a last, shorter record */
    return room;
}

static int64_t feed_append(ProducerObject *p, unsigned stream, const char *data, uint64_t n);

/* Read one pipe once, tee, append; without the GIL. With a producer and `wait_room` > 0 it reads
 * no more than the lane has room for (waiting up to `wait_room` seconds for some): what the
 * lane cannot take stays in the pipe, where the writer waits for it and the master finds it if
 * the process dies; nothing waits in this buffer. With
 * `wait_room` 0 (spilling) it reads all it can and returns what did not fit as PUMP_REST.
 * Returns the event that ends the pump, or 0 to go on. `pumps_appending` counts it while it
 * touches the segment: close() and release() wait, `wait_room` at most. */
static int pump_read(pump_pipe *pipe, Py_buffer *buf, ProducerObject *p, double wait_room,
                     ssize_t *n_out, int64_t *appended_out) {
    size_t want = (size_t)buf->len;
    *n_out = 0;
    if (p && wait_room > 0) {
        atomic_fetch_add(&pumps_appending, 1);
        uint64_t room = 0;
        int live = producer_live(p);
        if (live) {
            room = lane_payload_room(p->segment->hdr, p->lane);
            if (room == 0) {
                atomic_fetch_add(&p->lane->stalls, 1); /* the writer found its lane full */
                lane_wait_space(p->segment->hdr, p->lane, REC_HEADER + 4096, wait_room);
                room = lane_payload_room(p->segment->hdr, p->lane);
            }
        }
        atomic_fetch_sub(&pumps_appending, 1);
        if (live && room == 0) return PUMP_FULL;
        if (live && room < want) want = (size_t)room;
    }
    /* read, append and tee under the lock: one sequence with the hooks (fd mode's two paths) */
    if (p) producer_lock_nogil(p);
    ssize_t n;
    do {
        n = read(pipe->read_fd, buf->buf, want);
    } while (n < 0 && errno == EINTR);
    *n_out = n;
    pipe->last_read = n > 0 ? n : 0;
    pipe->emptied = n < (ssize_t)want;
    if (n <= 0) {
        if (p) producer_unlock(p);
        if (n < 0) return errno == EAGAIN ? 0 : PUMP_EOF; /* a read error ends the pipe too */
        return PUMP_EOF;
    }
    /* Into the lane first, then to the terminal (which may be slow): between the read and the
     * append the bytes are nowhere else, and a process may end at any moment. */
    int64_t appended = p ? feed_append(p, (unsigned)pipe->stream, buf->buf, (uint64_t)n) : -1;
    write_all(pipe->terminal_fd, buf->buf, (size_t)n);
    if (p) producer_unlock(p);
    *appended_out = appended;
    return appended >= 0 && appended < n ? PUMP_REST : 0;
}

/* Append bytes read from a pipe, as the pipes' thread, in records of at most PUMP_RECORD (the
 * drain takes a bounded bite of a lane per pass); the lock held, the GIL not needed. Returns the
 * bytes appended (fewer: the lane is full), -1 when the producer is detached. */
static int64_t feed_append(ProducerObject *p, unsigned stream, const char *data, uint64_t n) {
    int64_t appended = -1;
    uint16_t slot = p->feed_slot ? p->feed_slot : current_thread_slot();
    int32_t rank = atomic_load_explicit(&p->feed_rank, memory_order_relaxed);
    atomic_fetch_add(&pumps_appending, 1);
    uint64_t rec = pump_record(p->segment->hdr);
    for (uint64_t done = 0; done < n && producer_live(p);) {
        uint64_t chunk = n - done < rec ? n - done : rec;
        int64_t a = producer_append_as(p, stream, 0, data + done, chunk, slot, rank);
        if (a < 0) break;
        appended = (int64_t)(done += (uint64_t)a);
        if ((uint64_t)a < chunk) break; /* full */
    }
    atomic_fetch_sub(&pumps_appending, 1);
    return appended;
}

/* fd mode, the lock held, without the GIL: move what the pipes hold into the lane and to the
 * terminal, as the pump would, so that what a hook is about to write lands after it. No more than
 * the lane has room for: the rest stays in the pipe for the pump, which applies the overflow
 * policy (the order holds up to a full lane). */
static void producer_take_pipes(ProducerObject *p) {
    for (int s = 0; s < 2; s++) {
        int fd = p->feed_read[s];
        while (fd >= 0 && p->take_buf) {
            int held = 0;
            if (ioctl(fd, FIONREAD, &held) < 0 || held <= 0) break;
            atomic_fetch_add(&pumps_appending, 1);
            uint64_t room = producer_live(p) ? lane_payload_room(p->segment->hdr, p->lane) : 0;
            atomic_fetch_sub(&pumps_appending, 1);
            uint64_t want = (uint64_t)held < TAKE_BYTES ? (uint64_t)held : TAKE_BYTES;
            if (room < want) want = room;
            if (!want) break;
            ssize_t n;
            do {
                n = read(fd, p->take_buf, (size_t)want);
            } while (n < 0 && errno == EINTR);
            if (n <= 0) break;
            int64_t a = feed_append(p, (unsigned)s, p->take_buf, (uint64_t)n);
            write_all(p->feed_terminal[s], p->take_buf, (size_t)n);
            if (a < n) break;
        }
    }
}

/* fd mode's pump, without the GIL for as long as output streams in (a printing thread keeps its
 * GIL and its core): poll the pipes, read, copy to the terminal, append to the producer's lane
 * (None: copy only); pump_read says what happens when the lane is full. After a read of at
 * least `busy_read` bytes that emptied the pipe it sleeps `pause` seconds: someone printing flat
 * out fills the pipe meanwhile, and one read takes it all. It returns to Python for what needs
 * Python: data after an idle spell or at the start of a call that is not `fresh` (PUMP_READY,
 * before reading it, so that the rank read for it is not older than the data; Python reads the
 * rank, then calls again with `fresh`), a request on `wake_fd`, a pipe's end, a full lane
 * (PUMP_FULL, PUMP_REST), `max_seconds`. With drain_only it reads what every pipe held when it
 * was called (a sync; a writer that goes on writing cannot keep it here) and returns.
 * Returns (event, read_fd, rest): rest is what a PUMP_REST did not append, else None.
 * The pump is its lane's only writer in fd mode, so appending needs no GIL. */
static PyObject *ring_pump(PyObject *mod, PyObject *args) {
    PyObject *pipes_arg, *producer;
    int wake_fd, drain_only, fresh;
    Py_buffer buf;
    double wait_room, pause, max_seconds;
    Py_ssize_t busy_read;
    if (!PyArg_ParseTuple(args, "Oiw*Oddndpp", &pipes_arg, &wake_fd, &buf, &producer, &wait_room,
                          &pause, &busy_read, &max_seconds, &drain_only, &fresh))
        return NULL;
    pump_pipe pipes[PUMP_MAX_PIPES];
    Py_ssize_t npipes = 0;
    ProducerObject *p = NULL;
    PyObject *seq = PySequence_Fast(pipes_arg, "pipes must be a sequence");
    if (!seq) goto fail;
    npipes = PySequence_Fast_GET_SIZE(seq);
    if (npipes > PUMP_MAX_PIPES) {
        PyErr_SetString(PyExc_ValueError, "at most 2 pipes");
        Py_DECREF(seq);
        goto fail;
    }
    for (Py_ssize_t i = 0; i < npipes; i++) {
        pump_pipe *pp = &pipes[i];
        if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(seq, i), "iii", &pp->read_fd,
                              &pp->terminal_fd, &pp->stream)) {
            Py_DECREF(seq);
            goto fail;
        }
        if (pp->stream < 0 || pp->stream > 7) {
            PyErr_SetString(PyExc_ValueError, "stream must be 0..7");
            Py_DECREF(seq);
            goto fail;
        }
        pp->last_read = 0;
        pp->emptied = 0;
    }
    Py_DECREF(seq);
    if (producer != Py_None) {
        if (!PyObject_TypeCheck(producer, &Producer_Type)) {
            PyErr_SetString(PyExc_TypeError, "producer must be a Producer or None");
            goto fail;
        }
        p = (ProducerObject *)producer;
        /* what comes through the pipes carries the rank the pump thread was given for it */
        atomic_store_explicit(&p->feed_rank, thread_rank, memory_order_relaxed);
    }
    int event = 0, event_fd = -1;
    ssize_t n = 0;
    int64_t appended = -1;
    Py_BEGIN_ALLOW_THREADS
    struct timespec start;
    clock_gettime(CLOCK_MONOTONIC, &start);
    if (drain_only) {
        for (Py_ssize_t i = 0; i < npipes && !event; i++) {
            int held = 0;
            if (ioctl(pipes[i].read_fd, FIONREAD, &held) < 0) held = 0;
            for (ssize_t taken = 0; taken < held && !event; taken += n > 0 ? n : 0) {
                event = pump_read(&pipes[i], &buf, p, wait_room, &n, &appended);
                event_fd = pipes[i].read_fd;
                if (n <= 0) break;
            }
            if (event == PUMP_EOF) event = 0; /* the end shows again in a plain poll */
        }
        if (!event) event = PUMP_DRAINED;
    }
    while (!event) {
        struct pollfd fds[PUMP_MAX_PIPES + 1];
        for (Py_ssize_t i = 0; i < npipes; i++)
            fds[i] = (struct pollfd){pipes[i].read_fd, POLLIN, 0};
        fds[npipes] = (struct pollfd){wake_fd, POLLIN, 0};
        int ready = poll(fds, (nfds_t)npipes + 1, 0);
        if (ready == 0) {
            do {
                ready = poll(fds, (nfds_t)npipes + 1, -1);
            } while (ready < 0 && errno == EINTR);
            fresh = 0;
        }
        if (ready > 0 && !fresh && !(fds[npipes].revents & POLLIN)) {
            event = PUMP_READY; /* data, and the rank was read before it came */
            break;
        }
        fresh = 1; /* data found without a wait: the same spell as what came before */
        if (ready < 0) {
            if (errno == EINTR) continue;
            event = PUMP_WAKE; /* let Python look; poll itself failing is not expected */
            break;
        }
        if (fds[npipes].revents & POLLIN) {
            event = PUMP_WAKE;
            break;
        }
        int big = 0;
        for (Py_ssize_t i = 0; i < npipes && !event; i++) {
            if (!fds[i].revents) continue;
            event = pump_read(&pipes[i], &buf, p, wait_room, &n, &appended);
            event_fd = pipes[i].read_fd;
            /* a large read that emptied the pipe: someone prints flat out, let more collect.
             * One that took all it asked for left more behind: read again at once. */
            if (pipes[i].last_read >= busy_read && pipes[i].emptied) big = 1;
        }
        if (event) break;
        if (seconds_since(&start) >= max_seconds) {
            event = PUMP_TIMEOUT;
            break;
        }
        if (big && pause > 0) {
            struct timespec ts = {(time_t)pause, (long)((pause - (double)(time_t)pause) * 1e9)};
            nanosleep(&ts, NULL);
        }
    }
    Py_END_ALLOW_THREADS
    PyObject *rest;
    if (event == PUMP_REST)
        rest = PyBytes_FromStringAndSize((const char *)buf.buf + appended, n - appended);
    else
        rest = Py_NewRef(Py_None);
    PyBuffer_Release(&buf);
    if (!rest) return NULL;
    return Py_BuildValue("(iiN)", event, event_fd, rest);
fail:
    PyBuffer_Release(&buf);
    return NULL;
}

static PyMethodDef module_methods[] = {
    {"pump", ring_pump, METH_VARARGS,
     "pump(pipes, wake_fd, buffer, producer, wait_room, pause, busy_read, max_seconds, "
     "drain_only) -> (event, read_fd, rest): fd mode's pump, without the GIL while output "
     "streams in; pipes: ((read_fd, terminal_fd, stream), ...)"},
    {"format", ring_format, METH_VARARGS,
     "format(buffer, nlanes, lane_bytes, master_pid, master_start_us): lay out a new segment"},
    {"segment_size", ring_segment_size, METH_VARARGS, "segment_size(nlanes, lane_bytes) -> bytes"},
    {"set_thread_rank", ring_set_thread_rank, METH_O,
     "set_thread_rank(rank): the rank this thread's records carry (-1: the process's)"},
    {"thread_rank", ring_get_thread_rank, METH_NOARGS, "the rank this thread's records carry"},
    {"_stop_inside_next_record", ring_stop_inside_next_record, METH_O,
     "test hook: SIGSTOP this process inside its next record write, at stage 1 (header copied), "
     "2 (half the payload copied) or 3 (tail not yet published); 0: off"},
    {"fork_generation", ring_fork_generation, METH_NOARGS,
     "how many forks lie between this process and the one that loaded the module"},
    {NULL},
};

static struct PyModuleDef ring_module = {
    PyModuleDef_HEAD_INIT, "safe_redirect._ring",
    "Lock-free shared-memory lanes and the capturing write hook (see the layout in _ring.c).", -1,
    module_methods,
};

static int fork_handler_registered = 0;

PyMODINIT_FUNC PyInit__ring(void) {
    if (PyType_Ready(&Segment_Type) < 0 || PyType_Ready(&Producer_Type) < 0 ||
        PyType_Ready(&Hook_Type) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&ring_module);
    if (!m) return NULL;
#ifdef Py_GIL_DISABLED
    /* A free-threaded build (3.13t, 3.14t) turns the GIL on for this module: a lane's single
     * producer is "one C call holding the GIL", so the threads of one process need it. */
    if (PyUnstable_Module_SetGIL(m, Py_MOD_GIL_USED) < 0) goto fail;
#endif
    if (PyModule_AddType(m, &Segment_Type) < 0 || PyModule_AddType(m, &Producer_Type) < 0 ||
        PyModule_AddType(m, &Hook_Type) < 0)
        goto fail;
    if (PyModule_AddIntConstant(m, "SEG_HEADER", SEG_HEADER) < 0 ||
        PyModule_AddIntConstant(m, "LANE_HEADER", LANE_HEADER) < 0 ||
        PyModule_AddIntConstant(m, "REC_HEADER", REC_HEADER) < 0 ||
        PyModule_AddIntConstant(m, "MAX_LANES", MAX_LANES) < 0 ||
        PyModule_AddIntConstant(m, "MIN_LANE_BYTES", (long)MIN_LANE_BYTES) < 0 ||
        PyModule_AddIntConstant(m, "MAX_LANE_BYTES", (long)MAX_LANE_BYTES) < 0 ||
        PyModule_AddIntConstant(m, "LANE_FREE", LANE_FREE) < 0 ||
        PyModule_AddIntConstant(m, "LANE_ACTIVE", LANE_ACTIVE) < 0 ||
        PyModule_AddIntConstant(m, "LANE_CLOSED", LANE_CLOSED) < 0 ||
        PyModule_AddIntConstant(m, "FLAG_CONT", FLAG_CONT) < 0 ||
        PyModule_AddIntConstant(m, "FLAG_FLUSH", FLAG_FLUSH) < 0 ||
        PyModule_AddIntConstant(m, "FLAG_GAP", FLAG_GAP) < 0 ||
        PyModule_AddIntConstant(m, "KIND_TEXT", KIND_TEXT) < 0 ||
        PyModule_AddIntConstant(m, "KIND_BYTES", KIND_BYTES) < 0 ||
        PyModule_AddIntConstant(m, "KIND_FLUSH", KIND_FLUSH) < 0 ||
        PyModule_AddIntConstant(m, "KIND_BUFFER_FLUSH", KIND_BUFFER_FLUSH) < 0 ||
        PyModule_AddIntConstant(m, "KIND_RAW", KIND_RAW) < 0 ||
        PyModule_AddIntConstant(m, "PUMP_READY", PUMP_READY) < 0 ||
        PyModule_AddIntConstant(m, "PUMP_WAKE", PUMP_WAKE) < 0 ||
        PyModule_AddIntConstant(m, "PUMP_EOF", PUMP_EOF) < 0 ||
        PyModule_AddIntConstant(m, "PUMP_REST", PUMP_REST) < 0 ||
        PyModule_AddIntConstant(m, "PUMP_TIMEOUT", PUMP_TIMEOUT) < 0 ||
        PyModule_AddIntConstant(m, "PUMP_DRAINED", PUMP_DRAINED) < 0 ||
        PyModule_AddIntConstant(m, "PUMP_FULL", PUMP_FULL) < 0)
        goto fail;
    if (PyModule_AddObject(m, "SEG_MAGIC", PyLong_FromUnsignedLongLong(SEG_MAGIC)) < 0) goto fail;
    if (!fork_handler_registered) {
        if (pthread_atfork(NULL, NULL, after_fork_in_child) != 0) {
            PyErr_SetString(PyExc_OSError, "pthread_atfork failed");
            goto fail;
        }
        fork_handler_registered = 1;
    }
    return m;
fail:
    Py_DECREF(m);
    return NULL;
}
