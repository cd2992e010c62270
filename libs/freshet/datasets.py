"""Public recommendation datasets as time-ordered impression and click events.

``read_events(fmt, path)`` turns a dataset file into ``Impression`` and ``Action`` messages in
non-decreasing event-time order, ready for ``freshet.replay``. Rules shared by every format:

- One impression per shown item; its ``request_id`` is ``"<prefix>:<line>"`` with the 1-based line
  of the file, so ids are unique within a file and equal on every read.
- A positive label becomes a click: an ``Action`` with the impression's request and item,
  ``ACTION_TYPE_CLICK``, value 1 and event time = impression time + 1 ms (well inside the joiner's
  window). Clicks are emitted after every impression of their millisecond.
- Formats whose files are not time-ordered (MovieLens, MIND) are read whole and sorted by event
  time, stably, so equal times keep file order (the rows are held in memory, ~200 bytes each for
  MovieLens; ``limit`` reads only the first rows of the file). The others are streamed, and a row
  going back in time is an error.
- String ids become int64 through ``stable_id``: blake2b-64 of the UTF-8 text, top bit cleared.
- A malformed row raises ``DatasetError`` naming the file, the 1-based line and the problem, after
  every event of the rows before it (streamed formats; sorted ones fail before the first event).

How each format maps (``ctx`` = ``Impression.context``, absent values are left out):

============  =========================================  =============================================
format        ids, position, event time                  click and context
============  =========================================  =============================================
movielens     u.data (tab, no header), ratings.csv       click: rating >= 4. ctx: none (the rating is
              (``userId,movieId,rating,timestamp``) or   the label, so it must not be a feature), but
              ratings.dat (``::``); ids as in the file;  for u.data with ``u.user`` / ``u.item``
              position 0; time = timestamp * 1000.       beside it (ml-100k): the user's age (ML-1M
                                                         buckets), gender, occupation, zip_region
                                                         (first zip character); per genre of the
                                                         movie ``genre_<name>`` = "1"; its
                                                         release_decade ("1990s"); absent ids get
                                                         none. Only rated items are impressions:
                                                         there are no unrated negatives.
mind          behaviors.tsv; user/item = stable_id of    click: ``-1`` candidates. ctx: history_len
              ``U..``/``N..``; position = index in the   (log2 bucket of the clicked-history length).
              impression list; time read as UTC.
criteo        Kaggle train TSV (label, I1..I13,          click: label 1. ctx: I1..I13 as
              C1..C26); no user or item: both 0;         ``log2_bucket`` strings, C1..C26 as given.
              position 0; no timestamp: time =
              ``CRITEO_BASE_MS`` + (line - 1) ms.
avazu         CSV with header; user = stable_id of       click: click 1. ctx: every other column
              device_id, or of device_ip+device_model    (C1, site_*, app_*, device_* but device_id
              for the anonymous ``a99f214a``; item =     and device_ip, C14..C21) plus hour_of_day and
              stable_id of app_id, or of site_id for     weekday.
              the no-app ``ecad2386``; position =
              banner_pos; time = hour (UTC) + k ms for
              the row's k-th row of that hour.
openbandit    Open Bandit CSV; user = stable_id of the   click: click 1. ctx: user_feature_0..3,
              four user features; item = item_id;        user_item_affinity (the row's affinity for
              position = position - 1 (1-based in the    the shown item) and item_feature_* from an
              file); time = timestamp (UTC if naive).    item_context.csv next to the file.
============  =========================================  =============================================
"""

from __future__ import annotations

import gzip
import hashlib
import itertools
import os
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from operator import itemgetter
from pathlib import Path
from typing import Any, TextIO

from freshet.events.v1 import events_pb2

Event = events_pb2.Impression | events_pb2.Action
# (event_time_ms, line, payload): one data row; the payload is whatever the format's build needs.
Row = tuple[int, int, Any]
Lines = Iterator[tuple[int, str]]

