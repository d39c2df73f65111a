# Copyright 2026 The trl_ddrl Authors. Licensed under the Apache License, Version 2.0.
"""The (data-parallel x context-parallel) grid, and diffusers' context parallelism on gloo CPU processes."""

import json
import os
import socket
import subprocess
import sys
from unittest import mock

import pytest
import torch
from accelerate.data_loader import BatchSamplerShard
from datasets import Dataset
from diffusers import CosmosTransformer3DModel
from tiny_models import tiny_cosmos2_5_pipeline, tiny_cosmos2_pipeline, tiny_sd3_pipeline, tiny_wan_pipeline

from trl_ddrl import DDRLConfig
from trl_ddrl.parallel import (
    ContextParallelSampler,
    ProcessMesh,
    check_context_parallel_support,
    install_context_parallel_plans,
)
from trl_ddrl.trainer import EpochSeededRepeatSampler


SCRIPT = os.path.join(os.path.dirname(__file__), "scripts", "context_parallel_train.py")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_mesh_puts_consecutive_ranks_in_one_context_parallel_group():
    meshes = [ProcessMesh(8, rank, context_parallel_size=4) for rank in range(8)]
    assert [mesh.data_parallel_rank for mesh in meshes] == [0, 0, 0, 0, 1, 1, 1, 1]
    assert [mesh.context_parallel_rank for mesh in meshes] == [0, 1, 2, 3, 0, 1, 2, 3]
    assert [mesh.is_context_parallel_leader for mesh in meshes] == [True, False, False, False] * 2
    assert meshes[0].data_parallel_size == 2
    with pytest.raises(ValueError, match="context_parallel_size=3 must be >= 1 and divide the 8 processes"):
        ProcessMesh(8, 0, context_parallel_size=3)


def test_unique_rows_keeps_one_copy_of_each_sample_in_data_parallel_order():
    mesh = ProcessMesh(4, 0, context_parallel_size=2)
    # Ranks 0, 1 hold samples [a, b]; ranks 2, 3 hold [c, d]; the copies of the non-leaders are NaN (not scored).
    gathered = torch.tensor([[1.0], [2.0], [float("nan")], [float("nan")], [3.0], [4.0], [float("nan")], [9.0]])
    assert mesh.unique_rows(gathered).flatten().tolist() == [1.0, 2.0, 3.0, 4.0]
    assert ProcessMesh(4, 0).unique_rows(gathered) is gathered


def test_scale_gradients_keeps_the_loss_and_multiplies_its_gradient():
    weight = torch.tensor(3.0, requires_grad=True)
    loss = ProcessMesh(4, 0, context_parallel_size=2).scale_gradients(weight**2)
    loss.backward()
    assert loss.item() == 9.0
    assert weight.grad.item() == 12.0  # 2 * (2 * 3)


def shard_for_rank(sampler, rank: int, world_size: int, batch_size: int) -> list[list[int]]:
    """The batches accelerate's dataloader gives one process."""
    batches = torch.utils.data.BatchSampler(sampler, batch_size, drop_last=False)
    return list(BatchSamplerShard(batches, num_processes=world_size, process_index=rank))


def test_sampler_gives_every_rank_of_a_context_parallel_group_its_data_parallel_shard():
    def repeat_sampler():
        return EpochSeededRepeatSampler(
            data_source=list(range(10)), mini_repeat_count=2, batch_size=4, repeat_count=3, shuffle=True, seed=1
        )

    samples_per_process = 4  # 4 prompts x 2 generations over 2 data-parallel ranks
    plain = [shard_for_rank(repeat_sampler(), rank, 2, samples_per_process) for rank in range(2)]
    for rank in range(4):
        mesh = ProcessMesh(4, rank, context_parallel_size=2)
        sampler = ContextParallelSampler(repeat_sampler(), mesh, samples_per_process)
        sampler.set_epoch(0)
        assert shard_for_rank(sampler, rank, 4, samples_per_process) == plain[mesh.data_parallel_rank]
    assert len(plain[0]) == len(plain[1]) > 1
    assert plain[0] != plain[1]


