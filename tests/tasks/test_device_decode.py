"""Decoding on the device (``BuildConfig.decode: device``), run here on the CPU.

The same torchvision call decodes with nvjpeg on a GPU and with libjpeg-turbo on the CPU, and
the resize is torch's on either; what these tests pin down is what CI can check: the pixels
against Pillow's (decode exact, resize within 1/255), bad inputs quarantined with the host's
reasons, labels of a whole build against the host's, and an extension of a device-decoded
version exact where the design enumerates every coalition.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from storage import open_storage
from storage.layout import split_report_key
from tasks.build_dataset import (
    BuildConfig,
    LabelConfig,
    clear_model_cache,
    finalize_build,
    label_shard,
    plan_build,
)
from tasks.build_dataset.resolve import finalize_resolve, plan_resolve, resolve_shard
from tasks.data.images import (
    BadImageError,
    decode_image,
    decode_jpegs,
    device_decodable,
    image_to_tensor,
    resize_to_tensor,
)
from tasks.data.readers import iter_webdataset

CPU = torch.device("cpu")


def _photo(seed: int, size: tuple[int, int]) -> Image.Image:
    """Smooth colour plus grain: resizing has edges and flat parts to get wrong."""
    rng = np.random.default_rng(seed)
    width, height = size
    coarse = rng.random((max(2, height // 8), max(2, width // 8), 3)) * 255
    smooth = np.asarray(
        Image.fromarray(coarse.astype(np.uint8)).resize(size, Image.Resampling.BILINEAR),
        dtype=np.float64,
    )
    pixels = smooth + rng.normal(0, 20, smooth.shape)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def _jpeg(img: Image.Image, **kwargs: Any) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, format="JPEG", quality=90, **kwargs)
    return buffer.getvalue()


@pytest.mark.parametrize(
    "size, out",
    [((500, 375), 224), ((375, 500), 224), ((333, 500), 56), ((224, 224), 224), ((40, 30), 56)],
)
def test_the_tensor_resize_is_pillows_within_one_level(size: tuple[int, int], out: int) -> None:
    img = _photo(sum(size), size)
    pixels = torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)
    ours = resize_to_tensor(pixels, out)
    pillow = image_to_tensor(img, out)
    assert ours.shape == pillow.shape == (3, out, out) and ours.dtype == torch.float32
    levels = (ours - pillow).abs() * 255
    assert levels.max() <= 1.0 + 1e-4
    assert (levels > 0.5).float().mean() < 0.002
    # 8-bit levels, as Pillow gives
    assert torch.allclose(ours * 255, (ours * 255).round(), atol=1e-4)


def test_jpegs_decode_as_pillow_decodes_them_and_a_bad_one_costs_its_own_place() -> None:
    rgb = _jpeg(_photo(1, (64, 48)))
    gray = _jpeg(_photo(2, (48, 64)).convert("L"))
    progressive = _jpeg(_photo(3, (60, 60)), progressive=True)
    truncated = rgb[: len(rgb) // 2]
    decoded = decode_jpegs([rgb, gray, truncated, progressive], CPU)
    assert isinstance(decoded[2], BadImageError)
    assert decoded[2].reason.startswith("truncated/corrupt")
    for data, pixels in zip([rgb, gray, progressive], decoded[:2] + decoded[3:], strict=True):
        assert isinstance(pixels, torch.Tensor) and pixels.dtype == torch.uint8
        expected = np.asarray(decode_image(data)).transpose(2, 0, 1)
        np.testing.assert_array_equal(pixels.numpy(), expected)
    assert decode_jpegs([], CPU) == []


def test_a_jpeg_the_device_refuses_is_decoded_on_the_host(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """nvjpeg does not decode every JPEG libjpeg does (arithmetic coding, some markers): such a
    file is labelled from the host's pixels, not lost."""
    import tasks.build_dataset.batches as batches

    folder = _folder(tmp_path / "folder")
    label = LabelConfig(grid_h=3, grid_w=3, budget=40, images_per_batch=3)
    host, _ = _build(str(tmp_path / "host"), folder, "host", label)
    refused = _jpeg(_photo(10, (90, 70)))  # a/rgb.jpg

    def pickier(datas, device):
        out = decode_jpegs(datas, device)
        return [BadImageError("truncated/corrupt: unsupported") if d == refused else o
                for d, o in zip(datas, out, strict=True)]  # fmt: skip

    monkeypatch.setattr(batches, "decode_jpegs", pickier)
    device, summary = _build(str(tmp_path / "device"), folder, "device", label)
    assert summary["samples"] == 6 and [q["key"] for q in _quarantined(device)] == ["b/cut"]
    np.testing.assert_allclose(
        _labels(device.dataset_uri)["a/rgb"], _labels(host.dataset_uri)["a/rgb"], atol=1e-6
    )


