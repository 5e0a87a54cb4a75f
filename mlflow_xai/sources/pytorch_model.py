"""Any MLflow model of the ``pytorch`` flavor, loaded as an ``nn.Module`` whose layers hooks can see.

Two formats reach us (the ``data/`` folder of the model says which):

* **pt2** (``model.pt2``, what ``mlflow.pytorch.log_model`` writes by default in MLflow 3):
  a ``torch.export`` program. It loads without unpickling code: MLflow's own check that
  the archive holds no pickle runs first, then ``torch.export.load``. Its ``.module()``
  is one flat graph without submodules, so :func:`unflatten_program` rebuilds the user's
  module hierarchy with ``torch.export.unflatten``: every layer keeps its qualified name
  (``features.0``, ``encoder.fc1``, ``head``), and each module takes its original type
  again, so ``isinstance(m, nn.Conv2d)`` holds and hooks fire on it (user-defined classes
  only get their class name: nothing of the user's code is imported).
* **pickle** (``model.pth``, what ``mlflow.pytorch.autolog()`` writes around a Lightning
  fit): loading it runs whatever code the pickle names. It is refused unless the caller
  opts in (``allow_pickle``), and nothing is read from the file before that.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mlflow_xai.errors import XAIError

__all__ = ["PyTorchModel", "load_pytorch_model", "read_mlmodel", "unflatten_program", "PICKLE_OPT_IN"]

PT2_FILE = "model.pt2"
PICKLE_FILE = "model.pth"
#: What to pass to explain a pickled model: the CLI option (the MLproject parameter and the
#: evaluator config key are ``allow_pickle``).
PICKLE_OPT_IN = "--allow-pickle"


@dataclass
class PyTorchModel:
    """An MLflow pytorch model, loaded and ready for hooks."""

    model: nn.Module
    format: str  # "pt2" or "pickle"
    #: The batch size a pt2 program was exported for (an input example of one row fixes
    #: it); ``None`` when the batch dimension is dynamic.
    fixed_batch: int | None = None
    #: The input shape (without the batch) the program was exported for, when known.
    input_shape: tuple[int, ...] | None = None
    #: True when the program was exported with dropout or batch norm in training mode.
    training_mode: bool = False
    warnings: list[str] = field(default_factory=list)
    mlmodel: dict[str, Any] = field(default_factory=dict)


def read_mlmodel(model_dir: Path) -> dict[str, Any]:
    """The ``MLmodel`` file of a downloaded model, read as plain YAML (no object is built from it)."""
    import yaml

    path = model_dir / "MLmodel"
    if not path.is_file():
        raise XAIError(f"{model_dir.name} has no MLmodel file; point at an MLflow model (models:/... or runs:/.../PATH)")
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise XAIError(f"the MLmodel file of {model_dir.name} is not valid YAML ({type(exc).__name__})") from exc
    if not isinstance(doc, dict):
        raise XAIError(f"the MLmodel file of {model_dir.name} is not a mapping; it is not an MLflow model")
    return doc


def model_format(model_dir: Path, mlmodel: dict[str, Any], uri: str) -> str:
    """``pt2`` or ``pickle``: which file the pytorch flavor's data folder holds."""
    flavors = mlmodel.get("flavors") or {}
    flavor = flavors.get("pytorch") if isinstance(flavors, dict) else None
    if not isinstance(flavor, dict):
        names = ", ".join(sorted(flavors)) if isinstance(flavors, dict) and flavors else "none"
        raise XAIError(
            f"{uri} is not a PyTorch model (its flavors: {names}); mlflow-xai explains models "
            "logged with mlflow.pytorch.log_model or mlflow.pytorch.autolog"
        )
    data = _data_dir(model_dir, flavor, uri)
    if (data / PT2_FILE).is_file():
        return "pt2"
    if (data / PICKLE_FILE).is_file():
        return "pickle"
    raise XAIError(f"{uri} has neither data/{PT2_FILE} nor data/{PICKLE_FILE}; re-log it with mlflow.pytorch.log_model")