def test_config_divides_the_samples_over_data_parallel_ranks_only():
    with mock.patch.object(DDRLConfig, "world_size", new_callable=mock.PropertyMock, return_value=4):
        args = DDRLConfig(
            output_dir="unused", num_generations=4, prompts_per_step=2, num_inference_steps=4, context_parallel_size=2
        )
        assert args.samples_per_process == 4
        with pytest.raises(ValueError, match="context_parallel_size=3 must divide the number of processes"):
            DDRLConfig(output_dir="unused", context_parallel_size=3)
        with pytest.raises(ValueError, match="context_parallel_method='sequence' is not valid"):
            DDRLConfig(output_dir="unused", context_parallel_size=2, context_parallel_method="sequence")
    # One process may be the launcher of a multi-process run: the grid is checked again in the trainer's processes.
    assert DDRLConfig(output_dir="unused", context_parallel_size=2).samples_per_process == 32


def test_a_single_process_cannot_split_a_sample(tmp_path):
    from trl_ddrl import DDRLTrainer

    args = DDRLConfig(
        output_dir=str(tmp_path), num_generations=2, prompts_per_step=1, num_inference_steps=2,
        per_device_train_batch_size=2, data_beta=0.0, report_to="none", context_parallel_size=2,
    )  # fmt: skip
    with pytest.raises(ValueError, match="context_parallel_size=2 must be >= 1 and divide the 1 processes"):
        DDRLTrainer(tiny_wan_pipeline(), lambda prompts, images, **kwargs: [0.0] * len(prompts), args=args,
                    train_dataset=Dataset.from_dict({"prompt": ["a cat"]}))  # fmt: skip


def test_unsupported_denoisers_and_layouts_fail_before_any_collective():
    sd3 = tiny_sd3_pipeline().transformer
    with pytest.raises(ValueError, match="no context-parallel plan .* SD3Transformer2DModel"):
        check_context_parallel_support(sd3, "StableDiffusion3Pipeline", (4, 8, 8), 2, "ulysses")
    # diffusers has no plan for Cosmos either; trl_ddrl installs its own (on the instance) before the checks.
    cosmos = tiny_cosmos2_pipeline().transformer
    with pytest.raises(ValueError, match="no context-parallel plan .* CosmosTransformer3DModel"):
        check_context_parallel_support(cosmos, "Cosmos2TextToImagePipeline", (4, 1, 4, 4), 2, "ulysses")
    install_context_parallel_plans([cosmos])
    assert CosmosTransformer3DModel._cp_plan is None and cosmos._cp_plan is not None
    check_context_parallel_support(cosmos, "Cosmos2TextToImagePipeline", (4, 1, 4, 4), 2, "ulysses")
    with pytest.raises(ValueError, match="splits the 2 attention heads .* context_parallel_size=4"):
        check_context_parallel_support(cosmos, "Cosmos2TextToImagePipeline", (4, 1, 4, 4), 4, "ulysses")
    with pytest.raises(ValueError, match="6 tokens long .* context_parallel_size=4 does not divide"):
        check_context_parallel_support(cosmos, "Cosmos2TextToImagePipeline", (4, 1, 4, 6), 4, "ring")
    wan = tiny_wan_pipeline().transformer  # 2 heads, latents [4, 2, 4, 4] in 8 tokens
    check_context_parallel_support(wan, "WanPipeline", (4, 2, 4, 4), 2, "ulysses")
    with pytest.raises(ValueError, match="splits the 2 attention heads .* context_parallel_size=4"):
        check_context_parallel_support(wan, "WanPipeline", (4, 2, 4, 4), 4, "ulysses")
    with pytest.raises(ValueError, match="6 tokens long .* context_parallel_size=4 does not divide"):
        check_context_parallel_support(wan, "WanPipeline", (4, 1, 4, 6), 4, "ring")
    with pytest.raises(ValueError, match="'ring' cannot run on the attention backend 'native'"):
        check_context_parallel_support(wan, "WanPipeline", (4, 2, 4, 4), 2, "ring")


def run(command: list[str], env: dict[str, str], timeout: int = 600) -> None:
    environment = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", **env}
    result = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]


def launch(
    output_dir, num_processes: int, context_parallel_size: int, prompts_per_step: int = 2, pipeline: str = "wan"
) -> list[dict]:
    """Train with `accelerate launch` on gloo CPU processes; return each rank's record."""
    os.makedirs(output_dir, exist_ok=True)
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(num_processes),
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
        str(free_port()), SCRIPT, str(output_dir), str(context_parallel_size), str(prompts_per_step), pipeline,
    ]  # fmt: skip
    run(command, {"PYTHONPATH": os.path.dirname(os.path.dirname(os.path.abspath(__file__)))})
    return [json.loads((output_dir / f"rank{rank}.json").read_text()) for rank in range(num_processes)]


