"""Reading and writing Hugging Face checkpoint files with numpy.

Weights come from safetensors files; a directory with only PyTorch ``pytorch_model.bin``
files is read with ``torch.load(..., weights_only=True)``, which unpickles tensors and plain
containers only and refuses anything else, so nothing in a checkpoint is ever executed. torch
is imported only then. Errors name the file they are about.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

SAFETENSORS_NAME = "model.safetensors"
SAFETENSORS_INDEX_NAME = "model.safetensors.index.json"
PYTORCH_NAME = "pytorch_model.bin"
PYTORCH_INDEX_NAME = "pytorch_model.bin.index.json"


def read_safetensors(path: str | Path) -> dict[str, np.ndarray]:
    """Reads every tensor of a ``.safetensors`` file.

    Args:
        path: The file.

    Returns:
        Tensor name -> numpy array (bf16 tensors come back as ``ml_dtypes.bfloat16``).

    Raises:
        FileNotFoundError: The file does not exist.
        ValueError: The file is not a readable safetensors file.
    """
    from safetensors.numpy import load_file  # local: keeps `import sft_jax` light

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"safetensors file not found: {path}")
    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises its own SafetensorError / OSError types
        raise ValueError(f"cannot read safetensors file {path}: {e}") from e


def _torch_to_numpy(tensor: Any) -> np.ndarray:
    import torch

    tensor = tensor.detach().cpu()
    if tensor.dtype == torch.bfloat16:  # numpy has no bfloat16: reinterpret the bits
        import ml_dtypes

        return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return tensor.numpy()


def _refusal_reason(error: Exception) -> str:
    """The useful part of a torch.load error: what the weights-only unpickler refused."""
    text = str(error)
    marker = "WeightsUnpickler error:"
    if marker in text:  # drop torch's advice to retry unsafely or to allowlist the global
        text = text.split(marker, 1)[1].split("Check the documentation", 1)[0]
        text = text.split(" Please use ", 1)[0]
    return " ".join(text.split()) or type(error).__name__


def read_torch_state_dict(path: str | Path) -> dict[str, np.ndarray]:
    """Reads a PyTorch state dict (``pytorch_model.bin``) without executing anything in it.

    ``torch.load(path, weights_only=True, map_location="cpu")`` rebuilds only tensors and plain
    containers; a pickle that would import or call anything else is refused.

    Args:
        path: The file.

    Returns:
        Tensor name -> numpy array (bf16 tensors come back as ``ml_dtypes.bfloat16``).

    Raises:
        FileNotFoundError: The file does not exist.
        ValueError: The file is refused by the weights-only unpickler, is not a torch file, or
            does not hold a flat name -> tensor mapping.
    """
    import torch  # local: only directories without safetensors need it

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"PyTorch checkpoint not found: {path}")
    try:
        state = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as e:  # UnpicklingError (refused), RuntimeError / EOFError (corrupt)
        raise ValueError(
            f"refusing to load {path}: not a plain tensor state dict that loads with "
            f"weights_only=True ({_refusal_reason(e)}); convert it to safetensors with a "
            "trusted tool"
        ) from e
    if not isinstance(state, dict):
        raise ValueError(f"{path} holds a {type(state).__name__}, expected a state dict")
    bad = sorted(str(k) for k, v in state.items() if not torch.is_tensor(v))
    if bad:
        raise ValueError(f"{path}: entries that are not tensors: {bad[:10]}")
    return {str(k): _torch_to_numpy(v) for k, v in state.items()}


def _read_sharded(index: Path, read_shard: Any) -> dict[str, np.ndarray]:
    """Reads every shard an index names; each tensor it lists must be in its shard."""
    weight_map = read_json(index).get("weight_map")
    if not isinstance(weight_map, dict):
        raise ValueError(f"{index} has no 'weight_map'")
    tensors: dict[str, np.ndarray] = {}
    for shard in sorted(set(weight_map.values())):
        tensors.update(read_shard(index.parent / shard))
    absent = sorted(f"{k} ({v})" for k, v in weight_map.items() if k not in tensors)
    if absent:
        raise ValueError(f"{index} lists tensors that its shards do not hold: {absent[:10]}")
    return tensors


def read_model_tensors(model_dir: str | Path) -> tuple[dict[str, np.ndarray], Path]:
    """Reads a directory's weights, preferring safetensors.

    In order: ``model.safetensors``, ``model.safetensors.index.json`` (sharded), then PyTorch
    ``pytorch_model.bin`` or ``pytorch_model.bin.index.json``, read with
    ``read_torch_state_dict`` (weights only, nothing executed).

    Args:
        model_dir: A Hugging Face model directory.

    Returns:
        (tensors, the file that was read: the single file or the index).

    Raises:
        FileNotFoundError: None of these files is in the directory (its files are listed).
        ValueError: A file cannot be read, or is refused (named).
    """
    model_dir = Path(model_dir)
    candidates = (
        (SAFETENSORS_NAME, SAFETENSORS_INDEX_NAME, read_safetensors),
        (PYTORCH_NAME, PYTORCH_INDEX_NAME, read_torch_state_dict),
    )
    for single_name, index_name, read in candidates:
        single, index = model_dir / single_name, model_dir / index_name
        if single.is_file():
            return read(single), single
        if index.is_file():
            return _read_sharded(index, read), index
    found = sorted(p.name for p in model_dir.iterdir()) if model_dir.is_dir() else []
    raise FileNotFoundError(
        f"no {SAFETENSORS_NAME}, {SAFETENSORS_INDEX_NAME}, {PYTORCH_NAME} or "
        f"{PYTORCH_INDEX_NAME} in {model_dir} (found: {found})"
    )


def write_safetensors(tensors: Mapping[str, Any], path: str | Path) -> None:
    """Writes arrays (numpy or jax) to a ``.safetensors`` file, creating parent directories.

    The header carries ``{"format": "pt"}``, which ``transformers`` expects.

    Args:
        tensors: Name -> array.
        path: Destination file.
    """
    from safetensors.numpy import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # np.require keeps 0-d arrays 0-d (np.ascontiguousarray makes them [1]; transformers then
    # rejects e.g. a BatchNorm's num_batches_tracked as mis-shaped).
    arrays = {k: np.require(np.asarray(v), requirements="C") for k, v in tensors.items()}
    try:
        save_file(arrays, str(path), metadata={"format": "pt"})
    except Exception as e:
        raise ValueError(f"cannot write safetensors file {path}: {e}") from e


def read_json(path: str | Path) -> dict[str, Any]:
    """Reads a JSON object from a file.

    Raises:
        FileNotFoundError: The file does not exist.
        ValueError: The file is not valid JSON or not an object.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"JSON file not found: {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"invalid JSON in {path}: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path} holds a JSON {type(data).__name__}, expected an object")
    return data


def write_json(data: Mapping[str, Any], path: str | Path) -> None:
    """Writes a JSON object (indented, sorted keys, trailing newline), creating parents."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
