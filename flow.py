"""Flow matching: how SmolVLA turns noise into an action chunk (SmolVLA paper §3.2).

The action expert does not predict actions directly. It predicts a *velocity field*: given a noisy chunk
x_τ and the flow time τ, it says in which direction to move x_τ to get closer to a real chunk.

Training (conditional flow matching with a straight path between data and noise):

    A ~ data (a chunk of actions), ε ~ N(0, I), τ ~ Beta(1.5, 1)·0.999 + 0.001
    x_τ = τ·ε + (1 − τ)·A              τ = 1 is pure noise, τ = 0 is the data
    u   = dx_τ/dτ = ε − A              the target velocity, the same at every τ on this straight path
    loss = ‖v_θ(x_τ, τ, observation) − u‖²

Beta(1.5, 1) puts more samples near τ = 1 (noisy, hard) than near τ = 0; the affine map keeps τ away
from exactly 0. Sampling integrates dx/dτ = v from τ = 1 (noise) to τ = 0 (actions) with a few Euler
steps: x ← x + dτ·v with dτ = −1/num_steps.

This file knows nothing about transformers: `velocity` is any function (x_τ, τ) -> v. The sine-cosine
time embedding, the expert's only way to know τ, lives here as well. `python flow.py` runs the idea alone
on a toy (a small MLP learns a two-mode distribution in the plane in a few seconds; `--plot PNG` draws it):
the samples land in both modes, where a regression would average them into neither.

The second half of the file is Real-Time Chunking (RTC): sampling the next chunk so that it continues the
actions the robot is already committed to (guided, at inference; or trained, with a per-token flow time).
"""

import math

import torch


def sample_time(batch_size: int, device=None) -> torch.Tensor:
    """τ ~ Beta(1.5, 1)·0.999 + 0.001, one per sample: (B,) float32 in [0.001, 1]."""
    beta = torch.distributions.Beta(torch.tensor(1.5), torch.tensor(1.0))
    return (beta.sample((batch_size,)) * 0.999 + 0.001).to(device=device, dtype=torch.float32)


def sample_noise(shape, device=None) -> torch.Tensor:
    """ε ~ N(0, I) in float32, the starting point of sampling and the far end of the training path."""
    return torch.randn(shape, dtype=torch.float32, device=device)


def noisy_actions_and_target(actions: torch.Tensor, noise: torch.Tensor, time: torch.Tensor):
    """The point x_τ on the straight path from the actions (τ=0) to the noise (τ=1), and its velocity u.

    actions, noise: (B, T, A); time: (B,) or, one per action token (training-time RTC), (B, T)
    -> x_τ (B, T, A), u (B, T, A)
    """
    tau = time[:, None, None] if time.ndim == 1 else time[:, :, None]  # (B, 1 or T, 1)
    x_t = tau * noise + (1 - tau) * actions
    u_t = noise - actions
    return x_t, u_t


def flow_matching_loss(predicted_velocity: torch.Tensor, target_velocity: torch.Tensor) -> torch.Tensor:
    """Per-element squared error (B, T, A); the caller masks padded steps/dims and averages."""
    return (target_velocity - predicted_velocity) ** 2


def euler_sample(velocity, noise: torch.Tensor, num_steps: int = 10, after_step=None) -> torch.Tensor:
    """Integrate dx/dτ = velocity(x, τ) from τ = 1 (noise) to τ = 0 (actions) with `num_steps` Euler
    steps.

    velocity: callable (x (B, T, A) float32, τ (B,) float32) -> (B, T, A) float32
    noise: (B, T, A) float32 -> (B, T, A) float32, the sampled chunk
    after_step: optional callable x -> x applied after every step, e.g. to hold some tokens fixed
    (training-time RTC's `prefix_sample`); it may change x in place: each step makes a new x
    """
    dt = -1.0 / num_steps
    batch_size = noise.shape[0]
    # τ = 1, 1 + dt, ..., computed in double precision, then rounded once to float32 (as the reference
    # does); speed: all steps' τ made before the loop, each step takes a view of its own
    taus = 1.0 + dt * torch.arange(num_steps, dtype=torch.float64)  # (num_steps,)
    taus = taus.float().to(noise.device)
    x = noise
    for step in range(num_steps):
        x = x + dt * velocity(x, taus[step].expand(batch_size))
        if after_step is not None:
            x = after_step(x)
    return x


