"""Tests of infer_async.py and policy_server.py: the queue logic on a fake clock, the wire protocol, the
policy server and client over loopback (a deterministic in-test policy, a failing server, a killed server,
garbage answers), a short end-to-end run of the tiny checkpoint on the virtual arm, then Real-Time Chunking
under asynchronous inference (queue replacement, the delay estimate, the leftover on the wire, the RTC lab)."""

import json
import os
import socket
import socketserver
import subprocess
import sys
import threading
import time
import tracemalloc
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import infer_async as ia
import policy_server as ps
import so100
from infer_async import settle_run_options
from plumbing import parse_mapping

HERE = os.path.dirname(os.path.abspath(__file__))

# ------------------------------------------------------------------ helpers


class FakeClock:
    """Time that moves only when told to (or when the control loop 'sleeps')."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now

    def sleep(self, seconds):
        self.now += seconds


def chunk(first_value, n, dim=2):
    """(n, dim) actions whose row k is first_value + k in every joint."""
    return np.repeat((first_value + np.arange(n, dtype=np.float32))[:, None], dim, axis=1)


def ask(scheduler, state=(0.0, 0.0)):
    assert scheduler.wants_observation()
    return scheduler.observe(np.asarray(state, dtype=np.float32))


# ------------------------------------------------------------------ queue and scheduler


def test_trigger_threshold_and_one_request_in_flight():
    clock = FakeClock()
    s = ia.AsyncScheduler(chunk_size=10, threshold=0.5, clock=clock)
    # empty queue: ask at once, and only once while that request is in flight
    request = ask(s)
    assert request.timestep == 0 and not s.wants_observation()
    s.receive(ia.Result(request.id, actions=chunk(0, 10)))
    # 10/10, ..., 5/10 are not below g = 0.5; 4/10 is
    for remaining in (10, 9, 8, 7, 6):
        assert not s.wants_observation()
        s.next_action()
    assert len(s.queue) == 5 and not s.wants_observation()
    s.next_action()
    assert len(s.queue) == 4 and s.wants_observation()


def test_sync_asks_only_when_empty():
    s = ia.AsyncScheduler(chunk_size=4, threshold=0.0, clock=FakeClock())
    s.receive(ia.Result(ask(s).id, actions=chunk(0, 4)))
    for _ in range(4):
        assert not s.wants_observation()
        s.next_action()
    assert len(s.queue) == 0 and s.wants_observation()


def test_alignment_drops_stale_fuses_overlap_appends_rest():
    s = ia.AsyncScheduler(chunk_size=6, threshold=1.0, clock=FakeClock())
    s.receive(ia.Result(ask(s).id, actions=chunk(0, 6)))          # timesteps 0..5 hold 0..5
    assert s.next_action()[0] == 0
    request = ask(s)                                                # observed after 1 action: timestep 1
    assert request.timestep == 1
    for expected in (1, 2):                                         # two more executed while it computes
        assert s.next_action()[0] == expected
    s.receive(ia.Result(request.id, actions=chunk(100, 6)))        # timesteps 1..6 hold 100..105
    m = s.metrics
    # timesteps 1, 2 already executed; 3, 4, 5 overlap; 6 is new (the first chunk appended 6)
    assert (m.actions_dropped_stale, m.actions_fused, m.actions_appended) == (2, 3, 6 + 1)
    expected = [0.3 * old + 0.7 * new for old, new in ((3, 102), (4, 103), (5, 104))] + [105]
    np.testing.assert_allclose([a[0] for a in s.queue.actions], expected, rtol=1e-6)
    assert s.queue.next_timestep == 3


@pytest.mark.parametrize("name, weight, expected", [("latest", 0.7, 10.0), ("average", 0.7, 6.0),
                                                    ("weighted", 0.25, 4.0)])
def test_fusion_rules(name, weight, expected):
    assert ia.make_fusion(name, weight)(np.float32(2.0), np.float32(10.0)) == pytest.approx(expected)


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="aggregate"):
        ia.make_fusion("median")
    with pytest.raises(ValueError, match="threshold"):
        ia.AsyncScheduler(chunk_size=10, threshold=1.5)
    with pytest.raises(ValueError, match="similarity"):
        ia.AsyncScheduler(chunk_size=10, similarity_eps=-1)


def test_chunk_entirely_stale_leaves_queue_consistent():
    s = ia.AsyncScheduler(chunk_size=3, threshold=1.0, clock=FakeClock())
    s.receive(ia.Result(ask(s).id, actions=chunk(0, 3)))
    s.next_action()
    request = ask(s)                                          # timestep 1
    s.next_action(), s.next_action()
    s.next_action()                                           # empty: idle
    s.receive(ia.Result(request.id, actions=chunk(50, 2)))  # timesteps 1..2, both executed already
    assert len(s.queue) == 0 and s.metrics.actions_dropped_stale == 2 and s.metrics.idle_ticks == 1
    assert s.wants_observation()  # asks again straight away


def test_similarity_filter_and_empty_queue_override():
    s = ia.AsyncScheduler(chunk_size=10, threshold=0.9, similarity_eps=1.0, clock=FakeClock())
    s.receive(ia.Result(ask(s, (0.0, 0.0)).id, actions=chunk(0, 10)))
    s.next_action(), s.next_action()             # 8/10 < 0.9: wants an observation
    assert ask(s, (0.5, -1.0)) is None           # every joint within 1.0 of the last one sent: skipped
    assert s.metrics.observations_skipped_similar == 1
    request = ask(s, (0.5, 1.5))                 # one joint moved 1.5 > eps: sent
    assert request is not None and s.metrics.observations_sent == 2
    s.receive(ia.Result(request.id, actions=chunk(0, 1)))
    while len(s.queue):
        s.next_action()
    # queue empty: the same state again is sent anyway, or the arm would wait forever
    assert ask(s, (0.5, 1.5)) is not None


def test_similarity_eps_zero_disables_the_filter():
    s = ia.AsyncScheduler(chunk_size=10, threshold=1.0, similarity_eps=0.0, clock=FakeClock())
    s.receive(ia.Result(ask(s).id, actions=chunk(0, 10)))
    s.next_action()
    assert ask(s) is not None and s.metrics.observations_skipped_similar == 0  # identical state, still sent


def test_failures_rearm_with_backoff_and_never_stall():
    clock = FakeClock()
    s = ia.AsyncScheduler(chunk_size=10, threshold=0.5, similarity_eps=1.0, clock=clock,
                          retry_backoff_s=0.1, max_backoff_s=0.3)
    s.receive(ia.Result(ask(s).id, actions=chunk(0, 10)))
    for _ in range(6):
        s.next_action()
    waits = []
    for _ in range(4):                            # four failures in a row
        request = ask(s, (5.0, 5.0))              # same state every time: the filter must not block retries
        assert request is not None
        s.receive(ia.Result(request.id, error="ConnectionRefusedError: refused"))
        assert not s.wants_observation()          # backing off ...
        start = clock.now
        while not s.wants_observation():
            clock.sleep(0.01)
        waits.append(clock.now - start)           # ... then re-armed
    assert waits == pytest.approx([0.1, 0.2, 0.3, 0.3], abs=0.011)
    assert s.metrics.inference_failures == 4 and s.metrics.failure_messages[0].startswith("Connection")
    s.receive(ia.Result(ask(s).id, actions=chunk(0, 10)))
    assert s.consecutive_failures == 0 and s.backoff_s() == 0.0


class FakeArm:
    def __init__(self):
        self.sent = []

    def get_state(self):
        return np.zeros(2, dtype=np.float32)

    def send_action(self, action):
        self.sent.append(np.asarray(action).copy())


class DelayedWorker:
    """Answers every request with a chunk after a fixed number of control ticks (polls)."""

    def __init__(self, n, latency_ticks):
        self.n, self.latency_ticks, self.pending = n, latency_ticks, []

    def submit(self, request, observation):
        self.pending.append([self.latency_ticks, request])

    def poll(self):
        for item in self.pending:
            item[0] -= 1
        done = [ia.Result(r.id, actions=chunk(r.timestep, self.n), latency_s=0.1) for t, r in self.pending
                if t <= 0]
        self.pending = [item for item in self.pending if item[0] > 0]
        return done


@pytest.mark.parametrize("threshold, expected_idle", [(0.0, 90), (0.5, 0)])
def test_control_loop_matches_the_papers_analysis(threshold, expected_idle):
    """A chunk arrives 10 ticks after its observation, n = 30. Sync asks on the tick that executes the last
    action, then idles 9 ticks (≈ latency/Δt) per chunk: 10 startup ticks + 10 cycles of 30 + 9 = 400 ticks.
    Async with g·n = 15 > 10 never idles. Either way every action executes once, in timestep order."""
    clock, arm = FakeClock(), FakeArm()
    s = ia.AsyncScheduler(chunk_size=30, threshold=threshold, fuse=ia.make_fusion("latest"), clock=clock)
    m = ia.run_control_loop(arm, lambda state: {}, DelayedWorker(30, 10), s, fps=30, ticks=400,
                            clock=clock, sleep=clock.sleep, log=lambda msg: None)
    assert m.ticks == 400 and len(m.queue_sizes) == 400 and clock.now == pytest.approx(400 / 30)
    assert m.wall_s == pytest.approx(400 / 30) and m.late_ticks == 0
    assert m.startup_ticks == 10 and m.idle_ticks == expected_idle
    assert m.summary()["idle_stretches"] == expected_idle // 9
    assert m.summary()["mean_idle_stretch_ticks"] == (9 if expected_idle else 0)
    if threshold == 0:
        assert m.chunks_received == 10 and m.actions_dropped_stale == 0
    else:
        assert m.chunks_received > 10 and m.actions_dropped_stale == 9 * (m.chunks_received - 1)
    # the action for timestep k is k in every joint: executed in order, none skipped or repeated
    np.testing.assert_array_equal([a[0] for a in arm.sent], np.arange(400 - m.startup_ticks - m.idle_ticks))


def test_an_overrun_tick_is_counted_and_not_caught_up():
    clock = FakeClock()
    tick_times = []

    class SlowArm(FakeArm):
        def send_action(self, action):
            tick_times.append(clock.now)
            if len(tick_times) == 5:
                clock.sleep(0.25)  # a bus hiccup: this tick takes 2.5 periods

    s = ia.AsyncScheduler(chunk_size=20, threshold=0.5, clock=clock)
    m = ia.run_control_loop(SlowArm(), lambda state: {}, DelayedWorker(20, 1), s, fps=10, ticks=12,
                            clock=clock, sleep=clock.sleep, log=lambda msg: None)
    assert m.late_ticks == 1 and m.max_lateness_s == pytest.approx(0.15)
    # after the hiccup the ticks keep their period instead of bunching up to make up for lost time
    np.testing.assert_allclose(np.diff(tick_times), [0.1] * 4 + [0.25] + [0.1] * 5)


# ------------------------------------------------------------------ wire protocol


def test_message_round_trip_over_a_socket():
    a, b = socket.socketpair()
    with a, b:
        tensors = {"observation.state": np.arange(6, dtype=np.float32),
                   "observation.images.top": np.random.default_rng(0).integers(0, 255, (48, 64, 3), np.uint8)}
        ps.send_message(a, {"type": "observation", "task": "pick the cube ✓", "id": 3}, tensors)
        ps.send_message(a, {"type": "hello"})
        header, got = ps.recv_message(b, timeout_s=2)
        assert header == {"type": "observation", "task": "pick the cube ✓", "id": 3}
        assert got.keys() == tensors.keys()
        for key in tensors:
            assert got[key].dtype == tensors[key].dtype
            np.testing.assert_array_equal(got[key], tensors[key])
        assert ps.recv_message(b, timeout_s=2) == ({"type": "hello"}, {})


def test_one_gigabyte_announcement_is_refused_without_allocating():
    a, b = socket.socketpair()
    with a, b:
        a.sendall(ps.PREFIX.pack(ps.MAGIC, 10, 1 << 30))
        tracemalloc.start()
        try:
            with pytest.raises(ps.ProtocolError, match="limit"):
                ps.recv_message(b, timeout_s=2)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < 1 << 20


@pytest.mark.parametrize("raw, match", [
    (b"GET / HTTP/1.1\r\n\r\n", "magic"),
    (ps.PREFIX.pack(ps.MAGIC, 5, 0) + b"{nope", "JSON"),
    (ps.PREFIX.pack(ps.MAGIC, 4, 0) + b"[1] ", "JSON object"),
    (ps.PREFIX.pack(ps.MAGIC, 20_000, 0) + b"[" * 10_000 + b"]" * 10_000, "JSON"),
    (ps.PREFIX.pack(ps.MAGIC, 2 << 20, 0), "header"),
    (ps.PREFIX.pack(ps.MAGIC, 13, 8) + b'{"type": "x"}' + b"\xff" * 8, "safetensors"),
], ids=["http", "bad-json", "not-an-object", "deep-json", "huge-header", "bad-tensors"])
def test_malformed_messages_give_clear_errors(raw, match):
    a, b = socket.socketpair()
    with a, b:
        a.sendall(raw)
        with pytest.raises(ps.ProtocolError, match=match):
            ps.recv_message(b, timeout_s=2)


def test_truncated_and_silent_peers_end_in_bounded_time():
    a, b = socket.socketpair()
    with b:
        a.sendall(ps.encode_message({"type": "hello"})[:-3])
        a.close()
        with pytest.raises(ConnectionError):
            ps.recv_message(b, timeout_s=2)
    a, b = socket.socketpair()
    with a, b:
        a.sendall(ps.encode_message({"type": "hello"})[:10])
        start = time.monotonic()
        with pytest.raises(TimeoutError):
            ps.recv_message(b, timeout_s=0.3)
        assert time.monotonic() - start < 1.0


# ------------------------------------------------------------------ server and client over loopback


class AffinePolicy(torch.nn.Module):
    """A deterministic stand-in for SmolVLA: action k = state + k + mean brightness of the top camera."""

    def __init__(self, chunk_size=8, fail=False):
        super().__init__()
        self.config = SimpleNamespace(chunk_size=chunk_size, camera_keys=["observation.images.top"])
        self.fail = fail

    def predict_chunk(self, observation):
        if self.fail:
            raise RuntimeError("CUDA out of memory (simulated)")
        if "observation.images.top" not in observation:  # as SmolVLAPolicy.predict_chunk does
            raise ValueError("the observation lacks camera(s) ['observation.images.top']")
        image = observation["observation.images.top"]
        assert image.shape[0] == 3 and image.dtype == torch.uint8  # (3, H, W) pixels, as the runner hands them on
        state = torch.as_tensor(observation["observation.state"], dtype=torch.float32)
        steps = torch.arange(self.config.chunk_size, dtype=torch.float32)[:, None]
        return (state[None] + steps + image.float().mean() / 255)[None]  # (1, chunk, S)


def affine_expected(observation, chunk_size=8):
    state = observation["observation.state"]
    return state[None] + np.arange(chunk_size, dtype=np.float32)[:, None] + observation[
        "observation.images.top"].astype(np.float32).mean() / 255


def observation(value=1.0):
    return {"task": "reach", "observation.state": np.full(3, value, dtype=np.float32),
            "observation.images.top": np.full((4, 5, 3), 51, dtype=np.uint8)}


def start_server(runners, port=0):
    return ps.PolicyServer(("127.0.0.1", port), runners, idle_timeout_s=5).start()


@pytest.fixture
def server():
    server = start_server({"affine": ps.PolicyRunner(AffinePolicy()),
                           "broken": ps.PolicyRunner(AffinePolicy(fail=True))})
    yield server
    server.close_all()


def test_server_answers_hello_and_observations(server):
    client = ps.PolicyClient(server.server_address, timeout_s=2)
    assert client.hello() == {"chunk_size": 8, "cameras": ["observation.images.top"], "trained_on": {}}
    assert client.policy == "affine"  # the first one the server names
    for value in (1.0, -2.5):
        np.testing.assert_allclose(client(observation(value))["actions"], affine_expected(observation(value)), rtol=1e-6)
    client.close()


def test_server_reports_errors_and_keeps_serving(server):
    client = ps.PolicyClient(server.server_address, policy="/etc/passwd", timeout_s=2)
    with pytest.raises(ValueError, match="does not serve"):
        client.hello()
    for policy, request, match in [("/etc/passwd", observation(), "not served here"),
                                   ("broken", observation(), "out of memory"),
                                   ("affine", {"task": "x", "observation.state": np.zeros(3, np.float32)},
                                    "observation.images.top")]:
        client.policy = policy
        with pytest.raises(ps.RemoteError, match=match):
            client(request)
    client.policy = "affine"
    np.testing.assert_allclose(client(observation())["actions"], affine_expected(observation()), rtol=1e-6)


def test_server_survives_a_one_gigabyte_announcement(server):
    with socket.create_connection(server.server_address, timeout=2) as sock:
        tracemalloc.start()
        try:
            sock.sendall(ps.PREFIX.pack(ps.MAGIC, 2, 1 << 30) + b"{}")
            header, _ = ps.recv_message(sock, timeout_s=2)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert header["type"] == "error" and "limit" in header["message"] and peak < 1 << 20
        assert sock.recv(1) == b""  # the server dropped that connection ...
    client = ps.PolicyClient(server.server_address, timeout_s=2)
    assert client.hello()["chunk_size"] == 8  # ... and serves the next one


def run_remote_loop(address, ticks, fps=100, worker_timeout=0.5, on_tick=None, policy=None):
    """The real control loop against a server, with a fake arm; returns (metrics, seconds taken)."""
    client = ps.PolicyClient(address, policy=policy, timeout_s=worker_timeout)
    worker = ia.InferenceWorker(client)
    scheduler = ia.AsyncScheduler(chunk_size=8, threshold=0.5, action_dim=3, retry_backoff_s=0.02,
                                  max_backoff_s=0.1)
    arm = FakeArm()

    def sleep(seconds):
        if on_tick is not None:
            on_tick(scheduler.metrics.ticks)
        time.sleep(seconds)

    start = time.monotonic()
    try:
        metrics = ia.run_control_loop(arm, lambda state: observation(float(state[0])), worker, scheduler, fps,
                                      ticks, sleep=sleep, log=lambda msg: None)
    finally:
        worker.close()
        client.close()
    return metrics, time.monotonic() - start


def test_failing_server_never_stalls_the_loop(server):
    metrics, seconds = run_remote_loop(server.server_address, ticks=50, policy="broken")
    assert metrics.ticks == 50 and seconds < 1.5
    assert metrics.chunks_received == 0 and metrics.inference_failures >= 3
    assert "out of memory" in metrics.failure_messages[0]


def test_killed_server_then_restarted(server):
    address = server.server_address
    state = {"server": server}

    def on_tick(tick):  # (called from the loop's sleep, which a late tick skips: hence >=, once each)
        if tick >= 40 and "killed" not in state:
            state["server"].close_all()          # killed mid-run
            state["killed"] = True
        if tick >= 100 and "restarted" not in state:
            state["server"] = start_server({"affine": ps.PolicyRunner(AffinePolicy())}, port=address[1])
            state["restarted"] = True

    metrics, seconds = run_remote_loop(address, ticks=160, on_tick=on_tick)
    state["server"].close_all()
    assert metrics.ticks == 160 and seconds < 4
    arrivals = np.asarray(metrics.arrival_ticks)
    assert (arrivals < 40).any() and (arrivals > 100).any()   # chunks before the kill and after the restart
    assert metrics.inference_failures >= 1 and metrics.idle_ticks > 0
    # while the server was down the loop kept ticking: the queue ran out, then the arm held position
    assert metrics.queue_sizes[95] == 0


class GarbageServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


@pytest.mark.parametrize("answer, match", [
    (b"HTTP/1.1 200 OK\r\n\r\nnot a policy server", "magic"),
    (ps.encode_message({"type": "actions", "id": 1}, {"actions": np.full((8, 3), np.nan, np.float32)}), "NaN"),
    (ps.encode_message({"type": "actions", "id": 1}, {"actions": np.zeros((8, 5, 1), np.float32)}), "shape"),
    (ps.encode_message({"type": "actions", "id": 1}, {"actions": np.zeros((8, 4), np.float32)}), "shape"),
    (ps.encode_message({"type": "actions", "id": 1}, {"oops": np.zeros(3, np.float32)}), "unexpected answer"),
    (ps.encode_message({"type": "error", "message": "I am a teapot"}), "teapot"),
], ids=["not-the-protocol", "nan-actions", "3d-actions", "wrong-width", "no-actions", "error-reply"])
def test_garbage_answers_never_crash_the_client(answer, match):
    class Handler(socketserver.BaseRequestHandler):
        def handle(self):
            try:
                while self.request.recv(65536):
                    self.request.sendall(answer)
            except OSError:
                pass

    garbage = GarbageServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=garbage.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    try:
        metrics, seconds = run_remote_loop(garbage.server_address, ticks=30)
        assert metrics.ticks == 30 and metrics.chunks_received == 0 and metrics.inference_failures >= 1
        assert seconds < 2 and match in metrics.failure_messages[0]
    finally:
        garbage.shutdown()
        garbage.server_close()


# ------------------------------------------------------------------ command line and end to end


def test_argument_errors_are_clear():
    with pytest.raises(ValueError, match="HOST:PORT"):
        ps.parse_address("localhost")
    with pytest.raises(ValueError, match="name=value"):
        parse_mapping("top", "--cameras")
    assert parse_mapping("top=/dev/video0, wrist=2", "--cameras") == {"top": "/dev/video0", "wrist": "2"}


def test_camera_names_are_mapped_and_checked_before_opening_devices():
    policy = ["observation.images.camera1", "observation.images.camera2"]
    assert ia.camera_sources("top=/dev/video0,wrist=2", "top=camera1,wrist=camera2", policy) == {
        "observation.images.camera1": "/dev/video0", "observation.images.camera2": "2"}
    with pytest.raises(ValueError, match=r"missing \['observation.images.camera2'\], "
                                         r"unknown \['observation.images.wrist'\]"):
        ia.camera_sources("top=/dev/video0,wrist=/dev/video2", "top=camera1", policy)
    with pytest.raises(ValueError, match="--cameras name=/dev/videoN"):
        ia.camera_sources(None, None, policy)  # a real arm needs real cameras


def test_ctrl_c_stops_cleanly_with_torque_off(server, monkeypatch, tmp_path):
    """Ctrl-C in the middle of a run: the loop stops, metrics are written, every servo's torque is off."""
    open_arm = so100.open_arm  # the real one: run_arm looks it up in so100, where the patch below replaces it
    opened, sent = [], []

    def open_arm_then_interrupt(port, **options):
        arm, virtual = open_arm(port, **options)
        opened.append((arm, virtual))
        send_action = arm.send_action

        def send_or_interrupt(action):
            if len(sent) == 15:
                raise KeyboardInterrupt
            sent.append(action)
            return send_action(action)

        arm.send_action = send_or_interrupt
        return arm, virtual

    monkeypatch.setattr(so100, "open_arm", open_arm_then_interrupt)
    address = "%s:%d" % server.server_address
    start = time.monotonic()
    metrics = ia.main(["--port", "sim", "--server", address, "--fps", "50", "--duration", "60",
                       "--metrics", str(tmp_path / "m.json")])
    assert time.monotonic() - start < 20 and len(sent) == 15 and metrics.chunks_received >= 2
    assert json.loads((tmp_path / "m.json").read_text())["ticks"] == metrics.ticks
    (arm, virtual), = opened
    assert arm.bus is None  # disconnected
    assert all(servo.get("Torque_Enable") == 0 for servo in virtual.servos.values())


