r"""Asynchronous inference: keep the arm moving while the next action chunk is computed (SmolVLA paper §3.3).

A policy that predicts chunks of n actions can be run in two ways:

* sync: execute all n actions, then read an observation and wait for the next chunk. The arm stands still
  for the whole inference latency, once per chunk (E[latency] / Δt idle control ticks).
* async: as soon as the queue of pending actions falls below a fraction g of a chunk (|queue| / n < g),
  send an observation and keep executing what is left while the policy thinks. If g·n ticks of actions
  outlast the latency, the queue never runs empty -- as long as two latencies in a row also stay under n
  ticks, since a chunk reaches only n steps past the observation it was computed from.

Each action carries the timestep it is meant for (how many actions had been executed before it). When a
chunk computed from the observation at timestep t arrives, its actions for timesteps already executed are
dropped, those that overlap the queue are fused with the queued ones (`--aggregate`), the rest appended.
With Real-Time Chunking (`--rtc guided|trained`, flow.py) the request carries what is left of the queue
(normalized) and the delay d, the ticks it will still run; the chunk continues it and replaces the queue.

The file reads top to bottom: 1. the action queue and the scheduler: pure logic, driven by an injectable
clock (unit-tested); 2. the inference thread (`InferenceWorker`: the policy in this process or on a
server, policy_server.py); 3. the control loop at --fps, its metrics and the queue plot (the paper's
Figure 3); 4. the command line, with its checks and the defaults a checkpoint brings (`settle_run_options`).

    python infer_async.py --port sim --policy CKPT --vlm VLM --duration 20 --metrics m.json --plot q.png
    python infer_async.py --serve --host 127.0.0.1 --port-server 8765 --policy CKPT
    python infer_async.py --port /dev/ttyACM0 --server 127.0.0.1:8765 --task "pick the cube" \
        --cameras top=/dev/video0,wrist=/dev/video2 --rename top=camera1,wrist=camera2

Failures never stop the arm: inference runs on a background thread (or a server), at most one request is
in flight, a failed or lost request is re-armed after an exponential backoff, and meanwhile the loop keeps
executing the queue and then holds position.
"""

import argparse
import contextlib
import json
import math
import os
import queue
import signal
import sys
import threading
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from types import SimpleNamespace

import plumbing

plumbing.spin_briefly_before_sleeping()  # OpenMP's wait setting, before torch starts (policy.py imports it)

import numpy as np  # noqa: E402

from plumbing import HelpFormatter, parse_mapping  # noqa: E402
from policy_server import PolicyClient, RemoteError, add_policy_arguments, open_policy, serve  # noqa: E402
from smolvla import IMAGE_PREFIX, STATE  # noqa: E402
from toy_world import ToyWorld  # noqa: E402

# ----------------------------------------------------------------------------------------------------------
# 1. The action queue and the scheduler (pure logic: no threads, no I/O, time from an injectable clock)
# ----------------------------------------------------------------------------------------------------------

AGGREGATES = ("weighted", "latest", "average")


def make_fusion(name, weight_new=0.7):
    """How an action already in the queue (old) and a fresh one for the same timestep (new) are combined.

    weighted: (1 - w)·old + w·new  (w = 0.7 by default, the reference's 0.3·old + 0.7·new)
    latest:   new                  (trust the newest observation only)
    average:  (old + new) / 2
    """
    def weighted(old, new):
        return (1.0 - weight_new) * old + weight_new * new

    def latest(old, new):
        return new

    def average(old, new):
        return 0.5 * (old + new)

    if name == "weighted":
        if not 0.0 <= weight_new <= 1.0:
            raise ValueError(f"--aggregate-weight must be in [0, 1], got {weight_new}")
        return weighted
    if name == "latest":
        return latest
    if name == "average":
        return average
    raise ValueError(f"unknown aggregate {name!r}: choose one of {', '.join(AGGREGATES)}")


