# Copyright 2026 The trl_ddrl Authors. Licensed under the Apache License, Version 2.0.
import math
import sys
from pathlib import Path

import pytest
import torch
from tiny_models import tiny_sd3_pipeline

from trl_ddrl import DDRLConfig
from trl_ddrl.memory import (
    GIB,
    LiveBytes,
    MemoryEstimate,
    Parallelism,
    _depth_units,
    _scaled_spec,
    estimate_memory,
)
from trl_ddrl.model_configs import list_models, load_model_config


sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import memory_estimates  # noqa: E402


def tiny_args(tmp_path, **overrides):
    values = dict(
        num_generations=2,
        prompts_per_step=2,
        num_inference_steps=3,
        per_device_train_batch_size=2,
        height=32,
        width=32,
        use_ema=False,
        data_beta=0.0,
    )
    return DDRLConfig(output_dir=str(tmp_path), report_to=[], **{**values, **overrides})


def test_live_bytes_counts_storages_once_and_frees_them():
    counter = LiveBytes(fake=False)
    with counter.window() as window, counter:
        a = torch.zeros(1000)  # 4000 bytes
        view = a[10:]  # same storage
        b = a + 1  # 4000 more
        del a, view, b
        c = torch.zeros(10)
    assert window.peak == 8000
    assert sum(counter.totals.values()) == 40
    del c


def test_parallelism_weights_divide_what_each_strategy_shards():
    fsdp = Parallelism(num_processes=8, sharding="fsdp2", context_parallel_size=2)
    assert fsdp.weight(("weights", False)) == 1 / 8
    assert fsdp.weight(("trained_weights", False)) == 1 / 8
    assert fsdp.weight(("optimizer", False)) == 1 / 8
    assert fsdp.weight(("text_encoders", False)) == 1  # never sharded
    assert fsdp.weight(("replay", True)) == 1 / 2  # activations split by context parallelism
    assert fsdp.weight(("rollout", False)) == 1  # trajectories whole on every rank
    zero2 = Parallelism(num_processes=4, sharding="zero2")
    assert zero2.weight(("trained_weights", False)) == 1 and zero2.weight(("gradients", False)) == 1 / 4
    assert Parallelism(num_processes=2, sharding="ddp").weight(("gradients", False)) == 2  # DDP's buckets
    with pytest.raises(ValueError, match="sharding"):
        Parallelism(sharding="zero4")


def test_scaled_spec_keeps_the_block_proportions():
    spec = load_model_config("flux.1-dev")
    assert _depth_units(spec) == 19  # gcd(19 double blocks, 38 single blocks)
    config = _scaled_spec(spec, 2, 19)["components"]["transformer"]["config"]
    assert (config["num_layers"], config["num_single_layers"]) == (2, 4)
    sd3 = _scaled_spec(load_model_config("sd3.5-medium"), 2, 24)["components"]["transformer"]["config"]
    assert sd3["num_layers"] == 2 and sd3["dual_attention_layers"] == [0]  # 13 of 24 blocks have dual attention


def test_estimate_reports_phases_and_what_to_change():
    estimate = MemoryEstimate(
        model="m",
        peak_bytes=70 * GIB,
        phases={"rollout": 10 * GIB, "replay": 70 * GIB},
        breakdown={"replay/activations": 50 * GIB, "trained_weights": 20 * GIB},
        peak_phase="replay",
        settings={"activation_checkpointing": False, "sharding": "none"},
    )
    assert estimate.largest == "replay/activations"
    assert estimate.fits(80) and not estimate.fits(72)
    assert "activation_checkpointing" in estimate.advice()[0]
    assert "FSDP2" in estimate.advice()[1]
    assert "largest term: replay/activations" in estimate.table()


def test_fake_estimate_equals_the_real_count(tmp_path):
    """The same iteration counted on fake tensors and on real ones gives the same peak (within 1%)."""
    args = tiny_args(tmp_path)
    fake = estimate_memory(tiny_sd3_pipeline, args, torch_dtype=torch.float32)
    real = estimate_memory(tiny_sd3_pipeline, args, torch_dtype=torch.float32, fake=False)
    assert abs(fake.peak_bytes - real.peak_bytes) <= 0.01 * real.peak_bytes
    assert set(fake.phases) == {"text_encoders", "rollout", "vae_decode", "replay", "optimizer"}


