"""What every benchmark section shares: the run settings, timing, rows and the markdown table.

A section is a module with `TITLE` (one line) and `run(settings) -> Section`. It measures and reports;
it never asserts on a time.
"""
import os
import platform
import resource
import statistics
import subprocess
import threading
import time
from dataclasses import dataclass, field
from importlib import metadata
from typing import Callable, List, Optional


@dataclass
class Settings:
    """What the command line chose, handed to every section."""

    quick: bool = False     # smaller sizes and fewer repetitions (the smoke test)
    threads: int = 1        # CPU threads of MindSpore's kernels and of torch (the same number)
    reps: int = 20          # timed repetitions of a fast call (a decode step); the median is reported
    slow_reps: int = 5      # timed repetitions of a slow call (a prefill)
    warmup: int = 5         # untimed calls before timing: the first compiles a graph, and MindSpore's
    #                         next ~4 calls of a new graph still run ~30% slower than the steady state


@dataclass
class Row:
    name: str                   # stable: tests look rows up by it
    value: float
    unit: str                   # "ms", "ms/token", "GB/s", "x", ...
    reps: Optional[int] = None  # timed repetitions behind a median; None for derived rows
    notes: str = ""
    minimum: Optional[float] = None  # fastest of the timed repetitions (same unit), when timed

    @classmethod
    def timed(cls, name, timing, unit, notes=""):
        """A row of a measured time, in milliseconds."""
        return cls(name, timing.ms, unit, timing.reps, notes, timing.min_s * 1e3)


@dataclass
class Section:
    name: str
    rows: List[Row] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)  # printed under the table
    config: List[str] = field(default_factory=list)  # printed above the table (sizes used)


@dataclass
class Timing:
    median_s: float
    min_s: float
    first_s: float  # the first warm-up call (graph compilation included)
    reps: int

    @property
    def ms(self):
        return self.median_s * 1e3


def time_call(fn: Callable[[], object], reps: int, warmup: int = 5,
              before_each: Optional[Callable[[], object]] = None) -> Timing:
    """Median wall time of `fn()` over `reps` calls after `warmup` untimed calls.

    `fn` must block until its result is ready (call `.asnumpy()` on a MindSpore output).
    `before_each` runs untimed before every call (e.g. to reset a cache).
    """
    first = None
    for _ in range(max(warmup, 1)):
        if before_each is not None:
            before_each()
        start = time.perf_counter()
        fn()
        if first is None:
            first = time.perf_counter() - start
    times = []
    for _ in range(reps):
        if before_each is not None:
            before_each()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return Timing(statistics.median(times), min(times), first, reps)


def _version(dist):
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def cpu_model():
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def environment_lines(settings: Settings, extra=()):
    """The markdown bullet list printed above the table."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count()
    versions = ", ".join(f"{name} {_version(name)}" for name in
                         ("mindspore", "mindformers", "torch", "transformers", "numpy"))
    lines = [
        f"- machine: {cpu_model()}, {cores} usable cores, {platform.system()} {platform.release()}",
        f"- python {platform.python_version()}; {versions}",
        f"- threads: MindSpore CPU kernels {settings.threads}, torch intra-op {settings.threads}",
        f"- mode: {'--quick (small sizes, few repetitions)' if settings.quick else 'full'}; "
        f"median of {settings.reps} (decode) / {settings.slow_reps} (prefill) timed calls "
        f"after {settings.warmup} untimed warm-up calls",
    ]
    return lines + list(extra)


class OtherLoad:
    """How many cores other processes kept busy between start() and stop(), from /proc/stat minus this
    process's own CPU time and that of its finished subprocesses (Linux; None elsewhere). Near the thread
    count = the timings are inflated."""

    def _sample(self):
        try:
            with open("/proc/stat", encoding="utf-8") as f:
                fields = [int(v) for v in f.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        busy = sum(fields) - fields[3] - (fields[4] if len(fields) > 4 else 0)  # minus idle and iowait
        own = resource.getrusage(resource.RUSAGE_SELF)
        kids = resource.getrusage(resource.RUSAGE_CHILDREN)  # subprocesses a section ran (and waited for)
        return (busy / os.sysconf("SC_CLK_TCK"), own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime,
                time.perf_counter())

    def start(self):
        self.first = self._sample()
        return self

    def stop(self):
        """Average number of cores busy with other processes, or None."""
        last = self._sample()
        if self.first is None or last is None:
            return None
        busy, own, wall = (b - a for a, b in zip(self.first, last))
        return max(busy - own, 0.0) / wall if wall > 0 else None


def _fmt(value):
    if value is None:
        return "-"
    if abs(value) >= 100:
        return f"{value:.1f}"
    if abs(value) >= 1:
        return f"{value:.2f}"
    return f"{value:.3f}"


def markdown_table(sections: List[Section]):
    lines = ["| Section | Benchmark | Median | Min | Unit | N | Notes |",
             "| --- | --- | ---: | ---: | --- | ---: | --- |"]
    for section in sections:
        for row in section.rows:
            reps = "-" if row.reps is None else str(row.reps)
            lines.append(f"| {section.name} | {row.name} | {_fmt(row.value)} | {_fmt(row.minimum)} | {row.unit} "
                         f"| {reps} | {row.notes} |")
    return lines


class AnonPeak:
    """Peak RssAnon / VmHWM of a process, sampled from /proc/<pid>/status every `interval` seconds."""

    def __init__(self, pid, interval=0.05):
        self.pid, self.interval = pid, interval
        self.rss_anon = self.hwm = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _sample(self):
        try:
            with open(f"/proc/{self.pid}/status", encoding="utf-8") as f:
                fields = dict(line.split(":", 1) for line in f if ":" in line)
        except OSError:
            return
        kb = lambda key: int(fields.get(key, "0 kB").split()[0]) * 1024  # noqa: E731
        self.rss_anon = max(self.rss_anon, kb("RssAnon"))
        self.hwm = max(self.hwm, kb("VmHWM"))

    def _run(self):
        while not self._stop.is_set():
            self._sample()
            time.sleep(self.interval)

    def stop(self):
        self._stop.set()
        self._thread.join()
        return self


def run_child(command, work, name, env=None):
    """(exit status, stdout, stderr, seconds, AnonPeak) of a child process run in `work` (`env`: variables to
    add to this process's)."""
    env = dict(os.environ, LOCAL_DEFAULT_PATH=str(work / "log"), **(env or {}))
    with open(work / f"{name}.out", "w") as out, open(work / f"{name}.err", "w") as err:
        start = time.perf_counter()
        child = subprocess.Popen(command, cwd=work, env=env, stdout=out, stderr=err, stdin=subprocess.DEVNULL)
        peak = AnonPeak(child.pid)
        status = child.wait()
        seconds = time.perf_counter() - start
        peak.stop()
    return status, (work / f"{name}.out").read_text(), (work / f"{name}.err").read_text(), seconds, peak
