"""Tests of the dataset adapters on small synthetic files written in each dataset's exact format."""

from __future__ import annotations

import gzip
import hashlib
from datetime import UTC, datetime
from pathlib import Path

import pytest

from freshet.datasets import CRITEO_BASE_MS, FORMATS, DatasetError, log2_bucket, read_events, stable_id
from freshet.events.v1 import events_pb2
from freshet.testing import data_dir

CLICK = events_pb2.ACTION_TYPE_CLICK


def ms(*args: int) -> int:
    return int(datetime(*args, tzinfo=UTC).timestamp() * 1000)


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8", newline="")
    return path


def shape(events) -> list[tuple]:
    """Events as comparable tuples, after checking the order every adapter promises."""
    events = list(events)
    times = [e.event_time_ms for e in events]
    assert times == sorted(times), "events are not in non-decreasing event-time order"
    out = []
    for e in events:
        if isinstance(e, events_pb2.Impression):
            out.append(("imp", e.request_id, e.user_id, e.item_id, e.position, e.event_time_ms))
        else:
            assert (e.type, e.value) == (CLICK, 1.0)
            out.append(("click", e.request_id, e.item_id, e.event_time_ms))
    return out


def impressions(events) -> list[events_pb2.Impression]:
    return [e for e in events if isinstance(e, events_pb2.Impression)]


# --- MovieLens -----------------------------------------------------------------------------------


def test_movielens_u_data_is_sorted_by_time_and_rating_4_or_more_is_a_click(tmp_path):
    path = write(
        tmp_path / "u.data",
        "3\t10\t4\t900000002\n1\t20\t3\t900000001\n2\t30\t5\t900000001\n1\t10\t1\t900000000\n",
    )

    assert shape(read_events("movielens", path)) == [
        ("imp", "ml:4", 1, 10, 0, 900_000_000_000),
        ("imp", "ml:2", 1, 20, 0, 900_000_001_000),  # equal times keep file order
        ("imp", "ml:3", 2, 30, 0, 900_000_001_000),
        ("click", "ml:3", 30, 900_000_001_001),
        ("imp", "ml:1", 3, 10, 0, 900_000_002_000),
        ("click", "ml:1", 10, 900_000_002_001),
    ]
    assert all(not e.context for e in impressions(read_events("movielens", path)))


def test_movielens_u_user_and_u_item_beside_u_data_become_impression_context(tmp_path):
    path = write(tmp_path / "u.data", "1\t10\t5\t100\n2\t10\t2\t200\n1\t20\t4\t300\n")
    write(tmp_path / "u.user", "1|24|M|technician|85711\n2|61|F|other|K1A0B\n")
    genres = ["0"] * 19
    genres[1] = genres[5] = "1"  # action, comedy
    # Latin-1 title, as in ml-100k's u.item; item 20 has no release date.
    (tmp_path / "u.item").write_bytes(
        f"10|Caf\xe9 (1995)|01-Jan-1995||http://x|{'|'.join(genres)}\n".encode("latin-1")
        + f"20|Unknown||||{'|'.join(['1'] + ['0'] * 18)}\n".encode("latin-1")
    )

    contexts = [dict(e.context) for e in impressions(read_events("movielens", path))]

    user_1 = {"age": "18-24", "gender": "M", "occupation": "technician", "zip_region": "8"}
    assert contexts == [
        user_1 | {"genre_action": "1", "genre_comedy": "1", "release_decade": "1990s"},
        {"age": "56+", "gender": "F", "occupation": "other", "zip_region": "K"}
        | {"genre_action": "1", "genre_comedy": "1", "release_decade": "1990s"},
        user_1 | {"genre_unknown": "1"},
    ]


def test_movielens_ids_missing_from_u_user_get_only_item_context(tmp_path):
    path = write(tmp_path / "u.data", "7\t10\t5\t100\n")
    write(tmp_path / "u.user", "1|24|M|technician|85711\n")

    assert [dict(e.context) for e in impressions(read_events("movielens", path))] == [{}]


def test_movielens_malformed_u_user_names_its_file_and_line(tmp_path):
    path = write(tmp_path / "u.data", "1\t10\t5\t100\n")
    write(tmp_path / "u.user", "1|24|M|technician|85711\n2|61|F\n")

    with pytest.raises(DatasetError, match=r"u\.user:2: expected 5 '\|'-separated fields"):
        list(read_events("movielens", path))


