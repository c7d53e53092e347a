"""Reading and writing Hugging Face checkpoint files with numpy only (no torch).

Errors name the file they are about.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

SAFETENSORS_NAME = "model.safetensors"
SAFETENSORS_INDEX_NAME = "model.safetensors.index.json"


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


def read_model_tensors(model_dir: str | Path) -> tuple[dict[str, np.ndarray], Path]:
    """Reads a directory's ``model.safetensors`` or its sharded ``model.safetensors.index.json``.

    Args:
        model_dir: A Hugging Face model directory.

    Returns:
        (tensors, the file that was read: the single file or the index).
    """
    model_dir = Path(model_dir)
    single, index = model_dir / SAFETENSORS_NAME, model_dir / SAFETENSORS_INDEX_NAME
    if single.is_file():
        return read_safetensors(single), single
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index} has no 'weight_map'")
        tensors: dict[str, np.ndarray] = {}
        for shard in sorted(set(weight_map.values())):
            tensors.update(read_safetensors(model_dir / shard))
        return tensors, index
    found = sorted(p.name for p in model_dir.iterdir()) if model_dir.is_dir() else []
    raise FileNotFoundError(
        f"no {SAFETENSORS_NAME} or {SAFETENSORS_INDEX_NAME} in {model_dir} (found: {found}); "
        "convert .bin/.pt checkpoints to safetensors first"
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
    arrays = {k: np.ascontiguousarray(np.asarray(v)) for k, v in tensors.items()}
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