class ActionQueue:
    """Pending actions, each meant for one timestep (= number of actions executed before it).

    Invariant: the queue holds the timesteps next_timestep, next_timestep + 1, ... without gaps, so
    the i-th queued action is for timestep next_timestep + i.
    """

    def __init__(self, fuse):
        self.fuse = fuse
        self.actions = []        # list of (action_dim,) arrays, oldest first
        self.chunk_ids = []      # per action: the newest chunk that contributed to it
        self.next_timestep = 0   # timestep of the next action to execute = actions executed so far

    def __len__(self):
        return len(self.actions)

    def pop(self):
        """-> (action, id of its chunk); executing an action moves the clock of timesteps on by one."""
        self.next_timestep += 1
        return self.actions.pop(0), self.chunk_ids.pop(0)

    def merge(self, first_timestep, chunk, chunk_id=0):
        """Align a chunk (n, action_dim) whose row k is meant for timestep first_timestep + k.

        Returns how many of its actions were dropped (timestep already executed), fused with the queued
        action for their timestep, and appended after the queue's end."""
        dropped = 0   # actions for a timestep already executed
        fused = 0     # actions fused with the queued action for their timestep
        appended = 0  # actions past the queue's end
        for k, action in enumerate(chunk):
            # position of this action's timestep in the queue; negative = already executed
            position = first_timestep + k - self.next_timestep
            if position < 0:
                dropped += 1
            elif position < len(self.actions):
                self.actions[position] = self.fuse(self.actions[position], action)
                self.chunk_ids[position] = chunk_id
                fused += 1
            else:
                # contiguous by construction: the chunk starts at or before next_timestep
                self.actions.append(action)
                self.chunk_ids.append(chunk_id)
                appended += 1
        return dropped, fused, appended

    def replace(self, first_timestep, chunk, chunk_id):
        """RTC: the chunk already continues the queue, so it replaces it from the first action not yet
        executed (row next_timestep − first_timestep). Returns (dropped, replaced, appended) like merge."""
        start = self.next_timestep - first_timestep
        assert start >= 0, "a chunk cannot start after the next timestep to execute"
        rows = list(chunk[start:])
        # counted against the queue it replaces, before the replacement
        dropped = min(start, len(chunk))                   # rows for timesteps already executed
        replaced = min(len(rows), len(self.actions))       # rows that take a queued action's place
        appended = max(0, len(rows) - len(self.actions))   # rows past the old queue's end
        self.actions = rows
        self.chunk_ids = [chunk_id] * len(rows)
        return dropped, replaced, appended


@dataclass
class Request:
    id: int
    timestep: int  # timestep of the first action of the chunk to come (next_timestep when observed)
    sent_s: float = 0.0  # clock time when observed (the scheduler measures latencies on its own clock)
    # RTC's additions to the observation: the "rtc" options, the "rtc_leftover"
    rtc: dict = field(default_factory=dict)


@dataclass
class Metrics:
    ticks: int = 0
    idle_ticks: int = 0                   # empty queue after the first chunk arrived: the arm stood still
    startup_ticks: int = 0                # empty queue before the first chunk (model warm-up)
    chunks_received: int = 0
    inference_failures: int = 0
    observations_sent: int = 0
    observations_skipped_similar: int = 0
    actions_dropped_stale: int = 0
    actions_fused: int = 0
    actions_appended: int = 0
    inference_latency_s: list = field(default_factory=list)
    # queue length at the start of each tick, before the pop
    queue_sizes: list = field(default_factory=list)
    # tick index of every observation sent
    send_ticks: list = field(default_factory=list)
    # tick index at which every chunk was merged
    arrival_ticks: list = field(default_factory=list)
    # the first 50, for the report
    failure_messages: list = field(default_factory=list)
    late_ticks: int = 0                   # ticks whose work overran the tick period (the loop fell behind)
    max_lateness_s: float = 0.0
    wall_s: float = 0.0                   # wall time of the loop (ticks / fps when it kept up)
    # {"tick", "chunk", "action"} per tick that sent an action
    executed: list = field(default_factory=list)
    # the run's settings, filled in by the caller
    config: dict = field(default_factory=dict)

    def switch_jumps(self):
        """(tick, max_j |a_t − a_{t−1}|) at every chunk switch: a tick whose action came from a newer
        chunk than the previous action's (robot units: how smooth the transition was)."""
        jumps = []
        for previous, current in zip(self.executed, self.executed[1:]):
            if previous["chunk"] != current["chunk"]:
                jump = float(np.max(np.abs(np.subtract(current["action"], previous["action"]))))
                jumps.append((current["tick"], jump))
        return jumps

    def switch_ticks(self):
        return [tick for tick, _ in self.switch_jumps()]

    def switch_jump_mean(self):
        jumps = [jump for _, jump in self.switch_jumps()]
        return float(np.mean(jumps)) if jumps else math.nan

    def summary(self):
        """Derived numbers to compare with the paper's analysis (idle ≈ latency / Δt per chunk in sync)."""
        latency = np.asarray(self.inference_latency_s or [math.nan])
        # idle stretches: runs of empty-queue ticks after the first chunk (in sync, one per chunk awaited)
        if self.arrival_ticks:
            sizes_since_first_chunk = self.queue_sizes[self.arrival_ticks[0]:]
        else:
            sizes_since_first_chunk = []
        idle = np.asarray(sizes_since_first_chunk) == 0
        # a stretch starts at an idle tick after a busy one, or at the first tick if that one is idle
        stretches = int(np.sum(idle[1:] & ~idle[:-1]) + (idle[:1].sum()))
        return {"mean_inference_latency_s": float(latency.mean()),
                "max_inference_latency_s": float(latency.max()),
                "mean_latency_in_ticks": float(latency.mean() * self.config.get("fps", math.nan)),
                "switch_jump_mean": self.switch_jump_mean(),
                "idle_stretches": stretches,
                "mean_idle_stretch_ticks": self.idle_ticks / max(1, stretches)}


