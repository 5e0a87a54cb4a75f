"""Layer selection and forward hooks that capture module outputs.

Hooks are registered inside ``try`` and removed in ``finally`` (as captum does), so a
forward pass that raises leaves the user's model exactly as it was. A torch function
mode active during the forward pass keeps the (zero-copy) captures safe from later
in-place ops.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils.hooks import RemovableHandle

from mlflow_xai.errors import XAIError, unknown_choice

__all__ = ["LayerSelection", "capture_activations", "forward_hooks", "resolve_layers", "is_leaf"]

#: ``None`` (all), qualified module names (``"layers.0"``), or ``(name, module) -> bool``.
LayerSelection = str | Sequence[str] | Callable[[str, nn.Module], bool] | None

# How many valid names an "unknown layer" message lists: enough to spot a typo.
_NAMES_IN_ERROR = 8


def is_leaf(module: nn.Module) -> bool:
    """True for modules without child modules: the ones that do the computing."""
    return next(iter(module.children()), None) is None


def resolve_layers(
    model: nn.Module,
    layers: LayerSelection,
    default: Callable[[nn.Module], bool] = is_leaf,
) -> list[tuple[str, nn.Module]]:
    """The ``(qualified name, module)`` pairs a layer selection picks, in model order.

    ``None`` picks every module for which ``default`` holds (the leaves, unless told
    otherwise); a predicate filters that same default set; names pick exactly the named
    modules, leaf or not, so a user can ask for the output of a whole block.

    Args:
        model: The network.
        layers: ``None``, one name, a list of names, or ``(name, module) -> bool``.
        default: Which modules ``None`` and a predicate choose among.

    Returns:
        Pairs in the order of ``model.named_modules()``.

    Raises:
        XAIError: A name is not a module of ``model``, or ``layers`` has a wrong type.

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 2), nn.ReLU())
        >>> [n for n, _ in resolve_layers(net, None)]
        ['0', '1']
    """
    named = list(model.named_modules())
    if layers is None:
        return [(n, m) for n, m in named if default(m)]
    if isinstance(layers, str):
        layers = [layers]
    if callable(layers):
        pred = layers
        return [(n, m) for n, m in named if default(m) and pred(n, m)]
    names = list(layers) if isinstance(layers, Iterable) else None  # a generator is read once
    if names is None or not all(isinstance(n, str) for n in names):
        raise XAIError(
            "layers must be None, a list of qualified module names such as 'layers.0', "
            f"or a predicate (name, module) -> bool; got {type(layers).__name__}"
        )
    wanted = set(names)
    known = {n for n, _ in named}
    unknown = sorted(wanted - known)
    if unknown:
        # The leaves in model order (any module may be named, but leaves show the form).
        leaves = [n for n, m in named if n and is_leaf(m)] or [n for n, _ in named if n]
        shown = set(leaves)
        others = [n for n, _ in named if n and n not in shown]
        raise unknown_choice("layer", unknown, leaves + others, where=f" in {type(model).__name__}",
                             shown=_NAMES_IN_ERROR)
    return [(n, m) for n, m in named if n in wanted]


def first_tensor(output: Any) -> torch.Tensor | None:
    """The tensor a module produced: itself, or the first tensor in a tuple/list/dict.

    LSTMs return ``(out, (h, c))`` and attention returns ``(out, weights)``; the first
    element is the output the next layer sees.
    """
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, dict):
        output = list(output.values())
    if isinstance(output, (tuple, list)):
        for item in output:
            found = first_tensor(item)
            if found is not None:
                return found
    return None


def _storage_key(t: torch.Tensor) -> int | None:
    try:
        return int(t.untyped_storage().data_ptr())
    except (RuntimeError, NotImplementedError):  # sparse, nested or meta tensors
        return None


# Dunder methods that write into their first argument; other in-place ops end in "_"
# (add_, relu_, masked_fill_) or take inplace=True (F.relu, F.dropout) or out=.
_INPLACE_DUNDERS = frozenset(
    {"__setitem__", "__iadd__", "__isub__", "__imul__", "__itruediv__", "__ifloordiv__", "__imod__",
     "__ipow__", "__imatmul__", "__iand__", "__ior__", "__ixor__", "__ilshift__", "__irshift__"}
)


def _written_tensors(func: Any, args: Sequence[Any], kwargs: dict[str, Any]) -> list[torch.Tensor]:
    """The tensors a torch call is about to overwrite."""
    name = getattr(func, "__name__", "")
    written: list[Any] = []
    if args and (
        name in _INPLACE_DUNDERS
        or (name.endswith("_") and not name.startswith("__"))
        or kwargs.get("inplace") is True
    ):
        written.append(args[0])
    out = kwargs.get("out")
    written += list(out) if isinstance(out, (tuple, list)) else [out]
    return [t for t in written if isinstance(t, torch.Tensor)]


class _Recorder(TorchFunctionMode):
    """Keeps captured outputs and their call order, and protects them from in-place ops.

    Captures share memory with the module outputs (no copy), so a later in-place op
    (``ReLU(inplace=True)``, ResNet's ``out += identity``) would silently rewrite them.
    Active as a torch function mode during the forward pass, the recorder sees every
    torch call, and copies a capture just before a call writes into its storage.
    """

    def __init__(self, per_call: bool = False, chunked: bool = False) -> None:
        super().__init__()
        self.outputs: dict[str, torch.Tensor] = {}
        self.order: list[str] = []  # names in the order their hooks fired
        self._by_storage: dict[int, set[str]] = {}
        self._version: dict[str, int] = {}
        self._modified: set[str] = set()
        # per_call: a module's k-th call in one forward pass is its own entry ``name@k``
        # (the first keeps ``name``), as torch.export names the calls of a reused module.
        self.per_call = per_call
        self._calls: dict[str, int] = {}
        # chunked: the batch runs as several forward passes (a model exported for one batch
        # size); each pass's captures are copied and concatenated along dim 0 by finish().
        self.chunked = chunked
        self._parts: dict[str, list[torch.Tensor]] = {}
        self._passes = 0

    def begin_pass(self) -> None:
        """A new forward pass over the next chunk of the batch starts."""
        self._calls.clear()
        self._passes += 1

    def finish(self) -> None:
        """Concatenate the chunks' captures (chunked mode); a no-op otherwise."""
        if not self.chunked:
            return
        for key, parts in self._parts.items():
            if len(parts) == self._passes:  # a module every chunk called the same way
                self.outputs[key] = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
                self._version[key] = self.outputs[key]._version
        self._parts.clear()

    def __torch_function__(
        self, func: Any, types: Any, args: Sequence[Any] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        kwargs = kwargs or {}
        if self._by_storage:
            for t in _written_tensors(func, args, kwargs):
                self._protect(t)
        return func(*args, **kwargs)

    def _protect(self, target: torch.Tensor) -> None:
        key = _storage_key(target)
        for name in self._by_storage.pop(key, set()) if key is not None else ():
            captured = self.outputs.get(name)
            if captured is None or _storage_key(captured) != key:
                continue  # the name was re-captured since; its new tensor lives elsewhere
            if captured._version != self._version[name]:
                self._modified.add(name)  # already changed by an op we could not see
            self.outputs[name] = captured.clone()
            self._version[name] = self.outputs[name]._version

    def on_output(self, name: str, module: nn.Module, output: Any) -> None:
        """The forward hook: record ``module``'s output under ``name``."""
        t = first_tensor(output)
        if t is None:
            return
        key = name
        if self.per_call:
            k = self._calls.get(name, 0)
            self._calls[name] = k + 1
            key = name if k == 0 else f"{name}@{k}"
        if self._passes <= 1:  # the call order of one pass
            self.order.append(key)
        if self.chunked:
            # A private copy per chunk: the chunks are concatenated afterwards, and a
            # later chunk's in-place ops must not reach an earlier chunk's capture.
            parts = self._parts.setdefault(key, [])
            if len(parts) == self._passes:  # called again in this pass: the later call wins
                parts[-1] = t.detach().clone()
            else:
                parts.append(t.detach().clone())
            return
        # detach() shares memory: no copy unless an in-place op forces one.
        t = t.detach()
        self.outputs[key] = t
        self._version[key] = t._version
        storage = _storage_key(t)
        if storage is not None:
            self._by_storage.setdefault(storage, set()).add(key)

    def warn_if_modified(self) -> None:
        """In-place writes the mode cannot see (from C++ extensions, say) still bump the
        version counter; name the captures they changed rather than hide it."""
        changed = self._modified | {n for n, t in self.outputs.items() if t._version != self._version[n]}
        if changed:
            names = [n for n in self.outputs if n in changed]
            warnings.warn(
                "outputs of " + ", ".join(names[:_NAMES_IN_ERROR]) + " were modified in place "
                "after they were captured; their recorded values show the later state",
                RuntimeWarning,
                stacklevel=3,
            )


@contextmanager
def record_outputs(
    model: nn.Module, modules: Sequence[tuple[str, nn.Module]], *, per_call: bool = False,
    chunked: bool = False,
) -> Iterator[_Recorder]:
    """Hooks on ``modules`` for the duration of the block; the engine behind
    :func:`capture_activations`, which also exposes the call order.

    ``per_call`` gives each further call of a module in one forward pass its own entry,
    ``name@1``, ``name@2``, ...; ``chunked`` is for a batch run as several forward passes
    (call :meth:`_Recorder.begin_pass` before each and :meth:`_Recorder.finish` after
    the last): each entry is the concatenation of its passes' outputs.
    """
    rec = _Recorder(per_call=per_call, chunked=chunked)
    with forward_hooks(modules, rec.on_output):
        with rec:
            yield rec
        rec.warn_if_modified()


@contextmanager
def forward_hooks(
    modules: Iterable[tuple[str, nn.Module]], hook: Callable[[str, nn.Module, Any], None]
) -> Iterator[None]:
    """``hook(name, module, output)`` after each forward call of ``modules`` during the block.

    Every hook is registered inside ``try`` and removed in ``finally``, so a forward
    pass that raises leaves the model without them. The one hook handling of the
    package: :func:`capture_activations` and the training monitor both use it.

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 2), nn.ReLU())
        >>> seen = []
        >>> with forward_hooks(net.named_children(), lambda name, m, out: seen.append(name)):
        ...     _ = net(torch.ones(1, 2))
        >>> seen, net[0]._forward_hooks
        (['0', '1'], OrderedDict())
    """
    handles: list[RemovableHandle] = []
    try:
        for name, module in modules:
            handles.append(module.register_forward_hook(
                lambda m, args, out, name=name: hook(name, m, out)))
        yield
    finally:
        for h in handles:
            h.remove()


@contextmanager
def capture_activations(
    model: nn.Module, layers: LayerSelection = None
) -> Iterator[dict[str, torch.Tensor]]:
    """Capture the outputs of modules during the forward passes run inside the block.

    By default every leaf module (one without children) is hooked, so the output after
    a ``ReLU`` is its own entry. Values are detached and share memory with the outputs;
    while the block runs, a torch function mode copies a capture just before an
    in-place op (``ReLU(inplace=True)``, ``out += x``) would overwrite it. A module
    called several times keeps its last output; a module returning a tuple/list keeps
    its first tensor. On leaving the block the dict is re-ordered to
    ``model.named_modules()`` order, and every hook is removed, even if forward raised.

    Args:
        model: Any ``nn.Module``.
        layers: ``None`` (all leaves), qualified names, or ``(name, module) -> bool``
            applied to the leaves.

    Yields:
        A dict ``name -> output tensor``, filled as the forward pass runs.

    Raises:
        XAIError: A layer name is unknown.

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 2), nn.ReLU())
        >>> with capture_activations(net) as acts:
        ...     _ = net(torch.ones(1, 2))
        >>> list(acts)
        ['0', '1']
    """
    modules = resolve_layers(model, layers)
    with record_outputs(model, modules) as rec:
        try:
            yield rec.outputs
        finally:
            rank = {name: i for i, (name, _) in enumerate(modules)}
            ordered = sorted(rec.outputs.items(), key=lambda kv: rank[kv[0]])
            rec.outputs.clear()
            rec.outputs.update(ordered)
