"""Request batching: concurrent requests are queued and generated together, up to max_batch_size rows.

One worker thread owns the model. It takes the oldest waiting job, adds the waiting jobs that can share
its batch (the same sampling settings; a seeded request runs alone, its random draws being its own; the
longest prompt plus the largest max_tokens fits the context), and runs them as one generation batch
through `inference.generate_batch`. The generator's per-row stop and padding make every row's tokens
the ones it gets alone. A batch is padded to a power of two rows (copies of its last row, finished at
once) so that few graph shapes are compiled. Per row, as its tokens come: its text is handed to the
waiting request (streamed as deltas), and the row is finished early when it reaches its own max_tokens,
produces one of its stop strings, or its client went away.

A full queue (max_queue jobs waiting) refuses new jobs: the server answers 429.
"""
import collections
import itertools
import logging
import threading
import time
from dataclasses import dataclass, field, replace
from typing import List, Optional

from ..generation.generator import PromptRow
from ..generation.sampling import GenerationConfig
from ..generation.streamer import TextDeltas
from ..inference import ChatRequest, assemble_batch, generate_batch, with_family_stops
from .errors import APIError

log = logging.getLogger("visual_mllm.serve")


@dataclass
class Completion:
    text: str
    token_ids: List[int]
    prompt_tokens: int
    finish_reason: str  # "stop" (end token, stop sequence or stop text) or "length"


@dataclass
class Job:
    """One chat completion request on its way through the batcher.

    on_event(kind, value) is called from the worker thread: ("delta", text) as the answer grows (when
    `stream`), then ("done", Completion) or ("error", APIError).
    """

    id: str
    request: ChatRequest
    row: PromptRow
    pixels: object                     # [3,H,W] or None
    kept_history: list
    config: GenerationConfig           # max_new_tokens = this request's max_tokens
    on_event: object
    stream: bool = False
    stop_texts: List[str] = field(default_factory=list)
    cancelled: bool = False            # set when the client went away: the row is finished at the next step
    # filled in by the worker
    ids: List[int] = field(default_factory=list)
    stop_index: Optional[int] = None   # where a stop text begins in the answer
    sent: str = ""
    deltas: Optional[TextDeltas] = None

    def batch_key(self):
        """Jobs with the same key can share a batch (a seeded job's key is its own)."""
        c = self.config
        return (c.do_sample, c.temperature, c.top_k, c.top_p, c.repetition_penalty,
                self.id if c.seed is not None else None)

    def finished(self):
        return self.cancelled or self.stop_index is not None or len(self.ids) >= self.config.max_new_tokens


def bucket(rows, max_batch_size):
    """The batch size run for `rows` rows: the next power of two, at most max_batch_size."""
    size = 1
    while size < rows:
        size *= 2
    return min(size, max(max_batch_size, rows))


class Rows:
    """The generator's streamer hook for one batch: follows each job's answer and says which rows are done."""

    def __init__(self, jobs, processor, holdback, padding):
        self.jobs = jobs
        self.processor = processor
        self.padding = padding  # rows past the jobs: copies, finished at once
        for job in jobs:
            job.deltas = TextDeltas(self.renderer(job), holdback)

    def renderer(self, job):
        return lambda ids: self.processor.decode_response(job.row.ids, ids, job.request.english)

    def put(self, tokens):
        for job, token in zip(self.jobs, tokens):
            if token < 0 or job.finished():
                continue
            job.ids.append(int(token))
            if job.stop_texts:
                self.find_stop(job, job.deltas.render(job.ids))
            if job.stream and job.deltas.add(token):
                self.send(job, job.deltas.text)

    @staticmethod
    def find_stop(job, text):
        found = [i for i in (text.find(stop) for stop in job.stop_texts) if i >= 0]
        if found:
            job.stop_index = min(found)

    @staticmethod
    def send(job, text, final=False):
        """Hand out the part of `text` past what was sent, keeping back what may begin a stop text."""
        if job.stop_index is not None:
            text = text[:job.stop_index]
        elif not final and job.stop_texts:
            text = text[:max(len(job.sent), len(text) - max(map(len, job.stop_texts)) + 1)]
        if text.startswith(job.sent) and len(text) > len(job.sent):
            job.on_event("delta", text[len(job.sent):])
            job.sent = text

    def end(self):
        pass

    def cancelled(self):
        done = [b for b, job in enumerate(self.jobs) if job.finished()]
        return done + list(range(len(self.jobs), len(self.jobs) + self.padding))