class AsyncScheduler:
    """Decides tick by tick when to ask for a chunk, and merges the chunks that come back.

    Use per control tick:

        for result in results:
            receive(result)
        action = next_action()
        if wants_observation():
            request = observe(state)

    Guarantees: at most one request in flight; an empty queue always asks (once nothing is in flight);
    a failure clears the in-flight request and re-arms after a backoff, so no sequence of failures can
    leave the loop waiting forever. rtc: None (merge chunks), or the RTC options sent with each request
    ({"mode": "guided" or "trained", "execution_horizon", ...}: policy_server.PolicyRunner.rtc_options).
    """

    def __init__(self, chunk_size, threshold=0.7, similarity_eps=0.0, fuse=None, action_dim=None,
                 retry_backoff_s=0.1, max_backoff_s=2.0, clock=time.monotonic, rtc=None, fps=30.0):
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"--threshold g must be in [0, 1] (0 = sync), got {threshold}")
        if similarity_eps < 0:
            raise ValueError(f"--similarity-eps must be >= 0 (0 disables the filter), got {similarity_eps}")
        self.chunk_size = chunk_size
        self.threshold = threshold
        self.similarity_eps = similarity_eps
        self.queue = ActionQueue(fuse or make_fusion("weighted"))
        self.action_dim = action_dim    # when given, a chunk of another width counts as a failed inference
        self.retry_backoff_s = retry_backoff_s
        self.max_backoff_s = max_backoff_s
        self.clock = clock
        self.metrics = Metrics()
        self.in_flight = None           # the Request being computed, if any
        self.last_sent_state = None     # joint state of the last observation sent (similarity filter)
        self.consecutive_failures = 0
        self.retry_at = -math.inf       # clock time before which no new request is sent (backoff)
        self._next_request_id = 0
        self.rtc = rtc                  # None, or the RTC options sent with each request
        self.fps = fps                  # control ticks per second: RTC's delay d counts ticks
        # observed -> merged, on self.clock (RTC's delay estimate)
        self.recent_latencies_s = deque(maxlen=10)
        self.rtc_chunk = (0, None)  # RTC: (first timestep, normalized (n, A)) of the chunk the queue holds

    def next_action(self):
        """Pop the action for this tick, or None when the queue is empty (the arm holds its position)."""
        metrics = self.metrics
        metrics.ticks += 1
        metrics.queue_sizes.append(len(self.queue))
        if len(self.queue) == 0:
            if metrics.chunks_received:
                metrics.idle_ticks += 1
            else:
                metrics.startup_ticks += 1
            return None
        action, chunk_id = self.queue.pop()
        record = {"tick": metrics.ticks - 1, "chunk": chunk_id, "action": np.asarray(action).tolist()}
        metrics.executed.append(record)
        return action

    def wants_observation(self):
        """Nothing in flight, not backing off, and the queue is empty or below g of a chunk."""
        if self.in_flight is not None or self.clock() < self.retry_at:
            return False
        return len(self.queue) == 0 or len(self.queue) / self.chunk_size < self.threshold

    def observe(self, state, age_s=0.0):
        """Offer the current joint state; returns the Request to send, or None when filtered out.

        Similarity filter: a state within similarity_eps (max abs difference per joint, robot units) of
        the last one sent adds little, so it is skipped -- unless the queue is empty, which always asks.
        age_s: how long ago the observation was read (0: now); RTC counts it in the delay.
        """
        if not self.wants_observation():
            raise RuntimeError("observe() called while no observation is wanted: check wants_observation()")
        state = np.asarray(state, dtype=np.float32)
        similar = (self.similarity_eps > 0 and self.last_sent_state is not None
                   and float(np.max(np.abs(state - self.last_sent_state))) <= self.similarity_eps)
        if similar and len(self.queue) > 0:
            self.metrics.observations_skipped_similar += 1
            return None
        self.in_flight = Request(self._next_request_id, self.queue.next_timestep, self.clock())
        self.in_flight.rtc = self.rtc_inputs(age_s) if self.rtc else {}
        self._next_request_id += 1
        self.last_sent_state = state
        self.metrics.observations_sent += 1
        self.metrics.send_ticks.append(self.metrics.ticks - 1)
        return self.in_flight

    def receive(self, result):
        """Merge a finished chunk, or record a failure and re-arm after an exponential backoff.

        Returns None, or what went wrong (the inference's error, or why its chunk cannot be executed)."""
        if self.in_flight is None or result.request_id != self.in_flight.id:
            raise ValueError(f"result for request {result.request_id} but in flight is {self.in_flight}")
        request = self.in_flight
        self.in_flight = None
        metrics = self.metrics
        metrics.inference_latency_s.append(result.latency_s)
        error = result.error or self.chunk_problem(result.actions)
        if error is not None:
            self.consecutive_failures += 1
            metrics.inference_failures += 1
            if len(metrics.failure_messages) < 50:
                metrics.failure_messages.append(error)
            # the failed observation was never used: do not let the similarity filter hold back the retry
            self.last_sent_state = None
            self.retry_at = self.clock() + self.backoff_s()
            return error
        self.consecutive_failures = 0
        self.retry_at = -math.inf
        # observed -> merged, for a chunk only (a failure, e.g. a timeout, is no latency)
        self.recent_latencies_s.append(self.clock() - request.sent_s)
        if self.rtc:  # the chunk continues the leftover it was sent: it replaces the queue
            dropped, fused, appended = self.queue.replace(request.timestep, result.actions, request.id)
            self.rtc_chunk = (request.timestep, result.normalized)
        else:
            dropped, fused, appended = self.queue.merge(request.timestep, result.actions, request.id)
        metrics.chunks_received += 1
        metrics.arrival_ticks.append(metrics.ticks)
        metrics.actions_dropped_stale += dropped
        metrics.actions_fused += fused
        metrics.actions_appended += appended
        return None

    def inference_delay(self, age_s=0.0):
        """d: how many queued actions will still run before a chunk asked for now replaces the queue. A chunk
        merged k ticks after its request has seen k − 1 of them run (sent and merged at tick starts); k is
        the largest of the recent latencies (in ticks), plus the observation's age; never past the queue."""
        latency_s = max(self.recent_latencies_s, default=0.0)
        latency_ticks = round(latency_s * self.fps) + math.ceil(age_s * self.fps)
        return max(0, min(latency_ticks - 1, len(self.queue)))

    def rtc_inputs(self, age_s=0.0):
        """What RTC adds to the observation: the options with the delay d, and the leftover: the queue (the
        rest of the last chunk, which replaced it) in the policy's normalized units."""
        inputs = {"rtc": {**self.rtc, "inference_delay": self.inference_delay(age_s)}}
        first_timestep, normalized = self.rtc_chunk
        if len(self.queue) and normalized is not None:
            not_executed = normalized[self.queue.next_timestep - first_timestep:]
            inputs["rtc_leftover"] = np.asarray(not_executed, np.float32)  # (T, A)
        return inputs

    def chunk_problem(self, actions):
        """Why a chunk cannot be executed (wrong shape, NaN), or None when it is fine."""
        if actions.ndim != 2 or (self.action_dim is not None and actions.shape[1] != self.action_dim):
            return f"chunk of shape {actions.shape}, expected (steps, {self.action_dim or 'action_dim'})"
        if not np.all(np.isfinite(actions)):
            return "chunk contains NaN or infinite actions"
        return None

    def backoff_s(self):
        """Wait before the next request after consecutive_failures failures: 0.1, 0.2, 0.4, ... up to 2 s."""
        if self.consecutive_failures == 0:
            return 0.0
        return min(self.max_backoff_s, self.retry_backoff_s * 2 ** (self.consecutive_failures - 1))


