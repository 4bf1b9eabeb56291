"""Launched by tests/test_train.py under torchrun (not collected by pytest): each rank takes its half of
one fixed batch of HyGRPO candidates (the ranks draw different numbers of valid poses), computes
hygrpo_loss with train_rft.global_normalisers and averages the gradients as train_rft does; rank 0 also
computes the gradient of the whole batch in one process. Both gradients are saved for the test."""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

import hygrpo  # noqa: E402
import model  # noqa: E402
import train_rft  # noqa: E402


def batch(w, rows):
    """A toy policy whose log-probs are linear in w: the candidates `rows` of one fixed batch."""
    g = torch.Generator().manual_seed(0)
    N, T, D = 8, 5, 6
    feat_d = torch.randn(N, T, D, generator=g, dtype=torch.float64)  # (N, T, D)
    feat_c = torch.randn(N, D, generator=g, dtype=torch.float64)  # (N, D)
    base = -torch.rand(N, T, generator=g, dtype=torch.float64)  # (N, T)
    mask = torch.rand(N, T, generator=g) < 0.8  # (N, T)
    adv_d, adv_c = torch.randn(N, generator=g, dtype=torch.float64), torch.randn(N, generator=g, dtype=torch.float64)
    valid = torch.tensor([True, False, False, False, True, True, True, True])  # 1 valid pose on rank 0, 4 on rank 1
    logp = base + 0.3 * feat_d @ w  # (N, T)
    pose_logp = -50 + feat_c @ w  # (N,)
    shift = 0.1 * torch.randn(N, T, generator=g, dtype=torch.float64)  # old and reference policies differ
    shift_c = 0.1 * torch.randn(N, generator=g, dtype=torch.float64)
    old, ref = logp.detach() + shift, logp.detach() - shift
    r = torch.as_tensor(rows)
    return (logp[r], old[r], ref[r], mask[r], adv_d[r], pose_logp[r], pose_logp.detach()[r] + shift_c[r],
            pose_logp.detach()[r] - shift_c[r], adv_c[r], valid[r])


if __name__ == "__main__":
    out_dir = sys.argv[1]
    rank, world_size, device = model.setup_distributed("cpu")
    w = torch.zeros(6, dtype=torch.float64, requires_grad=True)
    args = batch(w, range(4 * rank, 4 * rank + 4))
    N_norm, V_norm = train_rft.global_normalisers(len(args[-1]), int(args[-1].sum()), world_size, device)
    loss, _ = hygrpo.hygrpo_loss(*args, clip_eps=0.05, N_norm=N_norm, V_norm=V_norm)
    loss.backward()
    model.average_gradients([w], world_size)
    if rank == 0:
        whole = torch.zeros(6, dtype=torch.float64, requires_grad=True)
        hygrpo.hygrpo_loss(*batch(whole, range(8)), clip_eps=0.05)[0].backward()
        torch.save({"ddp": w.grad.clone(), "whole": whole.grad.clone()}, os.path.join(out_dir, "grads.pt"))
    torch.distributed.destroy_process_group()