def test_a_policy_server_imports_no_servo_driver():
    """`infer_async.py --serve` and training run on a GPU machine: importing what they use (the policy server,
    the model, the dataset reader, the training loop) must not load so100 or pyserial."""
    modules = "infer_async, policy_server, smolvla, data, train, speed"
    code = f"import {modules}, sys; assert 'serial' not in sys.modules and 'so100' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60, cwd=HERE)


def test_a_policy_server_refusing_the_warm_up_is_one_error_line(server):
    """The server's answer to the first observation is an error: the command says so in one line."""
    command = [sys.executable, "infer_async.py", "--port", "sim", "--server", "%s:%d" % server.server_address,
               "--policy", "broken", "--duration", "1"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60, cwd=HERE)
    assert result.returncode == 1
    assert result.stderr.strip() == "error: RuntimeError: CUDA out of memory (simulated)"


TINY = os.path.join(HERE, "testdata", "smolvla_tiny", "checkpoint")
TINY_VLM = os.path.join(HERE, "testdata", "smolvla_tiny", "vlm")


def check_run(metrics, path_json, path_png, ticks):
    saved = json.loads(path_json.read_text())
    assert saved["ticks"] == ticks == metrics.ticks and len(saved["queue_sizes"]) == ticks
    assert saved["chunks_received"] >= 1 and saved["observations_sent"] >= saved["chunks_received"]
    assert saved["inference_failures"] == 0 and len(saved["inference_latency_s"]) >= 1
    assert saved["config"]["chunk_size"] == 50
    assert max(saved["queue_sizes"]) <= 50 + 50 * 0.7  # never more than what is left plus one fresh chunk
    assert path_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_runner_samples_a_guided_chunk_when_the_request_leaves_jacobian_to_the_default(tiny):
    """sample_actions' default is the reference's correction (jacobian=False, as --rtc-jacobian's default):
    a request without "jacobian" runs it."""
    frame = np.zeros((48, 64, 3), np.uint8)
    observation = {"task": "x", "observation.state": np.zeros(6, np.float32), "observation.images.top": frame,
                   "observation.images.wrist": frame, "rtc_leftover": np.zeros((30, 6), np.float32)}
    answer = ps.PolicyRunner(tiny, seed=0)({**observation, "rtc": {"mode": "guided", "inference_delay": 3}})
    explicit = ps.PolicyRunner(tiny, seed=0)({**observation, "rtc": {"mode": "guided", "inference_delay": 3,
                                                                     "jacobian": False}})
    assert answer["actions"].shape == (50, 6)
    np.testing.assert_array_equal(answer["actions"], explicit["actions"])


