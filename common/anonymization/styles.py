"""Named styles, where their paintings are, and where trained stylizers are kept.

A trained stylizer is two files: ``<stem>.pt`` (the state dict) and ``<stem>.json`` (architecture, style, training
settings, history, and the SHA-256 of the ``.pt``). Loading always checks that hash, so a truncated or swapped
weights file is refused instead of silently producing unstylized faces. Nothing is downloaded: the paintings are
read from a local folder and the weights are produced by ``facefl style train`` (or on first use of a name).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from common.atomic import atomic_torch_save, atomic_write_json
from common.weights import load_state_dict_checked, sha256_file

FORMAT_VERSION = 2


@dataclass(frozen=True)
class NamedStyle:
    name: str
    file: str  # relative to the styles folder
    title: str


# Public-domain paintings only (see ../shared/data/README.md): safe as a product's defaults.
NAMED_STYLES: dict[str, NamedStyle] = {s.name: s for s in (
    NamedStyle("starry-night", "neural-style/starry_night.jpg", "The Starry Night, Vincent van Gogh (1889)"),
    NamedStyle("scream", "neural-style/the_scream.jpg", "The Scream, Edvard Munch (1893)"),
    NamedStyle("shipwreck", "neural-style/shipwreck.jpg", "The Shipwreck, J. M. W. Turner (1805)"),
    NamedStyle("matisse", "neural-style/woman-with-hat-matisse.jpg", "Woman with a Hat, Henri Matisse (1905)"),
    NamedStyle("udnie", "pytorch-examples/udnie.jpg", "Udnie, Francis Picabia (1913)"),
)}
DEFAULT_STYLE = "shipwreck"  # the named style whose shipped stylizer anonymized best (README, Benchmarks)


class StyleError(ValueError):
    """A style or stylizer file cannot be used; the message says what to do."""


def default_styles_dir() -> Path:
    """``$FACEFL_STYLES_DIR``, else ``../shared/data/styles`` beside the project checkout."""
    env = os.environ.get("FACEFL_STYLES_DIR")
    if env:
        return Path(env).expanduser()
    return Path(__file__).resolve().parents[3] / "shared" / "data" / "styles"


def cache_root() -> Path:
    env = os.environ.get("FACEFL_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "facefl"


def resolve_style(style: str, styles_dir: str | os.PathLike | None = None) -> tuple[str, Path]:
    """A style name (see :data:`NAMED_STYLES`) or an image path -> ``(name, painting path)``."""
    if style in NAMED_STYLES:
        folder = Path(styles_dir).expanduser() if styles_dir else default_styles_dir()
        path = folder / NAMED_STYLES[style].file
        if not path.is_file():
            raise StyleError(f"The painting for style {style!r} is not at {path}; pass --styles-dir (or set "
                             "FACEFL_STYLES_DIR) to the folder that holds the style images, or give an image path.")
        return style, path
    path = Path(style).expanduser()
    if path.is_file():
        return path.stem.replace("_", "-"), path
    raise StyleError(f"Unknown style {style!r}: use one of {', '.join(NAMED_STYLES)} or the path of an image file.")


def stylizer_stem(style_path: Path, width: str, settings: dict) -> str:
    """Cache name for a (painting, width, training settings) combination."""
    key = json.dumps({"style": sha256_file(style_path), "width": width, "settings": settings,
                      "format": FORMAT_VERSION}, sort_keys=True)
    return f"{style_path.stem.replace('_', '-')}-{width}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def stylizer_cache_dir() -> Path:
    return cache_root() / "stylizers"


def save_stylizer(stem_path: str | os.PathLike, model: torch.nn.Module, meta: dict) -> Path:
    """Write ``<stem>.pt`` then ``<stem>.json`` (atomically; the JSON, written last, names the weights' hash)."""
    from common.anonymization.stylizer import stylenet_config

    stem = Path(stem_path)
    weights = stem.with_suffix(".pt")
    atomic_torch_save(weights, {k: v.detach().cpu() for k, v in model.state_dict().items()})
    info = {"format": FORMAT_VERSION, "architecture": stylenet_config(model), "sha256": sha256_file(weights),
            **meta}
    atomic_write_json(stem.with_suffix(".json"), info)
    return weights


def load_stylizer(path: str | os.PathLike, sha256: str | None = None) -> tuple[torch.nn.Module, dict]:
    """Load a stylizer from ``<stem>.pt`` (or its ``.json``), checking the weights' SHA-256.

    ``sha256`` overrides the hash recorded in the JSON (for weights received from elsewhere)."""
    from common.anonymization.stylizer import build_stylenet, load_stylenet_state

    p = Path(path).expanduser()
    meta_path, weights = p.with_suffix(".json"), p.with_suffix(".pt")
    if not meta_path.is_file():
        raise StyleError(f"Stylizer description {meta_path} is missing; a stylizer is a .pt file with the .json "
                         "that `facefl style train` writes beside it.")
    try:
        meta = json.loads(meta_path.read_text())
        arch = meta["architecture"]
        expected = sha256 or meta["sha256"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise StyleError(f"Stylizer description {meta_path} is unreadable ({exc}); retrain it with "
                         "`facefl style train`.") from exc
    try:
        state = load_state_dict_checked(weights, expected)
        model = load_stylenet_state(build_stylenet(arch), state)
    except (OSError, ValueError, RuntimeError, TypeError) as exc:
        raise StyleError(f"Stylizer {weights} cannot be loaded: {str(exc).splitlines()[0]}") from exc
    return model.eval(), meta


# Stylizers that ship with facefl (trained by this project; the command that made each is in its .json and in the
# README), so that the first `facefl anonymize` answers in seconds. The SHA-256 here, not the one in the .json
# beside the file, is what the weights are checked against when they load.
SHIPPED_DIR = Path(__file__).resolve().parent / "weights"
SHIPPED_STYLIZERS: dict[tuple[str, str], tuple[str, str]] = {
    ("shipwreck", "half"): ("shipwreck-half.pt", "ffe7eb5a16ead474fb09c9a962e2489e03bc92b6700e44abe5bc94dee1a1c30d"),
    ("starry-night", "half"): ("starry-night-half.pt", "f6b19bc46bd72d1465dccd16d38fca8d9ba196260648ed9b47e3d3e3e9959337"),
}


def shipped_stylizer(style: str, width: str = "half") -> tuple[Path, str] | None:
    """``(path, sha256)`` of the stylizer shipped for ``style`` at ``width``, or None when none ships."""
    entry = SHIPPED_STYLIZERS.get((style, width))
    return None if entry is None else (SHIPPED_DIR / entry[0], entry[1])


def load_shipped_stylizer(style: str, width: str = "half") -> tuple[torch.nn.Module, dict, Path]:
    """The shipped stylizer for ``style`` (checked against :data:`SHIPPED_STYLIZERS`' SHA-256): model, its
    description (``shipped`` set to True) and its path. Raises StyleError when none ships or it does not load."""
    found = shipped_stylizer(style, width)
    if found is None:
        raise StyleError(f"No stylizer ships for style {style!r} at width {width!r}; train one with "
                         "`facefl style train`.")
    path, sha = found
    if not path.is_file():
        raise StyleError(f"The shipped stylizer {path} is missing from this installation; reinstall facefl or "
                         "train one with `facefl style train`.")
    model, meta = load_stylizer(path, sha)
    return model, {**meta, "shipped": True}, path


def cached_stylizers() -> list[dict]:
    """Descriptions of the stylizers in the cache (newest first)."""
    folder = stylizer_cache_dir()
    out = []
    for meta_path in sorted(folder.glob("*.json"), key=lambda p: p.stat().st_mtime, reverse=True):
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, ValueError):
            continue
        out.append({"path": str(meta_path.with_suffix(".pt")), **meta})
    return out
