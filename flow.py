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
time embedding, the expert's only way to know τ, lives here as well.
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

    actions, noise: (B, T, A); time: (B,) -> x_τ (B, T, A), u (B, T, A)
    """
    tau = time[:, None, None]  # (B, 1, 1), broadcast over steps and action dims
    x_t = tau * noise + (1 - tau) * actions
    u_t = noise - actions
    return x_t, u_t


def flow_matching_loss(predicted_velocity: torch.Tensor, target_velocity: torch.Tensor) -> torch.Tensor:
    """Per-element squared error (B, T, A); the caller masks padded steps/dims and averages."""
    return (target_velocity - predicted_velocity) ** 2


def euler_sample(velocity, noise: torch.Tensor, num_steps: int = 10) -> torch.Tensor:
    """Integrate dx/dτ = velocity(x, τ) from τ = 1 (noise) to τ = 0 (actions) with `num_steps` Euler steps.

    velocity: callable (x (B, T, A) float32, τ (B,) float32) -> (B, T, A) float32
    noise: (B, T, A) float32 -> (B, T, A) float32, the sampled chunk
    """
    dt = -1.0 / num_steps
    batch_size = noise.shape[0]
    # τ = 1, 1 + dt, ..., computed in double precision, then rounded once to float32 (as the reference does);
    # speed: all steps' τ made before the loop, each step takes a view of its own
    taus = (1.0 + dt * torch.arange(num_steps, dtype=torch.float64)).float().to(noise.device)  # (num_steps,)
    x = noise
    for step in range(num_steps):
        x = x + dt * velocity(x, taus[step].expand(batch_size))
    return x


def time_embedding(time: torch.Tensor, dim: int, min_period: float, max_period: float) -> torch.Tensor:
    """Sine-cosine embedding of the flow time τ ∈ [0, 1]: (B,) -> (B, dim).

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
    angle = (1.0 / period * 2 * math.pi)[None, :] * time[:, None]  # (B, dim/2) radians
    return torch.cat([torch.sin(angle), torch.cos(angle)], dim=1)  # (B, dim)
