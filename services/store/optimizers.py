"""Server-side sparse optimizers: update gathered embedding rows and their optimizer state in place.

The store gathers the rows a Push touches (one per distinct fid, gradients already summed), calls
``SparseOptimizer.apply`` on them, and scatters them back. Each optimizer keeps its per-row state in
a float32 array of ``state_width(dim)`` columns so a table can hold it in one slab next to the values.

Every kernel is one numba loop that does its arithmetic in float64 and rounds once to float32 on
store, so ``g * g`` never overflows; the same in numpy would need float64 temporaries and runs about
3x slower. Gradients are clipped to +-2**62 and stored values and state saturate at the float32
range, so an absurdly large gradient can slow a row down but never turns it into inf/NaN.
"""

from __future__ import annotations

import abc
import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from numba import njit

_F32_MAX = float(np.finfo(np.float32).max)
_G_MAX = float(2**62)


def _validate(config: object, positive: tuple[str, ...] = (), non_negative: tuple[str, ...] = ()) -> None:
    for name in positive:
        if not getattr(config, name) > 0:
            raise ValueError(f"{type(config).__name__}.{name} must be > 0, got {getattr(config, name)}")
    for name in non_negative:
        if not getattr(config, name) >= 0:
            raise ValueError(f"{type(config).__name__}.{name} must be >= 0, got {getattr(config, name)}")


def _validate_adagrad(config: AdagradConfig | RowwiseAdagradConfig) -> None:
    _validate(config, positive=("learning_rate",), non_negative=("initial_accumulator", "eps"))
    # Both zero would make a zero gradient on a fresh row compute 0 / 0.
    if config.eps == 0 and config.initial_accumulator == 0:
        raise ValueError(f"{type(config).__name__} needs eps > 0 or initial_accumulator > 0")


@dataclass(frozen=True)
class SGDConfig:
    """Plain SGD: ``w -= learning_rate * g``. No state."""

    learning_rate: float = 0.05

    def __post_init__(self) -> None:
        _validate(self, positive=("learning_rate",))


@dataclass(frozen=True)
class AdagradConfig:
    """Per-element Adagrad, as ``torch.optim.Adagrad`` without lr decay.

    Attributes:
        learning_rate: step size.
        initial_accumulator: starting squared-gradient sum of every element (bounds the first steps).
        eps: added to ``sqrt(accumulator)``, outside the square root as torch does.
    """

    learning_rate: float = 0.05
    initial_accumulator: float = 0.1
    eps: float = 1e-8

    def __post_init__(self) -> None:
        _validate_adagrad(self)


@dataclass(frozen=True)
class RowwiseAdagradConfig:
    """Row-wise Adagrad (torchrec/fbgemm): one accumulator per row, grown by the row's mean ``g**2``.

    Attributes:
        learning_rate: step size.
        initial_accumulator: starting accumulator of every row.
        eps: added to ``sqrt(accumulator)``.
    """

    learning_rate: float = 0.05
    initial_accumulator: float = 0.1
    eps: float = 1e-8

    def __post_init__(self) -> None:
        _validate_adagrad(self)


@dataclass(frozen=True)
class FTRLConfig:
    """FTRL-Proximal (McMahan et al., 2013), per element, with state ``z`` and ``n``.

    The value is always the closed form of the state, ``w = 0`` if ``|z| <= l1`` else
    ``-(z - sign(z) * l1) / ((beta + sqrt(n)) / alpha + l2)``. State starts at ``z = n = 0``;
    while an element's ``n`` is still 0 (no non-zero gradient yet) ``apply`` first sets ``z`` to the
    value that makes the closed form equal the element's current value, so a row keeps its random
    initial value and learns from there rather than being reset to 0 by its first update.

    Attributes:
        alpha: learning rate.
        beta: smoothing of the per-element rate; with ``l2`` it must keep ``beta / alpha + l2 > 0``.
        l1: L1 strength; elements with ``|z| <= l1`` are exactly 0.
        l2: L2 strength.
    """

    alpha: float = 0.05
    beta: float = 1.0
    l1: float = 0.0
    l2: float = 0.0

    def __post_init__(self) -> None:
        _validate(self, positive=("alpha",), non_negative=("beta", "l1", "l2"))
        # At n = 0 the closed form divides by beta / alpha + l2: zero leaves a fresh row's value undefined.
        if not self.beta / self.alpha + self.l2 > 0:
            raise ValueError("FTRLConfig needs beta > 0 or l2 > 0")


