"""The proxy route's row bookkeeping and arithmetic on synthetic tensors (no engine)."""

import torch

from steerserve.patches.steers.proxy.engine import ProxyGroup, ProxyRoute, combine_


def make_route():
    hidden = torch.randn(10, 4)
    # batch: request 0 rows [0, 4) plain, request 1 rows [4, 5) proxy, request 2 rows [5, 10) proxy
    sub_of_row = torch.full((10,), -1, dtype=torch.long)
    sub_of_row[4:10] = torch.arange(6)
    group = ProxyGroup("task", [(1, 4, 5, 2.0), (2, 5, 10, -1.0)], sub_of_row, torch.randn(6, 4), torch.randn(6, 4))
    return ProxyRoute(hidden, 3, [group]), group


def test_sampled_rows_map_to_each_requests_last_token():
    route, group = make_route()
    rows, sub, alphas = route.rows_for(torch.randn(3, 4), group)  # a gathered copy: one row per request
    assert rows.tolist() == [1, 2] and sub.tolist() == [0, 5] and alphas.tolist() == [2.0, -1.0]


def test_prompt_logprob_slices_map_by_storage_offset():
    route, group = make_route()
    rows, sub, alphas = route.rows_for(route.hidden[3:8], group)  # token rows 3..7
    assert rows.tolist() == [1, 2, 3, 4] and sub.tolist() == [0, 1, 2, 3]
    assert alphas.tolist() == [2.0, -1.0, -1.0, -1.0]
    rows, _, _ = route.rows_for(route.hidden[0:3], group)  # only the plain request's rows
    assert rows.numel() == 0
    assert route.rows_for(torch.randn(7, 4), group) is None  # neither: refuse to guess


def test_combine_adds_alpha_times_difference_on_rows_only():
    logits = torch.zeros(4, 3)
    expert = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 1.0]])
    anti = torch.ones(2, 3)
    combine_(logits, torch.tensor([1, 3]), torch.tensor([2.0, -1.0]), expert, anti)
    assert logits.tolist() == [[0, 0, 0], [0, 2, 4], [0, 0, 0], [1, 1, 0]]
