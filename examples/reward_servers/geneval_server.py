# Copyright 2026 The trl_ddrl Authors. Licensed under the Apache License, Version 2.0.
"""
GenEval as a trl_ddrl reward server: GenEval's Mask2Former detector and CLIP colour classifier in their own
environment, its scoring rules from `trl_ddrl.rewards.geneval`, served with `trl_ddrl.rewards.create_app`.

GenEval's detector stack (mmdetection 2.x, mmcv-full 1.7) pins an old torch and conflicts with training environments
(Flow-Factory issue #151), so it runs in a virtual environment of its own; the training run reaches it over HTTP.

Install (a separate venv, on a machine with a CUDA GPU; the versions of Flow-GRPO's reward server):

```bash
python3.10 -m venv ~/venvs/geneval && source ~/venvs/geneval/bin/activate
pip install torch==2.1.2 torchvision==0.16.2 --index-url https://download.pytorch.org/whl/cu121
pip install -U openmim && mim install "mmcv-full==1.7.2"
git clone -b 2.x https://github.com/open-mmlab/mmdetection.git && pip install -e mmdetection
#   (mmdet 2.x refuses mmcv-full above 1.7: if it does, raise `mmcv_maximum_version` in mmdetection/mmdet/__init__.py)
pip install open-clip-torch==2.20.0 "fastapi>=0.110" "uvicorn>=0.29" "httpx>=0.27" pydantic pillow numpy
pip install --no-deps /path/to/trl_ddrl        # only its reward server and scoring rules are imported here
git clone https://github.com/djghosh13/geneval.git
bash geneval/evaluation/download_models.sh ~/geneval-models   # mask2former_swin-s-p4-w7-224_lsj_8x2_50e_coco.pth
```

Serve:

```bash
python examples/reward_servers/geneval_server.py \
    --detector-config mmdetection/configs/mask2former/mask2former_swin-s-p4-w7-224_lsj_8x2_50e_coco.py \
    --detector-checkpoint ~/geneval-models/mask2former_swin-s-p4-w7-224_lsj_8x2_50e_coco.pth \
    --object-names geneval/evaluation/object_names.txt --host 0.0.0.0 --port 8002
```

Train (in the training environment) on prompts that carry GenEval's metadata, e.g. Flow-GRPO's
`dataset/geneval/train_metadata.jsonl` and `test_metadata.jsonl` (one JSON object per line: `prompt`, `tag`,
`include`, optionally `exclude`) copied into a folder of their own, which loads as the `train` and `test` splits:

```bash
trl-ddrl --config recipes/sd3.5-medium-geneval-ddrl.yaml --dataset_name geneval-prompts/ --reward_funcs http://<host>:8002
```

Every dataset column reaches a reward as a keyword argument, and `RemoteReward` sends each JSON-serialisable column
with the request; the scorer reads `tag` / `include` / `exclude` (or one `metadata` column holding the whole dict or
its JSON string) per sample. The reward is Flow-GRPO's partial-credit score by default (`--reward score`); `correct`
(GenEval's binary metric) and `strict` (Flow-GRPO's strict verdict) are the alternatives.
"""

import argparse
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from trl_ddrl.rewards.geneval import (
    COLORS,
    DetectedObject,
    GenEvalSettings,
    colors_needed,
    geneval_score,
    metadata_from_columns,
    select_objects,
)
from trl_ddrl.rewards.server import create_app, run_server


REWARDS = ("score", "correct", "strict")
COLOR_TEMPLATES = ("a photo of a {c} {classname}", "a photo of a {c}-colored {classname}", "a photo of a {c} object")
"""GenEval's prompts for its CLIP zero-shot colour classifier."""


