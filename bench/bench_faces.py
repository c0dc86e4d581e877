"""Faces: the no-download detectors on photos that ship inside installed packages, the masks that work without
mediapipe (OpenCV face mesh, GrabCut person mask) against mediapipe's, Face Crop cost per mask source, alignment and embedding agreement with insightface, and the ONNX -> PyTorch ArcFace converter on a
full-size (R50, random weights) IResNet graph.

Photos: scikit-image's astronaut (1 face, public domain), coffee (no face) and LFW subset (100 face / 100
non-face 25x25 crops, upscaled to 100x100); insightface's t1.jpg (6 faces), read from site-packages at run time.
Run: .host/venv/bin/python bench/bench_faces.py   -> bench/results/faces.json
"""
import os
import platform
import sys
import tempfile
import time
import warnings

import numpy as np
import torch

from common import REPO, boot_host, median_times, write_result

# Its stand-in builders still live in the tests' fixtures (to move to scripts/ when this bench is extended).
sys.path.insert(0, os.path.join(REPO, "tests", "support"))


def photos():
    import cv2
    import insightface
    from skimage import data

    lfw = data.lfw_subset()   # (200, 25, 25) float: 100 faces then 100 non-faces
    up = [np.repeat(cv2.resize((im * 255).astype(np.uint8), (100, 100), interpolation=cv2.INTER_CUBIC)[..., None], 3, -1)
          for im in lfw]
    t1 = cv2.imread(os.path.join(os.path.dirname(insightface.__file__), "data", "images", "t1.jpg"))[..., ::-1]
    return {"astronaut": np.ascontiguousarray(data.astronaut()), "coffee": np.ascontiguousarray(data.coffee()),
            "t1": np.ascontiguousarray(t1), "lfw_faces": up[:100], "lfw_nonfaces": up[100:]}


def detector_table(faces, pics):
    out = {}
    for backend in ("blazeface", "mediapipe", "opencv"):
        analysis = faces.loader.load_face_analysis(backend)
        row = {}
        for name in ("astronaut", "coffee", "t1"):
            t = time.perf_counter()
            dets = analysis.detect(pics[name])
            row[name] = {"faces": len(dets), "seconds": round(time.perf_counter() - t, 4),
                         "boxes": [[round(v) for v in d.box] for d in dets][:6]}
        t = time.perf_counter()
        hits = sum(bool(analysis.detect(im)) for im in pics["lfw_faces"])
        false = sum(bool(analysis.detect(im)) for im in pics["lfw_nonfaces"])
        row["lfw_subset_100px"] = {"faces_found_of_100": hits, "non_faces_flagged_of_100": false,
                                   "seconds_per_image": round((time.perf_counter() - t) / 200, 4)}
        row["landmarks"] = analysis.gives_landmarks
        out[backend] = row
    return out


def crop_costs(faces, astronaut, backend):
    analysis = faces.loader.load_face_analysis(backend)
    fns = {src: (lambda s=src: faces.crop.crop_faces(astronaut, analysis, size=512, mask_source=s))
           for src in ("ellipse", "face_oval", "person")}
    fns["detect_only"] = lambda: analysis.detect((astronaut[0] * 255).byte().numpy())
    return {k: round(v, 4) for k, v in median_times(fns, repeats=5).items()}


def masks_without_mediapipe(faces, pics):
    """Per face (astronaut + the six of t1.jpg, 256 px crops from blazeface boxes): the OpenCV face mesh's oval
    against mediapipe's (mean point distance, mask IoU), and the GrabCut person mask against selfie segmentation."""
    from comfyui_likeness.faces import backend_blazeface as bb
    from comfyui_likeness.faces import backend_mediapipe as bm
    from comfyui_likeness.faces import segmentation as sg

    blaze = faces.loader.load_face_analysis("blazeface")
    rows = []
    for name in ("astronaut", "t1"):
        image = torch.from_numpy(pics[name]).float().div(255)[None]
        for index in range(len(blaze.detect(pics[name]))):
            crop = faces.crop.crop_faces(image, blaze, size=256, mask_source="box", index=index)
            rgb, box = (crop.images[0] * 255).round().byte().numpy(), crop.infos[0].box_in_crop
            row = {"photo": name, "face": index}
            ours = bb.face_oval_points(rgb, box)
            meshes = bm.face_mesh_points(rgb)
            if ours is not None and meshes:
                ref = min(meshes, key=lambda p: float(np.linalg.norm(p[list(bb.FACE_OVAL)].mean(0) - ours.mean(0))))
                ref = ref[list(bb.FACE_OVAL)]
                a = sg.polygon_mask(sg.convex_hull(ours), 256) > 0.5
                b = sg.polygon_mask(sg.convex_hull(ref), 256) > 0.5
                row["oval_mean_point_distance_px"] = round(float(np.linalg.norm(ours - ref, axis=1).mean()), 2)
                row["oval_mask_iou"] = round(float((a & b).sum() / (a | b).sum()), 3)
            grab = sg.grabcut_person_mask(rgb, box) > 0.5
            selfie = bm.person_mask(rgb) > 0.5
            row["grabcut_vs_selfie_iou"] = round(float((grab & selfie).sum() / max((grab | selfie).sum(), 1)), 3)
            rows.append(row)
    def summary(key):
        values = [r[key] for r in rows if key in r]
        return {"min": min(values), "median": float(np.median(values)), "max": max(values), "faces": len(values)}
    return {"per_face": rows, "oval_mask_iou": summary("oval_mask_iou"),
            "oval_mean_point_distance_px": summary("oval_mean_point_distance_px"),
            "grabcut_vs_selfie_iou": summary("grabcut_vs_selfie_iou")}