# Criteo rows carry no time; they are replayed 1 ms apart from 2014-01-01T00:00:00Z.
CRITEO_BASE_MS = 1_388_534_400_000
_INT63 = (1 << 63) - 1
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MS = timedelta(milliseconds=1)


class DatasetError(ValueError):
    """A dataset cannot be read: the message names the file, the 1-based line and the problem.

    Attributes:
        path: the file (None when no file is concerned, e.g. an unknown format).
        line: the 1-based line, None for a problem with the whole file.
        problem: what is wrong.
    """

    def __init__(self, path: str | Path | None, line: int | None, problem: str) -> None:
        self.path, self.line, self.problem = None if path is None else str(path), line, problem
        where = "" if path is None else f"{path}:{line}: " if line is not None else f"{path}: "
        super().__init__(where + problem)


def stable_id(value: str) -> int:
    """A non-negative int64 for a string id, equal in every process: blake2b-64 (little endian) & (2**63 - 1)."""
    return int.from_bytes(hashlib.blake2b(value.encode(), digest_size=8).digest(), "little") & _INT63


def log2_bucket(value: int) -> str:
    """Bucket of an integer count as text: ``floor(log2(v + 1))`` for v >= 0; negatives keep their value."""
    return str((value + 1).bit_length() - 1) if value >= 0 else str(value)


@dataclass(frozen=True)
class Format:
    """A dataset format.

    Attributes:
        name: the name ``read_events`` and ``freshet replay`` take.
        prefix: request ids are ``<prefix>:<line>``.
        summary: one line for ``--help``.
        files: file names looked for when the path is a directory.
        ordered: the files are time-ordered and streamed; otherwise read whole and sorted.
        rows: ``rows(path, lines)`` parses ``(line, text)`` pairs (blank lines skipped) into rows.
        build: ``build(time_ms, request_id, payload)`` -> ``[(impression, clicked), ...]``.
    """

    name: str
    prefix: str
    summary: str
    files: tuple[str, ...]
    ordered: bool
    rows: Callable[[str, Lines], Iterator[Row]]
    build: Callable[[int, str, Any], list[tuple[events_pb2.Impression, bool]]]


def _int(path: str, line: int, what: str, text: str, minimum: int | None = 0) -> int:
    try:
        value = int(text)
    except ValueError:
        raise DatasetError(path, line, f"{what} {text!r} is not an integer") from None
    if minimum is not None and value < minimum:
        raise DatasetError(path, line, f"{what} {value} is below {minimum}")
    return value


def _label(path: str, line: int, what: str, text: str) -> bool:
    if text not in ("0", "1"):
        raise DatasetError(path, line, f"{what} {text!r} is not 0 or 1")
    return text == "1"


def _fields(path: str, line: int, text: str, sep: str, n: int, layout: str) -> list[str]:
    parts = text.split(sep)
    if len(parts) != n:
        raise DatasetError(path, line, f"expected {n} {sep!r}-separated fields ({layout}), got {len(parts)}")
    return parts


def _header(path: str, lines: Lines, sep: str, required: tuple[str, ...]) -> tuple[list[str], dict[str, int]]:
    first = next(lines, None)
    if first is None:
        raise DatasetError(path, None, "empty file: expected a header line")
    names = first[1].split(sep)
    missing = [name for name in required if name not in names]
    if missing:
        raise DatasetError(path, first[0], f"header lacks column(s) {', '.join(missing)}: {first[1][:200]!r}")
    return names, {name: i for i, name in enumerate(names)}


# Payload of the formats with one impression per row: (user, item, position, clicked, context or None).
Single = tuple[int, int, int, bool, dict[str, str] | None]


def _impression(request_id: str, user: int, item: int, position: int, time_ms: int, context=None):
    return events_pb2.Impression(
        request_id=request_id,
        user_id=user,
        item_id=item,
        position=position,
        event_time_ms=time_ms,
        context=context,
    )


