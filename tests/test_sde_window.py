# Copyright 2026 The trl_ddrl Authors. Licensed under the Apache License, Version 2.0.
"""The SDE window (only `k` consecutive steps stochastic and trained), prefix sharing, and the CPS sampler option."""

import pytest
import torch
from tiny_models import tiny_sd15_pipeline

from trl_ddrl import DDRLConfig, DDRLTrainer
from trl_ddrl.digits import digits_dataset, ink_reward, random_digits_pipeline
from trl_ddrl.pipelines import SamplingSettings, get_adapter
from trl_ddrl.sampling import flow_cps_step
from trl_ddrl.sde_window import rollout_steps, sde_window_steps


STEPS = 6


def make_args(tmp_path, **overrides) -> DDRLConfig:
    settings = dict(
        output_dir=str(tmp_path),
        max_steps=3,
        num_generations=4,
        prompts_per_step=2,
        num_inference_steps=STEPS,
        per_device_train_batch_size=8,
        learning_rate=1e-3,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        dataloader_pin_memory=False,
        seed=0,
        data_beta=0.0,
        activation_checkpointing=False,  # on by default; these tiny models run faster without
    )
    settings.update(overrides)
    return DDRLConfig(**settings)


def digits_adapter(**settings):
    pipeline = random_digits_pipeline(seed=0)
    return get_adapter(pipeline, SamplingSettings(num_inference_steps=STEPS, eta=0.8, **settings))


# ---- window selection ---------------------------------------------------------------------------------------------


def test_random_window_is_seeded_consecutive_in_range_and_covers_every_start():
    windows = [sde_window_steps(10, 3, iteration, seed=7, window_range=[1, 7]) for iteration in range(60)]
    assert windows == [sde_window_steps(10, 3, iteration, seed=7, window_range=[1, 7]) for iteration in range(60)]
    assert all(w == list(range(w[0], w[0] + 3)) and 1 <= w[0] and w[-1] <= 6 for w in windows)
    assert {w[0] for w in windows} == {1, 2, 3, 4}
    other_seed = [sde_window_steps(10, 3, iteration, seed=8, window_range=[1, 7]) for iteration in range(60)]
    assert other_seed != windows
    # a resumed run asks for iteration 40 without having drawn 0..39 first
    assert sde_window_steps(10, 3, 40, seed=7, window_range=[1, 7]) == windows[40]


def test_sliding_window_moves_every_shift_every_iterations_and_wraps():
    starts = [sde_window_steps(6, 2, i, seed=0, position="sliding", shift_every=2)[0] for i in range(10)]
    # 4 possible starts (steps 0..4 may be stochastic, windows of 2)
    assert starts == [0, 0, 1, 1, 2, 2, 3, 3, 0, 0]


@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(sde_window_size=STEPS), "sde_window_size"),
        (dict(sde_window_size=0), "sde_window_size"),
        (dict(sde_window_size=2, sde_window_range=[0, STEPS]), "sde_window_range"),
        (dict(sde_window_size=2, sde_window_range=[3]), "sde_window_range"),
        (dict(sde_window_size=3, sde_window_range=[2, 4]), "sde_window_size"),
        (dict(sde_window_size=2, train_timesteps=[0, 1]), "train_timesteps"),
        (dict(sde_window_size=2, sde_window_position="middle"), "sde_window_position"),
        (dict(sde_window_share_prefix=True), "sde_window_share_prefix"),
        (dict(sampler="ode"), "sampler"),
        (dict(sampler="cps", eta=1.5), "eta"),
    ],
)
def test_bad_window_and_sampler_settings_name_the_field(tmp_path, overrides, match):
    with pytest.raises(ValueError, match=match):
        make_args(tmp_path, **overrides)


def test_window_replaces_the_fixed_trained_steps(tmp_path):
    args = make_args(tmp_path, sde_window_size=2, per_device_train_batch_size=4)
    assert args.train_timesteps is None and args.num_trained_steps == 2
    assert args.steps_per_generation == 8 * 2 // 4
    for iteration in range(5):
        steps = rollout_steps(args, iteration)
        assert steps.trained == steps.stochastic == sde_window_steps(STEPS, 2, iteration, seed=0)
        assert steps.prefix == 0


