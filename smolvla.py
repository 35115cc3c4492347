"""SmolVLA: a small vision-language model reads the scene, the task and the arm's state; an action expert
turns noise into a chunk of robot actions (SmolVLA paper, arXiv 2506.01844, §3.1–3.2).

This file puts the pieces together. The *prefix* — what the robot sees, is told and feels — is

    [camera 1: 64 tokens] [camera 2: 64 tokens] ... [task words] [state: 1 token]

(images through SigLIP and pixel shuffle (vlm.py), then the connector, a linear layer defined here; words
through SmolLM2's embedding, both scaled by √D; the state through one linear layer, the state projection,
also defined here). The *suffix* is the noisy action chunk x_τ, each action
fused with the flow time τ (flow.py). Who may attend to whom is one block mask over [prefix; suffix]:

                  keys: image  words  state  a1  a2  a3
        blocks:          0 …    0 …    1     1   1   1
        image, words      ■      ■     ·     ·   ·   ·
        state             ■      ■     ■     ·   ·   ·
        a1                ■      ■     ■     ■   ·   ·
        a2                ■      ■     ■     ■   ■   ·
        a3                ■      ■     ■     ■   ■   ■

Images and words see each other, the state token sees them, each action sees the whole prefix and the
actions before it, and nothing in the prefix sees an action. So the VLM runs once per observation
(`encode_observation`, leaving per-layer keys/values) and each flow step runs only the expert
(`velocity`, expert.py). Training: `compute_loss`; inference: `sample_actions`, both in normalized units.

Around the model, policy.py (read next) makes it the official lerobot policy, `SmolVLAPolicy`: robot
units in and out (`predict_chunk`, `training_loss`) and lerobot's checkpoint format (`from_pretrained`,
`save_pretrained`); this file knows nothing of it. speed.py makes it fast from outside. Reading order: the
config, the block mask, the model (building it, the prefix, the suffix, the loss, sampling).
"""

import copy
import json
import math
from dataclasses import dataclass, field, fields

import torch
import torch.nn.functional as F
from torch import nn

from expert import ActionExpert, DecoderConfig, SuffixLayout, expert_mlp_width, rope_angles
from flow import (euler_sample, flow_matching_loss, guided_sample, noisy_actions_and_target, prefix_sample,
                  prefix_times, sample_noise, sample_time, time_embedding)
from vlm import TextModel, VisionTower, parse_vlm_config, pixel_shuffle, resize_with_pad

# lerobot's names for what a policy reads and writes (a dataset's columns carry the same names)
STATE = "observation.state"
ACTION = "action"
IMAGE_PREFIX = "observation.images."

# Real-Time Chunking's guidance settings (flow.py), the one home of their defaults: sample_actions' and the
# command line's (policy_server.add_policy_arguments). Chosen from the README's RTC lab (lab 6): the
# reference's horizon 10, β = 10 and linear ramp; the reference's identity in place of the paper's
# vector-Jacobian product (jacobian=False), which costs a backward pass per step and pulled less there.
RTC_DEFAULTS = {
    "execution_horizon": 10,
    "schedule": "linear",
    "max_guidance_weight": 10.0,
    "jacobian": False,
}

# config.json's fields that lerobot writes and the model does not use (training bookkeeping; the Aloha flags
# must be off, SmolVLAConfig.validate checks), with lerobot 0.4.4's defaults: a fresh checkpoint carries
# them so that lerobot's strict config parser loads it. The optimizer's and scheduler's fields are the
# training recipe's (train.py's RECIPE writes them into the checkpoints it saves; lerobot's defaults fill
# them in where a checkpoint lacks them).
LEROBOT_CONFIG_FIELDS = {
    "n_obs_steps": 1, "device": "cpu", "use_amp": False, "use_peft": False, "push_to_hub": False,
    "repo_id": None, "private": None, "tags": None, "license": None, "pretrained_path": None,
    "adapt_to_pi_aloha": False, "use_delta_joint_actions_aloha": False, "use_cache": True,
    "load_vlm_weights": False, "rtc_config": None, "compile_model": False,
    "compile_mode": "max-autotune",
}

