"""SmolVLA as a lerobot policy: robot units in and out, and the checkpoint on disk (SmolVLA paper §4).

The model (smolvla.py) works in *normalized units*: the state and the actions of the training data,
each dimension shifted and scaled by the dataset's statistics (MEAN_STD: (x − mean) / (std + 1e-8), a
standard score), and tokenized task strings. A robot works in *robot units*: joint angles in degrees (or
−100..100), a gripper 0..100, a sentence. The policy level turns one into the other, exactly as lerobot's
pre- and post-processors do, so that a checkpoint trained by lerobot drives an arm here:

    observation (robot units) ─► normalize state, tokenize "task\n", frames in [0, 1]
                              ─► SmolVLA.sample_actions ─► unnormalize ─► chunk (robot units)

`predict_chunk` is that path for one observation; `training_loss` the same for a batch of dataset
samples (with the loss masked past the end of each episode).

`SmolVLAPolicy` is the model (smolvla.py) with that level added. The rest of the file is lerobot's
checkpoint format, so that `SmolVLAPolicy.from_pretrained("lerobot/smolvla_base")`
loads the official weights and `save_pretrained` writes what lerobot loads: config.json, model.safetensors
(our parameter names differ from lerobot's only by a prefix per part; loading is strict by name and
shape), the normalization statistics (two on-disk formats in the wild), the pre/post-processor JSON, and
vlm/ (the VLM's config and tokenizer), and trained_on.json: what the policy was trained on, the defaults
and checks of the command line that drives it (infer_async.py's `settle_run_options`).
"""

import fnmatch
import json
import os
import re
import shutil
import sys

import torch
from safetensors.torch import save_file
from torch import nn

from plumbing import DamagedFile, read_json, read_safetensors, require_keys, resolve_dir
from smolvla import ACTION, IMAGE_PREFIX, STATE, SmolVLA
from vlm import VLM_DESCRIPTION_FILES, load_vlm_description, read_safetensors_dir

NORM_EPS = 1e-8  # lerobot's normalizer: (x - mean) / (std + 1e-8)
# what to do with a checkpoint file that is cut short or damaged (the error names the file)
CHECKPOINT_ADVICE = "re-download the checkpoint (or copy it again)"


# ----------------------------------------------------------------------------------------------------
# Robot units in and out.

_UNFILLED_SAID = set()  # the unfilled camera slots already reported (said once per run, not every chunk)


def present_cameras(config, observation: dict) -> list[str]:
    """The configured cameras found in the observation, in config order. As in lerobot, the policy runs on
    the cameras it gets (at least one); the slots left unfilled are named once, on stderr."""
    present = [camera for camera in config.camera_keys if camera in observation]
    missing = tuple(camera for camera in config.camera_keys if camera not in observation)
    if not present:
        observed_cameras = [key for key in observation if key.startswith(IMAGE_PREFIX)]
        raise ValueError(
            f"the observation has none of the policy's cameras {config.camera_keys} (it has "
            f"{observed_cameras}). Rename your cameras to the policy's names."
        )
    if missing and missing not in _UNFILLED_SAID:
        _UNFILLED_SAID.add(missing)
        print(f"note: camera slot(s) {', '.join(missing)} unfilled: the policy runs on {', '.join(present)} "
              "(as lerobot does)", file=sys.stderr)
    return present


