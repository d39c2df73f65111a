# Copyright 2026 The trl_ddrl Authors. Licensed under the Apache License, Version 2.0.
"""
GenEval's scoring rules (Ghosh et al., NeurIPS 2023, github.com/djghosh13/geneval `evaluation/evaluate_images.py`)
and Flow-GRPO's GenEval reward (github.com/yifan123/reward-server `reward_server/gen_eval.py`), as pure functions of
the detected objects and the prompt's metadata. No detector here: `examples/reward_servers/geneval_server.py` runs
GenEval's Mask2Former and CLIP colour classifier in their own environment and calls these functions.

Metadata (one per prompt; GenEval's `evaluation_metadata.jsonl`, Flow-GRPO's `dataset/geneval/*_metadata.jsonl`):

```python
{"tag": "position", "prompt": "a photo of a dog right of a teddy bear",
 "include": [{"class": "teddy bear", "count": 1}, {"class": "dog", "count": 1, "position": ["right of", 0]}],
 "exclude": [{"class": "dog", "count": 2}]}
```

`include` clauses must all hold (a class seen at least `count` times; optionally each of the first `count` objects of
that `color`, or `position` relative to every object matched by the clause at that index); `exclude` clauses must all
hold (a class seen fewer than `count` times). `tag` is one of [`TAGS`]; counting prompts keep only detections above a
stricter confidence.
"""

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any


COLORS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white")
"""GenEval's colour names, in the order of its CLIP zero-shot colour classifier."""
TAGS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
"""GenEval's six tasks."""
RELATIONS = ("left of", "right of", "above", "below")


@dataclass(frozen=True)
class DetectedObject:
    """
    One detection kept for scoring.

    Args:
        box (`tuple[float, float, float, float]`): `(x1, y1, x2, y2)` in pixels, `y` downwards.
        confidence (`float`): The detector's score.
        color (`str`, *optional*): The colour GenEval's CLIP classifier gives the object's crop (one of [`COLORS`]);
            the server classifies the first objects of each class a colour clause asks about (see [`colors_needed`]).
        index (`int`, *optional*): The box's row in the detector's output for its class (to find its mask).
    """

    box: tuple[float, float, float, float]
    confidence: float
    color: str | None = None
    index: int | None = None


@dataclass(frozen=True)
class GenEvalSettings:
    """GenEval's detection options, with its defaults (`evaluate_images.py --options`)."""

    threshold: float = field(default=0.3, metadata={"help": "Minimum confidence of a kept detection."})
    counting_threshold: float = field(default=0.9, metadata={"help": "Minimum confidence for `counting` prompts."})
    max_objects: int = field(default=16, metadata={"help": "Most detections kept per class."})
    nms_threshold: float = field(default=1.0, metadata={"help": "IoU above which a weaker box is dropped (1: none)."})
    position_threshold: float = field(default=0.1, metadata={"help": "Share of the boxes' sizes ignored in offsets."})


@dataclass(frozen=True)
class GenEvalResult:
    """
    The three verdicts on one image.

    Args:
        correct (`bool`): GenEval's metric: every `include` clause holds with at least `count` objects (colour and
            position read on the first `count`), and every `exclude` clause holds.
        strict_correct (`bool`): Flow-GRPO's strict verdict: exactly `count` objects per `include` clause, all of the
            asked colour, positions holding; `exclude` is not read.
        score (`float`): Flow-GRPO's partial-credit reward, the mean of the clause credits (see [`geneval_score`]).
        reason (`str`): What failed for `correct`, one line per failure (in GenEval's words); empty when `correct`.
    """

    correct: bool
    strict_correct: bool
    score: float
    reason: str


def parse_metadata(value: Any) -> dict:
    """
    A metadata dict from a dict or a JSON string, checked: `include` a non-empty list of clauses with a `class` (str)
    and a positive `count` (int), an optional `color` in [`COLORS`] and an optional `position` `[relation, index]`
    pointing to an earlier clause; `exclude` (optional, `None` allowed) clauses with `class` and `count`. Keys set to
    `None` (as `datasets` fills missing struct fields) count as absent. Raises `ValueError` naming the field.
    """
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as error:
            raise ValueError(f"GenEval metadata is not valid JSON ({error}): {value[:80]!r}") from None
    if not isinstance(value, Mapping):
        raise ValueError(f"GenEval metadata must be a dict or a JSON object string, got {type(value).__name__}.")
    metadata = {key: item for key, item in value.items() if item is not None}
    include = metadata.get("include")
    if not isinstance(include, Sequence) or isinstance(include, str) or not include:
        raise ValueError(f"GenEval metadata 'include' must be a non-empty list of clauses, got {include!r}.")
    clauses = []
    for index, raw in enumerate(include):
        clause = _clause(raw, f"include[{index}]")
        if "color" in clause and clause["color"] not in COLORS:
            raise ValueError(f"GenEval metadata include[{index}].color={clause['color']!r}: not one of {COLORS}.")
        if "position" in clause:
            position = clause["position"]
            if (
                not isinstance(position, Sequence)
                or len(position) != 2
                or position[0] not in RELATIONS
                or not isinstance(position[1], int)
                or not 0 <= position[1] < index
            ):
                raise ValueError(
                    f"GenEval metadata include[{index}].position={position!r}: expected [relation, index of an "
                    f"earlier include clause] with relation one of {RELATIONS}."
                )
            clause["position"] = (position[0], position[1])
        clauses.append(clause)
    metadata["include"] = clauses
    metadata["exclude"] = [_clause(raw, f"exclude[{i}]") for i, raw in enumerate(metadata.get("exclude", []))]
    return metadata