# ----------------------------------------------------------------------------------------------------------
# 2. The inference thread: the policy, in this process or on a server, never blocks the loop
# ----------------------------------------------------------------------------------------------------------

@dataclass
class Result:
    request_id: int
    actions: np.ndarray = None  # (n, action_dim) float32 robot units; None when inference failed
    error: str = None           # what went wrong, for the log and the metrics
    latency_s: float = 0.0      # observation handed over -> chunk (or error) back, on the inference thread
    normalized: np.ndarray = None  # with RTC: the chunk in the policy's normalized units (the next leftover)

    @classmethod
    def from_answer(cls, request_id, answer):
        """The Result of a PolicyRunner's (or PolicyClient's) answer {"actions", and with RTC
        "normalized"}."""
        actions = np.asarray(answer["actions"], dtype=np.float32)
        return cls(request_id, actions, normalized=answer.get("normalized"))


class InferenceWorker:
    """Runs compute(observation) -> {"actions", ...} on a background thread, so the control loop never waits.

    compute is a PolicyRunner (in-process, the default) or a PolicyClient (remote). Every exception it
    raises becomes a failed Result; extra_latency_s adds an artificial delay to study g (paper §3.3).
    """

    def __init__(self, compute, extra_latency_s=0.0):
        self.compute = compute
        self.extra_latency_s = extra_latency_s
        self.requests = queue.Queue()
        self.results = queue.Queue()
        self.thread = threading.Thread(target=self._run, name="inference", daemon=True)
        self.thread.start()

    def submit(self, request, observation):
        self.requests.put((request, observation))

    def poll(self):
        """Results finished since the last poll (never blocks)."""
        done = []
        while not self.results.empty():  # one reader, the control loop: a result seen here stays there
            done.append(self.results.get_nowait())
        return done

    def close(self, timeout_s=2.0):
        self.requests.put(None)
        self.thread.join(timeout_s)

    def _run(self):
        while True:
            item = self.requests.get()
            if item is None:  # close() asks the thread to stop
                break
            request, observation = item
            start = time.monotonic()
            try:
                answer = self.compute(observation)
                time.sleep(self.extra_latency_s)
                result = Result.from_answer(request.id, answer)
            # any failure of the policy or the network must reach the scheduler as a failed Result,
            # otherwise the request would stay in flight and the loop would wait for it forever
            except Exception as e:  # noqa: BLE001
                result = Result(request.id, error=f"{type(e).__name__}: {e}")
            result.latency_s = time.monotonic() - start
            self.results.put(result)