def test_sharding_lowers_the_estimate(tmp_path):
    args = tiny_args(tmp_path, prompts_per_step=4)
    one = estimate_memory(tiny_sd3_pipeline, args, torch_dtype=torch.float32)
    eight = estimate_memory(tiny_sd3_pipeline, args, torch_dtype=torch.float32, num_processes=4, sharding="zero3")
    assert eight.peak_bytes < one.peak_bytes
    assert eight.settings["samples_per_process"] == 2 and one.settings["samples_per_process"] == 8


def test_estimate_matches_the_allocator_peak_of_a_real_run(tmp_path):
    """
    The estimate (fake tensors) against the peak of the same iteration run for real, measured by PyTorch's CPU
    allocator through `torch.profiler` (not the estimator's counter), within 15%.
    """
    args = tiny_args(tmp_path, data_beta=0.01, use_ema=True, rollout_batch_size=2)
    estimate = estimate_memory(tiny_sd3_pipeline, args, torch_dtype=torch.float32)
    measured = memory_estimates.measure_in_process(tiny_sd3_pipeline(), args)
    error = (estimate.peak_bytes - measured["allocator_bytes"]) / measured["allocator_bytes"]
    assert abs(error) < 0.15, (estimate.peak_bytes, measured)


@pytest.mark.slow
def test_estimate_against_the_measured_cpu_peak():
    """
    A small SD3.5-architecture iteration run for real in a fresh process: the estimate (fake tensors) is within 15% of
    its allocator peak (torch.profiler), and below its peak resident memory, which adds what no allocation of
    PyTorch's shows (oneDNN's convolution workspaces, Python's and the allocator's overhead; see docs/memory.md).
    """
    result = memory_estimates.validate(memory_estimates.VALIDATION_OVERRIDES)
    assert abs(result["relative_error"]) < 0.15, result
    assert result["estimate_bytes"] <= result["resident_bytes"], result


def test_cli_lists_the_architectures_and_rejects_others(capsys):
    from trl_ddrl.cli import main

    assert main(["estimate-memory", "--help"]) == 0
    assert "flux.1-dev" in capsys.readouterr().out
    with pytest.raises(SystemExit) as error:
        main(["estimate-memory", "--model_name_or_path", "my/model", "--output_dir", "/tmp/x"])
    assert error.value.code == 2
    assert "shipped architectures" in capsys.readouterr().err


def test_lora_estimate_is_below_full_fine_tuning(tmp_path):
    from peft import LoraConfig

    args = tiny_args(tmp_path)
    full = estimate_memory(tiny_sd3_pipeline, args, torch_dtype=torch.float32)
    lora = estimate_memory(
        tiny_sd3_pipeline, args, torch_dtype=torch.float32, peft_config=LoraConfig(r=4, target_modules=["to_q"])
    )
    assert lora.settings["lora"] and lora.peak_bytes < full.peak_bytes


def test_vae_slicing_lowers_the_decode_peak():
    """Decoding a batch one sample at a time (enable_vae_slicing) lowers the CPU peak of the decode."""
    from tiny_models import tiny_vae

    from trl_ddrl.pipelines.latents import enable_vae_slicing

    class Pipeline:
        vae = tiny_vae()

    latents = torch.randn(8, 4, 64, 64)
    peaks = []
    for sliced in (False, True):
        Pipeline.vae.use_slicing = False
        if sliced:
            assert enable_vae_slicing(Pipeline)
        counter = LiveBytes(fake=False)
        with torch.no_grad(), counter.window() as window, counter:
            images = Pipeline.vae.decode(latents).sample
        peaks.append(window.peak)
        del images
    assert peaks[1] < 0.5 * peaks[0], peaks


def test_the_estimator_samples_with_the_trainers_settings(tmp_path, monkeypatch):
    """The estimator built its own SamplingSettings and dropped `karras_sigmas` (the Cosmos recipe's schedule)."""
    import trl_ddrl.pipelines as pipelines
    from trl_ddrl.memory import LiveBytes, run_iteration
    from trl_ddrl.pipelines import SamplingSettings

    seen = []

    class Stop(Exception):
        pass

    def capture(pipeline, settings):
        seen.append(settings)
        raise Stop

    monkeypatch.setattr(pipelines, "get_adapter", capture)
    args = tiny_args(tmp_path, karras_sigmas=[200.0, 0.01, 7.0], num_inference_steps=21, sampler="churn")
    with pytest.raises(Stop):
        run_iteration(tiny_sd3_pipeline(), args, LiveBytes(lambda label: 1.0))
    assert seen == [SamplingSettings.from_config(args)]
    assert seen[0].karras_sigmas == (200.0, 0.01, 7.0)