def test_runner_hands_camera_frames_to_the_policy_as_the_floats_they_stand_for(tiny):
    """The wire's (H, W, 3) uint8 frames reach the model as (3, H, W) pixels / 255: the runner's chunk is
    predict_chunk's on float frames made here by numpy, with the same seeded noise."""
    rng = np.random.default_rng(0)
    frames = {k: rng.integers(0, 256, (48, 64, 3), dtype=np.uint8) for k in tiny.config.camera_keys}
    observation = {"task": "x", "observation.state": np.linspace(-1, 1, 6, dtype=np.float32), **frames}
    answer = ps.PolicyRunner(tiny, seed=5)(observation)
    noise = np.random.default_rng(5).standard_normal((1, 50, tiny.config.max_action_dim), dtype=np.float32)
    as_floats = {k: torch.from_numpy(np.divide(f, np.float32(255), dtype=np.float32).transpose(2, 0, 1).copy())
                 for k, f in frames.items()}
    with torch.inference_mode():
        expected = tiny.predict_chunk({**observation, **as_floats}, noise=torch.from_numpy(noise))
    np.testing.assert_array_equal(answer["actions"], expected[0].numpy())


def test_runner_leaves_the_observation_checks_to_predict_chunk(tiny):
    runner = ps.PolicyRunner(tiny)
    frame = np.zeros((48, 64, 3), np.uint8)
    with pytest.raises(ValueError, match=r"none of the policy's cameras"):
        runner({"task": "x", "observation.state": np.zeros(6, np.float32), "observation.images.side": frame})
    with pytest.raises(ValueError, match=r"must have shape \(6,\)"):
        runner({"task": "x", "observation.state": np.zeros(5, np.float32), "observation.images.top": frame,
                "observation.images.wrist": frame})
    with pytest.raises(ValueError, match=r"\(H, W, 3\) uint8"):  # the wire's frames are the runner's own check
        runner({"task": "x", "observation.state": np.zeros(6, np.float32), "observation.images.top": frame,
                "observation.images.wrist": frame.astype(np.float32)})


