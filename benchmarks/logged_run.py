"""One command of a GPU benchmark run as a subprocess, its output in a log file, under a time limit."""

import os
import subprocess
import time

from benchmark_paths import REPO


def run_logged(command: list[str], log_path: str, env: dict, timeout: float) -> dict:
    """Run `command` in the checkout with its stdout and stderr into `log_path`: exit_code (or "timeout"),
    wall_seconds, the log's path, and the tail of the log when it failed."""
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    started = time.perf_counter()
    with open(log_path, "w", encoding="utf-8") as log:
        try:
            code = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO,
                                  timeout=timeout).returncode  # fmt: skip
        except subprocess.TimeoutExpired:
            code = "timeout"
    result = {"exit_code": code, "wall_seconds": round(time.perf_counter() - started, 1), "log": log_path}
    if code != 0:
        with open(log_path, encoding="utf-8", errors="replace") as log:
            result["log_tail"] = log.read()[-3000:]
    return result
