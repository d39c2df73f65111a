# Copyright 2026 The trl_ddrl Authors. Licensed under the Apache License, Version 2.0.
import os
import re
from pathlib import Path

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py
from setuptools.command.editable_wheel import editable_wheel


# Start-up hook adding `ddrl` to TRL's `trl` command (see _trl_ddrl_hook.py). A .pth file must sit directly in
# site-packages, which no setuptools option does for a package's files, hence the two commands below.
HOOK_PTH = "trl_ddrl_hook.pth"


class BuildPyWithHook(build_py):
    """`build_py` that also puts the hook's .pth file at the root of the wheel (site-packages once installed)."""

    def run(self):
        super().run()
        if not self.editable_mode:
            self.copy_file(HOOK_PTH, os.path.join(self.build_lib, HOOK_PTH), preserve_mode=False)


class _StrategyWithHook:
    """An editable-install strategy that also writes the hook's .pth file into the editable wheel."""

    def __init__(self, strategy):
        self.strategy = strategy

    def __call__(self, wheel, files, mapping):
        self.strategy(wheel, files, mapping)
        wheel.writestr(HOOK_PTH, Path(HOOK_PTH).read_bytes())

    def __enter__(self):
        self.strategy.__enter__()
        return self

    def __exit__(self, *exc_info):
        return self.strategy.__exit__(*exc_info)


class EditableWheelWithHook(editable_wheel):
    """`editable_wheel` (PEP 660, `pip install -e .`) whose wheel also holds the hook's .pth file."""

    def _select_strategy(self, *args, **kwargs):
        return _StrategyWithHook(super()._select_strategy(*args, **kwargs))


version = re.search(r'__version__ = "([^"]+)"', Path("trl_ddrl/__init__.py").read_text()).group(1)

extras = {
    "deepspeed": ["deepspeed>=0.19,<0.20"],
    "rewards": ["fastapi>=0.110", "uvicorn>=0.29", "httpx>=0.27"],
    "benchmarks": ["matplotlib>=3.8", "scikit-learn>=1.4", "psutil>=5.9"],
    # Trackers whose logged samples and metrics the tests read back.
    "trackers": ["tensorboard>=2.14", "wandb>=0.19"],
    # WanImageToVideoPipeline cleans prompts with ftfy unconditionally.
    "wan": ["ftfy>=6.1"],
}
extras["test"] = [
    "pytest>=8",
    "pytest-timeout>=2.3",
    *extras["deepspeed"],
    *extras["rewards"],
    *extras["benchmarks"],
    *extras["trackers"],
    *extras["wan"],
]
extras["dev"] = extras["test"]

setup(
    name="trl_ddrl",
    version=version,
    description="DDRL (Data-regularized Diffusion RL) for diffusers image and video models, as a TRL trainer.",
    long_description=Path("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    packages=find_packages(include=["trl_ddrl", "trl_ddrl.*"]),
    py_modules=["_trl_ddrl_hook"],
    package_data={"trl_ddrl": ["templates/*.md", "accelerate_configs/*.yaml", "model_configs/*.json"]},
    python_requires=">=3.10",
    install_requires=[
        # No upper bound: installing trl_ddrl never replaces a user's torch. The README's set-up commands pin the tested
        # version with `-c constraints.txt`.
        "torch>=2.6",
        "trl>=1.16,<2",
        "transformers>=5,<6",
        "diffusers>=0.42,<0.50",
        "peft>=0.17",
        "accelerate>=1.10",
        "datasets>=3",
        "huggingface_hub>=1.0",
        "safetensors>=0.4",
        "scikit-learn>=1.4",
        "pillow>=10",
        "numpy>=1.26",
        "tqdm>=4.66",
        "sentencepiece>=0.2",
        "protobuf>=4",
    ],
    extras_require=extras,
    entry_points={
        "console_scripts": [
            "trl-ddrl=trl_ddrl.cli:main",
            "trl-ddrl-reward-server=trl_ddrl.rewards.server:main",
        ],
        # Not read by TRL 1.16, which has no plugin mechanism; declared so that a future one can find the command
        # (the start-up hook then steps aside).
        "trl.commands": ["ddrl=trl_ddrl.cli:DDRLCommand"],
    },
    cmdclass={"build_py": BuildPyWithHook, "editable_wheel": EditableWheelWithHook},
    classifiers=[
        "Programming Language :: Python :: 3",
        "License :: OSI Approved :: Apache Software License",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
