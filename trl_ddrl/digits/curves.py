# Copyright 2026 The trl_ddrl Authors. Licensed under the Apache License, Version 2.0.
"""
The monitoring curves of a run, read from `trainer.state.log_history`: a JSON file and a small PNG line chart drawn
with PIL (the default job runs without matplotlib).
"""

import json
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont


PANELS = (
    ("reward", ("reward", "eval_reward", "eval_rewards/held_out_classifier/mean")),
    ("held-out data loss", ("eval_data_loss",)),
    ("within-prompt diversity", ("eval_diversity",)),
)
COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e")
PANEL_SIZE = (320, 220)
MARGIN = 36


def curves_from_log_history(log_history: list[dict]) -> dict[str, list[list[float]]]:
    """Every numeric logged value as a `[[step, value], ...]` series, keyed by its log name."""
    series: dict[str, list[list[float]]] = {}
    for entry in log_history:
        for key, value in entry.items():
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                series.setdefault(key, []).append([entry["step"], float(value)])
    return series


def write_curves(log_history: list[dict], output_dir: str | Path) -> dict[str, list[list[float]]]:
    """Write `curves.json` (every logged series) and `curves.png` (reward, data loss, diversity) to `output_dir`."""
    output = Path(output_dir)
    series = curves_from_log_history(log_history)
    (output / "curves.json").write_text(json.dumps(series, indent=1) + "\n")
    plot_panels(series, output / "curves.png")
    return series


def plot_panels(series: dict[str, list[list[float]]], path: str | Path) -> None:
    """One line chart per entry of `PANELS` with the series it names that were logged, side by side."""
    width, height = PANEL_SIZE
    image = Image.new("RGB", (width * len(PANELS), height), "white")
    draw = ImageDraw.Draw(image)
    for index, (title, keys) in enumerate(PANELS):
        left = index * width
        draw.text((left + MARGIN, 4), title, fill="black", font=ImageFont.load_default())
        box = (left + MARGIN, 20, left + width - 10, height - MARGIN)
        _draw_panel(draw, box, [(key, series[key]) for key in keys if series.get(key)])
    image.save(path)


def _draw_panel(draw: ImageDraw.ImageDraw, box: tuple[int, int, int, int], lines: list) -> None:
    """Axes in `box` (left, top, right, bottom) with each `(name, [[step, value], ...])` line and its legend."""
    font = ImageFont.load_default()
    draw.rectangle(box, outline="black")
    if not lines:
        return
    steps = [point[0] for _, line in lines for point in line]
    values = [point[1] for _, line in lines for point in line]
    low, high = min(values), max(values)
    high = high if high > low else low + 1.0
    first, last = min(steps), max(steps)
    last = last if last > first else first + 1

    def xy(step: float, value: float) -> tuple[float, float]:
        x = box[0] + (step - first) / (last - first) * (box[2] - box[0])
        return x, box[3] - (value - low) / (high - low) * (box[3] - box[1])

    for number, (key, line) in enumerate(lines):
        color = COLORS[number % len(COLORS)]
        points = [xy(step, value) for step, value in line]
        if len(points) > 1:
            draw.line(points, fill=color, width=2)
        for x, y in points:
            draw.ellipse((x - 2, y - 2, x + 2, y + 2), fill=color)
        draw.text((box[0] + 4, box[1] + 4 + 11 * number), key, fill=color, font=font)
    draw.text((box[0] - MARGIN + 2, box[1]), f"{high:.3g}", fill="black", font=font)
    draw.text((box[0] - MARGIN + 2, box[3] - 10), f"{low:.3g}", fill="black", font=font)
    draw.text((box[0], box[3] + 4), f"step {first:g}", fill="black", font=font)
    draw.text((box[2] - 50, box[3] + 4), f"step {last:g}", fill="black", font=font)