class SmolVLAPolicy(SmolVLA):
    """SmolVLA (smolvla.py, normalized units) as lerobot's policy: robot units in and out, and checkpoints.

    What it adds to the model: the normalization statistics (`stats`), the tokenizer's preprocessing, and
    what it was trained on (`trained_on`, from trained_on.json); `predict_chunk` and `training_loss` in
    robot units; `from_pretrained`, `from_vlm` and `save_pretrained` in lerobot's checkpoint format.
    """

    def __init__(self, config, vlm_config: dict, tokenizer=None):
        super().__init__(config, vlm_config, tokenizer)
        self.stats = {}  # normalization statistics of state and actions (set_normalization)
        self.vlm_dir = None  # where the VLM description came from (copied into saved checkpoints' vlm/)
        self.trained_on = {}  # what it was trained on (fps, norm mode, tasks, RTC): TRAINED_ON_FILE

    # --- robot units in and out ------------------------------------------------------------------------

    def set_normalization(self, stats: dict):
        """Use these statistics (e.g. a LeRobot dataset's meta/stats.json) to normalize the state and
        actions. stats: {"observation.state": {"mean": …, "std": …, "min": …, "max": …}, "action": {…}, …}."""
        for feature, dim in ((STATE, self.config.state_dim), (ACTION, self.config.action_dim)):
            if feature not in stats:
                continue
            self.stats[feature] = {}
            for name, value in stats[feature].items():
                if name not in ("mean", "std", "min", "max"):
                    continue
                value = torch.as_tensor(value, dtype=torch.float32).flatten()
                if value.shape != (dim,):
                    raise ValueError(f"{feature} {name} has shape {tuple(value.shape)}, "
                                     f"the policy's has {dim} dims")
                self.stats[feature][name] = value

    def _norm_stats(self, feature: str, feature_type: str, device) -> tuple[str, dict]:
        """The feature's normalization mode and its statistics on `device` (MIN_MAX: with the span
        max − min, NORM_EPS where max = min)."""
        mode = self.config.normalization_mapping.get(feature_type, "IDENTITY")
        needed = {"IDENTITY": (), "MEAN_STD": ("mean", "std"), "MIN_MAX": ("min", "max")}.get(mode)
        if needed is None:
            raise ValueError(f"normalization mode {mode} is not supported "
                             "(IDENTITY, MEAN_STD, MIN_MAX are)")
        have = self.stats.get(feature, {})
        if any(name not in have for name in needed):
            raise ValueError(
                f"no {'/'.join(needed)} statistics for '{feature}' ({mode} normalization): "
                "the policy cannot map robot units to its own. "
                "Call policy.set_normalization(dataset.stats) with the stats of the dataset "
                f"it was trained on (found: {sorted(have) or 'none'})"
            )
        stats = {name: have[name].to(device) for name in needed}
        if mode == "MIN_MAX":
            # max − min, or NORM_EPS where the two are equal (a dimension that never moved)
            no_span = torch.full_like(stats["max"], NORM_EPS)
            stats["span"] = torch.where(stats["max"] == stats["min"], no_span, stats["max"] - stats["min"])
        return mode, stats

    def normalize(self, feature: str, feature_type: str, x: torch.Tensor) -> torch.Tensor:
        """Robot units -> normalized units: MEAN_STD (x − mean) / (std + ε); MIN_MAX [min, max] ->
        [−1, 1]."""
        mode, stats = self._norm_stats(feature, feature_type, x.device)
        if mode == "MEAN_STD":
            return (x - stats["mean"]) / (stats["std"] + NORM_EPS)
        if mode == "MIN_MAX":
            return 2 * (x - stats["min"]) / stats["span"] - 1
        return x

    def unnormalize(self, feature: str, feature_type: str, x: torch.Tensor) -> torch.Tensor:
        """Normalized units -> robot units (the inverse of normalize)."""
        mode, stats = self._norm_stats(feature, feature_type, x.device)
        if mode == "MEAN_STD":
            return x * stats["std"] + stats["mean"]
        if mode == "MIN_MAX":
            return (x + 1) / 2 * stats["span"] + stats["min"]
        return x

    def tokenize(self, tasks) -> tuple[torch.Tensor, torch.Tensor]:
        """Task string(s) -> tokens (B, L) int64 and mask (B, L) bool, as lerobot's preprocessor does:
        a newline appended, truncated to tokenizer_max_length, right-padded ("longest" or "max_length")."""
        if self.tokenizer is None:
            raise ValueError("this policy has no tokenizer: "
                             "load it with from_pretrained/from_vlm or pass one")
        tasks = [tasks] if isinstance(tasks, str) else list(tasks)
        if not all(isinstance(task, str) for task in tasks):
            raise ValueError(f"tasks must be strings, got {tasks!r}")
        tasks = [task if task.endswith("\n") else task + "\n" for task in tasks]
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

    @torch.no_grad()
    def predict_chunk(self, observation: dict, noise: torch.Tensor | None = None,
                      **rtc_options) -> torch.Tensor:
        """One action chunk for one raw observation, in robot units: (1, chunk_size, action_dim).

        observation: {"observation.state": (state_dim,) robot units, "observation.images.<cam>": (3, H, W)
        uint8 pixels or float in [0, 1] for the policy's cameras (config.camera_keys), "task": str}.
        noise: optional (1, chunk_size, max_action_dim) starting noise (for reproducible chunks).
        rtc_options: Real-Time Chunking's keywords of SmolVLA.sample_actions (leftover in normalized units,
        inference_delay, ...).
        """
        self.eval()
        config = self.config
        device = self.state_proj.weight.device
        if "task" not in observation or STATE not in observation:
            raise ValueError(f"the observation needs '{STATE}' and 'task' (got keys {sorted(observation)})")
        state = torch.as_tensor(observation[STATE], dtype=torch.float32, device=device)
        if state.shape != (config.state_dim,):
            raise ValueError(f"'{STATE}' must have shape ({config.state_dim},), got {tuple(state.shape)}")
        images = []
        for key in present_cameras(config, observation):
            img = torch.as_tensor(observation[key], device=device)
            if img.ndim != 3:
                raise ValueError(f"'{key}' must be one frame (3, H, W), uint8 or float in [0, 1], "
                                 f"got {tuple(img.shape)}")
            if img.dtype == torch.uint8:  # uint8 stays uint8: prepare_images divides it by 255
                images.append(img[None])
            else:
                images.append(img[None].float())
        img_masks = [torch.ones(1, dtype=torch.bool, device=device) for _ in images]
        tokens, token_masks = self.tokenize([observation["task"]])
        state = self.normalize(STATE, "STATE", state[None])  # (1, state_dim)
        actions = self.sample_actions(images, img_masks, tokens, token_masks, state, noise=noise,
                                      **rtc_options)
        return self.unnormalize(ACTION, "ACTION", actions[:, :, : config.action_dim])

    def training_loss(self, batch: dict, noise=None, time=None) -> torch.Tensor:
        """Scalar training loss on a collated batch of dataset samples in robot units (data.py):
        normalizes state and actions, tokenizes the tasks, and averages the flow-matching error over the
        chunk steps that are inside the episode (not `action_is_pad`) and the real action dims."""
        device = self.state_proj.weight.device
        state = self.normalize(STATE, "STATE", batch[STATE].to(device).float())  # (B, state_dim)
        actions = self.normalize(ACTION, "ACTION", batch[ACTION].to(device).float())  # (B, chunk, action_dim)
        # uint8 or float, as read
        images = [batch[camera].to(device) for camera in present_cameras(self.config, batch)]
        img_masks = [torch.ones(state.shape[0], dtype=torch.bool, device=device) for _ in images]
        tokens, token_masks = self.tokenize(batch["task"])
        rtc_delay = batch.get("rtc_delay")  # training-time RTC (train.py --rtc-max-delay): prefixes left out
        if "rtc_offset" in batch:  # ... shifted by flow.prefix_offsets (train.py --rtc-prefix-offset)
            actions = actions + batch["rtc_offset"].to(device)
        losses = self.compute_loss(images, img_masks, tokens, token_masks, state, actions, noise, time,
                                   rtc_delay)
        losses = losses[:, :, : self.config.action_dim]  # (B, chunk, action_dim)
        valid = torch.ones(losses.shape[:2], dtype=torch.bool, device=device)
        if "action_is_pad" in batch:
            valid = ~batch["action_is_pad"].to(device).bool()  # (B, chunk)
        if rtc_delay is not None:
            # the given prefix (its first rtc_delay[b] steps) is not the policy's to predict
            step = torch.arange(valid.shape[1], device=device)[None]  # (1, chunk)
            valid = valid & (step >= rtc_delay.to(device)[:, None])
        return (losses * valid[..., None]).sum() / (valid.sum() * losses.shape[-1]).clamp(min=1)

    # --- checkpoints: lerobot's format (the constants and helpers below the class) ------------------------

    @classmethod
    def from_pretrained(cls, checkpoint: str, vlm: str | None = None):
        """Load a lerobot SmolVLA checkpoint (a local directory or a Hub id such as "lerobot/smolvla_base").

        vlm: where the VLM's description (config.json + tokenizer) is; default `<checkpoint>/vlm/` if present,
        else the checkpoint's `vlm_model_name` on the Hub. Weights are loaded strictly by name and shape
        into a float32 model (bf16 tensors are upcast); the model is returned in eval mode.
        """
        ckpt_dir = resolve_dir(checkpoint, "checkpoint", ["*.json", "*.safetensors", "*.md"])
        config_path = os.path.join(ckpt_dir, "config.json")
        raw_config = read_json(config_path, "checkpoint config", advice=CHECKPOINT_ADVICE)
        require_keys(raw_config, ["input_features", "output_features"], config_path, CHECKPOINT_ADVICE)
        try:
            config = cls.config_class.from_json_dict(raw_config)
        except (TypeError, ValueError) as error:  # a field of the wrong type, another policy, ...
            raise DamagedFile(config_path, f"is not a usable SmolVLA config ({error})") from None
        weights_path = os.path.join(ckpt_dir, "model.safetensors")
        if not os.path.isfile(weights_path):
            raise FileNotFoundError(f"no model.safetensors in checkpoint directory {ckpt_dir} "
                                    f"({weights_path} is missing): {CHECKPOINT_ADVICE}")
        if vlm is None:
            local_vlm = os.path.join(ckpt_dir, "vlm")
            vlm = local_vlm if os.path.isdir(local_vlm) else config.vlm_model_name
        hint = "Pass vlm=<a directory with the VLM's config.json and tokenizer files>."
        vlm_dir = resolve_dir(vlm, "VLM", VLM_DESCRIPTION_FILES, hint=hint)
        vlm_config, tokenizer = load_vlm_description(vlm_dir)
        with torch.device("meta"):  # no memory, no random init: every tensor comes from the checkpoint
            model = cls(config, vlm_config, tokenizer)
        model.vlm_dir = vlm_dir
        tensors = read_safetensors(weights_path, "checkpoint weights", CHECKPOINT_ADVICE)
        dtypes = sorted({str(t.dtype).replace("torch.", "") for t in tensors.values()})
        try:
            buffer_stats = load_policy_tensors(model, tensors)
        except ValueError as error:  # a tensor missing, left over or of the wrong shape: all named, one line
            raise DamagedFile(weights_path, f"is not the checkpoint its config.json describes: {error}",
                              CHECKPOINT_ADVICE) from None
        print(f"smolvla: {len(tensors)} tensors ({'/'.join(dtypes)} -> float32) from {weights_path}; "
              f"VLM from {vlm}")
        stats, source = read_processor_stats(ckpt_dir)
        if not stats:
            stats, source = read_buffer_stats(buffer_stats, config)
        stats, ignored = usable_stats(stats, config)
        model.set_normalization(stats)
        if ignored:
            source += f"; ignored: {', '.join(ignored)}"
        model.report_normalization(source)
        trained_on = os.path.join(ckpt_dir, TRAINED_ON_FILE)
        model.trained_on = {}
        if os.path.isfile(trained_on):
            model.trained_on = read_json(trained_on, TRAINED_ON_FILE, advice=CHECKPOINT_ADVICE)
        return model.eval()

    @classmethod
    def from_vlm(cls, vlm: str, config):
        """A fresh policy for training from scratch: SmolVLM2's pretrained vision tower, connector and first
        N text layers (Hugging Face format: model.vision_model.*, model.connector.*, model.text_model.*,
        lm_head.*) and a newly initialized action expert and projections."""
        vlm_dir = resolve_dir(vlm, "VLM", VLM_DESCRIPTION_FILES + ["*.safetensors"])
        vlm_config, tokenizer = load_vlm_description(vlm_dir)
        model = cls(config, vlm_config, tokenizer)
        model.vlm_dir = vlm_dir
        kept = len(model.text.layers)

        def cut_layer(name: str) -> bool:  # text layers beyond the first N are dropped on purpose
            m = re.match(r"text\.layers\.(\d+)\.", name)
            return m is not None and int(m.group(1)) >= kept

        load_weights(model, read_safetensors_dir(vlm_dir), HF_VLM, skip=cut_layer)
        print(f"smolvla: VLM weights from {vlm_dir} ({kept} text layers kept); "
              "expert and projections initialized")
        return model

    def save_pretrained(self, directory: str):
        """Write a checkpoint in lerobot's format (config.json, model.safetensors, the pre/post-processor
        JSON with their normalization stats) plus vlm/ (the VLM's config.json and tokenizer), so that it
        loads here without the Hub and in lerobot."""
        os.makedirs(directory, exist_ok=True)
        cfg = self.config.to_json_dict()
        with open(os.path.join(directory, "config.json"), "w") as f:
            json.dump(cfg, f, indent=4)
        if self.trained_on:
            with open(os.path.join(directory, TRAINED_ON_FILE), "w") as f:
                json.dump(self.trained_on, f, indent=4)
        # every tensor under lerobot's name for it
        weights = {}
        for name, tensor in self.state_dict().items():
            weights[checkpoint_name(name, LEROBOT)] = tensor.detach().contiguous().cpu()
        save_file(weights, os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
        # the normalization stats as lerobot's normalizer steps store them:
        # {"<feature>.<mean|std|...>": tensor}
        flat_stats = {}
        for feature, feature_stats in self.stats.items():
            for stat_name, tensor in feature_stats.items():
                flat_stats[f"{feature}.{stat_name}"] = tensor.contiguous()
        # (processor, its steps, the step that holds the stats, the features that step normalizes)
        all_features = cfg["input_features"] | cfg["output_features"]
        processors = [
            ("policy_preprocessor", preprocessor_steps(cfg), 5, all_features),
            ("policy_postprocessor", postprocessor_steps(cfg), 0, cfg["output_features"]),
        ]
        for name, steps, stats_step, features in processors:
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


# ----------------------------------------------------------------------------------------------------
# Checkpoints: lerobot's format.

# what a checkpoint was trained on (dataset fps, joint units, tasks, training-time RTC): lerobot's strict
# config parser rejects unknown config.json fields, so these live in a file of their own beside it
TRAINED_ON_FILE = "trained_on.json"

# Our parameter names differ from the checkpoints' only by these prefixes (the names inside each part
# follow Hugging Face's). Columns: ours, lerobot's SmolVLA checkpoint, Hugging Face SmolVLM2 weights.
LEROBOT = 1  # the column of lerobot's SmolVLA checkpoint names
HF_VLM = 2  # the column of Hugging Face's SmolVLM2 weight names
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
# old-format normalization buffers, e.g. normalize_inputs.so100-red_buffer_observation_state.mean
OLD_STATS_NAME = re.compile(
    r"^(normalize_inputs|normalize_targets|unnormalize_outputs)\.(?:(.+)_)?buffer_(.+)\.(mean|std|min|max)$"
)


def checkpoint_name(name: str, column: int) -> str | None:
    """Our parameter name -> its name in a lerobot checkpoint (column LEROBOT) or SmolVLM2's weights
    (HF_VLM)."""
    for row in NAME_PREFIXES:
        if name.startswith(row[0]):
            return None if row[column] is None else row[column] + name[len(row[0]) :]
    return None


def our_name(name: str, column: int) -> str | None:
    """A checkpoint tensor's name -> ours (None if it belongs to no part we know)."""
    name = ".".join(part for part in name.split(".") if part != "_orig_mod")  # saved under torch.compile
    for row in NAME_PREFIXES:
        if row[column] is not None and name.startswith(row[column]):
            return row[0] + name[len(row[column]) :]
    return None


def _skip_nothing(name: str) -> bool:
    """load_weights' default skip: every tensor of the checkpoint is wanted."""
    return False


def load_weights(model: nn.Module, tensors: dict, column: int, skip=_skip_nothing, assign: bool = False):
    """Copy named tensors into the model, strictly: every parameter the checkpoint should hold must be there
    with the right shape, and every tensor must have a place. All problems are listed in one error.

    column: LEROBOT (a whole policy: every parameter is expected) or HF_VLM (only the VLM's parts).
    skip(our_name): tensors deliberately left out (the VLM's text layers beyond the first N).
    """
    # our name -> its shape, for every tensor the checkpoint should hold
    expected = {}
    for key, value in model.state_dict().items():
        if checkpoint_name(key, column) is not None:
            expected[key] = tuple(value.shape)
    found = {}  # our name -> the checkpoint's tensor, where it fits
    seen = set()  # our names the checkpoint holds, fitting or not
    unexpected = []  # checkpoint names with no place in the model
    misshaped = []  # "name: checkpoint shape, model shape"
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
                listed = ", ".join(names[:20])  # the first 20, then an ellipsis
                if len(names) > 20:
                    listed += " …"
                lines.append(f"  {len(names)} {title}: {listed}")
        raise ValueError("\n".join(lines))
    model.load_state_dict(found, strict=False, assign=assign)


def load_policy_tensors(model: nn.Module, tensors: dict) -> dict:
    """Load a lerobot checkpoint's tensors into the model as float32 (the published weights mix bfloat16
    and float32); return the old-format normalization buffers found among them."""
    buffers = {k: t for k, t in tensors.items() if OLD_STATS_NAME.match(k)}
    load_weights(model, {k: t.float() for k, t in tensors.items() if k not in buffers}, LEROBOT, assign=True)
    return buffers


def read_processor_stats(ckpt_dir: str) -> tuple[dict, str]:
    """New-format stats: the (un)normalizer steps of policy_pre/postprocessor.json name a safetensors
    file of flat `<feature>.<stat>` tensors. Returns ({feature: {stat: tensor}}, where they came from)."""
    stats = {}  # {feature: {stat: tensor}}
    sources = []  # the stats files read
    for name in ("policy_preprocessor.json", "policy_postprocessor.json"):
        path = os.path.join(ckpt_dir, name)
        if not os.path.isfile(path):
            continue
        for step in read_json(path, name, advice=CHECKPOINT_ADVICE).get("steps", []):
            if "normalizer" not in step.get("registry_name", "") or "state_file" not in step:
                continue
            state_path = os.path.join(ckpt_dir, step["state_file"])
            if not os.path.isfile(state_path):
                raise FileNotFoundError(f"{name} names the stats file {step['state_file']}, which is missing")
            for key, value in read_safetensors(state_path, "normalization stats", CHECKPOINT_ADVICE).items():
                feature, stat = key.rsplit(".", 1)
                stats.setdefault(feature, {}).setdefault(stat, value)
            sources.append(step["state_file"])
    if not sources:
        return stats, "no policy_pre/postprocessor stats files"
    return stats, " and ".join(sources)


def read_buffer_stats(buffers: dict, config) -> tuple[dict, str]:
    """Old-format stats: buffers inside model.safetensors such as
    normalize_inputs.buffer_observation_state.mean, possibly with a dataset prefix
    (normalize_inputs.so100-red_buffer_…). Buffers left at inf were never set."""
    # a feature's name as the buffer names spell it (dots as underscores) -> the feature
    features = {}
    for feature in list(config.input_features) + list(config.output_features):
        features[feature.replace(".", "_")] = feature
    stats = {}
    for key, value in buffers.items():
        _, _, feature, stat = OLD_STATS_NAME.match(key).groups()
        if torch.isfinite(value).all():
            stats.setdefault(features.get(feature, feature), {}).setdefault(stat, value)
    if not buffers:
        return stats, "no stats buffers in model.safetensors"
    return stats, "buffers in model.safetensors"


def usable_stats(stats: dict, config) -> tuple[dict, list[str]]:
    """The state/action statistics that fit the config, and a note for each one that does not (statistics
    of another feature name or another robot's size are reported, not used)."""
    dims = {STATE: config.state_dim, ACTION: config.action_dim}
    usable = {}  # {feature: {stat: tensor}} that fit
    ignored = []  # a note for each statistic that does not
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
    tokenizer = {
        "max_length": cfg["tokenizer_max_length"],
        "task_key": "task",
        "padding_side": "right",
        "padding": cfg["pad_language_to"],
        "truncation": True,
        "tokenizer_name": cfg["vlm_model_name"],
    }
    normalizer = {"eps": NORM_EPS, "norm_map": cfg["normalization_mapping"]}
    device_config = {"device": cfg["device"] or "cpu", "float_dtype": None}
    return [
        {"registry_name": "rename_observations_processor", "config": {"rename_map": {}}},
        {"registry_name": "to_batch_processor", "config": {}},
        {"registry_name": "smolvla_new_line_processor", "config": {}},
        {"registry_name": "tokenizer_processor", "config": tokenizer},
        {"registry_name": "device_processor", "config": device_config},
        {"registry_name": "normalizer_processor", "config": normalizer},
    ]


def postprocessor_steps(cfg: dict) -> list:
    """lerobot's SmolVLA output pipeline, as its policy_postprocessor.json describes it."""
    return [
        {"registry_name": "unnormalizer_processor",
         "config": {"eps": NORM_EPS, "norm_map": cfg["normalization_mapping"]}},
        {"registry_name": "device_processor", "config": {"device": "cpu", "float_dtype": None}},
    ]
