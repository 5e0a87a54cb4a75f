"""The tuned config: the architecture and training hyperparameters a tuner found best.

Keys follow spotpython's tuned config (``l1``, ``epochs``, ``batch_size``, ``act_fn``,
``optimizer``, ``dropout_prob``, ``lr_mult``, ``patience``, ``batch_norm``,
``initialization``), so a cookbook user can hand theirs over unchanged; ``hidden_sizes``
optionally replaces the cookbook's width rule. Everything is validated before any
training starts: an unknown key or a bad value raises :class:`XAIError` naming the
key or value and the valid choices.

Example::

    cfg = TunedConfig.from_dict({"l1": 8, "act_fn": "LeakyReLU", "optimizer": "AdamW"})
    cfg.learning_rate  # 0.001 = lr_mult * AdamW's customary default
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from mlflow_xai.errors import XAIError

# Activation functions by name -> the torch.nn class name. The name, never the module,
# is what is stored: spotpython's own checkpoints pickle the activation module and no
# longer load with torch >= 2.6's weights_only default.
ACTIVATIONS: dict[str, str] = {
    "ReLU": "ReLU",
    "LeakyReLU": "LeakyReLU",
    "Tanh": "Tanh",
    "Sigmoid": "Sigmoid",
    "ELU": "ELU",
    "Swish": "SiLU",  # Swish with beta=1 is SiLU
    "SiLU": "SiLU",
    "GELU": "GELU",
    "SELU": "SELU",
    "Softplus": "Softplus",
    "ReLU6": "ReLU6",
}

# Optimizer name -> the customary default learning rate; the learning rate used is
# lr_mult * this value, as spotpython's optimizer_handler does. (SGD has no torch
# default; 0.01 is spotpython's.)
OPTIMIZER_DEFAULT_LR: dict[str, float] = {
    "Adadelta": 1.0,
    "Adagrad": 0.01,
    "Adam": 0.001,
    "AdamW": 0.001,
    "Adamax": 0.002,
    "NAdam": 0.002,
    "RAdam": 0.001,
    "RMSprop": 0.01,
    "SGD": 0.01,
}

INITIALIZATIONS: tuple[str, ...] = (
    "default",
    "xavier_uniform",
    "xavier_normal",
    "kaiming_uniform",
    "kaiming_normal",
)

# Guards against absurd sizes from an untrusted config (checked before any allocation):
# one hidden layer of at most 2**20 units, and at most 2e9 parameters in all (8 GB float32).
MAX_UNITS = 2**20
MAX_PARAMETERS = 2_000_000_000


@dataclass(frozen=True)
class TunedConfig:
    """A validated tuned config; the defaults are the built-in config for the diabetes data."""

    l1: int = 16  # width multiplier: hidden sizes are multiples of l1 * n_in (cookbook rule)
    epochs: int = 64  # upper bound; early stopping usually ends training sooner
    batch_size: int = 16
    act_fn: str = "ReLU"  # a name from ACTIVATIONS
    optimizer: str = "Adam"  # a name from OPTIMIZER_DEFAULT_LR
    dropout_prob: float = 0.01  # after every hidden activation; 0 disables dropout
    lr_mult: float = 1.0  # learning rate = lr_mult * the optimizer's default
    patience: int = 8  # epochs without val_loss improvement before early stopping
    batch_norm: bool = False  # BatchNorm1d between each hidden Linear and its activation
    initialization: str = "default"  # torch's default, or xavier_*/kaiming_* on Linear weights
    hidden_sizes: tuple[int, ...] | None = None  # explicit hidden widths; replaces the l1 rule

    def __post_init__(self) -> None:
        _check_int("l1", self.l1, 1)
        _check_int("epochs", self.epochs, 1)
        _check_int("batch_size", self.batch_size, 1)
        _check_int("patience", self.patience, 0)
        if self.act_fn not in ACTIVATIONS:
            raise XAIError(
                f"config act_fn={self.act_fn!r} is not supported; use one of {', '.join(ACTIVATIONS)}"
            )
        if self.optimizer not in OPTIMIZER_DEFAULT_LR:
            raise XAIError(
                f"config optimizer={self.optimizer!r} is not supported; "
                f"use one of {', '.join(OPTIMIZER_DEFAULT_LR)}"
            )
        if self.initialization not in INITIALIZATIONS:
            raise XAIError(
                f"config initialization={self.initialization!r} is not supported; "
                f"use one of {', '.join(INITIALIZATIONS)}"
            )
        if not _is_number(self.dropout_prob) or not 0.0 <= self.dropout_prob < 1.0:
            raise XAIError(
                f"config dropout_prob={self.dropout_prob!r} is invalid; use a number in [0, 1)"
            )
        if not _is_number(self.lr_mult) or not (0.0 < self.lr_mult < math.inf):
            raise XAIError(f"config lr_mult={self.lr_mult!r} is invalid; use a positive number")
        if not isinstance(self.batch_norm, bool):
            raise XAIError(f"config batch_norm={self.batch_norm!r} is invalid; use true or false")
        if self.hidden_sizes is not None:
            if not isinstance(self.hidden_sizes, tuple) or not self.hidden_sizes:
                raise XAIError(
                    "config hidden_sizes is invalid; use a non-empty list of positive integers"
                )
            for size in self.hidden_sizes:
                _check_int("hidden_sizes", size, 1)
                if size > MAX_UNITS:
                    raise XAIError(
                        f"config hidden_sizes has a layer of {size} units, over the limit of "
                        f"{MAX_UNITS}; use smaller layers"
                    )
        elif self.l1 > MAX_UNITS:
            raise XAIError(f"config l1={self.l1} is over the limit of {MAX_UNITS}; use a smaller l1")

    @property
    def learning_rate(self) -> float:
        """``lr_mult`` times the optimizer's customary default learning rate."""
        return self.lr_mult * OPTIMIZER_DEFAULT_LR[self.optimizer]

    def hidden_layer_sizes(self, n_in: int) -> tuple[int, ...]:
        """Hidden widths for ``n_in`` input features.

        The cookbook's NNLinearRegressor rule unless ``hidden_sizes`` is given::

            [2*l1*n, l1*n, 2*l1*n, l1*n, l1*n, ceil(l1/2)*n, ceil(l1/2)*n]

        Raises XAIError if a layer or the whole network is over the size limits, before
        anything is allocated.
        """
        if self.hidden_sizes is not None:
            sizes = self.hidden_sizes
        else:
            a, b, c = 2 * self.l1 * n_in, self.l1 * n_in, math.ceil(self.l1 / 2) * n_in
            sizes = (a, b, a, b, b, c, c)
        widest = max(sizes)
        if widest > MAX_UNITS:
            raise XAIError(
                f"config gives a hidden layer of {widest} units for {n_in} inputs, over the "
                f"limit of {MAX_UNITS}; use a smaller l1 or explicit hidden_sizes"
            )
        return sizes

    def parameter_count(self, n_in: int, n_out: int) -> int:
        """Number of parameters of the network this config builds (no allocation)."""
        widths = (n_in, *self.hidden_layer_sizes(n_in), n_out)
        count = sum(i * o + o for i, o in zip(widths[:-1], widths[1:], strict=False))
        if self.batch_norm:
            count += 2 * sum(widths[1:-1])
        return count

    def check_size(self, n_in: int, n_out: int) -> None:
        """Raise XAIError if the network would have more than MAX_PARAMETERS parameters."""
        count = self.parameter_count(n_in, n_out)
        if count > MAX_PARAMETERS:
            raise XAIError(
                f"config gives a network of {count:,} parameters, over the limit of "
                f"{MAX_PARAMETERS:,}; use a smaller l1 or hidden_sizes"
            )

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe dict that :meth:`from_dict` reads back to an equal config."""
        d = asdict(self)
        d["hidden_sizes"] = list(self.hidden_sizes) if self.hidden_sizes is not None else None
        return d

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> TunedConfig:
        """Validate a mapping (from JSON, YAML or a tuner) into a config.

        Names are matched forgivingly where a tuner writes them differently: an
        activation given as ``"ReLU()"`` or ``"relu"``, an initialization as
        ``"Default"``.
        """
        if not isinstance(raw, Mapping):
            raise XAIError("config must be a mapping of keys to values (a JSON object)")
        valid = [f.name for f in fields(cls)]
        values: dict[str, Any] = {}
        for key, value in raw.items():
            if key not in valid:
                raise XAIError(f"unknown config key {key!r}; valid keys: {', '.join(valid)}")
            values[key] = value
        if "act_fn" in values:
            values["act_fn"] = _canonical(values["act_fn"], ACTIVATIONS, "act_fn")
        if "optimizer" in values:
            values["optimizer"] = _canonical(values["optimizer"], OPTIMIZER_DEFAULT_LR, "optimizer")
        if "initialization" in values:
            values["initialization"] = _canonical(
                values["initialization"], INITIALIZATIONS, "initialization"
            )
        for key in ("dropout_prob", "lr_mult"):
            # JSON has one number type: accept an integer-valued 1 for 1.0.
            if isinstance(values.get(key), int) and not isinstance(values[key], bool):
                values[key] = float(values[key])
        hs = values.get("hidden_sizes")
        if hs is not None:
            if not isinstance(hs, (list, tuple)):
                raise XAIError(
                    "config hidden_sizes is invalid; use a non-empty list of positive integers"
                )
            values["hidden_sizes"] = tuple(hs)
        return cls(**values)

    @classmethod
    def from_file(cls, path: str | Path) -> TunedConfig:
        """Read a JSON (``.json``) or YAML (``.yaml``/``.yml``) config file."""
        p = Path(path)
        if not p.is_file():
            raise XAIError(f"config file {str(p)!r} does not exist; pass the path of a JSON or YAML file")
        text = p.read_text(encoding="utf-8")
        try:
            if p.suffix.lower() in (".yaml", ".yml"):
                import yaml

                raw = yaml.safe_load(text)
            else:
                raw = json.loads(text)
        except Exception as exc:  # noqa: BLE001 - any parse error is the user's file
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise XAIError(f"config file {str(p)!r} does not parse ({first}); fix its syntax") from exc
        return cls.from_dict(raw if raw is not None else {})

    @classmethod
    def from_params(cls, params: Mapping[str, str]) -> tuple[TunedConfig, tuple[str, ...]]:
        """The config in an MLflow run's params (all strings), and the keys filled from the defaults.

        Only the config's own keys are read; every other param (a tuner's bookkeeping,
        ``learning_rate``, the data set) is ignored. An empty value counts as missing.
        Values are parsed back from their string form: ``"16"``, ``"16.0"``, ``"0.01"``,
        ``"True"``, ``"[64, 32]"``.

        Example::

            cfg, filled = TunedConfig.from_params({"l1": "8", "act_fn": "ReLU()", "trial": "3"})
            cfg.l1, filled[:2]  # (8, ('epochs', 'batch_size'))
        """
        defaults = cls()
        values: dict[str, Any] = {}
        filled: list[str] = []
        for f in fields(cls):
            text = params.get(f.name)
            if text is None or str(text).strip() == "":
                filled.append(f.name)
                continue
            values[f.name] = _parse_param(f.name, str(text).strip(), getattr(defaults, f.name))
        return cls.from_dict(values), tuple(filled)


@dataclass(frozen=True)
class SplitSpec:
    """Which rows form the cookbook's test part and its validation fraction; validated on creation.

    The same spec always picks the same rows, which is how ``explain`` finds the data a
    model was trained on (the spec travels inside the checkpoint).
    """

    test_size: float = 0.4  # share of the rows in the test part (trained on, as in the cookbook)
    seed: int = 42
    val_fraction: float = 0.2  # share of the test part held out for early stopping

    def __post_init__(self) -> None:
        if not (isinstance(self.test_size, (int, float)) and 0.0 < self.test_size < 1.0):
            raise XAIError(f"test_size={self.test_size} is invalid; use a number in (0, 1)")
        if not (isinstance(self.val_fraction, (int, float)) and 0.0 < self.val_fraction < 1.0):
            raise XAIError(f"val_fraction={self.val_fraction} is invalid; use a number in (0, 1)")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise XAIError(f"seed={self.seed!r} is invalid; use a whole number")


@dataclass(frozen=True)
class TrainerOptions:
    """How Lightning runs the fit, validated once where it enters (the CLI or ``train_and_log``).

    The values go to ``lightning.Trainer`` as they are; ``quiet`` turns off its progress
    bar, its model summary and its info lines.
    """

    accelerator: str = "auto"  # auto, cpu, gpu, mps, ...
    devices: int | str = "auto"  # auto, or a count
    strategy: str = "auto"  # auto, ddp, ...
    num_nodes: int = 1  # machines of a multi-node DDP fit
    quiet: bool = False

    def __post_init__(self) -> None:
        devices = self.devices
        if isinstance(devices, str) and devices.strip().isdigit():
            object.__setattr__(self, "devices", int(devices))
        elif not (devices == "auto" or (isinstance(devices, int) and not isinstance(devices, bool))):
            raise XAIError(f"--devices {devices!r} is invalid; use auto or a count such as 2")
        if isinstance(self.devices, int) and self.devices < 1:
            raise XAIError(f"--devices {self.devices} is invalid; use auto or a count of 1 or more")
        if not isinstance(self.num_nodes, int) or isinstance(self.num_nodes, bool) or self.num_nodes < 1:
            raise XAIError(f"--num-nodes {self.num_nodes!r} is invalid; use 1 or more")
        for key in ("accelerator", "strategy"):
            if not isinstance(getattr(self, key), str) or not getattr(self, key).strip():
                raise XAIError(f"--{key} {getattr(self, key)!r} is invalid; use auto or a name Lightning knows")


def _parse_param(key: str, text: str, default: Any) -> Any:
    """A config value from its string form in MLflow params; validation is from_dict's job."""
    if key == "hidden_sizes":
        if text.lower() in ("none", "null"):
            return None
        try:
            return json.loads(text.replace("(", "[").replace(")", "]"))
        except ValueError:
            raise XAIError(f"param hidden_sizes={text!r} is not a list of integers; log it as e.g. [64, 32]") from None
    if isinstance(default, bool):
        lowered = text.lower()
        if lowered not in ("true", "false", "1", "0"):
            raise XAIError(f"param {key}={text!r} is not a boolean; use true or false")
        return lowered in ("true", "1")
    if isinstance(default, int):
        try:
            number = float(text)
        except ValueError:
            raise XAIError(f"param {key}={text!r} is not an integer") from None
        return int(number) if number.is_integer() else number  # a fraction is refused by validation
    if isinstance(default, float):
        try:
            return float(text)
        except ValueError:
            raise XAIError(f"param {key}={text!r} is not a number") from None
    return text


def load_config(spec: str | Path | None) -> TunedConfig:
    """The config named on the command line: a file path, or ``default``/empty for the built-in one."""
    if spec is None or str(spec).strip() in ("", "default"):
        return TunedConfig()
    return TunedConfig.from_file(spec)


def _canonical(value: Any, choices: Mapping[str, Any] | tuple[str, ...], key: str) -> Any:
    """Map a forgivingly written name (``relu``, ``ReLU()``, ``Default``) to its canonical form."""
    if not isinstance(value, str):
        raise XAIError(f"config {key}={value!r} is invalid; use one of {', '.join(choices)}")
    cleaned = value.strip()
    if cleaned.endswith("()"):
        cleaned = cleaned[:-2]
    lowered = cleaned.lower().replace("-", "_")
    for name in choices:
        if name.lower() == lowered:
            return name
    return value  # __post_init__ reports it with the valid choices


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _check_int(key: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise XAIError(f"config {key}={value!r} is invalid; use an integer >= {minimum}")
