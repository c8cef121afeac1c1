"""Noise of the stochastic passes: one seeded generator per pass, so a pass draws the same values alone or batched.

The fast sampler (:meth:`scripts.network.MedCLIPSeg.sample_probabilities`) stacks the passes sample-major (rows
``s*B .. s*B+B-1`` belong to pass ``s``). Each value-sampling call (E3) draws ``[B, ...]`` from every pass's own
generator, so the naive loop of full passes and the batched fast path give the same maps for the same seed.

The draws of a pass are made for the WHOLE batch of B images at once: the noise an image gets depends on B and on its
position in the batch, so the same seed gives different (equally distributed) maps at batch 1 and batch 8.

Cheaper samplers of the same N-pass run (``num_samples``; :class:`MapSampler` is the inferer's ``sampler`` option):
``adaptive`` stops after the first passes once the Monte-Carlo error to the full run is below a tolerance;
``control_variate`` runs a few passes plus two rows that add the first-order effect of the passes it skips. Their
quality/time curve on the paper config is in ``reports/sampling`` (``scripts/benchmark_sampling_quality.py``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

__all__ = ["SampleNoise", "ReferenceMatchedNoise", "eps_like", "pass_seeds", "sample_adaptive",
           "sample_control_variate",
           "reference_error", "passes_needed", "entropy_slope", "MapSampler", "SAMPLING_METHODS"]


class SampleNoise:
    """Noise for the value sampling (E3) with one generator per stochastic pass (see the module docstring)."""

    def __init__(self, seeds: Sequence[int], device: torch.device | str = "cpu", text_len: int | None = None):
        self.seeds = [int(s) for s in seeds]
        device = torch.device(device)
        self.generators = [torch.Generator(device=device).manual_seed(s) for s in self.seeds]
        #: full (padded) text length: text-shaped draws are made at this length and cut to the tokens used
        self.text_len = text_len

    @property
    def rows(self) -> int:
        """Sample rows of the batch this noise feeds (one per pass here)."""
        return len(self.generators)

    def draw_shape(self, ref: torch.Tensor, full_len: int | None = None) -> tuple[int, ...]:
        """``[B, ...]`` of one row's draw for a ``[rows * B, ...]`` tensor (text length ``full_len`` when longer)."""
        if ref.shape[0] % self.rows:
            raise ValueError(f"batch {ref.shape[0]} is not a multiple of the {self.rows} sample rows")
        tail = tuple(ref.shape[1:])
        if full_len is not None and ref.ndim >= 2 and full_len > ref.shape[1]:
            tail = (int(full_len),) + tail[1:]
        return (ref.shape[0] // self.rows,) + tail

    def draws(self, ref: torch.Tensor, full_len: int | None = None) -> list[torch.Tensor]:
        """One ``[B, ...]`` draw from every pass's generator (text-shaped draws at ``full_len``, not yet cut)."""
        shape = self.draw_shape(ref, full_len)
        return [torch.randn(shape, generator=g, device=ref.device, dtype=ref.dtype) for g in self.generators]

    @staticmethod
    def cut(out: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
        return out[:, : ref.shape[1]] if out.shape[1] != ref.shape[1] else out

    def randn_like(self, ref: torch.Tensor, full_len: int | None = None) -> torch.Tensor:
        draws = self.draws(ref, full_len)
        return self.cut(draws[0] if len(draws) == 1 else torch.cat(draws, dim=0), ref)


class ReferenceMatchedNoise(SampleNoise):
    """Noise of the control-variate sampler (:func:`sample_control_variate`): ``n_real + 2`` rows.

    Every call draws from ALL ``N`` pass generators exactly what the N-pass run would draw (same order, same shapes).
    Rows ``0..n_real-1`` are the first ``n_real`` passes of that run; the last two rows are ``+D`` and ``-D`` with
    ``D = mean of the N draws - mean of the first n_real draws``: the linear (first-order) part of the network's
    response to D is exactly the difference between the N-pass mean and the n_real-pass mean, to first order.
    """

    def __init__(self, seeds: Sequence[int], n_real: int, device: torch.device | str = "cpu",
                 text_len: int | None = None):
        super().__init__(seeds, device, text_len)
        self.n_real = int(n_real)
        if not 1 <= self.n_real < len(self.seeds):
            raise ValueError(f"n_real must be in 1..{len(self.seeds) - 1}, got {n_real}")

    @property
    def rows(self) -> int:
        return self.n_real + 2

    def draws(self, ref: torch.Tensor, full_len: int | None = None) -> list[torch.Tensor]:
        shape = self.draw_shape(ref, full_len)
        real, total = [], torch.zeros(shape, device=ref.device, dtype=torch.float64)
        for i, g in enumerate(self.generators):
            d = torch.randn(shape, generator=g, device=ref.device, dtype=ref.dtype)
            total += d
            if i < self.n_real:
                real.append(d)
        real_sum = torch.stack(real).sum(0, dtype=torch.float64)
        delta = (total / len(self.generators) - real_sum / self.n_real).to(ref.dtype)
        return real + [delta, -delta]


def eps_like(ref: torch.Tensor, noise: SampleNoise | None, full_len: int | None = None) -> torch.Tensor:
    """Standard normal noise shaped like ``ref``: torch's global RNG without ``noise`` (training), else per pass."""
    return torch.randn_like(ref) if noise is None else noise.randn_like(ref, full_len)


def pass_seeds(num_samples: int, seed: int | None = None) -> list[int]:
    """One seed per stochastic pass; without ``seed`` a base seed is drawn from torch's global RNG (so the
    inferer's ``seed`` fixes it)."""
    base = int(torch.randint(0, 2**31 - 1, (1,)).item()) if seed is None else int(seed)
    return [(base * 1_000_003 + s) % (2**63 - 1) for s in range(int(num_samples))]


# ---------------------------------------------------------------------------------------------- cheaper samplers
# Both reproduce the N-pass run of the same seed (``num_samples`` passes, the inferer's reference): "adaptive" runs
# its first passes and stops when the Monte-Carlo error to the full run is small; "control_variate" runs a few of
# them plus two passes that add the first-order effect of the passes it skips. Neither is a paper equation.

_LOG2 = math.log(2.0)


def _prefix(net, image, text_ids, text_mask):
    """The sample-independent part of the fast sampler (``MedCLIPSeg.sample_probabilities(fast=True)``): inputs
    prepared, padding dropped, embeddings and every block before the first adapter run once."""
    image, ids, mask, out_size = net._prepare(image, text_ids, text_mask)
    full_len = ids.shape[1]
    ids, mask = net._drop_padding(ids, mask)
    n_blocks = max(net.n_vis_blocks, net.n_txt_blocks)
    first = net.adapter_layers[0] if net.adapter_layers else n_blocks
    return {"state": net._run_blocks(net._embed(image, ids, mask), 0, first, None), "first": first,
            "n_blocks": n_blocks, "out_size": out_size, "full_len": full_len, "batch": image.shape[0],
            "device": image.device}


def _rows_pass(net, pre: dict, noise: SampleNoise) -> torch.Tensor:
    """Run ``noise.rows`` sample rows (sample-major) through the rest of the network -> ``[rows, B, 1, H, W]``."""
    st = net._repeat_state(pre["state"], noise.rows)
    st = net._run_blocks(st, pre["first"], pre["n_blocks"], noise)
    probs = torch.sigmoid(net._head(st, pre["out_size"])[0])
    return probs.reshape(noise.rows, pre["batch"], *probs.shape[1:])


def entropy_slope(prob: torch.Tensor) -> torch.Tensor:
    """|dH/dp| of the normalised binary entropy (:func:`vlseg.uncertainty.binary_entropy`): |log2((1-p)/p)|."""
    p = prob.clamp(1e-6, 1 - 1e-6)
    return (torch.log1p(-p) - torch.log(p)).abs() / _LOG2


def reference_error(probs: torch.Tensor, reference_samples: int) -> dict[str, torch.Tensor]:
    """Monte-Carlo standard error of the ``n``-pass maps against the ``N``-pass run that starts with the same passes,
    per image and pixel: ``s * sqrt(1/n - 1/N)`` for the mean (``s``: unbiased std over the passes), times the entropy
    slope for the ``uncertainty`` map (delta method). 0 once ``n >= N``."""
    n = probs.shape[0]
    factor = math.sqrt(max(1.0 / n - 1.0 / reference_samples, 0.0))
    se = probs.std(dim=0, unbiased=True) * factor if n > 1 else torch.full_like(probs[0], float("inf"))
    return {"pred": se, "uncertainty": se * entropy_slope(probs.mean(dim=0))}


def passes_needed(probs: torch.Tensor, reference_samples: int, tolerance: float, mean_tolerance: float,
                  z: float) -> int:
    """Passes at which :func:`sample_adaptive`'s rule would hold if the spread stayed what ``probs`` shows: the
    smallest ``n`` with ``z * max(s_map) * sqrt(1/n - 1/N) <= tolerance`` and the same for the mean (``s_map``: std of
    ``pred`` or, times the entropy slope, of ``uncertainty``). Lets the sampler jump instead of creeping."""
    s = probs.std(dim=0, unbiased=True)
    need = 1
    for m in (s, s * entropy_slope(probs.mean(dim=0))):
        for spread, tol in ((z * float(m.flatten(1).amax(1).max()), tolerance),
                            (math.sqrt(2 / math.pi) * float(m.flatten(1).mean(1).max()), mean_tolerance)):
            if spread > 0:
                need = max(need, math.ceil(1.0 / ((tol / spread) ** 2 + 1.0 / reference_samples) - 1e-9))
    return need


def sample_adaptive(net, image, text_ids, text_mask=None, num_samples: int = 30, seed: int | None = None, *,
                    tolerance: float = 0.05, mean_tolerance: float = 0.005, z: float = 3.0, min_samples: int = 4,
                    max_samples: int | None = None, step: int = 2) -> tuple[torch.Tensor, dict]:
    """The first passes of the ``num_samples``-pass run (same seeds, so never more than that run), ``step`` at a time,
    until for every image both maps (``pred``, ``uncertainty``) satisfy ``z * max(se) <= tolerance`` and
    ``sqrt(2/pi) * mean(se) <= mean_tolerance`` (``se``: :func:`reference_error`; ``sqrt(2/pi) se`` is the expected
    |error| of a normal error). At least ``min_samples`` and at most ``max_samples`` (default ``num_samples``) passes.
    After the first ``min_samples`` it runs at least ``step`` more passes per round, or as many as
    :func:`passes_needed` predicts. The batch stops together: a pass draws its noise for the whole batch (module
    docstring).
    Returns ``([n, B, 1, H, W] probabilities, info)``."""
    n_ref = int(num_samples)
    n_max = n_ref if max_samples is None else int(max_samples)
    min_samples = min(int(min_samples), n_ref)  # a run shorter than min_samples is simply the exact run
    if not 1 <= min_samples <= n_max:
        raise ValueError(f"need 1 <= min_samples ({min_samples}) <= max_samples ({n_max})")
    if n_max > n_ref:
        raise ValueError(f"max_samples ({n_max}) > num_samples ({n_ref}): the adaptive sampler runs a prefix of the "
                         f"{n_ref}-pass run; raise num_samples instead")
    if int(step) < 1 or tolerance <= 0 or mean_tolerance <= 0 or z <= 0:
        raise ValueError("step must be >= 1 and tolerance, mean_tolerance, z > 0")
    seeds = pass_seeds(n_ref, seed)
    with torch.inference_mode():
        pre = _prefix(net, image, text_ids, text_mask)
        out, n, trace, probs = [], 0, [], None
        while n < n_max:
            target = min_samples if n == 0 else max(n + int(step), passes_needed(probs, n_ref, tolerance,
                                                                                 mean_tolerance, z))
            k = min(n_max, target) - n
            chunk = max(1, int(net.max_sample_batch) // max(pre["batch"], 1))  # the fast path's memory bound
            for c0 in range(n, n + k, chunk):
                cs = seeds[c0:min(c0 + chunk, n + k)]
                out.append(_rows_pass(net, pre, SampleNoise(cs, pre["device"], text_len=pre["full_len"])))
            n += k
            probs = torch.cat(out, dim=0)
            se = reference_error(probs, n_ref)
            worst_max = max(float(v.flatten(1).amax(1).max()) * z for v in se.values())
            worst_mean = max(float(v.flatten(1).mean(1).max()) * math.sqrt(2 / math.pi) for v in se.values())
            trace.append({"passes": n, "max_bound": worst_max, "mean_bound": worst_mean})
            if worst_max <= tolerance and worst_mean <= mean_tolerance:
                break
    return probs, {"passes": n, "stopped_early": n < n_max, "trace": trace}


def sample_control_variate(net, image, text_ids, text_mask=None, num_samples: int = 30, seed: int | None = None, *,
                           cv_samples: int = 2) -> tuple[torch.Tensor, dict]:
    """``cv_samples`` passes of the ``num_samples``-pass run, shifted by the first-order effect of the others.

    With the per-call noise ``D = mean_N(eps) - mean_n(eps)`` (:class:`ReferenceMatchedNoise`) the two extra rows give
    the central difference ``c = (f(+D) - f(-D)) / 2 = J D + O(D^3)``, and ``J D`` is exactly the difference between
    the N-pass and the n-pass mean of the network's linearisation. The returned rows are ``clamp(p_s + c, 0, 1)``:
    their mean is the n-pass mean corrected towards the N-pass mean (the remaining error is the non-linear part of
    the response, averaged over n passes instead of N). Unbiased for the expected probability: ``c`` is odd in ``D``
    and ``D`` is symmetric (up to the clamp). The spread over the rows (std, mutual information) is that of the
    ``cv_samples`` real passes. Cost: ``cv_samples + 2`` rows in one batched forward (not split by
    ``max_sample_batch``: the correction rows need every pass's draws of each call).
    Returns ``([cv_samples, B, 1, H, W] probabilities, info)``."""
    n_ref, n = int(num_samples), int(cv_samples)
    if n < 1:
        raise ValueError(f"cv_samples must be >= 1, got {cv_samples}")
    if n + 2 >= n_ref:  # nothing to save: the exact run costs no more
        return net.sample_probabilities(image, text_ids, text_mask, num_samples=n_ref, seed=seed), {"passes": n_ref}
    seeds = pass_seeds(n_ref, seed)
    with torch.inference_mode():
        pre = _prefix(net, image, text_ids, text_mask)
        rows = _rows_pass(net, pre, ReferenceMatchedNoise(seeds, n, pre["device"], text_len=pre["full_len"]))
        shift = (rows[n] - rows[n + 1]) / 2
        return (rows[:n] + shift).clamp(0.0, 1.0), {"passes": n + 2, "max_shift": float(shift.abs().max())}


SAMPLING_METHODS = ("exact", "adaptive", "control_variate")


class MapSampler:
    """Sampler option of :class:`vlseg.inferers.StochasticTextInferer` (its ``sampler`` argument): ``sampling`` is
    ``"exact"`` (the network's own ``num_samples`` passes, the default everywhere), ``"adaptive"``
    (:func:`sample_adaptive`) or ``"control_variate"`` (:func:`sample_control_variate`); the other arguments go to
    that function. ``last_info`` holds what the last call did (passes run, ...)."""

    def __init__(self, sampling: str = "exact", **options):
        if sampling not in SAMPLING_METHODS:
            raise ValueError(f"sampling must be one of {SAMPLING_METHODS}, got {sampling!r}")
        adaptive = {"tolerance", "mean_tolerance", "z", "min_samples", "max_samples", "step"}
        allowed = {"exact": set(), "adaptive": adaptive,
                   "control_variate": {"cv_samples"}}[sampling]
        unknown = set(options) - allowed
        if unknown:
            raise ValueError(f"sampling {sampling!r} takes {sorted(allowed) or 'no options'}, got {sorted(unknown)}")
        self.sampling, self.options, self.last_info = sampling, dict(options), {}

    def __call__(self, network, image, text_ids, text_mask=None, num_samples: int = 30, seed: int | None = None):
        if self.sampling == "exact":
            self.last_info = {"passes": int(num_samples)}
            return network.sample_probabilities(image, text_ids, text_mask, num_samples=num_samples, seed=seed)
        fn = sample_adaptive if self.sampling == "adaptive" else sample_control_variate
        probs, self.last_info = fn(network, image, text_ids, text_mask, num_samples, seed, **self.options)
        return probs