# smolvla_base's camera/state/action features (its camera names: camera1 = top view, camera2 = wrist, ...)
SMOLVLA_BASE_FEATURES = {
    "input_features": {
        STATE: {"type": "STATE", "shape": [6]},
        **{f"{IMAGE_PREFIX}camera{i}": {"type": "VISUAL", "shape": [3, 256, 256]} for i in (1, 2, 3)},
    },
    "output_features": {ACTION: {"type": "ACTION", "shape": [6]}},
}


# ----------------------------------------------------------------------------------------------------
# Configuration: the fields of lerobot's config.json for a "smolvla" policy that this code reads.


def default_input_features() -> dict:  # a fresh copy of smolvla_base's, for every new config
    return copy.deepcopy(SMOLVLA_BASE_FEATURES["input_features"])


def default_output_features() -> dict:
    return copy.deepcopy(SMOLVLA_BASE_FEATURES["output_features"])


@dataclass
class SmolVLAConfig:
    """What the model reads from a policy's config.json. The other fields lerobot writes (training
    bookkeeping) ride along in `extra` and are written back unchanged (LEROBOT_CONFIG_FIELDS)."""

    input_features: dict = field(default_factory=default_input_features)
    output_features: dict = field(default_factory=default_output_features)
    chunk_size: int = 50  # actions per chunk
    n_action_steps: int = 50  # actions executed per chunk before looking again (the demo's evaluation)
    # per feature type: IDENTITY, MEAN_STD or MIN_MAX
    normalization_mapping: dict = field(
        default_factory=lambda: {"VISUAL": "IDENTITY", "STATE": "MEAN_STD", "ACTION": "MEAN_STD"}
    )
    max_state_dim: int = 32  # state and actions are zero-padded to these widths
    max_action_dim: int = 32
    resize_imgs_with_padding: list | None = field(default_factory=lambda: [512, 512])  # [width, height]
    empty_cameras: int = 0  # blank camera slots appended after the real cameras
    tokenizer_max_length: int = 48
    pad_language_to: str = "longest"  # or "max_length"
    num_steps: int = 10  # Euler steps of flow matching
    freeze_vision_encoder: bool = True  # what training updates (see SmolVLA.set_requires_grad)
    train_expert_only: bool = True
    train_state_proj: bool = True
    vlm_model_name: str = "HuggingFaceTB/SmolVLM2-500M-Video-Instruct"  # the VLM it was built from
    add_image_special_tokens: bool = False  # wrap each camera's tokens in SmolVLM's image marker tokens
    attention_mode: str = "cross_attn"
    prefix_length: int = -1  # > 0: pad the prefix to this many tokens
    num_expert_layers: int = -1  # <= 0: as many as the VLM's kept layers
    num_vlm_layers: int = 16  # keep the VLM's first N text layers
    self_attn_every_n_layers: int = 2  # expert layers 0, n, 2n, … attend jointly; the others cross-attend
    expert_width_multiplier: float = 0.75
    min_period: float = 4e-3  # time embedding periods
    max_period: float = 4.0
    extra: dict = field(default_factory=dict)  # config.json's other fields, as they were

    @classmethod
    def from_json_dict(cls, d: dict) -> "SmolVLAConfig":
        if d.get("type", "smolvla") != "smolvla":
            raise ValueError(
                f"this is a '{d.get('type')}' policy checkpoint, not a SmolVLA one "
                "('type' must be 'smolvla')"
            )
        known = {config_field.name for config_field in fields(cls)} - {"extra"}
        cfg = cls(**{key: value for key, value in d.items() if key in known})
        cfg.extra = {key: value for key, value in d.items() if key not in known and key != "type"}
        cfg.validate()
        return cfg

    def to_json_dict(self) -> dict:
        as_json = {"type": "smolvla", **LEROBOT_CONFIG_FIELDS, **self.extra}
        for config_field in fields(self):
            if config_field.name != "extra":
                as_json[config_field.name] = getattr(self, config_field.name)
        return json.loads(json.dumps(as_json))  # tuples -> lists, fresh copy

    def validate(self):
        if self.extra.get("adapt_to_pi_aloha") or self.extra.get("use_delta_joint_actions_aloha"):
            raise ValueError("the Aloha adaptations of SmolVLA (adapt_to_pi_aloha, ...) "
                             "are not supported here")
        if self.pad_language_to not in ("longest", "max_length"):
            raise ValueError("pad_language_to must be 'longest' or 'max_length', "
                             f"got {self.pad_language_to!r}")
        if STATE not in self.input_features or ACTION not in self.output_features:
            raise ValueError(f"the config needs an input feature '{STATE}' and an output feature '{ACTION}'")

    @property
    def empty_camera_keys(self) -> list[str]:
        """Names lerobot gives the blank camera slots (it adds them to input_features itself)."""
        return [f"{IMAGE_PREFIX}empty_camera_{i}" for i in range(self.empty_cameras)]

    @property
    def camera_keys(self) -> list[str]:
        """The real cameras the policy reads, in config order (what an observation must provide)."""
        cameras = []
        for key, feature in self.input_features.items():
            if feature["type"] == "VISUAL" and key not in self.empty_camera_keys:
                cameras.append(key)
        return cameras

    @property
    def state_dim(self) -> int:
        return self.input_features[STATE]["shape"][0]

    @property
    def action_dim(self) -> int:
        return self.output_features[ACTION]["shape"][0]


