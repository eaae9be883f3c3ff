"""train/schedules.py: warmup then cosine/linear/constant, as a pure function of the step."""

import math

import pytest
import torch

from train.schedules import build_scheduler, fake_quant_on, lr_factor


@pytest.mark.parametrize("scheduler", ["cosine", "linear", "constant"])
def test_warmup_is_linear_and_reaches_peak(scheduler):
    kw = dict(scheduler=scheduler, warmup_steps=4, max_steps=20, min_lr_ratio=0.1)
    assert [lr_factor(s, **kw) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_factor(4, **kw) == 1.0


def test_decay_shapes_end_at_min_ratio():
    kw = dict(warmup_steps=0, max_steps=10, min_lr_ratio=0.1)
    assert lr_factor(10, scheduler="cosine", **kw) == pytest.approx(0.1)
    assert lr_factor(10, scheduler="linear", **kw) == pytest.approx(0.1)
    assert lr_factor(5, scheduler="cosine", **kw) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_factor(5, scheduler="linear", **kw) == pytest.approx(0.55)
    assert lr_factor(9, scheduler="constant", **kw) == 1.0
    assert lr_factor(50, scheduler="cosine", **kw) == pytest.approx(0.1)  # past max_steps: stays at the floor


def test_scheduler_state_roundtrip_gives_the_same_lr():
    def make():
        p = torch.nn.Parameter(torch.zeros(1))
        opt = torch.optim.SGD([p], lr=2.0)
        return opt, build_scheduler(opt, scheduler="cosine", warmup_steps=2, max_steps=10, min_lr_ratio=0.0)

    opt, sched = make()
    for _ in range(5):
        opt.step()
        sched.step()
    opt2, sched2 = make()
    sched2.load_state_dict(sched.state_dict())
    opt2.load_state_dict(opt.state_dict())
    assert sched2.get_last_lr() == sched.get_last_lr()
    assert sched.get_last_lr()[0] == pytest.approx(2.0 * lr_factor(5, scheduler="cosine", warmup_steps=2, max_steps=10, min_lr_ratio=0.0))


def test_bad_scheduler_name_is_named():
    p = torch.nn.Parameter(torch.zeros(1))
    with pytest.raises(ValueError, match="optim.scheduler='cosin'"):
        build_scheduler(torch.optim.SGD([p], lr=1.0), scheduler="cosin", warmup_steps=0, max_steps=5, min_lr_ratio=0.0)


def test_fake_quant_schedule():
    assert [fake_quant_on(s, 2) for s in range(4)] == [False, False, True, True]
    assert fake_quant_on(0, 0)
