"""Tier-1 tests of relay.ppo against small examples worked out by hand."""

import math

import pytest
import torch

from relay import ppo
from relay.ppo import (
    AdaptiveKLController,
    FixedKLController,
    entropy_from_logits,
    gae,
    kl_penalty,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
    policy_loss,
    token_logprobs,
    token_rewards,
    value_loss,
)


def close(actual: torch.Tensor, expected, atol: float = 1e-6) -> None:
    torch.testing.assert_close(actual, torch.as_tensor(expected, dtype=torch.float32), atol=atol, rtol=0)


# ---------------------------------------------------------------- log-probs and entropy


def test_token_logprobs_matches_hand_softmax():
    # position 0: logits (ln 1, ln 2, ln 3) -> softmax = (1/6, 2/6, 3/6); label 2 -> ln(3/6) = ln(1/2)
    # position 1: logits (0, 0, 0)          -> softmax = (1/3, 1/3, 1/3); label 1 -> ln(1/3)
    logits = torch.tensor([[[0.0, math.log(2), math.log(3)], [0.0, 0.0, 0.0]]])
    labels = torch.tensor([[2, 1]])
    out = token_logprobs(logits, labels)
    assert out.shape == (1, 2)
    close(out, [[math.log(1 / 2), math.log(1 / 3)]])


def test_token_logprobs_returns_float32_for_bf16_logits():
    # shifting every logit by a constant changes nothing: label 0 of (5, 5, 5, 5) -> ln(1/4)
    logits = torch.full((2, 3, 4), 5.0, dtype=torch.bfloat16)
    out = token_logprobs(logits, torch.zeros(2, 3, dtype=torch.long))
    assert out.dtype == torch.float32
    close(out, torch.full((2, 3), math.log(1 / 4)))


def test_entropy_of_uniform_is_log_vocab():
    # V = 5 equal logits -> p = 1/5 each -> H = -5 * (1/5) ln(1/5) = ln 5
    logits = torch.full((2, 3, 5), 7.0)
    close(entropy_from_logits(logits), torch.full((2, 3), math.log(5)))


def test_entropy_of_non_uniform_by_hand():
    # p = (1/6, 2/6, 3/6): H = (1/6) ln 6 + (1/3) ln 3 + (1/2) ln 2
    #                        = 0.298627 + 0.366204 + 0.346574 = 1.011404
    logits = torch.tensor([[[0.0, math.log(2), math.log(3)]]])
    close(entropy_from_logits(logits), [[1.011404]], atol=1e-5)


# ---------------------------------------------------------------- masked statistics

VALUES = torch.tensor([[1.0, 2.0, 3.0, 100.0], [4.0, 5.0, -7.0, -9.0]])
MASK = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0]])


def test_masked_sum_and_mean_ignore_padding():
    # real entries: 1, 2, 3 | 4, 5
    close(masked_sum(VALUES, MASK), 15.0)  # 1+2+3+4+5
    close(masked_sum(VALUES, MASK, dim=1), [6.0, 9.0])  # 1+2+3 ; 4+5
    close(masked_mean(VALUES, MASK), 3.0)  # 15 / 5
    close(masked_mean(VALUES, MASK, dim=1), [2.0, 4.5])  # 6/3 ; 9/2


def test_masked_mean_of_empty_mask_is_zero():
    close(masked_mean(VALUES, torch.zeros_like(MASK)), 0.0)


def test_masked_var_by_hand():
    # deviations from the mean 3: -2, -1, 0, 1, 2 -> squares sum to 10
    close(masked_var(VALUES, MASK, unbiased=False), 2.0)  # 10 / 5
    close(masked_var(VALUES, MASK), 2.5)  # 10 / 4


def test_masked_whiten_by_hand():
    # (x - 3) / sqrt(2.5) with sqrt(2.5) = 1.581139: (-2, -1, 0, 1, 2) / 1.581139
    s = math.sqrt(2.5)
    out = masked_whiten(VALUES, MASK)
    close(out, [[-2 / s, -1 / s, 0.0, 0.0], [1 / s, 2 / s, 0.0, 0.0]], atol=1e-5)
    # real entries: mean 0, (unbiased) variance 1; padding stays exactly 0
    close(masked_mean(out, MASK), 0.0, atol=1e-6)
    close(masked_var(out, MASK), 1.0, atol=1e-5)
    assert torch.all(out[MASK == 0] == 0)