def _data_dir(model_dir: Path, flavor: dict[str, Any], uri: str) -> Path:
    sub = str(flavor.get("model_data") or "data")
    parts = sub.split("/")
    if sub.startswith("/") or "\\" in sub or any(p in ("", ".", "..") for p in parts):
        raise XAIError(f"{uri} names its model data {sub!r}, not a plain folder inside the model; refusing it")
    return model_dir.joinpath(*parts)


def load_pytorch_model(model_dir: Path, uri: str, *, device: str = "cpu", allow_pickle: bool = False) -> PyTorchModel:
    """Load the pytorch model in ``model_dir`` (a downloaded MLflow model) on ``device``.

    Raises:
        XAIError: Not a pytorch model; a pickle model without ``allow_pickle`` (refused
            before anything is read); a pt2 archive that holds pickled objects; a pickled
            model whose class cannot be imported.
    """
    mlmodel = read_mlmodel(model_dir)
    fmt = model_format(model_dir, mlmodel, uri)
    data = _data_dir(model_dir, mlmodel["flavors"]["pytorch"], uri)
    if fmt == "pickle":
        if not allow_pickle:
            raise XAIError(
                f"{uri} is a pickled PyTorch model (as mlflow.pytorch.autolog logs it): loading it runs "
                f"code stored in the artifact, which anyone who can write to the store could have put "
                f"there; refusing it. If you trust this model, pass {PICKLE_OPT_IN} (MLproject and "
                "evaluator config: allow_pickle=true)"
            )
        with _LOADING:
            model = _load_pickle(model_dir, mlmodel, uri, device)
        return PyTorchModel(model=model, format="pickle", mlmodel=mlmodel)
    with _LOADING:
        program = _load_pt2(data / PT2_FILE, uri)
        loaded = unflatten_program(program)
    loaded.model.to(device)
    loaded.mlmodel = mlmodel
    return loaded


# One load at a time in a process (compare loads its two sides on two threads):
# torch.export.load keeps its deserializer in a module global ("_CURRENT_DESERIALIZER is
# already set"), and a pickled model's load puts its code folder on sys.path for the load.
_LOADING = threading.Lock()


def _load_pt2(path: Path, uri: str) -> Any:
    _check_pt2_archive(path, uri)
    try:
        return torch.export.load(str(path))
    except Exception as exc:  # noqa: BLE001 - a corrupt archive or one from an incompatible torch
        first = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise XAIError(
            f"the pt2 archive of {uri} could not be loaded ({first}); it may come from another torch "
            f"version than {torch.__version__}"
        ) from exc


# Records of a pt2 archive that torch.export.load reads without running code: short text
# records, JSON (the graph, the configs), raw tensor bytes its configs mark use_pickle=false,
# and torch.save files that torch's weights_only unpickler admits (the sample inputs).
_TEXT_RECORDS = frozenset({"version", "archive_format", "archive_version", "byteorder", "serialization_id"})
_TEXT_CONTENT = re.compile(rb"[A-Za-z0-9._-]{1,64}\n?")
_PAYLOAD_CONFIG = re.compile(r"(?:^|/)data/(?:weights|constants)/[^/]+_config\.json$")
_RAW_PREFIXES = ("weight_", "tensor_")


