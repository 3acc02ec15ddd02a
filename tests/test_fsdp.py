"""FSDP2 (`train.strategy=fsdp`) with two CPU gloo processes: parity with one process and an exact
sharded resume."""

from __future__ import annotations

import os

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from difflm.config import load_config
from difflm.systems.registry import build_run
from difflm.train.trainer import train

from .test_trainer import _free_port, losses, tiny_overrides

RECIPE = "recipes/shakespeare_char.yaml"


def _worker(rank: int, world_size: int, port: int, runs: list[list[str]]) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size)
    )
    torch.set_num_threads(1)
    for overrides in runs:  # one process group, several trainings in turn
        cfg = load_config(RECIPE, overrides)
        train(cfg, build_run(cfg))
    torch.distributed.destroy_process_group()


def weights(path) -> dict:
    return load_file(str(path / "model.safetensors"))


@pytest.mark.slow
def test_fsdp_two_processes_match_one_and_resume_exactly(tmp_path) -> None:
    steps = ("train.max_steps=4", "train.save_every=2", "train.keep_last=0")
    one = load_config(RECIPE, tiny_overrides(tmp_path, "one", *steps))
    train(one, build_run(one))
    fsdp = ("train.strategy=fsdp", *steps)
    runs = [
        tiny_overrides(tmp_path, "full", *fsdp),
        tiny_overrides(tmp_path, "part", *fsdp, "train.stop_at_step=2"),
        tiny_overrides(tmp_path, "part", *fsdp, "train.resume=latest"),
    ]
    mp.spawn(_worker, args=(2, _free_port(), runs), nprocs=2, join=True)
    full, part = tmp_path / "full/checkpoints", tmp_path / "part/checkpoints"
    assert sorted(p.name for p in (full / "step-2").glob("fsdp-shard-*")) == [
        "fsdp-shard-0-of-2.safetensors",
        "fsdp-shard-1-of-2.safetensors",
    ]
    a, b = weights(full / "step-4"), weights(part / "step-4")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # resume: bit-identical
    reference = weights(tmp_path / "one/checkpoints/step-4")
    for key in reference:
        torch.testing.assert_close(a[key], reference[key], atol=1e-5, rtol=0)  # sharding: same maths
    assert losses(tmp_path / "full") == pytest.approx(losses(tmp_path / "one"), abs=1e-5)


def test_sharded_save_and_load_round_trip_in_one_process(tmp_path) -> None:
    """A world of one (fast): weights and optimizer state come back exactly; the step folder is a
    normal checkpoint (full model.safetensors) with the shard inside its manifest."""
    from difflm.models.transformer import Transformer, TransformerConfig
    from difflm.train import checkpoint as ckpt
    from difflm.train import fsdp

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    torch.distributed.init_process_group("gloo", rank=0, world_size=1)
    try:
        cfg = TransformerConfig(vocab_size=16, block_size=8, n_layer=2, n_head=2, n_embd=16, mask_token_id=15)

        def trained() -> tuple:
            torch.manual_seed(0)
            model = fsdp.shard_model(Transformer(cfg))
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
            return model, optimizer

        def step(model, optimizer) -> None:
            model(torch.arange(8)[None] % 15).pow(2).mean().backward()
            optimizer.step()
            optimizer.zero_grad()

        model, optimizer = trained()
        step(model, optimizer)
        kw = dict(build=lambda: Transformer(cfg), run_config={"model": {}}, trainer_state={"step": 1})
        fsdp.save_sharded(tmp_path, 1, model=model, optimizer=optimizer, **kw)
        saved = {k: v.full_tensor().clone() for k, v in model.state_dict().items()}
        path = ckpt.resolve_checkpoint("latest", tmp_path)
        assert (path / "fsdp-shard-0-of-1.safetensors").is_file() and not list(path.parent.glob(".fsdp-*"))
        step(model, optimizer)  # the reference: a second step without reloading
        fresh, fresh_opt = trained()
        fsdp.load_sharded(path, fresh, fresh_opt)
        step(fresh, fresh_opt)
        for (name, a), b in zip(model.state_dict().items(), fresh.state_dict().values(), strict=True):
            assert torch.equal(a.full_tensor(), b.full_tensor()), name
        full = load_file(str(path / "model.safetensors"))
        assert set(full) <= set(saved) and all(torch.equal(full[k], saved[k]) for k in full)
        assert len(full) >= len(saved) - 1  # every tensor, a tied alias at most stored once
    finally:
        torch.distributed.destroy_process_group()
