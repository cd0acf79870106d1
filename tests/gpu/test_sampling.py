"""sample on the GPU against the CPU reference (octavo._C.ops.sample on numpy arrays).

What must match exactly: greedy picks and top_k = 1 (ties to the lowest id), the top-N ids.
What must match to 1e-5: the raw logprobs (fp32 log-softmax of the soft-capped logits).
Random draws: both take the kept token with the largest logit / temperature + gumbel_noise
(backend/sampling_rng.h), so only the weight rounding of a top-p boundary (fp32 exp and 2^-40 fixed
point on the GPU, double on the CPU) or the last bit of logf can move a draw. So draws are compared
two ways: agreement with the CPU on >= 99% of rows (in practice all), and a chi-square test of
4,000 draws against the filtered distribution computed here in numpy. Every GPU output is poisoned first (ids -7, logprobs NaN) so an unwritten one fails.
"""


import numpy as np
import pytest
import torch

from octavo import _C

POISON_ID = -7


def _pack(num_rows, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=1234, draw=None):
    """SamplingRow bytes for num_rows rows; scalars broadcast, arrays are per row."""

    def col(value, dtype):
        return np.ascontiguousarray(np.broadcast_to(np.asarray(value, dtype=dtype), (num_rows,)))

    if draw is None:
        draw = np.arange(num_rows, dtype=np.uint64)
    return _C.ops.pack_sampling_rows(col(temperature, np.float32), col(top_k, np.int32),
                                     col(top_p, np.float32), col(min_p, np.float32),
                                     col(seed, np.uint64), col(draw, np.uint64))


def _cpu(logits, rows, num_top=0, softcap=0.0):
    logits = np.array(logits, dtype=np.float32, copy=True)  # the CPU soft-caps in place
    n = logits.shape[0]
    sampled = np.full(n, POISON_ID, np.int32)
    logprob = np.full(n, np.nan, np.float32)
    top_ids = np.full((n, num_top), POISON_ID, np.int32) if num_top else None
    top_lp = np.full((n, num_top), np.nan, np.float32) if num_top else None
    _C.ops.sample(logits, rows, sampled, logprob, top_ids, top_lp, final_softcap=softcap)
    return sampled, logprob, top_ids, top_lp


def _gpu(logits, rows, num_top=0, softcap=0.0):
    logits_gpu = torch.as_tensor(np.asarray(logits, dtype=np.float32)).cuda().contiguous()
    before = logits_gpu.clone()
    n = logits_gpu.shape[0]
    rows_gpu = torch.from_numpy(np.asarray(rows)).cuda()
    sampled = torch.full((n,), POISON_ID, dtype=torch.int32, device="cuda")
    logprob = torch.full((n,), float("nan"), dtype=torch.float32, device="cuda")
    top_ids = torch.full((n, num_top), POISON_ID, dtype=torch.int32, device="cuda") if num_top else None
    top_lp = torch.full((n, num_top), float("nan"), dtype=torch.float32, device="cuda") if num_top else None
    nbytes = _C.ops.sample_workspace_bytes(n, logits_gpu.shape[1], num_top)
    workspace = torch.empty(max(nbytes, 1), dtype=torch.uint8, device="cuda")
    _C.ops.sample(logits_gpu, rows_gpu, sampled, logprob, top_ids, top_lp, final_softcap=softcap,
                  workspace=workspace)
    torch.cuda.synchronize()
    assert torch.allclose(logits_gpu, before, rtol=0, atol=0, equal_nan=True), \
        "the GPU sampler must not modify the logits"
    out = (sampled.cpu().numpy(), logprob.cpu().numpy(),
           top_ids.cpu().numpy() if num_top else None, top_lp.cpu().numpy() if num_top else None)
    return out


def _llm_like(rng, num_rows, vocab, spread=2.5, favourites=True):
    """Peaked rows like an LM head's: a normal background and a few boosted favourites."""
    logits = rng.standard_normal((num_rows, vocab)).astype(np.float32) * np.float32(spread)
    for r in range(num_rows if favourites else 0):
        favourites = rng.choice(vocab, size=min(vocab, 8), replace=False)
        logits[r, favourites] += rng.uniform(4.0, 14.0, size=favourites.size).astype(np.float32)
    return logits


