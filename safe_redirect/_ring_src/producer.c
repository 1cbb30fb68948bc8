/* producer.c - Producer: the writing end of one lane, and the append that copies a write into it
 * as records. A Producer is made by Segment.producer(lane) once its process claimed the lane;
 * what the Python code does when the lane is full (wait_space, spill, count) comes back here.
 *
 * Single producer per lane: a lane belongs to one process, and a record is written by one C call
 * that holds the GIL from the space check to the publish of tail, so threads of one process need
 * no lock. In fd mode a lane has two writers in its process: the write hooks (Python-level
 * writes, with the GIL) and the pump thread (what reached the pipes on fds 1 and 2, without the
 * GIL); a lock of the Producer object, in process memory, serialises them (see feed.c). It is
 * never shared with another process, and a forked child makes producers of its own, so a fork
 * cannot leave it held where it is used.
 */
#include "internal.h"

#include <signal.h>

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

/* Test hook (tests/reliability/kill.py): stop this process with SIGSTOP inside its next record
 * write, at stage 1 (the header is copied), 2 (half the payload is copied) or 3 (all is copied
 * and counted, tail not yet published), so that a test can SIGKILL a writer at an exact point of
 * a write. 0, the only value outside such a test, costs one predictable branch per write.
 * stop_inside_next_record is set by the module function _stop_inside_next_record (module.c). */
static void stop_here_if(int stage) {
    if (stop_inside_next_record != stage) return;
    stop_inside_next_record = 0;
    raise(SIGSTOP);
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

PyObject *Segment_producer(SegmentObject *self, PyObject *arg) {
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

PyObject *Segment_placeholder(SegmentObject *self, PyObject *unused) {
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

/* Returns bytes published, or -1 when the producer is detached. In fd mode the caller holds
 * the lock. */
int64_t producer_append_as(ProducerObject *p, unsigned stream, unsigned flags, const char *buf,
                           uint64_t len, uint16_t slot, int32_t rank) {
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
int lane_wait_space(seg_header *seg, lane_header *lane, uint64_t need, double timeout) {
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

PyTypeObject Producer_Type = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "safe_redirect._ring.Producer",
    .tp_basicsize = sizeof(ProducerObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "The writing end of one lane, made by Segment.producer().",
    .tp_dealloc = (destructor)Producer_dealloc,
    .tp_methods = Producer_methods,
    .tp_getset = Producer_getset,
};