def _clause(raw: Any, where: str) -> dict:
    """A clause dict without `None` values, with a `class` string and a positive integer `count`."""
    if not isinstance(raw, Mapping):
        raise ValueError(f"GenEval metadata {where} must be a dict, got {raw!r}.")
    clause = {key: item for key, item in raw.items() if item is not None}
    if not isinstance(clause.get("class"), str) or not isinstance(clause.get("count"), int) or clause["count"] < 1:
        raise ValueError(f"GenEval metadata {where} needs a 'class' string and a positive integer 'count': {raw!r}.")
    return clause


def metadata_from_columns(columns: Mapping[str, Sequence[Any]], index: int) -> dict:
    """
    The metadata of sample `index` from the reward's dataset columns: a `metadata` column (dict or JSON string), or
    the columns of a row of GenEval's metadata file itself (`include`, optionally `exclude` and `tag`), as
    `--dataset_name train_metadata.jsonl` gives them. Raises naming the columns found when neither is there.
    """
    if "metadata" in columns:
        return parse_metadata(columns["metadata"][index])
    if "include" in columns:
        row = {key: columns[key][index] for key in ("tag", "include", "exclude") if key in columns}
        return parse_metadata(row)
    raise ValueError(
        f"GenEval needs each prompt's metadata: a 'metadata' column or GenEval's 'include' / 'exclude' / 'tag' "
        f"columns; the request has columns {sorted(columns)}. Train on a dataset with them (e.g. Flow-GRPO's "
        "dataset/geneval/train_metadata.jsonl) and let the client send them (RemoteReward sends JSON columns)."
    )


def box_iou(box_a: Sequence[float], box_b: Sequence[float]) -> float:
    """IoU of two `(x1, y1, x2, y2)` boxes with GenEval's inclusive-pixel areas (`x2 - x1 + 1`)."""

    def area(box: Sequence[float]) -> float:
        return max(box[2] - box[0] + 1, 0) * max(box[3] - box[1] + 1, 0)

    inter = area((max(box_a[0], box_b[0]), max(box_a[1], box_b[1]), min(box_a[2], box_b[2]), min(box_a[3], box_b[3])))
    union = area(box_a) + area(box_b) - inter
    return inter / union if union else 0.0


def select_objects(
    detections: Mapping[str, Sequence[Sequence[float]]], tag: str | None, settings: GenEvalSettings = GenEvalSettings()
) -> dict[str, list[DetectedObject]]:
    """
    GenEval's kept detections: per class, the boxes `[x1, y1, x2, y2, confidence]` above the confidence threshold
    (`counting_threshold` for `counting` prompts), most confident first, at most `max_objects`, then greedy NMS at
    `nms_threshold` (off at 1). Each kept object records its row in `detections[class]`; classes without a kept box
    are left out.
    """
    threshold = settings.counting_threshold if tag == "counting" else settings.threshold
    kept = {}
    for classname, boxes in detections.items():
        rows = sorted((row for row, box in enumerate(boxes) if box[4] > threshold), key=lambda row: -boxes[row][4])
        order = rows[: settings.max_objects]
        objects = []
        while order:
            best = order.pop(0)
            box = boxes[best]
            objects.append(DetectedObject(tuple(float(v) for v in box[:4]), float(box[4]), index=best))
            if settings.nms_threshold < 1:
                order = [row for row in order if box_iou(box, boxes[row]) < settings.nms_threshold]
        if objects:
            kept[classname] = objects
    return kept


def colors_needed(metadata: Mapping[str, Any]) -> dict[str, int]:
    """How many of each class's first objects the colour clauses read: `{class: largest count asking a colour}`."""
    needed: dict[str, int] = {}
    for clause in metadata["include"]:
        if "color" in clause:
            needed[clause["class"]] = max(needed.get(clause["class"], 0), clause["count"])
    return needed


