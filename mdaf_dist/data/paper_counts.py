"""The paper's preprocessing counts (MDAF_paper.md 5.1.1, Table 6), typed from its text for `mdaf
prepare` to print beside its own stages (and for the Table 6 report). Never used as ours.

The paper's samples come from `prepare.user_fraction=0.0053` of the full data (about 5,200 users):
only there are its counts comparable with ours; its drop shares are comparable at any scale.
"""

from __future__ import annotations

from typing import Dict, Optional

SOURCE = "MDAF_paper.md 5.1.1"
# samples per split after each stage of meta["versus_paper"], as 5.1.1 gives them: "samples" is
# before the filters (Table 6 "Raw data"), then after the empty-history removal and the category
# filter; the paper gives no validation count before the filters
COUNTS: Dict[str, Dict[str, int]] = {
    "samples": {"train": 1_052_081},
    "empty_history": {"train": 915_915, "valid": 196_361},
    "category_filter": {"train": 473_044, "valid": 101_609},
}
# the drops as 5.1.1 states them; its counts give 12.9 % and 48.4 % (train), 48.3 % (valid)
STATED_DROPS: Dict[str, Dict[str, float]] = {
    "empty_history": {"train": 0.130},
    "category_filter": {"train": 0.483, "valid": 0.483},
}


def drop(before: int, after: int) -> Optional[float]:
    """Share of the samples a stage removes (0.13 for -13 %); None without samples before it."""
    return (before - after) / before if before else None


def valid_share(train: int, valid: int) -> Optional[float]:
    """Validation samples over training + validation samples."""
    return valid / (train + valid) if train + valid else None


# 101,609 / (473,044 + 101,609) = 17.7 %
PAPER_VALID_SHARE = valid_share(COUNTS["category_filter"]["train"], COUNTS["category_filter"]["valid"])
