"""Running a study: the learning-rate grids, then the seeds of each chosen lr, resumably.

Every finished run is appended to `runs.jsonl` in the output folder (one JSON record per
line, keyed by `run_key`) and `study.json` is
rewritten, so a study that is killed leaves its results behind and a rerun with the same
settings only does what is missing. With `workers > 1` independent runs go to a pool
of spawned processes that share the device (on a GPU, small batches leave it idle between
kernel launches; other processes fill those gaps).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import platform
import queue
import signal
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

import torch

from sngm_integrations.study.config import RunConfig, StudyConfig, run_key
from sngm_integrations.study.data import SplitData, StudyData, load_study_data, split_data
from sngm_integrations.study.report import best_lr, grid_lrs, write_json, write_reports
from sngm_integrations.study.train import train_run

__all__ = [
    "ResultsStore",
    "StudyResult",
    "environment",
    "provenance",
    "reproduce_command",
    "run_study",
    "threads_per_run",
]


class ResultsStore:
    """Finished runs, in memory and appended to a JSON-lines file as they finish."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.records: dict[str, dict[str, Any]] = {}
        if path.exists():
            for line in path.read_text().splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:  # a line cut short when a study was killed
                    continue
                self.records[record["key"]] = record

    def __contains__(self, key: str) -> bool:
        return key in self.records

    def add(self, record: dict[str, Any]) -> None:
        """Keep `record` and append it to the file (flushed to disk before returning)."""
        self.records[record["key"]] = record
        with self.path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")
            handle.flush()
            os.fsync(handle.fileno())


@dataclass
class StudyResult:
    """What `run_study` returns: the Markdown report, the status and this study's runs."""

    report: str
    status: str  # "complete", "time budget reached" or "interrupted"
    records: dict[str, dict[str, Any]]
    new_runs: int
    out: Path


def _package_version(name: str) -> str | None:
    try:
        return importlib_metadata.version(name)
    except importlib_metadata.PackageNotFoundError:
        return None


def _program_name() -> str:
    program = Path(sys.argv[0]).name
    return "python -m sngm_integrations.study" if program == "__main__.py" else program


