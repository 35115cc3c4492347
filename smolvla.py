"""SmolVLA: a small vision-language model that reads the scene and the task, and an action expert that
turns noise into a chunk of robot actions (SmolVLA paper, arXiv 2506.01844, §3.1).

The VLM is SmolVLM2 with its language model cut to its first N layers (N = 16 of 32 for smolvla_base,
§3.1 "layer skipping": the middle layers' features are good enough for control and half the layers is
half the cost). One forward pass reads the *prefix* of tokens

    [camera 1: 64 tokens] [camera 2: 64 tokens] ... [task words] [state: 1 token]

where each camera frame goes through the SigLIP vision tower (1024 patch tokens for a 512×512 frame),
a *pixel shuffle* that folds every 4×4 block of patch tokens into one token 16× wider (1024 -> 64 tokens,
§3.1 "visual token reduction") and a linear connector into the language model's width. The action
expert (expert.py) attends to the VLM's keys/values layer by layer, and flow matching (flow.py) turns
its output into actions.

This file also makes the model *the* official one: it loads lerobot's checkpoints by tensor name
(`SmolVLA.from_pretrained`), builds a fresh policy from SmolVLM2's Hugging Face weights
(`SmolVLA.from_vlm`), writes checkpoints lerobot can load (`save_pretrained`), and wraps everything in a
policy-level call in robot units (`predict_chunk`) with the checkpoint's normalization statistics.

Reading order: SmolVLAConfig, the SigLIP tower, pixel shuffle, the prefix/suffix embeddings and their
attention masks, SmolVLA.compute_loss / sample_actions, then the policy level and checkpoint I/O, and last
pack_for_cpu_inference (speed). Optimizations for speed are marked "speed:" (see also bench.py).
"""

import copy
import fnmatch
import json
import math
import os
import re
import shutil
from dataclasses import dataclass, field, fields

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from expert import ActionExpert, DecoderConfig, DecoderLayer, RMSNorm, SuffixLayout, attention, expert_mlp_width
from policy import ACTION, IMAGE_PREFIX as IMAGES, STATE, read_json, resolve_dir
from flow import (
    euler_sample,
    flow_matching_loss,
    noisy_actions_and_target,
    sample_noise,
    sample_time,
    time_embedding,
)

# The VLM smolvla_base was built from, HuggingFaceTB/SmolVLM2-500M-Video-Instruct, in its config.json
# format (only the fields this file reads). It lets the full architecture be built without a download.
SMOLVLM2_500M_VIDEO_INSTRUCT = {
    "model_type": "smolvlm",
    "scale_factor": 4,  # pixel shuffle: 4×4 patch tokens -> 1 token
    "vision_config": {  # SigLIP B/16 at 512×512
        "hidden_size": 768,
        "intermediate_size": 3072,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "image_size": 512,
        "patch_size": 16,
        "num_channels": 3,
        "layer_norm_eps": 1e-6,
        "hidden_act": "gelu_pytorch_tanh",
    },
    "text_config": {  # SmolLM2-360M
        "hidden_size": 960,
        "intermediate_size": 2560,
        "num_hidden_layers": 32,
        "num_attention_heads": 15,
        "num_key_value_heads": 5,
        "head_dim": 64,
        "rms_norm_eps": 1e-5,
        "vocab_size": 49280,
        "rope_theta": 100000.0,  # not used by SmolVLA: see expert.ROPE_BASE
        "hidden_act": "silu",
    },
}

# smolvla_base's camera/state/action features (its camera names: camera1 = top view, camera2 = wrist, ...)
SMOLVLA_BASE_FEATURES = {
    "input_features": {
        "observation.state": {"type": "STATE", "shape": [6]},
        "observation.images.camera1": {"type": "VISUAL", "shape": [3, 256, 256]},
        "observation.images.camera2": {"type": "VISUAL", "shape": [3, 256, 256]},
        "observation.images.camera3": {"type": "VISUAL", "shape": [3, 256, 256]},
    },
    "output_features": {"action": {"type": "ACTION", "shape": [6]}},
}

NORM_EPS = 1e-8  # lerobot's normalizer: (x - mean) / (std + 1e-8)


# ----------------------------------------------------------------------------------------------------
# Configuration: lerobot's config.json for a "smolvla" policy, field for field.


