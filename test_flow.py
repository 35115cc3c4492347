"""flow.py: flow matching on its own (its toy: the policy's own functions learn two modes, not their
average), then Real-Time Chunking, its second half (the reference's vectors, written-out computations,
autograd on a toy velocity field, the properties of the schedules, the weights and the hard prefix)."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from flow import (euler_sample, guidance_weight, guided_sample, guided_velocity, prefix_offsets, prefix_sample,
                  prefix_weights, sample_toy, train_toy, two_modes)
from policy import SmolVLAPolicy

HERE = os.path.dirname(os.path.abspath(__file__))


def test_flow_matching_samples_both_modes_where_regression_averages():
    model = train_toy(steps=400, seed=0)
    samples = sample_toy(model, n=2000)  # (n, 2) from noise by 10 Euler steps
    left, right = (samples[:, 0] < -1).float().mean(), (samples[:, 0] > 1).float().mean()
    assert 0.35 < left < 0.65 and 0.35 < right < 0.65  # both modes, about half each
    assert left + right > 0.85  # few samples in between, where the data has none
    # the modes' centres, (−2, 0) and (+2, 0), within 0.3
    for centre, part in ((-2.0, samples[samples[:, 0] < -1]), (2.0, samples[samples[:, 0] > 1])):
        torch.testing.assert_close(part.mean(0), torch.tensor([centre, 0.0]), atol=0.3, rtol=0)
    # regression on the same data learns the average, a point between the modes that no sample should be
    data = two_modes(4000, torch.Generator().manual_seed(3))[:, 0]
    assert data.mean(0).abs().max() < 0.15


@pytest.mark.parametrize("argv, message", [(["--steps", "0"], "--steps must be at least 1"),
                                           (["--plot", "no/such/folder/toy.png"], "its folder does not exist")])
def test_the_toy_refuses_bad_values_in_one_line(argv, message):
    result = subprocess.run([sys.executable, os.path.join(HERE, "flow.py"), *argv], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr


# ----------------------------------------------------------------------------------------------------
# Real-Time Chunking (flow.py's second half)
# Real-Time Chunking (flow.py, SmolVLA.sample_actions/compute_loss): the reference's vectors
# (testdata/smolvla_tiny/rtc.*), independent written-out computations on other configurations, autograd on a
# toy velocity field, and the properties the schedules, the weights and the hard prefix guarantee.
# ----------------------------------------------------------------------------------------------------

TINY = os.path.join(HERE, "testdata", "smolvla_tiny")
VARIANTS = os.path.join(HERE, "testdata", "smolvla_variants")
TOL = 1e-5


def tiny_inputs(io):
    masks = [torch.ones(io["state"].shape[0], dtype=torch.bool)] * 2
    return [io["image0"], io["image1"]], masks, io["lang_tokens"], io["lang_masks"], io["state"]


# --- parity with the reference (lerobot 0.4.4's RTCProcessor) ---------------------------------------------


@pytest.mark.parametrize("case", json.load(open(os.path.join(TINY, "rtc.json"))), ids=lambda c: f"case{c['case']}")
def test_guided_sampling_without_jacobian_matches_reference(tiny, io, case):
    rtc = load_file(os.path.join(TINY, "rtc.safetensors"))
    k = case["case"]
    chunk = tiny.sample_actions(*tiny_inputs(io), noise=io["sample_noise"], leftover=rtc[f"rtc{k}_prefix"],
                                inference_delay=case["inference_delay"], execution_horizon=case["execution_horizon"],
                                schedule=case["schedule"], max_guidance_weight=case["max_guidance_weight"],
                                jacobian=False)
    torch.testing.assert_close(chunk, rtc[f"rtc{k}_expected"], atol=TOL, rtol=0)
    assert (chunk - io["expected_sampled"]).abs().max() > 0.1  # the guidance changed the chunk


# --- the pieces: schedules, weights, the vector-Jacobian product -----------------------------------------


def test_prefix_weights_for_each_schedule():
    # d = 2 frozen steps, the ramp ends at H = 6, chunk of 8: c_i = (H − i)/(H − d + 1) = 4/5 .. 1/5
    ramp = torch.tensor([0.8, 0.6, 0.4, 0.2])
    expected = {"zeros": [1, 1, 0, 0, 0, 0, 0, 0], "ones": [1, 1, 1, 1, 1, 1, 0, 0],
                "linear": [1, 1, *ramp.tolist(), 0, 0],
                "exp": [1, 1, *(ramp * (torch.exp(ramp) - 1) / (math.e - 1)).tolist(), 0, 0]}
    for schedule, weights in expected.items():
        torch.testing.assert_close(prefix_weights(2, 6, 8, schedule), torch.tensor(weights, dtype=torch.float32))
    # d is capped at H; H past the chunk: the ramp runs to the chunk's end; d = H: no ramp
    torch.testing.assert_close(prefix_weights(5, 3, 6, "linear"), torch.tensor([1.0, 1, 1, 0, 0, 0]))
    torch.testing.assert_close(prefix_weights(1, 10, 4, "linear"), torch.tensor([1.0, 0.75, 0.5, 0.25]))
    torch.testing.assert_close(prefix_weights(0, 0, 3, "ones"), torch.zeros(3))
    with pytest.raises(ValueError, match="unknown RTC schedule"):
        prefix_weights(1, 2, 3, "cosine")


def test_guidance_weight_is_capped_and_infinite_limits_give_the_cap():
    # τ = 1 − t; c = (1 − τ)/τ; 1/r² = ((1 − τ)² + τ²)/(1 − τ)²
    assert guidance_weight(0.5, 10.0).item() == pytest.approx(2.0)  # c = 1, 1/r² = 2
    assert guidance_weight(0.8, 100.0).item() == pytest.approx(4 * (0.64 + 0.04) / 0.64, rel=1e-6)
    assert guidance_weight(0.9, 5.0).item() == 5.0  # 9 · 1.0123 capped at β
    assert guidance_weight(1.0, 7.0).item() == 7.0  # τ = 0: c = ∞ -> β
    assert guidance_weight(0.0, 7.0).item() == 7.0  # τ = 1: 0·∞ = NaN -> β (the limit is +∞)


def toy_velocity(x, time):
    """A nonlinear field whose Jacobian is far from 0: mixes steps and dims, depends on the time."""
    generator = torch.Generator().manual_seed(0)
    mix_steps = torch.randn(x.shape[1], x.shape[1], generator=generator)  # (T, T)
    mix_dims = torch.randn(x.shape[2], x.shape[2], generator=generator)  # (A, A)
    return torch.tanh(torch.einsum("st,btd,de->bse", mix_steps, x, mix_dims)) * (1 + time[:, None, None]) + x**2


def test_jacobian_correction_is_the_vector_jacobian_product_of_autograd():
    torch.manual_seed(0)
    x, target = torch.randn(2, 5, 3), torch.randn(2, 5, 3)
    weights, t, beta = prefix_weights(2, 4, 5, "exp"), 0.7, 10.0
    guided = guided_velocity(toy_velocity, x, t, target, weights, beta, jacobian=True)
    # written out: Â = x − t·v(x); e = W·(Y − Â); correction = (∂Â/∂x)ᵀ e, the full Jacobian by autograd
    time = torch.full((2,), t)
    v = toy_velocity(x, time)
    error = (target - (x - t * v)) * weights[None, :, None]
    for b in range(2):
        jacobian = torch.autograd.functional.jacobian(lambda xb: xb - t * toy_velocity(xb[None], time[:1])[0], x[b])
        correction = torch.einsum("sd,sdte->te", error[b], jacobian)  # (T, A)
        torch.testing.assert_close(guided[b], v[b] - guidance_weight(t, beta) * correction, atol=1e-5, rtol=1e-5)
    # a causal field (step i sees steps ≤ i): the product through the steps with W > 0 alone is the same
    causal_field = lambda x, time: torch.cumsum(torch.tanh(x), dim=1) * (1 + time[:, None, None]) + x**2  # noqa: E731
    full = guided_velocity(causal_field, x, t, target, weights, beta, jacobian=True)
    torch.testing.assert_close(guided_velocity(causal_field, x, t, target, weights, beta, True, causal=True), full)
    # the reference's correction is the weighted error itself; the two differ on a nonlinear field
    identity = guided_velocity(toy_velocity, x, t, target, weights, beta, jacobian=False)
    torch.testing.assert_close(identity, v - guidance_weight(t, beta) * error)
    assert (identity - guided).abs().max() > 0.1


# --- other configurations: a written-out guided Euler loop on the reference's variants --------------------


@pytest.mark.parametrize("variant", ["three_cams_empty", "max_length_padding"])
def test_guided_sampling_matches_a_written_out_loop_on_variants(variant):
    """3 cameras with an empty slot and chunk 10; max_length language padding and chunk 16."""
    directory = os.path.join(VARIANTS, variant)
    io = load_file(os.path.join(directory, "io.safetensors"))
    cams = json.load(open(os.path.join(directory, "io.json")))["camera_keys_present"]
    model = SmolVLAPolicy.from_pretrained(os.path.join(directory, "checkpoint"), vlm=os.path.join(directory, "vlm"))
    batch = io["state"].shape[0]
    inputs = ([io[f"image{i}"] for i in range(len(cams))], [torch.ones(batch, dtype=torch.bool)] * len(cams),
              io["lang_tokens"], io["lang_masks"], io["state"])
    noise, chunk = io["sample_noise"], model.config.chunk_size
    # a leftover shorter than the chunk (by 3 steps) and narrower than max_action_dim (6 real dims)
    leftover = torch.randn(batch, chunk - 3, 6, generator=torch.Generator().manual_seed(1))
    d, horizon, beta = 2, 8, 5.0
    guided = model.sample_actions(*inputs, noise=noise, leftover=leftover, inference_delay=d, execution_horizon=horizon,
                                  schedule="linear", max_guidance_weight=beta, jacobian=False)
    # written out: Y zero-padded; W = 1 for i < d, (H' − i)/(H' − d + 1) for d ≤ i < H' = min(H, T_prev), else 0
    with torch.no_grad():
        ctx = model.encode_observation(*inputs)
        target = torch.zeros_like(noise)
        target[:, : chunk - 3, :6] = leftover
        h = min(horizon, chunk - 3)
        weights = torch.tensor([1.0 if i < d else (h - i) / (h - d + 1) if i < h else 0.0 for i in range(chunk)])
        x, n = noise.clone(), model.config.num_steps
        for step in range(n):
            t = 1.0 - step / n
            v = model.velocity(ctx, x, torch.full((batch,), t))
            tau = 1 - t
            w = beta if tau == 0 else min(beta, (1 - tau) / tau * ((1 - tau) ** 2 + tau**2) / (1 - tau) ** 2)
            x = x - (v - w * weights[None, :, None] * (target - (x - t * v))) / n
    torch.testing.assert_close(guided, x, atol=TOL, rtol=0)
    # properties: all-zero weights (schedule zeros, d = 0) is the plain sampler exactly; the guidance pulls
    # the guided steps toward the leftover
    unguided = model.sample_actions(*inputs, noise=noise, leftover=leftover, inference_delay=0, schedule="zeros")
    torch.testing.assert_close(unguided, io["expected_sampled"], atol=TOL, rtol=0)
    distance = lambda a: (a[:, :d, :6] - leftover[:, :d]).abs().mean()  # noqa: E731
    assert distance(guided) < 0.5 * distance(unguided)
    # the paper's correction (vector-Jacobian product through the expert) pulls toward the leftover too; it
    # differentiates through the first min(H, T_prev) action tokens alone (causal), as the whole chunk would
    with_jacobian = model.sample_actions(*inputs, noise=noise, leftover=leftover, inference_delay=d,
                                         execution_horizon=horizon, max_guidance_weight=beta, jacobian=True)
    assert torch.isfinite(with_jacobian).all() and distance(with_jacobian) < 0.5 * distance(unguided)
    with torch.no_grad():
        whole = guided_sample(lambda x, t: model.velocity(ctx, x, t), noise, model.config.num_steps, leftover, d,
                              horizon, "linear", max_guidance_weight=beta, jacobian=True, causal=False)
    torch.testing.assert_close(with_jacobian, whole, atol=TOL, rtol=0)


# --- training-time RTC: per-token flow time ---------------------------------------------------------------


def test_trained_rtc_sampling_holds_the_prefix_and_is_plain_sampling_without_one(tiny, io):
    leftover = torch.randn(2, 40, 6, generator=torch.Generator().manual_seed(2))
    chunk = tiny.sample_actions(*tiny_inputs(io), noise=io["sample_noise"], leftover=leftover, inference_delay=5,
                                rtc_mode="trained")
    assert torch.equal(chunk[:, :5, :6], leftover[:, :5]) and torch.equal(chunk[:, :5, 6:], torch.zeros(2, 5, 2))
    assert (chunk[:, 5:] - io["expected_sampled"][:, 5:]).abs().max() > 1e-3  # the rest saw the prefix
    none = tiny.sample_actions(*tiny_inputs(io), noise=io["sample_noise"], leftover=leftover, inference_delay=0,
                               rtc_mode="trained")
    torch.testing.assert_close(none, io["expected_sampled"], atol=TOL, rtol=0)


def test_prefix_sample_feeds_the_prefix_at_flow_time_zero():
    seen = []

    def velocity(x, time):  # (B, T, A), (B, T)
        seen.append((x.clone(), time.clone()))
        return torch.ones_like(x)

    leftover = torch.arange(6.0).reshape(1, 3, 2)
    out = prefix_sample(velocity, torch.zeros(1, 4, 2), 4, leftover, inference_delay=2)
    for step, (x, time) in enumerate(seen):
        assert torch.equal(x[:, :2], leftover[:, :2]) and torch.equal(time[0, :2], torch.zeros(2))
        torch.testing.assert_close(time[0, 2:], torch.full((2,), 1 - step / 4))
    torch.testing.assert_close(out[0, 2:], torch.full((2, 2), -1.0))  # 4 steps of dt = −1/4 with v = 1
    # without a prefix it is the plain Euler sampler
    noise = torch.randn(2, 4, 2)
    field = lambda x, t: x * (t[..., None] if t.ndim == 2 else t[:, None, None])  # noqa: E731
    torch.testing.assert_close(prefix_sample(field, noise, 5, torch.zeros(2, 4, 2), 0), euler_sample(field, noise, 5))


def test_prefix_sample_leaves_the_callers_noise_as_it_was():
    noise, leftover = torch.randn(2, 6, 3), torch.randn(2, 4, 3)
    kept = noise.clone()
    chunk = prefix_sample(lambda x, time: -x, noise, 3, leftover, inference_delay=2)
    assert torch.equal(noise, kept) and torch.equal(chunk[:, :2], leftover[:, :2])


def test_training_with_rtc_delay_shows_clean_prefixes_and_leaves_them_out_of_the_loss(tiny, io):
    captured = {}
    velocity = tiny.velocity

    def spy(ctx, x, time):
        captured.setdefault("x", x), captured.setdefault("time", time)  # the first call's
        return velocity(ctx, x, time)

    tiny.velocity = spy
    try:
        delay, time = torch.tensor([0, 7]), torch.tensor([0.4, 0.9])
        with torch.no_grad():
            losses = tiny.compute_loss(*tiny_inputs(io), io["actions"], noise=io["noise"], time=time, rtc_delay=delay)
            plain = tiny.compute_loss(*tiny_inputs(io), io["actions"], noise=io["noise"], time=time)
    finally:
        del tiny.velocity
    x, token_time = captured["x"], captured["time"]
    assert torch.equal(x[1, :7, :6], io["actions"][1, :7]) and torch.equal(token_time[1, :7], torch.zeros(7))
    torch.testing.assert_close(token_time[1, 7:], torch.full((43,), 0.9))
    assert torch.equal(losses[1, :7], torch.zeros(7, 8)) and (losses[1, 7:] > 0).any()
    torch.testing.assert_close(losses[0], plain[0], atol=TOL, rtol=0)  # delay 0: the plain loss
    # the batch loss averages only over the tokens outside the prefixes (and the real action dims)
    stats = tiny.stats
    robot = lambda x, f: x * (stats[f]["std"] + 1e-8) + stats[f]["mean"]  # noqa: E731
    batch = {"observation.state": robot(io["state"], "observation.state"), "action": robot(io["actions"], "action"),
             "observation.images.top": io["image0"], "observation.images.wrist": io["image1"],
             "task": ["a", "b"], "rtc_delay": delay}
    with torch.no_grad():
        loss = tiny.training_loss(batch, noise=io["noise"], time=time)
        tokens, token_masks = tiny.tokenize(batch["task"])
        inputs = tiny_inputs(io)[:2] + (tokens, token_masks, io["state"])
        per_element = tiny.compute_loss(*inputs, io["actions"], noise=io["noise"], time=time, rtc_delay=delay)
    expected = per_element[:, :, :6].sum() / ((50 + 43) * 6)
    torch.testing.assert_close(loss, expected, atol=1e-6, rtol=1e-5)


def test_prefix_offsets_shift_the_given_actions_and_fade_out_after_them():
    torch.manual_seed(0)
    offsets = prefix_offsets(torch.tensor([0, 3, 8]), chunk_size=20, action_dim=6, sigma=0.5, settle_steps=5)
    assert offsets.shape == (3, 20, 6)
    assert torch.equal(offsets[0], torch.zeros(20, 6))  # no prefix: nothing shifted
    for b, d in ((1, 3), (2, 8)):
        delta = offsets[b, 0]
        assert (delta != 0).all() and torch.equal(offsets[b, :d], delta.expand(d, 6))  # the whole prefix, alike
        for k in range(1, 6):  # 0.8, 0.6, 0.4, 0.2, 0 of it after the prefix
            torch.testing.assert_close(offsets[b, d + k - 1], (1 - k / 5) * delta)
        assert torch.equal(offsets[b, d + 4:], torch.zeros(20 - d - 4, 6))
    many = prefix_offsets(torch.ones(20000, dtype=torch.long), chunk_size=4, action_dim=2, sigma=0.5)[:, 0]
    assert abs(many.std().item() - 0.5) < 0.01 and abs(many.mean().item()) < 0.01  # δ ~ N(0, σ²) per sample and dim


def test_training_loss_shifts_the_normalized_actions_by_the_offsets(tiny, io, monkeypatch):
    """batch["rtc_offset"] (train.py --rtc-prefix-offset) is added to the actions in the policy's normalized units."""
    torch.manual_seed(0)
    stats, delay, time = tiny.stats, torch.tensor([2, 7]), torch.tensor([0.4, 0.9])
    robot = lambda x, f: x * (stats[f]["std"] + 1e-8) + stats[f]["mean"]  # noqa: E731
    offsets = prefix_offsets(delay, 50, 6, sigma=0.3)
    batch = {"observation.state": robot(io["state"], "observation.state"), "action": robot(io["actions"], "action"),
             "observation.images.top": io["image0"], "observation.images.wrist": io["image1"],
             "task": ["a", "b"], "rtc_delay": delay, "rtc_offset": offsets}
    seen, compute_loss = [], tiny.compute_loss
    monkeypatch.setattr(tiny, "compute_loss", lambda *args: seen.append(args[5]) or compute_loss(*args))
    with torch.no_grad():
        shifted = tiny.training_loss(batch, noise=io["noise"], time=time)
        unshifted = {key: value for key, value in batch.items() if key != "rtc_offset"}
        moved = tiny.training_loss({**unshifted, "action": robot(io["actions"] + offsets, "action")}, noise=io["noise"],
                                   time=time)
    torch.testing.assert_close(seen[0], io["actions"] + offsets, atol=1e-5, rtol=0)  # what the loss learns from
    torch.testing.assert_close(shifted, moved, atol=1e-5, rtol=1e-5)


def test_bench_times_a_guided_chunk():
    import bench

    tiny = ["--checkpoint", os.path.join(TINY, "checkpoint"), "--vlm", os.path.join(TINY, "vlm"), "--height", "48"]
    result = bench.main(tiny + ["--width", "64", "--threads", "1", "--dtype", "fp32", "--repeats", "1", "--warmup",
                                "0", "--rtc", "jacobian"])
    assert result["rtc"] == "jacobian" and result["rtc_chunk_s"] > 0 and len(result["rtc_wall_s"]) == 1
    assert result["rtc_vs_plain"] == result["rtc_chunk_s"] / result["chunk_s"]