def _single_build(time_ms: int, request_id: str, payload: Single):
    user, item, position, clicked, context = payload
    return [(_impression(request_id, user, item, position, time_ms, context), clicked)]


# --- MovieLens -----------------------------------------------------------------------------------


_MOVIELENS_GENRES = (
    "unknown", "action", "adventure", "animation", "children", "comedy", "crime", "documentary", "drama",
    "fantasy", "film_noir", "horror", "musical", "mystery", "romance", "sci_fi", "thriller", "war", "western",
)  # fmt: skip
_MOVIELENS_AGES = ((18, "<18"), (25, "18-24"), (35, "25-34"), (45, "35-44"), (50, "45-49"), (56, "50-55"))


def _movielens_age(age: int) -> str:
    """The MovieLens-1M age bucket of an age in years (``56+`` past the last bound)."""
    return next((name for bound, name in _MOVIELENS_AGES if age < bound), "56+")


def _movielens_side(path: Path) -> tuple[dict[int, dict[str, str]], dict[int, dict[str, str]]]:
    """(user id -> context, item id -> context) from the ``u.user`` and ``u.item`` beside ``u.data``.

    Either map is empty when its file is absent. Both files are ``|``-separated Latin-1.
    """
    users: dict[int, dict[str, str]] = {}
    items: dict[int, dict[str, str]] = {}
    user_file, item_file = path.with_name("u.user"), path.with_name("u.item")
    if user_file.is_file():
        with open(user_file, encoding="latin-1", newline="") as fh:
            for line, text in _numbered(fh, str(user_file)):
                user, age, gender, occupation, zip_code = _fields(
                    str(user_file), line, text, "|", 5, "user_id age gender occupation zip"
                )
                users[_int(str(user_file), line, "user id", user)] = {
                    "age": _movielens_age(_int(str(user_file), line, "age", age)),
                    "gender": gender,
                    "occupation": occupation,
                    "zip_region": zip_code[:1],
                }
    if item_file.is_file():
        n = 5 + len(_MOVIELENS_GENRES)
        with open(item_file, encoding="latin-1", newline="") as fh:
            for line, text in _numbered(fh, str(item_file)):
                parts = _fields(
                    str(item_file),
                    line,
                    text,
                    "|",
                    n,
                    "movie_id title release_date video_release_date url 19 genres",
                )
                context = {
                    f"genre_{g}": "1" for g, flag in zip(_MOVIELENS_GENRES, parts[5:], strict=True) if flag == "1"
                }
                year = parts[2][-4:]
                if year.isdigit():
                    context["release_decade"] = year[:3] + "0s"
                items[_int(str(item_file), line, "movie id", parts[0])] = context
    return users, items


def _movielens_rows(path: str, lines: Lines) -> Iterator[Row]:
    first = next(lines, None)
    if first is None:
        return
    head: tuple[tuple[int, str], ...] = (first,)
    users: dict[int, dict[str, str]] = {}
    items: dict[int, dict[str, str]] = {}
    if first[1].startswith("userId"):  # ratings.csv of ml-latest / ml-20m / ml-25m
        if first[1] != "userId,movieId,rating,timestamp":
            raise DatasetError(
                path, first[0], f"expected header 'userId,movieId,rating,timestamp', got {first[1]!r}"
            )
        sep, head = ",", ()
    else:
        sep = "::" if "::" in first[1] else "\t"
        if sep == "\t":  # ml-100k: demographics and genres beside u.data
            users, items = _movielens_side(Path(path.removesuffix(".gz")))
    for line, text in itertools.chain(head, lines):
        user, item, rating, stamp = _fields(path, line, text, sep, 4, "user item rating timestamp")
        try:
            stars = float(rating)
        except ValueError:
            raise DatasetError(path, line, f"rating {rating!r} is not a number") from None
        if not 0.0 <= stars <= 10.0:
            raise DatasetError(path, line, f"rating {rating!r} is outside [0, 10]")
        user_id, item_id = _int(path, line, "user id", user), _int(path, line, "item id", item)
        context = (users.get(user_id, {}) | items.get(item_id, {})) or None
        yield (_int(path, line, "timestamp", stamp) * 1000, line, (user_id, item_id, 0, stars >= 4.0, context))


