"""Tests of the model against what the reference implementation (lerobot 0.4.4) computes: the vectors in
testdata/smolvla_tiny and testdata/smolvla_variants (see testdata/README.md), the tensor names and shapes of
the full-size smolvla_base checkpoint (testdata/smolvla_base_keys.tsv), and a policy run on fewer cameras
than it configures (testdata/fewer_cameras)."""

import copy
import json
import os
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import infer_async as ia
import policy
from flow import euler_sample, noisy_actions_and_target, sample_time
from policy import LEROBOT, SmolVLAPolicy, checkpoint_name, load_policy_tensors
from smolvla import SmolVLA, SmolVLAConfig, block_attention_mask
from vlm import SMOLVLM2_500M_VIDEO_INSTRUCT

HERE = os.path.dirname(os.path.abspath(__file__))
TINY = os.path.join(HERE, "testdata", "smolvla_tiny")
CKPT, VLM = os.path.join(TINY, "checkpoint"), os.path.join(TINY, "vlm")
STATS_FILE = os.path.join(CKPT, "policy_preprocessor_step_5_normalizer_processor.safetensors")
VARIANTS = os.path.join(HERE, "testdata", "smolvla_variants")
TOL = 1e-5  # fp32 on CPU: a faithful reimplementation agrees to this


def tensor_inputs(io, num_cameras=2):
    """images, img_masks, lang_tokens, lang_masks, state as the tensor-level calls take them."""
    images = [io[f"image{i}"] for i in range(num_cameras)]
    masks = [torch.ones(io["state"].shape[0], dtype=torch.bool)] * num_cameras
    return images, masks, io["lang_tokens"], io["lang_masks"], io["state"]


def masked_loss(losses, action_is_pad, action_dim):
    """The scalar training loss: mean over in-episode chunk steps and the real action dims."""
    valid = ~action_is_pad
    return ((losses[:, :, :action_dim] * valid[..., None]).sum() / (valid.sum() * action_dim)).reshape(1)


def policy_observation(io):
    meta = json.load(open(os.path.join(TINY, "io.json")))
    return {
        "observation.state": io["policy_state_raw"],
        "observation.images.top": io["image0"][0],
        "observation.images.wrist": io["image1"][0],
        "task": meta["policy_task"],
    }


# --- parity with the reference on the tiny checkpoint ---------------------------------------------------


def test_compute_loss_matches_reference(tiny, io):
    with torch.no_grad():
        losses = tiny.compute_loss(*tensor_inputs(io), io["actions"], noise=io["noise"], time=io["time"])
    assert losses.shape == io["expected_losses"].shape
    torch.testing.assert_close(losses, io["expected_losses"], atol=TOL, rtol=0)
    torch.testing.assert_close(masked_loss(losses, io["action_is_pad"], 6), io["expected_loss"], atol=TOL, rtol=0)


def test_sample_actions_matches_reference(tiny, io):
    chunk = tiny.sample_actions(*tensor_inputs(io), noise=io["sample_noise"])
    torch.testing.assert_close(chunk, io["expected_sampled"], atol=TOL, rtol=0)


def test_predict_chunk_matches_reference(tiny, io):
    observation = policy_observation(io)
    tokens, _ = tiny.tokenize(observation["task"])
    assert torch.equal(tokens, io["policy_lang_tokens"])
    chunk = tiny.predict_chunk(observation, noise=io["sample_noise"][:1])
    assert chunk.shape == (1, 50, 6)
    torch.testing.assert_close(chunk, io["policy_expected_chunk"], atol=TOL, rtol=TOL)


def accelerator_unavailable(device):
    """Why this machine cannot run the model on `device`, or None (the README says where each was verified)."""
    if device == "cuda" and not torch.cuda.is_available():
        return "no CUDA GPU on this machine: runs where one is (python3 -m pytest -q -k accelerator)"
    if device == "mps" and not torch.backends.mps.is_available():
        return "no Apple-silicon GPU (MPS) on this machine: runs on a Mac with one"
    return None


