"""OneBit's knowledge distillation (REFERENCE_ALGORITHMS.md §4), bounded to a short run on the calibration windows.

The student is the source model with every decoder linear replaced by sign(latent) * (a b^T): the latent weights
(initialized to the original W, so sign(latent) is SVID's sign) learn through a straight-through sign, a and b
directly; embeddings, norms and the head stay frozen, as in OneBit. The loss is OneBit's scripts' one:
0.01 * KL(teacher || student) on the logits (batch mean over tokens) + sum over hidden_states[0 .. L-1] of the mean
over tokens of ||h_T / |h_T| - h_S / |h_S|||^2. AdamW (betas 0.9 / 0.98, weight decay 0.01), linear warm-up over
the first tenth of the steps, then a cosine decay to 0; one calibration window per step, in turn.
"""
from __future__ import annotations

import time

KL_SCALE = 0.01  # OneBit's kd_loss_scale (kd_alpha = 1, kd_beta = 1)


def _student_linear(weight, bias, signs, a, b):
    import torch

    class OneBitLinear(torch.nn.Module):
        def __init__(self):
            super().__init__()
            latent = weight.abs().clamp(min=1e-8) * torch.where(torch.from_numpy(signs), 1.0, -1.0)
            self.latent = torch.nn.Parameter(latent)
            self.a = torch.nn.Parameter(torch.from_numpy(a).clone())
            self.b = torch.nn.Parameter(torch.from_numpy(b).clone())
            self.bias = None if bias is None else torch.nn.Parameter(bias.detach().clone(), requires_grad=False)

        def forward(self, x):
            hard = torch.where(self.latent >= 0, 1.0, -1.0)
            sign = hard + self.latent - self.latent.detach()  # straight-through estimator
            return torch.nn.functional.linear(x, sign * self.a[:, None] * self.b[None], self.bias)

    return OneBitLinear()


def distill(teacher, plan, factors: dict, windows, steps: int, lr: float, progress=None):
    """Trains the student built from `teacher` (a float32 transformers model) and factors {canonical linear name:
    (signs bool [rows, cols], a [rows], b [cols])}, `steps` steps over the windows (LongTensor [n, T]).
    Returns (factors after training, log)."""
    import copy
    import math

    import numpy as np
    import torch

    from .convert import _progress

    student = copy.deepcopy(teacher).train()
    for p in student.parameters():
        p.requires_grad_(False)
    modules = {}
    for layer in plan.layers:
        for spec in layer:
            if spec.kind != "linear":
                continue
            path = spec.hf_name.removesuffix(".weight")
            parent, child = path.rsplit(".", 1)
            old = student.get_submodule(path)
            modules[spec.name] = _student_linear(old.weight, old.bias, *factors[spec.name])
            setattr(student.get_submodule(parent), child, modules[spec.name])
    params = [p for m in modules.values() for p in (m.latent, m.a, m.b)]
    optimizer = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.98), weight_decay=0.01)
    warmup = max(1, steps // 10)

    def schedule(step):
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    layers = len(plan.layers)
    losses, started = [], time.monotonic()
    bar = _progress(range(steps), progress, desc="knowledge distillation", unit="step")
    for step in bar:
        ids = windows[step % len(windows)][None]
        with torch.no_grad():
            t_out = teacher(ids, output_hidden_states=True)
        s_out = student(ids, output_hidden_states=True)
        vocab = t_out.logits.shape[-1]
        kl = torch.nn.functional.kl_div(torch.log_softmax(s_out.logits.reshape(-1, vocab), -1),
                                        torch.log_softmax(t_out.logits.reshape(-1, vocab), -1),
                                        reduction="batchmean", log_target=True)
        hidden = sum(((torch.nn.functional.normalize(ht, dim=-1) - torch.nn.functional.normalize(hs, dim=-1)) ** 2)
                     .sum(-1).mean() for ht, hs in zip(t_out.hidden_states[:layers], s_out.hidden_states[:layers]))
        loss = KL_SCALE * kl + hidden
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
        losses.append(float(loss.detach()))
        if hasattr(bar, "set_postfix"):
            bar.set_postfix(loss=f"{losses[-1]:.4f}", kl=f"{float(kl):.3f}")
    trained = {name: (m.latent.detach().numpy() >= 0, m.a.detach().numpy().astype(np.float32),
                      m.b.detach().numpy().astype(np.float32)) for name, m in modules.items()}
    log = {"steps": steps, "lr": lr, "windows": len(windows), "loss_first": round(losses[0], 5) if losses else None,
           "loss_last": round(losses[-1], 5) if losses else None,
           "loss_mean_last_10": round(float(np.mean(losses[-10:])), 5) if losses else None,
           "seconds": round(time.monotonic() - started, 2)}
    return trained, log
