# Copyright 2026 The trl_ddrl Authors. Licensed under the Apache License, Version 2.0.
import re
from pathlib import Path

from setuptools import find_packages, setup


version = re.search(r'__version__ = "([^"]+)"', Path("trl_ddrl/__init__.py").read_text()).group(1)

extras = {
    "deepspeed": ["deepspeed>=0.19,<0.20"],
    "rewards": ["fastapi>=0.110", "uvicorn>=0.29", "httpx>=0.27"],
    "benchmarks": ["matplotlib>=3.8", "scikit-learn>=1.4", "psutil>=5.9"],
}
extras["test"] = [
    "pytest>=8",
    "pytest-timeout>=2.3",
    *extras["deepspeed"],
    *extras["rewards"],
    *extras["benchmarks"],
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
    package_data={"trl_ddrl": ["templates/*.md", "accelerate_configs/*.yaml"]},
    python_requires=">=3.10",
    install_requires=[
        # Capped at 2.13.0 so that a fresh install takes the CPU wheel where one is provided locally.
        "torch>=2.6,<=2.13.0",
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
    },
    classifiers=[
        "Programming Language :: Python :: 3",
        "License :: OSI Approved :: Apache Software License",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
