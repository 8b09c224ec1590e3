"""Names and numbers the library and the command line share. It imports nothing, so
the command line can use them without loading the library (startup time)."""

SIDECAR_SUFFIX = ".holder"
"""The sidecar of session ``S`` is ``S + SIDECAR_SUFFIX``."""

SESSION_SUFFIX = ".jsonl"
"""What `scan` takes for a session file in a directory."""

COMMAND_NAME = "fencelock"
"""The process name of the installed ``fencelock`` command (its script's name), as the
system lists a lock's owners."""

DEFAULT_STUCK_AFTER = 600.0
"""A live holder whose heartbeat is older than this many seconds is reported stuck."""

# Exit codes of the command line (`fencelock hold` uses the first three too).
EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2  # click's own, for its usage errors
EXIT_STALE = 3
EXIT_CONTENDED = 4
EXIT_PROBLEMS = 5
EXIT_NOT_EXECUTABLE = 126
EXIT_NOT_FOUND = 127
EXIT_INTERRUPTED = 130  # 128 + SIGINT
EXIT_CLOSED_PIPE = 141  # 128 + SIGPIPE: what a shell shows for `cmd | head` that SIGPIPE ended

NO_WORKING_DIRECTORY = ("the working directory no longer exists: change to one that does, "
                        "or give an absolute path")
"""The fix for a relative path given after the working directory was removed."""