def test_the_estimator_runs_the_cosmos_recipes_mixed_modes(tmp_path):
    """With `num_conditioning_frames_choices` the rollout and the data term need each row's mode."""
    from tiny_models import tiny_cosmos2_5_pipeline

    from trl_ddrl.memory import LiveBytes, run_iteration

    args = tiny_args(
        tmp_path, num_frames=5, max_sequence_length=16, data_beta=0.01, num_conditioning_frames_choices=[0, 1]
    )
    windows = {}
    run_iteration(tiny_cosmos2_5_pipeline(), args, LiveBytes(fake=False), windows=windows)
    assert "rollout" in windows and "data" in windows


RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda path: path.stem)
def test_every_recipe_is_estimable(recipe, monkeypatch):
    """
    `estimate-memory --config recipes/X.yaml` refused the recipes' `accelerate_config` key; now it reads the process
    count and the sharding from it and the architecture from the recipe's Hub id.
    """
    import trl_ddrl.memory as memory

    calls = []

    def record(name, args, **kwargs):
        calls.append((name, args, kwargs))
        return MemoryEstimate("m", GIB, {"replay": GIB}, {"weights": GIB}, "replay", settings={})

    monkeypatch.setattr(memory, "estimate_memory", record)
    assert memory.main(["--config", str(recipe)]) == 0
    ((name, args, kwargs),) = calls
    yaml_text = recipe.read_text()
    accelerate = Path(__file__).resolve().parents[1] / yaml_text.split("accelerate_config: ")[1].split()[0]
    expected = memory.parallelism_from_accelerate_config(str(accelerate))
    assert (kwargs["num_processes"], kwargs["sharding"]) == expected
    assert kwargs["num_processes"] > 1
    assert name in list_models()
    assert args.height and args.num_generations
    assert (kwargs["peft_config"] is not None) == ("use_peft: true" in yaml_text)


def test_recipe_options_can_be_overridden_on_the_command_line(monkeypatch, capsys):
    import trl_ddrl.memory as memory

    calls = []
    monkeypatch.setattr(
        memory,
        "estimate_memory",
        lambda name, args, **kwargs: (
            calls.append((name, kwargs))
            or (MemoryEstimate("m", 90 * GIB, {"replay": 90 * GIB}, {"weights": 90 * GIB}, "replay", settings={}))
        ),
    )
    recipe = str(Path(__file__).resolve().parents[1] / "recipes" / "flux1-dev-pickscore-ddrl.yaml")
    argv = ["--config", recipe, "--model_name_or_path", "flux.1-dev", "--num_processes", "4", "--sharding", "zero3"]
    assert memory.main(argv) == 1  # does not fit 80 GiB
    assert calls == [("flux.1-dev", calls[0][1])] and calls[0][1]["num_processes"] == 4
    assert calls[0][1]["sharding"] == "zero3"
    assert "does NOT fit" in capsys.readouterr().out


def test_accelerate_configs_map_to_the_estimators_sharding(tmp_path):
    from trl_ddrl.memory import parallelism_from_accelerate_config

    def config(text):
        path = tmp_path / "config.yaml"
        path.write_text(text)
        return parallelism_from_accelerate_config(str(path))

    assert config("distributed_type: FSDP\nnum_processes: 8\nfsdp_config:\n  fsdp_version: 2\n") == (8, "fsdp2")
    assert config("distributed_type: MULTI_GPU\nnum_processes: 4\n") == (4, "ddp")
    assert config("distributed_type: DEEPSPEED\nnum_processes: 2\ndeepspeed_config:\n  zero_stage: 2\n") == (
        2,
        "zero2",
    )
    assert config("distributed_type: NO\nnum_processes: 1\n") == (1, "none")


def test_float32_master_weights_count_as_trained_weights(tmp_path):
    """
    Full fine-tuning of a bf16 pipeline: the upcast float32 master weights were counted as "other" (not sharded by
    FSDP2: 53 GiB per GPU for Wan 2.1 14B on 8 GPUs instead of 6.7).
    """
    from trl_ddrl.memory import run_iteration

    pipeline = tiny_sd3_pipeline().to(torch.bfloat16)
    counter = LiveBytes(fake=False)
    with counter:
        run_iteration(pipeline, tiny_args(tmp_path), counter)
    trained = sum(p.numel() * 4 for p in pipeline.transformer.parameters())
    assert counter.totals[("trained_weights", False)] == trained
    assert counter.totals[("other", False)] < 0.01 * trained