class Batcher:
    def __init__(self, model, processor, max_batch_size, max_queue, batch_window_s=0.01):
        self.model = model
        self.processor = processor
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.batch_window_s = batch_window_s
        self.seq_length = model.config.seq_length
        self.waiting = collections.deque()
        self.condition = threading.Condition()
        self.stats = {"batches": 0, "rows": 0, "largest_batch": 0, "batch_sizes": {}, "completed": 0,
                      "cancelled": 0, "failed": 0}
        self._thread = threading.Thread(target=self._work, name="visual_mllm-batcher", daemon=True)
        self._thread.start()

    def submit(self, job):
        with self.condition:
            if len(self.waiting) >= self.max_queue:
                raise APIError(429, f"the server is busy: {len(self.waiting)} requests are waiting (the queue holds "
                                    f"{self.max_queue}); retry shortly", code="queue_full",
                               headers={"Retry-After": "1"})
            self.waiting.append(job)
            self.condition.notify()

    def cancel(self, job):
        """The client went away: drop the job if it still waits, else finish its row at the next step."""
        job.cancelled = True
        with self.condition:
            if job in self.waiting:
                self.waiting.remove(job)
                self.stats["cancelled"] += 1
                log.info("%s: cancelled while waiting", job.id)

    def _take(self):
        """The next batch of jobs (blocks until there is one)."""
        with self.condition:
            while not self.waiting:
                self.condition.wait()
        if self.batch_window_s and len(self.waiting) < self.max_batch_size:
            time.sleep(self.batch_window_s)  # let requests sent at the same time join the batch
        with self.condition:
            first = self.waiting.popleft()
            jobs = [first]
            longest, most = len(first.row.ids), first.config.max_new_tokens
            for job in list(self.waiting):
                if len(jobs) == self.max_batch_size:
                    break
                fits = max(longest, len(job.row.ids)) + max(most, job.config.max_new_tokens) <= self.seq_length
                if job.batch_key() == first.batch_key() and fits:
                    self.waiting.remove(job)
                    jobs.append(job)
                    longest, most = max(longest, len(job.row.ids)), max(most, job.config.max_new_tokens)
            return jobs

    def _work(self):
        for number in itertools.count(1):
            jobs = self._take()
            try:
                self._run(number, jobs)
            except Exception as err:  # pylint: disable=broad-except  (a bug must not reach the client or stop the worker)
                log.exception("batch %d (%s) failed", number, ", ".join(job.id for job in jobs))
                self.stats["failed"] += len(jobs)
                failure = APIError(500, f"the model failed on this request ({type(err).__name__}); see the server log")
                for job in jobs:
                    job.on_event("error", failure)

    def _run(self, number, jobs):
        size = bucket(len(jobs), self.max_batch_size)
        padding = size - len(jobs)
        entries = jobs + [jobs[-1]] * padding
        batch = assemble_batch([job.request for job in entries],
                               [(job.row, job.pixels, job.kept_history) for job in entries])
        config = replace(jobs[0].config, max_new_tokens=max(job.config.max_new_tokens for job in jobs))
        holdback = max((len(seq) for seq in with_family_stops(self.processor, config).stop_sequences), default=1) - 1
        rows = Rows(jobs, self.processor, holdback, padding)
        log.info("batch %d: %d request(s) in a batch of %d rows: %s", number, len(jobs), size,
                 ", ".join(job.id for job in jobs))
        start = time.perf_counter()
        generated, _ = generate_batch(self.model, self.processor, batch, config, listener=rows,
                                      cancelled=rows.cancelled)
        self.stats["batches"] += 1
        self.stats["rows"] += len(jobs)
        self.stats["largest_batch"] = max(self.stats["largest_batch"], len(jobs))
        self.stats["batch_sizes"][str(len(jobs))] = self.stats["batch_sizes"].get(str(len(jobs)), 0) + 1
        for job, ids in zip(jobs, generated):
            if job.cancelled:
                self.stats["cancelled"] += 1
                log.info("%s: client went away after %d token(s); its row was finished", job.id, len(job.ids))
                continue
            self._finish(job, ids)
        log.info("batch %d: done in %.0f ms", number, (time.perf_counter() - start) * 1e3)

    def _finish(self, job, ids):
        ids = ids[:job.config.max_new_tokens]
        text = self.processor.decode_response(job.row.ids, ids, job.request.english)
        if job.stop_texts:
            Rows.find_stop(job, text)
        if job.stop_index is not None:
            text = text[:job.stop_index]
        reason = "length" if job.stop_index is None and len(ids) >= job.config.max_new_tokens and \
            not self._ended_by_family_stop(ids) else "stop"
        if job.stream:
            Rows.send(job, text, final=True)
            if job.sent != text:
                log.warning("%s: the final answer does not continue the streamed text (the family's "
                            "post-processing changed it as a whole)", job.id)
        self.stats["completed"] += 1
        job.on_event("done", Completion(text, list(ids), len(job.row.ids), reason))

    def _ended_by_family_stop(self, ids):
        return any(len(seq) and list(ids[-len(seq):]) == list(seq) for seq in self.processor.prompt_builder.stop_sequences())
