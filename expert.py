"""The action expert: a small transformer that runs layer by layer beside the VLM (SmolVLA paper §3.2).

SmolVLA's VLM (SmolVLM2's language model, SmolLM2, vlm.py) reads the *prefix*: image tokens, the task's
words and one state token. The action expert reads the *suffix*: the noisy action chunk fused with the
flow time. It is built from the same layer recipe — a SmolLM2/Llama decoder layer — but is narrower
(0.75 × the VLM's width: 720 instead of 960 for smolvla_base) and has as many layers as the VLM keeps
(16), or a divisor of that (`num_expert_layers`; expert layer j then sits beside VLM layer j·stride and
the VLM layers between have no partner). An expert layer talks to its VLM layer in one of two ways,
alternating (`self_attn_every_n_layers` = 2):

- even layers, *joint self-attention*: the expert's action tokens attend to the VLM's prefix keys/values
  and to each other (causally: see the block mask in smolvla.py), each stream with its own projections;
- odd layers, *cross-attention*: the expert's queries attend only to the prefix; its keys/values are the
  VLM layer's keys (after RoPE) and values, passed through the expert's own k/v projections
  (320 -> 320 for smolvla_base). Here the expert's positions restart at 0.

The prefix never attends to the suffix (it is an earlier attention block), so the VLM's computation
does not depend on the actions at all. That is what makes SmolVLA cheap: the VLM runs once per chunk and
leaves behind, for each layer, the keys/values the expert will attend to (a KV cache, `cache_prefix`);
each of the 10 flow steps then runs only the expert (`ActionExpert.forward`). Training uses the very same
two calls.

Reading order: the decoder layer's pieces, shared with the VLM's text model in vlm.py (RMSNorm, rotary
position embeddings, grouped-query attention written out beside the fused call, the SiLU-gated MLP, the
layer), then the expert.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

# SmolVLA's RoPE uses base 10000. Note: SmolVLM2's text config says rope_theta = 100000, but the
# reference SmolVLA computes RoPE itself with 10000 — the checkpoints were trained that way, so we match
# the reference.
ROPE_BASE = 10_000.0


@dataclass
class DecoderConfig:
    """Shape of a SmolLM2 (Llama-style) decoder stack."""

    hidden_size: int  # d: 960 for SmolLM2-360M, 720 for the smolvla_base expert
    intermediate_size: int  # MLP width: 2560 / 2048
    num_layers: int
    num_heads: int  # query heads: 15
    num_kv_heads: int  # key/value heads (grouped-query attention): 5
    head_dim: int  # 64
    rms_norm_eps: float = 1e-5

    @property
    def kv_width(self) -> int:  # width of the k/v projections' output: 5 × 64 = 320
        return self.num_kv_heads * self.head_dim


def expert_mlp_width(hidden_size: int, multiplier: int = 4, multiple_of: int = 256) -> int:
    """The expert's MLP width, Llama's recipe: 2/3 · 4 · d rounded up to a multiple of 256 (720 -> 2048)."""
    width = int(multiplier * int(2 * hidden_size / 3))
    return multiple_of * ((width + multiple_of - 1) // multiple_of)


class RMSNorm(nn.Module):
    """x / sqrt(mean(x²) + eps) · weight, computed in float32 whatever the activations' dtype."""

    def __init__(self, width: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # speed: F.rms_norm is the same formula in one kernel instead of five elementwise passes
        x32 = F.rms_norm(x.float(), x.shape[-1:], eps=self.eps)
        return self.weight * x32.to(x.dtype)


def rope_angles(positions: torch.Tensor, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the rotary angles, float32: positions (B, L) integer -> two (B, L, 1, hd/2) tensors.

    Dimension pair (i, i + hd/2) is rotated by the angle position / 10000^(2i/hd): the dot product of a
    rotated query and a rotated key then depends only on the distance between their positions.
    speed: they depend only on the positions, so they are computed once per sequence and shared by all
    layers (and, for the action tokens, by all flow steps) instead of once per layer.
    """
    exponents = (2.0 / head_dim) * torch.arange(head_dim // 2, dtype=torch.float32, device=positions.device)
    wavelengths = ROPE_BASE**exponents  # (hd/2,) from 1 to ~10000
    angles = positions[..., None].float() / wavelengths  # (B, L, hd/2)
    return torch.cos(angles)[:, :, None, :], torch.sin(angles)[:, :, None, :]


def apply_rope(x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Rotary position embedding, "rotate-half" convention, computed in float32.

    x: (B, L, H, hd); rope: (cos, sin) from rope_angles -> (B, L, H, hd) in x's dtype.
    """
    cos, sin = rope
    half = x.shape[-1] // 2
    x32 = x.float()
    x1 = x32[..., :half]
    x2 = x32[..., half:]
    rotated = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
    return rotated.to(x.dtype)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
              fused: bool = True) -> torch.Tensor:
    """Softmax attention with grouped-query heads, softmax in float32:

        out = softmax(q·kᵀ / √hd, keys a query may not see at −∞) · v

    q: (B, Lq, H, hd); k, v: (B, Lk, Hkv, hd) with H a multiple of Hkv (query head h reads kv head
    h // (H/Hkv)); mask: (B, Lq, Lk) bool, True = may attend, or None -> (B, Lq, H·hd) in v's dtype.
    """
    if not fused:
        # the formula written out: each kv head serves H/Hkv query heads; scores and softmax in float32
        group = q.shape[2] // k.shape[2]
        k = k.repeat_interleave(group, dim=2)  # (B, Lk, H, hd)
        v = v.repeat_interleave(group, dim=2)  # (B, Lk, H, hd)
        scores = torch.einsum("bqhd,bkhd->bhqk", q.float(), k.float())  # (B, H, Lq, Lk)
        scores = scores / math.sqrt(q.shape[-1])
        if mask is not None:
            scores = scores.masked_fill(~mask[:, None], float("-inf"))
        probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # a query that may see nothing: zeros
        return torch.einsum("bhqk,bkhd->bqhd", probs.to(v.dtype), v).flatten(2)  # (B, Lq, H·hd)
    # speed: the same in one fused kernel. On CPU it is a flash-attention loop that never stores the
    # (Lq, Lk) score matrix, accumulates scores and softmax in float32 also for bfloat16 inputs, and lets
    # each group of H/Hkv query heads read its kv head in place (enable_gqa) instead of copying the keys
    # and values H/Hkv times. It equals the written-out formula to float32 rounding (test_bench.py checks).
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2),  # (B, H, Lq, hd)
        k.transpose(1, 2),  # (B, Hkv, Lk, hd)
        v.transpose(1, 2),
        attn_mask=None if mask is None else mask[:, None],  # (B, 1, Lq, Lk), the same for every head
        enable_gqa=q.shape[2] != k.shape[2],
    )  # (B, H, Lq, hd)
    return out.transpose(1, 2).flatten(2)  # (B, Lq, H·hd)