@dataclass(frozen=True)
class AdamConfig:
    """Lazy (sparse) Adam: per-element ``m`` and ``v`` plus a per-row step counter.

    A row's bias correction uses the number of times that row was updated, not the table's step,
    so a fid first seen late takes a full-size first step. The counter is stored as float32 and
    stops at 2**24 updates, where both bias corrections are already exactly 1.

    Attributes:
        learning_rate: step size.
        beta1: decay of the first moment.
        beta2: decay of the second moment.
        eps: added to ``sqrt(v_hat)``.
    """

    learning_rate: float = 0.001
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8

    def __post_init__(self) -> None:
        _validate(self, positive=("learning_rate", "eps"), non_negative=("beta1", "beta2"))
        if not (self.beta1 < 1 and self.beta2 < 1):
            raise ValueError(f"AdamConfig betas must be < 1, got {self.beta1}, {self.beta2}")


OptimizerConfig = SGDConfig | AdagradConfig | RowwiseAdagradConfig | FTRLConfig | AdamConfig

_BY_NAME: dict[str, type] = {
    "sgd": SGDConfig,
    "adagrad": AdagradConfig,
    "rowwise_adagrad": RowwiseAdagradConfig,
    "ftrl": FTRLConfig,
    "adam": AdamConfig,
}


@njit(cache=True)
def _f32(x: float) -> float:
    return min(max(x, -_F32_MAX), _F32_MAX)


@njit(cache=True)
def _grad(x: float) -> float:
    # A gradient beyond 2**62 is garbage already; clipping it keeps g * g, and so every
    # accumulator after one step, inside float32 instead of saturating on the first touch.
    return min(max(np.float64(x), -_G_MAX), _G_MAX)


@njit(cache=True)
def _sgd_kernel(values, grads, lr):
    for i in range(values.shape[0]):
        for j in range(values.shape[1]):
            values[i, j] = _f32(values[i, j] - lr * _grad(grads[i, j]))


@njit(cache=True)
def _adagrad_kernel(values, state, grads, lr, eps):
    for i in range(values.shape[0]):
        for j in range(values.shape[1]):
            g = _grad(grads[i, j])
            acc = min(np.float64(state[i, j]) + g * g, _F32_MAX)
            values[i, j] = _f32(values[i, j] - lr * g / (math.sqrt(acc) + eps))
            state[i, j] = acc


@njit(cache=True)
def _rowwise_adagrad_kernel(values, state, grads, lr, eps):
    dim = values.shape[1]
    for i in range(values.shape[0]):
        sq = 0.0
        for j in range(dim):
            g = _grad(grads[i, j])
            sq += g * g
        acc = min(np.float64(state[i, 0]) + sq / dim, _F32_MAX)
        scale = lr / (math.sqrt(acc) + eps)
        for j in range(dim):
            values[i, j] = _f32(values[i, j] - scale * _grad(grads[i, j]))
        state[i, 0] = acc