# ----------------------------------------------------------------------------------------------------
# Who attends to whom.


def block_attention_mask(pad_mask: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """Who may attend to whom, from a padding mask and "block starts" (big_vision's prefix-LM scheme).

    pad_mask (B, L) bool: True for real tokens. blocks (B, L) int: 1 where a token starts a new block,
    0 where it joins the previous one. A token sees every real token of its own block and of all earlier
    blocks: cumsum(blocks)[key] <= cumsum(blocks)[query]. SmolVLA's sequence [prefix; suffix]: images and
    words are one bidirectional block (0 …), the state token starts a block (1), and every action token
    starts its own (1 1 1 …): the diagram at the top of this file. Returns (B, L, L) bool, [query, key].
    """
    block_id = torch.cumsum(blocks, dim=1)  # (B, L)
    causal = block_id[:, None, :] <= block_id[:, :, None]  # (B, Lq, Lk)
    return causal & pad_mask[:, None, :] & pad_mask[:, :, None]


@dataclass
class PrefixContext:
    """What one observation leaves behind for the flow steps: the expert's view of the VLM (per-layer
    keys/values) and the action tokens' attention masks and rotary angles, which are the same at every
    step."""

    cache: list  # per VLM layer (k, v) (B, P, Hkv, hd), see ActionExpert.cache_prefix
    suffix: SuffixLayout  # the action tokens' masks and rotary angles, see ActionExpert.suffix_layout


def pad_last_dim(x: torch.Tensor, width: int) -> torch.Tensor:
    """Zero-pad the last dimension to `width` (state 6 -> 32, actions 6 -> 32)."""
    if x.shape[-1] > width:
        raise ValueError(f"got {x.shape[-1]} dims, the policy takes at most {width}")
    return F.pad(x, (0, width - x.shape[-1]))


# ----------------------------------------------------------------------------------------------------
# The model.


class SmolVLA(nn.Module):
    """SmolVLM2 cut to N layers + action expert + the projections in and out of the expert.

    Tensor level, in normalized units: compute_loss, sample_actions. Robot units and checkpoints are
    policy.py's SmolVLAPolicy, a subclass.
    """

    config_class = SmolVLAConfig

    def __init__(self, config: SmolVLAConfig, vlm_config: dict, tokenizer=None):
        super().__init__()
        config.validate()
        self.config = config
        self.vlm_config = vlm_config  # the VLM's config.json, as read
        self.tokenizer = tokenizer
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
        self._init_like_reference()
        self.set_requires_grad()

    def _init_like_reference(self, std: float = 0.02):
        """Transformer weights ~ N(0, 0.02) as Hugging Face initializes SmolVLM/SmolLM2 (they are replaced
        by pretrained weights anyway); the expert's cross-attention k/v and the five projections keep
        PyTorch's default init, as in the reference (they are plain nn.Linear there)."""
        for tower in (self.vision, self.text, self.expert):
            for module in tower.modules():
                if isinstance(module, (nn.Linear, nn.Embedding)):
                    nn.init.normal_(module.weight, std=std)
                    if getattr(module, "bias", None) is not None:
                        nn.init.zeros_(module.bias)
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
            module.requires_grad_(all(module is not frozen_module for frozen_module in frozen))
        self.state_proj.requires_grad_(cfg.train_state_proj)

    # --- prefix: images, words, state ----------------------------------------------------------------

    def prepare_images(self, images: list, img_masks: list) -> tuple[list, list]:
        """Check the frames, resize-with-pad them and map [0, 1] -> [-1, 1] (SigLIP's range); append the
        config's blank cameras (all −1, masked out). images: list of (B, 3, H, W) float in [0, 1] or uint8
        (0..255, converted here), img_masks: list of (B,): the cameras present, in config order. Like the
        reference, the model runs on fewer cameras than it configures (smolvla_base reads three, most arms
        have two): an unfilled slot adds no tokens at all."""
        cfg = self.config
        n_real = len(cfg.camera_keys)
        if len(images) != len(img_masks):
            raise ValueError(f"got {len(images)} images but {len(img_masks)} image masks")
        if not images:
            raise ValueError("at least one camera image is needed")
        if len(images) > n_real:
            raise ValueError(f"got {len(images)} cameras; "
                             f"this policy reads {n_real} ({', '.join(cfg.camera_keys)})")
        prepared = []
        for img in images:
            # frames as the dataset reader gives them: to float here, where they land
            if img.dtype == torch.uint8:
                img = img.float() / 255
            if img.ndim != 4 or img.shape[1] != 3 or not img.is_floating_point():
                raise ValueError("images must be float or uint8 (B, 3, H, W), "
                                 f"got {tuple(img.shape)} {img.dtype}")
            lo = img.min().item()
            hi = img.max().item()
            if lo < 0 or hi > 1:
                raise ValueError(
                    f"images must be in [0, 1] (got values in [{lo:.3g}, {hi:.3g}]): divide uint8 by 255"
                )
            if cfg.resize_imgs_with_padding is not None:
                img = resize_with_pad(img, *cfg.resize_imgs_with_padding)
            prepared.append(img * 2.0 - 1.0)
        masks = [mask.bool() for mask in img_masks]
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
        # the prefix's pieces, in order: their embeddings, padding masks and block starts
        embs = []
        pad = []
        blocks = []

        def all_real(n):  # the padding mask of n real tokens: (B, n) bool, all True
            return torch.ones(batch, n, dtype=torch.bool, device=state.device)

        def add(emb, mask, block_start):  # emb (B, n, D), mask (B, n) bool
            embs.append(emb)
            pad.append(mask)
            blocks.extend([block_start] + [0] * (emb.shape[1] - 1))

        def add_marker(*tokens):  # SmolVLM's image marker tokens, all real, in the images' block
            add(self.embed_marker_tokens(tokens, batch), all_real(len(tokens)), 0)

        for img_emb, img_mask in zip(self.embed_images(images), img_masks):
            if self.config.add_image_special_tokens:
                add_marker("<fake_token_around_image>", "<global-img>")
            # SmolVLA scales image and word embeddings by √D (as Gemma-style models do); as in the
            # reference, the images' factor is first rounded to their dtype (in bf16 √960 = 31.0), the
            # words' is not
            img_emb = img_emb * torch.tensor(width**0.5, dtype=img_emb.dtype, device=img_emb.device)
            add(img_emb, img_mask[:, None].expand(batch, img_emb.shape[1]), 0)
            if self.config.add_image_special_tokens:
                add_marker("<fake_token_around_image>")
        add(self.embed_tokens(lang_tokens) * math.sqrt(width), lang_masks.bool(), 0)  # (B, L, D)
        # the state: one token, a block of its own (images and words do not attend to it)
        add(self.state_proj(state.to(self.state_proj.weight.dtype))[:, None, :], all_real(1), 1)  # (B, 1, D)

        embs = torch.cat(embs, dim=1)  # (B, P, D)
        pad = torch.cat(pad, dim=1)  # (B, P)
        blocks = torch.tensor(blocks, dtype=torch.long, device=pad.device)[None].expand(batch, -1)  # (B, P)
        if embs.shape[1] < self.config.prefix_length:  # optional fixed-length prefix: pad with masked zeros
            extra = self.config.prefix_length - embs.shape[1]
            embs = F.pad(embs, (0, 0, 0, extra))
            pad = F.pad(pad, (0, extra), value=False)
            blocks = F.pad(blocks, (0, extra), value=0)
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
        embs, pad, blocks = self.embed_prefix(images, img_masks, lang_tokens, lang_masks, state)  # (B, P, ·)
        # the whole sequence [prefix; suffix]: the suffix's chunk_size action tokens are real and each
        # starts a block of its own; one mask for both parts (the diagram at the top), sliced below
        batch, p = pad.shape
        chunk = self.config.chunk_size
        real = torch.ones(batch, chunk, dtype=torch.bool, device=pad.device)
        pad = torch.cat([pad, real], dim=1)  # (B, P + S)
        blocks = torch.cat([blocks, real.long()], dim=1)  # (B, P + S)
        mask = block_attention_mask(pad, blocks)  # (B, P + S, P + S)
        positions = torch.cumsum(pad, dim=1) - 1  # (B, P + S): padding tokens do not advance the position
        # the VLM over the prefix, once: per layer its keys/values, what the expert attends to
        rope = rope_angles(positions[:, :p], self.text.layers[0].self_attn.head_dim)
        keys_values = self.text.keys_values(embs, mask[:, :p, :p].contiguous(), rope)
        # the action tokens: their rows of the mask and their positions, the same at every flow step
        suffix = self.expert.suffix_layout(mask[:, p:].contiguous(), positions[:, p:])
        return PrefixContext(self.expert.cache_prefix(keys_values), suffix)

    # --- suffix: noisy actions and flow time ---------------------------------------------------------

    def embed_suffix(self, noisy_actions: torch.Tensor, time: torch.Tensor) -> torch.Tensor:
        """(B, S, max_action_dim) float32 noisy actions and flow time, (B,) or per token (B, S)
        (training-time RTC) -> (B, S, d_e) expert tokens: each projected action concatenated with its
        time's sine-cosine embedding, then Linear-SiLU-Linear."""
        action_emb = self.action_in_proj(noisy_actions.to(self.action_in_proj.weight.dtype))  # (B, S, d_e)
        time_emb = time_embedding(time, action_emb.shape[-1], self.config.min_period, self.config.max_period)
        time_emb = time_emb.to(action_emb.dtype)  # (B, d_e) or (B, S, d_e)
        if time.ndim == 1:  # one time for the whole chunk: the same for every action token
            time_emb = time_emb[:, None, :].expand_as(action_emb)  # (B, S, d_e)
        # (B, S, 2·d_e) -> (B, S, d_e)
        fused = self.action_time_mlp_in(torch.cat([action_emb, time_emb], dim=2))
        return self.action_time_mlp_out(F.silu(fused))  # (B, S, d_e)

    def velocity(self, ctx: PrefixContext, noisy_actions: torch.Tensor, time: torch.Tensor) -> torch.Tensor:
        """The expert's predicted flow velocity v(x_τ, τ | observation): (B, S, max_action_dim) float32.
        S may be shorter than the chunk: the first S action tokens' velocities (SuffixLayout.head)."""
        suffix = self.embed_suffix(noisy_actions, time)  # (B, S, d_e)
        if suffix.shape[1] == ctx.suffix.cross_mask.shape[1]:  # the whole chunk
            layout = ctx.suffix
        else:
            layout = ctx.suffix.head(suffix.shape[1])
        hidden = self.expert(suffix, ctx.cache, layout)  # (B, S, d_e)
        # the output projection runs in float32 whatever the model's dtype (as in the reference)
        weight = self.action_out_proj.weight
        bias = self.action_out_proj.bias
        return F.linear(hidden.float(), weight.float(), bias.float())

    # --- tensor level: training loss and sampling, in normalized units -------------------------------

    def compute_loss(self, images, img_masks, lang_tokens, lang_masks, state, actions, noise=None, time=None,
                     rtc_delay=None):
        """Flow-matching loss per element: (B, chunk, max_action_dim), before any padding mask.

        images: list of (B, 3, H, W) in [0, 1] (the cameras present, config order); img_masks: list of (B,)
        bool; lang_tokens (B, L) int64 / lang_masks (B, L) bool; state (B, state_dim) and actions
        (B, chunk, action_dim) normalized; noise (B, chunk, max_action_dim); time (B,).
        rtc_delay (B,) int, training-time RTC (flow.py): sample b's first rtc_delay[b] action tokens carry
        the clean actions at flow time 0; their losses are set to 0 here and the caller leaves them out.
        """
        if actions.ndim != 3 or actions.shape[1] != self.config.chunk_size:
            raise ValueError(f"actions must be (B, {self.config.chunk_size}, action_dim), "
                             f"got {tuple(actions.shape)}")
        actions = pad_last_dim(actions.float(), self.config.max_action_dim)  # (B, chunk, max_action_dim)
        noise = sample_noise(actions.shape, actions.device) if noise is None else noise
        time = sample_time(actions.shape[0], actions.device) if time is None else time
        if rtc_delay is not None:
            # (B, chunk): 0 in the prefix
            time = prefix_times(time, rtc_delay.to(time.device), actions.shape[1])
        x_t, u_t = noisy_actions_and_target(actions, noise, time)
        ctx = self.encode_observation(images, img_masks, lang_tokens, lang_masks, state)
        losses = flow_matching_loss(self.velocity(ctx, x_t, time), u_t)
        return losses if rtc_delay is None else losses * (time > 0)[..., None]

    @torch.no_grad()
    def sample_actions(self, images, img_masks, lang_tokens, lang_masks, state, noise=None, leftover=None,
                       inference_delay=0,
                       execution_horizon=RTC_DEFAULTS["execution_horizon"],
                       schedule=RTC_DEFAULTS["schedule"],
                       max_guidance_weight=RTC_DEFAULTS["max_guidance_weight"],
                       jacobian=RTC_DEFAULTS["jacobian"],
                       rtc_mode="guided") -> torch.Tensor:
        """A chunk by `num_steps` Euler steps of the flow, from noise: (B, chunk, max_action_dim),
        normalized. The VLM runs once (encode_observation); each step runs only the expert.

        Real-Time Chunking (flow.py) when `leftover` is given: the previous chunk's actions for this
        chunk's timesteps, (B, T_prev, A_prev) normalized (zero-padded to the chunk). rtc_mode="guided":
        every velocity is guided toward it (first inference_delay steps frozen, a `schedule` ramp to 0 at
        execution_horizon, weight capped at max_guidance_weight; jacobian: the paper's vector-Jacobian
        product, else the reference's identity; defaults: RTC_DEFAULTS). rtc_mode="trained" (a policy
        trained with --rtc-max-delay): the first inference_delay tokens hold the leftover at flow time 0.
        leftover=None: no RTC.
        """
        shape = (state.shape[0], self.config.chunk_size, self.config.max_action_dim)
        if noise is not None and tuple(noise.shape) != shape:
            raise ValueError(f"noise must have shape {shape} (B, chunk_size, max_action_dim), "
                             f"got {tuple(noise.shape)}")
        ctx = self.encode_observation(images, img_masks, lang_tokens, lang_masks, state)
        noise = sample_noise(shape, state.device) if noise is None else noise.to(state.device)

        def velocity(x, t):  # the flow's velocity field for this observation: the expert over ctx
            return self.velocity(ctx, x, t)

        steps = self.config.num_steps
        if leftover is None:
            return euler_sample(velocity, noise.float(), steps)
        leftover = torch.as_tensor(leftover, device=state.device)
        if rtc_mode == "trained":
            return prefix_sample(velocity, noise.float(), steps, leftover, inference_delay)
        if rtc_mode != "guided":
            raise ValueError(f"rtc_mode must be 'guided' or 'trained', got {rtc_mode!r}")
        # causal: an action token's velocity depends only on the tokens up to it (the block mask)
        return guided_sample(velocity, noise.float(), steps, leftover, inference_delay, execution_horizon,
                             schedule, max_guidance_weight, jacobian, causal=True)