@pytest.mark.parametrize("device", ["cuda", "mps"])
def test_accelerator_matches_the_reference(io, device):
    """--device cuda / mps: the same checkpoint on the GPU gives the reference's chunk (float32; TF32 off on
    CUDA, and MPS's flow times in float32 as flow.py says), and predict_chunk takes CPU observations."""
    reason = accelerator_unavailable(device)
    if reason is not None:
        pytest.skip(reason)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    model = SmolVLAPolicy.from_pretrained(CKPT, vlm=VLM).to(device)
    inputs = [x.to(device) if torch.is_tensor(x) else [m.to(device) for m in x] for x in tensor_inputs(io)]
    chunk = model.sample_actions(*inputs, noise=io["sample_noise"].to(device))
    torch.testing.assert_close(chunk.cpu(), io["expected_sampled"], atol=1e-4, rtol=0)
    observation = policy_observation(io)
    chunk = model.predict_chunk(observation, noise=io["sample_noise"][:1].to(device))
    torch.testing.assert_close(chunk.cpu(), io["policy_expected_chunk"], atol=1e-4, rtol=1e-4)


def test_training_loss_on_a_raw_batch_matches_reference(tiny, io):
    tasks = json.load(open(os.path.join(TINY, "io.json")))["tasks"]
    stats = tiny.stats
    robot_units = lambda x, f: x * (stats[f]["std"] + 1e-8) + stats[f]["mean"]  # noqa: E731
    batch = {
        "observation.state": robot_units(io["state"], "observation.state"),
        "action": robot_units(io["actions"], "action"),
        "action_is_pad": io["action_is_pad"],
        "observation.images.top": io["image0"],
        "observation.images.wrist": io["image1"],
        "task": [t.rstrip("\n") for t in tasks],
    }
    loss = tiny.training_loss(batch, noise=io["noise"], time=io["time"])
    torch.testing.assert_close(loss.reshape(1), io["expected_loss"], atol=TOL, rtol=0)
    # with sampled noise and time: a scalar whose gradient reaches only the trainable weights
    tiny.training_loss(batch).backward()
    assert tiny.expert.layers[0].mlp.up_proj.weight.grad is not None
    assert tiny.state_proj.weight.grad is not None
    assert tiny.text.layers[0].mlp.up_proj.weight.grad is None  # the VLM is frozen (train_expert_only)
    tiny.zero_grad(set_to_none=True)


def test_bfloat16_model_stays_close_to_the_reference(tiny, io):
    model = copy.deepcopy(tiny).to(torch.bfloat16)
    chunk = model.sample_actions(*tensor_inputs(io), noise=io["sample_noise"])
    assert chunk.dtype == torch.float32  # the flow integrates in float32
    assert (chunk - io["expected_sampled"]).abs().max() < 0.05
    losses = model.compute_loss(*tensor_inputs(io), io["actions"], noise=io["noise"], time=io["time"])
    torch.testing.assert_close(losses, io["expected_losses"], atol=0.05, rtol=0.05)  # squared errors up to ~4


# --- other configurations: vectors the reference computed for them -------------------------------------


def variant_names():
    if not os.path.isdir(VARIANTS):
        return []
    return sorted(d for d in os.listdir(VARIANTS) if os.path.isfile(os.path.join(VARIANTS, d, "io.safetensors")))


