"""The learner pieces dqn.py and dqn_atari.py both define (schedule, target sync, TD target, update,
epsilon-greedy), tested once over both files: each file is the whole algorithm, so each carries its own copy,
and a seed bug put back into either copy fails here (named in each docstring)."""

import sys

import numpy as np
import pytest
import torch
import torch.nn as nn

import dqn
import dqn_atari
from conftest import count_calls
from script_runner import REPO


@pytest.fixture(params=[dqn, dqn_atari], ids=["dqn", "dqn_atari"])
def script(request):
    return request.param


# ---- schedule ----


def test_linear_schedule_with_no_annealing_window_is_at_the_end_value(script):
    assert script.linear_schedule(1.0, 0.05, 0, 0) == 0.05  # a run shorter than its exploration window


def test_linear_schedule_runs_from_start_to_end_then_stays(script):
    values = [script.linear_schedule(1.0, 0.05, 100, t) for t in range(0, 201)]
    assert values[0] == 1.0
    assert values[50] == pytest.approx(0.525)
    assert values[100] == pytest.approx(0.05)
    assert all(v == pytest.approx(0.05) for v in values[100:])
    assert all(a >= b for a, b in zip(values, values[1:]))


# ---- target network ----


def test_target_network_is_synced_every_n_steps(script, tmp_path, monkeypatch):
    """Seed bug: the sync counter was never incremented, so the target network never moved. 200 steps with a
    sync every 50: the target network is loaded once at the start and 4 times after."""
    loads = count_calls(monkeypatch, script.QNetwork, "load_state_dict")
    flags = dict(total_timesteps=200, learning_starts=60, target_network_frequency=50, eval_every=0, eval_episodes=1,
                 progress_every=0, runs_dir=str(tmp_path), cuda=False)
    if script is dqn_atari:
        flags.update(buffer_size=400)
    script.train(script.Args(**flags))
    assert len(loads) == 1 + 4


# ---- the update ----


def tabular_networks():
    """Q(s) = W @ onehot(s): each Q-value is a weight, so targets and loss can be computed by hand."""
    online, target = nn.Linear(2, 2, bias=False), nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        online.weight.copy_(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))  # Q(s0) = [1, 3], Q(s1) = [2, 4]
        target.weight.copy_(torch.tensor([[0.5, -1.0], [2.0, 10.0]]))  # max Q'(s0) = 2, max Q'(s1) = 10
    return online, target


S0, S1 = [1.0, 0.0], [0.0, 1.0]
HAND_BATCH = (  # obs, action, reward, next_obs, terminated
    torch.tensor([S0, S1, S0, S1]),
    torch.tensor([0, 1, 1, 0]),
    torch.tensor([1.0, 0.5, 2.5, 0.1]),
    torch.tensor([S1, S0, S0, S0]),
    torch.tensor([0.0, 1.0, 0.0, 0.0]),
)


def test_td_target_cuts_bootstrap_only_where_terminated(script):
    """Seed bug: `done` written where `1 - done` belongs bootstraps from terminal states and not from others.
    Targets by hand: row 0: 1 + 0.9 * max Q'(s1) = 10; row 1 terminated: just its reward; rows 2, 3: r + 0.9 *
    max Q'(s0). An online network whose taken Q-values are those targets has a loss of 0."""
    online, target = tabular_networks()
    with torch.no_grad():  # Q(s, a) = W[a, s]; the batch takes (s0, 0), (s1, 1), (s0, 1), (s1, 0)
        online.weight.copy_(torch.tensor([[10.0, 1.9], [4.3, 0.5]]))
    optimizer = torch.optim.SGD(online.parameters(), lr=0.0)
    loss, _ = script.td_update(online, target, optimizer, HAND_BATCH, gamma=0.9, max_grad_norm=0.0)
    assert loss.item() == pytest.approx(0.0, abs=1e-6)


def test_loss_matches_hand_computed_huber(script):
    """Seed bug: a hand-written Huber loss off by a factor of 2."""
    online, target = tabular_networks()
    optimizer = torch.optim.SGD(online.parameters(), lr=0.0)
    loss, q_mean = script.td_update(online, target, optimizer, HAND_BATCH, gamma=0.9, max_grad_norm=0.0)
    # taken Q: [1, 4, 3, 2]; targets [10, 0.5, 4.3, 1.9]; errors -9, 3.5, -1.3, 0.1
    # Huber (delta 1): |e| - 0.5 where |e| >= 1, else e^2 / 2 -> 8.5, 3.0, 0.8, 0.005
    assert loss.item() == pytest.approx((8.5 + 3.0 + 0.8 + 0.005) / 4, rel=1e-6)
    assert q_mean.item() == pytest.approx(2.5)


def test_no_gradient_reaches_the_target_network(script):
    """Seed bug: backprop through the target network moved the target with every update."""
    online, target = tabular_networks()  # target left with requires_grad=True on purpose
    before = target.weight.detach().clone()
    optimizer = torch.optim.SGD(list(online.parameters()) + list(target.parameters()), lr=0.1)
    script.td_update(online, target, optimizer, HAND_BATCH, gamma=0.9, max_grad_norm=10.0)
    assert target.weight.grad is None
    assert torch.equal(target.weight, before)
    assert online.weight.grad is not None and not torch.equal(online.weight, tabular_networks()[0].weight)


def test_gradient_norm_is_clipped_above_the_limit_and_left_alone_below(script):
    online, target = tabular_networks()
    optimizer = torch.optim.SGD(online.parameters(), lr=0.0)
    script.td_update(online, target, optimizer, HAND_BATCH, gamma=0.9, max_grad_norm=0.0)
    unclipped = online.weight.grad.clone()
    script.td_update(online, target, optimizer, HAND_BATCH, gamma=0.9, max_grad_norm=0.01)
    assert online.weight.grad.norm().item() == pytest.approx(0.01, rel=1e-4)
    assert torch.allclose(online.weight.grad, unclipped * 0.01 / unclipped.norm())  # scaled, not reshaped
    script.td_update(online, target, optimizer, HAND_BATCH, gamma=0.9, max_grad_norm=unclipped.norm().item() * 2)
    assert torch.equal(online.weight.grad, unclipped)


def test_epsilon_greedy_extremes(script):
    network = nn.Linear(2, 3, bias=False)
    with torch.no_grad():
        network.weight.copy_(torch.tensor([[0.0, 1.0], [5.0, 0.0], [1.0, 2.0]]))
    obs = torch.tensor([S0, S1] * 50)
    rng = np.random.default_rng(0)
    greedy = script.epsilon_greedy(lambda obs: network(obs).argmax(dim=1), obs, 0.0, 3, rng)
    assert greedy.tolist() == [1, 2] * 50
    random_actions = script.epsilon_greedy(lambda obs: network(obs).argmax(dim=1), obs, 1.0, 3, rng)
    assert set(random_actions.tolist()) == {0, 1, 2}


# ---- the seed bugs' reintroduction ----

def test_every_line_reintroduce_seed_bugs_patches_is_in_its_script_once():
    """benchmark/reintroduce_seed_bugs.py (too slow for the suite) puts each seed bug back by replacing a line; a line
    reworded since would make it stop at that bug, so the suite checks that every line is still there."""
    sys.path.insert(0, str(REPO / "benchmark"))
    import reintroduce_seed_bugs

    assert reintroduce_seed_bugs.stale_patches() == []
