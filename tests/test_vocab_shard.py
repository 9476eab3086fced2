"""The vocabulary-sharded head (tensor parallel), on 2 processes over gloo (CPU, one thread each).

One spawn runs every case on both ranks (the import and the process group dominate the time): ``token_logps``,
``sequence_logps`` and ``DPOLoss`` (fast and lean, with a reference head) on a ``Shard(0)`` DTensor head with an
uneven split (V = 37 over 2 ranks: 19 + 18 rows), with bias, softcap, temperature and logit scale, and their
gradients; the Megatron convention (``shard_head``); a patched toy Llama with ``ColwiseParallel`` on ``lm_head``;
reruns; what is refused. The collectives are counted: no all-gather of the head, no ``full_tensor``. The parent
compares both ranks with a float64 reference (bound: 2x the error of the materialised fp32 torch path + atol) and
with fastpref on one process (shard-count independence beyond fp32 rounding).
"""

from __future__ import annotations

import os

import pytest
import torch

from tests.test_integrations_distributed import _exit_worker, _free_port, _spawn, single  # noqa: F401 (the fixture)

WORLD = 2
V, H, B, T = 37, 16, 4, 7
TRANSFORM = dict(logit_scale=1.3, softcap=30.0, temperature=0.7)


def _case(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g) * 2.0
    weight = torch.randn(V, H, generator=g) * 3.0  # logits std ~ 10-20: peaked
    bias = torch.randn(V, generator=g)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[:, :2] = -100  # prompt
    labels[1, -1] = -100
    labels[0, 3] = V - 1  # a target in the last shard's last row
    labels[2, 4] = 0
    up = torch.randn(B, T, generator=g)  # upstream gradient of the token log-probs
    ref = torch.linspace(-60.0, -20.0, B)
    return hidden, weight, bias, labels, up, ref