@pytest.mark.parametrize("variant", variant_names())
def test_variant_matches_reference(variant):
    """Tensor level, masked loss and policy level of one variant (its io.json says what it exercises)."""
    directory = os.path.join(VARIANTS, variant)
    io = load_file(os.path.join(directory, "io.safetensors"))
    meta = json.load(open(os.path.join(directory, "io.json")))
    model = SmolVLAPolicy.from_pretrained(os.path.join(directory, "checkpoint"), vlm=os.path.join(directory, "vlm"))
    cams = meta["camera_keys_present"]
    assert model.config.camera_keys == cams
    tokens, masks = model.tokenize(meta["tasks"])
    assert torch.equal(tokens, io["lang_tokens"]) and torch.equal(masks, io["lang_masks"])
    inputs = tensor_inputs(io, len(cams))
    with torch.no_grad():
        losses = model.compute_loss(*inputs, io["actions"], noise=io["noise"], time=io["time"])
    torch.testing.assert_close(losses, io["expected_losses"], atol=TOL, rtol=0)
    loss = masked_loss(losses, io["action_is_pad"], meta["action_dim"])
    torch.testing.assert_close(loss, io["expected_loss"], atol=TOL, rtol=0)
    sampled = model.sample_actions(*inputs, noise=io["sample_noise"])
    torch.testing.assert_close(sampled, io["expected_sampled"], atol=TOL, rtol=0)
    observation = {"observation.state": io["policy_state_raw"], "task": meta["policy_task"]}
    observation.update({key: io[f"image{i}"][0] for i, key in enumerate(cams)})
    assert torch.equal(model.tokenize(meta["policy_task"])[0], io["policy_lang_tokens"])
    chunk = model.predict_chunk(observation, noise=io["sample_noise"][:1])
    torch.testing.assert_close(chunk, io["policy_expected_chunk"], atol=TOL, rtol=TOL)


# --- the full-size architecture (built on the meta device: shapes only, instant, no memory) --------------


def base_keys():
    rows = open(os.path.join(HERE, "testdata", "smolvla_base_keys.tsv")).read().splitlines()[1:]
    return {k: tuple(json.loads(shape)) for k, shape in (row.split("\t") for row in rows)}


def base_meta():
    with torch.device("meta"):
        return SmolVLA(SmolVLAConfig(), SMOLVLM2_500M_VIDEO_INSTRUCT)


def test_base_architecture_has_the_checkpoint_names_and_shapes():
    model = base_meta()
    ours = {checkpoint_name(k, LEROBOT): tuple(v.shape) for k, v in model.state_dict().items()}
    assert ours == base_keys()
    assert sum(p.numel() for p in model.parameters()) == 450_046_176
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 99_880_992  # expert + projections


def test_base_checkpoint_in_bf16_fp32_mix_loads_strictly():
    # as published: the five projections and the cross-attention layers' k/v in float32, the rest bfloat16
    def published_dtype(name):
        projection = name.startswith("model.") and "vlm_with_expert" not in name
        cross_kv = "lm_expert" in name and any(f"layers.{i}.self_attn.{p}_proj" in name for i in range(1, 16, 2) for p in "kv")
        return torch.float32 if projection or cross_kv else torch.bfloat16

    tensors = {k: torch.empty(shape, dtype=published_dtype(k), device="meta") for k, shape in base_keys().items()}
    assert sum(t.dtype == torch.float32 for t in tensors.values()) == 26
    # saved under torch.compile, some names carry `._orig_mod`
    tensors = {k.replace("model.vlm_with_expert.", "model._orig_mod.vlm_with_expert.") if i % 7 == 0 else k: t
               for i, (k, t) in enumerate(tensors.items())}
    model = base_meta()
    assert load_policy_tensors(model, tensors) == {}  # no normalization buffers in it
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 99_880_992


def test_mismatched_checkpoint_lists_every_problem():
    tensors = {k: torch.empty(shape, device="meta") for k, shape in base_keys().items()}
    del tensors["model.state_proj.bias"]
    tensors["model.vlm_with_expert.lm_expert.layers.0.self_attn.k_proj.weight"] = torch.empty(3, 3, device="meta")
    tensors["model.something_new.weight"] = torch.empty(1, device="meta")
    with pytest.raises(ValueError) as e:
        load_policy_tensors(base_meta(), tensors)
    msg = str(e.value)
    assert "1 missing: model.state_proj.bias" in msg
    assert "1 unexpected: model.something_new.weight" in msg
    assert "1 wrong shape: model.vlm_with_expert.lm_expert.layers.0.self_attn.k_proj.weight: checkpoint (3, 3)" in msg