def assert_same_step(record: dict, reference: dict) -> None:
    """Same logged losses and gradient norm, and the same advantages, as the reference run."""
    for key in ("loss", "loss/policy", "loss/data", "kl", "grad_norm"):
        assert record["logs"][0][key] == pytest.approx(reference["logs"][0][key], rel=1e-5, abs=1e-7), key
    torch.testing.assert_close(record["iterations"], reference["iterations"])
    assert record["eval"].keys() == reference["eval"].keys() and "eval_reward" in record["eval"]
    for key, value in reference["eval"].items():
        assert record["eval"][key] == pytest.approx(value, rel=1e-5, abs=1e-7), key


def assert_same_update(weights: dict, reference: dict, initial: dict) -> None:
    """The step moved every weight as in the reference run (compared on the update, not on the weights)."""
    moved = [key for key in initial if not torch.equal(reference[key], initial[key])]
    assert len(moved) > len(initial) // 2
    for key in initial:
        torch.testing.assert_close(weights[key] - initial[key], reference[key] - initial[key], rtol=1e-4, atol=1e-7)


@pytest.mark.slow
def test_one_step_with_context_parallel_size_2_matches_the_unsharded_run(tmp_path):
    sys.path.insert(0, os.path.dirname(SCRIPT))
    from context_parallel_train import train

    train(str(tmp_path / "reference"), context_parallel_size=1)
    reference = json.loads((tmp_path / "reference" / "rank0.json").read_text())
    ranks = launch(tmp_path / "cp", 2, 2)
    initial = tiny_wan_pipeline().transformer.state_dict()
    reference_weights = torch.load(tmp_path / "reference" / "0.pt")
    for rank, record in enumerate(ranks):
        assert_same_step(record, reference)
        assert_same_update(torch.load(tmp_path / "cp" / f"{rank}.pt"), reference_weights, initial)
    # Every sample was scored once, by the group's first rank.
    assert [record["reward_calls"] for record in ranks] == [reference["reward_calls"], 0]
    # Each rank of the group holds half of every trained state (cosmos-rl stores them split), the reference all.
    assert reference["held_states"] == reference["whole_states"]
    for record in ranks:
        assert record["whole_states"] == reference["whole_states"]
        assert record["held_states"] <= record["whole_states"] // 2 + record["whole_states"] // 100


@pytest.mark.slow
def test_one_cosmos2_5_step_with_context_parallel_size_2_matches_the_unsharded_run(tmp_path):
    # Text-to-world: the transformer takes one timestep per latent frame, so the per-token timestep embeddings are
    # split (trl_ddrl's own plan for CosmosTransformer3DModel, see trl_ddrl/pipelines/cosmos_parallel.py).
    sys.path.insert(0, os.path.dirname(SCRIPT))
    from context_parallel_train import train

    train(str(tmp_path / "reference"), context_parallel_size=1, pipeline="cosmos2_5")
    reference = json.loads((tmp_path / "reference" / "rank0.json").read_text())
    ranks = launch(tmp_path / "cp", 2, 2, pipeline="cosmos2_5")
    initial = tiny_cosmos2_5_pipeline().transformer.state_dict()
    reference_weights = torch.load(tmp_path / "reference" / "0.pt")
    for rank, record in enumerate(ranks):
        assert_same_step(record, reference)
        assert_same_update(torch.load(tmp_path / "cp" / f"{rank}.pt"), reference_weights, initial)
    assert [record["reward_calls"] for record in ranks] == [reference["reward_calls"], 0]


@pytest.mark.slow
def test_data_parallel_2_x_context_parallel_2_matches_data_parallel_2_and_keeps_whole_groups(tmp_path):
    # One group of 4 samples, split 2 + 2 over the data-parallel ranks.
    grid = launch(tmp_path / "grid", 4, 2, prompts_per_step=1)
    plain = launch(tmp_path / "plain", 2, 1, prompts_per_step=1)
    initial = tiny_wan_pipeline().transformer.state_dict()
    for rank, record in enumerate(grid):
        data_rank = rank // 2
        assert record["data_parallel_rank"] == data_rank
        assert_same_step(record, plain[data_rank])
        assert_same_update(
            torch.load(tmp_path / "grid" / f"{rank}.pt"), torch.load(tmp_path / "plain" / f"{data_rank}.pt"), initial
        )
    # The advantages were normalised over the whole group: each half does not sum to zero, the group does.
    halves = [grid[0]["iterations"][0]["advantages"], grid[2]["iterations"][0]["advantages"]]
    assert [len(half) for half in halves] == [2, 2]
    # (float32 rewards of tiny spread: the centred sum is zero to ~1e-4)
    assert sum(halves[0] + halves[1]) == pytest.approx(0.0, abs=1e-3)
    assert abs(sum(halves[0])) > 1e-2
    assert [record["reward_calls"] for record in grid] == [2, 0, 2, 0]


