"""The ONNX -> PyTorch ArcFace converter and the differentiable ArcFace.

The recognizers are real IResNet graphs: a tiny random IResNet exported by torch.onnx (BN folded into the
convs, Gemm), and the same kind of network written node by node in the mxnet-era layout (in-graph input
normalisation, separate BNs, MatMul + Add). onnxruntime is the reference."""
import os

import numpy as np
import pytest
import torch

from fixtures_faces import (astronaut, insightface_root, random_ref_iresnet, tiny_packs,  # noqa: F401
                            write_mxnet_style_arcface, write_tiny_arcface, write_tiny_scrfd)


@pytest.fixture(scope="module")
def faces(pack):
    from comfyui_likeness import faces
    from comfyui_likeness.faces import arcface, arcface_onnx, embeddings, loader  # noqa: F401
    return faces


def ort_embed(path, x01):
    """onnxruntime with insightface's preprocessing for that model (RGB, (x*255 - mean) / std)."""
    import onnxruntime
    from insightface.model_zoo.arcface_onnx import ArcFaceONNX

    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    model = ArcFaceONNX(model_file=path, session=session)
    return model.forward((x01 * 255.0).numpy()), model      # forward() applies (x - mean) / std itself


@pytest.mark.parametrize("layout", ["torch_export", "mxnet_style", "mxnet_style_conv_bias"])
def test_converted_module_matches_onnxruntime(faces, tmp_path, layout):
    path = str(tmp_path / "rec.onnx")
    if layout == "torch_export":
        ref = write_tiny_arcface(path, seed=7, layers=(1, 2, 1, 2), widths=(8, 12, 16, 16))
    else:
        ref = random_ref_iresnet(seed=8, layers=(2, 1, 1, 1))
        write_mxnet_style_arcface(path, ref, conv_bias=layout.endswith("bias"))
    model = faces.arcface.load_arcface(path)
    assert model.net.layers == ((1, 2, 1, 2) if layout == "torch_export" else (2, 1, 1, 1))
    assert model.net.widths == ((8, 12, 16, 16) if layout == "torch_export" else (8, 8, 16, 16))
    x = torch.rand(3, 3, 112, 112, generator=torch.Generator().manual_seed(0))
    expected, ort_model = ort_embed(path, x)
    assert ort_model.input_mean == (127.5 if layout == "torch_export" else 0.0)
    raw = model.net(x * model.pixel_scale + model.pixel_bias).numpy()
    np.testing.assert_allclose(raw, expected, atol=1e-4 * np.abs(expected).max())
    if not layout.endswith("bias"):   # with extra biases the graph is no longer `ref`
        np.testing.assert_allclose(raw, ref((x * 255 - 127.5) / 127.5).detach().numpy(), atol=1e-4 * np.abs(expected).max())
    unit = expected / np.linalg.norm(expected, axis=1, keepdims=True)
    np.testing.assert_allclose(model(x).numpy(), unit, atol=1e-5)


def test_converter_rejects_what_is_not_an_iresnet(faces, tmp_path):
    det = str(tmp_path / "det.onnx")
    write_tiny_scrfd(det, "random")
    with pytest.raises(faces.arcface_onnx.ArcFaceConversionError, match="not an IResNet ArcFace"):
        faces.arcface.load_arcface(det)
    bad = tmp_path / "broken.onnx"
    bad.write_bytes(b"\x00\x01garbage")
    with pytest.raises(faces.arcface_onnx.ArcFaceConversionError, match="cannot be read as ONNX"):
        faces.arcface.load_arcface(str(bad))
    with pytest.raises(ValueError, match="pickled"):
        pth = tmp_path / "backbone.pth"
        pth.write_bytes(b"x")
        faces.arcface.load_arcface(str(pth))


def test_the_whole_pipeline_matches_insightface_on_a_photo(faces, tiny_packs, astronaut):  # noqa: F811
    """Detection landmarks -> torch alignment (grid_sample) -> converted IResNet == insightface's embedding."""
    analysis = faces.loader.load_face_analysis("insightface", "likeness_centre")
    embeds, aligned = faces.embeddings.embed_faces(analysis, astronaut)
    model = faces.arcface.arcface_from_pack("likeness_centre")
    image = astronaut.permute(0, 3, 1, 2)
    ours = model.embed(image, torch.from_numpy(embeds.kps))
    cos = float((ours[0] * embeds.embeddings[0]).sum())
    assert cos > 0.999, cos
    # our aligned crop against insightface's norm_crop (uint8, cv2 interpolation)
    ours_aligned = faces.alignment.align_faces(image, torch.from_numpy(embeds.kps), 112)[0].permute(1, 2, 0)
    assert (ours_aligned - aligned[0]).abs().mean() < 2.0 / 255


def test_identity_loss_is_differentiable_and_the_net_stays_frozen(faces, tiny_packs, astronaut):  # noqa: F811
    model = faces.arcface.arcface_from_pack("likeness_centre")
    model.train()
    assert not model.training and not model.net.training
    kps = torch.tensor([[[226.0, 240.0], [283.0, 238.0], [256.0, 271.0], [233.0, 309.0], [281.0, 308.0]]])
    ref = astronaut.permute(0, 3, 1, 2)
    gen = (ref + 0.1 * torch.randn_like(ref)).clamp(0, 1).requires_grad_(True)
    loss = model.identity_loss(ref, gen, kps)
    assert 0.0 < loss.item() < 2.0
    loss.backward()
    assert gen.grad is not None and gen.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.parameters())
    assert float(model.identity_loss(ref, ref, kps)) == pytest.approx(0.0, abs=1e-5)
    with pytest.raises(ValueError, match="same size"):
        model.identity_loss(ref, gen[..., :256, :256], kps)


def test_safetensors_round_trip_and_format_checks(faces, tiny_packs, tmp_path):  # noqa: F811
    from safetensors.torch import save_file

    model = faces.arcface.arcface_from_pack("likeness_mxnet")
    path = str(tmp_path / "arcface.safetensors")
    faces.arcface.save_arcface(model, path)
    again = faces.arcface.load_arcface(path)
    x = torch.rand(2, 3, 112, 112)
    assert torch.equal(model(x), again(x)) and again.net.layers == model.net.layers
    foreign = str(tmp_path / "foreign.safetensors")
    save_file({"w": torch.zeros(1)}, foreign, metadata={"format": "something else"})
    with pytest.raises(ValueError, match="not a converted ArcFace file"):
        faces.arcface.load_arcface(foreign)


def test_the_recognition_model_is_found_by_shape(faces, tmp_path):
    write_tiny_scrfd(str(tmp_path / "detector.onnx"), "random")
    write_tiny_arcface(str(tmp_path / "my_arcface.onnx"), seed=3)
    assert faces.arcface.find_recognition_onnx(str(tmp_path)).endswith("my_arcface.onnx")
    os.remove(tmp_path / "my_arcface.onnx")
    with pytest.raises(FileNotFoundError, match="no ArcFace recognition model"):
        faces.arcface.find_recognition_onnx(str(tmp_path))
