"""The one validated run configuration.

Every knob of a run lives in ``[tool.flwr.app.config]`` of ``pyproject.toml`` (kebab-case keys), can be
overridden with ``flwr run . --run-config "k=v"`` or the options of ``facefl simulate``, and is turned into
a frozen :class:`RunConfig` here, in one place, by :meth:`RunConfig.from_mapping`. Server and sites read the
same object; nothing else parses configuration.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, fields
from typing import Any, Mapping

TASKS = ("embedding", "vae", "both")
STRATEGIES = ("fedavg", "fedprox", "fedadam")
MODELS = ("auto", "compact", "inception", "scatternet", "dlib-resnet")
TRAINABLE = ("auto", "all", "last-stage", "projection")
DLIB_CHIP_SIZE = 150  # dlib's face ResNet reads 150x150 dlib face chips
LOSSES = ("arcface", "cosface", "triplet")
PARTITIONS = ("iid", "dirichlet")
OPTIMIZERS = ("auto", "sgd", "adamw")
DEFAULT_LRS = {"sgd": 0.1, "adamw": 2e-3}
# The measured recipe for dlib's pretrained face ResNet (`facefl bench train`, README "Face models"): only the
# projection trains, gently (its learning rate 1e-4), the sites' new margin heads learn at 0.5, batch 256 (the noise
# on DP-SGD's averaged gradient shrinks as 1/batch). model=auto, trainable=auto, lr=0, backbone-lr=0 and batch-size=0
# resolve to it for real faces.
PRETRAINED_RECIPE = {"trainable": "projection", "lr": 0.5, "backbone_lr": 1e-4, "batch_size": 256}
LR_SCHEDULES = ("cosine", "constant")
ACCOUNTANTS = ("prv", "rdp")
RECON_LOSSES = ("l1", "l2")
AGGREGATORS = ("mean", "median", "trimmed-mean")
TRACKERS = ("none", "mlflow")


class ConfigError(ValueError):
    """A run configuration value is missing, of the wrong type or out of range."""


@dataclass(frozen=True)
class RunConfig:
    """Everything that defines a federated run.

    Field names are the snake_case forms of the kebab-case run-config keys (``num-rounds`` ->
    ``num_rounds``). Defaults here equal those in ``pyproject.toml``.
    """

    # What to train
    task: str = "embedding"  # embedding | vae | both
    data: str = ""  # identity-folder dataset (LFW, VGGFace2, CASIA layout); "" = synthetic smoke-test set
    num_rounds: int = 3  # federated rounds
    # Federation
    strategy: str = "fedavg"  # fedavg | fedprox | fedadam
    fraction_train: float = 1.0  # share of the connected sites asked to train in a round
    min_sites: int = 2  # a round needs at least this many sites
    proximal_mu: float = 0.01  # FedProx
    server_lr: float = 0.01  # FedAdam
    round_timeout: float = 3600.0  # seconds to wait for the sites' replies in a round
    quorum_timeout: float = 600.0  # seconds a round waits for min-sites connected sites before the run ends
    aggregator: str = "mean"  # mean (the strategy's weighted mean) | median | trimmed-mean (robust, Flower's)
    trim_fraction: float = 0.2  # trimmed-mean: fraction cut at each end, per coordinate
    max_update_norm: float = 0.0  # reject a site's update whose L2 distance to the global model exceeds this (0 = off)
    secure_aggregation: bool = False  # SecAgg+: the server learns only the weighted sum of the sites' updates
    secagg_threshold: float = 0.67  # share of the sites whose key shares are needed to unmask (the rest may drop out)
    secagg_clip_range: float = 1.0  # each coordinate of a site's update is clipped to +-this before quantisation
    secagg_max_examples: int = 10000  # weight cap: a site with more examples is weighted as if it had this many
    secagg_timeout: float = 120.0  # seconds each key-exchange / unmasking stage waits (training: round-timeout)
    # Local training
    local_epochs: int = 1  # passes over a site's faces per round
    batch_size: int = 0  # expected (logical) batch (Poisson-sampled under DP); 0 = the model's recipe (see batch_for)
    image_size: int = 64  # face crops are resized to this many pixels a side
    optimizer: str = "auto"  # embedding model: auto (dlib-resnet: sgd, from scratch: adamw) | sgd | adamw
    lr: float = 0.0  # embedding model; 0 = the optimizer's default (SGD with momentum 0.9: 0.1; AdamW: 0.002)
    lr_schedule: str = "cosine"  # cosine (decays over the planned rounds, to about 0 at the last) | constant
    backbone_lr: float = 0.0  # learning rate of the embedding backbone; 0 = dlib-resnet: 1e-4, from scratch: lr
    vae_lr: float = 0.0  # VAE (Adam); 0 = 1e-3 without DP, 2e-3 under DP-SGD
    model: str = "auto"  # auto | compact | inception | scatternet (from scratch) | dlib-resnet (pretrained face ResNet)
    trainable: str = "auto"  # which part trains: auto (dlib-resnet: projection, else all) | all | last-stage | projection
    embedding_dim: int = 128  # length of a face embedding
    weights_path: str = ""  # optional local pretrained weights for the embedding model ...
    weights_sha256: str = ""  # ... checked against this hash (nothing is ever downloaded)
    loss: str = "arcface"  # arcface | cosface | triplet (triplet only without DP)
    margin: float = 0.3  # additive angular (ArcFace) or cosine (CosFace) margin
    scale: float = 30.0  # logit scale of the margin softmax
    augment: bool = True  # flips, small rotations and shifts, brightness and contrast
    latent_channels: int = 4  # VAE: channels of its latent map (image-size / 4 a side)
    vae_beta: float = 0.1  # weight of the VAE's KL term
    vae_recon: str = "l1"  # l1 | l2
    vae_adversarial: bool = False  # VAE-GAN with a site-private discriminator
    vae_perceptual: float = 0.0  # weight of an LPIPS-like term on dlib's pretrained face ResNet's features (0 = off)
    # Data and partitioning
    partition: str = "iid"  # iid | dirichlet (by identity)
    dirichlet_alpha: float = 0.5  # non-IID: smaller alpha, more unequal sites
    seed: int = 0  # partitions, initial weights and sampling
    val_fraction: float = 0.1  # share of each site's images kept for validation
    max_identities: int = 0  # 0 = all training identities
    heldout_fraction: float = 0.15  # share of identities held out for the server (non-LFW data)
    eval_pairs: int = 0  # 0 = all held-out pairs
    eval_faces: int = 256  # faces per held-out evaluation of the VAE
    mask_probability: float = 0.0  # share of sites' (and validation people's) faces given a synthetic mask (seeded)
    validation_people: int = 100  # training people held out for the server's validation (never a site's); 0 = none
    # Keep the previous global model when a round lowers the validation people's ROC AUC below the best so far
    # less this tolerance (logged as a rejected round); needs validation-people > 0. Test pairs never choose a model.
    reject_worse_rounds: bool = True
    reject_tolerance: float = 0.001
    # Differential privacy (per site, example-level)
    dp: bool = True  # DP-SGD (Opacus) at every site
    target_epsilon: float = 8.0  # each site's total budget, over all rounds
    target_delta: float = 0.0  # 0 = 1 / (10 N) for a site with N examples
    max_grad_norm: float = 1.0  # per-sample gradient clipping bound
    vae_max_grad_norm: float = 0.2  # the VAE's (its per-sample gradient norms are about 0.1-1.7, median 0.4)
    accountant: str = "prv"  # prv | rdp
    planned_rounds: int = 0  # rounds a site spreads its budget over; 0 = num-rounds
    # Where things go
    run_dir: str = ""  # "" = runs/<timestamp>
    state_dir: str = ""  # site state (privacy ledger, margin head); "" = <run-dir>/sites
    resume_from: str = ""  # a run directory to continue from its last completed round
    cache_dir: str = ""  # face cache; "" = $FACEFL_CACHE or ~/.cache/facefl
    # Run tracking
    tracking: str = "none"  # none | mlflow
    tracking_uri: str = ""  # "" = a local MLflow store in the run directory
    tracking_experiment: str = "facefl"  # MLflow experiment name
    # Canary audit (a simulated run audited in one training run, Steinke et al. 2023; server/privacy_audit/canaries.py)
    canary_gradients: int = 0  # white-box: gradient (Dirac) canaries per site, read off its per-round updates; 0 = none
    canary_inputs: int = 0  # black-box: input canaries per site (mislabelled synthetic faces), scored on the final model
    canary_norm: float = 1000.0  # a canary's raw gradient norm in max-grad-norms: an outlier (DP-SGD clips it to 1)
    canary_seed: int = 1  # seed of the canary plan (which canaries, where, included or not), apart from training's


    def __post_init__(self) -> None:
        self._resolve_auto()

        def choice(name: str, allowed: tuple[str, ...]) -> None:
            value = getattr(self, name)
            if value not in allowed:
                raise ConfigError(f"{_key(name)} must be one of {', '.join(allowed)}; got {value!r}.")

        def positive(name: str, *, allow_zero: bool = False) -> None:
            value = getattr(self, name)
            if value < 0 or (value == 0 and not allow_zero):
                bound = "zero or more" if allow_zero else "positive"
                raise ConfigError(f"{_key(name)} must be {bound}; got {value!r}.")

        choice("task", TASKS)
        choice("strategy", STRATEGIES)
        choice("model", MODELS)
        choice("trainable", TRAINABLE)
        choice("loss", LOSSES)
        choice("partition", PARTITIONS)
        choice("accountant", ACCOUNTANTS)
        choice("vae_recon", RECON_LOSSES)
        choice("aggregator", AGGREGATORS)
        choice("optimizer", OPTIMIZERS)
        choice("lr_schedule", LR_SCHEDULES)
        choice("tracking", TRACKERS)
        if self.tracking != "none" and not self.tracking_experiment.strip():
            raise ConfigError("tracking-experiment must name an MLflow experiment; got an empty name.")
        for name in ("num_rounds", "local_epochs", "embedding_dim", "latent_channels", "min_sites",
                     "scale", "max_grad_norm", "vae_max_grad_norm", "target_epsilon", "dirichlet_alpha",
                     "round_timeout", "server_lr", "quorum_timeout", "secagg_clip_range", "secagg_max_examples",
                     "secagg_timeout"):
            positive(name)
        for name in ("proximal_mu", "margin", "vae_beta", "vae_perceptual", "max_identities", "eval_pairs", "eval_faces",
                     "planned_rounds", "target_delta", "max_update_norm", "backbone_lr", "lr", "vae_lr",
                     "validation_people", "reject_tolerance", "batch_size", "canary_gradients", "canary_inputs"):
            positive(name, allow_zero=True)
        positive("canary_norm")
        if (self.canary_gradients or self.canary_inputs) and not self.trains_embedding:
            raise ConfigError(f"Canaries audit the face-embedding model; task={self.task} trains none (use task "
                              "embedding or both, or set canary-gradients=0 and canary-inputs=0).")
        if self.canary_gradients and self.secure_aggregation:
            raise ConfigError("canary-gradients needs the server to read each site's update (the white-box audit); "
                              "secure-aggregation=true hides them. Audit a run without secure aggregation.")
        if not 0.0 < self.fraction_train <= 1.0:
            raise ConfigError(f"fraction-train must be in (0, 1]; got {self.fraction_train!r}.")
        if not 0.0 <= self.val_fraction < 0.5:
            raise ConfigError(f"val-fraction must be in [0, 0.5); got {self.val_fraction!r}.")
        if not 0.0 <= self.mask_probability <= 1.0:
            raise ConfigError(f"mask-probability must be in [0, 1]; got {self.mask_probability!r}.")
        if not 0.0 < self.heldout_fraction < 0.5:
            raise ConfigError(f"heldout-fraction must be in (0, 0.5); got {self.heldout_fraction!r}.")
        if self.model == "dlib-resnet":
            self._check_dlib_resnet()
        elif self.trainable not in ("auto", "all"):
            raise ConfigError(f"trainable={self.trainable} applies to model=dlib-resnet (a pretrained backbone); "
                              f"model={self.model} trains from scratch, so all of it trains (trainable=all).")
        elif not 48 <= self.image_size <= 160 or self.image_size % 16:
            raise ConfigError(f"image-size must be a multiple of 16 between 48 and 160; got {self.image_size!r}.")
        if self.task in ("vae", "both") and self.image_size not in (64, 128):
            raise ConfigError(f"The VAE is built for image-size 64 or 128; got {self.image_size!r}.")
        if self.model == "inception" and self.image_size < 96:
            raise ConfigError(f"model=inception needs image-size of at least 96 (160 is its native size); got "
                              f"{self.image_size}.")
        if not 0.0 < self.trim_fraction < 0.5:
            raise ConfigError(f"trim-fraction must be in (0, 0.5); got {self.trim_fraction!r}.")
        if self.aggregator != "mean" and self.strategy == "fedadam":
            raise ConfigError(f"aggregator={self.aggregator} replaces FedAvg's weighted mean; it cannot be combined "
                              "with strategy=fedadam (use fedavg or fedprox).")
        if not 0.0 < self.secagg_threshold <= 1.0:
            raise ConfigError(f"secagg-threshold must be in (0, 1]; got {self.secagg_threshold!r}.")
        if self.secure_aggregation:
            clash = [f"aggregator={self.aggregator}"] if self.aggregator != "mean" else []
            clash += ["max-update-norm > 0"] if self.max_update_norm > 0 else []
            clash += ["strategy=fedadam"] if self.strategy == "fedadam" else []
            clash += [f"min-sites={self.min_sites}"] if self.min_sites < 2 else []
            if clash:
                raise ConfigError(
                    f"secure-aggregation=true cannot be combined with {' and '.join(clash)}: under SecAgg+ the server "
                    "sees only the sum of the sites' updates, so it cannot take a median, bound one site's update "
                    "or run FedAdam on it, and the sum of one site's update is that update. Use strategy fedavg or "
                    "fedprox with aggregator=mean, max-update-norm=0 and min-sites of 2 or more (3 or more lets a site "
                    "drop out), or turn secure aggregation off.")
        if self.target_delta >= 1.0:
            raise ConfigError(f"target-delta must be below 1 (and below 1/N for N examples); got {self.target_delta!r}.")
        if self.dp and self.loss == "triplet":
            raise ConfigError(
                "loss=triplet cannot be used with DP: online triplet mining couples the samples of a batch, so "
                "DP-SGD's per-sample clipping no longer bounds one person's influence and the epsilon would be "
                "void. Use loss=arcface or loss=cosface, or set dp=false for a non-private baseline."
            )
        if bool(self.weights_path) != bool(self.weights_sha256):
            raise ConfigError("weights-path and weights-sha256 go together: give both (the file is checked by hash).")

    def _resolve_auto(self) -> None:
        """``model=auto`` and ``batch-size=0`` become what ``facefl bench train`` measured best: dlib's pretrained
        face ResNet (:data:`PRETRAINED_RECIPE`) for a face-embedding run on real faces (``data`` set); the compact
        CNN for the synthetic smoke test (no ``data``) and for the VAE's runs (``task`` vae or both: they share
        aligned 64 px faces). A value given by name is kept."""
        if self.model == "auto":
            real = self.task == "embedding" and bool(self.data)
            object.__setattr__(self, "model", "dlib-resnet" if real else "compact")
        if self.batch_size == 0:
            object.__setattr__(self, "batch_size", batch_for(self.model, self.dp))

    def _check_dlib_resnet(self) -> None:
        """dlib's ResNet reads 150x150 dlib chips: the default image-size (64) becomes 150, any other is refused."""
        if self.image_size == RunConfig.image_size:
            object.__setattr__(self, "image_size", DLIB_CHIP_SIZE)
        if self.image_size != DLIB_CHIP_SIZE:
            raise ConfigError(f"model=dlib-resnet reads {DLIB_CHIP_SIZE}x{DLIB_CHIP_SIZE} dlib face chips; leave "
                              f"image-size at its default or set it to {DLIB_CHIP_SIZE} (got {self.image_size}).")
        if self.embedding_dim != 128:
            raise ConfigError(f"model=dlib-resnet gives dlib's 128-d descriptors; leave embedding-dim at 128 (got "
                              f"{self.embedding_dim}).")
        if self.task != "embedding":
            raise ConfigError("model=dlib-resnet is a face-embedding backbone for task=embedding; train the VAE "
                              f"(task={self.task}) in a run of its own with model=compact.")
        if self.loss == "triplet":
            raise ConfigError("model=dlib-resnet is fine-tuned with a margin softmax (loss=arcface or cosface).")

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any]) -> RunConfig:
        """Build from a run-config mapping (kebab-case or snake_case keys), checking types and names."""
        known = {f.name: f for f in fields(cls)}
        values: dict[str, Any] = {}
        for raw_key, raw_value in mapping.items():
            name = str(raw_key).replace("-", "_")
            if name not in known:
                close = [_key(k) for k in known if k.split("_")[0] == name.split("_")[0]]
                hint = f" Did you mean {', '.join(close)}?" if close else ""
                raise ConfigError(f"Unknown run-config key {raw_key!r}.{hint}")
            values[name] = _coerce(name, known[name].default, raw_value)
        return cls(**values)

    @classmethod
    def from_saved(cls, mapping: Mapping[str, Any]) -> RunConfig:
        """A run configuration saved by a run (``config.json``, a checkpoint): as :meth:`from_mapping`, except that a
        configuration written before the validation people existed (no ``validation-people`` key) keeps what its
        ``auto`` values meant then, so a resumed or audited old run sees its own sites' people and models: no
        validation people, and dlib's backbone with ``trainable=auto`` training its last stage at ``lr`` 0.1 (the
        backbone at the same rate)."""
        values = dict(mapping)
        if "validation-people" not in values and "validation_people" not in values:
            values["validation-people"] = 0
            if str(values.get("model", "")) == "dlib-resnet":
                if str(values.get("trainable", "auto")) == "auto":
                    values["trainable"] = "last-stage"
                lr = float(values.get("lr", 0.0) or 0.0) or (DEFAULT_LRS["sgd"] if str(values.get("optimizer", "auto"))
                                                              in ("auto", "sgd") else DEFAULT_LRS["adamw"])
                values["lr"] = lr
                if not float(values.get("backbone-lr", 0.0) or 0.0):
                    values["backbone-lr"] = lr
        return cls.from_mapping(values)

    def replace(self, **changes: Any) -> RunConfig:
        return dataclasses.replace(self, **changes)

    def to_mapping(self) -> dict[str, Any]:
        """Kebab-case mapping, suitable for ``--run-config`` and ``config.json``."""
        return {_key(f.name): getattr(self, f.name) for f in fields(self)}

    # ------------------------------------------------------------------ derived values
    @property
    def trains_embedding(self) -> bool:
        return self.task in ("embedding", "both")

    @property
    def trains_vae(self) -> bool:
        return self.task in ("vae", "both")

    @property
    def trainable_part(self) -> str:
        """The part of the embedding model that trains (and travels): ``trainable`` with ``auto`` resolved."""
        if self.trainable != "auto":
            return self.trainable
        return PRETRAINED_RECIPE["trainable"] if self.model == "dlib-resnet" else "all"

    @property
    def face_mode(self) -> str:
        """How faces are cut from photos (``common.data.datasets.load_faces``): dlib's own chips for dlib's
        ResNet; for the models trained from scratch and the VAE, the same 5-point alignment cut tighter and resized
        (``aligned``): on LFW View 1 a from-scratch model learned far more from aligned faces than from LFW's
        centre crops."""
        return "dlib" if self.model == "dlib-resnet" else "aligned"

    @property
    def vae_learning_rate(self) -> float:
        """``vae-lr`` with 0 resolved: Adam 2e-3 under DP-SGD, 1e-3 without (on 1,670 LFW faces, six epochs at 64 px:
        under DP 22.8 dB at 2e-3, 21.5 dB at 1e-3, diverging at 4e-3; without DP 1e-3 reached 25.5 dB)."""
        return self.vae_lr or (2e-3 if self.dp else 1e-3)

    @property
    def embedding_optimizer(self) -> str:
        """``optimizer`` with ``auto`` resolved: AdamW from scratch (on LFW View 1 it learned where SGD with
        momentum stalled: 0.85 against 0.74 after 12 epochs), SGD for fine-tuning dlib's pretrained backbone."""
        if self.optimizer != "auto":
            return self.optimizer
        return "sgd" if self.model == "dlib-resnet" else "adamw"

    @property
    def embedding_lr(self) -> float:
        """``lr`` with 0 resolved: the recipe's 0.5 for the margin heads of dlib's backbone fine-tuned with SGD, else
        the optimizer's default."""
        if self.lr:
            return self.lr
        if self.model == "dlib-resnet" and self.embedding_optimizer == "sgd":
            return PRETRAINED_RECIPE["lr"]
        return DEFAULT_LRS[self.embedding_optimizer]

    @property
    def backbone_learning_rate(self) -> float:
        """``backbone-lr`` with 0 resolved: 1e-4 for dlib's pretrained backbone, whatever part of it trains (at the
        heads' rate one DP round took View 1 from 0.989 to 0.756), ``lr`` for a model trained from scratch."""
        if self.backbone_lr:
            return self.backbone_lr
        return PRETRAINED_RECIPE["backbone_lr"] if self.model == "dlib-resnet" else self.embedding_lr

    @property
    def validates_rounds(self) -> bool:
        """Whether the server scores each aggregate of the face model on its validation people."""
        return self.validation_people > 0 and self.trains_embedding

    @property
    def guards_rounds(self) -> bool:
        """Whether the server also keeps the previous global model when an aggregate scores worse."""
        return self.reject_worse_rounds and self.validates_rounds

    def lr_factor(self, round_: int) -> float:
        """The learning rates' multiplier in federated round ``round_`` (1-based; a centralized epoch counts as a
        round): 1 throughout with the constant schedule; with the cosine one, ``(1 + cos(pi (r - 1) / R)) / 2``
        over the planned rounds ``R``, the last round's value afterwards."""
        if self.lr_schedule == "constant":
            return 1.0
        r = min(max(round_, 1), self.budget_rounds)
        return 0.5 * (1.0 + math.cos(math.pi * (r - 1) / self.budget_rounds))

    @property
    def budget_rounds(self) -> int:
        """Rounds a site spreads its privacy budget over."""
        return self.planned_rounds or self.num_rounds


def batch_for(model: str, dp: bool) -> int:
    """The measured batch size of ``model`` (``batch-size=0``): 256 for dlib's backbone (its recipe) and for the
    scattering network under DP (the noise on the averaged gradient shrinks as 1/batch), 128 for it without DP,
    32 for the compact and Inception CNNs (a site's small share of faces still gets several steps a round)."""
    if model == "dlib-resnet":
        return PRETRAINED_RECIPE["batch_size"]
    if model == "scatternet":
        return 256 if dp else 128
    return 32


def _key(name: str) -> str:
    return name.replace("_", "-")


def _coerce(name: str, default: Any, value: Any) -> Any:
    expected = type(default)
    if expected is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
    elif expected in (int, float) and not isinstance(value, bool):
        if isinstance(value, int) or (isinstance(value, float) and (expected is float or value.is_integer())):
            return expected(value)
        if isinstance(value, str):
            try:
                return expected(value)
            except ValueError:
                pass
    elif expected is str:
        return str(value)
    raise ConfigError(f"{_key(name)} must be a {expected.__name__}; got {value!r}.")