def test_movielens_ratings_csv_has_half_stars_and_a_header(tmp_path):
    path = write(
        tmp_path / "ratings.csv",
        "userId,movieId,rating,timestamp\n1,31,2.5,1260759144\n1,1029,3.5,1260759179\n2,10,4.0,835355493\n",
    )

    assert shape(read_events("movielens", path)) == [
        ("imp", "ml:4", 2, 10, 0, 835_355_493_000),
        ("click", "ml:4", 10, 835_355_493_001),
        ("imp", "ml:2", 1, 31, 0, 1_260_759_144_000),
        ("imp", "ml:3", 1, 1029, 0, 1_260_759_179_000),
    ]


def test_movielens_ratings_dat_uses_double_colons(tmp_path):
    path = write(tmp_path / "ratings.dat", "1::1193::5::978300760\r\n1::661::3::978302109\r\n")

    assert shape(read_events("movielens", path)) == [
        ("imp", "ml:1", 1, 1193, 0, 978_300_760_000),
        ("click", "ml:1", 1193, 978_300_760_001),
        ("imp", "ml:2", 1, 661, 0, 978_302_109_000),
    ]


def test_clicks_follow_every_impression_of_their_millisecond(tmp_path):
    path = write(tmp_path / "u.data", "1\t1\t5\t100\n2\t2\t5\t100\n")

    assert [kind for kind, *_ in shape(read_events("movielens", path))] == ["imp", "imp", "click", "click"]


def test_a_directory_is_searched_for_the_usual_file_and_gzip_is_read(tmp_path):
    write(tmp_path / "ml" / "u.data", "1\t2\t5\t100\n")
    with gzip.open(tmp_path / "u.data.gz", "wt") as fh:
        fh.write("1\t2\t5\t100\n")

    expected = [("imp", "ml:1", 1, 2, 0, 100_000), ("click", "ml:1", 2, 100_001)]
    assert shape(read_events("movielens", tmp_path / "ml")) == expected
    assert shape(read_events("movielens", tmp_path / "u.data.gz")) == expected


def test_limit_reads_only_the_first_rows_of_the_file(tmp_path):
    path = write(tmp_path / "u.data", "1\t1\t1\t300\n2\t2\t1\t200\n3\t3\t1\t100\n")

    assert [e.request_id for e in read_events("movielens", path, limit=2)] == ["ml:2", "ml:1"]
    assert list(read_events("movielens", path, limit=0)) == []


def test_reading_twice_gives_identical_events(tmp_path):
    path = write(
        tmp_path / "u.data", "".join(f"{u}\t{u * 7 % 5}\t{u % 5 + 1}\t{1000 - u % 3}\n" for u in range(50))
    )

    first = [e.SerializeToString(deterministic=True) for e in read_events("movielens", path)]
    assert first == [e.SerializeToString(deterministic=True) for e in read_events("movielens", path)]


# --- MIND ----------------------------------------------------------------------------------------

MIND = (
    "1\tU13740\t11/11/2019 9:05:58 AM\tN55189 N42782 N34694\tN55689-1 N35729-0\n"
    "2\tU91836\t11/12/2019 6:11:30 PM\t\tN20678-0 N39317-1 N58114-0\n"
    "3\tU73700\t11/11/2019 12:30:00 AM\tN1\tN9-0\n"
)


def test_mind_gives_one_request_per_log_with_a_position_per_candidate(tmp_path):
    path = write(tmp_path / "behaviors.tsv", MIND)
    u1, u2, u3 = stable_id("U13740"), stable_id("U91836"), stable_id("U73700")
    t1, t2, t3 = ms(2019, 11, 11, 9, 5, 58), ms(2019, 11, 12, 18, 11, 30), ms(2019, 11, 11, 0, 30)

    assert shape(read_events("mind", path)) == [
        ("imp", "mind:3", u3, stable_id("N9"), 0, t3),
        ("imp", "mind:1", u1, stable_id("N55689"), 0, t1),
        ("imp", "mind:1", u1, stable_id("N35729"), 1, t1),
        ("click", "mind:1", stable_id("N55689"), t1 + 1),
        ("imp", "mind:2", u2, stable_id("N20678"), 0, t2),
        ("imp", "mind:2", u2, stable_id("N39317"), 1, t2),
        ("imp", "mind:2", u2, stable_id("N58114"), 2, t2),
        ("click", "mind:2", stable_id("N39317"), t2 + 1),
    ]
    history = {e.request_id: e.context["history_len"] for e in impressions(read_events("mind", path))}
    assert history == {"mind:1": "2", "mind:2": "0", "mind:3": "1"}  # floor(log2(n + 1)) of 3, 0, 1


