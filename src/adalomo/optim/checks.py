"""Input checks of the optimizers: one-line errors that say what to pass instead."""

from __future__ import annotations

import math
from typing import Any

from torch import Tensor, nn

__all__ = ["check_number", "check_eps", "as_float", "param_list", "split_names", "check_param", "check_state_dict"]


def check_number(name: str, value: Any, *, low: float | None = None, low_open: bool = False,
                 high: float | None = None, high_open: bool = False, hint: str = "") -> None:
    """``value`` is a real number (or a one-element tensor) within the bounds, else a ValueError naming ``name``."""
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a number, got a tensor of shape {tuple(value.shape)}")
        value = float(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise ValueError(f"{name} must be a number, got {value!r}{hint}")
    bad_low = low is not None and (value <= low if low_open else value < low)
    bad_high = high is not None and (value >= high if high_open else value > high)
    if bad_low or bad_high:
        lo = "" if low is None else f"{'>' if low_open else '>='} {low}"
        hi = "" if high is None else f"{'<' if high_open else '<='} {high}"
        rule = " and ".join(x for x in (lo, hi) if x)
        raise ValueError(f"{name} must be {rule}, got {value!r}{hint}")


def check_eps(eps: Any) -> tuple[float, float]:
    if not isinstance(eps, (tuple, list)) or len(eps) != 2:
        raise ValueError(f"eps must be a pair (eps1, eps2), e.g. (1e-30, 1e-3), got {eps!r}")
    for i, e in enumerate(eps):
        check_number(f"eps[{i}]", e, low=0.0)
    return float(eps[0]), float(eps[1])


def as_float(x: Any) -> float:
    """A group setting as a host float (a tensor ``lr`` is read once per step)."""
    return float(x)


def param_list(params: Any, name: str) -> list:
    """``params`` as a list: parameters, (name, parameter) pairs or param-group dicts; a module gives its named
    parameters (lomo-optim's signature)."""
    if isinstance(params, nn.Module):
        params = params.named_parameters()
    if isinstance(params, Tensor):
        raise TypeError(f"{name}: params must be an iterable of tensors or dicts (e.g. model.parameters()), "
                        "got a single Tensor; wrap it in a list")
    params = list(params)
    if not params:
        raise ValueError(f"{name}: got an empty parameter list; pass model.parameters() of a model that has "
                         "parameters")
    return params


def split_names(params: list, name: str) -> tuple[list, list[str] | None]:
    """(tensors, names or None) of a param group's ``params``: all (name, tensor) pairs, or none."""
    named = [isinstance(x, tuple) and len(x) == 2 and isinstance(x[0], str) for x in params]
    if params and all(named):
        return [p for _, p in params], [n for n, _ in params]
    if any(named):
        raise TypeError(f"{name}: params mixes (name, tensor) pairs and tensors; pass model.named_parameters() "
                        "or model.parameters()")
    return params, None


def check_param(p: Any, i: int, name: str) -> None:
    if not isinstance(p, Tensor):
        raise TypeError(f"{name}: parameter {i} is a {type(p).__name__}, not a tensor (pass model.parameters(), "
                        "model.named_parameters(), the model itself, or a list of param-group dicts)")
    if not p.is_leaf:
        raise ValueError(f"{name}: parameter {i} (shape {tuple(p.shape)}) is not a leaf tensor (it was computed "
                         "from other tensors); pass the model's own parameters, e.g. model.parameters()")
    if p.is_complex():
        raise ValueError(f"{name}: parameter {i} is complex ({p.dtype}); only real floating-point parameters "
                         "are supported (view complex weights as real with torch.view_as_real)")
    if not p.is_floating_point():
        raise ValueError(f"{name}: parameter {i} has dtype {p.dtype}; only floating-point parameters can be "
                         "optimized")


def check_state_dict(opt: Any, sd: Any) -> None:
    """A state dict of another optimizer (or a damaged one) is refused before anything of it is loaded: the same
    number of groups and parameters, every setting of this optimizer, and each parameter's state keys."""
    name = type(opt).__name__
    hint = f"; load a state dict saved by {name} with the same parameter groups"
    if not isinstance(sd, dict) or "state" not in sd or "param_groups" not in sd:
        raise ValueError(f"{name}.load_state_dict: expected a dict with 'state' and 'param_groups'{hint}")
    groups = sd["param_groups"]
    if len(groups) != len(opt.param_groups):
        raise ValueError(f"{name}.load_state_dict: {len(groups)} param groups saved, {len(opt.param_groups)} "
                         f"here{hint}")
    for i, (saved, ours) in enumerate(zip(groups, opt.param_groups)):
        missing = sorted(k for k in opt._setting_names if k not in saved)
        if missing:
            raise ValueError(f"{name}.load_state_dict: param group {i} lacks {', '.join(missing)}{hint}")
        if len(saved["params"]) != len(ours["params"]):
            raise ValueError(f"{name}.load_state_dict: param group {i} has {len(saved['params'])} parameters "
                             f"saved, {len(ours['params'])} here{hint}")
        for pid, p in zip(saved["params"], ours["params"]):
            st = sd["state"].get(pid)
            if st is None:
                continue
            expected = set(opt._state_keys(p, ours))
            if set(st) != expected:
                raise ValueError(f"{name}.load_state_dict: the state of a parameter of shape {tuple(p.shape)} "
                                 f"has keys {sorted(st)}, expected {sorted(expected)}{hint}")