def test_masked_whiten_without_mean_shift_keeps_the_mean():
    # (x - 3) / sqrt(2.5) + 3
    s = math.sqrt(2.5)
    out = masked_whiten(VALUES, MASK, shift_mean=False)
    close(out, [[3 - 2 / s, 3 - 1 / s, 3.0, 0.0], [3 + 1 / s, 3 + 2 / s, 0.0, 0.0]], atol=1e-5)


def test_masked_statistics_do_not_see_padded_values():
    garbage = VALUES.clone()
    garbage[MASK == 0] = torch.tensor([-1e4, 3e3, 42.0])
    torch.testing.assert_close(masked_mean(garbage, MASK), masked_mean(VALUES, MASK))
    torch.testing.assert_close(masked_var(garbage, MASK), masked_var(VALUES, MASK))
    torch.testing.assert_close(masked_whiten(garbage, MASK), masked_whiten(VALUES, MASK))


# ---------------------------------------------------------------- KL estimators

# log_ratio = logprobs - ref_logprobs = (ln 2, -ln 2)
KL_LOGPROBS = torch.tensor([[math.log(1 / 2), math.log(1 / 4)]])
KL_REF = torch.tensor([[math.log(1 / 4), math.log(1 / 2)]])
LN2 = math.log(2)


def test_kl_k1_by_hand():
    close(kl_penalty(KL_LOGPROBS, KL_REF, "k1"), [[LN2, -LN2]])  # log_ratio itself


def test_kl_k2_by_hand():
    # 0.5 * (±ln 2)^2 = 0.5 * 0.480453 = 0.240227
    close(kl_penalty(KL_LOGPROBS, KL_REF, "k2"), [[0.240227, 0.240227]], atol=1e-6)


def test_kl_k3_by_hand():
    # log_ratio =  ln 2: exp(-ln 2) - 1 + ln 2 = 1/2 - 1 + 0.693147 = 0.193147
    # log_ratio = -ln 2: exp( ln 2) - 1 - ln 2 = 2   - 1 - 0.693147 = 0.306853
    close(kl_penalty(KL_LOGPROBS, KL_REF, "k3"), [[0.193147, 0.306853]], atol=1e-6)


def test_kl_k3_is_non_negative():
    gen = torch.Generator().manual_seed(0)
    logprobs = torch.randn(8, 16, generator=gen) * 3
    ref_logprobs = torch.randn(8, 16, generator=gen) * 3
    assert torch.all(kl_penalty(logprobs, ref_logprobs, "k3") >= 0)
    # and it is 0 exactly when the policy agrees with the reference
    close(kl_penalty(logprobs, logprobs, "k3"), torch.zeros(8, 16))


def test_unknown_kl_estimator_raises():
    with pytest.raises(ValueError, match="k4"):
        kl_penalty(KL_LOGPROBS, KL_REF, "k4")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="k4"):
        token_rewards(torch.zeros(1), KL_LOGPROBS, KL_REF, torch.ones(1, 2), kl_coef=0.1, kl_estimator="k4")


# ---------------------------------------------------------------- token rewards