def test_end_to_end_tiny_checkpoint_on_the_virtual_arm(tmp_path):
    metrics = ia.main(["--port", "sim", "--policy", TINY, "--vlm", TINY_VLM, "--task", "reach the target",
                       "--duration", "2", "--metrics", str(tmp_path / "m.json"), "--plot", str(tmp_path / "q.png")])
    check_run(metrics, tmp_path / "m.json", tmp_path / "q.png", ticks=60)


def test_end_to_end_through_a_policy_server(tmp_path):
    policy = ps.load_policy(TINY, TINY_VLM)
    server = start_server({TINY: ps.PolicyRunner(policy)})
    try:
        address = "%s:%d" % server.server_address
        metrics = ia.main(["--port", "sim", "--server", address, "--task", "reach the target", "--sync",
                           "--duration", "2", "--metrics", str(tmp_path / "m.json"),
                           "--plot", str(tmp_path / "q.png")])
    finally:
        server.close_all()
    check_run(metrics, tmp_path / "m.json", tmp_path / "q.png", ticks=60)
    assert metrics.config["threshold"] == 0.0 and metrics.actions_fused == 0  # sync: chunks never overlap


def test_run_options_come_from_what_the_policy_was_trained_on():
    """--fps, --norm-mode and --task default to the checkpoint's trained_on.json; without one, today's defaults."""
    options = lambda **given: SimpleNamespace(**({"fps": None, "norm_mode": None, "task": None} | given))
    said = []
    args = options()
    settle_run_options(args, {}, said.append)  # lerobot's checkpoints have no trained_on.json
    assert (args.fps, args.norm_mode, args.task) == (30.0, "degrees", "") and "empty instruction" in said[-1]
    args = options()
    settle_run_options(args, {"fps": 10, "norm_mode": "range_m100_100", "tasks": ["stack"]}, said.append)
    assert (args.fps, args.norm_mode, args.task) == (10.0, "range_m100_100", "stack") and "only training task" in said[-1]
    args = options(fps=30.0, task="other")
    settle_run_options(args, {"fps": 10, "tasks": ["stack"]}, said.append)
    assert (args.fps, args.task) == (30.0, "other") and "trained on 10 fps data" in said[-1]
    with pytest.raises(ValueError, match=r'--norm-mode degrees: .* trained on joints in range_m100_100'):
        settle_run_options(options(norm_mode="degrees"), {"norm_mode": "range_m100_100"})
    with pytest.raises(ValueError, match=r'give --task: .* 2 tasks \(--task "pick"; --task "place"\)'):
        settle_run_options(options(), {"tasks": ["pick", "place"]})
    with pytest.raises(ValueError, match=r"0 tasks \(none recorded\)"):
        settle_run_options(options(), {"tasks": []})


