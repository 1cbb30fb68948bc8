from collections.abc import Callable

SEG_MAGIC: int
SEG_HEADER: int
LANE_HEADER: int
REC_HEADER: int
MAX_LANES: int
MIN_LANE_BYTES: int
MAX_LANE_BYTES: int
LANE_FREE: int
LANE_ACTIVE: int
LANE_CLOSED: int
FLAG_CONT: int
FLAG_FLUSH: int
FLAG_GAP: int
KIND_TEXT: int
KIND_BYTES: int
KIND_FLUSH: int
KIND_BUFFER_FLUSH: int

def format(
    buffer: object, nlanes: int, lane_bytes: int, master_pid: int, master_start: int, /
) -> None: ...
def segment_size(nlanes: int, lane_bytes: int, /) -> int: ...
def fork_generation() -> int: ...
def _stop_inside_next_record(stage: int, /) -> None: ...
def set_thread_rank(rank: int, /) -> None: ...
def thread_rank() -> int: ...
PUMP_READY: int
PUMP_WAKE: int
PUMP_EOF: int
PUMP_REST: int
PUMP_TIMEOUT: int
PUMP_DRAINED: int
PUMP_FULL: int

def pump(
    pipes: list[tuple[int, int, int]], wake_fd: int, buffer: object, producer: Producer | None,
    wait_room: float, pause: float, busy_read: int, max_seconds: float, drain_only: bool,
    fresh: bool, /,
) -> tuple[int, int, bytes | None]: ...

class Segment:
    nlanes: int
    lane_bytes: int
    master_pid: int
    master_start: int
    closed: int
    lane_misses: int
    released: bool
    def __init__(self, buffer: object, /) -> None: ...
    def claim(
        self, pid: int, start_us: int, rank: int, name: bytes = b"", stdout_pipe_fd: int = -1,
        stderr_pipe_fd: int = -1, count_miss: bool = True, /,
    ) -> int: ...
    def placeholder(self) -> Producer: ...
    def producer(self, lane: int, /) -> Producer: ...
    def busy_lanes(self) -> list[int]: ...
    def lanes_with_data(self) -> int: ...
    def lane_info(
        self, lane: int, /
    ) -> tuple[int, int, int, int, int, int, int, int, int, int, int, bytes, tuple[int, int]]: ...
    def read(
        self, lane: int, max_bytes: int, join_gap_ns: int = 0, /
    ) -> list[tuple[int, int, int, bytes, int, int]]: ...
    def free(self, lane: int, /) -> None: ...
    def wait(self, timeout: float, /) -> bool: ...
    def wake(self) -> None: ...
    def pause(self, timeout: float, /) -> None: ...
    def ack_pipes(self, lane: int, /) -> None: ...
    def mark_closed(self) -> None: ...
    def release(self) -> None: ...

class Producer:
    lane: int
    segment: Segment
    generation: int
    live: bool
    head: int
    progress: int
    pipes_acked: bool
    def append(self, stream: int, flags: int, data: bytes | bytearray | memoryview, /) -> int: ...
    def wait_space(self, need: int, timeout: float, /) -> bool: ...
    def count(self, spilled_records: int, spilled_bytes: int, stalls: int, /) -> None: ...
    def spilled(self, stream: int, line_ended: bool, /) -> None: ...
    def close(self) -> None: ...

class Hook:
    target: Callable[..., object]
    producer: Producer | None
    skip_thread: int
    host_thread: int
    stream: int
    kind: int
    def __init__(
        self,
        target: Callable[..., object],
        producer: Producer | None,
        stream: int,
        kind: int,
        on_fork: Callable[[Hook], object],
        on_full: Callable[[Hook, int, bytes], object],
    ) -> None: ...
    def __call__(self, *args: object, **kwargs: object) -> object: ...
