/* layout.h - the bytes of a segment, as every process that maps it sees them, and the lock-free
 * primitives on them (ring copies, futex words). Plain C, no Python: what another process may
 * read or write is all here, so that a change to the layout is made in one place.
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
 *     72  u64 reader_pid     a job's segment (job.py, written from Python): the member that
 *     80  u64 reader_start   reads now and its start time; 0 when none. Unused by the C core.
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
 */
#ifndef SAFE_REDIRECT_RING_LAYOUT_H
#define SAFE_REDIRECT_RING_LAYOUT_H

#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <time.h>
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

/* ---------------------------------------------------------------- raw ring operations */

static inline uint64_t align8(uint64_t n) { return (n + 7u) & ~(uint64_t)7u; }

static inline lane_header *lane_at(char *base, uint64_t lane_bytes, uint32_t i) {
    return (lane_header *)(base + SEG_HEADER + (uint64_t)i * (LANE_HEADER + lane_bytes));
}

static inline char *lane_data(lane_header *lane) { return (char *)lane + LANE_HEADER; }

static inline void ring_copy_in(char *data, uint64_t cap, uint64_t pos, const char *src,
                                uint64_t n) {
    uint64_t at = pos & (cap - 1), first = cap - at;
    if (n <= first) {
        memcpy(data + at, src, n);
    } else {
        memcpy(data + at, src, first);
        memcpy(data, src + first, n - first);
    }
}

static inline void ring_copy_out(const char *data, uint64_t cap, uint64_t pos, char *dst,
                                 uint64_t n) {
    uint64_t at = pos & (cap - 1), first = cap - at;
    if (n <= first) {
        memcpy(dst, data + at, n);
    } else {
        memcpy(dst, data + at, first);
        memcpy(dst + first, data, n - first);
    }
}

/* ---------------------------------------------------------------- futex words */

static inline void futex_wake_all(_Atomic uint32_t *word) {
#ifdef __linux__
    syscall(SYS_futex, (uint32_t *)word, FUTEX_WAKE, INT32_MAX, NULL, NULL, 0);
#else
    (void)word;
#endif
}

/* Sleep while *word == seq, at most `timeout` seconds; the caller holds no GIL. Without futexes
 * (not Linux) it just sleeps: polling, bounded by the timeout. */
static inline void futex_wait(_Atomic uint32_t *word, uint32_t seq, double timeout) {
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

/* Wake the consumer: bump the segment's doorbell. */
static inline void ring_bell(seg_header *seg) {
    atomic_fetch_add(&seg->bell, 1);
    futex_wake_all(&seg->bell);
}

#endif /* SAFE_REDIRECT_RING_LAYOUT_H */