@pytest.mark.parametrize(
    ("stamp", "expected"),
    [("1/2/2019 12:00:01 AM", (2019, 1, 2, 0, 0, 1)), ("12/31/2019 12:59:59 PM", (2019, 12, 31, 12, 59, 59))],
)
def test_mind_time_is_12_hour_clock_read_as_utc(tmp_path, stamp, expected):
    path = write(tmp_path / "behaviors.tsv", f"1\tU1\t{stamp}\t\tN1-0\n")

    assert next(read_events("mind", path)).event_time_ms == ms(*expected)


def test_stable_id_is_blake2b_63_bits_and_non_negative():
    digest = hashlib.blake2b(b"U13740", digest_size=8).digest()

    assert stable_id("U13740") == int.from_bytes(digest, "little") & (2**63 - 1)
    assert all(0 <= stable_id(f"N{i}") < 2**63 for i in range(1000))


# --- Criteo --------------------------------------------------------------------------------------


def criteo_row(label: str, ints: dict[int, str] | None = None, cats: dict[int, str] | None = None) -> str:
    fields = (
        [label] + [(ints or {}).get(k, "") for k in range(1, 14)] + [(cats or {}).get(k, "") for k in range(1, 27)]
    )
    return "\t".join(fields) + "\n"


def test_criteo_rows_are_1_ms_apart_with_bucketed_integers_and_raw_categoricals(tmp_path):
    path = write(
        tmp_path / "train.txt",
        criteo_row("0", {1: "0", 2: "-1", 3: "3", 5: "1382"}, {1: "68fd1e64", 26: "9727dd16"}) + criteo_row("1"),
    )

    events = list(read_events("criteo", path))
    assert shape(events) == [
        ("imp", "criteo:1", 0, 0, 0, CRITEO_BASE_MS),
        ("imp", "criteo:2", 0, 0, 0, CRITEO_BASE_MS + 1),
        ("click", "criteo:2", 0, CRITEO_BASE_MS + 2),
    ]
    assert dict(events[0].context) == {
        "I1": "0",
        "I2": "-1",
        "I3": "2",
        "I5": "10",
        "C1": "68fd1e64",
        "C26": "9727dd16",
    }
    assert dict(events[1].context) == {}


@pytest.mark.parametrize(("value", "bucket"), [(0, "0"), (1, "1"), (2, "1"), (3, "2"), (1382, "10"), (-3, "-3")])
def test_log2_bucket(value, bucket):
    assert log2_bucket(value) == bucket


# --- Avazu ---------------------------------------------------------------------------------------

AVAZU_HEADER = (
    "id,click,hour,C1,banner_pos,site_id,site_domain,site_category,app_id,app_domain,app_category,device_id,"
    "device_ip,device_model,device_type,device_conn_type,C14,C15,C16,C17,C18,C19,C20,C21\n"
)
AVAZU = AVAZU_HEADER + (
    "1000009418151094273,0,14102100,1005,0,1fbe01fe,f3845767,28905ebd,ecad2386,7801e8d9,07d7df22,a99f214a,"
    "ddd2926e,44956a24,1,2,15706,320,50,1722,0,35,-1,79\n"
    "10000169349117863715,1,14102100,1005,1,85f751fd,c4e18dd6,50e219e0,9c13b419,2347f47a,f95efa07,0f2161f8,"
    "a8649089,e9b8d8d7,1,0,20984,320,50,2371,0,551,100217,46\n"
    "10000371904215119486,0,14102101,1002,0,84c7ba46,c4e18dd6,50e219e0,ecad2386,7801e8d9,07d7df22,c357dbff,"
    "f1ac7184,373ecbe6,0,0,21665,320,50,2493,3,35,-1,117\n"
)


def test_avazu_time_is_the_hour_plus_1_ms_per_row_and_ids_come_from_device_and_app_or_site(tmp_path):
    path = write(tmp_path / "train.csv", AVAZU)
    h0 = ms(2014, 10, 21, 0)

    events = list(read_events("avazu", path))
    assert shape(events) == [
        ("imp", "avazu:2", stable_id("device_ip:ddd2926e:44956a24"), stable_id("site_id:1fbe01fe"), 0, h0),
        ("imp", "avazu:3", stable_id("device_id:0f2161f8"), stable_id("app_id:9c13b419"), 1, h0 + 1),
        ("click", "avazu:3", stable_id("app_id:9c13b419"), h0 + 2),
        ("imp", "avazu:4", stable_id("device_id:c357dbff"), stable_id("site_id:84c7ba46"), 0, h0 + 3_600_000),
    ]
    context = dict(events[0].context)
    assert context["site_id"] == "1fbe01fe" and context["device_model"] == "44956a24" and context["C21"] == "79"
    assert (context["hour_of_day"], context["weekday"]) == ("00", "1")  # 2014-10-21 was a Tuesday
    assert not {"id", "click", "hour", "banner_pos", "device_id", "device_ip"} & set(context)
    assert events[3].context["hour_of_day"] == "01"


