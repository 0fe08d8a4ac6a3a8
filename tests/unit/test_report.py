"""RebalanceReport: frozen once built, its JSON form round-trips, dict-style reads keep old callers working;
history entries put on record at a commit and after a controller restart."""

import dataclasses
import json

import pytest

from elastic_ep.report import RESUMED_NOTE, RebalanceReport, ReportDraft, format_report, put_entry, resume_history
from elastic_ep.status import BadSlot, VerifyResult


def _draft() -> ReportDraft:
    d = ReportDraft(reason="recover", epoch_from=2, attempt=2)
    d.epoch_to = 3
    d.replaced[1] = "w7 (cold)"
    d.dropped, d.added = [4], []
    d.phases["transfer"] = 0.5
    d.notes.append("could not start a new spare")
    d.worker_timings = {1: {"exchange": 0.25}}
    d.plan = {"transfers": 3, "copies": 1, "keeps": 9, "fetches": 2, "stages": 1}
    d.bytes_p2p, d.bytes_from_checkpoint = 3072, 2048
    return d


def test_a_frozen_report_cannot_be_changed_and_keeps_its_values():
    rep = _draft().freeze()
    assert rep.replaced == {1: "w7 (cold)"} and rep.dropped == (4,) and rep.notes == ("could not start a new spare",)
    with pytest.raises(dataclasses.FrozenInstanceError):
        rep.epoch_to = 9


def test_the_json_form_round_trips_with_rank_keys_as_strings():
    rep = _draft().freeze()
    d = json.loads(json.dumps(rep.to_dict()))
    assert d["replaced"] == {"1": "w7 (cold)"} and d["dropped"] == [4] and d["worker_timings"] == {"1": {"exchange": 0.25}}
    assert RebalanceReport.from_dict(d) == rep
    assert RebalanceReport.from_dict({**d, "from_a_newer_version": 1}) == rep  # unknown keys are ignored


def test_dict_style_reads_give_the_json_form():
    rep = _draft().freeze()
    assert rep["epoch_to"] == 3 and rep["dropped"] == [4] and rep["replaced"] == {"1": "w7 (cold)"}
    with pytest.raises(KeyError):
        rep["no_such_field"]


def test_a_draft_refuses_a_field_the_report_does_not_have():
    d = ReportDraft(reason="grow", epoch_from=0)
    with pytest.raises(AttributeError, match="bytes_p2p2"):
        d.bytes_p2p2 = 1
    with pytest.raises(TypeError, match="epoch_from"):
        ReportDraft(reason="grow")


def test_format_report_reads_a_report_or_a_history_entry_alike():
    rep = _draft().freeze()
    text = format_report(rep)
    assert text == format_report(rep.to_dict())
    assert "recover: epoch 2 -> 3, attempt 2" in text and "rank 1 -> w7 (cold)" in text and "dropped ranks: [4]" in text


def test_verify_result_reads_as_attributes_and_as_its_old_dict():
    ver = VerifyResult(ok=False, slots_checked=8, bad=(BadSlot(rank=1, layer=0, slot=2, why="wrong expert"),),
                       num_bad=1, ranks_unreachable=(3,), epoch=5)
    assert ver.bad[0].slot == 2 and ver["ranks_unreachable"] == [3]
    assert json.loads(json.dumps(ver.to_dict()))["bad"] == [
        {"rank": 1, "layer": 0, "slot": 2, "why": "wrong expert", "expert": None}]


def _entry(reason="rebalance", epoch_from=0, epoch_to=None, commits=0, finished=None, notes=()):
    d = ReportDraft(reason=reason, epoch_from=epoch_from)
    d.epoch_to, d.commits, d.finished_at, d.notes = epoch_to, commits, finished, list(notes)
    return d.freeze().to_dict()


def test_put_entry_appends_once_then_updates_in_place():
    history = [_entry("recover", 0, 1, 1, finished=5.0)]
    i = put_entry(history, None, _entry(epoch_from=1, epoch_to=2, commits=1))
    assert i == 1 and len(history) == 2
    assert put_entry(history, i, _entry(epoch_from=1, epoch_to=3, commits=2)) == 1
    assert len(history) == 2 and history[1]["epoch_to"] == 3 and history[0]["epoch_to"] == 1


@pytest.mark.parametrize("case", ["nothing pending", "pending, first commit", "pending, a later step",
                                  "pending, another reconfiguration open", "finished before"])
def test_resume_history_records_the_decided_change_and_notes_what_never_finished(case):
    done = _entry("recover", 0, 1, 1, finished=5.0)
    open_step = _entry(epoch_from=1, epoch_to=2, commits=1)  # a layerwise move that committed one step
    pending = _entry(epoch_from=1, epoch_to=2, commits=1) | {"phases": {"verify": 0.1}}
    history, report, epoch = {
        "nothing pending": ([done, open_step], None, None),
        "pending, first commit": ([done], _entry(epoch_from=1), 2),
        "pending, a later step": ([done, open_step], pending, 3),
        "pending, another reconfiguration open": ([done, _entry("grow", 1, 2, 1)], pending, 3),
        "finished before": ([done], None, None),
    }[case]
    before = [dict(h) for h in history]
    resume_history(history, report, epoch)
    assert history[0] == done  # a finished entry is never touched
    if report is None:
        assert len(history) == len(before)
    elif case == "pending, a later step":  # the open entry of the same move is replaced, not doubled
        assert len(history) == 2 and history[1]["epoch_to"] == 3 and history[1]["commits"] == 2
        assert history[1]["phases"] == {"verify": 0.1}
    else:  # appended: the report saved with the decision, committing ``epoch``
        assert len(history) == len(before) + 1 and history[-1]["epoch_to"] == epoch
        assert history[-1]["commits"] == report["commits"] + 1
    unfinished = [h for h in history if h["finished_at"] is None]
    assert all(h["notes"].count(RESUMED_NOTE) == 1 for h in unfinished)
    assert (case == "finished before") == (not unfinished)
    again = [dict(h, notes=list(h["notes"])) for h in history]
    resume_history(history, None, None)  # a second restart adds no second note
    assert history == again