# --- MIND ----------------------------------------------------------------------------------------


def _mind_time_ms(text: str) -> int:
    """``11/15/2019 8:55:22 AM`` (read as UTC) -> unix ms; ValueError when it is not that shape."""
    day, clock, half = text.split(" ")
    month, mday, year = day.split("/")
    hour, minute, second = (int(part) for part in clock.split(":"))
    if not 1 <= hour <= 12 or half not in ("AM", "PM"):
        raise ValueError(text)
    hour = hour % 12 + (12 if half == "PM" else 0)
    return (datetime(int(year), int(month), int(mday), hour, minute, second, tzinfo=UTC) - _EPOCH) // _MS


def _mind_candidates(text: str) -> list[tuple[str, bool]]:
    return [(news, label == "1") for news, _, label in (token.rpartition("-") for token in text.split())]


def _mind_rows(path: str, lines: Lines) -> Iterator[Row]:
    for line, text in lines:
        _, user, stamp, history, impressions = _fields(
            path, line, text, "\t", 5, "impression_id user_id time history impressions"
        )
        try:
            time_ms = _mind_time_ms(stamp)
        except ValueError:
            raise DatasetError(path, line, f"time {stamp!r} is not like '11/15/2019 8:55:22 AM'") from None
        if not user:
            raise DatasetError(path, line, "empty user_id")
        tokens = impressions.split()
        if not tokens:
            raise DatasetError(path, line, "no impressions")
        for token in tokens:
            news, dash, label = token.rpartition("-")
            if not dash or not news or label not in ("0", "1"):
                raise DatasetError(
                    path, line, f"impression {token!r} is not <news id>-<0|1> (unlabelled test set?)"
                )
        # The candidates are parsed again after the sort: keeping their text is far smaller than tuples.
        yield time_ms, line, (user, len(history.split()), impressions)


def _mind_build(time_ms: int, request_id: str, payload: tuple[str, int, str]):
    user, history_len, impressions = payload
    user_id, context = stable_id(user), {"history_len": log2_bucket(history_len)}
    return [
        (_impression(request_id, user_id, stable_id(news), position, time_ms, context), clicked)
        for position, (news, clicked) in enumerate(_mind_candidates(impressions))
    ]


# --- Criteo --------------------------------------------------------------------------------------

_CRITEO_INTS = tuple(f"I{k}" for k in range(1, 14))
_CRITEO_CATS = tuple(f"C{k}" for k in range(1, 27))


def _criteo_rows(path: str, lines: Lines) -> Iterator[Row]:
    for line, text in lines:
        parts = _fields(path, line, text, "\t", 40, "label, I1..I13, C1..C26")
        context = {}
        for name, value in zip(_CRITEO_INTS, parts[1:14], strict=True):
            if value:
                context[name] = log2_bucket(_int(path, line, name, value, minimum=None))
        for name, value in zip(_CRITEO_CATS, parts[14:], strict=True):
            if value:
                context[name] = value
        yield CRITEO_BASE_MS + line - 1, line, (0, 0, 0, _label(path, line, "label", parts[0]), context)


# --- Avazu ---------------------------------------------------------------------------------------

_AVAZU_ANONYMOUS_DEVICE = "a99f214a"  # device_id of most rows: no device id known
_AVAZU_NO_APP = "ecad2386"  # app_id of site traffic
_AVAZU_NOT_CONTEXT = {"id", "click", "hour", "banner_pos", "device_id", "device_ip"}
_HOUR_MS = 3_600_000


