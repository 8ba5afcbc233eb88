"""Group advantages, the dynamic-sampling filter and overlong shaping, against hand-computed values."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from prolix.trainer.rollout.advantages import group_advantages, informative_groups, shape_overlong


def test_grpo_advantages_match_hand_computed_values():
    # [1, 0, 0, 0]: mean 0.25, sample std sqrt((0.75² + 3·0.25²) / 3) = 0.5 -> (r − 0.25) / 0.5
    # [0, 1]: mean 0.5, sample std sqrt(2 · 0.25 / 1) = 1/√2
    a = group_advantages(torch.tensor([[1.0, 0, 0, 0]]), eps=0.0)
    torch.testing.assert_close(a, torch.tensor([[1.5, -0.5, -0.5, -0.5]]))
    b = group_advantages(torch.tensor([[0.0, 1.0]]), eps=0.1)
    expected = 0.5 / (1 / math.sqrt(2) + 0.1)
    torch.testing.assert_close(b, torch.tensor([[-expected, expected]]))
    assert a.dtype == torch.float32


def test_dr_grpo_advantages_are_mean_centred_only():
    a = group_advantages(torch.tensor([[1.0, 0, 0, 0], [0.2, 0.4, 0.6, 0.8]]), method="dr_grpo")
    torch.testing.assert_close(a, torch.tensor([[0.75, -0.25, -0.25, -0.25], [-0.3, -0.1, 0.1, 0.3]]))


@pytest.mark.parametrize("method", ["grpo", "dr_grpo"])
@pytest.mark.parametrize("eps", [0.0, 1e-6])
def test_zero_variance_groups_get_exactly_zero_advantage(method, eps):
    # 0.1 is not exact in binary: the group mean's rounding must not leak through 1/eps.
    r = torch.tensor([[0.1, 0.1, 0.1], [1.0, 1.0, 1.0], [0.0, 1.0, 1.0]])
    a = group_advantages(r, method=method, eps=eps)
    assert torch.isfinite(a).all()
    assert (a[:2] == 0).all() and (a[2] != 0).all()
    single = group_advantages(torch.tensor([[1.0], [0.0]]), method=method, eps=eps)  # n = 1
    assert (single == 0).all()


# Rewards on a 1/16 grid: binary and partial-credit rewards as scorers produce them (spreads far
# from the fp underflow that makes any std meaningless).
REWARD_GRID = st.integers(0, 16).map(lambda k: k / 16)


@settings(max_examples=50, deadline=None)
@given(st.integers(2, 8).flatmap(lambda n: st.lists(st.lists(REWARD_GRID, min_size=n, max_size=n),
                                                    min_size=1, max_size=6)))
def test_grpo_advantages_are_centred_with_unit_sample_std(rows):
    r = torch.tensor(rows, dtype=torch.float64)
    a = group_advantages(r, eps=0.0).double()
    live = informative_groups(r)
    torch.testing.assert_close(a.sum(dim=1), torch.zeros(len(rows), dtype=torch.float64), atol=1e-5, rtol=0)
    if live.any():
        torch.testing.assert_close(a[live].std(dim=1), torch.ones(int(live.sum()), dtype=torch.float64),
                                   atol=1e-5, rtol=0)
    assert (a[~live] == 0).all()


def test_informative_groups_flags_groups_with_any_spread():
    r = torch.tensor([[1, 1, 1], [0, 0, 0], [0, 1, 0], [0.5, 0.5, 0.25]])
    assert informative_groups(r).tolist() == [False, False, True, True]
    assert informative_groups(torch.tensor([[True, False], [True, True]])).tolist() == [True, False]


@pytest.mark.parametrize("bad, error", [
    (torch.zeros(4), ValueError),  # [S], not [G, n]
    (torch.zeros(2, 0), ValueError),  # n = 0
    (torch.tensor([[0.0, float("nan")]]), ValueError),
    ([[0.0, 1.0]], TypeError),
])
def test_advantage_inputs_are_validated(bad, error):
    with pytest.raises(error):
        group_advantages(bad)
    with pytest.raises(error):
        informative_groups(bad)


def test_unknown_method_is_rejected():
    with pytest.raises(ValueError, match="method must be one of"):
        group_advantages(torch.zeros(1, 2), method="ppo")


def test_overlong_penalty_subtracts_from_truncated_responses_without_a_floor():
    r = torch.tensor([[1.0, 0.0, 1.0, 0.0]])
    finished = torch.tensor([[True, True, False, False]])
    out = shape_overlong(r, finished, "penalty", 0.5)
    torch.testing.assert_close(out, torch.tensor([[1.0, 0.0, 0.5, -0.5]]))
    assert r.tolist() == [[1.0, 0.0, 1.0, 0.0]]  # input untouched
    # penalty > 1 ranks a truncated correct response below a finished wrong one
    assert shape_overlong(r, finished, "penalty", 1.5)[0, 2] < r[0, 1]


@pytest.mark.parametrize("mode", ["none", "mask"])
def test_overlong_none_and_mask_leave_rewards_unchanged(mode):
    r = torch.tensor([[1.0, 0.0], [0.5, 0.25]])
    out = shape_overlong(r, torch.tensor([[False, True], [False, False]]), mode, 0.7)
    torch.testing.assert_close(out, r)
    assert out.data_ptr() != r.data_ptr()


@pytest.mark.parametrize("finished, mode, penalty, error", [
    (torch.ones(2, 3, dtype=torch.bool), "penalty", 0.5, ValueError),  # shape mismatch
    (torch.ones(2, 2), "penalty", 0.5, TypeError),  # not bool
    (torch.ones(2, 2, dtype=torch.bool), "clip", 0.5, ValueError),
    (torch.ones(2, 2, dtype=torch.bool), "penalty", -1.0, ValueError),
])
def test_overlong_inputs_are_validated(finished, mode, penalty, error):
    with pytest.raises(error):
        shape_overlong(torch.zeros(2, 2), finished, mode, penalty)
