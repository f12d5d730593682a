"""Run one measured target in this fresh interpreter, and report on it as JSON.

    python -m bench.target --target project|previous|baseline --event FILE --result FILE
                           [--warmup-event FILE] [--profile F] [--timeout-ms MS]
    python -m bench.target --import MODULE --result FILE

The target's module is imported first, with nothing but `sys` and `time` loaded by this
harness before it, and the import is timed. With `--warmup-event`, `lambda_handler` first
runs once on that event (its own fake context), untimed but for its wall time, so the
measured call is the process's second, warm, invocation, as most are in a busy Lambda.
Then the event is loaded, the peak-RSS mark is reset (Linux `/proc/self/clear_refs`), and
`lambda_handler(event, context)` runs once with a fake Lambda context (whose remaining time
starts at `--timeout-ms`, default 15 minutes, Lambda's longest timeout). Reported: import
time, wall time of the call, CPU time, the response, and memory: the peak RSS during the
call (`VmHWM` after the reset; it includes everything resident, interpreter, libraries and
event), the RSS just before the call, and `getrusage(RUSAGE_SELF).ru_maxrss` for reference
(on Linux it also counts what the process inherited from its parent before exec); with a
warm-up, also its wall time, record count and response. Last, the modules of this tree's
top-level names (handler, the package, bench) that were loaded from anywhere else, e.g. an
editable install of another tree: there must be none, or the run measured other code.

`project` and `previous` run the same way (`handler.lambda_handler`), each from its own tree.

The settings come from the environment, which the benchmark sets for each run.
"""

import sys
import time


def _option(name: str) -> str | None:
    argv = sys.argv[1:]
    if name in argv:
        index = argv.index(name)
        if index + 1 < len(argv):
            return argv[index + 1]
        raise SystemExit(f"{name} needs a value")
    return None


def _timed_import(module: str) -> tuple[object, float]:
    start = time.perf_counter()
    __import__(module)
    elapsed = time.perf_counter() - start
    return sys.modules[module], elapsed


def main() -> None:
    result_file = _option("--result")
    if result_file is None:
        raise SystemExit(__doc__)
    only_import = _option("--import")
    if only_import is not None:
        _, seconds = _timed_import(only_import)
        _write(result_file, {"module": only_import, "import_ms": seconds * 1000})
        return
    target = _option("--target")
    event_file = _option("--event")
    modules = {"project": "handler", "previous": "handler", "baseline": "bench.baseline"}
    if target not in modules or event_file is None:
        raise SystemExit(__doc__)
    module, import_s = _timed_import(modules[target])
    run(
        target,
        module,
        import_s,
        event_file,
        result_file,
        _option("--profile"),
        _option("--warmup-event"),
        int(_option("--timeout-ms") or 900_000),
    )


def run(
    target: str,
    module: object,
    import_s: float,
    event_file: str,
    result_file: str,
    profile_file: str | None = None,
    warmup_file: str | None = None,
    timeout_ms: int = 900_000,
) -> None:
    import gc
    import json
    import os
    import resource
    import uuid

    _exit_with_parent()
    handler = module.lambda_handler  # type: ignore[attr-defined]
    warmup: dict[str, object] = {}
    if warmup_file is not None:
        # The process's first invocation: it pays the one-time costs (clients, connections).
        with open(warmup_file, encoding="utf-8") as stream:
            warmup_event = json.load(stream)
        warmup_start = time.perf_counter()
        warmup_response = handler(warmup_event, FakeContext(str(uuid.uuid4())))
        warmup = {
            "warmup_wall_s": time.perf_counter() - warmup_start,
            "warmup_records": len(warmup_event.get("Records", [])),
            "warmup_response": warmup_response,
        }
        del warmup_event, warmup_response
    with open(event_file, encoding="utf-8") as stream:
        event = json.load(stream)
    gc.collect()
    rss_before = _status_kib("VmRSS")
    hwm_reset = _reset_peak()
    context = FakeContext(str(uuid.uuid4()), timeout_ms)
    profiler = None
    if profile_file is not None:
        import cProfile

        profiler = cProfile.Profile()
    usage0 = resource.getrusage(resource.RUSAGE_SELF)
    called_at = time.time()  # wall clock: comparable across the instances of a fleet
    start = time.perf_counter()
    if profiler is not None:
        profiler.enable()
    response = handler(event, context)
    if profiler is not None:
        profiler.disable()
    wall = time.perf_counter() - start
    returned_at = time.time()
    if profiler is not None and profile_file is not None:
        profiler.dump_stats(profile_file)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    peak = _status_kib("VmHWM")
    _write(
        result_file,
        {
            "target": target,
            "module_file": getattr(module, "__file__", None),
            "import_ms": import_s * 1000,
            "wall_s": wall,
            "called_at": called_at,
            "returned_at": returned_at,
            "cpu_s": (usage.ru_utime - usage0.ru_utime) + (usage.ru_stime - usage0.ru_stime),
            "records": len(event.get("Records", [])),
            "response": response,
            "peak_rss_kib": peak if peak is not None else usage.ru_maxrss,
            "peak_rss_source": "VmHWM" if peak is not None else "ru_maxrss",
            "peak_reset_before_call": hwm_reset,
            "rss_before_kib": rss_before,
            "ru_maxrss_kib": usage.ru_maxrss,
            "stray_modules": _stray_modules(os.getcwd()),
            **warmup,
        },
    )
    sys.stdout.flush()
    # Skip interpreter teardown (and any warm connections' goodbyes): nothing is measured there.
    os._exit(0)


class FakeContext:
    """The bits of the Lambda context object a handler may use."""

    function_name = "async-notifier-bench"
    function_version = "$LATEST"
    invoked_function_arn = "arn:aws:lambda:us-east-1:123456789012:function:async-notifier-bench"
    memory_limit_in_mb = "1024"
    log_group_name = "/aws/lambda/async-notifier-bench"
    log_stream_name = "2025/01/01/[$LATEST]bench"

    def __init__(self, request_id: str, timeout_ms: int = 900_000) -> None:
        self.aws_request_id = request_id
        self._deadline = time.monotonic() + timeout_ms / 1000

    def get_remaining_time_in_millis(self) -> int:
        return max(0, int((self._deadline - time.monotonic()) * 1000))


def _stray_modules(tree: str) -> list[str]:
    """Loaded modules named like one of the tree's own but whose file lies outside it.

    The tree (the current directory) comes first on sys.path, so none are expected; the
    check is what makes sure `previous` and `project` each measured their own code.
    """
    import os

    root = os.path.realpath(tree)
    own = {
        entry.removesuffix(".py")
        for entry in os.listdir(root)
        if entry.endswith(".py") or os.path.isfile(os.path.join(root, entry, "__init__.py"))
    }
    strays = []
    for name, module in list(sys.modules.items()):
        path = getattr(module, "__file__", None)
        if name.partition(".")[0] not in own or path is None:
            continue
        if os.path.commonpath((root, os.path.realpath(path))) != root:
            strays.append(f"{name} ({path})")
    return sorted(strays)


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak() -> bool:
    """Reset VmHWM to the current RSS, so the peak read later is the call's own."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as clear:
            clear.write("5")
        return True
    except OSError:
        return False


def _exit_with_parent() -> None:
    """Do not outlive the benchmark if it is killed (the target may run for minutes)."""
    import os
    import threading

    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(3)

    threading.Thread(target=watch, daemon=True, name="bench-orphan-watch").start()


def _write(path: str, data: dict[str, object]) -> None:
    import json

    with open(path, "w", encoding="utf-8") as out:
        json.dump(data, out)


if __name__ == "__main__":
    main()
