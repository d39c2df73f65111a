import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from datasets import Dataset
from PIL import Image

from trl_ddrl.data import check_data_columns, check_prompt_datasets, to_pixel_tensor


def test_pil_rgb_is_resized_cropped_and_scaled():
    array = np.zeros((20, 40, 3), dtype=np.uint8)
    array[:, :20] = 255  # left half white
    pixels = to_pixel_tensor(Image.fromarray(array), 8, 8, 3)
    assert pixels.shape == (3, 8, 8)
    assert pixels.min() >= -1 and pixels.max() <= 1
    # resized to 8x16 then centre-cropped: columns 4..11 of the resized image, left half white
    assert pixels[:, :, 0].mean() > 0.9 and pixels[:, :, -1].mean() < -0.9


def test_grayscale_and_channel_conversion():
    gray = Image.fromarray(np.full((8, 8), 255, dtype=np.uint8), mode="L")
    assert torch.allclose(to_pixel_tensor(gray, 8, 8, 3), torch.ones(3, 8, 8))
    rgb = np.zeros((8, 8, 3), dtype=np.float32)
    assert torch.allclose(to_pixel_tensor(rgb, 8, 8, 1), -torch.ones(1, 8, 8))


def test_tensor_file_and_video_inputs(tmp_path):
    tensor = torch.full((3, 16, 16), 0.5)
    assert torch.allclose(to_pixel_tensor(tensor, 8, 8, 3), torch.zeros(3, 8, 8), atol=1e-6)
    path = tmp_path / "img.png"
    Image.fromarray(np.full((8, 8, 3), 255, dtype=np.uint8)).save(path)
    assert torch.allclose(to_pixel_tensor(str(path), 4, 4, 3), torch.ones(3, 4, 4))
    video = np.zeros((5, 8, 8, 3), dtype=np.uint8)
    assert to_pixel_tensor(video, 4, 4, 3).shape == (5, 3, 4, 4)
    assert to_pixel_tensor([tensor, tensor], 4, 4, 3).shape == (2, 3, 4, 4)


def test_wrong_type_names_the_column():
    with pytest.raises(TypeError, match="Column 'photo'"):
        to_pixel_tensor(123, 8, 8, 3, column="photo")
    with pytest.raises(ValueError, match="Column 'photo'"):
        to_pixel_tensor(np.zeros((8, 8, 7)), 8, 8, 3, column="photo")
    for missing in ("no/such/image.png", "no/such/clip.mp4"):
        with pytest.raises(
            FileNotFoundError, match=f"Column 'photo' names the file '{missing}', which does not exist"
        ):
            to_pixel_tensor(missing, 8, 8, 3, column="photo")


def test_nested_lists_from_datasets_array_columns():
    image = np.full((8, 8, 3), 255, dtype=np.uint8)
    assert torch.allclose(to_pixel_tensor(image.tolist(), 4, 4, 3), torch.ones(3, 4, 4))
    video = np.zeros((2, 8, 8, 3), dtype=np.uint8)
    assert to_pixel_tensor(video.tolist(), 4, 4, 3).shape == (2, 3, 4, 4)


def test_video_files(tmp_path):
    frames = [Image.fromarray(np.full((8, 8, 3), value, dtype=np.uint8)) for value in (0, 255, 0)]
    path = tmp_path / "clip.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0)
    video = to_pixel_tensor(str(path), 4, 4, 3)
    assert video.shape == (3, 3, 4, 4)
    assert video[0].max() < -0.9 and video[1].min() > 0.9
    still = tmp_path / "still.gif"
    frames[1].save(still)
    assert to_pixel_tensor(str(still), 4, 4, 3).shape == (3, 4, 4)  # a one-frame GIF is an image


def test_video_file_without_imageio_names_the_fix(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "imageio", None)
    (tmp_path / "clip.mp4").write_bytes(b"")
    with pytest.raises(ImportError, match=r"Column 'video'.*imageio\[pyav\]"):
        to_pixel_tensor(str(tmp_path / "clip.mp4"), 4, 4, 3, column="video")