def _git(*args: str) -> str | None:
    folder = Path(__file__).resolve().parent
    try:
        done = subprocess.run(
            ["git", *args], cwd=folder, capture_output=True, text=True, timeout=10, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip()


def provenance(device: str) -> dict[str, Any]:
    """The code and machine a run ran on: git commit (and whether the tree was dirty),
    versions of sngm-integrations, torch and timm, and the device's name.
    """
    import sngm_integrations

    commit = _git("rev-parse", "HEAD")
    status = _git("status", "--porcelain", "--untracked-files=no") if commit else None
    torch_device = torch.device(device)
    if torch_device.type == "cuda":
        device_name = torch.cuda.get_device_name(torch_device)
    else:
        device_name = _cpu_name()
    return {
        "git_commit": commit,
        "git_dirty": None if status is None else bool(status),
        "sngm_integrations": sngm_integrations.__version__,
        "torch": torch.__version__,
        "timm": _package_version("timm"),
        "device_name": device_name,
    }


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(study: StudyConfig) -> dict[str, Any]:
    """This invocation: command line, provenance, Python, platform, device and workers."""
    info: dict[str, Any] = {
        "command": " ".join([_program_name(), *sys.argv[1:]]),
        **provenance(study.device),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "device": study.device,
        "workers": study.workers,
    }
    if study.device.startswith("cuda"):
        info["cuda"] = torch.version.cuda
        info["cudnn"] = torch.backends.cudnn.version()  # type: ignore[no-untyped-call]
    else:
        info["torchthreads_per_run"] = threads_per_run(study)
    return info


def threads_per_run(study: StudyConfig) -> int:
    """Torch threads of each run: all of them for one worker, else the cores shared out."""
    if study.workers == 1:
        return torch.get_num_threads()
    if study.device.startswith("cuda"):
        return 1  # a worker only launches kernels
    return max(1, (os.cpu_count() or 1) // study.workers)


# Per-process state of a worker: the dataset on the CPU and its device split, made once.
_WORKER: dict[str, Any] = {}


def _init_worker(data: StudyData, device: str, threads: int) -> None:
    torch.set_num_threads(threads)
    if device.startswith("cuda"):
        torch.backends.cudnn.benchmark = True
    _WORKER.update(data=data, device=device, splits={}, provenance=provenance(device))


def _run_in_worker(config: RunConfig, eval_batch_size: int) -> dict[str, Any]:
    split_id = (config.split_seed, config.train_size, config.val_size, config.test_size)
    splits: dict[tuple[Any, ...], SplitData] = _WORKER["splits"]
    if split_id not in splits:
        splits[split_id] = split_data(_WORKER["data"], config, _WORKER["device"])
    try:
        record = train_run(config, splits[split_id], eval_batch_size)
    except Exception as err:  # one failed run (say, out of memory) must not end the study
        return {"key": run_key(config), "error": f"{type(err).__name__}: {err}"}
    record["provenance"] = _WORKER["provenance"]
    return record


def _describe(config: RunConfig) -> str:
    return (
        f"{config.optimizer} b={config.batch_size} steps={config.steps} lr={config.lr:g} "
        f"seed={config.seed}"
    )


class _SerialRunner:
    """Runs each submitted config at once, in this process."""

    def __init__(self, data: StudyData, study: StudyConfig) -> None:
        _init_worker(data, study.device, torch.get_num_threads())
        self.eval_batch_size = study.eval_batch_size
        self.done: deque[dict[str, Any]] = deque()

    def submit(self, config: RunConfig) -> None:
        self.done.append(_run_in_worker(config, self.eval_batch_size))

    def next_result(self) -> dict[str, Any]:
        return self.done.popleft()

    def close(self, terminate: bool = False) -> None:
        pass


class _PoolRunner:
    """Runs submitted configs in a pool of spawned worker processes."""

    def __init__(self, data: StudyData, study: StudyConfig) -> None:
        context = multiprocessing.get_context("spawn")
        init_args = (data, study.device, threads_per_run(study))
        self.pool = context.Pool(study.workers, _init_worker, init_args)
        self.eval_batch_size = study.eval_batch_size
        self.done: queue.Queue[dict[str, Any]] = queue.Queue()

    def submit(self, config: RunConfig) -> None:
        def failed(err: BaseException) -> None:
            self.done.put({"key": run_key(config), "error": f"{type(err).__name__}: {err}"})

        self.pool.apply_async(
            _run_in_worker,
            (config, self.eval_batch_size),
            callback=self.done.put,
            error_callback=failed,
        )

    def next_result(self) -> dict[str, Any]:
        while True:  # short waits, so that Ctrl-C and SIGTERM get through
            try:
                return self.done.get(timeout=0.5)
            except queue.Empty:
                continue

    def close(self, terminate: bool = False) -> None:
        if terminate:
            self.pool.terminate()
        else:
            self.pool.close()
        self.pool.join()


@contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """Turn SIGTERM (`timeout`, a batch scheduler) into KeyboardInterrupt, to save results."""

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    try:
        previous = signal.signal(signal.SIGTERM, interrupt)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _progress_bar(total: int, initial: int, enabled: bool) -> Any:
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="study", unit="run", dynamic_ncols=True)


def run_study(
    study: StudyConfig,
    out: str | os.PathLike[str],
    *,
    data: StudyData | None = None,
    progress: bool = True,
    plots: bool = True,
    log: Callable[[str], None] | None = None,
) -> StudyResult:
    """Run (or resume) `study`, writing every result under `out`.

    Args:
        study: What to run.
        out: Output folder (created). Runs already in its `runs.jsonl` are not redone.
        data: The dataset; loaded from `study.dataset` when not given.
        progress: Show a progress bar and one line per finished run.
        plots: Write the PNG plots at the end.
        log: Where per-run lines go (default: through the progress bar, or nowhere).

    Returns:
        The Markdown report and the runs. On Ctrl-C or SIGTERM the results so far are
        written, with status `interrupted`, before KeyboardInterrupt propagates.
    """
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    store = ResultsStore(out_dir / "runs.jsonl")
    invocation = environment(study)
    invocation["started"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    metadata: dict[str, Any] = {
        "invocations": [*_earlier_invocations(out_dir), invocation],
        "reproduce": reproduce_command(study, out_dir),
    }
    started = time.monotonic()

    planned: set[str] = set()
    relevant: set[str] = set()
    todo: deque[RunConfig] = deque()

    def plan() -> None:
        """Queue every run the results so far call for: grid points at the back, the seeds
        of a finished grid at the front (so that a stopped study has whole groups).
        """
        for group in study.groups():
            grid = [
                study.run_config(*group, lr, study.base_seed)
                for lr in grid_lrs(study, store.records, group)
            ]
            lr = best_lr(study, store.records, group)
            seeds = study.seed_runs(*group, lr) if lr is not None else []
            for config in grid + seeds:
                relevant.add(run_key(config))
            new = [c for c in grid + seeds if run_key(c) not in store and run_key(c) not in planned]
            planned.update(run_key(c) for c in new)
            todo.extend(c for c in new if c in grid)
            todo.extendleft(reversed([c for c in new if c not in grid]))

    def study_records() -> dict[str, dict[str, Any]]:
        return {k: r for k, r in store.records.items() if k in relevant}

    plan()
    bar = _progress_bar(len(relevant), len(study_records()), progress)
    if log is None:
        log = bar.write if bar is not None else (lambda line: None)

    if todo:  # nothing to run: skip loading the data and starting workers
        data = data if data is not None else load_study_data(study)
        runner_class = _PoolRunner if study.workers > 1 else _SerialRunner
        runner: _SerialRunner | _PoolRunner | None = runner_class(data, study)
    else:
        runner = None
    running: dict[str, RunConfig] = {}
    status, new_runs = "complete", 0
    try:
        with _sigterm_as_interrupt():
            while todo or running:
                over_budget = (
                    study.time_budget is not None and time.monotonic() - started > study.time_budget
                )
                while todo and runner is not None and len(running) < study.workers:
                    if over_budget:
                        status = "time budget reached"
                        todo.clear()
                        break
                    config = todo.popleft()
                    running[run_key(config)] = config
                    if bar is not None:
                        latest = f"latest: {_describe(config)}"
                        bar.set_postfix_str(f"{len(running)} running, {latest}", refresh=True)
                    runner.submit(config)
                if not running or runner is None:
                    break
                record = runner.next_result()
                config = running.pop(record["key"])
                if "error" in record:
                    log(f"FAILED {_describe(config)}: {record['error']}")
                else:
                    store.add(record)
                    new_runs += 1
                    log(
                        f"{_describe(config)}: val {record['val_acc']:.2f}% "
                        f"test {record['test_acc']:.2f}% ({record['seconds']:.1f} s)"
                        + (" diverged" if record["diverged"] else "")
                    )
                    plan()
                    invocation["new_runs"] = new_runs
                    write_json(out_dir, study, study_records(), metadata, "running")
                if bar is not None:
                    bar.total = len(relevant)
                    bar.update(1)
    except KeyboardInterrupt:
        status = "interrupted"
        raise
    finally:
        if runner is not None:
            runner.close(terminate=status == "interrupted")
        if bar is not None:
            bar.close()
        invocation["new_runs"] = new_runs
        invocation["wall_seconds"] = round(time.monotonic() - started, 1)
        report = write_reports(out_dir, study, study_records(), metadata, status, plots=plots)
    return StudyResult(report, status, study_records(), new_runs, out_dir)


def _earlier_invocations(out_dir: Path) -> list[dict[str, Any]]:
    """The invocations recorded in an earlier `study.json` of this folder."""
    path = out_dir / "study.json"
    if not path.exists():
        return []
    try:
        invocations = json.loads(path.read_text()).get("environment", {}).get("invocations", [])
    except json.JSONDecodeError:
        return []
    return list(invocations)


def reproduce_command(study: StudyConfig, out_dir: Path) -> str:
    """A command line that reruns `study` into `out_dir` (settings that differ from the
    matching preset are spelled out; a folder with results resumes).
    """
    from sngm_integrations.study.cli import command_line

    return command_line(study, out_dir)