def _check_report(gpu, cpu, num_top):
    g_sampled, g_lp, g_ids, g_tlp = gpu
    c_sampled, c_lp, c_ids, c_tlp = cpu
    assert np.all(np.isfinite(g_lp) | (g_lp == -np.inf)), "unwritten or NaN sampled logprob"
    if num_top:
        np.testing.assert_array_equal(g_ids, c_ids)
        assert not np.any(np.isnan(g_tlp))
        np.testing.assert_allclose(g_tlp, c_tlp, rtol=0, atol=1e-5)


# ---- greedy, top-N, logprobs --------------------------------------------------------------------


@pytest.mark.parametrize("num_rows,vocab", [(1, 1), (1, 10), (7, 1000), (3, 257), (33, 32000),
                                            (5, 151936), (2, 262144)])
@pytest.mark.parametrize("num_top", [0, 1, 5, 20])
def test_greedy_and_report_match_cpu(num_rows, vocab, num_top):
    if num_top > vocab:
        pytest.skip("num_top > vocab")
    rng = np.random.default_rng(vocab * 31 + num_top)
    logits = _llm_like(rng, num_rows, vocab)
    rows = _pack(num_rows, temperature=0.0)
    gpu, cpu = _gpu(logits, rows, num_top), _cpu(logits, rows, num_top)
    np.testing.assert_array_equal(gpu[0], cpu[0])
    np.testing.assert_allclose(gpu[1], cpu[1], rtol=0, atol=1e-5)
    _check_report(gpu, cpu, num_top)


