"""Progress and events of a run: tqdm bars on stderr, or JSON-lines events on stdout (--log-json)."""
from __future__ import annotations

import contextlib
import json
import sys
import time

__all__ = ["Events", "json_progress"]


class Events:
    """Human progress (tqdm bars with rate and ETA on stderr) or JSON-lines events on stdout."""

    def __init__(self, quiet: bool = False, log_json: bool = False, stream=None):
        self.quiet, self.log_json = quiet, log_json
        self.stream = stream or (sys.stdout if log_json else sys.stderr)
        self._last_progress = 0.0

    def emit(self, event: str, **fields) -> None:
        if self.log_json:
            rec = {"event": event, "time": round(time.time(), 3), **fields}
            self.stream.write(json.dumps(rec, default=str) + "\n")
            self.stream.flush()

    def info(self, msg: str, **fields) -> None:
        if self.log_json:
            self.emit("info", message=msg, **fields)
        elif not self.quiet:
            print(msg, file=sys.stderr, flush=True)

    def warn(self, msg: str, **fields) -> None:
        if self.log_json:
            self.emit("warning", message=msg, **fields)
        else:  # warnings are shown even with --quiet
            print(f"warning: {msg}", file=sys.stderr, flush=True)

    @contextlib.contextmanager
    def progress(self, stage: str, total: int | None, unit: str):
        """Yield ``update(n)``; draws a bar (rate, ETA) or emits throttled ``progress`` events."""
        t0 = time.perf_counter()
        done = [0]
        bar = None
        if not self.quiet and not self.log_json:
            from tqdm.auto import tqdm

            bar = tqdm(total=total, desc=f"{stage:>8}", unit=unit, file=sys.stderr, dynamic_ncols=True,
                       smoothing=0.1, mininterval=0.5)

        def update(n: int = 1):
            done[0] += n
            if bar is not None:
                bar.update(n)
            elif self.log_json:
                now = time.perf_counter()
                if now - self._last_progress >= 1.0 or (total and done[0] >= total):
                    self._last_progress = now
                    el = now - t0
                    rate = done[0] / el if el > 0 else None
                    eta = (total - done[0]) / rate if (rate and total) else None
                    self.emit("progress", stage=stage, done=done[0], total=total, unit=unit,
                              rate=None if rate is None else round(rate, 3),
                              eta_s=None if eta is None else round(eta, 1))

        try:
            yield update
        finally:
            if bar is not None:
                bar.close()



def json_progress(events: Events, stage: str):
    """``on_progress(done, total)`` callback that emits throttled ``progress`` events (rate, ETA)."""
    t0 = time.perf_counter()
    st = {"first": None, "last": 0.0}

    def cb(done: int, total: int) -> None:
        now = time.perf_counter()
        if st["first"] is None:
            st["first"] = done  # records already done by an earlier (resumed) run
        if now - st["last"] < 1.0 and done < total:
            return
        st["last"] = now
        rate = (done - st["first"]) / (now - t0) if now > t0 else 0.0
        eta = (total - done) / rate if rate > 0 else None
        events.emit("progress", stage=stage, done=int(done), total=int(total), unit="samples",
                    rate=round(rate, 3), eta_s=None if eta is None else round(eta, 1))

    return cb