# --- loading and saving files ---------------------------------------------------------------------------


def copy_checkpoint(dst, tensors=None, config=None, processors=True):
    """A copy of the tiny checkpoint directory, optionally with other weights, config, or no processor files."""
    os.makedirs(dst, exist_ok=True)
    for name in os.listdir(CKPT):
        if name.startswith("policy_") and processors:
            shutil.copy(os.path.join(CKPT, name), dst)
    tensors = load_file(os.path.join(CKPT, "model.safetensors")) if tensors is None else tensors
    save_file(tensors, os.path.join(dst, "model.safetensors"))
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(config or json.load(open(os.path.join(CKPT, "config.json"))), f)
    return dst


def test_bf16_fp32_mixed_weights_load_into_float32(tmp_path):
    tensors = load_file(os.path.join(CKPT, "model.safetensors"))
    mixed = {k: t.bfloat16() if "vlm_with_expert" in k else t for k, t in tensors.items()}
    model = SmolVLAPolicy.from_pretrained(copy_checkpoint(tmp_path / "ckpt", mixed), vlm=VLM)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    name = "model.vlm_with_expert.vlm.model.text_model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(model.text.layers[0].self_attn.q_proj.weight, mixed[name].float())
    assert not model.training


def test_save_pretrained_round_trip(tmp_path, tiny, io):
    saved = tmp_path / "saved"
    tiny.save_pretrained(saved)
    expected_files = {"config.json", "model.safetensors", "policy_preprocessor.json", "policy_postprocessor.json"}
    assert expected_files | {"vlm"} <= set(os.listdir(saved))
    assert load_file(saved / "model.safetensors").keys() == load_file(os.path.join(CKPT, "model.safetensors")).keys()
    assert json.load(open(saved / "config.json")) == json.load(open(os.path.join(CKPT, "config.json")))
    reloaded = SmolVLAPolicy.from_pretrained(saved)  # the VLM description from saved/vlm/
    chunk = reloaded.predict_chunk(policy_observation(io), noise=io["sample_noise"][:1])
    torch.testing.assert_close(chunk, io["policy_expected_chunk"], atol=TOL, rtol=TOL)


def test_what_a_checkpoint_was_trained_on_lives_beside_config_json(tmp_path, tiny):
    assert tiny.trained_on == {}  # lerobot's checkpoints have no such file
    assert "trained_on.json" not in os.listdir(CKPT)
    facts = {"fps": 10, "norm_mode": "degrees", "tasks": ["reach the red target"]}
    tiny.trained_on = dict(facts)
    try:
        tiny.save_pretrained(tmp_path / "saved")
    finally:
        tiny.trained_on = {}
    assert json.load(open(tmp_path / "saved" / "config.json")) == json.load(open(os.path.join(CKPT, "config.json")))
    assert SmolVLAPolicy.from_pretrained(tmp_path / "saved").trained_on == facts


def test_old_format_stats_buffers_with_dataset_prefix(tmp_path, io):
    stats = load_file(STATS_FILE)
    tensors = load_file(os.path.join(CKPT, "model.safetensors"))
    for stat in ("mean", "std"):
        tensors[f"normalize_inputs.so100-red_buffer_observation_state.{stat}"] = stats[f"observation.state.{stat}"]
        tensors[f"normalize_targets.so100-red_buffer_action.{stat}"] = stats[f"action.{stat}"].clone()
        tensors[f"unnormalize_outputs.so100-red_buffer_action.{stat}"] = stats[f"action.{stat}"].clone()
        tensors[f"normalize_inputs.so100-red_buffer_observation_images_top.{stat}"] = torch.full((3, 1, 1), torch.inf)
    model = SmolVLAPolicy.from_pretrained(copy_checkpoint(tmp_path / "old", tensors, processors=False), vlm=VLM)
    assert sorted(model.stats) == ["action", "observation.state"]
    chunk = model.predict_chunk(policy_observation(io), noise=io["sample_noise"][:1])
    torch.testing.assert_close(chunk, io["policy_expected_chunk"], atol=TOL, rtol=TOL)