@njit(cache=True)
def _ftrl_kernel(values, state, grads, alpha, beta, l1, l2):
    dim = values.shape[1]
    inv_alpha = 1.0 / alpha
    denom0 = beta * inv_alpha + l2
    for i in range(values.shape[0]):
        for j in range(dim):
            g = _grad(grads[i, j])
            w = np.float64(values[i, j])
            z = np.float64(state[i, j])
            n = np.float64(state[i, dim + j])
            if n == 0.0:
                # No gradient yet: take the z whose closed form is the current (initial) value.
                z = 0.0 if w == 0.0 else -(w * denom0 + math.copysign(l1, w))
            # Rounded to what is stored, so the value below is exactly the closed form of the stored state.
            n_new = np.float64(np.float32(min(n + g * g, _F32_MAX)))
            root_new = math.sqrt(n_new)
            # (sqrt(n_new) - sqrt(n)) / alpha without the cancellation when n >> g**2.
            sigma = (n_new - n) / (root_new + math.sqrt(n)) * inv_alpha if n_new > n else 0.0
            z = np.float64(np.float32(_f32(z + g - sigma * w)))
            if abs(z) <= l1:
                w = 0.0
            else:
                w = -(z - math.copysign(l1, z)) / ((beta + root_new) * inv_alpha + l2)
            values[i, j] = _f32(w)
            state[i, j] = z
            state[i, dim + j] = n_new


@njit(cache=True)
def _adam_kernel(values, state, grads, lr, beta1, beta2, eps):
    dim = values.shape[1]
    for i in range(values.shape[0]):
        t = np.float64(state[i, 2 * dim]) + 1.0
        # lr * m_hat / (sqrt(v_hat) + eps) with the per-row bias corrections folded into two factors.
        step = lr / (1.0 - beta1**t)
        inv_root_bc2 = 1.0 / math.sqrt(1.0 - beta2**t)
        for j in range(dim):
            g = _grad(grads[i, j])
            m = beta1 * np.float64(state[i, j]) + (1.0 - beta1) * g
            v = min(beta2 * np.float64(state[i, dim + j]) + (1.0 - beta2) * g * g, _F32_MAX)
            values[i, j] = _f32(values[i, j] - step * m / (math.sqrt(v) * inv_root_bc2 + eps))
            state[i, j] = m
            state[i, dim + j] = v
        state[i, 2 * dim] = t


class SparseOptimizer(abc.ABC):
    """Updates gathered rows and their optimizer state in place."""

    config: OptimizerConfig

    def __init__(self, config: OptimizerConfig) -> None:
        self.config = config

    @abc.abstractmethod
    def state_width(self, dim: int) -> int:
        """float32 columns of state per row for rows of ``dim`` floats."""

    def init_state(self, n: int, dim: int) -> np.ndarray:
        """State of ``n`` new rows: float32 [n, state_width(dim)]."""
        return np.zeros((n, self.state_width(dim)), np.float32)

    def apply(self, values: np.ndarray, state: np.ndarray, grads: np.ndarray) -> None:
        """One optimizer step on every given row.

        Args:
            values: float32 [n, dim], updated in place.
            state: float32 [n, state_width(dim)], updated in place.
            grads: float [n, dim], one summed gradient per row (per distinct fid).

        Raises:
            TypeError: values or state is not float32 (they could not be updated in place).
            ValueError: the shapes do not agree.
        """
        if values.dtype != np.float32 or state.dtype != np.float32:
            raise TypeError(f"values and state must be float32, got {values.dtype} and {state.dtype}")
        if values.ndim != 2:
            raise ValueError(f"values must be [n, dim], got shape {values.shape}")
        n, dim = values.shape
        if grads.shape != values.shape:
            raise ValueError(f"grads shape {grads.shape} != values shape {values.shape}")
        if state.shape != (n, self.state_width(dim)):
            raise ValueError(f"state shape {state.shape} != {(n, self.state_width(dim))}")
        if n == 0 or dim == 0:
            return
        self._apply(values, state, np.ascontiguousarray(grads, dtype=np.float32))

    @abc.abstractmethod
    def _apply(self, values: np.ndarray, state: np.ndarray, grads: np.ndarray) -> None:
        """The step itself, on validated non-empty arrays."""


class SGD(SparseOptimizer):
    """No state."""

    config: SGDConfig

    def state_width(self, dim: int) -> int:
        return 0

    def _apply(self, values: np.ndarray, state: np.ndarray, grads: np.ndarray) -> None:
        _sgd_kernel(values, grads, self.config.learning_rate)


