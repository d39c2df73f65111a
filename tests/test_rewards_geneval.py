# Copyright 2026 The trl_ddrl Authors. Licensed under the Apache License, Version 2.0.
"""GenEval's scoring rules on hand-made detections (no detector), and its metadata reaching a reward server."""

import importlib.util
import json
import sys
import types

import numpy as np
import pytest
import torch
from test_rewards_server import random_images, serve

from trl_ddrl.rewards import RemoteReward, create_app
from trl_ddrl.rewards.geneval import (
    COLORS,
    DetectedObject,
    GenEvalSettings,
    box_iou,
    colors_needed,
    geneval_score,
    metadata_from_columns,
    parse_metadata,
    relative_position,
    select_objects,
)


def obj(x1: float, y1: float, x2: float, y2: float, color: str | None = None, confidence: float = 0.9):
    return DetectedObject((x1, y1, x2, y2), confidence, color)


def meta(include: list, exclude: list | None = None, tag: str = "two_object") -> dict:
    return parse_metadata({"tag": tag, "include": include, "exclude": exclude})


def test_relative_position_follows_geneval_on_image_axes():
    dog, bear = (300, 100, 400, 200), (0, 100, 100, 200)  # y points down
    assert relative_position(dog, bear) == {"right of"} and relative_position(bear, dog) == {"left of"}
    assert relative_position((0, 0, 100, 100), (0, 300, 100, 400)) == {"above"}
    assert relative_position((0, 300, 100, 400), (0, 0, 100, 100)) == {"below"}
    assert relative_position((0, 0, 100, 100), (300, 300, 400, 400)) == {"left of", "above"}  # diagonal: both
    assert relative_position((0, 0, 100, 100), (300, 120, 400, 220)) == {"left of"}  # mostly sideways
    assert relative_position((0, 0, 100, 100), (5, 0, 105, 100)) == set()  # overlapping: offset shrinks to 0
    # Sizes count: centres 110 apart, shrunk by 0.1 * (100 + 100) = 20, still "right of"; 0.6 * 200 erases it.
    assert relative_position((110, 0, 210, 100), (0, 0, 100, 100)) == {"right of"}
    assert relative_position((110, 0, 210, 100), (0, 0, 100, 100), threshold=0.6) == set()


def test_select_objects_thresholds_orders_caps_and_suppresses():
    raw = {"cat": [[0, 0, 10, 10, 0.5], [0, 0, 10, 10, 0.95], [50, 50, 60, 60, 0.2]], "dog": [[0, 0, 5, 5, 0.1]]}
    kept = select_objects(raw, "two_object")
    assert list(kept) == ["cat"] and [o.confidence for o in kept["cat"]] == [0.95, 0.5]
    assert [o.confidence for o in select_objects(raw, "counting")["cat"]] == [0.95]  # counting: above 0.9 only
    many = {"cat": [[10 * i, 0, 10 * i + 5, 5, 0.5 + i / 100] for i in range(20)]}
    assert len(select_objects(many, None)["cat"]) == 16  # max_objects
    # NMS is off by default (max_overlap 1); at 0.5 the duplicate box goes.
    assert len(select_objects(raw, None, GenEvalSettings(nms_threshold=0.5))["cat"]) == 1
    assert box_iou((0, 0, 9, 9), (0, 0, 9, 9)) == 1.0 and box_iou((0, 0, 9, 9), (10, 10, 19, 19)) == 0.0


def test_counting_credit_is_partial_and_strict_needs_the_exact_count():
    metadata = meta([{"class": "apple", "count": 3}], [{"class": "apple", "count": 4}], tag="counting")
    apples = [obj(10 * i, 0, 10 * i + 5, 5) for i in range(5)]
    exact = geneval_score({"apple": apples[:3]}, metadata)
    assert exact.correct and exact.strict_correct and exact.score == 1.0 and exact.reason == ""
    two = geneval_score({"apple": apples[:2]}, metadata)
    assert not two.correct and not two.strict_correct and two.score == pytest.approx(2 / 3)
    assert two.reason == "expected apple>=3, found 2"
    # Four apples: GenEval reads the first three (include holds) but the exclude clause fails; strict fails too.
    four = geneval_score({"apple": apples[:4]}, metadata)
    assert not four.correct and four.reason == "expected apple<4, found 4" and not four.strict_correct
    assert four.score == pytest.approx(2 / 3)
    assert geneval_score({}, metadata).score == 0.0
    # Flow-GRPO's count credit goes negative beyond twice the count.
    assert geneval_score({"apple": apples[:3] * 3}, meta([{"class": "apple", "count": 3}])).score == -1.0


