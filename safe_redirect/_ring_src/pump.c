/* pump.c - fd mode's pump: the loop of the thread that reads the pipes on fds 1 and 2, appends
 * what it reads to the process's lane and copies it to the terminal, without the GIL while output
 * streams in. It returns to Python only for what needs Python (a rank to read, a full lane, a
 * request, a pipe's end). The moves it shares with the hooks, and the lock, are in feed.c.
 */
#include "internal.h"

#include <errno.h>
#include <poll.h>
#include <sys/ioctl.h>
#include <unistd.h>

#define PUMP_MAX_PIPES 2

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
PyObject *ring_pump(PyObject *mod, PyObject *args) {
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

