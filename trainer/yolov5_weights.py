"""Weights from a YOLOv5 `.pt` file, read without YOLOv5's code and without running anything in it.

YOLOv5 saves whole pickled model objects (`models.yolo.DetectionModel`, its layers, numpy
arrays), which torch's safe loader refuses. Here every global the pickle names, apart from
torch's tensor rebuilders and plain containers, is replaced by an inert `Stub` that only
keeps what it was given. The module tree is then walked for its parameters and persistent
buffers, which gives the names YOLOv5's own `state_dict()` would (`model.0.conv.weight`, ...):
the names our models use.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

# What may run while unpickling: torch's own tensor rebuilders (as its safe loader allows) and
# plain containers. Anything else the file names becomes a Stub.
SAFE_GLOBALS = {
    ("torch._utils", "_rebuild_tensor_v2"),
    ("torch._utils", "_rebuild_parameter"),
    ("torch._utils", "_rebuild_parameter_with_state"),
    ("collections", "OrderedDict"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
}


class Stub:
    """Stands for any class or function the pickle names: calling or instantiating it, and
    setting its state, only records the arguments and the state."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.__dict__["stub_arguments"] = args

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) == 2 and isinstance(state[1], dict):
            state = {**(state[0] or {}), **state[1]}  # (dict state, slot state)
        if isinstance(state, dict):
            self.__dict__.update(state)


class _Unpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        module = {"__builtin__": "builtins"}.get(module, module)  # protocol 2 spells it the Python 2 way
        if (module, name) in SAFE_GLOBALS:
            return super().find_class(module, name)
        return type(name, (Stub,), {"__module__": f"yolov5_stub.{module}"})


# torch.load takes a pickle module; it uses its Unpickler (and `load` for the legacy format).
_RESTRICTED_PICKLE = ModuleType("restricted_pickle")
_RESTRICTED_PICKLE.Unpickler = _Unpickler  # type: ignore[attr-defined]
_RESTRICTED_PICKLE.load = lambda file, **kwargs: _Unpickler(file, **kwargs).load()  # type: ignore[attr-defined]


def is_stub(value: Any) -> bool:
    return isinstance(value, Stub)


def module_tensors(module: Stub, prefix: str = "") -> dict[str, torch.Tensor]:
    """A pickled nn.Module's parameters and persistent buffers by dotted name, as `state_dict()`."""
    state: dict[str, torch.Tensor] = {}
    values = module.__dict__
    skipped = values.get("_non_persistent_buffers_set") or set()
    for group in ("_parameters", "_buffers"):
        for name, tensor in (values.get(group) or {}).items():
            if isinstance(tensor, torch.Tensor) and name not in skipped:
                state[prefix + name] = tensor.detach().float() if tensor.is_floating_point() else tensor.detach()
    for name, child in (values.get("_modules") or {}).items():
        if is_stub(child):
            state.update(module_tensors(child, f"{prefix}{name}."))
    return state


def read_yolov5_weights(path: Path) -> dict[str, Any] | None:
    """`{"model": state dict, "model_yaml": its model config}` from a YOLOv5 checkpoint (its EMA
    weights when it has them), or None when the file holds no YOLOv5 model."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False, pickle_module=_RESTRICTED_PICKLE)
    except Exception:  # noqa: BLE001 - not a pickle torch can read at all
        return None
    if not isinstance(checkpoint, dict):
        return None
    model = checkpoint.get("ema") if is_stub(checkpoint.get("ema")) else checkpoint.get("model")
    if not is_stub(model) or not isinstance(model.__dict__.get("yaml"), dict):
        return None
    state = module_tensors(model)
    if not state:
        return None
    return {"model": state, "model_yaml": model.__dict__["yaml"]}