def test_colors_read_the_first_count_objects():
    metadata = meta([{"class": "car", "count": 1, "color": "red"}], tag="colors")
    assert colors_needed(metadata) == {"car": 1}
    red = geneval_score({"car": [obj(0, 0, 5, 5, "red")]}, metadata)
    assert red.correct and red.strict_correct and red.score == 1.0
    blue = geneval_score({"car": [obj(0, 0, 5, 5, "blue")]}, metadata)
    assert not blue.correct and not blue.strict_correct and blue.score == 0.5  # count credit 1, colour credit 0
    assert blue.reason == "expected red car>=1, found 0"
    # A second, unclassified car: GenEval still passes (first one read); strict fails on the count, colour earns 0.
    two = geneval_score({"car": [obj(0, 0, 5, 5, "red"), obj(9, 9, 12, 12)]}, metadata)
    assert two.correct and not two.strict_correct and two.score == 0.0  # credits 1 - 1/1 = 0 and 0
    with pytest.raises(ValueError, match="classify the first colors_needed"):
        geneval_score({"car": [obj(0, 0, 5, 5)]}, metadata)


def test_positions_point_to_an_earlier_clause():
    metadata = meta(
        [{"class": "teddy bear", "count": 1}, {"class": "dog", "count": 1, "position": ["right of", 0]}],
        tag="position",
    )
    bear, right, left = obj(0, 100, 100, 200), obj(300, 100, 400, 200), obj(-300, 100, -200, 200)
    good = geneval_score({"teddy bear": [bear], "dog": [right]}, metadata)
    assert good.correct and good.strict_correct and good.score == 1.0
    wrong = geneval_score({"teddy bear": [bear], "dog": [left]}, metadata)
    assert not wrong.correct and not wrong.strict_correct
    assert wrong.score == pytest.approx(2 / 3)  # credits 1 (bear), 1 (dog count), 0 (position)
    assert wrong.reason == "expected dog right of target, found left of target"
    no_bear = geneval_score({"dog": [right]}, metadata)
    assert (
        not no_bear.correct and no_bear.reason == "expected teddy bear>=1, found 0\nno target for dog to be right of"
    )
    assert no_bear.score == pytest.approx(1 / 3)  # credits 0 (no bear), 1 (dog count), 0 (no target)


def test_metadata_is_checked_and_read_from_either_column_layout():
    row = {"tag": "colors", "include": [{"class": "car", "count": 1, "color": "red", "position": None}]}
    parsed = parse_metadata(json.dumps(row))
    assert parsed["include"] == [{"class": "car", "count": 1, "color": "red"}] and parsed["exclude"] == []
    assert metadata_from_columns({"metadata": [row, json.dumps(row)]}, 1) == parsed
    flat = {"prompt": ["a red car"], "tag": ["colors"], "include": [row["include"]], "exclude": [None]}
    assert metadata_from_columns(flat, 0) == parsed
    with pytest.raises(ValueError, match=r"'metadata' column or GenEval's 'include'.*columns \['label'\]"):
        metadata_from_columns({"label": [1]}, 0)
    with pytest.raises(ValueError, match=r"include\[0\]\.color='mauve'"):
        parse_metadata({"include": [{"class": "car", "count": 1, "color": "mauve"}]})
    with pytest.raises(ValueError, match=r"include\[0\]\.position=\['left of', 0\]: expected \[relation, index of an"):
        parse_metadata({"include": [{"class": "car", "count": 1, "position": ["left of", 0]}]})
    with pytest.raises(ValueError, match=r"include\[0\] needs a 'class' string and a positive integer 'count'"):
        parse_metadata({"include": [{"class": "car", "count": 0}]})
    with pytest.raises(ValueError, match="'include' must be a non-empty list"):
        parse_metadata({"tag": "colors"})
    with pytest.raises(ValueError, match="not valid JSON"):
        parse_metadata("{tag")