# ----------------------------------------------------------------------------------------------------------
# 3. The control loop, its metrics and the queue plot (the paper's Figure 3)
# ----------------------------------------------------------------------------------------------------------


def run_control_loop(arm, capture, worker, scheduler, fps, ticks, clock=time.monotonic, sleep=time.sleep,
                     log=print):
    """Run `ticks` control ticks at `fps` (see control_tick); returns scheduler.metrics.

    arm: get_state() -> (S,) and send_action((A,)); capture(state) -> observation dict (cameras read now);
    worker: submit(request, observation) / poll() -> [Result].
    """
    period = 1.0 / fps
    metrics = scheduler.metrics
    start = clock()
    next_tick = start  # when the next tick is due
    try:
        for _ in range(ticks):
            control_tick(arm, capture, worker, scheduler, log)
            # sleep to the next tick; after an overrun start counting again from now instead of rushing
            next_tick += period
            delay = next_tick - clock()
            if delay > 0:
                sleep(delay)
            else:
                metrics.late_ticks += 1
                metrics.max_lateness_s = max(metrics.max_lateness_s, -delay)
                next_tick = clock()
    finally:
        metrics.wall_s = clock() - start
    return metrics


def control_tick(arm, capture, worker, scheduler, log):
    """One tick: merge arrived chunks, execute one action (or hold still), maybe send an observation."""
    for result in worker.poll():
        error = scheduler.receive(result)
        if error is not None:
            log(f"inference failed ({scheduler.consecutive_failures} in a row): {error}; retrying in "
                f"{scheduler.backoff_s():.1f} s; {len(scheduler.queue)} actions left, "
                f"then the arm holds still")
    action = scheduler.next_action()
    # an empty queue sends nothing: the servos keep holding their last goal position
    if action is not None:
        arm.send_action(action)
    if scheduler.wants_observation():
        state = arm.get_state()
        request = scheduler.observe(state)
        if request is not None:
            worker.submit(request, {**capture(state), **request.rtc})


