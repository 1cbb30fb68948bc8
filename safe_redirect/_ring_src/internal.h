/* internal.h - what the units of safe_redirect._ring share: the Python objects Segment and
 * Producer, the state of this process and of each thread, and the functions one unit calls in
 * another. Built as one extension (pyproject.toml lists every unit); nothing here is exported from
 * the shared object, only PyInit__ring is (module.c).
 *
 * The units, one concept each:
 *   layout.h    the bytes of a segment and the lock-free primitives on them (no Python)
 *   segment.c   Segment: formatting, claiming lanes, the consumer's reads and waits
 *   producer.c  Producer: the writing end of one lane, appends records, counts, closes
 *   feed.c      fd mode's two paths: the lock the hooks and the pump share, staging, the pipes
 *   hook.c      Hook: the callable that stands in for a stream's write and captures it
 *   pump.c      fd mode's pump: the thread that moves the pipes' bytes to the lane and terminal
 *   module.c    process-wide and per-thread state, the fork handler, module functions, PyInit
 */
#ifndef SAFE_REDIRECT_RING_INTERNAL_H
#define SAFE_REDIRECT_RING_INTERNAL_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include "layout.h"

/* Every declaration below binds inside the shared object: direct calls, no PLT, not exported. */
#pragma GCC visibility push(hidden)

/* What a Hook stands in for (Hook(kind=...)). */
#define KIND_TEXT 0
#define KIND_BYTES 1
#define KIND_FLUSH 2
#define KIND_BUFFER_FLUSH 3 /* a buffer's flush: a no-op for us inside a text-layer call */
#define KIND_RAW 4 /* fd mode: the FileIO write at the bottom of a stream, aimed at the terminal */

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

/* ---------------------------------------------------------------- process and thread state
 * (defined in module.c) */

/* Bumped in every child right after fork(), before any Python code runs there, also for forks
 * made by C libraries that skip Python's own fork handlers. The write hook compares it with the
 * generation its producer was made in: one load instead of a getpid() system call. */
extern _Atomic uint64_t fork_generation;

/* This thread's number in the records it writes; 0 until its first write. */
extern _Thread_local uint16_t thread_slot;
extern _Atomic uint32_t next_thread_slot;

/* This thread's rank, for launchers whose ranks are threads of one process; -1: the process's. */
extern _Thread_local int32_t thread_rank;

static inline uint16_t current_thread_slot(void) {
    if (!thread_slot) thread_slot = (uint16_t)(atomic_fetch_add(&next_thread_slot, 1) % 65535u + 1);
    return thread_slot;
}

/* fd pumps of this process inside an append without the GIL (pump.c, feed.c): Producer.close()
 * and Segment.release() wait until there is none. Per process, not per segment, so that the
 * fork handler can zero it: a child has no pump thread, whatever the count said at the fork. */
extern _Atomic int pumps_appending;

/* Wait until no fd pump of this process is inside an append: a bounded copy, microseconds.
 * Callers first make sure that no new append starts. */
void wait_for_pumps(void);

/* Test hook (tests/reliability/kill.py): stop this process with SIGSTOP inside its next record
 * write (see ring_append in producer.c); 0, the only value outside such a test, is off. */
extern int stop_inside_next_record;

/* ---------------------------------------------------------------- the Python objects */

extern PyTypeObject Segment_Type;
extern PyTypeObject Producer_Type;
extern PyTypeObject Hook_Type;

typedef struct {
    PyObject_HEAD
    Py_buffer view; /* keeps the mapping alive and pinned while we point into it */
    int has_view;
    char *base;
    seg_header *hdr;
    _Atomic int releasing; /* release() began: pumps append nothing more */
} SegmentObject;

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
    /* fd mode (see feed.c): the pipes that feed this lane besides the hooks */
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

/* ---------------------------------------------------------------- segment.c */

/* 1 if the segment still holds its buffer, else 0 with ValueError set. */
int segment_ready(SegmentObject *self);
/* Lane i, or NULL with IndexError (ValueError: released) set. */
lane_header *segment_lane(SegmentObject *self, long i);
PyObject *ring_format(PyObject *mod, PyObject *args);
PyObject *ring_segment_size(PyObject *mod, PyObject *args);

/* ---------------------------------------------------------------- producer.c */

PyObject *Segment_producer(SegmentObject *self, PyObject *arg);
PyObject *Segment_placeholder(SegmentObject *self, PyObject *unused);

static inline int producer_live(ProducerObject *p) {
    return p->lane && !p->detached && p->segment->has_view &&
           !atomic_load(&p->segment->releasing);
}

/* Returns bytes published, or -1 when the producer is detached. In fd mode the caller holds
 * the lock. Written by thread `slot` of rank `rank`. */
int64_t producer_append_as(ProducerObject *p, unsigned stream, unsigned flags, const char *buf,
                           uint64_t len, uint16_t slot, int32_t rank);

/* The same, written by the calling thread (inline: every hooked write comes this way). */
static inline int64_t producer_append(ProducerObject *p, unsigned stream, unsigned flags,
                                      const char *buf, uint64_t len) {
    return producer_append_as(p, stream, flags, buf, len, current_thread_slot(), thread_rank);
}

/* Without the GIL: sleep until the consumer frees `need` bytes of room in this lane, or `timeout`
 * seconds pass. Returns 1 when the room is there. */
int lane_wait_space(seg_header *seg, lane_header *lane, uint64_t need, double timeout);

/* ---------------------------------------------------------------- feed.c */

#define STAGE_MAX (64u * 1024u) /* more staged than a stream buffers: a stream we do not see flush */

typedef struct {
    uint32_t len;
    uint16_t slot;
    uint8_t flags, pad;
    int32_t rank;
} stage_entry;

/* What a full lane left of the staged entries: the caller (lock released, GIL held) hands it to
 * the overflow policy, entry by entry, as the thread that wrote it. */
typedef struct {
    char *buf;       /* owned; NULL if nothing is left */
    size_t len, pos; /* entries from `pos` on */
    uint64_t done;   /* bytes of the entry at `pos` already appended */
} stage_left;

static inline int producer_feeding(ProducerObject *p) {
    return p->feed_read[0] >= 0 || p->feed_read[1] >= 0;
}

void producer_lock_nogil(ProducerObject *p);
void producer_lock_gil(ProducerObject *p);
void producer_unlock(ProducerObject *p);
int stage_add(ProducerObject *p, int s, const char *buf, uint64_t len, unsigned flags);
stage_left take_then_move(ProducerObject *p, int s);
/* what the pump and a hook taking the pipes share */
void write_all(int fd, const char *buf, size_t n);
uint64_t lane_payload_room(seg_header *seg, lane_header *lane);
int64_t feed_append(ProducerObject *p, unsigned stream, const char *data, uint64_t n);
PyObject *Producer_feed(ProducerObject *self, PyObject *args);
PyObject *Producer_unstage(ProducerObject *self, PyObject *unused);
PyObject *Producer_unfeed(ProducerObject *self, PyObject *args);

/* ---------------------------------------------------------------- pump.c */

PyObject *ring_pump(PyObject *mod, PyObject *args);

#pragma GCC visibility pop

#endif /* SAFE_REDIRECT_RING_INTERNAL_H */