@dataclass
class SmolVLAConfig:
    """The policy's config.json. Fields the model reads are commented; the rest (training and bookkeeping
    fields lerobot keeps) are carried along so a saved checkpoint is a faithful lerobot checkpoint.
    Unknown fields from newer lerobot versions are kept in `extra` and written back unchanged."""

    n_obs_steps: int = 1
    input_features: dict = field(default_factory=lambda: copy.deepcopy(SMOLVLA_BASE_FEATURES["input_features"]))
    output_features: dict = field(default_factory=lambda: copy.deepcopy(SMOLVLA_BASE_FEATURES["output_features"]))
    device: str | None = "cpu"
    use_amp: bool = False
    use_peft: bool = False
    push_to_hub: bool = False
    repo_id: str | None = None
    private: bool | None = None
    tags: list | None = None
    license: str | None = None
    pretrained_path: str | None = None
    chunk_size: int = 50  # actions per chunk
    n_action_steps: int = 50
    # per feature type: IDENTITY, MEAN_STD or MIN_MAX
    normalization_mapping: dict = field(
        default_factory=lambda: {"VISUAL": "IDENTITY", "STATE": "MEAN_STD", "ACTION": "MEAN_STD"}
    )
    max_state_dim: int = 32  # state and actions are zero-padded to these widths
    max_action_dim: int = 32
    resize_imgs_with_padding: list | None = field(default_factory=lambda: [512, 512])  # [width, height]
    empty_cameras: int = 0  # blank camera slots appended after the real cameras
    adapt_to_pi_aloha: bool = False
    use_delta_joint_actions_aloha: bool = False
    tokenizer_max_length: int = 48
    num_steps: int = 10  # Euler steps of flow matching
    use_cache: bool = True
    freeze_vision_encoder: bool = True
    train_expert_only: bool = True
    train_state_proj: bool = True
    optimizer_lr: float = 1e-4
    optimizer_betas: list = field(default_factory=lambda: [0.9, 0.95])
    optimizer_eps: float = 1e-8
    optimizer_weight_decay: float = 1e-10
    optimizer_grad_clip_norm: float = 10
    scheduler_warmup_steps: int = 1000
    scheduler_decay_steps: int = 30000
    scheduler_decay_lr: float = 2.5e-6
    vlm_model_name: str = "HuggingFaceTB/SmolVLM2-500M-Video-Instruct"
    load_vlm_weights: bool = False
    add_image_special_tokens: bool = False  # wrap each camera's tokens in SmolVLM's image marker tokens
    attention_mode: str = "cross_attn"
    prefix_length: int = -1  # > 0: pad the prefix to this many tokens
    pad_language_to: str = "longest"  # or "max_length"
    num_expert_layers: int = -1  # <= 0: as many as the VLM's kept layers
    num_vlm_layers: int = 16  # keep the VLM's first N text layers
    self_attn_every_n_layers: int = 2  # expert layers 0, n, 2n, … attend jointly; the others cross-attend
    expert_width_multiplier: float = 0.75
    min_period: float = 4e-3  # time embedding periods
    max_period: float = 4.0
    rtc_config: dict | None = None
    compile_model: bool = False
    compile_mode: str = "max-autotune"
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_json_dict(cls, d: dict) -> "SmolVLAConfig":
        if d.get("type", "smolvla") != "smolvla":
            raise ValueError(
                f"this is a '{d.get('type')}' policy checkpoint, not a SmolVLA one ('type' must be 'smolvla')"
            )
        known = {f.name for f in fields(cls)} - {"extra"}
        cfg = cls(**{k: v for k, v in d.items() if k in known})
        cfg.extra = {k: v for k, v in d.items() if k not in known and k != "type"}
        cfg.validate()
        return cfg

    def to_json_dict(self) -> dict:
        d = {"type": "smolvla"}
        d.update({f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"})
        d.update(self.extra)
        return json.loads(json.dumps(d))  # tuples -> lists, fresh copy

    def validate(self):
        if self.adapt_to_pi_aloha or self.use_delta_joint_actions_aloha:
            raise ValueError("the Aloha adaptations of SmolVLA (adapt_to_pi_aloha, ...) are not supported here")
        if self.pad_language_to not in ("longest", "max_length"):
            raise ValueError(f"pad_language_to must be 'longest' or 'max_length', got {self.pad_language_to!r}")
        if STATE not in self.input_features or ACTION not in self.output_features:
            raise ValueError(f"the config needs an input feature '{STATE}' and an output feature '{ACTION}'")

    @property
    def empty_camera_keys(self) -> list[str]:
        """Names lerobot gives the blank camera slots (it adds them to input_features itself)."""
        return [f"{IMAGES}empty_camera_{i}" for i in range(self.empty_cameras)]

    @property
    def camera_keys(self) -> list[str]:
        """The real cameras the policy reads, in config order (what an observation must provide)."""
        return [
            k for k, f in self.input_features.items() if f["type"] == "VISUAL" and k not in self.empty_camera_keys
        ]

    @property
    def state_dim(self) -> int:
        return self.input_features[STATE]["shape"][0]

    @property
    def action_dim(self) -> int:
        return self.output_features[ACTION]["shape"][0]


# ----------------------------------------------------------------------------------------------------
# The VLM's architecture, read from its Hugging Face config.json.


@dataclass
class VisionConfig:
    hidden_size: int  # 768
    intermediate_size: int  # 3072
    num_layers: int  # 12
    num_heads: int  # 12
    image_size: int  # 512
    patch_size: int  # 16
    layer_norm_eps: float = 1e-6
    num_channels: int = 3


def parse_vlm_config(vlm_config: dict) -> tuple[VisionConfig, DecoderConfig, int, int]:
    """SmolVLM config.json -> (vision tower shape, text model shape, pixel-shuffle factor, vocabulary size).

    Hugging Face may leave out of config.json the fields that equal their defaults; transformers' own
    SmolVLMConfig fills them in exactly as the reference's model constructor sees them."""
    from transformers import SmolVLMConfig

    if vlm_config.get("model_type", "smolvlm") != "smolvlm":
        raise ValueError(f"the VLM must be a SmolVLM (model_type 'smolvlm'), got {vlm_config.get('model_type')!r}")
    full = SmolVLMConfig.from_dict(vlm_config)
    v, t = full.vision_config, full.text_config
    if v.hidden_act != "gelu_pytorch_tanh" or t.hidden_act != "silu":
        raise ValueError("only SmolVLM's activations are supported (gelu_pytorch_tanh vision, silu text)")
    if getattr(t, "attention_bias", False) or getattr(t, "mlp_bias", False):
        raise ValueError("only SmolLM2-style text models without biases are supported")
    vision = VisionConfig(
        hidden_size=v.hidden_size,
        intermediate_size=v.intermediate_size,
        num_layers=v.num_hidden_layers,
        num_heads=v.num_attention_heads,
        image_size=v.image_size,
        patch_size=v.patch_size,
        layer_norm_eps=v.layer_norm_eps,
        num_channels=v.num_channels,
    )
    text = DecoderConfig(
        hidden_size=t.hidden_size,
        intermediate_size=t.intermediate_size,
        num_layers=t.num_hidden_layers,
        num_heads=t.num_attention_heads,
        num_kv_heads=t.num_key_value_heads or t.num_attention_heads,
        head_dim=getattr(t, "head_dim", None) or t.hidden_size // t.num_attention_heads,
        rms_norm_eps=t.rms_norm_eps,
    )
    return vision, text, full.scale_factor, t.vocab_size


# ----------------------------------------------------------------------------------------------------
# The SigLIP vision tower (a plain ViT: patches + learned positions, pre-norm layers, final LayerNorm).


class VisionAttention(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.head_dim = cfg.hidden_size // cfg.num_heads
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.out_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, N, D) -> (B, N, D), every patch sees every patch
        heads = lambda t: t.view(*t.shape[:-1], -1, self.head_dim)  # (B, N, D) -> (B, N, H, hd)
        out = attention(heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x)), mask=None)
        return self.out_proj(out)


class VisionMLP(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.activation = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, N, 768) -> (B, N, 3072) -> (B, N, 768)
        return self.fc2(self.activation(self.fc1(x)))


