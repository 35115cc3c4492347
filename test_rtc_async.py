"""Real-Time Chunking in asynchronous inference (infer_async.py, policy_server.py): queue replacement, the
delay estimate on a fake clock, the leftover in normalized units on the wire, metrics, and the virtual arm."""

import json
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import infer_async as ia
import policy_server as ps
from test_infer_async import FakeClock, chunk, observation, start_server

HERE = os.path.dirname(os.path.abspath(__file__))
TINY = os.path.join(HERE, "testdata", "smolvla_tiny", "checkpoint")
TINY_VLM = os.path.join(HERE, "testdata", "smolvla_tiny", "vlm")
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