@pytest.mark.parametrize("argv, message", [
    (["--duration", "0"], "--duration positive"), (["--serve", "--port-server", "99999"], "--port-server must be 0..65535"),
    (["--metrics", "/no/such/folder/m.json"], "no folder '/no/such/folder'"),
    (["--port", "/dev/ttyACM0", "--record-video", "v.gif"], "--record-video films the toy world")])
def test_bad_values_stop_before_the_policy_loads(argv, message):
    with pytest.raises(ValueError, match=message):
        ia.main(["--policy", "/no/such/checkpoint"] + argv)  # a missing policy would fail later, differently


def test_help_shows_the_defaults():
    text = ia.build_parser().format_help()
    assert "(default: 0.7)" in text and "(default: weighted)" in text and "(default: None)" not in text
    assert "python infer_async.py --serve" in text  # the examples keep their line breaks


# ----------------------------------------------------------------------------------------------------
# Real-Time Chunking under asynchronous inference
# Real-Time Chunking in asynchronous inference (infer_async.py, policy_server.py): queue replacement, the
# delay estimate on a fake clock, the leftover in normalized units on the wire, metrics, and the virtual arm.
# ----------------------------------------------------------------------------------------------------

GUIDED = {"mode": "guided", "execution_horizon": 10, "schedule": "linear", "max_guidance_weight": 10.0,
          "jacobian": False}


