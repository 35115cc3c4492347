"""A policy run on fewer cameras than it configures, as the reference (lerobot 0.4.4) runs it.

smolvla_base configures three cameras (camera1..3) and no empty slots, while most classroom arms have two.
The reference then runs on the cameras present: their tokens, in config order, and nothing for the unfilled
slot. The expected outputs in testdata/fewer_cameras/ were computed by lerobot 0.4.4 (testdata/README.md):
- the tiny checkpoint sampled with one of its two cameras (top);
- a full-size smolvla_base-architecture model (450M parameters, weights regenerated here from a seed, so
  only the inputs and outputs are stored) sampled with camera1 and camera2 of its three cameras.
"""

import os

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import infer_async as ia
import policy
from policy import LEROBOT, SmolVLAPolicy, checkpoint_name, load_policy_tensors
from smolvla import SmolVLA, SmolVLAConfig
from vlm import SMOLVLM2_500M_VIDEO_INSTRUCT

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURES = os.path.join(HERE, "testdata", "fewer_cameras")
TINY = os.path.join(HERE, "testdata", "smolvla_tiny")
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