def plot_queue(metrics, path):
    """Queue size per tick, empty ticks included (the paper's Figure 3), with the trigger level g·n."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fps = metrics.config.get("fps", 30)
    t = np.arange(len(metrics.queue_sizes)) / fps
    sizes = np.asarray(metrics.queue_sizes)
    fig, ax = plt.subplots(figsize=(10, 3.5))
    ax.step(t, sizes, where="post", color="tab:blue", label="actions in queue")
    if metrics.config.get("threshold", 0) > 0 and "chunk_size" in metrics.config:
        ax.axhline(metrics.config["threshold"] * metrics.config["chunk_size"], color="gray", ls="--",
                   label=f"trigger g·n (g = {metrics.config['threshold']})")
    # idle: an empty queue once the first chunk has arrived (before it, the model was warming up)
    if metrics.arrival_ticks:
        first_arrival_tick = metrics.arrival_ticks[0]
    else:
        first_arrival_tick = 0
    idle = (sizes == 0) & (np.arange(len(sizes)) >= first_arrival_tick)
    ax.scatter(t[idle], sizes[idle], color="tab:red", s=8, zorder=3, label=f"idle ticks ({int(idle.sum())})")
    ax.scatter(np.asarray(metrics.send_ticks) / fps, np.full(len(metrics.send_ticks), -2), marker="^",
               color="tab:green", s=12, label="observation sent")
    switches = np.asarray(metrics.switch_ticks()) / fps  # the executed actions pass to a newer chunk
    ax.scatter(switches, np.full(len(switches), -4), marker="|", color="tab:purple", s=40,
               label="chunk switch")
    ax.set(xlabel="time (s)", ylabel="queue size", title=metrics.config.get("title", "action queue"))
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------------------
# 4. Command line
# ----------------------------------------------------------------------------------------------------------


def camera_sources(cameras, rename, policy_cameras, sim=False):
    """--cameras "top=/dev/video0,..." and --rename "top=camera1,..." -> {policy camera key: device}, checked
    against the cameras the policy reads before any device opens; "sim" (and, with --port sim, no --cameras)
    films the toy world."""
    if sim and not cameras:
        return dict.fromkeys(policy_cameras, "sim")
    renames = parse_mapping(rename, "--rename")     # {your camera name: the policy's}
    devices = parse_mapping(cameras, "--cameras")   # {your camera name: device}
    sources = {IMAGE_PREFIX + renames.get(name, name): device for name, device in devices.items()}
    missing = [key for key in policy_cameras if key not in sources]
    unknown = [key for key in sources if key not in policy_cameras]
    if unknown or len(missing) == len(policy_cameras):  # fewer cameras: the policy runs on those present
        raise ValueError(f"the policy reads cameras {policy_cameras}; "
                         f"--cameras/--rename give {sorted(sources)} "
                         f"(missing {missing}, unknown {unknown}). "
                         f"Pass --cameras name=/dev/videoN,... and, where "
                         f"your names differ from the policy's, --rename name=policy_name,...")
    return sources


def build_parser():
    examples = __doc__[__doc__.index("    python infer_async.py"):__doc__.index("\nFailures never")]
    # HelpFormatter: the docstring's line breaks, and each default
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog="examples:\n" + examples,
                                     formatter_class=HelpFormatter)
    parser.add_argument("--port", default="sim",
                        help="serial port of the SO-100 follower, or `sim` (virtual arm)")
    parser.add_argument("--task",
                        help="language instruction (default: the policy's training task, if it had one)")
    parser.add_argument("--cameras",
                        help="name=/dev/video0,name2=1 or name=sim (default with --port sim: all sim)")
    parser.add_argument("--rename", help="camera name=policy camera name, e.g. top=camera1,wrist=camera2")
    parser.add_argument("--fps", type=float,
                        help="control ticks per second, one action each (default: the policy's, or 30)")
    parser.add_argument("--threshold", type=float, default=0.7, help="g: ask for a chunk when |queue|/n < g")
    parser.add_argument("--sync", action="store_true", help="g = 0: ask only when the queue is empty")
    parser.add_argument("--similarity-eps", type=float, default=0.0,
                        help="skip observations whose joints all moved less than this (robot units); "
                             "0 disables")
    parser.add_argument("--aggregate", choices=AGGREGATES, default="weighted",
                        help="fusion of overlapping actions")
    parser.add_argument("--aggregate-weight", type=float, default=0.7,
                        help="weight of the new action (weighted)")
    parser.add_argument("--extra-latency", type=float, default=0.0, help="seconds added to every inference")
    parser.add_argument("--norm-mode",
                        help="joint units the policy was trained in: degrees or range_m100_100 (default: "
                             "the policy's, or degrees); printed when the arm connects")
    parser.add_argument("--id", default="my_so100",
                        help="arm name: its calibration file is <id>.json (so100.py)")
    parser.add_argument("--calibration",
                        help="calibration JSON of a real arm (default: so100.py's <id>.json)")
    parser.add_argument("--max-relative-target", type=float,
                        help="largest joint step per action, robot units (no cap)")
    parser.add_argument("--duration", type=float, default=None, help="seconds to run (default: until Ctrl-C)")
    parser.add_argument("--metrics", help="write run metrics to this JSON file")
    parser.add_argument("--plot", help="draw the queue size over time to this PNG")
    parser.add_argument("--record-video",
                        help="--port sim: the toy world's camera and the gripper's path, to this GIF")
    # --policy, --vlm, --device, --dtype; --server, --timeout; --serve, --host, ...
    add_policy_arguments(parser)
    return parser


def rtc_options(args):
    """The RTC options a request carries (policy_server.PolicyRunner.rtc_options), or None for --rtc off."""
    if args.rtc == "off":
        return None
    return {"mode": args.rtc,
            "execution_horizon": args.execution_horizon,
            "schedule": args.rtc_schedule,
            "max_guidance_weight": args.max_guidance_weight,
            "jacobian": args.rtc_jacobian}


def make_async_scheduler(args, chunk_size, action_dim):
    """The AsyncScheduler the command line asks for, its metrics' config filled with the run's settings."""
    if args.sync:
        threshold = 0.0
    else:
        threshold = args.threshold
    scheduler = AsyncScheduler(chunk_size, threshold=threshold, similarity_eps=args.similarity_eps,
                               fuse=make_fusion(args.aggregate, args.aggregate_weight), action_dim=action_dim,
                               rtc=rtc_options(args), fps=args.fps)
    if threshold == 0:
        schedule = "sync"
    else:
        schedule = f"async g={threshold}"
    scheduler.metrics.config = {
        "fps": args.fps,
        "chunk_size": chunk_size,
        "threshold": threshold,
        "aggregate": args.aggregate,
        "aggregate_weight": args.aggregate_weight,
        "similarity_eps": args.similarity_eps,
        "extra_latency_s": args.extra_latency,
        "port": args.port,
        "server": args.server,
        "policy": args.policy,
        "task": args.task,
        "norm_mode": args.norm_mode,
        "rtc": rtc_options(args),
        "seed": args.seed,
        "title": f"{schedule}, RTC {args.rtc}, extra latency {args.extra_latency} s, {args.fps:g} fps",
    }
    return scheduler


def run_arm(args):
    """Drive the arm with the policy until --duration or Ctrl-C; torque goes off whatever happens."""
    from so100 import open_arm, open_cameras  # the servo driver (pyserial) only beside an arm: --serve never

    compute, info = open_policy(args)
    # --fps, --norm-mode, --task: the policy's by default
    settle_run_options(args, info.get("trained_on", {}))
    if args.duration is None:
        ticks = sys.maxsize
    else:
        ticks = round(args.duration * args.fps)
    # closed in reverse order: inference thread, cameras, arm (torque off), virtual arm, server connection
    with contextlib.ExitStack() as cleanup:
        if isinstance(compute, PolicyClient):
            cleanup.callback(compute.close)
        arm, virtual_arm = open_arm(args.port, calibration=args.calibration, norm_mode=args.norm_mode,
                                    max_relative_target=args.max_relative_target, arm_id=args.id)
        if virtual_arm is not None:
            cleanup.callback(virtual_arm.close)
        cleanup.callback(arm.disconnect)
        # --port sim: the toy world, whose "sim" cameras film it, watches the target
        if virtual_arm is not None:
            args.world = ToyWorld(virtual_arm.joint_positions_deg, camera_keys=())
        toy_scene = None
        if args.world:
            toy_scene = args.world.scene
        sources = camera_sources(args.cameras, args.rename, info["cameras"], sim=virtual_arm is not None)
        cameras = open_cameras(sources, virtual_arm, toy_scene)

        def close_cameras():
            for camera in cameras.values():
                if hasattr(camera, "close"):
                    camera.close()

        cleanup.callback(close_cameras)

        def capture(state):
            observation = {"task": args.task, STATE: np.asarray(state, dtype=np.float32)}
            for key, camera in cameras.items():
                observation[key] = camera.read()
            return observation

        # warm-up: the first inference allocates and initializes a lot; do it before the clock starts, and
        # let a policy that cannot drive this arm fail here, loudly, rather than as failures in the loop
        start = time.monotonic()
        state = arm.get_state()
        rtc = {}
        if args.rtc != "off":
            rtc = {"rtc": rtc_options(args), "rtc_leftover": np.zeros((1, len(state)), np.float32)}
        # with a leftover: the RTC options are checked too
        warm_up = np.asarray(compute({**capture(state), **rtc})["actions"])
        print(f"warm-up inference took {time.monotonic() - start:.2f} s")
        if warm_up.ndim != 2 or warm_up.shape[1] != len(state):
            raise ValueError(f"the policy predicts chunks of shape {warm_up.shape} but the arm takes "
                             f"{len(state)} joint targets per action")
        scheduler = make_async_scheduler(args, info["chunk_size"], len(state))
        worker = InferenceWorker(compute, args.extra_latency)
        cleanup.callback(worker.close)
        if args.duration is None:
            how_long = "until Ctrl-C"
        else:
            how_long = f"{ticks} ticks"
        print(f"running {how_long} at {args.fps:g} fps, "
              f"g = {scheduler.threshold}, chunk {info['chunk_size']}, RTC {args.rtc}")
        try:
            # --port sim: the toy world looks at the arm after every action (did it reach the target, when)
            if args.world:

                def send_action_and_look(action):
                    arm.send_action(action)
                    args.world.look()

                driven = SimpleNamespace(get_state=arm.get_state, send_action=send_action_and_look)
            else:
                driven = arm
            run_control_loop(driven, capture, worker, scheduler, args.fps, ticks)
        except KeyboardInterrupt:
            print("stopped by Ctrl-C")
    metrics = scheduler.metrics
    summary = metrics.summary()
    report = (f"ticks {metrics.ticks}, idle ticks {metrics.idle_ticks} "
              f"(+{metrics.startup_ticks} before the first chunk), "
              f"chunks {metrics.chunks_received}, observations sent {metrics.observations_sent}, "
              f"skipped as similar {metrics.observations_skipped_similar}, "
              f"failures {metrics.inference_failures}; "
              f"mean latency {summary['mean_inference_latency_s']:.3f} s "
              f"= {summary['mean_latency_in_ticks']:.1f} ticks, "
              f"{summary['idle_stretches']} idle stretches "
              f"of {summary['mean_idle_stretch_ticks']:.1f} ticks on average; "
              f"{metrics.wall_s:.1f} s wall, {metrics.late_ticks} late ticks "
              f"(max {metrics.max_lateness_s * 1000:.0f} ms)")
    if args.world:
        report += f"; target reached: {args.world.reached or 'no'}"
    print(report)
    if args.metrics:
        written = asdict(metrics)
        written["switch_jump_mean"] = summary["switch_jump_mean"]
        written["summary"] = summary
        if args.world:  # --port sim: False, or when
            written["target_reached"] = args.world.reached
        with open(args.metrics, "w") as metrics_file:
            json.dump(written, metrics_file, indent=1)
    if args.plot:
        plot_queue(metrics, args.plot)
    if args.record_video and args.world:
        args.world.save_gif(args.record_video, fps=args.fps)
    return metrics


def check_arguments(args):
    """infer_async.py's numbers, output files and options that go together, checked before anything loads."""
    outputs = [path for path in (args.metrics, args.plot, args.record_video) if path]
    folders = [os.path.dirname(os.path.abspath(path)) for path in outputs]
    missing = [folder for folder in folders if not os.path.isdir(folder)]
    if missing:
        raise ValueError(f"no folder {missing[0]!r} to write --metrics, --plot or --record-video in")
    port_out_of_range = not 0 <= args.port_server <= 65535
    duration_not_positive = args.duration is not None and args.duration <= 0
    if port_out_of_range or duration_not_positive:
        raise ValueError(f"--port-server must be 0..65535 and --duration positive "
                         f"(got {args.port_server}, {args.duration})")
    if args.record_video and (args.port != "sim" or args.cameras):
        raise ValueError("--record-video films the toy world: it needs --port sim without --cameras")
    fps_not_positive = args.fps is not None and args.fps <= 0
    if fps_not_positive or args.extra_latency < 0:
        raise ValueError(f"--fps must be positive and --extra-latency >= 0 "
                         f"(got {args.fps}, {args.extra_latency})")
    if args.serve and args.extra_latency:
        raise ValueError("--extra-latency is added on the client's inference thread: pass it to the client")