def test_missing_stats_are_an_error_until_set(tmp_path, io, capsys):
    tensors = load_file(os.path.join(CKPT, "model.safetensors"))
    tensors["normalize_inputs.buffer_observation_state.mean"] = torch.full((6,), torch.inf)  # an unset buffer
    model = SmolVLAPolicy.from_pretrained(copy_checkpoint(tmp_path / "none", tensors, processors=False), vlm=VLM)
    assert "no normalization stats found" in capsys.readouterr().out
    with pytest.raises(ValueError, match="set_normalization"):
        model.predict_chunk(policy_observation(io))
    stats = load_file(STATS_FILE)
    model.set_normalization({f: {s: stats[f"{f}.{s}"] for s in ("mean", "std")} for f in ("observation.state", "action")})
    chunk = model.predict_chunk(policy_observation(io), noise=io["sample_noise"][:1])
    torch.testing.assert_close(chunk, io["policy_expected_chunk"], atol=TOL, rtol=TOL)


def test_bad_checkpoints_get_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint directory not found"):
        SmolVLAPolicy.from_pretrained(tmp_path / "nowhere", vlm=VLM)
    config = json.load(open(os.path.join(CKPT, "config.json")))
    with pytest.raises(ValueError, match="'act' policy checkpoint"):
        SmolVLAPolicy.from_pretrained(copy_checkpoint(tmp_path / "act", config={**config, "type": "act"}), vlm=VLM)
    os.remove(copy_checkpoint(tmp_path / "noweights") / "model.safetensors")
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        SmolVLAPolicy.from_pretrained(tmp_path / "noweights", vlm=VLM)
    with pytest.raises(ValueError, match="wrong shape: model.state_proj.weight"):  # made for another state width
        SmolVLAPolicy.from_pretrained(copy_checkpoint(tmp_path / "wide", config={**config, "max_state_dim": 16}), vlm=VLM)
    os.makedirs(tmp_path / "novlm")
    with pytest.raises(FileNotFoundError, match="VLM config.json not found"):
        SmolVLAPolicy.from_pretrained(CKPT, vlm=tmp_path / "novlm")


def test_bad_observations_get_clear_errors(tiny, io):
    obs = policy_observation(io)
    with pytest.raises(ValueError, match=r"none of the policy's cameras \[.*\] \(it has \['observation.images.side'\]\)"):
        tiny.predict_chunk({**{k: v for k, v in obs.items() if "images" not in k}, "observation.images.side": 0})
    with pytest.raises(ValueError, match=r"must be in \[0, 1\]"):
        tiny.predict_chunk({**obs, "observation.images.top": obs["observation.images.top"] * 255})
    with pytest.raises(ValueError, match="must have shape"):
        tiny.predict_chunk({**obs, "observation.state": torch.zeros(7)})


def test_from_vlm_takes_the_vlm_weights_and_a_fresh_expert(tmp_path, io):
    # a SmolVLM2 in Hugging Face format (its names, all 6 text layers) made of the tiny checkpoint's VLM
    tensors = load_file(os.path.join(CKPT, "model.safetensors"))
    prefix = "model.vlm_with_expert.vlm."
    hf = {k[len(prefix) :]: t for k, t in tensors.items() if k.startswith(prefix)}
    for name in [k for k in hf if "text_model.layers.3." in k]:
        for extra in (4, 5):  # the layers a policy with num_vlm_layers=4 drops
            hf[name.replace(".layers.3.", f".layers.{extra}.")] = torch.randn_like(hf[name])
    shutil.copytree(VLM, tmp_path / "vlm")
    save_file(hf, tmp_path / "vlm" / "model.safetensors")
    config = SmolVLAConfig.from_json_dict(json.load(open(os.path.join(CKPT, "config.json"))))
    model = SmolVLAPolicy.from_vlm(tmp_path / "vlm", config)
    assert len(model.text.layers) == 4
    for name, t in model.state_dict().items():
        same = torch.equal(t, tensors[checkpoint_name(name, LEROBOT)])
        assert same == name.startswith(("vision.", "connector.", "text.", "lm_head.")), name  # the rest is new
    chunk = model.sample_actions(*tensor_inputs(io), noise=io["sample_noise"])
    assert chunk.shape == (2, 50, 8) and torch.isfinite(chunk).all()
    del hf["model.connector.modality_projection.proj.weight"]
    save_file(hf, tmp_path / "vlm" / "model.safetensors")
    with pytest.raises(ValueError, match="1 missing: model.connector.modality_projection.proj.weight"):
        SmolVLAPolicy.from_vlm(tmp_path / "vlm", config)