def rtc_result(request, first_value, n=10):
    """A chunk for `request` whose row k is first_value + k; its normalized units are the actions / 100."""
    actions = chunk(first_value, n)
    return ia.Result(request.id, actions=actions, normalized=actions / 100)


def test_rtc_chunk_replaces_the_queue_from_the_first_action_not_yet_executed():
    clock = FakeClock()
    s = ia.AsyncScheduler(chunk_size=10, threshold=0.5, clock=clock, rtc=GUIDED, fps=10)
    first = s.observe(np.zeros(2, np.float32))
    assert first.rtc == {"rtc": {**GUIDED, "inference_delay": 0}}  # nothing to continue yet: no leftover
    clock.sleep(0.3)  # merged 3 ticks after the request
    s.receive(rtc_result(first, 0))
    executed = [s.next_action()[0] for _ in range(6)]  # timesteps 0..5
    second = s.observe(np.ones(2, np.float32))
    assert second.timestep == 6
    # the leftover: the queue (timesteps 6..9) in normalized units; d = 3 ticks of latency − 1 = 2 actions
    np.testing.assert_allclose(second.rtc["rtc_leftover"], chunk(6, 4) / 100)
    assert second.rtc["rtc"]["inference_delay"] == 2
    executed += [s.next_action()[0] for _ in range(2)]  # timesteps 6, 7 run while the chunk is computed
    s.receive(rtc_result(second, 100))
    # no fusion: rows 2.. of the new chunk (timesteps 8..15) replace what was left (timesteps 8, 9)
    np.testing.assert_array_equal([a[0] for a in s.queue.actions], 102 + np.arange(8))
    assert s.queue.chunk_ids == [second.id] * 8 and s.metrics.actions_fused == 2 and s.metrics.actions_dropped_stale == 2
    executed += [s.next_action()[0] for _ in range(3)]
    np.testing.assert_array_equal(executed, [0, 1, 2, 3, 4, 5, 6, 7, 102, 103, 104])
    # metrics: one "executed" entry per action, the chunk it came from, one switch (7 -> 102 in every joint)
    m = s.metrics
    assert [e["chunk"] for e in m.executed] == [first.id] * 8 + [second.id] * 3
    assert [e["tick"] for e in m.executed] == list(range(11)) and m.executed[8]["action"] == [102.0, 102.0]
    assert m.switch_ticks() == [8] and m.switch_jump_mean() == 95.0 and m.summary()["switch_jump_mean"] == 95.0
    # the next leftover continues from the replacing chunk
    s.next_action()
    np.testing.assert_allclose(s.observe(np.full(2, 5, np.float32)).rtc["rtc_leftover"], chunk(106, 4) / 100)