@pytest.mark.parametrize("vocab", [37, 4096, 50000])
def test_ties_go_to_the_lowest_id(vocab):
    """bf16-rounded logits tie a lot; exact repeats of the max too; the order must be the CPU's."""
    rng = np.random.default_rng(vocab)
    num_rows = 6
    logits = torch.from_numpy(_llm_like(rng, num_rows, vocab)).to(torch.bfloat16).float().numpy()
    for r in range(num_rows):  # the max repeated at several ids, one of them low
        ids = rng.choice(vocab, size=min(vocab, 5), replace=False)
        logits[r, ids] = logits[r].max() + 1.0
    logits[1] = 0.0  # a whole row of ties
    logits[2, : vocab // 2] = -np.inf  # masked tokens: the top-N runs into -inf ties
    num_top = 20
    rows = _pack(num_rows, temperature=0.0)
    gpu, cpu = _gpu(logits, rows, num_top), _cpu(logits, rows, num_top)
    np.testing.assert_array_equal(gpu[0], cpu[0])
    assert gpu[0][1] == 0
    np.testing.assert_allclose(gpu[1], cpu[1], rtol=0, atol=1e-5)
    _check_report(gpu, cpu, num_top)
    # top_k = 1 at temperature 1 (scaled == raw): exactly the greedy pick, ties included.
    top1 = _gpu(logits, _pack(num_rows, temperature=1.0, top_k=1), num_top)
    np.testing.assert_array_equal(top1[0], cpu[0])
    np.testing.assert_array_equal(top1[2], cpu[2])


def test_masked_row_reports_minus_inf():
    """Only 3 finite tokens but num_top 10: the rest of the report is -inf, ties to lower ids."""
    logits = np.full((2, 1000), -np.inf, np.float32)
    logits[:, [500, 7, 999]] = [1.0, 3.0, 2.0]
    for temperature in (0.0, 0.8):
        rows = _pack(2, temperature=temperature)
        gpu, cpu = _gpu(logits, rows, 10), _cpu(logits, rows, 10)
        np.testing.assert_array_equal(gpu[2], cpu[2])
        np.testing.assert_array_equal(gpu[3], cpu[3])  # -inf == -inf
        assert set(gpu[0]) <= {7, 500, 999}


@pytest.mark.parametrize("temperature", [0.3, 0.7, 1.0, 1.9])
def test_top_k_1_is_greedy(temperature):
    rng = np.random.default_rng(int(temperature * 10))
    logits = _llm_like(rng, 40, 32000)
    greedy = _gpu(logits, _pack(40, temperature=0.0), 5)
    top1 = _gpu(logits, _pack(40, temperature=temperature, top_k=1, top_p=0.5, min_p=0.2), 5)
    top1_cpu = _cpu(logits, _pack(40, temperature=temperature, top_k=1, top_p=0.5, min_p=0.2), 5)
    np.testing.assert_array_equal(top1[0], greedy[0])
    np.testing.assert_array_equal(top1[0], top1_cpu[0])
    np.testing.assert_array_equal(top1[1], greedy[1])  # the same raw logprob
    _check_report(top1, top1_cpu, 5)


@pytest.mark.parametrize("softcap", [30.0, 5.0])
def test_softcap(softcap):
    rng = np.random.default_rng(int(softcap))
    # Up to ~2.5x the cap: capping bends the top clearly, but stays short of tanh's saturation,
    # where fp32 tanh on the GPU and on the CPU may round a different set of tokens to exactly cap.
    logits = _llm_like(rng, 16, 50000) * np.float32(softcap / 10.0)
    greedy = _pack(16, temperature=0.0)
    gpu, cpu = _gpu(logits, greedy, 8, softcap), _cpu(logits, greedy, 8, softcap)
    np.testing.assert_array_equal(gpu[0], cpu[0])
    np.testing.assert_allclose(gpu[1], cpu[1], rtol=0, atol=1e-5)
    _check_report(gpu, cpu, 8)
    drawn = _pack(64, temperature=0.9, top_p=0.95)
    logits64 = np.concatenate([logits] * 4)
    g, c = _gpu(logits64, drawn, 8, softcap), _cpu(logits64, drawn, 8, softcap)
    assert np.mean(g[0] == c[0]) >= 0.99
    same = g[0] == c[0]
    np.testing.assert_allclose(g[1][same], c[1][same], rtol=0, atol=1e-5)
    _check_report(g, c, 8)
    # Capping changes the answer: the raw logprobs differ from the uncapped ones.
    uncapped = _cpu(logits, _pack(16, temperature=0.0), 8)
    assert np.abs(uncapped[3] - cpu[3]).max() > 1e-3


# ---- random draws --------------------------------------------------------------------------------


def _filtered_probs(logits, temperature, top_k, top_p, min_p):
    """The distribution cpu/sample.cc draws from, in numpy (float32 scaling, float64 weights)."""
    scaled = (logits.astype(np.float32) / np.float32(temperature)).astype(np.float32)
    order = np.lexsort((np.arange(scaled.size), -scaled))  # descending, ties to the lower id
    weights = np.exp(scaled[order].astype(np.float64) - float(scaled.max()))
    kept = scaled.size
    if 0 < top_k < scaled.size:
        kept = top_k
    if top_p < 1.0:
        cumulative = np.cumsum(weights[:kept])
        kept = max(int(np.searchsorted(cumulative, float(np.float32(top_p)) * cumulative[-1])) + 1, 1)
        kept = min(kept, cumulative.size)
    if min_p > 0.0:
        prefix = 1
        while prefix < kept and weights[prefix] >= float(np.float32(min_p)):
            prefix += 1
        kept = prefix
    probs = np.zeros(scaled.size)
    probs[order[:kept]] = weights[:kept] / weights[:kept].sum()
    return probs


def _chi_square_ok(samples, probs):
    """Chi-square of the counts against probs, bins of expected count < 5 pooled; loose bound."""
    n = samples.size
    counts = np.bincount(samples, minlength=probs.size).astype(np.float64)
    assert counts[probs == 0].sum() == 0, f"drew filtered tokens {np.nonzero(counts * (probs == 0))[0]}"
    expected = probs * n
    big = expected >= 5
    obs = list(counts[big]) + ([counts[~big & (probs > 0)].sum()] if np.any(~big & (probs > 0)) else [])
    exp = list(expected[big]) + ([expected[~big & (probs > 0)].sum()] if np.any(~big & (probs > 0)) else [])
    obs, exp = np.array(obs), np.array(exp)
    if obs.size <= 1:
        return True, 0.0, 0
    chi2 = float(((obs - exp) ** 2 / np.maximum(exp, 1e-12)).sum())
    dof = obs.size - 1
    return chi2 < dof + 6.0 * np.sqrt(2.0 * dof) + 10.0, chi2, dof


CONFIGS = {
    "plain": dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0),
    "temperature_0.6": dict(temperature=0.6, top_k=0, top_p=1.0, min_p=0.0),
    "temperature_1.7": dict(temperature=1.7, top_k=0, top_p=1.0, min_p=0.0),
    "top_k_5": dict(temperature=1.0, top_k=5, top_p=1.0, min_p=0.0),
    "top_p_0.7": dict(temperature=1.0, top_k=0, top_p=0.7, min_p=0.0),
    "min_p_0.1": dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.1),
    "combined": dict(temperature=0.8, top_k=20, top_p=0.9, min_p=0.05),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_draw_distribution(name):
    """4,000 draws (draw indices 0..3999) of one 64-token row match the filtered probabilities."""
    cfg = CONFIGS[name]
    rng = np.random.default_rng(7)
    vocab, n = 64, 4000
    row = (rng.standard_normal(vocab) * 1.5).astype(np.float32)
    logits = np.ascontiguousarray(np.broadcast_to(row, (n, vocab)))
    rows = _pack(n, seed=99, draw=np.arange(n, dtype=np.uint64), **cfg)
    probs = _filtered_probs(row, **cfg)
    gpu, cpu = _gpu(logits, rows, 3), _cpu(logits, rows, 3)
    ok_cpu, chi_cpu, dof = _chi_square_ok(cpu[0], probs)
    assert ok_cpu, f"the numpy reference disagrees with the CPU sampler (chi2 {chi_cpu:.1f}, dof {dof})"
    ok, chi2, dof = _chi_square_ok(gpu[0], probs)
    assert ok, f"{name}: chi2 {chi2:.1f} with {dof} dof"
    agree = np.mean(gpu[0] == cpu[0])
    assert agree >= 0.99, f"{name}: GPU and CPU draws agree on {agree:.2%}"
    shifted = row.astype(np.float64) - row.max()
    raw_logprobs = shifted - np.log(np.exp(shifted).sum())  # raw: before temperature and filters
    np.testing.assert_allclose(gpu[1], raw_logprobs[gpu[0]], rtol=0, atol=1e-5)
    _check_report(gpu, cpu, 3)