class GenEvalScorer:
    """
    GenEval's detector and colour classifier around `trl_ddrl.rewards.geneval`: `(prompts, images, **columns) ->
    list[float]` for images `[B, 3, H, W]` in `[0, 1]`, with each sample's metadata in `columns`.

    Args:
        detector_config (`str`): mmdetection 2.x config of GenEval's Mask2Former (Swin-S, COCO).
        detector_checkpoint (`str`): Its weights (`mask2former_swin-s-p4-w7-224_lsj_8x2_50e_coco.pth`).
        object_names (`str`): GenEval's `evaluation/object_names.txt`: the detector's 80 classes in order, named as
            in the metadata.
        clip_model (`str`, *optional*, defaults to `"ViT-L-14"`): OpenCLIP architecture (OpenAI weights) classifying
            colours.
        device (`str`, *optional*, defaults to `"cuda"`): Where the detector and CLIP run.
        reward (`str`, *optional*, defaults to `"score"`): `"score"`, `"correct"` or `"strict"`.
        settings ([`GenEvalSettings`], *optional*): GenEval's thresholds; its defaults by default.
        background (`str`, *optional*, defaults to `"#999"`): Fill outside an object's mask in its colour crop.
    """

    def __init__(
        self,
        detector_config: str,
        detector_checkpoint: str,
        object_names: str,
        clip_model: str = "ViT-L-14",
        device: str = "cuda",
        reward: str = "score",
        settings: GenEvalSettings | None = None,
        background: str = "#999",
    ):
        import open_clip
        from mmdet.apis import init_detector

        if reward not in REWARDS:
            raise ValueError(f"--reward={reward!r}: choose one of {REWARDS}.")
        with open(object_names) as file:
            self.classnames = [line.strip() for line in file if line.strip()]
        self.detector = init_detector(detector_config, detector_checkpoint, device=device)
        self.clip, _, self.transform = open_clip.create_model_and_transforms(clip_model, "openai", device=device)
        self.clip.eval()
        self.tokenizer = open_clip.get_tokenizer(clip_model)
        self.device, self.reward, self.background = device, reward, background
        self.settings = settings or GenEvalSettings()
        self.color_weights: dict[str, torch.Tensor] = {}
        self.name = f"geneval_{reward}"

    @torch.no_grad()
    def _color_classifier(self, classname: str) -> torch.Tensor:
        """`[D, 10]`: per colour, the normalised mean of the normalised text embeddings of the three templates."""
        if classname not in self.color_weights:
            columns = []
            for color in COLORS:
                texts = [template.format(c=color, classname=classname) for template in COLOR_TEMPLATES]
                embeddings = self.clip.encode_text(self.tokenizer(texts).to(self.device)).float()
                mean = torch.nn.functional.normalize(embeddings, dim=-1).mean(dim=0)
                columns.append(torch.nn.functional.normalize(mean, dim=0))
            self.color_weights[classname] = torch.stack(columns, dim=1)
        return self.color_weights[classname]

    @torch.no_grad()
    def _colors(
        self, image: Image.Image, boxes: Sequence[Sequence[float]], masks: Sequence[Any], classname: str
    ) -> list:
        """GenEval's colour of each object: its mask over a grey background, cropped to its box, classified by CLIP."""
        blank = Image.new("RGB", image.size, color=self.background)
        crops = []
        for box, mask in zip(boxes, masks, strict=True):
            crop = image if mask is None else Image.composite(image, blank, Image.fromarray(mask))
            crops.append(self.transform(crop.crop(tuple(box[:4]))))
        features = self.clip.encode_image(torch.stack(crops).to(self.device)).float()
        logits = torch.nn.functional.normalize(features, dim=-1) @ self._color_classifier(classname)
        return [COLORS[index] for index in logits.argmax(dim=1).tolist()]

    def __call__(self, prompts: list[str], images: torch.Tensor, **columns: Any) -> list[float]:
        from mmdet.apis import inference_detector

        if images.ndim != 4:
            raise ValueError(f"GenEval scores images [B, C, H, W]; got shape {tuple(images.shape)}.")
        pixels = (images.float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        pixels = pixels if pixels.shape[-1] == 3 else np.repeat(pixels, 3, axis=-1)
        # mmdet reads numpy images as BGR (as GenEval's files are read); Flow-GRPO's server passes RGB.
        results = inference_detector(self.detector, [np.ascontiguousarray(image[..., ::-1]) for image in pixels])
        rewards = []
        for index, (result, rgb) in enumerate(zip(results, pixels, strict=True)):
            metadata = metadata_from_columns(columns, index)
            bboxes, segms = (result[0], result[1]) if isinstance(result, tuple) else (result, None)
            raw = {name: bboxes[k].tolist() for k, name in enumerate(self.classnames) if len(bboxes[k])}
            objects = select_objects(raw, metadata.get("tag"), self.settings)
            objects = self._with_colors(objects, bboxes, segms, Image.fromarray(rgb), metadata)
            result = geneval_score(objects, metadata, self.settings.position_threshold)
            rewards.append(
                {"score": result.score, "correct": result.correct, "strict": result.strict_correct}[self.reward]
            )
        return [float(value) for value in rewards]

    def _with_colors(self, objects, bboxes, segms, image: Image.Image, metadata: dict) -> dict:
        """`objects` with the colour of the first objects of each class a colour clause reads."""
        for classname, count in colors_needed(metadata).items():
            kept = objects.get(classname, [])[:count]
            if not kept:
                continue
            k = self.classnames.index(classname)
            masks = [None if segms is None else segms[k][obj.index] for obj in kept]
            colors = self._colors(image, [obj.box for obj in kept], masks, classname)
            objects[classname] = [
                DetectedObject(obj.box, obj.confidence, color, obj.index)
                for obj, color in zip(kept, colors, strict=True)
            ] + list(objects[classname][count:])
        return objects


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--detector-config", required=True, help="mmdetection 2.x Mask2Former config.")
    parser.add_argument("--detector-checkpoint", required=True, help="GenEval's Mask2Former weights (.pth).")
    parser.add_argument("--object-names", required=True, help="GenEval's evaluation/object_names.txt.")
    parser.add_argument("--clip-model", default="ViT-L-14", help="OpenCLIP architecture for colours (OpenAI weights).")
    parser.add_argument("--reward", default="score", choices=REWARDS, help="What the reward is (default: score).")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--threshold", type=float, default=0.3)
    parser.add_argument("--counting-threshold", type=float, default=0.9)
    parser.add_argument("--max-objects", type=int, default=16)
    parser.add_argument("--max-overlap", type=float, default=1.0, help="NMS IoU threshold (1: no NMS).")
    parser.add_argument("--position-threshold", type=float, default=0.1)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8002)
    parser.add_argument("--max-batch", type=int, default=64, help="Most samples per detector call.")
    args = parser.parse_args(argv)
    settings = GenEvalSettings(
        args.threshold, args.counting_threshold, args.max_objects, args.max_overlap, args.position_threshold
    )
    scorer = GenEvalScorer(
        args.detector_config,
        args.detector_checkpoint,
        args.object_names,
        args.clip_model,
        args.device,
        args.reward,
        settings,
    )
    run_server(create_app(scorer, device="cpu", max_batch=args.max_batch), host=args.host, port=args.port)


if __name__ == "__main__":
    main()
