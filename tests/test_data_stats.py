"""`mdaf_dist.data.stats` and `mdaf synth --stats`: each statistic on a file small enough to count by hand."""

import numpy as np
import pytest

from mdaf_dist import cli
from mdaf_dist.config import SECONDS_PER_DAY, TAOBAO_START_TS
from mdaf_dist.data import stats

T0 = TAOBAO_START_TS + 3600  # 2017-11-25 01:00 Beijing time
# user, item, category, behavior, ts; user 2 first and one line outside the window, as real files have
ROWS = [
    (2, 10, 1, "pv", T0),
    (1, 10, 1, "pv", T0),
    (1, 11, 1, "pv", T0 + 1),
    (2, 14, 2, "pv", T0 + 5),
    (1, 12, 2, "pv", T0 + 2),
    (1, 10, 1, "pv", T0 + 3),
    (1, 11, 1, "buy", T0 + 4),
    (1, 13, 3, "cart", T0 + SECONDS_PER_DAY),
    (1, 15, 3, "pv", 15),
]


@pytest.fixture
def hand_file(tmp_path):
    path = tmp_path / "hand.csv"
    path.write_text("".join(",".join(map(str, row)) + "\n" for row in ROWS))
    return path


def test_statistics_counted_by_hand(hand_file):
    events, rejected = stats.read_events(str(hand_file))
    measured = stats.compute(events)
    assert rejected == 1
    # user 1 clicks (pv) items/categories 10/1, 11/1, 12/2, 10/1; user 2 clicks 10/1, 14/2.
    # Clicks with an earlier one: u1 11/1 (category 1 back), 12/2 (new), 10/1 (category 2 back,
    # item seen before), u2 14/2 (new): 1 of 4 in the last 1, 2 of 4 in the last 10 and 50.
    # Item clicks 3, 1, 1, 1: the top item (1 % of 4 rounds up to one) has 3 of 6 clicks.
    log_rank, log_clicks = np.log([1, 2, 3, 4]), np.log([3, 1, 1, 1])
    slope = np.sum((log_rank - log_rank.mean()) * (log_clicks - log_clicks.mean())) / np.sum((log_rank - log_rank.mean()) ** 2)
    expected = {
        "rows": 8, "users": 2, "items": 5, "categories": 3,
        "first_day": "2017-11-25", "last_day": "2017-11-26",
        "items_clicked_once": 0.75, "top1pct_click_share": 0.5, "zipf_exponent": -slope,
        "rows_per_user": 4.0,  # median of 6 and 2
        "active_days_per_user": 1.5,  # user 1 on two days, user 2 on one
        "categories_per_user": 2.5,
        "category_in_last_1": 0.25, "category_in_last_10": 0.5, "category_in_last_50": 0.5,
        "repeat_rate": 0.25,
        "after_view": 0.5,  # the buy of 11 follows its view, the cart of 13 does not
        "share_pv": 0.75, "share_cart": 0.125, "share_fav": 0.0, "share_buy": 0.125,
    }  # fmt: skip
    assert measured.keys() == expected.keys(), "no sample of 1,000 rows in 8 rows"
    for key, value in expected.items():
        assert measured[key] == pytest.approx(value), key


def test_samples_draw_whole_users_up_to_the_row_count(tmp_path):
    # 300 users of 10 rows: a sample of N rows is N / 10 users; user u clicks items 100u..100u+9
    # in one category of its own (every fifth user shares category 0)
    path = tmp_path / "users.csv"
    lines = [f"{u},{100 * u + k},{u if u % 5 else 0},pv,{T0 + k}\n" for u in range(1, 301) for k in range(10)]
    path.write_text("".join(lines))
    measured = stats.compute(stats.read_events(str(path))[0], seed=3)
    assert measured["items_per_row_1000"] == measured["items_per_row_2400"] == 1.0
    for n in (1000, 2400):
        users = n // 10
        # the users sampled with category 0 add one category, so between 0.8 users and users
        assert 0.7 * users <= measured[f"categories_{n}"] <= users, n
    assert "categories_5000" not in measured


def test_cli_prints_the_statistics_beside_the_targets(hand_file, capsys):
    assert cli.main(["synth", "--stats", str(hand_file)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["statistic", "this", "file", "real", "data", "set"]
    assert "repeat rate (item clicked before)                 0.250          0.190" in lines
    assert "categories in 1,000 rows                              -            190" in lines
    assert "users                                                 2        987,994" in lines
    assert lines[-1] == "lines rejected by the ingest's checks and left out: 1"


def test_cli_without_output_or_stats_is_one_line(capsys):
    assert cli.main(["synth", "--rows", "10"]) == 2
    assert capsys.readouterr().err.strip() == (
        "mdaf synth: error: give --out and --rows to write a file, or --stats FILE to measure one"
    )
