"""Exit statuses of the kft command lines (kft.train, kft.tune), defined once for every entry point.

A scheduler or script tells from the status whether a rerun can help: 0 done; 2 bad data, flags,
backbone or checkpoint (nothing to retry); 3 the loss became NaN/Inf; 75 stopped by SIGTERM or a
Ctrl-C after saving (rerun the same command to continue); 130 stopped at once by a second Ctrl-C
(or one outside training). Plain constants, importable without TensorFlow.
"""

EXIT_BAD_INPUT = 2
EXIT_DIVERGED = 3
EXIT_PREEMPTED = 75  # EX_TEMPFAIL from sysexits.h, "try again later"
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report a Ctrl-C