@pytest.mark.parametrize(
    "case",
    [
        # Each of these keeps or scans more tokens than the 2,048-key shared-memory window, which
        # exercises the radix-refinement path.
        dict(name="flat_top_p", spread=0.1, temperature=1.0, top_k=0, top_p=0.5, min_p=0.0),
        dict(name="flat_plain", spread=0.5, temperature=0.9, top_k=0, top_p=1.0, min_p=0.0),
        dict(name="high_temperature", spread=2.5, temperature=50.0, top_k=0, top_p=1.0, min_p=0.0,
             favourites=True),
        dict(name="big_top_k", spread=1.0, temperature=1.0, top_k=5000, top_p=0.95, min_p=0.0),
        dict(name="all_equal", spread=0.0, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0),
        dict(name="all_equal_top_k", spread=0.0, temperature=0.7, top_k=3000, top_p=0.9, min_p=0.0),
        dict(name="flat_min_p", spread=0.2, temperature=1.0, top_k=0, top_p=1.0, min_p=0.5),
        dict(name="flat_combined", spread=0.3, temperature=0.8, top_k=20000, top_p=0.8, min_p=0.3),
        # Peaked rows take the usual path (one shared-memory window); here for contrast.
        dict(name="peaked_plain", spread=2.5, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0,
             favourites=True),
        dict(name="peaked_combined", spread=2.5, temperature=0.7, top_k=100, top_p=0.9, min_p=0.02,
             favourites=True),
    ],
    ids=lambda c: c["name"],
)
# 64 rows take one block per row; 6 rows the split path (passes 1 and 2 over vocabulary slices).
@pytest.mark.parametrize("num_rows", [64, 6])
def test_draws_agree_with_cpu(case, num_rows):
    rng = np.random.default_rng(len(case["name"]))
    vocab = 100003  # odd: rows start misaligned
    logits = _llm_like(rng, num_rows, vocab, spread=case["spread"],
                       favourites=case.get("favourites", False))
    cfg = {k: v for k, v in case.items() if k not in ("name", "spread", "favourites")}
    rows = _pack(num_rows, seed=5, **cfg)
    gpu, cpu = _gpu(logits, rows, 20), _cpu(logits, rows, 20)
    agree = np.mean(gpu[0] == cpu[0])
    assert agree >= 0.99, f"{case['name']}: GPU and CPU draws agree on {agree:.2%}"
    same = gpu[0] == cpu[0]
    np.testing.assert_allclose(gpu[1][same], cpu[1][same], rtol=0, atol=1e-5)
    _check_report(gpu, cpu, 20)


