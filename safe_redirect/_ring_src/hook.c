/* hook.c - Hook, the capturing writer: the path every captured print takes, from the stream's
 * `write` through the writer it replaced into the lane (producer.c's append, inline), and in fd
 * mode the write to the saved terminal at the bottom of a stream (KIND_RAW). The per-thread state
 * that only hooks read (text_depth, raw_writes) lives here too.
 */
#include "internal.h"

#include <errno.h>
#include <pythread.h>
#include <unistd.h>

/* How deep this thread is inside a hooked text-layer call. TextIOWrapper hands its encoded bytes to
 * `buffer.write` through a normal attribute lookup, so a hooked buffer would see them a second time. */
static _Thread_local int text_depth = 0;

/* How many writes this thread made to a terminal through a KIND_RAW hook: a hook compares it
 * around the call it stands in for, to know that the pipes were just taken (fd mode). */
static _Thread_local unsigned long raw_writes = 0;

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
            /* a buffered stream: the record waits with the bytes (see feed.c) */
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

PyTypeObject Hook_Type = {
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