def test_delay_estimate_is_the_largest_recent_latency_plus_the_observations_age():
    clock = FakeClock()
    s = ia.AsyncScheduler(chunk_size=50, threshold=1.0, clock=clock, rtc=GUIDED, fps=30)
    for latency_ticks in (12, 4, 7):
        s.next_action()  # the queue below g = 1: a request is wanted
        request = s.observe(np.zeros(2, np.float32))
        clock.sleep(latency_ticks / 30)
        s.receive(rtc_result(request, 0, n=50))
    assert s.inference_delay() == 11  # max(12, 4, 7) ticks from request to merge: 11 actions ran meanwhile
    assert s.inference_delay(age_s=0.1) == 14  # an observation read 3 ticks before it was sent
    for _ in range(46):
        s.next_action()
    assert s.inference_delay() == 4  # never more than the queue holds
    # the window forgets: ten short latencies later the 12-tick one no longer counts
    for _ in range(10):
        s.next_action()
        request = s.observe(np.zeros(2, np.float32))
        clock.sleep(2 / 30)
        s.receive(rtc_result(request, 0, n=50))
    assert s.inference_delay() == 1
    # a failed request (here a 40-tick timeout) measured no latency: the estimate stays
    s.next_action()
    request = s.observe(np.zeros(2, np.float32))
    clock.sleep(40 / 30)
    s.receive(ia.Result(request.id, None, error="timeout"))
    assert s.inference_delay() == 1


def test_without_rtc_chunks_are_fused_and_the_newest_chunk_is_recorded():
    s = ia.AsyncScheduler(chunk_size=4, threshold=1.0, fuse=ia.make_fusion("average"), clock=FakeClock())
    first = s.observe(np.zeros(2, np.float32))
    assert first.rtc == {}
    s.receive(ia.Result(first.id, actions=chunk(0, 4)))
    s.next_action()
    second = s.observe(np.zeros(2, np.float32))
    s.receive(ia.Result(second.id, actions=chunk(10, 4)))  # timesteps 1..4: 3 fused, 1 appended
    assert s.queue.chunk_ids == [second.id] * 4
    while s.next_action() is not None:
        pass
    assert s.metrics.switch_ticks() == [1] and s.metrics.switch_jump_mean() == pytest.approx(5.5 - 0)


class RecordingPolicy(torch.nn.Module):
    """Records the keywords of each predict_chunk call; actions = state + k, normalized = actions / 2."""

    def __init__(self):
        super().__init__()
        self.config = SimpleNamespace(chunk_size=8, camera_keys=["observation.images.top"], max_action_dim=4)
        self.trained_on, self.calls = {"rtc_max_delay": 3}, []

    def predict_chunk(self, observation, **kwargs):
        self.calls.append(kwargs)
        state = torch.as_tensor(observation["observation.state"])
        return (state[None] + torch.arange(8.0)[:, None])[None]  # (1, 8, 3)

    def normalize(self, feature, feature_type, x):
        return x / 2


def test_leftover_travels_as_safetensors_to_the_policy_and_back_normalized():
    policy = RecordingPolicy()
    server = start_server({"recording": ps.PolicyRunner(policy)})
    client = ps.PolicyClient(server.server_address, timeout_s=5)
    try:
        leftover = np.arange(12, dtype=np.float32).reshape(4, 3)
        answer = client({**observation(1.0), "rtc": {**GUIDED, "inference_delay": 2}, "rtc_leftover": leftover})
        np.testing.assert_allclose(answer["actions"], 1 + np.arange(8, dtype=np.float32)[:, None].repeat(3, 1))
        np.testing.assert_allclose(answer["normalized"], answer["actions"] / 2)
        call = policy.calls[-1]
        assert call["rtc_mode"] == "guided" and call["inference_delay"] == 2 and call["jacobian"] is False
        np.testing.assert_array_equal(call["leftover"], leftover[None])
        # trained: no guidance, and the delay capped at what the policy was trained with (rtc_max_delay 3)
        client({**observation(1.0), "rtc": {"mode": "trained", "inference_delay": 6}, "rtc_leftover": leftover})
        assert policy.calls[-1]["rtc_mode"] == "trained" and policy.calls[-1]["inference_delay"] == 3
        # without RTC the answer is the chunk alone, and no RTC keyword reaches the policy
        assert list(client(observation(1.0))) == ["actions"] and policy.calls[-1] == {}
        policy.trained_on = {}
        with pytest.raises(ps.RemoteError, match="needs a policy trained with --rtc-max-delay"):
            client({**observation(1.0), "rtc": {"mode": "trained"}})
    finally:
        client.close()
        server.close_all()


def test_runner_seed_makes_the_noise_reproducible(tiny):
    frame = np.full((48, 64, 3), 100, np.uint8)
    obs = {"task": "x", "observation.state": np.zeros(6, np.float32), "observation.images.top": frame,
           "observation.images.wrist": frame}
    a, b = ps.PolicyRunner(tiny, seed=3), ps.PolicyRunner(tiny, seed=3)
    first = a(obs)["actions"]
    np.testing.assert_array_equal(first, b(obs)["actions"])
    assert np.abs(a(obs)["actions"] - first).max() > 1e-3  # the next chunk draws new noise
    # guided, with the paper's Jacobian: the answer carries the chunk in normalized units too
    answer = a({**obs, "rtc": {**GUIDED, "jacobian": True, "inference_delay": 3},
                "rtc_leftover": np.zeros((20, 6), np.float32)})
    normalized = tiny.normalize("action", "ACTION", torch.from_numpy(answer["actions"]))
    np.testing.assert_allclose(answer["normalized"], normalized.numpy(), atol=1e-5)


def test_virtual_arm_with_guided_rtc_records_what_it_executed(tmp_path):
    metrics = ia.main(["--port", "sim", "--policy", TINY, "--vlm", TINY_VLM, "--task", "reach the target",
                       "--duration", "2", "--rtc", "guided", "--seed", "0", "--metrics", str(tmp_path / "m.json"),
                       "--plot", str(tmp_path / "q.png")])
    saved = json.loads((tmp_path / "m.json").read_text())
    assert saved["config"]["rtc"]["mode"] == "guided" and saved["inference_failures"] == 0
    assert len(saved["executed"]) == saved["ticks"] - saved["idle_ticks"] - saved["startup_ticks"] > 0
    assert all(len(e["action"]) == 6 for e in saved["executed"])
    assert saved["chunks_received"] >= 2 and saved["switch_jump_mean"] == metrics.switch_jump_mean() >= 0
    assert (tmp_path / "q.png").read_bytes()[:4] == b"\x89PNG"