# --- Open Bandit ---------------------------------------------------------------------------------

OBD_HEADER = (
    ",timestamp,item_id,position,click,propensity_score,user_feature_0,user_feature_1,user_feature_2,"
    "user_feature_3,user-item_affinity_0,user-item_affinity_1,user-item_affinity_2\n"
)
OBD = OBD_HEADER + (
    "0,2019-11-24 00:01:03.979311+00:00,2,2,0,0.045525,cef3,2d03,c2e4,c39b,0.0,0.0,1.0\n"
    "1,2019-11-24 00:01:45.406608+00:00,0,1,1,0.059345,cef3,f1c2,7bc9,9bde,3.0,0.0,0.0\n"
)


def test_openbandit_rows_keep_position_user_features_affinity_and_item_features(tmp_path):
    path = write(tmp_path / "men" / "men.csv", OBD)
    write(
        tmp_path / "men" / "item_context.csv",
        ",item_id,item_feature_0,item_feature_1\n0,0,-0.67,c82d\n1,1,0.5,7749\n",
    )
    t1, t2 = ms(2019, 11, 24, 0, 1, 3) + 979, ms(2019, 11, 24, 0, 1, 45) + 406

    events = list(read_events("openbandit", path))
    assert shape(events) == [
        ("imp", "obd:2", stable_id("cef3|2d03|c2e4|c39b"), 2, 1, t1),
        ("imp", "obd:3", stable_id("cef3|f1c2|7bc9|9bde"), 0, 0, t2),
        ("click", "obd:3", 0, t2 + 1),
    ]
    assert dict(events[0].context) == {
        "user_feature_0": "cef3",
        "user_feature_1": "2d03",
        "user_feature_2": "c2e4",
        "user_feature_3": "c39b",
        "user_item_affinity": "1.0",
    }
    assert events[1].context["user_item_affinity"] == "3.0"
    assert (events[1].context["item_feature_0"], events[1].context["item_feature_1"]) == ("-0.67", "c82d")


def test_openbandit_rows_out_of_time_order_are_an_error(tmp_path):
    lines = OBD.splitlines(keepends=True)
    path = write(tmp_path / "men.csv", lines[0] + lines[2] + lines[1])

    with pytest.raises(DatasetError, match=r"men\.csv:3: event time .* before the previous row"):
        list(read_events("openbandit", path))


# --- Malformed rows: each names the file, the line and the problem --------------------------------


@pytest.mark.parametrize(
    ("fmt", "name", "text", "line", "problem"),
    [
        ("movielens", "u.data", "1\t2\t3\t100\n\n1\t2\t3\n", 3, "expected 4 '\\t'-separated fields"),
        ("movielens", "u.data", "1\t2\t3\t100\n1\t2\tgood\t100\n", 2, "rating 'good' is not a number"),
        (
            "movielens",
            "u.data",
            "1\t2\t3\t100\n1\t2\t3\t2019-01-01\n",
            2,
            "timestamp '2019-01-01' is not an integer",
        ),
        ("movielens", "u.data", "-1\t2\t3\t100\n", 1, "user id -1 is below 0"),
        ("movielens", "ratings.csv", "userId,movieId,rating\n", 1, "expected header"),
        ("mind", "behaviors.tsv", MIND + "4\tU1\t11/11/2019 9:05:58\t\tN1-0\n", 4, "time '11/11/2019 9:05:58'"),
        ("mind", "behaviors.tsv", "1\tU1\t11/11/2019 9:05:58 AM\t\tN1-0 N2\n", 1, "impression 'N2' is not"),
        ("mind", "behaviors.tsv", "1\tU1\t11/11/2019 9:05:58 AM\t\tN1-2\n", 1, "impression 'N1-2' is not"),
        ("mind", "behaviors.tsv", "1\tU1\t11/11/2019 9:05:58 AM\tN1-0\n", 1, "expected 5 '\\t'-separated fields"),
        ("criteo", "train.txt", criteo_row("0") + criteo_row("0").replace("\t", "", 1), 2, "expected 40"),
        ("criteo", "train.txt", criteo_row("0") + criteo_row("0", {4: "1.5"}), 2, "I4 '1.5' is not an integer"),
        ("criteo", "train.txt", criteo_row("2"), 1, "label '2' is not 0 or 1"),
        ("avazu", "train.csv", AVAZU.replace(",14102101,", ",141021,"), 4, "hour '141021' is not YYMMDDHH"),
        ("avazu", "train.csv", AVAZU.replace(",1,14102100,", ",yes,14102100,"), 3, "click 'yes' is not 0 or 1"),
        ("avazu", "train.csv", AVAZU + "1,0,14102101,1005\n", 5, "expected 24 ','-separated fields"),
        ("avazu", "test.csv", AVAZU_HEADER.replace("click,", ""), 1, "header lacks column(s) click"),
        ("openbandit", "men.csv", OBD.replace("2019-11-24 00:01:45", "yesterday"), 3, "timestamp 'yesterday"),
        ("openbandit", "men.csv", OBD.replace(",0,1,1,0.059345", ",0,x,1,0.059345"), 3, "position 'x' is not"),
        ("openbandit", "men.csv", OBD.replace(",2,2,0,0.045525", ",2,0,0,0.045525"), 2, "position 0 is below 1"),
    ],
)
def test_a_malformed_row_names_file_line_and_problem(tmp_path, fmt, name, text, line, problem):
    path = write(tmp_path / name, text)

    with pytest.raises(DatasetError) as info:
        list(read_events(fmt, path))
    assert str(info.value).startswith(f"{path}:{line}: ")
    assert problem in str(info.value)
    assert (info.value.path, info.value.line) == (str(path), line)


