"""SmolVLM2 cut in half: the vision-language model that reads the scene and the task (SmolVLA paper §3.1).

SmolVLA's VLM is SmolVLM2-500M (the stack huggingface/nanoVLM builds too): a SigLIP vision tower, a pixel
shuffle and a linear connector that turn each camera frame into a few tokens, and the SmolLM2 language
model that reads them together with the task's words. Two choices of §3.1 make it small and fast:

- **visual token reduction**: SigLIP turns a 512×512 frame into 32×32 = 1024 patch tokens; the pixel
  shuffle folds every 4×4 block of them into one token 16× wider, so a camera costs 64 tokens:

      frame (3, 512, 512) ─► SigLIP (12 layers) ─► (1024, 768)
          ─► pixel shuffle ─► (64, 12288) ─► linear ─► (64, 960)

- **layer skipping**: only the first N = 16 of SmolLM2's 32 layers are kept; robot control needs the
  VLM's features, not its last layers' next-token predictions, and half the layers is half the cost.

SmolVLA never runs the language model to its end: what the action expert needs from each kept layer is
its keys and values over the prefix (`TextModel.keys_values`). The decoder layer itself (RMSNorm, RoPE,
grouped-query attention, gated MLP) is the same recipe as the expert's and lives in expert.py.

Reading order: the VLM's shape (read from its Hugging Face config.json), the SigLIP tower, pixel shuffle,
the text stack, the frames' preprocessing (resize with padding) and, last, the VLM's files.
"""

import math
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from expert import DecoderConfig, DecoderLayer, RMSNorm, attention
from plumbing import DamagedFile, read_json, read_safetensors, require_file, require_keys, resolve_dir

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


# ----------------------------------------------------------------------------------------------------
# The VLM's shape, read from its Hugging Face config.json.


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
        raise ValueError("the VLM must be a SmolVLM (model_type 'smolvlm'), "
                         f"got {vlm_config.get('model_type')!r}")
    full = SmolVLMConfig.from_dict(vlm_config)
    hf_vision = full.vision_config
    hf_text = full.text_config
    if hf_vision.hidden_act != "gelu_pytorch_tanh" or hf_text.hidden_act != "silu":
        raise ValueError("only SmolVLM's activations are supported (gelu_pytorch_tanh vision, silu text)")
    if getattr(hf_text, "attention_bias", False) or getattr(hf_text, "mlp_bias", False):
        raise ValueError("only SmolLM2-style text models without biases are supported")
    vision = VisionConfig(
        hidden_size=hf_vision.hidden_size,
        intermediate_size=hf_vision.intermediate_size,
        num_layers=hf_vision.num_hidden_layers,
        num_heads=hf_vision.num_attention_heads,
        image_size=hf_vision.image_size,
        patch_size=hf_vision.patch_size,
        layer_norm_eps=hf_vision.layer_norm_eps,
        num_channels=hf_vision.num_channels,
    )
    text = DecoderConfig(
        hidden_size=hf_text.hidden_size,
        intermediate_size=hf_text.intermediate_size,
        num_layers=hf_text.num_hidden_layers,
        num_heads=hf_text.num_attention_heads,
        num_kv_heads=hf_text.num_key_value_heads or hf_text.num_attention_heads,
        head_dim=getattr(hf_text, "head_dim", None) or hf_text.hidden_size // hf_text.num_attention_heads,
        rms_norm_eps=hf_text.rms_norm_eps,
    )
    return vision, text, full.scale_factor, hf_text.vocab_size


# ----------------------------------------------------------------------------------------------------
# The SigLIP vision tower (a plain ViT: patches + learned positions, pre-norm layers, final LayerNorm),
# and the pixel shuffle.


