"""Plumbing shared by the `dam-bench` benchmark modules.

- `run_benchmark`: the `main(argv)` of a benchmark module: parse, log at INFO, run, and turn a
  `DamInputError` into one `dam-bench <name>: error: ...` line and exit status 2.
- `ResumableResults` and `gather_with_flush`: the bookkeeping of a judge run that can be
  interrupted and rerun: the previous output file is read back so its responses can be reused,
  finished items are written atomically every few seconds (and on an error or Ctrl-C), and the
  final file holds every item in input order followed by the totals.
- `check_predictions`: the error for ids that have no prediction; `run_closing`: runs a judge
  coroutine and closes the judge.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import time
from pathlib import Path
from typing import Any, Awaitable, Callable, Collection, Iterable, Mapping, TypeVar

from dam.errors import DamInputError
from dam.jsonio import read_json, write_json_atomic

logger = logging.getLogger(__name__)

T = TypeVar("T")

LOG_FORMAT = "%(levelname)s %(name)s: %(message)s"


def run_benchmark(
    prog: str | Callable[[argparse.Namespace], str],
    parser: argparse.ArgumentParser,
    run: Callable[[argparse.Namespace], int],
    argv: list[str] | None,
) -> int:
    """Parse `argv` with `parser`, log at INFO and return `run(args)`.

    A `DamInputError` (a user-fixable problem) exits with status 2 after one line on stderr,
    `<prog>: error: <message>`, and no traceback; `prog` may be a function of the parsed
    arguments (e.g. to name a subcommand). argparse's own errors and --help exit as usual.
    """
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    try:
        return run(args)
    except DamInputError as exc:
        name = prog(args) if callable(prog) else prog
        parser.exit(2, f"{name}: error: {exc}\n")


def check_predictions(
    preds: Mapping[str, Any],
    keys: Collection[str],
    *,
    items: str,
    hint: str,
    prediction: str = "prediction",
    id_name: str = "id",
) -> None:
    """Raise `DamInputError` naming how many of `keys` have no string in `preds`, one example and
    `hint`: "<n> of <total> <items> have no <prediction> (e.g. <id_name> '<key>'); <hint>"."""
    missing = [key for key in keys if not isinstance(preds.get(key), str)]
    if missing:
        raise DamInputError(
            f"{len(missing)} of {len(keys)} {items} have no {prediction} (e.g. {id_name} {missing[0]!r}); {hint}"
        )


def load_previous_results(out: str | Path | None, what: str) -> dict[str, Any]:
    """The JSON object stored in `out` by an earlier run ({} if there is none), to reuse its
    judge responses; `what` names the file in read errors."""
    if out is None or not Path(out).exists():
        return {}
    loaded = read_json(out, what)
    if not isinstance(loaded, dict):
        return {}
    logger.info("resuming: reusing judge responses stored in %s", out)
    return loaded


class ResumableResults:
    """Results of one run keyed as `keys`, written to `out` (if given) merged with an earlier run's.

    `previous` is what `out` held before this run (see `load_previous_results`); `done` collects
    this run's results. `write` keeps items of the earlier run that are not redone yet, so an
    interrupted rerun never loses output.
    """

    def __init__(self, out: str | Path | None, keys: Iterable[str], what: str) -> None:
        self.out = out
        self.keys = list(keys)
        self.previous = load_previous_results(out, what)
        self.done: dict[str, dict[str, Any]] = {}

    def previous_entry(self, key: str) -> dict[str, Any] | None:
        """The earlier run's result of `key` if it is a JSON object."""
        entry = self.previous.get(key)
        return entry if isinstance(entry, dict) else None

    def ordered(self) -> dict[str, dict[str, Any]]:
        """This run's results in `keys` order (every key must be done)."""
        return {key: self.done[key] for key in self.keys}

    def write(self, totals: Mapping[str, Any] | None = None) -> None:
        """Write `out` atomically: each key's result (this run's, else the earlier run's) in
        `keys` order, then `totals` (given on the final write)."""
        if self.out is None:
            return
        merged: dict[str, Any] = {}
        for key in self.keys:
            entry = self.done.get(key, self.previous_entry(key))
            if entry is not None:
                merged[key] = entry
        if totals:
            merged.update(totals)
        write_json_atomic(self.out, merged)


async def gather_with_flush(
    results: ResumableResults,
    work: Callable[[str], Awaitable[None]],
    *,
    desc: str,
    unit: str,
    flush_interval_s: float,
    progress: bool,
) -> None:
    """Run `work(key)` concurrently for every key of `results` with a progress bar, writing the
    partial results at most every `flush_interval_s`; on an error or cancellation the other
    tasks are cancelled and what is done is written before the error propagates."""
    from tqdm.auto import tqdm

    tasks = [asyncio.ensure_future(work(key)) for key in results.keys]
    last_flush = time.monotonic()
    try:
        with tqdm(total=len(tasks), desc=desc, unit=unit, disable=not progress) as bar:
            for fut in asyncio.as_completed(tasks):
                await fut
                bar.update(1)
                if time.monotonic() - last_flush > flush_interval_s:
                    results.write()
                    last_flush = time.monotonic()
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        results.write()  # keep every finished item for the rerun
        raise


def run_closing(judge: Any, make: Callable[[], Awaitable[T]]) -> T:
    """`asyncio.run` the awaitable `make()` returns, then close `judge` (its `aclose`, if any)."""

    async def run() -> T:
        try:
            return await make()
        finally:
            close = getattr(judge, "aclose", None)
            if close is not None:
                await close()

    return asyncio.run(run())