def settle_run_options(args, trained_on: dict, log=print):
    """Fill and check infer_async.py's --fps, --norm-mode, --task (None: not given) from what the policy was
    trained on (model.trained_on; without trained_on.json, as lerobot's: 30 fps, degrees, no task)."""
    fps = trained_on.get("fps")
    mode = trained_on.get("norm_mode")
    tasks = trained_on.get("tasks")
    if args.fps is None:
        args.fps = float(fps or 30)
    elif fps and args.fps != fps:
        # chunks are sequences of actions Δt = 1/fps apart: another rate warps them
        log(f"warning: --fps {args.fps:g}, but the policy was trained on {fps:g} fps data: it moves "
            f"{args.fps / fps:.2g}x as fast as it learned to, and g·n ticks last a different time")
    if args.norm_mode is None:
        args.norm_mode = mode or "degrees"
    elif mode and args.norm_mode != mode:
        raise ValueError(f"--norm-mode {args.norm_mode}: this policy was trained on joints in {mode} (its "
                         f"dataset's units); drive it with --norm-mode {mode}, or leave the flag out")
    if args.task is None and tasks is not None:
        if len(tasks) != 1:
            listed = "; ".join(f'--task "{task}"' for task in tasks) or "none recorded"
            raise ValueError(f"give --task: this policy was trained on {len(tasks)} tasks ({listed})")
        args.task = tasks[0]
        log(f'task: "{args.task}" (the policy\'s only training task; --task gives another)')
    if args.task is None:
        log("note: no --task, so an empty instruction (this checkpoint does not record its training tasks)")
    args.task = args.task or ""


def main(argv=None):
    args = build_parser().parse_args(argv)
    args.world = None  # --port sim's toy world (run_arm)
    check_arguments(args)  # numbers, output folders and options that go together, before the policy loads
    if args.serve:
        return serve(args)
    return run_arm(args)


def one_line_errors():
    """Errors whose message says what to do, reported as one line (so100's only once run_arm loaded it)."""
    errors = (FileNotFoundError, ConnectionError, ValueError, RemoteError)
    so100 = sys.modules.get("so100")
    if so100:
        errors += (so100.FeetechError,)
    return errors


if __name__ == "__main__":
    # `kill` stops like Ctrl-C: the cleanup above turns the torque off
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        main()
    except one_line_errors() as error:  # evaluated when an error arrives, after run_arm may have loaded so100
        sys.exit(f"error: {error}")  # the torque is already off