# ---- sampling -------------------------------------------------------------------------------------------------------


def test_only_window_steps_are_stochastic_and_the_rest_is_the_deterministic_sampler():
    adapter = digits_adapter()
    conditioning = adapter.encode_prompts(["3", "7"], adapter.device)
    noise = adapter.sample_noise(2, generator=torch.Generator().manual_seed(0))
    window = [2, 3]
    trajectory = adapter.sample(
        adapter.denoiser, conditioning, noise, generator=torch.Generator().manual_seed(1), stochastic_steps=window
    )
    deterministic = adapter.sample(adapter.denoiser, conditioning, noise, eta=0.0)
    assert (trajectory.log_probs[:, window] != 0).all()
    assert (trajectory.log_probs[:, [0, 1, 4, 5]] == 0).all()
    # before the window: exactly the deterministic sampler's states
    assert torch.equal(trajectory.latents[:, :3], deterministic.latents[:, :3])
    # inside it the trajectory branches off ...
    assert not torch.allclose(trajectory.latents[:, 4], deterministic.latents[:, 4])
    # ... and after it, it follows the deterministic sampler from where the window left it
    after = adapter.sample(adapter.denoiser, conditioning, trajectory.latents[:, 4], eta=0.0, steps=range(4, STEPS))
    torch.testing.assert_close(trajectory.latents[:, 4:], after.latents)


def test_ddim_uses_eta_only_inside_the_window():
    pipeline = tiny_sd15_pipeline()
    adapter = get_adapter(pipeline, SamplingSettings(num_inference_steps=4, eta=1.0, height=32, width=32))
    conditioning = adapter.encode_prompts(["a cat"], adapter.device)
    noise = adapter.sample_noise(1, generator=torch.Generator().manual_seed(0))
    trajectory = adapter.sample(
        adapter.denoiser, conditioning, noise, generator=torch.Generator().manual_seed(1), stochastic_steps=[1]
    )
    deterministic = adapter.sample(adapter.denoiser, conditioning, noise, eta=0.0)
    assert trajectory.log_probs[0, 1] != 0 and (trajectory.log_probs[0, [0, 2, 3]] == 0).all()
    assert torch.equal(trajectory.latents[:, :2], deterministic.latents[:, :2])
    assert not torch.allclose(trajectory.latents[:, 2], deterministic.latents[:, 2])


def test_cps_sampler_is_dispatched_by_the_flow_adapter_and_refused_by_ddim():
    adapter = digits_adapter(sampler="cps")
    latents = torch.randn(2, *adapter.latent_shape(), generator=torch.Generator().manual_seed(0))
    velocity = torch.randn_like(latents)
    step_index = torch.tensor([1, 3])
    out = adapter.step(velocity, latents, step_index, eta=0.8, generator=torch.Generator().manual_seed(2))
    sigmas = adapter.sigmas()
    expected = flow_cps_step(
        latents, velocity, sigmas[step_index], sigmas[step_index + 1], eta=0.8, prev_sample=out.prev_sample
    )
    torch.testing.assert_close(out.mean, expected.mean)
    torch.testing.assert_close(out.log_prob, expected.log_prob)
    with pytest.raises(ValueError, match="sampler='cps'"):
        get_adapter(tiny_sd15_pipeline(), SamplingSettings(num_inference_steps=4, eta=1.0, sampler="cps"))


# ---- training -------------------------------------------------------------------------------------------------------


class _RolloutSpy:
    """Record every iteration's rollout buffer, the step indices of the data term and the denoiser's input rows."""

    def __init__(self, trainer: DDRLTrainer):
        self.buffers, self.data_steps, self.rows = [], [], {"no_grad": 0, "grad": 0}
        generate, diffusion_loss = trainer.rollout.generate, trainer.adapter.diffusion_loss

        def spy_generate(rows, iteration, trainer_state):
            buffer = generate(rows, iteration, trainer_state)
            self.buffers.append((iteration, buffer))
            return buffer

        def spy_diffusion_loss(denoiser, x0, conditioning, step_index, noise):
            self.data_steps.append((len(self.buffers) - 1, step_index.tolist()))
            return diffusion_loss(denoiser, x0, conditioning, step_index, noise)

        def count_rows(module, args, kwargs):
            self.rows["grad" if torch.is_grad_enabled() else "no_grad"] += args[0].shape[0]

        trainer.rollout.generate = spy_generate
        trainer.adapter.diffusion_loss = spy_diffusion_loss
        trainer.adapter.denoiser.register_forward_pre_hook(count_rows, with_kwargs=True)


