"""SIGKILL jobs/reprocess.py repeatedly after the data changed; two overlapping prep runs on one output."""

from __future__ import annotations

from pathlib import Path

from faults.prep_harness import overlap_scenario, reprocess_scenario

KILLS = 20


def test_reprocess_survives_a_series_of_kills(tmp_path: Path) -> None:
    """4 images added, 1 label edited, 1 image removed; killed KILLS times, then equal to an uninterrupted reprocess."""
    report = reprocess_scenario(tmp_path, KILLS, seed=2)
    assert report.problems == []
    assert len(report.kills) == KILLS and report.comparisons_equal == report.completions >= 2
    assert len(report.by_point()) >= 3  # the kills hit several kinds of point


def test_overlapping_runs_one_is_refused_and_the_other_is_intact(tmp_path: Path) -> None:
    overlap = overlap_scenario(tmp_path)
    assert overlap.second_rc == 3 and overlap.cron_rc == 3
    assert overlap.second_message.startswith("error: ") and "another prep run" in overlap.second_message
    assert overlap.first_rc == 0 and overlap.problems == []