@pytest.mark.parametrize("temperature", [1.0, 0.7, 1.3])
@pytest.mark.parametrize("num_rows", [512, 8])
def test_unfiltered_draws_match_cpu_on_every_row(temperature, num_rows):
    """Pass 1 draws an unfiltered row, computing a token's noise only where a bound on it says the
    token could still win: a bound too low anywhere would lose winners. Rows flat and peaked (the
    winners' noise spread over every bucket of the bound), odd widths, -inf tokens; one block a
    row (512) and vocabulary slices (8). Every row must match the CPU's draw: only the last bit of
    logf could move one, and no row here sits that close to a tie."""
    rng = np.random.default_rng(int(temperature * 100) + num_rows)
    vocab = 20011
    logits = np.concatenate([
        _llm_like(rng, num_rows // 2, vocab, spread=2.5),                    # peaked
        _llm_like(rng, num_rows - num_rows // 2, vocab, spread=0.3, favourites=False),  # flat
    ])
    logits[1, ::3] = -np.inf
    rows = _pack(num_rows, temperature=temperature, seed=rng.integers(0, 2**63, num_rows,
                                                                       dtype=np.uint64))
    gpu, cpu = _gpu(logits, rows, 2), _cpu(logits, rows, 2)
    np.testing.assert_array_equal(gpu[0], cpu[0])
    np.testing.assert_allclose(gpu[1], cpu[1], rtol=0, atol=1e-5)
    _check_report(gpu, cpu, 2)


def test_draw_depends_only_on_seed_and_draw():
    """A row's token is the same whatever batch it sits in, at whatever position, and run twice."""
    rng = np.random.default_rng(11)
    vocab = 32000
    target = _llm_like(rng, 1, vocab)[0]
    settings = dict(temperature=0.9, top_k=40, top_p=0.9, min_p=0.01)
    results = []
    for batch, position in ((1, 0), (8, 5), (64, 37), (200, 199)):
        logits = _llm_like(rng, batch, vocab)
        logits[position] = target
        temperature = rng.uniform(0.1, 2.0, batch).astype(np.float32)
        temperature[position] = settings["temperature"]
        seeds = rng.integers(0, 2**63, batch, dtype=np.uint64)
        seeds[position] = 424242
        draws = rng.integers(0, 10**6, batch, dtype=np.uint64)
        draws[position] = 17
        rows = _pack(batch, temperature=temperature, top_k=settings["top_k"],
                     top_p=settings["top_p"], min_p=settings["min_p"], seed=seeds, draw=draws)
        for _ in range(2):
            out = _gpu(logits, rows, 4)
            results.append((out[0][position], out[1][position], tuple(out[2][position])))
    assert all(r == results[0] for r in results), results
    # And a different draw index moves the token at least sometimes.
    tokens = set()
    for draw in range(50):
        rows = _pack(1, seed=424242, draw=np.array([draw], np.uint64), **settings)
        tokens.add(int(_gpu(target[None], rows)[0][0]))
    assert len(tokens) > 1


def test_bad_rows_are_flagged():
    """The CPU throws on these; a kernel cannot, so the GPU writes -1 and NaN (the engine checks)."""
    logits = np.random.default_rng(3).standard_normal((5, 1000)).astype(np.float32)
    logits[0, 17] = np.nan
    logits[1, 3] = np.inf
    logits[2] = -np.inf
    temperature = np.array([1.0, 1.0, 1.0, -1.0, 1.0], np.float32)
    top_p = np.array([1.0, 1.0, 1.0, 1.0, 0.0], np.float32)
    rows = _pack(5, temperature=temperature, top_p=top_p)
    sampled, logprob, top_ids, top_lp = _gpu(logits, rows, 4)
    np.testing.assert_array_equal(sampled, [-1] * 5)
    assert np.all(np.isnan(logprob)) and np.all(top_ids == -1) and np.all(np.isnan(top_lp))
    with pytest.raises(Exception):
        _cpu(logits[:1], rows[:1])


def test_launcher_checks():
    logits = torch.zeros((2, 100), device="cuda")
    rows = torch.from_numpy(_pack(2)).cuda()
    out = torch.zeros(2, dtype=torch.int32, device="cuda"), torch.zeros(2, device="cuda")
    with pytest.raises(Exception):  # num_top above the GPU's limit of 64
        big = torch.zeros((2, 65), dtype=torch.int32, device="cuda")
        _C.ops.sample(logits, rows, *out, big, big.float())
    with pytest.raises(Exception):
        _C.ops.sample(logits, rows, *out, final_softcap=-1.0)
    with pytest.raises(Exception):  # rows for 1 row only
        _C.ops.sample(logits, rows[:1], *out)


# ---- the full-size batch, and a timing report ----------------------------------------------------


def test_full_batch_runs_and_matches():
    rng = np.random.default_rng(2024)
    num_rows, vocab = 256, 151936
    logits = _llm_like(rng, num_rows, vocab)
    rows = _pack(num_rows, temperature=0.8, top_k=50, top_p=0.9, seed=rng.integers(0, 2**63, num_rows,
                                                                                    dtype=np.uint64))
    gpu, cpu = _gpu(logits, rows, 20), _cpu(logits, rows, 20)
    assert np.all(gpu[0] >= 0) and np.all(gpu[0] < vocab)
    assert np.mean(gpu[0] == cpu[0]) >= 0.99
    _check_report(gpu, cpu, 20)


def _time_us(logits, rows, num_top, repeats=20, split=True):
    """split=False: no workspace, so every row takes one block (the path large batches take)."""
    n = logits.shape[0]
    workspace = None
    if split:
        nbytes = _C.ops.sample_workspace_bytes(n, logits.shape[1], num_top)
        workspace = torch.empty(max(nbytes, 1), dtype=torch.uint8, device="cuda")
    sampled = torch.empty(n, dtype=torch.int32, device="cuda")
    logprob = torch.empty(n, device="cuda")
    top_ids = torch.empty((n, num_top), dtype=torch.int32, device="cuda") if num_top else None
    top_lp = torch.empty((n, num_top), device="cuda") if num_top else None
    for _ in range(3):
        _C.ops.sample(logits, rows, sampled, logprob, top_ids, top_lp, workspace=workspace)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        _C.ops.sample(logits, rows, sampled, logprob, top_ids, top_lp, workspace=workspace)
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / repeats


def test_sampling_timing_report():
    """Not pass/fail: microseconds for 256 rows x 151936 (one read of the logits at 2.9 TB/s is
    ~54 us; greedy and unfiltered draws read them once, filtered ones 3 times in the usual case)."""
    rng = np.random.default_rng(0)
    vocab = 151936
    logits = torch.from_numpy(_llm_like(rng, 256, vocab)).cuda()
    cases = [
        ("top_p 0.9 + top_k 50, num_top 0", dict(temperature=1.0, top_k=50, top_p=0.9), 0),
        ("top_p 0.9 + top_k 50, num_top 20", dict(temperature=1.0, top_k=50, top_p=0.9), 20),
        ("greedy, num_top 0", dict(temperature=0.0), 0),
        ("plain temperature 0.8", dict(temperature=0.8), 0),
        ("top_p 0.95 only", dict(temperature=1.0, top_p=0.95), 0),
    ]
    # A random-weight model's logits are flat: the benchmarks' workloads sample from these.
    flat = torch.randn(256, vocab, device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    cases.append(("plain temperature 1.0, flat logits", dict(temperature=1.0), 0, flat))
    # A trained model's are peaked: here a spread of 2.5 and a top token 20 above the mean.
    peaked = flat * 2.5
    peaked[:, 17] = 20.0
    cases.append(("plain temperature 1.0, top logit 20 above the mean", dict(temperature=1.0), 0,
                  peaked))
    for label, cfg, num_top, *source in cases:
        rows_logits = source[0] if source else logits
        for num_rows in (256, 8, 1):
            rows = torch.from_numpy(_pack(num_rows, **cfg)).cuda()
            us = _time_us(rows_logits[:num_rows].contiguous(), rows, num_top)
            line = (f"sample {num_rows} x {vocab}, {label}: {us:.1f} us "
                    f"({num_rows * vocab * 4 / (us * 1e-6) / 1e12:.2f} TB/s of logits)")
            if num_rows <= 32:
                one_block = _time_us(rows_logits[:num_rows].contiguous(), rows, num_top, split=False)
                line += f"; one block per row: {one_block:.1f} us"
            print(line)
    # llama8b's decode steps: 512 rows of Llama-3.1-8B's vocabulary, flat, temperature 1.
    llama = torch.randn(512, 128256, device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    us = _time_us(llama, torch.from_numpy(_pack(512, temperature=1.0)).cuda(), 0)
    print(f"sample 512 x 128256, plain temperature 1.0, flat logits: {us:.1f} us "
          f"({512 * 128256 * 4 / (us * 1e-6) / 1e12:.2f} TB/s of logits)")
