# Copyright 2026 The trl_ddrl Authors. Licensed under the Apache License, Version 2.0.
"""Command-line training scripts, launched by `trl-ddrl` / `trl ddrl` or `accelerate launch -m`."""