# --- the RTC lab's world and its simulated clock (demo.py) ---------------------------------------------------


def test_two_mirror_targets_the_expert_picks_either_and_either_succeeds():
    import demo
    import toy_world

    scene, rng, sides = toy_world.ReachScene(seed=0, targets=2), np.random.default_rng(0), []
    for _ in range(30):
        episode = demo.expert_episode(scene, rng, length=20)
        targets = np.vstack([scene.target, scene.distractors])  # (2, 2): mirror images up to the jitter
        assert np.abs(targets[0] * [-1, 1] - targets[1]).max() <= 2 * toy_world.TARGET_JITTER_M + 1e-9
        assert scene.success(episode["observation.state"][-1])  # the expert reaches its choice ...
        other = np.zeros(6)
        other[:3] = toy_world.inverse_kinematics(scene.distractors[0])
        assert scene.success(other)  # ... and touching the other one succeeds as well
        sides.append(np.sign(scene.target[0]))
    assert 5 < sides.count(1.0) < 25  # it picks left and right
    red = np.argwhere((scene.render(toy_world.HOME_DEG)[..., 0] > 150) & (scene.render(toy_world.HOME_DEG)[..., 1] < 80))
    assert red[:, 1].min() < 28 and red[:, 1].max() > 36  # both discs are drawn


class ExpertPolicy(RecordingPolicy):
    """The scripted expert as a policy (chunk 10): it reaches the left target whatever the keywords say."""

    def __init__(self, trained=True):
        super().__init__()
        self.config = SimpleNamespace(chunk_size=10, camera_keys=["observation.images.top"], max_action_dim=8)
        self.trained_on = {"rtc_max_delay": 8} if trained else {}

    def predict_chunk(self, observation, **kwargs):
        import toy_world

        self.calls.append(kwargs)
        scene, joints, chunk_ = toy_world.ReachScene(), np.asarray(observation["observation.state"]), []
        scene.target = np.array([-0.15, 0.15])
        for _ in range(10):
            joints = scene.expert_action(joints)
            chunk_.append(joints)
        return torch.from_numpy(np.stack(chunk_))[None]


def test_rtc_lab_runs_every_mode_and_delay_on_a_simulated_clock():
    import demo

    policy = ExpertPolicy()
    rows = demo.rtc_lab(policy, episodes=3, length=30, seed=0, delays=(0, 4))
    assert [(r["mode"], r["delay_ticks"]) for r in rows] == [
        (m, d) for m in ("off", "guided", "guided_jacobian", "trained") for d in (0, 4)]
    assert all(0 <= r["success_rate"] <= 1 and r["switch_jump_mean"] > 0 for r in rows)
    # the requests of the RTC modes carry the simulated delay once a latency has been seen
    delays = {c["inference_delay"] for c in policy.calls if "inference_delay" in c}
    assert delays == {0, 4} and {c["rtc_mode"] for c in policy.calls if "rtc_mode" in c} == {"guided", "trained"}
    assert {c["jacobian"] for c in policy.calls if c.get("rtc_mode") == "guided"} == {False, True}
    assert "trained" not in {r["mode"] for r in demo.rtc_lab(ExpertPolicy(trained=False), 1, 5, 0)}


def test_bad_rtc_options_stop_at_the_warm_up():
    common = ["--port", "sim", "--policy", TINY, "--vlm", TINY_VLM, "--duration", "1"]
    with pytest.raises(ValueError, match="unknown RTC schedule 'cosine'"):
        ia.main(common + ["--rtc", "guided", "--rtc-schedule", "cosine"])
    with pytest.raises(ValueError, match="needs a policy trained with --rtc-max-delay"):
        ia.main(common + ["--rtc", "trained"])


def test_demo_with_rtc_training_in_miniature(tmp_path, monkeypatch):
    """demo.py --targets 2 --rtc-max-delay 3 --rtc-prefix-offset 0.2 (chunks of 10): each batch draws its prefixes
    and their offsets, the checkpoint says it was trained so (trained_on.json, not config.json), and eval.json
    holds the RTC lab."""
    import demo
    import flow
    import train
    from smolvla import SmolVLA

    delays, compute_loss, offsets = [], SmolVLA.compute_loss, []
    monkeypatch.setattr(train, "prefix_offsets", lambda *a: offsets.append(a) or flow.prefix_offsets(*a))

    def spy(self, *args):  # policy.training_loss passes (images, ..., noise, time, rtc_delay)
        delays.append(args[8])
        return compute_loss(self, *args)

    monkeypatch.setattr(SmolVLA, "compute_loss", spy)
    output = tmp_path / "demo"
    demo.main(["--targets", "2", "--rtc-max-delay", "3", "--steps", "4", "--batch-size", "8", "--chunk-size", "10",
               "--episodes", "4", "--length", "12", "--eval-episodes", "1", "--output", str(output),
               "--rtc-prefix-offset", "0.2"])
    drawn = torch.cat(delays[:4])
    assert drawn.shape == (32,) and drawn.min() >= 0 and drawn.max() <= 3 and len(drawn.unique()) > 1
    assert len(offsets) == 4 and all(a[1:] == (10, 6, 0.2) and a[0] is d for a, d in zip(offsets, delays))
    checkpoint = output / "checkpoints" / "last" / "pretrained_model"
    assert json.load(open(checkpoint / "trained_on.json"))["rtc_max_delay"] == 3
    assert "rtc_max_delay" not in json.load(open(checkpoint / "config.json"))  # lerobot's parser would refuse it
    lab = json.load(open(output / "eval.json"))["rtc_lab"]
    assert [(r["mode"], r["delay_ticks"]) for r in lab] == [
        (m, d) for m in ("off", "guided", "guided_jacobian", "trained") for d in (0, 4, 8)]
