"""Output head + cross-entropy without ever holding the [N, V] logits.

For GPT-2 the logits are the largest activation by far (B*T*50257 floats: 206 MB at 1024 tokens, and
plain autograd keeps several copies: logits, log-softmax, its gradient). `linear_cross_entropy` walks
over the rows in chunks; for each chunk it computes the logits, the loss, and right away the gradient
with respect to the hidden states and the head weight (softmax - one_hot, then two matmuls). Backward
then only scales the stored gradients. Same matmuls as the plain head, one chunk of logits alive at a
time, and no recomputation.

Layout: on the CPU the chunk's logits are computed transposed, [V, n] = W @ x^T, and the softmax runs
down the columns. MKL's float32 product for GPT-2's head is much slower in the [n, V] = x @ W^T form
(~100 vs ~150 GFLOP/s on the Zen 4 machine of docs/benchmarks.md); both gradient products are as fast
either way. GPUs keep the [n, V] form.
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100
# Logits per chunk (rows = this // vocab_size), by device. CPU: 2**26 (256 MB in float32, 1335 GPT-2 rows).
# GPUs want large GEMMs: on an H100, gpt2 at B32xT1024 under torch.compile ran at 30% MFU with 2**24-logit
# chunks and 46% with 2**27 (docs/benchmarks.md, GPU section).
_CHUNK_ELEMENTS = {"cpu": 2**26, "cuda": 2**27}
_DEFAULT_CHUNK_ELEMENTS = 2**26


def _chunks(n_rows: int, vocab: int, chunk_rows: int | None, device_type: str = "cpu"):
    rows = chunk_rows
    if not rows:  # at most the device's chunk, cut evenly: 4096 rows -> 4 x 1024, not 3 x 1335 + 91
        limit = max(1, _CHUNK_ELEMENTS.get(device_type, _DEFAULT_CHUNK_ELEMENTS) // vocab)
        rows = -(-n_rows // -(-n_rows // limit)) if n_rows else limit
    for start in range(0, n_rows, rows):
        yield start, min(start + rows, n_rows)


def _compute_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return weight.dtype


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, targets, chunk_rows):
        # x [N, C], weight [V, C], targets [N] (IGNORE_INDEX = not counted)
        n_counted = (targets != IGNORE_INDEX).sum()
        cdtype = _compute_dtype(x, weight)
        acc = torch.promote_types(cdtype, torch.float32)  # float32, or float64 for a float64 model
        denom = n_counted.clamp(min=1).to(acc)
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        vocab_major = x.device.type == "cpu"
        vocab_dim = 0 if vocab_major else 1
        with torch.autocast(x.device.type, enabled=False):
            w = weight.to(cdtype)
            xs = x.to(cdtype)
            loss_sum = torch.zeros((), dtype=acc, device=x.device)
            grad_x = torch.empty_like(xs) if need_x else None
            grad_w = torch.empty(weight.shape, dtype=acc, device=weight.device) if need_w else None
            if need_w and x.shape[0] == 0:
                grad_w.zero_()
            for i, (start, end) in enumerate(_chunks(x.shape[0], weight.shape[0], chunk_rows, x.device.type)):
                xc, tc = xs[start:end], targets[start:end]
                counted = tc != IGNORE_INDEX
                safe_t = tc.clamp(min=0).unsqueeze(vocab_dim)
                if vocab_major:  # logits^T [V, n]: the product's fast layout on the CPU (see the module doc)
                    logits = torch.mm(w, xc.t()).to(acc)
                else:  # logits [n, V]
                    logits = torch.mm(xc, w.t()).to(acc)
                target_logit = logits.gather(vocab_dim, safe_t).squeeze(vocab_dim)
                # log-sum-exp with a single exp pass, in place: logits become exp(logits - max)
                row_max = logits.amax(dim=vocab_dim, keepdim=True)
                exps = logits.sub_(row_max).exp_()
                sum_exp = exps.sum(dim=vocab_dim, keepdim=True)
                lse = (row_max + sum_exp.log()).squeeze(vocab_dim)
                loss_sum += ((lse - target_logit) * counted).sum()
                if need_x or need_w:
                    # d loss / d logits = (softmax - one_hot) / n_counted, zero on rows not counted
                    weight_of_row = counted.unsqueeze(vocab_dim).to(exps.dtype)
                    g = exps.mul_(weight_of_row / (sum_exp * denom))
                    g.scatter_add_(vocab_dim, safe_t, -(weight_of_row / denom))
                    g = g.to(cdtype)
                    g_rows = g.t() if vocab_major else g  # [n, V] (a view when vocab-major)
                    g_vocab = g if vocab_major else g.t()  # [V, n]
                    if need_x:
                        torch.mm(g_rows, w, out=grad_x[start:end])
                    if need_w:
                        if cdtype == acc:
                            # the first chunk writes (no zero-fill of the [V, C] buffer), the rest accumulate
                            if i == 0:
                                torch.mm(g_vocab, xc, out=grad_w)
                            else:
                                grad_w.addmm_(g_vocab, xc)
                        elif i == 0:
                            grad_w.copy_(torch.mm(g_vocab, xc))
                        else:
                            grad_w += torch.mm(g_vocab, xc).to(acc)
                del logits, exps
        ctx.save_for_backward(
            grad_x if grad_x is not None else torch.empty(0),
            grad_w if grad_w is not None else torch.empty(0),
        )
        ctx.dtypes = (x.dtype, weight.dtype)
        return loss_sum / denom

    @staticmethod
    def backward(ctx, grad_loss):
        grad_x, grad_w = ctx.saved_tensors
        x_dtype, w_dtype = ctx.dtypes
        gx = gw = None
        # loss.backward() seeds 1.0: skip scaling then (a full pass over the [V, C] head gradient). Reading
        # the value is free on CPU; elsewhere (a device sync) or while compiling, always scale.
        unit = grad_loss.device.type == "cpu" and not torch.compiler.is_compiling() and grad_loss.item() == 1.0
        if ctx.needs_input_grad[0]:
            gx = (grad_x if unit else grad_x.mul_(grad_loss.to(grad_x.dtype))).to(x_dtype)
        if ctx.needs_input_grad[1]:
            gw = (grad_w if unit else grad_w.mul_(grad_loss)).to(w_dtype)
        return gx, gw, None, None


def linear_cross_entropy(
    x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_rows: int | None = None
) -> torch.Tensor:
    """mean over counted rows of cross_entropy(x @ weight.T, targets); rows with target -100 are skipped.

    x [N, C], weight [V, C], targets [N]. Returns a float32 (float64 for float64 inputs) scalar (0 when no row counts). Memory: one
    chunk of logits instead of all N rows.
    """
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return _LinearCrossEntropy.apply(x, weight, targets, chunk_rows)
    with torch.no_grad():
        return _LinearCrossEntropy.forward(_NoGradCtx(), x, weight, targets, chunk_rows)


class _NoGradCtx:
    """Stand-in for autograd's ctx when no gradient is wanted: nothing to save."""

    needs_input_grad = (False, False, False, False)

    def save_for_backward(self, *tensors):
        pass