class VisionAttention(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.head_dim = cfg.hidden_size // cfg.num_heads
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.out_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:  # (B, N, D) -> (B, N, H, hd)
        return x.view(*x.shape[:-1], -1, self.head_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (B, N, D) -> (B, N, D), every patch sees every patch
        q = self.split_heads(self.q_proj(x))
        k = self.split_heads(self.k_proj(x))
        v = self.split_heads(self.v_proj(x))
        out = attention(q, k, v, mask=None)
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
    tokens form a side×side grid (32×32); token (I, J) of the output is the block of rows
    I·f..I·f+f−1 and columns J·f..J·f+f−1, its channels ordered (row in block, column in block,
    feature). Nothing is lost — the tokens are only regrouped — but the language model now sees 16×
    fewer, 16× wider image tokens.
    """
    batch, num_tokens, dim = x.shape
    side = math.isqrt(num_tokens)
    if side * side != num_tokens or side % factor != 0:
        raise ValueError(f"pixel shuffle needs a square grid of patches, a multiple of {factor} wide: "
                         f"{num_tokens}")
    blocks = side // factor
    x = x.view(batch, blocks, factor, blocks, factor, dim)  # (B, I, row in block, J, column in block, D)
    x = x.permute(0, 1, 3, 2, 4, 5)  # (B, I, J, row in block, column in block, D)
    return x.reshape(batch, blocks * blocks, factor * factor * dim)  # (B, N/f², f²·D)


# ----------------------------------------------------------------------------------------------------
# The language model: SmolLM2 cut to its first N layers.


class TextModel(nn.Module):
    """SmolLM2's token embedding, its first N decoder layers, and its final norm (kept for the checkpoint;
    SmolVLA only uses the layers' keys/values). Checkpoint names: `…vlm.model.text_model.*`."""

    def __init__(self, cfg: DecoderConfig, vocab_size: int):
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def keys_values(self, x: torch.Tensor, mask: torch.Tensor, rope: tuple,
                    past: list | None = None) -> list:
        """Run the layers over tokens x (B, L, D); return per layer their keys (after RoPE) and values,
        each (B, L, Hkv, hd): what the action expert attends to. mask (B, L, L) bool, rope from rope_angles.

        past: per layer the keys/values of earlier tokens, which x also attends to (then mask is
        (B, L, earlier + L)) and which lead the returned ones; speed.py uses it to run a prefix in two
        parts.
        """
        keys_values = []
        for i, layer in enumerate(self.layers):
            q, k, v = layer.qkv(x, rope)  # (B, L, H, hd), (B, L, Hkv, hd) ×2
            if past is not None:
                past_k, past_v = past[i]
                k = torch.cat([past_k, k], dim=1)  # (B, earlier + L, Hkv, hd)
                v = torch.cat([past_v, v], dim=1)
            keys_values.append((k, v))
            # the last layer's output is never used: only its keys/values are
            if i < len(self.layers) - 1:
                x = layer.finish(x, attention(q, k, v, mask))
        return keys_values


# ----------------------------------------------------------------------------------------------------
# The frames' preprocessing: camera pixels to what the vision tower reads.


def resize_with_pad(images: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """Resize (B, C, h, w) to fit width×height keeping the aspect ratio (bilinear), then pad with zeros on
    the left and top (where the reference puts the padding) to exactly (B, C, height, width)."""
    h, w = images.shape[2:]
    ratio = max(w / width, h / height)
    new_h = int(h / ratio)
    new_w = int(w / ratio)
    resized = F.interpolate(images, size=(new_h, new_w), mode="bilinear", align_corners=False)
    return F.pad(resized, (max(0, width - new_w), 0, max(0, height - new_h), 0), value=0.0)


# ----------------------------------------------------------------------------------------------------
# The VLM's files: its description (config.json, tokenizer) and its weights (Hugging Face format).

# the files that describe a VLM (architecture, tokenizer, processor), without its weights
VLM_DESCRIPTION_FILES = ["*.json", "*.txt", "*.model", "*.jinja"]
# what to do with a VLM file that is cut short or damaged (the error names the file)
VLM_ADVICE = "re-download the VLM directory (or copy it again)"


def load_vlm_description(source: str) -> tuple[dict, object]:
    """The VLM's config.json (its architecture) and its tokenizer, from a directory or Hub id."""
    from transformers import AutoTokenizer

    vlm_dir = resolve_dir(source, "VLM", VLM_DESCRIPTION_FILES)
    config_path = os.path.join(vlm_dir, "config.json")
    vlm_config = read_json(config_path, "VLM config.json", advice=VLM_ADVICE)
    try:
        parse_vlm_config(vlm_config)  # fail early on a config that is not SmolVLM's
    except (TypeError, ValueError, KeyError, AttributeError) as error:
        raise DamagedFile(config_path, f"is not a usable SmolVLM config ({error})") from None
    # the tokenizer's files, read here first: transformers' errors about them do not name the file
    tokenizer_path = require_file(os.path.join(vlm_dir, "tokenizer.json"), "the VLM's tokenizer", VLM_ADVICE)
    read_json(tokenizer_path, "the VLM's tokenizer", advice=VLM_ADVICE)
    tokenizer_config = os.path.join(vlm_dir, "tokenizer_config.json")
    if os.path.isfile(tokenizer_config):
        read_json(tokenizer_config, "the tokenizer's config", advice=VLM_ADVICE)
    try:
        tokenizer = AutoTokenizer.from_pretrained(vlm_dir)
    except Exception as error:  # (whatever the tokenizer's library raises: one line of it)
        reason = " ".join(str(error).split())
        raise ValueError(f"could not load the tokenizer from {vlm_dir}: {reason}") from None
    return vlm_config, tokenizer


def read_safetensors_dir(directory: str) -> dict:
    """All tensors of a Hugging Face model directory: model.safetensors or shards listed in its index."""
    single = os.path.join(directory, "model.safetensors")
    index = os.path.join(directory, "model.safetensors.index.json")
    if os.path.isfile(single):
        return read_safetensors(single, "VLM weights", VLM_ADVICE)
    if os.path.isfile(index):
        weight_map = require_keys(read_json(index, "weights index", advice=VLM_ADVICE), ["weight_map"], index,
                                  VLM_ADVICE)["weight_map"]
        tensors = {}
        for shard in sorted(set(weight_map.values())):
            tensors.update(read_safetensors(os.path.join(directory, shard), "VLM weights", VLM_ADVICE))
        return tensors
    raise FileNotFoundError(f"no model.safetensors (or model.safetensors.index.json) in {directory}")