def _reference_token_logps(hidden, weight, bias, labels, *, logit_scale=1.0, softcap=None, temperature=1.0):
    """Materialised logits in the inputs' dtype (float64 for the truth, fp32 for the bound)."""
    z = (hidden @ weight.T + (0 if bias is None else bias)) * logit_scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    z = z / temperature
    lp = torch.log_softmax(z, -1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return torch.where(labels != -100, lp, torch.zeros_like(lp))


class _Counter:
    """Wraps the collectives: records every payload and fails on any gather of a DTensor."""

    def __init__(self):
        import torch.distributed as dist
        from torch.distributed.tensor import DTensor

        self.gathers: list[int] = []
        self.reduces: list[int] = []
        self._dist, self._orig = dist, (dist.all_gather, dist.all_reduce, DTensor.full_tensor, DTensor.redistribute)
        orig_gather, orig_reduce = dist.all_gather, dist.all_reduce

        def all_gather(out, t, *a, **k):
            self.gathers.append(t.numel())
            return orig_gather(out, t, *a, **k)

        def all_reduce(t, *a, **k):
            self.reduces.append(t.numel())
            return orig_reduce(t, *a, **k)

        def refuse(*a, **k):
            raise AssertionError("the sharded head was gathered / redistributed")

        dist.all_gather, dist.all_reduce = all_gather, all_reduce
        DTensor.full_tensor = refuse
        DTensor.redistribute = refuse

    def close(self):
        from torch.distributed.tensor import DTensor

        self._dist.all_gather, self._dist.all_reduce, DTensor.full_tensor, DTensor.redistribute = self._orig


def _grads(*ts):
    out = []
    for t in ts:
        g = t.grad
        out.append(None if g is None else (g.to_local() if hasattr(g, "to_local") else g).clone())
    return out


BIG_V = 4001  # uneven: 2001 + 2000 rows


def _memory_case(mesh) -> dict:
    """Fast and lean DPO steps on a wider head, every allocation recorded: none has the whole vocabulary."""
    from torch.distributed.tensor import Shard, distribute_tensor

    import fastpref
    from fastpref.utils.memory import AllocationTracker

    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(B, T, H, generator=g).requires_grad_(True)
    labels = torch.randint(0, BIG_V, (B, T), generator=g)
    w = torch.randn(BIG_V, H, generator=g)
    w = torch.nn.Parameter(w if mesh is None else distribute_tensor(w, mesh, [Shard(0)]))
    shapes, peaks = [], []
    for mode in ("fast", "lean"):
        with AllocationTracker("cpu", record_min_bytes=0) as tracker:
            out = fastpref.DPOLoss(beta=0.5, mode=mode)(hidden, w, labels, ref_hidden=hidden.detach() * 0.9)
            out.loss.backward()
        shapes += [tuple(a.shape) for a in tracker.allocations]
        peaks.append(tracker.peak_bytes)
    return {"shapes": shapes, "peaks": peaks, "local_rows": w.shape[0] if mesh is None else w.to_local().shape[0]}


def _worker(rank: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    import fastpref
    from fastpref.ops.vocab_shard import shard_head

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD),
                      OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    mesh = init_device_mesh("cpu", (WORLD,))
    res: dict = {}
    hidden0, weight0, bias0, labels, up, ref = _case()

    def head(shard_bias: bool = True):
        w = torch.nn.Parameter(distribute_tensor(weight0.clone(), mesh, [Shard(0)]))
        b = torch.nn.Parameter(distribute_tensor(bias0.clone(), mesh, [Shard(0)])) if shard_bias else None
        return w, b

    counter = _Counter()
    try:
        # token_logps: bias + softcap + temperature + logit scale, twice (reruns bit-identical)
        runs = []
        for _ in range(2):
            h = hidden0.clone().requires_grad_(True)
            w, b = head()
            tok = fastpref.token_logps(h, w, labels, bias=b, **TRANSFORM)
            (tok * up).sum().backward()
            runs.append([tok.detach(), *_grads(h, w, b)])
        res["tok"] = runs[0]
        res["tok_rerun_equal"] = all(torch.equal(a, c) for a, c in zip(*runs))
        # sequence_logps, plain head
        h = hidden0.clone().requires_grad_(True)
        w, _ = head(False)
        seq = fastpref.sequence_logps(h, w, labels)
        (seq * torch.arange(1.0, B + 1)).sum().backward()
        res["seq"] = [seq.detach(), *_grads(h, w)]
        # DPO, fast and lean, with the token metrics and a reference head (the policy's, sharded alike)
        for mode in ("fast", "lean"):
            h = hidden0.clone().requires_grad_(True)
            w, b = head()
            loss_fn = fastpref.DPOLoss(beta=0.5, mode=mode, token_metrics=True, **TRANSFORM)
            out = loss_fn(h, w, labels, ref, bias=b)
            out.loss.backward()
            res[f"dpo_{mode}"] = [out.loss.detach(), out.chosen_logps, out.rejected_logps, *_grads(h, w, b)]
            res[f"dpo_{mode}_metrics"] = {k: v.detach() for k, v in out.metrics.items()}
            res[f"dpo_{mode}_mode"] = out.mode
        # the Triton row kernels and the fused GEMMs (interpreter): the local targets of a shard (negative, or
        # past its rows) in the fold, the top-1 test and the gradient prologue
        for gemm in ("cublas", "fused"):
            h = hidden0.clone().requires_grad_(True)
            w, b = head()
            out = fastpref.DPOLoss(beta=0.5, mode="fast", token_metrics=True, backend="triton", gemm=gemm,
                                   **TRANSFORM)(h, w, labels, ref, bias=b)
            out.loss.backward()
            res[f"dpo_triton_{gemm}"] = [out.loss.detach(), out.chosen_logps, out.rejected_logps, *_grads(h, w, b)]
            res[f"dpo_triton_{gemm}_metrics"] = {k: v.detach() for k, v in out.metrics.items()}
        # bf16 at a realistic logit scale
        h = hidden0.to(torch.bfloat16).requires_grad_(True)
        w = torch.nn.Parameter(distribute_tensor(weight0.to(torch.bfloat16), mesh, [Shard(0)]))
        tok = fastpref.token_logps(h, w, labels, **TRANSFORM)
        (tok * up).sum().backward()
        res["tok_bf16"] = [tok.detach(), *_grads(h, w)]
        w, b = head()
        res["score"] = fastpref.DPOLoss(beta=0.5, **TRANSFORM).score(hidden0, w, labels, bias=b)
        # the Megatron convention: the local rows, their offset and the group -> bit-identical to the DTensor
        rows = -(-V // WORLD)
        start = rank * rows
        local_w = weight0[start:start + rows].clone().requires_grad_(True)
        local_b = bias0[start:start + rows].clone().requires_grad_(True)
        h = hidden0.clone().requires_grad_(True)
        tok = fastpref.token_logps(h, shard_head(local_w, vocab_start=start, vocab_size=V),
                                   labels, bias=shard_head(local_b, vocab_start=start, vocab_size=V), **TRANSFORM)
        (tok * up).sum().backward()
        res["megatron_equal"] = all(torch.equal(a, c) for a, c in zip(
            [tok.detach(), h.grad, local_w.grad, local_b.grad], res["tok"]))
        res["gathers"], res["reduces"] = list(counter.gathers), list(counter.reduces)
        res["memory"] = _memory_case(mesh)
    finally:
        counter.close()

    # refused: a to_local() shard as a whole head; a bias sharded unlike its weight; a wrong Megatron offset; the
    # callers that score whole heads only (KTO, TRL's fused-head fields)
    from fastpref.integrations.trl_head import fused_head_fields

    errors = {}
    w, _ = head(False)
    for name, call in {
        "to_local": lambda: fastpref.token_logps(hidden0, w.to_local(), labels.clamp(max=15)),
        "bias_replicated": lambda: fastpref.token_logps(
            hidden0, w, labels, bias=distribute_tensor(bias0.clone(), mesh, [Replicate()])),
        "bias_plain": lambda: fastpref.token_logps(hidden0, w, labels, bias=bias0),
        "megatron_offset": lambda: shard_head(weight0[:rows], vocab_start=3, vocab_size=V),
        "full_tensor_ok": lambda: fastpref.token_logps(hidden0, w.full_tensor(), labels),  # a whole head: scored
        "kto": lambda: fastpref.KTOLoss()(hidden0, w, labels, torch.tensor([True, False, True, False]), torch.zeros(B),
                                          kl=0.0),
        "trl_head": lambda: fused_head_fields(hidden0, w, None, labels),
    }.items():
        try:
            call()
            errors[name] = None
        except ValueError as e:
            errors[name] = str(e)
    res["errors"] = errors

    # the patched model with ColwiseParallel on lm_head: the fused preference forward on the local shard
    from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

    from tests.test_integrations_distributed import _loss, _module_case

    model, loss_fn, batch, mref = _module_case()
    parallelize_module(model, mesh, {"lm_head": ColwiseParallel(output_layouts=Replicate())})
    counter = _Counter()
    try:
        _loss(model, loss_fn, batch, mref).backward()
    finally:
        counter.close()
    res["model_grads"] = {n: (p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad).clone()
                          for n, p in model.named_parameters()}
    res["model_gathers"] = list(counter.gathers)
    torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()
    _exit_worker()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("vocab_shard")
    _spawn(_worker, (_free_port(), str(out)), timeout=240.0)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def _rows(rank: int) -> slice:
    rows = -(-V // WORLD)
    return slice(rank * rows, min((rank + 1) * rows, V))


def _truth_and_fp32(fn, *tensors):
    """``fn`` in float64 (the truth) and fp32 (the materialised torch path), with the gradients of ``tensors``."""
    out = []
    for dtype in (torch.float64, torch.float32):
        ts = [t.detach().to(dtype, copy=True).requires_grad_(True) for t in tensors]
        y = fn(*ts)
        y.backward()
        out.append([y.detach()] + [t.grad for t in ts])
    return out


def _check(got: torch.Tensor, truth: torch.Tensor, fp32: torch.Tensor, what: str, atol: float = 1e-5) -> None:
    err = (got.double() - truth).abs().max().item()
    bound = 2 * (fp32.double() - truth).abs().max().item() + atol * max(1.0, truth.abs().max().item())
    assert err <= bound, f"{what}: error {err:.3g} > bound {bound:.3g}"


def _token_ref(hidden, weight, bias, labels, up):
    return (_reference_token_logps(hidden, weight, bias, labels, **TRANSFORM) * up.to(hidden.dtype)).sum()


def test_token_logps_sharded_matches_float64(ranks):
    hidden, weight, bias, labels, up, _ = _case()
    truth, fp32 = _truth_and_fp32(lambda h, w, b: _token_ref(h, w, b, labels, up), hidden, weight, bias)
    for rank, res in enumerate(ranks):
        tok, dh, dw, db = res["tok"]
        _check((tok * up).sum(), truth[0], fp32[0], f"rank {rank} sum of token log-probs")
        _check(tok, _reference_token_logps(hidden.double(), weight.double(), bias.double(), labels, **TRANSFORM),
               _reference_token_logps(hidden, weight, bias, labels, **TRANSFORM), f"rank {rank} token log-probs")
        _check(dh, truth[1], fp32[1], f"rank {rank} d hidden")  # all-reduced: the whole gradient on every rank
        _check(dw, truth[2][_rows(rank)], fp32[2][_rows(rank)], f"rank {rank} d weight (local rows)")
        _check(db, truth[3][_rows(rank)], fp32[3][_rows(rank)], f"rank {rank} d bias (local rows)")
    assert torch.equal(ranks[0]["tok"][0], ranks[1]["tok"][0]) and torch.equal(ranks[0]["tok"][1], ranks[1]["tok"][1])


def test_sharded_reruns_bit_identical_and_megatron_equal(ranks):
    for res in ranks:
        assert res["tok_rerun_equal"]
        assert res["megatron_equal"]


def test_sharded_head_is_never_gathered(ranks):
    n_scored = int((_case()[3] != -100).sum())
    for res in ranks:
        # the statistics combine: [k <= 6, rows] per call; the dH all-reduce: [rows, H]; nothing of the head's size
        assert res["gathers"] and max(res["gathers"]) <= 6 * n_scored
        assert res["reduces"] and max(res["reduces"]) <= n_scored * H
        assert max(res["model_gathers"]) < 64 * 32  # the toy model's head is >= 64 x 32


def test_sharded_head_memory_is_the_local_shards(ranks):
    """No tensor of the whole vocabulary on any rank (the head, its gradient, the logits: all local); the peak of
    a fast and of a lean step on each rank is about half of one process's (2 shards)."""
    one = _memory_case(None)
    assert any(BIG_V in s for s in one["shapes"])
    for res in ranks:
        mem = res["memory"]
        assert mem["shapes"] and not [s for s in mem["shapes"] if BIG_V in s]
        assert any(mem["local_rows"] in s for s in mem["shapes"])  # the local logits / dW are there
        for mode, peak, base in zip(("fast", "lean"), mem["peaks"], one["peaks"]):
            assert peak < 0.6 * base, (mode, peak, base)


def test_sequence_logps_sharded_matches_single_process(ranks):
    import fastpref

    hidden, weight, _, labels, _, _ = _case()
    w_up = torch.arange(1.0, B + 1)
    truth, fp32 = _truth_and_fp32(
        lambda h, w: (_reference_token_logps(h, w, None, labels).sum(1) * w_up.to(h.dtype)).sum(), hidden, weight)
    h = hidden.clone().requires_grad_(True)
    w = weight.clone().requires_grad_(True)
    one = fastpref.sequence_logps(h, w, labels)
    (one * w_up).sum().backward()
    for rank, res in enumerate(ranks):
        seq, dh, dw = res["seq"]
        _check((seq * w_up).sum(), truth[0], fp32[0], "sequence sums")
        _check(dh, truth[1], fp32[1], "d hidden")
        _check(dw, truth[2][_rows(rank)], fp32[2][_rows(rank)], "d weight")
        # one shard vs two: equal beyond fp32 rounding of the combine
        torch.testing.assert_close(seq, one.detach(), rtol=1e-6, atol=1e-5)
        torch.testing.assert_close(dw, w.grad[_rows(rank)], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["fast", "lean"])
def test_dpo_sharded_matches_float64(ranks, mode):
    import fastpref

    hidden, weight, bias, labels, _, ref = _case()
    beta, P = 0.5, B // 2

    def dpo(h, w, b):
        seq = _reference_token_logps(h, w, b, labels, **TRANSFORM).sum(1)
        margin = (seq[:P] - ref[:P].to(h.dtype)) - (seq[P:] - ref[P:].to(h.dtype))
        return -torch.nn.functional.logsigmoid(beta * margin).mean()

    truth, fp32 = _truth_and_fp32(dpo, hidden, weight, bias)
    h = hidden.clone().requires_grad_(True)
    one = fastpref.DPOLoss(beta=0.5, mode=mode, token_metrics=True, **TRANSFORM)(h, weight, labels, ref, bias=bias)
    for rank, res in enumerate(ranks):
        assert res[f"dpo_{mode}_mode"] == mode
        loss, _, _, dh, dw, db = res[f"dpo_{mode}"]
        _check(loss, truth[0], fp32[0], f"{mode} loss")
        _check(dh, truth[1], fp32[1], f"{mode} d hidden")
        _check(dw, truth[2][_rows(rank)], fp32[2][_rows(rank)], f"{mode} d weight")
        _check(db, truth[3][_rows(rank)], fp32[3][_rows(rank)], f"{mode} d bias")
        for k, v in one.metrics.items():  # TRL's metrics, token-level ones included, as on one process
            torch.testing.assert_close(res[f"dpo_{mode}_metrics"][k], v.detach(), rtol=1e-5, atol=1e-4, msg=k)
    for k in ranks[0][f"dpo_{mode}_metrics"]:
        assert torch.equal(ranks[0][f"dpo_{mode}_metrics"][k], ranks[1][f"dpo_{mode}_metrics"][k]), k


@pytest.mark.parametrize("gemm", ["cublas", "fused"])
def test_dpo_sharded_triton_kernels_match_torch_ops(ranks, gemm):
    for res in ranks:
        for got, want in zip(res[f"dpo_triton_{gemm}"], res["dpo_fast"]):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-5)
        for k, v in res["dpo_fast_metrics"].items():
            torch.testing.assert_close(res[f"dpo_triton_{gemm}_metrics"][k], v, rtol=1e-5, atol=1e-4, msg=k)


def test_token_logps_sharded_bf16_within_twice_the_materialised_error(ranks):
    hidden, weight, _, labels, up, _ = _case()
    h16, w16 = hidden.to(torch.bfloat16), weight.to(torch.bfloat16)
    truth, _ = _truth_and_fp32(lambda h, w: _token_ref(h, w, None, labels, up), h16.double(), w16.double())
    ts = [t.clone().requires_grad_(True) for t in (h16, w16)]
    plain = _token_ref(*ts, None, labels, up)  # the materialised bf16 path
    plain.backward()
    for rank, res in enumerate(ranks):
        tok, dh, dw = res["tok_bf16"]
        _check((tok * up).sum(), truth[0], plain.detach(), "bf16 sum of token log-probs", atol=1e-3)
        _check(dh, truth[1], ts[0].grad, "bf16 d hidden", atol=1e-2)
        _check(dw, truth[2][_rows(rank)], ts[1].grad[_rows(rank)], "bf16 d weight", atol=1e-2)


def test_sharded_score_matches_single_process(ranks):
    import fastpref

    hidden, weight, bias, labels, _, _ = _case()
    one = fastpref.DPOLoss(beta=0.5, **TRANSFORM).score(hidden, weight, labels, bias=bias)
    for res in ranks:
        torch.testing.assert_close(res["score"], one, rtol=1e-6, atol=1e-5)


def test_sharded_head_refusals(ranks):
    errors = ranks[0]["errors"]
    assert "to_local()" in errors["to_local"]  # before: a silently wrong log-softmax over 19 rows
    assert "sharded exactly like its weight" in errors["bias_replicated"]
    assert "must be sharded the same way" in errors["bias_plain"]
    assert "vocab_start" in errors["megatron_offset"]
    assert errors["full_tensor_ok"] is None  # FSDP2's gathered head (full_tensor) is a whole head, not refused
    for name in ("kto", "trl_head"):  # before: aten.mm on a DTensor, deep in the kernels
        assert errors[name] is not None and errors[name].startswith("weight:") and "vocabulary-sharded" in errors[name]


def test_patched_model_colwise_lm_head_matches_single_process(ranks):
    from tests.test_integrations_distributed import _loss, _module_case

    model, loss_fn, batch, ref = _module_case()
    _loss(model, loss_fn, batch, ref).backward()
    vocab = model.lm_head.weight.shape[0]
    rows = -(-vocab // WORLD)
    for rank, res in enumerate(ranks):
        for name, p in model.named_parameters():
            want = p.grad[rank * rows:(rank + 1) * rows] if name == "lm_head.weight" else p.grad
            torch.testing.assert_close(res["model_grads"][name], want, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.slow
@pytest.mark.parametrize("trainer", ["trl", "hf"])
def test_tp_head_trainer_matches_stock_trl_and_single_process(tmp_path, single, trainer):  # noqa: F811
    """``torchrun --nproc_per_node 2 tests/dist_train.py --tp-head [--trainer hf]``: FastPrefDPOTrainer /
    FastPrefTrainer with the flag on and ColwiseParallel on lm_head (policy and reference) over 2 ranks, each
    seeing the whole batch; every logged metric of three steps equals stock TRL and the same trainer on one
    process (the head is scored on its shards: the module-level tests above count the collectives)."""
    pytest.importorskip("trl")
    from tests.test_integrations_distributed import _assert_same_logs, _run, _torchrun

    run = _run(tmp_path, f"tp-head-{trainer}", _torchrun(), "--tp-head", "--trainer", trainer)
    assert run["wrapped"] == "LlamaForCausalLM" and run["distributed_type"] == "DistributedType.NO", run
    _assert_same_logs(run, single("trl-stock"), f"{trainer}, tp head on 2 processes vs stock TRL on one")
    _assert_same_logs(run, single(trainer), f"{trainer}, tp head on 2 processes vs the same trainer on one")