class VisionLayer(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.self_attn = VisionAttention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = VisionMLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class VisionEmbeddings(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.patches_per_side = cfg.image_size // cfg.patch_size  # 32
        # a stride-16 16×16 convolution = a linear map of each non-overlapping 16×16×3 patch
        self.patch_embedding = nn.Conv2d(cfg.num_channels, cfg.hidden_size, cfg.patch_size, cfg.patch_size)
        # 1024 learned positions
        self.position_embedding = nn.Embedding(self.patches_per_side**2, cfg.hidden_size)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        patches = self.patch_embedding(pixels)  # (B, D, h, w) with h = w = 32 for a 512×512 frame
        h, w = patches.shape[2:]
        # A full-size frame uses positions 0..1023 in row-major order. A smaller patch grid is spread over
        # the 32×32 position grid (SmolVLM's NaViT-style rule: row r reads position row ⌊r·32/h⌋).
        rows = torch.arange(h, device=pixels.device) * self.patches_per_side // h
        cols = torch.arange(w, device=pixels.device) * self.patches_per_side // w
        positions = (rows[:, None] * self.patches_per_side + cols[None, :]).flatten()  # (h·w,)
        return patches.flatten(2).transpose(1, 2) + self.position_embedding(positions)  # (B, h·w, D)


class VisionTower(nn.Module):
    """Checkpoint names: `…vlm.model.vision_model.{embeddings, encoder.layers.N, post_layernorm}`."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.embeddings = VisionEmbeddings(cfg)
        layers = nn.ModuleList(VisionLayer(cfg) for _ in range(cfg.num_layers))
        self.encoder = nn.ModuleDict({"layers": layers})
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.embeddings(pixels)  # (B, 3, 512, 512) in [-1, 1] -> (B, 1024, 768)
        for layer in self.encoder["layers"]:
            x = layer(x)
        return self.post_layernorm(x)


def pixel_shuffle(x: torch.Tensor, factor: int) -> torch.Tensor:
    """Fold each factor×factor block of neighbouring patch tokens into one token (space -> channels).

    (B, N, D) -> (B, N/factor², D·factor²): for smolvla_base (B, 1024, 768) -> (B, 64, 12288). The patch
    tokens form a side×side grid (32×32); token (I, J) of the output is the block of rows I·f..I·f+f−1 and
    columns J·f..J·f+f−1, its channels ordered (row in block, column in block, feature). Nothing is lost —
    the tokens are only regrouped — but the language model now sees 16× fewer, 16× wider image tokens.
    """
    batch, num_tokens, dim = x.shape
    side = math.isqrt(num_tokens)
    if side * side != num_tokens or side % factor != 0:
        raise ValueError(f"pixel shuffle needs a square grid of patches, a multiple of {factor} wide: {num_tokens}")
    blocks = side // factor
    x = x.view(batch, blocks, factor, blocks, factor, dim)  # (B, I, row in block, J, column in block, D)
    x = x.permute(0, 1, 3, 2, 4, 5)  # (B, I, J, row in block, column in block, D)
    return x.reshape(batch, blocks * blocks, factor * factor * dim)  # (B, N/f², f²·D)


class TextModel(nn.Module):
    """SmolLM2's token embedding, its first N decoder layers, and its final norm (kept for the checkpoint;
    SmolVLA only uses the layers' keys/values). Checkpoint names: `…vlm.model.text_model.*`."""

    def __init__(self, cfg: DecoderConfig, vocab_size: int):
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


# ----------------------------------------------------------------------------------------------------
# Inputs: images and attention masks.


def resize_with_pad(images: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """Resize (B, C, h, w) to fit width×height keeping the aspect ratio (bilinear), then pad with zeros on the
    left and top (where the reference puts the padding) to exactly (B, C, height, width)."""
    h, w = images.shape[2:]
    ratio = max(w / width, h / height)
    new_h, new_w = int(h / ratio), int(w / ratio)
    resized = F.interpolate(images, size=(new_h, new_w), mode="bilinear", align_corners=False)
    return F.pad(resized, (max(0, width - new_w), 0, max(0, height - new_h), 0), value=0.0)


def block_attention_mask(pad_mask: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """Who may attend to whom, from a padding mask and "block starts" (big_vision's prefix-LM scheme).

    pad_mask (B, L) bool: True for real tokens. blocks (B, L) int: 1 where a token starts a new block,
    0 where it joins the previous one. A token sees every real token of its own block and of all earlier
    blocks: cumsum(blocks)[key] <= cumsum(blocks)[query]. SmolVLA's prefix: images and words are one
    bidirectional block (0 …), the state token starts a block (1); in the suffix every action token starts
    its own (1 1 1 …), so actions attend causally and the prefix never sees the actions:

                  keys: image  words  state  a1  a2  a3
        blocks:          0 …    0 …    1     1   1   1
        image, words      ■      ■     ·     ·   ·   ·
        state             ■      ■     ■     ·   ·   ·
        a1                ■      ■     ■     ■   ·   ·
        a2                ■      ■     ■     ■   ■   ·
        a3                ■      ■     ■     ■   ■   ■

    Returns (B, L, L) bool, [query, key].
    """
    block_id = torch.cumsum(blocks, dim=1)  # (B, L)
    causal = block_id[:, None, :] <= block_id[:, :, None]  # (B, Lq, Lk)
    return causal & pad_mask[:, None, :] & pad_mask[:, :, None]


@dataclass
class PrefixContext:
    """What one observation leaves behind for the flow steps: the expert's view of the VLM (per-layer
    keys/values) and the action tokens' attention masks and rotary angles, which are the same at every step."""

    cache: list  # per VLM layer (k, v) (B, P, Hkv, hd), see ActionExpert.cache_prefix
    suffix: SuffixLayout  # the action tokens' masks and rotary angles, see ActionExpert.suffix_layout


# ----------------------------------------------------------------------------------------------------
# The model.


class SmolVLA(nn.Module):
    """SmolVLM2 cut to N layers + action expert + the projections in and out of the expert.

    Tensor-level API (normalized units): compute_loss, sample_actions. Policy level (robot units):
    predict_chunk, training_loss. Checkpoints: from_pretrained, from_vlm, save_pretrained.
    """

    def __init__(self, config: SmolVLAConfig, vlm_config: dict, tokenizer=None):
        super().__init__()
        config.validate()
        self.config, self.vlm_config, self.tokenizer = config, vlm_config, tokenizer
        vision_cfg, text_cfg, self.scale_factor, vocab_size = parse_vlm_config(vlm_config)
        if config.num_vlm_layers > 0:  # layer skipping: keep the first N text layers
            text_cfg.num_layers = min(config.num_vlm_layers, text_cfg.num_layers)
        width = text_cfg.hidden_size  # d = 960
        expert_width = int(width * config.expert_width_multiplier)  # 720
        expert_cfg = DecoderConfig(
            hidden_size=expert_width,
            intermediate_size=expert_mlp_width(expert_width),
            num_layers=config.num_expert_layers if config.num_expert_layers > 0 else text_cfg.num_layers,
            num_heads=text_cfg.num_heads,
            num_kv_heads=text_cfg.num_kv_heads,
            head_dim=text_cfg.head_dim,
            rms_norm_eps=text_cfg.rms_norm_eps,
        )
        self.vision = VisionTower(vision_cfg)
        self.connector = nn.Linear(vision_cfg.hidden_size * self.scale_factor**2, width, bias=False)
        self.text = TextModel(text_cfg, vocab_size)
        self.lm_head = nn.Linear(width, vocab_size, bias=False)  # in the checkpoints, unused by the policy
        self.expert = ActionExpert(
            expert_cfg, text_cfg, text_cfg.num_layers, config.attention_mode, config.self_attn_every_n_layers
        )
        self.state_proj = nn.Linear(config.max_state_dim, width)  # state -> one prefix token
        self.action_in_proj = nn.Linear(config.max_action_dim, expert_width)  # noisy action -> expert width
        self.action_time_mlp_in = nn.Linear(2 * expert_width, expert_width)  # [action, time] fused by an MLP
        self.action_time_mlp_out = nn.Linear(expert_width, expert_width)
        self.action_out_proj = nn.Linear(expert_width, config.max_action_dim)  # expert output -> velocity
        self.stats = {}  # normalization statistics, see set_normalization
        self.vlm_dir = None  # where the VLM description came from (copied into saved checkpoints' vlm/)
        self._init_like_reference()
        self.set_requires_grad()

    def _init_like_reference(self, std: float = 0.02):
        """Transformer weights ~ N(0, 0.02) as Hugging Face initializes SmolVLM/SmolLM2 (they are replaced
        by pretrained weights anyway); the expert's cross-attention k/v and the five projections keep
        PyTorch's default init, as in the reference (they are plain nn.Linear there)."""
        for tower in (self.vision, self.text, self.expert):
            for m in tower.modules():
                if isinstance(m, (nn.Linear, nn.Embedding)):
                    nn.init.normal_(m.weight, std=std)
                    if getattr(m, "bias", None) is not None:
                        nn.init.zeros_(m.bias)
        for layer, cross in zip(self.expert.layers, self.expert.layer_cross):
            if cross:
                layer.self_attn.k_proj.reset_parameters()
                layer.self_attn.v_proj.reset_parameters()

    def set_requires_grad(self):
        """What training updates, from the config (SmolVLA trains the expert and the projections and keeps
        the pretrained VLM frozen by default: 99.9M of smolvla_base's 450M parameters)."""
        cfg = self.config
        frozen = [self.lm_head]  # the language-model head is never used
        if cfg.train_expert_only:
            frozen += [self.vision, self.connector, self.text]
        elif cfg.freeze_vision_encoder:
            frozen += [self.vision]
        for module in self.children():
            module.requires_grad_(all(module is not f for f in frozen))
        self.state_proj.requires_grad_(cfg.train_state_proj)

    # --- prefix: images, words, state ----------------------------------------------------------------

    def prepare_images(self, images: list, img_masks: list) -> tuple[list, list]:
        """Check the frames, resize-with-pad them and map [0, 1] -> [-1, 1] (SigLIP's range); append the
        config's blank cameras (all −1, masked out). images: list of (B, 3, H, W), img_masks: list of (B,)."""
        cfg = self.config
        n_real = len(cfg.camera_keys)
        if len(images) != len(img_masks):
            raise ValueError(f"got {len(images)} images but {len(img_masks)} image masks")
        if not images:
            raise ValueError("at least one camera image is needed")
        if len(images) > n_real or len(images) < n_real - cfg.empty_cameras:
            raise ValueError(
                f"got {len(images)} cameras; this policy reads {n_real} ({', '.join(cfg.camera_keys)}) "
                f"of which at most empty_cameras={cfg.empty_cameras} may be missing"
            )
        prepared = []
        for img in images:
            if img.ndim != 4 or img.shape[1] != 3 or not img.is_floating_point():
                raise ValueError(f"images must be float (B, 3, H, W), got {tuple(img.shape)} {img.dtype}")
            lo, hi = img.min().item(), img.max().item()
            if lo < 0 or hi > 1:
                raise ValueError(
                    f"images must be in [0, 1] (got values in [{lo:.3g}, {hi:.3g}]): divide uint8 by 255"
                )
            if cfg.resize_imgs_with_padding is not None:
                img = resize_with_pad(img, *cfg.resize_imgs_with_padding)
            prepared.append(img * 2.0 - 1.0)
        masks = [m.bool() for m in img_masks]
        # lerobot always adds `empty_cameras` blank slots after the cameras it found (frames of −1 = black
        # after scaling, masked out so that no token attends to them)
        for _ in range(cfg.empty_cameras):
            prepared.append(torch.full_like(prepared[-1], -1.0))
            masks.append(torch.zeros_like(masks[-1]))
        return prepared, masks

    def embed_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, 512, 512) in [-1, 1] -> (B, 64, 960): SigLIP, pixel shuffle, linear connector."""
        patches = self.vision(pixels.to(self.connector.weight.dtype))  # (B, 1024, 768)
        return self.connector(pixel_shuffle(patches, self.scale_factor))  # (B, 64, 12288) -> (B, 64, 960)

    def embed_images(self, images: list) -> list:
        """Every camera's frames: list of k (B, 3, S, S) -> list of k (B, 64, D).
        speed: the k cameras go through the vision tower as one batch of k·B frames (fewer, larger matrix
        products) when their frames have the same size, as they do after resize-with-pad."""
        if all(img.shape == images[0].shape for img in images):
            embedded = self.embed_image(torch.cat(images))  # (k·B, 64, D)
            return list(embedded.split(images[0].shape[0]))  # k × (B, 64, D)
        return [self.embed_image(img) for img in images]

    def embed_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.text.embed_tokens(tokens)

    def embed_prefix(self, images, img_masks, lang_tokens, lang_masks, state):
        """The VLM's input sequence. images: prepared list of (B, 3, S, S), img_masks: list of (B,) bool,
        lang_tokens/lang_masks: (B, L), state: (B, max_state_dim).
        Returns embeddings (B, P, D), padding mask (B, P) bool, block starts (B, P) int."""
        batch = state.shape[0]
        width = self.text.embed_tokens.weight.shape[1]
        embs, pad, blocks = [], [], []
        ones = lambda n: torch.ones(batch, n, dtype=torch.bool, device=state.device)  # noqa: E731

        def add(emb, mask, block_start):  # emb (B, n, D), mask (B, n) bool
            embs.append(emb)
            pad.append(mask)
            blocks.extend([block_start] + [0] * (emb.shape[1] - 1))

        def add_marker(*tokens):  # SmolVLM's image marker tokens, all real, in the images' block
            add(self.embed_marker_tokens(tokens, batch), ones(len(tokens)), 0)

        for img_emb, img_mask in zip(self.embed_images(images), img_masks):
            if self.config.add_image_special_tokens:
                add_marker("<fake_token_around_image>", "<global-img>")
            # SmolVLA scales image and word embeddings by √D (as Gemma-style models do); as in the reference,
            # the images' factor is first rounded to their dtype (in bf16 √960 = 31.0), the words' is not
            img_emb = img_emb * torch.tensor(width**0.5, dtype=img_emb.dtype, device=img_emb.device)
            add(img_emb, img_mask[:, None].expand(batch, img_emb.shape[1]), 0)
            if self.config.add_image_special_tokens:
                add_marker("<fake_token_around_image>")
        add(self.embed_tokens(lang_tokens) * math.sqrt(width), lang_masks.bool(), 0)  # (B, L, D)
        # the state: one token, a block of its own (images and words do not attend to it)
        add(self.state_proj(state.to(self.state_proj.weight.dtype))[:, None, :], ones(1), 1)  # (B, 1, D)

        embs, pad = torch.cat(embs, dim=1), torch.cat(pad, dim=1)  # (B, P, D), (B, P)
        blocks = torch.tensor(blocks, dtype=torch.long, device=pad.device)[None].expand(batch, -1)  # (B, P)
        if embs.shape[1] < self.config.prefix_length:  # optional fixed-length prefix: pad with masked zeros
            extra = self.config.prefix_length - embs.shape[1]
            embs = F.pad(embs, (0, 0, 0, extra))
            pad, blocks = F.pad(pad, (0, extra), value=False), F.pad(blocks, (0, extra), value=0)
        return embs, pad, blocks

    def embed_marker_tokens(self, tokens, batch: int) -> torch.Tensor:
        """Embeddings of special tokens given by their text, repeated over the batch: (B, n, D)."""
        if self.tokenizer is None:
            raise ValueError("add_image_special_tokens needs the VLM's tokenizer")
        ids = self.tokenizer.convert_tokens_to_ids(list(tokens))
        ids = torch.tensor(ids, device=self.text.embed_tokens.weight.device)
        return self.embed_tokens(ids)[None].expand(batch, -1, -1)

    def encode_observation(self, images, img_masks, lang_tokens, lang_masks, state) -> PrefixContext:
        """Run the VLM once over the prefix; everything the flow steps need from the observation."""
        images, img_masks = self.prepare_images(images, img_masks)
        state = pad_last_dim(state, self.config.max_state_dim)
        embs, pad, blocks = self.embed_prefix(images, img_masks, lang_tokens, lang_masks, state)
        mask = block_attention_mask(pad, blocks)  # (B, P, P)
        positions = torch.cumsum(pad, dim=1) - 1  # (B, P): padding tokens do not advance the position
        # speed (training): with a frozen VLM only the state token (its own block, after images and words)
        # depends on a trained weight; the tokens before it need no gradient tracking
        untracked = 0
        vlm_parts = (self.vision, self.connector, self.text)
        if torch.is_grad_enabled() and not any(p.requires_grad for m in vlm_parts for p in m.parameters()):
            untracked = int(blocks[0].nonzero()[0])  # the state token's index = images and words before it
        cache = self.expert.cache_prefix(self.text.layers, embs, mask, positions, untracked)
        # The suffix (chunk_size action tokens, each its own block): it sees every real prefix token and
        # the earlier actions; its positions continue after the prefix's real tokens.
        batch, chunk = pad.shape[0], self.config.chunk_size
        causal = torch.ones(chunk, chunk, dtype=torch.bool, device=pad.device).tril()  # (S, S)
        suffix_mask = torch.cat([pad[:, None, :].expand(batch, chunk, -1), causal.expand(batch, -1, -1)], 2)
        suffix_positions = pad.sum(dim=1, keepdim=True) + torch.arange(chunk, device=pad.device)  # (B, S)
        return PrefixContext(cache, self.expert.suffix_layout(suffix_mask, suffix_positions))

    # --- suffix: noisy actions and flow time ---------------------------------------------------------

    def embed_suffix(self, noisy_actions: torch.Tensor, time: torch.Tensor) -> torch.Tensor:
        """(B, S, max_action_dim) float32 noisy actions and (B,) flow time -> (B, S, d_e) expert tokens:
        each projected action concatenated with the time's sine-cosine embedding, then Linear-SiLU-Linear."""
        action_emb = self.action_in_proj(noisy_actions.to(self.action_in_proj.weight.dtype))  # (B, S, d_e)
        time_emb = time_embedding(time, action_emb.shape[-1], self.config.min_period, self.config.max_period)
        time_emb = time_emb.to(action_emb.dtype)[:, None, :].expand_as(action_emb)  # (B, S, d_e)
        fused = self.action_time_mlp_in(torch.cat([action_emb, time_emb], dim=2))  # (B, S, 2·d_e) -> (B, S, d_e)
        return self.action_time_mlp_out(F.silu(fused))  # (B, S, d_e)

    def velocity(self, ctx: PrefixContext, noisy_actions: torch.Tensor, time: torch.Tensor) -> torch.Tensor:
        """The expert's predicted flow velocity v(x_τ, τ | observation): (B, S, max_action_dim) float32."""
        suffix = self.embed_suffix(noisy_actions, time)  # (B, S, d_e)
        hidden = self.expert(suffix, ctx.cache, ctx.suffix)  # (B, S, d_e)
        # the output projection runs in float32 whatever the model's dtype (as in the reference)
        w, b = self.action_out_proj.weight, self.action_out_proj.bias
        return F.linear(hidden.float(), w.float(), b.float())

    # --- tensor level: training loss and sampling, in normalized units -------------------------------

    def compute_loss(self, images, img_masks, lang_tokens, lang_masks, state, actions, noise=None, time=None):
        """Flow-matching loss per element: (B, chunk, max_action_dim), before any padding mask.

        images: list of (B, 3, H, W) in [0, 1] (the cameras present, config order); img_masks: list of (B,)
        bool; lang_tokens (B, L) int64 / lang_masks (B, L) bool; state (B, state_dim) and actions
        (B, chunk, action_dim) normalized; noise (B, chunk, max_action_dim); time (B,).
        """
        if actions.ndim != 3 or actions.shape[1] != self.config.chunk_size:
            raise ValueError(f"actions must be (B, {self.config.chunk_size}, action_dim), got {tuple(actions.shape)}")
        actions = pad_last_dim(actions.float(), self.config.max_action_dim)  # (B, chunk, max_action_dim)
        noise = sample_noise(actions.shape, actions.device) if noise is None else noise
        time = sample_time(actions.shape[0], actions.device) if time is None else time
        x_t, u_t = noisy_actions_and_target(actions, noise, time)
        ctx = self.encode_observation(images, img_masks, lang_tokens, lang_masks, state)
        return flow_matching_loss(self.velocity(ctx, x_t, time), u_t)

    @torch.no_grad()
    def sample_actions(self, images, img_masks, lang_tokens, lang_masks, state, noise=None) -> torch.Tensor:
        """A chunk by `num_steps` Euler steps of the flow, from noise: (B, chunk, max_action_dim), normalized.
        The VLM runs once (encode_observation); each step runs only the expert."""
        shape = (state.shape[0], self.config.chunk_size, self.config.max_action_dim)
        if noise is not None and tuple(noise.shape) != shape:
            raise ValueError(f"noise must have shape {shape} (B, chunk_size, max_action_dim), got {tuple(noise.shape)}")
        ctx = self.encode_observation(images, img_masks, lang_tokens, lang_masks, state)
        noise = sample_noise(shape, state.device) if noise is None else noise.to(state.device)
        return euler_sample(lambda x, t: self.velocity(ctx, x, t), noise.float(), self.config.num_steps)

    # --- policy level: raw observations in robot units -----------------------------------------------

    def tokenize(self, tasks) -> tuple[torch.Tensor, torch.Tensor]:
        """Task string(s) -> tokens (B, L) int64 and mask (B, L) bool, as lerobot's preprocessor does:
        a newline appended, truncated to tokenizer_max_length, right-padded ("longest" or "max_length")."""
        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer: load it with from_pretrained/from_vlm or pass one")
        tasks = [tasks] if isinstance(tasks, str) else list(tasks)
        if not all(isinstance(t, str) for t in tasks):
            raise ValueError(f"tasks must be strings, got {tasks!r}")
        tasks = [t if t.endswith("\n") else t + "\n" for t in tasks]
        out = self.tokenizer(
            tasks,
            max_length=self.config.tokenizer_max_length,
            truncation=True,
            padding=self.config.pad_language_to,
            padding_side="right",
            return_tensors="pt",
        )
        device = self.text.embed_tokens.weight.device
        return out["input_ids"].to(device), out["attention_mask"].bool().to(device)

    def set_normalization(self, stats: dict):
        """Use these statistics (e.g. a LeRobot dataset's meta/stats.json) to normalize the state and actions.
        stats: {"observation.state": {"mean": …, "std": …, "min": …, "max": …}, "action": {…}, …}."""
        for feature, dim in ((STATE, self.config.state_dim), (ACTION, self.config.action_dim)):
            if feature not in stats:
                continue
            self.stats[feature] = {}
            for name, value in stats[feature].items():
                if name not in ("mean", "std", "min", "max"):
                    continue
                value = torch.as_tensor(value, dtype=torch.float32).flatten()
                if value.shape != (dim,):
                    raise ValueError(f"{feature} {name} has shape {tuple(value.shape)}, the policy's has {dim} dims")
                self.stats[feature][name] = value

    def _norm_stats(self, feature: str, feature_type: str, device) -> tuple[str, dict]:
        """The feature's normalization mode and its statistics on `device` (MIN_MAX: with the span max − min,
        NORM_EPS where max = min)."""
        mode = self.config.normalization_mapping.get(feature_type, "IDENTITY")
        needed = {"IDENTITY": (), "MEAN_STD": ("mean", "std"), "MIN_MAX": ("min", "max")}.get(mode)
        if needed is None:
            raise ValueError(f"normalization mode {mode} is not supported (IDENTITY, MEAN_STD, MIN_MAX are)")
        have = self.stats.get(feature, {})
        if any(n not in have for n in needed):
            raise ValueError(
                f"no {'/'.join(needed)} statistics for '{feature}' ({mode} normalization): the policy cannot map "
                f"robot units to its own. Call model.set_normalization(dataset.stats) with the stats of the dataset "
                f"it was trained on (found: {sorted(have) or 'none'})"
            )
        s = {name: have[name].to(device) for name in needed}
        if mode == "MIN_MAX":
            s["span"] = torch.where(s["max"] == s["min"], torch.full_like(s["max"], NORM_EPS), s["max"] - s["min"])
        return mode, s

    def normalize(self, feature: str, feature_type: str, x: torch.Tensor) -> torch.Tensor:
        mode, s = self._norm_stats(feature, feature_type, x.device)
        if mode == "MEAN_STD":
            return (x - s["mean"]) / (s["std"] + NORM_EPS)
        if mode == "MIN_MAX":  # [min, max] -> [-1, 1]
            return 2 * (x - s["min"]) / s["span"] - 1
        return x

    def unnormalize(self, feature: str, feature_type: str, x: torch.Tensor) -> torch.Tensor:
        mode, s = self._norm_stats(feature, feature_type, x.device)
        if mode == "MEAN_STD":
            return x * s["std"] + s["mean"]
        if mode == "MIN_MAX":
            return (x + 1) / 2 * s["span"] + s["min"]
        return x

    def _present_cameras(self, observation: dict) -> list[str]:
        """The configured cameras found in the observation; too many missing -> error naming them."""
        present = [k for k in self.config.camera_keys if k in observation]
        missing = [k for k in self.config.camera_keys if k not in observation]
        if len(missing) > self.config.empty_cameras:
            raise ValueError(
                f"the observation lacks camera(s) {missing} (has {[k for k in observation if k.startswith(IMAGES)]}); "
                f"this policy reads {self.config.camera_keys} and allows {self.config.empty_cameras} missing "
                f"(empty_cameras). Rename your cameras to the policy's names or provide them."
            )
        return present

    @torch.no_grad()
    def predict_chunk(self, observation: dict, noise: torch.Tensor | None = None) -> torch.Tensor:
        """One action chunk for one raw observation, in robot units: (1, chunk_size, action_dim).

        observation: {"observation.state": (state_dim,) robot units, "observation.images.<cam>": (3, H, W)
        float in [0, 1] for the policy's cameras (config.camera_keys), "task": str}.
        noise: optional (1, chunk_size, max_action_dim) starting noise (for reproducible chunks).
        """
        self.eval()
        device = self.state_proj.weight.device
        if "task" not in observation or STATE not in observation:
            raise ValueError(f"the observation needs '{STATE}' and 'task' (got keys {sorted(observation)})")
        state = torch.as_tensor(observation[STATE], dtype=torch.float32, device=device)
        if state.shape != (self.config.state_dim,):
            raise ValueError(f"'{STATE}' must have shape ({self.config.state_dim},), got {tuple(state.shape)}")
        images = []
        for key in self._present_cameras(observation):
            img = torch.as_tensor(observation[key], device=device)
            if img.ndim != 3:
                raise ValueError(f"'{key}' must be one frame (3, H, W) float in [0, 1], got shape {tuple(img.shape)}")
            images.append(img[None].float())
        img_masks = [torch.ones(1, dtype=torch.bool, device=device) for _ in images]
        tokens, token_masks = self.tokenize([observation["task"]])
        state = self.normalize(STATE, "STATE", state[None])  # (1, state_dim)
        actions = self.sample_actions(images, img_masks, tokens, token_masks, state, noise=noise)
        return self.unnormalize(ACTION, "ACTION", actions[:, :, : self.config.action_dim])

    def training_loss(self, batch: dict, noise=None, time=None) -> torch.Tensor:
        """Scalar training loss on a collated batch of dataset samples in robot units (data.py):
        normalizes state and actions, tokenizes the tasks, and averages the flow-matching error over the
        chunk steps that are inside the episode (not `action_is_pad`) and the real action dims."""
        device = self.state_proj.weight.device
        state = self.normalize(STATE, "STATE", batch[STATE].to(device).float())  # (B, state_dim)
        actions = self.normalize(ACTION, "ACTION", batch[ACTION].to(device).float())  # (B, chunk, action_dim)
        images = [batch[k].to(device).float() for k in self._present_cameras(batch)]
        img_masks = [torch.ones(state.shape[0], dtype=torch.bool, device=device) for _ in images]
        tokens, token_masks = self.tokenize(batch["task"])
        losses = self.compute_loss(images, img_masks, tokens, token_masks, state, actions, noise, time)
        losses = losses[:, :, : self.config.action_dim]  # (B, chunk, action_dim)
        valid = torch.ones(losses.shape[:2], dtype=torch.bool, device=device)
        if "action_is_pad" in batch:
            valid = ~batch["action_is_pad"].to(device).bool()  # (B, chunk)
        return (losses * valid[..., None]).sum() / (valid.sum() * losses.shape[-1]).clamp(min=1)

    # --- checkpoints ---------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, checkpoint: str, vlm: str | None = None) -> "SmolVLA":
        """Load a lerobot SmolVLA checkpoint (a local directory or a Hub id such as "lerobot/smolvla_base").

        vlm: where the VLM's description (config.json + tokenizer) is; default `<checkpoint>/vlm/` if present,
        else the checkpoint's `vlm_model_name` on the Hub. Weights are loaded strictly by name and shape
        into a float32 model (bf16 tensors are upcast); the model is returned in eval mode.
        """
        ckpt_dir = resolve_dir(checkpoint, "checkpoint", ["*.json", "*.safetensors", "*.md"])
        config = SmolVLAConfig.from_json_dict(read_json(os.path.join(ckpt_dir, "config.json"), "checkpoint config"))
        weights_path = os.path.join(ckpt_dir, "model.safetensors")
        if not os.path.isfile(weights_path):
            raise FileNotFoundError(f"no model.safetensors in checkpoint directory {ckpt_dir}")
        if vlm is None:
            local_vlm = os.path.join(ckpt_dir, "vlm")
            vlm = local_vlm if os.path.isdir(local_vlm) else config.vlm_model_name
        hint = "Pass vlm=<a directory with the VLM's config.json and tokenizer files>."
        vlm_dir = resolve_dir(vlm, "VLM", VLM_DESCRIPTION_FILES, hint=hint)
        vlm_config, tokenizer = load_vlm_description(vlm_dir)
        with torch.device("meta"):  # no memory, no random init: every tensor comes from the checkpoint
            model = cls(config, vlm_config, tokenizer)
        model.vlm_dir = vlm_dir
        tensors = load_file(weights_path)
        dtypes = sorted({str(t.dtype).replace("torch.", "") for t in tensors.values()})
        buffer_stats = load_policy_tensors(model, tensors)
        print(f"smolvla: {len(tensors)} tensors ({'/'.join(dtypes)} -> float32) from {weights_path}; VLM from {vlm}")
        stats, source = read_processor_stats(ckpt_dir)
        if not stats:
            stats, source = read_buffer_stats(buffer_stats, config)
        stats, ignored = usable_stats(stats, config)
        model.set_normalization(stats)
        model.report_normalization(source + (f"; ignored: {', '.join(ignored)}" if ignored else ""))
        return model.eval()

    @classmethod
    def from_vlm(cls, vlm: str, config: SmolVLAConfig | None = None) -> "SmolVLA":
        """A fresh policy for training from scratch: SmolVLM2's pretrained vision tower, connector and first
        N text layers (Hugging Face format: model.vision_model.*, model.connector.*, model.text_model.*,
        lm_head.*) and a newly initialized action expert and projections."""
        config = config or SmolVLAConfig()
        vlm_dir = resolve_dir(vlm, "VLM", VLM_DESCRIPTION_FILES + ["*.safetensors"])
        vlm_config, tokenizer = load_vlm_description(vlm_dir)
        model = cls(config, vlm_config, tokenizer)
        model.vlm_dir = vlm_dir
        kept = len(model.text.layers)

        def cut_layer(name: str) -> bool:  # text layers beyond the first N are dropped on purpose
            m = re.match(r"text\.layers\.(\d+)\.", name)
            return m is not None and int(m.group(1)) >= kept

        load_weights(model, read_safetensors_dir(vlm_dir), HF_VLM, skip=cut_layer)
        print(f"smolvla: VLM weights from {vlm_dir} ({kept} text layers kept); expert and projections initialized")
        return model

    def save_pretrained(self, directory: str):
        """Write a checkpoint in lerobot's format (config.json, model.safetensors, the pre/post-processor
        JSON with their normalization stats) plus vlm/ (the VLM's config.json and tokenizer), so that it
        loads here without the Hub and in lerobot."""
        os.makedirs(directory, exist_ok=True)
        cfg = self.config.to_json_dict()
        with open(os.path.join(directory, "config.json"), "w") as f:
            json.dump(cfg, f, indent=4)
        weights = {checkpoint_name(k, LEROBOT): v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(weights, os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
        flat_stats = {f"{feat}.{name}": t.contiguous() for feat, s in self.stats.items() for name, t in s.items()}
        for name, steps, stats_step, features in (
            ("policy_preprocessor", preprocessor_steps(cfg), 5, {**cfg["input_features"], **cfg["output_features"]}),
            ("policy_postprocessor", postprocessor_steps(cfg), 0, cfg["output_features"]),
        ):
            step = steps[stats_step]
            step["config"]["features"] = features
            if flat_stats:
                step["state_file"] = f"{name}_step_{stats_step}_{step['registry_name']}.safetensors"
                save_file(flat_stats, os.path.join(directory, step["state_file"]))
            with open(os.path.join(directory, f"{name}.json"), "w") as f:
                json.dump({"name": name, "steps": steps}, f, indent=4)
        # vlm/: the VLM's description files as they came (config, tokenizer, processor configs), else the
        # in-memory config and tokenizer
        vlm_dir = os.path.join(directory, "vlm")
        os.makedirs(vlm_dir, exist_ok=True)
        if self.vlm_dir is not None:
            for name in os.listdir(self.vlm_dir):
                is_description = any(fnmatch.fnmatch(name, p) for p in VLM_DESCRIPTION_FILES)
                if is_description and name != "model.safetensors.index.json":
                    shutil.copyfile(os.path.join(self.vlm_dir, name), os.path.join(vlm_dir, name))
        elif self.tokenizer is not None:
            self.tokenizer.save_pretrained(vlm_dir)
        with open(os.path.join(vlm_dir, "config.json"), "w") as f:
            json.dump(self.vlm_config, f, indent=2)

    def report_normalization(self, source: str):
        """Say which statistics the policy will use (silently acting in normalized units would be a bug)."""
        if self.stats:
            found = "; ".join(f"{feat} ({', '.join(sorted(s))})" for feat, s in self.stats.items())
            print(f"smolvla: normalization stats from {source}: {found}")
        else:
            print(
                f"smolvla: no normalization stats found ({source}); call set_normalization(dataset.stats) "
                "before predict_chunk or training_loss"
            )


def pad_last_dim(x: torch.Tensor, width: int) -> torch.Tensor:
    """Zero-pad the last dimension to `width` (state 6 -> 32, actions 6 -> 32)."""
    if x.shape[-1] > width:
        raise ValueError(f"got {x.shape[-1]} dims, the policy takes at most {width}")
    return F.pad(x, (0, width - x.shape[-1]))


# ----------------------------------------------------------------------------------------------------
# Checkpoint I/O helpers.

# Our parameter names differ from the checkpoints' only by these prefixes (the names inside each part
# follow Hugging Face's). Columns: ours, lerobot's SmolVLA checkpoint, Hugging Face SmolVLM2 weights.
LEROBOT, HF_VLM = 1, 2
NAME_PREFIXES = (
    ("vision.", "model.vlm_with_expert.vlm.model.vision_model.", "model.vision_model."),
    (
        "connector.",
        "model.vlm_with_expert.vlm.model.connector.modality_projection.proj.",
        "model.connector.modality_projection.proj.",
    ),
    ("text.", "model.vlm_with_expert.vlm.model.text_model.", "model.text_model."),
    ("lm_head.", "model.vlm_with_expert.vlm.lm_head.", "lm_head."),
    ("expert.", "model.vlm_with_expert.lm_expert.", None),
    ("", "model.", None),  # state_proj, action_in_proj, action_time_mlp_in/out, action_out_proj
)
# the files that describe a VLM (architecture, tokenizer, processor), without its weights
VLM_DESCRIPTION_FILES = ["*.json", "*.txt", "*.model", "*.jinja"]
# old-format normalization buffers, e.g. normalize_inputs.so100-red_buffer_observation_state.mean
OLD_STATS_NAME = re.compile(
    r"^(normalize_inputs|normalize_targets|unnormalize_outputs)\.(?:(.+)_)?buffer_(.+)\.(mean|std|min|max)$"
)


def checkpoint_name(name: str, column: int) -> str | None:
    """Our parameter name -> its name in a lerobot checkpoint (column LEROBOT) or SmolVLM2's weights (HF_VLM)."""
    for row in NAME_PREFIXES:
        if name.startswith(row[0]):
            return None if row[column] is None else row[column] + name[len(row[0]) :]
    return None


def our_name(name: str, column: int) -> str | None:
    """A checkpoint tensor's name -> ours (None if it belongs to no part we know)."""
    name = ".".join(p for p in name.split(".") if p != "_orig_mod")  # saved under torch.compile
    for row in NAME_PREFIXES:
        if row[column] is not None and name.startswith(row[column]):
            return row[0] + name[len(row[column]) :]
    return None


def load_weights(model: nn.Module, tensors: dict, column: int, skip=lambda name: False, assign: bool = False):
    """Copy named tensors into the model, strictly: every parameter the checkpoint should hold must be there
    with the right shape, and every tensor must have a place. All problems are listed in one error.

    column: LEROBOT (a whole policy: every parameter is expected) or HF_VLM (only the VLM's parts).
    skip(our_name): tensors deliberately left out (the VLM's text layers beyond the first N).
    """
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items() if checkpoint_name(k, column) is not None}
    found, seen, unexpected, misshaped = {}, set(), [], []
    for name, tensor in tensors.items():
        mine = our_name(name, column)
        if mine is not None and skip(mine):
            continue
        if mine not in expected:
            unexpected.append(name)
            continue
        seen.add(mine)
        if tuple(tensor.shape) != expected[mine]:
            misshaped.append(f"{name}: checkpoint {tuple(tensor.shape)}, model {expected[mine]}")
        else:
            found[mine] = tensor
    missing = [checkpoint_name(k, column) for k in expected if k not in seen]
    if missing or unexpected or misshaped:
        lines = [f"checkpoint does not fit the model built from its config ({len(found)} tensors matched):"]
        for title, names in (("missing", missing), ("unexpected", unexpected), ("wrong shape", misshaped)):
            if names:
                lines.append(f"  {len(names)} {title}: " + ", ".join(names[:20]) + (" …" if len(names) > 20 else ""))
        raise ValueError("\n".join(lines))
    model.load_state_dict(found, strict=False, assign=assign)


def load_policy_tensors(model: nn.Module, tensors: dict) -> dict:
    """Load a lerobot checkpoint's tensors into the model as float32 (the published weights mix bfloat16
    and float32); return the old-format normalization buffers found among them."""
    buffers = {k: t for k, t in tensors.items() if OLD_STATS_NAME.match(k)}
    load_weights(model, {k: t.float() for k, t in tensors.items() if k not in buffers}, LEROBOT, assign=True)
    return buffers


def load_vlm_description(source: str) -> tuple[dict, object]:
    """The VLM's config.json (its architecture) and its tokenizer, from a directory or Hub id."""
    from transformers import AutoTokenizer

    vlm_dir = resolve_dir(source, "VLM", VLM_DESCRIPTION_FILES)
    vlm_config = read_json(os.path.join(vlm_dir, "config.json"), "VLM config.json")
    parse_vlm_config(vlm_config)  # fail early on a config that is not SmolVLM's
    try:
        tokenizer = AutoTokenizer.from_pretrained(vlm_dir)
    except Exception as e:
        raise ValueError(f"could not load the tokenizer from {vlm_dir}: {e}") from e
    return vlm_config, tokenizer


def read_safetensors_dir(directory: str) -> dict:
    """All tensors of a Hugging Face model directory: model.safetensors or shards listed in its index."""
    single = os.path.join(directory, "model.safetensors")
    index = os.path.join(directory, "model.safetensors.index.json")
    if os.path.isfile(single):
        return load_file(single)
    if os.path.isfile(index):
        tensors = {}
        for shard in sorted(set(read_json(index, "weights index")["weight_map"].values())):
            tensors.update(load_file(os.path.join(directory, shard)))
        return tensors
    raise FileNotFoundError(f"no model.safetensors (or model.safetensors.index.json) in {directory}")


def read_processor_stats(ckpt_dir: str) -> tuple[dict, str]:
    """New-format stats: the (un)normalizer steps of policy_pre/postprocessor.json name a safetensors
    file of flat `<feature>.<stat>` tensors. Returns ({feature: {stat: tensor}}, where they came from)."""
    stats, sources = {}, []
    for name in ("policy_preprocessor.json", "policy_postprocessor.json"):
        path = os.path.join(ckpt_dir, name)
        if not os.path.isfile(path):
            continue
        for step in read_json(path, name).get("steps", []):
            if "normalizer" not in step.get("registry_name", "") or "state_file" not in step:
                continue
            state_path = os.path.join(ckpt_dir, step["state_file"])
            if not os.path.isfile(state_path):
                raise FileNotFoundError(f"{name} names the stats file {step['state_file']}, which is missing")
            for key, value in load_file(state_path).items():
                feature, stat = key.rsplit(".", 1)
                stats.setdefault(feature, {}).setdefault(stat, value)
            sources.append(step["state_file"])
    return stats, " and ".join(sources) or "no policy_pre/postprocessor stats files"


def read_buffer_stats(buffers: dict, config: SmolVLAConfig) -> tuple[dict, str]:
    """Old-format stats: buffers inside model.safetensors such as normalize_inputs.buffer_observation_state.mean,
    possibly with a dataset prefix (normalize_inputs.so100-red_buffer_…). Buffers left at inf were never set."""
    features = {k.replace(".", "_"): k for k in {**config.input_features, **config.output_features}}
    stats = {}
    for key, value in buffers.items():
        _, _, feature, stat = OLD_STATS_NAME.match(key).groups()
        if torch.isfinite(value).all():
            stats.setdefault(features.get(feature, feature), {}).setdefault(stat, value)
    return stats, "buffers in model.safetensors" if buffers else "no stats buffers in model.safetensors"


def usable_stats(stats: dict, config: SmolVLAConfig) -> tuple[dict, list[str]]:
    """The state/action statistics that fit the config, and a note for each one that does not (statistics
    of another feature name or another robot's size are reported, not used)."""
    dims = {STATE: config.state_dim, ACTION: config.action_dim}
    usable, ignored = {}, []
    for feature, feature_stats in stats.items():
        if feature not in dims:
            if feature not in config.input_features and feature not in config.output_features:
                ignored.append(f"{feature} (not a feature of this policy)")
            continue
        wanted = {k: v for k, v in feature_stats.items() if k in ("mean", "std", "min", "max")}
        fits = {k: v for k, v in wanted.items() if v.numel() == dims[feature]}
        misfits = sorted(set(wanted) - set(fits))
        if misfits:
            ignored.append(f"{feature} {'/'.join(misfits)} (not {dims[feature]} values)")
        if fits:
            usable[feature] = fits
    return usable, ignored


def preprocessor_steps(cfg: dict) -> list:
    """lerobot's SmolVLA input pipeline, as its policy_preprocessor.json describes it."""
    return [
        {"registry_name": "rename_observations_processor", "config": {"rename_map": {}}},
        {"registry_name": "to_batch_processor", "config": {}},
        {"registry_name": "smolvla_new_line_processor", "config": {}},
        {
            "registry_name": "tokenizer_processor",
            "config": {
                "max_length": cfg["tokenizer_max_length"],
                "task_key": "task",
                "padding_side": "right",
                "padding": cfg["pad_language_to"],
                "truncation": True,
                "tokenizer_name": cfg["vlm_model_name"],
            },
        },
        {"registry_name": "device_processor", "config": {"device": cfg["device"] or "cpu", "float_dtype": None}},
        {
            "registry_name": "normalizer_processor",
            "config": {"eps": NORM_EPS, "norm_map": cfg["normalization_mapping"]},
        },
    ]


def postprocessor_steps(cfg: dict) -> list:
    """lerobot's SmolVLA output pipeline, as its policy_postprocessor.json describes it."""
    return [
        {
            "registry_name": "unnormalizer_processor",
            "config": {"eps": NORM_EPS, "norm_map": cfg["normalization_mapping"]},
        },
        {"registry_name": "device_processor", "config": {"device": "cpu", "float_dtype": None}},
    ]