def _check_pt2_archive(path: Path, uri: str) -> None:
    """Refuse a pt2 archive holding any record that ``torch.export.load`` would unpickle freely.

    The same rules as MLflow's own check for pt2 models (``mlflow.pytorch``), done here so
    that loading a pt2 model does not import ``mlflow.pytorch`` (and with it Lightning).
    A ``torch.save`` record must load with ``weights_only=True``: tensors and primitive
    containers, no code.
    """
    import io
    import json
    import zipfile

    def refuse(record: str) -> XAIError:
        return XAIError(
            f"the pt2 archive of {uri} holds {record!r}, which is not plain tensors or JSON and would be "
            "unpickled on loading; refusing it (re-export the model without custom objects)"
        )

    try:
        archive = zipfile.ZipFile(path)
    except zipfile.BadZipFile as exc:
        raise refuse(path.name) from exc
    with archive:
        infos = [i for i in archive.infolist() if not i.is_dir()]
        raw: set[str] = set()
        pickled: set[str] = set()
        for info in infos:
            if not _PAYLOAD_CONFIG.search(info.filename):
                continue
            try:
                entries = json.loads(archive.read(info)).get("config", {})
            except (ValueError, AttributeError):
                continue
            folder = info.filename.rsplit("/", 1)[0]
            for entry in entries.values() if isinstance(entries, dict) else ():
                name = entry.get("path_name") if isinstance(entry, dict) else None
                if not isinstance(name, str) or "/" in name:
                    continue
                ok = entry.get("use_pickle") is False and name.startswith(_RAW_PREFIXES)
                (raw if ok else pickled).add(f"{folder}/{name}")
        raw -= pickled
        for info in infos:
            if info.filename in raw:
                continue
            content = archive.read(info)
            if info.filename.rsplit("/", 1)[-1] in _TEXT_RECORDS and _TEXT_CONTENT.fullmatch(content):
                continue
            try:
                json.loads(content.decode("utf-8"))
                continue
            except (UnicodeDecodeError, ValueError):
                pass
            try:
                torch.load(io.BytesIO(content), map_location="cpu", weights_only=True)
            except Exception as exc:  # noqa: BLE001 - anything the restricted unpickler refuses
                raise refuse(info.filename) from exc


@contextlib.contextmanager
def _pickle_allowed() -> Iterator[None]:
    # MLflow refuses pickled models unless this variable is set; the user opted in for this one.
    key = "MLFLOW_ALLOW_PICKLE_DESERIALIZATION"
    before = os.environ.get(key)
    os.environ[key] = "true"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = before


