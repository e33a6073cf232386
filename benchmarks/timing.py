"""Wall-time measurement shared by the benchmarks."""
import statistics
import time


def median_seconds(run, *, warmup: int, repeats: int) -> float:
  """Median wall time of run() (which must block until done) after `warmup` untimed calls."""
  return interleaved_medians({'only': run}, warmup=warmup, repeats=repeats)['only']


def interleaved_medians(runs: dict, *, warmup: int, repeats: int, rounds: int = 3) -> dict:
  """{name: median seconds} of each run(), timed in `rounds` alternating rounds.

  Alternating spreads any drift of the machine's speed over all runs alike; each round
  starts with an untimed call, so threads one library leaves spinning do not slow the first
  timed call of the other.
  """
  for run in runs.values():
    for _ in range(warmup):
      run()
  times = {name: [] for name in runs}
  for _ in range(rounds):
    for name, run in runs.items():
      run()
      for _ in range(max(1, repeats // rounds)):
        start = time.perf_counter()
        run()
        times[name].append(time.perf_counter() - start)
  return {name: statistics.median(seconds) for name, seconds in times.items()}