# --- flow matching on its own -------------------------------------------------------------------------


def test_flow_time_distribution_and_straight_path():
    torch.manual_seed(0)
    tau = sample_time(200_000)
    assert tau.min() >= 0.001 and tau.max() <= 1.0
    # Beta(1.5, 1) has mean 0.6 and P(x < 0.5) = 0.5^1.5; mapped by x·0.999 + 0.001
    assert abs(tau.mean().item() - (0.6 * 0.999 + 0.001)) < 0.003
    assert abs((tau < 0.5 * 0.999 + 0.001).float().mean().item() - 0.5**1.5) < 0.003
    actions, noise = torch.randn(2, 5, 3), torch.randn(2, 5, 3)
    x_t, u_t = noisy_actions_and_target(actions, noise, torch.tensor([0.0, 1.0]))
    assert torch.equal(x_t[0], actions[0]) and torch.equal(x_t[1], noise[1]) and torch.equal(u_t, noise - actions)


def test_euler_follows_a_constant_velocity_from_noise_to_actions():
    actions, noise = torch.randn(2, 5, 3), torch.randn(2, 5, 3)
    seen = []

    def velocity(x, tau):
        seen.append(tau[0].item())
        return noise - actions  # the straight path's velocity: one exact Euler step would do

    torch.testing.assert_close(euler_sample(velocity, noise, num_steps=10), actions)
    torch.testing.assert_close(torch.tensor(seen), torch.linspace(1.0, 0.1, 10))  # τ = 1, 0.9, …, 0.1


def test_stats_that_do_not_fit_are_reported_not_used(tmp_path, capsys):
    tensors = load_file(os.path.join(CKPT, "model.safetensors"))
    tensors["normalize_inputs.buffer_observation_state.mean"] = torch.zeros(6)
    tensors["normalize_inputs.buffer_observation_state.std"] = torch.ones(6)
    tensors["unnormalize_outputs.buffer_action.mean"] = torch.zeros(14)  # another robot's action size
    tensors["normalize_inputs.buffer_observation_velocity.mean"] = torch.zeros(6)  # a feature it does not have
    model = SmolVLAPolicy.from_pretrained(copy_checkpoint(tmp_path / "odd", tensors, processors=False), vlm=VLM)
    out = capsys.readouterr().out
    assert "action mean (not 6 values)" in out and "observation_velocity (not a feature of this policy)" in out
    assert sorted(model.stats) == ["observation.state"]


