"""A deterministic synthetic source of recommendation traffic: impressions, delayed clicks and the truth.

Each user and item has a latent vector; an impression at position ``pos`` is clicked with probability
``position_bias[pos] * sigmoid(a + u.v + item_bias + device_logit)``, where the intercept ``a`` is
calibrated at start-up so the overall click rate hits ``target_ctr``. Users' vectors random-walk a
little every time they are seen and brand-new items keep arriving, so a model trained once goes
stale: exactly the situation online learning is for. Everything is drawn from one
``numpy.random.default_rng(seed)``, so the same config and the same ``now_ms`` sequence replay
byte-identical traffic.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import numpy as np

from freshet.events.v1 import events_pb2

logger = logging.getLogger(__name__)

# Enough (user, item, position) draws that the calibrated CTR is within a few tenths of a percent.
_CALIBRATION_SAMPLES = 50_000


@dataclass(frozen=True)
class SyntheticConfig:
    """Shape of the synthetic traffic.

    Attributes:
        seed: Seed of the single random generator; equal seeds give equal traffic.
        n_users: Number of users, with ids ``0..n_users-1``.
        n_items: Number of items at start; new items get ids from ``n_items`` upwards.
        dim: Dimension of the latent user and item vectors.
        items_per_request: Distinct items shown per request, at positions ``0..items_per_request-1``.
        new_item_prob: Probability that a request shows a brand-new item.
        drift_std: Per-dimension std of the step a user's latent vector takes each time the user
            is seen; the walk is mean-reverting so the CTR calibration holds over time.
        user_skew: Zipf exponent of user activity (larger: a few users make most requests).
        item_skew: Zipf exponent of item popularity.
        position_bias: Examination probability per position; position 0 is looked at most.
        target_ctr: Overall click rate on impressions the intercept is calibrated to.
        interest_std: Std of the user-item affinity ``u.v``; larger means more learnable signal.
        item_bias_std: Std of the per-item logit bias (some items are simply better).
        click_delay_ms: Inclusive range of a click's delay after its impression.
        devices: Values of the ``device`` context feature.
        device_logit: Logit offset per device, same order as ``devices``.
        device_loyalty: Probability that a request comes from the user's usual device.
    """

    seed: int = 7
    n_users: int = 2000
    n_items: int = 400
    dim: int = 8
    items_per_request: int = 5
    new_item_prob: float = 0.02
    drift_std: float = 0.05
    user_skew: float = 0.9
    item_skew: float = 0.8
    position_bias: tuple[float, ...] = (1.0, 0.75, 0.55, 0.45, 0.35)
    target_ctr: float = 0.04
    interest_std: float = 1.3
    item_bias_std: float = 0.5
    click_delay_ms: tuple[int, int] = (50, 1500)
    devices: tuple[str, ...] = ("ios", "android", "web")
    device_logit: tuple[float, ...] = (0.2, 0.0, -0.3)
    device_loyalty: float = 0.8

    def __post_init__(self) -> None:
        if self.n_users < 1 or self.n_items < 2 * self.items_per_request or self.items_per_request < 1:
            raise ValueError("need n_users >= 1 and n_items >= 2 * items_per_request >= 2")
        if len(self.position_bias) < self.items_per_request:
            raise ValueError(f"position_bias has {len(self.position_bias)} entries, need {self.items_per_request}")
        if len(self.device_logit) != len(self.devices) or not self.devices:
            raise ValueError("devices and device_logit must be non-empty and of equal length")
        if not 0 < self.target_ctr < min(self.position_bias[: self.items_per_request]):
            raise ValueError(f"target_ctr {self.target_ctr} is not reachable with the given position_bias")
        if not 0 <= self.click_delay_ms[0] <= self.click_delay_ms[1]:
            raise ValueError(f"click_delay_ms {self.click_delay_ms} is not a valid range")


@dataclass(slots=True)
class Request:
    """One served request: what was shown, what will be clicked and the truth behind it.

    Attributes:
        request_id: Deterministic id, ``f"r{seed}-{counter}"``.
        user_id: The requesting user.
        impressions: One impression per position, all with the request's ``now_ms`` as event time.
        clicks: ``(delay_ms, action)`` for each clicked impression; ``action.event_time_ms`` is
            the impression time plus ``delay_ms``.
        truth: True click probability of each impression, same order as ``impressions``.
        clicked: Whether each impression was clicked, same order as ``impressions``.
    """

    request_id: str
    user_id: int
    impressions: list[events_pb2.Impression] = field(default_factory=list)
    clicks: list[tuple[int, events_pb2.Action]] = field(default_factory=list)
    truth: list[float] = field(default_factory=list)
    clicked: list[bool] = field(default_factory=list)


def _zipf_weights(n: int, skew: float, rng: np.random.Generator) -> np.ndarray:
    # Ranks are shuffled over ids so popularity is not simply "small id = popular".
    return (1.0 / np.arange(1, n + 1, dtype=np.float64) ** skew)[rng.permutation(n)]


class SyntheticSource:
    """Generates requests with delayed clicks from a drifting latent-factor click model.

    Attributes:
        requests: Requests served so far.
        impressions: Impressions served so far.
        clicks: Clicks generated so far.
        new_items: Brand-new items introduced so far.
    """

    def __init__(self, config: SyntheticConfig | None = None) -> None:
        self.config = config = config or SyntheticConfig()
        self._rng = rng = np.random.default_rng(config.seed)
        # Per-dimension std s with dim * s**4 = interest_std**2, so u.v has std interest_std.
        self._latent_std = (config.interest_std**2 / config.dim) ** 0.25
        # Shrinking before each step keeps the walk's variance at latent_std**2 forever.
        self._drift_keep = math.sqrt(max(0.0, 1.0 - (config.drift_std / self._latent_std) ** 2))
        self._users = rng.normal(0.0, self._latent_std, (config.n_users, config.dim))
        self._user_cdf = np.cumsum(_zipf_weights(config.n_users, config.user_skew, rng))
        self._user_device = rng.integers(0, len(config.devices), config.n_users)
        self._rank_weights = _zipf_weights(config.n_items, config.item_skew, rng)
        self._items = rng.normal(0.0, self._latent_std, (config.n_items, config.dim))
        self._item_bias = rng.normal(0.0, config.item_bias_std, config.n_items)
        self._item_weights = self._rank_weights.copy()
        self._item_cdf = np.cumsum(self._item_weights)
        self._device_logit = np.asarray(config.device_logit, dtype=np.float64)
        self._position_bias = np.asarray(config.position_bias[: config.items_per_request], dtype=np.float64)
        self._intercept = self._calibrate()
        self.requests = 0
        self.impressions = 0
        self.clicks = 0
        self.new_items = 0
        logger.debug("synthetic source ready", extra={"intercept": self._intercept, "seed": config.seed})

    @property
    def n_items(self) -> int:
        """Items that exist now (initial plus new); ids are ``0..n_items-1``."""
        return len(self._item_bias)

    def click_probability(self, user_id: int, item_id: int, position: int, device: str | None = None) -> float:
        """The true click probability under the current state of the user and the item.

        Args:
            user_id: An existing user id.
            item_id: An existing item id.
            position: A position in ``0..items_per_request-1``.
            device: Device of the request; defaults to the user's usual device.

        Raises:
            ValueError: an id, position or device is unknown.
        """
        if not (0 <= user_id < self.config.n_users and 0 <= item_id < self.n_items):
            raise ValueError(f"unknown user {user_id} or item {item_id}")
        if not 0 <= position < self.config.items_per_request:
            raise ValueError(f"position {position} outside [0, {self.config.items_per_request})")
        if device is not None and device not in self.config.devices:
            raise ValueError(f"unknown device {device!r}, expected one of {self.config.devices}")
        dev = self._user_device[user_id] if device is None else self.config.devices.index(device)
        logit = self._intercept + self._users[user_id] @ self._items[item_id] + self._item_bias[item_id]
        return float(self._position_bias[position] / (1.0 + math.exp(-(logit + self._device_logit[dev]))))

    def next_request(self, now_ms: int) -> Request:
        """Serves one request at ``now_ms``: draws user, device and items, then decides the clicks."""
        cfg, rng, k = self.config, self._rng, self.config.items_per_request
        # One uniform block per request: user, device choice (2), new item (2), clicks (k).
        draws = rng.random(5 + k)
        user = int(np.searchsorted(self._user_cdf, draws[0] * self._user_cdf[-1], side="right"))
        user = min(user, cfg.n_users - 1)
        if draws[1] < cfg.device_loyalty:
            dev = int(self._user_device[user])
        else:
            dev = int(draws[2] * len(cfg.devices))
        # The user's interests move each time they show up, before they are served.
        u = self._users[user]
        u *= self._drift_keep
        u += rng.normal(0.0, cfg.drift_std, cfg.dim)

        items = self._sample_items(k - 1 if draws[3] < cfg.new_item_prob else k)
        if len(items) < k:
            items.insert(int(draws[4] * k), self._add_item())

        idx = np.asarray(items)
        logits = self._intercept + self._items[idx] @ u + self._item_bias[idx] + self._device_logit[dev]
        truth = self._position_bias / (1.0 + np.exp(-logits))
        clicked = draws[5:] < truth
        n_clicks = int(clicked.sum())
        lo, hi = cfg.click_delay_ms
        delays = rng.integers(lo, hi + 1, n_clicks).tolist() if n_clicks else []

        request_id = f"r{cfg.seed}-{self.requests}"
        context = {"device": cfg.devices[dev]}
        req = Request(request_id=request_id, user_id=user, truth=truth.tolist(), clicked=clicked.tolist())
        for pos, item in enumerate(items):
            req.impressions.append(
                events_pb2.Impression(
                    request_id=request_id,
                    user_id=user,
                    item_id=item,
                    position=pos,
                    event_time_ms=now_ms,
                    context=context,
                )
            )
        for pos, delay in zip(np.flatnonzero(clicked).tolist(), delays, strict=True):
            action = events_pb2.Action(
                request_id=request_id,
                item_id=items[pos],
                type=events_pb2.ACTION_TYPE_CLICK,
                value=1.0,
                event_time_ms=now_ms + delay,
            )
            req.clicks.append((delay, action))
        self.requests += 1
        self.impressions += k
        self.clicks += n_clicks
        return req

    def _sample_items(self, n: int) -> list[int]:
        """``n`` distinct item ids drawn by popularity (rejection on repeats, cheap as n << items)."""
        chosen: list[int] = []
        total = self._item_cdf[-1]
        while len(chosen) < n:
            picks = np.searchsorted(self._item_cdf, self._rng.random(2 * n) * total, side="right")
            for item in picks.tolist():
                if item not in chosen and item < len(self._item_cdf):
                    chosen.append(item)
                    if len(chosen) == n:
                        break
        return chosen

    def _add_item(self) -> int:
        """Creates a brand-new item with a fresh id and a popularity borrowed from a random rank."""
        rng, cfg = self._rng, self.config
        item = self.n_items
        self._items = np.vstack([self._items, rng.normal(0.0, self._latent_std, (1, cfg.dim))])
        self._item_bias = np.append(self._item_bias, rng.normal(0.0, cfg.item_bias_std))
        weight = self._rank_weights[rng.integers(0, len(self._rank_weights))]
        self._item_weights = np.append(self._item_weights, weight)
        self._item_cdf = np.cumsum(self._item_weights)
        self.new_items += 1
        return item

    def _calibrate(self) -> float:
        """The intercept whose expected CTR under traffic-weighted (user, item, position) is target_ctr."""
        cfg, rng, n = self.config, self._rng, _CALIBRATION_SAMPLES
        users = np.minimum(np.searchsorted(self._user_cdf, rng.random(n) * self._user_cdf[-1]), cfg.n_users - 1)
        items = np.minimum(np.searchsorted(self._item_cdf, rng.random(n) * self._item_cdf[-1]), cfg.n_items - 1)
        loyal = rng.random(n) < cfg.device_loyalty
        devices = np.where(loyal, self._user_device[users], rng.integers(0, len(cfg.devices), n))
        base = np.einsum("nd,nd->n", self._users[users], self._items[items]) + self._item_bias[items]
        base += self._device_logit[devices]
        examined = self._position_bias[rng.integers(0, cfg.items_per_request, n)]
        lo, hi = -20.0, 20.0
        # CTR is monotone in the intercept, so bisection converges without tuning.
        for _ in range(60):
            mid = 0.5 * (lo + hi)
            if np.mean(examined / (1.0 + np.exp(-(base + mid)))) < cfg.target_ctr:
                lo = mid
            else:
                hi = mid
        return 0.5 * (lo + hi)