def test_fake_parameters_keep_tied_weights_tied():
    """T5's tied embedding became two fake tensors, counted twice (2 GiB too many for Wan's UMT5-XXL in bf16)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from transformers import T5Config, T5EncoderModel

    from trl_ddrl.memory import _fake_parameters

    encoder = T5EncoderModel(T5Config(vocab_size=100, d_model=8, d_kv=4, d_ff=8, num_layers=1, num_heads=2))
    assert encoder.shared.weight is encoder.encoder.embed_tokens.weight
    _fake_parameters(encoder, FakeTensorMode(allow_non_fake_inputs=True))
    assert encoder.shared.weight is encoder.encoder.embed_tokens.weight


def test_replay_autocasts_each_call_and_fsdp2_keeps_no_cast_cache(tmp_path):
    """
    As accelerate's prepared model: the replay's denoiser calls autocast one by one and the backward pass runs outside
    autocast (the trace held autocast, and its cache of the float32 trained weights' bf16 casts, over the whole replay
    and its backward: +27 GiB for Wan 2.1 14B full fine-tuning); FSDP2 gathers bf16 weights, so no cast cache.
    """
    from trl_ddrl.memory import run_iteration

    pipeline = tiny_sd3_pipeline().to(torch.bfloat16)
    seen = {"forward": [], "backward": []}
    pipeline.transformer.transformer_blocks[0].register_forward_pre_hook(
        lambda *_: seen["forward"].append((torch.is_autocast_enabled("cpu"), torch.is_autocast_cache_enabled()))
    )
    parameter = next(pipeline.transformer.parameters())
    parameter.register_post_accumulate_grad_hook(lambda _: seen["backward"].append(torch.is_autocast_enabled("cpu")))
    counter = LiveBytes(fake=False)
    with counter:
        run_iteration(pipeline, tiny_args(tmp_path), counter, parallelism=Parallelism(2, "fsdp2"))
    assert seen["backward"] and not any(seen["backward"])
    assert seen["forward"] and all(enabled and not cache for enabled, cache in seen["forward"])


def test_two_expert_denoiser_is_estimable(tmp_path):
    """Wan 2.2's experts split a batch by noise level read on the host: on fake tensors that raised (aten.nonzero)."""
    from tiny_models import tiny_wan22_pipeline

    args = tiny_args(tmp_path, num_frames=5, per_device_train_batch_size=4, train_timesteps=[0, 1])
    estimate = estimate_memory(tiny_wan22_pipeline, args, torch_dtype=torch.float32)
    assert estimate.peak_bytes > 0 and estimate.phases["replay"] > 0


def test_extrapolation_takes_the_gathered_blocks_of_the_deeper_run():
    """At one unit Wan's block list has one block and FSDP2's gathered blocks were a smaller list's (0.26 vs 1.31 GiB)."""
    from trl_ddrl.memory import GATHERED, _extrapolate, _Window

    def window(weights, gathered):
        snapshot = {("weights", False): weights, (GATHERED, False): gathered}
        return {"replay": _Window(start={}, peak=0, snapshot=snapshot)}

    phases = _extrapolate([(1, window(10, 3)), (2, window(20, 7))], 40, Parallelism())
    peak, snapshot = phases["replay"]
    assert snapshot[(GATHERED, False)] == 7 and snapshot[("weights", False)] == 400 and peak == 407


# ---- the rollout as RolloutEngine.generate runs it, and the memory options of DDRLConfig ------------------------------


def tiny_bytes(pipeline, *names) -> int:
    """Bytes of the parameters and buffers of the pipeline's components whose name holds one of `names`."""
    return sum(
        tensor.numel() * tensor.element_size()
        for name, module in pipeline.components.items()
        if isinstance(module, torch.nn.Module) and any(part in name for part in names)
        for tensor in [*module.parameters(), *module.buffers()]
    )