def test_block_attention_mask():
    # tokens: image, image, word, padding word, state, action 1, action 2
    pad = torch.tensor([[1, 1, 1, 0, 1, 1, 1]], dtype=torch.bool)
    blocks = torch.tensor([[0, 0, 0, 0, 1, 1, 1]])
    expected = torch.tensor(
        [
            [1, 1, 1, 0, 0, 0, 0],  # image: the images+words block only
            [1, 1, 1, 0, 0, 0, 0],
            [1, 1, 1, 0, 0, 0, 0],  # word
            [0, 0, 0, 0, 0, 0, 0],  # padding sees nothing and is seen by no one
            [1, 1, 1, 0, 1, 0, 0],  # state: its own block and the earlier one
            [1, 1, 1, 0, 1, 1, 0],  # actions: causal
            [1, 1, 1, 0, 1, 1, 1],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(block_attention_mask(pad, blocks)[0], expected)


def test_min_max_normalization_maps_the_range_to_minus_one_one_and_back(tiny):
    model = copy.deepcopy(tiny)
    model.config.normalization_mapping = {**model.config.normalization_mapping, "STATE": "MIN_MAX"}
    lo, hi = torch.tensor([0.0, -10, 5, 1, 2, 3]), torch.tensor([1.0, 10, 5, 2, 4, 6])  # dim 2: max = min
    model.set_normalization({"observation.state": {"min": lo, "max": hi}})
    x = torch.stack([lo, hi, (lo + hi) / 2])
    normalized = model.normalize("observation.state", "STATE", x)
    expected = torch.tensor([-1.0, 1, 0])[:, None].expand(3, 6).clone()
    expected[:, 2] = -1  # a constant dimension: (x - min) / 1e-8 = 0 -> -1
    torch.testing.assert_close(normalized, expected)
    torch.testing.assert_close(model.unnormalize("observation.state", "STATE", normalized), x)


# ----------------------------------------------------------------------------------------------------
# Fewer cameras than the policy configures
# A policy run on fewer cameras than it configures, as the reference (lerobot 0.4.4) runs it.
#
# smolvla_base configures three cameras (camera1..3) and no empty slots, while most classroom arms have two.
# The reference then runs on the cameras present: their tokens, in config order, and nothing for the unfilled
# slot. The expected outputs in testdata/fewer_cameras/ were computed by lerobot 0.4.4 (testdata/README.md):
# - the tiny checkpoint sampled with one of its two cameras (top);
# - a full-size smolvla_base-architecture model (450M parameters, weights regenerated here from a seed, so
#   only the inputs and outputs are stored) sampled with camera1 and camera2 of its three cameras.
# ----------------------------------------------------------------------------------------------------

FIXTURES = os.path.join(HERE, "testdata", "fewer_cameras")
BASE_SEED = 12


def base_weights(seed=BASE_SEED):
    """Seeded random weights for every tensor of smolvla_base (names and shapes from smolvla_base_keys.tsv),
    scaled so that activations stay O(1) through all the layers: norms ~1, matrices std 0.02, biases small.
    The reference's fixture was computed from exactly these tensors (same generator, same order)."""
    rows = open(os.path.join(HERE, "testdata", "smolvla_base_keys.tsv")).read().splitlines()[1:]
    generator = torch.Generator().manual_seed(seed)
    weights = {}
    for row in rows:
        name, shape = row.split("\t")
        shape = [int(n) for n in shape.strip("[]").split(",")]
        values = torch.randn(shape, generator=generator)
        is_norm = "norm" in name and name.endswith("weight") and len(shape) == 1
        weights[name] = values.mul_(0.05).add_(1.0) if is_norm else values.mul_(0.02)
    return weights


def base_inputs(seed=BASE_SEED):
    """One observation at the tensor level: two camera frames (3, 96, 128) in [0, 1], 12 word ids, a state
    and the starting noise (normalized units, padded to 32 dims)."""
    generator = torch.Generator().manual_seed(seed + 1)
    return {
        "image0": torch.rand(1, 3, 96, 128, generator=generator),
        "image1": torch.rand(1, 3, 96, 128, generator=generator),
        "lang_tokens": torch.randint(0, 49280, (1, 12), generator=generator),
        "lang_masks": torch.ones(1, 12, dtype=torch.bool),
        "state": torch.randn(1, 32, generator=generator),
        "sample_noise": torch.randn(1, 50, 32, generator=generator),
    }


def ones(n):
    return [torch.ones(1, dtype=torch.bool)] * n


def test_tiny_checkpoint_on_one_of_its_two_cameras_matches_the_reference(tiny, io):
    expected = load_file(os.path.join(FIXTURES, "tiny_one_camera.safetensors"))["expected_sampled"]
    batch = io["state"].shape[0]
    masks = [torch.ones(batch, dtype=torch.bool)]
    chunk = tiny.sample_actions([io["image0"]], masks, io["lang_tokens"], io["lang_masks"], io["state"],
                                noise=io["sample_noise"])
    torch.testing.assert_close(chunk, expected, atol=1e-5, rtol=0)
    assert (expected - io["expected_sampled"]).abs().max() > 1e-2  # the missing camera does change the chunk


def test_full_size_base_architecture_on_two_of_three_cameras_matches_the_reference():
    expected = load_file(os.path.join(FIXTURES, "base_two_cameras.safetensors"))
    inputs = base_inputs()
    for name in inputs:  # the stored inputs are the ones regenerated here
        assert torch.equal(inputs[name], expected[name]), name
    with torch.device("meta"):
        model = SmolVLA(SmolVLAConfig(), SMOLVLM2_500M_VIDEO_INSTRUCT)
    assert load_policy_tensors(model, base_weights()) == {}
    assert all(checkpoint_name(k, LEROBOT) for k in model.state_dict())
    model.eval()
    assert model.config.camera_keys == [f"observation.images.camera{i}" for i in (1, 2, 3)]
    with torch.no_grad():
        chunk = model.sample_actions([inputs["image0"], inputs["image1"]], ones(2), inputs["lang_tokens"],
                                     inputs["lang_masks"], inputs["state"], noise=inputs["sample_noise"])
    torch.testing.assert_close(chunk, expected["expected_sampled"], atol=1e-4, rtol=0)


def test_a_policy_says_once_which_camera_slots_are_unfilled(tiny, io, capsys):
    policy._UNFILLED_SAID.clear()
    observation = {"observation.state": io["policy_state_raw"], "observation.images.top": io["image0"][0],
                   "task": "pick"}
    for _ in range(2):
        chunk = tiny.predict_chunk(observation, noise=io["sample_noise"][:1])
    assert chunk.shape == (1, 50, 6)
    assert capsys.readouterr().err.count("camera slot(s) observation.images.wrist unfilled") == 1
    with pytest.raises(ValueError, match="none of the policy's cameras"):
        tiny.predict_chunk({**{k: v for k, v in observation.items() if "images" not in k},
                            "observation.images.camera1": io["image0"][0]})  # a name the policy doesn't read
    with pytest.raises(ValueError, match="reads 2"):  # more frames than cameras is still a mistake
        tiny.sample_actions([io["image0"]] * 3, [torch.ones(2, dtype=torch.bool)] * 3, io["lang_tokens"],
                            io["lang_masks"], io["state"])


def test_infer_async_on_the_virtual_arm_with_two_of_three_cameras(tmp_path, capsys):
    """A checkpoint configured like smolvla_base (camera1..3, no empty slot) starts on an arm with two."""
    model = SmolVLAPolicy.from_pretrained(os.path.join(TINY, "checkpoint"), vlm=os.path.join(TINY, "vlm"))
    features = model.config.input_features
    frame = features.pop("observation.images.top")
    features.pop("observation.images.wrist")
    features.update({f"observation.images.camera{i}": dict(frame) for i in (1, 2, 3)})
    model.save_pretrained(tmp_path / "ckpt")
    policy._UNFILLED_SAID.clear()
    metrics = ia.main(["--port", "sim", "--policy", str(tmp_path / "ckpt"), "--vlm", os.path.join(TINY, "vlm"),
                       "--cameras", "camera1=sim,camera2=sim", "--duration", "1", "--task", "reach"])
    assert metrics.ticks == 30 and metrics.chunks_received >= 1 and metrics.inference_failures == 0
    assert capsys.readouterr().err.count("camera slot(s) observation.images.camera3 unfilled") == 1
    assert np.isfinite(metrics.queue_sizes).all()