def test_the_metadata_columns_reach_a_reward_server_intact():
    """A GenEval-style scorer behind `create_app` gets each sample's metadata as the dataset holds it."""
    received = []

    def scorer(prompts, images, **columns):
        received.append(columns)
        return [geneval_score({}, metadata_from_columns(columns, i)).score for i in range(len(prompts))]

    include = [[{"class": "car", "count": 1, "color": "red"}], [{"class": "dog", "count": 2}]]
    columns = {"tag": ["colors", "counting"], "include": include, "exclude": [None, [{"class": "dog", "count": 3}]]}
    with serve(create_app(scorer)) as url:
        rewards = RemoteReward(url)(
            ["a red car", "two dogs"], random_images(2, 3, 8, 8), trainer_state=object(), **columns
        )
    assert rewards == [0.0, 0.0] and received == [columns]


def test_the_example_server_glues_detector_colours_and_rules(monkeypatch, tmp_path):
    """`examples/reward_servers/geneval_server.py` with stand-ins for mmdet and OpenCLIP (not installed here)."""
    seen = []

    def inference_detector(model, images):
        seen.extend(images)
        car = np.array([[8, 8, 24, 24, 0.95], [0, 0, 2, 2, 0.1]], dtype=np.float32)  # one kept car, one weak box
        mask = np.zeros((32, 32), dtype=bool)
        mask[8:24, 8:24] = True
        empty = np.zeros((0, 5), dtype=np.float32)
        return [([empty, car, empty], [[], [mask, mask], []]) for _ in images]

    class Clip:
        def eval(self):
            return self

        def encode_text(self, tokens):  # the colour word of each template, one-hot
            return torch.nn.functional.one_hot(tokens, len(COLORS)).float()

        def encode_image(self, crops):  # red vs blue by the crop's mean colour
            features = torch.zeros(len(crops), len(COLORS))
            features[:, COLORS.index("red")], features[:, COLORS.index("blue")] = crops[:, 0], crops[:, 2]
            return features

    def tokenizer(texts):
        return torch.tensor([next(i for i, c in enumerate(COLORS) if f" {c}" in text) for text in texts])

    def transform(image):
        return torch.tensor(np.asarray(image, dtype=np.float32).reshape(-1, 3).mean(axis=0))

    apis = types.SimpleNamespace(init_detector=lambda *args, **kwargs: object(), inference_detector=inference_detector)
    monkeypatch.setitem(sys.modules, "mmdet", types.ModuleType("mmdet"))
    monkeypatch.setitem(sys.modules, "mmdet.apis", apis)
    clip = types.SimpleNamespace(
        create_model_and_transforms=lambda *args, **kwargs: (Clip(), None, transform),
        get_tokenizer=lambda name: tokenizer,
    )
    monkeypatch.setitem(sys.modules, "open_clip", clip)
    path = f"{__file__.rsplit('/tests/', 1)[0]}/examples/reward_servers/geneval_server.py"
    spec = importlib.util.spec_from_file_location("geneval_server", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    (tmp_path / "names.txt").write_text("dog\ncar\ncat\n")
    scorer = module.GenEvalScorer("config.py", "weights.pth", str(tmp_path / "names.txt"), device="cpu")

    images = torch.zeros(2, 3, 32, 32)
    images[0, 0, 8:24, 8:24] = 1.0  # a red square
    images[1, 2, 8:24, 8:24] = 1.0  # a blue square
    include = [[{"class": "car", "count": 1, "color": "red"}]] * 2
    assert scorer(["a red car"] * 2, images, tag=["colors"] * 2, include=include) == [1.0, 0.5]
    assert seen[0][16, 16].tolist() == [0, 0, 255]  # the detector gets BGR, as mmdet reads image files
    scorer.reward = "correct"
    assert scorer(["a red car"] * 2, images, tag=["colors"] * 2, include=include) == [1.0, 0.0]
    with pytest.raises(ValueError, match="'metadata' column or GenEval's"):
        scorer(["a red car"], images[:1])
