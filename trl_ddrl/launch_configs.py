# Copyright 2026 The trl_ddrl Authors. Licensed under the Apache License, Version 2.0.
"""
The accelerate configs usable by name with `--accelerate_config` (this package's and TRL's), and the resolution of that
option to `accelerate launch --config_file`. Below both `cli.py` (which launches) and `memory.py` (which reads a
recipe's config for the process count and the sharding).
"""

from importlib import resources
from pathlib import Path


def packaged_accelerate_configs() -> dict[str, Path]:
    """Accelerate configs usable by name with `--accelerate_config`: this package's, then TRL's for other names."""
    configs = {}
    for package in ("trl", "trl_ddrl"):  # later wins: trl_ddrl's configs are tuned for diffusers pipelines
        folder = resources.files(package).joinpath("accelerate_configs")
        if folder.is_dir():
            configs.update(
                {Path(item.name).stem: Path(str(item)) for item in folder.iterdir() if item.name.endswith(".yaml")}
            )
    return configs


def resolve_accelerate_config(launch_args: list[str]) -> list[str]:
    """
    Replace `--accelerate_config NAME|PATH` in `launch_args` by `--config_file <yaml>` for `accelerate launch`.

    `NAME` is one of [`packaged_accelerate_configs`] (`zero2`, `zero3`, `fsdp`, `multi_gpu`, `single_gpu`, and TRL's
    `zero1`, `fsdp1`, `fsdp2`); an existing file path is used as it is. When the option appears more than once (in the
    `--config` file and on the command line), the last one wins.
    """
    remaining, value = list(launch_args), None
    while "--accelerate_config" in remaining:
        index = remaining.index("--accelerate_config")
        if index + 1 >= len(remaining):
            raise ValueError(
                "--accelerate_config needs a value: a config name (zero2, zero3, fsdp, ...) or a YAML path."
            )
        value = remaining[index + 1]
        del remaining[index : index + 2]
    if value is None:
        return remaining
    configs = packaged_accelerate_configs()
    if Path(value).is_file():
        path = Path(value)
    elif value in configs:
        path = configs[value]
    else:
        raise ValueError(
            f"--accelerate_config {value!r} is neither a file nor a packaged config. Use one of "
            f"{', '.join(sorted(configs))}, or the path to an accelerate YAML file (see `accelerate config`)."
        )
    return ["--config_file", str(path), *remaining]
