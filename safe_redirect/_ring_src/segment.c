/* segment.c - Segment: one mapped segment as the Python code sees it. Laying out a new one
 * (format), attaching to one, claiming and freeing lanes, and the consumer's side of every lane:
 * reading the published records, waking a producer that waits for room, sleeping on the doorbell
 * until a producer publishes. The producer's side of a lane is in producer.c.
 */
#include "internal.h"

/* futex_wait (layout.h) with the GIL released. */
static void futex_wait_released(_Atomic uint32_t *word, uint32_t seq, double timeout) {
    Py_BEGIN_ALLOW_THREADS
    futex_wait(word, seq, timeout);
    Py_END_ALLOW_THREADS
}

int segment_ready(SegmentObject *self) {
    if (!self->has_view) {
        PyErr_SetString(PyExc_ValueError, "segment is released");
        return 0;
    }
    return 1;
}

lane_header *segment_lane(SegmentObject *self, long i) {
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

PyObject *ring_format(PyObject *mod, PyObject *args) {
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

PyObject *ring_segment_size(PyObject *mod, PyObject *args) {
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

PyTypeObject Segment_Type = {
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
