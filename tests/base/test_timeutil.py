import pytest

from realhf.base.timeutil import EpochStepTimeFreqCtl


class FakeClock:
    def __init__(self, t=1000.0):
        self.t = t

    def __call__(self):
        return self.t

    def advance(self, dt):
        self.t += dt


def _pattern(ctl, calls):
    return [ctl.check(epochs=e, steps=s) for e, s in calls]


def test_step_frequency():
    ctl = EpochStepTimeFreqCtl(freq_step=3, time_fn=FakeClock())
    assert _pattern(ctl, [(0, 1)] * 7) == [False, False, True, False, False, True, False]


def test_counter_restarts_after_fire():
    ctl = EpochStepTimeFreqCtl(freq_step=3, time_fn=FakeClock())
    # Five steps at once fire once; the surplus is not carried over.
    assert _pattern(ctl, [(0, 5), (0, 1), (0, 1), (0, 1)]) == [True, False, False, True]


def test_epoch_frequency():
    ctl = EpochStepTimeFreqCtl(freq_epoch=2, time_fn=FakeClock())
    calls = [(0, 10), (1, 10), (0, 10), (1, 10), (1, 0), (1, 0)]
    assert _pattern(ctl, calls) == [False, False, False, True, False, True]


def test_seconds_frequency():
    clock = FakeClock()
    ctl = EpochStepTimeFreqCtl(freq_sec=10, time_fn=clock)
    results = []
    for dt in [5, 4.9, 0.1, 9.9, 0.1, 25]:
        clock.advance(dt)
        results.append(ctl.check(0, 1))
    assert results == [False, False, True, False, True, True]


def test_any_trigger_fires_and_resets_all():
    clock = FakeClock()
    ctl = EpochStepTimeFreqCtl(freq_step=4, freq_sec=10, time_fn=clock)
    seq = []
    for dt, steps in [(1, 1), (1, 1), (9, 1), (1, 1), (1, 1), (1, 1), (1, 1)]:
        clock.advance(dt)
        seq.append(ctl.check(0, steps))
    # t=11 fires by time and clears the 3 accumulated steps; four more steps
    # are needed for the next fire.
    assert seq == [False, False, True, False, False, False, True]


def test_unconfigured_never_fires():
    clock = FakeClock()
    ctl = EpochStepTimeFreqCtl(time_fn=clock)
    for _ in range(10):
        clock.advance(1e6)
        assert not ctl.check(100, 100)


def test_state_dict_exact_resume():
    clock = FakeClock()
    ref = EpochStepTimeFreqCtl(freq_epoch=3, freq_step=5, freq_sec=7, time_fn=clock)
    script = [(0.5, 0, 1), (2, 1, 1), (1, 0, 2), (3, 1, 1), (0.2, 0, 1), (4, 1, 0)] * 4
    for dt, e, s in script[:5]:
        clock.advance(dt)
        ref.check(e, s)
    state = ref.state_dict()
    # Fired at t=6.5 on the fifth step; one step and 0.2 s since then.
    assert state == {"epochs": 0, "steps": 1, "elapsed": pytest.approx(0.2)}

    other_clock = FakeClock(t=-50.0)  # a fresh process has another clock origin
    resumed = EpochStepTimeFreqCtl(freq_epoch=3, freq_step=5, freq_sec=7, time_fn=other_clock)
    resumed.load_state_dict(state)
    fired = []
    for dt, e, s in script[5:]:
        clock.advance(dt)
        other_clock.advance(dt)
        fired.append(resumed.check(e, s))
        assert ref.check(e, s) == fired[-1]
    assert 2 <= sum(fired) < len(fired)
    assert ref.state_dict() == pytest.approx(resumed.state_dict())


@pytest.mark.parametrize("kwargs", [{"freq_step": 0}, {"freq_epoch": -1}, {"freq_sec": 0}])
def test_invalid_frequencies(kwargs):
    with pytest.raises(ValueError):
        EpochStepTimeFreqCtl(**kwargs)


def test_real_clock_default():
    ctl = EpochStepTimeFreqCtl(freq_sec=3600)
    assert not ctl.check(0, 1)
    assert 0 <= ctl.time_since_last_fire() < 5