class SelfAttentionProjections(nn.Module):
    """The q/k/v/o projections of a decoder layer (no biases). Attention itself happens across streams."""

    def __init__(self, cfg: DecoderConfig, kv_input_width: int | None = None):
        super().__init__()
        self.head_dim = cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.num_heads * cfg.head_dim, bias=False)
        # k/v normally read the layer's own hidden states; the expert's cross-attention layers read the
        # VLM's keys/values instead, so their input width is the VLM's kv width (320 for smolvla_base)
        kv_in = cfg.hidden_size if kv_input_width is None else kv_input_width
        self.k_proj = nn.Linear(kv_in, cfg.kv_width, bias=False)
        self.v_proj = nn.Linear(kv_in, cfg.kv_width, bias=False)
        self.o_proj = nn.Linear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, bias=False)

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:  # (B, L, n·hd) -> (B, L, n, hd)
        return x.view(*x.shape[:-1], -1, self.head_dim)


class GatedMLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) · up(x))."""

    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(width, hidden, bias=False)
        self.up_proj = nn.Linear(width, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, width, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    """A pre-norm SmolLM2 layer. Its attention is driven from outside (the two streams meet there):
    `qkv` gives the layer's RoPE'd queries/keys and values, `finish` adds the attention output back and
    applies the MLP."""

    def __init__(self, cfg: DecoderConfig, kv_input_width: int | None = None):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = SelfAttentionProjections(cfg, kv_input_width)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size)

    def qkv(self, x: torch.Tensor, rope: tuple):
        """x: (B, L, d) -> q (B, L, H, hd), k and v (B, L, Hkv, hd); q and k rotated by RoPE
        (rope_angles)."""
        projections = self.self_attn
        h = self.input_layernorm(x)
        q = apply_rope(projections.split_heads(projections.q_proj(h)), rope)
        k = apply_rope(projections.split_heads(projections.k_proj(h)), rope)
        v = projections.split_heads(projections.v_proj(h))
        return q, k, v

    def finish(self, x: torch.Tensor, attn_out: torch.Tensor) -> torch.Tensor:
        """Residual around attention (attn_out: (B, L, H·hd)), then residual around the MLP."""
        x = x + self.self_attn.o_proj(attn_out)
        return x + self.mlp(self.post_attention_layernorm(x))


@dataclass
class SuffixLayout:
    """The action tokens' attention masks and rotary angles (see ActionExpert.suffix_layout)."""

    joint_mask: torch.Tensor  # (B, S, P + S) bool: real prefix tokens and earlier actions (joint layers)
    cross_mask: torch.Tensor  # (B, S, P) bool: real prefix tokens (cross-attention layers)
    rope: tuple  # rope_angles of the positions after the prefix's (joint layers)
    cross_rope: tuple  # rope_angles of the positions restarted at 0 (cross-attention layers)

    def head(self, s: int) -> "SuffixLayout":
        """The layout of the first s action tokens alone. Each action token sees only the prefix and the
        actions before it, so their outputs do not depend on the later tokens: RTC's guidance
        (flow.guided_velocity) differentiates through these s tokens only."""
        prefix_len = self.cross_mask.shape[2]
        return SuffixLayout(
            joint_mask=self.joint_mask[:, :s, : prefix_len + s],
            cross_mask=self.cross_mask[:, :s],
            rope=tuple(angles[:, :s] for angles in self.rope),
            cross_rope=tuple(angles[:, :s] for angles in self.cross_rope),
        )