def tiny_latent_and_steps(args) -> tuple[int, int]:
    """(bytes of one float32 latent, number of trained steps) of the tiny SD3 pipeline at `args`."""
    from trl_ddrl.pipelines import SamplingSettings, get_adapter
    from trl_ddrl.sde_window import rollout_steps

    adapter = get_adapter(tiny_sd3_pipeline(), SamplingSettings.from_config(args))
    return adapter.sample_noise(1, generator=torch.Generator().manual_seed(0)).numel() * 4, len(
        rollout_steps(args, 0).trained
    )


def test_the_estimators_rollout_agrees_with_the_real_generate(tmp_path, tiny_sd3_path):
    """
    The rollout of `RolloutEngine.generate` (the trainer's, on real tensors) and the estimator's mirror of it hold the
    same transient bytes at their peak (within 15%): the estimator concatenated whole trajectories and every decoded
    sample, which generate no longer does.
    """
    from test_trainer import brightness, make_args, prompt_dataset
    from transformers import TrainerState

    from trl_ddrl import DDRLTrainer
    from trl_ddrl.memory import run_iteration
    from trl_ddrl.rollout import read_prompt_rows

    args = make_args(
        tmp_path,
        async_rewards=False,
        rollout_batch_size=4,
        num_inference_steps=10,
        height=32,
        width=32,
        num_generations=8,
    )
    trainer = DDRLTrainer(tiny_sd3_path, brightness, args=args, train_dataset=prompt_dataset())
    rows = read_prompt_rows(trainer.train_dataset, [0] * 8 + [1] * 8)
    state = TrainerState(global_step=0, max_steps=100)
    trainer.rollout.generate(rows, 0, state)  # warm-up: lazily built tables outside the count
    real = LiveBytes(fake=False)
    with real.window() as window, real:
        buffer = trainer.rollout.generate(rows, 0, state)
    del buffer

    estimate_args = _for_processes_copy(args)
    windows = {}
    counter = LiveBytes(fake=False)
    with counter:
        run_iteration(DDRLTrainer._load_pipeline(tiny_sd3_path, args), estimate_args, counter, windows=windows)
    encoder_bytes = tiny_bytes(trainer.pipeline, "text_encoder")
    mirrored = max(
        sum(size for (category, _), size in windows[name].snapshot.items() if category in ("rollout", "vae_decode"))
        + windows[name].snapshot.get(("text_encoders", False), 0)
        - encoder_bytes
        for name in ("rollout", "vae_decode")
    )
    assert abs(mirrored - window.peak) <= 0.15 * window.peak, (mirrored, window.peak)


def _for_processes_copy(args):
    from trl_ddrl.memory import _for_processes

    return _for_processes(args, Parallelism(), torch.float32)


def test_ema_on_the_host_is_not_counted(tmp_path):
    args = tiny_args(tmp_path, use_ema=True)
    on_gpu = estimate_memory(tiny_sd3_pipeline, args, torch_dtype=torch.float32)
    on_host = estimate_memory(
        tiny_sd3_pipeline, tiny_args(tmp_path, use_ema=True, ema_device="cpu"), torch_dtype=torch.float32
    )
    ema = sum(p.numel() * 4 for p in tiny_sd3_pipeline().transformer.parameters())  # float32 copy of the trained
    assert on_gpu.breakdown["ema"] == ema and "ema" not in on_host.breakdown
    for phase in ("replay", "optimizer", "ema"):
        assert on_gpu.phases[phase] - on_host.phases[phase] == ema, phase


def test_offloaded_text_encoders_are_counted_only_while_encoding(tmp_path):
    resident = estimate_memory(tiny_sd3_pipeline, tiny_args(tmp_path), torch_dtype=torch.float32)
    offloaded = estimate_memory(
        tiny_sd3_pipeline, tiny_args(tmp_path, offload_text_encoders=True), torch_dtype=torch.float32
    )
    precomputed = estimate_memory(
        tiny_sd3_pipeline, tiny_args(tmp_path, precompute_prompt_embeddings=True), torch_dtype=torch.float32
    )
    encoders = tiny_bytes(tiny_sd3_pipeline(), "text_encoder")
    assert offloaded.phases["text_encoders"] == resident.phases["text_encoders"]  # on the GPU to encode
    for phase in ("rollout", "replay", "optimizer"):
        assert resident.phases[phase] - offloaded.phases[phase] == encoders, phase
        assert precomputed.phases[phase] == offloaded.phases[phase], phase
    # Precomputed: no encoding during training, the encoders never come back; the embeddings are on the GPU.
    assert precomputed.phases["text_encoders"] <= resident.phases["text_encoders"] - encoders


