"""Progress: a smoothed rate and ETA (steady on a loaded machine), the bar on a terminal."""

from __future__ import annotations

from diffseg.runtime import Progress


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_eta_is_exact_at_a_steady_rate_and_steady_under_jumps():
    clock = Clock()
    steady = Progress(1000, "img", clock=clock, bar=False)
    for i in range(1, 6):
        clock.now = 10.0 * i
        steady.update(100 * i)  # 10 img/s
    assert abs(steady.rate - 10.0) < 1e-9 and abs(steady.eta_s() - 50.0) < 1e-6
    assert steady.text() == "500/1000 img, 10.0 img/s, left 00:00:50"

    # A machine whose speed jumps between 4 and 16 img/s every 10 s interval (other jobs come and go): the ETA
    # from each interval's own rate swings 4x; the smoothed one moves much less.
    clock, raw_etas, etas = Clock(), [], []
    jumpy = Progress(10_000, clock=clock, half_life_s=30.0, bar=False)
    done = 0
    for i in range(1, 21):
        rate = 4.0 if i % 2 else 16.0
        done += int(rate * 10)
        clock.now = 10.0 * i
        jumpy.update(done)
        raw_etas.append((10_000 - done) / rate)
        etas.append(jumpy.eta_s())
    late, raw_late = etas[10:], raw_etas[10:]
    assert max(raw_late) / min(raw_late) > 3.5
    assert max(late) / min(late) < 1.6
    assert 6.0 < jumpy.rate < 14.0  # near the mean rate (10)


def test_bar_only_when_asked_or_on_a_terminal():
    clock = Clock()
    p = Progress(40, clock=clock, bar=True)
    clock.now = 2.0
    assert p.update(10).endswith("|#####---------------| 25%")
    assert Progress(40, clock=clock).bar_text() == ""  # pytest's captured stdout is not a terminal
    assert Progress(40, clock=clock, bar=False).text() == "0/40 img, ? img/s, left ?"
