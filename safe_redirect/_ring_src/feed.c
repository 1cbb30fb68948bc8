/* feed.c - fd mode's two paths into one lane, and the lock that keeps them one sequence.
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
 * never takes the GIL while holding the lock.
 *
 * Here: that lock, the staging of a buffered stream's captures, the moves from the pipes into
 * the lane and to the terminal that the pump (pump.c) and a hook taking the pipes share, and the
 * Producer methods that start and end fd mode for a lane (feed, unstage, unfeed).
 */
#include "internal.h"

#include <errno.h>
#include <sys/ioctl.h>
#include <unistd.h>

#define PUMP_RECORD (64u * 1024u) /* the most payload of one record from the pipes */
#define TAKE_BYTES (64u * 1024u)  /* the most a hook takes from a pipe in one read */

/* ---------------------------------------------------------------- the lock */

/* Without the GIL. */
void producer_lock_nogil(ProducerObject *p) {
    uint32_t c = 0;
    if (atomic_compare_exchange_strong(&p->lock, &c, 1u)) return;
    if (c != 2u) c = atomic_exchange(&p->lock, 2u);
    while (c != 0u) {
        futex_wait(&p->lock, 2u, 0.01);
        c = atomic_exchange(&p->lock, 2u);
    }
}

/* Holding the GIL: let it go while the lock is taken elsewhere. */
void producer_lock_gil(ProducerObject *p) {
    uint32_t c = 0;
    if (atomic_compare_exchange_strong(&p->lock, &c, 1u)) return;
    Py_BEGIN_ALLOW_THREADS
    producer_lock_nogil(p);
    Py_END_ALLOW_THREADS
}

void producer_unlock(ProducerObject *p) {
    if (atomic_exchange(&p->lock, 0u) == 2u) futex_wake_all(&p->lock);
}

/* Whether the pipe of `stream` holds bytes nobody has read yet: one ioctl. */
static int pipe_holds_bytes(ProducerObject *p, int stream) {
    int fd = p->feed_read[stream], held = 0;
    return fd >= 0 && ioctl(fd, FIONREAD, &held) == 0 && held > 0;
}

/* ---------------------------------------------------------------- staging */

/* Stage a captured write (lock held). A write of the thread that staged the last entry joins it:
 * one record per thread and flush instead of one per write, for the lane and for the drain.
 * -1: no memory (the caller appends it at once instead). */
int stage_add(ProducerObject *p, int s, const char *buf, uint64_t len, unsigned flags) {
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

/* ---------------------------------------------------------------- from the pipes into the lane */

void write_all(int fd, const char *buf, size_t n) {
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

/* The payload size of the pump's records in this lane: one producer_append each. */
static uint64_t pump_record(seg_header *seg) {
    uint64_t max_chunk = seg->lane_bytes / 2 - REC_HEADER;
    return PUMP_RECORD < max_chunk ? PUMP_RECORD : max_chunk;
}

/* The most payload the pump's records can take in this lane right now, headers and padding
 * counted (the pump is the lane's only writer: room only grows until it appends). */
uint64_t lane_payload_room(seg_header *seg, lane_header *lane) {
    uint64_t free_bytes = seg->lane_bytes - (atomic_load(&lane->tail) - atomic_load(&lane->head));
    uint64_t rec = pump_record(seg), unit = align8(REC_HEADER + rec);
    uint64_t room = free_bytes / unit * rec, left = free_bytes % unit;
    if (left >= REC_HEADER + 8) room += left - REC_HEADER - 7; /* a last, shorter record */
    return room;
}

/* Append bytes read from a pipe, as the pipes' thread, in records of at most PUMP_RECORD (the
 * drain takes a bounded bite of a lane per pass); the lock held, the GIL not needed. Returns the
 * bytes appended (fewer: the lane is full), -1 when the producer is detached. */
int64_t feed_append(ProducerObject *p, unsigned stream, const char *data, uint64_t n) {
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

/* Lock held, GIL held: what the pipes hold goes first, then what is staged for stream s. */
stage_left take_then_move(ProducerObject *p, int s) {
    if (pipe_holds_bytes(p, s)) {
        Py_BEGIN_ALLOW_THREADS
        producer_take_pipes(p);
        Py_END_ALLOW_THREADS
    }
    return stage_move(p, s);
}

/* ---------------------------------------------------------------- fd mode on, off */

/* fd mode: the pipes that feed this lane, their saved terminals (-1 where a stream is not
 * captured). From now on the hooks and the pump share the lane (see the top of this file). */
PyObject *Producer_feed(ProducerObject *self, PyObject *args) {
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
PyObject *Producer_unstage(ProducerObject *self, PyObject *unused) {
    if (!producer_feeding(self) || !producer_of_this_process(self)) Py_RETURN_NONE;
    producer_lock_gil(self);
    for (int s = 0; s < 2; s++) unstage_stream(self, s);
    producer_unlock(self);
    Py_RETURN_NONE;
}

/* fd mode ends for `stream` (-1: both), before its pipe's read end and its saved terminal
 * close: what is staged for it goes into the lane first, and the hooks write through again.
 * The lane must never hold an fd number after its owner closed it (the number is reused). */
PyObject *Producer_unfeed(ProducerObject *self, PyObject *args) {
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

