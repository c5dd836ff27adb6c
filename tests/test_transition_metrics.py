"""The metrics a file's moves give: done and failed files (by stage), upload and result latency."""

from __future__ import annotations

from konfuzio_watch.journal import Row, State
from konfuzio_watch.metrics import Metrics
from konfuzio_watch.states import Stage
from konfuzio_watch.transition_metrics import count_transition, stage_label


def row(state: State, **fields) -> Row:  # type: ignore[no-untyped-def]
    base = dict(id=1, rel_path=b"a.pdf", state=state, size=1, sha256=None, upload_name=None, token_hash=None)
    base |= dict(document_id=None, attempts=1, next_at=None, callback_at=None, uploaded_at=None, final_path=None)
    base |= dict(error=None, stage=None, project_id=1, detected_at=100.0, updated_at=100.0, finished_at=None)
    return Row(**(base | fields))


def test_moves_count_files_and_time_them():
    m = Metrics()
    count_transition(m, row(State.UPLOADED, uploaded_at=103.5), State.UPLOADING)
    count_transition(m, row(State.DONE, finished_at=110.0), State.EXPORTING)
    count_transition(m, row(State.FAILED, stage=Stage.PROCESSING.value), State.FAILING)
    count_transition(m, row(State.FAILED, stage="status 2 since 12:00"), State.FAILING)
    count_transition(m, row(State.CLAIMED), State.CLAIMING)
    value = m.registry.get_sample_value
    assert value("konfuzio_watch_upload_latency_seconds_sum") == 3.5
    assert value("konfuzio_watch_result_latency_seconds_sum") == 10.0
    assert value("konfuzio_watch_result_latency_seconds_bucket", {"le": "10.0"}) == 1
    assert value("konfuzio_watch_files_done_total") == 1
    assert value("konfuzio_watch_files_failed_total", {"stage": "processing"}) == 1
    assert value("konfuzio_watch_files_failed_total", {"stage": "other"}) == 1


def test_stage_labels_are_the_stages_names():
    assert stage_label(Stage.ANSWERED.value) == "answered" and stage_label("upload") == "upload"
    assert stage_label(None) == "other" and stage_label("free text") == "other"