def embedding_agreement(faces, base, astronaut):
    """Tiny random insightface pack: torch alignment + converted IResNet vs insightface's own pipeline."""
    from fixtures_faces import write_pack

    write_pack(os.path.join(base, "models", "insightface", "models", "bench_tiny"), "centre", "torch", seed=5)
    analysis = faces.loader.load_face_analysis("insightface", "bench_tiny")
    embeds, aligned = faces.embeddings.embed_faces(analysis, astronaut)
    model = faces.arcface.arcface_from_pack("bench_tiny")
    image = astronaut.permute(0, 3, 1, 2)
    kps = torch.from_numpy(embeds.kps)
    ours = model.embed(image, kps)
    ours_aligned = faces.alignment.align_faces(image, kps, 112)[0].permute(1, 2, 0)
    return {"cosine_insightface_vs_torch": round(float((ours[0] * embeds.embeddings[0]).sum()), 6),
            "aligned_crop_mean_abs_diff_255": round(float((ours_aligned - aligned[0]).abs().mean()) * 255, 3)}


def converter_r50(faces):
    """A full-size IResNet-50 (random weights) exported like arcface_torch models, converted back."""
    import onnxruntime
    from fixtures_faces import random_ref_iresnet

    net = random_ref_iresnet(seed=0, layers=(3, 4, 14, 3), widths=(64, 128, 256, 512))
    path = os.path.join(tempfile.mkdtemp(prefix="likeness_r50_"), "w600k_r50_random.onnx")
    t = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (torch.zeros(1, 3, 112, 112),), path, input_names=["input.1"], output_names=["embedding"],
                          dynamic_axes={"input.1": {0: "batch"}, "embedding": {0: "batch"}}, opset_version=11,
                          do_constant_folding=True, dynamo=False)
    export_s = time.perf_counter() - t
    t = time.perf_counter()
    model = faces.arcface.load_arcface(path)
    convert_s = time.perf_counter() - t
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    x = torch.rand(4, 3, 112, 112, generator=torch.Generator().manual_seed(1))
    blob = ((x * 255 - 127.5) / 127.5).numpy()
    ref = session.run(None, {"input.1": blob})[0]
    with torch.no_grad():
        raw = model.net(x * model.pixel_scale + model.pixel_bias).numpy()
    unit = lambda a: a / np.linalg.norm(a, axis=1, keepdims=True)  # noqa: E731
    x1, x8 = x[:1], torch.rand(8, 3, 112, 112)

    def torch_fwd(inp):
        with torch.no_grad():
            return model(inp)
    times = median_times({"torch_b1": lambda: torch_fwd(x1), "ort_b1": lambda: session.run(None, {"input.1": blob[:1]}),
                          "torch_b8": lambda: torch_fwd(x8),
                          "ort_b8": lambda: session.run(None, {"input.1": ((x8 * 255 - 127.5) / 127.5).numpy()})},
                         repeats=3)
    return {"params_million": round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
            "onnx_mb": round(os.path.getsize(path) / 2 ** 20, 1), "export_seconds": round(export_s, 2),
            "convert_seconds": round(convert_s, 2),
            "max_abs_diff_raw": float(np.abs(raw - ref).max()), "max_abs_raw": float(np.abs(ref).max()),
            "min_cosine": float((unit(raw) * unit(ref)).sum(1).min()),
            "forward_seconds": {k: round(v, 4) for k, v in times.items()}}


def main():
    _, base = boot_host()
    from comfyui_likeness import faces
    from comfyui_likeness.faces import alignment, arcface, crop, embeddings, loader  # noqa: F401

    pics = photos()
    astronaut = torch.from_numpy(pics["astronaut"]).float().div(255)[None]
    result = {
        "machine": {"python": platform.python_version(), "torch": torch.__version__, "cpu_threads": torch.get_num_threads()},
        "detectors": detector_table(faces, pics),
        "face_crop_512_seconds": {b: crop_costs(faces, astronaut, b) for b in ("blazeface", "mediapipe")},
        "masks_without_mediapipe": masks_without_mediapipe(faces, pics),
        "embedding_agreement_tiny_pack": embedding_agreement(faces, base, astronaut),
        "converter_r50_random": converter_r50(faces),
    }
    write_result("faces", result)


if __name__ == "__main__":
    main()