def time_embedding(time: torch.Tensor, dim: int, min_period: float, max_period: float) -> torch.Tensor:
    """Sine-cosine embedding of the flow time τ ∈ [0, 1]: (B,) -> (B, dim), or (B, T) -> (B, T, dim).

    dim/2 frequencies whose periods are spaced geometrically from min_period to max_period (4e-3..4.0 for
    SmolVLA): short periods resolve small differences of τ, long ones say roughly where in [0, 1] τ is.
    Computed in float64 like the reference (float32 on Apple's MPS, which has no float64); the caller casts
    it to the model's dtype.
    """
    if dim % 2 != 0:
        raise ValueError(f"time embedding width must be even, got {dim}")
    dtype = torch.float32 if time.device.type == "mps" else torch.float64
    fraction = torch.linspace(0.0, 1.0, dim // 2, dtype=dtype, device=time.device)  # (dim/2,)
    period = min_period * (max_period / min_period) ** fraction  # (dim/2,) geometric series
    angle = (1.0 / period * 2 * math.pi) * time[..., None]  # (B, [T,] dim/2) radians
    return torch.cat([torch.sin(angle), torch.cos(angle)], dim=-1)  # (B, [T,] dim)


# ----------------------------------------------------------------------------------------------------
# Real-Time Chunking: the next chunk continues the one being executed
# (Black, Galliker, Levine 2025, "Real-Time Execution of Action Chunking Flow Policies", arXiv 2506.07339;
#  training-time RTC: Black et al. 2025, arXiv 2512.05964)
#
# Under asynchronous inference the robot keeps executing the previous chunk while the next is computed.
# By the time the new chunk arrives, d actions (the inference delay, in control ticks) have been executed,
# and the arm is committed to the next few of the old chunk. A chunk sampled from fresh noise knows nothing
# of them: where the task allows two good motions, consecutive chunks may pick different ones, and even
# when they agree the switch is a visible jump. RTC samples the new chunk as *inpainting*: the old chunk's
# leftover Y (its actions for the same timesteps) is the part of the picture that is already painted.
#
# The paper's notation: flow time τ from 0 (noise) to 1 (data), velocity v pointing to the data. SmolVLA's
# (above): t = 1 − τ from 1 (noise) to 0, velocity v_t = ε − A = −v. In the paper's notation:
#
#     Â¹ = A^τ + (1 − τ)·v(A^τ, τ)               the clean chunk the current velocity leads to
#     W_i = 1                     for i < d       the actions executed during the delay: full weight
#           c_i (e^{c_i} − 1)/(e − 1)  d ≤ i < H    a decaying ramp, c_i = (H − i)/(H − d + 1)
#           0                     for i ≥ H       the free continuation
#     v_guided = v + min(β, (1 − τ)/(τ·r_τ²)) · (Y − Â¹)ᵀ diag(W) ∂Â¹/∂A^τ
#     r_τ² = (1 − τ)²/(τ² + (1 − τ)²)             how uncertain Â¹ is at τ
#
# In SmolVLA's time the same step reads:
#
#     Â = x_t − t·v_t,  v_t ← v_t − w·(∂Â/∂x_t)ᵀ diag(W)(Y − Â).
#
# H is the execution horizon (the paper's H − s: where the guidance ends; capped at the leftover's
# length). The last factor is a vector-Jacobian product through the denoiser (one backward pass of the
# expert per flow step): "correct A^τ in the direction that moves Â¹ toward Y". The reference
# implementation (lerobot 0.4.4, policies/rtc/) computes v before A^τ requires a gradient, so its
# ∂Â¹/∂A^τ is the identity and the correction is the weighted error W·(Y − Â¹) itself
# (`jacobian=False`).
# β (max_guidance_weight) caps the weight, which grows without bound as τ -> 0 and τ -> 1.
# The two differ most on a policy that is nearly sure of its answer: if every noise leads to almost the
# same chunk, Â¹ barely moves with A^τ, the product is small, and mid-flow the weight is only about 2
# (τ = 1/2): the paper's guidance pulls little, by design (Y is then unlikely under the policy), while the
# identity pulls toward Y regardless. The README's lab 6 measures it.
#
# Training-time RTC needs no guidance: SmolVLA fuses the flow time into every action token (smolvla.py's
# embed_suffix), so the time can differ per token. During training the first d tokens get the clean
# actions at flow time τ = 1 (t = 0) and are left out of the loss; the model learns to continue a given
# prefix. At inference the leftover fills those tokens at t = 0 in every Euler step (`prefix_sample`).
# Demonstrations end holding still at the goal, so with clean prefixes "the given actions stand still" always
# means "arrived": a policy whose own chunks stop short then copies the stop and stays short (measured in
# demo.py's lab). `prefix_offsets` shifts each given prefix by a random offset δ that the target actions
# fade out of over a few steps: the model learns to continue from where the prefix is, then return to
# where the camera says the goal is.

RTC_SCHEDULES = ("zeros", "ones", "linear", "exp")


def prefix_weights(inference_delay: int, execution_horizon: int, chunk_size: int, schedule: str):
    """W: how strongly each of the chunk's steps is pulled toward the leftover, (chunk_size,) float32.

    zeros: 1 for i < d, then 0 (only the hard prefix); ones: 1 for i < H, then 0; linear: 1 for i < d, a
    ramp from 1 to 0 (both ends excluded) over d ≤ i < H, 0 from H on; exp: the ramp
    c·(e^c − 1)/(e − 1) (the paper's). d is capped at H, as the reference does.
    """
    if schedule not in RTC_SCHEDULES:
        raise ValueError(f"unknown RTC schedule {schedule!r}: choose one of {', '.join(RTC_SCHEDULES)}")
    if inference_delay < 0 or execution_horizon < 0:
        raise ValueError(f"inference delay and execution horizon must be >= 0, got {inference_delay}, "
                         f"{execution_horizon}")
    d = min(inference_delay, execution_horizon)  # the delay, capped at the horizon
    h = execution_horizon
    n = chunk_size
    if schedule == "ones":
        return (torch.arange(n) < h).float()
    if schedule == "zeros":
        return (torch.arange(n) < d).float()
    ramp_length = min(h, n) - d  # steps d .. min(H, n) − 1
    ramp = torch.linspace(1, 0, ramp_length + 2)[1:-1] if ramp_length > 0 else torch.zeros(0)  # c_i
    if schedule == "exp":
        ramp = ramp * torch.expm1(ramp) / (math.e - 1)
    return torch.cat([torch.ones(min(d, n)), ramp, torch.zeros(max(n - h, 0))])  # (chunk_size,)


def guidance_weight(t: float, max_guidance_weight: float) -> torch.Tensor:
    """min(β, c/r_τ²) at SmolVLA flow time t (τ = 1 − t): c = (1 − τ)/τ,
    1/r_τ² = ((1 − τ)² + τ²)/(1 − τ)².

    At τ = 0 (the first step, pure noise) c is infinite and at τ = 1 the product is 0·∞; both are limits
    of +∞, so both give β. (The reference maps the second, NaN, to 0; its Euler steps never reach τ = 1.)
    Float32 scalar tensor, computed as the reference does.
    """
    tau = torch.tensor(1.0 - t, dtype=torch.float32)
    beta = torch.tensor(max_guidance_weight, dtype=torch.float32)
    inverse_r2 = ((1 - tau) ** 2 + tau**2) / (1 - tau) ** 2
    weight = (1 - tau) / tau * inverse_r2
    return torch.minimum(torch.where(torch.isfinite(weight), weight, beta), beta)


def pad_leftover(leftover: torch.Tensor, shape) -> torch.Tensor:
    """The leftover Y (B, T_prev, A_prev), zero-padded at the end of both axes to the chunk's (B, T, A),
    as the reference does (the padded steps and action dims are pulled toward 0 where W > 0)."""
    batch, steps, dims = shape
    if (leftover.ndim != 3 or leftover.shape[0] != batch or leftover.shape[1] > steps
            or leftover.shape[2] > dims):
        raise ValueError(f"leftover must be (B={batch}, ≤ {steps} steps, ≤ {dims} action dims), "
                         f"got {tuple(leftover.shape)}")
    # F.pad's amounts run from the last axis: (dims: before, after, steps: before, after)
    padding = (0, dims - leftover.shape[2], 0, steps - leftover.shape[1])
    return torch.nn.functional.pad(leftover.float(), padding)


def guided_velocity(velocity, x: torch.Tensor, t: float, target: torch.Tensor, weights: torch.Tensor,
                    max_guidance_weight: float, jacobian: bool, causal: bool = False) -> torch.Tensor:
    """One RTC-guided velocity at SmolVLA flow time t: v_t − w·correction, (B, T, A).

    x, target (the padded leftover Y): (B, T, A); weights W: (T,). In SmolVLA's time the clean estimate is
    Â = x − t·v_t, and correction = (∂Â/∂x)ᵀ (W·(Y − Â)): a vector-Jacobian product by autograd
    (jacobian=True, the paper's) or W·(Y − Â) itself (jacobian=False, the reference's).
    causal: velocity(x[:, :h]) gives the first h steps' velocities, which depend on no later step
    (SmolVLA's action tokens). The error is 0 from the first step h with W = 0 on, so the product then
    involves the first h steps only: speed: a graph (and a backward pass) of h steps instead of T.
    """
    time = torch.tensor(t, dtype=torch.float32, device=x.device).expand(x.shape[0])  # (B,)
    steps = x.shape[1]
    # h: W = 0 from step h on, so only the first h steps need a graph (all T steps unless causal)
    if causal and jacobian and weights.any():
        h = int(weights.nonzero().max()) + 1
    else:
        h = steps
    weights = weights.to(x.device)  # (after h: read from the CPU copy, no wait for the device)
    # the sampler runs under no_grad: the vector-Jacobian product needs a graph of the first h steps
    with torch.enable_grad() if jacobian else torch.no_grad():
        tracked = x[:, :h].detach().requires_grad_(jacobian)
        v_tracked = velocity(tracked, time)  # (B, h, A)
        tracked_clean = tracked - t * v_tracked  # Â of the first h steps
    with torch.no_grad():
        v_t = v_tracked.detach()
        if h < steps:  # the other steps' velocities, untracked
            v_t = torch.cat([v_t, velocity(x, time)[:, h:]], dim=1)  # (B, T, A)
        clean = x - t * v_t  # Â (B, T, A)
        error = (target - clean) * weights[None, :, None]  # W·(Y − Â)
    correction = error
    # (∂Â/∂x)ᵀ e; none past step h: e is 0 there and, causal, no step reaches an earlier one
    if jacobian:
        correction = torch.zeros_like(x)
        correction[:, :h] = torch.autograd.grad(tracked_clean, tracked, error[:, :h])[0]
    return v_t - guidance_weight(t, max_guidance_weight).to(x.device) * correction


def guided_sample(velocity, noise: torch.Tensor, num_steps: int, leftover: torch.Tensor, inference_delay: int,
                  execution_horizon: int, schedule: str, max_guidance_weight: float, jacobian: bool,
                  causal: bool = False) -> torch.Tensor:
    """euler_sample with every velocity guided toward the leftover (B, T_prev, A_prev): (B, T, A) chunk.
    (The options' defaults have one home: SmolVLA.sample_actions.)"""
    if max_guidance_weight <= 0:
        raise ValueError(f"the maximum guidance weight must be positive, got {max_guidance_weight}")
    target = pad_leftover(leftover, noise.shape).to(noise.device)  # Y (B, T, A)
    horizon = min(execution_horizon, leftover.shape[1])  # no guidance beyond what the old chunk says
    weights = prefix_weights(inference_delay, horizon, noise.shape[1], schedule)  # W (T,)
    # euler_sample's loop, written out: the guidance reads t in double precision (the clean estimate and its
    # weight, as the reference computes them), where euler_sample hands the velocity τ rounded to float32
    dt = -1.0 / num_steps
    x = noise
    for step in range(num_steps):
        t = 1.0 + step * dt  # in double precision, as the reference; the expert sees it rounded to float32
        x = x + dt * guided_velocity(velocity, x, t, target, weights, max_guidance_weight, jacobian, causal)
    return x


def prefix_times(t: torch.Tensor, prefix_length: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """Training-time RTC's per-token flow time: 0 (clean) for the first prefix_length[b] tokens, t[b] after.
    t: (B,) float, prefix_length: (B,) int -> (B, chunk_size)."""
    in_prefix = torch.arange(chunk_size, device=t.device)[None, :] < prefix_length[:, None]  # (B, T)
    return torch.where(in_prefix, torch.zeros_like(t)[:, None], t[:, None])


def prefix_offsets(prefix_length: torch.Tensor, chunk_size: int, action_dim: int, sigma: float,
                   settle_steps: int = 5) -> torch.Tensor:
    """Training-time RTC's recovery offsets, to add to the normalized actions: (B, chunk_size, action_dim).

    Per sample δ ~ N(0, σ²) per action dim, times 1 on the d = prefix_length[b] given actions, then
    1 − k/settle_steps on the k-th action after them (k = 1 .. settle_steps), then 0: the continuation
    starts where the shifted prefix ends and is back on the demonstration settle_steps actions later.
    A sample with no prefix gets no offset (nothing would show it).
    """
    d = prefix_length[:, None].float()  # (B, 1)
    i = torch.arange(chunk_size, device=prefix_length.device)[None, :].float()  # (1, T)
    fade = torch.where(i < d, 1.0, (1 - (i - d + 1) / settle_steps).clamp(min=0)) * (d > 0)  # (B, T)
    delta = sigma * torch.randn(len(prefix_length), 1, action_dim, device=prefix_length.device)  # (B, 1, A)
    return fade[:, :, None] * delta


def prefix_sample(velocity, noise: torch.Tensor, num_steps: int, leftover: torch.Tensor,
                  inference_delay: int) -> torch.Tensor:
    """Training-time RTC's sampler: euler_sample with the first d = inference_delay tokens held at the
    leftover, at flow time 0, in every step (the model saw such prefixes in training). (B, T, A) chunk."""
    target = pad_leftover(leftover, noise.shape).to(noise.device)  # (B, T, A)
    d = min(inference_delay, leftover.shape[1], noise.shape[1])
    batch, steps = noise.shape[:2]
    length = torch.full((batch,), d, device=noise.device)  # (B,) the same prefix for every sample

    def velocity_with_prefix(x, time):  # time (B,) -> (B, T): 0 on the given tokens, τ on the others
        return velocity(x, prefix_times(time, length, steps))

    def hold_prefix(x):  # the committed actions stay what they are
        x[:, :d] = target[:, :d]
        return x

    # start from the noise with the prefix already in place (a copy: the caller's noise stays as it was)
    return euler_sample(velocity_with_prefix, hold_prefix(noise.clone()), num_steps, after_step=hold_prefix)


# ----------------------------------------------------------------------------------------------------
# The idea alone, before the robot: `python flow.py` learns a two-mode distribution in the plane.
#
# The "actions" are points A = (a₁, a₂), half of them near (−2, 0) and half near (+2, 0): two equally
# good answers, like going around an obstacle on the left or on the right. A network trained to predict A
# directly (regression, squared error) learns their average, (0, 0), which is no answer at all. Flow
# matching learns the velocity field instead, and sampling from noise lands in one mode or the other.
# The functions are the ones SmolVLA uses; only the velocity network differs (a small MLP here, the action
# expert there).


def two_modes(n: int, generator: torch.Generator) -> torch.Tensor:
    """n points (n, 1, 2): a chunk of one 2-D action each, near (−2, 0) or (+2, 0) with equal chance."""
    side = torch.randint(0, 2, (n, 1), generator=generator) * 4.0 - 2.0  # (n, 1): −2 or +2
    points = torch.cat([side, torch.zeros(n, 1)], dim=1) + 0.3 * torch.randn(n, 2, generator=generator)
    return points[:, None, :]  # (n, T=1, A=2)


class ToyVelocity(torch.nn.Module):
    """v_θ(x_τ, τ): an MLP reading the point and the sine-cosine embedding of τ."""

    def __init__(self, width: int = 128, time_dim: int = 32):
        super().__init__()
        self.time_dim = time_dim
        self.net = torch.nn.Sequential(
            torch.nn.Linear(2 + time_dim, width), torch.nn.SiLU(),
            torch.nn.Linear(width, width), torch.nn.SiLU(),
            torch.nn.Linear(width, 2),
        )

    def forward(self, x: torch.Tensor, time: torch.Tensor) -> torch.Tensor:  # (B, 1, 2), (B,) -> (B, 1, 2)
        emb = time_embedding(time, self.time_dim, min_period=4e-3, max_period=4.0).float()  # (B, time_dim)
        return self.net(torch.cat([x[:, 0], emb], dim=1))[:, None, :]


def train_toy(steps: int = 1500, batch_size: int = 256, seed: int = 0) -> ToyVelocity:
    """Flow matching exactly as SmolVLA trains: τ ~ Beta, x_τ on the straight path, regress u = ε − A."""
    torch.manual_seed(seed)
    model = ToyVelocity()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    data = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        actions = two_modes(batch_size, data)  # A (B, 1, 2)
        time = sample_time(batch_size)  # τ (B,)
        x_t, u_t = noisy_actions_and_target(actions, sample_noise(actions.shape), time)
        loss = flow_matching_loss(model(x_t, time), u_t).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model


@torch.no_grad()
def sample_toy(model: ToyVelocity, n: int = 2000, num_steps: int = 10, seed: int = 1) -> torch.Tensor:
    """n points (n, 2) by the Euler sampler SmolVLA uses, from noise at τ = 1 to τ = 0."""
    torch.manual_seed(seed)
    return euler_sample(model, sample_noise((n, 1, 2)), num_steps)[:, 0]


def main():
    import argparse
    import os
    import time

    parser = argparse.ArgumentParser(
        description="Flow matching on a two-mode toy distribution (SmolVLA §3.2).")
    parser.add_argument("--steps", type=int, default=1500, help="training steps (default 1500)")
    parser.add_argument("--plot", metavar="PNG", help="also draw the data and the samples to this PNG")
    args = parser.parse_args()
    if args.steps < 1:
        parser.error(f"--steps must be at least 1, got {args.steps}")
    if args.plot and not os.path.isdir(os.path.dirname(os.path.abspath(args.plot))):
        parser.error(f"--plot {args.plot}: its folder does not exist")
    torch.set_num_threads(1)  # a tiny MLP: one thread is fastest
    start = time.perf_counter()
    model = train_toy(args.steps)
    samples = sample_toy(model)  # (n, 2)
    left = samples[samples[:, 0] < -1]
    right = samples[samples[:, 0] > 1]
    between = len(samples) - len(left) - len(right)
    print(f"trained in {time.perf_counter() - start:.1f} s; "
          f"{len(samples)} samples by 10 Euler steps from noise:")
    for name, part in (("left mode  (−2, 0)", left), ("right mode (+2, 0)", right)):
        mean = part.mean(0).tolist() if len(part) else [float("nan")] * 2
        print(f"  {name}: {len(part) / len(samples):5.1%}, mean ({mean[0]:+.2f}, {mean[1]:+.2f})")
    print(f"  in between (|a₁| < 1): {between / len(samples):5.1%}  "
          "(regression would put every point at (0, 0))")
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        data = two_modes(len(samples), torch.Generator().manual_seed(2))[:, 0]
        figure, axis = plt.subplots(figsize=(6, 3.5))
        axis.scatter(data[:, 0], data[:, 1], s=3, alpha=0.4, label="data A")
        axis.scatter(samples[:, 0], samples[:, 1], s=3, alpha=0.4, label="flow samples")
        axis.scatter([0], [0], marker="x", color="k", label="what regression learns")
        axis.set(xlabel="a₁", ylabel="a₂", title="flow matching: two modes from one noise distribution")
        axis.legend(loc="upper center", fontsize=8)
        figure.tight_layout()
        figure.savefig(args.plot, dpi=120)
        print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