def tiny_buffer_bytes(args) -> int:
    """Bytes of the trained transitions (`trained_transitions`) of a real rollout of the tiny SD3 pipeline."""
    from trl_ddrl.pipelines import SamplingSettings, get_adapter
    from trl_ddrl.rollout import trained_transitions
    from trl_ddrl.sde_window import rollout_steps

    adapter = get_adapter(tiny_sd3_pipeline(), SamplingSettings.from_config(args))
    samples = args.prompts_per_step * args.num_generations
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        conditioning = adapter.encode_prompts(["a cat"] * samples, adapter.device)
        trajectory = adapter.sample(
            adapter.denoiser, conditioning, adapter.sample_noise(samples, generator=generator), generator=generator
        )
        steps = torch.tensor(rollout_steps(args, 0).trained)
        return sum(tensor.nbytes for tensor in trained_transitions(adapter, trajectory, steps))


def test_offloaded_trajectories_leave_only_the_micro_batch_on_the_gpu(tmp_path):
    args = tiny_args(tmp_path)
    resident = estimate_memory(tiny_sd3_pipeline, args, torch_dtype=torch.float32)
    offloaded = estimate_memory(
        tiny_sd3_pipeline, tiny_args(tmp_path, offload_trajectories=True), torch_dtype=torch.float32
    )
    buffer = tiny_buffer_bytes(args)
    latent, steps = tiny_latent_and_steps(args)
    assert buffer >= args.prompts_per_step * args.num_generations * (3 * steps + 1) * latent
    for phase in ("replay", "optimizer"):
        assert resident.phases[phase] - offloaded.phases[phase] == buffer, phase


def test_8bit_adamw_state_is_a_byte_per_moment(tmp_path):
    fp32 = estimate_memory(tiny_sd3_pipeline, tiny_args(tmp_path), torch_dtype=torch.float32)
    int8 = estimate_memory(tiny_sd3_pipeline, tiny_args(tmp_path, optim="adamw_bnb_8bit"), torch_dtype=torch.float32)
    sizes = [p.numel() for p in tiny_sd3_pipeline().transformer.parameters()]
    # bitsandbytes: 8-bit moments (+ a float32 absmax per 256 values) for tensors of 4096 values or more, else float32.
    expected = sum(2 * n + 2 * 4 * math.ceil(n / 256) if n >= 4096 else 8 * n for n in sizes)
    assert any(n >= 4096 for n in sizes)
    steps = 4 * len(sizes)  # a float32 step count per tensor
    assert fp32.breakdown["optimizer"] == 8 * sum(sizes) + steps
    assert int8.breakdown["optimizer"] == expected + steps
    assert fp32.phases["replay"] - int8.phases["replay"] == 8 * sum(sizes) - expected


def test_offloaded_reference_model_is_on_the_gpu_only_while_it_runs(tmp_path):
    resident = estimate_memory(tiny_sd3_pipeline, tiny_args(tmp_path, kl_beta=0.1), torch_dtype=torch.float32)
    offloaded = estimate_memory(
        tiny_sd3_pipeline, tiny_args(tmp_path, kl_beta=0.1, offload_reference_model=True), torch_dtype=torch.float32
    )
    reference = tiny_bytes(tiny_sd3_pipeline(), "transformer")  # float32 pipeline: the copy in float32
    assert resident.breakdown["reference"] == reference
    assert resident.phases["optimizer"] - offloaded.phases["optimizer"] == reference
    assert resident.phases["rollout"] - offloaded.phases["rollout"] == reference


def test_precomputed_reference_means_run_the_reference_before_the_replay(tmp_path):
    args = tiny_args(tmp_path, kl_beta=0.1, offload_reference_model=True, precompute_reference_means=True)
    precomputed = estimate_memory(tiny_sd3_pipeline, args, torch_dtype=torch.float32)
    without_kl = estimate_memory(tiny_sd3_pipeline, tiny_args(tmp_path), torch_dtype=torch.float32)
    latent, steps = tiny_latent_and_steps(args)
    means = args.prompts_per_step * args.num_generations * steps * latent  # float32 S x K x latent
    reference = tiny_bytes(tiny_sd3_pipeline(), "transformer")
    # The reference forwards run in a phase of their own, the reference copy on the GPU for it only.
    assert precomputed.phases["reference_means"] >= without_kl.phases["optimizer"] + reference
    # The replay runs no reference: it holds the means beside what it holds without the KL term (plus the KL's few
    # micro-batch-sized tensors).
    extra = precomputed.phases["replay"] - without_kl.phases["replay"]
    assert means <= extra <= means + 8 * latent * args.per_device_train_batch_size, (extra, means)