def test_unknown_format_lists_the_known_ones(tmp_path):
    with pytest.raises(DatasetError, match="known formats: avazu, criteo, mind, movielens, openbandit"):
        read_events("netflix", tmp_path)


def test_a_missing_file_fails_before_iterating(tmp_path):
    with pytest.raises(DatasetError, match="no such file"):
        read_events("criteo", tmp_path / "missing.tsv")


def test_an_empty_file_with_a_header_format_is_an_error(tmp_path):
    with pytest.raises(DatasetError, match="empty file"):
        list(read_events("avazu", write(tmp_path / "train.csv", "")))


# --- The real samples, when present ----------------------------------------------------------------

DATA = data_dir()


@pytest.mark.parametrize(
    ("fmt", "path", "rows", "clicks"),
    [
        ("movielens", "movielens-100k/u.data", 100_000, 55_375),  # ratings 4 and 5: 34,174 + 21,201
        ("criteo", "criteo-kaggle-10k/train_first10k.tsv", 10_000, 2_182),
        ("avazu", "avazu-10k/train_first9999.csv", 9_999, 1_706),
        ("openbandit", "open-bandit-dataset-small/random/men/men.csv", 10_000, 46),
        ("openbandit", "open-bandit-dataset-small/bts/men/men.csv", 10_000, 69),
    ],
)
def test_real_sample_reads_with_its_documented_counts(fmt, path, rows, clicks):
    if not (DATA / path).is_file():
        pytest.skip(f"{DATA / path} absent (set FRESHET_DATA_DIR)")

    kinds = [kind for kind, *_ in shape(read_events(fmt, DATA / path))]
    assert (kinds.count("imp"), kinds.count("click")) == (rows, clicks)


def test_every_format_is_registered_with_a_distinct_request_prefix():
    assert len({spec.prefix for spec in FORMATS.values()}) == len(FORMATS) == 5


def test_bytes_that_are_not_utf8_are_a_dataset_error(tmp_path):
    path = tmp_path / "u.data"
    path.write_bytes(b"1\t2\t5\t100\n\xff\xfe\t1\n")

    with pytest.raises(DatasetError, match="not UTF-8 text"):
        list(read_events("movielens", path))


def test_dataset_samples_label_each_rating_and_featurise_like_the_joiner(tmp_path):
    from freshet.datasets import dataset_samples
    from freshet.fids import example_fids

    path = write(tmp_path / "u.data", "1\t10\t5\t300\n2\t10\t2\t100\n1\t20\t4\t200\n3\t30\t1\t400\n")
    batches = list(dataset_samples("movielens", path, batch_size=3))
    assert [len(b) for b in batches] == [3, 1]
    ids = [sid for b in batches for sid in b.sample_ids]
    labels = [float(x) for b in batches for x in b.labels]
    assert labels == [0.0, 1.0, 1.0, 0.0]  # time order: user 2 (2 stars), user 1 (4), user 1 (5), user 3 (1)
    assert len(set(ids)) == 4 and all(sid.endswith(":v1") for sid in ids)
    first = batches[0]
    assert first.fids[:3].tolist() == example_fids(2, [10], 0)[0].tolist()
    assert first.label_vectors[:, 0].tolist() == first.labels.tolist()