def _avazu_hour(text: str) -> datetime:
    """``14102100`` -> 2014-10-21 00:00 UTC (strptime would also take ``141021``)."""
    if len(text) != 8 or not text.isdigit():
        raise ValueError(text)
    return datetime(2000 + int(text[:2]), int(text[2:4]), int(text[4:6]), int(text[6:]), tzinfo=UTC)


def _avazu_rows(path: str, lines: Lines) -> Iterator[Row]:
    required = ("click", "hour", "banner_pos", "site_id", "app_id", "device_id", "device_ip", "device_model")
    names, col = _header(path, lines, ",", required)
    click, hour, pos = col["click"], col["hour"], col["banner_pos"]
    app, site, device, ip, model = (
        col[n] for n in ("app_id", "site_id", "device_id", "device_ip", "device_model")
    )
    context_cols = [(name, i) for i, name in enumerate(names) if name not in _AVAZU_NOT_CONTEXT]
    last_hour, hour_ms, in_hour, when = "", 0, 0, {}
    for line, text in lines:
        parts = _fields(path, line, text, ",", len(names), f"{len(names)} columns of the header")
        if parts[hour] != last_hour:
            try:
                stamp = _avazu_hour(parts[hour])
            except ValueError:
                raise DatasetError(path, line, f"hour {parts[hour]!r} is not YYMMDDHH") from None
            last_hour, hour_ms, in_hour = parts[hour], (stamp - _EPOCH) // _MS, 0
            when = {"hour_of_day": f"{stamp.hour:02d}", "weekday": str(stamp.weekday())}
        # Rows of one hour are spread 1 ms apart in file order (capped at the hour's last ms).
        time_ms = hour_ms + min(in_hour, _HOUR_MS - 1)
        in_hour += 1
        if parts[device] != _AVAZU_ANONYMOUS_DEVICE:
            user = stable_id(f"device_id:{parts[device]}")
        else:
            user = stable_id(f"device_ip:{parts[ip]}:{parts[model]}")
        if parts[app] != _AVAZU_NO_APP:
            item = stable_id(f"app_id:{parts[app]}")
        else:
            item = stable_id(f"site_id:{parts[site]}")
        context = {name: parts[i] for name, i in context_cols if parts[i]} | when
        clicked = _label(path, line, "click", parts[click])
        yield time_ms, line, (user, item, _int(path, line, "banner_pos", parts[pos]), clicked, context)


# --- Open Bandit ---------------------------------------------------------------------------------


def _obd_item_context(path: Path) -> dict[int, dict[str, str]]:
    """item_id -> item features from ``item_context.csv`` next to the log, if there is one."""
    file = path.with_name("item_context.csv")
    if not file.is_file():
        return {}
    with _open(file) as fh:
        lines = _numbered(fh, str(file))
        names, col = _header(str(file), lines, ",", ("item_id",))
        features = [(name, i) for i, name in enumerate(names) if name.startswith("item_feature_")]
        items = {}
        for line, text in lines:
            parts = _fields(str(file), line, text, ",", len(names), f"{len(names)} columns of the header")
            item = _int(str(file), line, "item_id", parts[col["item_id"]])
            items[item] = {name: parts[i] for name, i in features if parts[i]}
        return items


def _obd_rows(path: str, lines: Lines) -> Iterator[Row]:
    item_context = _obd_item_context(Path(path))
    names, col = _header(path, lines, ",", ("timestamp", "item_id", "position", "click"))
    stamp_col, item_col, pos_col, click_col = (col[n] for n in ("timestamp", "item_id", "position", "click"))
    users = [i for i, name in enumerate(names) if name.startswith("user_feature_")]
    for line, text in lines:
        parts = _fields(path, line, text, ",", len(names), f"{len(names)} columns of the header")
        try:
            stamp = datetime.fromisoformat(parts[stamp_col])
        except ValueError:
            raise DatasetError(path, line, f"timestamp {parts[stamp_col]!r} is not an ISO date and time") from None
        if stamp.tzinfo is None:
            stamp = stamp.replace(tzinfo=UTC)
        item = _int(path, line, "item_id", parts[item_col])
        position = _int(path, line, "position", parts[pos_col], minimum=1) - 1  # 1-based in the file
        context = {names[i]: parts[i] for i in users if parts[i]}
        affinity = col.get(f"user-item_affinity_{item}")
        if affinity is not None and parts[affinity]:
            context["user_item_affinity"] = parts[affinity]
        context |= item_context.get(item, {})
        user = stable_id("|".join(parts[i] for i in users))
        clicked = _label(path, line, "click", parts[click_col])
        yield (stamp - _EPOCH) // _MS, line, (user, item, position, clicked, context)


