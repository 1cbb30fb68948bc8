/* module.c - the module safe_redirect._ring: the state of this process and of each thread that
 * the other units share, the fork handler that keeps it true in a child, the module-level
 * functions and PyInit__ring, the one symbol the extension exports.
 *
 * The module is the lock-free shared-memory transport and the write hook of safe_redirect. No
 * policy lives here: it moves bytes and reports what it could not move; what to do about a full
 * lane or a fork is decided by the Python code that calls it (ring.py is its Python face). Each
 * concept has a unit of its own; internal.h lists them.
 */
#include "internal.h"

#include <pthread.h>
#include <sched.h>

/* ---------------------------------------------------------------- process and thread state
 * (what each is for: internal.h) */

_Atomic uint64_t fork_generation = 0;
_Thread_local uint16_t thread_slot = 0;
_Atomic uint32_t next_thread_slot = 0;
_Thread_local int32_t thread_rank = -1;
_Atomic int pumps_appending = 0;
int stop_inside_next_record = 0;

/* In a child, before any Python code runs there (pthread_atfork, registered by PyInit). */
static void after_fork_in_child(void) {
    atomic_fetch_add(&fork_generation, 1);
    atomic_store(&pumps_appending, 0);
}

void wait_for_pumps(void) {
    while (atomic_load(&pumps_appending)) {
        Py_BEGIN_ALLOW_THREADS
        sched_yield();
        Py_END_ALLOW_THREADS
    }
}

/* ---------------------------------------------------------------- module functions */

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

/* ---------------------------------------------------------------- the module */

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
    "Lock-free shared-memory lanes and the capturing write hook (layout: _ring_src/layout.h).", -1,
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
