"""Killed, preempted, corrupted and diverging runs, each as a real `python -m kft.train` process.

Run A trains uninterrupted; the other runs are interrupted and rerun with the same command, and
must end where A ended: same step count, and with --deterministic bit-identical weights,
optimizer moments and dropout seed states.
"""

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from conftest import ROOT, run_python
from kft.training import checkpoints

EPOCHS = 3


def _args(preset, model_dir, *extra):
    return ["-m", "kft.train", "--dataset=sample_reviews", f"--backbone={preset}", f"--epochs={EPOCHS}",
            "--batch_size=8", "--learning_rate=1e-3", "--checkpoint_every_steps=7", "--log_every_steps=1",
            "--deterministic", "--noexport", "--nodrift", f"--model_dir={model_dir}", *extra]


class _Process:
    """A kft.train subprocess whose stderr is read line by line as it runs."""

    def __init__(self, args):
        env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "KFT_QUIET": "1"}
        # Ctrl-C's SIGINT as a terminal delivers it, even when this suite runs in the background
        # (a shell starts background jobs with SIGINT ignored, and the child would inherit that).
        self.proc = subprocess.Popen([sys.executable, *args], cwd=ROOT, env=env, text=True,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        self.lines, self.step = [], 0
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        for line in self.proc.stderr:
            self.lines.append(line)
            m = re.search(r"step (\d+)/\d+ \(epoch", line)
            if m:
                self.step = int(m.group(1))

    def signal_after(self, step: int, sig: int, timeout: float = 300) -> int:
        """Sends `sig` as soon as the run has logged `step`; returns the last step it had logged."""
        deadline = time.time() + timeout
        while self.step < step and self.proc.poll() is None and time.time() < deadline:
            time.sleep(0.005)
        assert self.proc.poll() is None, "run ended before it could be interrupted:\n" + self.text()
        seen = self.step
        self.proc.send_signal(sig)
        return seen

    def wait(self, timeout: float = 300) -> int:
        code = self.proc.wait(timeout=timeout)
        self._reader.join(timeout=10)
        return code

    def text(self) -> str:
        return "".join(self.lines)[-3000:]


def _final(model_dir):
    steps = checkpoints.list_steps(os.path.join(model_dir, "checkpoints"))
    return checkpoints.read(checkpoints.path_for(os.path.join(model_dir, "checkpoints"), steps[-1]))


def _history(model_dir):
    with open(os.path.join(model_dir, "metrics.json")) as f:
        return json.load(f)["training"]


@pytest.fixture(scope="module")
def uninterrupted(tiny_preset, tmp_path_factory):
    model_dir = str(tmp_path_factory.mktemp("a") / "model")
    proc = run_python(_args(tiny_preset, model_dir), env={"KFT_QUIET": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return model_dir


@pytest.mark.slow
def test_sigkill_mid_epoch_then_rerun_ends_bit_identical_to_an_uninterrupted_run(
        tiny_preset, uninterrupted, tmp_path):
    a = _final(uninterrupted)
    total = a.step
    model_dir = str(tmp_path / "model")
    run = _Process(_args(tiny_preset, model_dir))
    killed_at = run.signal_after(total // 2 + 3, signal.SIGKILL)  # mid-epoch 2, off the 7-step grid
    assert run.wait() == -signal.SIGKILL
    resumed_from = max(checkpoints.list_steps(os.path.join(model_dir, "checkpoints")))
    rerun = run_python(_args(tiny_preset, model_dir), env={"KFT_QUIET": "1"})
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"resumed from {checkpoints.path_for(os.path.join(model_dir, 'checkpoints'), resumed_from)}" \
        in rerun.stderr
    b = _final(model_dir)
    assert b.step == total
    assert sorted(a.tensors) == sorted(b.tensors)
    diff = max(float(np.max(np.abs(a.tensors[k].astype(np.float64) - b.tensors[k].astype(np.float64))))
               for k in a.tensors)
    print(f"\nSIGKILL: {total} steps; killed after step {killed_at}, resumed from checkpoint step "
          f"{resumed_from}; {len(a.tensors)} tensors compared, max |A - B| = {diff}")
    for k in a.tensors:
        np.testing.assert_array_equal(a.tensors[k], b.tensors[k], err_msg=k)
    assert _history(model_dir)["history"] == _history(uninterrupted)["history"]


@pytest.mark.slow
def test_sigterm_saves_the_current_step_exits_75_and_the_rerun_finishes_the_same_steps(
        tiny_preset, uninterrupted, tmp_path):
    a = _final(uninterrupted)
    model_dir = str(tmp_path / "model")
    run = _Process(_args(tiny_preset, model_dir))
    run.signal_after(a.step // 3, signal.SIGTERM)
    assert run.wait() == 75, run.text()
    m = re.search(r"stopped by SIGTERM at step (\d+)", run.text())
    assert m, run.text()
    stopped = int(m.group(1))
    saved = checkpoints.latest(os.path.join(model_dir, "checkpoints"))
    assert saved.step == stopped and 0 < stopped < a.step
    rerun = run_python(_args(tiny_preset, model_dir), env={"KFT_QUIET": "1"})
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    b = _final(model_dir)
    assert b.step == a.step == _history(model_dir)["steps"]
    diff = max(float(np.max(np.abs(a.tensors[k].astype(np.float64) - b.tensors[k].astype(np.float64))))
               for k in a.tensors)
    print(f"\nSIGTERM: stopped and saved at step {stopped}; rerun ended at step {b.step} "
          f"(uninterrupted: {a.step}); max |A - B| = {diff}")
    assert diff == 0.0


@pytest.mark.slow
def test_ctrl_c_saves_the_current_step_exits_75_without_a_traceback_and_the_rerun_finishes(
        tiny_preset, uninterrupted, tmp_path):
    a = _final(uninterrupted)
    model_dir = str(tmp_path / "model")
    run = _Process(_args(tiny_preset, model_dir))
    run.signal_after(a.step // 3, signal.SIGINT)
    assert run.wait() == 75, run.text()
    m = re.search(r"stopped by Ctrl-C at step (\d+)", run.text())
    assert m and "Traceback" not in run.text(), run.text()
    assert checkpoints.latest(os.path.join(model_dir, "checkpoints")).step == int(m.group(1))
    rerun = run_python(_args(tiny_preset, model_dir), env={"KFT_QUIET": "1"})
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert _final(model_dir).step == a.step


def test_a_first_ctrl_c_asks_the_loop_to_stop_and_a_second_raises_at_once():
    from kft.training import preemption

    # as in a terminal, even when this suite runs as a background job (which ignores SIGINT)
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with preemption.SigtermFlag() as flag:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)  # Python runs the handler between bytecodes
            assert flag.raised and flag.by == "Ctrl-C"
            with pytest.raises(KeyboardInterrupt):
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.05)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, inherited)


def test_an_immediate_ctrl_c_is_one_line_naming_the_last_checkpoint_and_status_130(tmp_path, monkeypatch, capsys):
    from kft import train
    from kft.training import trainer

    model_dir = tmp_path / "model"
    (model_dir / "checkpoints").mkdir(parents=True)
    (model_dir / "checkpoints" / "ckpt-00000042.safetensors").write_bytes(b"")

    def interrupted(config, model_dir):
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer, "train_and_evaluate", interrupted)
    train.FLAGS(["kft.train", f"--model_dir={model_dir}"])
    try:
        assert train.main(["kft.train"]) == 130
    finally:
        train.FLAGS.unparse_flags()
    err = capsys.readouterr().err
    assert err.strip() == (f"interrupted: stopped at once; the last checkpoint is step 42 in {model_dir}/checkpoints; "
                           "rerun the same command to continue")


@pytest.mark.slow
def test_a_truncated_newest_checkpoint_is_skipped_by_name_and_the_rerun_resumes_from_the_previous(
        tiny_preset, tmp_path):
    model_dir = str(tmp_path / "model")
    folder = os.path.join(model_dir, "checkpoints")
    args = _args(tiny_preset, model_dir, "--epochs=1", "--checkpoint_every_steps=10")
    first = run_python(args, env={"KFT_QUIET": "1"})
    assert first.returncode == 0, first.stderr[-3000:]
    steps = checkpoints.list_steps(folder)
    assert len(steps) == 3
    newest, previous = (checkpoints.path_for(folder, s) for s in (steps[-1], steps[-2]))
    with open(newest, "r+b") as f:
        f.truncate(os.path.getsize(newest) // 3)
    rerun = run_python(args, env={"KFT_QUIET": "1"})
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"skipping bad checkpoint: {newest}: unreadable checkpoint" in rerun.stderr
    assert f"resumed from {previous}" in rerun.stderr
    assert checkpoints.latest(folder).step == steps[-1]  # trained the missing steps again
    for step in checkpoints.list_steps(folder):
        with open(checkpoints.path_for(folder, step), "wb") as f:
            f.write(b"garbage" * 100)
    none_left = run_python(args, env={"KFT_QUIET": "1"})
    assert none_left.returncode == 2
    assert f"error: {folder}: none of the 3 checkpoint(s) is usable" in none_left.stderr


@pytest.mark.slow
def test_a_diverging_loss_stops_naming_the_step_keeps_good_checkpoints_and_exports_nothing(
        tiny_preset, tmp_path):
    model_dir, export_dir = str(tmp_path / "model"), str(tmp_path / "exports")
    args = _args(tiny_preset, model_dir, "--learning_rate=1e5", "--checkpoint_every_steps=2", "--export",
                 f"--export_dir={export_dir}")
    proc = run_python(args, env={"KFT_QUIET": "1"})
    assert proc.returncode == 3, proc.stderr[-3000:]
    m = re.search(r"error: training loss became nan at step (\d+); .* Last good checkpoint: (\S+)\.",
                  proc.stderr)
    assert m, proc.stderr[-3000:]
    good = checkpoints.latest(os.path.join(model_dir, "checkpoints"))
    assert good is not None and good.step < int(m.group(1)) and m.group(2) == good.path
    assert all(np.isfinite(v).all() for v in good.tensors.values() if v.dtype.kind == "f")
    assert not os.path.exists(export_dir) and not os.path.exists(os.path.join(model_dir, "metrics.json"))


def _start_workers(preset, model_dir, tmp_path, tag):
    """Two kft.train processes forming one multi_worker_mirrored job on localhost."""
    import socket

    ports = []
    for _ in range(2):
        with socket.socket() as s:
            s.bind(("localhost", 0))
            ports.append(s.getsockname()[1])
    cluster = {"worker": [f"localhost:{p}" for p in ports]}
    procs, errs = [], []
    for i in range(2):
        env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "KFT_QUIET": "1",
               "TF_CONFIG": json.dumps({"cluster": cluster, "task": {"type": "worker", "index": i}})}
        err = tmp_path / f"{tag}-worker{i}.log"
        errs.append(err)
        # Files, not pipes: a worker blocked on a full pipe would stall the other in a collective.
        procs.append(subprocess.Popen(
            [sys.executable, *_args(preset, model_dir, "--strategy=multi_worker_mirrored")], cwd=ROOT,
            env=env, stdout=subprocess.DEVNULL, stderr=open(err, "w")))
    return procs, errs


def _wait_all(procs, timeout: float = 300) -> list:
    """Exit codes of all processes; any still running after `timeout` is killed."""
    deadline = time.time() + timeout
    try:
        return [p.wait(timeout=max(1.0, deadline - time.time())) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()


@pytest.mark.slow
def test_sigterm_to_one_worker_stops_both_at_the_same_step_and_the_job_resumes(tiny_preset, uninterrupted,
                                                                              tmp_path):
    total = _final(uninterrupted).step
    model_dir = str(tmp_path / "model")
    procs, errs = _start_workers(tiny_preset, model_dir, tmp_path, "first")
    try:
        deadline = time.time() + 300
        while time.time() < deadline and all(p.poll() is None for p in procs):
            steps = re.findall(r"step (\d+)/\d+ \(epoch", errs[0].read_text())
            if steps and int(steps[-1]) >= total // 3:
                break
            time.sleep(0.02)
        assert all(p.poll() is None for p in procs), errs[0].read_text()[-3000:]
        procs[1].send_signal(signal.SIGTERM)  # only the non-chief is preempted
    except BaseException:
        for p in procs:
            p.kill()
        raise
    codes = _wait_all(procs)
    assert codes == [75, 75], [e.read_text()[-2000:] for e in errs]
    stopped = [int(re.search(r"stopped by SIGTERM at step (\d+)", e.read_text()).group(1)) for e in errs]
    assert stopped[0] == stopped[1] < total
    assert checkpoints.latest(os.path.join(model_dir, "checkpoints")).step == stopped[0]
    procs, errs = _start_workers(tiny_preset, model_dir, tmp_path, "rerun")
    assert _wait_all(procs) == [0, 0], [e.read_text()[-2000:] for e in errs]
    assert _history(model_dir)["steps"] == total and _history(model_dir)["workers"] == 2
    print(f"\nmulti-worker SIGTERM: both workers stopped at step {stopped[0]}; the rerun ended at {total}")


def test_after_training_sigterm_raises_at_once_naming_the_phase_and_the_saved_step(tmp_path):
    from kft.training import loop

    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(loop.PreemptedAfterTraining) as e:
        with loop.sigterm_scope():
            stop = loop.StopOnSigterm(str(tmp_path / "checkpoints"), 12)
            stop.phase = "the export"
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # interrupted by the handler
    assert signal.getsignal(signal.SIGTERM) is before  # put back when the run ends
    assert isinstance(e.value, loop.Preempted)  # kft.train exits with loop.EXIT_PREEMPTED
    assert str(e.value).startswith("stopped by SIGTERM during the export, after training had finished at "
                                   "step 12 (no training to save)")


@pytest.mark.slow
def test_sigterm_during_the_export_exits_75_leaves_no_version_and_the_rerun_exports_without_training(
        tiny_preset, tmp_path):
    model_dir, export_dir = str(tmp_path / "model"), tmp_path / "exports"
    args = _args(tiny_preset, model_dir, "--epochs=1", "--export", f"--export_dir={export_dir}",
                 "--run_name=r")
    run = _Process(args)
    deadline = time.time() + 300
    while not any("exporting SavedModel to" in line for line in run.lines) and run.proc.poll() is None \
            and time.time() < deadline:
        time.sleep(0.005)
    assert run.proc.poll() is None, "the run ended before its export could be interrupted:\n" + run.text()
    trained = run.step
    run.proc.send_signal(signal.SIGTERM)
    assert run.wait() == 75, run.text()
    assert re.search(rf"preempted: stopped by SIGTERM during the export, after training had finished at step "
                     rf"{trained} \(saved in \S+ckpt-0+{trained}\.safetensors\)", run.text()), run.text()
    assert "Traceback" not in run.text()
    assert [n for n in os.listdir(export_dir / "r") if n.isdigit()] == []  # no half-written version
    assert checkpoints.latest(os.path.join(model_dir, "checkpoints")).step == trained

    rerun = run_python(args, env={"KFT_QUIET": "1"})
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "resumed from" in rerun.stderr and not re.search(r"step \d+/\d+ \(epoch", rerun.stderr)
    assert "evaluating 60 eval examples" in rerun.stderr  # evaluated again
    assert sorted(os.listdir(export_dir / "r")) == ["1"]  # leftovers of the interrupted export removed
    assert os.path.exists(export_dir / "r" / "1" / "saved_model.pb")
    assert _history(model_dir)["steps"] == trained