FORMATS: dict[str, Format] = {
    spec.name: spec
    for spec in (
        Format(
            name="movielens",
            prefix="ml",
            summary="MovieLens u.data / ratings.csv / ratings.dat, rating >= 4 is a click",
            files=("u.data", "ratings.csv", "ratings.dat"),
            ordered=False,
            rows=_movielens_rows,
            build=_single_build,
        ),
        Format(
            name="mind",
            prefix="mind",
            summary="MIND behaviors.tsv, one request per impression log, -1 candidates are clicks",
            files=("behaviors.tsv",),
            ordered=False,
            rows=_mind_rows,
            build=_mind_build,
        ),
        Format(
            name="criteo",
            prefix="criteo",
            summary="Criteo Kaggle TSV (label, I1..I13, C1..C26), rows 1 ms apart",
            files=("train.txt",),
            ordered=True,
            rows=_criteo_rows,
            build=_single_build,
        ),
        Format(
            name="avazu",
            prefix="avazu",
            summary="Avazu CSV with header (id,click,hour,...), rows of an hour 1 ms apart",
            files=("train.csv", "train"),
            ordered=True,
            rows=_avazu_rows,
            build=_single_build,
        ),
        Format(
            name="openbandit",
            prefix="obd",
            summary="Open Bandit Dataset CSV (,timestamp,item_id,position,click,...)",
            files=("all.csv", "men.csv", "women.csv"),
            ordered=True,
            rows=_obd_rows,
            build=_single_build,
        ),
    )
}


def _open(path: Path) -> TextIO:
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8", newline="")
    return open(path, encoding="utf-8", newline="")


def _numbered(fh: TextIO, path: str) -> Lines:
    """``(line, text)`` for every non-blank line, 1-based, without the line break."""
    line = 0
    try:
        for line, text in enumerate(fh, 1):
            text = text.rstrip("\r\n")  # only the break: Criteo rows may end in empty tab-separated fields
            if text.strip():
                yield line, text
    except UnicodeDecodeError as exc:  # decoded in chunks: the line is only known roughly
        raise DatasetError(path, line + 1, f"not UTF-8 text (on this line or a later one): {exc.reason}") from None


def resolve(fmt: str, path: str | Path) -> tuple[Format, Path]:
    """The format and the file to read; a directory is searched for the format's usual file names.

    Raises:
        DatasetError: unknown format (the message lists the known ones), or no such file.
    """
    spec = FORMATS.get(fmt)
    if spec is None:
        raise DatasetError(
            None, None, f"unknown dataset format {fmt!r}; known formats: {', '.join(sorted(FORMATS))}"
        )
    file = Path(path)
    if file.is_dir():
        found = [file / name for name in spec.files if (file / name).is_file()]
        if not found:
            raise DatasetError(path, None, f"is a directory without any of {', '.join(spec.files)}")
        file = found[0]
    if not file.is_file():
        raise DatasetError(path, None, "no such file")
    if not os.access(file, os.R_OK):
        raise DatasetError(path, None, "not readable")
    return spec, file


