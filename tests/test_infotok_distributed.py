"""gather_negatives across two real gloo ranks: negatives from every rank, gradients through the gather."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pipeline.infotok import InfoTokConfig, InfoTokDims, InfoTokRegularizer, info_nce

WORLD, B, N = 2, 3, 5
DIMS = InfoTokDims(token_dim=16, text_dim=12, vocab_size=50, latent_patch_dim=8)


def global_batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(WORLD * B, N, DIMS.token_dim, generator=g), torch.randn(
        WORLD * B, DIMS.text_dim, generator=g
    )


def make_regularizer() -> InfoTokRegularizer:
    torch.manual_seed(0)
    return InfoTokRegularizer(InfoTokConfig(mode="csa", gather_negatives=True), DIMS)


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        reg = make_regularizer()
        z, text = global_batch()
        z_local = z[rank * B : (rank + 1) * B]
        text_local = text[rank * B : (rank + 1) * B].clone().requires_grad_(True)
        out = reg(
            z_g=z_local, text_g=text_local, target_patches=torch.zeros(B, N, DIMS.latent_patch_dim)
        )
        out.terms["align_g"].backward()
        torch.save(
            {"align": out.terms["align_g"].detach(), "text_grad": text_local.grad},
            f"{out_dir}/rank{rank}.pt",
        )
        dist.barrier()  # a rank tearing gloo down while its peer still communicates aborts the process
    finally:
        dist.destroy_process_group()


def test_gathered_negatives_and_their_gradients_match_a_single_process_reference(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]

    reg = make_regularizer()
    z, text = global_batch()
    text = text.clone().requires_grad_(True)
    text_emb = reg.text_proj["g"](text)
    image_emb = reg.posterior["g"](z)[0].mean(dim=1)
    per_rank = [
        info_nce(
            image_emb[r * B : (r + 1) * B], text_emb, reg.cfg.tau, torch.arange(r * B, (r + 1) * B)
        )
        for r in range(WORLD)
    ]
    for r in range(WORLD):
        torch.testing.assert_close(results[r]["align"], per_rank[r].detach())
    # Each rank's loss depends on every rank's texts: the gradient a rank receives for its own texts
    # is the sum over all ranks' losses (the gather's backward reduces across ranks).
    sum(per_rank).backward()
    for r in range(WORLD):
        torch.testing.assert_close(results[r]["text_grad"], text.grad[r * B : (r + 1) * B])
    # With only local negatives the value would differ: the gather really happened.
    local = info_nce(image_emb[:B], text_emb[:B], reg.cfg.tau)
    assert not torch.allclose(local, results[0]["align"])