def test_the_optimizer_step_is_the_configured_adamw(tmp_path):
    # adamw_torch_fused (the default) updates in one kernel; adamw_torch's foreach step allocates temporaries as large
    # as a moment (`torch._foreach_sqrt` of exp_avg_sq, ...), which the optimizer phase must show.
    fused = estimate_memory(tiny_sd3_pipeline, tiny_args(tmp_path), torch_dtype=torch.float32)
    foreach = estimate_memory(tiny_sd3_pipeline, tiny_args(tmp_path, optim="adamw_torch"), torch_dtype=torch.float32)
    trained = tiny_bytes(tiny_sd3_pipeline(), "transformer")
    assert foreach.phases["optimizer"] - fused.phases["optimizer"] >= 0.9 * trained


def test_fit_memory_adds_the_memory_options_until_it_fits(tmp_path):
    from trl_ddrl.memory import fit_memory

    args = tiny_args(tmp_path, use_ema=True, per_device_train_batch_size=4, rollout_batch_size=4)
    every = tiny_args(
        tmp_path,
        use_ema=True,
        per_device_train_batch_size=1,
        rollout_batch_size=1,
        offload_text_encoders=True,
        ema_device="cpu",
        offload_trajectories=True,
    )
    kwargs = dict(torch_dtype=torch.float32)
    first, last = (estimate_memory(tiny_sd3_pipeline, a, **kwargs).peak_gib for a in (args, every))
    assert last < first
    # A GPU that the last setting fits and the first does not (fits: peak + 5% + 2 GiB of CUDA context).
    gpu = 2 + 1.05 * (last + first) / 2
    tried = fit_memory(tiny_sd3_pipeline, args, gpu, **kwargs)
    assert tried[0][0] == {}
    assert [estimate.fits(gpu) for _, estimate in tried] == [False] * (len(tried) - 1) + [True]
    assert list(tried[1][0]) == ["per_device_train_batch_size", "rollout_batch_size"]
    for (before, _), (after, _) in zip(tried, tried[1:]):
        assert before.items() <= after.items() and len(after) > len(before)  # each step adds to the previous
    # Stops as soon as one fits: a GPU the first setting fits takes no step.
    assert len(fit_memory(tiny_sd3_pipeline, args, 2 + 1.05 * first + 0.01, **kwargs)) == 1


def test_cli_fit_prints_the_flags_that_fit(monkeypatch, capsys):
    import trl_ddrl.memory as memory

    def estimate(name, args, **kwargs):
        peak = 90 if not args.offload_text_encoders else 60  # only offloading the text encoders is enough
        return MemoryEstimate("m", peak * GIB, {"replay": peak * GIB}, {"text_encoders": peak * GIB}, "replay", {})

    monkeypatch.setattr(memory, "estimate_memory", estimate)
    argv = ["--model_name_or_path", "flux.1-dev", "--output_dir", "/tmp/fit", "--fit"]
    assert memory.main(argv) == 0
    out = capsys.readouterr().out
    assert "add: --per_device_train_batch_size 1 --rollout_batch_size 1 --offload_text_encoders" in out
    assert memory.main(argv[:-1]) == 1  # without --fit: the estimate as given, does not fit