def test_which_images_go_to_the_device_is_read_from_the_header() -> None:
    photo = _photo(4, (40, 30))
    png = io.BytesIO()
    photo.save(png, format="PNG")
    assert device_decodable(_jpeg(photo)) and device_decodable(_jpeg(photo.convert("L")))
    assert not device_decodable(_jpeg(photo.convert("CMYK")))  # the host converts those
    assert not device_decodable(png.getvalue())
    assert not device_decodable(b"GIF89a not a jpeg")
    with pytest.raises(BadImageError, match="too large"):
        device_decodable(_jpeg(photo), max_pixels=100)
    with pytest.raises(BadImageError, match="truncated/corrupt|not an image"):
        device_decodable(b"\xff\xd8\xff\xe0" + b"\x00" * 20)


def _folder(root: Path) -> Path:
    """Two classes of JPEGs (RGB, grayscale, CMYK), a PNG and a JPEG cut in half."""
    images = {
        "a/rgb.jpg": _jpeg(_photo(10, (90, 70))),
        "a/gray.jpg": _jpeg(_photo(11, (70, 90)).convert("L")),
        "a/cmyk.jpg": _jpeg(_photo(12, (80, 80)).convert("CMYK")),
        "b/big.jpg": _jpeg(_photo(13, (200, 150))),
        "b/progressive.jpg": _jpeg(_photo(14, (90, 60)), progressive=True),
        "b/cut.jpg": _jpeg(_photo(15, (90, 70)))[:700],
    }
    png = io.BytesIO()
    _photo(16, (64, 64)).save(png, format="PNG")
    images["b/lossless.png"] = png.getvalue()
    for name, data in images.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return root


def _build(root: str, folder: Path, decode: str, label: LabelConfig, device: str = "cpu") -> Any:
    config = BuildConfig(
        name="jpegs-x",
        split="val",
        input_kind="imagefolder",
        input_uri=str(folder),
        output_uri=root,
        num_shards=2,
        device=device,
        decode=decode,
        label=label,
    )
    clear_model_cache()
    plan = plan_build(config)
    for index in range(config.num_shards):
        label_shard(plan, index)
    return plan, finalize_build(plan)


def _labels(uri: str) -> dict[str, np.ndarray]:
    return {
        s["__key__"]: np.load(io.BytesIO(s["shap.npy"]))
        for s in iter_webdataset(open_storage(uri), "jpegs-x", "val")
    }


def _quarantined(plan: Any) -> list[dict[str, Any]]:
    key = split_report_key(plan.config.name, plan.config.split)
    return open_storage(plan.dataset_uri).read_json(key)["quarantined"]


def test_a_build_decoded_on_the_device_labels_as_the_host_does(tmp_path: Path) -> None:
    folder = _folder(tmp_path / "folder")
    label = LabelConfig(grid_h=3, grid_w=3, budget=40, images_per_batch=3)
    host, host_summary = _build(str(tmp_path / "host"), folder, "host", label)
    device, device_summary = _build(str(tmp_path / "device"), folder, "device", label)

    assert device.version != host.version  # the pixels may differ, so the name does
    assert host_summary["samples"] == device_summary["samples"] == 6
    # The cut JPEG: its header passes the reader, its body is refused where it is decoded
    # (Pillow on the host; on the device, then by Pillow too), with the host's reason.
    [on_host], [on_device] = _quarantined(host), _quarantined(device)
    assert on_host == on_device
    assert on_host["key"] == "b/cut" and on_host["stage"] == "label"
    assert on_host["reason"].startswith("truncated/corrupt: image file is truncated")

    by_host, by_device = _labels(host.dataset_uri), _labels(device.dataset_uri)
    assert by_host.keys() == by_device.keys() == {
        "a/rgb", "a/gray", "a/cmyk", "b/big", "b/progressive", "b/lossless"
    }  # fmt: skip
    for key in by_host:
        scale = np.abs(by_host[key]).max()
        gap = np.abs(by_device[key] - by_host[key]).max()
        if key == "b/big":
            # The host decodes it at 1/2 scale in the DCT (Image.draft: short side 150 >= 2 x
            # 56), the device in full before resizing: other pixels, the same picture.
            r = np.corrcoef(by_device[key].ravel(), by_host[key].ravel())[0, 1]
            assert r > 0.98 and gap <= 0.15 * scale, (r, gap / scale)
        else:
            assert gap <= 0.02 * scale + 1e-6, (key, gap / scale)
    for key in ("a/cmyk", "b/lossless"):  # decoded by the host in both builds: same pixels
        np.testing.assert_allclose(by_device[key], by_host[key], rtol=1e-5, atol=1e-6)
    recorded = open_storage(device.dataset_uri).read_json("config.json")
    assert recorded["config"]["decode"] == "device"