class ActionExpert(nn.Module):
    """The expert's layers and final norm, plus the plan of how they meet the VLM's layers.

    Checkpoint names: `model.vlm_with_expert.lm_expert.{layers.N.…, norm.weight}`.
    """

    def __init__(
        self,
        cfg: DecoderConfig,
        vlm_cfg: DecoderConfig,
        num_vlm_layers: int,
        attention_mode: str = "cross_attn",
        self_attn_every_n_layers: int = 2,
    ):
        super().__init__()
        if num_vlm_layers % cfg.num_layers != 0:
            raise ValueError(
                f"the VLM's {num_vlm_layers} layers must be a multiple of "
                f"the expert's {cfg.num_layers} layers"
            )
        use_cross = "cross" in attention_mode

        def cross_layer(i: int) -> bool:  # layer i cross-attends; every n-th layer (from 0) is joint
            return use_cross and not (self_attn_every_n_layers > 0 and i % self_attn_every_n_layers == 0)

        # With fewer expert layers than VLM layers, expert layer j sits beside VLM layer j·stride and the
        # other VLM layers have no expert partner (the suffix passes them unchanged).
        stride = num_vlm_layers // cfg.num_layers
        # plan[i] = (index of the expert layer beside VLM layer i or None, does it cross-attend?)
        self.plan = []
        for i in range(num_vlm_layers):
            if i % stride == 0:
                self.plan.append((i // stride, cross_layer(i)))
            else:
                self.plan.append((None, False))
        # The reference shapes expert layer j's k/v by j's own parity, but uses it by its VLM layer's; the
        # two agree whenever stride is 1. Refuse configurations where they would not (the reference crashes).
        for i, (j, cross) in enumerate(self.plan):
            if j is not None and cross != cross_layer(j):
                raise ValueError(
                    f"expert layer {j} beside VLM layer {i}: num_expert_layers={cfg.num_layers} and "
                    f"self_attn_every_n_layers={self_attn_every_n_layers} do not fit together"
                )
        # layer_cross[j]: expert layer j cross-attends, so its k/v read the VLM's keys/values (320 wide)
        self.layer_cross = [cross_layer(j) for j in range(cfg.num_layers)]
        self.layers = nn.ModuleList(
            DecoderLayer(cfg, kv_input_width=vlm_cfg.kv_width if cross else None)
            for cross in self.layer_cross
        )
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def cache_prefix(self, vlm_keys_values: list) -> list:
        """What each expert layer attends to, from the VLM's per-layer keys/values over the prefix (each
        (B, P, Hkv, hd), from vlm.TextModel.keys_values): for a joint layer the VLM layer's own keys (after
        RoPE) and values; for a cross layer those passed through the expert's k/v projections — done here,
        once per chunk, instead of in each of the flow steps. None where no expert layer sits beside."""
        cache = []
        for (k, v), (j, cross) in zip(vlm_keys_values, self.plan):
            if j is None:
                cache.append(None)
            elif cross:
                projections = self.layers[j].self_attn
                flat_k = k.flatten(2)  # (B, P, Hkv·hd) = (B, P, 320)
                flat_v = v.flatten(2)
                projected_k = projections.split_heads(projections.k_proj(flat_k))  # (B, P, Hkv, hd)
                projected_v = projections.split_heads(projections.v_proj(flat_v))
                cache.append((projected_k, projected_v))
            else:
                cache.append((k, v))
        return cache

    def suffix_layout(self, mask: torch.Tensor, positions: torch.Tensor) -> SuffixLayout:
        """What the action tokens attend to and where they sit, from the suffix rows of the attention mask
        (B, S, P + S) and their positions (B, S) continuing after the prefix's. The same at every flow step,
        so sampling builds it once per chunk."""
        prefix_len = mask.shape[2] - positions.shape[1]
        head_dim = self.layers[0].self_attn.head_dim
        # cross-attention layers count the expert's positions from 0
        restarted = positions - positions.min(dim=1, keepdim=True).values
        return SuffixLayout(
            joint_mask=mask,
            cross_mask=mask[:, :, :prefix_len].contiguous(),
            rope=rope_angles(positions, head_dim),
            cross_rope=rope_angles(restarted, head_dim),
        )

    def forward(self, suffix: torch.Tensor, cache: list, layout: SuffixLayout) -> torch.Tensor:
        """One pass of the expert over the suffix, attending to the cached prefix.

        suffix: (B, S, d_e) embedded noisy actions; cache: from cache_prefix; layout: from suffix_layout.
        Returns the final-normed hidden states (B, S, d_e).
        """
        x = suffix
        for (j, cross), kv in zip(self.plan, cache):
            if j is None:
                continue
            layer = self.layers[j]
            if cross:
                h = layer.input_layernorm(x)
                q = apply_rope(layer.self_attn.split_heads(layer.self_attn.q_proj(h)), layout.cross_rope)
                k, v = kv  # expert-projected prefix keys/values (B, P, Hkv, hd)
                out = attention(q, k, v, layout.cross_mask)
            else:
                q, k, v = layer.qkv(x, layout.rope)
                # the action tokens see the prefix and the suffix: concatenate along the sequence
                k = torch.cat([kv[0], k], dim=1)  # (B, P + S, Hkv, hd)
                v = torch.cat([kv[1], v], dim=1)
                out = attention(q, k, v, layout.joint_mask)
            x = layer.finish(x, out)
        return self.norm(x)
