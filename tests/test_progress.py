"""Progress reporting: throughput, elapsed time and ETA as a log line, and a live bar on a terminal."""

import numpy as np

from kft.training import progress


class FakeClock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_durations_and_rates_read_short():
    assert [progress.duration(s) for s in (0.42, 45, 192, 3900, None, float("nan"))] == \
        ["0.4s", "45s", "3m12s", "1h05m", "?", "?"]
    assert progress.per_second(21, 10, "steps") == "2.10 steps/s"
    assert progress.per_second(672, 10, "examples") == "67.2 examples/s"
    assert progress.per_second(12340, 10, "tokens") == "1,234 tokens/s"
    assert progress.per_second(5, 0, "steps") == "0.00 steps/s"


def test_batch_counts_leave_out_filler_rows_and_padding():
    examples, tokens = progress.batch_counts(np.array([[0, 1, -1], [2, -1, -1]]), np.array([5, 7, 9]))
    assert examples.tolist() == [2, 1] and tokens.tolist() == [12, 9]


def test_the_log_line_has_throughput_elapsed_and_an_eta_that_leaves_out_the_first_call():
    clock = FakeClock()
    p = progress.Progress(total_steps=10, step=0, live=False, clock=clock)
    for t, step in ((5, 1), (7, 2), (9, 3)):  # the first step also traced the function: 5 s
        clock.t = t
        p.update(step, "1/2", 0.7, examples=8, tokens=100)
    assert p.line("1/2", 0.6931) == ("step 3/10 (epoch 1/2): loss 0.6931, 0.33 steps/s, 2.67 examples/s, "
                                     "33.3 tokens/s, elapsed 9.0s, eta 14s")
    for step in range(4, 9):
        clock.t += 2
        p.update(step, "2/2", 0.5, examples=4, tokens=10)
    # rates over the steps since the previous line; the ETA from 2 s per step since step 1
    assert p.line("2/2", 0.5) == ("step 8/10 (epoch 2/2): loss 0.5000, 0.50 steps/s, 2.00 examples/s, "
                                  "5.00 tokens/s, elapsed 19s, eta 4.0s")


def test_on_a_terminal_a_bar_is_drawn_and_cleared_before_each_log_line(capsys):
    clock = FakeClock()
    with progress.Progress(total_steps=4, step=0, live=True, clock=clock) as p:
        clock.t = 1
        p.update(1, "1/1", 0.7, examples=8, tokens=80)
        bar = capsys.readouterr().err
        assert bar.startswith("\r1/4 [") and "loss 0.7000" in bar and "80.0 tok/s" in bar
        assert "eta 3.0s" in bar
        p.filter(None)  # what the log handler calls before writing a line
        assert capsys.readouterr().err == "\r\x1b[K"
        clock.t = 2
        p.update(2, "1/1", 0.6, examples=8, tokens=80)  # redrawn below the log line
        assert capsys.readouterr().err.startswith("\r2/4 [")
    assert capsys.readouterr().err == "\n"  # the last bar stays on screen
