"""Progress on long steps (`cxr.progress`): plain lines in a log, nothing for quick steps or with --quiet."""

from cxr import progress


def test_a_step_in_a_log_writes_plain_lines_and_its_last(capsys, monkeypatch):
    monkeypatch.setattr(progress, "DELAY_SECONDS", 0)
    monkeypatch.setattr(progress, "LOG_SECONDS", 0)  # a line at every update
    assert sum(progress.progress(range(4), desc="Decoding")) == 6
    lines = capsys.readouterr().err.splitlines()
    assert lines[-1].startswith("Decoding: 4/4 images (100 %)") and "elapsed" in lines[-1]
    assert all("\r" not in line for line in lines) and len(lines) >= 2


def test_a_step_that_outlasts_the_delay_writes_its_last_line_once(capsys, monkeypatch):
    monkeypatch.setattr(progress, "DELAY_SECONDS", 0)  # every step outlasts it; LOG_SECONDS (30) never comes
    blocks = list(progress.counted(iter([[1, 2], [3]]), 3, "Frozen layers, validation"))
    assert blocks == [[1, 2], [3]]
    lines = capsys.readouterr().err.splitlines()
    assert [line.split(" (")[0] for line in lines] == ["Frozen layers, validation: 0/3 images",
                                                       "Frozen layers, validation: 3/3 images"], lines


def test_quick_steps_and_quiet_runs_write_nothing(capsys, monkeypatch):
    assert list(progress.progress(range(3), desc="Quick")) == [0, 1, 2]  # well under DELAY_SECONDS
    monkeypatch.setattr(progress, "DELAY_SECONDS", 0)
    monkeypatch.setenv(progress.QUIET_VARIABLE, "1")
    assert list(progress.progress(range(3), desc="Quiet")) == [0, 1, 2]
    assert capsys.readouterr().err == ""