def _load_pickle(model_dir: Path, mlmodel: dict[str, Any], uri: str, device: str) -> nn.Module:
    import mlflow.pytorch

    path_before = list(sys.path)
    try:
        with _pickle_allowed():
            model = mlflow.pytorch.load_model(str(model_dir), map_location=device)
    except (ImportError, AttributeError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if isinstance(exc, ImportError):
            missing = exc.name or first
        elif first.startswith("Can't get attribute"):  # pickle: the module is there, the class is not
            missing = first.split("'")[1] if first.count("'") >= 2 else first
        else:  # MLflow calls .eval() and .to() on what was unpickled
            raise XAIError(f"{uri} did not load as a torch.nn.Module ({first[:200]}); nothing to look inside") from exc
        raise XAIError(
            f"the pickled model {uri} needs {missing!r}, which cannot be imported here; put the model's "
            "code on PYTHONPATH (or log it with code_paths=[...]) and run again"
        ) from exc
    finally:
        sys.path[:] = path_before  # MLflow prepends the model's code folder; keep it to this load
    if not isinstance(model, nn.Module):
        raise XAIError(f"{uri} loaded as {type(model).__name__}, not a torch.nn.Module; nothing to look inside")
    if isinstance(model, torch.jit.ScriptModule):
        raise XAIError(f"{uri} is a TorchScript module; its layers cannot be hooked, log the eager model instead")
    return model.to(device)


# ---------------------------------------------------------------------------------------
# torch.export programs


def unflatten_program(program: Any) -> PyTorchModel:
    """The module hierarchy of an exported program, with the original names and types.

    ``torch.export.unflatten`` gives one ``InterpreterModule`` per submodule, named by its
    qualified name, and records the original type's path on it (``_ty``). Each module's
    class becomes a subclass of that ``torch.nn`` type (``Conv2d``, ``ReLU``,
    ``BatchNorm1d``), so the type checks of :mod:`mlflow_xai.inspect` and captum hold; a
    user-defined class gets a class of its name, importing nothing. The forward is still
    the exported graph's.
    """
    unflat = torch.export.unflatten(program)
    for _name, module in unflat.named_modules():
        _restore_type(module)
    warnings: list[str] = []
    training = _exported_in_training_mode(program)
    if training:
        warnings.append(
            "the model was exported in training mode (dropout or batch norm in training behaviour; "
            "MLflow does not call eval() before exporting): it is explained as it runs, with "
            "dropout active and batch statistics from the explained rows; call model.eval() before "
            "mlflow.pytorch.log_model to export the inference behaviour"
        )
    fixed, shape = _input_batch(program)
    if fixed is not None:
        warnings.append(
            f"the model was exported for batches of exactly {fixed} row{'s' if fixed != 1 else ''} "
            "(its input example had that many): it is run in chunks of that size; log it with an "
            "input example of two or more rows for a dynamic batch"
        )
    unflat.eval()  # the graph's behaviour is fixed at export; this only keeps the flags honest
    return PyTorchModel(model=unflat, format="pt2", fixed_batch=fixed, input_shape=shape,
                        training_mode=training, warnings=warnings)


_TYPE_CACHE: dict[tuple[type, str], type] = {}


def _restore_type(module: nn.Module) -> None:
    path = getattr(module, "_ty", None)
    if not isinstance(path, str) or not path:
        return
    base = type(module)
    key = (base, path)
    cls = _TYPE_CACHE.get(key)
    if cls is None:
        original = _torch_nn_class(path)
        name = path.rsplit(".", 1)[-1]
        bases: tuple[type, ...] = (base, original) if original is not None else (base,)
        # extra_repr: the original's reads constructor attributes this module does not have.
        cls = type(name, bases, {"extra_repr": lambda self: "", "__module__": base.__module__,
                                 "__qualname__": name, "__doc__": f"{path}, as torch.export.unflatten rebuilt it"})
        _TYPE_CACHE[key] = cls
    try:
        module.__class__ = cls
    except TypeError:  # an incompatible layout: keep the InterpreterModule as it is
        return


def _torch_nn_class(path: str) -> type | None:
    """The ``torch.nn`` class a dotted path names, or ``None`` (never imports other modules)."""
    if not path.startswith("torch.nn."):
        return None
    import importlib

    module_path, _, name = path.rpartition(".")
    if module_path not in sys.modules:  # only modules torch itself has imported already
        return None
    cls = getattr(importlib.import_module(module_path), name, None)
    return cls if isinstance(cls, type) and issubclass(cls, nn.Module) else None


_TRAINING_FLAG_ARG = {
    "aten.batch_norm.default": 5,
    "aten.dropout.default": 2,
    "aten.native_dropout.default": 2,
    "aten.feature_dropout.default": 2,
    "aten.alpha_dropout.default": 2,
}
_TRAINING_OPS = ("aten._native_batch_norm_legit_functional", "aten._native_batch_norm_legit.default")


def _exported_in_training_mode(program: Any) -> bool:
    for node in program.graph.nodes:
        if node.op != "call_function":
            continue
        target = str(node.target)
        index = _TRAINING_FLAG_ARG.get(target)
        if index is not None and len(node.args) > index and node.args[index] is True:
            return True
        if target.startswith(_TRAINING_OPS):
            return True
    return False


def _input_batch(program: Any) -> tuple[int | None, tuple[int, ...] | None]:
    """The fixed batch size of the program's first input (``None`` if dynamic) and its shape."""
    user_inputs = [spec.arg.name for spec in program.graph_signature.input_specs
                   if spec.kind.name == "USER_INPUT" and hasattr(spec.arg, "name")]
    if not user_inputs:
        return None, None
    for node in program.graph.nodes:
        if node.op == "placeholder" and node.name == user_inputs[0]:
            val = node.meta.get("val")
            shape = getattr(val, "shape", None)
            if shape is None or len(shape) == 0:
                return None, None
            rest = tuple(int(d) if isinstance(d, int) else -1 for d in shape[1:])
            first = shape[0]
            return (int(first) if isinstance(first, int) else None), rest
    return None, None
