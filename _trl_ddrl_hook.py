# Copyright 2026 The trl_ddrl Authors. Licensed under the Apache License, Version 2.0.
"""
Adds the `ddrl` command to TRL's `trl` CLI, which has no plugin mechanism.

`trl_ddrl_hook.pth`, installed next to this module in site-packages, calls [`install`] at interpreter start-up. It only
puts a finder on `sys.meta_path`; nothing else is imported. When `trl.cli.commands` (the module holding TRL's command
table, `get_commands()`) is first imported, its `get_commands` is wrapped to add [`trl_ddrl.cli.DDRLCommand`].

The hook steps aside when the table already has a `ddrl` command (TRL shipping its own, or loading ours from the
`trl.commands` entry point this package declares), and any failure inside it leaves TRL untouched.
"""

import sys
from collections.abc import Callable, Sequence
from importlib.machinery import ModuleSpec
from types import ModuleType


TARGET_MODULE = "trl.cli.commands"
COMMAND_NAME = "ddrl"
_MARKER = "_trl_ddrl_wrapped"


def with_ddrl_command(get_commands: Callable[[], list]) -> Callable[[], list]:
    """Wrap TRL's `get_commands` so that its list also holds the `ddrl` command, in alphabetical position."""

    def get_commands_with_ddrl() -> list:
        commands = get_commands()
        if any(getattr(command, "name", None) == COMMAND_NAME for command in commands):
            return commands
        try:
            from trl_ddrl.cli import DDRLCommand

            command = DDRLCommand()
        except Exception:  # a broken trl_ddrl must not break the other trl commands
            return commands
        position = next((i for i, other in enumerate(commands) if str(other.name) > COMMAND_NAME), len(commands))
        return [*commands[:position], command, *commands[position:]]

    get_commands_with_ddrl.__wrapped__ = get_commands
    get_commands_with_ddrl.__doc__ = get_commands.__doc__
    setattr(get_commands_with_ddrl, _MARKER, True)
    return get_commands_with_ddrl


def patch(module: ModuleType) -> None:
    """Wrap `module.get_commands` (TRL's command table) unless it is missing or already wrapped."""
    get_commands = getattr(module, "get_commands", None)
    if callable(get_commands) and not getattr(get_commands, _MARKER, False):
        module.get_commands = with_ddrl_command(get_commands)


class TrlCommandsFinder:
    """
    `sys.meta_path` finder that lets the other finders locate `trl.cli.commands` and patches the module once loaded.

    It answers no other import, and removes itself from `sys.meta_path` after the first match.
    """

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> ModuleSpec | None:
        if fullname != TARGET_MODULE:
            return None
        from contextlib import suppress

        if self in sys.meta_path:
            sys.meta_path.remove(self)
        for finder in sys.meta_path:
            find_spec = getattr(finder, "find_spec", None)
            spec = find_spec(fullname, path, target) if find_spec is not None else None
            if spec is not None:
                break
        else:
            return None
        loader = spec.loader
        exec_module = getattr(loader, "exec_module", None)
        if exec_module is None:
            return spec

        def exec_and_patch(module: ModuleType) -> None:
            exec_module(module)
            with suppress(Exception):  # TRL must keep working whatever happens here
                patch(module)

        with suppress(AttributeError, TypeError):  # a loader that takes no attributes is left alone
            loader.exec_module = exec_and_patch  # the loader is this module's own (one per spec)
        return spec


def install() -> None:
    """Patch `trl.cli.commands` now if it is imported, else when it is; idempotent."""
    if TARGET_MODULE in sys.modules:
        patch(sys.modules[TARGET_MODULE])
    elif not any(isinstance(finder, TrlCommandsFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, TrlCommandsFinder())