def test_token_rewards_puts_sequence_reward_on_last_real_token():
    # rows of length 3, 1 and 4; ref_logprobs = 0 so k1 = logprobs; padded positions hold garbage
    logprobs = torch.tensor([[0.5, -1.0, 2.0, 9.0], [1.0, 7.0, 7.0, 7.0], [0.1, 0.2, 0.3, 0.4]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    scores = torch.tensor([1.0, -2.0, 3.0])
    rewards, kl = token_rewards(scores, logprobs, torch.zeros_like(logprobs), mask, kl_coef=0.1)
    close(kl, [[0.5, -1.0, 2.0, 0.0], [1.0, 0.0, 0.0, 0.0], [0.1, 0.2, 0.3, 0.4]])
    # -0.1 * kl, plus the score at index length - 1 (2, 0, 3):
    # row 0: -0.05, 0.1, -0.2 + 1 = 0.8, pad 0
    # row 1: -0.1 - 2 = -2.1, pad 0, 0, 0
    # row 2: -0.01, -0.02, -0.03, -0.04 + 3 = 2.96
    close(rewards, [[-0.05, 0.1, 0.8, 0.0], [-2.1, 0.0, 0.0, 0.0], [-0.01, -0.02, -0.03, 2.96]])


def test_token_rewards_with_k3_estimator():
    # log_ratio = (ln 2, -ln 2) -> k3 = (0.193147, 0.306853); kl_coef = 1, score 5 on index 1:
    # rewards = (-0.193147, -0.306853 + 5 = 4.693147)
    rewards, kl = token_rewards(torch.tensor([5.0]), KL_LOGPROBS, KL_REF, torch.ones(1, 2), 1.0, "k3")
    close(kl, [[0.193147, 0.306853]])
    close(rewards, [[-0.193147, 4.693147]])


def test_token_rewards_row_without_real_tokens_gets_nothing():
    mask = torch.tensor([[1.0, 1.0], [0.0, 0.0]])
    rewards, kl = token_rewards(torch.tensor([1.0, 5.0]), torch.zeros(2, 2), torch.zeros(2, 2), mask, 0.1)
    close(rewards, [[0.0, 1.0], [0.0, 0.0]])
    close(kl, torch.zeros(2, 2))


# ---------------------------------------------------------------- GAE


def test_gae_with_gamma_1_lambda_1_is_reward_to_go_minus_value():
    rewards = torch.tensor([[1.0, 2.0, 3.0], [4.0, -1.0, 0.0]])
    values = torch.tensor([[0.5, 1.0, 1.5], [2.0, 3.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    advantages, returns = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    # row 0: reward-to-go (6, 5, 3);  A = (6 - 0.5, 5 - 1, 3 - 1.5) = (5.5, 4, 1.5)
    # row 1: reward-to-go (3, -1);    A = (3 - 2, -1 - 3) = (1, -4), pad 0
    close(advantages, [[5.5, 4.0, 1.5], [1.0, -4.0, 0.0]])
    close(returns, [[6.0, 5.0, 3.0], [3.0, -1.0, 0.0]])  # returns = reward-to-go


def _gae_hand_case(pad_reward: float, pad_value: float):
    rewards = torch.tensor([[0.0, 0.0, 1.0, pad_reward], [2.0, 1.0, pad_reward, pad_reward]])
    values = torch.tensor([[0.5, 0.2, 0.4, pad_value], [1.0, 2.0, pad_value, pad_value]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0]])
    return gae(rewards, values, mask, gamma=0.5, lam=0.5)


# gamma = 0.5, lambda = 0.5 (gamma * lambda = 0.25), value after the last real token = 0
# row 0 (3 real tokens): delta_2 = 1 + 0.5*0   - 0.4 =  0.6
#                        delta_1 = 0 + 0.5*0.4 - 0.2 =  0.0
#                        delta_0 = 0 + 0.5*0.2 - 0.5 = -0.4
#   A_2 = 0.6;  A_1 = 0.0 + 0.25*0.6 = 0.15;  A_0 = -0.4 + 0.25*0.15 = -0.3625
#   returns = A + V = (-0.3625 + 0.5, 0.15 + 0.2, 0.6 + 0.4) = (0.1375, 0.35, 1.0)
# row 1 (2 real tokens): delta_1 = 1 + 0.5*0 - 2 = -1
#                        delta_0 = 2 + 0.5*2 - 1 =  2
#   A_1 = -1;  A_0 = 2 + 0.25*(-1) = 1.75;  returns = (1.75 + 1, -1 + 2) = (2.75, 1.0)
GAE_ADVANTAGES = [[-0.3625, 0.15, 0.6, 0.0], [1.75, -1.0, 0.0, 0.0]]
GAE_RETURNS = [[0.1375, 0.35, 1.0, 0.0], [2.75, 1.0, 0.0, 0.0]]


def test_gae_by_hand_with_padding():
    advantages, returns = _gae_hand_case(pad_reward=0.0, pad_value=0.0)
    close(advantages, GAE_ADVANTAGES)
    close(returns, GAE_RETURNS)


def test_gae_ignores_garbage_in_padded_positions():
    # unmasked, the -50 would become next_value at each row's last real token
    advantages, returns = _gae_hand_case(pad_reward=100.0, pad_value=-50.0)
    close(advantages, GAE_ADVANTAGES)
    close(returns, GAE_RETURNS)


# ---------------------------------------------------------------- policy loss


def test_policy_loss_at_ratio_one_is_minus_mean_advantage():
    logprobs = torch.tensor([[-1.0, -2.0, -0.5, -3.0], [-0.7, -0.2, -0.1, -4.0]])
    advantages = torch.tensor([[1.0, -2.0, 3.0, 99.0], [0.5, 99.0, 99.0, 99.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    loss, stats = policy_loss(logprobs, logprobs.clone(), advantages, mask, clip_ratio=0.2)
    close(loss, -0.625)  # -(1 - 2 + 3 + 0.5) / 4
    close(stats.clipfrac, 0.0)
    close(stats.approx_kl, 0.0)


def test_behavior_weights_by_hand():
    # π_old / π_sampler per token, capped at 2; padding weighs 1
    old = torch.tensor([[-1.0, -1.0, -2.0, -0.5]])
    sampler = torch.tensor([[-1.0, -1.0 + math.log(1.5), -2.0 - math.log(3.0), 7.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    close(ppo.behavior_weights(old, sampler, mask, cap=2.0), [[1.0, 1.0 / 1.5, 2.0, 1.0]], atol=1e-6)


def test_policy_loss_weights_each_token_and_not_the_statistics():
    ratios = torch.tensor([[1.5, 0.5, 1.1, 1.0]])
    advantages = torch.tensor([[1.0, 1.0, 1.0, 10.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    old_logprobs = torch.full((1, 4), -1.0)
    logprobs = (old_logprobs + ratios.log()).requires_grad_()
    weights = torch.tensor([[2.0, 0.5, 1.0, 3.0]])
    loss, stats = policy_loss(logprobs, old_logprobs, advantages, mask, clip_ratio=0.2, weights=weights)
    # terms as in the test below: -1.2 (clipped), -0.5, -1.1; weighted: (2·-1.2 + 0.5·-0.5 + 1·-1.1) / 3
    close(loss, (-2.4 - 0.25 - 1.1) / 3, atol=1e-6)
    unweighted, unweighted_stats = policy_loss(logprobs, old_logprobs, advantages, mask, clip_ratio=0.2)
    close(stats.clipfrac, unweighted_stats.clipfrac)
    loss.backward()
    # d/d logprob_t = -w_t A_t r_t / 3 where unclipped: t0 clipped → 0; t1: -0.5·0.5/3; t2: -1.1/3
    close(logprobs.grad, [[0.0, -0.25 / 3, -1.1 / 3, 0.0]], atol=1e-6)


def test_policy_loss_with_active_clipping_by_hand():
    # clip_ratio = 0.2, so clip(r) lies in [0.8, 1.2]; the last position is padding
    ratios = torch.tensor([[1.5, 0.5, 0.5, 1.5, 1.1, 5.0]])
    advantages = torch.tensor([[1.0, 1.0, -2.0, -2.0, 1.0, 10.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0, 1.0, 0.0]])
    old_logprobs = torch.full((1, 6), -1.0)
    logprobs = (old_logprobs + ratios.log()).requires_grad_()
    loss, stats = policy_loss(logprobs, old_logprobs, advantages, mask, clip_ratio=0.2)
    #        r    A   -A*r   -A*clip(r)   max    clipped active?
    # t0:  1.5   1   -1.5     -1.2       -1.2   yes
    # t1:  0.5   1   -0.5     -0.8       -0.5   no
    # t2:  0.5  -2    1.0      1.6        1.6   yes
    # t3:  1.5  -2    3.0      2.4        3.0   no
    # t4:  1.1   1   -1.1     -1.1       -1.1   no (equal)
    # loss = (-1.2 - 0.5 + 1.6 + 3.0 - 1.1) / 5 = 1.8 / 5 = 0.36
    close(loss, 0.36, atol=1e-6)
    close(stats.clipfrac, 0.4)  # 2 of 5
    # approx_kl = mean(0.5 * ln(r)^2): ln 1.5 = 0.405465, ln 0.5 = -0.693147, ln 1.1 = 0.095310
    #   = 0.5 * (2*0.164402 + 2*0.480453 + 0.009084) / 5 = 0.5 * 1.298794 / 5 = 0.129879
    close(stats.approx_kl, 0.129879, atol=1e-6)
    assert not stats.clipfrac.requires_grad and not stats.approx_kl.requires_grad
    # d loss / d logprob_t = -A_t * r_t / 5 where the unclipped term is active, 0 where clipped:
    # t0: 0;  t1: -0.5/5 = -0.1;  t2: 0;  t3: 3.0/5 = 0.6;  t4: -1.1/5 = -0.22;  pad: 0
    loss.backward()
    close(logprobs.grad, [[0.0, -0.1, 0.0, 0.6, -0.22, 0.0]], atol=1e-6)


# ---------------------------------------------------------------- value loss

V_VALUES = torch.tensor([[1.0, 0.0, 2.0, 9.0]])
V_OLD = torch.tensor([[0.5, 0.1, 1.0, 0.0]])
V_RETURNS = torch.tensor([[1.0, 1.0, 0.0, -9.0]])
V_MASK = torch.tensor([[1.0, 1.0, 1.0, 0.0]])


def test_value_loss_clipped_by_hand():
    loss, stats = value_loss(V_VALUES, V_OLD, V_RETURNS, V_MASK, clip_range=0.2)
    #      v    old   R    v_clip = old + clamp(v-old, ±0.2)   (v-R)^2  (v_clip-R)^2  max   clipped active?
    # t0: 1.0  0.5  1.0   0.5 + 0.2 = 0.7                      0        0.09          0.09  yes
    # t1: 0.0  0.1  1.0   0.1 - 0.1 = 0.0                      1        1             1     no (equal)
    # t2: 2.0  1.0  0.0   1.0 + 0.2 = 1.2                      4        1.44          4     no
    # loss = 0.5 * (0.09 + 1 + 4) / 3 = 0.5 * 5.09 / 3 = 0.848333
    close(loss, 0.848333, atol=1e-6)
    close(stats.clipfrac, 1 / 3)


def test_value_loss_unclipped_by_hand():
    loss, stats = value_loss(V_VALUES, V_OLD, V_RETURNS, V_MASK, clip_range=None)
    # 0.5 * ((1-1)^2 + (0-1)^2 + (2-0)^2) / 3 = 0.5 * 5 / 3 = 0.833333
    close(loss, 0.833333, atol=1e-6)
    close(stats.clipfrac, 0.0)


# ---------------------------------------------------------------- KL controllers


def test_adaptive_kl_controller_one_update_above_target():
    ctl = AdaptiveKLController(init_kl_coef=0.2, target_kl=6.0, horizon=10000)
    ctl.update(current_kl=7.5, n_steps=256)
    # error = 7.5/6 - 1 = 0.25 -> clipped to 0.2; mult = 1 + 0.2*256/10000 = 1.00512
    # value = 0.2 * 1.00512 = 0.201024
    assert ctl.value == pytest.approx(0.201024, abs=1e-12)


def test_adaptive_kl_controller_one_update_below_target():
    ctl = AdaptiveKLController(init_kl_coef=0.2, target_kl=6.0, horizon=10000)
    ctl.update(current_kl=5.4, n_steps=256)
    # error = 5.4/6 - 1 = -0.1 (within ±0.2); mult = 1 - 0.1*256/10000 = 0.99744
    # value = 0.2 * 0.99744 = 0.199488
    assert ctl.value == pytest.approx(0.199488, abs=1e-12)


def test_kl_controllers_state_round_trip():
    ctl = AdaptiveKLController(init_kl_coef=0.2, target_kl=6.0, horizon=10000)
    ctl.update(current_kl=7.5, n_steps=256)
    restored = AdaptiveKLController(init_kl_coef=0.2, target_kl=6.0, horizon=10000)
    restored.load_state_dict(ctl.state_dict())
    assert restored.value == ctl.value

    fixed = FixedKLController(kl_coef=0.05)
    fixed.update(current_kl=100.0, n_steps=1000)
    assert fixed.value == 0.05
    other = FixedKLController(kl_coef=0.0)
    other.load_state_dict(fixed.state_dict())
    assert other.value == 0.05


def test_nan_and_inf_in_padding_reach_no_output_and_no_gradient():
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    poison = torch.tensor([[0.0, 0.0, float("nan")], [0.0, float("inf"), float("-inf")]])
    logprobs = (torch.full((2, 3), -1.0) + poison).requires_grad_()
    old = torch.full((2, 3), -1.2) + poison  # inf - inf: NaN in padding
    advantages = torch.tensor([[1.0, -1.0, float("nan")], [0.5, float("inf"), 0.0]])
    loss, stats = ppo.policy_loss(logprobs, old, advantages, mask, clip_ratio=0.2)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(stats.approx_kl) and torch.isfinite(stats.clipfrac)
    assert torch.isfinite(logprobs.grad).all() and (logprobs.grad[mask == 0] == 0).all()

    values = (torch.zeros(2, 3) + poison).requires_grad_()
    value_loss, _ = ppo.value_loss(values, torch.zeros(2, 3) + poison, torch.ones(2, 3) + poison, mask, 0.2)
    value_loss.backward()
    assert torch.isfinite(value_loss) and torch.isfinite(values.grad).all()

    rewards, kl = ppo.token_rewards(torch.tensor([1.0, 2.0]), torch.zeros(2, 3) + poison, torch.zeros(2, 3) - poison,
                                    mask, kl_coef=0.1, kl_estimator="k3")
    advantages_out, returns = ppo.gae(rewards, torch.zeros(2, 3) + poison, mask, gamma=1.0, lam=0.95)
    for tensor in (rewards, kl, advantages_out, returns, ppo.masked_whiten(advantages + poison, mask)):
        assert torch.isfinite(tensor).all() and (tensor[mask == 0] == 0).all()


# ---------------------------------------------------------------------------------------------------------------
# Critic-free advantage estimators and loss aggregation


def test_grpo_advantages_by_hand():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0])  # two prompts of 3 samples
    # group 1: mean 1/3, unbiased std sqrt(((2/3)^2 + 2 (1/3)^2) / 2) = sqrt(1/3) = 0.57735
    # -> (2/3) / 0.57735 = 1.1547, (-1/3) / 0.57735 = -0.57735; group 2: mean 5/3, std 0.57735 -> -1.1547, 0.57735
    expected = torch.tensor([1.1547, -0.57735, -0.57735, -1.1547, 0.57735, 0.57735])
    assert torch.allclose(ppo.grpo_advantages(rewards, 3, eps=0.0), expected, atol=1e-4)
    # Dr. GRPO: centred only.
    assert torch.allclose(ppo.grpo_advantages(rewards, 3, norm_by_std=False),
                          torch.tensor([2 / 3, -1 / 3, -1 / 3, -2 / 3, 1 / 3, 1 / 3]))
    # A group with one reward for all carries no signal.
    assert ppo.grpo_advantages(torch.tensor([0.5, 0.5, 0.5, 0.5]), 2).tolist() == [0.0, 0.0, 0.0, 0.0]


def test_rloo_advantages_by_hand():
    rewards = torch.tensor([1.0, 0.0, 0.0, 3.0])  # one prompt of 4 samples
    # baselines: others' means (0+0+3)/3 = 1, (1+0+3)/3 = 4/3, 4/3, (1+0+0)/3 = 1/3
    expected = torch.tensor([0.0, -4 / 3, -4 / 3, 3 - 1 / 3])
    assert torch.allclose(ppo.rloo_advantages(rewards, 4), expected)
    assert torch.allclose(ppo.rloo_advantages(rewards, 4), 4 / 3 * (rewards - rewards.mean()))
    with pytest.raises(ValueError, match="at least 2 samples"):
        ppo.rloo_advantages(rewards, 1)


def test_reinforce_pp_returns_then_batch_whitening_by_hand():
    token_rewards = torch.tensor([[-0.1, -0.1, 1.0], [-0.2, 0.5, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    # gamma 1: returns are suffix sums over real tokens: [0.8, 0.9, 1.0] and [0.3, 0.5, (pad)]
    returns = ppo.discounted_returns(token_rewards, mask, gamma=1.0)
    assert torch.allclose(returns, torch.tensor([[0.8, 0.9, 1.0], [0.3, 0.5, 0.0]]))
    # gamma 0.5: [-0.1 + 0.5 (-0.1 + 0.5 * 1.0), -0.1 + 0.5 * 1.0, 1.0] = [0.1, 0.4, 1.0]
    assert torch.allclose(ppo.discounted_returns(token_rewards, mask, gamma=0.5)[0], torch.tensor([0.1, 0.4, 1.0]))
    advantages = ppo.reinforce_pp_advantages(token_rewards, mask)
    real = returns[mask.bool()]
    assert torch.allclose(advantages[mask.bool()], (real - real.mean()) / real.std(), atol=1e-5)
    assert advantages[1, 2] == 0.0


def test_sequence_advantages_on_tokens_and_zero_variance_groups():
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    assert ppo.sequence_to_tokens(torch.tensor([2.0, -1.0]), mask).tolist() == [[2.0, 2.0, 0.0], [-1.0, 0.0, 0.0]]
    assert ppo.zero_variance_groups(torch.tensor([1.0, 1.0, 0.0, 1.0, 0.5, 0.5]), 2).tolist() == [True, False, True]


def test_loss_aggregations_by_hand():
    values = torch.tensor([[1.0, 3.0, 9.0], [4.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    assert ppo.aggregate(values, mask, "token_mean").item() == pytest.approx((1 + 3 + 4) / 3)
    assert ppo.aggregate(values, mask, "seq_mean_token_sum").item() == pytest.approx(((1 + 3) + 4) / 2)
    assert ppo.aggregate(values, mask, "seq_mean_token_mean").item() == pytest.approx((2 + 4) / 2)


def test_kl_loss_is_k3_aggregated_and_pulls_towards_the_reference():
    logprobs = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    ref = torch.tensor([[-1.0, -1.0]])
    mask = torch.ones(1, 2)
    loss = ppo.kl_loss(logprobs, ref, mask, "k3")
    # k3 = exp(-r) - 1 + r with r = logprobs - ref = [0, -1]: [0, e - 2]; token mean (e - 2) / 2
    assert loss.item() == pytest.approx((math.e - 2) / 2)
    loss.backward()
    # d/dr (exp(-r) - 1 + r) = 1 - exp(-r): 0 at r = 0, 1 - e < 0 at r = -1: gradient descent raises logprobs[1]
    assert logprobs.grad[0].tolist() == pytest.approx([0.0, (1 - math.e) / 2])


@pytest.mark.parametrize("mode", ["token_mean", "seq_mean_token_sum", "seq_mean_token_mean"])
def test_micro_batch_shares_add_up_to_the_mini_batch_loss(mode):
    # Rows of 2, 1, 3 and 1 real tokens. Each micro-batch's loss divided by its own count (what relay did) would
    # give for token_mean (1+3)/2 and (4+5+6+7)/4 and a mean of 4.75, against (1+3+4+5+6+7)/6 = 26/6 for the whole.
    values = torch.tensor([[1.0, 3.0, 0.0], [4.0, 0.0, 0.0], [5.0, 6.0, 7.0], [8.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0], [1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    counts = ppo.LossCounts.of(mask)
    assert (counts.tokens, counts.sequences) == (7.0, 4.0)
    whole = ppo.aggregate(values, mask, mode)
    expected = {"token_mean": 34 / 7, "seq_mean_token_sum": 34 / 4, "seq_mean_token_mean": (2 + 4 + 6 + 8) / 4}[mode]
    assert whole.item() == pytest.approx(expected)
    for split in ([1, 1, 1, 1], [2, 2], [1, 3]):
        shares = [ppo.aggregate(v, m, mode, counts) for v, m in zip(values.split(split), mask.split(split))]
        assert sum(shares).item() == pytest.approx(whole.item())