def test_extrapolated_depth_matches_the_full_depth():
    # At one unit of blocks (one Wan block) the replay's peak falls at another moment than at the real depth (the
    # outer layers weigh as much as the blocks); two and four units extrapolate to the full-depth count.
    from peft import LoraConfig

    args = DDRLConfig(
        output_dir="/tmp/ddrl-depth",
        report_to=[],
        num_generations=2,
        prompts_per_step=1,
        num_inference_steps=4,
        per_device_train_batch_size=1,
        rollout_batch_size=1,
        height=240,
        width=416,
        num_frames=9,
        data_beta=0.01,
        guidance_scale=4.5,
        use_ema=False,
    )
    lora = LoraConfig(r=32, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    extrapolated, full = (
        estimate_memory("wan2.1-t2v-1.3b", args, peft_config=lora, depth=depth) for depth in ("extrapolate", "full")
    )
    assert extrapolated.phases["replay"] == pytest.approx(full.phases["replay"], rel=0.02)
    assert extrapolated.peak_bytes == pytest.approx(full.peak_bytes, rel=0.02)


def test_boolean_masks_count_as_all_true_on_fake_tensors():
    """
    A boolean index's output size depends on the mask's values, which fake tensors do not have (`aten.nonzero` raised
    `DynamicOutputShapeException`); the estimator takes every element as true (the most memory) and its negation as
    all false, so `x[mask]` and `x[~mask]` still add up to `x`.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    x = torch.randn(2, 5, 3)
    mask = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 0, 0]], dtype=torch.bool)
    all_true = torch.ones_like(mask)
    with LiveBytes(fake=False):  # real tensors: the mask's own values
        assert x[mask].shape == (5, 3)
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    with mode, LiveBytes():
        fake_x, fake_mask = mode.from_tensor(x), mode.from_tensor(mask)
        assert fake_x[fake_mask].shape == x[all_true].shape == (10, 3)
        assert fake_x[~fake_mask].shape == x[~all_true].shape == (0, 3)
        assert fake_x[:, fake_mask[0]].shape == x[:, all_true[0]].shape == (2, 5, 3)
        assert torch.nonzero(fake_mask).shape == torch.nonzero(all_true).shape == (10, 2)
        assert torch.masked_select(fake_x, fake_mask[..., None]).shape == (30,)
        fake_x[fake_mask] = 0.0  # index_put_ with a boolean index
        assert fake_x.shape == x.shape


def estimate_small(model: str, tmp_path, **sizes):
    args = DDRLConfig(
        output_dir=str(tmp_path),
        report_to=[],
        num_generations=2,
        prompts_per_step=1,
        num_inference_steps=2,
        per_device_train_batch_size=1,
        use_ema=False,
        **sizes,
    )
    return estimate_memory(model, args)


def test_qwen_image_is_estimable(tmp_path):
    """Qwen-Image's prompt encoding (`_extract_masked_hidden`) indexes with the attention mask and splits by its sums."""
    small = estimate_small("qwen-image", tmp_path, height=128, width=128)
    large = estimate_small("qwen-image", tmp_path, height=256, width=256)
    # Full fine-tuning of 20B parameters on one GPU: the peak is its weights, gradients and AdamW state; the decoded
    # images are what grows with the resolution.
    assert 0 < small.phases["vae_decode"] < large.phases["vae_decode"]
    assert small.phases["text_encoders"] > 15 * GIB  # Qwen2.5-VL-7B in bf16


def test_hunyuanvideo_1_5_is_estimable(tmp_path):
    """HunyuanVideo 1.5's transformer reorders the text tokens by their masks (valid first, then padding)."""
    short = estimate_small("hunyuanvideo-1.5", tmp_path, height=128, width=128, num_frames=5)
    long = estimate_small("hunyuanvideo-1.5", tmp_path, height=128, width=128, num_frames=9)
    # Full fine-tuning on one GPU: the peak is the weights, gradients and AdamW state; the decoded frames grow.
    assert 0 < short.phases["vae_decode"] < long.phases["vae_decode"]


def test_context_parallel_ranks_hold_their_share_of_the_trajectories(tmp_path):
    # Every rank of a context-parallel group samples the same trajectories and keeps 1 / N of each trained latent.
    from trl_ddrl.memory import Parallelism

    args = tiny_args(tmp_path, num_inference_steps=6)
    one = estimate_memory(tiny_sd3_pipeline, args, torch_dtype=torch.float32)  # one process: every sample
    group = estimate_memory(  # one group of two: every sample on each rank
        tiny_sd3_pipeline, args, torch_dtype=torch.float32, num_processes=2, context_parallel_size=2
    )
    assert Parallelism(2, "none", 2).weight(("trajectories", False)) == 0.5
    latent, steps = tiny_latent_and_steps(args)
    samples = args.prompts_per_step * args.num_generations
    buffer = samples * (3 * steps + 1) * latent  # states, next states, means of each trained step; the initial noise
    # After the replay (the optimizer step) the buffer is what differs: half of it on each rank of the group.
    assert one.phases["optimizer"] - group.phases["optimizer"] == pytest.approx(buffer / 2, rel=0.01)