def _wan_loss_and_gradients(mesh: ProcessMesh | None, fsdp: bool = False):
    """
    One forward and backward of a tiny Wan transformer; with `mesh`, context-parallel, and with gradients averaged
    over the processes as DDP does, or by FSDP2 itself.
    """
    from torch.distributed.fsdp import fully_shard

    from trl_ddrl.parallel import enable_context_parallel

    model = tiny_wan_pipeline().transformer
    if mesh is not None:
        enable_context_parallel([model], mesh, "ulysses", "cpu")
        if fsdp:
            for block in model.blocks:
                fully_shard(block)
            fully_shard(model)
    generator = torch.Generator().manual_seed(1)
    latents, text = torch.randn(2, 4, 2, 4, 4, generator=generator), torch.randn(2, 16, 32, generator=generator)
    output = model(latents, torch.tensor([500.0, 300.0]), text, return_dict=False)[0]
    loss = (output * torch.linspace(-1, 1, output.numel()).view_as(output)).sum()
    return _backward_and_gradients(model, loss, mesh, fsdp=fsdp and mesh is not None)  # sharded only with a mesh


def _backward_and_gradients(model, loss: torch.Tensor, mesh: ProcessMesh | None, fsdp: bool = False):
    """Backpropagate `loss`; return it and each parameter's gradient averaged over the processes (DDP's or FSDP2's)."""
    (loss if mesh is None else mesh.scale_gradients(loss)).backward()
    gradients = {}
    for name, parameter in model.named_parameters():
        gradient = parameter.grad
        if fsdp:
            gradient = gradient.full_tensor()  # FSDP2 reduce-scattered the mean over the processes
        elif mesh is not None:
            torch.distributed.all_reduce(gradient)  # what DDP does: the mean over all processes
            gradient /= mesh.world_size
        gradients[name] = gradient.detach()
    return loss.detach(), gradients


def _context_parallel_worker(rank: int, port: int, path: str, loss_and_gradients, option: bool) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        torch.save(loss_and_gradients(ProcessMesh(2, rank, context_parallel_size=2), option), path)
    finally:
        torch.distributed.destroy_process_group()


def assert_context_parallel_matches_unsharded(tmp_path, loss_and_gradients, option: bool) -> dict:
    """
    Run `loss_and_gradients(mesh, option)` on two context-parallel gloo ranks and check each rank's loss and averaged
    gradients against the unsharded run's; return the unsharded gradients.
    """
    # Forked processes share the imported modules, so the two gloo ranks start in well under a second.
    context = torch.multiprocessing.get_context("fork")
    port, paths = free_port(), [tmp_path / f"{rank}.pt" for rank in (0, 1)]
    processes = [
        context.Process(target=_context_parallel_worker, args=(rank, port, paths[rank], loss_and_gradients, option))
        for rank in (0, 1)
    ]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=120)
        assert process.exitcode == 0
    loss, gradients = loss_and_gradients(None, option)
    for path in paths:
        rank_loss, rank_gradients = torch.load(path)
        torch.testing.assert_close(rank_loss, loss)
        for name, gradient in gradients.items():
            torch.testing.assert_close(rank_gradients[name], gradient, rtol=1e-4, atol=1e-6, msg=name)
    return gradients


@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp2"])
def test_context_parallel_wan_forward_and_backward_match_the_unsharded_model(fsdp, tmp_path):
    assert_context_parallel_matches_unsharded(tmp_path, _wan_loss_and_gradients, fsdp)


def _tiny_cosmos_transformer():
    """
    A Cosmos-Predict2.5-shaped transformer (condition-mask channel, projected text embeddings) with two blocks and
    the learnable extra positional embedding of Cosmos-Predict2, randomised so that every input reaches the output.
    """
    from diffusers import CosmosTransformer3DModel

    torch.manual_seed(0)
    model = CosmosTransformer3DModel(
        in_channels=4 + 1, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=2, mlp_ratio=2.0,
        text_embed_dim=32, adaln_lora_dim=4, max_size=(4, 8, 8), patch_size=(1, 2, 2), rope_scale=(1.0, 3.0, 3.0),
        concat_padding_mask=False, extra_pos_embed_type="learnable", use_crossattn_projection=True,
        crossattn_proj_in_channels=24, encoder_hidden_states_channels=32,
    )  # fmt: skip
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.3)
    return model