def test_prompt_datasets_are_converted_and_checked():
    rows = [{"prompt": "a cat"}, {"prompt": "a dog"}]
    train, data = check_prompt_datasets(rows, {"image": [np.zeros((4, 4, 3))], "caption": ["x"]}, prompts_per_step=2)
    assert isinstance(train, Dataset) and train["prompt"] == ["a cat", "a dog"] and len(data) == 1
    cases = [
        ((None, None, 1), "train_dataset is required"),
        ((rows, Dataset.from_dict({"image": []}), 1), "data_dataset is empty"),
        ((Dataset.from_dict({"prompt": ["a"]}).to_iterable_dataset(), None, 1), "map-style"),
        (([{"text": "a cat"}], None, 1), r"no 'prompt' column \(columns: \['text'\]\)"),
        ((rows, None, 3), "train_dataset has 2 rows, but prompts_per_step=3"),
    ]
    for arguments, message in cases:
        with pytest.raises(ValueError, match=message):
            check_prompt_datasets(*arguments)


def test_data_columns_are_checked_against_the_run():
    adapter = SimpleNamespace(pipeline=object(), num_conditioning_frames=0, conditioned_on_source_image=False)
    args = SimpleNamespace(image_column="image", caption_column="caption", data_beta=0.1, data_source="dataset")
    prompts = Dataset.from_dict({"prompt": ["a cat"]})
    data = Dataset.from_dict({"image": [np.zeros((4, 4, 3))], "caption": ["a cat"]})
    check_data_columns(adapter, args, prompts, data)
    check_data_columns(adapter, SimpleNamespace(**{**vars(args), "data_beta": 0.0}), prompts)
    with pytest.raises(ValueError, match="data_beta=0.1 needs data images, but train_dataset has no 'image' column"):
        check_data_columns(adapter, args, prompts)
    with pytest.raises(ValueError, match="data_dataset has no 'caption' caption column"):
        check_data_columns(adapter, args, prompts, data.remove_columns("caption"))
    with pytest.raises(ValueError, match="data_source='base_model' draws the data term from the base model"):
        check_data_columns(adapter, SimpleNamespace(**{**vars(args), "data_source": "base_model"}), prompts, data)
    framed = SimpleNamespace(**{**vars(adapter), "num_conditioning_frames": 1})
    with pytest.raises(ValueError, match="generates from conditioning frames, but train_dataset has no 'image'"):
        check_data_columns(framed, args, prompts, data)


@pytest.mark.parametrize(
    "bad, message",
    [
        (5, "row 2, column 'prompt': int 5 is not a text prompt"),
        (None, "row 2, column 'prompt': NoneType None is not a text prompt"),
        (b"a cat", "row 2, column 'prompt': bytes b'a cat' is not a text prompt"),
        ("a \ud800 cat", "row 2, column 'prompt': a string that is not valid Unicode (surrogates not allowed"),
    ],
)
def test_prompts_that_are_not_strings_name_the_row_and_column(bad, message):
    prompts = ["a cat", "a dog", bad, "a tree"]
    for dataset in ([{"prompt": prompt} for prompt in prompts], {"prompt": prompts}):
        with pytest.raises(ValueError, match=re.escape(f"train_dataset {message}")):
            check_prompt_datasets(dataset, None, 2)
    if bad is None:
        with pytest.raises(ValueError, match=re.escape(f"train_dataset {message}")):
            check_prompt_datasets(Dataset.from_dict({"prompt": prompts}), None, 2)
    with pytest.raises(ValueError, match=r"train_dataset column 'prompt' holds Value\('int64'\) values \(row 0: 1\)"):
        check_prompt_datasets(Dataset.from_dict({"prompt": [1, 2, 3]}), None, 2)


def test_a_data_video_with_too_few_frames_names_the_dataset_row():
    from trl_ddrl.data import DiffusionDataCollator, read_row

    adapter = SimpleNamespace(pipeline=object(), resolution=(8, 8), pixel_channels=3, num_frames=5)
    videos = Dataset.from_dict(
        {"image": [np.zeros((5, 8, 8, 3), np.uint8)] * 4 + [np.zeros((2, 8, 8, 3), np.uint8)], "prompt": ["a"] * 5}
    )
    rows = [read_row(videos, position, "data_dataset") for position in (0, 4)]
    with pytest.raises(ValueError, match=r"data_dataset row 4's 'image' video has 2 frames, fewer than num_frames=5"):
        DiffusionDataCollator(adapter).pixels(rows)
    with pytest.raises(ValueError, match=r"Row 1's 'image' video has 2 frames"):  # rows of unknown origin
        DiffusionDataCollator(adapter).pixels([dict(row) for row in rows])


def test_data_images_far_smaller_than_the_resolution_warn():
    with pytest.warns(
        UserWarning, match=r"A data image of 3x3 pixels is upscaled 10.7x to the training resolution 32x32"
    ):
        to_pixel_tensor(np.zeros((3, 3, 3), np.uint8), 32, 32, 3)