@pytest.mark.parametrize("sampler", ["flow_sde", "cps"])
def test_training_on_the_window_uses_its_steps_for_replay_and_data_term(tmp_path, sampler):
    args = make_args(tmp_path, sde_window_size=2, sde_window_range=[0, 4], data_beta=0.1, sampler=sampler)
    trainer = DDRLTrainer(random_digits_pipeline(seed=0), ink_reward, args=args, train_dataset=digits_dataset("base"))
    spy = _RolloutSpy(trainer)
    trainer.train()
    assert [iteration for iteration, _ in spy.buffers] == [0, 1, 2]
    for iteration, buffer in spy.buffers:
        window = sde_window_steps(STEPS, 2, iteration, seed=0, window_range=[0, 4])
        assert buffer.step_indices.tolist() == window
        # the replayed log-likelihood of every stored transition is the rollout's (on-policy ratio 1 before the step)
        assert (buffer.old_means != buffer.next_states).all()
    logs = [log for log in trainer.state.log_history if "sde_window/first_step" in log]
    # one optimizer step per iteration: every replay runs the rollout's weights, so the likelihood ratio is 1
    assert [log["ratio/mean"] for log in logs] == pytest.approx([1.0] * 3, abs=1e-6)
    logged = [log["sde_window/first_step"] for log in logs]
    assert logged == [sde_window_steps(STEPS, 2, i, seed=0, window_range=[0, 4])[0] for i in range(3)]
    # the data term is noised to the window's sigmas
    assert spy.data_steps and all(
        set(steps) <= set(spy.buffers[index][1].step_indices.tolist()) for index, steps in spy.data_steps
    )


def test_shared_prefix_is_identical_within_a_group_and_computed_once_per_prompt(tmp_path):
    args = make_args(tmp_path, max_steps=1, sde_window_size=1, sde_window_range=[3, 5], sde_window_share_prefix=True)
    trainer = DDRLTrainer(random_digits_pipeline(seed=0), ink_reward, args=args, train_dataset=digits_dataset("base"))
    spy = _RolloutSpy(trainer)
    trainer.train()
    ((_, buffer),) = spy.buffers
    start = buffer.step_indices.item()
    assert start in (3, 4) and rollout_steps(args, 0).prefix == start
    groups = buffer.states[:, 0].reshape(2, 4, -1)  # [prompts, generations, ...]: the state entering the window
    for group in groups:
        assert all(torch.equal(group[0], member) for member in group[1:])
    assert not torch.equal(groups[0, 0], groups[1, 0])
    noise = buffer.initial_noise.reshape(2, 4, -1)
    assert all(torch.equal(noise[g, 0], noise[g, i]) for g in range(2) for i in range(4))
    # the window's noise makes the group's samples differ
    next_states = buffer.next_states[:, 0].reshape(2, 4, -1)
    assert not torch.equal(next_states[0, 0], next_states[0, 1])
    # prefix steps once per prompt (2), the rest once per sample (8); one replay forward per transition
    assert spy.rows["no_grad"] == 2 * start + 8 * (STEPS - start)
    assert spy.rows["grad"] == 8


def test_evaluation_data_loss_covers_the_steps_a_window_can_train(tmp_path):
    args = make_args(tmp_path, sde_window_size=2, sde_window_range=[1, 4], eval_num_generations=2)
    data = digits_dataset("eval").select(range(2))
    trainer = DDRLTrainer(
        random_digits_pipeline(seed=0), ink_reward, args=args, train_dataset=digits_dataset("base"), eval_dataset=data
    )
    steps = []
    diffusion_loss = trainer.adapter.diffusion_loss

    def spy(denoiser, x0, conditioning, step_index, noise):
        steps.append(int(step_index[0]))
        return diffusion_loss(denoiser, x0, conditioning, step_index, noise)

    trainer.adapter.diffusion_loss = spy
    metrics = trainer.evaluate()
    assert "eval_data_loss" in metrics and sorted(set(steps)) == [1, 2, 3]
