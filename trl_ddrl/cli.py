# Copyright 2026 The trl_ddrl Authors. Licensed under the Apache License, Version 2.0.
"""
The `trl-ddrl` command, and the `ddrl` command that the `_trl_ddrl_hook` start-up hook adds to TRL's `trl` command.

Like `trl grpo`, options of the training script are parsed first; what is left (`--accelerate_config`,
`--num_processes`, ...) goes to `accelerate launch -m trl_ddrl.scripts.ddrl`. With no such option, no default accelerate
config and at most one accelerator, the script runs in this process instead, which saves a Python start-up.
"""

import difflib
import os
import sys
from argparse import Namespace
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from trl.cli.commands.base import Command, CommandContext

from trl_ddrl.launch_configs import resolve_accelerate_config


SCRIPT_MODULE = "trl_ddrl.scripts.ddrl"


@dataclass
class LaunchPlan:
    """
    How a command line is run.

    Attributes:
        parsed (`tuple`): The parsed `(DDRLScriptArguments, DDRLConfig, ModelConfig)`.
        accelerate_argv (`list[str]` or `None`): Arguments of `accelerate launch` (launch options, `--module`,
            the script module and the script's own arguments), or `None` to run in this process.
    """

    parsed: tuple[Any, Any, Any]
    accelerate_argv: list[str] | None


def check_launch_args(
    launch_args: list[str],
    script_options: Iterable[str] = (),
    config_args: list[str] = (),
    config_file: str | None = None,
) -> None:
    """
    Raise a `ValueError` naming any option that neither the script nor `accelerate launch` knows, with the closest
    known option (`did you mean --data_beta?`) and, for keys of the `--config` file (in `config_args`), its name.
    """
    from accelerate.commands.launch import launch_command_parser

    launch_options = set(launch_command_parser()._option_string_actions)
    unknown = [
        arg.split("=")[0]
        for arg in launch_args
        if arg.startswith("-") and not _is_number(arg) and arg.split("=")[0] not in launch_options
    ]
    if not unknown:
        return
    candidates = sorted({*script_options, *launch_options} - {"-h", "--help"})
    from_config = {arg.split("=")[0] for arg in config_args}
    details = []
    for option in unknown:
        where = f"key {option.lstrip('-')!r} of the --config file {config_file}" if option in from_config else option
        close = difflib.get_close_matches(option, candidates, n=1, cutoff=0.75)
        details.append(where + (f" (did you mean {close[0]}?)" if close else ""))
    raise ValueError(
        f"unrecognized arguments: {'; '.join(details)}. They are neither DDRL, training, model or script options nor "
        "`accelerate launch` options. Fix the spelling, or run --help for the list."
    )


def config_file_argument(argv: list[str]) -> str | None:
    """The value of `--config` in `argv`, or None."""
    for index, arg in enumerate(argv):
        if arg == "--config" and index + 1 < len(argv):
            return argv[index + 1]
        if arg.startswith("--config="):
            return arg.partition("=")[2]
    return None


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def remove_subsequence(items: list[str], subsequence: list[str]) -> list[str]:
    """`items` without the elements of `subsequence`, which appear in `items` in the same order."""
    remaining = iter(subsequence)
    pending = next(remaining, None)
    kept = []
    for item in items:
        if pending is not None and item == pending:
            pending = next(remaining, None)
        else:
            kept.append(item)
    return kept


def runs_in_one_process() -> bool:
    """
    Whether a bare `accelerate launch` would start a single, non-distributed process here.

    That is the case when there is no default accelerate config (written by `accelerate config`) and at most one
    accelerator; otherwise `accelerate launch` uses the config, or one process per accelerator.
    """
    import torch
    from accelerate.commands.config import default_config_file

    return not os.path.isfile(default_config_file) and torch.accelerator.device_count() <= 1


def plan(argv: list[str], prog: str) -> LaunchPlan:
    """
    Parse `argv` (options of the script, `--config`, and launch options) and decide how to run it.

    Parse errors exit with status 2 and a one-line message naming the option.
    """
    from trl_ddrl.scripts.ddrl import make_parser

    parser = make_parser(prog=prog)
    *parsed, config_remaining, cli_remaining = parser.parse_args_and_config(
        argv, return_remaining_strings=True, separate_remaining_strings=True
    )
    try:
        launch_args = resolve_accelerate_config(config_remaining + cli_remaining)
        check_launch_args(launch_args, parser._option_string_actions, config_remaining, config_file_argument(argv))
    except ValueError as error:
        parser.error(str(error))
    if not launch_args and runs_in_one_process():
        return LaunchPlan(tuple(parsed), None)
    script_argv = remove_subsequence(argv, cli_remaining)
    return LaunchPlan(tuple(parsed), [*launch_args, "--module", SCRIPT_MODULE, *script_argv])


def run_cli(argv: list[str], prog: str) -> int:
    """Run a `trl-ddrl` / `trl ddrl` command line; return the exit status."""
    from trl_ddrl.scripts.ddrl import UsageError, main

    if argv[:1] == ["estimate-memory"]:
        from trl_ddrl.memory import main as estimate_memory_main

        return estimate_memory_main(argv[1:], prog=f"{prog} estimate-memory")
    launch = plan(argv, prog)
    if launch.accelerate_argv is None:
        try:
            main(*launch.parsed)
        except UsageError as error:
            print(f"{prog}: error: {error}", file=sys.stderr)
            return 2
        return 0
    return accelerate_launch(launch.accelerate_argv)


def accelerate_launch(accelerate_argv: list[str]) -> int:
    """Run `accelerate launch <accelerate_argv>`; return the exit status of the training processes."""
    import subprocess

    from accelerate.commands.launch import launch_command, launch_command_parser
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    try:
        launch_command(launch_command_parser().parse_args(accelerate_argv))
    except subprocess.CalledProcessError as error:  # one process: it has printed its own error
        return error.returncode
    except ChildFailedError as error:  # several processes: torchrun's summary names the failed ranks
        print(error, file=sys.stderr)
        return 1
    return 0


class DDRLCommand(Command):
    """The `ddrl` command of TRL's `trl` CLI, added by the `_trl_ddrl_hook` start-up hook."""

    def __init__(self):
        super().__init__(name="ddrl", help_text="Run the DDRL training script for diffusers pipelines (trl_ddrl)")

    def register(self, subparsers) -> None:
        subparsers.add_parser(self.name, help=self.help_text, add_help=False)

    def run(self, args: Namespace, context: CommandContext) -> int:
        return run_cli(context.argv_after(self.name), prog="trl ddrl")


def main(argv: list[str] | None = None) -> int:
    """Entry point of `trl-ddrl`."""
    return run_cli(list(sys.argv[1:] if argv is None else argv), prog="trl-ddrl")


if __name__ == "__main__":
    raise SystemExit(main())
