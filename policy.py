"""SmolVLA as a lerobot policy: the checkpoint on disk, and robot units in and out.

(Placeholder while the layout moves: for now this file holds the facts every other file shares.)
"""

import json
import os

# lerobot's names for what a policy reads and writes (a dataset's columns carry the same names)
STATE, ACTION, IMAGE_PREFIX = "observation.state", "action", "observation.images."


def resolve_dir(source, what, allow_patterns, repo_type="model", revision=None, hint=None):
    """A local directory as it is; otherwise a Hugging Face Hub id (`owner/name`), whose files matching
    `allow_patterns` are downloaded into the local cache (huggingface_hub shows the progress). `what`
    ("checkpoint", "VLM", "dataset") names it in the errors; `hint` says what to do instead."""
    source = os.fspath(source)
    if os.path.isdir(source):
        return source
    parts = source.split("/")
    is_hub_id = len(parts) == 2 and all(parts) and not source.startswith((".", "~")) and not os.path.exists(source)
    if not is_hub_id:
        raise FileNotFoundError(f"{what} directory not found: there is no {what} directory {source!r}, and it is "
                                "not a Hugging Face Hub id of the form owner/name")
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(source, repo_type=repo_type, revision=revision, allow_patterns=allow_patterns)
    except Exception as e:  # offline, unknown repo, no access: one message that says which and what to do
        reason = str(e).splitlines()[0] if str(e) else ""
        raise FileNotFoundError(
            f"{what} '{source}' is not a local directory and could not be fetched as a {what} from the Hugging "
            f"Face Hub ({type(e).__name__}: {reason}). {hint or f'Pass an existing {what} directory.'}"
        ) from None


def read_json(path, what):
    """The JSON file at `path`; `what` names it in the error when it is missing."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} not found: {path}")
    with open(path) as f:
        return json.load(f)


def parse_mapping(text, flag):
    """A command line's 'a=x,b=y' -> {"a": "x", "b": "y"} (camera renames, camera devices); `flag` names
    the option in the error."""
    mapping = {}
    for item in filter(None, (text or "").split(",")):
        key, sep, value = item.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise ValueError(f"{flag} expects name=value pairs separated by commas (e.g. top=camera1,wrist=camera2), "
                             f"got {item!r}")
        mapping[key.strip()] = value.strip()
    return mapping


def features_from_dataset(dataset):
    """lerobot's input/output feature dicts describing a dataset's state, cameras and actions (the
    config of a policy trained from scratch on it)."""
    sample = dataset[0]
    inputs = {STATE: {"type": "STATE", "shape": list(sample[STATE].shape)}}
    for key in dataset.camera_keys:
        inputs[key] = {"type": "VISUAL", "shape": list(sample[key].shape)}
    outputs = {ACTION: {"type": "ACTION", "shape": [sample[ACTION].shape[-1]]}}
    return inputs, outputs
