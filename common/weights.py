"""The one way model weights are read from disk: a local file whose SHA-256 is checked first.

Nothing here downloads. Users who want pretrained weights copy the file next to the project and
pass its path together with the hash they expect.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch

_CHUNK = 1 << 20  # 1 MiB


def default_cache_dir() -> Path:
    """facefl's cache (faces, converted weights, trained stylizers): ``$FACEFL_CACHE`` if set, else
    ``~/.cache/facefl``."""
    env = os.environ.get("FACEFL_CACHE", "").strip()
    return Path(env).expanduser() if env else Path.home() / ".cache" / "facefl"


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Return the lowercase hex SHA-256 of the file at ``path``, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_state_dict_checked(path: str | os.PathLike[str], sha256: str) -> dict[str, torch.Tensor]:
    """Load a state_dict from a local file after checking its SHA-256.

    Parameters
    ----------
    path : str or PathLike
        Local file written by ``torch.save``. It may hold a raw state_dict or a checkpoint dict
        with the state_dict under ``"state_dict"`` or ``"model"``.
    sha256 : str
        Expected hex SHA-256 of the file (case-insensitive).

    Returns
    -------
    dict[str, torch.Tensor]
        The tensors, on the CPU. ``torch.load`` runs with ``weights_only=True``, so the file cannot
        execute code.

    Raises
    ------
    FileNotFoundError
        If ``path`` is not a file.
    ValueError
        If the hash does not match, or the file does not hold a state_dict.
    """
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"Weights file not found: {file}.")
    expected = sha256.strip().lower()
    actual = sha256_file(file)
    if actual != expected:
        raise ValueError(
            f"Weights file {file} has SHA-256 {actual}, but {expected} was expected. "
            "Re-copy the file, or fix the expected hash if the file is the one you meant."
        )
    loaded = torch.load(file, map_location="cpu", weights_only=True)
    if isinstance(loaded, dict):
        for key in ("state_dict", "model"):
            if key in loaded and isinstance(loaded[key], dict):
                loaded = loaded[key]
                break
    if not isinstance(loaded, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in loaded.items()
    ):
        raise ValueError(
            f"Weights file {file} does not hold a state_dict (a mapping of names to tensors), "
            "nor one under the key 'state_dict' or 'model'."
        )
    return dict(loaded)