def test_the_cosmos_plan_changes_nothing_without_a_parallel_config():
    from diffusers.models.transformers.transformer_cosmos import CosmosAttnProcessor2_0

    from trl_ddrl.pipelines.cosmos_parallel import CosmosContextParallelAttnProcessor

    model = tiny_cosmos2_5_pipeline().transformer
    generator = torch.Generator().manual_seed(0)
    inputs = dict(
        hidden_states=torch.randn(1, 5, 2, 4, 4, generator=generator), timestep=torch.tensor([0.5]),
        encoder_hidden_states=torch.randn(1, 6, 32, generator=generator), fps=16, return_dict=False,
    )  # fmt: skip
    with torch.no_grad():
        before = model(**inputs)[0]
        install_context_parallel_plans([model])
        install_context_parallel_plans([model])  # idempotent
        after = model(**inputs)[0]
    torch.testing.assert_close(after, before, rtol=0, atol=0)
    for block in model.transformer_blocks:
        assert type(block.attn1.processor) is CosmosContextParallelAttnProcessor
        assert type(block.attn2.processor) is CosmosAttnProcessor2_0  # cross-attention: not split
    # Models that are not Cosmos are left alone.
    wan = tiny_wan_pipeline().transformer
    install_context_parallel_plans([wan])
    assert "_cp_plan" not in vars(wan)


def _cosmos_loss_and_gradients(mesh: ProcessMesh | None, checkpointing: bool = False):
    """
    One forward and backward of a tiny Cosmos transformer, as `_wan_loss_and_gradients`: once with one timestep per
    sample and once with one per latent frame (the Cosmos adapters' form: the conditioning frames at their own noise
    level) and a text attention mask; with `checkpointing`, under diffusers' activation checkpointing (the trainer's).
    """
    from trl_ddrl.parallel import enable_context_parallel

    model = _tiny_cosmos_transformer()
    if checkpointing:
        model.enable_gradient_checkpointing()
    if mesh is not None:
        enable_context_parallel([model], mesh, "ulysses", "cpu")
    generator = torch.Generator().manual_seed(1)
    latents, text = torch.randn(2, 4, 2, 4, 4, generator=generator), torch.randn(2, 6, 24, generator=generator)
    condition_mask = torch.zeros(2, 1, 2, 4, 4)
    condition_mask[:, :, 0] = 1.0
    per_frame = torch.tensor([[1e-4, 0.7], [1e-4, 0.3]]).view(2, 1, 2, 1, 1)
    text_mask = torch.tensor([[1.0] * 6, [1.0] * 4 + [0.0] * 2]).bool()
    loss = 0.0
    for timestep, mask in ((torch.tensor([0.7, 0.3]), None), (per_frame, text_mask)):
        output = model(
            hidden_states=latents, timestep=timestep, encoder_hidden_states=text, attention_mask=mask, fps=16,
            condition_mask=condition_mask, return_dict=False,
        )[0]  # fmt: skip
        assert output.shape == (2, 4, 2, 4, 4)
        loss = loss + (output * torch.linspace(-1, 1, output.numel()).view_as(output)).sum()
    return _backward_and_gradients(model, loss, mesh)


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "activation_checkpointing"])
def test_context_parallel_cosmos_forward_and_backward_match_the_unsharded_model(checkpointing, tmp_path):
    gradients = assert_context_parallel_matches_unsharded(tmp_path, _cosmos_loss_and_gradients, checkpointing)
    assert all(gradient.abs().sum() > 0 for gradient in gradients.values())


def test_command_line_launches_a_context_parallel_run():
    from trl_ddrl.cli import plan

    argv = ["--model_name_or_path", "x", "--dataset_name", "p.txt", "--reward_funcs", "brightness"]
    launch_plan = plan([*argv, "--context_parallel_size", "4", "--accelerate_config", "context_parallel"], "trl-ddrl")
    assert launch_plan.parsed[1].context_parallel_size == 4
    config_file = launch_plan.accelerate_argv[launch_plan.accelerate_argv.index("--config_file") + 1]
    assert config_file.endswith(os.path.join("accelerate_configs", "context_parallel.yaml"))
    assert launch_plan.accelerate_argv[-2:] == ["--context_parallel_size", "4"]
