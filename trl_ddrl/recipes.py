# Copyright 2026 The trl_ddrl Authors. Licensed under the Apache License, Version 2.0.
"""Recipe files (the repository's `recipes/`): YAML files of `trl-ddrl --config`, loaded from Python."""

from pathlib import Path
from typing import TYPE_CHECKING


if TYPE_CHECKING:
    from trl import ModelConfig

    from trl_ddrl.config import DDRLConfig
    from trl_ddrl.scripts.ddrl import DDRLScriptArguments


def load_recipe(path: str | Path, *overrides: str) -> tuple["DDRLScriptArguments", "DDRLConfig", "ModelConfig"]:
    """
    The script arguments, [`DDRLConfig`] and `ModelConfig` of a recipe file, parsed as `trl-ddrl --config path
    *overrides` parses them; the file's `accelerate_config` (a launcher option) is left out.

    Example:
    ```python
    >>> from trl_ddrl.recipes import load_recipe
    >>> script_args, config, model_args = load_recipe("recipes/cosmos-predict2.5-2b-ddrl.yaml", "--output_dir", "run")
    >>> config.karras_sigmas
    [200.0, 0.01, 7.0]
    ```
    """
    from trl_ddrl.scripts.ddrl import make_parser

    script_args, config, model_args, _ = make_parser().parse_args_and_config(
        ["--config", str(path), *overrides], return_remaining_strings=True
    )
    return script_args, config, model_args