def relative_position(box_a: Sequence[float], box_b: Sequence[float], threshold: float = 0.1) -> set[str]:
    """
    Where box A lies relative to box B (GenEval's rule): the offset of their centres, each axis shrunk towards zero by
    `threshold` x the sum of the boxes' sizes on it, is divided by the unshrunk offset's length; "left of" / "right of"
    when its x part is below -0.5 / above 0.5, "above" / "below" likewise for y (image y points down). Empty when the
    shrunk offset vanishes (the boxes overlap too much to tell).
    """
    center_a = ((box_a[0] + box_a[2]) / 2, (box_a[1] + box_a[3]) / 2)
    center_b = ((box_b[0] + box_b[2]) / 2, (box_b[1] + box_b[3]) / 2)
    sizes = (abs(box_a[2] - box_a[0]) + abs(box_b[2] - box_b[0]), abs(box_a[3] - box_a[1]) + abs(box_b[3] - box_b[1]))
    offset = (center_a[0] - center_b[0], center_a[1] - center_b[1])
    revised = [math.copysign(max(abs(o) - threshold * s, 0.0), o) for o, s in zip(offset, sizes, strict=True)]
    if all(abs(value) < 1e-3 for value in revised):
        return set()
    norm = math.hypot(*offset)
    dx, dy = revised[0] / norm, revised[1] / norm
    relations = set()
    if dx < -0.5:
        relations.add("left of")
    if dx > 0.5:
        relations.add("right of")
    if dy < -0.5:
        relations.add("above")
    if dy > 0.5:
        relations.add("below")
    return relations


def _colors(objects: Sequence[DetectedObject], classname: str) -> list[str]:
    """The classified colours of `objects`; raises if one was not classified (the server must classify them)."""
    if any(obj.color is None for obj in objects):
        raise ValueError(
            f"A colour clause reads {len(objects)} {classname!r} object(s) but some have no colour: classify the "
            "first colors_needed(metadata)[class] objects of each class before scoring."
        )
    return [obj.color for obj in objects]


def _positions_hold(objects, targets, relation: str, threshold: float) -> tuple[bool, str]:
    """Whether every object is `relation` every target; else the first failure in GenEval's wording."""
    for obj in objects:
        for target in targets:
            found = relative_position(obj.box, target.box, threshold)
            if relation not in found:
                return False, f"{relation} target, found {' and '.join(sorted(found))} target"
    return True, ""


def geneval_score(
    objects: Mapping[str, Sequence[DetectedObject]], metadata: Mapping[str, Any], position_threshold: float = 0.1
) -> GenEvalResult:
    """
    Score one image's kept objects (`{class: objects, most confident first}`, [`select_objects`] plus colours)
    against its parsed metadata ([`parse_metadata`]).

    - `correct` is GenEval's `evaluate`: an include clause takes the first `count` objects of its class (fewer is a
      failure); a colour clause needs all of them of that colour; a position clause needs each of them in the
      relation to each object of the clause it points to (which must have held). An exclude clause fails when its
      class is seen `count` times or more.
    - `strict_correct` and `score` are Flow-GRPO's `evaluate_reward`: a clause earns the count credit
      `1 - |count - n| / count` for `n` objects of its class (negative when `n > 2 count`). If `n != count`, a colour or
      position clause also earns 0 and fails. Else a colour clause earns `1 - |count - c| / count` for `c` objects of
      the asked colour (failing unless `c == count`), and a position clause, if the colour held, earns 1 when every
      pair is in the relation, 0 otherwise. `score` is the mean credit; exclude clauses are not read.
      (Flow-GRPO's server appends a 1 after a failed position check as well, an unconditional append after its
      loop; here a failed position earns 0 only.)
    """
    include, exclude = metadata["include"], metadata.get("exclude", [])
    correct, reasons, groups = True, [], []
    for clause in include:
        classname, count = clause["class"], clause["count"]
        found = list(objects.get(classname, []))[:count]
        matched = len(found) >= count
        if not matched:
            reasons.append(f"expected {classname}>={count}, found {len(found)}")
        elif "color" in clause and (colors := _colors(found, classname)).count(clause["color"]) < count:
            matched = False
            reasons.append(f"expected {clause['color']} {classname}>={count}, found {colors.count(clause['color'])}")
        if matched and "position" in clause:
            relation, target = clause["position"]
            if groups[target] is None:
                matched = False
                reasons.append(f"no target for {classname} to be {relation}")
            else:
                matched, why = _positions_hold(found, groups[target], relation, position_threshold)
                if not matched:
                    reasons.append(f"expected {classname} {why}")
        correct = correct and matched
        groups.append(found if matched else None)
    for clause in exclude:
        seen = len(objects.get(clause["class"], []))
        if seen >= clause["count"]:
            correct = False
            reasons.append(f"expected {clause['class']}<{clause['count']}, found {seen}")

    strict, credits, strict_groups = True, [], []
    for clause in include:
        classname, count = clause["class"], clause["count"]
        found = list(objects.get(classname, []))
        credits.append(1 - abs(count - len(found)) / count)
        matched = len(found) == count
        if not matched and ("color" in clause or "position" in clause):
            credits.append(0.0)
        if matched and "color" in clause:
            hits = _colors(found, classname).count(clause["color"])
            credits.append(1 - abs(count - hits) / count)
            matched = hits == count
        if matched and "position" in clause:
            relation, target = clause["position"]
            if strict_groups[target] is None:
                matched = False
            else:
                matched = _positions_hold(found, strict_groups[target], relation, position_threshold)[0]
            credits.append(1.0 if matched else 0.0)
        strict = strict and matched
        strict_groups.append(found if matched else None)
    return GenEvalResult(correct, strict, sum(credits) / len(credits), "\n".join(reasons))
