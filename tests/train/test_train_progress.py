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
