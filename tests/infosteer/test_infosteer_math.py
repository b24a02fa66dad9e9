"""The InfoSteer formulas against naive per-token loops written straight from docs/steering.md."""

import pytest
import torch

from steerserve.patches.steers.infosteer import formulas as infosteer


def naive(c: torch.Tensor, mode: str, alpha: float, k: int = 0, m: int = 0) -> torch.Tensor:
    out = c.clone()
    for r in range(c.shape[0]):
        row = c[r].double()
        if mode == "scale":
            out[r] = (row * alpha).to(c.dtype)
        elif mode == "topk":
            for i in sorted(range(len(row)), key=lambda i: -abs(row[i].item()))[:k]:
                out[r, i] = (row[i] * alpha).to(c.dtype)
        elif mode == "lift":
            target = (row.mean() * alpha).to(c.dtype)
            for i in sorted(range(len(row)), key=lambda i: row[i].item())[:m]:
                out[r, i] = target
    return out


@pytest.mark.parametrize("mode,kw", [("scale", {}), ("topk", {"k": 5}), ("lift", {"m": 7})])
def test_apply_one_matches_naive(mode, kw):
    torch.manual_seed(0)
    c = torch.randn(6, 40)
    got = infosteer.apply_one(c, mode, 2.5, **kw)
    torch.testing.assert_close(got, naive(c, mode, 2.5, **kw), rtol=1e-6, atol=1e-6)
    assert not torch.equal(got, c)


def test_per_row_parameters():
    torch.manual_seed(1)
    c = torch.randn(4, 32)
    alpha = torch.tensor([0.5, 1.0, 2.0, 3.0])
    k = torch.tensor([1, 4, 8, 2])
    got = infosteer.topk_rows(c, alpha, k, 8)
    for r in range(4):
        torch.testing.assert_close(got[r : r + 1], naive(c[r : r + 1], "topk", alpha[r].item(), k=k[r].item()))
    m = torch.tensor([3, 1, 6, 2])
    got = infosteer.lift_rows(c, alpha, m, 6)
    for r in range(4):
        torch.testing.assert_close(got[r : r + 1], naive(c[r : r + 1], "lift", alpha[r].item(), m=m[r].item()))


def test_identities():
    torch.manual_seed(2)
    c = torch.randn(3, 16, dtype=torch.bfloat16)
    assert torch.equal(infosteer.apply_one(c, "scale", 1.0), c)
    assert torch.equal(infosteer.apply_one(c, "topk", 1.0, k=16), c)
    assert torch.equal(infosteer.apply_one(c, "scale", 0.0), torch.zeros_like(c))
    lifted = infosteer.apply_one(c.float(), "lift", 1.0, m=16)  # every coefficient -> the mean
    torch.testing.assert_close(lifted, c.float().mean(-1, keepdim=True).expand_as(lifted))


def test_lift_count():
    assert infosteer.lift_count(0.01, 1536) == 15
    assert infosteer.lift_count(0.0005, 1536) == 0
    assert infosteer.lift_count(1.0, 256) == 256