def test_a_device_decoded_version_extends_to_a_fresh_labelling_of_every_coalition(
    tmp_path: Path,
) -> None:
    """2x3 cells: at budget 64 every coalition is evaluated, so the extension of a budget-20
    version must give a fresh budget-64 build's labels; it does only if it sees the pixels
    the version saw (the device's)."""
    folder = _folder(tmp_path / "folder")
    label = LabelConfig(grid_h=2, grid_w=3, budget=20, images_per_batch=4, top_k=1)
    source, _ = _build(str(tmp_path / "source"), folder, "device", label)
    plan = plan_resolve(source.dataset_uri, budget=64)
    for shard in plan.shards:
        resolve_shard(plan, shard)
    finalize_resolve(plan)
    fresh, _ = _build(
        str(tmp_path / "fresh"), folder, "device", label.model_copy(update={"budget": 64})
    )
    extended, expected = _labels(plan.dataset_uri), _labels(fresh.dataset_uri)
    assert extended.keys() == expected.keys() and len(extended) == 6
    for key in extended:
        np.testing.assert_allclose(extended[key], expected[key], atol=1e-5)
    recorded = open_storage(plan.dataset_uri).read_json("config.json")
    assert json.dumps(recorded["config"]["decode"]) == '"device"'


@pytest.mark.gpu
def test_nvjpeg_decodes_and_resizes_as_the_cpu_does_within_a_few_levels() -> None:
    """On a GPU: nvjpeg (hardware or hybrid) against libjpeg-turbo, and the resize on the GPU
    against the same resize on the CPU (a few levels at most: IDCTs differ)."""
    cuda = torch.device("cuda")
    datas = [_jpeg(_photo(20 + i, (500, 375))) for i in range(6)]
    datas += [_jpeg(_photo(30, (333, 500)), progressive=True), _jpeg(_photo(31, (64, 48)))]
    datas.append(datas[0][: len(datas[0]) // 2])  # a cut one among them
    on_gpu, on_cpu = decode_jpegs(datas, cuda), decode_jpegs(datas, CPU)
    assert isinstance(on_gpu[-1], BadImageError) and isinstance(on_cpu[-1], BadImageError)
    for gpu, cpu in zip(on_gpu[:-1], on_cpu[:-1], strict=True):
        assert isinstance(gpu, torch.Tensor) and gpu.device.type == "cuda"
        levels = (gpu.cpu().int() - cpu.int()).abs()
        assert levels.max() <= 8 and levels.float().mean() < 1.0
        resized = (resize_to_tensor(gpu, 224).cpu() - resize_to_tensor(gpu.cpu(), 224)).abs()
        assert resized.max() * 255 <= 1.0 + 1e-4


@pytest.mark.gpu
def test_a_build_decoded_on_the_gpu_labels_as_the_cpu_does(tmp_path: Path) -> None:
    folder = _folder(tmp_path / "folder")
    label = LabelConfig(grid_h=3, grid_w=3, budget=40, images_per_batch=3)
    configs = {}
    for device in ("cpu", "cuda"):
        plan, summary = _build(str(tmp_path / device), folder, "device", label, device)
        assert summary["samples"] == 6
        configs[device] = plan
    on_cpu, on_gpu = _labels(configs["cpu"].dataset_uri), _labels(configs["cuda"].dataset_uri)
    assert on_cpu.keys() == on_gpu.keys()
    for key in on_cpu:
        r = np.corrcoef(on_cpu[key].ravel(), on_gpu[key].ravel())[0, 1]
        assert r > 0.95, (key, r)