def read_events(fmt: str, path: str | Path, *, limit: int | None = None) -> Iterator[Event]:
    """The events of a dataset file, in non-decreasing event-time order.

    The format and the file are checked at once; the rows are read as the iterator is consumed
    (all of them before the first event for formats that need sorting).

    Args:
        fmt: a name in ``FORMATS``.
        path: the file, or a directory holding one of the format's usual file names; ``.gz`` is read
            compressed.
        limit: read at most this many data rows (lines) of the file; rows, not events: a MIND row
            gives one impression per candidate.

    Raises:
        DatasetError: unknown format or no such file (at once); a malformed row (while iterating).
    """
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    spec, file = resolve(fmt, path)
    return _events(spec, file, limit)


def _events(spec: Format, file: Path, limit: int | None) -> Iterator[Event]:
    name = str(file)
    with _open(file) as fh:
        rows = itertools.islice(spec.rows(name, _numbered(fh, name)), limit)
        if spec.ordered:
            rows = _in_order(name, rows)
        else:
            rows = iter(sorted(rows, key=itemgetter(0)))  # stable: equal times keep file order
        pending: deque[events_pb2.Action] = deque()  # clicks wait for the impressions of their ms
        prefix = spec.prefix
        try:
            for time_ms, line, payload in rows:
                while pending and pending[0].event_time_ms <= time_ms:
                    yield pending.popleft()
                for impression, clicked in spec.build(time_ms, f"{prefix}:{line}", payload):
                    yield impression
                    if clicked:
                        pending.append(
                            events_pb2.Action(
                                request_id=impression.request_id,
                                item_id=impression.item_id,
                                type=events_pb2.ACTION_TYPE_CLICK,
                                value=1.0,
                                event_time_ms=time_ms + 1,
                            )
                        )
        except DatasetError:
            yield from pending  # every event of the rows before the bad one, then the error
            raise
        yield from pending


def _in_order(path: str, rows: Iterator[Row]) -> Iterator[Row]:
    last = None
    for row in rows:
        if last is not None and row[0] < last:
            raise DatasetError(
                path,
                row[1],
                f"event time {row[0]} ms is before the previous row's {last} ms; the file must be sorted",
            )
        last = row[0]
        yield row


def dataset_samples(fmt: str, path: str | Path, batch_size: int, *, limit: int | None = None) -> Iterator:
    """Labelled training samples of a dataset, in event-time order, as ``SampleArrays`` of ``batch_size``.

    The offline equivalent of the joiner for a dataset whose labels are known: every impression is one
    version-1 sample labelled by whether a click on it follows, featurised exactly as the joiner does
    (``freshet.fids.batch_example_fids``). Used by the trainer to train on a file before the stream.
    """
    import numpy as np

    from freshet.batches import featurise

    pending: dict[tuple[str, int], list] = {}  # key -> [impression, clicked]
    ready: list[list] = []

    def emit(rows: list[list]):
        imps = [row[0] for row in rows]
        n = len(imps)
        vectors = np.zeros((n, 4), np.float32)
        vectors[:, 0] = [1.0 if row[1] else 0.0 for row in rows]
        return featurise(
            imps,
            [tuple(sorted(i.context.items())) for i in imps],
            vectors,
            np.ones(n, np.float32),
            [f"{i.request_id}:{i.item_id}:v1" for i in imps],
            np.ones(n, np.int32),
        )

    for event in read_events(fmt, path, limit=limit):
        key = (event.request_id, event.item_id)
        if isinstance(event, events_pb2.Impression):
            # Clicks follow their impression within a millisecond: older impressions are final.
            for old_key in [k for k, row in pending.items() if row[0].event_time_ms < event.event_time_ms - 1]:
                ready.append(pending.pop(old_key))
            pending[key] = [event, False]
        elif key in pending:
            pending[key][1] = True
        while len(ready) >= batch_size:
            yield emit(ready[:batch_size])
            del ready[:batch_size]
    ready.extend(pending.values())
    for start in range(0, len(ready), batch_size):
        yield emit(ready[start : start + batch_size])
