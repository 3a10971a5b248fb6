"""The fidelity judge (pure): agreement over the bundle's top-1 ids, and when it is not checked."""

from __future__ import annotations

import pytest

from agent.bundle.manifest import Fidelity
from agent.errors import InferenceError
from agent.fidelity import PROBE_SHA256, agreement, judge, not_checked


def table(ids: tuple[int, ...] = (1, 2, 3, 4), threshold: float = 0.75, **over: object) -> Fidelity:
    d: dict[str, object] = dict(probe_sha256=PROBE_SHA256, window=96, top1=ids, threshold=threshold,
                                runtime="llamacpp")
    d.update(over)
    return Fidelity(**d)  # type: ignore[arg-type]


def test_agreement_counts_matching_positions_and_a_short_answer_as_misses() -> None:
    assert agreement((1, 2, 3, 4), (1, 2, 3, 4)) == 1.0
    assert agreement((1, 2, 3, 4), (1, 9, 3, 9)) == 0.5
    assert agreement((1, 2, 3, 4), (1, 2)) == 0.5
    with pytest.raises(InferenceError):
        agreement((), (1,))


def test_judge_passes_at_the_threshold_and_fails_under_it_with_the_numbers() -> None:
    ok = judge(table(), (1, 2, 3, 9))
    assert ok.ok is True and ok.agreement == 0.75 and ok.positions == 4 and ok.message() == ""
    bad = judge(table(), (1, 9, 9, 9))
    assert bad.failed and "agreement 0.250 over 4 positions < 0.75" in bad.message()
    assert judge(table(), (1, 9, 9, 9), override=0.2).ok is True, "--slo min_agreement overrides"
    assert bad.to_dict()["ok"] is False and bad.to_dict()["threshold"] == 0.75


def test_not_checked_says_why_rather_than_failing() -> None:
    assert "no fidelity table" in not_checked(None)
    assert "another probe text" in not_checked(table(probe_sha256="0" * 64))
    assert "threshold 0" in not_checked(table(threshold=0.0))
    assert "threshold 0" in not_checked(table(), override=0.0)
    assert not_checked(table()) == ""


@pytest.mark.parametrize("over", [{"top1": ()}, {"top1": (1, -2)}, {"top1": (True,)},
                                  {"threshold": 1.2}, {"window": 0}, {"runtime": ""}])
def test_a_malformed_table_is_a_manifest_error(over) -> None:
    from agent.errors import ManifestError

    with pytest.raises(ManifestError):
        table(**over)
