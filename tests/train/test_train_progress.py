import io

from attnlab.progress import Progress, format_duration, format_rate


def test_formatting():
    assert format_rate(18234) == "18.2k" and format_rate(950) == "950" and format_rate(2.5e6) == "2.5M"
    assert format_duration(62) == "1m02s" and format_duration(5) == "5s"
    assert format_duration(3725) == "1h02m" and format_duration(None) == "?"


def test_plain_lines_when_not_a_terminal():
    out = io.StringIO()
    with Progress(400, enabled=True, stream=out) as progress:
        progress.update(120)
        progress.log_train(120, 3.2104, 18234.0, 62.0)
        progress.note("eval step 120 | val_loss 3.300")
    assert out.getvalue().splitlines() == ["step 120/400 | loss 3.210 | 18.2k tok/s | eta 1m02s",
                                           "eval step 120 | val_loss 3.300"]


def test_disabled_prints_nothing_and_rich_mode_renders():
    out = io.StringIO()
    with Progress(10, enabled=False, stream=out) as progress:
        progress.log_train(1, 1.0, 1.0, 1.0)
        progress.note("x")
    assert out.getvalue() == ""
    rich_out = io.StringIO()
    with Progress(10, enabled=True, stream=rich_out, rich=True) as progress:
        progress.update(3)
        progress.log_train(5, 2.5, 1000.0, 3.0)
        progress.note("eval step 5")
    assert "eval step 5" in rich_out.getvalue()


def test_eta_uses_the_recent_window():
    from attnlab.progress import eta_seconds

    # the case: 131 tok/s recently; the ETA follows the same window, not the run average
    tokens_per_step = 4 * 16
    window_steps, window_s = 10, 10 * tokens_per_step / 131
    eta = eta_seconds(1000, window_steps, window_s)
    assert abs(eta - 1000 * tokens_per_step / 131) < 1e-9
    assert eta_seconds(0, 5, 2.0) == 0 and eta_seconds(-3, 5, 2.0) == 0
    assert eta_seconds(10, 0, 2.0) is None and eta_seconds(10, 5, 0.0) is None
    assert eta_seconds(6, 2, 1.0) == 3.0


def test_logged_eta_matches_logged_throughput(tmp_path):
    from attnlab.run import execute_run
    from attnlab.train.events import read_events
    from train_helpers import make_run, synthetic_splits, train_config

    run = make_run(tmp_path, train=train_config(steps=8, log_every=2))
    execute_run(run, splits=synthetic_splits())
    events = read_events(run.run_dir / "train.jsonl", "train")
    assert [e["step"] for e in events] == [2, 4, 6, 8]
    tokens_per_step = 4 * 16
    for e in events:  # eta = remaining tokens at the printed tok/s
        expected = (8 - e["step"]) * tokens_per_step / e["tokens_per_s"]
        assert abs(e["eta_s"] - expected) <= 1e-6 * max(1.0, expected)


def test_thread_defaults():
    from attnlab.train.loop import available_cpus, thread_defaults

    assert thread_defaults({}, 4, 0.5) == (4, None)
    assert thread_defaults({"OMP_NUM_THREADS": "1"}, 4, 0.5) == (None, None)
    assert thread_defaults({"MKL_NUM_THREADS": "2"}, 4, None) == (None, None)
    assert thread_defaults({"LOCAL_WORLD_SIZE": "2"}, 4, None)[0] == 2
    assert thread_defaults({"LOCAL_WORLD_SIZE": "8"}, 4, None)[0] == 1
    threads, notice = thread_defaults({}, 2, 5.25)
    assert threads == 2 and "\n" not in notice and "5.2" in notice and "2 CPU" in notice
    assert "OMP_NUM_THREADS" in notice
    assert available_cpus() >= 1


def test_configure_threads_respects_the_environment(monkeypatch):
    import torch

    from attnlab.train import loop

    before = torch.get_num_threads()
    try:
        monkeypatch.setattr(loop, "available_cpus", lambda: 1)
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        monkeypatch.delenv("MKL_NUM_THREADS", raising=False)
        assert loop.configure_threads() == 1
        torch.set_num_threads(max(2, before))
        monkeypatch.setenv("OMP_NUM_THREADS", "2")
        assert loop.configure_threads() == max(2, before)  # left as the user set it
    finally:
        torch.set_num_threads(before)


def test_training_on_a_loaded_machine_says_so_once(tmp_path, monkeypatch):
    from attnlab.progress import Progress
    from attnlab.run import execute_run
    from attnlab.train import loop
    from train_helpers import make_run, synthetic_splits

    monkeypatch.setattr(loop, "available_cpus", lambda: 2)
    monkeypatch.setattr(loop, "_load_1min", lambda: 7.5)
    out = io.StringIO()
    real = loop.Progress
    monkeypatch.setattr(loop, "Progress", lambda *a, **k: real(*a, **{**k, "stream": out, "rich": False}))
    execute_run(make_run(tmp_path), splits=synthetic_splits())
    notes = [line for line in out.getvalue().splitlines() if "load average" in line]
    assert notes == [notes[0]] and "7.5" in notes[0] and "2 CPU" in notes[0]
    assert Progress is real
