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
    import time

    parser = argparse.ArgumentParser(description="Flow matching on a two-mode toy distribution (SmolVLA §3.2).")
    parser.add_argument("--steps", type=int, default=1500, help="training steps (default 1500)")
    parser.add_argument("--plot", metavar="PNG", help="also draw the data and the samples to this PNG")
    args = parser.parse_args()
    torch.set_num_threads(1)  # a tiny MLP: one thread is fastest
    start = time.perf_counter()
    model = train_toy(args.steps)
    samples = sample_toy(model)  # (n, 2)
    left, right = samples[samples[:, 0] < -1], samples[samples[:, 0] > 1]
    between = len(samples) - len(left) - len(right)
    print(f"trained in {time.perf_counter() - start:.1f} s; {len(samples)} samples by 10 Euler steps from noise:")
    for name, part in (("left mode  (−2, 0)", left), ("right mode (+2, 0)", right)):
        mean = part.mean(0).tolist() if len(part) else [float("nan")] * 2
        print(f"  {name}: {len(part) / len(samples):5.1%}, mean ({mean[0]:+.2f}, {mean[1]:+.2f})")
    print(f"  in between (|a₁| < 1): {between / len(samples):5.1%}  (regression would put every point at (0, 0))")
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
