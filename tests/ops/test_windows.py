import itertools
import random

import pytest
import torch

from attnseg.ops.windows import axis_table, window_table


def brute_force_keys(length, kernel, dilation, stride, causal, mode, x):
    """The key set of query x, written as the rules read (a loop, no clamping tricks)."""
    group = x % dilation
    members = list(range(group, length, dilation))  # this group's coordinates, in order
    lg = len(members)
    i = members.index(x)
    left = kernel // 2
    if mode == "zeropad":
        return [members[j] for j in range(i - left, i - left + kernel) if 0 <= j < lg]
    if causal:
        lead = min((i // stride) * stride + stride - 1, lg - 1)
        return [members[j] for j in range(lead - kernel + 1, i + 1) if 0 <= j < lg]
    lead = min((i // stride) * stride + stride // 2, lg - 1)
    start = lead - left
    if start < 0:
        start = 0
    if start + kernel > lg:
        start = lg - kernel
    return [members[j] for j in range(start, start + kernel)]


def test_axis_tables_match_brute_force_on_random_sweep():
    rng = random.Random(0)
    cases = 0
    while cases < 400:
        length = rng.randint(1, 30)
        kernel = rng.randint(1, 9)
        dilation = rng.randint(1, 4)
        if kernel * dilation > length:
            continue
        stride = rng.randint(1, kernel)
        causal = rng.random() < 0.3
        mode = "zeropad" if rng.random() < 0.2 else "natten"
        key, valid = axis_table(length, kernel, dilation, stride, causal, mode)
        for x in range(length):
            got = [int(k) for k, v in zip(key[x], valid[x]) if v]
            assert got == brute_force_keys(length, kernel, dilation, stride, causal, mode, x), (
                length, kernel, dilation, stride, causal, mode, x)
        cases += 1


def test_natten_windows_always_full_and_monotone():
    for length, kernel, dilation in [(14, 7, 1), (21, 7, 3), (8, 4, 2), (5, 5, 1)]:
        key, valid = axis_table(length, kernel, dilation)
        assert valid.all()
        first = key[:, 0]
        for g in range(dilation):
            starts = first[g::dilation]
            assert bool((starts[1:] >= starts[:-1]).all())  # the bounding-box argument of tiled kernels


def test_multi_axis_table_is_the_product():
    shape, kernel, dil, stride, causal = (5, 6), (3, 2), (1, 2), (1, 1), (False, True)
    key, valid = window_table(shape, kernel, dil, stride, causal)
    k0, v0 = axis_table(5, 3, 1, 1, False)
    k1, v1 = axis_table(6, 2, 2, 1, True)
    for x, y in itertools.product(range(5), range(6)):
        for a, b in itertools.product(range(3), range(2)):
            q, s = x * 6 + y, a * 2 + b
            assert key[q, s] == k0[x, a] * 6 + k1[y, b]
            assert valid[q, s] == (v0[x, a] & v1[y, b])


def test_invalid_slots_point_inside_the_map():
    key, valid = axis_table(7, 5, 1, 1, False, "zeropad")
    assert (~valid).any() and int(key.min()) >= 0 and int(key.max()) < 7
    assert torch.equal(key[~valid], torch.arange(7)[:, None].expand(7, 5)[~valid])


@pytest.mark.parametrize("kernel", [3, 5, 7])
def test_odd_kernel_border_identity(kernel):
    """For odd k, d=1: a border query's window equals the nearest interior query's (OverLoCK's fallback)."""
    key, _ = axis_table(16, kernel)
    left = kernel // 2
    assert torch.equal(key[0], key[left]) and torch.equal(key[-1], key[-1 - left])
