import pytest

from trl_ddrl import DDRLConfig
from trl_ddrl.config import resolve_train_timesteps


def make(**kwargs):
    return DDRLConfig(output_dir="unused", report_to="none", **kwargs)


def test_defaults_follow_the_authors_reference_settings():
    config = make()
    assert config.num_generations == 8
    assert config.num_inference_steps == 20
    assert config.train_timesteps == list(range(0, 19, 2))
    assert config.data_beta == 0.01 and config.kl_beta == 0.0
    assert config.guidance_scale == 1.0 and config.learning_rate == 1e-5 and config.max_grad_norm == 1.0
    assert config.clip_range == 1e-4 and config.advantage_clip == 5.0
    # one optimizer step per iteration by default
    transitions = config.prompts_per_step * config.num_generations * len(config.train_timesteps)
    assert config.steps_per_generation == transitions // config.per_device_train_batch_size
    assert config.gradient_accumulation_steps == config.steps_per_generation


@pytest.mark.parametrize(
    ("steps", "fraction", "expected"),
    [(20, 0.5, list(range(0, 19, 2))), (4, 0.5, [0, 2]), (10, 1.0, list(range(9))), (20, 0.1, [0, 18]), (6, 0.2, [0])],
)
def test_train_timesteps_never_include_the_final_step(steps, fraction, expected):
    indices = resolve_train_timesteps(steps, fraction, None)
    assert indices == expected
    assert steps - 1 not in indices


def test_explicit_train_timesteps_are_validated():
    assert make(train_timesteps=[3, 1, 3]).train_timesteps == [1, 3]
    with pytest.raises(ValueError, match="train_timesteps"):
        make(train_timesteps=[19])


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"eta": 0.0}, "eta"),
        ({"num_generations": 1}, "num_generations"),
        ({"per_device_train_batch_size": 7}, "per_device_train_batch_size"),
        ({"gradient_accumulation_steps": 3}, "gradient_accumulation_steps"),
        ({"update_ref_every": 2}, "update_ref_every"),
        ({"scale_rewards": "groups"}, "scale_rewards"),
        ({"data_noise": "fresh"}, "data_noise"),
        ({"reward_error_policy": "ignore"}, "reward_error_policy"),
        ({"multi_objective_aggregation": "mean"}, "multi_objective_aggregation"),
        ({"guidance_scale": 0.5}, "guidance_scale"),
        ({"data_beta": -1.0}, "data_beta"),
        ({"clip_range": 0.0}, "clip_range"),
        ({"reward_weights": [1.0, -1.0]}, "reward_weights"),
        ({"remove_unused_columns": True}, "remove_unused_columns"),
        ({"train_timestep_fraction": 1.5}, "train_timestep_fraction"),
        ({"eval_guidance_scale": 0.5}, "eval_guidance_scale"),
        ({"guidance_unconditional": "empty"}, "guidance_unconditional='empty' is not valid; choose one of"),
        ({"num_conditioning_frames_choices": [1]}, "num_conditioning_frames_choices"),
        ({"num_conditioning_frames_choices": [0, 0]}, "num_conditioning_frames_choices"),
        ({"num_conditioning_frames_choices": [-1, 1]}, "num_conditioning_frames_choices"),
        ({"num_conditioning_frames_choices": [0, 1], "num_conditioning_frames": 1}, "Set only one of them"),
    ],
)
def test_bad_values_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        make(**kwargs)


def test_gradient_accumulation_must_divide_the_iteration():
    config = make(prompts_per_step=1, num_generations=2, num_inference_steps=4, per_device_train_batch_size=2)
    assert config.steps_per_generation == 2 and config.gradient_accumulation_steps == 2
    assert (
        make(
            prompts_per_step=1,
            num_generations=2,
            num_inference_steps=4,
            per_device_train_batch_size=2,
            gradient_accumulation_steps=1,
        ).gradient_accumulation_steps
        == 1
    )


def test_kl_baseline_accepts_reference_updates():
    config = make(kl_beta=0.04, data_beta=0.0, update_ref_every=10)
    assert config.update_ref_every == 10


def test_a_run_inside_its_warm_up_warns_with_the_fix():
    with pytest.warns(UserWarning) as record:
        DDRLConfig(output_dir="out", max_steps=3, report_to="none")
    message = str(record[0].message)
    assert "warmup_steps=50 is at least half of max_steps=3" in message
    assert "reaches only 4% of learning_rate=1e-05" in message
    assert "Set warmup_steps=0, or a ratio such as warmup_steps=0.1" in message


@pytest.mark.parametrize(
    "kwargs", [{"max_steps": 3, "warmup_steps": 0}, {"max_steps": 500}, {"max_steps": 3, "warmup_steps": 0.1}, {}]
)
def test_no_warm_up_warning_when_the_run_is_long_enough(kwargs, recwarn):
    DDRLConfig(output_dir="out", report_to="none", **kwargs)
    assert not [w for w in recwarn if "warmup_steps" in str(w.message)]


def test_activation_checkpointing_is_on_unless_turned_off(tmp_path):
    assert DDRLConfig(output_dir=str(tmp_path)).activation_checkpointing is True
    assert DDRLConfig(output_dir=str(tmp_path), activation_checkpointing=False).activation_checkpointing is False
    # The deprecated alias still turns it off.
    assert DDRLConfig(output_dir=str(tmp_path), gradient_checkpointing=False).activation_checkpointing is False


def test_an_output_dir_under_a_regular_file_is_named(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    for output_dir, message in [
        (tmp_path / "notes.txt", "notes.txt' is a regular file, not a folder"),
        (tmp_path / "notes.txt" / "run", "run' is under '.*notes.txt', which is a regular file"),
    ]:
        with pytest.raises(ValueError, match=message):
            DDRLConfig(output_dir=str(output_dir), report_to="none")


def test_a_zeroed_unconditional_branch_without_any_guidance_warns(recwarn):
    with pytest.warns(UserWarning, match=r"guidance_unconditional='zeros' has no effect") as record:
        DDRLConfig(output_dir="out", report_to="none", guidance_unconditional="zeros")
    assert "Set eval_guidance_scale" in str(record[-1].message)
    for guided in ({"eval_guidance_scale": 8.0}, {"guidance_scale": 4.0}):
        DDRLConfig(output_dir="out", report_to="none", guidance_unconditional="zeros", **guided)
    assert not [w for w in recwarn if "guidance_unconditional" in str(w.message)]