class Adagrad(SparseOptimizer):
    """State columns ``[accumulator (dim)]``, starting at ``initial_accumulator``."""

    config: AdagradConfig

    def state_width(self, dim: int) -> int:
        return dim

    def init_state(self, n: int, dim: int) -> np.ndarray:
        return np.full((n, dim), self.config.initial_accumulator, np.float32)

    def _apply(self, values: np.ndarray, state: np.ndarray, grads: np.ndarray) -> None:
        _adagrad_kernel(values, state, grads, self.config.learning_rate, self.config.eps)


class RowwiseAdagrad(SparseOptimizer):
    """State column ``[accumulator (1)]``, starting at ``initial_accumulator``."""

    config: RowwiseAdagradConfig

    def state_width(self, dim: int) -> int:
        return 1

    def init_state(self, n: int, dim: int) -> np.ndarray:
        return np.full((n, 1), self.config.initial_accumulator, np.float32)

    def _apply(self, values: np.ndarray, state: np.ndarray, grads: np.ndarray) -> None:
        _rowwise_adagrad_kernel(values, state, grads, self.config.learning_rate, self.config.eps)


class FTRL(SparseOptimizer):
    """State columns ``[z (dim) | n (dim)]``; see ``FTRLConfig`` for how the initial value is kept."""

    config: FTRLConfig

    def state_width(self, dim: int) -> int:
        return 2 * dim

    def _apply(self, values: np.ndarray, state: np.ndarray, grads: np.ndarray) -> None:
        c = self.config
        _ftrl_kernel(values, state, grads, c.alpha, c.beta, c.l1, c.l2)


class Adam(SparseOptimizer):
    """State columns ``[m (dim) | v (dim) | step (1)]``; every row passed to ``apply`` takes one step."""

    config: AdamConfig

    def state_width(self, dim: int) -> int:
        return 2 * dim + 1

    def _apply(self, values: np.ndarray, state: np.ndarray, grads: np.ndarray) -> None:
        c = self.config
        _adam_kernel(values, state, grads, c.learning_rate, c.beta1, c.beta2, c.eps)


_OPTIMIZERS: dict[type, type[SparseOptimizer]] = {
    SGDConfig: SGD,
    AdagradConfig: Adagrad,
    RowwiseAdagradConfig: RowwiseAdagrad,
    FTRLConfig: FTRL,
    AdamConfig: Adam,
}


def make_optimizer(config: OptimizerConfig) -> SparseOptimizer:
    """The optimizer for a config; TypeError for anything that is not an ``OptimizerConfig``."""
    cls = _OPTIMIZERS.get(type(config))
    if cls is None:
        raise TypeError(f"not an optimizer config: {config!r}")
    return cls(config)


def optimizer_from_dict(d: dict[str, Any]) -> OptimizerConfig:
    """Config from ``{"name": ..., **fields}``, e.g. ``{"name": "adagrad", "learning_rate": 0.1}``.

    Raises:
        ValueError: no name, an unknown name, an unknown key, a value that is not a number, or a
            value the config rejects; the message names the offender.
    """
    fields = dict(d)
    name = fields.pop("name", None)
    if name is None:
        raise ValueError(f"optimizer needs a 'name', one of {sorted(_BY_NAME)}")
    cls = _BY_NAME.get(name)
    if cls is None:
        raise ValueError(f"unknown optimizer name {name!r}; expected one of {sorted(_BY_NAME)}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ValueError(f"unknown key(s) {unknown} for optimizer {name!r}; expected some of {sorted(known)}")
    kwargs = {}
    for key, value in fields.items():
        # Every setting is a float; accepting strings lets the dict come straight from an env var or JSON.
        try:
            kwargs[key] = float(value)
        except (TypeError, ValueError) as e:
            raise ValueError(f"optimizer {name!r} setting {key}={value!r} is not a number") from e
    return cls(**kwargs)


def optimizer_to_dict(config: OptimizerConfig) -> dict[str, Any]:
    """Inverse of ``optimizer_from_dict``."""
    name = next(k for k, v in _BY_NAME.items() if v is type(config))
    return {"name": name, **dataclasses.asdict(config)}
