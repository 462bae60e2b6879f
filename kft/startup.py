"""TensorFlow's start-up without its C++ chatter, for the entry points (kft.train, predict, bench).

On a CPU-only machine every `import tensorflow` printed, twice, lines such as `oneDNN custom
operations are on`, `cudart_stub.cc ... Could not find cuda drivers` and `E0000 ...
cuda_platform.cc:52] failed call to cuInit`. Why TF_CPP_MIN_LOG_LEVEL did not stop them: they are
logged from C++ static initialisers before absl::InitializeLog() has run, and absl writes such
early messages to stderr whatever the level. Why twice (same process and thread, not a second
process or a re-import): `import tensorflow` loads libtensorflow_framework.so and, later in the
same import, tensorflow/python/profiler/internal/_pywrap_profiler_plugin.so, which links its own
copy of TensorFlow's platform code and of absl's logging state; each copy's initialisers print
the lines, each absl copy its "All log messages before absl::InitializeLog() ..." header.

So the entry points import TensorFlow with file descriptor 2 pointed at a temporary file, then
write back everything except those known start-up lines (a real import error still shows).
TF_CPP_MIN_LOG_LEVEL=0 (all of TensorFlow's log) turns the filtering off.
"""

from __future__ import annotations

import os
import re
import sys
import tempfile

# What TensorFlow prints at start-up on machines without (working) accelerators.
CHATTER = re.compile(
    r"All log messages before absl::InitializeLog\(\) is called"
    r"|\] oneDNN custom operations are on"
    r"|cudart_stub\.cc:\d+\]"
    r"|cpu_feature_guard\.cc:\d+\]|^To enable the following instructions:"
    r"|cuda_platform\.cc:\d+\]|failed call to cuInit"
    r"|Unable to register cu(DNN|FFT|BLAS) factory"
    r"|computation_placer\.cc:\d+\] computation placer already registered"
    r"|TF-TRT Warning: Could not find TensorRT")

# 3 (FATAL only) rather than 2: on every run TensorFlow also logs at ERROR level from C++ what is
# a warning in all but name (oneDNN's "supports DT_INT64 only on platforms with AVX-512" at the
# first int64 op). kft reports real failures itself, from the exceptions TensorFlow raises; set
# TF_CPP_MIN_LOG_LEVEL=2 (or lower) to see TensorFlow's own lines again.
DEFAULT_TF_LOG_LEVEL = "3"


def quiet_environment() -> None:
    """Before anything imports TensorFlow: its C++ log level, unless the user chose one."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", DEFAULT_TF_LOG_LEVEL)
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")


def import_tensorflow() -> None:
    """Imports TensorFlow with its start-up chatter left out of stderr (see the module docstring)."""
    if "tensorflow" in sys.modules or os.environ.get("TF_CPP_MIN_LOG_LEVEL") == "0":
        import tensorflow  # noqa: F401
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as capture:
        os.dup2(capture.fileno(), 2)
        try:
            import tensorflow  # noqa: F401
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            text = capture.read().decode("utf-8", errors="replace")
            kept = [line for line in text.splitlines(keepends=True) if not CHATTER.search(line)]
            if kept:
                sys.stderr.write("".join(kept))
                sys.stderr.flush()
